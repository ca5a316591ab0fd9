import os

import numpy as np
import pytest

import cnet
from cnet import nn
from cnet.nn.module import Module, Parameter


class Scale(Module):
    """A minimal parameterised layer for exercising the base class."""

    def __init__(self, n):
        super().__init__()
        self.weight = Parameter(np.arange(n, dtype=np.float32) + 1)
        self.bias = Parameter(np.zeros(n, dtype=np.float32))
        self.register_buffer("count", np.zeros((), dtype=np.int64))
        self._x = None

    def _drop_cache(self):
        self._x = None

    def forward(self, x):
        if self.training:
            self._x = x
        self.count += 1
        return x * self.weight.data + self.bias.data

    def backward(self, g):
        self.weight.grad += (g * self._x).reshape(-1, g.shape[-1]).sum(0)
        self.bias.grad += g.reshape(-1, g.shape[-1]).sum(0)
        return g * self.weight.data


def test_parameter_order_and_names():
    m = nn.Sequential(Scale(3), nn.Identity(), Scale(3))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in m.named_buffers()] == ["0.count", "2.count"]
    assert m.num_parameters() == 12


def test_shared_parameter_listed_once():
    a = Scale(2)
    m = nn.Sequential(a, a)
    assert len(list(m.parameters())) == 2


def test_train_eval_propagates():
    m = nn.Sequential(Scale(2), nn.Sequential(Scale(2)))
    m.eval()
    assert all(not x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())


def test_state_dict_roundtrip_and_strict_checks():
    a, b = Scale(3), Scale(3)
    a.weight.data[:] = [5, 6, 7]
    a.count[...] = 4
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.weight.data, [5, 6, 7])
    assert int(b.count) == 4
    sd = a.state_dict()
    sd["extra"] = np.zeros(1)
    with pytest.raises(KeyError, match="unexpected keys"):
        b.load_state_dict(sd)
    b.load_state_dict(sd, strict=False)
    sd = a.state_dict()
    sd["weight"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"weight: checkpoint \(4,\), model \(3,\)"):
        b.load_state_dict(sd)


def test_state_dict_is_a_copy():
    a = Scale(2)
    sd = a.state_dict()
    sd["weight"][:] = 100
    assert a.weight.data[0] == 1


def test_flatten_parameters_views_and_values():
    m = nn.Sequential(Scale(3), Scale(2))
    before = [p.data.copy() for p in m.parameters()]
    flat, gflat = m.flatten_parameters()
    assert flat.shape == (10,) and gflat.shape == (10,)
    for p, b in zip(m.parameters(), before):
        np.testing.assert_array_equal(p.data, b)
        assert np.shares_memory(p.data, flat) and np.shares_memory(p.grad, gflat)
    flat[:] = 2.0
    assert all(np.all(p.data == 2.0) for p in m.parameters())
    # idempotent: already flat -> same buffers
    flat2, gflat2 = m.flatten_parameters()
    assert flat2 is flat and gflat2 is gflat


def test_backward_accumulates_into_flat_grads():
    m = nn.Sequential(Scale(2))
    _, gflat = m.flatten_parameters()
    x = np.ones((1, 2), np.float32)
    m.backward(m(x) * 0 + 1)
    m(x)
    m.backward(np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(m[0].bias.grad, [2, 2])
    np.testing.assert_array_equal(gflat[2:], [2, 2])
    m.zero_grad()
    assert not gflat.any()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_large_gradients_take_no_memory_until_written(rng):
    # A model built for inference must not hold its gradients' size: big gradients
    # are anonymous mappings whose pages stay untouched until a backward writes them.
    from cnet.nn import module as module_mod
    shape = (1024, 2048)                                       # 8 MB in float32
    nbytes = 1024 * 2048 * 4
    assert nbytes >= module_mod._MAPPED_GRAD_BYTES
    layers = [nn.Linear(1024, 2048, bias=False)]   # its init's freed temporaries stay in
    before = _rss_bytes()                          # the heap, where a calloc would clear them
    layers += [nn.Linear(1024, 2048, bias=False) for _ in range(4)]
    grown = _rss_bytes() - before
    assert grown < 4 * nbytes * 1.5, grown / nbytes           # the weights, not the grads
    for m in layers:
        g = m.weight.grad
        assert g.shape == shape and g.dtype == np.float32 and g.flags.writeable
        assert g.flags.c_contiguous and not g.any()
    # backward accumulates into them, and an optimizer moves them into its flat buffer
    layer = nn.Linear(1024, 2048, bias=False)
    assert layer.weight.grad.base is not None                 # a mapped gradient
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    dy = rng.standard_normal((4, 2048)).astype(np.float32)
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, x.T @ dy, rtol=1e-5, atol=1e-5)
    opt = cnet.optim.SGD(layer.parameters(), lr=0.1)
    np.testing.assert_allclose(layer.weight.grad, x.T @ dy, rtol=1e-5, atol=1e-5)
    w0 = layer.weight.data.copy()
    opt.step()
    np.testing.assert_allclose(layer.weight.data, w0 - 0.1 * (x.T @ dy), rtol=1e-5, atol=1e-6)
    small = Parameter(np.ones(8, np.float32))                  # below the size: plain zeros
    assert small.grad.base is None and not small.grad.any()


