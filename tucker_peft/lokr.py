"""LoKr: the Kronecker product of a small matrix and a (low-rank) block."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from array_api_compat import device

from ._base import Parametrization, Params, check_rank, check_shape, register
from ._decomp import leading_left_singular
from ._namespace import ArrayContext, namespace
from ._errors import TuckerPeftError, fmt_shape

__all__ = ["LoKr", "factorization"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension`` and ``m <= n``: LoKr's split of one dimension (as PEFT / LyCORIS).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``
    (in that order); otherwise ``m`` is the divisor closest to √dimension
    whose sum ``m + n`` does not grow and, for ``factor > 0``, ``m <= factor``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > m + n or nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class LoKr(Parametrization):
    """ΔW = s · W1 ⊗ W2 (Kronecker), with W2 — and with ``decompose_both`` W1 — low-rank when r is small.

    Parameters
    ----------
    shape : tuple of int
        ``(out, in, *kernel)``, at least 2 modes. ``out = a·b`` and ``in = c·d``
        by :func:`factorization` with ``factor``; then
        ``ΔW[(i,k), (j,l), *p] = W1[i, j] · W2[k, l, *p]`` with ``W1: (a, c)``
        and ``W2: (b, d, *kernel)`` — PEFT's LoKr on Linear and Conv2d
        (``use_effective_conv2d=False``), any number of kernel modes.
    rank : int
        ``r >= 1``. W2 is ``w2_a @ w2_b`` (``(b, r)``, ``(r, d·Πkernel)``)
        when ``r < max(b, d)/2``, else full; W1 likewise with ``max(a, c)``
        when ``decompose_both`` (PEFT's rule).
    factor : int
        -1 (the split closest to √dim) or a preferred factor ``>= 1``.
    decompose_both : bool
    effective_conv : bool
        PEFT's ``use_effective_conv2d``: a low-rank W2 on a kernel with more
        than one tap is a Tucker-2, ``W2 = t2 ×_1 w2_aᵀ ×_2 w2_bᵀ`` with
        ``t2: (r, r, *kernel)``, ``w2_a: (r, b)``, ``w2_b: (r, d)``
        (``r²·Πkernel + r·(b + d)`` parameters); ignored elsewhere, as in PEFT.

    Notes
    -----
    Param names are PEFT's without the ``lokr_`` prefix: ``'w1'`` or
    ``'w1_a'``/``'w1_b'``; ``'w2'`` (shape ``(b, d, *kernel)``) or
    ``'w2_a'``/``'w2_b'``. ``num_params`` = (``a·c`` or ``r·(a+c)``) +
    (``b·d·Πkernel`` or ``r·(b + d·Πkernel)``). The ``'zero'`` init is PEFT's:
    W1 (or ``w1_a``) zero, the rest Kaiming-uniform.
    """

    rank: int = None  # type: ignore[assignment]
    factor: int = -1
    decompose_both: bool = False
    effective_conv: bool = False

    kind: ClassVar[str] = "lokr"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "svd": "svd", "hosvd": "svd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"svd"})
    principal_init: ClassVar[str | None] = "svd"
    lora_note: ClassVar[str] = ""  # lora_factors always exists (rank rank(W1)·rank(W2), see there)
    min_modes: ClassVar[int] = 2

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        if len(shape) < 2:
            raise TuckerPeftError(f"shape: LoKr needs a weight (out, in, *kernel) of at least 2 modes, got {fmt_shape(shape)}")
        object.__setattr__(self, "shape", shape)
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not (f == -1 or f >= 1):
            raise TuckerPeftError(f"factor: expected -1 or an int >= 1, got {f!r}")
        object.__setattr__(self, "factor", int(f))
        if not isinstance(self.decompose_both, (bool, np.bool_)):
            raise TuckerPeftError(f"decompose_both: expected a bool, got {self.decompose_both!r}")
        object.__setattr__(self, "decompose_both", bool(self.decompose_both))
        if not isinstance(self.effective_conv, (bool, np.bool_)):
            raise TuckerPeftError(f"effective_conv: expected a bool, got {self.effective_conv!r}")
        object.__setattr__(self, "effective_conv", bool(self.effective_conv))
        object.__setattr__(self, "rank", check_rank(self.rank, f"rank (LoKr of shape {shape})", 1, 2**62))

    # -- structure -----------------------------------------------------------
    @staticmethod
    def _blocks(shape: tuple[int, ...], factor: int) -> tuple[int, int, int, int]:
        a, b = factorization(shape[0], factor)
        c, d = factorization(shape[1], factor)
        return a, b, c, d

    @cached_property
    def blocks(self) -> tuple[int, int, int, int]:
        """``(a, b, c, d)``: W1 is ``a × c``, W2 is ``b × d (× kernel)``."""
        return self._blocks(self.shape, self.factor)

    @property
    def full_w1(self) -> bool:
        a, _, c, _ = self.blocks
        return not (self.decompose_both and self.rank < max(a, c) / 2)

    @property
    def full_w2(self) -> bool:
        _, b, _, d = self.blocks
        return not self.rank < max(b, d) / 2

    @classmethod
    def _full_rank(cls, shape: tuple[int, ...], factor: int, both: bool) -> int:
        """The smallest rank at which every block is full (larger ranks change nothing)."""
        a, b, c, d = cls._blocks(shape, factor)
        return max(math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if both else 1, 1)

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any, factor: int = -1, decompose_both: bool = False) -> Any:
        """``min(r, the rank at which W1 and W2 are full)``."""
        if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
            shape = check_shape(shape)
            if len(shape) >= 2:
                return min(ranks, cls._full_rank(shape, factor, decompose_both))
        return ranks

    @classmethod
    def for_ranks(cls, shape: Sequence[int], ranks: Any, **options: Any) -> "Parametrization":
        shape = check_shape(shape)
        return cls(shape, cls.clip(shape, ranks, options.get("factor", -1), options.get("decompose_both", False)),
                   **options)

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        a, b, c, d = self.blocks
        kernel, r = self.shape[2:], self.rank
        out: dict[str, tuple[int, ...]] = {"w1": (a, c)} if self.full_w1 else {"w1_a": (a, r), "w1_b": (r, c)}
        if self.full_w2:
            out["w2"] = (b, d, *kernel)
        elif self.effective:  # PEFT's layouts
            out.update({"w2_a": (r, b), "w2_b": (r, d), "t2": (r, r, *kernel)})
        else:
            out.update({"w2_a": (b, r), "w2_b": (r, d * math.prod(kernel))})
        return out

    @property
    def split_shape(self) -> tuple[tuple[int, ...], ...]:
        a, b, c, d = self.blocks
        return ((a, b), (c, d)) + tuple((k,) for k in self.shape[2:])

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        a, b, c, d = self.blocks
        kernel, r = self.shape[2:], self.rank
        sa, sb, sc, sd = (self.mode_symbol(0, 0), self.mode_symbol(0, 1), self.mode_symbol(1, 0), self.mode_symbol(1, 1))
        sk = "".join(self.mode_symbol(n) for n in range(2, self.ndim))
        r1, r2 = self.rank_symbol(0), self.rank_symbol(1)
        if self.full_w1:
            out = [("w1", (a, c), sa + sc)]
        else:
            out = [("w1_a", (a, r), sa + r1), ("w1_b", (r, c), r1 + sc)]
        if self.full_w2:
            out.append(("w2", (b, d, *kernel), sb + sd + sk))
        elif self.effective:
            r3 = self.rank_symbol(2)
            out += [("w2_a", (r, b), r2 + sb), ("w2_b", (r, d), r3 + sd), ("t2", (r, r, *kernel), r2 + r3 + sk)]
        else:
            out += [("w2_a", (b, r), sb + r2), ("w2_b", (r, d, *kernel), r2 + sd + sk)]
        return tuple(out)

    @property
    def zero_block_size(self) -> int:
        """W1 (or ``w1_a``)."""
        a, _, c, _ = self.blocks
        return a * c if self.full_w1 else a * self.rank

    def describe_ranks(self) -> str:
        a, b, c, d = self.blocks
        w1 = f"{a}x{c}" if self.full_w1 else f"{a}x{c}@r{self.rank}"
        w2 = "x".join(map(str, (b, d, *self.shape[2:]))) + ("" if self.full_w2 else f"@r{self.rank}")
        w2 += " tucker2" if self.effective else ""
        return f"{w1} kron {w2}"

    def peft_state(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[dict[str, Any], dict[str, Any]]:
        """PEFT's LoKr (``use_effective_conv2d=False``): ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and
        ``lokr_w2 (b, d, *kernel)`` or ``lokr_w2_a (b, r)``/``lokr_w2_b (r, d·Πkernel)``, by PEFT's rule on
        the same r; s folded into W1's first factor and ``alpha = r`` (PEFT's scaling alpha/r = 1).

        Raises
        ------
        TuckerPeftError
            For a 3-D weight (Conv1d) with a full W2: PEFT's ``torch.kron`` of
            ``(a, c)`` and ``(b, d, k)`` lays ΔW out as ``(b, a·d, c·k)``, not
            as this kind's ``(a·b, c·d, k)``; and with ``effective_conv``,
            whose PEFT layer fails in ``torch.kron`` (peft 0.21).
        """
        if self.ndim == 3 and self.full_w2:
            raise TuckerPeftError(f"LoKr of shape {fmt_shape(self.shape)} (rank {self.rank}) has a full 3-D W2, which "
                                  "PEFT's Conv1d LoKr lays out differently (torch.kron of (a, c) and (b, d, k) is "
                                  "(b, a·d, c·k)); a rank below max(b, d)/2 exports exactly")
        if self.effective and self.ndim == 3:
            raise TuckerPeftError(f"LoKr of shape {fmt_shape(self.shape)} (rank {self.rank}) with effective_conv on a "
                                  "Conv1d: PEFT 0.21's own Conv1d LoKr with use_effective_conv2d fails in torch.kron "
                                  "(its lokr_t2 is (r, r, k, 1)); use effective_conv=False there, or save_adapter")
        xp = namespace(next(iter(params.values())))
        first = "w1" if self.full_w1 else "w1_a"
        tensors = {"lokr_" + name: (v * scale if name == first else v) for name, v in params.items()}
        if not self.full_w2 and not self.effective:
            d = self.blocks[3]
            tensors["lokr_w2_b"] = xp.reshape(tensors["lokr_w2_b"], (self.rank, d * math.prod(self.shape[2:])))
        return tensors, {"peft_type": "LOKR", "r": self.rank, "alpha": self.rank, "decompose_both": self.decompose_both,
                         "decompose_factor": self.factor, "use_effective_conv2d": self.effective_conv}

    # -- init ------------------------------------------------------------------
    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
                   scale: float, options: dict[str, Any]) -> Params:
        a, b, c, d = self.blocks
        kernel = self.shape[2:]
        kk = math.prod(kernel)

        def kaiming(shape: tuple[int, ...], fan_in: int) -> Any:  # PEFT's kaiming_uniform_(a=√5)
            return ctx.asarray(rng.uniform(-1, 1, shape) / math.sqrt(fan_in))

        if method in ("zero", "random"):
            p: Params = {}
            for name, shp in self.param_shapes.items():
                fan = math.prod(shp[1:])
                zero = method == "zero" and name in ("w1", "w1_a")
                p[name] = ctx.zeros(shp) if zero else kaiming(shp, fan)
            return p
        # 'svd': the nearest Kronecker product (Van Loan–Pitsianis), then each block truncated to rank r.
        core_mode = self._core_option(options)
        xp = namespace(tensor)
        t = xp.astype(tensor, xp.float64)
        t = xp.reshape(t, (a, b, c, d, kk))
        m = xp.reshape(xp.permute_dims(t, (0, 2, 1, 3, 4)), (a * c, b * d * kk))
        u, _ = leading_left_singular(xp, m, 0, 1)
        v = xp.matmul(xp.matrix_transpose(u), m)  # σ·vᵀ, (1, b·d·K)
        w1 = xp.reshape(u, (a, c)) / scale
        w2 = xp.reshape(v, (b, d * kk))
        p = {}
        if self.full_w1:
            p["w1"] = w1
        else:
            p["w1_a"], p["w1_b"] = self._truncate(xp, w1, self.rank)
        if self.full_w2:
            p["w2"] = xp.reshape(w2, (b, d, *kernel))
        elif self.effective:
            p.update(self._effective_w2(xp, xp.reshape(w2, (b, d, *kernel))))
        else:
            p["w2_a"], p["w2_b"] = self._truncate(xp, w2, self.rank)
        if core_mode == "zero":
            first = "w1" if self.full_w1 else "w1_a"
            p[first] = p[first] * 0
        return {k: self._cast(ctx, v) for k, v in p.items()}

    @staticmethod
    def _truncate(xp: Any, w: Any, r: int) -> tuple[Any, Any]:
        """``(U_r, U_rᵀ w)``: the rank-r truncation of a matrix as two factors."""
        rr = min(r, w.shape[0])
        u, _ = leading_left_singular(xp, w, 0, rr)
        f = xp.matmul(xp.matrix_transpose(u), w)
        if rr < r:  # r above the block's side: the spare columns stay zero
            dev = device(u)
            u = xp.concat([u, xp.zeros((u.shape[0], r - rr), dtype=u.dtype, device=dev)], axis=1)
            f = xp.concat([f, xp.zeros((r - rr, f.shape[1]), dtype=f.dtype, device=dev)], axis=0)
        return u, f

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], *, factor: int = -1, decompose_both: bool = False,
                      effective_conv: bool = False, **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """The ranks ``1..`` (the rank at which all blocks are full), ordered by ``num_params``.

        Under PEFT's rule a low-rank block can cost more than the full one
        just below the switch, so the family is sorted rather than indexed by r.
        """
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'lokr': {sorted(unknown)}; "
                                  "expected factor=, decompose_both=, effective_conv=")
        shape = check_shape(shape)
        specs = [cls(shape, r, factor, decompose_both, effective_conv) for r in range(1, cls._full_rank(shape, factor, decompose_both) + 1)]
        specs.sort(key=lambda s: (s.num_params, s.rank))
        return (lambda t: specs[t - 1]), len(specs)

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """rank ``1..4`` (full and low-rank blocks), factor -1 or 2, decompose_both and effective_conv either way."""
        return cls(shape, pick(range(1, 5)), pick([-1, 2]), pick([False, True]), pick([False, True]))

    def lora_factors(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any]:
        """Exact ``(B, A)``: ``kron(U1, U2) @ kron(V1, V2)`` with ``W1 = U1 V1`` and ``W2 = U2 V2`` unfolded.

        ΔW unfolded to ``(a·b, c·d·Πkernel)`` is ``kron(W1, W2 as (b, d·Πkernel))``,
        so its rank is at most ``r1·r2``: each factor's rank (``rank``) when
        low-rank, ``min`` of its sides when full. That is far more than the
        LoKr's own parameter count suggests; exporting to PEFT's LoKr format
        (:meth:`peft_state`) stays the compact way, and this one also holds a
        difference such as an ``init='hosvd'`` adapter's ``f(params) - f(start)``.

        Returns
        -------
        B : array of shape (out, r1·r2)
        A : array of shape (r1·r2, Π shape[1:]), holding ``scale``
        """
        xp = namespace(next(iter(params.values())))
        a, b, c, d = self.blocks
        dk = d * math.prod(self.shape[2:])

        def pair(full: Any, low: tuple[str, str], rows: int, cols: int) -> tuple[Any, Any]:
            if full is None:
                return params[low[0]], xp.reshape(params[low[1]], (-1, cols))
            w = xp.reshape(full, (rows, cols))
            eye = xp.eye(min(rows, cols), dtype=w.dtype, device=device(w))
            return (eye, w) if rows <= cols else (w, eye)

        def kron(x: Any, y: Any) -> Any:
            (m, n), (p, q) = x.shape, y.shape
            return xp.reshape(xp.reshape(x, (m, 1, n, 1)) * xp.reshape(y, (1, p, 1, q)), (m * p, n * q))

        u1, v1 = pair(params.get("w1"), ("w1_a", "w1_b"), a, c)
        if self.effective:  # W2[k, (l, p)] = Σ_i w2_a[i, k] · (Σ_j t2[i, j, p] w2_b[j, l])
            tb = xp.tensordot(params["t2"], params["w2_b"], axes=([1], [0]))  # (r, *kernel, d)
            u2 = xp.matrix_transpose(params["w2_a"])
            v2 = xp.reshape(xp.permute_dims(tb, (0, tb.ndim - 1, *range(1, tb.ndim - 1))), (self.rank, dk))
        else:
            u2, v2 = pair(params.get("w2"), ("w2_a", "w2_b"), b, dk)
        return kron(u1, u2), kron(v1, v2) * scale

    # -- PEFT's use_effective_conv2d: a low-rank W2 on a kernel as a Tucker-2 ----------------------
    @property
    def effective(self) -> bool:
        """Whether W2 is a Tucker-2 (``effective_conv``, W2 low-rank, ``Π kernel > 1``: PEFT's rule)."""
        return self.effective_conv and not self.full_w2 and self.ndim >= 3 and math.prod(self.shape[2:]) > 1

    def _effective_w2(self, xp: Any, w2: Any) -> Params:
        """The truncated HOSVD of W2 ``(b, d, *kernel)`` on its channel modes, zero-padded to rank r."""
        from ._decomp import hosvd

        r, nk = self.rank, self.ndim - 2
        core, (ub, ud, *_) = hosvd(w2, (min(r, w2.shape[0]), min(r, w2.shape[1]), *(None,) * nk))

        def pad(x: Any, axis: int) -> Any:
            extra = list(x.shape)
            extra[axis] = r - x.shape[axis]
            if extra[axis] == 0:
                return x
            return xp.concat([x, xp.zeros(tuple(extra), dtype=x.dtype, device=device(x))], axis=axis)

        return {"w2_a": pad(xp.matrix_transpose(ub), 0), "w2_b": pad(xp.matrix_transpose(ud), 0),
                "t2": pad(pad(core, 0), 1)}


register("lokr", LoKr)
