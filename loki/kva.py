"""Knowledge Vector Attribution (KVA), the numerics: integrated gradients of every down-projection output
coordinate at the last prompt position, per layer (LoKI paper §3.1; docs/method.md, stage 1).

Two engines compute the same `[P, L, d_model]` array for a batch of prompts:

- `reference`: the obvious one. Per prompt and layer, one batch of `steps` full-sequence passes of the model as it is,
  with the down-projection output at the last position replaced by `alpha_k * z_l` (a forward hook).
- `fast`: exploits causality. The prefix (positions `0..T-2`) is the same in every patched run, so one pass over it
  records each attention module's keys and values. Then ONE single-token pass carries every (layer, step) variant
  as its own row: the batch starts with the clean last token of each prompt and grows at the input of layer `l` by
  `steps` copies of the clean rows, whose down-projection output is replaced by the patch. Each row attends to the
  shared prefix keys/values (never copied) plus its own key/value at `T-1`. Rows of layer `l` run only layers `l..L-1`.
  Family differences (Conv1D, parallel residual, post-norms, softcapping, sliding windows, GQA) are handled by the
  model's own modules: loki only supplies the attention kernel and two kinds of hooks.

>>> import loki.testing, torch
>>> from loki.kva import kva
>>> model = loki.testing.tiny_model("llama")
>>> attr, targets = kva(model, [[5, 6, 7, 8], [9, 10]], steps=3)
>>> attr.shape
torch.Size([2, 2, 32])
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttributionError
from .projections import DownProjections, find_down_projections

ENGINES = ("fast", "reference")
MEASURES = ("prob", "logit")
_ATTN_NAME = "loki_kva"


def alphas(steps: int) -> torch.Tensor:
    """The integration points `k/m`, k = 0..m-1 (left Riemann sum: includes 0, excludes 1; LoKI paper §3.1).

    Args:
        steps: `m`, the number of points.

    Returns:
        Tensor: float64 `[m]`.

    Raises:
        AttributionError: `steps < 1`.

    >>> alphas(4)
    tensor([0.0000, 0.2500, 0.5000, 0.7500], dtype=torch.float64)
    """
    if steps < 1:
        raise AttributionError(f"steps must be >= 1, got {steps}.")
    return torch.arange(steps, dtype=torch.float64) / steps


def kva(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    steps: int = 7,
    *,
    targets: Sequence[int | None] | None = None,
    measure: str = "prob",
    engine: str = "fast",
    max_rows: int = 8192,
    layers: Sequence[int] | None = None,
    template: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KVA of one batch of prompts (LoKI paper §3.1): `Attr[l, j] = z_l[j] * mean_k dF/dv_j`, where `z_l` is layer
    `l`'s down-projection output at the last position, the gradient is taken with that output replaced by
    `v = alpha_k * z_l` (`alphas(steps)`), and `F` is the target token's probability or logit.

    The model runs with every parameter frozen and in eval mode; both are restored afterwards.

    Args:
        model: a causal LM of a supported family (`loki.projections`).
        input_ids: one list of token ids per prompt (any lengths, no padding).
        steps: integration steps `m`.
        targets: per prompt a gold token id, or None for the model's own argmax at the last position; None for all.
        measure: "prob" (softmax probability, as published) or "logit".
        engine: "fast" (shared prefix, one single-token pass for all layers and steps) or "reference" (per prompt
            and layer, `steps` full-sequence passes; slow, for checking).
        max_rows: bounds the single-token rows of one fast pass (memory); more rows are split into passes over
            groups of layers.
        layers: attribute only these layers (sorted, unique); None for all.
        template: the down-projection module path; None for known families.

    Returns:
        tuple: attributions float32 `[P, L, d_model]` on the CPU (`L = len(layers)` when given), and the target
        token of each prompt, int64 `[P]`.

    Raises:
        AttributionError: an unknown engine or measure, no prompts or an empty one, a target count that is not one
            per prompt, a target outside the vocabulary, bad `layers`, `steps < 1`.
        UnknownArchitectureError: loki cannot find the model's down-projections.

    >>> import loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> attr, targets = kva(model, [[5, 6, 7, 8], [9, 10]], steps=3)
    >>> attr.shape, targets
    (torch.Size([2, 2, 32]), tensor([15,  7]))
    >>> slow, _ = kva(model, [[5, 6, 7, 8], [9, 10]], steps=3, engine="reference")
    >>> torch.allclose(attr, slow, rtol=1e-4, atol=1e-6)
    True
    >>> kva(model, [[5, 6, 7, 8]], steps=3, layers=[1])[0].shape
    torch.Size([1, 1, 32])
    """
    if engine not in ENGINES:
        raise AttributionError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if measure not in MEASURES:
        raise AttributionError(f"measure must be one of {MEASURES}, got {measure!r}.")
    ids = [list(map(int, x)) for x in input_ids]
    if not ids or any(len(x) == 0 for x in ids):
        raise AttributionError("Every prompt needs at least one token; got an empty prompt (or no prompts).")
    gold = list(targets) if targets is not None else [None] * len(ids)
    if len(gold) != len(ids):
        raise AttributionError(f"Got {len(gold)} targets for {len(ids)} prompts; pass one per prompt (None = predict).")
    projs = find_down_projections(model, template)
    vocab = model.get_output_embeddings().weight.shape[0]
    for t in gold:
        if t is not None and not 0 <= int(t) < vocab:
            raise AttributionError(f"Target token {t} is outside the vocabulary 0..{vocab - 1}.")
    layers = list(range(len(projs))) if layers is None else [int(x) for x in layers]
    if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < len(projs):
        raise AttributionError(f"layers must be sorted, unique and within 0..{len(projs) - 1}; got {layers}.")
    a = alphas(steps)
    with _frozen(model), torch.enable_grad():
        if engine == "reference":
            results = [_reference_one(model, projs, x, a, g, measure, layers) for x, g in zip(ids, gold)]
            return torch.stack([r[0] for r in results]), torch.tensor([r[1] for r in results])
        return _fast(model, projs, ids, a, gold, measure, max_rows, layers)


