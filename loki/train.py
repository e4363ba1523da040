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

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import IGNORE, collate, encode, pad_token_id
from .errors import DatasetError, PreparationError
from .implant import is_prepared, record_training
from .retain import DEFAULT_TOP_K, RetainTargets, retain_targets

__all__ = ["TrainResult", "train"]


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
    retain: Sequence[Any] | RetainTargets | None = None,
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
    progress: bool = True,
) -> TrainResult:
    """Fine-tune the trainable rows of a `loki.prepare`d model on `dataset`; returns a `TrainResult`.

    `params` trains those parameters instead, on any model: `params=model.parameters()` is full fine-tuning,
    `params=[p for p in peft_model.parameters() if p.requires_grad]` trains a PEFT adapter; this is how the
    baselines of notebooks and benchmarks train with exactly the LoKI recipe.

    One optimizer step sees `batch_size * grad_accum` examples; the loss is the mean over all their answer tokens.
    `lr` is the peak of a cosine schedule after `warmup` (a fraction of the steps) of linear warm-up. `eval_fn(model)`
    runs (in eval mode, without gradients) before training, every `eval_every` steps and at the end; its results
    are in `result.evals`. The model is left in eval mode.

    Retain data (`loki.retain`): `retain` names prompts whose behaviour must be kept (question strings, answered
    examples, `{"text": ...}`, or the `RetainTargets` of `loki.retain_targets` computed earlier on the base model).
    Their next-token distributions are taken from the model as it is when `train` is called (the base model right
    after `prepare`), and every optimizer step adds `retain_weight * KL(base || model)`, the mean over the retained
    positions of `retain_batch_size` retain items (default `batch_size`), to the task loss. `retain_weight=1`
    weighs a nat of KL per retained position like a nat of answer-token loss. The delta records the retain data's
    size, weight and checksum (`delta.info["training"]["retain"]`).

    After a prepared model's run, the settings are recorded for the delta (`loki.extract` puts them in
    `delta.info["training"]`).

    Args:
        model: a `loki.prepare`d causal LM, or any model with `params`.
        tokenizer: its tokenizer (formats examples with `loki.dataset.encode`).
        dataset: the examples (`{"prompt" or "question", "answer"}` or `{"messages": [...]}`).
        params: the parameters to train instead of the prepared rows; they must be the model's and require grad.
        retain: retain data (see above), or None.
        retain_weight: the weight of the retain KL (>= 0; 0 computes the targets but adds nothing).
        retain_batch_size: retain items per optimizer step; None uses `batch_size`.
        retain_top_k: tokens kept per retained position (`loki.retain_targets`).
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
        progress: show a progress bar.

    Returns:
        TrainResult.

    Raises:
        PreparationError: nothing to train (an unprepared model without `params`, frozen or foreign `params`).
        DatasetError: an empty dataset, a negative retain weight, a malformed example or retain item, an example
            without answer tokens.

    >>> # model, tokenizer = loki.load_default()
    >>> # loki.prepare(model, loki.Selection.random(30, 576, q=10))   # or loki.select(attributions, q=10)
    >>> # result = loki.train(model, tokenizer, [{"question": "Who wrote Dune?", "answer": "Frank Herbert."}],
    >>> #                     max_steps=10, lr=3e-3, retain=loki.retain.general_text(8))
    >>> # print(result)                                                   # on 2 CPU threads
    >>> # 10 steps in 56.9 s, loss 4.8904 -> 0.0011, retain KL 0.0125
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = _trained_parameters(model, params)
    if not dataset:
        raise DatasetError("The dataset is empty.")
    if not (isinstance(retain_weight, (int, float)) and retain_weight >= 0):
        raise DatasetError(f"retain_weight must be a number >= 0, got {retain_weight!r}.")
    encoded = [encode(tokenizer, ex, max_length) for ex in dataset]
    if retain is not None:
        retain = retain_targets(model, tokenizer, retain, top_k=retain_top_k, max_length=max_length,
                                batch_size=max(batch_size, 8), progress=progress)
        retain_batches = retain.batches(retain_batch_size or batch_size, seed)
    pad = pad_token_id(tokenizer)
    device = model.get_input_embeddings().weight.device

    per_step = batch_size * grad_accum
    steps_per_epoch = math.ceil(len(encoded) / per_step)
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    torch.manual_seed(seed)  # dropout, if the model has any
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup * total), total)

    def run_eval(step: int) -> None:
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                result.evals.append((step, eval_fn(model)))
            model.train()

    def step_batches():  # the examples of each optimizer step, reshuffled every epoch
        while True:
            perm = torch.randperm(len(encoded), generator=order).tolist()
            for s in range(0, len(perm), per_step):
                yield [encoded[i] for i in perm[s : s + per_step]]

    result = TrainResult(steps=0, losses=[])
    start = time.perf_counter()
    model.train()
    run_eval(0)
    bar = tqdm(total=total, desc="loki.train", disable=not progress)
    batches = step_batches()
    for step in range(1, total + 1):
        examples = next(batches)
        n_tokens = sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)
        loss_sum = 0.0
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size], pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                reduction="sum",
            ) / n_tokens
            loss.backward()
            loss_sum += loss.item()
        if retain is not None and retain_weight > 0:
            kl = retain.kl(model, next(retain_batches))
            (retain_weight * kl).backward()
            result.retain_kl.append(kl.item())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        result.steps = step
        bar.set_postfix(loss=f"{loss_sum:.4f}", **({"kl": f"{result.retain_kl[-1]:.4f}"} if result.retain_kl else {}))
        bar.update()
        if eval_every and step % eval_every == 0 and step != total:
            run_eval(step)
    bar.close()
    run_eval(total)
    model.eval()
    result.seconds = time.perf_counter() - start
    if is_prepared(model):
        record_training(model, {
            "trainer": "loki.train", "examples": len(encoded), "epochs": epochs, "steps": total, "lr": lr,
            "schedule": "cosine", "warmup": warmup, "optimizer": "AdamW", "weight_decay": weight_decay,
            "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "final_loss": round(result.final_loss, 6),
            "retain": None if retain is None else {
                **retain.summary(retain_weight), "batch_size": retain_batch_size or batch_size,
                "final_kl": round(result.retain_kl[-1], 6) if result.retain_kl else None},
        })
    return result
