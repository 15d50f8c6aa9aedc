"""``tucker-peft extract``: an adapter fitted to ``tuned − base``, one layer at a time.

For every adaptable tensor present in both checkpoints with the same shape,
dW = tuned − base is formed in float64 (float32 above ``--compute-dtype``'s
threshold), a spec is chosen by the rule (``--budget``, ``--match`` or
``--energy``), the spec is fitted to dW (HOSVD / truncated SVD / CP-ALS, or
``fit(method='als')``), and the relative error of the *saved* params is
measured. Only one layer is in memory at a time.

The adapter directory holds ``tucker_peft_adapter.safetensors`` (the
package's one adapter format, :mod:`tucker_peft._format`, read by the torch
binding's ``load_adapter``) and ``extract_report.json``, each written
atomically through the package's one writer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np

from . import UsageError, printable
from ._ranks import (
    KINDS,
    RULE_HELP,
    SELECTION_RULE,
    NoSpec,
    Progress,
    Rule,
    add_quiet_arg,
    add_selection_args,
    energy_arg,
    energy_spec,
    kind_name,
    match_arg,
    nonneg_int,
    open_source,
    pct,
    positive_int,
    ranks_str,
    select,
    shape_str,
    spec_for,
    spec_json,
    table,
)

NAME = "extract"
HELP = "fit a Tucker/CP/LoRA adapter to the difference of a fine-tuned and a base checkpoint"

REPORT_FORMAT = "tucker_peft.extract_report/1"
REPORT_FILE = "extract_report.json"

#: --compute-dtype auto: float64 up to this many elements, float32 above (2 GiB of float64).
AUTO_FLOAT64_MAX_NUMEL = 2**28

DESCRIPTION = f"""\
For every adaptable tensor present in BASE and TUNED with the same shape:
dW = TUNED - BASE (float64; float32 above {AUTO_FLOAT64_MAX_NUMEL:,} elements with
--compute-dtype auto), a spec of --kind chosen per tensor, fitted to dW, and
the relative error |dW - fit| / |dW| of the saved params reported. Tensors whose
dW is exactly zero, or where the budget is below the kind's smallest spec, are
skipped and reported; so are tensors missing from one side or of another shape.
One layer is held in memory at a time.

BASE, TUNED: a .safetensors file, a directory holding model.safetensors or a
*.safetensors.index.json (sharded), the index file itself, or a model name
known to the registry.

{RULE_HELP}
  --energy E        the smallest ranks keeping a fraction E of dW's energy, as
                    the kind reads it (its for_energy): tucker per mode and
                    tucker2 on the channel modes (tucker_peft.ranks.by_energy on
                    each unfolding); every other built-in kind takes the
                    smallest rank r whose leading r singular values of the
                    mode-0 unfolding (out, rest) keep E (exact for lora; for
                    the others a heuristic, their rank r cannot always reach
                    it). E may be a comma list per mode,
                    'none' leaving a mode unfactorised; the last entry repeats
                    for the remaining modes (0.9,0.9,none: Tucker-2 on a conv).
A tensor whose budget is below the kind's smallest spec is skipped and reported.

Fit (--method): hosvd (default) = the kind's principal decomposition: HOSVD for
tucker/tucker2, truncated SVD for lora (the optimum), CP-ALS (tensorly, 100
iterations) for cp, the kind's principal_init for others; als = that start
followed by --steps ALS sweeps (tucker_peft.fit(method='als')).

{SELECTION_RULE}

