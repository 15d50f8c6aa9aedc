"""The contraction planner: cached einsum plans, their layout-aware schedule and reverse mode.

Plans are cached per equation and operand shapes (pure functions of them, no
backend state); execution dispatches on the operands' library through
:func:`~tucker_peft._namespace.einsum_backend`. Importing this module imports
neither torch nor cupy.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import opt_einsum
from opt_einsum.backends import get_func

from ._errors import TuckerPeftError
from ._namespace import einsum_backend

__all__ = [
    "schedule",
    "Schedule",
    "contract",
    "contract_vjp",
    "plan_cost",
    "vjp_cost",
]


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
    ordered = [terms[i] for i in order]
    if len(ordered) == 2 and all(c in out or (c in ordered[0] and c in ordered[1]) for c in "".join(ordered)) \
            and not set(ordered[0]) & set(ordered[1]) & set(out):
        left, right = ordered  # the operands' subscripts, in tensordot order
        summed = [c for c in left if c in right]
        axes = ([left.index(c) for c in summed], [right.index(c) for c in summed])
        result_order = [c for c in left if c not in summed] + [c for c in right if c not in summed]
        perm = None if "".join(result_order) == out else tuple(result_order.index(c) for c in out)

        def pair(arrays: Sequence[Any]) -> Any:
            first, second = arrays[order[0]], arrays[order[1]]
            backend = einsum_backend(first)
            product = get_func("tensordot", backend)(first, second, axes=axes)
            return product if perm is None else get_func("transpose", backend)(product, perm)

        return pair
    step_eq = ",".join(ordered) + "->" + out

    def step(arrays: Sequence[Any]) -> Any:
        ordered_ops = [arrays[i] for i in order]
        return _step_expr(step_eq, _shapes(ordered_ops))(*ordered_ops, backend=einsum_backend(ordered_ops[0]))

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
    size = {c: d for term, shp in zip(terms, shapes) for c, d in zip(term, shp)}
    best: tuple[float, list[tuple[tuple[int, ...], str]]] | None = None
    for last_operand, term in enumerate(terms):
        rest = [j for j in range(n) if j != last_operand]
        rest_indices = set("".join(terms[j] for j in rest))
        free = [c for c in term if c in out]
        if not free or set(free) & rest_indices & set(out):
            continue
        summed = "".join(sorted((set(term) & rest_indices) - set(out)))
        if set(out[: len(free)]) == set(free):
            rest_out = summed + out[len(free):]
        elif set(out[len(out) - len(free):]) == set(free):
            rest_out = out[: len(out) - len(free)] + summed
        else:
            continue
        rest_eq = ",".join(terms[j] for j in rest) + "->" + rest_out
        rest_shapes = tuple(shapes[j] for j in rest)
        cost = plan_cost(rest_eq, rest_shapes, search) + 2 * math.prod(size[c] for c in set(out) | set(summed))
        if cost <= budget and (best is None or cost < best[0]):
            best = (cost, _raw_steps(rest_eq, rest_shapes, rest, n, search) + [((last_operand, 2 * n - 3), out)])
    return None if best is None else best[1]


def _node_indices(terms: Sequence[str], path: Sequence[tuple[tuple[int, ...], str]]) -> dict[int, set[str]]:
    """Index set of every node: the operands', then each step's output."""
    n = len(terms)
    return {i: set(term) for i, term in enumerate(terms)} | {n + k: set(out) for k, (_, out) in enumerate(path)}


@functools.lru_cache(maxsize=4096)
def schedule(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Schedule:
    """Plan ``equation`` once per operand shapes (order by opt_einsum: FLOP-optimal up to
    :data:`OPTIMAL_MAX_OPERANDS` operands, then its 'dp' and 'greedy' searches)."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    for term in terms:
        lonely = [c for c in term if c not in out and sum(c in other for other in terms) == 1]
        if lonely:
            raise TuckerPeftError(
                f"einsum {equation!r}: index {lonely[0]!r} of term {term!r} is summed without meeting another "
                "operand; expected every index in the output or in two operands (sum it into the parameter instead)"
            )
    n = len(terms)
    path = _raw_steps(equation, shapes, range(n), n)
    indices = _node_indices(terms, path)
    last_inputs = path[-1][0]
    if n >= 3 and len(last_inputs) == 2 and not any(
            _split(indices[fst], indices[snd], out) for fst, snd in (last_inputs, last_inputs[::-1])):
        # Among near-optimal paths, prefer one whose full-size product needs no transpose.
        gemm_path = _gemm_last(terms, out, shapes, 1.02 * plan_cost(equation, shapes))
        if gemm_path is not None:
            path = gemm_path
            indices = _node_indices(terms, path)
    layout: dict[int, str] = dict(enumerate(terms))
    layout[n + len(path) - 1] = out
    for k in reversed(range(len(path))):  # top-down: a consumer fixes its inputs' layouts
        ids, default = path[k]
        step_out = layout.setdefault(n + k, default)
        if len(ids) == 2:
            for first, second in (ids, ids[::-1]):
                head = _split(indices[first], indices[second], step_out)
                if head is None:
                    continue
                summed = (indices[first] & indices[second]) - set(step_out)
                leaf = second if second < n else first if first < n else None
                summed_order = ("".join(c for c in layout[leaf] if c in summed) if leaf is not None
                                else "".join(sorted(summed)))
                layout.setdefault(first, head + summed_order)
                layout.setdefault(second, summed_order + step_out[len(head):])
                break
        for i in ids:
            if i not in layout:
                layout[i] = path[i - n][1]
    steps = tuple((ids, tuple(layout[i] for i in ids), layout[n + k]) for k, (ids, _) in enumerate(path))
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
    plan = schedule(equation, _shapes(operands))
    n, steps = plan.n_inputs, plan.steps
    values = plan.values(operands, skip_last=True)
    grads: dict[int, Any] = {n + len(steps) - 1: cotangent}
    for k in reversed(range(len(steps))):
        ids, terms, out = steps[k]
        grad_out = grads.pop(n + k)
        for pos, node in enumerate(ids):
            rest = [other for other in range(len(ids)) if other != pos]
            grad_in = _run([out] + [terms[other] for other in rest], terms[pos],
                           [grad_out] + [values[ids[other]] for other in rest])
            grads[node] = grad_in if node not in grads else grads[node] + grad_in
    return [grads[node] for node in range(n)]
