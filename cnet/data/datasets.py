"""In-memory image classification datasets: MNIST, CIFAR-10/100, numpy arrays, .npz.

Every dataset here is an :class:`ArrayDataset`: ``images`` is an NHWC uint8 (or
float) array, ``labels`` an int64 vector, and a batch is gathered with one fancy
index (``get_batch``), so a :class:`~cnet.data.DataLoader` never loops over
samples in Python.  MNIST and CIFAR fit in memory (47 MB and 150 MB as uint8).

MNIST ships inside the package (``root=None``), so training works offline.  With
a ``root`` directory, files are read from there, and ``download=True`` fetches
the missing ones from the mirrors in order.  Every file is verified by SHA-256
before it is used; a corrupt, truncated or mismatching file is an error.
"""
import os

import numpy as np

from . import _io
from ._io import DatasetError, read_idx, safe_extract_tar, safe_unpickle, \
    sha256_file, verify_file

__all__ = ["ArrayDataset", "NpzDataset", "load_npz", "random_split", "MNIST", "CIFAR10",
           "CIFAR100", "default_root", "DatasetError"]

_BUNDLED_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mnist")


def default_root():
    """Where datasets without a bundled copy live: $CNET_DATA or ~/.cache/cnet/data."""
    return os.environ.get("CNET_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "cnet", "data")


class ArrayDataset:
    """A labelled image dataset held in numpy arrays.

    ``images``: (N, H, W, C) -- or (N, H, W), which gains a channel axis -- uint8
    or float; ``labels``: (N,) integers, stored as int64.  ``dataset[i]`` returns
    ``(image, label)``; ``get_batch(indices)`` gathers a batch with one fancy
    index (the DataLoader's fast path).
    """

    def __init__(self, images, labels, classes=None, num_classes=None, name=None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        label = name or type(self).__name__
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"{label}: images must be (N, H, W, C) or (N, H, W), "
                             f"got shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{label}: labels must be ({images.shape[0]},) to match "
                             f"images {images.shape}, got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"{label}: labels must be integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{label}: labels must be >= 0, got {labels.min()}")
        self.images = np.ascontiguousarray(images)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        if num_classes is None:
            num_classes = len(classes) if classes is not None else \
                (int(self.labels.max()) + 1 if self.labels.size else 0)
        if self.labels.size and self.labels.max() >= num_classes:
            raise ValueError(f"{label}: label {self.labels.max()} out of range for "
                             f"{num_classes} classes")
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self.name = label

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def get_batch(self, indices):
        """(images[indices], labels[indices]) as fresh arrays (one gather each)."""
        indices = np.asarray(indices, dtype=np.intp)
        return np.take(self.images, indices, axis=0), np.take(self.labels, indices)

    def subset(self, indices):
        """A new ArrayDataset holding copies of the selected samples."""
        x, y = self.get_batch(indices)
        return ArrayDataset(x, y, classes=self.classes, num_classes=self.num_classes,
                            name=self.name)

    @property
    def image_shape(self):
        """(H, W, C) of one image."""
        return self.images.shape[1:]

    def __repr__(self):
        n, h, w, c = self.images.shape
        return (f"{self.name}({n} images of {h}x{w}x{c} {self.images.dtype}, "
                f"{self.num_classes} classes)")


def random_split(dataset, lengths, seed=None):
    """Split an ArrayDataset into disjoint random subsets of the given sizes.

    ``lengths``: integers summing to ``len(dataset)``, or fractions summing to 1
    (the last part takes the rounding remainder).  ``seed`` defaults to one drawn
    from cnet's global generator.  Returns a list of ArrayDatasets (copies).
    """
    n = len(dataset)
    lengths = list(lengths)
    if lengths and all(isinstance(v, float) for v in lengths):
        if abs(sum(lengths) - 1.0) > 1e-6:
            raise ValueError(f"random_split: fractions must sum to 1, got {lengths}")
        counts = [int(np.floor(f * n)) for f in lengths[:-1]]
        lengths = counts + [n - sum(counts)]
    if any(int(v) < 0 for v in lengths) or sum(int(v) for v in lengths) != n:
        raise ValueError(f"random_split: lengths {lengths} must be >= 0 and sum to the "
                         f"dataset size {n}")
    if seed is None:
        from .._random import next_seed
        seed = next_seed()
    order = np.random.Generator(np.random.PCG64(int(seed))).permutation(n)
    bounds = np.cumsum([0] + [int(v) for v in lengths])
    return [dataset.subset(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------- npz

_IMAGE_KEYS = ("images", "x", "X", "data", "inputs")
_LABEL_KEYS = ("labels", "y", "Y", "targets", "target")


class NpzDataset(ArrayDataset):
    """Images and labels from an ``.npz`` file (loaded without pickle).

    Keys are ``images_key`` / ``labels_key`` when given; otherwise the first of
    images/x/X/data/inputs and labels/y/Y/targets/target that exists, or with
    ``split='train'`` the Keras-style ``x_train`` / ``y_train``.
    """

    def __init__(self, path, images_key=None, labels_key=None, split=None):
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                ik = images_key or _pick_key(path, keys, _IMAGE_KEYS, split, "images")
                lk = labels_key or _pick_key(path, keys, _LABEL_KEYS, split, "labels")
                for k in (ik, lk):
                    if k not in keys:
                        raise DatasetError(f"{path}: no array {k!r} (has {keys})")
                images, labels = z[ik], z[lk]
        except (OSError, ValueError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"{path}: not a readable .npz file ({e})") from None
        super().__init__(images, labels, name=f"NpzDataset[{os.path.basename(path)}]")
        self.path = path


def _pick_key(path, keys, candidates, split, what):
    if split is not None:
        candidates = tuple(f"{c}_{split}" for c in ("x", "X", "images", "data")) \
            if what == "images" else tuple(f"{c}_{split}" for c in ("y", "Y", "labels"))
    for c in candidates:
        if c in keys:
            return c
    raise DatasetError(f"{path}: cannot find the {what} array (looked for "
                       f"{', '.join(candidates)}; the file has {keys}); "
                       f"pass {what}_key=")


def load_npz(path, images_key=None, labels_key=None, split=None):
    """Shorthand for :class:`NpzDataset`."""
    return NpzDataset(path, images_key=images_key, labels_key=labels_key, split=split)


# ------------------------------------------------------------------- MNIST

# Per file: the SHA-256 of the gzip file on the canonical mirrors, of the
# recompressed copy bundled with cnet (same decompressed bytes, smaller), and of
# the decompressed IDX file (for a root that holds raw files).
_MNIST_FILES = {
    "train-images-idx3-ubyte": dict(
        gz=("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"),
        raw="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": dict(
        gz=("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"),
        raw="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": dict(
        gz=("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"),
        raw="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": dict(
        gz=("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"),
        raw="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


class MNIST(ArrayDataset):
    """The MNIST handwritten digits: 60,000 training / 10,000 test 28x28 images.

    ``root=None`` reads the copy bundled with cnet (offline).  With a ``root``
    directory the four IDX files are read from there, gzip-compressed
    (``train-images-idx3-ubyte.gz``) or raw; ``download=True`` fetches missing
    (or corrupt) ones from ``mirrors`` (tried in order) into ``root``.  Every
    file's SHA-256 is checked before use.  ``images``: (N, 28, 28, 1) uint8,
    ``labels``: (N,) int64.
    """

    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
               "https://storage.googleapis.com/cvdf-datasets/mnist/",
               "http://yann.lecun.com/exdb/mnist/")
    files = _MNIST_FILES
    classes = [str(d) for d in range(10)]

    def __init__(self, root=None, train=True, download=False, mirrors=None):
        split = "train" if train else "t10k"
        self.train = bool(train)
        self.root = None if root is None else os.fspath(root)
        mirrors = self.mirrors if mirrors is None else tuple(mirrors)
        paths = [self._locate(f"{split}-{kind}", download, mirrors)
                 for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        images = read_idx(paths[0], ndim=3)
        labels = read_idx(paths[1], ndim=1)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise DatasetError(f"{paths[0]}: expected uint8 images of 28x28, got "
                               f"{images.dtype} {images.shape}")
        if labels.shape[0] != images.shape[0]:
            raise DatasetError(f"{paths[1]}: {labels.shape[0]} labels for "
                               f"{images.shape[0]} images in {paths[0]}")
        if labels.size and labels.max() > 9:
            raise DatasetError(f"{paths[1]}: label {labels.max()} is not a digit")
        super().__init__(images, labels, classes=type(self).classes, num_classes=10,
                         name=f"MNIST[{'train' if train else 'test'}]")

    def _locate(self, stem, download, mirrors):
        """The verified path of one IDX file (gz preferred), downloading if allowed."""
        sums = self.files[stem]
        if self.root is None:
            path = os.path.join(_BUNDLED_MNIST, stem + ".gz")
            if not os.path.exists(path):
                raise DatasetError(f"the bundled MNIST file {path} is missing: the "
                                   f"installation is incomplete; pass root= and "
                                   f"download=True")
            verify_file(path, sums["gz"])
            return path
        gz, raw = os.path.join(self.root, stem + ".gz"), os.path.join(self.root, stem)
        problems = []
        for path, allowed in ((gz, sums["gz"]), (raw, sums["raw"])):
            if os.path.exists(path):
                try:
                    verify_file(path, allowed)
                    return path
                except DatasetError as e:
                    if not download:
                        raise
                    problems.append(str(e))
        if not download:
            raise DatasetError(f"MNIST file {stem}(.gz) not found in {self.root}; pass "
                               f"download=True to fetch it, or root=None for the "
                               f"bundled copy")
        return _io.download(stem + ".gz", mirrors, self.root, sums["gz"])


# ------------------------------------------------------------------- CIFAR

class _CIFAR(ArrayDataset):
    """Shared reader for the CIFAR "python version" batch files."""

    mirrors = ("https://www.cs.toronto.edu/~kriz/",)
    base_folder = archive = archive_sha256 = archive_md5 = None
    train_files = test_files = ()
    meta_file = None

    def __init__(self, root=None, train=True, download=False, mirrors=None):
        self.train = bool(train)
        self.root = os.fspath(root) if root is not None else default_root()
        folder = self._folder()
        names = self.train_files if train else self.test_files
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            if not download:
                raise DatasetError(f"{type(self).__name__}: {', '.join(missing)} not found "
                                   f"in {folder}; pass download=True to fetch "
                                   f"{self.archive} into {self.root}")
            self._download(self.mirrors if mirrors is None else tuple(mirrors))
            folder = os.path.join(self.root, self.base_folder)
        xs, ys = [], []
        for n in names:
            x, y = self._read_batch(os.path.join(folder, n))
            xs.append(x)
            ys.append(y)
        images = np.concatenate(xs) if len(xs) > 1 else xs[0]
        labels = np.concatenate(ys) if len(ys) > 1 else ys[0]
        # Rows are 1024 R, 1024 G, 1024 B values of a 32x32 image: to NHWC.
        images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        classes = self._read_classes(folder)
        super().__init__(images, labels, classes=classes, num_classes=self.num_classes,
                         name=f"{type(self).__name__}[{'train' if train else 'test'}]")

    def _folder(self):
        # Accept both the parent directory (torchvision's convention) and the folder.
        nested = os.path.join(self.root, self.base_folder)
        if not os.path.isdir(nested) and all(
                os.path.exists(os.path.join(self.root, n)) for n in self.test_files):
            return self.root
        return nested

    def _download(self, mirrors):
        path = os.path.join(self.root, self.archive)
        ok = False
        if os.path.exists(path):
            ok = sha256_file(path) == self.archive_sha256
        if not ok:
            path = _io.download(self.archive, mirrors, self.root, self.archive_sha256,
                                 md5=self.archive_md5)
        safe_extract_tar(path, self.root)

    def _read_batch(self, path):
        d = safe_unpickle(path)
        if not isinstance(d, dict):
            raise DatasetError(f"{path}: expected a dict, got {type(d).__name__}")
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
        data, labels = d.get("data"), d.get(self.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) \
                else type(data).__name__
            raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
                               f"got {desc}")
        if labels is None:
            raise DatasetError(f"{path}: no {self.label_key!r} entry (has {sorted(d)})")
        try:
            labels = np.asarray(labels)
        except (ValueError, TypeError):
            labels = np.asarray([], dtype=object)
        if labels.ndim != 1 or labels.shape[0] != data.shape[0] \
                or labels.dtype.kind not in "iu":
            raise DatasetError(f"{path}: {self.label_key!r} must be {data.shape[0]} "
                               f"integers, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DatasetError(f"{path}: labels outside [0, {self.num_classes})")
        return data, labels.astype(np.int64)

    def _read_classes(self, folder):
        path = os.path.join(folder, self.meta_file)
        if not os.path.exists(path):
            return None
        d = safe_unpickle(path)
        names = d.get(self.names_key, d.get(self.names_key.encode())) \
            if isinstance(d, dict) else None
        if not isinstance(names, list) or len(names) != self.num_classes:
            return None
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


class CIFAR10(_CIFAR):
    """CIFAR-10: 50,000 training / 10,000 test 32x32 colour images in 10 classes.

    Reads ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` under
    ``root`` (default: $CNET_DATA or ~/.cache/cnet/data; ``root`` may also be the
    batch folder itself).  ``download=True`` fetches ``cifar-10-python.tar.gz``,
    checks its SHA-256 and MD5, and extracts it safely.  The batch files are
    pickles, read with an unpickler that can build only arrays and containers.
    ``images``: (N, 32, 32, 3) uint8, ``labels``: (N,) int64.
    """

    base_folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    archive_sha256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, names_key = "batches.meta", "label_names"
    label_key, num_classes = "labels", 10


class CIFAR100(_CIFAR):
    """CIFAR-100: 50,000 / 10,000 32x32 colour images in 100 fine (20 coarse) classes.

    As :class:`CIFAR10`, from ``cifar-100-python/train`` and ``test``;
    ``label_mode='fine'`` (100 classes) or ``'coarse'`` (20 superclasses).
    """

    base_folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    archive_sha256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files, test_files = ("train",), ("test",)
    meta_file = "meta"

    def __init__(self, root=None, train=True, download=False, mirrors=None,
                 label_mode="fine"):
        if label_mode not in ("fine", "coarse"):
            raise ValueError(f"CIFAR100: label_mode must be 'fine' or 'coarse', "
                             f"got {label_mode!r}")
        self.label_mode = label_mode
        self.label_key = f"{label_mode}_labels"
        self.names_key = f"{label_mode}_label_names"
        self.num_classes = 100 if label_mode == "fine" else 20
        super().__init__(root, train=train, download=download, mirrors=mirrors)
