"""The ledger of what loki has written into a model's weights: plan, apply, revert, stack, disable, merge.

Every write loki makes into a down-projection weight is recorded in one ledger, keyed by the weight tensor itself
(the `nn.Parameter`): a model reached through `torch.compile`, a `PeftModel`, DDP or any other wrapper, and two
layers that share one weight, all see the same rows, the same overlaps and the same applied deltas.

Rules (also in README):
- `plan` validates everything (architecture, shapes, indices, base fingerprint, dtype range, overlaps, rows being
  trained by `loki.prepare`) and computes the values to write, without writing; `Plan.commit()` writes them and
  returns a `Handle`. `apply` is `plan(...).commit()`. On any `LokiError` the weights and the ledger are unchanged.
- Deltas on disjoint rows stack in any order. Where a delta meets rows another applied delta changed, `on_overlap`
  decides: "error" (default) raises `OverlapError`, "replace" writes this delta's rows, "add" adds this delta's
  change (its rows minus the base rows, in float32) to the current values.
- `revert` restores the model to exactly (bit for bit) what applying the remaining deltas, in their order, to the
  untouched base would give. After `model.to(dtype)` or `.to(device)` it converts what it restores, so the model
  equals the converted base. If something else wrote into the delta's rows since it was applied (an optimizer
  step, `load_state_dict`), revert refuses with `ModelChangedError` before touching anything (`force=True`
  restores the saved rows anyway).

>>> import loki, torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> before = model.model.layers[1].mlp.down_proj.weight.clone()
>>> delta = loki.implant.make_delta(model, {1: ([3, 7], torch.zeros(2, 32))})
>>> with loki.implanted(model, delta):
...     float(model.model.layers[1].mlp.down_proj.weight[3].abs().sum())
0.0
>>> torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
True
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .delta import Delta, fingerprint_positions, fingerprint_tolerance
from .errors import (
    BaseModelMismatchError,
    DtypeError,
    IncompatibleModelError,
    LedgerError,
    LokiError,
    ModelChangedError,
    OffloadedWeightsError,
    OverlapError,
    ReplacedWeightsWarning,
    RevertError,
    StalePlanError,
    UnknownArchitectureError,
)
from .projections import DownProjections, find_down_projections

__all__ = [
    "Handle",
    "Plan",
    "applied",
    "apply",
    "base_rows",
    "claim_rows",
    "compatible_projections",
    "disabled",
    "implanted",
    "merge",
    "plan",
    "release_rows",
    "revert",
]

OVERLAP_POLICIES = ("error", "replace", "add")

# One lock for the whole ledger: switches are short, and a lock per weight would let two deltas that share a
# weight through different models interleave.
_LOCK = threading.RLock()
_SEQ = itertools.count()


# -- the ledger -------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Write:
    """One layer of one applied delta: which rows of which weight, what they held before and what was written."""

    handle: Handle | None  # None once reverted or merged (no reference cycle keeps the saved rows alive)
    layer: int
    weight: weakref.ref[torch.Tensor]
    transposed: bool
    idx: torch.Tensor  # the same, int64, on the weight's device at apply time
    idx_np: np.ndarray  # sorted row indices
    saved: torch.Tensor  # [k, d_in]: what the rows held before (dtype/device of that time)
    new: torch.Tensor  # [k, d_in]: this delta's rows over the base rows (dtype/device of that time)
    written: torch.Tensor  # [k, d_in]: what was written (differs from `new` for on_overlap="add")
    change: torch.Tensor | None  # float32 change, for "add" on rows an earlier delta touched
    record: _Record  # the weight's (a weak-keyed lookup costs more than the rest of a small write)
    probe: tuple | None = None  # cached by _probe


@dataclass(eq=False)
class _Record:
    """What the ledger knows about one weight tensor."""

    d_out: int
    writes: list[_Write] = field(default_factory=list)  # application order
    counts: np.ndarray | None = None  # per row: how many applied deltas wrote it
    training: np.ndarray | None = None  # per row: trained by a prepared model (`claim_rows`)
    trains: bool = False  # training.any(), kept by claim_rows/release_rows (skips a gather on the hot path)
    generation: int = 0  # bumped at every write, revert or claim
    disabled: bool = False  # inside `loki.disabled`
    version: int | None = None  # the weight's `_version` right after loki last wrote it: a later one means others wrote

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.d_out, dtype=np.int32)
        self.training = np.zeros(self.d_out, dtype=bool)


_records: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight tensor -> _Record


def _record(weight: torch.Tensor, d_out: int, create: bool = True) -> _Record | None:
    record = _records.get(weight)
    if record is None and create:
        record = _records[weight] = _Record(d_out)
    return record


def _view(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


def _like(t: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """`t` in `view`'s dtype and device (after the model was converted since `t` was stored)."""
    return t if (t.dtype == view.dtype and t.device == view.device) else t.to(view.device, view.dtype)


def _base(record: _Record, idx_np: np.ndarray, current: torch.Tensor) -> torch.Tensor:
    """The untouched base values of rows `idx_np` (`current` holds their present values): for each row, what the
    first applied delta on it saved."""
    if not record.counts[idx_np].any():
        return current
    base = current.clone()
    filled = np.zeros(len(idx_np), dtype=bool)
    for w in record.writes:
        hit = np.isin(idx_np, w.idx_np) & ~filled
        if hit.any():
            where = torch.from_numpy(np.searchsorted(w.idx_np, idx_np[hit])).to(w.saved.device)
            base[torch.from_numpy(np.nonzero(hit)[0]).to(base.device)] = _like(w.saved[where], base)
            filled |= hit
    return base


def _weights(projs: DownProjections) -> list[torch.Tensor]:
    return list({id(m.weight): m.weight for m in projs.modules}.values())


