"""The abstract N-D delta parametrisation and the registry of kinds.

A parametrisation describes ΔW of a fixed shape as one einsum of small
parameter arrays. Reconstruction, the analytic vjp, application to inputs
without building ΔW, and the FLOP model are all derived from that einsum and
planned once per shape with opt_einsum.

Kinds are found by name in a registry: the built-in ones register on import,
third-party ones through :func:`register` or the entry-point group
``tucker_peft.kinds`` (read on the first lookup of an unknown name).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import opt_einsum
from array_api_compat import device as _array_device, to_device

from ._namespace import ArrayContext, namespace
from ._planner import contract, contract_vjp, plan_cost, vjp_cost
from ._errors import InitError, ParamsError, RankError, TuckerPeftError, fmt_shape

__all__ = ["Parametrization", "Cost", "register", "parametrization", "kinds", "lookup", "ENTRY_POINT_GROUP",
           "MAX_MODES"]

Params = dict[str, Any]


def check_int(value: Any, what: str, low: int, high: int | None = None,
              error: type[TuckerPeftError] = TuckerPeftError) -> int:
    """Validate an integer (not a bool or float) in ``[low, high]``; ``error`` names the failure."""
    expected = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    if isinstance(value, (bool, float, np.floating)):
        raise error(f"{what}: expected {expected}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise error(f"{what}: expected {expected}, got {value!r}") from None
    if v < low or (high is not None and v > high):
        raise error(f"{what}: expected {expected}, got {v}")
    return v


def check_rank(value: Any, what: str, low: int, high: int) -> int:
    """Validate one integer rank in ``[low, high]`` (raises :class:`RankError`)."""
    return check_int(value, what, low, high, RankError)


def mode_ranks(shape: tuple[int, ...], ranks: Any) -> tuple[int | None, ...]:
    """Per-mode ranks: an int broadcast and clipped to each mode, or one int/None per mode in ``[1, I_n]``.

    ``None`` (alone or per mode) leaves a mode unfactorised. Used by Tucker
    and by :func:`tucker_peft.hosvd`; raises :class:`RankError`.
    """
    if ranks is None:
        return (None,) * len(shape)
    if isinstance(ranks, bool):
        raise RankError(f"ranks: expected an int or a sequence of {len(shape)} ints/None, got {ranks!r}")
    if isinstance(ranks, (int, np.integer)):
        r = check_rank(ranks, "ranks", 1, sys.maxsize)  # broadcast ints are clipped, never rejected
        return tuple(min(r, d) for d in shape)
    if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise RankError(f"ranks: expected an int or a sequence of {len(shape)} ints/None, got {ranks!r}")
    if len(ranks) != len(shape):
        raise RankError(
            f"ranks: expected {len(shape)} values (one per mode of shape {fmt_shape(shape)}), got {len(ranks)}: {tuple(ranks)!r}"
        )
    return tuple(
        None if r is None else check_rank(r, f"ranks[{n}] (mode of size {d})", 1, d)
        for n, (r, d) in enumerate(zip(ranks, shape))
    )


def check_scale(scale: Any, what: str = "scale", *, nonzero: bool = False,
                error: type[TuckerPeftError] = TuckerPeftError) -> float:
    """Validate a scale: a finite real number (Python or NumPy scalar, not a bool), non-zero with ``nonzero``."""
    expected = "a finite non-zero number" if nonzero else "a finite number"
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise error(f"{what}: expected {expected}, got {type(scale).__name__} {scale!r}"[:200])
    if not math.isfinite(scale) or (nonzero and scale == 0):
        raise error(f"{what}: expected {expected}, got {scale!r}")
    return float(scale)


def check_tensor(tensor: Any, what: str = "tensor", error: type[TuckerPeftError] = TuckerPeftError) -> Any:
    """The array namespace of ``tensor`` after checking that it is real floating and finite.

    Decompositions of an integer or boolean tensor would come back in its
    dtype (all-zero factors), and NaN/Inf make LAPACK fail or hang: both are
    refused here. Costs one reduction and one host read.
    """
    xp = namespace(tensor, what=(what,))
    if not xp.isdtype(tensor.dtype, "real floating"):
        raise error(f"{what}: expected a real floating dtype, got {tensor.dtype}; cast it first "
                    "(e.g. to float32 or float64)")
    if not bool(xp.all(xp.isfinite(tensor))):
        raise error(f"{what}: contains NaN or Inf; expected finite values")
    return xp


#: Most modes a spec takes unless its ``max_modes=`` says more: planning and
#: decomposition costs grow quickly with the number of modes.
MAX_MODES = 12


def check_shape(shape: Any, max_modes: int | None = None) -> tuple[int, ...]:
    """Validate a weight shape: a non-empty sequence of positive ints, at most
    ``max_modes`` of them (default :data:`MAX_MODES`)."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if isinstance(shape, (str, bytes)):
        raise TuckerPeftError(f"shape: expected a sequence of positive ints, got {shape!r}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TuckerPeftError(f"shape: expected a sequence of positive ints, got {shape!r}") from None
    if not dims:
        raise TuckerPeftError("shape: expected at least one mode, got ()")
    cap = MAX_MODES if max_modes is None else check_int(max_modes, "max_modes", 1)
    if len(dims) > cap:
        raise TuckerPeftError(
            f"shape: expected at most {cap} modes, got {len(dims)} ({fmt_shape(dims)[:80]}); planning and "
            f"decomposition cost grow quickly with the modes: pass max_modes={len(dims)} to the spec to allow it"
        )
    return tuple(check_int(d, f"shape[{i}] of {dims!r}", 1) for i, d in enumerate(dims))


@dataclass(frozen=True)
class Cost:
    """FLOP model of one parametrisation (a multiply-add counts as 2 FLOPs).

    Attributes
    ----------
    reconstruct : int
        Building ΔW from the params.
    vjp : int
        All parameter gradients from a cotangent of ΔW's shape.
    apply_rebuild : int
        Building ΔW, then contracting it with ``n`` inputs of shape ``shape[1:]``.
    apply_factorized : int
        Contracting the factors with the same ``n`` inputs without building ΔW.
    """

    reconstruct: int
    vjp: int
    apply_rebuild: int
    apply_factorized: int

    @property
    def best_apply(self) -> str:
        """``'factorized'`` or ``'rebuild'``, whichever is cheaper."""
        return "factorized" if self.apply_factorized < self.apply_rebuild else "rebuild"


@dataclass(frozen=True)
class Parametrization(ABC):
    """A low-rank change ΔW of a fixed N-D shape, written as one einsum.

    Parameters
    ----------
    shape : tuple of int
        Shape of the weight, e.g. ``(out, in/groups, *kernel)`` for a conv.
    max_modes : int, optional (keyword only)
        Accept more modes than :data:`MAX_MODES` (12). Not part of the spec's
        identity (equality, hash, repr).

    Notes
    -----
    **The kind contract.** A kind is a frozen dataclass subclass, registered
    by name (:func:`register` or the entry-point group ``tucker_peft.kinds``).
    It defines:

    - :attr:`param_shapes` — name → shape of each parameter array;
    - :meth:`terms` — the einsum: one ``(name, view_shape, subscripts)`` per
      operand, using :meth:`mode_symbol` / :meth:`rank_symbol` letters;
      :attr:`split_shape` lets a kind split modes into factors (Kronecker,
      tensorised trains): the einsum's output is then over the factors;
    - :meth:`initialize` — the params of each canonical init method:
      ``'zero'`` (ΔW = 0 exactly), ``'random'``, and :attr:`principal_init`,
      the decomposition of a given tensor (listed in :attr:`tensor_methods`);
    - :meth:`budget_family` — the family :func:`tucker_peft.ranks.for_budget`
      searches;
    - :meth:`clip` — ranks clipped to what a shape allows (:meth:`for_ranks`
      builds the spec).

    and may override, for speed or features:

    - :meth:`sample_spec` — a valid spec on a shape, its choices made by a
      given ``pick`` (property tests; default: a step of the budget family),
      and :attr:`min_modes`, the fewest modes the kind takes;
    - :meth:`for_energy` — the spec an energy rule picks from the smallest
      ranks keeping a fraction of each unfolding's σ² (default: one rank from
      mode 0);
    - :attr:`zero_block_size` — entries set to zero by the ``'zero'`` init;
    - :meth:`matched_scale` — the factor of ``scale_rule='matched'``;
    - :meth:`factored` — the three-stage form ``(P_out, S, P_in, mg)``
      used by a binding's factorised forward (``None``: rebuild ΔW);
    - :meth:`lora_factors` — exact LoRA factors for export (``None`` and
      :attr:`lora_note` when there are none);
    - :meth:`peft_state` — the kind's own PEFT format (``None``: export as LoRA);
    - :meth:`describe_ranks` — the ranks as shown in summaries and the CLI;
    - :meth:`member` / :meth:`slice` — one member's spec and params in a
      cross-layer stack (default: a generic slice of :meth:`terms`).

    Reconstruction, vjp, application and the FLOP model are derived from
    :meth:`terms` here.
    """

    shape: tuple[int, ...]
    max_modes: int | None = field(default=None, kw_only=True, repr=False, compare=False)

    kind: ClassVar[str] = ""
    #: Names accepted by :meth:`init`; aliases map to a canonical method.
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random"}
    #: Canonical init methods that need ``tensor=``.
    tensor_methods: ClassVar[frozenset[str]] = frozenset()
    #: The canonical method that decomposes a given tensor (the pretrained
    #: weight, a fine-tuning delta); ``None`` if the kind has none.
    principal_init: ClassVar[str | None] = None
    #: Why :meth:`lora_factors` returns None for this kind (empty if it never does).
    lora_note: ClassVar[str] = ""
    #: The fewest modes a shape of this kind has (LoKr: 2, a matrix at least).
    min_modes: ClassVar[int] = 1

    # -- the kind contract -------------------------------------------------
    @property
    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of each parameter array, in a fixed order."""

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """``(name, view_shape, subscripts)`` of each einsum operand.

        Each param (in :attr:`param_shapes`) is reshaped to ``view_shape`` and
        labelled by ``subscripts``; the output is :attr:`output_subscripts`
        (one :meth:`mode_symbol` per factor of :attr:`split_shape`).
        """
        legacy = getattr(self, "_terms", None)
        if legacy is None:
            raise NotImplementedError(f"kind {self.kind!r} must define terms()")
        return tuple(legacy())

    def initialize(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
                   scale: float, options: dict[str, Any]) -> Params:
        """Params for a canonical init ``method`` (a value of :attr:`init_methods`).

        ``ctx`` makes arrays (``ctx.asarray(numpy_array)``, ``ctx.zeros(shape)``,
        ``ctx.xp``, ``ctx.dtype``); ``rng`` is the only source of randomness;
        ``tensor`` (shape :attr:`shape`, already checked finite) is given for
        :attr:`tensor_methods`, which make ``scale · ΔW`` approximate it. Pop
        what is used from ``options``: leftovers are reported as unexpected.
        """
        legacy = getattr(self, "_init", None)
        if legacy is None:
            raise NotImplementedError(f"kind {self.kind!r} must define initialize()")
        return legacy(method, ctx, rng, tensor, scale, options)

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], **constraints: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """A family ``f(t)``, ``t = 1..t_max``, whose ``num_params`` never decreases.

        :func:`tucker_peft.ranks.for_budget` searches it; a third-party kind
        implements it to take part in budget matching.
        """
        raise TuckerPeftError(f"kind {cls.kind!r} does not support budget matching")

    @classmethod
    def clip(cls, shape: Sequence[int], ranks: Any) -> Any:
        """``ranks`` clipped to what ``shape`` allows (each rank at most its maximum).

        Ints below 1 and other malformed ranks are left for the constructor
        to reject. The default returns ``ranks`` unchanged.
        """
        return ranks

    @classmethod
    def for_ranks(cls, shape: Sequence[int], ranks: Any, **options: Any) -> "Parametrization":
        """``cls(shape, clip(shape, ranks), **options)``: the spec at ``ranks``, clipped to ``shape``."""
        shape = check_shape(shape, options.get("max_modes"))
        return cls(shape, cls.clip(shape, ranks), **options)  # type: ignore[call-arg]

    @property
    def zero_block_size(self) -> int:
        """Number of entries that :meth:`init` ``('zero')`` sets to zero (e.g. Tucker's core, CP's λ, LoRA's B)."""
        params = self.init("zero", seed=0)
        return sum(int(v.size) for v in params.values() if not np.any(v))

    def matched_scale(self, lead: int = 0) -> float:
        """The factor ``scale_rule='matched'`` multiplies alpha by; 1 by default.

        Kinds whose ``'zero'`` init can put orthonormal factors next to the
        zero block (``init('zero', orthonormal=True)``: Tucker, CP, TT) return
        :meth:`orthonormal_matched_scale`. ``lead > 0``: the spec is a
        cross-layer stack whose first ``lead`` modes index its members
        (see :meth:`member`); bindings pass it only then.
        """
        return 1.0

    def orthonormal_matched_scale(self, lead: int = 0) -> float:
        """√(M·out·r_L/3) / √n₀, n₀ = :attr:`zero_block_size`, r_L the LoRA rank of the same budget.

        With orthonormal factors, a sign step of size lr on the n₀ zero
        entries changes ΔW by lr·√n₀ in Frobenius norm; PEFT's LoRA
        (B = 0, A ~ U(±1/√K)) by lr·√(out·r_L/3) on each of the M members
        (M = Π shape[:lead], 1 for a single layer), whose weights are
        ``shape[lead:]``.
        """
        lead = check_int(lead, "lead", 0, self.ndim - 1)
        m, out, k = math.prod(self.shape[:lead]), self.shape[lead], math.prod(self.shape[lead + 1:])
        r_lora = self.num_params / (m * (out + k))
        return math.sqrt(m * out * r_lora / 3.0) / math.sqrt(max(1, self.zero_block_size))

    def member(self, lead: int) -> "Parametrization":
        """The spec of one slice ``ΔW[i_0, …, i_{lead-1}]`` of a stacked ΔW (shape ``shape[lead:]``).

        A cross-layer adapter stacks its members' weights along ``lead``
        leading modes; each member computes with its slice, whose params
        :meth:`slice` gives. The default is a generic slice of :meth:`terms`
        (no :meth:`factored` form, so bindings rebuild the member's ΔW);
        kinds whose slices are again of their own kind (Tucker, CP, TT)
        override this and :meth:`slice` together.
        """
        lead = check_int(lead, "lead", 0, self.ndim - 1)
        if lead == 0:
            return self
        from ._slice import term_slice

        return self.memo(("member", lead), lambda: term_slice(self, lead))

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, once per spec and hashable ``key``, kept on the spec (member specs, slice plans).

        Specs are immutable, so what derives from them is too. Kept on the
        spec rather than in a global cache, it is read by ``torch.compile``
        without tracing ``build`` (dynamo bypasses ``functools.lru_cache``),
        once built eagerly; this spec and any spec it returns get their
        cached properties filled for the same reason.
        """
        store = self.__dict__.get("_memo")
        if store is None:
            self.fill_cached()
            store = self.__dict__["_memo"] = {}
        got = store.get(key)
        if got is None:
            got = build()
            if isinstance(got, Parametrization):
                got.fill_cached()
            store[key] = got
        return got

    def fill_cached(self) -> None:
        """Compute every ``cached_property`` now, so that traced code (dynamo) only reads them."""
        for cls in type(self).__mro__:
            for name, v in vars(cls).items():
                if isinstance(v, cached_property) and name not in self.__dict__:
                    getattr(self, name)

    def slice(self, params: Mapping[str, Any], index: Sequence[int]) -> Params:
        """Params of :meth:`member` ``(len(index))`` for the slice at ``index``.

        ``member.reconstruct(out, s)`` equals ``reconstruct(params, s)[index]``,
        without forming ΔW: the cost is that of one member. Differentiable in
        autograd libraries (the results are views and contractions of
        ``params``).

        Parameters
        ----------
        params : dict of str to array
            Of :attr:`param_shapes`.
        index : tuple of int
            One index per leading mode, ``0 <= index[n] < shape[n]``.
        """
        index = self.check_index(index)
        if not index:
            return dict(params)
        from ._slice import slice_terms

        return slice_terms(self, params, index)

    def check_index(self, index: Any) -> tuple[int, ...]:
        """Validate a member index: fewer ints than modes, each within its mode."""
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            index = (index,)
        if isinstance(index, (str, bytes)) or not isinstance(index, Sequence) or len(index) >= self.ndim:
            raise TuckerPeftError(f"index: expected a tuple of fewer than {self.ndim} ints (one per leading mode of "
                                  f"shape {fmt_shape(self.shape)}), got {index!r}")
        return tuple(check_int(i, f"index[{n}] (mode of size {d})", 0, d - 1)
                     for n, (i, d) in enumerate(zip(index, self.shape)))

    def als_solver(self, target: Any, scale: float, params: Mapping[str, Any]) -> Any:
        """Alternating least squares fitting ``scale · ΔW ≈ target`` for ``fit(method='als')``, or None.

        An object whose ``sweep()`` runs one sweep from ``params`` and returns
        the new params, on ``target``'s namespace and device. None (the
        default) means the kind has none: ``fit`` asks for ``method='adam'``.
        """
        return None

    def factored(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any, Any, int] | None:
        """The three-stage form of ``scale · ΔW`` on a weight ``(out, in, *kernel)``, or None.

        ``(P_out, S, P_in, mg)`` with ``P_out: (out, m_out)``,
        ``S: (m_out, m_in / mg, *kernel)``, ``P_in: (in, m_in)`` and
        ``ΔW = P_out ×_0 S ×_1 P_in``; a ``None`` projection is the identity
        and ``mg > 1`` means S is block-diagonal in ``mg`` groups (CP's
        diagonal). ``scale`` is folded into S. None (the default) means the
        kind has no such form: bindings rebuild ΔW.
        """
        return None

    def peft_state(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The kind's own PEFT format: ``(tensors, fields)``, or None (export as LoRA).

        ``tensors`` maps PEFT's layer attribute names (e.g. ``'hada_w1_a'``) to
        arrays holding ``scale · ΔW`` exactly; ``fields`` are the PEFT config
        fields, with ``'peft_type'``, ``'r'`` and ``'alpha'`` (per layer) and
        any others, which must agree across the layers of one adapter.
        """
        return None

    def lora_factors(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any] | None:
        """Exact LoRA factors ``(B, A)`` with ``B @ A = scale · ΔW`` unfolded to ``(out, Π shape[1:])``.

        Derived from :meth:`factored`; None (see :attr:`lora_note`) when the
        kind has no exact low-rank unfolding.
        """
        f = self.factored(params, scale)
        if f is None:
            return None
        p_out, s, p_in, mg = f
        xp = namespace(s)
        kernel = tuple(s.shape[2:])
        m, j, i = self._sym(0), self._sym(1), self._sym(2)
        k = "".join(self._sym(3 + n) for n in range(len(kernel)))
        if mg > 1:  # block-diagonal S: (m, 1, *kernel) with P_in (in, m)
            a = contract(f"{m}{k},{i}{m}->{m}{i}{k}", xp.reshape(s, (s.shape[0], *kernel)), p_in)
        elif p_in is not None:
            a = contract(f"{m}{j}{k},{i}{j}->{m}{i}{k}", s, p_in)
        else:
            a = s
        b = p_out if p_out is not None else xp.eye(self.shape[0], dtype=s.dtype, device=_array_device(s))
        return b, xp.reshape(a, (a.shape[0], -1))

    def describe_ranks(self) -> str:
        """The ranks as shown in summaries and the CLI (default: the field after ``shape``)."""
        import dataclasses

        names = [f.name for f in dataclasses.fields(self) if f.name != "shape" and not f.kw_only]
        if not names:
            return "-"
        v = getattr(self, names[0])
        if isinstance(v, tuple):
            return ",".join("*" if r is None else str(r) for r in v)
        return str(v)

    @classmethod
    def sample_spec(cls, shape: tuple[int, ...], pick: Callable[[Sequence[Any]], Any]) -> "Parametrization":
        """A valid spec on ``shape`` (at least :attr:`min_modes` modes), every choice made by ``pick``.

        ``pick(options)`` returns one item of a non-empty sequence (a
        ``range`` for integers); the first item is the simplest. Property
        tests pass hypothesis' ``draw(sampled_from(options))``
        (:func:`tucker_peft.testing.specs`); plain random specs come from
        ``lambda o: o[rng.integers(len(o))]``. A kind draws the variety of
        ranks and options its tests need; the default picks ``t`` of
        :meth:`budget_family`.

        Parameters
        ----------
        shape : tuple of int
        pick : callable, sequence -> item

        Returns
        -------
        Parametrization
            Of this kind, on ``shape``.
        """
        family, t_max = cls.budget_family(tuple(shape))
        return family(pick(range(1, t_max + 1)))

    @classmethod
    def for_energy(cls, shape: tuple[int, ...], energy: Sequence[float | None],
                   rank_of: Callable[[int, float], int]) -> "Parametrization":
        """The spec an energy rule picks (``tucker-peft ranks/extract --energy``).

        Parameters
        ----------
        shape : tuple of int
            ``(I_1, ..., I_N)``.
        energy : sequence of (float in (0, 1] or None), length N
            The fraction of σ² to keep per mode; None where the user left the
            mode out.
        rank_of : callable, (n, e) -> int
            The smallest rank of the mode-``n`` unfolding of the tensor that
            keeps a fraction ``e`` of its σ² (computed on demand: ask only for
            the modes the kind reads).

        Returns
        -------
        Parametrization
            The default takes one rank from mode 0:
            ``for_ranks(shape, rank_of(0, energy[0]))``; per-mode kinds
            (Tucker) read every mode.

        Raises
        ------
        RankError
            An energy the kind needs is None.
        """
        if energy[0] is None:
            raise RankError(f"{cls.kind or cls.__name__} takes its rank from the energy of mode 0, got 'none' there")
        return cls.for_ranks(shape, rank_of(0, energy[0]))

    # -- einsum letters ----------------------------------------------------
    @property
    def split_shape(self) -> tuple[tuple[int, ...], ...]:
        """Each mode's factors in the einsum (C order): ``((I_1,), ..., (I_N,))`` unless a kind splits modes."""
        return tuple((d,) for d in self.shape)

    @cached_property
    def _fine(self) -> tuple[int, ...]:
        return tuple(f for fs in self.split_shape for f in fs)

    @cached_property
    def _fine_start(self) -> tuple[int, ...]:
        out, k = [], 0
        for fs in self.split_shape:
            out.append(k)
            k += len(fs)
        return tuple(out)

    def mode_symbol(self, n: int, j: int = 0) -> str:
        """Einsum letter of factor ``j`` of mode ``n`` (the mode itself when it is not split)."""
        return self._sym(self._fine_start[n] + j)

    def rank_symbol(self, k: int) -> str:
        """Einsum letter number ``k`` for a rank (bond, internal) index; never a mode letter."""
        return self._sym(len(self._fine) + k)

    @property
    def output_subscripts(self) -> str:
        """The einsum's output: every factor of every mode, in order."""
        return "".join(self._sym(i) for i in range(len(self._fine)))

    # -- derived -----------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_params(self) -> int:
        """Total number of trainable scalars."""
        return sum(math.prod(s) for s in self.param_shapes.values())

    @staticmethod
    def _sym(i: int) -> str:
        return opt_einsum.get_symbol(i)

    def _mode(self, n: int) -> str:
        return self.mode_symbol(n)

    def _rank(self, n: int) -> str:
        return self.rank_symbol(n)

    @cached_property
    def _split(self) -> bool:
        return len(self._fine) != self.ndim

    @cached_property
    def _out(self) -> str:
        return self.output_subscripts

    @cached_property
    def _term_list(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        return tuple(self.terms())

    @cached_property
    def _views(self) -> tuple[tuple[int, ...], ...]:
        return tuple(v for _, v, _ in self._term_list)

    @cached_property
    def _recon_eq(self) -> str:
        return ",".join(s for _, _, s in self._term_list) + "->" + self._out

    @cached_property
    def _head(self) -> int:
        """Number of einsum output letters that belong to mode 0."""
        return len(self.split_shape[0])

    @cached_property
    def _apply_eq(self) -> str:
        used = set(self._recon_eq)
        batch = next(self._sym(i) for i in itertools.count(len(self._fine)) if self._sym(i) not in used)
        x = batch + self._out[self._head:]
        return ",".join([x] + [s for _, _, s in self._term_list]) + "->" + batch + self._out[: self._head]

    def _fine_tail(self) -> tuple[int, ...]:
        return self._fine[self._head:]

    def check_params(self, params: Mapping[str, Any], *extra: tuple[str, Any]) -> Any:
        """Validate keys and shapes of ``params``; return their array namespace.

        ``extra`` holds ``(name, array)`` pairs that must share the namespace.
        """
        if not isinstance(params, Mapping):
            raise ParamsError(f"params: expected a dict of name -> array, got {type(params).__name__}")
        expected = self.param_shapes
        missing = [k for k in expected if k not in params]
        unknown = [k for k in params if k not in expected]
        if missing or unknown:
            raise ParamsError(
                f"params for {self!r}: expected keys {list(expected)}, got {list(params)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {unknown}" if unknown else "")
            )
        for k, want in expected.items():
            got = tuple(getattr(params[k], "shape", ()))
            if got != want:
                raise ParamsError(f"params[{k!r}]: expected shape {fmt_shape(want)}, got {fmt_shape(got)}")
        names = list(expected) + [n for n, _ in extra]
        arrays = [params[k] for k in expected] + [a for _, a in extra]
        return namespace(*arrays, what=names)

    def _operands(self, xp: Any, params: Mapping[str, Any]) -> list[Any]:
        ops = []
        for name, view, _ in self._term_list:
            a = params[name]
            ops.append(a if tuple(a.shape) == view else xp.reshape(a, view))
        return ops

    def _fold_scale(self, ops: list[Any], scale: Any) -> list[Any]:
        """Multiply the smallest operand by ``scale`` (cheaper than scaling the result)."""
        return self._fold_scale_at(ops, scale)[1]

    def reconstruct(self, params: Mapping[str, Any], scale: float = 1.0) -> Any:
        """ΔW = ``scale`` · (the einsum of the params).

        Parameters
        ----------
        params : dict of str to array
            Arrays of :attr:`param_shapes`, all from one array library.
        scale : float
            The factor s.

        Returns
        -------
        array, shape :attr:`shape`
            In the params' library, device and dtype.
        """
        xp = self.check_params(params)
        ops = self._fold_scale(self._operands(xp, params), scale)
        out = contract(self._recon_eq, *ops)
        return xp.reshape(out, self.shape) if self._split else out

    def vjp(self, params: Mapping[str, Any], cotangent: Any, scale: float = 1.0) -> Params:
        """Gradients of ⟨cotangent, ΔW⟩ with respect to each parameter.

        Analytic and planned like :meth:`reconstruct`, so libraries without
        autograd (NumPy, CuPy) can train.

        Parameters
        ----------
        params : dict of str to array
        cotangent : array, shape :attr:`shape`
            ∂L/∂ΔW.
        scale : float

        Returns
        -------
        dict of str to array
            Same keys and shapes as ``params``.
        """
        xp = self.check_params(params, ("cotangent", cotangent))
        if tuple(cotangent.shape) != self.shape:
            raise ParamsError(f"cotangent: expected shape {fmt_shape(self.shape)}, got {fmt_shape(cotangent.shape)}")
        ops = self._operands(xp, params)
        k, ops = self._fold_scale_at(ops, scale)
        if self._split:
            cotangent = xp.reshape(cotangent, self._fine)
        return self._param_grads(xp, contract_vjp(self._recon_eq, ops, cotangent), k, scale)

    def _fold_scale_at(self, ops: list[Any], scale: Any) -> tuple[int | None, list[Any]]:
        """``_fold_scale``, also telling which operand took ``scale`` (None if none did)."""
        scale = check_scale(scale)
        if scale == 1:
            return None, ops
        sizes = [math.prod(op.shape) for op in ops]  # not min(key=...): dynamo traces this
        k = sizes.index(min(sizes))
        ops = list(ops)
        ops[k] = ops[k] * scale
        return k, ops

    def _param_grads(self, xp: Any, got: Sequence[Any], folded: int | None, scale: Any) -> Params:
        """Name and reshape operand gradients; the operand that took ``scale`` gets it by the chain rule."""
        grads: Params = {}
        for j, ((name, _, _), g) in enumerate(zip(self._term_list, got)):
            if j == folded:
                g = g * scale
            want = self.param_shapes[name]
            grads[name] = g if tuple(g.shape) == want else xp.reshape(g, want)
        return grads

    def batch_shape(self, x: Any) -> tuple[int, ...]:
        """The leading dims of inputs ``x`` of shape ``(*batch, *shape[1:])``; raises if the rest differs."""
        tail = self.shape[1:]
        got = tuple(getattr(x, "shape", ()))
        if not hasattr(x, "shape") or len(got) < len(tail) or got[len(got) - len(tail):] != tail:
            raise ParamsError(f"x: expected shape (*batch, {', '.join(map(str, tail))}), got {fmt_shape(got)}")
        return got[: len(got) - len(tail)]

    def apply(self, params: Mapping[str, Any], x: Any, scale: float = 1.0, strategy: str = "auto") -> Any:
        """Contract ΔW with inputs over modes ``1..N-1``: ``y[..., i] = Σ ΔW[i, ...] x[..., ...]``.

        This is ``x @ ΔWᵀ`` for a matrix weight, and the per-patch product of a
        conv (im2col view) for a kernel of shape ``(out, in/groups, *kernel)``.

        Parameters
        ----------
        x : array, shape ``(*batch, *shape[1:])``
        strategy : {'auto', 'factorized', 'rebuild'}
            ``'factorized'`` never builds ΔW; ``'rebuild'`` builds it and does
            one matrix product; ``'auto'`` picks the cheaper by :meth:`cost`.

        Returns
        -------
        array, shape ``(*batch, shape[0])``
        """
        xp = self.check_params(params, ("x", x))
        lead = self.batch_shape(x)
        n = math.prod(lead)
        if strategy == "auto":
            strategy = self.cost(n).best_apply
        if strategy == "factorized":
            ops = self._fold_scale(self._operands(xp, params), scale)
            y = contract(self._apply_eq, xp.reshape(x, (n, *self._fine_tail())), *ops)
        elif strategy == "rebuild":
            dw = xp.reshape(self.reconstruct(params, scale), (self.shape[0], -1))
            y = xp.matmul(xp.reshape(x, (n, -1)), xp.matrix_transpose(dw))
        else:
            raise TuckerPeftError(f"strategy: expected 'auto', 'factorized' or 'rebuild', got {strategy!r}")
        return xp.reshape(y, (*lead, self.shape[0]))

    def apply_vjp(self, params: Mapping[str, Any], x: Any, grad_out: Any, scale: float = 1.0,
                  strategy: str = "auto") -> tuple[Params, Any]:
        """Gradients of ⟨grad_out, apply(params, x)⟩ for the params and for ``x``.

        Parameters
        ----------
        x : array, shape ``(*batch, *shape[1:])``
        grad_out : array, shape ``(*batch, shape[0])``
        strategy : {'auto', 'factorized', 'rebuild'}
            ``'rebuild'`` forms ∂L/∂ΔW = grad_outᵀ x and calls :meth:`vjp`;
            ``'factorized'`` contracts the factors directly.

        Returns
        -------
        param_grads : dict of str to array
        x_grad : array, shape of ``x``
        """
        xp = self.check_params(params, ("x", x), ("grad_out", grad_out))
        tail = self.shape[1:]
        lead = self.batch_shape(x)
        if tuple(grad_out.shape) != (*lead, self.shape[0]):
            raise ParamsError(f"grad_out: expected shape {fmt_shape((*lead, self.shape[0]))}, got {fmt_shape(grad_out.shape)}")
        n = math.prod(lead)
        if strategy == "auto":
            strategy = self.cost(n).best_apply
        x2 = xp.reshape(x, (n, *tail))
        g2 = xp.reshape(grad_out, (n, self.shape[0]))
        if strategy == "factorized" and self._split:
            x2 = xp.reshape(x, (n, *self._fine_tail()))
            g2 = xp.reshape(grad_out, (n, *self._fine[: self._head]))
        if strategy == "rebuild":
            k = math.prod(tail)
            dw = xp.reshape(self.reconstruct(params, scale), (self.shape[0], k))
            x_grad = xp.matmul(g2, dw)
            ct = xp.reshape(xp.matmul(xp.matrix_transpose(g2), xp.reshape(x2, (n, k))), self.shape)
            return self.vjp(params, ct, scale), xp.reshape(x_grad, x.shape)
        if strategy != "factorized":
            raise TuckerPeftError(f"strategy: expected 'auto', 'factorized' or 'rebuild', got {strategy!r}")
        folded, ops = self._fold_scale_at(self._operands(xp, params), scale)
        got = contract_vjp(self._apply_eq, [x2] + ops, g2)
        return self._param_grads(xp, got[1:], folded, scale), xp.reshape(got[0], x.shape)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - specs are small, immutable and few
    def cost(self, n: int = 1) -> Cost:
        """FLOPs of reconstruction, vjp, and of applying ΔW to ``n`` inputs both ways."""
        views = self._views
        recon = plan_cost(self._recon_eq, views)
        vjp = vjp_cost(self._recon_eq, views)
        dense = 2 * n * math.prod(self.shape)
        fact = plan_cost(self._apply_eq, ((n, *self._fine_tail()),) + views)
        return Cost(reconstruct=recon, vjp=vjp, apply_rebuild=recon + dense, apply_factorized=fact)

    # -- initialisation ----------------------------------------------------
    def init(self, method: str = "zero", *, like: Any = None, dtype: Any = None, seed: int | None = None,
             tensor: Any = None, scale: float = 1.0, return_residual: bool = False, **options: Any) -> Any:
        """Make params.

        Parameters
        ----------
        method : str
            ``'zero'`` (ΔW = 0 exactly, trainable factors random),
            ``'random'`` (all params random, for tests), or a decomposition of
            ``tensor`` (see the kind's :attr:`init_methods`).
        like : array, optional
            Params take its library, device and dtype. Default: NumPy.
        dtype : dtype or str, optional
            Overrides the dtype.
        seed : int, optional
            Makes the random parts reproducible; the same seed gives the same
            numbers in every array library.
        tensor : array, shape :attr:`shape`, optional
            The pretrained weight (principal init) or a first gradient.
        scale : float
            The s that ΔW will be used with; decomposition inits divide by it
            so that ``s · reconstruct(params)`` approximates ``tensor``.
        return_residual : bool
            Also return ``tensor - s · ΔW``: replacing the weight by it keeps
            ``W + s·ΔW`` equal to the original weight.

        Returns
        -------
        params : dict of str to array
        residual : array, shape :attr:`shape`
            Only with ``return_residual=True``.
        """
        if not isinstance(method, str) or method.lower() not in self.init_methods:
            raise InitError(f"method: expected one of {sorted(self.init_methods)} for kind {self.kind!r}, got {method!r}")
        canon = self.init_methods[method.lower()]
        if tensor is not None:
            if tuple(getattr(tensor, "shape", ())) != self.shape:
                raise InitError(f"tensor: expected shape {fmt_shape(self.shape)}, got {fmt_shape(getattr(tensor, 'shape', ()))}")
            check_tensor(tensor, "tensor", InitError)
        elif canon in self.tensor_methods or return_residual:
            raise InitError(f"tensor: method {method!r}{' with return_residual' if return_residual else ''} needs tensor=, got None")
        if canon in self.tensor_methods:
            scale = check_scale(scale, f"scale (method {method!r} divides by it)", nonzero=True, error=InitError)
        ctx = ArrayContext.resolve(like=like, tensor=tensor, dtype=dtype)
        rng = np.random.default_rng(seed)
        opts = dict(options)
        params = self.initialize(canon, ctx, rng, tensor, scale, opts)
        if opts:
            raise InitError(f"unexpected options for init {method!r} of kind {self.kind!r}: {sorted(opts)}")
        if return_residual:
            return params, tensor - ctx.xp.astype(self.reconstruct(params, scale), tensor.dtype)
        return params

    @staticmethod
    def _cast(ctx: ArrayContext, a: Any) -> Any:
        """Move an array computed from ``tensor`` into ``ctx``."""
        a = ctx.xp.astype(a, ctx.dtype)
        return a if ctx.device is None else to_device(a, ctx.device)

    @staticmethod
    def _core_option(options: dict[str, Any]) -> str:
        core = options.pop("core", "project")
        if core not in ("project", "zero"):
            raise InitError(f"core: expected 'project' or 'zero', got {core!r}")
        return core


_REGISTRY: dict[str, Callable[..., Parametrization]] = {}
#: Entry-point group through which installed packages provide kinds.
ENTRY_POINT_GROUP = "tucker_peft.kinds"
_PENDING: dict[str, Any] = {}  # name -> entry point, not loaded yet
_SCANNED = False


def register(name: str, factory: Callable[..., Parametrization] | None = None, *, overwrite: bool = False) -> Any:
    """Register a kind under ``name`` (usable as a decorator).

    ``factory(shape, **kw)`` must return a :class:`Parametrization`. A class
    whose :meth:`~Parametrization.budget_family` is implemented also works
    with :mod:`tucker_peft.ranks`. Installed packages can instead declare an
    entry point in the group ``tucker_peft.kinds`` (``name = "pkg.module:Kind"``);
    it is imported on the first lookup of ``name``.
    """
    if not isinstance(name, str) or not name:
        raise TuckerPeftError(f"name: expected a non-empty str, got {name!r}")
    key = name.lower()

    def deco(f: Callable[..., Parametrization]) -> Callable[..., Parametrization]:
        if not callable(f):
            raise TuckerPeftError(f"kind {name!r}: expected a Parametrization class or factory, got {f!r}")
        if key in _REGISTRY and _REGISTRY[key] is not f and not overwrite:
            raise TuckerPeftError(f"kind {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[key] = f
        _PENDING.pop(key, None)
        return f

    return deco if factory is None else deco(factory)


def _scan_entry_points() -> None:
    """Note (without importing) the kinds installed packages declare; once per process."""
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = ep.name.lower()
        if key not in _REGISTRY:
            _PENDING.setdefault(key, ep)


def _load_entry_point(key: str) -> Callable[..., Parametrization]:
    ep = _PENDING[key]
    try:
        obj = ep.load()
    except Exception as exc:  # an installed package's import error, reported with its origin
        raise TuckerPeftError(f"kind {key!r}: entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise TuckerPeftError(f"kind {key!r}: entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) gave {obj!r}; "
                              "expected a Parametrization class or factory")
    return register(key, obj)


def kinds() -> tuple[str, ...]:
    """Names of the registered kinds, including those declared by entry points (not imported)."""
    _scan_entry_points()
    return tuple(sorted(set(_REGISTRY) | set(_PENDING)))


def lookup(kind: str) -> Callable[..., Parametrization]:
    """The class (or factory) of a kind: a registered name, an entry-point name, or ``'module:Class'``."""
    if isinstance(kind, str):
        key = kind.lower()
        if key in _REGISTRY:
            return _REGISTRY[key]
        _scan_entry_points()
        if key in _PENDING:
            return _load_entry_point(key)
        if ":" in kind:
            return _import_kind(kind)
    raise TuckerPeftError(f"kind: expected one of {list(kinds())} or 'module:Class', got {kind!r}")


def _import_kind(ref: str) -> Callable[..., Parametrization]:
    import importlib

    mod, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TuckerPeftError(f"kind: {ref!r} could not be imported ({type(exc).__name__}: {exc}); "
                              "expected 'module:Class' naming a Parametrization") from None
    if not (isinstance(obj, type) and issubclass(obj, Parametrization)):
        raise TuckerPeftError(f"kind: {ref!r} is {obj!r}; expected a Parametrization subclass")
    return obj


def parametrization(kind: str, shape: Sequence[int], **kw: Any) -> Parametrization:
    """Build a parametrisation by name: ``parametrization('tucker', (64, 32, 3, 3), ranks=8)``."""
    return lookup(kind)(check_shape(shape, kw.get("max_modes")), **kw)
