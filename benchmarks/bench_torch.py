#!/usr/bin/env python
"""Training-step time and peak memory of conv adapters, side by side (PyTorch, CPU).

Two models, every adapter at the trainable-parameter count of LoRA r=8 on each
adapted layer (``tucker_peft.ranks.match(LoRA(shape, 8), kind)``):

* ``cnn``: a small CNN, four 3×3 convs (3→64 at 32×32, 64→128 at 16×16,
  128→256 and 256→256 at 8×8), 32×32 inputs, batch 32, all four convs adapted;
* ``crnn``: the pretrained Khmer OCR CRNN of ``pip install khmer-ocr-ocm``
  (its real weights), on text lines rendered offline from its bundled fonts
  (48×256, batch 16), CTC loss; its six deeper convs are adapted (``cnn.0``,
  1→64, is left out: LoRA r=8 on it would have more parameters than the layer).

Methods (rows): ``floor`` (frozen model, backward to the input of the first
adapted layer, no weight gradients: the least a training step can cost);
``peft-lora`` (Hugging Face PEFT LoRA r=8); ``lycoris-locon-tucker`` (LyCORIS
LoCon with ``use_tucker=True``, its default weight-rebuild forward) and
``lycoris-locon-tucker[bypass]`` (its ``bypass_mode``, a chain of three small
convs), each layer at the largest LoCon rank within the LoRA r=8 budget;
``flora-official`` (the FLoRA reference strategy: ΔW = core ×ₙ Uₙ rebuilt every
step, y = conv(x, W) + conv(x, ΔW)); and ours, ``tucker``, ``tucker2``, ``cp``,
``lora`` through ``tucker_peft.backends.torch`` (``forward='auto'``), plus
``tucker[rebuild]`` and ``tucker[factorized]``. With ``--compile BACKEND`` (default
``inductor``; ``none`` skips them) ``floor``, ``peft-lora`` and ``tucker`` also run
as ``<row>[compiled]``: the same model under ``torch.compile(model, backend=BACKEND)``,
timed interleaved with the eager rows; their compile time is the first step's time
minus the median step.

Timing: all variants are built once (deep copies of one base), warmed up, then
in each round every method runs one training step (zero_grad, forward, loss,
backward, AdamW step on the trainable parameters) in a freshly shuffled order.
Tables give the median step time per method, the ratio of medians to ``floor``
and to ``peft-lora``, and the median of the per-round paired ratios. On a shared
2-core machine only the ratios mean anything.

Memory (deterministic, per method, outside the timed loop):

* ``step peak``: the peak of live tensor bytes allocated during one training
  step above what was resident before it (activations, gradients, autograd
  and optimizer temporaries), from ``torch.profiler``'s allocator events;
* ``total``: step peak + every parameter and buffer of the model + optimizer
  state, i.e. the peak of live tensor memory over the step;
* ``saved``: bytes of the tensors saved for backward (distinct storages, the
  model's own parameters and buffers excluded), via
  ``torch.autograd.graph.saved_tensors_hooks``;
* ``RSS Δ`` (unless ``--no-rss``): each method alone in a fresh subprocess,
  peak RSS during two steps minus RSS before them (``/proc/self/clear_refs``
  resets the high-water mark; glibc's mmap threshold is pinned at 64 KiB so
  freed tensors leave the RSS).

Inference after merging: the tucker model (after its timed training steps)
``merge_and_unload``-ed, PEFT LoRA merged, both unmerged, and the base model,
timed interleaved in eval mode under ``torch.no_grad``; ratios to the base.

Run from the repository root (``--baseline DIR`` adds ``<kind>@base`` rows: the same
kinds through another checkout's binding, e.g. the main branch, for an eager A/B)::

    python benchmarks/bench_torch.py                   # both models, 20 rounds (~16 minutes on 2 busy cores)
    python benchmarks/bench_torch.py --model cnn --rounds 30
    python benchmarks/bench_torch.py --quick           # smoke run, tiny sizes
    python benchmarks/bench_torch.py --model stack     # cross-layer stack vs per-layer (issue 12), ~2 minutes
    python benchmarks/bench_torch.py --markdown tables.md --json out.json
    python benchmarks/bench_torch.py --strict          # exit 1 if a target fails
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the checkout, installed or not
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, cpu_snapshot, other_cpu_share  # noqa: E402

# --omp-passive: idle OpenMP workers sleep instead of spinning. Use it on a loaded machine, where
# spinning workers turn every parallel region into a wait for a descheduled thread (300x slower
# steps measured). Not the default: on a quiet machine waking a sleeping worker costs ~50-100 us
# per op, which triples the cost of every small op (adapters' and PEFT's alike).
# Read when torch loads its OpenMP runtime, so it must be set before the import.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tucker_peft as tp  # noqa: E402

LORA_RANK = 8
OURS_KINDS = ("tucker", "tucker2", "cp", "lora")
FORWARDS = ("rebuild", "factorized")
STEP_TARGET_FLOOR = 1.10  # tucker step time <= 1.10 x floor
STEP_TARGET_PEFT = 0.75  # tucker step time <= 0.75 x PEFT LoRA
EAGER_TARGET_PEFT = 0.80  # issue 9 §5: eager tucker stays <= 0.80 x PEFT LoRA while compiled rows catch up
COMPILED_ROWS = ("floor", "peft-lora", "tucker")  # each also as "<row>[compiled]" with --compile BACKEND
COMPILED_TARGET_FLOOR = 1.10  # tucker[compiled] <= 1.10 x floor[compiled]
COMPILED_TARGET_PEFT = 1.00  # tucker[compiled] no slower than peft-lora[compiled]
INFER_TOL = 0.05  # merged inference within 5 % of the base model
STACK_TARGET = 1.30  # issue 12: a cross-layer stack's step <= 1.3 x the per-layer adapter at the same ranks
STACK_KINDS = ("tucker", "cp")


# -- optional libraries ----------------------------------------------------------------
def _try(fn: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as e:  # ImportError, or a library that fails on import
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]


_LIBS: dict[str, tuple[Any, str]] = {}
BASELINE: list[str] = []  # --baseline DIR: a checkout whose binding also runs, as "<row>@base" rows


def lib(name: str) -> tuple[Any, str]:
    """(module or None, why not); imported on first use only (children stay lean)."""
    if name not in _LIBS:
        if name == "peft":
            _LIBS[name] = _try(lambda: __import__("peft"))
        elif name == "lycoris":
            def imp():
                import logging

                import lycoris  # noqa: F401
                from lycoris import wrapper
                logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # no INFO lines per wrapped model
                return wrapper
            _LIBS[name] = _try(imp)
        elif name == "ours":
            def imp():
                import tucker_peft.backends.torch as m
                for a in ("AdapterConfig", "inject", "merge", "merge_and_unload"):
                    getattr(m, a)
                return m
            _LIBS[name] = _try(imp)
        elif name == "ours@base":
            def imp():
                # Another checkout's package under its own name, e.g. the main branch: eager A/B in one process.
                import importlib.util
                root = os.path.join(BASELINE[0], "tucker_peft")
                spec = importlib.util.spec_from_file_location("tucker_peft_baseline", os.path.join(root, "__init__.py"),
                                                              submodule_search_locations=[root])
                mod = importlib.util.module_from_spec(spec)
                sys.modules["tucker_peft_baseline"] = mod
                spec.loader.exec_module(mod)
                return importlib.import_module("tucker_peft_baseline.backends.torch")
            _LIBS[name] = _try(imp) if BASELINE else (None, "no --baseline given")
        elif name == "khmer":
            def imp():
                from khmer_ocr_ocm.inference import load_model
                return load_model
            _LIBS[name] = _try(imp)
        else:
            raise KeyError(name)
    return _LIBS[name]


def lib_version(dist: str) -> str:
    try:
        import importlib.metadata as md
        return md.version(dist)
    except Exception:
        return "?"


# -- workloads -------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Four 3×3 convs with ReLU, two max-pools, global average pool, linear head."""

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 256, 256), n_classes: int = 10):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.head = nn.Linear(c4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return self.head(x.mean((2, 3)))


@dataclass
class Workload:
    name: str
    base: nn.Module
    targets: list[str]
    x: torch.Tensor
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    description: str


def cnn_workload(quick: bool) -> Workload:
    torch.manual_seed(0)
    widths, hw, batch = ((8, 16, 32, 32), 16, 4) if quick else ((64, 128, 256, 256), 32, 32)
    model = SmallCNN(widths)
    x = torch.randn(batch, 3, hw, hw)
    y = torch.randint(0, 10, (batch,))
    desc = (f"SmallCNN convs 3→{widths[0]}→{widths[1]}→{widths[2]}→{widths[3]} (3×3), input {batch}×3×{hw}×{hw}, "
            f"cross-entropy; adapted: conv1-conv4 (random init, seed 0)")
    return Workload("cnn", model, ["conv1", "conv2", "conv3", "conv4"], x, lambda out: F.cross_entropy(out, y), desc)


def crnn_workload(quick: bool) -> Workload | None:
    load_model, why = lib("khmer")
    if load_model is None:
        print(f"note: khmer-ocr-ocm not importable ({why}): skipping the crnn model")
        return None
    import numpy as np
    from khmer_ocr_ocm.assets import get_vocab_path

    ex = os.path.join(ROOT, "docs", "examples")
    if ex not in sys.path:
        sys.path.insert(0, ex)
    from extract_crnn import render_batch  # the example's offline line renderer

    torch.manual_seed(0)
    model = load_model(device="cpu")
    with open(get_vocab_path(), encoding="utf-8") as f:
        char2idx = json.load(f)["char2idx"]
    batch, width = (2, 64) if quick else (16, 256)
    x, tg, ln, _ = render_batch(np.random.default_rng(0), batch, width, char2idx)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        lp = out.log_softmax(2)
        return F.ctc_loss(lp, tg, torch.full((batch,), lp.shape[0], dtype=torch.long), ln, blank=0,
                          zero_infinity=True)

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = convs[0]
    targets = [n for n in convs if n != first]
    desc = (f"khmer-ocr-ocm CRNN (pretrained weights; 7 convs + 2-layer BiLSTM), text lines {batch}×1×48×{width}, "
            f"CTC loss; adapted: {', '.join(targets)} ({first}, 1→64, left out: LoRA r=8 on it exceeds its 576 weights)")
    return Workload("crnn", model, targets, x, loss_fn, desc)


def set_train_mode(model: nn.Module) -> nn.Module:
    """Train mode, but BatchNorm on running statistics and no dropout: identical base work for every row."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RNNBase)):
            m.eval()
    return model


def find_module(model: nn.Module, target: str) -> tuple[str, nn.Module]:
    """The module whose path is ``target`` or ends with ``.target`` (PEFT wraps the model)."""
    hits = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
    if not hits:
        raise KeyError(target)
    return min(hits, key=lambda h: len(h[0]))


def conv_shape(conv: nn.Conv2d) -> tuple[int, ...]:
    return tuple(conv.weight.shape)


# -- methods ---------------------------------------------------------------------------
@dataclass
class Built:
    model: nn.Module
    params: list[nn.Parameter]  # trainable
    per_layer: dict[str, int]  # trainable params per adapted layer
    spec: dict[str, str]  # what each layer got, in words
    merge: Callable[[nn.Module], nn.Module] | None = None  # model -> merged plain model


@dataclass
class Method:
    name: str
    group: str  # floor | peer | ours
    build: Callable[[Workload], Built]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _per_layer_under(model: nn.Module, targets: list[str]) -> dict[str, int]:
    return {t: sum(p.numel() for p in find_module(model, t)[1].parameters() if p.requires_grad) for t in targets}


def build_floor(w: Workload) -> Built:
    m = copy.deepcopy(w.base)
    m.requires_grad_(False)
    first = find_module(m, w.targets[0])[1]

    def grad_input(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

    first.register_forward_pre_hook(grad_input)
    return Built(m, [], {t: 0 for t in w.targets}, {t: "frozen" for t in w.targets})


def build_peft_lora(w: Workload) -> Built:
    peft, _ = lib("peft")
    m = copy.deepcopy(w.base)
    cfg = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, bias="none",
                          target_modules=list(w.targets))
    pm = peft.get_peft_model(m, cfg)
    spec = {t: f"LoRA r={LORA_RANK}" for t in w.targets}
    return Built(pm, _trainable(pm), _per_layer_under(pm, w.targets), spec, merge=lambda mm: mm.merge_and_unload())


def locon_tucker_params(shape: tuple[int, ...], r: int) -> int:
    """LoCon use_tucker: down (r, in, 1, 1) + mid (r, r, *k) + up (out, r, 1, 1)."""
    return r * (shape[0] + shape[1]) + r * r * math.prod(shape[2:])


def locon_tucker_rank(shape: tuple[int, ...], budget: int) -> int:
    r = 1
    while locon_tucker_params(shape, r + 1) <= budget:
        r += 1
    return r


def build_lycoris(w: Workload, bypass: bool) -> Built:
    wrapper, _ = lib("lycoris")
    m = copy.deepcopy(w.base)
    m.requires_grad_(False)
    ranks_ = {}
    for t in w.targets:
        shape = conv_shape(find_module(m, t)[1])
        ranks_[t] = locon_tucker_rank(shape, tp.LoRA(shape, LORA_RANK).num_params)
    net_cls = wrapper.LycorisNetwork
    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(net_cls, k) for k in keys}
    pats = {"^" + re.escape(t) + "$": t for t in w.targets}
    try:
        # Per-layer rank through a preset: only the named convs, each with its own dim (alpha = dim: scale 1).
        net_cls.apply_preset({"enable_conv": True, "target_module": [], "target_name": list(pats),
                              "name_algo_map": {p: {"dim": ranks_[t], "alpha": ranks_[t]} for p, t in pats.items()},
                              "module_algo_map": {}, "use_fnmatch": False, "exclude_name": []})
        net = net_cls(m, multiplier=1.0, lora_dim=LORA_RANK, conv_lora_dim=LORA_RANK, alpha=LORA_RANK,
                      conv_alpha=LORA_RANK, use_tucker=True, network_module="locon", bypass_mode=bypass,
                      warn_on_unmatched=False)
    finally:
        for k, v in saved.items():
            setattr(net_cls, k, v)
    net.apply_to()
    m.add_module("lycoris_network", net)  # so m.parameters() and m.train() reach it
    if len(net.loras) != len(w.targets):
        raise RuntimeError(f"LyCORIS wrapped {len(net.loras)} modules, expected {len(w.targets)}")
    per_layer, spec = {}, {}
    by_module = {id(lo.org_module[0]): lo for lo in net.loras}
    for t in w.targets:
        lo = by_module[id(find_module(m, t)[1])]
        if not lo.tucker:
            raise RuntimeError(f"LyCORIS did not use the tucker mid on {t}")
        per_layer[t] = sum(p.numel() for p in lo.parameters() if p.requires_grad)
        spec[t] = f"LoCon-tucker r={lo.lora_dim}"
    return Built(m, _trainable(m), per_layer, spec)


class FLoRAConv2d(nn.Module):
    """FLoRA's conv strategy: ΔW = core ×₁ U₁ ×₂ U₂ ×₃ U₃ ×₄ U₄ rebuilt each call, a second full conv on it."""

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, ...], scale: float = 1.0):
        super().__init__()
        self.base = conv
        conv.requires_grad_(False)
        shape = tuple(conv.weight.shape)
        self.core = nn.Parameter(torch.randn(*ranks) * 0.02)
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.zeros(shape[0], ranks[0]))]  # zero: ΔW = 0 at start, as LoRA's B
            + [nn.Parameter(torch.linalg.qr(torch.randn(shape[n], ranks[n]))[0]) for n in range(1, 4)])
        self.scale = scale

    def delta(self) -> torch.Tensor:
        u = list(self.factors)
        return torch.einsum("abcd,ia,jb,kc,ld->ijkl", self.core, *u) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return b(x) + F.conv2d(x, self.delta(), None, b.stride, b.padding, b.dilation, b.groups)


