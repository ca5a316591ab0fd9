"""Where parameters live in memory: spans of flat buffers and chunk tables.

An optimizer updates each parameter group with one fused kernel call per
*segment*: a pair of 1-D root buffers (data, grad) plus a chunk table of
``(data_offset, grad_offset, state_offset, length)`` rows.  Parameters that
are views of one model-wide flat buffer (``model.flatten_parameters()``)
are coalesced into contiguous spans of that buffer (sorted by address,
adjacent ones merged), so a group that holds only some of the model's
parameters (a no-decay group) is still updated in place, without moving the
parameters out of the shared buffer.
"""
import numpy as np

from cnet_ext import _optim


def _address(a):
    return a.__array_interface__["data"][0]


def root_of(a):
    """(1-D root buffer, element offset, shared) for a C-contiguous array ``a``.

    The root is ``a.base`` when that is a 1-D contiguous array of the same
    dtype that contains ``a`` (numpy collapses view chains to the array that
    owns the memory, so a reshaped slice of a flat buffer finds the buffer);
    otherwise ``a`` itself, viewed as 1-D (``shared`` False).
    """
    if not a.flags.c_contiguous:
        raise ValueError(f"optimizer: parameter arrays must be C-contiguous, got shape {a.shape} "
                         f"with strides {a.strides}")
    b = a.base
    if (isinstance(b, np.ndarray) and b.ndim == 1 and b.flags.c_contiguous
            and b.dtype == a.dtype):
        off, rem = divmod(_address(a) - _address(b), a.itemsize)
        if rem == 0 and off >= 0 and off + a.size <= b.size:
            return b, off, True
    return a.reshape(-1), 0, False


class Segment:
    """One (data root, grad root) pair and its chunk table."""

    __slots__ = ("data", "grad", "chunks", "spans")

    def __init__(self, data, grad, spans):
        self.data = data
        self.grad = grad
        self.spans = spans                      # [(data_off, grad_off, state_off, length)]
        self.chunks = _optim.chunk_table(spans)


def build_segments(params, flatten_loose):
    """Segments covering ``params`` (Parameters) and each one's state offset.

    ``flatten_loose``: parameters whose data and grad are both standalone
    arrays (not views of a flat buffer) are first moved into one new flat
    buffer with ``flatten_parameters`` (the optimizer owns their layout).
    Returns ``(segments, offsets, total)``; state offsets follow segment order.
    """
    from ..nn.module import flatten_parameters

    if flatten_loose:
        loose = []
        for p in params:
            if not root_of(p.data)[2] and not root_of(p.grad)[2]:
                loose.append(p)
        if len(loose) > 1:
            flatten_parameters(loose)
    groups = {}
    for i, p in enumerate(params):
        if p.data.shape != p.grad.shape:
            raise ValueError(f"optimizer: parameter {i} has data shape {p.data.shape} but grad "
                             f"shape {p.grad.shape}")
        d_root, d_off, _ = root_of(p.data)
        g_root, g_off, _ = root_of(p.grad)
        key = (id(d_root), id(g_root))
        if key not in groups:
            groups[key] = (d_root, g_root, [])
        groups[key][2].append((d_off, g_off, p.data.size, i))
    segments, offsets, total = [], [None] * len(params), 0
    for d_root, g_root, items in groups.values():
        items.sort()
        spans = []
        for d_off, g_off, n, i in items:
            if n == 0:
                offsets[i] = total
                continue
            if spans:
                sd, sg, ss, sn = spans[-1]
                if sd + sn == d_off and sg + sn == g_off:
                    spans[-1] = (sd, sg, ss, sn + n)
                    offsets[i] = total
                    total += n
                    continue
                if d_off < sd + sn:
                    raise ValueError("optimizer: two parameters share memory (overlapping views "
                                     "of one buffer)")
            spans.append((d_off, g_off, total, n))
            offsets[i] = total
            total += n
        segments.append(Segment(d_root, g_root, spans))
    return segments, offsets, total


def grad_segments(arrays):
    """Segments over gradient arrays only (for clip_grad_norm_): column 1 of the chunks."""
    groups = {}
    for a in arrays:
        root, off, _ = root_of(a)
        groups.setdefault(id(root), (root, []))[1].append((off, a.size))
    segs = []
    for root, items in groups.values():
        items.sort()
        spans = []
        for off, n in items:
            if n == 0:
                continue
            if spans and spans[-1][1] + spans[-1][3] == off:
                s = spans[-1]
                spans[-1] = (s[0], s[1], s[2], s[3] + n)
            elif spans and off < spans[-1][1] + spans[-1][3]:
                # the same array listed twice (or overlapping views): count it once
                s = spans[-1]
                end = max(s[1] + s[3], off + n)
                spans[-1] = (s[0], s[1], s[2], end - s[1])
            else:
                spans.append((0, off, 0, n))
        segs.append(Segment(root, root, spans))
    return segs
