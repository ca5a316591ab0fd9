"""Augmentation kernel (cnet_ext._augment) and cnet.data.transforms against numpy."""
import numpy as np
import pytest

import cnet
from cnet.data import transforms as T
from cnet_ext import _augment

M64 = (1 << 64) - 1


# ---------------------------------------------------------------- references

def splitmix_draw(seed, n, k):
    """Independent transcription of the kernel's counter-based generator."""
    z = (seed + 0x9E3779B97F4A7C15 * (4 * n + k + 1)) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_params(seed, n, range_y, range_x, p):
    oy = [((splitmix_draw(seed, i, 0) >> 32) * (range_y + 1)) >> 32 if range_y else 0
          for i in range(n)]
    ox = [((splitmix_draw(seed, i, 1) >> 32) * (range_x + 1)) >> 32 if range_x else 0
          for i in range(n)]
    fl = [(splitmix_draw(seed, i, 2) >> 11) / 2.0**53 < p if p > 0 else False
          for i in range(n)]
    return np.array(oy), np.array(ox), np.array(fl)


def ref_augment(x, out_hw, pad, oy, ox, flip, fill=0):
    """numpy: pad with `fill`, crop at (oy, ox), then mirror the crop."""
    (oh, ow), (py, px) = out_hw, pad
    padded = np.pad(x, ((0, 0), (py, py), (px, px), (0, 0)), constant_values=fill)
    out = np.empty((x.shape[0], oh, ow, x.shape[3]), x.dtype)
    for n in range(x.shape[0]):
        crop = padded[n, oy[n]:oy[n] + oh, ox[n]:ox[n] + ow]
        out[n] = crop[:, ::-1] if flip[n] else crop
    return out


def ref_normalize(x, mean, std, scale):
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (x.astype(np.float64) * scale - mean) / std


@pytest.fixture
def batch(rng):
    return rng.integers(0, 256, size=(16, 12, 10, 3), dtype=np.uint8)


# ------------------------------------------------------------------- kernel

def test_params_match_python_transcription():
    for seed in (0, 1, 2**62 + 12345, 2**63 - 1):
        got = _augment.crop_flip_params(seed, 50, 8, 3, 0.3)
        want = ref_params(seed, 50, 8, 3, 0.3)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("pad,out_hw", [((4, 4), (12, 10)), ((2, 1), (9, 11)), ((0, 0), (5, 7))])
def test_crop_flip_uint8_exact(batch, pad, out_hw):
    n, h, w, c = batch.shape
    ry, rx = h + 2 * pad[0] - out_hw[0], w + 2 * pad[1] - out_hw[1]
    out = np.empty((n,) + out_hw + (c,), np.uint8)
    _augment.augment(batch, out, pad[0], pad[1], ry, rx, 0.5, seed=77)
    oy, ox, fl = ref_params(77, n, ry, rx, 0.5)
    np.testing.assert_array_equal(out, ref_augment(batch, out_hw, pad, oy, ox, fl))
    assert fl.any() and not fl.all()


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("pad,out_hw", [((3, 5), (8, 14)), ((0, 0), (6, 9)), ((1, 0), (7, 3)),
                                        ((0, 1), (4, 12))])
def test_rows_of_every_channel_count(rng, channels, pad, out_hw):
    # The kernel copies a row as fill / source run / fill, with its own loops for one
    # and three channels: crops wider than the source (fill on both sides), flips,
    # uint8 and normalised output, against a pixel-by-pixel reference.
    x = rng.integers(0, 256, size=(24, 6, 9, channels), dtype=np.uint8)
    n = x.shape[0]
    ry = max(x.shape[1] + 2 * pad[0] - out_hw[0], 0)
    rx = max(x.shape[2] + 2 * pad[1] - out_hw[1], 0)
    oy, ox, fl = ref_params(5, n, ry, rx, 0.5)
    out = np.empty((n,) + out_hw + (channels,), np.uint8)
    _augment.augment(x, out, pad[0], pad[1], ry, rx, 0.5, seed=5, fill=9)
    want = _ref_with_fill(x, out_hw, pad, oy, ox, fl, 9)
    np.testing.assert_array_equal(out, want)
    mean, std = np.linspace(0.2, 0.5, channels), np.linspace(0.3, 0.1, channels)
    for dtype in (np.float32, np.float64):
        got = np.empty(out.shape, dtype)
        _augment.augment(x, got, pad[0], pad[1], ry, rx, 0.5, seed=5, fill=9,
                         scale=1 / 255, mean=mean, std=std)
        tol = 1e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, ref_normalize(want, mean, std, 1 / 255),
                                   rtol=tol, atol=tol)


