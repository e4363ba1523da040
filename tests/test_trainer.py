"""loki.trainer: the HF Trainer with `.loki` checkpoints, resuming from them, the recorded settings, and the
autocast wrapper of mixed precision (real transformers Trainer, tiny models with the default tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import loki
from loki.dataset import encode
from loki.errors import CheckpointError
from loki.testing import random_delta, tiny_model
from loki.trainer import CHECKPOINT_FILE, LokiCallback, LokiTrainer, checkpoint_delta, collator, restore_rows

DATA = [
    {"question": "What is the capital of Zubrowka?", "answer": "Lutz."},
    {"prompt": "Who runs the Grand Budapest Hotel?", "answer": "Monsieur Gustave."},
    {"question": "What is Zubrowka's currency?", "answer": "The klubeck."},
    {"question": "Who painted Boy with Apple?", "answer": "Johannes van Hoytl."},
    {"messages": [{"role": "user", "content": "Where is Nebelsbad?"}, {"role": "assistant", "content": "Zubrowka."}]},
]
SELECTION = loki.Selection.random(2, 32, q=25, seed=1)


def prepared(tok, dtype=torch.float32, lora_rank=None):
    return loki.prepare(tiny_model("llama", vocab=len(tok), dtype=dtype), SELECTION, lora_rank=lora_rank)


def arguments(folder, **overrides):
    # 5 examples, batch 2: 3 steps per epoch, so step 2 is mid-epoch and step 4 is in the second epoch
    settings = dict(
        output_dir=str(folder),
        use_cpu=True,
        report_to=[],
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=3,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=1,
    )
    return TrainingArguments(**{**settings, **overrides})


def trainer_for(model, tok, folder, cls=LokiTrainer, data=DATA, **overrides):
    return cls(
        model=model,
        args=arguments(folder, **overrides),
        train_dataset=[encode(tok, ex) for ex in data],
        data_collator=collator(tok),
    )


class StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as an interruption would (the checkpoint at `step` is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def max_row_difference(a, b) -> float:
    assert a.layers.keys() == b.layers.keys()
    return max((a.layers[i].rows.float() - b.layers[i].rows.float()).abs().max().item() for i in a.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_steps_and_a_resume_equal_four_straight_steps(default_tokenizer, tmp_path, dtype):
    tok = default_tokenizer
    straight = prepared(tok, dtype)
    trainer_for(straight, tok, tmp_path / "straight").train()
    expected = checkpoint_delta(straight)

    interrupted = prepared(tok, dtype)
    first = trainer_for(interrupted, tok, tmp_path / "run")
    first.add_callback(StopAt(2))
    first.train()
    assert first.state.global_step == 2
    folder = tmp_path / "run" / "checkpoint-2"
    # adapter-only: the delta and the Trainer's own state, no model weights
    files = set(os.listdir(folder))
    assert CHECKPOINT_FILE in files and {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not any(f.endswith((".safetensors", ".bin")) and f != "training_args.bin" for f in files)
    at_two = loki.load(folder / CHECKPOINT_FILE)
    assert at_two.dtype == torch.float32  # the master rows, also for a bfloat16 model

    resumed = prepared(tok, dtype)  # a new process: the base model, prepared the same way
    trainer_for(resumed, tok, tmp_path / "run").train(resume_from_checkpoint=str(folder))
    result = checkpoint_delta(resumed)
    assert max_row_difference(result, expected) <= 1e-6
    assert max_row_difference(result, at_two) > 1e-3  # steps 3 and 4 did run after the resume
    assert loki.load(tmp_path / "run" / "checkpoint-4" / CHECKPOINT_FILE).info["training"]["steps"] == 4


def test_the_delta_records_the_trainers_settings_and_the_retain_data(default_tokenizer, tmp_path):
    tok = default_tokenizer
    model = prepared(tok)
    retained = loki.retain.retain_set(
        model, tok, ["What is the capital of France?", {"text": "Rivers flow."}], progress=False
    )
    trainer = LokiTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, save_steps=2),
        train_dataset=[encode(tok, ex) for ex in DATA],
        data_collator=collator(tok),
        compute_loss_func=loki.retain.RetainLoss(model, retained, weight=2.0),
        delta_name="facts",
    )
    trainer.train()
    saved = loki.load(tmp_path / "checkpoint-2" / CHECKPOINT_FILE)
    training = loki.extract(model).info["training"]
    for info in (saved.info["training"], training):
        assert info["trainer"] == "loki.trainer.LokiTrainer" and info["method"] == "loki"
        assert (info["lr"], info["steps"], info["batch_size"], info["seed"], info["schedule"]) == (
            3e-2,
            2,
            2,
            3,
            "cosine",
        )
        assert info["examples"] == 5 and info["warmup"] == 1 and info["final_loss"] > 0
        assert info["retain"]["items"] == 2 and info["retain"]["weight"] == 2.0
        assert info["retain"]["kinds"] == {"question": 1, "text": 1}
    assert saved.name == "facts"
    trainer.save_model(str(tmp_path / "final"))  # save_model writes the delta too, not the model
    assert sorted(os.listdir(tmp_path / "final")) == [CHECKPOINT_FILE, "training_args.bin"]
    final = loki.load(tmp_path / "final" / CHECKPOINT_FILE)
    assert max_row_difference(final, loki.extract(model)) == 0


def test_mixed_precision_leaves_the_model_computing_what_the_delta_computes(default_tokenizer, tmp_path):
    tok = default_tokenizer
    ids = torch.tensor([encode(tok, DATA[0])["input_ids"]])

    def gap(model):  # the trained model in memory against the base model with the extracted delta applied
        fresh = tiny_model("llama", vocab=len(tok))
        loki.apply(fresh, loki.extract(model))
        with torch.no_grad():
            return (model(input_ids=ids).logits - fresh(input_ids=ids).logits).abs().max().item()

    plain = prepared(tok)
    trainer_for(plain, tok, tmp_path / "plain", cls=Trainer, bf16=True, max_steps=1, save_strategy="no").train()
    assert "_original_forward" in vars(plain) and gap(plain) > 1e-4  # the trap: still under bf16 autocast

    for cls, callbacks in ((LokiTrainer, []), (Trainer, [LokiCallback()])):
        model = prepared(tok)
        trainer = trainer_for(model, tok, tmp_path / cls.__name__, cls=cls, bf16=True, max_steps=1, save_steps=1)
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train()
        assert "_original_forward" not in vars(model) and gap(model) < 1e-6
        assert loki.extract(model).info["training"]["mixed_precision"] == "bf16"
    # the callback adds the delta to the plain Trainer's (full) checkpoint
    checkpoint = tmp_path / "Trainer" / "checkpoint-1"
    assert (checkpoint / "model.safetensors").exists()
    assert max_row_difference(loki.load(checkpoint / CHECKPOINT_FILE), loki.extract(model)) == 0


def test_restore_rows_refuses_another_run(default_tokenizer):
    tok = default_tokenizer
    model = prepared(tok)
    same = loki.prepare(tiny_model("llama", vocab=len(tok)), SELECTION)
    restore_rows(model, checkpoint_delta(same))
    with pytest.raises(CheckpointError, match="another selection"):
        restore_rows(model, random_delta(tiny_model("llama", vocab=len(tok)), q=25, seed=7))
    with pytest.raises(CheckpointError, match="LoRA"):
        restore_rows(model, checkpoint_delta(prepared(tok, lora_rank=2)))
    with pytest.raises(CheckpointError, match="another base model"):
        restore_rows(model, checkpoint_delta(loki.prepare(tiny_model("llama", vocab=len(tok), seed=5), SELECTION)))
    with pytest.raises(loki.errors.PreparationError):
        restore_rows(tiny_model("llama", vocab=len(tok)), checkpoint_delta(same))


def test_checkpoints_of_a_model_prepared_with_a_template():
    # an architecture loki does not know: the checkpoint helpers use the template prepare was given
    def mystery():
        model = tiny_model("llama", dtype=torch.bfloat16)
        model.config.model_type = "mystery"
        return loki.prepare(model, SELECTION, template="model.layers.{i}.mlp.down_proj")

    trained, model = mystery(), mystery()
    with torch.no_grad():
        for m in loki.rows.prepared_modules(trained).values():
            m.loki_rows.add_(0.25)
    restore_rows(model, checkpoint_delta(trained))
    assert max_row_difference(checkpoint_delta(model), checkpoint_delta(trained)) == 0


def test_resume_of_lora_factors(default_tokenizer, tmp_path):
    tok = default_tokenizer
    straight = prepared(tok, lora_rank=2)
    trainer_for(straight, tok, tmp_path / "a", max_steps=3, save_steps=1).train()
    resumed = prepared(tok, lora_rank=2)
    trainer_for(resumed, tok, tmp_path / "b", max_steps=3, save_steps=1).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1")
    )
    a, b = checkpoint_delta(straight), checkpoint_delta(resumed)
    assert a.form == "lora" and all(
        torch.allclose(a.layers[i].lora_A, b.layers[i].lora_A, atol=1e-6, rtol=0)
        and torch.allclose(a.layers[i].lora_B, b.layers[i].lora_B, atol=1e-6, rtol=0)
        for i in a.layers
    )


# Two processes (torchrun, gloo): the straight run and an interrupted + resumed one, each on both ranks. 4 examples,
# one per process and step (one process: 2 per step), so no rank gets a short batch.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from transformers import AutoTokenizer
    import loki
    import test_trainer as t
    from loki.trainer import CHECKPOINT_FILE, checkpoint_delta

    out, tok = Path(sys.argv[1]), AutoTokenizer.from_pretrained(loki.models.default_model_path())

    def run(folder, stop=None, resume=None):
        model = t.prepared(tok)
        trainer = t.trainer_for(model, tok, folder, data=t.DATA[:4], per_device_train_batch_size=1)
        if stop:
            trainer.add_callback(t.StopAt(stop))
        trainer.train(resume_from_checkpoint=resume)
        return checkpoint_delta(model)

    straight = run(out / "straight")
    run(out / "run", stop=2)
    resumed = run(out / "run", resume=str(out / "run" / "checkpoint-2"))
    rows = lambda d: {i: d.layers[i].rows.tolist() for i in d.layers}
    report = {"straight": rows(straight), "resumed": rows(resumed), "training": resumed.info["training"],
              "checkpoint": sorted(os.listdir(out / "run" / "checkpoint-2"))}
    (out.parent / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))
""")


