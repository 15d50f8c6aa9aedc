"""CP (CANDECOMP/PARAFAC) parametrisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_int, check_rank, check_shape, register
from ._decomp import CPALS, max_cp_rank, parafac
from ._namespace import ArrayContext, namespace
from ._planner import contract
from ._errors import TuckerPeftError, fmt_shape

__all__ = ["CP"]


@dataclass(frozen=True)
class CP(Parametrization):
    """ΔW = s · Σ_k λ_k · a_k^(1) ∘ … ∘ a_k^(N).

    Parameters
    ----------
    shape : tuple of int
        Weight shape ``(I_1, ..., I_N)``.
    rank : int
        Number of rank-one terms R, in ``[1, Π I_n / max I_n]`` (beyond that
        every tensor is already reachable).

    Notes
    -----
    Params: ``'weights'`` λ of shape ``(R,)`` and ``'factor_n'`` of shape
    ``(I_n, R)``. ``num_params = R · (1 + Σ_n I_n)``.
    """

    rank: int = None  # type: ignore[assignment]

    kind: ClassVar[str] = "cp"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "parafac": "parafac",
                                                 "als": "parafac", "hosvd": "parafac"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"parafac"})
    principal_init: ClassVar[str | None] = "parafac"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (CP of shape {shape})", 1, max_cp_rank(shape)))

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """``min(R, Π I_n / max I_n)``."""
        if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
            return min(ranks, max_cp_rank(check_shape(shape)))
        return ranks

    @property
    def zero_block_size(self) -> int:
        """λ."""
        return self.rank

    def matched_scale(self, lead: int = 0) -> float:
        return self.orthonormal_matched_scale(lead)

    def als_solver(self, target: Any, scale: float, params: Mapping[str, Any]) -> Any:
        """CP-ALS sweeps (each factor by least squares against the Khatri-Rao product of the others)."""
        if self.ndim < 2:
            raise TuckerPeftError(f"spec: CP-ALS needs at least 2 modes, got shape {fmt_shape(self.shape)}")
        return _CPALS(namespace(target), self, target, scale, dict(params))

    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """``(a^(0), s·λ ∘ a^(k≥2) as (R, 1, *kernel), a^(1), R)``: a diagonal middle op."""
        if self.ndim < 2:
            return None
        xp = namespace(params["weights"])
        w = params["weights"] * scale
        kernel = self.shape[2:]
        if kernel:
            r = self.rank_symbol(0)
            ks = "".join(self.mode_symbol(n + 2) for n in range(len(kernel)))
            eq = ",".join([r] + [self.mode_symbol(n + 2) + r for n in range(len(kernel))]) + "->" + r + ks
            w = contract(eq, w, *[params[f"factor_{n + 2}"] for n in range(len(kernel))])
        return params["factor_0"], xp.reshape(w, (self.rank, 1, *kernel)), params["factor_1"], self.rank

    def member(self, lead: int) -> Parametrization:
        """``CP(shape[lead:], rank)``; the generic slice where R exceeds the member's largest CP rank."""
        lead = check_int(lead, "lead", 0, self.ndim - 1)
        return self.memo(("member", lead), lambda: _cp_member(self, lead)) if lead else self

    def slice(self, params: Mapping[str, Any], index: Sequence[int]) -> Params:
        """λ times the rows ``index[n]`` of the leading factors; the trailing factors renamed. Cost ``O(lead·R)``."""
        index = self.check_index(index)
        if not index or not isinstance(self.member(len(index)), CP):
            return super().slice(params, index)
        self.check_params(params)
        w = params["weights"]
        for n, i in enumerate(index):
            w = w * params[f"factor_{n}"][i, :]
        out: Params = {"weights": w}
        out.update({f"factor_{n - len(index)}": params[f"factor_{n}"] for n in range(len(index), self.ndim)})
        return out

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        out: dict[str, tuple[int, ...]] = {"weights": (self.rank,)}
        out.update({f"factor_{n}": (d, self.rank) for n, d in enumerate(self.shape)})
        return out

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        r = self._rank(0)
        return (("weights", (self.rank,), r),) + tuple(
            (f"factor_{n}", (d, self.rank), self._mode(n) + r) for n, d in enumerate(self.shape)
        )

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
              scale: float, options: dict[str, Any]) -> Params:
        if method in ("zero", "random"):
            w = np.zeros(self.rank) if method == "zero" else rng.standard_normal(self.rank)
            params: Params = {"weights": ctx.asarray(w)}
            ortho = bool(options.pop("orthonormal", False))
            for n, d in enumerate(self.shape):
                a = rng.uniform(-1, 1, (d, self.rank)) / math.sqrt(d)
                if ortho:  # unit-norm columns, the CP analogue of orthonormal factors
                    a = a / np.maximum(np.linalg.norm(a, axis=0), np.finfo(np.float64).tiny)
                params[f"factor_{n}"] = ctx.asarray(a)
            return params
        core_mode = self._core_option(options)
        seed = int(rng.integers(2**31))
        weights, factors = parafac(tensor, self.rank, n_iter=options.pop("n_iter", 100),
                                   tol=options.pop("tol", 1e-8), seed=seed)
        params = {"weights": self._cast(ctx, weights / scale) if core_mode == "project" else ctx.zeros((self.rank,))}
        params.update({f"factor_{n}": self._cast(ctx, f) for n, f in enumerate(factors)})
        return params

    @classmethod
    def concat(cls, specs: Sequence["CP"], params_list: Sequence[Mapping[str, Any]],
               weights: Sequence[float]) -> tuple["CP", Params]:
        """One CP with ``reconstruct = Σ_i weights[i] · specs[i].reconstruct(params_list[i])``: components side by side.

        Returns
        -------
        spec : CP
            Rank ``Σ_i R_i``; past the largest CP rank ``Π I_n / max I_n`` the
            sum is written at that rank, one term per fibre of the largest mode.
        params : dict
            λ of shape ``(R,)`` (each block times its weight) and factors ``(I_n, R)``.
        """
        shape, total = specs[0].shape, sum(s.rank for s in specs)
        xp = namespace(*[p["weights"] for p in params_list])
        if total > max_cp_rank(shape):
            dense = sum(s.reconstruct(p, w) for s, p, w in zip(specs, params_list, weights))
            return cls(shape, max_cp_rank(shape)), _slices(shape, dense, xp)
        params: Params = {"weights": xp.concat([p["weights"] * w for p, w in zip(params_list, weights)], axis=0)}
        for n in range(len(shape)):
            params[f"factor_{n}"] = xp.concat([p[f"factor_{n}"] for p in params_list], axis=1)
        return cls(shape, total), params

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = CP(shape, t)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'cp': {sorted(unknown)}; it takes none")
        shape = check_shape(shape)
        return (lambda t: cls(shape, t)), max_cp_rank(shape)

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """R in ``1..min(max_cp_rank, 6)`` (larger ranks only slow tests down)."""
        return cls(shape, pick(range(1, min(max_cp_rank(tuple(shape)), 6) + 1)))


