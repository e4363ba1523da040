"""Mixed batches: one forward pass (or `generate`) in which every batch row computes with its own implant.

Forward hooks on the down-projections recompute, for the batch rows that have an implant in a layer, only that
implant's output coordinates (the base projection runs once for the whole batch): about k/d_model of one projection
per implant present. `ImplantBank.mixed` uses this; the implants' rows come from their staged `Plan`s, so a mixed
batch computes with exactly the rows `ImplantBank.use` writes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ImplantBankError
from .ledger import Plan
from .projections import find_down_projections

__all__ = ["MixedBatches"]


@dataclass(eq=False)
class _LayerBatch:
    """The implants of a mixed batch present in one layer. Batch row `rows[i]` uses implant `gid[i]`: it overwrites
    output coordinates `idx[i]` with `x @ new[gid[i]].T + row_bias[i]`. Implants with fewer rows than the largest
    are padded by repeating their first row (a repeated write of the same value). Where the module adds terms of
    its own to `x @ W.T` (a PEFT LoRA layer on the down-projection), `add` is set, `new` holds the implant's rows
    minus the weight's current rows, and the hook adds `x @ new[gid[i]].T` to the module's output there instead,
    so the adapter's contribution stays (what `use` computes)."""

    rows: torch.Tensor  # [B'] batch rows with an implant in this layer
    gid: torch.Tensor  # [B'] their implant
    new: torch.Tensor  # [U, k, d_in]
    bias: torch.Tensor | None  # [U, k]
    idx: torch.Tensor  # [B', k]: the output coordinates each row overwrites
    row_bias: torch.Tensor | None  # [B', k]
    in_order: bool  # rows == 0..batch-1: no gather of the input
    one_each: bool  # gid == 0..U-1: row i has implant i, so new needs no gather
    groups: list[torch.Tensor]  # per implant: its positions in rows (contiguous)
    add: bool = False  # new holds a change to add to the module's output (see above)


@dataclass(eq=False)
class _Batch:
    """One mixed batch: what each layer must overwrite, for a batch of `batch` rows."""

    batch: int
    layers: dict[int, _LayerBatch]
    expanded: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (layer, n) -> rows, gid, idx, row_bias
    steps: dict[int, torch.Tensor] = field(default_factory=dict)  # T -> arange(T)[None, :, None]


