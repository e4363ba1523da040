"""Apply, revert and stack deltas in place on a loaded model, exactly.

Rules (also in README):
- `apply` validates everything (architecture, shapes, indices, base fingerprint, dtype range, overlaps) before
  the first weight is written; on any `LokiError` the model is unchanged.
- Deltas on disjoint rows stack in any order. Where a delta meets rows another active delta changed,
  `on_overlap` decides: "error" (default) raises `OverlapError`, "replace" writes this delta's rows,
  "add" adds this delta's change (its rows minus the base rows, in float32) to the current values.
- `revert` restores the model to exactly (bit for bit) what applying the remaining deltas, in their order,
  to the untouched base would give.

>>> import loki, torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> before = model.model.layers[1].mlp.down_proj.weight.clone()
>>> delta = loki.make_delta(model, {1: ([3, 7], torch.zeros(2, 32))})
>>> with loki.implanted(model, delta):
...     float(model.model.layers[1].mlp.down_proj.weight[3].abs().sum())
0.0
>>> torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
True
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .delta import Delta, fingerprint_positions, fingerprint_tolerance
from .errors import (
    BaseModelMismatchError,
    DtypeError,
    IncompatibleModelError,
    LokiError,
    OverlapError,
    RevertError,
    UnknownArchitectureError,
)
from .targets import DownProjections, find_down_projections

OVERLAP_POLICIES = ("error", "replace", "add")


@dataclass(eq=False)
class _LayerWrite:
    idx: torch.Tensor  # int64 row indices on the layer's device
    idx_np: np.ndarray  # the same on the CPU, for bookkeeping
    new: torch.Tensor  # the values written on rows no earlier delta touched, [k, d_in], layer dtype
    saved: torch.Tensor  # what this delta overwrote, [k, d_in]
    change: torch.Tensor | None  # float32 change, kept for "add" on rows an earlier delta touched


class Handle:
    """An applied delta. Holds exactly what it overwrote; `loki.revert(model, handle)` puts it back."""

    def __init__(
        self, model: nn.Module, projs: DownProjections, delta: Delta, on_overlap: str, layers: dict[int, _LayerWrite]
    ):
        self.delta = delta
        self._projs = projs
        self.on_overlap = on_overlap
        self._layers = layers
        self._model = weakref.ref(model)
        self.active = True

    def saved(self, layer: int) -> torch.Tensor:
        """The values of `layer`'s rows `delta.layers[layer].indices` that this delta overwrote."""
        return self._layers[layer].saved

    def revert(self) -> None:
        """Same as `loki.revert(model, handle)`."""
        model = self._model()
        if model is None:
            raise RevertError("The model this delta was applied to no longer exists.")
        revert(model, self)

    def __repr__(self) -> str:
        return f"Handle({self.delta.name or 'delta'!r}, rows={self.delta.num_rows}, active={self.active})"


