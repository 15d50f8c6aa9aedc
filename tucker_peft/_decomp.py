"""HOSVD, HOOI and CP-ALS, written against the array API (no global state, on the arrays' device).

The leading singular vectors of a mode-n unfolding come from an
eigendecomposition of its small Gram matrix ``X_(n) X_(n)ᵀ`` (``I_n × I_n``),
never from an SVD of the wide unfolding itself. HOSVD is sequentially
truncated (ST-HOSVD): after each mode the tensor is projected onto its factor,
so later Gram products run on a smaller tensor. The mode order is chosen to
minimise that work.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import numpy as np
from array_api_compat import device

from ._base import check_int, check_rank, check_shape, check_tensor, mode_ranks
from ._namespace import namespace
from ._planner import contract
from ._errors import TuckerPeftError, fmt_shape

__all__ = ["hosvd", "hooi", "parafac", "multilinear_project", "max_cp_rank", "CPALS", "sym_pinv"]


def _fix_signs(xp: Any, u: Any) -> Any:
    """Make each column's cubed sum non-negative, so results agree across libraries."""
    # Not xp.sign: array-api-compat's CuPy sign masks NaNs, which synchronises.
    s = xp.sum(u * u * u, axis=0)
    ones = xp.ones_like(s)
    return u * xp.where(s < 0, -ones, ones)


def _unfold_gram(xp: Any, x: Any, n: int) -> Any:
    other = tuple(i for i in range(x.ndim) if i != n)
    return xp.tensordot(x, x, axes=(other, other))


def leading_left_singular(xp: Any, x: Any, n: int, r: int) -> tuple[Any, Any]:
    """Top-``r`` left singular vectors of the mode-``n`` unfolding and their σ².

    Returns ``(U, sigma2)`` with ``U`` of shape ``(I_n, r)`` (orthonormal
    columns) and ``sigma2`` of shape ``(I_n,)`` holding all squared singular
    values in descending order.
    """
    size = x.shape[n]
    k = math.prod(x.shape) // size
    if size > k and r <= k:
        return _tall_left_singular(xp, x, n, r, size, k)
    gram = _unfold_gram(xp, x, n)
    # The I_n x I_n eigenproblem runs in float64 whatever the input: it is small,
    # more accurate, and LAPACK's float32 eigh can be ~80x slower (OpenBLAS).
    w, v = xp.linalg.eigh(gram if gram.dtype == xp.float64 else xp.astype(gram, xp.float64))
    u = xp.astype(xp.flip(v[:, size - r:], axis=1), x.dtype)
    sigma2 = xp.astype(xp.flip(xp.where(w > 0, w, xp.zeros_like(w)), axis=0), x.dtype)
    return _fix_signs(xp, u), sigma2


def _tall_left_singular(xp: Any, x: Any, n: int, r: int, size: int, k: int) -> tuple[Any, Any]:
    """Tall unfolding M (I_n × k, I_n > k): eigh of the small k × k Gram MᵀM, then U = M·V/σ.

    An economy SVD of M would cost ~I_n·k² with a large constant and hold
    several I_n × k copies; this needs one k × k eigenproblem and one product.
    Columns of zero σ (M of rank < r) are completed orthonormally: they carry
    no energy, so any completion is a valid set of singular vectors.
    """
    m = xp.reshape(xp.permute_dims(x, (n, *[i for i in range(x.ndim) if i != n])), (size, k))
    m64 = m if m.dtype == xp.float64 else xp.astype(m, xp.float64)
    w, v = xp.linalg.eigh(xp.matmul(xp.matrix_transpose(m64), m64))
    w = xp.flip(xp.where(w > 0, w, xp.zeros_like(w)), axis=0)
    v = xp.flip(v, axis=1)[:, :r]
    top = w[:r]
    tol = float(w[0]) * k * 1e-13
    good = int(xp.sum(xp.astype(top > tol, xp.int64))) if float(w[0]) > 0 else 0
    u = xp.matmul(m64, v[:, :good]) / xp.sqrt(top[:good])
    if good < r:
        rng = np.random.default_rng(0)
        fill = xp.asarray(rng.standard_normal((size, r - good)), device=device(m64))
        q, _ = xp.linalg.qr(xp.concat([u, fill], axis=1))
        u = xp.concat([u, q[:, good:]], axis=1)
    sigma2 = xp.concat([w, xp.zeros(size - k, dtype=w.dtype, device=device(w))])
    return _fix_signs(xp, xp.astype(u, x.dtype)), xp.astype(sigma2, x.dtype)


