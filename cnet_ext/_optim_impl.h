/* Fused optimizer kernels, written once and instantiated per element type.
 *
 * _optim.pyx includes this file twice, with T / SFX / SQRT / FABS / TMAX
 * defined for float and for double (the classic C "template" include), so the
 * float32 code uses float math (sqrtf) and both share one source.
 *
 * Each kernel updates one contiguous range [0, n) of a parameter span in a
 * single pass that reads p, grad and state and writes p and state (the pass
 * PyTorch's FusedAdamKernel makes).  Scalars arrive already cast to T, the way
 * torch casts a Python scalar for a float tensor op, and expressions keep
 * torch's operation order (e.g. addcdiv: p + value * (a / b)).  Every kernel
 * returns how many non-finite gradient entries it read plus non-finite
 * parameters it wrote: a 32-bit integer sum (n is at most a chunk, far below
 * 2^30), which vectorises at the float lane width and costs next to nothing.
 *
 * Loop-invariant flags (amsgrad, nesterov, ...) are tested inside the loop;
 * GCC's -O3 loop unswitching hoists them.  The update loops are compute-bound
 * at SSE2 width (two divides and a square root per element), hence the AVX2 /
 * AVX-512 clones (CNET_CLONES, _simd.h).
 */

#include "_simd.h"

/* True for inf and NaN (a NaN fails every comparison). */
#define CNET_NONFINITE(x) (!(FABS(x) <= TMAX))

/* SGD (torch.optim.SGD): d = sign*g + wd*p; buf = first ? d : momentum*buf + (1-dampening)*d;
 * d = nesterov ? d + momentum*buf : buf; p -= lr*d.  use_buf = momentum != 0. */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_sgd_)(T *restrict p, const T *restrict g, T *restrict buf,
                                         Py_ssize_t n, T sign, T lr, T wd, T momentum, T damp1,
                                         int use_buf, int first, int nesterov)
{
    int bad = 0;
    if (!use_buf) {
        for (Py_ssize_t i = 0; i < n; i++) {
            T gi = sign * g[i];
            bad += CNET_NONFINITE(gi);
            T pi = p[i];
            gi = gi + wd * pi;
            pi = pi - lr * gi;
            p[i] = pi;
            bad += CNET_NONFINITE(pi);
        }
    } else if (first) {
        for (Py_ssize_t i = 0; i < n; i++) {
            T gi = sign * g[i];
            bad += CNET_NONFINITE(gi);
            T pi = p[i];
            gi = gi + wd * pi;
            T b = gi;
            buf[i] = b;
            T d = nesterov ? gi + momentum * b : b;
            pi = pi - lr * d;
            p[i] = pi;
            bad += CNET_NONFINITE(pi);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            T gi = sign * g[i];
            bad += CNET_NONFINITE(gi);
            T pi = p[i];
            gi = gi + wd * pi;
            T b = buf[i] * momentum + damp1 * gi;
            buf[i] = b;
            T d = nesterov ? gi + momentum * b : b;
            pi = pi - lr * d;
            p[i] = pi;
            bad += CNET_NONFINITE(pi);
        }
    }
    return bad;
}

/* Adagrad: d = sign*g + wd*p; sum += d*d; p -= clr * d / (sqrt(sum) + eps). */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_adagrad_)(T *restrict p, const T *restrict g, T *restrict sum,
                                             Py_ssize_t n, T sign, T clr, T wd, T eps)
{
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T gi = sign * g[i];
        bad += CNET_NONFINITE(gi);
        T pi = p[i];
        gi = gi + wd * pi;
        T s = sum[i] + gi * gi;
        sum[i] = s;
        pi = pi - clr * (gi / (SQRT(s) + eps));
        p[i] = pi;
        bad += CNET_NONFINITE(pi);
    }
    return bad;
}

/* RMSprop: sq = alpha*sq + (1-alpha)*d*d; centered: ga = lerp(ga, d, 1-alpha),
 * avg = sqrt(sq - ga*ga) + eps, else sqrt(sq) + eps; momentum: buf = momentum*buf + d/avg,
 * p -= lr*buf; else p -= lr*(d/avg).  ga / buf may be NULL when unused.  The body is
 * inlined with constant flags into four loops (GCC unswitches only one flag by itself,
 * and a loop with a flag test inside does not vectorise). */
