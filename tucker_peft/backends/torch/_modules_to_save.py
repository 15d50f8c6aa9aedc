"""``AdapterConfig.trainable`` with PEFT's ``modules_to_save`` semantics: one trainable copy per adapter.

A module named by ``trainable`` is wrapped in :class:`ModulesToSave`, which
holds the original (never trained) and one deep copy per adapter. The forward
runs the active adapter's copy, or the original when adapters are off or the
active adapter has no copy. A ``trainable`` entry that names parameters
(``'6.bias'``) copies the module that owns them, with only those parameters
trainable in the copy.

State-dict keys: the original's tensors keep the module's own keys
(``classifier.weight``), so a plain model loads them; the copies sit under
``classifier.modules_to_save.<adapter>.*``, which a plain model does not have.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..._errors import TuckerPeftError, fmt_shape

__all__ = ["ModulesToSave"]

ORIGINAL = "original_module"
COPIES = "modules_to_save"
# Path parts of modules that adapters add (their parameters are not the model's own).
_ADAPTED = ("base_layer", "parametrizations", "adapters")


class ModulesToSave(nn.Module):
    """A module and one trainable copy of it per adapter.

    Parameters
    ----------
    original : nn.Module
        The module as in the pretrained model; kept unchanged.
    name : str
        Its path in the model (for messages and ``summary``).
    """

    def __init__(self, original: nn.Module, name: str = "") -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.trained: dict[str, frozenset[str] | None] = {}  # adapter -> its copy's trained params (None: all)
        self.active_adapter: str | None = None
        self.layer_name = name
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    def add(self, adapter: str, params: frozenset[str] | None) -> None:
        """A fresh copy of the original for ``adapter``, training ``params`` (None: all of them)."""
        dup = copy.deepcopy(self.original_module)
        for p in dup.parameters():
            p.requires_grad_(False)
        self.modules_to_save[adapter] = dup
        self.trained[adapter] = params

    def remove(self, adapter: str) -> None:
        del self.modules_to_save[adapter]
        del self.trained[adapter]
        if self.active_adapter == adapter:
            self.active_adapter = None

    def trained_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """``adapter``'s trained parameters by their name inside the module."""
        keep = self.trained[adapter]
        return {n: p for n, p in self.modules_to_save[adapter].named_parameters() if keep is None or n in keep}

    def set_active(self, adapter: str | None, trainable: bool = True) -> None:
        """Run ``adapter``'s copy (the original if None or it has none); only its trained params get gradients."""
        self.active_adapter = adapter if adapter in self.modules_to_save else None
        for n in self.modules_to_save:
            on = trainable and n == self.active_adapter
            for p in self.trained_parameters(n).values():
                p.requires_grad_(on)

    @property
    def active_module(self) -> nn.Module:
        a = self.active_adapter
        return self.original_module if a is None else self.modules_to_save[a]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Attributes the wrapped module has (``weight``, ``in_features``) read from the module that runs.
        try:
            return super().__getattr__(name)
        except AttributeError:
            mods = self.__dict__.get("_modules", {})
            if ORIGINAL not in mods or COPIES not in mods:
                raise
        return getattr(self.active_module, name)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter!r}"


