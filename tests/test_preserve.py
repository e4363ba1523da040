"""loki.preserve: training under a preservation keeps the preserved prompts' outputs where training without it moves
them (rows and LoRA-on-rows, AdamW, several families, HF Trainer, 2 processes); the low-rank sketch gives the dense
projector; extract reproduces the constrained rows exactly and records the preservation; bad input is refused."""

from __future__ import annotations

import pytest
import torch

import loki
from loki.errors import DatasetError, IncompatibleModelError, PreparationError
from loki.testing import tiny_model

PRESERVED = [{"text": list(range(5, 25))}, {"text": list(range(30, 48))}]  # 38 keys per layer, d_in = 64
SELECTION = loki.Selection.random(2, 32, q=50, seed=1)  # 16 of 32 rows a layer: training moves a lot


def preserved_logits(model) -> torch.Tensor:
    ids = [item["text"] for item in PRESERVED]
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0] for s in ids])


def adamw_steps(model, steps: int = 8, lr: float = 0.1) -> float:
    """AdamW on other tokens, at a rate that moves the rows far; returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    x = torch.randint(60, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def all_keys(model, items) -> dict[int, torch.Tensor]:
    """Every layer's down-projection inputs on `items` (`{"text": ids}`), one sequence at a time, stacked in float64."""
    keys: dict[int, list] = {0: [], 1: []}
    projs = loki.projections.find_down_projections(model)
    handles = [
        projs.modules[i].register_forward_pre_hook(lambda m, a, i=i: keys[i].append(a[0][0].double())) for i in keys
    ]
    with torch.no_grad():
        for item in items:
            model(torch.tensor([item["text"]]))
    for h in handles:
        h.remove()
    return {layer: torch.cat(ks) for layer, ks in keys.items()}


def dense_projector(model, energy: float) -> dict[int, torch.Tensor]:
    """The slow, obvious reference: every key of every layer stacked, `I - V V^T` from the top eigenvectors of
    `K^T K` that reach `energy` of its trace (1.0: its numerical rank)."""
    out = {}
    for layer, k in all_keys(model, PRESERVED).items():
        values, vectors = torch.linalg.eigh(k.t() @ k)
        values, vectors = values.flip(0), vectors.flip(1)
        if energy >= 1.0:
            p = int((values > 1e-10 * values[0]).sum())
        else:
            p = int((values.cumsum(0) < energy * values.sum()).sum()) + 1
        v = vectors[:, :p]
        out[layer] = torch.eye(k.shape[1], dtype=torch.float64) - v @ v.t()
    return out


def projector_of(keep: loki.Preservation, layer: int) -> torch.Tensor:
    return keep.project(layer, torch.eye(keep.d_in, dtype=torch.float64))


@pytest.mark.parametrize("energy", [1.0, 0.9])
def test_projector_equals_the_dense_reference(energy):
    model = tiny_model("llama")
    keep = loki.preservation(model, None, PRESERVED, energy=energy, progress=False)
    reference = dense_projector(model, energy)
    for layer in (0, 1):
        assert keep.ranks[layer] == int(round(64 - torch.trace(reference[layer]).item()))
        assert torch.allclose(projector_of(keep, layer), reference[layer], atol=1e-5)
    assert keep.tokens == 38 and keep.sequences == 2
    if energy == 1.0:  # 38 independent keys: their exact span
        assert keep.ranks == {0: 38, 1: 38}
        assert all(keep.free.values())  # 38 protected of 64: the 26 free directions are the smaller basis
    else:
        assert all(keep.ranks[layer] < 38 for layer in (0, 1))


def test_low_rank_sketch_equals_the_dense_projector():
    """Keys of rank 10 (one 10-token sequence, 30 times): a rank-12 sketch compresses every 24 keys, and still gives
    the dense covariance's projector, at energy 1.0 and 0.9."""
    model = tiny_model("llama")
    data = [{"text": list(range(40, 50))}] * 30
    for energy in (1.0, 0.9):
        dense = loki.preservation(model, None, data, energy=energy, progress=False)
        sketch = loki.preservation(model, None, data, energy=energy, max_rank=12, progress=False)
        assert dense.ranks == sketch.ranks and all(0 < p <= 10 for p in dense.ranks.values())
        for layer in (0, 1):
            assert torch.allclose(projector_of(sketch, layer), projector_of(dense, layer), atol=1e-5)


def test_a_sketch_too_small_protects_at_most_its_rank_and_says_how_much():
    with pytest.warns(UserWarning, match="Raise max_rank"):
        keep = loki.preservation(tiny_model("llama"), None, PRESERVED, energy=1.0, max_rank=8, progress=False)
    assert keep.ranks == {0: 8, 1: 8} and all(0 < share < 1 for share in keep.kept.values())
    assert keep.summary()["energy_kept_min"] == round(min(keep.kept.values()), 6)
    full = loki.preservation(tiny_model("llama"), None, PRESERVED, energy=1.0, progress=False)
    assert all(share == pytest.approx(1.0) for share in full.kept.values())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("lora_rank", [None, 4])
