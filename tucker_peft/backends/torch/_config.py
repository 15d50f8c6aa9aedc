"""AdapterConfig: which layers get which delta, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from ... import ranks as _ranks
from ..._base import Parametrization, kinds, lookup
from ..._errors import RankError, TuckerPeftError, fmt_shape
from ...lora import LoRA

__all__ = ["AdapterConfig", "LayerTooSmall"]

FORWARDS = ("auto", "rebuild", "factorized")
SCALE_RULES = ("fixed", "matched")
INITS = ("zero", "hosvd")
_LORA_REF = re.compile(r"^lora:(\d+(?:\.\d*)?|\.\d+)$")  # R may be fractional: lora:0.25
ALL_LINEAR = "all-linear"

Ranks = Union[int, tuple[Union[int, None], ...]]


class LayerTooSmall(RankError):
    """Even the smallest spec of the kind has more parameters than the layer's weight."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ranks(value: Any, what: str) -> Any:
    if _is_int(value):
        if value < 1:
            raise TuckerPeftError(f"{what}: expected a positive int, got {value!r}")
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 \
            and all(v is None or (_is_int(v) and v >= 1) for v in value):
        return tuple(value)
    raise TuckerPeftError(f"{what}: expected a positive int or a per-mode tuple of positive ints/None, got {value!r}")


def _check_budget(value: Any, what: str) -> Any:
    if _is_int(value) and value >= 1:
        return value
    if isinstance(value, str) and _LORA_REF.match(value) and float(value[5:]) > 0:
        return value
    raise TuckerPeftError(f"{what}: expected a positive int (parameters per layer) or 'lora:R' with R > 0, "
                          f"got {value!r}")


