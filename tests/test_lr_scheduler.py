"""LR schedules: closed forms, torch parity, per-step use, state_dict round-trips."""
import math

import numpy as np
import pytest

import cnet
from cnet import optim
from cnet.nn import Parameter
from cnet.optim import lr_scheduler as S

EPOCHS = 40


def make_opt(cls=optim.SGD, lrs=(0.1, 0.03), **kw):
    groups = [{"params": [Parameter(np.zeros(2))], "lr": lr} for lr in lrs]
    return cls(groups, lr=lrs[0], **kw)


def trajectory(sched, n=EPOCHS):
    """lr of every group at epochs 0..n-1 (the value in use during each epoch)."""
    out = [sched.get_last_lr()]
    for _ in range(n - 1):
        sched.optimizer.step()
        sched.step()
        out.append(sched.get_last_lr())
    assert out[-1] == [g["lr"] for g in sched.optimizer.param_groups]
    return np.array(out)


CLOSED = {
    "StepLR": (dict(step_size=7, gamma=0.5),
               lambda b, e: b * 0.5 ** (e // 7)),
    "MultiStepLR": (dict(milestones=[5, 12, 12, 30], gamma=0.3),
                    lambda b, e: b * 0.3 ** sum(m <= e for m in [5, 12, 12, 30])),
    "ExponentialLR": (dict(gamma=0.9), lambda b, e: b * 0.9 ** e),
    "CosineAnnealingLR": (dict(T_max=15, eta_min=1e-3),
                          lambda b, e: 1e-3 + (b - 1e-3) * (1 + math.cos(math.pi * e / 15)) / 2),
    "LinearLR": (dict(start_factor=0.1, end_factor=1.0, total_iters=8),
                 lambda b, e: b * (0.1 + 0.9 * min(e, 8) / 8)),
    "ConstantLR": (dict(factor=0.25, total_iters=6), lambda b, e: b * (0.25 if e < 6 else 1.0)),
    "PolynomialLR": (dict(total_iters=20, power=2.0),
                     lambda b, e: b * (1 - min(e, 20) / 20) ** 2),
    "LambdaLR": (dict(lr_lambda=lambda e: 1.0 / (1 + e)), lambda b, e: b / (1 + e)),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_closed_form(name):
    kw, f = CLOSED[name]
    opt = make_opt()
    traj = trajectory(getattr(S, name)(opt, **kw))
    want = np.array([[f(b, e) for b in (0.1, 0.03)] for e in range(EPOCHS)])
    np.testing.assert_allclose(traj, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_step_with_epoch_uses_closed_form(name):
    kw, f = CLOSED[name]
    sched = getattr(S, name)(make_opt(), **kw)
    for e in (13, 3, 25):
        sched.step(e)
        assert sched.last_epoch == e
        np.testing.assert_allclose(sched.get_last_lr(), [f(0.1, e), f(0.03, e)], rtol=1e-12)


TORCH_CASES = [
    ("StepLR", dict(step_size=7, gamma=0.5)),
    ("MultiStepLR", dict(milestones=[5, 12, 12, 30], gamma=0.3)),
    ("ExponentialLR", dict(gamma=0.9)),
    ("CosineAnnealingLR", dict(T_max=15, eta_min=1e-3)),
    ("LinearLR", dict(start_factor=0.1, total_iters=8)),
    ("ConstantLR", dict(factor=0.25, total_iters=6)),
    ("PolynomialLR", dict(total_iters=20, power=2.0)),
    ("MultiplicativeLR", dict(lr_lambda=lambda e: 0.95)),
    ("OneCycleLR", dict(max_lr=[0.5, 0.2], total_steps=EPOCHS)),
    ("OneCycleLR", dict(max_lr=0.5, total_steps=EPOCHS, three_phase=True,
                        anneal_strategy="linear")),
]


def torch_trajectory(torch, name, kw, opt_cls="SGD", n=EPOCHS, **okw):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in (0.1, 0.03)]
    opt = getattr(torch.optim, opt_cls)(groups, lr=0.1, **okw)
    sched = getattr(torch.optim.lr_scheduler, name)(opt, **kw)
    out, moms = [sched.get_last_lr()], []
    for _ in range(n - 1):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr())
    return np.array(out), opt


@pytest.mark.parametrize("name,kw", TORCH_CASES, ids=[c[0] + str(i) for i, c in enumerate(TORCH_CASES)])
def test_torch_parity(name, kw):
    torch = pytest.importorskip("torch")
    want, _ = torch_trajectory(torch, name, kw, momentum=0.9)
    got = trajectory(getattr(S, name)(make_opt(momentum=0.9), **kw))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_one_cycle_cycles_beta1_like_torch():
    torch = pytest.importorskip("torch")
    kw = dict(max_lr=0.01, total_steps=30, pct_start=0.25)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    topt = torch.optim.Adam(groups, lr=0.001)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, **kw)
    opt = optim.Adam([Parameter(np.zeros(2))], lr=0.001)
    sched = S.OneCycleLR(opt, **kw)
    for _ in range(29):
        assert opt.param_groups[0]["betas"] == pytest.approx(topt.param_groups[0]["betas"])
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12)
        opt.step(), topt.step(), sched.step(), tsched.step()
    with pytest.raises(ValueError, match="total steps"):
        sched.step(), sched.step()


