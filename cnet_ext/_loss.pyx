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
from libc.math cimport exp, expf, log
from libc.stdlib cimport free, malloc

from cnet_ext._openmp cimport effective_threads

cdef enum:
    _CHUNK_ROWS = 32


cdef double _rows_loss(const floating* z, floating* p, const Py_ssize_t* y, Py_ssize_t n,
                       Py_ssize_t C, double smoothing) noexcept nogil:
    """Sum of the smoothed cross-entropy of n rows; writes their softmax into p."""
    cdef Py_ssize_t r, c
    cdef const floating* zr
    cdef floating* pr
    cdef floating m, e
    cdef double s, sz, lse, total = 0.0, inv
    for r in range(n):
        zr = z + r * C
        pr = p + r * C
        m = zr[0]
        for c in range(1, C):
            if zr[c] > m:
                m = zr[c]
        s = 0.0
        sz = 0.0
        for c in range(C):
            if floating is float:
                e = expf(zr[c] - m)
            else:
                e = exp(zr[c] - m)
            pr[c] = e
            s += e
            sz += zr[c]
        inv = 1.0 / s
        for c in range(C):
            pr[c] = <floating>(pr[c] * inv)
        lse = m + log(s)
        total += (1.0 - smoothing) * (lse - zr[y[r]]) + smoothing * (lse - sz / C)
    return total


def _check(logits, probs, labels):
    if logits.shape[0] != probs.shape[0] or logits.shape[1] != probs.shape[1]:
        raise ValueError(f"cross-entropy kernel: probs has shape {tuple(probs.shape)[:2]}, "
                         f"logits {tuple(logits.shape)[:2]}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross-entropy kernel: {labels.shape[0]} labels for "
                         f"{logits.shape[0]} rows of logits")


def forward(floating[:, ::1] logits, const Py_ssize_t[::1] labels, floating[:, ::1] probs,
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


def backward(floating[:, ::1] probs, const Py_ssize_t[::1] labels, floating[:, ::1] grad,
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
