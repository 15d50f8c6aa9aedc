"""Rank selection: equal-budget matching and energy-based ranks.

>>> from tucker_peft import ranks, LoRA
>>> ranks.match(LoRA((64, 32, 3, 3), 8), "tucker")   # the Tucker that costs what LoRA r=8 costs
Tucker(shape=(64, 32, 3, 3), ranks=(13, 13, 3, 3))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._base import Parametrization, check_int, check_shape, check_tensor, lookup
from ._decomp import leading_left_singular
from ._errors import RankError, TuckerPeftError, fmt_shape

__all__ = ["for_budget", "match", "by_energy"]


def for_budget(kind: str, shape: Sequence[int], budget: int, **constraints: Any) -> Parametrization:
    """The spec of ``kind`` with the most parameters that is still ``<= budget``.

    Parameters
    ----------
    kind : str
        A registered kind: ``'tucker'``, ``'tucker2'``, ``'cp'``, ``'lora'``,
        ``'tt'``, ``'lokr'``, ``'loha'``, or a third-party one.
    shape : tuple of int
    budget : int
        Largest allowed ``num_params``.
    **constraints
        Passed to the kind's :meth:`~tucker_peft.Parametrization.budget_family`;
        for Tucker ``split='equal'|'proportional'``, ``kernel='free'|'full'|'none'``
        and ``fixed={mode: rank or None}``; for TT ``tensorize=``; for LoKr
        ``factor=`` and ``decompose_both=``.

    Returns
    -------
    Parametrization
        Maximal within the kind's family under the constraints.

    Raises
    ------
    RankError
        If even the smallest member of the family exceeds the budget.
    """
    cls = lookup(kind)
    shape = check_shape(shape)
    budget = check_int(budget, "budget", 1)
    family = getattr(cls, "budget_family", None)
    if family is None:
        raise TuckerPeftError(f"kind {kind!r} does not support budget matching")
    f, t_max = family(shape, **constraints)
    smallest = f(1)
    if smallest.num_params > budget:
        raise RankError(
            f"budget: {kind!r} on shape {fmt_shape(shape)} needs at least {smallest.num_params} parameters "
            f"({smallest!r}) under constraints {constraints or {}}, got budget {budget}"
        )
    lo, hi = 1, t_max  # invariant: f(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if f(mid).num_params <= budget:
            lo = mid
        else:
            hi = mid - 1
    return f(lo)


def match(spec: Parametrization, kind: str, **constraints: Any) -> Parametrization:
    """The spec of ``kind`` on ``spec.shape`` whose ``num_params`` is closest to, and not above, ``spec``'s.

    For equal-budget comparisons: ``match(LoRA(shape, 8), 'tucker')``.
    """
    if not isinstance(spec, Parametrization):
        raise TuckerPeftError(f"spec: expected a Parametrization, got {type(spec).__name__}")
    return for_budget(kind, spec.shape, spec.num_params, **constraints)


def by_energy(tensor: Any, energy: float | Sequence[float | None]) -> tuple[int | None, ...]:
    """Per-mode ranks that keep a fraction ``energy`` of each unfolding's σ².

    Parameters
    ----------
    tensor : array, shape ``(I_1, ..., I_N)``
    energy : float in (0, 1], or one per mode (None leaves the mode unfactorised)

    Returns
    -------
    tuple of (int or None)
        ``r_n`` is the smallest rank whose leading squared singular values of
        the mode-n unfolding sum to at least ``energy`` of the total; an
        all-zero tensor gets rank 1.

    Raises
    ------
    TuckerPeftError
        ``tensor`` is not real floating or holds NaN/Inf.
    """
    xp = check_tensor(tensor)
    nd = tensor.ndim
    if isinstance(energy, (int, float)) and not isinstance(energy, bool):
        energies: list[float | None] = [float(energy)] * nd
    elif isinstance(energy, Sequence) and not isinstance(energy, str) and len(energy) == nd:
        energies = [None if e is None else float(e) for e in energy]
    else:
        raise TuckerPeftError(f"energy: expected a float in (0, 1] or {nd} of them, got {energy!r}")
    out: list[int | None] = []
    for n, e in enumerate(energies):
        if e is None:
            out.append(None)
            continue
        if not 0 < e <= 1 or math.isnan(e):
            raise TuckerPeftError(f"energy[{n}]: expected a float in (0, 1], got {e!r}")
        _, sigma2 = leading_left_singular(xp, tensor, n, 1)
        total = float(xp.sum(sigma2))
        if total == 0:
            out.append(1)
            continue
        cum = xp.cumulative_sum(sigma2) / total
        # Smallest r with cum[r-1] >= e (rounding slack so that e=1 is reachable).
        r = int(xp.sum(xp.astype(cum < e * (1 - 1e-12), xp.int64))) + 1
        out.append(min(r, tensor.shape[n]))
    return tuple(out)
