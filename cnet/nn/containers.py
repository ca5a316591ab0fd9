"""Containers: Sequential, Add (residual sums) and Concat (Inception merges)."""
import numpy as np

from cnet_ext import _elementwise

from .._threads import num_threads
from .module import Module, add_into, runs_own, require_cache, residual_fits


class Sequential(Module):
    """Runs its children in order; backward runs them in reverse.

    Fusion: when a child is directly followed by a ``ReLU`` and the child's
    ``fuse_relu()`` returns True (BatchNorm, Add, ...), the child applies the
    ReLU inside its own kernel and the ReLU is skipped: one pass over the
    activations instead of two.  In eval mode a direct Conv2d followed by a
    BatchNorm2d takes it into its weights (folds_batchnorm_weights: equal within
    float32 round-off); other convolutions apply it to each output chunk while in
    cache (folds_batchnorm), with an identical result.  In training a Conv2d
    hands the BatchNorm2d after it the batch's moments, taken from each output
    chunk while in cache (collects_batch_moments).  Backward hands a
    MaxPool2d's gradient to the layer before it (Conv2d.backward_through_pool),
    which may gather it in its own pass, and a training BatchNorm2d's to the
    convolution before it, which has the batch norm write its own output
    gradient a chunk at a time, in cache (Conv2d.backward_through_batchnorm).
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
        if not self._layers and not self.input_grad:
            layer.requires_input_grad_(False)
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

    def requires_input_grad_(self, requires_grad=True):
        """Only the first child sees the container's input (see Module)."""
        super().requires_input_grad_(requires_grad)
        if self._layers:
            self._layers[0].requires_input_grad_(requires_grad)
        return self

    def forward(self, x):
        return self._forward_residual(x, None)[0]

    def _forward_residual(self, x, residual):
        """(relu(self(x) + residual), True) when the last step is a batch norm that
        joins the residual in its output pass (_BatchNorm.joins_residual), or a
        convolution and batch norm folded (eval mode: into the weights, or per
        chunk) that join it in cache; else (self(x), False) and the caller joins it."""
        plan = self._plan or self._build_plan()
        i = 0
        while i < len(plan):
            layer = plan[i]
            nxt = plan[i + 1] if i + 1 < len(plan) else None
            # Eval mode: a direct convolution takes the batch norm after it into its
            # weights, joining the residual in the kernel's epilogue where it can
            # (else the batch norm's own pass joins it; Conv2d.forward_with_folded_batchnorm).
            if (nxt is not None and not self.training
                    and hasattr(layer, "folds_batchnorm_weights")
                    and layer.folds_batchnorm_weights(nxt, x)
                    and (residual is None or i + 2 < len(plan)
                         or (not nxt._relu
                             and residual_fits(residual, layer.output_shape(x.shape), x.dtype)))):
                join = residual is not None and i + 2 == len(plan)
                x = layer.forward_with_folded_batchnorm(x, nxt, residual if join else None)
                if join:
                    return x, True
                i += 2
            # Or it applies the batch norm to each chunk of its output while in cache
            # (Conv2d.forward_with_batchnorm: GEMM layers, and direct ones whose
            # weights are too big to scale on every forward).
            elif (nxt is not None and not self.training and hasattr(layer, "folds_batchnorm")
                    and layer.folds_batchnorm(nxt, x)):
                join = (i + 2 == len(plan) and not nxt._relu and not layer._relu
                        and residual_fits(residual, layer.output_shape(x.shape), x.dtype))
                x = layer.forward_with_batchnorm(x, nxt, residual if join else None)
                if join:
                    return x, True
                i += 2
            # Training: a convolution takes the batch norm's statistics from each chunk
            # of its output while in cache, so the batch norm reads it only once.
            elif (nxt is not None and self.training
                    and hasattr(layer, "collects_batch_moments")
                    and layer.collects_batch_moments(nxt, x)):
                y, moments = layer.forward_with_batch_moments(x)
                if residual is not None and i + 2 == len(plan) and nxt.joins_residual(y, residual):
                    return nxt._forward(y, residual, moments), True
                x = nxt._forward(y, None, moments)
                i += 2
            elif (residual is not None and nxt is None and hasattr(layer, "joins_residual")
                    and layer.joins_residual(x, residual)):
                return layer._forward(x, residual), True
            else:
                x = layer.forward(x)
                i += 1
        return x, False

    def backward(self, grad):
        return self._backward_steps(grad, None)

    def _backward_into(self, grad, into):
        """The first layer adds its input gradient into ``into`` itself (see
        Module._backward_into)."""
        if not runs_own(self, Sequential, "backward"):   # a wrapper or an override runs
            return super()._backward_into(grad, into)
        return self._backward_steps(grad, into)

    def _backward_steps(self, grad, into):
        plan = self._plan or self._build_plan()
        i = len(plan) - 1
        added = into is None
        while i >= 0:
            layer = plan[i]
            before = plan[i - 1] if i > 0 else None
            steps = 1
            # A max pool's gradient handed to the layer before it, which may gather
            # it in its own pass (Conv2d.backward_through_pool).
            if (before is not None and type(layer).__name__ == "MaxPool2d"
                    and hasattr(before, "backward_through_pool")):
                grad, steps = before.backward_through_pool(layer, grad), 2
            # A training batch norm's input gradient made chunk by chunk inside the
            # backward of the convolution before it (Conv2d.backward_through_batchnorm).
            elif (before is not None and hasattr(before, "takes_batchnorm_grad")
                    and before.takes_batchnorm_grad(layer, grad, into if i == 1 and not added
                                                    else None)):
                join = i == 1 and not added
                grad = before.backward_through_batchnorm(layer, grad, into if join else None)
                added, steps = added or join, 2
            elif i == 0 and not added:
                grad, added = layer._backward_into(grad, into), True
            else:
                grad = layer.backward(grad)
            # The step's layers drop their forward caches (as torch frees the graph):
            # the later layers' activations are gone before the earlier, larger
            # gradients are allocated (ResNeXt-29's training peak, bench/RESULTS.md).
            for done in plan[i - steps + 1:i + 1]:
                done._release_activations()
            i -= steps
        if not self.input_grad:
            return None
        return grad if added else add_into(into, grad)


