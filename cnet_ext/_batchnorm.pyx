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

Statistics and gradient sums are summed in the dtype over blocks of 8 rows and
in double across blocks, so float32 runs at float32 SIMD width yet its totals
are double-accurate.  The per-chunk moments are taken about the chunk's first
row so the sum of squares does not cancel, and chunks are merged with Chan's
pairwise formula.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free

import numpy as np

from cnet_ext._openmp cimport effective_threads, cnet_min_elements_per_thread
from cnet_ext._bn_shared cimport (BN_PAD, BN_SLOT, bn_dx_d, bn_dx_f, bn_slot_moments_d,
                                   bn_slot_moments_f)

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
    return BN_PAD(C)


cdef double* _alloc_slots(Py_ssize_t n) except NULL:
    cdef void* p = NULL
    if posix_memalign(&p, 64, <size_t>(n if n > 0 else 1) * sizeof(double)) != 0:
        raise MemoryError()
    return <double*>p


# -- per-chunk kernels (one thread each, no shared writes) ---------------------
#
# Plain C with restrict pointers, branch-free selects and, for few channels,
# explicit vectors, so the loops vectorise at the baseline ISA (Cython's
# generated code kept a branch and a conditional load in the fused-ReLU loops,
# which ran ~10x slower).  One macro body, instantiated for float and double.

