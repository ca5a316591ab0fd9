"""Forward+backward time of single Conv2d layers, cnet vs PyTorch in the same run.

    python bench/conv_layers.py [--threads 2] [--repeats 15] [--profile]
    python bench/conv_layers.py --model resnext29_8x16d   # every conv shape of a model
    python bench/conv_layers.py --model resnet18 --forward   # inference: forward only


For each layer: the median over repeats of one training step (forward, then
backward with the input gradient) for cnet (NHWC/HWIO) and for torch in NCHW
and channels_last (the better of the two is the reference), timed in
alternation so that load from other processes hits all three alike.  The ratio is
cnet time / best torch time (lower is better, < 1 means cnet is faster);
"min ratio" compares the fastest repeats, which on a loaded machine are the
least disturbed ones.
--profile splits cnet's time by kernel (summed over worker threads).
"""
import argparse
import collections
import os
import statistics
import sys
import time

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np

from cnet import nn
from cnet.nn import conv as conv_mod

LAYERS = {
    # name: (N, H, W, C_in, C_out, kernel, stride, padding, groups)
    "resnet20-stage1 32x32x16->16 3x3": (128, 32, 32, 16, 16, 3, 1, 1, 1),
    "resnet20-stage3 8x8x64->64 3x3": (128, 8, 8, 64, 64, 3, 1, 1, 1),
    "resnet20-down 32x32x16->32 3x3 s2": (128, 32, 32, 16, 32, 3, 2, 1, 1),
    "1x1 16x16x64->64": (128, 16, 16, 64, 64, 1, 1, 0, 1),
    "resnext 8x8x128 3x3 g32": (128, 8, 8, 128, 128, 3, 1, 1, 32),
    # ResNeXt-29 8x16d (batch 64): the grouped 3x3 of each stage, 16/32/64 ch per group
    "resnext29 32x32x128 3x3 g8": (64, 32, 32, 128, 128, 3, 1, 1, 8),
    "resnext29 32x32x256 3x3 g8 s2": (64, 32, 32, 256, 256, 3, 2, 1, 8),
    "resnext29 16x16x256 3x3 g8": (64, 16, 16, 256, 256, 3, 1, 1, 8),
    "resnext29 8x8x512 3x3 g8": (64, 8, 8, 512, 512, 3, 1, 1, 8),
    "depthwise 16x16x64 3x3": (128, 16, 16, 64, 64, 3, 1, 1, 64),
}


def model_layers(name):
    """The distinct Conv2d shapes of a bench model (common.MODELS) at its batch size:
    {label: spec} and {label: how many layers have it}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common
    model, input_shape, batch, _ = common.build_cnet_model(name)
    specs = collections.Counter()

    def record(m, forward):
        def wrapped(x):
            specs[(x.shape[0], x.shape[1], x.shape[2], m.in_channels, m.out_channels,
                   m.kernel_size[0], m.stride[0], m.padding[0], m.groups)] += 1
            return forward(x)
        return wrapped
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.forward = record(m, m.forward)
    model.eval()
    model(np.zeros((batch,) + input_shape, np.float32))
    layers, counts = {}, {}
    for spec, count in specs.items():
        n, h, w, cin, cout, k, s, p, g = spec
        label = f"{h}x{w}x{cin}->{cout} {k}x{k}" + (f" s{s}" if s > 1 else "") + (
            f" g{g}" if g > 1 else "")
        layers[label], counts[label] = spec, count
    return layers, counts


def interleaved_medians(fns, repeats, warmup=2):
    """Median time of each callable, timed in alternation round by round, so
    that load from other processes on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def cnet_step(spec, forward_only=False):
    n, h, w, cin, cout, k, s, p, g = spec
    m = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=False)
    x = np.random.default_rng(0).standard_normal((n, h, w, cin)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(m.output_shape(x.shape)).astype(np.float32)
    if forward_only:
        m.eval()
        return (lambda: m(x)), m, x, dy

    def step():
        m(x)
        m.backward(dy)
    return step, m, x, dy


def torch_steps(spec, threads, forward_only=False):
    import torch
    torch.set_num_threads(threads)
    n, h, w, cin, cout, k, s, p, g = spec
    steps = {}
    for fmt in ("torch nchw", "torch cl"):
        mf = torch.contiguous_format if fmt == "torch nchw" else torch.channels_last
        conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=False)
        conv = conv.to(memory_format=mf)
        x = torch.randn(n, cin, h, w).contiguous(memory_format=mf).requires_grad_()
        with torch.no_grad():
            dy = torch.randn_like(conv(x)).contiguous(memory_format=mf)

        def step(conv=conv, x=x, dy=dy):
            x.grad = None
            conv.weight.grad = None
            conv(x).backward(dy)

        def forward(conv=conv.eval(), x=x.detach()):
            with torch.inference_mode():
                conv(x)
        steps[fmt] = forward if forward_only else step
    return steps


