"""Timing for the per-layer micro-benchmarks (bench_batchnorm.py, bench_pool_relu.py,
bench_first_layer.py).

Contenders (cnet and torch variants) run in interleaved rounds in one process, so
machine noise spreads over all of them; a round's figure is the median of ``reps``
runs after one warm-up run, and the best round counts.
"""
import time

import numpy as np


def clock(cpu_time):
    """Process CPU time (immune to time lost while descheduled on a shared machine;
    meaningful with one thread) or wall time."""
    return time.process_time if cpu_time else time.perf_counter


def median_ms(fn, reps, clk=time.perf_counter):
    fn()  # warm up (allocations, first touch)
    ts = []
    for _ in range(reps):
        t0 = clk()
        fn()
        ts.append(clk() - t0)
    return 1e3 * float(np.median(ts))


def best_of_rounds(contenders, rounds, reps, clk=time.perf_counter):
    """{name: best over ``rounds`` interleaved rounds of median_ms(fn, reps)} for a
    {name: fn} dict."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = min(best[name], median_ms(fn, reps, clk))
    return best
