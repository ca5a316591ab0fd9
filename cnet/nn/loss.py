"""Losses: CrossEntropyLoss (fused, numerically stable softmax cross-entropy)."""
import numpy as np

from cnet_ext import _loss

from .._threads import num_threads
from .module import Module, check_input, require_cache


class CrossEntropyLoss(Module):
    """Softmax cross-entropy of logits (N, C) against integer labels (N,).

    ``CrossEntropyLoss(label_smoothing=0.0, reduction='mean')`` as in torch
    (``reduction`` is 'mean' or 'sum'; class weights and ignore_index are not
    supported).  ``loss_fn(logits, labels)`` returns a Python float and keeps
    the softmax probabilities; ``backward(scale=1.0)`` takes no gradient
    argument and returns ``scale * dL/dlogits`` in the logits' dtype.
    """

    def __init__(self, label_smoothing=0.0, reduction="mean"):
        super().__init__()
        label_smoothing = float(label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], "
                             f"got {label_smoothing}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"CrossEntropyLoss: reduction must be 'mean' or 'sum', "
                             f"got {reduction!r}")
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self._cache = None

    def _drop_cache(self):
        self._cache = None

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def forward(self, logits, labels):
        check_input(self, logits, 2, what="logits")
        labels = self._check_labels(logits, labels)
        probs = np.empty_like(logits)
        total = _loss.forward(logits, labels, probs, self.label_smoothing, num_threads())
        # Kept in eval mode too: a loss has no running state, and evaluation
        # code that asks for gradients (saliency, attacks) should just work.
        self._cache = (probs, labels)
        n = logits.shape[0]
        return total / n if self.reduction == "mean" and n > 0 else total

    def backward(self, scale=1.0):
        """``scale * dL/dlogits`` for the last forward (a fresh array)."""
        if isinstance(scale, np.ndarray) and scale.size != 1:
            raise TypeError(f"{self._describe()}: backward takes an optional scalar scale, not "
                            f"a gradient array of shape {scale.shape}")
        probs, labels = require_cache(self, self._cache)
        n = probs.shape[0]
        coef = float(scale) / n if self.reduction == "mean" and n > 0 else float(scale)
        grad = np.empty_like(probs)
        _loss.backward(probs, labels, grad, self.label_smoothing, coef, num_threads())
        return grad

    def _check_labels(self, logits, labels):
        if not isinstance(labels, np.ndarray):
            labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"{self._describe()}: labels must be integers, got dtype "
                             f"{labels.dtype} (shape {labels.shape})")
        n, C = logits.shape
        if labels.shape != (n,):
            raise ValueError(f"{self._describe()}: expected labels of shape ({n},) for logits "
                             f"of shape {logits.shape}, got {labels.shape}")
        if labels.dtype != np.intp or not labels.flags.c_contiguous:
            if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.intp).max:
                labels = np.full(labels.shape, -1, dtype=np.intp)  # all out of range
            else:
                labels = np.ascontiguousarray(labels, dtype=np.intp)
        bad = _loss.first_bad_label(labels, C)
        if bad >= 0:
            raise ValueError(f"{self._describe()}: label {labels[bad]} at index {bad} is out of "
                             f"range for {C} classes (labels must be in [0, {C}))")
        return labels

    def extra_repr(self):
        parts = []
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing:g}")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        return ", ".join(parts)
