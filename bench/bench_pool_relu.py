"""MaxPool2d(2) and ReLU forward+backward at (128, 32, 32, 16) float32: cnet vs torch.

Torch is timed in NCHW and channels_last (its best counts); both engines use the
same thread count, in the same process, in 3 interleaved rounds; the best
round's median of `--reps` runs counts.  On a shared machine, `--threads 1
--cpu-time` (process CPU time instead of wall time) is immune to time lost
while descheduled.
Usage: python bench/bench_pool_relu.py [--threads 2] [--reps 30] [--cpu-time]
"""
import argparse

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import nn
from _timing import best_of_rounds, clock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shape", type=int, nargs=4, default=(128, 32, 32, 16), metavar="NHWC")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time (meaningful with --threads 1)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cnet.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(args.shape, dtype=np.float32)
    layers = {"maxpool2x2": (nn.MaxPool2d(2), lambda t: torch.nn.functional.max_pool2d(t, 2)),
              "relu": (nn.ReLU(), torch.relu)}
    print(f"shape {tuple(args.shape)} NHWC float32, {args.threads} threads, torch "
          f"{torch.__version__}, median of {args.reps}"
          f"{', process CPU time' if args.cpu_time else ', wall time'}")
    for name, (layer, tfn) in layers.items():
        g = np.ascontiguousarray(rng.standard_normal(layer(x).shape, dtype=np.float32))

        def run_cnet():
            layer.forward(x)
            layer.backward(g)

        xt_nchw = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        variants = {"nchw": xt_nchw,
                    "channels_last": xt_nchw.contiguous(memory_format=torch.channels_last)}
        contenders = {"cnet": run_cnet}
        for vname, xt in variants.items():
            xt = xt.detach().requires_grad_(True)
            gt = tfn(xt.detach()).new_tensor(0).expand_as(tfn(xt.detach())).clone()
            gt.copy_(torch.from_numpy(g.transpose(0, 3, 1, 2) if g.ndim == 4 else g))
            if vname == "channels_last":
                gt = gt.contiguous(memory_format=torch.channels_last)

            def run_torch(xt=xt, gt=gt):
                xt.grad = None
                tfn(xt).backward(gt)
            contenders[vname] = run_torch
        best = best_of_rounds(contenders, 3, args.reps, clock(args.cpu_time))
        t_torch = min(best["nchw"], best["channels_last"])
        print(f"{name:11s} fwd+bwd  cnet {best['cnet']:.2f} ms  torch nchw {best['nchw']:.2f} ms"
              f"  channels_last {best['channels_last']:.2f} ms  ->  cnet/torch-best "
              f"{best['cnet'] / t_torch:.2f}")


if __name__ == "__main__":
    main()
