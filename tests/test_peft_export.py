"""A delta exported as a PEFT LoRA adapter loads in PEFT and computes the implanted model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import loki
from loki.testing import random_delta, tiny_model

peft = pytest.importorskip("peft")


def implanted_model(family, dtype, delta):
    ref = tiny_model(family, dtype=dtype)
    loki.apply(ref, delta)
    return ref


def ids_for(seed=0):
    return torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(seed))


def assert_peft_reproduces(family, base, delta, folder, dtype=torch.float32):
    """PEFT with the exported adapter gives the logits of loki.apply on a fresh base (float32: up to matmul
    reassociation; bf16: one rounding step of the logits)."""
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, folder).eval()(ids_for()).logits
        expected = implanted_model(family, dtype, delta)(ids_for()).logits
    assert got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=0)
    torch.testing.assert_close(got, expected, **tol)


def test_adapter_tensors_add_exactly_the_change():
    """Slow reference: lora_B @ lora_A, row by row, is the delta's new rows minus the base rows."""
    model = tiny_model("llama")
    delta = random_delta(model, q=25, noise=0.5)
    config, tensors = loki.peft_export.peft_adapter(delta, model)
    projs = loki.projections.find_down_projections(model)
    for layer, ld in delta.layers.items():
        prefix = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        product = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
        for row in range(projs.d_out):
            if row in ld.indices.tolist():
                pos = ld.indices.tolist().index(row)
                expected = ld.rows[pos] - projs.rows(layer)[row]
            else:
                expected = torch.zeros(projs.d_in)
            assert torch.equal(product[row], expected.detach())
    assert config["r"] == config["lora_alpha"] == max(delta.rows_per_layer().values())


def test_export_loads_in_peft_and_reproduces_the_delta(family, tmp_path):
    base = tiny_model(family)
    delta = random_delta(base, q=25, noise=0.5, name="x")
    folder = loki.export_peft(delta, tmp_path / "adapter", base)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"tiny-random/{family}-seed0"
    assert set(load_file(folder / "adapter_model.safetensors")) == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in config["target_modules"] for ab in "AB"
    }
    ref = implanted_model(family, torch.float32, delta)
    peft_model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        expected = ref(ids_for()).logits
        plain = tiny_model(family)(ids_for()).logits
        got = peft_model(ids_for()).logits
        assert (expected - plain).abs().max() > 0.05  # the delta matters, so the check below can fail
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float32 matmul reassociation
        merged = peft_model.merge_and_unload()
        ref_projs, projs = loki.projections.find_down_projections(ref), loki.projections.find_down_projections(merged)
        for layer in range(len(projs)):
            torch.testing.assert_close(projs.rows(layer), ref_projs.rows(layer), atol=1e-6, rtol=0)
        torch.testing.assert_close(merged(ids_for()).logits, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_model(tmp_path):
    base = tiny_model("qwen2", dtype=torch.bfloat16)
    delta = random_delta(base, q=25, noise=0.5)
    assert_peft_reproduces("qwen2", base, delta, loki.export_peft(delta, tmp_path, base), torch.bfloat16)


def test_lora_form_keeps_its_rank_and_needs_no_model(tmp_path):
    base = tiny_model("gpt2")  # Conv1D: fan_in_fan_out
    delta = random_delta(base, q=25, noise=0.5, lora_rank=2)
    config, tensors = loki.peft_export.peft_adapter(delta)
    assert config["r"] == 2 and config["fan_in_fan_out"]
    assert_peft_reproduces("gpt2", base, delta, loki.export_peft(delta, tmp_path, rank=8))


def test_uneven_rows_are_padded_to_one_rank(tmp_path):
    base = tiny_model("llama")
    d_in = loki.projections.find_down_projections(base).d_in
    delta = loki.implant.make_delta(base, {0: ([1, 5, 9], torch.randn(3, d_in)), 1: ([4], torch.randn(1, d_in))})
    config, tensors = loki.peft_export.peft_adapter(delta, base)
    assert config["r"] == 3 and config["target_modules"] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"][1:].abs().sum() == 0
    assert_peft_reproduces("llama", base, delta, loki.export_peft(delta, tmp_path, base))


def test_bad_input(tmp_path):
    base = tiny_model("llama")
    delta = random_delta(base, q=25)
    with pytest.raises(loki.errors.ExportError, match="base model"):
        loki.peft_export.peft_adapter(delta)
    with pytest.raises(loki.errors.ExportError, match="rank"):
        loki.peft_export.peft_adapter(delta, base, rank=2)
    with pytest.raises(loki.BaseModelMismatchError):
        loki.peft_export.peft_adapter(delta, tiny_model("llama", seed=3))
    with pytest.raises(loki.errors.IncompatibleModelError):
        loki.peft_export.peft_adapter(delta, tiny_model("opt"))
    assert not list(tmp_path.iterdir())


WRAPPERS = {
    "torch.compile": torch.compile,
    "DataParallel": torch.nn.DataParallel,
    "PEFT": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"])),
    "compiled DataParallel": lambda m: torch.compile(torch.nn.DataParallel(m)),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_export_through_every_wrapper(tmp_path, wrap):
    """The adapter exported through a wrapper names the plain model's modules: it loads in PEFT on the unwrapped
    base model and computes the applied delta's logits."""
    base = tiny_model("llama")
    delta = random_delta(base, q=25, noise=0.5)
    folder = loki.export_peft(delta, tmp_path / "adapter", WRAPPERS[wrap](tiny_model("llama")))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(k.startswith("base_model.model.model.layers.") for k in load_file(folder / "adapter_model.safetensors"))
    assert_peft_reproduces("llama", base, delta, folder)


def test_export_arguments_are_checked_before_writing(tmp_path):
    """A rank that is not a positive int, or a dtype an adapter cannot hold, is an ExportError and writes nothing;
    a rank above vLLM's largest max_lora_rank (512) exports with a warning that says so."""
    import warnings

    base = tiny_model("llama")
    delta = random_delta(base, q=25)
    for rank in (32.0, "8", True, 0, -1):
        with pytest.raises(loki.errors.ExportError, match="rank must be a positive int"):
            loki.export_peft(delta, tmp_path / "a", base, rank=rank)
    for dtype in (torch.int8, torch.float8_e4m3fn, "float32"):
        with pytest.raises(loki.errors.ExportError, match="dtype"):
            loki.export_peft(delta, tmp_path / "a", base, dtype=dtype)
    assert not list(tmp_path.iterdir())
    with pytest.warns(loki.peft_export.LargeRankWarning, match="max_lora_rank, 512"):
        config, _ = loki.peft_export.peft_adapter(delta, base, rank=513)
    assert config["r"] == 513
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loki.peft_export.peft_adapter(delta, base, rank=512)[0]["r"] == 512
