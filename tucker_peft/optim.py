"""Optimizers over the analytic gradients, written once against the array API.

They run on any array library (NumPy, CuPy, torch, array-api-strict...) and
keep their state in arrays of the params' own library, device and dtype. A
step never copies a device value to the host: the step counter is a Python
int and the bias corrections are Python floats computed from it.

Arrays are never updated in place (array-api-strict and JAX cannot), so
:meth:`Optimizer.step` returns new params; :class:`tucker_peft.Adapter`
holds them.

>>> import numpy as np
>>> opt = Adam(lr=0.1)
>>> params = {"w": np.ones(3)}
>>> params = opt.step(params, {"w": np.full(3, 0.5)})
>>> np.round(params["w"], 6).tolist()
[0.9, 0.9, 0.9]
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Mapping

import numpy as np

from ._namespace import ArrayContext, namespace, to_numpy
from ._errors import ParamsError, TuckerPeftError, fmt_shape

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm"]

Params = dict[str, Any]


def _check_hyper(name: str, value: Any, low: float, high: float = math.inf, *, closed_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TuckerPeftError(f"{name}: expected a number in [{low}, {high}{']' if closed_high else ')'}, got {value!r}")
    v = float(value)
    if not (low <= v and (v <= high if closed_high else v < high)):
        raise TuckerPeftError(f"{name}: expected a number in [{low}, {high}{']' if closed_high else ')'}, got {v!r}")
    return v


def _check_pair(params: Mapping[str, Any], grads: Mapping[str, Any]) -> Any:
    """Validate that ``grads`` matches ``params`` key for key and shape for shape."""
    if not isinstance(params, Mapping) or not isinstance(grads, Mapping):
        raise ParamsError(f"params, grads: expected two dicts of name -> array, got "
                          f"{type(params).__name__} and {type(grads).__name__}")
    if set(params) != set(grads):
        raise ParamsError(f"grads: expected the keys of params {list(params)}, got {list(grads)}")
    for k, p in params.items():
        if tuple(p.shape) != tuple(grads[k].shape):
            raise ParamsError(f"grads[{k!r}]: expected shape {fmt_shape(p.shape)} as params[{k!r}], "
                              f"got {fmt_shape(grads[k].shape)}")
    names = [f"params[{k!r}]" for k in params] + [f"grads[{k!r}]" for k in params]
    return namespace(*params.values(), *(grads[k] for k in params), what=names)


class Optimizer:
    """Base class: hyper-parameters, a step counter and per-parameter state slots.

    Subclasses name their state arrays in :attr:`slots` and implement
    :meth:`_update`.

    Parameters
    ----------
    lr : float or callable
        Learning rate, or a schedule ``lr(t)`` of the 1-based step count
        returning a float (evaluated on the host).

    Attributes
    ----------
    t : int
        Steps taken.
    state : dict of str to dict of str to array
        Per parameter, the arrays named in :attr:`slots`.
    lr_scale : dict of str to float
        Per-parameter multipliers of the learning rate (default 1), like
        torch's parameter groups.
    """

    #: Names of the per-parameter state arrays.
    slots: tuple[str, ...] = ()

    def __init__(self, lr: Any) -> None:
        if callable(lr):
            self.lr = lr
        else:
            self.lr = _check_hyper("lr", lr, 0.0)
        self.t = 0
        self.state: dict[str, dict[str, Any]] = {}
        self.lr_scale: dict[str, float] = {}

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return f"{type(self).__name__}({hyper})"

    def _hyper(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def _lr(self, t: int) -> float:
        lr = self.lr(t) if callable(self.lr) else self.lr
        return _check_hyper(f"lr({t})", lr, 0.0)

    def _init_slot(self, xp: Any, p: Any, slot: str) -> Any:
        return xp.zeros_like(p)

    def step(self, params: Mapping[str, Any], grads: Mapping[str, Any]) -> Params:
        """One update.

        Parameters
        ----------
        params : dict of str to array
            Current values; not modified.
        grads : dict of str to array
            Same keys and shapes; ∂L/∂params.

        Returns
        -------
        dict of str to array
            The new params, same keys, shapes, library, device and dtype.
        """
        xp = _check_pair(params, grads)
        if self.state and set(self.state) != set(params):
            raise ParamsError(f"params: this optimizer holds state for {sorted(self.state)}, got {sorted(params)}; "
                              "call reset() to start over")
        t = self.t + 1
        lr = self._lr(t)
        new: Params = {}
        states: dict[str, dict[str, Any]] = {}
        for k, p in params.items():
            fresh = k not in self.state
            st = {s: self._init_slot(xp, p, s) for s in self.slots} if fresh else self.state[k]
            new[k], states[k] = self._update(xp, p, grads[k], st, t, lr * self.lr_scale.get(k, 1.0), fresh)
        self.state, self.t = states, t
        return new

    def _update(self, xp: Any, p: Any, g: Any, state: dict[str, Any], t: int, lr: float,
                fresh: bool) -> tuple[Any, dict[str, Any]]:
        """New ``(param, state)``; ``fresh`` is True on the first step this param is seen."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the state and the step count."""
        self.t = 0
        self.state = {}

    # -- serialisation -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Host copy of the state: ``{'t': int, 'state': {param: {slot: np.ndarray}}}``."""
        return {"t": self.t, "state": {k: {s: np.asarray(to_numpy(a)) for s, a in st.items()}
                                       for k, st in self.state.items()}}

    def check_state_dict(self, sd: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        """Raise unless ``sd`` is a valid state for ``params`` (keys, slots, shapes)."""
        try:
            t = operator.index(sd["t"])
            state = sd["state"]
        except (KeyError, TypeError):
            raise TuckerPeftError("optimizer state: expected {'t': int, 'state': {param: {slot: array}}}, "
                                  f"got {type(sd).__name__} with keys {list(sd) if isinstance(sd, Mapping) else '-'}") from None
        if t < 0:
            raise TuckerPeftError(f"optimizer state 't': expected an int >= 0, got {t}")
        if state and set(state) != set(params):
            raise TuckerPeftError(f"optimizer state: expected entries for params {sorted(params)}, got {sorted(state)}")
        for k, st in state.items():
            if set(st) != set(self.slots):
                raise TuckerPeftError(f"optimizer state[{k!r}]: expected slots {list(self.slots)} "
                                      f"for {type(self).__name__}, got {sorted(st)}")
            for s, a in st.items():
                if tuple(np.shape(a)) != tuple(params[k].shape):
                    raise TuckerPeftError(f"optimizer state[{k!r}][{s!r}]: expected shape "
                                          f"{fmt_shape(params[k].shape)}, got {fmt_shape(np.shape(a))}")

    def load_state_dict(self, sd: Mapping[str, Any], like: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output; arrays move next to the matching ``like[name]``.

        Validates everything before changing the optimizer.
        """
        self.check_state_dict(sd, like)
        state = {}
        for k, st in sd["state"].items():
            ctx = ArrayContext.resolve(like=like[k])
            state[k] = {s: ctx.asarray(np.asarray(to_numpy(a))) for s, a in st.items()}
        self.t = int(sd["t"])
        self.state = state

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        """Replace every state array ``a`` by ``fn(a)`` (e.g. a DLPack hand-off)."""
        self.state = {k: {s: fn(a) for s, a in st.items()} for k, st in self.state.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    Follows ``torch.optim.SGD``: ``g ← g + wd·p``; ``b ← μ·b + (1−τ)·g``
    (``b = g`` on the first step); ``g ← g + μ·b`` (Nesterov) or ``g ← b``;
    ``p ← p − lr·g``.

    Parameters
    ----------
    lr : float or callable
    momentum : float in [0, 1)
    dampening : float in [0, 1]
    nesterov : bool
        Needs ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float >= 0
        L2 penalty added to the gradient.
    """

    def __init__(self, lr: Any = 1e-2, momentum: float = 0.0, *, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.momentum = _check_hyper("momentum", momentum, 0.0, 1.0)
        self.dampening = _check_hyper("dampening", dampening, 0.0, 1.0, closed_high=True)
        self.weight_decay = _check_hyper("weight_decay", weight_decay, 0.0)
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise TuckerPeftError(f"nesterov: needs momentum > 0 and dampening == 0, got momentum={self.momentum}, "
                                  f"dampening={self.dampening}")
        self.nesterov = bool(nesterov)
        self.slots = ("momentum_buffer",) if self.momentum else ()

    def _hyper(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _update(self, xp: Any, p: Any, g: Any, state: dict[str, Any], t: int, lr: float,
                fresh: bool) -> tuple[Any, dict[str, Any]]:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            # The first step copies g, as torch does.
            buf = g if fresh else self.momentum * state["momentum_buffer"] + (1 - self.dampening) * g
            state = {"momentum_buffer": buf}
            g = g + self.momentum * buf if self.nesterov else buf
        return p - lr * g, state


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``torch.optim.Adam`` semantics.

    ``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·g²``,
    ``p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)``.

    Parameters
    ----------
    lr : float or callable
    betas : (float, float), each in [0, 1)
    eps : float > 0
    weight_decay : float >= 0
        L2 penalty added to the gradient (coupled, as ``torch.optim.Adam``);
        :class:`AdamW` decouples it.
    amsgrad : bool
        Use the running maximum of ``v`` (``torch``'s AMSGrad variant).
    """

    decoupled: bool = False

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, amsgrad: bool = False) -> None:
        super().__init__(lr)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TuckerPeftError(f"betas: expected a pair of floats in [0, 1), got {betas!r}") from None
        self.betas = (_check_hyper("betas[0]", b1, 0.0, 1.0), _check_hyper("betas[1]", b2, 0.0, 1.0))
        self.eps = _check_hyper("eps", eps, 0.0)
        if self.eps == 0:
            raise TuckerPeftError("eps: expected a number > 0, got 0.0")
        self.weight_decay = _check_hyper("weight_decay", weight_decay, 0.0)
        self.amsgrad = bool(amsgrad)
        self.slots = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def _hyper(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "amsgrad": self.amsgrad}

    def _update(self, xp: Any, p: Any, g: Any, state: dict[str, Any], t: int, lr: float,
                fresh: bool) -> tuple[Any, dict[str, Any]]:
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p = p * (1 - lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        m = b1 * state["exp_avg"] + (1 - b1) * g
        v = b2 * state["exp_avg_sq"] + (1 - b2) * (g * g)
        new = {"exp_avg": m, "exp_avg_sq": v}
        if self.amsgrad:
            v = new["max_exp_avg_sq"] = xp.maximum(state["max_exp_avg_sq"], v)
        # Host floats from the int counter: no device round-trip.
        bc1 = 1 - b1**t
        bc2_sqrt = math.sqrt(1 - b2**t)
        denom = xp.sqrt(v) / bc2_sqrt + self.eps
        return p - (lr / bc1) * (m / denom), new


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``): ``p ← p·(1 − lr·wd)`` first."""

    decoupled = True

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad=amsgrad)


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float, eps: float = 1e-6) -> tuple[Params, Any]:
    """Scale ``grads`` so that their joint L2 norm is at most ``max_norm``.

    The factor ``min(1, max_norm / (norm + eps))`` stays on the device (no
    host round-trip), as in ``torch.nn.utils.clip_grad_norm_``.

    Returns
    -------
    grads : dict of str to array
        Clipped copies.
    norm : 0-d array
        The norm before clipping, on the grads' device.
    """
    max_norm = _check_hyper("max_norm", max_norm, 0.0)
    if not isinstance(grads, Mapping) or not grads:
        raise ParamsError(f"grads: expected a non-empty dict of name -> array, got {grads!r}")
    xp = namespace(*grads.values(), what=[f"grads[{k!r}]" for k in grads])
    total = None
    for g in grads.values():
        s = xp.sum(g * g)
        total = s if total is None else total + s
    norm = xp.sqrt(total)
    factor = xp.minimum(max_norm / (norm + eps), xp.ones_like(norm))
    return {k: g * factor for k, g in grads.items()}, norm
