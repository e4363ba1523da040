"""KVA: the fast engine against the reference engine (every family, the real default model), the reference against
an independent loop, padding, targets, the on-disk attribution set (resume, shards, memory map) and prompt sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.attribution import Attributions, attribute
from loki.errors import AttributionMismatchError
from loki.kva import AttributionError, alphas, kva
from loki.prompts import PromptError, as_prompts, mc_text, probe_records, read_records
from loki.testing import tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [17], [18, 19, 20, 21, 22]]  # lengths 9, 3, 1, 5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst over prompts of max |a - b| / max |b|."""
    return float(((a - b).abs().flatten(1).amax(1) / b.abs().flatten(1).amax(1)).max())


def test_fast_equals_reference_every_family(tiny):
    before = state_dict_copy(tiny)
    fast, t_fast = kva(tiny, PROMPTS, steps=4)
    ref, t_ref = kva(tiny, PROMPTS, steps=4, engine="reference")
    assert fast.shape == (4, 2, 32) and torch.isfinite(fast).all()
    assert torch.equal(t_fast, t_ref)
    assert rel_err(fast, ref) < 1e-4
    assert fast.abs().amax() > 0
    assert_state_equal(tiny, before)
    assert all(p.requires_grad for p in tiny.parameters())  # restored after the run


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_layers(family):
    model = tiny_model(family, layers=3)
    for module in model.modules():  # a window shorter than the prompts, so it really cuts
        if getattr(module, "sliding_window", None):
            module.sliding_window = 3
    model.config.sliding_window = 3
    fast, _ = kva(model, PROMPTS, steps=3)
    ref, _ = kva(model, PROMPTS, steps=3, engine="reference")
    assert rel_err(fast, ref) < 1e-4


@pytest.mark.parametrize("measure", ["prob", "logit"])
def test_gold_targets_and_logit_measure(measure):
    model = tiny_model("qwen2", layers=3)
    gold = [3, None, 7, 100]
    fast, t_fast = kva(model, PROMPTS, steps=3, targets=gold, measure=measure)
    ref, t_ref = kva(model, PROMPTS, steps=3, targets=gold, measure=measure, engine="reference")
    assert t_fast[0] == 3 and t_fast[2] == 7 and t_fast[3] == 100 and torch.equal(t_fast, t_ref)
    assert rel_err(fast, ref) < 1e-4
    other, _ = kva(model, PROMPTS, steps=3, measure="logit" if measure == "prob" else "prob")
    assert not torch.allclose(fast, other)


def test_reference_matches_an_independent_loop():
    """Integrated gradients written out literally: one patched pass per step, for one layer."""
    model = tiny_model("llama", layers=3)
    ids, steps, layer = PROMPTS[0], 5, 1
    proj = loki.projections.find_down_projections(model).modules[layer]
    x = torch.tensor([ids])
    with torch.no_grad():
        z = {}
        h = proj.register_forward_hook(lambda m, a, o: z.setdefault("z", o[0, -1].clone()))
        target = model(x).logits[0, -1].argmax()
        h.remove()
    total = torch.zeros_like(z["z"])
    for alpha in alphas(steps).tolist():
        v = (alpha * z["z"]).requires_grad_(True)

        def patch(m, a, o):
            o = o.clone()
            o[0, -1] = v
            return o

        h = proj.register_forward_hook(patch)
        prob = torch.softmax(model(x).logits[0, -1], -1)[target]
        h.remove()
        total += torch.autograd.grad(prob, v)[0]
    expected = z["z"] * total / steps
    ref, _ = kva(model, [ids], steps=steps, engine="reference", layers=[layer])
    fast, _ = kva(model, [ids], steps=steps, layers=[layer])
    assert rel_err(ref[:, 0], expected[None]) < 1e-5
    assert rel_err(fast[:, 0], expected[None]) < 1e-4