Output directory (-o): tucker_peft_adapter.safetensors (keys
'<tensor name>::<param>', e.g. 'features.0.weight::core'; scale 1.0, so
W_tuned ~ W_base + reconstruct(params); the adapter config in its metadata)
and extract_report.json, each written atomically. An existing non-empty
directory is refused; with --force it is accepted only when it already holds
a tucker_peft adapter (tucker_peft_adapter.safetensors), and then only that
adapter and extract_report.json are replaced: no other file is touched. The
output may not be, be inside, or contain BASE or TUNED."""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="the base checkpoint (path or model name)")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned checkpoint (path or model name)")
    p.add_argument("--kind", type=kind_name, required=True, metavar="KIND",
                   help="the parametrisation to extract: a registered kind (" + ",".join(KINDS) + ", ...) or "
                        "'module:Class' naming a Parametrization subclass")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=positive_int, metavar="N", help="largest parameter count per tensor")
    g.add_argument("--match", type=match_arg, metavar="KIND:R",
                   help="per tensor, the parameter count of KIND at rank R (e.g. lora:8)")
    g.add_argument("--energy", type=energy_arg, metavar="E",
                   help="keep this fraction of dW's energy (0 < E <= 1; or one per mode, 'none' = unfactorised)")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR", help="directory to write")
    add_selection_args(p)
    p.add_argument("--method", choices=("hosvd", "als"), default="hosvd",
                   help="hosvd (default): closed-form decomposition; als: then --steps ALS sweeps")
    p.add_argument("--steps", type=positive_int, default=10, metavar="N", help="ALS sweeps for --method als (default 10)")
    p.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32",
                   help="dtype of the saved params (default float32)")
    p.add_argument("--compute-dtype", choices=("auto", "float64", "float32"), default="auto",
                   help=f"dtype of dW and the fit (auto: float64 up to {AUTO_FLOAT64_MAX_NUMEL:,} elements, else float32)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random parts (CP-ALS start), an int >= 0; default 0")
    p.add_argument("--force", action="store_true",
                   help="replace the adapter in ADAPTER_DIR if it already holds one written by tucker-peft")
    add_quiet_arg(p)


# -- output directory ------------------------------------------------------------------

def _input_paths(sources: Sequence[Any]) -> list[str]:
    """Real paths of the checkpoints' files, and the directory of a sharded one (its index's)."""
    out = []
    for src in sources:
        path = getattr(src, "path", None)
        for p in [path, *(getattr(src, "files", None) or ())]:
            if isinstance(p, (str, os.PathLike)) and os.path.exists(p):
                out.append(os.path.realpath(p))
        if isinstance(path, str) and path.endswith(".index.json") and os.path.isfile(path):
            out.append(os.path.dirname(os.path.realpath(path)))
    return out


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(path: str, force: bool, inputs: Sequence[Any] = ()) -> None:
    """Fail early (usage error) on an output path that cannot or may not be written.

    Refused: an empty path; an existing non-directory; a non-empty directory
    without ``--force``, or with it but without a tucker_peft adapter in it
    (the marker :data:`tucker_peft._format.ADAPTER_FILE`, or the version-1
    ``adapter_config.json`` of tucker_peft's format); a path that is, is
    inside, or contains a file or directory of an input checkpoint.
    """
    from tucker_peft._format import ADAPTER_FILE, adapter_marker

    if not path:
        raise UsageError("argument -o/--output: expected a directory path, got ''")
    real = os.path.realpath(path)
    for inp in _input_paths(inputs):
        if _inside(real, inp) or _inside(inp, real):
            raise UsageError(f"-o {path}: is, is inside, or contains the input checkpoint {inp}; "
                             "expected a separate directory")
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise UsageError(f"-o {path}: exists and is not a directory")
        if os.listdir(path):
            if not force:
                raise UsageError(f"-o {path}: directory exists and is not empty; pass --force to replace the "
                                 "tucker-peft adapter in it")
            if adapter_marker(path) is None:
                raise UsageError(f"-o {path}: --force only replaces a tucker-peft adapter, and this directory holds "
                                 f"none ({ADAPTER_FILE}); expected an empty or new directory")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path}: cannot create it ({probe} is not a writable directory)")


def write_output(path: str, tensors: dict[str, np.ndarray], config: dict[str, Any], report: dict[str, Any]) -> None:
    """The adapter, then the report, each replaced atomically (:mod:`tucker_peft._format`).

    Only these two files are written. A directory this call created is
    removed again when writing fails, so a failed run leaves nothing behind.
    """
    from tucker_peft._format import ADAPTER_FILE, atomic_write, write_adapter

    created = not os.path.lexists(path)
    os.makedirs(path, exist_ok=True)
    try:
        write_adapter(path, tensors, config)
        atomic_write(os.path.join(path, REPORT_FILE),
                     (json.dumps(report, indent=1, allow_nan=True) + "\n").encode("utf-8"))
    except BaseException:
        if created:
            for n in (ADAPTER_FILE, REPORT_FILE):
                try:
                    os.unlink(os.path.join(path, n))
                except OSError:
                    pass
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise


# -- one layer -------------------------------------------------------------------------

def compute_dtype_for(choice: str, numel: int) -> np.dtype:
    if choice == "auto":
        return np.dtype(np.float64 if numel <= AUTO_FLOAT64_MAX_NUMEL else np.float32)
    return np.dtype(choice)


def load_delta(base: Any, tuned: Any, name: str, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """``(tuned − base in dtype, ‖base‖)``; at most one checkpoint tensor besides dW is alive at a time."""
    b = base.get(name)
    base_norm = _norm_in_chunks(b)
    dw = np.asarray(b).astype(dtype, copy=False)
    if dw is b and not b.flags.writeable:
        dw = b.copy()
    del b
    t = tuned.get(name)
    np.subtract(t, dw, out=dw, casting="unsafe")  # dw = tuned − base, in place
    del t
    return dw, base_norm


def _sqnorm(a: np.ndarray) -> float:
    v = np.ravel(a)
    return float(np.dot(v, v))


def _norm_in_chunks(a: np.ndarray, chunk: int = 2**22) -> float:
    """‖a‖ accumulated in float64 over flat chunks (no full float64 copy of a float32 array)."""
    v = np.ravel(a)
    total = 0.0
    for i in range(0, v.size, chunk):
        c = v[i:i + chunk].astype(np.float64, copy=False)
        total += float(np.dot(c, c))
    return math.sqrt(total)


def saved_rel_error(spec: Any, saved: dict[str, np.ndarray], dw: np.ndarray, dw_norm: float) -> float:
    """‖dW − reconstruct(saved params)‖ / ‖dW‖, reconstructing in dW's dtype."""
    recon = spec.reconstruct({k: v.astype(dw.dtype, copy=False) for k, v in saved.items()}, 1.0)
    recon = np.asarray(recon)
    np.subtract(recon, dw, out=recon)
    err = _norm_in_chunks(recon)
    del recon
    return err / dw_norm


#: Sweeps of the CP fallback (ALS from a random start) when tensorly's CP-ALS fails.
CP_FALLBACK_STEPS = 100


def fit_params(spec: Any, kind: str, dw: np.ndarray, args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """``(params, note)``: the fit of ``spec`` to ``dw`` that ``--method`` asks for.

    tensorly's CP-ALS (SVD start, plain ``solve``) fails with a singular matrix
    when dW's CP rank is below the spec's; CP then falls back to
    :func:`tucker_peft.fit` ALS (pseudo-inverse normal equations) from a random
    start, and the note says so.
    """
    from tucker_peft import TuckerPeftError, fit

    try:
        if args.method == "hosvd":
            if spec.principal_init is None:
                raise TuckerPeftError(f"--method hosvd: kind {spec.kind!r} has no principal decomposition "
                                      "(principal_init); expected --method als or another kind")
            return spec.init(spec.principal_init, tensor=dw, scale=1.0, seed=args.seed), None
        return fit(spec, dw, steps=args.steps, method="als", seed=args.seed).params, None
    except np.linalg.LinAlgError as exc:
        if spec.principal_init != "parafac":  # the fallback is for tensorly's CP-ALS, not for a kind
            raise TuckerPeftError(f"decomposition of {fmt_spec(spec)} failed: {exc}") from None
        why = str(exc)
    steps = max(CP_FALLBACK_STEPS, args.steps)
    res = fit(spec, dw, steps=steps, method="als", init="random", seed=args.seed, tol=1e-10)
    return res.params, f"tensorly CP-ALS failed ({why}); CP-ALS from a random start instead ({res.steps} sweeps)"


def fmt_spec(spec: Any) -> str:
    return f"{spec.kind} {ranks_str(spec)} on {shape_str(spec.shape)}"


def extract_layer(base: Any, tuned: Any, name: str, kind: str, rule: Rule, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, Any]:
    """``(report record, saved params or None, spec or None)`` of one tensor."""
    t0 = time.perf_counter()
    shape = tuple(int(d) for d in base.shape(name))
    numel = math.prod(shape)
    rec: dict[str, Any] = {"name": name, "shape": list(shape), "numel": numel, "base_dtype": base.dtype(name),
                           "tuned_dtype": tuned.dtype(name)}
    cdt = compute_dtype_for(args.compute_dtype, numel)
    rec["compute_dtype"] = cdt.name
    dw, base_norm = load_delta(base, tuned, name, cdt)
    dw_norm = _norm_in_chunks(dw)
    rec.update(base_norm=base_norm, delta_norm=dw_norm)
    if dw_norm == 0:
        rec.update(status="zero", reason="dW is exactly zero", seconds=time.perf_counter() - t0)
        return rec, None, None
    if not math.isfinite(dw_norm):
        rec.update(status="nonfinite", reason="dW has NaN or Inf", seconds=time.perf_counter() - t0)
        return rec, None, None
    try:
        spec = spec_for(kind, shape, rule, tensor=dw)
    except NoSpec as exc:
        rec.update(status="budget_too_small", reason=str(exc), seconds=time.perf_counter() - t0)
        return rec, None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, fallback = fit_params(spec, kind, dw, args)
    if fallback:
        rec["fallback"] = fallback
    if caught:
        rec["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    out_dtype = np.dtype(args.dtype)
    saved = {k: np.ascontiguousarray(np.asarray(v), dtype=out_dtype) for k, v in params.items()}
    del params
    err = saved_rel_error(spec, saved, dw, dw_norm)
    del dw
    rec.update(status="ok", spec=spec_json(spec), ranks=ranks_str(spec), num_params=spec.num_params,
               fraction=spec.num_params / numel, rel_error=err, seconds=time.perf_counter() - t0)
    return rec, saved, spec


# -- the subcommand --------------------------------------------------------------------

def _pair_up(base: Any, tuned: Any, args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """Adaptable names present in both with one shape; and the mismatches."""
    from ._ranks import not_adaptable

    names_b, _ = select(base, args.include, args.exclude)
    names_t, _ = select(tuned, args.include, args.exclude)
    keys_b, keys_t = set(base.keys()), set(tuned.keys())
    common, problems = [], []
    for n in names_b:
        if n not in keys_t:
            problems.append({"name": n, "status": "missing_in_tuned", "reason": "not in TUNED"})
            continue
        sb, st = tuple(base.shape(n)), tuple(tuned.shape(n))
        if sb != st:
            problems.append({"name": n, "status": "shape_mismatch",
                             "reason": f"shape {shape_str(sb)} in BASE, {shape_str(st)} in TUNED"})
            continue
        why = not_adaptable(n, st, tuned.dtype(n), args.include, args.exclude)
        if why is not None:
            problems.append({"name": n, "status": "not_adaptable_in_tuned", "reason": f"in TUNED: {why}"})
            continue
        common.append(n)
    in_base = set(names_b)
    for n in names_t:
        if n not in in_base:
            problems.append({"name": n, "status": "missing_in_base",
                             "reason": "not in BASE" if n not in keys_b else "not adaptable in BASE"})
    return common, problems


def _fmt_err(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"


def run(args: argparse.Namespace) -> int:
    from tucker_peft import RankError, TuckerPeftError, __version__

    base = open_source(args.base, "BASE")
    tuned = open_source(args.tuned, "TUNED")
    check_output(args.output, args.force, (base, tuned))
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise TuckerPeftError("extract writes safetensors: pip install safetensors") from None
    rule = Rule.from_args(args)
    common, problems = _pair_up(base, tuned, args)
    if not common:
        raise TuckerPeftError(f"no adaptable tensor is in both BASE and TUNED with the same shape "
                              f"({len(problems)} mismatched; rule: 2 <= ndim <= 12, floating, name matching "
                              f"{args.include.pattern!r})")
    if rule.energy is not None:  # the kind accepts the energies on every shape, before any tensor is read
        for shape in dict.fromkeys(tuple(base.shape(n)) for n in common):
            try:
                energy_spec(args.kind, shape, rule.energy)
            except RankError as exc:
                raise UsageError(f"argument --energy: {exc}") from None

    t_start = time.perf_counter()
    records: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, Any] = {}
    bar = Progress(common, f"extract {args.kind}", args.quiet)
    for p in problems:
        bar.note(f"tucker-peft: note: skipping {p['name']}: {p['reason']}")
    try:
        for name in bar:
            rec, saved, _ = extract_layer(base, tuned, name, args.kind, rule, args)
            records.append(rec)
            if saved is None:
                bar.note(f"tucker-peft: note: skipping {name}: {rec['reason']}")
                continue
            for k, v in saved.items():
                tensors[f"{name}::{k}"] = v
            layers[name] = {"spec": rec["spec"], "scale": 1.0, "base_shape": rec["shape"], "dtype": args.dtype,
                            "module_type": None, "has_init": False}
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start

    ok = [r for r in records if r["status"] == "ok"]
    n_params = sum(r["num_params"] for r in ok)
    numel_ok = sum(r["numel"] for r in ok)
    err2 = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in ok)
    d2 = sum(r["delta_norm"] ** 2 for r in ok)
    overall = math.sqrt(err2 / d2) if d2 else math.nan
    worst = max(ok, key=lambda r: r["rel_error"], default=None)
    counts: dict[str, int] = {}
    for r in records + problems:
        if r["status"] != "ok":
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = {"tensors_extracted": len(ok), "tensors_compared": len(common), "skipped": counts,
               "num_params": n_params, "numel_adapted": numel_ok, "fraction": n_params / numel_ok if numel_ok else None,
               "overall_rel_error": overall, "max_rel_error": worst["rel_error"] if worst else None,
               "max_rel_error_tensor": worst["name"] if worst else None, "seconds": elapsed}

    # The table.
    rows = []
    for r in records:
        if r["status"] == "ok":
            rows.append([r["name"], shape_str(r["shape"]), r["ranks"], f"{r['num_params']:,}",
                         pct(r["num_params"], r["numel"]), _fmt_err(r["delta_norm"] / r["base_norm"]) if r["base_norm"] else "-",
                         _fmt_err(r["rel_error"]), f"{r['seconds']:.2f}",
                         "CP-ALS fallback: random start" if r.get("fallback") else ""])
        else:
            rows.append([r["name"], shape_str(r["shape"]), "-", "-", "-",
                         _fmt_err(r["delta_norm"] / r["base_norm"]) if r["base_norm"] and math.isfinite(r["delta_norm"]) else "-",
                         "-", f"{r['seconds']:.2f}", f"skipped: {r['reason']}"])
    for p in problems:
        rows.append([p["name"], "", "-", "-", "-", "-", "-", "", f"skipped: {p['reason']}"])
    print("\n".join(table([ "tensor", "shape", f"{args.kind} ranks", "params", "% of W", "|dW|/|W|", "rel err",
                             "s", "note"], rows, right={3, 4, 5, 6, 7})))
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items()))

    if not ok:
        raise TuckerPeftError(f"nothing to extract: no tensor has a usable dW ({skipped or 'none compared'}); "
                              f"nothing written to {args.output}")

    config = {"library_version": __version__, "adapter_name": "default",
              "config": {"kind": args.kind, "alpha": 1.0, "target_modules": None, "init": "zero", "forward": "auto",
                         "dropout": 0.0},
              "layers": layers, "trainable": []}
    report = {"format": REPORT_FORMAT, "library_version": __version__, "base": str(args.base), "tuned": str(args.tuned),
              "kind": args.kind, "rule": rule.as_json(), "method": args.method,
              "steps": args.steps if args.method == "als" else 0, "dtype": args.dtype,
              "compute_dtype": args.compute_dtype, "seed": args.seed,
              "include": args.include.pattern, "exclude": args.exclude.pattern if args.exclude else None,
              "summary": summary, "layers": records, "mismatched": problems}

    write_output(args.output, tensors, config, report)

    print(printable(f"extracted {len(ok)} of {len(common)} tensors"
          + (f" (skipped: {skipped})" if skipped else "")
          + f"; {n_params:,} params = {pct(n_params, numel_ok)} of their {numel_ok:,} weights"
          + f"; rel err {_fmt_err(overall)} overall, max {_fmt_err(summary['max_rel_error'])} ({summary['max_rel_error_tensor']})"
          + f"; {elapsed:.1f} s -> {args.output}"))
    return 0
