"""Export a delta as an exact PEFT LoRA adapter, for serving stacks that only take LoRA (PEFT, vLLM, LoRAX).

A delta replaces rows S of a down-projection W by R: `W' = W + E_S (R - W_S)`, where E_S is the one-hot
`[d_out, k]` matrix that puts row i of a `[k, d_in]` block at row S[i]. That is a LoRA of rank k, in PEFT's naming
(`out = W x + lora_B(lora_A(x)) * lora_alpha / r`): `lora_A.weight = R - W_S` `[k, d_in]`, `lora_B.weight = E_S`
`[d_out, k]`, `lora_alpha = r`. A LoRA-form delta (`W_S += A @ B`, A `[k, r]`, B `[r, d_in]`) keeps its own rank r:
`lora_A.weight = B`, `lora_B.weight = E_S A`. Layers with a smaller rank are padded with zero components, so every
layer has one rank `r` (PEFT needs `rank_pattern` otherwise, vLLM and LoRAX one rank per adapter); pass `rank=` to pad
further, e.g. up to a `max_lora_rank` your server accepts (vLLM: 8, 16, 32, 64, 128, 256, 320 or 512).

>>> import loki, loki.testing, tempfile
>>> model = loki.testing.tiny_model("llama")
>>> delta = loki.testing.random_delta(model, q=10)
>>> config, tensors = loki.peft_export.peft_adapter(delta, model)
>>> config["r"], config["lora_alpha"], sorted(tensors)[0]
(3, 3, 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')
>>> folder = loki.export_peft(delta, tempfile.mkdtemp(), model)   # PeftModel.from_pretrained(model, folder)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import base_rows, compatible_projections, plan
from .delta import Delta
from .errors import ExportError

__all__ = ["export_peft", "peft_adapter"]


def peft_adapter(
    delta: Delta, model: nn.Module | None = None, *, rank: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(adapter_config, tensors)` of the PEFT LoRA adapter equal to `delta`, in PEFT's convention (module
    docstring: `lora_A.weight` `[r, d_in]`, `lora_B.weight` `[d_out, r]`, `lora_alpha = r`, so the scale is 1).

    Args:
        delta: a `Delta`.
        model: its base model: needed for a rows-form delta (the adapter holds new rows minus base rows; applied
            loki deltas are seen through); with it, the delta is checked as `loki.plan` does and module paths are
            the model's own (else the delta's template).
        rank: pad every layer to this rank; None: the smallest that holds the delta (its largest `k`, or the LoRA
            rank).
        dtype: the tensors' dtype.

    Returns:
        tuple[dict, dict[str, torch.Tensor]]: the `adapter_config.json` contents, and the tensors by PEFT name
        (`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`), on the CPU.

    Raises:
        ExportError: a rows-form delta without `model`, or `rank` below what the delta needs.
        IncompatibleModelError, UnknownArchitectureError, BaseModelMismatchError, DtypeError, OverlapError,
            LedgerError: with `model`, as `loki.plan` with `on_overlap="replace"` (e.g. `OverlapError` for rows a
            prepared model trains).

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> delta = loki.testing.random_delta(model, q=10)
    >>> config, tensors = peft_adapter(delta, model)
    >>> config["target_modules"], tuple(tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape)
    (['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj'], (32, 3))
    >>> peft_adapter(delta)
    Traceback (most recent call last):
    ...
    loki.errors.ExportError: A rows-form delta exports as new rows minus base rows: pass the base model, ...
    """
    if not isinstance(delta, Delta):
        raise ExportError(f"peft_adapter/export_peft take a loki.Delta (loki.load reads files), not {type(delta).__name__}.")
    if delta.form == "rows" and model is None:
        raise ExportError(
            "A rows-form delta exports as new rows minus base rows: pass the base model, "
            "loki.export_peft(delta, folder, model)."
        )
    target = delta.info["target"]
    paths = {i: target["template"].format(i=i) for i in delta.layer_indices}
    if model is not None:
        plan(model, delta, on_overlap="replace")  # apply's checks: shapes, dtype, base fingerprint (writes nothing)
        projs = compatible_projections(model, delta)
        names = {id(m): n for n, m in model.named_modules()}
        paths = {i: names[id(projs.modules[i])] for i in delta.layer_indices}
    needed = max(ld.k if ld.rows is not None else ld.lora_A.shape[1] for ld in delta.layers.values())
    r = needed if rank is None else rank
    if r < needed:
        raise ExportError(f"This delta needs rank {needed} (its largest layer); rank={rank} is too small.")

    tensors: dict[str, torch.Tensor] = {}
    for layer, ld in sorted(delta.layers.items()):
        lora_a = torch.zeros(r, target["d_in"], dtype=torch.float32)
        lora_b = torch.zeros(target["d_out"], r, dtype=torch.float32)
        if ld.rows is not None:
            lora_a[: ld.k] = ld.change(base_rows(model, layer, ld.indices, projs).cpu())
            lora_b[ld.indices, torch.arange(ld.k)] = 1.0
        else:
            lora_a[: ld.lora_B.shape[0]] = ld.lora_B.float()
            lora_b[ld.indices, : ld.lora_A.shape[1]] = ld.lora_A.float()
        prefix = f"base_model.model.{paths[layer]}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    base = delta.info["base_model"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.get("id"),
        "revision": base.get("revision"),
        "r": r,
        "lora_alpha": r,  # scale lora_alpha / r = 1: the adapter adds exactly lora_B @ lora_A
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [paths[i] for i in delta.layer_indices],
        "fan_in_fan_out": bool(target["transposed"]),  # GPT-2 Conv1D stores its weight [d_in, d_out]
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    return config, tensors


def export_peft(
    delta: Delta,
    folder: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `delta` as a PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`,
    `README.md`); `PeftModel.from_pretrained(model, folder)` then computes the implanted model.

    Args:
        delta: a `Delta`.
        folder: the adapter folder (created if needed; files in it are replaced).
        model, rank, dtype: as `peft_adapter`.

    Returns:
        Path: `folder`.

    Raises:
        ExportError, IncompatibleModelError, UnknownArchitectureError, BaseModelMismatchError, DtypeError,
            OverlapError, LedgerError: as `peft_adapter` (before anything is written).
        OSError: the folder cannot be written.

    >>> import loki, loki.testing, tempfile
    >>> model = loki.testing.tiny_model("llama")
    >>> folder = loki.export_peft(loki.testing.random_delta(model), tempfile.mkdtemp(), model)
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.torch import save_file

    config, tensors = peft_adapter(delta, model, rank=rank, dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = ["---", "library_name: peft", "tags: [loki, lora]"]
    if config["base_model_name_or_path"]:
        card.append(f"base_model: {config['base_model_name_or_path']}")
    card += [
        "---",
        f"LoRA export (rank {config['r']}) of the loki delta `{delta.name or 'unnamed'}`: "
        f"{delta.num_rows} down-projection rows in {len(delta.layers)} layers.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(card))
    return folder