def build_flora(w: Workload) -> Built:
    m = copy.deepcopy(w.base)
    m.requires_grad_(False)
    torch.manual_seed(1)
    spec = {}
    for t in w.targets:
        name, conv = find_module(m, t)
        s = tp.ranks.match(tp.LoRA(conv_shape(conv), LORA_RANK), "tucker")
        m.set_submodule(name, FLoRAConv2d(conv, tuple(s.ranks)))
        spec[t] = f"Tucker {s.ranks}"
    return Built(m, _trainable(m), _per_layer_under(m, w.targets), spec)


def build_ours(w: Workload, kind: str, forward: str, which: str = "ours") -> Built:
    ours, _ = lib(which)
    m = copy.deepcopy(w.base)
    torch.manual_seed(1)
    cfg = ours.AdapterConfig(kind=kind, budget=f"lora:{LORA_RANK}", target_modules=list(w.targets), forward=forward)
    out = ours.inject(m, cfg)
    if isinstance(out, nn.Module):
        m = out
    spec = {}
    for t in w.targets:  # what budget='lora:8' should resolve to; the binding's own summary below if it has one
        conv = find_module(w.base, t)[1]
        spec[t] = re.sub(r"shape=\([^)]*\), ", "", repr(tp.ranks.match(tp.LoRA(conv_shape(conv), LORA_RANK), kind)))
    summary = getattr(ours, "summary", None)
    if summary is not None:
        try:
            for row in summary(m).rows:
                t = next((t for t in w.targets if row["layer"] == t or row["layer"].endswith("." + t)), None)
                if t is not None:
                    spec[t] = f"{row['kind']} {row['ranks']}"
        except Exception:  # summary() is informational; its absence must not cost the row
            pass
    for t, mode in forward_modes(m, w).items():
        spec[t] += f" → {mode}"
    return Built(m, _trainable(m), _per_layer_under(m, w.targets), spec, merge=lambda mm: ours.merge_and_unload(mm))


