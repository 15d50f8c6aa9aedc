"""A trainable delta without autograd: forward, analytic backward, optimizer step, checkpoints.

:class:`Adapter` holds a spec, its params, the scale s and optionally the
frozen base weight W and an optimizer. Everything runs on the params' own
array library, so the same training loop works on NumPy (CPU) and CuPy (GPU)::

    ad = Adapter(Tucker((64, 32), 8), scale=2.0, base=W, optimizer=Adam(1e-2), seed=0)
    for x, target in batches:
        y = ad.apply_linear(x)            # x @ (W + s·ΔW)ᵀ
        ad.backward(y - target)           # ∂(½‖y − target‖²)/∂params, accumulated
        ad.step()                         # optimizer update, gradients cleared
    ad.save("adapter.safetensors")
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

import numpy as np

from ._base import Parametrization, check_scale, parametrization
from ._namespace import ArrayContext, namespace, to_numpy
from ._errors import ParamsError, TuckerPeftError, fmt_shape
from .optim import Optimizer

__all__ = ["Adapter", "StateDictError"]

Params = dict[str, Any]

#: Format tag written to the safetensors metadata.
FORMAT = "tucker_peft.adapter/1"


class StateDictError(TuckerPeftError):
    """A state dict or adapter file that does not fit the adapter."""


def spec_to_json(spec: Parametrization) -> str:
    """JSON of a spec: its kind and dataclass fields (``shape``, ``ranks``/``rank``...).

    Fields outside the spec's identity (``max_modes``) only when set."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if f.compare or getattr(spec, f.name) is not None}
    return json.dumps({"kind": spec.kind, **fields})


def spec_from_json(text: str) -> Parametrization:
    """Inverse of :func:`spec_to_json`."""
    try:
        d = json.loads(text)
        kind = d.pop("kind")
        shape = d.pop("shape")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateDictError(f"spec: expected JSON with 'kind' and 'shape', got {text!r} ({exc})") from None
    try:
        return parametrization(kind, shape, **d)
    except (TuckerPeftError, TypeError) as exc:
        raise StateDictError(f"spec: {text!r} does not describe a valid spec ({exc})") from None


