"""Adapter modules: one delta on one weight, and the wrappers that put deltas on layers."""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..._base import Parametrization
from ..._errors import TuckerPeftError
from ._keys import base_keys_on_load, base_keys_on_save
from ._ops import FusedDelta, Geometry, factorized, stage_costs

__all__ = ["DeltaWeight", "AdaptedLayer", "DeltaParametrization", "SUPPORTED", "supported_types"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _hf_conv1d() -> Any:
    """transformers' ``Conv1D`` (GPT-2 family: weight ``(in, out)``, ``y = x @ W + b``) if transformers is loaded.

    Never imports transformers: a model holding a Conv1D has imported it already.
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def supported_types() -> tuple[type, ...]:
    """The layer types :class:`AdaptedLayer` wraps: :data:`SUPPORTED`, and transformers' Conv1D once loaded."""
    c = _hf_conv1d()
    return SUPPORTED if c is None else SUPPORTED + (c,)


def _is_conv1d(base: nn.Module) -> bool:
    c = _hf_conv1d()
    return c is not None and isinstance(base, c)


def _transposed(views: tuple[Any, torch.Tensor, Any, int]) -> tuple[Any, torch.Tensor, Any, int]:
    """Three-stage views of ``ΔWᵀ`` from those of a 2-D ``ΔW`` (a Conv1D's ``(in, out)`` weight)."""
    p_out, s, p_in, mg = views
    return p_in, (s if mg > 1 else s.T), p_out, mg


def hold_params(module: nn.Module, params: Mapping[str, torch.Tensor],
                init_params: Mapping[str, torch.Tensor] | None) -> None:
    """Give ``module`` trainable ``params`` (a ParameterDict) and, for an 'hosvd' start, the params ΔW started
    from as buffers ``init_<name>`` (named in ``module.init_names``)."""
    module.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in params.items()})
    module.init_names = ()
    if init_params is not None:
        for k, v in init_params.items():
            module.register_buffer(f"init_{k}", v)
        module.init_names = tuple(init_params)


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
        hold_params(self, params, init_params)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Kinds with a three-stage form (Parametrization.factored) get the fused/factorised ops; others rebuild.
        self._structured = len(spec.shape) >= 2 and spec.factored(self.param_dict(), self.scale) is not None
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
    def param_dict(self) -> dict[str, torch.Tensor]:
        """The trainable params by name (a plain dict; ``dict(ParameterDict)`` does not trace under dynamo)."""
        return {k: v for k, v in self.params.items()}

    def delta_weight(self) -> torch.Tensor:
        """``s·ΔW`` of the weight's shape, with autograd (the core's planned contraction; under dynamo the
        three-stage einsums, which trace without a graph break)."""
        if self._structured and torch.compiler.is_compiling():
            return Geometry(0).reconstruct(*self.views())
        return self.spec.reconstruct(self.param_dict(), self.scale)

    def init_delta(self) -> torch.Tensor:
        """``s·ΔW₀``, the part moved out of the base weight at 'hosvd' init."""
        return self.spec.reconstruct(self.init_params(), self.scale)

    def views(self, params: Mapping[str, torch.Tensor] | None = None) -> tuple[Any, torch.Tensor, Any, int]:
        """``(P_out, S, P_in, mg)`` of the three-stage form (see :mod:`._ops`), s folded into S: the kind's
        :meth:`~tucker_peft.Parametrization.factored`."""
        v = self.spec.factored(self.param_dict() if params is None else params, self.scale)
        if v is None:
            raise TuckerPeftError(f"kind {self.spec.kind!r} has no three-stage form")  # pragma: no cover
        return v

    def strategy(self, geom: Geometry, positions: int, training: bool,
                 views: tuple[Any, torch.Tensor, Any, int] | None = None) -> tuple[str, bool]:
        """('rebuild' or 'factorized', staged backward?) for an input with ``positions`` output positions.

        ``views``: those the layer runs with (default :meth:`views`); only their shapes are read.
        """
        if not self._structured:
            return "rebuild", False
        if not torch.compiler.is_compiling() and geom in self._costs:  # dynamo never reads the cache
            recon, chain, staged = self._costs[geom]
        else:  # under dynamo: no mutable cache to guard on; the arithmetic is traced away
            p_out, s, p_in, mg = self.views() if views is None else views
            recon, chain, staged = stage_costs(geom, tuple(self.spec.shape), p_out, tuple(s.shape), p_in, mg)
            if not torch.compiler.is_compiling():
                self._costs[geom] = (recon, chain, staged)
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
    if isinstance(base, (nn.Linear, nn.Embedding)) or _is_conv1d(base):
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


class _Hook(nn.Module):
    """What both hooks share: named adapters, the active and the merged ones, merging.

    ``active_adapters``: the names whose ``s·ΔW`` add to the weight (``()``: off);
    ``merged``: those already added into the base weight. Set the active ones with
    :meth:`set_active` only.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.layer_name = name

    @property
    def active_adapter(self) -> str | None:
        """The active adapter's name if exactly one is active, else None."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else None

    def set_active(self, names: Iterable[str]) -> None:
        """Make ``names`` (adapters of this hook, in order) the active ones."""
        names = tuple(names)
        bad = [n for n in names if n not in self.adapters]
        if bad or len(set(names)) != len(names):
            raise TuckerPeftError(f"{self.layer_name!r}: expected distinct adapter names among {list(self.adapters)}, "
                                  f"got {list(names)}")
        self.active_adapters = names

    def _live(self) -> list[DeltaWeight]:
        """The active adapters not merged into the weight: those the forward adds."""
        return [self.adapters[n] for n in self.active_adapters if n not in self.merged]  # type: ignore[misc]

    def merge(self, weight: torch.Tensor) -> None:
        """Add every active, unmerged adapter's ``s·ΔW`` into ``weight`` (the base weight, in place)."""
        for n in self.active_adapters:
            if n not in self.merged:
                _add_(weight, self.adapters[n].delta_weight(), 1.0)
                self.merged = self.merged + (n,)

    def unmerge(self, weight: torch.Tensor) -> None:
        """Undo :meth:`merge` on ``weight``."""
        for n in reversed(self.merged):
            _add_(weight, self.adapters[n].delta_weight(), -1.0)
        self.merged = ()


