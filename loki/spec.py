"""The rules of the `.loki` format (formats/SPEC.md), in one place for the writer and the reader.

`loki.format.to_bytes` / `save` build a file's header and run `check_header` on it before writing a byte;
`loki.format.from_bytes` runs `header_length` and the same `check_header` on every file it reads. Both check the
delta itself with `loki.delta.validate` (the writer directly, the reader through `Delta()`), so the writer refuses
exactly what the reader would refuse:

| SPEC rule | checked by |
|---|---|
| §2 header length `N` <= 64 MiB (`MAX_HEADER_BYTES`) and <= the file size - 8 | `header_length`, `check_header` |
| §2 header: UTF-8 JSON object (strict: unique keys, no NaN/Infinity), then only spaces | `check_header` |
| §2 tensor entries: dtype, shape, `data_offsets` tiling the data section | `check_header` |
| §3 `__metadata__`: string values, `format: loki`, `format_version` | `check_header`, `format_version` |
| §4 the `loki` entry: a strict JSON object; `layers` unique ints | `check_header` |
| §5 tensor names exactly those of the layers and form; their dtypes | `check_header` |
| §5 indices representable as `I32` | `int32_indices` |
| §4-§5 required fields and types, form, dtype, indices, shapes, finite values | `loki.delta.validate` |
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

from .delta import FLOAT_DTYPES, FORMAT_NAME, FORMAT_VERSION
from .errors import DeltaFormatError, InvalidIndicesError, UnsupportedVersionError

MAX_HEADER_BYTES = 64 * 1024 * 1024  # SPEC §2: the cap on N, for writers and readers alike
MAX_DIM = 2**40  # no tensor dimension reaches this; the bound keeps size arithmetic far from overflow
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32}
ST_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
TENSOR_KINDS = ("indices", "fingerprint", "rows", "lora_A", "lora_B")


def kinds_of(form: Any) -> tuple[str, ...]:
    """The tensors each layer of a delta of `form` has (SPEC §5).

    >>> kinds_of("rows")
    ('indices', 'fingerprint', 'rows')
    """
    return ("indices", "fingerprint", "rows") if form == "rows" else ("indices", "fingerprint", "lora_A", "lora_B")


def require_little_endian() -> None:
    """Raise NotImplementedError on a big-endian machine (the format's bytes are little-endian; so is every
    platform torch ships for)."""
    if sys.byteorder != "little":
        raise NotImplementedError("Reading and writing .loki files needs a little-endian machine.")


def check_header_size(n: int, source: str) -> None:
    """Raise DeltaFormatError when a header of `n` bytes exceeds the SPEC's cap (§2).

    >>> check_header_size(MAX_HEADER_BYTES + 1, "x.loki")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: x.loki: a 67,108,865-byte header exceeds the SPEC's cap of 67,108,864 bytes ...
    """
    if n > MAX_HEADER_BYTES:
        raise DeltaFormatError(
            f"{source}: a {n:,}-byte header exceeds the SPEC's cap of {MAX_HEADER_BYTES:,} bytes "
            "(formats/SPEC.md §2). "
            "The header holds the metadata (description, selection, training, extra): shorten it."
        )


def header_length(data: bytes, source: str) -> int:
    """`N`, the header length of the file `data`, checked against the cap and the file size (SPEC §2).

    Raises:
        DeltaFormatError: fewer than 8 bytes, `N` over the cap, or `N` past the end of the file.

    >>> header_length(b"abc", "<bytes>")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: <bytes> is truncated or empty (3 bytes); a .loki file is a safetensors file.
    """
    if len(data) < 8:
        raise DeltaFormatError(
            f"{source} is truncated or empty ({len(data)} bytes); a .loki file is a safetensors file."
        )
    (n,) = struct.unpack("<Q", data[:8])
    check_header_size(n, source)
    if n > len(data) - 8:
        raise DeltaFormatError(
            f"{source} declares a {n}-byte header but has {len(data) - 8} bytes after the length: "
            "the file is truncated or not a .loki file. Download or copy it again."
        )
    return n


def dumps(obj: Any, compact: bool = True) -> str:
    """`obj` as the format writes JSON: sorted keys, strict (ValueError on NaN or infinity: SPEC §2, §4), compact
    (the header) or with json's default separators (the `loki` entry, as version 1 files have it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None, allow_nan=False)