def test_batching_and_layer_groups_do_not_change_results():
    model = tiny_model("gpt2", layers=4)
    together, _ = kva(model, PROMPTS, steps=3)
    alone = torch.cat([kva(model, [p], steps=3)[0] for p in PROMPTS])
    grouped, _ = kva(model, PROMPTS, steps=3, max_rows=1)  # one layer per pass
    some, _ = kva(model, PROMPTS, steps=3, layers=[1, 3])
    assert rel_err(together, alone) < 1e-5
    assert rel_err(grouped, together) < 1e-5
    assert torch.allclose(some, together[:, [1, 3]], rtol=1e-5, atol=1e-8)


def test_bad_inputs_raise():
    model = tiny_model("llama")
    with pytest.raises(AttributionError, match="empty"):
        kva(model, [[1, 2], []])
    with pytest.raises(AttributionError, match="vocabulary"):
        kva(model, [[1, 2]], targets=[10_000])
    with pytest.raises(AttributionError, match="engine"):
        kva(model, [[1, 2]], engine="captum")
    with pytest.raises(AttributionError, match="layers"):
        kva(model, [[1, 2]], layers=[5])


@pytest.mark.slow  # the real default model
def test_default_model_fast_equals_reference(default_model, default_tokenizer):
    """The fast engine in float32 agrees with the reference engine run in float64 (the exact quantity) to 1e-4.
    (The float32 *reference* is the noisier of the two: measured 1.2e-4..2.2e-4 off the float64 result on probe
    prompts, against 5e-6..1.6e-5 for the fast engine.) In float64 both engines agree to 1e-6."""
    import copy

    before = state_dict_copy(default_model)
    prompts = as_prompts(probe_records()[:2], default_tokenizer)
    ids = [prompts.ids[0][:16], prompts.ids[1][:9]]  # different lengths, batched (and so padded) in the fast engine
    layers = [0, 29]  # the reference costs 7 full passes per layer: check the first and the last
    fast, t_fast = kva(default_model, ids)
    assert fast.shape == (2, 30, 576)
    assert_state_equal(default_model, before)
    wide = copy.deepcopy(default_model).double()
    ref64, t_ref = kva(wide, ids, engine="reference", layers=layers)
    assert torch.equal(t_fast, t_ref)
    assert rel_err(fast[:, layers].double(), ref64) < 1e-4
    fast64, _ = kva(wide, ids, layers=layers)
    assert rel_err(fast64, ref64) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_close_to_float32():
    model = tiny_model("llama", layers=3).cuda()
    exact, _ = kva(model, PROMPTS, steps=4)
    half, _ = kva(model.to(torch.bfloat16), PROMPTS, steps=4)
    assert torch.isfinite(half).all()
    assert rel_err(half, exact) < 0.1


# -- attribution sets on disk ----------------------------------------------------------------------
def test_attribute_in_memory_and_metadata():
    model = tiny_model("llama")
    attr = attribute(model, None, PROMPTS, steps=3, progress=False)
    assert attr.shape == (4, 2, 32) and attr.path is None
    assert attr.meta["steps"] == 3 and attr.meta["target"] == "prediction" and attr.meta["measure"] == "prob"
    assert attr.meta["prompt_source"] == "list (token ids)"
    assert (attr.seconds > 0).all()
    direct, targets = kva(model, PROMPTS, steps=3)
    assert torch.allclose(attr.values, direct, rtol=1e-5, atol=1e-8) and torch.equal(attr.targets, targets)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_identical_results(tmp_path):
    model = tiny_model("phi3")
    prompts = [[i + 3, i + 4, i + 5, (7 * i) % 100 + 3] for i in range(7)]
    full = attribute(model, None, prompts, steps=3, batch_size=2, progress=False)

    calls = {"n": 0}

    def stop_after_two_batches(module, args):
        calls["n"] += 1
        if calls["n"] > 4:  # two passes (prefix + rows) per batch
            raise Interrupt

    h = model.base_model.register_forward_pre_hook(stop_after_two_batches)
    with pytest.raises(Interrupt):
        attribute(model, None, prompts, steps=3, batch_size=2, path=tmp_path / "run", progress=False)
    h.remove()
    assert (np.load(tmp_path / "run" / "targets.npy") >= 0).sum() == 4  # the two finished batches were kept
    with pytest.raises(AttributionError, match="unfinished"):
        Attributions.load(tmp_path / "run")
    with pytest.raises(AttributionError, match="steps"):
        attribute(model, None, prompts, steps=4, batch_size=2, path=tmp_path / "run", progress=False)
    resumed = attribute(model, None, prompts, steps=3, batch_size=2, path=tmp_path / "run", progress=False)
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.targets, full.targets)
    loaded = Attributions.load(tmp_path / "run")
    assert torch.equal(loaded.values, full.values)
    assert loaded.meta["num_prompts"] == 7 and loaded.meta["model"] == "tiny-random/phi3-seed0"
    assert isinstance(np.load(tmp_path / "run" / "attributions.npy", mmap_mode="r"), np.memmap)


