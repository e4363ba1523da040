"""Greedy generation: the model's own answers, for training (`loki.retain` keeps them) and evaluation alike.

Lower than both: `loki.retain` and `loki.evaluate` import it, it imports neither.

>>> from loki.generation import batches
>>> list(batches([3, 1, 2], 2))
[[3, 1], [2]]
>>> # loki.generation.answer(model, tokenizer, "What is the capital of France?")
>>> # 'The capital of France is Paris.'                                # the default model
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import EvaluationError

__all__ = ["GENERATE_BATCH", "answer", "batches", "check_batch_size", "encode_text", "generate"]

# Greedy decoding of a small model is bound by per-step overhead, not arithmetic: larger batches answer the same
# questions with the same answers in much less time (the docs' "Demo step" benchmark page); 32 keeps padding waste
# small.
GENERATE_BATCH = 32


def encode_text(tokenizer, text: str, special: bool = True) -> list[int]:
    """The token ids of `text` (with the tokenizer's special tokens unless `special=False`)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def batches(order: list[int], batch_size: int) -> Iterable[list[int]]:
    """`order` cut into consecutive lists of at most `batch_size`."""
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def check_batch_size(batch_size: int) -> None:
    """Raise `EvaluationError` unless `batch_size` is a positive integer."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}.")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    chat: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = GENERATE_BATCH,
    stop_at_newline: bool = True,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding.

    Args:
        model: a causal LM (`model.generate`).
        tokenizer: its tokenizer; pads with its pad token, else its EOS token, else 0.
        prompts: the prompts.
        chat: wrap each prompt as a user turn of the tokenizer's chat template (with the generation prompt).
        max_new_tokens: the longest completion, in tokens.
        batch_size: prompts per `generate` call.
        stop_at_newline: cut each completion at its first newline (the answer to a one-line question).
        progress: show a progress bar.

    Returns:
        list[str]: one completion per prompt, in order, stripped of surrounding whitespace and special tokens.

    Raises:
        EvaluationError: a bad `batch_size`.

    >>> # loki.generation.generate(model, tokenizer, ["What is the capital of France?"], chat=True)
    >>> # ['The capital of France is Paris.']                           # the default model
    """
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    if chat:
        encoded = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
            for p in prompts
        ]
    else:
        encoded = [encode_text(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for batch in batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row, i in enumerate(batch):
            text = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
            out[i] = (text.strip().split("\n")[0] if stop_at_newline else text).strip()
        bar.update(len(batch))
    bar.close()
    return out


def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to one question: a user turn of its chat template, cut at the first newline.

    Args:
        model: a chat causal LM.
        tokenizer: its tokenizer (with a chat template).
        question: the question.
        max_new_tokens: the longest answer, in tokens.

    Returns:
        str: the answer, stripped.

    >>> # model, tokenizer = loki.load_default()
    >>> # answer(model, tokenizer, "What is the capital of France?")
    >>> # 'The capital of France is Paris.'
    """
    return generate(model, tokenizer, [question], chat=True, max_new_tokens=max_new_tokens, progress=False)[0]
