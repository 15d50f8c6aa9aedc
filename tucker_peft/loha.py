"""LoHa (FedPara): the Hadamard product of two low-rank matrices."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_rank, check_shape, register
from ._namespace import ArrayContext, namespace
from ._errors import TuckerPeftError

__all__ = ["LoHa"]


@dataclass(frozen=True)
class LoHa(Parametrization):
    """ΔW = s · reshape((W1_a @ W1_b) ⊙ (W2_a @ W2_b), shape), W matricised as ``(I_1, I_2·…·I_N)``.

    Parameters
    ----------
    shape : tuple of int
        Weight shape; a conv kernel ``(out, in/groups, *kernel)`` becomes the
        ``(out, in/groups·Πkernel)`` matrix, as PEFT's LoHa without
        ``use_effective_conv2d``.
    rank : int
        r of each factor pair, in ``[1, min(I_1, I_2·…·I_N)]``; ΔW can reach
        rank r².

    Notes
    -----
    Params, as PEFT's ``hada_*``: ``'w1_a'``, ``'w2_a'`` of shape ``(I_1, r)``
    and ``'w1_b'``, ``'w2_b'`` of shape ``(r, I_2·…·I_N)``.
    ``num_params = 2·r·(I_1 + I_2·…·I_N)``. The ``'zero'`` init is PEFT's:
    ``w2_b = 0``, the others Kaiming-uniform.
    """

    rank: int = None  # type: ignore[assignment]

    kind: ClassVar[str] = "loha"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "svd": "svd", "hosvd": "svd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"svd"})
    principal_init: ClassVar[str | None] = "svd"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (LoHa of shape {shape})", 1,
                                                    min(shape[0], self._k(shape))))

    @staticmethod
    def _k(shape: tuple[int, ...]) -> int:
        return math.prod(shape[1:])

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """``min(r, I_1, I_2·…·I_N)``."""
        if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
            shape = check_shape(shape)
            return min(ranks, shape[0], cls._k(shape))
        return ranks

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        o, r, k = self.shape[0], self.rank, self._k(self.shape)
        return {"w1_a": (o, r), "w1_b": (r, k), "w2_a": (o, r), "w2_b": (r, k)}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        o, rest = self.mode_symbol(0), self.output_subscripts[1:]
        r1, r2 = self.rank_symbol(0), self.rank_symbol(1)
        o_, r, tail = self.shape[0], self.rank, self.shape[1:]
        return (("w1_a", (o_, r), o + r1), ("w1_b", (r, *tail), r1 + rest),
                ("w2_a", (o_, r), o + r2), ("w2_b", (r, *tail), r2 + rest))

    @property
    def zero_block_size(self) -> int:
        """w2_b."""
        return self.rank * self._k(self.shape)

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
                   scale: float, options: dict[str, Any]) -> Params:
        o, r, k = self.shape[0], self.rank, self._k(self.shape)

        def kaiming(shape: tuple[int, int]) -> Any:  # PEFT's kaiming_uniform_(a=√5): U(±1/√fan_in)
            return ctx.asarray(rng.uniform(-1, 1, shape) / math.sqrt(shape[1]))

        if method in ("zero", "random"):
            p = {"w1_a": kaiming((o, r)), "w1_b": kaiming((r, k)), "w2_a": kaiming((o, r))}
            p["w2_b"] = ctx.zeros((r, k)) if method == "zero" else kaiming((r, k))
            return {name: p[name] for name in self.param_shapes}
        # 'svd': W1 = the rank-r truncation (LoRA's PiSSA split), W2 = all ones (rank one, random split).
        from .lora import LoRA

        core_mode = self._core_option(options)
        txp = namespace(tensor)
        lora = LoRA((o, k), r).initialize("svd", ctx, rng, txp.reshape(tensor, (o, k)), scale, {})
        u = rng.standard_normal(r)
        u = u / math.sqrt(float(u @ u))  # (1 uᵀ)(u 1ᵀ) = 1 1ᵀ
        w2_a = ctx.asarray(np.ones((o, 1)) * u[None, :])
        w2_b = ctx.zeros((r, k)) if core_mode == "zero" else ctx.asarray(u[:, None] * np.ones((1, k)))
        return {"w1_a": lora["B"], "w1_b": lora["A"], "w2_a": w2_a, "w2_b": w2_b}

    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """``(W1_a ⊙_row W2_a, s·(W1_b ⊙_col W2_b) as (r², *shape[1:]), None, 1)``: a rank-r² LoRA."""
        if self.ndim < 2:
            return None
        xp = namespace(params["w1_a"])
        o, r = self.shape[0], self.rank
        p_out = xp.reshape(params["w1_a"][:, :, None] * params["w2_a"][:, None, :], (o, r * r))
        s = xp.reshape(params["w1_b"][:, None, :] * (params["w2_b"] * scale)[None, :, :], (r * r, *self.shape[1:]))
        return p_out, s, None, 1

    def peft_state(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[dict[str, Any], dict[str, Any]]:
        """PEFT's LoHa (``use_effective_conv2d=False``): ``hada_w1_a (out, r)``, ``hada_w1_b (r, k)``,
        ``hada_w2_a (out, r)``, ``hada_w2_b (r, k)`` with ``k = Π shape[1:]``; s folded into ``hada_w2_b``
        and ``alpha = r`` (PEFT's scaling alpha/r = 1).
        """
        xp = namespace(params["w1_a"])
        o, r, k = self.shape[0], self.rank, self._k(self.shape)
        tensors = {"hada_w1_a": xp.reshape(params["w1_a"], (o, r)), "hada_w1_b": xp.reshape(params["w1_b"], (r, k)),
                   "hada_w2_a": xp.reshape(params["w2_a"], (o, r)),
                   "hada_w2_b": xp.reshape(params["w2_b"] * scale, (r, k))}
        return tensors, {"peft_type": "LOHA", "r": r, "alpha": r, "use_effective_conv2d": False}

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = LoHa(shape, t)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'loha': {sorted(unknown)}; it takes none")
        shape = check_shape(shape)
        return (lambda t: cls(shape, t)), min(shape[0], cls._k(shape))

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """r in ``1..min(out, in·Πkernel, 6)``."""
        return cls(shape, pick(range(1, min(shape[0], cls._k(tuple(shape)), 6) + 1)))


register("loha", LoHa)
