"""Module and Parameter: the base of every layer.

Contract (see DESIGN.md):
- ``forward(x)`` computes the output; in training mode it caches what
  ``backward`` needs, in eval mode it caches nothing.
- ``backward(grad_out)`` returns dL/dx and *accumulates* into each
  ``Parameter.grad``.  After ``requires_input_grad_(False)`` a layer may skip
  dL/dx and return None (the network's input is data: nothing needs it).
- Layers read ``self.weight.data`` / ``.grad`` at call time and never keep
  their own references to those arrays: optimizers and
  ``flatten_parameters`` rebind them to views of one flat buffer.
"""
import mmap
from collections import OrderedDict

import numpy as np

from cnet_ext import _elementwise

from .._threads import num_threads


class Parameter:
    """A trainable array: ``.data`` and ``.grad`` are numpy arrays of one shape.

    ``.grad`` starts as zeros (not None) so that backward can always
    accumulate in place; ``zero_grad`` refills it.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data):
        data = np.array(data, copy=True, order="C")
        if data.dtype.kind != "f":
            data = data.astype(np.float32)
        self.data = data
        self.grad = _untouched_zeros(data.shape, data.dtype)

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    ndim = property(lambda self: self.data.ndim)

    def zero_grad(self):
        self.grad.fill(0)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


# Gradients from this size up are anonymous mappings, whose pages take no memory until
# a backward writes them.  np.zeros' calloc gives that only for fresh memory: a block
# reused from the heap (cnet's malloc thresholds keep freed blocks, and a layer's
# initialisation frees its temporaries) is cleared page by page, so a model built for
# inference held its gradients' size too (ResNet-18: 110 MB over the baseline after
# construction, for 43 MB of parameters).
_MAPPED_GRAD_BYTES = 1 << 20


def _untouched_zeros(shape, dtype):
    """A zero array whose pages are not touched (for sizes from _MAPPED_GRAD_BYTES)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= _MAPPED_GRAD_BYTES:
        try:
            return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)
        except OSError:       # out of mappings (vm.max_map_count): calloc's zeros will do
            pass
    return np.zeros(shape, dtype=dtype)


def flatten_parameters(params):
    """Move ``params`` into one flat data buffer and one flat grad buffer.

    Each Parameter's ``.data`` / ``.grad`` becomes a view into the flat
    buffers (values are preserved), so an optimizer can update every
    parameter in one fused pass and a gradient all-reduce is one message.
    Returns ``(flat_data, flat_grad)``.  If the parameters already are
    consecutive views of one flat buffer, those buffers are returned as they
    are.
    """
    params = list(params)
    if not params:
        raise ValueError("flatten_parameters: no parameters given")
    dtypes = {p.data.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"flatten_parameters: parameters have mixed dtypes {sorted(map(str, dtypes))}")
    existing = _existing_flat(params)
    if existing is not None:
        return existing
    total = sum(p.data.size for p in params)
    dtype = dtypes.pop()
    flat_data = np.empty(total, dtype=dtype)
    flat_grad = np.empty(total, dtype=dtype)
    offset = 0
    for p in params:
        n = p.data.size
        flat_data[offset:offset + n] = p.data.ravel()
        flat_grad[offset:offset + n] = p.grad.ravel()
        p.data = flat_data[offset:offset + n].reshape(p.data.shape)
        p.grad = flat_grad[offset:offset + n].reshape(p.grad.shape)
        offset += n
    return flat_data, flat_grad


def _existing_flat(params):
    """The (data, grad) flat buffers if params are consecutive views of them."""
    data_base, grad_base = params[0].data.base, params[0].grad.base
    if data_base is None or grad_base is None:
        return None
    if data_base.ndim != 1 or grad_base.ndim != 1:
        return None
    total = sum(p.data.size for p in params)
    if data_base.size != total or grad_base.size != total:
        return None
    item = data_base.itemsize
    d0 = data_base.__array_interface__["data"][0]
    g0 = grad_base.__array_interface__["data"][0]
    offset = 0
    for p in params:
        if p.data.base is not data_base or p.grad.base is not grad_base:
            return None
        if (p.data.__array_interface__["data"][0] != d0 + offset * item
                or p.grad.__array_interface__["data"][0] != g0 + offset * item):
            return None
        offset += p.data.size
    return data_base, grad_base