def forward_modes(model: nn.Module, w: Workload) -> dict[str, str]:
    """Which forward each adapted layer takes in training (best effort: reads the binding's per-call strategy)."""
    found: dict[str, str] = {}
    undo = []
    try:
        for t in w.targets:
            layer = find_module(model, t)[1]
            adapters, name = getattr(layer, "adapters", None), getattr(layer, "active_adapter", None)
            if adapters is None or name not in adapters or not hasattr(adapters[name], "strategy"):
                continue
            d = adapters[name]

            def rec(*a: Any, _f: Any = d.strategy, _t: str = t, **k: Any) -> Any:
                out = _f(*a, **k)
                found[_t] = out[0] if isinstance(out, tuple) else str(out)
                return out

            d.strategy = rec
            undo.append(d)
        if undo:
            set_train_mode(model)
            with torch.no_grad():
                model(w.x)
    except Exception:  # informational only
        pass
    finally:
        for d in undo:
            del d.strategy
    return found


def compiled(build: Callable[[Workload], Built], backend: str) -> Callable[[Workload], Built]:
    """``build``, with the model under ``torch.compile`` (compiled lazily, on the first step)."""
    def f(w: Workload) -> Built:
        b = build(w)
        return Built(torch.compile(b.model, backend=backend), b.params, b.per_layer, b.spec)
    return f


