"""Small-channel convolution paths (LeNet-5): C_out below one SIMD vector takes the
direct forward kernel with zero-padded weights and a partial store, and with
KW * C_in <= 8 the weight gradient blocked over a kernel row's (kw, c) pairs.
With one input channel, stride and dilation 1 along the width (and AVX-512),
both are the narrow kernels instead, whose vector lanes are pixels."""
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

# One input channel, C_out below a float32 vector, stride/dilation 1 along the width:
# the narrow kernels (_conv._narrow_fits) where the machine has AVX-512.  Widths
# past one and two vectors of pixels, padding on either side, channel passes of 6
# (C_out 10, 15), kernels wider than a tap block of 3 (KW 5, 7, 9).
NARROW_CASES = [((1, 6, 5), dict(padding=2)),
                ((1, 10, 3), dict(stride=(2, 1), padding=1, dilation=(2, 1))),
                ((1, 15, (2, 7)), dict(padding=(1, 3), bias=False)),
                ((1, 3, (3, 9)), dict(padding=(0, 4))),
                ((1, 7, 1), dict(padding=1))]

# Few input channels (KW * C_in more than one vector, within two; dilation 1 along
# the width): dx by conv_scatter_dx instead of col2im.  Kernel rows in blocks of 5
# (3 up to KH 3): KH 7 has a padded block; strides, padding past the edges,
# dilation along H.  float64 (8 lanes) takes the cases with 8 < KW * C_in <= 16.
SCATTER_CASES = [((6, 16, 5), {}),                                     # LeNet conv2
                 ((3, 8, 7), dict(stride=2, padding=3)),
                 ((4, 5, (1, 7)), dict(stride=(1, 3), padding=(0, 3), bias=False)),
                 ((10, 3, 3), dict(padding=2)),
                 ((3, 8, 3), dict(stride=2, padding=1)),
                 ((2, 20, 7), dict(padding=3, dilation=(2, 1)))]


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


@pytest.mark.parametrize("args,kwargs", CASES[:2] + NARROW_CASES[:1] + SCATTER_CASES[:2])
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


def narrow_runs(m, dtype):
    lanes = _conv.direct_lanes(np.dtype(dtype))
    return _conv._narrow_fits(m.in_channels, m.out_channels, m.kernel_size[1], m.stride[1],
                              m.dilation[1], m.groups, lanes, False)