def loads(text: str | bytes, what: str, source: str) -> Any:
    """Strict JSON (RFC 8259, as SPEC §2 and §4 require): no NaN or Infinity, no number that overflows to
    infinity, no key twice in an object.

    Raises:
        DeltaFormatError: anything else, naming `what`.

    >>> loads('{"a": 1, "a": 2}', "the header", "x.loki")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: x.loki: the header is not valid JSON (key 'a' appears twice); the file is ...
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")  # not json's guess among UTF-8, -16 and -32: the SPEC says UTF-8
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the hooks' errors are all ValueErrors
        raise DeltaFormatError(
            f"{source}: {what} is not valid JSON ({e}); the file is corrupted or not a .loki file."
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def format_version(value: Any, source: str) -> int:
    """The `format_version` metadata entry (SPEC §3): ASCII decimal digits, >= 1, at most `FORMAT_VERSION`.

    Raises:
        UnsupportedVersionError: a newer version.
        DeltaFormatError: anything else that is not a decimal integer >= 1.

    >>> format_version("+1", "x.loki")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: x.loki: format_version '+1' is not a decimal integer.
    """
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        raise DeltaFormatError(f"{source}: format_version {value!r} is not a decimal integer.")
    version = int(value)
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{source} is .loki format version {version}; this loki reads version {FORMAT_VERSION} and older. "
            "Upgrade loki (pip install -U loki)."
        )
    if version < 1:
        raise DeltaFormatError(f"{source}: format_version must be >= 1, got {version}.")
    return version


def check_header(raw: bytes, body: int, source: str) -> tuple[dict[str, dict], dict[str, Any], list[int]]:
    """Check a header against SPEC §2-§5 (everything that needs no tensor data): the writer runs it on the header
    it is about to write, the reader on every file.

    Args:
        raw: the `N` header bytes.
        body: the size of the data section (file size - 8 - N).
        source: how messages name the file.

    Returns:
        tuple: the tensor entries `{name: {"dtype", "shape", "data_offsets"}}`, the `loki` metadata object
        without `layers`, and `layers`.

    Raises:
        DeltaFormatError: as SPEC §7 steps 1-3 (header too big, not a strict JSON object padded with spaces, bad
            entries, byte ranges that do not tile the data, not a delta, bad metadata, wrong tensor names or dtypes).
        UnsupportedVersionError: a newer `format_version`.
        InvalidIndicesError: indices not `I32`.
    """
    check_header_size(len(raw), source)
    text = raw.rstrip(b" ")  # the only padding the SPEC allows
    if not (text.startswith(b"{") and text.endswith(b"}")):
        raise DeltaFormatError(
            f"{source}: the header must be a JSON object padded with spaces only; "
            "the file is corrupted or not a .loki file."
        )
    header = loads(text, "the header", source)
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{source}: the header must be a JSON object.")
    meta = header.pop("__metadata__", None)
    entries = _check_entries(header, body, source)
    if isinstance(meta, dict) and not all(isinstance(v, str) for v in meta.values()):
        raise DeltaFormatError(f"{source}: __metadata__ must map strings to strings.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DeltaFormatError(
            f"{source} is a safetensors file but not a .loki delta (no 'format: loki' metadata). "
            "PEFT adapters and model checkpoints are not deltas; make one with loki.implant.make_delta or loki.extract."
        )
    format_version(meta.get("format_version"), source)
    info = loads(meta.get("loki", ""), "the 'loki' metadata entry", source)
    if not isinstance(info, dict):
        raise DeltaFormatError(f"{source}: the 'loki' metadata entry must be a JSON object.")
    layers = info.pop("layers", None)
    if not isinstance(layers, list) or not all(type(i) is int for i in layers):
        raise DeltaFormatError(f"{source}: metadata 'layers' must be a list of layer numbers.")
    if len(set(layers)) != len(layers):
        raise DeltaFormatError(f"{source}: metadata 'layers' lists a layer twice.")
    form = info.get("form")
    expected = {f"layers.{i}.{k}" for i in layers for k in kinds_of(form)}
    if set(entries) != expected:
        extra, missing = sorted(set(entries) - expected), sorted(expected - set(entries))
        raise DeltaFormatError(
            f"{source}: tensors do not match the metadata (form {form!r}, layers {layers}). "
            f"Unexpected: {extra[:5]}; missing: {missing[:5]}."
        )
    declared = info.get("dtype")
    if not isinstance(declared, str) or declared not in FLOAT_DTYPES:  # (a list or dict is unhashable)
        raise DeltaFormatError(f"{source}: metadata 'dtype' must be one of {sorted(FLOAT_DTYPES)}, not {declared!r}.")
    for name, entry in entries.items():
        kind = name.rsplit(".", 1)[1]
        want = {"indices": "I32", "fingerprint": "F32"}.get(kind, ST_DTYPES[FLOAT_DTYPES[declared]])
        if entry["dtype"] != want:
            err = InvalidIndicesError if kind == "indices" else DeltaFormatError
            raise err(f"{source}: tensor {name} is {entry['dtype']}, the format requires {want}.")
    return entries, info, layers


def _check_entries(header: dict[str, Any], body: int, source: str) -> dict[str, dict]:
    """The tensor entries, checked so that no declared size can make a reader allocate or read past the file."""
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise DeltaFormatError(f"{source}: header entry {name!r} is malformed.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # (a list or dict is unhashable)
            raise DeltaFormatError(f"{source}: tensor {name} has dtype {dtype!r}; .loki uses F32, F16, BF16 and I32.")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < MAX_DIM for d in shape)):
            raise DeltaFormatError(f"{source}: tensor {name} has an invalid shape {shape!r}.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise DeltaFormatError(f"{source}: tensor {name} has invalid data_offsets {offsets!r}.")
        begin, end = offsets
        if not 0 <= begin <= end <= body or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise DeltaFormatError(
                f"{source}: tensor {name} declares bytes {begin}..{end} for shape {shape}, but the data section "
                f"has {body} bytes: the file is truncated or corrupted. Download or copy it again."
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise DeltaFormatError(f"{source}: tensor data overlaps or leaves gaps; the file is corrupted.")
        position = end
    if position != body:
        raise DeltaFormatError(f"{source}: {body - position} bytes of data belong to no tensor; the file is corrupted.")
    return header


def decode(data: bytes, start: int, entry: dict[str, Any]) -> torch.Tensor:
    """The tensor of a header entry checked by `check_header`, copied out of the file `data` whose data section
    begins at `start` (little-endian, row-major: SPEC §2). Nothing is unpickled."""
    require_little_endian()
    begin, end = entry["data_offsets"]
    dtype = TORCH_DTYPES[entry["dtype"]]
    if begin == end:
        return torch.empty(entry["shape"], dtype=dtype)
    buffer = bytearray(memoryview(data)[start + begin : start + end])  # a copy: aligned and writable
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def encode(t: torch.Tensor) -> bytes:
    """The bytes of tensor `t` in a `.loki` file (little-endian, row-major: SPEC §2)."""
    require_little_endian()
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def int32_indices(indices: torch.Tensor, layer: int) -> torch.Tensor:
    """`indices` (checked by `loki.delta.check_indices`) as the `I32` tensor a file stores (SPEC §5).

    Raises:
        InvalidIndicesError: an index that `I32` cannot hold.

    >>> int32_indices(torch.tensor([2**31]), 0)
    Traceback (most recent call last):
    ...
    loki.errors.InvalidIndicesError: Layer 0: row index 2147483648 does not fit the format's I32 indices ...
    """
    limit = torch.iinfo(torch.int32).max
    if indices.numel() and int(indices.max()) > limit:
        raise InvalidIndicesError(
            f"Layer {layer}: row index {int(indices.max())} does not fit the format's I32 indices (at most {limit})."
        )
    return indices.to(torch.int32)
