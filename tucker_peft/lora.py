"""Flattened LoRA: the matrix baseline applied to the mode-0 unfolding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_rank, check_shape, register
from ._decomp import leading_left_singular, sym_pinv as _sym_pinv
from ._namespace import ArrayContext, namespace
from ._errors import TuckerPeftError

__all__ = ["LoRA"]


@dataclass(frozen=True)
class LoRA(Parametrization):
    """ΔW = s · reshape(B @ A, shape), W matricised as ``(I_1, I_2·…·I_N)``.

    Parameters
    ----------
    shape : tuple of int
        Weight shape; a conv kernel ``(out, in/groups, *kernel)`` becomes the
        ``(out, in/groups·Πkernel)`` matrix PEFT uses.
    rank : int
        In ``[1, min(I_1, I_2·…·I_N)]``.

    Notes
    -----
    Params: ``'B'`` of shape ``(I_1, r)`` and ``'A'`` of shape
    ``(r, I_2·…·I_N)``, as PEFT's ``lora_B`` and ``lora_A``.
    ``num_params = r · (I_1 + I_2·…·I_N)``.
    """

    rank: int = None  # type: ignore[assignment]

    kind: ClassVar[str] = "lora"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "svd": "svd", "hosvd": "svd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"svd"})
    principal_init: ClassVar[str | None] = "svd"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (LoRA of shape {shape})", 1, min(shape[0], self._k(shape))))

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """``min(r, I_1, I_2·…·I_N)``."""
        if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
            shape = check_shape(shape)
            return min(ranks, shape[0], cls._k(shape))
        return ranks

    @property
    def zero_block_size(self) -> int:
        """B."""
        return self.shape[0] * self.rank

    def als_solver(self, target: Any, scale: float, params: Mapping[str, Any]) -> Any:
        """Sweeps solving B, then A, by least squares."""
        return _LoRAALS(namespace(target), self, target, scale, dict(params))

    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """``(B, s·A as (r, *shape[1:]), None, 1)``."""
        if self.ndim < 2:
            return None
        xp = namespace(params["A"])
        return params["B"], xp.reshape(params["A"] * scale, (self.rank, *self.shape[1:])), None, 1

    def lora_factors(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any] | None:
        """``(B, s·A)``, itself."""
        return params["B"], params["A"] * scale

    @staticmethod
    def _k(shape: tuple[int, ...]) -> int:
        return math.prod(shape[1:])

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        return {"B": (self.shape[0], self.rank), "A": (self.rank, self._k(self.shape))}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        r = self._rank(0)
        return (("B", (self.shape[0], self.rank), self._mode(0) + r),
                ("A", (self.rank, *self.shape[1:]), r + self._out[1:]))

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
              scale: float, options: dict[str, Any]) -> Params:
        k = self._k(self.shape)
        if method == "zero":
            # As PEFT: B = 0, A ~ Kaiming-uniform U(±1/√fan_in).
            return {"B": ctx.zeros((self.shape[0], self.rank)),
                    "A": ctx.asarray(rng.uniform(-1, 1, (self.rank, k)) / math.sqrt(k))}
        if method == "random":
            return {"B": ctx.asarray(rng.standard_normal((self.shape[0], self.rank)) / math.sqrt(self.rank)),
                    "A": ctx.asarray(rng.uniform(-1, 1, (self.rank, k)) / math.sqrt(k))}
        core_mode = self._core_option(options)
        txp = namespace(tensor)
        m = txp.reshape(tensor, (self.shape[0], k))
        # Leading left singular vectors from the small Gram matrix, then
        # SVᵀ = Uᵀ M: no SVD of the wide unfolding.
        u, _ = leading_left_singular(txp, m, 0, self.rank)
        sv = txp.matmul(txp.matrix_transpose(u), m)
        sigma = txp.sqrt(txp.sum(sv * sv, axis=1))
        ones = txp.ones_like(sigma)
        if core_mode == "zero":  # B = 0, A = Vᵀ (rows of a zero singular value stay zero)
            return {"B": ctx.zeros((self.shape[0], self.rank)),
                    "A": self._cast(ctx, sv / txp.where(sigma > 0, sigma, ones)[:, None])}
        # PiSSA split: B = ±U·√(S/|s|), A = √(S/|s|)·Vᵀ = SVᵀ/√(S·|s|); s·B@A is the rank-r truncation.
        root = txp.sqrt(sigma / abs(scale))
        denom = txp.sqrt(sigma * abs(scale))
        return {"B": self._cast(ctx, u * (root * (1.0 if scale > 0 else -1.0))),
                "A": self._cast(ctx, sv / txp.where(denom > 0, denom, ones)[:, None])}

    @classmethod
    def concat(cls, specs: Sequence["LoRA"], params_list: Sequence[Mapping[str, Any]],
               weights: Sequence[float]) -> tuple["LoRA", Params]:
        """One LoRA with ``reconstruct = Σ_i weights[i] · specs[i].reconstruct(params_list[i])``: ranks concatenated.

        Returns
        -------
        spec : LoRA
            Rank ``Σ_i r_i``; past ``min(I_1, I_2·…·I_N)`` the sum ``Σ w_i B_i A_i``
            is kept at that rank with an identity factor.
        params : dict
            ``'B'`` ``(I_1, r)`` (each block times its weight) and ``'A'`` ``(r, I_2·…·I_N)``.
        """
        shape = specs[0].shape
        out, k = shape[0], cls._k(shape)
        xp = namespace(*[p["B"] for p in params_list])
        b = xp.concat([p["B"] * w for p, w in zip(params_list, weights)], axis=1)
        a = xp.concat([p["A"] for p in params_list], axis=0)
        r = b.shape[1]
        if r > min(out, k):
            m = xp.matmul(b, a)
            eye = xp.eye(min(out, k), dtype=m.dtype, device=getattr(m, "device", None))
            b, a, r = (eye, m, out) if out <= k else (m, eye, k)
        return cls(shape, r), {"B": b, "A": a}

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = LoRA(shape, t)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'lora': {sorted(unknown)}; it takes none")
        shape = check_shape(shape)
        return (lambda t: cls(shape, t)), min(shape[0], cls._k(shape))

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """r in ``1..min(out, in·Πkernel, 6)``."""
        return cls(shape, pick(range(1, min(shape[0], cls._k(tuple(shape)), 6) + 1)))


register("lora", LoRA)


class _LoRAALS:
    """Alternating least squares for ``s·B@A ≈ T`` on the mode-0 unfolding."""

    def __init__(self, xp: Any, spec: LoRA, target: Any, scale: float, params: Params) -> None:
        self.xp, self.scale = xp, scale
        self.t2 = xp.reshape(target, (spec.shape[0], -1))
        self.b, self.a = params["B"], params["A"]

    def sweep(self) -> Params:
        xp, s, t2 = self.xp, self.scale, self.t2
        at = xp.matrix_transpose(self.a)
        self.b = xp.matmul(xp.matmul(t2, at), _sym_pinv(xp, xp.matmul(self.a, at))) / s
        bt = xp.matrix_transpose(self.b)
        self.a = xp.matmul(_sym_pinv(xp, xp.matmul(bt, self.b)), xp.matmul(bt, t2)) / s
        return {"B": self.b, "A": self.a}