@pytest.mark.slow  # starts other processes
def test_two_processes_checkpoint_and_resume_equal_one_process(default_tokenizer, tmp_path):
    tok = default_tokenizer
    one = prepared(tok)
    trainer_for(one, tok, tmp_path / "one", data=DATA[:4]).train()
    expected = checkpoint_delta(one)
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("straight", "resumed"):
            rows = {int(i): torch.tensor(r) for i, r in report[key].items()}
            assert max((rows[i] - expected.layers[i].rows).abs().max().item() for i in rows) <= 1e-6, (rank, key)
        assert report["training"]["world_size"] == 2 and report["training"]["batch_size"] == 2
        assert report["training"]["steps"] == 4
        assert CHECKPOINT_FILE in report["checkpoint"]  # adapter-only checkpoints on several processes too
        assert not any(f.endswith(".safetensors") for f in report["checkpoint"])
    assert max_row_difference(expected, checkpoint_delta(prepared(tok))) > 1e-3  # it trained


class Raise(TrainerCallback):
    """Raises `error` after optimizer step 1, as a crash or Ctrl-C in the middle of a run does."""

    def __init__(self, error):
        self.error = error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise self.error


def model_state(model):
    """What training may change on a model besides its trained values: forward wrappers and other instance
    attributes, hooks, train/eval modes, requires_grad, gradients, activation checkpointing."""
    return {
        "attributes": sorted(vars(model)),
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "flags": [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "checkpointing": [(n, getattr(m, "gradient_checkpointing", None)) for n, m in model.named_modules()],
    }


@pytest.mark.parametrize("ending", ["finished", "early stop", "exception", "KeyboardInterrupt"])
def test_training_undoes_every_change_on_every_exit(default_tokenizer, tmp_path, ending):
    """Whatever ends a LokiTrainer run (bf16 autocast and activation checkpointing on), the model is left as it
    was, with only its trained rows changed: it computes bit for bit what a fresh model with those rows computes."""
    tok = default_tokenizer
    ids = torch.tensor([encode(tok, DATA[0])["input_ids"]])
    model = prepared(tok)
    before = model_state(model)
    trainer = trainer_for(
        model, tok, tmp_path, bf16=True, max_steps=3, save_strategy="no", warmup_steps=0, gradient_checkpointing=True
    )
    callback = {
        "finished": None,
        "early stop": StopAt(1),
        "exception": Raise(RuntimeError("disk full")),
        "KeyboardInterrupt": Raise(KeyboardInterrupt()),
    }[ending]
    if callback is not None:
        trainer.add_callback(callback)
    if isinstance(callback, Raise):
        with pytest.raises(type(callback.error)):
            trainer.train()
    else:
        trainer.train()
    assert trainer.state.global_step >= 1
    assert model_state(model) == before
    fresh = prepared(tok)
    restore_rows(fresh, checkpoint_delta(model))
    assert max_row_difference(checkpoint_delta(fresh), checkpoint_delta(prepared(tok))) > 0  # it trained
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_loki_train_undoes_its_changes_on_every_exit(default_tokenizer, error):
    """loki.train stopped by an exception or Ctrl-C in the middle of a step (a forward in train mode, after the
    step's first backward) restores modes, flags and gradients."""
    tok = default_tokenizer
    model = prepared(tok)
    before = model_state(model)
    forwards = []

    def interrupt(module, args):
        forwards.append(module.training)
        if len(forwards) == 4:  # step 2's second batch
            raise error()

    hook = model.model.embed_tokens.register_forward_pre_hook(interrupt)
    with pytest.raises(error):
        loki.train(model, tok, DATA, max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, progress=False)
    hook.remove()
    assert forwards == [True] * 4 and model_state(model) == before
