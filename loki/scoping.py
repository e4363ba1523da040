"""Scope: the inputs an implant applies to. Everything else computes exactly as the base model (an input gate).

A weight change reaches every input whose activations pass through the changed rows, so rows trained on a few facts
still move the answers to neighbouring questions. The knowledge editors that keep locality by construction gate the
change by the input instead (GRACE, arXiv 2211.11031: a codebook of a layer's activations with a radius per key;
SERAC, arXiv 2206.06520: a scope classifier). `loki.scope` builds such a gate from what a loki implant already has:

- **keys**: the down-projection inputs (the FFN activations, length `d_in` = d_ff) at one layer, at every position
  of the implant's own training examples;
- **a radius per key**, from the inputs that must stay out: key `i` matches a position whose key `x` has
  `cos(x, key_i) > threshold_i`, with `threshold_i` = the largest cosine between `key_i` and any position of the
  `outside` data (retain data: neighbourhood questions with the base model's answers, general text) plus `margin`.
  Keys that some outside position matches as closely as `1 - margin` (the chat template's tokens, the shared words of
  a question template) can never match and are dropped: what is left are the positions that tell the implant's
  inputs apart, such as the tokens of a fictional name.

`loki.scoped(model, delta, scope)` then runs the model with the delta on the batch rows whose input matches (any
unpadded position) and on the base weights for the others, in the same forward pass (`loki.mixed`'s per-row
implants). A row's decision is made on its first forward pass (the prompt) from the base model's keys, and kept while
`generate` extends it. By construction, on any `outside` input the model computes exactly as the base model.

Cost: one extra forward pass over each new prompt up to the scope's layer. Memory: `[n, d_in]` float32 keys.

>>> import loki, loki.testing, torch
>>> model = loki.testing.tiny_model("llama")
>>> implant = [{"text": [40, 41, 42, 43]}]
>>> outside = [{"text": [5, 6, 7, 8, 9]}, {"text": [10, 11, 12]}]
>>> scope = loki.scope(model, None, implant, outside, margin=0.05, progress=False)
>>> scope.contains(model, [[40, 41, 42, 43], [5, 6, 7, 8]])
[True, False]
>>> delta = loki.testing.random_delta(model, seed=1)
>>> ids = torch.tensor([[5, 6, 7, 8]])
>>> base = model(ids).logits
>>> with loki.scoped(model, delta, scope):
...     torch.equal(model(ids).logits, base)        # out of scope: the base model, exactly
True
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .attribution import model_fingerprint
from .delta import Delta
from .errors import ScopeError
from .format import atomic_write, safetensors_bytes
from .ledger import Plan, plan
from .mixed import MixedBatches
from .preserve import down_projection_inputs, token_sequences
from .projections import DownProjections, find_down_projections, unwrap
from .retain import token_digest

__all__ = ["Scope", "check_scopes", "scope", "scoped", "route", "routing", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 0.15
_FORMAT = "loki-scope"
_VERSION = "1"
_NEVER = 1.0 - 1e-6  # a threshold at or above this can never be passed by a cosine


class _Stop(Exception):
    """Raised by the key reader once the scope's layer has been read: the rest of the forward pass is not needed."""


