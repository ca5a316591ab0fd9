"""``cnet.summary(model, input_shape)``: a per-layer table like torchinfo / Keras.

Output shapes come from running the model once, in eval mode, on a zero batch:
every module's ``forward`` is wrapped for the duration of that run (and restored
afterwards), so any Module works, containers included.  Rows are the layers that
compute: leaves (modules without children), modules that own parameters, and the
``Add`` / ``Concat`` joins, in the order they finish.  A ReLU that ``Sequential``
fused into the layer before it never runs on its own; it still gets a row (marked
fused) with that layer's output shape.  ``Identity`` layers (shortcuts) get none.

FLOPs are per sample, forward, counted as:

- Conv2d / Linear: 2 x multiply-adds (bias additions not counted, as in the
  published GFLOP figures);
- BatchNorm: 2 per output element (a per-channel scale and shift: inference form);
- ReLU: 1 per element; Add: (branches - 1) per element;
- MaxPool2d: kh*kw - 1 comparisons per output element; AvgPool2d: kh*kw per
  output element; GlobalAvgPool2d: 1 per input element;
- Identity, Flatten, Dropout (identity in eval), Concat and option-A shortcuts: 0.

A module can report its own count with a ``flops(in_shape, out_shape)`` method
(shapes with the batch axis; return the count for the whole batch).

The activation-memory estimate sums the output arrays of all rows except views
(Identity, Flatten, Dropout) and fused ReLUs at ``batch_size``: roughly what a
training forward keeps for backward.
"""
import sys

import numpy as np

from ..nn.containers import Add, Concat, Sequential
from ..nn.layers import Identity

_NO_MEMORY = ("Identity", "Flatten", "Dropout")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def layer_flops(module, in_shape, out_shape):
    """Forward FLOPs of one call of ``module`` (whole batch), by the rules above."""
    hook = getattr(type(module), "flops", None)
    if callable(hook):
        return int(hook(module, in_shape, out_shape))
    kind = type(module).__name__
    out_size = int(np.prod(out_shape)) if out_shape is not None else 0
    if kind == "Conv2d":
        return 2 * out_size * int(np.prod(module.weight.data.shape[:-1]))
    if kind == "Linear":
        return 2 * out_size * int(module.weight.data.shape[0])
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        return 2 * out_size
    if kind == "ReLU":
        return out_size
    if isinstance(module, Add):
        return (len(module.branches) - 1) * out_size
    if kind in ("MaxPool2d", "AvgPool2d"):
        kh, kw = _pair(getattr(module, "kernel_size", 1))
        return out_size * (kh * kw - (kind == "MaxPool2d"))
    if kind == "GlobalAvgPool2d":
        return int(np.prod(in_shape))
    return 0


def _fmt_shape(shape):
    return "(" + ", ".join(["N", *map(str, shape)]) + ")" if shape is not None else "?"


def _mb(nbytes):
    return f"{nbytes / 2 ** 20:,.2f} MB"


