/* Pooling row kernels over NHWC, written once and instantiated per element type.
 *
 * _pool.pyx includes this file twice, with T and SFX defined for float and
 * double, and drives the rows with OpenMP (see there).  Every inner loop runs
 * over the C channels of one spatial position (unit stride); with 16-64
 * channels the loop overhead per position matters as much as the lanes, so
 * GCC builds baseline, AVX2 and AVX-512 clones and picks one at load time (a
 * wheel still runs on any x86-64).  Selects load both operands
 * unconditionally so they compile to blends, never to branches.
 */

#include "_simd.h"

#ifndef CNET_POOL_COMMON
#define CNET_POOL_COMMON
#include <math.h>

/* First output index whose window [o*s - pad, o*s - pad + span) covers input i. */
static inline Py_ssize_t cnet_lo_window(Py_ssize_t i, Py_ssize_t pad, Py_ssize_t span,
                                        Py_ssize_t stride)
{
    Py_ssize_t a = i + pad - span + 1;
    return a <= 0 ? 0 : (a + stride - 1) / stride;
}

/* Last output index (clipped to out - 1) whose window starts at or before input i. */
static inline Py_ssize_t cnet_hi_window(Py_ssize_t i, Py_ssize_t pad, Py_ssize_t stride,
                                        Py_ssize_t out)
{
    Py_ssize_t o = (i + pad) / stride;
    return o > out - 1 ? out - 1 : o;
}

/* PyTorch's avg-pool divide_factor: the window clipped to the padded input when
 * padding counts, else to the input itself; 0 for an empty window. */
static inline Py_ssize_t cnet_avg_divisor(Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t H, Py_ssize_t W,
                                          Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
                                          Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                          int count_include_pad, Py_ssize_t divisor_override)
{
    Py_ssize_t h0 = oh * sh - ph, w0 = ow * sw - pw;
    Py_ssize_t h1 = h0 + kh, w1 = w0 + kw;
    if (h1 > H + ph) h1 = H + ph;
    if (w1 > W + pw) w1 = W + pw;
    Py_ssize_t pool_size = (h1 - h0) * (w1 - w0);
    if (h0 < 0) h0 = 0;
    if (w0 < 0) w0 = 0;
    if (h1 > H) h1 = H;
    if (w1 > W) w1 = W;
    if (h0 >= h1 || w0 >= w1) return 0;
    if (divisor_override > 0) return divisor_override;
    return count_include_pad ? pool_size : (h1 - h0) * (w1 - w0);
}

/* Output columns ow in [*lo, *hi) whose tap at offset `off` (iw = ow * s + off)
 * lies inside [0, n). */
static inline void cnet_tap_columns(Py_ssize_t off, Py_ssize_t s, Py_ssize_t n, Py_ssize_t out,
                                    Py_ssize_t *lo, Py_ssize_t *hi)
{
    Py_ssize_t a = off >= 0 ? 0 : (-off + s - 1) / s;
    Py_ssize_t b = n - 1 - off < 0 ? 0 : (n - 1 - off) / s + 1;
    *lo = a;
    *hi = b < out ? b : out;
}

/* The 2x2 / stride 2 window without padding or dilation (see cnet_max_row_2x2_), for
 * one channel or at least a vector's worth.  Between, GCC's code for the window
 * loops ran 3-10x slower than the tap-major body.  One thread, 64x28x28xC, min ms
 * fwd / bwd, tap-major -> by windows: C=1 0.089 / 0.062 -> 0.028 / 0.054, C=16
 * 0.245 / 0.162 -> 0.115 / 0.141, C=32 0.36 / 0.30 -> 0.17 / 0.18, C=64 0.87 / 0.64
 * -> 0.58-0.75 / 0.43-0.48; C=6 0.14 / 0.11 -> 0.92 / 0.77 (hence not there).  The
 * forward of 2..15 channels takes cnet_max_row_pairs_ instead, the backward the
 * tap-major body (a pairs backward, expanding each window to its two pixels, won
 * at C = 3 and 12 but lost at 6 and 8: 0.40 -> 0.49-0.64 ms, 256x28x28x6). */
static inline int cnet_pool_is_2x2(Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                                   Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                                   Py_ssize_t C)
{
    return kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 && dh == 1
        && dw == 1 && (C == 1 || C >= 16);
}

/* Small channel counts (LeNet's 6): with C a compile-time constant the channel
 * loops unroll completely, instead of paying a vector loop's set-up and scalar
 * tail for a handful of values per window (max pool at C = 6: 2-3x faster).
 * CALL(c) invokes an always-inline body, so each case is its own copy (larger C
 * runs the same code as before: 64 channels measured the same). */
