"""Optimizers: numpy transcriptions of torch's update rules, torch parity, layouts, state."""
import math

import numpy as np
import pytest

import cnet
from cnet import optim
from cnet.nn import Module, Parameter, flatten_parameters

SHAPES = [(3, 3, 2, 4), (4,), (5, 3), (1,), (7, 2)]
STEPS = 50


# -- numpy transcriptions of torch/optim/*.py (_single_tensor_*), written independently ------

def _d(p, g, st, h):
    d = -g if h.get("maximize") else g
    if h.get("weight_decay", 0) and not h.get("decoupled_weight_decay"):
        d = d + h["weight_decay"] * p
    return d


def ref_sgd(p, g, st, h):
    d = _d(p, g, st, h)
    m = h.get("momentum", 0)
    if m:
        if "buf" not in st:
            st["buf"] = d.copy()
        else:
            st["buf"] = st["buf"] * m + (1 - h.get("dampening", 0)) * d
        d = d + m * st["buf"] if h.get("nesterov") else st["buf"]
    return p - h["lr"] * d


def ref_adagrad(p, g, st, h):
    st["step"] = st.get("step", 0) + 1
    d = _d(p, g, st, h)
    st.setdefault("sum", np.full_like(p, h.get("initial_accumulator_value", 0)))
    clr = h["lr"] / (1 + (st["step"] - 1) * h.get("lr_decay", 0))
    st["sum"] = st["sum"] + d * d
    return p - clr * (d / (np.sqrt(st["sum"]) + h.get("eps", 1e-10)))


def ref_rmsprop(p, g, st, h):
    alpha, eps = h.get("alpha", 0.99), h.get("eps", 1e-8)
    d = _d(p, g, st, h)
    sq = st.get("sq", np.zeros_like(p)) * alpha + (1 - alpha) * d * d
    st["sq"] = sq
    if h.get("centered"):
        ga = st.get("ga", np.zeros_like(p))
        ga = ga + (1 - alpha) * (d - ga)
        st["ga"] = ga
        avg = np.sqrt(sq - ga * ga) + eps
    else:
        avg = np.sqrt(sq) + eps
    if h.get("momentum", 0) > 0:
        st["buf"] = st.get("buf", np.zeros_like(p)) * h["momentum"] + d / avg
        return p - h["lr"] * st["buf"]
    return p - h["lr"] * (d / avg)


def ref_adadelta(p, g, st, h):
    rho, eps = h.get("rho", 0.9), h.get("eps", 1e-6)
    d = _d(p, g, st, h)
    sq = st.get("sq", np.zeros_like(p)) * rho + (1 - rho) * d * d
    acc = st.get("acc", np.zeros_like(p))
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * d
    st["sq"], st["acc"] = sq, acc * rho + (1 - rho) * delta * delta
    return p - h.get("lr", 1.0) * delta


def ref_adam(p, g, st, h):
    lr, (b1, b2), eps = h.get("lr", 1e-3), h.get("betas", (0.9, 0.999)), h.get("eps", 1e-8)
    wd = h.get("weight_decay", 0)
    st["step"] = t = st.get("step", 0) + 1
    d = _d(p, g, st, h)
    if h.get("decoupled_weight_decay"):
        p = p * (1 - lr * wd)
    m = st.get("m", np.zeros_like(p))
    m = m + (1 - b1) * (d - m)
    v = st.get("v", np.zeros_like(p)) * b2 + (1 - b2) * d * d
    st["m"], st["v"] = m, v
    if h.get("amsgrad"):
        st["vmax"] = np.maximum(st.get("vmax", np.zeros_like(p)), v)
        v = st["vmax"]
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
    return p - (lr / (1 - b1 ** t)) * (m / denom)


