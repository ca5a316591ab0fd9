"""MaxPool2d, AvgPool2d, GlobalAvgPool2d: numpy references, finite differences,
torch parity, thread determinism and bad inputs."""
import itertools

import numpy as np
import pytest

import cnet
from cnet import nn
from helpers import check_gradients, nchw_to_nhwc, nhwc_to_nchw


# -- independent numpy references (loops over windows, no kernel logic shared) --

def out_size(size, k, s, p, d, ceil_mode):
    eff = d * (k - 1) + 1
    if ceil_mode:
        o = -(-(size + 2 * p - eff) // s) + 1
        if (o - 1) * s >= size + p:
            o -= 1
    else:
        o = (size + 2 * p - eff) // s + 1
    return o


def ref_maxpool(x, k, s, p, d=(1, 1), ceil_mode=False):
    n, h, w, c = x.shape
    oh, ow = (out_size(h, k[0], s[0], p[0], d[0], ceil_mode),
              out_size(w, k[1], s[1], p[1], d[1], ceil_mode))
    big = np.full((n, h + 2 * p[0] + k[0] * d[0] + s[0], w + 2 * p[1] + k[1] * d[1] + s[1], c),
                  -np.inf, dtype=x.dtype)
    big[:, p[0]:p[0] + h, p[1]:p[1] + w] = x
    y = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            win = big[:, i * s[0]:i * s[0] + k[0] * d[0]:d[0], j * s[1]:j * s[1] + k[1] * d[1]:d[1]]
            y[:, i, j] = win.max(axis=(1, 2))
    return y


def ref_avgpool(x, k, s, p, ceil_mode=False, count_include_pad=True, divisor_override=None):
    n, h, w, c = x.shape
    oh, ow = out_size(h, k[0], s[0], p[0], 1, ceil_mode), out_size(w, k[1], s[1], p[1], 1, ceil_mode)
    y = np.zeros((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s[0] - p[0], j * s[1] - p[1]
            r1, c1 = min(r0 + k[0], h + p[0]), min(c0 + k[1], w + p[1])
            padded_area = (r1 - r0) * (c1 - c0)
            r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
            total = x[:, r0:r1, c0:c1].sum(axis=(1, 2))
            if divisor_override:
                div = divisor_override
            elif count_include_pad:
                div = padded_area
            else:
                div = (r1 - r0) * (c1 - c0)
            y[:, i, j] = total / div
    return y


MAX_CASES = [  # kernel, stride, padding, dilation, ceil_mode
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 2), (1, 2), (1, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (2, 2), True),
    ((2, 2), (3, 3), (1, 1), (1, 1), True),
    ((1, 1), (2, 2), (0, 0), (1, 1), False),
]

AVG_CASES = [  # kernel, stride, padding, ceil_mode, count_include_pad
    ((2, 2), (2, 2), (0, 0), False, True),
    ((3, 3), (2, 2), (1, 1), False, True),
    ((3, 3), (2, 2), (1, 1), True, True),
    ((3, 3), (2, 2), (1, 1), True, False),
    ((3, 2), (1, 2), (1, 1), False, False),
    ((2, 2), (3, 3), (1, 1), True, True),
]


def _distinct(rng, shape):
    """Values with gaps >> the finite-difference step (no near-ties in max)."""
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)
    return x / x.size * 4 - 2


@pytest.mark.parametrize("k,s,p,d,ceil", MAX_CASES)
def test_maxpool_forward_matches_numpy(rng, k, s, p, d, ceil):
    x = rng.standard_normal((2, 9, 8, 5)).astype(np.float32)
    layer = nn.MaxPool2d(k, s, p, d, ceil)
    np.testing.assert_array_equal(layer(x), ref_maxpool(x, k, s, p, d, ceil))
    np.testing.assert_array_equal(layer.double()(x.astype(np.float64)),
                                  ref_maxpool(x.astype(np.float64), k, s, p, d, ceil))


@pytest.mark.parametrize("k,s,p,ceil,cip", AVG_CASES)
def test_avgpool_forward_matches_numpy(rng, k, s, p, ceil, cip):
    x = rng.standard_normal((2, 9, 8, 5))
    layer = nn.AvgPool2d(k, s, p, ceil, cip)
    np.testing.assert_allclose(layer(x), ref_avgpool(x, k, s, p, ceil, cip), rtol=1e-13)
    layer = nn.AvgPool2d(k, s, p, ceil, cip, divisor_override=5)
    np.testing.assert_allclose(layer(x), ref_avgpool(x, k, s, p, ceil, cip, 5), rtol=1e-13)


def test_global_avgpool_forward(rng):
    x = rng.standard_normal((3, 5, 7, 6)).astype(np.float32)
    y = nn.GlobalAvgPool2d()(x)
    assert y.shape == (3, 6) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


# -- finite-difference gradients (float64) ------------------------------------

@pytest.mark.parametrize("k,s,p,d,ceil", MAX_CASES)
def test_maxpool_gradients(rng, k, s, p, d, ceil):
    check_gradients(nn.MaxPool2d(k, s, p, d, ceil), _distinct(rng, (2, 7, 8, 3)))


@pytest.mark.parametrize("k,s,p,ceil,cip", AVG_CASES)
def test_avgpool_gradients(rng, k, s, p, ceil, cip):
    check_gradients(nn.AvgPool2d(k, s, p, ceil, cip), rng.standard_normal((2, 7, 8, 3)))
    check_gradients(nn.AvgPool2d(k, s, p, ceil, cip, divisor_override=3),
                    rng.standard_normal((1, 7, 8, 2)))


def test_global_avgpool_gradients(rng):
    check_gradients(nn.GlobalAvgPool2d(), rng.standard_normal((2, 4, 3, 5)))


def test_maxpool_backward_routes_to_argmax(rng):
    x = _distinct(rng, (2, 6, 6, 4)).astype(np.float32)
    layer = nn.MaxPool2d(2)
    y = layer(x)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = layer.backward(g)
    expect = np.zeros_like(x)
    for n, i, j, c in itertools.product(*map(range, y.shape)):
        win = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        a, b = np.unravel_index(np.argmax(win), (2, 2))
        expect[n, 2 * i + a, 2 * j + b, c] = g[n, i, j, c]
    np.testing.assert_array_equal(gx, expect)


# -- torch parity ----------------------------------------------------------------

def _torch_pool_pair(torch, layer, tlayer, x, rng):
    xt = torch.tensor(nhwc_to_nchw(x), requires_grad=True)
    yt = tlayer(xt)
    y = layer(x)
    g = rng.standard_normal(y.shape).astype(x.dtype)
    yt.backward(torch.tensor(nhwc_to_nchw(g)))
    gx = layer.backward(g)
    return y, nchw_to_nhwc(yt.detach().numpy()), gx, nchw_to_nhwc(xt.grad.numpy())


@pytest.mark.parametrize("k,s,p,d,ceil", MAX_CASES)
def test_maxpool_matches_torch(rng, k, s, p, d, ceil):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 11, 10, 6)).astype(np.float32)
    x[0, :4, :4, 0] = 1.0  # ties: the first position in window order wins, as in torch
    tl = torch.nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
    y, yt, gx, gxt = _torch_pool_pair(torch, nn.MaxPool2d(k, s, p, d, ceil), tl, x, rng)
    np.testing.assert_array_equal(y, yt)
    np.testing.assert_allclose(gx, gxt, rtol=1e-6, atol=1e-6)
    _, ind = torch.nn.functional.max_pool2d(torch.tensor(nhwc_to_nchw(x)), k, s, p, d,
                                            ceil_mode=ceil, return_indices=True)
    layer = nn.MaxPool2d(k, s, p, d, ceil)
    layer(x)
    np.testing.assert_array_equal(layer._idx, nchw_to_nhwc(ind.numpy()))


