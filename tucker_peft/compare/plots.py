"""Figures of a comparison (matplotlib, Agg): test metric against parameters, the budget curve, lr sensitivity."""

from __future__ import annotations

import math
import os
from typing import Any

from .stats import pareto_front

__all__ = ["plot", "save_figure"]

_MARKERS = "osD^vP*Xh"
_LINESTYLES = ("-", "--", "-.", ":")


def variant_styles(variants: list[str]) -> dict[str, dict[str, Any]]:
    """Matplotlib style per variant: colour and marker by kind, line style by stack set (solid: per layer).

    ``tucker`` and ``tucker@layers`` share a colour and marker; the stacked
    one is dashed, so the pair reads as one kind, per layer and stacked.
    """
    kinds = list(dict.fromkeys(v.partition("@")[0] for v in variants))
    sets = list(dict.fromkeys(v.partition("@")[2] for v in variants if "@" in v))
    out = {}
    for v in variants:
        kind, _, stacked = v.partition("@")
        i = kinds.index(kind)
        ls = _LINESTYLES[(1 + sets.index(stacked)) % len(_LINESTYLES)] if stacked else "-"
        out[v] = {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "ls": ls,
                  "mfc": "none" if stacked else None}
    return out


def save_figure(plt: Any, fig: Any, path: str) -> str:
    """Write ``fig`` to ``path`` through a temporary file and a rename; return ``path``."""
    from .._format import atomic_write  # the package's one atomic writer

    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def plot(summary: list[dict[str, Any]], baselines: dict[str, Any], metric: str, higher: bool, title: str,
         out_dir: str) -> list[str]:
    """Write ``results.png``, ``budget_curve.png`` and ``lr_sensitivity.png`` into ``out_dir``; [] without matplotlib.

    ``results.png``: test metric (mean ± std over seeds) against adapter
    parameters. ``budget_curve.png``: the same on a log x-axis over every
    budget, one line per variant (a kind's stacked variants, ``K@set``, in
    its colour, dashed and with open markers), the Pareto front (fewest parameters for the
    best metric) circled and joined. ``lr_sensitivity.png``: validation metric
    against learning rate, one panel per budget.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    summary = [s for s in summary if s.get("adapter_params")]
    if not summary:
        return []
    kinds = list(dict.fromkeys(s["kind"] for s in summary))
    budgets = list(dict.fromkeys(s["budget"] for s in summary))
    style = variant_styles(kinds)
    n_colours = len({st["color"] for st in style.values()})
    ylabel = f"test {metric} ({'higher' if higher else 'lower'} is better)"
    written = []

    def curves(ax: Any) -> None:
        for k in kinds:
            pts = sorted((s["adapter_params"], s["test_mean"], s["test_std"]) for s in summary if s["kind"] == k)
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=[v if math.isfinite(v) else 0.0 for v in e], capsize=3, label=k, **style[k])
        for i, (label, b) in enumerate(baselines.items()):
            ax.axhline(b["test"], ls=":", lw=1, color=f"C{n_colours + i}", label=f"{label} ({b['test']:.3f})")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves(ax)
    xs = [s["adapter_params"] for s in summary]
    if max(xs) > 3 * min(xs):
        ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (all adapted layers; budgets " + ", ".join(budgets) + ")")
    ax.legend(fontsize=8)
    written.append(save_figure(plt, fig, os.path.join(out_dir, "results.png")))

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves(ax)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    front = sorted((summary[i]["adapter_params"], summary[i]["test_mean"])
                   for i in pareto_front([(s["adapter_params"], s["test_mean"]) for s in summary], higher))
    if front:
        fx, fy = zip(*front)
        ax.plot(fx, fy, ls=":", color="k", lw=1.2, zorder=1)
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="k", lw=1.2, zorder=5, label="Pareto front")
    ax.set_xlabel("trainable adapter parameters, log scale (budgets " + ", ".join(budgets) + ")")
    ax.legend(fontsize=8)
    written.append(save_figure(plt, fig, os.path.join(out_dir, "budget_curve.png")))

    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.6), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for k in kinds:
            s = next((s for s in summary if s["kind"] == k and s["budget"] == b), None)
            if s is None:
                continue
            x = [c["lr"] for c in s["lr_curve"]]
            y = [c["val_mean"] for c in s["lr_curve"]]
            e = [c["val_std"] if math.isfinite(c["val_std"]) else 0.0 for c in s["lr_curve"]]
            ax.errorbar(x, y, yerr=e, capsize=3, label=k, **style[k])
        ax.set_xscale("log")
        grid = sorted({c["lr"] for s in summary if s["budget"] == b for c in s["lr_curve"]})
        ax.set_xticks(grid, [f"{v:g}" for v in grid])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"budget {b}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    written.append(save_figure(plt, fig, os.path.join(out_dir, "lr_sensitivity.png")))
    return written
