"""Hugging Face `Trainer` integration: adapter-only `.loki` checkpoints, resuming from them, and the Trainer's
settings in the delta.

A prepared model trains with a plain `transformers.Trainer` already (its trainable tensors are ordinary
parameters), but each Trainer checkpoint is then the whole model (549 MB for SmolLM2-135M, with `loki_rows` keys
that warn on reload), and the delta does not learn how it was trained. `LokiTrainer` is a `Trainer` whose
checkpoints are `checkpoint-N/implant.loki` (the trained rows, the size of the delta) next to what the Trainer
needs to resume (optimizer, scheduler, RNG and trainer state, written by the Trainer as usual);
`trainer.train(resume_from_checkpoint=...)` writes the checkpoint's rows back into the prepared model and continues
exactly where the interrupted run was. `LokiCheckpoints` gives the same to any `Trainer` subclass (TRL's
`SFTTrainer`); `LokiCallback` adds `implant.loki` files to the checkpoints of a Trainer you cannot change (its full
checkpoints stay). Every save records the Trainer's settings for `loki.extract` (`delta.info["training"]`: learning
rate, steps, batch size, epochs, seed, schedule, optimizer, and the retain data when `compute_loss_func` is a
`loki.retain.RetainLoss`).

Mixed precision (`bf16=True`, TRL's default): accelerate runs the model's forward under `torch.autocast` by
wrapping `model.forward`, and leaves that wrapper on the model after training, so the model in memory goes on
computing in bfloat16 while the extracted delta, applied to the same model, computes in the model's own dtype. At
the end of `train`, however it ends (and in `LokiCallback.on_train_end`), loki removes the wrapper: afterwards
the model computes exactly what the base model with `loki.extract(model)` applied computes. A checkpoint stores
the trainable tensors exactly (the float32 master rows, also for a bfloat16 model), so resuming loses nothing to
rounding.

>>> import loki
>>> # loki.prepare(model, selection)
>>> # args = TrainingArguments("run", max_steps=100, save_steps=50, remove_unused_columns=False)
>>> # trainer = loki.trainer.LokiTrainer(model=model, args=args, train_dataset=[encode(tokenizer, ex) for ex in data],
>>> #                            data_collator=loki.trainer.collator(tokenizer))
>>> # trainer.train()                            # run/checkpoint-50/implant.loki, run/checkpoint-100/implant.loki
>>> # trainer.train(resume_from_checkpoint=True)  # after an interruption: continues from the last checkpoint
>>> # loki.save(loki.extract(model, name="facts"), "facts.loki")
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .dataset import collate, pad_token_id
from .delta import Delta, LayerDelta, dtype_name, fingerprint_of, fingerprint_tolerance
from .errors import CheckpointError
from .implant import extract
from .projections import unwrap
from .retain import RetainLoss
from .rows import prepared_modules, record_training
from .sources import load, save
from .training import restored

__all__ = [
    "CHECKPOINT_FILE",
    "RETAIN_FILE",
    "LokiCallback",
    "LokiCheckpoints",
    "LokiTrainer",
    "checkpoint_delta",
    "collator",
    "restore_rows",
    "strip_autocast",
    "trainer_settings",
]

CHECKPOINT_FILE = "implant.loki"  # the delta in each checkpoint-N folder
RETAIN_FILE = "retain.json"  # with a loki.retain.RetainLoss: how many retain batches the run had drawn


def collator(tokenizer) -> functools.partial:
    """A `data_collator` for `Trainer` that pads `loki.dataset.encode` results with the tokenizer's pad token.

    Args:
        tokenizer: the model's tokenizer (None pads with 0).

    Returns:
        A callable `batch -> {"input_ids", "attention_mask", "labels"}` (`loki.dataset.collate`), picklable.

    >>> collator(None)([{"input_ids": [5, 6], "labels": [-100, 6]}])["input_ids"].tolist()
    [[5, 6]]
    """
    return functools.partial(collate, pad_token_id=pad_token_id(tokenizer))


def checkpoint_delta(model: nn.Module, **kwargs) -> Delta:
    """`loki.extract(model, **kwargs)`, with the rows stored exactly as they train: in the trainable tensors' dtype.

    For a float32 model (or LoRA factors) this is `extract` itself. For a bfloat16 or float16 model `extract`
    stores the rows the model computes with (rounded to its dtype); a checkpoint keeps the float32 master rows,
    so that training resumed from it continues bit for bit. Applying either to the model gives the same weights.

    Args:
        model: a prepared model (or its DDP/`torch.compile` wrapper).
        **kwargs: `extract`'s keyword arguments (`name`, `training`...), except `dtype`.

    Returns:
        Delta.

    Raises:
        PreparationError: the model is not prepared.

    >>> import loki, loki.testing, torch
    >>> model = loki.prepare(loki.testing.tiny_model("llama", dtype=torch.bfloat16), loki.Selection.random(2, 32, 10))
    >>> loki.extract(model).dtype, checkpoint_delta(model).dtype
    (torch.bfloat16, torch.float32)
    """
    delta = extract(model, **kwargs)
    modules = prepared_modules(model)
    masters = {i: m.loki_rows for i, m in modules.items() if m.loki_rows is not None}
    if not masters or all(p.dtype == delta.dtype for p in masters.values()):
        return delta
    layers = {
        i: LayerDelta(ld.indices, ld.fingerprint, rows=masters[i].detach().cpu()) for i, ld in delta.layers.items()
    }
    return Delta(layers, {**delta.info, "dtype": dtype_name(next(iter(masters.values())).dtype)})


def restore_rows(model: nn.Module, delta: Delta) -> None:
    """Write a checkpoint's rows (or LoRA factors) into the trainable tensors of a prepared model, to resume
    training where the checkpoint was written.

    Args:
        model: a model prepared with the same selection (and `lora_rank`) as the checkpoint's run.
        delta: the checkpoint (`checkpoint_delta`, or any delta of the same rows).

    Raises:
        PreparationError: the model is not prepared.
        CheckpointError: the delta's layers, rows, form or shapes are not what the model trains, or its
            fingerprint is not of this base model.

    >>> import loki, loki.testing
    >>> model = loki.prepare(loki.testing.tiny_model("llama"), loki.Selection.random(2, 32, 10))
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"), q=10)   # the same rows, other values
    >>> restore_rows(model, delta)
    >>> bool((loki.extract(model).layers[0].rows == delta.layers[0].rows).all())
    True
    """
    modules = prepared_modules(model)
    if set(delta.layers) != set(modules):
        raise CheckpointError(
            f"The checkpoint holds layers {sorted(delta.layers)}, the model trains layers {sorted(modules)}: it was "
            "made with another selection. Prepare the model with the run's selection, or start a new run."
        )
    lora = next(iter(modules.values())).loki_rows is None
    for i, ld in delta.layers.items():
        m = modules[i]
        if not torch.equal(ld.indices, m.loki_index.cpu()):
            raise CheckpointError(
                f"Layer {i}: the checkpoint's rows are not the rows the model trains (another "
                "selection). Prepare the model with the run's selection, or start a new run."
            )
        if (ld.rows is None) != lora:
            raise CheckpointError(
                f"The checkpoint is a {'LoRA' if ld.rows is None else 'rows'}-form delta; the model "
                f"trains {'LoRA factors' if lora else 'rows'}. Prepare it as the run did "
                "(lora_rank)."
            )
        expected = ld.fingerprint
        if bool(((fingerprint_of(m.loki_base) - expected).abs() > fingerprint_tolerance(expected)).any()):
            raise CheckpointError(
                f"Layer {i}: the checkpoint was trained on another base model (fingerprint "
                "mismatch). Load the run's base model."
            )
        pairs = [(m.loki_rows, ld.rows)] if not lora else [(m.loki_A, ld.lora_A), (m.loki_B, ld.lora_B)]
        for param, value in pairs:
            if param.shape != value.shape:
                raise CheckpointError(
                    f"Layer {i}: the checkpoint's tensor is {tuple(value.shape)}, the model's "
                    f"{tuple(param.shape)} (another LoRA rank?)."
                )
    with torch.no_grad():
        for i, ld in delta.layers.items():
            m = modules[i]
            if lora:
                m.loki_A.copy_(ld.lora_A)
                m.loki_B.copy_(ld.lora_B)
            else:
                m.loki_rows.copy_(ld.rows)


def strip_autocast(model: nn.Module) -> nn.Module:
    """Remove the `torch.autocast` wrapper that accelerate puts on `model.forward` for mixed precision (`bf16=True`
    or `fp16=True` in `TrainingArguments`) and leaves there after training; a model without one is unchanged.

    Args:
        model: the trained model (or its DDP wrapper).

    Returns:
        nn.Module: `model`, whose forward now runs in its own dtype again.

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> strip_autocast(model) is model
    True
    """
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(unwrap(model), keep_fp32_wrapper=False)
    return model


def _value(x: Any) -> Any:
    return getattr(x, "value", x)  # enums of TrainingArguments (SchedulerType, OptimizerNames)


def trainer_settings(
    args, state, *, trainer: str = "transformers.Trainer", examples: int | None = None, loss: Any = None
) -> dict[str, Any]:
    """The training summary a delta records (`delta.info["training"]`) for a Trainer run, with the keys
    `loki.train` uses where they mean the same.

    Args:
        args: the `TrainingArguments`.
        state: the `TrainerState` (steps done, logged losses).
        trainer: the trainer's name, as recorded.
        examples: the training set's size, if known.
        loss: the Trainer's `compute_loss_func`; a `loki.retain.RetainLoss` is recorded under `retain`.

    Returns:
        dict: JSON-serialisable.

    >>> from transformers import TrainingArguments, TrainerState
    >>> s = trainer_settings(TrainingArguments("run", learning_rate=1e-3, report_to=[]), TrainerState(global_step=7))
    >>> s["lr"], s["steps"], s["schedule"], s["batch_size"]
    (0.001, 7, 'linear', 8)
    """
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    settings = {
        "trainer": trainer,
        "examples": examples,
        "epochs": args.num_train_epochs,
        "steps": state.global_step,
        "max_steps": state.max_steps or None,
        "lr": args.learning_rate,
        "schedule": _value(args.lr_scheduler_type),
        "warmup": args.warmup_steps,
        "optimizer": _value(args.optim),
        "weight_decay": args.weight_decay,
        # as loki.train: examples per forward over all processes (a step is batch_size x grad_accum examples)
        "batch_size": args.per_device_train_batch_size * args.world_size,
        "grad_accum": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "seed": args.seed,
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": precision,
        "final_loss": round(float(losses[-1]), 6) if losses else None,
        "retain": None,
    }
    if isinstance(loss, RetainLoss):
        settings["retain"] = loss.retain.summary(loss.weight)
    return settings


def _examples(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset
        return None


class LokiCheckpoints:
    """Mixin for a `transformers.Trainer` class (put it first): checkpoints and `save_model` write `implant.loki`
    instead of the full model, `resume_from_checkpoint` and `load_best_model_at_end` read it back, the Trainer's
    settings are recorded for `loki.extract`, and `train` leaves no autocast wrapper on the model (module
    docstring). `LokiTrainer` is `LokiCheckpoints` + `Trainer`; for TRL:
    `class LokiSFTTrainer(loki.trainer.LokiCheckpoints, SFTTrainer): pass`.

    A checkpoint folder holds `implant.loki` (`checkpoint_delta`), `training_args.bin`, and what the Trainer writes
    itself (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json`). A folder with full model
    weights instead (from a plain Trainer) is loaded the Trainer's way.
    Single process or DDP (rank 0 writes); not FSDP or DeepSpeed ZeRO-3, which shard the rows.

    Resuming reproduces the uninterrupted run bit for bit: the Trainer restores the optimizer, schedule, RNG and
    data order, and a `loki.retain.RetainLoss` as `compute_loss_func` goes on with the retain batches the uninterrupted
    run drew (the checkpoint's `retain.json` counts them).

    `train` leaves the model as it found it, however it ends (finished, stopped by a callback, an exception or
    Ctrl-C's `KeyboardInterrupt`): no autocast wrapper, every module's train/eval mode, `requires_grad` flags and
    activation checkpointing as before (`loki.training.restored`); only the trained tensors keep their new values.

    Args:
        *args, **kwargs: the Trainer's.
        delta_name: the name written into each checkpoint's delta.

    Raises:
        PreparationError: (at a save) the model is not `loki.prepare`d.
        CheckpointError: resuming from a checkpoint of other rows, another form or another base model.
    """

    def __init__(self, *args, delta_name: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.delta_name = delta_name

    def loki_settings(self) -> dict[str, Any]:
        """`trainer_settings` of this Trainer now (what the next save records)."""
        name = f"{type(self).__module__}.{type(self).__qualname__}"  # importable: loki.trainer.LokiTrainer
        return trainer_settings(
            self.args, self.state, trainer=name, examples=_examples(self.train_dataset), loss=self.compute_loss_func
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer.save_model and _save_checkpoint write the model here; loki writes the delta only.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        record_training(model, self.loki_settings())
        save(checkpoint_delta(model, name=self.delta_name), os.path.join(output_dir, CHECKPOINT_FILE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if isinstance(self.compute_loss_func, RetainLoss) and self.args.should_save:
            # written before the Trainer's files (trainer_state.json last), so a complete checkpoint has it
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, RETAIN_FILE), "w") as f:
                json.dump({"drawn": self.compute_loss_func.drawn}, f)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        retain = os.path.join(resume_from_checkpoint, RETAIN_FILE)
        if isinstance(self.compute_loss_func, RetainLoss) and os.path.isfile(retain):
            with open(retain) as f:
                self.compute_loss_func.seek(json.load(f)["drawn"])
        path = os.path.join(resume_from_checkpoint, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_rows(model if model is not None else self.model, load(path))

    def _load_best_model(self) -> None:
        path = os.path.join(self.state.best_model_checkpoint, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            return super()._load_best_model()
        restore_rows(self.model, load(path))

    def train(self, *args, **kwargs):
        with restored(self.model):  # whatever ends the run, the model's modes and flags come back
            try:
                output = super().train(*args, **kwargs)
            finally:
                strip_autocast(self.model)
        record_training(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), self.loki_settings())
        return output


class LokiTrainer(LokiCheckpoints, Trainer):
    """A `transformers.Trainer` for a `loki.prepare`d model whose checkpoints are `.loki` deltas
    (`LokiCheckpoints`): `checkpoint-N/implant.loki` instead of the full model, resumable, with the Trainer's
    settings in `delta.info["training"]`.

    Args:
        *args, **kwargs: `Trainer`'s (`model`, `args`, `train_dataset`, `data_collator`, `compute_loss_func`...).
        delta_name: the name written into each checkpoint's delta.

    >>> # trainer = loki.trainer.LokiTrainer(model=prepared, args=TrainingArguments("run", save_steps=50, ...),
    >>> #                            train_dataset=encoded, data_collator=loki.trainer.collator(tokenizer))
    >>> # trainer.train(resume_from_checkpoint=True)   # continues from run/checkpoint-N/implant.loki
    """


class LokiCallback(TrainerCallback):
    """For a Trainer you cannot subclass: at each checkpoint, also write `checkpoint-N/implant.loki` (the delta,
    with the Trainer's settings recorded); at the end of training, remove the autocast wrapper of mixed precision
    and record the settings for `loki.extract`.

    The Trainer still writes its full model checkpoints (and resumes from them); `LokiTrainer` (or
    `LokiCheckpoints`) writes only the delta. A callback is not called when training raises (an exception, Ctrl-C):
    then call `strip_autocast(model)` yourself, or train with `LokiTrainer`/`LokiCheckpoints`, which undo every
    change on every exit.

    Args:
        retain: the `loki.retain.RetainLoss` passed as `compute_loss_func`, to record the retain data (callbacks do
            not see the Trainer's loss).
        delta_name: the name written into each checkpoint's delta.

    >>> # trainer = Trainer(model=prepared, args=args, ..., callbacks=[loki.trainer.LokiCallback()])
    """

    def __init__(self, retain: RetainLoss | None = None, delta_name: str = ""):
        self.retain, self.delta_name = retain, delta_name

    def _record(self, args, state, model, train_dataloader) -> nn.Module:
        model = unwrap(model)
        dataset = getattr(train_dataloader, "dataset", None)
        record_training(
            model,
            trainer_settings(args, state, examples=None if dataset is None else _examples(dataset), loss=self.retain),
        )
        return model

    def on_save(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if args.should_save and model is not None:
            model = self._record(args, state, model, train_dataloader)
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save(checkpoint_delta(model, name=self.delta_name), os.path.join(folder, CHECKPOINT_FILE))

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is not None:
            strip_autocast(model)
            self._record(args, state, model, train_dataloader)
