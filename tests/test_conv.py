"""Conv2d and Linear: gradients, an independent numpy reference, torch parity,
thread-count determinism, the 1x1 fast path, chunking and bad inputs."""
import math

import numpy as np
import pytest

import cnet
from cnet import nn
from cnet.nn import conv as conv_mod
from helpers import check_gradients, spy_gemm_accumulate, torch_conv_grads



@pytest.fixture(autouse=True, params=["image blocks", "row blocks"])
def direct_blocking(request, monkeypatch):
    """Every test twice: "image blocks" puts small maps (most configs here) on the
    image-blocked direct kernels whatever the batch (the layers choose them by how
    well the batch fills a block: Conv2d._image_blocks_fill; these batches of 2-3
    images would mostly not), "row blocks" switches them off, so the row kernels
    and the im2col paths they replace stay covered."""
    if request.param == "row blocks":
        monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)
    else:
        monkeypatch.setattr(conv_mod.Conv2d, "_image_blocks_fill", lambda self, *shape: True)
    return request.param


# (in, out, kernel, stride, padding, dilation, groups, bias, input (N, H, W))
CONFIGS = {
    "1x1": (4, 6, 1, 1, 0, 1, 1, True, (2, 5, 6)),
    "1x1-stride2": (4, 6, 1, 2, 0, 1, 1, False, (2, 7, 6)),
    "1x1-groups2": (4, 6, 1, 1, 0, 1, 2, True, (2, 4, 5)),
    "3x3-pad1": (3, 5, 3, 1, 1, 1, 1, True, (2, 6, 7)),
    "3x3-stride2-pad1": (4, 6, 3, 2, 1, 1, 1, True, (2, 7, 8)),
    "3x3-nopad": (3, 4, 3, 1, 0, 1, 1, False, (2, 6, 5)),
    "5x5-pad2": (3, 4, 5, 1, 2, 1, 1, True, (2, 7, 6)),
    "7x7-stride2-pad3": (3, 4, 7, 2, 3, 1, 1, True, (2, 9, 10)),
    "3x3-dil2-pad2": (3, 4, 3, 1, 2, 2, 1, True, (2, 7, 7)),
    "3x3-stride3-dil2-pad1": (3, 5, 3, 3, 1, 2, 1, True, (2, 9, 8)),
    "3x3-groups2": (4, 6, 3, 1, 1, 1, 2, True, (2, 6, 6)),
    "depthwise": (4, 4, 3, 1, 1, 1, 4, True, (2, 6, 5)),
    "depthwise-x2-stride2": (3, 6, 3, 2, 1, 1, 3, False, (2, 7, 7)),   # multiplier 2: GEMM
    "depthwise-5x5-stride2-dil2": (6, 6, 5, 2, 4, 2, 6, True, (2, 9, 10)),
    "depthwise-1x1": (5, 5, 1, 1, 0, 1, 5, True, (2, 4, 3)),
    # channels in whole vectors: the register-blocked depthwise forward
    "depthwise-vector": (16, 16, 3, 1, 1, 1, 16, True, (2, 6, 11)),
    "depthwise-vector-stride2-dil2": (32, 32, 3, 2, 2, 2, 32, False, (2, 9, 10)),
    "nonsquare": (3, 4, (3, 1), (2, 1), (1, 0), 1, 1, True, (2, 7, 5)),
    "nonsquare-all": (4, 4, (1, 3), (1, 2), (0, 2), (1, 2), 2, True, (2, 5, 9)),
    # Channel counts in whole vectors: the direct kernel (forward, and the input
    # gradient at stride 1) instead of im2col + GEMM.
    "direct-3x3": (16, 16, 3, 1, 1, 1, 1, True, (2, 6, 7)),
    "direct-1x1": (16, 32, 1, 1, 0, 1, 1, True, (2, 5, 4)),
    "direct-odd-vector-count": (8, 24, 3, 1, 1, 1, 1, True, (2, 5, 6)),   # float64: 3 vectors
    "direct-stem-stride2": (3, 16, 3, 2, 1, 1, 1, True, (2, 9, 8)),
    "direct-5x5-dil2": (16, 32, 5, 1, 3, 2, 1, False, (2, 9, 8)),
    "direct-nonsquare": (8, 16, (3, 1), 1, (1, 0), 1, 1, True, (2, 5, 4)),
    "direct-pad-exceeds-kernel": (16, 16, 3, 1, 3, 1, 1, True, (1, 4, 5)),
    # grouped, whole vectors per group: the direct kernels per group (ResNeXt)
    "direct-groups2": (32, 32, 3, 1, 1, 1, 2, True, (2, 6, 7)),
    "direct-groups4-stride2": (32, 64, 3, 2, 1, 1, 4, False, (2, 7, 6)),
    "direct-groups2-1x1": (32, 32, 1, 1, 0, 1, 2, True, (2, 3, 5)),
    # im2col + GEMM (20 outputs: not whole vectors); by regions when allowed
    "gemm-3x3-pad1": (12, 20, 3, 1, 1, 1, 1, True, (2, 4, 5)),
    "gemm-3x3-stride2": (12, 20, 3, 2, 1, 1, 1, False, (2, 5, 6)),
    "gemm-5x5-pad2": (8, 20, 5, 1, 2, 1, 1, True, (2, 3, 6)),
    "gemm-nonsquare": (8, 20, (3, 1), (2, 1), (1, 0), 1, 1, True, (2, 7, 3)),
}


def make(cfg):
    cin, cout, k, s, p, d, g, b, _ = cfg
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=b)