cdef extern from *:
    """
    #include "_bn_shared_impl.h"
    /* The other per-chunk kernels, one body for float (f) and double (d): IVT is
       VT's same-width integer vector (_bn_shared_impl.h has the rest). */
    #define CNET_BN_CHUNK_KERNELS(T, VT, IVT, L, SFX)                                           \
    /* y = x * alpha + shift per channel, then ReLU when relu: NaN passes (v < 0 is             \
       false), as torch.relu and cnet's ReLU; a compare and a mask, as v > 0 was. */           \
    CNET_CLONES static void bn_affine_##SFX(const T* CNET_R x, T* CNET_R y, ptrdiff_t n, ptrdiff_t C,       \
                                const T* CNET_R alpha, const T* CNET_R shift, int relu) {       \
        for (ptrdiff_t r = 0; r < n; r++) {                                                     \
            const T* CNET_R xr = x + r * C;                                                     \
            T* CNET_R yr = y + r * C;                                                           \
            cnet_prefetch_ahead(xr, C * sizeof(T));                                             \
            if (relu) {                                                                         \
                for (ptrdiff_t c = 0; c < C; c++) {                                             \
                    T v = xr[c] * alpha[c] + shift[c];                                          \
                    yr[c] = v < (T)0 ? (T)0 : v;                                                \
                }                                                                               \
            } else {                                                                            \
                for (ptrdiff_t c = 0; c < C; c++)                                               \
                    yr[c] = xr[c] * alpha[c] + shift[c];                                        \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    /* The same with a residual s (a residual block's shortcut) added before the                \
       ReLU: y = relu?(x * alpha + shift + s), the batch norm's output rounded, then            \
       the add's, as the two passes round.  Its own function: a residual test in                \
       bn_affine's row loop cost the plain forward ~8% (128x32x32x16). */                       \
    CNET_CLONES static void bn_affine_add_##SFX(const T* CNET_R x, T* CNET_R y, ptrdiff_t n,    \
                                    ptrdiff_t C, const T* CNET_R alpha, const T* CNET_R shift,  \
                                    int relu, const T* CNET_R s) {                              \
        for (ptrdiff_t r = 0; r < n; r++) {                                                     \
            const T* CNET_R xr = x + r * C;                                                     \
            const T* CNET_R sr = s + r * C;                                                     \
            T* CNET_R yr = y + r * C;                                                           \
            cnet_prefetch_ahead(xr, C * sizeof(T));                                             \
            cnet_prefetch_ahead(sr, C * sizeof(T));                                             \
            if (relu) {                                                                         \
                for (ptrdiff_t c = 0; c < C; c++) {                                             \
                    T v = xr[c] * alpha[c] + shift[c];                                          \
                    v = v + sr[c];                                                              \
                    yr[c] = v < (T)0 ? (T)0 : v;                                                \
                }                                                                               \
            } else {                                                                            \
                for (ptrdiff_t c = 0; c < C; c++) {                                             \
                    T v = xr[c] * alpha[c] + shift[c];                                          \
                    yr[c] = v + sr[c];                                                          \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    /* sum(g) and sum(g * (x - mean)) per channel, g = dy masked by the fused ReLU;             \
       mean in T (the caller corrects for its rounding); blocked like bn_moments.               \
       The mask is recomputed from x with the forward's expression, so it matches               \
       the forward bit for bit without keeping the output alive; it drops g where               \
       v <= 0 (torch's threshold_backward), so a NaN output passes its gradient. */             \
    CNET_CLONES static void bn_grad_sums_##SFX(const T* CNET_R x, const T* CNET_R dy, ptrdiff_t n,          \
                                   ptrdiff_t C, const T* CNET_R mean, const T* CNET_R alpha,    \
                                   const T* CNET_R shift, int relu, double* CNET_R sdy,         \
                                   double* CNET_R sdyx, T* CNET_R scratch) {                    \
        for (ptrdiff_t c = 0; c < C; c++) { sdy[c] = 0.0; sdyx[c] = 0.0; }                      \
        if (C % BN_W == 0 && C <= BN_REG_C) {                                                   \
            for (ptrdiff_t c0 = 0; c0 < C; c0 += BN_W) {                                        \
                VT mu[BN_W / L], al[BN_W / L], sh[BN_W / L];                                    \
                for (int i = 0; i < BN_W / L; i++) {                                            \
                    mu[i] = bn_ld_##SFX(mean + c0 + i * L);                                     \
                    al[i] = bn_ld_##SFX(alpha + c0 + i * L);                                    \
                    sh[i] = bn_ld_##SFX(shift + c0 + i * L);                                    \
                }                                                                               \
                for (ptrdiff_t r0 = 0; r0 < n; r0 += BN_BLOCK) {                                \
                    ptrdiff_t r1 = r0 + BN_BLOCK < n ? r0 + BN_BLOCK : n;                       \
                    VT b1[BN_W / L] = {0}, b2[BN_W / L] = {0};                                  \
                    T t1[BN_W], t2[BN_W];                                                       \
                    for (ptrdiff_t r = r0; r < r1; r++) {                                       \
                        if (c0 == 0) {  /* the later columns find the chunk in cache */         \
                            cnet_prefetch_ahead(x + r * C, C * sizeof(T));                      \
                            cnet_prefetch_ahead(dy + r * C, C * sizeof(T));                     \
                        }                                                                       \
                        for (int i = 0; i < BN_W / L; i++) {                                    \
                            VT xv = bn_ld_##SFX(x + r * C + c0 + i * L);                        \
                            VT g = bn_ld_##SFX(dy + r * C + c0 + i * L);                        \
                            if (relu) g = (VT)((IVT)g & ~(IVT)(xv * al[i] + sh[i] <= (T)0));    \
                            b1[i] += g;                                                         \
                            b2[i] += g * (xv - mu[i]);                                          \
                        }                                                                       \
                    }                                                                           \
                    memcpy(t1, b1, sizeof t1);                                                  \
                    memcpy(t2, b2, sizeof t2);                                                  \
                    for (int w = 0; w < BN_W; w++) { sdy[c0 + w] += t1[w]; sdyx[c0 + w] += t2[w]; }\
                }                                                                               \
            }                                                                                   \
        } else {                                                                                \
            T* CNET_R b1 = scratch;                                                             \
            T* CNET_R b2 = scratch + C;                                                         \
            for (ptrdiff_t r0 = 0; r0 < n; r0 += BN_BLOCK) {                                    \
                ptrdiff_t r1 = r0 + BN_BLOCK < n ? r0 + BN_BLOCK : n;                           \
                for (ptrdiff_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }                     \
                for (ptrdiff_t r = r0; r < r1; r++) {                                           \
                    const T* CNET_R xr = x + r * C;                                             \
                    const T* CNET_R gr = dy + r * C;                                            \
                    cnet_prefetch_ahead(xr, C * sizeof(T));                                     \
                    cnet_prefetch_ahead(gr, C * sizeof(T));                                     \
                    if (relu) {                                                                 \
                        for (ptrdiff_t c = 0; c < C; c++) {                                     \
                            T v = xr[c] * alpha[c] + shift[c];                                  \
                            T g = cnet_keep(gr[c], !(v <= (T)0));                               \
                            b1[c] += g;                                                         \
                            b2[c] += g * (xr[c] - mean[c]);                                     \
                        }                                                                       \
                    } else {                                                                    \
                        for (ptrdiff_t c = 0; c < C; c++) {                                     \
                            b1[c] += gr[c];                                                     \
                            b2[c] += gr[c] * (xr[c] - mean[c]);                                 \
                        }                                                                       \
                    }                                                                           \
                }                                                                               \
                for (ptrdiff_t c = 0; c < C; c++) { sdy[c] += b1[c]; sdyx[c] += b2[c]; }        \
            }                                                                                   \
        }                                                                                       \
    }
    CNET_BN_CHUNK_KERNELS(float, bn_vf, bn_vif, 4, f)
    CNET_BN_CHUNK_KERNELS(double, bn_vd, bn_vid, 2, d)
    """
    void bn_affine_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, const float* alpha,
                     const float* shift, int relu) nogil
    void bn_affine_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t C, const double* alpha,
                     const double* shift, int relu) nogil
    void bn_affine_add_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t C,
                         const float* alpha, const float* shift, int relu, const float* s) nogil
    void bn_affine_add_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t C,
                         const double* alpha, const double* shift, int relu,
                         const double* s) nogil
    void bn_grad_sums_f(const float* x, const float* dy, Py_ssize_t n, Py_ssize_t C,
                        const float* mean, const float* alpha, const float* shift, int relu,
                        double* sdy, double* sdyx, float* scratch) nogil
    void bn_grad_sums_d(const double* x, const double* dy, Py_ssize_t n, Py_ssize_t C,
                        const double* mean, const double* alpha, const double* shift, int relu,
                        double* sdy, double* sdyx, double* scratch) nogil


