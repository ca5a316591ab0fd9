# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Convolution kernels: im2col, col2im and the bias gradient, NHWC, float32/float64.

Column layout.  For output pixel m = (n, oh, ow) of a chunk of images, row m of
the column matrix holds ``G`` consecutive segments of ``K = KH*KW*Cg`` values
(Cg = C // G), each ordered (kh, kw, c): exactly the row order of an HWIO
kernel reshaped to (K, C_out).  So ``col.reshape(M, G, K).transpose(1, 0, 2)``
is a stack of G matrices that BLAS reads in place (row stride G*K), and the
convolution is one batched GEMM against ``w.reshape(K, G, Cog).transpose(1, 0, 2)``
with no copy of either operand.  With G == 1 an im2col row is KH runs of KW*C
contiguous input values (one memcpy each when dilation is 1 and the run is
inside the image).

col2im is a gather: each output element dx[n, ih, iw, :] is owned by the thread
that owns input row (n, ih) and receives its contributions in fixed (kh, kw)
order, so there are no races and the result does not depend on the thread
count (bitwise).

The wrappers are the only shape checks (bounds checking is off).
"""
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, malloc, free

cimport cython
from cython cimport floating
import numpy as np
cimport numpy as cnp

from cnet_ext._openmp cimport effective_threads, cnet_min_elements_per_thread
from cnet_ext._bn_shared cimport (BN_PAD, BN_SLOT, bn_dx_d, bn_dx_f, bn_slot_moments_d,
                                   bn_slot_moments_f)
from cnet_ext import _batchnorm

cnp.import_array()


cdef inline size_t _address(a) except? 0:
    """ndarray a's data address: a.ctypes.data without the ctypes object (tens of
    microseconds per call between a step's kernels, its caches cold)."""
    return <size_t>cnp.PyArray_DATA(<cnp.ndarray?>a)


# ---------------------------------------------------------------------------
# im2col

cdef extern from *:
    """
    #include <string.h>
    #include "_simd.h"
    /* Grouped layouts move C_in/groups values per group and tap; a constant
       size lets the compiler emit one vector move instead of a loop. */
    #define CNET_SCATTER_CASE(B) case B: for (Py_ssize_t g = 0; g < G; g++)                \
        memcpy(d + g * ds, s + g * B, B); break;
    static inline void cnet_scatter_groups(char* d, const char* s, Py_ssize_t G, size_t b,
                                           Py_ssize_t ds) {
        switch (b) {
            CNET_SCATTER_CASE(4) CNET_SCATTER_CASE(8) CNET_SCATTER_CASE(16)
            CNET_SCATTER_CASE(32) CNET_SCATTER_CASE(64) CNET_SCATTER_CASE(128)
            CNET_SCATTER_CASE(256)
            default: for (Py_ssize_t g = 0; g < G; g++) memcpy(d + g * ds, s + g * b, b);
        }
    }
    static inline void cnet_zero_groups(char* d, Py_ssize_t G, size_t b, Py_ssize_t ds) {
        for (Py_ssize_t g = 0; g < G; g++) memset(d + g * ds, 0, b);
    }
    #define CNET_GADD_CASE(N) case N: for (Py_ssize_t g = 0; g < G; g++)                   \
        for (int c = 0; c < N; c++) o[g * N + c] += s[g * K + c]; break;
    #define CNET_GATHER_ADD(NAME, T)                                                       \
    static inline void NAME(T* restrict o, const T* restrict s, Py_ssize_t G,              \
                            Py_ssize_t Cg, Py_ssize_t K) {                                 \
        switch (Cg) {                                                                      \
            CNET_GADD_CASE(1) CNET_GADD_CASE(2) CNET_GADD_CASE(4) CNET_GADD_CASE(8)        \
            CNET_GADD_CASE(16) CNET_GADD_CASE(32) CNET_GADD_CASE(64)                       \
            default: for (Py_ssize_t g = 0; g < G; g++)                                    \
                for (Py_ssize_t c = 0; c < Cg; c++) o[g * Cg + c] += s[g * K + c];         \
        }                                                                                  \
    }
    CNET_GATHER_ADD(cnet_gather_add_f32, float)
    CNET_GATHER_ADD(cnet_gather_add_f64, double)
    /* o[0:n] += s[0:n]: a whole kernel row of KW*C values at once (col2im). */
    #define CNET_ADD_RUN(NAME, T)                                                          \
    static inline void NAME(T* restrict o, const T* restrict s, Py_ssize_t n) {            \
        for (Py_ssize_t i = 0; i < n; i++) o[i] += s[i];                                   \
    }
    CNET_ADD_RUN(cnet_add_run_f32, float)
    CNET_ADD_RUN(cnet_add_run_f64, double)
    """
    void cnet_scatter_groups(char* d, const char* s, Py_ssize_t G, size_t b,
                             Py_ssize_t ds) noexcept nogil
    void cnet_prefetch_ahead(const void* p, size_t n) noexcept nogil
    void cnet_zero_groups(char* d, Py_ssize_t G, size_t b, Py_ssize_t ds) noexcept nogil
    void cnet_gather_add_f32(float* o, const float* s, Py_ssize_t G, Py_ssize_t Cg,
                             Py_ssize_t K) noexcept nogil
    void cnet_gather_add_f64(double* o, const double* s, Py_ssize_t G, Py_ssize_t Cg,
                             Py_ssize_t K) noexcept nogil
    void cnet_add_run_f32(float* o, const float* s, Py_ssize_t n) noexcept nogil
    void cnet_add_run_f64(double* o, const double* s, Py_ssize_t n) noexcept nogil


cdef inline void _im2col_row(const floating* x, floating* dst, Py_ssize_t n, Py_ssize_t oh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
                             Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                             Py_ssize_t G) noexcept nogil:
    """Column rows of the OW output pixels of output row (n, oh)."""
    cdef Py_ssize_t Cg = C // G
    cdef Py_ssize_t K = KH * KW * Cg
    cdef Py_ssize_t ow, kh, kw, ih, iw, iw0, c
    cdef const floating* src
    cdef floating* d
    cdef const floating* img = x + n * H * W * C
    cdef size_t run = KW * Cg * sizeof(floating)
    cdef size_t seg = Cg * sizeof(floating)
    cdef Py_ssize_t stride_bytes = K * sizeof(floating)
    if G == 1:
        for ow in range(OW):
            iw0 = ow * sw - pw
            for kh in range(KH):
                ih = oh * sh - ph + kh * dh
                # One unsigned compare tests 0 <= ih < H (caffe's trick).
                if <size_t>ih >= <size_t>H:
                    memset(dst, 0, run)
                elif dw == 1 and iw0 >= 0 and iw0 + KW <= W:
                    # The whole kernel row is one contiguous run of KW*C inputs.
                    memcpy(dst, img + (ih * W + iw0) * C, run)
                else:
                    for kw in range(KW):
                        iw = iw0 + kw * dw
                        if <size_t>iw < <size_t>W:
                            memcpy(dst + kw * C, img + (ih * W + iw) * C, seg)
                        else:
                            memset(dst + kw * C, 0, seg)
                dst += KW * C
        return
    # Groups: the input pixel's C values are one read; group g's Cg of them go to
    # segment g of the row (stride K), so each tap is tested once for all groups.
    for ow in range(OW):
        iw0 = ow * sw - pw
        for kh in range(KH):
            ih = oh * sh - ph + kh * dh
            for kw in range(KW):
                iw = iw0 + kw * dw
                d = dst + (kh * KW + kw) * Cg
                if <size_t>ih < <size_t>H and <size_t>iw < <size_t>W:
                    cnet_scatter_groups(<char*>d, <const char*>(img + (ih * W + iw) * C), G,
                                        seg, stride_bytes)
                else:
                    cnet_zero_groups(<char*>d, G, seg, stride_bytes)
        dst += G * K


cdef void _im2col(const floating* x, floating* col, Py_ssize_t n0, Py_ssize_t n1,
                  Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                  Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                  Py_ssize_t G, int n_threads) noexcept nogil:
    cdef Py_ssize_t rows = (n1 - n0) * OH
    cdef Py_ssize_t row_len = OW * KH * KW * C   # values written per output row
    cdef Py_ssize_t r
    cdef int nt = effective_threads(rows * row_len, n_threads)
    if nt == 1:
        for r in range(rows):
            _im2col_row(x, col + r * row_len, n0 + r // OH, r % OH, H, W, C, OW,
                        KH, KW, sh, sw, ph, pw, dh, dw, G)
    else:
        for r in prange(rows, nogil=True, num_threads=nt, schedule="static"):
            _im2col_row(x, col + r * row_len, n0 + r // OH, r % OH, H, W, C, OW,
                        KH, KW, sh, sw, ph, pw, dh, dw, G)


# ---------------------------------------------------------------------------
# col2im (gather over input rows)

cdef inline void _col2im_row(const floating* col, floating* dx, Py_ssize_t n0, Py_ssize_t n,
                             Py_ssize_t ih, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t G) noexcept nogil:
    """dx[n, ih, :, :] = sum of the column entries that read input row ih."""
    cdef Py_ssize_t Cg = C // G
    cdef Py_ssize_t K = KH * KW * Cg
    cdef Py_ssize_t row_len = G * K
    cdef Py_ssize_t kh, kw, t, oh, ow, iw, g, c
    cdef floating* out = dx + (n * H + ih) * W * C
    cdef floating* o
    cdef const floating* src
    cdef const floating* pix
    memset(out, 0, W * C * sizeof(floating))
    for kh in range(KH):
        t = ih + ph - kh * dh
        if t < 0 or t % sh != 0:
            continue
        oh = t // sh
        if oh >= OH:
            continue
        pix = col + ((n - n0) * OH + oh) * OW * row_len
        if G == 1 and dw == 1:
            # The mirror of im2col's memcpy: a window inside the row receives its
            # KW*C column values as one contiguous run (small C: 1.5-3x faster
            # than C values per tap).  Edge windows go tap by tap.
            for ow in range(OW):
                iw = ow * sw - pw
                src = pix + ow * row_len + kh * KW * C
                if iw >= 0 and iw + KW <= W:
                    if floating is float:
                        cnet_add_run_f32(out + iw * C, src, KW * C)
                    else:
                        cnet_add_run_f64(out + iw * C, src, KW * C)
                    continue
                for kw in range(KW):
                    if <size_t>(iw + kw) < <size_t>W:
                        if floating is float:
                            cnet_add_run_f32(out + (iw + kw) * C, src + kw * C, C)
                        else:
                            cnet_add_run_f64(out + (iw + kw) * C, src + kw * C, C)
            continue
        for kw in range(KW):
            for ow in range(OW):
                iw = ow * sw - pw + kw * dw
                if <size_t>iw >= <size_t>W:
                    continue
                src = pix + ow * row_len + (kh * KW + kw) * Cg
                o = out + iw * C
                if floating is float:
                    cnet_gather_add_f32(o, src, G, Cg, K)
                else:
                    cnet_gather_add_f64(o, src, G, Cg, K)


cdef void _col2im(const floating* col, floating* dx, Py_ssize_t n0, Py_ssize_t n1,
                  Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                  Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                  Py_ssize_t G, int n_threads) noexcept nogil:
    cdef Py_ssize_t rows = (n1 - n0) * H
    cdef Py_ssize_t r
    cdef int nt = effective_threads((n1 - n0) * OH * OW * KH * KW * C, n_threads)
    if nt == 1:
        for r in range(rows):
            _col2im_row(col, dx, n0, n0 + r // H, r % H, H, W, C, OH, OW, KH, KW,
                        sh, sw, ph, pw, dh, dw, G)
    else:
        for r in prange(rows, nogil=True, num_threads=nt, schedule="static"):
            _col2im_row(col, dx, n0, n0 + r // H, r % H, H, W, C, OH, OW, KH, KW,
                        sh, sw, ph, pw, dh, dw, G)


# ---------------------------------------------------------------------------
# Direct convolution (groups == 1, C_out a multiple of the vector width)
#
# Small channel counts make skinny GEMMs that BLAS runs far below its peak, and
# im2col writes KH*KW copies of every input.  This kernel computes a block of
# 6 output pixels x one vector of output channels in registers (8 x 2 vectors
# with AVX-512's 32 registers): per input channel it loads the weight vectors
# and issues one broadcast-FMA per pixel and vector.  GCC
# vector extensions keep the source ISA-neutral; target_clones builds it for
# baseline x86-64, AVX2 (v3) and AVX-512 (v4) and picks one at load time, so no
# -march flag is needed.  Pixels outside the input read a buffer of zeros, so
# the inner loop has no branches.

cdef extern from *:
    """
    #include "_simd.h"

    /* acc[v][p] += XAT * WK[t * Cw + v * VW : + VW] for t < N, XAT an expression of
       pixel p and step t (xb[p][t]): per step NV weight vectors and PB broadcasts feed
       PB * NV FMAs (inside CNET_DIRECT_ROW). */
    #define CNET_DIRECT_FMAS(T, VT, VTU, XAT, WK, N, NV, PB, VW)                           \
        do {                                                                               \
            const T* wk_ = (WK);                                                           \
            for (Py_ssize_t t = 0; t < (N); t++) {                                         \
                VT wv[NV];                                                                 \
                for (int v = 0; v < NV; v++) wv[v] = *(const VTU*)(wk_ + t * Cw + v * VW); \
                _Pragma("GCC unroll 8")                                                    \
                for (int p = 0; p < PB; p++) {                                             \
                    T xv = (XAT);                                                          \
                    for (int v = 0; v < NV; v++) acc[v][p] += xv * wv[v];                  \
                }                                                                          \
            }                                                                              \
        } while (0)

    /* Every pixel's accumulators start at the bias of channels co.. (or zero). */
    #define CNET_DIRECT_INIT(VT, VTU, VW, NV, PB, co)                                      \
        for (int v = 0; v < NV; v++) {                                                     \
            VT b0 = {0};                                                                   \
            if (bias) b0 = *(const VTU*)(bias + (co) + v * VW);                            \
            for (int p = 0; p < PB; p++) acc[v][p] = b0;                                   \
        }

    /* Store the first NP pixels of acc[v][p] at YP + v * VW (YP: an expression in p),
       the last vector only up to COUT - co valid lanes. */
    #define CNET_DIRECT_STORE(T, VTU, VW, NV, NP, YP, COUT, co)                            \
        for (int p = 0; p < (NP); p++)                                                     \
            for (int v = 0; v < NV; v++) {                                                 \
                T* yp = (YP) + v * VW;                                                     \
                Py_ssize_t left = (COUT) - (co) - v * VW;                                  \
                if (left >= VW) *(VTU*)yp = acc[v][p];                                     \
                else for (Py_ssize_t c = 0; c < left; c++) yp[c] = acc[v][p][c];           \
            }

    #define CNET_DIRECT_ROW(NAME, T, VT, VTU, VW, NV, PB)                                  \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* w, const T* bias, const T* zeros, T* yrow,                    \
        Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,             \
        Py_ssize_t Cx, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy, Py_ssize_t Cw,       \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,         \
        Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                                       \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        const T* img = x + n * H * W * Cx;                                                 \
        for (Py_ssize_t ow0 = 0; ow0 < OW; ow0 += PB) {                                    \
            Py_ssize_t nb = OW - ow0 < PB ? OW - ow0 : PB;                                 \
            int inner = nb == PB && dw == 1 && Cx == C && ow0 * sw - pw >= 0               \
                        && (ow0 + PB - 1) * sw - pw + KW <= W;                             \
            for (Py_ssize_t co = 0; co < Cout; co += VW * NV) {                            \
                VT acc[NV][PB];                                                            \
                CNET_DIRECT_INIT(VT, VTU, VW, NV, PB, co);                                 \
                for (Py_ssize_t kh = 0; kh < KH; kh++) {                                   \
                    Py_ssize_t ih = oh * sh - ph + kh * dh;                                \
                    if ((size_t)ih >= (size_t)H) continue;                                 \
                    const T* xrow = img + ih * W * Cx;                                     \
                    if (inner) {                                                           \
                        /* Every window of the block inside the row: its KW*C taps   */    \
                        /* are one run, as are the weights (few channels: no per-tap */    \
                        /* pointer set-up; same products in the same order).          */   \
                        const T* x0 = xrow + (ow0 * sw - pw) * C;                          \
                        const T* wk = w + kh * KW * C * Cw + co;                           \
                        /* pixels sw*C apart: as a constant, every broadcast is x0 plus */ \
                        /* a displacement (a pointer per pixel outgrew the registers    */ \
                        /* and came back from the stack each step: ResNeXt's grouped    */ \
                        /* forward 10-16% faster)                                      */ \
                        switch (sw * C) {                                                  \
                        case 16:                                                           \
                            CNET_DIRECT_FMAS(T, VT, VTU, x0[p * 16 + t], wk, KW * C, NV, PB, VW); \
                            break;                                                         \
                        case 32:                                                           \
                            CNET_DIRECT_FMAS(T, VT, VTU, x0[p * 32 + t], wk, KW * C, NV, PB, VW); \
                            break;                                                         \
                        case 64:                                                           \
                            CNET_DIRECT_FMAS(T, VT, VTU, x0[p * 64 + t], wk, KW * C, NV, PB, VW); \
                            break;                                                         \
                        default: {                                                         \
                            const T* xb[PB];                                               \
                            for (int p = 0; p < PB; p++) xb[p] = x0 + p * sw * C;          \
                            CNET_DIRECT_FMAS(T, VT, VTU, xb[p][t], wk, KW * C, NV, PB, VW); \
                        }                                                                  \
                        }                                                                  \
                        continue;                                                          \
                    }                                                                      \
                    for (Py_ssize_t kw = 0; kw < KW; kw++) {                               \
                        const T* xp[PB];                                                   \
                        for (int p = 0; p < PB; p++) {                                     \
                            Py_ssize_t iw = (ow0 + p) * sw - pw + kw * dw;                 \
                            xp[p] = (p < nb && (size_t)iw < (size_t)W) ? xrow + iw * Cx    \
                                                                       : zeros;            \
                        }                                                                  \
                        CNET_DIRECT_FMAS(T, VT, VTU, xp[p][t], w + (kh * KW + kw) * C * Cw + co, C, \
                                         NV, PB, VW);                                      \
                    }                                                                      \
                }                                                                          \
                CNET_DIRECT_STORE(T, VTU, VW, NV, nb, yrow + (ow0 + p) * Cy + co, Cout, co); \
            }                                                                              \
        }                                                                                  \
    }

    /* Every kernel in the register blocks of _direct_variant (per dtype: the vector
       types are local to each function).  6 pixels x one vector fits the 16
       registers of AVX2; AVX-512's 32 registers take 8 pixels (CIFAR's widths
       32/16/8 divide evenly: no wasted lanes) x one or two vectors of outputs. */
    #define CNET_DIRECT_BLOCKS(KERNEL, NAME)                                               \
        KERNEL(NAME##6_f32, float, cnet_t16f, cnet_t16fu, 16, 1, 6)                        \
        KERNEL(NAME##6_f64, double, cnet_t8d, cnet_t8du, 8, 1, 6)                          \
        KERNEL(NAME##8_f32, float, cnet_t16f, cnet_t16fu, 16, 1, 8)                        \
        KERNEL(NAME##8_f64, double, cnet_t8d, cnet_t8du, 8, 1, 8)                          \
        KERNEL(NAME##8x2_f32, float, cnet_t16f, cnet_t16fu, 16, 2, 8)                      \
        KERNEL(NAME##8x2_f64, double, cnet_t8d, cnet_t8du, 8, 2, 8)
    CNET_DIRECT_BLOCKS(CNET_DIRECT_ROW, cnet_direct_row)

    /* One output row oh of PB images at once: the block's pixels are the same
       (oh, ow) in consecutive images, so every one has the same in-bounds taps and
       the padding is skipped, not multiplied by zeros.  For small maps, where a
       row has fewer than PB pixels (a 4x4 map fills half of an 8-pixel row block)
       and padding is a large share of the taps (3x3: 31% at 4x4, 56% at 2x2).  A
       partial block (nimg < PB) repeats image n and stores only nimg images. */
    #define CNET_DIRECT_IMAGES(NAME, T, VT, VTU, VW, NV, PB)                               \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* w, const T* bias, T* y, Py_ssize_t n, Py_ssize_t nimg,        \
        Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t Cx,            \
        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy, Py_ssize_t Cw,       \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,         \
        Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                                       \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        const T* img[PB];                                                                  \
        T* yrow[PB];                                                                       \
        for (int p = 0; p < PB; p++) {                                                     \
            Py_ssize_t q = n + (p < nimg ? p : 0);                                         \
            img[p] = x + q * H * W * Cx;                                                   \
            yrow[p] = y + (q * OH + oh) * OW * Cy;                                         \
        }                                                                                  \
        for (Py_ssize_t co = 0; co < Cout; co += VW * NV) {                                \
            for (Py_ssize_t ow = 0; ow < OW; ow++) {                                       \
                Py_ssize_t iw0 = ow * sw - pw;                                             \
                /* in-bounds kw: iw0 + kw * dw in [0, W) */                                \
                Py_ssize_t kw_lo = iw0 >= 0 ? 0 : (-iw0 + dw - 1) / dw;                    \
                Py_ssize_t kw_hi = W - iw0 <= 0 ? 0 : (W - iw0 - 1) / dw + 1;              \
                if (kw_hi > KW) kw_hi = KW;                                                \
                VT acc[NV][PB];                                                            \
                CNET_DIRECT_INIT(VT, VTU, VW, NV, PB, co);                                 \
                for (Py_ssize_t kh = 0; kh < KH; kh++) {                                   \
                    Py_ssize_t ih = oh * sh - ph + kh * dh;                                \
                    if ((size_t)ih >= (size_t)H || kw_lo >= kw_hi) continue;               \
                    if (dw == 1 && Cx == C) {                                              \
                        /* the in-bounds taps of the row are one run */                    \
                        const T* xb[PB];                                                   \
                        for (int p = 0; p < PB; p++)                                       \
                            xb[p] = img[p] + (ih * W + iw0 + kw_lo) * C;                   \
                        CNET_DIRECT_FMAS(T, VT, VTU, xb[p][t], w + (kh * KW + kw_lo) * C * Cw + co, \
                                         (kw_hi - kw_lo) * C, NV, PB, VW);                 \
                        continue;                                                          \
                    }                                                                      \
                    for (Py_ssize_t kw = kw_lo; kw < kw_hi; kw++) {                        \
                        const T* xp[PB];                                                   \
                        for (int p = 0; p < PB; p++)                                       \
                            xp[p] = img[p] + (ih * W + iw0 + kw * dw) * Cx;                \
                        CNET_DIRECT_FMAS(T, VT, VTU, xp[p][t], w + (kh * KW + kw) * C * Cw + co, C, \
                                         NV, PB, VW);                                      \
                    }                                                                      \
                }                                                                          \
                CNET_DIRECT_STORE(T, VTU, VW, NV, nimg, yrow[p] + ow * Cy + co, Cout, co);   \
            }                                                                              \
        }                                                                                  \
    }

    CNET_DIRECT_BLOCKS(CNET_DIRECT_IMAGES, cnet_direct_img)

    /* Weight gradient of one kernel tap (kh, kw) over images [n0, n1):
       gw[ci, co] (+)= sum over output pixels of x[n, ih, iw, ci] * dy[n, oh, ow, co].
       Registers hold PB input channels x NV vectors of output channels; per
       pixel NV vector loads of dy and PB*NV broadcast-FMAs.  Channel tails read a
       clamped (valid) channel and are not stored.  Fixed loop order: the sum
       is the same whatever thread runs it. */
    /* CNET_DIRECT_WGRAD's pixels of one row: acc[v][j] += XAT * dy's vector v, XAT
       input channel j of the pixel's tap at xp. */
    #define CNET_WGRAD_PIXELS(T, VT, VTU, VW, NV, PB, XAT)                                 \
        for (Py_ssize_t ow = ow_lo; ow < ow_hi; ow++) {                                    \
            VT dv[NV];                                                                     \
            for (int v = 0; v < NV; v++) dv[v] = *(const VTU*)(dr + ow * Cy + v * VW);     \
            const T* xp = xr + (ow * sw + off) * Cx;                                       \
            _Pragma("GCC unroll 16")                                                       \
            for (int j = 0; j < PB; j++) {                                                 \
                T xv = (XAT);                                                              \
                for (int v = 0; v < NV; v++) acc[v][j] += xv * dv[v];                      \
            }                                                                              \
        }

    #define CNET_DIRECT_WGRAD(NAME, T, VT, VTU, VW, NV, PB)                                \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* dy, T* gw, int accumulate, Py_ssize_t n0, Py_ssize_t n1,      \
        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,            \
        Py_ssize_t Cx, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy,       \
        Py_ssize_t Cgw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,        \
        Py_ssize_t dh, Py_ssize_t dw)                                                      \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        /* Output columns whose input column is inside the image. */                       \
        Py_ssize_t off = kw * dw - pw;                                                     \
        Py_ssize_t ow_lo = off >= 0 ? 0 : (-off + sw - 1) / sw;                            \
        Py_ssize_t ow_hi = W - 1 - off < 0 ? 0 : (W - 1 - off) / sw + 1;                   \
        if (ow_hi > OW) ow_hi = OW;                                                        \
        for (Py_ssize_t ci0 = 0; ci0 < C; ci0 += PB) {                                     \
            Py_ssize_t nb = C - ci0 < PB ? C - ci0 : PB;                                   \
            Py_ssize_t cidx[PB];                                                           \
            for (int j = 0; j < PB; j++) cidx[j] = ci0 + (j < nb ? j : nb - 1);            \
            for (Py_ssize_t co = 0; co < Cout; co += VW * NV) {                            \
                VT acc[NV][PB];                                                            \
                for (int v = 0; v < NV; v++)                                               \
                    for (int j = 0; j < PB; j++) acc[v][j] = (VT){0};                      \
                for (Py_ssize_t n = n0; n < n1; n++) {                                     \
                    for (Py_ssize_t oh = 0; oh < OH; oh++) {                               \
                        Py_ssize_t ih = oh * sh - ph + kh * dh;                            \
                        if ((size_t)ih >= (size_t)H) continue;                             \
                        const T* xr = x + (n * H + ih) * W * Cx;                           \
                        const T* dr = dy + ((n * OH + oh) * OW) * Cy + co;                 \
                        /* a full block's channels at constant offsets: 16 indices */  \
                        /* would not stay in registers                                */  \
                        if (nb == PB) {                                                    \
                            CNET_WGRAD_PIXELS(T, VT, VTU, VW, NV, PB, xp[ci0 + j]);        \
                        } else {                                                           \
                            CNET_WGRAD_PIXELS(T, VT, VTU, VW, NV, PB, xp[cidx[j]]);        \
                        }                                                                  \
                    }                                                                      \
                }                                                                          \
                for (Py_ssize_t j = 0; j < nb; j++)                                        \
                    for (int v = 0; v < NV; v++) {                                         \
                        VTU* g = (VTU*)(gw + (ci0 + j) * Cgw + co + v * VW);               \
                        if (accumulate) *g += acc[v][j]; else *g = acc[v][j];              \
                    }                                                                      \
            }                                                                              \
        }                                                                                  \
    }

    CNET_DIRECT_BLOCKS(CNET_DIRECT_WGRAD, cnet_direct_wgrad)
    CNET_DIRECT_WGRAD(cnet_direct_wgrad6x4_f32, float, cnet_w16f4, cnet_w16fu4, 16, 4, 6)
    CNET_DIRECT_WGRAD(cnet_direct_wgrad6x4_f64, double, cnet_w8d4, cnet_w8du4, 8, 4, 6)
    CNET_DIRECT_WGRAD(cnet_direct_wgrad16_f32, float, cnet_t16f, cnet_t16fu, 16, 1, 16)
    CNET_DIRECT_WGRAD(cnet_direct_wgrad16_f64, double, cnet_t8d, cnet_t8du, 8, 1, 16)

    /* Narrow first layers (one input channel, C_out below one vector, stride and
       dilation 1 along the width: LeNet's 1 -> 6), AVX-512 only.  The 8 x 1 block
       of CNET_DIRECT_ROW would fill 6 of its 16 lanes; here the lanes are
       pixels: a segment of PV vectors of consecutive output pixels, CB channels
       at a time, each tap one unaligned load of the input row per vector and a
       broadcast weight per channel.  The planar sums go out through a small
       buffer into NHWC.  ``w`` is the zero-padded weight of _direct_operands
       (row pitch Cw: C_out rounded up to CB; padded bias included), so a pass
       over channels co0.. reads CB of them and stores the valid ones.
       Segments that need padding, or whose loads would pass the image's end, read
       a zero-filled copy of the row's inputs. */
    #define CNET_NARROW_PV 2
    #define CNET_NARROW_CB 6
    #define CNET_NARROW_MAX_KW 16
    #define CNET_NARROW_ROW(NAME, T, VW)                                                   \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* w, const T* bias, T* yrow, Py_ssize_t n, Py_ssize_t oh,       \
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cw,         \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t pw,         \
        Py_ssize_t dh)                                                                     \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        enum { PV = CNET_NARROW_PV, CB = CNET_NARROW_CB, SEG = CNET_NARROW_PV * VW };      \
        const T* img = x + n * H * W;                                                      \
        const T* img_end = img + H * W;                                                    \
        T tmp[CB][SEG] __attribute__((aligned(64)));                                       \
        T loc[SEG + CNET_NARROW_MAX_KW + VW];                                              \
        for (Py_ssize_t ow0 = 0; ow0 < OW; ow0 += SEG) {                                   \
            Py_ssize_t np = OW - ow0 < SEG ? OW - ow0 : SEG;                               \
            Py_ssize_t iw0 = ow0 - pw;                                                     \
            for (Py_ssize_t co0 = 0; co0 < Cout; co0 += CB) {                              \
                Py_ssize_t cn = Cout - co0 < CB ? Cout - co0 : CB;                         \
                VT acc[CB][PV];                                                            \
                for (int c = 0; c < CB; c++) {                                             \
                    T b = bias ? bias[co0 + c] : 0;                                        \
                    for (int v = 0; v < PV; v++) acc[c][v] = (VT){0} + b;                  \
                }                                                                          \
                for (Py_ssize_t kh = 0; kh < KH; kh++) {                                   \
                    Py_ssize_t ih = oh * sh - ph + kh * dh;                                \
                    if ((size_t)ih >= (size_t)H) continue;                                 \
                    const T* xs = img + ih * W + iw0;                                      \
                    if (iw0 < 0 || iw0 + np + KW - 1 > W || xs + SEG + KW - 1 > img_end) { \
                        for (Py_ssize_t j = 0; j < SEG + KW - 1; j++) {                    \
                            Py_ssize_t iw = iw0 + j;                                       \
                            loc[j] = (j < np + KW - 1 && iw >= 0 && iw < W)                \
                                     ? img[ih * W + iw] : 0;                               \
                        }                                                                  \
                        xs = loc;                                                          \
                    }                                                                      \
                    const T* wk = w + kh * KW * Cw + co0;                                  \
                    for (Py_ssize_t kw = 0; kw < KW; kw++, wk += Cw) {                     \
                        VT xv[PV];                                                         \
                        for (int v = 0; v < PV; v++) xv[v] = *(const VTU*)(xs + kw + v * VW); \
                        _Pragma("GCC unroll 8")                                            \
                        for (int c = 0; c < CB; c++) {                                     \
                            T wc = wk[c];                                                  \
                            for (int v = 0; v < PV; v++) acc[c][v] += xv[v] * wc;          \
                        }                                                                  \
                    }                                                                      \
                }                                                                          \
                for (int c = 0; c < CB; c++)                                               \
                    for (int v = 0; v < PV; v++) *(VT*)(tmp[c] + v * VW) = acc[c][v];      \
                T* yp = yrow + ow0 * Cout + co0;                                           \
                for (Py_ssize_t p = 0; p < np; p++)                                        \
                    for (Py_ssize_t c = 0; c < cn; c++) yp[p * Cout + c] = tmp[c][p];      \
            }                                                                              \
        }                                                                                  \
    }
    CNET_NARROW_ROW(cnet_narrow_row_f32, float, 16)
    CNET_NARROW_ROW(cnet_narrow_row_f64, double, 8)

    /* Weight gradient of the narrow layers (see CNET_NARROW_ROW; the old small
       kernel below filled 6 of 16 lanes and streamed dy once per kernel row at 8
       FMAs per pixel).  Lanes are pixels again: dy of images [n0, n1) is first
       made planar (``dyp``: per output row, C_out rows of OWp = OW rounded up to
       a vector, zero past OW) and the input zero-padded (``xp``: per input row,
       OWp + KW - 1 values starting at column -pw), so every load is a plain
       aligned-or-not vector with no edge cases.  Registers hold KB taps x CB
       channels of one kernel row; per vector of pixels KB input loads feed KB *
       CB FMAs with dy from memory.  5 x 3 (a 5-wide row in one pass, 6 channels
       in two) beat 3 x 6 (two passes over the row, the second a third empty):
       MNIST's conv1 backward, batch 128, one thread, 1.43-1.52 -> 0.87-1.12 ms.
       Each accumulator is summed across its lanes at the end: a fixed order,
       whatever thread runs it. */
    #define CNET_NARROW_KB 5
    #define CNET_NARROW_WCB 3

    /* Where the narrow weight gradient's planar dy comes from, when not a plain dy
       (LeNet's conv1 -> ReLU -> 2x2 max pool): each row is gathered from the
       pool's output gradient by its argmax (the pool's own backward row kernel, into
       a row buffer), masked by the fused ReLU's output (y <= 0 -> 0, as
       relu_backward) and summed per channel for the bias gradient, all while it is
       made planar: the pool's dx, the masked dy and their passes are never
       written.  y, pool_g and bias may each be NULL (dense dy, no mask, no sums). */
    typedef struct {
        const void* y;
        const void* pool_g;
        const int* pool_idx;
        Py_ssize_t PH, PW, kh, kw, sh, sw, ph, pw, dh, dw;
        double* bias;
    } cnet_grad_src;
    #define T float
    #define SFX f32
    #include "_pool_impl.h"
    #undef T
    #undef SFX
    #define T double
    #define SFX f64
    #include "_pool_impl.h"
    #undef T
    #undef SFX
    #define CNET_NARROW_WGRAD(NAME, T, VW, POOL_ROW)                                       \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* dy, T* gw, int accumulate, Py_ssize_t n0, Py_ssize_t n1,      \
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,         \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t pw,         \
        Py_ssize_t dh, T* xp, T* dyp, const cnet_grad_src* src, T* rowbuf)                 \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        enum { KB = CNET_NARROW_KB, CB = CNET_NARROW_WCB };                                \
        const Py_ssize_t OWp = (OW + VW - 1) / VW * VW, Wp = OWp + KW - 1;                 \
        const Py_ssize_t nimg = n1 - n0;                                                   \
        const T* ymask = src ? (const T*)src->y : NULL;                                    \
        const T* pg = src ? (const T*)src->pool_g : NULL;                                  \
        double* bsum = src ? src->bias : NULL;                                             \
        double* bacc = (double*)(((size_t)(rowbuf + OW * Cout) + 63) & ~(size_t)63);       \
        if (bsum)                     /* Cout x OWp per-lane sums, after the row buffer */ \
            for (Py_ssize_t k = 0; k < Cout * OWp; k++) bacc[k] = 0;                       \
        for (Py_ssize_t r = 0; r < nimg * OH; r++) {                                       \
            const T* d = pg ? rowbuf : dy + (n0 * OH + r) * OW * Cout;                     \
            if (pg) {                                                                      \
                const Py_ssize_t n = n0 + r / OH, pimg = src->PH * src->PW * Cout;         \
                POOL_ROW(pg + n * pimg, src->pool_idx + n * pimg, rowbuf, OW, Cout,        \
                         src->PH, src->PW, r % OH, src->kh, src->kw, src->sh, src->sw,     \
                         src->ph, src->pw, src->dh, src->dw);                              \
            }                                                                              \
            if (ymask) {              /* relu_backward's rule, on the contiguous row */    \
                const T* ym = ymask + (n0 * OH + r) * OW * Cout;                           \
                CNET_SIMD for (Py_ssize_t k = 0; k < OW * Cout; k++)                       \
                    rowbuf[k] = cnet_keep(d[k], !(ym[k] <= (T)0));                         \
                d = rowbuf;                                                                \
            }                                                                              \
            T* o = dyp + r * Cout * OWp;                                                   \
            for (Py_ssize_t co = 0; co < Cout; co++) {                                     \
                for (Py_ssize_t ow = 0; ow < OW; ow++) o[co * OWp + ow] = d[ow * Cout + co]; \
                for (Py_ssize_t ow = OW; ow < OWp; ow++) o[co * OWp + ow] = 0;             \
            }                                                                              \
            if (bsum)                 /* per lane: vector adds, no serial chain */         \
                CNET_SIMD for (Py_ssize_t k = 0; k < Cout * OWp; k++) bacc[k] += o[k];     \
        }                                                                                  \
        if (bsum)                                                                          \
            for (Py_ssize_t co = 0; co < Cout; co++) {                                     \
                double sum = 0;                                                            \
                for (Py_ssize_t ow = 0; ow < OWp; ow++) sum += bacc[co * OWp + ow];        \
                bsum[co] += sum;                                                           \
            }                                                                              \
        for (Py_ssize_t r = 0; r < nimg * H; r++) {    /* xp[j] = x[j - pw] or 0 */       \
            T* o = xp + r * Wp;                                                            \
            Py_ssize_t w1 = W < Wp - pw ? W : Wp - pw;                                     \
            memset(o, 0, Wp * sizeof(T));                                                  \
            if (w1 > 0) memcpy(o + pw, x + (n0 * H + r) * W, w1 * sizeof(T));              \
        }                                                                                  \
        for (Py_ssize_t kh = 0; kh < KH; kh++)                                             \
        for (Py_ssize_t kw0 = 0; kw0 < KW; kw0 += KB)                                      \
        for (Py_ssize_t co0 = 0; co0 < Cout; co0 += CB) {                                  \
            Py_ssize_t kn = KW - kw0 < KB ? KW - kw0 : KB;                                 \
            Py_ssize_t cn = Cout - co0 < CB ? Cout - co0 : CB;                             \
            VT acc[KB][CB];                                                                \
            for (int a = 0; a < KB; a++) for (int c = 0; c < CB; c++) acc[a][c] = (VT){0}; \
            for (Py_ssize_t i = 0; i < nimg; i++)                                          \
            for (Py_ssize_t oh = 0; oh < OH; oh++) {                                       \
                Py_ssize_t ih = oh * sh - ph + kh * dh;                                    \
                if ((size_t)ih >= (size_t)H) continue;                                     \
                const T* xr = xp + (i * H + ih) * Wp + kw0;                                \
                const T* dr = dyp + ((i * OH + oh) * Cout + co0) * OWp;                    \
                for (Py_ssize_t ow = 0; ow < OWp; ow += VW) {                              \
                    VT xv[KB];                                                             \
                    for (int a = 0; a < KB; a++)                                           \
                        xv[a] = a < kn ? *(const VTU*)(xr + ow + a) : (VT){0};             \
                    _Pragma("GCC unroll 8")                                                \
                    for (int c = 0; c < CB; c++) {                                         \
                        VT dv = c < cn ? *(const VTU*)(dr + c * OWp + ow) : (VT){0};       \
                        for (int a = 0; a < KB; a++) acc[a][c] += xv[a] * dv;              \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            for (Py_ssize_t a = 0; a < kn; a++)                                            \
                for (Py_ssize_t c = 0; c < cn; c++) {                                      \
                    T s = 0;                                                               \
                    for (int l = 0; l < VW; l++) s += acc[a][c][l];                        \
                    T* g = gw + (kh * KW + kw0 + a) * Cout + co0 + c;                      \
                    *g = accumulate ? *g + s : s;                                          \
                }                                                                          \
        }                                                                                  \
    }
    CNET_NARROW_WGRAD(cnet_narrow_wgrad_f32, float, 16, cnet_max_bwd_row_f32)
    CNET_NARROW_WGRAD(cnet_narrow_wgrad_f64, double, 8, cnet_max_bwd_row_f64)

    /* A fused ReLU's backward and the bias gradient's sums in one pass (bias_grad):
       m = 0 where y <= 0 else g (relu_backward's select: a NaN y passes g), acc += m
       in double; the select is _simd.h's cnet_keep (as a ternary GCC kept a branch
       here, mispredicted on every other element: 200K x 6, 6.3 ms against 0.8 for
       the two separate passes). */
    #define CNET_MASK_SUM(T, SFX)                                                          \
    CNET_CLONES static void cnet_mask_sum_##SFX(const T* __restrict__ g,                   \
                                                const T* __restrict__ y, T* __restrict__ m, \
                                                double* __restrict__ acc, Py_ssize_t n)    \
    {                                                                                      \
        for (Py_ssize_t j = 0; j < n; j++) {                                               \
            T v = cnet_keep(g[j], !(y[j] <= (T)0));                                        \
            m[j] = v;                                                                      \
            acc[j] += v;                                                                   \
        }                                                                                  \
    }
    CNET_MASK_SUM(float, f32)
    CNET_MASK_SUM(double, f64)

    /* One entry per kernel and dtype; ``variant`` picks the register block:
       0: 6 pixels x 1 vector, 1: 8 x 1, 2: 8 x 2, 3: 6 x 4, 5: 16 x 1 (see
       _direct_variant and _wgrad_variant). */
    #define CNET_DIRECT_PICK(NAME, SFX)                                                    \
        (variant == 2 ? NAME##8x2_##SFX : variant == 1 ? NAME##8_##SFX : NAME##6_##SFX)
    #define CNET_DIRECT_ENTRIES(SFX, T)                                                    \
    static inline void cnet_direct_row_##SFX(                                              \
        int variant, const T* x, const T* w, const T* bias, const T* zeros, T* yrow,       \
        Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,             \
        Py_ssize_t Cx, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy, Py_ssize_t Cw,       \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,         \
        Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                                       \
    {                                                                                      \
        if (variant == 4) {         /* narrow (_narrow_fits): padded weight and bias */       \
            cnet_narrow_row_##SFX(x, w, bias, yrow, n, oh, H, W, OW, Cout, Cw, KH, KW, sh, \
                                  ph, pw, dh);                                             \
            return;                                                                        \
        }                                                                                  \
        CNET_DIRECT_PICK(cnet_direct_row, SFX)(x, w, bias, zeros, yrow, n, oh, H, W, C,    \
                                               Cx, OW, Cout, Cy, Cw, KH, KW, sh, sw, ph,   \
                                               pw, dh, dw);                                \
    }                                                                                      \
    static inline void cnet_direct_img_##SFX(                                              \
        int variant, const T* x, const T* w, const T* bias, T* y, Py_ssize_t n,            \
        Py_ssize_t nimg, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,          \
        Py_ssize_t Cx, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy,       \
        Py_ssize_t Cw, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,         \
        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                        \
    {                                                                                      \
        CNET_DIRECT_PICK(cnet_direct_img, SFX)(x, w, bias, y, n, nimg, oh, H, W, C, Cx,    \
                                               OH, OW, Cout, Cy, Cw, KH, KW, sh, sw, ph,   \
                                               pw, dh, dw);                                \
    }                                                                                      \
    static inline void cnet_direct_wgrad_##SFX(                                            \
        int variant, const T* x, const T* dy, T* gw, int accumulate, Py_ssize_t n0,        \
        Py_ssize_t n1, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W,           \
        Py_ssize_t C, Py_ssize_t Cx, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,        \
        Py_ssize_t Cy, Py_ssize_t Cgw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,         \
        Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                                       \
    {                                                                                      \
        (variant == 3 ? cnet_direct_wgrad6x4_##SFX                                         \
         : variant == 5 ? cnet_direct_wgrad16_##SFX                                        \
         : CNET_DIRECT_PICK(cnet_direct_wgrad, SFX))(x, dy, gw, accumulate, n0, n1, kh, kw, \
                                                 H, W, C, Cx, OH, OW, Cout, Cy, Cgw, sh,   \
                                                 sw, ph, pw, dh, dw);                      \
    }
    CNET_DIRECT_ENTRIES(f32, float)
    CNET_DIRECT_ENTRIES(f64, double)

    /* The calling thread's staging buffer (_direct_group_image) of at least
       `bytes`, kept between calls: a chunk can be one image, and a fresh
       half-megabyte block per call is a fresh mmap whose pages the kernel zeroes
       (12% of a ResNeXt layer's fwd+bwd).  NULL (the caller reads in place) where
       it cannot be allocated or would pass CNET_STAGE_MAX_BYTES: staging pays
       while the copy stays in L2, and each thread keeps its buffer until exit. */
    #define CNET_STAGE_MAX_BYTES ((size_t)8 << 20)
    static void* cnet_stage_buffer(size_t bytes) {
        static __thread void* buffer = NULL;
        static __thread size_t size = 0;
        if (bytes > CNET_STAGE_MAX_BYTES) return NULL;
        if (bytes > size) {
            free(buffer);
            size = (bytes + 63) / 64 * 64;
            buffer = aligned_alloc(64, size);
            if (buffer == NULL) size = 0;
        }
        return buffer;
    }

    /* The two-vector blocks only pay where 32 vector registers hold them. */
    static int cnet_wide_vectors(void) {
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
    #else
        return 0;
    #endif
    }
    """
    void cnet_direct_row_f32(int variant, const float* x, const float* w, const float* bias,
                             const float* zeros, float* yrow, Py_ssize_t n, Py_ssize_t oh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t Cx,
                             Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy, Py_ssize_t Cw,
                             Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                             Py_ssize_t dw) noexcept nogil
    void cnet_direct_row_f64(int variant, const double* x, const double* w,
                             const double* bias, const double* zeros, double* yrow,
                             Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t C, Py_ssize_t Cx, Py_ssize_t OW, Py_ssize_t Cout,
                             Py_ssize_t Cy, Py_ssize_t Cw, Py_ssize_t KH, Py_ssize_t KW,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t dh, Py_ssize_t dw) noexcept nogil
    void cnet_direct_wgrad_f32(int variant, const float* x, const float* dy, float* gw,
                               int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh,
                               Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t Cx, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,
                               Py_ssize_t Cy, Py_ssize_t Cgw, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                               Py_ssize_t dw) noexcept nogil
    void cnet_direct_wgrad_f64(int variant, const double* x, const double* dy, double* gw,
                               int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh,
                               Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t Cx, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,
                               Py_ssize_t Cy, Py_ssize_t Cgw, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                               Py_ssize_t dw) noexcept nogil
    void cnet_direct_img_f32(int variant, const float* x, const float* w, const float* bias,
                             float* y, Py_ssize_t n, Py_ssize_t nimg, Py_ssize_t oh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t Cx,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy,
                             Py_ssize_t Cw, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                             Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                             Py_ssize_t dw) noexcept nogil
    void cnet_direct_img_f64(int variant, const double* x, const double* w, const double* bias,
                             double* y, Py_ssize_t n, Py_ssize_t nimg, Py_ssize_t oh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t Cx,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cy,
                             Py_ssize_t Cw, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                             Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                             Py_ssize_t dw) noexcept nogil
    int cnet_wide_vectors() noexcept nogil
    void* cnet_stage_buffer(size_t bytes) noexcept nogil
    ctypedef struct cnet_grad_src:
        const void* y
        const void* pool_g
        const int* pool_idx
        Py_ssize_t PH, PW, kh, kw, sh, sw, ph, pw, dh, dw
        double* bias
    void cnet_narrow_wgrad_f32(const float* x, const float* dy, float* gw, int accumulate,
                               Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, Py_ssize_t W,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                               Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t pw,
                               Py_ssize_t dh, float* xp, float* dyp, const cnet_grad_src* src,
                               float* rowbuf) noexcept nogil
    void cnet_narrow_wgrad_f64(const double* x, const double* dy, double* gw, int accumulate,
                               Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H, Py_ssize_t W,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                               Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t pw,
                               Py_ssize_t dh, double* xp, double* dyp, const cnet_grad_src* src,
                               double* rowbuf) noexcept nogil
    void cnet_mask_sum_f32(const float* g, const float* y, float* m, double* acc,
                           Py_ssize_t n) noexcept nogil
    void cnet_mask_sum_f64(const double* g, const double* y, double* m, double* acc,
                           Py_ssize_t n) noexcept nogil


# A training batch norm's backward operands (conv_direct_backward's bn_grad): its
# output gradient g and forward input x (rows of C), grad_coefficients' rows
# (pitch cp), alpha / shift for the fused ReLU's mask; void* for both dtypes.
ctypedef struct cnet_bn_rows:
    const void* g
    const void* x
    const void* coef
    const void* alpha
    const void* shift
    Py_ssize_t cp
    int relu


cdef inline void _bn_grad_rows(const cnet_bn_rows* bn, floating* out, Py_ssize_t r0,
                               Py_ssize_t r1, Py_ssize_t C) noexcept nogil:
    """Rows [r0, r1) of a training batch norm's input gradient (_batchnorm.backward_dx,
    coefficients from backward_coefficients) into ``out``: the output gradient of
    the convolution before it, one chunk at a time (conv_direct_backward's bn_grad)."""
    cdef const floating* g = <const floating*>bn.g + r0 * C
    cdef const floating* x = <const floating*>bn.x + r0 * C
    cdef const floating* cf = <const floating*>bn.coef
    cdef const floating* al = <const floating*>bn.alpha
    cdef const floating* sh = <const floating*>bn.shift
    if floating is float:
        bn_dx_f(x, g, out, r1 - r0, C, cf, cf + bn.cp, cf + 2 * bn.cp, cf + 3 * bn.cp, al, sh,
                bn.relu)
    else:
        bn_dx_d(x, g, out, r1 - r0, C, cf, cf + bn.cp, cf + 2 * bn.cp, cf + 3 * bn.cp, al, sh,
                bn.relu)


cdef bint _WIDE = cnet_wide_vectors()


cdef inline int _direct_variant(Py_ssize_t Cout, Py_ssize_t lanes) noexcept nogil:
    """0: 6 pixels x 1 vector (16 registers); 1: 8 x 1 and 2: 8 x 2 (AVX-512)."""
    if not _WIDE:
        return 0
    return 2 if Cout % (2 * lanes) == 0 else 1


cdef inline int _wgrad_variant(Py_ssize_t Cout, Py_ssize_t lanes,
                               Py_ssize_t Cin) noexcept nogil:
    """The weight gradient also has 3: 6 input channels x 4 vectors (AVX-512): per
    pixel 4 loads of dy feed 24 FMAs.  One thread, 3x3 in chunks: 113-129 GFLOP/s
    from 128 to 512 channels where 8 x 2 gets 62-90 and im2col + sgemm 86-104.
    And 5: 16 input channels x 1 vector, for one vector of outputs and C_in
    (per group) a multiple of 16: one pass over a tap's rows instead of two of 8 x 1
    (ResNeXt-29's 32x32x128 in 8 groups, one thread, by chunks of 8 images: 17.2 ->
    16.0 ms)."""
    if _WIDE and Cout % (4 * lanes) == 0:
        return 3
    if _WIDE and Cout == lanes and Cin % 16 == 0:
        return 5
    return _direct_variant(Cout, lanes)


def wgrad_block_channels(dtype):
    """Output channels (per group) that the 6 x 4 weight-gradient block needs a
    multiple of on this machine, or 0 where it does not exist (no AVX-512)."""
    return 4 * direct_lanes(dtype) if _WIDE else 0


def _wide_vectors(enable=None):
    """Whether the direct kernels use two-vector blocks (AVX-512 machines); benchmarks
    may switch it off to compare (returns the previous setting)."""
    global _WIDE
    previous = bool(_WIDE)
    if enable is not None:
        _WIDE = bool(enable) and bool(cnet_wide_vectors())
    return previous


cdef bint _STAGE_GROUPS = True


def _stage_groups(enable=None):
    """Whether grouped direct layers copy each image into per-group planes first
    (_direct_group_image); tests and benchmarks switch it off to compare with the
    in-place reads, the path taken where the buffer cannot be allocated (returns
    the previous setting)."""
    global _STAGE_GROUPS
    previous = bool(_STAGE_GROUPS)
    if enable is not None:
        _STAGE_GROUPS = bool(enable)
    return previous


cdef inline void _direct_wgrad_task(const floating* x, const floating* dy, floating* gw,
                                    int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t task,
                                    Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                                    Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                                    Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                                    Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, int variant,
                                    const floating* staged) noexcept nogil:
    """One (kernel tap, group) pair: task = g * KH * KW + tap.  C and Cout are totals;
    the group's slices are reached through offsets with the full pixel pitches, or,
    given ``staged`` (_direct_wgrad_range), in its per-group planes of images
    [n0, n1): x's G planes, then dy's.  A group's taps are consecutive tasks, so its
    planes stay in L2 for them (tap-major, each task streamed a group's planes from
    L3: ResNeXt's 32x32x128 in 8 groups stages 8 MB per chunk of 8 images)."""
    cdef Py_ssize_t taps = KH * KW
    cdef Py_ssize_t tap = task % taps, g = task // taps
    cdef Py_ssize_t kh = tap // KW, kw = tap % KW
    cdef Py_ssize_t Cg = C // G, Cog = Cout // G
    cdef Py_ssize_t Cx = C, Cy = Cout
    gw = gw + tap * Cg * Cout + g * Cog
    if staged != NULL:
        x = staged + g * (n1 - n0) * H * W * Cg
        dy = staged + (n1 - n0) * (H * W * C + g * OH * OW * Cog)
        n1 -= n0
        n0 = 0
        Cx, Cy = Cg, Cog
    else:
        x = x + g * Cg
        dy = dy + g * Cog
    if floating is float:
        cnet_direct_wgrad_f32(variant, x, dy, gw, accumulate, n0, n1, kh, kw, H, W, Cg, Cx, OH,
                              OW, Cog, Cy, Cout, sh, sw, ph, pw, dh, dw)
    else:
        cnet_direct_wgrad_f64(variant, x, dy, gw, accumulate, n0, n1, kh, kw, H, W, Cg, Cx, OH,
                              OW, Cog, Cy, Cout, sh, sw, ph, pw, dh, dw)


cdef void _stage_group_planes(const floating* src, floating* dst, Py_ssize_t rows,
                              Py_ssize_t W, Py_ssize_t C, Py_ssize_t G, Py_ssize_t pw,
                              Py_ssize_t plane) noexcept nogil:
    """Rows of W NHWC pixels (images * H of them) into G planes ``plane`` values
    apart, each (rows, W + 2 pw, C/G) contiguous, the pw padding columns each side
    zeros: a group's slice in place is C values apart per pixel, which at a
    power-of-two C maps onto a few of L1's sets (_direct_group_image)."""
    cdef Py_ssize_t Cg = C // G, Wp = W + 2 * pw
    cdef Py_ssize_t r, iw, g, c
    cdef floating* d
    for r in range(rows):
        if pw:
            for g in range(G):
                d = dst + g * plane + r * Wp * Cg
                memset(d, 0, pw * Cg * sizeof(floating))
                memset(d + (pw + W) * Cg, 0, pw * Cg * sizeof(floating))
        for iw in range(W):
            # the source streams from DRAM (a layer's whole input)
            cnet_prefetch_ahead(src, C * sizeof(floating))
            cnet_scatter_groups(<char*>(dst + (r * Wp + iw + pw) * Cg), <const char*>src, G,
                                Cg * sizeof(floating), plane * sizeof(floating))
            src += C


def _check_direct_groups(str what, Py_ssize_t C, Py_ssize_t Cout, Py_ssize_t wcin,
                         Py_ssize_t groups, Py_ssize_t lanes):
    if groups < 1 or C % groups or Cout % groups or wcin != C // groups:
        raise ValueError(f"{what}: {C} input and {Cout} output channels with a weight of "
                         f"{wcin} input channels do not fit groups={groups}")
    if groups > 1 and (Cout // groups) % lanes:
        raise ValueError(f"{what}: groups={groups} needs a multiple of {lanes} output "
                         f"channels per group, got {Cout // groups}")


def _wgrad_variant_checked(str what, tuple xshape, tuple dyshape, tuple gwshape,
                           Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw,
                           Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                           Py_ssize_t G, Py_ssize_t lanes):
    """Checks the direct weight gradient's shapes; returns its kernel variant."""
    N, H, W, C = xshape
    KH, KW, wcin, Cout = gwshape
    if dyshape[0] != N or dyshape[3] != Cout or Cout % lanes:
        raise ValueError(f"{what}: input {xshape}, output gradient {dyshape}, weight "
                         f"gradient {gwshape} do not fit (C_out must be a multiple of {lanes})")
    _check_direct_groups(what, C, Cout, wcin, G, lanes)
    _check_geometry(xshape, ((n1 - n0) * dyshape[1] * dyshape[2], KH * KW * C), n0, n1,
                    dyshape[1], dyshape[2], KH, KW, sh, sw, ph, pw, dh, dw, G, what)
    return _wgrad_variant(Cout // G, lanes, C // G)


cdef void _direct_wgrad_range(const floating* x, const floating* dy, floating* gw,
                              int accumulate, Py_ssize_t n0, Py_ssize_t n1, int nt,
                              Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                              Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                              Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                              Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                              int variant) noexcept nogil:
    """The weight gradient of images [n0, n1) on nt threads (1: this thread alone).
    (tap, group) pairs write disjoint blocks of gw: no reduction between threads.

    On one thread, a layer without width padding whose input channels leave the
    register block part empty (LeNet's 6 in blocks of 8) takes a kernel row at a
    time: its KW taps read KW * C consecutive values of x and fill consecutive rows
    of gw (HWIO), so they run as one tap of KW * C channels (5 x 6 channels in 4
    blocks instead of 5).  Every gw element sums the same products in the same
    order either way."""
    cdef Py_ssize_t task, kh, n
    cdef Py_ssize_t block = 6 if variant == 0 or variant == 3 else 16 if variant == 5 else 8
    cdef Py_ssize_t x_image = H * W * C, dy_image = OH * OW * Cout
    cdef floating* staged = NULL
    if G > 1 and _STAGE_GROUPS:
        # each (tap, group) task streams its group's slice of the chunk: from
        # contiguous planes (_stage_group_planes), staged once for all taps
        staged = <floating*>cnet_stage_buffer((n1 - n0) * (x_image + dy_image)
                                              * sizeof(floating))
    if staged != NULL:
        for n in prange(n0, n1, num_threads=nt, schedule="static"):
            _stage_group_planes(x + n * x_image, staged + (n - n0) * (x_image // G), H, W, C,
                                G, 0, (n1 - n0) * (x_image // G))
            _stage_group_planes(dy + n * dy_image,
                                staged + (n1 - n0) * x_image + (n - n0) * (dy_image // G),
                                OH, OW, Cout, G, 0, (n1 - n0) * (dy_image // G))
    if nt == 1 and G == 1 and pw == 0 and dw == 1 and KW > 1 and C % block:
        for kh in range(KH):
            if floating is float:
                cnet_direct_wgrad_f32(variant, x, dy, gw + kh * KW * C * Cout, accumulate, n0,
                                      n1, kh, 0, H, W, KW * C, C, OH, OW, Cout, Cout, Cout, sh,
                                      sw, ph, 0, dh, 1)
            else:
                cnet_direct_wgrad_f64(variant, x, dy, gw + kh * KW * C * Cout, accumulate, n0,
                                      n1, kh, 0, H, W, KW * C, C, OH, OW, Cout, Cout, Cout, sh,
                                      sw, ph, 0, dh, 1)
    elif nt == 1:
        for task in range(KH * KW * G):
            _direct_wgrad_task(x, dy, gw, accumulate, n0, n1, task, G, H, W, C, OH, OW, Cout,
                               KH, KW, sh, sw, ph, pw, dh, dw, variant, staged)
    else:
        for task in prange(KH * KW * G, num_threads=nt, schedule="dynamic"):
            _direct_wgrad_task(x, dy, gw, accumulate, n0, n1, task, G, H, W, C, OH, OW, Cout,
                               KH, KW, sh, sw, ph, pw, dh, dw, variant, staged)


def conv_direct_wgrad(floating[:, :, :, ::1] x, floating[:, :, :, ::1] dy,
                      floating[:, :, :, ::1] gw, bint accumulate, Py_ssize_t n0, Py_ssize_t n1,
                      Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                      Py_ssize_t dh, Py_ssize_t dw, int n_threads, Py_ssize_t groups=1):
    """Weight gradient of images [n0, n1): ``gw`` (HWIO, (KH, KW, C_in/groups, C_out)) is
    overwritten, or added to with ``accumulate``.  C_out/groups must be a multiple of
    direct_lanes(dtype)."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = gw.shape[0], KW = gw.shape[1], Cout = gw.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2]
    cdef int variant = _wgrad_variant_checked(
        "conv_direct_wgrad", (N, H, W, C), (dy.shape[0], OH, OW, dy.shape[3]),
        (KH, KW, gw.shape[2], Cout), n0, n1,
        sh, sw, ph, pw, dh, dw, groups, 16 if floating is float else 8)
    cdef int nt = effective_threads((n1 - n0) * OH * OW * KH * KW * (C // groups) * Cout,
                                    n_threads)
    with nogil:
        _direct_wgrad_range(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], &gw[0, 0, 0, 0], accumulate, n0,
                            n1, nt, groups, H, W, C, OH, OW, Cout, KH, KW, sh, sw, ph, pw, dh,
                            dw, variant)


cdef void _fill_grad_sources(cnet_grad_src* srcs, Py_ssize_t stripes, relu_y, pool, bias_sums,
                             Py_ssize_t N, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,
                             floating* dtype_tag) except *:
    """conv_direct_backward's per-stripe gradient sources, checked (see there); the
    arrays stay the caller's (their memory outlives the kernel call).  dtype_tag is
    NULL, typed only to pick the float / double version."""
    cdef floating[:, :, :, ::1] yv, pgv
    cdef int[:, :, :, ::1] piv
    cdef double[:, ::1] bsv
    cdef Py_ssize_t s, k
    cdef Py_ssize_t geo[8]
    name = "conv_direct_backward"
    for s in range(stripes):
        srcs[s].y = srcs[s].pool_g = srcs[s].pool_idx = srcs[s].bias = NULL
    if relu_y is not None:
        yv = relu_y
        if (yv.shape[0], yv.shape[1], yv.shape[2], yv.shape[3]) != (N, OH, OW, Cout):
            raise ValueError(f"{name}: relu_y of shape {np.shape(relu_y)} for an output of "
                             f"{(N, OH, OW, Cout)}")
        for s in range(stripes):
            srcs[s].y = &yv[0, 0, 0, 0]
    if pool is not None:
        if len(pool) != 10:
            raise ValueError(f"{name}: pool is (grad, idx, kh, kw, sh, sw, ph, pw, dh, dw)")
        pgv = pool[0]
        piv = pool[1]
        for k in range(8):
            geo[k] = pool[2 + k]
        if (pgv.shape[0] != N or pgv.shape[3] != Cout
                or (piv.shape[0], piv.shape[1], piv.shape[2], piv.shape[3])
                != (pgv.shape[0], pgv.shape[1], pgv.shape[2], pgv.shape[3])
                or min(geo[0], geo[1], geo[2], geo[3], geo[6], geo[7]) < 1
                or geo[4] < 0 or geo[5] < 0):
            raise ValueError(f"{name}: pool gradient {np.shape(pool[0])}, argmax "
                             f"{np.shape(pool[1])} and window {tuple(pool[2:])} do not fit "
                             f"a batch of {N} x {Cout} channels")
        for s in range(stripes):
            srcs[s].pool_g = &pgv[0, 0, 0, 0]
            srcs[s].pool_idx = &piv[0, 0, 0, 0]
            srcs[s].PH, srcs[s].PW = pgv.shape[1], pgv.shape[2]
            srcs[s].kh, srcs[s].kw, srcs[s].sh, srcs[s].sw = geo[0], geo[1], geo[2], geo[3]
            srcs[s].ph, srcs[s].pw, srcs[s].dh, srcs[s].dw = geo[4], geo[5], geo[6], geo[7]
    if bias_sums is not None:
        bsv = bias_sums
        if bsv.shape[0] < stripes or bsv.shape[1] != Cout:
            raise ValueError(f"{name}: bias_sums of shape {np.shape(bias_sums)} for "
                             f"{stripes} stripes of {Cout} channels")
        bsv[:, :] = 0
        for s in range(stripes):
            srcs[s].bias = &bsv[s, 0]


cdef object _bn_grad_operands(bn_grad, cnet_bn_rows* bn, tuple batch_channels, dtype):
    """conv_direct_backward's bn_grad checked into ``bn``; returns its g (the shape
    stands for dy's)."""
    try:
        g, x, coef, alpha, shift, relu = bn_grad
    except (TypeError, ValueError):
        raise ValueError("conv_direct_backward: bn_grad must be (g, x, coef, alpha, shift, "
                         "relu)") from None
    N, C = batch_channels
    arrays = {"g": g, "x": x, "coef": coef, "alpha": alpha, "shift": shift}
    for name, a in arrays.items():
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous):
            raise ValueError(f"conv_direct_backward: bn_grad's {name} must be a C-contiguous "
                             f"{np.dtype(dtype)} array, got {getattr(a, 'dtype', type(a))}")
    if g.ndim != 4 or g.shape[0] != N or g.shape[3] != C or x.shape != g.shape:
        raise ValueError(f"conv_direct_backward: bn_grad's g {g.shape} and x {x.shape} must "
                         f"be (N={N}, OH, OW, C_out={C}) alike")
    if coef.shape != (4, BN_PAD(C)) or alpha.shape != (C,) or shift.shape != (C,):
        raise ValueError(f"conv_direct_backward: bn_grad's coef {coef.shape}, alpha "
                         f"{alpha.shape} and shift {shift.shape} do not fit {C} channels "
                         "(_batchnorm.grad_coefficients)")
    bn.g = <const void*>_address(g)
    bn.x = <const void*>_address(x)
    bn.coef = <const void*>_address(coef)
    bn.alpha = <const void*>_address(alpha)
    bn.shift = <const void*>_address(shift)
    bn.cp = BN_PAD(C)
    bn.relu = bool(relu)
    return g


def conv_direct_backward(floating[:, :, :, ::1] x, floating[:, :, :, ::1] dy,
                         floating[:, :, :, :, ::1] slots, chunks, Py_ssize_t stripes,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         Py_ssize_t dh, Py_ssize_t dw, int n_threads, Py_ssize_t groups=1,
                         dx=None, wflip=None, packed_flip=None, bint by_images=False,
                         wscatter=None, relu_y=None, pool=None, bias_sums=None, bn_grad=None,
                         bint accumulate_dx=False):
    """A direct layer's backward over image chunks, in one parallel region.

    Stripe s (chunks [s * k // stripes, (s + 1) * k // stripes) of the k
    ``chunks`` covering the batch) sums its chunks' weight gradients, in chunk
    order, into ``slots[s]`` (HWIO, overwritten).  With ``dx``, each chunk's
    input gradient is written too: conv_direct of dy with the flipped kernel
    (``wflip`` = flip_weight(w, groups), or ``packed_flip`` = flip_weight(...,
    blocked=True) for by_images or to stage a grouped dy (_direct_group_image;
    Conv2d does not: after the chunk's weight gradient has read dy, the in-place
    reads measured as fast)) at stride 1, padding dilation * (k - 1) - padding;
    that needs stride 1 (sh, sw describe the forward); or, given ``wscatter`` =
    scatter_weight(w), conv_scatter_dx's (any stride).  Layers with one input
    channel and C_out below a vector take the narrow weight gradient
    (_narrow_fits; as conv_small_wgrad).  Stripes run on an n_threads
    team, taken in turn (each with one-thread kernels); with fewer stripes than
    threads they run one after another with parallel kernels.  The same sums as
    conv_direct_wgrad (conv_small_wgrad) / conv_direct (conv_scatter_dx) called
    chunk by chunk.

    The narrow weight gradient (no dx) can also take its dy from elsewhere
    (cnet_grad_src): ``relu_y``, the fused ReLU's output, masks it (where
    relu_y <= 0 the gradient is 0); ``pool`` = (grad, idx, kh, kw, sh, sw, ph, pw,
    dh, dw), a max pool after the layer: its output gradient and argmax, from
    which each row of dy is gathered as MaxPool2d's backward would write it (dy
    is then None: never formed); ``bias_sums`` (float64, (stripes, C_out),
    overwritten): per stripe, the per-channel sums of the (masked) gradient, in a
    fixed order.

    ``bn_grad`` = (g, x, coef, alpha, shift, relu), a training batch norm after the
    layer (dy None): its output gradient and forward input (N, OH, OW, C_out),
    _batchnorm.backward_coefficients' coef and its alpha / shift / fused ReLU.
    Each chunk's dy (_batchnorm.backward_dx of its rows) goes to a buffer of the
    stripe's right before the chunk's kernels read it: the batch norm's input
    gradient is never written whole (not with the narrow weight gradient).

    ``accumulate_dx``: dx += the input gradient (a residual block's shortcut
    gradient, Module._backward_into): each chunk's goes to a buffer of the stripe's
    and is added while in cache, instead of a whole dx written, then read back by
    an add pass (the same sums: dx + chunk).
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = slots.shape[1], KW = slots.shape[2], G = groups
    cdef Py_ssize_t Cout = slots.shape[4]
    cdef Py_ssize_t OH, OW
    cdef cnet_bn_rows bn
    cdef cnet_bn_rows* bnp = NULL
    if bn_grad is not None:
        if dy is not None:
            raise ValueError("conv_direct_backward: dy or bn_grad, not both")
        dy = _bn_grad_operands(bn_grad, &bn, (N, Cout),
                               np.float32 if floating is float else np.float64)
        bnp = &bn
    if dy is not None:
        OH, OW = dy.shape[1], dy.shape[2]
        if dy.shape[3] != Cout:
            raise ValueError(f"conv_direct_backward: output gradient {np.shape(dy)} for "
                             f"{Cout} output channels")
    else:
        if pool is None:
            raise ValueError("conv_direct_backward: no output gradient (dy or pool)")
        OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
        OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    cdef Py_ssize_t[:, ::1] ck = _direct_chunks("conv_direct_backward", chunks, 0, N, by_images)
    cdef Py_ssize_t n_chunks = ck.shape[0], s, Cw = 0, co_block = 0
    cdef Py_ssize_t pdh = dh * (KH - 1) - ph, pdw = dw * (KW - 1) - pw
    cdef int wg_variant, dx_variant = 0
    cdef floating[:, :, :, ::1] dxv
    cdef floating[::1] wflat
    cdef floating* dxp = NULL
    cdef const floating* wfp = NULL
    cdef floating* zeros = NULL
    cdef floating[:, :, ::1] wsv
    cdef const floating* wsp = NULL
    cdef bint parallel_stripes = n_threads > 1 and stripes >= n_threads
    cdef int failed = 0
    if not 1 <= stripes <= n_chunks or slots.shape[0] < stripes:
        raise ValueError(f"conv_direct_backward: {stripes} stripes of {n_chunks} chunks "
                         f"into {slots.shape[0]} slots")
    if _narrow_fits(C, Cout, KW, sw, dw, G, lanes, False):
        if slots.shape[3] != C or (dy is not None and dy.shape[0] != N):
            raise ValueError(f"conv_direct_backward: slots {np.shape(slots)} and output "
                             f"gradient {np.shape(dy)} for a {KH}x{KW} kernel over {C} "
                             f"input channels and a batch of {N}")
        _check_geometry((N, H, W, C), (N * OH * OW, KH * KW * C), 0, N, OH, OW, KH, KW,
                        sh, sw, ph, pw, dh, dw, G, "conv_direct_backward")
        wg_variant = _NARROW_WGRAD
    else:
        wg_variant = _wgrad_variant_checked("conv_direct_backward", (N, H, W, C),
                                            (N, OH, OW, Cout),
                                            (KH, KW, slots.shape[3], slots.shape[4]), 0, N, sh,
                                            sw, ph, pw, dh, dw, G, lanes)
    cdef cnet_grad_src* srcs = NULL
    cdef const floating* dyp = NULL
    if dy is not None:
        dyp = &dy[0, 0, 0, 0]
    if bnp != NULL:
        if wg_variant == _NARROW_WGRAD:
            raise ValueError("conv_direct_backward: bn_grad is not for the narrow weight "
                             "gradient")
        dyp = NULL                  # (the batch norm's g: shapes only) made per chunk
    if accumulate_dx and dx is None:
        raise ValueError("conv_direct_backward: accumulate_dx without dx")
    if relu_y is not None or pool is not None or bias_sums is not None:
        if wg_variant != _NARROW_WGRAD or dx is not None:
            raise ValueError("conv_direct_backward: relu_y, pool and bias_sums are for the "
                             "narrow weight gradient without dx")
        srcs = <cnet_grad_src*>calloc(stripes, sizeof(cnet_grad_src))
        if srcs == NULL:
            raise MemoryError()
        try:
            _fill_grad_sources(srcs, stripes, relu_y, pool, bias_sums, N, OH, OW, Cout,
                               <floating*>NULL)
        except BaseException:
            free(srcs)
            raise
    if wscatter is not None:
        if dx is None:
            raise ValueError("conv_direct_backward: wscatter without dx")
        wsv = wscatter
        if G != 1:
            raise ValueError(f"conv_direct_backward: the scatter dx needs groups=1, got {G}")
        _scatter_checked("conv_direct_backward", C, Cout, KH, KW, dw,
                         (wsv.shape[0], wsv.shape[1], wsv.shape[2]),
                         np.float32 if floating is float else np.float64)
        dxv = dx
        if (dxv.shape[0], dxv.shape[1], dxv.shape[2], dxv.shape[3]) != (N, H, W, C):
            raise ValueError(f"conv_direct_backward: dx of shape {np.shape(dx)} for "
                             f"an input of {(N, H, W, C)}")
        dxp = &dxv[0, 0, 0, 0]
        wsp = &wsv[0, 0, 0]
    elif dx is not None:
        if (sh, sw) != (1, 1):
            raise ValueError("conv_direct_backward: the flipped-kernel input gradient "
                             "needs stride 1")
        dxv = dx
        if (dxv.shape[0], dxv.shape[1], dxv.shape[2], dxv.shape[3]) != (N, H, W, C):
            raise ValueError(f"conv_direct_backward: dx of shape {np.shape(dx)} for "
                             f"an input of {(N, H, W, C)}")
        if packed_flip is None and G > 1 and not by_images and wflip is not None:
            # grouped rows from staged planes, as conv_direct's (_direct_group_image)
            packed_flip = _grouped_blocks(wflip, G, n_threads)
        weight, _, Cw, _, _, dx_variant, co_block = _direct_operands(
            "conv_direct_backward", (N, OH, OW, Cout), wflip, None, (N, H, W, C),
            np.float32 if floating is float else np.float64, 0, N, 1, 1, pdh, pdw, dh, dw, G,
            by_images, packed_flip)
        wflat = weight
        wfp = &wflat[0]
        dxp = &dxv[0, 0, 0, 0]
        zeros = <floating*>calloc(Cout, sizeof(floating))
        if zeros == NULL:
            raise MemoryError()
    with nogil:
        if parallel_stripes:
            for s in prange(stripes, num_threads=n_threads, schedule="dynamic", chunksize=1):
                failed += _direct_backward_stripe(
                    &x[0, 0, 0, 0], dyp, &slots[s, 0, 0, 0, 0], ck,
                    s * n_chunks // stripes, (s + 1) * n_chunks // stripes, 1, G, H, W, C, OH,
                    OW, Cout, KH, KW, sh, sw, ph, pw, dh, dw, wg_variant, dxp, wfp, zeros, Cw,
                    pdh, pdw, dx_variant, co_block, by_images, packed_flip is not None, wsp,
                    srcs + s if srcs != NULL else NULL, bnp, accumulate_dx)
        else:
            for s in range(stripes):
                failed += _direct_backward_stripe(
                    &x[0, 0, 0, 0], dyp, &slots[s, 0, 0, 0, 0], ck,
                    s * n_chunks // stripes, (s + 1) * n_chunks // stripes, n_threads, G, H, W,
                    C, OH, OW, Cout, KH, KW, sh, sw, ph, pw, dh, dw, wg_variant, dxp, wfp,
                    zeros, Cw, pdh, pdw, dx_variant, co_block, by_images,
                    packed_flip is not None, wsp, srcs + s if srcs != NULL else NULL, bnp,
                    accumulate_dx)
    free(zeros)
    free(srcs)
    if failed:
        raise MemoryError("conv_direct_backward: no memory for the narrow weight gradient "
                          "or a chunk's output or input gradient")


cdef int _direct_backward_stripe(const floating* x, const floating* dy, floating* slot,
                                  Py_ssize_t[:, ::1] ck, Py_ssize_t first, Py_ssize_t last,
                                  int n_threads, Py_ssize_t G, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,
                                  Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                                  Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                                  int wg_variant, floating* dx, const floating* wflip,
                                  const floating* zeros, Py_ssize_t Cw, Py_ssize_t pdh,
                                  Py_ssize_t pdw, int dx_variant, Py_ssize_t co_block,
                                  bint by_images, bint packed,
                                  const floating* wscatter,
                                  const cnet_grad_src* src,
                                  const cnet_bn_rows* bn, bint accumulate_dx) noexcept nogil:
    """conv_direct_backward's stripe of chunks [first, last): weight gradient into slot,
    then each chunk's dx (if dx), with n_threads-thread kernels.  With ``bn``, each
    chunk's dy is made first, into a buffer of the stripe's; with ``accumulate_dx``,
    each chunk's dx goes to a buffer of the stripe's, then is added to dx.  Either
    way the chunk's images are addressed from their first (x, dy, dx shifted).
    Returns 1 where the narrow weight gradient's scratch or a buffer could not be
    allocated (else 0)."""
    cdef Py_ssize_t t, n0, n1, n, most = 0
    cdef Py_ssize_t image = OH * OW, in_image = H * W * C
    cdef int nt_wg, nt_dx
    cdef floating* dyb = NULL
    cdef floating* dxb = NULL
    cdef floating* dx_chunk
    cdef const floating* xc
    cdef const floating* dyc
    cdef floating* dxc
    for t in range(first, last):
        most = max(most, ck[t, 1] - ck[t, 0])
    if bn != NULL:
        dyb = <floating*>malloc(most * image * Cout * sizeof(floating))
        if dyb == NULL:
            return 1
    if accumulate_dx:
        dxb = <floating*>malloc(most * in_image * sizeof(floating))
        if dxb == NULL:
            free(dyb)
            return 1
    for t in range(first, last):
        n0, n1 = ck[t, 0], ck[t, 1]
        xc, dyc, dxc = x, dy, dx
        dx_chunk = dx + n0 * in_image if dx != NULL else NULL
        if bn != NULL:
            if n_threads > 1:
                for n in prange(n0, n1, num_threads=n_threads, schedule="static"):
                    _bn_grad_rows(bn, dyb + (n - n0) * image * Cout, n * image,
                                  (n + 1) * image, Cout)
            else:
                _bn_grad_rows(bn, dyb, n0 * image, n1 * image, Cout)
        if bn != NULL or accumulate_dx:
            # the chunk's images addressed from its first (the buffers hold only them)
            xc = x + n0 * in_image
            dyc = dyb if bn != NULL else dy + n0 * image * Cout
            if dx != NULL:
                dxc = dxb if accumulate_dx else dx_chunk
            n1, n0 = n1 - n0, 0
        if wg_variant == _NARROW_WGRAD:
            if not _narrow_wgrad_chunk(xc, dyc, slot, t != first, n0, n1, H, W, OH, OW, Cout,
                                       KH, KW, sh, ph, pw, dh, src):
                free(dyb)
                free(dxb)
                return 1
        else:
            nt_wg = effective_threads((n1 - n0) * OH * OW * KH * KW * (C // G) * Cout,
                                      n_threads)
            _direct_wgrad_range(xc, dyc, slot, t != first, n0, n1, nt_wg, G, H, W, C, OH, OW,
                                Cout, KH, KW, sh, sw, ph, pw, dh, dw, wg_variant)
        if dx != NULL and wscatter != NULL:
            for n in range(n0, n1):
                _scatter_image(dyc, wscatter, dxc, n, H, W, C, OH, OW, Cout, KH, KW, sh, sw,
                               ph, pw, dh)
        elif dx != NULL:
            # dx = conv(dy, flipped kernel): dy is its input (OH x OW x Cout), dx its output
            nt_dx = effective_threads((n1 - n0) * H * W * KH * KW * (Cout // G) * Cw // G,
                                      n_threads)
            _direct_range(dyc, wflip, NULL, zeros, dxc, n0, n1, nt_dx, G, OH, OW, Cout, H, W,
                          C, Cw, KH, KW, 1, 1, pdh, pdw, dh, dw, dx_variant, co_block,
                          by_images, packed, False, NULL)
        if accumulate_dx:
            # dx += the chunk's input gradient, by images over the kernels' threads
            if n_threads > 1:
                for n in prange(n1, num_threads=n_threads, schedule="static"):
                    _add_in_place(dx_chunk + n * in_image, dxb + n * in_image, in_image)
            else:
                _add_in_place(dx_chunk, dxb, n1 * in_image)
    free(dyb)
    free(dxb)
    return 0


cdef inline void _add_in_place(floating* out, const floating* b, Py_ssize_t n) noexcept nogil:
    """out = out + b."""
    if floating is float:
        cnet_add_f32(out, b, out, n, 0)
    else:
        cnet_add_f64(out, b, out, n, 0)


cdef inline void _direct_row(const floating* x, const floating* w, const floating* bias,
                             const floating* zeros, floating* y, Py_ssize_t n0, Py_ssize_t task,
                             Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cw,
                             Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                             int variant) noexcept nogil:
    """Output row r of group g, task = r * G + g (a row's groups run back to back while
    its input rows are in cache).  C and Cout are totals; Cw is the weight's row pitch."""
    cdef Py_ssize_t r = task // G, g = task % G
    cdef Py_ssize_t n = n0 + r // OH
    cdef Py_ssize_t oh = r % OH
    cdef Py_ssize_t Cg = C // G, Cog = Cout // G
    cdef floating* yrow = y + (n * OH + oh) * OW * Cout + g * Cog
    x = x + g * Cg
    w = w + g * Cog
    if bias != NULL:
        bias = bias + g * Cog
    if floating is float:
        cnet_direct_row_f32(variant, x, w, bias, zeros, yrow, n, oh, H, W, Cg, C, OW, Cog, Cout,
                            Cw, KH, KW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_direct_row_f64(variant, x, w, bias, zeros, yrow, n, oh, H, W, Cg, C, OW, Cog, Cout,
                            Cw, KH, KW, sh, sw, ph, pw, dh, dw)

cdef extern from *:
    """
    /* Lines [part, part + 1) / parts of n bytes at p, for writing (a share of an
       array's lines per call, so that the misses overlap the calls' work). */
    static inline void cnet_prefetch_write_share(const char* p, size_t n, size_t part,
                                                 size_t parts) {
        size_t lines = (n + 63) / 64, lo = lines * part / parts, hi = lines * (part + 1) / parts;
        for (size_t l = lo; l < hi; l++) __builtin_prefetch(p + l * 64, 1, 3);
    }
    /* Pieces [part, part + 1) / parts of ``count`` pieces of ``width`` bytes, ``pitch``
       bytes apart, for reading once (non-temporal: no room taken in the outer caches). */
    static inline void cnet_prefetch_pieces(const char* p, size_t count, size_t pitch,
                                            size_t width, size_t part, size_t parts) {
        size_t lo = count * part / parts, hi = count * (part + 1) / parts;
        for (size_t j = lo; j < hi; j++)
            cnet_prefetch_once(p + j * pitch, width);
    }
    """
    void cnet_prefetch_write_share(const char* p, size_t n, size_t part,
                                   size_t parts) noexcept nogil
    void cnet_prefetch_pieces(const char* p, size_t count, size_t pitch, size_t width,
                              size_t part, size_t parts) noexcept nogil


cdef inline void _prefetch_write_lines(floating* p, Py_ssize_t n, Py_ssize_t part,
                                       Py_ssize_t parts) noexcept nogil:
    cnet_prefetch_write_share(<const char*>p, n * sizeof(floating), part, parts)


cdef inline void _direct_group_image(const floating* x, const floating* wpk,
                                     const floating* bias, const floating* zeros, floating* y,
                                     floating* stage, Py_ssize_t n, Py_ssize_t G, Py_ssize_t H,
                                     Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                                     Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                     Py_ssize_t dh, Py_ssize_t dw, int variant,
                                     Py_ssize_t co_block) noexcept nogil:
    """Image n of a grouped layer from a copy of its input, one plane per group.

    In NHWC a group's C/G inputs are one slice of every pixel, C values apart; at
    ResNeXt's 128-512 channels (a power of two) that stride maps every pixel, and
    every HWIO weight row, onto 1/8 to 1/32 of L1's sets, which then cannot hold
    a kernel row's window and the weights: the broadcasts come from L2.  So the
    image is first copied, in one sequential pass, into ``stage`` as G contiguous
    (H, W + 2 pw, C/G) planes (the padding columns zeros, as the unstaged
    kernel reads them; padding rows still skipped), and the weights are
    direct_weight_blocks' packed blocks (wpk), each read for all of a plane's rows.
    The same products in the same order as _direct_row.  ``stage`` NULL: the
    strided slices in place.  ResNeXt-29's 32x32x128 in 8 groups (16 channels
    each), batch 64, forward ms, in place -> staged: one thread 40-42 -> 31-35,
    two 20-24 -> 16-18; its 16x16 and 8x8 layers (32 and 64 per group): a tie."""
    cdef Py_ssize_t Cg = C // G, Cog = Cout // G, Wp = W + 2 * pw
    cdef Py_ssize_t per_group = Cog // co_block, g, cb, oh
    cdef Py_ssize_t plane = H * Wp * Cg
    cdef const floating* img
    cdef const floating* wb
    cdef floating* yb
    cdef Py_ssize_t img_n = 0, img_w = Wp, img_c = Cg, img_pw = 0
    if stage == NULL:
        img_n, img_w, img_c, img_pw = n, W, C, pw
    else:
        _stage_group_planes(x + n * H * W * C, stage, H, W, C, G, pw, plane)
    for g in range(G):
        img = stage + g * plane if stage != NULL else x + g * Cg
        for cb in range(per_group):
            wb = wpk + (g * per_group + cb) * KH * KW * Cg * co_block
            yb = y + n * OH * OW * Cout + g * Cog + cb * co_block
            for oh in range(OH):
                if floating is float:
                    cnet_direct_row_f32(variant, img, wb,
                                        bias + g * Cog + cb * co_block if bias != NULL else NULL,
                                        zeros, yb + oh * OW * Cout, img_n, oh, H, img_w, Cg,
                                        img_c, OW, co_block, Cout, co_block, KH, KW, sh, sw, ph,
                                        img_pw, dh, dw)
                else:
                    cnet_direct_row_f64(variant, img, wb,
                                        bias + g * Cog + cb * co_block if bias != NULL else NULL,
                                        zeros, yb + oh * OW * Cout, img_n, oh, H, img_w, Cg,
                                        img_c, OW, co_block, Cout, co_block, KH, KW, sh, sw, ph,
                                        img_pw, dh, dw)


cdef extern from *:
    """
    #include "_simd.h"
    /* Weight gradient for few input AND output channels (LeNet's first layer: 1 -> 6),
       one kernel row kh over images [n0, n1).  The per-tap kernel above would fill
       one of its 8 input-channel accumulators; here the 8 accumulators are the
       (kw, ci) pairs of the row (KW * C <= 8), so every input value loaded feeds one
       FMA and each dy vector feeds KW * C of them.  C_out < one vector: dy is read
       as a full vector starting at the pixel (the lanes past C_out belong to the
       next pixel and are never stored) except at the very end of dy.  Fixed loop
       order: the same sums whatever thread runs it. */
    #define CNET_SMALL_WGRAD(NAME, T, VW)                                                  \
    CNET_CLONES static void NAME(                                                          \
        const T* x, const T* dy, const T* dy_end, T* gw, int accumulate, Py_ssize_t n0,    \
        Py_ssize_t n1, Py_ssize_t kh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,            \
        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KW, Py_ssize_t sh,       \
        Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)         \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        const Py_ssize_t J = KW * C;                                                       \
        VT acc[8];                                                                         \
        Py_ssize_t col[8], xoff[8];                                                        \
        for (int j = 0; j < 8; j++) {                                                      \
            Py_ssize_t jj = j < J ? j : J - 1;   /* spare slots repeat the last pair */    \
            acc[j] = (VT){0};                                                              \
            col[j] = (jj / C) * dw - pw;         /* input column offset of the tap */      \
            xoff[j] = col[j] * C + jj % C;                                                 \
        }                                                                                  \
        /* Output columns whose every tap of the row is inside the image. */               \
        Py_ssize_t lo = pw > 0 ? (pw + sw - 1) / sw : 0;                                   \
        Py_ssize_t lim = W - ((KW - 1) * dw - pw);                                         \
        Py_ssize_t hi = lim <= 0 ? 0 : (lim - 1) / sw + 1;                                 \
        if (hi > OW) hi = OW;                                                              \
        if (lo > hi) lo = hi;                                                              \
        for (Py_ssize_t n = n0; n < n1; n++) {                                             \
            for (Py_ssize_t oh = 0; oh < OH; oh++) {                                       \
                Py_ssize_t ih = oh * sh - ph + kh * dh;                                    \
                if ((size_t)ih >= (size_t)H) continue;                                     \
                const T* xr = x + (n * H + ih) * W * C;                                    \
                const T* dr = dy + (n * OH + oh) * OW * Cout;                              \
                for (Py_ssize_t ow = 0; ow < OW; ow++) {                                   \
                    const T* dp = dr + ow * Cout;                                          \
                    VT dv = (VT){0};                                                       \
                    if (__builtin_expect(dp + VW <= dy_end, 1)) dv = *(const VTU*)dp;      \
                    else for (Py_ssize_t c = 0; c < Cout; c++) dv[c] = dp[c];              \
                    const T* xp = xr + ow * sw * C;                                        \
                    if (ow >= lo && ow < hi) {                                             \
                        _Pragma("GCC unroll 8")                                            \
                        for (int j = 0; j < 8; j++) acc[j] += xp[xoff[j]] * dv;            \
                    } else {                                                               \
                        for (int j = 0; j < 8; j++)                                        \
                            if ((size_t)(ow * sw + col[j]) < (size_t)W)                    \
                                acc[j] += xp[xoff[j]] * dv;                                \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        T* g = gw + kh * J * Cout;              /* HWIO: row kh holds the J pairs */       \
        for (Py_ssize_t j = 0; j < J; j++)                                                 \
            for (Py_ssize_t c = 0; c < Cout; c++)                                          \
                g[j * Cout + c] = accumulate ? g[j * Cout + c] + acc[j][c] : acc[j][c];    \
    }
    CNET_SMALL_WGRAD(cnet_small_wgrad_f32, float, 16)
    CNET_SMALL_WGRAD(cnet_small_wgrad_f64, double, 8)
    """
    void cnet_small_wgrad_f32(const float* x, const float* dy, const float* dy_end, float* gw,
                              int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh,
                              Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                              Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KW, Py_ssize_t sh,
                              Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                              Py_ssize_t dw) noexcept nogil
    void cnet_small_wgrad_f64(const double* x, const double* dy, const double* dy_end,
                              double* gw, int accumulate, Py_ssize_t n0, Py_ssize_t n1,
                              Py_ssize_t kh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                              Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KW,
                              Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                              Py_ssize_t dh, Py_ssize_t dw) noexcept nogil


cdef inline void _small_wgrad_row(const floating* x, const floating* dy,
                                  const floating* dy_end, floating* gw, int accumulate,
                                  Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh, Py_ssize_t H,
                                  Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                                  Py_ssize_t Cout, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                                  Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                                  Py_ssize_t dw) noexcept nogil:
    if floating is float:
        cnet_small_wgrad_f32(x, dy, dy_end, gw, accumulate, n0, n1, kh, H, W, C, OH, OW, Cout,
                             KW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_small_wgrad_f64(x, dy, dy_end, gw, accumulate, n0, n1, kh, H, W, C, OH, OW, Cout,
                             KW, sh, sw, ph, pw, dh, dw)


cdef enum:
    _NARROW_WGRAD = -1    # conv_direct_backward's weight-gradient variant for narrow layers


cdef bint _narrow_wgrad_chunk(const floating* x, const floating* dy, floating* gw,
                              bint accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t H,
                              Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout,
                              Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t ph,
                              Py_ssize_t pw, Py_ssize_t dh,
                              const cnet_grad_src* src=NULL) noexcept nogil:
    """CNET_NARROW_WGRAD of images [n0, n1) on this thread, with its scratch (the padded
    input, planar dy and a row buffer) allocated for the call; False where that failed."""
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    cdef Py_ssize_t OWp = (OW + lanes - 1) // lanes * lanes
    cdef floating* xp = <floating*>malloc((n1 - n0) * H * (OWp + KW - 1) * sizeof(floating))
    # dy planar, then a row buffer and the bias's per-lane double sums
    cdef floating* dyp = <floating*>malloc(((n1 - n0) * OH * Cout * OWp + OW * Cout)
                                           * sizeof(floating) + Cout * OWp * sizeof(double)
                                           + 64)
    cdef floating* rowbuf = dyp + (n1 - n0) * OH * Cout * OWp
    if xp != NULL and dyp != NULL:
        if floating is float:
            cnet_narrow_wgrad_f32(x, dy, gw, accumulate, n0, n1, H, W, OH, OW, Cout, KH, KW,
                                  sh, ph, pw, dh, xp, dyp, src, rowbuf)
        else:
            cnet_narrow_wgrad_f64(x, dy, gw, accumulate, n0, n1, H, W, OH, OW, Cout, KH, KW,
                                  sh, ph, pw, dh, xp, dyp, src, rowbuf)
    free(xp)
    free(dyp)
    return xp != NULL and dyp != NULL


def small_wgrad_fits(Py_ssize_t cin, Py_ssize_t cout, Py_ssize_t kw, dtype):
    """Whether conv_small_wgrad takes this layer: KW * C_in <= 8 and C_out < one vector."""
    return kw * cin <= 8 and cout < direct_lanes(dtype)


def conv_small_wgrad(floating[:, :, :, ::1] x, floating[:, :, :, ::1] dy,
                     floating[:, :, :, ::1] gw, bint accumulate, Py_ssize_t n0, Py_ssize_t n1,
                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                     Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    """Weight gradient of images [n0, n1) for groups == 1 with KW * C_in <= 8 and
    C_out below one vector (see small_wgrad_fits): ``gw`` (HWIO) is overwritten, or
    added to with ``accumulate``."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = gw.shape[0], KW = gw.shape[1], Cout = gw.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2]
    cdef Py_ssize_t kh
    cdef const floating* dy_end
    cdef int nt
    if (gw.shape[2] != C or dy.shape[0] != N or dy.shape[3] != Cout
            or not small_wgrad_fits(C, Cout, KW, np.asarray(gw).dtype)):
        raise ValueError(f"conv_small_wgrad: input {(N, H, W, C)}, output gradient "
                         f"{(dy.shape[0], OH, OW, dy.shape[3])}, weight gradient "
                         f"{(KH, KW, gw.shape[2], Cout)} do not fit (KW * C_in <= 8 and "
                         f"C_out below one vector)")
    _check_geometry((N, H, W, C), ((n1 - n0) * OH * OW, KH * KW * C), n0, n1, OH, OW,
                    KH, KW, sh, sw, ph, pw, dh, dw, 1, "conv_small_wgrad")
    dy_end = &dy[0, 0, 0, 0] + N * OH * OW * Cout
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    cdef bint ok
    if _narrow_fits(C, Cout, KW, sw, dw, 1, lanes, False):
        # One thread: the layer runs this per chunk of images, one chunk per worker.
        # LeNet's conv1 (batch 256 in 8 chunks), one thread: 3.7 -> 1.8 ms.
        with nogil:
            ok = _narrow_wgrad_chunk(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], &gw[0, 0, 0, 0],
                                     accumulate, n0, n1, H, W, OH, OW, Cout, KH, KW, sh, ph, pw,
                                     dh)
        if not ok:
            raise MemoryError("conv_small_wgrad: no memory for the narrow weight gradient")
        return
    # Kernel rows write disjoint slices of gw: parallel over rows needs no reduction.
    nt = effective_threads((n1 - n0) * OH * OW * KH * KW * C * Cout, n_threads)
    with nogil:
        if nt == 1:
            for kh in range(KH):
                _small_wgrad_row(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], dy_end, &gw[0, 0, 0, 0],
                                 accumulate, n0, n1, kh, H, W, C, OH, OW, Cout, KW,
                                 sh, sw, ph, pw, dh, dw)
        else:
            for kh in prange(KH, num_threads=nt, schedule="dynamic"):
                _small_wgrad_row(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], dy_end, &gw[0, 0, 0, 0],
                                 accumulate, n0, n1, kh, H, W, C, OH, OW, Cout, KW,
                                 sh, sw, ph, pw, dh, dw)


cdef inline void _direct_images(const floating* x, const floating* w, const floating* bias,
                                floating* y, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t task,
                                Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                                Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cw,
                                Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                                Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                                int variant, Py_ssize_t co_block, bint packed) noexcept nogil:
    """One block of output channels of one row of an image block: task =
    ((g * blocks_per_group + cb) * OH + oh) * n_image_blocks + b.  Channel blocks
    outermost, so that a block's weights stay in L2 across the chunk's rows and
    images; ``packed`` weights (direct_weight_blocks) hold each block contiguously:
    as HWIO rows, a block is one 64-128 B piece every C_out values, which maps
    onto 1/16 of L2's sets at 512 outputs and does not stay."""
    cdef Py_ssize_t pb = _image_block()
    cdef Py_ssize_t nblocks = (n1 - n0 + pb - 1) // pb
    cdef Py_ssize_t Cg = C // G, Cog = Cout // G
    cdef Py_ssize_t per_group = (Cog + co_block - 1) // co_block
    cdef Py_ssize_t b = task % nblocks
    cdef Py_ssize_t r = task // nblocks
    cdef Py_ssize_t oh = r % OH
    cdef Py_ssize_t cb = (r // OH) % per_group, g = r // OH // per_group
    cdef Py_ssize_t n = n0 + b * pb
    cdef Py_ssize_t co0 = g * Cog + cb * co_block
    if packed:
        w = w + (g * per_group + cb) * KH * KW * Cg * co_block
        Cw = co_block
    else:
        w = w + co0
    if bias != NULL:
        bias = bias + co0
    if floating is float:
        cnet_direct_img_f32(variant, x + g * Cg, w, bias, y + co0, n, min(pb, n1 - n), oh,
                            H, W, Cg, C, OH, OW, min(co_block, Cog - cb * co_block), Cout, Cw,
                            KH, KW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_direct_img_f64(variant, x + g * Cg, w, bias, y + co0, n, min(pb, n1 - n), oh,
                            H, W, Cg, C, OH, OW, min(co_block, Cog - cb * co_block), Cout, Cw,
                            KH, KW, sh, sw, ph, pw, dh, dw)


cdef inline Py_ssize_t _image_co_block(Py_ssize_t cout_g, Py_ssize_t lanes) noexcept nogil:
    return lanes * (2 if _direct_variant(cout_g, lanes) == 2 else 1)


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array whose data starts on a 64-byte line.

    The direct kernels load weights as whole vectors, and a vector load that
    crosses a line costs two: with one vector of outputs that is one more load
    per 8 FMAs (ResNet-20's 32x32x16, one thread, forward: 7-10% slower with the
    weight 16 or 48 bytes past a line).  numpy starts small arrays 16 bytes
    past one, and an optimizer's flat buffer puts parameters anywhere."""
    dtype = np.dtype(dtype)
    cdef Py_ssize_t n = 1, d
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in shape:
        if d < 0:
            raise ValueError(f"aligned_empty: negative dimension in {shape}")
        n *= d
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    cdef Py_ssize_t start = (64 - <Py_ssize_t>(_address(raw) % 64)) % 64
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


def _line_aligned(a):
    """``a`` itself where it starts on a 64-byte line, else an aligned copy."""
    if _address(a) % 64 == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _grouped_blocks(w, Py_ssize_t G, int n_threads):
    """The packed weight grouped rows read (_direct_group_image), or None where w
    is not a weight direct_weight_blocks takes (the operand checks then say why)."""
    w = np.asarray(w)
    lanes = 16 if w.dtype == np.float32 else 8
    if (w.ndim != 4 or w.dtype not in (np.float32, np.float64) or not w.flags.c_contiguous
            or w.shape[3] % G or (w.shape[3] // G) % lanes):
        return None
    return direct_weight_blocks(w, G, n_threads)


def direct_weight_blocks(floating[:, :, :, ::1] w, Py_ssize_t groups, int n_threads):
    """The HWIO weight (KH, KW, C_in/G, C_out) as conv_direct(by_images=True)'s
    ``packed`` operand: (C_out / B, KH, KW, C_in/G, B), group-major, with B output
    channels per register block, each block contiguous.  Needs C_out/G a multiple
    of the lanes."""
    cdef Py_ssize_t K = w.shape[0] * w.shape[1] * w.shape[2], Cout = w.shape[3]
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    if groups < 1 or Cout % groups or (Cout // groups) % lanes:
        raise ValueError(f"direct_weight_blocks: C_out {Cout} in {groups} groups is not "
                         f"whole vectors of {lanes}")
    cdef Py_ssize_t B = _image_co_block(Cout // groups, lanes)
    cdef Py_ssize_t nb = Cout // B, j, k
    out = aligned_empty((nb, w.shape[0], w.shape[1], w.shape[2], B), np.asarray(w).dtype)
    cdef floating[:, :, ::1] o = out.reshape(nb, K, B)
    cdef const floating* src = &w[0, 0, 0, 0]
    cdef int nt = effective_threads(K * Cout, n_threads)
    with nogil:
        for j in prange(nb, num_threads=nt, schedule="static"):
            for k in range(K):
                memcpy(&o[j, k, 0], src + k * Cout + j * B, B * sizeof(floating))
    return out


cdef void _flip_tile_task(const floating* w, floating* out, Py_ssize_t task, Py_ssize_t KH,
                          Py_ssize_t KW, Py_ssize_t Cg, Py_ssize_t Cout, Py_ssize_t G,
                          Py_ssize_t width, bint blocked) noexcept nogil:
    """One kernel tap and one block of ``width`` input channels of group g: the
    (width x C_out/G) piece of w, transposed and tap-flipped into ``out`` in 32 x 32
    tiles (reads and writes both stay within a few KB)."""
    cdef Py_ssize_t Cog = Cout // G, per = Cg // width
    cdef Py_ssize_t tap = task // (G * per), r = task % (G * per)
    cdef Py_ssize_t g = r // per, j = r % per
    cdef Py_ssize_t kh = tap // KW, kw = tap % KW
    cdef const floating* src = w + (((KH - 1 - kh) * KW + (KW - 1 - kw)) * Cg + j * width) * Cout + g * Cog
    cdef floating* dst
    cdef Py_ssize_t pitch, o0, o1, i0, i1, o, i
    if blocked:      # (G * per, KH*KW*Cog, width) blocks, as direct_weight_blocks
        dst = out + ((g * per + j) * KH * KW + tap) * Cog * width
        pitch = width
    else:            # HWIO (KH, KW, Cog, C_in)
        dst = out + tap * Cog * Cg * G + g * Cg + j * width
        pitch = Cg * G
    for o0 in range(0, Cog, 32):
        o1 = min(Cog, o0 + 32)
        if o0 + 64 < Cog:
            # the source columns two tiles on: rows Cout values apart are separate
            # streams to the hardware prefetcher, and the weight comes cold from DRAM
            # (3x3x512x512, 2 threads: 1.34 ms cold against 0.64 warm)
            for i in range(width):
                cnet_prefetch_pieces(<const char*>(src + i * Cout + o0 + 64), 1, 0,
                                     min(32, Cog - o0 - 64) * sizeof(floating), 0, 1)
        for i0 in range(0, width, 32):
            i1 = min(width, i0 + 32)
            for i in range(i0, i1):
                for o in range(o0, o1):
                    dst[o * pitch + i] = src[i * Cout + o]


def flip_weight(floating[:, :, :, ::1] w, Py_ssize_t groups, int n_threads, bint blocked=False):
    """The input gradient's kernel at stride 1: a convolution of dy with
    wflip[kh, kw, o, g*Cg + i] = w[KH-1-kh, KW-1-kw, i, g*Cog + o] (HWIO with the
    inputs and outputs of each group swapped); ``blocked``: as
    direct_weight_blocks(wflip, groups) instead.  Parallel and tiled: numpy's
    copy of the transposed view ran 5.8 ms on one core for 3x3x512x512."""
    cdef Py_ssize_t KH = w.shape[0], KW = w.shape[1], Cg = w.shape[2], Cout = w.shape[3]
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    if groups < 1 or Cout % groups:
        raise ValueError(f"flip_weight: C_out {Cout} in {groups} groups")
    if blocked and Cg % lanes:
        raise ValueError(f"flip_weight: C_in per group {Cg} is not whole vectors of {lanes}")
    cdef Py_ssize_t width = _image_co_block(Cg, lanes) if blocked else Cg
    cdef Py_ssize_t tasks = KH * KW * groups * (Cg // width), t
    if blocked:
        out = aligned_empty((Cg * groups // width, KH, KW, Cout // groups, width),
                            np.asarray(w).dtype)
    else:
        out = aligned_empty((KH, KW, Cout // groups, Cg * groups), np.asarray(w).dtype)
    cdef floating[::1] o = out.reshape(-1)
    cdef int nt = effective_threads(KH * KW * Cg * Cout, n_threads, 1 << 18)
    with nogil:
        for t in prange(tasks, num_threads=nt, schedule="static"):
            _flip_tile_task(&w[0, 0, 0, 0], &o[0], t, KH, KW, Cg, Cout, groups, width, blocked)
    return out


# The fused ReLU of conv_direct: the elementwise module's loop (one definition).
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
    void cnet_relu_f32(const float*, float*, Py_ssize_t) noexcept nogil
    void cnet_relu_f64(const double*, double*, Py_ssize_t) noexcept nogil
    void cnet_add_f32(const float*, const float*, float*, Py_ssize_t, int) noexcept nogil
    void cnet_add_f64(const double*, const double*, double*, Py_ssize_t, int) noexcept nogil


cdef inline void _finish_rows(floating* y, const floating* residual, Py_ssize_t offset,
                              Py_ssize_t n) noexcept nogil:
    """conv_direct's epilogue of y[offset:offset + n] while in cache: ReLU, or with a
    residual relu(y + residual) (the same offsets in both)."""
    if residual != NULL:
        if floating is float:
            cnet_add_f32(y + offset, residual + offset, y + offset, n, 1)
        else:
            cnet_add_f64(y + offset, residual + offset, y + offset, n, 1)
    elif floating is float:
        cnet_relu_f32(y + offset, y + offset, n)
    else:
        cnet_relu_f64(y + offset, y + offset, n)


cdef inline void _piece_moments(const floating* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t C,
                                double* slots, Py_ssize_t* counts,
                                Py_ssize_t piece) noexcept nogil:
    """A training batch norm's moments of output rows [r0, r1) (C channels) into slot
    ``piece`` of _batchnorm.moment_slots, while the rows are in cache."""
    if floating is float:
        bn_slot_moments_f(y + r0 * C, r1 - r0, C, slots + piece * BN_SLOT(C))
    else:
        bn_slot_moments_d(y + r0 * C, r1 - r0, C, slots + piece * BN_SLOT(C))
    counts[piece] = r1 - r0


def _moment_pieces(str what, moments, Py_ssize_t pieces, Py_ssize_t C, bint relu):
    """``moments`` = (slots, counts) of _batchnorm.moment_slots(pieces, C), checked
    (_batchnorm.check_moments); the raw output's statistics, so no ReLU or residual
    in the same store."""
    if relu:
        raise ValueError(f"{what}: moments are of the convolution's own output: no ReLU "
                         "or residual with them")
    return _batchnorm.check_moments(moments, C, pieces, what)


cdef inline Py_ssize_t _image_block() noexcept nogil:
    # the pixel count of _direct_variant's register blocks
    return 8 if _WIDE else 6


def direct_image_block(dtype):
    """Images per block of conv_direct(..., by_images=True) on this machine (the
    same for both dtypes)."""
    return _image_block()


def direct_lanes(dtype):
    """Output channels per vector of the direct kernels: the weight gradient needs C_out
    to be a multiple; the forward also takes C_out < lanes (one partial vector)."""
    return 16 if dtype == np.float32 else 8


def _direct_chunks(str what, chunks, Py_ssize_t n0, Py_ssize_t n1, bint by_images):
    """``chunks`` as an (k, 2) intp array, checked to split [n0, n1) in order (at
    multiples of the image block for by_images)."""
    ck = np.ascontiguousarray(chunks, dtype=np.intp).reshape(-1, 2)
    block = _image_block() if by_images else 1
    covered = n0
    for c0, c1 in ck.tolist():
        if c0 != covered or c1 <= c0 or (c0 - n0) % block:
            covered = -1
            break
        covered = c1
    if covered != n1:
        raise ValueError(f"{what}: chunks {ck.tolist()} do not split [{n0}, {n1}) in order"
                         + (f" at multiples of {block} images" if by_images else ""))
    return ck


_NARROW_CHANNELS = 6    # CNET_NARROW_CB


def _narrow_fits(Py_ssize_t C, Py_ssize_t Cout, Py_ssize_t KW, Py_ssize_t sw, Py_ssize_t dw,
                 Py_ssize_t G, Py_ssize_t lanes, bint by_images):
    """Whether a layer takes the narrow kernels (conv_direct: CNET_NARROW_ROW;
    conv_small_wgrad and conv_direct_backward: CNET_NARROW_WGRAD): AVX-512, one input
    channel, C_out below one vector, groups 1, row blocks, stride and dilation 1
    along the width, KW <= 16.  LeNet's conv1 (1 -> 6, 5x5, batch 256), one
    thread: forward 2.7-2.9 -> 1.1 ms, weight gradient 3.9 -> 1.2-1.9 ms."""
    return (_WIDE and C == 1 and G == 1 and 0 < Cout < lanes and not by_images and sw == 1
            and dw == 1 and KW <= 16)


def _direct_operands(str what, tuple xshape, w, bias, tuple yshape, dtype, Py_ssize_t n0,
                     Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                     Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t G, bint by_images, packed):
    """Checks conv_direct's operands; returns (weight, bias, Cw, KH, KW, variant,
    co_block): the weight the kernel reads as one flat array (HWIO, packed blocks,
    or zero-padded to one vector with the padded bias as its last row; Cw its row
    pitch) and the bias as a flat array or None."""
    N, H, W, C = xshape
    OH, OW = yshape[1], yshape[2]
    lanes = 16 if dtype == np.float32 else 8
    if packed is not None:
        if not by_images and G == 1:
            raise ValueError(f"{what}: a packed weight needs by_images=True or groups")
        pk = np.asarray(packed)
        if pk.ndim != 5:
            raise ValueError(f"{what}: a packed weight has 5 axes, got shape {pk.shape}")
        KH, KW, wcin, Cout = pk.shape[1], pk.shape[2], pk.shape[3], pk.shape[0] * pk.shape[4]
        if w is not None and tuple(np.shape(w)) != (KH, KW, wcin, Cout):
            raise ValueError(f"{what}: packed weight of shape {pk.shape} is "
                             f"not direct_weight_blocks of {tuple(np.shape(w))}")
        weight = pk
    else:
        weight = np.asarray(w)
        if weight.ndim != 4:
            raise ValueError(f"{what}: the weight has 4 axes (HWIO), got shape {weight.shape}")
        KH, KW, wcin, Cout = weight.shape
    if weight.dtype != dtype or not weight.flags.c_contiguous:
        raise ValueError(f"{what}: the weight must be a contiguous {np.dtype(dtype)} array, "
                         f"got {weight.dtype}")
    if yshape[0] != N or yshape[3] != Cout or (Cout % lanes and Cout > lanes):
        raise ValueError(f"{what}: input {xshape}, weight {(KH, KW, wcin, Cout)}, "
                         f"output {yshape} do not fit "
                         f"(C_out must be a multiple of {lanes} or less)")
    _check_direct_groups(what, C, Cout, wcin, G, lanes)
    _check_geometry(xshape, ((n1 - n0) * OH * OW, KH * KW * C), n0, n1, OH, OW,
                    KH, KW, sh, sw, ph, pw, dh, dw, G, what)
    variant = _direct_variant(Cout // G, lanes)
    co_block = _image_co_block(Cout // G, lanes)
    if packed is not None and weight.shape[4] != co_block:
        raise ValueError(f"{what}: packed blocks of {weight.shape[4]} outputs, the kernel's "
                         f"are {co_block}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (Cout,) or bias.dtype != dtype:
            raise ValueError(f"{what}: bias of shape {bias.shape} ({bias.dtype}) for {Cout} "
                             f"{np.dtype(dtype)} outputs")
    if Cout % lanes:
        # One partial vector: the kernel's full-vector loads read a weight zero-padded
        # to `lanes` outputs, with the (padded) bias as one more row.  The narrow
        # kernel reads whole passes of _NARROW_CHANNELS channels instead.
        width = lanes
        if _narrow_fits(C, Cout, KW, sw, dw, G, lanes, by_images):
            variant, width = 4, -(-Cout // _NARROW_CHANNELS) * _NARROW_CHANNELS
        pad = aligned_empty((KH * KW * C + 1, width), dtype)
        pad.fill(0)
        pad[:-1, :Cout] = weight.reshape(-1, Cout)
        if bias is not None:
            pad[-1, :Cout] = bias
        flat = pad.reshape(-1)
        return (flat, None if bias is None else flat[KH * KW * C * width:], width, KH, KW,
                variant, co_block)
    if packed is None and Cout // G == lanes:
        # one weight vector per 8 FMAs: see aligned_empty
        weight = _line_aligned(weight)
    return (weight.reshape(-1), None if bias is None else np.ascontiguousarray(bias), Cout,
            KH, KW, variant, co_block)


def conv_direct(floating[:, :, :, ::1] x, w, bias, floating[:, :, :, ::1] y,
                Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, int n_threads,
                Py_ssize_t groups=1, bint by_images=False, packed=None, chunks=None,
                bint relu=False, residual=None, moments=None):
    """y[n0:n1] = conv(x[n0:n1], w) (+ bias), NHWC x/y, HWIO w (KH, KW, C_in/groups, C_out).

    by_images: register blocks of direct_image_block() images at one output pixel
    instead of consecutive pixels of one row (small maps: no padding products, no
    half-empty blocks); the same sums in the same order either way.  ``packed``:
    the weight as direct_weight_blocks(w, groups) (or flip_weight(..., blocked=True))
    for by_images (wide layers: see _direct_images) or for a grouped layer's rows
    (made here from w where not given: _direct_group_image); then w may be None.

    C_out/groups must be a multiple of direct_lanes(dtype); with groups == 1 C_out
    may also be smaller than it (LeNet's 6 channels): then the weight and bias are
    zero-padded to one vector here and the kernel stores the C_out valid lanes.
    ``bias`` is None or a contiguous (C_out,) array of the same dtype.  Overwrites
    y[n0:n1]; ``relu``: then applies ReLU to it, a chunk at a time while in cache;
    ``residual`` (an array of y's shape and dtype): relu(conv + residual) instead, a
    residual block's join in the same epilogue (eval mode: a batch norm folded into
    w and bias, Conv2d.forward_with_folded_batchnorm).

    ``chunks``: (c0, c1) image ranges covering [n0, n1) (image-block aligned for
    by_images), each run by one thread of an n_threads team, taken in turn as
    threads free up: a layer's chunks in one parallel region, without the GIL
    hand-offs of Python tasks.  The same sums as without them.

    ``moments`` (with ``chunks``, no ReLU or residual): _batchnorm.moment_slots(
    len(chunks), C_out), which receives each chunk's per-channel moments of its
    output right after the chunk is computed, while it is in cache, for the training
    batch norm that follows (its forward_train(moments=...) then skips its own
    pass over the output).
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t OH = y.shape[1], OW = y.shape[2], Cout = y.shape[3]
    cdef Py_ssize_t G = groups, Cw, KH, KW, co_block, ci, n_chunks = 0
    cdef int variant, nt
    cdef floating[::1] wflat, bflat
    cdef const floating* bp = NULL
    cdef floating* zeros
    cdef Py_ssize_t[:, ::1] ck
    cdef floating[:, :, :, ::1] rv
    cdef const floating* rp = NULL
    if residual is not None:
        if (not isinstance(residual, np.ndarray) or residual.shape != np.shape(y)
                or residual.dtype != np.asarray(y).dtype or not residual.flags.c_contiguous
                or np.may_share_memory(residual, np.asarray(y))):
            raise ValueError(f"conv_direct: the residual must be a C-contiguous "
                             f"{np.asarray(y).dtype} array of the output's shape "
                             f"{np.shape(y)} apart from it, got "
                             f"{getattr(residual, 'shape', type(residual).__name__)} "
                             f"{getattr(residual, 'dtype', '')}")
        rv = residual
        rp = &rv[0, 0, 0, 0]
        relu = True
    if chunks is not None:
        ck = _direct_chunks("conv_direct", chunks, n0, n1, by_images)
        n_chunks = ck.shape[0]
    cdef double[:, ::1] mslots
    cdef Py_ssize_t[::1] mcounts
    cdef bint collect = moments is not None
    if collect:
        if chunks is None:
            raise ValueError("conv_direct: moments are taken per chunk: give chunks")
        mslots, mcounts = _moment_pieces("conv_direct", moments, n_chunks, Cout, relu)
    if packed is None and G > 1 and not by_images and w is not None:
        packed = _grouped_blocks(w, G, n_threads)
    weight, bias_flat, Cw, KH, KW, variant, co_block = _direct_operands(
        "conv_direct", (N, H, W, C), w, bias, (y.shape[0], OH, OW, Cout),
        np.float32 if floating is float else np.float64, n0, n1, sh, sw, ph, pw, dh, dw, G,
        by_images, packed)
    wflat = weight
    if bias_flat is not None:
        bflat = bias_flat
        bp = &bflat[0]
    nt = effective_threads((n1 - n0) * OH * G * OW * KH * KW * (C // G) * Cw // G, n_threads)
    zeros = <floating*>calloc(C, sizeof(floating))
    if zeros == NULL:
        raise MemoryError()
    # Fewer chunks than threads (a batch smaller than the cores): the whole range on
    # every thread, then the chunks' moments (the same pieces, out of cache)
    cdef bint by_chunks = n_chunks > 0 and not (collect and n_chunks < nt)
    with nogil:
        if by_chunks:
            for ci in prange(n_chunks, num_threads=min(n_threads, n_chunks),
                             schedule="dynamic", chunksize=1):
                _direct_range(&x[0, 0, 0, 0], &wflat[0], bp, zeros, &y[0, 0, 0, 0], ck[ci, 0],
                              ck[ci, 1], 1, G, H, W, C, OH, OW, Cout, Cw, KH, KW, sh, sw, ph,
                              pw, dh, dw, variant, co_block, by_images, packed is not None,
                              relu, rp)
                if collect:
                    _piece_moments(&y[0, 0, 0, 0], ck[ci, 0] * OH * OW, ck[ci, 1] * OH * OW,
                                   Cout, &mslots[0, 0], &mcounts[0], ci)
        else:
            _direct_range(&x[0, 0, 0, 0], &wflat[0], bp, zeros, &y[0, 0, 0, 0], n0, n1, nt, G,
                          H, W, C, OH, OW, Cout, Cw, KH, KW, sh, sw, ph, pw, dh, dw, variant,
                          co_block, by_images, packed is not None, relu, rp)
            if collect:
                for ci in prange(n_chunks, num_threads=min(nt, n_chunks), schedule="static"):
                    _piece_moments(&y[0, 0, 0, 0], ck[ci, 0] * OH * OW, ck[ci, 1] * OH * OW,
                                   Cout, &mslots[0, 0], &mcounts[0], ci)
    free(zeros)


cdef void _direct_range(const floating* x, const floating* w, const floating* bias,
                        const floating* zeros, floating* y, Py_ssize_t n0, Py_ssize_t n1,
                        int nt, Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t Cw,
                        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, int variant,
                        Py_ssize_t co_block, bint by_images, bint packed,
                        bint relu, const floating* residual) noexcept nogil:
    """conv_direct's y[n0:n1] on nt threads (1: this thread alone), then its ReLU (with
    ``residual``: relu(y + residual), _finish_rows)."""
    cdef Py_ssize_t t, n, per_image = OH * OW * Cout
    cdef Py_ssize_t tasks = (n1 - n0) * OH * G
    cdef floating* stage
    cdef size_t stage_bytes = H * (W + 2 * pw) * C * sizeof(floating)
    if packed and not by_images:
        # grouped (_direct_group_image): w is direct_weight_blocks', each thread
        # stages images in its own buffer (none: reads x in place); the ReLU per
        # image, while its output is in cache
        if nt == 1:
            stage = <floating*>cnet_stage_buffer(stage_bytes) if _STAGE_GROUPS else NULL
            for n in range(n0, n1):
                _direct_group_image(x, w, bias, zeros, y, stage, n, G, H, W, C, OH, OW, Cout,
                                    KH, KW, sh, sw, ph, pw, dh, dw, variant, co_block)
                if relu:
                    _finish_rows(y, residual, n * per_image, per_image)
        else:
            with parallel(num_threads=nt):
                stage = <floating*>cnet_stage_buffer(stage_bytes) if _STAGE_GROUPS else NULL
                for n in prange(n0, n1, schedule="static"):
                    _direct_group_image(x, w, bias, zeros, y, stage, n, G, H, W, C, OH, OW,
                                        Cout, KH, KW, sh, sw, ph, pw, dh, dw, variant, co_block)
                    if relu:
                        _finish_rows(y, residual, n * per_image, per_image)
        return
    if by_images:
        tasks = ((n1 - n0 + _image_block() - 1) // _image_block() * OH * G
                 * ((Cout // G + co_block - 1) // co_block))
    if nt == 1:
        for t in range(tasks):
            if by_images:
                _direct_images(x, w, bias, y, n0, n1, t, G, H, W, C, OH, OW, Cout, Cw, KH, KW,
                               sh, sw, ph, pw, dh, dw, variant, co_block, packed)
            else:
                _direct_row(x, w, bias, zeros, y, n0, t, G, H, W, C, OH, OW, Cout, Cw, KH, KW,
                            sh, sw, ph, pw, dh, dw, variant)
        if relu:
            _finish_rows(y, residual, n0 * per_image, (n1 - n0) * per_image)
        return
    if by_images:
        for t in prange(tasks, num_threads=nt, schedule="static"):
            _direct_images(x, w, bias, y, n0, n1, t, G, H, W, C, OH, OW, Cout, Cw, KH, KW,
                           sh, sw, ph, pw, dh, dw, variant, co_block, packed)
    else:
        for t in prange(tasks, num_threads=nt, schedule="static"):
            _direct_row(x, w, bias, zeros, y, n0, t, G, H, W, C, OH, OW, Cout, Cw, KH, KW,
                        sh, sw, ph, pw, dh, dw, variant)
    if relu:
        for n in prange(n0, n1, num_threads=nt, schedule="static"):
            _finish_rows(y, residual, n * per_image, per_image)


# ---------------------------------------------------------------------------
# Depthwise convolution (groups == C_in == C_out)
#
# As a batched GEMM each group is a (M, KH*KW) x (KH*KW, 1) product: all
# overhead.  Here every loop runs along the contiguous channel axis of NHWC,
# which the compiler vectorises (target_clones again picks AVX2/AVX-512).

cdef extern from *:
    """
    /* Forward: with C a multiple of the vector width, 8 pixels x one vector of
       channels stay in registers across all taps (one load and one FMA per pixel
       and tap; 1.6x faster than the loop along C).  The gradients stream whole
       pixels once, which measured faster than register blocks for them. */
    #define CNET_DEPTHWISE(SUF, T, VW)                                                     \
    /* y row (n, oh): y[ow, c] = bias[c] + sum_taps x[ih, iw, c] * w[tap, c] */            \
    CNET_CLONES static void cnet_dw_fwd_row_##SUF(                                         \
        const T* restrict x, const T* restrict w, const T* restrict bias,                  \
        T* restrict yrow, Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W,         \
        Py_ssize_t C, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,          \
        Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)         \
    {                                                                                      \
        const T* img = x + n * H * W * C;                                                  \
        if (C % VW == 0) {                                                                 \
            typedef T VT __attribute__((vector_size(64)));                                 \
            typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));            \
            static const T zeros[VW] = {0};                                                \
            for (Py_ssize_t ow0 = 0; ow0 < OW; ow0 += 8) {                                 \
                Py_ssize_t nb = OW - ow0 < 8 ? OW - ow0 : 8;                               \
                for (Py_ssize_t cv = 0; cv < C; cv += VW) {                                \
                    VT acc[8];                                                             \
                    VT b0 = {0};                                                           \
                    if (bias) b0 = *(const VTU*)(bias + cv);                               \
                    for (int p = 0; p < 8; p++) acc[p] = b0;                               \
                    for (Py_ssize_t kh = 0; kh < KH; kh++) {                               \
                        Py_ssize_t ih = oh * sh - ph + kh * dh;                            \
                        if ((size_t)ih >= (size_t)H) continue;                             \
                        const T* xr = img + ih * W * C + cv;                               \
                        for (Py_ssize_t kw = 0; kw < KW; kw++) {                           \
                            VT wv = *(const VTU*)(w + (kh * KW + kw) * C + cv);            \
                            _Pragma("GCC unroll 8")                                        \
                            for (int p = 0; p < 8; p++) {                                  \
                                Py_ssize_t iw = (ow0 + p) * sw - pw + kw * dw;             \
                                const T* xp = (p < nb && (size_t)iw < (size_t)W)           \
                                              ? xr + iw * C : zeros;                       \
                                acc[p] += *(const VTU*)xp * wv;                            \
                            }                                                              \
                        }                                                                  \
                    }                                                                      \
                    for (int p = 0; p < nb; p++)                                           \
                        *(VTU*)(yrow + (ow0 + p) * C + cv) = acc[p];                       \
                }                                                                          \
            }                                                                              \
            return;                                                                        \
        }                                                                                  \
        for (Py_ssize_t ow = 0; ow < OW; ow++) {                                           \
            T* o = yrow + ow * C;                                                          \
            for (Py_ssize_t c = 0; c < C; c++) o[c] = bias ? bias[c] : (T)0;               \
            for (Py_ssize_t kh = 0; kh < KH; kh++) {                                       \
                Py_ssize_t ih = oh * sh - ph + kh * dh;                                    \
                if ((size_t)ih >= (size_t)H) continue;                                     \
                for (Py_ssize_t kw = 0; kw < KW; kw++) {                                   \
                    Py_ssize_t iw = ow * sw - pw + kw * dw;                                \
                    if ((size_t)iw >= (size_t)W) continue;                                 \
                    const T* xp = img + (ih * W + iw) * C;                                 \
                    const T* wp = w + (kh * KW + kw) * C;                                  \
                    for (Py_ssize_t c = 0; c < C; c++) o[c] += xp[c] * wp[c];              \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* dx row (n, ih), gathered in fixed (kh, kw) order: no races, no atomics. */          \
    CNET_CLONES static void cnet_dw_dx_row_##SUF(                                          \
        const T* restrict dy, const T* restrict w, T* restrict dxrow, Py_ssize_t n,        \
        Py_ssize_t ih, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W, Py_ssize_t C,           \
        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,         \
        Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)                                       \
    {                                                                                      \
        memset(dxrow, 0, W * C * sizeof(T));                                               \
        for (Py_ssize_t kh = 0; kh < KH; kh++) {                                           \
            Py_ssize_t t = ih + ph - kh * dh;                                              \
            if (t < 0 || t % sh) continue;                                                 \
            Py_ssize_t oh = t / sh;                                                        \
            if (oh >= OH) continue;                                                        \
            const T* dyr = dy + (n * OH + oh) * OW * C;                                    \
            for (Py_ssize_t kw = 0; kw < KW; kw++) {                                       \
                const T* wp = w + (kh * KW + kw) * C;                                      \
                for (Py_ssize_t ow = 0; ow < OW; ow++) {                                   \
                    Py_ssize_t iw = ow * sw - pw + kw * dw;                                \
                    if ((size_t)iw >= (size_t)W) continue;                                 \
                    T* o = dxrow + iw * C;                                                 \
                    const T* g = dyr + ow * C;                                             \
                    for (Py_ssize_t c = 0; c < C; c++) o[c] += g[c] * wp[c];               \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* gw[tap, :] (+)= sum over images [n0, n1) and pixels of x * dy for one tap. */       \
    CNET_CLONES static void cnet_dw_wgrad_tap_##SUF(                                       \
        const T* restrict x, const T* restrict dy, T* restrict acc, T* restrict gw,        \
        int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh, Py_ssize_t kw,        \
        Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,            \
        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,         \
        Py_ssize_t dw)                                                                     \
    {                                                                                      \
        for (Py_ssize_t c = 0; c < C; c++) acc[c] = 0;                                     \
        for (Py_ssize_t n = n0; n < n1; n++)                                               \
            for (Py_ssize_t oh = 0; oh < OH; oh++) {                                       \
                Py_ssize_t ih = oh * sh - ph + kh * dh;                                    \
                if ((size_t)ih >= (size_t)H) continue;                                     \
                for (Py_ssize_t ow = 0; ow < OW; ow++) {                                   \
                    Py_ssize_t iw = ow * sw - pw + kw * dw;                                \
                    if ((size_t)iw >= (size_t)W) continue;                                 \
                    const T* xp = x + ((n * H + ih) * W + iw) * C;                         \
                    const T* g = dy + ((n * OH + oh) * OW + ow) * C;                       \
                    for (Py_ssize_t c = 0; c < C; c++) acc[c] += xp[c] * g[c];             \
                }                                                                          \
            }                                                                              \
        for (Py_ssize_t c = 0; c < C; c++)                                                 \
            gw[c] = accumulate ? gw[c] + acc[c] : acc[c];                                  \
    }

    CNET_DEPTHWISE(f32, float, 16)
    CNET_DEPTHWISE(f64, double, 8)
    """
    void cnet_dw_fwd_row_f32(const float* x, const float* w, const float* bias, float* yrow,
                             Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t C, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t dh, Py_ssize_t dw) noexcept nogil
    void cnet_dw_fwd_row_f64(const double* x, const double* w, const double* bias,
                             double* yrow, Py_ssize_t n, Py_ssize_t oh, Py_ssize_t H,
                             Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW, Py_ssize_t KH,
                             Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                             Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw) noexcept nogil
    void cnet_dw_dx_row_f32(const float* dy, const float* w, float* dxrow, Py_ssize_t n,
                            Py_ssize_t ih, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W,
                            Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                            Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                            Py_ssize_t dw) noexcept nogil
    void cnet_dw_dx_row_f64(const double* dy, const double* w, double* dxrow, Py_ssize_t n,
                            Py_ssize_t ih, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W,
                            Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                            Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                            Py_ssize_t dw) noexcept nogil
    void cnet_dw_wgrad_tap_f32(const float* x, const float* dy, float* acc, float* gw,
                               int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh,
                               Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                               Py_ssize_t dw) noexcept nogil
    void cnet_dw_wgrad_tap_f64(const double* x, const double* dy, double* acc, double* gw,
                               int accumulate, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t kh,
                               Py_ssize_t kw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                               Py_ssize_t dw) noexcept nogil


cdef inline void _dw_fwd_row(const floating* x, const floating* w, const floating* bias,
                             floating* y, Py_ssize_t n0, Py_ssize_t r, Py_ssize_t H,
                             Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW,
                             Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                             Py_ssize_t dw) noexcept nogil:
    cdef Py_ssize_t n = n0 + r // OH, oh = r % OH
    cdef floating* yrow = y + (n * OH + oh) * OW * C
    if floating is float:
        cnet_dw_fwd_row_f32(x, w, bias, yrow, n, oh, H, W, C, OW, KH, KW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_dw_fwd_row_f64(x, w, bias, yrow, n, oh, H, W, C, OW, KH, KW, sh, sw, ph, pw, dh, dw)


cdef inline void _dw_dx_row(const floating* dy, const floating* w, floating* dx, Py_ssize_t n0,
                            Py_ssize_t r, Py_ssize_t H, Py_ssize_t OH, Py_ssize_t OW,
                            Py_ssize_t W, Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW,
                            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                            Py_ssize_t dh, Py_ssize_t dw) noexcept nogil:
    cdef Py_ssize_t n = n0 + r // H, ih = r % H
    cdef floating* dxrow = dx + (n * H + ih) * W * C
    if floating is float:
        cnet_dw_dx_row_f32(dy, w, dxrow, n, ih, OH, OW, W, C, KH, KW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_dw_dx_row_f64(dy, w, dxrow, n, ih, OH, OW, W, C, KH, KW, sh, sw, ph, pw, dh, dw)


cdef inline void _dw_wgrad_tap(const floating* x, const floating* dy, floating* acc,
                               floating* gw, int accumulate, Py_ssize_t n0, Py_ssize_t n1,
                               Py_ssize_t tap, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KW, Py_ssize_t sh,
                               Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh,
                               Py_ssize_t dw) noexcept nogil:
    if floating is float:
        cnet_dw_wgrad_tap_f32(x, dy, acc + tap * (C + 16), gw + tap * C, accumulate, n0, n1,
                              tap // KW, tap % KW, H, W, C, OH, OW, sh, sw, ph, pw, dh, dw)
    else:
        cnet_dw_wgrad_tap_f64(x, dy, acc + tap * (C + 16), gw + tap * C, accumulate, n0, n1,
                              tap // KW, tap % KW, H, W, C, OH, OW, sh, sw, ph, pw, dh, dw)


def _check_depthwise(str what, tuple xshape, tuple yshape, tuple wshape, Py_ssize_t n0,
                     Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                     Py_ssize_t dh, Py_ssize_t dw):
    N, H, W, C = xshape
    KH, KW, one, Cw = wshape
    if one != 1 or Cw != C or yshape[0] != N or yshape[3] != C:
        raise ValueError(f"{what}: input {xshape}, output {yshape} and weight {wshape} do not "
                         "fit a depthwise convolution (weight (KH, KW, 1, C))")
    _check_geometry(xshape, ((n1 - n0) * yshape[1] * yshape[2], KH * KW * C), n0, n1,
                    yshape[1], yshape[2], KH, KW, sh, sw, ph, pw, dh, dw, C, what)


def depthwise_forward(floating[:, :, :, ::1] x, floating[:, :, :, ::1] w, bias,
                      floating[:, :, :, ::1] y, Py_ssize_t n0, Py_ssize_t n1,
                      Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                      Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    """y[n0:n1] = depthwise conv(x[n0:n1], w) (+ bias); w is HWIO (KH, KW, 1, C)."""
    cdef Py_ssize_t H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = w.shape[0], KW = w.shape[1], OH = y.shape[1], OW = y.shape[2]
    cdef Py_ssize_t rows = (n1 - n0) * OH, r
    cdef floating[::1] b
    cdef const floating* bp = NULL
    cdef int nt
    _check_depthwise("depthwise_forward", (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), (y.shape[0], y.shape[1], y.shape[2], y.shape[3]),
                     (w.shape[0], w.shape[1], w.shape[2], w.shape[3]), n0, n1, sh, sw, ph, pw, dh, dw)
    if bias is not None:
        b = bias
        if b.shape[0] != C:
            raise ValueError(f"depthwise_forward: bias of shape ({b.shape[0]},) for {C} channels")
        bp = &b[0]
    nt = effective_threads(rows * OW * KH * KW * C, n_threads)
    with nogil:
        if nt == 1:
            for r in range(rows):
                _dw_fwd_row(&x[0, 0, 0, 0], &w[0, 0, 0, 0], bp, &y[0, 0, 0, 0], n0, r,
                            H, W, C, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw)
        else:
            for r in prange(rows, num_threads=nt, schedule="static"):
                _dw_fwd_row(&x[0, 0, 0, 0], &w[0, 0, 0, 0], bp, &y[0, 0, 0, 0], n0, r,
                            H, W, C, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw)


def depthwise_input_grad(floating[:, :, :, ::1] dy, floating[:, :, :, ::1] w,
                         floating[:, :, :, ::1] dx, Py_ssize_t n0, Py_ssize_t n1,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    """Overwrite dx[n0:n1] with the input gradient of a depthwise convolution."""
    cdef Py_ssize_t H = dx.shape[1], W = dx.shape[2], C = dx.shape[3]
    cdef Py_ssize_t KH = w.shape[0], KW = w.shape[1], OH = dy.shape[1], OW = dy.shape[2]
    cdef Py_ssize_t rows = (n1 - n0) * H, r
    cdef int nt
    _check_depthwise("depthwise_input_grad", (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]), (dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]),
                     (w.shape[0], w.shape[1], w.shape[2], w.shape[3]), n0, n1, sh, sw, ph, pw, dh, dw)
    nt = effective_threads((n1 - n0) * OH * OW * KH * KW * C, n_threads)
    with nogil:
        if nt == 1:
            for r in range(rows):
                _dw_dx_row(&dy[0, 0, 0, 0], &w[0, 0, 0, 0], &dx[0, 0, 0, 0], n0, r, H, OH, OW,
                           W, C, KH, KW, sh, sw, ph, pw, dh, dw)
        else:
            for r in prange(rows, num_threads=nt, schedule="static"):
                _dw_dx_row(&dy[0, 0, 0, 0], &w[0, 0, 0, 0], &dx[0, 0, 0, 0], n0, r, H, OH, OW,
                           W, C, KH, KW, sh, sw, ph, pw, dh, dw)


def depthwise_weight_grad(floating[:, :, :, ::1] x, floating[:, :, :, ::1] dy,
                          floating[:, :, :, ::1] gw, bint accumulate, Py_ssize_t n0,
                          Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                          Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    """Weight gradient (KH, KW, 1, C) of images [n0, n1): overwritten, or added to."""
    cdef Py_ssize_t H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = gw.shape[0], KW = gw.shape[1], OH = dy.shape[1], OW = dy.shape[2]
    cdef Py_ssize_t tap
    cdef int nt
    cdef floating* acc
    _check_depthwise("depthwise_weight_grad", (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), (dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]),
                     (gw.shape[0], gw.shape[1], gw.shape[2], gw.shape[3]), n0, n1, sh, sw, ph, pw, dh, dw)
    nt = effective_threads((n1 - n0) * OH * OW * KH * KW * C, n_threads)
    # One accumulator row per tap: taps run in parallel and write disjoint rows of gw.
    acc = <floating*>malloc(KH * KW * (C + 16) * sizeof(floating))
    if acc == NULL:
        raise MemoryError()
    with nogil:
        if nt == 1:
            for tap in range(KH * KW):
                _dw_wgrad_tap(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], acc, &gw[0, 0, 0, 0], accumulate,
                              n0, n1, tap, H, W, C, OH, OW, KW, sh, sw, ph, pw, dh, dw)
        else:
            for tap in prange(KH * KW, num_threads=nt, schedule="dynamic"):
                _dw_wgrad_tap(&x[0, 0, 0, 0], &dy[0, 0, 0, 0], acc, &gw[0, 0, 0, 0], accumulate,
                              n0, n1, tap, H, W, C, OH, OW, KW, sh, sw, ph, pw, dh, dw)
    free(acc)


# ---------------------------------------------------------------------------
# Python-facing wrappers

def _check_geometry(tuple xshape, tuple colshape, Py_ssize_t n0, Py_ssize_t n1,
                    Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                    Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t G, str what):
    N, H, W, C = xshape
    if not (0 <= n0 < n1 <= N):
        raise ValueError(f"{what}: image range [{n0}, {n1}) outside a batch of {N}")
    if min(KH, KW, sh, sw, dh, dw, G) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{what}: bad geometry kernel=({KH}, {KW}) stride=({sh}, {sw}) "
                         f"padding=({ph}, {pw}) dilation=({dh}, {dw}) groups={G}")
    if C % G:
        raise ValueError(f"{what}: {C} channels are not divisible by groups={G}")
    if (OH != (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1 or
            OW != (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1 or OH < 1 or OW < 1):
        raise ValueError(f"{what}: output size ({OH}, {OW}) does not match input {xshape}, "
                         f"kernel ({KH}, {KW}), stride ({sh}, {sw}), padding ({ph}, {pw}), "
                         f"dilation ({dh}, {dw})")
    need = ((n1 - n0) * OH * OW, KH * KW * C)
    if colshape != need:
        raise ValueError(f"{what}: column buffer has shape {colshape}, need {need} "
                         f"for images [{n0}, {n1}) of {xshape}")


def im2col(floating[:, :, :, ::1] x, floating[:, ::1] col, Py_ssize_t n0, Py_ssize_t n1,
           Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
           Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
           Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int n_threads):
    """Write the column rows of images [n0, n1) of NHWC ``x`` into ``col``.

    ``col`` has shape ((n1-n0)*OH*OW, KH*KW*C): per output pixel, ``groups``
    segments of KH*KW*(C/groups) values ordered (kh, kw, c); padding reads as 0.
    """
    _check_geometry((x.shape[0], x.shape[1], x.shape[2], x.shape[3]), (col.shape[0], col.shape[1]), n0, n1, OH, OW, KH, KW,
                    sh, sw, ph, pw, dh, dw, groups, "im2col")
    with nogil:
        _im2col(&x[0, 0, 0, 0], &col[0, 0], n0, n1, x.shape[1], x.shape[2], x.shape[3],
                OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, groups, n_threads)


def col2im(floating[:, ::1] col, floating[:, :, :, ::1] dx, Py_ssize_t n0, Py_ssize_t n1,
           Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
           Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
           Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int n_threads):
    """Overwrite images [n0, n1) of ``dx`` with the adjoint of im2col applied to ``col``."""
    _check_geometry((dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]), (col.shape[0], col.shape[1]), n0, n1, OH, OW, KH, KW,
                    sh, sw, ph, pw, dh, dw, groups, "col2im")
    with nogil:
        _col2im(&col[0, 0], &dx[0, 0, 0, 0], n0, n1, dx.shape[1], dx.shape[2], dx.shape[3],
                OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, groups, n_threads)


# ---------------------------------------------------------------------------
# Input gradient of layers with few inputs (LeNet's conv2, 6 -> 16, 5x5)
#
# col2im's GEMM has K = C_out (16: BLAS at ~30 GFLOP/s) and a column buffer per
# chunk that leaves L2.  When a kernel row's (kw, ci) pairs fill most of two
# vectors (lanes < KW * C_in <= 2 * lanes, dilation 1 along the width) they are one contiguous
# run of dx, dx[n, ih, iw0 : iw0 + KW, :], so each output pixel scatters
# sum_co dy[n, oh, ow, co] * wt[kh, co, :] onto it: per pixel C_out broadcasts
# feed 2 * KB FMAs for KB kernel rows at once.  Pixels of one image go in a
# fixed order on one thread (images are independent): the same sums for any
# thread count.

cdef extern from *:
    """
    #include "_simd.h"
    /* Only called on AVX-512 machines (scatter_dx_fits), so built for them alone.
       CNET_IN_REGISTER: a weight vector is loaded once into a register, not folded
       into both pixels' FMAs as a memory operand (GCC does: twice the loads, which
       bound the loop). */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
    #  define CNET_AVX512_ONLY __attribute__((target("arch=x86-64-v4")))
    #  define CNET_IN_REGISTER(v) __asm__("" : "+v"(v))
    #else
    #  define CNET_AVX512_ONLY
    #  define CNET_IN_REGISTER(v) ((void)0)
    #endif
    #define CNET_SCATTER_DX(NAME, T, VW, KB)                                               \
    CNET_AVX512_ONLY static void NAME(                                                     \
        const T* dy, const T* wt, T* dx, Py_ssize_t n, Py_ssize_t H, Py_ssize_t W,         \
        Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,        \
        Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,         \
        Py_ssize_t dh)                                                                     \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        const Py_ssize_t J = KW * C, row = W * C, bs = Cout * 2 * VW;                      \
        T* img = dx + n * H * row;                                                         \
        const T* img_end = img + H * row;                                                  \
        memset(img, 0, H * row * sizeof(T));                                               \
        /* Pixels go in pairs (ow, ow + step), each weight load feeding both, in an    \
           order in which consecutive pairs write disjoint stretches (an add whose     \
           load overlaps an earlier store must wait for it to reach the cache).     */ \
        const Py_ssize_t step = (2 * VW + sw * C - 1) / (sw * C);                          \
        for (Py_ssize_t oh = 0; oh < OH; oh++)                                             \
        for (Py_ssize_t r = 0; r < step; r++)                                              \
        for (Py_ssize_t ow = r; ow < OW; ow += 2 * step) {                                 \
            Py_ssize_t pix[2] = {ow, ow + step < OW ? ow + step : ow};                     \
            const T* d0 = dy + ((n * OH + oh) * OW + pix[0]) * Cout;                       \
            const T* d1 = dy + ((n * OH + oh) * OW + pix[1]) * Cout;                       \
            int np = ow + step < OW ? 2 : 1;                                               \
            for (Py_ssize_t kh0 = 0; kh0 < KH; kh0 += KB) {                                \
                VT a[2][KB][2];                                                            \
                for (int q = 0; q < 2; q++)                                                \
                    for (int b = 0; b < KB; b++) a[q][b][0] = a[q][b][1] = (VT){0};        \
                const T* wr = wt + kh0 * bs;                                               \
                for (Py_ssize_t co = 0; co < Cout; co++, wr += 2 * VW) {                   \
                    T v0 = d0[co], v1 = d1[co];                                            \
                    for (int b = 0; b < KB; b++) {                                         \
                        VT w0 = *(const VTU*)(wr + b * bs), w1 = *(const VTU*)(wr + b * bs + VW); \
                        CNET_IN_REGISTER(w0);                                              \
                        CNET_IN_REGISTER(w1);                                              \
                        a[0][b][0] += v0 * w0;                                             \
                        a[0][b][1] += v0 * w1;                                             \
                        a[1][b][0] += v1 * w0;                                             \
                        a[1][b][1] += v1 * w1;                                             \
                    }                                                                      \
                }                                                                          \
                /* (constant loop bounds and no indexing by lane: the sums stay in       \
                   registers) */                                                           \
                for (int q = 0; q < 2; q++) {                                              \
                    if (q >= np) break;                                                    \
                    Py_ssize_t iw0 = pix[q] * sw - pw;                                     \
                    int inside = iw0 >= 0 && iw0 + KW <= W;                                \
                    for (int b = 0; b < KB; b++) {                                         \
                        Py_ssize_t ih = oh * sh - ph + (kh0 + b) * dh;                     \
                        if (kh0 + b >= KH || (size_t)ih >= (size_t)H) continue;            \
                        T* o = img + ih * row + iw0 * C;                                   \
                        if (inside && o + 2 * VW <= img_end) {                             \
                            /* lanes past J add the weight's zero padding */              \
                            *(VTU*)o = *(VTU*)o + a[q][b][0];                              \
                            *(VTU*)(o + VW) = *(VTU*)(o + VW) + a[q][b][1];                \
                        } else {                                                           \
                            T lanes[2 * VW];                                               \
                            *(VTU*)lanes = a[q][b][0];                                     \
                            *(VTU*)(lanes + VW) = a[q][b][1];                              \
                            for (Py_ssize_t j = 0; j < J; j++) {                           \
                                Py_ssize_t iw = iw0 + j / C;                               \
                                if (iw >= 0 && iw < W) o[j] += lanes[j];                   \
                            }                                                              \
                        }                                                                  \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }
    CNET_SCATTER_DX(cnet_scatter_dx5_f32, float, 16, 5)
    CNET_SCATTER_DX(cnet_scatter_dx5_f64, double, 8, 5)
    CNET_SCATTER_DX(cnet_scatter_dx3_f32, float, 16, 3)
    CNET_SCATTER_DX(cnet_scatter_dx3_f64, double, 8, 3)
    /* kb: kernel rows per register block (_scatter_rows) */
    #define CNET_SCATTER_ENTRY(SFX, T)                                                     \
    static inline void cnet_scatter_dx_##SFX(                                              \
        int kb, const T* dy, const T* wt, T* dx, Py_ssize_t n, Py_ssize_t H, Py_ssize_t W, \
        Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,        \
        Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,         \
        Py_ssize_t dh)                                                                     \
    {                                                                                      \
        (kb == 3 ? cnet_scatter_dx3_##SFX : cnet_scatter_dx5_##SFX)(                       \
            dy, wt, dx, n, H, W, C, OH, OW, Cout, KH, KW, sh, sw, ph, pw, dh);             \
    }
    CNET_SCATTER_ENTRY(f32, float)
    CNET_SCATTER_ENTRY(f64, double)
    """
    void cnet_scatter_dx_f32(int kb, const float* dy, const float* wt, float* dx, Py_ssize_t n,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                             Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t dh) noexcept nogil
    void cnet_scatter_dx_f64(int kb, const double* dy, const double* wt, double* dx,
                             Py_ssize_t n, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                             Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                             Py_ssize_t pw, Py_ssize_t dh) noexcept nogil


cdef inline Py_ssize_t _scatter_rows(Py_ssize_t KH) noexcept nogil:
    """Kernel rows per register block of CNET_SCATTER_DX (its weight has KH rounded up)."""
    return 3 if KH <= 3 else 5


def _scatter_checked(str what, Py_ssize_t C, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                     Py_ssize_t dw, tuple wtshape, dtype):
    """conv_scatter_dx's (and conv_direct_backward's) checks of the layer and of its
    scatter_weight operand."""
    cdef Py_ssize_t lanes = direct_lanes(np.dtype(dtype))
    if not scatter_dx_fits(C, KW, dw, 1, dtype):
        raise ValueError(f"{what}: a {KH}x{KW} kernel over {C} input channels (dilation "
                         f"{dw} along the width) does not fit the scatter dx (AVX-512, "
                         f"{lanes} < KW * C_in <= {2 * lanes}, dilation 1)")
    if wtshape != (_scatter_weight_rows(KH), Cout, 2 * lanes):
        raise ValueError(f"{what}: weight of shape {wtshape} is not scatter_weight of a "
                         f"{KH}x{KW} kernel with {Cout} outputs")


cdef inline Py_ssize_t _scatter_weight_rows(Py_ssize_t KH) noexcept nogil:
    """Kernel rows of scatter_weight: KH rounded up to whole register blocks."""
    return (KH + _scatter_rows(KH) - 1) // _scatter_rows(KH) * _scatter_rows(KH)


def scatter_dx_fits(Py_ssize_t C, Py_ssize_t KW, Py_ssize_t dw, Py_ssize_t groups, dtype):
    """Whether conv_scatter_dx takes a layer: AVX-512, groups 1, dilation 1 along the
    width and KW * C_in more than one vector, within two.  (Its two vectors per
    kernel row waste the rest: LeNet's conv1 with dx, KW * C_in = 5, fwd+bwd 15.5 ms
    with col2im, 16.9 scattered.)"""
    cdef Py_ssize_t lanes = direct_lanes(np.dtype(dtype))
    return _WIDE and groups == 1 and dw == 1 and lanes < KW * C <= 2 * lanes


def scatter_weight(w):
    """conv_scatter_dx's weight: wt[kh, co, kw * C_in + ci] = w[kh, kw, ci, co] (HWIO w),
    zero past KW * C_in (two vectors per row) and in the rows past KH (a whole number
    of register blocks)."""
    w = np.asarray(w)
    KH, KW, C, Cout = w.shape
    lanes = direct_lanes(w.dtype)
    wt = np.zeros((_scatter_weight_rows(KH), Cout, 2 * lanes), w.dtype)
    wt[:KH, :, :KW * C] = w.reshape(KH, KW * C, Cout).transpose(0, 2, 1)
    return wt


def conv_scatter_dx(floating[:, :, :, ::1] dy, floating[:, :, ::1] wt,
                    floating[:, :, :, ::1] dx, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t KH,
                    Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                    Py_ssize_t dh, Py_ssize_t dw, int n_threads):
    """Overwrite images [n0, n1) of dx (NHWC) with the input gradient of a groups-1
    convolution with a KH x KW kernel, given dy and wt = scatter_weight(w); see
    scatter_dx_fits.  Images in parallel on n_threads."""
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[1], W = dx.shape[2], C = dx.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2], Cout = dy.shape[3], n
    cdef int nt
    _scatter_checked("conv_scatter_dx", C, Cout, KH, KW, dw,
                     (wt.shape[0], wt.shape[1], wt.shape[2]),
                     np.float32 if floating is float else np.float64)
    if dy.shape[0] != N:
        raise ValueError(f"conv_scatter_dx: dy of {dy.shape[0]} images for dx of {N}")
    _check_geometry((N, H, W, C), ((n1 - n0) * OH * OW, KH * KW * C), n0, n1, OH, OW, KH,
                    KW, sh, sw, ph, pw, dh, dw, 1, "conv_scatter_dx")
    nt = effective_threads((n1 - n0) * OH * OW * KH * KW * C * Cout, n_threads)
    if nt > n1 - n0:
        nt = <int>(n1 - n0)
    with nogil:
        if nt <= 1:
            for n in range(n0, n1):
                _scatter_image(&dy[0, 0, 0, 0], &wt[0, 0, 0], &dx[0, 0, 0, 0], n, H, W, C, OH,
                               OW, Cout, KH, KW, sh, sw, ph, pw, dh)
        else:
            for n in prange(n0, n1, num_threads=nt, schedule="static"):
                _scatter_image(&dy[0, 0, 0, 0], &wt[0, 0, 0], &dx[0, 0, 0, 0], n, H, W, C, OH,
                               OW, Cout, KH, KW, sh, sw, ph, pw, dh)


cdef inline void _scatter_image(const floating* dy, const floating* wt, floating* dx,
                                Py_ssize_t n, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                                Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                                Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                                Py_ssize_t pw, Py_ssize_t dh) noexcept nogil:
    cdef int kb = <int>_scatter_rows(KH)
    if floating is float:
        cnet_scatter_dx_f32(kb, dy, wt, dx, n, H, W, C, OH, OW, Cout, KH, KW, sh, sw, ph, pw, dh)
    else:
        cnet_scatter_dx_f64(kb, dy, wt, dx, n, H, W, C, OH, OW, Cout, KH, KW, sh, sw, ph, pw, dh)


# ---------------------------------------------------------------------------
# Planar input gradient: a network's first layer (few input channels, stride 1)

cdef extern from *:
    """
    /* dx of a stride-1, dilation-1, groups-1 layer with NC (1-4) input channels,
       vectorized along the width: image n's dy channels are written into
       zero-bordered planes (buf: Cout planes of PR x PW, the caller zeroes it once),
       then each 2-vector segment of a dx row sums, over (kh, kw, co), a weight
       times a shifted plane row.  col2im spends a K = C_out GEMM and scattered
       adds on it, the scatter kernel vectors of KW * C_in lanes (5 for LeNet's
       conv1), both several times the products here. */
    #define CNET_PLANAR_DX_MAX_C 4
    #define CNET_PLANAR_DX(NAME, T, VW, NC)                                                \
    CNET_CLONES static void NAME(                                                          \
        const T* dy, const T* wt, T* dx, Py_ssize_t n, Py_ssize_t H, Py_ssize_t W,         \
        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,       \
        Py_ssize_t ph, Py_ssize_t pw, T* buf, Py_ssize_t PR, Py_ssize_t PW)                \
    {                                                                                      \
        typedef T VT __attribute__((vector_size(64)));                                     \
        typedef T VTU __attribute__((vector_size(64), aligned(sizeof(T))));                \
        enum { PV = 2, SEG = 2 * VW, U = NC == 1 ? 4 : 2 };                                \
        const Py_ssize_t qh = KH - 1 - ph, qw = KW - 1 - pw;                               \
        const T* img = dy + n * OH * OW * Cout;                                            \
        for (Py_ssize_t oh = 0; oh < OH; oh++) {     /* dy read in order */               \
            const T* src = img + oh * OW * Cout;                                           \
            T* dst = buf + (oh + qh) * PW + qw;                                            \
            for (Py_ssize_t ow = 0; ow < OW; ow++)                                         \
                for (Py_ssize_t co = 0; co < Cout; co++)                                   \
                    dst[co * PR * PW + ow] = src[ow * Cout + co];                          \
        }                                                                                  \
        T* out = dx + n * H * W * NC;                                                      \
        const Py_ssize_t plane = PR * PW;                                                  \
        for (Py_ssize_t h = 0; h < H; h++)                                                 \
        for (Py_ssize_t w0 = 0; w0 < W; w0 += SEG) {                                       \
            /* U planes at a time into their own sums: independent FMA chains */          \
            VT acc[U][NC][PV];                                                             \
            for (int u = 0; u < U; u++)                                                    \
                for (int c = 0; c < NC; c++)                                               \
                    for (int v = 0; v < PV; v++) acc[u][c][v] = (VT){0};                   \
            for (Py_ssize_t kh = 0; kh < KH; kh++)                                         \
            for (Py_ssize_t kw = 0; kw < KW; kw++) {                                       \
                const T* row = buf + (h + KH - 1 - kh) * PW + w0 + KW - 1 - kw;            \
                const T* wk = wt + (kh * KW + kw) * Cout * NC;  /* wt[kh][kw][co][ci] */   \
                Py_ssize_t co = 0;                                                         \
                for (; co + U <= Cout; co += U)                                            \
                    for (int u = 0; u < U; u++) {                                          \
                        VT xv[PV];                                                         \
                        for (int v = 0; v < PV; v++)                                       \
                            xv[v] = *(const VTU*)(row + (co + u) * plane + v * VW);        \
                        for (int c = 0; c < NC; c++)                                       \
                            for (int v = 0; v < PV; v++)                                   \
                                acc[u][c][v] += xv[v] * wk[(co + u) * NC + c];             \
                    }                                                                      \
                for (; co < Cout; co++) {                                                  \
                    VT xv[PV];                                                             \
                    for (int v = 0; v < PV; v++)                                           \
                        xv[v] = *(const VTU*)(row + co * plane + v * VW);                  \
                    for (int c = 0; c < NC; c++)                                           \
                        for (int v = 0; v < PV; v++) acc[0][c][v] += xv[v] * wk[co * NC + c]; \
                }                                                                          \
            }                                                                              \
            for (int u = 1; u < U; u++)                                                    \
                for (int c = 0; c < NC; c++)                                               \
                    for (int v = 0; v < PV; v++) acc[0][c][v] += acc[u][c][v];             \
            T tmp[NC][SEG] __attribute__((aligned(64)));                                   \
            for (int c = 0; c < NC; c++)                                                   \
                for (int v = 0; v < PV; v++) *(VT*)(tmp[c] + v * VW) = acc[0][c][v];       \
            Py_ssize_t np_ = W - w0 < SEG ? W - w0 : SEG;                                  \
            T* o = out + (h * W + w0) * NC;                                                \
            for (Py_ssize_t p = 0; p < np_; p++)                                           \
                for (int c = 0; c < NC; c++) o[p * NC + c] = tmp[c][p];                   \
        }                                                                                  \
    }
    #define CNET_PLANAR_DX_ALL(SFX, T, VW)                                                 \
    CNET_PLANAR_DX(cnet_planar_dx1_##SFX, T, VW, 1)                                        \
    CNET_PLANAR_DX(cnet_planar_dx2_##SFX, T, VW, 2)                                        \
    CNET_PLANAR_DX(cnet_planar_dx3_##SFX, T, VW, 3)                                        \
    CNET_PLANAR_DX(cnet_planar_dx4_##SFX, T, VW, 4)                                        \
    static inline void cnet_planar_dx_##SFX(                                               \
        const T* dy, const T* wt, T* dx, Py_ssize_t n, Py_ssize_t H, Py_ssize_t W,         \
        Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,        \
        Py_ssize_t KW, Py_ssize_t ph, Py_ssize_t pw, T* buf, Py_ssize_t PR, Py_ssize_t PW) \
    {                                                                                      \
        (C == 1 ? cnet_planar_dx1_##SFX : C == 2 ? cnet_planar_dx2_##SFX                   \
         : C == 3 ? cnet_planar_dx3_##SFX : cnet_planar_dx4_##SFX)(                        \
            dy, wt, dx, n, H, W, OH, OW, Cout, KH, KW, ph, pw, buf, PR, PW);               \
    }
    CNET_PLANAR_DX_ALL(f32, float, 16)
    CNET_PLANAR_DX_ALL(f64, double, 8)
    """
    enum: CNET_PLANAR_DX_MAX_C
    void cnet_planar_dx_f32(const float* dy, const float* wt, float* dx, Py_ssize_t n,
                            Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                            Py_ssize_t ph, Py_ssize_t pw, float* buf, Py_ssize_t PR,
                            Py_ssize_t PW) noexcept nogil
    void cnet_planar_dx_f64(const double* dy, const double* wt, double* dx, Py_ssize_t n,
                            Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                            Py_ssize_t ph, Py_ssize_t pw, double* buf, Py_ssize_t PR,
                            Py_ssize_t PW) noexcept nogil


# The planar dx pays while C_out planes are few: LeNet's conv1 (1 -> 6, 5x5) and
# ResNet-20's (3 -> 16, 3x3) run it several times faster than col2im; with 64
# planes (VGG's 3 -> 64) the GEMM's K = C_out catches up (see planar_dx_fits).
_PLANAR_DX_MAX_COUT = 32


cdef inline void _planar_geometry(Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH, Py_ssize_t KW,
                                  Py_ssize_t lanes, Py_ssize_t* PR,
                                  Py_ssize_t* PW) noexcept nogil:
    """Rows and row pitch of CNET_PLANAR_DX's planes: every shifted read of a 2-vector
    segment of a dx row in range."""
    PR[0] = H + KH - 1
    PW[0] = (W + 2 * lanes - 1) // (2 * lanes) * (2 * lanes) + KW - 1


def planar_dx_fits(Py_ssize_t C, Py_ssize_t Cout, Py_ssize_t KH, Py_ssize_t KW,
                   tuple stride, tuple padding, tuple dilation, Py_ssize_t groups):
    """Whether conv_planar_dx takes a layer: AVX-512, groups 1, stride and dilation 1,
    1 to CNET_PLANAR_DX_MAX_C input channels, at most _PLANAR_DX_MAX_COUT outputs,
    padding below the kernel (dy's planes then cover every tap)."""
    return (_WIDE and groups == 1 and stride == (1, 1) and dilation == (1, 1)
            and 0 < C <= CNET_PLANAR_DX_MAX_C and 0 < Cout <= _PLANAR_DX_MAX_COUT
            and 0 <= padding[0] < KH and 0 <= padding[1] < KW)


def planar_weight(w):
    """conv_planar_dx's weight: wt[kh, kw, co, ci] = w[kh, kw, ci, co] (HWIO w)."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(w), 2, 3))


def conv_planar_dx(floating[:, :, :, ::1] dy, floating[:, :, :, ::1] wt,
                   floating[:, :, :, ::1] dx, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t ph,
                   Py_ssize_t pw, int n_threads):
    """Overwrite images [n0, n1) of dx (NHWC) with the input gradient of a stride-1
    convolution given dy and wt = planar_weight(w); see planar_dx_fits.  Images in
    parallel on n_threads, each thread's planes in its own buffer."""
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[1], W = dx.shape[2], C = dx.shape[3]
    cdef Py_ssize_t KH = wt.shape[0], KW = wt.shape[1], Cout = wt.shape[2]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2], n, PR, PW
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    cdef int nt
    if not planar_dx_fits(C, Cout, KH, KW, (1, 1), (ph, pw), (1, 1), 1):
        raise ValueError(f"conv_planar_dx: a {KH}x{KW} kernel from {C} input channels to "
                         f"{Cout} (padding {(ph, pw)}) does not fit the planar dx (AVX-512, "
                         f"1-{CNET_PLANAR_DX_MAX_C} inputs, at most {_PLANAR_DX_MAX_COUT} "
                         f"outputs, padding below the kernel)")
    if wt.shape[3] != C:
        raise ValueError(f"conv_planar_dx: weight {tuple(wt.shape)[:4]} is not planar_weight of a "
                         f"layer with {C} input channels")
    if dy.shape[0] != N or dy.shape[3] != Cout or OH != H + 2 * ph - KH + 1 \
            or OW != W + 2 * pw - KW + 1:
        raise ValueError(f"conv_planar_dx: dy {tuple(dy.shape)[:4]} is not the output of a "
                         f"{KH}x{KW} stride-1 convolution with padding {(ph, pw)} of "
                         f"{tuple(dx.shape)[:4]} to {Cout} channels")
    if not 0 <= n0 <= n1 <= N:
        raise ValueError(f"conv_planar_dx: images [{n0}, {n1}) of {N}")
    if n1 == n0:
        return
    _planar_geometry(H, W, KH, KW, lanes, &PR, &PW)
    cdef Py_ssize_t per = Cout * PR * PW        # one thread's planes
    nt = effective_threads((n1 - n0) * H * W * C * KH * KW * Cout, n_threads)
    if nt > n1 - n0:
        nt = <int>(n1 - n0)
    # zeroed once: each image rewrites the planes' interior, the borders stay zero
    cdef floating* bufs = <floating*>calloc(nt * per, sizeof(floating))
    if bufs == NULL:
        raise MemoryError(f"conv_planar_dx: no memory for {nt * per} values of planes")
    try:
        with nogil:
            if nt <= 1:
                for n in range(n0, n1):
                    _planar_image(&dy[0, 0, 0, 0], &wt[0, 0, 0, 0], &dx[0, 0, 0, 0], n, H, W,
                                  C, OH, OW, Cout, KH, KW, ph, pw, bufs, PR, PW)
            else:
                for n in prange(n0, n1, num_threads=nt, schedule="static"):
                    _planar_image(&dy[0, 0, 0, 0], &wt[0, 0, 0, 0], &dx[0, 0, 0, 0], n, H, W,
                                  C, OH, OW, Cout, KH, KW, ph, pw, bufs + threadid() * per, PR,
                                  PW)
    finally:
        free(bufs)


cdef inline void _planar_image(const floating* dy, const floating* wt, floating* dx,
                               Py_ssize_t n, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t KH,
                               Py_ssize_t KW, Py_ssize_t ph, Py_ssize_t pw, floating* buf,
                               Py_ssize_t PR, Py_ssize_t PW) noexcept nogil:
    if floating is float:
        cnet_planar_dx_f32(dy, wt, dx, n, H, W, C, OH, OW, Cout, KH, KW, ph, pw, buf, PR, PW)
    else:
        cnet_planar_dx_f64(dy, wt, dx, n, H, W, C, OH, OW, Cout, KH, KW, ph, pw, buf, PR, PW)


# ---------------------------------------------------------------------------
# Region columns: no multiplications by padding
#
# Small feature maps with padding spend much of an im2col GEMM on zeros (3x3,
# padding 1: 16% of the products at 8x8, 31% at 4x4, 56% at 2x2).  Output pixels
# are split into regions whose valid taps are the same rectangle
# [kh0, kh1) x [kw0, kw1) of the kernel (image corners, edges, interior); a
# region's columns hold only those taps, so its GEMM runs with
# K = (kh1-kh0)*(kw1-kw0)*C against the matching rows of the kernel.  Dilation
# 1: each tap row is one contiguous run of (kw1-kw0)*C input values.

cdef void _im2col_region(const floating* x, floating* col, Py_ssize_t n0,
                         Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t oh0,
                         Py_ssize_t oh1, Py_ssize_t ow0, Py_ssize_t ow1, Py_ssize_t kh0,
                         Py_ssize_t kh1, Py_ssize_t kw0, Py_ssize_t kw1, Py_ssize_t sh,
                         Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         Py_ssize_t r) noexcept nogil:
    """Column rows of region row r (image n0 + r // (oh1-oh0), output row oh0 + r % ...)."""
    cdef Py_ssize_t nh = oh1 - oh0, nw = ow1 - ow0
    cdef Py_ssize_t n = n0 + r // nh, oh = oh0 + r % nh
    cdef Py_ssize_t run = (kw1 - kw0) * C
    cdef Py_ssize_t ow, kh
    cdef floating* dst = col + r * nw * (kh1 - kh0) * run
    cdef const floating* img = x + n * H * W * C
    for ow in range(ow0, ow1):
        for kh in range(kh0, kh1):
            memcpy(dst, img + ((oh * sh - ph + kh) * W + ow * sw - pw + kw0) * C,
                   run * sizeof(floating))
            dst += run


cdef void _col2im_region_image(const floating* col, floating* dx, Py_ssize_t n0, Py_ssize_t n,
                               Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t oh0,
                               Py_ssize_t oh1, Py_ssize_t ow0, Py_ssize_t ow1,
                               Py_ssize_t kh0, Py_ssize_t kh1, Py_ssize_t kw0, Py_ssize_t kw1,
                               Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                               Py_ssize_t pw) noexcept nogil:
    """dx[n] += the region's column gradient of image n, in fixed row order (one image
    per thread: no races)."""
    cdef Py_ssize_t run = (kw1 - kw0) * C
    cdef Py_ssize_t oh, ow, kh
    cdef const floating* src = col + (n - n0) * (oh1 - oh0) * (ow1 - ow0) * (kh1 - kh0) * run
    cdef floating* img = dx + n * H * W * C
    for oh in range(oh0, oh1):
        for ow in range(ow0, ow1):
            for kh in range(kh0, kh1):
                if floating is float:
                    cnet_add_run_f32(img + ((oh * sh - ph + kh) * W + ow * sw - pw + kw0) * C,
                                     src, run)
                else:
                    cnet_add_run_f64(img + ((oh * sh - ph + kh) * W + ow * sw - pw + kw0) * C,
                                     src, run)
                src += run


def _check_region(str what, tuple xshape, tuple colshape, Py_ssize_t n0, Py_ssize_t n1,
                  Py_ssize_t oh0, Py_ssize_t oh1, Py_ssize_t ow0, Py_ssize_t ow1,
                  Py_ssize_t kh0, Py_ssize_t kh1, Py_ssize_t kw0, Py_ssize_t kw1,
                  Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw):
    N, H, W, C = xshape
    if not (0 <= n0 < n1 <= N) or oh0 >= oh1 or ow0 >= ow1 or kh0 >= kh1 or kw0 >= kw1     \
            or min(oh0, ow0, kh0, kw0) < 0 or min(sh, sw) < 1:
        raise ValueError(f"{what}: empty or negative region: images [{n0}, {n1}), rows "
                         f"[{oh0}, {oh1}), columns [{ow0}, {ow1}), taps [{kh0}, {kh1}) x "
                         f"[{kw0}, {kw1}), stride ({sh}, {sw})")
    # Every tap of every pixel must lie inside the image (bounds checks are off).
    if (oh0 * sh - ph + kh0 < 0 or (oh1 - 1) * sh - ph + kh1 - 1 >= H or
            ow0 * sw - pw + kw0 < 0 or (ow1 - 1) * sw - pw + kw1 - 1 >= W):
        raise ValueError(f"{what}: region rows [{oh0}, {oh1}) x columns [{ow0}, {ow1}) with "
                         f"taps [{kh0}, {kh1}) x [{kw0}, {kw1}) reads outside the {H}x{W} "
                         f"input (stride ({sh}, {sw}), padding ({ph}, {pw}))")
    need = ((n1 - n0) * (oh1 - oh0) * (ow1 - ow0), (kh1 - kh0) * (kw1 - kw0) * C)
    if colshape != need:
        raise ValueError(f"{what}: column buffer has shape {colshape}, need {need}")


def im2col_region(floating[:, :, :, ::1] x, floating[:, ::1] col, Py_ssize_t n0, Py_ssize_t n1,
                  Py_ssize_t oh0, Py_ssize_t oh1, Py_ssize_t ow0, Py_ssize_t ow1,
                  Py_ssize_t kh0, Py_ssize_t kh1, Py_ssize_t kw0, Py_ssize_t kw1,
                  Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, int n_threads):
    """Columns of the output region [oh0, oh1) x [ow0, ow1) of images [n0, n1), holding
    only the taps [kh0, kh1) x [kw0, kw1), which must all lie inside the input: ``col``
    is ((n1-n0)*rows*cols, (kh1-kh0)*(kw1-kw0)*C), rows ordered (n, oh, ow), values
    (kh, kw, c).  Dilation 1, groups 1."""
    cdef Py_ssize_t H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t rows = (n1 - n0) * (oh1 - oh0), r
    cdef int nt
    _check_region("im2col_region", (x.shape[0], H, W, C), (col.shape[0], col.shape[1]), n0, n1,
                  oh0, oh1, ow0, ow1, kh0, kh1, kw0, kw1, sh, sw, ph, pw)
    nt = effective_threads(col.shape[0] * col.shape[1], n_threads)
    with nogil:
        if nt == 1:
            for r in range(rows):
                _im2col_region(&x[0, 0, 0, 0], &col[0, 0], n0, H, W, C, oh0, oh1, ow0, ow1,
                               kh0, kh1, kw0, kw1, sh, sw, ph, pw, r)
        else:
            for r in prange(rows, num_threads=nt, schedule="static"):
                _im2col_region(&x[0, 0, 0, 0], &col[0, 0], n0, H, W, C, oh0, oh1, ow0, ow1,
                               kh0, kh1, kw0, kw1, sh, sw, ph, pw, r)


def col2im_region_add(floating[:, ::1] col, floating[:, :, :, ::1] dx, Py_ssize_t n0,
                      Py_ssize_t n1, Py_ssize_t oh0, Py_ssize_t oh1, Py_ssize_t ow0,
                      Py_ssize_t ow1, Py_ssize_t kh0, Py_ssize_t kh1, Py_ssize_t kw0,
                      Py_ssize_t kw1, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                      Py_ssize_t pw, int n_threads):
    """The adjoint of im2col_region: ADD the region's column gradient ``col`` into images
    [n0, n1) of ``dx`` (which the caller zeroes before the first region)."""
    cdef Py_ssize_t H = dx.shape[1], W = dx.shape[2], C = dx.shape[3], n
    cdef int nt
    _check_region("col2im_region_add", (dx.shape[0], H, W, C), (col.shape[0], col.shape[1]),
                  n0, n1, oh0, oh1, ow0, ow1, kh0, kh1, kw0, kw1, sh, sw, ph, pw)
    nt = effective_threads(col.shape[0] * col.shape[1], n_threads)
    if nt > n1 - n0:
        nt = <int>(n1 - n0)
    with nogil:
        if nt <= 1:
            for n in range(n0, n1):
                _col2im_region_image(&col[0, 0], &dx[0, 0, 0, 0], n0, n, H, W, C, oh0, oh1,
                                     ow0, ow1, kh0, kh1, kw0, kw1, sh, sw, ph, pw)
        else:
            for n in prange(n0, n1, num_threads=nt, schedule="static"):
                _col2im_region_image(&col[0, 0], &dx[0, 0, 0, 0], n0, n, H, W, C, oh0, oh1,
                                     ow0, ow1, kh0, kh1, kw0, kw1, sh, sw, ph, pw)


# ---------------------------------------------------------------------------
# bias gradient: db += dy.sum(axis=0)

# A fixed number of row blocks, independent of the thread count, each summed
# in double and combined in block order: the same bits with 1 or 2 threads.
cdef enum:
    _BIAS_BLOCKS = 16


cdef enum:
    _BIAS_GROUP_ROWS = 16     # rows summed as one flat run when C < _BIAS_GROUP_ROWS


cdef inline void _mask_sum(const floating* g, const floating* y, floating* m, double* acc,
                           Py_ssize_t n) noexcept nogil:
    if floating is float:
        cnet_mask_sum_f32(g, y, m, acc, n)
    else:
        cnet_mask_sum_f64(g, y, m, acc, n)


cdef void _bias_block(const floating* dy, double* acc, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t C, const floating* y, floating* masked) noexcept nogil:
    """acc[c] = sum of rows [r0, r1) of dy, column c; with y, of dy masked by a ReLU's
    output y (0 where y <= 0, as relu_backward), the masked rows also written to
    ``masked``: one pass for a fused ReLU's gradient and the bias gradient."""
    cdef Py_ssize_t r, c, j, R = _BIAS_GROUP_ROWS
    cdef const floating* row
    cdef double run[_BIAS_GROUP_ROWS * _BIAS_GROUP_ROWS]
    for c in range(C):
        acc[c] = 0
    r = r0
    if C < R:
        # Few channels: the per-channel sums are a chain of dependent adds per row
        # (LeNet's conv1, 200K rows of 6: 0.68 ms); groups of R rows are one flat run
        # of R * C independent sums instead, folded per channel at the end.
        for j in range(R * C):
            run[j] = 0
        while r + R <= r1:
            row = dy + r * C
            if y == NULL:
                for j in range(R * C):
                    run[j] += row[j]
            else:
                _mask_sum(row, y + r * C, masked + r * C, run, R * C)
            r += R
        for j in range(R * C):
            acc[j % C] += run[j]
    for r in range(r, r1):
        row = dy + r * C
        if y == NULL:
            for c in range(C):
                acc[c] += row[c]
        else:
            _mask_sum(row, y + r * C, masked + r * C, acc, C)


cdef void _bias_sums(const floating* dy, floating* db, Py_ssize_t M, Py_ssize_t C,
                     double* acc, Py_ssize_t nb, int nt, const floating* y,
                     floating* masked) noexcept nogil:
    """db += the column sums of dy (masked by y when given), in nb row blocks whose
    sums are added in block order: the same bits for any thread count."""
    cdef Py_ssize_t b, c
    cdef double s
    if nt == 1:
        for b in range(nb):
            _bias_block(dy, acc + b * (C + 8), b * M // nb, (b + 1) * M // nb, C, y, masked)
    else:
        for b in prange(nb, num_threads=nt, schedule="static"):
            _bias_block(dy, acc + b * (C + 8), b * M // nb, (b + 1) * M // nb, C, y, masked)
    for c in range(C):
        s = 0
        for b in range(nb):
            s = s + acc[b * (C + 8) + c]
        db[c] += <floating>s


def bias_grad(floating[:, ::1] dy, floating[::1] db, int n_threads, y=None, masked=None):
    """``db += dy.sum(axis=0)`` for dy of shape (M, C), deterministic in the thread count.

    With ``y`` and ``masked`` (both (M, C) like dy): a fused ReLU's backward first,
    ``masked = where(y <= 0, 0, dy)`` (as _elementwise.relu_backward), written in
    the same pass, and ``db += masked.sum(axis=0)``."""
    cdef Py_ssize_t M = dy.shape[0], C = dy.shape[1]
    cdef Py_ssize_t nb
    cdef double* acc
    cdef int nt
    cdef const floating[:, ::1] yv
    cdef floating[:, ::1] mv
    cdef const floating* yp = NULL
    cdef floating* mp = NULL
    if db.shape[0] != C:
        raise ValueError(f"bias_grad: gradient of shape {(M, C)} does not match "
                         f"bias of shape ({db.shape[0]},)")
    if (y is None) != (masked is None):
        raise ValueError("bias_grad: give both y and masked or neither")
    if y is not None:
        yv = y
        mv = masked
        if (yv.shape[0], yv.shape[1]) != (M, C) or (mv.shape[0], mv.shape[1]) != (M, C):
            raise ValueError(f"bias_grad: y {np.shape(y)} and masked {np.shape(masked)} must "
                             f"match the gradient's shape {(M, C)}")
        if M and C:
            yp = &yv[0, 0]
            mp = &mv[0, 0]
    if M == 0 or C == 0:
        return
    nb = min(<Py_ssize_t>_BIAS_BLOCKS, M)
    # Rows of 8 extra doubles keep two blocks' accumulators off one cache line.
    acc = <double*>malloc(nb * (C + 8) * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    nt = effective_threads(M * C, n_threads)
    with nogil:
        _bias_sums(&dy[0, 0], &db[0], M, C, acc, nb, nt, yp, mp)
    free(acc)


# ---------------------------------------------------------------------------
# Strided input gradient by phases
#
# With stride s, input row ih receives dy only through the taps kh with
# (ih + ph - kh) % s == 0: the dx pixels of one phase (ih % sh, iw % sw) are a
# stride-1 convolution of dy with that phase's taps, flipped (3x3 stride 2: a
# 1x1, two 1x2 / 2x1 and one 2x2 kernel).  Each runs on the direct row kernel,
# writing every sw-th pixel of its dx rows: no column matrix, no col2im pass,
# and the same multiply-adds as the GEMM.

def phase_weights(w, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                  Py_ssize_t groups):
    """conv_phase_dx's operand for an HWIO weight (KH, KW, C_in/G, C_out) of a
    dilation-1 convolution: for each phase (a, b), in order a * sw + b, None (no
    tap reaches it: dx is zero there) or (wsub, oh, ow): wsub[g, u, v, o, i] =
    w[a + ph - sh*(oh + u), b + pw - sw*(ow + v), i, g*Cog + o] (inputs and outputs
    of each group swapped, as flip_weight; group-major, so that the kernel reads a
    group's rows C_in/G values apart rather than C_in), oh/ow the dy offsets of its
    first tap."""
    w = np.asarray(w)
    KH, KW, cig, cout = w.shape
    if groups < 1 or cout % groups or sh < 1 or sw < 1:
        raise ValueError(f"phase_weights: weight {w.shape} in {groups} groups, stride "
                         f"({sh}, {sw})")
    cog = cout // groups
    out = []
    for a in range(sh):
        taps_h = [k for k in range(KH) if (a + ph - k) % sh == 0][::-1]   # offsets ascending
        for b in range(sw):
            taps_w = [k for k in range(KW) if (b + pw - k) % sw == 0][::-1]
            if not taps_h or not taps_w:
                out.append(None)
                continue
            sub = w[np.ix_(taps_h, taps_w)]                      # (nu, nv, Cig, Cout)
            sub = sub.reshape(len(taps_h), len(taps_w), cig, groups, cog)
            wsub = np.ascontiguousarray(sub.transpose(3, 0, 1, 4, 2))   # (G, nu, nv, Cog, Cig)
            out.append((wsub, (a + ph - taps_h[0]) // sh, (b + pw - taps_w[0]) // sw))
    return out


def conv_phase_dx(floating[:, :, :, ::1] dy, list phases, floating[:, :, :, ::1] dx,
                  Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t sh, Py_ssize_t sw, int n_threads,
                  Py_ssize_t groups=1):
    """Overwrite images [n0, n1) of dx (NHWC) with the input gradient of a strided,
    dilation-1 convolution, given dy and phases = phase_weights(w, ...).  C_in per
    group a multiple of direct_lanes.  Rows of dx in parallel on n_threads; each
    element's sum in a fixed order (the phase's taps, then its channels)."""
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[1], W = dx.shape[2], C = dx.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2], Cout = dy.shape[3], G = groups
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    cdef Py_ssize_t p, r, nphase = sh * sw
    cdef int nt
    dtype = np.float32 if floating is float else np.float64
    if dy.shape[0] != N or not 0 <= n0 <= n1 <= N:
        raise ValueError(f"conv_phase_dx: dy of {dy.shape[0]} images for dx of {N}, "
                         f"images [{n0}, {n1})")
    if sh < 1 or sw < 1 or len(phases) != nphase:
        raise ValueError(f"conv_phase_dx: {len(phases)} phases for stride ({sh}, {sw})")
    if G < 1 or C % G or Cout % G or (C // G) % lanes:
        raise ValueError(f"conv_phase_dx: groups={G} needs a multiple of {lanes} input "
                         f"channels per group, got {C} in total")
    keep = []                           # the operands stay referenced while nogil
    cdef Py_ssize_t[:, ::1] geo = np.zeros((nphase, 4), np.intp)   # nu, nv, oh, ow
    cdef const floating** wp = <const floating**>calloc(nphase, sizeof(floating*))
    if wp == NULL:
        raise MemoryError()
    cdef floating[:, :, :, ::1] wv
    cdef floating* zeros = NULL
    cdef floating* staged = NULL
    cdef Py_ssize_t pad, image
    try:
        for p in range(nphase):
            if phases[p] is None:
                continue
            wsub, off_h, off_w = phases[p]
            wsub = np.asarray(wsub)
            if (wsub.ndim != 5 or wsub.dtype != dtype or not wsub.flags.c_contiguous
                    or wsub.shape[0] != G or wsub.shape[3] != Cout // G
                    or wsub.shape[4] != C // G):
                raise ValueError(f"conv_phase_dx: phase {p} weight {wsub.shape} "
                                 f"({wsub.dtype}) is not ({G}, taps, taps, {Cout // G}, "
                                 f"{C // G}) {np.dtype(dtype)}")
            wv = wsub.reshape(G * wsub.shape[1], wsub.shape[2], Cout // G, C // G)
            keep.append(wsub)
            wp[p] = &wv[0, 0, 0, 0]
            geo[p, 0], geo[p, 1], geo[p, 2], geo[p, 3] = (wsub.shape[1], wsub.shape[2],
                                                          off_h, off_w)
        zeros = <floating*>calloc(Cout, sizeof(floating))
        if zeros == NULL:
            raise MemoryError()
        nt = effective_threads((n1 - n0) * H * W * C * Cout, n_threads)
        # Grouped: dy's images copied into per-group planes first, as the forward's
        # (_direct_group_image: a group's slice in place is C_out values apart, which
        # at a power of two maps onto few L1 sets), with ``pad`` zero columns each
        # side so that every block of a row reads inside its plane.
        pad = image = 0
        if G > 1 and _STAGE_GROUPS:
            pad = 1 + max([abs(int(g[3])) + int(g[1]) for g in np.asarray(geo)])
            image = OH * (OW + 2 * pad) * (Cout // G)     # one image's plane of a group
        with nogil:
            if image > 0:
                staged = <floating*>cnet_stage_buffer((n1 - n0) * image * G * sizeof(floating))
            if staged != NULL:
                for p in prange(n1 - n0, num_threads=nt, schedule="static"):
                    _stage_group_planes(&dy[n0 + p, 0, 0, 0], staged + p * image, OH, OW, Cout,
                                        G, pad, (n1 - n0) * image)
            if nt <= 1:
                for r in range((n1 - n0) * H):
                    _phase_row(&dy[0, 0, 0, 0], wp, geo, zeros, &dx[0, 0, 0, 0], n0 + r // H,
                               r % H, G, H, W, C, OH, OW, Cout, sh, sw, lanes, staged, n0, pad,
                               (n1 - n0) * image)
            else:
                for r in prange((n1 - n0) * H, num_threads=nt, schedule="static"):
                    _phase_row(&dy[0, 0, 0, 0], wp, geo, zeros, &dx[0, 0, 0, 0], n0 + r // H,
                               r % H, G, H, W, C, OH, OW, Cout, sh, sw, lanes, staged, n0, pad,
                               (n1 - n0) * image)
    finally:
        free(wp)
        free(zeros)


cdef void _phase_row(const floating* dy, const floating** wp, Py_ssize_t[:, ::1] geo,
                     const floating* zeros, floating* dx, Py_ssize_t n, Py_ssize_t ih,
                     Py_ssize_t G, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                     Py_ssize_t OW, Py_ssize_t Cout, Py_ssize_t sh, Py_ssize_t sw,
                     Py_ssize_t lanes, const floating* staged, Py_ssize_t n0,
                     Py_ssize_t pad, Py_ssize_t plane) noexcept nogil:
    """dx row (n, ih): for each phase b of its columns, the row ih // sh of phase
    (ih % sh, b)'s stride-1 convolution, group by group, into every sw-th pixel.
    ``staged`` (or NULL): dy's images [n0, ...) as G planes (images, OH, OW + 2 pad,
    C_out/G), ``pad`` zero columns each side (conv_phase_dx)."""
    cdef Py_ssize_t a = ih % sh, i = ih // sh, b, g, p, j, wb, wg
    cdef Py_ssize_t Cig = C // G, Cog = Cout // G
    cdef int variant = _direct_variant(Cig, lanes)
    cdef floating* row = dx + (n * H + ih) * W * C
    # dy read in place (group g's slice of each pixel), or from the staged planes
    # (``plane`` values apart; image n - n0, pad columns in)
    cdef Py_ssize_t src_n = n, src_w = OW, src_c = Cout, shift = 0, group_at = Cog
    cdef const floating* src = dy
    if staged != NULL:
        src, src_n, src_w, src_c, shift, group_at = staged, n - n0, OW + 2 * pad, Cog, pad, plane
    for b in range(sw):
        p = a * sw + b
        wb = (W - b + sw - 1) // sw           # this phase's pixels in the row
        if wb <= 0:
            continue
        if wp[p] == NULL:
            for j in range(wb):
                memset(row + (b + j * sw) * C, 0, C * sizeof(floating))
            continue
        wg = geo[p, 0] * geo[p, 1] * Cog * Cig          # one group's phase weight
        for g in range(G):
            # the next row's dx lines, a share per (phase, group) call: the row is
            # written in pieces a pixel pitch apart, whose store misses stall on DRAM
            _prefetch_write_lines(row + W * C, W * C, b * G + g, sw * G)
            if floating is float:
                cnet_direct_row_f32(variant, src + g * group_at, wp[p] + g * wg, NULL, zeros,
                                    row + b * C + g * Cig, src_n, i, OH, src_w, Cog, src_c, wb,
                                    Cig, sw * C, Cig, geo[p, 0], geo[p, 1], 1, 1, -geo[p, 2],
                                    -geo[p, 3] - shift, 1, 1)
            else:
                cnet_direct_row_f64(variant, src + g * group_at, wp[p] + g * wg, NULL, zeros,
                                    row + b * C + g * Cig, src_n, i, OH, src_w, Cog, src_c, wb,
                                    Cig, sw * C, Cig, geo[p, 0], geo[p, 1], 1, 1, -geo[p, 2],
                                    -geo[p, 3] - shift, 1, 1)


# ---------------------------------------------------------------------------
# cnet's GEMM: C = A B (+ bias, ReLU) and gw (+)= A^T B for 1x1 and im2col layers,
# the maps (or column matrices) read in place, beating OpenBLAS's sgemm on them

cdef extern from *:
    """
    #include "_simd.h"
    typedef float cnet_gemm_vf __attribute__((vector_size(64)));
    typedef float cnet_gemm_vfu __attribute__((vector_size(64), aligned(4)));
    typedef double cnet_gemm_vd __attribute__((vector_size(64)));
    typedef double cnet_gemm_vdu __attribute__((vector_size(64), aligned(8)));

    /* MR rows per register tile; MC rows per cache block (its MC x KC slice of A
       stays in L1 while the panels of B pass); KC steps of K per pass over a tile;
       columns in groups whose KC-deep slice of B is at most B_BYTES (stays in L2);
       MB rows per thread task; gemm_tn copies blocks of KW rows x IB columns of x.
       ResNeXt's products (K x N from 64 x 256 to 1024 x 512, batch 64), 2 threads,
       GFLOP/s by (MC, KC): (24, 256) 150-205, (24, 128) 150-200, (48, 128)
       139-199, (12, 256) 134-207, (24, 64) 148-191; B_BYTES 256 KB and MB 1024 a
       tie.  gemm_tn, one thread, hot, ResNeXt's 1x1 shapes: 230-259 GFLOP/s with
       (IB, KW) (24, 256), (24, 128), (48, 128), (12, 512) alike (208-226 reading x
       in place); ResNeXt-29 training 1.5% faster with (24, 256) than (12, 512). */
    #define CNET_GEMM_MR 6
    #define CNET_GEMM_MC 24
    #define CNET_GEMM_KC 256
    #define CNET_GEMM_KW 256
    #define CNET_GEMM_IB 24
    #define CNET_GEMM_B_BYTES (512 << 10)
    #define CNET_GEMM_MB 256

    /* One MR x NV-vector tile of C = A B over kc steps of K: A(p, k) at
       a[p * ars + k * aks] (rows < MR: the last row is read again, its sums not
       stored), B's NV vectors of step k at bp + k * bks (a packed panel, or the
       rows of an NHWC map).  The sums start at zero, at the bias (init 1) or at C
       (init 2: a later block of K, or accumulate); init 3 starts at zero and adds
       C at the store (accumulate into C from memory: its lines arrive while the
       sums run instead of stalling the tile's start); relu at the store.  pf (or
       NULL): the rows of A that the same tile of the next cache block reads, pf +
       p * ars, prefetched into L2 a line per step over the first 16 * MR steps (the
       maps come cold from DRAM: ResNeXt-29's 1x1 forward by chunks, one thread,
       226-254 -> 246-261 GFLOP/s, 255-267 with the map in cache). */
    /* acc OP the tile's C (OP = to load, += to add; inside CNET_GEMM_TILE); a partial
       tile through a buffer: acc indexed by a variable would live in memory in every
       tile. */
    #define CNET_GEMM_TILE_C(T, VTU, VW, NV, OP)                                            \
        do {                                                                                \
            T part[NV * VW] = {0};                                                          \
            for (int p = 0; p < CNET_GEMM_MR; p++) {                                        \
                if (full) {                                                                 \
                    for (int v = 0; v < NV; v++) acc[p][v] OP *(const VTU*)(c + p * ldc + v * VW); \
                } else if (p < rows) {                                                      \
                    memcpy(part, c + p * ldc, cols * sizeof(T));                            \
                    for (int v = 0; v < NV; v++) acc[p][v] OP *(const VTU*)(part + v * VW); \
                }                                                                           \
            }                                                                               \
        } while (0)

    #define CNET_GEMM_TILE(NAME, T, VT, VTU, VW, NV)                                        \
    static inline __attribute__((always_inline)) void NAME(                                 \
        const T* a, Py_ssize_t ars, Py_ssize_t aks, const T* bp, Py_ssize_t bks,            \
        Py_ssize_t kc, T* c, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t cols,              \
        const T* bias, int init, int relu, const T* pf)                                     \
    {                                                                                       \
        const T* ap[CNET_GEMM_MR];                                                          \
        for (int p = 0; p < CNET_GEMM_MR; p++) ap[p] = a + (p < rows ? p : rows - 1) * ars; \
        VT acc[CNET_GEMM_MR][NV];                                                           \
        int full = rows == CNET_GEMM_MR && cols == NV * VW;                                 \
        /* C's lines on their way in while the sums run: the store would miss (a new  */    \
        /* output map) and wait for each line (K = 64-128: 5-11% faster) */                 \
        if (init != 2)                                                                      \
            for (int p = 0; p < rows; p++)                                                  \
                for (int v = 0; v < NV; v++) __builtin_prefetch(c + p * ldc + v * VW, 1);   \
        T bias_part[NV * VW] = {0};      /* the bias of a partial panel: no read past it */ \
        if (init == 1 && cols < NV * VW) {                                                  \
            memcpy(bias_part, bias, cols * sizeof(T));                                      \
            bias = bias_part;                                                               \
        }                                                                                   \
        for (int v = 0; v < NV; v++) {                                                      \
            VT b0 = {0};                                                                    \
            if (init == 1) b0 = *(const VTU*)(bias + v * VW);                               \
            for (int p = 0; p < CNET_GEMM_MR; p++) acc[p][v] = b0;                          \
        }                                                                                   \
        if (init == 2) CNET_GEMM_TILE_C(T, VTU, VW, NV, =);                                 \
        for (Py_ssize_t k = 0; k < kc; k++) {                                               \
            if (pf && k < 16 * CNET_GEMM_MR)                                                \
                __builtin_prefetch(pf + (k % CNET_GEMM_MR) * ars + k / CNET_GEMM_MR * 16, 0, 2); \
            VT b[NV];                                                                       \
            for (int v = 0; v < NV; v++) b[v] = *(const VTU*)(bp + k * bks + v * VW);       \
            _Pragma("GCC unroll 16")                                                        \
            for (int p = 0; p < CNET_GEMM_MR; p++) {                                        \
                T av = ap[p][k * aks];                                                      \
                for (int v = 0; v < NV; v++) acc[p][v] += av * b[v];                        \
            }                                                                               \
        }                                                                                   \
        if (init == 3) CNET_GEMM_TILE_C(T, VTU, VW, NV, +=);                                \
        if (relu) {                                                                         \
            /* max(acc, 0) by a mask, NaN passed through (as cnet_relu) */                  \
            VT zero = {0};                                                                  \
            for (int p = 0; p < CNET_GEMM_MR; p++)                                          \
                for (int v = 0; v < NV; v++) {                                              \
                    __typeof__(zero < zero) neg = acc[p][v] < zero;                         \
                    acc[p][v] = (VT)((__typeof__(neg))acc[p][v] & ~neg);                    \
                }                                                                           \
        }                                                                                   \
        for (int p = 0; p < CNET_GEMM_MR; p++) {                                            \
            if (full) {                                                                     \
                for (int v = 0; v < NV; v++) *(VTU*)(c + p * ldc + v * VW) = acc[p][v];     \
            } else {                                                                        \
                T part[NV * VW];                                                            \
                for (int v = 0; v < NV; v++) *(VTU*)(part + v * VW) = acc[p][v];            \
                if (p < rows) memcpy(c + p * ldc, part, cols * sizeof(T));                  \
            }                                                                               \
        }                                                                                   \
    }

    /* Rows [r0, r1) of C (ldc) = A (lda) Bp (C += A Bp where accumulate), Bp from
       cnet_gemm_pack: panels of 4 vectors of columns (the last of whole vectors),
       each K steps deep; or, with ldb > 0, B itself (K x N rows ldb apart, N whole
       vectors) read in place: for a few rows of A, packing B costs as much as the
       product. */
    #define CNET_GEMM_ROWS(NAME, T, VT, VTU, VW)                                            \
    CNET_GEMM_TILE(NAME##_t1, T, VT, VTU, VW, 1)                                            \
    CNET_GEMM_TILE(NAME##_t2, T, VT, VTU, VW, 2)                                            \
    CNET_GEMM_TILE(NAME##_t3, T, VT, VTU, VW, 3)                                            \
    CNET_GEMM_TILE(NAME##_t4, T, VT, VTU, VW, 4)                                            \
    CNET_CLONES static void NAME(                                                           \
        const T* A, Py_ssize_t lda, const T* Bp, Py_ssize_t ldb, const T* bias, T* C,       \
        Py_ssize_t ldc, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K, Py_ssize_t N, int relu, \
        int accumulate)                                                                     \
    {                                                                                       \
        Py_ssize_t nc = CNET_GEMM_B_BYTES / (CNET_GEMM_KC * sizeof(T)) / (4 * VW) * (4 * VW); \
        for (Py_ssize_t j0 = 0; j0 < N; j0 += nc)                                           \
        for (Py_ssize_t k0 = 0; k0 < K; k0 += CNET_GEMM_KC) {                               \
            Py_ssize_t kc = K - k0 < CNET_GEMM_KC ? K - k0 : CNET_GEMM_KC;                  \
            int init = k0 ? 2 : accumulate ? 3 : bias ? 1 : 0, last = relu && k0 + kc == K; \
            Py_ssize_t j1 = N - j0 < nc ? N : j0 + nc;                                      \
            for (Py_ssize_t i0 = r0; i0 < r1; i0 += CNET_GEMM_MC) {                         \
                Py_ssize_t i1 = r1 - i0 < CNET_GEMM_MC ? r1 : i0 + CNET_GEMM_MC;            \
                for (Py_ssize_t j = j0; j < j1; j += 4 * VW) {                              \
                    Py_ssize_t cols = N - j < 4 * VW ? N - j : 4 * VW;                      \
                    int nv = (int)((cols + VW - 1) / VW);                                   \
                    const T* bp = ldb ? Bp + k0 * ldb + j : Bp + j * K + k0 * nv * VW;      \
                    Py_ssize_t bks = ldb ? ldb : nv * VW;                                   \
                    const T* bj = bias ? bias + j : NULL;                                   \
                    for (Py_ssize_t i = i0; i < i1; i += CNET_GEMM_MR) {                    \
                        Py_ssize_t rows = i1 - i < CNET_GEMM_MR ? i1 - i : CNET_GEMM_MR;    \
                        const T* a = A + i * lda + k0;                                      \
                        T* c = C + i * ldc + j;                                             \
                        const T* pf = j == j0 && i + CNET_GEMM_MC < r1                      \
                                      ? a + CNET_GEMM_MC * lda : NULL;                      \
                        CNET_GEMM_CALL(NAME, nv, a, lda, 1, bp, bks, kc, c, ldc, rows,      \
                                     cols, bj, init, last, pf);                             \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    /* gw[c0:c1, :] (+)= x[r0:r1, c0:c1]^T dy[r0:r1, :]: a weight gradient (gw K x N        \
       row-major, N a multiple of VW; x and dy rows lda, ldb apart), dy read in place.      \
       x's block of KW rows x IB columns is first copied, 6 columns per step of k, into     \
       xb (L1): read in place, a tile's column of 6 values per row came from L2 (rows a     \
       power of two apart share few L1 sets), 208-226 GFLOP/s against 230-259; the next     \
       block's rows are prefetched into L2 meanwhile (x comes cold from DRAM).  Then each   \
       4-vector panel of dy meets the block's tiles; gw's tiles are loaded and stored       \
       once per block.  Fixed order: the same sums whatever the thread split. */            \
    CNET_CLONES static void NAME##_wgrad(                                                   \
        const T* x, Py_ssize_t lda, const T* dy, Py_ssize_t ldb, T* gw, int accumulate,     \
        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t N)           \
    {                                                                                       \
        T xb[CNET_GEMM_IB * CNET_GEMM_KW];                                                 \
        for (Py_ssize_t k0 = r0; k0 < r1; k0 += CNET_GEMM_KW) {                            \
            Py_ssize_t kc = r1 - k0 < CNET_GEMM_KW ? r1 - k0 : CNET_GEMM_KW;              \
            int init = accumulate || k0 > r0 ? 2 : 0;                                       \
            for (Py_ssize_t i0 = c0; i0 < c1; i0 += CNET_GEMM_IB) {                         \
                Py_ssize_t i1 = c1 - i0 < CNET_GEMM_IB ? c1 : i0 + CNET_GEMM_IB;            \
                /* x's block, tile by tile: 6 columns per step of k, contiguous */          \
                for (Py_ssize_t k = 0; k < kc; k++) {                                       \
                    const T* xr = x + (k0 + k) * lda;                                       \
                    /* the next block's rows on their way into L2 (past x: harmless) */     \
                    const T* next = i1 < c1 ? xr + i1 : x + (k0 + kc + k) * lda + c0;       \
                    __builtin_prefetch(next, 0, 2);                                         \
                    __builtin_prefetch(next + 16, 0, 2);                                    \
                    for (Py_ssize_t i = i0; i < i1; i += CNET_GEMM_MR) {                    \
                        T* o = xb + (i - i0) * kc + k * CNET_GEMM_MR;                       \
                        if (i1 - i >= CNET_GEMM_MR)                                         \
                            for (int p = 0; p < CNET_GEMM_MR; p++) o[p] = xr[i + p];        \
                        else                                                                \
                            for (Py_ssize_t p = 0; p < i1 - i; p++) o[p] = xr[i + p];       \
                    }                                                                       \
                }                                                                           \
                for (Py_ssize_t j = 0; j < N; j += 4 * VW) {                                \
                    Py_ssize_t cols = N - j < 4 * VW ? N - j : 4 * VW;                      \
                    int nv = (int)(cols / VW);                                              \
                    const T* bp = dy + k0 * ldb + j;                                        \
                    for (Py_ssize_t i = i0; i < i1; i += CNET_GEMM_MR) {                    \
                        Py_ssize_t rows = i1 - i < CNET_GEMM_MR ? i1 - i : CNET_GEMM_MR;    \
                        CNET_GEMM_CALL(NAME, nv, xb + (i - i0) * kc, 1, CNET_GEMM_MR, bp,   \
                                     ldb, kc, gw + i * N + j, N, rows, cols, NULL, init, 0, \
                                     NULL);                                                 \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

    /* The tile for nv (1-4) vectors of columns. */
    #define CNET_GEMM_CALL(NAME, nv, ...)                                                   \
        do {                                                                                \
            if ((nv) == 4) NAME##_t4(__VA_ARGS__);                                          \
            else if ((nv) == 3) NAME##_t3(__VA_ARGS__);                                     \
            else if ((nv) == 2) NAME##_t2(__VA_ARGS__);                                     \
            else NAME##_t1(__VA_ARGS__);                                                    \
        } while (0)
    /* Panel j (columns j.. of 4 vectors, the last of whole vectors, zero-padded) of
       B (K x N, element (k, n) at B[k * rs + n * cs]) packed K rows deep at
       out + j * K.  A transposed B (rs 1: a weight read as W^T) in blocks of 16
       rows, so that both sides stay in L1. */
    #define CNET_GEMM_PACK(NAME, T, VW)                                                     \
    static void NAME(const T* B, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t K,                \
                     Py_ssize_t N, Py_ssize_t j, T* out)                                    \
    {                                                                                       \
        Py_ssize_t cols = N - j < 4 * VW ? N - j : 4 * VW;                                  \
        Py_ssize_t w = (cols + VW - 1) / VW * VW;                                           \
        T* o = out + j * K;                                                                 \
        for (Py_ssize_t k0 = 0; k0 < K; k0 += 16) {                                         \
            Py_ssize_t k1 = K - k0 < 16 ? K : k0 + 16;                                      \
            if (cs == 1)                                                                    \
                for (Py_ssize_t k = k0; k < k1; k++)                                        \
                    memcpy(o + k * w, B + k * rs + j, cols * sizeof(T));                    \
            else                                                                            \
                for (Py_ssize_t q = 0; q < cols; q++)                                       \
                    for (Py_ssize_t k = k0; k < k1; k++)                                    \
                        o[k * w + q] = B[k * rs + (j + q) * cs];                            \
            for (Py_ssize_t k = k0; k < k1; k++)                                            \
                for (Py_ssize_t q = cols; q < w; q++) o[k * w + q] = 0;                     \
        }                                                                                   \
    }
    CNET_GEMM_PACK(cnet_gemm_pack_f32, float, 16)
    CNET_GEMM_PACK(cnet_gemm_pack_f64, double, 8)

    CNET_GEMM_ROWS(cnet_gemm_rows_f32, float, cnet_gemm_vf, cnet_gemm_vfu, 16)
    CNET_GEMM_ROWS(cnet_gemm_rows_f64, double, cnet_gemm_vd, cnet_gemm_vdu, 8)
    """
    void cnet_gemm_rows_f32(const float* A, Py_ssize_t lda, const float* Bp, Py_ssize_t ldb,
                          const float* bias, float* C, Py_ssize_t ldc, Py_ssize_t r0,
                          Py_ssize_t r1, Py_ssize_t K, Py_ssize_t N, int relu,
                          int accumulate) noexcept nogil
    void cnet_gemm_rows_f64(const double* A, Py_ssize_t lda, const double* Bp, Py_ssize_t ldb,
                          const double* bias, double* C, Py_ssize_t ldc, Py_ssize_t r0,
                          Py_ssize_t r1, Py_ssize_t K, Py_ssize_t N, int relu,
                          int accumulate) noexcept nogil
    void cnet_gemm_rows_f32_wgrad(const float* x, Py_ssize_t lda, const float* dy,
                                Py_ssize_t ldb, float* gw, int accumulate, Py_ssize_t r0,
                                Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                                Py_ssize_t N) noexcept nogil
    void cnet_gemm_rows_f64_wgrad(const double* x, Py_ssize_t lda, const double* dy,
                                Py_ssize_t ldb, double* gw, int accumulate, Py_ssize_t r0,
                                Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                                Py_ssize_t N) noexcept nogil
    void cnet_gemm_pack_f32(const float* B, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t K,
                          Py_ssize_t N, Py_ssize_t j, float* out) noexcept nogil
    void cnet_gemm_pack_f64(const double* B, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t K,
                          Py_ssize_t N, Py_ssize_t j, double* out) noexcept nogil
    enum: CNET_GEMM_MB
    enum: CNET_GEMM_MR


cdef bint _OWN_GEMM = cnet_wide_vectors()


def gemm_kernel(enable=None):
    """Whether Conv2d's 1x1 and im2col GEMMs use gemm_packed / gemm_tn (AVX-512
    machines: the 6 x 4-vector tiles need 32 vector registers; elsewhere BLAS).
    Tests and benchmarks may switch it (returns the previous setting)."""
    global _OWN_GEMM
    previous = bool(_OWN_GEMM)
    if enable is not None:
        _OWN_GEMM = bool(enable)
    return previous


def gemm_packed_size(Py_ssize_t K, Py_ssize_t N, dtype):
    """Elements of gemm_pack's result for a K x N matrix."""
    lanes = direct_lanes(dtype)
    return K * (-(-N // lanes) * lanes)


def gemm_pack(b, out=None, int n_threads=1):
    """B (K x N, any strides) as gemm_packed reads it: panels of 4 vectors of
    columns (the last one of whole vectors, zero-padded), each K rows deep, one
    after another.  Returns the flat packed array (written into ``out`` if given)."""
    b = np.asarray(b)
    if b.ndim != 2 or b.dtype not in (np.float32, np.float64):
        raise ValueError(f"gemm_pack: B must be a 2-D float32/float64 matrix, got "
                         f"shape {b.shape} {b.dtype}")
    if b.strides[0] % b.itemsize or b.strides[1] % b.itemsize:
        b = np.ascontiguousarray(b)
    size = gemm_packed_size(b.shape[0], b.shape[1], b.dtype)
    if out is None:
        out = np.empty(size, b.dtype)
    elif out.shape != (size,) or out.dtype != b.dtype or not out.flags.c_contiguous:
        raise ValueError(f"gemm_pack: out must be a contiguous ({size},) {b.dtype} "
                         f"array, got {out.shape} {out.dtype}")
    if b.dtype == np.float32:
        _pack_panels[float](b, out, n_threads)
    else:
        _pack_panels[double](b, out, n_threads)
    return out


cdef void _pack_panels(floating[:, :] b, floating[::1] out, int n_threads):
    cdef Py_ssize_t K = b.shape[0], N = b.shape[1], lanes = 16 if floating is float else 8
    cdef Py_ssize_t rs = b.strides[0] // sizeof(floating), cs = b.strides[1] // sizeof(floating)
    cdef Py_ssize_t panels = (N + 4 * lanes - 1) // (4 * lanes), j
    if K == 0 or N == 0:
        return
    cdef const floating* B = &b[0, 0]
    cdef floating* o = &out[0]
    cdef int nt = effective_threads(K * N, n_threads, cnet_min_elements_per_thread())
    if nt > panels:
        nt = <int>panels
    with nogil:
        for j in prange(panels, num_threads=nt, schedule="static"):
            if floating is float:
                cnet_gemm_pack_f32(B, rs, cs, K, N, j * 4 * lanes, o)
            else:
                cnet_gemm_pack_f64(B, rs, cs, K, N, j * 4 * lanes, o)


def gemm_packed(floating[:, ::1] a, bp, floating[:, ::1] c, bias,
                bint relu, Py_ssize_t r0, Py_ssize_t r1, int n_threads,
                bint accumulate=False, moments=None):
    """c[r0:r1] = a[r0:r1] @ B (+ bias) (ReLU), B given as gemm_pack(B) (K x N,
    K = a's columns, N = c's columns), or as B itself (C-contiguous, N whole
    vectors: gemm_inplace_fits), read in place, which pays for a few rows of A
    (packing a weight costs as much as a product with one image's small map).
    Register tiles of 6 rows x 4 vectors, A read in place; rows split over
    n_threads in blocks of CNET_GEMM_MB, or, with fewer blocks than threads and no
    moments, column panels.  Each element's sums
    run in the same order whatever the thread count (bitwise the same).
    ``accumulate``: c[r0:r1] += a[r0:r1] @ B (ReLU of the sum; no bias), C added
    in the tiles' store (a residual's input gradient: no separate add pass).
    ``moments`` (not with relu or accumulate; c's rows unpadded):
    _batchnorm.moment_slots(gemm_row_blocks(r0, r1), N), which receives each
    block's per-channel moments of its rows right after they are stored, while in
    cache, for a training batch norm after the layer (conv_direct's moments).
    a and c must not overlap."""
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], N = c.shape[1]
    cdef Py_ssize_t lda = a.strides[0] // sizeof(floating)
    cdef Py_ssize_t ldc = c.strides[0] // sizeof(floating)
    dtype = np.float32 if floating is float else np.float64
    if c.shape[0] != M or not 0 <= r0 <= r1 <= M:
        raise ValueError(f"gemm_packed: A has {M} rows and C {c.shape[0]}, rows "
                         f"[{r0}, {r1}) asked")
    cdef floating[::1] bp_v
    cdef floating[:, ::1] b_v
    cdef Py_ssize_t ldb = 0
    cdef const floating* B
    if np.ndim(bp) == 2:
        b_v = bp
        if b_v.shape[0] != K or b_v.shape[1] != N or not gemm_inplace_fits(N, dtype):
            raise ValueError(f"gemm_packed: B of shape {tuple(b_v.shape)[:2]} read in "
                             f"place must be {K} x {N} with {N} a multiple of "
                             f"{direct_lanes(dtype)}")
        ldb = N
        B = &b_v[0, 0] if K else NULL
    else:
        bp_v = bp
        if bp_v.shape[0] != gemm_packed_size(K, N, dtype):
            raise ValueError(f"gemm_packed: packed B of {bp_v.shape[0]} elements is not "
                             f"gemm_pack of a {K} x {N} matrix")
        B = &bp_v[0] if bp_v.shape[0] else NULL
    if accumulate and bias is not None:
        raise ValueError("gemm_packed: accumulate adds A @ B to C; a bias is not taken "
                         "with it")
    cdef floating[::1] bias_v
    cdef const floating* bias_p = NULL
    if bias is not None:
        bias_v = bias
        if bias_v.shape[0] != N:
            raise ValueError(f"gemm_packed: bias of {bias_v.shape[0]} values for {N} "
                             f"columns")
        bias_p = &bias_v[0]
    if r1 == r0 or N == 0:
        return
    cdef const floating* A = &a[0, 0]
    cdef floating* C = &c[0, 0]
    # a tile's store would overwrite rows of A that later panels still read
    if A < <const floating*>(C + M * ldc) and <const floating*>C < A + M * lda:
        raise ValueError("gemm_packed: A and C overlap in memory")
    cdef Py_ssize_t blocks = gemm_row_blocks(r0, r1), blk, i0, i1
    cdef double* mslots = NULL
    cdef Py_ssize_t* mcounts = NULL
    cdef double[:, ::1] mslots_v
    cdef Py_ssize_t[::1] mcounts_v
    if moments is not None:
        if ldc != N:
            raise ValueError("gemm_packed: moments need C's rows unpadded")
        mslots_v, mcounts_v = _moment_pieces("gemm_packed", moments, blocks, N,
                                             relu or accumulate)
        mslots = &mslots_v[0, 0]
        mcounts = &mcounts_v[0]
    cdef int nt = effective_threads((r1 - r0) * K * N, n_threads)
    # Fewer row blocks than threads (a small batch's layer: one image's 4x4 map is 16
    # rows): the threads take column panels instead, each reading all of A and its
    # own panels of B.  Each C element's sums run as in the row split (bitwise).
    cdef Py_ssize_t width = 4 * (16 if floating is float else 8)
    cdef Py_ssize_t panels = (N + width - 1) // width, part, parts, j0, j1
    if nt > blocks and mslots == NULL and panels > blocks:
        parts = min(nt, panels)
        with nogil:
            for part in prange(parts, num_threads=parts, schedule="static"):
                j0 = part * panels // parts * width
                j1 = min(N, (part + 1) * panels // parts * width)
                _gemm_rows(A, lda, B + (j0 if ldb else j0 * K), ldb,
                           NULL if bias_p == NULL else bias_p + j0, C + j0, ldc, r0, r1, K,
                           j1 - j0, relu, accumulate)
        return
    if nt > blocks:
        nt = <int>blocks
    with nogil:
        if nt <= 1 and mslots == NULL:
            _gemm_rows(A, lda, B, ldb, bias_p, C, ldc, r0, r1, K, N, relu, accumulate)
        else:
            for blk in prange(blocks, num_threads=nt, schedule="dynamic"):
                i0 = r0 + blk * CNET_GEMM_MB
                i1 = min(i0 + CNET_GEMM_MB, r1)
                _gemm_rows(A, lda, B, ldb, bias_p, C, ldc, i0, i1, K, N, relu, accumulate)
                if mslots != NULL:
                    _piece_moments(<const floating*>C, i0, i1, N, mslots, mcounts, blk)


def gemm_inplace_fits(Py_ssize_t N, dtype):
    """Whether gemm_packed can read a K x N B in place: whole vectors of columns (the
    tiles load them whole; a packed B is zero-padded instead)."""
    return N % direct_lanes(dtype) == 0


def gemm_row_blocks(Py_ssize_t r0, Py_ssize_t r1):
    """How many row blocks gemm_packed splits rows [r0, r1) into (its moments' pieces)."""
    return (r1 - r0 + CNET_GEMM_MB - 1) // CNET_GEMM_MB


cdef inline void _gemm_rows(const floating* A, Py_ssize_t lda, const floating* Bp,
                          Py_ssize_t ldb, const floating* bias, floating* C, Py_ssize_t ldc,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K, Py_ssize_t N, bint relu,
                          bint accumulate) noexcept nogil:
    if floating is float:
        cnet_gemm_rows_f32(A, lda, Bp, ldb, bias, C, ldc, r0, r1, K, N, relu, accumulate)
    else:
        cnet_gemm_rows_f64(A, lda, Bp, ldb, bias, C, ldc, r0, r1, K, N, relu, accumulate)


def gemm_tn(floating[:, ::1] x, floating[:, ::1] dy, floating[:, ::1] gw,
            bint accumulate, Py_ssize_t r0, Py_ssize_t r1, int n_threads):
    """gw (+)= x[r0:r1].T @ dy[r0:r1]: a weight gradient (x a 1x1 layer's input or a
    column matrix, gw K x C_out, C_out a multiple of direct_lanes), both read in
    place, the tiles of gw split over n_threads by blocks of its rows; the same
    sums in the same order whatever the thread count."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = dy.shape[1]
    cdef Py_ssize_t lda = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t ldb = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t lanes = 16 if floating is float else 8
    if dy.shape[0] != M or gw.shape[0] != K or gw.shape[1] != N:
        raise ValueError(f"gemm_tn: x {tuple(x.shape)[:2]}, dy {tuple(dy.shape)[:2]} "
                         f"and gw {tuple(gw.shape)[:2]} do not fit (gw = x.T @ dy)")
    if N % lanes:
        raise ValueError(f"gemm_tn: C_out {N} is not a multiple of {lanes}")
    if not 0 <= r0 <= r1 <= M:
        raise ValueError(f"gemm_tn: rows [{r0}, {r1}) of {M}")
    if K == 0 or N == 0:
        return
    if r1 == r0:
        if not accumulate:
            gw[:, :] = 0
        return
    cdef const floating* X = &x[0, 0]
    cdef const floating* D = &dy[0, 0]
    cdef floating* G = &gw[0, 0]
    # blocks of 4 tiles of input channels: enough blocks to balance two threads
    cdef Py_ssize_t step = 4 * CNET_GEMM_MR, blocks = (K + step - 1) // step, blk, c0
    cdef int nt = effective_threads((r1 - r0) * K * N, n_threads)
    if nt > blocks:
        nt = <int>blocks
    with nogil:
        if nt <= 1:
            _gemm_tn(X, lda, D, ldb, G, accumulate, r0, r1, 0, K, N)
        else:
            for blk in prange(blocks, num_threads=nt, schedule="dynamic"):
                c0 = blk * step
                _gemm_tn(X, lda, D, ldb, G, accumulate, r0, r1, c0, min(c0 + step, K), N)


cdef inline void _gemm_tn(const floating* x, Py_ssize_t lda, const floating* dy,
                           Py_ssize_t ldb, floating* gw, bint accumulate, Py_ssize_t r0,
                           Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                           Py_ssize_t N) noexcept nogil:
    if floating is float:
        cnet_gemm_rows_f32_wgrad(x, lda, dy, ldb, gw, accumulate, r0, r1, c0, c1, N)
    else:
        cnet_gemm_rows_f64_wgrad(x, lda, dy, ldb, gw, accumulate, r0, r1, c0, c1, N)
