"""Training: the Trainer loop, callbacks, metrics, checkpoints, evaluate / predict.

>>> from cnet.train import Trainer, ModelCheckpoint, EarlyStopping, evaluate
>>> history = Trainer(model, opt, out_dir="runs/x").fit(train_loader, 5, val_loader)
"""
from .callbacks import Callback, EarlyStopping, LambdaCallback, ModelCheckpoint
from .checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from .history import History, plot_history
from .metrics import MetricAccumulator, accuracy, topk_correct
from .progress import ProgressBar
from .trainer import Trainer, evaluate, fit, predict

__all__ = ["Trainer", "fit", "evaluate", "predict", "Callback", "ModelCheckpoint",
           "EarlyStopping", "LambdaCallback", "History", "plot_history", "CheckpointError",
           "save_checkpoint", "load_checkpoint", "build_model", "MetricAccumulator",
           "accuracy", "topk_correct", "ProgressBar"]