# -- handles ----------------------------------------------------------------------------------------------------
class Handle:
    """An applied delta: `loki.revert(model, handle)` (or `handle.revert()`) puts back exactly what it overwrote.

    Made by `Plan.commit` (so by `loki.apply`, `loki.implanted`, `ImplantBank`), not by hand.

    Attributes:
        delta: the applied `Delta`.
        on_overlap: the policy it was applied with ("error", "replace" or "add").
        applied: True until it is reverted or `loki.merge`d.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> handle = loki.apply(model, loki.testing.random_delta(model, name="x"))
    >>> handle
    Handle('x', rows=6, applied=True)
    >>> handle.revert(); handle.applied
    False
    """

    def __init__(self, model: nn.Module, delta: Delta, on_overlap: str, template: str | None = None):
        self.delta = delta
        self.on_overlap = on_overlap
        self.applied = True
        self._model = weakref.ref(model)
        self._template = template  # the one that found the down-projections
        self._writes: dict[int, _Write] = {}
        self._seq = next(_SEQ)

    def saved(self, layer: int) -> torch.Tensor:
        """What `layer`'s rows `delta.layers[layer].indices` held just before this delta wrote them: what revert puts
        back where no other applied delta shares the rows (updated when a delta applied earlier on them is reverted).

        Args:
            layer: a layer of `delta`.

        Returns:
            torch.Tensor: `[k, d_in]`, in the weight's dtype and device at apply time.

        Raises:
            KeyError: `layer` is not one of `delta.layer_indices`.
        """
        return self._writes[layer].saved

    @property
    def lost(self) -> bool:
        """True when the model it was applied through no longer computes with (some of) the weights this delta was
        written into: they were replaced (`load_state_dict(..., assign=True)`, a new `nn.Parameter`, a swapped
        module), so its rows are no longer in the model although it is `applied`. `revert` then restores the old
        weights where they still exist; `loki.ImplantBank` re-applies lost implants on the new weights.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> h = loki.apply(model, loki.testing.random_delta(model))
        >>> h.lost
        False
        >>> model.load_state_dict(loki.testing.tiny_model("llama").state_dict(), assign=True)
        <All keys matched successfully>
        >>> h.lost
        True
        """
        model = self._model()
        if model is None or not self.applied:
            return self.applied
        try:
            return bool(_replaced(self, find_down_projections(model, self._template)))
        except LokiError:
            return True

    def check(self) -> None:
        """Raise `ModelChangedError` when something other than loki wrote into rows only this delta holds since it
        was applied (an optimizer step, `load_state_dict` copying a checkpoint in): what `revert` checks first. Costs
        nothing while the weights' versions say only loki wrote them.

        Raises:
            ModelChangedError: as `loki.revert`.
            RevertError: it was reverted or merged.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> h = loki.apply(model, loki.testing.random_delta(model, seed=1))
        >>> h.check()
        >>> with torch.no_grad():
        ...     _ = model.model.layers[0].mlp.down_proj.weight.zero_()
        >>> h.check()
        Traceback (most recent call last):
        ...
        loki.errors.ModelChangedError: Layer(s) [0]: the rows this delta wrote were changed since it was applied ...
        """
        with _LOCK, torch.no_grad():
            if not self.applied:
                raise RevertError("This handle was already reverted or merged.")
            live = {layer: w for layer, w in self._writes.items() if w.weight() is not None}
            _check_unchanged(live, {layer: w.record for layer, w in live.items()})

    def revert(self, *, force: bool = False) -> None:
        """`loki.revert(model, handle)` on the model it was applied through (same `force`, same errors).

        Raises:
            RevertError: that model no longer exists (or as `loki.revert`).
        """
        model = self._model()
        if model is None:
            raise RevertError("The model this delta was applied to no longer exists.")
        revert(model, self, force=force)

    def __repr__(self) -> str:
        return f"Handle({self.delta.name or 'delta'!r}, rows={self.delta.num_rows}, applied={self.applied})"


def applied(model: nn.Module, *, template: str | None = None) -> list[Handle]:
    """The deltas applied to `model`'s down-projection weights, through any path to them, in application order
    (an `ImplantBank`'s active implants included).

    Args:
        model: a model, or a wrapper of one (`torch.compile`, PEFT, DDP).

    Returns:
        list[Handle]: oldest first; `[]` for a model of an architecture loki does not know, even when deltas were
        applied to it with `template=` (this function takes no template).

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> h = loki.apply(model, loki.testing.random_delta(model, name="a"))
    >>> [x.delta.name for x in loki.applied(model)]
    ['a']
    >>> loki.revert(model, h); loki.applied(model)
    []
    """
    try:
        projs = find_down_projections(model, template)
    except UnknownArchitectureError:
        return []
    with _LOCK:
        handles = {w.handle for weight in _weights(projs) if (r := _records.get(weight)) for w in r.writes}
    return sorted(handles, key=lambda h: h._seq)


# -- plan -------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Planned:
    """One layer of a plan."""

    weight: torch.Tensor
    transposed: bool
    idx: torch.Tensor  # int64 row indices on the weight's device
    idx_np: np.ndarray
    # the delta's rows over the base rows, [k, d_in], weight dtype (and device, unless staged on host)
    new: torch.Tensor
    values: torch.Tensor | None  # what commit writes given the ledger at planning time (None once staged)
    saved: torch.Tensor | None  # the rows' values at planning time
    change: torch.Tensor | None
    overlap: np.ndarray | None  # rows other applied deltas wrote, at planning time
    record: _Record  # the weight's ledger record


