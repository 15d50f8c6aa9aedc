"""Dispatch on the arrays given: namespaces, devices, dtypes and planned contractions.

Nothing here holds backend state. Heavy frameworks are only touched through
arrays the caller already made, so importing this module imports neither torch
nor cupy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import opt_einsum
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from ._errors import BackendMismatchError, TuckerPeftError

__all__ = [
    "namespace",
    "library_of",
    "einsum_backend",
    "plan",
    "ArrayContext",
    "to_numpy",
]

# opt_einsum backends that ship einsum/tensordot/transpose natively.
_NATIVE_EINSUM = {"numpy": "numpy", "torch": "torch", "cupy": "cupy", "jax": "jax", "jaxlib": "jax"}
_GENERIC_BACKEND = "tucker_peft._array_api_einsum"


def library_of(x: Any) -> str:
    """Top-level module name of the library that made ``x`` (``'numpy'``, ``'torch'``...)."""
    return type(x).__module__.split(".", 1)[0]


def namespace(*arrays: Any, what: Sequence[str] | None = None) -> Any:
    """Array-API namespace shared by ``arrays``.

    Raises
    ------
    BackendMismatchError
        If the arrays come from more than one library; the message names them.
    """
    try:
        return array_namespace(*arrays)
    except TypeError as exc:
        names = what if what is not None else [f"argument {i}" for i in range(len(arrays))]
        found = ", ".join(f"{n}: {library_of(a)}.{type(a).__name__}" for n, a in zip(names, arrays))
        raise BackendMismatchError(
            f"all arrays must come from one array library; got {found}"
        ) from exc


def einsum_backend(x: Any) -> str:
    """Name of the opt_einsum backend that executes contractions on ``x``.

    Libraries without a native einsum (array-api-strict, ...) get a generic
    backend written against the array API (``tensordot`` + ``matmul``).
    """
    return _NATIVE_EINSUM.get(library_of(x), _GENERIC_BACKEND)


def _optimize(n_operands: int) -> str:
    return "optimal" if n_operands <= 7 else "dp"


@functools.lru_cache(maxsize=4096)
def plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    """Planned contraction for ``equation`` on operands of ``shapes``.

    The FLOP-optimal pairwise order is found once per (equation, shapes) and
    cached; the returned ``opt_einsum`` expression only executes.
    """
    return opt_einsum.contract_expression(equation, *shapes, optimize=_optimize(len(shapes)))


@functools.lru_cache(maxsize=4096)
def _path_info(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    return opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=_optimize(len(shapes)))[1]


def plan_cost(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """FLOPs (multiply and add counted separately) of the planned contraction."""
    return int(_path_info(equation, shapes).opt_cost)


@functools.lru_cache(maxsize=4096)
def _steps(equation: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[tuple[int, ...], tuple[str, ...], str], ...]:
    """The plan's pairwise steps ``(operand positions, input subscripts, output)``."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    for t in terms:
        lonely = [s for s in t if s not in out and sum(s in u for u in terms) == 1]
        if lonely:
            raise TuckerPeftError(
                f"einsum {equation!r}: index {lonely[0]!r} of term {t!r} is summed without meeting another "
                "operand; expected every index in the output or in two operands (sum it into the parameter instead)"
            )
    steps = []
    for inds, _, einsum_str, _, _ in _path_info(equation, shapes).contraction_list:
        step_lhs, step_out = einsum_str.split("->")
        steps.append((tuple(inds), tuple(step_lhs.split(",")), step_out))
    return tuple(steps)


