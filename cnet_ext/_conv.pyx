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
from cython.parallel cimport prange
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free

cimport cython
from cython cimport floating

from cnet_ext._openmp cimport effective_threads


# ---------------------------------------------------------------------------
# im2col

cdef inline void _im2col_row(const floating* x, floating* dst, Py_ssize_t n, Py_ssize_t oh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OW,
                             Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw,
                             Py_ssize_t G) noexcept nogil:
    """Column rows of the OW output pixels of output row (n, oh)."""
    cdef Py_ssize_t Cg = C // G
    cdef Py_ssize_t ow, g, kh, kw, ih, iw, iw0, c
    cdef const floating* src
    cdef const floating* img = x + n * H * W * C
    cdef size_t run = KW * Cg * sizeof(floating)
    for ow in range(OW):
        iw0 = ow * sw - pw
        for g in range(G):
            for kh in range(KH):
                ih = oh * sh - ph + kh * dh
                # One unsigned compare tests 0 <= ih < H (caffe's trick).
                if <size_t>ih >= <size_t>H:
                    memset(dst, 0, run)
                    dst += KW * Cg
                    continue
                if G == 1 and dw == 1 and iw0 >= 0 and iw0 + KW <= W:
                    # The whole kernel row is one contiguous run of KW*C inputs.
                    memcpy(dst, img + (ih * W + iw0) * C, run)
                    dst += KW * Cg
                    continue
                for kw in range(KW):
                    iw = iw0 + kw * dw
                    if <size_t>iw < <size_t>W:
                        src = img + (ih * W + iw) * C + g * Cg
                        for c in range(Cg):
                            dst[c] = src[c]
                    else:
                        for c in range(Cg):
                            dst[c] = 0
                    dst += Cg


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
        for kw in range(KW):
            for ow in range(OW):
                iw = ow * sw - pw + kw * dw
                if <size_t>iw >= <size_t>W:
                    continue
                src = pix + ow * row_len + (kh * KW + kw) * Cg
                o = out + iw * C
                if G == 1:
                    for c in range(C):
                        o[c] += src[c]
                else:
                    for g in range(G):
                        for c in range(Cg):
                            o[g * Cg + c] += src[g * K + c]


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
# bias gradient: db += dy.sum(axis=0)

# A fixed number of row blocks, independent of the thread count, each summed
# in double and combined in block order: the same bits with 1 or 2 threads.
cdef enum:
    _BIAS_BLOCKS = 16


cdef void _bias_block(const floating* dy, double* acc, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef const floating* row
    for c in range(C):
        acc[c] = 0
    for r in range(r0, r1):
        row = dy + r * C
        for c in range(C):
            acc[c] += row[c]


def bias_grad(floating[:, ::1] dy, floating[::1] db, int n_threads):
    """``db += dy.sum(axis=0)`` for dy of shape (M, C), deterministic in the thread count."""
    cdef Py_ssize_t M = dy.shape[0], C = dy.shape[1]
    cdef Py_ssize_t b, c, nb
    cdef double s
    cdef double* acc
    cdef int nt
    if db.shape[0] != C:
        raise ValueError(f"bias_grad: gradient of shape {(M, C)} does not match "
                         f"bias of shape ({db.shape[0]},)")
    if M == 0 or C == 0:
        return
    nb = min(<Py_ssize_t>_BIAS_BLOCKS, M)
    # Rows of 8 extra doubles keep two blocks' accumulators off one cache line.
    acc = <double*>malloc(nb * (C + 8) * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    nt = effective_threads(M * C, n_threads)
    with nogil:
        if nt == 1:
            for b in range(nb):
                _bias_block(&dy[0, 0], acc + b * (C + 8), b * M // nb, (b + 1) * M // nb, C)
        else:
            for b in prange(nb, num_threads=nt, schedule="static"):
                _bias_block(&dy[0, 0], acc + b * (C + 8), b * M // nb, (b + 1) * M // nb, C)
        for c in range(C):
            s = 0
            for b in range(nb):
                s = s + acc[b * (C + 8) + c]
            db[c] += <floating>s
    free(acc)
