/* Vectorisation macros shared by every kernel written in C (the *_impl.h
 * templates and the verbatim C in the .pyx files).
 *
 * CNET_SIMD: `omp simd` (no loop-carried dependence: vectorise without alias
 * checks); in a build without OpenMP, GCC's ivdep says the same and avoids
 * unknown-pragma noise.
 *
 * CNET_CLONES: function multi-versioning.  A wheel must run on any x86-64, so
 * instead of -march GCC builds a baseline, an AVX2 and an AVX-512 clone of the
 * function and an ifunc resolver picks one at load time.  That needs GCC on
 * x86-64 and ifunc, which glibc has and musl lacks.  The x86-64-v3/v4 levels
 * are accepted by target_clones from GCC 12 on (GCC PR 101696); older GCC gets
 * the CPU names instead, whose clones are chosen only on that exact CPU model
 * (elsewhere the baseline runs: still correct).  Other compilers: one
 * baseline build.
 *
 * CNET_FN(name): name##SFX, for the "template" headers that a .pyx includes
 * once per element type with T and SFX defined (float/f32, double/f64).
 */
#ifndef CNET_SIMD_H
#define CNET_SIMD_H

#include <string.h>  /* glibc's features.h, which defines __GLIBC__ */
#include <stdint.h>

#if defined(_OPENMP)
#  define CNET_SIMD _Pragma("omp simd")
#elif defined(__GNUC__) && !defined(__clang__)
#  define CNET_SIMD _Pragma("GCC ivdep")
#else
#  define CNET_SIMD
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && defined(__GLIBC__)
#  if __GNUC__ >= 12
#    define CNET_CLONES \
         __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#  else
#    define CNET_CLONES \
         __attribute__((target_clones("default", "arch=haswell", "arch=skylake-avx512")))
#  endif
#else
#  define CNET_CLONES
#endif

/* g if keep else +0, by a bit mask: a select GCC vectorises even when the result
 * is widened or summed (written as a ternary it stayed a mispredicting branch in
 * the batch-norm and bias-gradient loops).  cnet_keep(g, keep) for float or double. */
static inline float cnet_keep_f32(float g, int keep)
{
    unsigned int bits;
    memcpy(&bits, &g, sizeof bits);
    bits &= -(unsigned int)keep;
    memcpy(&g, &bits, sizeof bits);
    return g;
}
static inline double cnet_keep_f64(double g, int keep)
{
    unsigned long long bits;
    memcpy(&bits, &g, sizeof bits);
    bits &= -(unsigned long long)keep;
    memcpy(&g, &bits, sizeof bits);
    return g;
}
#define cnet_keep(g, keep) _Generic((g), float: cnet_keep_f32, double: cnet_keep_f64)(g, keep)

/* take ? a : b by bit masks (keeps -0.0 and NaN payloads as they are), for the
 * same reason: GCC turned the max pool's chained ternaries into branches. */
static inline float cnet_pick_f32(int take, float a, float b)
{
    unsigned int ua, ub, m = -(unsigned int)take;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & m) | (ub & ~m);
    memcpy(&a, &ua, sizeof ua);
    return a;
}
static inline double cnet_pick_f64(int take, double a, double b)
{
    unsigned long long ua, ub, m = -(unsigned long long)take;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & m) | (ub & ~m);
    memcpy(&a, &ua, sizeof ua);
    return a;
}
#define cnet_pick(take, a, b) \
    _Generic((a), float: cnet_pick_f32, double: cnet_pick_f64)(take, a, b)

/* Lines of n bytes at p, prefetched for reading once (non-temporal: no room taken
 * in the outer caches). */
static inline void cnet_prefetch_once(const void* p, size_t n)
{
    for (size_t b = 0; b < n; b += 64) __builtin_prefetch((const char*)p + b, 0, 0);
}
/* The same for the n bytes CNET_STREAM_AHEAD past p: a streaming kernel (batch norm's
 * passes over activations, the grouped layers' staging) calls it for each row it
 * reads, since the hardware prefetcher alone kept too few DRAM misses in flight (the
 * masked gradient sums over 32x32x256 x 64 read at ~30 GB/s; ~45-55 so).  The address
 * is made as an integer: it may lie past the array's end (a prefetch never faults). */
#define CNET_STREAM_AHEAD 4096
static inline void cnet_prefetch_ahead(const void* p, size_t n)
{
    cnet_prefetch_once((const void*)((uintptr_t)p + CNET_STREAM_AHEAD), n);
}

#define CNET_CAT_(a, b) a##b
#define CNET_CAT(a, b) CNET_CAT_(a, b)
#define CNET_FN(name) CNET_CAT(name, SFX)

#endif /* CNET_SIMD_H */
