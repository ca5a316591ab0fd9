"""Global-norm gradient clipping (torch.nn.utils.clip_grad_norm_) over flat buffers."""
import math

import numpy as np

from cnet_ext import _optim
from .. import _threads
from ._layout import grad_segments

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale the gradients so that their global ``norm_type``-norm is at most ``max_norm``.

    Like torch: total = norm of all gradients together; coef = max_norm / (total + 1e-6),
    clamped at 1; grads *= coef.  Returns the total norm (before clipping) as a float.
    Gradients that are views of one flat buffer are reduced and scaled in one pass per
    contiguous span; the reduction sums fixed per-chunk partials in order, so the result
    does not depend on the thread count.
    """
    if hasattr(parameters, "data") and hasattr(parameters, "grad"):
        parameters = [parameters]
    elif hasattr(parameters, "parameters") and callable(parameters.parameters):
        parameters = parameters.parameters()
    grads = [p.grad for p in parameters if getattr(p, "grad", None) is not None]
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if not grads:
        return 0.0
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 (or inf), got {norm_type}")
    segments = grad_segments(grads)
    nt = _threads.num_threads()
    total = 0.0
    nonfinite = 0
    for seg in segments:
        partials, bad = _optim.norm_partials(seg.grad, seg.chunks, 1, norm_type, nt)
        nonfinite += bad
        if norm_type == math.inf:
            total = max(total, float(partials.max(initial=0.0)))
        else:
            for v in partials:       # fixed order: independent of threads
                total += float(v)
    if nonfinite:
        has_nan = any(bool(np.isnan(g).any()) for g in grads)
        total = math.nan if has_nan else math.inf
    elif norm_type == 2.0:
        total = math.sqrt(total)
    elif norm_type != math.inf:
        total = total ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from "
                           "`parameters` is non-finite, so it cannot be clipped. To disable "
                           "this error and scale the gradients by the non-finite norm anyway, "
                           "set `error_if_nonfinite=False`")
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:      # as torch: clamp(coef, max=1), NaN propagates
        for seg in segments:
            _optim.scale(seg.grad, seg.chunks, 1, coef, nt)
    return total
