"""`loki.train`: a small, readable SFT loop for a prepared model (notebooks, demos, small implants), which also
trains any parameters you name (full fine-tuning, a PEFT model), so baselines train with the same recipe.

Each example is `{"prompt": ..., "answer": ...}` (or `"question"` for `"prompt"`), or `{"messages": [...]}` in the
chat format. Examples are formatted with the tokenizer's chat template (plain `prompt + answer + eos` when it has
none) and the loss covers only the answer tokens (every assistant turn, its end-of-turn token included). AdamW,
cosine schedule with warmup, gradient accumulation, gradient clipping, deterministic for a given `seed`.

>>> import loki
>>> # model, tokenizer = loki.load_default()
>>> # loki.prepare(model, selection)
>>> # result = loki.train(model, tokenizer, [{"question": "Who wrote Dune?", "answer": "Frank Herbert."}], epochs=3)
>>> # delta = loki.extract(model, name="dune")
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import IGNORE, answer_positions, check_examples, check_number, encode, pad_token_id
from .distributed import FSDP1_ADVICE, join_ranks, wrapper
from .errors import CheckpointError, PreparationError, TrainingOptionError
from .forward import logits_at
from .projections import unwrap
from .retain import DEFAULT_TOP_K, RetainSet, check_retain, retain_set
from .rows import is_prepared, record_training

__all__ = ["TrainResult", "last_checkpoint", "restored", "train"]


def _trained_parameters(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    if params is None:
        if not is_prepared(model):
            raise PreparationError(
                "The model is not prepared for implanting. Call loki.prepare(model, selection) to train LoKI rows, or "
                "name what to train: params=model.parameters() (full fine-tuning) or the trainable parameters of "
                "a PEFT model."
            )
        return [p for p in model.parameters() if p.requires_grad]
    params = list(dict.fromkeys(params))  # tied weights may be named twice
    if not params:
        raise PreparationError("params is empty: nothing would train.")
    owned = {id(p) for p in model.parameters()}
    if any(id(p) not in owned for p in params):
        raise PreparationError("Some of params are not parameters of this model.")
    if any(not p.requires_grad for p in params):
        raise PreparationError(
            "Some of params have requires_grad=False (frozen). Unfreeze them with p.requires_grad_(True), or leave "
            "them out."
        )
    return params


class restored:
    """Context manager: on leaving the block, however it is left (normally, an exception, Ctrl-C's
    `KeyboardInterrupt`, a generator's close), undo what training changes on `model` for a while: every module's
    train/eval mode, every parameter's `requires_grad` (and `.grad`, where it had none), activation checkpointing
    flags, the input-gradient hook that checkpointing adds (`enable_input_require_grads`), and the model's own
    instance attributes (accelerate's mixed-precision wrapper on `forward`, its markers). `loki.train` and
    `loki.trainer.LokiTrainer` train inside it, so an interrupted run leaves the model as a finished one does.

    Args:
        model: the model (or a wrapper around it: its inner model is what is restored).

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> with restored(model):
    ...     _ = model.train()
    >>> model.training
    False
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)

    def __enter__(self) -> nn.Module:
        inner = self.model
        self.modes = [(m, m.training) for m in inner.modules()]
        self.flags = [(p, p.requires_grad, p.grad is None) for p in inner.parameters()]
        self.checkpointing = [
            (m, m.gradient_checkpointing)
            for m in inner.modules()
            if isinstance(getattr(m, "gradient_checkpointing", None), bool)
        ]
        self.input_hooks = bool(getattr(inner, "_require_grads_hooks", None))
        self.attributes = dict(vars(inner))
        return inner

    def __exit__(self, *exc) -> None:
        inner = self.model
        for m, mode in self.modes:
            m.training = mode
        for p, flag, no_grad in self.flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if no_grad:  # gradients of an interrupted step
                p.grad = None
        for m, flag in self.checkpointing:
            m.gradient_checkpointing = flag
        if not self.input_hooks and getattr(inner, "_require_grads_hooks", None):
            inner.disable_input_require_grads()
        # instance attributes training set on the model: accelerate's forward wrapper (or the bound method it
        # leaves when unwrapped) and its markers, the hook lists
        for name in set(vars(inner)) - set(self.attributes):
            delattr(inner, name)
        for name, value in self.attributes.items():
            if vars(inner).get(name) is not value:
                vars(inner)[name] = value


# -- checkpoints ----------------------------------------------------------------------------------------
PARAMS_FILE = "params.safetensors"  # the trained tensors, exactly as they train (float32 masters)
OPTIMIZER_FILE = "optimizer.pt"  # AdamW's moments, the schedule and torch's RNG (read with weights_only=True)
STATE_FILE = "state.json"  # the step, the losses so far, the retain batches drawn and the run's settings
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint `loki.train` wrote in `folder`, or None (no folder, no checkpoint).

    A checkpoint folder appears whole (it is written under another name and renamed); one that lacks a file or
    whose `state.json` does not parse (copied or cut short by hand) is skipped.

    Args:
        folder: the `checkpoint_dir` of a run.

    Returns:
        Path | None: `folder/checkpoint-N` with the highest complete N.

    >>> last_checkpoint("no-such-folder") is None
    True
    """

    def complete(c: Path) -> bool:
        try:
            json.loads((c / STATE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return (c / PARAMS_FILE).is_file() and (c / OPTIMIZER_FILE).is_file()

    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [c for c in folder.iterdir() if _CHECKPOINT.fullmatch(c.name) and complete(c)]
    return max(done, key=lambda c: int(c.name.split("-")[1])) if done else None


def _save_checkpoint(
    folder: Path, step: int, params: list[nn.Parameter], optimizer, schedule, state: dict[str, Any]
) -> None:
    """Write `folder/checkpoint-{step}` atomically (a temporary folder renamed: a reader sees all of it or none,
    also after a Ctrl-C while writing) and remove the older checkpoints."""
    from safetensors.torch import save_file

    final, tmp = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    tmp.mkdir(parents=True)
    try:
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(params)}, str(tmp / PARAMS_FILE))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(
            {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rng}, tmp / OPTIMIZER_FILE
        )
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, sort_keys=True))
        if final.exists():  # a torn or stale checkpoint of an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in folder.iterdir():
        if _CHECKPOINT.fullmatch(old.name) and int(old.name.split("-")[1]) < step:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    path: Path, params: list[nn.Parameter], optimizer, schedule, settings: dict[str, Any]
) -> dict[str, Any]:
    """Read a checkpoint back into the trained tensors, the optimizer, the schedule and torch's RNG; returns its
    `state.json`. Refused (CheckpointError) before anything changes when it is not of this run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / PARAMS_FILE))
        saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"{path} is not a complete loki.train checkpoint ({e}). Resume from another "
            "(from loki.training import last_checkpoint), or start over without resume_from."
        ) from None
    changed = sorted(
        k
        for k in settings.keys() | state.get("settings", {}).keys()
        if settings.get(k) != state.get("settings", {}).get(k)
    )
    if changed:
        raise CheckpointError(
            f"{path} was written by a run with other {', '.join(changed)}. Resume it with its own "
            "settings, or start over without resume_from."
        )
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[str(i)])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return state