def ref_nadam(p, g, st, h):
    lr, (b1, b2), eps = h.get("lr", 2e-3), h.get("betas", (0.9, 0.999)), h.get("eps", 1e-8)
    wd, md = h.get("weight_decay", 0), h.get("momentum_decay", 4e-3)
    st["step"] = t = st.get("step", 0) + 1
    d = _d(p, g, st, h)
    if h.get("decoupled_weight_decay"):
        p = p * (1 - lr * wd)
    mu = b1 * (1 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    st["mu_product"] = st.get("mu_product", 1.0) * mu
    m = st.get("m", np.zeros_like(p))
    m = m + (1 - b1) * (d - m)
    v = st.get("v", np.zeros_like(p)) * b2 + (1 - b2) * d * d
    st["m"], st["v"] = m, v
    denom = np.sqrt(v / (1 - b2 ** t)) + eps
    p = p + (-lr * (1 - mu) / (1 - st["mu_product"])) * (d / denom)
    return p + (-lr * mu_next / (1 - st["mu_product"] * mu_next)) * (m / denom)


REFS = {"SGD": ref_sgd, "Adagrad": ref_adagrad, "RMSprop": ref_rmsprop,
        "Adadelta": ref_adadelta, "Adam": ref_adam, "AdamW": ref_adam, "NAdam": ref_nadam}

# Every option of every optimizer at least once.
CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("Adagrad", dict()),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2,
                     eps=1e-6, maximize=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.8)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.005, centered=True, momentum=0.5, maximize=True)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1, maximize=True)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.3, amsgrad=True)),
    ("NAdam", dict()),
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for n, kw in CASES]

DEFAULT_HYPER = {
    "SGD": dict(lr=1e-3), "Adagrad": dict(lr=1e-2), "RMSprop": dict(lr=1e-2),
    "Adadelta": dict(lr=1.0), "Adam": dict(lr=1e-3), "AdamW": dict(lr=1e-3, weight_decay=1e-2,
                                                                     decoupled_weight_decay=True),
    "NAdam": dict(lr=2e-3),
}


def problem(dtype, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return init, grads


def run_ref(name, kw, init, grads):
    h = dict(DEFAULT_HYPER[name])
    h.update(kw)
    ps = [a.copy() for a in init]
    states = [{} for _ in ps]
    for gs in grads:
        ps = [REFS[name](p, g, st, h) for p, g, st in zip(ps, gs, states)]
    return ps


def run_cnet(name, kw, init, grads, params=None, opt=None):
    if params is None:
        params = [Parameter(a) for a in init]
    if opt is None:
        opt = getattr(optim, name)(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad[...] = g
        opt.step()
    return [p.data.copy() for p in params], params, opt


def run_torch(torch, name, kw, init, grads):
    """The same steps with torch.optim; returns (parameters, optimizer)."""
    tps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    topt = getattr(torch.optim, name)(tps, **kw)
    for gs in grads:
        for p, g in zip(tps, gs):
            p.grad = torch.from_numpy(g.copy())
        topt.step()
    return tps, topt


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_matches_numpy_transcription_float64(name, kw):
    init, grads = problem(np.float64)
    got, _, opt = run_cnet(name, kw, init, grads)
    want = run_ref(name, kw, init, grads)
    assert opt.last_step_finite
    for a, b in zip(got, want):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_matches_numpy_transcription_float32(name, kw):
    init, grads = problem(np.float32)
    got, _, _ = run_cnet(name, kw, init, grads)
    want = run_ref(name, kw, init, grads)      # the same update evaluated in float32
    for a, b in zip(got, want):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_torch_parity(name, kw, dtype):
    torch = pytest.importorskip("torch")
    init, grads = problem(dtype)
    got, _, _ = run_cnet(name, kw, init, grads)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)     # NAdam's mu_product scalar in double, as cnet
    try:
        tps, _ = run_torch(torch, name, kw, init, grads)
    finally:
        torch.set_default_dtype(prev)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, p in zip(got, tps):
        np.testing.assert_allclose(a, p.detach().numpy(), **tol)


def test_defaults_match_torch():
    torch = pytest.importorskip("torch")
    for name in REFS:
        ours = getattr(optim, name)([Parameter(np.zeros(3))]).defaults
        theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(3))]).defaults
        for k, v in ours.items():
            if k in theirs and k != "decoupled_weight_decay":
                assert theirs[k] == v or (isinstance(v, tuple) and tuple(theirs[k]) == v), \
                    (name, k, v, theirs[k])


