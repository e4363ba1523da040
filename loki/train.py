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

from .errors import DatasetError, PreparationError
from .implant import is_prepared, record_training

__all__ = ["TrainResult", "collate", "encode", "train"]

IGNORE = -100  # label of tokens without loss (the convention of torch's cross_entropy and HF)


# -- formatting -----------------------------------------------------------------------------------------
def _messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    if "messages" in example:
        messages = list(example["messages"])
        if not any(m.get("role") == "assistant" for m in messages):
            raise DatasetError("A 'messages' example needs at least one assistant turn to learn from.")
        return messages
    prompt = example.get("prompt", example.get("question"))
    if prompt is None or "answer" not in example:
        raise DatasetError(
            f"An example is {{'prompt' (or 'question'): ..., 'answer': ...}} or {{'messages': [...]}}; got keys "
            f"{sorted(example)}."
        )
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(example["answer"])}]


def _segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation's text cut into (text, is_answer) pieces."""
    if not getattr(tokenizer, "chat_template", None):
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            answer = m["role"] == "assistant"
            pieces.append((m["content"] + (tokenizer.eos_token or "") if answer else m["content"] + "\n", answer))
        return pieces

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = render(messages[:i], True), render(messages[: i + 1], False)
        start, end = len(prompt), len(turn)
        if not (full.startswith(turn) and turn.startswith(prompt) and done <= start):
            raise DatasetError(
                "The chat template renders earlier turns differently once later turns follow (e.g. it strips "
                "reasoning), so answer tokens cannot be located. Give single-turn {'prompt', 'answer'} examples."
            )
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    return pieces + [(full[done:], False)]


def encode(tokenizer, example: Mapping[str, Any], max_length: int | None = None) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one example; labels are `-100` except on answer tokens.

    Each piece (prompt, answer) is tokenized on its own, so the prompt's tokens are exactly what the model sees
    at generation time.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, answer in _segments(tokenizer, _messages(example)):
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if answer else [IGNORE] * len(piece)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
        raise DatasetError(
            f"An example has no answer tokens within max_length={max_length} ({len(ids)} tokens kept). "
            "Raise max_length or shorten the prompt."
        )
    return {"input_ids": ids, "labels": labels}


def collate(batch: Sequence[Mapping[str, list[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into `input_ids`, `attention_mask` and `labels` tensors (a data collator)."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
    """What `loki.train` did: the loss of every optimizer step and the evaluation results."""

    steps: int
    losses: list[float]  # mean answer-token loss of each optimizer step
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (step, eval_fn result), step 0 = before training
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def __str__(self) -> str:
        first = f"{self.losses[0]:.4f} -> " if self.losses else ""
        return f"{self.steps} steps in {self.seconds:.1f} s, loss {first}{self.final_loss:.4f}"


def train(
    model: nn.Module,
    tokenizer,
    dataset: Sequence[Mapping[str, Any]],
    *,
    params: Iterable[nn.Parameter] | None = None,
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
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = _trained_parameters(model, params)
    if not dataset:
        raise DatasetError("The dataset is empty.")
    encoded = [encode(tokenizer, ex, max_length) for ex in dataset]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
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
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        result.steps = step
        bar.set_postfix(loss=f"{loss_sum:.4f}")
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
        })
    return result
