"""Serve many implants on one shared base model: switch between them in place, or give every row of a batch its own.

An `ImplantBank` validates and stages each delta once (its rows converted to the model's dtype, on the model's
device or in pinned host memory), then switches the model between implants by writing only those rows:

- `activate(*names)` / `deactivate(*names)` / `with use(*names):` leave the weights bit-identical to
  `loki.apply`ing those deltas to the base model. Writes are in place, so a `torch.compile`d model does not
  recompile after a switch. Disjoint implants stack; the bank's switches show in `loki.applied(model)`.
- `with mixed(["medical", None, "legal"]):` (or `generate(ids, implants=[...])`) runs a batch in which row i uses
  its own implant: the base down-projection runs once, then each implant's output coordinates are recomputed for
  its rows only (about k/d_model of one projection per implant present; `loki.mixed`). Works with `generate` and
  its KV cache.
- `with routed():` (or `generate(ids, "auto")`) gives each row the implant registered with a `scope` that the row
  falls in, or none (`loki.scoping`): the base model decides on each new prompt, up to the scopes' layers.

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
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .delta import Delta
from .errors import (
    ImplantBankError,
    LokiError,
    ModelChangedError,
    ReplacedWeightsWarning,
    ScopeError,
    StalePlanError,
)
from .ledger import OVERLAP_POLICIES, Handle, Plan, apply, plan, revert
from .mixed import MixedBatches
from .projections import find_down_projections
from .scoping import Scope, check_scopes, routing

__all__ = ["ImplantBank"]


@dataclass(eq=False)
class _Implant:
    name: str
    delta: Delta
    staged: Plan | None  # validated once, rows staged in the model's dtype; None when evicted
    check_base: bool = True  # as registered: restaging onto replaced weights checks them again
    pins: int = 0  # open mixed blocks using its staged rows (not evictable meanwhile)
    scope: Scope | None = None  # the inputs `routed` gives it (`loki.scope`)


class ImplantBank:
    """Many deltas registered once on one model; switch between them in place, or mix them within a batch.

    `store="device"` stages rows on the model's device (fastest switches); `store="host"` keeps them in host memory
    (pinned when the model is on a GPU) and copies them over at each switch. `budget` (bytes) caps the staged
    copies: the least recently used implants that are not active are unstaged first, and restaged (exactly) on
    their next use. The `Delta` objects themselves stay in ordinary host memory. One bank per model: two banks on
    one model would not wait for each other's blocks. After `model.to(dtype or device)` implants are restaged on
    their next use.

    Args:
        model: the shared base model.
        store: "device" or "host".
        budget: the most bytes of staged rows to keep (`staged_bytes`); None: no limit.
        template: the down-projection module path, for architectures loki does not know.

    Raises:
        ImplantBankError: `store` is neither "device" nor "host".
        UnknownArchitectureError: loki cannot find the down-projections.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> bank = loki.ImplantBank(model, budget=10_000)
    >>> bank.register("a", loki.testing.random_delta(model, seed=1))
    >>> bank
    ImplantBank(1 implants, active=[], store='device', staged=... bytes of 10,000)
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
            raise ImplantBankError(f"store must be 'device' or 'host', not {store!r}.")
        self.model = model
        self.store = store
        self.budget = budget
        self._template = template
        find_down_projections(model, template)  # fail early; found again at every use (modules may be swapped)
        self._implants: OrderedDict[str, _Implant] = OrderedDict()  # least recently used first
        self._handles: OrderedDict[str, Handle] = OrderedDict()  # active implants, in activation order
        self._policy: dict[str, str] = {}  # on_overlap each implant was last activated with
        self._cv = threading.Condition(threading.RLock())
        self._users = 0  # open use/mixed blocks
        self._waiting = 0  # threads waiting to switch
        self._restore: tuple[str, ...] = ()  # what to restore when the last open block ends
        self._local = threading.local()  # .held: sets this thread holds
        self._batches = MixedBatches(model, template)

    # -- registry --------------------------------------------------------------------------------------
    def register(
        self, name: str, delta: Delta, *, scope: Scope | None = None, check_base: bool = True, replace: bool = False
    ) -> None:
        """Validate `delta` against the model once (as `loki.plan`) and stage it under `name`; it is not activated.

        Args:
            name: a non-empty string.
            delta: a `Delta` (`loki.load` reads files and Hub ids).
            scope: the inputs it applies to (`loki.scope`), for `routed` and `generate(..., "auto")`; None: it is
                used only where named. Its shapes are checked here, the weights it was made on by `routed`.
            check_base: check the base fingerprint (as `loki.plan`).
            replace: replace an implant registered under `name` (deactivating it first when it is active).

        Raises:
            ImplantBankError: `name` is not a non-empty string; `delta` is not a `Delta`; its staged rows exceed the
                whole `budget`; `name` is taken and not `replace`; or the implant replaced is in use by an open
                `use`/`mixed` block.
            ScopeError: `scope` is not a `Scope` made on a model of this one's shapes.
            IncompatibleModelError, UnknownArchitectureError, BaseModelMismatchError, DtypeError, OverlapError,
                LedgerError: as `loki.plan` with `on_overlap="replace"` (deltas applied on the same rows are not
                an error here; rows a prepared model trains are).

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1))
        >>> "a" in bank, bank.names, bank.active
        (True, ['a'], ())
        """
        if not isinstance(name, str) or not name:
            raise ImplantBankError(f"An implant's name is a non-empty string, not {name!r}.")
        if not isinstance(delta, Delta):
            raise ImplantBankError(
                f"register takes a loki.Delta, not {type(delta).__name__}; read files with loki.load(path)."
            )
        if scope is not None:
            if not isinstance(scope, Scope):
                raise ScopeError(f"scope must be a loki.Scope (loki.scope or Scope.load), not {type(scope).__name__}.")
            scope.check(self.model, self._template)
        staged = self._stage(delta, check_base)  # on_overlap="replace": applied deltas on its rows are no error here
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
            self._implants[name] = _Implant(name, delta, staged, check_base, scope=scope)
            self._evict()

    def unregister(self, name: str) -> None:
        """Forget `name`, deactivating it first when it is active.

        Args:
            name: a registered implant.

        Raises:
            ImplantBankError: no implant `name`, or it is active or pinned while a `use`/`mixed` block is open.
            ModelChangedError, LedgerError: from reverting it (as `loki.revert`).

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1)); bank.activate("a")
        >>> bank.unregister("a"); len(bank), loki.applied(model)
        (0, [])
        """
        with self._cv:
            entry = self._get(name)
            if name in self._handles or entry.pins:
                if self._users:
                    raise ImplantBankError(
                        f"Implant {name!r} is in use by an open use/mixed block; unregister it later."
                    )
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
        """Bytes of staged rows the bank holds now (what `budget` caps)."""
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
    def _stage(self, delta: Delta, check_base: bool) -> Plan:
        # A plan with on_overlap="replace" holds this delta's rows over the base rows, in the model's dtype: what
        # loki.apply writes where no other delta is applied, and what a mixed batch computes with.
        return plan(self.model, delta, on_overlap="replace", check_base=check_base, template=self._template).stage(
            self.store
        )

    def _staged(self, entry: _Implant) -> Plan:
        self._implants.move_to_end(entry.name)
        staged = entry.staged
        # Evicted, the model changed dtype or device, or its weights were replaced: restage. The base check runs
        # again (as registered), since replaced weights may be another checkpoint's.
        if staged is None or not staged.current:
            staged = entry.staged = self._stage(entry.delta, entry.check_base)
            self._evict()  # may unstage it again when active implants fill the budget; the caller holds `staged`
        return staged

    def _repair(self) -> None:
        """Notice what happened to the model under the active implants since the last switch. Implants whose
        weights were replaced (`load_state_dict(..., assign=True)`, a swapped module: `Handle.lost`) are applied
        again on the new weights, after checking them against the delta's base model; rows something else wrote
        into (`load_state_dict` copying, an optimizer step) raise `ModelChangedError`."""
        names = list(self._handles)
        lost = [name for name in names if self._handles[name].lost]
        for name in names:
            if name not in lost:
                try:
                    self._handles[name].check()
                except ModelChangedError as e:
                    raise ModelChangedError(
                        f"Implant {name!r}: {e} The bank switched nothing. bank.deactivate({name!r}, force=True) "
                        "restores the rows it overwrote (then activate it again to write it over the new rows)."
                    ) from e
        if not lost:
            return
        redo = names[names.index(lost[0]) :]  # later implants may have stacked on the lost one's rows
        with warnings.catch_warnings():  # reverting lost handles warns; here the bank applies them again
            warnings.simplefilter("ignore", ReplacedWeightsWarning)
            self._deactivate(redo)
        try:
            self._activate(redo)
        except LokiError as e:
            raise type(e)(
                f"The model's down-projection weights were replaced since {lost} was activated (load_state_dict(..., "
                f"assign=True) or a swapped module), so the bank applied {redo} again on the new weights, which "
                f"failed: {e} Now active: {list(self._handles)}."
            ) from e

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

        Implants on rows no applied delta touches take the staged fast path; others go through `loki.apply` with
        `on_overlap`. On error nothing of this call stays written.

        Args:
            *names: registered implants; already active ones are skipped.
            on_overlap: for implants whose rows overlap an applied delta ("error", "replace", "add"); remembered for
                later `use` switches. Checked only when it is used (an overlap).

        Raises:
            ImplantBankError: an unknown name, or called inside a `use`/`mixed` block of this thread.
            OverlapError: an implant overlaps an applied delta and `on_overlap="error"`, or a prepared model trains
                some of its rows.
            LedgerError: an invalid `on_overlap` used on an overlap; inside `loki.disabled(model)`.
            DtypeError: restaging after a change to float16 overflows it.

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1))
        >>> bank.activate("a"); bank.active
        ('a',)
        >>> bank.deactivate(); bank.active
        ()
        """
        if on_overlap not in OVERLAP_POLICIES:
            raise ImplantBankError(f"on_overlap must be one of {OVERLAP_POLICIES}, not {on_overlap!r}.")
        with self._exclusive():
            self._repair()
            self._activate(names, on_overlap)
            self._policy.update(dict.fromkeys(names, on_overlap))

    def deactivate(self, *names: str, force: bool = False) -> None:
        """Revert implants (all active ones when none is named; inactive ones are skipped), waiting for open blocks
        to end.

        Args:
            *names: registered implants.
            force: restore the rows they overwrote even where something else wrote into them since (as
                `loki.revert`).

        Raises:
            ImplantBankError: an unknown name, or called inside a `use`/`mixed` block of this thread.
            ModelChangedError, LedgerError: from reverting (as `loki.revert`).
        """
        with self._exclusive():
            self._deactivate(names or tuple(self._handles), force)

    @contextlib.contextmanager
    def use(self, *names: str) -> Iterator[ImplantBank]:
        """Run a block with exactly `names` active, in that order (none: no implant of this bank); the implants
        active before are restored when the last open block ends. See the module docstring for threads.

        Overlapping implants use the `on_overlap` each was last activated with, else "error".

        Args:
            *names: registered implants.

        Yields:
            ImplantBank: the bank.

        Raises:
            ImplantBankError: an unknown name, or a block of this thread with another set is open.
            OverlapError, LedgerError, DtypeError: from activating (as `activate`).

        >>> import loki, loki.testing
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1))
        >>> with bank.use("a"):
        ...     bank.active
        ('a',)
        >>> bank.active
        ()
        """
        with self._hold(tuple(dict.fromkeys(names))):
            yield self

    def _activate(self, names: Sequence[str], on_overlap: str | None = None) -> None:
        entries = [self._get(n) for n in names]
        done: list[str] = []
        try:
            for entry in entries:
                if entry.name in self._handles:
                    continue
                try:  # the staged fast path, when no applied delta touches its rows
                    handle = self._staged(entry).commit()
                except StalePlanError:  # it overlaps an applied delta: apply's policies decide
                    policy = on_overlap or self._policy.get(entry.name, "error")
                    handle = apply(
                        self.model, entry.delta, on_overlap=policy, check_base=False, template=self._template
                    )
                self._handles[entry.name] = handle
                done.append(entry.name)
        except BaseException:
            self._deactivate(done)
            raise

    def _deactivate(self, names: Sequence[str], force: bool = False) -> None:
        for name in reversed(list(names)):
            self._get(name)
            handle = self._handles.get(name)
            if handle is not None and handle.applied:  # (the user may have reverted it directly)
                revert(self.model, handle, force=force)  # on error the bank still lists it, as the ledger does
            self._handles.pop(name, None)

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
                raise ImplantBankError(
                    "activate/deactivate inside a use/mixed block of the same thread would wait "
                    "forever; switch after the block, or open another use block after it."
                )
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
                self._repair()
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
    def mixed(self, implants: Sequence[str | None]) -> Iterator[ImplantBank]:
        """Forward passes (and `generate`) in this block and thread give batch row i the implant `implants[i]`
        (`None`: none of the bank's implants). The batch must have `len(implants)` rows, or a multiple of it where
        `generate` repeats each row (beams, `num_return_sequences`). The bank's active implants are switched off
        for the block (as `use()`) and restored after.

        Args:
            implants: per batch row, a registered implant or None.

        Yields:
            ImplantBank: the bank.

        Raises:
            ImplantBankError: an unknown name; a nested `mixed` block; a `use` block with implants is open in this
                thread; and, from the forward pass, a batch whose size is not a multiple of `len(implants)`.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1))
        >>> ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
        >>> with bank.mixed([None, "a"]):
        ...     mixed = model(ids).logits
        >>> torch.allclose(mixed[0], model(ids[:1]).logits[0], atol=1e-5)
        True
        """
        implants = list(implants)
        names = tuple(dict.fromkeys(n for n in implants if n is not None))
        with self._pinned(names) as staged:
            with self._batches.running(self._batches.make(implants, staged)):
                yield self

    @contextlib.contextmanager
    def routed(self) -> Iterator[ImplantBank]:
        """Forward passes (and `generate`) in this block and thread give each batch row the registered implant whose
        scope it falls in, or none (`loki.scoped`'s routing over every implant registered with a `scope`). The
        bank's active implants are switched off for the block (as `use()`) and restored after.

        Yields:
            ImplantBank: the bank.

        Raises:
            ImplantBankError: no implant registered with a scope; a nested `mixed`/`routed` block; a `use` block
                with implants is open in this thread.
            ScopeError: a scope made on other weights than the model's with the bank's implants off (another
                checkpoint, or a delta applied outside the bank); nothing is routed.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> scope = loki.scope(model, None, [{"text": [40, 41, 42]}], [{"text": [5, 6, 7, 8]}], progress=False)
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1), scope=scope)
        >>> with bank.routed():
        ...     routed = model(torch.tensor([[5, 6, 7]])).logits
        >>> torch.equal(routed, model(torch.tensor([[5, 6, 7]])).logits)      # out of scope: the base model
        True
        """
        scopes = {n: e.scope for n, e in self._implants.items() if e.scope is not None}
        if not scopes:
            raise ImplantBankError("No implant is registered with a scope: register(name, delta, scope=...).")
        with self._pinned(tuple(scopes)) as staged:
            # the active implants are off now: the scopes must have been made on these (base) weights, or the keys
            # read here are not the ones their thresholds were set on
            check_scopes(self.model, list(scopes.values()), self._template, weights=True)
            self._local.routing = True
            try:
                with routing(self.model, self._batches, staged, scopes, self._template):
                    yield self
            finally:
                self._local.routing = False

    @contextlib.contextmanager
    def _pinned(self, names: tuple[str, ...]) -> Iterator[dict[str, Plan]]:
        """A mixed-batch block: active implants off (`_hold(())`), `names` staged and pinned, the hooks installed."""
        with self._hold(()):
            if self._batches.current is not None or getattr(self._local, "routing", False):
                raise ImplantBankError("mixed and routed blocks do not nest; close the outer one first.")
            with self._cv:
                entries = [self._get(n) for n in names]
                for e in entries:
                    e.pins += 1
                try:
                    staged = {e.name: self._staged(e) for e in entries}
                    self._batches.install()
                except BaseException:
                    for e in entries:
                        e.pins -= 1
                    raise
            try:
                yield staged
            finally:
                with self._cv:
                    for e in entries:
                        e.pins -= 1
                    self._batches.remove()
                    self._evict()

    def generate(self, input_ids: torch.Tensor, implants: Sequence[str | None] | Literal["auto"], **kwargs):
        """`model.generate(input_ids, **kwargs)` with row i using implant `implants[i]` (`None`: the base), in a
        `mixed` block; `implants="auto"`: each row the implant whose scope it falls in, in a `routed` block.

        Args:
            input_ids: `[batch, T]` token ids.
            implants: per row, a registered implant or None; or "auto".
            **kwargs: for `model.generate` (`attention_mask`, `max_new_tokens`, `num_beams`, ...).

        Returns:
            What `model.generate` returns.

        Raises:
            ImplantBankError: `input_ids` does not have one row per entry of `implants`, or as `mixed` / `routed`.

        >>> import loki, loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> bank = loki.ImplantBank(model)
        >>> bank.register("a", loki.testing.random_delta(model, seed=1))
        >>> bank.generate(torch.tensor([[5, 6, 7], [5, 6, 7]]), ["a", None], max_new_tokens=2, do_sample=False).shape
        torch.Size([2, 5])
        """
        if isinstance(implants, str) and implants == "auto":
            with self.routed():
                return self.model.generate(input_ids, **kwargs)
        if input_ids.shape[0] != len(implants):
            raise ImplantBankError(
                f"input_ids has {input_ids.shape[0]} rows but implants names {len(implants)}; give one per row."
            )
        with self.mixed(implants):
            return self.model.generate(input_ids, **kwargs)
