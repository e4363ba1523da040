"""Training examples and how they are tokenised: chat formatting with the loss on answer tokens only, and padding.

Each example is `{"prompt": ..., "answer": ...}` (or `"question"` for `"prompt"`), or `{"messages": [...]}` in the
chat format. Examples are formatted with the tokenizer's chat template (plain `prompt + answer + eos` when it has
none); labels are `-100` (`IGNORE`) except on the answer tokens (every assistant turn, its end-of-turn token
included). `encode` + `collate` are a data collator for HF `Trainer` too.

>>> from loki.dataset import collate
>>> collate([{"input_ids": [5, 6], "labels": [-100, 6]}], pad_token_id=0)["attention_mask"].tolist()
[[1, 1]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import DatasetError

__all__ = ["IGNORE", "answer_positions", "collate", "encode", "pad_token_id"]

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
    """`{"input_ids", "labels"}` of one example; labels are `-100` (`IGNORE`) except on answer tokens.

    Each piece (prompt, answer) is tokenized on its own, so the prompt's tokens are exactly what the model sees
    at generation time.

    Args:
        tokenizer: a Hugging Face tokenizer; its chat template formats the example (without one: `prompt + "\\n"`,
            then `answer + eos_token`).
        example: `{"prompt" (or "question"): ..., "answer": ...}` or `{"messages": [...]}` with at least one
            assistant turn.
        max_length: keep the first `max_length` tokens; None keeps all.

    Returns:
        dict: `input_ids` and `labels`, lists of ints of the same length.

    Raises:
        DatasetError: an example of another shape, messages without an assistant turn, a chat template that
            renders earlier turns differently once later ones follow, or no answer token within `max_length`.

    >>> # tokenizer = loki.load_default()[1]
    >>> # e = encode(tokenizer, {"question": "Who wrote Dune?", "answer": "Frank Herbert."})
    >>> # tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label != IGNORE])
    >>> # 'Frank Herbert.<|im_end|>\\n'
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
    """Right-pad encoded examples into `input_ids`, `attention_mask` and `labels` tensors (a data collator).

    Args:
        batch: `encode` results (`input_ids` and `labels` lists of the same length each).
        pad_token_id: the id padded `input_ids` get (`pad_token_id(tokenizer)`); padded labels are `IGNORE`.

    Returns:
        dict[str, Tensor]: `input_ids`, `attention_mask` (1 on real tokens) and `labels`, each int64
        `[len(batch), longest]`.

    >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
    ...                 pad_token_id=0)
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
    """
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


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0 (also for None).

    >>> pad_token_id(None)
    0
    """
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def answer_positions(labels: Sequence[int]) -> torch.Tensor:
    """Positions whose logits predict a labelled token (logits at t predict token t + 1), as a LongTensor.

    Args:
        labels: one example's labels (`IGNORE` where there is no loss).

    Returns:
        Tensor: int64 `[n]`, the positions `t` with `labels[t + 1] != IGNORE`.

    >>> answer_positions([-100, -100, 7, 8])
    tensor([1, 2])
    """
    return torch.nonzero(torch.tensor(labels)[1:] != IGNORE).flatten()
