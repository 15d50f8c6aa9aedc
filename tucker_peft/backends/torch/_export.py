"""Export to Hugging Face PEFT's LoRA format (exact)."""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch
from torch import nn

from ..._errors import TuckerPeftError
from ._io import _deltas, _resolve_name, _write_json, _write_tensors
from ._layers import AdaptedLayer, DeltaWeight
from ._model import extra_trainable

__all__ = ["export_peft_lora", "lora_factors"]

def lora_factors(delta: DeltaWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA ``(B, A)`` with ``B @ A = s·ΔW`` unfolded to ``(out, in/groups·Πkernel)``.

    Tucker gives rank ``r_out`` (B = U_out), CP rank R, LoRA its own rank; an
    'hosvd' adapter's starting point is subtracted exactly by stacking.
    """
    def one(params: Mapping[str, torch.Tensor], sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        p_out, s, p_in, mg = delta.views(params)
        s = s.detach().double()
        if mg > 1:
            a = s.reshape(s.shape[0], 1, *s.shape[2:]) * p_in.detach().double().T.reshape(s.shape[0], -1, *(1,) * (s.ndim - 2))
        elif p_in is not None:
            a = torch.einsum("ab...,cb->ac...", s, p_in.detach().double())
        else:
            a = s
        b = p_out.detach().double() if p_out is not None else torch.eye(delta.spec.shape[0], dtype=torch.float64)
        return sign * b, a.reshape(a.shape[0], -1)

    b, a = one(dict(delta.params), 1.0)
    if delta.has_init:
        b0, a0 = one(delta.init_params(), -1.0)
        b, a = torch.cat([b, b0], 1), torch.cat([a, a0], 0)
    return b, a


def export_peft_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                     ignore_trainable: bool = False) -> None:
    """Write the adapter as a Hugging Face PEFT LoRA checkpoint (exact).

    ``peft.PeftModel.from_pretrained(base_model, path)`` then gives the same
    outputs. Each layer's LoRA rank is that of :func:`lora_factors`; the scale is
    folded into ``lora_B`` and ``lora_alpha = r`` per layer.

    Raises
    ------
    TuckerPeftError
        For weights PEFT's LoRA cannot express exactly: parameter adapters,
        convs with dilation or a non-zero padding_mode (PEFT's ``lora_A`` drops
        both), and extra trained base parameters unless ``ignore_trainable``.
    """
    name = _resolve_name(model, adapter_name)
    deltas = _deltas(model, name)
    config = deltas[0][2].config
    extra = extra_trainable(model, config.trainable) if config is not None else {}
    if extra and not ignore_trainable:
        raise TuckerPeftError(f"model: base parameters {sorted(extra)[:5]} were trained with the adapter and PEFT's "
                              "LoRA format has no place for them; use save_adapter, or pass ignore_trainable=True")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for p, h, d in deltas:
        if not isinstance(h, AdaptedLayer):
            raise TuckerPeftError(f"{p!r}: PEFT LoRA has no format for an adapter on a bare parameter; "
                                  "export supports Linear, Conv and Embedding layers")
        base, mod = h.base_layer, h.layer_name
        b, a = lora_factors(d)
        dt = base.weight.dtype
        key = f"base_model.model.{mod}"
        if isinstance(base, nn.Embedding):
            tensors[f"{key}.lora_embedding_A"] = b.T.to(dt).contiguous()
            tensors[f"{key}.lora_embedding_B"] = a.T.to(dt).contiguous()
        elif h.fan_in_fan_out:  # transformers Conv1D: ΔW = B @ A is (in, out); PEFT's lora_B @ lora_A is ΔWᵀ
            tensors[f"{key}.lora_A.weight"] = b.T.to(dt).contiguous()
            tensors[f"{key}.lora_B.weight"] = a.T.to(dt).contiguous()
        elif isinstance(base, nn.Linear):
            tensors[f"{key}.lora_A.weight"] = a.to(dt).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(dt).contiguous()
        else:
            if any(x != 1 for x in base.dilation) or base.padding_mode != "zeros":
                raise TuckerPeftError(f"{mod!r}: PEFT's conv LoRA ignores dilation and padding_mode, so it cannot hold "
                                      f"this conv exactly (dilation={base.dilation}, padding_mode={base.padding_mode!r})")
            g, kernel = base.groups, tuple(base.weight.shape[2:])
            a = a.reshape(a.shape[0], -1, *kernel)
            if g > 1:  # PEFT: a full lora_A conv and a grouped lora_B; place A block-diagonally
                r, cg = a.shape[:2]
                full = a.new_zeros(g * r, g * cg, *kernel)
                for i in range(g):
                    full[i * r:(i + 1) * r, i * cg:(i + 1) * cg] = a
                a = full
            tensors[f"{key}.lora_A.weight"] = a.to(dt).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.reshape(*b.shape, *(1,) * len(kernel)).to(dt).contiguous()
        ranks[mod] = int(tensors[f"{key}.lora_A.weight" if not isinstance(base, nn.Embedding) else f"{key}.lora_embedding_A"].shape[0])
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r0}
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": r0, "lora_dropout": 0.0, "target_modules": sorted(ranks), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "bias": "none",
        # PEFT sets it per layer (True on Conv1D, False on Linear) whatever the config says; state it truthfully
        "fan_in_fan_out": any(h.fan_in_fan_out for _, h, _ in deltas if isinstance(h, AdaptedLayer)), "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write_tensors(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    _write_json(os.path.join(path, "adapter_config.json"), peft_config)