def make_input(cfg, rng, dtype=np.float32):
    n, h, w = cfg[-1]
    return rng.standard_normal((n, h, w, cfg[0])).astype(dtype)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def reference_conv(x, w, b, stride, padding, dilation, groups):
    """Direct convolution on the zero-padded input, one einsum per kernel tap."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, h, wd, c = x.shape
    kh, kw, cg, cout = w.shape
    cog = cout // groups
    xp = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), x.dtype)
    xp[:, ph:ph + h, pw:pw + wd] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, oh, ow, cout), x.dtype)
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                           j * dw:j * dw + sw * (ow - 1) + 1:sw, g * cg:(g + 1) * cg]
                y[..., g * cog:(g + 1) * cog] += np.einsum(
                    "nhwc,co->nhwo", patch, w[i, j, :, g * cog:(g + 1) * cog])
    if b is not None:
        y += b
    return y


# -- forward against the numpy reference, gradients by finite differences --------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy_reference(name, rng):
    cfg = CONFIGS[name]
    m = make(cfg).double()
    x = make_input(cfg, rng, np.float64)
    y = m(x)
    ref = reference_conv(x, m.weight.data, None if m.bias is None else m.bias.data,
                         m.stride, m.padding, m.dilation, m.groups)
    assert y.shape == ref.shape == m.output_shape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_finite_differences(name, rng):
    cfg = CONFIGS[name]
    check_gradients(make(cfg), make_input(cfg, rng, np.float64), max_checks=60)


@pytest.mark.parametrize("cfg", [(3, 4, 3, 2, 1, 1, 1, True, (4, 6, 5)),      # im2col + GEMM
                                 (8, 16, 3, 1, 1, 1, 1, True, (4, 6, 5)),     # direct kernels
                                 (8, 8, 3, 2, 1, 1, 8, True, (4, 7, 6))])     # depthwise
def test_chunked_batch_matches_reference_and_gradients(cfg, rng, monkeypatch):
    # Budgets of one byte force one chunk per image (and several stripes in backward).
    monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_mod, "_KERNEL_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)    # chunks of one image
    m = make(cfg).double()
    x = make_input(cfg, rng, np.float64)
    y = m(x)
    assert m._ws["chunk"] == 1 and m._ws["stripes"] == 4
    ref = reference_conv(x, m.weight.data, m.bias.data, m.stride, m.padding, m.dilation,
                         m.groups)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    check_gradients(m, x, max_checks=60)


@pytest.mark.parametrize("cores", [1, 2, 3, 4])
def test_chunk_plan_is_balanced(cores, monkeypatch):
    monkeypatch.setattr(conv_mod, "_MIN_TASKS", cores)
    unit = max(cores, conv_mod._STRIPES - conv_mod._STRIPES % cores)
    monkeypatch.setattr(conv_mod, "_STRIPE_UNIT", unit)
    for n in range(1, 70):
        for wanted in range(1, n + 3):
            k = conv_mod._balanced_chunks(n, wanted)
            assert min(n, max(wanted, cores)) <= k <= n
            if k < n:                       # whole rounds for the cores (and the stripes)
                assert k % (unit if k > unit else cores) == 0
            sizes = np.diff([t * n // k for t in range(k + 1)])
            assert sizes.sum() == n and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
            if n % k:       # unequal: no allowed count up to 1.5x would have been equal
                assert not [j for j in range(k + 1, min(n, k * 3 // 2) + 1)
                            if n % j == 0 and j % (unit if j > unit else cores) == 0]
            for weight_bytes in (4, 1 << 20, conv_mod._STRIPE_BYTES // 3, 1 << 30):
                s = conv_mod._stripes(k, weight_bytes)
                assert k % s == 0 and s <= unit
                assert s == 1 or s * weight_bytes <= conv_mod._STRIPE_BYTES
                if k % cores == 0 and cores * weight_bytes <= conv_mod._STRIPE_BYTES:
                    assert s % cores == 0


@pytest.mark.parametrize("cfg", [(3, 4, 3, 2, 1, 1, 1, True, (7, 6, 5)),      # im2col + GEMM
                                 (8, 16, 3, 1, 1, 1, 1, True, (7, 6, 5))])    # direct kernels
def test_unequal_chunks_match_reference_and_gradients(cfg, rng, monkeypatch):
    # 7 images in 4 chunks of 1, 2, 2, 2 and 2 stripes of 2 chunks.
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)
    monkeypatch.setattr(conv_mod, "_MIN_TASKS", 2)
    monkeypatch.setattr(conv_mod, "_STRIPE_UNIT", 2)
    m = make(cfg).double()
    oh, ow, _ = m.output_shape((1,) + cfg[-1][1:] + (cfg[0],))[1:]
    per_image = oh * ow * 9 * cfg[0] * 8
    monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 3 * per_image)
    monkeypatch.setattr(conv_mod, "_KERNEL_CHUNK_BYTES", 3 * per_image)
    x = make_input(cfg, rng, np.float64)
    y = m(x)
    assert (m._ws["n_chunks"], m._ws["chunk"], m._ws["stripes"]) == (4, 2, 2)
    ref = reference_conv(x, m.weight.data, m.bias.data, m.stride, m.padding, m.dilation,
                         m.groups)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    check_gradients(m, x, max_checks=60)


def no_scatter(monkeypatch):
    """Layers with few inputs take col2im for dx instead of conv_scatter_dx."""
    monkeypatch.setattr(conv_mod._conv, "scatter_dx_fits", lambda *args: False)


# -- torch parity (float32) ---------------------------------------------------------

def _close(a, b, what):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * scale, err_msg=what)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_parity(name, rng):
    pytest.importorskip("torch")
    cfg = CONFIGS[name]
    _check_torch_parity(make(cfg), make_input(cfg, rng), rng)


def _check_torch_parity(m, x, rng):
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = m.backward(dy)
    ty, tdx, tdw, tdb = torch_conv_grads(m, x, dy)
    _close(y, ty, "output")
    _close(dx, tdx, "input gradient")
    _close(m.weight.grad, tdw, "weight gradient")
    if m.bias is not None:
        _close(m.bias.grad, tdb, "bias gradient")


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("gemm-")])
def test_torch_parity_region_path(name, rng, monkeypatch):
    monkeypatch.setattr(conv_mod, "_REGION_MIN_ROWS", 0)    # regions at any batch size
    no_scatter(monkeypatch)                                 # (few inputs: scatter dx)
    cfg = CONFIGS[name]
    m = make(cfg)
    m(make_input(cfg, rng))
    assert m._ws["regions"] is not None
    test_torch_parity(name, rng)


# -- image-blocked direct kernels ----------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_image_blocks_match_row_blocks_bitwise(dtype, rng):
    from cnet_ext import _conv
    lanes = _conv.direct_lanes(np.dtype(dtype))
    # (N, H, W, C_in, C_out, k, stride, pad, dilation, groups); C_out < lanes: one
    # partial vector; batches that leave a partial image block
    for n, h, w, c, cout, k, st, pad, dil, g in [
            (13, 4, 4, 32, 4 * lanes, 3, 1, 1, 1, 1), (9, 2, 2, 16, 2 * lanes, 3, 1, 1, 1, 1),
            (5, 7, 5, 8, lanes, 3, 2, 1, 1, 1), (10, 6, 6, 16, 2 * lanes, 3, 1, 2, 2, 2),
            (3, 5, 5, 4, 6, 3, 1, 1, 1, 1), (11, 3, 3, 16, lanes, 5, 1, 2, 1, 1),
            (6, 4, 6, 32, 4 * lanes, 3, 2, 0, 1, 2), (4, 5, 4, 8, 3 * lanes, (2, 3), 1, 1, 1, 1)]:
        kh, kw = pair(k)
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
        wt = rng.standard_normal((kh, kw, c // g, cout)).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype)
        oh = (h + 2 * pad - dil * (kh - 1) - 1) // st + 1
        ow = (w + 2 * pad - dil * (kw - 1) - 1) // st + 1
        packable = (cout // g) % lanes == 0
        for n0, n1 in [(0, n), (1, n - 1)]:
            for threads in (1, 2):
                rows = np.full((n, oh, ow, cout), 7, dtype)
                images, packed = rows.copy(), rows.copy()
                args = (n0, n1, st, st, pad, pad, dil, dil, threads, g)
                _conv.conv_direct(x, wt, b, rows, *args)
                _conv.conv_direct(x, wt, b, images, *args, True)
                np.testing.assert_array_equal(images, rows)     # untouched outside [n0, n1)
                if packable:
                    blocks = _conv.direct_weight_blocks(wt, g, threads)
                    _conv.conv_direct(x, None, b, packed, *args, True, blocks)
                    np.testing.assert_array_equal(packed, rows)
                # chunks on the team (image-block aligned), and the fused ReLU
                block = _conv.direct_image_block(np.dtype(dtype))
                cut = min(n1, n0 + block)
                chunks = [(n0, cut), (cut, n1)] if cut < n1 else [(n0, n1)]
                relu = np.where(rows < 0, 0, rows)
                relu[:n0], relu[n1:] = 7, 7
                for by_images in (False, True):
                    for fused in (False, True):
                        out = np.full_like(rows, 7)
                        _conv.conv_direct(x, wt, b, out, *args, by_images, None, chunks, fused)
                        np.testing.assert_array_equal(out, relu if fused else rows)
    assert np.array_equal(images[0], np.full_like(images[0], 7))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_staging_matches_in_place_bitwise(dtype, rng):
    """Grouped direct layers copy each image (forward) or chunk (weight gradient)
    into per-group planes (_direct_group_image, _stage_group_planes); the same
    products in the same order as reading the strided slices in place, and both
    as the numpy references."""
    from cnet_ext import _conv
    lanes = _conv.direct_lanes(np.dtype(dtype))
    # (N, H, W, C_in/G, C_out/G in vectors, k, stride, pad, dilation, groups): widths
    # that leave partial pixel blocks, padding wider than the kernel, 1x1
    for n, h, w, cg, vout, k, st, pad, dil, g in [
            (3, 6, 11, 16, 1, 3, 1, 1, 1, 8), (4, 7, 9, 8, 2, 3, 2, 1, 1, 4),
            (2, 9, 10, 4, 1, (3, 5), 1, (1, 3), 2, 2), (3, 5, 6, 16, 1, 1, 1, 0, 1, 4),
            (2, 4, 5, 3, 4, 3, 1, 3, 1, 2)]:
        kh, kw = pair(k)
        cout = vout * lanes * g
        x = rng.standard_normal((n, h, w, cg * g)).astype(dtype)
        wt = rng.standard_normal((kh, kw, cg, cout)).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype)
        want = reference_conv(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64),
                              st, pad, dil, g)
        for n0, n1 in [(0, n), (1, n)]:
            for threads in (1, 2):
                args = (n0, n1) + pair(st) + pair(pad) + pair(dil) + (threads, g)
                outs = []
                for staged in (True, False):
                    previous = _conv._stage_groups(staged)
                    try:
                        for relu in (False, True):
                            out = np.full((n,) + want.shape[1:], 7, dtype)
                            _conv.conv_direct(x, wt, b, out, *args, False, None, None, relu)
                            outs.append(out)
                    finally:
                        _conv._stage_groups(previous)
                np.testing.assert_array_equal(outs[0], outs[2])
                np.testing.assert_array_equal(outs[1], outs[3])
                assert np.all(outs[0][:n0] == 7)
                np.testing.assert_allclose(outs[0][n0:], want[n0:],
                                           rtol=1e-4 if dtype == np.float32 else 1e-10,
                                           atol=1e-4 if dtype == np.float32 else 1e-10)
                np.testing.assert_array_equal(outs[1], np.where(outs[0] < 0, 0, outs[0]))
                # the weight gradient stages the chunk's x and dy (one copy for all taps)
                dy = rng.standard_normal(want.shape).astype(dtype)
                gws = []
                for staged in (True, False):
                    previous = _conv._stage_groups(staged)
                    try:
                        for accumulate in (False, True):
                            gw = np.full((kh, kw, cg, cout), 0.5, dtype)
                            _conv.conv_direct_wgrad(x, dy, gw, accumulate, *args)
                            gws.append(gw)
                    finally:
                        _conv._stage_groups(previous)
                np.testing.assert_array_equal(gws[0], gws[2])
                np.testing.assert_array_equal(gws[1], gws[3])
                np.testing.assert_allclose(gws[1], gws[0] + 0.5,
                                           rtol=1e-5 if dtype == np.float32 else 1e-12)
                ref = reference_wgrad(x[n0:n1].astype(np.float64),
                                      dy[n0:n1].astype(np.float64), (kh, kw), st, pad, dil, g)
                np.testing.assert_allclose(gws[0], ref, rtol=1e-4 if dtype == np.float32 else 1e-10,
                                           atol=1e-3 if dtype == np.float32 else 1e-10)
        if st == 1 and cg % lanes == 0:
            # the input gradient (a grouped convolution of dy with the flipped kernel)
            # given the flipped kernel's packed blocks stages dy the same way
            dy = rng.standard_normal(want.shape).astype(dtype)
            slots = np.empty((2, kh, kw, cg, cout), dtype)
            dxs = []
            for blocked in (True, False):
                dx = np.full_like(x, np.nan)
                flipped = _conv.flip_weight(wt, g, 1, blocked)
                _conv.conv_direct_backward(x, dy, slots, [(0, 1), (1, n)], 2, 1, 1,
                                           *pair(pad), *pair(dil), 2, g, dx,
                                           None if blocked else flipped,
                                           flipped if blocked else None)
                dxs.append(dx)
            np.testing.assert_array_equal(dxs[0], dxs[1])
            assert not np.isnan(dxs[0]).any()


def test_direct_backward_errors():
    from cnet_ext import _conv
    x = np.zeros((16, 4, 4, 16), np.float32)
    dy = np.zeros((16, 4, 4, 32), np.float32)
    w = np.zeros((3, 3, 16, 32), np.float32)
    slots = np.zeros((2, 3, 3, 16, 32), np.float32)
    chunks = [(0, 8), (8, 16)]
    geom = (1, 1, 1, 1, 1, 1, 2, 1)
    with pytest.raises(ValueError, match="3 stripes of 2 chunks"):
        _conv.conv_direct_backward(x, dy, slots, chunks, 3, *geom)
    with pytest.raises(ValueError, match="needs stride 1"):
        _conv.conv_direct_backward(x, np.zeros((16, 2, 2, 32), np.float32), slots, chunks, 2,
                                   2, 2, 1, 1, 1, 1, 2, 1,
                                   np.zeros_like(x), _conv.flip_weight(w, 1, 1))
    with pytest.raises(ValueError, match="dx of shape"):
        _conv.conv_direct_backward(x, dy, slots, chunks, 2, *geom, np.zeros((16, 4, 4, 8),
                                   np.float32), _conv.flip_weight(w, 1, 1))
    with pytest.raises(ValueError, match="do not split"):
        _conv.conv_direct_backward(x, dy, slots, [(0, 8), (9, 16)], 2, *geom)
    # the same sums as the chunk-by-chunk kernels, bitwise
    rng = np.random.default_rng(0)
    x, dy, w = (rng.standard_normal(a.shape).astype(np.float32) for a in (x, dy, w))
    want_slots, want_dx = np.empty_like(slots), np.empty_like(x)
    for s, (n0, n1) in enumerate(chunks):
        _conv.conv_direct_wgrad(x, dy, want_slots[s], False, n0, n1, 1, 1, 1, 1, 1, 1, 1)
        _conv.conv_direct(dy, _conv.flip_weight(w, 1, 1), None, want_dx, n0, n1,
                          1, 1, 1, 1, 1, 1, 1)
    dx = np.full_like(x, np.nan)
    _conv.conv_direct_backward(x, dy, slots, chunks, 2, *geom, dx, _conv.flip_weight(w, 1, 1))
    np.testing.assert_array_equal(slots, want_slots)
    np.testing.assert_array_equal(dx, want_dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_kernels_read_any_weight_alignment(dtype, rng):
    # Weights 16 or 48 bytes past a cache line (numpy's small arrays, an optimizer's
    # flat buffer) give the same outputs: one-vector layers read an aligned copy,
    # and the packed and flipped weights start on a line.
    from cnet_ext import _conv
    a = _conv.aligned_empty((3, 5, 7), dtype)
    assert a.shape == (3, 5, 7) and a.dtype == dtype and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0
    assert _conv.aligned_empty(7, dtype).shape == (7,)
    assert _conv.aligned_empty([0, 4], dtype).shape == (0, 4)
    with pytest.raises(ValueError, match=r"negative dimension in \(2, -1\)"):
        _conv.aligned_empty((2, -1), dtype)
    lanes = _conv.direct_lanes(np.dtype(dtype))
    w = rng.standard_normal((3, 3, 16, lanes)).astype(dtype)
    assert _conv.flip_weight(w, 1, 2).ctypes.data % 64 == 0
    assert _conv.direct_weight_blocks(w, 1, 2).ctypes.data % 64 == 0
    x = rng.standard_normal((5, 9, 9, 16)).astype(dtype)
    want = np.empty((5, 9, 9, lanes), dtype)
    _conv.conv_direct(x, w, None, want, 0, 5, 1, 1, 1, 1, 1, 1, 2)
    flat = np.empty(w.size + 64, dtype)
    for offset in (16, 48):
        start = (-flat.ctypes.data % 64 + offset) // flat.itemsize
        wm = flat[start:start + w.size].reshape(w.shape)
        wm[...] = w
        assert wm.ctypes.data % 64 == offset
        for by_images in (False, True):
            got = np.empty_like(want)
            _conv.conv_direct(x, wm, None, got, 0, 5, 1, 1, 1, 1, 1, 1, 2,
                              by_images=by_images)
            np.testing.assert_array_equal(got, want)


def test_direct_chunks_must_split_the_range():
    from cnet_ext import _conv
    x = np.zeros((20, 4, 4, 16), np.float32)
    w = np.zeros((3, 3, 16, 32), np.float32)
    y = np.zeros((20, 4, 4, 32), np.float32)
    args = (1, 1, 1, 1, 1, 1, 2, 1)
    for chunks, by_images in [([(0, 8), (9, 20)], False), ([(0, 8), (8, 19)], False),
                              ([(0, 7), (7, 20)], True), ([(0, 20), (0, 20)], False),
                              ([(8, 0)], False)]:
        with pytest.raises(ValueError, match="do not split"):
            _conv.conv_direct(x, w, None, y, 0, 20, *args, by_images, None, chunks)
    block = _conv.direct_image_block(np.dtype(np.float32))
    _conv.conv_direct(x, w, None, y, 0, 20, *args, True, None,
                      [(0, block), (block, 2 * block), (2 * block, 20)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flip_weight_matches_numpy(dtype, rng):
    from cnet_ext import _conv
    lanes = _conv.direct_lanes(np.dtype(dtype))
    for k, cin_g, cout, g in [(3, 4 * lanes, 2 * lanes, 1), (3, lanes, 8 * lanes, 4),
                              ((2, 5), 2 * lanes, 2 * lanes, 2), (1, 4 * lanes, 40, 1),
                              (3, 3, 6, 1), (3, 70, 33, 1)]:
        kh, kw = pair(k)
        w = rng.standard_normal((kh, kw, cin_g, cout)).astype(dtype)
        ref = np.empty((kh, kw, cout // g, cin_g * g), dtype)
        np.copyto(ref.reshape(kh, kw, cout // g, g, cin_g),
                  w.reshape(kh, kw, cin_g, g, cout // g)[::-1, ::-1].transpose(0, 1, 4, 3, 2))
        for threads in (1, 2):
            np.testing.assert_array_equal(_conv.flip_weight(w, g, threads), ref)
            if cin_g % lanes == 0:
                np.testing.assert_array_equal(_conv.flip_weight(w, g, threads, True),
                                              _conv.direct_weight_blocks(ref, g, threads))
    with pytest.raises(ValueError, match="whole vectors"):
        _conv.flip_weight(np.zeros((3, 3, 3, 16), dtype), 1, 1, True)


def test_packed_weight_errors():
    from cnet_ext import _conv
    x = np.zeros((2, 4, 4, 16), np.float32)
    w = np.zeros((3, 3, 16, 32), np.float32)
    y = np.zeros((2, 4, 4, 32), np.float32)
    good = _conv.direct_weight_blocks(w, 1, 1)
    with pytest.raises(ValueError, match="packed weight of shape"):
        _conv.conv_direct(x, w, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1, True,
                          _conv.direct_weight_blocks(np.zeros((3, 3, 8, 32), np.float32), 1, 1))
    with pytest.raises(ValueError, match="needs by_images"):
        _conv.conv_direct(x, w, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1, False, good)
    with pytest.raises(ValueError, match="blocks of 8 outputs"):     # not the kernel's blocking
        _conv.conv_direct(x, None, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1, True,
                          np.zeros((4, 3, 3, 16, 8), np.float32))
    # (blocks, KH, KW, C_in, block width)
    assert good.shape[1:4] == (3, 3, 16) and good.shape[0] * good.shape[4] == 32
    with pytest.raises(ValueError, match="whole vectors"):
        _conv.direct_weight_blocks(np.zeros((3, 3, 16, 24), np.float32), 1, 1)


@pytest.mark.parametrize("pack", [False, True])
def test_image_blocked_layer_gradients(pack, rng, monkeypatch, direct_blocking):
    # 4x4 and 2x2 maps with 3x3 kernels: most taps are padding; 11 images: a partial
    # block; packing forced on small weights to check it in float64.
    if pack:
        monkeypatch.setattr(conv_mod, "_PACK_WEIGHT_BYTES", 0)
    for hw, cin, cout in [((4, 4), 8, 16), ((2, 3), 16, 8)]:
        m = nn.Conv2d(cin, cout, 3, padding=1).double()
        x = rng.standard_normal((11,) + hw + (cin,))
        y = m(x)
        if direct_blocking == "image blocks":
            assert m._ws["paths"] == ("direct", "direct", "direct", True)
        np.testing.assert_allclose(y, reference_conv(x, m.weight.data, m.bias.data, 1, 1, 1, 1),
                                   rtol=1e-12, atol=1e-12)
        check_gradients(m, x, max_checks=60)


@pytest.mark.parametrize("cin, cout, hw, stride, batches_on_images", [
    (16, 16, 32, 1, {8: True, 64: True, 12: False, 4: False, 1: False}),   # rows: full
    (64, 128, 4, 1, {1: False, 4: True, 5: True}),       # rows half empty at 4 wide
    (512, 512, 2, 1, {1: True, 3: True, 8: True}),       # im2col: 56% padding, M = 4n
    (256, 256, 8, 1, {1: False, 4: False, 8: True}),     # im2col: 16% padding
])
def test_small_batches_choose_the_fuller_blocks(cin, cout, hw, stride, batches_on_images,
                                                 monkeypatch, direct_blocking):
    # A partial image block computes a whole one: batch 1 on image blocks was 8x
    # the work (ResNet-20 inference, batch 1: 2.9 -> 0.7 ms).  The choice, and the
    # same output either way.
    monkeypatch.undo()                               # the layer's own choice
    for n, on_images in batches_on_images.items():
        m = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        x = np.random.default_rng(n).standard_normal((n, hw, hw, cin)).astype(np.float32)
        y = m(x)
        assert m._ws["paths"][3] == on_images, n
        monkeypatch.setattr(conv_mod.Conv2d, "_image_blocks_fill",
                            lambda self, *shape: not on_images)
        other = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        other.weight.data[...] = m.weight.data
        y_other = other(x)
        assert other._ws["paths"][3] != on_images
        np.testing.assert_allclose(y, y_other, rtol=1e-4, atol=1e-4 * np.abs(y).max())
        monkeypatch.undo()


def test_image_blocked_chunks(monkeypatch):
    # Whole image blocks per chunk; wide weights: one chunk per core, except where the
    # strided layer's dx needs column buffers that grow with the chunk.
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 32)
    monkeypatch.setattr(conv_mod, "_MIN_TASKS", 2)
    monkeypatch.setattr(conv_mod, "_STRIPE_UNIT", 8)
    block = conv_mod._conv.direct_image_block(np.float32)
    for stride, hw, cols in [(1, 4, False), (2, 8, True)]:
        m = nn.Conv2d(256, 512, 3, stride=stride, padding=1)
        assert m.weight.data.nbytes >= conv_mod._PACK_WEIGHT_BYTES
        m(np.zeros((256, hw, hw, 256), np.float32))
        ws = m._ws
        assert ws["paths"] == ("direct", "direct", "col2im" if cols else "direct", True)
        sizes = [n1 - n0 for n0, n1 in ws["bounds"]]
        assert sum(sizes) == 256 and all(size % block == 0 for size in sizes)
        if cols:
            rows = (hw // stride) ** 2
            assert ws["chunk"] * rows * 9 * 256 * 4 <= conv_mod._KERNEL_CHUNK_BYTES
        else:
            assert ws["n_chunks"] == 2


@pytest.mark.parametrize("shape", [(10, 4, 4, 128, 256, 1), (9, 2, 2, 256, 256, 1),
                                   (10, 8, 8, 64, 128, 2), (5, 4, 4, 64, 128, 1)])
def test_image_blocked_wide_layers_match_torch(shape, rng, direct_blocking):
    # Wide weights (>= 1 MB: packed) and a strided layer (dx through col2im).
    pytest.importorskip("torch")
    n, h, w, cin, cout, stride = shape
    m = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    m(x)
    if direct_blocking == "image blocks":
        assert m._ws["paths"][0] == "direct" and m._ws["paths"][3]
    assert (m.weight.data.nbytes >= conv_mod._PACK_WEIGHT_BYTES) == (cin * cout >= 128 * 256)
    _check_torch_parity(m, x, rng)


def test_repr_and_init_match_torch():
    torch = pytest.importorskip("torch")
    for args, kw in [((3, 16, 3), dict(padding=1, bias=False)),
                     ((8, 8, (3, 5)), dict(stride=2, dilation=(1, 2), groups=4)),
                     ((4, 4, 1), {})]:
        assert repr(nn.Conv2d(*args, **kw)) == repr(torch.nn.Conv2d(*args, **kw))
    for kw in [dict(padding="same"), dict(padding="valid"), dict(padding="same", dilation=2)]:
        assert repr(nn.Conv2d(3, 4, 3, **kw)) == repr(torch.nn.Conv2d(3, 4, 3, **kw))
    assert repr(nn.Linear(3, 4)) == repr(torch.nn.Linear(3, 4))
    assert repr(nn.Linear(3, 4, bias=False)) == repr(torch.nn.Linear(3, 4, bias=False))


def test_default_init_bounds():
    m = nn.Conv2d(8, 32, 3, groups=2)
    assert m.weight.shape == (3, 3, 4, 32) and m.bias.shape == (32,)
    assert m.weight.dtype == np.float32
    bound = 1 / math.sqrt(3 * 3 * 4)   # fan_in counts only the group's input channels
    for arr in (m.weight.data, m.bias.data):
        assert np.abs(arr).max() <= bound
        assert np.abs(arr).max() > 0.8 * bound   # uses the range, not a narrower one
    lin = nn.Linear(50, 20)
    assert lin.weight.shape == (50, 20)
    assert np.abs(lin.weight.data).max() <= 1 / math.sqrt(50)
    assert np.abs(lin.bias.data).max() <= 1 / math.sqrt(50)
    cnet.manual_seed(3)
    a = nn.Conv2d(3, 4, 3).weight.data.copy()
    cnet.manual_seed(3)
    np.testing.assert_array_equal(a, nn.Conv2d(3, 4, 3).weight.data)


# -- fast path, threads, accumulation, modes --------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_pointwise_fast_path_equals_general_path(groups, rng, monkeypatch):
    fast = nn.Conv2d(8, 6, 1, groups=groups)
    general = nn.Conv2d(8, 6, 1, groups=groups)
    general.load_state_dict(fast.state_dict())
    general._paths = lambda dtype: ("im2col", "gemm", "col2im")   # force im2col + GEMM
    x = rng.standard_normal((3, 5, 4, 8)).astype(np.float32)
    calls = []
    im2col = conv_mod._conv.im2col
    monkeypatch.setattr(conv_mod._conv, "im2col", lambda *a: calls.append(1) or im2col(*a))
    y_fast = fast(x)
    assert not calls
    y_gen = general(x)
    assert calls                                        # only the general path ran im2col
    np.testing.assert_allclose(y_fast, y_gen, rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(y_fast.shape).astype(np.float32)
    np.testing.assert_allclose(fast.backward(dy), general.backward(dy), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fast.weight.grad, general.weight.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.bias.grad, general.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,kwargs", [((16, 16, 3), dict(padding=1)),
                                         ((3, 32, 5), dict(stride=2, padding=2)),
                                         ((32, 16, 3), dict(padding=2, dilation=2))])
def test_direct_kernel_matches_im2col_path(args, kwargs, rng, monkeypatch):
    direct = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((3, 11, 10, args[0])).astype(np.float32)
    y = direct(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = direct.backward(dy)
    assert direct._paths(x.dtype)[:2] == ("direct", "direct")
    assert (direct._paths(x.dtype)[2] == "direct") == (direct.stride == (1, 1))
    monkeypatch.setattr(conv_mod, "_DIRECT_MAX_CHANNELS", 0)
    no_scatter(monkeypatch)
    general = nn.Conv2d(*args, **kwargs)
    general.load_state_dict(direct.state_dict())
    np.testing.assert_allclose(general(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(general.backward(dy), dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(general.weight.grad, direct.weight.grad, rtol=1e-5, atol=1e-4)
    assert general._paths(x.dtype) == ("im2col", "gemm", "col2im")


def assert_same_training_step(fast, general, x, rng):
    """fast (a specialised path) and general (im2col + GEMM) agree on y, dx and the
    parameter gradients for the same weights."""
    general.load_state_dict(fast.state_dict())
    y = fast(x)
    dy = rng.standard_normal(y.shape).astype(x.dtype)
    np.testing.assert_allclose(general(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(general.backward(dy), fast.backward(dy), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(general.weight.grad, fast.weight.grad, rtol=1e-5, atol=1e-4)
    if fast.bias is not None:
        np.testing.assert_allclose(general.bias.grad, fast.bias.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("args,kwargs,dx_path", [
    ((32, 32, 3), dict(padding=1, groups=2), "direct"),            # 16 -> 16 per group
    ((64, 32, 3), dict(stride=2, padding=1, groups=2), "phase"),   # strided: dx by phases
    ((48, 96, 3), dict(padding=2, dilation=2, groups=3), "direct"),
    ((32, 64, 1), dict(groups=2), "direct"),
    ((256, 64, 1), {}, "pointwise"),                               # too wide for direct dx
    ((256, 256, 3), dict(padding=1, groups=8), "direct"),          # ResNeXt-29 8x32d-like
])
def test_grouped_direct_kernel_matches_grouped_gemm_path(args, kwargs, dx_path, rng,
                                                        own_gemm_off):
    direct = nn.Conv2d(*args, **kwargs)
    general = nn.Conv2d(*args, **kwargs)
    general._paths = lambda dtype: ("im2col", "gemm", "col2im")
    assert direct._paths(np.float32) == ("direct", "direct", dx_path)
    x = rng.standard_normal((3, 9, 10, args[0])).astype(np.float32)
    assert_same_training_step(direct, general, x, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_phase_dx_matches_col2im(dtype, rng):
    """A strided layer's dx by phases (each a stride-1 convolution of dy with some of
    the flipped taps) against the im2col / col2im path and the float64 reference;
    phases no tap reaches (1x1 stride 2) are zeros; 1 and 2 threads bitwise, and
    grouped layers with dy staged in per-group planes or read in place bitwise."""
    from cnet_ext import _conv
    lanes = _conv.direct_lanes(np.dtype(dtype))
    # (C_in, C_out, kernel, stride, padding, groups, H, W)
    for cin, cout, k, st, pad, g, h, w in [
            (lanes, 2 * lanes, 3, 2, 1, 1, 9, 8), (2 * lanes, 4 * lanes, 3, 2, 1, 2, 7, 10),
            (lanes, lanes, 1, 2, 0, 1, 6, 7), (lanes, 2 * lanes, (3, 5), (2, 3), (1, 2), 1, 11, 13),
            (lanes, lanes, 4, 2, 1, 1, 8, 8), (lanes, lanes, 3, 3, 0, 1, 10, 11),
            (lanes, lanes, 3, 2, 3, 1, 5, 6), (4 * lanes, 4 * lanes, 3, 2, 1, 4, 9, 8),
            (2 * lanes, 2 * lanes, (3, 5), (2, 3), (1, 2), 2, 11, 13)]:
        m = nn.Conv2d(cin, cout, k, stride=st, padding=pad, groups=g)
        general = nn.Conv2d(cin, cout, k, stride=st, padding=pad, groups=g)
        if dtype == np.float64:
            m, general = m.double(), general.double()
        general.load_state_dict(m.state_dict())
        general._paths = lambda dtype: ("im2col", "gemm", "col2im")
        assert m._paths(dtype)[2] == "phase"
        x = rng.standard_normal((3, h, w, cin)).astype(dtype)
        y = m(x)
        general(x)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = m.backward(dy)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(dx, general.backward(dy), rtol=tol, atol=tol)
        np.testing.assert_allclose(m.weight.grad, general.weight.grad, rtol=tol, atol=10 * tol)
        phases = _conv.phase_weights(m.weight.data, *m.stride, *m.padding, g)
        for threads, staged in ((1, True), (2, True), (1, False), (2, False)):
            part = np.full_like(x, 7)
            previous = _conv._stage_groups(staged)
            try:
                _conv.conv_phase_dx(dy, phases, part, 1, 3, *m.stride, threads, g)
            finally:
                _conv._stage_groups(previous)
            assert np.all(part[0] == 7)
            np.testing.assert_array_equal(part[1:], dx[1:])
    m = nn.Conv2d(16, 16, 1, stride=2).double()
    phases = _conv.phase_weights(m.weight.data, 2, 2, 0, 0, 1)
    assert [p is None for p in phases] == [False, True, True, True]


def test_phase_dx_errors():
    from cnet_ext import _conv
    w = np.zeros((3, 3, 16, 32), np.float32)
    dy, dx = np.zeros((2, 4, 4, 32), np.float32), np.zeros((2, 8, 8, 16), np.float32)
    phases = _conv.phase_weights(w, 2, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="3 phases for stride"):
        _conv.conv_phase_dx(dy, phases[:3], dx, 0, 2, 2, 2, 1)
    with pytest.raises(ValueError, match="is not"):
        _conv.conv_phase_dx(dy, _conv.phase_weights(w.astype(np.float64), 2, 2, 1, 1, 1), dx,
                            0, 2, 2, 2, 1)
    with pytest.raises(ValueError, match="multiple of 16 input"):
        _conv.conv_phase_dx(dy, phases, np.zeros((2, 8, 8, 12), np.float32), 0, 2, 2, 2, 1)
    with pytest.raises(ValueError, match="images"):
        _conv.conv_phase_dx(dy, phases, dx, 1, 3, 2, 2, 1)
    with pytest.raises(ValueError, match="groups"):
        _conv.phase_weights(w, 2, 2, 1, 1, 3)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("kwargs", [dict(padding=1, groups=2), dict(stride=2, padding=1, groups=2),
                                    dict(padding=(2, 1), dilation=(2, 1), groups=2)])
def test_grouped_direct_kernel_gradients_float64(kwargs, wide, rng):
    # float64 vectors hold 8 lanes: 8 (and 16: the two-vector block) outputs per group.
    from cnet_ext import _conv
    previous = _conv._wide_vectors(wide)
    try:
        m = nn.Conv2d(16, 32, 3, **kwargs).double()
        assert m._paths(np.float64)[:2] == ("direct", "direct")
        x = rng.standard_normal((2, 7, 6, 16))
        ref = reference_conv(x, m.weight.data, m.bias.data, m.stride, m.padding, m.dilation,
                             m.groups)
        np.testing.assert_allclose(m(x), ref, rtol=1e-12, atol=1e-12)
        check_gradients(m, x, max_checks=40)
    finally:
        _conv._wide_vectors(previous)


def test_direct_kernels_refuse_bad_groups(rng):
    from cnet_ext import _conv
    x = np.zeros((1, 4, 4, 32), np.float32)
    y = np.zeros((1, 4, 4, 32), np.float32)
    with pytest.raises(ValueError, match="groups=4 needs a multiple of 16"):
        _conv.conv_direct(x, np.zeros((3, 3, 8, 32), np.float32), None, y, 0, 1,
                          1, 1, 1, 1, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="do not fit groups=2"):
        _conv.conv_direct_wgrad(x, y, np.zeros((3, 3, 8, 32), np.float32), False, 0, 1,
                                1, 1, 1, 1, 1, 1, 1, 2)


@pytest.mark.parametrize("args,kwargs,hw,n_regions", [
    ((40, 36, 3), dict(padding=1), (4, 4), 9),              # corners, edges, interior
    ((40, 36, 3), dict(padding=1), (2, 2), 4),              # corners only
    ((24, 36, 3), dict(padding=1, stride=2), (5, 7), 9),
    ((20, 36, 5), dict(padding=2), (3, 5), 15),
    ((20, 36, 3), dict(padding=(2, 1)), (3, 4), 15),
    ((20, 36, 1), dict(padding=1), (2, 3), 9),               # border outputs see only padding
])
def test_region_path_matches_im2col_path(args, kwargs, hw, n_regions, rng, monkeypatch):
    # Small batches: allow regions whatever their GEMMs' row count (a speed rule).
    monkeypatch.setattr(conv_mod, "_REGION_MIN_ROWS", 0)
    no_scatter(monkeypatch)
    region = nn.Conv2d(*args, **kwargs)
    general = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((3,) + hw + (args[0],)).astype(np.float32)
    with monkeypatch.context() as plain:        # the workspace (made once) says: no regions
        plain.setattr(conv_mod, "_REGION_MIN_ZEROS", 2.0)
        general(x)
    region(x)
    assert len(region._ws["regions"]) == n_regions
    assert_same_training_step(region, general, x, rng)
    assert general._ws["regions"] is None


def test_region_path_gradients_float64(rng, monkeypatch):
    monkeypatch.setattr(conv_mod, "_REGION_MIN_ROWS", 0)
    m = nn.Conv2d(12, 20, 3, padding=1, stride=(1, 2)).double()   # 20: not direct
    x = rng.standard_normal((2, 3, 5, 12))
    ref = reference_conv(x, m.weight.data, m.bias.data, m.stride, m.padding, m.dilation, 1)
    np.testing.assert_allclose(m(x), ref, rtol=1e-12, atol=1e-12)
    assert m._ws["regions"] is not None
    check_gradients(m, x, max_checks=40)


def test_region_path_only_where_its_gemms_have_rows(rng, monkeypatch):
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)   # (they would take 4x4)
    m = nn.Conv2d(256, 256, 3, padding=1)
    m(np.zeros((2, 4, 4, 256), np.float32))
    assert m._ws["regions"] is None                 # a corner GEMM would have 1 row
    m(np.zeros((64, 4, 4, 256), np.float32))
    assert m._ws["regions"] is not None and m._ws["n_chunks"] == conv_mod._MIN_TASKS
    m(np.zeros((8, 32, 32, 256), np.float32))
    assert m._ws["regions"] is None                 # 6% zeros, but 4 rows per corner


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=2, dilation=2)])
def test_depthwise_kernel_matches_grouped_gemm_path(kwargs, rng):
    dwise = nn.Conv2d(24, 24, 3, groups=24, **kwargs)
    general = nn.Conv2d(24, 24, 3, groups=24, **kwargs)
    general._paths = lambda dtype: ("im2col", "gemm", "col2im")
    assert dwise._paths(np.float32) == ("depthwise",) * 3
    x = rng.standard_normal((5, 9, 11, 24)).astype(np.float32)
    assert_same_training_step(dwise, general, x, rng)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("name", ["direct-3x3", "direct-5x5-dil2", "direct-odd-vector-count",
                                  "direct-stem-stride2"])
def test_direct_kernel_block_variants(name, wide, rng):
    # Machines without AVX-512 run 6-pixel x 1-vector blocks; AVX-512 ones 8 x 1 or 8 x 2.
    from cnet_ext import _conv
    previous = _conv._wide_vectors(wide)
    try:
        cfg = CONFIGS[name]
        m = make(cfg).double()
        x = make_input(cfg, rng, np.float64)
        ref = reference_conv(x, m.weight.data, None if m.bias is None else m.bias.data,
                             m.stride, m.padding, m.dilation, m.groups)
        np.testing.assert_allclose(m(x), ref, rtol=1e-12, atol=1e-12)
        check_gradients(m, x, max_checks=40)
    finally:
        _conv._wide_vectors(previous)


def reference_wgrad(x, dy, kernel, stride, padding, dilation, groups=1):
    """dW[i, j, c, o] = sum over output pixels of the tapped input times dy (float64),
    group by group (HWIO: C_in/groups rows)."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, h, wd, c = x.shape
    _, oh, ow, cout = dy.shape
    cg, cog = c // groups, cout // groups
    xp = np.zeros((n, h + 2 * ph, wd + 2 * pw, c))
    xp[:, ph:ph + h, pw:pw + wd] = x
    gw = np.zeros(tuple(kernel) + (cg, cout))
    for g in range(groups):
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                patch = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                           j * dw:j * dw + sw * (ow - 1) + 1:sw, g * cg:(g + 1) * cg]
                gw[i, j, :, g * cog:(g + 1) * cog] = np.einsum(
                    "nhwc,nhwo->co", patch, dy[..., g * cog:(g + 1) * cog].astype(np.float64))
    return gw


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation", [
    (6, 16, (5, 5), (1, 1), (0, 0), (1, 1)),        # LeNet's conv2: 5 x 6 channels per row
    (3, 32, (3, 3), (2, 2), (1, 0), (1, 1)),        # height padding only, stride 2
    (5, 16, (2, 4), (1, 2), (0, 0), (2, 1)),        # dilated rows, strided columns
    (6, 16, (3, 3), (1, 1), (1, 1), (1, 1)),        # width padding: tap by tap
    (16, 16, (3, 3), (1, 1), (0, 0), (1, 1)),       # channels fill the block: tap by tap
])
def test_direct_weight_gradient_by_kernel_rows(cin, cout, kernel, stride, padding, dilation,
                                               wide, rng):
    # On one thread a layer without width padding whose channels leave the register
    # block part empty sums a kernel row (KW * C_in consecutive values) as one tap.
    # Against float64, and bitwise against the tap-by-tap tasks of two threads:
    # each element sums the same products in the same order.
    from cnet_ext import _conv
    previous = _conv._wide_vectors(wide)
    try:
        x = rng.standard_normal((6, 13, 15, cin)).astype(np.float32)
        oh = (13 + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        ow = (15 + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        dy = rng.standard_normal((6, oh, ow, cout)).astype(np.float32)
        want = reference_wgrad(x, dy, kernel, stride, padding, dilation)
        by_rows, by_taps = (np.full(kernel + (cin, cout), 7, np.float32) for _ in range(2))
        geometry = stride + padding + dilation
        _conv.conv_direct_wgrad(x, dy, by_rows, False, 1, 6, *geometry, 1)
        _conv.conv_direct_wgrad(x, dy, by_taps, False, 1, 6, *geometry, 2)
        np.testing.assert_array_equal(by_rows, by_taps)
        want_part = reference_wgrad(x[1:], dy[1:], kernel, stride, padding, dilation)
        np.testing.assert_allclose(by_rows, want_part, rtol=1e-4, atol=1e-4)
        _conv.conv_direct_wgrad(x, dy, by_rows, True, 0, 1, *geometry, 1)
        np.testing.assert_allclose(by_rows, want, rtol=1e-4, atol=1e-4)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        gw64 = np.empty(kernel + (cin, cout))
        _conv.conv_direct_wgrad(x64, dy64, gw64, False, 0, 6, *geometry, 1)
        np.testing.assert_allclose(gw64, want, rtol=1e-12, atol=1e-12)
    finally:
        _conv._wide_vectors(previous)


def _run_fwd_bwd(m, x, dy, n):
    m.zero_grad()
    with cnet.threads(n):
        y = m(x)
        dx = m.backward(dy)
    return y, dx, m.weight.grad.copy(), m.bias.grad.copy()


@pytest.mark.parametrize("args,kwargs", [((16, 16, 3), dict(padding=1)),
                                         ((16, 32, 3), dict(stride=2, padding=1, groups=4)),
                                         ((32, 32, 3), dict(padding=1, groups=2)),
                                         ((16, 16, 3), dict(padding=1, groups=16)),
                                         ((16, 64, 3), dict(padding=1)),
                                         ((16, 24, 1), {})])
def test_one_and_two_threads_identical(args, kwargs, rng):
    # Big enough that im2col, col2im, the bias reduction and BLAS all go parallel.
    m = nn.Conv2d(*args, **kwargs)
    x = rng.standard_normal((8, 16, 16, args[0])).astype(np.float32)
    dy = rng.standard_normal(m.output_shape(x.shape)).astype(np.float32)
    one = _run_fwd_bwd(m, x, dy, 1)
    two = _run_fwd_bwd(m, x, dy, 2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_single_image_uses_parallel_kernels_same_result(rng):
    # One chunk: the tasks run in turn with parallel im2col/col2im and BLAS.
    m = nn.Conv2d(16, 16, 3, padding=1)
    x = rng.standard_normal((1, 40, 40, 16)).astype(np.float32)
    dy = rng.standard_normal(m.output_shape(x.shape)).astype(np.float32)
    one = _run_fwd_bwd(m, x, dy, 1)
    assert m._ws["n_chunks"] == 1
    two = _run_fwd_bwd(m, x, dy, 2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    ref = reference_conv(x.astype(np.float64), m.weight.data.astype(np.float64),
                         m.bias.data.astype(np.float64), 1, 1, 1, 1)
    np.testing.assert_allclose(one[0], ref, rtol=1e-4, atol=1e-4)


def test_backward_accumulates_and_keeps_grad_out(rng):
    m = nn.Conv2d(3, 4, 3, padding=1)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    x0 = x.copy()
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy0 = dy.copy()
    dx1 = m.backward(dy)
    g1, b1 = m.weight.grad.copy(), m.bias.grad.copy()
    m(x)
    dx2 = m.backward(dy)
    np.testing.assert_allclose(m.weight.grad, 2 * g1, rtol=1e-6)
    np.testing.assert_allclose(m.bias.grad, 2 * b1, rtol=1e-6)
    np.testing.assert_array_equal(dx1, dx2)
    assert dx1 is not dx2
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(x, x0)


def test_flat_parameter_buffer_receives_gradients(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.Conv2d(4, 4, 3, groups=2))
    flat_data, flat_grad = model.flatten_parameters()
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    y = model(x)
    model.backward(np.ones_like(y))
    assert np.abs(flat_grad).sum() > 0
    np.testing.assert_array_equal(flat_grad[:model[0].weight.size], model[0].weight.grad.ravel())


def test_eval_keeps_nothing_for_backward(rng):
    m = nn.Conv2d(3, 4, 3)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    y_train = m(x)
    m.eval()
    assert m._x is None
    y_eval = m(x)
    np.testing.assert_array_equal(y_train, y_eval)
    assert m._x is None
    with pytest.raises(RuntimeError, match=r"Conv2d\(3, 4.*without a forward"):
        m.backward(y_eval)


def test_float64_model_and_shape_change(rng):
    m = nn.Conv2d(3, 4, 3, padding=1).double()
    for shape in [(2, 5, 5, 3), (3, 8, 6, 3), (2, 5, 5, 3)]:
        x = rng.standard_normal(shape)
        y = m(x)
        assert y.dtype == np.float64
        np.testing.assert_allclose(
            y, reference_conv(x, m.weight.data, m.bias.data, 1, 1, 1, 1), rtol=1e-12, atol=1e-12)


# -- bad inputs ----------------------------------------------------------------------

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by groups=3"):
        nn.Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="divisible by groups=4"):
        nn.Conv2d(8, 6, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv2d(3, 4, (3, 0))
    with pytest.raises(ValueError, match="padding"):
        nn.Conv2d(3, 4, 3, padding=-1)
    with pytest.raises(ValueError, match="pair"):
        nn.Conv2d(3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="positive"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="strided"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="symmetric"):
        nn.Conv2d(3, 4, 4, padding="same")
    with pytest.raises(ValueError, match="invalid padding string"):
        nn.Conv2d(3, 4, 3, padding="full")


def test_padding_strings(rng):
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    same = nn.Conv2d(3, 4, 5, padding="same", dilation=(1, 2))
    assert same.padding == (2, 4) and same(x).shape == (2, 7, 6, 4)
    assert nn.Conv2d(3, 4, 3, padding="valid")(x).shape == (2, 5, 4, 4)


def test_bad_inputs_name_layer_and_shapes(rng):
    m = nn.Conv2d(3, 8, 3, padding=1)
    name = r"Conv2d\(3, 8, kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(1, 1\)\)"
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=name + r".*channels.*\(2, 6, 6, 4\)"):
        m(np.zeros((2, 6, 6, 4), np.float32))
    with pytest.raises(ValueError, match=name + r".*4-D.*\(6, 6, 3\)"):
        m(x[0])
    with pytest.raises(ValueError, match=name + r".*float32.*float64"):
        m(x.astype(np.float64))
    with pytest.raises(ValueError, match=name + r".*not C-contiguous"):
        m(x[:, ::2])
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8.*\(2, 1, 2, 3\).*smaller than the kernel"):
        nn.Conv2d(3, 8, (5, 3), padding=1)(np.zeros((2, 1, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"dilated\) kernel size \(5, 5\)"):
        nn.Conv2d(3, 8, 3, dilation=2)(np.zeros((1, 4, 9, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        m([[1.0]])
    y = m(x)
    with pytest.raises(ValueError, match=name + r".*gradient of shape \(2, 6, 6, 8\).*\(2, 6, 6, 7\)"):
        m.backward(np.zeros((2, 6, 6, 7), np.float32))
    with pytest.raises(ValueError, match=name + r".*float32 gradient.*float64"):
        m.backward(y.astype(np.float64))


def test_half_precision_parameters_refused(rng):
    for m, x in [(nn.Conv2d(3, 4, 3).to(np.float16), np.zeros((1, 5, 5, 3), np.float16)),
                 (nn.Linear(3, 4).to(np.float16), np.zeros((2, 3), np.float16))]:
        with pytest.raises(ValueError, match=r"(Conv2d|Linear)\(.*float16.*float32 or float64"):
            m(x)


def test_kernel_wrappers_check_shapes():
    from cnet_ext import _conv
    x = np.zeros((2, 5, 5, 4), np.float32)
    col = np.zeros((25, 36), np.float32)
    _conv.im2col(x, col, 0, 1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"column buffer has shape \(25, 36\), need \(50, 36\)"):
        _conv.im2col(x, col, 0, 2, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="output size"):
        _conv.col2im(col, x, 0, 1, 4, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="image range"):
        _conv.im2col(x, col, 2, 3, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        _conv.im2col(x, col, 0, 1, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 3, 1)
    with pytest.raises(ValueError, match="does not match bias"):
        _conv.bias_grad(np.zeros((4, 3), np.float32), np.zeros(4, np.float32), 1)


# -- Linear ----------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_reference_and_gradients(bias, rng):
    m = nn.Linear(7, 5, bias=bias).double()
    x = rng.standard_normal((4, 7))
    ref = x @ m.weight.data + (m.bias.data if bias else 0)
    np.testing.assert_allclose(m(x), ref, rtol=1e-13, atol=1e-13)
    check_gradients(m, x)
    x3 = rng.standard_normal((2, 3, 7))
    np.testing.assert_allclose(m(x3), x3 @ m.weight.data + (m.bias.data if bias else 0),
                               rtol=1e-13, atol=1e-13)
    check_gradients(m, x3)


def test_linear_torch_parity(rng):
    torch = pytest.importorskip("torch")
    m = nn.Linear(64, 10)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    y = m(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = m.backward(dy)
    t = torch.nn.Linear(64, 10)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(m.weight.data.T.copy()))
        t.bias.copy_(torch.from_numpy(m.bias.data))
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    _close(y, yt.detach().numpy(), "output")
    _close(dx, xt.grad.numpy(), "input gradient")
    _close(m.weight.grad, t.weight.grad.numpy().T, "weight gradient")
    _close(m.bias.grad, t.bias.grad.numpy(), "bias gradient")


def test_linear_threads_identical_and_accumulates(rng):
    m = nn.Linear(256, 128)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    dy = rng.standard_normal((512, 128)).astype(np.float32)
    one = _run_fwd_bwd(m, x, dy, 1)
    two = _run_fwd_bwd(m, x, dy, 2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    m.backward(dy)
    np.testing.assert_allclose(m.weight.grad, 2 * two[2], rtol=1e-6)


@pytest.mark.parametrize("m,k,n", [(513, 256, 64), (7, 4096, 300), (64, 64, 64), (3000, 50, 40)])
@pytest.mark.parametrize("from_c", [True, False], ids=["cblas from C", "Python tasks"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_gemm_row_parts_match_one_thread(m, k, n, from_c, dtype, rng, monkeypatch):
    from cnet.nn import conv as conv_mod
    monkeypatch.setattr(conv_mod, "_MIN_PART_MACS", 1 << 12)    # split even small ones
    monkeypatch.setattr(conv_mod, "_MIN_PART_MACS_C", 1 << 12)
    if from_c and not conv_mod._cblas_ready():
        pytest.skip("numpy's BLAS has no cblas symbols cnet knows")
    monkeypatch.setattr(conv_mod, "_cblas_ready", lambda: from_c)
    a = rng.standard_normal((k, m)).astype(dtype).T            # a transposed view, as dW's
    b = rng.standard_normal((n, k)).astype(dtype).T            # and as dx's w.T
    outs = []
    for threads in (1, 2, 3):
        out = np.full((m, n), np.nan, dtype)
        with cnet.threads(threads):
            conv_mod._gemms([(a, b, out, False, None, False)])
        outs.append(out)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(outs[0], a.astype(np.float64) @ b, rtol=tol, atol=tol * 10)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_gemms_row_parts_and_refusals(rng):
    from cnet_ext import _blas
    from cnet.nn import conv as conv_mod
    if not conv_mod._cblas_ready():
        pytest.skip("numpy's BLAS has no cblas symbols cnet knows")
    a = rng.standard_normal((237, 20)).astype(np.float32)
    b = rng.standard_normal((20, 9)).astype(np.float32)
    out = np.full((237, 9), np.nan, np.float32)

    def rows(a, b, out, parts):
        return _blas.gemms([(a, b, out, parts, False, None, False)], 2)

    assert rows(a, b, out, 5)
    bounds = [_blas.row_bound(237, i, 5) for i in range(6)]
    assert bounds == [0, 48, 96, 144, 192, 237]
    for r0, r1 in zip(bounds, bounds[1:]):  # each part is one BLAS call on its rows
        np.testing.assert_array_equal(out[r0:r1], a[r0:r1] @ b)
    with pytest.raises(ValueError, match="238 row parts of 237 rows"):
        rows(a, b, out, 238)
    assert not rows(a[:, ::2], b[::2], out, 2)                            # strided: declined
    assert not rows(a, b, np.zeros((9, 37), np.float32).T, 2)
    assert not rows(a.astype(np.float64), b, out, 2)                     # mixed dtypes
    assert not rows(a, b[:19], out, 2)                                   # shapes


@pytest.mark.parametrize("m,parts", [(1, 1), (7, 2), (37, 5), (256, 2), (513, 3), (4096, 7)])
def test_row_bounds_cover_the_rows_at_aligned_splits(m, parts):
    """Row parts tile [0, m) in order, every inner split a multiple of ROW_ALIGN
    (a BLAS block boundary) and within half of it of the even split."""
    from cnet_ext import _blas
    bounds = [_blas.row_bound(m, i, parts) for i in range(parts + 1)]
    assert bounds[0] == 0 and bounds[-1] == m
    assert all(r0 <= r1 for r0, r1 in zip(bounds, bounds[1:]))
    for i, r in enumerate(bounds[1:-1], 1):
        assert r == m or r % _blas.ROW_ALIGN == 0
        assert abs(r - m * i // parts) <= _blas.ROW_ALIGN // 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemms_jobs_epilogue_accumulate_and_parts(dtype, rng):
    """Two jobs in one region: a transposed-operand product accumulated into its
    output (Linear's weight gradient) and a product with bias and ReLU (Linear's
    forward), against numpy and bitwise against one call per job on one thread."""
    from cnet_ext import _blas
    from cnet import _threads
    if not conv_mod._cblas_ready():
        pytest.skip("numpy's BLAS has no cblas symbols cnet knows")
    a1 = rng.standard_normal((40, 23)).astype(dtype).T           # (23, 40) transposed view
    b1 = rng.standard_normal((40, 11)).astype(dtype)
    base = rng.standard_normal((23, 11)).astype(dtype)
    a2 = rng.standard_normal((29, 17)).astype(dtype)
    a2[3, 5] = np.nan                                              # ReLU passes NaN through
    b2 = rng.standard_normal((17, 13)).astype(dtype)
    bias = rng.standard_normal(13).astype(dtype)

    def run(parts1, parts2, threads):
        out1, out2 = base.copy(), np.full((29, 13), 7.0, dtype)
        assert _blas.gemms([(a1, b1, out1, parts1, True, None, False),
                            (a2, b2, out2, parts2, False, bias, True)], threads)
        return out1, out2

    blas = [lib for lib in _threads._blas_controller().lib_controllers
            if lib.user_api == "blas"]
    before = [lib.num_threads for lib in blas]
    one = run(1, 1, 1)
    for parts1, parts2, threads in [(3, 2, 2), (1, 1, 2), (5, 4, 3)]:
        for got, want in zip(run(parts1, parts2, threads), one):
            np.testing.assert_array_equal(got, want)
    assert [lib.num_threads for lib in blas] == before           # BLAS's pool restored
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(one[0], base + a1.astype(np.float64) @ b1, rtol=tol, atol=tol)
    z = a2.astype(np.float64) @ b2 + bias
    np.testing.assert_allclose(one[1], np.where(z < 0, 0, z), rtol=tol, atol=tol)
    assert np.isnan(one[1][3]).all() and not np.isnan(np.delete(one[1], 3, 0)).any()
    # Refusals: nothing is written.
    out = np.full((29, 13), 7.0, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    assert not _blas.gemms([(a2, b2, out, 1, False, bias.astype(other), False)], 1)
    assert not _blas.gemms([(a2, b2, out, 1, False, bias[:12], False)], 1)
    assert not _blas.gemms([(a2, b2, out, 1, False, None, False),
                            (a1.astype(other), b1.astype(other), base.astype(other), 1, True,
                             None, False)], 2)
    assert not _blas.gemms([(a2, b2, out, 1, False, None, False)] * 5, 2)
    assert (out == 7.0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fused_relu_matches_separate_relu(bias, rng):
    """Sequential(Linear, ReLU) runs the ReLU in the GEMM's epilogue and its mask
    in the bias-gradient pass: bitwise what Linear then ReLU give, any threads."""
    x = rng.standard_normal((300, 64)).astype(np.float32)
    dy = rng.standard_normal((300, 48)).astype(np.float32)
    fused = nn.Sequential(nn.Linear(64, 48, bias=bias), nn.ReLU())
    alone, relu = nn.Linear(64, 48, bias=bias), nn.ReLU()
    alone.load_state_dict(fused[0].state_dict())
    for threads in (1, 2):
        with cnet.threads(threads):
            fused.zero_grad(), alone.zero_grad()
            y = fused(x)
            dx = fused.backward(dy)
            y_ref = relu(alone(x))
            dx_ref = alone.backward(relu.backward(dy))
        assert "fused_relu=True" in repr(fused)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        np.testing.assert_array_equal(fused[0].weight.grad, alone.weight.grad)
        if bias:
            np.testing.assert_array_equal(fused[0].bias.grad, alone.bias.grad)
    check_gradients(nn.Sequential(nn.Linear(9, 6, bias=bias), nn.ReLU()),
                    rng.standard_normal((5, 9)))


def test_linear_bad_inputs(rng):
    m = nn.Linear(7, 5)
    name = r"Linear\(in_features=7, out_features=5, bias=True\)"
    with pytest.raises(ValueError, match=name + r".*7 channels.*\(4, 6\)"):
        m(np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match=name + r".*\(7,\)"):
        m(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=name + r".*float32.*float64"):
        m(np.zeros((4, 7)))
    with pytest.raises(ValueError, match=name + r".*not C-contiguous"):
        m(np.zeros((7, 4), np.float32).T)
    with pytest.raises(RuntimeError, match=name):
        nn.Linear(7, 5).backward(np.zeros((4, 5), np.float32))
    m(np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match=name + r".*\(4, 5\).*\(4, 6\)"):
        m.backward(np.zeros((4, 6), np.float32))


def test_region_kernels_refuse_regions_outside_the_input():
    from cnet_ext import _conv
    x = np.zeros((2, 4, 4, 3), np.float32)
    col = np.zeros((2 * 2 * 2, 3 * 3 * 3), np.float32)
    # output rows/cols [0, 2) with all 3x3 taps and padding 1 reach row -1
    with pytest.raises(ValueError, match="reads outside the 4x4 input"):
        _conv.im2col_region(x, col, 0, 2, 0, 2, 0, 2, 0, 3, 0, 3, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="column buffer has shape"):
        _conv.col2im_region_add(col[:4], x, 0, 2, 1, 3, 1, 3, 0, 3, 0, 3, 1, 1, 1, 1, 1)


def test_scratch_is_shared_by_layers_and_private_to_threads(rng):
    import threading
    a, b = nn.Conv2d(3, 20, 3, padding=1), nn.Conv2d(20, 20, 3, padding=1)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    ref = b(a(x))
    # a model run from another thread gets its own buffers and the same result
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("y", b(a(x))))
    t.start()
    t.join()
    np.testing.assert_array_equal(out["y"], ref)
    col = conv_mod._scratch(("col", 0), (4,), np.float32)
    assert col.base is conv_mod._scratch(("col", 0), (2, 2), np.float32).base


@pytest.mark.parametrize("args,kwargs,hw,regions", [
    ((32, 192, 3), dict(padding=1), (5, 6), False),
    ((32, 192, 3), dict(padding=1), (4, 4), True),     # region dx + direct weight gradient
    ((24, 192, 3), dict(stride=2, padding=1), (7, 6), False),
])
def test_wide_layer_direct_weight_gradient_matches_gemm(args, kwargs, hw, regions, rng,
                                                        monkeypatch):
    from cnet_ext import _conv
    monkeypatch.setattr(conv_mod, "_REGION_MIN_ROWS", 0 if regions else 10 ** 9)
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)   # the GEMM paths
    fast = nn.Conv2d(*args, **kwargs)
    general = nn.Conv2d(*args, **kwargs)
    general._paths = lambda dtype: (fast._paths(dtype)[0], "gemm", fast._paths(dtype)[2])
    if _conv.wgrad_block_channels(np.float32):
        assert fast._paths(np.float32)[1] == "direct"
    x = rng.standard_normal((3,) + hw + (args[0],)).astype(np.float32)
    fast(x)
    assert (fast._ws["regions"] is not None) == regions
    assert_same_training_step(fast, general, x, rng)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=(1, 0))])
def test_wide_layer_direct_weight_gradient_float64(kwargs, wide, rng):
    # 160 outputs: above the direct forward's limit; 5 x 32 for the 6 x 4 float64 block
    from cnet_ext import _conv
    previous = _conv._wide_vectors(wide)
    try:
        m = nn.Conv2d(8, 160, 3, **kwargs).double()
        assert m._paths(np.float64)[1] == ("direct" if wide and _conv.wgrad_block_channels(
            np.float64) else "gemm")
        x = rng.standard_normal((2, 5, 6, 8))
        check_gradients(m, x, max_checks=40)
    finally:
        _conv._wide_vectors(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_direct_bytes", [0, None])
def test_eval_conv_applies_the_next_batchnorm_per_chunk(threads, relu, dtype, fold_direct_bytes,
                                                       rng, monkeypatch):
    if fold_direct_bytes is not None:     # direct layers fold too (ResNeXt-sized maps)
        monkeypatch.setattr(conv_mod, "_FOLD_DIRECT_BYTES", fold_direct_bytes)
    # (N, H, C_in, C_out, kwargs): direct rows/images, wide im2col/regions, 1x1,
    # grouped, depthwise, strided, with a bias
    cases = [(9, 12, 8, 32, dict(kernel_size=3, padding=1)), (1, 12, 8, 32, dict(kernel_size=3)),
             (10, 4, 64, 512, dict(kernel_size=3, padding=1, bias=False)),
             (5, 36, 16, 256, dict(kernel_size=3, padding=1)),
             (6, 6, 32, 256, dict(kernel_size=1)),
             (7, 8, 32, 64, dict(kernel_size=3, padding=1, groups=4)),
             (4, 8, 32, 32, dict(kernel_size=3, padding=1, groups=32)),
             (5, 9, 16, 48, dict(kernel_size=3, stride=2, padding=1))]
    for n, hw, cin, cout, kwargs in cases:
        conv = nn.Conv2d(cin, cout, dtype=dtype, **kwargs)
        bn = nn.BatchNorm2d(cout).to(dtype)
        bn.running_mean[:] = rng.standard_normal(cout)
        bn.running_var[:] = rng.uniform(0.5, 2.0, cout)
        bn.weight.data[:] = rng.standard_normal(cout)
        bn.bias.data[:] = rng.standard_normal(cout)
        layers = [conv, bn] + ([nn.ReLU()] if relu else [])
        model = nn.Sequential(*layers).eval()
        x = rng.standard_normal((n, hw, hw, cin)).astype(dtype)
        with cnet.threads(threads):
            want = bn(conv(x))
            if relu:
                want = np.maximum(want, 0)
            assert conv.folds_batchnorm(bn)
            got = model(x)
            fused = conv.forward_with_batchnorm(x, bn)   # whatever Sequential chose
            if relu:
                fused = np.maximum(fused, 0)
        np.testing.assert_array_equal(fused, want)
        if conv.folds_batchnorm_weights(bn, x):
            # Sequential folded it into the weights instead: round-off apart
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
    # not in training mode, nor for a batch norm without running statistics
    model.train()
    assert not conv.folds_batchnorm(bn)
    with pytest.raises(ValueError, match="cannot apply"):
        conv.forward_with_batchnorm(x, bn)
    conv.eval()
    assert not conv.folds_batchnorm(nn.BatchNorm2d(cout, track_running_stats=False).to(dtype))
    assert not conv.folds_batchnorm(nn.BatchNorm2d(cout + 1).to(dtype).eval())
    # given the input: not for a small direct layer, unless told to
    small = nn.Conv2d(8, 32, 3, padding=1).to(dtype).eval()
    bn32 = nn.BatchNorm2d(32).to(dtype).eval()
    x = rng.standard_normal((4, 8, 8, 8)).astype(dtype)
    assert small.folds_batchnorm(bn32, x) == (fold_direct_bytes == 0)
    assert not small.folds_batchnorm(bn32, x[..., :4])      # wrong channels: forward raises



@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_batchnorm_folded_into_direct_weights(threads, dtype, rng, monkeypatch):
    # Small direct layers (under _FOLD_DIRECT_BYTES) take the batch norm into their
    # weight and bias: one convolution, the ReLU in its store; equal to the two
    # calls within round-off.  Row and image blocks, grouped, strided, with a bias.
    cases = [(3, 12, 16, 16, dict(kernel_size=3, padding=1, bias=False)),
             (2, 40, 16, 16, dict(kernel_size=3, padding=1, bias=False)),
             (2, 9, 16, 32, dict(kernel_size=3, stride=2, padding=1)),
             (3, 8, 32, 64, dict(kernel_size=3, padding=1, groups=2)),
             (2, 10, 3, 16, dict(kernel_size=5))]
    monkeypatch.setattr(conv_mod, "_FOLD_WEIGHT_RATIO", 0)    # small test maps
    calls = []
    fold = nn.Conv2d.forward_with_folded_batchnorm
    monkeypatch.setattr(nn.Conv2d, "forward_with_folded_batchnorm",
                        lambda self, x, bn, residual=None: (calls.append(1),
                                                            fold(self, x, bn, residual))[1])
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for relu in (False, True):
        for n, hw, cin, cout, kwargs in cases:
            conv = nn.Conv2d(cin, cout, dtype=dtype, **kwargs)
            bn = _eval_batchnorm(cout, dtype, rng)
            model = nn.Sequential(conv, bn, *([nn.ReLU()] if relu else [])).eval()
            x = rng.standard_normal((n, hw, hw, cin)).astype(dtype)
            assert conv.folds_batchnorm_weights(bn, x) and not conv.folds_batchnorm(bn, x)
            del calls[:]
            with cnet.threads(threads):
                got = model(x)
                want = bn.eval_scale_shift()
                raw = conv(x).astype(np.float64)
            assert calls == [1]
            # ahead of the per-chunk batch norm, which big outputs would take
            fold_direct = conv_mod._FOLD_DIRECT_BYTES
            monkeypatch.setattr(conv_mod, "_FOLD_DIRECT_BYTES", 0)
            assert conv.folds_batchnorm(bn, x)
            del calls[:]
            with cnet.threads(threads):
                np.testing.assert_array_equal(model(x), got)
            assert calls == [1]
            monkeypatch.setattr(conv_mod, "_FOLD_DIRECT_BYTES", fold_direct)
            # reference: the layers' own formula in float64
            want = raw * want[0] + want[1]
            if relu:
                want = np.maximum(want, 0)
            scale = np.abs(raw).max() * np.abs(bn.eval_scale_shift()[0]).max()
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
            assert got.dtype == dtype and not (relu and (got < 0).any())


def test_batchnorm_weight_fold_refusals(rng, monkeypatch):
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    bn = _eval_batchnorm(16, np.float32, rng)
    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    # training mode: the batch statistics are not the running ones
    assert not conv.folds_batchnorm_weights(bn, x)
    with pytest.raises(ValueError, match="Conv2d.*cannot fold.*BatchNorm2d"):
        conv.forward_with_folded_batchnorm(x, bn)
    conv.eval()
    # a weight (9 KB) not small against the output (8 KB): its pass costs more
    assert not conv.folds_batchnorm_weights(bn, x)
    big = rng.standard_normal((2, 24, 24, 16)).astype(np.float32)     # 74 KB out
    assert conv.folds_batchnorm_weights(bn, big) == (9216 * conv_mod._FOLD_WEIGHT_RATIO
                                                     <= 73728)
    monkeypatch.setattr(conv_mod, "_FOLD_WEIGHT_RATIO", 0)
    assert conv.folds_batchnorm_weights(bn, x)
    assert not conv.folds_batchnorm_weights(bn, x[..., :8])   # forward's checks will say why
    assert not conv.folds_batchnorm_weights(bn, x.astype(np.float64))
    # a ReLU fused into the convolution comes before the batch norm: not linear
    conv.fuse_relu()
    assert not conv.folds_batchnorm_weights(bn, x)
    with pytest.raises(ValueError, match="cannot fold"):
        conv.forward_with_folded_batchnorm(x, bn)
    # a 1x1 folds too; an im2col layer (a strided 1x1 to 256) keeps the per-chunk batch
    # norm: exact
    assert nn.Conv2d(16, 16, 1).eval().folds_batchnorm_weights(bn, x)
    wide = nn.Conv2d(16, 256, 1, stride=2, bias=False).eval()
    assert wide._paths(np.float32)[0] == "im2col"
    assert not wide.folds_batchnorm_weights(_eval_batchnorm(256, np.float32, rng), x)


def _record_weight_folds(monkeypatch):
    """Weight folds at any map size; returns the list that records each
    forward_with_folded_batchnorm call as (layer, joined a residual)."""
    monkeypatch.setattr(conv_mod, "_FOLD_WEIGHT_RATIO", 0)     # small test maps
    calls = []
    fold = nn.Conv2d.forward_with_folded_batchnorm
    monkeypatch.setattr(nn.Conv2d, "forward_with_folded_batchnorm",
                        lambda self, x, bn, residual=None: (
                            calls.append((self, residual is not None)),
                            fold(self, x, bn, residual))[1])
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_eval_block_folds_weights_and_joins_the_shortcut_in_the_kernel(threads, shortcut, rng,
                                                                       monkeypatch):
    # Both direct convolutions of a ResNet block take their batch norms into their
    # weights; the second adds the shortcut and applies the block's ReLU in the
    # kernel's epilogue (no batch norm or add pass left).
    calls = _record_weight_folds(monkeypatch)
    cin = 16 if shortcut == "identity" else 32
    body = nn.Sequential(nn.Conv2d(cin, 16, 3, padding=1, bias=False),
                         _eval_batchnorm(16, np.float32, rng), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False),
                         _eval_batchnorm(16, np.float32, rng))
    short = (nn.Identity() if shortcut == "identity" else
             nn.Sequential(nn.Conv2d(cin, 16, 1, bias=False),
                           _eval_batchnorm(16, np.float32, rng)))
    block = nn.Sequential(nn.Add(body, short), nn.ReLU()).eval()
    x = rng.standard_normal((3, 12, 12, cin)).astype(np.float32)
    with cnet.threads(threads):
        got = block(x)
        block_calls = list(calls)
        h = x
        for layer in body:
            h = layer(h)
        want = np.maximum(h + short(x), 0)
    # (the projection's 1x1 folds its batch norm too, before the body runs)
    assert block_calls == ([] if shortcut == "identity" else [(short[0], False)]) + [
        (body[0], False), (body[3], True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_bottleneck_folds_its_1x1_layers(threads, dtype, rng, monkeypatch):
    # A ResNeXt bottleneck in eval mode: its 1x1 layers (cnet's GEMM where it has one)
    # take their batch norms into weight and bias too, the ReLU in the GEMM's store and
    # the last one joining the shortcut; within round-off of the separate calls, whose
    # products round differently ((x w) alpha against x (w alpha)).
    calls = _record_weight_folds(monkeypatch)
    body = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), _eval_batchnorm(24, dtype, rng),
                         nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1, groups=3, bias=False),
                         _eval_batchnorm(24, dtype, rng), nn.ReLU(),
                         nn.Conv2d(24, 32, 1), _eval_batchnorm(32, dtype, rng))
    block = nn.Sequential(nn.Add(body, nn.Identity()), nn.ReLU()).to(dtype).eval()
    x = rng.standard_normal((5, 9, 7, 32)).astype(dtype)
    with cnet.threads(threads):
        got = block(x)
        assert (body[0], False) in calls and calls[-1] == (body[6], True)
        h = x                              # the layers one by one, in float64
        for layer in body:
            h = layer(h.astype(dtype)).astype(np.float64)
    want = np.maximum(h + x, 0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    assert got.dtype == dtype and (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_direct_joins_a_residual(dtype, rng):
    from cnet_ext import _conv
    x = rng.standard_normal((6, 7, 7, 16)).astype(dtype)
    w = rng.standard_normal((3, 3, 16, 32)).astype(dtype)
    b = rng.standard_normal(32).astype(dtype)
    r = rng.standard_normal((6, 7, 7, 32)).astype(dtype)
    plain = np.empty_like(r)
    _conv.conv_direct(x, w, b, plain, 0, 6, 1, 1, 1, 1, 1, 1, 2)
    want = np.maximum(plain + r, 0)
    for by_images in (False, True):
        for chunks in (None, [(0, 2), (2, 6)] if not by_images else None):
            got = np.full_like(r, np.nan)
            _conv.conv_direct(x, w, b, got, 0, 6, 1, 1, 1, 1, 1, 1, 2, by_images=by_images,
                              chunks=chunks, residual=r)
            np.testing.assert_array_equal(got, want)
    # grouped rows (staged planes), the ReLU per image
    wg = rng.standard_normal((3, 3, 8, 32)).astype(dtype)
    plain_g = np.empty_like(r)
    _conv.conv_direct(x, wg, None, plain_g, 0, 6, 1, 1, 1, 1, 1, 1, 2, groups=2)
    got = np.empty_like(r)
    _conv.conv_direct(x, wg, None, got, 0, 6, 1, 1, 1, 1, 1, 1, 2, groups=2, residual=r)
    np.testing.assert_array_equal(got, np.maximum(plain_g + r, 0))
    for bad in (r[:, :, :, :16], r.astype(np.float16), np.asfortranarray(r), got, [1.0]):
        with pytest.raises(ValueError, match="conv_direct: the residual must be"):
            _conv.conv_direct(x, w, b, got, 0, 6, 1, 1, 1, 1, 1, 1, 2, residual=bad)


def test_folded_batchnorm_joins_a_residual_on_any_path(rng):
    # Called directly, a 1x1 GEMM layer and a direct one join the residual per chunk;
    # the operands are checked.
    bn = _eval_batchnorm(16, np.float32, rng)
    x = rng.standard_normal((4, 6, 6, 8)).astype(np.float32)
    r = rng.standard_normal((4, 6, 6, 16)).astype(np.float32)
    for conv in (nn.Conv2d(8, 16, 1).eval(), nn.Conv2d(8, 16, 3, padding=1).eval()):
        got = conv.forward_with_folded_batchnorm(x, bn, r)
        want = np.maximum(bn(conv(x)) + r, 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        with pytest.raises(ValueError, match=r"Conv2d.*residual.*\(4, 6, 6, 16\)"):
            conv.forward_with_folded_batchnorm(x, bn, r[..., :8].copy())
    bn.fuse_relu()
    with pytest.raises(ValueError, match="must not apply one itself"):
        conv.forward_with_folded_batchnorm(x, bn, r)


def _eval_batchnorm(cout, dtype, rng):
    bn = nn.BatchNorm2d(cout).to(dtype)
    bn.running_mean[:] = rng.standard_normal(cout)
    bn.running_var[:] = rng.uniform(0.5, 2.0, cout)
    bn.weight.data[:] = rng.standard_normal(cout)
    bn.bias.data[:] = rng.standard_normal(cout)
    return bn.eval()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_eval_residual_block_joins_the_shortcut_per_chunk(threads, dtype, shortcut, rng,
                                                          monkeypatch):
    # Eval mode: Add(body ending in conv + batch norm, shortcut) + ReLU adds the
    # shortcut and applies the ReLU to each chunk of the last convolution's output
    # (1x1 GEMM and direct 3x3 bodies), bitwise as the layers one after another.
    monkeypatch.setattr(conv_mod, "_FOLD_DIRECT_BYTES", 0)
    monkeypatch.setattr(conv_mod, "_FOLD_WEIGHT_RATIO", 1 << 40)   # no weight folds
    cin = 32 if shortcut == "identity" else 16
    for last in (dict(kernel_size=1), dict(kernel_size=3, padding=1, groups=4)):
        body = nn.Sequential(nn.Conv2d(cin, 32, 1, bias=False, dtype=dtype),
                             _eval_batchnorm(32, dtype, rng), nn.ReLU(),
                             nn.Conv2d(32, 32, bias=False, dtype=dtype, **last),
                             _eval_batchnorm(32, dtype, rng))
        short = (nn.Identity() if shortcut == "identity" else
                 nn.Sequential(nn.Conv2d(cin, 32, 1, bias=False, dtype=dtype),
                               _eval_batchnorm(32, dtype, rng)))
        block = nn.Sequential(nn.Add(body, short), nn.ReLU()).eval()
        x = rng.standard_normal((6, 9, 9, cin)).astype(dtype)
        residuals = []
        fold = nn.Conv2d.forward_with_batchnorm
        monkeypatch.setattr(nn.Conv2d, "forward_with_batchnorm",
                            lambda self, x, bn, residual=None: (
                                residuals.append(residual is not None),
                                fold(self, x, bn, residual))[1])
        with cnet.threads(threads):
            got = block(x)
        monkeypatch.setattr(nn.Conv2d, "forward_with_batchnorm", fold)
        # every conv + batch norm folded; the body's last one joined the shortcut
        assert residuals.count(True) == 1 and len(residuals) == (2 if cin == 32 else 3)
        with cnet.threads(threads):
            h = x
            for layer in body:
                h = layer(h)
            want = np.maximum(h + short(x), 0)
        np.testing.assert_array_equal(got, want)


def test_residual_join_refusals(rng, monkeypatch):
    monkeypatch.setattr(conv_mod, "_FOLD_DIRECT_BYTES", 0)
    conv = nn.Conv2d(8, 16, 1).eval()
    bn = _eval_batchnorm(16, np.float32, rng)
    x = rng.standard_normal((2, 5, 5, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"Conv2d.*residual.*\(2, 5, 5, 16\).*\(2, 5, 5, 8\)"):
        conv.forward_with_batchnorm(x, bn, residual=np.zeros((2, 5, 5, 8), np.float32))
    bn.fuse_relu()
    with pytest.raises(ValueError, match="must not apply one itself"):
        conv.forward_with_batchnorm(x, bn, residual=np.zeros((2, 5, 5, 16), np.float32))
    # A shortcut the body's output cannot join: the Add's own error, as in training.
    block = nn.Sequential(nn.Add(nn.Sequential(nn.Conv2d(8, 16, 1), _eval_batchnorm(
        16, np.float32, rng)), nn.Identity()), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="Add: branch outputs differ in shape"):
        block(x)


@pytest.fixture
def own_gemm_off():
    """BLAS and the direct kernels for 1x1 layers, as on machines without AVX-512 (with
    it, ungrouped 1x1 layers run on cnet's GEMM whatever their width)."""
    from cnet_ext import _conv
    previous = _conv.gemm_kernel(False)
    yield
    _conv.gemm_kernel(previous)


@pytest.fixture
def gemm_kernel_on():
    """cnet's own 1x1 GEMM, whatever this machine's default (it is on where AVX-512
    is: elsewhere the layers use BLAS and only these tests run the kernel)."""
    from cnet_ext import _conv
    previous = _conv.gemm_kernel(True)
    yield _conv
    _conv.gemm_kernel(previous)


def test_gemm_packed_few_rows_split_columns_bitwise(rng, gemm_kernel_on):
    """Fewer row blocks than threads (one image's small map): the threads take column
    panels; bias, ReLU, accumulate and a partial last panel, the same bits as one
    thread and the reference's values."""
    _conv = gemm_kernel_on
    for m, k, n in [(16, 4608, 520), (4, 700, 130), (255, 300, 200)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        packed = _conv.gemm_pack(b)
        start = rng.standard_normal((m, n)).astype(np.float32)
        for use_bias, relu, accumulate in [(True, False, False), (True, True, False),
                                           (False, True, True)]:
            got = []
            for threads in (1, 2):
                c = start.copy()
                _conv.gemm_packed(a, packed, c, bias if use_bias else None, relu, 0, m,
                                  threads, accumulate=accumulate)
                got.append(c)
            np.testing.assert_array_equal(got[0], got[1])
            want = a.astype(np.float64) @ b + (bias if use_bias else 0) + (
                start if accumulate else 0)
            if relu:
                want = np.maximum(want, 0)
            np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_reads_b_in_place_bitwise(dtype, rng, gemm_kernel_on):
    """B itself (whole vectors of columns) in place of gemm_pack(B): the same bits,
    with bias, ReLU, accumulate, several blocks of K, row and column splits; B of
    the wrong shape or of partial vectors refused."""
    _conv = gemm_kernel_on
    lanes = _conv.direct_lanes(np.dtype(dtype))
    for m, k, n in [(5, 3, lanes), (16, 600, 8 * lanes), (300, 70, 5 * lanes)]:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype)
        start = rng.standard_normal((m, n)).astype(dtype)
        assert _conv.gemm_inplace_fits(n, dtype)
        for use_bias, relu, accumulate in [(True, True, False), (False, False, True)]:
            for threads in (1, 2):
                got = []
                for operand in (_conv.gemm_pack(b), b):
                    c = start.copy()
                    _conv.gemm_packed(a, operand, c, bias if use_bias else None, relu, 0, m,
                                      threads, accumulate=accumulate)
                    got.append(c)
                np.testing.assert_array_equal(got[0], got[1])
    assert not _conv.gemm_inplace_fits(lanes + 1, dtype)
    a = np.zeros((4, 3), dtype)
    with pytest.raises(ValueError, match="read in place"):
        _conv.gemm_packed(a, np.zeros((3, lanes + 1), dtype), np.zeros((4, lanes + 1), dtype),
                          None, False, 0, 4, 1)
    with pytest.raises(ValueError, match="read in place"):
        _conv.gemm_packed(a, np.zeros((4, lanes), dtype), np.zeros((4, lanes), dtype),
                          None, False, 0, 4, 1)


def test_small_batch_forward_reads_the_weight_in_place(rng, monkeypatch, direct_blocking):
    # A 1x1 and an im2col layer at batch 1: the GEMM gets the weight itself (no
    # packing per call); the same output as with the packed weight.
    from cnet_ext import _conv
    if not _conv.gemm_kernel():
        pytest.skip("the layers use BLAS on this machine")
    seen = []
    real = _conv.gemm_packed

    def spy(a, bp, *args, **kw):
        seen.append(np.ndim(bp))
        return real(a, bp, *args, **kw)
    monkeypatch.setattr(_conv, "gemm_packed", spy)
    layers = [(nn.Conv2d(64, 128, 1), 8)]
    if direct_blocking == "row blocks":          # else the 3x3 takes the image blocks
        layers.append((nn.Conv2d(256, 512, 3, padding=1), 4))
    for layer, hw in layers:
        layer.eval()
        x = rng.standard_normal((1, hw, hw, layer.in_channels)).astype(np.float32)
        seen.clear()
        y = layer(x)
        assert seen and set(seen) == {2}
        monkeypatch.setattr(conv_mod, "_GEMM_INPLACE_ROWS", 0)
        again = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size,
                            padding=layer.padding)
        again.weight.data[...] = layer.weight.data
        again.bias.data[...] = layer.bias.data
        again.eval()
        seen.clear()
        np.testing.assert_array_equal(again(x), y)
        assert seen and set(seen) == {1}
        monkeypatch.setattr(conv_mod, "_GEMM_INPLACE_ROWS", 256)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_packed_matches_reference(dtype, rng, gemm_kernel_on):
    """C = A B (+ bias) (ReLU) against float64 numpy: tails of rows (not whole 6-row
    tiles) and columns (not whole panels, not whole vectors), several blocks of K
    and of columns, a transposed B, NaN through the ReLU, rows outside [r0, r1)
    untouched, 1 and 2 threads bitwise."""
    _conv = gemm_kernel_on
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for m, k, n in [(1, 1, 1), (7, 3, 5), (13, 16, 48), (100, 70, 90), (50, 600, 17),
                    (31, 300, 600), (257, 40, 64)]:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype)
        a[0, 0] = np.nan                      # row 0 all NaN: kept through the ReLU
        for b_view in (b, np.asfortranarray(b)):
            packed = _conv.gemm_pack(b_view, None, 2)
            np.testing.assert_array_equal(packed, _conv.gemm_pack(b_view))
            for use_bias in (False, True):
                for relu in (False, True):
                    want = a.astype(np.float64) @ b + (bias if use_bias else 0)
                    if relu:
                        want = np.where(want < 0, 0, want)
                    got = {}
                    for threads in (1, 2):
                        c = np.full((m, n), 7, dtype)
                        _conv.gemm_packed(a, packed, c, bias if use_bias else None, relu,
                                             0, m, threads)
                        got[threads] = c
                    np.testing.assert_array_equal(got[1], got[2])
                    assert np.isnan(got[1][0]).all()
                    np.testing.assert_allclose(got[1][1:], want[1:], rtol=tol, atol=tol * k)
        r0, r1 = m // 3, m - m // 4
        c = np.full((m, n), 7, dtype)
        _conv.gemm_packed(a, _conv.gemm_pack(b), c, None, False, r0, r1, 2)
        np.testing.assert_array_equal(c[r1:], 7)
        np.testing.assert_array_equal(c[:r0], 7)
        np.testing.assert_allclose(c[max(r0, 1):r1], (a @ b)[max(r0, 1):r1], rtol=tol,
                                   atol=tol * k)
        # accumulate: C += A B (ReLU of the sum), rows outside [r0, r1) untouched
        start = rng.standard_normal((m, n)).astype(dtype)
        for relu in (False, True):
            want = start.astype(np.float64) + a.astype(np.float64) @ b
            if relu:
                want = np.where(want < 0, 0, want)
            got = {}
            for threads in (1, 2):
                c = start.copy()
                _conv.gemm_packed(a, _conv.gemm_pack(b), c, None, relu, r0, r1, threads,
                                  accumulate=True)
                got[threads] = c
            np.testing.assert_array_equal(got[1], got[2])
            np.testing.assert_array_equal(got[1][:r0], start[:r0])
            np.testing.assert_array_equal(got[1][r1:], start[r1:])
            lo = max(r0, 1)
            np.testing.assert_allclose(got[1][lo:r1], want[lo:r1], rtol=tol, atol=tol * k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_tn_matches_reference(dtype, rng, gemm_kernel_on):
    """gw (+)= x[r0:r1].T @ dy[r0:r1] against float64 numpy: input channels not in
    whole 6-row tiles or 24-column blocks, output channels not in whole panels,
    several blocks of rows, an empty range, 1 and 2 threads bitwise."""
    _conv = gemm_kernel_on
    lanes = _conv.direct_lanes(np.dtype(dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for m, k, n in [(1, 1, lanes), (7, 3, 5 * lanes), (100, 70, 6 * lanes),
                    (1100, 13, 2 * lanes), (64, 260, 9 * lanes), (600, 50, 3 * lanes)]:
        x = rng.standard_normal((m, k)).astype(dtype)
        dy = rng.standard_normal((m, n)).astype(dtype)
        start = rng.standard_normal((k, n)).astype(dtype)
        for r0, r1 in ((0, m), (m // 3, m), (m // 2, m // 2)):
            part = x[r0:r1].T.astype(np.float64) @ dy[r0:r1]
            for accumulate in (False, True):
                got = {}
                for threads in (1, 2):
                    gw = start.copy()
                    _conv.gemm_tn(x, dy, gw, accumulate, r0, r1, threads)
                    got[threads] = gw
                np.testing.assert_array_equal(got[1], got[2])
                want = part + start if accumulate else part
                np.testing.assert_allclose(got[1], want, rtol=tol, atol=tol * max(1, r1 - r0))


def test_gemm_kernel_errors(gemm_kernel_on):
    _conv = gemm_kernel_on
    a, c = np.zeros((8, 5), np.float32), np.zeros((8, 20), np.float32)
    packed = _conv.gemm_pack(np.zeros((5, 20), np.float32))
    assert packed.shape == (_conv.gemm_packed_size(5, 20, np.float32),) == (5 * 32,)
    with pytest.raises(ValueError, match="not gemm_pack of a 5 x 40"):
        _conv.gemm_packed(a, packed, np.zeros((8, 40), np.float32), None, False, 0, 8, 1)
    with pytest.raises(ValueError, match=r"rows \[0, 9\)"):
        _conv.gemm_packed(a, packed, c, None, False, 0, 9, 1)
    with pytest.raises(ValueError, match="bias of 3 values for 20"):
        _conv.gemm_packed(a, packed, c, np.zeros(3, np.float32), False, 0, 8, 1)
    with pytest.raises(ValueError, match="a bias is not taken with it"):
        _conv.gemm_packed(a, packed, c, np.zeros(20, np.float32), False, 0, 8, 1,
                          accumulate=True)
    square = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="A and C overlap"):
        _conv.gemm_packed(square, _conv.gemm_pack(square), square, None, False, 0, 8, 1)
    rows = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match="A and C overlap"):   # C shares rows of A
        _conv.gemm_packed(rows[:8], _conv.gemm_pack(square), rows[6:14], None, False, 0, 8, 1)
    _conv.gemm_packed(rows[:8], _conv.gemm_pack(square), rows[8:], None, False, 0, 8, 1)
    with pytest.raises(ValueError, match="2-D float32/float64"):
        _conv.gemm_pack(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        _conv.gemm_pack(np.zeros((5, 20), np.float32), np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="C_out 20 is not a multiple of 16"):
        _conv.gemm_tn(a, c, np.zeros((5, 20), np.float32), False, 0, 8, 1)
    with pytest.raises(ValueError, match="do not fit"):
        _conv.gemm_tn(a, np.zeros((8, 32), np.float32), np.zeros((6, 32), np.float32),
                      False, 0, 8, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_into_adds_the_input_gradient(dtype, rng, gemm_kernel_on, monkeypatch):
    """Conv2d._backward_into(dy, into) leaves into + dL/dx and backward's weight and
    bias gradients: in the GEMM's store for a 1x1 layer on cnet's GEMM (over
    several chunks), by backward-then-add for a 3x3 layer, an ``into`` that is dy
    itself, BLAS, and a backward replaced on the instance (a profiler's wrapper
    must see its call); None and ``into`` untouched without an input gradient."""
    _conv = gemm_kernel_on
    monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 1 << 16)   # several chunks
    accumulated = spy_gemm_accumulate(monkeypatch, _conv)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for cin, cout, kwargs, own, fused in [(40, 40, {}, True, True),
                                         (24, 56, dict(bias=True), True, True),
                                         (24, 56, dict(kernel_size=3, padding=1), True, False),
                                         (24, 56, {}, False, False)]:
        _conv.gemm_kernel(own)
        conv = nn.Conv2d(cin, cout, kwargs.pop("kernel_size", 1), dtype=dtype,
                         bias=kwargs.pop("bias", False), **kwargs)
        x = rng.standard_normal((12, 9, 7, cin)).astype(dtype)
        dy = rng.standard_normal(conv.output_shape(x.shape)).astype(dtype)
        start = rng.standard_normal(x.shape).astype(dtype)
        with cnet.threads(2):
            conv.zero_grad()
            conv(x)
            dx = conv.backward(dy)
            want = [p.grad.copy() for p in conv.parameters()]
            conv.zero_grad()
            conv(x)
            into = start.copy()
            accumulated.clear()
            assert conv._backward_into(dy, into) is into
        assert (True in accumulated) == fused
        np.testing.assert_allclose(into, start + dx, rtol=tol, atol=tol)
        for p, w in zip(conv.parameters(), want):
            np.testing.assert_allclose(p.grad, w, rtol=tol, atol=tol)
        if cin == cout:                      # into is dy: backward, then the add
            conv(x)
            both = dy.copy()
            accumulated.clear()
            conv._backward_into(both, both)
            assert True not in accumulated
            np.testing.assert_allclose(both, dy + dx, rtol=tol, atol=tol)
    _conv.gemm_kernel(True)
    conv = nn.Conv2d(16, 32, 1, dtype=dtype)
    x = rng.standard_normal((4, 5, 5, 16)).astype(dtype)
    dy = rng.standard_normal(conv.output_shape(x.shape)).astype(dtype)
    seen = []
    conv.backward = lambda g: seen.append(g) or nn.Conv2d.backward(conv, g)
    conv(x)
    into = np.zeros_like(x)
    conv._backward_into(dy, into)
    assert len(seen) == 1 and np.abs(into).max() > 0
    del conv.backward
    conv.requires_input_grad_(False)
    conv(x)
    into = np.ones_like(x)
    assert conv._backward_into(dy, into) is None
    np.testing.assert_array_equal(into, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_on_own_gemm_match_blas(dtype, rng, gemm_kernel_on, monkeypatch):
    """1x1 and im2col layers on cnet's GEMM (forward with bias and fused ReLU, input
    and weight gradients over several chunks and stripes, the eval batch norm per
    chunk) give what the BLAS path gives."""
    _conv = gemm_kernel_on
    monkeypatch.setattr(conv_mod, "_IMAGE_BLOCK_MAX_WIDTH", 0)   # im2col, not image blocks
    monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 1 << 16)   # several chunks
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for cin, cout, relu, bias, kwargs, paths in [
            (70, 96, True, True, {}, ("pointwise", "gemm", "pointwise")),
            (128, 80, False, False, {}, ("pointwise", "gemm", "pointwise")),
            (144, 160, False, True, dict(stride=2), ("im2col", "gemm", "col2im")),
            (48, 144, True, False, dict(kernel_size=3, padding=1), ("im2col", "gemm", "col2im"))]:
        conv = nn.Conv2d(cin, cout, kwargs.pop("kernel_size", 1), bias=bias, dtype=dtype,
                         **kwargs)
        if relu:
            conv.fuse_relu()
        assert conv._paths(dtype)[:3] == paths
        x = rng.standard_normal((12, 9, 7, cin)).astype(dtype)
        dy = rng.standard_normal(conv.output_shape(x.shape)).astype(dtype)
        results = {}
        for own in (True, False):
            _conv.gemm_kernel(own)
            conv.zero_grad()
            with cnet.threads(2):
                y = conv(x)
                dx = conv.backward(dy)
            results[own] = (y, dx, conv.weight.grad.copy(),
                            None if conv.bias is None else conv.bias.grad.copy())
        _conv.gemm_kernel(True)
        for got, want in zip(results[True], results[False]):
            if want is not None:
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        bn = _eval_batchnorm(cout, dtype, rng)
        conv.eval()
        if not relu:
            np.testing.assert_allclose(conv.forward_with_batchnorm(x, bn), bn(conv(x)),
                                       rtol=tol, atol=tol)


def _piece_moments_reference(y2, slots, counts, dtype):
    """Each piece's mean and sum of squared deviations, checked against float64 numpy
    over its rows (pieces cover y2's rows in order)."""
    C = y2.shape[1]
    cp = (C + 7) // 8 * 8
    assert slots.shape == (len(counts), 4 * cp) and counts.min() > 0
    assert counts.sum() == y2.shape[0]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    r0 = 0
    for piece, n in enumerate(counts):
        rows = y2[r0:r0 + n].astype(np.float64)
        scale = np.abs(rows).max() + 1
        np.testing.assert_allclose(slots[piece, :C], rows.mean(0), rtol=tol, atol=tol * scale)
        m2 = ((rows - rows.mean(0)) ** 2).sum(0)
        np.testing.assert_allclose(slots[piece, cp:cp + C], m2, rtol=tol,
                                   atol=tol * scale * scale * n)
        r0 += n


# (in, out, kernel, stride, groups, input (N, H)): direct (row / image blocks,
# strided, grouped, 5x5, one image: fewer chunks than threads), cnet's 1x1 GEMM (row
# blocks) or BLAS (chunks), im2col (outputs not in whole vectors), depthwise
_MOMENT_CASES = [(16, 16, 3, 1, 1, (5, 9)), (16, 32, 3, 2, 1, (4, 11)), (16, 16, 3, 1, 1, (1, 20)),
                 (32, 64, 3, 1, 2, (3, 8)), (3, 16, 5, 1, 1, (3, 12)),
                 (24, 40, 1, 1, 1, (7, 23)), (8, 12, 3, 1, 1, (3, 7)),
                 (16, 16, 3, 1, 16, (3, 9))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("own_gemm", [True, False])
def test_convolution_takes_batchnorm_moments_per_chunk(threads, dtype, own_gemm, rng):
    # Training: forward_with_batch_moments gives the forward's output bitwise and
    # each chunk's (row block's) moments of it, on every path; the pieces do not
    # depend on the thread count.
    from cnet_ext import _conv
    previous = _conv.gemm_kernel(own_gemm)
    try:
        for cin, cout, k, stride, groups, (n, hw) in _MOMENT_CASES:
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                             bias=k == 1, dtype=dtype)
            x = (3.0 + rng.standard_normal((n, hw, hw, cin))).astype(dtype)
            with cnet.threads(threads):
                y, (slots, counts) = conv.forward_with_batch_moments(x)
                np.testing.assert_array_equal(y, conv(x))
            with cnet.threads(3 - threads):
                y_other, (slots_other, counts_other) = conv.forward_with_batch_moments(x)
            np.testing.assert_array_equal(y_other, y)
            np.testing.assert_array_equal(counts_other, counts)
            np.testing.assert_array_equal(slots_other[:, :cout], slots[:, :cout])
            _piece_moments_reference(y.reshape(-1, cout), slots, counts, dtype)
            assert conv._x is x                  # cached for backward as by forward
    finally:
        _conv.gemm_kernel(previous)


def _training_step(model, x, threads, calls):
    """(y, dx, parameter gradients, buffers, len(calls)) of one forward and backward
    (a fixed output gradient) on ``threads`` threads; ``calls`` emptied first."""
    del calls[:]
    model.zero_grad()
    with cnet.threads(threads):
        y = model(x)
        dx = model.backward(np.cos(np.arange(y.size)).reshape(y.shape).astype(x.dtype))
    return (y, dx, [p.grad.copy() for p in model.parameters()],
            [b.copy() for b in model.buffers()], len(calls))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_batchnorm_uses_the_convolutions_moments(threads, dtype, rng, monkeypatch):
    # Sequential(conv, BatchNorm2d[, ReLU]) in training: the batch norm's statistics
    # come from the convolution's chunks; output, running statistics and every
    # gradient equal the separate passes within round-off, over two SGD-free steps
    # (and the float64 formula for the batch statistics).
    calls = []
    take = nn.Conv2d.forward_with_batch_moments
    monkeypatch.setattr(nn.Conv2d, "forward_with_batch_moments",
                        lambda self, x: (calls.append(1), take(self, x))[1])
    tol = 2e-5 if dtype == np.float32 else 1e-11
    for cin, cout, k, stride, groups, (n, hw) in _MOMENT_CASES:
        for relu in (False, True):
            def build():
                cnet.manual_seed(5)
                return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2,
                                               groups=groups, bias=False),
                                     nn.BatchNorm2d(cout),
                                     *([nn.ReLU()] if relu else [])).to(dtype).train()
            fused, plain = build(), build()
            plain[1].forward = lambda x, bn=plain[1]: type(bn).forward(bn, x)  # no fusion
            for step in range(2):
                x = (2.0 + rng.standard_normal((n, hw, hw, cin))).astype(dtype)
                (y1, dx1, g1, b1, c1), (y2, dx2, g2, b2, c2) = (
                    _training_step(model, x, threads, calls) for model in (fused, plain))
                assert (c1, c2) == (1, 0)
                scale = np.abs(y2).max() + 1
                np.testing.assert_allclose(y1, y2, rtol=tol, atol=tol * scale)
                np.testing.assert_allclose(dx1, dx2, rtol=tol, atol=tol * (np.abs(dx2).max() + 1))
                for a, b in zip(g1 + b1, g2 + b2):
                    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * (np.abs(b).max() + 1))
            raw = fused[0](x).astype(np.float64).reshape(-1, cout)
            np.testing.assert_allclose(fused[1]._work[0], raw.mean(0), rtol=tol,
                                       atol=tol * (np.abs(raw).max() + 1))
            np.testing.assert_allclose(fused[1]._work[1], 1 / np.sqrt(raw.var(0) + 1e-5),
                                       rtol=tol)


def test_batch_moments_refusals(rng):
    from cnet_ext import _batchnorm, _conv
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(16)
    x = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)
    assert conv.collects_batch_moments(bn, x)
    assert not conv.collects_batch_moments(nn.BatchNorm2d(8), x)         # other channels
    assert not conv.collects_batch_moments(bn, x.astype(np.float64))     # other dtype
    assert not conv.collects_batch_moments(bn, x[..., :8])               # a bad input
    bn.eval()
    assert not conv.collects_batch_moments(bn, x)       # eval: the running statistics
    with pytest.raises(ValueError, match="BatchNorm2d.*precomputed moments are for training"):
        bn._forward(x, None, _batchnorm.moment_slots(1, 16))
    bn.train()
    conv.eval()
    assert not conv.collects_batch_moments(bn, x)
    relu_conv = nn.Conv2d(16, 16, 3, padding=1)
    relu_conv.fuse_relu()
    assert not relu_conv.collects_batch_moments(bn, x)
    with pytest.raises(ValueError, match="Conv2d.*moments are of the raw output"):
        relu_conv.forward_with_batch_moments(x)
    # the kernels: pieces per chunk, of the raw output
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    y = np.empty_like(x)
    with pytest.raises(ValueError, match="conv_direct: moments are taken per chunk"):
        _conv.conv_direct(x, w, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1,
                          moments=_batchnorm.moment_slots(1, 16))
    with pytest.raises(ValueError, match=r"conv_direct: moments must be moment_slots\(2, 16\)"):
        _conv.conv_direct(x, w, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1, chunks=[(0, 1), (1, 2)],
                          moments=_batchnorm.moment_slots(1, 16))
    with pytest.raises(ValueError, match="conv_direct: moments are of the convolution's own"):
        _conv.conv_direct(x, w, None, y, 0, 2, 1, 1, 1, 1, 1, 1, 1, chunks=[(0, 2)],
                          relu=True, moments=_batchnorm.moment_slots(1, 16))
    a = rng.standard_normal((300, 8)).astype(np.float32)
    c = np.empty((300, 16), np.float32)
    packed = _conv.gemm_pack(rng.standard_normal((8, 16)).astype(np.float32))
    assert _conv.gemm_row_blocks(0, 300) == 2
    with pytest.raises(ValueError, match="gemm_packed: moments are of the convolution's own"):
        _conv.gemm_packed(a, packed, c, None, True, 0, 300, 1,
                          moments=_batchnorm.moment_slots(2, 16))
    with pytest.raises(ValueError, match=r"gemm_packed: moments must be moment_slots\(2, 16\)"):
        _conv.gemm_packed(a, packed, c, None, False, 0, 300, 1,
                          moments=_batchnorm.moment_slots(2, 8))
    slots, counts = _batchnorm.moment_slots(2, 16)
    _conv.gemm_packed(a, packed, c, None, False, 0, 300, 2, moments=(slots, counts))
    _piece_moments_reference(c, slots, counts, np.float32)


def test_subclass_forward_turns_the_joined_paths_off(rng):
    # A subclass that overrides forward (or a wrapper on the instance) is called: the
    # paths that join a convolution and its batch norm in one pass (training moments,
    # eval folds, the residual join) stand only for the classes' own forwards.
    calls = []

    class LoggedBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            calls.append("bn")
            return super().forward(x)

    class LoggedConv(nn.Conv2d):
        def forward(self, x):
            calls.append("conv")
            return super().forward(x)

    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    for conv_cls, bn_cls, want in ((nn.Conv2d, LoggedBatchNorm, ["bn"]),
                                   (LoggedConv, nn.BatchNorm2d, ["conv"])):
        conv, bn = conv_cls(16, 16, 3, padding=1, bias=False), bn_cls(16)
        assert not conv.collects_batch_moments(bn, x)
        assert not conv.folds_batchnorm(bn)
        model = nn.Sequential(conv, bn, nn.ReLU())
        for training in (True, False):
            model.train(training)
            del calls[:]
            model(x)
            assert calls == want
    body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), LoggedBatchNorm(16))
    assert not body[1].joins_residual(x, x.copy())
    del calls[:]
    nn.Sequential(nn.Add(body, nn.Identity()), nn.ReLU()).train()(x)
    assert calls == ["bn"]


def _unfused_conv_backward(model):
    """Wrap every Conv2d's backward on the instance: the joined backward paths step
    aside (runs_own), leaving the layers' separate backward calls."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.backward = lambda g, m=m: nn.Conv2d.backward(m, g)
    return model


def _chunked_grad_models(lanes, affine):
    """(name, build, fused pairs, batch, size, C_in) for the chunked batch-norm gradient:
    the 1x1 on cnet's GEMM (needs AVX-512), the direct kernels' region (3x3 with the
    flipped-kernel dx, grouped, the scatter dx of few inputs, no dx at all), a
    residual block whose body's first layer adds into the block's gradient, and
    pairs that keep their separate calls (a strided layer's phase dx, a bias)."""
    L = lanes
    few = 3 * L // 8 + 2          # (past the planar dx's 4 inputs)

    def chain(conv, bn_channels, relu=True):
        return lambda: nn.Sequential(conv(), nn.BatchNorm2d(bn_channels, affine=affine),
                                     *([nn.ReLU()] if relu else []))

    def first_layer():
        model = chain(lambda: nn.Conv2d(L, L, 3, padding=1, bias=False), L)()
        return model.requires_input_grad_(False)

    def block():
        body = nn.Sequential(nn.Conv2d(2 * L, 2 * L, 1, bias=False), nn.BatchNorm2d(2 * L),
                             nn.ReLU(), nn.Conv2d(2 * L, 2 * L, 3, padding=1, groups=2,
                                                  bias=False),
                             nn.BatchNorm2d(2 * L), nn.ReLU(),
                             nn.Conv2d(2 * L, 2 * L, 1, bias=False),
                             nn.BatchNorm2d(2 * L, affine=affine))
        return nn.Sequential(nn.Add(body, nn.Identity()), nn.ReLU())

    return [
        ("1x1", chain(lambda: nn.Conv2d(16, 2 * L, 1, bias=False), 2 * L, False), 1, 5, 9, 16),
        ("3x3", chain(lambda: nn.Conv2d(L, 2 * L, 3, padding=1, bias=False), 2 * L), 1, 9, 8, L),
        ("3x3 one image", chain(lambda: nn.Conv2d(L, L, 3, padding=1, bias=False), L), 1, 1, 11,
         L),
        ("grouped", chain(lambda: nn.Conv2d(2 * L, 2 * L, 3, padding=1, groups=2, bias=False),
                          2 * L), 1, 4, 7, 2 * L),
        # (a kernel row of 3 * few inputs fills one to two vectors: _conv.scatter_dx_fits)
        ("scatter dx", chain(lambda: nn.Conv2d(few, L, 3, padding=1, bias=False), L), 1, 3, 9,
         few),
        ("no dx", first_layer, 1, 4, 6, L),
        ("block", block, 3, 3, 7, 2 * L),
        ("strided", chain(lambda: nn.Conv2d(L, L, 3, stride=2, padding=1, bias=False), L), 0, 3,
         9, L),
        ("bias", chain(lambda: nn.Conv2d(L, L, 3, padding=1), L), 0, 3, 6, L),
    ]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("one_image_chunks", [False, True])
def test_batchnorm_gradient_made_by_chunks_in_the_convolution(threads, dtype, one_image_chunks,
                                                              rng, monkeypatch):
    # Sequential's training backward through a convolution and the batch norm after
    # it: the batch norm writes each chunk of the convolution's output gradient
    # into a buffer right before the chunk's kernels read it
    # (backward_through_batchnorm); the input and every parameter gradient bitwise
    # those of the separate backward calls, the residual block's add into its
    # gradient included (Add(body, Identity) + ReLU).
    from cnet_ext import _conv
    calls = []
    take = nn.Conv2d.backward_through_batchnorm
    monkeypatch.setattr(nn.Conv2d, "backward_through_batchnorm",
                        lambda self, *a: (calls.append(1), take(self, *a))[1])
    lanes = _conv.direct_lanes(np.dtype(dtype))
    if one_image_chunks:
        # several chunks per stripe (each stripe's buffer reused, its images addressed
        # from each chunk's first)
        monkeypatch.setattr(conv_mod, "_KERNEL_CHUNK_BYTES", 1)
        monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 1)
    for affine in (True, False):
        for name, build, pairs, n, hw, cin in _chunked_grad_models(lanes, affine):
            models = []
            for _ in range(2):
                cnet.manual_seed(3)
                models.append(build().to(dtype).train())
            fused, plain = models[0], _unfused_conv_backward(models[1])
            x = (1.0 + rng.standard_normal((n, hw, hw, cin))).astype(dtype)
            (_, dx1, g1, _, c1), (_, dx2, g2, _, c2) = (
                _training_step(model, x, threads, calls) for model in (fused, plain))
            # (without AVX-512 the 1x1 layers keep the separate calls)
            assert c2 == 0 and (c1 == pairs or not _conv.gemm_kernel()), name
            if dx2 is None:
                assert dx1 is None
            else:
                np.testing.assert_array_equal(dx1, dx2, err_msg=name)
            for a, b in zip(g1, g2):
                np.testing.assert_array_equal(a, b, err_msg=name)
    # and the numbers themselves: float64 layers against finite differences
    if dtype == np.float64 and threads == 2:
        for conv in (nn.Conv2d(8, lanes, 1, bias=False),
                     nn.Conv2d(8, lanes, 3, padding=1, bias=False)):
            cnet.manual_seed(4)
            model = nn.Sequential(conv, nn.BatchNorm2d(lanes), nn.ReLU()).to(dtype).train()
            check_gradients(model, rng.standard_normal((3, 4, 5, 8)))


def test_batchnorm_gradient_by_chunks_refusals(rng):
    from cnet_ext import _conv
    if not _conv.gemm_kernel():
        pytest.skip("cnet's own GEMM needs AVX-512: the 1x1 takes no chunked gradient")
    x = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)

    def pair(conv=None, bn=None):
        conv = conv or nn.Conv2d(16, 32, 1, bias=False)
        bn = bn or nn.BatchNorm2d(32)
        bn(conv(x))
        return conv, bn, rng.standard_normal(bn._cache.shape).astype(np.float32)

    conv, bn, g = pair()
    assert conv.takes_batchnorm_grad(bn, g)
    into = np.zeros_like(x)
    assert conv.takes_batchnorm_grad(bn, g, into)
    assert not conv.takes_batchnorm_grad(bn, g, into[:1])       # into of another shape
    assert not conv.takes_batchnorm_grad(bn, g, x)              # into is the input
    ginto = np.zeros((2, 6, 6, 32), np.float32)
    assert not nn.Conv2d(32, 32, 1, bias=False).takes_batchnorm_grad(bn, ginto, ginto)
    assert not conv.takes_batchnorm_grad(nn.BatchNorm2d(32), g)   # no forward cache
    biased = pair(nn.Conv2d(16, 32, 1))
    assert not biased[0].takes_batchnorm_grad(*biased[1:])      # dy whole for the bias sums
    assert pair(nn.Conv2d(16, 32, 3, padding=1, bias=False))[0].takes_batchnorm_grad(bn, g)
    strided = pair(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False))
    assert not strided[0].takes_batchnorm_grad(*strided[1:])    # the phase dx: Python tasks
    depthwise = pair(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))
    assert not depthwise[0].takes_batchnorm_grad(*depthwise[1:])
    relu_conv = nn.Conv2d(16, 32, 1, bias=False)
    relu_conv.fuse_relu()
    assert not relu_conv.takes_batchnorm_grad(*pair(relu_conv)[1:])
    with pytest.raises(ValueError, match=r"Conv2d\(16, 32.*cannot take BatchNorm2d\(32.*"
                                         "gradient by chunks"):
        relu_conv.backward_through_batchnorm(bn, g)
    with pytest.raises(ValueError, match=r"Conv2d\(16, 32.*does not take its output gradient"):
        relu_conv._backward(None, bn_grad=bn.backward_rows(g))

    class LoggedBatchNorm(nn.BatchNorm2d):
        def backward(self, grad):
            return super().backward(grad)

    logged = pair(bn=LoggedBatchNorm(32))
    assert not logged[0].takes_batchnorm_grad(*logged[1:])      # a subclass's backward runs
    conv.backward = lambda grad: nn.Conv2d.backward(conv, grad)
    assert not conv.takes_batchnorm_grad(bn, g)                  # so does a wrapper
    del conv.backward
    bn.eval()
    assert not conv.takes_batchnorm_grad(bn, g)


def test_direct_backward_checks_bn_grad(rng):
    from cnet_ext import _batchnorm, _conv
    x = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)
    g = rng.standard_normal((2, 6, 6, 16)).astype(np.float32)
    slots = np.empty((1, 3, 3, 16, 16), np.float32)
    coef = _batchnorm.grad_coefficients(16, np.float32)
    v = np.ones(16, np.float32)

    def run(bn_grad, dy=None):
        _conv.conv_direct_backward(x, dy, slots, [(0, 2)], 1, 1, 1, 1, 1, 1, 1, 1,
                                   bn_grad=bn_grad)

    run((g, x, coef, v, v, False))
    with pytest.raises(ValueError, match="dy or bn_grad, not both"):
        run((g, x, coef, v, v, False), g)
    with pytest.raises(ValueError, match=r"bn_grad must be \(g, x, coef, alpha, shift, relu\)"):
        run((g, x))
    with pytest.raises(ValueError, match="bn_grad's x must be a C-contiguous float32"):
        run((g, x.astype(np.float64), coef, v, v, False))
    with pytest.raises(ValueError, match=r"bn_grad's g \(2, 6, 6, 8\) and x \(2, 6, 6, 16\)"):
        run((g[..., :8].copy(), x, coef, v, v, False))
    with pytest.raises(ValueError, match=r"bn_grad's coef \(4, 8\).*do not fit 16 channels"):
        run((g, x, _batchnorm.grad_coefficients(8, np.float32), v, v, False))


def test_subclass_backward_turns_the_joined_backward_paths_off(rng):
    # A subclass overriding backward is called: the joined backward paths (the
    # batch norm's gradient by chunks, the add into a residual's gradient in the
    # GEMM's store, the max pool's gradient gathered by the convolution) stand only
    # for the classes' own backwards.
    calls = []

    class LoggedConv(nn.Conv2d):
        def backward(self, grad):
            calls.append("conv")
            return super().backward(grad)

    class LoggedPool(nn.MaxPool2d):
        def backward(self, grad):
            calls.append("pool")
            return super().backward(grad)

    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    bn_pair = nn.Sequential(LoggedConv(16, 16, 1, bias=False), nn.BatchNorm2d(16))
    # (the body's first layer adds into the block's gradient, not its own gradient)
    block = nn.Sequential(nn.Add(nn.Sequential(LoggedConv(16, 16, 1, bias=False), nn.ReLU(),
                                               nn.Conv2d(16, 16, 1, bias=False)),
                                 nn.Identity()), nn.ReLU())
    lenet = nn.Sequential(LoggedConv(1, 6, 5, padding=2), nn.ReLU(), LoggedPool(2))
    lenet.requires_input_grad_(False)
    for model, inp, want in ((bn_pair, x, ["conv"]), (block, x, ["conv"]),
                             (lenet, x[..., :1].copy(), ["pool", "conv"])):
        model.train()
        y = model(inp)
        del calls[:]
        model.backward(np.ones_like(y))
        assert calls == want


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("one_image_chunks", [False, True])
def test_direct_layer_adds_its_input_gradient_by_chunks(threads, dtype, one_image_chunks, rng,
                                                        monkeypatch):
    """Conv2d._backward_into (and backward_through_batchnorm with into) on the direct
    kernels' region: conv_direct_backward adds each chunk's input gradient to into
    while in cache (accumulate_dx), for the flipped-kernel dx (groups 1 and 2) and the
    scatter dx: bitwise into + backward's dL/dx, the same weight gradients."""
    from cnet_ext import _conv
    if one_image_chunks:            # several chunks per stripe: the buffer reused
        monkeypatch.setattr(conv_mod, "_KERNEL_CHUNK_BYTES", 1)
        monkeypatch.setattr(conv_mod, "_COL_CHUNK_BYTES", 1)
    accumulated = []
    region = _conv.conv_direct_backward
    monkeypatch.setattr(_conv, "conv_direct_backward", lambda *a, **k: (
        accumulated.append(k.get("accumulate_dx", False)), region(*a, **k))[1])
    lanes = _conv.direct_lanes(np.dtype(dtype))
    scatter_c = 4 if lanes == 16 else 2                    # KW * C_in within two vectors
    configs = [(lanes, 2 * lanes, 3, 1, 1, 1, "direct"),
               (2 * lanes, 2 * lanes, 3, 1, 1, 2, "direct"),
               (scatter_c, lanes, 5, 2, 2, 1,
                "scatter" if _conv.scatter_dx_fits(scatter_c, 5, 1, 1, dtype) else None)]
    for cin, cout, k, stride, pad, groups, dx_path in configs:
        for with_bn in (False, True):
            cnet.manual_seed(1)
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups,
                             bias=False).to(dtype)
            bn = nn.BatchNorm2d(cout).to(dtype).train()
            x = rng.standard_normal((5, 9, 8, cin)).astype(dtype)
            g = rng.standard_normal(conv.output_shape(x.shape)).astype(dtype)
            start = rng.standard_normal(x.shape).astype(dtype)
            grads = []
            with cnet.threads(threads):
                for into in (None, start.copy()):
                    conv.zero_grad()
                    bn.zero_grad()
                    y = conv(x)
                    accumulated.clear()
                    if with_bn:
                        bn(y)
                        if into is None:
                            dx = conv.backward(bn.backward(g))
                        else:
                            assert conv.backward_through_batchnorm(bn, g, into) is into
                    elif into is None:
                        dx = conv.backward(g)
                    else:
                        assert conv._backward_into(g, into) is into
                    grads.append([p.grad.copy() for p in conv.parameters()])
            label = f"{cin}->{cout} {k}x{k} s{stride} g{groups} bn={with_bn}"
            if dx_path is not None:
                assert conv._ws["paths"][1:3] == ("direct", dx_path), label
                assert accumulated == [True], label
            np.testing.assert_array_equal(into, start + dx, err_msg=label)
            for a, b in zip(*grads):
                np.testing.assert_array_equal(a, b, err_msg=label)


def test_accumulate_dx_needs_dx():
    from cnet_ext import _conv
    x = np.zeros((2, 5, 5, 16), np.float32)
    dy = np.zeros((2, 5, 5, 16), np.float32)
    slots = np.zeros((1, 3, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match="accumulate_dx without dx"):
        _conv.conv_direct_backward(x, dy, slots, [(0, 2)], 1, 1, 1, 1, 1, 1, 1, 1,
                                   accumulate_dx=True)
