"""Serve many implants on one shared base model: switch between them in place, or give every row of a batch its own.

An `ImplantBank` validates and stages each delta once (its rows converted to the model's dtype, on the model's
device or in pinned host memory), then switches the model between implants by writing only those rows:

- `activate(*names)` / `deactivate(*names)` / `with use(*names):` leave the weights bit-identical to
  `loki.apply`ing those deltas to the base model. Writes are in place, so a `torch.compile`d model does not
  recompile after a switch. Disjoint implants stack; the bank's switches show in `loki.active(model)`.
- `with mixed(["medical", None, "legal"]):` (or `generate(ids, implants=[...])`) runs a batch in which row i uses
  its own implant: the base down-projection runs once, then each implant's output coordinates are recomputed for
  its rows only (about k/d_model of one projection per implant present). Works with `generate` and its KV cache.

Threads: one switch at a time. A `use` or `mixed` block holds its implant set for its whole duration: blocks that
want the same set run concurrently, a block that wants another set (or `activate`/`deactivate`) waits until the
running blocks end, and blocks that are waiting go before newcomers. When the last block of a set ends, the
implants active before it are restored. A plain `model(...)` call made outside any block while another thread
switches may see some old and some new rows: run requests inside `use` or `mixed`.

>>> import loki, loki.testing, torch
>>> model = loki.testing.tiny_model("llama")
>>> bank = loki.ImplantBank(model)
>>> bank.register("a", loki.testing.random_delta(model, seed=1))
>>> bank.register("b", loki.testing.random_delta(model, seed=2))
>>> ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
>>> with bank.use("a"):
...     only_a = model(ids[:1]).logits
>>> with bank.mixed(["a", "b"]):
...     both = model(ids).logits
>>> torch.allclose(both[0], only_a[0], atol=1e-5)
True
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .apply import Handle, _counts, _LayerWrite, _plan, _state, apply, compatible_projections, revert
from .delta import Delta
from .errors import ImplantBankError
from .targets import find_down_projections

__all__ = ["ImplantBank"]


@dataclass(eq=False)
class _Staged:
    """A validated delta, ready to write: per layer the row indices (model device) and new rows (model dtype)."""

    layers: dict[int, tuple[torch.Tensor, np.ndarray, torch.Tensor]]
    nbytes: int


@dataclass(eq=False)
class _Implant:
    name: str
    delta: Delta
    staged: _Staged | None
    pins: int = 0  # open mixed blocks using its staged rows (not evictable meanwhile)


@dataclass(eq=False)
class _LayerPlan:
    """The implants of a mixed batch present in one layer. Batch row `rows[i]` uses implant `gid[i]`: it overwrites
    output coordinates `idx[i]` with `x @ new[gid[i]].T + row_bias[i]`. Implants with fewer rows than the largest
    are padded by repeating their first row (a repeated write of the same value)."""

    rows: torch.Tensor  # [B'] batch rows with an implant in this layer
    gid: torch.Tensor  # [B'] their implant
    new: torch.Tensor  # [U, k, d_in]
    bias: torch.Tensor | None  # [U, k]
    idx: torch.Tensor  # [B', k]: the output coordinates each row overwrites
    row_bias: torch.Tensor | None  # [B', k]
    in_order: bool  # rows == 0..batch-1: no gather of the input
    one_each: bool  # gid == 0..U-1: row i has implant i, so new needs no gather
    groups: list[torch.Tensor]  # per implant: its positions in rows (contiguous)


@dataclass(eq=False)
class _Plan:
    """One mixed batch: what each layer must overwrite, for a batch of `batch` rows."""

    batch: int
    layers: dict[int, _LayerPlan]
    expanded: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (layer, n) -> rows, gid, idx, row_bias
    steps: dict[int, torch.Tensor] = field(default_factory=dict)  # T -> arange(T)[None, :, None]


class ImplantBank:
    """Many deltas registered once on one model; switch between them in place, or mix them within a batch.

    `store="device"` stages rows on the model's device (fastest switches); `store="host"` keeps them in host memory
    (pinned when the model is on a GPU) and copies them over at each switch. `budget` (bytes) caps the staged
    copies: the least recently used implants that are not active are unstaged first, and restaged (exactly) on
    their next use. The `Delta` objects themselves stay in ordinary host memory. One bank per model: two banks on
    one model would not wait for each other's blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        store: Literal["device", "host"] = "device",
        budget: int | None = None,
        template: str | None = None,
    ):
        if store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', not {store!r}.")
        self.model = model
        self.store = store
        self.budget = budget
        self._template = template
        self._projs = find_down_projections(model, template)
        self._implants: OrderedDict[str, _Implant] = OrderedDict()  # least recently used first
        self._handles: OrderedDict[str, Handle] = OrderedDict()  # active implants, in activation order
        self._policy: dict[str, str] = {}  # on_overlap each implant was last activated with
        self._cv = threading.Condition(threading.RLock())
        self._users = 0  # open use/mixed blocks
        self._waiting = 0  # threads waiting to switch
        self._restore: tuple[str, ...] = ()  # what to restore when the last open block ends
        self._local = threading.local()  # .held: sets this thread holds; .plan: its mixed batch
        self._mixed = 0
        self._hooks: list = []

    # -- registry --------------------------------------------------------------------------------------
    def register(self, name: str, delta: Delta | str | os.PathLike, *, check_base: bool = True, replace: bool = False) -> None:
        """Validate `delta` (a `Delta` or a `.loki` path) against the model once and stage it under `name`."""
        if not isinstance(name, str) or not name:
            raise ImplantBankError(f"An implant's name is a non-empty string, not {name!r}.")
        if not isinstance(delta, Delta):
            from .api import load

            delta = load(delta)
        staged = self._stage(delta, check_base)
        if self.budget is not None and staged.nbytes > self.budget:
            raise ImplantBankError(
                f"Implant {name!r} needs {staged.nbytes:,} bytes staged, more than the bank's whole budget of "
                f"{self.budget:,} bytes. Raise budget= (or pass budget=None)."
            )
        with self._cv:
            if name in self._implants:
                if not replace:
                    raise ImplantBankError(f"An implant named {name!r} is registered already; pass replace=True.")
                self.unregister(name)
            self._implants[name] = _Implant(name, delta, staged)
            self._evict()

    def unregister(self, name: str) -> None:
        """Forget `name` (deactivating it first when no `use`/`mixed` block is open)."""
        with self._cv:
            entry = self._get(name)
            if name in self._handles or entry.pins:
                if self._users:
                    raise ImplantBankError(f"Implant {name!r} is in use by an open use/mixed block; unregister it later.")
                self._deactivate([name])
            del self._implants[name]

    @property
    def names(self) -> list[str]:
        """Registered implants, least recently used first."""
        return list(self._implants)

    @property
    def active(self) -> tuple[str, ...]:
        """The implants this bank has written into the model, in activation order."""
        return tuple(self._handles)

    @property
    def staged_bytes(self) -> int:
        return sum(e.staged.nbytes for e in self._implants.values() if e.staged is not None)

    def __contains__(self, name: object) -> bool:
        return name in self._implants

    def __len__(self) -> int:
        return len(self._implants)

    def __repr__(self) -> str:
        return (
            f"ImplantBank({len(self)} implants, active={list(self.active)}, store={self.store!r}, "
            f"staged={self.staged_bytes:,} bytes" + (f" of {self.budget:,}" if self.budget is not None else "") + ")"
        )

    def _get(self, name: str) -> _Implant:
        entry = self._implants.get(name)
        if entry is None:
            raise ImplantBankError(f"No implant named {name!r} is registered. Registered: {self.names}.")
        return entry

    # -- staging ---------------------------------------------------------------------------------------
    def _stage(self, delta: Delta, check_base: bool) -> _Staged:
        # apply's own validation and value computation, so staged rows are bit-identical to what apply writes.
        projs = compatible_projections(self.model, delta, self._template)
        state = _state(self.model)
        with state.lock, torch.no_grad():
            writes = _plan(state, projs, delta, "replace", check_base)
        layers, nbytes = {}, 0
        for layer, (w, _) in writes.items():
            rows = w.new
            if self.store == "host" and rows.device.type != "cpu":
                rows = rows.to("cpu").pin_memory()
            layers[layer] = (w.idx, w.idx_np, rows)
            nbytes += rows.numel() * rows.element_size() + w.idx.numel() * w.idx.element_size()
        return _Staged(layers, nbytes)

    def _staged(self, entry: _Implant) -> _Staged:
        self._implants.move_to_end(entry.name)
        staged = entry.staged
        if staged is None:
            staged = entry.staged = self._stage(entry.delta, check_base=False)  # validated at register
            self._evict()  # may unstage it again when active implants fill the budget; the caller holds `staged`
        return staged

    def _evict(self) -> None:
        if self.budget is None:
            return
        for entry in list(self._implants.values()):  # least recently used first
            if self.staged_bytes <= self.budget:
                return
            if entry.staged is not None and not entry.pins and entry.name not in self._handles:
                entry.staged = None

    # -- switching -------------------------------------------------------------------------------------
    def activate(self, *names: str, on_overlap: str = "error") -> None:
        """Write implants into the model (stacking with the active ones), waiting for open blocks to end.

        Implants on rows no active delta touches take the staged fast path; others go through `loki.apply` with
        `on_overlap`. On error nothing of this call stays written.
        """
        with self._exclusive():
            self._activate(names, on_overlap)
            self._policy.update(dict.fromkeys(names, on_overlap))

    def deactivate(self, *names: str) -> None:
        """Revert implants (all active ones when none is named), waiting for open blocks to end."""
        with self._exclusive():
            self._deactivate(names or tuple(self._handles))

    @contextlib.contextmanager
    def use(self, *names: str) -> Iterator["ImplantBank"]:
        """Run a block with exactly `names` active (none: the base model); see the module docstring for threads."""
        with self._hold(tuple(dict.fromkeys(names))):
            yield self

    def _activate(self, names: Sequence[str], on_overlap: str | None = None) -> None:
        entries = [self._get(n) for n in names]
        done: list[str] = []
        try:
            for entry in entries:
                if entry.name in self._handles:
                    continue
                handle = _write_staged(self.model, self._projs, entry.delta, self._staged(entry))
                if handle is None:  # overlaps an active delta: apply's policies decide
                    policy = on_overlap or self._policy.get(entry.name, "error")
                    handle = apply(self.model, entry.delta, on_overlap=policy, check_base=False, template=self._template)
                self._handles[entry.name] = handle
                done.append(entry.name)
        except BaseException:
            self._deactivate(done)
            raise

    def _deactivate(self, names: Sequence[str]) -> None:
        for name in reversed(list(names)):
            self._get(name)
            handle = self._handles.pop(name, None)
            if handle is not None and handle.active and not _revert_alone(self.model, handle):
                revert(self.model, handle)  # shares rows with another active delta (or was reverted by the user)

    def _switch(self, want: tuple[str, ...]) -> None:
        """Make exactly `want` active (in that order), touching only what differs; on error, back to before."""
        current = tuple(self._handles)
        keep = 0
        while keep < min(len(current), len(want)) and current[keep] == want[keep]:
            keep += 1
        self._deactivate(current[keep:])
        try:
            self._activate(want[keep:])
        except BaseException:
            self._activate(current[keep:])
            raise

    # -- who may switch when ---------------------------------------------------------------------------
    def _held(self) -> list[tuple[str, ...]]:
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = []
        return held

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._cv:
            if self._held():
                raise ImplantBankError("activate/deactivate inside a use/mixed block of the same thread would wait "
                                       "forever; switch after the block, or open another use block after it.")
            self._waiting += 1
            try:
                self._cv.wait_for(lambda: self._users == 0)
            finally:
                self._waiting -= 1
            try:
                yield
            finally:
                self._cv.notify_all()

    @contextlib.contextmanager
    def _hold(self, want: tuple[str, ...]) -> Iterator[None]:
        for name in want:
            self._get(name)
        held = self._held()
        with self._cv:
            if held and held[-1] != want:
                raise ImplantBankError(
                    f"This thread is inside a block using {list(held[-1])}; a nested block cannot use {list(want)} "
                    "(it would wait for itself). Close the outer block first."
                )
            joins_now = self._users == 0 or (tuple(self._handles) == want and not self._waiting)
            if not held and not joins_now:  # waiting threads go before newcomers, so no set starves
                self._waiting += 1
                try:
                    self._cv.wait_for(lambda: self._users == 0 or tuple(self._handles) == want)
                finally:
                    self._waiting -= 1
            if self._users == 0:
                self._restore = tuple(self._handles)
                self._switch(want)
            self._users += 1
            held.append(want)
        try:
            yield
        finally:
            with self._cv:
                held.pop()
                self._users -= 1
                if self._users == 0:
                    self._switch(self._restore)
                self._cv.notify_all()

    # -- mixed batches ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def mixed(self, implants: Sequence[str | None]) -> Iterator["ImplantBank"]:
        """Forward passes (and `generate`) in this block and thread give batch row i the implant `implants[i]`
        (`None`: the base model). The batch must have `len(implants)` rows, or a multiple of it where `generate`
        repeats each row (beams, `num_return_sequences`)."""
        implants = list(implants)
        names = tuple(dict.fromkeys(n for n in implants if n is not None))
        with self._hold(()):
            if getattr(self._local, "plan", None) is not None:
                raise ImplantBankError("mixed blocks do not nest; close the outer one first.")
            with self._cv:
                entries = [self._get(n) for n in names]
                for e in entries:
                    e.pins += 1
                try:
                    plan = self._make_plan(implants, entries)
                    self._mixed += 1
                    if self._mixed == 1:
                        self._install_hooks()
                except BaseException:
                    for e in entries:
                        e.pins -= 1
                    raise
            self._local.plan = plan
            try:
                yield self
            finally:
                self._local.plan = None
                with self._cv:
                    for e in entries:
                        e.pins -= 1
                    self._mixed -= 1
                    if self._mixed == 0:
                        self._remove_hooks()
                    self._evict()

    def generate(self, input_ids: torch.Tensor, implants: Sequence[str | None], **kwargs):
        """`model.generate(input_ids, **kwargs)` with row i using implant `implants[i]` (`None`: the base)."""
        if input_ids.shape[0] != len(implants):
            raise ImplantBankError(f"input_ids has {input_ids.shape[0]} rows but implants names {len(implants)}; give one per row.")
        with self.mixed(implants):
            return self.model.generate(input_ids, **kwargs)

    def _make_plan(self, implants: list[str | None], entries: list[_Implant]) -> _Plan:
        device = self._projs.weight.device
        per_layer: dict[int, list[tuple[list[int], torch.Tensor, torch.Tensor]]] = {}
        for entry in entries:
            rows = [i for i, n in enumerate(implants) if n == entry.name]
            for layer, (idx, _, new) in self._staged(entry).layers.items():
                per_layer.setdefault(layer, []).append((rows, new.to(device, non_blocking=True), idx))
        layers = {}
        for layer, present in per_layer.items():
            k = max(len(idx) for _, _, idx in present)
            pad = lambda t: torch.cat([t, t[:1].expand(k - len(t), *t.shape[1:])]) if len(t) < k else t  # noqa: E731
            idx = torch.stack([pad(i) for _, _, i in present])
            bias = self._projs.modules[layer].bias
            bias = None if bias is None else bias.detach()[idx]
            rows = [r for rs, _, _ in present for r in rs]
            gid = [u for u, (rs, _, _) in enumerate(present) for _ in rs]
            gid_t = torch.tensor(gid, dtype=torch.int64, device=device)
            groups, start = [], 0
            for rs, _, i in present:
                groups.append(torch.arange(start, start + len(rs), device=device))
                start += len(rs)
            layers[layer] = _LayerPlan(
                rows=torch.tensor(rows, dtype=torch.int64, device=device),
                gid=gid_t,
                new=torch.stack([pad(n) for _, n, _ in present]),
                bias=bias,
                idx=idx[gid_t],
                row_bias=None if bias is None else bias[gid_t],
                in_order=rows == list(range(len(implants))),
                one_each=gid == list(range(len(present))),
                groups=groups,
            )
        return _Plan(len(implants), layers)

    def _install_hooks(self) -> None:
        for layer, module in enumerate(self._projs.modules):
            self._hooks.append(module.register_forward_hook(self._hook(layer)))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, layer: int):
        local = self._local

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            plan: _Plan | None = getattr(local, "plan", None)
            lp = plan.layers.get(layer) if plan is not None else None
            if lp is None:
                return None
            x = inputs[0]
            n, rem = divmod(x.shape[0], plan.batch)
            if rem or not n:
                raise ImplantBankError(
                    f"The batch has {x.shape[0]} rows but the mixed block names implants for {plan.batch}; "
                    "give one implant (or None) per row."
                )
            if torch.is_grad_enabled() and out.requires_grad:
                out = out.clone()  # keep autograd's view of the base output intact
            rows, gid, idx, row_bias = (lp.rows, lp.gid, lp.idx, lp.row_bias) if n == 1 else _expanded(plan, layer, n)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            o3 = out.view(out.shape[0], -1, out.shape[-1])
            xs = x3 if lp.in_order else x3.index_select(0, rows)
            if len(rows) <= 2 * len(lp.new):  # few rows per implant: one batched matmul, row i against new[gid[i]]
                new = lp.new if lp.one_each and n == 1 else lp.new.index_select(0, gid)
                y = torch.matmul(xs, new.transpose(1, 2))
                if row_bias is not None:
                    y = y + row_bias[:, None, :]
            else:  # many rows per implant: one matmul per implant, reading its rows once
                y = xs.new_empty(*xs.shape[:2], idx.shape[1])
                for u, positions in enumerate(lp.groups):
                    if n > 1:  # rows repeat in place, so implant u's rows stay together
                        positions = (positions[:, None] * n + torch.arange(n, device=positions.device)).reshape(-1)
                    part = F.linear(xs.index_select(0, positions), lp.new[u], None if lp.bias is None else lp.bias[u])
                    y.index_copy_(0, positions, part)
            steps = plan.steps.get(o3.shape[1])
            if steps is None:
                steps = plan.steps[o3.shape[1]] = torch.arange(o3.shape[1], device=o3.device)[None, :, None]
            o3.index_put_((rows[:, None, None], steps, idx[:, None, :]), y)
            return out

        return hook


