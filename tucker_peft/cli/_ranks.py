"""``tucker-peft ranks``: which spec of each kind every tensor gets at one budget.

Also the helpers shared by the other subcommands: argument types, the rule
that picks the adaptable tensors, the budget/match/energy rule that picks a
spec, table formatting and progress bars.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from . import UsageError, printable

NAME = "ranks"
HELP = "per tensor: the ranks and parameter count of each kind at one budget"

#: The kinds ``ranks`` shows by default, in display order (any registered kind or 'module:Class' is accepted).
KINDS = ("tucker", "tucker2", "cp", "lora")
#: Default name rule of adaptable tensors.
DEFAULT_INCLUDE = r"weight$"

SELECTION_RULE = f"""\
Adaptable tensors: floating point, 2 to 12 dimensions (none of size 0), and
a name matching --include (a Python regex searched anywhere in the name;
default {DEFAULT_INCLUDE!r}: names ending in 'weight') and not matching
--exclude. That takes linear weights (out, in), embeddings (vocab, dim) and
conv kernels (out, in/groups, k1, ..., kd) and leaves out biases, norms and
buffers. For stacked expert weights stored without a 'weight' suffix pass
e.g. --include 'weight$|experts'."""

RULE_HELP = """\
Spec rule (per tensor, one of):
  --budget N        each kind's largest spec with at most N parameters
                    (tucker_peft.ranks.for_budget, default constraints).
  --match KIND:R    the budget of KIND at rank R on that tensor, e.g. lora:8:
                    R is clipped to the largest rank KIND allows on the shape
                    (LoRA: min(out, in*k...); CP: numel / max dim; Tucker: per mode)."""

DESCRIPTION = f"""\
For every adaptable tensor of a checkpoint, print its shape and, for each kind,
the ranks and parameter count of the spec that the budget allows. Reads only
the checkpoint headers.

MODEL_OR_CHECKPOINT: a .safetensors file, a directory holding model.safetensors
or a *.safetensors.index.json (sharded), the index file itself, or a model
name known to the registry.

{RULE_HELP}
A kind whose smallest spec exceeds the budget shows '-' with the parameters
it would need; the other kinds and tensors go on.

{SELECTION_RULE}

Ranks column: one rank per mode for tucker/tucker2 ('*' = mode left
unfactorised, full size, no factor), R for cp and r for lora."""


# -- argument types ------------------------------------------------------------------

def positive_int(text: str) -> int:
    """An int >= 1 (underscores allowed: 1_000_000)."""
    try:
        v = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """An int >= 0 (a seed)."""
    try:
        v = int(text.strip(), 10)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


def kind_name(text: str) -> str:
    """A registered kind's name (lower case), or a ``'module:Class'`` reference that imports."""
    from tucker_peft._base import kinds, lookup
    from tucker_peft._errors import TuckerPeftError

    k = text.strip()
    if k.lower() in kinds():
        return k.lower()
    if ":" in k:
        try:
            lookup(k)
        except TuckerPeftError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return k
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(kinds())} or 'module:Class', got {text!r}")


def kind_list(text: str) -> tuple[str, ...]:
    """Comma-separated kinds, each once."""
    out: list[str] = []
    for part in text.split(","):
        k = kind_name(part)
        if k not in out:
            out.append(k)
    return tuple(out)


def match_arg(text: str) -> tuple[str, int]:
    """``KIND:R``, e.g. ``lora:8`` (KIND may itself be ``module:Class``)."""
    kind, sep, r = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND:RANK such as lora:8, got {text!r}")
    try:
        rank = positive_int(r)
        k = kind_name(kind)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected KIND:RANK such as lora:8 ({exc}), got {text!r}") from None
    return k, rank


def energy_arg(text: str) -> tuple[float | None, ...]:
    """One fraction in (0, 1], or a comma list per mode where ``none`` leaves a mode unfactorised."""
    out: list[float | None] = []
    for part in text.split(","):
        p = part.strip().lower()
        if p in ("none", "null", "-"):
            out.append(None)
            continue
        try:
            e = float(p)
        except ValueError:
            e = math.nan
        if not 0 < e <= 1:
            raise argparse.ArgumentTypeError(f"expected fractions in (0, 1] or 'none', comma-separated, got {text!r}")
        out.append(e)
    if all(e is None for e in out):
        raise argparse.ArgumentTypeError(f"expected at least one fraction in (0, 1], got {text!r}")
    return tuple(out)


