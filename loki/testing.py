"""Tiny random-weight models of every supported family, for tests, examples and quick CI runs.

>>> import loki.testing
>>> model = loki.testing.tiny_model("gpt2")
>>> type(model).__name__
'GPT2LMHeadModel'
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt")


def tiny_config(family: str, *, layers: int = 2, d_model: int = 32, d_ff: int = 64, vocab: int = 128):
    """A config of `family` small enough to build and run in milliseconds (4 attention heads, 128 positions,
    token ids 0/1/2 = pad/BOS/EOS).

    Args:
        family: one of `FAMILIES` (a `model_type`).
        layers: decoder layers.
        d_model: hidden size (rows per down-projection).
        d_ff: FFN size (length of a row).
        vocab: vocabulary size.

    Returns:
        transformers.PretrainedConfig: of that family.

    Raises:
        ValueError: an unknown family (a plain `ValueError`, not a `LokiError`).

    >>> config = tiny_config("gpt2", layers=3)
    >>> type(config).__name__, config.n_layer, config.n_embd, config.n_inner
    ('GPT2Config', 3, 32, 64)
    """
    heads = 4
    common = dict(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    head_dim = dict(head_dim=d_model // heads)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, **head_dim),
        "mistral": lambda: transformers.MistralConfig(**common),
        "gemma": lambda: transformers.GemmaConfig(**common, **head_dim),
        "gemma2": lambda: transformers.Gemma2Config(**common, **head_dim),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**common, **head_dim),
        "phi3": lambda: transformers.Phi3Config(**common),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=d_model,
            n_inner=d_ff,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            ffn_dim=d_ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            word_embed_proj_dim=d_model,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    }
    if family not in configs:
        raise ValueError(f"Unknown family {family!r}; choose from {FAMILIES}.")
    return configs[family]()


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes
) -> transformers.PreTrainedModel:
    """A random-weight causal LM of `family` in eval mode; the same `seed` gives the same weights.

    Args:
        family: one of `FAMILIES`.
        seed: seeds torch's global RNG (`torch.manual_seed`) before the weights are drawn.
        dtype: the weights' dtype.
        **sizes: `tiny_config`'s `layers`, `d_model`, `d_ff`, `vocab`.

    Returns:
        transformers.PreTrainedModel: `config.name_or_path` is `"tiny-random/<family>-seed<seed>"`.

    Raises:
        ValueError: an unknown family.

    >>> model = tiny_model("qwen2", d_model=64, dtype=torch.bfloat16)
    >>> model.config.name_or_path, model.dtype, model.config.hidden_size
    ('tiny-random/qwen2-seed0', torch.bfloat16, 64)
    """
    torch.manual_seed(seed)
    config = tiny_config(family, **sizes)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"tiny-random/{family}-seed{seed}"
    return model.eval()


def random_delta(
    model: torch.nn.Module,
    *,
    q: float = 10,
    seed: int = 0,
    noise: float = 0.02,
    name: str = "",
    lora_rank: int | None = None,
    dtype: torch.dtype | None = None,
    layers: list[int] | None = None,
):
    """A `Delta` for `model` on `Selection.random(..., q, seed)` rows: the base rows plus `noise` * N(0, 1) (or,
    with `lora_rank`, random LoRA factors of that size). No training: for tests, examples and benchmarks.

    Args:
        model: the base model (any supported family).
        q: the quota in percent of rows per layer.
        seed: seeds the rows chosen (`seed`) and the noise (`seed + 1`).
        noise: standard deviation of the change (rows form) or scale of the `A` factor (LoRA form).
        name: the delta's name.
        lora_rank: make a LoRA-form delta with factors `A` `[k, r]`, `B` `[r, d_in]` of this rank; None: rows form.
        dtype: the delta's storage dtype; None: `make_delta`'s default.
        layers: only these layers; None: all.

    Returns:
        Delta: made with `make_delta`, its `selection` metadata the random selection's provenance.

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> loki.testing.random_delta(model, q=10, name="x").rows_per_layer()
    {0: 3, 1: 3}
    >>> loki.testing.random_delta(model, lora_rank=2, layers=[1]).info["form"]
    'lora'
    """
    from .implant import make_delta
    from .ledger import base_rows
    from .projections import find_down_projections
    from .selection import Selection

    projs = find_down_projections(model)
    selection = Selection.random(len(projs), projs.d_out, q, seed)
    g = torch.Generator().manual_seed(seed + 1)
    changes = {}
    for layer in range(len(projs)) if layers is None else layers:
        idx = selection.rows[layer].sort().values
        if lora_rank:
            a = noise * torch.randn(len(idx), lora_rank, generator=g)
            changes[layer] = (idx, a, torch.randn(lora_rank, projs.d_in, generator=g))
        else:
            base = base_rows(model, layer, idx, projs).float().cpu()
            changes[layer] = (idx, base + noise * torch.randn(base.shape, generator=g))
    return make_delta(model, changes, name=name, dtype=dtype, selection=selection.provenance())