def _expanded(plan: _Plan, layer: int, n: int) -> tuple:
    """`(rows, gid, idx, row_bias)` of `layer` once `generate` has repeated every batch row `n` times in place
    (beams, `num_return_sequences`: `repeat_interleave`)."""
    found = plan.expanded.get((layer, n))
    if found is None:
        lp = plan.layers[layer]
        rows = (lp.rows[:, None] * n + torch.arange(n, device=lp.rows.device)).reshape(-1)
        repeat = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        found = plan.expanded[(layer, n)] = (rows, repeat(lp.gid), repeat(lp.idx), repeat(lp.row_bias))
    return found


def _write_staged(model: nn.Module, projs, delta: Delta, staged: _Staged) -> Handle | None:
    """`loki.apply` for a delta `_stage` already validated, when no active delta touches its rows (else None):
    the same values, written the same way, recorded in the same per-model state, so `loki.revert` undoes it."""
    state = _state(model)
    with state.lock, torch.no_grad():
        for layer, (_, idx_np, _) in staged.layers.items():
            counts = state.counts.get(layer)
            if counts is not None and counts[idx_np].any():
                return None
        writes = {}
        for layer, (idx, idx_np, rows) in staged.layers.items():
            view = projs.rows(layer)
            rows = rows.to(view.device, non_blocking=True)
            saved = view.index_select(0, idx)
            view.index_put_((idx,), rows)
            _counts(state, projs, layer)[idx_np] += 1
            writes[layer] = _LayerWrite(idx, idx_np, rows, saved, None)
        handle = Handle(model, projs, delta, "error", writes)
        state.handles.append(handle)
        return handle


def _revert_alone(model: nn.Module, handle: Handle) -> bool:
    """`loki.revert` of a handle no other active delta shares rows with (else False, nothing done): put back
    what it saved, with the same bookkeeping."""
    state = _state(model)
    with state.lock, torch.no_grad():
        if handle not in state.handles:
            return False
        if any((state.counts[layer][w.idx_np] != 1).any() for layer, w in handle._layers.items()):
            return False
        for layer, w in handle._layers.items():
            state.counts[layer][w.idx_np] -= 1
            handle._projs.rows(layer).index_put_((w.idx,), w.saved)
        state.handles.remove(handle)
        handle.active = False
        return True
