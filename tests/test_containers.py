"""Add, Concat and Sequential: forward references, finite-difference gradients with
parameterless and parameterised branches, the fused residual add + ReLU,
thread determinism and bad inputs."""
import numpy as np
import pytest

import cnet
from cnet import nn
from cnet.nn.module import Module, Parameter, check_input, require_cache
from helpers import check_gradients, spy_gemm_accumulate


class Scale(Module):
    """A tiny parameterised layer (per-channel scale and shift), independent of conv."""

    def __init__(self, channels, seed=0):
        super().__init__()
        r = np.random.default_rng(seed)
        self.weight = Parameter(r.uniform(0.5, 1.5, channels))
        self.bias = Parameter(r.uniform(-0.5, 0.5, channels))
        self._x = None

    def _drop_cache(self):
        self._x = None

    def forward(self, x):
        check_input(self, x, (2, 4), channels=self.weight.shape[0], dtype=self.weight.dtype)
        if self.training:
            self._x = x
        return x * self.weight.data + self.bias.data

    def backward(self, g):
        x = require_cache(self, self._x)
        axes = tuple(range(g.ndim - 1))
        self.weight.grad += (g * x).sum(axis=axes)
        self.bias.grad += g.sum(axis=axes)
        return g * self.weight.data


def _x(rng, shape=(2, 5, 5, 4)):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 1e-2, 0.3, x)


# -- forward references ------------------------------------------------------------

def test_add_forward_matches_numpy(rng):
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    a = nn.Add(nn.Identity(), nn.ReLU(), Scale(3).float())
    y = a(x)
    s = a.branches[2]
    np.testing.assert_allclose(y, x + np.maximum(x, 0) + (x * s.weight.data + s.bias.data),
                               rtol=1e-6, atol=1e-6)
    single = nn.Add(nn.Identity())
    y1 = single(x)
    assert y1 is not x
    np.testing.assert_array_equal(y1, x)


