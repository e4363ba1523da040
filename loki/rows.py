"""The trainable rows: train only the selected down-projection rows, at the cost of the frozen model.

`prepare` freezes the model and gives each selected layer a small trainable `nn.Parameter` holding its selected
rows (`loki_rows`, `[k, d_in]`), or LoRA factors of them (`loki_A` `[k, r]`, `loki_B` `[r, d_in]`, the paper's
LoKI*). Any optimizer or trainer can train them. `loki.extract` (`loki.implant`) turns them into a `.loki` delta;
`unprepare` gives the plain model back.

How the layer stays as cheap as the frozen one: before each forward the current rows (k x d_in) are written into
the frozen weight in place, the output is the ordinary `F.linear` of that weight (no per-step copy of the matrix,
no split, concatenate or gather), and the backward computes `grad_x = grad_y @ W` as the frozen layer does plus
one small matmul for the rows, `grad_rows = grad_y[..., idx]^T @ x`.

Several processes (`loki.distributed`): prepare the plain model, then wrap it in DDP, FSDP2 (`fully_shard`) or a
DeepSpeed ZeRO-1/2/3 engine; training and evaluation give one process's results. A sharding engine gathers the
weight from shards that hold the base rows before each use, so the rows are written again each time (in the
backward too) instead of only when they changed. `extract` gathers sharded rows (call it on every rank).
`prepare` refuses a model wrapped already, and FSDP1 (`FullyShardedDataParallel`) in either order.

>>> import loki, loki.testing
>>> model = loki.testing.tiny_model("llama")
>>> _ = loki.prepare(model, loki.Selection.random(num_layers=2, d_out=32, q=10, seed=0))
>>> [name for name, p in model.named_parameters() if p.requires_grad]
['model.layers.0.mlp.down_proj.loki_rows', 'model.layers.1.mlp.down_proj.loki_rows']
>>> # ... train with loki.train, a HF Trainer or your own loop ...
>>> delta = loki.extract(model, name="my-implant")
>>> delta.num_rows
6
>>> _ = loki.unprepare(model)  # the base model, bit for bit
"""

from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import FSDP1_ADVICE, is_sharded, wrapper
from .errors import DtypeError, IncompatibleModelError, PreparationError
from .ledger import claim_rows, release_rows
from .preserve import Preservation, project
from .projections import DownProjections, find_down_projections, unwrap
from .selection import Selection

__all__ = ["is_prepared", "prepare", "prepared_modules", "record_training", "unprepare"]

_PREFIX = "loki_"  # names of everything prepare adds to a down-projection module


@dataclass(eq=False)
class Prepared:
    """What `prepare` did to a model: its selection, form, modules and the flags to restore (`prepared_state`)."""

    selection: Selection
    lora_rank: int | None
    projs: DownProjections
    modules: dict[int, nn.Module]  # layer -> its down-projection module
    requires_grad: list[tuple[nn.Parameter, bool]]  # every original parameter and its flag before prepare
    training: dict[str, Any] = field(default_factory=dict)


_prepared: weakref.WeakKeyDictionary[nn.Module, Prepared] = weakref.WeakKeyDictionary()


