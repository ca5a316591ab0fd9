"""ReLU and Dropout (kernels in cnet_ext/_elementwise.pyx)."""
import numpy as np

from cnet_ext import _elementwise

from .. import _random
from .._threads import num_threads
from .module import Module, check_input, require_cache

_RANKS = (2, 3, 4)


class ReLU(Module):
    """y = max(x, 0).  With ``inplace=True`` the result is written into x.

    Training mode keeps a reference to y (no copy) for the backward mask
    ``grad * (y > 0)``.  A ReLU directly after a layer whose ``fuse_relu()``
    accepts it (BatchNorm2d, Add) is folded into that layer by Sequential.
    """
    _activations = ("_y",)

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)
        self._y = None

    def _drop_cache(self):
        self._y = None

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""

    def forward(self, x):
        check_input(self, x, _RANKS)
        y = x if self.inplace else np.empty_like(x)
        _elementwise.relu_forward(x, y, num_threads())
        if self.training:
            self._y = y
        return y

    def backward(self, grad):
        y = require_cache(self, self._y)
        return relu_backward(self, grad, y)


def relu_backward(layer, grad, y):
    """grad masked by y > 0 into a new array (grad itself is never modified)."""
    check_input(layer, grad, y.ndim, dtype=y.dtype, what="gradient")
    if grad.shape != y.shape:
        raise ValueError(f"{layer._describe()}: gradient of shape {grad.shape} does not match "
                         f"the output shape {y.shape}")
    gx = np.empty_like(grad)
    _elementwise.relu_backward(grad, y, gx, num_threads())
    return gx


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and
    scale the rest by ``1 / (1 - p)``; identity in eval mode (and for p = 0, where
    the input itself is returned, as torch does).

    The mask comes from a counter-based generator keyed by a seed drawn from
    cnet's global generator per call, so it is reproducible under
    ``cnet.manual_seed`` and independent of the thread count.  Backward
    regenerates it from that seed: nothing but one integer is stored.
    """

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: probability has to be between 0 and 1, got {p}")
        self.p = p
        self.inplace = bool(inplace)
        self._seed = None
        self._shape = None

    def _drop_cache(self):
        self._seed = None
        self._shape = None

    def extra_repr(self):
        return f"p={self.p}" + (", inplace=True" if self.inplace else "")

    def forward(self, x):
        check_input(self, x, _RANKS)
        if not self.training:
            return x
        self._shape = x.shape
        if self.p == 0.0:
            self._seed = 0
            return x
        self._seed = _random.next_seed()
        y = x if self.inplace else np.empty_like(x)
        _elementwise.dropout(x, y, self._seed, self.p, num_threads())
        return y

    def backward(self, grad):
        seed = require_cache(self, self._seed)
        check_input(self, grad, _RANKS, what="gradient")
        if grad.shape != self._shape:
            raise ValueError(f"{self._describe()}: gradient of shape {grad.shape} does not "
                             f"match the output shape {self._shape}")
        if self.p == 0.0:
            return grad
        gx = np.empty_like(grad)
        _elementwise.dropout(grad, gx, seed, self.p, num_threads())
        return gx
