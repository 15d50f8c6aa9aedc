"""Model-level operations: inject, adapters by name, summary, merge."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..._base import Parametrization
from ..._errors import TuckerPeftError, fmt_shape
from . import _modules_to_save as _mts
from . import _stack
from ._config import ALL_LINEAR, AdapterConfig, LayerTooSmall, name_matches
from ._keys import attach_owner_hooks
from ._layers import AdaptedLayer, DeltaParametrization, DeltaWeight, _add_, supported_types

__all__ = [
    "inject", "add_adapter", "set_adapter", "disable_adapters", "delete_adapter", "adapter_names", "active_adapter",
    "summary", "Summary", "merge", "unmerge", "merge_and_unload", "adapted_layers", "trainable_parameters",
    "extra_trainable", "adapter_extras",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass
class Target:
    """One weight to adapt, resolved and validated before the model is touched."""

    path: str            # parameter path, e.g. "features.0.weight"
    module_path: str     # "features.0"
    attr: str            # "weight"
    module_type: str
    spec: Parametrization
    scale: float
    params: dict[str, torch.Tensor]
    init_params: dict[str, torch.Tensor] | None = None
    group: _stack.Group | None = None    # a member of this stack group (AdapterConfig.stack); params unused
    index: tuple[int, ...] = ()          # its index in the group's leading modes


# -- walking the model ----------------------------------------------------------

def _is_internal(name: str) -> bool:
    parts = name.split(".")
    return any(p in parts for p in ("adapters", "base_layer", "parametrizations", _mts.ORIGINAL, _mts.COPIES,
                                    _stack.STACKS))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer | DeltaParametrization]]:
    """``(parameter path, hook)`` of every adapted weight in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLayer):
            yield (f"{name}.weight" if name else "weight"), mod
        elif parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, DeltaParametrization):
                        yield (f"{name}.{attr}" if name else attr), p


def _base_module(mod: nn.Module) -> nn.Module:
    return mod.base_layer if isinstance(mod, AdaptedLayer) else mod


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    types = supported_types()
    for name, mod in model.named_modules():
        if not name or _is_internal(name):
            continue
        base = _base_module(mod)
        if isinstance(base, types):
            out[name] = mod
    return out


def _named_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Parameter path → (owning module, attr, current base value), parametrized weights included."""
    out: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for mname, mod in model.named_modules():
        if _is_internal(mname):
            continue
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, AdaptedLayer):
            out[prefix + "weight"] = (mod, "weight", mod.base_layer.weight)
            continue
        for attr, p in mod.named_parameters(recurse=False):
            out[prefix + attr] = (mod, attr, p)
        if parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                out[prefix + attr] = (mod, attr, plist.original)
    return out


def _linear_types() -> tuple[type, ...]:
    """``nn.Linear``, and transformers' ``Conv1D`` where the binding supports it (checked lazily)."""
    return tuple(t for t in supported_types() if issubclass(t, nn.Linear) or t.__name__ == "Conv1D")


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output head PEFT's 'all-linear' leaves out: ``get_output_embeddings()``, else ``score``/``classifier``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        for attr in ("score", "classifier"):  # PEFT's SEQ_CLS_HEAD_NAMES
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                break
    return head if isinstance(head, nn.Module) else None


def _all_linear(model: nn.Module, cands: dict[str, nn.Module]) -> list[str]:
    head, types = _output_head(model), _linear_types()
    return [n for n, m in cands.items() if isinstance(_base_module(m), types) and m is not head
            and _base_module(m) is not head]


def _select_modules(model: nn.Module, targets: Any) -> list[str]:
    cands = _candidates(model)
    if targets == ALL_LINEAR:
        return _all_linear(model, cands)
    if isinstance(targets, str):
        return [n for n in cands if re.fullmatch(targets, n)]
    chosen = []
    for name, mod in model.named_modules():
        if not name or _is_internal(name) or not any(name_matches(name, t) for t in targets):
            continue
        if name not in cands:
            raise TuckerPeftError(f"target_modules: {name!r} is a {type(mod).__name__}; expected one of "
                                  f"{[c.__name__ for c in supported_types()]} (use target_parameters for other weights)")
        chosen.append(name)
    return chosen


