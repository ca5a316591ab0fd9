"""Optimizers: torch.optim's names, defaults and update rules, as fused in-place kernels.

Each parameter group is updated by one kernel call per memory segment (usually
one): the kernel reads p, grad and the optimizer state and writes p and state
in a single pass (cnet_ext/_optim.pyx).  On construction a group's parameters
are put into one flat buffer (``cnet.nn.flatten_parameters``; the layers hold
views, so this is invisible to them), unless they already are views of a flat
buffer, e.g. after ``model.flatten_parameters()``: then the group's parameters
are coalesced into contiguous spans of that shared buffer and nothing moves.
The optimizer state (momentum buffers, exp_avg, ...) lives in flat arrays, one
per group, aligned with those spans.

Scalars that torch computes in Python (bias corrections, the NAdam momentum
schedule, Adagrad's decayed lr) are computed here in double precision and
passed to the kernel, which casts them to the parameter dtype as torch does.

Differences from torch, by design:
- gradients are always arrays (zeros when nothing flowed), so every parameter
  of a group steps together and the step count is per group;
- the state is laid out flat, but ``state_dict()`` speaks torch's structure
  (state keyed by parameter index, ``param_groups`` with index lists) using only
  arrays, numbers, strings, tuples, lists and None, so ``cnet.save`` stores it
  without pickle;
- a non-finite gradient (or a parameter that becomes non-finite) is counted
  inside the fused pass and reported in ``last_step_finite``; with
  ``skip_nonfinite=True`` a cheap read-only pass over the gradients runs first
  and a step with a non-finite gradient is skipped, leaving parameters and
  state untouched.  When gradients are clipped anyway, ``clip_grad_norm_``'s
  return value already says it (non-finite norm <=> a non-finite gradient), so
  ``if math.isfinite(norm): opt.step()`` skips without the extra pass.
"""
import math

import numpy as np

from cnet_ext import _optim
from .. import _threads
from ._layout import build_segments

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "NAdam",
           "param_groups_no_decay"]


class _Required:
    def __repr__(self):
        return "<required parameter>"


required = _Required()


class _GroupState:
    """The memory layout and flat optimizer state of one parameter group."""

    def __init__(self, params, flatten):
        for p in params:
            if p.grad.dtype != p.data.dtype:
                raise ValueError(f"optimizer: a parameter of shape {p.data.shape} has "
                                 f"{p.data.dtype} data but a {p.grad.dtype} grad")
        dtypes = {p.data.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"optimizer: a parameter group mixes dtypes "
                             f"{sorted(map(str, dtypes))}; put each dtype in its own group")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"optimizer: parameters must be float32 or float64, got {self.dtype}")
        self.params = list(params)
        self.segments, self.offsets, self.size = build_segments(self.params, flatten)
        self.bindings = [(p.data, p.grad) for p in self.params]
        self.arrays = {}        # state name -> flat array of self.size elements
        self.step = 0
        self.initialized = False
        self.extra = {}         # scalar state (NAdam's mu_product)

    def stale(self):
        """True when a parameter's .data or .grad was rebound since the layout was built."""
        for p, (d, g) in zip(self.params, self.bindings):
            if p.data is not d or p.grad is not g:
                return True
        return False

    def array(self, name, fill=0.0):
        a = self.arrays.get(name)
        if a is None:
            a = np.full(self.size, fill, dtype=self.dtype)
            self.arrays[name] = a
        return a

    def param_view(self, name, i):
        """State ``name`` of parameter i, as a view shaped like the parameter."""
        p = self.params[i]
        off = self.offsets[i]
        return self.arrays[name][off:off + p.data.size].reshape(p.data.shape)