def _cp_member(spec: CP, lead: int) -> Parametrization:
    shape = spec.shape[lead:]
    if spec.rank > max_cp_rank(shape):  # e.g. a one-mode member: only rank 1 is a CP there
        return Parametrization.member(spec, lead)
    return CP(shape, spec.rank, max_modes=spec.max_modes)


def _slices(shape: tuple[int, ...], dense: Any, xp: Any) -> Params:
    """Exact CP of ``dense`` at rank ``Π I_n / max I_n``: unit vectors on the other modes, fibres on the largest."""
    m = max(range(len(shape)), key=shape.__getitem__)
    others = [n for n in range(len(shape)) if n != m]
    r = math.prod(shape[n] for n in others)
    grid = np.indices([shape[n] for n in others]).reshape(len(others), r)
    dev = getattr(dense, "device", None)
    params: Params = {"weights": xp.ones((r,), dtype=dense.dtype, device=dev),
                      f"factor_{m}": xp.matrix_transpose(xp.reshape(xp.moveaxis(dense, m, -1), (r, shape[m])))}
    for j, n in enumerate(others):
        params[f"factor_{n}"] = xp.take(xp.eye(shape[n], dtype=dense.dtype, device=dev),
                                        xp.asarray(grid[j], device=dev), axis=1)
    return params


register("cp", CP)


class _CPALS(CPALS):
    """:class:`~tucker_peft._decomp.CPALS` on a CP spec's params (λ carries the scale)."""

    def __init__(self, xp: Any, spec: CP, target: Any, scale: float, params: Params) -> None:
        super().__init__(xp, target, params["weights"] * scale, [params[f"factor_{n}"] for n in range(spec.ndim)])
        self.scale = scale

    def sweep(self) -> Params:  # type: ignore[override]
        super().sweep()
        return self.params()

    def params(self) -> Params:
        out = {"weights": self.weights / self.scale}
        out.update({f"factor_{n}": f for n, f in enumerate(self.factors)})
        return out
