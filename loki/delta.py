"""A `Delta`: new values for some down-projection rows of some layers, plus what names its base model.

A delta is built from a model that still holds its base rows, saved as a `.loki` file and applied later.

>>> import loki, torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> delta = loki.make_delta(model, {1: ([3, 7], torch.zeros(2, 32))}, name="two-zero-rows")
>>> delta.num_rows, delta.num_params, delta.layer_indices
(2, 64, [1])
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from . import __version__
from .errors import DeltaFormatError, DtypeError, InvalidIndicesError
from .targets import find_down_projections

FORMAT_NAME = "loki"
FORMAT_VERSION = 1
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Fingerprint: FINGERPRINT_SAMPLES entries of a layer's base rows, compared with this tolerance.
# The tolerance admits the same weights rounded to bf16 or fp16 (relative error <= 2**-8 + 2**-11, or an
# fp16 subnormal step), and nothing a real fine-tune produces: one sample off by more rejects the base.
FINGERPRINT_SAMPLES = 256
FINGERPRINT_RTOL = 2.0**-7
FINGERPRINT_ATOL = 1e-6

RowsLike = Union[torch.Tensor, Sequence[Sequence[float]]]


@dataclass(frozen=True, eq=False)
class LayerDelta:
    """One layer of a delta: sorted unique row `indices` and either new `rows` or LoRA factors (`lora_A @ lora_B`
    added to the base rows). `fingerprint` samples the base rows (see `fingerprint_positions`)."""

    indices: torch.Tensor  # int64, CPU, sorted, unique
    fingerprint: torch.Tensor  # float32 [S]
    rows: torch.Tensor | None = None  # [k, d_in]
    lora_A: torch.Tensor | None = None  # [k, r]
    lora_B: torch.Tensor | None = None  # [r, d_in]

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def d_in(self) -> int:
        return (self.rows if self.rows is not None else self.lora_B).shape[1]

    @property
    def num_params(self) -> int:
        if self.rows is not None:
            return self.rows.numel()
        return self.lora_A.numel() + self.lora_B.numel()

    def change(self, base_rows: torch.Tensor) -> torch.Tensor:
        """New rows minus `base_rows`, in float32."""
        if self.rows is not None:
            return self.rows.float() - base_rows.float()
        return self.lora_A.float() @ self.lora_B.float()

    def new_rows(self, base_rows: torch.Tensor) -> torch.Tensor:
        """The rows this layer writes over `base_rows` (float32 for the factored form)."""
        if self.rows is not None:
            return self.rows
        return base_rows.float() + self.lora_A.float() @ self.lora_B.float()


@dataclass(eq=False)
class Delta:
    """New values for some down-projection rows. `info` is the JSON metadata of the `.loki` format."""

    layers: dict[int, LayerDelta]
    info: dict[str, Any] = field(default_factory=dict)
    # Per-device index tensors and fingerprint thresholds, built on first apply (see loki/apply.py).
    _staged: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    # -- the metadata people ask for ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.get("name", "")

    @property
    def base_model(self) -> str | None:
        return self.info["base_model"].get("id")

    @property
    def form(self) -> str:
        return self.info["form"]

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.info["dtype"]]

    @property
    def layer_indices(self) -> list[int]:
        return sorted(self.layers)

    @property
    def num_rows(self) -> int:
        return sum(layer.k for layer in self.layers.values())

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in _tensors(layer))

    def rows_per_layer(self) -> dict[int, int]:
        return {i: self.layers[i].k for i in self.layer_indices}

    def save(self, path: str | Path) -> Path:
        """Write this delta as a `.loki` file. `delta.save("x.loki")` is `loki.save(delta, "x.loki")`."""
        from .format import save

        return save(self, path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        **options: Any,
    ) -> Any:
        """Upload this delta and a generated model card to a Hugging Face Hub repo (created if needed); returns the
        `huggingface_hub.CommitInfo`. More `options` (`endpoint=`, `filename=`, `license=`, `tags=`): `loki.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, revision=revision, commit_message=commit_message,
                           token=token, **options)

    def to(self, dtype: torch.dtype) -> "Delta":
        """The same delta with its rows (or factors) stored in `dtype` (float32, float16 or bfloat16)."""
        name = _dtype_name(dtype)
        layers = {
            i: LayerDelta(
                indices=l.indices,
                fingerprint=l.fingerprint,
                rows=None if l.rows is None else l.rows.to(dtype),
                lora_A=None if l.lora_A is None else l.lora_A.to(dtype),
                lora_B=None if l.lora_B is None else l.lora_B.to(dtype),
            )
            for i, l in self.layers.items()
        }
        return Delta(layers, {**self.info, "dtype": name})

    def __repr__(self) -> str:
        return (
            f"Delta(name={self.name!r}, base_model={self.base_model!r}, form={self.form!r}, "
            f"layers={len(self.layers)}, rows={self.num_rows}, params={self.num_params}, dtype={self.info['dtype']})"
        )


def _tensors(layer: LayerDelta) -> list[torch.Tensor]:
    return [t for t in (layer.indices, layer.fingerprint, layer.rows, layer.lora_A, layer.lora_B) if t is not None]


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise DtypeError(f"A delta stores rows as float32, float16 or bfloat16, not {dtype}.")


# -- fingerprint ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def fingerprint_positions(k: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled entries of a `[k, d_in]` block of base rows: `(row position, column)` for t = 0..S-1,
    S = min(256, k*d_in), row position = floor(t*k/S), column = (t*7919) mod d_in."""
    s = min(FINGERPRINT_SAMPLES, k * d_in)
    t = torch.arange(s, dtype=torch.int64)
    return t * k // s, t * 7919 % d_in


def fingerprint_of(base_rows: torch.Tensor) -> torch.Tensor:
    """The fingerprint of a `[k, d_in]` block of base rows (float32, on CPU)."""
    a, b = fingerprint_positions(*base_rows.shape)
    return base_rows[a.to(base_rows.device), b.to(base_rows.device)].float().cpu()  # the same entries as apply's take()


def fingerprint_tolerance(expected: torch.Tensor) -> torch.Tensor:
    """How far each sampled base value may be from `expected`: rtol * |expected| + atol."""
    return FINGERPRINT_RTOL * expected.abs() + FINGERPRINT_ATOL


# -- building a delta from a model ------------------------------------------------------------------
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

    `model` must still hold its base rows at those indices (or have them covered by active loki deltas,
    whose saved originals are used): the fingerprint samples them. Rows are stored in `dtype`
    (default: the model's). `base_model` defaults to `model.config.name_or_path`.
    """
    from .apply import base_rows  # the state of applied deltas knows the originals of overwritten rows

    projs = find_down_projections(model, template)
    dtype = dtype or projs.weight.dtype
    layers: dict[int, LayerDelta] = {}
    forms = set()
    for layer, change in changes.items():
        layer = _layer_number(layer, len(projs))
        if len(change) not in (2, 3):
            raise DeltaFormatError(f"Layer {layer}: give (indices, rows) or (indices, lora_A, lora_B).")
        indices = _as_indices(change[0], projs.d_out, layer)
        base = base_rows(model, layer, indices, projs)
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
            "architecture": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "dtype": _dtype_name(projs.weight.dtype) if projs.weight.dtype in FLOAT_DTYPES.values() else None,
        },
        "target": {
            "template": projs.template,
            "transposed": projs.transposed,
            "num_layers": len(projs),
            "d_out": projs.d_out,
            "d_in": projs.d_in,
        },
        "form": forms.pop() if forms else "rows",
        "dtype": _dtype_name(dtype),
        "selection": dict(selection) if selection else None,
        "training": dict(training) if training else None,
        "extra": dict(extra) if extra else {},
        "library": {"name": "loki", "version": __version__},
    }
    return Delta(layers, info)


def _layer_number(layer: Any, num_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise DeltaFormatError(f"Layer {layer!r} does not exist: the model has layers 0..{num_layers - 1}.")
    return layer


def _as_indices(indices: Any, d_out: int, layer: int) -> torch.Tensor:
    t = torch.as_tensor(indices)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise InvalidIndicesError(f"Layer {layer}: row indices must be a 1-D list of integers, got {t.dtype} {tuple(t.shape)}.")
    t = t.to("cpu", torch.int64)
    check_indices(t, d_out, layer)
    return t


def check_indices(indices: torch.Tensor, d_out: int, layer: int) -> None:
    """Raise `InvalidIndicesError` unless `indices` are sorted, unique and in `[0, d_out)`."""
    if indices.numel() == 0:
        raise InvalidIndicesError(f"Layer {layer}: no row indices; leave the layer out instead.")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= d_out:
        raise InvalidIndicesError(
            f"Layer {layer}: row index {lo if lo < 0 else hi} is out of range; rows are 0..{d_out - 1} (d_model)."
        )
    steps = indices[1:] - indices[:-1]
    if bool((steps == 0).any()):
        dup = int(indices[1:][steps == 0][0])
        raise InvalidIndicesError(f"Layer {layer}: row index {dup} appears twice; each row may appear once.")
    if bool((steps < 0).any()):
        raise InvalidIndicesError(f"Layer {layer}: row indices must be sorted ascending (sort rows with them).")


# -- structural validation (no model needed) --------------------------------------------------------
def validate(delta: Delta) -> None:
    """Raise a `DeltaFormatError` subclass unless `delta` is internally consistent."""
    info = delta.info
    if not isinstance(info, dict):
        raise DeltaFormatError("Delta metadata must be a JSON object.")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as e:
        raise DeltaFormatError(f"Delta metadata must be JSON-serialisable: {e}") from None
    target = _require(info, "target", dict)
    num_layers = _require(target, "num_layers", int)
    d_out = _require(target, "d_out", int)
    d_in = _require(target, "d_in", int)
    _require(target, "template", str)
    _require(info, "base_model", dict)
    form = _require(info, "form", str)
    if form not in ("rows", "lora"):
        raise DeltaFormatError(f"Delta form must be 'rows' or 'lora', not {form!r}.")
    dtype_name = _require(info, "dtype", str)
    if dtype_name not in FLOAT_DTYPES:
        raise DeltaFormatError(f"Delta dtype must be one of {sorted(FLOAT_DTYPES)}, not {dtype_name!r}.")
    dtype = FLOAT_DTYPES[dtype_name]
    if not delta.layers:
        raise DeltaFormatError("The delta touches no layer.")
    for layer, ld in delta.layers.items():
        _layer_number(layer, num_layers)
        idx = ld.indices
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
            raise InvalidIndicesError(f"Layer {layer}: indices must be a 1-D int64 tensor in memory.")
        check_indices(idx, d_out, layer)
        k = idx.numel()
        s = min(FINGERPRINT_SAMPLES, k * d_in)
        _check_tensor(ld.fingerprint, (s,), torch.float32, f"layer {layer} fingerprint")
        if form == "rows":
            if ld.rows is None or ld.lora_A is not None or ld.lora_B is not None:
                raise DeltaFormatError(f"Layer {layer}: a 'rows' delta has rows and no LoRA factors.")
            _check_tensor(ld.rows, (k, d_in), dtype, f"layer {layer} rows")
        else:
            if ld.rows is not None or ld.lora_A is None or ld.lora_B is None:
                raise DeltaFormatError(f"Layer {layer}: a 'lora' delta has lora_A and lora_B and no rows.")
            r = ld.lora_A.shape[1] if ld.lora_A.dim() == 2 else -1
            _check_tensor(ld.lora_A, (k, r), dtype, f"layer {layer} lora_A")
            _check_tensor(ld.lora_B, (r, d_in), dtype, f"layer {layer} lora_B")


def _require(obj: dict, key: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DeltaFormatError(f"Delta metadata: {key!r} must be a {kind.__name__}, got {value!r}.")
    return value


def _check_tensor(t: Any, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DeltaFormatError(f"Tensor '{what}' is missing.")
    if tuple(t.shape) != tuple(shape) or min(shape) < 0:
        raise DeltaFormatError(f"Tensor '{what}' has shape {tuple(t.shape)}, expected {tuple(shape)}.")
    if t.dtype != dtype:
        raise DeltaFormatError(f"Tensor '{what}' is {t.dtype}, but the delta declares {dtype}.")
    if t.device.type != "cpu":
        raise DeltaFormatError(f"Tensor '{what}' must be on the CPU in a Delta (apply moves it to the model).")
    if not bool(torch.isfinite(t).all()):
        raise DeltaFormatError(f"Tensor '{what}' contains NaN or infinite values; the delta is corrupted.")