class Plan:
    """A validated delta with the exact values it writes into one model, computed without writing anything.

    `plan.commit()` writes them and returns the `Handle` (what `loki.apply` does in one go). A plan can be
    committed again after its handle is reverted (the fast path of `loki.ImplantBank`): commit re-checks the
    ledger and raises `StalePlanError` when the model's dtype or device changed, or when the rows it would write
    now overlap applied deltas in a way the plan did not compute; make a new plan then.

    Made by `loki.plan`. Attributes: `delta`, `on_overlap`, `layers`, `nbytes`.
    """

    def __init__(
        self,
        model: nn.Module,
        delta: Delta,
        on_overlap: str,
        layers: dict[int, _Planned],
        stamp: dict,
        check_base: bool = True,
        template: str | None = None,
    ):
        self._model = weakref.ref(model)
        self.delta = delta
        self.on_overlap = on_overlap
        self._layers = layers
        self._stamp = stamp  # id(weight) -> (generation, version, dtype, device) at planning time
        self._check_base = check_base
        self._template = template  # the one that found the down-projections

    @property
    def layers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`{layer: (indices, rows)}`: int64 row indices on the weight's device, and this delta's rows over the base
        rows in the model's dtype (on the model's device; on the host after `stage("host")`): what a commit writes
        onto rows no other applied delta touches."""
        return {layer: (p.idx, p.new) for layer, p in self._layers.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the planned rows and indices take (what an `ImplantBank`'s `budget` counts)."""
        return sum(p.new.numel() * p.new.element_size() + p.idx.numel() * 8 for p in self._layers.values())

    def commit(self) -> Handle:
        """Write the planned rows into the model and record them in the ledger.

        When the ledger and the weights are as at planning time, commit writes the values the plan computed;
        otherwise (a later commit, a staged plan) it re-reads the rows and re-checks overlaps. It does not re-check
        the base fingerprint: a plan committed after something outside loki replaced the weights (e.g.
        `load_state_dict` of another checkpoint) writes its rows without a `BaseModelMismatchError`.

        Returns:
            Handle: reverts what this commit wrote.

        Raises:
            StalePlanError: the model no longer exists; its down-projections changed dtype or device since planning,
                or the model no longer computes with the weights planned for (`load_state_dict(..., assign=True)`, a
                swapped module: `replaced`); or, with `on_overlap` "replace" or "add", applied deltas now hold some
                of the plan's rows and the ledger or the weights changed since the plan computed them (make a new
                plan).
            OffloadedWeightsError: the model was offloaded since planning.
            OverlapError: with `on_overlap="error"`, applied deltas now hold some of the plan's rows (this plan's
                own handle too, while it is applied); or a prepared model now trains some of them.
            LedgerError: inside `loki.disabled(model)`, on a weight that holds applied deltas.

        Nothing is written when one is raised.

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> p = loki.plan(model, loki.testing.random_delta(model, seed=1))
        >>> h = p.commit(); loki.revert(model, h)
        >>> h = p.commit()  # again, after the revert (what ImplantBank does)
        >>> p.commit()
        Traceback (most recent call last):
        ...
        loki.errors.OverlapError: Layer 0: 3 of this delta's 3 rows are already changed by another applied delta. ...
        """
        model = self._model()
        if model is None:
            raise StalePlanError("The model this plan was made for no longer exists.")
        with _LOCK, torch.no_grad():
            writes = self._check()
            handle = Handle(model, self.delta, self.on_overlap, self._template)
            for layer, (p, values, saved) in writes.items():
                _view(p.weight, p.transposed).index_copy_(0, p.idx, values)
                record = p.record
                record.counts[p.idx_np] += 1
                record.generation += 1
                w = _Write(
                    handle,
                    layer,
                    weakref.ref(p.weight),
                    p.transposed,
                    p.idx,
                    p.idx_np,
                    saved,
                    p.new,
                    values,
                    p.change,
                    record,
                )
                record.writes.append(w)
                handle._writes[layer] = w
            for p in self._layers.values():
                p.record.version = p.weight._version
            self._drop_snapshot()
        return handle

    def stage(self, store: str = "device") -> Plan:
        """Keep this plan for repeated commits (what `loki.ImplantBank` does): drop the rows read at planning time
        (every commit then reads them again).

        Args:
            store: "device" keeps the planned rows where the model is; "host" moves them to host memory (pinned
                when the model is on a GPU), copied over at each commit.

        Returns:
            Plan: this plan.

        Raises:
            LedgerError: `store` is neither "device" nor "host".

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> p = loki.plan(model, loki.testing.random_delta(model)).stage("host")
        >>> loki.revert(model, p.commit())
        """
        if store not in ("device", "host"):
            raise LedgerError(f"store must be 'device' or 'host', not {store!r}.")
        self._drop_snapshot()
        if store == "host":
            for p in self._layers.values():
                if p.new.device.type != "cpu":
                    p.new = p.new.to("cpu").pin_memory()
        return self

    @property
    def replaced(self) -> list[int]:
        """Layers whose planned weight the model no longer computes with: the weight was replaced
        (`load_state_dict(..., assign=True)`, `module.weight = nn.Parameter(...)`) or a module on the way swapped
        since planning; every layer when the model no longer exists or its down-projections cannot be found.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> p = loki.plan(model, loki.testing.random_delta(model))
        >>> model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(32, 64))
        >>> p.replaced
        [1]
        """
        model = self._model()
        try:
            projs = find_down_projections(model, self._template) if model is not None else None
        except LokiError:
            projs = None
        if projs is None or len(projs) <= max(self._layers, default=0):
            return list(self._layers)
        return [layer for layer, p in self._layers.items() if projs.modules[layer].weight is not p.weight]

    @property
    def current(self) -> bool:
        """False once the model's down-projections changed dtype or device since planning, or the model no longer
        computes with the planned weights (`replaced`): `commit` would raise `StalePlanError`, make a new plan.
        (Overlaps are checked by `commit`, not here.)

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> p = loki.plan(model, loki.testing.random_delta(model))
        >>> p.current
        True
        >>> _ = model.to(torch.bfloat16); p.current
        False
        """
        for p in self._layers.values():
            view = _view(p.weight, p.transposed)
            if (view.dtype, view.device) != self._stamp[id(p.weight)][2:]:
                return False
        return not self.replaced

    def _drop_snapshot(self) -> None:
        for p in self._layers.values():
            p.values = p.saved = None
        self._stamp = {k: (-1, *v[1:]) for k, v in self._stamp.items()}  # never fresh again

    def _check(self) -> dict[int, tuple[_Planned, torch.Tensor, torch.Tensor]]:
        """Validate against the ledger now; returns per layer (planned, values to write, current rows)."""
        replaced = self.replaced
        if replaced:
            find_down_projections(self._model(), self._template)  # an offloaded model says so
            raise StalePlanError(
                f"Layer(s) {replaced}: the model no longer computes with the weights this plan was made for (replaced "
                "by load_state_dict(..., assign=True), a new nn.Parameter or a swapped module). Make a new plan "
                "(loki.plan / loki.apply), which checks the new weights against the delta's base model."
            )
        fresh = True
        for p in self._layers.values():
            view = _view(p.weight, p.transposed)
            generation, version, dtype, device = self._stamp[id(p.weight)]
            if (view.dtype, view.device) != (dtype, device):
                raise StalePlanError(
                    f"The model's down-projections are now {view.dtype} on {view.device}; this plan was made for "
                    f"{dtype} on {device}. Make a new plan (loki.plan / loki.apply)."
                )
            record = p.record
            _refuse_if_disabled(record, "apply")
            now = record.generation
            fresh &= now == generation and p.weight._version == version
        if fresh:
            return {layer: (p, p.values, p.saved) for layer, p in self._layers.items()}
        out = {}
        for layer, p in self._layers.items():
            record = p.record
            known = record.version if record.version is not None else self._stamp[id(p.weight)][1]
            if record.writes and (record.counts[p.idx_np] > 0).any():  # (no writes: no counts)
                if self.on_overlap == "error":
                    raise _overlap_error(layer, int((record.counts[p.idx_np] > 0).sum()), len(p.idx_np))
                raise StalePlanError(
                    f"Layer {layer}: applied deltas changed this plan's rows since it was made; make a new plan."
                )
            if record.trains and record.training[p.idx_np].any():
                raise _training_error(layer)
            view = _view(p.weight, p.transposed)
            current = view.index_select(0, p.idx)
            if self._check_base and p.weight._version != known:  # written by someone else since: the base again
                _check_fingerprint(self.delta, layer, current)
            out[layer] = (p, p.new.to(view.device, non_blocking=True), current)
        return out


