"""cnet.data: IDX/CIFAR parsing, checksums, downloads, npz, DataLoader."""
import gc
import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest

import cnet
from cnet.data import (CIFAR10, CIFAR100, MNIST, ArrayDataset, DataLoader, DatasetError,
                       load_npz, random_split, read_idx, transforms as T)
from cnet.data import _io, datasets

BUNDLED = os.path.join(os.path.dirname(datasets.__file__), "_mnist")


def idx_bytes(arr, code=0x08):
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                     for d in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress=False):
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
    return str(path)


# ----------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, rng, compress):
    imgs = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    p = write(tmp_path / "imgs", idx_bytes(imgs), compress)
    out = read_idx(p, ndim=3)
    np.testing.assert_array_equal(out, imgs)
    assert out.flags.writeable
    ints = rng.integers(-1000, 1000, size=(9,)).astype(np.int32)
    out = read_idx(write(tmp_path / "ints", idx_bytes(ints, 0x0C), compress))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, ints)
    f = rng.random((3, 2)).astype(np.float32)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "f", idx_bytes(f, 0x0D),
                                                 compress)), f)


def test_idx_errors_name_the_file(tmp_path, rng):
    good = idx_bytes(rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8))
    cases = {
        "magic": (b"\x01\x02" + good[2:], "bad magic"),
        "typecode": (good[:2] + b"\x07" + good[3:], "bad magic"),
        "truncated": (good[:-5], "truncated"),
        "trailing": (good + b"xx", "trailing"),
        "header": (good[:9], "truncated IDX header"),
        "tiny": (b"\x00\x00", "not an IDX"),
    }
    for name, (data, msg) in cases.items():
        for compress in (False, True):
            p = write(tmp_path / f"{name}{compress}", data, compress)
            with pytest.raises(ValueError, match=msg) as e:
                read_idx(p)
            assert p in str(e.value)
    p = write(tmp_path / "dims", good)
    with pytest.raises(DatasetError, match=r"expected an IDX file with 1 dimension.*says 3"):
        read_idx(p, ndim=1)
    gz = gzip.compress(good)
    for bad, what in ((gz[:len(gz) // 2], "truncated gzip"),
                      (gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:], "corrupt gzip")):
        p = write(tmp_path / what.replace(" ", "_"), bad)
        with pytest.raises(DatasetError, match="corrupt or truncated gzip") as e:
            read_idx(p)
        assert p in str(e.value)


# --------------------------------------------------------------------- MNIST

def test_bundled_mnist():
    train, test = MNIST(), MNIST(train=False)
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1) and len(test) == 10000
    assert train.labels.dtype == np.int64 and train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [5923, 6742, 5958, 6131, 5842,
                                                              5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(np.bincount(test.labels), [980, 1135, 1032, 1010, 982,
                                                             892, 958, 1028, 974, 1009])
    assert 30 < train.images.mean() < 36 and train.images.max() == 255
    x, y = train[3]
    assert x.shape == (28, 28, 1) and 0 <= y <= 9


def test_bundled_checksums_in_code():
    for stem, sums in datasets._MNIST_FILES.items():
        path = os.path.join(BUNDLED, stem + ".gz")
        with open(path, "rb") as f:
            raw = f.read()
        assert hashlib.sha256(raw).hexdigest() in sums["gz"]
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == sums["raw"]


def copy_split(dst, split="t10k", raw=False):
    os.makedirs(dst, exist_ok=True)
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        src = os.path.join(BUNDLED, f"{split}-{kind}.gz")
        if raw:
            with gzip.open(src) as f, open(os.path.join(dst, f"{split}-{kind}"), "wb") as g:
                g.write(f.read())
        else:
            shutil.copy(src, dst)


def test_mnist_from_root_gz_and_raw(tmp_path):
    ref = MNIST(train=False)
    for raw in (False, True):
        root = tmp_path / f"raw{raw}"
        copy_split(root, raw=raw)
        ds = MNIST(root=root, train=False)
        np.testing.assert_array_equal(ds.images, ref.images)
        np.testing.assert_array_equal(ds.labels, ref.labels)


def test_mnist_checksum_failure(tmp_path):
    copy_split(tmp_path)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(p.read_bytes())
    data[-10] ^= 1                                 # one flipped bit
    p.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="SHA-256 checksum mismatch") as e:
        MNIST(root=tmp_path, train=False)
    assert str(p) in str(e.value)


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DatasetError, match="download=True"):
        MNIST(root=tmp_path, train=False)