class Module:
    """Base class of layers and containers (PyTorch's names, NHWC layouts)."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes")
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter '{name}' "
                                "(assign a Parameter, or set .data)")
            del params[name]
        elif name in buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"buffer '{name}' must be a numpy array")
            if value is None:
                del buffers[name]
            else:
                buffers[name] = value
        elif name in modules and value is None:
            del modules[name]
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for d in (self._parameters, self._buffers, self._modules):
            d.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name, array):
        """A named array that is state but not trained (e.g. running_mean)."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"buffer '{name}' must be a numpy array")
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def register_parameter(self, name, param):
        if param is None:
            self._parameters.pop(name, None)
            object.__setattr__(self, name, None)
        else:
            setattr(self, name, param)

    def add_module(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} is {type(module).__name__}, not a Module")
        setattr(self, name, module)

    # -- computation -------------------------------------------------------
    # Whether backward must return dL/dx (PyTorch: whether the input requires grad).
    input_grad = True

    def requires_input_grad_(self, requires_grad=True):
        """Say whether ``backward`` must compute dL/dx (default: it must).

        With False, layers that can skip the input gradient (Conv2d, Linear)
        do, and their backward returns None; parameter gradients are unchanged.
        That is for a network's first layer, whose input is data: PyTorch does
        not compute that gradient either, and a first convolution's input
        gradient can cost as much as the rest of its backward.  Containers pass
        the setting on to the children that see their input.  Returns self.
        """
        object.__setattr__(self, "input_grad", bool(requires_grad))
        return self

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad_out):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def _backward_into(self, grad_out, into):
        """backward, its input gradient added to ``into`` (an array of the input's
        shape that the caller owns; it may be grad_out itself): returns into, or
        None where this module computes no input gradient.  A residual join uses it
        (Add): layers whose last pass can add dL/dx in place (Conv2d's 1x1 on
        cnet's GEMM, its direct layers chunk by chunk) save the add pass over the
        input; the rest add backward's."""
        return add_into(into, self.backward(grad_out))

    def __call__(self, x):
        return self.forward(x)

    # -- traversal ---------------------------------------------------------
    def children(self):
        return iter(self._modules.values())

    def named_children(self):
        return iter(self._modules.items())

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix=""):
        """(name, Parameter) in registration order, weight before bias; no repeats."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix=""):
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self):
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # -- modes -------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
            m._drop_cache()
        return self

    def eval(self):
        return self.train(False)

    def _drop_cache(self):
        """Hook: layers drop backward caches and workspaces (mode or dtype change)."""

    # The attributes holding what forward keeps for backward that backward consumes
    # (activations): Sequential drops them once the layer's backward has run.
    _activations = ()

    def _release_activations(self):
        for name in self._activations:
            setattr(self, name, None)

    def zero_grad(self):
        for p in self.parameters():
            p.grad.fill(0)

    def flatten_parameters(self):
        """Put all parameters in one flat buffer (see ``flatten_parameters``)."""
        return flatten_parameters(self.parameters())

    # -- dtype -------------------------------------------------------------
    @property
    def dtype(self):
        """The parameters' dtype (float32 unless converted); None without parameters."""
        for p in self.parameters():
            return p.data.dtype
        return None

    def to(self, dtype):
        """Convert parameters, gradients and floating buffers to ``dtype`` in place."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"to: expected a floating dtype, got {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = p.grad.astype(dtype)
        for m in self.modules():
            for name, b in list(m._buffers.items()):
                if b.dtype.kind == "f":
                    m.register_buffer(name, b.astype(dtype))
            m._drop_cache()
        return self

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    # -- state -------------------------------------------------------------
    def state_dict(self):
        """Name -> copy of every parameter and buffer, in registration order."""
        state = OrderedDict()
        for name, p in self.named_parameters():
            state[name] = p.data.copy()
        for name, b in self.named_buffers():
            state[name] = b.copy()
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into parameters and buffers, checking keys and shapes.

        With ``strict`` every key must match; shapes must always match.
        Returns ``(missing_keys, unexpected_keys)``.
        """
        targets = OrderedDict()
        for name, p in self.named_parameters():
            targets[name] = p.data
        for name, b in self.named_buffers():
            targets[name] = b
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict for {type(self).__name__}: "
                           f"missing keys {missing}, unexpected keys {unexpected}")
        mismatched = []
        for name, dst in targets.items():
            if name in state_dict:
                src = np.asarray(state_dict[name])
                if src.shape != dst.shape:
                    mismatched.append(f"{name}: checkpoint {src.shape}, model {dst.shape}")
        if mismatched:
            raise ValueError("load_state_dict: shape mismatch: " + "; ".join(mismatched))
        for name, dst in targets.items():
            if name in state_dict:
                dst[...] = np.asarray(state_dict[name])
        return missing, unexpected

    # -- repr --------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        extra = self.extra_repr()
        if not self._modules:
            return f"{type(self).__name__}({extra})"
        lines = [f"{type(self).__name__}(" + (extra if extra else "")]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(")")
        return "\n".join(lines)

    def _describe(self):
        """Short name for error messages: 'Conv2d(3, 16, kernel_size=3, ...)'."""
        return f"{type(self).__name__}({self.extra_repr()})"


