"""Model-level operations: inject, adapters by name, summary, merge."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..._base import Parametrization
from ..._errors import TuckerPeftError, fmt_shape
from ._config import AdapterConfig, name_matches
from ._layers import AdaptedLayer, DeltaParametrization, DeltaWeight, _add_, supported_types

__all__ = [
    "inject", "add_adapter", "set_adapter", "disable_adapters", "delete_adapter", "adapter_names", "active_adapter",
    "summary", "Summary", "merge", "unmerge", "merge_and_unload", "adapted_layers", "trainable_parameters",
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


# -- walking the model ----------------------------------------------------------

def _is_internal(name: str) -> bool:
    parts = name.split(".")
    return "adapters" in parts or "base_layer" in parts or "parametrizations" in parts


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


def _select_modules(model: nn.Module, targets: Any) -> list[str]:
    cands = _candidates(model)
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


def plan(model: nn.Module, config: AdapterConfig, adapter_name: str) -> list[Target]:
    """Resolve and initialise every target of ``config`` without changing ``model``."""
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
    weights = _named_weights(model)
    out = []
    for path in list(paths) + param_paths:
        mod, attr, w = weights[path]
        module_path = path.rsplit(".", 1)[0] if "." in path else ""
        base = _base_module(mod)
        name = paths.get(path, path)
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise TuckerPeftError(f"layer {name!r}: nn.Embedding with max_norm renormalises its weight in place; "
                                  "expected max_norm=None")
        if w.ndim < 2:
            raise TuckerPeftError(f"target_parameters: {path!r} has shape {fmt_shape(w.shape)}; expected at least 2 dims")
        _check_free(mod, attr, path, adapter_name, config.init)
        spec = config.spec_for(name, tuple(w.shape))
        scale = config.scale_for(name, spec)
        dtype = _adapter_dtype(w)
        if config.init == "zero":
            params = spec.init("zero", like=w.detach(), dtype=dtype, seed=config.seed)
            if config.scale_rule == "matched":
                params = _orthonormal_factors(spec, params)
            init = None
        else:
            tensor = w.detach().to(torch.float64)
            method = {"tucker": "hosvd", "tucker2": "hosvd", "cp": "parafac", "lora": "svd"}.get(spec.kind, "hosvd")
            params = spec.init(method, tensor=tensor, scale=scale, seed=config.seed)
            params = {k: v.to(dtype) for k, v in params.items()}
            init = {k: v.detach().clone() for k, v in params.items()}
        params = {k: v.detach().clone().contiguous() for k, v in params.items()}
        out.append(Target(path, module_path, attr, type(base).__name__, spec, scale, params, init))
    return out


def _orthonormal_factors(spec: Parametrization, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tucker: each random factor replaced by its QR's Q; CP: unit-norm columns. The zero block stays zero."""
    out = dict(params)
    for k, v in params.items():
        if not k.startswith("factor_"):
            continue
        if spec.kind == "cp":
            out[k] = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        else:
            q, r = torch.linalg.qr(v.double())
            out[k] = (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).to(v.dtype)
    return out


def _check_free(mod: nn.Module, attr: str, path: str, adapter_name: str, init: str) -> None:
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
    """Attach planned adapters. Only call after :func:`plan` (or a validated load) succeeded."""
    weights = _named_weights(model)
    for t in targets:
        mod, attr, w = weights[t.path]
        hook = _hook(mod, attr)
        if hook is None:
            if isinstance(mod, supported_types()) and attr == "weight" and t.path in (f"{t.module_path}.weight",) \
                    and not parametrize.is_parametrized(mod):
                hook = AdaptedLayer(mod, t.module_path)
                _set_module(model, t.module_path, hook)
            else:
                hook = DeltaParametrization(t.path)
                parametrize.register_parametrization(mod, attr, hook, unsafe=True)
        delta = DeltaWeight(t.spec, t.scale, {k: v.to(w.device) for k, v in t.params.items()},
                            dropout=config.dropout, forward=config.forward,
                            init_params=None if t.init_params is None else {k: v.to(w.device) for k, v in t.init_params.items()},
                            config=config)
        if t.init_params is not None:
            _add_(w, delta.init_delta(), -1.0)
        hook.adapters[adapter_name] = delta
    _freeze(model, config)
    set_adapter(model, adapter_name, trainable=trainable)


def clean_name(name: str) -> str:
    """A base parameter's name as in the unadapted model (no ``base_layer`` or parametrization parts)."""
    name = name.replace(".base_layer.", ".")
    if name.startswith("base_layer."):
        name = name[len("base_layer."):]
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)


def extra_trainable(model: nn.Module, patterns: Any) -> dict[str, nn.Parameter]:
    """Base parameters (by their unadapted names) that ``patterns`` marks trainable."""
    out: dict[str, nn.Parameter] = {}
    if patterns is None:
        return out
    for name, p in model.named_parameters():
        if ".adapters." in f".{name}":
            continue
        clean = clean_name(name)
        hit = re.fullmatch(patterns, clean) is not None if isinstance(patterns, str) \
            else any(name_matches(clean, t) for t in patterns)
        if hit:
            out[clean] = p
    return out


def _freeze(model: nn.Module, config: AdapterConfig) -> None:
    keep = {id(p) for p in extra_trainable(model, config.trainable).values()}
    for name, p in model.named_parameters():
        if ".adapters." not in f".{name}":
            p.requires_grad_(id(p) in keep)


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
    try:
        for h in hooks:
            h.set_active(())
        yield model
    finally:
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
        head = ("layer", "type", "weight shape", "adapter", "kind", "ranks", "params", "% of W")
        body = [(r["layer"], r["type"], fmt_shape(r["shape"]), r["adapter"] + ("*" if r["active"] else ""),
                 r["kind"], r["ranks"], f"{r['params']:,}", f"{r['percent']:.2f}") for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (head, *body)]
        pct = 100.0 * self.trainable / max(1, self.total)
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} parameters ({pct:.3f}%); * = active")
        return "\n".join(lines)


def _ranks_text(spec: Parametrization) -> str:
    r = getattr(spec, "ranks", None)
    if r is not None:
        return "(" + ", ".join("-" if x is None else str(x) for x in r) + ")"
    return str(getattr(spec, "rank", "?"))


def summary(model: nn.Module) -> Summary:
    """Each adapted weight: shape, kind, ranks, trainable parameters and their share of the weight."""
    rows = []
    for path, h in adapted_layers(model):
        layer = h.layer_name or path
        typ = type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else "Parameter"
        for n, d in h.adapters.items():
            p = d.spec.num_params
            rows.append(dict(layer=layer, type=typ, shape=tuple(d.spec.shape), adapter=n, active=n in h.active_adapters,
                             kind=d.spec.kind, ranks=_ranks_text(d.spec), params=p,
                             percent=100.0 * p / math.prod(d.spec.shape)))
    total = sum(p.numel() for p in model.parameters())
    return Summary(rows, trainable_parameters(model), total)
