"""The three model cards a push writes as `README.md`: a delta's (`model_card`), an attribution set's
(`attributions_card`) and a selection's (`selection_card`). Rendered locally, no request made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attribution import Attributions
from ..errors import DeltaFormatError
from ..scoping import Scope
from ..selection import Selection
from ..version import __version__
from .repo import parse_repo_id, scope_name

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..delta import Delta


CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "model_card.md"
ATTRIBUTIONS_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "attributions_card.md"
SELECTION_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "selection_card.md"


def model_card(
    delta: Delta,
    repo_id: str,
    *,
    filename: str | None = None,
    size: int | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    several_files: bool = False,
    scope: Scope | None = None,
) -> ModelCard:
    """The model card `push_delta` writes: YAML metadata (`library_name: loki`, `base_model`,
    `base_model_relation: adapter`, tags, license) and a body rendered from `loki/templates/model_card.md`.

    Evaluation figures come from `delta.info["extra"]["evaluation"]`, a dict with any of
    `"task": {"name": str, "metrics": {metric: value}}`, `"general": {benchmark: {"base": x, "implanted": y}}`,
    `"forgetting": float` (LoKI's Avg in percent; computed from "general" when absent) and `"implant"`: the four
    numbers `{"efficacy", "generalisation", "specificity", "forgetting"}` and optionally `"answers_kept"` (whole
    neighbourhood answers unchanged; shown as a count given `"neighbourhood_questions"`) and `"fluency"`
    (`ImplantReport.evaluation()` gives all); `"scoped"`: the same figures of the delta served through its scope,
    shown in a column beside them (`report.evaluation(scoped=scoped_report)`).

    Args:
        delta: the `Delta`.
        repo_id: the repo it goes to (`"namespace/name"`).
        filename: the delta's name in the repo; default `<repo name>.loki`.
        size: the file size in bytes; default the tensors' size.
        license, tags: metadata (`loki` and `knowledge-implanting` are always tagged).
        several_files: the repo holds other `.loki` files (the card then says to pass `filename=`).
        scope: the `Scope` pushed beside the delta: the card says what it is and serves the delta through it.

    Returns:
        huggingface_hub.ModelCard: `str(card)` is the README.md text. No request is made.

    Raises:
        DeltaFormatError: the evaluation metadata is malformed, or a "general" base score is 0 without "forgetting".

    >>> import loki, loki.testing
    >>> card = model_card(loki.testing.random_delta(loki.testing.tiny_model("llama"), name="x"), "me/x")
    >>> card.data.library_name, card.data.base_model, card.data.tags
    ('loki', 'tiny-random/llama-seed0', ['loki', 'knowledge-implanting'])
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = delta.info
    base, proj = info["base_model"], info["down_projection"]
    base_id = base.get("id") or None
    filename = filename or f"{repo_id.split('/')[-1]}.loki"
    card_tags = ["loki", "knowledge-implanting"] + [t for t in tags if t not in ("loki", "knowledge-implanting")]
    data = ModelCardData(
        library_name="loki",
        base_model=base_id,
        base_model_relation="adapter" if base_id else None,
        license=license,
        tags=card_tags,
    )
    counts = delta.rows_per_layer()
    selection = dict(info.get("selection") or {})
    task, general, forgetting = card_evaluation(info)
    evaluation = (info.get("extra") or {}).get("evaluation") or {}
    implant, through = evaluation.get("implant") or {}, evaluation.get("scoped") or {}
    total_rows = proj["num_layers"] * proj["d_out"]
    kwargs = dict(
        title=delta.name or repo_id.split("/")[-1],
        summary=(
            f"A [loki](https://arxiv.org/abs/2505.22120) delta: new values for {delta.num_rows} FFN down-projection "
            f"rows of {f'`{base_id}`' if base_id else 'its base model'}, chosen by attribution to disturb what the "
            "model already knows as little as possible. Applying it writes those rows and no other weight; reverting "
            "it restores the base weights bit for bit."
        ),
        description=info.get("description") or "",
        base_model=base_id,
        base_model_url=f"https://huggingface.co/{base_id}" if base_id else "",
        base_revision=base.get("revision"),
        architecture=base.get("architecture") or proj["template"],
        repo_id=repo_id,
        filename=filename,
        size=_human_size(size if size is not None else delta.nbytes),
        form=info["form"],
        dtype=info["dtype"],
        num_rows=delta.num_rows,
        num_layers_changed=len(counts),
        num_layers=proj["num_layers"],
        num_params=f"{delta.num_params:,}",
        fraction=f"{100 * delta.num_rows / total_rows:.2f}%" if total_rows else "",
        selection_rows=_table_rows({"trainable parameters": f"{delta.num_params:,}", **selection}),
        rows_per_layer=_rows_per_layer(counts, proj["num_layers"]),
        training_rows=_table_rows(info.get("training") or {}),
        task_name=task.get("name"),
        task_rows=_table_rows(task.get("metrics") or {}),
        # the change in percent of the base score, as report.table() gives it (an absolute -9.9e-05 reads as noise)
        general_rows=[
            (name, _num(b), _num(t), f"{100 * (t - b) / b:+.2f}" if b else "-") for name, (b, t) in general.items()
        ],
        forgetting=None if forgetting is None else f"{forgetting:.2f}%",
        implant_rows=[
            (label, *(_implant_figure(key, d) if key in d else "-" for d in (implant, through)))
            for key, label in _FOUR
            if key in implant or key in through
        ],
        scoped_figures=bool(through),
        several_files=several_files,
        scope_file=scope_name(filename) if scope is not None else None,
        scope_layer=scope.layer if scope is not None else None,
        scope_keys=f"{len(scope):,}" if scope is not None else None,
        scope_margin=f"{scope.margin:g}" if scope is not None else None,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **kwargs)


_FOUR = (
    ("efficacy", "efficacy (training phrasings)"),
    ("generalisation", "generalisation (held-out phrasings)"),
    ("specificity", "specificity (neighbourhood answer tokens kept, vs. the base model)"),
    ("answers_kept", "neighbourhood whole answers unchanged"),
    ("fluency", "fluency (n-gram entropy of the neighbourhood answers, bits)"),
    ("forgetting", "general forgetting (LoKI's Avg over sets sharing no template; lower is better)"),
)


def _implant_figure(key: str, figures: dict[str, Any]) -> str:
    value = float(figures[key])
    if key == "forgetting":
        return f"{value:+.2f}%"
    if key == "fluency":
        return f"{value:.2f}"
    if key == "answers_kept" and "neighbourhood_questions" in figures:  # a count reads better than 12.5%
        n = int(figures["neighbourhood_questions"])
        return f"{round(value * n)} of {n}"
    # one decimal where a whole percent would round a 99.9% up to the 100% it did not reach (as report.table())
    return f"{value:.1%}" if key in ("specificity", "answers_kept") else f"{value:.0%}"


def card_evaluation(info: dict[str, Any]) -> tuple[dict, dict[str, tuple[float, float]], float | None]:
    """`(task, {benchmark: (base, implanted)}, forgetting)` from `info["extra"]["evaluation"]`, checked."""
    evaluation = (info.get("extra") or {}).get("evaluation") or {}
    try:
        task = dict(evaluation.get("task") or {})
        general = {
            str(k): (float(v["base"]), float(v["implanted"])) for k, v in (evaluation.get("general") or {}).items()
        }
        forgetting = evaluation.get("forgetting")
        forgetting = None if forgetting is None else float(forgetting)
        for part in ("implant", "scoped"):
            figures = evaluation.get(part) or {}
            for key, _ in _FOUR:
                if key in figures:
                    float(figures[key])
            if "neighbourhood_questions" in figures and int(figures["neighbourhood_questions"]) < 1:
                raise ValueError
    except (TypeError, ValueError, KeyError, AttributeError):
        raise DeltaFormatError(
            'delta.info["extra"]["evaluation"] must look like {"task": {"name": str, "metrics": {metric: number}}, '
            '"general": {benchmark: {"base": number, "implanted": number}}, "forgetting": number, "implant": '
            '{figure: number}, "scoped": {figure: number}} (all optional).'
        ) from None
    if forgetting is None and general:
        if any(b == 0 for b, _ in general.values()):
            raise DeltaFormatError("A general benchmark has base score 0; the forgetting score divides by it.")
        from ..evaluate.metrics import forgetting_score

        forgetting = forgetting_score({k: b for k, (b, _) in general.items()}, {k: t for k, (_, t) in general.items()})
    return task, general, forgetting


def _table_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (k, v if isinstance(v, str) else _num(v) if isinstance(v, float) else json.dumps(v))
        for k, v in d.items()
        if v is not None
    ]