class _Branches(Module):
    """Shared part of Add and Concat: every branch sees the same input."""

    def __init__(self, *branches):
        super().__init__()
        if not branches:
            raise ValueError(f"{type(self).__name__}: needs at least one branch")
        for i, b in enumerate(branches):
            self.add_module(str(i), b)
        self.branches = list(branches)

    def requires_input_grad_(self, requires_grad=True):
        """Every branch sees the container's input (see Module)."""
        super().requires_input_grad_(requires_grad)
        for b in self.branches:
            b.requires_input_grad_(requires_grad)
        return self

    def _branch_outputs(self, x, done=None):
        """The branches' outputs on x, checked; ``done`` maps a branch's index to its
        output where the caller has computed it already."""
        done = done or {}
        outs = [done[i] if i in done else b.forward(x) for i, b in enumerate(self.branches)]
        dtype = outs[0].dtype
        for b, o in zip(self.branches, outs):
            if not isinstance(o, np.ndarray) or o.dtype != dtype or o.ndim < 1:
                raise ValueError(f"{type(self).__name__}: branch {type(b).__name__} returned "
                                 f"{getattr(o, 'dtype', type(o).__name__)} "
                                 f"{getattr(o, 'shape', '')}, the first branch {dtype}")
        # the kernels need C-contiguous operands (a no-op for every cnet layer)
        return [np.ascontiguousarray(o) for o in outs]

    def _backward_branches(self, grads, out=None):
        """Sum of each branch's input gradient (the input fans out to all).

        The sum goes into ``out`` when the caller owns a scratch array of the
        right shape (Add's masked gradient), else into a fresh array: a branch
        (Identity) may hand back the very array it was given.
        """
        grads_in = [branch.backward(g) for branch, g in zip(self.branches, grads)]
        if not self.input_grad:
            return None
        return self._sum_grads(grads_in, out)

    def _sum_grads(self, grads_in, out=None):
        """The sum of the branches' input gradients, into ``out`` where it fits."""
        if len(grads_in) == 1:
            return grads_in[0]
        grads_in = [np.ascontiguousarray(g) for g in grads_in]
        if out is None or out.shape != grads_in[0].shape or out.dtype != grads_in[0].dtype:
            out = np.empty_like(grads_in[0])
        nt = num_threads()
        _elementwise.add(grads_in[0], grads_in[1], out, False, nt)
        for gi in grads_in[2:]:
            _elementwise.add(out, gi, out, False, nt)
        return out


def _owned_sum_target(grad, other):
    """Whether a branch's input gradient ``grad`` may take the other branches' in
    place: an array that owns its memory (a fresh result, as cnet's layers return;
    not a view into some module's buffer), writeable, C-contiguous and apart from
    ``other``, the gradient the other branches still read."""
    return (isinstance(grad, np.ndarray) and grad.base is None and grad.flags.writeable
            and grad.flags.c_contiguous and grad.dtype == other.dtype
            and not np.may_share_memory(grad, other))