def test_mnist_download_file_urls(tmp_path):
    # The real urllib fetch, from a file:// "mirror" holding the bundled files.
    root = tmp_path / "root"
    ds = MNIST(root=root, train=False, download=True, mirrors=["file://" + BUNDLED])
    assert len(ds) == 10000
    assert sorted(os.listdir(root)) == ["t10k-images-idx3-ubyte.gz",
                                        "t10k-labels-idx1-ubyte.gz"]


def test_mnist_download_tries_mirrors_and_verifies(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, dest, timeout=60):
        calls.append(url)
        if url.startswith("https://bad"):
            dest.write(b"<html>not the file</html>")        # wrong content
        elif url.startswith("https://down"):
            raise OSError("connection refused")
        else:
            with open(os.path.join(BUNDLED, os.path.basename(url)), "rb") as f:
                dest.write(f.read())

    monkeypatch.setattr(_io, "_fetch", fake_fetch)
    root = tmp_path / "r"
    ds = MNIST(root=root, train=False, download=True,
               mirrors=["https://down.example/", "https://bad.example/", "https://good/"])
    assert len(ds) == 10000 and len(calls) == 6
    assert calls[:3] == ["https://down.example/t10k-images-idx3-ubyte.gz",
                         "https://bad.example/t10k-images-idx3-ubyte.gz",
                         "https://good/t10k-images-idx3-ubyte.gz"]
    assert len(os.listdir(root)) == 2                        # no partial files left

    # A corrupt file already present is replaced by a verified download.
    p = root / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(b"junk")
    MNIST(root=root, train=False, download=True, mirrors=["https://good/"])
    assert hashlib.sha256(p.read_bytes()).hexdigest() in \
        datasets._MNIST_FILES["t10k-labels-idx1-ubyte"]["gz"]

    # No mirror gives a verified copy: an error naming each attempt, nothing kept.
    root2 = tmp_path / "r2"
    with pytest.raises(DatasetError, match=r"(?s)bad\.example.*SHA-256 mismatch.*"
                                           r"down\.example.*connection refused"):
        MNIST(root=root2, train=False, download=True,
              mirrors=["https://bad.example/", "https://down.example/"])
    assert os.listdir(root2) == []


# --------------------------------------------------------------------- CIFAR

def cifar_batch(rng, n, label_keys, num_classes, bytes_keys=False):
    d = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
         "filenames": [f"img{i}.png".encode() for i in range(n)],
         "batch_label": "testing batch"}
    for k in label_keys:
        d[k] = [int(v) for v in rng.integers(0, num_classes, size=n)]
    if bytes_keys:                      # what Python 2's cPickle produced, read as bytes
        d = {k.encode(): v for k, v in d.items()}
    return d


def dump(obj, path, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root, rng, n=4, protocol=2, bytes_keys=False):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n, ["labels"], 10, bytes_keys)
        dump(batches[name], os.path.join(folder, name), protocol)
    dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                          "horse", "ship", "truck"], "num_cases_per_batch": n},
         os.path.join(folder, "batches.meta"), protocol)
    return batches


@pytest.mark.parametrize("protocol,bytes_keys", [(2, False), (2, True), (4, False),
                                                 (5, True)])
def test_cifar10_parsing(tmp_path, rng, protocol, bytes_keys):
    batches = make_cifar10(tmp_path, rng, protocol=protocol, bytes_keys=bytes_keys)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    train, test = CIFAR10(tmp_path), CIFAR10(tmp_path, train=False)
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (4, 32, 32, 3) and train.labels.dtype == np.int64
    assert train.classes[0] == "airplane" and train.num_classes == 10
    data = np.concatenate([batches[f"data_batch_{i}"][key("data")] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][key("labels")] for i in range(1, 6)), [])
    # independent NHWC reference: pixel (h, w) of channel c sits at c*1024 + h*32 + w
    n, h, w, c = 7, 5, 30, 2
    assert train.images[n, h, w, c] == data[n, c * 1024 + h * 32 + w]
    want = np.stack([data[:, ch * 1024:(ch + 1) * 1024].reshape(-1, 32, 32)
                     for ch in range(3)], axis=-1)
    np.testing.assert_array_equal(train.images, want)
    np.testing.assert_array_equal(train.labels, labels)
    # root may also be the batch folder itself
    assert len(CIFAR10(tmp_path / "cifar-10-batches-py", train=False)) == 4