def vjp_cost(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """FLOPs of :func:`contract_vjp`: the forward steps but the last, and two products per step."""
    lhs, _ = equation.split("->")
    size = {s: d for t, shp in zip(lhs.split(","), shapes) for s, d in zip(t, shp)}
    steps = _steps(equation, shapes)
    total = 0
    for k, (_, terms, out) in enumerate(steps):
        involved = math.prod(size[s] for s in set("".join(terms)) | set(out))
        total += 2 * involved * (len(terms) + (k < len(steps) - 1))
    return total


def contract_vjp(equation: str, operands: Sequence[Any], cotangent: Any) -> list[Any]:
    """Gradients of ⟨cotangent, einsum(equation, *operands)⟩ for every operand.

    Reverse mode over the planned pairwise steps: the forward keeps each
    intermediate (the last, full-size product is never formed), the backward
    runs two planned contractions per step. This costs about two of the
    largest contractions, where differentiating each operand separately would
    repeat the largest one per operand.
    """
    shapes = tuple(tuple(int(s) for s in op.shape) for op in operands)
    steps = _steps(equation, shapes)
    values: dict[int, Any] = dict(enumerate(operands))
    live = list(range(len(operands)))
    tape = []
    for k, (inds, terms, out) in enumerate(steps):
        ids = [live.pop(i) for i in inds]
        node = len(operands) + k
        if k < len(steps) - 1:
            values[node] = contract(",".join(terms) + "->" + out, *(values[i] for i in ids))
        tape.append((ids, terms, out, node))
        live.append(node)
    grads: dict[int, Any] = {tape[-1][3]: cotangent}
    for ids, terms, out, node in reversed(tape):
        g = grads.pop(node)
        for j, (i, t) in enumerate(zip(ids, terms)):
            rest = [m for m in range(len(ids)) if m != j]
            eq = ",".join([out] + [terms[m] for m in rest]) + "->" + t
            gi = contract(eq, g, *(values[ids[m]] for m in rest))
            grads[i] = gi if i not in grads else grads[i] + gi
    return [grads[i] for i in range(len(operands))]


def contract(equation: str, *operands: Any) -> Any:
    """Execute ``equation`` on ``operands`` with a cached plan."""
    shapes = tuple(tuple(int(s) for s in op.shape) for op in operands)
    return plan(equation, shapes)(*operands, backend=einsum_backend(operands[0]))


@dataclass(frozen=True)
class ArrayContext:
    """Where new arrays are made: a namespace, a device and a floating dtype."""

    xp: Any
    device: Any
    dtype: Any

    @classmethod
    def resolve(cls, *, like: Any = None, tensor: Any = None, dtype: Any = None) -> "ArrayContext":
        """Context from ``like`` (else ``tensor``, else NumPy float64).

        ``dtype`` overrides the dtype and may be a dtype object of the
        namespace or its name (``'float32'``).
        """
        ref = like if like is not None else tensor
        if like is not None and tensor is not None:
            namespace(like, tensor, what=("like", "tensor"))
        if ref is None:
            xp = array_namespace(np.empty(0))
            dev = None
            default_dtype = xp.float64
        else:
            xp = namespace(ref)
            dev = array_device(ref)
            default_dtype = ref.dtype
        if dtype is None:
            dt = default_dtype
        elif isinstance(dtype, str):
            try:
                dt = getattr(xp, dtype)
            except AttributeError:
                raise TuckerPeftError(
                    f"dtype: expected a floating dtype name such as 'float32' or 'float64', got {dtype!r}"
                ) from None
        else:
            dt = dtype
        if not xp.isdtype(dt, "real floating"):
            raise TuckerPeftError(f"dtype: expected a real floating dtype, got {dt!r}")
        return cls(xp, dev, dt)

    def asarray(self, a: Any) -> Any:
        """Copy host data ``a`` into this context."""
        if self.device is None:
            return self.xp.asarray(a, dtype=self.dtype)
        return self.xp.asarray(a, dtype=self.dtype, device=self.device)

    def zeros(self, shape: Sequence[int]) -> Any:
        if self.device is None:
            return self.xp.zeros(tuple(shape), dtype=self.dtype)
        return self.xp.zeros(tuple(shape), dtype=self.dtype, device=self.device)


def to_numpy(x: Any) -> np.ndarray:
    """Host NumPy copy (or view) of any supported array."""
    lib = library_of(x)
    if lib == "numpy":
        return np.asarray(x)
    if lib == "torch":
        return x.detach().cpu().numpy()
    if lib == "cupy":
        return x.get()
    try:
        return np.from_dlpack(x)
    except Exception:  # pragma: no cover - last resort for exotic libraries
        return np.asarray(x)