class _State:
    """Per model: the active handles in application order, and how many of them touch each row."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.handles: list[Handle] = []
        self.counts: dict[int, np.ndarray] = {}


_states: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(model: nn.Module) -> _State:
    with _states_lock:
        state = _states.get(model)
        if state is None:
            state = _states[model] = _State()
        return state


def active(model: nn.Module) -> list[Handle]:
    """The deltas applied to `model`, in application order."""
    return list(_state(model).handles)


# -- apply ------------------------------------------------------------------------------------------
def apply(
    model: nn.Module,
    delta: Delta | str | os.PathLike,
    *,
    on_overlap: str = "error",
    check_base: bool = True,
    template: str | None = None,
) -> Handle:
    """Write `delta`'s rows into `model` in place (on each layer's device and dtype) and return a `Handle`.

    `delta` may be a `Delta` or anything `loki.load` accepts. `check_base=False` skips the base-model
    fingerprint check (only when you know better). See the module docstring for `on_overlap`.
    """
    if on_overlap not in OVERLAP_POLICIES:
        raise ValueError(f"on_overlap must be one of {OVERLAP_POLICIES}, not {on_overlap!r}.")
    if not isinstance(delta, Delta):
        from .api import load

        delta = load(delta)
    projs = compatible_projections(model, delta, template)
    state = _state(model)
    with state.lock, torch.no_grad():
        writes = _plan(state, projs, delta, on_overlap, check_base)
        # Nothing has been written yet; from here on nothing can fail.
        for layer, (write, values) in writes.items():
            projs.rows(layer).index_copy_(0, write.idx, values)
            _counts(state, projs, layer)[write.idx_np] += 1
        handle = Handle(model, projs, delta, on_overlap, {layer: w for layer, (w, _) in writes.items()})
        state.handles.append(handle)
    return handle


@dataclass(eq=False)
class _Group:
    """The layers of a delta that live on one device, with what applying them there needs besides their rows.
    Built once per device and kept on the delta: the hot path then does one allocation, one gather per layer
    and one fingerprint comparison for the whole group."""

    layers: list[int]
    idx: list[torch.Tensor]  # row indices on the device
    idx_np: list[np.ndarray]
    offsets: list[int]  # where each layer's [k, d_in] block of saved rows starts in the group's buffer
    numel: int
    samples: torch.Tensor  # flat positions of every layer's fingerprint samples in the group's buffer
    expected: torch.Tensor  # the fingerprints, concatenated, float32
    tolerance: torch.Tensor
    sample_layer: np.ndarray  # the layer each sample belongs to


def _groups(delta: Delta, projs: DownProjections) -> list[_Group]:
    devices = tuple(projs.rows(layer).device for layer in delta.layer_indices)
    groups = delta._staged.get(devices)
    if groups is None:
        groups = delta._staged[devices] = [
            _group(delta, [l for l, d in zip(delta.layer_indices, devices) if d == device], device)
            for device in dict.fromkeys(devices)
        ]
    return groups


def _group(delta: Delta, layers: list[int], device: torch.device) -> _Group:
    offsets, samples, sample_layer, numel = [], [], [], 0
    for layer in layers:
        ld = delta.layers[layer]
        a, b = fingerprint_positions(ld.k, ld.d_in)
        offsets.append(numel)
        samples.append(numel + a * ld.d_in + b)
        sample_layer.append(np.full(len(a), layer))
        numel += ld.k * ld.d_in
    expected = torch.cat([delta.layers[layer].fingerprint for layer in layers]).to(device)
    return _Group(
        layers, [delta.layers[l].indices.to(device) for l in layers], [delta.layers[l].indices.numpy() for l in layers],
        offsets, numel, torch.cat(samples).to(device), expected, fingerprint_tolerance(expected), np.concatenate(sample_layer),
    )


def _plan(
    state: _State, projs: DownProjections, delta: Delta, on_overlap: str, check_base: bool
) -> dict[int, tuple[_LayerWrite, torch.Tensor]]:
    writes: dict[int, tuple[_LayerWrite, torch.Tensor]] = {}
    bad_samples: list[torch.Tensor] = []
    for group in _groups(delta, projs):
        dtype = projs.rows(group.layers[0]).dtype
        saved = torch.empty(group.numel, dtype=dtype, device=group.expected.device)
        bases: dict[int, torch.Tensor] = {}  # base rows of layers where other deltas overwrote some rows
        in_block = True  # every layer's current rows sit in `saved` (false for a layer of another dtype)
        for layer, idx, idx_np, offset in zip(group.layers, group.idx, group.idx_np, group.offsets):
            ld = delta.layers[layer]
            view = projs.rows(layer)
            if not view.dtype.is_floating_point:
                raise DtypeError(
                    f"Layer {layer}'s down-projection weight is {view.dtype}; loki writes rows into float weights. "
                    "Apply deltas to an unquantized model (float32, bfloat16 or float16)."
                )
            if view.dtype == dtype:
                current = torch.index_select(view, 0, idx, out=saved[offset : offset + ld.k * ld.d_in].view(ld.k, ld.d_in))
            else:
                current, in_block = view.index_select(0, idx), False
            counts = state.counts.get(layer) if state.handles else None  # no active delta: nothing to overlap
            overlap = counts[idx_np] > 0 if counts is not None else None
            if overlap is None or not overlap.any():
                writes[layer] = (_LayerWrite(idx, idx_np, ld.new_rows(current).to(view.device, view.dtype), current, None), None)
                continue
            if on_overlap == "error":
                raise OverlapError(
                    f"Layer {layer}: {int(overlap.sum())} of this delta's {ld.k} rows are already changed by "
                    f"another active delta. Revert it first, or pass on_overlap='replace' (this delta wins) or "
                    f"on_overlap='add' (add this delta's change)."
                )
            base = bases[layer] = _base_rows(state, layer, idx_np, current)
            new = ld.new_rows(base).to(view.device, view.dtype)
            change, values = None, new
            if on_overlap == "add":
                change = ld.change(base).to(view.device)
                mask = torch.from_numpy(overlap).to(view.device)
                values = torch.where(mask[:, None], (current.float() + change).to(view.dtype), new)
            writes[layer] = (_LayerWrite(idx, idx_np, new, current, change), values)
        if check_base:
            sampled = torch.take(saved, group.samples) if in_block and not bases else _samples(group, writes, bases)
            bad_samples.append((sampled.float() - group.expected).abs() > group.tolerance)
    if bad_samples and any(bool(b.any()) for b in bad_samples):
        bad = np.unique(np.concatenate([g.sample_layer[b.cpu().numpy()] for g, b in zip(_groups(delta, projs), bad_samples)]))
        revision = delta.info["base_model"].get("revision")
        raise BaseModelMismatchError(
            f"The model's rows in layer(s) {bad.tolist()} do not match the base model this delta was made from "
            f"({delta.base_model or 'unnamed'}{', revision ' + revision if revision else ''}): another "
            "checkpoint or fine-tune. Apply it to that base model (any dtype or device is fine), or pass "
            "check_base=False if you know better."
        )
    for layer, (write, values) in writes.items():
        if values is None:
            values = write.new
        if values.dtype == torch.float16 and not bool(torch.isfinite(values).all()):
            raise DtypeError(
                f"Layer {layer}: the delta's rows overflow float16 (|value| > 65504). Load the model in "
                "bfloat16 or float32 to apply this delta."
            )
        writes[layer] = (write, values)
    return writes


def _samples(group: _Group, writes: dict, bases: dict[int, torch.Tensor]) -> torch.Tensor:
    """The fingerprint samples of a group, read from each layer's base rows (slow path: overlaps, mixed dtypes)."""
    parts = []
    for layer, offset in zip(group.layers, group.offsets):
        base = bases.get(layer, writes[layer][0].saved)
        mine = group.sample_layer == layer
        parts.append(torch.take(base, group.samples[torch.from_numpy(mine).to(group.samples.device)] - offset))
    return torch.cat([p.float() for p in parts])


