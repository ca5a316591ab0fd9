/* Batch-norm kernels over channels-last rows (n rows of C channels) that the
 * convolutions run too, on their chunks while in cache: the per-channel moments
 * (the batch norm's statistics pass in _batchnorm.pyx; _conv.pyx's conv_direct /
 * gemm_packed with moments, for a training batch norm after the layer) and the
 * backward's dx (_batchnorm.backward_dx; conv_direct_backward's chunks of the
 * output gradient of a layer before a training batch norm).  One body for float
 * (f) and double (d).
 */
#ifndef CNET_BN_SHARED_H
#define CNET_BN_SHARED_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "_simd.h"
#ifndef CNET_R
#define CNET_R __restrict__
#endif
/* Rows summed in the dtype before a double accumulation; channels per
   register-resident column; the largest C that takes the register path. */
#define BN_BLOCK 8
#define BN_W 8
#define BN_REG_C 32
typedef float bn_vf __attribute__((vector_size(16)));
typedef int32_t bn_vif __attribute__((vector_size(16)));
typedef double bn_vd __attribute__((vector_size(16)));
typedef int64_t bn_vid __attribute__((vector_size(16)));
/* T the scalar, VT its 16-byte vector (GCC/Clang vector extensions: SSE2 on
   x86-64, NEON on arm64), L the lanes per vector. */
#define CNET_BN_MOMENTS_KERNEL(T, VT, L, SFX)                                                   \
static inline VT bn_ld_##SFX(const T* p) { VT v; memcpy(&v, p, sizeof v); return v; }       \
/* Mean and sum of squared deviations of n rows, taken about the first row k.               \
   Rows go in blocks of BN_BLOCK summed in T, blocks are summed in double:                  \
   float32 SIMD speed with double-accurate totals.  Few channels (a multiple                \
   of BN_W, at most BN_REG_C): BN_W-channel columns with their accumulators in              \
   vector registers; otherwise whole rows against block sums in scratch (2*C                \
   values), where a small C would chain every row through memory. */                        \
CNET_CLONES static void bn_moments_##SFX(const T* CNET_R x, ptrdiff_t n, ptrdiff_t C,                   \
                             double* CNET_R mean, double* CNET_R m2, T* CNET_R scratch) {   \
    for (ptrdiff_t c = 0; c < C; c++) { mean[c] = 0.0; m2[c] = 0.0; }                       \
    if (C % BN_W == 0 && C <= BN_REG_C) {                                                   \
        for (ptrdiff_t c0 = 0; c0 < C; c0 += BN_W) {                                        \
            VT k[BN_W / L];                                                                 \
            for (int i = 0; i < BN_W / L; i++) k[i] = bn_ld_##SFX(x + c0 + i * L);          \
            for (ptrdiff_t r0 = 1; r0 < n; r0 += BN_BLOCK) {                                \
                ptrdiff_t r1 = r0 + BN_BLOCK < n ? r0 + BN_BLOCK : n;                       \
                VT b1[BN_W / L] = {0}, b2[BN_W / L] = {0};                                  \
                T t1[BN_W], t2[BN_W];                                                       \
                for (ptrdiff_t r = r0; r < r1; r++) {                                       \
                    for (int i = 0; i < BN_W / L; i++) {                                    \
                        VT d = bn_ld_##SFX(x + r * C + c0 + i * L) - k[i];                  \
                        b1[i] += d;                                                         \
                        b2[i] += d * d;                                                     \
                    }                                                                       \
                }                                                                           \
                memcpy(t1, b1, sizeof t1);                                                  \
                memcpy(t2, b2, sizeof t2);                                                  \
                for (int w = 0; w < BN_W; w++) { mean[c0 + w] += t1[w]; m2[c0 + w] += t2[w]; }\
            }                                                                               \
        }                                                                                   \
    } else {                                                                                \
        T* CNET_R b1 = scratch;                                                             \
        T* CNET_R b2 = scratch + C;                                                         \
        for (ptrdiff_t r0 = 1; r0 < n; r0 += BN_BLOCK) {                                    \
            ptrdiff_t r1 = r0 + BN_BLOCK < n ? r0 + BN_BLOCK : n;                           \
            for (ptrdiff_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }                     \
            for (ptrdiff_t r = r0; r < r1; r++) {                                           \
                const T* CNET_R row = x + r * C;                                            \
                for (ptrdiff_t c = 0; c < C; c++) {                                         \
                    T d = row[c] - x[c];                                                    \
                    b1[c] += d;                                                             \
                    b2[c] += d * d;                                                         \
                }                                                                           \
            }                                                                               \
            for (ptrdiff_t c = 0; c < C; c++) { mean[c] += b1[c]; m2[c] += b2[c]; }         \
        }                                                                                   \
    }                                                                                       \
    for (ptrdiff_t c = 0; c < C; c++) {                                                     \
        double d = mean[c];                                                                 \
        mean[c] = (double)x[c] + d / (double)n;                                             \
        m2[c] -= d * d / (double)n;                                                         \
    }                                                                                       \
}

