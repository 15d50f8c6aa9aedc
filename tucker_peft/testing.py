"""Hypothesis strategies for property-testing code built on tucker_peft.

This is the only module of the package that imports hypothesis (install
``tucker-peft[test]``). A downstream library can property-test its own
integration with one import::

    from hypothesis import given
    from tucker_peft import testing as tpst

    @given(tpst.spec_and_params())
    def test_my_binding(case):
        spec, params = case
        ...

Every strategy draws small shapes so that examples run fast.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ._base import Parametrization, lookup
from ._namespace import ArrayContext
from .cp import max_cp_rank

__all__ = [
    "shapes",
    "tucker_ranks",
    "tensorizations",
    "specs",
    "params",
    "cotangents",
    "spec_and_params",
    "arrays_for",
    "KINDS",
]

#: Kinds drawn by default: the seven built-in ones.
KINDS: tuple[str, ...] = ("tucker", "tucker2", "cp", "lora", "tt", "lokr", "loha")


def shapes(min_ndim: int = 1, max_ndim: int = 5, min_side: int = 1, max_side: int = 5,
           max_size: int = 2000) -> st.SearchStrategy[tuple[int, ...]]:
    """Weight shapes with ``min_ndim..max_ndim`` modes and at most ``max_size`` elements."""
    return hnp.array_shapes(min_dims=min_ndim, max_dims=max_ndim, min_side=min_side,
                            max_side=max_side).filter(lambda s: math.prod(s) <= max_size)


def tucker_ranks(shape: Sequence[int], allow_none: bool = True) -> st.SearchStrategy[tuple[int | None, ...]]:
    """Valid per-mode Tucker ranks for ``shape`` (``None`` where allowed)."""
    def one(d: int) -> st.SearchStrategy[int | None]:
        r = st.integers(1, d)
        return st.one_of(st.none(), r) if allow_none else r

    return st.tuples(*(one(d) for d in shape))


@st.composite
def tensorizations(draw: Any, shape: Sequence[int]) -> Any:
    """A valid ``tensorize=`` for :class:`tucker_peft.TT` on ``shape``: None, 'auto' or per-mode factors."""
    choice = draw(st.sampled_from(["none", "auto", "split"]))
    if choice == "none":
        return None
    if choice == "auto":
        return "auto"
    out = {}
    for n, d in enumerate(shape):
        divisors = [f for f in range(2, d) if d % f == 0]
        if divisors and draw(st.booleans()):
            f = draw(st.sampled_from(divisors))
            out[n] = (f, d // f)
    return out


@st.composite
def specs(draw: Any, kinds: Sequence[str] = KINDS, shape: Sequence[int] | None = None,
          shape_strategy: st.SearchStrategy[tuple[int, ...]] | None = None) -> Parametrization:
    """A valid spec of one of ``kinds`` on ``shape`` (or a drawn shape)."""
    kind = draw(st.sampled_from(list(kinds)))
    shp = tuple(shape) if shape is not None else draw(shape_strategy if shape_strategy is not None else shapes())
    if kind == "tucker":
        return lookup(kind)(shp, draw(tucker_ranks(shp)))
    if kind == "tucker2":
        lead = shp[: min(2, len(shp))]
        return lookup(kind)(shp, draw(st.tuples(*(st.integers(1, d) for d in lead))))
    if kind == "cp":
        return lookup(kind)(shp, draw(st.integers(1, min(max_cp_rank(shp), 6))))
    if kind in ("lora", "loha"):
        return lookup(kind)(shp, draw(st.integers(1, min(shp[0], math.prod(shp[1:]), 6))))
    if kind == "tt":
        cls = lookup(kind)
        tz = draw(tensorizations(shp))
        if draw(st.booleans()):
            return cls(shp, draw(st.integers(1, 6)), tz)
        top = cls(shp, 2**30, tz)
        bonds = [draw(st.integers(1, min(r, 6))) for r in top.ranks]
        # Repair into a valid train: r_k <= r_{k-1}·m_k and r_k <= m_{k+1}·r_{k+1}.
        m = top.cores
        for k in range(len(bonds)):
            bonds[k] = min(bonds[k], (bonds[k - 1] if k else 1) * m[k])
        for k in reversed(range(len(bonds))):
            bonds[k] = min(bonds[k], m[k + 1] * (bonds[k + 1] if k + 1 < len(bonds) else 1))
        return cls(shp, tuple(bonds), tz)
    if kind == "lokr":
        if len(shp) < 2:
            shp = (*shp, 2)
        return lookup(kind)(shp, draw(st.integers(1, 4)), draw(st.sampled_from([-1, 2])), draw(st.booleans()))
    # A third-party kind: draw from its budget family.
    f, t_max = lookup(kind).budget_family(shp)  # type: ignore[attr-defined]
    return f(draw(st.integers(1, t_max)))


def _floats(dtype: str) -> st.SearchStrategy[float]:
    if dtype == "float32":
        return st.floats(-2, 2, allow_nan=False, allow_infinity=False, width=32)
    return st.floats(-2, 2, allow_nan=False, allow_infinity=False)


def arrays_for(shape: Sequence[int], xp: Any = None, dtype: str = "float64",
               like: Any = None) -> st.SearchStrategy[Any]:
    """Finite arrays of ``shape`` in [-2, 2], in ``xp`` (NumPy by default) or ``like``'s library."""
    def convert(a: np.ndarray) -> Any:
        if like is not None:
            return ArrayContext.resolve(like=like, dtype=dtype).asarray(a)
        if xp is None:
            return a
        return xp.asarray(a, dtype=getattr(xp, dtype))

    return hnp.arrays(np.dtype(dtype), tuple(shape), elements=_floats(dtype)).map(convert)


def params(spec: Parametrization, xp: Any = None, dtype: str = "float64") -> st.SearchStrategy[dict[str, Any]]:
    """A params dict for ``spec`` with finite entries in [-2, 2]."""
    return st.fixed_dictionaries({k: arrays_for(s, xp, dtype) for k, s in spec.param_shapes.items()})


def cotangents(spec: Parametrization, xp: Any = None, dtype: str = "float64") -> st.SearchStrategy[Any]:
    """An array of ``spec.shape``, as a cotangent of ΔW."""
    return arrays_for(spec.shape, xp, dtype)


@st.composite
def spec_and_params(draw: Any, kinds: Sequence[str] = KINDS, xp: Any = None, dtype: str = "float64",
                    shape_strategy: st.SearchStrategy[tuple[int, ...]] | None = None) -> tuple[Parametrization, dict[str, Any]]:
    """A spec and matching params."""
    spec = draw(specs(kinds, shape_strategy=shape_strategy))
    return spec, draw(params(spec, xp, dtype))
