"""Tucker (FLoRA) and Tucker-2 parametrisations."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ._base import Parametrization, Params, check_int, check_rank, check_shape, mode_ranks, register
from ._decomp import hooi, hooi_sweep, hosvd
from ._namespace import ArrayContext, namespace
from ._planner import contract
from ._errors import RankError, TuckerPeftError

__all__ = ["Tucker", "Tucker2"]


_normalize_ranks = mode_ranks  # the old private name


@dataclass(frozen=True)
class Tucker(Parametrization):
    """ΔW = s · G ×_1 U_1 ×_2 U_2 … ×_N U_N (FLoRA).

    Parameters
    ----------
    shape : tuple of int
        Weight shape ``(I_1, ..., I_N)``, e.g. ``(out, in/groups, *kernel)``.
    ranks : int, sequence of (int or None), or None
        One int broadcast to every mode (clipped to each mode's size), or one
        value per mode in ``[1, I_n]``. ``None`` leaves a mode unfactorised:
        an identity factor with no parameters, so the core keeps size ``I_n``
        there. ``Tucker(shape, (r, r, None, None))`` is Tucker-2 on a conv.

    Notes
    -----
    Params: ``'core'`` of shape ``(r_1 or I_1, ..., r_N or I_N)`` and
    ``'factor_n'`` of shape ``(I_n, r_n)`` for each factored mode ``n``.
    ``num_params = Π_n r_n + Σ_n I_n r_n`` (with ``r_n = I_n`` and no factor
    term where the rank is None).
    """

    ranks: tuple[int | None, ...] = None  # type: ignore[assignment]

    kind: ClassVar[str] = "tucker"
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random", "hosvd": "hosvd", "hooi": "hooi"}
    tensor_methods: ClassVar[frozenset[str]] = frozenset({"hosvd", "hooi"})
    principal_init: ClassVar[str | None] = "hosvd"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "ranks", mode_ranks(shape, self.ranks))

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """An int stays (the constructor broadcasts and clips it); per-mode ranks become ``min(r_n, I_n)``."""
        if isinstance(ranks, Sequence) and not isinstance(ranks, str) and len(ranks) == len(tuple(shape)):
            return tuple(r if r is None or isinstance(r, bool) or not isinstance(r, (int, np.integer)) else min(r, d)
                         for r, d in zip(ranks, shape))
        return ranks

    @property
    def zero_block_size(self) -> int:
        """The core."""
        return math.prod(self.core_shape)

    def matched_scale(self, lead: int = 0) -> float:
        return self.orthonormal_matched_scale(lead)

    def als_solver(self, target: Any, scale: float, params: Mapping[str, Any]) -> Any:
        """HOOI sweeps (each factor the leading singular vectors of the target projected on the others)."""
        return _TuckerALS(namespace(target), self, target, scale, dict(params))

    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """``(U_0, s·G ×_k U_k for k ≥ 2, U_1, 1)``; a None rank gives a None projection."""
        if self.ndim < 2:
            return None
        core = params["core"]
        kernel = [n for n in range(2, self.ndim) if self.ranks[n] is not None]
        if kernel:
            cs = "".join(self.mode_symbol(n) if n < 2 or self.ranks[n] is None else self.rank_symbol(n)
                         for n in range(self.ndim))
            eq = ",".join([cs] + [self.mode_symbol(n) + self.rank_symbol(n) for n in kernel]) + "->" + self._out
            core = contract(eq, core, *[params[f"factor_{n}"] for n in kernel])
        r0, r1 = self.ranks[:2]
        return (params["factor_0"] if r0 is not None else None, core * scale,
                params["factor_1"] if r1 is not None else None, 1)

    def member(self, lead: int) -> Parametrization:
        """``Tucker(shape[lead:], ranks[lead:])``: a member of a stack keeps the Tucker form (and :meth:`factored`).

        A Tucker-2 stack's member is a plain Tucker too: its leading (channel)
        modes are the stack's, so the member factorises at most its first mode.
        """
        lead = check_int(lead, "lead", 0, self.ndim - 1)
        return self.memo(("member", lead), lambda: _tucker_member(self, lead)) if lead else self

    def slice(self, params: Mapping[str, Any], index: Sequence[int]) -> Params:
        """The core contracted with row ``index[n]`` of each leading factor (indexed where a rank is None).

        One matrix-vector product, ``O(Π core_shape)``; the trailing factors
        are the member's, renamed.
        """
        index = self.check_index(index)
        if not index:
            return dict(params)
        xp = self.check_params(params)
        key, rows, names, tail = self.memo(("slice", len(index)), lambda: _tucker_slice_plan(self, len(index)))
        core = params["core"]
        if key:
            core = core[tuple(index[n] if n in key else slice(None) for n in range(len(index))) + (...,)]
        if rows:  # the leading rows' outer product (Π r_n) times the core unfolded: one matrix product
            v = params[f"factor_{rows[0]}"][index[rows[0]], :]
            for n in rows[1:]:
                v = xp.reshape(v[:, None] * params[f"factor_{n}"][index[n], :][None, :], (-1,))
            core = xp.reshape(xp.matmul(v, xp.reshape(core, (v.shape[0], -1))), tail)
        out: Params = {"core": core}
        out.update({new: params[old] for new, old in names})
        return out

    @cached_property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(d if r is None else r for d, r in zip(self.shape, self.ranks))

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        out = {"core": self.core_shape}
        out.update({f"factor_{n}": (d, r) for n, (d, r) in enumerate(zip(self.shape, self.ranks)) if r is not None})
        return out

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        core = "".join(self._mode(n) if r is None else self._rank(n) for n, r in enumerate(self.ranks))
        terms = [("core", self.core_shape, core)]
        terms += [(f"factor_{n}", (d, r), self._mode(n) + self._rank(n))
                  for n, (d, r) in enumerate(zip(self.shape, self.ranks)) if r is not None]
        return tuple(terms)

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
              scale: float, options: dict[str, Any]) -> Params:
        if method in ("zero", "random"):
            params: Params = {}
            if method == "zero":
                params["core"] = ctx.zeros(self.core_shape)
            else:
                params["core"] = ctx.asarray(rng.standard_normal(self.core_shape))
            ortho = bool(options.pop("orthonormal", False))
            for n, (d, r) in enumerate(zip(self.shape, self.ranks)):
                if r is not None:
                    # Kaiming-uniform as PEFT's lora_A: U(±1/√fan), fan = I_n.
                    u = rng.uniform(-1, 1, (d, r)) / math.sqrt(d)
                    if ortho:  # the same draw, orthonormalised (Q of its QR, signs of R's diagonal)
                        q, rr = np.linalg.qr(u)
                        u = q * np.where(np.diag(rr) < 0, -1.0, 1.0)
                    params[f"factor_{n}"] = ctx.asarray(u)
            return params
        core_mode = self._core_option(options)
        if method == "hosvd":
            core, factors = hosvd(tensor, self.ranks, sequential=options.pop("sequential", True))
        else:
            core, factors = hooi(tensor, self.ranks, n_iter=options.pop("n_iter", 10), tol=options.pop("tol", 1e-8))
        params = {"core": self._cast(ctx, core / scale) if core_mode == "project" else ctx.zeros(self.core_shape)}
        params.update({f"factor_{n}": self._cast(ctx, u) for n, u in enumerate(factors) if u is not None})
        return params

    @classmethod
    def concat(cls, specs: Sequence["Tucker"], params_list: Sequence[Mapping[str, Any]],
               weights: Sequence[float]) -> tuple["Tucker", Params]:
        """One Tucker with ``reconstruct = Σ_i weights[i] · specs[i].reconstruct(params_list[i])``, exactly.

        Factors are concatenated per mode and the cores placed block-diagonally.
        A mode where the ranks would add up past its size, or where any spec
        leaves it unfactorised, becomes unfactorised: each factor there is
        folded into its core.

        Parameters
        ----------
        specs : sequence of Tucker
            Same class and weight shape ``(I_1, ..., I_N)``.
        params_list : sequence of dict
            Each spec's params (one array library).
        weights : sequence of float

        Returns
        -------
        spec : Tucker
            Ranks ``Σ_i r_n^i`` per concatenated mode, None elsewhere.
        params : dict
            Core of shape ``spec.core_shape`` and its factors.
        """
        shape = specs[0].shape
        xp = namespace(*[p["core"] for p in params_list])
        joined = [all(s.ranks[n] is not None for s in specs) and sum(s.ranks[n] for s in specs) <= d
                  for n, d in enumerate(shape)]
        spec = cls(shape, tuple(sum(s.ranks[n] for s in specs) if j else None for n, j in enumerate(joined)))
        like = params_list[0]["core"]
        core = xp.zeros(spec.core_shape, dtype=like.dtype, device=getattr(like, "device", None))
        offsets = [0] * len(shape)
        for s, p, w in zip(specs, params_list, weights):
            c = p["core"] * w
            for n, r in enumerate(s.ranks):
                if r is not None and not joined[n]:  # fold U_n into the core: G ×_n U_n
                    c = xp.moveaxis(xp.tensordot(c, p[f"factor_{n}"], axes=([n], [1])), -1, n)
            block = tuple(slice(o, o + s.ranks[n]) if joined[n] else slice(None) for n, o in enumerate(offsets))
            core[block] = core[block] + c
            offsets = [o + (s.ranks[n] if joined[n] else 0) for n, o in enumerate(offsets)]
        params: Params = {"core": core}
        for n, j in enumerate(joined):
            if j:
                params[f"factor_{n}"] = xp.concat([p[f"factor_{n}"] for p in params_list], axis=1)
        return spec, params

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], *, split: str = "equal", kernel: str = "free",
                      fixed: Mapping[int, int | None] | None = None, **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """Ranks grow with ``t``: ``split='equal'`` gives ``min(t, I_n)``;
        ``'proportional'`` gives ``⌈t·I_n/I_max⌉``.

        ``kernel`` applies to modes 2.. (the spatial modes of a conv):
        ``'free'`` lets them grow like the others, ``'full'`` keeps them at
        full rank, ``'none'`` leaves them unfactorised (Tucker-2). ``fixed``
        pins modes to a rank or None.
        """
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'tucker': {sorted(unknown)}; "
                                  "expected split=, kernel=, fixed=")
        shape = check_shape(shape)
        pinned = _pinned(shape, kernel, fixed)
        return _family(cls, shape, pinned, split)

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """Each mode's rank: None (unfactorised) or ``1..I_n``."""
        return cls(shape, tuple(pick([None, *range(1, d + 1)]) for d in shape))

    @classmethod
    def for_energy(cls, shape: tuple[int, ...], energy: Sequence[float | None],
                   rank_of: Callable[[int, float], int]) -> Parametrization:
        """One rank per mode from that mode's energy; a None energy leaves the mode unfactorised."""
        return cls(shape, tuple(None if e is None else rank_of(n, e) for n, e in enumerate(energy)))


def _tucker_member(spec: Tucker, lead: int) -> Tucker:
    return Tucker(spec.shape[lead:], spec.ranks[lead:], max_modes=spec.max_modes)


def _tucker_slice_plan(spec: Tucker, lead: int) -> tuple[frozenset[int], tuple[int, ...], tuple[tuple[str, str], ...],
                                                          tuple[int, ...]]:
    """``(unfactorised leading modes, factored ones, renames, the member's core shape)``."""
    key = frozenset(n for n in range(lead) if spec.ranks[n] is None)
    rows = tuple(n for n in range(lead) if n not in key)
    names = tuple((f"factor_{n - lead}", f"factor_{n}") for n in range(lead, spec.ndim) if spec.ranks[n] is not None)
    return key, rows, names, spec.core_shape[lead:]


def _pinned(shape: tuple[int, ...], kernel: str, fixed: Mapping[int, int | None] | None) -> dict[int, int | None]:
    if kernel not in ("free", "full", "none"):
        raise TuckerPeftError(f"kernel: expected 'free', 'full' or 'none', got {kernel!r}")
    pinned: dict[int, int | None] = {}
    if kernel != "free":
        pinned.update({n: (shape[n] if kernel == "full" else None) for n in range(2, len(shape))})
    for n, r in dict(fixed or {}).items():
        if not isinstance(n, int) or not -len(shape) <= n < len(shape):
            raise TuckerPeftError(f"fixed: expected mode indices in [0, {len(shape)}), got {n!r}")
        pinned[n % len(shape)] = None if r is None else check_rank(r, f"fixed[{n}]", 1, shape[n])
    return pinned


def _family(cls: Any, shape: tuple[int, ...], pinned: dict[int, int | None], split: str,
            build: Callable[[tuple[int | None, ...]], Parametrization] | None = None) -> tuple[Callable[[int], Parametrization], int]:
    if split not in ("equal", "proportional"):
        raise TuckerPeftError(f"split: expected 'equal' or 'proportional', got {split!r}")
    free = [n for n in range(len(shape)) if n not in pinned]
    top = max((shape[n] for n in free), default=1)
    make = build or (lambda ranks: cls(shape, ranks))

    def f(t: int) -> Parametrization:
        ranks: list[int | None] = [None] * len(shape)
        for n, r in pinned.items():
            ranks[n] = r
        for n in free:
            ranks[n] = min(t, shape[n]) if split == "equal" else min(shape[n], max(1, -(-t * shape[n] // top)))
        return make(tuple(ranks))

    return f, top


@dataclass(frozen=True)
class Tucker2(Tucker):
    """Tucker on the two channel modes only; modes 2.. stay unfactorised.

    ``Tucker2(shape, r)`` equals ``Tucker(shape, (r, r, None, ...))`` (ranks
    clipped); this is the conv adapter of LyCORIS ``use_tucker`` and of PEFT
    LoHa's ``use_effective_conv2d``. ``ranks`` may also be a pair.
    """

    kind: ClassVar[str] = "tucker2"

    def __post_init__(self) -> None:
        shape = check_shape(self.shape, self.max_modes)
        r = self.ranks
        lead = min(2, len(shape))
        if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
            r = check_rank(r, "ranks", 1, sys.maxsize)
            head: tuple[Any, ...] = tuple(min(r, d) for d in shape[:lead])
        elif isinstance(r, Sequence) and not isinstance(r, str) and len(r) == len(shape) and all(x is None for x in r[lead:]):
            head = tuple(r[:lead])
        elif isinstance(r, Sequence) and not isinstance(r, str) and len(r) == lead:
            head = tuple(r)
        else:
            raise RankError(f"ranks: expected an int or {lead} values for the channel modes of Tucker-2, got {r!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "ranks", head + (None,) * (len(shape) - lead))
        super().__post_init__()

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """As :meth:`Tucker.clip`; a pair of channel ranks becomes ``min(r_n, I_n)``."""
        if isinstance(ranks, Sequence) and not isinstance(ranks, str) and len(ranks) == min(2, len(tuple(shape))):
            return Tucker.clip(tuple(shape)[: len(ranks)], ranks)
        return super().clip(shape, ranks)

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], *, split: str = "equal",
                      fixed: Mapping[int, int | None] | None = None, **unknown: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        if unknown:
            raise TuckerPeftError(f"unexpected constraints for kind 'tucker2': {sorted(unknown)}; expected split=, fixed=")
        shape = check_shape(shape)
        pinned = _pinned(shape, "none", fixed)
        return _family(cls, shape, pinned, split, build=lambda ranks: cls(shape, ranks))

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> Parametrization:
        """The channel modes' ranks, each ``1..I_n``."""
        return cls(shape, tuple(pick(range(1, d + 1)) for d in shape[:2]))

    @classmethod
    def for_energy(cls, shape: tuple[int, ...], energy: Sequence[float | None],
                   rank_of: Callable[[int, float], int]) -> Parametrization:
        """As :meth:`Tucker.for_energy` on the two channel modes; the energies of modes 2.. are not read."""
        return cls(shape, tuple(None if e is None else rank_of(n, e) for n, e in enumerate(energy[:2])))


register("tucker", Tucker)
register("tucker2", Tucker2)


class _TuckerALS:
    """HOOI sweeps on orthonormalised factors."""

    def __init__(self, xp: Any, spec: Tucker, target: Any, scale: float, params: Params) -> None:
        self.xp, self.spec, self.target, self.scale = xp, spec, target, scale
        self.modes = [n for n, r in enumerate(spec.ranks) if r is not None]
        self.factors: list[Any] = [params.get(f"factor_{n}") for n in range(spec.ndim)]
        # HOOI projects on the other factors, so they must be orthonormal: QR keeps their span.
        for n in self.modes:
            self.factors[n] = xp.linalg.qr(self.factors[n])[0]
        self.core = params["core"]

    def sweep(self) -> Params:
        self.core = hooi_sweep(self.target, self.factors, self.spec.ranks) / self.scale
        return self.params()

    def params(self) -> Params:
        out = {"core": self.core}
        out.update({f"factor_{n}": self.factors[n] for n in self.modes})
        return out
