"""``cnet.save`` / ``cnet.load``: nested state in a pickle-free ``.npz``.

A checkpoint from a stranger must not be able to run code, so nothing is
pickled.  Arrays go in as npz members; everything around them (dicts, lists,
numbers, strings, booleans, None) is described by one JSON document stored
as the member ``__cnet_tree__``.  Files are written to a temporary file in
the destination directory, fsynced and renamed over the target, so a crash
leaves the old checkpoint or the new one, never half of one.
"""
import io
import json
import os
import tempfile
import zipfile
from collections import OrderedDict

import numpy as np

_TREE_KEY = "__cnet_tree__"
FORMAT_VERSION = 1


def _encode(obj, arrays):
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), arrays)
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"cnet.save: dict keys must be str or int, got {type(k).__name__}")
        return {"__dict__": [[k, _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_encode(v, arrays) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and not np.isfinite(obj):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(f"cnet.save: cannot store {type(obj).__name__} without pickle")


def _decode(node, arrays):
    if isinstance(node, dict):
        if "__array__" in node:
            return arrays[node["__array__"]]
        if "__dict__" in node:
            return OrderedDict((k, _decode(v, arrays)) for k, v in node["__dict__"])
        if "__list__" in node:
            return [_decode(v, arrays) for v in node["__list__"]]
        if "__tuple__" in node:
            return tuple(_decode(v, arrays) for v in node["__tuple__"])
        if "__float__" in node:
            return float(node["__float__"])
        raise ValueError(f"cnet.load: unknown node {sorted(node)}")
    return node


def atomic_write(path, write_fn, mode="wb"):
    """Write via ``write_fn(fileobj)`` to a temp file, fsync, then rename onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save(obj, path):
    """Save a state dict (or a Module's / optimizer's state) to ``path`` (.npz)."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    arrays = OrderedDict()
    tree = {"format": "cnet", "version": FORMAT_VERSION, "root": _encode(obj, arrays)}
    buf = io.BytesIO()
    members = dict(arrays)
    members[_TREE_KEY] = np.frombuffer(json.dumps(tree).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **members)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load(path):
    """Load what ``save`` wrote; never unpickles anything."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _TREE_KEY not in npz.files:
                raise ValueError(f"cnet.load: {path} is not a cnet checkpoint "
                                 f"(no {_TREE_KEY} member)")
            tree = json.loads(bytes(npz[_TREE_KEY]).decode("utf-8"))
            arrays = {k: npz[k] for k in npz.files if k != _TREE_KEY}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cnet.load: {path} is corrupt or truncated: {e}") from e
    if tree.get("format") != "cnet":
        raise ValueError(f"cnet.load: {path} is not a cnet checkpoint")
    if tree.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"cnet.load: {path} has format version {tree['version']}, "
                         f"this cnet reads up to {FORMAT_VERSION}")
    return _decode(tree["root"], arrays)
