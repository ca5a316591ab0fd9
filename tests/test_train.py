"""cnet.train: Trainer, callbacks, history files, checkpoints and exact resume,
evaluate / predict, metrics and the progress bar."""
import csv
import io
import json
import os
import sys

import numpy as np
import pytest

import cnet
from cnet import nn, optim
from cnet.data import ArrayDataset, DataLoader, transforms as T
from cnet.train import (CheckpointError, EarlyStopping, History, LambdaCallback,
                        MetricAccumulator, ModelCheckpoint, ProgressBar, Trainer, build_model,
                        evaluate, fit, load_checkpoint, predict, topk_correct)
from cnet.train.history import plot_history

TIMING = ("train_time", "train_images_per_s", "val_time")


# ----------------------------------------------------------------- fixtures

def synthetic(n, seed, classes=4):
    """8x8x1 uint8 images whose label is the brightest quadrant (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 120, size=(n, 8, 8, 1))
    for q in range(classes):
        r, c = divmod(q, 2)
        x[y == q, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 100
    return ArrayDataset(x.astype(np.uint8), y)


@pytest.fixture(scope="module")
def data():
    return synthetic(384, 1), synthetic(128, 2)


def tiny_model():
    # BatchNorm (buffers) and Dropout (global RNG) make resume exactness non-trivial.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 4))


def make_run(data, epochs=2, lr=0.05, seed=0, loader_seed=None, schedule=True):
    """Everything a run needs, built from cnet.manual_seed(seed)."""
    cnet.manual_seed(seed)
    train, test = data
    model = tiny_model()
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    aug = T.Compose([T.RandomCrop(8, padding=1),
                     T.Normalize((0.3,), (0.25,))])
    tl = DataLoader(train, 32, shuffle=True, transform=aug, seed=loader_seed)
    vl = DataLoader(test, 64, transform=T.Normalize((0.3,), (0.25,)))
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(tl)) \
        if schedule else None
    return model, opt, sched, tl, vl


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ------------------------------------------------------------------ trainer

def test_trainer_learns_and_writes_history(data, tmp_path, capsys):
    model, opt, sched, tl, vl = make_run(data, epochs=4)
    trainer = Trainer(model, opt, scheduler=sched, schedule_interval="step",
                      out_dir=tmp_path, verbose=1)
    hist = trainer.fit(tl, 4, val_loader=vl)
    assert len(hist) == 4 and trainer.epoch == 4 and trainer.step == 4 * len(tl)
    assert hist["train_loss"][-1] < 0.7 * hist["train_loss"][0]
    assert hist["val_acc"][-1] > 0.6          # 4 classes: chance is 0.25
    assert all(0 <= a <= t5 <= 1 for a, t5 in zip(hist["val_acc"], hist["val_top5"]))
    assert hist["lr"][0] == pytest.approx(0.05) and hist["lr"][-1] < 0.05
    out = capsys.readouterr().out
    assert out.count("epoch ") >= 4 and "val_acc" in out
    # history.json / .csv agree with the in-memory history
    doc = json.load(open(tmp_path / "history.json"))
    assert [r["val_acc"] for r in doc["history"]] == hist["val_acc"]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[-1]["train_loss"]) == hist["train_loss"][-1]
    assert (tmp_path / "last.npz").exists()
    ck = load_checkpoint(tmp_path / "last.npz")
    assert ck["epoch"] == 4 and ck["step"] == trainer.step and len(ck["history"]) == 4
    # the plot is written when matplotlib exists, and skipped with a note otherwise
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "history.png").exists()
    except ImportError:
        assert "matplotlib" in out and not (tmp_path / "history.png").exists()


def test_fit_function_quiet_and_grad_clip(data, capsys):
    model, opt, _, tl, vl = make_run(data)
    norms = []
    from cnet.optim import clip_grad_norm_
    watch = LambdaCallback(on_batch_end=lambda t, s, logs: norms.append(
        clip_grad_norm_(list(t.model.parameters()), 1e9)))   # measures after clipping
    hist = fit(model, tl, epochs=1, optimizer=opt, val_loader=vl, verbose=0,
               grad_clip=0.01, callbacks=[watch])
    assert len(hist) == 1 and hist.trainer.epoch == 1
    assert capsys.readouterr().out == ""
    assert len(norms) == len(tl) and max(norms) <= 0.01 * (1 + 1e-4)


def test_resume_is_bit_exact(data, tmp_path):
    """2 epochs straight == 1 epoch, checkpoint, fresh process state, resume, 1 epoch."""
    model, opt, sched, tl, vl = make_run(data, epochs=2)
    full = Trainer(model, opt, scheduler=sched, schedule_interval="step", verbose=0,
                   callbacks=[EarlyStopping("val_loss", patience=5)])
    hist_full = full.fit(tl, 2, val_loader=vl)
    weights_full = model.state_dict()
    opt_full = opt.state_dict()

    model, opt, sched, tl, vl = make_run(data, epochs=2)
    first = Trainer(model, opt, scheduler=sched, schedule_interval="step", verbose=0,
                    out_dir=tmp_path, callbacks=[EarlyStopping("val_loss", patience=5)])
    first.fit(tl, 1, val_loader=vl)

    # Everything rebuilt from a different seed: the checkpoint must restore it all.
    model, opt, sched, tl, vl = make_run(data, epochs=2, seed=99)
    resumed = Trainer(model, opt, scheduler=sched, schedule_interval="step", verbose=0,
                      callbacks=[EarlyStopping("val_loss", patience=5)])
    hist = resumed.fit(tl, 2, val_loader=vl, resume=str(tmp_path / "last.npz"))

    assert strip(hist.rows) == strip(hist_full.rows)          # same losses, exactly
    assert resumed.step == full.step
    for k, v in model.state_dict().items():
        assert np.array_equal(v, weights_full[k]), k          # same weights, bit for bit
    st = opt.state_dict()["state"]
    for i, entry in opt_full["state"].items():
        assert np.array_equal(st[i]["momentum_buffer"], entry["momentum_buffer"])
    assert resumed.callbacks[0].state_dict()["best"] == full.callbacks[0].state_dict()["best"]


def test_resume_checkpoint_must_fit(data, tmp_path):
    model, opt, _, tl, vl = make_run(data)
    Trainer(model, opt, out_dir=tmp_path, verbose=0).fit(tl, 1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    trainer = Trainer(other, optim.SGD(other.parameters(), lr=0.1), verbose=0)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        trainer.fit(tl, 2, resume=str(tmp_path / "last.npz"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_loss_stops_with_a_clear_error(data):
    model, opt, _, tl, _ = make_run(data, lr=1e30)
    with pytest.raises(FloatingPointError, match="training loss is .* epoch 1"):
        Trainer(model, opt, verbose=0).fit(tl, 3)


def test_plateau_scheduler_steps_on_val_loss(data):
    model, opt, _, tl, vl = make_run(data, lr=0.0)
    sched = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    opt.param_groups[0]["lr"] = 0.0
    trainer = Trainer(model, opt, scheduler=sched, verbose=0)
    assert trainer.schedule_kind == "plateau"
    trainer.fit(tl, 2, val_loader=vl)       # must pass the metric (no TypeError)


# ---------------------------------------------------------------- callbacks

class _FakeTrainer:
    def __init__(self):
        self.saved, self.stop_training, self.model = [], False, None

    def save_checkpoint(self, path):
        self.saved.append(path)

    def log(self, msg):
        pass


def test_early_stopping_patience_and_min_delta():
    t = _FakeTrainer()
    es = EarlyStopping("val_loss", patience=2, min_delta=0.05)
    for epoch, v in enumerate([1.0, 0.9, 0.88, 0.87], start=1):   # 0.88/0.87: < min_delta
        es.on_epoch_end(t, epoch, {"val_loss": v})
        assert t.stop_training == (epoch == 4)
    assert es.best == 0.9 and es.best_epoch == 2 and es.stopped_epoch == 4
    es2 = EarlyStopping("val_acc", patience=1)          # auto mode: max for accuracies
    t2 = _FakeTrainer()
    for epoch, v in enumerate([0.5, 0.6, 0.7], start=1):
        es2.on_epoch_end(t2, epoch, {"val_acc": v})
    assert not t2.stop_training and es2.best == 0.7
    with pytest.raises(KeyError, match="val_acc.*not in the epoch's logs"):
        EarlyStopping("val_acc").on_epoch_end(t2, 1, {"train_loss": 1.0})


def test_early_stopping_stops_training(data):
    model, opt, _, tl, vl = make_run(data, lr=0.0, schedule=False)   # nothing improves
    es = EarlyStopping("val_loss", patience=1, restore_best_weights=True)
    trainer = Trainer(model, opt, callbacks=[es], verbose=0)
    hist = trainer.fit(tl, 10, val_loader=vl)
    assert len(hist) == 2 and es.stopped_epoch == 2 and trainer.epoch == 2


def test_model_checkpoint_keeps_the_best(data, tmp_path):
    t = _FakeTrainer()
    mc = ModelCheckpoint(str(tmp_path / "e{epoch}-{val_acc:.2f}.npz"), monitor="val_acc")
    for epoch, v in enumerate([0.5, 0.7, 0.6, 0.8], start=1):
        mc.on_epoch_end(t, epoch, {"val_acc": v})
    assert [os.path.basename(p) for p in t.saved] == ["e1-0.50.npz", "e2-0.70.npz",
                                                      "e4-0.80.npz"]
    mc_min = ModelCheckpoint("x.npz", monitor="val_loss", save_best_only=True)
    assert mc_min.mode == "min"

    # Integration: best.npz holds the best epoch's weights and metrics.
    model, opt, sched, tl, vl = make_run(data, epochs=4)
    best = tmp_path / "best.npz"
    trainer = Trainer(model, opt, scheduler=sched, schedule_interval="step", verbose=0,
                      callbacks=[ModelCheckpoint(best, monitor="val_acc")],
                      model_config=None)
    hist = trainer.fit(tl, 4, val_loader=vl)
    ck = load_checkpoint(best)
    row = hist.best("val_acc", "max")
    assert ck["metrics"]["val_acc"] == row["val_acc"] == max(hist["val_acc"])
    assert ck["epoch"] == row["epoch"]
    restored = tiny_model()
    restored.load_state_dict(ck["model_state"])
    assert evaluate(restored, vl)["acc"] == row["val_acc"]


def test_callback_hooks_fire_in_order(data):
    events = []
    cb = LambdaCallback(on_train_begin=lambda t: events.append("begin"),
                        on_epoch_begin=lambda t, e: events.append(f"e{e}"),
                        on_batch_end=lambda t, s, logs: events.append("b"),
                        on_epoch_end=lambda t, e, logs: events.append(f"/e{e}"),
                        on_train_end=lambda t: events.append("end"))
    model, opt, _, tl, _ = make_run(data)
    Trainer(model, opt, callbacks=[cb], verbose=0).fit(tl, 2)
    nb = len(tl)
    assert events == ["begin", "e1"] + ["b"] * nb + ["/e1", "e2"] + ["b"] * nb + ["/e2", "end"]
    model, opt, _, tl, _ = make_run(data)
    trainer = Trainer(model, opt, callbacks=[EarlyStopping("val_loss")], verbose=0)
    with pytest.raises(ValueError, match="needs a val_loader"):
        trainer.fit(tl, 1)
    assert trainer.step == 0                 # refused before any training
    with pytest.raises(TypeError, match="not a Callback"):
        Trainer(model, opt, callbacks=[object()])


# ------------------------------------------------------- evaluate / predict

def test_evaluate_and_predict(data):
    model, opt, _, tl, vl = make_run(data)
    Trainer(model, opt, verbose=0).fit(tl, 1)
    test = data[1]
    x = T.Normalize((0.3,), (0.25,))(test.images)
    assert model.training
    logits = predict(model, x, batch_size=50)
    assert model.training                                    # mode restored
    assert logits.shape == (len(test), 4) and logits.dtype == np.float32
    model.eval()
    ref = np.concatenate([model(x[i:i + 50]).copy() for i in range(0, len(x), 50)])
    np.testing.assert_array_equal(logits, ref)
    predict(model, x)
    assert not model.training                                 # eval stays eval
    model.train()
    r = evaluate(model, (x, test.labels), batch_size=40)
    assert model.training
    assert r["n"] == len(test)
    assert r["acc"] == np.mean(logits.argmax(1) == test.labels)
    assert r["top5"] == 1.0                                   # 4 classes
    lf = nn.CrossEntropyLoss()
    assert r["loss"] == pytest.approx(lf(logits, test.labels), rel=1e-5)
    r2 = evaluate(model, vl)
    assert r2["acc"] == r["acc"] and r2["n"] == r["n"]


def test_topk_correct_matches_bruteforce(rng):
    logits = rng.standard_normal((200, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 200)
    order = np.argsort(-logits, axis=1)
    for k in (1, 3, 5, 10, 12):
        expect = sum(labels[i] in order[i, :k] for i in range(200))
        assert topk_correct(logits, labels, (k,)) == [expect]
    acc = MetricAccumulator(5)
    acc.update(2.0, logits[:100], labels[:100])
    acc.update(1.0, logits[100:150], labels[100:150])
    assert acc.loss == pytest.approx((2.0 * 100 + 1.0 * 50) / 150)
    assert acc.count == 150
    with pytest.raises(ValueError, match="logits"):
        topk_correct(logits[:, None], labels)


# ---------------------------------------------------------- output helpers

class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_builtin_and_quiet():
    tty = _TTY()
    bar = ProgressBar(10, desc="epoch 1", file=tty, backend="builtin", min_interval=0)
    for _ in range(10):
        bar.update(1, 32, loss=0.5)
    bar.close()
    text = tty.getvalue()
    assert "epoch 1 10/10" in text and "img/s=" in text and "loss=0.5" in text
    assert bar.images == 320
    quiet = io.StringIO()              # not a terminal: nothing drawn
    bar = ProgressBar(10, file=quiet, backend="builtin")
    bar.update(1, 32)
    bar.close()
    assert quiet.getvalue() == ""
    log = io.StringIO()                # not a terminal, verbose=2: a line per 10%
    bar = ProgressBar(20, desc="epoch 3", file=log, verbose=2)
    for _ in range(20):
        bar.update(1, 32)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("epoch 3 20/20") and "\r" not in log.getvalue()
    silent = _TTY()
    bar = ProgressBar(10, file=silent, verbose=0)
    bar.update(1, 32)
    bar.close()
    assert silent.getvalue() == ""


def test_progress_bar_uses_tqdm_when_installed(monkeypatch):
    import types
    calls = []

    class FakeTqdm:
        def __init__(self, total, **kw):
            calls.append(("init", total))

        def set_postfix(self, d, refresh=False):
            calls.append(("postfix", dict(d)))

        def update(self, n):
            calls.append(("update", n))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    bar = ProgressBar(3, file=_TTY())
    bar.update(1, 16, loss=0.25)
    bar.close()
    assert calls[0] == ("init", 3) and calls[-1] == ("close",)
    assert calls[1][0] == "postfix" and "img/s" in calls[1][1] and calls[2] == ("update", 1)


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    h = History([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}])
    assert plot_history(h, tmp_path / "h.png") is False
    assert not (tmp_path / "h.png").exists()


def test_history_roundtrip_with_nan(tmp_path):
    h = History([{"epoch": 1, "val_loss": float("nan"), "train_loss": 0.5}])
    h.to_json(tmp_path / "h.json")
    text = open(tmp_path / "h.json").read()
    assert "NaN" not in text and "null" in text
    back = History.from_json(tmp_path / "h.json")
    assert np.isnan(back["val_loss"][0]) and back["train_loss"] == [0.5]


# -------------------------------------------------------------- checkpoints

def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.npz"
    cnet.save(tiny_model(), plain)           # a state dict, not a training checkpoint
    with pytest.raises(CheckpointError, match="not a cnet training checkpoint"):
        load_checkpoint(plain)
    model, opt = tiny_model(), None
    good = tmp_path / "good.npz"
    from cnet.train import save_checkpoint
    save_checkpoint(good, {"model_state": model.state_dict(), "model": None})
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not record which model"):
        build_model(good)


def test_checkpoint_rebuilds_a_named_model(tmp_path):
    from cnet.models import get_model
    from cnet.train import save_checkpoint
    model = get_model("lenet5", num_classes=10, in_channels=1)
    path = tmp_path / "m.npz"
    save_checkpoint(path, {"model": {"name": "lenet5", "kwargs": {"num_classes": 10,
                                                                   "in_channels": 1}},
                           "model_state": model.state_dict()})
    rebuilt = build_model(path)
    for k, v in model.state_dict().items():
        assert np.array_equal(rebuilt.state_dict()[k], v)
    save_checkpoint(path, {"model": {"name": "no_such_net", "kwargs": {}},
                           "model_state": model.state_dict()})
    with pytest.raises(CheckpointError, match="does not know"):
        build_model(path)
