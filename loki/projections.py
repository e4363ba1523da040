"""Where the rows live: the FFN down-projection of every layer, for every supported architecture.

A LoKI row ("knowledge vector") `j` of layer `l` is output coordinate `j` of that layer's down-projection:
row `j` of an `nn.Linear` weight `[d_model, d_ff]`, column `j` of a GPT-2 `Conv1D` weight `[d_ff, d_model]`.
Everything in loki that touches rows goes through this module.

>>> import loki, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=2, num_attention_heads=2)
>>> projs = loki.projections.find_down_projections(transformers.AutoModelForCausalLM.from_config(cfg))
>>> projs.template, len(projs), projs.d_out, projs.d_in
('model.layers.{i}.mlp.down_proj', 2, 16, 32)
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DtypeError, OffloadedWeightsError, PartitionedWeightsError, UnknownArchitectureError

# model_type -> module path template of the down-projection, `{i}` standing for the layer index.
TEMPLATES: dict[str, str] = {
    "llama": "model.layers.{i}.mlp.down_proj",
    "mistral": "model.layers.{i}.mlp.down_proj",
    "qwen2": "model.layers.{i}.mlp.down_proj",
    "qwen3": "model.layers.{i}.mlp.down_proj",
    "gemma": "model.layers.{i}.mlp.down_proj",
    "gemma2": "model.layers.{i}.mlp.down_proj",
    "gemma3_text": "model.layers.{i}.mlp.down_proj",
    "gemma3": "model.language_model.layers.{i}.mlp.down_proj",
    "phi3": "model.layers.{i}.mlp.down_proj",
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{i}.fc2",
}


def register(model_type: str, template: str) -> None:
    """Teach loki where a model type keeps its down-projections (for this process; replaces a known template).

    Args:
        model_type: the model's `config.model_type`.
        template: the down-projection's module path with `{i}` for the layer index (formats/SPEC.md §4,
            `down_projection.template`).

    Raises:
        UnknownArchitectureError: the template does not contain `{i}` exactly once.

    >>> import loki
    >>> loki.projections.register("my_llama_variant", "model.layers.{i}.mlp.down_proj")
    """
    _check_template(template)
    TEMPLATES[model_type] = template


@dataclass(frozen=True, eq=False)
class DownProjections:
    """The down-projection of every layer of one model, in layer order (made by `find_down_projections`).

    Attributes:
        template: the module path with `{i}` that found them.
        modules: the `nn.Linear` (or GPT-2 `Conv1D`) modules, layer 0 first.
        transposed: True for `Conv1D`, whose weight is stored `[d_in, d_out]`, so a row is a column (formats/SPEC.md
            §1).
        d_out: rows per layer (`d_model`).
        d_in: length of a row (`d_ff`).

    >>> import loki.testing
    >>> projs = find_down_projections(loki.testing.tiny_model("gpt2"))
    >>> projs.template, projs.transposed, projs.d_out, projs.d_in, tuple(projs.weight.shape)
    ('transformer.h.{i}.mlp.c_proj', True, 32, 64, (64, 32))
    """

    template: str
    modules: tuple[nn.Module, ...]
    transposed: bool  # GPT-2 Conv1D: the weight is stored [d_in, d_out], so a row is a column
    d_out: int
    d_in: int
    # Every (parent, name, child) step from the unwrapped model down to the modules (parent None: the model itself,
    # which keys the cache weakly, so it is not referenced), and each module's weight: what `current` compares, so a
    # swapped module or a replaced weight is noticed.
    links: tuple[tuple[nn.Module | None, str, nn.Module], ...] = field(default=(), repr=False)
    weights: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.modules)

    def rows(self, layer: int) -> torch.Tensor:
        """A `[d_out, d_in]` view of layer `layer`'s weight (the weight's dtype and device): indexing and writing it
        touches the model. Row `j` is LoKI's knowledge vector `j` (formats/SPEC.md §1).

        >>> import loki.testing
        >>> find_down_projections(loki.testing.tiny_model("gpt2")).rows(0).shape
        torch.Size([32, 64])
        """
        w = self.modules[layer].weight
        return w.t() if self.transposed else w

    @property
    def weight(self) -> torch.Tensor:
        """Layer 0's weight as stored (transposed for `Conv1D`), for the model's device and dtype."""
        return self.modules[0].weight

    def current(self, model: nn.Module) -> bool:
        """True while `model` still computes with these modules and weights: no module on the way to a
        down-projection was swapped and no weight replaced (`load_state_dict(..., assign=True)`, `module.weight =
        nn.Parameter(...)`, PEFT injecting adapters keeps the weight and stays current). Writes into the weights
        (an optimizer step, `load_state_dict` copying, `.to(dtype)`) keep the same tensors and are not checked here.

        Args:
            model: the model (or wrapper) these were found in.

        >>> import loki.testing, torch
        >>> model = loki.testing.tiny_model("llama")
        >>> projs = find_down_projections(model)
        >>> projs.current(model)
        True
        >>> model.model.layers[1].mlp.down_proj = torch.nn.Linear(64, 32, bias=False)
        >>> projs.current(model)
        False
        """
        root = unwrap(model)
        for parent, name, child in self.links:
            if (root if parent is None else parent)._modules.get(name) is not child:
                return False
        for module, weight in zip(self.modules, self.weights):
            found = module._parameters.get("weight")  # (PEFT layers: a property over their base layer's)
            if (found if found is not None else module.weight) is not weight:
                return False
        return True


_cache: weakref.WeakKeyDictionary[nn.Module, dict[str | None, DownProjections]] = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside training and compilation wrappers: `torch.compile` (`._orig_mod`), DDP, `DataParallel` and
    DeepSpeed engines (`.module`). Anything else is returned as it is (PEFT models already reach their base
    model's modules and config). At most 8 wrappers deep.

    Args:
        model: a model, or a wrapper around one.

    Returns:
        nn.Module: the innermost model.

    >>> import loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> unwrap(torch.nn.DataParallel(model)) is model
    True
    """
    return unwrap_chain(model)[-1]


