"""The machine's measured sgemm ceiling: float32 GEMM GFLOP/s (np.matmul, and cnet's own kernel).

    python bench/gemm_ceiling.py [--threads 1,2] [--repeats 7] [--json out.json]

Square 1024 and 2048 products, and the skinny shapes that convolutions hand to
BLAS (im2col GEMMs of the benchmarked models: a whole layer and a one-image
chunk as cnet's Conv2d runs them, the weight-gradient product with its long
inner dimension, a grouped layer's per-group product), at each thread count,
with numpy's BLAS pool limited by threadpoolctl.  "2x1" is two Python threads
each running its own products with a one-thread BLAS: how cnet's Conv2d uses
two cores (chunk-parallel workers), so that column is the ceiling of that design.
"cnet t": cnet's own GEMM kernel on t threads, where the machine has it
(ungrouped shapes).

GFLOP/s = 2*M*K*N / median time.  throughput.py calls ``ceiling_sources()`` between
models so every model's GFLOP/s is compared with a ceiling measured in the same
run, under the same load.  The ceiling is the faster of numpy's BLAS and cnet's
own GEMM kernel (_conv.gemm_packed, where the machine has it) on the square 2048
product: numpy's BLAS alone need not be the machine's best sgemm (a Zen 5 under
OPENBLAS_CORETYPE=Haswell: OpenBLAS 228-236 GFLOP/s on two cores, cnet's kernel
456 at square 2048, where whole models ran at 300-490 and read as 130-207% of
"the ceiling").
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, format_machine, median, table  # noqa: E402

# label -> (M, K, N, batch of independent products)
SHAPES = {
    "square 1024": (1024, 1024, 1024, 1),
    "square 2048": (2048, 2048, 2048, 1),
    "resnet20 3x3 16->16, 1 image (1024x144x16)": (1024, 144, 16, 1),
    "resnet20 3x3 16->16, batch 128 (131072x144x16)": (131072, 144, 16, 1),
    "resnet20 3x3 64->64, batch 128 (8192x576x64)": (8192, 576, 64, 1),
    "resnet20 wgrad 16->16 (144x131072x16)": (144, 131072, 16, 1),
    "vgg11 3x3 256->256 @8x8, batch 64 (4096x2304x256)": (4096, 2304, 256, 1),
    "vgg11 3x3 64->128 @16x16, 1 image (256x576x128)": (256, 576, 128, 1),
    "resnext 1x1 256->128, batch 64 (65536x256x128)": (65536, 256, 128, 1),
    "resnext 3x3 g8 128 (8 x 65536x144x16)": (65536, 144, 16, 8),
    "lenet fc1 (256x400x120)": (256, 400, 120, 1),
}

_controller = None


def _blas_limit(n):
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    _controller.limit(limits=n, user_api="blas")


def _operands(m, k, n, g, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((g, m, k), dtype=np.float32)
    b = rng.standard_normal((g, k, n), dtype=np.float32)
    return a, b, np.empty((g, m, n), np.float32)


def _gflops(product, flops, repeats, min_seconds, best):
    """Median (``best``: highest) GFLOP/s of ``product()`` after a warm-up call (BLAS
    buffers, pages); one timed sample repeats it until it lasts ``min_seconds``."""
    product()
    t0 = time.perf_counter()
    product()
    inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            product()
        samples.append(flops * inner / (time.perf_counter() - t0) / 1e9)
    return max(samples) if best else median(samples)


def sgemm_gflops(m, k, n, threads, repeats=7, groups=1, min_seconds=0.05, best=False):
    """Median (``best``: highest) GFLOP/s of ``np.matmul`` of a (groups, m, k) by
    (groups, k, n) float32 stack with BLAS on ``threads`` threads.  One timed
    sample repeats the product until it lasts ``min_seconds`` (tiny shapes)."""
    a, b, c = _operands(m, k, n, groups)
    _blas_limit(threads)
    return _gflops(lambda: np.matmul(a, b, out=c), 2.0 * m * k * n * groups, repeats,
                   min_seconds, best)


def sgemm_gflops_workers(m, k, n, workers, repeats=7, groups=1, min_seconds=0.05):
    """Aggregate GFLOP/s of ``workers`` Python threads each running its own
    product with a one-thread BLAS (cnet's chunk-parallel convolution)."""
    ops = [_operands(m, k, n, groups, seed) for seed in range(workers)]
    flops = 2.0 * m * k * n * groups
    _blas_limit(1)
    for a, b, c in ops:
        np.matmul(a, b, out=c)
    t0 = time.perf_counter()
    np.matmul(*ops[0][:2], out=ops[0][2])
    inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))

    def run(i):
        a, b, c = ops[i]
        for _ in range(inner):
            np.matmul(a, b, out=c)

    samples = []
    with ThreadPoolExecutor(workers) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(run, range(workers)))
            samples.append(flops * inner * workers / (time.perf_counter() - t0) / 1e9)
    return median(samples)


