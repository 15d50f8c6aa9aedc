"""Dispatch on the arrays given: namespaces, devices, dtypes and planned contractions.

Nothing here holds backend state. Heavy frameworks are only touched through
arrays the caller already made, so importing this module imports neither torch
nor cupy.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import opt_einsum
from opt_einsum.backends import get_func
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from ._errors import BackendMismatchError, TuckerPeftError

__all__ = [
    "namespace",
    "library_of",
    "einsum_backend",
    "schedule",
    "contract",
    "contract_vjp",
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


#: Path search by operand count. Up to :data:`OPTIMAL_MAX_OPERANDS` the exhaustive
#: search: every kind up to 5 modes stays FLOP-optimal (a 5-mode Tucker or CP applied
#: to inputs has 7 operands; 'dp' skips outer products and can cost a little more).
#: Then 'dp' up to :data:`DP_MAX_OPERANDS`, then 'greedy': the exhaustive and the dp
#: searches grow exponentially (a 14-mode Tucker took 15 s and a 12-mode CP 7.5 s
#: with dp; greedy plans 20 modes in milliseconds).
OPTIMAL_MAX_OPERANDS = 7
DP_MAX_OPERANDS = 9


def _optimize(n_operands: int) -> str:
    if n_operands <= OPTIMAL_MAX_OPERANDS:
        return "optimal"
    return "dp" if n_operands <= DP_MAX_OPERANDS else "greedy"


def _rest_search(n_operands: int) -> str:
    """Search for the ``n - 1``-operand rests of :func:`_gemm_last`, which tries ``n`` of
    them and may already give up 2 % of FLOPs for the layout: 'optimal' up to 5 operands,
    then 'dp', and 'greedy' when the whole problem is planned greedily."""
    if n_operands > DP_MAX_OPERANDS:
        return "greedy"
    return "optimal" if n_operands - 1 <= 5 else "dp"


@functools.lru_cache(maxsize=4096)
def _step_expr(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    """opt_einsum expression of one pairwise (or single-operand) step."""
    return opt_einsum.contract_expression(equation, *shapes)


@functools.lru_cache(maxsize=4096)
def _path_info(equation: str, shapes: tuple[tuple[int, ...], ...], search: str | None = None) -> Any:
    """opt_einsum's path; ``search`` defaults to :func:`_optimize` of the operand count."""
    return opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=search or _optimize(len(shapes)))[1]


def plan_cost(equation: str, shapes: tuple[tuple[int, ...], ...], search: str | None = None) -> int:
    """FLOPs (multiply and add counted separately) of the planned contraction."""
    return int(_path_info(equation, shapes, search).opt_cost)


def _orient(terms: Sequence[str], out: str) -> tuple[int, ...]:
    """Operand order whose tensordot result (free indices of the first, then of
    the second) is already ``out``; identity when no order gives that."""
    if len(terms) == 2:
        for order in ((0, 1), (1, 0)):
            if "".join(c for i in order for c in terms[i] if c in out) == out:
                return order
    return tuple(range(len(terms)))


@dataclass(frozen=True)
class Schedule:
    """The planned pairwise steps of one einsum, with the layout of every intermediate.

    ``steps[k] = (inputs, input_subscripts, output_subscripts)``: node ids
    ``0..n-1`` are the operands, node ``n + k`` is the output of step ``k``.
    Layouts are chosen top-down so that each GEMM-like step writes its result
    in the order its consumer wants: no full-size transpose after the last
    product, nor of the cotangent in reverse mode.
    """

    n_inputs: int
    steps: tuple[tuple[tuple[int, ...], tuple[str, ...], str], ...]

    def values(self, operands: Sequence[Any], skip_last: bool = False) -> dict[int, Any]:
        """Every node's value (the last step's left out with ``skip_last``)."""
        values = dict(enumerate(operands))
        for k, (ids, terms, out) in enumerate(self.steps[: len(self.steps) - skip_last]):
            values[self.n_inputs + k] = _run(terms, out, [values[i] for i in ids])
        return values

    def __call__(self, operands: Sequence[Any]) -> Any:
        return self.values(operands)[self.n_inputs + len(self.steps) - 1]


def _run(terms: Sequence[str], out: str, arrays: Sequence[Any]) -> Any:
    return _compile(tuple(terms), out)(arrays)


