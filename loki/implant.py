"""Building deltas: `extract` (the trained rows of a prepared model), `make_delta` (from given rows or LoRA
factors), `suppression` (zeroed rows), and `trainable_report` (what a prepared model trains and its delta's size).

The trainable rows themselves (`prepare`, `unprepare`) are `loki.rows`.

>>> import loki, loki.testing
>>> model = loki.prepare(loki.testing.tiny_model("llama"), loki.Selection.random(num_layers=2, d_out=32, q=10))
>>> delta = loki.extract(model, name="my-implant")
>>> delta.num_rows
6
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .delta import FLOAT_DTYPES, Delta, LayerDelta, as_indices, dtype_name, fingerprint_of, layer_number
from .distributed import FSDP1_ADVICE, full_tensor, gathered, plain_class, wrapper
from .errors import DeltaFormatError, PreparationError, SelectionError
from .ledger import base_rows
from .projections import DownProjections, find_down_projections, unwrap
from .rows import effective_b, prepared_state, rows_of, trainable_count
from .selection import Selection
from .version import __version__

__all__ = ["TrainableReport", "extract", "make_delta", "suppression", "trainable_report"]


# -- extract --------------------------------------------------------------------------------------------
def extract(
    model: nn.Module,
    *,
    name: str = "",
    description: str = "",
    base_model: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Delta:
    """The trained rows (or LoRA factors) of a prepared `model` as a `Delta`, ready for `loki.save(delta, "x.loki")`.

    The metadata records the selection's provenance and a training summary (what `loki.train` recorded, updated
    with `training`); the fingerprint samples the base rows `prepare` kept. The model is left as it was (still
    prepared), and the delta holds copies (training on does not change it). Rows sharded by FSDP2 or DeepSpeed
    ZeRO-3 are gathered: call `extract` on every rank (a collective), e.g. then save on rank 0.

    Args:
        model: a prepared model, or its `torch.compile`, DDP, FSDP2 or DeepSpeed wrapper.
        name, description: the delta's name and description.
        base_model, revision: the base model's Hub id or folder and revision; default `config.name_or_path`.
        dtype: storage dtype; default what reproduces the trained model exactly: the model's dtype for rows, the
            factors' dtype for LoRA.
        training: entries added to the training summary.
        extra: free-form JSON metadata (`extra["evaluation"]` feeds the Hub model card).

    Returns:
        Delta.

    Raises:
        PreparationError: the model is not prepared, or wrapped in FSDP1 (use FSDP2 `fully_shard`).
        DtypeError: `dtype` is not float32, float16 or bfloat16.
        DeltaFormatError: `training` or `extra` is not JSON-serialisable.

    >>> import loki, loki.testing
    >>> model = loki.prepare(loki.testing.tiny_model("llama"), loki.Selection.random(2, 32, q=10))
    >>> delta = loki.extract(model, name="x")
    >>> delta.name, delta.form, delta.num_rows, delta.info["training"]["method"]
    ('x', 'rows', 6, 'loki')
    """
    if wrapper(model) == "fsdp1":
        raise PreparationError(FSDP1_ADVICE)
    state = prepared_state(model)
    changes: dict[int, tuple] = {}
    trainable = [p for m in state.modules.values() for p in (m.loki_rows, m.loki_A, m.loki_B) if p is not None]
    with torch.no_grad(), gathered(trainable):  # every rank gathers its shards (FSDP2, ZeRO-3), in layer order
        for layer, module in state.modules.items():
            idx = module.loki_index.cpu()
            base = module.loki_base.cpu()
            if state.lora_rank is None:  # copies: ZeRO-3 empties its parameters when the block ends
                rows = rows_of(module, full_tensor(module.loki_rows), None, None).to(base.dtype)
                changes[layer] = (idx, rows.to("cpu", copy=True), base)
            else:
                a, b = full_tensor(module.loki_A), effective_b(module, full_tensor(module.loki_B))
                changes[layer] = (idx, a.to("cpu", copy=True), b.to("cpu", copy=True), base)
    if dtype is None and state.lora_rank is not None:
        dtype = next(iter(state.modules.values())).loki_A.dtype
    summary = {
        "method": "loki" if state.lora_rank is None else "loki-lora",
        "lora_rank": state.lora_rank,
        "trainable_params": trainable_count(state),
        **state.training,
        **(training or {}),
    }
    # The fingerprint is of the base rows prepare kept: the weights hold the trained rows (or, sharded, only a part).
    bases = {layer: change[-1] for layer, change in changes.items()}
    return _delta_from(
        unwrap(model),
        {layer: change[:-1] for layer, change in changes.items()},
        state.projs,
        bases,
        name=name,
        description=description,
        base_model=base_model,
        revision=revision,
        dtype=dtype,
        selection=state.selection.provenance(),
        training=summary,
        extra=extra,
    )


# -- building deltas from a model -----------------------------------------------------------------------
def make_delta(
    model: nn.Module,
    changes: Mapping[int, tuple],
    *,
    name: str = "",
    description: str = "",
    base_model: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    selection: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    template: str | None = None,
) -> Delta:
    """A delta for `model` from `{layer: (indices, rows)}` or `{layer: (indices, lora_A, lora_B)}`.

    `model` must still hold its base rows at those indices (or have them covered by applied loki deltas,
    whose saved originals are used): the fingerprint samples them (formats/SPEC.md §6).

    Args:
        model: the base model.
        changes: per layer, sorted unique row indices and either the new rows `[k, d_in]` or LoRA factors
            `[k, r]`, `[r, d_in]`; all layers of one form.
        name, description: the delta's name and description.
        base_model, revision: the base model's Hub id or folder and revision; default `config.name_or_path`.
        dtype: storage dtype; default the model's.
        selection, training, extra: JSON metadata (formats/SPEC.md §4).
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        Delta.

    Raises:
        UnknownArchitectureError: loki cannot find the down-projections.
        DeltaFormatError: no layers; a layer that is not an int in range; an entry that is not a 2- or 3-tuple;
            rows and factors mixed; tensors of the wrong shape or not finite; metadata not JSON-serialisable.
        InvalidIndicesError: indices not 1-D integers, empty, unsorted, duplicated or out of range.
        DtypeError: `dtype` (or the model's, by default) is not float32, float16 or bfloat16.

    >>> import loki, loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> delta = loki.implant.make_delta(model, {1: ([3, 7], torch.zeros(2, 64))}, name="zeros")
    >>> delta.form, delta.rows_per_layer(), delta.base_model
    ('rows', {1: 2}, 'tiny-random/llama-seed0')
    """
    return _delta_from(
        model,
        changes,
        find_down_projections(model, template),
        None,
        name=name,
        description=description,
        base_model=base_model,
        revision=revision,
        dtype=dtype,
        selection=selection,
        training=training,
        extra=extra,
    )


def _delta_from(
    model: nn.Module,
    changes: Mapping[int, tuple],
    projs: DownProjections,
    bases: Mapping[int, torch.Tensor] | None,
    *,
    name: str,
    description: str,
    base_model: str | None,
    revision: str | None,
    dtype: torch.dtype | None,
    selection: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
) -> Delta:
    """`make_delta` with the down-projections found, and with the base rows when the caller has them (else
    they are read from the model)."""
    dtype = dtype or projs.weight.dtype
    layers: dict[int, LayerDelta] = {}
    forms = set()
    for layer, change in changes.items():
        layer = layer_number(layer, len(projs))
        if len(change) not in (2, 3):
            raise DeltaFormatError(f"Layer {layer}: give (indices, rows) or (indices, lora_A, lora_B).")
        indices = as_indices(change[0], projs.d_out, layer)
        base = bases[layer] if bases is not None else base_rows(model, layer, indices, projs)
        if len(change) == 2:
            forms.add("rows")
            rows = torch.as_tensor(change[1]).detach().to("cpu", dtype)
            layers[layer] = LayerDelta(indices, fingerprint_of(base), rows=rows)
        else:
            forms.add("lora")
            a = torch.as_tensor(change[1]).detach().to("cpu", dtype)
            b = torch.as_tensor(change[2]).detach().to("cpu", dtype)
            layers[layer] = LayerDelta(indices, fingerprint_of(base), lora_A=a, lora_B=b)
    if len(forms) > 1:
        raise DeltaFormatError("A delta is either all rows or all LoRA factors; split it into two deltas.")
    config = getattr(model, "config", None)
    info = {
        "name": name,
        "description": description,
        "base_model": {
            "id": base_model or getattr(config, "name_or_path", None) or None,
            "revision": revision,
            "architecture": plain_class(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "dtype": dtype_name(projs.weight.dtype) if projs.weight.dtype in FLOAT_DTYPES.values() else None,
        },
        "down_projection": {
            "template": projs.template,
            "transposed": projs.transposed,
            "num_layers": len(projs),
            "d_out": projs.d_out,
            "d_in": projs.d_in,
        },
        "form": forms.pop() if forms else "rows",
        "dtype": dtype_name(dtype),
        "selection": dict(selection) if selection else None,
        "training": dict(training) if training else None,
        "extra": dict(extra) if extra else {},
        "library": {"name": "loki", "version": __version__},
    }
    return Delta(layers, info)


def suppression(
    model: nn.Module, selection: Selection, *, name: str | None = None, template: str | None = None
) -> Delta:
    """A delta that zeroes `selection`'s rows of `model` (the paper's suppression ablation, section 4.3);
    `loki.apply` it, or use it in `with loki.implanted(model, ...)`, and revert it to undo.

    Args:
        model: the base model.
        selection: the rows to zero, made for this model's shapes.
        name: the delta's name; default `"suppress-<strategy>-q<q>"`.
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        Delta: rows form, stored in the model's dtype.

    Raises:
        SelectionError: the selection was made for other shapes.
        UnknownArchitectureError: loki cannot find the down-projections.
        DeltaFormatError: the selection has no rows.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> zeroed = loki.implant.suppression(model, loki.Selection.random(2, 32, q=10))
    >>> zeroed.num_rows
    6
    """
    projs = find_down_projections(model, template)
    if (selection.num_layers, selection.d_out) != (len(projs), projs.d_out):
        raise SelectionError(
            f"This selection is for {selection.num_layers} layers x {selection.d_out} rows, the model has "
            f"{len(projs)} x {projs.d_out}; make the selection from attributions of this model."
        )
    changes = {
        layer: (idx, torch.zeros(idx.numel(), projs.d_in, dtype=projs.weight.dtype))
        for layer, idx in selection.rows.items()
    }
    return make_delta(
        model,
        changes,
        name=name or f"suppress-{selection.strategy}-q{selection.q}",
        description=f"Zeroes the {selection.num_rows} rows of a {selection.strategy} selection (damage probe).",
        selection=selection.provenance(),
        template=template,
    )


# -- report ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainableReport:
    """Trainable parameters of a prepared model, as the paper's tables give them (`trainable_report` makes it;
    `str()` is one line)."""

    trainable: int  # parameters that train
    total: int  # parameters of the base model
    rows: int  # selected rows, over all layers
    layers: int  # layers with selected rows
    form: str  # "rows" or "lora"
    delta_bytes: int  # size of the extracted `.loki` file

    @property
    def share(self) -> float:
        """Trainable parameters as a percentage of the base model's."""
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} ({self.share:.2f}% of {self.total:,}) | "
            f"{self.rows:,} rows in {self.layers} layers ({self.form}) | delta: {size_text(self.delta_bytes)} on disk"
        )


