"""The adapted op of a Linear or ConvNd, in three stages, and its fused autograd Function.

Every kind on a layer weight ``W: (out, in/groups, *kernel)`` is written as

    ΔW = P_out ×_0 S ×_1 P_in,   P_out: (out, m_out),  S: (m_out, m_in / mg, *kernel),  P_in: (in/groups, m_in)

with ``P_out`` / ``P_in`` absent (identity) where the kind does not factor
that mode, and ``mg`` the groups of the small middle op (``mg = R`` for CP,
whose S is diagonal: a depthwise conv). Tucker: ``P = U_out, U_in``,
``S = s·G ×_k U_k``; CP: ``P = a_out, a_in``, ``S = s·λ ∘ a_k``; LoRA:
``P_out = B``, ``S = s·A``. The factorised forward is then
``P_in``-projection → small conv with S → ``P_out``-expansion, and the fused
forward's backward uses the same three stages, so that one step never pays
for a full weight gradient.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..._planner import contract as _planned


def contract(eq: str, *ops: torch.Tensor) -> torch.Tensor:
    """The core's cached plan in eager mode; plain ``torch.einsum`` while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.einsum(eq, *ops)
    return _planned(eq, *ops)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def symbols(n: int, avoid: str = "") -> str:
    """``n`` distinct einsum letters not in ``avoid`` (``torch.einsum`` takes a-z, A-Z: any N-D weight fits)."""
    free = [c for c in string.ascii_lowercase + string.ascii_uppercase if c not in avoid]
    if n > len(free):
        raise ValueError(f"an einsum over {n} modes: expected at most {len(free)}")
    return "".join(free[:n])


