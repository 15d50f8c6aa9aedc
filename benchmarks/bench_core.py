#!/usr/bin/env python
"""Side-by-side benchmarks of tucker_peft's core against tensorly and naive code.

Every comparison runs in one process: the methods of a row run back to back
within each repetition (rotating which goes first). Tables give median times
and ratios ``peer / ours`` (above 1: ours is faster), each ratio the median of
the per-repetition ratios, so load that comes and goes on a shared machine
hits both sides of a pair. Targets are checked on the ratios only.

Run from the repository root::

    python benchmarks/bench_core.py              # full run (2-3 minutes on 2 cores, longer if busy)
    python benchmarks/bench_core.py --quick      # smoke run, a few seconds
    python benchmarks/bench_core.py --markdown   # tables as Markdown (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the checkout, installed or not
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import cpu_snapshot, other_cpu_share  # noqa: E402

import numpy as np  # noqa: E402
import opt_einsum  # noqa: E402
import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402

import tucker_peft as tp  # noqa: E402
from tucker_peft import _decomp  # noqa: E402  (only to count HOOI sweeps, untimed)

FULL_SHAPES = [((256, 256, 3, 3), (32, 32, 3, 3)), ((1024, 512, 3, 3, 3), (64, 64, 3, 3, 3))]
QUICK_SHAPES = [((32, 32, 3, 3), (8, 8, 3, 3)), ((64, 32, 3, 3, 3), (8, 8, 3, 3, 3))]
BIG = (1024, 512, 3, 3, 3)  # the shape the HOSVD speed target names

RECON_TARGET = 3.0  # fwd+bwd vs tensorly.tucker_to_tensor under torch
HOSVD_TARGET = 8.0  # vs tensorly numpy, shape BIG
ERR_SLACK = 1e-6  # HOSVD relative error may exceed tensorly's by at most this


# -- timing --------------------------------------------------------------------
@dataclass
class Timings:
    samples: dict[str, list[float]]  # seconds per call, one entry per repetition
    last: dict[str, Any]  # each function's last return value

    def median(self, k: str) -> float:
        return statistics.median(self.samples[k])

    def ratios(self, peer: str, ours: str) -> list[float]:
        return [p / o for p, o in zip(self.samples[peer], self.samples[ours])]

    def ratio(self, peer: str, ours: str) -> float:
        """Median over repetitions of peer/ours, each pair timed back to back."""
        return statistics.median(self.ratios(peer, ours))

    def spread(self, peer: str, ours: str) -> str:
        r = self.ratios(peer, ours)
        return f"per-repetition {min(r):.2f}-{max(r):.2f}x"


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                cold: tuple[str, ...] = (), min_sample: float = 0.005) -> Timings:
    """Time every function once per repetition, rotating which goes first.

    Fast functions loop until a sample lasts ``min_sample`` seconds; ``cold``
    names (slow peers) are neither warmed up nor looped.
    """
    names = list(fns)
    number = {k: 1 for k in names}
    last: dict[str, Any] = {}
    for k in names:
        if k in cold:
            continue
        for _ in range(warmup):
            fns[k]()
        t0 = time.perf_counter()
        last[k] = fns[k]()
        number[k] = max(1, min(100, int(min_sample / max(time.perf_counter() - t0, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            j = i % len(names)
            for k in names[j:] + names[:j]:
                f, n = fns[k], number[k]
                t0 = time.perf_counter()
                for _ in range(n):
                    r = f()
                samples[k].append((time.perf_counter() - t0) / n)
                if i == reps - 1:
                    last[k] = r
                r = None  # free it before the next method runs
    finally:
        gc.enable()
    return Timings(samples, last)


# -- output --------------------------------------------------------------------
@dataclass
class Table(_common.Table):
    left: int = 2  # method and case columns


def ms(t: float) -> str:
    return f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.2f}"


def fmt(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


@dataclass
class Check:
    name: str
    value: float
    goal: float
    ok: bool
    text: str


# -- data ----------------------------------------------------------------------
def mode_product_chain_np(core: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """core ×_0 U_0 … ×_{N-1} U_{N-1} in float64, mode by mode (reference, untimed)."""
    x = np.asarray(core, dtype=np.float64)
    for n, u in enumerate(factors):
        x = np.moveaxis(np.tensordot(np.asarray(u, dtype=np.float64), x, axes=([1], [n])), 0, n)
    return x


def rel_error(w: np.ndarray, core: Any, factors: list[Any]) -> float:
    to_np = lambda a: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    r = mode_product_chain_np(to_np(core), [to_np(u) for u in factors])
    w64 = np.asarray(w, dtype=np.float64)
    return float(np.linalg.norm((w64 - r).ravel()) / np.linalg.norm(w64.ravel()))


def synthetic_weight(shape: tuple[int, ...], ranks: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """``'gaussian'``: i.i.d. N(0,1). ``'lowrank'``: multilinear rank min(2r, I) with
    exponentially decaying core, plus 5% Gaussian noise (a trained weight's profile)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(shape).astype(np.float32)
    true = [min(2 * r, d) for r, d in zip(ranks, shape)]
    core = rng.standard_normal(true)
    for n, r in enumerate(true):
        decay = np.exp(-np.arange(r) / max(ranks[n], 1))
        core = core * decay.reshape([-1 if m == n else 1 for m in range(len(true))])
    factors = [np.linalg.qr(rng.standard_normal((d, r)))[0] for d, r in zip(shape, true)]
    low = mode_product_chain_np(core, factors)
    noise = rng.standard_normal(shape)
    w = low / np.linalg.norm(low) + 0.05 * noise / np.linalg.norm(noise)
    return (w * math.sqrt(w.size)).astype(np.float32)  # unit RMS


# -- reconstruction ------------------------------------------------------------
def naive_chain(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    x = core
    for n, u in enumerate(factors):
        x = torch.moveaxis(torch.tensordot(u, x, dims=([1], [n])), 0, n)
    return x


def bench_reconstruct(shapes, reps_for, tables, checks, quick):
    t = Table("Reconstruction, torch float32 (ms, median)",
              ["shape -> ranks", "pass", "ours", "tensorly", "naive", "tensorly/ours", "naive/ours"],
              note="ours = spec.reconstruct; tensorly = tucker_to_tensor (pytorch backend); "
                   "naive = tensordot+moveaxis per mode, modes 0..N-1. "
                   "'fwd, W+dW' also adds the result to a dense weight (what a merged layer does).")
    for shape, ranks in shapes:
        reps = reps_for(shape)
        spec = tp.Tucker(shape, ranks)
        p = spec.init("random", like=torch.zeros(1), dtype="float32", seed=0)
        names = ["core"] + [f"factor_{n}" for n in range(len(shape))]
        g = torch.Generator().manual_seed(1)
        ct = torch.randn(shape, generator=g)
        w = torch.randn(shape, generator=g)
        pg = {k: v.clone().requires_grad_() for k, v in p.items()}
        core, facs = p["core"], [p[k] for k in names[1:]]
        gcore, gfacs = pg["core"], [pg[k] for k in names[1:]]

        def clear():
            for v in pg.values():
                v.grad = None

        def fb(build):
            def run():
                clear()
                build().backward(ct)
            return run

        with tl.backend_context("pytorch"):
            ref = naive_chain(core, facs)
            for name, out in (("ours", spec.reconstruct(p)), ("tensorly", tl.tucker_to_tensor((core, facs)))):
                err = float((out - ref).abs().max() / ref.abs().max())
                assert err < 1e-4, f"{name} reconstruction disagrees with the naive chain: {err}"
            groups = {
                "fwd": {"ours": lambda: spec.reconstruct(p),
                        "tensorly": lambda: tl.tucker_to_tensor((core, facs)),
                        "naive": lambda: naive_chain(core, facs)},
                "fwd, W+dW": {"ours": lambda: w + spec.reconstruct(p),
                              "tensorly": lambda: w + tl.tucker_to_tensor((core, facs)),
                              "naive": lambda: w + naive_chain(core, facs)},
                "fwd+bwd": {"ours": fb(lambda: spec.reconstruct(pg)),
                            "tensorly": fb(lambda: tl.tucker_to_tensor((gcore, gfacs))),
                            "naive": fb(lambda: naive_chain(gcore, gfacs))},
            }
            for label, fns in groups.items():
                with torch.no_grad() if label != "fwd+bwd" else torch.enable_grad():
                    m = interleaved(fns, reps, warmup=2)
                r_tl, r_naive = m.ratio("tensorly", "ours"), m.ratio("naive", "ours")
                t.rows.append([f"{fmt(shape)} -> {fmt(ranks)}", label, ms(m.median("ours")), ms(m.median("tensorly")),
                               ms(m.median("naive")), f"{r_tl:.2f}x", f"{r_naive:.2f}x"])
                if label == "fwd+bwd":
                    checks.append(Check(f"reconstruction fwd+bwd vs tucker_to_tensor (torch), {fmt(shape)}",
                                        r_tl, RECON_TARGET, r_tl >= RECON_TARGET,
                                        f"{r_tl:.2f}x (target >= {RECON_TARGET:g}x; "
                                        f"{m.spread('tensorly', 'ours')})"))
    tables.append(t)


# -- HOSVD ---------------------------------------------------------------------
def tl_decompose(w: np.ndarray, ranks, n_iter: int):
    with tl.backend_context("numpy"):
        (core, factors), errs = tl_tucker(w, rank=list(ranks), n_iter_max=n_iter, init="svd", tol=0,
                                          return_errors=True)
    return core, factors, len(errs)


def bench_hosvd(shapes, reps_for, tables, checks, quick):
    t = Table("HOSVD, float32 (ms, median) and relative error",
              ["shape -> ranks", "weight", "ours (numpy)", "ours (torch)", "tensorly (numpy)",
               "tensorly/ours(numpy)", "err ours", "err tensorly", "err ours - tensorly"],
              note="ours = tucker_peft.hosvd (ST-HOSVD via Gram eigh); tensorly = "
                   "tucker(..., init='svd', n_iter_max=0); error = |W - rec| / |W| in float64.")
    for shape, ranks in shapes:
        for kind in ("lowrank", "gaussian"):
            w = synthetic_weight(shape, ranks, kind, seed=0)
            wt = torch.from_numpy(w)
            m = interleaved({"np": lambda: tp.hosvd(w, ranks), "torch": lambda: tp.hosvd(wt, ranks),
                             "tl": lambda: tl_decompose(w, ranks, 0)},
                            reps_for(shape, slow=True), cold=("tl",), min_sample=0.05)
            e_ours = rel_error(w, *m.last["np"])
            e_torch = rel_error(w, *m.last["torch"])
            assert abs(e_torch - e_ours) < 1e-4, (e_torch, e_ours)
            e_tl = rel_error(w, *m.last["tl"][:2])
            r = m.ratio("tl", "np")
            t.rows.append([f"{fmt(shape)} -> {fmt(ranks)}", kind, ms(m.median("np")), ms(m.median("torch")),
                           ms(m.median("tl")), f"{r:.2f}x", f"{e_ours:.7f}", f"{e_tl:.7f}", f"{e_ours - e_tl:+.1e}"])
            d = e_ours - e_tl
            checks.append(Check(f"HOSVD rel. error vs tensorly, {fmt(shape)} {kind}", d, ERR_SLACK, d <= ERR_SLACK,
                                f"{e_ours:.7f} vs {e_tl:.7f} (diff {d:+.1e}, allowed <= {ERR_SLACK:g})"))
            if shape == BIG or (quick and shape == shapes[-1][0]):
                checks.append(Check(f"HOSVD time vs tensorly numpy, {fmt(shape)} {kind}", r, HOSVD_TARGET,
                                    r >= HOSVD_TARGET, f"{r:.1f}x (target >= {HOSVD_TARGET:g}x; "
                                    f"ours {m.median('np'):.2f} s, tensorly {m.median('tl'):.2f} s; "
                                    f"{m.spread('tl', 'np')})"))
    tables.append(t)


# -- HOOI ----------------------------------------------------------------------
def count_sweeps(w, ranks, n_iter) -> int | str:
    """Sweeps tucker_peft.hooi actually ran (counts factor updates; untimed); '?' if uncountable."""
    calls = [0]
    orig = _decomp.leading_left_singular

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    _decomp.leading_left_singular = counted
    try:
        tp.hooi(w, ranks, n_iter=n_iter, tol=None)
    finally:
        _decomp.leading_left_singular = orig
    # The HOSVD start visits every factored mode; a sweep refits the ones below full rank.
    nf = sum(r is not None for r in ranks)
    nu = sum(r is not None and r < d for r, d in zip(ranks, w.shape))
    return (calls[0] - nf) // nu if calls[0] and nu else "?"


def bench_hooi(shapes, reps_for, tables, infos, quick):
    k = 1 if quick else 3
    t = Table(f"HOOI, {k} sweeps after the HOSVD start, float32 (ms, median) and relative error",
              ["shape -> ranks", "weight", "ours (numpy)", "tensorly (numpy)", "tensorly/ours",
               "sweeps ours/tensorly", "err ours", "err tensorly", "err ours - tensorly"],
              note=f"ours = tucker_peft.hooi(n_iter={k}, tol=None); tensorly = tucker(..., init='svd', "
                   f"n_iter_max={k}, tol=0).")
    for shape, ranks in shapes:
        w = synthetic_weight(shape, ranks, "lowrank", seed=0)
        m = interleaved({"ours": lambda: tp.hooi(w, ranks, n_iter=k, tol=None),
                         "tl": lambda: tl_decompose(w, ranks, k)},
                        reps_for(shape, slow=True, hooi=True), cold=("tl",), min_sample=0.05)
        e_ours = rel_error(w, *m.last["ours"])
        c, f, s_tl = m.last["tl"]
        e_tl = rel_error(w, c, f)
        s_ours = count_sweeps(w, ranks, k)
        r = m.ratio("tl", "ours")
        t.rows.append([f"{fmt(shape)} -> {fmt(ranks)}", "lowrank", ms(m.median("ours")), ms(m.median("tl")),
                       f"{r:.2f}x", f"{s_ours}/{s_tl}", f"{e_ours:.7f}", f"{e_tl:.7f}", f"{e_ours - e_tl:+.1e}"])
        infos.append(f"HOOI {fmt(shape)}: ours {r:.2f}x faster than tensorly at {k} sweeps, "
                     f"error diff {e_ours - e_tl:+.1e}")
    tables.append(t)


# -- analytic vjp --------------------------------------------------------------
def bench_vjp(shapes, reps_for, tables, infos, quick):
    t = Table("Gradients of <ct, dW>, float32 (ms, median)",
              ["shape -> ranks", "FLOPs vjp / recon", "vjp (numpy)", "vjp (torch)", "autograd fwd+bwd",
               "autograd/vjp(numpy)", "autograd/vjp(torch)"],
              note="vjp = spec.vjp (analytic, no autograd); autograd = torch "
                   "spec.reconstruct(params).backward(ct), the forward included since autograd needs it.")
    for shape, ranks in shapes:
        spec = tp.Tucker(shape, ranks)
        pn = spec.init("random", dtype="float32", seed=0)
        pt = {k: torch.from_numpy(v) for k, v in pn.items()}
        pg = {k: v.clone().requires_grad_() for k, v in pt.items()}
        ctn = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        ctt = torch.from_numpy(ctn)

        def auto():
            for v in pg.values():
                v.grad = None
            spec.reconstruct(pg).backward(ctt)

        auto()
        gn = spec.vjp(pn, ctn)
        for key, a in gn.items():
            b = pg[key].grad.numpy()
            assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), key
        m = interleaved({"np": lambda: spec.vjp(pn, ctn), "torch": lambda: spec.vjp(pt, ctt), "auto": auto},
                        reps_for(shape), warmup=2)
        c = spec.cost()
        r_np, r_t = m.ratio("auto", "np"), m.ratio("auto", "torch")
        t.rows.append([f"{fmt(shape)} -> {fmt(ranks)}", f"{c.vjp / c.reconstruct:.1f}", ms(m.median("np")),
                       ms(m.median("torch")), ms(m.median("auto")), f"{r_np:.2f}x", f"{r_t:.2f}x"])
        infos.append(f"vjp {fmt(shape)}: analytic vjp on numpy runs at {r_np:.2f}x the speed of torch autograd"
                     f" (on torch: {r_t:.2f}x)")
    tables.append(t)


# -- the new kinds vs a plain einsum of their formula ----------------------------
def kind_cases(quick: bool) -> list[tuple[str, Any, str, Callable[[dict[str, Any]], list[Any]]]]:
    """(label, spec, the formula as one einsum, params -> its operands), written here independently."""
    n, c = (96, 32) if quick else (768, 256)
    tz = {0: (4, 6, 4), 1: (4, 6, 4)} if quick else {0: (8, 12, 8), 1: (8, 12, 8)}

    def tt_ops(p):
        return [p["core_0"][0]] + [p[f"core_{k}"] for k in range(1, 5)] + [p["core_5"][..., 0]]

    def ttc_ops(p):
        return [p["core_0"][0], p["core_1"], p["core_2"], p["core_3"][..., 0]]

    def lokr_ops(p):
        return [p["w1"], p["w2_a"], p["w2_b"].reshape(p["w2_b"].shape[0], -1)]

    def lokrc_ops(p):
        return [p["w1"], p["w2"]]

    def loha_ops(shape):
        return lambda p: [p["w1_a"], p["w1_b"].reshape(-1, *shape[1:]), p["w2_a"], p["w2_b"].reshape(-1, *shape[1:])]

    conv = (c, c, 3, 3)
    return [
        ("tt", tp.TT((n, n), 8, tensorize=tz), "ia,ajb,bkc,cld,dme,en->ijklmn", tt_ops),
        ("tt", tp.TT(conv, 8), "ia,ajb,bpc,cq->ijpq", ttc_ops),
        ("lokr", tp.LoKr((n, n), 4), "ac,br,rd->abcd", lokr_ops),
        ("lokr", tp.LoKr(conv, 8), "ac,bdpq->abcdpq", lokrc_ops),
        ("loha", tp.LoHa((n, n), 8), "or,ri,os,si->oi", loha_ops((n, n))),
        ("loha", tp.LoHa(conv, 8), "or,ripq,os,sipq->oipq", loha_ops(conv)),
    ]


def bench_kinds(shapes, reps_for, tables, infos, quick):
    t = Table("New kinds vs a plain torch.einsum of the same formula, float32 (ms, median)",
              ["kind", "shape, spec", "pass", "ours", "einsum", "einsum/ours"],
              note="ours = spec.reconstruct / spec.vjp (analytic); einsum = torch.einsum of the kind's formula "
                   "written out by hand, reshaped to the weight's shape, its gradients by autograd (forward "
                   "included: autograd needs it).")
    for kind, spec, eq, ops in kind_cases(quick):
        p = spec.init("random", like=torch.zeros(1), dtype="float32", seed=0)
        ct = torch.randn(spec.shape, generator=torch.Generator().manual_seed(1))
        pg = {k: v.clone().requires_grad_() for k, v in p.items()}
        ref = torch.einsum(eq, *ops(p)).reshape(spec.shape)
        assert float((spec.reconstruct(p) - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), kind
        names = list(pg)

        def einsum_grads():
            return torch.autograd.grad(torch.einsum(eq, *ops(pg)).reshape(spec.shape), [pg[k] for k in names], ct)

        want = einsum_grads()
        got = spec.vjp(p, ct)
        for k, w in zip(names, want):
            assert float((got[k] - w).abs().max()) <= 1e-3 * float(w.abs().max()) + 1e-6, (kind, k)
        label = f"{fmt(spec.shape)}, {spec.describe_ranks()}"
        with torch.no_grad():
            m = interleaved({"ours": lambda: spec.reconstruct(p),
                             "einsum": lambda: torch.einsum(eq, *ops(p)).reshape(spec.shape)},
                            reps_for(spec.shape), warmup=2)
        t.rows.append([kind, label, "recon", ms(m.median("ours")), ms(m.median("einsum")),
                       f"{m.ratio('einsum', 'ours'):.2f}x"])
        m = interleaved({"ours": lambda: spec.vjp(p, ct), "einsum": einsum_grads}, reps_for(spec.shape), warmup=2)
        t.rows.append([kind, label, "vjp", ms(m.median("ours")), ms(m.median("einsum")),
                       f"{m.ratio('einsum', 'ours'):.2f}x"])
    tables.append(t)


# -- cross-layer stacks: one member's slice vs the whole stack --------------------
def stack_cases(quick: bool) -> list[tuple[Any, int]]:
    """A BERT-sized stack (12 layers x 4 roles of 768 x 768): Tucker, CP and TT, members indexed by 2 modes."""
    shape = (3, 2, 48, 48) if quick else (12, 4, 768, 768)
    return [(tp.Tucker.for_ranks(shape, (4, 4, 16, 16)), 2), (tp.CP(shape, 64), 2), (tp.TT(shape, 16), 2)]


def bench_stack(shapes, reps_for, tables, infos, quick):
    t = Table("Cross-layer stack: member slice + reconstruct vs the full stack, torch float32 (ms, median)",
              ["spec", "pass", "slice", "full stack", "full/slice"],
              note="slice = spec.slice(params, index) then member.reconstruct (what each layer of a group computes); "
                   "full stack = spec.reconstruct(params), then indexing. 'one member': one member's ΔW, forward. "
                   "'all members, fwd+bwd': every member's ΔW and its gradient, one member at a time vs the whole "
                   "stack at once (autograd).")
    for spec, lead in stack_cases(quick):
        p = spec.init("random", like=torch.zeros(1), dtype="float32", seed=0)
        pg = {k: v.clone().requires_grad_() for k, v in p.items()}
        member, grid = spec.member(lead), list(np.ndindex(*spec.shape[:lead]))
        index = grid[len(grid) // 2]
        g = torch.Generator().manual_seed(1)
        ct = torch.randn(member.shape, generator=g)
        full = spec.reconstruct(p)
        err = float((member.reconstruct(spec.slice(p, index)) - full[index]).abs().max() / full.abs().max())
        assert err < 1e-4, f"{spec.kind}: the member slice disagrees with the full stack: {err}"
        del full

        def all_slices():
            for v in pg.values():
                v.grad = None
            sum((member.reconstruct(spec.slice(pg, i)) * ct).sum() for i in grid).backward()

        def all_full():
            for v in pg.values():
                v.grad = None
            w = spec.reconstruct(pg)
            sum((w[i] * ct).sum() for i in grid).backward()

        label = f"{spec!r}".replace("tensorize=None", "").replace(", )", ")")
        with torch.no_grad():
            m = interleaved({"slice": lambda: member.reconstruct(spec.slice(p, index)),
                             "full": lambda: spec.reconstruct(p)[index]}, reps_for(spec.shape), warmup=2)
        t.rows.append([label, "one member", ms(m.median("slice")), ms(m.median("full")),
                       f"{m.ratio('full', 'slice'):.1f}x"])
        m = interleaved({"slice": all_slices, "full": all_full}, 2 if quick else 5, warmup=1)
        t.rows.append([label, f"all {len(grid)} members, fwd+bwd", ms(m.median("slice")), ms(m.median("full")),
                       f"{m.ratio('full', 'slice'):.2f}x"])
    tables.append(t)


# -- main ----------------------------------------------------------------------
def environment() -> list[str]:
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.platform()}",
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), tensorly {tl.__version__}, opt_einsum {opt_einsum.__version__}, "
        f"tucker_peft {tp.__version__}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    ap.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    ap.add_argument("--only", default="recon,hosvd,hooi,vjp,kinds,stack", help="comma-separated sections to run")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = ap.parse_args(argv)
    sections = set(args.only.split(","))
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES

    def reps_for(shape, slow=False, hooi=False):
        if args.quick:
            return 2
        big = math.prod(shape) > 10**6
        if slow:
            return (2 if hooi else 3) if big else 5
        return 10 if big else 30

    command = " ".join(["python", "benchmarks/bench_core.py", *(sys.argv[1:] if argv is None else argv)])
    for line in environment() + [f"command: {command}"]:
        print(line)
    print()
    tables: list[Table] = []
    checks: list[Check] = []
    infos: list[str] = []
    t0 = time.perf_counter()

    snap = [cpu_snapshot()]

    def load_note() -> None:
        now = cpu_snapshot()
        if now is not None and snap[0] is not None:
            share = other_cpu_share(snap[0], now)
            print(f"other processes used {share:.0%} of the CPU time during this section"
                  + (" -- expect noisier ratios" if share > 0.1 else "") + "\n", flush=True)
        snap[0] = cpu_snapshot()

    for name, bench, sink in (("recon", bench_reconstruct, checks), ("hosvd", bench_hosvd, checks),
                              ("hooi", bench_hooi, infos), ("vjp", bench_vjp, infos),
                              ("kinds", bench_kinds, infos), ("stack", bench_stack, infos)):
        if name in sections:
            bench(shapes, reps_for, tables, sink, args.quick)
            print(tables[-1].render(args.markdown), flush=True)
            load_note()

    print("== Targets ==" if not args.markdown else "### Targets\n")
    if args.quick:
        print("(--quick: small shapes, 2 repetitions; PASS/FAIL below is not meaningful)")
    for c in checks:
        print(f"{'- ' if args.markdown else ''}[{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.text}")
    if infos:
        print("\n== Own code vs delegating (information) ==" if not args.markdown else "\n### Own code vs delegating\n")
        for line in infos:
            print(("- " if args.markdown else "") + line)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 1 if args.strict and not all(c.ok for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
