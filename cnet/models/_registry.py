"""The model registry behind ``cnet.models.get_model`` / ``list_models``, and the
small helpers the builders share."""
from collections import OrderedDict

from .. import init, nn

_MODELS = OrderedDict()


def register_model(fn):
    """Decorator: make a builder reachable as ``get_model(fn.__name__, **kwargs)``."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models():
    """Names of every registered builder, sorted."""
    return sorted(_MODELS)


def get_model(name, **kwargs):
    """Build a registered model by name: ``get_model("resnet20", num_classes=10)``."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return builder(**kwargs)


def named(*pairs):
    """``nn.Sequential`` whose children have names (``layer1.0.conv1``) instead of
    indices: ``named(("conv1", conv), ("bn1", bn), ...)``; ``None`` layers are skipped."""
    return nn.Sequential(OrderedDict((name, layer) for name, layer in pairs if layer is not None))


def check_input_size(builder, input_size, allowed):
    if input_size not in allowed:
        raise ValueError(f"{builder}: input_size must be one of {allowed}, got {input_size!r}")


def zero_bias_(m):
    if getattr(m, "bias", None) is not None:
        init.zeros_(m.bias)


def init_batchnorm_(model):
    """BN scale 1, shift 0 (what every paper here uses; PyTorch's default too)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and getattr(m, "weight", None) is not None:
            init.ones_(m.weight)
            zero_bias_(m)