def test_cifar100_parsing(tmp_path, rng):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    tr = cifar_batch(rng, 6, ["fine_labels", "coarse_labels"], 20)
    tr["fine_labels"] = [99, 0, 5, 50, 7, 1]
    dump(tr, folder / "train")
    dump(cifar_batch(rng, 3, ["fine_labels", "coarse_labels"], 20), folder / "test")
    fine = CIFAR100(tmp_path)
    coarse = CIFAR100(tmp_path, label_mode="coarse")
    assert fine.images.shape == (6, 32, 32, 3) and fine.num_classes == 100
    np.testing.assert_array_equal(fine.labels, tr["fine_labels"])
    np.testing.assert_array_equal(coarse.labels, tr["coarse_labels"])
    assert coarse.num_classes == 20 and len(CIFAR100(tmp_path, train=False)) == 3
    with pytest.raises(ValueError, match="label_mode"):
        CIFAR100(tmp_path, label_mode="medium")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_cifar_refuses_malicious_pickles(tmp_path, rng):
    make_cifar10(tmp_path, rng)
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    bad = cifar_batch(rng, 4, ["labels"], 10)
    bad["batch_label"] = _Evil(marker)
    dump(bad, folder / "test_batch")
    with pytest.raises(DatasetError, match=r"refusing to load global (posix|os)\.system") as e:
        CIFAR10(tmp_path, train=False)
    assert "test_batch" in str(e.value) and not marker.exists()
    dump({"data": _EvalEvil(), "labels": []}, folder / "test_batch")
    with pytest.raises(DatasetError, match=r"refusing to load global (__builtin__|builtins)\.eval"):
        CIFAR10(tmp_path, train=False)
    obj = cifar_batch(rng, 4, ["labels"], 10)
    obj["data"] = np.array([marker, 1], dtype=object)        # object arrays refused too
    dump(obj, folder / "test_batch")
    with pytest.raises(DatasetError, match="unsafe or corrupt pickle"):
        CIFAR10(tmp_path, train=False)


def test_cifar_corrupt_files(tmp_path, rng):
    make_cifar10(tmp_path, rng)
    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="test_batch"):
        CIFAR10(tmp_path, train=False)
    d = cifar_batch(rng, 4, ["labels"], 10)
    d["data"] = d["data"][:, :3000]
    dump(d, p)
    with pytest.raises(DatasetError, match=r"\(N, 3072\).*\(4, 3000\)"):
        CIFAR10(tmp_path, train=False)
    d = cifar_batch(rng, 4, ["labels"], 10)
    d["labels"] = [0, 1, 2]
    dump(d, p)
    with pytest.raises(DatasetError, match="must be 4 integers"):
        CIFAR10(tmp_path, train=False)
    d["labels"] = [0, 1, 2, 10]
    dump(d, p)
    with pytest.raises(DatasetError, match=r"outside \[0, 10\)"):
        CIFAR10(tmp_path, train=False)
    os.remove(p)
    with pytest.raises(DatasetError, match="test_batch not found.*download=True"):
        CIFAR10(tmp_path, train=False)


