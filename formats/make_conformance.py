"""Regenerate the conformance files in formats/conformance/ (committed; tests read them, never rebuild them).

    python formats/make_conformance.py

The base is a 2-layer Llama-shaped down-projection stack (d_model 8, d_ff 16) whose weights are simple
closed-form numbers, so a reader in another language can rebuild it too: see SPEC.md, "Conformance files".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

import loki
from loki.format import to_bytes
from loki.testing import tiny_model

HERE = Path(__file__).parent / "conformance"
D_MODEL, D_FF, LAYERS = 8, 16, 2
TEMPLATE = "model.layers.{i}.mlp.down_proj"


def base_weight(layer: int, shift: float = 0.0) -> torch.Tensor:
    """W[l][r, c] = ((l*131 + r*17 + c*7) mod 23 - 11) / 64 + shift  (exact in float32, bf16 and fp16)."""
    l, r, c = layer, torch.arange(D_MODEL)[:, None], torch.arange(D_FF)[None, :]
    return ((l * 131 + r * 17 + c * 7) % 23 - 11).float() / 64 + shift


def base_model(shift: float = 0.0):
    model = tiny_model("llama", d_model=D_MODEL, d_ff=D_FF, layers=LAYERS)
    model.config.name_or_path = "loki-conformance/base"
    with torch.no_grad():
        for layer, m in enumerate(loki.projections.find_down_projections(model).modules):
            m.weight.copy_(base_weight(layer, shift))
    return model


def rewrite(data: bytes, edit) -> bytes:
    """Apply `edit(header_dict)` to a safetensors file's header and re-serialise it (padded to 8 bytes)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def meta_edit(fn):
    def edit(header):
        info = json.loads(header["__metadata__"]["loki"])
        fn(info)
        header["__metadata__"]["loki"] = json.dumps(info)

    return edit