def _state_dict_hook(module: ModulesToSave, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``prefix.original_module.X`` → ``prefix.X``, originals first (as the plain module's keys)."""
    head = prefix + ORIGINAL + "."
    mine = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in mine]
    for k, v in items:
        if k.startswith(head):
            state_dict[prefix + k[len(head):]] = v
    for k, v in items:
        if not k.startswith(head):
            state_dict[k] = v


def _load_hook(module: ModulesToSave, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """The inverse of :func:`_state_dict_hook`: a plain module's keys load into the original."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if not rest.startswith((ORIGINAL + ".", COPIES + ".")):
            state_dict[prefix + ORIGINAL + "." + rest] = state_dict.pop(k)


# -- resolving AdapterConfig.trainable --------------------------------------------------

def _internal(name: str) -> bool:
    parts = name.split(".")
    return any(p in parts for p in _ADAPTED + (ORIGINAL, COPIES))


def _clean(name: str) -> str:
    """A name as in the unadapted model (no wrapper or adapter parts)."""
    name = re.sub(rf"(^|\.)(?:{ORIGINAL}|base_layer)\.", r"\1", name)
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)


def _matches(name: str, entry: str, regex: bool) -> bool:
    if regex:
        return re.fullmatch(entry, name) is not None
    return name == entry or name.endswith("." + entry)


def resolve(model: nn.Module, patterns: Any, targets: tuple[str, ...] = ()) -> dict[str, frozenset[str] | None]:
    """What ``patterns`` designates: module path → parameter names in it to train (None: all).

    Paths are those of the wrapped module, as in the unadapted model.
    ``targets`` are module paths about to be adapted (they may not be copied).
    """
    if patterns is None:
        return {}
    regex = isinstance(patterns, str)
    entries = [patterns] if regex else list(patterns)
    units: dict[str, frozenset[str] | None] = {}
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}

    def owner(path: str) -> tuple[str, str]:
        """The unit a module path belongs to: an existing wrapper above it, else itself; and the rest."""
        for w in wrapped:
            if path == w or path.startswith(w + "."):
                return w, path[len(w) + 1:]
        return path, ""

    adapted = set()  # clean module paths that hold an adapter (they may not be copied)
    for n, _ in model.named_modules():
        parts = n.split(".")
        for marker in ("base_layer", "parametrizations"):
            if marker in parts:
                adapted.add(_clean(".".join(parts[:parts.index(marker)]) + ".x")[:-2])
    adapted |= set(targets)
    modules = {_clean(n): m for n, m in model.named_modules()
               if n and not any(p in n.split(".") for p in _ADAPTED + (COPIES,)) and not n.endswith(ORIGINAL)}
    params: dict[str, tuple[str, str]] = {}
    for n, p in model.named_parameters():
        parts = n.split(".")
        if COPIES in parts or "adapters" in parts:
            continue
        clean = _clean(n)
        params[clean] = (clean.rpartition(".")[0], clean.rpartition(".")[2])

    def add(path: str, names: frozenset[str] | None) -> None:
        bad = [a for a in adapted if a == path or a.startswith(path + ".") or path.startswith(a + ".")]
        if bad:
            raise TuckerPeftError(f"trainable: {path!r} holds or is inside the adapted layer {sorted(bad)[0]!r}; "
                                  "expected modules or parameters outside the adapted layers")
        unit, rest = owner(path)
        if rest:  # inside a module that is already copied: train that part of it
            names = frozenset(f"{rest}.{k}" for k in (names if names is not None else _param_names(modules[path])))
        old = units.get(unit, frozenset())
        units[unit] = None if names is None or old is None else old | names

    unmatched = []
    for e in entries:
        mods = [n for n in modules if _matches(n, e, regex)]
        mods = [n for n in mods if not any(n.startswith(o + ".") for o in mods)]  # outermost only
        hits = [n for n in params if _matches(n, e, regex) and not any(n.startswith(o + ".") for o in mods)]
        if not mods and not hits:
            unmatched.append(e)
            continue
        for n in mods:
            add(n, None)
        by_owner: dict[str, set[str]] = {}
        for n in hits:
            mod, attr = params[n]
            by_owner.setdefault(mod, set()).add(attr)
        for mod, attrs in by_owner.items():
            add(mod, frozenset(attrs))
    if unmatched:
        listing = ", ".join(repr(n) for n in list(modules)[:12]) + (" ..." if len(modules) > 12 else "")
        raise TuckerPeftError(f"trainable: {unmatched!r} matched no module or parameter; expected names "
                              f"(full, or a suffix after a dot) or a regex of modules such as {listing}")
    return units


def _param_names(mod: nn.Module) -> list[str]:
    return [n for n, _ in mod.named_parameters()]


# -- model-level operations ------------------------------------------------------------

def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for n, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield n, m


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_copies(model: nn.Module, adapter: str, units: dict[str, frozenset[str] | None],
               undo: list[Callable[[], None]]) -> None:
    """Give ``adapter`` a copy of each unit (wrapping it first); ``undo`` collects how to take it back."""
    for path, names in units.items():
        mod = model.get_submodule(path)
        if not isinstance(mod, ModulesToSave):
            w = ModulesToSave(mod, path)
            _set_module(model, path, w)
            undo.append(lambda path=path, mod=mod: _set_module(model, path, mod))
            mod = w
        if adapter in mod.modules_to_save:
            raise TuckerPeftError(f"adapter_name: {adapter!r} already has a copy of {path!r}; expected a new name")
        mod.add(adapter, names)
        undo.append(lambda mod=mod: mod.remove(adapter))


def check_active(model: nn.Module, names: Any) -> None:
    """Several active adapters may not each have a copy of one module (which would run?)."""
    names = _names(names)
    for path, w in wrappers(model):
        have = [n for n in names if n in w.modules_to_save]
        if len(have) > 1:
            raise TuckerPeftError(f"adapter_name: {have} each have their own copy of {path!r}, and only one copy "
                                  "can run; expected at most one of them active")


def set_active(model: nn.Module, names: Any, trainable: bool = True) -> None:
    """Run the copies of the active adapter(s) ``names`` (None: the originals)."""
    names = _names(names)
    check_active(model, names)
    for _, w in wrappers(model):
        have = [n for n in names if n in w.modules_to_save]
        w.set_active(have[0] if have else None, trainable)


def _names(names: Any) -> tuple[str, ...]:
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def switch_off(model: nn.Module) -> list[tuple[ModulesToSave, str | None]]:
    """Run the originals; returns what :func:`switch_back` restores."""
    saved = [(w, w.active_adapter) for _, w in wrappers(model)]
    for w, _ in saved:
        w.active_adapter = None
    return saved


def switch_back(saved: list[tuple[ModulesToSave, str | None]]) -> None:
    for w, a in saved:
        w.active_adapter = a


def delete(model: nn.Module, adapter: str) -> None:
    """Drop ``adapter``'s copies; a module left without copies is the plain original again."""
    for path, w in list(wrappers(model)):
        if adapter in w.modules_to_save:
            w.remove(adapter)
            if not len(w.modules_to_save):
                _set_module(model, path, w.original_module)


def unload(model: nn.Module) -> None:
    """Each wrapper becomes the module that runs now (the active adapter's copy, else the original)."""
    for path, w in list(wrappers(model)):
        _set_module(model, path, w.active_module)


def extras(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """``adapter``'s trained copy parameters by the original's clean name."""
    out = {}
    for path, w in wrappers(model):
        if adapter in w.modules_to_save:
            for n, p in w.trained_parameters(adapter).items():
                out[_clean(f"{path}.{n}")] = p
    return out


def summary_rows(model: nn.Module) -> list[dict[str, Any]]:
    rows = []
    for path, w in wrappers(model):
        total = sum(p.numel() for p in w.original_module.parameters())
        for n in w.modules_to_save:
            ps = w.trained_parameters(n)
            count = sum(p.numel() for p in ps.values())
            shape = tuple(next(iter(ps.values())).shape) if len(ps) == 1 else None
            rows.append(dict(layer=path + ("." + next(iter(ps)) if len(ps) == 1 and w.trained[n] else ""),
                             type=type(w.original_module).__name__, shape=shape, adapter=n,
                             active=n == w.active_adapter, kind="copy", ranks="-", params=count,
                             percent=100.0 * count / max(1, total), clipped=False))
    return rows


def fmt_shape_or_dash(shape: Any) -> str:
    return "-" if shape is None else fmt_shape(shape)