static inline __attribute__((always_inline)) int CNET_FN(cnet_rmsprop_body_)(
    T *restrict p, const T *restrict g, T *restrict sq, T *restrict ga, T *restrict buf,
    Py_ssize_t n, T sign, T lr, T alpha, T om_alpha, T eps, T wd, T momentum,
    const int centered, const int use_buf)
{
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T gi = sign * g[i];
        bad += CNET_NONFINITE(gi);
        T pi = p[i];
        gi = gi + wd * pi;
        T s = sq[i] * alpha + om_alpha * gi * gi;
        sq[i] = s;
        T avg;
        if (centered) {
            T a = ga[i];
            a = a + om_alpha * (gi - a);
            ga[i] = a;
            avg = SQRT(s + (T)(-1) * a * a) + eps;
        } else {
            avg = SQRT(s) + eps;
        }
        if (use_buf) {
            T b = buf[i] * momentum + gi / avg;
            buf[i] = b;
            pi = pi - lr * b;
        } else {
            pi = pi - lr * (gi / avg);
        }
        p[i] = pi;
        bad += CNET_NONFINITE(pi);
    }
    return bad;
}

CNET_CLONES static Py_ssize_t CNET_FN(cnet_rmsprop_)(T *restrict p, const T *restrict g, T *restrict sq,
                                             T *restrict ga, T *restrict buf, Py_ssize_t n,
                                             T sign, T lr, T alpha, T om_alpha, T eps, T wd,
                                             T momentum, int centered, int use_buf)
{
    if (centered && use_buf)
        return CNET_FN(cnet_rmsprop_body_)(p, g, sq, ga, buf, n, sign, lr, alpha, om_alpha, eps, wd, momentum, 1, 1);
    if (centered)
        return CNET_FN(cnet_rmsprop_body_)(p, g, sq, ga, buf, n, sign, lr, alpha, om_alpha, eps, wd, momentum, 1, 0);
    if (use_buf)
        return CNET_FN(cnet_rmsprop_body_)(p, g, sq, ga, buf, n, sign, lr, alpha, om_alpha, eps, wd, momentum, 0, 1);
    return CNET_FN(cnet_rmsprop_body_)(p, g, sq, ga, buf, n, sign, lr, alpha, om_alpha, eps, wd, momentum, 0, 0);
}

/* Adadelta: sq = rho*sq + (1-rho)*d*d; delta = sqrt(acc+eps) / sqrt(sq+eps) * d;
 * acc = rho*acc + (1-rho)*delta*delta; p -= lr*delta. */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_adadelta_)(T *restrict p, const T *restrict g, T *restrict sq,
                                              T *restrict acc, Py_ssize_t n, T sign, T lr, T rho,
                                              T om_rho, T eps, T wd)
{
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T gi = sign * g[i];
        bad += CNET_NONFINITE(gi);
        T pi = p[i];
        gi = gi + wd * pi;
        T s = sq[i] * rho + om_rho * gi * gi;
        sq[i] = s;
        T a = acc[i];
        T delta = SQRT(a + eps) / SQRT(s + eps) * gi;
        acc[i] = a * rho + om_rho * delta * delta;
        pi = pi - lr * delta;
        p[i] = pi;
        bad += CNET_NONFINITE(pi);
    }
    return bad;
}

/* The moment updates Adam and NAdam share (torch's operation order): d += wd*p
 * (L2), p *= decay (decoupled), m = lerp(m, d, w1), v = beta2*v + (1-beta2)*d*d.
 * Stores m and v; returns d, the decayed p, m and v in registers. */
static inline __attribute__((always_inline)) void CNET_FN(cnet_adam_moments_)(
    T *d, T *pi, T *mi, T *vi, const T *p, T *restrict m, T *restrict v, T wd, T decay,
    T w1, T beta2, T om_beta2)
{
    T pv = *p;
    T gi = *d + wd * pv;
    *d = gi;
    *pi = pv * decay;
    T mv = *m;
    mv = mv + w1 * (gi - mv);
    *m = mv;
    *mi = mv;
    T vv = *v * beta2 + om_beta2 * gi * gi;
    *v = vv;
    *vi = vv;
}

