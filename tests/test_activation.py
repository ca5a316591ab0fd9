"""ReLU and Dropout: numpy references, gradients, torch parity and statistics,
determinism (seed and thread count), in-place modes and bad inputs."""
import numpy as np
import pytest

import cnet
from cnet import nn
from helpers import check_gradients


def _away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 1e-3, 0.5, x)  # no kinks within the FD step


# -- ReLU --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6), (2, 3, 4, 5)])
def test_relu_forward_backward_reference(rng, dtype, shape):
    x = rng.standard_normal(shape).astype(dtype)
    x0 = x.copy()
    layer = nn.ReLU()
    y = layer(x)
    assert y.dtype == dtype and y is not x
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    np.testing.assert_array_equal(x, x0)
    g = rng.standard_normal(shape).astype(dtype)
    g0 = g.copy()
    gx = layer.backward(g)
    np.testing.assert_array_equal(gx, np.where(x > 0, g, 0))
    np.testing.assert_array_equal(g, g0)  # grad_out untouched
    assert gx is not g


def test_relu_inplace_writes_into_input(rng):
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    ref = np.maximum(x, 0)
    layer = nn.ReLU(inplace=True)
    y = layer(x)
    assert y is x
    np.testing.assert_array_equal(x, ref)
    g = np.ones_like(x)
    gx = layer.backward(g)
    np.testing.assert_array_equal(gx, (ref > 0).astype(np.float32))
    np.testing.assert_array_equal(g, 1)
    assert "inplace=True" in repr(layer)


def test_relu_gradients(rng):
    check_gradients(nn.ReLU(), _away_from_zero(rng, (2, 3, 4, 5)))
    check_gradients(nn.ReLU(), _away_from_zero(rng, (4, 7)))


def test_relu_matches_torch_incl_nan(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 0, 1] = 0.0
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.relu(xt)
    g = rng.standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(g))
    layer = nn.ReLU()
    np.testing.assert_array_equal(layer(x), yt.detach().numpy())
    np.testing.assert_array_equal(layer.backward(g), xt.grad.numpy())


def test_relu_threads_bitwise(rng):
    x = rng.standard_normal((16, 32, 32, 8)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    res = []
    for nt in (1, 2):
        with cnet.threads(nt):
            layer = nn.ReLU()
            res.append((layer(x), layer.backward(g)))
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


# -- Dropout -------------------------------------------------------------------

def test_dropout_eval_and_p0_are_identity(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    d = nn.Dropout(0.5).eval()
    assert d(x) is x
    with pytest.raises(RuntimeError, match="training mode"):
        d.backward(x)
    d0 = nn.Dropout(0.0)
    assert d0(x) is x
    g = np.ones_like(x)
    np.testing.assert_array_equal(d0.backward(g), g)


def test_dropout_p1_zeroes_everything(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    d = nn.Dropout(1.0)
    y = d(x)
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), 0)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(torch.nn.functional.dropout(torch.tensor(x), 1.0).numpy(), y)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_statistics_and_scaling(p, dtype):
    n = 1_000_003  # odd: the last element has no pair partner
    x = np.ones(n, dtype).reshape(1, n)
    y = nn.Dropout(p)(x)
    kept = y != 0
    rate = kept.mean()
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p)
    # kept values are x * (1 / (1 - p)) with the scale computed in x's dtype (torch's rule)
    np.testing.assert_array_equal(np.unique(y[kept]), [dtype(1) / dtype(1 - p)])
    # the mask has no visible structure: neighbours are independent (pairs share one hash)
    k = kept.ravel().astype(np.float64)
    corr = np.corrcoef(k[:-1], k[1:])[0, 1]
    assert abs(corr) < 5 / np.sqrt(n)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_scaling_matches_torch(rng, p):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((64, 256)).astype(np.float32)
    y = nn.Dropout(p)(x)
    yt = torch.nn.functional.dropout(torch.tensor(x), p).numpy()
    # same scaled values where each kept an element (masks differ by design)
    both = (y != 0) & (yt != 0)
    assert both.sum() > 0.3 * x.size * (1 - p) ** 2
    np.testing.assert_array_equal(y[both], yt[both])
    assert abs((y != 0).mean() - (yt != 0).mean()) < 0.02


def test_dropout_backward_uses_forward_mask(rng):
    x = rng.standard_normal((8, 4, 4, 3)).astype(np.float32) + 10  # no zeros in x
    d = nn.Dropout(0.3)
    y = d(x)
    g = rng.standard_normal(x.shape).astype(np.float32)
    g0 = g.copy()
    gx = d.backward(g)
    scale = np.float32(1) / np.float32(0.7)
    np.testing.assert_array_equal(gx, np.where(y != 0, g * scale, 0))
    np.testing.assert_array_equal(g, g0)


def test_dropout_gradients(rng):
    check_gradients(nn.Dropout(0.4), rng.standard_normal((3, 4, 4, 5)))
    check_gradients(nn.Dropout(0.5), rng.standard_normal((6, 10)))