def size_text(n: int) -> str:
    """`n` bytes as "5.34 MB" or "812.0 kB"."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count, share of the model and `.loki` size of what a prepared `model` trains.

    Args:
        model: a prepared model (or its `torch.compile`/DDP wrapper).

    Returns:
        TrainableReport: `total` counts the model's parameters before `prepare`; `delta_bytes` is the size of
        `extract(model)`'s file.

    Raises:
        PreparationError: the model is not prepared.

    >>> import loki, loki.testing
    >>> model = loki.prepare(loki.testing.tiny_model("llama"), loki.Selection.random(2, 32, q=10), lora_rank=2)
    >>> print(loki.implant.trainable_report(model))
    trainable params: 268 (1.00% of 26,784) | 6 rows in 2 layers (lora) | delta: 4.0 kB on disk
    >>> # on SmolLM2-135M, q=10 (rows):
    >>> # trainable params: 2,626,560 (1.95% of 134,515,008) | 1,710 rows in 30 layers (rows) | delta: 5.34 MB on disk
    """
    from .format import to_bytes

    state = prepared_state(model)
    total = sum(getattr(p, "ds_numel", p.numel()) for p, _ in state.requires_grad)  # ZeRO-3: its partition's
    return TrainableReport(
        trainable=trainable_count(state),
        total=total,
        rows=state.selection.num_rows,
        layers=len(state.modules),
        form="rows" if state.lora_rank is None else "lora",
        delta_bytes=len(to_bytes(extract(model))),
    )