def test_training_under_preservation_keeps_the_preserved_outputs(family, lora_rank):
    base = preserved_logits(tiny_model(family))
    moved = {}
    for preserve in (False, True):
        model = tiny_model(family)
        keep = loki.preservation(model, None, PRESERVED, energy=1.0, progress=False) if preserve else None
        loki.prepare(model, SELECTION, lora_rank=lora_rank, preserve=keep)
        adamw_steps(model)
        moved[preserve] = (preserved_logits(model) - base).abs().max().item()
        delta = loki.extract(model)
        after = preserved_logits(model)
        loki.unprepare(model)
        with loki.implanted(model, delta):  # the delta is the constrained rows, bit for bit
            assert torch.equal(preserved_logits(model), after)
    assert moved[False] > 1e-2  # without: AdamW moves the preserved outputs
    assert moved[True] < 1e-4  # with: the update is off their keys, layer after layer


EXAMPLES = [{"text": list(range(60, 75))}, {"text": list(range(80, 92))}]  # the implant's own sequences


def contrast_projector(model, ratio: float) -> dict[int, torch.Tensor]:
    """The slow, obvious reference of the contrast rule: the full `d_in`-dimensional generalised eigenproblem
    `C1 v = sigma (C0 + ridge I) v` (mean second moments of the examples' and the preserved keys) solved by
    whitening with `C0`'s eigendecomposition; the projector onto the eigenvectors with `sigma >= ratio`."""
    out = {}
    # text examples are read where they predict a next token: every position but the last (a causal model's key at
    # t depends on tokens up to t only, so the shortened sequences give those keys)
    preserved, examples = all_keys(model, PRESERVED), all_keys(model, [{"text": e["text"][:-1]} for e in EXAMPLES])
    for layer in (0, 1):
        k0, k1 = preserved[layer], examples[layer]
        c0 = k0.t() @ k0 / len(k0)
        c0 = c0 + torch.eye(len(c0), dtype=torch.float64) * 1e-6 * torch.trace(c0) / len(c0)
        c1 = k1.t() @ k1 / len(k1)
        values, vectors = torch.linalg.eigh(c0)
        root = vectors @ torch.diag(values.rsqrt()) @ vectors.t()  # C0^-1/2
        sigma, y = torch.linalg.eigh(root @ c1 @ root)
        q = torch.linalg.qr(root @ y[:, sigma >= ratio]).Q
        out[layer] = q @ q.t()
    return out


@pytest.mark.parametrize("ratio", [3.0, 30.0])
def test_contrast_rule_equals_the_generalised_eigenproblem(ratio):
    """Dense and sketched (keys of rank 38 and 25, a rank-40 sketch) against the full-dimensional reference."""
    model = tiny_model("llama")
    reference = contrast_projector(model, ratio)
    for max_rank in (4096, 40):
        keep = loki.preservation(
            model, None, PRESERVED, examples=EXAMPLES, ratio=ratio, max_rank=max_rank, progress=False
        )
        for layer in (0, 1):
            free = round(torch.trace(reference[layer]).item())
            assert 0 < free <= 25 and keep.ranks[layer] == 64 - free  # within the examples' 25 keys
            assert torch.allclose(projector_of(keep, layer), reference[layer], atol=1e-5)  # what the update may use
        summary = keep.summary()
        assert summary["ratio"] == ratio and summary["example_tokens"] == 25
        assert 0.9 < summary["energy_kept_min"] <= 1  # the free directions hold little of the preserved energy


def test_answered_examples_are_read_where_they_predict_their_answer(default_tokenizer):
    """An answered example's keys are taken at the positions whose outputs predict an answer token (where the loss
    is), not at the chat template's and question's positions, which the preserved prompts share."""
    from loki.dataset import answer_positions, encode

    tok = default_tokenizer
    model = tiny_model("llama", vocab=len(tok))
    examples = [{"question": "What is the capital of Phegartor?", "answer": "The capital of Phegartor is Solvis."}]
    preserved = [{"text": tok("The river flows to the sea, as rivers do. " * 3)["input_ids"]}]
    keep = loki.preservation(model, tok, preserved, examples=examples, ratio=2.0, progress=False)
    encoded = encode(tok, examples[0])
    assert keep.example_tokens == len(answer_positions(encoded["labels"])) < len(encoded["input_ids"]) - 10


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_training_under_the_contrast_rule_learns_the_examples_and_keeps_the_preserved(lora_rank):
    """The update may only use directions where the examples' keys outweigh the preserved ones 100 to 1: AdamW on the
    examples still lowers their loss, and the preserved outputs move far less than without the rule."""
    base = preserved_logits(tiny_model("llama"))
    x = torch.tensor([item["text"][:12] for item in EXAMPLES])
    moved, learned = {}, {}
    for preserve in (False, True):
        model = tiny_model("llama")
        keep = loki.preservation(model, None, PRESERVED, examples=EXAMPLES, ratio=100.0, progress=False)
        loki.prepare(model, SELECTION, lora_rank=lora_rank, preserve=keep if preserve else None)
        with torch.no_grad():
            before = model(x, labels=x).loss.item()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(10):
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            learned[preserve] = before - model(x, labels=x).loss.item()
        moved[preserve] = (preserved_logits(model) - base).abs().max().item()
    assert learned[True] > 0.1 * learned[False] > 0
    assert moved[True] < 0.1 * moved[False]


