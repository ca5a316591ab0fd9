"""BatchNorm2d / BatchNorm1d: numpy references, gradients, running stats, torch parity."""
import numpy as np
import pytest

import cnet
from cnet import nn
from cnet.nn.module import Module
from helpers import check_gradients, nchw_to_nhwc, nhwc_to_nchw


def _relu_class():
    try:
        return nn.ReLU
    except (AttributeError, ImportError):  # activation.py not there yet: Sequential fuses by name
        class ReLU(Module):
            def forward(self, x):
                raise AssertionError("a fused ReLU must be skipped by Sequential")
        return ReLU


# -- plain numpy references (independent of the kernels) ------------------------

def ref_forward(x, gamma, beta, eps, mean=None, var=None):
    C = x.shape[-1]
    x2 = x.reshape(-1, C).astype(np.float64)
    if mean is None:
        mean = x2.mean(axis=0)
        var = ((x2 - mean) ** 2).mean(axis=0)
    y = (x2 - mean) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * gamma + beta
    return y.reshape(x.shape)


def ref_backward(x, dy, gamma, eps):
    """Textbook batch-norm backward (Ioffe & Szegedy), in float64."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C).astype(np.float64)
    g2 = dy.reshape(-1, C).astype(np.float64)
    m = x2.shape[0]
    mu = x2.mean(0)
    var = x2.var(0)
    xhat = (x2 - mu) / np.sqrt(var + eps)
    gamma = np.ones(C) if gamma is None else gamma
    dxhat = g2 * gamma
    dvar = np.sum(dxhat * (x2 - mu), 0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(-dxhat / np.sqrt(var + eps), 0) + dvar * np.mean(-2 * (x2 - mu), 0)
    dx = dxhat / np.sqrt(var + eps) + dvar * 2 * (x2 - mu) / m + dmu / m
    return dx.reshape(x.shape), np.sum(g2 * xhat, 0), np.sum(g2, 0)


def make_bn(cls, C, rng, dtype=np.float32, **kw):
    bn = cls(C, **kw)
    if bn.affine:
        bn.weight.data[...] = rng.uniform(0.5, 1.5, C)
        bn.bias.data[...] = rng.standard_normal(C)
    return bn.to(dtype)


# -- forward / backward against numpy --------------------------------------------

# C = 8, 32: register-column kernels; 5, 12, 33, 64: whole-row kernels; 10x16x16x8
# spans two uneven row chunks.
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (8, 16, 16, 12), (3, 1, 1, 33), (10, 16, 16, 8),
                                   (4, 6, 6, 32), (2, 5, 5, 64)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_forward_backward_matches_numpy(rng, shape, affine, dtype):
    C = shape[-1]
    bn = make_bn(nn.BatchNorm2d, C, rng, dtype, affine=affine)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    x_copy = x.copy()
    y = bn(x)
    assert y.dtype == dtype and y.shape == x.shape
    gamma = bn.weight.data.astype(np.float64) if affine else None
    beta = bn.bias.data.astype(np.float64) if affine else None
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ref_forward(x, gamma, beta, 1e-5), **tol)
    dy = rng.standard_normal(shape).astype(dtype)
    dy_copy = dy.copy()
    dx = bn.backward(dy)
    rdx, rdg, rdb = ref_backward(x, dy, gamma, 1e-5)
    np.testing.assert_allclose(dx, rdx, **tol)
    if affine:
        np.testing.assert_allclose(bn.weight.grad, rdg, rtol=tol["rtol"], atol=tol["atol"] * 100)
        np.testing.assert_allclose(bn.bias.grad, rdb, rtol=tol["rtol"], atol=tol["atol"] * 100)
    np.testing.assert_array_equal(x, x_copy)   # forward leaves its input alone
    np.testing.assert_array_equal(dy, dy_copy)  # backward leaves grad_out alone


def test_read_only_inputs_accepted(rng):
    bn = make_bn(nn.BatchNorm2d, 8, rng)
    x = rng.standard_normal((3, 4, 4, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_ref, dx_ref = bn(x), bn.backward(dy)
    x.flags.writeable = False
    dy.flags.writeable = False
    np.testing.assert_array_equal(bn(x), y_ref)
    np.testing.assert_array_equal(bn.backward(dy), dx_ref)
    bn.eval()
    bn(x)


def test_grads_accumulate(rng):
    bn = make_bn(nn.BatchNorm2d, 4, rng)
    x = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn(x)
    bn.backward(dy)
    gw, gb = bn.weight.grad.copy(), bn.bias.grad.copy()
    bn(x)
    bn.backward(dy)
    np.testing.assert_allclose(bn.weight.grad, 2 * gw, rtol=1e-6)
    np.testing.assert_allclose(bn.bias.grad, 2 * gb, rtol=1e-6)


def test_float32_statistics_survive_a_large_mean(rng):
    # Naive E[x^2] - E[x]^2 in float32 loses everything here.
    x = (1000.0 + 1e-2 * rng.standard_normal((64, 16, 16, 4))).astype(np.float32)
    bn = nn.BatchNorm2d(4, momentum=1.0)
    bn(x)
    x2 = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(bn.running_mean, x2.mean(0), rtol=1e-7)
    np.testing.assert_allclose(bn.running_var, x2.var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("C", [4, 16, 64])
@pytest.mark.parametrize("relu", [False, True])
def test_float32_backward_survives_a_large_mean(rng, C, relu):
    x = (1000.0 + 1e-2 * rng.standard_normal((32, 16, 16, C))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = nn.BatchNorm2d(C)
    if relu:
        bn.fuse_relu()
    y = bn(x)
    dx = bn.backward(dy)
    g = np.where(y > 0, dy, 0) if relu else dy  # the mask the kernel used
    rdx, rdg, rdb = ref_backward(x, g, None, 1e-5)
    scale = np.abs(rdx).max()
    np.testing.assert_allclose(dx, rdx, rtol=0, atol=5e-5 * scale)
    np.testing.assert_allclose(bn.weight.grad, rdg, rtol=1e-5, atol=1e-5 * np.abs(rdg).max())
    np.testing.assert_allclose(bn.bias.grad, rdb, rtol=1e-5, atol=1e-3)


def test_eval_forward_uses_running_stats(rng):
    bn = make_bn(nn.BatchNorm2d, 6, rng)
    bn.running_mean[...] = rng.standard_normal(6)
    bn.running_var[...] = rng.uniform(0.5, 2, 6)
    bn.eval()
    x = rng.standard_normal((4, 3, 3, 6)).astype(np.float32)
    y = bn(x)
    ref = ref_forward(x, bn.weight.data, bn.bias.data, 1e-5, bn.running_mean, bn.running_var)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert bn._cache is None
    with pytest.raises(RuntimeError, match="backward called without a forward"):
        bn.backward(np.ones_like(x))
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_stats_numpy_transcription(rng, momentum):
    bn = nn.BatchNorm2d(5, momentum=momentum)
    rm, rv = np.zeros(5), np.ones(5)
    for step in range(1, 5):
        x = (rng.standard_normal((3, 4, 2, 5)) * step + step).astype(np.float32)
        bn(x)
        x2 = x.reshape(-1, 5).astype(np.float64)
        f = 1.0 / step if momentum is None else momentum
        rm = (1 - f) * rm + f * x2.mean(0)
        rv = (1 - f) * rv + f * x2.var(0, ddof=1)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
    assert int(bn.num_batches_tracked) == 4


def test_no_running_stats_uses_batch_stats_in_eval(rng):
    bn = make_bn(nn.BatchNorm2d, 3, rng, track_running_stats=False)
    assert bn.running_mean is None and list(bn.state_dict()) == ["weight", "bias"]
    x = rng.standard_normal((4, 2, 2, 3)).astype(np.float32)
    y_train = bn(x)
    bn.eval()
    np.testing.assert_array_equal(bn(x), y_train)


# -- finite-difference gradients (float64) -----------------------------------------

@pytest.mark.parametrize("cls,shape", [
    (nn.BatchNorm2d, (2, 3, 4, 5)), (nn.BatchNorm2d, (3, 1, 1, 7)),
    (nn.BatchNorm2d, (10, 16, 16, 8)),  # two uneven row chunks
    (nn.BatchNorm1d, (6, 4)), (nn.BatchNorm1d, (3, 5, 4)),
])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_gradients_finite_difference(rng, cls, shape, affine, relu):
    bn = make_bn(cls, shape[-1], rng, np.float64, affine=affine)
    if relu:
        assert bn.fuse_relu() is True
    x = rng.standard_normal(shape) * 1.5 + 0.5
    check_gradients(bn, x, rtol=1e-5, atol=1e-7, max_checks=60)


# -- fused ReLU --------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_sequential_fuses_relu_identically(rng, training):
    ReLU = _relu_class()
    bn_ref = make_bn(nn.BatchNorm2d, 8, rng)
    bn_ref.running_mean[...] = rng.standard_normal(8)
    bn_ref.running_var[...] = rng.uniform(0.5, 2, 8)
    seq = nn.Sequential(nn.BatchNorm2d(8), ReLU())
    seq.load_state_dict({f"0.{k}": v for k, v in bn_ref.state_dict().items()})
    x = rng.standard_normal((4, 5, 5, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    seq.train(training)
    bn_ref.train(training)
    y = seq(x)
    assert seq[0]._relu, "Sequential did not fuse BN + ReLU"
    y_ref = np.maximum(bn_ref(x), 0)
    np.testing.assert_array_equal(y, y_ref)
    assert (y == 0).any() and (y > 0).any()
    if training:
        dx = seq.backward(dy)
        dx_ref = bn_ref.backward(np.where(y_ref > 0, dy, 0).astype(np.float32))
        np.testing.assert_array_equal(dx, dx_ref)
        np.testing.assert_array_equal(seq[0].weight.grad, bn_ref.weight.grad)
        np.testing.assert_array_equal(seq[0].bias.grad, bn_ref.bias.grad)
        np.testing.assert_array_equal(seq[0].running_var, bn_ref.running_var)
    assert "fused_relu=True" in repr(seq)


@pytest.mark.parametrize("C", [8, 12])  # register-column and whole-row kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_relu_propagates_nan_like_unfused(rng, C, dtype):
    """max(NaN, 0) is NaN in torch and in cnet's ReLU; the fused one must agree."""
    fused = make_bn(nn.BatchNorm2d, C, np.random.default_rng(3), dtype)
    fused.running_mean[...] = rng.standard_normal(C)
    fused.fuse_relu()
    plain = make_bn(nn.BatchNorm2d, C, np.random.default_rng(3), dtype)
    plain.running_mean[...] = fused.running_mean
    relu = nn.ReLU()
    x = rng.standard_normal((4, 3, 3, C)).astype(dtype)
    x[1, 2, 0, 1] = np.nan
    dy = rng.standard_normal(x.shape).astype(dtype)
    for training in (False, True):  # eval first: training puts NaN in the running stats
        fused.train(training)
        plain.train(training)
        relu.train(training)
        y, y_ref = fused(x), relu(plain(x))
        np.testing.assert_array_equal(y, y_ref)  # NaN where y_ref has NaN
        if training:  # the batch statistics of channel 1 are NaN: the whole channel
            assert np.isnan(y[..., 1]).all() and not np.isnan(np.delete(y, 1, -1)).any()
            np.testing.assert_array_equal(fused.backward(dy), plain.backward(relu.backward(dy)))
            np.testing.assert_array_equal(fused.weight.grad, plain.weight.grad)
            np.testing.assert_array_equal(fused.bias.grad, plain.bias.grad)
        else:  # running statistics: only the NaN input's output
            assert np.isnan(y[1, 2, 0, 1]) and np.isnan(y).sum() == 1
        assert (y == 0).any()