def make_archive(src_root, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(src_root, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    return archive


def test_cifar_download_and_extract(tmp_path, rng, monkeypatch):
    make_cifar10(tmp_path / "src", rng)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = make_archive(tmp_path / "src", mirror / "cifar-10-python.tar.gz")
    with open(archive, "rb") as f:
        raw = f.read()
    root = tmp_path / "root"
    # the real checksums are for the real archive: a fake one must be refused...
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        CIFAR10(root, train=False, download=True, mirrors=["file://" + str(mirror)])
    assert not os.path.exists(root / "cifar-10-python.tar.gz")
    # ...and accepted once its own checksums are the expected ones
    monkeypatch.setattr(CIFAR10, "archive_sha256", hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(CIFAR10, "archive_md5", hashlib.md5(raw).hexdigest())
    ds = CIFAR10(root, train=True, download=True, mirrors=["file://" + str(mirror)])
    np.testing.assert_array_equal(ds.images, CIFAR10(tmp_path / "src").images)
    assert (root / "cifar-10-batches-py" / "test_batch").exists()
    monkeypatch.setattr(CIFAR10, "archive_md5", "0" * 32)
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        CIFAR10(tmp_path / "root3", download=True, mirrors=["file://" + str(mirror)])


def _tar_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_safe_tar_refuses_escapes(tmp_path):
    def file_member(name, data=b"x"):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, data

    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../outside"
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    cases = {"dotdot": [file_member("ok.txt"), file_member("../evil.txt")],
             "nested": [file_member("a/../../evil.txt")],
             "absolute": [file_member(str(tmp_path / "abs_evil.txt"))],
             "symlink": [(link, None)], "hardlink": [(hard, None)], "device": [(dev, None)]}
    dest = tmp_path / "dest"
    for name, members in cases.items():
        arc = _tar_with(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(DatasetError, match="refusing member") as e:
            _io.safe_extract_tar(arc, dest)
        assert name in str(e.value)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "abs_evil.txt").exists()
    assert not dest.exists() or os.listdir(dest) == []        # nothing written at all
    good = _tar_with(tmp_path / "good.tar.gz", [file_member("d/f.txt", b"hello")])
    _io.safe_extract_tar(good, dest)
    assert (dest / "d" / "f.txt").read_bytes() == b"hello"
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DatasetError, match="corrupt or unreadable archive"):
        _io.safe_extract_tar(tmp_path / "junk.tar.gz", dest)


# ------------------------------------------------------------ array and npz

def test_array_dataset(rng):
    x = rng.integers(0, 256, size=(10, 6, 6), dtype=np.uint8)
    ds = ArrayDataset(x, np.arange(10) % 3)
    assert ds.images.shape == (10, 6, 6, 1) and ds.labels.dtype == np.int64
    assert ds.num_classes == 3 and len(ds) == 10
    xb, yb = ds.get_batch([4, 1, 4])
    np.testing.assert_array_equal(xb[..., 0], x[[4, 1, 4]])
    np.testing.assert_array_equal(yb, [1, 1, 1])
    sub = ds.subset([0, 2])
    assert len(sub) == 2 and sub.num_classes == 3
    with pytest.raises(ValueError, match=r"labels must be \(10,\).*\(9,\)"):
        ArrayDataset(x, np.zeros(9, int))
    with pytest.raises(ValueError, match="integers"):
        ArrayDataset(x, np.zeros(10))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*\(10, 36\)"):
        ArrayDataset(x.reshape(10, 36), np.zeros(10, int))
    with pytest.raises(ValueError, match="out of range"):
        ArrayDataset(x, np.arange(10), num_classes=5)


def test_random_split(rng):
    ds = ArrayDataset(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.arange(10))
    a, b = random_split(ds, [7, 3], seed=1)
    assert len(a) == 7 and len(b) == 3
    assert sorted(np.concatenate([a.labels, b.labels])) == list(range(10))
    np.testing.assert_array_equal(a.images.ravel(), a.labels)
    c, d = random_split(ds, [0.75, 0.25], seed=1)
    assert (len(c), len(d)) == (7, 3)
    np.testing.assert_array_equal(random_split(ds, [7, 3], seed=1)[1].labels, b.labels)
    with pytest.raises(ValueError, match="sum to the dataset size 10"):
        random_split(ds, [5, 4])


def test_npz(tmp_path, rng):
    x = rng.integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 5, size=8)
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    ds = load_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, y)
    np.savez(tmp_path / "k.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    assert len(load_npz(tmp_path / "k.npz", split="test")) == 2
    assert len(load_npz(tmp_path / "k.npz", images_key="x_train", labels_key="y_train")) == 8
    with pytest.raises(DatasetError, match="cannot find the images array"):
        load_npz(tmp_path / "k.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object), labels=y[:2])
    with pytest.raises(DatasetError, match="obj.npz"):
        load_npz(tmp_path / "obj.npz")


# -------------------------------------------------------------------- loader

@pytest.fixture
def small(rng):
    return ArrayDataset(rng.integers(0, 256, size=(23, 6, 6, 3), dtype=np.uint8),
                        np.arange(23) % 7)


def collect(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


def test_loader_batching(small):
    for prefetch in (0, 2):
        dl = DataLoader(small, batch_size=5, prefetch=prefetch)
        batches = collect(dl)
        assert len(dl) == 5 and [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), small.images)
        np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), small.labels)
        dl = DataLoader(small, batch_size=5, drop_last=True, shuffle=True, prefetch=prefetch)
        batches = collect(dl)
        assert len(dl) == 4 and [len(y) for _, y in batches] == [5] * 4
        seen = np.concatenate([y for _, y in batches])
        assert len(seen) == 20 and batches[0][1].dtype == np.int64


def test_loader_shuffle_is_a_permutation_per_epoch(rng):
    ds = ArrayDataset(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1), np.arange(50))
    dl = DataLoader(ds, batch_size=8, shuffle=True)
    epochs = [np.concatenate([y for _, y in dl]) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(50))
        np.testing.assert_array_equal(e, np.concatenate([x.ravel() for x, _ in
                                                         [ds.get_batch(e)]]))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(epochs[2], dl.epoch_order(2))