def _project_mode(xp: Any, x: Any, u: Any, n: int) -> Any:
    """``x ×_n uᵀ``: mode ``n`` of size I_n becomes r_n, kept in place."""
    y = xp.tensordot(x, u, axes=([n], [0]))
    perm = list(range(n)) + [x.ndim - 1] + list(range(n, x.ndim - 1))
    return xp.permute_dims(y, tuple(perm))


def multilinear_project(tensor: Any, factors: Sequence[Any | None]) -> Any:
    """Core ``tensor ×_n U_nᵀ`` for every mode with a factor (planned contraction)."""
    from opt_einsum import get_symbol

    nd = tensor.ndim
    modes = "".join(get_symbol(i) for i in range(nd))
    terms, ops, out = [modes], [tensor], []
    for n, u in enumerate(factors):
        if u is None:
            out.append(modes[n])
        else:
            terms.append(modes[n] + get_symbol(nd + n))
            ops.append(u)
            out.append(get_symbol(nd + n))
    return contract(",".join(terms) + "->" + "".join(out), *ops)


@functools.lru_cache(maxsize=1024)
def _st_order(shape: tuple[int, ...], ranks: tuple[int | None, ...]) -> tuple[int, ...]:
    """Mode order of ST-HOSVD with the fewest Gram and projection FLOPs."""
    modes = [n for n, r in enumerate(ranks) if r is not None]

    def cost(order: Sequence[int]) -> float:
        dims, total = list(shape), 0.0
        for n in order:
            size = math.prod(dims)
            i, r = dims[n], ranks[n]
            k = size // i
            total += (i * k * k if i > k and r <= k else i * size) + r * size  # type: ignore[operator]
            dims[n] = r  # type: ignore[assignment]
        return total

    if len(modes) <= 6:
        return min(itertools.permutations(modes), key=cost)
    order: list[int] = []
    left = list(modes)
    while left:  # greedy beyond 6 modes
        best = min(left, key=lambda m: cost(order + [m]))
        order.append(best)
        left.remove(best)
    return tuple(order)


def _ranks_for(tensor: Any, ranks: Any) -> tuple[int | None, ...]:
    # A tensor given directly is decomposed whatever its number of modes (no spec cap).
    return mode_ranks(check_shape(tuple(tensor.shape), max(tensor.ndim, 1)), ranks)


def hosvd(tensor: Any, ranks: Any, *, sequential: bool = True) -> tuple[Any, tuple[Any | None, ...]]:
    """Truncated higher-order SVD.

    Parameters
    ----------
    tensor : array, shape ``(I_1, ..., I_N)``
    ranks : int or sequence of (int or None)
        As for :class:`tucker_peft.Tucker`; ``None`` leaves a mode unfactorised.
    sequential : bool
        ST-HOSVD (default): project after each mode, in the cheapest mode
        order. ``False`` gives the classic HOSVD, every factor from the
        original tensor.

    Returns
    -------
    core : array, shape ``(r_1, ..., r_N)`` (``I_n`` where the rank is None)
        ``tensor ×_n U_nᵀ`` for all factored modes.
    factors : tuple of (array of shape ``(I_n, r_n)`` or None)
        Orthonormal columns.

    Raises
    ------
    TuckerPeftError
        ``tensor`` is not real floating (cast an integer or boolean tensor
        first) or holds NaN/Inf.

    Notes
    -----
    The squared error is at most Σ_n Σ_{i>r_n} σ²_{n,i}, the discarded squared
    singular values of the unfoldings of ``tensor``, in both variants.
    """
    xp = check_tensor(tensor)
    rk = _ranks_for(tensor, ranks)
    factors: list[Any | None] = [None] * tensor.ndim
    if sequential:
        core = tensor
        for n in _st_order(tuple(tensor.shape), rk):
            u, _ = leading_left_singular(xp, core, n, rk[n])  # type: ignore[arg-type]
            factors[n] = u
            core = _project_mode(xp, core, u, n)
        return core, tuple(factors)
    for n, r in enumerate(rk):
        if r is not None:
            factors[n] = leading_left_singular(xp, tensor, n, r)[0]
    return multilinear_project(tensor, factors), tuple(factors)


