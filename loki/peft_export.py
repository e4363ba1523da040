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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .delta import Delta
from .errors import ExportError
from .format import atomic_write
from .ledger import base_rows, compatible_projections, plan
from .projections import unwrap

__all__ = ["VLLM_MAX_LORA_RANK", "LargeRankWarning", "export_peft", "peft_adapter"]

VLLM_MAX_LORA_RANK = 512  # the largest max_lora_rank vLLM accepts
ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LargeRankWarning(UserWarning):
    """`peft_adapter`/`export_peft` made an adapter of a rank above `VLLM_MAX_LORA_RANK`: PEFT loads it, vLLM
    refuses it (and LoRAX, with vLLM's limit)."""


def base_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers whose module paths a PEFT adapter names: `torch.compile`, DDP,
    `DataParallel`, DeepSpeed (`loki.projections.unwrap`) and PEFT models (`get_base_model`), nested in any order.

    Args:
        model: a model or a wrapper around one.

    Returns:
        nn.Module: the innermost model (`model` itself when it has no wrapper).

    >>> import loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> base_model(torch.nn.DataParallel(torch.compile(model))) is model
    True
    """
    for _ in range(8):  # a PEFT model around a compiled one, or the other way round; never a cycle
        inner = unwrap(model)
        get_base = getattr(inner, "get_base_model", None)  # a PeftModel
        inner = unwrap(get_base()) if callable(get_base) else inner
        if inner is model:
            return model
        model = inner
    return model


def _check_arguments(rank: Any, dtype: Any) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"rank must be a positive int (the adapter's LoRA rank) or None, not {rank!r}.")
    if dtype not in ADAPTER_DTYPES:
        raise ExportError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (the adapter tensors'), not {dtype!r}."
        )


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
        rank: pad every layer to this rank, a positive int; None: the smallest that holds the delta (its largest
            `k`, or the LoRA rank). Above `VLLM_MAX_LORA_RANK` (512) a `LargeRankWarning` says vLLM will refuse it.
        dtype: the tensors' dtype: float32, float16 or bfloat16.

    Returns:
        tuple[dict, dict[str, torch.Tensor]]: the `adapter_config.json` contents, and the tensors by PEFT name
        (`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`), on the CPU. Module paths are those
        of the model inside its wrappers (`base_model`: `torch.compile`, DDP, `DataParallel`, PEFT), which is what
        `PeftModel.from_pretrained` is given.

    Raises:
        ExportError: a rows-form delta without `model`; `rank` not a positive int, or below what the delta
            needs; `dtype` not a float dtype an adapter holds.
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
        raise ExportError(
            f"peft_adapter/export_peft take a loki.Delta (loki.load reads files), not {type(delta).__name__}."
        )
    if delta.form == "rows" and model is None:
        raise ExportError(
            "A rows-form delta exports as new rows minus base rows: pass the base model, "
            "loki.export_peft(delta, folder, model)."
        )
    _check_arguments(rank, dtype)
    proj = delta.info["down_projection"]
    paths = {i: proj["template"].format(i=i) for i in delta.layer_indices}
    if model is not None:
        plan(model, delta, on_overlap="replace")  # apply's checks: shapes, dtype, base fingerprint (writes nothing)
        projs = compatible_projections(model, delta)
        # paths inside the wrappers: PEFT loads the adapter onto the plain model, not onto `_orig_mod.`/`module.`
        names = {id(m): n for n, m in base_model(model).named_modules()}
        paths = {i: names[id(projs.modules[i])] for i in delta.layer_indices}
    needed = max(ld.k if ld.rows is not None else ld.lora_A.shape[1] for ld in delta.layers.values())
    r = needed if rank is None else rank
    if r < needed:
        raise ExportError(f"This delta needs rank {needed} (its largest layer); rank={rank} is too small.")
    if r > VLLM_MAX_LORA_RANK:
        warnings.warn(
            f"The adapter has rank {r}: PEFT loads it, but vLLM refuses LoRA ranks above its largest "
            f"max_lora_rank, {VLLM_MAX_LORA_RANK}. For vLLM, select fewer rows per layer (a smaller q).",
            LargeRankWarning,
            stacklevel=2,
        )

    tensors: dict[str, torch.Tensor] = {}
    for layer, ld in sorted(delta.layers.items()):
        lora_a = torch.zeros(r, proj["d_in"], dtype=torch.float32)
        lora_b = torch.zeros(proj["d_out"], r, dtype=torch.float32)
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
        "fan_in_fan_out": bool(proj["transposed"]),  # GPT-2 Conv1D stores its weight [d_in, d_out]
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

    Warns:
        LargeRankWarning: the adapter's rank is above vLLM's largest `max_lora_rank` (512).

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
    from safetensors.torch import save

    config, tensors = peft_adapter(delta, model, rank=rank, dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all (an interrupted export leaves no half-written adapter behind a good config).
    atomic_write(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    card = ["---", "library_name: peft", "tags: [loki, lora]"]
    if config["base_model_name_or_path"]:
        card.append(f"base_model: {config['base_model_name_or_path']}")
    card += [
        "---",
        f"LoRA export (rank {config['r']}) of the loki delta `{delta.name or 'unnamed'}`: "
        f"{delta.num_rows} down-projection rows in {len(delta.layers)} layers.",
        "",
    ]
    atomic_write(folder / "README.md", "\n".join(card).encode())
    return folder
