"""CuPy binding: framework-free training on GPU arrays, and DLPack hand-off to torch.

Install with ``pip install tucker-peft[cupy]``. The training pieces are
namespace-generic and live in the core (:mod:`tucker_peft.optim`,
:mod:`tucker_peft.adapter`, :mod:`tucker_peft.fitting`); they are re-exported
here. The same code runs on NumPy arrays on a CPU.

Importing this module does not import cupy or torch: functions that need them
import them when called, and the DLPack helpers work for NumPy arrays too.

>>> import cupy as cp, tucker_peft as tp                        # doctest: +SKIP
>>> from tucker_peft.backends import cupy as tpc                # doctest: +SKIP
>>> target = cp.asarray(w_finetuned - w_base)                   # doctest: +SKIP
>>> res = tpc.fit(tp.Tucker(target.shape, 16), target, steps=10)  # doctest: +SKIP
>>> torch_params = tpc.params_to_torch(res.params)              # zero-copy  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .._namespace import library_of, to_numpy
from .._errors import BackendMismatchError, TuckerPeftError
from ..adapter import Adapter, StateDictError
from ..fitting import FitResult, budget_sweep, fit
from ..optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "Optimizer",
    "clip_grad_norm",
    "Adapter",
    "StateDictError",
    "fit",
    "FitResult",
    "budget_sweep",
    "require_cupy",
    "gpu_available",
    "synchronize",
    "asarray",
    "to_numpy",
    "hand_off",
    "to_torch",
    "from_torch",
    "params_to_torch",
    "params_from_torch",
    "adapter_to_torch",
    "adapter_from_torch",
    "data_ptr",
    "shares_memory",
]


def require_cupy() -> Any:
    """Import and return ``cupy``, or raise a :class:`TuckerPeftError` saying how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise TuckerPeftError(f"cupy: expected an installed CuPy (pip install tucker-peft[cupy]), got ImportError: {exc}") from None
    return cupy


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def synchronize() -> None:
    """Wait for the current CuPy device (no-op without CuPy or a GPU); for timing."""
    if gpu_available():
        import cupy

        cupy.cuda.Device().synchronize()


def asarray(x: Any, dtype: Any = None) -> Any:
    """A CuPy array on the current device: a copy of host data, zero-copy for CUDA arrays (DLPack)."""
    cupy = require_cupy()
    if library_of(x) == "torch":
        x = from_torch(x)
    return cupy.asarray(x, dtype=dtype)


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, Mapping):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return fn(obj)


def hand_off(obj: Any, from_dlpack: Callable[[Any], Any]) -> Any:
    """Give arrays to any DLPack consumer without copying.

    Parameters
    ----------
    obj : array, or dict / list / tuple of arrays
        Arrays that implement ``__dlpack__`` (NumPy, CuPy, torch, JAX...).
    from_dlpack : callable
        The consumer's import, e.g. ``torch.from_dlpack``,
        ``cupy.from_dlpack``, ``numpy.from_dlpack``, ``jax.dlpack.from_dlpack``.

    Returns
    -------
    The same structure, the arrays imported by the consumer; they share
    memory with the inputs.
    """
    def one(x: Any) -> Any:
        if not hasattr(x, "__dlpack__"):
            raise TuckerPeftError(f"obj: expected arrays that implement __dlpack__, got {type(x).__name__}")
        try:
            return from_dlpack(x)
        except BufferError as exc:
            raise TuckerPeftError(f"obj: {library_of(x)}.{type(x).__name__} of shape {tuple(x.shape)} cannot be "
                                  f"exported by DLPack ({exc}); expected a writable array") from None

    return _map(obj, one)


def to_torch(obj: Any) -> Any:
    """Zero-copy torch tensors (same device) from CuPy or NumPy arrays, or dicts of them."""
    import torch

    return hand_off(obj, torch.from_dlpack)


def from_torch(obj: Any) -> Any:
    """Zero-copy arrays from torch tensors: CuPy for CUDA tensors, NumPy for CPU ones.

    Tensors that require grad are detached first (same storage).
    """
    def one(t: Any) -> Any:
        if library_of(t) != "torch":
            raise BackendMismatchError(f"obj: expected torch tensors, got {library_of(t)}.{type(t).__name__}")
        t = t.detach()
        if t.device.type == "cuda":
            return require_cupy().from_dlpack(t)
        if t.device.type == "cpu":
            import numpy as np

            return np.from_dlpack(t)
        raise TuckerPeftError(f"obj: expected a CPU or CUDA tensor, got device {t.device}")

    return _map(obj, one)


def params_to_torch(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`to_torch` for a params dict."""
    if not isinstance(params, Mapping):
        raise TuckerPeftError(f"params: expected a dict of name -> array, got {type(params).__name__}")
    return to_torch(dict(params))


def params_from_torch(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`from_torch` for a params dict."""
    if not isinstance(params, Mapping):
        raise TuckerPeftError(f"params: expected a dict of name -> tensor, got {type(params).__name__}")
    return from_torch(dict(params))


def adapter_to_torch(adapter: Adapter) -> Adapter:
    """The adapter with torch params, base, grads and optimizer state sharing its memory."""
    return adapter.map_arrays(to_torch)


def adapter_from_torch(adapter: Adapter) -> Adapter:
    """Inverse of :func:`adapter_to_torch`: CuPy (CUDA) or NumPy (CPU) arrays sharing memory."""
    return adapter.map_arrays(from_torch)


def data_ptr(x: Any) -> int:
    """Address of the first element of a NumPy, CuPy or torch array."""
    lib = library_of(x)
    if lib == "numpy":
        return int(x.__array_interface__["data"][0])
    if lib == "cupy":
        return int(x.data.ptr)
    if lib == "torch":
        return int(x.data_ptr())
    raise TuckerPeftError(f"x: expected a NumPy, CuPy or torch array, got {lib}.{type(x).__name__}")


def shares_memory(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` start at the same address (a zero-copy hand-off)."""
    return data_ptr(a) == data_ptr(b)
