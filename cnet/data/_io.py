"""File formats and downloads behind cnet.data's datasets.

Everything here treats its input as untrusted: an IDX file is checked against its
own header (magic number, dtype, dimensions, exact length), a CIFAR batch is a
pickle read by an unpickler that can build nothing but dicts, lists, strings,
numbers and plain numpy arrays, an archive is extracted only after every member
was checked to stay inside the target directory, and a downloaded file is
checked against a known SHA-256 before it is renamed into place.  Every failure
is an error that names the file; nothing corrupt is ever used silently.
"""
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np

__all__ = ["read_idx", "sha256_file", "verify_file", "download", "safe_unpickle",
           "safe_extract_tar", "DatasetError"]


class DatasetError(ValueError):
    """A data file is missing, corrupt, truncated or fails its checksum."""


# --------------------------------------------------------------------- IDX

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path):
    """The file's bytes, gunzipped if it starts with the gzip magic (not by name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path, ndim=None):
    """Read an IDX file (gzip-compressed or raw) into a native-endian numpy array.

    The header is checked (two zero bytes, a known type code, the number of
    dimensions) and the payload must have exactly the length the dimensions
    imply: a truncated file or trailing bytes raise ``DatasetError`` (a
    ``ValueError``) naming the file.  ``ndim`` optionally requires a rank.
    """
    path = os.fspath(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, code, rank = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number "
                           f"0x{int.from_bytes(data[:4], 'big'):08x})")
    if ndim is not None and rank != ndim:
        raise DatasetError(f"{path}: expected an IDX file with {ndim} dimension(s), "
                           f"the header says {rank}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, "
                           f"{rank} dimensions need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(f"{path}: IDX file {what}: header shape {shape} of "
                           f"{dtype.str} needs {expected} bytes, found {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writeable


# --------------------------------------------------------------- checksums

def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path, chunk=1 << 20):
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path, sha256):
    """Raise DatasetError unless the file's SHA-256 is ``sha256`` (or one of a set)."""
    allowed = {sha256} if isinstance(sha256, str) else set(sha256)
    got = sha256_file(path)
    if got not in allowed:
        raise DatasetError(f"{path}: SHA-256 checksum mismatch (got {got}, expected "
                           f"{' or '.join(sorted(allowed))}); the file is corrupt or "
                           f"truncated: delete it (or pass download=True to fetch it again)")
    return got


# ---------------------------------------------------------------- download

def _fetch(url, dest, timeout=60):
    """Copy ``url`` into the open binary file ``dest`` (tests replace this)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        shutil.copyfileobj(response, dest, 1 << 20)


def download(filename, mirrors, root, sha256, md5=None):
    """Fetch ``filename`` into ``root`` from the first mirror that yields a verified copy.

    ``mirrors`` is a list of base URLs tried in order.  Each attempt writes to a
    temporary file in ``root`` that is renamed into place only after its SHA-256
    (and MD5 when given) matched; a failed or mismatching attempt leaves nothing
    behind.  Raises DatasetError listing what every mirror did.
    """
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, filename)
    allowed = {sha256} if isinstance(sha256, str) else set(sha256)
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f)
            got = sha256_file(tmp)
            if got not in allowed:
                errors.append(f"{url}: SHA-256 mismatch (got {got})")
                continue
            if md5 is not None and md5_file(tmp) != md5:
                errors.append(f"{url}: MD5 mismatch")
                continue
            os.replace(tmp, target)
            return target
        except OSError as e:  # URLError, HTTPError, timeouts, disk errors
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DatasetError(f"could not download a verified copy of {filename} into {root}:\n  "
                       + "\n  ".join(errors or ["no mirrors given"]))


# ------------------------------------------------------------ safe pickle

def _safe_dtype(*args, **kwargs):
    d = np.dtype(*args, **kwargs)
    if d.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return d


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(s, 'latin1').
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return obj.encode("latin1", errors)


def _allowed_globals():
    from numpy._core import multiarray, numeric
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers, strings, numbers and numpy arrays.

    The CIFAR "python version" batches are pickles; a pickle can call any
    importable function, so only numpy's array reconstruction helpers (with
    object dtypes refused) may be looked up.  Anything else -- os.system,
    builtins.eval, subprocess.Popen -- raises UnpicklingError.
    """
    _allowed = None

    def find_class(self, module, name):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}") from None


def safe_unpickle(path):
    """Load a pickle file through the restricted unpickler; errors name the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            # latin1 is numpy's advice for Python 2 pickles that hold arrays.
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: unsafe or corrupt pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise DatasetError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: "
                           f"{e})") from None


# --------------------------------------------------------------- safe tar

def safe_extract_tar(archive, dest):
    """Extract a tar archive into ``dest``, refusing anything that could escape it.

    Every member must be a regular file or directory whose normalised path is
    relative and stays inside ``dest``: absolute names, ``..`` components,
    symbolic/hard links and device files are rejected before anything is
    written.  Python's own 'data' filter is applied on top where available.
    """
    dest_real = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                name = m.name
                if not (m.isfile() or m.isdir()):
                    raise DatasetError(f"{archive}: refusing member {name!r} "
                                       f"(not a regular file or directory)")
                if os.path.isabs(name) or name.startswith(("/", "\\")) \
                        or ".." in name.replace("\\", "/").split("/"):
                    raise DatasetError(f"{archive}: refusing member {name!r} "
                                       f"(path escapes the target directory)")
                target = os.path.realpath(os.path.join(dest_real, name))
                if os.path.commonpath([dest_real, target]) != dest_real:
                    raise DatasetError(f"{archive}: refusing member {name!r} "
                                       f"(path escapes the target directory)")
            os.makedirs(dest_real, exist_ok=True)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest_real, members=members, **kwargs)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{archive}: corrupt or unreadable archive ({e})") from None