def is_compiled(name: str) -> bool:
    return name.endswith("[compiled]")


def all_methods(forward_kinds: str = "tucker", compile_backend: str = "none") -> list[tuple[Method, str | None]]:
    """Every row, with the optional library it needs (None: none)."""
    out: list[tuple[Method, str | None]] = [
        (Method("floor", "floor", build_floor), None),
        (Method("peft-lora", "peer", build_peft_lora), "peft"),
        (Method("lycoris-locon-tucker", "peer", lambda w: build_lycoris(w, False)), "lycoris"),
        (Method("lycoris-locon-tucker[bypass]", "peer", lambda w: build_lycoris(w, True)), "lycoris"),
        (Method("flora-official", "peer", build_flora), None),
    ]
    fk = OURS_KINDS if forward_kinds == "all" else tuple(k for k in forward_kinds.split(",") if k)
    for kind in OURS_KINDS:
        out.append((Method(kind, "ours", lambda w, k=kind: build_ours(w, k, "auto")), "ours"))
        if kind in fk:
            for fw in FORWARDS:
                out.append((Method(f"{kind}[{fw}]", "ours", lambda w, k=kind, f=fw: build_ours(w, k, f)), "ours"))
    if BASELINE:
        for kind in OURS_KINDS:
            out.append((Method(f"{kind}@base", "ours", lambda w, k=kind: build_ours(w, k, "auto", "ours@base")),
                        "ours@base"))
    if compile_backend != "none":
        for m, need in list(out):
            if m.name in COMPILED_ROWS:
                out.append((Method(f"{m.name}[compiled]", m.group, compiled(m.build, compile_backend)), need))
    return out


LIB_NAMES = {"peft": "peft", "lycoris": "lycoris", "ours": "tucker_peft.backends.torch",
             "ours@base": "the --baseline checkout's binding"}


def methods_for(args: argparse.Namespace, notes: list[str]) -> list[Method]:
    """The rows to run: those whose library imports, filtered by ``--methods``."""
    out, missing = [], {}
    for m, need in all_methods(args.forward_kinds, args.compile):
        if need is not None and lib(need)[0] is None:
            missing.setdefault(need, []).append(m.name)
            continue
        out.append(m)
    for need, rows in missing.items():
        notes.append(f"{LIB_NAMES[need]} not importable ({lib(need)[1]}): skipping rows {', '.join(rows)}")
    if args.methods:
        keep = set(args.methods.split(","))
        out = [m for m in out if m.name in keep or m.name.removesuffix("[compiled]") in keep | {"floor"}]
    return out


# -- measuring -------------------------------------------------------------------------
def make_step(model: nn.Module, params: list[nn.Parameter], w: Workload) -> tuple[Callable[[], None], Any]:
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = w.loss_fn(model(w.x))
        loss.backward()
        if opt is not None:
            opt.step()

    return step, opt


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensor_bytes(model: nn.Module) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        p, n = storage_key(t)
        seen[p] = n
    return sum(seen.values())


def opt_state_bytes(opt: Any) -> int:
    if opt is None:
        return 0
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                p, n = storage_key(v)
                seen[p] = n
    return sum(seen.values())