cdef inline void _chunk_moments(const floating* x, Py_ssize_t n, Py_ssize_t C,
                                double* slot) noexcept nogil:
    if floating is float:
        bn_slot_moments_f(x, n, C, slot)
    else:
        bn_slot_moments_d(x, n, C, slot)


cdef inline void _chunk_affine(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t C,
                               const floating* alpha, const floating* shift,
                               bint relu, const floating* s) noexcept nogil:
    if s != NULL:
        if floating is float:
            bn_affine_add_f(x, y, n, C, alpha, shift, relu, s)
        else:
            bn_affine_add_d(x, y, n, C, alpha, shift, relu, s)
    elif floating is float:
        bn_affine_f(x, y, n, C, alpha, shift, relu)
    else:
        bn_affine_d(x, y, n, C, alpha, shift, relu)


cdef inline void _chunk_grad_sums(const floating* x, const floating* dy, Py_ssize_t n,
                                  Py_ssize_t C, const floating* mean, const floating* alpha,
                                  const floating* shift, bint relu, double* sdy,
                                  double* sdyx, floating* scratch) noexcept nogil:
    if floating is float:
        bn_grad_sums_f(x, dy, n, C, mean, alpha, shift, relu, sdy, sdyx, scratch)
    else:
        bn_grad_sums_d(x, dy, n, C, mean, alpha, shift, relu, sdy, sdyx, scratch)


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


cdef inline const floating* _cptr(object arr, const floating* like) except? NULL:
    """Read-only data pointer of an optional (already validated) 1-D array."""
    cdef const floating[::1] view
    if arr is None:
        return NULL
    view = arr
    return &view[0] if view.shape[0] > 0 else NULL