@contextmanager
def _frozen(model: nn.Module):
    """No weight gradients, eval mode; restores both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _measure(logits: torch.Tensor, target: torch.Tensor, measure: str) -> torch.Tensor:
    """Target function per row: logits `[R, V]`, target `[R]` -> `[R]` (float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.gather(-1, target[:, None])[:, 0]
    if measure == "logit":
        return picked
    return torch.exp(picked - torch.logsumexp(logits, dim=-1))


def _last_logits(model: nn.Module, **kwargs) -> torch.Tensor:
    out = model(**kwargs, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


# -- reference engine -----------------------------------------------------------------------------
def _reference_one(model, projs: DownProjections, ids: list[int], a: torch.Tensor, gold, measure: str, layers):
    device = projs.weight.device
    m, T = len(a), len(ids)
    x = torch.tensor([ids], device=device)
    z = {}

    def record(layer):
        def hook(module, args, output):
            z[layer] = output.reshape(-1, T, output.shape[-1])[0, T - 1].detach()  # OPT flattens to [B*T, d]

        return hook

    handles = [mod.register_forward_hook(record(i)) for i, mod in enumerate(projs.modules)]
    try:
        with torch.no_grad():
            clean = _last_logits(model, input_ids=x)
    finally:
        for h in handles:
            h.remove()
    target = int(clean[0].argmax()) if gold is None else int(gold)
    rows = []
    for layer in layers:
        mod = projs.modules[layer]
        v = (a.to(device, z[layer].dtype)[:, None] * z[layer]).requires_grad_(True)  # [m, d]

        def patch(module, args, output, v=v):
            o = output.reshape(m, T, output.shape[-1])
            return torch.cat([o[:, : T - 1], v[:, None].to(output.dtype)], dim=1).reshape(output.shape)

        h = mod.register_forward_hook(patch)
        try:
            logits = _last_logits(model, input_ids=x.expand(m, T))
        finally:
            h.remove()
        f = _measure(logits, torch.full((m,), target, device=device), measure)
        (g,) = torch.autograd.grad(f.sum(), v)
        rows.append(z[layer].float() * g.float().mean(0))
    return torch.stack(rows).cpu(), target


# -- fast engine ----------------------------------------------------------------------------------
@dataclass
class _State:
    """What the attention kernel needs during one fast pass."""

    mode: str  # "prefix": record keys/values over the prefix; "rows": single-token rows over the recorded prefix
    prompts: int
    valid: torch.Tensor  # [P, Tp] bool: real (non-padding) prefix positions, left padded
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


_state = threading.local()
_lock = threading.Lock()


def _attention(
    module,
    query,
    key,
    value,
    attention_mask=None,
    dropout=0.0,
    scaling=None,
    softcap=None,
    sliding_window=None,
    **kwargs,
):
    """Attention kernel for both fast-pass modes (registered as `loki_kva` in transformers' AttentionInterface).

    query `[B, H, q, hd]`, key/value `[B, kvH, q, hd]`; returns `([B, q, H, hd], None)` like transformers' kernels.
    """
    st: _State = _state.current
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    B, H, q, hd = query.shape
    kvh = key.shape[1]
    g = H // kvh
    acc = torch.promote_types(query.dtype, torch.float32)  # scores and softmax in at least float32
    neg = torch.finfo(acc).min
    if st.mode == "prefix":
        st.keys[id(module)], st.values[id(module)] = key.detach(), value.detach()
        i = torch.arange(q, device=query.device)
        allowed = (i[None, :] <= i[:, None])[None] & st.valid[:, None, :]  # [B, q, t]: causal, no padding keys
        if sliding_window:
            allowed = allowed & (i[None, :] > i[:, None] - sliding_window)[None]
        allowed = allowed | torch.eye(q, dtype=torch.bool, device=query.device)  # padding queries see themselves
        if not softcap:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed[:, None], scale=scaling, enable_gqa=g > 1
            )
            return out.transpose(1, 2), None
        qg = query.view(B, kvh, g, q, hd)
        s = _softcap(torch.einsum("bkgqd,bktd->bkgqt", qg, key).to(acc) * scaling, softcap)
        s = s.masked_fill(~allowed[:, None, None], neg)
        w = torch.softmax(s, dim=-1).to(value.dtype)
        out = torch.einsum("bkgqt,bktd->bkgqd", w, value).reshape(B, H, q, hd)
        return out.transpose(1, 2), None
    # rows: B = n * P single-token rows, block-major ([n, P]); prefix keys/values are [P, kvH, Tp, hd].
    P = st.prompts
    n = B // P
    kp = st.keys.get(id(module))
    if kp is None:  # one-token prompts: no prefix, each row attends to itself only
        kp = vp = key.new_zeros(P, kvh, 0, hd)
    else:
        vp = st.values[id(module)]
    Tp = kp.shape[2]
    qg = query.view(n, P, kvh, g, hd)
    ks, vs = key.view(n, P, kvh, hd), value.view(n, P, kvh, hd)
    s_prefix = torch.einsum("npkgd,pktd->npkgt", qg, kp).to(acc) * scaling
    s_self = torch.einsum("npkgd,npkd->npkg", qg, ks).to(acc)[..., None] * scaling
    s = _softcap(torch.cat([s_prefix, s_self], dim=-1), softcap)
    allowed = st.valid
    if sliding_window:
        allowed = allowed & (torch.arange(Tp, device=query.device) > Tp - sliding_window)[None]
    allowed = torch.cat([allowed, allowed.new_ones(P, 1)], dim=1)
    s = s.masked_fill(~allowed[None, :, None, None], neg)
    w = torch.softmax(s, dim=-1).to(value.dtype)
    out = torch.einsum("npkgt,pktd->npkgd", w[..., :Tp], vp) + w[..., Tp:] * vs[:, :, :, None]
    return out.reshape(B, 1, H, hd), None


def _softcap(s: torch.Tensor, softcap) -> torch.Tensor:
    return s if not softcap else torch.tanh(s / softcap) * softcap


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _attention)


