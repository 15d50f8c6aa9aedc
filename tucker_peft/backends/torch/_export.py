"""Export to Hugging Face PEFT's LoRA format (exact, at the smallest rank PEFT's format allows).

PEFT 0.21 facts this module relies on (``peft/tuners/lora/layer.py``, ``peft/utils/other.py``,
``peft/tuners/tuners_utils.py``):

- ``rank_pattern``/``alpha_pattern`` keys are matched by ``re.match(rf"(.*\\.)?({key})$", module_key)``
  (``get_pattern_key``): a key ``"^" + re.escape(name)`` names exactly one module.
- A string ``target_modules`` is matched with ``re.fullmatch`` (``match_target_against_key``); a list
  matches dotted suffixes, so the export writes one anchored regex.
- Conv (``_ConvNd.update_layer``): ``lora_A`` is a full conv ``(r, in, *kernel)`` with the base conv's
  stride and padding (no dilation, zero padding only), ``lora_B`` a 1×1 conv ``(out, r/groups)`` with
  the base conv's ``groups``; ``r % groups == 0``.
- ``ParamWrapper`` (``target_parameters``): 2-D ``(out, in)`` as Linear; 3-D ``(E, d1, d2)`` gives
  ``ΔW[e] = B_e @ A_e`` (``(E, out, in)``) or its transpose when the owning module has
  ``is_transposed=True``, with ``lora_A.weight (r·E, in)`` row ``e·r + k`` and ``lora_B.weight
  (out, r·E)`` column ``k·E + e`` (``get_delta_weight``). Several parameters of one module nest
  wrappers in the module's parameter order, the first innermost (``_inject_parameters``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Callable, Mapping

import torch
from torch import nn

from ..._errors import TuckerPeftError, fmt_shape
from ._io import _deltas, _resolve_name, _write_json, _write_tensors
from ._layers import AdaptedLayer, DeltaParametrization, DeltaWeight
from ._model import _named_weights, extra_trainable

__all__ = ["export_peft", "export_peft_lora", "lora_factors"]

_Pair = tuple[torch.Tensor, torch.Tensor]


def _check_extra(model: nn.Module, deltas: list, ignore_trainable: bool, fmt: str) -> None:
    """Refuse base parameters trained with the adapter: PEFT's adapter formats have no place for them."""
    config = deltas[0][2].config
    extra = extra_trainable(model, config.trainable) if config is not None else {}
    if extra and not ignore_trainable:
        raise TuckerPeftError(f"model: base parameters {sorted(extra)[:5]} were trained with the adapter and PEFT's "
                              f"{fmt} format has no place for them; use save_adapter, or pass ignore_trainable=True")


def _smallest(b: torch.Tensor, a: torch.Tensor) -> _Pair:
    """The same product ``b @ a`` (batched over leading dims) at rank ``min(r, rows, cols)``."""
    r, m, k = b.shape[-1], b.shape[-2], a.shape[-1]
    if r <= min(m, k):
        return b, a
    eye = lambda n: torch.eye(n, dtype=b.dtype, device=b.device).expand(*b.shape[:-2], n, n)  # noqa: E731
    return (eye(m), b @ a) if m <= k else (b @ a, eye(k))


def _exact(delta: DeltaWeight, one: Callable[[Mapping[str, torch.Tensor]], _Pair]) -> _Pair:
    """``one``'s float64 pair for the adapter; an 'hosvd' adapter's start ΔW₀ subtracted by stacking."""
    b, a = one(delta.param_dict())  # a stack member: its slice of the group
    if delta.has_init:
        b0, a0 = one(delta.init_params())
        b, a = torch.cat([b, -b0], -1), torch.cat([a, a0], -2)
    return _smallest(b, a)


