"""Cross-layer adapters (``AdapterConfig.stack``): one decomposed ΔW shared by a group of layers.

A group's members are planned targets whose full name (module name or
parameter path) a regex matches with ``re.fullmatch``; each named capture
group is a leading mode of the stacked ΔW ``(*mode sizes, *member shape)``.
The group's parameters live ONCE in a :class:`StackedDelta` registered on the
members' lowest common ancestor (``<owner>.adapter_stacks[<group>][<adapter>]``);
each member layer holds a :class:`StackMember`, a :class:`DeltaWeight` whose
params are the kind's ``spec.slice`` of the group's (never the whole stack),
so the layers' forward, merge, strategy and export run unchanged.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ... import ranks as _ranks
from ..._base import Parametrization
from ..._errors import RankError, TuckerPeftError, fmt_shape
from ._config import AdapterConfig, LayerTooSmall, _spec_for_ranks, pattern_matches
from ._layers import DeltaWeight, hold_params

__all__ = ["StackedDelta", "StackMember", "Group"]

#: Attribute of the owner module that holds the groups: ``adapter_stacks[group][adapter]``.
STACKS = "adapter_stacks"
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)


@dataclass
class Group:
    """One group of one adapter, resolved and initialised before the model changes."""

    name: str
    spec: Parametrization                      # the stacked spec, shape (*mode sizes, *member shape)
    scale: float
    params: dict[str, torch.Tensor]
    init_params: dict[str, torch.Tensor] | None
    members: dict[str, tuple[int, ...]]        # parameter path -> grid index, in model order
    modes: tuple[tuple[str, tuple[str, ...]], ...]  # (capture name, its values in index order)
    owner: str                                 # module path the StackedDelta is registered on

    @property
    def lead(self) -> int:
        return len(self.modes)


# -- resolving groups ------------------------------------------------------------------------------

def _sort_values(values: list[str]) -> list[str]:
    """Numeric order if every value is a digit string, else order of first appearance."""
    if all(v.isdigit() for v in values):
        return sorted(values, key=int)
    return values


def _fmt_cell(modes: list[str], cell: tuple[str, ...]) -> str:
    return ", ".join(f"{m}={v}" for m, v in zip(modes, cell))


def resolve(config: AdapterConfig, targets: list[tuple[str, str]]) -> dict[str, list[tuple[str, str, tuple[str, ...]]]]:
    """Members of each group: ``group -> [(name, path, capture values)]`` in model order.

    Parameters
    ----------
    config : AdapterConfig
        With ``stack``.
    targets : list of (name, parameter path)
        The planned targets in model order; ``name`` is the module name of a
        layer target, the parameter path of a parameter target.

    Raises
    ------
    TuckerPeftError
        A target matching two groups, a group matching no target, or a member
        whose capture groups did not all take part in the match.
    """
    rxs = {g: re.compile(rx) for g, rx in (config.stack or {}).items()}
    out: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {g: [] for g in rxs}
    for name, path in targets:
        hits = []
        for g, rx in rxs.items():
            m = rx.fullmatch(name) or (rx.fullmatch(path) if path != name else None)
            if m is not None:
                hits.append((g, m))
        if len(hits) > 1:
            raise TuckerPeftError(f"stack: {name!r} matches groups {[g for g, _ in hits]}; expected each target in "
                                  "at most one group")
        if hits:
            g, m = hits[0]
            modes = _modes(rxs[g])
            vals = tuple(m.group(k) for k in modes)
            if any(v is None for v in vals):
                missing = [k for k, v in zip(modes, vals) if v is None]
                raise TuckerPeftError(f"stack[{g!r}]: {name!r} matches without capture group(s) {missing}; expected "
                                      "every named group to take a value (one per leading mode)")
            out[g].append((name, path, vals))
    for g, members in out.items():
        if not members:
            listing = ", ".join(repr(n) for n, _ in targets[:6]) + (", ..." if len(targets) > 6 else "")
            raise TuckerPeftError(f"stack[{g!r}]: the regex {config.stack[g]!r} matches none of the targets "
                                  f"({listing}); expected it to fullmatch target module names or parameter paths")
    return out


def _modes(rx: re.Pattern) -> list[str]:
    return [k for k, _ in sorted(rx.groupindex.items(), key=lambda kv: kv[1])]


def grid(group: str, mode_names: list[str], members: list[tuple[str, tuple[str, ...]]]
         ) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], dict[str, tuple[int, ...]]]:
    """The modes (name, values) and each member's index; the members must fill the grid once.

    ``members`` are ``(key, capture values)`` in model order.
    """
    values = []
    for n in range(len(mode_names)):
        seen = list(dict.fromkeys(v[n] for _, v in members))
        values.append(tuple(_sort_values(seen)))
    pos = [{v: i for i, v in enumerate(vs)} for vs in values]
    index: dict[str, tuple[int, ...]] = {}
    where: dict[tuple[str, ...], str] = {}
    for key, vals in members:
        if vals in where:
            raise TuckerPeftError(f"stack[{group!r}]: {where[vals]!r} and {key!r} both have "
                                  f"{_fmt_cell(mode_names, vals)}; expected one member per grid cell (add a capture "
                                  "group that tells them apart)")
        where[vals] = key
        index[key] = tuple(p[v] for p, v in zip(pos, vals))
    missing = [c for c in itertools.product(*values) if c not in where]
    if missing:
        shown = "; ".join(_fmt_cell(mode_names, c) for c in missing[:6]) + ("; ..." if len(missing) > 6 else "")
        sizes = " × ".join(f"{m}={len(v)}" for m, v in zip(mode_names, values))
        raise TuckerPeftError(f"stack[{group!r}]: the members do not fill the grid {sizes}: {len(missing)} missing "
                              f"({shown}); expected a target for every combination of the captured values")
    return tuple(zip(mode_names, values)), index


def owner_path(module_paths: list[str], model: nn.Module) -> str:
    """Where a group's module goes: the deepest common ancestor of the members that is a strict ancestor of
    each and not a container (a ModuleList or Sequential would iterate over it); the first member's own
    module where the model itself is a container.

    Registered there, outside every member layer, FSDP2 per-layer units never own the group's parameters:
    they fall in the unit that encloses all members (or the root), gathered once for all of them.
    """
    parts = [p.split(".") if p else [] for p in module_paths]
    common: list[str] = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    if any(len(common) >= len(p) for p in parts):  # a member is the ancestor itself: go to its parent
        common = common[: min(len(p) for p in parts) - 1]
    while common and isinstance(model.get_submodule(".".join(common)), _CONTAINERS):
        common.pop()
    if not common and isinstance(model, _CONTAINERS):
        # The model itself is a Sequential (or a list): it would call (or yield) the group. Its first member's
        # layer holds it instead; its forward never looks at other children.
        return module_paths[0]
    return ".".join(common)


def _matched(spec: Parametrization, lead: int) -> float:
    """``spec.matched_scale(lead=lead)``; a third-party kind whose matched_scale takes no ``lead`` gets its own."""
    try:
        takes = "lead" in inspect.signature(spec.matched_scale).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        takes = False
    return spec.matched_scale(lead=lead) if takes else spec.matched_scale()


def _budget(config: AdapterConfig, names: list[str], shape: tuple[int, ...]) -> int:
    """Σ over members of each member's budget (capped at its weight's size, as for a layer)."""
    total = 0
    for n in names:
        try:
            total += config.budget_for(n, shape)[0]
        except LayerTooSmall:  # a member smaller than a per-layer adapter still adds its size to the group's
            total += math.prod(shape)
    return total


def group_spec(config: AdapterConfig, group: str, stacked: tuple[int, ...], names: list[str],
               member_shape: tuple[int, ...]) -> Parametrization:
    """The kind's spec on the stacked shape: ``rank_pattern[group]`` or ``ranks`` (an int clipped per mode, a
    tuple per mode, leading first), or under ``budget`` the largest within Σ of the members' budgets."""
    r = config._pattern(config.rank_pattern, group)
    try:
        if r is None and config.budget is not None:
            return _ranks.for_budget(config.kind, stacked, _budget(config, names, member_shape), **config.kind_options)
        return _spec_for_ranks(config.kind, stacked, config.ranks if r is None else r)
    except TuckerPeftError as exc:
        raise RankError(f"stack[{group!r}] on stacked shape {fmt_shape(stacked)}: {exc}") from None


