"""Exception hierarchy: one base class, all subclasses of ``ValueError``."""

from __future__ import annotations

from typing import Any

__all__ = [
    "TuckerPeftError",
    "RankError",
    "ParamsError",
    "BackendMismatchError",
    "InitError",
]


class TuckerPeftError(ValueError):
    """Base class of every error raised by tucker_peft."""


class RankError(TuckerPeftError):
    """A rank specification that the weight shape cannot take."""


class ParamsError(TuckerPeftError):
    """A params dict with missing or extra keys, or arrays of the wrong shape."""


class BackendMismatchError(TuckerPeftError):
    """Arrays from two array libraries (or two devices) were mixed."""


class InitError(TuckerPeftError):
    """An initialisation that cannot be carried out (unknown method, bad tensor)."""


def fmt_shape(shape: Any) -> str:
    """Render a shape as ``(a, b, c)`` for messages."""
    try:
        return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    except TypeError:
        return repr(shape)