def regex_arg(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"expected a Python regular expression, got {text!r} ({exc})") from None


def add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", type=regex_arg, default=re.compile(DEFAULT_INCLUDE), metavar="REGEX",
                   help=f"adapt tensors whose name matches (re.search; default {DEFAULT_INCLUDE!r})")
    p.add_argument("--exclude", type=regex_arg, default=None, metavar="REGEX",
                   help="skip tensors whose name matches (re.search)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no notes on stderr (progress bars also stay off when stderr is not a terminal)")


# -- the spec rule -------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How a spec is chosen per tensor: exactly one of ``budget``, ``match``, ``energy``."""

    budget: int | None = None
    match: tuple[str, int] | None = None
    energy: tuple[float | None, ...] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Rule":
        return cls(budget=getattr(args, "budget", None), match=getattr(args, "match", None),
                   energy=getattr(args, "energy", None))

    def describe(self) -> str:
        if self.budget is not None:
            return f"budget {self.budget:,} params per tensor"
        if self.match is not None:
            return f"budget of {self.match[0]}:{self.match[1]} per tensor"
        assert self.energy is not None
        return "energy " + ",".join("none" if e is None else f"{e:g}" for e in self.energy)

    def as_json(self) -> dict[str, Any]:
        if self.budget is not None:
            return {"budget": self.budget}
        if self.match is not None:
            return {"match": {"kind": self.match[0], "rank": self.match[1]}}
        return {"energy": list(self.energy or ())}


class NoSpec(Exception):
    """No spec of the kind fits the rule on this tensor; ``str`` is the reason."""


def reference_spec(kind: str, shape: tuple[int, ...], rank: int) -> Any:
    """``kind`` at ``rank`` on ``shape``, the rank clipped to what the kind allows there (its ``for_ranks``)."""
    from tucker_peft._base import lookup

    return lookup(kind).for_ranks(shape, rank)


def min_params(kind: str, shape: tuple[int, ...]) -> int:
    """Parameters of the smallest spec of ``kind`` that :func:`tucker_peft.ranks.for_budget` considers."""
    from tucker_peft._base import lookup

    family, _ = getattr(lookup(kind), "budget_family")(tuple(shape))
    return int(family(1).num_params)


def energy_per_mode(energy: Sequence[float | None], ndim: int) -> list[float | None]:
    """Entry ``n`` for mode ``n``; the last entry repeats for the remaining modes."""
    return [energy[min(n, len(energy) - 1)] for n in range(ndim)]


def energy_spec(kind: str, shape: tuple[int, ...], energy: Sequence[float | None], tensor: Any = None) -> Any:
    """The spec of ``kind`` that the energy rule picks on ``tensor`` (the kind's ``for_energy``).

    Without ``tensor`` every rank the kind asks for is 1: a check, before any
    tensor is read, that the kind accepts ``energy`` on ``shape``.

    Raises
    ------
    tucker_peft.RankError
        The kind needs an energy that is 'none'.
    """
    from tucker_peft._base import lookup
    from tucker_peft.ranks import by_energy

    shape = tuple(int(d) for d in shape)

    def rank_of(n: int, e: float) -> int:
        if tensor is None:
            return 1
        r = by_energy(tensor, [e if m == n else None for m in range(len(shape))])[n]
        assert r is not None
        return r

    return lookup(kind).for_energy(shape, energy_per_mode(energy, len(shape)), rank_of)