def compatible_projections(model: nn.Module, delta: Delta, template: str | None = None) -> DownProjections:
    """The model's down-projections, after checking that `delta` was made for this architecture and shapes."""
    base = delta.info["base_model"]
    target = delta.info["target"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base.get("model_type") and model_type and base["model_type"] != model_type:
        raise IncompatibleModelError(
            f"This delta was made for a {base['model_type']} model ({base.get('architecture')}, "
            f"{base.get('id') or 'unnamed'}); the model is a {model_type} ({type(model).__name__}). "
            "Load the delta's base model to apply it."
        )
    try:
        projs = find_down_projections(model, template)
    except UnknownArchitectureError:
        if template is not None:
            raise
        projs = find_down_projections(model, target["template"])
    got = (len(projs), projs.d_out, projs.d_in)
    want = (target["num_layers"], target["d_out"], target["d_in"])
    if got != want:
        raise IncompatibleModelError(
            f"This delta was made for a model with {want[0]} layers and down-projections {want[1]}x{want[2]} "
            f"(d_model x d_ff); the model has {got[0]} layers of {got[1]}x{got[2]}. "
            f"Load {base.get('id') or 'its base model'} to apply it."
        )
    return projs


def _counts(state: _State, projs: DownProjections, layer: int) -> np.ndarray:
    counts = state.counts.get(layer)
    if counts is None:
        counts = state.counts[layer] = np.zeros(projs.d_out, dtype=np.int32)
    return counts


def _base_rows(state: _State, layer: int, idx_np: np.ndarray, current: torch.Tensor) -> torch.Tensor:
    """The untouched base values of rows `idx_np`: for each row, what the first active delta on it saved."""
    base = current.clone()
    filled = np.zeros(len(idx_np), dtype=bool)
    for handle in state.handles:
        w = handle._layers.get(layer)
        if w is None:
            continue
        hit = np.isin(idx_np, w.idx_np) & ~filled
        if hit.any():
            where = np.searchsorted(w.idx_np, idx_np[hit])
            base[torch.from_numpy(np.nonzero(hit)[0]).to(base.device)] = w.saved[torch.from_numpy(where).to(base.device)]
            filled |= hit
    return base


def base_rows(model: nn.Module, layer: int, indices: torch.Tensor, projs: DownProjections | None = None) -> torch.Tensor:
    """The base values of `indices` rows of `layer`, as if no loki delta were applied to `model`."""
    projs = projs or find_down_projections(model)
    view = projs.rows(layer)
    with torch.no_grad():
        current = view.index_select(0, indices.to(view.device))
        state = _states.get(model)
        if state is None or not state.handles:
            return current
        with state.lock:
            return _base_rows(state, layer, indices.cpu().numpy(), current)


# -- revert -----------------------------------------------------------------------------------------
def revert(model: nn.Module, handle: Handle) -> None:
    """Undo `handle` exactly: the model becomes what the other active deltas alone, in order, would make it."""
    state = _state(model)
    with state.lock, torch.no_grad():
        if handle._model() is not model or handle not in state.handles:
            why = "was already reverted or merged" if not handle.active else "belongs to another model"
            raise RevertError(f"This handle {why}; nothing to revert.")
        projs = handle._projs
        alone = len(state.handles) == 1  # no other delta can share its rows
        for layer, w in handle._layers.items():
            counts = state.counts[layer]
            counts[w.idx_np] -= 1
            view = projs.rows(layer)
            if not alone and counts[w.idx_np].any():
                _replay(state, view, layer, handle, w)
            else:
                view.index_copy_(0, w.idx, w.saved)
        state.handles.remove(handle)
        handle.active = False


def _replay(state: _State, view: torch.Tensor, layer: int, handle: Handle, w: _LayerWrite) -> None:
    """Revert `handle` on rows other deltas share: restore the base values of its rows, then re-apply the
    remaining deltas on those rows in order, updating what each of them saved."""
    view.index_copy_(0, w.idx, _base_rows(state, layer, w.idx_np, view.index_select(0, w.idx)))
    touched = np.zeros(len(w.idx_np), dtype=bool)  # rows of `w` already written by a remaining delta
    for other in state.handles:
        if other is handle:
            continue
        o = other._layers.get(layer)
        if o is None:
            continue
        hit = np.isin(o.idx_np, w.idx_np)
        if not hit.any():
            continue
        positions = torch.from_numpy(np.nonzero(hit)[0]).to(view.device)
        rows = o.idx[positions]
        current = view.index_select(0, rows)
        o.saved[positions] = current
        in_w = np.searchsorted(w.idx_np, o.idx_np[hit])
        values = o.new[positions]
        if o.change is not None:
            earlier = torch.from_numpy(touched[in_w]).to(view.device)
            values = torch.where(earlier[:, None], (current.float() + o.change[positions]).to(view.dtype), values)
        view.index_copy_(0, rows, values)
        touched[in_w] = True


# -- conveniences -----------------------------------------------------------------------------------
@contextlib.contextmanager
def implanted(model: nn.Module, *deltas: Delta | str | os.PathLike, on_overlap: str = "error") -> Iterator[list[Handle]]:
    """Apply `deltas` for the duration of a `with` block, then revert them (also on error).

    >>> # with loki.implanted(model, "medical.loki", "legal.loki"): model.generate(...)
    """
    handles: list[Handle] = []
    try:
        for d in deltas:
            handles.append(apply(model, d, on_overlap=on_overlap))
        yield handles
    finally:
        for h in reversed(handles):
            revert(model, h)


def merge(model: nn.Module) -> nn.Module:
    """Bake the active deltas into `model`: they stay written but can no longer be reverted.

    Then `model.save_pretrained(folder)` writes a plain Hugging Face checkpoint with the implants inside.
    """
    state = _state(model)
    with state.lock:
        for h in state.handles:
            h.active = False
        state.handles.clear()
        state.counts.clear()
    return model


__all__ = ["Handle", "LokiError", "active", "apply", "base_rows", "implanted", "merge", "revert"]