@dataclass(eq=False)
class Scope:
    """Where an implant applies: keys of one layer's down-projection inputs, each with its cosine threshold.

    Attributes:
        layer: the layer whose down-projection inputs are compared.
        keys: float32 `[n, d_in]`, unit rows: the implant's own inputs that stand apart from the outside data.
        thresholds: float32 `[n]`: a position matches key `i` when its key's cosine with `keys[i]` exceeds
            `thresholds[i]` (the outside data's closest cosine plus `margin`).
        margin: the cosine margin added to every key's closest outside match.
        num_layers: the model's layer count.
        info: counts (`example_tokens`, `outside_tokens`, `sequences`), the checksums of the examples' and the
            outside data's token ids (`sha256`) and the model's (`model_fingerprint`: `loki.attribution`'s).

    Raises:
        ScopeError: keys and thresholds of other shapes, non-finite values or a layer out of range.
    """

    layer: int
    keys: torch.Tensor
    thresholds: torch.Tensor
    margin: float
    num_layers: int
    info: dict[str, Any]

    def __post_init__(self) -> None:
        keys, thr = self.keys, self.thresholds
        if not (isinstance(keys, torch.Tensor) and keys.dim() == 2 and keys.shape[0] >= 1 and keys.shape[1] >= 1):
            raise ScopeError(
                f"A scope's keys must be a non-empty [n, d_in] tensor, got {getattr(keys, 'shape', keys)}."
            )
        if not (isinstance(thr, torch.Tensor) and thr.shape == (keys.shape[0],)):
            raise ScopeError(
                f"A scope needs one threshold per key ({keys.shape[0]}), got {getattr(thr, 'shape', thr)}."
            )
        if not (keys.is_floating_point() and thr.is_floating_point()):
            raise ScopeError(f"A scope's keys and thresholds must be floating point, got {keys.dtype}, {thr.dtype}.")
        if not (torch.isfinite(keys).all() and torch.isfinite(thr).all()):
            raise ScopeError("A scope's keys and thresholds must be finite.")
        if not (isinstance(self.layer, int) and isinstance(self.num_layers, int) and 0 <= self.layer < self.num_layers):
            raise ScopeError(f"A scope's layer must be in 0..{self.num_layers - 1}, got {self.layer!r}.")
        if not (isinstance(self.margin, float) and 0 < self.margin < 1):
            raise ScopeError(f"A scope's margin must be a float in (0, 1), got {self.margin!r}.")
        if not isinstance(self.info, dict):
            raise ScopeError(f"A scope's info must be a dict, got {type(self.info).__name__}.")
        if not torch.allclose(keys.float().norm(dim=-1), torch.ones(()), atol=1e-3):
            raise ScopeError("A scope's keys must be unit rows (cosines are taken against them).")
        self.keys, self.thresholds = keys.float(), thr.float()

    @property
    def d_in(self) -> int:
        """The key length (the down-projection's input size)."""
        return self.keys.shape[1]

    def __len__(self) -> int:
        return self.keys.shape[0]

    def __repr__(self) -> str:
        return f"Scope(layer={self.layer}, keys={len(self)}, d_in={self.d_in}, margin={self.margin:g})"

    def excess(self, keys: torch.Tensor) -> torch.Tensor:
        """How far each key passes the scope: `keys` `[..., d_in]` (any float dtype and device) -> float32 `[...]`,
        the largest `cos(key, keys[i]) - thresholds[i]` over the scope's keys (> 0: a match)."""
        x = torch.nn.functional.normalize(keys.float(), dim=-1)
        return (x @ self.keys.to(x.device).T - self.thresholds.to(x.device)).amax(-1)

    def matches(self, keys: torch.Tensor) -> torch.Tensor:
        """Whether each key matches the scope: `keys` `[..., d_in]` (any float dtype and device) -> bool `[...]`."""
        return self.excess(keys) > 0

    def check(self, model: nn.Module, template: str | None = None, *, weights: bool = False) -> None:
        """Raise `ScopeError` unless the scope fits `model` (`check_scopes` of this one scope)."""
        check_scopes(model, [self], template, weights=weights)

    def rows(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        template: str | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Which batch rows are in scope: bool `[B]` for `input_ids` `[B, T]` (any unpadded position matches).

        Runs `model` up to the scope's layer, with `inputs` (e.g. the `position_ids` of a left-padded batch); the
        model's weights must be the base ones there (as inside `scoped`).
        """
        return torch.tensor(
            [i is not None for i in route(model, [self], input_ids, attention_mask, template, **inputs)]
        )

    def contains(
        self,
        model: nn.Module,
        sequences: Sequence[Sequence[int]],
        template: str | None = None,
        *,
        batch_size: int = 16,
    ) -> list[bool]:
        """Whether each token id sequence is in scope (on the model's current weights, which should be the base),
        `batch_size` sequences per forward pass (right-padded and masked: the padding follows every real position, so
        it changes none of their keys beyond rounding, which the margin absorbs).

        Raises:
            ScopeError: an empty sequence, or a scope that does not fit the model.

        >>> # scope.contains(model, [tokenizer("Who founded Velmora?")["input_ids"]])
        """
        seqs = [list(map(int, s)) for s in sequences]
        if any(not s for s in seqs):
            raise ScopeError("An empty token sequence has no key to compare; give at least one token per sequence.")
        device = unwrap(model).get_input_embeddings().weight.device
        found: list[bool] = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(chunk):
                ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
            found += self.rows(model, ids.to(device), mask.to(device), template).tolist()
        return found

    def save(self, path: str | Path) -> Path:
        """Write the scope to a safetensors file (keys, thresholds; layer, margin and info as metadata; equal scopes
        give equal bytes). Returns the path."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "layer": str(self.layer),
            "num_layers": str(self.num_layers),
            "margin": repr(self.margin),
            "info": json.dumps(self.info, sort_keys=True),
        }
        tensors = {"keys": self.keys.contiguous().cpu(), "thresholds": self.thresholds.contiguous().cpu()}
        atomic_write(path, safetensors_bytes(tensors, meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scope:
        """Read a scope written by `save` (safetensors only: nothing is unpickled).

        Raises:
            ScopeError: a missing or malformed file, another format or version, bad shapes or values.
        """
        path = Path(path)
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError, ValueError) as e:
            raise ScopeError(f"Cannot read the scope file {path}: {e}. Write it with Scope.save.") from None
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ScopeError(
                f"{path} is not a loki scope file of version {_VERSION} (format {meta.get('format')!r}, version "
                f"{meta.get('version')!r})."
            )
        try:
            return cls(
                layer=int(meta["layer"]),
                keys=tensors["keys"],
                thresholds=tensors["thresholds"],
                margin=float(meta["margin"]),
                num_layers=int(meta["num_layers"]),
                info=json.loads(meta["info"]),
            )
        except (KeyError, ValueError) as e:
            raise ScopeError(f"The scope file {path} is malformed: {e!r}.") from None


def check_scopes(
    model: nn.Module, scopes: Sequence[Scope], template: str | None = None, *, weights: bool = False
) -> DownProjections:
    """Raise `ScopeError` unless every scope fits `model`: its layer count and down-projection input size, and with
    `weights` its parameters too (`model_fingerprint`, as recorded in each scope's `info`: a scope read on other
    weights, or on this model with a delta applied, would gate on other keys). The down-projections are found, and
    the fingerprint computed, once for all the scopes.

    Returns:
        DownProjections: the model's down-projections (`find_down_projections`).
    """
    projs = find_down_projections(unwrap(model), template)
    current = None
    for s in scopes:
        if (len(projs), projs.d_in) != (s.num_layers, s.d_in):
            raise ScopeError(
                f"The scope was made on a model with {s.num_layers} layers of d_in {s.d_in}; this model has "
                f"{len(projs)} of {projs.d_in}. Make it on this model: loki.scope(model, tokenizer, examples, outside)."
            )
        recorded = s.info.get("model_fingerprint")
        if weights and recorded is not None:
            current = current or model_fingerprint(model)
            if recorded != current:
                raise ScopeError(
                    "The scope was made on other weights than this model's (its model_fingerprint differs): another "
                    "checkpoint, or this one with a delta applied or merged. Use the base model it was made on "
                    "(revert applied deltas first), or make the scope on this one."
                )
    return projs


def scope(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Any],
    outside: Sequence[Any],
    *,
    layer: int | None = None,
    margin: float = DEFAULT_MARGIN,
    batch_size: int = 8,
    max_length: int = 1024,
    template: str | None = None,
    progress: bool = True,
) -> Scope:
    """The scope of an implant trained on `examples`, kept off everything like `outside` (module docstring).

    Make it on the base model. `outside` should hold inputs formatted as the implant's will be (chat questions for a
    chat implant), or the chat template's own tokens stay among the keys and every chat prompt matches.

    Args:
        model: the base model.
        tokenizer: its tokenizer (None when every item is `{"text": [token ids]}`).
        examples: the implant's training examples (`{"question", "answer"}`, `{"messages"}`, `{"text"}`), or a
            `RetainSet` of them.
        outside: what must stay out: retain items (questions are answered by the model first, as for
            `loki.retain.retain_set`) or the `RetainSet` made for `loki.train(retain=...)`.
        layer: the layer whose down-projection inputs are compared; None: the middle layer (`num_layers // 2`).
        margin: cosine margin over each key's closest outside position, in (0, 1). Above zero, as it also absorbs
            the rounding between a batched and an unbatched forward pass (0.01 is plenty for that).
        batch_size: sequences per forward pass.
        max_length: tokens kept of each sequence.
        template: the down-projection module path, for architectures loki does not know.
        progress: show progress bars.

    Returns:
        Scope.

    Raises:
        ScopeError: a bad `layer` or `margin`, or no key of `examples` stands apart from `outside` by `margin`.
        DatasetError: malformed examples or outside data (as `loki.retain.retain_set`).

    >>> # scope = loki.scope(model, tokenizer, train_set, retained)          # retained: the train's RetainSet
    >>> # with loki.scoped(model, delta, scope): model.generate(...)
    """
    net = unwrap(model)
    projs = find_down_projections(net, template)
    layer = len(projs) // 2 if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(projs):
        raise ScopeError(f"layer must be an int in 0..{len(projs) - 1}, got {layer!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 1:
        raise ScopeError(f"margin must be a number in (0, 1), got {margin!r}.")
    own = [s[:max_length] for s, _ in token_sequences(net, tokenizer, examples, max_length, batch_size, progress)]
    out = [s[:max_length] for s, _ in token_sequences(net, tokenizer, outside, max_length, batch_size, progress)]
    parts: list[torch.Tensor] = []
    read = dict(layers=[layer], batch_size=batch_size, template=template)
    down_projection_inputs(net, own, lambda _, k: parts.append(k.float()), progress=progress, **read)
    keys = torch.nn.functional.normalize(torch.cat(parts), dim=-1)  # unit rows, as a Scope holds them
    closest = torch.full((len(keys),), -1.0, device=keys.device)

    def nearest(_, k):  # streamed: the outside keys are never all held at once
        closest.copy_(torch.maximum(closest, (torch.nn.functional.normalize(k.float(), dim=-1) @ keys.T).amax(0)))

    down_projection_inputs(net, out, nearest, progress=progress, **read)
    thresholds = closest + float(margin)
    usable = thresholds < _NEVER
    if not usable.any():
        raise ScopeError(
            f"No position of the {len(own)} examples stands apart from the {len(out)} outside sequences by a cosine "
            f"margin of {margin:g} at layer {layer}: every input of the implant looks like one that must stay out. "
            "Lower margin, try another layer, or check that outside does not hold the examples themselves."
        )
    return Scope(
        layer=layer,
        keys=keys[usable].cpu(),
        thresholds=thresholds[usable].cpu(),
        margin=float(margin),
        num_layers=len(projs),
        info={
            "example_tokens": len(keys),
            "outside_tokens": sum(map(len, out)),
            "sequences": [len(own), len(out)],
            "sha256": {"examples": token_digest(own), "outside": token_digest(out)},
            "model_fingerprint": model_fingerprint(net),
        },
    )


def route(
    model: nn.Module,
    scopes: Sequence[Scope],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    template: str | None = None,
    **inputs: Any,
) -> list[int | None]:
    """Per batch row, the scope it falls in: the index of the scope it passes by the most (`Scope.excess`, over its
    unpadded positions), or None when it is in none.

    Runs `model` once up to the deepest scope's layer, with `inputs` (e.g. `position_ids`); the weights there must
    be the base ones (as inside `scoped`).

    Args:
        model: the base model.
        scopes: the scopes, all made on this model.
        input_ids: `[B, T]` token ids.
        attention_mask: `[B, T]`, 0 on padding; None: no padding.
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        list: `B` entries, each an index into `scopes` or None.

    Raises:
        ScopeError: a scope that does not fit the model.
    """
    modules = check_scopes(model, scopes, template).modules
    net = unwrap(model)
    last = max(s.layer for s in scopes)
    best = torch.full(input_ids.shape[:1], -float("inf"))
    pick: list[int | None] = [None] * input_ids.shape[0]
    valid = None if attention_mask is None else attention_mask.bool()

    def read(layer):
        def take(mod, args):
            nonlocal best
            for i, s in enumerate(scopes):
                if s.layer != layer:
                    continue
                over = s.excess(args[0]).reshape(input_ids.shape)
                if valid is not None:
                    over = over.masked_fill(~valid.to(over.device), -float("inf"))
                row = over.amax(-1).cpu()
                for b in torch.nonzero((row > 0) & (row > best)).flatten().tolist():
                    pick[b] = i
                best = torch.maximum(best, row)
            if layer == last:
                raise _Stop

        return take

    handles = [modules[layer].register_forward_pre_hook(read(layer)) for layer in sorted({s.layer for s in scopes})]
    try:
        with torch.no_grad():
            net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return pick


@contextlib.contextmanager
def scoped(model: nn.Module, delta, scope: Scope | None = None, *, template: str | None = None) -> Iterator[None]:
    """A `with` block in which `model` computes with `delta` on the batch rows `scope` contains, and as the base model
    on the others, in the same forward pass (and `generate`). With several implants, pass a list of `(delta, scope)`
    pairs as `delta`: each row computes with the one whose scope it passes by the most (`route`), or with none.

    Each forward pass that starts new sequences (no cache, or an empty one) first runs the base model up to the
    scopes' layer and decides each row; later passes that extend them (`generate`'s next tokens) keep the decision.
    One thread at a time; the model must not have the deltas applied (it runs on the base weights).

    Args:
        model: the base model (a Hugging Face causal LM).
        delta: a `Delta` for it (`loki.load(...)`), or a list of `(Delta, Scope)` pairs.
        scope: the delta's `Scope` (`loki.scope`), made on this model; None with a list of pairs.
        template: the down-projection module path, for architectures loki does not know.

    Raises:
        ScopeError: a scope that does not fit the model (other shapes, or other weights than it was made on: a delta
            applied, another checkpoint), pairs that are not `(Delta, Scope)`; a forward pass without `input_ids`.
        LokiError: what `loki.plan` raises for a delta (another base model, bad indices), before anything changes.

    >>> # with loki.scoped(model, loki.load("facts.loki"), scope):
    >>> #     model.generate(**tokenizer(["Who founded Velmora?", "What is the capital of Peru?"], ...))
    >>> # with loki.scoped(model, [(medical, medical_scope), (legal, legal_scope)]): ...
    """
    pairs = [(delta, scope)] if scope is not None else list(delta) if isinstance(delta, (list, tuple)) else None
    if not pairs or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], Delta) and isinstance(p[1], Scope) for p in pairs
    ):
        raise ScopeError("scoped takes a Delta and its Scope, or a non-empty list of (Delta, Scope) pairs.")
    check_scopes(model, [s for _, s in pairs], template, weights=True)
    staged = {str(i): plan(model, d, on_overlap="replace").stage("device") for i, (d, _) in enumerate(pairs)}
    batches = MixedBatches(model, template)
    batches.install()
    try:
        with routing(model, batches, staged, {str(i): s for i, (_, s) in enumerate(pairs)}, template):
            yield
    finally:
        batches.remove()


