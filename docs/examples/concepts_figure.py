"""The figure of docs/concepts.md: relative error against parameter budget.

A random conv-shaped tensor of low multilinear rank (plus 1 % noise) is fitted
by Tucker, Tucker-2, CP and flattened LoRA at equal parameter budgets with
:func:`tucker_peft.budget_sweep` (each kind gets its largest spec within the
budget from :func:`tucker_peft.ranks.for_budget`, then HOSVD/SVD/CP-ALS and 10
ALS sweeps). Run from the repository root (a few seconds)::

    python docs/examples/concepts_figure.py      # writes docs/assets/concepts_budget.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

import tucker_peft as tp  # noqa: E402

SHAPE = (64, 32, 3, 3)            # (out, in, kh, kw)
TRUE_RANKS = (8, 8, 2, 2)         # multilinear rank of the signal
NOISE = 0.01
BUDGETS = [int(b) for b in np.geomspace(110, 8000, 16)]
KINDS = ("tucker", "tucker2", "cp", "lora")
LABELS = {"tucker": "Tucker", "tucker2": "Tucker-2", "cp": "CP", "lora": "LoRA (flattened)"}


def make_target(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = tp.Tucker(SHAPE, TRUE_RANKS)
    signal = spec.reconstruct(spec.init("random", seed=seed))
    signal /= np.linalg.norm(signal)
    noise = rng.standard_normal(SHAPE)
    return signal + NOISE * noise / np.linalg.norm(noise)


def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = make_target()
    rows = tp.budget_sweep(target, BUDGETS, KINDS, steps=10, seed=0)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for kind, marker in zip(KINDS, "osD^"):
        pts = sorted({(r.num_params, r.rel_error) for r in rows if r.kind == kind and r.spec is not None})
        ax.plot(*zip(*pts), marker=marker, ms=4, label=LABELS[kind])
        print(kind, " ".join(f"{n}:{e:.3f}" for n, e in pts))
    ax.axhline(NOISE, color="0.6", ls=":", lw=1)
    ax.text(BUDGETS[0], NOISE * 1.15, "noise level", color="0.4", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("relative error ‖ΔW − fit‖ / ‖ΔW‖")
    ax.set_title(f"ΔW of shape {SHAPE}, multilinear rank {TRUE_RANKS} + 1 % noise", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    print(f"wrote {out}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "assets" / "concepts_budget.png"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
