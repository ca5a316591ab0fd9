# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused in-place optimizer updates, gradient norms and fills over flat buffers.

The C loops live in ``_optim_impl.h`` (instantiated for float and double).
Every entry point here works on a *segment*: a 1-D parameter buffer ``p``, a
1-D gradient buffer ``g``, the optimizer's flat state arrays, and a chunk
table ``chunks`` of shape (K, 4) with rows ``(p_offset, g_offset,
state_offset, length)``.  The Python optimizer builds the table once per
parameter group (coalesced spans of a model-wide flat buffer, cut into chunks
of at most CHUNK elements), so one call updates a whole group and the work is
spread over threads chunk by chunk.  Updates are element-wise, so the result
does not depend on the thread count; reductions (norms) sum per-chunk partials
in chunk order, so they do not either.

The wrappers validate dtypes, lengths and every chunk's bounds (bounds checks
are off) and raise ValueError with the offending sizes.
"""
import numpy as np

from cython.parallel cimport prange
from cnet_ext._openmp cimport effective_threads

cdef extern from "math.h" nogil:
    double pow(double, double)
    double fabs(double)

cdef extern from *:
    """
    #include <math.h>
    #include <float.h>
    #define T float
    #define SFX f32
    #define SQRT sqrtf
    #define FABS fabsf
    #define TMAX FLT_MAX
    #include "_optim_impl.h"
    #undef T
    #undef SFX
    #undef SQRT
    #undef FABS
    #undef TMAX
    #define T double
    #define SFX f64
    #define SQRT sqrt
    #define FABS fabs
    #define TMAX DBL_MAX
    #include "_optim_impl.h"
    #undef T
    #undef SFX
    #undef SQRT
    #undef FABS
    #undef TMAX
    """
    Py_ssize_t cnet_sgd_f32(float*, const float*, float*, Py_ssize_t, float, float, float,
                            float, float, int, int, int) noexcept nogil
    Py_ssize_t cnet_sgd_f64(double*, const double*, double*, Py_ssize_t, double, double,
                            double, double, double, int, int, int) noexcept nogil
    Py_ssize_t cnet_adagrad_f32(float*, const float*, float*, Py_ssize_t, float, float, float,
                                float) noexcept nogil
    Py_ssize_t cnet_adagrad_f64(double*, const double*, double*, Py_ssize_t, double, double,
                                double, double) noexcept nogil
    Py_ssize_t cnet_rmsprop_f32(float*, const float*, float*, float*, float*, Py_ssize_t, float,
                                float, float, float, float, float, float, int, int) noexcept nogil
    Py_ssize_t cnet_rmsprop_f64(double*, const double*, double*, double*, double*, Py_ssize_t,
                                double, double, double, double, double, double, double, int,
                                int) noexcept nogil
    Py_ssize_t cnet_adadelta_f32(float*, const float*, float*, float*, Py_ssize_t, float, float,
                                 float, float, float, float) noexcept nogil
    Py_ssize_t cnet_adadelta_f64(double*, const double*, double*, double*, Py_ssize_t, double,
                                 double, double, double, double, double) noexcept nogil
    Py_ssize_t cnet_adam_f32(float*, const float*, float*, float*, float*, Py_ssize_t, float,
                             float, float, float, float, float, float, float, float,
                             int) noexcept nogil
    Py_ssize_t cnet_adam_f64(double*, const double*, double*, double*, double*, Py_ssize_t,
                             double, double, double, double, double, double, double, double,
                             double, int) noexcept nogil
    Py_ssize_t cnet_nadam_f32(float*, const float*, float*, float*, Py_ssize_t, float, float,
                              float, float, float, float, float, float, float,
                              float) noexcept nogil
    Py_ssize_t cnet_nadam_f64(double*, const double*, double*, double*, Py_ssize_t, double,
                              double, double, double, double, double, double, double, double,
                              double) noexcept nogil
    Py_ssize_t cnet_count_nonfinite_f32(const float*, Py_ssize_t) noexcept nogil
    Py_ssize_t cnet_count_nonfinite_f64(const double*, Py_ssize_t) noexcept nogil
    double cnet_sumsq_f32(const float*, Py_ssize_t, Py_ssize_t*) noexcept nogil
    double cnet_sumsq_f64(const double*, Py_ssize_t, Py_ssize_t*) noexcept nogil
    double cnet_sumpow_f32(const float*, Py_ssize_t, double, Py_ssize_t*) noexcept nogil
    double cnet_sumpow_f64(const double*, Py_ssize_t, double, Py_ssize_t*) noexcept nogil
    double cnet_maxabs_f32(const float*, Py_ssize_t, Py_ssize_t*) noexcept nogil
    double cnet_maxabs_f64(const double*, Py_ssize_t, Py_ssize_t*) noexcept nogil
    void cnet_scale_f32(float*, Py_ssize_t, float) noexcept nogil
    void cnet_scale_f64(double*, Py_ssize_t, double) noexcept nogil
    void cnet_fill_f32(float*, Py_ssize_t, float) noexcept nogil
    void cnet_fill_f64(double*, Py_ssize_t, double) noexcept nogil

ctypedef fused floating:
    float
    double

# Elements per chunk: big enough to amortise the scheduling, small enough that
# a 2-thread split of a ResNet-20-sized buffer (0.27M) stays balanced.
CHUNK = 32768


def chunk_table(spans, Py_ssize_t chunk=CHUNK):
    """(K, 4) int64 table from spans ``(p_off, g_off, s_off, length)``, cut into chunks."""
    rows = []
    for po, go, so, n in spans:
        start = 0
        while start < n:
            m = min(chunk, n - start)
            rows.append((po + start, go + start, so + start, m))
            start += m
    if not rows:
        return np.zeros((0, 4), dtype=np.intp)
    return np.asarray(rows, dtype=np.intp)


cdef Py_ssize_t _check_chunks(const Py_ssize_t[:, ::1] chunks, Py_ssize_t np_, Py_ssize_t ng,
                              Py_ssize_t ns) except -1:
    """Validate every chunk against the buffer sizes (ns < 0: no state); return total work."""
    cdef Py_ssize_t k, po, go, so, n, total = 0
    if chunks.shape[1] != 4:
        raise ValueError(f"chunks must have shape (K, 4), got ({chunks.shape[0]}, {chunks.shape[1]})")
    for k in range(chunks.shape[0]):
        po, go, so, n = chunks[k, 0], chunks[k, 1], chunks[k, 2], chunks[k, 3]
        if (n < 0 or po < 0 or go < 0 or po + n > np_ or go + n > ng
                or (ns >= 0 and (so < 0 or so + n > ns))):
            raise ValueError(f"chunk {k} (p_off={po}, g_off={go}, s_off={so}, length={n}) is "
                             f"out of bounds for params of size {np_}, grads of size {ng}, "
                             f"state of size {ns}")
        total += n
    return total


cdef int _column_threads(const Py_ssize_t[:, ::1] chunks, int column, Py_ssize_t n,
                         int n_threads) except -1:
    """Threads for a pass over one buffer of size ``n`` whose chunk offsets are in
    ``column`` (0 params, 1 grads, 2 state); validates the chunks against it."""
    if column < 0 or column > 2:
        raise ValueError(f"column must be 0, 1 or 2, got {column}")
    cdef Py_ssize_t work = _check_chunks(chunks, n if column == 0 else (1 << 62),
                                         n if column == 1 else (1 << 62),
                                         n if column == 2 else -1)
    return effective_threads(work, n_threads)


cdef Py_ssize_t _state_size(name, arr, Py_ssize_t want) except -2:
    """Size of an optional state array (-1 when absent); it must have the same size as ``want``."""
    if arr is None:
        return -1
    if arr.shape[0] != want:
        raise ValueError(f"state array {name} has size {arr.shape[0]}, expected {want}")
    return arr.shape[0]


def sgd(floating[::1] p, const floating[::1] g, floating[::1] buf, const Py_ssize_t[:, ::1] chunks,
        double lr, double weight_decay, double momentum, double dampening, bint nesterov,
        bint maximize, bint first, int n_threads):
    """One SGD step over the chunks; ``buf`` (momentum buffer) may be None when momentum == 0.
    ``first``: the momentum buffer is initialised from this step's gradient (torch's
    ``buf = grad.clone()``).  Returns the count of non-finite gradients and new parameters."""
    cdef Py_ssize_t ns = buf.shape[0] if buf is not None else -1
    if momentum != 0 and buf is None:
        raise ValueError("sgd: momentum != 0 needs a momentum buffer")
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], ns)
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating* bp = &buf[0] if (buf is not None and buf.shape[0] > 0) else NULL
    cdef int use_buf = momentum != 0
    cdef floating sign = -1 if maximize else 1
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_sgd_f32(&p[chunks[k, 0]], &g[chunks[k, 1]],
                                (bp + chunks[k, 2]) if use_buf else NULL, chunks[k, 3], sign,
                                <float>lr, <float>weight_decay, <float>momentum,
                                <float>(1.0 - dampening), use_buf, first, nesterov)
        else:
            bad += cnet_sgd_f64(&p[chunks[k, 0]], &g[chunks[k, 1]],
                                (bp + chunks[k, 2]) if use_buf else NULL, chunks[k, 3], sign,
                                lr, weight_decay, momentum, 1.0 - dampening, use_buf, first,
                                nesterov)
    return bad


def adagrad(floating[::1] p, const floating[::1] g, floating[::1] state_sum,
            const Py_ssize_t[:, ::1] chunks, double clr, double weight_decay, double eps,
            bint maximize, int n_threads):
    """One Adagrad step (``clr`` = lr / (1 + (step - 1) * lr_decay), computed by the caller)."""
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], state_sum.shape[0])
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating sign = -1 if maximize else 1
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_adagrad_f32(&p[chunks[k, 0]], &g[chunks[k, 1]], &state_sum[chunks[k, 2]],
                                    chunks[k, 3], sign, <float>clr, <float>weight_decay,
                                    <float>eps)
        else:
            bad += cnet_adagrad_f64(&p[chunks[k, 0]], &g[chunks[k, 1]], &state_sum[chunks[k, 2]],
                                    chunks[k, 3], sign, clr, weight_decay, eps)
    return bad


def rmsprop(floating[::1] p, const floating[::1] g, floating[::1] square_avg,
            floating[::1] grad_avg, floating[::1] momentum_buffer,
            const Py_ssize_t[:, ::1] chunks, double lr, double alpha, double eps,
            double weight_decay, double momentum, bint centered, bint maximize, int n_threads):
    """One RMSprop step; ``grad_avg`` (centered) and ``momentum_buffer`` (momentum > 0) may be None."""
    cdef Py_ssize_t ns = square_avg.shape[0]
    _state_size("grad_avg", grad_avg, ns)
    _state_size("momentum_buffer", momentum_buffer, ns)
    if centered and grad_avg is None:
        raise ValueError("rmsprop: centered=True needs grad_avg")
    if momentum > 0 and momentum_buffer is None:
        raise ValueError("rmsprop: momentum > 0 needs momentum_buffer")
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], ns)
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating sign = -1 if maximize else 1
    cdef int use_buf = momentum > 0
    cdef floating* gap = &grad_avg[0] if (centered and ns > 0) else NULL
    cdef floating* bp = &momentum_buffer[0] if (use_buf and ns > 0) else NULL
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_rmsprop_f32(&p[chunks[k, 0]], &g[chunks[k, 1]], &square_avg[chunks[k, 2]],
                                    (gap + chunks[k, 2]) if centered else NULL,
                                    (bp + chunks[k, 2]) if use_buf else NULL, chunks[k, 3], sign,
                                    <float>lr, <float>alpha, <float>(1.0 - alpha), <float>eps,
                                    <float>weight_decay, <float>momentum, centered, use_buf)
        else:
            bad += cnet_rmsprop_f64(&p[chunks[k, 0]], &g[chunks[k, 1]], &square_avg[chunks[k, 2]],
                                    (gap + chunks[k, 2]) if centered else NULL,
                                    (bp + chunks[k, 2]) if use_buf else NULL, chunks[k, 3], sign,
                                    lr, alpha, 1.0 - alpha, eps, weight_decay, momentum,
                                    centered, use_buf)
    return bad


def adadelta(floating[::1] p, const floating[::1] g, floating[::1] square_avg,
             floating[::1] acc_delta, const Py_ssize_t[:, ::1] chunks, double lr, double rho,
             double eps, double weight_decay, bint maximize, int n_threads):
    """One Adadelta step."""
    cdef Py_ssize_t ns = square_avg.shape[0]
    _state_size("acc_delta", acc_delta, ns)
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], ns)
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating sign = -1 if maximize else 1
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_adadelta_f32(&p[chunks[k, 0]], &g[chunks[k, 1]],
                                     &square_avg[chunks[k, 2]], &acc_delta[chunks[k, 2]],
                                     chunks[k, 3], sign, <float>lr, <float>rho,
                                     <float>(1.0 - rho), <float>eps, <float>weight_decay)
        else:
            bad += cnet_adadelta_f64(&p[chunks[k, 0]], &g[chunks[k, 1]],
                                     &square_avg[chunks[k, 2]], &acc_delta[chunks[k, 2]],
                                     chunks[k, 3], sign, lr, rho, 1.0 - rho, eps, weight_decay)
    return bad


def adam(floating[::1] p, const floating[::1] g, floating[::1] exp_avg,
         floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq,
         const Py_ssize_t[:, ::1] chunks, double weight_decay, double decay, double beta1,
         double beta2, double step_size, double bc2_sqrt, double eps, bint amsgrad,
         bint maximize, int n_threads):
    """One Adam/AdamW step.  L2 decay: ``weight_decay`` (0 for AdamW); decoupled decay:
    ``decay`` = 1 - lr * weight_decay (1 for Adam); ``step_size`` = lr / (1 - beta1^t),
    ``bc2_sqrt`` = sqrt(1 - beta2^t); ``max_exp_avg_sq`` may be None without amsgrad."""
    cdef Py_ssize_t ns = exp_avg.shape[0]
    _state_size("exp_avg_sq", exp_avg_sq, ns)
    _state_size("max_exp_avg_sq", max_exp_avg_sq, ns)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("adam: amsgrad=True needs max_exp_avg_sq")
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], ns)
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating sign = -1 if maximize else 1
    cdef floating* vmp = &max_exp_avg_sq[0] if (amsgrad and ns > 0) else NULL
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_adam_f32(&p[chunks[k, 0]], &g[chunks[k, 1]], &exp_avg[chunks[k, 2]],
                                 &exp_avg_sq[chunks[k, 2]], (vmp + chunks[k, 2]) if amsgrad else NULL,
                                 chunks[k, 3], sign, <float>weight_decay, <float>decay,
                                 <float>(1.0 - beta1), <float>beta2, <float>(1.0 - beta2),
                                 <float>step_size, <float>bc2_sqrt, <float>eps, amsgrad)
        else:
            bad += cnet_adam_f64(&p[chunks[k, 0]], &g[chunks[k, 1]], &exp_avg[chunks[k, 2]],
                                 &exp_avg_sq[chunks[k, 2]], (vmp + chunks[k, 2]) if amsgrad else NULL,
                                 chunks[k, 3], sign, weight_decay, decay, 1.0 - beta1, beta2,
                                 1.0 - beta2, step_size, bc2_sqrt, eps, amsgrad)
    return bad


def nadam(floating[::1] p, const floating[::1] g, floating[::1] exp_avg,
          floating[::1] exp_avg_sq, const Py_ssize_t[:, ::1] chunks, double weight_decay,
          double decay, double beta1, double beta2, double bias_correction2, double eps,
          double c_grad, double c_avg, bint maximize, int n_threads):
    """One NAdam step; ``c_grad`` = -lr (1 - mu_t) / (1 - prod mu), ``c_avg`` =
    -lr mu_{t+1} / (1 - prod mu * mu_{t+1}) are computed by the caller in double."""
    cdef Py_ssize_t ns = exp_avg.shape[0]
    _state_size("exp_avg_sq", exp_avg_sq, ns)
    cdef Py_ssize_t work = _check_chunks(chunks, p.shape[0], g.shape[0], ns)
    cdef int nt = effective_threads(work, n_threads)
    cdef Py_ssize_t k, bad = 0
    cdef floating sign = -1 if maximize else 1
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_nadam_f32(&p[chunks[k, 0]], &g[chunks[k, 1]], &exp_avg[chunks[k, 2]],
                                  &exp_avg_sq[chunks[k, 2]], chunks[k, 3], sign,
                                  <float>weight_decay, <float>decay, <float>(1.0 - beta1),
                                  <float>beta2, <float>(1.0 - beta2), <float>bias_correction2,
                                  <float>eps, <float>c_grad, <float>c_avg)
        else:
            bad += cnet_nadam_f64(&p[chunks[k, 0]], &g[chunks[k, 1]], &exp_avg[chunks[k, 2]],
                                  &exp_avg_sq[chunks[k, 2]], chunks[k, 3], sign, weight_decay,
                                  decay, 1.0 - beta1, beta2, 1.0 - beta2, bias_correction2, eps,
                                  c_grad, c_avg)
    return bad


def count_nonfinite(const floating[::1] x, const Py_ssize_t[:, ::1] chunks, int column,
                    int n_threads):
    """Non-finite entries of x over the chunks (offsets from chunk column ``column``)."""
    cdef int nt = _column_threads(chunks, column, x.shape[0], n_threads)
    cdef Py_ssize_t k, bad = 0
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            bad += cnet_count_nonfinite_f32(&x[chunks[k, column]], chunks[k, 3])
        else:
            bad += cnet_count_nonfinite_f64(&x[chunks[k, column]], chunks[k, 3])
    return bad


def norm_partials(const floating[::1] x, const Py_ssize_t[:, ::1] chunks, int column,
                  double norm_type, int n_threads):
    """Per-chunk partials of a norm of x: sum of squares (norm_type 2), max |x| (inf) or
    sum |x|^q; returns (partials float64 array (K,), non-finite count).  The caller
    combines the partials in chunk order, so the total does not depend on threads."""
    cdef int nt = _column_threads(chunks, column, x.shape[0], n_threads)
    cdef Py_ssize_t K = chunks.shape[0]
    partials_arr = np.zeros(K, dtype=np.float64)
    bads_arr = np.zeros(K, dtype=np.intp)
    cdef double[::1] partials = partials_arr
    cdef Py_ssize_t[::1] bads = bads_arr
    cdef int mode = 0 if norm_type == 2.0 else (1 if norm_type == float("inf") else 2)
    cdef Py_ssize_t k
    for k in prange(K, nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            if mode == 0:
                partials[k] = cnet_sumsq_f32(&x[chunks[k, column]], chunks[k, 3], &bads[k])
            elif mode == 1:
                partials[k] = cnet_maxabs_f32(&x[chunks[k, column]], chunks[k, 3], &bads[k])
            else:
                partials[k] = cnet_sumpow_f32(&x[chunks[k, column]], chunks[k, 3], norm_type,
                                              &bads[k])
        else:
            if mode == 0:
                partials[k] = cnet_sumsq_f64(&x[chunks[k, column]], chunks[k, 3], &bads[k])
            elif mode == 1:
                partials[k] = cnet_maxabs_f64(&x[chunks[k, column]], chunks[k, 3], &bads[k])
            else:
                partials[k] = cnet_sumpow_f64(&x[chunks[k, column]], chunks[k, 3], norm_type,
                                              &bads[k])
    return partials_arr, int(bads_arr.sum())


def scale(floating[::1] x, const Py_ssize_t[:, ::1] chunks, int column, double c, int n_threads):
    """x *= c over the chunks (c cast to x's dtype, as torch's mul_ by a Python scalar)."""
    cdef int nt = _column_threads(chunks, column, x.shape[0], n_threads)
    cdef Py_ssize_t k
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            cnet_scale_f32(&x[chunks[k, column]], chunks[k, 3], <float>c)
        else:
            cnet_scale_f64(&x[chunks[k, column]], chunks[k, 3], c)


def fill(floating[::1] x, const Py_ssize_t[:, ::1] chunks, int column, double value,
         int n_threads):
    """x[...] = value over the chunks (zero_grad: one parallel pass over the flat grads)."""
    cdef int nt = _column_threads(chunks, column, x.shape[0], n_threads)
    cdef Py_ssize_t k
    for k in prange(chunks.shape[0], nogil=True, num_threads=nt, schedule="static"):
        if floating is float:
            cnet_fill_f32(&x[chunks[k, column]], chunks[k, 3], <float>value)
        else:
            cnet_fill_f64(&x[chunks[k, column]], chunks[k, 3], value)