def _check_targets(value: Any, what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if what == "target_modules" and value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as exc:
            raise TuckerPeftError(f"{what}: invalid regex {value!r} ({exc})") from None
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise TuckerPeftError(f"{what}: expected a list of names or a regex string, got {value!r}")


def _check_pattern(value: Any, what: str, check: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TuckerPeftError(f"{what}: expected a dict of regex to value, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise TuckerPeftError(f"{what}: keys must be regex strings, got {k!r}")
        try:
            re.compile(k)
        except re.error as exc:
            raise TuckerPeftError(f"{what}: invalid regex {k!r} ({exc})") from None
        out[k] = check(v, f"{what}[{k!r}]")
    return out


def _check_alpha(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0:
        raise TuckerPeftError(f"{what}: expected a finite non-zero number, got {v!r}")
    return float(v)


def _check_stack(value: Any) -> dict[str, str] | None:
    """``stack``: None, or group name (an identifier) → a regex with at least one named capture group."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise TuckerPeftError(f"stack: expected a non-empty dict of group name to regex, got {value!r:.200}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise TuckerPeftError(f"stack: group names must be identifiers (letters, digits, '_'), got {k!r:.80}")
        if not isinstance(v, str):
            raise TuckerPeftError(f"stack[{k!r}]: expected a regex string, got {type(v).__name__}")
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise TuckerPeftError(f"stack[{k!r}]: invalid regex {v!r} ({exc})") from None
        if not rx.groupindex:
            raise TuckerPeftError(f"stack[{k!r}]: expected at least one named capture group (?P<name>...), one per "
                                  f"leading mode of the stacked ΔW, got {v!r}")
        out[k] = v
    return out


def name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a listed name: the full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def pattern_matches(name: str, key: str) -> bool:
    """A ``rank_pattern`` key: a regex that matches the whole name or a dotted suffix."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


@dataclass
class AdapterConfig:
    """What to adapt and how.

    Parameters
    ----------
    kind : str
        A registered kind: ``'tucker'``, ``'tucker2'``, ``'cp'`` or ``'lora'``.
    ranks : int or tuple of (int or None), optional
        An int is clipped per mode to what each weight allows: ``ranks=8`` on a
        depthwise ``(C, 1, 7, 7)`` kernel gives Tucker ranks ``(8, 1, 7, 7)``.
        A tuple (Tucker only) is taken as given; a weight that cannot take it
        is an error. Default 8 unless ``budget`` is given.
    budget : int or str, optional
        Instead of ``ranks``: parameters per layer, or ``'lora:R'`` for the
        count of LoRA rank R on that layer (equal-budget comparisons). A layer's
        budget is capped at its weight's own size: a layer whose spec at the
        budget would have more parameters than the weight gets the largest spec
        of the kind that does not (``summary`` marks it ``clipped``). A layer
        where even the smallest spec is larger than the weight is skipped, with
        one warning per call listing such layers, or refused under ``strict``.
        A fractional R (``'lora:0.25'``) means ``R·(out + in)`` parameters, below
        LoRA's smallest adapter; R is clipped at the layer's full LoRA rank.
    alpha : float
        The scale s: layers compute with ``W + s·ΔW``.
    target_modules : list of str or str, optional
        Module names (full, or a suffix after a dot, as PEFT) or one regex
        matched against full names. Supported: ``nn.Linear``,
        ``nn.Conv1d/2d/3d`` and ``nn.Embedding``. ``'all-linear'`` means, as in
        PEFT, every linear layer except the output head (a transformers model's
        ``get_output_embeddings()``, or else its ``score``/``classifier``).
    target_parameters : list of str or str, optional
        Parameter paths (or a regex) of any other N-D parameter, e.g. a stacked
        expert weight ``'experts.w1'`` of shape ``(E, out, in)``.
    rank_pattern, alpha_pattern : dict of regex to ranks / alpha
        Per-layer overrides; a key matches a full name or a dotted suffix.
    init : {'zero', 'hosvd'}
        ``'zero'``: ΔW = 0 at the start. ``'hosvd'``: ΔW starts at the kind's
        principal decomposition of the pretrained weight (HOSVD, CP-ALS or SVD)
        and the base weight becomes the residual, so outputs are unchanged.
    dropout : float
        Dropout on the adapter's input; needs the factorised forward.
    forward : {'auto', 'rebuild', 'factorized'}
        ``'rebuild'`` merges ΔW into one op; ``'factorized'`` never builds it;
        ``'auto'`` picks per layer and input size from the cost estimate.
    trainable : list of str or str, optional
        Modules to train besides the adapters, as PEFT's ``modules_to_save``:
        each adapter gets its own trainable copy of each such module, the
        original stays untouched and runs whenever that adapter is not active.
        An entry (a name, matched as a full name or dotted suffix, or one regex
        matched against full names) that names a module takes the whole module;
        otherwise it is matched against parameter names (``'6.bias'``,
        ``r'.*norm.*'``), and each such parameter alone gets a copy per adapter
        (biases of adapted layers included). An entry that matches nothing is
        an error, as is a module that holds an adapted layer or an adapted
        weight itself. The copies are saved with the adapter.
    scale_rule : {'matched', 'fixed'}
        ``'fixed'``: s = alpha for every kind. ``'matched'`` (default): s = alpha ·
        the kind's :meth:`~tucker_peft.Parametrization.matched_scale`. Tucker, CP
        and TT start from orthonormal factors and s = alpha · √(out·r_L/3) / √(n₀),
        with n₀ the size of the block that starts at zero (core, or λ) and r_L
        the LoRA rank of the same budget, so that the first Adam step changes
        ΔW by as much as PEFT's LoRA (Kaiming A, B = 0) does; LoRA, LoKr and LoHa keep s = alpha.
    kind_options : dict
        Constraints for :func:`tucker_peft.ranks.for_budget` (Tucker: ``split``,
        ``kernel``, ``fixed``).
    seed : int
        Seed of the random factors.
    strict : bool
        Refuse (``RankError``) instead of skipping with a warning a layer where
        even the smallest spec of the kind has more parameters than the weight.
    stack : dict of str to str, optional
        Cross-layer adapters: group name (an identifier) → a regex with at
        least one named capture group. The targets whose full name (module
        name or parameter path) the regex matches form one group, whose ΔW is
        one tensor of the kind on ``(*mode sizes, *member shape)``: each named
        capture group is a leading mode, in the regex's order, of size the
        number of distinct values it takes. The members must fill that grid
        and share one weight shape. ``ranks`` then describes the stacked
        tensor (an int clipped per mode, a tuple one value per mode, leading
        first), ``budget`` is the sum of the members' budgets, and
        ``rank_pattern`` / ``alpha_pattern`` keys may name a group. See
        ``docs/howto/stack.md``.
    """

    kind: str = "tucker"
    ranks: Ranks | None = None
    budget: int | str | None = None
    alpha: float = 1.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | str | None = None
    rank_pattern: dict[str, Ranks] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "zero"
    dropout: float = 0.0
    forward: str = "auto"
    trainable: list[str] | str | None = None
    scale_rule: str = "matched"
    kind_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    strict: bool = False
    stack: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in kinds():
            raise TuckerPeftError(f"kind: expected one of {list(kinds())}, got {self.kind!r}")
        if self.ranks is not None and self.budget is not None:
            raise TuckerPeftError(f"ranks/budget: give one of them, got ranks={self.ranks!r} and budget={self.budget!r}")
        if self.ranks is None and self.budget is None:
            self.ranks = 8
        if self.ranks is not None:
            self.ranks = _check_ranks(self.ranks, "ranks")
        if self.budget is not None:
            self.budget = _check_budget(self.budget, "budget")
        self.alpha = _check_alpha(self.alpha, "alpha")
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        self.target_parameters = _check_targets(self.target_parameters, "target_parameters")
        if self.target_modules is None and self.target_parameters is None:
            raise TuckerPeftError("target_modules: expected module names or a regex (or target_parameters), got None")
        self.rank_pattern = _check_pattern(self.rank_pattern, "rank_pattern", _check_ranks)
        self.alpha_pattern = _check_pattern(self.alpha_pattern, "alpha_pattern", _check_alpha)
        if self.init not in INITS:
            raise TuckerPeftError(f"init: expected one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise TuckerPeftError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.forward not in FORWARDS:
            raise TuckerPeftError(f"forward: expected one of {list(FORWARDS)}, got {self.forward!r}")
        if self.forward == "rebuild" and self.dropout > 0:
            raise TuckerPeftError("forward: 'rebuild' merges ΔW into the layer's own op, so it cannot drop out the "
                                  f"adapter's input; expected 'auto' or 'factorized' with dropout={self.dropout}")
        if self.scale_rule not in SCALE_RULES:
            raise TuckerPeftError(f"scale_rule: expected one of {list(SCALE_RULES)}, got {self.scale_rule!r}")
        self.trainable = _check_targets(self.trainable, "trainable")
        if not isinstance(self.kind_options, Mapping):
            raise TuckerPeftError(f"kind_options: expected a dict, got {type(self.kind_options).__name__}")
        self.kind_options = dict(self.kind_options)
        if self.kind_options and self.budget is None:
            raise TuckerPeftError("kind_options: only used with budget=, got ranks= instead")
        if not _is_int(self.seed):
            raise TuckerPeftError(f"seed: expected an int, got {self.seed!r}")
        if not isinstance(self.strict, bool):
            raise TuckerPeftError(f"strict: expected True or False, got {self.strict!r}")
        self.stack = _check_stack(self.stack)

    # -- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        for k in ("ranks",):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        d["rank_pattern"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rank_pattern.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TuckerPeftError(f"config: unknown fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))

    # -- per-layer resolution -------------------------------------------------
    def _pattern(self, pattern: Mapping[str, Any], name: str) -> Any:
        for key, value in pattern.items():
            if pattern_matches(name, key):
                return value
        return None

    def alpha_for(self, name: str) -> float:
        a = self._pattern(self.alpha_pattern, name)
        return self.alpha if a is None else a

    def scale_for(self, name: str, spec: Parametrization) -> float:
        """s of layer ``name``: its alpha, times the kind's ``spec.matched_scale()`` under ``scale_rule='matched'``."""
        a = self.alpha_for(name)
        return a * spec.matched_scale() if self.scale_rule == "matched" else a

    def spec_for(self, name: str, shape: Sequence[int]) -> Parametrization:
        """The spec of layer ``name`` with weight ``shape``; errors name the layer.

        Under ``budget`` the spec never has more parameters than the weight
        (see :meth:`budget_for`); :class:`LayerTooSmall` when no spec fits.
        """
        shape = tuple(int(s) for s in shape)
        r = self._pattern(self.rank_pattern, name)
        try:
            if r is None and self.budget is not None:
                return _ranks.for_budget(self.kind, shape, self.budget_for(name, shape)[0], **self.kind_options)
            return _spec_for_ranks(self.kind, shape, self.ranks if r is None else r)
        except LayerTooSmall:
            raise
        except TuckerPeftError as exc:
            raise RankError(f"layer {name!r} with weight {fmt_shape(shape)}: {exc}") from None

    def budget_for(self, name: str, shape: Sequence[int]) -> tuple[int, bool]:
        """``(parameters, clipped)``: layer ``name``'s budget, capped at the weight's size.

        ``clipped`` is True where the kind's spec at the uncapped budget would
        have more parameters than the weight. Raises :class:`LayerTooSmall`
        where even the smallest spec has, and ``RankError`` where the budget
        is below the smallest spec.
        """
        shape = tuple(int(s) for s in shape)
        if isinstance(self.budget, str):
            r, out, k = float(self.budget[5:]), shape[0], math.prod(shape[1:])
            if r.is_integer() or r >= min(out, k):
                n = LoRA(shape, min(int(r), out, k)).num_params  # 'lora:R' is defined by LoRA's count
            else:  # below one LoRA rank per layer: lora:0.25 is a quarter of rank 1's count
                n = max(1, math.floor(r * (out + k)))
        else:
            n = int(self.budget)  # type: ignore[arg-type]
        numel = math.prod(shape)
        if n <= numel or _ranks.for_budget(self.kind, shape, n, **self.kind_options).num_params <= numel:
            return n, False
        try:
            _ranks.for_budget(self.kind, shape, numel, **self.kind_options)
        except RankError as exc:
            raise LayerTooSmall(f"layer {name!r} with weight {fmt_shape(shape)} ({numel} parameters) is smaller "
                                f"than any {self.kind!r} adapter: {exc}") from None
        return numel, True


def _spec_for_ranks(kind: str, shape: tuple[int, ...], r: Any) -> Parametrization:
    """The kind's spec at ``r``: an int is clipped to ``shape`` by the kind (``for_ranks``); a tuple is taken
    as given, so a weight that cannot take it (or a kind that takes one int) raises the kind's RankError."""
    cls = lookup(kind)
    if isinstance(r, tuple):
        return cls(shape, r)
    return cls.for_ranks(shape, r)
