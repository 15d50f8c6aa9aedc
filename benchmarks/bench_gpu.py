#!/usr/bin/env python
"""GPU timings: CuPy against torch on CUDA for reconstruct, vjp and fit.

Both libraries run the same tucker_peft code (the core dispatches on the
arrays). For the vjp, torch is also timed with autograd through the
reconstruction, the way a torch user would get the gradients. Each
repetition runs every backend once, in rotating order, after a synchronise;
the table reports medians and ``torch / cupy`` (above 1: CuPy is faster).

Run from the repository root::

    python benchmarks/bench_gpu.py              # on a GPU machine (about a minute)
    python benchmarks/bench_gpu.py --quick      # small shapes, few repetitions
    python benchmarks/bench_gpu.py --cpu        # the same harness on NumPy vs torch-CPU (CI smoke)

Without a GPU (and without ``--cpu``) it prints ``no GPU: skipped`` and exits 0.
With ``--json PATH`` (default ``$OUT/bench_gpu.json`` when ``OUT`` is set) the
rows are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the checkout, installed or not

import numpy as np  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft import ranks  # noqa: E402
from tucker_peft.fitting import fit  # noqa: E402

FULL_SHAPES = [((256, 256, 3, 3), (32, 32, 3, 3)), ((1024, 512, 3, 3, 3), (64, 64, 3, 3, 3))]
QUICK_SHAPES = [((32, 32, 3, 3), (8, 8, 3, 3)), ((64, 32, 3, 3, 3), (8, 8, 3, 3, 3))]
CPU_SHAPES = [((16, 12, 3, 3), (4, 4, 3, 3)), ((16, 8, 3, 3, 3), (4, 4, 3, 3, 3))]  # --cpu: a smoke run
SKIP_MESSAGE = "no GPU: skipped"


@dataclass
class Backend:
    name: str
    asarray: Callable[[np.ndarray], Any]
    sync: Callable[[], None]
    torch: bool


def _cupy_backend(dtype: str) -> Backend | None:
    from tucker_peft.backends.cupy import gpu_available

    if not gpu_available():
        return None
    import cupy

    dev = cupy.cuda.Device()
    return Backend("cupy", lambda a: cupy.asarray(a, dtype=dtype), dev.synchronize, False)


def _torch_backend(dtype: str, device: str) -> Backend | None:
    try:
        import torch
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Backend(f"torch-{device}", lambda a: torch.as_tensor(a, dtype=dt, device=device), sync, True)


def _numpy_backend(dtype: str) -> Backend:
    return Backend("numpy", lambda a: np.asarray(a, dtype=dtype), lambda: None, False)


def backends(cpu: bool, dtype: str) -> list[Backend]:
    if cpu:
        found = [_numpy_backend(dtype), _torch_backend(dtype, "cpu")]
    else:
        found = [_cupy_backend(dtype), _torch_backend(dtype, "cuda")]
    return [b for b in found if b is not None]


def timed(fns: dict[str, Callable[[], Any]], syncs: dict[str, Callable[[], None]], reps: int,
          warmup: int = 1) -> dict[str, float]:
    """Median seconds per function; each repetition runs all of them in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
            syncs[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(reps):
        for k in names[i % len(names):] + names[: i % len(names)]:
            syncs[k]()
            t0 = time.perf_counter()
            fns[k]()
            syncs[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _to_np(a: Any) -> np.ndarray:
    from tucker_peft._namespace import to_numpy

    return np.asarray(to_numpy(a), dtype=np.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def bench_shape(bks: list[Backend], shape: tuple[int, ...], rk: tuple[int, ...], reps: int, fit_reps: int,
                fit_steps: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    spec = tp.Tucker(shape, rk)
    cp_spec = ranks.match(spec, "cp")
    host = {k: rng.standard_normal(s) for k, s in spec.param_shapes.items()}
    ct_host = rng.standard_normal(shape)
    # Low-rank plus noise of half its norm: far enough from the optimum that Adam's
    # steps follow the gradient, not rounding noise, so the backends agree.
    low = np.asarray(spec.reconstruct(host))
    target_host = low + 0.5 * np.linalg.norm(low) / np.linalg.norm(ct_host) * ct_host
    data = {b.name: ({k: b.asarray(v) for k, v in host.items()}, b.asarray(ct_host), b.asarray(target_host))
            for b in bks}
    syncs = {b.name: b.sync for b in bks}
    rows: list[dict[str, Any]] = []
    check: dict[str, dict[str, Any]] = {b.name: {} for b in bks}

    def run(op: str, make: Callable[[Backend], Callable[[], Any] | None], r: int, extra: str = "") -> None:
        fns = {}
        for b in bks:
            f = make(b)
            if f is not None:
                fns[b.name + extra] = f
        if not fns:
            return
        for b in bks:
            if b.name + extra in fns:
                check[b.name][op + extra] = fns[b.name + extra]()
        sy = {k: syncs[k.split("+")[0]] for k in fns}
        med = timed(fns, sy, r)
        for k, v in med.items():
            rows.append({"shape": list(shape), "op": op + (" (autograd)" if extra else ""), "backend": k.split("+")[0],
                         "ms": v * 1e3})

    run("reconstruct", lambda b: (lambda: spec.reconstruct(data[b.name][0], 2.0)), reps)
    run("vjp", lambda b: (lambda: spec.vjp(data[b.name][0], data[b.name][1], 2.0)), reps)

    def autograd(b: Backend) -> Callable[[], Any] | None:
        if not b.torch:
            return None
        import torch

        params = {k: v.clone().requires_grad_(True) for k, v in data[b.name][0].items()}

        def f() -> Any:
            out = spec.reconstruct(params, 2.0)
            return dict(zip(params, torch.autograd.grad(out, list(params.values()), data[b.name][1])))

        return f

    run("vjp", autograd, reps, extra="+autograd")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(f"fit tucker als x{fit_steps}", lambda b: (lambda: fit(spec, data[b.name][2], steps=fit_steps)), fit_reps)
        run(f"fit {cp_spec.rank}-cp als x{fit_steps}",
            lambda b: (lambda: fit(cp_spec, data[b.name][2], steps=fit_steps, init="random", seed=0)), fit_reps)
        run(f"fit tucker adam x{4 * fit_steps}",
            lambda b: (lambda: fit(spec, data[b.name][2], steps=4 * fit_steps, method="adam")), fit_reps)

    # Agreement between the backends (same code, same data): relative differences.
    if len(bks) == 2:
        a, b = (check[x.name] for x in bks)
        diffs = {}
        for op in a:
            if op in b:
                x, y = a[op], b[op]
                if isinstance(x, dict):
                    diffs[op] = max(_rel(_to_np(x[k]), _to_np(y[k])) for k in x)
                elif hasattr(x, "rel_errors"):
                    diffs[op] = abs(x.final_error - y.final_error)
                else:
                    diffs[op] = _rel(_to_np(x), _to_np(y))
        for op, d in diffs.items():
            rows.append({"shape": list(shape), "op": op, "backend": "agreement", "ms": None, "diff": d})
    return rows


def table(rows: list[dict[str, Any]], bks: list[Backend]) -> str:
    names = [b.name for b in bks]
    head = f"{'shape':<22} {'op':<26} " + " ".join(f"{n + ' ms':>14}" for n in names)
    if len(names) == 2:
        head += f" {names[1] + '/' + names[0]:>20} {'agreement':>10}"
    lines = [head, "-" * len(head)]
    keys: list[tuple[str, str]] = []
    for r in rows:
        k = (str(tuple(r["shape"])), r["op"])
        if r["backend"] != "agreement" and k not in keys:
            keys.append(k)
    for shape, op in keys:
        ms = {r["backend"]: r["ms"] for r in rows if str(tuple(r["shape"])) == shape and r["op"] == op}
        diff = next((r["diff"] for r in rows if r["backend"] == "agreement" and str(tuple(r["shape"])) == shape
                     and r["op"] == op.replace(" (autograd)", "+autograd")), None)
        cells = " ".join(f"{ms[n]:14.3f}" if n in ms else f"{'-':>14}" for n in names)
        line = f"{shape:<22} {op:<26} {cells}"
        if len(names) == 2:
            ratio = ms[names[1]] / ms[names[0]] if all(n in ms for n in names) else None
            line += f" {ratio:20.2f}" if ratio is not None else f" {'-':>20}"
            line += f" {diff:10.1e}" if diff is not None else f" {'-':>10}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    ap.add_argument("--cpu", action="store_true", help="NumPy vs torch-CPU instead of CuPy vs torch-CUDA")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 20, quick 3)")
    ap.add_argument("--json", default=None, help="also write the rows here (default $OUT/bench_gpu.json)")
    args = ap.parse_args(argv)

    bks = backends(args.cpu, args.dtype)
    if not args.cpu and not bks:
        print(SKIP_MESSAGE)
        return 0
    if not bks:
        print("no backend available")
        return 1
    shapes = CPU_SHAPES if args.cpu else QUICK_SHAPES if args.quick else FULL_SHAPES
    reps = args.reps or (3 if args.quick or args.cpu else 20)
    fit_reps = max(1, reps // 4)
    fit_steps = 2 if args.quick or args.cpu else 5
    print(f"# bench_gpu: {', '.join(b.name for b in bks)}; dtype {args.dtype}; reps {reps} (fits {fit_reps}); "
          f"python {platform.python_version()}, numpy {np.__version__}")
    for b in bks:
        if b.name == "cupy":
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            print(f"# cupy {cupy.__version__} on {props['name'].decode(errors='replace')}")
        if b.torch:
            import torch

            dev = torch.cuda.get_device_name() if b.name.endswith("cuda") else platform.processor() or "cpu"
            print(f"# torch {torch.__version__} on {dev}")
    rows: list[dict[str, Any]] = []
    for shape, rk in shapes:
        rows += bench_shape(bks, shape, rk, reps, fit_reps, fit_steps)
    print(table(rows, bks))
    out = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump({"backends": [b.name for b in bks], "dtype": args.dtype, "rows": rows}, f, indent=1)
        os.replace(out + ".tmp", out)
        print(f"# rows written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