@contextmanager
def _attention_mode(model: nn.Module, state: _State):
    """Route every attention module of `model` through `_attention` with `state`, then restore."""
    _register()
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    configs = [c for c in configs.values() if hasattr(c, "_attn_implementation")]
    with _lock:
        saved = [c._attn_implementation_internal for c in configs]
        _state.current = state
        try:
            for c in configs:
                c._attn_implementation_internal = _ATTN_NAME
            yield
        finally:
            for c, s in zip(configs, saved):
                c._attn_implementation_internal = s
            _state.current = None


def decoder_layers(model: nn.Module, projs: DownProjections) -> list[nn.Module]:
    """The decoder layer (block) module holding each down-projection: the template's path up to `{i}`.

    Args:
        model: the model `projs` was found in.
        projs: its down-projections (`loki.projections.find_down_projections(model)`).

    Returns:
        list: one module per layer, in layer order.

    >>> import loki.testing
    >>> from loki.projections import find_down_projections
    >>> model = loki.testing.tiny_model("gpt2")
    >>> [type(block).__name__ for block in decoder_layers(model, find_down_projections(model))]
    ['GPT2Block', 'GPT2Block']
    """
    names = {id(m): n for n, m in model.named_modules()}
    depth = projs.template.split(".")[::-1].index("{i}")  # components after the layer index
    modules = dict(model.named_modules())
    layers = []
    for mod in projs.modules:
        path = names[id(mod)].split(".")
        layers.append(modules[".".join(path[: len(path) - depth])])
    return layers