# -- groups and layouts -------------------------------------------------------------------

def test_param_groups_own_hyperparameters():
    init, grads = problem(np.float64)
    params = [Parameter(a) for a in init]
    opt = optim.SGD([{"params": params[:2], "lr": 0.2, "momentum": 0.5},
                     {"params": params[2:], "weight_decay": 0.1}], lr=0.05, momentum=0.9)
    assert opt.param_groups[1]["lr"] == 0.05 and opt.param_groups[0]["lr"] == 0.2
    got, _, _ = run_cnet("SGD", None, init, grads, params=params, opt=opt)
    want = (run_ref("SGD", dict(lr=0.2, momentum=0.5), init[:2], [g[:2] for g in grads])
            + run_ref("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.1), init[2:],
                      [g[2:] for g in grads]))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_add_param_group_and_errors():
    a, b = Parameter(np.ones(3)), Parameter(np.ones((2, 2)))
    opt = optim.Adam([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([Parameter(np.ones(2))], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam([Parameter(np.ones(2))], lr=-1)
    with pytest.raises(ValueError, match="beta"):
        optim.Adam([Parameter(np.ones(2))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="mixes dtypes"):
        optim.SGD([Parameter(np.ones(2)), Parameter(np.ones(2, np.float32))], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    c = Parameter(np.ones(3))
    c.grad = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="float32 grad"):
        optim.SGD([c], lr=0.1)


class TinyNet(Module):
    """Interleaved weights and biases, like a real network's registration order."""

    def __init__(self, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(3)
        self.w1 = Parameter(rng.standard_normal((3, 3, 2, 8)).astype(dtype))
        self.b1 = Parameter(rng.standard_normal(8).astype(dtype))
        self.g1 = Parameter(rng.standard_normal(8).astype(dtype))
        self.w2 = Parameter(rng.standard_normal((8, 5)).astype(dtype))
        self.w3 = Parameter(rng.standard_normal((5, 4)).astype(dtype))
        self.b3 = Parameter(rng.standard_normal(4).astype(dtype))


def test_param_groups_no_decay_helper():
    net = TinyNet()
    groups = optim.param_groups_no_decay(net, 5e-4)
    assert [p.data.ndim for p in groups[0]["params"]] == [4, 2, 2]
    assert groups[0]["weight_decay"] == 5e-4
    assert [p.data.shape for p in groups[1]["params"]] == [(8,), (8,), (4,)]
    assert groups[1]["weight_decay"] == 0.0


def test_preflattened_model_is_coalesced_not_reflattened():
    net = TinyNet(np.float64)
    flat, flat_grad = net.flatten_parameters()
    init = [p.data.copy() for p in net.parameters()]
    opt = optim.SGD(optim.param_groups_no_decay(net, 0.1), lr=0.1, momentum=0.9)
    # every parameter is still a view of the model-wide buffer
    for p in net.parameters():
        assert p.data.base is flat and p.grad.base is flat_grad
    # decay group w1 | w2 w3 -> 2 spans; no-decay group b1 g1 | b3 -> 2 spans
    spans = [[s[3] for s in seg.spans] for gs in opt._gstates for seg in gs.segments]
    assert spans == [[3 * 3 * 2 * 8, 8 * 5 + 5 * 4], [16, 4]]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(flat.size) for _ in range(STEPS)]
    for g in grads:
        flat_grad[...] = g
        opt.step()
    params = list(net.parameters())
    offs = np.cumsum([0] + [p.size for p in params])
    per = [[g[offs[i]:offs[i + 1]].reshape(p.shape) for i, p in enumerate(params)] for g in grads]
    decay_idx, nodecay_idx = [0, 3, 4], [1, 2, 5]
    want_d = run_ref("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1),
                     [init[i] for i in decay_idx], [[g[i] for i in decay_idx] for g in per])
    want_n = run_ref("SGD", dict(lr=0.1, momentum=0.9), [init[i] for i in nodecay_idx],
                     [[g[i] for i in nodecay_idx] for g in per])
    for i, w in zip(decay_idx + nodecay_idx, want_d + want_n):
        np.testing.assert_allclose(params[i].data, w, rtol=1e-12, atol=1e-13)
    opt.zero_grad()
    assert not flat_grad.any()


def test_unflattened_groups_get_their_own_buffers():
    net = TinyNet()
    opt = optim.AdamW(optim.param_groups_no_decay(net, 0.1))
    for gs in opt._gstates:
        assert len(gs.segments) == 1 and len(gs.segments[0].spans) == 1
    decay = opt.param_groups[0]["params"]
    assert decay[0].data.base is decay[1].data.base is not None


def test_rebinding_after_construction_keeps_state():
    """flatten_parameters()/to() after building the optimizer: the layout follows, state is kept."""
    init, grads = problem(np.float64)
    params = [Parameter(a) for a in init]
    opt = optim.Adam(params, lr=0.01)
    _, _, _ = run_cnet("Adam", None, init, grads[:10], params=params, opt=opt)
    flat, _ = flatten_parameters(params[::-1])      # a new buffer, in another order
    got, _, _ = run_cnet("Adam", None, init, grads[10:], params=params, opt=opt)
    assert params[0].data.base is flat
    want = run_ref("Adam", dict(lr=0.01), init, grads)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_accepts_module_and_generator():
    net = TinyNet()
    opt = optim.SGD(net.parameters(), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 6
    opt2 = optim.SGD(net, lr=0.1)
    assert len(opt2.param_groups[0]["params"]) == 6


def test_non_contiguous_parameter_rejected():
    p = Parameter(np.ones((4, 4)))
    p.data = np.ones((4, 8))[:, ::2]
    p.grad = np.zeros((4, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        optim.SGD([p, Parameter(np.ones(2))], lr=0.1)


def test_zero_grad():
    net = TinyNet()
    opt = optim.SGD(net, lr=0.1)
    for p in net.parameters():
        p.grad[...] = 1.0
    opt.zero_grad()
    assert all(not p.grad.any() for p in net.parameters())


# -- state_dict ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [c for c in CASES if c[1]], ids=[i for c, i in zip(CASES, IDS) if c[1]])
def test_state_dict_roundtrip_resumes_identical_trajectory(name, kw, tmp_path):
    init, grads = problem(np.float32)
    full, _, _ = run_cnet(name, kw, init, grads)
    mid, _, opt = run_cnet(name, kw, init, grads[:20])
    path = tmp_path / "opt.npz"
    cnet.save(opt.state_dict(), path)
    params = [Parameter(a) for a in mid]
    opt2 = getattr(optim, name)(params, **kw)
    opt2.load_state_dict(cnet.load(path))
    resumed, _, _ = run_cnet(name, kw, None, grads[20:], params=params, opt=opt2)
    for a, b in zip(resumed, full):
        assert np.array_equal(a, b)


def test_state_dict_structure_matches_torch():
    torch = pytest.importorskip("torch")
    init, grads = problem(np.float64, steps=3)
    for name, kw in [("Adam", dict(amsgrad=True)), ("SGD", dict(momentum=0.9)),
                     ("NAdam", {}), ("RMSprop", dict(centered=True, momentum=0.1)),
                     ("Adagrad", {}), ("Adadelta", {})]:
        _, params, opt = run_cnet(name, kw, init, grads)
        _, topt = run_torch(torch, name, kw, init, grads)
        ours, theirs = opt.state_dict(), topt.state_dict()
        assert sorted(ours["state"]) == sorted(theirs["state"])
        for i in theirs["state"]:
            assert set(ours["state"][i]) == set(theirs["state"][i]), name
            for k, v in theirs["state"][i].items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    np.testing.assert_allclose(ours["state"][i][k], v.numpy(), rtol=1e-10,
                                               atol=1e-12)
                elif isinstance(v, torch.Tensor):
                    assert ours["state"][i][k] == pytest.approx(float(v), rel=1e-6)
        assert [g["params"] for g in ours["param_groups"]] == \
            [g["params"] for g in theirs["param_groups"]]
        # the same state loads into torch
        converted = {"state": {i: {k: (torch.tensor(v) if v is not None else None)
                                   for k, v in s.items()} for i, s in ours["state"].items()},
                     "param_groups": theirs["param_groups"]}
        topt.load_state_dict(converted)


def test_load_state_dict_errors():
    opt = optim.Adam([Parameter(np.ones(3))])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)


# -- non-finite detection ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "RMSprop"])
def test_nonfinite_gradient_step_is_skipped(name, bad):
    init, grads = problem(np.float32, steps=12)
    kw = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    clean, _, _ = run_cnet(name, kw, init, grads[:6] + grads[7:])
    params = [Parameter(a) for a in init]
    opt = getattr(optim, name)(params, skip_nonfinite=True, **kw)
    run_cnet(name, kw, init, grads[:6], params=params, opt=opt)
    before = [p.data.copy() for p in params]
    state_before = opt.state_dict()
    grads[6][2][1, 1] = bad
    run_cnet(name, kw, init, grads[6:7], params=params, opt=opt)
    assert opt.last_step_finite is False and opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert np.array_equal(p.data, b)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(v, state_before["state"][i][k])
    got, _, _ = run_cnet(name, kw, init, grads[7:], params=params, opt=opt)
    assert opt.last_step_finite
    for a, b in zip(got, clean):
        assert np.array_equal(a, b)


def test_nonfinite_reported_without_skipping():
    init, grads = problem(np.float32, steps=3)
    params = [Parameter(a) for a in init]
    opt = optim.Adam(params)
    run_cnet("Adam", {}, init, grads[:1], params=params, opt=opt)
    assert opt.last_step_finite and opt.nonfinite_steps == 0
    grads[1][0][0, 0, 0, 0] = np.nan
    run_cnet("Adam", {}, init, grads[1:2], params=params, opt=opt)
    assert not opt.last_step_finite and opt.nonfinite_steps == 1 and opt.skipped_steps == 0
    assert np.isnan(params[0].data[0, 0, 0, 0])     # as torch: the step went through


def test_parameter_overflow_is_reported():
    p = Parameter(np.full(4, 3e38, np.float32))
    p.grad[...] = -1.0
    opt = optim.SGD([p], lr=1e38)
    opt.step()
    assert not opt.last_step_finite and np.isinf(p.data).all()


# -- clip_grad_norm_ -----------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("flat", [False, True])
def test_clip_grad_norm_vs_numpy_and_torch(norm_type, max_norm, flat):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    params = [Parameter(np.zeros(s, np.float32)) for s in SHAPES]
    for p in params:
        p.grad[...] = rng.standard_normal(p.shape)
    if flat:
        flatten_parameters(params)
    grads = [p.grad.astype(np.float64) for p in params]
    allg = np.concatenate([g.ravel() for g in grads])
    want = (np.abs(allg).max() if norm_type == math.inf
            else (np.abs(allg) ** norm_type).sum() ** (1 / norm_type))
    tps = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for tp, p in zip(tps, params):
        tp.grad = torch.from_numpy(p.grad.copy())
    tnorm = torch.nn.utils.clip_grad_norm_(tps, max_norm, norm_type)
    total = optim.clip_grad_norm_(params, max_norm, norm_type)
    assert total == pytest.approx(want, rel=1e-6)
    assert total == pytest.approx(float(tnorm), rel=1e-5)
    coef = min(1.0, max_norm / (want + 1e-6))
    for p, g, tp in zip(params, grads, tps):
        np.testing.assert_allclose(p.grad, g * coef, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_nonfinite():
    p = Parameter(np.zeros(5, np.float32))
    p.grad[...] = [1, 2, np.inf, 3, 4]
    assert optim.clip_grad_norm_([p], 1.0) == math.inf
    p.grad[...] = [1, 2, np.nan, 3, 4]
    assert math.isnan(optim.clip_grad_norm_([p], 1.0))
    with pytest.raises(RuntimeError, match="non-finite"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert optim.clip_grad_norm_([], 1.0) == 0.0


# -- threads -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("Adam", dict(amsgrad=True, weight_decay=0.1)),
                                     ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                     ("RMSprop", dict(centered=True, momentum=0.5)),
                                     ("NAdam", {}), ("Adagrad", {}), ("Adadelta", {})])
def test_one_and_two_threads_identical(name, kw):
    rng = np.random.default_rng(2)
    n = 5 * 32768 + 123            # several chunks, a ragged tail
    init = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(77).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(4)]
    results, norms = [], []
    for nt in (1, 2):
        with cnet.threads(nt):
            out, params, _ = run_cnet(name, kw, init, grads)
            norms.append(optim.clip_grad_norm_(params, 1.0))
            results.append(out + [p.grad.copy() for p in params])
    assert norms[0] == norms[1]
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_kernel_rejects_bad_chunks():
    from cnet_ext import _optim
    p = np.zeros(10, np.float32)
    bad = np.array([[0, 0, 0, 11]], dtype=np.intp)
    with pytest.raises(ValueError, match="out of bounds"):
        _optim.sgd(p, p.copy(), None, bad, 0.1, 0.0, 0.0, 0.0, False, False, False, 1)
    with pytest.raises(ValueError, match="size"):
        _optim.adam(p, p.copy(), np.zeros(10, np.float32), np.zeros(9, np.float32), None,
                    _optim.chunk_table([(0, 0, 0, 9)]), 0, 1, 0.9, 0.999, 1e-3, 1, 1e-8,
                    False, False, 1)


def test_training_loop_with_real_layers_matches_torch():
    """Linear/ReLU/CrossEntropy trained by cnet.optim.AdamW (flattened buffers, two groups)
    and by torch.optim.AdamW from the same weights give the same weights."""
    torch = pytest.importorskip("torch")
    from cnet import nn
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    tmodel = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 4)).double()
    with torch.no_grad():
        for (_, p), tp in zip(model.named_parameters(), tmodel.parameters()):
            tp.copy_(torch.from_numpy(p.data.T.copy() if p.data.ndim == 2 else p.data.copy()))
    opt = optim.AdamW(optim.param_groups_no_decay(model, 0.05), lr=0.01)
    tdecay = [p for p in tmodel.parameters() if p.ndim == 2]
    tno = [p for p in tmodel.parameters() if p.ndim == 1]
    topt = torch.optim.AdamW([{"params": tdecay, "weight_decay": 0.05},
                              {"params": tno, "weight_decay": 0.0}], lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(5)
    for _ in range(10):
        x = rng.standard_normal((8, 6))
        y = rng.integers(0, 4, 8)
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)),
                                          torch.from_numpy(y)).backward()
        topt.step()
    for p, tp in zip(model.parameters(), tmodel.parameters()):
        want = tp.detach().numpy()
        np.testing.assert_allclose(p.data, want.T if want.ndim == 2 else want, rtol=1e-9,
                                   atol=1e-12)
