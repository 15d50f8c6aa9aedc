"""``AdapterConfig.trainable`` with PEFT's ``modules_to_save`` semantics: one trainable copy per adapter.

A module named by ``trainable`` is wrapped in :class:`ModulesToSave`, which
holds the original (never trained) and one deep copy per adapter. The forward
runs the active adapter's copy, or the original when adapters are off or the
active adapter has no copy. A ``trainable`` entry that names parameters
(``'6.bias'``, also the bias of an adapted layer) gets the same per parameter:
:class:`ParameterCopies`, a ``torch.nn.utils.parametrize`` hook that hands out
the active adapter's copy of that parameter alone.

State-dict keys: the original's tensors keep the module's own keys
(``classifier.weight``), so a plain model loads them; the copies sit under
``classifier.modules_to_save.<adapter>.*``, which a plain model does not have.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..._errors import TuckerPeftError, fmt_shape

__all__ = ["ModulesToSave", "ParameterCopies"]

ORIGINAL = "original_module"
COPIES = "modules_to_save"
# Path parts of modules that adapters add (their parameters are not the model's own).
_ADAPTED = ("base_layer", "parametrizations", "adapters", "adapter_stacks")


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


class ParameterCopies(nn.Module):
    """A parametrization: one parameter's copy per adapter; the active adapter's copy, or the original, is used.

    For ``trainable`` entries that name parameters (``'head.bias'``), also of
    adapted layers. The owner's state-dict key of the parameter stays its own
    (``head.bias``); copies sit at ``head.parametrizations.bias.0.modules_to_save.<adapter>``.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.modules_to_save = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.layer_name = name
        self.handles: list[Any] = []

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        a = self.active_adapter
        return original if a is None else self.modules_to_save[a]

    def set_active(self, adapter: str | None, trainable: bool = True) -> None:
        self.active_adapter = adapter if adapter in self.modules_to_save else None
        for n, p in self.modules_to_save.items():
            p.requires_grad_(trainable and n == self.active_adapter)


def _param_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, *,
                           attr: str) -> None:
    """``prefix.parametrizations.ATTR.original`` → ``prefix.ATTR``, in place in the key order."""
    old = f"{prefix}parametrizations.{attr}.original"
    if old not in state_dict:
        return
    items = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    for k, v in items:
        state_dict[prefix + attr if k == old else k] = v


def _param_load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, attr: str) -> None:
    if prefix + attr in state_dict:
        state_dict[f"{prefix}parametrizations.{attr}.original"] = state_dict.pop(prefix + attr)


def _param_copies(model: nn.Module) -> Iterator[tuple[nn.Module, str, ParameterCopies]]:
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                for pc in plist:
                    if isinstance(pc, ParameterCopies):
                        yield mod, attr, pc


def _add_param_copy(mod: nn.Module, attr: str, clean: str, adapter: str, undo: list[Callable[[], None]]) -> None:
    pc = next((p for p in mod.parametrizations[attr] if isinstance(p, ParameterCopies)), None) \
        if parametrize.is_parametrized(mod, attr) else None
    if pc is None:
        pc = ParameterCopies(clean)
        parametrize.register_parametrization(mod, attr, pc, unsafe=True)
        pc.handles = [mod.register_state_dict_post_hook(functools.partial(_param_state_dict_hook, attr=attr)),
                      mod.register_load_state_dict_pre_hook(functools.partial(_param_load_hook, attr=attr))]
        undo.append(lambda: _remove_param_copies(mod, attr, pc, leave=False))
    if adapter in pc.modules_to_save:
        raise TuckerPeftError(f"adapter_name: {adapter!r} already has a copy of {clean!r}; expected a new name")
    original = mod.parametrizations[attr].original
    pc.modules_to_save[adapter] = nn.Parameter(original.detach().clone(), requires_grad=False)
    undo.append(lambda: pc.modules_to_save.pop(adapter))


def _remove_param_copies(mod: nn.Module, attr: str, pc: ParameterCopies, leave: bool) -> None:
    """Back to a plain parameter: the original (``leave=False``) or the value in use now."""
    for h in pc.handles:
        h.remove()
    parametrize.remove_parametrizations(mod, attr, leave_parametrized=leave)


# -- resolving AdapterConfig.trainable --------------------------------------------------

def _internal(name: str) -> bool:
    parts = name.split(".")
    return any(p in parts for p in _ADAPTED + (ORIGINAL, COPIES))


def _clean(name: str) -> str:
    """A name as in the unadapted model (no wrapper or adapter parts)."""
    name = re.sub(rf"(^|\.)(?:{ORIGINAL}|base_layer)\.", r"\1", name)
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)


def _clean_path(name: str) -> str:
    return _clean(name + ".")[:-1] if name else name


def _matches(name: str, entry: str, regex: bool) -> bool:
    if regex:
        return re.fullmatch(entry, name) is not None
    return name == entry or name.endswith("." + entry)