/* Adam / AdamW: d = sign*g + wd*p (L2; wd = 0 when decoupled); p *= decay (decoupled:
 * 1 - lr*wd, else 1); m = lerp(m, d, 1-beta1); v = beta2*v + (1-beta2)*d*d;
 * amsgrad: vmax = max(vmax, v) and v := vmax; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps).
 * vmax may be NULL without amsgrad. */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_adam_)(T *restrict p, const T *restrict g, T *restrict m,
                                          T *restrict v, T *restrict vmax, Py_ssize_t n, T sign,
                                          T wd, T decay, T w1, T beta2, T om_beta2, T step_size,
                                          T bc2_sqrt, T eps, int amsgrad)
{
    int bad = 0;
    /* A multiply by the reciprocal instead of a second division per element: the
     * vector divider, not memory, bounds this loop on one core. */
    const T inv_bc2_sqrt = (T)1 / bc2_sqrt;
    for (Py_ssize_t i = 0; i < n; i++) {
        T gi = sign * g[i];
        bad += CNET_NONFINITE(gi);
        T pi, mi, vi;
        CNET_FN(cnet_adam_moments_)(&gi, &pi, &mi, &vi, p + i, m + i, v + i, wd, decay, w1,
                                    beta2, om_beta2);
        if (amsgrad) {
            T vm = vmax[i];
            vm = vm > vi ? vm : vi;
            vmax[i] = vm;
            vi = vm;
        }
        T denom = SQRT(vi) * inv_bc2_sqrt + eps;
        pi = pi - step_size * (mi / denom);
        p[i] = pi;
        bad += CNET_NONFINITE(pi);
    }
    return bad;
}

/* NAdam: d, decay, m, v as Adam (cnet_adam_moments_); denom = sqrt(v / bc2) + eps;
 * p += c_grad * (d / denom); p += c_avg * (m / denom) (torch's two addcdiv_). */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_nadam_)(T *restrict p, const T *restrict g, T *restrict m,
                                           T *restrict v, Py_ssize_t n, T sign, T wd, T decay,
                                           T w1, T beta2, T om_beta2, T bc2, T eps, T c_grad,
                                           T c_avg)
{
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T gi = sign * g[i];
        bad += CNET_NONFINITE(gi);
        T pi, mi, vi;
        CNET_FN(cnet_adam_moments_)(&gi, &pi, &mi, &vi, p + i, m + i, v + i, wd, decay, w1,
                                    beta2, om_beta2);
        T denom = SQRT(vi / bc2) + eps;
        pi = pi + c_grad * (gi / denom);
        pi = pi + c_avg * (mi / denom);
        p[i] = pi;
        bad += CNET_NONFINITE(pi);
    }
    return bad;
}

/* Non-finite entries of x (the skip_nonfinite pre-pass: reads the gradient only). */
CNET_CLONES static Py_ssize_t CNET_FN(cnet_count_nonfinite_)(const T *restrict x, Py_ssize_t n)
{
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad += CNET_NONFINITE(x[i]);
    return bad;
}

/* Sum of squares in double (fixed order for a given build: the caller splits
 * the array into fixed chunks, so the result does not depend on threads);
 * *bad receives the non-finite count. */
CNET_CLONES static double CNET_FN(cnet_sumsq_)(const T *restrict x, Py_ssize_t n, Py_ssize_t *bad)
{
    double s = 0.0;
    int b = 0;
    #pragma omp simd reduction(+:s) reduction(+:b)
    for (Py_ssize_t i = 0; i < n; i++) {
        double xi = (double)x[i];
        s += xi * xi;
        b += CNET_NONFINITE(x[i]);
    }
    *bad = b;
    return s;
}

/* sum |x|^q (general q-norms) */
CNET_CLONES static double CNET_FN(cnet_sumpow_)(const T *restrict x, Py_ssize_t n, double q, Py_ssize_t *bad)
{
    double s = 0.0;
    int b = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        s += pow(fabs((double)x[i]), q);
        b += CNET_NONFINITE(x[i]);
    }
    *bad = b;
    return s;
}

/* max |x| (exact in any order) */
CNET_CLONES static double CNET_FN(cnet_maxabs_)(const T *restrict x, Py_ssize_t n, Py_ssize_t *bad)
{
    T mx = 0;
    int b = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T a = FABS(x[i]);
        mx = a > mx ? a : mx;
        b += CNET_NONFINITE(x[i]);
    }
    *bad = b;
    return (double)mx;
}

CNET_CLONES static void CNET_FN(cnet_scale_)(T *restrict x, Py_ssize_t n, T c)
{
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = x[i] * c;
}

CNET_CLONES static void CNET_FN(cnet_fill_)(T *restrict x, Py_ssize_t n, T c)
{
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = c;
}

#undef CNET_NONFINITE