def test_shards_merge_into_the_unsharded_result(tmp_path):
    model = tiny_model("opt")
    prompts = [[i + 3, i + 9, 2 * i + 5] for i in range(5)]
    full = attribute(model, None, prompts, steps=2, progress=False)
    for rank in range(2):
        part = attribute(model, None, prompts, steps=2, shard=(rank, 2), path=tmp_path, progress=False)
        assert len(part) == (2 if rank == 0 else 3)
    with pytest.raises(AttributionError, match="merge"):
        Attributions.load(tmp_path)
    merged = Attributions.from_shards(tmp_path)
    assert torch.allclose(merged.values, full.values, rtol=1e-5, atol=1e-8)
    assert torch.equal(merged.targets, full.targets)
    assert torch.equal(Attributions.load(tmp_path).values, merged.values)
    assert merged.meta["merged_shards"] == 2 and merged.meta["shard"] is None


# -- prompt sources --------------------------------------------------------------------------------
RECORD = {
    "question": "Which planet is largest?",
    "choices": ["Mars", "Jupiter", "Venus", "Earth"],
    "answer": 1,
    "subject": "astronomy_basics",
}


def test_mc_template_is_the_papers():
    assert mc_text(RECORD) == (
        "There is a single choice question about Astronomy Basics. Answer the question by replying A, B, C or D.\n"
        "Question: Which planet is largest?\nChoices:\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer: \n"
    )


def test_prompts_through_the_chat_template(default_tokenizer):
    zero = as_prompts([RECORD], default_tokenizer)
    text = default_tokenizer.decode(zero.ids[0])
    assert "<|im_start|>user\n" + mc_text(RECORD) in text and text.endswith("<|im_start|>assistant\n")
    assert zero.gold == [default_tokenizer("B", add_special_tokens=False)["input_ids"][0]]
    few = as_prompts([RECORD, {**RECORD, "answer": "C"}], default_tokenizer, shots=1)
    assert len(few) == 1 and default_tokenizer.decode(few.ids[0]).count("<|im_start|>assistant\nB\n<|im_end|>") == 1
    assert "1-shot" in few.source


