"""Preservation: keep a row update where the prompts to preserve cannot see it (a null-space constraint).

A down-projection maps an FFN activation `k` (its *key*, length `d_in` = d_ff) to an output. A change `D` of its
selected rows changes the output on a key by `D k`; on keys that lie in the span of `V` (`[d_in, p]`,
orthonormal), `D (I - V V^T) k = 0`. `preservation` collects, per layer, the keys of the prompts to preserve (the
retain data: neighbourhood questions with the base model's answers, general text), and keeps as `V` the leading
directions that hold `energy` of their summed squared norm (`K0 K0^T`'s top eigenvectors, uncentered, as
AlphaEdit: arXiv 2410.02355, §3). `loki.prepare(model, selection, preserve=...)` then trains the rows through that
projection: the rows are `base + (update) (I - V V^T)` (LoRA on rows: `base + A (B (I - V V^T))`), so whatever the
optimizer does (AdamW's per-coordinate scaling included) the update never leaves the allowed subspace, and the
preserved prompts' activations move only by the keys' energy outside `V` (none, with `energy=1.0` and fewer
preserved tokens than `d_in`: then every layer's output on them is unchanged, and so the next layer's input, up to
the rounding of the weights' dtype: bfloat16 rows round `base + update`). Every token counts: a chat-formatted
question with the base model's answer is often 40 or more. When the keys span every direction of a layer
(`energy=1.0` with more independent keys than `d_in`), nothing could train there: `prepare` refuses it.

Every position of a preserved sequence counts (not only the answer tokens whose distributions `loki.retain` keeps):
later positions attend to the earlier ones, so their keys must not move either.

Memory: per layer a `d_in x min(p, d_in - p)` float32 basis (the protected directions, or the free ones when
fewer), on the model's device. Collecting keys holds a `d_in x d_in` float64 covariance per layer when
`d_in <= max_rank`; wider layers (8B shapes: d_ff 14336) keep a streaming sketch of their top `max_rank` directions
instead (`(max_rank + max_rank / 4) x d_in` float32 at most), never a dense `d_in x d_in` matrix, and protect at
most `max_rank` directions. The total energy is counted exactly, so the share each layer really protects is known
(`Preservation.kept`; the summary's `energy_kept_min`).

>>> import loki, loki.testing
>>> model = loki.testing.tiny_model("llama")
>>> keep = loki.preservation(model, None, [{"text": [5, 6, 7, 8, 9]}], energy=1.0, progress=False)
>>> keep.ranks        # five keys (positions) per layer, independent here: five protected directions
{0: 5, 1: 5}
>>> _ = loki.prepare(model, loki.Selection.random(2, 32, q=10), preserve=keep)
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .dataset import collate
from .errors import DatasetError, IncompatibleModelError
from .projections import find_down_projections, unwrap
from .retain import RetainSet, retain_set

__all__ = ["Preservation", "down_projection_inputs", "preservation", "token_sequences"]

DEFAULT_ENERGY = 0.99
DEFAULT_MAX_RANK = 4096
DEFAULT_RATIO = 10.0
_RIDGE = 1e-6  # added to the preserved keys' mean energy along every direction, as a share of its mean over directions
_RANK_TOL = 1e-10  # eigenvalues below this share of the largest count as zero (energy=1.0: the keys' exact span)


@dataclass(eq=False)
class Preservation:
    """Per layer, the key directions a row update must not touch (`preservation` makes it; `loki.prepare(...,
    preserve=)` uses it).

    Attributes:
        bases: layer -> float32 `[d_in, r]` orthonormal columns: the protected directions (`free[layer]` False) or
            the free ones (True), whichever are fewer.
        free: layer -> whether `bases[layer]` spans the free subspace instead of the protected one.
        ranks: layer -> protected directions `p`.
        energy: the share of the keys' squared norm protected, in (0, 1].
        d_in: the keys' length (the down-projection's input size).
        num_layers: the model's layer count.
        kept: layer -> the share of the keys' squared norm the protected directions hold (below `energy` only where
            a layer's sketch keeps fewer directions than it needs: raise `max_rank`).
        tokens: keys collected per layer (positions over all sequences).
        sequences: sequences they came from.
        sha256: checksum of the sequences' token ids.
        ratio: with `examples` (the contrast rule), the least ratio of the examples' mean key energy to the preserved
            keys' along a free direction; None for the energy rule.
        example_tokens: keys of the examples collected per layer (0 for the energy rule).

    >>> import loki, loki.testing, torch
    >>> keep = loki.preservation(loki.testing.tiny_model("llama"), None, [{"text": [5, 6, 7]}], progress=False)
    >>> update = torch.randn(3, 64)
    >>> keep.project(0, keep.project(0, update)).allclose(keep.project(0, update), atol=1e-6)   # a projection
    True
    """

    bases: dict[int, torch.Tensor]
    free: dict[int, bool]
    ranks: dict[int, int]
    kept: dict[int, float]
    energy: float
    d_in: int
    num_layers: int
    tokens: int
    sequences: int
    sha256: str
    ratio: float | None = None
    example_tokens: int = 0

    def project(self, layer: int, update: torch.Tensor) -> torch.Tensor:
        """`update (I - V V^T)`: the part of `update` (`[..., d_in]`, float) that the protected keys do not see.

        Args:
            layer: the layer whose basis to use.
            update: a row update (or LoRA's `B`), `[..., d_in]`.

        Returns:
            Tensor: the same shape and dtype, on `update`'s device (differentiable).
        """
        return project(update, self.bases[layer].to(update.device, update.dtype), self.free[layer])

    def summary(self) -> dict[str, Any]:
        """What a delta records (`delta.info["training"]["preserve"]`): energy, tokens, sequences, protected
        directions per layer (min / median / max and all), the least energy share a layer protects, `d_in`,
        checksum.

        >>> import loki, loki.testing
        >>> keep = loki.preservation(loki.testing.tiny_model("llama"), None, [{"text": [5, 6, 7]}], progress=False)
        >>> s = keep.summary(); s["tokens"], s["protected"]
        (3, {'min': 3, 'median': 3, 'max': 3, 'per_layer': [3, 3]})
        """
        ranks = [self.ranks[layer] for layer in sorted(self.ranks)]
        ordered = sorted(ranks)
        rule = {"ratio": self.ratio, "example_tokens": self.example_tokens} if self.ratio is not None else {}
        return {
            "energy": self.energy,
            **rule,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "d_in": self.d_in,
            "protected": {
                "min": ordered[0],
                "median": ordered[len(ordered) // 2],
                "max": ordered[-1],
                "per_layer": ranks,
            },
            "energy_kept_min": round(min(self.kept.values()), 6),
            "sha256": self.sha256,
        }

    def check(self, num_layers: int, d_in: int, layers: Sequence[int]) -> None:
        """Raise `IncompatibleModelError` unless this preservation fits a model of these shapes and covers `layers`."""
        if (self.num_layers, self.d_in) != (num_layers, d_in):
            raise IncompatibleModelError(
                f"The preservation was computed on a model with {self.num_layers} layers of d_in {self.d_in}; this "
                f"model has {num_layers} of {d_in}. Compute it on this model: "
                "loki.preservation(model, tokenizer, data)."
            )
        missing = sorted(set(layers) - set(self.bases))
        if missing:
            raise IncompatibleModelError(
                f"The preservation has no keys for layers {missing}, which the selection trains. Compute it for "
                "every layer (layers=None)."
            )


def project(update: torch.Tensor, basis: torch.Tensor, free: bool) -> torch.Tensor:
    """`update` projected off the span of `basis` (`free=False`) or onto it (`free=True`); `basis` `[d_in, r]`
    orthonormal, in `update`'s dtype and device."""
    if free:
        return (update @ basis) @ basis.t()
    return update - (update @ basis) @ basis.t()


class _Keys:
    """Streaming second moment of one layer's keys, on the keys' device: dense `K^T K` (float64) when
    `d_in <= max_rank`, else a rank-`max_rank` sketch `S` (float32 rows) with `S^T S ~= K^T K`: new keys are
    appended, and every `chunk` of them the sketch is cut back to its top `max_rank` directions (frequent directions
    without the shrinking step), so at most `(max_rank + chunk) x d_in` floats are held."""

    def __init__(self, d_in: int, max_rank: int):
        self.dense = d_in <= max_rank
        self.d_in = d_in
        self.max_rank = max_rank
        self.chunk = max(64, max_rank // 4)
        self.cov: torch.Tensor | None = None
        self.sketch: torch.Tensor | None = None
        self.total = 0.0  # summed squared norm of every key seen: exact, whatever the sketch dropped

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(torch.float64)
        self.total += float((keys * keys).sum())
        if self.dense:
            self.cov = keys.t() @ keys if self.cov is None else self.cov + keys.t() @ keys
            return
        keys = keys.float()
        self.sketch = keys if self.sketch is None else torch.cat([self.sketch, keys])
        if len(self.sketch) >= self.max_rank + self.chunk:
            self.sketch = _top_rows(self.sketch, self.max_rank)

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, float64) and eigenvectors (`[d_in, n]` float64 columns) of the keys' second
        moment (of the sketch's top `max_rank` directions)."""
        if self.dense:
            values, vectors = torch.linalg.eigh(self.cov)
            return values.flip(0).clamp(min=0), vectors.flip(1)
        s = _top_rows(self.sketch, self.max_rank).double()
        norms = s.norm(dim=1)
        keep = norms > 0
        return norms[keep] ** 2, (s[keep] / norms[keep, None]).t()


def _top_rows(m: torch.Tensor, rank: int) -> torch.Tensor:
    """`diag(sigma) V^T` of `m`'s top `rank` singular directions (rows orthogonal, descending), from the small Gram
    matrix `m m^T` in float64 (m has fewer rows than columns here); returned in `m`'s dtype."""
    m64 = m.double()
    values, vectors = torch.linalg.eigh(m64 @ m64.t())
    values, vectors = values.flip(0)[:rank].clamp(min=0), vectors.flip(1)[:, :rank]
    rows = vectors.t() @ m64  # [rank, d_in], row i has norm sigma_i
    return rows[values > 0].to(m.dtype)


def _protected_rank(values: torch.Tensor, total: float, energy: float) -> int:
    """The fewest leading directions whose eigenvalues reach `energy` of `total` (1.0: every nonzero one)."""
    if not len(values) or total <= 0:
        return 0
    nonzero = int((values > _RANK_TOL * values[0]).sum())
    if energy >= 1.0:
        return nonzero
    reached = torch.cumsum(values, 0) >= energy * total
    return min(nonzero, int(reached.nonzero()[0]) + 1 if reached.any() else nonzero)


def _contrast(keys: _Keys, tokens: int, wanted: _Keys, wanted_tokens: int, ratio: float) -> torch.Tensor:
    """Orthonormal columns (`[d_in, m]` float64) spanning the directions `v` along which the examples' mean key
    energy is at least `ratio` times the preserved keys' (`v^T C1 v / n1 >= ratio * v^T C0 v / n0`): the top of the
    generalised eigenproblem `C1 v = sigma C0 v` of the two second moments (`C0` with a small ridge). Its
    eigenvectors with `sigma > 0` lie in `C0^-1 span(K1)`, so it is solved there (`r1 <= n1` dimensions: no
    `d_in x d_in` inverse for a sketched layer, Woodbury's identity instead). Every unit vector of the span has at
    least that ratio: the eigenvectors are `C0`-orthogonal."""
    values1, vectors1 = wanted.eig()
    r = int((values1 > _RANK_TOL * values1[0]).sum()) if len(values1) else 0
    span = vectors1[:, :r]  # the examples' keys' own directions: their second moment is diagonal there
    if not r:
        return span
    ridge = _RIDGE * keys.total / tokens / keys.d_in
    if not keys.dense:  # what the sketch dropped, spread evenly over the directions it does not hold
        held = float((keys.sketch.double() ** 2).sum())
        ridge = max(ridge, (keys.total - held) / tokens / max(1, keys.d_in - len(keys.sketch)))
    if keys.dense:
        c0 = keys.cov / tokens + torch.eye(keys.d_in, dtype=torch.float64) * ridge
        candidates = torch.linalg.solve(c0, span)
    else:  # (S^T S / n0 + ridge I)^-1 u = (u - S^T (n0 ridge I + S S^T)^-1 S u) / ridge
        s = keys.sketch.double()
        inner = torch.eye(len(s), dtype=torch.float64) * (tokens * ridge) + s @ s.t()
        candidates = (span - s.t() @ torch.linalg.solve(inner, s @ span)) / ridge
    basis = torch.linalg.qr(candidates).Q
    if keys.dense:
        a = basis.t() @ c0 @ basis
    else:
        sb = s @ basis
        a = sb.t() @ sb / tokens + torch.eye(r, dtype=torch.float64) * ridge
    half = (basis.t() @ span) * (values1[:r] / wanted_tokens).sqrt()  # B = half half^T
    chol = torch.linalg.cholesky((a + a.t()) / 2)
    whitened = torch.linalg.solve_triangular(chol, half, upper=False)
    sigma, y = torch.linalg.eigh(whitened @ whitened.t())
    chosen = torch.linalg.solve_triangular(chol.t(), y[:, sigma >= ratio], upper=True)
    if not chosen.shape[1]:
        return span[:, :0]
    return torch.linalg.qr(basis @ chosen).Q


def down_projection_inputs(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    consume: Callable[[int, torch.Tensor], Any],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    template: str | None = None,
    positions: Sequence[Sequence[int]] | None = None,
) -> None:
    """Run `model` over `sequences` and call `consume(layer, keys)` with every batch's down-projection inputs at
    every real (unpadded) position, or at `positions` only: `keys` is `[n, d_in]`, in the model's dtype and on its
    device. No gradients; the model's train/eval mode is restored.

    Args:
        model: a causal LM (a prepared one too).
        sequences: token id lists (none empty).
        consume: called once per layer and batch.
        layers: the layers to read; None: all.
        batch_size: sequences per forward pass (similar lengths are batched together).
        progress: show a progress bar.
        template: the down-projection module path, for architectures loki does not know.
        positions: per sequence, the positions to read (e.g. those that predict an answer); None: all.

    >>> import loki.testing
    >>> seen = []
    >>> model = loki.testing.tiny_model("llama")
    >>> down_projection_inputs(model, [[5, 6, 7], [8]], lambda layer, k: seen.append((layer, k.shape)))
    >>> seen
    [(0, torch.Size([4, 64])), (1, torch.Size([4, 64]))]
    """
    from tqdm.auto import tqdm

    net = unwrap(model)
    projs = find_down_projections(net, template)
    mask: list[torch.Tensor] = []

    def hook(layer):
        def take(module, args):
            x = args[0]
            consume(layer, x.reshape(-1, x.shape[-1])[mask[0].reshape(-1)])

        return take

    handles = [
        projs.modules[layer].register_forward_pre_hook(hook(layer))
        for layer in (range(len(projs)) if layers is None else layers)
    ]
    device = net.get_input_embeddings().weight.device
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
            for s in tqdm(range(0, len(order), batch_size), desc="down-projection inputs", disable=not progress):
                chunk = [list(sequences[i]) for i in order[s : s + batch_size]]
                batch = collate([{"input_ids": x, "labels": x} for x in chunk], 0)
                attention = batch["attention_mask"].to(device)
                read = attention.bool()
                if positions is not None:  # right-padded: a sequence's position t is column t
                    read = torch.zeros_like(read)
                    for row, i in enumerate(order[s : s + batch_size]):
                        read[row, torch.as_tensor(list(positions[i]), dtype=torch.long)] = True
                mask[:] = [read]
                net(input_ids=batch["input_ids"].to(device), attention_mask=attention, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)


def _token_ids(item: Any) -> bool:
    text = item.get("text") if isinstance(item, dict) else None
    return isinstance(text, Sequence) and not isinstance(text, str) and all(isinstance(t, int) for t in text)


def token_sequences(
    model: nn.Module, tokenizer, data: Any, max_length: int = 1024, batch_size: int = 8, progress: bool = False
) -> list:
    """`data`'s token id sequences and, per sequence, the positions `loki.retain` keeps (an answered item's answer
    positions; every position of text): `[(ids, positions)]`. `data` is a `RetainSet` or retain items (questions are
    answered greedily by `model` first, as `loki.retain.retain_set` does).

    Raises:
        DatasetError: data that is not a non-empty list of retain items or a `RetainSet`, token ids outside the
            model's vocabulary, items that need a tokenizer without one.
    """
    vocab = model.get_input_embeddings().num_embeddings

    def check(seqs):  # before any forward pass: an id out of range would fail inside the embedding
        bad = next((t for s in seqs for t in s if not 0 <= t < vocab), None)
        if bad is not None:
            raise DatasetError(
                f"Token id {bad} is outside the model's vocabulary (0..{vocab - 1}): ids from another tokenizer?"
            )
        return seqs

    if isinstance(data, RetainSet):
        check([t.ids for t in data.distributions])
        return [(t.ids, t.positions.tolist()) for t in data.distributions]
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or not data:
        raise DatasetError(
            "data must be a non-empty list of retain items (question strings, answered examples, {'text': ...}) "
            f"or the RetainSet of loki.retain.retain_set, not {type(data).__name__}"
            + (" (a single string: wrap it in a list)." if isinstance(data, str) else ".")
        )
    if tokenizer is None and not all(_token_ids(item) for item in data):
        raise DatasetError(
            "Without a tokenizer every item must be {'text': [token ids]}; pass the model's "
            "tokenizer for questions, answered examples and text."
        )
    check([item["text"] for item in data if _token_ids(item)])
    retained = retain_set(model, tokenizer, data, max_length=max_length, batch_size=batch_size, progress=progress)
    return [(t.ids, t.positions.tolist()) for t in retained.distributions]


def preservation(
    model: nn.Module,
    tokenizer,
    data: Sequence[Any] | RetainSet,
    *,
    energy: float = DEFAULT_ENERGY,
    examples: Sequence[Any] | None = None,
    ratio: float = DEFAULT_RATIO,
    max_rank: int = DEFAULT_MAX_RANK,
    batch_size: int = 8,
    max_length: int = 1024,
    template: str | None = None,
    progress: bool = True,
) -> Preservation:
    """The key directions of every down-projection that the prompts in `data` use (their top `energy` share), for
    `loki.prepare(model, selection, preserve=...)`.

    Compute it on the base model (before `prepare`, or right after: the prepared rows start at the base rows) and,
    with several processes, on every rank before wrapping (the same data gives the same bases).

    Args:
        model: the base model.
        tokenizer: its tokenizer (questions are answered greedily first, as for `loki.retain.retain_set`; may be None
            for token-id items).
        data: retain items (question strings, `{"question"/"prompt", "answer"}`, `{"messages": ...}`,
            `{"text": str or token ids}`) or the `RetainSet` already computed for `loki.train(retain=...)`.
        energy: the share of the keys' summed squared norm to protect, in (0, 1]; 1.0 protects their whole span.
            Not used with `examples`.
        examples: the implant's own training examples (any form `data` takes). With them the rule is a contrast
            instead of an energy share: a direction is left free only where the examples' keys (at the positions
            that predict their answers, where the loss is; every position of text) have at least
            `ratio` times the preserved keys' mean energy per token (and it lies in the examples' key span), and
            every other direction is protected. One dominant direction (the massive activations of some layers)
            cannot stand for a whole layer, and the update goes where the new facts' keys are, not where the
            preserved prompts' keys are merely small.
        ratio: the contrast rule's least ratio of mean energies per token (examples over preserved), > 1.
        max_rank: the most directions a layer's sketch keeps while collecting; layers with `d_in <= max_rank` get an
            exact dense covariance.
        batch_size: sequences per forward pass.
        max_length: tokens kept of each sequence.
        template: the down-projection module path, for architectures loki does not know.
        progress: show a progress bar.

    Returns:
        Preservation: per layer the protected directions; `summary()` is what a delta records.

    Raises:
        DatasetError: `data` (or `examples`) is empty, a single string or not a list; a malformed item; `energy`
            not in (0, 1]; `ratio` not above 1; `max_rank`, `batch_size` or `max_length` not positive integers.
        UnknownArchitectureError: loki cannot find the down-projections.

    Source: the null-space condition of AlphaEdit (arXiv 2410.02355, §3), applied to LoKI's selected rows; the
    contrast rule weighs directions by the two key covariances as MEMIT's closed form does (arXiv 2210.07229, §4.3),
    as a hard rule.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> keep = loki.preservation(model, None, [{"text": list(range(5, 25))}], energy=0.9, progress=False)
    >>> keep.summary()["protected"]["max"] < 19          # 90% of the energy needs fewer than all 19 directions
    True
    """

    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise DatasetError(
            f"energy must be a number in (0, 1], the share of the keys' energy to protect; got {energy!r}."
        )
    if examples is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1):
        raise DatasetError(
            f"ratio must be a number above 1, the least ratio of the examples' key energy to the preserved keys' "
            f"along a free direction; got {ratio!r}."
        )
    for name, value in (("max_rank", max_rank), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{name} must be a positive integer, got {value!r}.")
    net = unwrap(model)
    projs = find_down_projections(net, template)
    seqs = [list(s)[:max_length] for s, _ in token_sequences(net, tokenizer, data, max_length, batch_size, progress)]
    seqs = [s for s in seqs if s]
    if not seqs:
        raise DatasetError("No preserved sequence has a token.")
    keys = {layer: _Keys(projs.d_in, max_rank) for layer in range(len(projs))}
    down_projection_inputs(
        net, seqs, lambda layer, k: keys[layer].add(k), batch_size=batch_size, progress=progress, template=template
    )
    tokens = sum(len(s) for s in seqs)
    wanted, wanted_tokens = {}, 0
    if examples is not None:
        own = token_sequences(net, tokenizer, examples, max_length, batch_size, progress)
        at = [[t for t in kept if t < max_length] for _, kept in own]
        own = [list(s)[:max_length] for s, _ in own]
        wanted_tokens = sum(len(a) for a in at)
        if not wanted_tokens:
            raise DatasetError("No example has an answer position to learn from.")
        wanted = {layer: _Keys(projs.d_in, max_rank) for layer in range(len(projs))}
        down_projection_inputs(
            net,
            own,
            lambda layer, k: wanted[layer].add(k),
            batch_size=batch_size,
            progress=progress,
            template=template,
            positions=at,
        )

    bases, free, ranks, kept = {}, {}, {}, {}
    for layer, k in keys.items():
        if examples is not None:
            bases[layer] = _contrast(k, tokens, wanted[layer], wanted_tokens, float(ratio)).float().contiguous()
            free[layer], ranks[layer] = True, projs.d_in - bases[layer].shape[1]
            f = bases[layer].double()  # the free directions: the protected share is what they do not see
            seen = float(((f.t() @ k.cov) * f.t()).sum()) if k.dense else float(((k.sketch.double() @ f) ** 2).sum())
            kept[layer] = 1.0 - seen / k.total if k.total > 0 else 1.0
            continue
        values, vectors = k.eig()
        p = _protected_rank(values, k.total, float(energy))
        ranks[layer] = p
        kept[layer] = float(values[:p].sum()) / k.total if k.total > 0 else 1.0
        if k.dense and projs.d_in - p < p:  # the free directions are fewer: keep those instead
            bases[layer], free[layer] = vectors[:, p:].float().contiguous(), True
        else:
            bases[layer], free[layer] = vectors[:, :p].float().contiguous(), False
    if examples is not None:
        energy = round(min(kept.values()), 6)
    short = sorted(layer for layer, share in kept.items() if share < energy - 1e-3)
    if short:
        warnings.warn(
            f"Layers {short} protect only {min(kept[layer] for layer in short):.3f} of the keys' energy "
            f"(energy={energy}): their sketch keeps max_rank={max_rank} directions. Raise max_rank.",
            stacklevel=2,
        )
    digest = hashlib.sha256()
    for s in seqs + (own if examples is not None else []):
        digest.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes())
    return Preservation(
        bases,
        free,
        ranks,
        kept,
        float(energy),
        projs.d_in,
        len(projs),
        tokens,
        len(seqs),
        digest.hexdigest(),
        None if examples is None else float(ratio),
        wanted_tokens,
    )
