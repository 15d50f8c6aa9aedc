"""Statistics of a comparison: learning-rate selection, paired differences to LoRA, intervals, power, Pareto front.

Pure Python and NumPy; SciPy (the ``compare`` extra) gives the t and
noncentral-t quantiles, with normal approximations when it is missing.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np

__all__ = ["mean_std", "better", "select_lrs", "paired_ci", "seeds_needed", "pareto_front", "summarise",
           "BOOTSTRAP_MIN_SEEDS", "OK_STATUSES"]

#: Below this many seeds the 95% interval is a t interval; from it on, a percentile bootstrap over seeds.
BOOTSTRAP_MIN_SEEDS = 10
#: Run statuses whose validation metric counts (a stalled run trained without error; its metric is real).
OK_STATUSES = ("ok", "stalled")


def _finite(xs: Sequence[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def mean_std(xs: Sequence[Any]) -> tuple[float, float]:
    """Mean and sample std of the finite values (std 0 for one value; NaN, NaN for none)."""
    xs = _finite(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def better(a: float, b: float, higher: bool) -> bool:
    """Whether ``a`` beats ``b`` (a non-finite value never beats, and is always beaten)."""
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if higher else a < b


def select_lrs(rows: list[dict[str, Any]], higher: bool) -> dict[tuple[str, str], float]:
    """(budget, kind) -> the lr with the best mean validation metric; a failed seed disqualifies its lr."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for key in dict.fromkeys((r["budget"], r["kind"]) for r in rows):
        for lr in sorted({r["lr"] for r in rows if (r["budget"], r["kind"]) == key}):
            sel = [r for r in rows if (r["budget"], r["kind"], r["lr"]) == (*key, lr)]
            ok = all(r["status"] in OK_STATUSES and math.isfinite(r["val"]) for r in sel)
            m = statistics.fmean(r["val"] for r in sel) if ok else float("nan")
            if key not in best or better(m, best[key][1], higher):
                best[key] = (lr, m)
    return {k: v[0] for k, v in best.items()}


def _t_quantile(q: float, df: int) -> float:
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df))
    except ImportError:  # Cornish-Fisher expansion of t around the normal quantile
        z = statistics.NormalDist().inv_cdf(q)
        return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_ci(diffs: Sequence[float], level: float = 0.95, seed: int = 0,
              bootstrap_min: int = BOOTSTRAP_MIN_SEEDS) -> tuple[float, float, str] | None:
    """A ``level`` confidence interval for the mean of paired differences.

    Parameters
    ----------
    diffs : sequence of float, shape (n,)
        One difference per seed (kind minus LoRA, same seed and batches).
    level : float
    seed : int
        Seed of the bootstrap resampling.
    bootstrap_min : int
        From this many differences on, a percentile bootstrap (10,000
        resamples of the seeds); below it, a t interval.

    Returns
    -------
    (low, high, method) or None
        ``method`` is ``'bootstrap'`` or ``'t'``; None for fewer than 2 differences.
    """
    d = np.asarray(_finite(diffs), dtype=np.float64)
    n = len(d)
    if n < 2:
        return None
    a = (1.0 - level) / 2
    if n >= bootstrap_min:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(10_000, n))].mean(axis=1)
        return float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), "bootstrap"
    half = _t_quantile(1 - a, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return float(d.mean()) - half, float(d.mean()) + half, "t"


def _power(n: int, effect: float, alpha: float) -> float:
    """Power of the two-sided paired t test with ``n`` pairs at standardised effect ``effect`` (= δ/σ)."""
    df = n - 1
    tc = _t_quantile(1 - alpha / 2, df)
    nc = effect * math.sqrt(n)
    try:
        from scipy import stats

        return float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))
    except ImportError:
        nd = statistics.NormalDist()
        return 1 - nd.cdf(tc - nc) + nd.cdf(-tc - nc)


def seeds_needed(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8, cap: int = 100_000) -> int | None:
    """Seeds a paired t test needs to detect a mean difference ``delta`` given the differences' std ``sd``.

    The smallest n >= 2 whose two-sided paired t test at level ``alpha`` has
    at least ``power`` (noncentral t). None if ``sd`` is unknown; 2 if
    ``sd`` is 0; ``cap`` stands for "more than that".
    """
    if sd is None or not math.isfinite(sd) or not (delta > 0):
        return None
    if sd == 0:
        return 2
    effect = delta / sd
    lo = 2
    if _power(lo, effect, alpha) >= power:
        return lo
    hi = 4
    while _power(hi, effect, alpha) < power:
        if hi >= cap:
            return cap
        lo, hi = hi, min(cap, 2 * hi)
    while hi - lo > 1:  # power rises with n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _power(mid, effect, alpha) < power else (lo, mid)
    return hi