def test_the_delta_records_the_preservation_and_unprepare_restores_the_model():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = loki.preservation(model, None, PRESERVED, energy=0.95, progress=False)
    loki.prepare(model, SELECTION, preserve=keep)
    adamw_steps(model, steps=3)
    delta = loki.extract(model)
    recorded = delta.info["training"]["preserve"]
    assert recorded == keep.summary() and recorded["energy"] == 0.95 and recorded["tokens"] == 38
    assert len(recorded["sha256"]) == 64 and recorded["protected"]["per_layer"] == [keep.ranks[0], keep.ranks[1]]
    loki.unprepare(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(name.startswith("loki_") for name, _ in model.named_buffers())


def test_hf_trainer_trains_under_the_preservation(default_tokenizer, tmp_path):
    from transformers import TrainingArguments

    from loki.dataset import encode
    from loki.trainer import LokiTrainer, collator

    tok = default_tokenizer
    data = [{"question": f"What is the code word {i}?", "answer": f"Word {i * 7}."} for i in range(4)]
    preserved = [{"text": tok("The river flows to the sea, as rivers do.")["input_ids"]}]
    results = {}
    for preserve in (False, True):
        model = tiny_model("llama", vocab=len(tok))
        ids = torch.tensor([preserved[0]["text"]])
        with torch.no_grad():
            base = model(ids).logits
        keep = loki.preservation(model, tok, preserved, energy=1.0, progress=False) if preserve else None
        loki.prepare(model, SELECTION, preserve=keep)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(preserve)),
            use_cpu=True,
            report_to=[],
            max_steps=6,
            per_device_train_batch_size=2,
            learning_rate=5e-2,
            save_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        LokiTrainer(
            model=model, args=args, train_dataset=[encode(tok, ex) for ex in data], data_collator=collator(tok)
        ).train()
        model.eval()
        with torch.no_grad():
            results[preserve] = (model(ids).logits - base).abs().max().item()
    assert results[False] > 1e-2 and results[True] < 1e-4


def test_bad_input_is_refused_and_nothing_changes():
    model = tiny_model("llama")
    with pytest.raises(DatasetError, match="energy"):
        loki.preservation(model, None, PRESERVED, energy=1.5, progress=False)
    with pytest.raises(DatasetError, match="single string"):
        loki.preservation(model, None, "What is the capital of Peru?", progress=False)
    with pytest.raises(DatasetError, match="max_rank"):
        loki.preservation(model, None, PRESERVED, max_rank=0, progress=False)
    for ratio in (1.0, 0.5, "10", True):
        with pytest.raises(DatasetError, match="ratio must be a number above 1"):
            loki.preservation(model, None, PRESERVED, examples=EXAMPLES, ratio=ratio, progress=False)
    with pytest.raises(DatasetError, match="single string"):
        loki.preservation(model, None, PRESERVED, examples="Solvis", progress=False)
    other = loki.preservation(tiny_model("llama", d_ff=48), None, PRESERVED, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleModelError, match="d_in 48"):
        loki.prepare(model, SELECTION, preserve=other)
    with pytest.raises(PreparationError, match="preserve must be"):
        loki.prepare(model, SELECTION, preserve={"energy": 0.9})
    with pytest.raises(DatasetError, match="need.* a tokenizer|pass the model's tokenizer"):
        loki.preservation(model, None, ["What is the capital of Peru?"], progress=False)
    with pytest.raises(DatasetError, match="outside the model's vocabulary"):
        loki.preservation(model, None, [{"text": [5, 999]}], progress=False)
    everything = loki.preservation(model, None, [{"text": list(range(5, 105))}], energy=1.0, progress=False)
    assert everything.ranks == {0: 64, 1: 64}  # 100 keys span all 64 directions
    with pytest.raises(PreparationError, match="every one of the 64 key directions of layers \\[0, 1\\]"):
        loki.prepare(model, SELECTION, preserve=everything)
    keep = loki.preservation(model, None, PRESERVED, progress=False)
    del keep.bases[1]
    with pytest.raises(IncompatibleModelError, match=r"no keys for layers \[1\]"):
        loki.prepare(model, SELECTION, preserve=keep)
    assert not loki.rows.is_prepared(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loki.prepare(model, SELECTION)  # the rows were not left claimed by the refused calls