def plan(
    model: nn.Module,
    delta: Delta,
    *,
    on_overlap: str = "error",
    check_base: bool = True,
    template: str | None = None,
) -> Plan:
    """Validate `delta` against `model` and compute what applying it writes, without writing anything.

    The checks are formats/SPEC.md §7 step 5 (architecture and shapes, the base fingerprint of §6, dtype,
    overlaps), plus rows a prepared model trains; what is written is §5's (the rows, or base + A @ B for a LoRA-form
    delta, in the model's dtype), with the overlap policies of §8.

    Args:
        model: a transformers causal LM (or any wrapper of one: `torch.compile`, PEFT, DDP).
        delta: a `Delta` (`loki.load` reads files and Hub repos).
        on_overlap: where applied deltas already changed some of its rows: "error", "replace" or "add" (module
            docstring).
        check_base: compare the delta's base fingerprint with the model's rows (skip only when you know better).
        template: the down-projection module path, for architectures loki does not know (else the model type's
            template, then the delta's).

    Returns:
        Plan: `plan.commit()` applies it.

    Raises:
        LedgerError: `on_overlap` is not one of the three; `delta` is not a `Delta`; inside `loki.disabled(model)`,
            on a weight that holds applied deltas.
        IncompatibleModelError: the delta was made for another `model_type`, or other layer count or shapes.
        UnknownArchitectureError: no down-projections found (`template`, or else neither the model type's template
            nor the delta's matches).
        DtypeError: the weights are not floats, or the rows overflow a float16 model.
        OverlapError: applied deltas hold some of its rows and `on_overlap="error"`; a prepared model trains some
            of them (any policy); two layers that share one weight would get the same row.
        BaseModelMismatchError: the fingerprint does not match the model's base rows (with `check_base`).

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> p = loki.plan(model, loki.testing.random_delta(model, seed=1))
    >>> handle = p.commit(); loki.revert(model, handle)
    """
    if on_overlap not in OVERLAP_POLICIES:
        raise LedgerError(f"on_overlap must be one of {OVERLAP_POLICIES}, not {on_overlap!r}.")
    if not isinstance(delta, Delta):
        raise LedgerError(f"plan/apply take a loki.Delta, not {type(delta).__name__}; read files with loki.load(path).")
    projs = compatible_projections(model, delta, template)
    with _LOCK, torch.no_grad():
        return _plan(model, projs, delta, on_overlap, check_base)


def _plan(model: nn.Module, projs: DownProjections, delta: Delta, on_overlap: str, check_base: bool) -> Plan:
    layers: dict[int, _Planned] = {}
    stamp: dict[int, tuple] = {}
    bad_samples: list[tuple[_Group, torch.Tensor]] = []
    seen: dict[int, list[tuple[int, np.ndarray]]] = {}  # id(weight) -> layers of this delta on it (tied weights)
    for group in _groups(delta, projs):
        dtype = projs.rows(group.layers[0]).dtype
        saved = torch.empty(group.numel, dtype=dtype, device=group.expected.device)
        bases: dict[int, torch.Tensor] = {}  # base rows of layers where other deltas overwrote some rows
        in_block = True  # every layer's current rows sit in `saved` (false for a layer of another dtype)
        for layer, idx, idx_np, offset in zip(group.layers, group.idx, group.idx_np, group.offsets):
            ld = delta.layers[layer]
            weight = projs.modules[layer].weight
            view = projs.rows(layer)
            if not view.dtype.is_floating_point:
                raise DtypeError(
                    f"Layer {layer}'s down-projection weight is {view.dtype}; loki writes rows into float weights. "
                    "Apply deltas to an unquantized model (float32, bfloat16 or float16)."
                )
            _check_tied(seen, weight, layer, idx_np)
            record = _record(weight, view.shape[0])
            _refuse_if_disabled(record, "apply")
            if record.trains and record.training[idx_np].any():
                raise _training_error(layer)
            stamp[id(weight)] = (record.generation, weight._version, view.dtype, view.device)
            if view.dtype == dtype:
                current = torch.index_select(
                    view, 0, idx, out=saved[offset : offset + ld.k * ld.d_in].view(ld.k, ld.d_in)
                )
            else:
                current, in_block = view.index_select(0, idx), False
            overlap = record.counts[idx_np] > 0 if record.writes else None
            if overlap is None or not overlap.any():
                new = ld.new_rows(current).to(view.device, view.dtype)
                layers[layer] = _Planned(weight, projs.transposed, idx, idx_np, new, new, current, None, None, record)
                continue
            if on_overlap == "error":
                raise _overlap_error(layer, int(overlap.sum()), ld.k)
            base = bases[layer] = _base(record, idx_np, current)
            new = ld.new_rows(base).to(view.device, view.dtype)
            change, values = None, new
            if on_overlap == "add":
                change = ld.change(base).to(view.device)
                mask = torch.from_numpy(overlap).to(view.device)
                values = torch.where(mask[:, None], (current.float() + change).to(view.dtype), new)
            layers[layer] = _Planned(
                weight, projs.transposed, idx, idx_np, new, values, current, change, overlap, record
            )
        if check_base:
            sampled = torch.take(saved, group.samples) if in_block and not bases else _samples(group, layers, bases)
            bad_samples.append((group, (sampled.float() - group.expected).abs() > group.tolerance))
    if bad_samples and any(bool(b.any()) for _, b in bad_samples):
        bad = np.unique(np.concatenate([g.sample_layer[b.cpu().numpy()] for g, b in bad_samples]))
        revision = delta.info["base_model"].get("revision")
        raise BaseModelMismatchError(
            f"The model's rows in layer(s) {bad.tolist()} do not match the base model this delta was made from "
            f"({delta.base_model or 'unnamed'}{', revision ' + revision if revision else ''}): another "
            "checkpoint or fine-tune. Apply it to that base model (any dtype or device is fine), or pass "
            "check_base=False if you know better."
        )
    for layer, p in layers.items():
        if p.values.dtype == torch.float16 and not bool(torch.isfinite(p.values).all()):
            raise DtypeError(
                f"Layer {layer}: the delta's rows overflow float16 (|value| > 65504). Load the model in "
                "bfloat16 or float32 to apply this delta."
            )
    return Plan(model, delta, on_overlap, layers, stamp, check_base, projs.template)


def _check_tied(seen: dict, weight: torch.Tensor, layer: int, idx_np: np.ndarray) -> None:
    for other, other_idx in seen.setdefault(id(weight), []):
        if np.isin(idx_np, other_idx).any():
            raise OverlapError(
                f"Layers {other} and {layer} share one down-projection weight, and this delta writes some of the same "
                "rows in both. A delta for tied weights must give each row once."
            )
    seen[id(weight)].append((layer, idx_np))