def test_maxpool_nan_propagates_like_torch():
    torch = pytest.importorskip("torch")
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    x[0, 1, 0, 0] = np.nan
    x[1, 3, 3, 2] = np.nan
    y = nn.MaxPool2d(2)(x)
    yt = torch.nn.functional.max_pool2d(torch.tensor(nhwc_to_nchw(x)), 2)
    np.testing.assert_array_equal(y, nchw_to_nhwc(yt.numpy()))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[1, 1, 1, 2])


@pytest.mark.parametrize("k,s,p,ceil,cip", AVG_CASES)
def test_avgpool_matches_torch(rng, k, s, p, ceil, cip):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 11, 10, 6)).astype(np.float32)
    for dov in (None, 4):
        tl = torch.nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=cip,
                                divisor_override=dov)
        layer = nn.AvgPool2d(k, s, p, ceil, cip, divisor_override=dov)
        y, yt, gx, gxt = _torch_pool_pair(torch, layer, tl, x, rng)
        np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gx, gxt, rtol=1e-5, atol=1e-6)


def test_global_avgpool_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 7, 7, 8)).astype(np.float32)
    tl = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    xt = torch.tensor(nhwc_to_nchw(x), requires_grad=True)
    g = rng.standard_normal((4, 8)).astype(np.float32)
    tl(xt).backward(torch.tensor(g))
    layer = nn.GlobalAvgPool2d()
    np.testing.assert_allclose(layer(x), tl(xt).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.backward(g), nchw_to_nhwc(xt.grad.numpy()), rtol=1e-6)


# -- threads, modes, dtypes ----------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: nn.MaxPool2d(3, 2, 1), lambda: nn.MaxPool2d(2),
                                  lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                                  lambda: nn.GlobalAvgPool2d()])
