"""Weighted combination of adapters into a new one, exact (each kind's ``concat``)."""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

from torch import nn

from ..._errors import TuckerPeftError
from ._config import AdapterConfig
from ._layers import AdaptedLayer
from ._stack import StackMember
from ._model import Target, _check_free, _check_name, _named_weights, adapted_layers, adapter_names, apply_plan, \
    delete_adapter

__all__ = ["add_weighted_adapter"]


def _check_inputs(model: nn.Module, adapters: Any, weights: Any, adapter_name: Any) -> tuple[list[str], list[float]]:
    if not isinstance(model, nn.Module):
        raise TuckerPeftError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = adapter_names(model)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters \
            or not all(isinstance(a, str) for a in adapters):
        raise TuckerPeftError(f"adapters: expected a non-empty list of adapter names from {names}, got {adapters!r}")
    missing = [a for a in adapters if a not in names]
    if missing or len(set(adapters)) != len(adapters):
        raise TuckerPeftError(f"adapters: expected distinct names from {names}, got {list(adapters)!r}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(adapters) \
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise TuckerPeftError(f"weights: expected {len(adapters)} finite numbers (one per adapter), got {weights!r}")
    _check_name(adapter_name)
    if adapter_name in names:
        raise TuckerPeftError(f"adapter_name: {adapter_name!r} already exists; expected a new name")
    return list(adapters), [float(w) for w in weights]


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str) -> nn.Module:
    """Add adapter ``adapter_name`` whose ``s·ΔW`` is ``Σ_i weights[i] · s_i·ΔW_i`` on every weight, exactly.

    Each kind joins its adapters its own way (the kind's ``concat``): Tucker
    and Tucker-2 concatenate the factors and place the cores block-diagonally
    (a mode whose ranks would add up past its size is left unfactorised), CP
    concatenates the components, LoRA the ranks (past a weight's largest rank,
    CP and LoRA write the sum at that rank instead). A weight that only some of
    ``adapters`` adapt gets the sum of those. The new adapter is a normal one:
    it becomes active and trainable, and it saves, loads, merges and exports
    like any other. Everything is checked before the model changes.

    Parameters
    ----------
    model : nn.Module
        A model with the adapters.
    adapters : list of str
        Names of adapters of one kind.
    weights : list of float
        One per adapter.
    adapter_name : str
        A new name.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    TuckerPeftError
        Adapters of different kinds (no exact common form), an 'hosvd'
        adapter (its ΔW is relative to a base weight it changed), adapters
        that train base-parameter copies (``trainable=``), a merged adapter on
        one of the weights, or bad names and weights.
    """
    adapters, weights = _check_inputs(model, adapters, weights, adapter_name)
    config = None
    kinds: dict[str, str] = {}
    for path, h in adapted_layers(model):
        for a in adapters:
            d = h.adapters[a] if a in h.adapters else None
            if d is None:
                continue
            kinds.setdefault(a, d.spec.kind)
            if isinstance(d, StackMember):
                raise TuckerPeftError(f"adapters: {a!r} is a cross-layer stack (AdapterConfig.stack) whose layers share "
                                      "one tensor, which add_weighted_adapter does not combine; expected per-layer "
                                      "adapters")
            if d.has_init:
                raise TuckerPeftError(f"adapters: {a!r} was started with init='hosvd' and holds part of the base "
                                      f"weight ({path!r}), so its ΔW cannot be added to another's exactly; "
                                      "expected zero-init adapters")
            if d.config is not None and d.config.trainable:
                raise TuckerPeftError(f"adapters: {a!r} trains base parameters {d.config.trainable!r} along with it, "
                                      "which a combination of ΔW cannot hold; expected adapters without trainable=")
            config = config or d.config
    if len(set(kinds.values())) > 1:
        raise TuckerPeftError(f"adapters: expected one kind, got {kinds}; only adapters of one kind have an exact "
                              "common form (merge them, or convert one first)")
    weights_of = _named_weights(model)
    targets: list[Target] = []
    for path, h in adapted_layers(model):
        ds = [(h.adapters[a], w) for a, w in zip(adapters, weights) if a in h.adapters]
        if not ds:
            continue
        mod, attr, _ = weights_of[path]
        _check_free(mod, attr, path, adapter_name, "zero")
        s = ds[0][0].scale
        specs = [d.spec for d, _ in ds]
        dtype = next(iter(ds[0][0].params.values())).dtype
        params = [{k: v.detach().double() for k, v in d.params.items()} for d, _ in ds]
        spec, new = type(specs[0]).concat(specs, params, [w * d.scale / s for d, w in ds])
        module_path = path.rsplit(".", 1)[0] if "." in path else ""
        module_type = type(h.base_layer).__name__ if isinstance(h, AdaptedLayer) else type(mod).__name__
        targets.append(Target(path, module_path, attr, module_type, spec, s,
                              {k: v.to(dtype).contiguous() for k, v in new.items()}))
    if config is None:  # adapters made without a config (e.g. extracted): describe the new one by its weights
        config = AdapterConfig(kind=next(iter(kinds.values())), target_parameters=[t.path for t in targets])
    try:
        apply_plan(model, targets, adapter_name, copy.deepcopy(config))
    except BaseException:
        if adapter_name in adapter_names(model):
            delete_adapter(model, adapter_name)
        raise
    return model

