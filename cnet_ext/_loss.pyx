# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused softmax cross-entropy (with label smoothing), forward and backward.

Per row of logits z (C classes), with lse = max(z) + log(sum(exp(z - max(z)))):
    loss = (1 - eps) * (lse - z[y]) + eps * (lse - mean(z))
which is torch's ``(1 - eps) * nll + eps / C * sum(-log_softmax)``.  Forward
stores the softmax probabilities; backward is
    dL/dz = coef * (p - (1 - eps) * onehot(y) - eps / C).

Row losses are summed per fixed row chunk and the chunks in order, so the
result does not depend on the thread count.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport log
from libc.stdlib cimport free, malloc

from cnet_ext._openmp cimport effective_threads

cdef enum:
    _CHUNK_ROWS = 32

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    /* exp(x) for x <= 0 (softmax after subtracting the row max) on 4 floats at a
       time with GCC/Clang vector extensions: libm's expf is a scalar call and
       dominated the kernel, and gcc would not vectorise this body by itself.
       Cephes' expf polynomial: relative error within about 1 ulp on [-87.3, 0];
       below that the result is 0 (exp underflows there anyway).  NaN rows are
       handled by the caller. */
    typedef float cnet_v4f __attribute__((vector_size(16)));
    typedef int32_t cnet_v4i __attribute__((vector_size(16)));
    typedef uint32_t cnet_v4u __attribute__((vector_size(16)));
    static inline cnet_v4f cnet_exp4_nonpos(cnet_v4f x) {
        const cnet_v4f lo = {-87.3f, -87.3f, -87.3f, -87.3f};
        cnet_v4i keep = x >= lo;                          /* all ones where x >= -87.3 */
        cnet_v4f xc = (cnet_v4f)(((cnet_v4i)x & keep) | ((cnet_v4i)lo & ~keep));
        cnet_v4f k = xc * 1.44269504088896341f + 12582912.0f;  /* 1.5*2^23 + rint(x/ln2) */
        cnet_v4f n = k - 12582912.0f;
        cnet_v4f r = xc - n * 0.693359375f;               /* ln2, hi part */
        r = r - n * -2.12194440e-4f;                      /* ln2, lo part */
        cnet_v4f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        /* 2^n from k's low mantissa bits, zeroed below -87.3 */
        cnet_v4u bits = (((cnet_v4u)k - 0x4B400000u + 127u) << 23) & (cnet_v4u)keep;
        return p * (cnet_v4f)bits;
    }
    typedef double cnet_v4d __attribute__((vector_size(32)));
    static inline double cnet_hsum4d(cnet_v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }
    /* Row max and sum (double) of z, four lanes at a time (a scalar running sum
       is one long latency chain). */
    static void cnet_row_stats_f(const float* z, ptrdiff_t C, float* max_out, double* sum_out) {
        cnet_v4f vm = {z[0], z[0], z[0], z[0]};
        cnet_v4d acc = {0.0, 0.0, 0.0, 0.0};
        ptrdiff_t c = 0;
        for (; c + 4 <= C; c += 4) {
            cnet_v4f v;
            memcpy(&v, z + c, sizeof v);
            cnet_v4i gt = v > vm;
            vm = (cnet_v4f)(((cnet_v4i)v & gt) | ((cnet_v4i)vm & ~gt));
            acc += __builtin_convertvector(v, cnet_v4d);
        }
        float m = vm[0];
        for (int i = 1; i < 4; i++) m = vm[i] > m ? vm[i] : m;
        double s = cnet_hsum4d(acc);
        for (; c < C; c++) { m = z[c] > m ? z[c] : m; s += z[c]; }
        *max_out = m;
        *sum_out = s;
    }
    /* pr[c] = exp(z[c] - m); returns their sum (double). */
    static double cnet_exp_row_f(const float* z, float* pr, ptrdiff_t C, float m) {
        cnet_v4d acc = {0.0, 0.0, 0.0, 0.0};
        ptrdiff_t c = 0;
        for (; c + 4 <= C; c += 4) {
            cnet_v4f v;
            memcpy(&v, z + c, sizeof v);
            v = cnet_exp4_nonpos(v - m);
            memcpy(pr + c, &v, sizeof v);
            acc += __builtin_convertvector(v, cnet_v4d);
        }
        double s = cnet_hsum4d(acc);
        if (c < C) {  /* the tail through the same vector code */
            cnet_v4f v = {0.0f, 0.0f, 0.0f, 0.0f};
            memcpy(&v, z + c, (size_t)(C - c) * sizeof(float));
            v = cnet_exp4_nonpos(v - m);
            memcpy(pr + c, &v, (size_t)(C - c) * sizeof(float));
            for (int i = 0; i < C - c; i++) s += v[i];
        }
        return s;
    }
    static double cnet_exp_row_d(const double* __restrict__ z, double* __restrict__ pr,
                                 ptrdiff_t C, double m) {
        double s = 0.0;
        for (ptrdiff_t c = 0; c < C; c++) { pr[c] = exp(z[c] - m); s += pr[c]; }
        return s;
    }
    """
    double cnet_exp_row_f(const float* z, float* pr, Py_ssize_t C, float m) nogil
    void cnet_row_stats_f(const float* z, Py_ssize_t C, float* max_out, double* sum_out) nogil
    double cnet_exp_row_d(const double* z, double* pr, Py_ssize_t C, double m) nogil


cdef double _rows_loss(const floating* z, floating* p, const Py_ssize_t* y, Py_ssize_t n,
                       Py_ssize_t C, double smoothing) noexcept nogil:
    """Sum of the smoothed cross-entropy of n rows; writes their softmax into p."""
    cdef Py_ssize_t r, c
    cdef const floating* zr
    cdef floating* pr
    cdef floating m, inv_t
    cdef double s, sz, lse, total = 0.0
    for r in range(n):
        zr = z + r * C
        pr = p + r * C
        if floating is float:
            cnet_row_stats_f(zr, C, &m, &sz)
        else:
            m = zr[0]
            sz = 0.0
            for c in range(C):
                m = zr[c] if zr[c] > m else m
                sz += zr[c]
        if sz != sz:  # a NaN logit: the row's loss and softmax are NaN, as in torch
            for c in range(C):
                pr[c] = sz
            total += sz
            continue
        if floating is float:
            s = cnet_exp_row_f(zr, pr, C, m)
        else:
            s = cnet_exp_row_d(zr, pr, C, m)
        inv_t = <floating>(1.0 / s)
        for c in range(C):
            pr[c] = pr[c] * inv_t
        lse = m + log(s)
        if smoothing == 0:  # skip the smoothing term: 0 * inf would be NaN for -inf logits
            total += lse - zr[y[r]]
        else:
            total += (1.0 - smoothing) * (lse - zr[y[r]]) + smoothing * (lse - sz / C)
    return total


def _check(logits, probs, labels):
    if logits.shape[0] != probs.shape[0] or logits.shape[1] != probs.shape[1]:
        raise ValueError(f"cross-entropy kernel: probs has shape {tuple(probs.shape)[:2]}, "
                         f"logits {tuple(logits.shape)[:2]}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross-entropy kernel: {labels.shape[0]} labels for "
                         f"{logits.shape[0]} rows of logits")


def forward(const floating[:, ::1] logits, const Py_ssize_t[::1] labels, floating[:, ::1] probs,
            double smoothing, int n_threads):
    """Sum over rows of the (label-smoothed) cross-entropy; softmax into ``probs``.

    Labels must already be in [0, C): use ``first_bad_label`` to check.
    """
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    _check(logits, probs, labels)
    if N == 0:
        return 0.0
    if C == 0:
        raise ValueError("cross-entropy kernel: logits have no classes")
    cdef Py_ssize_t nchunks = (N + _CHUNK_ROWS - 1) // _CHUNK_ROWS
    cdef double* part = <double*>malloc(nchunks * sizeof(double))
    if part == NULL:
        raise MemoryError()
    cdef int nt = effective_threads(N * C * 8, n_threads)
    cdef Py_ssize_t j, r0
    cdef double total = 0.0
    with nogil:
        for j in prange(nchunks, schedule="static", num_threads=nt):
            r0 = j * _CHUNK_ROWS
            part[j] = _rows_loss(&logits[r0, 0], &probs[r0, 0], &labels[r0],
                                 (N - r0) if N - r0 < _CHUNK_ROWS else _CHUNK_ROWS, C, smoothing)
        for j in range(nchunks):
            total += part[j]
    free(part)
    return total


def backward(const floating[:, ::1] probs, const Py_ssize_t[::1] labels, floating[:, ::1] grad,
             double smoothing, double coef, int n_threads):
    """grad = coef * (probs - (1 - smoothing) * onehot(labels) - smoothing / C)."""
    cdef Py_ssize_t N = probs.shape[0], C = probs.shape[1]
    _check(probs, grad, labels)
    if N == 0 or C == 0:
        return
    cdef int nt = effective_threads(N * C, n_threads)
    cdef floating cf = <floating>coef
    cdef floating off = <floating>(coef * smoothing / C)
    cdef floating hit = <floating>(coef * (1.0 - smoothing))
    cdef Py_ssize_t r, c
    with nogil:
        for r in prange(N, schedule="static", num_threads=nt):
            for c in range(C):
                grad[r, c] = cf * probs[r, c] - off
            grad[r, labels[r]] -= hit


def first_bad_label(const Py_ssize_t[::1] labels, Py_ssize_t C):
    """Index of the first label outside [0, C), or -1 if all are valid."""
    cdef Py_ssize_t i, n = labels.shape[0], bad = -1
    with nogil:
        for i in range(n):
            if labels[i] < 0 or labels[i] >= C:
                bad = i
                break
    return bad
