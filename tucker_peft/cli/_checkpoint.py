"""Lazy checkpoint access: names, shapes and dtypes from the headers, one tensor read at a time.

A checkpoint is a ``.safetensors`` file, a sharded checkpoint (an
``*.safetensors.index.json`` whose ``weight_map`` sends each tensor name to a
shard file beside it), or a directory holding either::

    ck = open_checkpoint("model_dir")        # or "model.safetensors", or "model.safetensors.index.json"
    for name in ck.keys():
        print(name, ck.shape(name), ck.dtype(name))
    w = ck.get("features.0.weight")          # one np.ndarray; nothing else is read

Only the JSON headers are read when the checkpoint is opened. :meth:`Checkpoint.get`
allocates one array and reads that tensor's bytes straight into it, so the
memory it needs is the tensor's own size. (``safetensors.safe_open`` would need
about twice that: it maps the file and copies out of the mapping, and the
mapped pages count towards the process's resident size until the file is
closed.) Little-endian safetensors dtypes that NumPy has are returned as is;
``BF16`` is widened to ``float32`` exactly, with NumPy alone; the 8-bit float
types need torch (``safe_open(framework='pt')``) and raise a clear error
without it.

Model names (not paths) are resolved by an optional registry module
``tucker_peft.cli._models`` exposing ``resolve_model(name)``, which returns a
checkpoint path, an object with this module's ``Checkpoint`` interface
(``keys``, ``shape``, ``dtype``, ``get``), or None / raises ``LookupError``
for an unknown name.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from .._errors import TuckerPeftError, fmt_shape

__all__ = ["CheckpointError", "Checkpoint", "TensorInfo", "open_checkpoint", "resolve_source",
           "FLOAT_DTYPES", "ACCEPTED_FORMS"]

#: safetensors dtype codes NumPy reads directly (all stored little-endian).
_NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
#: Bits per element of every safetensors dtype code.
_BITS: dict[str, int] = {**{k: 8 * np.dtype(v).itemsize for k, v in _NUMPY_DTYPES.items()},
                         "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
                         "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
#: Floating dtype codes (candidates for adaptation).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

ACCEPTED_FORMS = ("a .safetensors file, a directory holding model.safetensors or a *.safetensors.index.json, "
                  "a *.safetensors.index.json file, or a model name known to the registry")

_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CheckpointError(TuckerPeftError):
    """A path that is not a readable checkpoint, or a tensor that cannot be read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype code, shape and absolute byte range."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _regular_file(path: str, what: str = "a safetensors file") -> int:
    """The size of ``path`` after checking it is a regular file (a FIFO or device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise CheckpointError(f"{path}: expected {what} (a regular file), got {kind}")
    return st.st_size


def _json(raw: bytes | str, path: str, what: str) -> Any:
    """Parse JSON from a file; malformed or absurdly nested JSON is a :class:`CheckpointError`."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: expected {what}, got text that is not JSON") from None
    except RecursionError:
        raise CheckpointError(f"{path}: expected {what}, got JSON nested too deeply") from None


