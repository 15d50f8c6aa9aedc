"""Adapter modules: one delta on one weight, and the wrappers that put deltas on layers."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..._base import Parametrization
from ..._errors import TuckerPeftError
from ...cp import CP
from ...lora import LoRA
from ...tucker import Tucker
from ._keys import base_keys_on_load, base_keys_on_save
from ._ops import FusedDelta, Geometry, contract, factorized, stage_costs

__all__ = ["DeltaWeight", "AdaptedLayer", "DeltaParametrization", "SUPPORTED"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_SPATIAL = "pqr"


def _kernel_equation(spec: Tucker) -> tuple[str, list[str]]:
    """Einsum folding Tucker's kernel factors into the core: ``(c0, c1, *kernel)``."""
    core, out, factors = "ab", "ab", []
    for n, r in enumerate(spec.ranks[2:]):
        k = _SPATIAL[n]
        if r is None:
            core += k
        else:
            core += "xyz"[n]
            factors.append((f"factor_{n + 2}", k + "xyz"[n]))
        out += k
    eq = ",".join([core] + [t for _, t in factors]) + "->" + out
    return eq, [name for name, _ in factors]


class DeltaWeight(nn.Module):
    """One adapter's ΔW on one weight: ``s · spec.reconstruct(params)``.

    Parameters
    ----------
    spec : Parametrization
        Kind, weight shape ``(out, in/groups, *kernel)`` (or any N-D shape) and ranks.
    scale : float
        s.
    params : dict of str to Tensor
        Of ``spec.param_shapes``; become trainable ``nn.Parameter``.
    dropout : float
        On the adapter's input (factorised forward only).
    forward : {'auto', 'rebuild', 'factorized'}
    init_params : dict of str to Tensor, optional
        The params ΔW started from when the base weight was replaced by the
        residual ``W − s·ΔW₀`` ('hosvd' init); kept to restore W and to save
        the adapter relative to the original weight.
    """

    def __init__(self, spec: Parametrization, scale: float, params: Mapping[str, torch.Tensor], *,
                 dropout: float = 0.0, forward: str = "auto", init_params: Mapping[str, torch.Tensor] | None = None,
                 config: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.scale = float(scale)
        self.forward_mode = forward
        self.config = config
        self.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in params.items()})
        self.init_names: tuple[str, ...] = ()
        if init_params is not None:
            for k, v in init_params.items():
                self.register_buffer(f"init_{k}", v)
            self.init_names = tuple(init_params)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._structured = isinstance(spec, (Tucker, CP, LoRA)) and len(spec.shape) >= 2
        if isinstance(spec, Tucker) and len(spec.shape) > 2:
            self._keq, self._kfac = _kernel_equation(spec)
        self._costs: dict[Any, tuple[int, int, int]] = {}
        self._staged: bool | None = None  # tests force either backward of the fused rebuild

    @property
    def has_init(self) -> bool:
        return bool(self.init_names)

    def init_params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"init_{k}") for k in self.init_names}

    def extra_repr(self) -> str:
        return f"{self.spec!r}, scale={self.scale}, forward={self.forward_mode!r}"

    # -- ΔW -------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s·ΔW`` of the weight's shape, with autograd (the core's planned contraction)."""
        return self.spec.reconstruct(dict(self.params), self.scale)

    def init_delta(self) -> torch.Tensor:
        """``s·ΔW₀``, the part moved out of the base weight at 'hosvd' init."""
        return self.spec.reconstruct(self.init_params(), self.scale)

    def views(self, params: Mapping[str, torch.Tensor] | None = None) -> tuple[Any, torch.Tensor, Any, int]:
        """``(P_out, S, P_in, mg)`` of the three-stage form (see :mod:`._ops`), s folded into S."""
        p = dict(self.params) if params is None else params
        spec, s = self.spec, self.scale
        kernel = spec.shape[2:]
        if isinstance(spec, Tucker):
            if kernel and self._kfac:
                core = contract(self._keq, p["core"], *[p[n] for n in self._kfac])
            else:
                core = p["core"]
            r0, r1 = spec.ranks[:2]
            return (p["factor_0"] if r0 is not None else None, core * s,
                    p["factor_1"] if r1 is not None else None, 1)
        if isinstance(spec, CP):
            w = p["weights"] * s
            if kernel:
                terms = ",".join(f"{_SPATIAL[n]}a" for n in range(len(kernel)))
                w = contract(f"a,{terms}->a{_SPATIAL[:len(kernel)]}", w, *[p[f"factor_{n + 2}"] for n in range(len(kernel))])
            return p["factor_0"], w.reshape(spec.rank, 1, *kernel), p["factor_1"], spec.rank
        if isinstance(spec, LoRA):
            return p["B"], (p["A"] * s).reshape(spec.rank, *spec.shape[1:]), None, 1
        raise TuckerPeftError(f"kind {spec.kind!r} has no three-stage form")  # pragma: no cover

    def strategy(self, geom: Geometry, positions: int, training: bool) -> tuple[str, bool]:
        """('rebuild' or 'factorized', staged backward?) for an input with ``positions`` output positions."""
        if not self._structured:
            return "rebuild", False
        if geom not in self._costs:
            p_out, s, p_in, mg = self.views()
            self._costs[geom] = stage_costs(geom, self.spec.shape, p_out, tuple(s.shape), p_in, mg)
        recon, chain, staged = self._costs[geom]
        full = math.prod(self.spec.shape)  # the full weight gradient, per position
        # The stages make several passes over activations: take them when clearly fewer multiply-adds.
        use_stages = 2 * staged < full if self._staged is None else self._staged
        if self.dropout is not None and training:
            return "factorized", use_stages
        if self.forward_mode != "auto":
            return self.forward_mode, use_stages
        # Rebuild pays ΔW and W+ΔW once; the factorised chain runs forward, again for ∂x, and adds outputs.
        rebuild = recon + 2 * full
        fact = positions * (2 * chain + 4 * self.spec.shape[0])
        return ("rebuild" if rebuild <= fact else "factorized"), use_stages


