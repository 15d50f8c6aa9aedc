"""One atomic file writer and one adapter-file format, used by every writer in the package.

Atomic writes
-------------
:func:`atomic_write` writes a new file under a temporary name in the
target's own directory (same file system), flushes and fsyncs it, renames it
over the target with :func:`os.replace` and fsyncs the directory. A reader
(or a crash at any instant) sees either the whole old file or the whole new
one. A killed writer leaves only its temporary file, whose name starts with
:data:`TEMP_PREFIX` and records the host and process id; the next write into
that directory removes such files whose process is gone (or that are older
than a day when written by another host). Nothing else is ever deleted.

Adapter format
--------------
An adapter is ONE safetensors file, :data:`ADAPTER_FILE`, whose metadata
carries the whole configuration::

    __metadata__ = {"format": "tucker_peft.model_adapter/2",
                    "config": JSON {"library_version", "adapter_name", "config",
                                    "layers": {param path: {"spec", "scale", "base_shape", "dtype",
                                                            "module_type", "has_init"}},
                                    "trainable": [base parameter names],
                                    "stacks": {group: {"spec", "scale", "dtype", "has_init",
                                                       "modes": [[capture name, [values]], ...]}}}}
    tensors        "{param path}::{name}"        adapter params
                   "{param path}::init::{name}"  params ΔW started from ('hosvd' init)
                   "base::{param name}"          the adapter's trained copies of base parameters
                   "stack::{group}::{name}"      a cross-layer group's params (and "::init::{name}"),
                                                 once; each member's layer entry is {"stack", "index",
                                                 "base_shape", "module_type"} (``AdapterConfig.stack``)

Weights and configuration can therefore never come from two different saves,
and one :func:`os.replace` replaces the whole adapter. The name is
distinctive on purpose: transformers and PEFT treat ``adapter_config.json``
as a PEFT adapter, so a tucker_peft adapter can share a directory with
``save_pretrained`` output (and with a PEFT export). The pair written by
version 1 (``adapter_config.json`` with format ``tucker_peft.torch_adapter/1``
plus ``adapter_model.safetensors``) still loads, with the same validation.

Every file is read once, into memory, through one handle (never mmap'd and
reopened), so a concurrent :func:`os.replace` cannot mix two versions.
This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ._errors import TuckerPeftError

__all__ = ["atomic_write", "ADAPTER_FILE", "FORMAT", "LEGACY_FORMAT", "AdapterFile", "read_adapter",
           "write_adapter", "adapter_marker", "safetensors_metadata", "check_path"]

#: The adapter file (the marker that a directory holds a tucker_peft adapter).
ADAPTER_FILE = "tucker_peft_adapter.safetensors"
FORMAT = "tucker_peft.model_adapter/2"
#: Version 1: two files, read only.
LEGACY_FORMAT = "tucker_peft.torch_adapter/1"
LEGACY_CONFIG = "adapter_config.json"
LEGACY_WEIGHTS = "adapter_model.safetensors"
#: Prefix of temporary files; a stale one is removed by the next write into its directory.
TEMP_PREFIX = ".tucker_peft-tmp-"
STALE_FOREIGN_S = 24 * 3600.0


def _error(msg: str) -> TuckerPeftError:
    # StateDictError lives in adapter.py (which imports numpy); import it only when raising.
    from .adapter import StateDictError
    return StateDictError(msg)


def check_path(path: Any, what: str = "path") -> str:
    """``os.fspath(path)`` for a str or PathLike naming text; anything else is a clear error."""
    if isinstance(path, (str, os.PathLike)):
        p = os.fspath(path)
        if isinstance(p, str) and p:
            return p
    raise _error(f"{what}: expected a directory path (str or os.PathLike), got {path!r}")


# -- atomic writes ---------------------------------------------------------------------

def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # unknown; the age rule decides
    if pid == os.getpid():
        return True  # another thread's write in flight (a failed write of ours removes its own file)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temps(directory: str) -> list[str]:
    """Remove temporary files of killed writers in ``directory``; return their names.

    Only names starting with :data:`TEMP_PREFIX` are considered: those of a
    dead process on this host, or of another host and older than a day.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for n in names:
        if not n.startswith(TEMP_PREFIX):
            continue
        parts = n[len(TEMP_PREFIX):].split("-", 3)  # host-pid-token-target (host has '-' escaped as '_')
        full = os.path.join(directory, n)
        try:
            host, pid = parts[0], int(parts[1])
        except (IndexError, ValueError):
            continue
        try:
            old = now - os.lstat(full).st_mtime > STALE_FOREIGN_S
            if (not _alive(host, pid) or old) and os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
                removed.append(n)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Replace ``path`` by new content atomically (all or nothing, also after a crash).

    Parameters
    ----------
    path : str or PathLike
        The file to write; its directory must exist.
    data : bytes or callable
        The content, or ``write(tmp_path)`` that writes it to the given path.

    Notes
    -----
    The temporary file is created in ``path``'s directory with mode 0666 less
    the umask, fsynced, renamed over ``path`` and the directory fsynced. On an
    exception it is removed and ``path`` is untouched; after a kill it is left
    and removed by the next :func:`atomic_write` into that directory.
    """
    path = os.path.abspath(os.fspath(path))
    d, name = os.path.split(path)
    clean_stale_temps(d)
    host = socket.gethostname().replace("-", "_")
    tmp = os.path.join(d, f"{TEMP_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}-{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            fd = -1
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


# -- safetensors bytes -------------------------------------------------------------------

def safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (validated, bounded)."""
    if len(data) < 8:
        raise _error(f"{where}: expected a readable safetensors file, got a corrupt or truncated one ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise _error(f"{where}: expected a readable safetensors file, got a corrupt or truncated one (header of {n} bytes, file of {len(data)})")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _error(f"{where}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _error(f"{where}: corrupt safetensors header (expected a JSON object, got {type(header).__name__})")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _error(f"{where}: safetensors __metadata__ must map strings to strings")
    return meta


def load_tensors(data: bytes, where: str, framework: str = "torch") -> dict[str, Any]:
    """All tensors of an in-memory safetensors file (``framework`` 'torch' or 'numpy')."""
    try:
        if framework == "torch":
            from safetensors.torch import load
        else:
            from safetensors.numpy import load
        return dict(load(bytes(data)))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise _error(f"{where}: expected a readable safetensors file, got a corrupt or truncated one ({type(exc).__name__}: {exc})") from None


def _serialize(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    if any(type(v).__module__.startswith("torch") for v in tensors.values()):
        from safetensors.torch import save
    else:
        from safetensors.numpy import save
    return save(dict(tensors), metadata=dict(metadata))


def read_file_once(path: str) -> bytes:
    """A regular file's bytes, read through one handle."""
    with open(path, "rb") as f:
        if not os.path.isfile(path):  # pragma: no cover - raced into something else
            raise _error(f"{path}: expected a regular file")
        return f.read()


# -- the adapter file ----------------------------------------------------------------------

@dataclass
class AdapterFile:
    """An adapter read from disk: its configuration (validated top level) and the raw tensor bytes."""

    path: str          # the file that holds the tensors
    config: dict        # {"library_version", "adapter_name", "config", "layers", "trainable"}
    data: bytes
    legacy: bool = False

    def tensors(self, framework: str = "torch") -> dict[str, Any]:
        return load_tensors(self.data, self.path, framework)


def adapter_marker(directory: str) -> str | None:
    """The file that marks ``directory`` as holding a tucker_peft adapter, or None.

    The version-2 file, or a version-1 ``adapter_config.json`` whose format is
    tucker_peft's (a PEFT adapter's is not).
    """
    new = os.path.join(directory, ADAPTER_FILE)
    if os.path.isfile(new) and not os.path.islink(new):
        return new
    return os.path.join(directory, LEGACY_CONFIG) if adapter_marker_legacy(directory) else None


def _parse_config(text: Any, where: str) -> dict:
    try:
        cfg = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError) as exc:
        raise _error(f"{where}: adapter config is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(cfg, dict):
        raise _error(f"{where}: adapter config: expected a JSON object, got {type(cfg).__name__}")
    layers = cfg.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise _error(f"{where}: adapter config: expected 'layers' to map parameter paths to objects, "
                     f"got {type(layers).__name__}")
    for key in ("config",):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise _error(f"{where}: adapter config: expected {key!r} to be an object, got {type(cfg[key]).__name__}")
    stacks = cfg.get("stacks", {})
    if not isinstance(stacks, dict) or not all(isinstance(v, dict) for v in stacks.values()):
        raise _error(f"{where}: adapter config: expected 'stacks' to map group names to objects, "
                     f"got {type(stacks).__name__}")
    tr = cfg.get("trainable", [])
    if not isinstance(tr, list) or not all(isinstance(t, str) for t in tr):
        raise _error(f"{where}: adapter config: expected 'trainable' to be a list of names, got {tr!r:.80}")
    name = cfg.get("adapter_name")
    if name is not None and not isinstance(name, str):
        raise _error(f"{where}: adapter config: expected 'adapter_name' to be a string, got {name!r:.80}")
    return cfg


def read_adapter(directory: Any) -> AdapterFile:
    """Read the adapter in ``directory`` (version 2, else the version-1 pair), each file once.

    Raises
    ------
    StateDictError
        Not a path, no adapter there, corrupt file, wrong format, malformed config.
    """
    d = check_path(directory)
    new = os.path.join(d, ADAPTER_FILE)
    try:
        data = read_file_once(new)
    except FileNotFoundError:
        data = None
    except IsADirectoryError:
        raise _error(f"{new}: expected a file, got a directory") from None
    except OSError as exc:
        raise _error(f"{new}: cannot read it ({exc})") from None
    if data is not None:
        meta = safetensors_metadata(data, new)
        if meta.get("format") != FORMAT:
            raise _error(f"{new}: expected format {FORMAT!r}, got {meta.get('format')!r}")
        return AdapterFile(new, _parse_config(meta.get("config"), new), data)
    cfg_path, w_path = os.path.join(d, LEGACY_CONFIG), os.path.join(d, LEGACY_WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise _error(f"path: expected an adapter directory with {ADAPTER_FILE} (or the older {LEGACY_CONFIG} + "
                     f"{LEGACY_WEIGHTS}), but {d} does not exist or has neither")
    try:
        text, data = read_file_once(cfg_path), read_file_once(w_path)
    except OSError as exc:
        raise _error(f"{d}: cannot read the adapter ({exc})") from None
    cfg = _parse_config(text, cfg_path)
    if cfg.get("format") != LEGACY_FORMAT:
        raise _error(f"{cfg_path}: expected format {LEGACY_FORMAT!r} with a 'layers' table, got format "
                     f"{cfg.get('format')!r}")
    safetensors_metadata(data, w_path)
    return AdapterFile(w_path, cfg, data, legacy=True)


def write_adapter(directory: str | os.PathLike, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Write one adapter file into ``directory`` (created if needed), atomically; return its path.

    ``tensors`` may be torch tensors or NumPy arrays (host, contiguous);
    ``config`` is the JSON object described in the module docstring.
    A version-1 pair in the directory that is tucker_peft's own (format
    checked) is removed afterwards, so that only one adapter is there.
    """
    d = os.fspath(directory)
    if os.path.lexists(d) and not os.path.isdir(d):
        raise _error(f"path: expected a directory for the adapter, got {d!r}, which is a file")
    os.makedirs(d, exist_ok=True)
    payload = _serialize(tensors, {"format": FORMAT, "config": json.dumps(dict(config), allow_nan=False)})
    target = os.path.join(d, ADAPTER_FILE)
    atomic_write(target, payload)
    if adapter_marker_legacy(d):
        for n in (LEGACY_WEIGHTS, LEGACY_CONFIG):  # weights first: a half-removed pair never loads
            try:
                os.unlink(os.path.join(d, n))
            except OSError:
                pass
        _fsync_dir(d)
    return target


def adapter_marker_legacy(directory: str) -> bool:
    """Whether ``directory`` holds tucker_peft's own version-1 pair."""
    old = os.path.join(directory, LEGACY_CONFIG)
    if not os.path.isfile(old) or os.path.islink(old):
        return False
    try:
        with open(old, "rb") as f:
            cfg = json.loads(f.read(1 << 24))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == LEGACY_FORMAT