def _int(v: Any) -> int | None:
    """``v`` if it is a JSON integer (not a bool or float), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: ``({name: TensorInfo}, metadata)``; reads nothing else.

    Every entry is checked against the format: a known dtype code, a shape of
    ints >= 0, two int data offsets inside the data, and a byte length equal
    to the shape's size in that dtype; ``__metadata__`` is a str -> str map.
    """
    size = _regular_file(path)
    expected = "a safetensors file (an 8-byte little-endian header length, then a JSON header)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: expected {expected}, got {size} bytes (too short)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                # The number is made of the file's first bytes: not echoed (it could be any file).
                raise CheckpointError(f"{path}: expected {expected}, got a header length beyond the file's "
                                      f"{size} bytes or safetensors' 100 MiB limit")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    header = _json(raw, path, expected)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a safetensors header object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: expected '__metadata__' to map strings to strings, "
                              f"got {type(meta).__name__ if not isinstance(meta, dict) else 'other values'}")
    base, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        what = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{what}: expected an object with dtype, shape and data_offsets, "
                                  f"got {type(entry).__name__}")
        dtype, shape_in, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _BITS:
            raise CheckpointError(f"{what}: expected a dtype among {', '.join(sorted(_BITS))}, "
                                  f"got {str(dtype)[:40]!r}")
        dims = [_int(d) for d in shape_in] if isinstance(shape_in, list) else [None]
        if any(d is None or d < 0 for d in dims):
            raise CheckpointError(f"{what}: expected a shape of ints >= 0, got {str(shape_in)[:80]}")
        shape = tuple(d for d in dims if d is not None)
        be = [_int(o) for o in offsets] if isinstance(offsets, list) and len(offsets) == 2 else [None]
        if any(o is None for o in be):
            raise CheckpointError(f"{what}: expected data_offsets [begin, end] of two ints, got {str(offsets)[:80]}")
        b, e = be  # type: ignore[misc]
        if not 0 <= b <= e <= data_len:
            raise CheckpointError(f"{what}: data_offsets {[b, e]} do not fit the {data_len} data bytes")
        need = -(-math.prod(shape) * _BITS[dtype] // 8)
        if need != e - b:
            raise CheckpointError(f"{what}: {dtype} of shape {fmt_shape(shape)} needs {need} bytes, "
                                  f"the header gives {e - b}")
        out[name] = TensorInfo(name, path, dtype, shape, base + b, base + e)
    return out, dict(meta)


class Checkpoint:
    """Names, shapes and dtypes of a (possibly sharded) safetensors checkpoint; tensors read on demand.

    Build it with :func:`open_checkpoint`.
    """

    def __init__(self, path: str, tensors: Mapping[str, TensorInfo], files: tuple[str, ...],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.files = files
        self.metadata = dict(metadata or {})
        self._tensors = dict(tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self._tensors)} tensors in {len(self.files)} file(s))"

    def keys(self) -> list[str]:
        """Tensor names, in file (or ``weight_map``) order."""
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype code: ``'F32'``, ``'BF16'``, ``'F16'``..."""
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    @property
    def total_nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def get(self, name: str) -> np.ndarray:
        """Read one tensor into a new NumPy array (``BF16`` comes back as ``float32``)."""
        t = self.info(name)
        np_dtype = _NUMPY_DTYPES.get(t.dtype)
        if np_dtype is not None:
            out = np.empty(t.shape, dtype=np_dtype)
            _read_into(t, out)
            return out
        if t.dtype == "BF16":
            # bfloat16 is the upper half of a float32: widen the bits, exactly, without torch.
            raw = np.empty(t.shape, dtype="<u2")
            _read_into(t, raw)
            wide = raw.astype("<u4")
            del raw
            wide <<= 16
            return wide.view("<f4")
        return _read_with_torch(t)


def _read_into(t: TensorInfo, out: np.ndarray) -> None:
    buf = out.data.cast("B")
    try:
        with open(t.file, "rb", buffering=0) as f:
            f.seek(t.start)
            got = 0
            while got < len(buf):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(buf[got:])
                if not n:
                    raise CheckpointError(f"{t.file}: tensor {t.name!r} is truncated ({got} of {len(buf)} bytes)")
                got += n
    except OSError as exc:
        raise CheckpointError(f"{t.file}: cannot read tensor {t.name!r} ({exc.strerror or exc})") from None


def _read_with_torch(t: TensorInfo) -> np.ndarray:
    try:
        import torch  # noqa: F401  (only for dtypes NumPy lacks)
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{t.file}: tensor {t.name!r} is stored as {t.dtype}, which NumPy cannot represent; "
                              "install torch to read it") from None
    try:
        with safe_open(t.file, framework="pt") as f:
            return f.get_tensor(t.name).float().numpy()
    except Exception as exc:  # safetensors and torch raise their own types
        raise CheckpointError(f"{t.file}: cannot read tensor {t.name!r} of dtype {t.dtype} "
                              f"({type(exc).__name__}: {exc})") from None


#: Largest index file read (a real one is a few MB at most).
_MAX_INDEX = 256 * 2**20


def _shard_path(index_path: str, roots: tuple[str, ...], name: str, shard: Any) -> str:
    """The shard file of ``weight_map[name]``, resolved (symlinks followed) inside one of ``roots``, or refused."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index_path}: weight_map[{name!r}]: expected a shard file name, got {str(shard)[:80]!r}")
    if os.path.isabs(shard):
        raise CheckpointError(f"{index_path}: weight_map[{name!r}]: expected a shard file inside the checkpoint "
                              f"folder, got the absolute path {shard!r}")
    real = os.path.realpath(os.path.join(roots[0], shard))
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise CheckpointError(f"{index_path}: weight_map[{name!r}]: expected a shard file inside the checkpoint "
                              f"folder {roots[0]}, got {shard!r}, which resolves outside it")
    return real