def _geometry(base: nn.Module) -> Geometry:
    if isinstance(base, nn.Linear):
        return Geometry(0)
    if isinstance(base, nn.Embedding):
        return Geometry(0)
    nd = base.weight.ndim - 2
    if base.padding_mode != "zeros" or isinstance(base.padding, str):
        pads = base._reversed_padding_repeated_twice
        left = tuple(pads[2 * i] for i in reversed(range(nd)))
        right = tuple(pads[2 * i + 1] for i in reversed(range(nd)))
        padding = left if (base.padding_mode == "zeros" and left == right) else (0,) * nd
    else:
        padding = tuple(base.padding)
    return Geometry(nd, base.groups, tuple(base.stride), padding, tuple(base.dilation))


class AdaptedLayer(nn.Module):
    """A Linear, ConvNd or Embedding with named adapters; one active at a time.

    The wrapped layer stays at ``base_layer`` (its weight frozen), adapters at
    ``adapters[name]``. The output equals the base layer's with
    ``W + s·ΔW``.
    """

    def __init__(self, base: nn.Module, name: str = "") -> None:
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise TuckerPeftError(f"layer {name!r}: expected one of "
                                  f"{[c.__name__ for c in SUPPORTED]}, got {type(base).__name__}")
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise TuckerPeftError(f"layer {name!r}: nn.Embedding with max_norm renormalises its weight in place; "
                                  "expected max_norm=None")
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged: str | None = None
        self.layer_name = name
        # state_dict keeps the plain layer's keys ('q.weight', not 'q.base_layer.weight'): see _keys.py.
        self.register_state_dict_post_hook(base_keys_on_save)
        self.register_load_state_dict_pre_hook(base_keys_on_load)
        self.geometry = _geometry(base)
        self._prepad = None
        if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and self.geometry.padding == (0,) * self.geometry.nd \
                and (base.padding_mode != "zeros" or isinstance(base.padding, str)):
            pads = tuple(base._reversed_padding_repeated_twice)
            if any(pads):
                self._prepad = (pads, "constant" if base.padding_mode == "zeros" else base.padding_mode)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Any:
        return getattr(self.base_layer, "bias", None)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepad is None:
            return x
        pads, mode = self._prepad
        return F.pad(x, pads, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged is not None:
            return self.base_layer(x)
        d: DeltaWeight = self.adapters[name]  # type: ignore[assignment]
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return self._embedding(x, d)
        geom = self.geometry
        if not d._structured:
            w = base.weight + d.delta_weight().to(base.weight.dtype)
            return F.linear(x, w, base.bias) if geom.nd == 0 else base._conv_forward(x, w, base.bias)
        lead = x.shape[:-1] if geom.nd == 0 and x.ndim != 2 else None  # 2-D: no reshape, so no view returned
        unbatched = geom.nd > 0 and x.ndim == geom.nd + 1
        if lead is not None:
            x = x.reshape(-1, x.shape[-1])
        elif unbatched:
            x = x.unsqueeze(0)
        positions = x.shape[0] * (math.prod(x.shape[2:]) // max(1, math.prod(geom.stride)) if geom.nd else 1)
        p_out, s, p_in, mg = d.views()
        mode, staged = d.strategy(geom, positions, self.training)
        if mode == "rebuild":
            y = FusedDelta.apply(self._pad(x), base.weight, base.bias, p_out, s, p_in, geom, mg, staged)
        else:
            xp = self._pad(x)
            y = geom.conv(xp, base.weight, geom.groups, base.bias)
            xd = self._pad(d.dropout(x)) if d.dropout is not None else xp
            y = y + factorized(geom, xd, p_out, s, p_in, mg).to(y.dtype)
        if lead is not None:
            return y.reshape(*lead, y.shape[-1])
        if geom.nd == 0:
            return y
        return y.squeeze(0) if unbatched else y

    def _embedding(self, idx: torch.Tensor, d: DeltaWeight) -> torch.Tensor:
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        kw = dict(padding_idx=base.padding_idx, max_norm=None, norm_type=base.norm_type,
                  scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        if not d._structured or d.strategy(self.geometry, idx.numel(), self.training)[0] == "rebuild":
            return F.embedding(idx, base.weight + d.delta_weight().to(base.weight.dtype), **kw)
        p_out, s, p_in, mg = d.views()
        dt = base.weight.dtype
        if p_out is not None:
            h = F.embedding(idx, p_out.to(dt))
            h = h * s.reshape(-1).to(dt) if mg > 1 else h @ s.to(dt)
        else:
            h = F.embedding(idx, s.to(dt))
        if p_in is not None:
            h = h @ p_in.to(dt).T
        if base.padding_idx is not None:  # as F.embedding: the padding row's value is used but gets no gradient
            h = torch.where((idx == base.padding_idx).unsqueeze(-1), h.detach(), h)
        return base(idx) + h

    # -- merging --------------------------------------------------------------
    def merge(self) -> None:
        if self.merged is not None or self.active_adapter is None:
            return
        _add_(self.base_layer.weight, self.adapters[self.active_adapter].delta_weight(), 1.0)
        self.merged = self.active_adapter

    def unmerge(self) -> None:
        if self.merged is None:
            return
        _add_(self.base_layer.weight, self.adapters[self.merged].delta_weight(), -1.0)
        self.merged = None


class DeltaParametrization(nn.Module):
    """``torch.nn.utils.parametrize`` hook for any N-D parameter: ``W ↦ W + s·ΔW``."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged: str | None = None
        self.layer_name = name

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.active_adapter is None or self.merged is not None:
            return w
        dw = self.adapters[self.active_adapter].delta_weight()
        return w + dw.to(w.dtype)


def _add_(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """``weight += sign·delta`` in place, accumulated in fp32 for half-precision weights."""
    with torch.no_grad():
        acc = torch.promote_types(weight.dtype, torch.float32)
        weight.copy_((weight.to(acc) + sign * delta.detach().to(acc)).to(weight.dtype))
