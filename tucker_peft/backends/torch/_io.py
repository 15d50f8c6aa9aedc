"""Adapter files: save and validated load (export to PEFT lives in :mod:`._export`).

The file format and the atomic writer are :mod:`tucker_peft._format`'s: one
``tucker_peft_adapter.safetensors`` whose metadata holds the configuration,
replaced by one ``os.replace``; the version-1 pair (``adapter_config.json`` +
``adapter_model.safetensors``) still loads.

Loading treats the file as untrusted: every name, shape, dtype and value is
checked before the model changes (base tensors only for parameters the saved
config marks trainable; no NaN/Inf unless ``allow_nonfinite``; integer, bool
and complex tensors refused; floating ones cast to the adapter's dtype with
a warning), and any failure after that restores the model exactly: the
same state-dict keys and byte-identical values, trainability and active
adapters as before.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ..._errors import TuckerPeftError, fmt_shape
from ..._format import atomic_write, check_path, read_adapter, write_adapter
from ..._version import __version__
from ..._base import check_scale
from ...adapter import StateDictError, spec_from_json, spec_to_json
from . import _model
from ._config import AdapterConfig
from ._layers import AdaptedLayer, DeltaWeight
from ._stack import Group, StackMember, owner_path, resolve
from ._model import (Target, _adapter_dtype, _check_free, _check_name, _named_weights, _target_paths, active_adapter,
                     adapted_layers, adapter_extras, adapter_names, apply_plan, delete_adapter, extra_trainable)

__all__ = ["save_adapter", "load_adapter"]

_STACK = "stack::"  # tensor key prefix of a stack group's params: "stack::{group}::{name}"


def _write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically (used by the PEFT export)."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def _write_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file written atomically (used by the PEFT export)."""
    from safetensors.torch import save
    atomic_write(path, save(dict(tensors), metadata=dict(metadata)))


def _resolve_name(model: nn.Module, adapter_name: str | None) -> str:
    names = adapter_names(model)
    if not names:
        raise TuckerPeftError("model: has no adapters; expected a model after inject() or load_adapter()")
    if adapter_name is None:
        adapter_name = active_adapter(model) or (names[0] if len(names) == 1 else None)
        if adapter_name is None:
            raise TuckerPeftError(f"adapter_name: no adapter is active; expected one of {names}")
    if adapter_name not in names:
        raise TuckerPeftError(f"adapter_name: expected one of {names}, got {adapter_name!r}")
    return adapter_name


def _deltas(model: nn.Module, name: str) -> list[tuple[str, Any, DeltaWeight]]:
    return [(path, h, h.adapters[name]) for path, h in adapted_layers(model) if name in h.adapters]


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "device_mesh") and hasattr(t, "placements"))