def _open_index(path: str) -> Checkpoint:
    size = _regular_file(path, "a sharded-checkpoint index (JSON)")
    if size > _MAX_INDEX:
        raise CheckpointError(f"{path}: expected a sharded-checkpoint index of at most {_MAX_INDEX >> 20} MiB, "
                              f"got {size} bytes")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    index = _json(raw, path, "a JSON index of a sharded checkpoint")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{path}: expected a sharded-checkpoint index with a non-empty 'weight_map' "
                              "(tensor name -> shard file)")
    # Shards resolve inside the index's folder, or inside the folder the index itself links to
    # (the Hugging Face cache links both the index and the shards into blobs/).
    roots = (os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.dirname(os.path.realpath(path)))
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, shard in wmap.items():
        file = _shard_path(path, roots, name, shard)
        if file not in headers:
            if not os.path.exists(file):
                raise CheckpointError(f"{path}: shard {shard!r} (of tensor {name!r}) does not exist")
            headers[file] = read_header(file)[0]
        info = headers[file].get(name)
        if info is None:
            raise CheckpointError(f"{path}: weight_map sends {name!r} to {shard!r}, which has no such tensor")
        tensors[name] = info
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(path, tensors, tuple(headers), {str(k): str(v) for k, v in meta.items()})


def _open_file(path: str) -> Checkpoint:
    tensors, meta = read_header(path)
    return Checkpoint(path, tensors, (path,), meta)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily (headers only).

    Parameters
    ----------
    path : str or PathLike
        A ``.safetensors`` file; a ``*.safetensors.index.json`` (sharded); or
        a directory holding ``*.safetensors.index.json`` (``model.safetensors.index.json``
        preferred when there are several), else ``model.safetensors``, else a
        single ``*.safetensors`` file.

    Raises
    ------
    CheckpointError
        The path does not exist or holds no readable checkpoint.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        entries = sorted(os.listdir(p))
        indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
        if "model.safetensors.index.json" in indexes:
            indexes = ["model.safetensors.index.json"]
        if len(indexes) == 1:
            return _open_index(os.path.join(p, indexes[0]))
        if len(indexes) > 1:
            raise CheckpointError(f"{p}: expected one *.safetensors.index.json, found {len(indexes)} ({', '.join(indexes)}); "
                                  "pass the one to use")
        if "model.safetensors" in entries:
            return _open_file(os.path.join(p, "model.safetensors"))
        files = [e for e in entries if e.endswith(".safetensors")]
        if len(files) == 1:
            return _open_file(os.path.join(p, files[0]))
        found = f"{len(files)} *.safetensors files without an index" if files else "no safetensors file"
        raise CheckpointError(f"{p}: expected model.safetensors or a *.safetensors.index.json in the directory, "
                              f"found {found}")
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: does not exist; expected {ACCEPTED_FORMS}")
    if p.endswith(".json"):
        return _open_index(p)
    return _open_file(p)


def _is_checkpoint_like(obj: Any) -> bool:
    return all(callable(getattr(obj, a, None)) for a in ("keys", "shape", "dtype", "get"))


def resolve_source(arg: str) -> Any:
    """A checkpoint from a path, or from a model name through the registry ``tucker_peft.cli._models``.

    The registry's ``resolve_checkpoint(name)`` is used when it has one, else
    its ``resolve_model(name)``; either may return a checkpoint path or an
    object with the :class:`Checkpoint` interface (``keys``, ``shape``,
    ``dtype``, ``get``), and returns None or raises ``LookupError`` for an
    unknown name.

    Raises
    ------
    CheckpointError
        Neither an existing path nor a name the registry knows (one-line message
        listing the accepted forms), or an unreadable checkpoint.
    """
    if os.path.exists(arg):
        return open_checkpoint(arg)
    note = " (no model registry is installed)"
    registry: Any = None
    try:
        from . import _models as registry
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._models":
            note = f" (the model registry could not be loaded: {exc})"
    except ImportError as exc:
        note = f" (the model registry could not be loaded: {exc})"
    resolver = None
    if registry is not None:
        resolver = getattr(registry, "resolve_checkpoint", None) or getattr(registry, "resolve_model", None)
    if resolver is not None:
        note = ""
        try:
            found = resolver(arg)
        except LookupError as exc:
            found, note = None, f" ({str(exc).strip(chr(39)).strip(chr(34))})"
        if found is not None:
            if _is_checkpoint_like(found):
                return found
            if isinstance(found, (str, os.PathLike)):
                return open_checkpoint(found)
            raise CheckpointError(f"the model registry resolved {arg!r} to a {type(found).__name__}; "
                                  "expected a checkpoint or a checkpoint path")
    raise CheckpointError(f"{arg!r} is neither an existing path nor a known model name{note}; expected {ACCEPTED_FORMS}")