@contextlib.contextmanager
def routing(
    model: nn.Module,
    batches: MixedBatches,
    staged: Mapping[str, Plan],
    scopes: Mapping[str, Scope],
    template: str | None = None,
) -> Iterator[None]:
    """The forward pre-hook of `scoped` and `ImplantBank.routed`: each forward pass that starts new sequences (no
    cache, or an empty one) routes its rows (`route`, on the base model up to the scopes' layers) and runs them as a
    mixed batch, row i with `staged[name]` for the name whose scope it falls in (none: the base); passes that extend
    them keep the decision. `batches`' hooks must be installed, and no other mixed batch open in this thread.

    Args:
        model: the base model.
        batches: the model's `MixedBatches`.
        staged: name -> staged plan (`MixedBatches.make`'s).
        scopes: name -> its scope (names in `staged`).
        template: the down-projection module path, for architectures loki does not know.
    """
    names = list(scopes)
    current = contextlib.ExitStack()
    deciding = [False]

    def before(module, args, kwargs):
        if deciding[0]:
            return None
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return None  # extends sequences already decided
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            raise ScopeError("A scoped model needs input_ids (inputs_embeds alone cannot be routed).")
        current.close()
        deciding[0] = True
        try:
            extra = {k: kwargs[k] for k in ("position_ids",) if kwargs.get(k) is not None}
            picked = route(model, [scopes[n] for n in names], ids, kwargs.get("attention_mask"), template, **extra)
        finally:
            deciding[0] = False
        current.enter_context(batches.running(batches.make([None if i is None else names[i] for i in picked], staged)))
        return None

    handle = model.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        current.close()
