"""Fitting a spec to a given ΔW, e.g. the difference of a fine-tuned and a base checkpoint.

Everything runs on the target's array library and device (NumPy, CuPy,
torch, array-api-strict). The relative error of every step is kept on the
device and copied to the host once, at the end.

>>> import numpy as np, tucker_peft as tp
>>> target = np.random.default_rng(0).standard_normal((16, 8, 3, 3))
>>> res = tp.fit(tp.Tucker(target.shape, 4), target, steps=5)
>>> bool(res.final_error <= res.init_error)
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._base import Parametrization, check_int, check_scale, check_tensor
from ._namespace import to_numpy
from ._errors import RankError, TuckerPeftError, fmt_shape
from .optim import Adam, Optimizer

__all__ = ["fit", "FitResult", "budget_sweep"]

Params = dict[str, Any]


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    spec : Parametrization
    params : dict of str to array
        In the target's library, device and dtype.
    scale : float
        ``scale · spec.reconstruct(params)`` approximates the target.
    method : str
    rel_errors : np.ndarray, shape ``(steps_run + 1,)``
        ``‖target − s·ΔW‖ / ‖target‖`` at the start (index 0) and after each
        step (the absolute error when the target is all zero).
    seconds : float
        Wall time of the fit, including the final host copy.
    """

    spec: Parametrization
    params: Params
    scale: float
    method: str
    rel_errors: np.ndarray
    seconds: float = 0.0

    @property
    def init_error(self) -> float:
        return float(self.rel_errors[0])

    @property
    def final_error(self) -> float:
        return float(self.rel_errors[-1])

    @property
    def steps(self) -> int:
        """Steps run (fewer than asked when stopped early)."""
        return len(self.rel_errors) - 1

    def delta(self) -> Any:
        """``s · ΔW``, shape ``spec.shape``."""
        return self.spec.reconstruct(self.params, self.scale)

    def adapter(self, **kw: Any) -> Any:
        """A :class:`tucker_peft.Adapter` holding these params (``kw`` as for Adapter)."""
        from .adapter import Adapter

        return Adapter(self.spec, self.params, scale=self.scale, **kw)


def _sqnorm(xp: Any, a: Any) -> Any:
    return xp.sum(a * a)


class _Error:
    """Relative error ``‖target − s·ΔW‖ / ‖target‖`` as a device scalar."""

    def __init__(self, xp: Any, spec: Parametrization, target: Any, scale: float) -> None:
        self.xp, self.spec, self.target, self.scale = xp, spec, target, scale
        n2 = _sqnorm(xp, target)
        # Zero target: report absolute errors (no host check needed).
        self.inv_norm = 1 / xp.sqrt(xp.where(n2 > 0, n2, xp.ones_like(n2)))

    def residual(self, params: Params) -> Any:
        return self.spec.reconstruct(params, self.scale) - self.target

    def of_residual(self, r: Any) -> Any:
        return self.xp.sqrt(_sqnorm(self.xp, r)) * self.inv_norm

    def __call__(self, params: Params) -> Any:
        return self.of_residual(self.residual(params))


def _init_params(spec: Parametrization, target: Any, init: Any, scale: float, seed: int | None,
                 options: Mapping[str, Any] | None, zero_target: bool = False) -> Params:
    opts = dict(options or {})
    if isinstance(init, Mapping):
        if opts:
            raise TuckerPeftError(f"init_options: only used with a method name for init, got {sorted(opts)}")
        params = dict(init)
        spec.check_params(params, ("target", target))
        return params
    if init == "auto":  # the kind's principal decomposition
        init = spec.principal_init
        if init is None:
            raise TuckerPeftError(f"init: 'auto' uses the kind's principal_init, and kind {spec.kind!r} has none; "
                                  "pass a method name or params")
        if init == "parafac":
            opts.setdefault("n_iter", 5)
    if not isinstance(init, str):
        raise TuckerPeftError(f"init: expected 'auto', a method name or a params dict, got {type(init).__name__}")
    canon = spec.init_methods.get(init.lower())
    if canon is not None and canon not in spec.tensor_methods:
        return spec.init(init, like=target, seed=seed, **opts)
    if zero_target and canon is not None:
        # Every decomposition of zero is ΔW = 0, which 'zero' gives exactly (CP-ALS would
        # fail on its singular normal equations).
        return spec.init("zero", like=target, seed=seed)
    return spec.init(init, tensor=target, scale=scale, seed=seed, **opts)


