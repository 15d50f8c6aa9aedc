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
from typing import Any, Callable, Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ._base import Parametrization, lookup
from ._errors import TuckerPeftError
from ._namespace import ArrayContext

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
    from .tt import TT

    return TT.sample_tensorize(tuple(shape), _picker(draw))


def _picker(draw: Any) -> Callable[[Sequence[Any]], Any]:
    """The ``pick`` of :meth:`Parametrization.sample_spec` as hypothesis draws (shrinking to the first option)."""
    return lambda options: draw(st.sampled_from(options))


@st.composite
def specs(draw: Any, kinds: Sequence[str] = KINDS, shape: Sequence[int] | None = None,
          shape_strategy: st.SearchStrategy[tuple[int, ...]] | None = None) -> Parametrization:
    """A valid spec of one of ``kinds`` on ``shape`` (or a drawn shape).

    Each kind draws its own variety of ranks and options
    (:meth:`Parametrization.sample_spec`). A drawn shape with fewer modes
    than the kind's :attr:`~Parametrization.min_modes` gets trailing modes of
    size 2; a given ``shape`` is kept, and kinds that cannot take it are not
    drawn.
    """
    classes = [lookup(k) for k in kinds]
    for k, c in zip(kinds, classes):
        if not (isinstance(c, type) and issubclass(c, Parametrization)):
            raise TuckerPeftError(f"specs: kind {k!r} is registered as {c!r}; expected a Parametrization class "
                                  "(its sample_spec draws the ranks)")
    if shape is not None:
        shp = tuple(shape)
        classes = [c for c in classes if len(shp) >= c.min_modes]
        if not classes:
            raise TuckerPeftError(f"specs: none of the kinds {list(kinds)} takes a shape of {len(shp)} modes, "
                                  f"got shape {shp}")
    cls = draw(st.sampled_from(classes))
    if shape is None:
        shp = draw(shape_strategy if shape_strategy is not None else shapes())
        shp = (*shp, *(2,) * (cls.min_modes - len(shp)))
    return cls.sample_spec(shp, _picker(draw))


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