def test_prompt_files_and_text(tmp_path, default_tokenizer):
    (tmp_path / "q.jsonl").write_text(json.dumps(RECORD) + "\n")
    (tmp_path / "anatomy_test.csv").write_text("What is the largest organ?,Skin,Liver,Heart,Brain,A\n")
    (tmp_path / "h.csv").write_text("question,A,B,C,D,answer\nWhich planet is largest?,Mars,Jupiter,Venus,Earth,B\n")
    assert as_prompts(tmp_path / "q.jsonl", default_tokenizer).ids == as_prompts([RECORD], default_tokenizer).ids
    mmlu = read_records(tmp_path / "anatomy_test.csv")
    assert mmlu == [
        {
            "question": "What is the largest organ?",
            "choices": ["Skin", "Liver", "Heart", "Brain"],
            "answer": "A",
            "subject": "anatomy",
        }
    ]
    no_subject = {k: v for k, v in RECORD.items() if k != "subject"}
    with_header = as_prompts(tmp_path / "h.csv", default_tokenizer)
    assert with_header.ids == as_prompts([no_subject], default_tokenizer).ids and with_header.gold[0] is not None
    text = as_prompts(["The capital of France is"], default_tokenizer)
    assert text.ids == [default_tokenizer("The capital of France is")["input_ids"]] and text.gold == [None]
    with pytest.raises(PromptError):
        as_prompts(tmp_path / "missing.jsonl", default_tokenizer)
    with pytest.raises(PromptError, match="question"):
        as_prompts([{"q": 1}], default_tokenizer)


def test_probe_set():
    records = probe_records()
    assert 20 <= len(records) <= 50
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in records)
    assert len({r["question"] for r in records}) == len(records)


def test_datasets_dataset_as_source(default_tokenizer):
    datasets = pytest.importorskip("datasets")
    mmlu_like = datasets.Dataset.from_list([{**RECORD, "choices": RECORD["choices"]}])
    assert as_prompts(mmlu_like, default_tokenizer).ids == as_prompts([RECORD], default_tokenizer).ids


def test_attribution_store_refuses_another_model(tmp_path):
    """A folder resumes only for the same model (weights and shapes, under the same name), prompts and settings;
    anything else is refused with the folder left byte for byte as it was."""
    model = tiny_model("llama")
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12]]
    folder = tmp_path / "run"
    first = attribute(model, None, prompts, steps=2, path=folder, progress=False)

    def files():
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}

    before = files()
    reseeded = tiny_model("llama", seed=1)  # other weights
    tuned = tiny_model("llama")
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.mul_(1.01)  # a fine-tune that leaves the down-projections
    wider = tiny_model("llama", d_ff=48)  # other shapes, same number of layers and d_model
    for other in (reseeded, tuned, wider):
        other.config.name_or_path = model.config.name_or_path
        with pytest.raises(AttributionMismatchError, match=r"another model .*model_fingerprint.*new path="):
            attribute(other, None, prompts, steps=2, path=folder, progress=False)
    with pytest.raises(AttributionMismatchError, match="other prompts"):
        attribute(model, None, prompts[:2] + [[13, 14]], steps=2, path=folder, progress=False)
    same_prompts = loki.prompts.PromptSet(prompts, [6, 7, 8], "list (token ids)")
    for settings in ({"steps": 3}, {"measure": "logit"}, {"target": "gold"}):
        with pytest.raises(AttributionMismatchError, match="other settings"):
            attribute(model, None, same_prompts, **{"steps": 2, **settings}, path=folder, progress=False)
    assert files() == before
    assert torch.equal(attribute(model, None, prompts, steps=2, path=folder, progress=False).values, first.values)

    # A folder from before the fingerprint was recorded: refused for resuming, still readable as it is.
    meta = json.loads((folder / "meta.json").read_text())
    del meta["model_fingerprint"]
    (folder / "meta.json").write_text(json.dumps(meta))
    before = files()
    with pytest.raises(AttributionMismatchError, match="did not record the model's fingerprint"):
        attribute(model, None, prompts, steps=2, path=folder, progress=False)
    assert files() == before and torch.equal(Attributions.load(folder).values, first.values)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"steps": True},
        {"steps": 2.0},
        {"batch_size": 0},
        {"batch_size": "4"},
        {"max_rows": 0},
        {"shots": -1},
        {"poll": 0},
    ],
)
def test_every_attribute_argument_is_validated(tmp_path, bad):
    with pytest.raises(AttributionError, match=next(iter(bad))):
        attribute(tiny_model("llama"), None, [[5, 6, 7]], **{"steps": 2, **bad}, path=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
