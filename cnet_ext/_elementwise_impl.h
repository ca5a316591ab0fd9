/* Flat elementwise loops, written once and instantiated per element type.
 *
 * _elementwise.pyx includes this file twice, with T (element), U (unsigned
 * integer of the same width) and SFX defined for float
 * and for double.  The loops are cheap per element, so on data that sits in
 * cache (a 128x32x32x16 float32 activation is 8 MB, under a 32 MB L3) their
 * speed is the vector width: GCC builds baseline, AVX2 and AVX-512 clones and
 * picks one at load time, so a wheel still runs on any x86-64.
 *
 * `#pragma omp simd` states there is no loop-carried dependence, which holds
 * also when out == x (in-place ReLU / add): element i reads and writes only
 * index i.  Selects are written with both operands loaded unconditionally so
 * they compile to blends, never to data-dependent branches.
 */

#include "_simd.h"

#ifndef CNET_EW_COMMON
#define CNET_EW_COMMON

/* splitmix64's finaliser: a bijection with full avalanche. */
static inline uint64_t cnet_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
#endif

/* y = max(x, 0); NaN passes through (x < 0 is false), as torch.relu. */
CNET_CLONES static void CNET_FN(cnet_relu_)(const T *x, T *y, Py_ssize_t n)
{
CNET_SIMD
    for (Py_ssize_t i = 0; i < n; i++) {
        T v = x[i];
        y[i] = v < (T)0 ? (T)0 : v;
    }
}

/* out = y <= 0 ? 0 : g: torch's threshold_backward(g, y, 0). */
CNET_CLONES static void CNET_FN(cnet_relu_mask_)(const T *g, const T *y, T *out, Py_ssize_t n)
{
CNET_SIMD
    for (Py_ssize_t i = 0; i < n; i++) {
        T v = g[i];
        out[i] = y[i] <= (T)0 ? (T)0 : v;
    }
}

/* out = a + b, optionally followed by ReLU (the residual join). */
CNET_CLONES static void CNET_FN(cnet_add_)(const T *a, const T *b, T *out, Py_ssize_t n, int relu)
{
    if (relu) {
CNET_SIMD
        for (Py_ssize_t i = 0; i < n; i++) {
            T v = a[i] + b[i];
            out[i] = v < (T)0 ? (T)0 : v;
        }
    } else {
CNET_SIMD
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = a[i] + b[i];
    }
}

/* The multiplier as a bit mask (scale's bits or 0): branch-free in the scalar
 * baseline clone too, where GCC compiles a float select into a jump. */
static inline T CNET_FN(cnet_keep_mult_)(U scale_bits, uint64_t u, uint64_t threshold)
{
    U bits = scale_bits & (U)(-(U)(u >= threshold));
    T m;
    memcpy(&m, &bits, sizeof m);
    return m;
}

/* y[i] = x[i] * (scale if kept else 0) for i in [start, stop), start even.
 * Element i uses the high (i even) or low (i odd) 32 bits of
 * splitmix64(key + (i / 2 + 1) * golden) and is kept iff that uniform >=
 * threshold.  The pair loop is forced to vectorise (`omp simd`; 64-bit
 * multiplies are native in AVX-512 and emulated in AVX2): in scalar code GCC
 * turns the keep-select into a branch that mispredicts half the time at
 * p = 0.5.  The multiplier is scale or +0 (not scale * keep), and x is always
 * multiplied, so a dropped inf or NaN gives NaN exactly as torch's x * mask. */
CNET_CLONES static void CNET_FN(cnet_dropout_)(const T *x, T *y, Py_ssize_t start, Py_ssize_t stop,
                                       uint64_t key, uint64_t threshold, T scale)
{
    const Py_ssize_t j0 = start / 2, j1 = stop / 2;  /* full pairs */
    U sb;
    memcpy(&sb, &scale, sizeof sb);
CNET_SIMD
    for (Py_ssize_t j = j0; j < j1; j++) {
        const uint64_t h = cnet_mix64(key + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL);
        y[2 * j] = x[2 * j] * CNET_FN(cnet_keep_mult_)(sb, h >> 32, threshold);
        y[2 * j + 1] = x[2 * j + 1] * CNET_FN(cnet_keep_mult_)(sb, h & 0xFFFFFFFFULL, threshold);
    }
    if (2 * j1 < stop) {  /* odd tail: the high half of the last pair's hash */
        const Py_ssize_t i = 2 * j1;
        const uint64_t h = cnet_mix64(key + (uint64_t)(j1 + 1) * 0x9E3779B97F4A7C15ULL);
        y[i] = x[i] * CNET_FN(cnet_keep_mult_)(sb, h >> 32, threshold);
    }
}