def group_scale(config: AdapterConfig, group: str, spec: Parametrization, lead: int) -> float:
    a = config.alpha_for(group)
    return a * _matched(spec, lead) if config.scale_rule == "matched" else a


def check_patterns(config: AdapterConfig, group: str, names: list[str]) -> None:
    """A ``rank_pattern`` / ``alpha_pattern`` key that picks out a member (not its group) would be ignored: refuse it."""
    for what, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if pattern_matches(group, key):
                continue
            hit = next((n for n in names if pattern_matches(n, key)), None)
            if hit is not None:
                raise TuckerPeftError(f"{what}[{key!r}] matches {hit!r}, a member of stack group {group!r}, which "
                                      f"has one spec and one scale; expected a key naming the group ({group!r})")


def plan(model: nn.Module, config: AdapterConfig, targets: list[tuple[str, str, torch.Tensor, str]],
         init: Callable[[str, Parametrization, float, torch.Tensor, torch.Tensor], tuple[dict, dict | None]]
         ) -> list[Group]:
    """Resolve, check and initialise every group, without changing ``model``.

    Parameters
    ----------
    targets : list of (name, parameter path, base weight, owning module path)
        The planned targets, in model order.
    init : callable
        ``init(group, spec, scale, tensor, first member weight) -> (params, init_params or None)``:
        the binding's per-layer initialisation, on the stacked base weights (float64) for 'hosvd'.
    """
    by_path = {path: (name, w, mod) for name, path, w, mod in targets}
    out = []
    for g, members in resolve(config, [(n, p) for n, p, _, _ in targets]).items():
        mode_names = _modes(re.compile(config.stack[g]))  # type: ignore[index]
        modes, index = grid(g, mode_names, [(path, vals) for _, path, vals in members])
        shapes = {tuple(by_path[p][1].shape) for _, p, _ in members}
        if len(shapes) > 1:
            listing = "; ".join(f"{n!r}: {fmt_shape(by_path[p][1].shape)}" for n, p, _ in members[:8])
            raise TuckerPeftError(f"stack[{g!r}]: members differ in weight shape ({listing}); expected one shape "
                                  "for every member of a group")
        dtypes = {by_path[p][1].dtype for _, p, _ in members}
        devices = {by_path[p][1].device for _, p, _ in members}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TuckerPeftError(f"stack[{g!r}]: members differ in dtype or device ({sorted(map(str, dtypes))}, "
                                  f"{sorted(map(str, devices))}); expected one for the whole group")
        (member_shape,) = shapes
        names = [n for n, _, _ in members]
        check_patterns(config, g, names)
        stacked = tuple(len(v) for _, v in modes) + member_shape
        spec = group_spec(config, g, stacked, names, member_shape)
        scale = group_scale(config, g, spec, len(modes))
        first = by_path[members[0][1]][1]
        if config.init == "hosvd":  # the kind's principal init on the stacked base weights
            tensor = first.new_zeros(stacked, dtype=torch.float64)
            for _, p, _ in members:
                tensor[index[p]] = by_path[p][1].detach().to(torch.float64)
        else:
            tensor = first.detach()
        params, init_params = init(g, spec, scale, tensor, first)
        owner = owner_path([by_path[p][2] for _, p, _ in members], model)
        out.append(Group(g, spec, scale, params, init_params, {p: index[p] for _, p, _ in members}, modes, owner))
    return out