cdef inline const floating* _residual_rows(object residual, Py_ssize_t M, Py_ssize_t C,
                                           floating* like) except? NULL:
    """Data pointer of an optional residual operand of M x C rows (checked); NULL for None."""
    cdef const floating[:, ::1] view
    if residual is None:
        return NULL
    try:
        view = residual
    except (ValueError, TypeError):
        raise ValueError(f"batchnorm kernel: residual must be C-contiguous rows of the "
                         f"input's dtype, got {getattr(residual, 'dtype', type(residual).__name__)} "
                         f"{getattr(residual, 'shape', '')}")
    _check_rows("residual", view, M, C)
    return &view[0, 0] if M and C else NULL


# -- Python-facing kernels ----------------------------------------------------------

def moment_slots(Py_ssize_t pieces, Py_ssize_t C):
    """Empty (slots, counts) for the moments of ``pieces`` pieces of rows of C channels,
    as a convolution fills them for forward_train's ``moments``: slots float64
    (pieces, 4 * pad8(C)) with a piece's mean at [0:C] and its sum of squared
    deviations at [pad8(C):pad8(C) + C] (the rest is its scratch), counts (pieces,)
    its rows."""
    return np.empty((pieces, BN_SLOT(C))), np.zeros(pieces, np.intp)


def rows_moments(const floating[:, ::1] rows, double[:, ::1] slots, Py_ssize_t[::1] counts,
                 Py_ssize_t piece):
    """Moments of ``rows`` (n, C) into piece ``piece`` of moment_slots(., C)."""
    cdef Py_ssize_t n = rows.shape[0], C = rows.shape[1]
    if slots.shape[1] != BN_SLOT(C) or not 0 <= piece < slots.shape[0] \
            or counts.shape[0] != slots.shape[0]:
        raise ValueError(f"rows_moments: piece {piece} of slots {tuple(slots.shape)[:2]} / "
                         f"counts ({counts.shape[0]},) is not a moment_slots(., {C}) piece")
    if n == 0 or C == 0:
        raise ValueError(f"rows_moments: no rows ({n} of {C} channels)")
    with nogil:
        _chunk_moments(&rows[0, 0], n, C, &slots[piece, 0])
    counts[piece] = n