def test_concat_forward_matches_numpy(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    c = nn.Concat(nn.Identity(), nn.ReLU(), nn.AvgPool2d(3, 1, 1), nn.Identity())
    y = c(x)
    ref = np.concatenate([x, np.maximum(x, 0), c.branches[2](x), x], axis=-1)
    np.testing.assert_array_equal(y, ref)


def test_concat_split_backward_slices(rng):
    x = rng.standard_normal((2, 3, 3, 2))
    c = nn.Concat(nn.Identity(), Scale(2).double(), nn.Identity())
    c(x)
    g = rng.standard_normal((2, 3, 3, 6))
    g0 = g.copy()
    w = c.branches[1].weight.data
    np.testing.assert_allclose(c.backward(g), g[..., :2] + g[..., 2:4] * w + g[..., 4:], rtol=1e-14)
    np.testing.assert_array_equal(g, g0)


# -- finite-difference gradients ----------------------------------------------------

def test_add_gradients_parameterless(rng):
    check_gradients(nn.Add(nn.ReLU(), nn.Identity(), nn.MaxPool2d(3, 1, 1)), _x(rng))


def test_add_gradients_parameterised(rng):
    check_gradients(nn.Add(nn.Sequential(Scale(4), nn.ReLU(), Scale(4, seed=1)), nn.Identity()),
                    _x(rng))


def test_concat_gradients(rng):
    check_gradients(nn.Concat(nn.Identity(), nn.Sequential(Scale(4), nn.ReLU()),
                              nn.AvgPool2d(3, 1, 1)), _x(rng))


def test_fused_residual_block_gradients(rng):
    block = nn.Sequential(nn.Add(nn.Sequential(Scale(4), nn.ReLU(), Scale(4, seed=2)),
                                 nn.Identity()), nn.ReLU())
    check_gradients(block, _x(rng))
    assert block[0]._relu  # the plan folded the ReLU into the Add


def _conv(*args, **kw):
    conv = pytest.importorskip("cnet.nn.conv")
    return conv.Conv2d(*args, **kw)


def test_gradients_with_conv_branches(rng):
    body = nn.Sequential(_conv(4, 4, 3, padding=1), nn.ReLU(), _conv(4, 4, 3, padding=1))
    block = nn.Sequential(nn.Add(body, _conv(4, 4, 1, bias=False)), nn.ReLU())
    check_gradients(block, _x(rng), max_checks=60)
    inception = nn.Concat(_conv(4, 2, 1), nn.Sequential(_conv(4, 3, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv(4, 2, 1)))
    check_gradients(inception, _x(rng), max_checks=60)


def _bottleneck(cin, width):
    """A bottleneck residual block: 1x1 -> BN -> ReLU -> 1x1 -> BN, identity shortcut."""
    body = nn.Sequential(_conv(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         _conv(width, cin, 1, bias=False), nn.BatchNorm2d(cin))
    return nn.Sequential(nn.Add(body, nn.Identity()), nn.ReLU())


@pytest.fixture
def own_gemm_on():
    from cnet_ext import _conv as kernels
    previous = kernels.gemm_kernel(True)
    yield kernels
    kernels.gemm_kernel(previous)


def test_bottleneck_adds_its_input_gradient_in_the_gemm(rng, own_gemm_on, monkeypatch):
    """An identity block whose body starts with a 1x1 convolution on cnet's GEMM: the
    convolution adds its input gradient to the shortcut's (the masked gradient) in
    the GEMM's store.  Finite differences in float64; in float32 the same values as
    backward-then-add (Module._backward_into) and the same parameter gradients."""
    kernels = own_gemm_on
    accumulated = spy_gemm_accumulate(monkeypatch, kernels)
    x = rng.standard_normal((3, 5, 4, 16))
    check_gradients(_bottleneck(16, 8), x, max_checks=60, rtol=1e-5, atol=1e-7)
    assert True in accumulated

    from cnet.nn.conv import Conv2d
    from cnet.nn.module import Module
    xf = x.astype(np.float32)
    g = rng.standard_normal(xf.shape).astype(np.float32)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Conv2d, "_backward_into", Module._backward_into)
        cnet.manual_seed(0)
        block = _bottleneck(16, 8).float()
        with cnet.threads(2):
            block(xf)
            accumulated.clear()
            g0 = g.copy()
            gx = block.backward(g)
        np.testing.assert_array_equal(g, g0)          # grad_out untouched
        assert (True in accumulated) == fused
        results.append([gx] + [p.grad.copy() for p in block.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _projection_block(cin, width, cout, stride):
    """A bottleneck with a projection shortcut (1x1 convolution + BN, strided)."""
    body = nn.Sequential(_conv(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         _conv(width, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
    shortcut = nn.Sequential(_conv(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(nn.Add(body, shortcut), nn.ReLU())


def test_projection_block_adds_the_body_gradient_into_the_shortcuts(rng, own_gemm_on,
                                                                    monkeypatch):
    """A projection shortcut's fresh input gradient takes the body's, added by the
    body's first 1x1 convolution in its GEMM's store (containers._owned_sum_target):
    the block returns that very array.  Finite differences in float64; in float32 the
    same values as the two gradients summed after both backwards."""
    from cnet.nn import containers
    kernels = own_gemm_on
    accumulated = spy_gemm_accumulate(monkeypatch, kernels)
    x = rng.standard_normal((3, 6, 6, 8))
    check_gradients(_projection_block(8, 4, 12, 2), x, max_checks=60, rtol=1e-5, atol=1e-7)
    assert True in accumulated

    xf = x.astype(np.float32)
    g = rng.standard_normal((3, 3, 3, 12)).astype(np.float32)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(containers, "_owned_sum_target", lambda grad, other: False)
        cnet.manual_seed(0)
        block = _projection_block(8, 4, 12, 2).float()
        shortcut = block[0].branches[1]
        returned = []
        plain = shortcut.backward
        monkeypatch.setattr(shortcut, "backward", lambda grad: returned.append(plain(grad))
                            or returned[-1])
        with cnet.threads(2):
            block(xf)
            accumulated.clear()
            gx = block.backward(g)
        assert (gx is returned[0]) == fused
        assert (True in accumulated) == fused
        results.append([gx] + [p.grad.copy() for p in block.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_owned_sum_target_refuses_views_and_shared_memory():
    from cnet.nn.containers import _owned_sum_target
    a = np.zeros((2, 4, 4, 3), np.float32)
    other = np.zeros_like(a)
    assert _owned_sum_target(a, other)
    assert not _owned_sum_target(a[:1], other)                    # a view of another array
    assert not _owned_sum_target(a, a)                            # the gradient still read
    assert not _owned_sum_target(a.astype(np.float64), other)     # another dtype
    frozen = np.zeros_like(a)
    frozen.flags.writeable = False
    assert not _owned_sum_target(frozen, other)
    assert not _owned_sum_target(np.asfortranarray(np.zeros((4, 3), np.float32)),
                                 np.zeros((4, 3), np.float32))


# -- fused add + ReLU -----------------------------------------------------------------

def test_fused_equals_unfused(rng):
    x = rng.standard_normal((4, 6, 6, 4)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)

    def make():
        return nn.Add(nn.Sequential(Scale(4).float(), nn.ReLU(), Scale(4, 3).float()),
                      nn.Identity())

    fused = nn.Sequential(make(), nn.ReLU())
    add = make()
    relu = nn.ReLU()
    y_ref = relu(add(x))
    y = fused(x)
    np.testing.assert_array_equal(y, y_ref)
    g0 = g.copy()
    np.testing.assert_array_equal(fused.backward(g), add.backward(relu.backward(g)))
    np.testing.assert_array_equal(g, g0)  # grad_out untouched
    for p, q in zip(fused.parameters(), add.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_fused_add_relu_eval_keeps_nothing(rng):
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    block = nn.Sequential(nn.Add(nn.ReLU(), nn.Identity()), nn.ReLU())
    y = block(x)
    block.eval()
    np.testing.assert_array_equal(block(x), y)
    assert block[0]._y is None
    with pytest.raises(RuntimeError, match="training mode"):
        block.backward(np.ones_like(y))


def test_add_backward_does_not_modify_grad(rng):
    x = rng.standard_normal((2, 3, 3, 4))
    for block in (nn.Add(nn.Identity(), nn.Identity()),
                  nn.Sequential(nn.Add(nn.Identity(), nn.Identity()), nn.ReLU())):
        y = block(x)
        g = rng.standard_normal(y.shape)
        g0 = g.copy()
        gx = block.backward(g)
        assert gx is not g
        np.testing.assert_array_equal(g, g0)


# -- threads ---------------------------------------------------------------------------

def test_containers_threads_bitwise(rng):
    x = rng.standard_normal((16, 16, 16, 16)).astype(np.float32)
    res = []
    for nt in (1, 2):
        with cnet.threads(nt):
            cnet.manual_seed(1)
            m = nn.Sequential(
                nn.Add(nn.Sequential(nn.ReLU(), nn.Dropout(0.3)), nn.Identity(), nn.ReLU()),
                nn.ReLU(),
                nn.Concat(nn.Identity(), nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)))
            y = m(x)
            res.append((y, m.backward(np.cos(y))))
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


# -- bad inputs --------------------------------------------------------------------------

def test_add_shape_mismatch():
    with pytest.raises(ValueError, match=r"Add.*\(1, 2, 2, 3\).*\(1, 1, 1, 3\).*MaxPool2d"):
        nn.Add(nn.Identity(), nn.MaxPool2d(2))(np.zeros((1, 2, 2, 3), np.float32))


def test_concat_shape_mismatch():
    with pytest.raises(ValueError, match=r"Concat.*\(1, 2, 2, 3\).*\(1, 1, 1, 3\)"):
        nn.Concat(nn.Identity(), nn.MaxPool2d(2))(np.zeros((1, 2, 2, 3), np.float32))


class ToDouble(Module):
    def forward(self, x):
        return x.astype(np.float64)


@pytest.mark.parametrize("container", [nn.Add, nn.Concat])
def test_dtype_mismatch_between_branches(container):
    x = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match=f"{container.__name__}.*ToDouble.*float64.*float32"):
        container(nn.Identity(), ToDouble())(x)


def test_bad_gradients(rng):
    x = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    c = nn.Concat(nn.Identity(), nn.Identity())
    c(x)
    with pytest.raises(ValueError, match="Concat.*6 output channels"):
        c.backward(np.zeros((1, 2, 2, 5), np.float32))
    block = nn.Sequential(nn.Add(nn.Identity(), nn.Identity()), nn.ReLU())
    block(x)
    with pytest.raises(ValueError, match=r"Add.*\(1, 2, 2, 4\)"):
        block.backward(np.zeros((1, 2, 2, 4), np.float32))
    with pytest.raises(RuntimeError, match="training mode"):
        nn.Concat(nn.Identity()).backward(x)


def test_needs_a_branch():
    with pytest.raises(ValueError, match="at least one branch"):
        nn.Add()


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_block_joins_in_the_last_batchnorm(rng, shortcut, dtype):
    # Training: Add(body ending in a batch norm, shortcut) + ReLU adds the shortcut
    # in the batch norm's output pass; forward, every gradient and the running
    # statistics bitwise as the unjoined block (a profiler-style wrapper on the body
    # turns the join off), for two steps.
    def block():
        cin = 8 if shortcut == "identity" else 4
        body = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                             nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                             nn.BatchNorm2d(8))
        short = (nn.Identity() if shortcut == "identity" else
                 nn.Sequential(nn.Conv2d(cin, 8, 1, bias=False), nn.BatchNorm2d(8)))
        return nn.Sequential(nn.Add(body, short), nn.ReLU()).to(dtype), cin

    cnet.manual_seed(3)
    joined, cin = block()
    cnet.manual_seed(3)
    plain, _ = block()
    body = plain[0].branches[0]
    body.forward = lambda x: type(body).forward(body, x)      # no join through a wrapper
    calls = []
    bn_last = joined[0].branches[0][4]
    original = type(bn_last)._forward
    bn_last._forward = lambda x, residual, moments=None: (
        calls.append(residual is not None), original(bn_last, x, residual, moments))[1]
    for step in range(2):
        x = rng.standard_normal((6, 7, 7, cin)).astype(dtype)
        dy = rng.standard_normal((6, 7, 7, 8)).astype(dtype)
        outs = []
        for model in (joined, plain):
            model.zero_grad()
            y = model(x)
            outs.append((y, model.backward(dy), [p.grad.copy() for p in model.parameters()],
                         [b.copy() for b in model.buffers()]))
        (y1, dx1, g1, b1), (y2, dx2, g2, b2) = outs
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(dx1, dx2)
        for a, b in zip(g1 + b1, g2 + b2):
            np.testing.assert_array_equal(a, b)
    assert calls == [True, True]


def test_backward_releases_the_forward_caches(rng):
    # Sequential's backward drops each layer's activations once that layer's backward
    # has run (as torch frees the graph): the training peak holds no activation of a
    # layer already done.  A second backward of the same forward names the layer; the
    # next forward works as before and gives the same gradients.
    cnet.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Sequential(nn.Add(body, nn.Identity()), nn.ReLU()),
                          nn.GlobalAvgPool2d(), nn.Linear(8, 4)).train()
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    g = rng.standard_normal((2, 4)).astype(np.float32)
    model(x)
    held = [(m, a) for m in model.modules() for a in m._activations
            if getattr(m, a) is not None]
    # every conv's input, the first's ReLU output, each batch norm's input, the pool's
    # argmax, the join's output, the linear layer's input
    assert len(held) >= 9
    model.backward(g)
    assert [(type(m).__name__, a) for m, a in held if getattr(m, a) is not None] == []
    grads = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"Linear\(.*each forward serves one backward"):
        model.backward(g)
    model.zero_grad()
    model(x)
    model.backward(g)
    for a, b in zip(grads, model.parameters()):
        np.testing.assert_array_equal(a, b.grad)
