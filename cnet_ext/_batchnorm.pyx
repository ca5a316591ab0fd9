# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-normalisation kernels over channels-last rows.

An NHWC tensor (N, H, W, C) is viewed as M = N*H*W rows of C unit-stride
channels, so every per-channel statistic is a column reduction over rows.
Following PyTorch's ``batch_norm_kernel.cpp``, the normalisation is folded into
one multiply-add per element with per-channel ``alpha = gamma * invstd`` and
``shift = beta - mean * alpha``, and backward makes one reduction sweep
(sum dy and sum dy*(x - mean)) followed by one pass writing dx.

Determinism: rows are split into chunks whose size depends only on (M, C),
never on the thread count; each chunk's partial result lands in its own slot
and the slots are merged serially in chunk order.  Results are therefore
bitwise identical for any number of threads.

Statistics and gradient sums accumulate in double for both dtypes: float32
products are exact in double, and the per-chunk moments are taken about the
chunk's first row so the sum of squares does not cancel (merged with Chan's
pairwise formula).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free
from libc.string cimport memset

import numpy as np

from cnet_ext._openmp cimport effective_threads

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef enum:
    # Elements per row chunk (the fixed partition), and a cap on the chunk count
    # so the serial merge stays negligible.
    _CHUNK_ELEMS = 16384
    _MAX_CHUNKS = 512


