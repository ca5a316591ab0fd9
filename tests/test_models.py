"""cnet.models: parameter counts, shapes, block gradients, torch parity, training steps."""
import numpy as np
import pytest

import cnet
from cnet import models, nn
from cnet.models.resnet import BasicBlock, Bottleneck, ShortcutA
from helpers import check_gradients, hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw

# -- parameter counts ----------------------------------------------------------
# Exact counts of cnet's builders, each checked below against the published figure
# (exact where the reference is exact: torchvision's numbers, LeNet-5's 61,706).
# (builder, kwargs, exact count, published figure, precision of the published figure)
CIFAR_COUNTS = [
    ("lenet5", {}, 61_706, 61_706, 1),
    ("resnet20", {}, 269_722, 0.27e6, 0.01e6),
    ("resnet32", {}, 464_154, 0.46e6, 0.01e6),
    ("resnet44", {}, 658_586, 0.66e6, 0.01e6),
    ("resnet56", {}, 853_018, 0.85e6, 0.01e6),
    ("resnet110", {}, 1_727_962, 1.7e6, 0.1e6),
    ("nin", {}, 966_986, 0.97e6, 0.01e6),                       # Lin et al.: ~0.97M
    ("googlenet", {"input_size": 32}, 5_871_914, None, None),
]
IMAGENET_COUNTS = [  # torchvision's counts at 1000 classes
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnext50_32x4d", 25_028_904),
]
# torchvision's VGG counts at 224 / 1000 classes.
VGG_IMAGENET = {"vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
                "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
                "vgg19": 143_667_240, "vgg19_bn": 143_678_248}
VGG_CLASSIFIER = (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)


@pytest.mark.parametrize("name,kwargs,exact,published,precision", CIFAR_COUNTS,
                         ids=[c[0] + ("_32" if c[1] else "") for c in CIFAR_COUNTS])
def test_parameter_count_small(name, kwargs, exact, published, precision):
    n = models.get_model(name, **kwargs).num_parameters()
    assert n == exact
    if published is not None:
        assert abs(n - published) <= precision / 2, (name, n, published)


@pytest.mark.parametrize("name,exact", IMAGENET_COUNTS[:1] + IMAGENET_COUNTS[2:3] + IMAGENET_COUNTS[4:])
def test_parameter_count_imagenet(name, exact):
    assert models.get_model(name).num_parameters() == exact


@pytest.mark.slow
@pytest.mark.parametrize("name,exact", [IMAGENET_COUNTS[1], IMAGENET_COUNTS[3]])
def test_parameter_count_imagenet_slow(name, exact):
    assert models.get_model(name).num_parameters() == exact


def test_googlenet_paper_count():
    # Table 1 of Szegedy et al. (5x5 branches, no BN, no auxiliary heads), with biases.
    assert models.googlenet().num_parameters() == 6_998_552


def test_nin_imagenet_count():
    assert models.nin(input_size=224).num_parameters() == 7_595_176


def test_resnext29_8x64d_count():
    n = models.resnext29_8x64d().num_parameters()
    assert n == 34_426_698
    assert round(n / 1e5) == 344            # Xie et al. Table 7: 34.4M


@pytest.mark.slow
def test_resnext29_16x64d_count():
    n = models.resnext29_16x64d().num_parameters()
    assert n == 68_155_210
    assert abs(n - 68.1e6) < 0.1e6          # Xie et al. Table 7: 68.1M (truncated)


@pytest.mark.parametrize("name", sorted(VGG_IMAGENET))
def test_vgg_counts(name):
    """The 32x32 form shares the conv stages with the ImageNet form: its features plus
    the 4096-4096 classifier must give torchvision's count; the CIFAR head is 512 -> 10."""
    model = models.get_model(name, input_size=32)
    features = sum(p.size for p in model.features.parameters())
    assert features + VGG_CLASSIFIER == VGG_IMAGENET[name]
    assert model.num_parameters() == features + 512 * 10 + 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg_imagenet_built(name):
    model = models.get_model(name)
    assert model.num_parameters() == VGG_IMAGENET[name]
    s = cnet.summary(model, (224, 224, 3), verbose=False)
    assert s["output_shape"] == (1000,)
    assert s["total_params"] == VGG_IMAGENET[name]
    conv_macs = sum(r["flops"] for r in s["rows"] if r["type"] in ("Conv2d", "Linear")) / 2
    assert abs(conv_macs - 15.47e9) < 0.01e9          # VGG-16: 15.5 GMACs


