"""cnet.init: sample moments against the formulas, HWIO / dense fans (with groups), gains."""
import math

import numpy as np
import pytest

import cnet
from cnet import init
from cnet.nn import Parameter

# (shape, fan_in, fan_out) for HWIO conv and (in, out) dense kernels
SHAPES = [
    ((3, 3, 64, 128), 3 * 3 * 64, 3 * 3 * 128),
    ((1, 1, 256, 512), 256, 512),
    ((7, 7, 3, 64), 7 * 7 * 3, 7 * 7 * 64),
    ((5, 3, 16, 32), 5 * 3 * 16, 5 * 3 * 32),      # non-square kernel
    ((784, 300), 784, 300),
    ((300, 1000), 300, 1000),
]
SHAPE_IDS = ["x".join(map(str, s)) for s, _, _ in SHAPES]


def check_moments(x, mean, var, n_se=6.0, uniform=False):
    """Sample mean and variance within n_se standard errors of the formula."""
    x = x.astype(np.float64).ravel()
    n = x.size
    assert abs(x.mean() - mean) <= n_se * math.sqrt(var / n) + 1e-12
    # SE of the sample variance: var * sqrt((kurtosis - 1) / n); kurtosis 3 (normal), 1.8 (uniform)
    kurt = 1.8 if uniform else 3.0
    assert abs(x.var() - var) <= n_se * var * math.sqrt((kurt - 1) / n)


@pytest.mark.parametrize("shape,fan_in,fan_out", SHAPES, ids=SHAPE_IDS)
def test_fans(shape, fan_in, fan_out):
    assert init.fans(shape) == (fan_in, fan_out)


@pytest.mark.parametrize("shape,fan_in,fan_out", SHAPES, ids=SHAPE_IDS)
def test_fans_match_torch_on_converted_layout(shape, fan_in, fan_out):
    torch = pytest.importorskip("torch")
    if len(shape) == 4:
        kh, kw, cin, cout = shape
        w = torch.empty(cout, cin, kh, kw)            # OIHW
    else:
        w = torch.empty(shape[1], shape[0])           # Linear weight is (out, in)
    assert torch.nn.init._calculate_fan_in_and_fan_out(w) == (fan_in, fan_out)


def test_fans_with_groups():
    # ResNeXt-style grouped 3x3: C_in = C_out = 128, 32 groups -> HWIO (3, 3, 4, 128)
    assert init.fans((3, 3, 4, 128)) == (36, 9 * 128)              # torch's numbers
    assert init.fans((3, 3, 4, 128), groups=32) == (36, 9 * 4)     # true fan-out
    # depthwise: groups = C
    assert init.fans((3, 3, 1, 64), groups=64) == (9, 9)
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(128, 128, 3, groups=32)
    assert torch.nn.init._calculate_fan_in_and_fan_out(conv.weight) == init.fans((3, 3, 4, 128))


def test_fans_reject_1d():
    with pytest.raises(ValueError, match="2-D"):
        init.fans((10,))


@pytest.mark.parametrize("nonlinearity,param", [
    ("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
    ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 0), ("selu", None),
    ("conv_transpose2d", None)])
def test_gain_matches_torch(nonlinearity, param):
    torch = pytest.importorskip("torch")
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(
        torch.nn.init.calculate_gain(nonlinearity, param), rel=1e-15)


def test_gain_values():
    assert init.calculate_gain("relu") == math.sqrt(2)
    assert init.calculate_gain("tanh") == 5 / 3
    assert init.calculate_gain("leaky_relu", 0.1) == math.sqrt(2 / 1.01)
    with pytest.raises(ValueError, match="unsupported"):
        init.calculate_gain("swish")


# name -> (call, variance(fan_in, fan_out), uniform?)
RELU = 2.0
INITS = {
    "kaiming_normal_fan_in": (lambda t: init.kaiming_normal_(t, nonlinearity="relu"),
                              lambda fi, fo: RELU / fi, False),
    "kaiming_normal_fan_out": (lambda t: init.kaiming_normal_(t, mode="fan_out",
                                                              nonlinearity="relu"),
                               lambda fi, fo: RELU / fo, False),
    "kaiming_normal_leaky": (lambda t: init.kaiming_normal_(t, a=0.2),
                             lambda fi, fo: 2.0 / (1 + 0.04) / fi, False),
    "kaiming_uniform_fan_in": (lambda t: init.kaiming_uniform_(t, nonlinearity="relu"),
                               lambda fi, fo: RELU / fi, True),
    "kaiming_uniform_fan_out": (lambda t: init.kaiming_uniform_(t, mode="fan_out",
                                                                nonlinearity="relu"),
                                lambda fi, fo: RELU / fo, True),
    "kaiming_uniform_tanh": (lambda t: init.kaiming_uniform_(t, nonlinearity="tanh"),
                             lambda fi, fo: (5 / 3) ** 2 / fi, True),
    "kaiming_uniform_linear": (lambda t: init.kaiming_uniform_(t, nonlinearity="linear"),
                               lambda fi, fo: 1.0 / fi, True),
    "xavier_normal": (lambda t: init.xavier_normal_(t), lambda fi, fo: 2.0 / (fi + fo), False),
    "xavier_uniform": (lambda t: init.xavier_uniform_(t), lambda fi, fo: 2.0 / (fi + fo), True),
    "xavier_uniform_gain": (lambda t: init.xavier_uniform_(t, gain=init.calculate_gain("relu")),
                            lambda fi, fo: 2.0 * 2.0 / (fi + fo), True),
    "lecun_normal": (lambda t: init.lecun_normal_(t), lambda fi, fo: 1.0 / fi, False),
    "lecun_uniform": (lambda t: init.lecun_uniform_(t), lambda fi, fo: 1.0 / fi, True),
    # classic U(-1/sqrt(n), 1/sqrt(n)): variance 1 / (3 n)
    "fan_in_uniform": (lambda t: init.fan_in_uniform_(t, init.fans(t.shape)[0]),
                       lambda fi, fo: 1.0 / (3 * fi), True),
    # torch's default layer init, kaiming_uniform_(a=sqrt(5)): the same 1 / (3 fan_in)
    "kaiming_uniform_sqrt5": (lambda t: init.kaiming_uniform_(t, a=math.sqrt(5)),
                              lambda fi, fo: 1.0 / (3 * fi), True),
}