def test_chained_and_sequential_match_torch():
    torch = pytest.importorskip("torch")

    def build(mod, opt):
        warm = mod.LinearLR(opt, start_factor=0.2, total_iters=4)
        cos = mod.CosineAnnealingLR(opt, T_max=20)
        return mod.SequentialLR(opt, [warm, cos], milestones=[4])

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in (0.1, 0.03)]
    topt = torch.optim.SGD(groups, lr=0.1)
    tsched = build(torch.optim.lr_scheduler, topt)
    opt = make_opt()
    sched = build(S, opt)
    for _ in range(30):
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12)
        opt.step(), topt.step(), sched.step(), tsched.step()
    # chained: exponential decay times step decay
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    tch = torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ExponentialLR(topt, 0.9),
         torch.optim.lr_scheduler.StepLR(topt, 3, 0.5)])
    opt = optim.SGD([Parameter(np.zeros(2))], lr=0.1)
    ch = S.ChainedScheduler([S.ExponentialLR(opt, 0.9), S.StepLR(opt, 3, 0.5)])
    for e in range(12):
        assert ch.get_last_lr() == pytest.approx(tch.get_last_lr(), rel=1e-12)
        assert ch.get_last_lr()[0] == pytest.approx(0.1 * 0.9 ** e * 0.5 ** (e // 3))
        opt.step(), topt.step(), ch.step(), tch.step()


def test_warmup_helper():
    opt = make_opt(lrs=(0.1,))
    sched = S.warmup(opt, S.CosineAnnealingLR(opt, T_max=10), warmup_iters=5, start_factor=0.1)
    traj = trajectory(sched, 16)[:, 0]
    np.testing.assert_allclose(traj[:5], 0.1 * (0.1 + 0.9 * np.arange(5) / 5), rtol=1e-12)
    np.testing.assert_allclose(traj[5:], 0.1 * (1 + np.cos(np.pi * np.arange(11) / 10)) / 2,
                               rtol=1e-12, atol=1e-15)


def test_per_step_use_within_epochs():
    """A per-iteration schedule: one step per batch, 3 epochs x 7 batches."""
    opt = make_opt(lrs=(0.2,))
    sched = S.CosineAnnealingLR(opt, T_max=21)
    seen = []
    for epoch in range(3):
        for batch in range(7):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    np.testing.assert_allclose(seen, 0.1 * (1 + np.cos(np.pi * np.arange(21) / 21)), rtol=1e-12)


def test_reduce_lr_on_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    metrics = [1.0, 0.9, 0.9, 0.95, 0.91, 0.9, 0.89999, 0.8, 0.85, 0.86, 0.87, 0.88, 0.7,
               0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77]
    for kw in [dict(patience=2), dict(patience=1, cooldown=2, factor=0.5, min_lr=[0.01, 0.02]),
               dict(mode="max", threshold_mode="abs", threshold=0.05, patience=0)]:
        groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in (0.1, 0.03)]
        topt = torch.optim.SGD(groups, lr=0.1)
        tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
        opt = make_opt()
        sched = S.ReduceLROnPlateau(opt, **kw)
        for m in metrics:
            sched.step(m)
            tsched.step(m)
            assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12)
            assert sched.num_bad_epochs == tsched.num_bad_epochs


def test_reduce_lr_on_plateau_closed_form():
    opt = make_opt(lrs=(1.0,))
    sched = S.ReduceLROnPlateau(opt, patience=3, factor=0.5)
    for e in range(1, 13):
        sched.step(5.0)          # never improves after the first epoch
    # bad epochs 1..11: a reduction at every 4th bad epoch (patience 3)
    assert sched.get_last_lr() == [0.5 ** 2]


@pytest.mark.parametrize("build", [
    lambda o: S.StepLR(o, 3, 0.5),
    lambda o: S.MultiStepLR(o, [4, 9], 0.1),
    lambda o: S.CosineAnnealingLR(o, 12),
    lambda o: S.OneCycleLR(o, 1.0, total_steps=30),
    lambda o: S.LambdaLR(o, lambda e: 0.9 ** e),
    lambda o: S.warmup(o, S.ExponentialLR(o, 0.9), 3),
    lambda o: S.ReduceLROnPlateau(o, patience=1),
], ids=["step", "multistep", "cosine", "onecycle", "lambda", "warmup", "plateau"])
def test_state_dict_roundtrip(build, tmp_path):
    plateau = lambda s: isinstance(s, S.ReduceLROnPlateau)  # noqa: E731
    metric = iter(np.linspace(1, 0.9, 30).tolist() * 2)

    def advance(sched, k):
        for _ in range(k):
            sched.optimizer.step()
            sched.step(next(metric)) if plateau(sched) else sched.step()

    opt = make_opt(momentum=0.9)
    sched = build(opt)
    advance(sched, 10)
    cnet.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.npz")
    advance(sched, 8)
    want = sched.get_last_lr()

    ckpt = cnet.load(tmp_path / "s.npz")
    opt2 = make_opt(momentum=0.9)
    sched2 = build(opt2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    metric = iter(np.linspace(1, 0.9, 30).tolist()[10:] * 2)
    advance(sched2, 8)
    assert sched2.get_last_lr() == pytest.approx(want, rel=1e-12)


def test_resume_with_last_epoch_requires_initial_lr():
    opt = make_opt()
    with pytest.raises(KeyError, match="initial_lr"):
        S.StepLR(opt, 3, last_epoch=5)