class Optimizer:
    """Base class: parameter groups, zero_grad, step, state_dict.

    Subclasses define ``defaults``, ``_step_group(group, gs, n_threads)`` (one
    fused kernel call per segment, returning the non-finite count),
    ``_init_state(group, gs)`` and ``_param_state(group, gs, i)`` (torch's
    per-parameter state dict).
    """

    def __init__(self, params, defaults, skip_nonfinite=False):
        self.defaults = dict(defaults)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.param_groups = []
        self._gstates = []
        self.last_step_finite = True
        self.nonfinite_steps = 0     # steps that met a non-finite gradient or parameter
        self.skipped_steps = 0       # of those, steps skipped (skip_nonfinite=True)
        if hasattr(params, "parameters") and callable(params.parameters):
            params = params.parameters()
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for g in params:
            self.add_param_group(g)

    # -- groups ----------------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a group (a dict with 'params' and optional hyper-parameters), as torch."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if hasattr(params, "data") and hasattr(params, "grad"):
            params = [params]
        elif hasattr(params, "parameters") and callable(params.parameters):
            params = params.parameters()
        params = list(params)
        for p in params:
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(f"{type(self).__name__}: can only optimize Parameters, got "
                                f"{type(p).__name__}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter group contains a parameter "
                             "more than once")
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError(f"{type(self).__name__}: parameter group didn't specify a value "
                                 f"of required optimization parameter {name}")
            group.setdefault(name, default)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError(f"{type(self).__name__}: some parameters appear in more than one "
                             "parameter group")
        self._validate(group)
        group["params"] = params
        self.param_groups.append(group)
        self._gstates.append(_GroupState(params, flatten=True))

    def _validate(self, group):
        """Check hyper-parameters (torch's ValueErrors); subclasses extend."""
        lr = group.get("lr")
        if lr is not None and lr is not required and lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if group.get("eps", 0) < 0:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if group.get("weight_decay", 0) < 0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def _gstate(self, gi):
        """The group's layout, rebuilt (state preserved) if parameters were rebound."""
        gs = self._gstates[gi]
        if gs.stale():
            gs = self._relayout(gi)
        return gs

    def _relayout(self, gi):
        old = self._gstates[gi]
        group = self.param_groups[gi]
        # keep every parameter's state across the new layout (e.g. after model.to(float64)
        # or model.flatten_parameters() following the optimizer's construction)
        saved = {name: [old.param_view(name, i).copy() for i in range(len(old.params))]
                 for name in old.arrays}
        new = _GroupState(group["params"], flatten=True)
        new.step, new.initialized, new.extra = old.step, old.initialized, dict(old.extra)
        for name, views in saved.items():
            new.array(name)
            for i, v in enumerate(views):
                new.param_view(name, i)[...] = v
        self._gstates[gi] = new
        return new

    # -- gradients -------------------------------------------------------------
    def zero_grad(self, set_to_none=None):
        """Zero every gradient with one parallel fill per flat segment.

        ``set_to_none`` is accepted for torch compatibility; cnet gradients are
        always arrays, so they are zero-filled."""
        nt = _threads.num_threads()
        for gi in range(len(self._gstates)):
            for seg in self._gstate(gi).segments:
                _optim.fill(seg.grad, seg.chunks, 1, 0.0, nt)

    def _grads_finite(self, nt):
        for gi in range(len(self._gstates)):
            for seg in self._gstate(gi).segments:
                if _optim.count_nonfinite(seg.grad, seg.chunks, 1, nt):
                    return False
        return True

    # -- step --------------------------------------------------------------------
    def step(self, closure=None):
        """One update of every parameter group; returns closure() if given (torch's API).

        Sets ``last_step_finite``; with ``skip_nonfinite`` a step whose gradients are not
        all finite changes nothing (``skipped_steps`` counts them)."""
        loss = closure() if closure is not None else None
        nt = _threads.num_threads()
        if self.skip_nonfinite and not self._grads_finite(nt):
            self.last_step_finite = False
            self.nonfinite_steps += 1
            self.skipped_steps += 1
            return loss
        bad = 0
        for gi, group in enumerate(self.param_groups):
            gs = self._gstate(gi)
            if gs.size == 0:
                continue
            if not gs.initialized:
                self._init_state(group, gs)
                gs.initialized = True
            gs.step += 1
            bad += self._step_group(group, gs, nt)
        self.last_step_finite = bad == 0
        if bad:
            self.nonfinite_steps += 1
        return loss

    def _init_state(self, group, gs):
        raise NotImplementedError

    def _step_group(self, group, gs, nt):
        raise NotImplementedError

    def _param_state(self, group, gs, i):
        """torch's state dict of parameter i of a group (views into the flat state)."""
        st = {"step": float(gs.step)}
        for name in self._state_names(group, gs):
            st[name] = gs.param_view(name, i)
        return st

    def _state_names(self, group, gs):
        return [n for n in gs.arrays]

    # -- state -------------------------------------------------------------------
    @property
    def state(self):
        """{Parameter: {name: value}}, like torch's ``optimizer.state`` (views of the flat state)."""
        out = {}
        for gi, group in enumerate(self.param_groups):
            gs = self._gstate(gi)
            if gs.initialized:
                for i, p in enumerate(gs.params):
                    out[p] = self._param_state(group, gs, i)
        return out

    def state_dict(self):
        """torch's structure, pickle-free: {'state': {index: {...}}, 'param_groups': [...]}.

        Arrays are copies; every value is an array, number, string, bool, tuple,
        list or None, so ``cnet.save(opt.state_dict(), path)`` stores it as npz."""
        state, groups, index = {}, [], 0
        for gi, group in enumerate(self.param_groups):
            gs = self._gstate(gi)
            ids = list(range(index, index + len(gs.params)))
            if gs.initialized:
                for i, pid in enumerate(ids):
                    st = self._param_state(group, gs, i)
                    state[pid] = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                  for k, v in st.items()}
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = ids
            groups.append(g)
            index += len(gs.params)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and state from ``state_dict()`` (or ``cnet.load`` of it)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: the state has {len(groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"load_state_dict: parameter group {gi} has "
                                 f"{len(saved['params'])} parameters in the state, "
                                 f"{len(group['params'])} here")
        states = state_dict.get("state", {})
        states = {int(k): v for k, v in states.items()}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            gs = self._gstate(gi)
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(v, list) and k == "betas" else v
            entries = [states.get(int(pid)) for pid in saved["params"]]
            present = [e is not None for e in entries]
            if not any(present):
                gs.arrays, gs.step, gs.initialized, gs.extra = {}, 0, False, {}
                continue
            if not all(present):
                raise ValueError(f"load_state_dict: parameter group {gi} has state for only "
                                 "some of its parameters")
            gs.arrays, gs.extra = {}, {}
            self._init_state(group, gs)
            gs.initialized = True
            steps = {float(np.asarray(e.get("step", 0.0))) for e in entries}
            if len(steps) > 1:
                raise ValueError(f"load_state_dict: parameter group {gi} has different step "
                                 f"counts {sorted(steps)}; cnet steps a group together")
            gs.step = int(steps.pop())
            for i, (p, e) in enumerate(zip(gs.params, entries)):
                for name, value in e.items():
                    if name == "step":
                        continue
                    self._load_param_state(group, gs, i, name, value)

    def _load_param_state(self, group, gs, i, name, value):
        if value is None:
            return
        value = np.asarray(value)
        p = gs.params[i]
        if value.shape != p.data.shape:
            raise ValueError(f"load_state_dict: state {name!r} of parameter {i} has shape "
                             f"{value.shape}, the parameter has shape {p.data.shape}")
        gs.array(name)
        gs.param_view(name, i)[...] = value

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


def _check_beta(name, b):
    if not 0.0 <= b < 1.0:
        raise ValueError(f"Invalid {name} parameter: {b}")


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, Nesterov, L2 weight decay, maximize."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, skip_nonfinite=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, skip_nonfinite)

    def _validate(self, group):
        super()._validate(group)
        if group["momentum"] < 0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _init_state(self, group, gs):
        gs.extra["has_buffer"] = False

    def _step_group(self, group, gs, nt):
        momentum = group["momentum"]
        first = False
        buf = None
        if momentum != 0:
            first = not gs.extra.get("has_buffer", False)
            buf = gs.array("momentum_buffer")
            gs.extra["has_buffer"] = True
        bad = 0
        for seg in gs.segments:
            bad += _optim.sgd(seg.data, seg.grad, buf, seg.chunks, group["lr"],
                              group["weight_decay"], momentum, group["dampening"],
                              group["nesterov"], group["maximize"], first, nt)
        return bad

    def _param_state(self, group, gs, i):
        if gs.extra.get("has_buffer") and "momentum_buffer" in gs.arrays:
            return {"momentum_buffer": gs.param_view("momentum_buffer", i)}
        return {"momentum_buffer": None}

    def _load_param_state(self, group, gs, i, name, value):
        super()._load_param_state(group, gs, i, name, value)
        if name == "momentum_buffer" and value is not None:
            gs.extra["has_buffer"] = True


class Adagrad(Optimizer):
    """torch.optim.Adagrad: lr_decay, weight_decay, initial_accumulator_value, eps."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, *, maximize=False,
                 skip_nonfinite=False):
        if lr_decay < 0:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if initial_accumulator_value < 0:
            raise ValueError(f"Invalid initial_accumulator_value value: "
                             f"{initial_accumulator_value}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults, skip_nonfinite)
        # torch creates Adagrad's state eagerly (step 0, sum = initial value)
        for group, gs in zip(self.param_groups, self._gstates):
            self._init_state(group, gs)
            gs.initialized = True

    def _init_state(self, group, gs):
        gs.array("sum", fill=group["initial_accumulator_value"])

    def _step_group(self, group, gs, nt):
        clr = group["lr"] / (1 + (gs.step - 1) * group["lr_decay"])
        s = gs.array("sum", fill=group["initial_accumulator_value"])
        bad = 0
        for seg in gs.segments:
            bad += _optim.adagrad(seg.data, seg.grad, s, seg.chunks, clr,
                                  group["weight_decay"], group["eps"], group["maximize"], nt)
        return bad

    def _state_names(self, group, gs):
        return ["sum"]


class RMSprop(Optimizer):
    """torch.optim.RMSprop: alpha, eps, weight_decay, momentum, centered."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, *, maximize=False, skip_nonfinite=False):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, skip_nonfinite)

    def _validate(self, group):
        super()._validate(group)
        if group["momentum"] < 0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["alpha"] < 0:
            raise ValueError(f"Invalid alpha value: {group['alpha']}")

    def _init_state(self, group, gs):
        gs.array("square_avg")

    def _step_group(self, group, gs, nt):
        sq = gs.array("square_avg")
        ga = gs.array("grad_avg") if group["centered"] else None
        buf = gs.array("momentum_buffer") if group["momentum"] > 0 else None
        bad = 0
        for seg in gs.segments:
            bad += _optim.rmsprop(seg.data, seg.grad, sq, ga, buf, seg.chunks, group["lr"],
                                  group["alpha"], group["eps"], group["weight_decay"],
                                  group["momentum"], group["centered"], group["maximize"], nt)
        return bad

    def _state_names(self, group, gs):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return [n for n in names if n in gs.arrays]


class Adadelta(Optimizer):
    """torch.optim.Adadelta: lr, rho, eps, weight_decay."""

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, *, maximize=False,
                 skip_nonfinite=False):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, skip_nonfinite)

    def _init_state(self, group, gs):
        gs.array("square_avg")
        gs.array("acc_delta")

    def _step_group(self, group, gs, nt):
        sq, acc = gs.array("square_avg"), gs.array("acc_delta")
        bad = 0
        for seg in gs.segments:
            bad += _optim.adadelta(seg.data, seg.grad, sq, acc, seg.chunks, group["lr"],
                                   group["rho"], group["eps"], group["weight_decay"],
                                   group["maximize"], nt)
        return bad

    def _state_names(self, group, gs):
        return ["square_avg", "acc_delta"]


