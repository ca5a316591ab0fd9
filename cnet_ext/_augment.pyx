"""Batch image augmentation for NHWC batches: crop/pad, flip, normalise, in one pass.

One kernel covers every geometric and photometric transform cnet.data offers,
because they compose into a single read of the input and a single write of the
output (the batch is touched once instead of once per transform):

    out[n, i, j, c] = a[c] * in[n, i + oy_n - pad_top, jj + ox_n - pad_left, c] + b[c]
    jj = OW - 1 - j if flip_n else j

where a source pixel outside the image reads as ``fill`` (zero padding).
``a = scale / std`` and ``b = -mean / std`` fold ToTensor's 1/255 and
Normalize's (x - mean) / std into one multiply-add (``affine=False`` copies and
converts without it).  ``oy_n`` is drawn uniformly from [0, range_y], ``ox_n``
from [0, range_x], and ``flip_n`` with probability ``flip_p``, from a
counter-based generator keyed by (seed, image index): the result depends on the
seed alone, never on the thread count or on how images are split across threads.

The generator is SplitMix64's output function applied to
``seed + 0x9E3779B97F4A7C15 * (4 * n + k + 1)`` for draw k of image n (k = 0: oy,
1: ox, 2: flip); an integer in [0, m) is ``((r >> 32) * m) >> 32`` and a uniform
double is ``(r >> 11) * 2**-53``.  ``crop_flip_params`` returns the same draws so
that tests and callers can reproduce them.
"""
import numpy as np

from libc.stdint cimport uint8_t, uint64_t
from cython.parallel cimport prange

from cnet_ext._openmp cimport effective_threads

ctypedef fused src_t:
    uint8_t
    float
    double

ctypedef fused dst_t:
    uint8_t
    float
    double


cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * <uint64_t>0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline uint64_t _draw(uint64_t seed, uint64_t n, uint64_t k) noexcept nogil:
    return _mix64(seed + <uint64_t>0x9E3779B97F4A7C15ULL * (4 * n + k + 1))


cdef inline Py_ssize_t _below(uint64_t r, Py_ssize_t m) noexcept nogil:
    """An integer in [0, m) from the high 32 bits of r (m < 2**32)."""
    return <Py_ssize_t>(((r >> 32) * <uint64_t>m) >> 32)


cdef inline bint _coin(uint64_t r, double p) noexcept nogil:
    return <double>(r >> 11) * (1.0 / 9007199254740992.0) < p


cdef inline void _fill_pixels(dst_t* d, Py_ssize_t npix, Py_ssize_t C,
                              const double* fill) noexcept nogil:
    cdef Py_ssize_t j, c
    for j in range(npix):
        for c in range(C):
            d[j * C + c] = <dst_t>fill[c]


cdef inline void _copy_pixels(const src_t* s, dst_t* d, Py_ssize_t npix, Py_ssize_t C,
                              bint affine, const double* a, const double* b) noexcept nogil:
    """npix consecutive source pixels to consecutive output pixels.  One channel
    (MNIST) is one flat loop the compiler vectorises, three (CIFAR) an unrolled one;
    the per-element arithmetic is the same double multiply-add in every branch, so
    results do not depend on C."""
    cdef Py_ssize_t k, j, c, n = npix * C
    cdef double a0, b0, a1, b1, a2, b2
    if C == 1:
        if affine:
            a0 = a[0]
            b0 = b[0]
            for k in range(n):
                d[k] = <dst_t>(<double>s[k] * a0 + b0)
        else:
            for k in range(n):
                d[k] = <dst_t>s[k]
    elif C == 3 and affine:
        a0, a1, a2, b0, b1, b2 = a[0], a[1], a[2], b[0], b[1], b[2]
        for j in range(npix):
            d[3 * j] = <dst_t>(<double>s[3 * j] * a0 + b0)
            d[3 * j + 1] = <dst_t>(<double>s[3 * j + 1] * a1 + b1)
            d[3 * j + 2] = <dst_t>(<double>s[3 * j + 2] * a2 + b2)
    else:
        for k in range(n):
            c = k % C
            d[k] = <dst_t>(<double>s[k] * a[c] + b[c]) if affine else <dst_t>s[k]


