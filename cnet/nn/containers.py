"""Containers: Sequential, Add (residual sums) and Concat (Inception merges)."""
import numpy as np

from .module import Module, require_cache


class Sequential(Module):
    """Runs its children in order; backward runs them in reverse.

    Fusion: when a child is directly followed by a ``ReLU`` and the child's
    ``fuse_relu()`` returns True (BatchNorm, Add, ...), the child applies the
    ReLU inside its own kernel and the ReLU is skipped: one pass over the
    activations instead of two.  The result is identical.
    """

    def __init__(self, *layers):
        super().__init__()
        self._layers = []
        self._plan = None
        if len(layers) == 1 and isinstance(layers[0], dict):
            # Sequential(OrderedDict(conv1=..., bn1=...)): named children, as in PyTorch.
            for name, layer in layers[0].items():
                self.append(layer, name=name)
            return
        for layer in layers:
            self.append(layer)

    def append(self, layer, name=None):
        self.add_module(str(len(self._layers)) if name is None else name, layer)
        self._layers.append(layer)
        self._plan = None
        return self

    def __len__(self):
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return Sequential(*self._layers[idx])
        return self._layers[idx]

    def _build_plan(self):
        plan, i, layers = [], 0, self._layers
        while i < len(layers):
            layer = layers[i]
            plan.append(layer)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if (nxt is not None and type(nxt).__name__ == "ReLU"
                    and getattr(layer, "fuse_relu", None) is not None and layer.fuse_relu()):
                i += 2
            else:
                i += 1
        self._plan = plan
        return plan

    def forward(self, x):
        for layer in self._plan or self._build_plan():
            x = layer.forward(x)
        return x

    def backward(self, grad):
        for layer in reversed(self._plan or self._build_plan()):
            grad = layer.backward(grad)
        return grad


class _Branches(Module):
    """Shared part of Add and Concat: every branch sees the same input."""

    def __init__(self, *branches):
        super().__init__()
        if not branches:
            raise ValueError(f"{type(self).__name__}: needs at least one branch")
        for i, b in enumerate(branches):
            self.add_module(str(i), b)
        self.branches = list(branches)

    def _backward_branches(self, grads):
        """Sum of each branch's input gradient (the input fans out to all)."""
        grads_in = [branch.backward(g) for branch, g in zip(self.branches, grads)]
        if len(grads_in) == 1:
            return grads_in[0]
        # A fresh array: a branch (Identity) may hand back the array it was given.
        total = np.add(grads_in[0], grads_in[1])
        for gi in grads_in[2:]:
            np.add(total, gi, out=total)
        return total


class Add(_Branches):
    """Sum of the branches' outputs: ``Add(body, shortcut)`` is a residual join."""

    def forward(self, x):
        outs = [b.forward(x) for b in self.branches]
        shape = outs[0].shape
        for b, o in zip(self.branches[1:], outs[1:]):
            if o.shape != shape:
                raise ValueError(f"Add: branch outputs differ in shape: {shape} from "
                                 f"{type(self.branches[0]).__name__}, {o.shape} from "
                                 f"{type(b).__name__}")
        out = np.add(outs[0], outs[1]) if len(outs) > 1 else outs[0].copy()
        for o in outs[2:]:
            np.add(out, o, out=out)
        return out

    def backward(self, grad):
        return self._backward_branches([grad] * len(self.branches))


class Concat(_Branches):
    """Concatenates the branches' outputs along channels (the last, NHWC axis)."""

    def __init__(self, *branches):
        super().__init__(*branches)
        self._splits = None

    def _drop_cache(self):
        self._splits = None

    def forward(self, x):
        outs = [b.forward(x) for b in self.branches]
        lead = outs[0].shape[:-1]
        for b, o in zip(self.branches, outs):
            if o.shape[:-1] != lead:
                raise ValueError(f"Concat: branch outputs must agree on all but the channel "
                                 f"axis: {outs[0].shape} vs {o.shape} from {type(b).__name__}")
        if self.training:
            self._splits = np.cumsum([o.shape[-1] for o in outs])[:-1]
        return np.concatenate(outs, axis=-1)

    def backward(self, grad):
        splits = require_cache(self, self._splits)
        parts = [np.ascontiguousarray(g) for g in np.split(grad, splits, axis=-1)]
        return self._backward_branches(parts)
