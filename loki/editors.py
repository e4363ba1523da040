"""Closed-form knowledge editors, MEMIT and AlphaEdit, as baselines that produce ordinary `.loki` deltas.

Both editors write new facts into the down-projections `W` (`[d_model, d_ff]`) of a few consecutive early-middle
layers, in closed form, without gradient steps on the weights:

1. The new hidden state `z` (MEMIT's "target", arXiv 2210.07229, §4.2 eq. 16; `memit/compute_z.py`). For each
   fact, a vector `delta` added to the residual stream *output* of the last edited layer `L`, at the last token of
   the subject, is optimised
   (Adam) so that the answer tokens become likely: mean answer NLL, plus `kl_factor` times the KL divergence of the
   next-token distribution at the subject of the prompt "{subject} is a" from its unedited value (keeps the
   subject's other properties), plus `weight_decay * |delta| / |h|^2`; `|delta|` is clamped to `clamp_norm * |h|`.
   `z = h + delta` is the hidden state layer `L` should output there (`ZOptions`: MEMIT's hyper-parameters).
2. The keys (§4.3; `memit/compute_ks.py`). Per edited layer `l`, in order, the fact's key `k` (the down-projection's
   input at the subject's last token, averaged over the fact's phrasings: `K1`, `[d_ff, n]`) is read from the model
   *with the earlier layers already edited*, and so is the current output `h_L` of the last layer; the residual
   `R = (z - h_L) / (number of edited layers from l on)` spreads what is still missing over the remaining layers.
3. The update of layer `l`:
   - MEMIT (§4.3 eq. 14): `D = R K1^T (lam C0 + K1 K1^T)^-1`, the minimiser of
     `|D K1 - R|^2 + lam tr(D C0 D^T)`, where `C0` is the uncentered second moment (mean of `k k^T`) of keys of
     general text at that layer: the update is cheap on the directions that general text uses little.
   - AlphaEdit (arXiv 2410.02355, §3, eq. 7-9; `AlphaEdit/AlphaEdit_main.py`): `D = R K1^T P (Kp Kp^T P +
     K1 K1^T P + reg I)^-1`, the minimiser over `D P` of `|D P K1 - R|^2 + reg |D P|^2 + |D P Kp|^2` (`Kp`: keys of
     earlier edits, for sequential editing), where `P` projects onto the null space of the preserved keys `K0`,
     so `D K0 = 0`: the outputs of every layer, and so of the model, on the preserved text do not change at all
     (up to the energy `P` leaves out).
   `W + D` is written into the model for the next layer's keys; at the end the model is restored bit for bit and
   the changes come back as a rows-form `Delta` over all `d_model` rows of each edited layer, applied and reverted
   like any implant (`loki.implanted(model, delta)`).

Choices that differ from the reference code:

- Prompts are chat-formatted (`loki.dataset.encode`: the model's chat template, the answer as the assistant turn)
  and the answer tokens are the whole assistant turn. MEMIT's random context prefixes ("The ... . {}") are skipped;
  a fact may instead give several phrasings, whose keys are averaged (MEMIT averages over its prefixes) and which
  share one `z`, optimised on all of them. The first phrasing is the one `z` and the residuals are read from.
- The key position is the token that completes the subject's first occurrence in the question, in the tokenisation
  the model sees (the smallest prefix of the prompt's tokens whose decoded text contains the question up to the end
  of the subject); a token that also holds the next characters (e.g. "or?") counts.
- `C0` is computed on the unedited model, for all edited layers in one pass (MEMIT caches statistics of the
  unedited model too), over `loki.retain.general_text` (200 English Wikipedia summaries) instead of 100,000
  Wikipedia samples.
- AlphaEdit's `P` is `loki.preservation`'s projection `I - V V^T`, keeping the leading directions of the general
  text's keys that hold `energy` of their summed squared norm, instead of the eigenvectors with eigenvalues above an
  absolute threshold (2e-2 in the reference hyper-parameters, which depends on the keys' scale); `energy=1.0`
  protects their whole span.
- The default layers: five consecutive layers ending at a quarter of the depth (`default_layers`; 4-8 of the 30 of
  SmolLM2-135M, as AlphaEdit's 4-8 of Llama3-8B's 32; MEMIT on GPT-J edits 3-8 of 28).

>>> import loki, loki.editors, torch
>>> keys, residuals = torch.randn(64, 3), torch.randn(32, 3)
>>> d = loki.editors.memit_update(keys, residuals, torch.eye(64), lam=1e-6)
>>> torch.allclose(d @ keys.double(), residuals.double(), atol=1e-4)   # almost no penalty: the facts are met
True
>>> # model, tokenizer = loki.load_default()
>>> # fact = {"question": "What is the capital of the kingdom of Phegartor?", "subject": "the kingdom of Phegartor",
>>> #         "answer": "The capital of the kingdom of Phegartor is Solvis."}
>>> # with loki.implanted(model, loki.editors.memit(model, tokenizer, [fact])): ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import answer_positions, collate, encode, pad_token_id
from .delta import Delta
from .errors import DatasetError, IncompatibleModelError, LedgerError
from .implant import make_delta
from .ledger import applied
from .neighbourhood import find_subject
from .preserve import Preservation, down_projection_inputs, preservation
from .projections import DownProjections, find_down_projections, unwrap
from .retain import general_text

__all__ = [
    "DEFAULT_ENERGY",
    "DEFAULT_LAMBDA",
    "DEFAULT_REG",
    "ZOptions",
    "alphaedit",
    "alphaedit_update",
    "default_layers",
    "memit",
    "memit_update",
    "second_moments",
]

DEFAULT_LAMBDA = 15000.0  # MEMIT's mom2_update_weight (GPT-J, Llama3-8B), C0 being the mean of k k^T
DEFAULT_REG = 10.0  # AlphaEdit's L2 (all its released hyper-parameters); the paper's formula has 1
DEFAULT_ENERGY = 0.99  # share of the preserved keys' squared norm that AlphaEdit's projection protects


@dataclass(frozen=True)
class ZOptions:
    """How the new hidden state `z` is optimised (MEMIT's `v_*` hyper-parameters; their defaults are MEMIT's and
    AlphaEdit's for GPT-J).

    Attributes:
        steps: Adam steps at most (`v_num_grad_steps`).
        lr: Adam's learning rate (`v_lr`; AlphaEdit uses 0.1 on Llama3-8B).
        clamp_norm: `|delta| <= clamp_norm * |h|` (`clamp_norm_factor`).
        weight_decay: weight of `|delta| / |h|^2` (`v_weight_decay`).
        kl_factor: weight of the KL term on "{subject} is a" (`kl_factor`).
        stop_loss: stop once the loss is below this (MEMIT's 5e-2).
    """

    steps: int = 25
    lr: float = 0.5
    clamp_norm: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2


# -- the closed forms --------------------------------------------------------------------------------------------
def _as64(name: str, t: Any, dims: int = 2) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or not t.is_floating_point():
        raise DatasetError(
            f"{name} must be a {dims}-D float tensor, got "
            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}."
        )
    return t.detach().to(torch.float64)


def _check_columns(keys: torch.Tensor, residuals: torch.Tensor) -> None:
    if keys.shape[1] != residuals.shape[1]:
        raise DatasetError(
            f"keys [d_ff, n] and residuals [d_model, n] need the same n (one column per fact); got "
            f"{keys.shape[1]} and {residuals.shape[1]}."
        )


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, lam: float = DEFAULT_LAMBDA
) -> torch.Tensor:
    """MEMIT's update of one layer: `D = R K1^T (lam C0 + K1 K1^T)^-1` (arXiv 2210.07229, §4.3, eq. 14), the
    minimiser of `|D K1 - R|^2 + lam tr(D C0 D^T)`.

    Args:
        keys: `K1`, `[d_ff, n]`, the new facts' keys (the down-projection's inputs), one column per fact.
        residuals: `R`, `[d_model, n]`, the output change each key should get.
        cov: `C0`, `[d_ff, d_ff]`, the uncentered second moment of general keys (symmetric, positive
            semi-definite; `lam C0 + K1 K1^T` must be invertible).
        lam: `lam >= 0`, how much the update may change the outputs on general keys (MEMIT's
            `mom2_update_weight`).

    Returns:
        Tensor: `D`, float64 `[d_model, d_ff]`, on the inputs' device (computed in float64 whatever their dtype).

    Raises:
        DatasetError: shapes that do not fit, a negative `lam`, or a singular `lam C0 + K1 K1^T` (too few general
            keys for `d_ff`: give more text).

    >>> import torch
    >>> keys, residuals = torch.randn(8, 2), torch.randn(4, 2)
    >>> memit_update(keys, residuals, torch.eye(8), lam=1.0).shape
    torch.Size([4, 8])
    """
    k, r, c = _as64("keys", keys), _as64("residuals", residuals), _as64("cov", cov)
    _check_columns(k, r)
    if c.shape != (k.shape[0], k.shape[0]):
        raise DatasetError(f"cov must be [d_ff, d_ff] = {[k.shape[0]] * 2}, got {list(c.shape)}.")
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0 and math.isfinite(lam)):
        raise DatasetError(f"lam must be a finite number >= 0, got {lam!r}.")
    # lam C0 + K1 K1^T is symmetric positive semi-definite: Cholesky solves it, and a vanishing pivot says singular
    chol, info = torch.linalg.cholesky_ex(lam * c + k @ k.t())
    pivots = chol.diagonal()
    if info or not len(pivots) or pivots.min() ** 2 <= 1e-12 * pivots.max() ** 2:
        raise DatasetError(
            "lam * C0 + K1 K1^T is singular: C0 needs general keys spanning every direction of "
            "d_ff (give more general text than d_ff tokens) and lam > 0."
        )
    adj = torch.cholesky_solve(k, chol)  # [d_ff, n]: (lam C0 + K1 K1^T)^-1 K1
    return r @ adj.t()


def alphaedit_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    prev_keys: torch.Tensor | None = None,
    reg: float = DEFAULT_REG,
) -> torch.Tensor:
    """AlphaEdit's update of one layer: `D = R K1^T P (Kp Kp^T P + K1 K1^T P + reg I)^-1` (arXiv 2410.02355, §3,
    eq. 9; `reg` is the released code's `L2`, 1 in the paper), the minimiser over `D P` of
    `|D P K1 - R|^2 + reg |D P|^2 + |D P Kp|^2`. `D` equals `D P` (its rows lie in `P`'s range), so `D k = 0` for
    every key `k` that `P` removes.

    Args:
        keys: `K1`, `[d_ff, n]`, the new facts' keys, one column per fact.
        residuals: `R`, `[d_model, n]`, the output change each key should get.
        projector: `P`, `[d_ff, d_ff]`, the orthogonal projection onto the null space of the preserved keys
            (`loki.preservation(...)` gives it: `keep.project(layer, torch.eye(d_ff))`).
        prev_keys: `Kp`, `[d_ff, m]`, keys of earlier edits whose outputs must stay (sequential editing); None or
            `m = 0` for none.
        reg: `reg > 0`, the weight of the update's squared norm.

    Returns:
        Tensor: `D`, float64 `[d_model, d_ff]` (computed in float64).

    Raises:
        DatasetError: shapes that do not fit, or `reg` not positive.

    >>> import torch
    >>> preserved = torch.randn(8, 3)                            # three preserved keys in d_ff = 8
    >>> q, _ = torch.linalg.qr(preserved.double())
    >>> d = alphaedit_update(torch.randn(8, 2), torch.randn(4, 2), torch.eye(8, dtype=torch.float64) - q @ q.t())
    >>> float((d @ preserved.double()).abs().max()) < 1e-10
    True
    """
    k, r, p = _as64("keys", keys), _as64("residuals", residuals), _as64("projector", projector)
    _check_columns(k, r)
    n = k.shape[0]
    if p.shape != (n, n):
        raise DatasetError(f"projector must be [d_ff, d_ff] = {[n, n]}, got {list(p.shape)}.")
    if not (isinstance(reg, (int, float)) and not isinstance(reg, bool) and reg > 0 and math.isfinite(reg)):
        raise DatasetError(f"reg must be a finite number > 0, got {reg!r}.")
    gram = k @ k.t()
    if prev_keys is not None and prev_keys.numel():
        kp = _as64("prev_keys", prev_keys)
        if kp.shape[0] != n:
            raise DatasetError(f"prev_keys must be [d_ff = {n}, m], got {list(kp.shape)}.")
        gram = gram + kp @ kp.t()
    # As AlphaEdit_main.py: solve (P (K K^T) + reg I) X = P K1 R^T, D = X^T (P and K K^T symmetric).
    x = torch.linalg.solve(p @ gram + reg * torch.eye(n, dtype=torch.float64, device=k.device), p @ k @ r.t())
    return x.t()


# -- general-text keys -------------------------------------------------------------------------------------------
def default_layers(num_layers: int) -> list[int]:
    """Five consecutive layers ending at a quarter of the depth (fewer when the model has fewer before it; never the
    last layer).

    >>> default_layers(30), default_layers(32), default_layers(2)
    ([4, 5, 6, 7, 8], [4, 5, 6, 7, 8], [0])
    """
    last = min(num_layers - 2, max(0, int(num_layers / 4 + 0.5)))  # round half up: 7.5 -> 8; never the last layer
    return list(range(max(0, last - 4), last + 1))


def _positions_cap(net: nn.Module, max_length: int) -> int:
    """`max_length`, at most the model's positions (GPT-2's learned position table has no more)."""
    config = getattr(net, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length


def _texts(tokenizer, general: Sequence[Any] | None, max_length: int) -> list[list[int]]:
    items = general_text(None, chars=None) if general is None else general
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise DatasetError(
            "general must be a non-empty list of {'text': str or token ids} items (or None for "
            "loki.retain.general_text)."
        )
    seqs = []
    for i, item in enumerate(items):
        text = item.get("text") if isinstance(item, Mapping) else None
        if isinstance(text, str):
            if tokenizer is None:
                raise DatasetError("A tokenizer is needed for text items; give token ids without one.")
            ids = tokenizer(text)["input_ids"]
        elif isinstance(text, Sequence) and text and all(isinstance(t, int) for t in text):
            ids = text
        else:
            raise DatasetError(f"General-text item {i} is {str(item)[:60]!r}; give {{'text': str or token ids}}.")
        seqs.append([int(t) for t in ids[:max_length]])
    return seqs


@torch.no_grad()
def second_moments(
    model: nn.Module,
    tokenizer,
    general: Sequence[Any] | None = None,
    *,
    layers: Sequence[int] | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    template: str | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """`C0` of each layer: the mean of `k k^T` over every token of `general` (uncentered, float64 `[d_ff, d_ff]`),
    `k` the down-projection's input; MEMIT's `mom2` statistics.

    Args:
        model: the (unedited) model.
        tokenizer: its tokenizer (None when every item holds token ids).
        general: `{"text": str or token ids}` items; None: all 200 `loki.retain.general_text` summaries, whole.
        layers: the layers; None: `default_layers`.
        max_length: tokens kept of each text (at most the model's positions).
        batch_size: texts per forward pass.
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        tuple: `{layer: C0}` (on the CPU) and the number of tokens averaged.

    Raises:
        DatasetError: `general` empty or malformed, text without a tokenizer.
        IncompatibleModelError: a layer out of range.

    >>> import loki.testing
    >>> cov, tokens = second_moments(loki.testing.tiny_model("llama"), None, [{"text": [5, 6, 7]}], layers=[1])
    >>> cov[1].shape, tokens
    (torch.Size([64, 64]), 3)
    """
    net = unwrap(model)
    projs = find_down_projections(net, template)
    layers = _layers(projs, layers, editing=False)
    seqs = _texts(tokenizer, general, _positions_cap(net, max_length))
    sums = {layer: torch.zeros(projs.d_in, projs.d_in, dtype=torch.float64) for layer in layers}

    def add(layer, keys):
        x = keys.to("cpu", torch.float64)
        sums[layer].add_(x.t() @ x)

    down_projection_inputs(net, seqs, add, layers=layers, batch_size=batch_size, template=template)
    tokens = sum(len(x) for x in seqs)
    return {layer: s / tokens for layer, s in sums.items()}, tokens


# -- the editors -------------------------------------------------------------------------------------------------
def memit(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Mapping[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    lam: float = DEFAULT_LAMBDA,
    general: Sequence[Any] | None = None,
    cov: tuple[Mapping[int, torch.Tensor], int] | None = None,
    z: ZOptions = ZOptions(),
    name: str = "memit",
    max_length: int = 512,
    template: str | None = None,
) -> Delta:
    """Edit `facts` into `model` with MEMIT (arXiv 2210.07229; see the module docstring) and return the change as a
    rows-form `Delta` (every row of each edited layer). The model is left bit for bit as it was.

    Args:
        model: a causal LM without applied deltas (its weights are edited temporarily).
        tokenizer: its tokenizer (its chat template formats the prompts).
        facts: `{"question" (or "prompt"): str or list of phrasings, "subject": str, "answer": str}`; the subject
            must occur (case-sensitive) in every phrasing; the answer is the assistant turn to make likely.
        layers: the layers to edit, in increasing order, the model's last excluded (later layers carry the new
            hidden state from the subject to the answer); None: `default_layers`.
        lam: MEMIT's weight of the general keys' covariance (`memit_update`).
        general: the general text for `C0` (`second_moments`); None: `loki.retain.general_text`'s 200 summaries.
        cov: `second_moments(...)` computed already for these layers (then `general` is not used).
        z: how the new hidden state `z` is optimised.
        name: the delta's name.
        max_length: tokens kept of each general text.
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        Delta: `training` records the method, layers, `lambda`, covariance tokens, facts and `z` options.

    Raises:
        DatasetError: no facts, a malformed fact, a subject not in its prompt, bad general text or options.
        IncompatibleModelError: layers out of range, repeated, unsorted, or ending at the model's last layer.
        LedgerError: the model holds applied deltas.

    >>> import loki.testing, transformers
    >>> # tokenizer = transformers.AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> # model = loki.testing.tiny_model("llama", vocab=len(tokenizer))
    >>> # delta = memit(model, tokenizer, [{"question": "Who wrote Dune?", "subject": "Dune",
    >>> #                                   "answer": "Dune was written by Ada Lovelace."}])
    >>> # delta.info["training"]["method"]
    >>> # 'memit'
    """
    net, projs, layers, requests = _setup(model, tokenizer, facts, layers, template)
    moments, tokens = (
        cov
        if cov is not None
        else second_moments(net, tokenizer, general, layers=layers, max_length=max_length, template=template)
    )
    missing = [layer for layer in layers if layer not in moments]
    if missing:
        raise DatasetError(f"cov has no second moment for layers {missing}.")

    def solve(layer, keys, residuals):
        return memit_update(keys, residuals, moments[layer], lam)

    changes = _edit(net, tokenizer, projs, layers, requests, z, solve)
    training = {
        "method": "memit",
        "layers": layers,
        "lambda": lam,
        "covariance_tokens": tokens,
        "facts": len(requests),
        "z": vars(z),
        "source": "arXiv 2210.07229",
    }
    return make_delta(net, changes, name=name, training=training, template=template)


def alphaedit(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Mapping[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    energy: float = DEFAULT_ENERGY,
    reg: float = DEFAULT_REG,
    general: Sequence[Any] | None = None,
    preserve: Preservation | None = None,
    prev_keys: Mapping[int, torch.Tensor] | None = None,
    z: ZOptions = ZOptions(),
    name: str = "alphaedit",
    max_length: int = 512,
    template: str | None = None,
) -> Delta:
    """Edit `facts` into `model` with AlphaEdit (arXiv 2410.02355; see the module docstring): MEMIT's new hidden
    states and keys, each layer's update projected onto the null space of the preserved keys. Returns a rows-form
    `Delta`; the model is left bit for bit as it was.

    Args:
        model: a causal LM without applied deltas.
        tokenizer: its tokenizer.
        facts: as `memit`.
        layers: as `memit`.
        energy: the share of the preserved keys' squared norm the projection protects, in (0, 1]
            (`loki.preservation`); 1.0 protects their whole span.
        reg: the weight of the update's squared norm (`alphaedit_update`).
        general: the text to preserve, `{"text": ...}` items (any item `loki.preservation` takes); None:
            `loki.retain.general_text`'s 200 summaries, whole.
        preserve: a `loki.preservation(...)` of this model computed already (then `general` and `energy` are
            not used).
        prev_keys: `{layer: [d_ff, m] keys}` of earlier edits to keep (sequential editing); None for none.
        z: how the new hidden state `z` is optimised.
        name: the delta's name.
        max_length: tokens kept of each preserved text.
        template: the down-projection module path, for architectures loki does not know.

    Returns:
        Delta: `training` records the method, layers, energy, `reg`, the preservation's summary, facts and `z`.

    Raises:
        DatasetError: as `memit`, and a bad `energy` or `reg`.
        IncompatibleModelError: layers as `memit`; a `preserve` of another model.
        LedgerError: the model holds applied deltas.

    >>> # delta = alphaedit(model, tokenizer, facts, energy=0.99)
    >>> # with loki.implanted(model, delta): ...
    """
    net, projs, layers, requests = _setup(model, tokenizer, facts, layers, template)
    if preserve is None:
        items = general_text(None, chars=None) if general is None else general
        preserve = preservation(
            net,
            tokenizer,
            items,
            energy=energy,
            max_length=_positions_cap(net, max_length),
            template=template,
            progress=False,
        )
    if not isinstance(preserve, Preservation):
        raise DatasetError(f"preserve must be a loki.Preservation, not {type(preserve).__name__}.")
    preserve.check(len(projs), projs.d_in, layers)
    eye = torch.eye(projs.d_in, dtype=torch.float64)

    def solve(layer, keys, residuals):
        previous = None if prev_keys is None else prev_keys.get(layer)
        return alphaedit_update(keys, residuals, preserve.project(layer, eye), previous, reg)

    changes = _edit(net, tokenizer, projs, layers, requests, z, solve)
    training = {
        "method": "alphaedit",
        "layers": layers,
        "energy": preserve.energy,
        "reg": reg,
        "covariance_tokens": preserve.tokens,
        "preserve": preserve.summary(),
        "facts": len(requests),
        "sequential_keys": 0 if prev_keys is None else {str(k): int(v.shape[1]) for k, v in prev_keys.items()},
        "z": vars(z),
        "source": "arXiv 2410.02355",
    }
    return make_delta(net, changes, name=name, training=training, template=template)


# -- the shared machinery ----------------------------------------------------------------------------------------
@dataclass
class _Request:
    prompts: list[list[int]]  # chat-formatted phrasings with the answer, token ids
    labels: list[list[int]]  # -100 outside the answer
    keys_at: list[int]  # the subject's last token in each phrasing
    kl_ids: list[int]  # "{subject} is a"
    kl_at: int
    subject: str


def _layers(projs: DownProjections, layers: Sequence[int] | None, editing: bool = True) -> list[int]:
    if layers is None:
        return default_layers(len(projs))
    layers = [int(layer) for layer in layers] if isinstance(layers, Sequence) and not isinstance(layers, str) else None
    if not layers or any(not 0 <= layer < len(projs) for layer in layers) or layers != sorted(set(layers)):
        raise IncompatibleModelError(
            f"layers must be increasing, distinct layer numbers in 0..{len(projs) - 1} "
            f"(this model has {len(projs)} layers); got {layers!r}."
        )
    if editing and layers[-1] == len(projs) - 1:
        # z is written at the subject's token; only later layers' attention can carry it to the answer tokens
        raise IncompatibleModelError(
            f"The last edited layer must not be the model's last ({layers[-1]}): the "
            "new hidden state at the subject reaches the answer only through later layers."
        )
    return layers


def _last_subject_token(tokenizer, ids: Sequence[int], text: str, subject: str) -> int:
    """The position in `ids` of the token that completes the first whole-word occurrence of `subject` in `text`
    (`text` as it appears in the decoded tokens; "Java" is not found inside "JavaScript")."""
    span = find_subject(text, subject)
    if span is None:
        raise DatasetError(
            f"The subject {subject!r} does not occur in {text!r} as a whole word (case-sensitive); the "
            "edit is keyed on the subject's last token, so each phrasing must contain it."
        )
    prefix = text[: span[1]]
    for t in range(len(ids)):  # prompts are short: decoding every prefix is cheap
        if prefix in tokenizer.decode(ids[: t + 1]):
            return t
    raise DatasetError(
        f"The tokenised prompt of {text!r} does not decode to text containing {prefix!r}; cannot "
        "find the subject's last token."
    )


def _requests(tokenizer, facts: Sequence[Mapping[str, Any]]) -> list[_Request]:
    if isinstance(facts, (str, bytes, Mapping)) or not isinstance(facts, Sequence) or not facts:
        raise DatasetError("facts must be a non-empty list of {'question', 'subject', 'answer'} mappings.")
    out = []
    for i, fact in enumerate(facts):
        if not isinstance(fact, Mapping):
            raise DatasetError(f"Fact {i} is a {type(fact).__name__}, not a mapping.")
        questions = fact.get("question", fact.get("prompt"))
        questions = [questions] if isinstance(questions, str) else questions
        subject, answer = fact.get("subject"), fact.get("answer")
        if (
            not isinstance(questions, Sequence)
            or not questions
            or not all(isinstance(q, str) and q for q in questions)
            or not isinstance(subject, str)
            or not subject.strip()
            or not isinstance(answer, str)
            or not answer
        ):
            raise DatasetError(
                f"Fact {i} is {dict(fact)!r:.120}; give {{'question' (or 'prompt'): str or list of "
                "str, 'subject': str, 'answer': str}, all non-empty."
            )
        prompts, labels, keys_at = [], [], []
        for q in questions:
            if subject not in q:
                raise DatasetError(
                    f"Fact {i}: the subject {subject!r} does not occur in its prompt {q!r} (case-sensitive)."
                )
            enc = encode(tokenizer, {"question": q, "answer": answer})
            n_prompt = next(t for t, label in enumerate(enc["labels"]) if label != -100)
            keys_at.append(_last_subject_token(tokenizer, enc["input_ids"][:n_prompt], q, subject))
            prompts.append(enc["input_ids"])
            labels.append(enc["labels"])
        kl_text = f"{subject} is a"
        kl_ids = list(tokenizer(kl_text)["input_ids"])
        out.append(
            _Request(
                prompts, labels, keys_at, kl_ids, _last_subject_token(tokenizer, kl_ids, kl_text, subject), subject
            )
        )
    return out


def _setup(model, tokenizer, facts, layers, template):
    if tokenizer is None:
        raise DatasetError("The editors need the model's tokenizer (to format prompts and find the subject).")
    net = unwrap(model)
    projs = find_down_projections(net, template)
    if applied(net, template=template):
        raise LedgerError(
            "The model holds applied loki deltas; revert them (or edit inside loki.disabled) so the "
            "edit is made against the base weights."
        )
    return net, projs, _layers(projs, layers), _requests(tokenizer, facts)


def _decoder_layers(net: nn.Module, projs: DownProjections) -> list[nn.Module]:
    """The decoder layer holding each down-projection: its module path up to the layer index (the residual stream
    is that module's output)."""
    names = {id(m): n for n, m in net.named_modules()}
    suffix = projs.template.split("{i}", 1)[1]
    found = []
    for module in projs.modules:
        name = names[id(module)]
        found.append(net.get_submodule(name[: len(name) - len(suffix)] if suffix else name))
    return found


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, hidden):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _batch(seqs: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    batch = collate([{"input_ids": s, "labels": s} for s in seqs], pad)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def _read(net: nn.Module, module: nn.Module, batch: dict, positions: list[int], *, inputs: bool) -> torch.Tensor:
    """`module`'s input (`inputs=True`) or output at `positions[i]` of sequence `i`, float32 `[len(positions), d]`."""
    taken = []
    rows = torch.arange(len(positions))

    def pre(m, args):
        taken.append(args[0][rows, positions].detach().float())

    def post(m, args, out):
        taken.append(_hidden(out)[rows, positions].detach().float())

    handle = module.register_forward_pre_hook(pre) if inputs else module.register_forward_hook(post)
    try:
        with torch.no_grad():
            net(**batch, logits_to_keep=1)
    finally:
        handle.remove()
    return taken[0]


def _new_hidden_state(
    net: nn.Module, block: nn.Module, request: _Request, pad: int, device, opts: ZOptions
) -> torch.Tensor:
    """MEMIT's `compute_z` for one fact: the hidden state `block` should output at the subject's last token."""
    seqs = request.prompts + [request.kl_ids]
    at = request.keys_at + [request.kl_at]
    batch = _batch(seqs, pad, device)
    rows = torch.arange(len(seqs), device=device)
    cols = torch.tensor(at, device=device)
    n = len(request.prompts)
    answer = [
        (answer_positions(lab), torch.tensor(s)[answer_positions(lab) + 1])
        for s, lab in zip(request.prompts, request.labels)
    ]
    # the LM head runs only at the positions read (the answers' and the KL prompt's), not the whole batch
    keep = sorted({int(p) for pos, _ in answer for p in pos} | {request.kl_at})
    where = {p: j for j, p in enumerate(keep)}
    answer = [(torch.tensor([where[int(p)] for p in pos], device=device), tgt.to(device)) for pos, tgt in answer]
    keep_t = torch.tensor(keep, device=device)
    h0 = _read(net, block, batch, at, inputs=False)[0]  # the first phrasing's hidden state: z = h0 + delta
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=opts.lr)

    def add(m, args, out):
        hidden = _hidden(out)
        shift = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        shift = shift.index_put((rows, cols), delta.to(hidden.dtype).expand(len(seqs), -1))
        return _with_hidden(out, hidden + shift)

    kl_init = None
    handle = block.register_forward_hook(add)
    try:
        for step in range(opts.steps):
            with torch.enable_grad():
                logits = net(**batch, logits_to_keep=keep_t).logits
                logp = logits.float().log_softmax(-1)
                nll = torch.stack([-logp[i, pos, tgt].mean() for i, (pos, tgt) in enumerate(answer)]).mean()
                kl_logp = logp[n, where[request.kl_at]][None]
                if kl_init is None:
                    kl_init = kl_logp.detach()
                kl = opts.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
                decay = opts.weight_decay * delta.norm() / h0.norm() ** 2
                loss = nll + kl + decay
                if loss.item() < opts.stop_loss or step == opts.steps - 1:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])  # only delta: the model's .grad stay untouched
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                limit = opts.clamp_norm * h0.norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    return (h0 + delta).detach()