def _host(t: torch.Tensor) -> torch.Tensor:
    """A full host copy; a DTensor (FSDP2 shard) is gathered first (a collective: every rank calls it)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _rank0_writes(sharded: bool) -> tuple[bool, Any]:
    """(whether this process writes, the process group) under FSDP2: rank 0 writes once."""
    if not sharded:
        return True, None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return True, None
    return dist.get_rank() == 0, dist


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write one adapter (default: the active one) to directory ``path``, atomically as a whole.

    The directory (created if needed) gets one file,
    ``tucker_peft_adapter.safetensors``: the adapter's tensors with the
    whole configuration in its metadata (see :mod:`tucker_peft._format`).
    It replaces a previous adapter there in one ``os.replace``: after a
    crash at any instant the directory holds the old adapter or the new one,
    never a mix; a killed save's temporary file is removed by the next save.
    Other files in the directory (e.g. ``save_pretrained`` output) are left
    alone. On an FSDP2-sharded model, call it on every rank (a collective):
    the shards are gathered to full tensors and rank 0 writes once.

    Parameters
    ----------
    model : nn.Module
        A model with adapters.
    path : str or PathLike
        The adapter directory.
    adapter_name : str, optional
    """
    if not isinstance(model, nn.Module):
        raise TuckerPeftError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = check_path(path)
    name = _resolve_name(model, adapter_name)
    deltas = _deltas(model, name)
    config: AdapterConfig | None = deltas[0][2].config
    layers, tensors, stacks = {}, {}, {}
    sharded = False
    for p, h, d in deltas:
        if isinstance(d, StackMember):  # the group's tensors once, each member its index
            sd = d.stacked
            layers[p] = {"stack": sd.group, "index": list(d.index), "base_shape": list(d.spec.shape),
                         "module_type": type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else None}
            if sd.group not in stacks:
                stacks[sd.group] = {"spec": json.loads(spec_to_json(sd.spec)), "scale": sd.scale,
                                    "dtype": str(next(iter(sd.params.values())).dtype).replace("torch.", ""),
                                    "has_init": bool(sd.init_names),
                                    "modes": [[m, list(v)] for m, v in sd.modes]}
                for k, v in list(sd.params.items()) + [(f"init::{k}", v) for k, v in sd.init_params().items()]:
                    sharded |= _is_dtensor(v)
                    tensors[f"{_STACK}{sd.group}::{k}"] = _host(v)
            continue
        layers[p] = {"spec": json.loads(spec_to_json(d.spec)), "scale": d.scale, "base_shape": list(d.spec.shape),
                     "dtype": str(next(iter(d.params.values())).dtype).replace("torch.", ""),
                     "module_type": type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else None,
                     "has_init": d.has_init}
        for k, v in d.params.items():
            sharded |= _is_dtensor(v)
            tensors[f"{p}::{k}"] = _host(v)
        for k, v in d.init_params().items():
            sharded |= _is_dtensor(v)
            tensors[f"{p}::init::{k}"] = _host(v)
    extra = adapter_extras(model, name)
    for k, v in extra.items():
        sharded |= _is_dtensor(v)
        tensors[f"base::{k}"] = _host(v)
    meta = {"library_version": __version__, "adapter_name": name,
            "config": config.to_dict() if config is not None else None, "layers": layers, "trainable": list(extra)}
    if stacks:
        meta["stacks"] = stacks
    writes, dist = _rank0_writes(sharded)
    error = None
    if writes:
        try:
            write_adapter(path, tensors, meta)
        except BaseException as exc:
            if dist is None:
                raise
            error = exc
    if dist is not None:  # every rank returns after the file is in place, or raises rank 0's error
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise TuckerPeftError(f"save_adapter failed on rank 0: {box[0]}")


# -- loading -------------------------------------------------------------------------------

_BAD_DTYPE = "expected a floating-point tensor"


def _check_tensor(key: str, t: torch.Tensor, shape: tuple[int, ...], allow_nonfinite: bool,
                  problems: list[str], nonfinite: list[str]) -> bool:
    if t.dtype.is_complex or not t.dtype.is_floating_point:
        problems.append(f"{key}: {_BAD_DTYPE}, got {str(t.dtype).replace('torch.', '')}")
        return False
    if tuple(t.shape) != tuple(shape):
        problems.append(f"{key}: expected shape {fmt_shape(shape)}, got {fmt_shape(t.shape)}")
        return False
    if not bool(torch.isfinite(t.float()).all()):
        if not allow_nonfinite:
            problems.append(f"{key}: contains NaN or Inf (pass allow_nonfinite=True to load it anyway)")
            return False
        nonfinite.append(key)
    return True


def _layer_entry(entry: Mapping[str, Any]) -> tuple[Any, float, bool]:
    spec_d = entry.get("spec")
    if not isinstance(spec_d, dict):
        raise StateDictError(f"'spec': expected an object, got {type(spec_d).__name__}")
    spec = spec_from_json(json.dumps(spec_d))
    try:
        scale = check_scale(entry.get("scale"), nonzero=True)
    except TuckerPeftError as exc:
        raise StateDictError(str(exc)) from None
    has_init = entry.get("has_init", False)
    if not isinstance(has_init, bool):
        raise StateDictError(f"'has_init': expected true or false, got {has_init!r:.80}")
    return spec, scale, has_init