def _linear_param(spec: Parametrization) -> str:
    """A param that ΔW is linear in (it appears once in the einsum): scaling it scales ΔW."""
    names = [name for name, _, _ in spec._term_list]
    for name in names:
        if names.count(name) == 1:
            return name
    raise TuckerPeftError(f"target: too large or too small to fit in its dtype, and kind {spec.kind!r} has no param "
                          "to rescale; divide the target by a power of two first")


def _rescaling(xp: Any, target: Any) -> tuple[float, float]:
    """``(c, max|target|)``: c is a power of two that brings ``max|target|`` near 1 when
    its square could over- or underflow, else 1.

    Squared norms overflow from about ``sqrt(max)`` (1e154 in float64, 2e19 in
    float32); the margin of a fourth root leaves room for sums over many
    elements. Powers of two rescale exactly.
    """
    amax = float(xp.max(xp.abs(target)))
    fi = xp.finfo(target.dtype)
    if amax == 0 or (float(fi.smallest_normal) ** 0.25 <= amax <= float(fi.max) ** 0.25):
        return 1.0, amax
    return math.ldexp(1.0, math.frexp(amax)[1]), amax


def fit(spec: Parametrization, target: Any, steps: int = 20, method: str = "als", *, scale: float = 1.0,
        init: Any = "auto", init_options: Mapping[str, Any] | None = None, lr: float = 1e-3,
        optimizer: Optimizer | None = None, seed: int | None = 0, tol: float | None = None,
        callback: Callable[[int, Params, Any], Any] | None = None) -> FitResult:
    """Fit ``spec`` to ``target`` so that ``scale · spec.reconstruct(params) ≈ target``.

    Parameters
    ----------
    spec : Parametrization
        Any kind for ``method='adam'``; ``method='als'`` takes a kind whose
        :meth:`~Parametrization.als_solver` is not None (Tucker, Tucker-2, CP, LoRA).
    target : array, shape ``spec.shape``
        The ΔW to approximate, e.g. ``W_finetuned - W_base``: real floating
        and finite. Params come back in its library, device and dtype;
        float16/bfloat16 targets are fitted in float32. A target whose
        squares would over- or underflow its dtype (above ~1e77 or below
        ~1e-77 in float64) is fitted divided by a power of two, exactly. An
        all-zero target gives ΔW = 0 (the 'zero' init) for a decomposition init.
    steps : int
        ALS sweeps or optimizer steps.
    method : {'als', 'adam'}
        ``'als'``: alternating least squares. Tucker/Tucker-2: HOOI sweeps
        (each factor becomes the leading singular vectors of the target
        projected on the others; the core is the projection). CP: each
        factor solves its ``R×R`` normal equations with the Khatri-Rao
        product of the others. LoRA: B and A alternately by least squares
        (from the SVD init this stays at the Eckart–Young optimum). The
        error never increases.
        ``'adam'``: Adam on ``½‖s·ΔW − target‖² / ‖target‖²`` with the
        analytic vjp.
    scale : float
        The s the params will be used with.
    init : 'auto', str or dict
        ``'auto'``: HOSVD for Tucker, CP-ALS through tensorly (``n_iter=5``
        unless ``init_options`` says otherwise) for CP, truncated SVD for
        LoRA. A method name goes to ``spec.init``; a dict is used as the
        starting params.
    init_options : dict, optional
        Extra keywords of ``spec.init`` (``n_iter=``, ``core=``...).
    lr : float
        For ``'adam'`` without ``optimizer``: a relative learning rate; each
        parameter array steps by about ``lr`` times its initial RMS value.
    optimizer : Optimizer, optional
        For ``'adam'``: used as given (absolute learning rate).
    seed : int, optional
        For random parts of the init.
    tol : float, optional
        Stop when a step lowers the error by less than ``tol`` relative. It
        reads the error on the host once per step; leave it None on a GPU
        for a sync-free loop.
    callback : callable, optional
        ``callback(step, params, rel_error)`` after each step, with the
        error as a 0-d device array; returning True stops the fit.

    Returns
    -------
    FitResult
    """
    if not isinstance(spec, Parametrization):
        raise TuckerPeftError(f"spec: expected a Parametrization, got {type(spec).__name__}")
    if tuple(getattr(target, "shape", ())) != spec.shape:
        raise TuckerPeftError(f"target: expected shape {fmt_shape(spec.shape)}, got {fmt_shape(getattr(target, 'shape', ()))}")
    xp = check_tensor(target, "target")
    steps = check_int(steps, "steps", 0)
    if not isinstance(method, str) or method.lower() not in ("als", "adam"):
        raise TuckerPeftError(f"method: expected 'als' or 'adam', got {method!r}")
    method = method.lower()
    scale = check_scale(scale, nonzero=True)
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise TuckerPeftError(f"tol: expected a number >= 0 or None, got {tol!r}")
    t0 = time.perf_counter()
    # float16/bfloat16: LAPACK and the einsums need at least float32; params return in the target's dtype.
    out_dtype = target.dtype
    if xp.finfo(out_dtype).bits < 32:
        target = xp.astype(target, xp.float32)
        if isinstance(init, Mapping):
            init = {k: xp.astype(v, xp.float32) for k, v in init.items()}
    # A target whose squares over- or underflow is fitted divided by a power of two c;
    # one param that ΔW is linear in is multiplied back by c.
    c, amax = _rescaling(xp, target)
    lin = _linear_param(spec) if c != 1 else ""
    if c != 1:
        target = target * (1 / c)
        if isinstance(init, Mapping):
            init = {k: (v * (1 / c) if k == lin else v) for k, v in init.items()}

    def unscaled(p: Params) -> Params:
        return p if c == 1 else {k: (v * c if k == lin else v) for k, v in p.items()}

    cb = callback if callback is None or c == 1 else (lambda k, p, e: callback(k, unscaled(p), e))
    params = _init_params(spec, target, init, scale, seed, init_options,
                          zero_target=amax == 0)
    err = _Error(xp, spec, target, scale)
    if method == "als":
        solver = spec.als_solver(target, scale, params)
        if solver is None:
            raise TuckerPeftError(f"method: kind {spec.kind!r} has no alternating least squares "
                                  "(its als_solver returns None); use method='adam'")
        params, errors = _run(solver, params, err, steps, tol, cb)
    else:
        params, errors = _adam(xp, spec, target, scale, params, err, steps, lr, optimizer, tol, cb)
    params = unscaled(params)
    if out_dtype != target.dtype:
        params = {k: xp.astype(v, out_dtype) for k, v in params.items()}
    if (c != 1 or out_dtype != target.dtype) and not all(bool(xp.all(xp.isfinite(v))) for v in params.values()):
        raise TuckerPeftError(f"target: the fitted params overflow {out_dtype}; fit a target of a wider dtype "
                              "(e.g. float64) instead")
    rel = np.asarray(to_numpy(xp.stack(errors)), dtype=np.float64)
    return FitResult(spec, params, scale, method, rel, time.perf_counter() - t0)


