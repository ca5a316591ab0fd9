# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Max, average and global average pooling over NHWC activations.

Layout: x is (N, H, W, C) C-contiguous, so every spatial position is a unit-stride
run of C channels; all inner loops run over channels and vectorise.

Forward kernels parallelise over output rows (n, oh): each output element is
written by exactly one thread.  Backward kernels are written as *gathers*
over input rows (n, ih): every input element sums the gradients of the
windows that cover it, so there are no scatter races, no zeroing pass, and the
summation order (windows in output order) is the same for any thread count.

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


cdef inline Py_ssize_t _lo_window(Py_ssize_t i, Py_ssize_t pad, Py_ssize_t span,
                                  Py_ssize_t stride) noexcept nogil:
    """First output index whose window [o*s - pad, o*s - pad + span) covers input i."""
    cdef Py_ssize_t a = i + pad - span + 1
    if a <= 0:
        return 0
    return (a + stride - 1) // stride


# -- max pooling --------------------------------------------------------------

cdef void _max_row(const floating* x, floating* y, int* idx,
                   Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW, Py_ssize_t oh,
                   Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                   Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw) noexcept nogil:
    """One output row (n, oh); x points at image n, y and idx at the row."""
    cdef Py_ssize_t ow, i, j, c, ih, iw, h0, w0
    cdef bint first
    cdef int pos, im
    cdef floating v, m
    cdef const floating* xp
    cdef floating* yp
    cdef int* ip
    h0 = oh * sh - ph
    for ow in range(OW):
        w0 = ow * sw - pw
        yp = y + ow * C
        ip = idx + ow * C
        first = True
        for i in range(kh):
            ih = h0 + i * dh
            if <size_t>ih >= <size_t>H:  # one compare tests 0 <= ih < H (Caffe's trick)
                continue
            for j in range(kw):
                iw = w0 + j * dw
                if <size_t>iw >= <size_t>W:
                    continue
                xp = x + (ih * W + iw) * C
                pos = <int>(ih * W + iw)
                if first:
                    first = False
                    for c in range(C):
                        yp[c] = xp[c]
                    if idx != NULL:
                        for c in range(C):
                            ip[c] = pos
                elif idx != NULL:
                    for c in range(C):
                        # unconditional loads + selects: vectorises, no branches
                        v = xp[c]
                        m = yp[c]
                        im = ip[c]
                        yp[c] = v if (v > m or v != v) else m
                        ip[c] = pos if (v > m or v != v) else im
                else:
                    for c in range(C):
                        v = xp[c]
                        m = yp[c]
                        yp[c] = v if (v > m or v != v) else m
        # a window entirely in padding cannot occur after the padding <= kernel/2
        # check, but leave no uninitialised memory behind if it does
        if first:
            for c in range(C):
                yp[c] = 0
                if idx != NULL:
                    ip[c] = -1