def _select_parameters(model: nn.Module, targets: Any, skip: set[str]) -> list[str]:
    weights = _named_weights(model)
    if isinstance(targets, str):
        return [p for p in weights if re.fullmatch(targets, p) and p not in skip]
    return [p for p in weights if any(p == t for t in targets) and p not in skip]


def _adaptable_listing(model: nn.Module, limit: int = 12) -> str:
    names = list(_candidates(model))
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more if names else "none"


# -- planning -------------------------------------------------------------------

def _adapter_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype


def _target_paths(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    """Parameter path → name (module name of a layer target, else the path) of every target, in model order."""
    module_names: list[str] = []
    if config.target_modules is not None:
        module_names = _select_modules(model, config.target_modules)
    paths = {f"{n}.weight": n for n in module_names}
    param_paths: list[str] = []
    if config.target_parameters is not None:
        param_paths = _select_parameters(model, config.target_parameters, set(paths))
    if not paths and not param_paths:
        raise TuckerPeftError(
            f"target_modules={config.target_modules!r}, target_parameters={config.target_parameters!r} matched nothing; "
            f"adaptable layers of this model: {_adaptable_listing(model)}")
    return {**paths, **{p: p for p in param_paths}}


def _init_params(spec: Parametrization, scale: float, tensor: torch.Tensor, config: AdapterConfig, name: str,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(params, init_params or None)`` of ``config.init`` for ``spec`` on the base weight ``tensor``."""
    if config.init == "zero":
        # 'matched' scales assume orthonormal factors next to the zero block, in kinds that define it
        # (those overriding matched_scale: Tucker, CP, TT); others keep their plain zero init.
        ortho = config.scale_rule == "matched" and type(spec).matched_scale is not Parametrization.matched_scale
        params = spec.init("zero", like=tensor.detach(), dtype=dtype, seed=config.seed,
                           **({"orthonormal": True} if ortho else {}))
        init = None
    else:
        method = spec.principal_init
        if method is None:
            raise TuckerPeftError(f"layer {name!r}: init='hosvd' decomposes the pretrained weight, but kind "
                                  f"{spec.kind!r} has no principal_init; expected init='zero'")
        params = spec.init(method, tensor=tensor.detach().to(torch.float64), scale=scale, seed=config.seed)
        params = {k: v.to(dtype) for k, v in params.items()}
        init = {k: v.detach().clone() for k, v in params.items()}
    return {k: v.detach().clone().contiguous() for k, v in params.items()}, init


def plan(model: nn.Module, config: AdapterConfig, adapter_name: str) -> list[Target]:
    """Resolve and initialise every target of ``config`` without changing ``model``."""
    paths = _target_paths(model, config)
    weights = _named_weights(model)
    out: list[Target] = []
    skipped: list[str] = []
    for path, name in paths.items():
        mod, attr, w = weights[path]
        base = _base_module(mod)
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise TuckerPeftError(f"layer {name!r}: nn.Embedding with max_norm renormalises its weight in place; "
                                  "expected max_norm=None")
        if w.ndim < 2:
            raise TuckerPeftError(f"target_parameters: {path!r} has shape {fmt_shape(w.shape)}; expected at least 2 dims")
        _check_free(mod, attr, path, adapter_name, config.init)
    groups = _plan_groups(model, config, paths, weights) if config.stack else []
    members = {p: g for g in groups for p in g.members}
    for path, name in paths.items():
        mod, attr, w = weights[path]
        module_path = path.rsplit(".", 1)[0] if "." in path else ""
        base = _base_module(mod)
        g = members.get(path)
        if g is not None:
            out.append(Target(path, module_path, attr, type(base).__name__, g.spec.member(g.lead), g.scale, {},
                              None, g, g.members[path]))
            continue
        try:
            spec = config.spec_for(name, tuple(w.shape))
        except LayerTooSmall as exc:
            if config.strict:
                raise LayerTooSmall(f"{exc}; under strict=True no layer is skipped") from None
            skipped.append(str(exc))
            continue
        scale = config.scale_for(name, spec)
        params, init = _init_params(spec, scale, w, config, name, _adapter_dtype(w))
        out.append(Target(path, module_path, attr, type(base).__name__, spec, scale, params, init))
    if skipped:
        if not out:
            raise LayerTooSmall("every target is smaller than its smallest adapter: " + "; ".join(skipped))
        warnings.warn(f"skipped {len(skipped)} layer(s) where any adapter would be larger than the weight "
                      "(strict=True refuses instead): " + "; ".join(skipped), stacklevel=3)
    _mts.resolve(model, config.trainable, tuple(t.path for t in out))  # errors before the model changes
    return out


def _plan_groups(model: nn.Module, config: AdapterConfig, paths: dict[str, str],
                 weights: dict[str, tuple[nn.Module, str, torch.Tensor]]) -> list[_stack.Group]:
    """The stack groups among the targets ``paths`` (see :mod:`._stack`)."""
    rows = [(name, path, weights[path][2], path.rsplit(".", 1)[0] if "." in path else "")  # the weight's module
            for path, name in paths.items()]
    return _stack.plan(model, config, rows, lambda group, spec, scale, t, w: _init_params(
        spec, scale, t, config, f"stack group {group}", _adapter_dtype(w)))


def _check_free(mod: nn.Module, attr: str, path: str, adapter_name: str, init: str) -> None:
    if parametrize.is_parametrized(mod, attr) and \
            any(isinstance(p, _mts.ParameterCopies) for p in mod.parametrizations[attr]):
        raise TuckerPeftError(f"{path!r} has trainable copies (AdapterConfig.trainable), so it cannot also be adapted; "
                              "expected a weight that no adapter lists in trainable")
    hook = _hook(mod, attr)
    if hook is None:
        return
    if adapter_name in hook.adapters:
        raise TuckerPeftError(f"adapter_name: {adapter_name!r} already exists on {path!r}; "
                              "expected a new name (or delete_adapter first)")
    if hook.merged:
        raise TuckerPeftError(f"{path!r} has adapters {list(hook.merged)} merged; unmerge before adding another")
    if init == "hosvd" or any(d.has_init for d in hook.adapters.values()):
        raise TuckerPeftError(f"{path!r}: an 'hosvd' adapter replaces the base weight by its residual, so it cannot "
                              "share the weight with another adapter; expected one adapter on this weight")


def _hook(mod: nn.Module, attr: str) -> AdaptedLayer | DeltaParametrization | None:
    if isinstance(mod, AdaptedLayer):
        return mod
    if parametrize.is_parametrized(mod, attr):
        for p in mod.parametrizations[attr]:
            if isinstance(p, DeltaParametrization):
                return p
    return None


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def apply_plan(model: nn.Module, targets: list[Target], adapter_name: str, config: AdapterConfig,
               trainable: bool = True) -> None:
    """Attach planned adapters and trainable copies, all or nothing.

    Only call after :func:`plan` (or a validated load) succeeded. On any
    exception the model is restored exactly (modules, parametrizations,
    values, ``requires_grad`` flags, active adapters) and the exception
    propagates.
    """
    undo: list[Callable[[], None]] = []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    states = [(h, _plain_state(h)) for _, h in adapted_layers(model)] + \
             [(w, _plain_state(w)) for _, w in _mts.switchable(model)]
    try:
        _attach(model, targets, adapter_name, config, undo)
        _mts.add_copies(model, adapter_name, _mts.resolve(model, config.trainable), undo)
        _freeze(model, config)
        set_adapter(model, adapter_name, trainable=trainable)
    except BaseException:
        for u in reversed(undo):
            u()
        for obj, st in states:
            obj.__dict__.update(st)
        for p, f in flags:
            p.requires_grad_(f)
        raise


def _plain_state(obj: nn.Module) -> dict[str, Any]:
    """A hook's immutable attributes (active adapter(s), merged...), to restore on failure."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, (str, tuple, frozenset, bool, int, float, type(None)))}


def _attach(model: nn.Module, targets: list[Target], adapter_name: str, config: AdapterConfig,
            undo: list[Callable[[], None]]) -> None:
    weights = _named_weights(model)
    groups: dict[int, _stack.StackedDelta] = {}  # one module per group, made at its first member
    hooks = [_hook_for(model, weights, t, undo) for t in targets]  # every hook first: a group may sit on one
    for t, hook in zip(targets, hooks):
        w = weights[t.path][2]
        if t.group is not None:
            sd = groups.get(id(t.group))
            if sd is None:
                sd = groups[id(t.group)] = _stack.attach(model, t.group, adapter_name, config, w.device, undo)
            delta: DeltaWeight = _stack.StackMember(sd, t.index)
        else:
            delta = DeltaWeight(t.spec, t.scale, {k: v.to(w.device) for k, v in t.params.items()},
                                dropout=config.dropout, forward=config.forward,
                                init_params=None if t.init_params is None else {k: v.to(w.device) for k, v in t.init_params.items()},
                                config=config)
        if delta.has_init:
            before = w.detach().clone()
            undo.append(lambda w=w, before=before: _restore_(w, before))
            _add_(w, delta.init_delta(), -1.0)
        hook.adapters[adapter_name] = delta
        undo.append(lambda hook=hook: hook.adapters.pop(adapter_name))


def _hook_for(model: nn.Module, weights: dict[str, tuple[nn.Module, str, torch.Tensor]], t: Target,
              undo: list[Callable[[], None]]) -> AdaptedLayer | DeltaParametrization:
    """The hook on ``t``'s weight, made (an AdaptedLayer, else a parametrization) if there is none yet."""
    mod, attr, _ = weights[t.path]
    hook = _hook(mod, attr)
    if hook is not None:
        return hook
    if isinstance(mod, supported_types()) and attr == "weight" and t.path == f"{t.module_path}.weight" \
            and not parametrize.is_parametrized(mod):
        layer = AdaptedLayer(mod, t.module_path)
        _set_module(model, t.module_path, layer)
        undo.append(lambda path=t.module_path, mod=mod: _set_module(model, path, mod))
        return layer
    had = parametrize.is_parametrized(mod, attr)
    p = DeltaParametrization(t.path)
    parametrize.register_parametrization(mod, attr, p, unsafe=True)
    attach_owner_hooks(mod)  # plain state-dict key for the parameter (see _keys.py)
    undo.append(lambda mod=mod, attr=attr, had=had: _unregister(mod, attr, had))
    return p


def _unregister(mod: nn.Module, attr: str, had: bool) -> None:
    """Take our parametrization off ``mod.attr`` (only ours where there were others before)."""
    if had:
        del mod.parametrizations[attr][-1]
    else:
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)


def _restore_(w: torch.Tensor, before: torch.Tensor) -> None:
    with torch.no_grad():
        w.copy_(before)


def clean_name(name: str) -> str:
    """A base parameter's name as in the unadapted model (no ``base_layer``, wrapper or parametrization parts)."""
    return _mts._clean(name)


def extra_trainable(model: nn.Module, patterns: Any) -> dict[str, nn.Parameter]:
    """The original parameters that ``patterns`` (``AdapterConfig.trainable``) designates, by unadapted name.

    Parameters
    ----------
    model : nn.Module
        With or without adapters and trainable copies.
    patterns : list of str or str or None
        Module or parameter names, or one regex (see ``AdapterConfig.trainable``).

    Returns
    -------
    dict of str to Parameter
        The originals (never trained); :func:`adapter_extras` gives an
        adapter's copies under the same names, shapes and dtypes.

    Raises
    ------
    TuckerPeftError
        If an entry matches nothing, or names an adapted layer.
    """
    out: dict[str, nn.Parameter] = {}
    res = _mts.resolve(model, patterns)
    for path, names in res.modules.items():
        mod = model.get_submodule(path)
        if isinstance(mod, _mts.ModulesToSave):
            mod = mod.original_module
        for n, p in mod.named_parameters():
            if names is None or n in names:
                out[f"{path}.{n}"] = p
    for name, (owner, attr) in res.params.items():
        mod = model.get_submodule(owner)
        out[name] = mod.parametrizations[attr].original if parametrize.is_parametrized(mod, attr) \
            else mod._parameters[attr]
    return out


def adapter_extras(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """``adapter_name``'s own trainable copies of the :func:`extra_trainable` parameters, by the same names."""
    return _mts.extras(model, adapter_name)


def _freeze(model: nn.Module, config: AdapterConfig) -> None:
    """Freeze every base parameter (originals included); adapters and copies are set by :func:`set_adapter`."""
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "adapters" not in parts and _mts.COPIES not in parts and _stack.STACKS not in parts:
            p.requires_grad_(False)


# -- public API -----------------------------------------------------------------

def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Put ``config``'s adapters on ``model`` in place, freeze the rest, make them active.

    Targets are resolved and initialised first; on any error the model is unchanged.

    Parameters
    ----------
    model : nn.Module
    config : AdapterConfig
    adapter_name : str
        A new name; several adapters can sit on one model (see :func:`set_adapter`).

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TuckerPeftError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TuckerPeftError(f"config: expected an AdapterConfig, got {type(config).__name__}")
    _check_name(adapter_name)
    targets = plan(model, config, adapter_name)
    apply_plan(model, targets, adapter_name, config)
    return model


add_adapter = inject


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TuckerPeftError(f"adapter_name: expected letters, digits, '_' or '-' (no dots), got {name!r}")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters on ``model``, in order of creation."""
    seen: dict[str, None] = {}
    for _, hook in adapted_layers(model):
        for n in hook.adapters:
            seen[n] = None
    return list(seen)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None when adapters are off or several are active)."""
    names = {n for _, hook in adapted_layers(model) for n in hook.active_adapters}
    return next(iter(names)) if len(names) == 1 else None


def set_adapter(model: nn.Module, adapter_name: str | list[str] | tuple[str, ...] | None, *,
                trainable: bool = True) -> None:
    """Make ``adapter_name`` the active adapter on every layer that has it (None or ``[]``: adapters off).

    A list activates several adapters at once: each layer adds the ``s·ΔW`` of
    every listed adapter it has. Their parameters become trainable (unless
    ``trainable=False``); the others' are frozen. Nothing changes on an error.
    """
    names = () if adapter_name is None else (adapter_name,) if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise TuckerPeftError(f"adapter_name: expected a name, a list of distinct names or None, got {adapter_name!r}")
    names = tuple(names)
    hooks = list(adapted_layers(model))
    for n in names:
        if not any(n in h.adapters for _, h in hooks):
            raise TuckerPeftError(f"adapter_name: expected one of {adapter_names(model)}, got {n!r}")
    _mts.check_active(model, names)
    for path, h in hooks:
        if any(m not in names for m in h.merged):
            raise TuckerPeftError(f"{path!r} has adapters {list(h.merged)} merged; unmerge before switching adapters")
        if any(d.has_init and n not in names for n, d in h.adapters.items()):
            raise TuckerPeftError(f"{h.layer_name!r}: its 'hosvd' adapter holds part of the base weight and "
                                  "cannot be switched off; delete it or merge it instead")
    for _, h in hooks:
        for n, d in h.adapters.items():
            for p in d.params.values():
                p.requires_grad_(trainable and n in names)
        h.set_active(n for n in names if n in h.adapters)
    _mts.set_active(model, names, trainable)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside a ``with`` block (e.g. reference outputs); adapters and their trainability return after."""
    hooks = [h for _, h in adapted_layers(model)]
    for h in hooks:
        if h.merged:
            raise TuckerPeftError(f"{h.layer_name!r} has adapters {list(h.merged)} merged; unmerge it first")
        if any(d.has_init for d in h.adapters.values()):
            raise TuckerPeftError(f"{h.layer_name!r}: its 'hosvd' adapter holds part of the base weight and "
                                  "cannot be switched off")
    saved = [h.active_adapters for h in hooks]
    copies = _mts.switch_off(model)
    try:
        for h in hooks:
            h.set_active(())
        yield model
    finally:
        _mts.switch_back(copies)
        for h, a in zip(hooks, saved):
            h.set_active(a)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; a layer left with none goes back to its base module."""
    hooks = list(adapted_layers(model))
    if not any(adapter_name in h.adapters for _, h in hooks):
        raise TuckerPeftError(f"adapter_name: expected one of {adapter_names(model)}, got {adapter_name!r}")
    for path, h in hooks:
        if adapter_name in h.merged:
            raise TuckerPeftError(f"{path!r} has {adapter_name!r} merged; unmerge it before deleting")
    for path, h in hooks:
        if adapter_name not in h.adapters:
            continue
        d = h.adapters[adapter_name]
        if d.has_init:
            _add_(_weight_of(model, path, h), d.init_delta(), 1.0)
        h.set_active(n for n in h.active_adapters if n != adapter_name)
        del h.adapters[adapter_name]
        if not len(h.adapters):
            _remove_hook(model, path, h)
    _stack.delete(model, adapter_name)
    _mts.delete(model, adapter_name)


def _weight_of(model: nn.Module, path: str, hook: Any) -> torch.Tensor:
    if isinstance(hook, AdaptedLayer):
        return hook.base_layer.weight
    mod_path, _, attr = path.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    return mod.parametrizations[attr].original


def _remove_hook(model: nn.Module, path: str, hook: Any) -> None:
    mod_path, _, attr = path.rpartition(".")
    if isinstance(hook, AdaptedLayer):
        _set_module(model, mod_path, hook.base_layer)
    else:
        mod = model.get_submodule(mod_path) if mod_path else model
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)


def merge(model: nn.Module) -> None:
    """Add the active adapters' ``s·ΔW`` into each base weight (fp32 accumulation for fp16/bf16)."""
    for path, h in adapted_layers(model):
        h.merge(_weight_of(model, path, h))


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: base weights back to fp32 rounding."""
    for path, h in adapted_layers(model):
        h.unmerge(_weight_of(model, path, h))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return ``model`` with plain torch modules again."""
    merge(model)
    for path, h in list(adapted_layers(model)):
        _remove_hook(model, path, h)
    _stack.unload(model)
    _mts.unload(model)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- summary --------------------------------------------------------------------

@dataclass
class Summary:
    """Per-layer rows of :func:`summary`; ``str()`` renders a table."""

    rows: list[dict[str, Any]]
    trainable: int
    total: int

    def __str__(self) -> str:
        head = ("layer", "type", "weight shape", "adapter", "kind", "ranks", "params", "% of W", "note")
        body = [(r["layer"], r["type"], _mts.fmt_shape_or_dash(r["shape"]), r["adapter"] + ("*" if r["active"] else ""),
                 r["kind"], r["ranks"], f"{r['params']:,}", f"{r['percent']:.2f}",
                 "clipped" if r["clipped"] else "") for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *body)]
        pct = 100.0 * self.trainable / max(1, self.total)
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} parameters ({pct:.3f}%); * = active")
        if any(r["kind"] == "copy" for r in self.rows):
            lines.append("copy = the adapter's own trainable copy of a module or parameter (AdapterConfig.trainable)")
        if any(r["clipped"] for r in self.rows):
            lines.append("clipped = the budget would give an adapter larger than the weight; capped at its size")
        for r in self.rows:
            if "members" in r:  # a stack group (AdapterConfig.stack): its members, once
                m = r["members"]
                lines.append(f"stack {r['layer']} [{r['adapter']}]: " + ", ".join(m[:4])
                             + (f", ... ({len(m)} in all)" if len(m) > 4 else ""))
        return "\n".join(lines)