def _stop(errors: list[Any], tol: float | None, step: int, params: Params, callback: Any) -> bool:
    if callback is not None and callback(step, params, errors[-1]) is True:
        return True
    if tol is not None and len(errors) >= 2:
        prev, cur = float(errors[-2]), float(errors[-1])
        return prev - cur <= tol * max(prev, 1e-300)
    return False


def _run(als: Any, params: Params, err: _Error, steps: int, tol: float | None, callback: Any) -> tuple[Params, list[Any]]:
    errors = [err(params)]
    for k in range(1, steps + 1):
        params = als.sweep()
        errors.append(err(params))
        if _stop(errors, tol, k, params, callback):
            break
    return params, errors


def _adam(xp: Any, spec: Parametrization, target: Any, scale: float, params: Params, err: _Error, steps: int,
          lr: float, optimizer: Optimizer | None, tol: float | None, callback: Any) -> tuple[Params, list[Any]]:
    if optimizer is None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise TuckerPeftError(f"lr: expected a number > 0, got {lr!r}")
        optimizer = Adam(lr=float(lr))
        # Relative steps: one host read of each param's RMS, before the loop.
        rms = {k: float(xp.sqrt(xp.mean(v * v))) for k, v in params.items()}
        fallback = max(rms.values()) or 1.0
        optimizer.lr_scale = {k: (r if r > 0 else fallback) for k, r in rms.items()}
    elif not isinstance(optimizer, Optimizer):
        raise TuckerPeftError(f"optimizer: expected a tucker_peft.optim.Optimizer, got {type(optimizer).__name__}")
    inv2 = err.inv_norm * err.inv_norm
    errors: list[Any] = []
    r = err.residual(params)
    errors.append(err.of_residual(r))
    for k in range(1, steps + 1):
        grads = spec.vjp(params, r * inv2, scale)
        params = optimizer.step(params, grads)
        r = err.residual(params)
        errors.append(err.of_residual(r))
        if _stop(errors, tol, k, params, callback):
            break
    return params, errors