def test_one_vs_two_threads_bitwise(rng, make):
    x = rng.standard_normal((8, 32, 32, 24)).astype(np.float32)
    results = []
    for nt in (1, 2):
        with cnet.threads(nt):
            layer = make()
            y = layer(x)
            g = np.ascontiguousarray(np.cos(y))
            results.append((y, layer.backward(g)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("make", [lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2),
                                  lambda: nn.GlobalAvgPool2d()])
def test_eval_keeps_nothing(rng, make):
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    layer = make()
    y_train = layer(x)
    layer.eval()
    np.testing.assert_array_equal(layer(x), y_train)
    with pytest.raises(RuntimeError, match="without a forward pass in training mode"):
        layer.backward(np.ones_like(y_train))
    assert all(v is None for k, v in vars(layer).items() if k in ("_idx", "_in_shape"))


def test_input_not_modified_and_dtype_kept(rng):
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 6, 6, 3)).astype(dtype)
        x0 = x.copy()
        for layer in (nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1), nn.GlobalAvgPool2d()):
            y = layer(x)
            assert y.dtype == dtype
            g = np.ones_like(y)
            gx = layer.backward(g)
            assert gx.dtype == dtype and gx.shape == x.shape
            np.testing.assert_array_equal(g, 1)
        np.testing.assert_array_equal(x, x0)


def test_repr_and_defaults():
    m = nn.MaxPool2d(3)
    assert m.stride == (3, 3) and m.padding == (0, 0) and m.dilation == (1, 1)
    assert "kernel_size=(3, 3)" in repr(m)
    a = nn.AvgPool2d(2, count_include_pad=False)
    assert "count_include_pad=False" in repr(a)


# -- bad inputs -------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2),
                                  lambda: nn.GlobalAvgPool2d()])
def test_bad_inputs(make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 4, 4\)"):
        layer(np.zeros((2, 4, 4), np.float32))
    x = np.zeros((2, 4, 6, 3), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 4, 3, 3\).*not C-contiguous"):
        layer(x)
    with pytest.raises(ValueError, match=rf"{name}.*int64"):
        layer(np.zeros((2, 4, 4, 3), np.int64))
    y = layer(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=name):
        layer.backward(np.zeros(y.shape[:-1] + (5,), np.float32))


def test_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"MaxPool2d.*\(1, 2, 3, 2\).*too small"):
        nn.MaxPool2d(5, padding=1)(np.zeros((1, 2, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"AvgPool2d.*\(1, 2, 8, 2\).*too small"):
        nn.AvgPool2d(3)(np.zeros((1, 2, 8, 2), np.float32))
    # exactly fits the padded input: one output
    assert nn.MaxPool2d(5, padding=1)(np.zeros((1, 3, 3, 2), np.float32)).shape == (1, 1, 1, 2)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="at most half"):
        nn.MaxPool2d(3, padding=2)
    with pytest.raises(ValueError, match="at most half"):
        nn.AvgPool2d(2, padding=2)
    with pytest.raises(ValueError, match=">= 1"):
        nn.MaxPool2d(2, stride=0)
    with pytest.raises(ValueError, match=">= 1"):
        nn.MaxPool2d(0)
    with pytest.raises(ValueError, match="pair"):
        nn.AvgPool2d((2, 2, 2))
    # the int-or-pair parsing Conv2d shares: names the layer and the argument
    with pytest.raises(ValueError, match=r"AvgPool2d: kernel_size must be an int or a pair"):
        nn.AvgPool2d((2, 2, 2))
    with pytest.raises(TypeError, match=r"MaxPool2d: stride must be an int or a pair of ints"):
        nn.MaxPool2d(2, stride=1.5)


def test_kernel_wrappers_validate():
    """Bounds checks are off in the kernels: the wrappers are the only guard."""
    from cnet_ext import _pool
    x = np.zeros((2, 4, 4, 3), np.float32)
    geo = ((2, 2), (2, 2), (0, 0), (1, 1))
    with pytest.raises(ValueError, match=r"y: expected shape \(2, 2, 2, 3\)"):
        _pool.max_pool2d_forward(x, np.zeros((2, 2, 2, 4), np.float32), None, *geo, 1)
    with pytest.raises(ValueError, match="y: expected dtype float32"):
        _pool.max_pool2d_forward(x, np.zeros((2, 2, 2, 3)), None, *geo, 1)
    with pytest.raises(ValueError, match="idx: expected dtype int32"):
        _pool.max_pool2d_forward(x, np.zeros((2, 2, 2, 3), np.float32),
                                 np.zeros((2, 2, 2, 3), np.int64), *geo, 1)
    with pytest.raises(ValueError, match="too large"):
        _pool.avg_pool2d_forward(x, np.zeros((2, 3, 2, 3), np.float32), *geo[:3], True, None, 1)
    with pytest.raises(ValueError, match=r"g: expected shape \(2, 3\)"):
        _pool.global_avg_pool2d_backward(np.zeros((2, 4), np.float32), x, 1)