def _load_groups(model: nn.Module, config: AdapterConfig, stacks: Mapping[str, Any],
                 members: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Any], reader: Any,
                 problems: list[str], keys: Any, used: set[str]) -> list[Group]:
    """The file's stack groups, checked against the model: the config's ``stack`` regex must pick out
    exactly the saved members, at the saved grid positions, with the member shape of the stacked spec."""
    groups: list[Group] = []
    for g in sorted(set(members) - set(stacks)):
        problems.append(f"layers of stack group {g!r}: the file has no 'stacks' entry for it")
    if not config.stack or set(config.stack) != set(stacks):
        problems.append(f"stacks {sorted(stacks)}: the saved config's stack is {config.stack!r}; expected one regex "
                        "per saved group")
        return groups
    try:
        paths = _target_paths(model, config)
        found = resolve(config, [(n, p) for p, n in paths.items()])
    except TuckerPeftError as exc:
        problems.append(f"stack: the saved config does not resolve on this model ({exc})")
        return groups
    for g, entry in stacks.items():
        used.update(k for k in keys if k.startswith(f"{_STACK}{g}::"))  # a refused group: one problem, not two
        if not isinstance(entry, Mapping):
            problems.append(f"stacks[{g!r}]: expected an object, got {type(entry).__name__}")
            continue
        try:
            spec, scale, has_init = _layer_entry(entry)
        except StateDictError as exc:
            problems.append(f"stacks[{g!r}]: bad entry ({exc})")
            continue
        modes = entry.get("modes")
        if not (isinstance(modes, list) and modes and all(
                isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], list)
                and m[1] and all(isinstance(v, str) for v in m[1]) for m in modes)):
            problems.append(f"stacks[{g!r}]: 'modes' must list [name, [values]] pairs, got {modes!r:.80}")
            continue
        modes_t = tuple((m, tuple(v)) for m, v in modes)
        lead = len(modes_t)
        if lead >= spec.ndim or tuple(len(v) for _, v in modes_t) != tuple(spec.shape[:lead]):
            problems.append(f"stacks[{g!r}]: modes {[(m, len(v)) for m, v in modes_t]} do not lead the stacked "
                            f"shape {fmt_shape(spec.shape)}")
            continue
        saved = {p: e.get("index") for p, e in members.get(g, {}).items()}
        sizes = tuple(spec.shape[:lead])
        index = {p: tuple(i) for p, i in saved.items() if isinstance(i, list) and len(i) == lead
                 and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x, n in zip(i, sizes))}
        if len(index) != len(saved) or len(set(index.values())) != len(index) or len(index) != math.prod(sizes):
            problems.append(f"stacks[{g!r}]: the saved member indices do not fill the grid {fmt_shape(sizes)} once")
            continue
        want = {p: tuple(v[x] for (_, v), x in zip(modes_t, i)) for p, i in index.items()}
        here = {p: vals for _, p, vals in found.get(g, [])}
        if here != want:
            gone = sorted(set(want) - set(here))
            new = sorted(set(here) - set(want))
            moved = sorted(p for p in set(want) & set(here) if want[p] != here[p])
            problems.append(f"stack group {g!r}: this model's members differ from the saved ones; expected exactly "
                            f"those members (missing here: {gone[:4]}, extra here: {new[:4]}, at other grid "
                            f"positions: {moved[:4]})")
            continue
        member_shape = tuple(spec.shape[lead:])
        bad = [p for p in saved if tuple(weights[p][2].shape) != member_shape]
        if bad:
            problems.append(f"stack group {g!r}: members {bad[:4]} have weight shapes "
                            f"{[fmt_shape(weights[p][2].shape) for p in bad[:4]]}; the file's member shape is "
                            f"{fmt_shape(member_shape)}")
            continue
        first = weights[next(iter(saved))][2]
        params, init = reader(f"{_STACK}{g}::", spec, has_init, _adapter_dtype(first))
        known = set(spec.param_shapes) | ({f"init::{k}" for k in spec.param_shapes} if has_init else set())
        stray = [k for k in keys if k.startswith(f"{_STACK}{g}::") and k[len(f"{_STACK}{g}::"):] not in known]
        if stray:
            problems.append(f"unexpected tensors in the file: {stray[:5]}")
        order = [p for p in weights if p in saved]  # model order
        groups.append(Group(g, spec, scale, params, init if has_init else None, {p: index[p] for p in order},
                            modes_t, owner_path([p.rsplit(".", 1)[0] if "." in p else "" for p in order], model)))
    return groups


