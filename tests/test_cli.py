"""The cnet command line: a smoke run in a subprocess, eval of its checkpoint, resume,
exit codes and messages for bad arguments / datasets / checkpoints, and one real
(short) MNIST training run that must reach a meaningful accuracy."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnet.cli import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cnet(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cnet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cnet: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python -m cnet train --model lenet5 --epochs 1 --limit-train 512 --limit-test 256`."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cnet("train", "--model", "lenet5", "--epochs", "1", "--limit-train", "512",
                 "--limit-test", "256", "--out", str(out))
    return r, out


def test_train_smoke_subprocess(smoke_run):
    r, out = smoke_run
    assert r.returncode == 0, r.stderr
    for name in ("last.npz", "best.npz", "history.json", "history.csv"):
        assert (out / name).exists(), name
    hist = json.load(open(out / "history.json"))
    assert len(hist["history"]) == 1
    row = hist["history"][0]
    assert 0.0 <= row["val_acc"] <= 1.0 and row["train_loss"] > 0
    assert hist["metadata"]["model"]["name"] == "lenet5"
    assert "epoch 1/1" in r.stdout and "done: 1 epochs" in r.stdout
    assert "512 training / 256 test images" in r.stdout


def test_eval_reproduces_the_validation_accuracy(smoke_run, capsys):
    r, out = smoke_run
    assert r.returncode == 0, r.stderr
    assert main(["eval", "--checkpoint", str(out / "best.npz"), "--limit-test", "256",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    hist = json.load(open(out / "history.json"))["history"][0]
    assert result["n"] == 256 and result["model"] == "lenet5"
    assert result["acc"] == hist["val_acc"]              # same model, same 256 images
    assert result["loss"] == pytest.approx(hist["val_loss"], rel=1e-6)


def test_resume_continues_the_run(tmp_path, capsys):
    args = ["train", "--epochs", "2", "--limit-train", "256", "--limit-test", "128",
            "--schedule", "none", "--quiet", "--out"]
    assert main(args + [str(tmp_path / "full")]) == 0
    assert main(["train", "--epochs", "1", "--limit-train", "256", "--limit-test", "128",
                 "--schedule", "none", "--quiet", "--out", str(tmp_path / "part")]) == 0
    # The remaining options come from the checkpoint; --epochs extends the run.
    assert main(["train", "--resume", str(tmp_path / "part" / "last.npz"), "--epochs", "2",
                 "--quiet", "--out", str(tmp_path / "part")]) == 0
    full = json.load(open(tmp_path / "full" / "history.json"))["history"]
    part = json.load(open(tmp_path / "part" / "history.json"))["history"]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "step")
    assert [[r[k] for k in keys] for r in part] == [[r[k] for k in keys] for r in full]
    # A one-cycle schedule is laid out for its epochs: extending it is refused.
    assert main(["train", "--epochs", "1", "--limit-train", "256", "--limit-test", "128",
                 "--quiet", "--out", str(tmp_path / "oc")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "oc" / "last.npz"),
                 "--epochs", "3"]) == EXIT_USAGE
    assert "laid out for 1 epochs" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["train", "--epochs", "0"], "expected a positive integer"),
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--optimizer", "lbfgs"], "invalid choice"),
    (["train", "--lr", "abc"], "expected a number"),
    (["train", "--schedule", "plateau", "--warmup-epochs", "1"], "does not combine"),
    (["train", "--optimizer", "adam", "--nesterov"], "--nesterov applies to"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["eval"], "--checkpoint"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(args, fragment, capsys, tmp_path):
    code = main(args + (["--out", str(tmp_path)] if args[0] == "train" and
                        "--bogus" not in args else []))
    assert code == EXIT_USAGE
    assert fragment in one_error_line(capsys.readouterr().err)


def test_bad_argument_exit_code_in_subprocess():
    r = run_cnet("train", "--epochs", "-3")
    assert r.returncode == 2
    assert "--epochs" in one_error_line(r.stderr)


def test_missing_or_corrupt_dataset_exits_3(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ["--dataset", "cifar10", "--data-root", str(empty)],
        ["--dataset", "mnist", "--data-root", str(empty)],
        ["--dataset", f"npz:{tmp_path / 'missing.npz'}"],
    ]
    bad = tmp_path / "badmnist"
    bad.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (bad / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    cases.append(["--dataset", "mnist", "--data-root", str(bad)])
    notnpz = tmp_path / "x.npz"
    notnpz.write_bytes(b"not a zip")
    cases.append(["--dataset", f"npz:{notnpz}"])
    for extra in cases:
        assert main(["train", "--epochs", "1", "--out", str(tmp_path / "o")] + extra) \
            == EXIT_DATA, extra
        msg = one_error_line(capsys.readouterr().err)
        assert "dataset" in msg, msg


def test_npz_dataset_trains(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.random((300, 12, 12, 1)) * 50 + y[:, None, None, None] * 60).astype(np.uint8)
    np.savez(tmp_path / "toy.npz", images=x, labels=y)
    out = tmp_path / "o"
    assert main(["train", "--dataset", f"npz:{tmp_path / 'toy.npz'}", "--epochs", "3",
                 "--batch-size", "32", "--schedule", "none", "--lr", "1e-2", "--quiet",
                 "--out", str(out)]) == 0
    ck_meta = json.load(open(out / "history.json"))["metadata"]
    assert ck_meta["data"]["image_shape"] == [12, 12, 1]
    assert ck_meta["data"]["input_shape"] == [32, 32, 1]       # padded for LeNet-5
    hist = json.load(open(out / "history.json"))["history"]
    assert hist[0]["val_acc"] > 0.5                            # 3 separable classes
    assert main(["eval", "--checkpoint", str(out / "best.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 30      # the held-out 10%


def test_bad_checkpoint_exits_4(tmp_path, capsys, smoke_run):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes((smoke_run[1] / "best.npz").read_bytes()[:1000])
    import cnet
    plain = tmp_path / "plain.npz"
    cnet.save({"w": np.zeros(3)}, plain)
    for path, fragment in ((tmp_path / "nope.npz", "does not exist"),
                           (garbage, "cannot read checkpoint"),
                           (truncated, "cannot read checkpoint"),
                           (plain, "not a cnet training checkpoint")):
        assert main(["eval", "--checkpoint", str(path)]) == EXIT_CHECKPOINT
        assert fragment in one_error_line(capsys.readouterr().err)
        assert main(["train", "--resume", str(path), "--out", str(tmp_path)]) \
            == EXIT_CHECKPOINT
        assert fragment in one_error_line(capsys.readouterr().err)
    # A checkpoint of one model cannot resume another.
    assert main(["train", "--model", "resnet20", "--resume",
                 str(smoke_run[1] / "last.npz"), "--out", str(tmp_path)]) == EXIT_CHECKPOINT
    assert "holds a lenet5 model" in one_error_line(capsys.readouterr().err)


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP" in out and "lenet5" in out and "resnet20" in out


def test_real_mnist_short_run(tmp_path):
    """LeNet-5, one epoch on 16k MNIST images (a CI-sized slice of the main job),
    evaluated on the full 10k test set (measured: 95.9% and 96.5% for seeds 1 and 0)."""
    out = tmp_path / "mnist"
    r = run_cnet("train", "--model", "lenet5", "--epochs", "1", "--limit-train", "16000",
                 "--batch-size", "64", "--schedule", "none", "--lr", "2e-3",
                 "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    hist = json.load(open(out / "history.json"))["history"]
    assert hist[0]["val_acc"] >= 0.95, hist


def test_plain_train_defaults_are_the_main_job():
    """`cnet train` alone: LeNet-5 on the bundled MNIST with the README's recipe."""
    from cnet.cli import _resolve_train_args, build_parser
    args = build_parser().parse_args(["train"])
    _resolve_train_args(args)
    assert (args.model, args.dataset, args.batch_size, args.optimizer, args.schedule,
            args.epochs, args.augment) == ("lenet5", "mnist", 128, "adam", "onecycle", 6,
                                           False)
    assert args.lr == 3e-3 and args.out == os.path.join("runs", "lenet5-mnist")
    args = build_parser().parse_args(["train", "--optimizer", "sgd", "--dataset", "cifar10"])
    _resolve_train_args(args)
    assert (args.lr, args.momentum, args.weight_decay, args.augment) == (0.1, 0.9, 5e-4, True)


def test_cifar10_format_directory(tmp_path, capsys):
    """CIFAR-10 "python version" batches (tiny, generated): 3 channels, crop+flip
    augmentation on by default, eval reads the dataset from the checkpoint."""
    import pickle
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    out = tmp_path / "o"
    assert main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--epochs",
                 "1", "--quiet", "--out", str(out)]) == 0
    meta = json.load(open(out / "history.json"))["metadata"]
    assert meta["data"]["input_shape"] == [32, 32, 3] and meta["data"]["flip"]
    assert meta["args"]["augment"] is True
    assert main(["eval", "--checkpoint", str(out / "last.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "cifar10" and result["n"] == 30