# -- registry and builder options ------------------------------------------------

def test_registry():
    names = models.list_models()
    for expected in ["lenet5", "vgg11", "vgg16_bn", "vgg19_bn", "nin", "googlenet", "resnet20",
                     "resnet110", "resnet18", "resnet101", "resnext29_8x64d",
                     "resnext29_16x64d", "resnext50_32x4d"]:
        assert expected in names
    assert names == sorted(names)
    assert models.get_model("resnet20", num_classes=7).fc.weight.shape == (64, 7)
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        models.get_model("resnet21")
    with pytest.raises(ValueError, match="input_size"):
        models.vgg11(input_size=64)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.resnet_cifar(21)
    assert cnet.models.summary is cnet.summary


def test_every_builder_takes_the_common_arguments():
    import inspect
    for name in models.list_models():
        params = inspect.signature(getattr(models, name)).parameters
        assert "num_classes" in params and "in_channels" in params, name


def test_resnet_shortcut_options(rng):
    # B: projections (1x1 conv + BN) at the two stage changes only; C: in every block.
    assert models.resnet20(shortcut="B").num_parameters() == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    m = models.resnet_cifar(8, shortcut="C")
    assert all(isinstance(b.shortcut, nn.Sequential) for b in m.modules() if isinstance(b, BasicBlock))
    assert m(rng.standard_normal((2, 32, 32, 3)).astype(np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        models.resnet20(shortcut="D")


def test_builder_options():
    m = models.vgg11(input_size=32)
    assert m.classifier.fc.weight.shape == (512, 10)           # 10 classes by default at 32
    m = models.resnet20(num_classes=100, in_channels=1)
    assert m.conv1.weight.shape == (3, 3, 1, 16)
    assert m.fc.weight.shape == (64, 100)
    m = models.resnet18(input_size=32)
    assert m.conv1.weight.shape == (3, 3, 3, 64) and "maxpool" not in m._modules
    assert m.fc.weight.shape == (512, 10)
    m = models.lenet5(input_size=28)
    assert m(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
    assert m.num_parameters() == 61_706
    assert models.resnext50_32x4d().layer1[0].body.conv2.groups == 32


def test_resnet_init():
    m = models.resnet50(zero_init_residual=True)
    blocks = [b for b in m.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16
    for b in blocks:
        assert np.all(b.body.bn3.weight.data == 0)
        assert np.all(b.body.bn2.weight.data == 1) and np.all(b.body.bn2.bias.data == 0)
    # He normal, fan_out mode: std = sqrt(2 / (KH * KW * C_out)).
    w = m.layer4[0].body.conv2.weight.data
    assert abs(w.std() / np.sqrt(2 / (9 * 512)) - 1) < 0.01
    assert abs(w.mean()) < 1e-3
    m = models.resnet20()
    assert np.all(m.layer1[0].body.bn2.weight.data == 1)


def test_vgg_init():
    m = models.vgg11(input_size=32)
    w = m.features.conv5_1.weight.data
    assert abs(w.std() / np.sqrt(2 / (9 * 512)) - 1) < 0.02
    assert np.all(m.features.conv5_1.bias.data == 0)
    assert abs(m.classifier.fc.weight.data.std() / 0.01 - 1) < 0.1


# -- the option-A shortcut ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shortcut_a_forward_backward(rng, dtype):
    layer = ShortcutA(4, 8, stride=2)
    x = rng.standard_normal((2, 5, 5, 4)).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 3, 8)
    ref = np.zeros((2, 3, 3, 8), dtype)
    for i in range(3):
        for j in range(3):
            ref[:, i, j, 2:6] = x[:, 2 * i, 2 * j, :]
    np.testing.assert_array_equal(y, ref)
    g = rng.standard_normal(y.shape).astype(dtype)
    g_copy = g.copy()
    dx = layer.backward(g)
    np.testing.assert_array_equal(g, g_copy)
    assert np.sum(dx * x) == pytest.approx(np.sum(g * y))      # adjoint of a linear map
    check_gradients(ShortcutA(3, 7, stride=2), rng.standard_normal((2, 4, 5, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cin,cout,stride,hw", [(16, 32, 2, (32, 32)), (3, 8, 3, (7, 8)),
                                                (5, 5, 1, (4, 3)), (6, 13, 2, (9, 6))])
def test_shortcut_a_kernel_against_numpy(rng, dtype, cin, cout, stride, hw):
    # The parallel kernels against numpy's strided assignments, on 1 and 2 threads
    # (sizes big enough for both threads), odd sizes and strides that do not divide.
    x = rng.standard_normal((9,) + hw + (cin,)).astype(dtype)
    lo = (cout - cin) // 2
    sub = x[:, ::stride, ::stride]
    want = np.zeros(sub.shape[:3] + (cout,), dtype)
    want[..., lo:lo + cin] = sub
    g = rng.standard_normal(want.shape).astype(dtype)
    want_dx = np.zeros_like(x)
    want_dx[:, ::stride, ::stride] = g[..., lo:lo + cin]
    for threads in (1, 2):
        layer = ShortcutA(cin, cout, stride=stride)
        with cnet.threads(threads):
            np.testing.assert_array_equal(layer(x), want)
            np.testing.assert_array_equal(layer.backward(g), want_dx)
            g_strided = np.swapaxes(np.swapaxes(g, 1, 2).copy(), 1, 2)   # same values
            assert not g_strided.flags.c_contiguous
            np.testing.assert_array_equal(layer.backward(g_strided), want_dx)


def test_shortcut_a_kernel_refuses_bad_operands():
    from cnet_ext import _elementwise
    x = np.zeros((2, 5, 5, 4), np.float32)
    for out, match in [(np.zeros((2, 3, 3, 8), np.float64), "dtype"),
                       (np.zeros((2, 2, 3, 8), np.float32), r"\(2, 3, 3, 'C_out'\)"),
                       (np.zeros((2, 3, 3, 5), np.float32), "offset 2"),
                       (np.zeros((2, 3, 3, 8), np.float32)[..., ::2], "C-contiguous")]:
        with pytest.raises(ValueError, match=match):
            _elementwise.subsample_pad_channels(x, out, 2, 2, 1)
    with pytest.raises(ValueError, match="stride"):
        _elementwise.subsample_pad_channels(x, np.zeros((2, 3, 3, 8), np.float32), 0, 2, 1)
    read_only = np.zeros((2, 5, 5, 4), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _elementwise.subsample_pad_channels_backward(np.zeros((2, 3, 3, 8), np.float32),
                                                     read_only, 2, 2, 1)


def test_shortcut_a_errors(rng):
    layer = ShortcutA(4, 8)
    with pytest.raises(ValueError, match=r"ShortcutA.*channels.*\(2, 4, 4, 3\)"):
        layer(np.zeros((2, 4, 4, 3), np.float32))
    layer.eval()
    layer(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="ShortcutA"):
        layer.backward(np.zeros((1, 2, 2, 8), np.float32))
    layer.train()
    layer(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"ShortcutA.*\(1, 2, 2, 8\).*\(1, 2, 2, 6\)"):
        layer.backward(np.zeros((1, 2, 2, 6), np.float32))
    with pytest.raises(ValueError):
        ShortcutA(8, 4)


# -- float64 gradient checks of every block type ---------------------------------

BLOCKS = {  # kind: (builder, input channels)
    "basic": (lambda: BasicBlock(4, 4), 4),
    "basic_A": (lambda: BasicBlock(3, 6, stride=2, shortcut="A"), 3),
    "basic_B": (lambda: BasicBlock(3, 6, stride=2, shortcut="B"), 3),
    "bottleneck": (lambda: Bottleneck(6, 2, stride=2), 6),
    "resnext": (lambda: models.ResNeXtBlock(8, 4, stride=1, cardinality=2, base_width=32), 8),
    "inception": (lambda: models.Inception(4, 2, 2, 3, 1, 2, 2), 4),
    "inception_bn": (lambda: models.Inception(4, 2, 2, 3, 1, 2, 2, batch_norm=True), 4),
    "mlpconv": (lambda: models.MLPConv(3, 4, 3, (5, 2), padding=1), 3),
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_block_gradients(kind, rng):
    build, cin = BLOCKS[kind]
    block = build()
    x = rng.standard_normal((3, 5, 5, cin))
    # Batch-norm statistics couple every input, so probe a subset of entries.
    check_gradients(block, x, max_checks=40, rtol=1e-5, atol=1e-7)


def test_block_shapes(rng):
    x = rng.standard_normal((2, 8, 8, 6)).astype(np.float32)
    assert Bottleneck(6, 2, stride=2)(x).shape == (2, 4, 4, 8)
    assert models.ResNeXtBlock(6, 4, cardinality=2, base_width=32)(x).shape == (2, 8, 8, 16)
    assert models.Inception(6, 1, 2, 3, 1, 2, 4)(x).shape == (2, 8, 8, 10)
    assert models.Inception(6, 1, 2, 3, 1, 2, 4).out_channels == 10


# -- torch parity: same weights, same input -> same logits and input gradient -------

def _torch_reference(kind, **kw):
    """torchvision-style torch models (NCHW), with parameters registered in the same
    order as cnet's builders so weights can be copied one by one."""
    torch = pytest.importorskip("torch")
    tnn, F = torch.nn, torch.nn.functional

    def conv(i, o, k, s=1, p=0, g=1, bias=False):
        return tnn.Conv2d(i, o, k, s, p, groups=g, bias=bias)

    class PadShortcut(tnn.Module):                       # option A, as akamaster/resnet
        def __init__(self, cin, cout, s):
            super().__init__()
            self.lo, self.hi, self.s = (cout - cin) // 2, cout - cin - (cout - cin) // 2, s

        def forward(self, x):
            return F.pad(x[:, :, ::self.s, ::self.s], (0, 0, 0, 0, self.lo, self.hi))

    class Block(tnn.Module):
        def __init__(self, cin, planes, stride, bottleneck, groups=1, base_width=64, sc="B"):
            super().__init__()
            if bottleneck:
                w, cout = int(planes * base_width / 64) * groups, planes * 4
                self.body = tnn.Sequential(conv(cin, w, 1), tnn.BatchNorm2d(w), tnn.ReLU(),
                                           conv(w, w, 3, stride, 1, groups), tnn.BatchNorm2d(w),
                                           tnn.ReLU(), conv(w, cout, 1), tnn.BatchNorm2d(cout))
            else:
                cout = planes
                self.body = tnn.Sequential(conv(cin, planes, 3, stride, 1), tnn.BatchNorm2d(planes),
                                           tnn.ReLU(), conv(planes, planes, 3, 1, 1),
                                           tnn.BatchNorm2d(planes))
            self.cout = cout
            if stride == 1 and cin == cout:
                self.short = tnn.Identity()
            elif sc == "A":
                self.short = PadShortcut(cin, cout, stride)
            else:
                self.short = tnn.Sequential(conv(cin, cout, 1, stride), tnn.BatchNorm2d(cout))

        def forward(self, x):
            return F.relu(self.body(x) + self.short(x))

    def resnet(layers, bottleneck, widths, stem, num_classes, sc="B", **bkw):
        mods = []
        if stem == "imagenet":
            mods += [conv(3, 64, 7, 2, 3), tnn.BatchNorm2d(64), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
            c = 64
        else:
            c = stem
            mods += [conv(3, c, 3, 1, 1), tnn.BatchNorm2d(c), tnn.ReLU()]
        for i, (planes, n) in enumerate(zip(widths, layers)):
            for j in range(n):
                b = Block(c, planes, 2 if (i > 0 and j == 0) else 1, bottleneck, sc=sc, **bkw)
                mods.append(b)
                c = b.cout
        mods += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(c, num_classes)]
        return tnn.Sequential(*mods)

    def inception(cin, c1, c3r, c3, c5r, c5, cp, bn=False):
        def unit(i, o, k, p=0):
            return [conv(i, o, k, 1, p, bias=not bn)] + ([tnn.BatchNorm2d(o)] if bn else []) + [tnn.ReLU()]

        class Inc(tnn.Module):
            def __init__(self):
                super().__init__()
                self.b = tnn.ModuleList([
                    tnn.Sequential(*unit(cin, c1, 1)),
                    tnn.Sequential(*unit(cin, c3r, 1), *unit(c3r, c3, 3, 1)),
                    tnn.Sequential(*unit(cin, c5r, 1), *unit(c5r, c5, 5, 2)),
                    tnn.Sequential(tnn.MaxPool2d(3, 1, 1), *unit(cin, cp, 1))])

            def forward(self, x):
                return torch.cat([b(x) for b in self.b], 1)
        return Inc()

    def googlenet(num_classes=1000):
        from cnet.models.inception import BLOCKS as table
        mods = [conv(3, 64, 7, 2, 3, bias=True), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1),
                conv(64, 64, 1, bias=True), tnn.ReLU(), conv(64, 192, 3, 1, 1, bias=True),
                tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
        for b in table:
            mods.append(tnn.MaxPool2d(3, 2, 1) if isinstance(b, str) else inception(*b[1:]))
        mods += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Dropout(0.4),
                 tnn.Linear(1024, num_classes)]
        return tnn.Sequential(*mods)

    builders = {"resnet": resnet, "inception": inception, "googlenet": googlenet}
    return builders[kind](**kw)


def _copy_weights(cnet_model, torch_model):
    import torch
    ours = list(cnet_model.parameters())
    theirs = list(torch_model.parameters())
    assert len(ours) == len(theirs)
    with torch.no_grad():
        for p, t in zip(ours, theirs):
            w = p.data
            w = hwio_to_oihw(w) if w.ndim == 4 else (w.T if w.ndim == 2 else w)
            assert w.shape == tuple(t.shape)
            t.copy_(torch.from_numpy(np.ascontiguousarray(w)))


def _assert_parity(cnet_model, torch_model, x_nhwc):
    """Training-mode forward (BN batch statistics) and input gradient, in float64."""
    import torch
    cnet_model.double().train()
    torch_model.double().train()
    _copy_weights(cnet_model, torch_model)
    y = cnet_model(x_nhwc)
    g = np.random.default_rng(1).standard_normal(y.shape)
    dx = cnet_model.backward(g.copy())
    xt = torch.from_numpy(nhwc_to_nchw(x_nhwc)).requires_grad_(True)
    yt = torch_model(xt)
    if yt.ndim == 4:
        yt_np = nchw_to_nhwc(yt.detach().numpy())
        yt.backward(torch.from_numpy(nhwc_to_nchw(g)))
    else:
        yt_np = yt.detach().numpy()
        yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(y, yt_np, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dx, nchw_to_nhwc(xt.grad.numpy()), rtol=1e-8, atol=1e-10)


@pytest.mark.torch
def test_torch_parity_resnet20_option_a(rng):
    ref = _torch_reference("resnet", layers=[3, 3, 3], bottleneck=False, widths=(16, 32, 64),
                           stem=16, num_classes=10, sc="A")
    model = models.resnet20()
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    _assert_parity(model, ref, rng.standard_normal((2, 32, 32, 3)))


@pytest.mark.torch
def test_torch_parity_imagenet_resnext_structure(rng):
    """torchvision's stem, max-pool, option-B downsampling and grouped bottlenecks,
    shrunk to one block per stage and run on a 32x32 input."""
    ref = _torch_reference("resnet", layers=[1, 1, 1, 1], bottleneck=True,
                           widths=(64, 128, 256, 512), stem="imagenet", num_classes=5,
                           groups=2, base_width=8)
    model = models.resnet(Bottleneck, [1, 1, 1, 1], num_classes=5, groups=2, width_per_group=8)
    _assert_parity(model, ref, rng.standard_normal((2, 32, 32, 3)))


@pytest.mark.torch
def test_torch_parity_inception_block(rng):
    ref = _torch_reference("inception", cin=5, c1=3, c3r=2, c3=4, c5r=2, c5=3, cp=2, bn=True)
    _assert_parity(models.Inception(5, 3, 2, 4, 2, 3, 2, batch_norm=True), ref,
                   rng.standard_normal((2, 7, 7, 5)))


@pytest.mark.torch
@pytest.mark.parametrize("name,layers,bottleneck", [("resnet18", [2, 2, 2, 2], False),
                                                    ("resnet50", [3, 4, 6, 3], True)])
def test_torch_counts_imagenet(name, layers, bottleneck):
    ref = _torch_reference("resnet", layers=layers, bottleneck=bottleneck,
                           widths=(64, 128, 256, 512), stem="imagenet", num_classes=1000)
    assert models.get_model(name).num_parameters() == sum(p.numel() for p in ref.parameters())


@pytest.mark.torch
def test_torch_counts_googlenet():
    ref = _torch_reference("googlenet")
    assert models.googlenet().num_parameters() == sum(p.numel() for p in ref.parameters())


# -- output shapes and training steps ------------------------------------------------

# 32x32 models: (builder, kwargs, input channels).  The heavy ones are slow.
SMALL = [("lenet5", {}, 1), ("resnet20", {}, 3), ("resnet20", {"shortcut": "B"}, 3),
         ("resnet32", {}, 3), ("nin", {}, 3), ("vgg11", {"input_size": 32}, 3),
         ("vgg11_bn", {"input_size": 32}, 3)]
SMALL_SLOW = [("resnet18", {"input_size": 32}, 3), ("resnet44", {}, 3), ("resnet56", {}, 3), ("resnet110", {}, 3),
              ("vgg13", {"input_size": 32}, 3), ("vgg13_bn", {"input_size": 32}, 3),
              ("vgg16", {"input_size": 32}, 3), ("vgg16_bn", {"input_size": 32}, 3),
              ("vgg19", {"input_size": 32}, 3), ("vgg19_bn", {"input_size": 32}, 3),
              ("googlenet", {"input_size": 32}, 3), ("resnet34", {"input_size": 32}, 3),
              ("resnet50", {"input_size": 32}, 3), ("resnet101", {"input_size": 32}, 3),
              ("resnext50_32x4d", {"input_size": 32}, 3),
              ("resnext29_8x64d", {}, 3), ("resnext29_16x64d", {}, 3)]


# Learning rates where 0.02 overshoots on one fixed batch: NiN (no batch norm) and
# the deep bottleneck networks at batch 2 (loss 1.4 -> 20 at lr 0.02 or 0.005).
LR = {"nin": 0.002, "resnet50": 0.002, "resnet101": 0.002, "resnext50_32x4d": 0.002,
      "resnext29_8x64d": 0.002, "resnext29_16x64d": 0.002}


def _tiny_inception_net(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         models.Inception(8, 4, 4, 6, 2, 3, 3, batch_norm=True),
                         nn.MaxPool2d(3, 2, padding=1),
                         models.Inception(16, 4, 4, 6, 2, 3, 3, batch_norm=True),
                         nn.GlobalAvgPool2d(), nn.Flatten(), nn.Linear(16, num_classes))


TINY = {  # reduced members of the heavy families, for the default suite
    "resnext_cifar_11_2x4d": lambda: models.resnext_cifar(11, cardinality=2, base_width=4),
    "inception_net": _tiny_inception_net,
}


def _train_steps(model, in_channels, steps=4, lr=0.02, batch=4):
    """Plain SGD on one fixed batch; dropout reseeded so every step sees one objective."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, in_channels)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(steps + 1):
        cnet.manual_seed(7)
        out = model(x)
        assert out.shape == (batch, 10)
        losses.append(loss_fn(out, y))
        model.zero_grad()
        dx = model.backward(loss_fn.backward())
        assert dx.shape == x.shape and np.all(np.isfinite(dx))
        for p in model.parameters():
            p.data -= lr * p.grad
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    return losses


@pytest.mark.parametrize("name,kwargs,cin", SMALL, ids=[f"{n}{''.join(k.get('shortcut', ''))}"
                                                         for n, k, _ in SMALL])
def test_train_steps_lower_loss(name, kwargs, cin):
    _train_steps(models.get_model(name, **kwargs), cin, lr=LR.get(name, 0.02))


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_steps_tiny_families(name):
    _train_steps(TINY[name](), 3, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,cin", SMALL_SLOW, ids=[n for n, _, _ in SMALL_SLOW])
def test_train_steps_lower_loss_slow(name, kwargs, cin):
    _train_steps(models.get_model(name, **kwargs), cin, steps=3, batch=2, lr=LR.get(name, 0.02))


IMAGENET_SHAPES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d",
                   "googlenet", "vgg11", "vgg16_bn", "nin"]


def _imagenet_forward(name):
    """One 224x224 image through the ImageNet form, forward and backward."""
    model = models.get_model(name, num_classes=20)
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    out = model(x)
    assert out.shape == (1, 20) and np.all(np.isfinite(out))
    assert model.backward(np.ones_like(out)).shape == x.shape


def test_imagenet_output_shape():
    _imagenet_forward("resnet18")


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET_SHAPES[1:])
def test_imagenet_output_shape_slow(name):
    _imagenet_forward(name)