def forward_train(const floating[:, ::1] x, floating[:, ::1] y, weight, bias, double eps, bint relu,
                  double[::1] save_mean, double[::1] save_invstd,
                  floating[::1] alpha, floating[::1] shift,
                  running_mean, running_var, double momentum, int n_threads, residual=None,
                  moments=None):
    """Training forward on rows x (M, C) into y, with batch statistics.

    Writes the batch mean and 1/sqrt(var + eps) (biased variance) into
    ``save_mean`` / ``save_invstd`` (float64) and the folded ``alpha`` /
    ``shift`` for backward.  ``weight`` / ``bias`` may be None (affine=False).
    If ``running_mean`` / ``running_var`` are given they are updated in
    place: running = (1 - momentum) * running + momentum * batch, with the
    unbiased batch variance in ``running_var``.  With ``residual`` (rows like x, not
    y itself): y = x normalised + residual, then the ReLU if relu (a residual join).
    ``moments``: (slots, counts) of moment_slots(., C) covering x's rows in order,
    as the convolution that wrote x took them from each piece of its output while
    in cache (conv_direct, gemm_packed): then this pass does not read x for them.
    The pieces are merged in order into slots' first row.
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("y", y, M, C)
    cdef const floating* sp = _residual_rows(residual, M, C, &y[0, 0] if M and C else NULL)
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
    cdef const floating* w = _cptr(weight, <const floating*>NULL)
    cdef const floating* b = _cptr(bias, <const floating*>NULL)
    cdef floating* rm = _ptr(running_mean, <floating*>NULL)
    cdef floating* rv = _ptr(running_var, <floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef Py_ssize_t Cp = _padded(C)
    cdef int nt = effective_threads(M * C, n_threads, cnet_min_elements_per_thread())
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    # Per chunk: first moment, second moment, 2*C scratch values in the dtype.
    cdef Py_ssize_t S = BN_SLOT(C)
    cdef double* slots
    cdef double[:, ::1] given
    cdef Py_ssize_t[::1] counts
    cdef Py_ssize_t j, r0, c
    cdef double na, nb, delta, var, mu, inv, al
    if moments is not None:
        given, counts = _given_moments(moments, M, C)
        slots = &given[0, 0]
        nchunks = given.shape[0]
    else:
        counts = np.full(nchunks, rows, np.intp)
        counts[nchunks - 1] = M - (nchunks - 1) * rows
        slots = _alloc_slots(nchunks * S)
    try:
        with nogil:
            if moments is None:
                for j in prange(nchunks, schedule="static", num_threads=nt):
                    r0 = j * rows
                    _chunk_moments(xp + r0 * C, counts[j], C, slots + j * S)
            # Merge chunk moments serially, in chunk order (Chan et al.).
            na = <double>counts[0]
            for j in range(1, nchunks):
                nb = <double>counts[j]
                for c in range(C):
                    delta = slots[j * S + c] - slots[c]
                    slots[c] = slots[c] + delta * (nb / (na + nb))
                    slots[Cp + c] = (slots[Cp + c] + slots[j * S + Cp + c]
                                     + delta * delta * (na * nb / (na + nb)))
                na = na + nb
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
            for j in prange((M + rows - 1) // rows, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_affine(xp + r0 * C, yp + r0 * C, (M - r0) if M - r0 < rows else rows,
                              C, &alpha[0], &shift[0], relu, (sp + r0 * C) if sp else NULL)
    finally:
        if moments is None:
            free(slots)


def check_moments(moments, Py_ssize_t C, Py_ssize_t pieces=-1, str what="batchnorm kernel"):
    """``moments`` = (slots, counts) as moment_slots(pieces, C) makes them (any number
    of pieces where ``pieces`` < 0), checked; returns them."""
    try:
        slots, counts = moments
    except (TypeError, ValueError):
        raise ValueError(f"{what}: moments must be (slots, counts) from moment_slots")
    if (not isinstance(slots, np.ndarray) or slots.dtype != np.float64 or slots.ndim != 2
            or slots.shape[1] != BN_SLOT(C) or slots.shape[0] < 1
            or (pieces >= 0 and slots.shape[0] != pieces) or not slots.flags.c_contiguous
            or not isinstance(counts, np.ndarray) or counts.dtype != np.intp
            or counts.shape != (slots.shape[0],) or not counts.flags.c_contiguous):
        raise ValueError(f"{what}: moments must be moment_slots("
                         f"{pieces if pieces >= 0 else 'pieces'}, {C}), got slots "
                         f"{getattr(slots, 'dtype', '')} "
                         f"{getattr(slots, 'shape', type(slots).__name__)} and counts "
                         f"{getattr(counts, 'dtype', '')} "
                         f"{getattr(counts, 'shape', type(counts).__name__)}")
    return slots, counts


def _given_moments(moments, Py_ssize_t M, Py_ssize_t C):
    """forward_train's ``moments`` (slots, counts), checked against x's M rows of C."""
    slots, counts = check_moments(moments, C)
    # a loop, not numpy's reductions: tens of microseconds each between a step's kernels
    cdef const Py_ssize_t[::1] cv = counts
    cdef Py_ssize_t total = 0, i
    cdef bint empty = False
    for i in range(cv.shape[0]):
        total += cv[i]
        empty = empty or cv[i] <= 0
    if empty or total != M:
        raise ValueError(f"batchnorm kernel: the moments' pieces cover {int(counts.sum())} "
                         f"rows ({slots.shape[0]} pieces, each at least one row), the input "
                         f"has {M}")
    return slots, counts


def forward_eval(const floating[:, ::1] x, floating[:, ::1] y, weight, bias, running_mean,
                 running_var, double eps, bint relu, floating[::1] alpha, floating[::1] shift,
                 int n_threads, residual=None):
    """Eval forward with the running statistics (alpha/shift are scratch outputs);
    ``residual`` as in forward_train."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("y", y, M, C)
    cdef const floating* sp = _residual_rows(residual, M, C, &y[0, 0] if M and C else NULL)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, v, C, dtype)
    if running_mean is None or running_var is None:
        raise ValueError("batchnorm kernel: eval forward needs running_mean and running_var")
    if alpha.shape[0] != C or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: alpha/shift must have {C} values")
    if C == 0 or M == 0:
        return
    cdef const floating* w = _cptr(weight, <const floating*>NULL)
    cdef const floating* b = _cptr(bias, <const floating*>NULL)
    cdef const floating* rm = _cptr(running_mean, <const floating*>NULL)
    cdef const floating* rv = _cptr(running_var, <const floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef int nt = effective_threads(M * C, n_threads, cnet_min_elements_per_thread())
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
                          C, &alpha[0], &shift[0], relu, (sp + r0 * C) if sp else NULL)