class _AdamBase(Optimizer):
    """What Adam(W) and NAdam share: betas, the two moment buffers, weight decay as L2
    or decoupled (torch's ``decoupled_weight_decay``)."""

    def _validate(self, group):
        super()._validate(group)
        group["betas"] = tuple(group["betas"])
        _check_beta("beta parameter at index 0", group["betas"][0])
        _check_beta("beta parameter at index 1", group["betas"][1])

    def _init_state(self, group, gs):
        gs.array("exp_avg")
        gs.array("exp_avg_sq")

    @staticmethod
    def _weight_decay(group):
        """(L2 coefficient, multiplier of p before the update) for the kernels."""
        lr, wd = group["lr"], group["weight_decay"]
        if group["decoupled_weight_decay"]:
            return 0.0, 1 - lr * wd
        return wd, 1.0


class Adam(_AdamBase):
    """torch.optim.Adam: betas, eps, weight_decay (L2, or decoupled), amsgrad, bias correction."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False,
                 skip_nonfinite=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, skip_nonfinite)

    def _step_group(self, group, gs, nt):
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        step = gs.step
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bc2_sqrt = bias_correction2 ** 0.5
        l2, decay = self._weight_decay(group)
        m, v = gs.array("exp_avg"), gs.array("exp_avg_sq")
        vmax = gs.array("max_exp_avg_sq") if group["amsgrad"] else None
        bad = 0
        for seg in gs.segments:
            bad += _optim.adam(seg.data, seg.grad, m, v, vmax, seg.chunks, l2, decay, beta1,
                               beta2, step_size, bc2_sqrt, group["eps"], group["amsgrad"],
                               group["maximize"], nt)
        return bad

    def _state_names(self, group, gs):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return [n for n in names if n in gs.arrays]


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay p -= lr * wd * p (Loshchilov & Hutter)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, skip_nonfinite=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         skip_nonfinite=skip_nonfinite)


class NAdam(_AdamBase):
    """torch.optim.NAdam: betas, eps, weight_decay (L2 or decoupled), momentum_decay schedule."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False,
                 skip_nonfinite=False):
        if momentum_decay < 0:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, skip_nonfinite)

    def _init_state(self, group, gs):
        super()._init_state(group, gs)
        gs.extra["mu_product"] = 1.0

    def _step_group(self, group, gs, nt):
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        step = gs.step
        bias_correction2 = 1 - beta2 ** step
        l2, decay = self._weight_decay(group)
        md = group["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * md)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * md)))
        # the product is state: a skipped step (skip_nonfinite) returns before this line
        mu_product = gs.extra.get("mu_product", 1.0) * mu
        gs.extra["mu_product"] = mu_product
        mu_product_next = mu_product * mu_next
        c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
        c_avg = (-lr * mu_next) / (1.0 - mu_product_next)
        m, v = gs.array("exp_avg"), gs.array("exp_avg_sq")
        bad = 0
        for seg in gs.segments:
            bad += _optim.nadam(seg.data, seg.grad, m, v, seg.chunks, l2, decay, beta1, beta2,
                                bias_correction2, group["eps"], c_grad, c_avg,
                                group["maximize"], nt)
        return bad

    def _param_state(self, group, gs, i):
        st = super()._param_state(group, gs, i)
        st["mu_product"] = float(gs.extra.get("mu_product", 1.0))
        return st

    def _state_names(self, group, gs):
        return ["exp_avg", "exp_avg_sq"]

    def _load_param_state(self, group, gs, i, name, value):
        if name == "mu_product":
            gs.extra["mu_product"] = float(np.asarray(value))
            return
        super()._load_param_state(group, gs, i, name, value)


def param_groups_no_decay(model, weight_decay):
    """Two parameter groups: weights with ``weight_decay``, and batch-norm parameters
    and biases (every parameter with ndim <= 1) with weight_decay 0.

    ``model``: a Module or an iterable of Parameters.  Empty groups are left out.
    """
    params = model.parameters() if hasattr(model, "parameters") else model
    decay, no_decay = [], []
    for p in params:
        (no_decay if p.data.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
