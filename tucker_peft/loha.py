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
    effective_conv : bool
        PEFT's ``use_effective_conv2d`` (FedPara's Proposition 3) on a conv
        kernel (``N >= 3``, ``Π kernel > 1``; otherwise ignored, as in PEFT):
        each half is a Tucker-2, ``G_h ×_1 A_hᵀ ×_2 B_hᵀ``, so
        ``ΔW = s · (G_1 ×_1 W1_aᵀ ×_2 W1_bᵀ) ⊙ (G_2 ×_1 W2_aᵀ ×_2 W2_bᵀ)``.

    Notes
    -----
    Params, as PEFT's ``hada_*``: ``'w1_a'``, ``'w2_a'`` of shape ``(I_1, r)``
    and ``'w1_b'``, ``'w2_b'`` of shape ``(r, I_2·…·I_N)``.
    ``num_params = 2·r·(I_1 + I_2·…·I_N)``. The ``'zero'`` init is PEFT's:
    ``w2_b = 0``, the others Kaiming-uniform. With ``effective_conv`` on a
    kernel: ``'t1'``, ``'t2'`` of shape ``(r, r, *kernel)``, ``'w1_a'``,
    ``'w2_a'`` of shape ``(r, I_1)`` and ``'w1_b'``, ``'w2_b'`` of shape
    ``(r, I_2)`` (PEFT's layouts); ``num_params = 2·(r²·Πkernel + r·(I_1 + I_2))``.
    """

    rank: int = None  # type: ignore[assignment]
    effective_conv: bool = False

    kind: ClassVar[str] = "loha"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "svd": "svd", "hosvd": "svd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"svd"})
    principal_init: ClassVar[str | None] = "svd"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (LoHa of shape {shape})", 1,
                                                    min(shape[0], self._k(shape))))
        if not isinstance(self.effective_conv, (bool, np.bool_)):
            raise TuckerPeftError(f"effective_conv: expected a bool, got {self.effective_conv!r}")
        object.__setattr__(self, "effective_conv", bool(self.effective_conv))

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
        if self.effective:
            t, i = (r, r, *self.shape[2:]), self.shape[1]
            return {"t1": t, "w1_a": (r, o), "w1_b": (r, i), "t2": t, "w2_a": (r, o), "w2_b": (r, i)}
        return {"w1_a": (o, r), "w1_b": (r, k), "w2_a": (o, r), "w2_b": (r, k)}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        if self.effective:
            return self._effective_terms()
        o, rest = self.mode_symbol(0), self.output_subscripts[1:]
        r1, r2 = self.rank_symbol(0), self.rank_symbol(1)
        o_, r, tail = self.shape[0], self.rank, self.shape[1:]
        return (("w1_a", (o_, r), o + r1), ("w1_b", (r, *tail), r1 + rest),
                ("w2_a", (o_, r), o + r2), ("w2_b", (r, *tail), r2 + rest))

    @property
    def zero_block_size(self) -> int:
        """w2_b."""
        return self.rank * (self.shape[1] if self.effective else self._k(self.shape))

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
                   scale: float, options: dict[str, Any]) -> Params:
        o, r, k = self.shape[0], self.rank, self._k(self.shape)

        def kaiming(shape: tuple[int, ...]) -> Any:  # PEFT's kaiming_uniform_(a=√5): U(±1/√fan_in)
            return ctx.asarray(rng.uniform(-1, 1, shape) / math.sqrt(math.prod(shape[1:])))

        if self.effective:
            return self._effective_init(method, ctx, rng, tensor, scale, options, kaiming)
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
        if self.effective:
            return self._effective_factored(params, scale)
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
        if self.effective:  # PEFT's Conv1d cores are (r, r, k, 1); s folded into hada_w2_b
            t = (r, r, *self.shape[2:], *((1,) if self.ndim == 3 else ()))
            tensors = {"hada_" + n: xp.reshape(v * scale if n == "w2_b" else v, t if n[0] == "t" else v.shape)
                       for n, v in params.items()}
            return tensors, {"peft_type": "LOHA", "r": r, "alpha": r, "use_effective_conv2d": True}
        tensors = {"hada_w1_a": xp.reshape(params["w1_a"], (o, r)), "hada_w1_b": xp.reshape(params["w1_b"], (r, k)),
                   "hada_w2_a": xp.reshape(params["w2_a"], (o, r)),
                   "hada_w2_b": xp.reshape(params["w2_b"] * scale, (r, k))}
        return tensors, {"peft_type": "LOHA", "r": r, "alpha": r, "use_effective_conv2d": self.effective_conv}

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], *, effective_conv: bool = False,
                      **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = LoHa(shape, t, effective_conv)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'loha': {sorted(unknown)}; expected effective_conv=")
        shape = check_shape(shape)
        return (lambda t: cls(shape, t, effective_conv)), min(shape[0], cls._k(shape))

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """r in ``1..min(out, in·Πkernel, 6)``, effective_conv either way."""
        return cls(shape, pick(range(1, min(shape[0], cls._k(tuple(shape)), 6) + 1)), pick([False, True]))

    # -- PEFT's use_effective_conv2d: each half a Tucker-2 of the kernel ---------------------------
    @property
    def effective(self) -> bool:
        """Whether the halves are Tucker-2 (``effective_conv`` on a kernel with ``Π kernel > 1``, as PEFT)."""
        return self.effective_conv and self.ndim >= 3 and math.prod(self.shape[2:]) > 1

    def describe_ranks(self) -> str:
        if not self.effective:
            return str(self.rank)
        return f"{self.rank}, cores " + "x".join(map(str, self.param_shapes["t1"]))

    def _effective_terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        o, i = self.mode_symbol(0), self.mode_symbol(1)
        ks = "".join(self.mode_symbol(n) for n in range(2, self.ndim))
        out: list[tuple[str, tuple[int, ...], str]] = []
        for h in (1, 2):
            a, b = self.rank_symbol(2 * h - 2), self.rank_symbol(2 * h - 1)
            shapes = self.param_shapes
            out += [(f"t{h}", shapes[f"t{h}"], a + b + ks), (f"w{h}_a", shapes[f"w{h}_a"], a + o),
                    (f"w{h}_b", shapes[f"w{h}_b"], b + i)]
        return tuple(out)

    def _effective_init(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any, scale: float,
                        options: dict[str, Any], kaiming: Callable[[tuple[int, ...]], Any]) -> Params:
        o, i, r = self.shape[0], self.shape[1], self.rank
        t = (r, r, *self.shape[2:])
        if method in ("zero", "random"):  # PEFT's reset_adapter_parameters: w2_b = 0, the rest Kaiming
            p = {"w1_a": kaiming((r, o)), "w1_b": kaiming((r, i)), "w2_a": kaiming((r, o))}
            p["w2_b"] = ctx.zeros((r, i)) if method == "zero" else kaiming((r, i))
            p["t1"], p["t2"] = kaiming(t), kaiming(t)
            return {name: p[name] for name in self.param_shapes}
        # 'svd': half 1 = the truncated HOSVD of tensor on the channel modes (Tucker-2), zero-padded to r;
        # half 2 = all ones (u vᵀ cores with unit u, v).
        from .tucker import Tucker2

        core_mode = self._core_option(options)
        xp = ctx.xp
        q = Tucker2(self.shape, r).initialize("hosvd", ctx, rng, tensor, scale, {})

        def pad(x: Any, axis: int) -> Any:
            extra = list(x.shape)
            extra[axis] = r - x.shape[axis]
            return x if extra[axis] == 0 else xp.concat([x, ctx.zeros(tuple(extra))], axis=axis)

        u, v = rng.standard_normal(r), rng.standard_normal(r)
        u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
        t2 = np.broadcast_to((u[:, None] * v[None, :]).reshape(r, r, *(1,) * (self.ndim - 2)), t)
        return {"t1": pad(pad(q["core"], 0), 1), "w1_a": pad(xp.matrix_transpose(q["factor_0"]), 0),
                "w1_b": pad(xp.matrix_transpose(q["factor_1"]), 0), "t2": ctx.asarray(np.ascontiguousarray(t2)),
                "w2_a": ctx.asarray(u[:, None] * np.ones((1, o))),
                "w2_b": ctx.zeros((r, i)) if core_mode == "zero" else ctx.asarray(v[:, None] * np.ones((1, i)))}

    def _effective_factored(self, params: Mapping[str, Any], scale: Any) -> tuple[Any, Any, Any, int]:
        """``P_out (out, r²)``, ``S (r², r², *kernel)``, ``P_in (in, r²)``: a Tucker-2 of ranks (r², r²)."""
        xp = namespace(params["w1_a"])
        o, i, r, kern = self.shape[0], self.shape[1], self.rank, self.shape[2:]

        def rows(a: Any, b: Any, n: int) -> Any:  # (n, r·r): a[i, x]·b[j, x] at (x, i·r + j)
            return xp.reshape(xp.matrix_transpose(a)[:, :, None] * xp.matrix_transpose(b)[:, None, :], (n, r * r))

        s = xp.reshape(xp.reshape(params["t1"], (r, 1, r, 1, *kern)) * xp.reshape(params["t2"], (1, r, 1, r, *kern)),
                       (r * r, r * r, *kern)) * scale
        return rows(params["w1_a"], params["w2_a"], o), s, rows(params["w1_b"], params["w2_b"], i), 1


register("loha", LoHa)