#define CNET_SMALL_C_SWITCH(C, CALL) switch (C) {                                         \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break;               \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break;               \
    case 7: CALL(7); break; case 8: CALL(8); break; default: CALL(C); }
#define CNET_INLINE static inline __attribute__((always_inline))
#endif


/* Max pooling, output row (n, oh): x points at image n, y and idx (or NULL) at
 * the row.  Tap-major order: the row's OW * C accumulators (a few KB, in L1)
 * start at -inf, then each of the kh * kw taps sweeps all windows with a
 * unit-stride channel loop.  Sweeping taps rather than windows keeps the
 * loops long and free of per-window bookkeeping, which dominates when C is as
 * small as 16.  PyTorch's rule: take `v > m || isnan(v)` in window order, so
 * NaNs propagate and ties keep the first position; idx starts at the first
 * valid position (ih * W + iw), as torch's does, and is -1 for a window with
 * no tap inside the input. */
CNET_INLINE void CNET_FN(cnet_max_row_body_)(
    const T *x, T *y, int *idx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
    Py_ssize_t oh, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
    Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)
{
    const Py_ssize_t h0 = oh * sh - ph;
    Py_ssize_t i0 = 0, i1 = 0, lo, hi;
    cnet_tap_columns(h0, dh, H, kh, &i0, &i1);  /* taps i with 0 <= h0 + i * dh < H */
    for (Py_ssize_t k = 0; k < OW * C; k++) y[k] = -(T)INFINITY;
    if (idx) {
        for (Py_ssize_t ow = 0; ow < OW; ow++) {
            Py_ssize_t j0, j1, w0 = ow * sw - pw;
            cnet_tap_columns(w0, dw, W, kw, &j0, &j1);
            const int pos0 = (i0 < i1 && j0 < j1) ? (int)((h0 + i0 * dh) * W + w0 + j0 * dw) : -1;
            int *ip = idx + ow * C;
            for (Py_ssize_t c = 0; c < C; c++) ip[c] = pos0;
        }
    }
    for (Py_ssize_t i = i0; i < i1; i++) {
        const Py_ssize_t ih = h0 + i * dh;
        for (Py_ssize_t j = 0; j < kw; j++) {
            const Py_ssize_t off = j * dw - pw;
            cnet_tap_columns(off, sw, W, OW, &lo, &hi);
            for (Py_ssize_t ow = lo; ow < hi; ow++) {
                const Py_ssize_t iw = ow * sw + off;
                const T *xp = x + (ih * W + iw) * C;
                T *yp = y + ow * C;
                if (idx) {
                    int *ip = idx + ow * C;
                    const int pos = (int)(ih * W + iw);
CNET_SIMD
                    for (Py_ssize_t c = 0; c < C; c++) {
                        const T v = xp[c], m = yp[c];
                        const int im = ip[c];
                        const int take = (v > m) | (v != v);
                        yp[c] = take ? v : m;
                        ip[c] = take ? pos : im;
                    }
                } else {
CNET_SIMD
                    for (Py_ssize_t c = 0; c < C; c++) {
                        const T v = xp[c], m = yp[c];
                        yp[c] = ((v > m) | (v != v)) ? v : m;
                    }
                }
            }
        }
    }
}

/* The common 2x2 / stride 2 window without padding (LeNet's, VGG's), every window
 * inside the input: window by window, its four taps loaded once and compared in
 * window order, one store of y and idx (the tap-major loop reads and writes them
 * once per tap).  The same rule and positions as the general body. */
CNET_INLINE void CNET_FN(cnet_max_row_2x2_)(
    const T *x, T *y, int *idx, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW, Py_ssize_t oh)
{
    const T *x0 = x + 2 * oh * W * C, *x1 = x0 + W * C;
    for (Py_ssize_t ow = 0; ow < OW; ow++) {
        const T *a = x0 + 2 * ow * C, *b = a + C, *c0 = x1 + 2 * ow * C, *d = c0 + C;
        const int pos = (int)(2 * oh * W + 2 * ow);
        T *yp = y + ow * C;
        int *ip = idx ? idx + ow * C : NULL;
        for (Py_ssize_t c = 0; c < C; c++) {
            T m = a[c];
            int im = pos;
            T v = b[c];
            int take = (v > m) | (v != v);
            m = take ? v : m;
            im = take ? pos + 1 : im;
            v = c0[c];
            take = (v > m) | (v != v);
            m = take ? v : m;
            im = take ? pos + (int)W : im;
            v = d[c];
            take = (v > m) | (v != v);
            m = take ? v : m;
            im = take ? pos + (int)W + 1 : im;
            yp[c] = m;
            if (ip) ip[c] = im;
        }
    }
}