def hooi_sweep(tensor: Any, factors: list[Any | None], ranks: Sequence[int | None]) -> Any:
    """One HOOI sweep, in place on ``factors``; returns the new core ``tensor ×_n U_nᵀ``.

    Each factor below full rank is refitted to ``tensor`` projected on all the
    others (a full-rank factor spans its whole mode: refitting it cannot change
    the fit). The factors must have orthonormal columns.
    """
    xp = namespace(tensor, what=("tensor",))
    for n, r in enumerate(ranks):
        if r is not None and r < tensor.shape[n]:
            others = [u if m != n else None for m, u in enumerate(factors)]
            factors[n] = leading_left_singular(xp, multilinear_project(tensor, others), n, r)[0]
    return multilinear_project(tensor, factors)


def hooi(tensor: Any, ranks: Any, *, n_iter: int = 10, tol: float | None = 1e-8) -> tuple[Any, tuple[Any | None, ...]]:
    """Higher-order orthogonal iteration, started from :func:`hosvd`.

    Each sweep refits every factor to the tensor projected on all the others.
    Stops after ``n_iter`` sweeps or when ``‖core‖²`` (which equals
    ``‖tensor‖² − error²``) grows by no more than ``tol`` relative;
    ``tol=None`` runs all ``n_iter`` sweeps (and reads nothing back to the host).

    Returns ``(core, factors)`` as :func:`hosvd`, which also checks ``tensor``.
    """
    xp = namespace(tensor, what=("tensor",))
    rk = _ranks_for(tensor, ranks)
    if n_iter < 0:
        raise TuckerPeftError(f"n_iter: expected an int >= 0, got {n_iter!r}")
    core, factors_t = hosvd(tensor, rk)
    factors = list(factors_t)
    prev = float(xp.sum(core * core)) if tol is not None else 0.0
    for _ in range(n_iter):
        core = hooi_sweep(tensor, factors, rk)
        if tol is not None:
            cur = float(xp.sum(core * core))
            if cur - prev <= tol * max(cur, 1e-300):
                break
            prev = cur
    return core, tuple(factors)


