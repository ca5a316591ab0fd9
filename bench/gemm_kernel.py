"""cnet's own GEMM kernels (the 1x1 and im2col layers' products) against numpy's
BLAS and torch.matmul, on the shapes ResNeXt-29's 1x1 layers hand them.

    python bench/gemm_kernel.py [--threads 2] [--rounds 5] [--reps 5]

forward / dx: C = A B with A an NHWC map read in place (M = batch * H * W rows)
and B the weight packed once (cnet: _conv.gemm_pack, timed apart; the layers pack
per call, except forwards of at most 256 rows, which read the weight in place).
dW: gw += A^T dY summed over a chunk's rows, as Conv2d's backward runs it per chunk (cnet: _conv.gemm_tn accumulating in place; BLAS and torch: the
product into a buffer, then an add).  dx+=: C += A B, a residual block's input
gradient added to the shortcut's (cnet: gemm_packed(accumulate=True), C added in
the store; numpy: the product into a buffer, then an add; torch: addmm_).  Contenders alternate in rounds in one
process (bench/_timing.py); a row's figure is the best round's median.  Ratios
are cnet / best other (< 1: cnet faster).  Without AVX-512 cnet's layers use BLAS
for these products (_conv.gemm_kernel()); the kernels still run here.
"""
import argparse
import os
import sys

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import best_of_rounds  # noqa: E402
from common import format_machine, machine_info  # noqa: E402
from gemm_ceiling import _blas_limit  # noqa: E402

from cnet_ext import _conv  # noqa: E402

# label: (M, K, N) of the forward product (batch 64); dx swaps K and N
LAYERS = {
    "32x32x64->256": (65536, 64, 256),
    "32x32x256->128": (65536, 256, 128),
    "32x32x128->256": (65536, 128, 256),
    "16x16x512->256": (16384, 512, 256),
    "16x16x256->512": (16384, 256, 512),
    "8x8x512->1024": (4096, 512, 1024),
    "8x8x1024->512": (4096, 1024, 512),
}


def _chunk_rows(m, k):
    """Rows per chunk of Conv2d's backward for a 1x1 layer (1 MB of input per chunk,
    whole images of a batch of 64)."""
    image = m // 64
    return min(m, image * max(1, (1 << 20) // (image * k * 4)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    print(format_machine(machine_info()))
    print(f"threads={args.threads}; ms, best round's median; ratio cnet / best other")
    cnet.set_num_threads(args.threads)
    _blas_limit(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    header = f"{'layer':16} {'product':7} {'M x K x N':>18} {'cnet':>8} {'pack':>6} {'numpy':>8}"
    print(header + (f" {'torch':>8}" if torch else "") + f" {'ratio':>6}")
    for label, (m, k, n) in LAYERS.items():
        for product in ("forward", "dx", "dx+=", "dW"):
            if product == "dW":
                rows = _chunk_rows(m, k)
                x = rng.standard_normal((rows, k), dtype=np.float32)
                dy = rng.standard_normal((rows, n), dtype=np.float32)
                gw, tmp = np.zeros((k, n), np.float32), np.empty((k, n), np.float32)
                contenders = {
                    "cnet": lambda: _conv.gemm_tn(x, dy, gw, True, 0, rows, args.threads),
                    "numpy": lambda: (np.matmul(x.T, dy, out=tmp), np.add(gw, tmp, out=gw))}
                if torch:
                    xt, dyt, gwt = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(gw)
                    tt = torch.empty(k, n)
                    contenders["torch"] = lambda: (torch.matmul(xt.T, dyt, out=tt),
                                                   gwt.add_(tt))
                shape, pack_ms = (k, rows, n), None
            else:
                kk, nn_ = (k, n) if product == "forward" else (n, k)   # dx: dY W^T
                a = rng.standard_normal((m, kk), dtype=np.float32)
                b = rng.standard_normal((kk, nn_), dtype=np.float32)
                c = rng.standard_normal((m, nn_), dtype=np.float32)
                packed = _conv.gemm_pack(b, None, args.threads)
                add = product == "dx+="
                tmp = np.empty_like(c) if add else c
                contenders = {
                    "cnet": lambda: _conv.gemm_packed(a, packed, c, None, False, 0, m,
                                                      args.threads, accumulate=add),
                    "numpy": lambda: (np.matmul(a, b, out=tmp),
                                      np.add(c, tmp, out=c) if add else None)}
                if torch:
                    at, bt, ct = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
                    contenders["torch"] = ((lambda: ct.addmm_(at, bt)) if add else
                                           (lambda: torch.matmul(at, bt, out=ct)))
                pack_ms = best_of_rounds({"p": lambda: _conv.gemm_pack(b, packed, args.threads)},
                                         1, args.reps)["p"]
                shape = (m, kk, nn_)
            best = best_of_rounds(contenders, args.rounds, args.reps)
            other = min(v for name, v in best.items() if name != "cnet")
            line = (f"{label:16} {product:7} {'x'.join(map(str, shape)):>18} "
                    f"{best['cnet']:8.2f} {'' if pack_ms is None else f'{pack_ms:.2f}':>6} "
                    f"{best['numpy']:8.2f}")
            if torch:
                line += f" {best['torch']:8.2f}"
            print(line + f" {best['cnet'] / other:6.2f}", flush=True)


if __name__ == "__main__":
    main()