def grad_coefficients(Py_ssize_t C, dtype):
    """An empty (4, pad8(C)) array for backward_coefficients: per channel the
    forward's mean rounded to the dtype, then a, k and b of dx = a*g + k*(x - mean) + b."""
    return np.empty((4, BN_PAD(C)), dtype)


def backward(const floating[:, ::1] x, const floating[:, ::1] dy, floating[:, ::1] dx, weight,
             weight_grad, bias_grad, const double[::1] save_mean,
             const double[::1] save_invstd, const floating[::1] alpha,
             const floating[::1] shift, bint relu, int n_threads):
    """Training backward: dx (written), dgamma/dbeta (accumulated with +=).

    ``x`` is the forward input, ``save_*`` / ``alpha`` / ``shift`` what
    forward_train wrote.  With g = dy (masked by the fused ReLU) and
    xhat = (x - mean) * invstd:
        dbeta = sum g,  dgamma = sum g * xhat,
        dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)).
    ``weight`` / the grads may be None (affine=False).  The same as
    backward_coefficients followed by backward_dx over all rows.
    """
    _check_rows("dx", dx, x.shape[0], x.shape[1])
    coef = grad_coefficients(x.shape[1], np.float32 if floating is float else np.float64)
    backward_coefficients(x, dy, weight, weight_grad, bias_grad, save_mean, save_invstd,
                          alpha, shift, relu, n_threads, coef)
    backward_dx(x, dy, dx, coef, alpha, shift, relu, n_threads)