def spec_for(kind: str, shape: tuple[int, ...], rule: Rule, tensor: Any = None) -> Any:
    """The spec of ``kind`` on ``shape`` that ``rule`` picks (``tensor`` is needed for energy).

    Raises
    ------
    NoSpec
        The budget is below the kind's smallest spec, or the kind needs an
        energy that is 'none'.
    """
    import tucker_peft as tp

    shape = tuple(int(d) for d in shape)
    if rule.energy is not None:
        if tensor is None:
            raise ValueError("energy rule needs the tensor")
        try:
            return energy_spec(kind, shape, rule.energy, tensor)
        except tp.RankError as exc:
            raise NoSpec(str(exc)) from None
    if rule.budget is not None:
        budget, what = rule.budget, f"budget {rule.budget:,}"
    else:
        assert rule.match is not None
        ref = reference_spec(rule.match[0], shape, rule.match[1])
        budget, what = ref.num_params, f"{rule.match[0]}:{rule.match[1]} costs {ref.num_params:,}"
    try:
        return tp.ranks.for_budget(kind, shape, budget)
    except tp.RankError:
        raise NoSpec(f"needs >= {min_params(kind, shape):,} params, {what}") from None


# -- selection -------------------------------------------------------------------------

def not_adaptable(name: str, shape: Sequence[int], dtype: str, include: re.Pattern[str],
                  exclude: re.Pattern[str] | None) -> str | None:
    """Why a tensor is not adaptable, or None when it is."""
    from tucker_peft._base import MAX_MODES

    from ._checkpoint import FLOAT_DTYPES

    if len(shape) < 2:
        return f"ndim {len(shape)} < 2"
    if len(shape) > MAX_MODES:
        return f"ndim {len(shape)} > {MAX_MODES}, the most modes a spec takes by default"
    if 0 in tuple(shape):
        return "has a dimension of size 0"
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not floating point"
    if not include.search(name):
        return f"name does not match --include {include.pattern!r}"
    if exclude is not None and exclude.search(name):
        return f"name matches --exclude {exclude.pattern!r}"
    return None


def select(ck: Any, include: re.Pattern[str], exclude: re.Pattern[str] | None) -> tuple[list[str], dict[str, str]]:
    """``(adaptable names in checkpoint order, {other name: reason})``."""
    keep: list[str] = []
    other: dict[str, str] = {}
    for name in ck.keys():
        why = not_adaptable(name, ck.shape(name), ck.dtype(name), include, exclude)
        if why is None:
            keep.append(name)
        else:
            other[name] = why
    return keep, other


def open_source(arg: str, what: str) -> Any:
    """A checkpoint for a command-line argument; a bad one is a usage error (exit 2)."""
    from tucker_peft import TuckerPeftError

    from ._checkpoint import resolve_source

    try:
        return resolve_source(arg)
    except TuckerPeftError as exc:  # unreadable checkpoint, unknown model, or a model whose package is missing
        raise UsageError(f"{what}: {exc}") from None


# -- output ----------------------------------------------------------------------------

def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def ranks_str(spec: Any) -> str:
    """The spec's ranks as the kind shows them (``describe_ranks``)."""
    return spec.describe_ranks()


def spec_json(spec: Any) -> dict[str, Any]:
    from tucker_peft.adapter import spec_to_json

    return json.loads(spec_to_json(spec))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> list[str]:
    """Aligned text lines: header, rule, rows (columns in ``right`` right-aligned)."""
    body = [[printable(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body if i < len(r)]) for i, h in enumerate(headers)]
    rset = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in rset else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in body]


class Progress:
    """A tqdm bar on stderr (off when quiet, when stderr is no terminal, or without tqdm); ``note`` prints beside it."""

    def __init__(self, items: Sequence[Any], desc: str, quiet: bool, unit: str = "tensor") -> None:
        self.items, self.quiet = items, quiet
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=len(items), desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                                leave=False)

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            if self.bar is not None:
                self.bar.set_postfix_str(printable(item)[-40:], refresh=False)
            yield item
            if self.bar is not None:
                self.bar.update(1)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def note(self, msg: str) -> None:
        if self.quiet:
            return
        msg = printable(msg)
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.3g}%" if whole else "-"


