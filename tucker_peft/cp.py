"""CP (CANDECOMP/PARAFAC) parametrisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from ._base import Parametrization, Params, check_rank, check_shape, register
from ._decomp import parafac
from ._dispatch import ArrayContext
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
    def budget_family(cls, shape: tuple[int, ...], **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = CP(shape, t)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'cp': {sorted(unknown)}; it takes none")
        shape = check_shape(shape)
        return (lambda t: cls(shape, t)), max_cp_rank(shape)


register("cp", CP)