@dataclass(frozen=True)
class Geometry:
    """Static facts of one layer's op. ``nd = 0`` is a Linear."""

    nd: int
    groups: int = 1
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    # -- primitive ops -------------------------------------------------------
    def conv(self, x: torch.Tensor, w: torch.Tensor, groups: int, bias: Any = None) -> torch.Tensor:
        if self.nd == 0:
            return F.linear(x, w, bias)
        return _CONV[self.nd](x, w, bias, self.stride, self.padding, self.dilation, groups)

    def pointwise(self, x: torch.Tensor, w2d: torch.Tensor, groups: int) -> torch.Tensor:
        """1×1 conv (a matmul for Linear) with weight ``(O, I)``."""
        if self.nd == 0:
            return x @ w2d.T
        return _CONV[self.nd](x, w2d.reshape(*w2d.shape, *(1,) * self.nd), None, 1, 0, 1, groups)

    def _backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int, mask: list[bool],
                  point: bool = False) -> Any:
        nd = self.nd
        one = (1,) * nd
        return torch.ops.aten.convolution_backward(
            dy, x, w, None, one if point else self.stride, (0,) * nd if point else self.padding,
            one if point else self.dilation, False, (0,) * nd, groups, mask)

    def wgrad(self, dy: torch.Tensor, x: torch.Tensor, wshape: tuple[int, ...], groups: int,
              point: bool = False) -> torch.Tensor:
        """∂L/∂w of ``y = conv(x, w)`` given ``dy``; ``(O, I)`` for pointwise."""
        if self.nd == 0:
            return dy.T @ x
        if point:
            wshape = (*wshape, *(1,) * self.nd)
        w = torch.empty(wshape, dtype=x.dtype, device=x.device)
        g = self._backward(dy, x, w, groups, [False, True, False], point)[1]
        return g.reshape(g.shape[:2]) if point else g

    def dgrad(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
        """∂L/∂x of ``y = conv(x, w)`` given ``dy``."""
        if self.nd == 0:
            return dy @ w
        return self._backward(dy, x, w, groups, [True, False, False])[0]

    # -- the three stages -----------------------------------------------------
    def mid_weight(self, s: torch.Tensor, p_out: Any, mg: int) -> tuple[torch.Tensor, int]:
        """S laid out for the middle conv over ``groups`` input groups, and that conv's groups."""
        if p_out is None:
            return s, self.groups * mg
        return (s.repeat(self.groups, *(1,) * (s.ndim - 1)) if self.groups > 1 else s), self.groups * mg

    def mid(self, x_r: torch.Tensor, s: torch.Tensor, p_out: Any, mg: int) -> torch.Tensor:
        if self.nd == 0 and mg > 1:
            return x_r * s.reshape(-1)
        w, g = self.mid_weight(s, p_out, mg)
        return self.conv(x_r, w, g)

    def proj_in(self, x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """``x`` → ``(N, groups·m_in, ...)``: P_inᵀ applied per group."""
        w = p_in.T
        if self.groups > 1:
            w = w.repeat(self.groups, 1)
        return self.pointwise(x, w, self.groups)

    def proj_out(self, z: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
        """``(N, groups·m_out, ...)`` → ``(N, out, ...)``."""
        return self.pointwise(z, p_out, self.groups)

    def proj_out_t(self, dy: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
        """P_outᵀ per group: ``(N, out, ...)`` → ``(N, groups·m_out, ...)``."""
        g = self.groups
        if g == 1:
            return self.pointwise(dy, p_out.T, 1)
        o, m = p_out.shape
        w = p_out.reshape(g, o // g, m).transpose(1, 2).reshape(g * m, o // g)
        return self.pointwise(dy, w, g)

    # -- ΔW -------------------------------------------------------------------
    def reconstruct(self, p_out: Any, s: torch.Tensor, p_in: Any, mg: int) -> torch.Tensor:
        """Dense ``P_out ×_0 S ×_1 P_in`` of shape ``(out, in/groups, *kernel)``."""
        eq, ops = _recon_terms(p_out, s, p_in, mg)
        return s if eq is None else contract(eq, *ops)


def _recon_terms(p_out: Any, s: torch.Tensor, p_in: Any, mg: int) -> tuple[str | None, list[torch.Tensor]]:
    """The einsum of :meth:`Geometry.reconstruct` and its operands (None: ΔW is S itself)."""
    k = symbols(s.ndim - 2, "oabc")
    if mg > 1:  # diagonal S: (m, 1, *kernel)
        return f"oa,a{k},ca->oc{k}", [p_out, s.reshape(s.shape[0], *s.shape[2:]), p_in]
    if p_out is not None and p_in is not None:
        return f"oa,ab{k},cb->oc{k}", [p_out, s, p_in]
    if p_out is not None:
        return f"oa,ac{k}->oc{k}", [p_out, s]
    if p_in is not None:
        return f"ob{k},cb->oc{k}", [s, p_in]
    return None, [s]


def reconstruct_vjp(dw: torch.Tensor, p_out: Any, s: torch.Tensor, p_in: Any, mg: int) -> tuple[Any, torch.Tensor, Any]:
    """``(∂P_out, ∂S, ∂P_in)`` from ``∂L/∂ΔW``: each the einsum of the others with ``dw`` (no autograd)."""
    eq, ops = _recon_terms(p_out, s, p_in, mg)
    if eq is None:
        return None, dw.to(s.dtype), None
    ins, out = eq.split("->")
    terms = ins.split(",")
    grads = []
    for i, t in enumerate(terms):
        rest = [j for j in range(len(terms)) if j != i]
        g = contract(",".join([out] + [terms[j] for j in rest]) + "->" + t, dw.to(ops[i].dtype), *[ops[j] for j in rest])
        grads.append(g)
    it = iter(grads)
    dp_out = next(it) if p_out is not None else None
    ds = next(it).reshape(s.shape)
    dp_in = next(it) if p_in is not None else None
    return dp_out, ds, dp_in


class FusedDelta(torch.autograd.Function):
    """``y = op(x, W + P_out ×_0 S ×_1 P_in) + b`` in one op; the backward never forms ∂L/∂W.

    ∂L/∂x is the frozen layer's own input gradient with the merged weight. The
    adapter's gradients come from the three small stages: with
    ``x_r = P_inᵀx``, ``dy_r = P_outᵀdy``, ``z = S ⋆ x_r`` and
    ``t = Sᵀ ⋆ dy_r``: ∂S = wgrad(x_r, dy_r), ∂P_out = Σ dy ⊗ z and
    ∂P_in = Σ x ⊗ t.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any, p_out: Any, s: torch.Tensor,
                p_in: Any, geom: Geometry, mg: int, staged: bool = True) -> torch.Tensor:
        ctx.geom, ctx.mg, ctx.staged = geom, mg, staged
        # W + ΔW is rebuilt in the backward rather than saved: a weight-sized tensor per layer. A Linear with
        # few rows skips that too: ∂L/∂x = dy·W + the stages' chain, when the chain costs less than ΔW.
        ctx.dx_stages = staged and dx_by_stages(geom, tuple(weight.shape), p_out, tuple(s.shape), p_in, mg, x.shape[0])
        ctx.save_for_backward(x, weight, p_out, s, p_in)
        return geom.conv(x, _merged(weight, p_out, s, p_in, geom, mg), geom.groups, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        x, weight, p_out, s, p_in = ctx.saved_tensors
        geom: Geometry = ctx.geom
        mg: int = ctx.mg
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx_stages = need[0] and ctx.dx_stages
        if need[0] and not dx_stages:
            dx = geom.dgrad(dy, x, _merged(weight, p_out, s, p_in, geom, mg), geom.groups)
        else:
            dx = None
        dweight = geom.wgrad(dy, x, tuple(weight.shape), geom.groups) if need[1] else None
        dbias = dy.sum(dim=[d for d in range(dy.ndim) if d != (1 if geom.nd else dy.ndim - 1)]) if need[2] else None
        dp_out = ds = dp_in = None
        if (need[3] or need[4] or need[5]) and not ctx.staged:
            # Thin layers (few input channels): one full weight gradient is cheaper than the stages.
            dw = dweight if dweight is not None else geom.wgrad(dy, x, tuple(weight.shape), geom.groups)
            dp_out, ds, dp_in = reconstruct_vjp(dw, p_out, s, p_in, mg)
        elif need[3] or need[4] or need[5] or dx_stages:
            dt = x.dtype
            po, sd, pi = _to(p_out, dt), s.to(dt), _to(p_in, dt)
            x_r = geom.proj_in(x, pi) if pi is not None and (need[3] or need[4]) else x
            dy_r = geom.proj_out_t(dy, po) if po is not None else dy
            w_mid, g_mid = geom.mid_weight(sd, po, mg)
            if need[4]:
                if geom.nd == 0 and mg > 1:
                    ds = (dy_r * x_r).sum(0).reshape(s.shape)
                else:
                    ds = geom.wgrad(dy_r, x_r, tuple(w_mid.shape), g_mid)
                    if po is not None and geom.groups > 1:
                        ds = ds.reshape(geom.groups, *s.shape).sum(0)
                ds = ds.to(s.dtype)
            if need[3]:
                z = geom.mid(x_r, sd, po, mg)
                dp_out = geom.wgrad(dy, z, tuple(p_out.shape), geom.groups, point=True).to(p_out.dtype)
            if need[5] or dx_stages:
                if geom.nd == 0 and mg > 1:
                    t = dy_r * sd.reshape(-1)
                else:
                    t = geom.dgrad(dy_r, x_r, w_mid, g_mid)
            if need[5]:
                m_in = p_in.shape[1]
                gp = geom.wgrad(t, x, (geom.groups * m_in, p_in.shape[0]), geom.groups, point=True)
                if geom.groups > 1:
                    gp = gp.reshape(geom.groups, m_in, -1).sum(0)
                dp_in = gp.T.to(p_in.dtype)
            if dx_stages:  # a Linear: dx = dy·W + t·P_inᵀ, the sum inside the product
                dx = torch.addmm(t @ pi.T if pi is not None else t, dy, weight)
        return dx, dweight, dbias, dp_out, ds, dp_in, None, None, None


def dx_by_stages(geom: Geometry, wshape: tuple[int, ...], p_out: Any, s_shape: tuple[int, ...], p_in: Any, mg: int,
                 rows: int) -> bool:
    """Whether :class:`FusedDelta`'s backward takes ∂L/∂x of a Linear on ``rows`` rows as ``dy·W`` plus the
    stages' chain (cheaper than rebuilding ``W + ΔW`` when the rows are few); convs always rebuild."""
    if geom.nd != 0:
        return False
    recon, chain, _ = stage_costs(geom, wshape, p_out, s_shape, p_in, mg)
    return rows * chain < recon + 2 * math.prod(wshape)


def _merged(weight: torch.Tensor, p_out: Any, s: torch.Tensor, p_in: Any, geom: Geometry, mg: int) -> torch.Tensor:
    """``W + P_out ×_0 S ×_1 P_in`` in the weight's dtype (summed in the adapter's dtype if wider)."""
    if geom.nd == 0:  # a matrix: the last product adds into W (one pass over a weight-sized tensor, not three)
        a, b = _low_rank(p_out, s, p_in, mg)
        if b is None:
            return weight + a if a.dtype == weight.dtype else (weight.to(a.dtype) + a).to(weight.dtype)
        if a.dtype == weight.dtype:
            return torch.addmm(weight, a, b)
        return torch.addmm(weight.to(a.dtype), a, b).to(weight.dtype)
    dw = geom.reconstruct(p_out, s, p_in, mg)
    return weight + dw if dw.dtype == weight.dtype else (weight.to(dw.dtype) + dw).to(weight.dtype)


def _low_rank(p_out: Any, s: torch.Tensor, p_in: Any, mg: int) -> tuple[torch.Tensor, Any]:
    """A 2-D ``ΔW = P_out S P_inᵀ`` as ``a @ b`` (``b`` None: ``ΔW = a``), the cheaper inner product first."""
    if mg > 1:  # diagonal S
        return p_out * s.reshape(-1), p_in.T
    if p_out is None:
        return (s, None) if p_in is None else (s, p_in.T)
    if p_in is None:
        return p_out, s
    (out, m_out), (m_in, cin) = p_out.shape, (s.shape[1], p_in.shape[0])
    if out * m_in * (m_out + cin) <= m_out * cin * (m_in + out):
        return p_out @ s, p_in.T
    return p_out, s @ p_in.T


def _to(t: Any, dtype: torch.dtype) -> Any:
    return None if t is None else t.to(dtype)


def factorized(geom: Geometry, x: torch.Tensor, p_out: Any, s: torch.Tensor, p_in: Any, mg: int) -> torch.Tensor:
    """``ΔW ⋆ x`` through the three stages, with autograd; ΔW is never built."""
    dt = x.dtype
    po, sd, pi = _to(p_out, dt), s.to(dt), _to(p_in, dt)
    x_r = geom.proj_in(x, pi) if pi is not None else x
    z = geom.mid(x_r, sd, po, mg)
    return geom.proj_out(z, po) if po is not None else z


def stage_costs(geom: Geometry, wshape: tuple[int, ...], p_out: Any, s_shape: tuple[int, ...], p_in: Any,
                mg: int) -> tuple[int, int, int]:
    """Multiply-adds of rebuilding ΔW, and per output position of the factorised chain and of the staged backward."""
    out, cg, *kernel = wshape
    k = math.prod(kernel)
    g = geom.groups
    m_out, m_in = s_shape[0], s_shape[1] * mg
    mid = (g * m_out if p_out is not None else out) * s_shape[1] * k
    proj_in = g * cg * m_in if p_in is not None else 0
    proj_out = out * m_out if p_out is not None else 0
    chain = proj_in + mid + proj_out
    # Staged backward: x_r, dy_r, ∂S, and z / ∂P_out, t / ∂P_in where those factors exist.
    staged = proj_in + proj_out + mid + (mid + proj_out if p_out is not None else 0) + (mid + proj_in if p_in is not None else 0)
    if mg > 1:
        recon = out * m_out * k + out * cg * m_out * k
    else:
        recon = (out * m_out * s_shape[1] * k if p_out is not None else 0) + (out * cg * m_in * k if p_in is not None else 0)
    return recon, chain, staged