# -- the subcommand --------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="checkpoint path (.safetensors, sharded index .json, or a directory) or model name")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=positive_int, metavar="N", help="largest parameter count per tensor")
    g.add_argument("--match", type=match_arg, metavar="KIND:R",
                   help="per tensor, the parameter count of KIND at rank R (e.g. lora:8; R clipped to the shape)")
    p.add_argument("--kinds", type=kind_list, default=KINDS, metavar="K1,K2",
                   help=f"kinds to show (default {','.join(KINDS)})")
    add_selection_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_quiet_arg(p)


def plan(ck: Any, names: Sequence[str], kinds: Sequence[str], rule: Rule, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Per tensor: shape, dtype, numel and, per kind, the spec (or the reason there is none)."""
    rows = []
    for name in (progress if progress is not None else names):
        shape = tuple(int(d) for d in ck.shape(name))
        numel = math.prod(shape)
        specs: dict[str, Any] = {}
        for kind in kinds:
            try:
                spec = spec_for(kind, shape, rule)
            except NoSpec as exc:
                specs[kind] = {"spec": None, "reason": str(exc)}
                continue
            specs[kind] = {"spec": spec_json(spec), "ranks": ranks_str(spec), "num_params": spec.num_params,
                           "fraction": spec.num_params / numel}
        rows.append({"name": name, "shape": list(shape), "dtype": ck.dtype(name), "numel": numel, "specs": specs})
    return rows


def run(args: argparse.Namespace) -> int:
    from tucker_peft import TuckerPeftError

    ck = open_source(args.model, "MODEL_OR_CHECKPOINT")
    rule = Rule.from_args(args)
    names, other = select(ck, args.include, args.exclude)
    if not names:
        raise TuckerPeftError(f"{args.model}: no adaptable tensors among its {len(ck)} "
                              f"(rule: 2 <= ndim <= 12, floating, name matching {args.include.pattern!r}"
                              + (f", not {args.exclude.pattern!r}" if args.exclude else "") + ")")
    rows = plan(ck, names, args.kinds, rule, Progress(names, "ranks", args.quiet))
    total_numel = sum(r["numel"] for r in rows)
    totals = {k: sum(r["specs"][k].get("num_params", 0) for r in rows) for k in args.kinds}
    missing = {k: sum(r["specs"][k]["spec"] is None for r in rows) for k in args.kinds}
    if args.json:
        json.dump({"source": str(args.model), "rule": rule.as_json(), "kinds": list(args.kinds), "tensors": rows,
                   "not_adaptable": [{"name": n, "reason": why} for n, why in other.items()],
                   "totals": {"numel": total_numel, **{k: {"num_params": v, "tensors_without_spec": missing[k]}
                                                       for k, v in totals.items()}}},
                  sys.stdout, indent=1)
        print()
        return 0
    headers = ["tensor", "shape", "numel"]
    for k in args.kinds:
        headers += [k, "params"]
    body = []
    for r in rows:
        cells = [r["name"], shape_str(r["shape"]), f"{r['numel']:,}"]
        for k in args.kinds:
            s = r["specs"][k]
            if s["spec"] is None:
                cells += ["-", "-"]
            else:
                cells += [s["ranks"], f"{s['num_params']:,}"]
        body.append(cells)
    foot = ["total", "", f"{total_numel:,}"]
    for k in args.kinds:
        foot += ["", f"{totals[k]:,}"]
    right = {2} | {4 + 2 * i for i in range(len(args.kinds))}
    lines = table(headers, body + [foot], right)
    lines.insert(len(lines) - 1, lines[1])  # a rule above the total
    print("\n".join(lines))
    print()
    for r in rows:
        for k in args.kinds:
            s = r["specs"][k]
            if s["spec"] is None:
                print(printable(f"- {r['name']} {k}: {s['reason']}"))
    share = ", ".join(f"{k} {totals[k]:,} ({pct(totals[k], total_numel)})" for k in args.kinds)
    print(f"{len(rows)} of {len(ck)} tensors adaptable ({len(other)} not: ndim < 2 or > 12, not floating, or name not "
          f"matching {args.include.pattern!r}{' or matching ' + repr(args.exclude.pattern) if args.exclude else ''}); "
          f"{rule.describe()}; '*' = mode unfactorised. Totals: {share} of {total_numel:,} weights.")
    return 0
