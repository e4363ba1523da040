"""The `.loki` format: conformance files, round trips, and a corrupted-input suite. Every bad input raises a
`LokiError` subclass (never another exception) and leaves the model exactly as it was."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import loki
from loki.format import from_bytes, to_bytes
from loki.testing import tiny_model

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
        projs = loki.find_down_projections(model)
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
    projs = loki.find_down_projections(model)
    g = torch.Generator().manual_seed(0)
    if lora:
        return loki.make_delta(model, {1: ([2, 9], torch.randn(2, 3, generator=g), torch.randn(3, projs.d_in, generator=g))})
    return loki.make_delta(
        model, {0: ([1, 4, 30], torch.randn(3, projs.d_in, generator=g)), 1: ([0], torch.randn(1, projs.d_in, generator=g))},
        name="some", description="for tests", selection={"strategy": "random", "q": 10}, training={"steps": 3},
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
    for indices, message in (([3, 3], "twice"), ([5, 1], "sorted"), ([0, 32], "out of range"), ([-1, 0], "out of range")):
        with pytest.raises(loki.errors.InvalidIndicesError, match=message):
            loki.make_delta(model, {0: (indices, rows)})
    with pytest.raises(loki.errors.InvalidIndicesError, match="integers"):
        loki.make_delta(model, {0: ([0.5, 1.5], rows)})
    with pytest.raises(loki.errors.DeltaFormatError, match="shape"):
        loki.make_delta(model, {0: ([0, 1], torch.zeros(2, 63))})
    with pytest.raises(loki.errors.DeltaFormatError, match="Layer 2 does not exist"):
        loki.make_delta(model, {2: ([0, 1], rows)})


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