@dataclass
class Resolved:
    """What ``AdapterConfig.trainable`` designates in a model (names as in the unadapted model)."""

    modules: dict[str, frozenset[str] | None] = field(default_factory=dict)  # path → params to train (None: all)
    params: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (raw owner path, attr)


def resolve(model: nn.Module, patterns: Any, targets: tuple[str, ...] = ()) -> Resolved:
    """Resolve ``patterns`` against ``model``; ``targets`` are parameter paths about to be adapted.

    Raises
    ------
    TuckerPeftError
        For an entry that matches nothing, a module copy that would hold an
        adapted layer, or a parameter that is itself adapted.
    """
    from ._layers import AdaptedLayer, DeltaParametrization
    out = Resolved()
    if patterns is None:
        return out
    regex = isinstance(patterns, str)
    entries = [patterns] if regex else list(patterns)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    adapted_w = set(targets)                              # adapted weights (clean names)
    adapted_m = {t.rpartition(".")[0] for t in targets}   # modules holding them
    param_copied: set[str] = set()                        # modules with parameter copies
    modules: dict[str, str] = {}
    for n, m in model.named_modules():
        c = _clean_path(n)
        if isinstance(m, AdaptedLayer):
            adapted_m.add(c)
            adapted_w.add(f"{c}.weight" if c else "weight")
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                if any(isinstance(h, DeltaParametrization) for h in plist):
                    adapted_m.add(c)
                    adapted_w.add(f"{c}.{attr}" if c else attr)
                if any(isinstance(h, ParameterCopies) for h in plist):
                    param_copied.add(c)
        parts = n.split(".")
        if n and not any(p in parts for p in _ADAPTED + (COPIES,)) and parts[-1] != ORIGINAL:
            modules[c] = n
    params: dict[str, tuple[str, str]] = {}
    for n, _ in model.named_parameters():
        parts = n.split(".")
        if "adapters" in parts or COPIES in parts:
            continue
        if "parametrizations" in parts and parts[-1] == "original":  # a parametrized tensor: owner.parametrizations.A
            i = parts.index("parametrizations")
            raw_owner, attr = ".".join(parts[:i]), parts[i + 1]
        else:
            raw_owner, attr = n.rpartition(".")[0], parts[-1]
        params[_clean(n)] = (raw_owner, attr)

    def wrapper_of(path: str) -> tuple[str, str] | None:
        for w in wrapped:
            if path == w or path.startswith(w + "."):
                return w, path[len(w) + 1:]
        return None

    def add_module(path: str, names: frozenset[str] | None) -> None:
        bad = [a for a in adapted_m if a == path or a.startswith(path + ".") or path.startswith(a + ".")]
        if bad:
            raise TuckerPeftError(f"trainable: module {path!r} holds or is inside the adapted layer "
                                  f"{sorted(bad)[0]!r}; "
                                  "expected modules outside the adapted layers (name a parameter, e.g. its bias, to "
                                  "train it alone)")
        inner = [a for a in param_copied if a == path or a.startswith(path + ".")]
        if inner:
            raise TuckerPeftError(f"trainable: module {path!r} holds parameters that another adapter copies alone "
                                  f"(in {sorted(inner)[0]!r}); expected the same entries for every adapter")
        w = wrapper_of(path)
        if w is not None and w[1]:  # inside a module that is already copied: train that part of it
            sub = model.get_submodule(modules[path])
            own = names if names is not None else [n for n, _ in sub.named_parameters()]
            names = frozenset(f"{w[1]}.{k}" for k in own)
            path = w[0]
        old = out.modules.get(path, frozenset())
        out.modules[path] = None if names is None or old is None else old | names

    def add_param(name: str) -> None:
        if name in adapted_w:
            raise TuckerPeftError(f"trainable: {name!r} is an adapted weight; expected other parameters "
                                  "(biases, norms) or modules")
        raw_owner, attr = params[name]
        owner = name.rpartition(".")[0]
        w = wrapper_of(owner) if owner else None
        if w is not None:
            add_module(owner, frozenset([attr]))
        else:
            out.params[name] = (raw_owner, attr)

    unmatched = []
    for e in entries:
        mods = [n for n in modules if _matches(n, e, regex)]
        mods = [n for n in mods if not any(n.startswith(o + ".") for o in mods)]  # outermost only
        hits = [n for n in params if _matches(n, e, regex) and not any(n.startswith(o + ".") for o in mods)]
        if not mods and not hits:
            unmatched.append(e)
            continue
        for n in mods:
            add_module(n, None)
        for n in hits:
            add_param(n)
    if unmatched:
        listing = ", ".join(repr(n) for n in list(modules)[:12]) + (" ..." if len(modules) > 12 else "")
        raise TuckerPeftError(f"trainable: {unmatched!r} matched no module or parameter; expected names "
                              f"(full, or a suffix after a dot) or a regex of modules such as {listing}")
    for name in list(out.params):  # a parameter inside a module copied as a whole comes with it
        if any(name.startswith(u + ".") for u, names in out.modules.items() if names is None):
            del out.params[name]
    return out


