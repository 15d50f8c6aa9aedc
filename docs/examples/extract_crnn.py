#!/usr/bin/env python
"""How much of a real fine-tuning update do Tucker, CP and LoRA capture at equal budget?

1. Fine-tune a pretrained CRNN (the Khmer OCR model that ``pip install
   khmer-ocr-ocm`` ships with its weights and fonts, no download) for a few
   hundred Adam steps on a shifted domain: white-on-black, noisy, slightly
   blurred text lines rendered offline from its bundled fonts.
2. Take ΔW = W_finetuned − W_base of every 4-D conv kernel.
3. At several equal parameter budgets (those of LoRA ranks 1…32), fit a
   Tucker (kernel modes at rank 2), a Tucker-2, a CP and a LoRA delta to
   each ΔW with :func:`tucker_peft.fitting.budget_sweep` (ALS from HOSVD /
   CP-ALS / SVD).
4. Write a Markdown table, a JSON file and a PNG plot of relative error
   against budget.

Run from the repository root (about 5 minutes on 2 CPU cores; the fine-tuned
weights are cached, so later runs only redo step 3)::

    pip install khmer-ocr-ocm matplotlib
    python docs/examples/extract_crnn.py                  # full run
    python docs/examples/extract_crnn.py --steps 20 --ranks 1 2   # quick look

Not run in CI; ``tests/test_extract_example.py`` smoke-tests :func:`extract`
and the table and plot helpers on synthetic data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft.compare.tasks import edit_distance as _edit_distance  # noqa: E402
from tucker_peft.fitting import budget_sweep  # noqa: E402

def _kernel_rank(r: int) -> Callable[[tuple[int, ...]], dict[str, Any]]:
    return lambda shape: {"fixed": {n: min(r, shape[n]) for n in range(2, len(shape))}}


#: Label -> (kind, for_budget constraints or a function of the shape giving them).
#: Tucker with the default equal split keeps the 3×3 kernel modes at full rank
#: at every budget here, so it coincides with Tucker-2; "tucker k2" compresses
#: the kernel modes to rank 2.
VARIANTS: dict[str, tuple[str, Any]] = {
    "tucker k2": ("tucker", _kernel_rank(2)),
    "tucker2": ("tucker2", {}),
    "cp": ("cp", {}),
    "lora": ("lora", {}),
}
KINDS = tuple(VARIANTS)
#: Fit steps per kind: HOOI and CP-ALS sweeps; LoRA's SVD is already optimal.
FIT_STEPS = {"tucker": 10, "tucker2": 10, "cp": 20, "lora": 1}
LORA_RANKS = (1, 2, 4, 8, 16, 32)


# -- 1. fine-tuning ----------------------------------------------------------------
KHMER_CONSONANTS = [chr(c) for c in range(0x1780, 0x17A3)]
KHMER_VOWELS = [chr(c) for c in range(0x17B6, 0x17C6)]


def _random_text(rng: np.random.Generator) -> str:
    words = []
    for _ in range(rng.integers(1, 3)):
        syl = []
        for _ in range(rng.integers(1, 4)):
            s = KHMER_CONSONANTS[rng.integers(len(KHMER_CONSONANTS))]
            if rng.random() < 0.6:
                s += KHMER_VOWELS[rng.integers(len(KHMER_VOWELS))]
            syl.append(s)
        words.append("".join(syl))
    return " ".join(words)


def render_batch(rng: np.random.Generator, n: int, width: int, char2idx: Mapping[str, int]) -> tuple[Any, Any, Any, list[str]]:
    """``n`` shifted-domain lines: inverted, noisy, blurred; returns CTC inputs and the texts."""
    import torch
    from khmer_ocr_ocm.assets import get_khmer_font_paths
    from khmer_ocr_ocm.dataset import render_line
    from PIL import ImageFilter

    fonts = get_khmer_font_paths()
    imgs, targets, lengths, texts = [], [], [], []
    for _ in range(n):
        text = _random_text(rng)
        img = render_line(text, fonts[rng.integers(len(fonts))], font_size=int(rng.integers(26, 38)),
                          target_height=48, target_width=width)
        img = img.convert("L").filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = 1.0 - a  # white text on black: the shift
        a = np.clip(a * rng.uniform(0.6, 1.0) + rng.normal(0, 0.08, a.shape), 0, 1)
        imgs.append((a - 0.5) / 0.5)
        enc = [char2idx[c] for c in text if c in char2idx]
        targets += enc
        lengths.append(len(enc))
        texts.append("".join(c for c in text if c in char2idx))
    x = torch.tensor(np.stack(imgs)[:, None], dtype=torch.float32)
    return x, torch.tensor(targets, dtype=torch.long), torch.tensor(lengths, dtype=torch.long), texts


def _evaluate(model: Any, batch: tuple[Any, Any, Any, list[str]], idx2char: Mapping[int, str]) -> tuple[float, float]:
    import torch
    from khmer_ocr_ocm.inference import ctc_greedy_decode

    x, tg, ln, texts = batch
    model.eval()
    with torch.no_grad():
        logits = model(x)
        lp = logits.log_softmax(2)
        loss = torch.nn.functional.ctc_loss(lp, tg, torch.full((x.shape[0],), lp.shape[0], dtype=torch.long), ln,
                                            blank=0, zero_infinity=True)
        pred = ctc_greedy_decode(logits, idx2char)
    cer = sum(_edit_distance(p, t) for p, t in zip(pred, texts)) / max(1, sum(len(t) for t in texts))
    return float(loss), cer


def finetune(steps: int, batch: int, width: int, lr: float, seed: int) -> dict[str, Any]:
    """Fine-tune the bundled CRNN; return base and fine-tuned conv kernels and the eval metrics."""
    import torch
    from khmer_ocr_ocm.assets import get_vocab_path
    from khmer_ocr_ocm.inference import load_model, load_vocab

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with open(get_vocab_path(), encoding="utf-8") as f:
        char2idx = json.load(f)["char2idx"]
    idx2char = load_vocab()
    model = load_model(device="cpu")
    base = {n: p.detach().numpy().astype(np.float64).copy() for n, p in model.named_parameters() if p.ndim == 4}
    held_out = render_batch(np.random.default_rng(seed + 1), 64, width, char2idx)
    before = _evaluate(model, held_out, idx2char)
    print(f"base model on the shifted domain: CTC loss {before[0]:.3f}, CER {before[1]:.3f}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        for m in model.modules():  # BatchNorm statistics stay the pretrained ones
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        x, tg, ln, _ = render_batch(rng, batch, width, char2idx)
        lp = model(x).log_softmax(2)
        loss = torch.nn.functional.ctc_loss(lp, tg, torch.full((batch,), lp.shape[0], dtype=torch.long), ln,
                                            blank=0, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 50 == 0 or step == steps:
            print(f"  step {step:4d}  loss {float(loss):.3f}  ({time.perf_counter() - t0:.0f} s)")
    after = _evaluate(model, held_out, idx2char)
    print(f"fine-tuned: CTC loss {after[0]:.3f}, CER {after[1]:.3f}")
    tuned = {n: p.detach().numpy().astype(np.float64).copy() for n, p in model.named_parameters() if p.ndim == 4}
    return {"base": base, "tuned": tuned, "before": before, "after": after, "steps": steps, "batch": batch,
            "width": width, "lr": lr, "seconds": time.perf_counter() - t0}


def load_or_finetune(cache: str, retrain: bool, **kw: Any) -> dict[str, Any]:
    if os.path.exists(cache) and not retrain:
        z = np.load(cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        names = meta.pop("layers")
        print(f"using cached fine-tuning from {cache} ({meta['steps']} steps)")
        return {"base": {n: z[f"base/{n}"] for n in names}, "tuned": {n: z[f"tuned/{n}"] for n in names}, **meta}
    run = finetune(**kw)
    meta = {k: v for k, v in run.items() if k not in ("base", "tuned")}
    meta["layers"] = list(run["base"])
    arrays = {f"base/{n}": a for n, a in run["base"].items()} | {f"tuned/{n}": a for n, a in run["tuned"].items()}
    tmp = cache + ".tmp.npz"
    np.savez(tmp, meta=json.dumps(meta), **arrays)
    os.replace(tmp, cache)
    return run


# -- 2-3. extraction -----------------------------------------------------------------
def extract(deltas: Mapping[str, Any], lora_ranks: Sequence[int] = LORA_RANKS,
            variants: Mapping[str, tuple[str, Any]] = VARIANTS, steps: Mapping[str, int] | int = FIT_STEPS,
            min_size: int = 0) -> list[dict[str, Any]]:
    """Fit every variant at the budgets of ``LoRA(shape, r)`` for ``r`` in ``lora_ranks``.

    Parameters
    ----------
    deltas : dict of layer name to array
        ΔW per layer (any array library).
    lora_ranks : sequence of int
        Budgets, as LoRA ranks (ranks above a layer's maximum are dropped).
    variants : dict of label to (kind, constraints)
        ``constraints`` go to :func:`tucker_peft.ranks.for_budget`; a callable
        gets the layer's shape and returns them.
    steps : int or dict of kind to int
        :func:`tucker_peft.fit` steps.
    min_size : int
        Skip layers with fewer elements.

    Returns
    -------
    list of dict
        One row per (layer, budget, variant): ``layer, shape, lora_rank,
        budget, fraction`` (of the layer's size), ``kind`` (the label),
        ``spec, num_params, rel_error, init_error, seconds``.
    """
    rows = []
    for name, dw in deltas.items():
        shape = tuple(dw.shape)
        size = math.prod(shape)
        if size < min_size:
            continue
        rmax = min(shape[0], size // shape[0])
        rs = [r for r in lora_ranks if r <= rmax]
        budgets = [tp.LoRA(shape, r).num_params for r in rs]
        for label, (kind, cons) in variants.items():
            cons = cons(shape) if callable(cons) else cons
            for row in budget_sweep(dw, budgets, (kind,), steps=steps, constraints={kind: cons}):
                d = row.as_dict()
                d.update(layer=name, shape=list(shape), lora_rank=rs[budgets.index(row.budget)],
                         fraction=row.budget / size, kind=label)
                rows.append(d)
    return rows


# -- 4. reporting ------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping[str, Any]], kinds: Sequence[str] = KINDS) -> str:
    """Relative error per layer and budget, one column per kind (best in bold)."""
    out = ["| layer | shape | budget (LoRA rank) | params (% of layer) | " + " | ".join(kinds) + " |",
           "|---|---|---|---|" + "---|" * len(kinds)]
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r["layer"], r["budget"]) not in keys:
            keys.append((r["layer"], r["budget"]))
    for layer, budget in keys:
        sel = {r["kind"]: r for r in rows if r["layer"] == layer and r["budget"] == budget}
        any_row = next(iter(sel.values()))
        errs = {k: sel[k]["rel_error"] for k in kinds if k in sel and not math.isnan(sel[k]["rel_error"])}
        best = min(errs.values()) if errs else None
        cells = []
        for k in kinds:
            e = errs.get(k)
            cells.append("–" if e is None else (f"**{e:.3f}**" if e == best else f"{e:.3f}"))
        shape = "×".join(map(str, any_row["shape"]))
        out.append(f"| {layer} | {shape} | {budget} (r={any_row['lora_rank']}) | {100 * any_row['fraction']:.2f}% | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: Sequence[Mapping[str, Any]], path: str, kinds: Sequence[str] = KINDS) -> bool:
    """Relative error against budget, one panel per layer; False when matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cols = min(3, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        sel = [r for r in rows if r["layer"] == layer]
        for k, marker in zip(kinds, "osD^v<>"):
            pts = sorted((r["fraction"] * 100, r["rel_error"]) for r in sel if r["kind"] == k
                         and not math.isnan(r["rel_error"]))
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=k, ms=4)
        ax.set_xscale("log")
        ticks = sorted({r["fraction"] * 100 for r in sel})
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{layer} {'×'.join(map(str, sel[0]['shape']))}", fontsize=9)
        ax.set_xlabel("budget (% of the layer's parameters)", fontsize=8)
        ax.set_ylabel("‖ΔW − fit‖ / ‖ΔW‖", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=128, help="rendered line width (the model takes any)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, nargs="+", default=list(LORA_RANKS), help="budgets as LoRA ranks")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tucker_peft_crnn_finetune.npz"))
    ap.add_argument("--retrain", action="store_true", help="ignore the cache")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "assets"), help="folder for the table, JSON, plot")
    args = ap.parse_args(argv)

    run = load_or_finetune(args.cache, args.retrain, steps=args.steps, batch=args.batch, width=args.width,
                           lr=args.lr, seed=args.seed)
    deltas = {n.replace(".weight", ""): run["tuned"][n] - run["base"][n] for n in run["base"]}
    for n, d in deltas.items():
        base = run["base"][n + ".weight"]
        print(f"{n:8s} {str(d.shape):18s} ‖ΔW‖/‖W‖ = {np.linalg.norm(d) / np.linalg.norm(base):.4f}")
    t0 = time.perf_counter()
    rows = extract(deltas, args.ranks, min_size=10_000)
    print(f"fitted {len(rows)} (layer, budget, kind) cases in {time.perf_counter() - t0:.0f} s")
    table = markdown_table(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    meta = {k: run[k] for k in ("steps", "batch", "width", "lr", "before", "after")}
    for name, text in (("extract_crnn.json", json.dumps({"finetune": meta, "rows": rows}, indent=1)),
                       ("extract_crnn_table.md", table + "\n")):
        p = os.path.join(args.out, name)
        with open(p + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(p + ".tmp", p)
    png = os.path.join(args.out, "extract_crnn.png")
    print(f"plot: {png}" if plot(rows, png) else "matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