def saved_bytes(model: nn.Module, w: Workload) -> int:
    """Bytes of the distinct storages autograd saves for backward, the model's own tensors excluded."""
    own = {storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            p, n = storage_key(t)
        except Exception:
            return t
        if p and p not in own:
            seen[p] = max(seen.get(p, 0), n)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = w.loss_fn(model(w.x))
    del loss
    return sum(seen.values())


def profiled_peak(step: Callable[[], None], opt: Any) -> int:
    """Peak of live bytes allocated during one step above the start, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    sys.stderr.flush()
    saved_fd = os.dup(2)  # kineto logs two lines to fd 2 per profile; keep the output readable
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, seed: int) -> dict[str, list[float]]:
    """One call of every function per round, in a shuffled order; seconds per call."""
    rng = random.Random(seed)
    names = list(fns)
    gc.collect()
    gc.freeze()  # the libraries' millions of objects out of every later collection (0.25 s each otherwise)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for k in names:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fns[k]()
                samples[k].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return samples


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


# -- isolated RSS (child processes) ------------------------------------------------------
def _status_kib(field_: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def rss_child(model_name: str, method_name: str, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(2)
    w = cnn_workload(quick) if model_name == "cnn" else crnn_workload(quick)
    meth = {m.name: m for m, _ in all_methods("all")}[method_name]
    b = meth.build(w)
    set_train_mode(b.model)
    step, opt = make_step(b.model, b.params, w)
    for _ in range(2):
        step()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        step()
    return {"rss_before_kib": before, "hwm_kib": _status_kib("VmHWM"), "delta_kib": _status_kib("VmHWM") - before}


def isolated_rss(model_name: str, method: str, quick: bool) -> tuple[float | None, str]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss-child", f"{model_name}:{method}"] + (["--quick"] if quick else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RSS_JSON ")]
    if p.returncode != 0 or not lines:
        return None, (p.stderr.strip().splitlines() or ["failed"])[-1][:160]
    d = json.loads(lines[-1][len("RSS_JSON "):])
    return d["delta_kib"] * 1024, ""


# -- output ----------------------------------------------------------------------------
def ms(t: float) -> str:
    return f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.2f}"


def mib(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def rx(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}x"


@dataclass
class Check:
    name: str
    ok: bool
    text: str


# -- one model -------------------------------------------------------------------------
def run_model(w: Workload, args: argparse.Namespace, methods: list[Method], tables: list[Table],
              checks: list[Check], infos: list[str], record: dict[str, Any]) -> None:
    print(f"-- {w.name}: {w.description}", flush=True)
    snap = cpu_snapshot()
    built: dict[str, Built] = {}
    failed: dict[str, str] = {}
    for m in methods:
        try:
            b = m.build(w)
        except Exception as e:  # a library that cannot wrap this model: report, go on
            failed[m.name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"note: {w.name}: building {m.name} failed: {failed[m.name]}")
            continue
        set_train_mode(b.model)
        built[m.name] = b
    names = list(built)

    # equal budgets, per layer
    shapes = {t: conv_shape(find_module(w.base, t)[1]) for t in w.targets}
    budget = {t: tp.LoRA(s, LORA_RANK).num_params for t, s in shapes.items()}
    listed = [n for n in names if n != "floor" and not is_compiled(n)]  # a compiled row has its eager row's adapter
    pt = Table(f"{w.name}: trainable parameters per adapted layer (budget = LoRA r={LORA_RANK})",
               ["layer", "shape", "budget"] + listed)
    for t in w.targets:
        row = [t, "×".join(map(str, shapes[t])), str(budget[t])]
        for n in listed:
            k = built[n].per_layer[t]
            row.append(f"{k} ({100 * k / budget[t]:.0f}%)")
        pt.rows.append(row)
    st = Table(f"{w.name}: adapter per layer", ["layer"] + listed)
    for t in w.targets:
        st.rows.append([t] + [built[n].spec[t] for n in listed])
    over = [(n, t) for n in names for t in w.targets if built[n].per_layer[t] > budget[t]]
    if over:
        print(f"WARNING: {w.name}: over the LoRA r={LORA_RANK} budget: {over}")

    # warm-up, then interleaved timing
    steps: dict[str, Callable[[], None]] = {}
    opts: dict[str, Any] = {}
    first: dict[str, float] = {}  # the first step's seconds: a compiled row's includes its compile
    for n in names:
        steps[n], opts[n] = make_step(built[n].model, built[n].params, w)
        for i in range(max(1, args.warmup)):
            t1 = time.perf_counter()
            steps[n]()
            if i == 0:
                first[n] = time.perf_counter() - t1
    t0 = time.perf_counter()
    samples = interleaved(steps, args.rounds, args.seed)
    timing_s = time.perf_counter() - t0
    share = other_cpu_share(snap, cpu_snapshot())

    # memory, outside the timed loop
    mem: dict[str, dict[str, Any]] = {}
    for n in names:
        b = built[n]
        peak = profiled_peak(steps[n], opts[n])
        resident = tensor_bytes(b.model) + opt_state_bytes(opts[n])
        # saved_tensors_hooks would send a compiled model back through dynamo: not measured there
        saved = None if is_compiled(n) else saved_bytes(b.model, w)
        mem[n] = {"saved": saved, "step_peak": peak, "resident": resident, "total": resident + peak,
                  "rss": None, "rss_note": ""}
    if args.rss:
        for n in names:
            if is_compiled(n):
                continue
            mem[n]["rss"], mem[n]["rss_note"] = isolated_rss(w.name, n, args.quick)
            if mem[n]["rss_note"]:
                print(f"note: {w.name}: isolated RSS run of {n} failed: {mem[n]['rss_note']}")

    med = {n: statistics.median(samples[n]) for n in names}
    has_peft = "peft-lora" in med
    nth = torch.get_num_threads()
    tt = Table(f"{w.name}: training step (median of {args.rounds} interleaved rounds, {nth} thread{'s' * (nth != 1)})",
               ["method", "trainable", "step ms", "p25-p75 ms", "x floor", "x peft-lora", "paired x floor",
                "paired x peft"],
               note="x floor / x peft-lora: ratio of medians; paired: median over rounds of the per-round ratio")
    for n in names:
        if is_compiled(n):
            continue
        q = statistics.quantiles(samples[n], n=4) if len(samples[n]) >= 2 else [med[n]] * 3
        tt.rows.append([n, str(sum(p.numel() for p in built[n].params)), ms(med[n]), f"{ms(q[0])}-{ms(q[2])}",
                        rx(med[n] / med["floor"]), rx(med[n] / med["peft-lora"]) if has_peft else "–",
                        rx(paired(samples, n, "floor")), rx(paired(samples, n, "peft-lora")) if has_peft else "–"])
    mt = Table(f"{w.name}: memory per training step",
               ["method", "saved MiB", "step peak MiB", "total MiB", "total x peft-lora", "step peak x peft-lora",
                "RSS Δ MiB"],
               note="saved: tensors saved for backward (model's own weights excluded); step peak: live bytes "
                    "allocated during a step above the resident state (torch.profiler allocator events); total: "
                    "step peak + model params/buffers + optimizer state; RSS Δ: each method alone in a fresh "
                    "process, peak RSS over two steps minus RSS before them" + ("" if args.rss else " (--no-rss)"))
    for n in names:
        d = mem[n]
        mt.rows.append([n, mib(d["saved"]), mib(d["step_peak"]), mib(d["total"]),
                        rx(d["total"] / mem["peft-lora"]["total"]) if has_peft else "–",
                        rx(d["step_peak"] / mem["peft-lora"]["step_peak"]) if has_peft else "–", mib(d["rss"])])

    # inference after merging
    inf_rows: dict[str, Callable[[], Any]] = {}
    merge_notes: list[str] = []
    base_eval = copy.deepcopy(w.base).eval()
    base_eval.requires_grad_(False)
    inf_rows["base"] = base_eval
    for n, label in (("tucker", "tucker"), ("peft-lora", "peft-lora")):
        if n not in built or built[n].merge is None:
            continue
        unmerged = built[n].model
        try:
            merged = built[n].merge(copy.deepcopy(unmerged)).eval()
        except Exception as e:
            merge_notes.append(f"{n}: merge failed: {type(e).__name__}: {e}".splitlines()[0][:200])
            continue
        with torch.no_grad():
            unmerged.eval()
            ref, got, plain = unmerged(w.x), merged(w.x), base_eval(w.x)
            set_train_mode(unmerged)
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        moved = float((got - plain).abs().max() / plain.abs().max().clamp_min(1e-30))
        n_merged = sum(p.numel() for p in merged.parameters())
        n_base = sum(p.numel() for p in w.base.parameters())
        merge_notes.append(f"{n}: merged vs unmerged output max rel diff {err:.1e} (vs the base model {moved:.1e}); "
                           f"merged model has "
                           f"{n_merged} params (base {n_base})")
        inf_rows[f"{label} merged"] = merged
        inf_rows[f"{label} unmerged"] = unmerged

    def infer(model: nn.Module) -> Callable[[], Any]:
        def f() -> None:
            with torch.no_grad():
                model(w.x)
        return f

    for mdl in inf_rows.values():
        mdl.eval()
    inf_fns = {k: infer(v) for k, v in inf_rows.items()}
    for f in inf_fns.values():
        for _ in range(args.warmup):
            f()
    inf = interleaved(inf_fns, args.rounds, args.seed + 1)
    for n in ("tucker", "peft-lora"):
        if n in built:
            set_train_mode(built[n].model)
    inf_med = {k: statistics.median(v) for k, v in inf.items()}
    it = Table(f"{w.name}: inference (eval, no_grad; median of {args.rounds} interleaved rounds)",
               ["model", "ms", "x base", "paired x base"],
               note="; ".join(merge_notes) if merge_notes else "")
    for k in inf:
        it.rows.append([k, ms(inf_med[k]), rx(inf_med[k] / inf_med["base"]), rx(paired(inf, k, "base"))])

    ct = None
    if "floor[compiled]" in med:
        cf, cp_ = "floor[compiled]", "peft-lora[compiled]"
        has_cp = cp_ in med
        ct = Table(f"{w.name}: compiled training step (torch.compile backend={args.compile}; the same "
                   f"{args.rounds} interleaved rounds)",
                   ["method", "step ms", "p25-p75 ms", "x floor[c]", "x peft-lora[c]", "paired x floor[c]",
                    "paired x peft[c]", "x eager self", "compile s"],
                   note="[c]: the compiled row; x eager self: paired ratio to the same row in eager mode; "
                        "compile s: first step minus the median step")
        for n in [n for n in names if is_compiled(n)]:
            q = statistics.quantiles(samples[n], n=4) if len(samples[n]) >= 2 else [med[n]] * 3
            eager = n[: -len("[compiled]")]
            ct.rows.append([n, ms(med[n]), f"{ms(q[0])}-{ms(q[2])}", rx(med[n] / med[cf]),
                            rx(med[n] / med[cp_]) if has_cp else "–", rx(paired(samples, n, cf)),
                            rx(paired(samples, n, cp_)) if has_cp else "–",
                            rx(paired(samples, n, eager)) if eager in med else "–",
                            f"{max(0.0, first[n] - med[n]):.1f}"])
    for t in (tt, ct, mt, pt, st, it):
        if t is None:
            continue
        tables.append(t)
        print(t.render(False), flush=True)
    if share is not None:
        load = (f"other processes used {share:.0%} of the CPU time during the {w.name} timing ({timing_s:.0f} s)"
                + (" -- expect noisier ratios" if share > 0.1 else ""))
        print(load + "\n", flush=True)
        tables.append(Table(f"{w.name}: load", [], note=load))

    # targets
    if "tucker" in med:
        r = med["tucker"] / med["floor"]
        checks.append(Check(f"{w.name}: tucker step <= {STEP_TARGET_FLOOR:.2f}x floor", r <= STEP_TARGET_FLOOR,
                            f"{r:.2f}x (paired {paired(samples, 'tucker', 'floor'):.2f}x)"))
        if has_peft:
            r = med["tucker"] / med["peft-lora"]
            checks.append(Check(f"{w.name}: tucker step <= {STEP_TARGET_PEFT:.2f}x peft-lora", r <= STEP_TARGET_PEFT,
                                f"{r:.2f}x (paired {paired(samples, 'tucker', 'peft-lora'):.2f}x)"))
            a, b = mem["tucker"], mem["peft-lora"]
            checks.append(Check(f"{w.name}: tucker peak memory <= peft-lora", a["total"] <= b["total"],
                                f"total {mib(a['total'])} vs {mib(b['total'])} MiB; step peak {mib(a['step_peak'])} "
                                f"vs {mib(b['step_peak'])} MiB"
                                + (f"; RSS Δ {mib(a['rss'])} vs {mib(b['rss'])} MiB"
                                   if a["rss"] is not None and b["rss"] is not None else "")))
        if has_peft:
            r = paired(samples, "tucker", "peft-lora")
            checks.append(Check(f"{w.name}: eager tucker step <= {EAGER_TARGET_PEFT:.2f}x peft-lora (paired)",
                                r <= EAGER_TARGET_PEFT, f"{r:.2f}x (ratio of medians "
                                f"{med['tucker'] / med['peft-lora']:.2f}x)"))
        if "tucker[compiled]" in med and "floor[compiled]" in med:
            r = paired(samples, "tucker[compiled]", "floor[compiled]")
            checks.append(Check(f"{w.name}: tucker[compiled] step <= {COMPILED_TARGET_FLOOR:.2f}x floor[compiled] "
                                "(paired)", r <= COMPILED_TARGET_FLOOR,
                                f"{r:.2f}x (ratio of medians {med['tucker[compiled]'] / med['floor[compiled]']:.2f}x)"))
            if "peft-lora[compiled]" in med:
                r = paired(samples, "tucker[compiled]", "peft-lora[compiled]")
                checks.append(Check(f"{w.name}: tucker[compiled] step <= {COMPILED_TARGET_PEFT:.2f}x "
                                    "peft-lora[compiled] (paired)", r <= COMPILED_TARGET_PEFT,
                                    f"{r:.2f}x (ratio of medians "
                                    f"{med['tucker[compiled]'] / med['peft-lora[compiled]']:.2f}x)"))
        if "tucker merged" in inf_med:
            r = inf_med["tucker merged"] / inf_med["base"]
            checks.append(Check(f"{w.name}: merged tucker inference = base within {INFER_TOL:.0%}",
                                abs(r - 1) <= INFER_TOL,
                                f"{r:.2f}x (paired {paired(inf, 'tucker merged', 'base'):.2f}x)"))
        if has_peft:  # information: the part of a step each adds to the floor (floor is a lower bound)
            ot, op = med["tucker"] - med["floor"], med["peft-lora"] - med["floor"]
            infos.append(f"{w.name}: time over floor: tucker {ms(ot)} ms ({ot / med['floor']:+.0%}), peft-lora "
                         f"{ms(op)} ms ({op / med['floor']:+.0%})"
                         + (f", ratio {ot / op:.2f}" if op > 0 else "")
                         + f"; tucker <= {STEP_TARGET_PEFT:.2f}x peft-lora needs peft-lora >= "
                           f"{1 / STEP_TARGET_PEFT:.2f}x floor, measured {med['peft-lora'] / med['floor']:.2f}x")
    else:
        checks.append(Check(f"{w.name}: targets", False, "no tucker row (binding missing or failed): not checked"))

    record[w.name] = {
        "description": w.description, "targets": w.targets, "input_shape": list(w.x.shape),
        "rounds": args.rounds, "warmup": args.warmup, "other_cpu_share": share, "build_failures": failed,
        "layers": {t: {"shape": list(shapes[t]), "budget": budget[t]} for t in w.targets},
        "methods": {n: {"group": next(m.group for m in methods if m.name == n),
                        "trainable": sum(p.numel() for p in built[n].params),
                        "per_layer": built[n].per_layer, "spec": built[n].spec,
                        "step_s": samples[n], "step_median_s": med[n], "first_step_s": first[n],
                        "x_floor": med[n] / med["floor"], "paired_x_floor": paired(samples, n, "floor"),
                        "x_peft": med[n] / med["peft-lora"] if has_peft else None,
                        "paired_x_peft": paired(samples, n, "peft-lora") if has_peft else None,
                        "memory_bytes": mem[n]} for n in names},
        "inference": {k: {"s": inf[k], "median_s": inf_med[k], "x_base": inf_med[k] / inf_med["base"],
                          "paired_x_base": paired(inf, k, "base")} for k in inf},
        "merge_notes": merge_notes,
    }


# -- main ------------------------------------------------------------------------------
# -- cross-layer stacks (issue 12) ---------------------------------------------------------
class _QKV(nn.Module):
    """One BERT-base attention projection triple: query, key, value Linear(d, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.query(x) + self.key(x) + self.value(x)) * (1.0 / 3.0)


class _Encoder(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_QKV(d) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layer:
            x = blk(x)
        return x


def run_stack(args: argparse.Namespace, tables: list[Table], checks: list[Check], infos: list[str],
              record: dict[str, Any]) -> None:
    """Training step of a cross-layer stack (``AdapterConfig.stack``) vs the per-layer adapter.

    BERT-base-sized: 12 layers × {query, key, value} Linear(768, 768), 4 sequences of 128 tokens; per kind the
    stacked adapter (one tensor over layer × role × out × in, ``ranks=8``: 8 on each member mode) against the
    per-layer adapter at the same ranks (8 on out and in), timed interleaved with the frozen floor.
    """
    from tucker_peft.backends.torch import AdapterConfig, inject

    n, d, tokens = (2, 64, 64) if args.quick else (12, 768, 512)
    print(f"-- stack: {n} layers x (query, key, value) Linear({d}, {d}), {tokens} tokens", flush=True)
    torch.manual_seed(args.seed)
    base = _Encoder(n, d)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(tokens // 128 if tokens >= 128 else 1, min(tokens, 128), d)
    stack = {"qkv": r"layer\.(?P<layer>\d+)\.(?P<role>query|key|value)"}
    models: dict[str, nn.Module] = {"floor": copy.deepcopy(base)}
    for kind in STACK_KINDS:
        cfg = dict(kind=kind, ranks=LORA_RANK, target_modules=["query", "key", "value"])
        models[kind] = inject(copy.deepcopy(base), AdapterConfig(**cfg))
        models[f"{kind}@layers"] = inject(copy.deepcopy(base), AdapterConfig(**cfg, stack=stack))
    fns = {}
    counts = {}
    for name, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        counts[name] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        xin = x.clone().requires_grad_()  # every row: backward to the input; the floor has no weight gradients

        def step(m: nn.Module = m, opt: Any = opt, xin: torch.Tensor = xin) -> None:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            m(xin).square().mean().backward()
            if opt is not None:
                opt.step()

        fns[name] = step
    for _ in range(args.warmup):
        for f in fns.values():
            f()
    snap = cpu_snapshot()
    samples = interleaved(fns, args.rounds, args.seed)
    busy = other_cpu_share(snap, cpu_snapshot())
    med = {k: statistics.median(v) for k, v in samples.items()}
    t = Table(f"stack: training step (median of {args.rounds} interleaved rounds; {n}×3 Linear({d}, {d}), "
              f"{tokens} tokens)", ["method", "trainable", "step", "x floor", "x per-layer (paired)"])
    for k in models:
        per = k.split("@")[0]
        t.rows.append([k, f"{counts[k]:,}", ms(med[k]), f"{med[k] / med['floor']:.2f}",
                       f"{paired(samples, k, per):.2f}" if "@" in k else "-"])
    if busy is not None:
        t.note = f"other processes used {100 * busy:.0f}% of the CPUs while timing"
    tables.append(t)
    print(t.render(False), flush=True)
    for kind in STACK_KINDS:
        r = paired(samples, f"{kind}@layers", kind)
        checks.append(Check(f"stack {kind}@layers step <= {STACK_TARGET} x per-layer {kind}", r <= STACK_TARGET,
                            f"{r:.2f}x (paired median; {counts[f'{kind}@layers']:,} vs {counts[kind]:,} trainable)"))
    record["stack"] = {"samples_s": samples, "median_s": med, "trainable": counts,
                       "paired_vs_per_layer": {k: paired(samples, k, k.split("@")[0]) for k in models if "@" in k}}


def environment() -> list[str]:
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.platform()}",
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"peft {lib_version('peft')}, lycoris-lora {lib_version('lycoris-lora')}, "
        f"khmer-ocr-ocm {lib_version('khmer-ocr-ocm')}, tucker_peft {tp.__version__}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("cnn", "crnn", "all", "stack"), default="all",
                    help="'stack': the cross-layer stack rows only (BERT-sized q/k/v stack vs per-layer, issue 12)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 20; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny models and inputs, few rounds, no RSS runs (smoke test)")
    ap.add_argument("--forward-kinds", default="tucker",
                    help="our kinds that also get [rebuild] and [factorized] rows: comma list, 'all' or ''")
    ap.add_argument("--methods", default="", help="comma list of rows to keep (floor is always kept)")
    ap.add_argument("--rss", dest="rss", action="store_true", default=None, help="isolated-process RSS (default on)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the isolated-process RSS runs")
    ap.add_argument("--compile", default=None, metavar="BACKEND",
                    help="torch.compile backend of the [compiled] rows (default inductor; 'none' with --quick or "
                         "to skip them)")
    ap.add_argument("--baseline", metavar="DIR", help="another checkout (e.g. the main branch): its binding's "
                    "tucker/tucker2/cp/lora also run, as '<kind>@base' rows, interleaved with ours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    ap.add_argument("--json", metavar="PATH", help="write all samples and numbers as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE (for a loaded machine; see the comment at the top)")
    ap.add_argument("--_rss-child", dest="rss_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        model_name, method = args.rss_child.split(":", 1)
        print("RSS_JSON " + json.dumps(rss_child(model_name, method, args.quick)), flush=True)
        return 0
    if args.rounds is None:
        args.rounds = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.rss is None:
        args.rss = not args.quick
    if args.baseline:
        BASELINE[:] = [os.path.abspath(args.baseline)]
    if args.compile is None:
        args.compile = "none" if args.quick else "inductor"

    command = " ".join(["python", "benchmarks/bench_torch.py", *(sys.argv[1:] if argv is None else argv)])
    env = environment() + [f"command: {command}"]
    for line in env:
        print(line)
    notes: list[str] = []
    methods = methods_for(args, notes)
    for n in notes:
        print("note: " + n)
    print(f"methods: {', '.join(m.name for m in methods)}\n", flush=True)

    tables: list[Table] = []
    checks: list[Check] = []
    infos: list[str] = []
    record: dict[str, Any] = {"environment": env, "notes": notes, "models": {}}
    t0 = time.perf_counter()
    if args.model == "stack":
        run_stack(args, tables, checks, infos, record)
    for name in (("cnn", "crnn") if args.model == "all" else () if args.model == "stack" else (args.model,)):
        w = cnn_workload(args.quick) if name == "cnn" else crnn_workload(args.quick)
        if w is None:
            notes.append(f"{name} skipped (khmer-ocr-ocm missing)")
            continue
        run_model(w, args, methods, tables, checks, infos, record["models"])

    print("== Targets ==")
    if args.quick:
        print("(--quick: tiny sizes, few rounds; PASS/FAIL below is not meaningful)")
    for c in checks:
        print(f"[{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.text}")
    for line in infos:
        print("info: " + line)
    record["checks"] = [c.__dict__ for c in checks]
    record["infos"] = infos
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")

    if args.markdown:
        md = ["\n".join(f"- {ln}" for ln in env), ""] + [t.render(True) for t in tables] + ["### Targets", ""]
        md += [f"- [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.text}" for c in checks]
        md += [f"- info: {line}" for line in infos]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return 1 if args.strict and not all(c.ok for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