def _check_fingerprint(delta: Delta, layer: int, current: torch.Tensor) -> None:
    """Raise BaseModelMismatchError unless `current` (the rows' values now, `[k, d_in]`) match the delta's base
    fingerprint (SPEC.md section 6)."""
    ld = delta.layers[layer]
    a, b = _positions(ld.k, ld.d_in, current.device)
    expected = ld.fingerprint.to(current.device)
    if bool(((current[a, b].float() - expected).abs() > fingerprint_tolerance(expected)).any()):
        raise BaseModelMismatchError(
            f"Layer {layer}: the model's rows no longer match the base model this plan was made for (something "
            f"loaded other weights since; {delta.base_model or 'unnamed'}). Load that base model, or make a new "
            "plan with check_base=False if you know better."
        )


def _refuse_if_disabled(record: _Record | None, verb: str) -> None:
    if record is not None and record.disabled:
        raise LedgerError(
            f"The model's implants are disabled (inside `with loki.disabled(model)`); {verb} after the block."
        )


def _overlap_error(layer: int, n: int, k: int) -> OverlapError:
    return OverlapError(
        f"Layer {layer}: {n} of this delta's {k} rows are already changed by another applied delta. Revert it "
        "first, or pass on_overlap='replace' (this delta wins) or on_overlap='add' (add this delta's change)."
    )


def _training_error(layer: int) -> OverlapError:
    return OverlapError(
        f"Layer {layer}: some of this delta's rows are being trained (the model is prepared with loki.prepare); the "
        "next forward would overwrite them. Apply it after loki.unprepare(model), or select other rows to train."
    )


@dataclass(eq=False)
class _Group:
    """The layers of a delta that live on one device, with what checking them there needs besides their rows.
    Built once per device and cached per delta: the hot path then does one allocation, one gather per layer and
    one fingerprint comparison for the whole group."""

    layers: list[int]
    idx: list[torch.Tensor]  # row indices on the device
    idx_np: list[np.ndarray]
    offsets: list[int]  # where each layer's [k, d_in] block of saved rows starts in the group's buffer
    numel: int
    samples: torch.Tensor  # flat positions of every layer's fingerprint samples in the group's buffer
    expected: torch.Tensor  # the fingerprints, concatenated, float32
    tolerance: torch.Tensor
    sample_layer: np.ndarray  # the layer each sample belongs to


_group_cache: weakref.WeakKeyDictionary[Delta, dict] = weakref.WeakKeyDictionary()


def _groups(delta: Delta, projs: DownProjections) -> list[_Group]:
    devices = tuple(projs.rows(layer).device for layer in delta.layer_indices)
    per_delta = _group_cache.setdefault(delta, {})
    groups = per_delta.get(devices)
    if groups is None:
        groups = per_delta[devices] = [
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
        layers,
        [delta.layers[l].indices.to(device) for l in layers],
        [delta.layers[l].indices.numpy() for l in layers],
        offsets,
        numel,
        torch.cat(samples).to(device),
        expected,
        fingerprint_tolerance(expected),
        np.concatenate(sample_layer),
    )


def _samples(group: _Group, layers: dict[int, _Planned], bases: dict[int, torch.Tensor]) -> torch.Tensor:
    """The fingerprint samples of a group, read from each layer's base rows (slow path: overlaps, mixed dtypes)."""
    parts = []
    for layer, offset in zip(group.layers, group.offsets):
        base = bases.get(layer, layers[layer].saved)
        mine = group.sample_layer == layer
        parts.append(torch.take(base, group.samples[torch.from_numpy(mine).to(group.samples.device)] - offset))
    return torch.cat([p.float() for p in parts])