def test_dropout_reproducible_under_manual_seed(rng):
    x = rng.standard_normal((32, 64)).astype(np.float32)
    d = nn.Dropout(0.5)
    cnet.manual_seed(7)
    a1, a2 = d(x), d(x)
    cnet.manual_seed(7)
    b1, b2 = d(x), d(x)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1 != 0, a2 != 0)  # a fresh mask per call
    cnet.manual_seed(8)
    assert not np.array_equal(d(x) != 0, a1 != 0)


def test_dropout_threads_bitwise(rng):
    x = rng.standard_normal((16, 32, 32, 8)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    res = []
    for nt in (1, 2):
        with cnet.threads(nt):
            cnet.manual_seed(3)
            d = nn.Dropout(0.5)
            res.append((d(x), d.backward(g)))
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


def test_dropout_inplace(rng):
    x = rng.standard_normal((8, 16)).astype(np.float32)
    x_copy = x.copy()
    cnet.manual_seed(5)
    y_ref = nn.Dropout(0.5)(x_copy)
    cnet.manual_seed(5)
    d = nn.Dropout(0.5, inplace=True)
    y = d(x)
    assert y is x
    np.testing.assert_array_equal(x, y_ref)
    assert "inplace=True" in repr(d)


def test_dropout_mask_depends_on_index_not_shape(rng):
    """Counter-based: the same seed gives the same mask for the same flat layout."""
    x = rng.standard_normal(4096).astype(np.float32)
    cnet.manual_seed(11)
    a = nn.Dropout(0.5)(x.reshape(64, 64))
    cnet.manual_seed(11)
    b = nn.Dropout(0.5)(x.reshape(8, 8, 8, 8))
    np.testing.assert_array_equal(a.ravel(), b.ravel())


# -- bad inputs -------------------------------------------------------------------

@pytest.mark.parametrize("make", [nn.ReLU, nn.Dropout])
def test_bad_inputs(make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}.*\(5,\)"):
        layer(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=rf"{name}.*\(4, 3\).*not C-contiguous"):
        layer(np.zeros((3, 4), np.float32).T)
    with pytest.raises(ValueError, match=rf"{name}.*int32"):
        layer(np.zeros((3, 4), np.int32))
    layer(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=rf"{name}.*\(3, 5\)"):
        layer.backward(np.zeros((3, 5), np.float32))


def test_dropout_bad_probability():
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(-0.1)


def test_kernel_wrappers_validate():
    """Bounds checks are off in the kernels: the wrappers are the only guard."""
    from cnet_ext import _elementwise
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"b: expected shape \(4, 5\) float32"):
        _elementwise.add(a, np.zeros((4, 6), np.float32), np.empty_like(a), False, 1)
    with pytest.raises(ValueError, match="out: expected shape"):
        _elementwise.relu_forward(a, np.zeros((4, 5)), 1)
    ro = np.zeros_like(a)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _elementwise.dropout(a, ro, 1, 0.5, 1)
    with pytest.raises(ValueError, match=r"parts have 5 channels in all.*\(4, 6\)"):
        _elementwise.concat_last([a], np.zeros((4, 6), np.float32), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _elementwise.split_last(a, [np.zeros((5, 4), np.float32).T], 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_slots", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1,), (3, 683), (7, 3, 3, 130)])
@pytest.mark.parametrize("threads", [1, 2])
def test_add_slots_is_one_add_per_slot_in_order(rng, dtype, n_slots, shape, threads):
    """A weight gradient's stripe sums in one pass: bitwise the sequence of adds
    (((target + s0) + s1) + ...), whatever the thread count and block edges."""
    from cnet_ext import _elementwise
    scale = np.logspace(-6, 6, n_slots).reshape((-1,) + (1,) * len(shape))
    slots = (rng.standard_normal((n_slots,) + shape) * scale).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    want = target.copy()
    for s in slots:
        want = want + s
    _elementwise.add_slots(target, slots, threads)
    np.testing.assert_array_equal(target, want)


def test_add_slots_validates():
    from cnet_ext import _elementwise
    t = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"slots: expected shape \(S,\) \+ \(4, 5\) float32, "
                                         r"got \(2, 5, 4\) float32"):
        _elementwise.add_slots(t, np.zeros((2, 5, 4), np.float32), 1)
    with pytest.raises(ValueError, match=r"float64"):
        _elementwise.add_slots(t, np.zeros((2, 4, 5)), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _elementwise.add_slots(t, np.zeros((4, 5, 2), np.float32).transpose(2, 0, 1), 1)
    with pytest.raises(ValueError, match="target.*not C-contiguous"):
        _elementwise.add_slots(np.zeros((5, 4), np.float32).T, np.zeros((2, 4, 5), np.float32), 1)
    with pytest.raises(TypeError, match="slots: expected a numpy array"):
        _elementwise.add_slots(t, [t, t], 1)
    _elementwise.add_slots(t, np.zeros((0, 4, 5), np.float32), 1)   # no slots: unchanged
    assert not t.any()
