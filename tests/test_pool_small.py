"""Max pooling with few channels (C <= 8, LeNet's 6): the row kernels run a copy
specialised for each channel count; these tests cover every such copy."""
import numpy as np
import pytest

import cnet
from cnet import nn
from helpers import check_gradients, nchw_to_nhwc, nhwc_to_nchw

GEOMETRIES = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
              dict(kernel_size=3, stride=1, padding=1, dilation=2)]


def reference(x, k, s, p, d):
    """Window-by-window max with -inf padding (independent of the kernels)."""
    n, h, w, c = x.shape
    xp = np.full((n, h + 2 * p, w + 2 * p, c), -np.inf)
    xp[:, p:p + h, p:p + w] = x
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    y = np.full((n, oh, ow, c), -np.inf)
    for i in range(k):
        for j in range(k):
            y = np.maximum(y, xp[:, i * d:i * d + s * (oh - 1) + 1:s,
                                 j * d:j * d + s * (ow - 1) + 1:s])
    return y


def _args(g):
    return g["kernel_size"], g.get("stride", g["kernel_size"]), g.get("padding", 0), \
        g.get("dilation", 1)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_small_channels_forward_matches_reference(c, geom, rng):
    m = nn.MaxPool2d(**geom)
    x = rng.standard_normal((2, 9, 11, c)).astype(np.float32)
    np.testing.assert_array_equal(m(x), reference(x, *_args(geom)).astype(np.float32))


@pytest.mark.parametrize("c", [1, 3, 6, 8])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_small_channels_gradients(c, geom, rng):
    check_gradients(nn.MaxPool2d(**geom), rng.standard_normal((2, 7, 8, c)))


@pytest.mark.parametrize("c", [1, 6])
def test_small_channels_torch_parity_with_ties(c, rng):
    torch = pytest.importorskip("torch")
    # Integer values make ties: torch's first-position rule decides the gradient.
    x = rng.integers(0, 3, (3, 10, 12, c)).astype(np.float32)
    m = nn.MaxPool2d(3, stride=2, padding=1)
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = m.backward(dy)
    xt = torch.from_numpy(nhwc_to_nchw(x)).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, stride=2, padding=1)
    yt.backward(torch.from_numpy(nhwc_to_nchw(dy)))
    np.testing.assert_array_equal(y, nchw_to_nhwc(yt.detach().numpy()))
    np.testing.assert_allclose(dx, nchw_to_nhwc(xt.grad.numpy()), rtol=1e-6, atol=1e-6)


def test_small_channels_threads_bitwise(rng):
    x = rng.standard_normal((64, 28, 28, 6)).astype(np.float32)
    outs = []
    for nt in (1, 2):
        m = nn.MaxPool2d(2)
        with cnet.threads(nt):
            y = m(x)
            outs.append((y, m.backward(np.ones_like(y))))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def _torch_rule_2x2(x):
    """Window-order transcription of torch's max pooling rule for 2x2 / stride 2:
    take a tap if it is greater or NaN; the index of the taken tap (ih * W + iw)."""
    n, h, w, c = x.shape
    oh, ow = h // 2, w // 2
    y = np.empty((n, oh, ow, c), x.dtype)
    idx = np.empty((n, oh, ow, c), np.int64)
    for b, i, j, k in np.ndindex(n, oh, ow, c):
        m, im = -np.inf, (2 * i) * w + 2 * j
        for di, dj in ((0, 0), (0, 1), (1, 0), (1, 1)):
            v = x[b, 2 * i + di, 2 * j + dj, k]
            if v > m or np.isnan(v):
                m, im = v, (2 * i + di) * w + 2 * j + dj
        y[b, i, j, k], idx[b, i, j, k] = m, im
    return y, idx


@pytest.mark.parametrize("c", [1, 2, 3, 6, 12, 15, 16, 20])
@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (4, 71)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_2x2_windows_ties_nans_and_routing(c, hw, dtype, rng):
    # 2x2 / stride 2 (one channel and C >= 16: the window-by-window forward and
    # one-pass backward; 2-15: the forward's pair folds over flat rows in blocks of
    # 32 windows (W = 71: two blocks), the backward's tap-major loops): ties in
    # every order, NaNs, -inf,
    # odd sizes whose last row and column no window covers; values and indices as
    # torch's rule, gradients routed to them.
    x = rng.integers(-2, 2, (3,) + hw + (c,)).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    x[1, 2:4, 2:4, -1] = -np.inf
    x[2, 1, 1, 0] = np.nan
    x[2, 0, 1, 0] = np.nan
    m = nn.MaxPool2d(2)
    y = m(x)
    want_y, want_idx = _torch_rule_2x2(x)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(m._idx, want_idx)
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = m.backward(g)
    want_gx = np.zeros_like(x)
    flat = want_gx.reshape(x.shape[0], -1, c)
    for b, i, j, k in np.ndindex(*y.shape):
        flat[b, want_idx[b, i, j, k], k] += g[b, i, j, k]
    np.testing.assert_array_equal(gx, want_gx)