class _Snapshot:
    """What a load may change, to restore exactly: touched tensors' bytes, trainability, active adapters."""

    def __init__(self, model: nn.Module, touched: list[torch.Tensor]) -> None:
        self.model = model
        self.names = set(adapter_names(model))
        self.grad = [(p, p.requires_grad) for p in model.parameters()]
        self.values = [(t, t.detach().clone()) for t in touched]
        self.active = [(h, tuple(h.active_adapters)) for _, h in adapted_layers(model)]
        self.hooks = {id(h) for h, _ in self.active}

    def restore(self, name: str) -> None:
        if name in adapter_names(self.model) and name not in self.names:
            try:
                delete_adapter(self.model, name)
            except Exception:  # pragma: no cover - best effort; the values below are restored anyway
                pass
        for path, h in list(adapted_layers(self.model)):  # a wrapper created before the failure, still empty
            if id(h) not in self.hooks and not len(h.adapters):
                _model._remove_hook(self.model, path, h)
        with torch.no_grad():
            for t, v in self.values:
                t.copy_(v)
        for p, g in self.grad:
            p.requires_grad_(g)
        for h, a in self.active:
            h.set_active(a)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 is_trainable: bool = True, allow_nonfinite: bool = False) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` (or ``tucker-peft extract``) onto ``model``.

    The file is read once into memory and treated as untrusted. Before
    anything changes, every layer name, shape and dtype is checked: adapter
    tensors must be floating point (integer, bool and complex are refused;
    other floating dtypes are cast to the adapter's dtype, with a warning),
    finite (unless ``allow_nonfinite``), scales finite and nonzero, and
    ``base::NAME`` tensors are accepted only for parameters that the saved
    config marks trainable, with the model's dtype and shape. On any error a
    :class:`~tucker_peft.StateDictError` says what was expected and what was
    found, and the model is left exactly as it was (same state-dict keys,
    byte-identical values, same trainability and active adapters).

    On an FSDP2-sharded model (DTensor parameters), call it on every rank
    with an adapter of that name already injected (before ``fully_shard``):
    its values are replaced, sharded like the parameters they replace.

    Parameters
    ----------
    model : nn.Module
        The base model the adapter was trained on (it may carry other adapters).
    path : str or PathLike
        The adapter directory.
    adapter_name : str, optional
        Name to load under; default: the name saved in the file.
    is_trainable : bool
        Make the loaded adapter's parameters trainable (else frozen, for inference).
    allow_nonfinite : bool
        Load NaN/Inf adapter values anyway (with a warning) instead of refusing them.

    Returns
    -------
    nn.Module
        ``model``, with the loaded adapter active.
    """
    if not isinstance(model, nn.Module):
        raise TuckerPeftError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    af = read_adapter(path)
    path = af.path
    meta = af.config
    tensors = af.tensors("torch")
    name = adapter_name if adapter_name is not None else meta.get("adapter_name") or "default"
    _check_name(name)
    cfg = dict(meta.get("config") or {})
    if cfg.get("target_modules") is None and cfg.get("target_parameters") is None:
        cfg["target_parameters"] = list(meta["layers"])
    try:
        config = AdapterConfig.from_dict(cfg)
    except (TuckerPeftError, TypeError, ValueError, RecursionError) as exc:
        raise StateDictError(f"{path}: adapter config is invalid ({exc})") from None
    weights = _named_weights(model)
    problems: list[str] = []
    nonfinite: list[str] = []
    casts: set[tuple[str, str]] = set()
    targets: list[Target] = []
    used: set[str] = set()
    touched: list[torch.Tensor] = []
    sharded = False

    def reader(prefix: str, spec: Any, has_init: bool, dtype: torch.dtype) -> tuple[dict, dict]:
        """The file's params (and 'hosvd' start) under ``prefix``, checked; problems noted, used keys marked."""
        params: dict[str, torch.Tensor] = {}
        init: dict[str, torch.Tensor] = {}
        for k, shp in spec.param_shapes.items():
            for store, key in ((params, f"{prefix}{k}"), (init, f"{prefix}init::{k}")):
                if store is init and not has_init:
                    continue
                t = tensors.get(key)
                used.add(key)
                if t is None:
                    problems.append(f"{key}: missing from the file")
                elif _check_tensor(key, t, shp, allow_nonfinite, problems, nonfinite):
                    if t.dtype != dtype:
                        casts.add((str(t.dtype).replace("torch.", ""), str(dtype).replace("torch.", "")))
                    store[k] = t.to(dtype)
        return params, init

    members: dict[str, dict[str, Any]] = {}  # stack group -> member path -> its layer entry
    for p, entry in meta["layers"].items():
        if "stack" in entry:
            members.setdefault(str(entry["stack"]), {})[p] = entry
            continue
        try:
            spec, scale, has_init = _layer_entry(entry)
        except StateDictError as exc:
            problems.append(f"{p}: bad layer entry ({exc})")
            continue
        if p not in weights:
            problems.append(f"{p}: no such weight in the model")
            continue
        mod, attr, w = weights[p]
        sharded |= _is_dtensor(w)
        if tuple(w.shape) != tuple(spec.shape):
            problems.append(f"{p}: adapter is for weight shape {fmt_shape(spec.shape)}, the model's is {fmt_shape(w.shape)}")
            continue
        params, init = reader(f"{p}::", spec, has_init, _adapter_dtype(w))
        try:
            _check_free(mod, attr, p, name, "hosvd" if has_init else "zero")
        except TuckerPeftError as exc:
            if not sharded:
                problems.append(str(exc))
        if has_init:
            touched.append(w)
        module_path = p.rsplit(".", 1)[0] if "." in p else ""
        targets.append(Target(p, module_path, attr, type(mod).__name__, spec, scale, params, init if has_init else None))
    if members or meta.get("stacks"):
        groups = _load_groups(model, config, meta.get("stacks") or {}, members, weights, reader, problems,
                              list(tensors), used)
        for g in groups:
            for p in g.members:
                mod, attr, w = weights[p]
                sharded |= _is_dtensor(w)
                try:
                    _check_free(mod, attr, p, name, "hosvd" if g.init_params is not None else "zero")
                except TuckerPeftError as exc:
                    if not _is_dtensor(w):
                        problems.append(str(exc))
                if g.init_params is not None:
                    touched.append(w)
                targets.append(Target(p, p.rsplit(".", 1)[0] if "." in p else "", attr, type(mod).__name__,
                                      g.spec.member(g.lead), g.scale, {}, None, g, g.members[p]))
    if not meta["layers"]:
        problems.append("the file adapts no layer ('layers' is empty)")
    base = {k: v for k, v in tensors.items() if k.startswith("base::")}
    try:
        allowed = extra_trainable(model, config.trainable) if base else {}
    except TuckerPeftError as exc:
        allowed = {}
        problems.append(f"trainable={config.trainable!r}: {exc}")
    listed = set(meta.get("trainable") or [])
    for k, t in base.items():
        used.add(k)
        p = allowed.get(k[6:])
        if p is None or k[6:] not in listed:
            problems.append(f"{k}: refused; the saved config does not mark {k[6:]!r} trainable "
                            f"(trainable={config.trainable!r}), or the model has no such parameter")
        elif t.dtype != p.dtype:
            problems.append(f"{k}: expected dtype {str(p.dtype).replace('torch.', '')}, got {str(t.dtype).replace('torch.', '')}")
        else:  # the values go into the adapter's own copy (adapter_extras), never into the base parameter
            _check_tensor(k, t, tuple(p.shape), allow_nonfinite, problems, nonfinite)
    extra = sorted(set(tensors) - used)
    if extra:
        problems.append(f"unexpected tensors in the file: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if sharded:
        problems += _check_sharded(model, name, targets)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise StateDictError(f"{path}: adapter does not fit this model; the model was not changed:\n  "
                             + "\n  ".join(problems[:8]) + more)
    if casts:
        warnings.warn(f"{path}: adapter tensors stored as " + ", ".join(f"{a} were cast to {b}" for a, b in sorted(casts))
                      + " (the adapter dtype of this model)", stacklevel=2)
    if nonfinite:
        warnings.warn(f"{path}: loaded NaN/Inf values (allow_nonfinite=True) in {nonfinite[:5]}", stacklevel=2)
    if sharded:
        _load_sharded(model, name, targets, base, config, is_trainable)
        return model
    snap = _Snapshot(model, touched)
    try:
        apply_plan(model, targets, name, config, trainable=is_trainable)
        extras = adapter_extras(model, name)
        with torch.no_grad():
            for k, t in base.items():
                extras[k[6:]].copy_(t)
    except BaseException:
        snap.restore(name)
        raise
    return model


def _check_sharded(model: nn.Module, name: str, targets: list[Target]) -> list[str]:
    """An FSDP2 model takes values into an adapter it already has (FSDP manages parameters from fully_shard on)."""
    hooks = dict(adapted_layers(model))
    problems = []
    for t in targets:
        d = hooks.get(t.path)
        d = d.adapters[name] if d is not None and name in d.adapters else None
        if t.group is not None and isinstance(d, StackMember):
            sd = d.stacked
            if sd.spec != t.group.spec or sd.scale != t.group.scale or sd.members != t.group.members:
                problems.append(f"{t.path}: stack group {t.group.name!r} of adapter {name!r} on this sharded model is "
                                f"{sd.spec!r} (scale {sd.scale}); the file holds {t.group.spec!r} (scale {t.group.scale})")
            continue
        if d is None or t.group is not None:
            problems.append(f"{t.path}: this FSDP2-sharded model has no adapter {name!r} here; inject the same config "
                            "before fully_shard, then load_adapter into it (or load before fully_shard)")
        elif d.spec != t.spec or d.scale != t.scale or d.has_init != (t.init_params is not None):
            problems.append(f"{t.path}: adapter {name!r} on this sharded model is {d.spec!r} (scale {d.scale}); "
                            f"the file holds {t.spec!r} (scale {t.scale})")
    return problems


def _load_sharded(model: nn.Module, name: str, targets: list[Target], base: Mapping[str, torch.Tensor],
                  config: AdapterConfig, is_trainable: bool) -> None:
    """Copy loaded values into the existing, sharded adapter params (a collective: every rank calls it)."""
    hooks = dict(adapted_layers(model))
    pairs = []
    done: set[int] = set()
    for t in targets:
        d = hooks[t.path].adapters[name]
        if t.group is not None:  # the group's params, once
            if id(d.stacked) not in done:
                done.add(id(d.stacked))
                pairs += [(d.stacked.params[k], v) for k, v in t.group.params.items()]
                pairs += [(getattr(d.stacked, f"init_{k}"), v) for k, v in (t.group.init_params or {}).items()]
            continue
        pairs += [(d.params[k], v) for k, v in t.params.items()]
        pairs += [(getattr(d, f"init_{k}"), v) for k, v in (t.init_params or {}).items()]
    extras = adapter_extras(model, name) if base else {}
    pairs += [(extras[k[6:]], v) for k, v in base.items()]
    with torch.no_grad():
        for p, v in pairs:
            _copy_into(p, v)
    _model.set_adapter(model, name, trainable=is_trainable)


def _copy_into(p: torch.Tensor, v: torch.Tensor) -> None:
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(v.to(p.to_local().device, p.dtype), p.device_mesh, p.placements)
        p.to_local().copy_(full.to_local())
    else:
        p.copy_(v.to(p.device, p.dtype))
