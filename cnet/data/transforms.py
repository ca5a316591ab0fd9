"""Composable batch transforms for NHWC image batches (uint8 or float).

Each transform maps a whole batch ``(N, H, W, C)`` to a new array; none modifies
its input.  All of them run through one Cython/OpenMP kernel
(``cnet_ext._augment.augment``) that pads/crops, flips and normalises in a
single pass, and :class:`Compose` fuses a run of transforms in the order
geometry (Pad or RandomCrop), flip, normalisation into ONE kernel call, so a
typical CIFAR pipeline reads the uint8 batch once and writes float32 once::

    train_tf = Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
                        Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    xb = train_tf(xb_uint8)               # (N, 32, 32, 3) float32

Randomness: ``t(x, seed=s)`` is a pure function of ``(x, s)``; without a seed
one is drawn from cnet's global generator (``cnet.manual_seed`` makes it
reproducible).  Each image's crop offsets and flip come from a counter-based
generator keyed by (seed, image index), so results do not depend on the thread
count.  A DataLoader passes a seed derived from (its seed, epoch, batch index),
which is what makes a resumed run augment exactly as the uninterrupted one.

Normalize follows torchvision's ToTensor + Normalize: a uint8 batch is scaled
by 1/255 before ``(x - mean) / std``; a float batch is used as it is.
"""
import inspect

import numpy as np

from .._args import int_pair

