"""Training checkpoints: everything needed to rebuild a model and resume a run.

A checkpoint is one pickle-free ``.npz`` written atomically by ``cnet.save``::

    format, version          'cnet-checkpoint', 1
    model                    {'name': 'lenet5', 'kwargs': {...}} (or None for a
                             model not built by name: then only load_state_dict)
    model_state              the model's state_dict (parameters and buffers)
    optimizer_state          optimizer.state_dict()
    scheduler_state          scheduler.state_dict() or None
    rng_state                cnet.get_rng_state() at the epoch boundary
    epoch, step              finished epochs, optimizer steps taken
    loaders                  {'train': loader.state_dict(), 'val': ...} (seed,
                             next epoch, batch position)
    history                  the per-epoch rows so far
    callbacks                [callback.state_dict(), ...]
    metrics                  the last epoch's row
    num_threads              the thread count it was trained with
    metadata                 free-form (the command line's data configuration)

Resuming restores all of it; at the same thread count the continued run equals
the uninterrupted one bit for bit.
"""
import os

import numpy as np

from .. import serialize

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "build_model",
           "FORMAT", "VERSION"]

FORMAT = "cnet-checkpoint"
VERSION = 1
_REQUIRED = ("model_state",)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


def save_checkpoint(path, state):
    """Write ``state`` (a dict as described above) atomically to ``path``."""
    doc = {"format": FORMAT, "version": VERSION}
    doc.update(state)
    serialize.save(doc, os.fspath(path))


def _plain(obj):
    """OrderedDicts from cnet.load -> plain dicts (numpy's RNG state setter wants dicts)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def load_checkpoint(path):
    """Read and validate a checkpoint; raise CheckpointError with a one-line reason."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        doc = serialize.load(path)
    except Exception as e:  # noqa: BLE001 -- any failure to parse is a bad checkpoint
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {msg}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnet training checkpoint "
                              f"(a plain state dict saved with cnet.save? "
                              f"load it with model.load_state_dict(cnet.load(path)))")
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {doc['version']} is newer than "
                              f"this cnet reads ({VERSION})")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    state = {k: v for k, v in doc.items() if k != "model_state"}
    state = _plain(state)
    state["model_state"] = doc["model_state"]      # keep its order (load_state_dict)
    state["path"] = path
    return state


def build_model(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights.

    ``checkpoint``: a path or what ``load_checkpoint`` returned.  Needs the
    model's registered name and builder kwargs (recorded by the command line
    and by ``Trainer(model_config=...)``).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    path = checkpoint.get("path", "checkpoint")
    config = checkpoint.get("model")
    if not config or "name" not in config:
        raise CheckpointError(f"{path} does not record which model it holds (no model "
                              f"name); build the model yourself and load "
                              f"checkpoint['model_state']")
    from ..models import get_model, list_models
    name, kwargs = config["name"], dict(config.get("kwargs") or {})
    if name not in list_models():
        raise CheckpointError(f"{path} holds model {name!r}, which this cnet does not know")
    try:
        model = get_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build {name}(**{kwargs}): {e}") from e
    load_model_state(model, checkpoint)
    return model


def load_model_state(model, checkpoint):
    """Load a checkpoint's weights into ``model`` (dtype converted if needed)."""
    path = checkpoint.get("path", "checkpoint")
    state = checkpoint["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: model_state is not a dict of arrays")
    dtypes = {np.asarray(v).dtype for v in state.values() if np.asarray(v).dtype.kind == "f"}
    if len(dtypes) == 1 and model.dtype is not None and model.dtype != next(iter(dtypes)):
        model.to(next(iter(dtypes)))
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        msg = str(e).strip("'\"")
        raise CheckpointError(f"{path} does not fit the model: {msg}") from e
    return model
