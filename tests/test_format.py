"""The `.loki` format: conformance files, round trips, and a corrupted-input suite. Every bad input raises a
`LokiError` subclass (never another exception) and leaves the model exactly as it was."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_state_equal, state_dict_copy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import loki
import loki.spec
from loki.delta import LayerDelta
from loki.format import atomic_write, from_bytes, to_bytes
from loki.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `hub/` (the test Hub server) lives at the repo root, beside `loki/`
    sys.path.insert(0, str(ROOT))
from hub.server import HubServer  # noqa: E402

CONFORMANCE = Path(__file__).parent.parent / "formats" / "conformance"
MANIFEST = json.loads((CONFORMANCE / "manifest.json").read_text())


def conformance_base(shift: float = 0.0, dtype=torch.float32):
    """The conformance base model: a tiny Llama whose down-projections come from base.safetensors."""
    model = tiny_model("llama", d_model=8, d_ff=16, layers=2, dtype=dtype)
    weights = load_file(CONFORMANCE / "base.safetensors")
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(w + shift)
    return model


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_conformance_file(name):
    expected = MANIFEST[name]
    path = CONFORMANCE / name
    if expected["outcome"] != "valid":
        error = getattr(loki.errors, expected["outcome"])
        with pytest.raises(error) as info:
            loki.load(path)
        assert type(info.value) is error, f"{name}: raised {type(info.value).__name__}"
        assert str(path.name) in str(info.value), "the message names the file"
        return
    delta = loki.load(path)
    for dtype in (torch.float32, torch.bfloat16):
        model = conformance_base(dtype=dtype)
        loki.apply(model, delta)
        projs = loki.projections.find_down_projections(model)
        for layer, exp in expected["layers"].items():
            rows = projs.rows(int(layer))[torch.tensor(exp["indices"])]
            assert torch.equal(rows, torch.tensor(exp["rows_after_apply"]).to(dtype))
    other = conformance_base(shift=0.01)
    before = state_dict_copy(other)
    with pytest.raises(getattr(loki.errors, expected["on_other_base"])):
        loki.apply(other, delta)
    assert_state_equal(other, before)


def test_conformance_files_are_reproducible(tmp_path, monkeypatch):
    """The committed valid files are exactly what the generator and this writer produce."""
    sys.path.insert(0, str(CONFORMANCE.parent))
    try:
        import make_conformance
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(make_conformance, "HERE", tmp_path)
    make_conformance.main()
    for name in MANIFEST:
        assert (tmp_path / name).read_bytes() == (CONFORMANCE / name).read_bytes(), name


def some_delta(model, lora=False):
    projs = loki.projections.find_down_projections(model)
    g = torch.Generator().manual_seed(0)
    if lora:
        return loki.implant.make_delta(
            model, {1: ([2, 9], torch.randn(2, 3, generator=g), torch.randn(3, projs.d_in, generator=g))}
        )
    return loki.implant.make_delta(
        model,
        {0: ([1, 4, 30], torch.randn(3, projs.d_in, generator=g)), 1: ([0], torch.randn(1, projs.d_in, generator=g))},
        name="some",
        description="for tests",
        selection={"strategy": "random", "q": 10},
        training={"steps": 3},
    )


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_lossless(tmp_path, family, lora, dtype):
    model = tiny_model(family)
    delta = some_delta(model, lora).to(dtype)
    back = loki.load(loki.save(delta, tmp_path / "d.loki"))
    assert back.info == delta.info
    for layer, ld in delta.layers.items():
        for field in ("indices", "fingerprint", "rows", "lora_A", "lora_B"):
            a, b = getattr(ld, field), getattr(back.layers[layer], field)
            assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype), field
    assert to_bytes(back) == to_bytes(delta)


def test_every_truncation_is_a_format_error():
    data = to_bytes(some_delta(tiny_model("llama")))
    for cut in range(len(data)):
        with pytest.raises(loki.errors.DeltaFormatError):
            from_bytes(data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_flipped_bytes_raise_loki_errors_and_change_nothing(data):
    model = _flip_model()
    good = to_bytes(some_delta(model))
    position = data.draw(st.integers(0, len(good) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != good[position]), label="byte")
    bad = good[:position] + bytes([value]) + good[position + 1 :]
    before = state_dict_copy(model)
    try:
        delta = from_bytes(bad)
        loki.revert(model, loki.apply(model, delta))  # a flip inside row data can still be a valid delta
    except loki.LokiError:
        pass
    assert_state_equal(model, before)


_FLIP_MODEL = []


def _flip_model():
    if not _FLIP_MODEL:
        _FLIP_MODEL.append(tiny_model("llama"))
    return _FLIP_MODEL[0]


def test_make_delta_rejects_bad_indices():
    model = tiny_model("llama")
    rows = torch.zeros(2, 64)
    for indices, message in (
        ([3, 3], "twice"),
        ([5, 1], "sorted"),
        ([0, 32], "out of range"),
        ([-1, 0], "out of range"),
    ):
        with pytest.raises(loki.errors.InvalidIndicesError, match=message):
            loki.implant.make_delta(model, {0: (indices, rows)})
    with pytest.raises(loki.errors.InvalidIndicesError, match="integers"):
        loki.implant.make_delta(model, {0: ([0.5, 1.5], rows)})
    with pytest.raises(loki.errors.DeltaFormatError, match="shape"):
        loki.implant.make_delta(model, {0: ([0, 1], torch.zeros(2, 63))})
    with pytest.raises(loki.errors.DeltaFormatError, match="Layer 2 does not exist"):
        loki.implant.make_delta(model, {2: ([0, 1], rows)})


def test_not_a_file_errors(tmp_path):
    with pytest.raises(loki.errors.DeltaFormatError, match="No such file"):
        loki.load(tmp_path / "missing.loki")
    with pytest.raises(loki.errors.DeltaFormatError, match="folder"):
        loki.load(tmp_path)


def test_inspect_command(tmp_path, capsys):
    from loki.cli import main

    model = tiny_model("gpt2")
    path = loki.save(some_delta(model), tmp_path / "d.loki")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "rows per layer: 0:3 1:1" in out
    assert "tiny-random/gpt2-seed0" in out and "MB on disk" in out
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["rows_per_layer"] == {"0": 3, "1": 1}
    assert main(["inspect", str(CONFORMANCE / "truncated_data.loki")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loki inspect: DeltaFormatError") and "truncated" in err and err.count("\n") == 1


# -- one set of rules for the writer and the reader (formats/SPEC.md; loki/spec.py) ------------------------------
_TORCH_TO_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float64: "F64",
}


def unchecked_bytes(delta) -> bytes:
    """What a writer that checks nothing writes for `delta`, in the SPEC's canonical layout: its metadata and tensors
    as they are (indices as I32 where they fit, else as they are in memory)."""
    tensors = {}
    for i, ld in delta.layers.items():
        for kind in ("indices", "fingerprint", "rows", "lora_A", "lora_B"):
            t = getattr(ld, kind)
            if t is not None:
                fits = t.dtype == torch.int64 and (not t.numel() or -(2**31) <= int(t.min()) <= int(t.max()) < 2**31)
                tensors[f"layers.{i}.{kind}"] = t.to(torch.int32) if fits else t
    info = json.dumps({**delta.info, "layers": sorted(delta.layers)}, sort_keys=True)  # NaN passes unchecked
    header, chunks, offset = {"__metadata__": {"format": "loki", "format_version": "1", "loki": info}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _TORCH_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
ROW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def valid_deltas(draw):
    """A small SPEC-valid delta of either form, built without a model (the format needs none)."""
    num_layers, d_out = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    d_in, r = draw(st.integers(1, 5)), draw(st.integers(0, 2))
    form, dtype = draw(st.sampled_from(["rows", "lora"])), draw(st.sampled_from(sorted(ROW_DTYPES)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    layers = {}
    for i in draw(st.lists(st.integers(0, num_layers - 1), min_size=1, unique=True)):
        idx = sorted(draw(st.lists(st.integers(0, d_out - 1), min_size=1, max_size=d_out, unique=True)))
        k, rand = len(idx), lambda *shape: torch.randn(*shape, generator=g).to(ROW_DTYPES[dtype])
        fingerprint = torch.randn(min(256, k * d_in), generator=g)
        parts = {"rows": rand(k, d_in)} if form == "rows" else {"lora_A": rand(k, r), "lora_B": rand(r, d_in)}
        layers[i] = LayerDelta(torch.tensor(idx), fingerprint, **parts)
    info = {
        "form": form,
        "dtype": dtype,
        "name": draw(st.text(max_size=12)),
        "down_projection": {
            "template": "model.layers.{i}.mlp.down_proj",
            "transposed": draw(st.booleans()),
            "num_layers": num_layers,
            "d_out": d_out,
            "d_in": d_in,
        },
        "base_model": {"id": draw(st.none() | st.text(max_size=8))},
        "extra": draw(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3)),
    }
    return loki.Delta(layers, info)


REQUIRED = [
    ("form",),
    ("dtype",),
    ("down_projection",),
    ("base_model",),
    ("down_projection", "template"),
    ("down_projection", "transposed"),
    ("down_projection", "num_layers"),
    ("down_projection", "d_out"),
    ("down_projection", "d_in"),
]


def _replace(ld, **changes):
    parts = {k: getattr(ld, k) for k in ("indices", "fingerprint", "rows", "lora_A", "lora_B")}
    return LayerDelta(**{**parts, **changes})


def mutate(draw, delta) -> str:
    """Break (or not) one SPEC rule in `delta`'s metadata or tensors, after the constructor checked it: a Delta's
    info and layers are plain dicts, so what reaches the writer need not be what was validated."""
    kind = draw(
        st.sampled_from(
            [
                "unknown_field",
                "drop",
                "retype",
                "form",
                "dtype",
                "non_finite_metadata",
                "big_metadata",
                "indices",
                "int32_overflow",
                "fingerprint",
                "rows_shape",
                "rows_dtype",
                "non_finite_rows",
                "layer_number",
                "lora_rank",
                "both_forms",
                "none",
            ]
        )
    )
    info, i = delta.info, draw(st.sampled_from(sorted(delta.layers)))
    ld = delta.layers[i]
    k, d_in = ld.k, info["down_projection"]["d_in"]
    values = ld.rows if ld.rows is not None else ld.lora_B
    if kind == "unknown_field":
        info["zz" + draw(st.text(max_size=4))] = draw(JSON_VALUES)
    elif kind in ("drop", "retype"):
        *parents, key = draw(st.sampled_from(REQUIRED))
        obj = info[parents[0]] if parents else info
        if kind == "drop":
            del obj[key]
        else:
            obj[key] = draw(st.sampled_from(["8", 1.5, True, None, [], {}, -1, 0]))
    elif kind == "form":
        info["form"] = draw(st.sampled_from(["rows", "lora", "full", ""]))
    elif kind == "dtype":
        info["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"]))
    elif kind == "non_finite_metadata":
        info["extra"]["x"] = [draw(st.sampled_from([math.nan, math.inf, -math.inf]))]
    elif kind == "big_metadata":  # against a cap the test lowers (loki.spec.MAX_HEADER_BYTES, read by both sides)
        info["description"] = "d" * draw(st.integers(0, 3000))
    elif kind == "indices":
        idx = draw(st.lists(st.integers(-2, info["down_projection"]["d_out"] + 1), max_size=4))
        delta.layers[i] = _replace(ld, indices=torch.tensor(idx, dtype=torch.int64))
    elif kind == "int32_overflow":  # valid in memory with a huge d_out, but I32 on disk cannot hold the indices
        info["down_projection"]["d_out"] = 2**33
        delta.layers[i] = _replace(ld, indices=ld.indices + draw(st.sampled_from([2**31 - 8, 2**32])))
    elif kind == "fingerprint":
        dtype = draw(st.sampled_from([torch.float32, torch.float16]))
        delta.layers[i] = _replace(ld, fingerprint=torch.zeros(draw(st.integers(0, 3)), dtype=dtype))
    elif kind == "rows_shape" and ld.rows is not None:
        delta.layers[i] = _replace(ld, rows=torch.zeros(k + draw(st.integers(0, 1)), d_in + 1, dtype=ld.rows.dtype))
    elif kind == "rows_dtype":
        new = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        delta.layers[i] = _replace(
            ld, **{f: getattr(ld, f).to(new) for f in ("rows", "lora_A", "lora_B") if getattr(ld, f) is not None}
        )
    elif kind == "non_finite_rows" and values.numel():
        bad = values.clone()
        bad.view(-1)[draw(st.integers(0, bad.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        delta.layers[i] = _replace(ld, **{"rows" if ld.rows is not None else "lora_B": bad})
    elif kind == "layer_number":
        delta.layers[draw(st.sampled_from([info["down_projection"]["num_layers"], -1, True]))] = delta.layers.pop(i)
    elif kind == "lora_rank" and ld.lora_A is not None:
        delta.layers[i] = _replace(ld, lora_A=torch.zeros(k, ld.lora_A.shape[1] + 1, dtype=ld.lora_A.dtype))
    elif kind == "both_forms":
        delta.layers[i] = _replace(ld, rows=torch.zeros(k, d_in), lora_A=torch.zeros(k, 1), lora_B=torch.zeros(1, d_in))
    return kind


def assert_same_delta(a, b):
    assert a.info == b.info and sorted(a.layers) == sorted(b.layers)
    for layer, ld in a.layers.items():
        for field in ("indices", "fingerprint", "rows", "lora_A", "lora_B"):
            x, y = getattr(ld, field), getattr(b.layers[layer], field)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), field


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_deltas(), st.sampled_from([loki.spec.MAX_HEADER_BYTES, 1024, 2048]), st.data())
def test_writer_and_reader_agree_on_every_header(delta, cap, data):
    """For every delta, SPEC-valid or broken by one rule: the writer refuses it (a DeltaFormatError, the old file
    untouched, nothing else written) and the reader refuses the same delta's unchecked bytes, or the writer writes
    exactly those bytes and the reader loads them back equal."""
    kind = mutate(data.draw, delta)
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(loki.spec, "MAX_HEADER_BYTES", cap)
        path = Path(folder) / "d.loki"
        path.write_bytes(b"the old file")
        raw = unchecked_bytes(delta)
        try:
            loki.save(delta, path)
        except loki.errors.DeltaFormatError as refused:
            event(f"{kind}: refused")
            assert path.read_bytes() == b"the old file" and os.listdir(folder) == ["d.loki"], kind
            with pytest.raises(loki.errors.DeltaFormatError):
                from_bytes(raw)
            if len(raw) - 8 > cap and "header" in str(refused):
                assert "header exceeds the SPEC's cap" in str(refused)
        else:
            event(f"{kind}: written")
            assert path.read_bytes() == raw, kind
            assert_same_delta(loki.load(path), delta)


def _header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _file(head: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head + body


def _with_info(header: dict, edit) -> dict:
    header = json.loads(json.dumps(header))
    header["__metadata__"]["loki"] = edit(header["__metadata__"]["loki"])
    return header


VERSIONS = {
    "1": True,
    "01": True,
    "2": False,
    "10": False,
    "0": False,
    "-1": False,
    "+1": False,
    " 1": False,
    "1 ": False,
    "1.0": False,
    "１": False,
    "": False,
    "1_0": False,
    "one": False,
}


@st.composite
def header_edits(draw, good: bytes):
    """A `.loki` file edited at the byte level as another writer might write it: (bytes, SPEC-valid?, extra info)."""
    header, body = _header(good)
    compact = lambda h: json.dumps(h, sort_keys=True, separators=(",", ":"))  # noqa: E731
    kind = draw(
        st.sampled_from(
            [
                "spaces",
                "layout",
                "unknown_metadata",
                "unknown_field",
                "version",
                "whitespace",
                "duplicate_key",
                "duplicate_field",
                "non_finite",
                "over_cap",
                "not_object",
                "entry_key",
                "shape",
                "extra_tensor",
                "format",
                "utf8",
            ]
        )
    )
    if kind == "spaces":
        return _file(compact(header).encode() + b" " * draw(st.integers(0, 20)), body), True, {}
    if kind == "layout":
        items = list(header.items())
        order = draw(st.permutations(items))
        return _file(json.dumps(dict(order), indent=draw(st.none() | st.integers(0, 2))).encode(), body), True, {}
    if kind == "unknown_metadata":
        header["__metadata__"]["zz"] = draw(st.text(max_size=5))
        return _file(compact(header).encode(), body), True, {}
    if kind == "unknown_field":
        value = draw(JSON_VALUES)
        return (
            _file(compact(_with_info(header, lambda s: s[:-1] + f', "zz": {json.dumps(value)}}}')).encode(), body),
            True,
            {"zz": value},
        )
    if kind == "version":
        version = draw(st.sampled_from(sorted(VERSIONS)))
        header["__metadata__"]["format_version"] = version
        return _file(compact(header).encode(), body), VERSIONS[version], {}
    if kind == "whitespace":
        before, after = draw(
            st.sampled_from([("", "\n"), ("", "\t"), ("", " \r\n"), (" ", ""), ("\n", ""), ("\ufeff", "")])
        )
        return _file((before + compact(header) + after).encode(), body), False, {}
    if kind == "duplicate_key":
        items = list(header.items())
        twice = items + [draw(st.sampled_from(items))]
        text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in twice) + "}"
        return _file(text.encode(), body), False, {}
    if kind == "duplicate_field":
        return _file(compact(_with_info(header, lambda s: s[:-1] + ', "form": "rows"}')).encode(), body), False, {}
    if kind == "non_finite":
        value = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        return _file(compact(_with_info(header, lambda s: s[:-1] + f', "zz": {value}}}')).encode(), body), False, {}
    if kind == "over_cap":
        n = loki.spec.MAX_HEADER_BYTES + draw(st.integers(1, 2**40))
        return struct.pack("<Q", n) + good[8:], False, {}
    if kind == "not_object":
        return _file(draw(st.sampled_from([b"[]", b"1", b'"x"', b"null"])), body), False, {}
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if kind == "entry_key":
        header[name]["zz"] = 1
    elif kind == "shape":
        header[name]["shape"] = [draw(st.sampled_from([1.0, True, "1", -1, None]))] + header[name]["shape"][1:]
    elif kind == "extra_tensor":
        header["layers.0.zz"] = {"dtype": "F32", "shape": [0], "data_offsets": [len(body), len(body)]}
    elif kind == "format":
        header["__metadata__"]["format"] = draw(st.sampled_from(["LOKI", "loki ", "", 1]))
    elif kind == "utf8":  # raw UTF-8 is the SPEC's encoding; latin-1 is not
        header["__metadata__"]["zz"] = "é"
        encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
        return _file(json.dumps(header, ensure_ascii=False).encode(encoding), body), encoding == "utf-8", {}
    return _file(compact(header).encode(), body), False, {}


_GOOD_FILE = []


def _good_file() -> tuple[loki.Delta, bytes]:
    if not _GOOD_FILE:
        delta = some_delta(tiny_model("llama"))
        _GOOD_FILE.append((delta, to_bytes(delta)))
    return _GOOD_FILE[0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_reader_accepts_only_what_the_spec_allows(data):
    """Byte-level variants of a valid file, as other writers might produce them: the reader loads the SPEC-valid
    ones (layout, padding, key order, unknown entries) as the same delta and refuses every other with a
    DeltaFormatError."""
    delta, good = _good_file()
    edited, valid, extra = data.draw(header_edits(good))
    if valid:
        safetensors.torch.load(edited)  # every file the SPEC allows is a safetensors file
        back = from_bytes(edited)
        assert back.info == {**delta.info, **extra}
        back.info = delta.info
        assert to_bytes(back) == good
    else:
        with pytest.raises(loki.errors.DeltaFormatError) as refused:
            from_bytes(edited)
        assert "truncated" not in str(refused.value) or struct.unpack("<Q", edited[:8])[0] <= loki.spec.MAX_HEADER_BYTES


def test_headers_over_the_cap_are_refused_by_save_load_and_push(tmp_path):
    """The one test that builds a 64 MiB header: the writer refuses it before writing (save, push), and
    the reader refuses the file another writer would make of it, saying why (not "truncated")."""
    from huggingface_hub import HfApi

    delta = some_delta(tiny_model("llama"))
    delta.info["description"] = "x" * loki.spec.MAX_HEADER_BYTES
    path = tmp_path / "big.loki"
    with pytest.raises(loki.errors.DeltaFormatError, match="header exceeds the SPEC's cap"):
        loki.save(delta, path)  # (to_bytes and push run the same checks)
    assert os.listdir(tmp_path) == []
    raw = unchecked_bytes(delta)
    with pytest.raises(loki.errors.DeltaFormatError, match="header exceeds the SPEC's cap") as refused:
        from_bytes(raw, source="big.loki")
    assert "truncated" not in str(refused.value)
    with HubServer() as server:
        token = server.add_user("alice")
        with pytest.raises(loki.errors.DeltaFormatError, match="header exceeds the SPEC's cap"):
            loki.push(delta, "alice/big", token=token, endpoint=server.url)
        assert not HfApi(endpoint=server.url, token=token).repo_exists("alice/big")  # nothing was created


def _writers():
    """Every kind of file loki writes by replacing it, as (name, write(path))."""
    model = tiny_model("llama")
    delta = some_delta(model)
    selection = loki.Selection.random(2, 32, q=10)
    attributions = loki.attribute(model, None, [[5, 6, 7]], steps=2, progress=False)
    return {
        "delta": lambda path: loki.save(delta, path),
        "selection": lambda path: selection.save(path),
        "attributions": lambda path: attributions.save(path.parent) / "meta.json",
        "peft_adapter": lambda path: loki.export_peft(delta, path.parent, model) / "adapter_model.safetensors",
    }


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_users_mode(tmp_path, umask):
    """A new file gets 0o666 less the umask, as `open(path, "w")` gives it (not tempfile's 0600); a replaced file
    keeps its mode."""
    old = os.umask(umask)
    try:
        for name, write in _writers().items():
            folder = tmp_path / name
            path = write(folder / "out")
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, name
            path.chmod(0o640)
            write(folder / "out")
            rebuilt = name == "attributions"  # a folder is rebuilt: its meta.json is removed first, then written anew
            assert stat.S_IMODE(path.stat().st_mode) == (0o666 & ~umask if rebuilt else 0o640), name
    finally:
        os.umask(old)


class _Interrupting(torch.Tensor):
    """Rows that pass every check but interrupt the save when their bytes are taken (as Ctrl-C would)."""

    def numpy(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_interrupted_writes_leave_nothing_behind(tmp_path):
    """Any exception while a file is written, KeyboardInterrupt included, leaves the old file exactly as it was and
    no temporary file; the destination is only ever the old file or the whole new one."""
    model = tiny_model("llama")
    good = some_delta(model)
    path = loki.save(good, tmp_path / "d.loki")
    before = path.read_bytes()
    rows = torch.randn(1, 64).as_subclass(_Interrupting)
    interrupted = loki.implant.make_delta(model, {0: ([1], torch.randn(1, 64)), 1: ([2], rows)})
    with pytest.raises(KeyboardInterrupt):
        loki.save(interrupted, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["d.loki"]

    def chunks():
        yield b"half of a file"
        raise OSError("disk full")

    for target in (path, tmp_path / "new.json"):
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, chunks())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["d.loki"]
    loki.save(good, path)  # and a save that completes replaces it whole
    assert path.read_bytes() == to_bytes(good)


def test_deltas_name_their_layers_once():
    """A file's 'layers' entry is the delta's own layers: metadata cannot set it (it would not survive a round trip)."""
    delta = some_delta(tiny_model("llama"))
    with pytest.raises(loki.errors.DeltaFormatError, match="'layers' is not metadata"):
        loki.Delta(delta.layers, {**delta.info, "layers": [0, 1]})


@pytest.mark.parametrize("field", ["dtype", "form", "tensor_dtype"])
@pytest.mark.parametrize("value", [[], {}, 1.5, None])
def test_metadata_of_any_json_type_is_a_format_error(field, value):
    """Any JSON value where the SPEC wants a name (a list or an object is unhashable) is a DeltaFormatError from the
    reader, never a raw TypeError (found by the property test above)."""
    _, good = _good_file()
    header, body = _header(good)
    if field == "tensor_dtype":
        header[next(k for k in header if k != "__metadata__")]["dtype"] = value
    else:
        header = _with_info(header, lambda text: json.dumps({**json.loads(text), field: value}))
    with pytest.raises(loki.errors.DeltaFormatError):
        from_bytes(_file(json.dumps(header).encode().ljust(8 * ((len(json.dumps(header)) + 7) // 8)), body))
