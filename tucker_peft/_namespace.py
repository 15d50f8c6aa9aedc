"""Namespaces, devices and dtypes of the arrays given.

Nothing here holds backend state. Heavy frameworks are only touched through
arrays the caller already made, so importing this module imports neither torch
nor cupy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from array_api_compat import (
    array_namespace,
    is_cupy_array,
    is_dask_array,
    is_jax_array,
    is_numpy_array,
    is_torch_array,
)
from array_api_compat import device as array_device

from ._errors import BackendMismatchError, TuckerPeftError

__all__ = [
    "namespace",
    "library_of",
    "einsum_backend",
    "ArrayContext",
    "to_numpy",
]

# opt_einsum backends that ship einsum/tensordot/transpose natively.
_NATIVE_EINSUM = {"numpy": "numpy", "torch": "torch", "cupy": "cupy", "jax": "jax"}
_GENERIC_BACKEND = "tucker_peft._array_api_einsum"
# array-api-compat's type checks: cached per type, subclasses included, and none imports its library.
_KNOWN_LIBRARIES = (
    ("numpy", is_numpy_array),
    ("torch", is_torch_array),
    ("cupy", is_cupy_array),
    ("jax", is_jax_array),
    ("dask", is_dask_array),
)


def library_of(x: Any) -> str:
    """Name of the library that made ``x`` (``'numpy'``, ``'torch'``, ``'cupy'``, ``'jax'``...).

    Known libraries are recognised by type (a subclass of ``np.ndarray`` defined
    anywhere is ``'numpy'``); any other array by its top-level module name.
    """
    for name, is_array in _KNOWN_LIBRARIES:
        if is_array(x):
            return name
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