# -- the layer ----------------------------------------------------------------------------------------
class _SelectedRowsLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` where `weight` already holds `rows` at `index`; the gradient goes to `x` and
    `rows` only (one `[k, d_in]` matmul for the rows). `managed_by`: the module, when a sharding engine gathers its
    weight again for the backward (else None)."""

    @staticmethod
    def forward(ctx, x, rows, weight, bias, index, managed_by):
        ctx.save_for_backward(x, index)
        # Not saved with save_for_backward: the in-place row writes bump its version, and a re-run forward
        # (activation checkpointing) writes the same values again.
        ctx.weight = weight
        ctx.rows_dtype = rows.dtype
        # FSDP2 and ZeRO-3 gather the weight again for the backward, from shards that hold the base rows: the
        # backward writes the rows again (a copy: the engine frees the gathered parameters after the forward).
        ctx.module, ctx.rows = (managed_by, rows.detach().clone()) if managed_by is not None else (None, None)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, index = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grad_x = grad_rows = None
        weight = ctx.weight
        if ctx.module is not None and ctx.needs_input_grad[0]:
            weight = _rows_view(ctx.module)
            with torch.no_grad():
                weight.index_copy_(0, index, ctx.rows)
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's precision, if autocast
            if ctx.needs_input_grad[0]:
                grad_x = grad_y.matmul(weight).to(x.dtype)
            if ctx.needs_input_grad[1]:
                g = grad_y.index_select(-1, index).reshape(-1, index.numel())
                grad_rows = g.t().matmul(x.reshape(-1, x.shape[-1])).to(ctx.rows_dtype)
        return grad_x, grad_rows, None, None, None, None


def _rows_view(module: nn.Module) -> torch.Tensor:
    """The module's weight as `[d_out, d_in]` (a transposed view for a GPT-2 Conv1D)."""
    return module.weight.t() if module._loki_transposed else module.weight


def _current_rows(module: nn.Module) -> torch.Tensor:
    """The selected rows as trained so far, in the weight's dtype (autograd reaches the trainable parameters)."""
    return rows_of(module, module.loki_rows, module.loki_A, module.loki_B).to(module.weight.dtype)


def rows_of(module: nn.Module, rows, a, b) -> torch.Tensor:
    """The selected rows that trainable tensors `rows` (or LoRA factors `a`, `b`) stand for: with a preservation,
    only their update's part outside the protected key directions (`loki.preserve`) counts."""
    keep = module.loki_keep
    if rows is not None:
        if keep is None:
            return rows
        base = module.loki_base.float()
        return base + project(rows.float() - base, keep, module._loki_keep_free)
    b = effective_b(module, b)
    # the same float32 arithmetic as LayerDelta.new_rows, so an extracted delta reproduces it bit for bit
    return module.loki_base.float() + a.float() @ b.float()


def effective_b(module: nn.Module, b: torch.Tensor) -> torch.Tensor:
    """LoRA's `B` as the forward uses it: with a preservation, projected off the protected key directions, in `b`'s
    dtype (an extracted delta holds this B and reproduces the rows bit for bit)."""
    if module.loki_keep is None:
        return b
    return project(b.float(), module.loki_keep, module._loki_keep_free).to(b.dtype)


def _managed(module: nn.Module) -> bool:
    """Whether a sharding engine gathers the module's weight anew for each use (FSDP2 swaps in another tensor,
    ZeRO-3 marks it with `ds_id`): the rows written into it last time are gone, whatever its version says."""
    return module.weight is not module._loki_weight() or hasattr(module.weight, "ds_id")


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(self, "_is_fsdp_managed_module", False) and self.weight._is_view():
        raise PreparationError(FSDP1_ADVICE)  # FSDP1 made the weight a view of its flat parameter
    view = _rows_view(self)
    trainable = [p for p in (self.loki_rows, self.loki_A, self.loki_B) if p is not None]
    managed = _managed(self)
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in trainable):
        # Inference (generate, evaluation): the plain layer, after writing the rows only if they changed.
        # Skipped when neither the trainable tensors nor the weight changed since the last write.
        key = None
        if not torch.compiler.is_compiling() and not managed:
            key = [(p.data_ptr(), p._version) for p in trainable] + [self.weight._version]
        if key is None or key != self._loki_synced:
            with torch.no_grad():
                view.index_copy_(0, self.loki_index, _current_rows(self))
            if key is not None:
                key[-1] = self.weight._version
            self._loki_synced = key
        return F.linear(x, view, self.bias)
    rows = _current_rows(self)
    with torch.no_grad():
        view.index_copy_(0, self.loki_index, rows.detach())  # k x d_in: keeps the weight in sync with the rows
    self._loki_synced = None  # the optimizer is about to change the rows
    return _SelectedRowsLinear.apply(x, rows, view, self.bias, self.loki_index, self if managed else None)


# -- prepare / unprepare ------------------------------------------------------------------------------
_WRAPPERS = {"ddp": "DistributedDataParallel", "fsdp2": "FSDP2 (fully_shard)", "deepspeed": "DeepSpeed"}


def _refuse_wrapped(model: nn.Module) -> None:
    kind = wrapper(model)
    if kind == "fsdp1":
        raise PreparationError(FSDP1_ADVICE)
    if kind is not None:
        raise PreparationError(
            f"The model is wrapped in {_WRAPPERS[kind]} already. Call loki.prepare on the plain model first, then "
            "wrap it: the wrapper only synchronises or shards the parameters it finds when it wraps the model, and "
            "loki.prepare adds the trainable rows."
        )


def prepare(
    model: nn.Module,
    selection: Selection,
    *,
    lora_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    template: str | None = None,
    preserve: Preservation | None = None,
) -> nn.Module:
    """Freeze every parameter of `model` and make exactly `selection`'s down-projection rows trainable, in place
    (stage 3 of LoKI: only the selected rows train, LoKI paper §3.3; with `lora_rank`, LoKI*: LoRA on those rows).

    Each selected layer gets `loki_rows` (`[k, d_in]`, starting at the base rows), or with `lora_rank=r` the
    factors `loki_A` (`[k, r]`, zeros) and `loki_B` (`[r, d_in]`, Kaiming-uniform from `seed`), rows =
    base + A @ B. The trainable tensors are kept in `dtype` (float32 by default: a master copy, so small updates
    are not lost to bf16 rounding); the forward runs in the model's dtype. The rows are claimed in the ledger:
    `loki.apply` refuses deltas on them until `unprepare`.

    With `preserve` (`loki.preservation`), the rows' update is kept off the key directions of the prompts to
    preserve: rows = base + (trained - base)(I - V V^T) (LoRA: base + A (B (I - V V^T))), whatever the optimizer
    does; `extract` gives those rows and records the preservation's summary in `training.preserve`.

    Args:
        model: a transformers causal LM, not prepared yet.
        selection: the rows to train, made for this model's shapes.
        lora_rank: train rank-`r` factors of the rows instead of the rows; None: the rows themselves.
        dtype: the trainable tensors' dtype.
        seed: for `loki_B`'s initialisation (LoRA only).
        template: the down-projection module path, for architectures loki does not know.
        preserve: the key directions to keep the update off (`loki.preservation` on this model), or None.

    Returns:
        nn.Module: `model`.

    Raises:
        PreparationError: the model is prepared already; `lora_rank` is not a positive int; a selected layer's
            module already has its own `forward` or `loki_` parameters (another wrapper); the model is wrapped in
            DDP, FSDP or DeepSpeed already (prepare first, then wrap; FSDP1 is not supported in either order).
        UnknownArchitectureError: loki cannot find the down-projections.
        IncompatibleModelError: the selection is for another layer count or `d_model`, or has no rows; `preserve` was
            computed for other shapes or misses a selected layer.
        PreparationError: (also) `preserve` protects every direction of a selected layer: nothing could train.
        DtypeError: the weights or `dtype` are not floats.
        OverlapError: an applied delta holds some of the selected rows.

    Nothing is changed when one is raised.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> _ = loki.prepare(model, loki.Selection.random(num_layers=2, d_out=32, q=10, seed=0), lora_rank=4)
    >>> sorted(name for name, p in model.named_parameters() if p.requires_grad)[:2]
    ['model.layers.0.mlp.down_proj.loki_A', 'model.layers.0.mlp.down_proj.loki_B']
    >>> _ = loki.unprepare(model)
    """
    if is_prepared(model):
        raise PreparationError("The model is prepared already. Call loki.unprepare(model) before preparing it again.")
    _refuse_wrapped(model)
    projs = find_down_projections(model, template)
    if (selection.num_layers, selection.d_out) != (len(projs), projs.d_out):
        raise IncompatibleModelError(
            f"The selection is for {selection.num_layers} layers of {selection.d_out} rows; the model has "
            f"{len(projs)} layers of {projs.d_out} rows (d_model). Select rows for this model."
        )
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise PreparationError(f"lora_rank must be a positive integer (the LoRA rank) or None, not {lora_rank!r}.")
    if not projs.weight.dtype.is_floating_point or not dtype.is_floating_point:
        raise DtypeError(
            f"loki trains float rows; the down-projection weight is {projs.weight.dtype} and dtype={dtype}. "
            "Load the model unquantized (float32, bfloat16 or float16)."
        )
    if not selection.rows:
        raise IncompatibleModelError("The selection has no rows; nothing would train.")
    if preserve is not None:
        if not isinstance(preserve, Preservation):
            raise PreparationError(
                f"preserve must be a loki.preservation(...) result or None, not {type(preserve).__name__}."
            )
        preserve.check(len(projs), projs.d_in, list(selection.rows))
        full = sorted(layer for layer in selection.rows if preserve.ranks[layer] >= projs.d_in)
        if full:
            raise PreparationError(
                f"The preservation protects every one of the {projs.d_in} key directions of layers {full}: their rows "
                "could not change. Preserve a smaller share of the energy (e.g. energy=0.99) or fewer tokens."
            )
    for layer in selection.rows:
        taken = [n for n in ("forward",) if n in vars(projs.modules[layer])]
        taken += [n for n, _ in projs.modules[layer].named_parameters(recurse=False) if n.startswith(_PREFIX)]
        if taken:
            raise PreparationError(
                f"Layer {layer}'s down-projection already has {taken} set on the instance (another wrapper, e.g. "
                "accelerate hooks or a second prepare). Prepare the plain model."
            )

    claim_rows(projs, selection.rows)  # apply refuses these rows from now on (raises if a delta holds them)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, _ in flags:
            p.requires_grad_(False)
        modules = {}
        for layer, idx in selection.rows.items():
            module = modules[layer] = projs.modules[layer]
            module._loki_transposed = projs.transposed
            module._loki_synced = None  # versions at the last write of the rows
            module._loki_weight = weakref.ref(module.weight)  # another tensor there later: a sharding engine's
            view = projs.rows(layer)
            index = idx.to(view.device)
            base = view.index_select(0, index)
            module.register_buffer("loki_index", index, persistent=False)
            module.register_buffer("loki_base", base, persistent=False)
            keep = None if preserve is None else preserve.bases[layer].to(view.device)
            module.register_buffer("loki_keep", keep, persistent=False)
            module._loki_keep_free = preserve is not None and preserve.free[layer]
            if lora_rank is None:
                module.loki_rows = nn.Parameter(base.to(dtype, copy=True))
                module.register_parameter("loki_A", None)
                module.register_parameter("loki_B", None)
            else:
                b = torch.empty(lora_rank, projs.d_in, dtype=torch.float32)
                nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)  # as PEFT initialises its lora_A
                module.register_parameter("loki_rows", None)
                module.loki_A = nn.Parameter(torch.zeros(len(idx), lora_rank, dtype=dtype, device=view.device))
                module.loki_B = nn.Parameter(b.to(view.device, dtype))
            module.forward = types.MethodType(_forward, module)
    _prepared[model] = Prepared(selection, lora_rank, projs, modules, flags)
    if preserve is not None:
        _prepared[model].training["preserve"] = preserve.summary()
    return model


def is_prepared(model: nn.Module) -> bool:
    """Whether `model` (or the model inside its `torch.compile`/DDP wrapper) is prepared by `loki.prepare` and not
    unprepared since.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> loki.rows.is_prepared(model)
    False
    >>> loki.rows.is_prepared(loki.prepare(model, loki.Selection.random(2, 32, q=10)))
    True
    """
    return model in _prepared or unwrap(model) in _prepared


def prepared_state(model: nn.Module) -> Prepared:
    """What `prepare` recorded for `model` (or the model inside its wrapper); PreparationError when not prepared."""
    state = _prepared.get(model)
    if state is None:
        state = _prepared.get(unwrap(model))  # extract/report through DDP, DeepSpeed or torch.compile
    if state is None:
        raise PreparationError(
            "The model is not prepared for implanting. Call loki.prepare(model, selection) first "
            "(see loki.Selection for choosing rows)."
        )
    return state


def unprepare(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove what `prepare` added, restore every parameter's `requires_grad` and release the rows in the ledger.

    Args:
        model: a prepared model (or its `torch.compile`/DDP wrapper).
        merge: False: the down-projections get their base rows back (bit-identical to before `prepare`); True: the
            trained rows stay written into the weights, as plain weights (not a revertible delta; export them
            with `save_pretrained`, or `extract` a delta before).

    Returns:
        nn.Module: `model`.

    Raises:
        PreparationError: the model is not prepared, or its rows are sharded by FSDP or ZeRO-3 (extract instead).

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> before = model.model.layers[0].mlp.down_proj.weight.clone()
    >>> _ = loki.prepare(model, loki.Selection.random(2, 32, q=10))
    >>> _ = loki.unprepare(model)
    >>> torch.equal(model.model.layers[0].mlp.down_proj.weight, before), loki.rows.is_prepared(model)
    (True, False)
    """
    state = prepared_state(model)
    if (
        any(is_sharded(p) for m in state.modules.values() for p in m.parameters(recurse=False))
        or wrapper(model) == "fsdp1"
    ):
        raise PreparationError(
            "The model's rows are sharded (FSDP or DeepSpeed ZeRO-3): unprepare would remove parameters the "
            "engine manages. loki.extract(model) on every rank, then loki.apply the delta to a plain model."
        )
    trained = {layer: m.loki_index for layer, m in state.modules.items()}
    with torch.no_grad():
        for module in state.modules.values():
            rows = _current_rows(module) if merge else module.loki_base
            _rows_view(module).index_copy_(0, module.loki_index, rows)
            for name in (
                "loki_rows",
                "loki_A",
                "loki_B",
                "loki_index",
                "loki_base",
                "loki_keep",
                "_loki_keep_free",
                "_loki_transposed",
                "_loki_synced",
                "_loki_weight",
                "forward",
            ):
                delattr(module, name)
        for p, flag in state.requires_grad:
            p.requires_grad_(flag)
        release_rows(state.projs, trained)
    del _prepared[model if model in _prepared else unwrap(model)]
    return model


def record_training(model: nn.Module, summary: dict[str, Any]) -> None:
    """Remember a training summary for the metadata of `extract` (loki.train calls this; so may your loop)."""
    prepared_state(model).training.update(summary)


def prepared_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The down-projection modules `prepare` made trainable, by layer (found with the `template` it was given).

    Args:
        model: a prepared model (or its `torch.compile`/DDP/DeepSpeed wrapper).

    Returns:
        dict[int, nn.Module]: layer -> module, ascending; each has `loki_index`, `loki_base` and `loki_rows` (or
        `loki_A`/`loki_B`).

    Raises:
        PreparationError: the model is not prepared.

    >>> import loki, loki.testing
    >>> model = loki.prepare(loki.testing.tiny_model("llama"), loki.Selection.random(2, 32, q=10))
    >>> {layer: m.loki_index.numel() for layer, m in prepared_modules(model).items()}
    {0: 3, 1: 3}
    """
    return dict(sorted(prepared_state(model).modules.items()))


def trainable_count(state: Prepared) -> int:
    """Parameters that train (a ZeRO-3 parameter counted whole)."""
    return sum(  # ds_numel: a ZeRO-3 parameter's own numel is its partition's
        getattr(p, "ds_numel", p.numel())
        for m in state.modules.values()
        for p in (m.loki_rows, m.loki_A, m.loki_B)
        if p is not None
    )