@pytest.mark.parametrize("args,kwargs", NARROW_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [5, 19, 40])
def test_narrow_forward_and_weight_gradient_match_reference(args, kwargs, dtype, width, rng):
    m = nn.Conv2d(*args, **kwargs).to(dtype)
    assert narrow_runs(m, dtype) == (_conv._wide_vectors() and m.out_channels
                                     < _conv.direct_lanes(np.dtype(dtype)))
    x = rng.standard_normal((3, 9, width, 1)).astype(dtype)
    y = m(x)
    b = None if m.bias is None else m.bias.data
    ref = reference(x, m.weight.data, b, m.stride, m.padding, m.dilation)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
    # weight gradient: sum over pixels of the input window times dy (float64 loops)
    dy = rng.standard_normal(y.shape).astype(dtype)
    m.backward(dy)
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    oh, ow = y.shape[1:3]
    kh, kw = m.kernel_size
    gw = np.zeros(m.weight.data.shape)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            gw[i, j] = np.einsum("nhwc,nhwo->co", patch, dy.astype(np.float64))
    np.testing.assert_allclose(m.weight.grad, gw, rtol=tol, atol=tol * 10)
    if m.bias is not None:
        np.testing.assert_allclose(m.bias.grad, dy.astype(np.float64).sum(axis=(0, 1, 2)),
                                   rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("args,kwargs", NARROW_CASES[:3])
def test_narrow_gradients(args, kwargs, rng):
    m = nn.Conv2d(*args, **kwargs)
    check_gradients(m, rng.standard_normal((2, 7, 11, 1)))


@pytest.mark.parametrize("args,kwargs", NARROW_CASES)
def test_narrow_equals_the_row_block_kernels(args, kwargs, rng):
    """The narrow kernels against the 8 x 1 row blocks and the small / GEMM weight
    gradient (two-vector blocks switched off), float32, two threads and one."""
    x = rng.standard_normal((16, 12, 30, 1)).astype(np.float32)
    runs = []
    for wide in (True, False):
        previous = _conv._wide_vectors(wide)
        try:
            for nt in (1, 2):
                cnet.manual_seed(0)
                m = nn.Conv2d(*args, **kwargs)
                with cnet.threads(nt):
                    y = m(x)
                    m.backward(np.cos(y))
                runs.append((wide, nt, y, m.weight.grad.copy()))
        finally:
            _conv._wide_vectors(previous)
    for one, two in (runs[0:2], runs[2:4]):         # bitwise for any thread count
        np.testing.assert_array_equal(two[2], one[2])
        np.testing.assert_array_equal(two[3], one[3])
    np.testing.assert_allclose(runs[2][2], runs[0][2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[2][3], runs[0][3], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 6, 15, 16, 40])
@pytest.mark.parametrize("rows", [7, 16, 1000, 4099])
def test_bias_grad_matches_float64_sum(channels, rows, rng):
    """bias_grad (flat runs of 16 rows below 16 channels) against numpy's float64 sum,
    added to what the gradient held, and bitwise the same on 1 and 2 threads."""
    dy = rng.standard_normal((rows, channels)).astype(np.float32)
    start = rng.standard_normal(channels).astype(np.float32)
    got = []
    for nt in (1, 2):
        db = start.copy()
        _conv.bias_grad(dy, db, nt)
        got.append(db)
    np.testing.assert_array_equal(got[0], got[1])
    want = start.astype(np.float64) + dy.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 6, 16, 40])
@pytest.mark.parametrize("rows", [7, 1000, 4099])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_grad_with_the_relu_mask_in_the_same_pass(channels, rows, dtype, rng):
    """bias_grad(dy, db, nt, y, masked): masked as _elementwise.relu_backward (0 where
    y <= 0, a NaN y passes dy) and db as bias_grad of it, bitwise, on 1 and 2 threads."""
    from cnet_ext import _elementwise
    dy = rng.standard_normal((rows, channels)).astype(dtype)
    y = rng.standard_normal((rows, channels)).astype(dtype)
    y[::5] = 0.0
    y[1, 0] = np.nan
    want_masked = np.empty_like(dy)
    _elementwise.relu_backward(dy, y, want_masked, 1)
    assert want_masked[1, 0] == dy[1, 0] and not want_masked[0].any()
    start = rng.standard_normal(channels).astype(dtype)
    want_db = start.copy()
    _conv.bias_grad(want_masked, want_db, 1)
    for nt in (1, 2):
        masked, db = np.full_like(dy, 7), start.copy()
        _conv.bias_grad(dy, db, nt, y, masked)
        np.testing.assert_array_equal(masked, want_masked)
        np.testing.assert_array_equal(db, want_db)
    with pytest.raises(ValueError, match="both y and masked"):
        _conv.bias_grad(dy, db, 1, y)
    with pytest.raises(ValueError, match="must match the gradient's shape"):
        _conv.bias_grad(dy, db, 1, y[:-1], masked[:-1])