/* The 2x2 / stride 2 window without padding for 2..15 channels, where the window
 * loops compile badly (see cnet_pool_is_2x2): flat over the two input rows, so
 * every loop runs over contiguous values and vectorises.  Each window's rule
 * (take v if v > m or v is NaN, in the order a b / c d) is folded as fold(a, b),
 * fold(c, d), then the bottom pair taken if it wins the same test: the same value
 * and position in every case (no NaN: the first maximum in window order; else
 * the last NaN in it).  The pair folds run at every pixel of the row, against the
 * pixel to its right (the odd pixels' are not needed: 2x the comparisons, but 16
 * lanes instead of scalar selects), in blocks of CNET_POOL_PAIR_WINDOWS windows
 * whose results (in L1) are then compacted to the even pixels.  The selects are
 * bit masks (cnet_pick): as ternaries GCC left the loop scalar with branches (25x
 * slower).  256x28x28xC with argmax, one thread, min ms, tap-major -> pairs: C=6
 * 0.93 -> 0.37, C=3 2.60 -> 0.49, C=12 2.09 -> 0.43 (two threads: 0.28 -> 0.18). */
#ifndef CNET_POOL_PAIR_WINDOWS
#define CNET_POOL_PAIR_WINDOWS 32
#endif
CNET_INLINE void CNET_FN(cnet_max_row_pairs_)(
    const T *x, T *y, int *idx, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW, Py_ssize_t oh)
{
    enum { BW = CNET_POOL_PAIR_WINDOWS };
    T r[2 * BW * 15];
    int ri[2 * BW * 15];
    const T *x0 = x + 2 * oh * W * C, *x1 = x0 + W * C;
    const int row_pos = (int)(2 * oh * W);
    for (Py_ssize_t w0 = 0; w0 < OW; w0 += BW) {
        const Py_ssize_t nw = OW - w0 < BW ? OW - w0 : BW;
        const Py_ssize_t len = (2 * nw - 1) * C;   /* through the last window's left pixel */
        const T *a0 = x0 + 2 * w0 * C, *a1 = x1 + 2 * w0 * C;
CNET_SIMD
        for (Py_ssize_t k = 0; k < len; k++) {
            const T a = a0[k], b = a0[k + C], c = a1[k], d = a1[k + C];
            int take = (b > a) | (b != b);
            const T top = cnet_pick(take, b, a);
            const int itop = take;
            take = (d > c) | (d != d);
            const T bottom = cnet_pick(take, d, c);
            const int ibottom = (int)W + take;
            take = (bottom > top) | (bottom != bottom);
            r[k] = cnet_pick(take, bottom, top);
            ri[k] = itop ^ ((ibottom ^ itop) & -take);
        }
        for (Py_ssize_t j = 0; j < nw; j++) {
            const T *rj = r + 2 * j * C;
            T *yj = y + (w0 + j) * C;
            for (Py_ssize_t ch = 0; ch < C; ch++) yj[ch] = rj[ch];
            if (idx) {
                const int *rij = ri + 2 * j * C;
                int *ij = idx + (w0 + j) * C;
                const int pos = row_pos + (int)(2 * (w0 + j));
                for (Py_ssize_t ch = 0; ch < C; ch++) ij[ch] = pos + rij[ch];
            }
        }
    }
}

CNET_CLONES static void CNET_FN(cnet_max_row_)(
    const T *x, T *y, int *idx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
    Py_ssize_t oh, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
    Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)
{
    if (cnet_pool_is_2x2(kh, kw, sh, sw, ph, pw, dh, dw, C) && 2 * oh + 1 < H && 2 * OW <= W) {
#define CNET_CALL_(c) CNET_FN(cnet_max_row_2x2_)(x, y, idx, W, c, OW, oh)
        CNET_SMALL_C_SWITCH(C, CNET_CALL_)
#undef CNET_CALL_
        return;
    }
    if (cnet_pool_is_2x2(kh, kw, sh, sw, ph, pw, dh, dw, 16) && C < 16 && 2 * oh + 1 < H
        && 2 * OW <= W) {
#define CNET_CALL_(c) CNET_FN(cnet_max_row_pairs_)(x, y, idx, W, c, OW, oh)
        CNET_SMALL_C_SWITCH(C, CNET_CALL_)
#undef CNET_CALL_
        return;
    }
#define CNET_CALL_(c) CNET_FN(cnet_max_row_body_)(x, y, idx, H, W, c, OW, oh, kh, kw, sh, \
                                                  sw, ph, pw, dh, dw)
    CNET_SMALL_C_SWITCH(C, CNET_CALL_)