def summary(model, input_shape, *, batch_size=1, dtype=None, file=None, verbose=True):
    """Print a per-layer table of ``model`` for inputs of ``input_shape`` (one
    sample, NHWC without the batch axis, e.g. ``(32, 32, 3)``) and return it as data.

    Returns a dict: ``rows`` (one dict per row: name, type, output_shape (without
    the batch axis), params, flops (per sample), fused), ``input_shape``,
    ``output_shape``, ``total_params``, ``trainable_params``, ``buffer_elements``
    (non-trainable state such as BN running statistics), ``flops`` (per sample),
    ``activation_bytes`` (at ``batch_size``), ``param_bytes``, ``input_bytes``.
    ``verbose=False`` skips the printing.  The model's train/eval modes are
    restored afterwards.
    """
    input_shape = tuple(int(s) for s in input_shape)
    dtype = np.dtype(dtype or model.dtype or np.float32)
    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name or type(m).__name__)
    modules = list({id(m): m for m in model.modules()}.values())
    modes = [(m, m.training) for m in modules]
    calls = []      # (module, in_shape, out_shape) in the order the calls finish

    def wrap(m, forward):
        def recorded(x):
            out = forward(x)
            calls.append((m, getattr(x, "shape", None), getattr(out, "shape", None)))
            return out
        return recorded

    saved = [(m, m.__dict__.get("forward")) for m in modules]
    model.eval()
    try:
        for m in modules:
            object.__setattr__(m, "forward", wrap(m, m.forward))
        out = model.forward(np.zeros((batch_size,) + input_shape, dtype=dtype))
    finally:
        for m, own in saved:
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                object.__setattr__(m, "forward", own)
        for m, mode in modes:
            object.__setattr__(m, "training", mode)

    # Layers that a Sequential fused into their predecessor (skipped ReLUs).
    called = {id(m) for m, _, _ in calls}
    fused_after = {}
    for seq in modules:
        if isinstance(seq, Sequential):
            layers = list(seq)
            for prev, layer in zip(layers, layers[1:]):
                if id(layer) not in called and id(prev) in called and not layer._modules:
                    fused_after.setdefault(id(prev), []).append(layer)

    rows, seen_params = [], set()

    def add_row(m, in_shape, out_shape, fused=False):
        own = [p for p in m._parameters.values() if p is not None and id(p) not in seen_params]
        seen_params.update(id(p) for p in own)
        rows.append({
            "name": names.get(id(m), type(m).__name__), "type": type(m).__name__,
            "output_shape": tuple(out_shape[1:]) if out_shape is not None else None,
            "params": sum(p.size for p in own),
            "flops": layer_flops(m, in_shape, out_shape) // batch_size,
            "fused": fused,
            "_bytes": 0 if (fused or type(m).__name__ in _NO_MEMORY or out_shape is None)
            else int(np.prod(out_shape)) * dtype.itemsize,
        })

    for m, in_shape, out_shape in calls:
        if m is model and m._modules:
            continue
        if isinstance(m, Identity):
            pass    # no compute, no memory, same shape: only noise in the table
        elif not m._modules or m._parameters or isinstance(m, (Add, Concat)):
            add_row(m, in_shape, out_shape)
        for follower in fused_after.get(id(m), ()):
            add_row(follower, out_shape, out_shape, fused=True)

    params = list(model.parameters())
    result = {
        "rows": rows,
        "input_shape": input_shape,
        "output_shape": tuple(out.shape[1:]),
        "total_params": sum(p.size for p in params),
        "trainable_params": sum(p.size for p in params if getattr(p, "requires_grad", True)),
        "buffer_elements": sum(b.size for b in model.buffers()),
        "flops": sum(r["flops"] for r in rows),
        "activation_bytes": sum(r.pop("_bytes") for r in rows),
        "param_bytes": sum(p.data.nbytes for p in params),
        "input_bytes": batch_size * int(np.prod(input_shape)) * dtype.itemsize,
        "batch_size": batch_size,
        "dtype": str(dtype),
    }
    if verbose:
        print(format_summary(result), file=file or sys.stdout)
    return result


def format_summary(s):
    """The table that ``summary`` prints, from its returned dict."""
    header = ("Layer (type)", "Output shape", "Param #", "FLOPs")
    body = [(f"{r['name']} ({r['type']}{', fused' if r['fused'] else ''})",
             _fmt_shape(r["output_shape"]), f"{r['params']:,}", f"{r['flops']:,}")
            for r in s["rows"]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
    line = "  ".join(["{:<%d}" % widths[0], "{:<%d}" % widths[1], "{:>%d}" % widths[2],
                      "{:>%d}" % widths[3]])
    rule = "=" * (sum(widths) + 6)
    total_mb = s["input_bytes"] + s["activation_bytes"] + s["param_bytes"]
    out = [rule, line.format(*header), rule, *(line.format(*row) for row in body), rule,
           f"Input shape: {_fmt_shape(s['input_shape'])}   output shape: "
           f"{_fmt_shape(s['output_shape'])}   dtype: {s['dtype']}",
           f"Total params: {s['total_params']:,}",
           f"Trainable params: {s['trainable_params']:,}",
           f"Non-trainable buffer elements: {s['buffer_elements']:,}",
           f"Forward FLOPs per sample: {s['flops']:,} ({s['flops'] / 1e9:.3f} GFLOPs)",
           rule,
           f"Input size (batch {s['batch_size']}): {_mb(s['input_bytes'])}",
           f"Activations kept by a training forward (batch {s['batch_size']}): "
           f"{_mb(s['activation_bytes'])}",
           f"Params size: {_mb(s['param_bytes'])}",
           f"Estimated total (without gradients and optimizer state): {_mb(total_mb)}",
           rule]
    return "\n".join(out)