@functools.lru_cache(maxsize=8192)
def _compile(terms: tuple[str, ...], out: str) -> Callable[[Sequence[Any]], Any]:
    """A function computing one step ``terms -> out``.

    A product without batch indices becomes one ``tensordot`` of the
    backend, in the operand order whose result is already in ``out`` order
    (opt_einsum may swap the operands and return a transposed view of a
    full-size result); other steps go through opt_einsum.
    """
    order = _orient(terms, out)
    ts = [terms[i] for i in order]
    if len(ts) == 2 and all(c in out or (c in ts[0] and c in ts[1]) for c in ts[0] + ts[1]) \
            and not set(ts[0]) & set(ts[1]) & set(out):
        a, b = ts
        con = [c for c in a if c in b]
        axes = ([a.index(c) for c in con], [b.index(c) for c in con])
        res = [c for c in a if c not in con] + [c for c in b if c not in con]
        perm = None if "".join(res) == out else tuple(res.index(c) for c in out)

        def pair(arrays: Sequence[Any]) -> Any:
            x, y = arrays[order[0]], arrays[order[1]]
            backend = einsum_backend(x)
            r = get_func("tensordot", backend)(x, y, axes=axes)
            return r if perm is None else get_func("transpose", backend)(r, perm)

        return pair
    eq = ",".join(ts) + "->" + out

    def step(arrays: Sequence[Any]) -> Any:
        ops = [arrays[i] for i in order]
        return _step_expr(eq, _shapes(ops))(*ops, backend=einsum_backend(ops[0]))

    return step


def _split(first: set[str], second: set[str], out: str) -> str | None:
    """If ``out`` is (free indices of ``first``) + (free of ``second``), the first part; else None."""
    free = first & set(out)
    if free & second or set(out[: len(free)]) != free:
        return None
    return out[: len(free)]


def _raw_steps(equation: str, shapes: tuple[tuple[int, ...], ...], ids: Sequence[int],
               base: int, search: str | None = None) -> list[tuple[tuple[int, ...], str]]:
    """opt_einsum's path as ``(input node ids, output subscripts)``; step k makes node ``base + k``."""
    live, raw = list(ids), []
    for k, (inds, _, einsum_str, _, _) in enumerate(_path_info(equation, shapes, search).contraction_list):
        raw.append((tuple(live.pop(i) for i in inds), einsum_str.split("->")[1]))
        live.append(base + k)
    return raw


def _gemm_last(terms: list[str], out: str, shapes: tuple[tuple[int, ...], ...],
               budget: float) -> list[tuple[tuple[int, ...], str]] | None:
    """A path whose last step multiplies one operand, whose free indices begin or
    end ``out``, by the contraction of all the others: the result then comes out
    in order. The cheapest such path within ``budget`` FLOPs, or None. The
    ``n - 1``-operand rests are planned by :func:`_rest_search`."""
    n = len(terms)
    search = _rest_search(n)
    size = {c: d for t, shp in zip(terms, shapes) for c, d in zip(t, shp)}
    best: tuple[float, list[tuple[tuple[int, ...], str]]] | None = None
    for i, t in enumerate(terms):
        rest = [j for j in range(n) if j != i]
        rest_idx = set("".join(terms[j] for j in rest))
        free = [c for c in t if c in out]
        if not free or set(free) & rest_idx & set(out):
            continue
        con = "".join(sorted((set(t) & rest_idx) - set(out)))
        if set(out[: len(free)]) == set(free):
            rest_out = con + out[len(free):]
        elif set(out[len(out) - len(free):]) == set(free):
            rest_out = out[: len(out) - len(free)] + con
        else:
            continue
        rest_eq = ",".join(terms[j] for j in rest) + "->" + rest_out
        rest_shapes = tuple(shapes[j] for j in rest)
        cost = plan_cost(rest_eq, rest_shapes, search) + 2 * math.prod(size[c] for c in set(out) | set(con))
        if cost <= budget and (best is None or cost < best[0]):
            best = (cost, _raw_steps(rest_eq, rest_shapes, rest, n, search) + [((i, 2 * n - 3), out)])
    return None if best is None else best[1]