def own_gemm_gflops(m, k, n, threads, repeats=7, best=False, min_seconds=0.05):
    """GFLOP/s of cnet's own GEMM kernel (_conv.gemm_packed, B packed once) on an
    (m, k) by (k, n) float32 product on ``threads`` threads, or None where this
    machine has no such kernel (no AVX-512)."""
    from cnet_ext import _conv
    if not _conv.gemm_kernel():
        return None
    a, b, c = (x[0] for x in _operands(m, k, n, 1))
    packed = _conv.gemm_pack(b, None, threads)
    return _gflops(lambda: _conv.gemm_packed(a, packed, c, None, False, 0, m, threads),
                   2.0 * m * k * n, repeats, min_seconds, best)


def ceiling_sources(threads, repeats=5):
    """{source: best-sample GFLOP/s} of the square 2048 product at ``threads``:
    numpy's BLAS ("blas") and, where the machine has it, cnet's own kernel
    ("cnet").  The ceiling is the faster; best samples, as a ceiling is what the
    machine can do (on a shared machine the median says more about the other
    processes)."""
    m, k, n, g = SHAPES["square 2048"]
    found = {"blas": sgemm_gflops(m, k, n, threads, repeats, g, best=True)}
    own = own_gemm_gflops(m, k, n, threads, repeats, best=True)
    if own is not None:
        found["cnet"] = own
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="", help="substring filter on shape labels")
    ap.add_argument("--best", action="store_true",
                    help="report the best sample instead of the median (the machine's "
                         "capability when other processes share it)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    info = machine_info()
    print(format_machine(info))
    results = {}
    for label, (m, k, n, g) in SHAPES.items():
        if args.shapes and args.shapes not in label:
            continue
        r = {f"{t}": sgemm_gflops(m, k, n, t, args.repeats, g, best=args.best) for t in threads}
        if max(threads) > 1:
            r[f"{max(threads)}x1"] = sgemm_gflops_workers(m, k, n, max(threads), args.repeats, g)
        if g == 1:
            for t in threads:
                own = own_gemm_gflops(m, k, n, t, args.repeats, best=args.best)
                if own is not None:
                    r[f"cnet {t}"] = own
        results[label] = r
        print(f"  {label:52s} " + "  ".join(f"{c}: {v:7.1f}" for c, v in r.items()), flush=True)
    cols = list(dict.fromkeys(c for r in results.values() for c in r))
    print()
    print(f"GFLOP/s, {'best' if args.best else 'median'} of {args.repeats} samples")
    print(table(["shape (M x K x N)"] + [f"GFLOP/s {c} thr" for c in cols],
                [[label] + [f"{r[c]:.1f}" if c in r else "-" for c in cols]
                 for label, r in results.items()]))
    info["loadavg_end"] = os.getloadavg()
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in info['loadavg_end'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "gflops": results}, f, indent=1)


if __name__ == "__main__":
    main()