class MixedBatches:
    """Mixed-batch hooks on one model's down-projections, shared by the threads that run mixed batches on it.

    `make` builds a batch from staged implants; `install` / `remove` count the open blocks that need the hooks (the
    first installs them, the last removes them; the caller serialises these calls); `running(batch)` makes the
    forward passes of this thread compute that batch. Outside `running`, the hooks leave the output as it is.

    Args:
        model: the model whose down-projections the hooks go on.
        template: the down-projection module path, for architectures loki does not know.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> staged = {"a": loki.plan(model, loki.testing.random_delta(model, seed=1), on_overlap="replace").stage("device")}
    >>> batches = MixedBatches(model)
    >>> batch = batches.make([None, "a"], staged)
    >>> batches.install()
    >>> with batches.running(batch):
    ...     mixed = model(torch.tensor([[5, 6, 7], [5, 6, 7]])).logits
    >>> batches.remove()
    >>> base = model(torch.tensor([[5, 6, 7]])).logits[0]  # row 0 has no implant, row 1 has "a"
    >>> torch.allclose(mixed[0], base, atol=1e-5), torch.allclose(mixed[1], base, atol=1e-5)
    (True, False)
    """

    def __init__(self, model: nn.Module, template: str | None = None):
        self.model = model
        self.template = template
        self._local = threading.local()  # .batch: this thread's open batch
        self._installed = 0
        self._hooks: list = []

    @property
    def current(self) -> _Batch | None:
        """The batch this thread runs now, or None."""
        return getattr(self._local, "batch", None)

    @contextlib.contextmanager
    def running(self, batch: _Batch) -> Iterator[None]:
        """Forward passes of this thread in the block compute `batch` (the hooks must be installed).

        Raises:
            ImplantBankError: this thread runs a batch already (mixed batches do not nest).
        """
        if self.current is not None:
            raise ImplantBankError("mixed blocks do not nest; close the outer one first.")
        self._local.batch = batch
        try:
            yield
        finally:
            self._local.batch = None

    def make(self, implants: Sequence[str | None], staged: Mapping[str, Plan]) -> _Batch:
        """The batch in which row i computes with `staged[implants[i]]` (`None`: the base).

        Args:
            implants: per batch row, a name in `staged` or None.
            staged: name -> the implant's staged plan (`loki.plan(..., on_overlap="replace").stage(...)`): its rows
                `[k, d_in]` over the base rows, in the model's dtype.

        Returns:
            The batch, for `running`.
        """
        projs = find_down_projections(self.model, self.template)
        device = projs.weight.device
        per_layer: dict[int, list[tuple[list[int], torch.Tensor, torch.Tensor]]] = {}
        for name, plan in staged.items():
            rows = [i for i, n in enumerate(implants) if n == name]
            for layer, (idx, new) in plan.layers.items():
                per_layer.setdefault(layer, []).append((rows, new.to(device, non_blocking=True), idx))
        layers = {}
        for layer, present in per_layer.items():
            k = max(len(idx) for _, _, idx in present)
            pad = lambda t: torch.cat([t, t[:1].expand(k - len(t), *t.shape[1:])]) if len(t) < k else t  # noqa: E731
            idx = torch.stack([pad(i) for _, _, i in present])
            module = projs.modules[layer]
            add = not (type(module) is nn.Linear or type(module).__name__ == "Conv1D")  # adds terms of its own
            if add:  # the implant's change over the rows the module computes with now
                present = [(rs, n - projs.rows(layer).index_select(0, i).to(n.device), i) for rs, n, i in present]
            bias = None if add or module.bias is None else module.bias.detach()[idx]
            rows = [r for rs, _, _ in present for r in rs]
            gid = [u for u, (rs, _, _) in enumerate(present) for _ in rs]
            gid_t = torch.tensor(gid, dtype=torch.int64, device=device)
            groups, start = [], 0
            for rs, _, _ in present:
                groups.append(torch.arange(start, start + len(rs), device=device))
                start += len(rs)
            layers[layer] = _LayerBatch(
                rows=torch.tensor(rows, dtype=torch.int64, device=device),
                gid=gid_t,
                new=torch.stack([pad(n) for _, n, _ in present]),
                bias=bias,
                idx=idx[gid_t],
                row_bias=None if bias is None else bias[gid_t],
                in_order=rows == list(range(len(implants))),
                one_each=gid == list(range(len(present))),
                groups=groups,
                add=add,
            )
        return _Batch(len(implants), layers)

    def install(self) -> None:
        """Count one more open block; the first puts a hook on every down-projection."""
        self._installed += 1
        if self._installed == 1:
            for layer, module in enumerate(find_down_projections(self.model, self.template).modules):
                self._hooks.append(module.register_forward_hook(self._hook(layer)))

    def remove(self) -> None:
        """Count one block less; the last takes the hooks off."""
        self._installed -= 1
        if self._installed == 0:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()

    def _hook(self, layer: int):
        local = self._local

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            batch: _Batch | None = getattr(local, "batch", None)
            lp = batch.layers.get(layer) if batch is not None else None
            if lp is None:
                return None
            x = inputs[0]
            n, rem = divmod(x.shape[0], batch.batch)
            if rem or not n:
                raise ImplantBankError(
                    f"The batch has {x.shape[0]} rows but the mixed block names implants for {batch.batch}; "
                    "give one implant (or None) per row."
                )
            if torch.is_grad_enabled() and out.requires_grad:
                out = out.clone()  # keep autograd's view of the base output intact
            rows, gid, idx, row_bias = (lp.rows, lp.gid, lp.idx, lp.row_bias) if n == 1 else _expanded(batch, layer, n)
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
            steps = batch.steps.get(o3.shape[1])
            if steps is None:
                steps = batch.steps[o3.shape[1]] = torch.arange(o3.shape[1], device=o3.device)[None, :, None]
            where = (rows[:, None, None], steps, idx[:, None, :])
            o3.index_put_(where, y + o3[where] if lp.add else y)
            return out

        return hook


def _expanded(batch: _Batch, layer: int, n: int) -> tuple:
    """`(rows, gid, idx, row_bias)` of `layer` once `generate` has repeated every batch row `n` times in place
    (beams, `num_return_sequences`: `repeat_interleave`)."""
    found = batch.expanded.get((layer, n))
    if found is None:
        lp = batch.layers[layer]
        rows = (lp.rows[:, None] * n + torch.arange(n, device=lp.rows.device)).reshape(-1)
        repeat = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        found = batch.expanded[(layer, n)] = (rows, repeat(lp.gid), repeat(lp.idx), repeat(lp.row_bias))
    return found