def compatible_projections(model: nn.Module, delta: Delta, template: str | None = None) -> DownProjections:
    """The model's down-projections, after checking that `delta` was made for this architecture and shapes
    (formats/SPEC.md §7 step 5; no fingerprint).

    Args:
        model: the model (or a wrapper of one).
        delta: the delta.
        template: the down-projection module path; None: the model type's template, else the delta's.

    Returns:
        DownProjections.

    Raises:
        IncompatibleModelError: the delta records another `model_type`, or another layer count or row shape.
        UnknownArchitectureError: `template` matches nothing, or (without it) neither the model type's template
            nor the delta's does.

    >>> import loki, loki.testing
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"))
    >>> projs = compatible_projections(loki.testing.tiny_model("llama"), delta)
    >>> len(projs), projs.d_out, projs.d_in
    (2, 32, 64)
    >>> compatible_projections(loki.testing.tiny_model("llama", d_model=64), delta)
    Traceback (most recent call last):
    ...
    loki.errors.IncompatibleModelError: This delta was made for a model with 2 layers and down-projections 32x64 ...
    """
    base = delta.info["base_model"]
    proj = delta.info["down_projection"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base.get("model_type") and model_type and base["model_type"] != model_type:
        raise IncompatibleModelError(
            f"This delta was made for a {base['model_type']} model ({base.get('architecture')}, "
            f"{base.get('id') or 'unnamed'}); the model is a {model_type} ({type(model).__name__}). "
            "Load the delta's base model to apply it (loki.models.load_base(delta))."
        )
    try:
        projs = find_down_projections(model, template)
    except UnknownArchitectureError:
        if template is not None:
            raise
        projs = find_down_projections(model, proj["template"])
    got = (len(projs), projs.d_out, projs.d_in)
    want = (proj["num_layers"], proj["d_out"], proj["d_in"])
    if got != want:
        raise IncompatibleModelError(
            f"This delta was made for a model with {want[0]} layers and down-projections {want[1]}x{want[2]} "
            f"(d_model x d_ff); the model has {got[0]} layers of {got[1]}x{got[2]}. "
            f"Load {base.get('id') or 'its base model'} to apply it."
        )
    return projs


# -- apply ------------------------------------------------------------------------------------------------------
def apply(
    model: nn.Module,
    delta: Delta,
    *,
    on_overlap: str = "error",
    check_base: bool = True,
    template: str | None = None,
) -> Handle:
    """Write `delta`'s rows into `model` in place (on each layer's device and dtype) and return a `Handle`.

    `apply(model, delta)` is `plan(model, delta).commit()`; the arguments are `plan`'s. The top-level `loki.apply`
    (loki.sources) also takes a path or Hub id.

    Returns:
        Handle: `loki.revert(model, handle)` undoes it.

    Raises:
        LedgerError, IncompatibleModelError, UnknownArchitectureError, DtypeError, OverlapError,
        BaseModelMismatchError: as `plan`. Nothing is written when one is raised.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> handle = loki.apply(model, loki.testing.random_delta(model, seed=1))
    >>> loki.revert(model, handle)
    >>> loki.apply(model, loki.testing.random_delta(loki.testing.tiny_model("llama", seed=5)))
    Traceback (most recent call last):
    ...
    loki.errors.BaseModelMismatchError: The model's rows in layer(s) [0, 1] do not match the base model ...
    """
    return plan(model, delta, on_overlap=on_overlap, check_base=check_base, template=template).commit()


# -- revert -----------------------------------------------------------------------------------------------------
def revert(model: nn.Module, handle: Handle, *, force: bool = False) -> None:
    """Undo `handle` exactly: the model becomes what the other applied deltas alone, in order, would make it
    (formats/SPEC.md §8); after a dtype or device change it converts what it restores.

    Args:
        model: the model the delta was applied to, through any path to its weights.
        handle: from `apply` / `Plan.commit`.
        force: restore the saved rows even where something else wrote into them since the apply.

    Raises:
        RevertError: the handle was already reverted or merged; its weights are not `model`'s; its weights no
            longer exist.
        ModelChangedError: something else wrote into rows only this delta holds since it was applied (an
            optimizer step, `load_state_dict`), unless `force`.
        LedgerError: inside `loki.disabled(model)`.
        UnknownArchitectureError: loki cannot find the model's down-projections (any more).
        OffloadedWeightsError: the model was offloaded since the apply (its weights are on the meta device).
        DtypeError: replaying `on_overlap="add"` deltas applied after this one onto the base rows overflows a
            float16 model (revert those first).

    Nothing is written when one is raised. Where the model no longer computes with some of the weights the delta
    was written into (replaced since: `Handle.lost`), revert restores those old tensors and warns
    (`ReplacedWeightsWarning`): the model's current weights hold whatever was loaded into them.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> before = model.model.layers[0].mlp.down_proj.weight.clone()
    >>> h = loki.apply(model, loki.testing.random_delta(model))
    >>> loki.revert(model, h)
    >>> torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    True
    >>> loki.revert(model, h)
    Traceback (most recent call last):
    ...
    loki.errors.RevertError: This handle was already reverted or merged; nothing to revert.
    """
    if not isinstance(handle, Handle):
        raise RevertError(f"revert takes the Handle that loki.apply returned, not {type(handle).__name__}.")
    with _LOCK, torch.no_grad():
        if not handle.applied:
            raise RevertError("This handle was already reverted or merged; nothing to revert.")
        projs = find_down_projections(model, handle._template)  # an offloaded model says so
        replaced = _replaced(handle, projs)
        owner = handle._model()
        if owner is not model and replaced:  # another model, or another path to this one whose weights were replaced
            try:
                theirs = find_down_projections(owner, handle._template).weights if owner is not None else ()
                same = len(theirs) == len(projs.weights) and all(a is b for a, b in zip(theirs, projs.weights))
            except LokiError:
                same = False
            if not same:
                raise RevertError("This handle belongs to another model; nothing to revert.")
        # Weights that no longer exist were replaced in the model and dropped: nothing of them can be seen, so
        # nothing to restore there.
        live = {layer: w for layer, w in handle._writes.items() if w.weight() is not None}
        records = {}
        for layer, w in live.items():
            if w.weight().device.type == "meta":
                raise OffloadedWeightsError(
                    f"Layer {layer}'s weight was offloaded to the meta device since this delta was applied; revert "
                    "writes into weights in memory. Load the weights back (or reload the model). Nothing was reverted."
                )
            record = records[layer] = w.record
            _refuse_if_disabled(record, "revert")
        if not force:
            _check_unchanged(live, records)
        carried = _carried(handle, projs, replaced)
        writes = {}  # validate (compute everything) first, write last
        for layer, w in live.items():
            record, view = records[layer], _view(w.weight(), w.transposed)
            idx = w.idx if w.idx.device == view.device else torch.from_numpy(w.idx_np).to(view.device)
            if len(record.writes) > 1 and (record.counts[w.idx_np] > 1).any():
                values, updates = _replay(record, view, w, idx)
                if view.dtype == torch.float16 and updates and not bool(torch.isfinite(values).all()):
                    raise DtypeError(
                        f"Layer {layer}: reverting this delta re-adds an on_overlap='add' delta applied after it onto "
                        "the base rows, which overflows float16 (|value| > 65504). Revert the later deltas first, or "
                        "convert the model to bfloat16 or float32. Nothing was reverted."
                    )
            else:
                values, updates = _like(w.saved, view), []
            writes[layer] = (record, view, idx, values, updates)
        before = {id(w.weight()): w.weight()._version for w in live.values()}
        for layer, (record, view, idx, values, updates) in writes.items():
            w = live[layer]
            view.index_copy_(0, idx, values)
            for o, saved, written in updates:
                o.saved, o.written = saved, written
            record.counts[w.idx_np] -= 1
            record.writes.remove(w)
            record.generation += 1
        for layer, view in carried.items():
            w = handle._writes[layer]
            view.index_copy_(0, torch.from_numpy(w.idx_np).to(view.device), _like(w.saved, view))
        for w in handle._writes.values():
            w.handle = None
        for layer, w in live.items():
            _wrote(records[layer], w.weight(), before[id(w.weight())])
        handle.applied = False
    left = [layer for layer in replaced if layer not in carried]
    if left:
        warnings.warn(
            f"Layer(s) {left}: the model no longer computes with the weights this delta was written into (they were "
            "replaced: load_state_dict(..., assign=True), a new nn.Parameter, a swapped module), and the new weights "
            "do not hold its rows. revert restored the old tensors where they still exist and left the model's "
            "current weights as they are, holding whatever was loaded into them.",
            ReplacedWeightsWarning,
            stacklevel=2,
        )


def _replaced(handle: Handle, projs: DownProjections) -> list[int]:
    """Layers of `handle` whose written weight is not the one `projs` (the model now) computes with."""
    return [
        layer
        for layer, w in handle._writes.items()
        if layer >= len(projs) or projs.modules[layer].weight is not w.weight()
    ]


def _carried(handle: Handle, projs: DownProjections, replaced: list[int]) -> dict[int, torch.Tensor]:
    """Replaced layers whose new weight carries this delta's rows (a copy or conversion of the implanted weight:
    `.to()` making new Parameters, `load_state_dict` of the model's own state with `assign=True`): the new weight holds
    what the delta wrote at every fingerprint position, and no other delta shares those rows, old or new. Revert
    restores the saved rows there too. Returns `{layer: [d_out, d_in] view of the new weight}`."""
    carried = {}
    for layer in replaced:
        w = handle._writes[layer]
        if layer >= len(projs) or (w.record.counts[w.idx_np] != 1).any():
            continue
        now = _records.get(projs.modules[layer].weight)
        view = projs.rows(layer)
        if (now is not None and now.counts[w.idx_np].any()) or view.shape[1] != w.written.shape[1]:
            continue
        rows, cols, want = _probe(w, view)
        if bool((view[rows, cols] == want).all()):
            carried[layer] = view
    return carried


def _wrote(record: _Record, weight: torch.Tensor, before: int) -> None:
    """Remember the weight's version after loki wrote it; if something else wrote it since loki last did (the
    version before this write is not the one remembered), forget it, so the next commit checks the base again."""
    record.version = weight._version if record.version in (None, before) else -1


def _check_unchanged(writes: dict[int, _Write], records: dict[int, _Record]) -> None:
    """Raise ModelChangedError when rows only these writes (of one handle) wrote no longer hold what they wrote.
    Compares the fingerprint positions (up to 256 entries per layer, spread over all its rows; SPEC.md section 6):
    what an optimizer step or `load_state_dict` changes, at the cost of a gather of 256 values. One sync per call."""
    flags = []
    for layer, w in writes.items():
        if w.weight()._version == records[layer].version:  # nothing but loki wrote this weight since its last write
            continue
        alone = records[layer].counts[w.idx_np] == 1
        if not alone.any():
            continue
        view = _view(w.weight(), w.transposed)
        rows, cols, want = _probe(w, view)
        if alone.all():
            flags.append((layer, (view[rows, cols] != want).any()))
        else:
            keep = torch.from_numpy(alone)[fingerprint_positions(len(w.idx_np), w.written.shape[1])[0]].to(view.device)
            flags.append((layer, (view[rows[keep], cols[keep]] != want[keep]).any()))
    if not flags:
        return
    bad = torch.stack([f.to("cpu") for _, f in flags]).numpy()
    if bad.any():
        changed = [layer for (layer, _), b in zip(flags, bad) if b]
        raise ModelChangedError(
            f"Layer(s) {changed}: the rows this delta wrote were changed since it was applied (an optimizer step, "
            "load_state_dict or another tool wrote into them). Reverting would silently mix the two. Nothing was "
            "reverted; pass force=True to restore the rows it overwrote anyway."
        )


def _probe(w: _Write, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(rows, cols, values)` of `w`'s fingerprint positions in the weight, on its device, and what `w` wrote there
    in its dtype; cached on `w` until the weight changes dtype or device or a replay rewrites `w.written`."""
    key = (view.device, view.dtype, id(w.written))
    if w.probe is None or w.probe[0] != key:
        a, b = _positions(len(w.idx_np), w.written.shape[1], view.device)
        rows = torch.from_numpy(w.idx_np).to(view.device)[a]
        want = _like(w.written, view)[a, b]
        w.probe = (key, rows, b, want)
    return w.probe[1:]


_position_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _positions(k: int, d_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`fingerprint_positions(k, d_in)` on `device`, cached (no host-to-device copy on the hot path)."""
    found = _position_cache.get((k, d_in, device))
    if found is None:
        a, b = fingerprint_positions(k, d_in)
        found = _position_cache[(k, d_in, device)] = (a.to(device), b.to(device))
    return found


def _replay(record: _Record, view: torch.Tensor, w: _Write, idx: torch.Tensor) -> tuple[torch.Tensor, list]:
    """What reverting `w` writes on rows other deltas share, computed without writing: the base values of its rows,
    with the remaining deltas on those rows re-applied in order. Returns `(values [k, d_in], updates)`, updates
    being `(other write, its new saved rows, its new written rows)` to record once `values` is written."""
    work = _base(record, w.idx_np, view.index_select(0, idx))
    touched = np.zeros(len(w.idx_np), dtype=bool)  # rows of `w` already written by a remaining delta
    updates = []
    for o in record.writes:
        if o is w:
            continue
        hit = np.isin(o.idx_np, w.idx_np)
        if not hit.any():
            continue
        positions = torch.from_numpy(np.nonzero(hit)[0]).to(view.device)
        in_w = np.searchsorted(w.idx_np, o.idx_np[hit])
        at = torch.from_numpy(in_w).to(view.device)
        current = work.index_select(0, at)
        saved = _like(o.saved, view).clone()
        saved[positions] = current
        values = _like(o.new, view)[positions]
        if o.change is not None:
            earlier = torch.from_numpy(touched[in_w]).to(view.device)
            added = (current.float() + o.change.to(view.device)[positions]).to(view.dtype)
            values = torch.where(earlier[:, None], added, values)
        work.index_copy_(0, at, values)
        written = _like(o.written, view).clone()
        written[positions] = values
        updates.append((o, saved, written))
        touched[in_w] = True
    return work, updates


def claim_rows(projs: DownProjections, rows: Mapping[int, torch.Tensor]) -> None:
    """Record that `rows` are being trained, so that `plan`/`apply` refuse to write them (`loki.prepare` calls this).

    Args:
        projs: the model's down-projections (`loki.projections.find_down_projections`).
        rows: `{layer: int64 tensor of row indices}` (a `Selection`'s `rows`).

    Raises:
        OverlapError: an applied delta holds some of those rows; nothing is recorded.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> claim_rows(loki.projections.find_down_projections(model), {0: torch.tensor([3])})
    >>> loki.apply(model, loki.implant.make_delta(model, {0: ([3], torch.zeros(1, 64))}))
    Traceback (most recent call last):
    ...
    loki.errors.OverlapError: Layer 0: some of this delta's rows are being trained ...
    """
    with _LOCK:
        for layer, idx in rows.items():
            record = _records.get(projs.modules[layer].weight)
            if record is not None and (record.counts[idx.cpu().numpy()] > 0).any():
                raise OverlapError(
                    f"Layer {layer}: some selected rows hold an applied delta. Revert it (or loki.merge(model) to "
                    "bake it in) before preparing these rows for training."
                )
        for layer, idx in rows.items():
            record = _record(projs.modules[layer].weight, projs.d_out)
            record.training[idx.cpu().numpy()] = True
            record.trains = True
            record.generation += 1


def release_rows(projs: DownProjections, rows: Mapping[int, torch.Tensor]) -> None:
    """Undo `claim_rows` for `rows` (`loki.unprepare` calls this); rows not claimed are ignored.

    Args:
        projs: the model's down-projections.
        rows: `{layer: int64 tensor of row indices}`, as given to `claim_rows`.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> projs, rows = loki.projections.find_down_projections(model), {0: torch.tensor([3])}
    >>> claim_rows(projs, rows); release_rows(projs, rows)
    >>> loki.revert(model, loki.apply(model, loki.implant.make_delta(model, {0: ([3], torch.zeros(1, 64))})))
    """
    with _LOCK:
        for layer, idx in rows.items():
            record = _records.get(projs.modules[layer].weight)
            if record is not None:
                record.training[idx.cpu().numpy()] = False
                record.trains = bool(record.training.any())
                record.generation += 1


def base_rows(
    model: nn.Module, layer: int, indices: torch.Tensor, projs: DownProjections | None = None
) -> torch.Tensor:
    """The base values of rows `indices` of `layer`, as if no loki delta were applied to `model` (what applied
    deltas saved, else the current values). Merged deltas are part of the base.

    Args:
        model: the model.
        layer: the layer.
        indices: int64 row indices.
        projs: the model's down-projections, if already found.

    Returns:
        torch.Tensor: `[k, d_in]`, in the weight's dtype and on its device.

    Raises:
        UnknownArchitectureError: no `projs`, and loki does not know the model's architecture.
        IndexError: `layer` or an index is out of range (not checked: a low-level helper).

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> idx = torch.tensor([3, 7])
    >>> before = base_rows(model, 1, idx)
    >>> h = loki.apply(model, loki.implant.make_delta(model, {1: (idx, torch.zeros(2, 64))}))
    >>> torch.equal(base_rows(model, 1, idx), before), float(model.model.layers[1].mlp.down_proj.weight[3].abs().sum())
    (True, 0.0)
    """
    projs = projs or find_down_projections(model)
    view = projs.rows(layer)
    with _LOCK, torch.no_grad():
        current = view.index_select(0, indices.to(view.device))
        record = _records.get(projs.modules[layer].weight)
        if record is None or not record.writes:
            return current
        return _base(record, indices.cpu().numpy(), current)


# -- conveniences -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def implanted(model: nn.Module, *deltas: Delta, on_overlap: str = "error") -> Iterator[list[Handle]]:
    """Apply `deltas` in order for the duration of a `with` block, then revert them in reverse order (also on error).

    Args:
        model: the model.
        *deltas: `Delta`s (the top-level `loki.implanted` also takes paths and Hub ids).
        on_overlap: as `apply`, for each delta.

    Yields:
        list[Handle]: one per delta.

    Raises:
        On entry, what `apply` raises (the deltas applied before the failing one are reverted). On exit, what
        `revert` raises: `RevertError` when a handle was reverted or merged inside the block, `ModelChangedError`
        when something wrote into a delta's rows; that delta and those applied before it then stay applied.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> with loki.implanted(model, loki.testing.random_delta(model, name="a")):
    ...     [h.delta.name for h in loki.applied(model)]
    ['a']
    >>> loki.applied(model)
    []
    """
    handles: list[Handle] = []
    try:
        for d in deltas:
            handles.append(apply(model, d, on_overlap=on_overlap))
        yield handles
    finally:
        failed = None
        for h in reversed(handles):
            if not h.applied:  # reverted or merged inside the block
                continue
            try:
                revert(model, h)
            except LokiError as e:  # revert the others anyway; report the first failure
                failed = failed or e
        if failed is not None:
            raise failed


@contextlib.contextmanager
def disabled(model: nn.Module, *, template: str | None = None) -> Iterator[nn.Module]:
    """Run a block on the base model: every applied delta is taken out of the weights, and put back exactly
    afterwards (PEFT's `disable_adapter()`).

    Inside the block, `plan`, `apply`, `Plan.commit`, `revert` and `merge` raise `LedgerError` when they touch a
    weight that held applied deltas when the block began; a delta on other layers' weights applies and stays.

    Args:
        model: the model (of an architecture loki knows: this function takes no template).

    Yields:
        nn.Module: `model`.

    Raises:
        UnknownArchitectureError: loki does not know the model's architecture.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> weight = model.model.layers[0].mlp.down_proj.weight
    >>> base = weight.clone()
    >>> h = loki.apply(model, loki.testing.random_delta(model, seed=1))
    >>> with loki.disabled(model):
    ...     torch.equal(weight, base)  # model(...) here answers as the base model
    True
    >>> torch.equal(weight, base)
    False
    """
    projs = find_down_projections(model, template)
    with _LOCK, torch.no_grad():
        swapped = []
        for weight in _weights(projs):
            record = _record(weight, projs.d_out)
            if record.disabled:  # a nested block: the outer one restores
                continue
            record.disabled = True  # every weight, so nothing is applied or reverted inside the block
            view = _view(weight, projs.transposed)
            rows = np.nonzero(record.counts)[0]
            idx = torch.from_numpy(rows).to(view.device)
            current = view.index_select(0, idx)
            if len(rows):
                before = weight._version
                view.index_copy_(0, idx, _base(record, rows, current))
                _wrote(record, weight, before)
            swapped.append((record, weight, view, idx, current))
    try:
        yield model
    finally:
        with _LOCK, torch.no_grad():
            for record, weight, view, idx, current in swapped:
                if len(idx):
                    before = weight._version
                    view.index_copy_(0, idx, current)
                    _wrote(record, weight, before)
                record.disabled = False


def merge(model: nn.Module, *, template: str | None = None) -> nn.Module:
    """Bake the applied deltas into `model`: they stay written but can no longer be reverted (PEFT's
    `merge_and_unload`); their handles become `applied=False`, and later deltas see the merged rows as base rows.

    Then `model.save_pretrained(folder)` writes a plain Hugging Face checkpoint with the implants inside
    (`loki merge` on the command line).

    Args:
        model: the model (of an architecture loki knows: this function takes no template).

    Returns:
        nn.Module: `model`.

    Raises:
        LedgerError: inside `loki.disabled(model)`.
        UnknownArchitectureError: loki does not know the model's architecture.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> h = loki.apply(model, loki.testing.random_delta(model))
    >>> _ = loki.merge(model)
    >>> h.applied, loki.applied(model)
    (False, [])
    """
    projs = find_down_projections(model, template)
    with _LOCK:
        for weight in _weights(projs):
            record = _records.get(weight)
            if record is None:
                continue
            if record.disabled:
                raise LedgerError(
                    "merge inside `with loki.disabled(model)` would bake the base rows; merge after the block."
                )
            for w in record.writes:
                w.handle.applied = False
                w.handle = None
            record.writes.clear()
            record.counts[:] = 0
            record.generation += 1
    return model
