"""The training loop: Trainer, fit, evaluate, predict.

>>> trainer = Trainer(model, optimizer, loss_fn=nn.CrossEntropyLoss(),
...                   scheduler=sched, out_dir="runs/lenet5",
...                   callbacks=[ModelCheckpoint("runs/lenet5/best.npz"),
...                              EarlyStopping(patience=3)])
>>> history = trainer.fit(train_loader, epochs=5, val_loader=test_loader)
>>> history["val_acc"][-1]

Each epoch: a training pass (per-batch progress with images/s and ETA), a
validation pass, the schedule's epoch step, the history row, the callbacks,
then -- with ``out_dir`` -- history.json / history.csv and the checkpoint
``last.npz`` from which ``fit(..., resume=path)`` continues exactly.

Resume is exact at an epoch boundary: the checkpoint holds the weights and
buffers, the optimizer and schedule state, cnet's global RNG (dropout), the
loaders' seeds and positions (shuffling and augmentation are functions of
seed, epoch and batch index) and the callbacks' counters, so at the same
thread count the resumed run computes the same numbers as the uninterrupted
one, bit for bit.
"""
import math
import os
import sys
import time

import numpy as np

from .. import _random
from .._threads import get_num_threads
from .callbacks import Callback
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .history import History, plot_history
from .metrics import MetricAccumulator
from .progress import ProgressBar, format_time

__all__ = ["Trainer", "fit", "evaluate", "predict"]


def _scheduler_kind(scheduler):
    names = {c.__name__ for c in type(scheduler).__mro__}
    if "ReduceLROnPlateau" in names:
        return "plateau"
    if "OneCycleLR" in names:
        return "step"
    return "epoch"


def _batches(data, batch_size):
    """Iterate ``(x, y)`` batches of a loader, or of an ``(x, y)`` pair of arrays."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        n = len(x)
        if len(y) != n:
            raise ValueError(f"evaluate: {n} inputs but {len(y)} labels")
        for lo in range(0, n, batch_size):
            yield np.ascontiguousarray(x[lo:lo + batch_size]), np.asarray(y[lo:lo + batch_size])
    else:
        yield from data


def _num_batches(data, batch_size):
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data)
    except TypeError:
        return 0


class _EvalMode:
    """Put a model in eval mode and restore its previous mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        if self.was_training:
            self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


def evaluate(model, data, loss_fn=None, batch_size=256, topk=5, verbose=0, desc="eval",
             progress_file=None):
    """Loss, top-1 and top-k accuracy of ``model`` over ``data``, in eval mode.

    ``data``: a DataLoader (or any iterable of ``(x, y)`` batches) or a pair of
    arrays ``(x, y)`` cut into ``batch_size`` batches.  ``loss_fn`` defaults to
    cross-entropy.  The model's previous train/eval mode is restored.  Returns
    ``{'loss', 'acc', 'top5', 'n', 'time', 'images_per_s'}`` (accuracies as
    fractions).
    """
    if loss_fn is None:
        from ..nn import CrossEntropyLoss
        loss_fn = CrossEntropyLoss()
    acc = MetricAccumulator(topk)
    bar = ProgressBar(_num_batches(data, batch_size), desc=desc, verbose=verbose,
                      file=progress_file)
    start = time.perf_counter()
    with _EvalMode(model), bar:
        for x, y in _batches(data, batch_size):
            logits = model(x)
            loss = loss_fn(logits, y)
            acc.update(loss, logits, y)
            bar.update(1, len(y), loss=acc.loss, acc=f"{100 * acc.acc:.2f}%")
    elapsed = time.perf_counter() - start
    out = acc.result()
    out.update(n=acc.count, time=elapsed,
               images_per_s=acc.count / elapsed if elapsed > 0 else float("nan"))
    return out


def predict(model, x, batch_size=256):
    """The model's outputs for every row of ``x``, computed in eval mode in batches.

    Returns a new array (N, ...) of the model's dtype; the previous mode is restored.
    """
    x = np.asarray(x)
    n = len(x)
    out = None
    with _EvalMode(model):
        for lo in range(0, n, batch_size):
            y = model(np.ascontiguousarray(x[lo:lo + batch_size]))
            if out is None:
                out = np.empty((n,) + y.shape[1:], dtype=y.dtype)
            out[lo:lo + len(y)] = y            # copy: layers may reuse their buffers
    if out is None:
        raise ValueError(f"predict: empty input of shape {x.shape}")
    return out