cdef void _max_pool_fwd(const floating* x, floating* y, int* idx,
                        Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                        int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, oh
    cdef int nt = effective_threads(N * OH * OW * C * kh * kw, n_threads)
    for r in prange(N * OH, nogil=True, schedule="static", num_threads=nt):
        n = r // OH
        oh = r - n * OH
        _max_row(x + n * H * W * C, y + r * OW * C,
                 (idx + r * OW * C) if idx != NULL else NULL,
                 H, W, C, OW, oh, kh, kw, sh, sw, ph, pw, dh, dw)


cdef void _max_bwd_row(const floating* g, const int* idx, floating* gx,
                       Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                       Py_ssize_t ih, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
                       Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                       Py_ssize_t dw) noexcept nogil:
    """Gradient of input row (n, ih): g, idx point at image n, gx at the row.

    The window ranges are those whose span covers the input position; the
    recorded argmax decides (dilated windows that skip it never recorded it).
    """
    cdef Py_ssize_t iw, oh, ow, c, oh0, oh1, ow0, ow1
    cdef int pos
    cdef floating v
    cdef floating* gp
    cdef const floating* go
    cdef const int* io
    oh0 = _lo_window(ih, ph, (kh - 1) * dh + 1, sh)
    oh1 = (ih + ph) // sh
    if oh1 > OH - 1:
        oh1 = OH - 1
    for iw in range(W):
        gp = gx + iw * C
        pos = <int>(ih * W + iw)
        for c in range(C):
            gp[c] = 0
        ow0 = _lo_window(iw, pw, (kw - 1) * dw + 1, sw)
        ow1 = (iw + pw) // sw
        if ow1 > OW - 1:
            ow1 = OW - 1
        for oh in range(oh0, oh1 + 1):
            for ow in range(ow0, ow1 + 1):
                go = g + (oh * OW + ow) * C
                io = idx + (oh * OW + ow) * C
                for c in range(C):
                    v = go[c]  # unconditional load so the select vectorises
                    gp[c] = gp[c] + (v if io[c] == pos else 0)


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
        _max_bwd_row(g + n * OH * OW * C, idx + n * OH * OW * C, gx + r * W * C,
                     W, C, OH, OW, ih, kh, kw, sh, sw, ph, pw, dh, dw)


# -- average pooling ----------------------------------------------------------

cdef inline Py_ssize_t _avg_divisor(Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t H,
                                    Py_ssize_t W, Py_ssize_t kh, Py_ssize_t kw,
                                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                                    Py_ssize_t pw, bint count_include_pad,
                                    Py_ssize_t divisor_override) noexcept nogil:
    """PyTorch's divide_factor: the window clipped to the padded input when
    padding counts, else to the input itself; 0 for an empty window."""
    cdef Py_ssize_t h0 = oh * sh - ph, w0 = ow * sw - pw
    cdef Py_ssize_t h1 = h0 + kh, w1 = w0 + kw
    if h1 > H + ph:
        h1 = H + ph
    if w1 > W + pw:
        w1 = W + pw
    cdef Py_ssize_t pool_size = (h1 - h0) * (w1 - w0)
    if h0 < 0:
        h0 = 0
    if w0 < 0:
        w0 = 0
    if h1 > H:
        h1 = H
    if w1 > W:
        w1 = W
    if h0 >= h1 or w0 >= w1:
        return 0
    if divisor_override > 0:
        return divisor_override
    if count_include_pad:
        return pool_size
    return (h1 - h0) * (w1 - w0)


cdef void _avg_row(const floating* x, floating* y, Py_ssize_t H, Py_ssize_t W,
                   Py_ssize_t C, Py_ssize_t OW, Py_ssize_t oh, Py_ssize_t kh,
                   Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                   Py_ssize_t pw, bint count_include_pad,
                   Py_ssize_t divisor_override) noexcept nogil:
    cdef Py_ssize_t ow, ih, iw, c, h0, h1, w0, w1, div
    cdef floating d
    cdef const floating* xp
    cdef floating* yp
    h0 = oh * sh - ph
    h1 = h0 + kh
    if h0 < 0:
        h0 = 0
    if h1 > H:
        h1 = H
    for ow in range(OW):
        yp = y + ow * C
        for c in range(C):
            yp[c] = 0
        div = _avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw, count_include_pad,
                           divisor_override)
        if div == 0:
            continue
        w0 = ow * sw - pw
        w1 = w0 + kw
        if w0 < 0:
            w0 = 0
        if w1 > W:
            w1 = W
        for ih in range(h0, h1):
            for iw in range(w0, w1):
                xp = x + (ih * W + iw) * C
                for c in range(C):
                    yp[c] = yp[c] + xp[c]
        d = <floating>div
        for c in range(C):
            yp[c] = yp[c] / d


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
        _avg_row(x + n * H * W * C, y + r * OW * C, H, W, C, OW, oh, kh, kw, sh, sw,
                 ph, pw, count_include_pad, divisor_override)


cdef void _avg_bwd_row(const floating* g, floating* gx, Py_ssize_t H, Py_ssize_t W,
                       Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t ih,
                       Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                       Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad,
                       Py_ssize_t divisor_override) noexcept nogil:
    cdef Py_ssize_t iw, oh, ow, c, oh0, oh1, ow0, ow1, div
    cdef floating d
    cdef floating* gp
    cdef const floating* go
    oh0 = _lo_window(ih, ph, kh, sh)
    oh1 = (ih + ph) // sh
    if oh1 > OH - 1:
        oh1 = OH - 1
    for iw in range(W):
        gp = gx + iw * C
        for c in range(C):
            gp[c] = 0
        ow0 = _lo_window(iw, pw, kw, sw)
        ow1 = (iw + pw) // sw
        if ow1 > OW - 1:
            ow1 = OW - 1
        for oh in range(oh0, oh1 + 1):
            for ow in range(ow0, ow1 + 1):
                div = _avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw,
                                   count_include_pad, divisor_override)
                if div == 0:
                    continue
                d = <floating>div
                go = g + (oh * OW + ow) * C
                for c in range(C):
                    gp[c] = gp[c] + go[c] / d


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
        _avg_bwd_row(g + n * OH * OW * C, gx + r * W * C, H, W, C, OH, OW, ih, kh, kw,
                     sh, sw, ph, pw, count_include_pad, divisor_override)