class Adapter:
    """A trainable ΔW with analytic gradients.

    Parameters
    ----------
    spec : Parametrization
        The kind, shape and ranks of ΔW.
    params : dict of str to array, optional
        Arrays of ``spec.param_shapes`` from one library. Default: ``spec.init('zero',
        like=base, seed=seed)`` (NumPy float64 without ``base``).
    scale : float
        The s in ``W + s·ΔW``.
    base : array, shape ``spec.shape``, optional
        The frozen weight W used by :meth:`apply_linear` and :meth:`weight`.
        Not trainable and not part of :meth:`state_dict`.
    optimizer : Optimizer, optional
        Needed by :meth:`step`.
    strategy : {'auto', 'factorized', 'rebuild'}
        How :meth:`apply` contracts ΔW with inputs; ``'auto'`` picks the
        cheaper per batch size by the spec's cost model.
    seed : int, optional
        For the default params.

    Attributes
    ----------
    params : dict of str to array
        Replaced (not modified) by :meth:`step` and :meth:`load_state_dict`.
    grads : dict of str to array or None
        Sum of the gradients of the backward passes since the last
        :meth:`step` or :meth:`zero_grad`.
    """

    def __init__(self, spec: Parametrization, params: Mapping[str, Any] | None = None, *, scale: float = 1.0,
                 base: Any = None, optimizer: Optimizer | None = None, strategy: str = "auto",
                 seed: int | None = None) -> None:
        if not isinstance(spec, Parametrization):
            raise TuckerPeftError(f"spec: expected a Parametrization, got {type(spec).__name__}")
        if strategy not in ("auto", "factorized", "rebuild"):
            raise TuckerPeftError(f"strategy: expected 'auto', 'factorized' or 'rebuild', got {strategy!r}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TuckerPeftError(f"optimizer: expected a tucker_peft.optim.Optimizer, got {type(optimizer).__name__}")
        if params is None:
            params = spec.init("zero", like=base, seed=seed)
        params = dict(params)
        spec.check_params(params)
        if base is not None:
            if tuple(getattr(base, "shape", ())) != spec.shape:
                raise ParamsError(f"base: expected shape {fmt_shape(spec.shape)}, got {fmt_shape(getattr(base, 'shape', ()))}")
            spec.check_params(params, ("base", base))
        self.spec = spec
        self.params: Params = params
        self.scale = check_scale(scale)
        self.base = base
        self.optimizer = optimizer
        self.strategy = strategy
        self.grads: Params | None = None
        self._cache: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        lib = type(next(iter(self.params.values()))).__module__.split(".", 1)[0]
        return (f"Adapter({self.spec!r}, scale={self.scale}, {lib}, "
                f"base={'yes' if self.base is not None else 'no'}, optimizer={self.optimizer!r})")

    @property
    def xp(self) -> Any:
        """Array namespace of the params."""
        return namespace(*self.params.values())

    @property
    def num_params(self) -> int:
        return self.spec.num_params

    # -- forward -------------------------------------------------------------
    def delta(self) -> Any:
        """s·ΔW, shape ``spec.shape``."""
        return self.spec.reconstruct(self.params, self.scale)

    def weight(self) -> Any:
        """``W + s·ΔW`` (the merged weight); needs ``base``."""
        if self.base is None:
            raise TuckerPeftError("base: weight() needs the adapter's base weight, got None")
        return self.base + self.delta()

    def _resolve(self, n: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        return self.spec.cost(n).best_apply

    def _check_x(self, x: Any, W: Any) -> tuple[Any, tuple[int, ...], int]:
        lead = self.spec.batch_shape(x)
        extra = [("x", x)]
        if W is not None:
            if tuple(getattr(W, "shape", ())) != self.spec.shape:
                raise ParamsError(f"W: expected shape {fmt_shape(self.spec.shape)}, got {fmt_shape(getattr(W, 'shape', ()))}")
            extra.append(("W", W))
        xp = self.spec.check_params(self.params, *extra)
        return xp, lead, math.prod(lead)

    def apply(self, x: Any, W: Any = None) -> Any:
        """``y[..., i] = Σ (W + s·ΔW)[i, ...] x[..., ...]``; without ``W`` only the ΔW term.

        For a matrix weight this is ``x @ (W + s·ΔW)ᵀ``; for a conv kernel
        ``(out, in, *k)`` it is the per-patch product on im2col patches.
        ΔW is only built when that is cheaper than the factored product.
        The inputs are kept for :meth:`backward`.

        Parameters
        ----------
        x : array, shape ``(*batch, *spec.shape[1:])``
        W : array, shape ``spec.shape``, optional

        Returns
        -------
        array, shape ``(*batch, spec.shape[0])``
        """
        xp, lead, n = self._check_x(x, W)
        strategy = self._resolve(n)
        out = self.spec.shape[0]
        if strategy == "rebuild" and W is not None:
            # One matmul with the merged weight.
            w = xp.reshape(W + self.delta(), (out, -1))
            y = xp.reshape(xp.matmul(xp.reshape(x, (n, -1)), xp.matrix_transpose(w)), (*lead, out))
        else:
            y = self.spec.apply(self.params, x, self.scale, strategy)
            if W is not None:
                w = xp.reshape(W, (out, -1))
                y = y + xp.reshape(xp.matmul(xp.reshape(x, (n, -1)), xp.matrix_transpose(w)), (*lead, out))
        self._cache = (x, W)
        return y

    def apply_linear(self, x: Any, W: Any = None) -> Any:
        """``x @ (W + s·ΔW)ᵀ`` with ``W`` defaulting to the adapter's ``base``.

        See :meth:`apply`; here a weight is required.
        """
        W = self.base if W is None else W
        if W is None:
            raise TuckerPeftError("W: apply_linear needs a weight (pass W= or give the adapter a base), got None")
        return self.apply(x, W)

    __call__ = apply

    # -- backward ------------------------------------------------------------
    def _accumulate(self, grads: Params) -> None:
        if self.grads is None:
            self.grads = dict(grads)
        else:
            self.grads = {k: self.grads[k] + g for k, g in grads.items()}

    def backward(self, grad_out: Any, *, input_grad: bool = False) -> Any:
        """Gradients of ``⟨grad_out, y⟩`` for the ``y`` of the last :meth:`apply`.

        The parameter gradients are added to :attr:`grads` and returned.
        The cached inputs are released.

        Parameters
        ----------
        grad_out : array, shape ``(*batch, spec.shape[0])``
            ∂L/∂y.
        input_grad : bool
            Also return ∂L/∂x (through ``W + s·ΔW``), for chaining layers.

        Returns
        -------
        param_grads : dict of str to array
            Same keys and shapes as :attr:`params`.
        x_grad : array, shape of ``x``
            Only with ``input_grad=True``.
        """
        if self._cache is None:
            raise TuckerPeftError("backward: expected a preceding apply()/apply_linear() whose inputs are cached, got none")
        x, W = self._cache
        xp, lead, n = self._check_x(x, W)
        out = self.spec.shape[0]
        if tuple(getattr(grad_out, "shape", ())) != (*lead, out):
            raise ParamsError(f"grad_out: expected shape {fmt_shape((*lead, out))}, got {fmt_shape(getattr(grad_out, 'shape', ()))}")
        namespace(x, grad_out, what=("x", "grad_out"))
        strategy = self._resolve(n)
        g2 = xp.reshape(grad_out, (n, out))
        x2 = xp.reshape(x, (n, -1))
        x_grad = None
        if strategy == "rebuild":
            ct = xp.reshape(xp.matmul(xp.matrix_transpose(g2), x2), self.spec.shape)
            grads = self.spec.vjp(self.params, ct, self.scale)
            if input_grad:
                w = self.delta() if W is None else W + self.delta()
                x_grad = xp.reshape(xp.matmul(g2, xp.reshape(w, (out, -1))), x.shape)
        else:
            grads, x_grad = self.spec.apply_vjp(self.params, x, grad_out, self.scale, "factorized")
            if input_grad and W is not None:
                x_grad = x_grad + xp.reshape(xp.matmul(g2, xp.reshape(W, (out, -1))), x.shape)
        self._cache = None
        self._accumulate(grads)
        return (grads, x_grad) if input_grad else grads

    def backward_delta(self, cotangent: Any) -> Params:
        """Gradients of ``⟨cotangent, s·ΔW⟩`` (a loss defined on ΔW itself); added to :attr:`grads`.

        Parameters
        ----------
        cotangent : array, shape ``spec.shape``

        Returns
        -------
        dict of str to array
        """
        grads = self.spec.vjp(self.params, cotangent, self.scale)
        self._accumulate(grads)
        return grads

    def zero_grad(self) -> None:
        """Drop the accumulated gradients and any cached inputs."""
        self.grads = None
        self._cache = None

    def step(self, grads: Mapping[str, Any] | None = None) -> Params:
        """One optimizer update with ``grads`` (default: the accumulated :attr:`grads`), which are then cleared.

        Returns
        -------
        dict of str to array
            The new :attr:`params`.
        """
        if self.optimizer is None:
            raise TuckerPeftError("optimizer: step() needs an optimizer (Adapter(..., optimizer=Adam(...))), got None")
        g = self.grads if grads is None else grads
        if g is None:
            raise TuckerPeftError("grads: step() needs gradients from backward() or grads=, got None")
        self.params = self.optimizer.step(self.params, g)
        self.grads = None
        return self.params

    # -- conversion ------------------------------------------------------------
    def map_arrays(self, fn: Callable[[Any], Any]) -> "Adapter":
        """A new adapter whose params, base, grads and optimizer state are ``fn(array)``.

        With a zero-copy ``fn`` (a DLPack hand-off such as
        :func:`tucker_peft.backends.cupy.to_torch`) both adapters share memory.
        The optimizer is copied, with its state mapped.
        """
        opt = None
        if self.optimizer is not None:
            opt = copy.copy(self.optimizer)
            opt.state = {k: dict(v) for k, v in self.optimizer.state.items()}
            opt.map_state(fn)
        new = Adapter(self.spec, {k: fn(v) for k, v in self.params.items()}, scale=self.scale,
                      base=None if self.base is None else fn(self.base), optimizer=opt, strategy=self.strategy)
        if self.grads is not None:
            new.grads = {k: fn(v) for k, v in self.grads.items()}
        return new

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies, ready for ``safetensors.numpy.save_file``.

        Keys: ``'params.<name>'`` for each param; with an optimizer also
        ``'optim.t'`` (0-d int64) and ``'optim.<slot>.<name>'``.
        """
        sd = {f"params.{k}": np.ascontiguousarray(to_numpy(v)) for k, v in self.params.items()}
        if self.optimizer is not None:
            osd = self.optimizer.state_dict()
            sd["optim.t"] = np.asarray(osd["t"], dtype=np.int64)
            for k, st in osd["state"].items():
                for s, a in st.items():
                    sd[f"optim.{s}.{k}"] = np.ascontiguousarray(a)
        return sd

    def metadata(self) -> dict[str, str]:
        """String metadata stored beside the arrays: format, spec, scale, optimizer."""
        return {"format": FORMAT, "spec": spec_to_json(self.spec), "scale": repr(self.scale),
                "optimizer": repr(self.optimizer) if self.optimizer is not None else ""}

    def _parse(self, state: Mapping[str, Any], strict: bool) -> tuple[Params, dict[str, Any] | None]:
        """Validate a state dict against this adapter; return new params and optimizer state."""
        if not isinstance(state, Mapping):
            raise StateDictError(f"state: expected a dict of name -> array or a path, got {type(state).__name__}")
        want = self.spec.param_shapes
        params_in = {k[len("params."):]: v for k, v in state.items() if k.startswith("params.")}
        missing = [f"params.{k}" for k in want if k not in params_in]
        unknown = [f"params.{k}" for k in params_in if k not in want]
        others = [k for k in state if not k.startswith(("params.", "optim."))]
        if missing or (strict and (unknown or others)):
            raise StateDictError(
                f"state for {self.spec!r}: expected keys {[f'params.{k}' for k in want]}"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {unknown + others}" if unknown or others else ""))
        new: Params = {}
        for k, shape in want.items():
            a = np.asarray(params_in[k])
            if tuple(a.shape) != shape:
                raise StateDictError(f"state['params.{k}']: expected shape {fmt_shape(shape)}, got {fmt_shape(a.shape)}")
            if not np.issubdtype(a.dtype, np.floating):
                raise StateDictError(f"state['params.{k}']: expected a floating dtype, got {a.dtype}")
            if not np.all(np.isfinite(a)):
                raise StateDictError(f"state['params.{k}']: contains NaN or Inf; expected finite values")
            new[k] = a
        optim_keys = [k for k in state if k.startswith("optim.")]
        if not optim_keys:
            return new, None
        if self.optimizer is None:
            if strict:
                raise StateDictError(f"state: has optimizer entries {optim_keys[:3]}... but the adapter has no "
                                     "optimizer; pass strict=False to ignore them")
            return new, None
        if "optim.t" not in state:
            raise StateDictError("state: optimizer entries without 'optim.t'; expected the step count")
        t = np.asarray(state["optim.t"])
        if t.shape != () or not np.issubdtype(t.dtype, np.integer):
            raise StateDictError(f"state['optim.t']: expected a 0-d int array, got shape {fmt_shape(t.shape)} dtype {t.dtype}")
        ost: dict[str, dict[str, Any]] = {}
        for key in optim_keys:
            if key == "optim.t":
                continue
            _, slot, name = (key.split(".", 2) + ["", ""])[:3]
            if not slot or not name:
                raise StateDictError(f"state[{key!r}]: expected 'optim.<slot>.<param>'")
            ost.setdefault(name, {})[slot] = np.asarray(state[key])
        osd = {"t": int(t), "state": ost}
        try:
            self.optimizer.check_state_dict(osd, new)
        except TuckerPeftError as exc:
            raise StateDictError(str(exc)) from None
        return new, osd

    def load_state_dict(self, state: Mapping[str, Any] | str | os.PathLike, *, strict: bool = True) -> None:
        """Load params (and optimizer state) from a dict of arrays or a safetensors file.

        Everything is validated before the adapter changes; on any error the
        adapter is left as it was. Arrays move to the params' library, device
        and dtype.

        Parameters
        ----------
        state : dict of str to array, or path
            :meth:`state_dict` output, or a file written by :meth:`save`.
        strict : bool
            Reject unexpected keys, and optimizer entries when the adapter has
            no optimizer.

        Raises
        ------
        StateDictError
            Unreadable file, missing or unexpected keys, wrong shapes,
            non-finite values, or a spec in the file that differs.
        """
        if isinstance(state, (str, os.PathLike)):
            state, meta = _read_file(state)
            spec_text = meta.get("spec")
            if spec_text is not None and spec_from_json(spec_text) != self.spec:
                raise StateDictError(f"state: file holds {spec_from_json(spec_text)!r}, expected {self.spec!r}")
        new, osd = self._parse(state, strict)
        ref = self.params
        moved = {k: ArrayContext.resolve(like=ref[k]).asarray(a) for k, a in new.items()}
        if osd is not None:
            assert self.optimizer is not None  # _parse returns optimizer state only for an adapter with one
            opt = copy.copy(self.optimizer)
            opt.load_state_dict(osd, moved)
            self.optimizer.t, self.optimizer.state = opt.t, opt.state
        self.params = moved
        self.grads = None
        self._cache = None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` and :meth:`metadata` to a safetensors file, atomically.

        Through :func:`tucker_peft._format.atomic_write`: the old file stays
        whole until the new one replaces it in one rename.
        """
        from safetensors.numpy import save

        from ._format import atomic_write, check_path

        atomic_write(check_path(path), save(self.state_dict(), metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | os.PathLike, *, like: Any = None, dtype: Any = None,
             optimizer: Optimizer | None = None, base: Any = None) -> "Adapter":
        """An adapter rebuilt from a file of :meth:`save` (spec and scale from its metadata).

        Parameters
        ----------
        like : array, optional
            Params go to its library and device (default NumPy, or ``base``'s).
        dtype : dtype or str, optional
            Default: ``like``'s (or ``base``'s) dtype, else the file's.
        optimizer : Optimizer, optional
            Receives the saved optimizer state when the file has one.
        base : array, optional
            The frozen weight, as for :class:`Adapter`.

        Returns
        -------
        Adapter
        """
        state, meta = _read_file(path)
        if meta.get("format") != FORMAT:
            raise StateDictError(f"{os.fspath(path)}: expected metadata format {FORMAT!r}, got {meta.get('format')!r}")
        spec = spec_from_json(meta.get("spec", ""))
        try:
            scale = float(meta.get("scale", "1.0"))
        except ValueError:
            raise StateDictError(f"{os.fspath(path)}: metadata scale: expected a float, got {meta.get('scale')!r}") from None
        ref = like if like is not None else base
        if dtype is None and ref is None:
            first = np.asarray(state.get(f"params.{next(iter(spec.param_shapes))}", np.zeros(())))
            dtype = first.dtype.name if np.issubdtype(first.dtype, np.floating) else None
        placeholder = spec.init("zero", like=ref, dtype=dtype, seed=0)
        ad = cls(spec, placeholder, scale=scale, base=base, optimizer=optimizer)
        ad.load_state_dict(state, strict=optimizer is not None)
        return ad


def _read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of a safetensors file, read once into memory (safe against a concurrent writer)."""
    from ._format import check_path, load_tensors, read_file_once, safetensors_metadata

    p = check_path(path)
    try:
        data = read_file_once(p)
    except FileNotFoundError:
        raise StateDictError(f"path: expected an adapter file, got {p!r} which does not exist") from None
    except OSError as exc:
        raise StateDictError(f"{p}: expected a readable safetensors file, got {type(exc).__name__}: {exc}") from None
    meta = safetensors_metadata(data, p)
    return load_tensors(data, p, "numpy"), meta
