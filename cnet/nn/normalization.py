"""Batch normalisation over the channels-last axis: BatchNorm2d and BatchNorm1d.

Semantics follow torch.nn.BatchNorm*d: batch statistics with the biased
variance in training, running statistics updated with
``running = (1 - momentum) * running + momentum * batch`` (unbiased variance;
``momentum=None`` is a cumulative moving average over ``num_batches_tracked``),
running statistics in eval mode (batch statistics when
``track_running_stats=False``).  Parameter and buffer names match torch, so
state_dict keys do too.  Only the layout differs: channels are the last axis.
"""
import numpy as np

from cnet_ext import _batchnorm

from .._threads import num_threads
from .module import Module, Parameter, check_input, runs_own, require_cache, residual_fits


class _BatchNorm(Module):
    _ranks = ()
    _activations = ("_cache",)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__()
        num_features = int(num_features)
        if num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be >= 1, got {num_features}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, "
                             f"got {momentum}")
        if not eps >= 0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0, got {eps}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if self.affine:
            self.weight = Parameter(np.ones(num_features, dtype=np.float32))
            self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        else:
            self.weight = None
            self.bias = None
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
            self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        self._relu = False
        self._cache = None
        self._work = None

    def fuse_relu(self):
        """Apply a following ReLU inside the kernels (called by Sequential)."""
        self._relu = True
        return True

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def _drop_cache(self):
        self._cache = None
        self._work = None

    def _dtype(self):
        if self.affine:
            return self.weight.data.dtype
        if self.track_running_stats:
            return self.running_mean.dtype
        return None

    def _workspace(self, dtype):
        """Per-channel vectors (statistics and folded alpha/shift), allocated once per dtype."""
        work = self._work
        if work is None or work[2].dtype != dtype:
            C = self.num_features
            work = (np.empty(C), np.empty(C), np.empty(C, dtype), np.empty(C, dtype))
            self._work = work
        return work

    def forward(self, x):
        return self._forward(x, None)

    def joins_residual(self, x, residual):
        """Whether _forward(x, residual) may stand for relu(self(x) + residual), a
        residual block's join (Sequential._forward_residual): no fused ReLU of its
        own, its class's own forward (runs_own), residual C-contiguous of x's
        shape and dtype."""
        return (not self._relu and runs_own(self, _BatchNorm) and isinstance(x, np.ndarray)
                and residual_fits(residual, x.shape, x.dtype))

    def _forward(self, x, residual, moments=None):
        """The forward; with ``residual`` (see joins_residual) relu(bn(x) + residual)
        in the same pass over the output, which saves writing bn(x) and the add's
        pass over three maps.  The same values as the separate passes.
        ``moments``: x's per-channel moments by pieces, as the convolution that
        wrote x took them (Conv2d.forward_with_batch_moments), standing for this
        layer's own pass over x in training mode."""
        check_input(self, x, self._ranks, channels=self.num_features, dtype=self._dtype())
        C = self.num_features
        x2 = x.reshape(-1, C)
        y = np.empty_like(x)
        y2 = y.reshape(-1, C)
        relu = self._relu or residual is not None
        residual2 = None if residual is None else residual.reshape(-1, C)
        weight = self.weight.data if self.affine else None
        bias = self.bias.data if self.affine else None
        mean, invstd, alpha, shift = self._workspace(x.dtype)
        if moments is not None and not self.training:
            raise ValueError(f"{self._describe()}: precomputed moments are for training "
                             "mode's batch statistics")
        if self.training or not self.track_running_stats:
            if x2.shape[0] < 2 and self.training:
                raise ValueError(f"{self._describe()}: expected more than 1 value per channel "
                                 f"when training, got input of shape {x.shape}")
            update = self.training and self.track_running_stats
            factor = 0.0
            if update:
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
            _batchnorm.forward_train(
                x2, y2, weight, bias, self.eps, relu, mean, invstd, alpha, shift,
                self.running_mean if update else None, self.running_var if update else None,
                factor, num_threads(), residual2, moments)
            self._cache = x if self.training else None
        else:
            self._forward_eval_rows(x2, y2, alpha, shift, num_threads(), residual2)
            self._cache = None
        return y

    def eval_scale_shift(self):
        """(alpha, shift) in float64 with eval mode's y = x * alpha + shift per channel:
        alpha = weight / sqrt(running_var + eps), shift = bias - running_mean * alpha
        (as the eval kernel computes them)."""
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{self._describe()}: eval mode needs running statistics")
        alpha = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        if self.affine:
            alpha = alpha * self.weight.data
        shift = -self.running_mean.astype(np.float64) * alpha
        if self.affine:
            shift = shift + self.bias.data
        return alpha, shift

    def _forward_eval_rows(self, x2, y2, alpha, shift, n_threads, residual2=None):
        """y2 = the eval-mode forward (ReLU included when fused) of rows x2 (M, C),
        with alpha / shift as scratch (also Conv2d.forward_with_batchnorm's, per chunk);
        with residual2 rows, relu(that + residual2)."""
        _batchnorm.forward_eval(x2, y2, self.weight.data if self.affine else None,
                                self.bias.data if self.affine else None, self.running_mean,
                                self.running_var, self.eps, self._relu or residual2 is not None,
                                alpha, shift, n_threads, residual2)

    def backward(self, grad_out):
        rows = self.backward_rows(grad_out)
        g = rows.operands[0]                # grad_out, checked
        dx = np.empty_like(g)
        rows.write(0, g.size // self.num_features, dx.reshape(-1, self.num_features),
                   num_threads())
        return dx

    def backward_rows(self, grad_out):
        """The backward's reduction over the batch (the parameter gradients, added
        now), and dL/dx to be written later by blocks of rows: a BatchNormInputGrad.
        The convolution before this layer makes each chunk of its output gradient
        so, while in cache (Conv2d.backward_through_batchnorm): dL/dx is never
        written in full."""
        x = require_cache(self, self._cache)
        C = self.num_features
        check_input(self, grad_out, self._ranks, channels=C, dtype=x.dtype, what="gradient")
        if grad_out.shape != x.shape:
            raise ValueError(f"{self._describe()}: gradient of shape {grad_out.shape} does not "
                             f"match the forward input shape {x.shape}")
        mean, invstd, alpha, shift = self._work
        coef = _batchnorm.grad_coefficients(C, x.dtype)
        _batchnorm.backward_coefficients(
            x.reshape(-1, C), grad_out.reshape(-1, C), self.weight.data if self.affine else None,
            self.weight.grad if self.affine else None,
            self.bias.grad if self.affine else None,
            mean, invstd, alpha, shift, self._relu, num_threads(), coef)
        return BatchNormInputGrad(grad_out, x, coef, alpha, shift, self._relu)

    def extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
             f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        if self._relu:
            s += ", fused_relu=True"
        return s


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, H, W, C) inputs: statistics per channel over N, H and W.

    ``BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True)`` as in torch, on channels-last tensors.
    """
    _ranks = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, L, C) inputs (channels last): statistics per channel."""
    _ranks = (2, 3)


class BatchNormInputGrad:
    """A training batch norm's input gradient, not yet written: its output gradient
    ``g`` and forward input ``x`` (alike, channels last), the coefficients of
    dx = a*g + k*(x - mean) + b from the batch's sums (_batchnorm.backward_coefficients),
    and alpha / shift for the fused ReLU's mask (``relu``).  ``operands`` is that
    tuple, as _conv.conv_direct_backward's bn_grad takes it."""
    __slots__ = ("operands",)

    def __init__(self, g, x, coef, alpha, shift, relu):
        self.operands = (g, x, coef, alpha, shift, relu)

    def write(self, r0, r1, out, n_threads):
        """Rows [r0, r1) of dL/dx viewed as (rows, C) into ``out`` (r1 - r0, C)."""
        g, x, coef, alpha, shift, relu = self.operands
        C = x.shape[-1]
        _batchnorm.backward_dx(x.reshape(-1, C)[r0:r1], g.reshape(-1, C)[r0:r1], out, coef,
                               alpha, shift, relu, n_threads)