__all__ = ["BatchTransform", "Compose", "Pad", "RandomCrop", "RandomHorizontalFlip",
           "Normalize", "ToFloat", "MNIST_MEAN", "MNIST_STD", "CIFAR10_MEAN",
           "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_GEOMETRY, _FLIP, _NORMALIZE = 0, 1, 2
_M64 = 0xFFFFFFFFFFFFFFFF


def _mix64(z):
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_seed(seed, *counters):
    """A 63-bit seed derived from ``seed`` and integer counters (SplitMix64 chain)."""
    z = int(seed) & _M64
    for c in counters:
        z = _mix64(z ^ _mix64((int(c) + 0x632BE59BD9B4E019) & _M64))
    return z >> 1


def _check_batch(x, who):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{who}: expected an NHWC batch (N, H, W, C), got {shape}")
    if x.dtype not in (np.uint8, np.float32, np.float64):
        raise ValueError(f"{who}: batch dtype must be uint8, float32 or float64, "
                         f"got {x.dtype} with shape {x.shape}")
    return np.ascontiguousarray(x)


def _takes_seed(fn):
    if isinstance(fn, BatchTransform):
        return True
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _num_threads(n_threads):
    if n_threads is not None:
        return int(n_threads)
    from .._threads import num_threads
    return num_threads()


class BatchTransform:
    """Base class: ``t(x, seed=None, n_threads=None)`` returns the transformed batch.

    Subclasses set ``stage`` and ``random`` and implement ``_plan(plan, x)``, which
    folds the transform into the kernel's parameters.
    """
    stage = None
    random = False

    def __call__(self, x, seed=None, n_threads=None):
        return _run_fused([self], x, seed, n_threads)

    def _plan(self, plan, x):
        raise NotImplementedError


def _run_fused(group, x, seed, n_threads):
    """Fold a stage-ordered group of BatchTransforms into one kernel call."""
    from cnet_ext._augment import augment
    who = " + ".join(repr(t) for t in group)
    x = _check_batch(x, who)
    n, h, w, c = x.shape
    plan = dict(out_h=h, out_w=w, pad_top=0, pad_left=0, range_y=0, range_x=0,
                fill=0.0, flip_p=0.0, affine=None, dtype=x.dtype)
    for t in group:
        t._plan(plan, x)
    if any(t.random for t in group) and seed is None:
        from .._random import next_seed
        seed = next_seed()
    out = np.empty((n, plan["out_h"], plan["out_w"], c), dtype=plan["dtype"])
    kwargs = {}
    if plan["affine"] is not None:
        scale, mean, std = plan["affine"]
        kwargs = dict(scale=scale, mean=mean, std=std)
    return augment(x, out, plan["pad_top"], plan["pad_left"], plan["range_y"],
                   plan["range_x"], plan["flip_p"], seed=0 if seed is None else seed,
                   fill=plan["fill"], n_threads=_num_threads(n_threads), **kwargs)


class Pad(BatchTransform):
    """Pad every image by ``padding`` pixels ((pad_h, pad_w) or one int) with ``fill``.

    Deterministic; e.g. ``Pad(2)`` turns MNIST's 28x28 into 32x32.
    """
    stage = _GEOMETRY

    def __init__(self, padding, fill=0):
        self.padding = int_pair("Pad", "padding", padding)
        if min(self.padding) < 0:
            raise ValueError(f"Pad: padding must be >= 0, got {padding}")
        self.fill = float(fill)

    def _plan(self, plan, x):
        py, px = self.padding
        plan.update(out_h=x.shape[1] + 2 * py, out_w=x.shape[2] + 2 * px,
                    pad_top=py, pad_left=px, fill=self.fill)

    def __repr__(self):
        return f"Pad({self.padding})"


class RandomCrop(BatchTransform):
    """A random ``size`` crop of each image after zero-padding it by ``padding``.

    As torchvision's RandomCrop(size, padding): offsets uniform over all
    positions of the crop inside the padded image, drawn per image.
    """
    stage = _GEOMETRY
    random = True

    def __init__(self, size, padding=0, fill=0):
        self.size = int_pair("RandomCrop", "size", size)
        self.padding = int_pair("RandomCrop", "padding", padding)
        if min(self.size) < 1 or min(self.padding) < 0:
            raise ValueError(f"RandomCrop: size must be >= 1 and padding >= 0, got "
                             f"size {size}, padding {padding}")
        self.fill = float(fill)

    def _plan(self, plan, x):
        (oh, ow), (py, px) = self.size, self.padding
        ry, rx = x.shape[1] + 2 * py - oh, x.shape[2] + 2 * px - ow
        if ry < 0 or rx < 0:
            raise ValueError(f"{self!r}: crop {self.size} larger than the padded image "
                             f"({x.shape[1] + 2 * py}, {x.shape[2] + 2 * px}) of batch "
                             f"{x.shape}")
        plan.update(out_h=oh, out_w=ow, pad_top=py, pad_left=px, range_y=ry,
                    range_x=rx, fill=self.fill)

    def __repr__(self):
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip(BatchTransform):
    """Mirror each image left-right with probability ``p`` (drawn per image)."""
    stage = _FLIP
    random = True

    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    def _plan(self, plan, x):
        plan["flip_p"] = self.p

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize(BatchTransform):
    """Per-channel ``(x * scale - mean) / std``, converting to ``dtype``.

    ``scale`` defaults to 1/255 for uint8 input (torchvision's ToTensor) and 1
    for float input; ``dtype`` defaults to float32 for uint8 input and to the
    input's dtype otherwise.  ``mean``/``std`` have one value or one per channel.
    """
    stage = _NORMALIZE

    def __init__(self, mean, std, scale=None, dtype=None):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        self.std = np.atleast_1d(np.asarray(std, dtype=np.float64))
        if self.mean.ndim != 1 or self.std.ndim != 1 or np.any(self.std == 0):
            raise ValueError(f"Normalize: mean/std must be 1-d with non-zero std, got "
                             f"mean {mean}, std {std}")
        self.scale = scale
        self.dtype = None if dtype is None else np.dtype(dtype)
        if self.dtype is not None and self.dtype not in (np.float32, np.float64):
            raise ValueError(f"Normalize: dtype must be float32 or float64, got {dtype}")

    def _plan(self, plan, x):
        c = x.shape[3]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v.size not in (1, c):
                raise ValueError(f"{self!r}: {v.size} {name} values for a batch with "
                                 f"{c} channels {x.shape}")
        uint8 = x.dtype == np.uint8
        scale = self.scale if self.scale is not None else (1.0 / 255.0 if uint8 else 1.0)
        plan["affine"] = (scale, np.broadcast_to(self.mean, (c,)),
                          np.broadcast_to(self.std, (c,)))
        plan["dtype"] = self.dtype or (np.dtype(np.float32) if uint8 else x.dtype)

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class ToFloat(Normalize):
    """uint8 -> float32 in [0, 1] (``x / 255``); a float batch is only cast."""

    def __init__(self, dtype=np.float32, scale=None):
        super().__init__(0.0, 1.0, scale=scale, dtype=dtype)

    def __repr__(self):
        return f"ToFloat({self.dtype})"


class Compose(BatchTransform):
    """Apply transforms in order; runs of built-in ones fuse into one kernel call.

    A run fuses while its stages increase (geometry, then flip, then
    normalisation).  Other callables ``f(x)`` (or ``f(x, seed=...)``) are applied
    as they are.  Every random step gets its own seed derived from the call's.
    """

    def __init__(self, transforms):
        self.transforms = list(transforms)
        self._steps = []              # (is_fused_group, group or callable)
        group = []
        for t in self.transforms:
            if isinstance(t, BatchTransform) and t.stage is not None:
                if group and t.stage <= group[-1].stage:
                    self._steps.append((True, group))
                    group = []
                group.append(t)
            else:
                if not callable(t):
                    raise TypeError(f"Compose: {t!r} is not callable")
                if group:
                    self._steps.append((True, group))
                    group = []
                self._steps.append((False, t))
        if group:
            self._steps.append((True, group))
        self.random = any((any(t.random for t in s) if fused else getattr(s, "random", True))
                          for fused, s in self._steps)

    def __call__(self, x, seed=None, n_threads=None):
        if seed is None and self.random:
            from .._random import next_seed
            seed = next_seed()
        for i, (fused, step) in enumerate(self._steps):
            s = None if seed is None else (seed if i == 0 else derive_seed(seed, i))
            if fused:
                x = _run_fused(step, x, s, n_threads)
            elif isinstance(step, BatchTransform):
                x = step(x, seed=s, n_threads=n_threads)
            elif _takes_seed(step):
                x = step(x, seed=s)
            else:
                x = step(x)
        return x

    def __repr__(self):
        inner = ",\n".join(f"    {t!r}" for t in self.transforms)
        return f"Compose([\n{inner}\n])"
