"""Retain data: keep the base model's output distribution on prompts whose behaviour must not change.

Training on new facts also moves the model's answers to questions it should keep answering as before (the
neighbourhood of the implant, general text). Retain data names those prompts; before training, the base model's
next-token distributions on them are computed once (no second copy of the model is kept), and training adds

    retain_weight * mean over retained positions of KL(p_base || p_model)

to the task loss. Each distribution is stored as its `top_k` most likely tokens plus one bucket for the rest of
the probability mass, and the KL is taken between these coarsened distributions (k + 1 outcomes; the exact KL
when `top_k` is the vocabulary size). This is the knowledge-editing field's locality constraint (e.g. the
"essence"/neighbourhood KL terms of ROME and MEMIT), applied to LoKI's row training.

A retain item is one of:
- a string: a question, answered greedily by the model itself (chat template); its answer tokens are retained;
- `{"prompt" or "question": ..., "answer": ...}` or `{"messages": [...]}`: the answer tokens (as `loki.train`);
- `{"text": ...}`: plain text; every token is retained.

>>> import loki, loki.testing
>>> from loki.retain import retain_set
>>> model = loki.testing.tiny_model("llama")
>>> retained = retain_set(model, None, [{"text": [5, 6, 7, 8]}], top_k=4, progress=False)
>>> retained.positions, abs(round(retained.kl(model, [0]).item(), 6))
(3, 0.0)
"""

from __future__ import annotations

import hashlib
import json
import numbers
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import (
    IGNORE,
    answer_positions,
    check_collection,
    check_example,
    check_number,
    encode,
    pad_token_id,
    read_json_lines,
)
from .errors import DatasetError
from .forward import logits_at
from .generation import GENERATE_BATCH, generate

__all__ = ["RetainLoss", "RetainSet", "check_retain", "general_text", "retain_set", "token_digest"]

DEFAULT_TOP_K = 64
GENERAL_TEXT = Path(__file__).parent / "data" / "retain" / "wiki_text.jsonl"


def general_text(n: int | None = None, chars: int | None = 300) -> list[dict[str, str]]:
    """`{"text": ...}` retain items of general prose: the first `n` of 200 English Wikipedia summaries shipped in
    `loki/data/retain/` (CC BY-SA 4.0; none of them is in the `wiki_perplexity` evaluation set), each cut to its
    first `chars` characters (about 64 tokens at 300) to keep retain steps cheap.

    Args:
        n: how many (in the file's fixed order); None for all 200.
        chars: characters kept of each; None keeps whole summaries.

    Returns:
        list: `[{"text": str}, ...]`, ready for `loki.train(retain=...)` or `retain_set`.

    >>> general_text(1, chars=30)
    [{'text': "Candide, ou l'Optimisme is a F"}]
    """
    rows = [r for _, r in read_json_lines(GENERAL_TEXT)[1:]]  # the first line describes the set
    return [{"text": r["text"][:chars]} for r in rows[:n]]


@dataclass
class _Distributions:
    ids: list[int]
    positions: torch.Tensor  # [P] positions whose next-token distribution is kept
    top_ids: torch.Tensor  # [P, k] int64, the base model's most likely next tokens
    top_logp: torch.Tensor  # [P, k] float32, their log-probabilities
    rest_logp: torch.Tensor  # [P] float32, log of the remaining probability mass