def _ref_with_fill(x, out_hw, pad, oy, ox, flip, fill):
    """Pixel by pixel: output (i, j) of image n reads source (i + oy - pad_y,
    jj + ox - pad_x), jj mirrored when flipped, `fill` outside the image."""
    n, h, w, c = x.shape
    out = np.full((n,) + tuple(out_hw) + (c,), fill, x.dtype)
    for k in range(n):
        for i in range(out_hw[0]):
            for j in range(out_hw[1]):
                y = i + oy[k] - pad[0]
                jj = out_hw[1] - 1 - j if flip[k] else j
                xx = jj + ox[k] - pad[1]
                if 0 <= y < h and 0 <= xx < w:
                    out[k, i, j] = x[k, y, xx]
    return out


def test_each_output_is_a_valid_crop_or_flip(rng):
    # Independent of the RNG transcription: search every offset and flip.
    x = rng.integers(0, 256, size=(40, 8, 8, 2), dtype=np.uint8)
    out = T.Compose([T.RandomCrop(8, padding=2), T.RandomHorizontalFlip()])(x, seed=5)
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    seen = set()
    for n in range(len(x)):
        hits = [(i, j, f) for i in range(5) for j in range(5) for f in (0, 1)
                if np.array_equal(out[n], padded[n, i:i + 8, j:j + 8][:, ::-1] if f
                                  else padded[n, i:i + 8, j:j + 8])]
        assert hits, f"image {n} is not a crop/flip of its input"
        seen.update(hits)
    assert len({(i, j) for i, j, _ in seen}) > 10 and {f for *_, f in seen} == {0, 1}


def test_offsets_cover_range_and_flip_rate():
    oy, ox, fl = _augment.crop_flip_params(123, 20000, 8, 8, 0.5)
    assert set(oy) == set(range(9)) and set(ox) == set(range(9))
    counts = np.bincount(oy, minlength=9)
    assert counts.min() > 20000 / 9 * 0.85
    assert abs(fl.mean() - 0.5) < 0.02
    assert not _augment.crop_flip_params(1, 100, 0, 0, 0.0)[2].any()
    assert _augment.crop_flip_params(1, 100, 0, 0, 1.0)[2].all()


@pytest.mark.parametrize("src_dtype", [np.uint8, np.float32, np.float64])
def test_fused_normalize_matches_numpy(batch, src_dtype):
    x = batch.astype(src_dtype)
    n, h, w, c = x.shape
    mean, std, scale = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 1 / 255
    for dst_dtype in (np.float32, np.float64):
        out = np.empty((n, h, w, c), dst_dtype)
        _augment.augment(x, out, 4, 4, 8, 8, 0.5, seed=9, scale=scale, mean=mean, std=std)
        oy, ox, fl = ref_params(9, n, 8, 8, 0.5)
        # zero padding happens before normalisation, as torchvision pads the uint8 image
        want = ref_normalize(ref_augment(x, (h, w), (4, 4), oy, ox, fl), mean, std, scale)
        tol = 1e-6 if dst_dtype == np.float32 else 1e-12
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


def test_fill_value(batch):
    out = np.empty((16, 14, 12, 3), np.uint8)
    _augment.augment(batch, out, 1, 1, 0, 0, 0.0, fill=7)
    np.testing.assert_array_equal(out, np.pad(batch, ((0, 0), (1, 1), (1, 1), (0, 0)),
                                              constant_values=7))


def test_threads_identical(rng):
    x = rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                    T.Normalize(T.CIFAR10_MEAN, T.CIFAR10_STD)])
    with cnet.threads(1):
        a = tf(x, seed=31)
    with cnet.threads(2):
        b = tf(x, seed=31)
    c = tf(x, seed=31, n_threads=2)
    assert a.tobytes() == b.tobytes() == c.tobytes()