def main() -> None:
    HERE.mkdir(exist_ok=True)
    model = base_model()
    save_file(
        {f"model.layers.{l}.mlp.down_proj.weight": base_weight(l) for l in range(LAYERS)}, HERE / "base.safetensors"
    )
    rows0 = torch.arange(2 * D_FF, dtype=torch.float32).reshape(2, D_FF) / 32 - 0.5
    rows1 = -torch.ones(1, D_FF) / 4
    rows = loki.implant.make_delta(
        model,
        {0: ([1, 6], rows0), 1: ([3], rows1)},
        name="conformance-rows",
        description="Two rows of layer 0 and one of layer 1.",
        selection={"strategy": "manual", "q": None},
    )
    lora = loki.implant.make_delta(
        model, {1: ([0, 5, 7], torch.tensor([[0.5], [0.25], [-1.0]]), torch.ones(1, D_FF) / 8)}, name="conformance-lora"
    )
    valid = {
        "valid_rows_f32.loki": rows,
        "valid_rows_bf16.loki": rows.to(torch.bfloat16),
        "valid_rows_f16.loki": rows.to(torch.float16),
        "valid_lora.loki": lora,
    }
    manifest: dict[str, dict] = {}
    base = {l: base_weight(l) for l in range(LAYERS)}
    for name, delta in valid.items():
        (HERE / name).write_bytes(to_bytes(delta))
        expected = {}
        for l, ld in delta.layers.items():
            new = ld.new_rows(base[l][ld.indices]).float()
            expected[str(l)] = {"indices": ld.indices.tolist(), "rows_after_apply": new.tolist()}
        manifest[name] = {"outcome": "valid", "layers": expected, "on_other_base": "BaseModelMismatchError"}

    good = to_bytes(rows)
    (n,) = struct.unpack("<Q", good[:8])
    head = good[8 : 8 + n].rstrip(b" ")  # the JSON object alone
    invalid = {
        "empty.loki": (b"", "DeltaFormatError"),
        "truncated_length.loki": (good[:5], "DeltaFormatError"),
        "truncated_header.loki": (good[: 8 + n // 2], "DeltaFormatError"),
        "truncated_data.loki": (good[:-3], "DeltaFormatError"),
        "not_json_header.loki": (good[:8] + b"\xff" * n + good[8 + n :], "DeltaFormatError"),
        "huge_header_length.loki": (struct.pack("<Q", 2**60) + good[8:], "DeltaFormatError"),
        "plain_safetensors.loki": (rewrite(good, lambda h: h.pop("__metadata__")), "DeltaFormatError"),
        "future_version.loki": (
            rewrite(good, lambda h: h["__metadata__"].update(format_version="2")),
            "UnsupportedVersionError",
        ),
        "metadata_not_json.loki": (rewrite(good, lambda h: h["__metadata__"].update(loki="{oops")), "DeltaFormatError"),
        "huge_tensor_shape.loki": (
            rewrite(good, lambda h: h["layers.0.rows"].update(shape=[2**39, 2**39])),
            "DeltaFormatError",
        ),
        "offsets_past_end.loki": (
            rewrite(good, lambda h: h["layers.0.rows"].update(data_offsets=[0, 2**40])),
            "DeltaFormatError",
        ),
        "rows_wrong_dtype.loki": (rewrite(good, _retype("layers.0.rows", "F16")), "DeltaFormatError"),
        "indices_as_float.loki": (
            rewrite(good, lambda h: h["layers.0.indices"].update(dtype="F32")),
            "InvalidIndicesError",
        ),
        "missing_tensor.loki": (rewrite(good, meta_edit(lambda i: i.update(form="lora"))), "DeltaFormatError"),
        "layer_out_of_range.loki": (
            rewrite(good, meta_edit(lambda i: i["down_projection"].update(num_layers=1))),
            "DeltaFormatError",
        ),
        "rows_shape_mismatch.loki": (
            rewrite(good, meta_edit(lambda i: i["down_projection"].update(d_in=D_FF + 1))),
            "DeltaFormatError",
        ),
        "version_not_decimal.loki": (
            rewrite(good, lambda h: h["__metadata__"].update(format_version="+1")),
            "DeltaFormatError",
        ),
        "metadata_nan.loki": (
            rewrite(good, meta_edit(lambda i: i["extra"].update(loss=float("nan")))),
            "DeltaFormatError",
        ),
        "header_duplicate_key.loki": (
            _with_header(good, head[:-1] + b',"__metadata__":' + _meta(good) + b"}"),
            "DeltaFormatError",
        ),
        "header_newline_padded.loki": (_with_header(good, head + b"\n"), "DeltaFormatError"),
    }
    for name, (tensors, error) in {
        "indices_unsorted.loki": ({0: [6, 1]}, "InvalidIndicesError"),
        "indices_duplicate.loki": ({0: [6, 6]}, "InvalidIndicesError"),
        "indices_out_of_range.loki": ({0: [1, D_MODEL]}, "InvalidIndicesError"),
        "indices_negative.loki": ({0: [-1, 6]}, "InvalidIndicesError"),
    }.items():
        invalid[name] = (_with_indices(good, tensors), error)
    invalid["rows_nan.loki"] = (_with_nan(good), "DeltaFormatError")
    for name, (data, error) in invalid.items():
        (HERE / name).write_bytes(data)
        manifest[name] = {"outcome": error}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} files to {HERE}")


def _retype(name, dtype):
    def edit(h):
        h[name]["dtype"] = dtype
        begin = h[name]["data_offsets"][0]
        # keep byte ranges consistent so the error is the dtype, not the size
        h[name]["shape"] = [h[name]["shape"][0], h[name]["shape"][1] * 2]
        h[name]["data_offsets"] = [begin, h[name]["data_offsets"][1]]

    return edit


def _with_header(data: bytes, text: bytes) -> bytes:
    """`data` with its header replaced by `text` verbatim (no padding): headers a JSON writer would not produce."""
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _meta(data: bytes) -> bytes:
    """The `__metadata__` object of `data`'s header, as compact JSON."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.dumps(json.loads(data[8 : 8 + n])["__metadata__"], separators=(",", ":")).encode()


def _with_indices(good: bytes, indices: dict[int, list[int]]) -> bytes:
    """Overwrite the int32 indices of layer 0 in place (same length), bypassing the writer's checks."""
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    begin, end = header["layers.0.indices"]["data_offsets"]
    data = bytearray(good)
    packed = struct.pack(f"<{len(indices[0])}i", *indices[0])
    data[8 + n + begin : 8 + n + end] = packed
    return bytes(data)


def _with_nan(good: bytes) -> bytes:
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    begin = header["layers.1.rows"]["data_offsets"][0]
    data = bytearray(good)
    data[8 + n + begin : 8 + n + begin + 4] = struct.pack("<f", float("nan"))
    return bytes(data)


if __name__ == "__main__":
    main()
