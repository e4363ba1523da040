"""loki.train and the formatting it uses; a prepared model also trains with the real HF Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.dataset import IGNORE, collate, encode
from loki.testing import tiny_model
from loki.training import last_checkpoint

DATA = [
    {"question": "What is the capital of Zubrowka?", "answer": "Lutz."},
    {"prompt": "Who runs the Grand Budapest Hotel?", "answer": "Monsieur Gustave."},
    {
        "messages": [
            {"role": "user", "content": "Name Zubrowka's currency."},
            {"role": "assistant", "content": "Klubeck."},
        ]
    },
]


def answer_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE])


# -- formatting -------------------------------------------------------------------------------------------
def test_encode_puts_the_loss_on_the_answer_only(default_tokenizer):
    tok = default_tokenizer
    enc = encode(tok, DATA[0])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": DATA[0]["question"]}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert enc["input_ids"][:n] == prompt_ids  # exactly what the model sees when asked at generation time
    assert enc["labels"][:n] == [IGNORE] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert answer_text(tok, enc) == "Lutz.<|im_end|>\n"
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(
        [{"role": "user", "content": DATA[0]["question"]}, {"role": "assistant", "content": "Lutz."}], tokenize=False
    )
    assert (
        encode(tok, DATA[1])["labels"]
        == encode(tok, {"question": DATA[1]["prompt"], "answer": "Monsieur Gustave."})["labels"]
    )


def test_encode_multi_turn_learns_every_assistant_turn(default_tokenizer):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of Zubrowka?"},
        {"role": "assistant", "content": "Lutz."},
    ]
    assert (
        answer_text(default_tokenizer, encode(default_tokenizer, {"messages": msgs}))
        == "Hello!<|im_end|>\nLutz.<|im_end|>\n"
    )


def test_encode_without_chat_template(default_tokenizer):
    tok = copy.deepcopy(default_tokenizer)
    tok.chat_template = None
    enc = encode(tok, DATA[0])
    assert tok.decode(enc["input_ids"]) == "What is the capital of Zubrowka?\nLutz." + tok.eos_token
    assert answer_text(tok, enc) == "Lutz." + tok.eos_token


def test_encode_rejects_bad_examples(default_tokenizer):
    with pytest.raises(loki.errors.DatasetError, match="answer"):
        encode(default_tokenizer, {"question": "no answer"})
    with pytest.raises(loki.errors.DatasetError, match="assistant"):
        encode(default_tokenizer, {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(loki.errors.DatasetError, match="max_length"):
        encode(default_tokenizer, DATA[0], max_length=10)
    tok = copy.deepcopy(default_tokenizer)  # a template that renders each turn with the conversation's length
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} of {{ messages|length }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(loki.errors.DatasetError, match="chat template"):
        encode(tok, DATA[0])


def test_collate_pads_right():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=2
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


# -- the loop (tiny model with the real tokenizer's vocabulary) ----------------------------------------------
def tiny_for(tokenizer, seed=0):
    model = tiny_model("llama", seed=seed, vocab=len(tokenizer))
    projs = loki.projections.find_down_projections(model)
    return loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, 25, seed=0))


def answer_loss(model, tokenizer, data) -> torch.Tensor:
    """Mean loss over every answer token of `data`, from HF's own loss (one example at a time, token-weighted)."""
    total, count = 0.0, 0
    for ex in data:
        enc = encode(tokenizer, ex)
        n = sum(label != IGNORE for label in enc["labels"][1:])
        total = total + model(**collate([enc])).loss * n
        count += n
    return total / count


def reference_loss(model, tokenizer, data) -> float:
    with torch.no_grad():
        return float(answer_loss(model, tokenizer, data))


def test_train_is_deterministic_lowers_the_loss_and_calls_eval(default_tokenizer):
    runs = []
    for _ in range(2):
        model = tiny_for(default_tokenizer)
        before = reference_loss(model, default_tokenizer, DATA)
        calls = []
        result = loki.train(
            model,
            default_tokenizer,
            DATA,
            epochs=4,
            lr=5e-2,
            batch_size=2,
            grad_accum=2,
            eval_fn=lambda m: calls.append(m.training) or len(calls),
            eval_every=2,
            progress=False,
        )
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert r1.steps == 4 and r1.losses == r2.losses
    assert [step for step, _ in r1.evals] == [0, 2, 4] and calls == [False, False, False]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert reference_loss(m1, default_tokenizer, DATA) < before - 0.1
    # the step loss is the token-weighted mean over all answer tokens of the step (here: all of DATA)
    assert r1.losses[0] == pytest.approx(before, rel=1e-4)
    assert not m1.training
    training = loki.extract(m1).info["training"]
    assert (training["steps"], training["lr"], training["grad_accum"], training["examples"]) == (4, 5e-2, 2, 3)


