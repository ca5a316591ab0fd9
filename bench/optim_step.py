"""Optimizer-step benchmark over a ResNet-50-sized flat buffer (25.6M float32 parameters).

Contenders, per optimizer (SGD with momentum, Adam, AdamW) and thread count:
  cnet          cnet.optim fused step (one pass over p, grad and state)
  cnet+skip     the same with skip_nonfinite=True (adds a read-only pass over grad)
  numpy         the same update written as numpy array expressions (in place where
                numpy allows; numpy's elementwise ops are single-threaded)
  torch         torch.optim default on CPU (the for-loop implementation)
  torch-foreach torch.optim(foreach=True)
  torch-fused   torch.optim(fused=True)
All contenders update one shared parameter/gradient pair (cnet and numpy arrays, torch
tensors from_numpy on the same memory), each with its own state.  Repeats are
interleaved (one step of every contender per round) so that load from other processes
on a shared machine hits them alike; the table shows medians in ms/step and each
contender's time relative to cnet (>1: slower than cnet).

    python bench/optim_step.py [--params 25600000] [--repeats 9] [--threads 1,2]
"""
import argparse
import math
import os
import platform
import time

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import optim
from cnet.nn import Parameter


def numpy_step(name, p, g, state, t, lr, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
    """The update as numpy expressions (torch's formulas), with preallocated scratch."""
    tmp = state["tmp"]
    if name == "SGD":
        buf = state["buf"]
        buf *= momentum
        buf += g
        np.multiply(buf, lr, out=tmp)
        p -= tmp
        return
    b1, b2 = betas
    m, v = state["m"], state["v"]
    if name == "AdamW":
        p *= 1 - lr * wd
    m *= b1
    np.multiply(g, 1 - b1, out=tmp)
    m += tmp
    v *= b2
    np.multiply(g, g, out=tmp)
    tmp *= 1 - b2
    v += tmp
    np.sqrt(v, out=tmp)
    tmp /= math.sqrt(1 - b2 ** t)
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= lr / (1 - b1 ** t)
    p -= tmp


CONFIGS = {
    "SGD": dict(cnet=lambda ps, **k: optim.SGD(ps, lr=0.01, momentum=0.9, **k),
                torch=lambda T, ps, **k: T.optim.SGD(ps, lr=0.01, momentum=0.9, **k)),
    "Adam": dict(cnet=lambda ps, **k: optim.Adam(ps, lr=1e-3, **k),
                 torch=lambda T, ps, **k: T.optim.Adam(ps, lr=1e-3, **k)),
    "AdamW": dict(cnet=lambda ps, **k: optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, **k),
                  torch=lambda T, ps, **k: T.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, **k)),
}


def contenders(name, p_np, g_np, torch):
    cfg = CONFIGS[name]
    out = {}
    param = Parameter(np.zeros(1, np.float32))
    param.data, param.grad = p_np, g_np           # already flat: the optimizer uses it as is
    opt = cfg["cnet"]([param])
    out["cnet"] = opt.step
    opt_skip = cfg["cnet"]([param], skip_nonfinite=True)
    out["cnet+skip"] = opt_skip.step
    state = {"tmp": np.empty_like(p_np)}
    if name == "SGD":
        state["buf"] = g_np.copy()
    else:
        state["m"], state["v"] = np.zeros_like(p_np), np.zeros_like(p_np)
    counter = [0]

    def np_step():
        counter[0] += 1
        numpy_step(name, p_np, g_np, state, counter[0], lr=0.01 if name == "SGD" else 1e-3,
                   wd=1e-2)
    out["numpy"] = np_step
    if torch is not None:
        tp = torch.nn.Parameter(torch.from_numpy(p_np))
        tp.grad = torch.from_numpy(g_np)
        for label, kw in (("torch", {}), ("torch-foreach", {"foreach": True}),
                          ("torch-fused", {"fused": True})):
            try:
                o = cfg["torch"](torch, [tp], **kw)
                o.step()
                out[label] = o.step
            except (RuntimeError, TypeError, ValueError) as e:   # no fused kernel here
                print(f"  ({name} {label}: unavailable: {e})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=25_600_000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--optimizers", default="SGD,Adam,AdamW")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    print(f"cnet {cnet.__version__}, numpy {np.__version__}, torch "
          f"{torch.__version__ if torch else 'absent'}"
          f"{' (' + torch.backends.cpu.get_cpu_capability() + ')' if torch else ''}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"{args.params / 1e6:.1f}M float32 params, median of {args.repeats}")
    rng = np.random.default_rng(0)
    p = rng.standard_normal(args.params, dtype=np.float32) * 0.05
    g = rng.standard_normal(args.params, dtype=np.float32) * 0.01
    rows = []
    for nt in [int(s) for s in args.threads.split(",")]:
        cnet.set_num_threads(nt)
        if torch is not None:
            torch.set_num_threads(nt)
        for name in args.optimizers.split(","):
            fns = contenders(name, p, g, torch)
            for f in fns.values():            # warm-up: state allocation, page faults
                f()
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            rows.append((name, nt, {k: 1e3 * float(np.median(v)) for k, v in times.items()},
                         {k: 1e3 * float(np.min(v)) for k, v in times.items()}))
            del fns
    print_table("ms/step, median of the interleaved repeats; in brackets: time / cnet time",
                [(n, t, med) for n, t, med, _ in rows])
    print_table("ms/step, best of the repeats (less sensitive to other load on the machine)",
                [(n, t, best) for n, t, _, best in rows])


def print_table(title, rows):
    labels = ["cnet", "cnet+skip", "numpy", "torch", "torch-foreach", "torch-fused"]
    head = f"| {'optimizer':<9} | thr | " + " | ".join(f"{k:>14}" for k in labels) + " |"
    print("\n" + title)
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, nt, med in rows:
        cells = []
        for k in labels:
            if k in med:
                r = med[k] / med["cnet"]
                cells.append(f"{med[k]:6.1f} ({r:4.2f}x)" if k != "cnet" else f"{med[k]:14.1f}")
            else:
                cells.append(f"{'-':>14}")
        print(f"| {name:<9} | {nt:>3} | " + " | ".join(f"{c:>14}" for c in cells) + " |")


if __name__ == "__main__":
    main()