# -- input validation shared by every layer ---------------------------------

def check_input(layer, x, ndim, channels=None, dtype=None, what="input"):
    """Validate a layer input; raise ValueError naming the layer and shapes.

    ``ndim``: required rank (4 for NHWC, 2 for (N, features)), or a tuple of
    allowed ranks.  ``channels``: required size of the last axis.  ``dtype``:
    required dtype (the layer's parameter dtype); parameterless layers pass
    None and accept float32 or float64.
    Returns ``x`` unchanged (no silent copies or conversions).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{layer._describe()}: expected a numpy array as {what}, "
                        f"got {type(x).__name__}")
    ranks = ndim if isinstance(ndim, tuple) else (ndim,)
    if x.ndim not in ranks:
        layout = {4: "(N, H, W, C)", 2: "(N, features)", 3: "(N, L, C)"}
        want = " or ".join(f"{r}-D {layout.get(r, '')}".strip() for r in ranks)
        raise ValueError(f"{layer._describe()}: expected {want} {what}, got shape {x.shape}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{layer._describe()}: expected {channels} channels in the last axis "
                         f"of {what}, got shape {x.shape}")
    if dtype is not None:
        if x.dtype != dtype:
            raise ValueError(f"{layer._describe()}: expected {np.dtype(dtype)} {what}, got "
                             f"{x.dtype} (convert once with x.astype(np.{np.dtype(dtype)}) "
                             "or the model with .to(dtype))")
    elif x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{layer._describe()}: expected float32 or float64 {what}, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{layer._describe()}: {what} of shape {x.shape} is not C-contiguous "
                         "(use np.ascontiguousarray)")
    return x


def require_cache(layer, cache):
    """Raise a clear error when backward runs without a training-mode forward."""
    if cache is None:
        raise RuntimeError(f"{layer._describe()}: backward called without a forward pass in "
                           "training mode (eval mode keeps nothing for backward, and in a "
                           "Sequential each forward serves one backward)")
    return cache


def residual_fits(residual, shape, dtype):
    """Whether ``residual`` can be joined into an output of this shape and dtype in
    the output's own pass (a residual block's shortcut): a C-contiguous array of
    exactly that shape and dtype."""
    return (isinstance(residual, np.ndarray) and residual.shape == tuple(shape)
            and residual.dtype == dtype and residual.flags.c_contiguous)


def runs_own(module, cls, method="forward"):
    """Whether ``module`` runs ``cls``'s own ``method`` (forward or backward): neither
    replaced on the instance (a profiler's wrapper must see its call) nor overridden
    by a subclass.  The paths that join two layers in one pass skip the calls, so
    they stand only for these."""
    return (method not in module.__dict__
            and getattr(type(module), method) is getattr(cls, method))


def add_into(into, grad):
    """into += grad in one parallel pass (Module._backward_into); returns into, or
    None when grad is None (no input gradient was computed)."""
    if grad is None:
        return None
    if not residual_fits(into, grad.shape, grad.dtype):
        raise ValueError(f"gradient sum: cannot add a {grad.dtype} {grad.shape} gradient into "
                         f"{getattr(into, 'dtype', type(into).__name__)} "
                         f"{getattr(into, 'shape', '')} (a C-contiguous array of its shape "
                         "and dtype)")
    _elementwise.add(into, np.ascontiguousarray(grad), into, False, num_threads())
    return into