cdef inline void _copy_pixels_reversed(const src_t* s, dst_t* d, Py_ssize_t npix,
                                       Py_ssize_t C, bint affine, const double* a,
                                       const double* b) noexcept nogil:
    """Output pixel j reads source pixel -j (s points at the first one read)."""
    cdef Py_ssize_t j, c
    cdef double a0, a1, a2, b0, b1, b2
    if C == 3 and affine:
        a0, a1, a2, b0, b1, b2 = a[0], a[1], a[2], b[0], b[1], b[2]
        for j in range(npix):
            d[3 * j] = <dst_t>(<double>s[-3 * j] * a0 + b0)
            d[3 * j + 1] = <dst_t>(<double>s[1 - 3 * j] * a1 + b1)
            d[3 * j + 2] = <dst_t>(<double>s[2 - 3 * j] * a2 + b2)
        return
    for j in range(npix):
        for c in range(C):
            d[j * C + c] = (<dst_t>(<double>s[c - j * C] * a[c] + b[c]) if affine
                            else <dst_t>s[c - j * C])


cdef inline Py_ssize_t _clamp(Py_ssize_t v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    return lo if v < lo else (hi if v > hi else v)


cdef void _one_image(const src_t* src, dst_t* dst, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t y0,
                     Py_ssize_t x0, bint flip, bint affine, const double* a,
                     const double* b, const double* fill) noexcept nogil:
    """Write one (OH, OW, C) output image whose pixel (i, j) reads source (i+y0, x+x0).

    Row by row as three runs: fill, the source pixels inside the image (a
    contiguous run, reversed when flipped), fill; no per-pixel bounds tests."""
    cdef Py_ssize_t i, y, jlo, jhi
    cdef dst_t* d
    for i in range(OH):
        y = i + y0
        d = dst + i * OW * C
        if y < 0 or y >= H:
            _fill_pixels(d, OW, C, fill)
            continue
        if flip:    # output j reads x = OW - 1 - j + x0, inside for j in [jlo, jhi)
            jlo = _clamp(OW + x0 - W, 0, OW)
            jhi = _clamp(OW + x0, jlo, OW)
        else:       # output j reads x = j + x0
            jlo = _clamp(-x0, 0, OW)
            jhi = _clamp(W - x0, jlo, OW)
        _fill_pixels(d, jlo, C, fill)
        if flip:
            _copy_pixels_reversed(src + (y * W + OW - 1 - jlo + x0) * C, d + jlo * C,
                                  jhi - jlo, C, affine, a, b)
        else:
            _copy_pixels(src + (y * W + jlo + x0) * C, d + jlo * C, jhi - jlo, C, affine,
                         a, b)
        _fill_pixels(d + jhi * C, OW - jhi, C, fill)


def _augment_impl(const src_t[:, :, :, ::1] src, dst_t[:, :, :, ::1] dst,
                  Py_ssize_t pad_top, Py_ssize_t pad_left, Py_ssize_t range_y,
                  Py_ssize_t range_x, double flip_p, uint64_t seed, bint affine,
                  const double[::1] a, const double[::1] b, const double[::1] fill,
                  int n_threads):
    cdef Py_ssize_t N = src.shape[0], H = src.shape[1], W = src.shape[2]
    cdef Py_ssize_t C = src.shape[3], OH = dst.shape[1], OW = dst.shape[2]
    cdef Py_ssize_t n, oy, ox
    cdef bint flip
    cdef int nt = effective_threads(N * OH * OW * C, n_threads)
    if N == 0:
        return
    for n in prange(N, nogil=True, schedule="static", num_threads=nt):
        oy = _below(_draw(seed, n, 0), range_y + 1) if range_y > 0 else 0
        ox = _below(_draw(seed, n, 1), range_x + 1) if range_x > 0 else 0
        flip = _coin(_draw(seed, n, 2), flip_p) if flip_p > 0.0 else 0
        _one_image(&src[n, 0, 0, 0], &dst[n, 0, 0, 0], H, W, C, OH, OW,
                   oy - pad_top, ox - pad_left, flip, affine, &a[0], &b[0], &fill[0])


_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))