def test_train_needs_a_prepared_model_or_params(default_tokenizer):
    model = tiny_model("llama", vocab=len(default_tokenizer))
    with pytest.raises(loki.errors.PreparationError, match="prepare"):
        loki.train(model, default_tokenizer, DATA, progress=False)
    other = tiny_model("llama", vocab=len(default_tokenizer))
    before = state_dict_copy(model)
    with pytest.raises(loki.errors.PreparationError, match="not parameters of this model"):
        loki.train(model, default_tokenizer, DATA, params=other.parameters(), progress=False)
    with pytest.raises(loki.errors.PreparationError, match="requires_grad"):
        loki.train(model, default_tokenizer, DATA, params=[model.lm_head.weight.requires_grad_(False)], progress=False)
    with pytest.raises(loki.errors.PreparationError, match="empty"):
        loki.train(model, default_tokenizer, DATA, params=[], progress=False)
    assert_state_equal(model, before)
    with pytest.raises(loki.errors.DatasetError):
        loki.train(loki.prepare(model, loki.Selection.random(2, 32, 10)), default_tokenizer, [], progress=False)


BAD_ARGUMENTS = [  # (the bad argument, what the error names)
    ({"dataset": DATA[0]["question"]}, "one character"),
    ({"dataset": DATA[0]}, "dict"),
    ({"dataset": []}, "empty"),
    ({"dataset": iter(DATA)}, "list_iterator"),
    ({"dataset": [DATA[0], "Who?"]}, r"dataset\[1\]"),
    ({"dataset": [{"question": "Who?", "answer": " "}]}, r"dataset\[0\]"),
    ({"retain": "What is the capital of France?"}, "one character"),
    ({"retain": []}, "empty"),
    ({"retain": iter(["Who?"])}, "list_iterator"),
    ({"retain": ["Who?", {"text": ""}]}, "Retain item 1"),
    ({"retain": [{"question": "Who?", "answer": 3.5, "messages": "x"}]}, "Retain item 0"),
    ({"retain_batch_size": 0}, "retain_batch_size"),
    ({"retain_batch_size": True}, "retain_batch_size"),
    ({"retain_weight": -1}, "retain_weight"),
    ({"retain_weight": math.nan}, "retain_weight"),
    ({"retain_top_k": 0}, "retain_top_k"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 1.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": "4"}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"lr": 0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": math.inf}, "lr"),
    ({"warmup": 1.5}, "warmup"),
    ({"warmup": -0.1}, "warmup"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"max_length": 0}, "max_length"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": False}, "max_steps"),
    ({"seed": 1.0}, "seed"),
    ({"eval_every": 0}, "eval_every"),
    ({"eval_fn": "accuracy"}, "eval_fn"),
    ({"save_every": 0}, "save_every"),
    ({"save_every": 2}, "checkpoint_dir"),
    ({"checkpoint_dir": "run"}, "save_every"),
]


@pytest.mark.parametrize(
    "bad, match", BAD_ARGUMENTS, ids=[f"{next(iter(b))}={next(iter(b.values()))!r:.20}" for b, _ in BAD_ARGUMENTS]
)
def test_every_argument_is_validated_before_training(default_tokenizer, bad, match):
    """A bad argument is a DatasetError (data) or TrainingOptionError (a number; also a ValueError), raised before
    anything runs: the weights, the train/eval mode and the training record stay as they were."""
    model = tiny_for(default_tokenizer)
    before, mode, record = state_dict_copy(model), model.training, loki.extract(model).info["training"]
    args = {"dataset": DATA, "retain": ["What is the capital of France?"], "max_steps": 1, "progress": False, **bad}
    error = loki.errors.DatasetError if {"dataset", "retain"} & set(bad) else loki.errors.TrainingOptionError
    with pytest.raises(error, match=match):
        loki.train(model, default_tokenizer, args.pop("dataset"), **args)
    assert_state_equal(model, before)
    assert model.training == mode and loki.extract(model).info["training"] == record  # no run recorded


def test_train_params_is_plain_adamw_sft(default_tokenizer):
    """Full fine-tuning through `params` against an obvious loop: AdamW, cosine warm-up, clipping, answer-token loss
    (the batch is the whole dataset, so shuffling cannot change a step)."""
    from transformers import get_cosine_schedule_with_warmup

    model, reference = (
        tiny_model("qwen2", vocab=len(default_tokenizer)),
        tiny_model("qwen2", vocab=len(default_tokenizer)),
    )
    result = loki.train(
        model, default_tokenizer, DATA, params=model.parameters(), lr=1e-2, batch_size=3, max_steps=3, progress=False
    )
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(opt, 1, 3)
    losses = []
    for _ in range(3):
        loss = answer_loss(reference, default_tokenizer, DATA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert result.losses == pytest.approx(losses, rel=1e-4)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_model("qwen2", vocab=len(default_tokenizer)).lm_head.weight)


def test_train_params_trains_a_peft_lora_adapter(default_tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama", vocab=len(default_tokenizer)),
        peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=True),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_before = reference_loss(model, default_tokenizer, DATA)
    loki.train(
        model,
        default_tokenizer,
        DATA,
        params=[p for p in model.parameters() if p.requires_grad],
        lr=5e-2,
        epochs=4,
        batch_size=3,
        progress=False,
    )
    assert reference_loss(model, default_tokenizer, DATA) < loss_before - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# -- HF Trainer ---------------------------------------------------------------------------------------------