# -- modules -----------------------------------------------------------------------------------------

class StackedDelta(nn.Module):
    """A group's trainable params (and 'hosvd' start) for one adapter: ``s·ΔW`` of the stacked shape.

    Parameters
    ----------
    group : str
    spec : Parametrization
        On ``(*mode sizes, *member shape)``.
    scale : float
    params, init_params : dict of str to Tensor
    members : dict of str to tuple of int
        Member parameter path → its index in the leading modes.
    modes : tuple of (str, tuple of str)
        Each leading mode's capture name and values.
    """

    def __init__(self, group: str, spec: Parametrization, scale: float, params: Mapping[str, torch.Tensor],
                 init_params: Mapping[str, torch.Tensor] | None, members: Mapping[str, tuple[int, ...]],
                 modes: tuple[tuple[str, tuple[str, ...]], ...], *, forward: str = "auto", dropout: float = 0.0,
                 config: Any = None) -> None:
        super().__init__()
        self.group = group
        self.spec = spec
        self.scale = float(scale)
        self.members = dict(members)
        self.modes = modes
        self.forward_mode = forward
        self.dropout_p = dropout
        self.config = config
        hold_params(self, params, init_params)

    @property
    def lead(self) -> int:
        return len(self.modes)

    def param_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.params.items()}

    def init_params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"init_{k}") for k in self.init_names}

    def extra_repr(self) -> str:
        sizes = " × ".join(f"{m}={len(v)}" for m, v in self.modes)
        return f"{self.spec!r}, scale={self.scale}, modes={sizes}, members={len(self.members)}"


