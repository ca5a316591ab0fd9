"""BatchNorm2d training forward+backward: cnet (NHWC) vs torch (channels_last and NCHW).

    python bench/bench_batchnorm.py [--threads 2] [--relu]

Prints median ms per forward+backward (best of two rounds) and the ratio
cnet / torch for each torch layout (below 1 means cnet is faster).
"""
import argparse
import time

import numpy as np

import cnet
from cnet import nn


def median_ms(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def best_of_two(fn, iters):
    return min(median_ms(fn, iters), median_ms(fn, iters))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--relu", action="store_true", help="fused BN+ReLU (torch: BN then ReLU)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import torch
    cnet.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} relu={args.relu} torch {torch.__version__}")
    for shape in [(128, 32, 32, 16), (64, 8, 8, 256)]:
        C = shape[-1]
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        bn = nn.BatchNorm2d(C)
        if args.relu:
            bn.fuse_relu()

        def run_cnet():
            bn.forward(x)
            bn.backward(dy)

        t_cnet = best_of_two(run_cnet, args.iters)
        row = [f"{str(shape):>18}  cnet {t_cnet:7.2f} ms"]
        for layout, fmt in [("channels_last", torch.channels_last),
                            ("NCHW", torch.contiguous_format)]:
            tb = torch.nn.BatchNorm2d(C)
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            gt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            xt.requires_grad_(True)

            def run_torch():
                y = tb(xt)
                if args.relu:
                    y = torch.relu(y)
                y.backward(gt)
                xt.grad = None

            t_torch = best_of_two(run_torch, args.iters)
            row.append(f"torch {layout} {t_torch:7.2f} ms (ratio {t_cnet / t_torch:4.2f})")
        print("  ".join(row))


if __name__ == "__main__":
    main()