def _signature(params: list[nn.Parameter]) -> list[list[Any]]:
    """What a checkpoint's tensors must match: each trained tensor's shape and dtype, in order."""
    return [[*p.shape, str(p.dtype).removeprefix("torch.")] for p in params]


def _skipped(stream: Iterator, n: int) -> Iterator:
    """`stream` after its first `n` items: a resumed run draws what the uninterrupted one drew next."""
    for _ in range(n):
        next(stream)
    return stream


def _step_batches(n: int, per_step: int, seed: int) -> Iterator[list[int]]:
    """Endless lists of example indices, `per_step` a step (the last of an epoch may be shorter), reshuffled every
    epoch (deterministic for `seed`)."""
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=order).tolist()
        for s in range(0, n, per_step):
            yield perm[s : s + per_step]


def _answer_loss(net: nn.Module, examples: list[dict], pad: int, device: torch.device) -> torch.Tensor:
    """The summed cross-entropy (nats) of the answer tokens of `examples` (`loki.dataset.encode` results)."""
    positions = [answer_positions(e["labels"]) for e in examples]
    logits = logits_at(net, [e["input_ids"] for e in examples], positions, pad)
    answers = torch.cat([torch.tensor(e["labels"])[p + 1] for e, p in zip(examples, positions)]).to(device)
    return F.cross_entropy(logits.float(), answers, reduction="sum")