#undef CNET_CALL_
}

/* Max pooling backward as a gather, input row (n, ih): g and idx point at image
 * n, gx at the row.  For each output row oh whose window has a tap on ih, each
 * column tap j sweeps the windows and adds g where the recorded argmax is the
 * tapped position.  Each input element is written by one thread only (no races,
 * no atomics); it sums its windows in a fixed order (oh, then j, then ow). */
CNET_INLINE void CNET_FN(cnet_max_bwd_row_body_)(
    const T *g, const int *idx, T *gx, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
    Py_ssize_t OW, Py_ssize_t ih, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)
{
    const Py_ssize_t oh0 = cnet_lo_window(ih, ph, (kh - 1) * dh + 1, sh);
    const Py_ssize_t oh1 = cnet_hi_window(ih, ph, sh, OH);
    Py_ssize_t lo, hi;
    for (Py_ssize_t k = 0; k < W * C; k++) gx[k] = (T)0;
    for (Py_ssize_t oh = oh0; oh <= oh1; oh++) {
        if ((ih + ph - oh * sh) % dh) continue;  /* a dilated window skips this row */
        const T *grow = g + oh * OW * C;
        const int *irow = idx + oh * OW * C;
        for (Py_ssize_t j = 0; j < kw; j++) {
            const Py_ssize_t off = j * dw - pw;
            cnet_tap_columns(off, sw, W, OW, &lo, &hi);
            for (Py_ssize_t ow = lo; ow < hi; ow++) {
                const Py_ssize_t iw = ow * sw + off;
                const int pos = (int)(ih * W + iw);
                const T *go = grow + ow * C;
                const int *io = irow + ow * C;
                T *gp = gx + iw * C;
CNET_SIMD
                for (Py_ssize_t c = 0; c < C; c++) {
                    const T v = go[c];
                    gp[c] += io[c] == pos ? v : (T)0;
                }
            }
        }
    }
}

/* Backward of the 2x2 / stride 2 window without padding, input row ih inside a
 * window row: each input element is one window's tap, so one pass writes it (g
 * where the argmax is its position, else 0); columns past the last window get 0. */
CNET_INLINE void CNET_FN(cnet_max_bwd_row_2x2_)(
    const T *g, const int *idx, T *gx, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
    Py_ssize_t ih)
{
    const T *grow = g + (ih / 2) * OW * C;
    const int *irow = idx + (ih / 2) * OW * C;
    for (Py_ssize_t iw = 0; iw < 2 * OW; iw++) {
        const int pos = (int)(ih * W + iw);
        const T *go = grow + (iw / 2) * C;
        const int *io = irow + (iw / 2) * C;
        T *gp = gx + iw * C;
        for (Py_ssize_t c = 0; c < C; c++) {
            const T v = go[c];
            gp[c] = io[c] == pos ? v : (T)0;
        }
    }
    for (Py_ssize_t k = 2 * OW * C; k < W * C; k++) gx[k] = (T)0;
}

CNET_CLONES static void CNET_FN(cnet_max_bwd_row_)(
    const T *g, const int *idx, T *gx, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
    Py_ssize_t OW, Py_ssize_t ih, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw)
{
    if (cnet_pool_is_2x2(kh, kw, sh, sw, ph, pw, dh, dw, C) && ih < 2 * OH && 2 * OW <= W) {
#define CNET_CALL_(c) CNET_FN(cnet_max_bwd_row_2x2_)(g, idx, gx, W, c, OW, ih)
        CNET_SMALL_C_SWITCH(C, CNET_CALL_)
#undef CNET_CALL_
        return;
    }
#define CNET_CALL_(c) CNET_FN(cnet_max_bwd_row_body_)(g, idx, gx, W, c, OH, OW, ih, kh, kw, \
                                                      sh, sw, ph, pw, dh, dw)
    CNET_SMALL_C_SWITCH(C, CNET_CALL_)
#undef CNET_CALL_
}

/* Average pooling, output row (n, oh), tap-major as max pooling: zero the row,
 * add each tap (window order, so each window sums in the same order as a
 * window-by-window loop), then divide by PyTorch's divisor. */
