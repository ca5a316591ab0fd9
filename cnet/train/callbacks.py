"""Callbacks: hooks the Trainer calls around epochs and batches.

A callback overrides any of ``on_train_begin(trainer)``,
``on_epoch_begin(trainer, epoch)``, ``on_batch_end(trainer, step, logs)``,
``on_epoch_end(trainer, epoch, logs)`` and ``on_train_end(trainer)``; it stops
training by setting ``trainer.stop_training = True``.  Its ``state_dict`` goes
into the Trainer's checkpoints, so a resumed run keeps counting patience and
remembers the best value.
"""
import math
import os

__all__ = ["Callback", "ModelCheckpoint", "EarlyStopping", "LambdaCallback"]


class Callback:
    def on_train_begin(self, trainer):
        pass

    def on_epoch_begin(self, trainer, epoch):
        pass

    def on_batch_end(self, trainer, step, logs):
        pass

    def on_epoch_end(self, trainer, epoch, logs):
        pass

    def on_train_end(self, trainer):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class LambdaCallback(Callback):
    """Callback from plain functions: ``LambdaCallback(on_epoch_end=f)``."""

    def __init__(self, on_train_begin=None, on_epoch_begin=None, on_batch_end=None,
                 on_epoch_end=None, on_train_end=None):
        for name, fn in (("on_train_begin", on_train_begin),
                         ("on_epoch_begin", on_epoch_begin),
                         ("on_batch_end", on_batch_end), ("on_epoch_end", on_epoch_end),
                         ("on_train_end", on_train_end)):
            if fn is not None:
                setattr(self, name, fn)


def _resolve_mode(monitor, mode):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if ("acc" in monitor or "top" in monitor) else "min"
    return mode


class _Monitor(Callback):
    """Shared logic: watch one metric, decide what counts as an improvement."""

    def __init__(self, monitor, mode, min_delta):
        self.monitor = monitor
        self.mode = _resolve_mode(monitor, mode)
        self.min_delta = abs(float(min_delta))
        self.best = None
        self.best_epoch = None

    def on_train_begin(self, trainer):
        # Fail now rather than after a whole epoch of training.
        if self.monitor.startswith("val_") and getattr(trainer, "val_loader", True) is None:
            raise ValueError(f"{type(self).__name__}: monitoring {self.monitor!r} needs a "
                             f"val_loader in fit()")

    def _value(self, logs):
        if self.monitor not in logs:
            raise KeyError(f"{type(self).__name__}: metric {self.monitor!r} is not in the "
                           f"epoch's logs (available: {', '.join(sorted(logs))}); "
                           f"validation metrics need a val_loader")
        return float(logs[self.monitor])

    def _improved(self, value):
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")


class ModelCheckpoint(_Monitor):
    """Save a full checkpoint when ``monitor`` improves (or every epoch).

    ``path`` may contain ``{epoch}`` and metric names, e.g.
    ``'ckpt/epoch{epoch:02d}-{val_acc:.4f}.npz'``.  ``mode``: 'min', 'max' or
    'auto' (max for accuracies, min otherwise).  With ``save_best_only=False``
    every epoch is saved.  The file is the Trainer's checkpoint (model name,
    weights, optimizer, ...), so ``cnet eval --checkpoint`` reads it.
    """

    def __init__(self, path, monitor="val_acc", mode="auto", save_best_only=True,
                 min_delta=0.0, verbose=0):
        super().__init__(monitor, mode, min_delta)
        self.path = os.fspath(path)
        self.save_best_only = bool(save_best_only)
        self.verbose = verbose
        self.last_saved = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = self._value(logs)
        improved = self._improved(value)
        if improved:
            self.best, self.best_epoch = value, epoch
        if improved or not self.save_best_only:
            path = self.path.format(**dict(logs, epoch=epoch))
            trainer.save_checkpoint(path)
            self.last_saved = path
            if self.verbose:
                trainer.log(f"  saved {path} ({self.monitor} {value:.4f})")

    def state_dict(self):
        st = super().state_dict()
        st["last_saved"] = self.last_saved
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.last_saved = state.get("last_saved")


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs.  ``restore_best_weights`` loads the best epoch's
    weights into the model when training stops.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto",
                 restore_best_weights=False, verbose=0):
        super().__init__(monitor, mode, min_delta)
        if int(patience) < 0:
            raise ValueError(f"EarlyStopping: patience must be >= 0, got {patience}")
        self.patience = int(patience)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = verbose
        self.wait = 0
        self.stopped_epoch = None
        self.best_weights = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = self._value(logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = trainer.model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True
            if self.verbose:
                trainer.log(f"  early stopping: {self.monitor} has not improved for "
                            f"{self.wait} epochs (best {self.best:.4f} at epoch "
                            f"{self.best_epoch})")

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_weights is not None \
                and self.stopped_epoch is not None:
            trainer.model.load_state_dict(self.best_weights)

    def state_dict(self):
        st = super().state_dict()
        st.update(wait=self.wait, stopped_epoch=self.stopped_epoch,
                  best_weights=self.best_weights)
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = state.get("stopped_epoch")
        self.best_weights = state.get("best_weights")