class Trainer:
    """Runs epochs of training with validation, schedule, callbacks and checkpoints.

    ``model``, ``optimizer``; ``loss_fn`` (default cross-entropy); ``scheduler``
    stepped per epoch, per step (``schedule_interval='step'``, the default for
    OneCycleLR) or on the monitored loss (ReduceLROnPlateau: val_loss, or
    train_loss without validation).  ``callbacks``: ModelCheckpoint,
    EarlyStopping, ... ``out_dir``: where history.json/csv, history.png and
    ``last.npz`` go (None: nothing written).  ``model_config``: ``{'name',
    'kwargs'}`` so that a checkpoint can rebuild the model by name;
    ``metadata``: stored in checkpoints and history.json.  ``verbose``: 0
    silent, 1 per-epoch lines plus a progress bar on a terminal.
    ``grad_clip``: clip the global gradient norm to this value.
    """

    def __init__(self, model, optimizer, loss_fn=None, scheduler=None, schedule_interval=None,
                 callbacks=(), out_dir=None, verbose=1, model_config=None, metadata=None,
                 save_last=True, plot=True, topk=5, grad_clip=None, log_file=None,
                 progress_file=None):
        if loss_fn is None:
            from ..nn import CrossEntropyLoss
            loss_fn = CrossEntropyLoss()
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        kind = _scheduler_kind(scheduler) if scheduler is not None else None
        if schedule_interval is not None:
            if schedule_interval not in ("epoch", "step"):
                raise ValueError(f"Trainer: schedule_interval must be 'epoch' or 'step', "
                                 f"got {schedule_interval!r}")
            if kind == "plateau" and schedule_interval == "step":
                raise ValueError("Trainer: ReduceLROnPlateau steps once per epoch")
            kind = schedule_interval if kind != "plateau" else kind
        self.schedule_kind = kind
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"Trainer: {cb!r} is not a Callback")
        self.callbacks = list(callbacks)
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.verbose = int(verbose)
        self.model_config = model_config
        self.metadata = dict(metadata or {})
        self.save_last = bool(save_last)
        self.plot = bool(plot)
        self.topk = int(topk)
        self.grad_clip = grad_clip
        self.log_file = log_file
        self.progress_file = progress_file
        self.history = History()
        self.epoch = 0          # finished epochs
        self.step = 0           # optimizer steps taken
        self.stop_training = False
        self.train_loader = None
        self.val_loader = None
        self._plot_note_shown = False

    # ------------------------------------------------------------------ output
    def log(self, message):
        if self.verbose:
            print(message, file=self.log_file if self.log_file is not None else sys.stdout,
                  flush=True)

    def _path(self, name):
        return os.path.join(self.out_dir, name)

    @property
    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------- state
    def state_dict(self):
        """Everything a checkpoint holds (see cnet.train.checkpoint)."""
        loaders = {}
        for name, loader in (("train", self.train_loader), ("val", self.val_loader)):
            if loader is not None and hasattr(loader, "state_dict"):
                loaders[name] = loader.state_dict()
        return {
            "model": self.model_config,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng_state": _random.get_rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "loaders": loaders,
            "history": self.history.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "metrics": self.history.rows[-1] if len(self.history) else {},
            "num_threads": get_num_threads(),
            "metadata": self.metadata,
        }

    def save_checkpoint(self, path):
        save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, checkpoint, train_loader=None, val_loader=None):
        """Restore the state of ``checkpoint`` (a path or a loaded dict) to resume.

        The loaders' positions are restored into ``train_loader`` / ``val_loader``
        (or the ones of the last ``fit``).  Raises CheckpointError when the
        checkpoint does not fit the model, optimizer or callbacks.
        """
        ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        path = ck.get("path", "checkpoint")
        if train_loader is not None:
            self.train_loader = train_loader
        if val_loader is not None:
            self.val_loader = val_loader
        load_model_state(self.model, ck)
        try:
            if ck.get("optimizer_state") is not None:
                self.optimizer.load_state_dict(ck["optimizer_state"])
            if self.scheduler is not None and ck.get("scheduler_state") is not None:
                self.scheduler.load_state_dict(ck["scheduler_state"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: optimizer/schedule state does not fit: {e}") from e
        cb_states = ck.get("callbacks") or []
        if cb_states and len(cb_states) != len(self.callbacks):
            raise CheckpointError(f"{path} holds the state of {len(cb_states)} callbacks, "
                                  f"this Trainer has {len(self.callbacks)}")
        for cb, st in zip(self.callbacks, cb_states):
            cb.load_state_dict(st)
        loaders = ck.get("loaders") or {}
        for name, loader in (("train", self.train_loader), ("val", self.val_loader)):
            if name in loaders and loader is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(loaders[name])
        if ck.get("rng_state") is not None:
            _random.set_rng_state(ck["rng_state"])
        self.epoch = int(ck.get("epoch", 0))
        self.step = int(ck.get("step", 0))
        self.history = History(ck.get("history") or [])
        saved_threads = ck.get("num_threads")
        if saved_threads is not None and int(saved_threads) != get_num_threads():
            self.log(f"note: {path} was written with {saved_threads} threads, this run uses "
                     f"{get_num_threads()}: results match the uninterrupted run only to "
                     f"round-off")
        return ck

    # ---------------------------------------------------------------- training
    def _callbacks(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def train_epoch(self, loader):
        """One pass over ``loader`` in training mode; returns the train_* metrics."""
        model = self.model
        sched = self.scheduler if self.schedule_kind == "step" else None
        clip = None
        if self.grad_clip is not None:
            from ..optim import clip_grad_norm_
            params = list(model.parameters())
            clip = lambda: clip_grad_norm_(params, self.grad_clip)  # noqa: E731
        acc = MetricAccumulator(self.topk)
        desc = f"epoch {self.epoch + 1}"
        bar = ProgressBar(_num_batches(loader, 0), desc=desc, verbose=self.verbose,
                          file=self.progress_file)
        model.train()
        # Nothing needs dL/d(input images) (PyTorch skips it too): the first
        # convolution's input gradient can cost as much as its weight gradient.
        input_grad = model.input_grad
        model.requires_input_grad_(False)
        start = time.perf_counter()
        try:
            self._train_steps(loader, bar, acc, sched, clip)
        finally:
            model.requires_input_grad_(input_grad)
        elapsed = time.perf_counter() - start
        out = acc.result("train_")
        out["train_time"] = elapsed
        out["train_images_per_s"] = acc.count / elapsed if elapsed > 0 else float("nan")
        return out

    def _train_steps(self, loader, bar, acc, sched, clip):
        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn
        with bar:
            for x, y in loader:
                logits = model(x)
                loss = loss_fn(logits, y)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss is {loss} at epoch {self.epoch + 1}, step "
                        f"{self.step + 1} (learning rate {self.lr:g}); lower the learning "
                        f"rate or clip gradients")
                # Metrics before the next forward: layers may reuse their output buffers.
                acc.update(loss, logits, y)
                opt.zero_grad()
                model.backward(loss_fn.backward())
                if clip is not None:
                    clip()
                opt.step()
                self.step += 1
                if sched is not None:
                    sched.step()
                bar.update(1, len(y), loss=acc.loss, acc=f"{100 * acc.acc:.2f}%")
                if self.callbacks:
                    self._callbacks("on_batch_end", self.step, {"loss": loss})

    def evaluate(self, loader, desc="val"):
        return evaluate(self.model, loader, self.loss_fn, topk=self.topk, verbose=self.verbose,
                        desc=desc, progress_file=self.progress_file)

    def fit(self, train_loader, epochs, val_loader=None, resume=None):
        """Train until ``epochs`` epochs in total are done (counting resumed ones).

        ``resume``: a checkpoint path (or loaded dict) to continue from.
        Returns the History.
        """
        self.train_loader, self.val_loader = train_loader, val_loader
        if resume is not None:
            ck = self.load_checkpoint(resume, train_loader, val_loader)
            self.log(f"resumed from {ck.get('path', 'a checkpoint')} "
                     f"after epoch {self.epoch} (step {self.step})")
        else:
            # Draw the loaders' base seeds now, at a fixed point of the RNG stream
            # (a loader draws its seed lazily on first use), so that a resumed run,
            # which restores the seeds instead, sees the same stream afterwards.
            for loader in (train_loader, val_loader):
                if loader is not None and hasattr(loader, "seed"):
                    loader.seed  # noqa: B018  (the property draws it if unset)
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
        self.stop_training = False
        self._callbacks("on_train_begin")
        try:
            while self.epoch < epochs and not self.stop_training:
                self._run_epoch(train_loader, val_loader, epochs)
        except KeyboardInterrupt:
            where = f" ({self._path('last.npz')} holds epoch {self.epoch})" \
                if self.out_dir and self.save_last and self.epoch else ""
            self.log(f"interrupted during epoch {self.epoch + 1}{where}")
            raise
        finally:
            self._write_plot()
        self._callbacks("on_train_end")
        return self.history

    def _run_epoch(self, train_loader, val_loader, epochs):
        epoch = self.epoch + 1
        self._callbacks("on_epoch_begin", epoch)
        lr = self.lr
        logs = {"epoch": epoch, "lr": lr}
        logs.update(self.train_epoch(train_loader))
        if val_loader is not None:
            v = self.evaluate(val_loader)
            logs.update(val_loss=v["loss"], val_acc=v["acc"],
                        **{f"val_top{self.topk}": v[f"top{self.topk}"]},
                        val_time=v["time"])
        self.epoch = epoch
        if self.schedule_kind == "epoch":
            self.scheduler.step()
        elif self.schedule_kind == "plateau":
            self.scheduler.step(logs.get("val_loss", logs["train_loss"]))
        logs["step"] = self.step
        self.history.append(logs)
        self.log(self._summary(logs, epochs))
        self._callbacks("on_epoch_end", epoch, logs)
        if self.out_dir is not None:
            meta = dict(self.metadata, model=self.model_config)
            self.history.to_json(self._path("history.json"), metadata=meta)
            self.history.to_csv(self._path("history.csv"))
            if self.save_last:
                self.save_checkpoint(self._path("last.npz"))

    def _summary(self, logs, epochs):
        parts = [f"epoch {logs['epoch']}/{epochs}",
                 f"loss {logs['train_loss']:.4f}", f"acc {100 * logs['train_acc']:.2f}%"]
        if "val_loss" in logs:
            parts += [f"val_loss {logs['val_loss']:.4f}",
                      f"val_acc {100 * logs['val_acc']:.2f}%",
                      f"val_top{self.topk} {100 * logs[f'val_top{self.topk}']:.2f}%"]
        parts += [f"lr {logs['lr']:.3g}", f"{logs['train_images_per_s']:.0f} img/s",
                  format_time(logs["train_time"] + logs.get("val_time", 0.0))]
        return "  ".join(parts)

    def _write_plot(self):
        if self.out_dir is None or not self.plot or not len(self.history):
            return
        if not plot_history(self.history, self._path("history.png")) \
                and not self._plot_note_shown:
            self._plot_note_shown = True
            self.log("note: matplotlib is not installed, so no history.png "
                     "(pip install matplotlib)")


def fit(model, train_loader, epochs=1, optimizer=None, loss_fn=None, val_loader=None,
        scheduler=None, callbacks=(), out_dir=None, verbose=1, resume=None, **kwargs):
    """Train ``model`` with a Trainer; returns the History (``history.trainer`` is
    the Trainer, e.g. to save a checkpoint).

    ``optimizer`` defaults to Adam(lr=1e-3).  Other keyword arguments go to
    :class:`Trainer`.
    """
    if optimizer is None:
        from ..optim import Adam
        optimizer = Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(model, optimizer, loss_fn=loss_fn, scheduler=scheduler,
                      callbacks=callbacks, out_dir=out_dir, verbose=verbose, **kwargs)
    history = trainer.fit(train_loader, epochs, val_loader=val_loader, resume=resume)
    history.trainer = trainer
    return history