CNET_CLONES static void CNET_FN(cnet_avg_row_)(
    const T *x, T *y, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
    Py_ssize_t oh, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
    Py_ssize_t ph, Py_ssize_t pw, int count_include_pad, Py_ssize_t divisor_override)
{
    const Py_ssize_t h0 = oh * sh - ph;
    Py_ssize_t i0, i1, lo, hi;
    cnet_tap_columns(h0, 1, H, kh, &i0, &i1);
    for (Py_ssize_t k = 0; k < OW * C; k++) y[k] = (T)0;
    for (Py_ssize_t i = i0; i < i1; i++) {
        const T *xrow = x + (h0 + i) * W * C;
        for (Py_ssize_t j = 0; j < kw; j++) {
            const Py_ssize_t off = j - pw;
            cnet_tap_columns(off, sw, W, OW, &lo, &hi);
            for (Py_ssize_t ow = lo; ow < hi; ow++) {
                const T *xp = xrow + (ow * sw + off) * C;
                T *yp = y + ow * C;
CNET_SIMD
                for (Py_ssize_t c = 0; c < C; c++) yp[c] += xp[c];
            }
        }
    }
    for (Py_ssize_t ow = 0; ow < OW; ow++) {
        const Py_ssize_t div = cnet_avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw,
                                                count_include_pad, divisor_override);
        if (div == 0) continue;  /* an empty window stays 0, as torch's */
        const T d = (T)div;  /* divide, as torch does (not a multiply by 1/d) */
        T *yp = y + ow * C;
CNET_SIMD
        for (Py_ssize_t c = 0; c < C; c++) yp[c] = yp[c] / d;
    }
}

/* Average pooling backward as a gather, input row (n, ih): each input element
 * sums g / divisor over the windows that cover it (fixed order: oh, then tap j). */
CNET_CLONES static void CNET_FN(cnet_avg_bwd_row_)(
    const T *g, T *gx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
    Py_ssize_t OW, Py_ssize_t ih, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, int count_include_pad,
    Py_ssize_t divisor_override)
{
    const Py_ssize_t oh0 = cnet_lo_window(ih, ph, kh, sh);
    const Py_ssize_t oh1 = cnet_hi_window(ih, ph, sh, OH);
    Py_ssize_t lo, hi;
    for (Py_ssize_t k = 0; k < W * C; k++) gx[k] = (T)0;
    for (Py_ssize_t oh = oh0; oh <= oh1; oh++) {
        const T *grow = g + oh * OW * C;
        for (Py_ssize_t j = 0; j < kw; j++) {
            const Py_ssize_t off = j - pw;
            cnet_tap_columns(off, sw, W, OW, &lo, &hi);
            for (Py_ssize_t ow = lo; ow < hi; ow++) {
                const Py_ssize_t div = cnet_avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw,
                                                        count_include_pad, divisor_override);
                if (div == 0) continue;
                const T d = (T)div;
                const T *go = grow + ow * C;
                T *gp = gx + (ow * sw + off) * C;
CNET_SIMD
                for (Py_ssize_t c = 0; c < C; c++) gp[c] += go[c] / d;
            }
        }
    }
}

/* Global average pooling of one image: y[c] = sum_p x[p, c] / HW. */
CNET_CLONES static void CNET_FN(cnet_gap_image_)(const T *x, T *y, Py_ssize_t HW, Py_ssize_t C)
{
CNET_SIMD
    for (Py_ssize_t c = 0; c < C; c++) y[c] = (T)0;
    for (Py_ssize_t p = 0; p < HW; p++) {
        const T *xp = x + p * C;
CNET_SIMD
        for (Py_ssize_t c = 0; c < C; c++) y[c] += xp[c];
    }
    const T d = (T)HW;
CNET_SIMD
    for (Py_ssize_t c = 0; c < C; c++) y[c] = y[c] / d;
}

/* Global average pooling backward for rows [r0, r1) of the (N*HW, C) input
 * gradient: gx[r, c] = g[r / HW, c] / HW. */
CNET_CLONES static void CNET_FN(cnet_gap_bwd_rows_)(const T *g, T *gx, Py_ssize_t r0,
                                            Py_ssize_t r1, Py_ssize_t HW, Py_ssize_t C)
{
    const T d = (T)HW;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const T *go = g + (r / HW) * C;
        T *gp = gx + r * C;
CNET_SIMD
        for (Py_ssize_t c = 0; c < C; c++) gp[c] = go[c] / d;
    }
}