# -- threads ---------------------------------------------------------------------

@pytest.mark.parametrize("relu", [False, True])
def test_one_and_two_threads_bitwise_equal(rng, relu):
    x = (rng.standard_normal((16, 32, 32, 16)) + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for n in (1, 2):
        bn = make_bn(nn.BatchNorm2d, 16, np.random.default_rng(7))
        if relu:
            bn.fuse_relu()
        with cnet.threads(n):
            y = bn(x)
            dx = bn.backward(dy)
            bn.eval()
            ye = bn(x)
        results.append((y, dx, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, ye))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# -- state, repr -------------------------------------------------------------------

def test_state_dict_repr_and_parameters():
    bn = nn.BatchNorm2d(4)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"]
    np.testing.assert_array_equal(bn.weight.data, np.ones(4, np.float32))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(4, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(4, np.float32))
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert repr(bn) == ("BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, "
                        "track_running_stats=True)")
    nb = nn.BatchNorm1d(3, affine=False, momentum=None)
    assert list(nb.parameters()) == [] and "momentum=None, affine=False" in repr(nb)
    assert list(nb.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]


def test_flat_parameters_and_double(rng):
    bn = make_bn(nn.BatchNorm2d, 4, rng)
    bn.flatten_parameters()  # weight/bias become views: the layer must follow them
    x = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.weight.grad.base is not None and np.abs(bn.weight.grad).sum() >= 0
    np.testing.assert_allclose(bn.bias.grad, np.full(4, 12.0))
    bn.double()
    assert bn(x.astype(np.float64)).dtype == np.float64


# -- bad inputs ------------------------------------------------------------------

def test_bad_inputs(rng):
    bn = nn.BatchNorm2d(4)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*expected 4 channels.*\(2, 3, 3, 5\)"):
        bn(np.zeros((2, 3, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*4-D.*\(6, 4\)"):
        bn(np.zeros((6, 4), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*expected float32.*float64"):
        bn(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*\(2, 3, 3, 4\) is not C-contiguous"):
        bn(np.asfortranarray(x))
    with pytest.raises(RuntimeError, match="BatchNorm2d.*without a forward"):
        bn.backward(x)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*more than 1 value per channel.*\(1, 1, 1, 4\)"):
        bn(np.zeros((1, 1, 1, 4), np.float32))
    assert int(bn.num_batches_tracked) == 0
    bn(x)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4.*gradient of shape \(2, 3, 2, 4\)"):
        bn.backward(np.zeros((2, 3, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"gradient of shape \(3, 2, 3, 4\) does not match "
                                         r"the forward input shape \(2, 3, 3, 4\)"):
        bn.backward(np.zeros((3, 2, 3, 4), np.float32))  # same size, other shape
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4.*2-D.*3-D.*\(2, 3, 3, 4\)"):
        nn.BatchNorm1d(4)(x)
    with pytest.raises(ValueError, match="num_features"):
        nn.BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm2d(3, eps=-1e-5)
    bn.eval()
    y = bn(np.zeros((1, 1, 1, 4), np.float32))  # eval accepts a single value per channel
    assert y.shape == (1, 1, 1, 4)


def test_kernel_validates_shapes():
    from cnet_ext import _batchnorm
    x = np.zeros((5, 3), np.float32)
    w = np.ones(4, np.float32)
    s = np.zeros(3)
    a = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="weight must be a 1-D array of 3 values"):
        _batchnorm.forward_train(x, x.copy(), w, None, 1e-5, False, s, s.copy(), a, a.copy(),
                                 None, None, 0.1, 1)
    with pytest.raises(ValueError, match=r"y has shape \(4, 3\), expected \(5, 3\)"):
        _batchnorm.forward_train(x, np.zeros((4, 3), np.float32), None, None, 1e-5, False, s,
                                 s.copy(), a, a.copy(), None, None, 0.1, 1)


@pytest.mark.parametrize("shape", [(10, 16, 16, 8), (3, 5, 4, 33), (4, 6, 6, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_residual_join_equals_separate_passes(rng, shape, dtype, training, threads):
    # relu(bn(x) + s) in the batch norm's output pass, bitwise as bn(x), then the add
    # and ReLU kernel: batch and running statistics, both paths, both thread counts.
    C = shape[-1]
    joined, separate = make_bn(nn.BatchNorm2d, C, rng, dtype), make_bn(nn.BatchNorm2d, C, rng,
                                                                        dtype)
    separate.load_state_dict(joined.state_dict())
    joined.train(training)
    separate.train(training)
    if not training:
        for bn in (joined, separate):
            bn.running_mean[:] = np.linspace(-1, 1, C)
            bn.running_var[:] = np.linspace(0.5, 2, C)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    res = rng.standard_normal(shape).astype(dtype)
    x[0, 0, 0, :2] = np.nan                      # NaN passes the ReLU on both paths
    assert joined.joins_residual(x, res)
    with cnet.threads(threads):
        got = joined._forward(x, res)
        want = separate(x)
        from cnet_ext import _elementwise
        _elementwise.add(want, res, want, True, threads)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(joined.running_mean, separate.running_mean)
    np.testing.assert_array_equal(joined.running_var, separate.running_var)


def test_residual_join_refusals(rng):
    from cnet_ext import _batchnorm
    bn = make_bn(nn.BatchNorm2d, 4, rng)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    assert not bn.joins_residual(x, x[..., :3].copy())
    assert not bn.joins_residual(x, x.astype(np.float64))
    assert not bn.joins_residual(x, np.swapaxes(x, 1, 2))
    bn.fuse_relu()
    assert not bn.joins_residual(x, x.copy())
    x2, s = np.zeros((5, 3), np.float32), np.zeros(3)
    a = np.zeros(3, np.float32)
    for residual, match in [(np.zeros((4, 3), np.float32), r"residual has shape \(4, 3\)"),
                            (np.zeros((5, 3)), "residual must be C-contiguous rows of the "
                                               "input's dtype, got float64")]:
        with pytest.raises(ValueError, match=match):
            _batchnorm.forward_train(x2, x2.copy(), None, None, 1e-5, False, s, s.copy(), a,
                                     a.copy(), None, None, 0.1, 1, residual)
        with pytest.raises(ValueError, match=match):
            _batchnorm.forward_eval(x2, x2.copy(), None, None, a, a + 1, 1e-5, False, a.copy(),
                                    a.copy(), 1, residual)


# -- torch parity ----------------------------------------------------------------

def _torch_bn(torch, bn, C, dim):
    cls = {2: torch.nn.BatchNorm2d, 1: torch.nn.BatchNorm1d}[dim]
    tb = cls(C, eps=bn.eps, momentum=bn.momentum, affine=bn.affine).double()
    if bn.affine:
        tb.weight.data = torch.tensor(bn.weight.data, dtype=torch.float64)
        tb.bias.data = torch.tensor(bn.bias.data, dtype=torch.float64)
    return tb.float()


@pytest.mark.parametrize("momentum,affine", [(0.1, True), (None, True), (0.3, False)])
def test_torch_parity_bn2d(rng, momentum, affine):
    torch = pytest.importorskip("torch")
    C = 6
    bn = make_bn(nn.BatchNorm2d, C, rng, momentum=momentum, affine=affine)
    tb = _torch_bn(torch, bn, C, 2)
    for step in range(3):
        x = (rng.standard_normal((4, 5, 7, C)) * (step + 1) + step).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        bn.zero_grad()
        y = bn(x)
        dx = bn.backward(dy)
        xt = torch.tensor(nhwc_to_nchw(x), requires_grad=True)
        if affine:
            tb.zero_grad()
        yt = tb(xt)
        yt.backward(torch.tensor(nhwc_to_nchw(dy)))
        np.testing.assert_allclose(y, nchw_to_nhwc(yt.detach().numpy()), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(dx, nchw_to_nhwc(xt.grad.numpy()), rtol=1e-4, atol=2e-6)
        if affine:
            np.testing.assert_allclose(bn.weight.grad, tb.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(bn.bias.grad, tb.bias.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bn.running_mean, tb.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, tb.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(tb.num_batches_tracked)
    bn.eval()
    tb.eval()
    x = rng.standard_normal((3, 4, 4, C)).astype(np.float32)
    np.testing.assert_allclose(bn(x), nchw_to_nhwc(tb(torch.tensor(nhwc_to_nchw(x))).detach().numpy()),
                               rtol=1e-5, atol=2e-6)
    # state_dict keys and values load straight into torch
    sd = {k: torch.tensor(v) for k, v in bn.state_dict().items()}
    assert list(sd) == list(tb.state_dict())
    tb.load_state_dict(sd)


@pytest.mark.parametrize("shape", [(16, 6), (5, 7, 6)])
def test_torch_parity_bn1d(rng, shape):
    torch = pytest.importorskip("torch")
    C = shape[-1]
    bn = make_bn(nn.BatchNorm1d, C, rng)
    tb = _torch_bn(torch, bn, C, 1)
    x = (rng.standard_normal(shape) * 2 - 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y = bn(x)
    dx = bn.backward(dy)
    to_t = (lambda a: a) if len(shape) == 2 else (lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)))
    xt = torch.tensor(to_t(x), requires_grad=True)
    yt = tb(xt)
    yt.backward(torch.tensor(to_t(dy)))
    np.testing.assert_allclose(y, to_t(yt.detach().numpy()), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(dx, to_t(xt.grad.numpy()), rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(bn.weight.grad, tb.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_var, tb.running_var.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [8, 33, 64])
def test_kernel_merges_given_moments(rng, dtype, C):
    # A convolution's pieces (any sizes, one row included) merged in order stand for
    # the kernel's own statistics pass: batch statistics against float64 numpy (with
    # a mean that would cancel E[x^2] - E[x]^2), output and running buffers equal to
    # the own pass within round-off.
    from cnet_ext import _batchnorm
    M = 700
    x = (300.0 + rng.standard_normal((M, C))).astype(dtype)
    bounds = [0, 1, 97, 350, 351, 700]
    slots, counts = _batchnorm.moment_slots(len(bounds) - 1, C)
    for piece, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
        _batchnorm.rows_moments(x[r0:r1], slots, counts, piece)
    np.testing.assert_array_equal(counts, np.diff(bounds))
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)

    def run(moments):
        y = np.empty_like(x)
        mean, inv = np.empty(C), np.empty(C)
        alpha, shift = np.empty(C, dtype), np.empty(C, dtype)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        _batchnorm.forward_train(x, y, w, b, 1e-5, True, mean, inv, alpha, shift, rm, rv,
                                 0.5, 2, None, moments)
        return y, mean, inv, rm, rv

    y, mean, inv, rm, rv = run((slots, counts))
    x64 = x.astype(np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(mean, x64.mean(0), rtol=tol)
    np.testing.assert_allclose(inv, 1 / np.sqrt(x64.var(0) + 1e-5), rtol=tol * 100)
    for got, own in zip((y, mean, inv, rm, rv), run(None)):
        np.testing.assert_allclose(got, own, rtol=tol * 100, atol=tol * 100)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x64.var(0, ddof=1), rtol=tol * 100)


def test_kernel_checks_given_moments(rng):
    from cnet_ext import _batchnorm
    x = rng.standard_normal((10, 8)).astype(np.float32)
    s, a = np.empty(8), np.empty(8, np.float32)

    def run(moments):
        _batchnorm.forward_train(x, np.empty_like(x), None, None, 1e-5, False, s, s.copy(), a,
                                 a.copy(), None, None, 0.1, 1, None, moments)

    slots, counts = _batchnorm.moment_slots(2, 8)
    _batchnorm.rows_moments(x[:4], slots, counts, 0)
    with pytest.raises(ValueError, match="moments' pieces cover 4 rows.*the input has 10"):
        run((slots, counts))
    _batchnorm.rows_moments(x[4:], slots, counts, 1)
    run((slots, counts))
    slots, counts = _batchnorm.moment_slots(2, 8)
    _batchnorm.rows_moments(x, slots, counts, 0)        # all rows, but piece 1 empty
    with pytest.raises(ValueError, match="2 pieces, each at least one row"):
        run((slots, counts))
    with pytest.raises(ValueError, match=r"moments must be moment_slots\(pieces, 8\)"):
        run(_batchnorm.moment_slots(2, 16))
    with pytest.raises(ValueError, match="moments must be \\(slots, counts\\)"):
        run((slots,))
    with pytest.raises(ValueError, match="rows_moments: piece 2 of slots"):
        _batchnorm.rows_moments(x, slots, counts, 2)
    with pytest.raises(ValueError, match="rows_moments: no rows"):
        _batchnorm.rows_moments(x[:0], slots, counts, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [8, 33, 64])
@pytest.mark.parametrize("relu", [False, True])
def test_backward_rows_by_blocks(rng, dtype, C, relu):
    # The backward split in two (the batch's sums, then dx by blocks of rows in any
    # order, as a 1x1 convolution asks for its chunks): dx bitwise the whole
    # backward's, parameter gradients the same, against the float64 formula.
    shape = (5, 6, 7, C)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    whole, split = (make_bn(nn.BatchNorm2d, C, rng, dtype) for _ in range(2))
    split.load_state_dict(whole.state_dict())
    for bn in (whole, split):
        if relu:
            bn.fuse_relu()
        bn(x)
    dx = whole.backward(dy)
    rows = split.backward_rows(dy)
    got = np.full((x.size // C, C), np.nan, dtype)
    bounds = [0, 1, 37, 38, 150, 210]
    for r0, r1 in reversed(list(zip(bounds[:-1], bounds[1:]))):
        rows.write(r0, r1, got[r0:r1], 2 if r1 - r0 > 100 else 1)
    np.testing.assert_array_equal(got.reshape(shape), dx)
    np.testing.assert_array_equal(split.weight.grad, whole.weight.grad)
    np.testing.assert_array_equal(split.bias.grad, whole.bias.grad)
    g = dy * (whole(x) > 0) if relu else dy
    rdx, rdg, rdb = ref_backward(x, g, whole.weight.data.astype(np.float64), 1e-5)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol)
    np.testing.assert_allclose(split.weight.grad, rdg, rtol=tol, atol=tol * 100)


def test_backward_rows_checks(rng):
    from cnet_ext import _batchnorm
    bn = make_bn(nn.BatchNorm2d, 8, rng)
    x = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    bn(x)
    with pytest.raises(ValueError, match=r"BatchNorm2d.*expected 8 channels.*\(2, 3, 3, 4\)"):
        bn.backward_rows(x[..., :4].copy())
    with pytest.raises(ValueError, match=r"BatchNorm2d.*gradient of shape \(1, 3, 3, 8\) does "
                                         r"not match the forward input shape \(2, 3, 3, 8\)"):
        bn.backward_rows(x[:1])
    with pytest.raises(ValueError, match=r"BatchNorm2d.*gradient of shape \(2, 3, 3, 8\) is "
                                         "not C-contiguous"):
        bn.backward(np.asfortranarray(x))
    rows = bn.backward_rows(x)
    with pytest.raises(ValueError, match=r"dx has shape \(3, 8\), expected \(2, 8\)"):
        rows.write(0, 2, np.empty((3, 8), np.float32), 1)
    coef = _batchnorm.grad_coefficients(16, np.float32)
    x2 = x.reshape(-1, 8)
    s, a = np.empty(8), np.empty(8, np.float32)
    with pytest.raises(ValueError, match=r"coef has shape \(4, 16\), expected \(4, 8\)"):
        _batchnorm.backward_coefficients(x2, x2, None, None, None, s, s, a, a, False, 1, coef)
    with pytest.raises(ValueError, match=r"coef \(4, 16\) / alpha / shift do not fit 8"):
        _batchnorm.backward_dx(x2, x2, x2.copy(), coef, a, a, False, 1)