@functools.lru_cache(maxsize=4096)
def schedule(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Schedule:
    """Plan ``equation`` once per operand shapes (order by opt_einsum: FLOP-optimal up to
    :data:`OPTIMAL_MAX_OPERANDS` operands, then its 'dp' and 'greedy' searches)."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    for t in terms:
        lonely = [c for c in t if c not in out and sum(c in u for u in terms) == 1]
        if lonely:
            raise TuckerPeftError(
                f"einsum {equation!r}: index {lonely[0]!r} of term {t!r} is summed without meeting another "
                "operand; expected every index in the output or in two operands (sum it into the parameter instead)"
            )
    n = len(terms)
    raw = _raw_steps(equation, shapes, range(n), n)
    sets = {i: set(t) for i, t in enumerate(terms)} | {n + k: set(o) for k, (_, o) in enumerate(raw)}
    last = raw[-1][0]
    if n >= 3 and len(last) == 2 and not any(_split(sets[f], sets[g], out) for f, g in (last, last[::-1])):
        # Among near-optimal paths, prefer one whose full-size product needs no transpose.
        alt = _gemm_last(terms, out, shapes, 1.02 * plan_cost(equation, shapes))
        if alt is not None:
            raw = alt
            sets = {i: set(t) for i, t in enumerate(terms)} | {n + k: set(o) for k, (_, o) in enumerate(raw)}
    layout: dict[int, str] = dict(enumerate(terms))
    layout[n + len(raw) - 1] = out
    for k in reversed(range(len(raw))):  # top-down: a consumer fixes its inputs' layouts
        ids, default = raw[k]
        o = layout.setdefault(n + k, default)
        if len(ids) == 2:
            for first, second in (ids, ids[::-1]):
                head = _split(sets[first], sets[second], o)
                if head is None:
                    continue
                con = (sets[first] & sets[second]) - set(o)
                leaf = second if second < n else first if first < n else None
                con_order = "".join(c for c in layout[leaf] if c in con) if leaf is not None else "".join(sorted(con))
                layout.setdefault(first, head + con_order)
                layout.setdefault(second, con_order + o[len(head):])
                break
        for i in ids:
            if i not in layout:
                layout[i] = raw[i - n][1]
    steps = tuple((ids, tuple(layout[i] for i in ids), layout[n + k]) for k, (ids, _) in enumerate(raw))
    return Schedule(n, steps)


def _shapes(operands: Sequence[Any]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in op.shape) for op in operands)


def _dynamo_tracing(x: Any) -> bool:
    """Whether ``torch.compile`` is tracing (``x`` a torch tensor): the plan cache is not traceable there."""
    torch = sys.modules.get("torch")  # never imported here
    return torch is not None and torch.compiler.is_compiling() and isinstance(x, torch.Tensor)


def contract(equation: str, *operands: Any) -> Any:
    """Execute ``equation`` on ``operands`` with a cached plan (plain ``torch.einsum`` under ``torch.compile``,
    which traces it without a graph break and plans it itself)."""
    if operands and _dynamo_tracing(operands[0]):
        return sys.modules["torch"].einsum(equation, *operands)
    return schedule(equation, _shapes(operands))(operands)


def vjp_cost(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """FLOPs of :func:`contract_vjp`: the forward steps but the last, and two products per step."""
    lhs, _ = equation.split("->")
    size = {c: d for t, shp in zip(lhs.split(","), shapes) for c, d in zip(t, shp)}
    steps = schedule(equation, shapes).steps
    total = 0
    for k, (_, terms, out) in enumerate(steps):
        involved = math.prod(size[c] for c in set("".join(terms)) | set(out))
        total += 2 * involved * (len(terms) + (k < len(steps) - 1))
    return total


def contract_vjp(equation: str, operands: Sequence[Any], cotangent: Any) -> list[Any]:
    """Gradients of ⟨cotangent, einsum(equation, *operands)⟩ for every operand.

    Reverse mode over the planned steps: the forward keeps each intermediate
    (the last, full-size product is never formed), the backward runs two
    contractions per step. This costs about two of the largest contractions,
    where differentiating each operand separately would repeat the largest one
    per operand.
    """
    sched = schedule(equation, _shapes(operands))
    n, steps = sched.n_inputs, sched.steps
    values = sched.values(operands, skip_last=True)
    grads: dict[int, Any] = {n + len(steps) - 1: cotangent}
    for k in reversed(range(len(steps))):
        ids, terms, out = steps[k]
        g = grads.pop(n + k)
        for j, i in enumerate(ids):
            rest = [m for m in range(len(ids)) if m != j]
            gi = _run([out] + [terms[m] for m in rest], terms[j], [g] + [values[ids[m]] for m in rest])
            grads[i] = gi if i not in grads else grads[i] + gi
    return [grads[i] for i in range(n)]


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
