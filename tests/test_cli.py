"""The `loki` command line, in process (`loki.cli.main([...])`): --version, merge, export-peft, and load_base.

Bases are tiny random-weight models saved with `save_pretrained` (plus a word-level tokenizer) into tmp_path, so
every check is on real files read back by transformers and PEFT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import loki
from loki.cli import main
from loki.models import load_base
from loki.testing import random_delta, tiny_model

DOWN = "model.layers.{i}.mlp.down_proj.weight"  # llama's down-projection in a state dict


def word_tokenizer(vocab: int = 128) -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over the tiny models' vocabulary: token i is the word `w{i}`."""
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def save_base(folder: Path, *, dtype=torch.float32, seed: int = 0, tokenizer: bool = True) -> Path:
    tiny_model("llama", dtype=dtype, seed=seed).save_pretrained(folder)
    if tokenizer:
        word_tokenizer().save_pretrained(folder)
    return folder


def from_folder(folder: Path, dtype=torch.float32) -> transformers.PreTrainedModel:
    """The model a user gets back from `folder` (its `name_or_path` is the folder, so deltas made from it name it)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture
def base(tmp_path) -> Path:
    return save_base(tmp_path / "base")


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    """Exit code 2 and one line `loki VERB: Error: message` that ends stderr (after transformers' progress bars)."""
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("loki ")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    for word in words:
        assert word in lines[0], err


# -- --version --------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"loki {loki.__version__}\n"


# -- merge ------------------------------------------------------------------------------------------
def test_merge_writes_a_plain_checkpoint_with_the_deltas_rows(base, tmp_path, capsys):
    model = from_folder(base)
    first = random_delta(model, q=25, noise=0.5, layers=[0], seed=0)
    second = random_delta(model, q=25, noise=0.5, layers=[1], seed=1)
    paths = [loki.save(first, tmp_path / "a.loki"), loki.save(second, tmp_path / "b.loki")]
    code, out, err = run(["merge", base, *paths, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "merged 2 deltas" in out and str(tmp_path / "merged") in out

    merged = from_folder(tmp_path / "merged").state_dict()
    expected = from_folder(base).state_dict()
    for layer, ld in [*first.layers.items(), *second.layers.items()]:
        expected[DOWN.format(i=layer)][ld.indices] = ld.rows.float()
    changed = 0
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key  # delta rows where it writes, the base's everywhere else
        changed += not torch.equal(value, from_folder(base).state_dict()[key])
    assert changed == 2  # both down-projections changed, so the check above can fail
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("w5 w7")["input_ids"] == word_tokenizer()("w5 w7")["input_ids"]


def test_merge_in_another_dtype_and_a_base_without_tokenizer(tmp_path, capsys):
    base = save_base(tmp_path / "base", tokenizer=False)
    delta = random_delta(from_folder(base), q=25, noise=0.5)
    path = loki.save(delta, tmp_path / "d.loki")
    code, out, err = run(["merge", base, path, "--out", tmp_path / "merged", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    assert "no tokenizer" in err and not (tmp_path / "merged" / "tokenizer.json").exists()
    merged = from_folder(tmp_path / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16
    weights = merged.state_dict()
    for layer, ld in delta.layers.items():
        assert torch.equal(weights[DOWN.format(i=layer)][ld.indices], ld.rows.to(torch.bfloat16))
    bf16_base = from_folder(base, dtype=torch.bfloat16).state_dict()
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], bf16_base["model.layers.0.mlp.up_proj.weight"])


def test_merge_overlap_policy(base, tmp_path, capsys):
    model = from_folder(base)
    first = loki.save(random_delta(model, q=25, noise=0.5, seed=0), tmp_path / "a.loki")
    second_delta = random_delta(model, q=25, noise=0.5, seed=0)  # same rows, other values below
    second_delta = loki.implant.make_delta(
        model, {i: (ld.indices, ld.rows + 1) for i, ld in second_delta.layers.items()}
    )
    second = loki.save(second_delta, tmp_path / "b.loki")
    code, out, err = run(["merge", base, first, second, "--out", tmp_path / "merged"], capsys)
    assert_one_line_error(code, err, "loki merge: OverlapError")
    assert not (tmp_path / "merged").exists()  # nothing written on error

    code, out, err = run(
        ["merge", base, first, second, "--out", tmp_path / "merged", "--on-overlap", "replace"], capsys
    )
    assert code == 0, err
    weights = from_folder(tmp_path / "merged").state_dict()
    for layer, ld in second_delta.layers.items():
        assert torch.equal(weights[DOWN.format(i=layer)][ld.indices], ld.rows)


def test_merge_errors_are_one_line_and_exit_2(base, tmp_path, capsys):
    delta = loki.save(random_delta(from_folder(base), q=25, noise=0.5), tmp_path / "d.loki")
    code, _, err = run(["merge", base, tmp_path / "missing.loki", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "DeltaFormatError", "missing.loki")
    code, _, err = run(["merge", tmp_path / "no-base", delta, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "loki merge: ", "no-base")
    other = save_base(tmp_path / "other", seed=3)
    code, _, err = run(["merge", other, delta, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "BaseModelMismatchError")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit:  # argparse: --out is required
        main(["merge", str(base), str(delta)])
    assert exit.value.code == 2


# -- export-peft ------------------------------------------------------------------------------------
def assert_adapter_reproduces(base: Path, delta, folder: Path):
    """PEFT with the exported adapter on a fresh base gives the logits of loki.apply (float32 reassociation)."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    reference = from_folder(base)
    with torch.no_grad():
        plain = reference(ids).logits
        loki.apply(reference, delta)
        expected = reference(ids).logits
        got = peft.PeftModel.from_pretrained(from_folder(base), folder).eval()(ids).logits
    assert (expected - plain).abs().max() > 0.05  # the delta matters, so the comparison can fail
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_peft_loads_the_base_the_delta_names(base, tmp_path, capsys):
    delta = random_delta(from_folder(base), q=25, noise=0.5, name="x")
    assert delta.info["base_model"]["id"] == str(base)
    path = loki.save(delta, tmp_path / "d.loki")
    code, out, err = run(["export-peft", path, "--out", tmp_path / "adapter"], capsys)
    assert code == 0, err
    assert "PEFT LoRA adapter" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == max(delta.rows_per_layer().values())
    assert_adapter_reproduces(base, delta, tmp_path / "adapter")

    moved = shutil.move(base, tmp_path / "moved")  # the recorded base is gone: --base names where it is now
    code, _, err = run(["export-peft", path, "--out", tmp_path / "a2"], capsys)
    assert_one_line_error(code, err, "loki export-peft: ")
    code, _, err = run(["export-peft", path, "--out", tmp_path / "a2", "--base", moved, "--rank", "16"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["r"] == 16
    assert_adapter_reproduces(Path(moved), delta, tmp_path / "a2")


def test_export_peft_lora_form_needs_no_base(tmp_path, capsys):
    delta = random_delta(tiny_model("llama"), q=25, noise=0.5, lora_rank=2)  # names tiny-random/llama-seed0
    path = loki.save(delta, tmp_path / "d.loki")
    code, _, err = run(["export-peft", path, "--out", tmp_path / "adapter", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_export_peft_errors(base, tmp_path, capsys):
    model = from_folder(base)
    model.config.name_or_path = ""
    nameless = loki.save(random_delta(model, q=25, noise=0.5), tmp_path / "nameless.loki")
    code, _, err = run(["export-peft", nameless, "--out", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "DeltaFormatError", "names no base model")
    code, _, err = run(
        ["export-peft", nameless, "--out", tmp_path / "a", "--base", save_base(tmp_path / "o", seed=3)], capsys
    )
    assert_one_line_error(code, err, "BaseModelMismatchError")
    assert not (tmp_path / "a").exists()


# -- load_base --------------------------------------------------------------------------------------
def test_load_base_uses_the_recorded_id_and_dtype(tmp_path):
    base = save_base(tmp_path / "base", dtype=torch.bfloat16)
    delta = random_delta(from_folder(base, dtype=torch.bfloat16), q=25)
    assert delta.info["base_model"]["dtype"] == "bfloat16"
    model, tokenizer = load_base(delta)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("w9")["input_ids"] == [9]
    loki.apply(model, delta)  # the base it loaded is the one the delta was made from (fingerprint check)
    model, _ = load_base(loki.save(delta, tmp_path / "d.loki"), dtype=torch.float32)  # a path works too
    assert model.dtype == torch.float32
    bare = save_base(tmp_path / "bare", tokenizer=False)  # a checkpoint saved without its tokenizer
    model, tokenizer = load_base(random_delta(from_folder(bare), q=25))
    assert tokenizer is None and model.config.name_or_path == str(bare)


def test_load_base_without_a_base_model_id():
    model = tiny_model("llama")
    model.config.name_or_path = ""
    delta = random_delta(model)
    with pytest.raises(loki.LokiError, match="names no base model"):
        load_base(delta)


@pytest.mark.slow
def test_load_base_of_the_default_model_loads_it_offline(default_model):
    delta = random_delta(default_model, q=1, layers=[0])
    model, tokenizer = load_base(delta)
    assert model.config.name_or_path == loki.models.DEFAULT_MODEL_ID and model.dtype == torch.float32
    loki.apply(model, delta)


# -- the real entry points --------------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_and_module_exit_codes(tmp_path):
    """What in-process calls cannot show: the installed `loki` script and `python -m loki.cli` pass main's return
    value to the shell (each starts a Python process, hence slow)."""
    script = Path(sys.executable).parent / "loki"
    bad = subprocess.run(
        [str(script) if script.exists() else "loki", "inspect", str(tmp_path / "missing.loki")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("loki inspect: DeltaFormatError"), bad.stderr
    version = subprocess.run([sys.executable, "-m", "loki.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout == f"loki {loki.__version__}\n", version.stderr


def test_a_folder_transformers_cannot_load_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    delta = loki.save(random_delta(tiny_model("llama")), tmp_path / "x.loki")
    assert main(["merge", str(tmp_path), str(delta), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loki merge: UnknownArchitectureError: transformers cannot load") and err.count("\n") == 1