class _Timed:
    """Delegates to ``target``; times the named callables into ``totals``."""

    def __init__(self, target, names, totals, label):
        self._target, self._names, self._totals, self._label = target, names, totals, label

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name not in self._names:
            return attr
        totals, key = self._totals, f"{self._label}.{name}"

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                totals[key] += time.perf_counter() - t0
        return timed


def profile_cnet(m, x, dy, repeats):
    totals = collections.Counter()
    orig_np, orig_conv = conv_mod.np, conv_mod._conv
    conv_mod.np = _Timed(np, {"matmul", "add", "copyto", "empty", "empty_like"}, totals, "np")
    conv_mod._conv = _Timed(orig_conv, {"im2col", "col2im", "im2col_region", "col2im_region_add",
                                        "bias_grad", "conv_direct", "conv_direct_wgrad",
                                        "depthwise_forward", "depthwise_input_grad",
                                        "depthwise_weight_grad", "gemm_packed",
                                        "gemm_tn", "gemm_pack",
                                        "conv_phase_dx"}, totals, "kernel")
    try:
        m(x)
        m.backward(dy)
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(repeats):
            m(x)
            m.backward(dy)
        total = (time.perf_counter() - t0) / repeats
    finally:
        conv_mod.np, conv_mod._conv = orig_np, orig_conv
    parts = {k: v / repeats for k, v in totals.items()}
    parts["other (python, checks)"] = total - sum(parts.values())
    return total, parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default="", help="substring filter on layer names")
    ap.add_argument("--forward", action="store_true",
                    help="inference: forward only, eval mode (torch under inference_mode)")
    ap.add_argument("--model", default=None,
                    help="time every distinct conv shape of this bench model (bench/common.py) "
                         "instead of the fixed list, with a count-weighted total")
    ap.add_argument("--no-image-blocks", action="store_true",
                    help="switch cnet's image-blocked direct kernels off (the row kernels, "
                         "im2col and regions take those layers), to compare")
    args = ap.parse_args(argv)
    if args.no_image_blocks:
        conv_mod._IMAGE_BLOCK_MAX_WIDTH = 0
    layers, counts = (model_layers(args.model) if args.model
                      else (LAYERS, dict.fromkeys(LAYERS, 1)))
    totals = collections.Counter()
    cnet.set_num_threads(args.threads)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    print(f"threads={args.threads} repeats={args.repeats} "
          f"col chunk={conv_mod._COL_CHUNK_BYTES >> 10} KiB "
          f"image blocks up to width {conv_mod._IMAGE_BLOCK_MAX_WIDTH}")
    print(f"{'layer':36s} {'cnet ms':>8s} {'torch nchw':>10s} {'torch cl':>9s} {'ratio':>6s} "
          f"{'min ratio':>9s} {'count':>5s}")
    for name, spec in layers.items():
        if args.only and args.only not in name:
            continue
        step, m, x, dy = cnet_step(spec, args.forward)
        fns = {"cnet": step}
        if have_torch:
            fns.update(torch_steps(spec, args.threads, args.forward))
        t, tmin = interleaved_medians(fns, args.repeats)
        if have_torch:
            best = min(t["torch nchw"], t["torch cl"])
            best_min = min(tmin["torch nchw"], tmin["torch cl"])
            print(f"{name:36s} {t['cnet'] * 1e3:8.2f} {t['torch nchw'] * 1e3:10.2f} "
                  f"{t['torch cl'] * 1e3:9.2f} {t['cnet'] / best:6.2f} "
                  f"{tmin['cnet'] / best_min:9.2f} {counts[name]:5d}")
            totals["torch"] += counts[name] * best
        else:
            print(f"{name:36s} {t['cnet'] * 1e3:8.2f} {'':>36s} {counts[name]:5d}")
        totals["cnet"] += counts[name] * t["cnet"]
        if args.profile:
            total, parts = profile_cnet(m, x, dy, max(3, args.repeats // 3))
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"    {k:28s} {v * 1e3:8.2f} ms {100 * v / total:5.1f}%")
        sys.stdout.flush()
    if args.model:
        line = f"{'all layers (count-weighted)':36s} {totals['cnet'] * 1e3:8.2f}"
        if have_torch and totals["torch"] > 0:
            line += (f" {'best torch per layer':>20s} {totals['torch'] * 1e3:.2f} ms, ratio "
                     f"{totals['cnet'] / totals['torch']:.2f}")
        print(line)


if __name__ == "__main__":
    main()