def augment(src, dst, Py_ssize_t pad_top=0, Py_ssize_t pad_left=0,
            Py_ssize_t range_y=0, Py_ssize_t range_x=0, double flip_p=0.0,
            seed=0, scale=None, mean=None, std=None, fill=0.0, int n_threads=1):
    """Crop/pad + horizontal flip + per-channel affine of an NHWC batch, into ``dst``.

    ``src``: (N, H, W, C) C-contiguous uint8/float32/float64.  ``dst``: (N, OH, OW,
    C) C-contiguous uint8/float32/float64, written completely.  Output pixel
    (i, j) of image n reads source (i + oy_n - pad_top, jj + ox_n - pad_left), jj
    = OW-1-j when flipped, outside the image the raw value ``fill``.  When any of
    ``scale``/``mean``/``std`` is given the value becomes ``(v * scale - mean[c])
    / std[c]`` (scale defaults to 1, mean to 0, std to 1); otherwise it is copied
    with a cast (uint8 output then needs uint8 input).  See the module docstring
    for the random draws.  Returns ``dst``.
    """
    if not isinstance(src, np.ndarray) or not isinstance(dst, np.ndarray):
        raise TypeError("augment: src and dst must be numpy arrays")
    if src.ndim != 4 or dst.ndim != 4:
        raise ValueError(f"augment: src and dst must be NHWC (4-d), got shapes "
                         f"{src.shape} and {dst.shape}")
    if src.dtype not in _DTYPES or dst.dtype not in _DTYPES:
        raise ValueError(f"augment: dtypes must be uint8, float32 or float64, got "
                         f"{src.dtype} -> {dst.dtype}")
    if not src.flags.c_contiguous or not dst.flags.c_contiguous or not dst.flags.writeable:
        raise ValueError(f"augment: src must be C-contiguous and dst C-contiguous and "
                         f"writeable (shapes {src.shape} -> {dst.shape})")
    if dst.shape[0] != src.shape[0] or dst.shape[3] != src.shape[3]:
        raise ValueError(f"augment: dst {dst.shape} must have the batch size and channels "
                         f"of src {src.shape}")
    if min(pad_top, pad_left, range_y, range_x) < 0:
        raise ValueError(f"augment: paddings and ranges must be >= 0, got pad "
                         f"({pad_top}, {pad_left}) range ({range_y}, {range_x})")
    if max(range_y, range_x) >= 2**32:
        raise ValueError("augment: crop range too large")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"augment: flip_p must be in [0, 1], got {flip_p}")
    cdef Py_ssize_t C = src.shape[3]
    affine = scale is not None or mean is not None or std is not None
    if affine:
        if dst.dtype == np.uint8:
            raise ValueError("augment: normalisation needs a float32/float64 dst")
        m = np.broadcast_to(np.asarray(0.0 if mean is None else mean, np.float64), (C,))
        sd = np.broadcast_to(np.asarray(1.0 if std is None else std, np.float64), (C,))
        if np.any(sd == 0):
            raise ValueError(f"augment: std must be non-zero, got {std}")
        a = np.ascontiguousarray(np.float64(1.0 if scale is None else scale) / sd)
        b = np.ascontiguousarray(-m / sd)
    else:
        if dst.dtype == np.uint8 and src.dtype != np.uint8:
            raise ValueError(f"augment: a uint8 dst needs a uint8 src, got {src.dtype}")
        a = np.ones(C)
        b = np.zeros(C)
    f = np.broadcast_to(np.asarray(fill, np.float64), (C,))
    f = np.ascontiguousarray(f * a + b if affine else f)
    seed_u = int(seed) & 0xFFFFFFFFFFFFFFFF
    _augment_impl(src, dst, pad_top, pad_left, range_y, range_x, flip_p, seed_u,
                  affine, a, b, f, n_threads)
    return dst


def crop_flip_params(seed, Py_ssize_t n, Py_ssize_t range_y=0, Py_ssize_t range_x=0,
                     double flip_p=0.0):
    """The (oy, ox, flip) that ``augment`` draws for images 0..n-1 with this seed."""
    cdef uint64_t s = int(seed) & 0xFFFFFFFFFFFFFFFF
    oy = np.zeros(n, np.intp)
    ox = np.zeros(n, np.intp)
    flip = np.zeros(n, np.bool_)
    cdef Py_ssize_t i
    for i in range(n):
        if range_y > 0:
            oy[i] = _below(_draw(s, i, 0), range_y + 1)
        if range_x > 0:
            ox[i] = _below(_draw(s, i, 1), range_x + 1)
        if flip_p > 0.0:
            flip[i] = _coin(_draw(s, i, 2), flip_p)
    return oy, ox, flip
