"""Generic member slices of a stacked ΔW, derived from a kind's einsum terms.

A cross-layer adapter stacks its members' weights along leading modes. Fixing
those modes' indices in the einsum gives each member's ΔW: every operand that
carries a fixed letter is indexed there, and the remaining letters form an
einsum of the member's shape. This works for any kind; kinds whose slices are
again of their own kind (Tucker, CP, TT) override :meth:`Parametrization.member`
and :meth:`Parametrization.slice` to keep their fast factored forms.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np
import opt_einsum

from ._base import Parametrization, Params
from ._errors import TuckerPeftError
from ._namespace import namespace

__all__ = ["TermSlice", "slice_terms", "fine_digits"]


@functools.lru_cache(maxsize=4096)
def _symbol_index(letter: str) -> int:
    i = 0
    while opt_einsum.get_symbol(i) != letter:
        i += 1
        if i > 100_000:  # pragma: no cover - every kind uses get_symbol letters
            raise TuckerPeftError(f"einsum letter {letter!r} is not an opt_einsum symbol")
    return i


@dataclass(frozen=True)
class TermSlice(Parametrization):
    """One member ``ΔW[i_0, …, i_{lead-1}]`` of ``parent``, as the parent's einsum with those modes fixed.

    Made by ``parent.member(lead)``; its params come from
    ``parent.slice(params, index)``. It has no factored form, so bindings
    rebuild its ΔW; its exact LoRA factors are the dense slice itself.
    """

    parent: Parametrization = None  # type: ignore[assignment]
    lead: int = 1

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"{self.parent.kind}[slice]"

    @property
    def split_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.parent.split_shape[self.lead:]

    @cached_property
    def _plan(self) -> tuple[tuple[str, tuple[Any, ...] | None, tuple[int, ...], str], ...]:
        """Per parent term: ``(name, fixed axes as (axis, (mode, factor)) or None, new view, new subscripts)``."""
        p = self.parent
        fixed = {p.mode_symbol(n, j): (n, j) for n in range(self.lead) for j in range(len(p.split_shape[n]))}
        shift = p._fine_start[self.lead] if self.lead < p.ndim else len(p._fine)
        out, seen = [], set()
        for name, view, subs in p._term_list:
            if name in seen:
                raise TuckerPeftError(f"kind {p.kind!r}: param {name!r} appears in two einsum terms; a generic "
                                      "member slice needs each param once (override member()/slice())")
            seen.add(name)
            axes = tuple((a, fixed[c]) for a, c in enumerate(subs) if c in fixed)
            keep = [(d, c) for d, c in zip(view, subs) if c not in fixed]
            new_subs = "".join(opt_einsum.get_symbol(_symbol_index(c) - shift) for _, c in keep)
            out.append((name, axes or None, tuple(d for d, _ in keep), new_subs))
        return tuple(out)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        return {name: view for name, _, view, _ in self._plan}

    def terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        return tuple((name, view, subs) for name, _, view, subs in self._plan)

    def initialize(self, method: str, ctx: Any, rng: np.random.Generator, tensor: Any, scale: float,
                   options: dict[str, Any]) -> Params:
        raise TuckerPeftError(f"a member slice of {self.parent!r} is initialised through its stack; "
                              "expected parent.init(...) and parent.slice(params, index)")

    def describe_ranks(self) -> str:
        return self.parent.describe_ranks()

    def lora_factors(self, params: Mapping[str, Any], scale: Any = 1.0) -> tuple[Any, Any] | None:
        """The dense slice with an identity on its smaller side: exact, rank ``min(out, Π shape[1:])``."""
        xp = namespace(*params.values())
        out, k = self.shape[0], math.prod(self.shape[1:])
        w = xp.reshape(self.reconstruct(params, scale), (out, k))
        dev = getattr(w, "device", None)
        kw = {} if dev is None else {"device": dev}
        if out <= k:
            return xp.eye(out, dtype=w.dtype, **kw), w
        return w, xp.eye(k, dtype=w.dtype, **kw)


@functools.lru_cache(maxsize=1024)
def term_slice(parent: Parametrization, lead: int) -> TermSlice:
    """The cached generic member spec of ``parent`` (specs are immutable and hashable)."""
    return TermSlice(parent.shape[lead:], parent=parent, lead=lead, max_modes=parent.max_modes)


def fine_digits(spec: Parametrization, index: tuple[int, ...]) -> list[int]:
    """The index of each factor of the leading modes (C order; one per mode unless a kind splits modes).

    Plain integer arithmetic (not ``np.unravel_index``), which dynamo traces.
    """
    out: list[int] = []
    for n, i in enumerate(index):
        ds = []
        for f in reversed(spec.split_shape[n]):
            i, d = divmod(i, f)
            ds.append(d)
        out += reversed(ds)
    return out


def slice_terms(spec: Parametrization, params: Mapping[str, Any], index: tuple[int, ...]) -> Params:
    """Params of ``term_slice(spec, len(index))`` at ``index``: each operand indexed at the fixed letters."""
    xp = spec.check_params(params)
    member = spec.member(len(index))
    digits = fine_digits(spec, index)
    ops = spec._operands(xp, params)
    out: Params = {}
    for op, (name, axes, _, _) in zip(ops, member._plan):
        if axes is None:
            out[name] = op
            continue
        key: list[Any] = [slice(None)] * op.ndim
        for a, (n, j) in axes:
            key[a] = digits[spec._fine_start[n] + j]
        out[name] = op[(*key, ...)]  # with the ellipsis NumPy keeps a 0-d array, not a scalar
    return out
