"""The abstract N-D delta parametrisation and the registry of kinds.

A parametrisation describes ΔW of a fixed shape as one einsum of small
parameter arrays. Reconstruction, the analytic vjp, application to inputs
without building ΔW, and the FLOP model are all derived from that einsum and
planned once per shape with opt_einsum.
"""

from __future__ import annotations

import functools
import math
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import opt_einsum
from array_api_compat import to_device

from . import _dispatch
from ._dispatch import ArrayContext, contract, contract_vjp, plan_cost, vjp_cost
from ._errors import InitError, ParamsError, RankError, TuckerPeftError, fmt_shape

__all__ = ["Parametrization", "Cost", "register", "parametrization", "kinds", "MAX_MODES"]

Params = dict[str, Any]


def check_int(value: Any, what: str, low: int, high: int | None = None,
              error: type[TuckerPeftError] = TuckerPeftError) -> int:
    """Validate an integer (not a bool or float) in ``[low, high]``; ``error`` names the failure."""
    expected = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    if isinstance(value, (bool, float, np.floating)):
        raise error(f"{what}: expected {expected}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise error(f"{what}: expected {expected}, got {value!r}") from None
    if v < low or (high is not None and v > high):
        raise error(f"{what}: expected {expected}, got {v}")
    return v


def check_rank(value: Any, what: str, low: int, high: int) -> int:
    """Validate one integer rank in ``[low, high]`` (raises :class:`RankError`)."""
    return check_int(value, what, low, high, RankError)


def check_scale(scale: Any, what: str = "scale", *, nonzero: bool = False,
                error: type[TuckerPeftError] = TuckerPeftError) -> float:
    """Validate a scale: a finite real number (Python or NumPy scalar, not a bool), non-zero with ``nonzero``."""
    expected = "a finite non-zero number" if nonzero else "a finite number"
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise error(f"{what}: expected {expected}, got {type(scale).__name__} {scale!r}"[:200])
    if not math.isfinite(scale) or (nonzero and scale == 0):
        raise error(f"{what}: expected {expected}, got {scale!r}")
    return float(scale)


def check_tensor(tensor: Any, what: str = "tensor", error: type[TuckerPeftError] = TuckerPeftError) -> Any:
    """The array namespace of ``tensor`` after checking that it is real floating and finite.

    Decompositions of an integer or boolean tensor would come back in its
    dtype (all-zero factors), and NaN/Inf make LAPACK fail or hang: both are
    refused here. Costs one reduction and one host read.
    """
    xp = _dispatch.namespace(tensor, what=(what,))
    if not xp.isdtype(tensor.dtype, "real floating"):
        raise error(f"{what}: expected a real floating dtype, got {tensor.dtype}; cast it first "
                    "(e.g. to float32 or float64)")
    if not bool(xp.all(xp.isfinite(tensor))):
        raise error(f"{what}: contains NaN or Inf; expected finite values")
    return xp


#: Most modes a spec takes unless its ``max_modes=`` says more: planning and
#: decomposition costs grow quickly with the number of modes.
MAX_MODES = 12


def check_shape(shape: Any, max_modes: int | None = None) -> tuple[int, ...]:
    """Validate a weight shape: a non-empty sequence of positive ints, at most
    ``max_modes`` of them (default :data:`MAX_MODES`)."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if isinstance(shape, (str, bytes)):
        raise TuckerPeftError(f"shape: expected a sequence of positive ints, got {shape!r}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TuckerPeftError(f"shape: expected a sequence of positive ints, got {shape!r}") from None
    if not dims:
        raise TuckerPeftError("shape: expected at least one mode, got ()")
    cap = MAX_MODES if max_modes is None else check_int(max_modes, "max_modes", 1)
    if len(dims) > cap:
        raise TuckerPeftError(
            f"shape: expected at most {cap} modes, got {len(dims)} ({fmt_shape(dims)[:80]}); planning and "
            f"decomposition cost grow quickly with the modes: pass max_modes={len(dims)} to the spec to allow it"
        )
    return tuple(check_int(d, f"shape[{i}] of {dims!r}", 1) for i, d in enumerate(dims))


@dataclass(frozen=True)
class Cost:
    """FLOP model of one parametrisation (a multiply-add counts as 2 FLOPs).

    Attributes
    ----------
    reconstruct : int
        Building ΔW from the params.
    vjp : int
        All parameter gradients from a cotangent of ΔW's shape.
    apply_rebuild : int
        Building ΔW, then contracting it with ``n`` inputs of shape ``shape[1:]``.
    apply_factorized : int
        Contracting the factors with the same ``n`` inputs without building ΔW.
    """

    reconstruct: int
    vjp: int
    apply_rebuild: int
    apply_factorized: int

    @property
    def best_apply(self) -> str:
        """``'factorized'`` or ``'rebuild'``, whichever is cheaper."""
        return "factorized" if self.apply_factorized < self.apply_rebuild else "rebuild"


@dataclass(frozen=True)
class Parametrization(ABC):
    """A low-rank change ΔW of a fixed N-D shape, written as one einsum.

    Subclasses define :attr:`param_shapes`, the einsum terms and the
    initialisers; everything else is derived here.

    Parameters
    ----------
    shape : tuple of int
        Shape of the weight, e.g. ``(out, in/groups, *kernel)`` for a conv.
    max_modes : int, optional (keyword only)
        Accept more modes than :data:`MAX_MODES` (12). Not part of the spec's
        identity (equality, hash, repr).
    """

    shape: tuple[int, ...]
    max_modes: int | None = field(default=None, kw_only=True, repr=False, compare=False)

    kind: ClassVar[str] = ""
    #: Names accepted by :meth:`init`; aliases map to a canonical method.
    init_methods: ClassVar[Mapping[str, str]] = {"zero": "zero", "random": "random"}
    #: Canonical init methods that need ``tensor=``.
    tensor_methods: ClassVar[frozenset[str]] = frozenset()

    # -- subclass contract -------------------------------------------------
    @property
    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of each parameter array, in a fixed order."""

    @abstractmethod
    def _terms(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """``(name, view_shape, subscripts)`` of each einsum operand; output is the modes."""

    @abstractmethod
    def _init(self, method: str, ctx: ArrayContext, rng: np.random.Generator, tensor: Any,
              scale: float, options: dict[str, Any]) -> Params:
        """Make params for a canonical ``method``; pop what is used from ``options``."""

    @classmethod
    def budget_family(cls, shape: tuple[int, ...], **constraints: Any) -> tuple[Callable[[int], "Parametrization"], int]:
        """A family ``f(t)``, ``t = 1..t_max``, whose ``num_params`` never decreases.

        :func:`tucker_peft.ranks.for_budget` searches it; a third-party kind
        implements it to take part in budget matching.
        """
        raise TuckerPeftError(f"kind {cls.kind!r} does not support budget matching")

    # -- derived -----------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_params(self) -> int:
        """Total number of trainable scalars."""
        return sum(math.prod(s) for s in self.param_shapes.values())

    @staticmethod
    def _sym(i: int) -> str:
        return opt_einsum.get_symbol(i)

    def _mode(self, n: int) -> str:
        return self._sym(n)

    def _rank(self, n: int) -> str:
        return self._sym(self.ndim + n)

    @cached_property
    def _out(self) -> str:
        return "".join(self._mode(n) for n in range(self.ndim))

    @cached_property
    def _term_list(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        return tuple(self._terms())

    @cached_property
    def _views(self) -> tuple[tuple[int, ...], ...]:
        return tuple(v for _, v, _ in self._term_list)

    @cached_property
    def _recon_eq(self) -> str:
        return ",".join(s for _, _, s in self._term_list) + "->" + self._out

    @cached_property
    def _apply_eq(self) -> str:
        batch = self._sym(2 * self.ndim)
        x = batch + self._out[1:]
        return ",".join([x] + [s for _, _, s in self._term_list]) + "->" + batch + self._out[0]

    def check_params(self, params: Mapping[str, Any], *extra: tuple[str, Any]) -> Any:
        """Validate keys and shapes of ``params``; return their array namespace.

        ``extra`` holds ``(name, array)`` pairs that must share the namespace.
        """
        if not isinstance(params, Mapping):
            raise ParamsError(f"params: expected a dict of name -> array, got {type(params).__name__}")
        expected = self.param_shapes
        missing = [k for k in expected if k not in params]
        unknown = [k for k in params if k not in expected]
        if missing or unknown:
            raise ParamsError(
                f"params for {self!r}: expected keys {list(expected)}, got {list(params)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {unknown}" if unknown else "")
            )
        for k, want in expected.items():
            got = tuple(getattr(params[k], "shape", ()))
            if got != want:
                raise ParamsError(f"params[{k!r}]: expected shape {fmt_shape(want)}, got {fmt_shape(got)}")
        names = list(expected) + [n for n, _ in extra]
        arrays = [params[k] for k in expected] + [a for _, a in extra]
        return _dispatch.namespace(*arrays, what=names)

    def _operands(self, xp: Any, params: Mapping[str, Any]) -> list[Any]:
        ops = []
        for name, view, _ in self._term_list:
            a = params[name]
            ops.append(a if tuple(a.shape) == view else xp.reshape(a, view))
        return ops

    def _fold_scale(self, ops: list[Any], scale: Any) -> list[Any]:
        """Multiply the smallest operand by ``scale`` (cheaper than scaling the result)."""
        return self._fold_scale_at(ops, scale)[1]

    def reconstruct(self, params: Mapping[str, Any], scale: float = 1.0) -> Any:
        """ΔW = ``scale`` · (the einsum of the params).

        Parameters
        ----------
        params : dict of str to array
            Arrays of :attr:`param_shapes`, all from one array library.
        scale : float
            The factor s.

        Returns
        -------
        array, shape :attr:`shape`
            In the params' library, device and dtype.
        """
        xp = self.check_params(params)
        ops = self._fold_scale(self._operands(xp, params), scale)
        return contract(self._recon_eq, *ops)

    def vjp(self, params: Mapping[str, Any], cotangent: Any, scale: float = 1.0) -> Params:
        """Gradients of ⟨cotangent, ΔW⟩ with respect to each parameter.

        Analytic and planned like :meth:`reconstruct`, so libraries without
        autograd (NumPy, CuPy) can train.

        Parameters
        ----------
        params : dict of str to array
        cotangent : array, shape :attr:`shape`
            ∂L/∂ΔW.
        scale : float

        Returns
        -------
        dict of str to array
            Same keys and shapes as ``params``.
        """
        xp = self.check_params(params, ("cotangent", cotangent))
        if tuple(cotangent.shape) != self.shape:
            raise ParamsError(f"cotangent: expected shape {fmt_shape(self.shape)}, got {fmt_shape(cotangent.shape)}")
        ops = self._operands(xp, params)
        k, ops = self._fold_scale_at(ops, scale)
        return self._param_grads(xp, contract_vjp(self._recon_eq, ops, cotangent), k, scale)

    def _fold_scale_at(self, ops: list[Any], scale: Any) -> tuple[int | None, list[Any]]:
        """``_fold_scale``, also telling which operand took ``scale`` (None if none did)."""
        scale = check_scale(scale)
        if scale == 1:
            return None, ops
        k = min(range(len(ops)), key=lambda i: math.prod(ops[i].shape))
        ops = list(ops)
        ops[k] = ops[k] * scale
        return k, ops

    def _param_grads(self, xp: Any, got: Sequence[Any], folded: int | None, scale: Any) -> Params:
        """Name and reshape operand gradients; the operand that took ``scale`` gets it by the chain rule."""
        grads: Params = {}
        for j, ((name, _, _), g) in enumerate(zip(self._term_list, got)):
            if j == folded:
                g = g * scale
            want = self.param_shapes[name]
            grads[name] = g if tuple(g.shape) == want else xp.reshape(g, want)
        return grads

    def batch_shape(self, x: Any) -> tuple[int, ...]:
        """The leading dims of inputs ``x`` of shape ``(*batch, *shape[1:])``; raises if the rest differs."""
        tail = self.shape[1:]
        got = tuple(getattr(x, "shape", ()))
        if not hasattr(x, "shape") or len(got) < len(tail) or got[len(got) - len(tail):] != tail:
            raise ParamsError(f"x: expected shape (*batch, {', '.join(map(str, tail))}), got {fmt_shape(got)}")
        return got[: len(got) - len(tail)]

    def apply(self, params: Mapping[str, Any], x: Any, scale: float = 1.0, strategy: str = "auto") -> Any:
        """Contract ΔW with inputs over modes ``1..N-1``: ``y[..., i] = Σ ΔW[i, ...] x[..., ...]``.

        This is ``x @ ΔWᵀ`` for a matrix weight, and the per-patch product of a
        conv (im2col view) for a kernel of shape ``(out, in/groups, *kernel)``.

        Parameters
        ----------
        x : array, shape ``(*batch, *shape[1:])``
        strategy : {'auto', 'factorized', 'rebuild'}
            ``'factorized'`` never builds ΔW; ``'rebuild'`` builds it and does
            one matrix product; ``'auto'`` picks the cheaper by :meth:`cost`.

        Returns
        -------
        array, shape ``(*batch, shape[0])``
        """
        xp = self.check_params(params, ("x", x))
        tail = self.shape[1:]
        lead = self.batch_shape(x)
        n = math.prod(lead)
        if strategy == "auto":
            strategy = self.cost(n).best_apply
        if strategy == "factorized":
            ops = self._fold_scale(self._operands(xp, params), scale)
            y = contract(self._apply_eq, xp.reshape(x, (n, *tail)), *ops)
        elif strategy == "rebuild":
            dw = xp.reshape(self.reconstruct(params, scale), (self.shape[0], -1))
            y = xp.matmul(xp.reshape(x, (n, -1)), xp.matrix_transpose(dw))
        else:
            raise TuckerPeftError(f"strategy: expected 'auto', 'factorized' or 'rebuild', got {strategy!r}")
        return xp.reshape(y, (*lead, self.shape[0]))

    def apply_vjp(self, params: Mapping[str, Any], x: Any, grad_out: Any, scale: float = 1.0,
                  strategy: str = "auto") -> tuple[Params, Any]:
        """Gradients of ⟨grad_out, apply(params, x)⟩ for the params and for ``x``.

        Parameters
        ----------
        x : array, shape ``(*batch, *shape[1:])``
        grad_out : array, shape ``(*batch, shape[0])``
        strategy : {'auto', 'factorized', 'rebuild'}
            ``'rebuild'`` forms ∂L/∂ΔW = grad_outᵀ x and calls :meth:`vjp`;
            ``'factorized'`` contracts the factors directly.

        Returns
        -------
        param_grads : dict of str to array
        x_grad : array, shape of ``x``
        """
        xp = self.check_params(params, ("x", x), ("grad_out", grad_out))
        tail = self.shape[1:]
        lead = self.batch_shape(x)
        if tuple(grad_out.shape) != (*lead, self.shape[0]):
            raise ParamsError(f"grad_out: expected shape {fmt_shape((*lead, self.shape[0]))}, got {fmt_shape(grad_out.shape)}")
        n = math.prod(lead)
        if strategy == "auto":
            strategy = self.cost(n).best_apply
        x2 = xp.reshape(x, (n, *tail))
        g2 = xp.reshape(grad_out, (n, self.shape[0]))
        if strategy == "rebuild":
            k = math.prod(tail)
            dw = xp.reshape(self.reconstruct(params, scale), (self.shape[0], k))
            x_grad = xp.matmul(g2, dw)
            ct = xp.reshape(xp.matmul(xp.matrix_transpose(g2), xp.reshape(x2, (n, k))), self.shape)
            return self.vjp(params, ct, scale), xp.reshape(x_grad, x.shape)
        if strategy != "factorized":
            raise TuckerPeftError(f"strategy: expected 'auto', 'factorized' or 'rebuild', got {strategy!r}")
        folded, ops = self._fold_scale_at(self._operands(xp, params), scale)
        got = contract_vjp(self._apply_eq, [x2] + ops, g2)
        return self._param_grads(xp, got[1:], folded, scale), xp.reshape(got[0], x.shape)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - specs are small, immutable and few
    def cost(self, n: int = 1) -> Cost:
        """FLOPs of reconstruction, vjp, and of applying ΔW to ``n`` inputs both ways."""
        views = self._views
        recon = plan_cost(self._recon_eq, views)
        vjp = vjp_cost(self._recon_eq, views)
        dense = 2 * n * math.prod(self.shape)
        fact = plan_cost(self._apply_eq, ((n, *self.shape[1:]),) + views)
        return Cost(reconstruct=recon, vjp=vjp, apply_rebuild=recon + dense, apply_factorized=fact)

    # -- initialisation ----------------------------------------------------
    def init(self, method: str = "zero", *, like: Any = None, dtype: Any = None, seed: int | None = None,
             tensor: Any = None, scale: float = 1.0, return_residual: bool = False, **options: Any) -> Any:
        """Make params.

        Parameters
        ----------
        method : str
            ``'zero'`` (ΔW = 0 exactly, trainable factors random),
            ``'random'`` (all params random, for tests), or a decomposition of
            ``tensor`` (see the kind's :attr:`init_methods`).
        like : array, optional
            Params take its library, device and dtype. Default: NumPy.
        dtype : dtype or str, optional
            Overrides the dtype.
        seed : int, optional
            Makes the random parts reproducible; the same seed gives the same
            numbers in every array library.
        tensor : array, shape :attr:`shape`, optional
            The pretrained weight (principal init) or a first gradient.
        scale : float
            The s that ΔW will be used with; decomposition inits divide by it
            so that ``s · reconstruct(params)`` approximates ``tensor``.
        return_residual : bool
            Also return ``tensor - s · ΔW``: replacing the weight by it keeps
            ``W + s·ΔW`` equal to the original weight.

        Returns
        -------
        params : dict of str to array
        residual : array, shape :attr:`shape`
            Only with ``return_residual=True``.
        """
        if not isinstance(method, str) or method.lower() not in self.init_methods:
            raise InitError(f"method: expected one of {sorted(self.init_methods)} for kind {self.kind!r}, got {method!r}")
        canon = self.init_methods[method.lower()]
        if tensor is not None:
            if tuple(getattr(tensor, "shape", ())) != self.shape:
                raise InitError(f"tensor: expected shape {fmt_shape(self.shape)}, got {fmt_shape(getattr(tensor, 'shape', ()))}")
            check_tensor(tensor, "tensor", InitError)
        elif canon in self.tensor_methods or return_residual:
            raise InitError(f"tensor: method {method!r}{' with return_residual' if return_residual else ''} needs tensor=, got None")
        if canon in self.tensor_methods:
            scale = check_scale(scale, f"scale (method {method!r} divides by it)", nonzero=True, error=InitError)
        ctx = ArrayContext.resolve(like=like, tensor=tensor, dtype=dtype)
        rng = np.random.default_rng(seed)
        opts = dict(options)
        params = self._init(canon, ctx, rng, tensor, scale, opts)
        if opts:
            raise InitError(f"unexpected options for init {method!r} of kind {self.kind!r}: {sorted(opts)}")
        if return_residual:
            return params, tensor - ctx.xp.astype(self.reconstruct(params, scale), tensor.dtype)
        return params

    @staticmethod
    def _cast(ctx: ArrayContext, a: Any) -> Any:
        """Move an array computed from ``tensor`` into ``ctx``."""
        a = ctx.xp.astype(a, ctx.dtype)
        return a if ctx.device is None else to_device(a, ctx.device)

    @staticmethod
    def _core_option(options: dict[str, Any]) -> str:
        core = options.pop("core", "project")
        if core not in ("project", "zero"):
            raise InitError(f"core: expected 'project' or 'zero', got {core!r}")
        return core


_REGISTRY: dict[str, Callable[..., Parametrization]] = {}


def register(name: str, factory: Callable[..., Parametrization] | None = None, *, overwrite: bool = False) -> Any:
    """Register a kind under ``name`` (usable as a decorator).

    ``factory(shape, **kw)`` must return a :class:`Parametrization`. A class
    whose :meth:`~Parametrization.budget_family` is implemented also works
    with :mod:`tucker_peft.ranks`.
    """
    key = name.lower()

    def deco(f: Callable[..., Parametrization]) -> Callable[..., Parametrization]:
        if key in _REGISTRY and _REGISTRY[key] is not f and not overwrite:
            raise TuckerPeftError(f"kind {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[key] = f
        return f

    return deco if factory is None else deco(factory)


def kinds() -> tuple[str, ...]:
    """Names of the registered kinds."""
    return tuple(sorted(_REGISTRY))


def lookup(kind: str) -> Callable[..., Parametrization]:
    if not isinstance(kind, str) or kind.lower() not in _REGISTRY:
        raise TuckerPeftError(f"kind: expected one of {list(kinds())}, got {kind!r}")
    return _REGISTRY[kind.lower()]


def parametrization(kind: str, shape: Sequence[int], **kw: Any) -> Parametrization:
    """Build a parametrisation by name: ``parametrization('tucker', (64, 32, 3, 3), ranks=8)``."""
    return lookup(kind)(shape, **kw)