@dataclass
class SweepRow:
    """One (kind, budget) entry of :func:`budget_sweep`."""

    kind: str
    budget: int
    spec: Parametrization | None
    num_params: int
    init_error: float
    rel_error: float
    seconds: float
    rel_errors: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "budget": self.budget, "spec": repr(self.spec), "num_params": self.num_params,
                "init_error": self.init_error, "rel_error": self.rel_error, "seconds": self.seconds}


def budget_sweep(target: Any, budgets: Sequence[int], kinds: Sequence[str] = ("tucker", "tucker2", "cp", "lora"), *,
                 steps: int | Mapping[str, int] = 10, method: str = "als",
                 constraints: Mapping[str, Mapping[str, Any]] | None = None,
                 **fit_kw: Any) -> list[SweepRow]:
    """Fit every kind at every budget to ``target``: how much of ΔW each captures at equal cost.

    Parameters
    ----------
    target : array
    budgets : sequence of int
        Parameter budgets; each kind gets its largest spec within the
        budget (:func:`tucker_peft.ranks.for_budget`).
    kinds : sequence of str
    steps : int or dict of kind to int
        Steps of :func:`fit`, for all kinds or per kind (default 10).
    method, **fit_kw
        Passed to :func:`fit`.
    constraints : dict of kind to dict, optional
        Extra ``for_budget`` constraints per kind.

    Returns
    -------
    list of SweepRow
        A kind whose smallest spec exceeds a budget gets a row with
        ``spec=None`` and NaN errors.
    """
    from . import ranks

    shape = tuple(target.shape)
    rows = []
    for budget in budgets:
        budget = check_int(budget, "budgets[i]", 1)
        for kind in kinds:
            try:
                spec = ranks.for_budget(kind, shape, budget, **dict((constraints or {}).get(kind, {})))
            except RankError:
                rows.append(SweepRow(kind, budget, None, 0, math.nan, math.nan, 0.0))
                continue
            n = steps.get(kind, 10) if isinstance(steps, Mapping) else steps
            res = fit(spec, target, steps=n, method=method, **fit_kw)
            rows.append(SweepRow(kind, budget, spec, spec.num_params, res.init_error, res.final_error,
                                 res.seconds, res.rel_errors))
    return rows
