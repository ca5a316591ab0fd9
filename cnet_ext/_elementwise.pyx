# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elementwise kernels: ReLU, residual add (+ fused ReLU), inverted dropout,
and channel concat/split along the last (NHWC) axis.

Flat kernels split the array into one contiguous chunk per thread (chunk
starts are multiples of 64 elements); each element's result depends only on
its own inputs and index, so any thread count gives bitwise the same output.

Dropout draws its mask from a counter-based generator: splitmix64 keyed by the
call's seed, evaluated at the element's pair index (one 64-bit hash gives two
32-bit uniforms).  The mask is therefore a pure function of (seed, index):
identical for any thread count, and backward regenerates it from the seed
instead of storing it.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

cimport numpy as cnp

from cnet_ext._openmp cimport effective_threads, cnet_min_elements_per_thread

import numpy as np

cnp.import_array()

cdef enum:
    _ALIGN = 64  # chunk starts are multiples of this (even: dropout pairs)


cdef inline Py_ssize_t _chunk(Py_ssize_t n, int nt) noexcept nogil:
    cdef Py_ssize_t c = (n + nt - 1) // nt
    return (c + _ALIGN - 1) // _ALIGN * _ALIGN


# The loops are C (multi-versioned for AVX2 / AVX-512): see _elementwise_impl.h.
cdef extern from *:
    """
    #include <stdint.h>
    #define T float
    #define U uint32_t
    #define SFX f32
    #include "_elementwise_impl.h"
    #undef T
    #undef U
    #undef SFX
    #define T double
    #define U uint64_t
    #define SFX f64
    #include "_elementwise_impl.h"
    #undef T
    #undef U
    #undef SFX
    """
    uint64_t cnet_mix64(uint64_t) noexcept nogil
    void cnet_relu_f32(const float*, float*, Py_ssize_t) noexcept nogil
    void cnet_relu_f64(const double*, double*, Py_ssize_t) noexcept nogil
    void cnet_relu_mask_f32(const float*, const float*, float*, Py_ssize_t) noexcept nogil
    void cnet_relu_mask_f64(const double*, const double*, double*, Py_ssize_t) noexcept nogil
    void cnet_add_f32(const float*, const float*, float*, Py_ssize_t, int) noexcept nogil
    void cnet_add_f64(const double*, const double*, double*, Py_ssize_t, int) noexcept nogil
    void cnet_dropout_f32(const float*, float*, Py_ssize_t, Py_ssize_t, uint64_t, uint64_t,
                          float) noexcept nogil
    void cnet_dropout_f64(const double*, double*, Py_ssize_t, Py_ssize_t, uint64_t, uint64_t,
                          double) noexcept nogil


