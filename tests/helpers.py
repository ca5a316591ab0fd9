"""Shared test utilities: finite-difference gradient checks and torch layout helpers."""
import numpy as np

import cnet


def numeric_grad(f, array, eps=1e-6, indices=None):
    """Central differences of the scalar f() w.r.t. ``array`` (modified in place and restored)."""
    flat = array.reshape(-1)
    grad = np.zeros_like(flat)
    for i in (range(flat.size) if indices is None else indices):
        orig = flat[i]
        flat[i] = orig + eps
        fp = f()
        flat[i] = orig - eps
        fm = f()
        flat[i] = orig
        grad[i] = (fp - fm) / (2 * eps)
    return grad.reshape(array.shape)


def check_gradients(module, x, *, eps=1e-6, rtol=1e-6, atol=1e-8, seed=0, max_checks=200,
                    check_input=True, check_params=True):
    """Float64 finite-difference check of ``module.backward`` for input and parameters.

    The scalar loss is ``sum(forward(x) * R)`` with a fixed random ``R``; cnet is
    reseeded before every forward so stochastic layers (dropout) see the same
    mask each time.  At most ``max_checks`` entries per array are probed (a
    fixed random subset) to keep big layers fast.
    """
    module.double()
    module.train()
    x = np.ascontiguousarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)

    def forward():
        cnet.manual_seed(seed)
        return module.forward(x)

    out = forward()
    R = rng.standard_normal(out.shape)
    loss = lambda: float(np.sum(forward() * R))  # noqa: E731

    module.zero_grad()
    forward()
    grad_x = module.backward(R.copy())
    analytic = {"input": grad_x}
    targets = {"input": x} if check_input else {}
    if check_params:
        for name, p in module.named_parameters():
            analytic[name] = p.grad.copy()
            targets[name] = p.data
    for name, arr in targets.items():
        n = arr.size
        idx = np.arange(n) if n <= max_checks else rng.choice(n, max_checks, replace=False)
        num = numeric_grad(loss, arr, eps=eps, indices=idx).reshape(-1)[idx]
        ana = np.asarray(analytic[name]).reshape(-1)[idx]
        np.testing.assert_allclose(ana, num, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {name} in {module!r}")


# -- layout conversion for torch parity tests --------------------------------

def nhwc_to_nchw(a):
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def nchw_to_nhwc(a):
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def hwio_to_oihw(w):
    return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))


def oihw_to_hwio(w):
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def torch_conv_grads(m, x, dy):
    """(y, dx, dW in HWIO, db or None) of torch.nn.Conv2d with cnet Conv2d m's geometry
    and weights, for NHWC x and dy (torch must be importable)."""
    import torch
    t = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                        padding=m.padding, dilation=m.dilation, groups=m.groups,
                        bias=m.bias is not None)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(hwio_to_oihw(m.weight.data)))
        if m.bias is not None:
            t.bias.copy_(torch.from_numpy(m.bias.data))
    xt = torch.from_numpy(nhwc_to_nchw(x)).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(nhwc_to_nchw(dy)))
    return (nchw_to_nhwc(yt.detach().numpy()), nchw_to_nhwc(xt.grad.numpy()),
            oihw_to_hwio(t.weight.grad.numpy()),
            None if m.bias is None else t.bias.grad.numpy())


def spy_gemm_accumulate(monkeypatch, kernels):
    """Records, per call of kernels.gemm_packed (cnet_ext._conv), whether it was asked
    to accumulate into C; returns the list it appends to."""
    accumulated = []
    plain = kernels.gemm_packed

    def spy(*args, **kw):
        accumulated.append(kw.get("accumulate", False))
        return plain(*args, **kw)

    monkeypatch.setattr(kernels, "gemm_packed", spy)
    return accumulated