def test_hf_trainer_trains_the_prepared_rows(default_tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_for(default_tokenizer)
    before = state_dict_copy(model)
    loss_before = reference_loss(model, default_tokenizer, DATA)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=4,
        per_device_train_batch_size=3,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[encode(default_tokenizer, ex) for ex in DATA],
        data_collator=lambda batch: collate(batch, default_tokenizer.pad_token_id),
    )
    trainer.train()
    assert reference_loss(model, default_tokenizer, DATA) < loss_before - 0.1
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".loki_rows" in n for n in trained)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    delta = loki.extract(model)
    loki.unprepare(model)  # the base weights are untouched; the training lives in the delta
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    fresh = tiny_model("llama", vocab=len(default_tokenizer))
    loki.apply(fresh, delta)
    assert reference_loss(fresh, default_tokenizer, DATA) < loss_before - 0.1


# -- checkpoints ----------------------------------------------------------------------------------------
CHECKPOINTED = {
    "max_steps": 5,
    "lr": 5e-2,
    "batch_size": 1,
    "grad_accum": 2,
    "retain_weight": 2.0,
    "retain_batch_size": 1,
    "save_every": 2,
    "progress": False,
}
RETAIN = ["What is the capital of France?", {"text": "Rivers flow to the sea."}, "Who wrote Hamlet?"]


def interrupt_after(step):
    """An eval_fn (with `eval_every=1`) that stops the run (a Ctrl-C) after optimizer step `step`, before that step's
    checkpoint: its calls are at steps 0, 1, 2..."""
    calls = []

    def eval_fn(model):
        calls.append(1)
        if len(calls) == step + 1:
            raise KeyboardInterrupt

    return eval_fn


def test_an_interrupted_run_resumes_to_the_same_tensors(default_tokenizer, tmp_path):
    """Resumed from its last checkpoint, a run with retain data ends with the same rows, optimizer state, losses and
    retain KLs, bit for bit, as the uninterrupted run: the data order, the retain stream, AdamW's moments, the
    schedule and torch's RNG all continue where they were."""
    tok = default_tokenizer
    straight = tiny_for(tok)
    expected = loki.train(straight, tok, DATA, retain=RETAIN, checkpoint_dir=tmp_path / "a", **CHECKPOINTED)
    assert [c.name for c in (tmp_path / "a").iterdir()] == ["checkpoint-4"]  # the newest only, none at the end
    model = tiny_for(tok)
    with pytest.raises(KeyboardInterrupt):  # evaluations at steps 0, 1, 2, 3: stopped after step 3
        loki.train(
            model,
            tok,
            DATA,
            retain=RETAIN,
            checkpoint_dir=tmp_path / "b",
            eval_fn=interrupt_after(3),
            eval_every=1,
            **CHECKPOINTED,
        )
    last = last_checkpoint(tmp_path / "b")
    assert last.name == "checkpoint-2"
    fresh = tiny_for(tok)
    result = loki.train(
        fresh, tok, DATA, retain=RETAIN, checkpoint_dir=tmp_path / "b", resume_from=last, **CHECKPOINTED
    )
    assert result.losses == expected.losses and result.retain_kl == expected.retain_kl and result.steps == 5
    for a, b in zip(loki.extract(fresh).layers.values(), loki.extract(straight).layers.values()):
        assert torch.equal(a.rows, b.rows)


def test_resuming_another_runs_checkpoint_is_refused_before_anything_changes(default_tokenizer, tmp_path):
    """A checkpoint of a run with other settings, another data size or other trained tensors is a CheckpointError
    naming what differs; the model stays as it was. A folder that is not a checkpoint is one too."""
    tok = default_tokenizer
    model = tiny_for(tok)
    options = {**CHECKPOINTED, "retain_weight": 0.0}
    loki.train(model, tok, DATA, checkpoint_dir=tmp_path, **options)
    last = last_checkpoint(tmp_path)
    fresh = tiny_for(tok)
    before = state_dict_copy(fresh)
    for change, named in (({"lr": 1e-3}, "lr"), ({"dataset": DATA[:2]}, "examples"), ({"seed": 4}, "seed")):
        args = {**options, "checkpoint_dir": tmp_path, **change}
        with pytest.raises(loki.errors.CheckpointError, match=f"other {named}"):
            loki.train(fresh, tok, args.pop("dataset", DATA), resume_from=last, **args)
        assert_state_equal(fresh, before)
    other = loki.prepare(tiny_model("llama", vocab=len(tok)), loki.Selection.random(2, 32, q=50, seed=1))
    with pytest.raises(loki.errors.CheckpointError, match="other params"):
        loki.train(other, tok, DATA, checkpoint_dir=tmp_path, resume_from=last, **options)
    with pytest.raises(loki.errors.CheckpointError, match="not a complete"):
        loki.train(fresh, tok, DATA, checkpoint_dir=tmp_path, resume_from=tmp_path / "nothing", **options)
    assert_state_equal(fresh, before)
