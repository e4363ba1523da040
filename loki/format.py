"""Reading and writing `.loki` files (spec: `formats/SPEC.md`). Nothing here ever unpickles.

>>> import loki, torch, transformers, tempfile, os
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> path = os.path.join(tempfile.mkdtemp(), "d.loki")
>>> _ = loki.save(loki.make_delta(model, {0: ([1], torch.ones(1, 32))}), path)
>>> loki.load(path).num_rows
1
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from .delta import FORMAT_NAME, FORMAT_VERSION, Delta, LayerDelta
from .errors import DeltaFormatError, InvalidIndicesError, UnsupportedVersionError

MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32"}
_TENSOR_KINDS = ("indices", "fingerprint", "rows", "lora_A", "lora_B")


def save(delta: Delta, path: str | os.PathLike) -> Path:
    """Write `delta` to `path` as a `.loki` file (atomically: a reader never sees half a file), creating missing
    parent folders and replacing an existing file.

    Args:
        delta: the delta (already validated when it was made).
        path: the file to write (conventionally `.loki`).

    Returns:
        Path: `path`.

    >>> import loki.testing, os, tempfile
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"), name="x")
    >>> path = save(delta, os.path.join(tempfile.mkdtemp(), "x.loki"))
    >>> read(path).info["name"], read(path).num_rows
    ('x', 6)
    """
    path = Path(path)
    _atomic_write(path, to_bytes(delta))
    return path


def to_bytes(delta: Delta) -> bytes:
    """The `.loki` file contents of `delta`: a safetensors file with sorted keys and tensors in name order, so equal
    deltas give equal bytes (formats/SPEC.md §2-§5).

    Args:
        delta: the delta.

    Returns:
        bytes: the whole file.

    Raises:
        NotImplementedError: on a big-endian machine.

    >>> import loki.testing
    >>> data = to_bytes(loki.testing.random_delta(loki.testing.tiny_model("llama")))
    >>> data == to_bytes(from_bytes(data))
    True
    """
    tensors: dict[str, torch.Tensor] = {}
    for i in delta.layer_indices:
        ld = delta.layers[i]
        tensors[f"layers.{i}.indices"] = ld.indices.to(torch.int32)
        tensors[f"layers.{i}.fingerprint"] = ld.fingerprint
        for kind in ("rows", "lora_A", "lora_B"):
            t = getattr(ld, kind)
            if t is not None:
                tensors[f"layers.{i}.{kind}"] = t.contiguous()
    info = {**delta.info, "layers": delta.layer_indices}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "loki": json.dumps(info, sort_keys=True)}
    return _safetensors_bytes(tensors, meta)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with sorted keys and tensors in name order, so equal deltas give equal bytes
    (the safetensors writer orders metadata by hash)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    if sys.byteorder != "little":  # safetensors is little-endian; so is every platform torch ships for
        raise NotImplementedError("Writing .loki files needs a little-endian machine.")
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def read(path: str | os.PathLike) -> Delta:
    """Read and fully validate a `.loki` file (formats/SPEC.md §7, steps 1-4); nothing is unpickled or executed.

    Args:
        path: the `.loki` file.

    Returns:
        Delta.

    Raises:
        DeltaFormatError: no such file, a folder, an unreadable file, or anything wrong in it (truncated,
            corrupted, not a delta, bad metadata, wrong tensors, non-finite rows).
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
    """Parse and validate the bytes of a `.loki` file (see `read`).

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
    header = _parse_header(data, source)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DeltaFormatError(
            f"{source} is a safetensors file but not a .loki delta (no 'format: loki' metadata). "
            "PEFT adapters and model checkpoints are not deltas; make one with loki.make_delta or loki.extract."
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise DeltaFormatError(f"{source}: format_version {meta.get('format_version')!r} is not an integer.") from None
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{source} is .loki format version {version}; this loki reads version {FORMAT_VERSION} and older. "
            "Upgrade loki (pip install -U loki)."
        )
    if version < 1:
        raise DeltaFormatError(f"{source}: format_version must be >= 1, got {version}.")
    try:
        info = json.loads(meta.get("loki", ""))
    except (json.JSONDecodeError, TypeError):
        raise DeltaFormatError(f"{source}: the 'loki' metadata entry is not valid JSON.") from None
    if not isinstance(info, dict):
        raise DeltaFormatError(f"{source}: the 'loki' metadata entry must be a JSON object.")
    layers = info.pop("layers", None)
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise DeltaFormatError(f"{source}: metadata 'layers' must be a list of layer numbers.")
    if len(set(layers)) != len(layers):
        raise DeltaFormatError(f"{source}: metadata 'layers' lists a layer twice.")
    form = info.get("form")
    kinds = ("indices", "fingerprint", "rows") if form == "rows" else ("indices", "fingerprint", "lora_A", "lora_B")
    expected = {f"layers.{i}.{k}" for i in layers for k in kinds}
    if set(header) != expected:
        extra, missing = sorted(set(header) - expected), sorted(expected - set(header))
        raise DeltaFormatError(
            f"{source}: tensors do not match the metadata (form {form!r}, layers {layers}). "
            f"Unexpected: {extra[:5]}; missing: {missing[:5]}."
        )
    expected_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(info.get("dtype"))
    for name, entry in header.items():
        kind = name.rsplit(".", 1)[1]
        want = {"indices": "I32", "fingerprint": "F32"}.get(kind, expected_dtype)
        if entry["dtype"] != want:
            err = InvalidIndicesError if kind == "indices" else DeltaFormatError
            raise err(f"{source}: tensor {name} is {entry['dtype']}, the format requires {want}.")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for malformed buffers
        raise DeltaFormatError(f"{source}: corrupted tensor data ({e}).") from None
    layer_deltas = {}
    for i in layers:
        parts: dict[str, Any] = {k: tensors.get(f"layers.{i}.{k}") for k in _TENSOR_KINDS}
        parts["indices"] = parts["indices"].to(torch.int64)
        layer_deltas[i] = LayerDelta(**parts)
    try:
        return Delta(layer_deltas, info)
    except DeltaFormatError as e:  # same error class, with the file named
        raise type(e)(f"{source}: {e}") from None


def _parse_header(data: bytes, source: str) -> dict[str, Any]:
    """The safetensors header, checked so that no declared size can make us allocate or read past the file."""
    if len(data) < 8:
        raise DeltaFormatError(f"{source} is truncated or empty ({len(data)} bytes); a .loki file is a safetensors file.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise DeltaFormatError(
            f"{source} declares a {n}-byte header but has {len(data) - 8} bytes after the length: "
            "the file is truncated or not a .loki file. Download or copy it again."
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DeltaFormatError(f"{source}: the header is not valid JSON; the file is corrupted or not a .loki file.") from None
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{source}: the header must be a JSON object.")
    body = len(data) - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise DeltaFormatError(f"{source}: __metadata__ must map strings to strings.")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise DeltaFormatError(f"{source}: header entry {name!r} is malformed.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise DeltaFormatError(f"{source}: tensor {name} has dtype {dtype!r}; .loki uses F32, F16, BF16 and I32.")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise DeltaFormatError(f"{source}: tensor {name} has an invalid shape {shape!r}.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise DeltaFormatError(f"{source}: tensor {name} has invalid data_offsets {offsets!r}.")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= body or end - begin != numel * _DTYPE_SIZES[dtype]:
            raise DeltaFormatError(
                f"{source}: tensor {name} declares bytes {begin}..{end} for shape {shape}, but the data section "
                f"has {body} bytes: the file is truncated or corrupted. Download or copy it again."
            )
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise DeltaFormatError(f"{source}: tensor data overlaps or leaves gaps; the file is corrupted.")
        position = end
    if position != body:
        raise DeltaFormatError(f"{source}: {body - position} bytes of data belong to no tensor; the file is corrupted.")
    return header


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
