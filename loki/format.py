"""Reading and writing `.loki` files (spec: `formats/SPEC.md`). Nothing here ever unpickles.

>>> import loki, torch, transformers, tempfile, os
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> path = os.path.join(tempfile.mkdtemp(), "d.loki")
>>> _ = loki.save(loki.implant.make_delta(model, {0: ([1], torch.ones(1, 32))}), path)
>>> loki.load(path).num_rows
1
"""

from __future__ import annotations

import itertools
import os
import secrets
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from . import spec
from .delta import FORMAT_NAME, FORMAT_VERSION, Delta, LayerDelta, validate
from .errors import DeltaFormatError

MAX_HEADER_BYTES = spec.MAX_HEADER_BYTES  # (the rule, and the value both sides read, live in loki.spec)


def save(delta: Delta, path: str | os.PathLike) -> Path:
    """Write `delta` to `path` as a `.loki` file (atomically: a reader never sees half a file, and an interrupted
    save leaves the old file and no temporary one), creating missing parent folders and replacing an existing file.
    A new file gets the mode `open(path, "w")` gives (0o666 less the umask); a replaced one keeps its mode.

    Args:
        delta: the delta.
        path: the file to write (conventionally `.loki`).

    Returns:
        Path: `path`.

    Raises:
        DeltaFormatError: the delta breaks a rule of formats/SPEC.md that `read` checks (the header, which holds the
            metadata, over the 64 MiB cap; metadata not strict JSON or missing fields; bad tensors), so `read`
            would refuse the file. Nothing is written.
        InvalidIndicesError: row indices that are not sorted, unique, in range and representable as int32.

    >>> import loki.testing, os, tempfile
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"), name="x")
    >>> path = save(delta, os.path.join(tempfile.mkdtemp(), "x.loki"))
    >>> read(path).info["name"], read(path).num_rows
    ('x', 6)
    """
    path = Path(path)
    head, tensors = _encode(delta, f"{path} (not written)")
    atomic_write(path, itertools.chain([head], map(spec.encode, tensors)))
    return path


def check(delta: Delta) -> None:
    """Raise what `save` would raise for `delta`, without writing anything (no tensor data is serialised).

    Raises:
        DeltaFormatError, InvalidIndicesError: as `save`.

    >>> import loki.testing
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"))
    >>> delta.info["extra"] = {"loss": float("nan")}
    >>> check(delta)
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: Delta metadata must be strict JSON (no NaN or infinity): Out of range float ...
    """
    _encode(delta, "the delta")


def to_bytes(delta: Delta) -> bytes:
    """The `.loki` file contents of `delta`: a safetensors file with sorted keys and tensors in name order, so equal
    deltas give equal bytes (formats/SPEC.md §2-§5).

    Args:
        delta: the delta.

    Returns:
        bytes: the whole file.

    Raises:
        DeltaFormatError, InvalidIndicesError: as `save`.
        NotImplementedError: on a big-endian machine.

    >>> import loki.testing
    >>> data = to_bytes(loki.testing.random_delta(loki.testing.tiny_model("llama")))
    >>> data == to_bytes(from_bytes(data))
    True
    """
    head, tensors = _encode(delta, "the delta")
    return head + b"".join(map(spec.encode, tensors))