def backward_coefficients(const floating[:, ::1] x, const floating[:, ::1] dy, weight,
                          weight_grad, bias_grad, const double[::1] save_mean,
                          const double[::1] save_invstd, const floating[::1] alpha,
                          const floating[::1] shift, bint relu, int n_threads,
                          floating[:, ::1] coef):
    """The training backward's reduction sweep (see backward): dgamma/dbeta
    accumulated with +=, and ``coef`` (grad_coefficients) filled for backward_dx,
    which may then write dx a block of rows at a time (a 1x1 convolution's
    backward makes each chunk of its output gradient so, while in cache)."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    dtype = np.float32 if floating is float else np.float64
    _check_rows("dy", dy, M, C)
    for name, v in (("weight", weight), ("weight_grad", weight_grad), ("bias_grad", bias_grad)):
        _check_vec(name, v, C, dtype)
    if save_mean.shape[0] != C or save_invstd.shape[0] != C or alpha.shape[0] != C \
            or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: save_mean/save_invstd/alpha/shift must have {C} "
                         "values")
    cdef Py_ssize_t Cp = _padded(C)
    if coef.shape[0] != 4 or coef.shape[1] != Cp:
        raise ValueError(f"batchnorm kernel: coef has shape {tuple(coef.shape)[:2]}, expected "
                         f"{(4, Cp)} (grad_coefficients)")
    if C == 0 or M == 0:
        return
    cdef const floating* w = _cptr(weight, <const floating*>NULL)
    cdef floating* gw = _ptr(weight_grad, <floating*>NULL)
    cdef floating* gb = _ptr(bias_grad, <floating*>NULL)
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef int nt = effective_threads(M * C, n_threads, cnet_min_elements_per_thread())
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    cdef floating* cp = &coef[0, 0]
    # slots: per chunk sum(g), sum(g * (x - mean)) and 2*C scratch values in the dtype
    cdef Py_ssize_t S = 4 * Cp
    cdef double* slots = _alloc_slots(nchunks * S)
    cdef Py_ssize_t j, r0, c
    cdef double sdy, sdyx, inv, a
    try:
        with nogil:
            for c in range(C):
                cp[c] = <floating>save_mean[c]
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_grad_sums(xp + r0 * C, dyp + r0 * C, (M - r0) if M - r0 < rows else rows,
                                 C, cp, &alpha[0], &shift[0], relu,
                                 slots + j * S, slots + j * S + Cp,
                                 <floating*>(slots + j * S + 2 * Cp))
            for j in range(1, nchunks):
                for c in range(C):
                    slots[c] += slots[j * S + c]
                    slots[Cp + c] += slots[j * S + Cp + c]
            for c in range(C):
                sdy = slots[c]
                # sum g*(x - mean) from the sums about the rounded mean: exact identity.
                sdyx = slots[Cp + c] + (<double>cp[c] - save_mean[c]) * sdy
                inv = save_invstd[c]
                a = inv * w[c] if w != NULL else inv
                if gw != NULL:
                    gw[c] = <floating>(gw[c] + sdyx * inv)
                if gb != NULL:
                    gb[c] = <floating>(gb[c] + sdy)
                cp[Cp + c] = <floating>a
                cp[2 * Cp + c] = <floating>(-a * inv * inv * sdyx / M)
                cp[3 * Cp + c] = <floating>(-a * sdy / M)
    finally:
        free(slots)


def backward_dx(const floating[:, ::1] x, const floating[:, ::1] dy, floating[:, ::1] dx,
                const floating[:, ::1] coef, const floating[::1] alpha,
                const floating[::1] shift, bint relu, int n_threads):
    """dx = a*g + k*(x - mean) + b for rows x, dy (g = dy masked by the fused ReLU),
    with coef from backward_coefficients over the whole batch: any block of the
    batch's rows (x, dy and dx the same block)."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    _check_rows("dy", dy, M, C)
    _check_rows("dx", dx, M, C)
    cdef Py_ssize_t Cp = _padded(C)
    if coef.shape[0] != 4 or coef.shape[1] != Cp or alpha.shape[0] != C or shift.shape[0] != C:
        raise ValueError(f"batchnorm kernel: coef {tuple(coef.shape)[:2]} / alpha / shift do "
                         f"not fit {C} channels (grad_coefficients)")
    if C == 0 or M == 0:
        return
    cdef Py_ssize_t rows = _rows_per_chunk(M, C)
    cdef Py_ssize_t nchunks = (M + rows - 1) // rows
    cdef int nt = effective_threads(M * C, n_threads, cnet_min_elements_per_thread())
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    cdef floating* dxp = &dx[0, 0]
    cdef const floating* cp = &coef[0, 0]
    cdef Py_ssize_t j, r0
    with nogil:
        if nt <= 1:
            _chunk_dx(xp, dyp, dxp, M, C, cp, cp + Cp, cp + 2 * Cp, cp + 3 * Cp,
                      &alpha[0], &shift[0], relu)
        else:
            for j in prange(nchunks, schedule="static", num_threads=nt):
                r0 = j * rows
                _chunk_dx(xp + r0 * C, dyp + r0 * C, dxp + r0 * C,
                          (M - r0) if M - r0 < rows else rows, C, cp, cp + Cp,
                          cp + 2 * Cp, cp + 3 * Cp, &alpha[0], &shift[0], relu)
