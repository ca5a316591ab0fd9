"""requires_input_grad_(False): layers skip dL/dx, parameter gradients unchanged."""
import numpy as np
import pytest

import cnet
from cnet import nn, models


def _grads(model):
    return [p.grad.copy() for p in model.parameters()]


def _backward_twice(make, x, dy_shape_from):
    """Parameter gradients and the returned dx with and without input gradients."""
    out = []
    for flag in (True, False):
        cnet.manual_seed(0)
        m = make()
        m.requires_input_grad_(flag)
        y = m(x)
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
        dx = m.backward(dy)
        out.append((dx, _grads(m)))
    return out


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 16, 3, padding=1),            # direct kernel
    lambda: nn.Conv2d(3, 6, 5, padding=2),             # im2col / col2im
    lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),   # depthwise
    lambda: nn.Conv2d(8, 12, 1),                       # pointwise
    lambda: nn.Conv2d(8, 12, 3, stride=2, groups=2),   # grouped
], ids=["direct", "im2col", "depthwise", "pointwise", "grouped"])
def test_conv_skips_input_grad(rng, make):
    cin = make().in_channels
    x = rng.standard_normal((3, 9, 9, cin)).astype(np.float32)
    (dx, g_full), (none, g_skip) = _backward_twice(make, x, None)
    assert dx.shape == x.shape and none is None
    for a, b in zip(g_full, g_skip):
        np.testing.assert_array_equal(a, b)


def test_linear_skips_input_grad(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    (dx, g_full), (none, g_skip) = _backward_twice(lambda: nn.Linear(7, 4), x, None)
    assert dx.shape == x.shape and none is None
    for a, b in zip(g_full, g_skip):
        np.testing.assert_array_equal(a, b)


def test_default_still_returns_input_grad(rng):
    m = models.lenet5()
    assert m.input_grad and all(c.input_grad for c in m.modules())
    x = rng.standard_normal((2, 32, 32, 1)).astype(np.float32)
    y = m(x)
    assert m.backward(np.ones_like(y)).shape == x.shape


def test_sequential_applies_to_first_child_only(rng):
    m = models.lenet5()
    assert m.requires_input_grad_(False) is m
    flags = [layer.input_grad for layer in m]
    assert flags[0] is False and all(flags[1:])
    x = rng.standard_normal((4, 32, 32, 1)).astype(np.float32)
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    assert m.backward(dy) is None
    g_skip = _grads(m)
    m.zero_grad()
    m.requires_input_grad_(True)
    assert m[0].input_grad
    m(x)
    assert m.backward(dy).shape == x.shape
    for a, b in zip(_grads(m), g_skip):
        np.testing.assert_array_equal(a, b)


def test_sequential_first_child_parameterless_and_append(rng):
    # A first child that cannot skip (ReLU) still works; the container returns None.
    m = nn.Sequential(nn.ReLU(), nn.Linear(4, 3)).requires_input_grad_(False)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    m(x)
    assert m.backward(np.ones((2, 3), np.float32)) is None
    # A child appended to an empty container that skips becomes its first child.
    s = nn.Sequential().requires_input_grad_(False)
    s.append(nn.Linear(4, 3))
    assert s[0].input_grad is False


@pytest.mark.parametrize("container", [nn.Add, nn.Concat])
def test_branches_get_the_setting(rng, container):
    m = nn.Sequential(container(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)), nn.ReLU())
    m.requires_input_grad_(False)
    assert all(not b.input_grad for b in m[0].branches)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    y = m(x)
    assert m.backward(np.ones_like(y)) is None


def test_threads_identical_without_input_grad(rng):
    x = rng.standard_normal((16, 32, 32, 1)).astype(np.float32)
    grads = []
    for nt in (1, 2):
        cnet.manual_seed(0)
        m = models.lenet5().requires_input_grad_(False)
        with cnet.threads(nt):
            y = m(x)
            m.backward(np.ones_like(y))
        grads.append(_grads(m))
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_trainer_skips_and_restores(rng):
    from cnet import optim
    from cnet.train import Trainer
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    seen = []
    conv_backward = m[0].backward

    def spy(g):
        dx = conv_backward(g)
        seen.append(dx)
        return dx
    m[0].backward = spy
    x = rng.standard_normal((8, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    t = Trainer(m, optim.SGD(m.parameters(), lr=0.1), verbose=0, out_dir=None, plot=False)
    t.train_epoch([(x, y)])
    assert seen == [None]
    assert m.input_grad and m[0].input_grad
