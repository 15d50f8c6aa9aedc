"""Tensor train (TT / MPS) of ΔW, optionally of a tensorised ΔW (TT-LoRA, LoRETTA)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_int, check_rank, check_shape, register
from ._decomp import leading_left_singular
from ._namespace import ArrayContext, namespace
from ._planner import contract
from ._errors import RankError, TuckerPeftError, fmt_shape
from ._slice import fine_digits

__all__ = ["TT", "balanced_factors"]

#: Target size of a factor under ``tensorize='auto'``.
AUTO_FACTOR = 8


@functools.lru_cache(maxsize=1024)
def _best_split(d: int, k: int) -> tuple[int, ...] | None:
    """``k`` factors (each >= 2) of ``d`` with the smallest largest factor, ascending; None if impossible."""
    if k == 1:
        return (d,) if d >= 2 else None
    best: tuple[int, ...] | None = None
    for f in range(2, math.isqrt(d) + 1):
        if d % f:
            continue
        rest = _best_split(d // f, k - 1)
        if rest is None or rest[0] < f:
            continue
        cand = (f, *rest)
        if best is None or max(cand) < max(best):
            best = cand
    return best


def balanced_factors(d: int, target: int = AUTO_FACTOR) -> tuple[int, ...]:
    """Split ``d`` into about ``log_target(d)`` factors as equal as possible (ascending).

    >>> balanced_factors(768)
    (8, 8, 12)
    >>> balanced_factors(7)
    (7,)
    """
    k = max(1, round(math.log(d) / math.log(target))) if d > 1 else 1
    for kk in range(k, 0, -1):
        split = _best_split(d, kk)
        if split is not None:
            return split
    return (d,)


def _normalize_tensorize(shape: tuple[int, ...], tensorize: Any) -> tuple[tuple[int, ...], ...] | None:
    """Per-mode factors, or None when no mode is split."""
    if tensorize is None:
        return None
    if isinstance(tensorize, str):
        if tensorize != "auto":
            raise TuckerPeftError(f"tensorize: expected None, 'auto', {{mode: factors}} or one factor tuple per mode, "
                                  f"got {tensorize!r}")
        split = tuple(balanced_factors(d) for d in shape)
    elif isinstance(tensorize, Mapping):
        split_l = [(d,) for d in shape]
        for n, fs in tensorize.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not -len(shape) <= n < len(shape):
                raise TuckerPeftError(f"tensorize: expected mode indices in [0, {len(shape)}) of shape "
                                      f"{fmt_shape(shape)}, got {n!r}")
            split_l[int(n) % len(shape)] = _factors(shape, int(n) % len(shape), fs)
        split = tuple(split_l)
    elif isinstance(tensorize, Sequence) and len(tensorize) == len(shape):
        split = tuple(_factors(shape, n, fs) for n, fs in enumerate(tensorize))
    else:
        raise TuckerPeftError(f"tensorize: expected None, 'auto', {{mode: factors}} or {len(shape)} factor tuples "
                              f"(one per mode of {fmt_shape(shape)}), got {tensorize!r}")
    return None if all(len(fs) == 1 for fs in split) else split


def _factors(shape: tuple[int, ...], n: int, fs: Any) -> tuple[int, ...]:
    if isinstance(fs, (int, np.integer)) and not isinstance(fs, bool):
        fs = (fs,)
    if isinstance(fs, str) or not isinstance(fs, Sequence) or not fs:
        raise TuckerPeftError(f"tensorize[{n}]: expected a non-empty tuple of ints, got {fs!r}")
    out = tuple(check_int(f, f"tensorize[{n}]", 1) for f in fs)
    if math.prod(out) != shape[n]:
        raise TuckerPeftError(f"tensorize[{n}]: factors {out} multiply to {math.prod(out)}, expected mode {n}'s "
                              f"size {shape[n]}")
    return out


def _max_bonds(fine: tuple[int, ...]) -> tuple[int, ...]:
    """Bond k (between cores k and k+1) is at most min(Π fine[:k+1], Π fine[k+1:])."""
    return tuple(min(math.prod(fine[: k + 1]), math.prod(fine[k + 1:])) for k in range(len(fine) - 1))


@dataclass(frozen=True)
class TT(Parametrization):
    """ΔW = s · reshape(G_1 ×¹ G_2 ×¹ … ×¹ G_M, shape): a tensor train over the (split) modes.

    Parameters
    ----------
    shape : tuple of int
        Weight shape ``(I_1, ..., I_N)``.
    ranks : int or sequence of int
        The ``M − 1`` bond ranks, M the number of cores (one per mode, or per
        factor under ``tensorize``). An int is broadcast and clipped per bond
        to ``min(Π m_≤k, Π m_>k)``; explicit bonds must lie in ``[1, that]``
        and satisfy ``r_k <= r_{k-1}·m_k`` and ``r_k <= m_{k+1}·r_{k+1}``.
    tensorize : None, 'auto', dict or sequence, optional
        Splits modes into factors (C order): ``{0: (8, 12, 8), 1: (8, 12, 8)}``
        makes a (768, 768) weight a 6-core train; ``'auto'`` splits every mode
        into factors of about 8 (:func:`balanced_factors`).

    Notes
    -----
    Params: ``'core_k'`` of shape ``(r_{k-1}, m_k, r_k)`` with
    ``r_0 = r_M = 1``. ``num_params = Σ_k r_{k-1}·m_k·r_k``. The ``'zero'``
    init makes every core but the last left-orthonormal and the last zero.
    """

    ranks: tuple[int, ...] = None  # type: ignore[assignment]
    tensorize: Any = None

    kind: ClassVar[str] = "tt"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "ttsvd": "ttsvd",
                                                 "svd": "ttsvd", "hosvd": "ttsvd"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"ttsvd"})
    principal_init: ClassVar[str | None] = "ttsvd"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        split = _normalize_tensorize(shape, self.tensorize)
        object.__setattr__(self, "tensorize", split)
        fine = tuple(f for fs in (split or tuple((d,) for d in shape)) for f in fs)
        object.__setattr__(self, "ranks", self._normalize_ranks(fine, self.ranks))

    @staticmethod
    def _normalize_ranks(fine: tuple[int, ...], ranks: Any) -> tuple[int, ...]:
        top = _max_bonds(fine)
        nb = len(top)
        if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
            r = check_rank(ranks, "ranks", 1, 2**62)
            return tuple(min(r, t) for t in top)
        if isinstance(ranks, str) or not isinstance(ranks, Sequence):
            raise RankError(f"ranks: expected an int or {nb} bond ranks for the cores {fine}, got {ranks!r}")
        if len(ranks) != nb:
            raise RankError(f"ranks: expected {nb} bond ranks (cores {fine}), got {len(ranks)}: {tuple(ranks)!r}")
        out = tuple(check_rank(r, f"ranks[{k}] (bond between cores of sizes {fine[k]} and {fine[k + 1]})", 1, top[k])
                    for k, r in enumerate(ranks))
        full = (1, *out, 1)
        for k in range(nb):
            lo, hi = full[k] * fine[k], fine[k + 1] * full[k + 2]
            if out[k] > lo or out[k] > hi:
                raise RankError(f"ranks[{k}]={out[k]}: expected at most r_{{k-1}}·m_k = {lo} and m_{{k+1}}·r_{{k+1}} = {hi} "
                                f"(a larger bond adds parameters but nothing ΔW can reach), got ranks {out}")
        return out

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any, tensorize: Any = None) -> Any:
        """An int stays (clipped per bond by the constructor); bond tuples become ``min(r_k, max bond)``."""
        if isinstance(ranks, Sequence) and not isinstance(ranks, str):
            shape = check_shape(shape)
            split = _normalize_tensorize(shape, tensorize) or tuple((d,) for d in shape)
            top = _max_bonds(tuple(f for fs in split for f in fs))
            if len(ranks) == len(top):
                return tuple(r if isinstance(r, bool) or not isinstance(r, (int, np.integer)) else min(r, t)
                             for r, t in zip(ranks, top))
        return ranks

    @classmethod
    def for_ranks(cls, shape: Sequence[int], ranks: Any, **options: Any) -> "Parametrization":
        shape = check_shape(shape)
        return cls(shape, cls.clip(shape, ranks, options.get("tensorize")), **options)

    @property
    def split_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.tensorize if self.tensorize is not None else tuple((d,) for d in self.shape)

    @cached_property
    def cores(self) -> tuple[int, ...]:
        """The core sizes m_1..m_M."""
        return self._fine

    @cached_property
    def _bonds(self) -> tuple[int, ...]:
        return (1, *self.ranks, 1)

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        b = self._bonds
        return {f"core_{k}": (b[k], m, b[k + 1]) for k, m in enumerate(self.cores)}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        b, last = self._bonds, len(self.cores) - 1
        out = []
        for k, m in enumerate(self.cores):
            view, sub = [m], self.output_subscripts[k]
            if k > 0:
                view.insert(0, b[k])
                sub = self.rank_symbol(k - 1) + sub
            if k < last:
                view.append(b[k + 1])
                sub += self.rank_symbol(k)
            out.append((f"core_{k}", tuple(view), sub))
        return tuple(out)

    @property
    def zero_block_size(self) -> int:
        """The last core."""
        return math.prod(self.param_shapes[f"core_{len(self.cores) - 1}"])

    def matched_scale(self, lead: int = 0) -> float:
        return self.orthonormal_matched_scale(lead)

    def member(self, lead: int) -> Parametrization:
        """The train of the trailing cores with their bonds (``TT(shape[lead:], ranks[h:])``, h leading cores).

        The generic slice where those bonds are past what the member's shape
        allows (a bond the leading cores could fill but the member cannot).
        """
        lead = check_int(lead, "lead", 0, self.ndim - 1)
        return self.memo(("member", lead), lambda: _tt_member(self, lead)) if lead else self

    def slice(self, params: Mapping[str, Any], index: Sequence[int]) -> Params:
        """The leading cores at their indices, contracted into a bond vector folded into the first trailing core.

        A split leading mode fixes one index per factor (C order). Cost
        ``O(Σ_k r_k² + r·m·r)`` for the leading cores and the first trailing one.
        """
        index = self.check_index(index)
        if not index or not isinstance(self.member(len(index)), TT):
            return super().slice(params, index)
        xp = self.check_params(params)
        h = self._fine_start[len(index)]
        digits = fine_digits(self, index)
        v = params["core_0"][0, digits[0], :]  # (r_1,): the bond vector, one matrix-vector product per core
        for k in range(1, h):
            v = xp.matmul(v, params[f"core_{k}"][:, digits[k], :])
        first = params[f"core_{h}"]
        _, m, r = first.shape
        out: Params = {"core_0": xp.reshape(xp.matmul(v, xp.reshape(first, (v.shape[0], m * r))), (1, m, r))}
        out.update({f"core_{k - h}": params[f"core_{k}"] for k in range(h + 1, len(self.cores))})
        return out

    def describe_ranks(self) -> str:
        bonds = ",".join(map(str, self.ranks)) or "-"
        if self.tensorize is None:
            return bonds
        return bonds + " on " + "x".join(map(str, self.cores))

    # -- init ------------------------------------------------------------------
    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
                   scale: float, options: dict[str, Any]) -> Params:
        shapes = list(self.param_shapes.items())
        if method == "random":
            return {k: ctx.asarray(rng.standard_normal(s) / math.sqrt(s[0] * s[1])) for k, s in shapes}
        if method == "zero":
            options.pop("orthonormal", None)  # always: every core but the last is left-orthonormal
            p: Params = {}
            for k, s in shapes[:-1]:
                rows, cols = s[0] * s[1], s[2]
                g = rng.standard_normal((rows, cols))
                q = np.linalg.qr(g)[0] if rows >= cols else np.linalg.qr(g.T)[0].T
                p[k] = ctx.asarray(q.reshape(s))
            k, s = shapes[-1]
            p[k] = ctx.zeros(s)
            return p
        return self._ttsvd(ctx, tensor, scale, self._core_option(options))

    def _ttsvd(self, ctx: ArrayContext, tensor: Any, scale: float, core_mode: str) -> Params:
        """Sequential TT-SVD: each core from the leading left singular vectors of a (r·m, rest) unfolding.

        The vectors come from :func:`~tucker_peft._decomp.leading_left_singular`
        (an eigenproblem of the smaller Gram side), never an SVD of a wide
        unfolding. Exact at full bond ranks.
        """
        xp = namespace(tensor)
        c = xp.astype(tensor, xp.float64)
        p: Params = {}
        b, cores = self._bonds, self.cores
        rest = math.prod(cores)
        for k, m in enumerate(cores[:-1]):
            rest //= m
            mat = xp.reshape(c, (b[k] * m, rest))
            u, _ = leading_left_singular(xp, mat, 0, b[k + 1])
            p[f"core_{k}"] = xp.reshape(u, (b[k], m, b[k + 1]))
            c = xp.matmul(xp.matrix_transpose(u), mat)
        last = len(cores) - 1
        tail = xp.reshape(c, (b[last], cores[last], 1)) / scale
        p[f"core_{last}"] = tail * 0 if core_mode == "zero" else tail
        return {k: self._cast(ctx, v) for k, v in p.items()}

    # -- three-stage form --------------------------------------------------------
    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """``(cores of mode 0 contracted: (I_1, r), s·(the other cores) as (r, *shape[1:]), None, 1)``."""
        if self.ndim < 2:
            return None
        xp = namespace(params["core_0"])
        h = len(self.split_shape[0])
        terms = self.terms()
        left = terms[:h]
        bond = self.rank_symbol(h - 1)
        eq_l = ",".join(s for _, _, s in left) + "->" + self.output_subscripts[:h] + bond
        ops_l = [xp.reshape(params[n], v) for n, v, _ in left]
        p_out = contract(eq_l, *ops_l) if h > 1 else ops_l[0]
        right = terms[h:]
        ops_r = [xp.reshape(params[n], v) for n, v, _ in right]
        ops_r[-1] = ops_r[-1] * scale
        eq_r = ",".join(s for _, _, s in right) + "->" + bond + self.output_subscripts[h:]
        s = contract(eq_r, *ops_r) if len(right) > 1 else ops_r[0]
        r = self._bonds[h]
        return xp.reshape(p_out, (self.shape[0], r)), xp.reshape(s, (r, *self.shape[1:])), None, 1

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], *, tensorize: Any = None,
                      **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """``f(t) = TT(shape, t, tensorize)``: every bond ``min(t, its maximum)``."""
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'tt': {sorted(unknown)}; expected tensorize=")
        shape = check_shape(shape)
        split = _normalize_tensorize(shape, tensorize) or tuple((d,) for d in shape)
        top = _max_bonds(tuple(f for fs in split for f in fs))
        return (lambda t: cls(shape, t, split)), max(top, default=1)

    @staticmethod
    def sample_tensorize(shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Any:
        """A valid ``tensorize=`` on ``shape``: None, ``'auto'`` or some modes split in two factors."""
        choice = pick(["none", "auto", "split"])
        if choice != "split":
            return None if choice == "none" else "auto"
        out = {}
        for n, d in enumerate(shape):
            divisors = [f for f in range(2, d) if d % f == 0]
            if divisors and pick([False, True]):
                f = pick(divisors)
                out[n] = (f, d // f)
        return out

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """A :meth:`sample_tensorize`, then one int bond rank in ``1..6`` or per-bond ranks
        (each ``1..min(6, its maximum)``, repaired into a valid train)."""
        tz = cls.sample_tensorize(shape, pick)
        if not pick([False, True]):
            return cls(shape, pick(range(1, 7)), tz)
        top = cls(shape, 2**30, tz)
        bonds = [pick(range(1, min(r, 6) + 1)) for r in top.ranks]
        # Repair into a valid train: r_k <= r_{k-1}·m_k and r_k <= m_{k+1}·r_{k+1}.
        m = top.cores
        for k in range(len(bonds)):
            bonds[k] = min(bonds[k], (bonds[k - 1] if k else 1) * m[k])
        for k in reversed(range(len(bonds))):
            bonds[k] = min(bonds[k], m[k + 1] * (bonds[k + 1] if k + 1 < len(bonds) else 1))
        return cls(shape, tuple(bonds), tz)


def _tt_member(spec: TT, lead: int) -> Parametrization:
    h, split = spec._fine_start[lead], spec.split_shape[lead:]
    try:
        return TT(spec.shape[lead:], spec.ranks[h:], tensorize=split if any(len(f) > 1 for f in split) else None,
                  max_modes=spec.max_modes)
    except RankError:
        return Parametrization.member(spec, lead)


register("tt", TT)