def lora_factors(delta: DeltaWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA ``(B, A)`` with ``B @ A = s·ΔW`` unfolded to ``(out, in/groups·Πkernel)``.

    The kind's :meth:`~tucker_peft.Parametrization.lora_factors`; a kind without
    exact ones is refused with its ``lora_note``. The rank is that of the kind
    (Tucker r_out, CP R, LoRA r; doubled for an
    'hosvd' adapter, whose starting point is subtracted exactly by stacking),
    capped at ``min(out, in/groups·Πkernel)`` by an identity factor.

    Returns
    -------
    B : Tensor of shape (out, r), float64
    A : Tensor of shape (r, in/groups·Πkernel), float64
    """
    def one(params: Mapping[str, torch.Tensor]) -> _Pair:
        got = delta.spec.lora_factors({k: v.detach().double() for k, v in params.items()}, delta.scale)
        if got is None:
            raise _no_lora(delta)
        return got

    return _exact(delta, one)


def _no_lora(delta: DeltaWeight) -> TuckerPeftError:
    spec = delta.spec
    why = spec.lora_note or f"it has no exact low-rank unfolding of a weight of shape {fmt_shape(spec.shape)}"
    return TuckerPeftError(f"export_peft_lora: kind {spec.kind!r} cannot be written as an exact LoRA: {why}; "
                           "use save_adapter")


def _expert_factors(delta: DeltaWeight) -> _Pair:
    """Per-expert ``(B_e, A_e)`` of a 3-D ``ΔW (E, d1, d2)``: ``ΔW[e] = B_e @ A_e`` (float64, rank ≤ min(d1, d2))."""
    e, d1, _ = delta.spec.shape

    def one(params: Mapping[str, torch.Tensor]) -> _Pair:
        views = delta.spec.factored(params, delta.scale)  # ΔW[e,i,j] = Σ P_out[e,a] S[a,b,j] P_in[i,b]
        if views is None:
            raise _no_lora(delta)
        p_out, s, p_in, mg = views
        s = s.detach().double()
        p_out = p_out.detach().double() if p_out is not None else torch.eye(e, dtype=torch.float64, device=s.device)
        if mg > 1:  # CP: S (R, 1, d2), P_in (d1, R) shares P_out's index
            return p_in.detach().double() * p_out[:, None, :], s[:, 0].expand(e, *s[:, 0].shape)
        m = torch.einsum("ea,abj->ebj", p_out, s)
        if p_in is None:
            return torch.eye(d1, dtype=torch.float64, device=m.device).expand(e, d1, d1), m
        return p_in.detach().double().expand(e, *p_in.shape), m

    return _exact(delta, one)


def _warn_size(rows: list[tuple[str, int, int]]) -> None:
    big = [(n, x, d) for n, x, d in rows if x > 2 * d]
    if big:
        listing = ", ".join(f"{n!r} ({x:,} numbers for a ΔW of {d:,})" for n, x, d in big[:5])
        warnings.warn(f"export_peft_lora: {len(big)} layer(s) export much larger than the ΔW they encode: {listing}. "
                      "PEFT's grouped-conv LoRA has a dense lora_A over all input channels and rank a multiple of "
                      "groups, so a depthwise or grouped conv cannot be exported compactly; this export is the "
                      "smallest exact one that format allows. save_adapter keeps the compact form.",
                      UserWarning, stacklevel=3)


def _conv_tensors(mod: str, base: nn.Module, d: DeltaWeight) -> _Pair:
    """``(lora_A, lora_B)`` weights of a conv at rank ``groups·min(r, out/groups, in/groups·Πkernel)``."""
    if any(x != 1 for x in base.dilation) or base.padding_mode != "zeros":
        raise TuckerPeftError(f"{mod!r}: PEFT's conv LoRA ignores dilation and padding_mode, so it cannot hold "
                              f"this conv exactly (dilation={base.dilation}, padding_mode={base.padding_mode!r})")
    b, a = lora_factors(d)
    g, kernel = base.groups, tuple(base.weight.shape[2:])
    ones = (1,) * len(kernel)
    if g == 1:
        return a.reshape(a.shape[0], -1, *kernel), b.reshape(*b.shape, *ones)
    # PEFT: lora_B is grouped, lora_A is not. Group j's outputs read hidden block j only, so block j
    # needs rank(ΔW_j) channels reading input group j: per group (B_j, A_j) = (b_j, a) at the smallest rank.
    og, cg = b.shape[0] // g, base.weight.shape[1]
    bs, as_ = _smallest(b.reshape(g, og, -1), a.expand(g, *a.shape))
    rho = bs.shape[-1]
    full = a.new_zeros(g, rho, g, cg, *kernel)
    j = torch.arange(g, device=a.device)
    full[j, :, j] = as_.reshape(g, rho, cg, *kernel)
    return full.reshape(g * rho, g * cg, *kernel), bs.reshape(g * og, rho, *ones)


def _param_tensors(owner: nn.Module, d: DeltaWeight) -> _Pair:
    """``(lora_A, lora_B)`` weights of a PEFT ``ParamWrapper`` for a 2-D or 3-D parameter."""
    if d.spec.ndim == 2:
        b, a = lora_factors(d)
        return a, b
    bs, as_ = _expert_factors(d)  # (E, d1, ρ), (E, ρ, d2)
    e, _, rho = bs.shape
    if getattr(owner, "is_transposed", False):  # PEFT: ΔW[e] = (B_e A_e)ᵀ with B_e (d2, ρ), A_e (ρ, d1)
        bs, as_ = as_.transpose(1, 2), bs.transpose(1, 2)
    return as_.reshape(e * rho, -1), bs.permute(1, 2, 0).reshape(bs.shape[1], rho * e)


def _param_prefixes(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """PEFT module key of each parameter's ``ParamWrapper``.

    PEFT wraps every parameter whose path is a target or ends with ``"." + target``; the wrappers of one
    module nest in the module's parameter order, the first innermost. The order taken here is the one the
    parameters were adapted in, which is the module's own when one ``inject`` adapted them together
    (parameters first adapted by different adapters are refused).
    """
    targets = set(paths)
    for p in _named_weights(model):
        if p not in targets and any(p.endswith("." + t) for t in targets):
            hit = next(t for t in targets if p.endswith("." + t))
            raise TuckerPeftError(f"{hit!r}: PEFT's target_parameters also matches {p!r} (a dotted suffix), so PEFT "
                                  "would load this export onto a different set of parameters")
    out: dict[str, str] = {}
    for mod_path in {p.rpartition(".")[0] for p in paths}:
        owner = model.get_submodule(mod_path)
        hit = [n for n in owner.parametrizations if f"{mod_path}.{n}" in targets]
        firsts = {n: next(iter(_delta_hook(owner, n).adapters)) for n in hit}
        if len(set(firsts.values())) > 1:
            raise TuckerPeftError(f"{mod_path!r}: its parameters {hit} were first adapted by different adapters "
                                  f"({firsts}), so their order in the module is unknown; PEFT nests its wrappers in "
                                  "that order. Adapt them in one inject to export them")
        for i, n in enumerate(hit):
            out[f"{mod_path}.{n}"] = mod_path + ".base_layer" * (len(hit) - 1 - i)
    return out


def _delta_hook(owner: nn.Module, attr: str) -> DeltaParametrization:
    return next(q for q in owner.parametrizations[attr] if isinstance(q, DeltaParametrization))


def export_peft_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                     ignore_trainable: bool = False) -> None:
    """Write the adapter as a Hugging Face PEFT LoRA checkpoint (exact).

    ``peft.PeftModel.from_pretrained(base_model, path)`` then gives the same
    outputs. Each layer gets the smallest rank PEFT's format holds it at
    exactly: :func:`lora_factors`' rank for Linear, Conv and Embedding;
    ``groups·min(r, out/groups, in/groups·Πkernel)`` for a grouped conv, whose
    ``lora_A`` PEFT keeps dense; per expert for a 3-D parameter. The scale is
    folded into ``lora_B`` and ``lora_alpha = r`` per layer; ``rank_pattern``
    keys are anchored (``^name``) so that each names one module.

    Parameters
    ----------
    model : nn.Module
    path : str or PathLike
        Directory for ``adapter_config.json`` and ``adapter_model.safetensors``.
    adapter_name : str, optional
        Default: the active adapter.
    ignore_trainable : bool
        Leave out base parameters trained with the adapter instead of refusing.

    Warns
    -----
    UserWarning
        When a layer's export holds more than twice the numbers of its dense ΔW
        (depthwise and grouped convs, by PEFT's grouped-conv format).

    Raises
    ------
    TuckerPeftError
        For what PEFT's LoRA cannot express exactly: convs with dilation or a
        non-zero padding_mode (PEFT's ``lora_A`` drops both); parameter adapters
        on 4-D+ parameters (``ParamWrapper`` takes 2-D and 3-D), on the top-level
        module, on a parameter that another parametrization also changes, on
        a module that also has a layer adapter, where PEFT's suffix matching
        would catch another parameter, or on parameters of one module first
        adapted by different adapters (PEFT nests by their unknown order);
        extra trained base parameters unless ``ignore_trainable``. Nothing is
        written then.
    """
    name = _resolve_name(model, adapter_name)
    deltas = _deltas(model, name)
    _check_extra(model, deltas, ignore_trainable, "LoRA")
    layer_modules = {h.layer_name for _, h, _ in deltas if isinstance(h, AdaptedLayer)}
    param_paths = [p for p, h, _ in deltas if isinstance(h, DeltaParametrization)]
    for p in param_paths:
        _check_param(model, p, layer_modules)
    prefixes = _param_prefixes(model, param_paths)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    sizes: list[tuple[str, int, int]] = []
    for p, h, d in deltas:
        if isinstance(h, AdaptedLayer):
            base, key = h.base_layer, h.layer_name
            dt = base.weight.dtype
            if isinstance(base, nn.Embedding):
                b, a = lora_factors(d)
                pair = {"lora_embedding_A": b.T, "lora_embedding_B": a.T}
            elif h.fan_in_fan_out:  # transformers Conv1D: ΔW = B @ A is (in, out); PEFT's lora_B @ lora_A is ΔWᵀ
                b, a = lora_factors(d)
                pair = {"lora_A.weight": b.T, "lora_B.weight": a.T}
            elif isinstance(base, nn.Linear):
                b, a = lora_factors(d)
                pair = {"lora_A.weight": a, "lora_B.weight": b}
            else:
                a, b = _conv_tensors(key, base, d)
                pair = {"lora_A.weight": a, "lora_B.weight": b}
            prefix = f"base_model.model.{key}"
        else:
            owner = model.get_submodule(p.rpartition(".")[0])
            dt = owner.parametrizations[p.rpartition(".")[2]].original.dtype
            a, b = _param_tensors(owner, d)
            pair = {"lora_A.weight": a, "lora_B.weight": b}
            key, prefix = p, f"base_model.model.{prefixes[p]}"
        for k, v in pair.items():
            tensors[f"{prefix}.{k}"] = v.to("cpu", dt, copy=True).contiguous()  # stack members share factors
        r = next(iter(pair.values())).shape[0]  # lora_A (r, ...) or lora_embedding_A (r, num)
        ranks[key] = r // d.spec.shape[0] if isinstance(h, DeltaParametrization) and d.spec.ndim == 3 else r
        sizes.append((key, sum(v.numel() for v in pair.values()), math.prod(d.spec.shape)))
    _warn_size(sizes)
    r0, pattern = _anchored(ranks)
    modules = sorted(m for m in ranks if m in layer_modules)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": r0, "lora_dropout": 0.0,
        "target_modules": "|".join(re.escape(m) for m in modules) if modules else None,
        "target_parameters": sorted(param_paths) or None, "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "bias": "none",
        # PEFT sets it per layer (True on Conv1D, False on Linear) whatever the config says; state it truthfully
        "fan_in_fan_out": any(h.fan_in_fan_out for _, h, _ in deltas if isinstance(h, AdaptedLayer)), "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write_tensors(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    _write_json(os.path.join(path, "adapter_config.json"), peft_config)


def _check_param(model: nn.Module, path: str, layer_modules: set[str]) -> None:
    """Refuse a parameter adapter PEFT's ``ParamWrapper`` cannot hold, with the reason."""
    mod_path, _, attr = path.rpartition(".")
    if not mod_path:
        raise TuckerPeftError(f"{path!r}: PEFT cannot wrap a parameter of the top-level module (ParamWrapper would "
                              "wrap its own parent); export supports parameters of submodules")
    if mod_path in layer_modules:
        raise TuckerPeftError(f"{path!r}: its module {mod_path!r} also has a layer adapter, and PEFT refuses to wrap "
                              "a parameter of a module it already adapts")
    owner = model.get_submodule(mod_path)
    plist = owner.parametrizations[attr]
    if any(not isinstance(q, DeltaParametrization) for q in plist):
        raise TuckerPeftError(f"{path!r}: another parametrization also changes this parameter; PEFT's ParamWrapper "
                              "is exact only on a plain parameter")
    shape = tuple(plist.original.shape)
    if len(shape) not in (2, 3):
        raise TuckerPeftError(f"{path!r}: PEFT's ParamWrapper takes 2-D (out, in) and 3-D (experts, ·, ·) "
                              f"parameters, got shape {fmt_shape(shape)}")


def _anchored(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The most common rank and an anchored (``^name``) pattern for the other modules."""
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    return r0, {"^" + re.escape(m): r for m, r in ranks.items() if r != r0}


def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                ignore_trainable: bool = False) -> str:
    """Write the adapter in PEFT's own format for its kind (exact); returns the ``peft_type`` written.

    A kind with its own PEFT format (:meth:`~tucker_peft.Parametrization.peft_state`:
    LoHa → ``'LOHA'``, LoKr → ``'LOKR'``) is written in it; every other kind
    through :func:`export_peft_lora` (``'LORA'``). ``peft.PeftModel.from_pretrained(base_model, path)``
    then gives the same outputs. In LoHa / LoKr the scale is folded into one
    factor and ``alpha = r`` per layer; ``r`` (which fixes PEFT's tensor
    shapes) is the kind's rank, with anchored ``rank_pattern`` / ``alpha_pattern``
    keys for layers whose rank differs from the most common one.

    Parameters
    ----------
    model : nn.Module
    path : str or PathLike
        Directory for ``adapter_config.json`` and ``adapter_model.safetensors``.
    adapter_name : str, optional
        Default: the active adapter.
    ignore_trainable : bool
        Leave out base parameters trained with the adapter instead of refusing.

    Returns
    -------
    str
        ``'LORA'``, ``'LOHA'`` or ``'LOKR'``.

    Raises
    ------
    TuckerPeftError
        When the adapter mixes kinds of different PEFT formats; for LoHa / LoKr
        on what PEFT's LoHa / LoKr layers cannot hold: other layers than
        ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (Embedding, Conv3d,
        transformers' Conv1D, parameter adapters), a conv ``padding_mode``
        other than ``'zeros'``, an ``init='hosvd'`` adapter (its start ΔW₀ is
        subtracted, which these formats cannot), layers whose non-rank fields
        differ (LoKr's ``factor`` / ``decompose_both`` are global in PEFT), a
        Conv1d LoKr with a full W2 or effective_conv; extra trained base parameters unless
        ``ignore_trainable``; and what :func:`export_peft_lora` refuses.
        Nothing is written then.
    """
    name = _resolve_name(model, adapter_name)
    deltas = _deltas(model, name)
    states = [d.spec.peft_state({k: v.detach().double() for k, v in d.param_dict().items()}, d.scale) if d.spec.ndim >= 2
              else None for _, _, d in deltas]
    types = {st[1]["peft_type"] if st is not None else "LORA" for st in states}
    if len(types) > 1:
        kinds = sorted({d.spec.kind for _, _, d in deltas})
        raise TuckerPeftError(f"export_peft: adapter {name!r} mixes kinds {kinds} whose PEFT formats differ "
                              f"({sorted(types)}); a PEFT adapter has one type. Use save_adapter, or one kind")
    (peft_type,) = types
    if peft_type == "LORA":
        export_peft_lora(model, path, name, ignore_trainable=ignore_trainable)
        return peft_type
    _check_extra(model, deltas, ignore_trainable, peft_type)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    shared: dict[str, object] | None = None
    for (p, h, d), (ts, fields) in zip(deltas, states):
        key = _native_layer(p, h, d, peft_type)
        dt = h.base_layer.weight.dtype
        for k, v in ts.items():
            tensors[f"base_model.model.{key}.{k}"] = v.to("cpu", dt).contiguous()
        ranks[key] = fields["r"]
        if fields["alpha"] != fields["r"]:
            raise TuckerPeftError(f"{key!r}: peft_state of kind {d.spec.kind!r} gave alpha {fields['alpha']} != r "
                                  f"{fields['r']}; export_peft folds the scale into the tensors and needs alpha = r")
        rest = {k: v for k, v in fields.items() if k not in ("r", "alpha")}
        if shared is None:
            shared = rest
        elif rest != shared:
            raise TuckerPeftError(f"{key!r}: PEFT's {peft_type} config holds one value of {sorted(rest)} for all "
                                  f"layers, but this layer has {rest} and another {shared}; use save_adapter")
    r0, pattern = _anchored(ranks)
    peft_config = {
        "task_type": None, "base_model_name_or_path": None, "inference_mode": True, **(shared or {}),
        "r": r0, "alpha": r0, "rank_dropout": 0.0, "module_dropout": 0.0,
        "target_modules": "|".join(re.escape(m) for m in sorted(ranks)), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "init_weights": True, "modules_to_save": None,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write_tensors(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    _write_json(os.path.join(path, "adapter_config.json"), peft_config)
    return peft_type


def _native_layer(path: str, h: object, d: DeltaWeight, peft_type: str) -> str:
    """The module key of a layer PEFT's LoHa / LoKr can hold exactly; refuses the rest with the reason."""
    if not isinstance(h, AdaptedLayer):
        raise TuckerPeftError(f"{path!r}: PEFT's {peft_type} has no parameter adapters (target_parameters); "
                              "use save_adapter, or adapt the module")
    key, base = h.layer_name, h.base_layer
    if h.fan_in_fan_out or not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TuckerPeftError(f"{key!r}: PEFT's {peft_type} adapts nn.Linear, nn.Conv1d and nn.Conv2d only, got "
                              f"{type(base).__name__}; use save_adapter")
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.padding_mode != "zeros":
        raise TuckerPeftError(f"{key!r}: PEFT's {peft_type} conv applies F.conv with zero padding, so it cannot hold "
                              f"padding_mode={base.padding_mode!r} exactly")
    if d.has_init:
        raise TuckerPeftError(f"{key!r}: an init='hosvd' adapter's change is f(params) - f(start), which PEFT's "
                              f"{peft_type} format cannot hold; use export_peft_lora (exact by stacking) or save_adapter")
    return key