@dataclass
class RetainSet:
    """A retain set: the retain items and the base model's next-token distributions on them, computed once by
    `retain_set`.

    `kl(model, indices)` is the mean KL(base || model) over the retained positions of those items (a scalar tensor
    that backpropagates into `model`). `summary()` is what a delta records about the retain data.

    Attributes:
        distributions: one entry per item: its token ids, retained positions, and the base model's `top_k` token ids
            and log-probabilities (plus the rest mass) at each position.
        top_k: tokens kept per position.
        pad_token_id: the id `kl` pads batches with.
        items: the retain items as used (questions with the base model's answers filled in).
        sha256: checksum of the retained token ids.

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> retained = retain_set(model, None, [{"text": [5, 6, 7, 8]}, {"text": [9, 10, 11]}], top_k=4,
    ...                          progress=False)
    >>> len(retained), retained.positions
    (2, 5)
    """

    distributions: list[_Distributions]
    top_k: int
    pad_token_id: int
    items: list[dict[str, Any]]  # the retain items as used (questions with the base model's answers filled in)
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.distributions)

    def __add__(self, other: RetainSet) -> RetainSet:
        """Both retain sets in one, each item keeping the distributions of the model it was computed on.

        The case it is for: a new implant trained onto a model that already holds earlier ones, retaining the
        base model's answers to the neighbourhood (computed once) and the current model's answers to the earlier
        implants' questions, so that neither drifts.

        Raises:
            DatasetError: `other` is not a RetainSet, or its `top_k` or pad token differs.

        >>> import loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> a = retain_set(model, None, [{"text": [5, 6, 7, 8]}], top_k=4, progress=False)
        >>> b = retain_set(model, None, [{"text": [9, 10, 11]}], top_k=4, progress=False)
        >>> len(a + b), (a + b).positions
        (2, 5)
        """
        if not isinstance(other, RetainSet):
            raise DatasetError(f"A RetainSet adds only another RetainSet, not {type(other).__name__}.")
        if (other.top_k, other.pad_token_id) != (self.top_k, self.pad_token_id):
            raise DatasetError(
                f"These retain sets keep top_k={self.top_k} and top_k={other.top_k} tokens with pad ids "
                f"{self.pad_token_id} and {other.pad_token_id}; compute both with the same tokenizer and top_k."
            )
        distributions = self.distributions + other.distributions
        return RetainSet(
            distributions,
            self.top_k,
            self.pad_token_id,
            self.items + other.items,
            token_digest([d.ids for d in distributions]),
        )

    @property
    def positions(self) -> int:
        """Number of retained token positions over all items (a text of `n` tokens has `n - 1`)."""
        return sum(len(t.positions) for t in self.distributions)

    def kl(self, model: nn.Module, indices: Sequence[int]) -> torch.Tensor:
        """Mean KL(p_base || p_model) in nats over the retained positions of items `indices` (one forward pass).

        Both distributions are coarsened to the base model's `top_k` tokens plus one bucket for the rest (module
        docstring); every retained position counts once.

        Args:
            model: the model being trained (the same architecture and tokenizer as the base).
            indices: which items (positions in `distributions`) to batch together, e.g. from `batches`.

        Returns:
            Tensor: a float32 scalar on the model's device, with a gradient into `model`.

        >>> import loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> retained = retain_set(model, None, [{"text": [5, 6, 7, 8]}], top_k=4, progress=False)
        >>> retained.kl(model, [0]).item() < 1e-6                       # the base model itself
        True
        >>> with torch.no_grad():
        ...     _ = model.lm_head.weight.normal_()                         # a very different output layer
        >>> retained.kl(model, [0]).item() > 0.1
        True
        """
        chosen = [self.distributions[i] for i in indices]
        device = model.get_input_embeddings().weight.device
        logits = logits_at(model, [t.ids for t in chosen], [t.positions for t in chosen], self.pad_token_id)
        logq = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
        top_ids = torch.cat([t.top_ids for t in chosen]).to(device)
        top_logp = torch.cat([t.top_logp for t in chosen]).to(device)
        rest_logp = torch.cat([t.rest_logp for t in chosen]).to(device)
        logq_top = logq.gather(-1, top_ids)
        logq_rest = _log1mexp(torch.logsumexp(logq_top, dim=-1))
        kl = (top_logp.exp() * (top_logp - logq_top)).sum(-1) + rest_logp.exp() * (rest_logp - logq_rest)
        # Every retained position counts once (so long texts weigh more than short answers; measured: averaging
        # per item instead lost general-text protection: the docs' "Forgetting" benchmark page).
        return kl.mean()

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[list[int]]:
        """Endless batches of item indices: every item once per reshuffled round (deterministic for `seed`).

        Args:
            batch_size: items per batch; a batch may span two rounds.
            seed: seeds the shuffling (`random.Random`).

        Returns:
            An infinite iterator of `list[int]`.

        Raises:
            TrainingOptionError: `batch_size` is not an integer >= 1 (0 would yield empty batches forever).

        >>> import loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> retained = retain_set(model, None, [{"text": [5, 6, 7]}, {"text": [9, 10, 11]}], progress=False)
        >>> batches = retained.batches(2, seed=0)
        >>> next(batches), next(batches)
        ([1, 0], [1, 0])
        """
        check_number("batch_size", batch_size, integer=True, low=1)
        return self._batches(batch_size, seed)

    def _batches(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        rng, order = random.Random(seed), []
        while True:
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = list(range(len(self.distributions)))
                    rng.shuffle(order)
                batch.append(order.pop())
            yield batch

    def prompts(self, per_item: int = 3, *, text: bool = False) -> list[list[int]]:
        """KVA prompts from the retained answers: for each answered item, its token ids up to `per_item` evenly
        spaced retained positions (a third, two thirds and the last but one answer token for 3), so
        `loki.attribute(model, tokenizer, retained.prompts())` scores every row by its contribution to the base
        model's own answers to the neighbourhood questions, and `loki.select` on those scores picks the rows these
        answers rely on least (on the demo's data they kept more of the neighbourhood than rows chosen on the probe
        set: the docs' "Forgetting" benchmark page).

        This is a knowledge-editing adaptation of the LoKI paper's KVA (§3.1), which attributes on general
        multiple-choice prompts: here the prompts are the behaviour the implant must not move.

        Args:
            per_item: prompts per item (fewer when its answer is shorter).
            text: also cut `{"text": ...}` items (off: general prose is what the probe set already stands for).

        Returns:
            list[list[int]]: token id lists, item by item; each ends where the base model's greedy next token is
            a retained token.

        Raises:
            DatasetError: `per_item` is not a positive integer, or no item gives a prompt.

        >>> import loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> retained = retain_set(model, None, [{"text": [5, 6, 7, 8, 9]}], progress=False)
        >>> retained.prompts(text=True)
        [[5, 6], [5, 6, 7], [5, 6, 7, 8]]
        >>> # retained = loki.retain.retain_set(model, tokenizer, ["What is the capital of Peru?"])
        >>> # selection = loki.select(loki.attribute(model, tokenizer, retained.prompts()), q=10)
        """
        check_number("per_item", per_item, integer=True, low=1)
        out = []
        for it, t in zip(self.items, self.distributions):
            if it["kind"] == "text" and not text:
                continue
            n = len(t.positions)
            for c in sorted({max(1, min(n - 1, i * n // per_item)) for i in range(1, per_item + 1)} if n > 1 else {0}):
                out.append(t.ids[: int(t.positions[c]) + 1])
        if not out:
            raise DatasetError("No retain item gives a prompt: pass question or answer items (or text=True).")
        return out

    def summary(self, weight: float) -> dict[str, Any]:
        """What a delta's training metadata records about the retain data (`training.retain`, formats/SPEC.md §4).

        Args:
            weight: the retain weight used in training.

        Returns:
            dict: `items`, `positions`, `weight`, `top_k`, `kinds` (item kind -> count), `sha256`, and up to 3
            `examples` as shown to people.

        >>> import loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> summary = retain_set(model, None, [{"text": [5, 6, 7, 8]}], progress=False).summary(1.0)
        >>> summary["items"], summary["positions"], summary["kinds"], summary["examples"]
        (1, 3, {'text': 1}, ['4 tokens'])
        """
        kinds: dict[str, int] = {}
        for it in self.items:
            kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
        return {
            "items": len(self),
            "positions": self.positions,
            "weight": weight,
            "top_k": self.top_k,
            "kinds": kinds,
            "sha256": self.sha256,
            "examples": [it["shown"] for it in self.items[:3]],
        }


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it; x is capped just below 0 so the rest bucket
    of a model that puts (numerically) all its mass on the top-k tokens stays finite."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_retain(retain: Any) -> list[dict[str, Any]] | RetainSet:
    """Check retain data up front (`retain_set`, `loki.train(retain=...)`), before any model runs.

    Args:
        retain: a `RetainSet` (returned as it is), or a non-empty list of retain items (module docstring).

    Returns:
        the `RetainSet`, or one `{"kind", ...}` record per item, in order.

    Raises:
        DatasetError: a string, mapping or iterator instead of a list (a string would be read as one question per
            character), an empty list, an item of another shape, an empty question or text, a malformed example.

    >>> check_retain([{"text": [5, 6, 7]}, "What is the capital of France?"])[1]
    {'kind': 'question', 'question': 'What is the capital of France?'}
    """
    if isinstance(retain, RetainSet):
        return retain
    check_collection("retain", retain, "retain items (question strings, answered examples or {'text': ...})")
    return [_as_item(it, i) for i, it in enumerate(retain)]


def _as_item(item: Any, index: int) -> dict[str, Any]:
    try:
        if isinstance(item, Mapping) and "text" in item:
            text = item["text"].tolist() if isinstance(item["text"], torch.Tensor) else item["text"]
            ids = (
                isinstance(text, Sequence)
                and not isinstance(text, str)
                and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in text)
            )
            if not (ids or isinstance(text, str)) or not (text.strip() if isinstance(text, str) else text):
                raise DatasetError(f"'text' must be a non-empty string or list of token ids, got {text!r:.60}.")
            return {"kind": "text", "text": text}
        # an empty answer (a blank CSV cell) leaves a question for the model to answer, as in load_retain
        if isinstance(item, Mapping) and ("messages" in item or item.get("answer") not in (None, "")):
            return {"kind": "answer", "example": check_example(item)}
        question = item.get("prompt", item.get("question")) if isinstance(item, Mapping) else item
        if isinstance(question, str) and question.strip():
            return {"kind": "question", "question": question}
    except DatasetError as e:
        raise DatasetError(f"Retain item {index}: {e}") from None
    raise DatasetError(
        f"Retain item {index} is {item!r:.60}; give a non-empty question string, {{'prompt' (or 'question'), "
        "'answer'}, {'messages': [...]} or {'text': ...}."
    )


@torch.no_grad()
def retain_set(
    model: nn.Module,
    tokenizer,
    retain: Sequence[Any],
    *,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = 32,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> RetainSet:
    """The model's own next-token distributions on `retain`, to be kept while training (`loki.train(retain=...)`).

    Call it on the base model (before training; `loki.train` does when given a list). Questions are first answered
    greedily by the model (chat template, first line, at most `max_new_tokens`). `top_k` tokens are kept per
    position (float32 log-probabilities, about `12 * top_k` bytes per position, on the CPU).

    Args:
        model: a causal LM (a `loki.prepare`d one too); its current weights define "the base". Its train/eval mode
            is restored afterwards.
        tokenizer: its tokenizer (may be None when every item is `{"text": [token ids]}`).
        retain: question strings, answered examples or `{"text": ...}` items (see the module docstring); a
            `RetainSet` is returned as it is.
        top_k: tokens kept per position (the rest of the mass is one bucket).
        max_new_tokens: the longest greedy answer generated for a question item.
        max_length: tokens kept of each item (its start).
        batch_size: items per forward pass (questions are answered `max(batch_size, 32)` at a time).
        progress: show a progress bar while answering questions.

    Returns:
        RetainSet: one entry per item, in order.

    Raises:
        DatasetError: retain data that is not a non-empty list (`check_retain`), an item of another shape, an empty
            answer of the model to a question, a text of fewer than 2 tokens, or an example without answer tokens.
        TrainingOptionError: `top_k`, `max_new_tokens`, `max_length` or `batch_size` not an integer >= 1.

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> retained = retain_set(model, None, [{"text": [5, 6, 7, 8]}], top_k=4, progress=False)
    >>> retained.positions, retained.distributions[0].top_ids.shape
    (3, torch.Size([3, 4]))
    >>> # model, tokenizer = loki.load_default()
    >>> # retained = retain_set(model, tokenizer, ["What is the capital of Peru?", *general_text(32)])
    """
    for name, value in (
        ("top_k", top_k),
        ("max_new_tokens", max_new_tokens),
        ("max_length", max_length),
        ("batch_size", batch_size),
    ):
        check_number(name, value, integer=True, low=1)
    items = check_retain(retain)
    if isinstance(items, RetainSet):
        return items
    questions = [it for it in items if it["kind"] == "question"]
    if questions:
        answers = generate(
            model,
            tokenizer,
            [it["question"] for it in questions],
            chat=True,
            max_new_tokens=max_new_tokens,
            batch_size=max(batch_size, GENERATE_BATCH),
            progress=progress,
        )
        for it, a in zip(questions, answers):
            if not a:
                raise DatasetError(f"The model gives an empty answer to retain question {it['question']!r}; drop it.")
            it["example"] = {"question": it["question"], "answer": a}
    encoded = []
    for it in items:
        if it["kind"] == "text":
            text = it["text"]
            ids = list(text) if not isinstance(text, str) else list(tokenizer(text)["input_ids"])
            ids = [int(t) for t in ids[:max_length]]
            if len(ids) < 2:
                raise DatasetError(f"Retain text {str(text)[:40]!r} has fewer than 2 tokens; nothing to retain.")
            encoded.append({"input_ids": ids, "labels": ids})
            it["shown"] = text[:80] if isinstance(text, str) else f"{len(ids)} tokens"
        else:
            encoded.append(encode(tokenizer, it["example"], max_length))
            ex = it["example"]
            it["shown"] = ex.get("messages") or {
                "question": ex.get("prompt", ex.get("question")),
                "answer": ex["answer"],
            }
    pad = pad_token_id(tokenizer)

    was_training = model.training
    model.eval()
    distributions: list[_Distributions] = []
    try:
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s : s + batch_size]
            positions = [answer_positions(e["labels"]) for e in chunk]
            with torch.no_grad():
                logits = logits_at(model, [e["input_ids"] for e in chunk], positions, pad)
            logps = logits.float().log_softmax(-1).cpu().split([len(p) for p in positions])
            for e, p, logp in zip(chunk, positions, logps):
                k = min(top_k, logp.shape[-1])
                top_logp, top_ids = logp.topk(k, dim=-1)
                rest = _log1mexp(torch.logsumexp(top_logp, dim=-1))
                distributions.append(_Distributions(e["input_ids"], p, top_ids, top_logp, rest))
    finally:
        model.train(was_training)
    return RetainSet(distributions, top_k, pad, items, token_digest([e["input_ids"] for e in encoded]))


def token_digest(ids: Sequence[Sequence[int]]) -> str:
    """The checksum of token id sequences, sequence by sequence (`RetainSet.sha256`; a `Scope`'s `info["sha256"]`).

    >>> token_digest([[1, 2], [3]]) == token_digest([[1, 2], [3]]) != token_digest([[1], [2, 3]])
    True
    """
    return hashlib.sha256(json.dumps([[int(t) for t in s] for s in ids]).encode()).hexdigest()


class RetainLoss:
    """A `compute_loss_func` for HF `Trainer` / TRL `SFTTrainer`: the causal-LM loss plus the retain KL.

    Each call adds `weight * KL` on the next `batch_size` retain items (its own forward pass through `model`),
    scaled by the call's share of the accumulated batch's answer tokens, so gradient accumulation sums to one
    retain term per optimizer step, as in `loki.train`.

    Args:
        model: the model being trained (the KL runs its own forward pass through it).
        retain: the base model's distributions on the retain items, from `retain_set` before training.
        weight: the KL's weight; 0 gives the plain causal-LM loss.
        batch_size: retain items per call.
        seed: seeds the order of retain items (`RetainSet.batches`).

    Raises:
        DatasetError: `retain` is not a `RetainSet`; TrainingOptionError: `weight` not a finite number >= 0,
            `batch_size` not an integer >= 1, `seed` not an integer.

    A call `loss(outputs, labels, num_items_in_batch=None)` takes the model outputs (with `logits` `[B, T, V]`),
    the labels `[B, T]` (`-100` where there is no loss; shifted inside) and the answer-token count of the whole
    accumulated batch (None: this batch's), and returns the loss as a scalar tensor.

    >>> import loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> loss = RetainLoss(model, retain_set(model, None, [{"text": [9, 10, 11]}], progress=False))
    >>> value = loss(model(input_ids=torch.tensor([[5, 6, 7, 8]])), torch.tensor([[-100, -100, 7, 8]]))
    >>> round(value.item(), 2), value.requires_grad
    (4.87, True)

    >>> # retained = loki.retain.retain_set(model, tokenizer, retain)        # on the base model, before training
    >>> # trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=...,
    >>> #                   compute_loss_func=RetainLoss(model, retained, weight=1.0))
    """

    def __init__(self, model: nn.Module, retain: RetainSet, *, weight: float = 1.0, batch_size: int = 8, seed: int = 0):
        if not isinstance(retain, RetainSet):
            raise DatasetError("RetainLoss needs the RetainSet of loki.retain.retain_set(model, tokenizer, retain).")
        check_number("weight", weight, low=0)
        check_number("seed", seed, integer=True)
        self.model, self.retain, self.weight = model, retain, float(weight)
        self._order = (batch_size, seed)
        self.seek(0)

    def seek(self, drawn: int) -> None:
        """Go on as a loss that has drawn `drawn` retain batches (`drawn` counts them): a run resumed from a
        checkpoint then draws the batches the uninterrupted run drew (`loki.trainer.LokiTrainer` does this).

        Args:
            drawn: retain batches drawn before (`self.drawn` when the checkpoint was written), >= 0.
        """
        self._batches, self.drawn = self.retain.batches(*self._order), 0
        for _ in range(drawn):
            self._next()

    def _next(self) -> list[int]:
        self.drawn += 1
        return next(self._batches)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        shifted = labels[:, 1:].to(logits.device)
        n = (shifted != IGNORE).sum()
        total = num_items_in_batch if num_items_in_batch is not None else n
        total = torch.as_tensor(total, device=logits.device).clamp(min=1)
        task = (
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            / total
        )
        if self.weight == 0:
            return task
        kl = self.retain.kl(self.model, self._next())
        return task + self.weight * kl * (n / total)