cdef inline void _relu(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    if floating is float:
        cnet_relu_f32(x, y, n)
    else:
        cnet_relu_f64(x, y, n)


cdef inline void _relu_mask(const floating* g, const floating* y, floating* out,
                            Py_ssize_t n) noexcept nogil:
    if floating is float:
        cnet_relu_mask_f32(g, y, out, n)
    else:
        cnet_relu_mask_f64(g, y, out, n)


cdef inline void _add(const floating* a, const floating* b, floating* out, Py_ssize_t n,
                      bint relu) noexcept nogil:
    if floating is float:
        cnet_add_f32(a, b, out, n, relu)
    else:
        cnet_add_f64(a, b, out, n, relu)


cdef inline void _dropout(const floating* x, floating* y, Py_ssize_t start, Py_ssize_t stop,
                          uint64_t key, uint64_t threshold, floating scale) noexcept nogil:
    if floating is float:
        cnet_dropout_f32(x, y, start, stop, key, threshold, scale)
    else:
        cnet_dropout_f64(x, y, start, stop, key, threshold, scale)


# -- flat drivers (one chunk per thread) ----------------------------------------

cdef enum _Op:
    OP_RELU, OP_RELU_MASK, OP_ADD, OP_ADD_RELU, OP_DROPOUT


cdef void _run(_Op op, const floating* a, const floating* b, floating* out, Py_ssize_t n,
               uint64_t key, uint64_t threshold, floating scale,
               int n_threads) noexcept nogil:
    cdef int nt = effective_threads(n, n_threads, cnet_min_elements_per_thread())
    cdef Py_ssize_t chunk = _chunk(n, nt)
    cdef Py_ssize_t t, s, e
    for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
        s = t * chunk
        e = s + chunk
        if e > n:
            e = n
        if s < e:
            if op == OP_RELU:
                _relu(a + s, out + s, e - s)
            elif op == OP_RELU_MASK:
                _relu_mask(a + s, b + s, out + s, e - s)
            elif op == OP_ADD:
                _add(a + s, b + s, out + s, e - s, False)
            elif op == OP_ADD_RELU:
                _add(a + s, b + s, out + s, e - s, True)
            else:
                _dropout(a, out, s, e, key, threshold, scale)


def _flat(name, arr, like=None, bint output=False):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.float32 and arr.dtype != np.float64:
        raise ValueError(f"{name}: expected float32 or float64, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array of shape {arr.shape} is not C-contiguous")
    if output and not arr.flags.writeable:
        raise ValueError(f"{name}: output array of shape {arr.shape} is read-only")
    if like is not None and (arr.shape != like.shape or arr.dtype != like.dtype):
        raise ValueError(f"{name}: expected shape {like.shape} {like.dtype}, got "
                         f"{arr.shape} {arr.dtype}")
    return arr.reshape(-1)


def _dispatch(int op, floating[::1] a, floating[::1] b, floating[::1] out,
              uint64_t key, uint64_t threshold, double scale, int n_threads):
    cdef Py_ssize_t n = out.shape[0]
    if n == 0:
        return
    with nogil:
        _run(<_Op>op, &a[0], &b[0], &out[0], n, key, threshold, <floating>scale, n_threads)


def relu_forward(x, out, int n_threads):
    """out = max(x, 0); out may be x (in place)."""
    xf = _flat("x", x)
    of = _flat("out", out, x, True)
    _dispatch(OP_RELU, xf, xf, of, 0, 0, 0.0, n_threads)


def relu_backward(g, y, out, int n_threads):
    """out = g where y > 0, else 0 (y is the ReLU's output); out may be g only if
    the caller owns g."""
    gf = _flat("g", g)
    yf = _flat("y", y, g)
    of = _flat("out", out, g, True)
    _dispatch(OP_RELU_MASK, gf, yf, of, 0, 0, 0.0, n_threads)


def add(a, b, out, bint relu, int n_threads):
    """out = a + b, then max(., 0) if relu; out may alias a or b."""
    af = _flat("a", a)
    bf = _flat("b", b, a)
    of = _flat("out", out, a, True)
    _dispatch(OP_ADD_RELU if relu else OP_ADD, af, bf, of, 0, 0, 0.0, n_threads)


def add_slots(target, slots, int n_threads):
    """target += slots[0], then += slots[1], ... (a weight gradient's stripe sums, in
    that fixed order: the same bits as one add per slot) in one pass: each block of
    target stays in L1 while the slots are added to it, instead of a read and a write
    of the whole target per slot."""
    tf = _flat("target", target, None, True)
    if not isinstance(slots, np.ndarray):
        raise TypeError(f"slots: expected a numpy array, got {type(slots).__name__}")
    if slots.ndim < 1 or slots.shape[1:] != target.shape or slots.dtype != target.dtype:
        raise ValueError(f"slots: expected shape (S,) + {target.shape} {target.dtype}, got "
                         f"{slots.shape} {slots.dtype}")
    if not slots.flags.c_contiguous:
        raise ValueError(f"slots: array of shape {slots.shape} is not C-contiguous")
    if slots.shape[0] == 0 or tf.shape[0] == 0:
        return
    _add_slots(tf, slots.reshape(slots.shape[0], -1), n_threads)


def _add_slots(floating[::1] t, floating[:, ::1] slots, int n_threads):
    cdef Py_ssize_t n = t.shape[0], S = slots.shape[0]
    cdef int nt = effective_threads(n * S, n_threads, cnet_min_elements_per_thread())
    cdef Py_ssize_t chunk = _chunk(n, nt), block = 2048
    cdef Py_ssize_t th, i0, i1, b, e, k
    with nogil:
        for th in prange(nt, schedule="static", num_threads=nt):
            i0 = th * chunk
            i1 = i0 + chunk
            if i1 > n:
                i1 = n
            b = i0
            while b < i1:
                e = b + block
                if e > i1:
                    e = i1
                for k in range(S):
                    _add(&t[b], &slots[k, b], &t[b], e - b, False)
                b = e


def dropout(x, out, seed, double p, int n_threads):
    """out = x * mask / (1 - p), mask[i] ~ Bernoulli(1 - p) from (seed, i).

    The scale is computed in x's dtype, as torch does (noise.div_(1 - p)).
    p == 1 gives x * 0.  Calling it with the same seed on the gradient is the
    backward pass.  out may be x (in place)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    xf = _flat("x", x)
    of = _flat("out", out, x, True)
    cdef uint64_t key = cnet_mix64(<uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF))
    cdef uint64_t threshold = <uint64_t>min(round(p * 4294967296.0), 4294967296)
    dt = x.dtype.type
    scale = float(dt(1) / dt(1.0 - p)) if p < 1.0 else 0.0
    _dispatch(OP_DROPOUT, xf, xf, of, key, threshold, scale, n_threads)


# -- channel concat / split ------------------------------------------------------

cdef void _concat_rows(char** parts, Py_ssize_t* nbytes, Py_ssize_t k, char* whole,
                       Py_ssize_t row_bytes, Py_ssize_t rows, bint split,
                       int n_threads) noexcept nogil:
    """Row m of `whole` is the concatenation of row m of every part."""
    cdef Py_ssize_t m, i, off
    cdef int nt = effective_threads(rows * row_bytes // 4, n_threads)
    for m in prange(rows, nogil=True, schedule="static", num_threads=nt):
        off = 0
        for i in range(k):
            if split:
                memcpy(parts[i] + m * nbytes[i], whole + m * row_bytes + off, nbytes[i])
            else:
                memcpy(whole + m * row_bytes + off, parts[i] + m * nbytes[i], nbytes[i])
            off = off + nbytes[i]


def _concat_split(list parts, whole, bint split, int n_threads):
    if not isinstance(whole, np.ndarray) or whole.ndim < 1:
        raise ValueError("expected a numpy array with a channel axis")
    if not whole.flags.c_contiguous:
        raise ValueError(f"array of shape {whole.shape} is not C-contiguous")
    if not split and not whole.flags.writeable:
        raise ValueError("concat: output is read-only")
    cdef Py_ssize_t k = len(parts), i, total = 0
    cdef Py_ssize_t last = whole.ndim - 1
    cdef Py_ssize_t channels = whole.shape[last]
    lead = whole.shape[:last]
    for p in parts:
        if not isinstance(p, np.ndarray) or p.dtype != whole.dtype or p.ndim != whole.ndim \
                or p.shape[:last] != lead or not p.flags.c_contiguous:
            raise ValueError(f"parts must be C-contiguous {whole.dtype} arrays of shape "
                             f"{lead + ('C_i',)}; got {getattr(p, 'shape', None)} "
                             f"{getattr(p, 'dtype', type(p).__name__)}")
        if split and not p.flags.writeable:
            raise ValueError("split: output part is read-only")
        total += p.shape[last]
    if total != channels:
        raise ValueError(f"parts have {total} channels in all, the whole has "
                         f"{channels} (shape {whole.shape})")
    cdef Py_ssize_t item = whole.dtype.itemsize
    cdef Py_ssize_t rows = whole.size // channels if channels else 0
    if rows == 0 or k == 0:
        return
    cdef cnp.ndarray arr
    cdef char* base = <char*>cnp.PyArray_DATA(<cnp.ndarray>whole)
    cdef Py_ssize_t row_bytes = channels * item
    cdef char** ptrs = <char**>malloc(k * sizeof(char*))
    cdef Py_ssize_t* nbytes = <Py_ssize_t*>malloc(k * sizeof(Py_ssize_t))
    if ptrs == NULL or nbytes == NULL:
        free(ptrs)
        free(nbytes)
        raise MemoryError()
    try:
        for i in range(k):
            arr = parts[i]
            ptrs[i] = <char*>cnp.PyArray_DATA(arr)
            nbytes[i] = arr.shape[last] * item
        with nogil:
            _concat_rows(ptrs, nbytes, k, base, row_bytes, rows, split, n_threads)
    finally:
        free(ptrs)
        free(nbytes)


def concat_last(list parts, out, int n_threads):
    """out[..., off_i:off_i + C_i] = parts[i] for every part, in order."""
    _concat_split(parts, out, False, n_threads)


def split_last(x, list parts, int n_threads):
    """parts[i] = x[..., off_i:off_i + C_i] (parts preallocated, C-contiguous)."""
    _concat_split(parts, x, True, n_threads)


# -- strided subsample with zero channel padding (ResNet option-A shortcut) -------

cdef void _subsample_pad_rows(char* x, char* y, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                              Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t stride,
                              Py_ssize_t pixel_in, Py_ssize_t pixel_out, Py_ssize_t before,
                              bint backward, int n_threads) noexcept nogil:
    """Forward: y[n, oh, ow] = (0 * before, x[n, oh*s, ow*s], 0 ...), pixels of
    pixel_in / pixel_out bytes.  Backward (x the input gradient, y the output
    gradient): x[n, ih, iw] = y[n, ih/s, iw/s][before:before + pixel_in] where s
    divides both, else 0.  Rows of the written array are split over the threads."""
    cdef Py_ssize_t r, n, i, j, rows = N * (H if backward else OH)
    cdef char* xr
    cdef char* yr
    cdef int nt = effective_threads(rows * (W * pixel_in if backward else OW * pixel_out) // 4,
                                    n_threads, cnet_min_elements_per_thread())
    for r in prange(rows, nogil=True, schedule="static", num_threads=nt):
        if backward:
            n = r // H
            i = r - n * H
            xr = x + r * W * pixel_in
            if i % stride:
                memset(xr, 0, W * pixel_in)
                continue
            yr = y + (n * OH + i // stride) * OW * pixel_out + before
            for j in range(W):
                if j % stride:
                    memset(xr + j * pixel_in, 0, pixel_in)
                else:
                    memcpy(xr + j * pixel_in, yr + (j // stride) * pixel_out, pixel_in)
        else:
            n = r // OH
            i = r - n * OH
            xr = x + (n * H + i * stride) * W * pixel_in
            yr = y + r * OW * pixel_out
            for j in range(OW):
                memset(yr + j * pixel_out, 0, before)
                memcpy(yr + j * pixel_out + before, xr + j * stride * pixel_in, pixel_in)
                memset(yr + j * pixel_out + before + pixel_in, 0,
                       pixel_out - before - pixel_in)


def _subsample_pad(x, y, Py_ssize_t stride, Py_ssize_t before, bint backward, int n_threads):
    """Checks for subsample_pad_channels(_backward): x the (N, H, W, C) side, y the
    (N, ceil(H/s), ceil(W/s), C_out) side; the written one must be writeable."""
    what = "subsample_pad_channels" + ("_backward" if backward else "")
    for name, a in (("x", x), ("y", y)):
        if not isinstance(a, np.ndarray) or a.ndim != 4 or not a.flags.c_contiguous:
            raise ValueError(f"{what}: {name} must be a C-contiguous NHWC array, got "
                             f"{getattr(a, 'shape', type(a).__name__)}")
    if x.dtype != y.dtype or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{what}: float32 or float64 arrays of one dtype, got {x.dtype} "
                         f"and {y.dtype}")
    if not (y if not backward else x).flags.writeable:
        raise ValueError(f"{what}: the output is read-only")
    if stride < 1:
        raise ValueError(f"{what}: stride must be >= 1, got {stride}")
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    want = (N, (H + stride - 1) // stride, (W + stride - 1) // stride)
    if y.shape[:3] != want or before < 0 or before + C > y.shape[3]:
        raise ValueError(f"{what}: {C} channels at offset {before} of an output "
                         f"{want + ('C_out',)} with stride {stride}: got x {x.shape}, "
                         f"y {y.shape}")
    if x.size == 0:
        return
    cdef Py_ssize_t item = x.dtype.itemsize, OH = want[1], OW = want[2]
    cdef Py_ssize_t pixel_out = y.shape[3] * item
    cdef char* xp = <char*>cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef char* yp = <char*>cnp.PyArray_DATA(<cnp.ndarray>y)
    with nogil:
        _subsample_pad_rows(xp, yp, N, H, W, OH, OW, stride, C * item, pixel_out,
                            before * item, backward, n_threads)


def subsample_pad_channels(x, out, Py_ssize_t stride, Py_ssize_t before, int n_threads):
    """out = x[:, ::stride, ::stride, :] with zero channels around it: ``before``
    zeros, x's C channels, zeros up to out's C_out (the option-A shortcut)."""
    _subsample_pad(x, out, stride, before, False, n_threads)


def subsample_pad_channels_backward(grad, grad_in, Py_ssize_t stride, Py_ssize_t before,
                                    int n_threads):
    """grad_in (N, H, W, C) = zeros with grad[..., before:before + C] at every
    stride-th row and column: subsample_pad_channels' input gradient."""
    _subsample_pad(grad_in, grad, stride, before, True, n_threads)