def test_gradient_without_a_mapping_falls_back_to_zeros(monkeypatch):
    from cnet.nn import module as module_mod

    def no_mapping(*args):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(module_mod.mmap, "mmap", no_mapping)
    p = Parameter(np.ones((1024, 512), np.float32))
    assert p.grad.shape == (1024, 512) and p.grad.dtype == np.float32 and not p.grad.any()


def test_to_double_converts_params_grads_buffers():
    m = Scale(2)
    m.register_buffer("stat", np.ones(2, np.float32))
    m.double()
    assert m.weight.data.dtype == np.float64 and m.weight.grad.dtype == np.float64
    assert m.stat.dtype == np.float64 and m.count.dtype == np.int64
    assert m.dtype == np.float64


def test_add_and_concat_containers_forward_backward():
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 2))
    add = nn.Add(nn.Identity(), nn.Identity(), nn.Identity())
    np.testing.assert_allclose(add(x), 3 * x)
    g = np.ones_like(x)
    gx = add.backward(g)
    np.testing.assert_allclose(gx, 3 * g)
    np.testing.assert_array_equal(g, 1)  # caller's gradient untouched
    cat = nn.Concat(nn.Identity(), nn.Identity())
    y = cat(x)
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(y[..., 2:], x)
    gy = np.arange(y.size, dtype=float).reshape(y.shape)
    np.testing.assert_allclose(cat.backward(gy), gy[..., :2] + gy[..., 2:])


def test_flatten_layer_and_errors():
    f = nn.Flatten()
    x = np.zeros((2, 3, 4, 5), np.float32)
    assert f(x).shape == (2, 60)
    assert f.backward(np.ones((2, 60), np.float32)).shape == x.shape
    with pytest.raises(ValueError, match=r"Flatten\(\): expected .*got shape \(5,\)"):
        f(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="not C-contiguous"):
        f(x.transpose(0, 2, 1, 3))
    with pytest.raises(ValueError, match="float32 or float64"):
        f(np.zeros((2, 3), np.int32))
    f.eval()
    f(x)
    with pytest.raises(RuntimeError, match="without a forward pass in training mode"):
        f.backward(np.ones((2, 60), np.float32))


def test_repr_nested():
    m = nn.Sequential(nn.Identity(), nn.Add(nn.Identity(), nn.Flatten()))
    r = repr(m)
    assert "(1): Add(" in r and "(1): Flatten()" in r


def test_save_load_roundtrip_nested(tmp_path):
    state = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
             "step": 7, "lr": 0.1, "name": "x", "flags": [True, None], "t": (1, 2.5),
             "inf": float("inf")}
    path = tmp_path / "ck.npz"
    cnet.save(state, path)
    back = cnet.load(path)
    np.testing.assert_array_equal(back["model"]["w"], state["model"]["w"])
    assert back["model"]["w"].dtype == np.float32
    assert back["step"] == 7 and back["lr"] == 0.1 and back["name"] == "x"
    assert back["flags"] == [True, None] and back["t"] == (1, 2.5) and back["inf"] == float("inf")
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temp files left


def test_save_module_and_load_into_another(tmp_path):
    a, b = Scale(3), Scale(3)
    a.weight.data[:] = 9
    cnet.save(a, tmp_path / "m.npz")
    b.load_state_dict(cnet.load(tmp_path / "m.npz"))
    np.testing.assert_array_equal(b.weight.data, 9)


def test_load_refuses_pickle_and_corrupt_files(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        cnet.load(p)
    good = tmp_path / "good.npz"
    cnet.save({"w": np.ones(1000)}, good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        cnet.load(trunc)


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "ck.npz"
    cnet.save({"w": np.ones(3)}, path)
    with pytest.raises(TypeError):
        cnet.save({"bad": object()}, path)
    np.testing.assert_array_equal(cnet.load(path)["w"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]


def test_manual_seed_reproducible():
    from cnet import _random
    cnet.manual_seed(5)
    a = _random.generator().standard_normal(4)
    state = cnet.get_rng_state()
    b = _random.generator().standard_normal(4)
    cnet.manual_seed(5)
    np.testing.assert_array_equal(_random.generator().standard_normal(4), a)
    cnet.set_rng_state(state)
    np.testing.assert_array_equal(_random.generator().standard_normal(4), b)
