"""Small-channel convolution paths (LeNet-5): C_out below one SIMD vector takes the
direct forward kernel with zero-padded weights and a partial store, and with
KW * C_in <= 8 the weight gradient blocked over a kernel row's (kw, c) pairs."""
import numpy as np
import pytest

import cnet
from cnet import nn
from cnet_ext import _conv
from helpers import check_gradients, torch_conv_grads

CASES = [((1, 6, 5), {}),                                    # LeNet conv1 (small wgrad)
         ((3, 6, 3), dict(stride=2, padding=1)),
         ((4, 5, 3), dict(padding=2, dilation=2, bias=False)),
         ((2, 1, 2), dict(stride=(1, 2), padding=(0, 1))),         # small wgrad
         ((1, 6, 3), dict(stride=2, padding=1)),                   # small wgrad, edges
         ((2, 4, 3), dict(stride=(2, 1), padding=2, dilation=2))]  # small wgrad, edges


def reference(x, w, b, stride, padding, dilation):
    """Plain loops over output pixels (independent of the kernels)."""
    n, h, wd, c = x.shape
    kh, kw, _, co = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), np.float64)
    xp[:, ph:ph + h, pw:pw + wd] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, oh, ow, co))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            y += patch @ w[i, j].astype(np.float64)
    return y + (0 if b is None else b)


@pytest.mark.parametrize("args,kwargs", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_partial_vector_forward_matches_reference(args, kwargs, dtype, rng):
    m = nn.Conv2d(*args, **kwargs).to(dtype)
    assert m._paths(dtype)[0] == "direct"
    x = rng.standard_normal((3, 9, 10, args[0])).astype(dtype)
    y = m(x)
    b = None if m.bias is None else m.bias.data
    ref = reference(x, m.weight.data, b, m.stride, m.padding, m.dilation)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("args,kwargs", CASES)
def test_partial_vector_gradients(args, kwargs, rng):
    m = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((2, 7, 8, args[0]))
    check_gradients(m, x)


@pytest.mark.parametrize("args,kwargs", CASES[:2])
def test_partial_vector_torch_parity(args, kwargs, rng):
    pytest.importorskip("torch")
    m = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((4, 12, 12, args[0])).astype(np.float32)
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = m.backward(dy)
    ty, tdx, tdw, _ = torch_conv_grads(m, x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.weight.grad, tdw, rtol=1e-4, atol=1e-4)


def test_partial_vector_threads_identical(rng):
    x = rng.standard_normal((64, 32, 32, 1)).astype(np.float32)
    outs = []
    for nt in (1, 2):
        cnet.manual_seed(0)
        m = nn.Conv2d(1, 6, 5)
        with cnet.threads(nt):
            y = m(x)
            m.backward(np.ones_like(y))
        outs.append((y, m.weight.grad.copy(), m.bias.grad.copy()))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_conv_direct_refuses_a_partial_second_vector(rng):
    x = np.zeros((1, 5, 5, 2), np.float32)
    w = np.zeros((3, 3, 2, 20), np.float32)
    y = np.zeros((1, 3, 3, 20), np.float32)
    with pytest.raises(ValueError, match="multiple of 16 or less"):
        _conv.conv_direct(x, w, None, y, 0, 1, 1, 1, 0, 0, 1, 1, 1)


@pytest.mark.parametrize("args,kwargs", [c for c in CASES if c[0][0] * c[0][2] <= 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_wgrad_matches_gemm_path(args, kwargs, dtype, rng):
    small = nn.Conv2d(*args, **kwargs).to(dtype)
    assert small._paths(dtype)[1] == "small"
    gemm = nn.Conv2d(*args, **kwargs).to(dtype)
    gemm.load_state_dict(small.state_dict())
    gemm._paths = lambda dt: ("im2col", "gemm", "col2im")
    x = rng.standard_normal((5, 11, 9, args[0])).astype(dtype)
    dy = rng.standard_normal(small(x).shape).astype(dtype)
    gemm(x)
    for _ in range(2):                        # the second backward accumulates
        small.backward(dy)
        gemm.backward(dy)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(small.weight.grad, gemm.weight.grad, rtol=tol, atol=tol)


def test_conv_small_wgrad_refuses_wide_rows():
    x = np.zeros((1, 6, 6, 2), np.float32)
    dy = np.zeros((1, 2, 2, 6), np.float32)
    gw = np.zeros((5, 5, 2, 6), np.float32)      # KW * C_in = 10 > 8
    with pytest.raises(ValueError, match="KW \\* C_in <= 8"):
        _conv.conv_small_wgrad(x, dy, gw, False, 0, 1, 1, 1, 0, 0, 1, 1, 1)


@pytest.mark.parametrize("args,kwargs", [((1, 6, 5), {}), ((3, 16, 3), dict(padding=1)),
                                         ((4, 8, 1), {}), ((6, 6, 3), dict(groups=6)),
                                         ((8, 12, 3), dict(stride=2, groups=2))],
                         ids=["small", "direct", "pointwise", "depthwise", "grouped"])
def test_fused_relu_equals_unfused(args, kwargs, rng):
    x = rng.standard_normal((4, 10, 10, args[0])).astype(np.float32)
    runs = []
    for fused in (True, False):
        cnet.manual_seed(0)
        conv = nn.Conv2d(*args, **kwargs)
        m = nn.Sequential(conv, nn.ReLU()) if fused else conv
        y = m(x)
        if not fused:
            y = np.maximum(y, 0)
            mask = y > 0
        dy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
        dx = m.backward(dy) if fused else conv.backward(dy * mask)
        runs.append((y, dx, conv.weight.grad.copy(), conv.bias.grad.copy()))
        assert conv._relu == fused
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_fused_relu_gradients_threads_and_eval(rng):
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU())
    check_gradients(m, rng.standard_normal((2, 6, 7, 2)))
    assert "fused_relu=True" in repr(m)
    x = rng.standard_normal((32, 16, 16, 2)).astype(np.float32)
    m.float()
    outs = []
    for nt in (1, 2):
        m.zero_grad()
        with cnet.threads(nt):
            y = m(x)
            outs.append((y, m.backward(np.ones_like(y)), m[0].weight.grad.copy()))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    m.eval()
    m(x)
    assert m[0]._y is None and m[0]._x is None
