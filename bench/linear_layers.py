"""Linear forward+backward (input gradient included) at the bench models' shapes: cnet vs torch.

Shapes: LeNet-5's fc1/fc2/fc3 at batch 256 and batch 128 (the main job), ResNet-18's
classifier (batch 32, 200 classes), VGG-11's (batch 64).  Both engines use the same
thread count in one process, in 3 interleaved rounds; the best round's median of
`--reps` runs counts.  `--python-tasks` makes cnet run a small GEMM's row parts as
Python tasks (the path taken where numpy's BLAS has no cblas symbols cnet knows),
to compare with the default (each OpenMP worker calls the BLAS from C).
Usage: python bench/linear_layers.py [--threads 2] [--reps 200] [--python-tasks]
"""
import argparse

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import nn
from cnet.nn import conv as conv_mod
from _timing import best_of_rounds

SHAPES = {  # name: (batch, in_features, out_features)
    "lenet5 fc1 (batch 256)": (256, 400, 120),
    "lenet5 fc2 (batch 256)": (256, 120, 84),
    "lenet5 fc3 (batch 256)": (256, 84, 10),
    "lenet5 fc1 (batch 128)": (128, 400, 120),
    "lenet5 fc2 (batch 128)": (128, 120, 84),
    "resnet18 fc (batch 32)": (32, 512, 200),
    "vgg11 fc (batch 64)": (64, 512, 10),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--python-tasks", action="store_true",
                    help="cnet's row parts as Python tasks instead of BLAS calls from C")
    args = ap.parse_args()
    import torch

    if args.python_tasks:
        conv_mod._cblas_ready = lambda: False
    torch.set_num_threads(args.threads)
    cnet.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads, torch {torch.__version__}, median of {args.reps} "
          f"(best of 3 rounds), fwd+bwd ms; cnet's small GEMMs: "
          f"{'Python tasks' if args.python_tasks or not conv_mod._cblas_ready() else 'BLAS from C'}")
    for name, (n, fin, fout) in SHAPES.items():
        layer = nn.Linear(fin, fout)
        x = rng.standard_normal((n, fin), dtype=np.float32)
        g = rng.standard_normal((n, fout), dtype=np.float32)
        tl = torch.nn.Linear(fin, fout)
        xt = torch.from_numpy(x).requires_grad_(True)
        gt = torch.from_numpy(g)

        def run_cnet():
            layer(x)
            layer.backward(g)

        def run_torch():
            xt.grad = None
            tl.weight.grad = tl.bias.grad = None
            tl(xt).backward(gt)
        best = best_of_rounds({"cnet": run_cnet, "torch": run_torch}, 3, args.reps)
        print(f"{name:24s} cnet {best['cnet']:.3f}  torch {best['torch']:.3f}  ->  "
              f"cnet/torch {best['cnet'] / best['torch']:.2f}")


if __name__ == "__main__":
    main()