def _ranks_text(spec: Parametrization) -> str:
    """The ranks as the kind shows them (the contract's ``describe_ranks``, as in the CLI)."""
    return spec.describe_ranks()


def _clipped(d: DeltaWeight, layer: str) -> bool:
    """Whether ``d``'s budget was capped at its weight's size (see ``AdapterConfig.budget_for``)."""
    cfg = d.config
    if not isinstance(cfg, AdapterConfig) or cfg.budget is None or cfg._pattern(cfg.rank_pattern, layer) is not None:
        return False
    try:
        return cfg.budget_for(layer, d.spec.shape)[1]
    except TuckerPeftError:
        return False


def summary(model: nn.Module) -> Summary:
    """Each adapted weight: shape, kind, ranks, trainable parameters and their share of the weight.

    Rows of kind ``'copy'`` are an adapter's trainable copies of modules
    (``AdapterConfig.trainable``); ``clipped`` marks a layer whose budget was
    capped at the weight's own size.
    """
    rows = []
    for path, h in adapted_layers(model):
        layer = h.layer_name or path
        typ = type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else "Parameter"
        for n, d in h.adapters.items():
            if isinstance(d, _stack.StackMember):
                continue  # its group has one row
            p = d.spec.num_params
            rows.append(dict(layer=layer, type=typ, shape=tuple(d.spec.shape), adapter=n, active=n in h.active_adapters,
                             kind=d.spec.kind, ranks=_ranks_text(d.spec), params=p,
                             percent=100.0 * p / math.prod(d.spec.shape), clipped=_clipped(d, layer)))
    rows += _stack.summary_rows(model, _ranks_text)
    rows += _mts.summary_rows(model)
    total = sum(p.numel() for p in model.parameters())
    return Summary(rows, trainable_parameters(model), total)