def pareto_front(points: Sequence[tuple[float, float]], higher: bool) -> list[int]:
    """Indices of the points ``(params, metric)`` that no other point beats with as few or fewer params."""
    out = []
    for i, (p, m) in enumerate(points):
        if not math.isfinite(m):
            continue
        dominated = any(j != i and q <= p and math.isfinite(v) and (better(v, m, higher) or (v == m and q < p))
                        for j, (q, v) in enumerate(points))
        if not dominated:
            out.append(i)
    return out


def _ratio_median(rows: list[dict[str, Any]]) -> float | None:
    r = [x["step_ratio_lora"] for x in rows if x.get("step_ratio_lora") is not None]
    return statistics.median(r) if r else None


def summarise(rows: list[dict[str, Any]], chosen: dict[tuple[str, str], float], higher: bool,
              detect: float = 0.01, reference: tuple[str, str | None] = ("lora", None)) -> list[dict[str, Any]]:
    """One row per (budget, kind): the selected lr's val/test mean ± std over seeds, and the paired difference.

    ``vs_lora_*``: the test metric minus the reference's at the same seed
    (``reference = (kind, budget)``; budget None: the row's own budget;
    default LoRA at each budget), each at its own selected lr: mean, std, a
    95% interval
    (:func:`paired_ci`), whether it contains 0, and the seeds a paired t test
    would need to detect a difference of ``detect`` at that spread
    (:func:`seeds_needed`). ``step_ratio_lora``: median over interleaving
    rounds of the kind's median step time over LoRA's in the same round.
    """
    out = []
    for (budget, kind), lr in chosen.items():
        sel = [r for r in rows if (r["budget"], r["kind"], r["lr"]) == (budget, kind, lr)]
        every = [r for r in rows if (r["budget"], r["kind"]) == (budget, kind)]
        vm, vs = mean_std([r["val"] for r in sel])
        tm, ts = mean_std([r["test"] for r in sel])
        key = (reference[1] or budget, reference[0])
        ref = [r for r in rows if (r["budget"], r["kind"], r["lr"]) == (*key, chosen.get(key))]
        diffs: list[float] = []
        if (budget, kind) != key and ref:
            by_seed = {r["seed"]: r["test"] for r in ref}
            diffs = [r["test"] - by_seed[r["seed"]] for r in sel if r["seed"] in by_seed
                     and r["test"] is not None and by_seed[r["seed"]] is not None
                     and math.isfinite(r["test"]) and math.isfinite(by_seed[r["seed"]])]
        dm, ds = mean_std(diffs) if diffs else (None, None)
        ci = paired_ci(diffs) if diffs else None
        fine = [r for r in sel if r.get("layers")]
        layers = fine[0]["layers"] if fine else {}
        curve = []
        for lr_ in sorted({r["lr"] for r in every}):
            at = [r for r in every if r["lr"] == lr_]
            m, s = mean_std([r["val"] for r in at])
            curve.append({"lr": lr_, "val_mean": m, "val_std": s,
                          "diverged": sum(r["status"] == "diverged" for r in at),
                          "failed": sum(r["status"] not in OK_STATUSES for r in at)})
        steps = _finite([r["step_ms_median"] for r in sel])
        saved = _finite([r["saved_mb"] for r in sel])
        out.append({
            "budget": budget, "kind": kind, "best_lr": lr, "seeds": len(sel),
            "val_mean": vm, "val_std": vs, "test_mean": tm, "test_std": ts,
            "test_per_seed": [r["test"] for r in sel],
            "vs_lora_mean": dm, "vs_lora_std": ds,
            "vs_lora_ci_low": ci[0] if ci else None, "vs_lora_ci_high": ci[1] if ci else None,
            "vs_lora_ci_method": ci[2] if ci else None,
            "vs_lora_ci_contains_0": (ci[0] <= 0 <= ci[1]) if ci else None,
            "detect_delta": detect, "seeds_to_detect": seeds_needed(ds, detect) if ds is not None else None,
            "adapter_params": fine[0]["adapter_params"] if fine else None,
            "head_params": fine[0]["head_params"] if fine else None,
            "ranks": {k: v["ranks"] for k, v in layers.items()}, "layer_params": {k: v["params"] for k, v in layers.items()},
            "step_ms_median": statistics.median(steps) if steps else float("nan"),
            "step_ratio_lora": _ratio_median(every),
            "saved_mb": statistics.median(saved) if saved else float("nan"),
            "state_mb": fine[0]["state_mb"] if fine else None,
            "runs": len(every), "diverged": sum(r["status"] == "diverged" for r in every),
            "failed": sum(r["status"] not in OK_STATUSES for r in every),
            "stalled": sum(r["status"] == "stalled" for r in every),
            "lr_curve": curve,
        })
    return out