def _left_pad(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in ids)
    x = torch.full((len(ids), T), pad, dtype=torch.long)
    valid = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, row in enumerate(ids):
        if row:
            x[i, T - len(row) :] = torch.tensor(row)
            valid[i, T - len(row) :] = True
    return x.to(device), valid.to(device)


def _fast(
    model,
    projs: DownProjections,
    ids: list[list[int]],
    a: torch.Tensor,
    gold,
    measure: str,
    max_rows: int,
    layers: list[int],
):
    device = projs.weight.device
    P, m = len(ids), len(a)
    prefix, valid = _left_pad([x[:-1] for x in ids], 0, device)  # pad id is irrelevant: masked out everywhere
    last = torch.tensor([[x[-1]] for x in ids], device=device)
    pos_last = torch.tensor([[len(x) - 1] for x in ids], device=device)
    state = _State("prefix", P, valid)
    with _attention_mode(model, state):
        if prefix.shape[1] > 0:
            with torch.no_grad():
                backbone = getattr(model, "base_model", model)  # no LM head: the prefix needs no logits
                backbone(input_ids=prefix, position_ids=(valid.long().cumsum(-1) - 1).clamp(min=0), use_cache=False)
        state.mode = "rows"
        per_pass = max(1, max_rows // (P * m))
        attr = torch.empty(P, len(layers), projs.d_out)
        target = None
        for start in range(0, len(layers), per_pass):
            group = layers[start : start + per_pass]
            grads, z, target = _rows_pass(model, projs, last, pos_last, a, group, gold, measure, target)
            for j in range(len(group)):
                attr[:, start + j] = (z[j].float() * grads[j].float().mean(0)).cpu()
    return attr, target.cpu()


def _rows_pass(model, projs, last, pos_last, a, group: list[int], gold, measure, target):
    """One single-token pass carrying the clean rows plus every (layer in `group`, step) variant row."""
    P, m = last.shape[0], len(a)
    blocks = decoder_layers(model, projs)
    first = {layer: i for i, layer in enumerate(group)}
    leaves: dict[int, torch.Tensor] = {}
    zs: dict[int, torch.Tensor] = {}

    def grow(layer):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer in first:
                hidden = torch.cat([hidden, hidden[:P].repeat(m, 1, 1)])
            blocks_now = hidden.shape[0] // P
            args = tuple(_tile(x, blocks_now, P) for x in args[1:])
            kwargs = {k: _tile(v, blocks_now, P) for k, v in kwargs.items() if k != "hidden_states"}
            return ((hidden, *args), kwargs)

        return pre_hook

    def patch(layer):
        def hook(module, args, output):
            # one token per row, so dim 0 counts rows whether the output is [B, 1, d] or flattened [B, d] (OPT)
            z = output[:P].detach().reshape(P, -1)  # clean output of this layer
            v = (a.to(output.device, output.dtype)[:, None, None] * z[None]).requires_grad_(True)  # [m, P, d]
            zs[layer], leaves[layer] = z, v
            return torch.cat([output[: -m * P], v.reshape(m * P, *output.shape[1:])])

        return hook

    handles = []
    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(grow(layer), with_kwargs=True))
        for layer in group:
            handles.append(projs.modules[layer].register_forward_hook(patch(layer)))
        logits = _last_logits(model, input_ids=last, position_ids=pos_last)
    finally:
        for h in handles:
            h.remove()
    if target is None:
        predicted = logits[:P].argmax(-1)
        target = torch.tensor(
            [p if g is None else int(g) for p, g in zip(predicted.tolist(), gold)], device=last.device
        )
    f = _measure(logits[P:], target.repeat(len(group) * m), measure)
    grads = torch.autograd.grad(f.sum(), [leaves[layer] for layer in group])
    return grads, [zs[layer] for layer in group], target


def _tile(x, blocks: int, P: int):
    """Repeat a per-prompt tensor (leading dim P) to the grown row batch `[blocks * P]`; recurse into tuples/dicts."""
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and x.shape[0] == P and blocks > 1:
            return x.repeat(blocks, *([1] * (x.dim() - 1)))
        return x
    if isinstance(x, tuple):
        return tuple(_tile(v, blocks, P) for v in x)
    if isinstance(x, dict):
        return {k: _tile(v, blocks, P) for k, v in x.items()}
    return x