def unwrap_chain(model: nn.Module) -> list[nn.Module]:
    """`model` and the models inside its wrappers, outermost first; the last one is `unwrap(model)`.

    Args:
        model: a model, or a wrapper around one (`torch.compile`, DDP, `DataParallel`, a DeepSpeed engine).

    Returns:
        list[nn.Module]: `[model]` for a model without wrappers.

    >>> import loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> [type(m).__name__ for m in unwrap_chain(torch.nn.DataParallel(model))]
    ['DataParallel', 'LlamaForCausalLM']
    """
    chain = [model]
    for _ in range(8):  # wrappers of wrappers (compiled DDP), never a cycle
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            wrapper = (
                not hasattr(model, "config") or type(model).__name__ == "DeepSpeedEngine"
            )  # its config: DeepSpeed's
            inner = vars(model).get("_modules", {}).get("module") if wrapper else None
        if not isinstance(inner, nn.Module):
            break
        chain.append(model := inner)
    return chain


def find_down_projections(model: nn.Module, template: str | None = None) -> DownProjections:
    """The down-projections of `model`, found from its `config.model_type` or from `template`.

    The result is cached per model object and template, and found again when a module on the way was swapped or a
    weight replaced since (`DownProjections.current`). Wrappers (`unwrap`) and PEFT models find their base model's
    modules.

    Args:
        model: a model of a known `model_type` (`TEMPLATES`, `register`), or any model with `template`.
        template: the module path with `{i}` for the layer index, e.g. `"model.layers.{i}.mlp.down_proj"`; it may
            omit leading wrapper names (`"layers.{i}.mlp.down_proj"` also finds the modules of a CausalLM).
            None uses the model type's template.

    Returns:
        DownProjections.

    Raises:
        UnknownArchitectureError: an unknown model type without `template`; a template without exactly one `{i}`,
            that matches nothing, matches layers with gaps, matches under several prefixes, or matches modules
            without a 2-D weight or with different shapes.
        OffloadedWeightsError: a down-projection weight is on the meta device (accelerate's offloading: a
            `device_map` with "cpu"/"disk" offload, `cpu_offload`, `init_empty_weights`): loki reads and writes rows
            of weights in memory.
        PartitionedWeightsError: the down-projection weights are DeepSpeed ZeRO-3 partitions.
        DtypeError: a down-projection weight is an 8-bit float (float8_e4m3fn, float8_e5m2...).

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> find_down_projections(model, "layers.{i}.mlp.down_proj").modules[1] is model.model.layers[1].mlp.down_proj
    True
    """
    per_model = _cache.setdefault(model, {})
    found = per_model.get(template)
    if found is None or not found.current(model):
        found = per_model[template] = _find(model, template)
    for layer, weight in enumerate(found.weights):
        if weight.device.type == "meta":
            raise OffloadedWeightsError(
                f"Layer {layer}'s down-projection weight is on the meta device: the model is offloaded (a device_map "
                "with 'cpu' or 'disk' offload, accelerate's cpu_offload or disk_offload) or was built empty. loki "
                "reads "
                "and writes rows of weights in memory: load the model without offloading (device_map=None, or every "
                "layer on a device), then apply, attribute or train. Nothing was changed."
            )
        if weight.dtype.is_floating_point and weight.dtype.itemsize < 2:  # float8: no CPU kernels, scaled values
            raise DtypeError(
                f"Layer {layer}'s down-projection weight is {weight.dtype}, a quantized 8-bit float whose values "
                "mean something only with their scales. loki reads, trains and writes rows of float32, bfloat16 or "
                "float16 weights: load the model in one of them (dtype=torch.bfloat16, without an FP8 "
                "quantization_config), then apply, attribute or train. Nothing was changed."
            )
    return found