def _encode(delta: Delta, source: str) -> tuple[bytes, list[torch.Tensor]]:
    """The length and header of `delta`'s file, and its tensors in file order, after the reader's own checks: the
    delta's (`validate`, which `Delta()` runs on what the reader decodes) and the header's (`spec.check_header`).
    Sorted keys and tensors in name order, so equal deltas give equal bytes (the safetensors writer orders
    metadata by hash)."""
    if not isinstance(delta, Delta):
        raise DeltaFormatError(f"{source}: expected a loki Delta, got {type(delta).__name__}.")
    validate(delta)  # the delta may have changed since it was made (its info and layers are plain dicts)
    tensors: dict[str, torch.Tensor] = {}
    for i in delta.layer_indices:
        ld = delta.layers[i]
        tensors[f"layers.{i}.indices"] = spec.int32_indices(ld.indices, i)
        tensors[f"layers.{i}.fingerprint"] = ld.fingerprint
        for kind in ("rows", "lora_A", "lora_B"):
            if getattr(ld, kind) is not None:
                tensors[f"layers.{i}.{kind}"] = getattr(ld, kind)
    info = spec.dumps({**delta.info, "layers": delta.layer_indices}, compact=False)
    head, size = _header(tensors, {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "loki": info})
    spec.check_header(head, size, source)  # what the reader would refuse is refused before a byte is written
    return struct.pack("<Q", len(head)) + head, [tensors[name] for name in sorted(tensors)]


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, int]:
    """A safetensors header (sorted keys, tensors in name order, padded to 8 bytes) and the data's size in bytes."""
    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": spec.ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = spec.dumps(header).encode()
    return head + b" " * (-len(head) % 8), offset


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file of `tensors` (any name, dtypes `spec.ST_DTYPES` knows) with string `metadata`, laid out
    as `to_bytes` lays out a delta (sorted keys, tensors in name order), so equal inputs give equal bytes (the
    safetensors writer orders metadata by hash). Any safetensors reader reads it.

    >>> import safetensors.torch
    >>> data = safetensors_bytes({"b": torch.ones(2), "a": torch.zeros(1, 3)}, {"format": "x"})
    >>> sorted(safetensors.torch.load(data)), data == safetensors_bytes({"a": torch.zeros(1, 3), "b": torch.ones(2)},
    ...                                                                 {"format": "x"})
    (['a', 'b'], True)
    """
    head, _ = _header(tensors, metadata)
    return struct.pack("<Q", len(head)) + head + b"".join(spec.encode(tensors[name]) for name in sorted(tensors))


def read(path: str | os.PathLike) -> Delta:
    """Read and fully validate a `.loki` file (formats/SPEC.md §7, steps 1-4); nothing is unpickled or executed.

    Args:
        path: the `.loki` file.

    Returns:
        Delta.

    Raises:
        DeltaFormatError: no such file, a folder, an unreadable file, or anything wrong in it (a header over the
            SPEC's 64 MiB cap, truncated, corrupted, not strict JSON, not a delta, bad metadata, wrong tensors,
            non-finite rows): the rules of `loki.spec`, which `save` checks too.
        UnsupportedVersionError: a newer `format_version` than this library reads.
        InvalidIndicesError: row indices that are not int32, sorted, unique and in range.

    >>> read("missing.loki")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: No such file: missing.loki. Give the path of a .loki file (or a Hub repo id).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeltaFormatError(f"No such file: {path}. Give the path of a .loki file (or a Hub repo id).") from None
    except IsADirectoryError:
        raise DeltaFormatError(f"{path} is a folder; give the .loki file inside it.") from None
    except OSError as e:
        raise DeltaFormatError(f"Cannot read {path}: {e}") from None
    return from_bytes(data, source=str(path))


def from_bytes(data: bytes, source: str = "<bytes>") -> Delta:
    """Parse and validate the bytes of a `.loki` file (see `read`); the tensors are copied out of `data` (no
    safetensors parser: `loki.spec` holds every rule the file must meet).

    Args:
        data: the whole file.
        source: how error messages name it.

    Returns:
        Delta.

    Raises:
        DeltaFormatError: anything wrong (formats/SPEC.md §7, steps 1-3).
        UnsupportedVersionError: a newer `format_version` than this library reads.
        InvalidIndicesError: bad row indices (§7 step 4).

    >>> from_bytes(b"abc")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: <bytes> is truncated or empty (3 bytes); a .loki file is a safetensors file.
    """
    n = spec.header_length(data, source)
    entries, info, layers = spec.check_header(data[8 : 8 + n], len(data) - 8 - n, source)
    layer_deltas = {}
    for i in layers:
        names = {kind: f"layers.{i}.{kind}" for kind in spec.TENSOR_KINDS}
        parts = {
            kind: spec.decode(data, 8 + n, entries[name]) if name in entries else None for kind, name in names.items()
        }
        parts["indices"] = parts["indices"].to(torch.int64)
        layer_deltas[i] = LayerDelta(**parts)
    try:
        return Delta(layer_deltas, info)
    except DeltaFormatError as e:  # same error class, with the file named
        raise type(e)(f"{source}: {e}") from None


def atomic_write(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> Path:
    """Write `data` to `path` atomically, creating missing parent folders: readers see the old file or the whole new
    one, and any exception (KeyboardInterrupt included) while writing leaves the old file as it was and removes the
    temporary one. A new file gets the mode `open(path, "w")` gives it (0o666 less the umask); a replaced file keeps
    its mode. Every file loki replaces goes through here.

    Args:
        path: the file.
        data: the contents, or chunks of them, written as they come (a generator keeps big files out of memory).

    Returns:
        Path: `path`.

    Raises:
        OSError: the folder cannot be written.

    >>> import os, tempfile
    >>> atomic_write(os.path.join(tempfile.mkdtemp(), "a", "b.txt"), [b"he", b"llo"]).read_bytes()
    b'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    tmp = None
    try:
        fd, tmp = _new_file(path)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # as open(path, "w"): a replaced file keeps its mode
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _new_file(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path` (a unique hidden name), open for writing. Created with mode 0o666, so the
    umask and any default ACL give it what `open(path, "w")` would (tempfile's files are 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer's name: draw again
            continue
