"""Per-layer time of a cnet training step (or inference), forward and backward,
sorted, with each layer's share of the step: where the next bottleneck is.

    python bench/profile_layers.py --model resnet20 [--threads 2] [--iters 10]
                                   [--mode train|infer] [--top 30] [--no-torch] [--json f]

Every module's ``forward`` and ``backward`` is wrapped (instance attributes,
removed afterwards) with a timer that keeps a stack, so each module is charged
its EXCLUSIVE time: a residual ``Add`` gets its own add(+ReLU) kernel and the
gradient sum, not its branches; a container's own Python work shows up under
its name.  ReLUs that Sequential fused into the layer before them never run on
their own (their cost is inside that layer).  The wrappers switch off what joins
two layers in one pass (eval-mode convolution + batch norm per chunk or folded into
the convolution's weights, a training batch norm's moments taken by the convolution
before it, a residual
block's batch norm + add + ReLU), so each layer is timed alone; the plain step
keeps them.  The loss, ``zero_grad`` and the
optimizer step are timed too, and the rest of the step is "unaccounted".
Times are medians over --iters instrumented steps after warm-up; the table
also shows the step time without instrumentation (the wrappers' own overhead
is the difference).  GFLOP/s per layer: Conv2d/Linear forward 2*MACs,
backward 2x that (input and weight gradients).

With torch installed the same network (bench/_torch_models.py, channels_last
by default) is profiled with torch.profiler in a separate process (top-level
ops only, so nothing is counted twice) and both are summarised by category
(convolution forward/backward, BN/ReLU/add/pool, linear, loss, optimizer,
other), side by side.  torch.profiler costs a few microseconds per op, so the
plain step times of both are printed as well.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from common import MODELS, Worker, table  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4

# category of a cnet (layer type, phase)
_MEMBOUND = {"BatchNorm2d", "BatchNorm1d", "ReLU", "Add", "Concat", "MaxPool2d", "AvgPool2d",
             "GlobalAvgPool2d", "Dropout", "ShortcutA", "Flatten", "Identity"}


def cnet_category(kind, phase):
    if kind == "Conv2d":
        return f"conv {phase}"
    if kind == "Linear":
        return f"linear {phase}"
    if kind in _MEMBOUND:
        return f"BN/ReLU/add/pool {phase}"
    if kind in ("loss", "optimizer step", "zero_grad"):
        return "loss" if kind == "loss" else "optimizer + zero_grad"
    if kind in ("Sequential",) or phase == "python":
        return "containers, python, other"
    return "containers, python, other"


def torch_category(name):
    """Category of a top-level torch.profiler event."""
    bwd = name.startswith("autograd::engine::evaluate_function:")
    op = name.split(":")[-1].strip() if bwd else name
    phase = "bwd" if bwd else "fwd"
    if "Convolution" in op or op in ("aten::conv2d", "aten::convolution", "aten::_convolution",
                                     "aten::mkldnn_convolution"):
        return f"conv {phase}"
    if op in ("aten::linear", "aten::addmm", "aten::matmul") or op.startswith(("Addmm", "TBackward", "Mm")):
        return f"linear {phase}"
    if any(k in op for k in ("batch_norm", "BatchNorm", "relu", "Relu", "Threshold", "max_pool",
                             "MaxPool", "adaptive_avg", "AdaptiveAvg", "Mean", "aten::add",
                             "AddBackward", "Slice", "CopySlices", "new_zeros", "aten::cat",
                             "Cat", "dropout", "Dropout", "AsStrided", "permute", "Permute",
                             "flatten", "View", "aten::copy_", "aten::slice",
                             "aten::contiguous")):
        return f"BN/ReLU/add/pool {phase}"
    if any(k in op for k in ("cross_entropy", "NllLoss", "LogSoftmax", "ones_like")):
        return "loss"
    if "Optimizer" in op or "AccumulateGrad" in op:
        return "optimizer + zero_grad"
    return "containers, python, other"


CATEGORY_ORDER = ["conv fwd", "conv bwd", "BN/ReLU/add/pool fwd", "BN/ReLU/add/pool bwd",
                  "linear fwd", "linear bwd", "loss", "optimizer + zero_grad",
                  "containers, python, other"]


# -- cnet -------------------------------------------------------------------------------

def profile_cnet(model_name, threads, iters, mode="train", batch=None, warmup=2):
    """Per-module exclusive times (median over iters) of cnet's step; returns a dict."""
    import cnet
    with cnet.threads(threads):
        return _profile_cnet(model_name, threads, iters, mode, batch, warmup)