def _find(model: nn.Module, template: str | None) -> DownProjections:
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if template is None:
        template = TEMPLATES.get(model_type)
        if template is None:
            raise UnknownArchitectureError(
                f"loki does not know where {type(model).__name__} (model_type {model_type!r}) keeps its FFN "
                f"down-projections. Pass template='model.layers.{{i}}.mlp.down_proj' (the module path, with {{i}} "
                f"for the layer index), or register it once: loki.projections.register({model_type!r}, '...'). "
                f"Known model types: {', '.join(sorted(TEMPLATES))}."
            )
    _check_template(template)
    names = dict(model.named_modules())
    by_layer = _match(names, template)
    if not by_layer:
        raise UnknownArchitectureError(
            f"No module of {type(model).__name__} matches the template {template!r}. "
            f"Down-projection-like modules it has: {_hints(names)}. Pass the right template=."
        )
    layers = sorted(by_layer)
    if layers != list(range(len(layers))):
        raise UnknownArchitectureError(
            f"Template {template!r} matched layers {layers} of {type(model).__name__}, not 0..N-1 without gaps."
        )
    modules = tuple(by_layer[i] for i in layers)
    transposed = type(modules[0]).__name__ == "Conv1D"
    for m in modules:
        if len(getattr(getattr(m, "weight", None), "ds_shape", ())) == 2:  # ZeRO-3 emptied it: the shape is its own
            raise PartitionedWeightsError(
                f"The down-projections ({template!r}) are partitioned by DeepSpeed ZeRO-3 (this process holds "
                f"{m.weight.numel()} of the {tuple(m.weight.ds_shape)} weight's values): loki needs whole weights. "
                "Call loki.prepare/apply/attribute on the model before deepspeed.initialize, and load it without "
                "zero.Init (no ZeRO-3 HfDeepSpeedConfig alive while from_pretrained runs)."
            )
        if not isinstance(getattr(m, "weight", None), torch.Tensor) or m.weight.dim() != 2:
            raise UnknownArchitectureError(
                f"{template!r} matched a {type(m).__name__} without a 2-D weight; loki needs nn.Linear or Conv1D."
            )
    d_out, d_in = modules[0].weight.shape[::-1] if transposed else modules[0].weight.shape
    if any(m.weight.shape != modules[0].weight.shape for m in modules):
        raise UnknownArchitectureError(f"The layers matched by {template!r} have different weight shapes.")
    where = {id(module): name for name, module in names.items()}
    links: dict[tuple[int, str], tuple[nn.Module | None, str, nn.Module]] = {}
    for m in modules:
        parent = None
        for part in where[id(m)].split(".") if where[id(m)] else ():
            child = (model if parent is None else parent)._modules[part]
            links.setdefault((id(parent), part), (parent, part, child))
            parent = child
    return DownProjections(
        template, modules, transposed, int(d_out), int(d_in), tuple(links.values()), tuple(m.weight for m in modules)
    )


def _check_template(template: str) -> None:
    if template.count("{i}") != 1:
        raise UnknownArchitectureError(
            f"A template names the layer index exactly once as {{i}}, e.g. 'model.layers.{{i}}.mlp.down_proj'; "
            f"got {template!r}."
        )


def _match(names: dict[str, nn.Module], template: str) -> dict[int, nn.Module]:
    # Try the full path, then drop leading components: the same template serves a CausalLM, its bare
    # backbone and wrappers around it (PEFT, multimodal), as long as exactly one prefix matches.
    parts = template.split(".")
    while parts and "{i}" not in parts[0]:
        found = _match_exact_suffix(names, ".".join(parts))
        if found:
            return found
        parts = parts[1:]
    return _match_exact_suffix(names, ".".join(parts)) if parts else {}


def _match_exact_suffix(names: dict[str, nn.Module], suffix: str) -> dict[int, nn.Module]:
    pattern = re.compile(r"^(.*?\.)?" + re.escape(suffix).replace(r"\{i\}", r"(\d+)") + "$")
    by_prefix: dict[str, dict[int, nn.Module]] = {}
    for name, module in names.items():
        m = pattern.match(name)
        if m:
            by_prefix.setdefault(m.group(1) or "", {})[int(m.group(2))] = module
    if len(by_prefix) > 1:
        raise UnknownArchitectureError(
            f"Template {suffix!r} is ambiguous: it matches under {sorted(by_prefix)}. Pass the full module path."
        )
    return next(iter(by_prefix.values()), {})


def _hints(names: dict[str, nn.Module]) -> str:
    hints = sorted(
        {re.sub(r"\.\d+\.", ".{i}.", n) for n in names if re.search(r"(down_proj|down|c_proj|4h_to_h|fc2|w2)$", n)}
    )
    return ", ".join(hints[:8]) or "none"
