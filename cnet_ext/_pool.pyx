# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Max, average and global average pooling over NHWC activations.

Layout: x is (N, H, W, C) C-contiguous, so every spatial position is a unit-stride
run of C channels.  The row kernels (C, in _pool_impl.h) sweep window taps over
a whole output row, so every inner loop runs over channels and vectorises.

Forward kernels parallelise over output rows (n, oh): each output element is
written by exactly one thread.  Backward kernels are written as *gathers*
over input rows (n, ih): every input element sums the gradients of the
windows that cover it, so there are no scatter races and no atomics, and the
summation order is fixed, hence the same for any thread count.

Max pooling records the argmax as the flat spatial index ``ih * W + iw`` of
the input image (PyTorch's ``return_indices`` convention), as int32.  The
comparison is PyTorch's ``val > max || isnan(val)``, so NaNs propagate and
ties keep the first position in window order.
"""
from cython cimport floating
from cython.parallel cimport prange

from cnet_ext._openmp cimport effective_threads

import numpy as np


# -- output shapes ------------------------------------------------------------

def pool_output_size(Py_ssize_t size, Py_ssize_t kernel, Py_ssize_t stride,
                     Py_ssize_t pad, Py_ssize_t dilation, bint ceil_mode):
    """PyTorch's pooling_output_shape: floor (or ceil) division, and with
    ceil_mode the last window must start inside the input or its left padding."""
    cdef Py_ssize_t num = size + 2 * pad - dilation * (kernel - 1) - 1
    cdef Py_ssize_t out
    if ceil_mode:
        num += stride - 1
    # floor division that rounds toward -inf (num may be negative)
    out = (num // stride if num >= 0 else -((-num + stride - 1) // stride)) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# The row kernels are C (multi-versioned for AVX2 / AVX-512): see _pool_impl.h.
cdef extern from *:
    """
    #define T float
    #define SFX f32
    #include "_pool_impl.h"
    #undef T
    #undef SFX
    #define T double
    #define SFX f64
    #include "_pool_impl.h"
    #undef T
    #undef SFX
    """
    void cnet_max_row_f32(const float*, float*, int*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t) noexcept nogil
    void cnet_max_row_f64(const double*, double*, int*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t) noexcept nogil
    void cnet_max_bwd_row_f32(const float*, const int*, float*, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t) noexcept nogil
    void cnet_max_bwd_row_f64(const double*, const int*, double*, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t) noexcept nogil
    void cnet_avg_row_f32(const float*, float*, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, int, Py_ssize_t) noexcept nogil
    void cnet_avg_row_f64(const double*, double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                          Py_ssize_t, Py_ssize_t, Py_ssize_t, int, Py_ssize_t) noexcept nogil
    void cnet_avg_bwd_row_f32(const float*, float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, int,
                              Py_ssize_t) noexcept nogil
    void cnet_avg_bwd_row_f64(const double*, double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, int,
                              Py_ssize_t) noexcept nogil
    void cnet_gap_image_f32(const float*, float*, Py_ssize_t, Py_ssize_t) noexcept nogil
    void cnet_gap_image_f64(const double*, double*, Py_ssize_t, Py_ssize_t) noexcept nogil
    void cnet_gap_bwd_rows_f32(const float*, float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               Py_ssize_t) noexcept nogil
    void cnet_gap_bwd_rows_f64(const double*, double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               Py_ssize_t) noexcept nogil


# -- max pooling --------------------------------------------------------------

cdef void _max_pool_fwd(const floating* x, floating* y, int* idx,
                        Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                        int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, oh
    cdef int* ir
    cdef int nt = effective_threads(N * OH * OW * C * kh * kw, n_threads)
    for r in prange(N * OH, nogil=True, schedule="static", num_threads=nt):
        n = r // OH
        oh = r - n * OH
        ir = (idx + r * OW * C) if idx != NULL else NULL
        if floating is float:
            cnet_max_row_f32(x + n * H * W * C, y + r * OW * C, ir, H, W, C, OW, oh,
                             kh, kw, sh, sw, ph, pw, dh, dw)
        else:
            cnet_max_row_f64(x + n * H * W * C, y + r * OW * C, ir, H, W, C, OW, oh,
                             kh, kw, sh, sw, ph, pw, dh, dw)


cdef void _max_pool_bwd(const floating* g, const int* idx, floating* gx,
                        Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                        int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, ih
    cdef int nt = effective_threads(N * H * W * C * 2, n_threads)
    for r in prange(N * H, nogil=True, schedule="static", num_threads=nt):
        n = r // H
        ih = r - n * H
        if floating is float:
            cnet_max_bwd_row_f32(g + n * OH * OW * C, idx + n * OH * OW * C, gx + r * W * C,
                                 W, C, OH, OW, ih, kh, kw, sh, sw, ph, pw, dh, dw)
        else:
            cnet_max_bwd_row_f64(g + n * OH * OW * C, idx + n * OH * OW * C, gx + r * W * C,
                                 W, C, OH, OW, ih, kh, kw, sh, sw, ph, pw, dh, dw)


# -- average pooling ----------------------------------------------------------

cdef void _avg_pool_fwd(const floating* x, floating* y,
                        Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad,
                        Py_ssize_t divisor_override, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, oh
    cdef int nt = effective_threads(N * OH * OW * C * kh * kw, n_threads)
    for r in prange(N * OH, nogil=True, schedule="static", num_threads=nt):
        n = r // OH
        oh = r - n * OH
        if floating is float:
            cnet_avg_row_f32(x + n * H * W * C, y + r * OW * C, H, W, C, OW, oh, kh, kw,
                             sh, sw, ph, pw, count_include_pad, divisor_override)
        else:
            cnet_avg_row_f64(x + n * H * W * C, y + r * OW * C, H, W, C, OW, oh, kh, kw,
                             sh, sw, ph, pw, count_include_pad, divisor_override)


cdef void _avg_pool_bwd(const floating* g, floating* gx,
                        Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad,
                        Py_ssize_t divisor_override, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, ih
    cdef int nt = effective_threads(N * H * W * C * 2, n_threads)
    for r in prange(N * H, nogil=True, schedule="static", num_threads=nt):
        n = r // H
        ih = r - n * H
        if floating is float:
            cnet_avg_bwd_row_f32(g + n * OH * OW * C, gx + r * W * C, H, W, C, OH, OW, ih,
                                 kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override)
        else:
            cnet_avg_bwd_row_f64(g + n * OH * OW * C, gx + r * W * C, H, W, C, OH, OW, ih,
                                 kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override)


# -- global average pooling ---------------------------------------------------

cdef void _gap_fwd(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t HW,
                   Py_ssize_t C, int n_threads) noexcept nogil:
    cdef Py_ssize_t n
    cdef int nt = effective_threads(N * HW * C, n_threads)
    for n in prange(N, nogil=True, schedule="static", num_threads=nt):
        if floating is float:
            cnet_gap_image_f32(x + n * HW * C, y + n * C, HW, C)
        else:
            cnet_gap_image_f64(x + n * HW * C, y + n * C, HW, C)


cdef void _gap_bwd(const floating* g, floating* gx, Py_ssize_t N, Py_ssize_t HW,
                   Py_ssize_t C, int n_threads) noexcept nogil:
    cdef Py_ssize_t n
    cdef int nt = effective_threads(N * HW * C, n_threads)
    for n in prange(N, nogil=True, schedule="static", num_threads=nt):
        if floating is float:
            cnet_gap_bwd_rows_f32(g, gx, n * HW, (n + 1) * HW, HW, C)
        else:
            cnet_gap_bwd_rows_f64(g, gx, n * HW, (n + 1) * HW, HW, C)


# -- Python-facing wrappers ---------------------------------------------------

def _check(name, arr, shape, dtype):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array of shape {arr.shape} is not C-contiguous")
    if not arr.flags.writeable and name in ("y", "gx", "idx"):
        raise ValueError(f"{name}: output array is read-only")


def _check_x(x):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"x: expected a 4-D (N, H, W, C) array, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype != np.float32 and x.dtype != np.float64:
        raise ValueError(f"x: expected float32 or float64, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"x: array of shape {x.shape} is not C-contiguous")


def _check_geometry(Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                    Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                    Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw):
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel {(kh, kw)}, stride {(sh, sw)} and dilation {(dh, dw)} "
                         f"must be >= 1 and padding {(ph, pw)} >= 0")
    if OH < 1 or OW < 1:
        raise ValueError(f"output size {(OH, OW)} for input {(H, W)} is empty")
    if H * W >= 2**31:
        raise ValueError(f"spatial size {(H, W)} too large for int32 argmax indices")
    # every window must start inside the padded input (the output size rule)
    if (OH - 1) * sh - ph >= H or (OW - 1) * sw - pw >= W:
        raise ValueError(f"output size {(OH, OW)} too large for input {(H, W)}")


def _pool_args(big, small, str name, kernel, stride, padding, dilation):
    """Validate an input-shaped array ``big`` (x or gx) and an output-shaped one
    ``small`` (y or g, called ``name``); return (kh, kw, sh, sw, ph, pw, dh, dw)."""
    _check_x(big)
    cdef Py_ssize_t N = big.shape[0], H = big.shape[1], W = big.shape[2], C = big.shape[3]
    cdef Py_ssize_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1]
    if small.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D array, got shape {small.shape}")
    cdef Py_ssize_t OH = small.shape[1], OW = small.shape[2]
    _check(name, small, (N, OH, OW, C), big.dtype)
    _check_geometry(H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw)
    return kh, kw, sh, sw, ph, pw, dh, dw


def max_pool2d_forward(x, y, idx, kernel, stride, padding, dilation, int n_threads):
    """y[n, oh, ow, c] = max over the window; idx (int32, same shape as y, or None)
    receives the argmax as ih * W + iw."""
    kh, kw, sh, sw, ph, pw, dh, dw = _pool_args(x, y, "y", kernel, stride, padding, dilation)
    if idx is not None:
        _check("idx", idx, y.shape, np.int32)
    _max_fwd_dispatch(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw, n_threads)


def _max_fwd_dispatch(floating[:, :, :, ::1] x, floating[:, :, :, ::1] y,
                      int[:, :, :, ::1] idx, Py_ssize_t kh, Py_ssize_t kw,
                      Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                      Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    cdef int* ip = &idx[0, 0, 0, 0] if idx is not None and idx.shape[0] > 0 else NULL
    if x.shape[0] == 0 or x.shape[3] == 0:
        return
    with nogil:
        _max_pool_fwd(&x[0, 0, 0, 0], &y[0, 0, 0, 0], ip, x.shape[0], x.shape[1],
                      x.shape[2], x.shape[3], y.shape[1], y.shape[2], kh, kw, sh, sw,
                      ph, pw, dh, dw, n_threads)


def max_pool2d_backward(g, idx, gx, kernel, stride, padding, dilation, int n_threads):
    """gx (N, H, W, C) = gradient of the input given g and the forward's idx."""
    kh, kw, sh, sw, ph, pw, dh, dw = _pool_args(gx, g, "g", kernel, stride, padding, dilation)
    _check("idx", idx, g.shape, np.int32)
    _max_bwd_dispatch(g, idx, gx, kh, kw, sh, sw, ph, pw, dh, dw, n_threads)


def _max_bwd_dispatch(floating[:, :, :, ::1] g, int[:, :, :, ::1] idx,
                      floating[:, :, :, ::1] gx, Py_ssize_t kh, Py_ssize_t kw,
                      Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                      Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    if gx.shape[0] == 0 or gx.shape[3] == 0:
        return
    with nogil:
        _max_pool_bwd(&g[0, 0, 0, 0], &idx[0, 0, 0, 0], &gx[0, 0, 0, 0], gx.shape[0],
                      gx.shape[1], gx.shape[2], gx.shape[3], g.shape[1], g.shape[2],
                      kh, kw, sh, sw, ph, pw, dh, dw, n_threads)


def avg_pool2d_forward(x, y, kernel, stride, padding, bint count_include_pad,
                       divisor_override, int n_threads):
    """y = window sums divided by PyTorch's divisor (see _avg_divisor)."""
    kh, kw, sh, sw, ph, pw, _, _ = _pool_args(x, y, "y", kernel, stride, padding, (1, 1))
    cdef Py_ssize_t dov = int(divisor_override or 0)
    _avg_fwd_dispatch(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, dov, n_threads)


def _avg_fwd_dispatch(floating[:, :, :, ::1] x, floating[:, :, :, ::1] y,
                      Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                      Py_ssize_t ph, Py_ssize_t pw, bint cip, Py_ssize_t dov,
                      int n_threads):
    if x.shape[0] == 0 or x.shape[3] == 0:
        return
    with nogil:
        _avg_pool_fwd(&x[0, 0, 0, 0], &y[0, 0, 0, 0], x.shape[0], x.shape[1],
                      x.shape[2], x.shape[3], y.shape[1], y.shape[2], kh, kw, sh, sw,
                      ph, pw, cip, dov, n_threads)


def avg_pool2d_backward(g, gx, kernel, stride, padding, bint count_include_pad,
                        divisor_override, int n_threads):
    kh, kw, sh, sw, ph, pw, _, _ = _pool_args(gx, g, "g", kernel, stride, padding, (1, 1))
    cdef Py_ssize_t dov = int(divisor_override or 0)
    _avg_bwd_dispatch(g, gx, kh, kw, sh, sw, ph, pw, count_include_pad, dov, n_threads)


def _avg_bwd_dispatch(floating[:, :, :, ::1] g, floating[:, :, :, ::1] gx,
                      Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                      Py_ssize_t ph, Py_ssize_t pw, bint cip, Py_ssize_t dov,
                      int n_threads):
    if gx.shape[0] == 0 or gx.shape[3] == 0:
        return
    with nogil:
        _avg_pool_bwd(&g[0, 0, 0, 0], &gx[0, 0, 0, 0], gx.shape[0], gx.shape[1],
                      gx.shape[2], gx.shape[3], g.shape[1], g.shape[2], kh, kw, sh, sw,
                      ph, pw, cip, dov, n_threads)


def global_avg_pool2d_forward(x, y, int n_threads):
    """y (N, C) = mean of x (N, H, W, C) over H and W."""
    _check_x(x)
    _check("y", y, (x.shape[0], x.shape[3]), x.dtype)
    if x.shape[1] * x.shape[2] == 0:
        raise ValueError(f"x: empty spatial size in shape {x.shape}")
    _gap_fwd_dispatch(x, y, n_threads)


def _gap_fwd_dispatch(floating[:, :, :, ::1] x, floating[:, ::1] y, int n_threads):
    if x.shape[0] == 0 or x.shape[3] == 0:
        return
    with nogil:
        _gap_fwd(&x[0, 0, 0, 0], &y[0, 0], x.shape[0], x.shape[1] * x.shape[2],
                 x.shape[3], n_threads)


def global_avg_pool2d_backward(g, gx, int n_threads):
    """gx (N, H, W, C) = g (N, C) / (H * W) broadcast over H and W."""
    _check_x(gx)
    _check("g", g, (gx.shape[0], gx.shape[3]), gx.dtype)
    if gx.shape[1] * gx.shape[2] == 0:
        raise ValueError(f"gx: empty spatial size in shape {gx.shape}")
    _gap_bwd_dispatch(g, gx, n_threads)


def _gap_bwd_dispatch(floating[:, ::1] g, floating[:, :, :, ::1] gx, int n_threads):
    if gx.shape[0] == 0 or gx.shape[3] == 0:
        return
    with nogil:
        _gap_bwd(&g[0, 0], &gx[0, 0, 0, 0], gx.shape[0], gx.shape[1] * gx.shape[2],
                 gx.shape[3], n_threads)