CNET_BN_MOMENTS_KERNEL(float, bn_vf, 4, f)
CNET_BN_MOMENTS_KERNEL(double, bn_vd, 2, d)

/* One piece's slot of doubles (a row of _batchnorm.moment_slots): the mean at 0,
   the sum of squared deviations at BN_PAD(C), 2*C scratch values of the dtype
   after them; pieces start on separate 64-byte lines (no false sharing). */
#define BN_PAD(C) (((C) + 7) & ~(ptrdiff_t)7)
#define BN_SLOT(C) (4 * BN_PAD(C))
static inline void bn_slot_moments_f(const float* x, ptrdiff_t n, ptrdiff_t C, double* slot) {
    bn_moments_f(x, n, C, slot, slot + BN_PAD(C), (float*)(slot + 2 * BN_PAD(C)));
}
static inline void bn_slot_moments_d(const double* x, ptrdiff_t n, ptrdiff_t C, double* slot) {
    bn_moments_d(x, n, C, slot, slot + BN_PAD(C), slot + 2 * BN_PAD(C));
}

/* The backward's dx = a*g + k*(x - mean) + b per channel, g = dy masked by the
   fused ReLU (where x * alpha + shift <= 0), a, k, b from the batch's sums. */
#define CNET_BN_DX_KERNEL(T, SFX)                                                               \
CNET_CLONES static void bn_dx_##SFX(const T* CNET_R x, const T* CNET_R dy, T* CNET_R dx, ptrdiff_t n,   \
                        ptrdiff_t C, const T* CNET_R mean, const T* CNET_R a,               \
                        const T* CNET_R k, const T* CNET_R b, const T* CNET_R alpha,        \
                        const T* CNET_R shift, int relu) {                                  \
    for (ptrdiff_t r = 0; r < n; r++) {                                                     \
        const T* CNET_R xr = x + r * C;                                                     \
        const T* CNET_R gr = dy + r * C;                                                    \
        T* CNET_R dr = dx + r * C;                                                          \
        cnet_prefetch_ahead(xr, C * sizeof(T));                                             \
        cnet_prefetch_ahead(gr, C * sizeof(T));                                             \
        if (relu) {                                                                         \
            for (ptrdiff_t c = 0; c < C; c++) {                                             \
                T v = xr[c] * alpha[c] + shift[c];                                          \
                T g = cnet_keep(gr[c], !(v <= (T)0));                                       \
                dr[c] = a[c] * g + k[c] * (xr[c] - mean[c]) + b[c];                         \
            }                                                                               \
        } else {                                                                            \
            for (ptrdiff_t c = 0; c < C; c++)                                               \
                dr[c] = a[c] * gr[c] + k[c] * (xr[c] - mean[c]) + b[c];                     \
        }                                                                                   \
    }                                                                                       \
}

CNET_BN_DX_KERNEL(float, f)
CNET_BN_DX_KERNEL(double, d)

#endif
