"""opt_einsum backend for array libraries without a native ``einsum``.

opt_einsum imports this module by name and calls ``tensordot``, ``transpose``
and ``einsum``; all three are written against the array API standard, so any
compliant namespace (array-api-strict, ...) can execute a planned contraction.
``einsum`` handles the one- and two-operand steps opt_einsum emits (no index
repeated within one operand) by batched ``matmul``.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace


def tensordot(x: Any, y: Any, axes: Any = 2) -> Any:
    return array_namespace(x, y).tensordot(x, y, axes=axes)


def transpose(x: Any, axes: Any) -> Any:
    return array_namespace(x).permute_dims(x, tuple(axes))


def _sum_out(xp: Any, x: Any, term: str, keep: set[str]) -> tuple[Any, str]:
    drop = tuple(i for i, s in enumerate(term) if s not in keep)
    if drop:
        x = xp.sum(x, axis=drop)
        term = "".join(s for s in term if s in keep)
    return x, term


def einsum(equation: str, *operands: Any, **_: Any) -> Any:
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if any(len(set(t)) != len(t) for t in terms) or len(terms) > 2:
        raise NotImplementedError(f"generic einsum backend cannot evaluate {equation!r}")
    xp = array_namespace(*operands)
    if len(terms) == 1:
        x, t = _sum_out(xp, operands[0], terms[0], set(out))
        return xp.permute_dims(x, tuple(t.index(s) for s in out))
    (ta, tb), (a, b) = terms, operands
    a, ta = _sum_out(xp, a, ta, set(tb) | set(out))
    b, tb = _sum_out(xp, b, tb, set(ta) | set(out))
    size = {s: n for t, x in ((ta, a), (tb, b)) for s, n in zip(t, x.shape)}
    batch = [s for s in ta if s in tb and s in out]
    inner = [s for s in ta if s in tb and s not in out]
    free_a = [s for s in ta if s not in tb]
    free_b = [s for s in tb if s not in ta]

    def prod(idx: list[str]) -> int:
        return math.prod(size[s] for s in idx)

    a = xp.permute_dims(a, tuple(ta.index(s) for s in batch + free_a + inner))
    b = xp.permute_dims(b, tuple(tb.index(s) for s in batch + inner + free_b))
    a = xp.reshape(a, (prod(batch), prod(free_a), prod(inner)))
    b = xp.reshape(b, (prod(batch), prod(inner), prod(free_b)))
    r = xp.matmul(a, b)
    got = batch + free_a + free_b
    r = xp.reshape(r, tuple(size[s] for s in got))
    return xp.permute_dims(r, tuple(got.index(s) for s in out))
