"""LeNet-5's first block, Conv2d(1, 6, 5) + ReLU + MaxPool2d(2) on (256, 32, 32, 1)
float32, forward+backward with no input gradient (the network's first layer):
cnet as Sequential runs it, cnet with its backward's passes kept separate, and torch.

cnet's narrow weight-gradient kernel takes the pool's gradient, gathers each row by
the pool's argmax, masks it by the ReLU and sums the bias gradient while making it
planar (Conv2d.backward_through_pool); "cnet separate" runs MaxPool2d.backward, the
ReLU mask + bias-sum pass and the kernel on the dense gradient one after another,
as before that fusion.  Torch (NCHW and channels_last, its best counts) runs the
same block with the input not requiring a gradient.  Interleaved rounds in one
process, the best round's median of --reps (bench/_timing.py).
Usage: python bench/bench_first_layer.py [--threads 2] [--reps 50] [--batch 256]
"""
import argparse

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import nn
from _timing import best_of_rounds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cnet.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 32, 32, 1), dtype=np.float32)
    block = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2))
    block.requires_input_grad_(False)
    g = rng.standard_normal(block(x).shape, dtype=np.float32)
    conv, pool = block[0], block[2]

    def run_cnet():
        block(x)
        block.backward(g)

    def run_cnet_separate():
        block(x)
        # the passes one after another: the pool's dx, then the conv's own mask + sums
        conv._narrow_backward = lambda x: False
        try:
            conv.backward(pool.backward(g))
        finally:
            del conv._narrow_backward

    xt_nchw = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    gt_nchw = torch.tensor(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
    contenders = {"cnet": run_cnet, "cnet separate": run_cnet_separate}
    for name, fmt in (("torch nchw", torch.contiguous_format),
                      ("torch channels_last", torch.channels_last)):
        # one module per layout: .to(memory_format) converts a module's weights in place
        tmod = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(),
                                   torch.nn.MaxPool2d(2)).to(memory_format=fmt)
        xt, gt = xt_nchw.contiguous(memory_format=fmt), gt_nchw.contiguous(memory_format=fmt)

        def run_torch(tmod=tmod, xt=xt, gt=gt):
            tmod.zero_grad(set_to_none=True)
            tmod(xt).backward(gt)
        contenders[name] = run_torch
    best = best_of_rounds(contenders, 3, args.reps)
    t_torch = min(best["torch nchw"], best["torch channels_last"])
    print(f"conv 1->6 5x5 + ReLU + maxpool 2x2, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}, fwd+bwd without input gradient, median of {args.reps}")
    print("  ".join(f"{k} {v:.2f} ms" for k, v in best.items())
          + f"  ->  cnet/torch-best {best['cnet'] / t_torch:.2f}, "
            f"cnet/cnet-separate {best['cnet'] / best['cnet separate']:.2f}")


if __name__ == "__main__":
    main()