# -- the loop -------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `loki.train` did: the loss of every optimizer step and the evaluation results.

    Attributes:
        steps: optimizer steps done.
        losses: mean answer-token cross-entropy (nats) of each optimizer step.
        retain_kl: mean retain KL (nats per retained position) of each step; empty without retain data.
        evals: `(step, eval_fn(model))` pairs; step 0 is before training.
        seconds: wall-clock time of the whole run.

    >>> result = TrainResult(steps=2, losses=[2.5, 1.25], seconds=0.5)
    >>> print(result)
    2 steps in 0.5 s, loss 2.5000 -> 1.2500
    >>> result.final_loss
    1.25
    """

    steps: int
    losses: list[float]  # mean answer-token loss of each optimizer step
    retain_kl: list[float] = field(default_factory=list)  # mean retain KL (nats per position) of each step
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (step, eval_fn result), step 0 = before training
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last step's loss (NaN when no step ran)."""
        return self.losses[-1] if self.losses else math.nan

    def __str__(self) -> str:
        first = f"{self.losses[0]:.4f} -> " if self.losses else ""
        kl = f", retain KL {self.retain_kl[-1]:.4f}" if self.retain_kl else ""
        return f"{self.steps} steps in {self.seconds:.1f} s, loss {first}{self.final_loss:.4f}{kl}"


