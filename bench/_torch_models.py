"""PyTorch twins of cnet models, for the benchmarks.

A twin is derived from the cnet model itself, so the two networks cannot drift
apart: ``spec_from_cnet(model)`` walks the cnet module tree into a plain,
JSON-able description (layer types and hyper-parameters, nothing else), and
``build_torch(spec)`` builds the same tree from torch.nn layers.  The spec
crosses a process boundary as JSON, so a torch benchmark process never imports
cnet (cnet sets its OpenMP wait, ``GOMP_SPINCOUNT``, at import, which would
also change torch's own OpenMP runtime).

The twin is the same computation in torch's layouts (NCHW, OIHW), written the
way torchvision writes it: in-place ReLUs, residual ``out += shortcut``.  Two
layers need care to stay numerically identical to cnet:

- ``Flatten`` of a 4-D tensor flattens in cnet's NHWC order (a free view for a
  channels_last tensor, one small copy for NCHW), so copied Linear weights match;
- ``ShortcutA`` (option-A residual shortcut) subsamples by the stride and zero-pads
  the channels, half before and half after, into a tensor of the input's
  memory format.

``copy_weights(cnet_model, torch_model)`` copies parameters and BN running
statistics across (HWIO -> OIHW, (in, out) -> (out, in)); tests/test_bench.py
uses it to show that a twin computes what the cnet model computes.
"""


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def spec_from_cnet(module):
    """A JSON-able description of a cnet module tree (types and hyper-parameters)."""
    from cnet import nn
    from cnet.nn.containers import Add, Concat, Sequential

    kind = type(module).__name__
    if isinstance(module, Sequential):
        return {"type": "Sequential",
                "children": [[name, spec_from_cnet(m)] for name, m in module._modules.items()]}
    if isinstance(module, (Add, Concat)):
        return {"type": "Add" if isinstance(module, Add) else "Concat",
                "branches": [spec_from_cnet(b) for b in module.branches]}
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in": module.in_channels, "out": module.out_channels,
                "kernel": _pair(module.kernel_size), "stride": _pair(module.stride),
                "padding": _pair(module.padding), "dilation": _pair(module.dilation),
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return {"type": kind, "features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine}
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        spec = {"type": kind, "kernel": _pair(module.kernel_size), "stride": _pair(module.stride),
                "padding": _pair(module.padding), "ceil_mode": module.ceil_mode}
        if kind == "MaxPool2d":
            spec["dilation"] = _pair(module.dilation)
        else:
            spec["count_include_pad"] = module.count_include_pad
            spec["divisor_override"] = module.divisor_override
        return spec
    if isinstance(module, nn.Dropout):
        return {"type": "Dropout", "p": float(module.p)}
    if kind == "ShortcutA":
        return {"type": "ShortcutA", "in": module.in_channels, "out": module.out_channels,
                "stride": module.stride, "pad_before": module.pad_before}
    if kind in ("ReLU", "Identity", "Flatten", "GlobalAvgPool2d"):
        return {"type": kind}
    raise ValueError(f"spec_from_cnet: no torch twin for {kind} ({module!r:.200})")


def build_torch(spec):
    """The torch.nn module for a spec from ``spec_from_cnet`` (torch imported here)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Add(nn.Module):
        """Sum of the branches, as torchvision's residual join (in place when safe)."""

        def __init__(self, branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            out = self.branches[0](x)
            for b in self.branches[1:]:
                if out is x:
                    out = out + b(x)
                else:
                    out += b(x)
            return out

    class Concat(nn.Module):
        def __init__(self, branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([b(x) for b in self.branches], 1)

    class FlattenNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)

    class GlobalAvgPool2d(nn.Module):
        def forward(self, x):
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    class ShortcutA(nn.Module):
        def __init__(self, cin, cout, stride, lo):
            super().__init__()
            self.cin, self.cout, self.stride, self.lo = cin, cout, stride, lo

        def forward(self, x):
            s = self.stride
            sub = x[:, :, ::s, ::s]
            fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous() else torch.contiguous_format)
            out = x.new_zeros((sub.shape[0], self.cout, sub.shape[2], sub.shape[3]))
            out = out.contiguous(memory_format=fmt)
            out[:, self.lo:self.lo + self.cin] = sub
            return out

    t = spec["type"]
    if t == "Sequential":
        from collections import OrderedDict
        return nn.Sequential(OrderedDict((name, build_torch(s)) for name, s in spec["children"]))
    if t == "Add":
        return Add([build_torch(s) for s in spec["branches"]])
    if t == "Concat":
        return Concat([build_torch(s) for s in spec["branches"]])
    if t == "Conv2d":
        return nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                         tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"],
                         spec["bias"])
    if t == "Linear":
        return nn.Linear(spec["in"], spec["out"], spec["bias"])
    if t in ("BatchNorm2d", "BatchNorm1d"):
        return getattr(nn, t)(spec["features"], spec["eps"], spec["momentum"], spec["affine"])
    if t == "MaxPool2d":
        return nn.MaxPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            tuple(spec["dilation"]), ceil_mode=spec["ceil_mode"])
    if t == "AvgPool2d":
        return nn.AvgPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            spec["ceil_mode"], spec["count_include_pad"],
                            spec["divisor_override"])
    if t == "Dropout":
        return nn.Dropout(spec["p"])
    if t == "ReLU":
        return nn.ReLU(inplace=True)
    if t == "Identity":
        return nn.Identity()
    if t == "Flatten":
        return FlattenNHWC()
    if t == "GlobalAvgPool2d":
        return GlobalAvgPool2d()
    if t == "ShortcutA":
        return ShortcutA(spec["in"], spec["out"], spec["stride"], spec["pad_before"])
    raise ValueError(f"build_torch: unknown layer type {t!r}")


def copy_weights(cnet_model, torch_model):
    """Copy cnet parameters and BN running statistics into the torch twin."""
    import numpy as np
    import torch
    from cnet import nn

    cm = [m for m in cnet_model.modules()]
    tm = [m for m in torch_model.modules()]
    cl = [m for m in cm if not m._modules and (m._parameters or m._buffers)]
    tl = [m for m in tm if not list(m.children()) and (list(m.parameters(recurse=False))
                                                        or list(m.buffers(recurse=False)))]
    if len(cl) != len(tl):
        raise ValueError(f"copy_weights: {len(cl)} cnet layers with state, {len(tl)} torch ones")
    with torch.no_grad():
        for c, t in zip(cl, tl):
            for name in ("weight", "bias"):
                p = getattr(c, name, None)
                if p is None:
                    continue
                a = p.data
                if isinstance(c, nn.Conv2d) and name == "weight":
                    a = a.transpose(3, 2, 0, 1)
                elif isinstance(c, nn.Linear) and name == "weight":
                    a = a.T
                getattr(t, name).copy_(torch.from_numpy(np.ascontiguousarray(a)))
            for name in ("running_mean", "running_var"):
                b = getattr(c, name, None)
                if b is not None:
                    getattr(t, name).copy_(torch.from_numpy(np.asarray(b)))