def _augmenting_loader(ds, prefetch, seed=None):
    tf = T.Compose([T.RandomCrop(6, padding=2), T.RandomHorizontalFlip(),
                    T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    return DataLoader(ds, batch_size=4, shuffle=True, transform=tf, prefetch=prefetch,
                      seed=seed)


def test_loader_determinism_manual_seed_and_prefetch(small):
    runs = []
    for prefetch in (0, 1, 3):
        cnet.manual_seed(42)
        dl = _augmenting_loader(small, prefetch)
        runs.append([collect(dl) for _ in range(2)])
    for other in runs[1:]:
        for ea, eb in zip(runs[0], other):
            for (xa, ya), (xb, yb) in zip(ea, eb):
                assert xa.tobytes() == xb.tobytes() and np.array_equal(ya, yb)
    assert runs[0][0][0][0].dtype == np.float32
    cnet.manual_seed(43)
    assert not np.array_equal(collect(_augmenting_loader(small, 2))[0][0], runs[0][0][0][0])
    # epochs differ in order and augmentation
    assert not np.array_equal(runs[0][0][0][0], runs[0][1][0][0])


def test_loader_resume_mid_epoch(small):
    cnet.manual_seed(7)
    dl = _augmenting_loader(small, 2)
    full = [collect(dl) for _ in range(3)]
    cnet.manual_seed(7)
    dl = _augmenting_loader(small, 2)
    collect(dl)                                 # epoch 0
    it = iter(dl)
    for _ in range(2):                          # two batches of epoch 1, then "crash"
        next(it)
    state = dl.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    del it
    dl2 = _augmenting_loader(small, 0, seed=12345)   # a fresh process would differ...
    dl2.load_state_dict(state)                       # ...until the state is restored
    rest = collect(dl2)
    assert len(rest) == len(dl2) - 2
    for (xa, ya), (xb, yb) in zip(full[1][2:], rest):
        assert xa.tobytes() == xb.tobytes() and np.array_equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[2], collect(dl2)):
        assert xa.tobytes() == xb.tobytes() and np.array_equal(ya, yb)
    assert dl2.state_dict()["epoch"] == 3 and dl2.state_dict()["batch"] == 0


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "cnet-DataLoader-prefetch"]


def test_prefetch_thread_cleanup(small):
    dl = DataLoader(small, batch_size=2, prefetch=2)
    for i, _ in enumerate(dl):
        if i == 1:
            break
    gc.collect()
    assert _prefetch_threads() == []
    it = iter(dl)
    next(it)
    assert len(_prefetch_threads()) == 1
    del it
    gc.collect()
    assert _prefetch_threads() == []


def test_prefetch_propagates_errors(small):
    def boom(x):
        raise RuntimeError("transform failed")

    dl = DataLoader(small, batch_size=4, transform=boom, prefetch=2)
    with pytest.raises(RuntimeError, match="transform failed"):
        collect(dl)
    assert _prefetch_threads() == []


def test_loader_generic_dataset_and_plain_transform(rng):
    items = [(rng.random((3, 3, 1)).astype(np.float32), i % 2) for i in range(7)]
    dl = DataLoader(items, batch_size=3, transform=lambda x: x * 2)
    (x, y), *_ = list(dl)
    np.testing.assert_array_equal(x, np.stack([it[0] for it in items[:3]]) * 2)
    np.testing.assert_array_equal(y, [0, 1, 0])
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(items, batch_size=0)
    with pytest.raises(ValueError, match="out of range"):
        DataLoader(items, batch_size=3).load_state_dict({"seed": 1, "epoch": 0, "batch": 9})


def test_mnist_loader_epoch(small):
    # The real thing: one augmented epoch over the bundled training set.
    ds = MNIST()
    dl = DataLoader(ds, batch_size=256, shuffle=True, drop_last=True,
                    transform=T.Compose([T.RandomCrop(28, padding=2),
                                         T.Normalize(T.MNIST_MEAN, T.MNIST_STD)]))
    n, total = 0, 0.0
    for x, y in dl:
        assert x.shape == (256, 28, 28, 1) and x.dtype == np.float32
        n += len(y)
        total += float(x.mean())
    assert n == 60000 // 256 * 256
    assert abs(total / len(dl)) < 0.1            # normalised: mean close to 0
