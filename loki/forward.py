"""The logits a loss reads, and only those: next-token logits at chosen positions of a batch of token sequences.

Training reads the logits at a few positions of each sequence (the answer tokens, the retained positions). A plain
forward pads every sequence to the longest of the batch, runs the chat template's opening (the same system turn in
every example: 24 of about 60 tokens on the default model) once per sequence, and projects every position onto the
vocabulary. `logits_at` returns the same logits, equal up to float summation order, with less work:

- sequences that open with the same tokens run that opening once, as one batch-1 pass whose keys and values every
  sequence of the group then attends to (with gradient: the opening's share of the gradient is summed over the
  group, as in the plain forward);
- sequences with different openings (chat examples and plain text) go in separate padded batches, so short
  sequences are not padded to a long one of another kind;
- the LM head runs only over the span of requested positions (`logits_to_keep`, which every transformers causal
  LM takes).

On the default model this makes a `loki demo` training step measurably cheaper (the docs' "Demo step" benchmark page).

>>> import loki.testing, torch
>>> model = loki.testing.tiny_model("llama")
>>> seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 9, 10, 11, 12, 20]]
>>> out = logits_at(model, seqs, [torch.tensor([8]), torch.tensor([7])], pad_token_id=0, min_shared=4)
>>> full = model(input_ids=torch.tensor([seqs[0]])).logits[0, 8]
>>> out.shape[0], torch.allclose(out[0], full, atol=1e-5)
(2, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dataset import collate
from .distributed import wrapper

__all__ = ["logits_at"]

MIN_SHARED = 8  # shortest opening worth a separate pass


def logits_at(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[torch.Tensor],
    pad_token_id: int,
    *,
    share: bool = True,
    min_shared: int = MIN_SHARED,
) -> torch.Tensor:
    """Next-token logits of `model` at `positions[i]` of `sequences[i]` (the logits at `t` predict token `t + 1`).

    The same values as `model(right-padded batch).logits[i, positions[i]]` (up to float summation order), computed
    as the module docstring says.

    Args:
        model: a transformers causal LM (a prepared, PEFT-wrapped or DDP-unwrapped one too).
        sequences: token ids, one list per sequence.
        positions: int64 `[P_i]` positions of each sequence, each in `[0, len - 1)`.
        pad_token_id: the id batches are padded with.
        share: run a shared opening once per group. False runs every sequence in full; so does a model in FSDP
            or DeepSpeed (wrappers that gather weights in each forward; sharing is not verified there) or with
            activation checkpointing (which turns the key/value cache off).
        min_shared: the shortest common opening that gets its own pass.

    Returns:
        Tensor: `[sum P_i, vocab]` in the model's dtype, on its device, rows in the order of `sequences` and
        their positions, with a gradient into `model`.

    >>> # logits_at(model, [e["input_ids"] for e in encoded], [answer_positions(e["labels"]) for e in encoded], pad)
    """
    device = model.get_input_embeddings().weight.device
    # FSDP/DeepSpeed gather weights in each forward; activation checkpointing turns the cache off
    share = (
        share
        and wrapper(model) is None
        and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    )
    groups: dict[tuple, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(tuple(seq[:min_shared]), []).append(i)
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    batches, alone = [], []  # (members, opening) run together; sequences that share no opening with another
    for members in groups.values():
        opening = _common_opening([sequences[i] for i in members], [positions[i] for i in members])
        long = window is not None and max(len(sequences[i]) for i in members) > window
        if share and len(members) > 1 and opening >= min_shared and not long:
            batches.append((members, opening))
        else:
            alone += members
    if alone:
        batches.append((sorted(alone), 0))
    parts, order = [], []
    for members, opening in batches:
        seqs = [list(sequences[i]) for i in members]
        pos = [positions[i].to(torch.long) for i in members]
        parts.append(_group_logits(model, seqs, pos, pad_token_id, opening, device))
        order += [(i, k) for i, p in zip(members, pos) for k in range(len(p))]
    logits = torch.cat(parts)
    # back to the order of `sequences`: rows were produced group by group
    rank = sorted(range(len(order)), key=order.__getitem__)
    return logits[torch.tensor(rank, device=device)] if rank != list(range(len(rank))) else logits


def _common_opening(seqs: list[list[int]], pos: list[torch.Tensor]) -> int:
    """Length of the opening all `seqs` share, short enough that every requested position lies after it."""
    limit = min([len(s) - 1 for s in seqs] + [int(p.min()) for p in pos if len(p)])
    first = seqs[0]
    return next((k for k in range(limit) if any(s[k] != first[k] for s in seqs)), limit)


def _group_logits(model, seqs, pos, pad, opening: int, device) -> torch.Tensor:
    lo = min((int(p.min()) for p in pos if len(p)), default=opening)
    hi = max((int(p.max()) for p in pos if len(p)), default=opening)
    batch = collate([{"input_ids": s[opening:], "labels": s[opening:]} for s in seqs], pad)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    keep = torch.arange(lo - opening, hi - opening + 1, device=device)
    kwargs = {}
    if opening:
        shared = model(input_ids=torch.tensor([seqs[0][:opening]], device=device), use_cache=True, logits_to_keep=1)
        cache = shared.past_key_values
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):  # a model without a transformers Cache
            return _group_logits(model, seqs, pos, pad, 0, device)
        cache.batch_repeat_interleave(len(seqs))
        mask = torch.cat([torch.ones(len(seqs), opening, dtype=mask.dtype, device=device), mask], dim=1)
        kwargs = {"past_key_values": cache, "use_cache": True}
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **kwargs).logits
    rows = torch.cat([torch.full_like(p, r) for r, p in enumerate(pos)]).to(device)
    cols = torch.cat(pos).to(device) - lo
    return logits[rows, cols]