@pytest.mark.parametrize("args,kwargs", SCATTER_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_dx_matches_col2im(args, kwargs, dtype, rng, monkeypatch):
    x = rng.standard_normal((5, 11, 13, args[0])).astype(dtype)
    runs = []
    for scatter in (True, False):
        with monkeypatch.context() as patch:
            if not scatter:
                patch.setattr(_conv, "scatter_dx_fits", lambda *a: False)
            cnet.manual_seed(0)
            m = nn.Conv2d(*args, **kwargs).to(dtype)
            y = m(x)
            assert (m._ws["paths"][2] == "scatter") == (
                scatter and _conv._wide_vectors()
                and 1 < m.kernel_size[1] * args[0] / _conv.direct_lanes(np.dtype(dtype)) <= 2)
            runs.append(m.backward(np.sin(y)))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(runs[0], runs[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("args,kwargs", SCATTER_CASES[4:])      # scattered in float64
def test_scatter_dx_gradients(args, kwargs, rng):
    m = nn.Conv2d(*args, **kwargs).double()
    x = rng.standard_normal((2, 9, 10, args[0]))
    m(x)
    assert m._ws["paths"][2] == ("scatter" if _conv._wide_vectors() else "col2im")
    check_gradients(m, x, check_params=False)


def _dx_on_one_and_two_threads(m, x):
    """m's input gradient for dy = cos(y) on 1 and 2 threads, and that dy."""
    dxs = []
    for nt in (1, 2):
        with cnet.threads(nt):
            dy = np.cos(m(x))
            dxs.append(m.backward(dy))
    return dxs, dy


@pytest.mark.parametrize("args,kwargs", SCATTER_CASES[:4])      # scattered in float32
def test_scatter_dx_threads_identical(args, kwargs, rng):
    m = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((32, 14, 14, args[0])).astype(np.float32)
    dxs, _ = _dx_on_one_and_two_threads(m, x)
    np.testing.assert_array_equal(dxs[0], dxs[1])


def test_conv_scatter_dx_errors():
    dy = np.zeros((2, 6, 6, 4), np.float32)
    dx = np.zeros((2, 10, 10, 6), np.float32)
    w = np.zeros((5, 5, 6, 4), np.float32)
    if not _conv._wide_vectors():
        pytest.skip("conv_scatter_dx needs AVX-512")
    with pytest.raises(ValueError, match="scatter_weight of a 5x5 kernel"):
        _conv.conv_scatter_dx(dy, np.zeros((5, 4, 30), np.float32), dx, 0, 2, 5, 5,
                              1, 1, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):     # 7 * 6 > 32
        _conv.conv_scatter_dx(dy, _conv.scatter_weight(w), np.zeros((2, 12, 12, 6),
                              np.float32), 0, 2, 5, 7, 1, 1, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="output size"):
        _conv.conv_scatter_dx(dy, _conv.scatter_weight(w), dx, 0, 2, 5, 5, 1, 1, 1, 0,
                              1, 1, 1)
    # the same dx inside conv_direct_backward (LeNet's conv2: direct weight gradient)
    x = np.zeros((2, 10, 10, 6), np.float32)
    dy16 = np.zeros((2, 6, 6, 16), np.float32)
    slots = np.zeros((2, 5, 5, 6, 16), np.float32)
    w16 = np.zeros((5, 5, 6, 16), np.float32)
    with pytest.raises(ValueError, match="wscatter without dx"):
        _conv.conv_direct_backward(x, dy16, slots, [(0, 1), (1, 2)], 2, 1, 1, 0, 0, 1, 1, 1,
                                   wscatter=_conv.scatter_weight(w16))
    with pytest.raises(ValueError, match="is not scatter_weight"):
        _conv.conv_direct_backward(x, dy16, slots, [(0, 1), (1, 2)], 2, 1, 1, 0, 0, 1, 1, 1,
                                   dx=np.zeros_like(x), wscatter=_conv.scatter_weight(w))


def test_direct_backward_scatter_and_narrow_equal_the_chunk_kernels(rng):
    """conv_direct_backward's scatter dx and narrow weight gradient (one parallel region)
    against conv_scatter_dx / conv_small_wgrad called chunk by chunk: bitwise."""
    if not _conv._wide_vectors():
        pytest.skip("the scatter and narrow kernels need AVX-512")
    chunks = [(0, 3), (3, 5), (5, 8), (8, 10)]
    for dtype in (np.float32, np.float64):
        for c, cout, k, pad in [(6, 16, 5, 0), (1, 6, 5, 2)]:
            if c > 1 and not _conv.scatter_dx_fits(c, k, 1, 1, dtype):
                continue
            x = rng.standard_normal((10, 12, 12, c)).astype(dtype)
            oh = 12 + 2 * pad - k + 1
            dy = rng.standard_normal((10, oh, oh, cout)).astype(dtype)
            w = rng.standard_normal((k, k, c, cout)).astype(dtype)
            slots = np.full((2, k, k, c, cout), np.nan, dtype)
            dx = np.full_like(x, np.nan) if c > 1 else None
            _conv.conv_direct_backward(x, dy, slots, chunks, 2, 1, 1, pad, pad, 1, 1, 2,
                                       dx=dx, wscatter=_conv.scatter_weight(w) if c > 1 else None)
            for s, part in enumerate((chunks[:2], chunks[2:])):
                want = np.zeros((k, k, c, cout), dtype)
                for i, (n0, n1) in enumerate(part):
                    if c == 1:
                        _conv.conv_small_wgrad(x, dy, want, i > 0, n0, n1, 1, 1, pad, pad,
                                               1, 1, 1)
                    else:
                        _conv.conv_direct_wgrad(x, dy, want, i > 0, n0, n1, 1, 1, pad, pad,
                                                1, 1, 1)
                np.testing.assert_array_equal(slots[s], want)
            if dx is not None:
                want_dx = np.full_like(x, np.nan)
                for n0, n1 in chunks:
                    _conv.conv_scatter_dx(dy, _conv.scatter_weight(w), want_dx, n0, n1, k, k,
                                          1, 1, pad, pad, 1, 1, 1)
                np.testing.assert_array_equal(dx, want_dx)


# A narrow first layer (no input gradient) takes its ReLU mask, its bias sums and,
# with a max pool after it, the pool's gradient gather into its planar pass
# (Conv2d.backward_through_pool): conv, pool, ReLU-or-not and their geometries.
IN_KERNEL_CASES = [((1, 6, 5), {}, (2,), True),                          # LeNet conv1
                   ((1, 6, 5), dict(padding=2), (3, 2, 1), True),          # overlapping, padded
                   ((1, 10, 3), dict(stride=(2, 1), padding=1), (2,), True),
                   ((1, 15, (2, 7)), dict(padding=(1, 3), bias=False), (2,), True),
                   ((1, 7, 3), {}, dict(kernel_size=2, ceil_mode=True), True),
                   ((1, 6, 3), dict(padding=1), (2,), False),              # no ReLU
                   ((1, 6, 5), {}, None, True)]                            # ReLU, no pool


@pytest.mark.parametrize("args,kwargs,pool,relu", IN_KERNEL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_backward_in_kernel_matches_separate_passes(args, kwargs, pool, relu, dtype, rng,
                                                           monkeypatch):
    layers = [nn.Conv2d(*args, **kwargs)] + ([nn.ReLU()] if relu else [])
    if pool is not None:
        layers.append(nn.MaxPool2d(**pool) if isinstance(pool, dict) else nn.MaxPool2d(*pool))
    m = nn.Sequential(*layers).to(dtype)
    m.requires_input_grad_(False)
    x = rng.standard_normal((11, 13, 23, 1)).astype(dtype)
    x[:, :, :4] = np.abs(x[:, :, :4])         # some windows all positive, some clipped
    y = m(x)
    assert m[0]._narrow_backward(x) == narrow_runs(m[0], dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)

    def grads(threads):
        m.zero_grad()
        with cnet.threads(threads):
            m(x)
            assert m.backward(dy) is None
        return m[0].weight.grad.copy(), None if m[0].bias is None else m[0].bias.grad.copy()

    fused = [grads(1), grads(2)]
    with monkeypatch.context() as patch:        # the separate passes (pool, mask, sums)
        patch.setattr(nn.Conv2d, "_narrow_backward", lambda self, x: False)
        separate = grads(2)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for wgrad, bgrad in fused:
        np.testing.assert_array_equal(wgrad, fused[0][0])       # any thread count: same bits
        np.testing.assert_array_equal(wgrad, separate[0])        # same planar values and order
        if bgrad is not None:
            np.testing.assert_array_equal(bgrad, fused[0][1])
            np.testing.assert_allclose(bgrad, separate[1], rtol=tol, atol=tol)


def test_conv_direct_backward_gradient_sources_refused(rng):
    x = rng.standard_normal((4, 12, 12, 1)).astype(np.float32)
    dy = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
    slots = np.zeros((2, 5, 5, 1, 6), np.float32)
    geom = (1, 1, 0, 0, 1, 1)
    chunks = [(0, 2), (2, 4)]
    if not _conv._narrow_fits(1, 6, 5, 1, 1, 1, _conv.direct_lanes(np.dtype(np.float32)), False):
        pytest.skip("the narrow kernels need AVX-512")
    sums = np.zeros((2, 6))
    with pytest.raises(ValueError, match="relu_y of shape"):
        _conv.conv_direct_backward(x, dy, slots, chunks, 2, *geom, 1, relu_y=dy[:, :7].copy())
    with pytest.raises(ValueError, match="bias_sums of shape"):
        _conv.conv_direct_backward(x, dy, slots, chunks, 2, *geom, 1, bias_sums=sums[:, :5].copy())
    with pytest.raises(ValueError, match="pool is"):
        _conv.conv_direct_backward(x, None, slots, chunks, 2, *geom, 1, pool=(dy,))
    g = rng.standard_normal((4, 4, 4, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        _conv.conv_direct_backward(x, None, slots, chunks, 2, *geom, 1,
                                   pool=(g, np.zeros((4, 4, 3, 6), np.int32), 2, 2, 2, 2, 0, 0,
                                         1, 1))
    with pytest.raises(ValueError, match="no output gradient"):
        _conv.conv_direct_backward(x, None, slots, chunks, 2, *geom, 1)
    with pytest.raises(ValueError, match="without dx"):
        _conv.conv_direct_backward(x, dy, slots, chunks, 2, *geom, 1, 1,
                                   np.zeros_like(x), _conv.flip_weight(
                                       np.zeros((5, 5, 1, 6), np.float32), 1, 1), relu_y=dy)


# A first layer's input gradient (1-4 inputs, stride 1, at most 32 outputs, padding
# below the kernel; AVX-512): conv_planar_dx.  Rows of 1 to 3 two-vector segments
# with a partial last one, one and two output planes in a pass of U, 1xK and Kx1
# kernels, padding 0 to K-1 on either axis.
PLANAR_CASES = [((1, 6, 5), {}),                                     # LeNet conv1
                ((3, 16, 3), dict(padding=1, bias=False)),           # ResNet-20 conv1
                ((2, 7, (1, 4)), dict(padding=(0, 3))),
                ((4, 32, (3, 1)), dict(padding=(2, 0), bias=False)),
                ((3, 1, 7), dict(padding=3)),
                ((1, 2, (2, 3)), dict(padding=(1, 2)))]


def planar_dx_reference(dy, w, x_shape, padding):
    """dL/dx of a stride-1 convolution in float64, by its definition: each output
    pixel's dy times the kernel, added onto the input window (padding cut off)."""
    n, h, wd, c = x_shape
    kh, kw = w.shape[:2]
    ph, pw = padding
    oh, ow = dy.shape[1:3]
    dxp = np.zeros((n, h + 2 * ph, wd + 2 * pw, c))
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + oh, j:j + ow] += dy.astype(np.float64) @ w[i, j].astype(np.float64).T
    return dxp[:, ph:ph + h, pw:pw + wd]


def _needs_planar():
    if not _conv._wide_vectors():
        pytest.skip("conv_planar_dx needs AVX-512")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planar_dx_matches_reference(dtype, rng):
    _needs_planar()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for c, cout, kh, kw, ph, pw, h, wd in [(1, 6, 5, 5, 0, 0, 32, 32), (3, 16, 3, 3, 1, 1, 9, 37),
                                           (2, 5, 3, 4, 2, 1, 7, 65), (4, 32, 3, 3, 0, 2, 5, 3),
                                           (3, 17, 1, 7, 0, 3, 6, 40), (1, 1, 2, 2, 1, 0, 4, 1)]:
        w = rng.standard_normal((kh, kw, c, cout)).astype(dtype)
        x_shape = (5, h, wd, c)
        dy = rng.standard_normal((5, h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1, cout)).astype(dtype)
        want = planar_dx_reference(dy, w, x_shape, (ph, pw))
        for n0, n1 in [(0, 5), (1, 4)]:
            for threads in (1, 2):
                dx = np.full(x_shape, 7, dtype)
                _conv.conv_planar_dx(dy, _conv.planar_weight(w), dx, n0, n1, ph, pw, threads)
                np.testing.assert_allclose(dx[n0:n1], want[n0:n1], rtol=tol, atol=tol,
                                           err_msg=str((c, cout, kh, kw, ph, pw, h, wd)))
                assert (dx[:n0] == 7).all() and (dx[n1:] == 7).all()   # other images untouched


@pytest.mark.parametrize("args,kwargs", PLANAR_CASES)
def test_planar_dx_gradients(args, kwargs, rng):
    m = nn.Conv2d(*args, **kwargs).double()
    x = rng.standard_normal((3, 8, 11, args[0]))
    m(x)
    if _conv._wide_vectors():
        assert m._ws["paths"][2] == "planar"
    check_gradients(m, x, check_params=False)


@pytest.mark.parametrize("args,kwargs", PLANAR_CASES[:4])
def test_planar_dx_torch_parity_and_threads(args, kwargs, rng):
    pytest.importorskip("torch")
    m = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((16, 13, 35, args[0])).astype(np.float32)
    dxs, dy = _dx_on_one_and_two_threads(m, x)
    np.testing.assert_array_equal(dxs[0], dxs[1])
    _, tdx, _, _ = torch_conv_grads(m, x, dy)
    np.testing.assert_allclose(dxs[0], tdx, rtol=1e-4, atol=1e-5)


def test_planar_dx_fits_and_errors():
    fits = _conv.planar_dx_fits
    assert fits(1, 6, 5, 5, (1, 1), (0, 0), (1, 1), 1) == _conv._wide_vectors()
    assert not fits(5, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1)      # 5 inputs
    assert not fits(3, 33, 3, 3, (1, 1), (1, 1), (1, 1), 1)     # 33 outputs
    assert not fits(3, 16, 3, 3, (2, 2), (1, 1), (1, 1), 1)     # strided
    assert not fits(3, 16, 3, 3, (1, 1), (1, 1), (2, 2), 1)     # dilated
    assert not fits(4, 16, 3, 3, (1, 1), (1, 1), (1, 1), 2)     # grouped
    assert not fits(3, 16, 3, 3, (1, 1), (3, 1), (1, 1), 1)     # padding >= kernel
    _needs_planar()
    w = np.zeros((3, 3, 2, 4), np.float32)
    dy = np.zeros((2, 6, 6, 4), np.float32)
    dx = np.zeros((2, 6, 6, 2), np.float32)
    wt = _conv.planar_weight(w)
    with pytest.raises(ValueError, match="does not fit the planar dx"):
        _conv.conv_planar_dx(dy, wt, dx, 0, 2, 3, 1, 1)
    with pytest.raises(ValueError, match="is not planar_weight of a layer with 3 input"):
        _conv.conv_planar_dx(dy, wt, np.zeros((2, 6, 6, 3), np.float32), 0, 2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"dy \(2, 6, 6, 4\) is not the output"):
        _conv.conv_planar_dx(dy, wt, dx, 0, 2, 0, 1, 1)
    with pytest.raises(ValueError, match=r"images \[1, 3\) of 2"):
        _conv.conv_planar_dx(dy, wt, dx, 1, 3, 1, 1, 1)