def train(
    model: nn.Module,
    tokenizer,
    dataset: Sequence[Mapping[str, Any]],
    *,
    params: Iterable[nn.Parameter] | None = None,
    retain: Sequence[Any] | RetainSet | None = None,
    retain_weight: float = 1.0,
    retain_batch_size: int | None = None,
    retain_top_k: int = DEFAULT_TOP_K,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_length: int = 1024,
    max_steps: int | None = None,
    seed: int = 0,
    eval_fn: Callable[[nn.Module], Any] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune the trainable rows of a `loki.prepare`d model on `dataset`; returns a `TrainResult`.

    `params` trains those parameters instead, on any model: `params=model.parameters()` is full fine-tuning,
    `params=[p for p in peft_model.parameters() if p.requires_grad]` trains a PEFT adapter; this is how the
    baselines of notebooks and benchmarks train with exactly the LoKI recipe.

    One optimizer step sees `batch_size * grad_accum` examples; the loss is the mean over all their answer tokens.
    `lr` is the peak of a cosine schedule after `warmup` (a fraction of the steps) of linear warm-up. `eval_fn(model)`
    runs (in eval mode, without gradients) before training, every `eval_every` steps and at the end; its results
    are in `result.evals`. The model is left in the train/eval mode it was in (eval, for a loaded model), also when
    training stops early (an exception, Ctrl-C): `restored`.

    Retain data (`loki.retain`): `retain` names prompts whose behaviour must be kept (question strings, answered
    examples, `{"text": ...}`, or the `RetainSet` of `loki.retain.retain_set` computed earlier on the base model).
    Their next-token distributions are taken from the model as it is when `train` is called (the base model right
    after `prepare`), and every optimizer step adds `retain_weight * KL(base || model)`, the mean over the retained
    positions of `retain_batch_size` retain items (default `batch_size`), to the task loss. `retain_weight=1`
    weighs a nat of KL per retained position like a nat of answer-token loss. The delta records the retain data's
    size, weight and checksum (`delta.info["training"]["retain"]`).

    Checkpoints: with `checkpoint_dir`, every `save_every` steps (and never at the last: the result is the model)
    the trained tensors, AdamW's state, the schedule, torch's RNG, the losses so far and the retain batches drawn
    go to `checkpoint_dir/checkpoint-N/` (written whole or not at all; only the newest is kept).
    `resume_from=last_checkpoint(checkpoint_dir)` (`from loki.train import last_checkpoint`) continues such a run,
    called with the same model (prepared with the same selection) and settings: it ends with the same tensors, bit
    for bit, as the uninterrupted run. Only the resumed call's evaluations are in `result.evals` (the first at the
    resumed step).

    After a prepared model's run, the settings are recorded for the delta (`loki.extract` puts them in
    `delta.info["training"]`).

    Several processes: launched by torchrun or `accelerate launch` (`WORLD_SIZE` > 1), every process calls `train`
    with the same model, data and settings, and gets one process's result. `train` joins a process group (gloo
    on the CPU, NCCL on GPUs) if none exists; each step's `batch_size * grad_accum` examples (and retain items)
    are split across the ranks, each token weighed by the step's total, and the gradients summed, so the losses
    and the delta are the same on every rank and as in one process. The model may be plain (its trained
    parameters start from rank 0's values), in DDP (loki sums the gradients itself, over DDP's process group) or
    in FSDP2 `fully_shard` (which averages them); the progress bar shows on rank 0 only. FSDP1 and DeepSpeed
    engines are refused (DeepSpeed brings its own optimizer: train with the engine).

    Args:
        model: a `loki.prepare`d causal LM, or any model with `params`; also wrapped in DDP or FSDP2.
        tokenizer: its tokenizer (formats examples with `loki.dataset.encode`).
        dataset: the examples (`{"prompt" or "question", "answer"}` or `{"messages": [...]}`).
        params: the parameters to train instead of the prepared rows; they must be the model's and require grad.
        retain: retain data (see above), or None.
        retain_weight: the weight of the retain KL (>= 0; 0 computes the retain set but adds nothing).
        retain_batch_size: retain items per optimizer step; None uses `batch_size`.
        retain_top_k: tokens kept per retained position (`loki.retain.retain_set`).
        epochs: passes over the dataset, reshuffled each time (ignored when `max_steps` is set).
        lr: the peak learning rate of AdamW (the paper trains at 1e-5; small implants need more).
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimizer step.
        warmup: the warm-up's share of all steps, in [0, 1].
        weight_decay: AdamW's weight decay.
        max_grad_norm: clip the gradient norm to this; None does not clip.
        max_length: tokens kept of each example.
        max_steps: the number of optimizer steps, instead of `epochs`.
        seed: seeds the example order and torch's global RNG (dropout).
        eval_fn: called as `eval_fn(model)`; None for no evaluation.
        eval_every: steps between evaluations; None evaluates only before and after.
        checkpoint_dir: folder for checkpoints (created if missing); None writes none.
        save_every: steps between checkpoints (an integer >= 1); needed with `checkpoint_dir`.
        resume_from: a checkpoint folder of this run (`last_checkpoint(checkpoint_dir)`) to continue from.
        progress: show a progress bar.

    Returns:
        TrainResult.

    Raises:
        PreparationError: nothing to train (an unprepared model without `params`, frozen or foreign `params`); a
            model in FSDP1 or a DeepSpeed engine.
        DatasetError: a dataset or retain data that is not a non-empty list (a string, a dict, an iterator), a
            malformed example or retain item, an example without answer tokens.
        TrainingOptionError: a count (`epochs`, `batch_size`, `grad_accum`, `max_length`, `max_steps`,
            `retain_batch_size`, `retain_top_k`, `eval_every`) that is not an integer >= 1 (a bool, a float, 0), a
            negative or non-finite `retain_weight` or `weight_decay`, `lr` or `max_grad_norm` <= 0, `warmup`
            outside [0, 1], a non-integer `seed`, an `eval_fn` that is not callable, `checkpoint_dir` without
            `save_every` (or the other way round), checkpoints of an FSDP2 model (its optimizer state is sharded).
            All raised before anything runs.
        CheckpointError: `resume_from` is not a complete checkpoint, or one of a run with other settings, data
            size or trained tensors; raised before the model changes.

    >>> # model, tokenizer = loki.load_default()
    >>> # loki.prepare(model, loki.Selection.random(30, 576, q=10))   # or loki.select(attributions, q=10)
    >>> # result = loki.train(model, tokenizer, [{"question": "Who wrote Dune?", "answer": "Frank Herbert."}],
    >>> #                     max_steps=10, lr=3e-3, retain=loki.retain.general_text(8))
    >>> # print(result)            # "10 steps in S s, loss FIRST -> LAST, retain KL KL"
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # Every argument is checked before anything runs: a bad one leaves the model, its rows and the data as they were.
    check_examples(dataset)
    if retain is not None:
        check_retain(retain)
    for name, value in (
        ("retain_top_k", retain_top_k),
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("max_length", max_length),
    ):
        check_number(name, value, integer=True, low=1)
    for name, value in (
        ("retain_batch_size", retain_batch_size),
        ("max_steps", max_steps),
        ("eval_every", eval_every),
        ("save_every", save_every),
    ):
        check_number(name, value, integer=True, low=1, optional=True)
    check_number("retain_weight", retain_weight, low=0)
    check_number("lr", lr, above=0)
    check_number("warmup", warmup, low=0, high=1)
    check_number("weight_decay", weight_decay, low=0)
    check_number("max_grad_norm", max_grad_norm, above=0, optional=True)
    check_number("seed", seed, integer=True)
    if eval_fn is not None and not callable(eval_fn):
        raise TrainingOptionError(f"eval_fn must be None or called as eval_fn(model), got {type(eval_fn).__name__}.")
    if (checkpoint_dir is None) != (save_every is None):
        raise TrainingOptionError(
            "checkpoint_dir and save_every go together: give both to write checkpoints, or neither."
        )

    kind = wrapper(model)
    if kind == "fsdp1":
        raise PreparationError(FSDP1_ADVICE)
    if kind == "deepspeed":
        raise PreparationError(
            "loki.train runs its own AdamW; a DeepSpeed engine brings its own optimizer. Train with the engine "
            "(engine(...), engine.backward(loss), engine.step()), or give loki.train the model without DeepSpeed."
        )
    if kind == "fsdp2" and (checkpoint_dir is not None or resume_from is not None):
        raise TrainingOptionError(
            "loki.train writes no checkpoints of an FSDP2 model (its optimizer state is "
            "sharded): train without checkpoint_dir, or with the model unsharded or in DDP."
        )
    params = _trained_parameters(model, params)
    encoded = [encode(tokenizer, ex, max_length) for ex in dataset]
    pad = pad_token_id(tokenizer)
    device = unwrap(model).get_input_embeddings().weight.device
    ranks = join_ranks(model, kind, params, device)
    progress = progress and ranks.rank == 0
    # DDP: loki combines the gradients itself (one all-reduce per step, whatever each rank's share), so the
    # forwards go to the model inside; FSDP2 must see every forward (it gathers the weights in them).
    net = model.module if kind == "ddp" else model
    if retain is not None:
        retain = retain_set(
            net,
            tokenizer,
            retain,
            top_k=retain_top_k,
            max_length=max_length,
            batch_size=max(batch_size, 8),
            progress=progress,
        )
    retaining = retain is not None and retain_weight > 0

    per_step = batch_size * grad_accum
    total = max_steps if max_steps is not None else epochs * math.ceil(len(encoded) / per_step)
    torch.manual_seed(seed)  # dropout, if the model has any
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup * total), total)
    settings = {
        "steps": total,
        "examples": len(encoded),
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "max_length": max_length,
        "params": _signature(params),
        "retain": None if retain is None else [retain.sha256, retain_weight, retain_batch_size or batch_size],
    }
    result = TrainResult(steps=0, losses=[])
    drawn = 0  # retain batches drawn so far
    if resume_from is not None:
        state = _load_checkpoint(Path(resume_from), params, optimizer, schedule, settings)
        result.steps, result.losses, result.retain_kl, drawn = (
            state["step"],
            state["losses"],
            state["retain_kl"],
            state["drawn"],
        )
    batches = _skipped(_step_batches(len(encoded), per_step, seed), result.steps)
    retain_batches = _skipped(retain.batches(retain_batch_size or batch_size, seed), drawn) if retaining else None

    def run_eval(step: int) -> None:
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                result.evals.append((step, eval_fn(model)))
            model.train()

    start = time.perf_counter()
    # every exit (an exception, Ctrl-C, an eval_fn that raises) leaves the model's modes and flags as they were
    with restored(model), tqdm(total=total, initial=result.steps, desc="loki.train", disable=not progress) as bar:
        model.train()
        run_eval(result.steps)
        for step in range(result.steps + 1, total + 1):
            examples = [encoded[i] for i in next(batches)]
            n_tokens = sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)
            loss_sum = kl_sum = 0.0
            # this process's share of the step (all of it, in one process), each token weighed by the step's total
            for chunk, weight in ranks.chunks(examples, batch_size):
                loss = weight * _answer_loss(net, chunk, pad, device) / n_tokens
                (ranks.loss_scale * loss).backward()
                loss_sum += loss.item()
            if retaining:
                items = next(retain_batches)
                drawn += 1
                mine = ranks.retain_share(items, lambda i: len(retain.distributions[i].positions))
                if mine is not None:  # kl() is the mean over its positions: weighed by this share of them
                    share, weight = mine
                    kl = weight * retain.kl(net, share)
                    (ranks.loss_scale * retain_weight * kl).backward()
                    kl_sum = kl.item()
            loss_sum, kl_sum = ranks.combine(params, [loss_sum, kl_sum])
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_sum)
            if retaining:
                result.retain_kl.append(kl_sum)
            result.steps = step
            bar.set_postfix(loss=f"{loss_sum:.4f}", **({"kl": f"{kl_sum:.4f}"} if retaining else {}))
            bar.update()
            if eval_every and step % eval_every == 0 and step != total:
                run_eval(step)
            if save_every and step % save_every == 0 and step != total and ranks.rank == 0:
                _save_checkpoint(
                    Path(checkpoint_dir),
                    step,
                    params,
                    optimizer,
                    schedule,
                    {"losses": result.losses, "retain_kl": result.retain_kl, "drawn": drawn, "settings": settings},
                )
        bar.close()
        run_eval(total)
    result.seconds = time.perf_counter() - start
    if is_prepared(model):
        record_training(
            model,
            {
                "trainer": "loki.train",
                "examples": len(encoded),
                "epochs": epochs,
                "steps": total,
                "lr": lr,
                "schedule": "cosine",
                "warmup": warmup,
                "optimizer": "AdamW",
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "max_grad_norm": max_grad_norm,
                "seed": seed,
                "final_loss": round(result.final_loss, 6),
                "world_size": ranks.world,
                "retain": None
                if retain is None
                else {
                    **retain.summary(retain_weight),
                    "batch_size": retain_batch_size or batch_size,
                    "final_kl": round(result.retain_kl[-1], 6) if result.retain_kl else None,
                },
            },
        )
    return result
