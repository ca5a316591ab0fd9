"""BatchNorm2d training forward+backward: cnet (NHWC) vs torch (channels_last and NCHW).

    python bench/bench_batchnorm.py [--threads 2] [--relu] [--reps 20] [--rounds 2] [--cpu-time]

For each shape, cnet and torch in both layouts are timed in interleaved rounds
in this one process (same thread count); a round's figure is the median of
``--reps`` forward+backward runs and the best round counts.  ``--relu`` fuses
ReLU into cnet's BN (as Sequential(BN, ReLU) does) against torch's BN then
ReLU.  Ratio = cnet time / torch time (below 1: cnet faster).  On a shared
machine ``--threads 1 --cpu-time`` is immune to time lost while descheduled.
"""
import argparse

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import nn
from _timing import best_of_rounds, clock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--relu", action="store_true", help="fused BN+ReLU (torch: BN then ReLU)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall time")
    args = ap.parse_args()
    import torch
    cnet.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"BatchNorm2d fwd+bwd float32, {args.threads} threads, relu={args.relu}, torch "
          f"{torch.__version__}; ms: best of {args.rounds} interleaved rounds of the median "
          f"of {args.reps}{' (CPU time)' if args.cpu_time else ''}")
    for shape in [(128, 32, 32, 16), (64, 8, 8, 256)]:
        C = shape[-1]
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        bn = nn.BatchNorm2d(C)
        if args.relu:
            bn.fuse_relu()

        def run_cnet():
            bn.forward(x)
            bn.backward(dy)

        contenders = {"cnet": run_cnet}
        for layout, fmt in [("torch channels_last", torch.channels_last),
                            ("torch NCHW", torch.contiguous_format)]:
            tb = torch.nn.BatchNorm2d(C)
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            gt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            xt.requires_grad_(True)

            def run_torch(tb=tb, xt=xt, gt=gt):
                y = tb(xt)
                if args.relu:
                    y = torch.relu(y)
                y.backward(gt)
                xt.grad = None

            contenders[layout] = run_torch
        best = best_of_rounds(contenders, args.rounds, args.reps, clock(args.cpu_time))
        row = [f"{str(shape):>18}  cnet {best['cnet']:6.2f}"]
        for name in list(contenders)[1:]:
            row.append(f"{name} {best[name]:6.2f} (ratio {best['cnet'] / best[name]:.2f})")
        print("  ".join(row))


if __name__ == "__main__":
    main()
