"""CP (CANDECOMP/PARAFAC) parametrisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_rank, check_shape, register
from ._decomp import parafac
from ._dispatch import ArrayContext, namespace
from ._errors import TuckerPeftError

__all__ = ["CP"]


def max_cp_rank(shape: tuple[int, ...]) -> int:
    """Largest useful CP rank: every tensor has rank ≤ Π I_n / max I_n."""
    return max(1, math.prod(shape) // max(shape))


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

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (CP of shape {shape})", 1, max_cp_rank(shape)))

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        out: dict[str, tuple[int, ...]] = {"weights": (self.rank,)}
        out.update({f"factor_{n}": (d, self.rank) for n, d in enumerate(self.shape)})
        return out

    def _terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        r = self._rank(0)
        return (("weights", (self.rank,), r),) + tuple(
            (f"factor_{n}", (d, self.rank), self._mode(n) + r) for n, d in enumerate(self.shape)
        )

    def _init(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
              scale: float, options: dict[str, Any]) -> Params:
        if method in ("zero", "random"):
            w = np.zeros(self.rank) if method == "zero" else rng.standard_normal(self.rank)
            params: Params = {"weights": ctx.asarray(w)}
            for n, d in enumerate(self.shape):
                params[f"factor_{n}"] = ctx.asarray(rng.uniform(-1, 1, (d, self.rank)) / math.sqrt(d))
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
