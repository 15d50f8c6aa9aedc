"""Adapter files: save and validated load (export to PEFT lives in :mod:`._export`).

Format (a directory)::

    adapter_config.json        {"format", "library_version", "adapter_name", "config",
                                "layers": {param path: {"spec", "scale", "base_shape", "dtype",
                                                         "module_type", "has_init"}},
                                "trainable": [base parameter names]}
    adapter_model.safetensors  "{param path}::{name}"        adapter params
                               "{param path}::init::{name}"  params ΔW started from ('hosvd' init)
                               "base::{param name}"          extra trained base parameters

Both files are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..._errors import TuckerPeftError, fmt_shape
from ..._version import __version__
from ...adapter import StateDictError, spec_from_json, spec_to_json
from ._config import AdapterConfig
from ._layers import AdaptedLayer, DeltaWeight
from ._model import (Target, _check_free, _check_name, _named_weights, active_adapter, adapted_layers,
                     adapter_extras, adapter_names, apply_plan, delete_adapter, extra_trainable)

__all__ = ["save_adapter", "load_adapter"]

FORMAT = "tucker_peft.torch_adapter/1"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    _atomic_write(path, w)


def _write_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file
    _atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


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


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write one adapter (default: the active one) to directory ``path``.

    Parameters
    ----------
    model : nn.Module
        A model with adapters.
    path : str or PathLike
        Directory, created if needed; ``adapter_config.json`` and
        ``adapter_model.safetensors`` in it are replaced atomically.
    adapter_name : str, optional
    """
    name = _resolve_name(model, adapter_name)
    deltas = _deltas(model, name)
    config: AdapterConfig | None = deltas[0][2].config
    layers, tensors = {}, {}
    for p, h, d in deltas:
        layers[p] = {"spec": json.loads(spec_to_json(d.spec)), "scale": d.scale, "base_shape": list(d.spec.shape),
                     "dtype": str(next(iter(d.params.values())).dtype).replace("torch.", ""),
                     "module_type": type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else None,
                     "has_init": d.has_init}
        for k, v in d.params.items():
            tensors[f"{p}::{k}"] = _cpu(v)
        for k, v in d.init_params().items():
            tensors[f"{p}::init::{k}"] = _cpu(v)
    extra = adapter_extras(model, name)
    for k, v in extra.items():
        tensors[f"base::{k}"] = _cpu(v)
    meta = {"format": FORMAT, "library_version": __version__, "adapter_name": name,
            "config": config.to_dict() if config is not None else None, "layers": layers, "trainable": list(extra)}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write_tensors(os.path.join(path, WEIGHTS_FILE), tensors, {"format": FORMAT})
    _write_json(os.path.join(path, CONFIG_FILE), meta)


def _read(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for f in (cfg_path, w_path):
        if not os.path.isfile(f):
            raise StateDictError(f"path: expected an adapter directory with {CONFIG_FILE} and {WEIGHTS_FILE}, "
                                 f"but {f} does not exist")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise StateDictError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise StateDictError(f"{cfg_path}: expected format {FORMAT!r} with a 'layers' table, "
                             f"got format {meta.get('format') if isinstance(meta, dict) else None!r}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StateDictError(f"{w_path}: corrupt or truncated safetensors file ({exc})") from None
    return meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 is_trainable: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` (or ``tucker-peft extract``) onto ``model``.

    Every layer name, shape and tensor is checked before anything changes; on
    any mismatch or a corrupt file a :class:`~tucker_peft.StateDictError`
    says what was expected and what was found, and the model is unchanged.

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

    Returns
    -------
    nn.Module
        ``model``, with the loaded adapter active.
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    name = adapter_name if adapter_name is not None else meta.get("adapter_name") or "default"
    _check_name(name)
    cfg = dict(meta.get("config") or {})
    if cfg.get("target_modules") is None and cfg.get("target_parameters") is None:
        cfg["target_parameters"] = list(meta["layers"])
    try:
        config = AdapterConfig.from_dict(cfg)
    except TuckerPeftError as exc:
        raise StateDictError(f"{path}: adapter config is invalid ({exc})") from None
    weights = _named_weights(model)
    problems: list[str] = []
    targets: list[Target] = []
    used: set[str] = set()
    for p, entry in meta["layers"].items():
        try:
            spec = spec_from_json(json.dumps(entry["spec"]))
            scale = float(entry["scale"])
            has_init = bool(entry.get("has_init", False))
        except (StateDictError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{p}: bad layer entry ({exc})")
            continue
        if p not in weights:
            problems.append(f"{p}: no such weight in the model")
            continue
        mod, attr, w = weights[p]
        if tuple(w.shape) != tuple(spec.shape):
            problems.append(f"{p}: adapter is for weight shape {fmt_shape(spec.shape)}, the model's is {fmt_shape(w.shape)}")
            continue
        params, init = {}, {}
        for k, shp in spec.param_shapes.items():
            for store, key in ((params, f"{p}::{k}"), (init, f"{p}::init::{k}")):
                if store is init and not has_init:
                    continue
                t = tensors.get(key)
                used.add(key)
                if t is None:
                    problems.append(f"{key}: missing from the file")
                elif tuple(t.shape) != tuple(shp):
                    problems.append(f"{key}: expected shape {fmt_shape(shp)}, got {fmt_shape(t.shape)}")
                else:
                    store[k] = t.to(w.device)
        try:
            _check_free(mod, attr, p, name, "hosvd" if has_init else "zero")
        except TuckerPeftError as exc:
            problems.append(str(exc))
        module_path = p.rsplit(".", 1)[0] if "." in p else ""
        targets.append(Target(p, module_path, attr, type(mod).__name__, spec, scale, params, init if has_init else None))
    base = {k: v for k, v in tensors.items() if k.startswith("base::")}
    try:
        clean = extra_trainable(model, config.trainable)
    except TuckerPeftError as exc:
        clean = {}
        problems.append(str(exc))
    for k, t in base.items():
        used.add(k)
        p = clean.get(k[6:])
        if p is None:
            problems.append(f"{k}: not a parameter that the adapter's config marks trainable in this model")
        elif tuple(p.shape) != tuple(t.shape):
            problems.append(f"{k}: expected shape {fmt_shape(p.shape)}, got {fmt_shape(t.shape)}")
    extra = sorted(set(tensors) - used)
    if extra:
        problems.append(f"unexpected tensors in the file: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise StateDictError(f"{path}: adapter does not fit this model; the model was not changed:\n  "
                             + "\n  ".join(problems[:8]) + more)
    try:
        apply_plan(model, targets, name, config, trainable=is_trainable)
        extras = adapter_extras(model, name)
        with torch.no_grad():
            for k, t in base.items():
                extras[k[6:]].copy_(t)
    except BaseException:
        if name in adapter_names(model):
            delete_adapter(model, name)
        raise
    return model
