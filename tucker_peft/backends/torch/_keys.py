"""State-dict keys of an adapted layer: the base weights keep the plain model's keys.

``AdaptedLayer`` wraps a layer as ``base_layer``, so without these hooks its
weight would be saved as ``q.base_layer.weight`` and a plain model loading
the file (``from_pretrained``) would find ``q.weight`` missing and
re-initialise it at random. With them, :meth:`~torch.nn.Module.state_dict`
of an adapted model holds

* ``q.weight``, ``q.bias``: the BASE layer's tensors, exactly what the plain
  model holds: an 'hosvd' adapter's ``s·ΔW₀`` (moved out of the weight at
  injection) is added back, a merged adapter's ``s·ΔW`` taken out;
* ``q.adapters.NAME.params.*`` (and ``init_*``): the adapters, under keys a
  plain model does not have and so ignores;

and ``load_state_dict`` maps them back (the inverse offsets, computed from the
adapter tensors in the same state dict when it has them). Zero-init, unmerged
layers round-trip bit for bit; with an offset the base weight round-trips to
within one rounding of its dtype (the sum is formed in float32 or wider).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["base_keys_on_save", "base_keys_on_load", "attach_owner_hooks"]

_BASE = "base_layer."
_OWN = ("adapters.", "adapter_stacks.", _BASE)  # a stack group may sit on a member layer (see _stack.owner_path)


def _offset(layer: Any, sd: dict[str, Any], prefix: str) -> torch.Tensor | None:
    """``Σ s·ΔW₀ (hosvd adapters) − Σ s·ΔW (merged adapters)``: plain-model weight minus ``base_layer.weight``."""
    merged = layer.merged
    total = None
    for n, d in layer.adapters.items():
        parts = []
        if d.has_init:
            init = {k: sd.get(f"{prefix}adapters.{n}.init_{k}", v) for k, v in d.init_params().items()}
            parts.append((init, 1.0))
        if n in merged:
            params = {k: sd.get(f"{prefix}adapters.{n}.params.{k}", v) for k, v in d.param_dict().items()}
            parts.append((params, -1.0))
        for params, sign in parts:
            if any(type(v).__name__ == "DTensor" for v in params.values()):
                continue  # FSDP2 shards: no offset support (hosvd/merge are refused there)
            with torch.no_grad():
                dw = d.spec.reconstruct({k: v.detach() for k, v in params.items()}, d.scale)
                dw = dw.to(torch.promote_types(dw.dtype, torch.float32)) * sign
            total = dw if total is None else total + dw
    return total


def _shift(w: torch.Tensor, offset: torch.Tensor | None, sign: float) -> torch.Tensor:
    if offset is None or type(w).__name__ == "DTensor":
        return w
    acc = torch.promote_types(w.dtype, torch.float32)
    with torch.no_grad():
        return (w.detach().to(acc) + sign * offset.to(device=w.device, dtype=acc)).to(w.dtype)


def base_keys_on_save(layer: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook of ``AdaptedLayer``: ``prefix.base_layer.X`` → ``prefix.X`` (the plain layer's value)."""
    own = []
    for k in reversed(state_dict):  # this layer's entries were the last ones written
        if not k.startswith(prefix):
            break
        own.append(k)
    own.reverse()
    items = [(k, state_dict.pop(k)) for k in own]
    offset = _offset(layer, dict(items), prefix)  # a stack member has no adapter keys of its own, but an offset
    for k, v in items:
        if k.startswith(prefix + _BASE):
            rest = k[len(prefix + _BASE):]
            if rest == "weight":
                v = _shift(v, offset, 1.0)
            state_dict[prefix + rest] = v
        else:
            state_dict[k] = v


def base_keys_on_load(layer: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                      missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Load pre-hook of ``AdaptedLayer``: ``prefix.X`` → ``prefix.base_layer.X`` (the inverse of the above)."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if rest.startswith(_OWN):
            continue
        v = state_dict.pop(k)
        if rest == "weight":
            v = _shift(v, _offset(layer, state_dict, prefix), -1.0)
        state_dict[prefix + _BASE + rest] = v


# -- parametrized parameters (target_parameters): 'parametrizations.W.original' → 'W' -------------

_MARK = "_tucker_peft_key_hooks"


def _delta_parametrizations(mod: Any) -> list[tuple[str, Any]]:
    """``(attr, DeltaParametrization)`` for each parameter of ``mod`` whose only parametrization is ours."""
    plists = getattr(mod, "parametrizations", None)
    if plists is None:
        return []
    return [(attr, pl[0]) for attr, pl in plists.items() if len(pl) == 1 and hasattr(pl[0], "adapters")]


def _owner_on_save(mod: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for attr, hook in _delta_parametrizations(mod):
        key = f"{prefix}parametrizations.{attr}.original"
        if key in state_dict:
            off = _offset(hook, state_dict, f"{prefix}parametrizations.{attr}.0.")
            state_dict[prefix + attr] = _shift(state_dict.pop(key), off, 1.0)


def _owner_on_load(mod: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                   missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    for attr, hook in _delta_parametrizations(mod):
        key = f"{prefix}parametrizations.{attr}.original"
        if prefix + attr in state_dict and key not in state_dict:
            off = _offset(hook, state_dict, f"{prefix}parametrizations.{attr}.0.")
            state_dict[key] = _shift(state_dict.pop(prefix + attr), off, -1.0)


def attach_owner_hooks(mod: Any) -> None:
    """Give a module with a ``DeltaParametrization`` the plain parameter keys (once; inert once it has none)."""
    if not getattr(mod, _MARK, False):
        mod.register_state_dict_post_hook(_owner_on_save)
        mod.register_load_state_dict_pre_hook(_owner_on_load)
        setattr(mod, _MARK, True)