def _profile_cnet(model_name, threads, iters, mode, batch, warmup):
    import cnet              # before numpy: cnet sets OpenBLAS options its import reads
    import numpy as np
    from cnet import nn, optim
    from cnet.models.summary import layer_flops

    cnet.manual_seed(0)
    model, shape, batch, classes = common.build_cnet_model(model_name, batch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape, dtype=np.float32)
    y = rng.integers(0, classes, batch)
    train = mode == "train"
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train(train)
    model.requires_input_grad_(False)     # as torch: the input does not require grad

    acc = collections.Counter()     # (name, phase) -> seconds in this iteration
    stack = []
    shapes = {}
    names = {}
    kinds = {}

    def timed(key, fn):
        def run(*a):
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                out = fn(*a)
            finally:
                dt = time.perf_counter() - t0
                child = stack.pop()
                acc[key] += dt - child
                if stack:
                    stack[-1] += dt
            if key[1] == "fwd" and key not in shapes:
                shapes[key] = (getattr(a[0], "shape", None), getattr(out, "shape", None))
            return out
        return run

    def step():
        logits = model(x)
        if train:
            loss_fn(logits, y)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()

    plain = []
    for _ in range(warmup):
        step()
    for _ in range(max(3, iters // 2)):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)

    modules = {}
    for name, m in model.named_modules():
        if id(m) not in modules:
            modules[id(m)] = (name or "(model)", m)
    patched = []
    for name, m in modules.values():
        names[name] = m
        kinds[name] = type(m).__name__
        for phase, attr in (("fwd", "forward"), ("bwd", "backward")):
            if attr in m.__dict__:
                raise RuntimeError(f"{name} already has an instance attribute {attr}")
            object.__setattr__(m, attr, timed((name, phase), getattr(m, attr)))
            patched.append((m, attr))
    loss_fn.forward = timed(("loss", "fwd"), loss_fn.forward)
    loss_fn.backward = timed(("loss", "bwd"), loss_fn.backward)
    opt.zero_grad = timed(("zero_grad", "opt"), opt.zero_grad)
    opt.step = timed(("optimizer step", "opt"), opt.step)
    kinds.update({"loss": "loss", "zero_grad": "zero_grad", "optimizer step": "optimizer step"})

    per_iter, steps = [], []
    try:
        step()                                   # records shapes; not counted
        for _ in range(iters):
            acc.clear()
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            per_iter.append(dict(acc))
    finally:
        for m, attr in patched:
            m.__dict__.pop(attr, None)
    keys = sorted({k for it in per_iter for k in it})
    med = {k: statistics.median(it.get(k, 0.0) for it in per_iter) for k in keys}
    step_t = statistics.median(steps)
    rows = []
    for (name, phase), t in med.items():
        kind = kinds.get(name, name)
        gflops = None
        if (name, "fwd") in shapes and kind in ("Conv2d", "Linear"):
            ins, outs = shapes[(name, "fwd")]
            f = layer_flops(names[name], ins, outs) * (2 if phase == "bwd" else 1)
            gflops = f / t / 1e9 if t > 0 else None
        out_shape = shapes.get((name, "fwd"), (None, None))[1]
        rows.append({"name": name, "type": kind, "phase": phase, "ms": t * 1e3,
                     "pct": 100 * t / step_t, "gflops": gflops,
                     "out_shape": list(out_shape[1:]) if out_shape else None})
    rows.sort(key=lambda r: -r["ms"])
    # per iteration, then the median: medians of the parts need not add up to the median step
    unaccounted = statistics.median(s - sum(it.values()) for s, it in zip(steps, per_iter))
    cats = collections.Counter()
    for r in rows:
        cats[cnet_category(r["type"], r["phase"])] += r["ms"]
    cats["containers, python, other"] += max(0.0, unaccounted * 1e3)
    return {"model": model_name, "threads": threads, "mode": mode, "batch": batch,
            "step_ms": step_t * 1e3, "plain_step_ms": statistics.median(plain) * 1e3,
            "unaccounted_ms": unaccounted * 1e3, "rows": rows,
            "categories": dict(cats)}


# -- torch (worker process) -----------------------------------------------------------------

def profile_torch(cfg):
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from _torch_models import build_torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = build_torch(cfg["spec"])
    h, w, c = cfg["input"]
    x = torch.randn(cfg["batch"], c, h, w)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],))
    if cfg["layout"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    train = cfg["mode"] == "train"
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        if train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(x)

    for _ in range(cfg.get("warmup", 2)):
        step()
    plain = []
    for _ in range(max(3, cfg["iters"] // 2)):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(cfg["iters"]):
            step()
        prof_step = (time.perf_counter() - t0) / cfg["iters"]
    cats, ops = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.cpu_parent is None:
            us = e.cpu_time_total / cfg["iters"]
            cats[torch_category(e.name)] += us / 1e3
            ops[e.name] += us / 1e3
    accounted = sum(cats.values())
    cats["containers, python, other"] += max(0.0, prof_step * 1e3 - accounted)
    return {"plain_step_ms": statistics.median(plain) * 1e3, "step_ms": prof_step * 1e3,
            "categories": dict(cats), "top_ops": ops.most_common(25)}


def worker_main(cfg):
    def handle(cmd):
        if cmd.get("quit"):
            return {}
        return profile_torch(cfg)
    common.serve(handle)


# -- report ---------------------------------------------------------------------------------

def report(res, top, torch_res=None):
    lines = [f"{res['model']} {res['mode']}, batch {res['batch']}, {res['threads']} thread(s): "
             f"step {res['step_ms']:.1f} ms instrumented, {res['plain_step_ms']:.1f} ms plain; "
             f"unaccounted {res['unaccounted_ms']:.1f} ms"]
    cum, rows = 0.0, []
    for i, r in enumerate(res["rows"][:top], 1):
        cum += r["pct"]
        rows.append([i, r["name"], r["type"], r["phase"], f"{r['ms']:.2f}", f"{r['pct']:.1f}",
                     f"{cum:.1f}", "-" if r["gflops"] is None else f"{r['gflops']:.1f}",
                     "x".join(map(str, r["out_shape"])) if r["out_shape"] else ""])
    lines.append(table(["#", "layer", "type", "phase", "ms", "% step", "cum %", "GFLOP/s",
                        "output (HWC)"], rows))
    # by layer type and phase
    by = collections.Counter()
    for r in res["rows"]:
        by[(r["type"], r["phase"])] += r["ms"]
    lines.append("")
    lines.append(table(["type", "phase", "ms", "% step"],
                       [[k[0], k[1], f"{v:.2f}", f"{100 * v / res['step_ms']:.1f}"]
                        for k, v in by.most_common()]))
    lines.append("")
    cats = res["categories"]
    header = ["category", "cnet ms", "cnet %"]
    if torch_res:
        header += [f"torch ms ({torch_res['layout']})", "torch %", "cnet - torch ms"]
    crow = []
    for c in CATEGORY_ORDER:
        v = cats.get(c, 0.0)
        row = [c, f"{v:.2f}", f"{100 * v / res['step_ms']:.1f}"]
        if torch_res:
            tv = torch_res["categories"].get(c, 0.0)
            row += [f"{tv:.2f}", f"{100 * tv / torch_res['step_ms']:.1f}", f"{v - tv:+.2f}"]
        crow.append(row)
    total = ["step", f"{res['step_ms']:.2f}", "100"]
    if torch_res:
        total += [f"{torch_res['step_ms']:.2f}", "100", f"{res['step_ms'] - torch_res['step_ms']:+.2f}"]
    crow.append(total)
    lines.append(table(header, crow))
    if torch_res:
        lines.append(f"plain (uninstrumented) step: cnet {res['plain_step_ms']:.1f} ms, torch "
                     f"{torch_res['plain_step_ms']:.1f} ms -> speed vs torch "
                     f"{torch_res['plain_step_ms'] / res['plain_step_ms']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", help=", ".join(MODELS))
    ap.add_argument("--models", default=None, help="several, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mode", default="train", choices=("train", "infer"))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--layout", default="channels_last", choices=("channels_last", "nchw"),
                    help="torch layout to compare with")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    names = args.models.split(",") if args.models else [args.model]
    have_torch = common.torch_available() and not args.no_torch
    print(common.format_machine(common.machine_info()), flush=True)
    out = []
    for name in names:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        torch_res = None
        if have_torch:
            # torch in its own process, with cnet's OMP_WAIT_POLICY default removed from
            # its environment (common.torch_env)
            from _torch_models import spec_from_cnet
            model, shape, batch, classes = common.build_cnet_model(name, args.batch)
            cfg = {"spec": spec_from_cnet(model), "input": list(shape), "batch": batch,
                   "classes": classes, "threads": args.threads, "mode": args.mode,
                   "iters": args.iters, "layout": args.layout}
            del model
            w = Worker(os.path.abspath(__file__), cfg, env=common.torch_env())
            try:
                torch_res = w.call(run=True)
                torch_res["layout"] = args.layout
                w.call(quit=True)
            finally:
                w.close()
        res = profile_cnet(name, args.threads, args.iters, args.mode, args.batch)
        res["torch"] = torch_res
        out.append(res)
        print()
        print(report(res, args.top, torch_res), flush=True)
        if torch_res:
            print("torch top-level ops (ms per step): " + ", ".join(
                f"{n.replace('autograd::engine::evaluate_function: ', 'bwd ')} {v:.1f}"
                for n, v in torch_res["top_ops"][:12]))
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
