"""cnet.summary: shapes, parameter totals and hand-counted FLOPs."""
import io

import numpy as np
import pytest

import cnet
from cnet import models, nn


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Add(nn.AvgPool2d(3, 1, padding=1), nn.Identity()),
                         nn.GlobalAvgPool2d(), nn.Flatten(), nn.Linear(4, 5))


def test_tiny_net_by_hand():
    out = io.StringIO()
    s = cnet.summary(tiny_net(), (8, 8, 3), file=out)
    # Hand count for one 8x8x3 sample:
    conv = 2 * (8 * 8 * 4) * (3 * 3 * 3)   # 2 x MACs: 256 outputs x 27 = 13,824
    bn = 2 * 8 * 8 * 4                      # scale + shift per element
    relu = 8 * 8 * 4
    maxpool = 4 * 4 * 4 * (2 * 2 - 1)       # 3 comparisons per output
    avgpool = 4 * 4 * 4 * 9                 # 9 per output (count_include_pad divisor)
    add = 4 * 4 * 4                         # 2 branches: 1 add per element
    gap = 4 * 4 * 4                         # 1 per input element
    fc = 2 * 4 * 5
    assert s["flops"] == conv + bn + relu + maxpool + avgpool + add + gap + fc == 15_528
    assert s["total_params"] == s["trainable_params"] == (27 * 4 + 4) + 8 + (4 * 5 + 5) == 145
    assert s["buffer_elements"] >= 8                      # running mean / var
    assert s["output_shape"] == (5,)
    rows = {r["name"]: r for r in s["rows"]}
    assert [r["type"] for r in s["rows"]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                                              "AvgPool2d", "Add", "GlobalAvgPool2d", "Flatten",
                                              "Linear"]
    assert rows["0"]["output_shape"] == (8, 8, 4) and rows["0"]["params"] == 112
    assert rows["0"]["flops"] == conv
    assert rows["3"]["output_shape"] == (4, 4, 4)
    assert rows["4"]["flops"] == add and rows["4.0"]["flops"] == avgpool
    assert rows["7"]["output_shape"] == (5,) and rows["7"]["flops"] == fc
    assert sum(r["params"] for r in s["rows"]) == s["total_params"]
    # activations: every row's output except the view (Flatten) and a fused ReLU
    fused = rows["2"]["fused"]
    n_out = 256 + 256 + (0 if fused else 256) + 64 + 64 + 64 + 4 + 5
    assert s["activation_bytes"] == 4 * n_out
    text = out.getvalue()
    assert "Total params: 145" in text and "15,528" in text and "(N, 8, 8, 4)" in text


def test_summary_restores_model():
    model = tiny_net()
    model.train()
    model[1].eval()
    cnet.summary(model, (8, 8, 3), verbose=False)
    assert model.training and model[0].training and not model[1].training
    assert all("forward" not in m.__dict__ for m in model.modules())
    model.train()
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    out = model(x)
    model.backward(np.ones_like(out))     # still a working training-mode model


def test_batch_size_and_dtype():
    model = tiny_net().double()
    s1 = cnet.summary(model, (8, 8, 3), verbose=False)
    s4 = cnet.summary(model, (8, 8, 3), batch_size=4, verbose=False)
    assert s1["dtype"] == "float64"
    assert s4["flops"] == s1["flops"]                         # per sample
    assert s4["activation_bytes"] == 4 * s1["activation_bytes"]
    assert s1["param_bytes"] == 8 * s1["total_params"]


def test_single_layer_model():
    s = cnet.summary(nn.Linear(6, 3), (6,), verbose=False)
    assert len(s["rows"]) == 1 and s["rows"][0]["flops"] == 36 and s["total_params"] == 21


@pytest.mark.parametrize("name,kwargs,shape", [
    ("lenet5", {}, (32, 32, 1)),
    ("resnet20", {}, (32, 32, 3)),
    ("nin", {}, (32, 32, 3)),
    ("googlenet", {"input_size": 32}, (32, 32, 3)),
])
def test_zoo_totals(name, kwargs, shape):
    model = models.get_model(name, **kwargs)
    s = cnet.summary(model, shape, verbose=False)
    assert s["total_params"] == model.num_parameters() == sum(r["params"] for r in s["rows"])
    assert s["output_shape"] == (10,)
    assert s["flops"] > 0


def test_resnet20_flops():
    """Conv + dense multiply-adds of ResNet-20, counted independently from the
    architecture: 40.6M (the ~41M MACs usually quoted)."""
    s = cnet.summary(models.resnet20(), (32, 32, 3), verbose=False)
    macs = 32 * 32 * 16 * 27                                   # stem
    for side, c, first_in in ((32, 16, 16), (16, 32, 16), (8, 64, 32)):
        macs += side * side * c * 9 * (first_in + c)           # first block, two convs
        macs += 2 * side * side * c * 9 * 2 * c                # two more blocks
    macs += 64 * 10
    dense = sum(r["flops"] for r in s["rows"] if r["type"] in ("Conv2d", "Linear"))
    assert dense == 2 * macs == 81_102_080
    # Fused ReLUs (after BN) still show up, with their input's shape.
    relus = [r for r in s["rows"] if r["type"] == "ReLU"]
    assert len(relus) == 1 + 9 * 2
    assert s["rows"][2]["name"] == "relu" and s["rows"][2]["output_shape"] == (32, 32, 16)
    shortcut = [r for r in s["rows"] if r["type"] == "ShortcutA"]
    assert [r["output_shape"] for r in shortcut] == [(16, 16, 32), (8, 8, 64)]
    assert all(r["flops"] == 0 and r["params"] == 0 for r in shortcut)


def test_custom_flops_hook():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

        def flops(self, in_shape, out_shape):
            return int(np.prod(out_shape))

    s = cnet.summary(nn.Sequential(nn.Flatten(), Scale()), (3, 4), verbose=False)
    assert s["rows"][1]["type"] == "Scale" and s["rows"][1]["flops"] == 12