# -- global average pooling ---------------------------------------------------

cdef void _gap_fwd(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t HW,
                   Py_ssize_t C, int n_threads) noexcept nogil:
    cdef Py_ssize_t n, p, c
    cdef floating* yp
    cdef const floating* xp
    cdef floating d = <floating>HW
    cdef int nt = effective_threads(N * HW * C, n_threads)
    for n in prange(N, nogil=True, schedule="static", num_threads=nt):
        yp = y + n * C
        for c in range(C):
            yp[c] = 0
        for p in range(HW):
            xp = x + (n * HW + p) * C
            for c in range(C):
                yp[c] = yp[c] + xp[c]
        for c in range(C):
            yp[c] = yp[c] / d


cdef void _gap_bwd(const floating* g, floating* gx, Py_ssize_t N, Py_ssize_t HW,
                   Py_ssize_t C, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, n, c
    cdef floating* gp
    cdef const floating* go
    cdef floating d = <floating>HW
    cdef int nt = effective_threads(N * HW * C, n_threads)
    for r in prange(N * HW, nogil=True, schedule="static", num_threads=nt):
        n = r // HW
        gp = gx + r * C
        go = g + n * C
        for c in range(C):
            gp[c] = go[c] / d


# -- Python-facing wrappers ---------------------------------------------------

def _check(name, arr, shape, dtype):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {arr.dtype}")
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


def max_pool2d_forward(x, y, idx, kernel, stride, padding, dilation, int n_threads):
    """y[n, oh, ow, c] = max over the window; idx (int32, same shape as y, or None)
    receives the argmax as ih * W + iw."""
    _check_x(x)
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1]
    if y.ndim != 4:
        raise ValueError(f"y: expected a 4-D array, got shape {y.shape}")
    cdef Py_ssize_t OH = y.shape[1], OW = y.shape[2]
    _check("y", y, (N, OH, OW, C), x.dtype)
    if idx is not None:
        _check("idx", idx, (N, OH, OW, C), np.int32)
    _check_geometry(H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw)
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
    _check_x(gx)
    cdef Py_ssize_t N = gx.shape[0], H = gx.shape[1], W = gx.shape[2], C = gx.shape[3]
    cdef Py_ssize_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1]
    if g.ndim != 4:
        raise ValueError(f"g: expected a 4-D array, got shape {g.shape}")
    cdef Py_ssize_t OH = g.shape[1], OW = g.shape[2]
    _check("g", g, (N, OH, OW, C), gx.dtype)
    _check("idx", idx, (N, OH, OW, C), np.int32)
    _check_geometry(H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw)
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
    _check_x(x)
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1]
    cdef Py_ssize_t dov = int(divisor_override or 0)
    if y.ndim != 4:
        raise ValueError(f"y: expected a 4-D array, got shape {y.shape}")
    cdef Py_ssize_t OH = y.shape[1], OW = y.shape[2]
    _check("y", y, (N, OH, OW, C), x.dtype)
    _check_geometry(H, W, OH, OW, kh, kw, sh, sw, ph, pw, 1, 1)
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
    _check_x(gx)
    cdef Py_ssize_t N = gx.shape[0], H = gx.shape[1], W = gx.shape[2], C = gx.shape[3]
    cdef Py_ssize_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1]
    cdef Py_ssize_t ph = padding[0], pw = padding[1]
    cdef Py_ssize_t dov = int(divisor_override or 0)
    if g.ndim != 4:
        raise ValueError(f"g: expected a 4-D array, got shape {g.shape}")
    cdef Py_ssize_t OH = g.shape[1], OW = g.shape[2]
    _check("g", g, (N, OH, OW, C), gx.dtype)
    _check_geometry(H, W, OH, OW, kh, kw, sh, sw, ph, pw, 1, 1)
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