# -- model-level operations ------------------------------------------------------------

def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for n, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield n, m


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_copies(model: nn.Module, adapter: str, res: Resolved, undo: list[Callable[[], None]]) -> None:
    """Give ``adapter`` its copies (wrapping modules first); ``undo`` collects how to take them back."""
    for path, names in res.modules.items():
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
    for name, (raw_owner, attr) in res.params.items():
        _add_param_copy(model.get_submodule(raw_owner), attr, name, adapter, undo)


def switchable(model: nn.Module) -> Iterator[tuple[str, ModulesToSave | ParameterCopies]]:
    yield from wrappers(model)
    for _, _, pc in _param_copies(model):
        yield pc.layer_name, pc


def check_active(model: nn.Module, names: Any) -> None:
    """Several active adapters may not each have a copy of one module (which would run?)."""
    names = _names(names)
    for path, w in switchable(model):
        have = [n for n in names if n in w.modules_to_save]
        if len(have) > 1:
            raise TuckerPeftError(f"adapter_name: {have} each have their own copy of {path!r}, and only one copy "
                                  "can run; expected at most one of them active")


def set_active(model: nn.Module, names: Any, trainable: bool = True) -> None:
    """Run the copies of the active adapter(s) ``names`` (None: the originals)."""
    names = _names(names)
    check_active(model, names)
    for _, w in switchable(model):
        have = [n for n in names if n in w.modules_to_save]
        w.set_active(have[0] if have else None, trainable)


def _names(names: Any) -> tuple[str, ...]:
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def switch_off(model: nn.Module) -> list[tuple[Any, str | None]]:
    """Run the originals; returns what :func:`switch_back` restores."""
    saved = [(w, w.active_adapter) for _, w in switchable(model)]
    for w, _ in saved:
        w.active_adapter = None
    return saved


def switch_back(saved: list[tuple[Any, str | None]]) -> None:
    for w, a in saved:
        w.active_adapter = a


def delete(model: nn.Module, adapter: str) -> None:
    """Drop ``adapter``'s copies; a module or parameter left without copies is the plain original again."""
    for path, w in list(wrappers(model)):
        if adapter in w.modules_to_save:
            w.remove(adapter)
            if not len(w.modules_to_save):
                _set_module(model, path, w.original_module)
    for mod, attr, pc in list(_param_copies(model)):
        if adapter in pc.modules_to_save:
            pc.modules_to_save.pop(adapter)
            if pc.active_adapter == adapter:
                pc.active_adapter = None
            if not len(pc.modules_to_save):
                _remove_param_copies(mod, attr, pc, leave=False)


def unload(model: nn.Module) -> None:
    """Each wrapper becomes the module that runs now (the active adapter's copy, else the original)."""
    for path, w in list(wrappers(model)):
        _set_module(model, path, w.active_module)
    for mod, attr, pc in list(_param_copies(model)):
        _remove_param_copies(mod, attr, pc, leave=True)


def extras(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """``adapter``'s trained copy parameters by the original's clean name."""
    out = {}
    for path, w in wrappers(model):
        if adapter in w.modules_to_save:
            for n, p in w.trained_parameters(adapter).items():
                out[_clean(f"{path}.{n}")] = p
    for _, _, pc in _param_copies(model):
        if adapter in pc.modules_to_save:
            out[pc.layer_name] = pc.modules_to_save[adapter]
    return out


def summary_rows(model: nn.Module) -> list[dict[str, Any]]:
    rows = []
    for path, w in wrappers(model):
        total = sum(p.numel() for p in w.original_module.parameters())
        for n in w.modules_to_save:
            ps = w.trained_parameters(n)
            count = sum(p.numel() for p in ps.values())
            one = len(ps) == 1 and w.trained[n] is not None
            rows.append(dict(layer=path + ("." + next(iter(ps)) if one else ""),
                             type=type(w.original_module).__name__,
                             shape=tuple(next(iter(ps.values())).shape) if one else None,
                             adapter=n, active=n == w.active_adapter, kind="copy", ranks="-", params=count,
                             percent=100.0 * count / max(1, total), clipped=False))
    for mod, _, pc in _param_copies(model):
        for n, p in pc.modules_to_save.items():
            rows.append(dict(layer=pc.layer_name, type="Parameter", shape=tuple(p.shape), adapter=n,
                             active=n == pc.active_adapter, kind="copy", ranks="-", params=p.numel(), percent=100.0,
                             clipped=False))
    return rows


def fmt_shape_or_dash(shape: Any) -> str:
    return "-" if shape is None else fmt_shape(shape)