class AdaptedLayer(_Hook):
    """A Linear, ConvNd, Embedding or transformers Conv1D with named adapters.

    The wrapped layer stays at ``base_layer`` (its weight frozen), adapters at
    ``adapters[name]``. The output equals the base layer's with
    ``W + Σ s·ΔW`` over the active adapters; ΔW has the weight's own layout
    (``(in, out)`` for a Conv1D).
    """

    def __init__(self, base: nn.Module, name: str = "") -> None:
        super().__init__(name)
        types = supported_types()
        if not isinstance(base, types):
            raise TuckerPeftError(f"layer {name!r}: expected one of "
                                  f"{[c.__name__ for c in types]}, got {type(base).__name__}")
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise TuckerPeftError(f"layer {name!r}: nn.Embedding with max_norm renormalises its weight in place; "
                                  "expected max_norm=None")
        self.base_layer = base
        self.fan_in_fan_out = _is_conv1d(base)  # weight stored (in, out)
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

    def merge(self, weight: torch.Tensor | None = None) -> None:
        super().merge(self.base_layer.weight if weight is None else weight)

    def unmerge(self, weight: torch.Tensor | None = None) -> None:
        super().unmerge(self.base_layer.weight if weight is None else weight)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepad is None:
            return x
        pads, mode = self._prepad
        return F.pad(x, pads, mode=mode)

    def _views(self, d: DeltaWeight) -> tuple[Any, torch.Tensor, Any, int]:
        """Three-stage views in the ``(out, in/groups, *kernel)`` layout the ops use."""
        v = d.views()
        return _transposed(v) if self.fan_in_fan_out else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = self._live()
        if not live:
            return self.base_layer(x)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return self._embedding(x, live)
        geom = self.geometry
        weight = base.weight.T if self.fan_in_fan_out else base.weight  # (out, in/groups, *kernel)
        if len(live) > 1 or not live[0]._structured:
            # Several adapters (or a kind without a three-stage form): one conv with W + Σ s·ΔW.
            dw = sum(d.delta_weight() for d in live)
            w = weight + (dw.T if self.fan_in_fan_out else dw).to(weight.dtype)
            return F.linear(x, w, base.bias) if geom.nd == 0 else base._conv_forward(x, w, base.bias)
        d = live[0]
        lead = x.shape[:-1] if geom.nd == 0 and x.ndim != 2 else None
        unbatched = geom.nd > 0 and x.ndim == geom.nd + 1
        if lead is not None:  # the ops take (N, in); only reshape (a view, as nn.Linear's) where needed
            x = x.reshape(-1, x.shape[-1])
        elif unbatched:
            x = x.unsqueeze(0)
        positions = x.shape[0] * (math.prod(x.shape[2:]) // max(1, math.prod(geom.stride)) if geom.nd else 1)
        views = self._views(d)
        p_out, s, p_in, mg = views
        mode, staged = d.strategy(geom, positions, self.training, views)
        if mode == "rebuild":
            y = FusedDelta.apply(self._pad(x), weight, base.bias, p_out, s, p_in, geom, mg, staged)
        else:
            xp = self._pad(x)
            y = geom.conv(xp, weight, geom.groups, base.bias)
            xd = self._pad(d.dropout(x)) if d.dropout is not None else xp
            y = y + factorized(geom, xd, p_out, s, p_in, mg).to(y.dtype)
        if lead is not None:
            return y.reshape(*lead, y.shape[-1])
        if geom.nd == 0:
            return y
        return y.squeeze(0) if unbatched else y

    def _embedding(self, idx: torch.Tensor, live: list[DeltaWeight]) -> torch.Tensor:
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        kw = dict(padding_idx=base.padding_idx, max_norm=None, norm_type=base.norm_type,
                  scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        d = live[0]
        if len(live) > 1 or not d._structured or d.strategy(self.geometry, idx.numel(), self.training)[0] == "rebuild":
            dw = sum(e.delta_weight() for e in live)
            return F.embedding(idx, base.weight + dw.to(base.weight.dtype), **kw)
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


class DeltaParametrization(_Hook):
    """``torch.nn.utils.parametrize`` hook for any N-D parameter: ``W ↦ W + Σ s·ΔW`` over the active adapters."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        live = self._live()
        if not live:
            return w
        dw = sum(d.delta_weight() for d in live)
        return w + dw.to(w.dtype)


def _add_(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """``weight += sign·delta`` in place, accumulated in fp32 for half-precision weights."""
    with torch.no_grad():
        acc = torch.promote_types(weight.dtype, torch.float32)
        weight.copy_((weight.to(acc) + sign * delta.detach().to(acc)).to(weight.dtype))