def _num(x: float) -> str:
    return f"{x:.4g}"


def _rows_per_layer(counts: dict[int, int], num_layers: int) -> str:
    values = set(counts.values())
    if len(counts) == num_layers and len(values) == 1:
        return f"{values.pop()} in each of the {num_layers} layers"
    return ", ".join(f"layer {i}: {k}" for i, k in counts.items())


def _human_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def attributions_card(
    attributions: Attributions, repo_id: str, *, license: str | None = None, tags: Iterable[str] = ()
) -> ModelCard:
    """The model card `push_attributions` writes: YAML metadata (`library_name: loki`, `base_model` when the set's
    model is a Hub id, tags `loki`, `knowledge-implanting`, `loki-attributions`, license) and a body rendered from
    `loki/templates/attributions_card.md`: the base model, the prompts (count, source, sha256), the integrated-
    gradient steps, target, measure and engine, the model's dtype, when the set was computed and pushed, and how
    to select from it.

    Args:
        attributions: the `Attributions`.
        repo_id: the repo it goes to (`"namespace/name"`).
        license, tags: metadata (the three tags above are always there).

    Returns:
        huggingface_hub.ModelCard: `str(card)` is the README.md text. No request is made.

    >>> import loki, loki.testing
    >>> attr = loki.attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7]], steps=2, progress=False)
    >>> card = attributions_card(attr, "me/tiny-kva")
    >>> card.data.base_model, card.data.tags
    ('tiny-random/llama-seed0', ['loki', 'knowledge-implanting', 'loki-attributions'])
    """
    from huggingface_hub import ModelCard, ModelCardData

    meta = attributions.meta
    model = meta.get("model")
    base_id = model if _is_hub_id(model) else None
    n, num_layers, d = attributions.shape
    shards = meta.get("merged_shards")
    settings = {
        "base model": f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{model}` (not a Hub id)",
        "architecture": f"{meta.get('model_type')} (down-projections `{meta.get('template')}`)",
        "prompts": f"{n} ({meta.get('prompt_source')})",
        "prompts sha256": f"`{meta.get('prompts_sha256')}`",
        "integrated-gradient steps": f"{meta.get('steps')} (alphas {meta.get('alphas', 'k/m for k = 0..m-1')})",
        "target token": meta.get("target"),
        "attributed measure": meta.get("measure"),
        "engine": meta.get("engine"),
        "model dtype": meta.get("dtype"),
        "values": f"float32 `[{n}, {num_layers}, {d}]` (prompts, layers, rows)",
        "computed": meta.get("created") or "not recorded",
        "pushed": _today(),
        "seconds per prompt (median)": _num(meta["seconds_per_prompt"]) if meta.get("seconds_per_prompt") else None,
        "joined from shards": shards,
        "loki version": meta.get("loki_version"),
    }
    data = ModelCardData(
        library_name="loki",
        base_model=base_id,
        license=license,
        tags=_tags(("loki", "knowledge-implanting", "loki-attributions"), tags),
    )
    kwargs = dict(
        title=repo_id.split("/")[-1],
        base=f"`{base_id or model}`",
        n=n,
        num_layers=num_layers,
        d=d,
        settings=[(k, str(v)) for k, v in settings.items() if v is not None],
        repo_id=repo_id,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(ATTRIBUTIONS_CARD_TEMPLATE), **kwargs)


def selection_card(
    selection: Selection, repo_id: str, *, license: str | None = None, tags: Iterable[str] = ()
) -> ModelCard:
    """The model card `push_selection` writes: YAML metadata (`library_name: loki`, `base_model` when the
    selection records a Hub model id in `extra["model"]`, tags `loki`, `knowledge-implanting`, `loki-selection`,
    license) and a body from `loki/templates/selection_card.md`: rows per layer, q, strategy, score, the
    attributions it came from (linked when they are a Hub repo) and how to train on it.

    Args:
        selection: the `Selection`.
        repo_id: the repo it goes to.
        license, tags: metadata.

    Returns:
        huggingface_hub.ModelCard. No request is made.

    >>> import loki
    >>> card = selection_card(loki.Selection.random(num_layers=2, d_out=32, q=10), "me/tiny-q10")
    >>> card.data.tags, "3 in each of the 2 layers" in str(card)
    (['loki', 'knowledge-implanting', 'loki-selection'], True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    model = selection.extra.get("model")
    base_id = model if _is_hub_id(model) else None
    source = selection.source
    hub_source = re.fullmatch(r"(?P<repo>[^@\s]+/[^@\s]+)@(?P<rev>[0-9a-f]{40})", source or "")
    if hub_source:
        source = f"[{source}](https://huggingface.co/{hub_source['repo']}/tree/{hub_source['rev']})"
    elif source:
        source = f"`{source}`"
    total = selection.num_layers * selection.d_out
    settings = {
        "base model": f"[{base_id}](https://huggingface.co/{base_id})"
        if base_id
        else (f"`{model}`" if model else "not recorded"),
        "strategy": selection.strategy,
        "q (percent of rows per layer)": selection.q,
        "rows": f"{selection.num_rows} of {total} ({100 * selection.num_rows / total:.2f}%)" if total else None,
        "rows per layer": _rows_per_layer(selection.rows_per_layer(), selection.num_layers),
        "attributions": source or "not recorded",
        **{k: v for k, v in selection.extra.items() if k != "model" and isinstance(v, (str, int, float, bool))},
        "pushed": _today(),
    }
    data = ModelCardData(
        library_name="loki",
        base_model=base_id,
        license=license,
        tags=_tags(("loki", "knowledge-implanting", "loki-selection"), tags),
    )
    kwargs = dict(
        title=repo_id.split("/")[-1],
        base=f"`{base_id or model}`" if (base_id or model) else "its base model",
        base_model=base_id,
        num_rows=selection.num_rows,
        num_layers=selection.num_layers,
        d_out=selection.d_out,
        settings=[(k, str(v)) for k, v in settings.items() if v is not None],
        repo_id=repo_id,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(SELECTION_CARD_TEMPLATE), **kwargs)


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and parse_repo_id(name) is not None and "@" not in name


def _tags(always: Iterable[str], more: Iterable[str]) -> list[str]:
    always = list(always)
    return always + [t for t in more if t not in always]


def _today() -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime())