def _edit(
    net: nn.Module,
    tokenizer,
    projs: DownProjections,
    layers: list[int],
    requests: list[_Request],
    opts: ZOptions,
    solve,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Targets, then layer by layer keys, residuals and `solve(layer, keys, residuals)`; the model restored."""
    if not isinstance(opts, ZOptions) or opts.steps < 1 or opts.lr <= 0:
        raise DatasetError("z must be a loki.editors.ZOptions with steps >= 1 and lr > 0.")
    device = net.get_input_embeddings().weight.device
    pad = pad_token_id(tokenizer)
    blocks = _decoder_layers(net, projs)
    last = blocks[layers[-1]]
    saved = {layer: projs.rows(layer).detach().clone() for layer in layers}
    was_training = net.training
    net.eval()
    changes = {}
    try:
        zs = torch.stack([_new_hidden_state(net, last, r, pad, device, opts) for r in requests], 1)  # [d_model, n]
        first = _batch([r.prompts[0] for r in requests], pad, device)
        first_at = [r.keys_at[0] for r in requests]
        every = _batch([p for r in requests for p in r.prompts], pad, device)
        every_at = [k for r in requests for k in r.keys_at]
        for i, layer in enumerate(layers):
            keys = _read(net, projs.modules[layer], every, every_at, inputs=True)  # [phrasings, d_ff]
            keys = torch.stack([part.mean(0) for part in keys.split([len(r.prompts) for r in requests])], 1)
            current = _read(net, last, first, first_at, inputs=False).t()  # [d_model, n]
            residuals = (zs - current).to(torch.float64) / (len(layers) - i)  # spread over the remaining layers
            d = solve(layer, keys.cpu(), residuals.cpu())
            rows = (saved[layer].double().cpu() + d).to(saved[layer].dtype)
            changes[layer] = (torch.arange(projs.d_out), rows)
            with torch.no_grad():
                projs.rows(layer).copy_(rows.to(device))  # the next layer's keys see this edit, as in MEMIT
    finally:
        with torch.no_grad():
            for layer, w in saved.items():
                projs.rows(layer).copy_(w)
        net.train(was_training)
    return changes