cdef inline Py_ssize_t _rows_per_chunk(Py_ssize_t M, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t rows = (_CHUNK_ELEMS + C - 1) // C
    if (M + rows - 1) // rows > _MAX_CHUNKS:
        rows = (M + _MAX_CHUNKS - 1) // _MAX_CHUNKS
    return rows if rows > 0 else 1


cdef inline Py_ssize_t _padded(Py_ssize_t C) noexcept nogil:
    # Per-chunk slots start on separate 64-byte lines: no false sharing.
    return (C + 7) & ~(<Py_ssize_t>7)


cdef double* _alloc_slots(Py_ssize_t n) except NULL:
    cdef void* p = NULL
    if posix_memalign(&p, 64, <size_t>(n if n > 0 else 1) * sizeof(double)) != 0:
        raise MemoryError()
    return <double*>p


# -- per-chunk kernels (one thread each, no shared writes) ---------------------
#
# Plain C with restrict pointers and branch-free selects, so gcc vectorises the
# channel loops at the baseline ISA (Cython's generated code kept a branch and
# a conditional load in the fused-ReLU loops, which ran ~10x slower).  One
# macro body, instantiated for float (f) and double (d).

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #define CNET_R __restrict__
    #define CNET_BN_CHUNK_KERNELS(T, IT, SFX)                                           \
    /* g if keep else +0, by a bit mask: a select gcc vectorises even when the     \
       result is widened to double (a ternary there stays a branch). */              \
    static inline T bn_mask_##SFX(T g, int keep) {                                      \
        IT bits;                                                                        \
        memcpy(&bits, &g, sizeof bits);                                                 \
        bits &= -(IT)keep;                                                              \
        memcpy(&g, &bits, sizeof bits);                                                 \
        return g;                                                                       \
    }                                                                                   \
    /* Mean and sum of squared deviations of n rows, taken about the first row. */      \
    static void bn_moments_##SFX(const T* CNET_R x, ptrdiff_t n, ptrdiff_t C,           \
                                 double* CNET_R mean, double* CNET_R m2) {              \
        for (ptrdiff_t c = 0; c < C; c++) { mean[c] = 0.0; m2[c] = 0.0; }               \
        for (ptrdiff_t r = 1; r < n; r++) {                                             \
            const T* CNET_R row = x + r * C;                                            \
            _Pragma("omp simd")                                                         \
            for (ptrdiff_t c = 0; c < C; c++) {                                         \
                double d = (double)row[c] - (double)x[c];                               \
                mean[c] += d;                                                           \
                m2[c] += d * d;                                                         \
            }                                                                           \
        }                                                                               \
        for (ptrdiff_t c = 0; c < C; c++) {                                             \
            double d = mean[c];                                                         \
            mean[c] = (double)x[c] + d / (double)n;                                     \
            m2[c] -= d * d / (double)n;                                                 \
        }                                                                               \
    }                                                                                   \
    /* y = x * alpha + shift per channel, then max(y, 0) when relu. */                  \
    static void bn_affine_##SFX(const T* CNET_R x, T* CNET_R y, ptrdiff_t n,            \
                                ptrdiff_t C, const T* CNET_R alpha,                     \
                                const T* CNET_R shift, int relu) {                      \
        for (ptrdiff_t r = 0; r < n; r++) {                                             \
            const T* CNET_R xr = x + r * C;                                             \
            T* CNET_R yr = y + r * C;                                                   \
            if (relu) {                                                                 \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++) {                                     \
                    T v = xr[c] * alpha[c] + shift[c];                                  \
                    yr[c] = v > (T)0 ? v : (T)0;                                        \
                }                                                                       \
            } else {                                                                    \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++)                                       \
                    yr[c] = xr[c] * alpha[c] + shift[c];                                \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    /* sum(g) and sum(g * (x - mean)) per channel, g = dy masked by the fused ReLU.    \
       The mask is recomputed from x with the forward's expression, so it matches    \
       the forward bit for bit without keeping the output alive. */                  \
    static void bn_grad_sums_##SFX(const T* CNET_R x, const T* CNET_R dy, ptrdiff_t n,  \
                                   ptrdiff_t C, const double* CNET_R mean,              \
                                   const T* CNET_R alpha, const T* CNET_R shift,        \
                                   int relu, double* CNET_R sdy, double* CNET_R sdyx) { \
        for (ptrdiff_t c = 0; c < C; c++) { sdy[c] = 0.0; sdyx[c] = 0.0; }              \
        for (ptrdiff_t r = 0; r < n; r++) {                                             \
            const T* CNET_R xr = x + r * C;                                             \
            const T* CNET_R gr = dy + r * C;                                            \
            if (relu) {                                                                 \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++) {                                     \
                    T v = xr[c] * alpha[c] + shift[c];                                  \
                    double g = (double)bn_mask_##SFX(gr[c], v > (T)0);                  \
                    sdy[c] += g;                                                        \
                    sdyx[c] += g * ((double)xr[c] - mean[c]);                           \
                }                                                                       \
            } else {                                                                    \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++) {                                     \
                    double g = (double)gr[c];                                           \
                    sdy[c] += g;                                                        \
                    sdyx[c] += g * ((double)xr[c] - mean[c]);                           \
                }                                                                       \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    /* dx = a*g + k*(x - mean) + b per channel, g = dy masked by the fused ReLU. */     \
    static void bn_dx_##SFX(const T* CNET_R x, const T* CNET_R dy, T* CNET_R dx,        \
                            ptrdiff_t n, ptrdiff_t C, const T* CNET_R mean,             \
                            const T* CNET_R a, const T* CNET_R k, const T* CNET_R b,    \
                            const T* CNET_R alpha, const T* CNET_R shift, int relu) {   \
        for (ptrdiff_t r = 0; r < n; r++) {                                             \
            const T* CNET_R xr = x + r * C;                                             \
            const T* CNET_R gr = dy + r * C;                                            \
            T* CNET_R dr = dx + r * C;                                                  \
            if (relu) {                                                                 \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++) {                                     \
                    T v = xr[c] * alpha[c] + shift[c];                                  \
                    T g = bn_mask_##SFX(gr[c], v > (T)0);                               \
                    dr[c] = a[c] * g + k[c] * (xr[c] - mean[c]) + b[c];                 \
                }                                                                       \
            } else {                                                                    \
                _Pragma("omp simd")                                                     \
                for (ptrdiff_t c = 0; c < C; c++)                                       \
                    dr[c] = a[c] * gr[c] + k[c] * (xr[c] - mean[c]) + b[c];             \
            }                                                                           \
        }                                                                               \
    }
    CNET_BN_CHUNK_KERNELS(float, int32_t, f)
    CNET_BN_CHUNK_KERNELS(double, int64_t, d)
    """
    void bn_moments_f(const float* x, Py_ssize_t n, Py_ssize_t C, double* mean, double* m2) nogil
    void bn_moments_d(const double* x, Py_ssize_t n, Py_ssize_t C, double* mean, double* m2) nogil
    void bn_affine_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, const float* alpha,
                     const float* shift, int relu) nogil
    void bn_affine_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t C, const double* alpha,
                     const double* shift, int relu) nogil
    void bn_grad_sums_f(const float* x, const float* dy, Py_ssize_t n, Py_ssize_t C,
                        const double* mean, const float* alpha, const float* shift, int relu,
                        double* sdy, double* sdyx) nogil
    void bn_grad_sums_d(const double* x, const double* dy, Py_ssize_t n, Py_ssize_t C,
                        const double* mean, const double* alpha, const double* shift, int relu,
                        double* sdy, double* sdyx) nogil
    void bn_dx_f(const float* x, const float* dy, float* dx, Py_ssize_t n, Py_ssize_t C,
                 const float* mean, const float* a, const float* k, const float* b,
                 const float* alpha, const float* shift, int relu) nogil
    void bn_dx_d(const double* x, const double* dy, double* dx, Py_ssize_t n, Py_ssize_t C,
                 const double* mean, const double* a, const double* k, const double* b,
                 const double* alpha, const double* shift, int relu) nogil


cdef inline void _chunk_moments(const floating* x, Py_ssize_t n, Py_ssize_t C,
                                double* mean, double* m2) noexcept nogil:
    if floating is float:
        bn_moments_f(x, n, C, mean, m2)
    else:
        bn_moments_d(x, n, C, mean, m2)


cdef inline void _chunk_affine(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t C,
                               const floating* alpha, const floating* shift,
                               bint relu) noexcept nogil:
    if floating is float:
        bn_affine_f(x, y, n, C, alpha, shift, relu)
    else:
        bn_affine_d(x, y, n, C, alpha, shift, relu)


cdef inline void _chunk_grad_sums(const floating* x, const floating* dy, Py_ssize_t n,
                                  Py_ssize_t C, const double* mean, const floating* alpha,
                                  const floating* shift, bint relu, double* sdy,
                                  double* sdyx) noexcept nogil:
    if floating is float:
        bn_grad_sums_f(x, dy, n, C, mean, alpha, shift, relu, sdy, sdyx)
    else:
        bn_grad_sums_d(x, dy, n, C, mean, alpha, shift, relu, sdy, sdyx)


cdef inline void _chunk_dx(const floating* x, const floating* dy, floating* dx, Py_ssize_t n,
                           Py_ssize_t C, const floating* mean, const floating* a,
                           const floating* k, const floating* b, const floating* alpha,
                           const floating* shift, bint relu) noexcept nogil:
    if floating is float:
        bn_dx_f(x, dy, dx, n, C, mean, a, k, b, alpha, shift, relu)
    else:
        bn_dx_d(x, dy, dx, n, C, mean, a, k, b, alpha, shift, relu)


# -- validation -----------------------------------------------------------------

def _check_rows(name, a, M, C):
    if a.shape[0] != M or a.shape[1] != C:
        raise ValueError(f"batchnorm kernel: {name} has shape {tuple(a.shape)[:2]}, "
                         f"expected {(M, C)}")


def _check_vec(name, v, C, dtype):
    if v is None:
        return
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"batchnorm kernel: {name} must be a 1-D array of {C} values, got "
                         f"{getattr(v, 'shape', type(v).__name__)}")
    if v.dtype != dtype:
        raise ValueError(f"batchnorm kernel: {name} has dtype {v.dtype}, expected {dtype}")
    if not v.flags.c_contiguous:
        raise ValueError(f"batchnorm kernel: {name} is not contiguous")


cdef inline floating* _ptr(object arr, floating* like) except? NULL:
    """Data pointer of an optional (already validated) 1-D array; NULL for None."""
    cdef floating[::1] view
    if arr is None:
        return NULL
    view = arr
    return &view[0] if view.shape[0] > 0 else NULL


# -- Python-facing kernels ----------------------------------------------------------

def forward_train(floating[:, ::1] x, floating[:, ::1] y, weight, bias, double eps, bint relu,
                  double[::1] save_mean, double[::1] save_invstd,
                  floating[::1] alpha, floating[::1] shift,
                  running_mean, running_var, double momentum, int n_threads):
    """Training forward on rows x (M, C) into y, with batch statistics.

    Writes the batch mean and 1/sqrt(var + eps) (biased variance) into
    ``save_mean`` / ``save_invstd`` (float64) and the folded ``alpha`` /
    ``shift`` for backward.  ``weight`` / ``bias`` may be None (affine=False).
    If ``running_mean`` / ``running_var`` are given they are updated in
    place: running = (1 - momentum) * running + momentum * batch, with the
    unbiased batch variance in ``running_var``.
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("y", y, M, C)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, v, C, dtype)
    if save_mean.shape[0] != C or save_invstd.shape[0] != C or alpha.shape[0] != C \
            or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: save_mean/save_invstd/alpha/shift must have {C} "
                         "values")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batchnorm kernel: give both running_mean and running_var or neither")
    if M < 2:
        raise ValueError(f"batchnorm: expected more than 1 value per channel when training, "
                         f"got {M} rows of {C} channels")
    if C == 0:
        return
    cdef floating* w = _ptr(weight, <floating*>NULL)
    cdef floating* b = _ptr(bias, <floating*>NULL)
    cdef floating* rm = _ptr(running_mean, <floating*>NULL)
    cdef floating* rv = _ptr(running_var, <floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef Py_ssize_t Cp = _padded(C)
    cdef int nt = effective_threads(M * C, n_threads)
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef double* slots = _alloc_slots(2 * nchunks * Cp)
    cdef Py_ssize_t j, r0, c
    cdef double na, nb, delta, var, mu, inv, al
    try:
        with nogil:
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_moments(xp + r0 * C, (M - r0) if M - r0 < rows else rows, C,
                               slots + 2 * j * Cp, slots + (2 * j + 1) * Cp)
            # Merge chunk moments serially, in chunk order (Chan et al.).
            for j in range(1, nchunks):
                na = <double>(j * rows)
                nb = <double>((M - j * rows) if M - j * rows < rows else rows)
                for c in range(C):
                    delta = slots[2 * j * Cp + c] - slots[c]
                    slots[c] = slots[c] + delta * (nb / (na + nb))
                    slots[Cp + c] = (slots[Cp + c] + slots[(2 * j + 1) * Cp + c]
                                     + delta * delta * (na * nb / (na + nb)))
            for c in range(C):
                mu = slots[c]
                var = slots[Cp + c] / M
                if var < 0:
                    var = 0
                inv = 1.0 / sqrt(var + eps)
                save_mean[c] = mu
                save_invstd[c] = inv
                al = inv * w[c] if w != NULL else inv
                alpha[c] = <floating>al
                shift[c] = <floating>((b[c] if b != NULL else 0.0) - mu * al)
                if rm != NULL:
                    rm[c] = <floating>((1.0 - momentum) * rm[c] + momentum * mu)
                    rv[c] = <floating>((1.0 - momentum) * rv[c]
                                       + momentum * (slots[Cp + c] / (M - 1)))
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_affine(xp + r0 * C, yp + r0 * C, (M - r0) if M - r0 < rows else rows,
                              C, &alpha[0], &shift[0], relu)
    finally:
        free(slots)


def forward_eval(floating[:, ::1] x, floating[:, ::1] y, weight, bias, running_mean,
                 running_var, double eps, bint relu, floating[::1] alpha, floating[::1] shift,
                 int n_threads):
    """Eval forward with the running statistics (alpha/shift are scratch outputs)."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("y", y, M, C)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, v, C, dtype)
    if running_mean is None or running_var is None:
        raise ValueError("batchnorm kernel: eval forward needs running_mean and running_var")
    if alpha.shape[0] != C or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: alpha/shift must have {C} values")
    if C == 0 or M == 0:
        return
    cdef floating* w = _ptr(weight, <floating*>NULL)
    cdef floating* b = _ptr(bias, <floating*>NULL)
    cdef floating* rm = _ptr(running_mean, <floating*>NULL)
    cdef floating* rv = _ptr(running_var, <floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef int nt = effective_threads(M * C, n_threads)
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef Py_ssize_t j, r0, c
    cdef double al
    with nogil:
        for c in range(C):
            al = 1.0 / sqrt(<double>rv[c] + eps)
            if w != NULL:
                al = al * w[c]
            alpha[c] = <floating>al
            shift[c] = <floating>((b[c] if b != NULL else 0.0) - rm[c] * al)
        for j in prange(nchunks, schedule="static", num_threads=nt):
            r0 = j * rows
            _chunk_affine(xp + r0 * C, yp + r0 * C, (M - r0) if M - r0 < rows else rows,
                          C, &alpha[0], &shift[0], relu)


def backward(floating[:, ::1] x, floating[:, ::1] dy, floating[:, ::1] dx, weight,
             weight_grad, bias_grad, double[::1] save_mean, double[::1] save_invstd,
             floating[::1] alpha, floating[::1] shift, bint relu, int n_threads):
    """Training backward: dx (written), dgamma/dbeta (accumulated with +=).

    ``x`` is the forward input, ``save_*`` / ``alpha`` / ``shift`` what
    forward_train wrote.  With g = dy (masked by the fused ReLU) and
    xhat = (x - mean) * invstd:
        dbeta = sum g,  dgamma = sum g * xhat,
        dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)).
    ``weight`` / the grads may be None (affine=False).
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("dy", dy, M, C)
    _check_rows("dx", dx, M, C)
    for name, v in (("weight", weight), ("weight_grad", weight_grad), ("bias_grad", bias_grad)):
        _check_vec(name, v, C, dtype)
    if save_mean.shape[0] != C or save_invstd.shape[0] != C or alpha.shape[0] != C \
            or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: save_mean/save_invstd/alpha/shift must have {C} "
                         "values")
    if C == 0 or M == 0:
        return
    cdef floating* w = _ptr(weight, <floating*>NULL)
    cdef floating* gw = _ptr(weight_grad, <floating*>NULL)
    cdef floating* gb = _ptr(bias_grad, <floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef Py_ssize_t Cp = _padded(C)
    cdef int nt = effective_threads(M * C, n_threads)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    cdef floating* dxp = &dx[0, 0]
    # slots: per-chunk sums, then 4 per-channel coefficient rows in the dtype.
    cdef double* slots = _alloc_slots(2 * nchunks * Cp + 4 * Cp)
    cdef floating* coef = <floating*>(slots + 2 * nchunks * Cp)
    cdef Py_ssize_t j, r0, c
    cdef double sdy, sdyx, inv, a, k
    try:
        with nogil:
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_grad_sums(xp + r0 * C, dyp + r0 * C, (M - r0) if M - r0 < rows else rows,
                                 C, &save_mean[0], &alpha[0], &shift[0], relu,
                                 slots + 2 * j * Cp, slots + (2 * j + 1) * Cp)
            for j in range(1, nchunks):
                for c in range(C):
                    slots[c] += slots[2 * j * Cp + c]
                    slots[Cp + c] += slots[(2 * j + 1) * Cp + c]
            for c in range(C):
                sdy = slots[c]
                sdyx = slots[Cp + c]
                inv = save_invstd[c]
                a = inv * w[c] if w != NULL else inv
                k = -a * inv * inv * sdyx / M
                if gw != NULL:
                    gw[c] = <floating>(gw[c] + sdyx * inv)
                if gb != NULL:
                    gb[c] = <floating>(gb[c] + sdy)
                coef[c] = <floating>save_mean[c]
                coef[Cp + c] = <floating>a
                coef[2 * Cp + c] = <floating>k
                coef[3 * Cp + c] = <floating>(-a * sdy / M)
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_dx(xp + r0 * C, dyp + r0 * C, dxp + r0 * C,
                          (M - r0) if M - r0 < rows else rows, C, coef, coef + Cp,
                          coef + 2 * Cp, coef + 3 * Cp, &alpha[0], &shift[0], relu)
    finally:
        free(slots)
