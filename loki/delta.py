"""A `Delta`: new values for some down-projection rows of some layers, plus what names its base model.

A delta is built from a model that still holds its base rows, saved as a `.loki` file and applied later.

>>> import loki, torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
>>> delta = loki.implant.make_delta(model, {1: ([3, 7], torch.zeros(2, 32))}, name="two-zero-rows")
>>> delta.num_rows, delta.num_params, delta.layer_indices
(2, 64, [1])
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DeltaFormatError, DtypeError, InvalidIndicesError

FORMAT_NAME = "loki"
FORMAT_VERSION = 1
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Fingerprint: FINGERPRINT_SAMPLES entries of a layer's base rows, compared with this tolerance.
# The tolerance admits the same weights rounded to bf16 or fp16 (relative error <= 2**-8 + 2**-11, or an
# fp16 subnormal step), and nothing a real fine-tune produces: one sample off by more rejects the base.
FINGERPRINT_SAMPLES = 256
FINGERPRINT_RTOL = 2.0**-7
FINGERPRINT_ATOL = 1e-6

RowsLike = torch.Tensor | Sequence[Sequence[float]]


@dataclass(frozen=True, eq=False)
class LayerDelta:
    """One layer of a delta: sorted unique row `indices` and either new `rows` or LoRA factors (`lora_A @ lora_B`
    added to the base rows: the paper's LoKI*). `fingerprint` samples the base rows (formats/SPEC.md §6).

    Not checked on its own: `Delta` validates its layers.

    Args:
        indices: int64 `[k]`, CPU, sorted, unique.
        fingerprint: float32 `[S]`, `S = min(256, k * d_in)` (`fingerprint_of`).
        rows: `[k, d_in]` for the rows form, else None.
        lora_A, lora_B: `[k, r]` and `[r, d_in]` for the LoRA form, else None.

    >>> ld = LayerDelta(torch.tensor([0]), torch.zeros(2), rows=torch.ones(1, 2))
    >>> ld.k, ld.d_in, ld.num_params
    (1, 2, 2)
    """

    indices: torch.Tensor  # int64, CPU, sorted, unique
    fingerprint: torch.Tensor  # float32 [S]
    rows: torch.Tensor | None = None  # [k, d_in]
    lora_A: torch.Tensor | None = None  # [k, r]
    lora_B: torch.Tensor | None = None  # [r, d_in]

    @property
    def k(self) -> int:
        """Rows in this layer."""
        return int(self.indices.numel())

    @property
    def d_in(self) -> int:
        """Length of a row (`d_ff`)."""
        return (self.rows if self.rows is not None else self.lora_B).shape[1]

    @property
    def num_params(self) -> int:
        """Stored values: `k * d_in` for rows, `k * r + r * d_in` for LoRA factors."""
        if self.rows is not None:
            return self.rows.numel()
        return self.lora_A.numel() + self.lora_B.numel()

    def change(self, base_rows: torch.Tensor) -> torch.Tensor:
        """This layer's change, in float32: new rows minus `base_rows` (rows form), or `lora_A @ lora_B` (LoRA form,
        whatever `base_rows`). What `on_overlap="add"` adds (formats/SPEC.md §8).

        Args:
            base_rows: `[k, d_in]`, the base values of the rows.

        Returns:
            torch.Tensor: `[k, d_in]`, float32.

        >>> LayerDelta(torch.tensor([0]), torch.zeros(2), rows=torch.ones(1, 2)).change(torch.zeros(1, 2))
        tensor([[1., 1.]])
        """
        if self.rows is not None:
            return self.rows.float() - base_rows.float()
        return self.lora_A.float() @ self.lora_B.float()

    def new_rows(self, base_rows: torch.Tensor) -> torch.Tensor:
        """The rows this layer writes over `base_rows` (formats/SPEC.md §5), before conversion to the model's dtype.

        Args:
            base_rows: `[k, d_in]`, the base values of the rows.

        Returns:
            torch.Tensor: `[k, d_in]`: `rows` as stored (rows form), or `base_rows + lora_A @ lora_B` in float32.
        """
        if self.rows is not None:
            return self.rows
        return base_rows.float() + self.lora_A.float() @ self.lora_B.float()


@dataclass(eq=False)
class Delta:
    """New values for some down-projection rows. `info` is the JSON metadata of the `.loki` format (SPEC.md §4).

    The constructor copies the tensors and `info` (the delta owns them: what was validated is what gets applied)
    and validates the whole (`validate`). `loki.implant.make_delta` and `loki.extract` build deltas from a model;
    `loki.load` reads them.

    Args:
        layers: `{layer: LayerDelta}`.
        info: the metadata (`down_projection`, `base_model`, `form`, `dtype`, ...).

    Raises:
        DeltaFormatError: metadata missing, of the wrong type or not JSON-serialisable; no layers; a layer out of
            range; tensors missing, of the wrong shape, dtype or device, or not finite.
        InvalidIndicesError: indices not a 1-D int64 tensor, empty, unsorted, duplicated or out of range.

    >>> import loki, loki.testing
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"))
    >>> Delta(delta.layers, {**delta.info, "form": "full"})
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: Delta form must be 'rows' or 'lora', not 'full'.
    """

    layers: dict[int, LayerDelta]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A delta owns its tensors and metadata: what is validated here is what gets applied, whatever the
        # caller (or an optimizer still holding the trained rows) does to its own tensors afterwards.
        self.layers = (
            {i: _owned(l) for i, l in self.layers.items()} if isinstance(self.layers, Mapping) else self.layers
        )
        self.info = copy.deepcopy(self.info)
        validate(self)

    # -- the metadata people ask for ---------------------------------------------------------------
    @property
    def name(self) -> str:
        """`info["name"]`, or ""."""
        return self.info.get("name", "")

    @property
    def base_model(self) -> str | None:
        """The base model's id (`info["base_model"]["id"]`): a Hub id or folder, or None."""
        return self.info["base_model"].get("id")

    @property
    def form(self) -> str:
        """ "rows" (new rows) or "lora" (factors added to the base rows)."""
        return self.info["form"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the rows (or factors) are stored in."""
        return FLOAT_DTYPES[self.info["dtype"]]

    @property
    def layer_indices(self) -> list[int]:
        """The layers it changes, ascending."""
        return sorted(self.layers)

    @property
    def num_rows(self) -> int:
        """Rows it changes, over all layers."""
        return sum(layer.k for layer in self.layers.values())

    @property
    def num_params(self) -> int:
        """Stored values (rows or factors), over all layers."""
        return sum(layer.num_params for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (indices, fingerprints, rows or factors) in memory."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in _tensors(layer))

    def rows_per_layer(self) -> dict[int, int]:
        """`{layer: rows}`, ascending by layer.

        >>> import loki.testing
        >>> loki.testing.random_delta(loki.testing.tiny_model("llama"), q=10).rows_per_layer()
        {0: 3, 1: 3}
        """
        return {i: self.layers[i].k for i in self.layer_indices}

    def summary(self, file_size: int | None = None) -> str:
        """A human summary of the delta, as `loki inspect` prints it.

        Args:
            file_size: the `.loki` file's size in bytes, if known (adds a "size" line).

        Returns:
            str: one "key: value" line each (name, base model, architecture, form, rows, ...).

        >>> import loki.testing
        >>> print(loki.testing.random_delta(loki.testing.tiny_model("llama"), name="x").summary().splitlines()[0])
        name:         x
        """
        delta = self
        info = delta.info
        base, proj = info["base_model"], info["down_projection"]
        lines = [
            f"name:         {delta.name or '(unnamed)'}",
            f"base model:   {base.get('id') or '(unnamed)'}"
            + (f" @ {base['revision']}" if base.get("revision") else ""),
            f"architecture: {base.get('architecture')} ({base.get('model_type')}), {proj['num_layers']} layers, "
            f"down-projection {proj['d_out']}x{proj['d_in']} at {proj['template']}",
            f"form:         {info['form']}, stored as {info['dtype']}",
            f"rows:         {delta.num_rows} in {len(delta.layers)} layers, {delta.num_params:,} parameters",
        ]
        if file_size is not None:
            lines.append(f"size:         {file_size / 1e6:.2f} MB on disk")
        if info.get("description"):
            lines.append(f"description:  {info['description']}")
        for key in ("selection", "training"):
            if info.get(key):
                lines.append(f"{key + ':':<14}{json.dumps(info[key], sort_keys=True)}")
        counts = delta.rows_per_layer()
        lines.append("rows per layer: " + " ".join(f"{i}:{k}" for i, k in counts.items()))
        return "\n".join(lines)

    def to(self, dtype: torch.dtype) -> Delta:
        """The same delta with its rows (or factors) stored in `dtype`; indices and fingerprints unchanged.

        Args:
            dtype: torch.float32, torch.float16 or torch.bfloat16.

        Returns:
            Delta: a new delta (this one is unchanged).

        Raises:
            DtypeError: another dtype.
            DeltaFormatError: values out of float16's range (they become infinite).

        >>> import loki.testing
        >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"))
        >>> delta.dtype, delta.to(torch.bfloat16).dtype
        (torch.float32, torch.bfloat16)
        """
        name = dtype_name(dtype)
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


def _owned(layer: Any) -> Any:
    if not isinstance(layer, LayerDelta):
        return layer  # validate() says what is wrong
    copy = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return LayerDelta(
        copy(layer.indices), copy(layer.fingerprint), copy(layer.rows), copy(layer.lora_A), copy(layer.lora_B)
    )


def _tensors(layer: LayerDelta) -> list[torch.Tensor]:
    return [t for t in (layer.indices, layer.fingerprint, layer.rows, layer.lora_A, layer.lora_B) if t is not None]


def dtype_name(dtype: torch.dtype) -> str:
    """The `.loki` name of a row dtype (`FLOAT_DTYPES`).

    Args:
        dtype: a torch dtype.

    Returns:
        str: "float32", "float16" or "bfloat16".

    Raises:
        DtypeError: any other dtype.

    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise DtypeError(f"A delta stores rows as float32, float16 or bfloat16, not {dtype}.")


# -- fingerprint ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def fingerprint_positions(k: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled entries of a `[k, d_in]` block of base rows (formats/SPEC.md §6): for t = 0..S-1 with
    S = min(256, k*d_in), row position floor(t*k/S) and column (t*7919) mod d_in.

    Args:
        k: rows in the block.
        d_in: length of a row.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: int64 row positions (0..k-1, into the block) and columns, `[S]` each.

    >>> fingerprint_positions(2, 3)
    (tensor([0, 0, 0, 1, 1, 1]), tensor([0, 2, 1, 0, 2, 1]))
    """
    s = min(FINGERPRINT_SAMPLES, k * d_in)
    t = torch.arange(s, dtype=torch.int64)
    return t * k // s, t * 7919 % d_in


def fingerprint_of(base_rows: torch.Tensor) -> torch.Tensor:
    """The fingerprint of a `[k, d_in]` block of base rows (formats/SPEC.md §6): the `fingerprint_positions` samples.

    Args:
        base_rows: `[k, d_in]`, any float dtype and device.

    Returns:
        torch.Tensor: float32 `[S]`, on the CPU.

    >>> fingerprint_of(torch.arange(6.0).view(2, 3))
    tensor([0., 2., 1., 3., 5., 4.])
    """
    a, b = fingerprint_positions(*base_rows.shape)
    return base_rows[a.to(base_rows.device), b.to(base_rows.device)].float().cpu()  # the same entries as apply's take()


def fingerprint_tolerance(expected: torch.Tensor) -> torch.Tensor:
    """How far each sampled base value may be from `expected`: `2^-7 * |expected| + 1e-6` (formats/SPEC.md §6;
    admits the same weights rounded to bfloat16 or float16).

    Args:
        expected: a fingerprint, float32.

    Returns:
        torch.Tensor: the tolerance per sample.

    >>> fingerprint_tolerance(torch.tensor([1.0, 0.0]))
    tensor([7.8135e-03, 1.0000e-06])
    """
    return FINGERPRINT_RTOL * expected.abs() + FINGERPRINT_ATOL


# -- checks shared with the builders (loki.implant.make_delta) -----------------------------------------
def layer_number(layer: Any, num_layers: int) -> int:
    """`layer`, checked to be an int (not a bool) in `0..num_layers-1`.

    Raises:
        DeltaFormatError: anything else.

    >>> layer_number(1, 2)
    1
    >>> layer_number(2, 2)
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: Layer 2 does not exist: the model has layers 0..1.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise DeltaFormatError(f"Layer {layer!r} does not exist: the model has layers 0..{num_layers - 1}.")
    return layer


def as_indices(indices: Any, d_out: int, layer: int) -> torch.Tensor:
    """Row indices (a list or tensor of integers) as a checked int64 CPU tensor.

    Args:
        indices: 1-D integers, sorted, unique, in `[0, d_out)`.
        d_out: rows per layer (`d_model`).
        layer: the layer, for messages.

    Returns:
        torch.Tensor: int64 `[k]` on the CPU.

    Raises:
        InvalidIndicesError: not 1-D integers, or as `check_indices`.

    >>> as_indices([3, 7], 8, 0)
    tensor([3, 7])
    """
    t = torch.as_tensor(indices)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise InvalidIndicesError(
            f"Layer {layer}: row indices must be a 1-D list of integers, got {t.dtype} {tuple(t.shape)}."
        )
    t = t.to("cpu", torch.int64)
    check_indices(t, d_out, layer)
    return t


def check_indices(indices: torch.Tensor, d_out: int, layer: int) -> None:
    """Check row indices (formats/SPEC.md §7 step 4).

    Args:
        indices: an integer tensor `[k]`.
        d_out: rows per layer (`d_model`).
        layer: the layer, for messages.

    Raises:
        InvalidIndicesError: `indices` is empty, not sorted ascending, has a duplicate, or leaves `[0, d_out)`.

    >>> check_indices(torch.tensor([3, 3]), 8, 0)
    Traceback (most recent call last):
    ...
    loki.errors.InvalidIndicesError: Layer 0: row index 3 appears twice; each row may appear once.
    """
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
    """Check that `delta` is internally consistent, without a model (formats/SPEC.md §7 steps 3-4, on a `Delta`);
    `Delta()` calls it.

    Raises:
        DeltaFormatError: metadata missing, of the wrong type or not JSON-serialisable; no layers; a layer out of
            range; tensors missing, of the wrong shape, dtype or device, or not finite.
        InvalidIndicesError: indices not a 1-D int64 tensor, or as `check_indices`.
    """
    info = delta.info
    if not isinstance(info, dict):
        raise DeltaFormatError("Delta metadata must be a JSON object.")
    try:
        json.dumps(info, allow_nan=False)  # a reader parses strict JSON: no NaN or infinity (formats/SPEC.md §4)
    except TypeError as e:
        raise DeltaFormatError(f"Delta metadata must be JSON-serialisable: {e}") from None
    except ValueError as e:
        raise DeltaFormatError(f"Delta metadata must be strict JSON (no NaN or infinity): {e}") from None
    if "layers" in info:  # a file's 'layers' entry lists the delta's own layers, and a reader takes it out of info
        raise DeltaFormatError("Delta metadata: 'layers' is not metadata; a delta's layers are the keys of its layers.")
    proj = _require(info, "down_projection", dict)
    num_layers = _require(proj, "num_layers", int)
    d_out = _require(proj, "d_out", int)
    d_in = _require(proj, "d_in", int)
    _require(proj, "template", str)
    _require(proj, "transposed", bool)
    _require(info, "base_model", dict)
    form = _require(info, "form", str)
    if form not in ("rows", "lora"):
        raise DeltaFormatError(f"Delta form must be 'rows' or 'lora', not {form!r}.")
    declared = _require(info, "dtype", str)
    if declared not in FLOAT_DTYPES:
        raise DeltaFormatError(f"Delta dtype must be one of {sorted(FLOAT_DTYPES)}, not {declared!r}.")
    dtype = FLOAT_DTYPES[declared]
    if not isinstance(delta.layers, Mapping):
        raise DeltaFormatError(f"A Delta's layers are a dict layer -> LayerDelta, not {type(delta.layers).__name__}.")
    if not delta.layers:
        raise DeltaFormatError("The delta touches no layer.")
    for layer, ld in delta.layers.items():
        layer_number(layer, num_layers)
        if not isinstance(ld, LayerDelta):
            raise DeltaFormatError(
                f"Layer {layer}: a Delta's layers are LayerDelta objects, not {type(ld).__name__} "
                "(build deltas with loki.implant.make_delta)."
            )
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