def test_kernel_rejects_bad_arguments(batch):
    with pytest.raises(ValueError, match=r"\(16, 12, 10, 3\)"):
        _augment.augment(batch, np.empty((16, 12, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="4-d"):
        _augment.augment(batch[0], np.empty((12, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        _augment.augment(batch[:, :, ::2], np.empty((16, 12, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 dst needs a uint8 src"):
        _augment.augment(batch.astype(np.float32), np.empty(batch.shape, np.uint8))
    with pytest.raises(ValueError, match="float32/float64 dst"):
        _augment.augment(batch, np.empty(batch.shape, np.uint8), mean=0.5)
    with pytest.raises(ValueError, match="dtypes"):
        _augment.augment(batch.astype(np.int32), np.empty(batch.shape, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        _augment.augment(batch, np.empty(batch.shape, np.uint8), pad_top=-1)


# ---------------------------------------------------------------- transforms

def test_pad_mnist_to_32(rng):
    x = rng.integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)
    out = T.Pad(2)(x)
    assert out.shape == (5, 32, 32, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))))
    fused = T.Compose([T.Pad(2), T.Normalize(T.MNIST_MEAN, T.MNIST_STD)])(x)
    np.testing.assert_allclose(
        fused, ref_normalize(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))),
                             T.MNIST_MEAN, T.MNIST_STD, 1 / 255), rtol=1e-6, atol=1e-6)
    assert fused.dtype == np.float32


def test_compose_fuses_and_matches_reference(batch):
    tf = T.Compose([T.RandomCrop((10, 8), padding=(3, 2)), T.RandomHorizontalFlip(0.5),
                    T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    assert len(tf._steps) == 1                      # one kernel call
    out = tf(batch, seed=2024)
    oy, ox, fl = ref_params(2024, 16, 12 + 6 - 10, 10 + 4 - 8, 0.5)
    want = ref_normalize(ref_augment(batch, (10, 8), (3, 2), oy, ox, fl),
                         (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1 / 255)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_compose_unfused_steps_equal_separate_calls(batch):
    # Pad then RandomCrop: two geometry stages -> two kernel calls, each with its own seed.
    tf = T.Compose([T.Pad(1), T.RandomCrop(12, padding=2), lambda x: x + 0])
    assert len(tf._steps) == 3
    out = tf(batch, seed=11)
    step1 = T.Pad(1)(batch)
    step2 = T.RandomCrop(12, padding=2)(step1, seed=T.derive_seed(11, 1))
    np.testing.assert_array_equal(out, step2)


def test_normalize_float_input_is_not_scaled(rng):
    x = rng.random((4, 5, 5, 2)).astype(np.float32)
    out = T.Normalize((0.5, 0.25), (0.5, 2.0))(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x - [0.5, 0.25]) / [0.5, 2.0], rtol=1e-6, atol=1e-7)
    out64 = T.ToFloat()(np.full((1, 2, 2, 1), 255, np.uint8))
    assert out64.dtype == np.float32 and np.all(out64 == 1.0)


def test_input_not_modified_and_noncontiguous_ok(batch):
    before = batch.copy()
    view = batch[:, ::-1]                            # negative stride
    out = T.RandomHorizontalFlip(1.0)(view)
    np.testing.assert_array_equal(batch, before)
    np.testing.assert_array_equal(out, view[:, :, ::-1])
    batch.flags.writeable = False                    # e.g. a memory-mapped dataset
    np.testing.assert_array_equal(T.Pad(1)(batch)[:, 1:-1, 1:-1], batch)


def test_global_seed_reproducible(batch):
    tf = T.Compose([T.RandomCrop(12, padding=4), T.RandomHorizontalFlip()])
    cnet.manual_seed(3)
    a = tf(batch)
    b = tf(batch)
    cnet.manual_seed(3)
    assert np.array_equal(a, tf(batch)) and not np.array_equal(a, b)


def test_transform_bad_inputs(batch):
    with pytest.raises(ValueError, match=r"NHWC.*\(12, 10, 3\)"):
        T.RandomHorizontalFlip()(batch[0])
    with pytest.raises(ValueError, match=r"3 mean values.*1 channels"):
        T.Normalize((0.1, 0.2, 0.3), (1, 1, 1))(batch[..., :1])
    with pytest.raises(ValueError, match=r"larger than the padded image \(14, 12\)"):
        T.RandomCrop(16, padding=1)(batch)
    with pytest.raises(ValueError, match="int32"):
        T.Pad(1)(batch.astype(np.int32))
    with pytest.raises(ValueError):
        T.RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError):
        T.Normalize(0.5, 0.0)
    with pytest.raises(ValueError, match=r"RandomCrop: size must be an int or a pair"):
        T.RandomCrop((8, 8, 3))
    with pytest.raises(TypeError, match=r"Pad: padding must be an int or a pair of ints"):
        T.Pad(1.5)