class StackMember(DeltaWeight):
    """One member layer's adapter: the group's ``spec.member``, with params ``spec.slice(group params, index)``.

    The group is held without being registered as a submodule, so its params
    appear once in ``state_dict`` / ``parameters()`` (at the owner module).
    ``params`` is the group's ParameterDict (trainability, saving);
    :meth:`param_dict` gives this member's slice, with autograd into it.
    """

    def __init__(self, group: StackedDelta, index: tuple[int, ...]) -> None:
        self.__dict__["stacked"] = group  # not in _modules: no second copy of the group's params
        self.__dict__["index"] = tuple(int(i) for i in index)
        # DeltaWeight's own set-up (forward mode, dropout, the three-stage check on this member's slice),
        # with no params of its own: ``params`` below is the group's.
        super().__init__(group.spec.member(len(self.index)), group.scale, {}, dropout=group.dropout_p,
                         forward=group.forward_mode, config=group.config)
        del self._modules["params"]
        self.init_names = group.init_names

    stacked: StackedDelta

    @property
    def params(self) -> nn.ParameterDict:  # type: ignore[override]
        """The group's trainable params (shared by every member)."""
        return self.stacked.params

    def param_dict(self) -> dict[str, torch.Tensor]:
        g = self.stacked
        return g.spec.slice(g.param_dict(), self.index)

    def init_params(self) -> dict[str, torch.Tensor]:
        g = self.stacked
        return g.spec.slice(g.init_params(), self.index) if g.init_names else {}

    def extra_repr(self) -> str:
        return f"member {self.index} of stack {self.stacked.group!r}: {self.spec!r}, scale={self.scale}"


def _active(model: nn.Module, sd: StackedDelta, adapter: str) -> bool:
    """Whether ``adapter`` is active on the group's first member layer (all members switch together)."""
    from ._model import _hook, _named_weights
    path = next(iter(sd.members))
    mod, attr, _ = _named_weights(model)[path]
    hook = _hook(mod, attr)
    return hook is not None and adapter in hook.active_adapters


# -- on a model ------------------------------------------------------------------------------------------

def stacks(model: nn.Module) -> Iterator[tuple[str, str, str, StackedDelta]]:
    """``(owner path, group, adapter, module)`` of every group on ``model``."""
    for path, mod in model.named_modules():
        holder = getattr(mod, STACKS, None) if not isinstance(mod, StackedDelta) else None
        if isinstance(holder, nn.ModuleDict) and mod._modules.get(STACKS) is holder:
            for g, per in holder.items():
                for a, sd in per.items():
                    yield path, g, a, sd


def attach(model: nn.Module, group: Group, adapter: str, config: AdapterConfig, device: Any,
           undo: list[Callable[[], None]]) -> StackedDelta:
    """Register ``group``'s module for ``adapter`` on its owner (``undo`` takes it off again)."""
    owner = model.get_submodule(group.owner) if group.owner else model
    sd = StackedDelta(group.name, group.spec, group.scale, {k: v.to(device) for k, v in group.params.items()},
                      None if group.init_params is None else {k: v.to(device) for k, v in group.init_params.items()},
                      group.members, group.modes, forward=config.forward, dropout=config.dropout, config=config)
    holder = owner._modules.get(STACKS)
    if holder is None:
        holder = nn.ModuleDict()
        owner.add_module(STACKS, holder)
    if group.name not in holder:
        holder[group.name] = nn.ModuleDict()
    if adapter in holder[group.name]:
        raise TuckerPeftError(f"adapter_name: {adapter!r} already has stack group {group.name!r} on "
                              f"{group.owner or 'the model'!r}; expected a new name")
    holder[group.name][adapter] = sd
    undo.append(lambda: _remove(owner, group.name, adapter))
    return sd


def _remove(owner: nn.Module, group: str, adapter: str) -> None:
    holder = owner._modules.get(STACKS)
    if holder is None or group not in holder:
        return
    per = holder[group]
    if adapter in per:
        del per[adapter]
    if not len(per):
        del holder[group]
    if not len(holder):
        del owner._modules[STACKS]


def delete(model: nn.Module, adapter: str) -> None:
    """Take ``adapter``'s groups off ``model``."""
    for path, g, a, _ in list(stacks(model)):
        if a == adapter:
            _remove(model.get_submodule(path) if path else model, g, a)


def unload(model: nn.Module) -> None:
    """Take every group off ``model`` (after :func:`merge_and_unload` removed the member hooks)."""
    for path, g, a, _ in list(stacks(model)):
        _remove(model.get_submodule(path) if path else model, g, a)


def summary_rows(model: nn.Module, ranks_text: Callable[[Parametrization], str]) -> list[dict[str, Any]]:
    """One row per group and adapter: mode sizes, stacked shape, kind, ranks, params (share of the members)."""
    rows = []
    for _, g, a, sd in stacks(model):
        n = len(sd.members)
        member = math.prod(sd.spec.shape[sd.lead:])
        p = sd.spec.num_params
        rows.append(dict(layer=f"{g} (stack of {n})", type="stack " + "×".join(f"{m}={len(v)}" for m, v in sd.modes),
                         shape=tuple(sd.spec.shape), adapter=a, active=_active(model, sd, a), kind=sd.spec.kind,
                         ranks=ranks_text(sd.spec), params=p, percent=100.0 * p / max(1, n * member),
                         clipped=False, members=list(sd.members)))
    return rows