def max_cp_rank(shape: tuple[int, ...]) -> int:
    """Largest useful CP rank: every tensor has rank ≤ Π I_n / max I_n."""
    return max(1, math.prod(shape) // max(shape))


def sym_pinv(xp: Any, v: Any) -> Any:
    """Pseudo-inverse of a symmetric PSD matrix (the normal equations), by eigh.

    Minimum-norm least squares with no host check for a singular matrix; unlike
    ``linalg.pinv`` on CuPy (a masked assignment) it never synchronises. The
    small eigenproblem runs in float64, as in HOSVD.
    """
    v64 = xp.astype(v, xp.float64)
    w, q = xp.linalg.eigh((v64 + xp.matrix_transpose(v64)) / 2)
    tol = xp.max(xp.abs(w)) * v.shape[0] * xp.finfo(xp.float64).eps
    keep = w > tol
    inv = xp.where(keep, 1 / xp.where(keep, w, xp.ones_like(w)), xp.zeros_like(w))
    return xp.astype(xp.matmul(q * inv, xp.matrix_transpose(q)), v.dtype)


class CPALS:
    """CP-ALS on the target's device: each factor from its R×R normal equations, columns normalised into λ.

    ``weights`` (R,) and ``factors`` (I_n, R) are the start; :meth:`sweep`
    updates them in place. Used by :func:`parafac` and :func:`tucker_peft.fit`.
    """

    def __init__(self, xp: Any, target: Any, weights: Any, factors: Sequence[Any]) -> None:
        from opt_einsum import get_symbol

        self.xp, self.target = xp, target
        self.weights, self.factors = weights, list(factors)
        nd, r = target.ndim, get_symbol(2 * target.ndim)
        modes = "".join(get_symbol(i) for i in range(nd))
        # MTTKRP of mode n: target contracted with every other factor.
        self.eqs = [",".join([modes] + [modes[m] + r for m in range(nd) if m != n]) + "->" + modes[n] + r
                    for n in range(nd)]
        self._last_mttkrp: Any = None

    def sweep(self) -> None:
        xp, nd = self.xp, self.target.ndim
        grams = [xp.matmul(xp.matrix_transpose(a), a) for a in self.factors]
        for n in range(nd):
            v = None
            for m in range(nd):
                if m != n:
                    v = grams[m] if v is None else v * grams[m]
            mt = contract(self.eqs[n], self.target, *[self.factors[m] for m in range(nd) if m != n])
            a = xp.matmul(mt, sym_pinv(xp, v))
            lam = xp.sqrt(xp.sum(a * a, axis=0))
            a = a / xp.where(lam > 0, lam, xp.ones_like(lam))
            self.factors[n], self.weights = a, lam
            grams[n] = xp.matmul(xp.matrix_transpose(a), a)
        self._last_mttkrp, self._grams = mt, grams

    def error2(self, norm2: Any) -> Any:
        """‖target − [[λ; A]]‖² after a sweep, from the last MTTKRP and the Gram matrices (no rebuild)."""
        xp = self.xp
        inner = xp.sum(xp.sum(self._last_mttkrp * self.factors[-1], axis=0) * self.weights)
        g = self._grams[0]
        for m in range(1, len(self._grams)):
            g = g * self._grams[m]
        model = xp.sum(xp.matmul(g, self.weights) * self.weights)
        return norm2 - 2 * inner + model


def parafac(tensor: Any, rank: int, *, n_iter: int = 100, tol: float | None = 1e-8,
            seed: int | None = 0) -> tuple[Any, tuple[Any, ...]]:
    """CP decomposition by alternating least squares, on ``tensor``'s own library and device.

    Starts from the leading left singular vectors of each unfolding (random
    columns complete a mode smaller than ``rank``), then runs :class:`CPALS`
    sweeps in float64 until the relative error changes by less than ``tol``
    (``None``: all ``n_iter`` sweeps). No global state is touched (tensorly is
    not used), so other threads' array backends are left alone.

    Parameters
    ----------
    tensor : array, shape ``(I_1, ..., I_N)``, N ≥ 2, finite
    rank : int
        In ``[1, Π I_n / max I_n]``.

    Returns
    -------
    weights : array, shape ``(rank,)``
    factors : tuple of arrays, shapes ``(I_n, rank)``, unit-norm columns
        In ``tensor``'s library, device and dtype.
    """
    xp = check_tensor(tensor)
    if tensor.ndim < 2:
        raise TuckerPeftError(f"tensor: CP fitting needs at least 2 modes, got shape {fmt_shape(tensor.shape)}")
    shape = tuple(tensor.shape)
    rank = check_rank(rank, f"rank (CP of shape {shape})", 1, max_cp_rank(shape))
    n_iter = check_int(n_iter, "n_iter", 0)
    if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0):
        raise TuckerPeftError(f"tol: expected a number >= 0 or None, got {tol!r}")
    t = xp.astype(tensor, xp.float64)
    dev = device(t)
    rng = np.random.default_rng(seed)
    factors = []
    for n, d in enumerate(shape):
        u, _ = leading_left_singular(xp, t, n, min(rank, d))
        if rank > d:  # as tensorly's svd init: random columns beyond the mode's size
            u = xp.concat([u, xp.asarray(rng.standard_normal((d, rank - d)), device=dev)], axis=1)
        factors.append(u)
    als = CPALS(xp, t, xp.ones(rank, dtype=xp.float64, device=dev), factors)
    norm2 = xp.sum(t * t)
    scale2 = max(float(norm2), 1e-300) if tol is not None else 1.0
    prev = None
    for _ in range(n_iter):
        als.sweep()
        if tol is not None:
            err = math.sqrt(max(float(als.error2(norm2)), 0.0) / scale2)
            if prev is not None and abs(prev - err) < tol:
                break
            prev = err

    def back(a: Any) -> Any:
        return xp.astype(a, tensor.dtype)

    return back(als.weights), tuple(back(f) for f in als.factors)