@pytest.mark.parametrize("shape,fan_in,fan_out", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", sorted(INITS))
def test_initializer_moments(name, shape, fan_in, fan_out):
    fill, var, uniform = INITS[name]
    w = np.empty(shape, dtype=np.float32)
    out = fill(w)
    assert out is w and w.dtype == np.float32
    check_moments(w, 0.0, var(fan_in, fan_out), uniform=uniform)
    if uniform:
        bound = math.sqrt(3 * var(fan_in, fan_out))
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() >= 0.99 * bound          # the support is really [-b, b]


def test_he_normal_conv_formula_spelled_out():
    """He normal fan_in on a conv: Var = 2 / (KH * KW * C_in)."""
    kh, kw, cin, cout = 3, 3, 32, 256
    w = init.kaiming_normal_(np.empty((kh, kw, cin, cout)), nonlinearity="relu")
    check_moments(w, 0.0, 2.0 / (kh * kw * cin))


@pytest.mark.parametrize("groups", [4, 32])
def test_grouped_conv_fan_out(groups):
    shape = (3, 3, 128 // groups, 256)
    w = init.kaiming_normal_(np.empty(shape), mode="fan_out", nonlinearity="relu", groups=groups)
    check_moments(w, 0.0, 2.0 / (9 * 256 / groups))
    w = init.xavier_uniform_(np.empty(shape), groups=groups)
    check_moments(w, 0.0, 2.0 / (9 * 128 / groups + 9 * 256 / groups), uniform=True)


def test_uniform_normal_constant():
    w = init.uniform_(np.empty((400, 500)), -2.0, 3.0)
    check_moments(w, 0.5, 25 / 12, uniform=True)
    assert w.min() >= -2.0 and w.max() < 3.0
    w = init.normal_(np.empty((400, 500), np.float32), 1.5, 0.3)
    check_moments(w, 1.5, 0.09)
    assert (init.constant_(np.empty((3, 4)), 0.25) == 0.25).all()
    assert (init.zeros_(np.ones(5)) == 0).all()
    assert (init.ones_(np.zeros((2, 2), np.float32)) == 1).all()


def test_trunc_normal():
    w = init.trunc_normal_(np.empty(200_000), 0.0, 1.0, -1.0, 2.0)
    assert w.min() >= -1.0 and w.max() <= 2.0
    # mean of N(0,1) truncated to [-1, 2]: (phi(-1) - phi(2)) / (Phi(2) - Phi(-1))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))          # noqa: E731
    want = (phi(-1) - phi(2)) / (Phi(2) - Phi(-1))
    assert abs(w.mean() - want) < 0.01


def test_fills_parameter_in_place_and_returns_it():
    p = Parameter(np.zeros((3, 3, 8, 16), np.float32))
    data = p.data
    assert init.kaiming_normal_(p) is p
    assert p.data is data and data.any()


def test_fills_views_of_a_flat_buffer():
    flat = np.zeros(100)
    view = flat[10:60].reshape(5, 10)
    init.ones_(view)
    assert flat[10:60].sum() == 50 and flat.sum() == 50


def test_reproducible_from_manual_seed_and_dtype_independent():
    cnet.manual_seed(7)
    a = init.kaiming_uniform_(np.empty((3, 3, 4, 8)))
    cnet.manual_seed(7)
    b = init.kaiming_uniform_(np.empty((3, 3, 4, 8), np.float32))
    cnet.manual_seed(8)
    c = init.kaiming_uniform_(np.empty((3, 3, 4, 8)))
    assert np.array_equal(a.astype(np.float32), b)
    assert not np.array_equal(a, c)


def test_bad_mode():
    with pytest.raises(ValueError, match="fan_in"):
        init.kaiming_normal_(np.empty((3, 4)), mode="fan_avg")


@pytest.mark.parametrize("fn", [init.kaiming_normal_, init.kaiming_uniform_, init.lecun_normal_,
                                init.lecun_uniform_, init.xavier_uniform_, init.xavier_normal_])
def test_zero_element_arrays_are_a_no_op(fn):
    """As torch: initialising a zero-element tensor does nothing (no ZeroDivisionError)."""
    w = np.empty((3, 3, 0, 16), np.float32)
    assert fn(w) is w
