"""Pooling layers over NHWC activations: MaxPool2d, AvgPool2d, GlobalAvgPool2d.

Hyper-parameters and numerics follow torch.nn (output size rule, ceil_mode,
padding limits, average divisors); kernels are in cnet_ext/_pool.pyx.
"""
import numpy as np

from cnet_ext import _pool

from .._args import int_pair
from .._threads import num_threads
from .module import Module, check_input, require_cache


class _Pool2d(Module):
    """Shared geometry: validation and PyTorch's output-size rule."""

    _dilated = False

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = int_pair(name, "kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else int_pair(name, "stride", stride)
        self.padding = int_pair(name, "padding", padding)
        self.dilation = int_pair(name, "dilation", dilation)
        self.ceil_mode = bool(ceil_mode)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f"{name}: kernel_size {self.kernel_size}, stride {self.stride} "
                             f"and dilation {self.dilation} must be >= 1")
        if min(self.padding) < 0:
            raise ValueError(f"{name}: padding must be >= 0, got {self.padding}")
        # torch: "pad should be at most half of effective kernel size"
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{name}: padding {self.padding} must be at most half of "
                             f"kernel_size {self.kernel_size}")

    def output_shape(self, shape):
        """(N, OH, OW, C) for an (N, H, W, C) input; ValueError if empty."""
        n, h, w, c = shape
        out = tuple(_pool.pool_output_size(size, k, s, p, d, self.ceil_mode)
                    for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride,
                                                self.padding, self.dilation))
        if min(out) < 1:
            raise ValueError(f"{self._describe()}: input of shape {tuple(shape)} is too small: "
                             f"output size would be {out} (kernel larger than the padded input)")
        return (n, out[0], out[1], c)

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self._dilated and self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        return s


class MaxPool2d(_Pool2d):
    """Max over ``kernel_size`` windows (padding counts as -inf), as torch.nn.MaxPool2d.

    In training mode forward records each output's argmax (int32, 1/kernel_area of
    the input's size for non-overlapping windows); backward routes the gradient
    there.  NaNs propagate; ties go to the first position in the window.
    """
    _activations = ("_idx",)
    _dilated = True

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__(kernel_size, stride, padding, dilation, ceil_mode)
        self._idx = None
        self._in_shape = None

    def _drop_cache(self):
        self._idx = None
        self._in_shape = None

    def forward(self, x):
        check_input(self, x, 4)
        shape = self.output_shape(x.shape)
        y = np.empty(shape, dtype=x.dtype)
        idx = None
        if self.training:
            # a workspace: reused while the shape holds (only our backward reads it)
            idx = self._idx
            if idx is None or idx.shape != shape:
                idx = np.empty(shape, dtype=np.int32)
        _pool.max_pool2d_forward(x, y, idx, self.kernel_size, self.stride, self.padding,
                                 self.dilation, num_threads())
        if self.training:
            self._idx, self._in_shape = idx, x.shape
        return y

    def backward(self, grad):
        idx = require_cache(self, self._idx)
        check_input(self, grad, 4, what="gradient")
        if grad.shape != idx.shape:
            raise ValueError(f"{self._describe()}: gradient of shape {grad.shape} does not "
                             f"match the output shape {idx.shape}")
        gx = np.empty(self._in_shape, dtype=grad.dtype)
        _pool.max_pool2d_backward(grad, idx, gx, self.kernel_size, self.stride, self.padding,
                                  self.dilation, num_threads())
        return gx


class AvgPool2d(_Pool2d):
    """Mean over ``kernel_size`` windows, as torch.nn.AvgPool2d.

    Divisor (PyTorch's rule): ``divisor_override`` if given; else with
    ``count_include_pad`` the window clipped to the padded input (so ceil_mode's
    overhang past the padding does not count); else the in-image elements only.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(kernel_size, stride, padding, 1, ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        if divisor_override is not None and int(divisor_override) < 1:
            raise ValueError(f"AvgPool2d: divisor_override must be >= 1, got {divisor_override}")
        self.divisor_override = None if divisor_override is None else int(divisor_override)
        self._in_shape = None

    def _drop_cache(self):
        self._in_shape = None

    def extra_repr(self):
        s = super().extra_repr()
        if not self.count_include_pad:
            s += ", count_include_pad=False"
        if self.divisor_override is not None:
            s += f", divisor_override={self.divisor_override}"
        return s

    def forward(self, x):
        check_input(self, x, 4)
        y = np.empty(self.output_shape(x.shape), dtype=x.dtype)
        _pool.avg_pool2d_forward(x, y, self.kernel_size, self.stride, self.padding,
                                 self.count_include_pad, self.divisor_override, num_threads())
        if self.training:
            self._in_shape = x.shape
        return y

    def backward(self, grad):
        in_shape = require_cache(self, self._in_shape)
        check_input(self, grad, 4, what="gradient")
        out_shape = self.output_shape(in_shape)
        if grad.shape != out_shape:
            raise ValueError(f"{self._describe()}: gradient of shape {grad.shape} does not "
                             f"match the output shape {out_shape}")
        gx = np.empty(in_shape, dtype=grad.dtype)
        _pool.avg_pool2d_backward(grad, gx, self.kernel_size, self.stride, self.padding,
                                  self.count_include_pad, self.divisor_override, num_threads())
        return gx


class GlobalAvgPool2d(Module):
    """(N, H, W, C) -> (N, C): the mean over all spatial positions.

    PyTorch users write ``nn.AdaptiveAvgPool2d(1)`` followed by ``torch.flatten(x, 1)``;
    this is both in one layer (Keras: ``GlobalAveragePooling2D``).
    """

    def __init__(self):
        super().__init__()
        self._in_shape = None

    def _drop_cache(self):
        self._in_shape = None

    def forward(self, x):
        check_input(self, x, 4)
        if x.shape[1] * x.shape[2] == 0:
            raise ValueError(f"{self._describe()}: input of shape {x.shape} has no spatial "
                             "positions")
        y = np.empty((x.shape[0], x.shape[3]), dtype=x.dtype)
        _pool.global_avg_pool2d_forward(x, y, num_threads())
        if self.training:
            self._in_shape = x.shape
        return y

    def backward(self, grad):
        in_shape = require_cache(self, self._in_shape)
        check_input(self, grad, 2, what="gradient")
        if grad.shape != (in_shape[0], in_shape[3]):
            raise ValueError(f"{self._describe()}: gradient of shape {grad.shape} does not "
                             f"match the output shape {(in_shape[0], in_shape[3])}")
        gx = np.empty(in_shape, dtype=grad.dtype)
        _pool.global_avg_pool2d_backward(grad, gx, num_threads())
        return gx
