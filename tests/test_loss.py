"""CrossEntropyLoss: numpy reference, finite differences, torch parity, threads, bad inputs."""
import numpy as np
import pytest

import cnet
from cnet import nn


def ref_loss(z, y, smoothing=0.0, reduction="mean"):
    """Independent float64 reference: log-softmax, then the smoothed target distribution."""
    z = z.astype(np.float64)
    n, C = z.shape
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.full((n, C), smoothing / C)
    target[np.arange(n), y] += 1.0 - smoothing
    per_row = -(target * logp).sum(1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_numpy_and_caches_softmax(rng, smoothing, reduction, dtype):
    z = (rng.standard_normal((37, 11)) * 4).astype(dtype)
    y = rng.integers(0, 11, 37)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    z_copy = z.copy()
    loss = loss_fn(z, y)
    assert type(loss) is float
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(loss, ref_loss(z, y, smoothing, reduction), rtol=tol)
    probs = loss_fn._cache[0]
    e = np.exp(z - z.max(1, keepdims=True).astype(np.float64))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=tol, atol=tol)
    np.testing.assert_array_equal(z, z_copy)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_finite_difference(rng, smoothing, reduction):
    z = rng.standard_normal((6, 5)) * 2
    y = rng.integers(0, 5, 6)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    loss_fn(z, y)
    grad = loss_fn.backward()
    assert grad.dtype == np.float64 and grad.shape == z.shape
    eps = 1e-6
    num = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        num[idx] = (loss_fn(zp, y) - loss_fn(zm, y)) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)
    loss_fn(z, y)
    np.testing.assert_allclose(loss_fn.backward(scale=0.25), 0.25 * grad, rtol=1e-15)


def test_large_logits_are_stable():
    z = np.array([[1e4, -1e4, 0.0], [-3e4, -3e4 + 1, -3e4 + 2]], np.float32)
    y = np.array([1, 2])
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(z, y)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, ref_loss(z, y), rtol=1e-6)
    assert np.isfinite(loss_fn.backward()).all()


def test_read_only_logits_and_labels(rng):
    z = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    loss_fn = nn.CrossEntropyLoss()
    ref, gref = loss_fn(z, y), loss_fn.backward()
    z.flags.writeable = False
    y.flags.writeable = False
    assert loss_fn(z, y) == ref
    np.testing.assert_array_equal(loss_fn.backward(), gref)


def test_label_dtypes_and_empty_batch(rng):
    z = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    loss_fn = nn.CrossEntropyLoss()
    ref = loss_fn(z, y)
    for dt in (np.int32, np.uint8, np.int16, np.uint64):
        assert loss_fn(z, y.astype(dt)) == ref
    assert loss_fn(z, list(y)) == ref
    assert loss_fn(z[::2].copy(), y[::2]) == pytest.approx(ref_loss(z[::2], y[::2]), rel=1e-6)


def test_threads_identical(rng):
    z = (rng.standard_normal((1024, 10)) * 3).astype(np.float32)
    y = rng.integers(0, 10, 1024)
    out = []
    for n in (1, 2):
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        with cnet.threads(n):
            out.append((loss_fn(z, y), loss_fn.backward()))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_parity(rng, smoothing, reduction):
    torch = pytest.importorskip("torch")
    z = (rng.standard_normal((64, 10)) * 3).astype(np.float32)
    y = rng.integers(0, 10, 64)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    loss = loss_fn(z, y)
    grad = loss_fn.backward()
    zt = torch.tensor(z, requires_grad=True)
    lt = torch.nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)(
        zt, torch.tensor(y))
    lt.backward()
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-6)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-7 if reduction == "mean" else 1e-6)


def test_bad_inputs(rng):
    loss_fn = nn.CrossEntropyLoss()
    z = rng.standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"label 3 at index 2 is out of range for 3 classes"):
        loss_fn(z, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"label -1 at index 0 is out of range for 3 classes"):
        loss_fn(z, np.array([-1, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels must be integers, got dtype float"):
        loss_fn(z, np.array([0.0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"labels of shape \(4,\) for logits of shape \(4, 3\), got \(4, 1\)"):
        loss_fn(z, np.zeros((4, 1), np.int64))
    with pytest.raises(ValueError, match=r"labels of shape \(4,\).*got \(3,\)"):
        loss_fn(z, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss.*2-D.*logits, got shape \(12,\)"):
        loss_fn(z.ravel(), np.zeros(12, np.int64))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss.*float32 or float64 logits, got int64"):
        loss_fn(np.zeros((4, 3), np.int64), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss.*not C-contiguous"):
        loss_fn(np.asfortranarray(z), np.zeros(4, np.int64))
    with pytest.raises(RuntimeError, match="CrossEntropyLoss.*without a forward"):
        nn.CrossEntropyLoss().backward()
    loss_fn(z, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="scalar scale"):
        loss_fn.backward(np.ones((4, 3)))
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        nn.CrossEntropyLoss(reduction="none")
    assert repr(nn.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"


@pytest.mark.parametrize("C", [1, 4, 1003])
def test_class_counts_and_vector_tails(rng, C):
    z = (rng.standard_normal((9, C)) * 10).astype(np.float32)
    y = rng.integers(0, C, 9)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    np.testing.assert_allclose(loss_fn(z, y), ref_loss(z, y, 0.05), rtol=2e-6)
    probs = loss_fn._cache[0]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_exp_accuracy_over_the_whole_range():
    # Row [0, x]: p1 = e^x / (1 + e^x) exercises the vectorised exp on [-87, 0].
    x = np.linspace(-87.0, 0.0, 50001).astype(np.float32)
    z = np.stack([np.zeros_like(x), x], 1)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(z, np.zeros(len(x), np.int64))
    e = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(loss_fn._cache[0][:, 1], e / (1 + e), rtol=3e-7, atol=0)


def test_nonfinite_logits_like_torch():
    loss_fn = nn.CrossEntropyLoss()
    z = np.array([[0.0, -np.inf, 2.0], [0.0, np.nan, 1.0]], np.float32)
    assert np.isnan(loss_fn(z, np.array([0, 0])))
    probs = loss_fn._cache[0]
    np.testing.assert_allclose(probs[0], [1 / (1 + np.e ** 2), 0.0, np.e ** 2 / (1 + np.e ** 2)],
                               rtol=1e-6)
    assert np.isnan(probs[1]).all()
    assert loss_fn(z[:1], np.array([1])) == np.inf   # -inf logit on the true class