class Add(_Branches):
    """Sum of the branches' outputs: ``Add(body, shortcut)`` is a residual join.

    ``Sequential(Add(body, shortcut), ReLU())`` is the ResNet block: Sequential
    calls ``fuse_relu()`` and the add and the ReLU run as one pass (backward
    masks the gradient by the cached output, into a scratch array that then
    receives the branches' summed input gradients; with an identity shortcut the
    body adds its input gradient into it itself, in the GEMM's store where it
    starts with a 1x1 convolution: see Module._backward_into).
    """
    _activations = ("_y",)

    def __init__(self, *branches):
        super().__init__(*branches)
        self._relu = False
        self._y = None

    def fuse_relu(self):
        """Apply the following ReLU inside the add (called by Sequential's plan)."""
        self._relu = True
        return True

    def _drop_cache(self):
        self._y = None

    def extra_repr(self):
        return "fused_relu=True" if self._relu else ""

    def forward(self, x):
        if (self._relu and len(self.branches) == 2 and isinstance(self.branches[0], Sequential)
                and runs_own(self.branches[0], Sequential)):
            # A body ending in a batch norm joins the shortcut in its output pass
            # (Sequential._forward_residual): no separate add pass over three maps.
            shortcut = self.branches[1].forward(x)
            out, joined = self.branches[0]._forward_residual(x, shortcut)
            if joined:
                if self.training:
                    self._y = out
                return out
            outs = self._branch_outputs(x, {0: out, 1: shortcut})
        else:
            outs = self._branch_outputs(x)
        shape = outs[0].shape
        for b, o in zip(self.branches[1:], outs[1:]):
            if o.shape != shape:
                raise ValueError(f"Add: branch outputs differ in shape: {shape} from "
                                 f"{type(self.branches[0]).__name__}, {o.shape} from "
                                 f"{type(b).__name__}")
        nt = num_threads()
        out = np.empty_like(outs[0])
        if len(outs) == 1:
            if self._relu:
                _elementwise.relu_forward(outs[0], out, nt)
            else:
                np.copyto(out, outs[0])
        else:
            _elementwise.add(outs[0], outs[1], out, self._relu and len(outs) == 2, nt)
            for k, o in enumerate(outs[2:], start=3):
                _elementwise.add(out, o, out, self._relu and k == len(outs), nt)
        if self._relu and self.training:
            self._y = out
        return out

    def backward(self, grad):
        if not self._relu:
            return self._backward_branches([grad] * len(self.branches))
        y = require_cache(self, self._y)
        if not isinstance(grad, np.ndarray) or grad.shape != y.shape or grad.dtype != y.dtype:
            raise ValueError(f"Add: gradient {getattr(grad, 'shape', type(grad).__name__)} "
                             f"{getattr(grad, 'dtype', '')} does not match the output "
                             f"{y.shape} {y.dtype}")
        masked = np.empty_like(y)
        _elementwise.relu_backward(np.ascontiguousarray(grad), y, masked, num_threads())
        if self.input_grad and len(self.branches) == 2:
            shortcut_grad = self.branches[1].backward(masked)
            if shortcut_grad is masked:
                # An identity shortcut's input gradient is `masked` itself: the body
                # adds its own into it (Module._backward_into; a bottleneck's first
                # 1x1 convolution in its GEMM's store): no add pass over the input.
                return self.branches[0]._backward_into(masked, masked)
            if _owned_sum_target(shortcut_grad, masked):
                # A projection shortcut's fresh input gradient takes the body's the
                # same way: no add pass over the input (3 in a ResNeXt-29 step).
                return self.branches[0]._backward_into(masked, shortcut_grad)
            return self._sum_grads([self.branches[0].backward(masked), shortcut_grad], masked)
        # `masked` is ours: once every branch is done with it, it takes the sum
        return self._backward_branches([masked] * len(self.branches), out=masked)


class Concat(_Branches):
    """Concatenates the branches' outputs along channels (the last, NHWC axis)."""

    def __init__(self, *branches):
        super().__init__(*branches)
        self._widths = None

    def _drop_cache(self):
        self._widths = None

    def forward(self, x):
        outs = self._branch_outputs(x)
        lead = outs[0].shape[:-1]
        for b, o in zip(self.branches, outs):
            if o.shape[:-1] != lead:
                raise ValueError(f"Concat: branch outputs must agree on all but the channel "
                                 f"axis: {outs[0].shape} vs {o.shape} from {type(b).__name__}")
        widths = [o.shape[-1] for o in outs]
        out = np.empty(lead + (sum(widths),), dtype=outs[0].dtype)
        _elementwise.concat_last(outs, out, num_threads())
        if self.training:
            self._widths = widths
        return out

    def backward(self, grad):
        widths = require_cache(self, self._widths)
        if not isinstance(grad, np.ndarray) or grad.ndim < 1 or grad.shape[-1] != sum(widths):
            raise ValueError(f"Concat: gradient of shape {getattr(grad, 'shape', None)} does "
                             f"not have the {sum(widths)} output channels")
        grad = np.ascontiguousarray(grad)
        parts = [np.empty(grad.shape[:-1] + (w,), dtype=grad.dtype) for w in widths]
        _elementwise.split_last(grad, parts, num_threads())
        return self._backward_branches(parts)
