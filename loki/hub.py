"""Sharing on the Hugging Face Hub: push a delta, an attribution set or a selection with a model card, load it
back by repo id.

>>> import loki
>>> # commit = loki.push(delta, "me/medical-implant", private=True)   # .loki file + README.md card + marker
>>> # delta = loki.load("me/medical-implant@v1")                     # branch, tag or commit; cached, verified
>>> # loki.push(attributions, "me/smollm2-kva")                      # attribute once per base model...
>>> # selection = loki.select(loki.load_attributions("me/smollm2-kva"), q=10)   # ...select from it anywhere
>>> loki.hub.parse_repo_id("me/medical-implant@v1")
('me/medical-implant', 'v1')

A repo holds one kind: a delta (`<name>.loki`), attributions (the folder `loki.attribute(..., path=)` writes:
`meta.json`, `attributions.npy`, `targets.npy`, `seconds.npy`) or a selection (`selection.json`), each with a
`README.md` model card and a small `config.json` marker.

Downloads go through huggingface_hub's own cache functions and the standard Hugging Face cache (`HF_HOME`,
`HF_HUB_CACHE`), so `HF_HUB_OFFLINE=1` works once a repo was pulled. Every file returned is checked against its
checksum first, a cached one too, on every load (see `download`). Every failure is a `loki.errors.HubError`
subclass that says what to do and is also the `huggingface_hub.errors` exception of the same kind (e.g.
`HubRepoNotFoundError` is a `RepositoryNotFoundError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import (
    DeltaFormatError,
    HubAmbiguousFileError,
    HubArgumentError,
    HubCacheError,
    HubError,
    HubFileNotFoundError,
    HubGatedRepoError,
    HubIntegrityError,
    HubOfflineError,
    HubPermissionError,
    HubRateLimitError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubServerError,
)
from .attribution import FILES as ATTRIBUTION_FILES
from .attribution import FORMAT as ATTRIBUTION_FORMAT
from .attribution import Attributions
from .format import check, read, save
from .selection import Selection

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

    from .delta import Delta

__all__ = ["attributions_card", "download", "load_attributions_from_hub", "load_from_hub", "load_selection_from_hub",
           "model_card", "parse_repo_id", "push_attributions", "push_selection", "push_to_hub", "selection_card"]

# A small file in every delta repo. Hubs count a repo's downloads by requests for one chosen file (by default
# `config.json`); `download` fetches it next to the delta, once per commit and cache.
MARKER = "config.json"
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
ATTRIBUTIONS_CARD_TEMPLATE = Path(__file__).parent / "templates" / "attributions_card.md"
SELECTION_CARD_TEMPLATE = Path(__file__).parent / "templates" / "selection_card.md"
SELECTION_FILE = "selection.json"
KINDS = {"delta": "a loki delta", "attributions": "loki attributions", "selection": "a loki selection"}
LOADERS = {"delta": "loki.load", "attributions": "loki.load_attributions", "selection": "loki.load_selection"}
DEFAULT_BRANCH = "main"
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[^\s@]+))?$")


def parse_repo_id(source: str) -> tuple[str, str | None] | None:
    """`"org/name[@revision]"` -> `(repo_id, revision or None)`; None when `source` is not shaped like a repo id.
    A name ending in `.loki` is taken for a local file, not a repo. Only the shape is checked (no request).

    Args:
        source: a string (or path).

    Returns:
        tuple[str, str | None] | None.

    >>> parse_repo_id("me/medical-implant@v1"), parse_repo_id("me/medical-implant")
    (('me/medical-implant', 'v1'), ('me/medical-implant', None))
    >>> parse_repo_id("deltas/medical.loki") is None
    True
    """
    match = _REPO_ID.match(str(source))
    if match is None or match["repo"].endswith(".loki"):
        return None
    return match["repo"], match["rev"]


# -- push -------------------------------------------------------------------------------------------
def push_to_hub(
    delta: "Delta",
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    filename: str | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
) -> "CommitInfo":
    """Upload `delta` to the Hub repo `repo_id` (created if needed) with a generated model card.

    One commit adds `filename` (default `<repo name>.loki`), `README.md` (`model_card`) and the marker
    `config.json` on branch `revision` (default main; a new branch starts from main).

    Args:
        delta: the `Delta`.
        repo_id: `"namespace/name"` (no `@revision`).
        private: for a repo created by this call.
        revision: the branch to commit to.
        commit_message: default "Upload <filename> (<n> rows) with loki".
        token, endpoint: for `huggingface_hub.HfApi` (`HF_TOKEN` / the saved login, `HF_ENDPOINT`).
        filename: the file's name in the repo, ending in `.loki`.
        license, tags: model card metadata.

    Returns:
        huggingface_hub.CommitInfo: `.oid` is the commit sha, `.commit_url` its page.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name`, or `filename` does not end in `.loki` (no request made).
        DeltaFormatError: `delta.info["extra"]["evaluation"]` is malformed (no request made).
        HubPermissionError: the token is invalid or may not write there (`HubGatedRepoError` for a gated repo).
        HubRateLimitError, HubServerError: the Hub answered 429, or 5xx / another unexpected status.
        HubOfflineError: the Hub cannot be reached, or `HF_HUB_OFFLINE=1`.
        HubRepoNotFoundError, HubRevisionNotFoundError: as the Hub answers them.

    >>> # loki.push(loki.load("tiny.loki"), "me/tiny-implant", private=True, license="apache-2.0")
    """
    from huggingface_hub import CommitOperationAdd

    _check_repo_id(repo_id)
    filename = filename or f"{repo_id.split('/')[1]}.loki"
    if not filename.endswith(".loki"):
        raise HubArgumentError(f"filename {filename!r} must end in '.loki' so that loki.load finds it in the repo.")
    _evaluation(delta.info)  # a card that cannot be written fails before anything is created
    check(delta)  # so does a delta the reader would refuse (the same checks save runs)

    def operations(files: list[str]) -> list:
        others = [f for f in files if f.endswith(".loki") and f != filename]
        path = save(delta, Path(tmp) / Path(filename).name)
        card = model_card(delta, repo_id, filename=filename, size=path.stat().st_size, license=license,
                          tags=tags, several_files=bool(others))
        marker = {"library_name": "loki", "format": "loki", "format_version": 1,
                  "base_model": delta.base_model, "delta": filename}
        return [CommitOperationAdd(filename, path), *_card_and_marker(card, marker)]

    with tempfile.TemporaryDirectory(prefix="loki-push-") as tmp:
        return _upload(repo_id, "delta", operations, f"Upload {filename} ({delta.num_rows} rows) with loki",
                       private=private, revision=revision, commit_message=commit_message, token=token,
                       endpoint=endpoint, filename=filename)


def push_attributions(
    attributions: Attributions,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
) -> "CommitInfo":
    """Upload an attribution set to the Hub repo `repo_id` (created if needed) with a generated model card, so
    that later implants on the same base model select rows without attributing again.

    One commit adds the attribution folder's files as `attributions.save` writes them (`meta.json`,
    `attributions.npy` float32 `[N, L, d_model]`, `targets.npy`, `seconds.npy`: all of it, since `select` counts
    each prompt's picks and only breaks ties by the mean), `README.md` (`attributions_card`) and the marker
    `config.json`. A set read from a folder is uploaded from it; one in memory is written to a temporary folder.

    Args:
        attributions: the `Attributions` (from `loki.attribute`, `Attributions.load` or `loki.load_attributions`).
        repo_id: `"namespace/name"` (no `@revision`).
        private, revision, commit_message, token, endpoint, license, tags: as `push_to_hub`.

    Returns:
        huggingface_hub.CommitInfo.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name` (no request made), or the repo holds a delta or a
            selection (one kind per repo: the card describes it).
        HubError: as `push_to_hub` (`HubPermissionError`, `HubOfflineError`, ...).

    >>> # loki.push(loki.attribute(model, tokenizer, "probe"), "me/smollm2-kva", license="apache-2.0")
    """
    from huggingface_hub import CommitOperationAdd

    _check_repo_id(repo_id)
    card = attributions_card(attributions, repo_id, license=license, tags=tags)
    marker = {"library_name": "loki", "format": ATTRIBUTION_FORMAT, "format_version": 1,
              "base_model": attributions.meta.get("model"), "files": list(ATTRIBUTION_FILES)}
    n, num_layers, d = attributions.shape
    with tempfile.TemporaryDirectory(prefix="loki-push-") as tmp:
        folder = attributions.saved_at() or attributions.save(tmp)
        operations = [CommitOperationAdd(name, str(folder / name)) for name in ATTRIBUTION_FILES]
        operations += _card_and_marker(card, marker)
        return _upload(repo_id, "attributions", lambda files: operations,
                       f"Upload attributions ({n} prompts x {num_layers} layers x {d}) with loki", private=private,
                       revision=revision, commit_message=commit_message, token=token, endpoint=endpoint)


def push_selection(
    selection: Selection,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
) -> "CommitInfo":
    """Upload a selection to the Hub repo `repo_id` (created if needed): `selection.json` (`Selection.save`'s
    format), `README.md` (`selection_card`) and the marker `config.json`, in one commit.

    Args:
        selection: the `Selection`.
        repo_id: `"namespace/name"` (no `@revision`).
        private, revision, commit_message, token, endpoint, license, tags: as `push_to_hub`.

    Returns:
        huggingface_hub.CommitInfo.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name` (no request made), or the repo holds a delta or
            attributions (one kind per repo).
        HubError: as `push_to_hub`.

    >>> # loki.push(loki.select(loki.load_attributions("me/smollm2-kva"), q=10), "me/smollm2-q10")
    """
    from huggingface_hub import CommitOperationAdd

    _check_repo_id(repo_id)
    card = selection_card(selection, repo_id, license=license, tags=tags)
    marker = {"library_name": "loki", "format": "loki-selection", "format_version": 1,
              "base_model": selection.extra.get("model"), "selection": SELECTION_FILE}
    operations = [CommitOperationAdd(SELECTION_FILE, (json.dumps(selection.to_json()) + "\n").encode()),
                  *_card_and_marker(card, marker)]
    return _upload(repo_id, "selection", lambda files: operations,
                   f"Upload a selection ({selection.strategy}, q={selection.q}: {selection.num_rows} rows) with loki",
                   private=private, revision=revision, commit_message=commit_message, token=token, endpoint=endpoint)


def _check_repo_id(repo_id: str) -> None:
    if parse_repo_id(repo_id) is None or "@" in repo_id:
        raise HubArgumentError(f"{repo_id!r} is not a Hub repo id; give 'namespace/name' (e.g. 'me/medical-implant').")


def _card_and_marker(card: "ModelCard", marker: dict[str, Any]) -> list:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd("README.md", str(card).encode()),
            CommitOperationAdd(MARKER, (json.dumps(marker, indent=2) + "\n").encode())]


def _upload(repo_id: str, kind: str, operations, message: str, *, private: bool | None, revision: str | None,
            commit_message: str | None, token: str | None, endpoint: str | None, filename: str | None = None):
    """One commit of `operations(files now on the branch)` on branch `revision` (default main) of `repo_id`,
    created if needed. A repo that holds another kind is refused: its model card would be replaced."""
    from huggingface_hub import HfApi

    branch = revision or DEFAULT_BRANCH
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(api, repo_id, branch, filename, pushing=True):
        if not api.repo_exists(repo_id):  # (create_repo(exist_ok=True) on a repo one may not write fails oddly)
            api.create_repo(repo_id, private=private, exist_ok=True)
        new_branch = branch != DEFAULT_BRANCH and branch not in {b.name for b in api.list_repo_refs(repo_id).branches}
        # a new branch starts from main: check main's files, and create the branch only once the push is accepted
        files = api.list_repo_files(repo_id, revision=DEFAULT_BRANCH if new_branch else branch)
        held = _held(files)
        if held not in (None, kind):
            raise HubArgumentError(
                f"{repo_id}@{branch} holds {KINDS[held]}; a repo holds one kind, which its model card describes. "
                f"Push {KINDS[kind]} to a repo of its own (e.g. {repo_id}-{kind}).",
                repo_id=repo_id,
            )
        if new_branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.create_commit(repo_id, operations(files), revision=branch, commit_message=commit_message or message)


def model_card(
    delta: "Delta",
    repo_id: str,
    *,
    filename: str | None = None,
    size: int | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    several_files: bool = False,
) -> "ModelCard":
    """The model card `push_to_hub` writes: YAML metadata (`library_name: loki`, `base_model`,
    `base_model_relation: adapter`, tags, license) and a body rendered from `loki/templates/model_card.md`.

    Evaluation figures come from `delta.info["extra"]["evaluation"]`, a dict with any of
    `"task": {"name": str, "metrics": {metric: value}}`, `"general": {benchmark: {"base": x, "implanted": y}}`,
    `"forgetting": float` (LoKI's Avg in percent; computed from "general" when absent) and `"implant"`: the four
    numbers `{"efficacy", "generalisation", "specificity", "forgetting"}` and optionally `"answers_kept"` (whole
    neighbourhood answers unchanged) and `"fluency"` (`ImplantReport.evaluation()` gives all).

    Args:
        delta: the `Delta`.
        repo_id: the repo it goes to (`"namespace/name"`).
        filename: the delta's name in the repo; default `<repo name>.loki`.
        size: the file size in bytes; default the tensors' size.
        license, tags: metadata (`loki` and `knowledge-implanting` are always tagged).
        several_files: the repo holds other `.loki` files (the card then says to pass `filename=`).

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
    base, target = info["base_model"], info["target"]
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
    task, general, forgetting = _evaluation(info)
    implant = ((info.get("extra") or {}).get("evaluation") or {}).get("implant") or {}
    total_rows = target["num_layers"] * target["d_out"]
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
        architecture=base.get("architecture") or target["template"],
        repo_id=repo_id,
        filename=filename,
        size=_human_size(size if size is not None else delta.nbytes),
        form=info["form"],
        dtype=info["dtype"],
        num_rows=delta.num_rows,
        num_layers_changed=len(counts),
        num_layers=target["num_layers"],
        num_params=f"{delta.num_params:,}",
        fraction=f"{100 * delta.num_rows / total_rows:.2f}%" if total_rows else "",
        selection_rows=_table_rows({"trainable parameters": f"{delta.num_params:,}", **selection}),
        rows_per_layer=_rows_per_layer(counts, target["num_layers"]),
        training_rows=_table_rows(info.get("training") or {}),
        task_name=task.get("name"),
        task_rows=_table_rows(task.get("metrics") or {}),
        general_rows=[(name, _num(b), _num(t), _num(t - b, signed=True)) for name, (b, t) in general.items()],
        forgetting=None if forgetting is None else f"{forgetting:.2f}%",
        implant_rows=[(label, _implant_figure(key, float(implant[key]))) for key, label in _FOUR if key in implant],
        several_files=several_files,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **kwargs)


_FOUR = (("efficacy", "efficacy (training phrasings)"), ("generalisation", "generalisation (held-out phrasings)"),
         ("specificity", "specificity (neighbourhood answer tokens kept, vs. the base model)"),
         ("answers_kept", "neighbourhood whole answers unchanged"),
         ("fluency", "fluency (n-gram entropy of the neighbourhood answers, bits)"),
         ("forgetting", "general forgetting (LoKI's Avg over sets sharing no template; lower is better)"))


def _implant_figure(key: str, value: float) -> str:
    if key == "forgetting":
        return f"{value:+.2f}%"
    return f"{value:.2f}" if key == "fluency" else f"{value:.0%}"


def _evaluation(info: dict[str, Any]) -> tuple[dict, dict[str, tuple[float, float]], float | None]:
    """`(task, {benchmark: (base, implanted)}, forgetting)` from `info["extra"]["evaluation"]`, checked."""
    evaluation = (info.get("extra") or {}).get("evaluation") or {}
    try:
        task = dict(evaluation.get("task") or {})
        general = {str(k): (float(v["base"]), float(v["implanted"]))
                   for k, v in (evaluation.get("general") or {}).items()}
        forgetting = evaluation.get("forgetting")
        forgetting = None if forgetting is None else float(forgetting)
        for key, _ in _FOUR:
            if key in (evaluation.get("implant") or {}):
                float(evaluation["implant"][key])
    except (TypeError, ValueError, KeyError, AttributeError):
        raise DeltaFormatError(
            'delta.info["extra"]["evaluation"] must look like {"task": {"name": str, "metrics": {metric: number}}, '
            '"general": {benchmark: {"base": number, "implanted": number}}, "forgetting": number} (all optional).'
        ) from None
    if forgetting is None and general:
        if any(b == 0 for b, _ in general.values()):
            raise DeltaFormatError("A general benchmark has base score 0; the forgetting score divides by it.")
        from .evaluate import forgetting_score

        forgetting = forgetting_score({k: b for k, (b, _) in general.items()}, {k: t for k, (_, t) in general.items()})
    return task, general, forgetting


def _table_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v if isinstance(v, str) else _num(v) if isinstance(v, float) else json.dumps(v)) for k, v in d.items()
            if v is not None]


def _num(x: float, signed: bool = False) -> str:
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _rows_per_layer(counts: dict[int, int], num_layers: int) -> str:
    values = set(counts.values())
    if len(counts) == num_layers and len(values) == 1:
        return f"{values.pop()} in each of the {num_layers} layers"
    return ", ".join(f"layer {i}: {k}" for i, k in counts.items())


def _human_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def attributions_card(attributions: Attributions, repo_id: str, *, license: str | None = None,
                      tags: Iterable[str] = ()) -> "ModelCard":
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
    data = ModelCardData(library_name="loki", base_model=base_id, license=license,
                         tags=_tags(("loki", "knowledge-implanting", "loki-attributions"), tags))
    kwargs = dict(
        title=repo_id.split("/")[-1],
        base=f"`{base_id or model}`",
        n=n, num_layers=num_layers, d=d,
        settings=[(k, str(v)) for k, v in settings.items() if v is not None],
        repo_id=repo_id,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(ATTRIBUTIONS_CARD_TEMPLATE), **kwargs)


def selection_card(selection: Selection, repo_id: str, *, license: str | None = None,
                   tags: Iterable[str] = ()) -> "ModelCard":
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
        "base model": f"[{base_id}](https://huggingface.co/{base_id})" if base_id else (f"`{model}`" if model else
                                                                                      "not recorded"),
        "strategy": selection.strategy,
        "q (percent of rows per layer)": selection.q,
        "rows": f"{selection.num_rows} of {total} ({100 * selection.num_rows / total:.2f}%)" if total else None,
        "rows per layer": _rows_per_layer(selection.rows_per_layer(), selection.num_layers),
        "attributions": source or "not recorded",
        **{k: v for k, v in selection.extra.items() if k != "model" and isinstance(v, (str, int, float, bool))},
        "pushed": _today(),
    }
    data = ModelCardData(library_name="loki", base_model=base_id, license=license,
                         tags=_tags(("loki", "knowledge-implanting", "loki-selection"), tags))
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


# -- pull -------------------------------------------------------------------------------------------
def load_from_hub(source: str, **kwargs) -> "Delta":
    """`download(source, **kwargs)`, then read and validate the file (`loki.load` calls this for Hub ids).

    Args:
        source: `"org/name[@revision]"`.
        **kwargs: `download`'s keyword arguments.

    Returns:
        Delta.

    Raises:
        HubError: as `download`.
        DeltaFormatError: the file is not a valid delta (`UnsupportedVersionError`, `InvalidIndicesError`: its
            subclasses).
    """
    return read(download(source, **kwargs))


def load_attributions_from_hub(source: str, **kwargs) -> Attributions:
    """The attribution set of Hub repo `source`, memory-mapped from the Hugging Face cache
    (`loki.load_attributions` calls this for Hub ids).

    Args:
        source: `"org/name[@revision]"`.
        **kwargs: `download`'s keyword arguments (except `kind` and `filename`).

    Returns:
        Attributions: `path` is the cached snapshot folder, `origin` is `"org/name@<commit sha>"` (what `select`
        records as the selection's source).

    Raises:
        HubError: as `download`; `HubFileNotFoundError` when the repo holds no attribution set (the message names
            what it holds, e.g. a delta, and the function that loads it).
        AttributionError: the files are not a valid attribution set.

    >>> # attributions = load_attributions_from_hub("me/smollm2-kva@v1")   # attributions.origin: "me/smollm2-kva@<sha>"
    """
    repo_id, commit, paths = _fetch(source, "attributions", **kwargs)
    attributions = Attributions.load(paths[0].parent)
    attributions.origin = f"{repo_id}@{commit}"
    return attributions


def load_selection_from_hub(source: str, **kwargs) -> Selection:
    """The selection of Hub repo `source` (`loki.load_selection` calls this for Hub ids).

    Args:
        source: `"org/name[@revision]"`.
        **kwargs: `download`'s keyword arguments (except `kind` and `filename`).

    Returns:
        Selection.

    Raises:
        HubError: as `download`; `HubFileNotFoundError` when the repo holds no selection.
        SelectionError, InvalidIndicesError: `selection.json` is not a valid selection.

    >>> # selection = load_selection_from_hub("me/smollm2-q10")
    """
    return Selection.load(_fetch(source, "selection", **kwargs)[2][0])


def download(
    source: str,
    *,
    kind: str = "delta",
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The path, in the Hugging Face cache, of what Hub repo `source` (`"org/name[@revision]"`) holds: its `.loki`
    file (`kind="delta"`), its attribution folder (`kind="attributions"`) or its `selection.json`
    (`kind="selection"`).

    A delta is the repo's only `.loki` file unless `filename` names one. Everything goes through huggingface_hub's
    cache functions: `HfApi.resolve_revision` turns a branch or tag into a commit (recording it in the cache's
    `refs/`), the commit's file listing is the one `snapshot_download` caches (read back with
    `get_cached_repo_tree`), and the files come from `hf_hub_download` at that commit. Each download is checked
    against the checksum the Hub lists (a mismatch removes the revision from the cache), and so is every file
    returned from the cache, on every call: against the checksum recorded at download (the blob's name, which is
    the Hub's etag: sha256 for LFS files, git blob sha1 otherwise; or the cached listing), one streaming hash pass.
    A damaged cached file is downloaded again (and checked) when the Hub can be asked, refused offline. A full
    commit sha already cached, `local_files_only=True` or `HF_HUB_OFFLINE=1` make no request; when the Hub is
    unreachable, rate-limited or failing, the cached copy of the revision is used if there is one.

    Args:
        source: `"org/name"` or `"org/name@revision"`.
        kind: "delta", "attributions" or "selection".
        revision: a branch, tag or commit (not also in `source`); default main.
        filename: the `.loki` file to fetch; needed when the repo holds several (deltas only).
        token, endpoint: for `huggingface_hub` (`HF_TOKEN` / the saved login, `HF_ENDPOINT`).
        cache_dir: the Hugging Face cache; default `HF_HUB_CACHE`.
        local_files_only: use the cache only.

    Returns:
        Path: the file (the snapshot folder for attributions), in the Hugging Face cache.

    Raises:
        HubArgumentError: `source` is not a repo id, two different revisions are given, an unknown `kind`,
            `filename` for another kind than a delta, or the Hub rejects the id.
        HubRepoNotFoundError, HubGatedRepoError, HubRevisionNotFoundError: no such repo (or no access), a gated
            repo, no such revision.
        HubFileNotFoundError, HubAmbiguousFileError: no such `filename` / nothing of that kind in the repo (the
            message says what it holds instead), or several `.loki` files and no `filename`.
        HubPermissionError, HubRateLimitError, HubServerError: the Hub answered 401/403, 429, or 5xx / another
            unexpected status.
        HubOfflineError: offline (or unreachable) and what is needed is not cached.
        HubIntegrityError: a download does not match the Hub's checksum; offline, a cached file does not match the
            checksum recorded when it was downloaded (the message says how to fix it); or a damaged cached file
            could not be downloaded again.
        HubCacheError: the cache cannot be written or read (disk full, permission, read-only, a path component
            that is a file); nothing partial is left.

    >>> download("medical.loki")
    Traceback (most recent call last):
    ...
    loki.errors.HubArgumentError: 'medical.loki' is not a Hub repo id; give 'namespace/name' or 'namespace/name@revision'.
    """
    _, _, paths = _fetch(source, kind, revision=revision, filename=filename, token=token, endpoint=endpoint,
                         cache_dir=cache_dir, local_files_only=local_files_only)
    return paths[0].parent if kind == "attributions" else paths[0]


def _fetch(
    source: str,
    kind: str,
    *,
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[str, str, list[Path]]:
    """`(repo_id, commit sha, cached paths)` of the files of `kind` in Hub repo `source`, all at one commit."""
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.hf_api import RepoFile

    repo_id, revision = _parse_source(source, revision)
    if kind not in KINDS:
        raise HubArgumentError(f"kind must be one of {tuple(KINDS)}, got {kind!r}.")
    if filename is not None and kind != "delta":
        raise HubArgumentError(f"filename= picks one of several .loki files; {KINDS[kind]} have fixed file names.")
    offline = ("local_files_only=True" if local_files_only
               else "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None)  # why no request may be made
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE  # read now: tests and users patch it
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(api, repo_id, revision, filename, offline=offline, cache=cache):
        commit = _resolve(api, repo_id, revision, cache, offline is not None)
        listed_now = False
        try:  # the listing snapshot_download cached for this commit (trees/<sha>.json): no request
            listing = {f.path: f for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache)}
        except CachedRepoTreeNotFoundError:  # (e.g. the file came from a plain hf_hub_download)
            listing = None
            if offline is None:
                listing = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit.resolved, recursive=True)
                           if isinstance(f, RepoFile)}
                listed_now = True
        names = _names(repo_id, revision, kind, None if listing is None else sorted(listing), filename, offline, cache)
        # Every file is checked before it is returned, a cached one too (bytes on disk can rot or be edited): against
        # the listing just fetched, else what huggingface_hub recorded when it downloaded it (_recorded_checksum).
        known = listing if listed_now else {}
        paths, fetch, unchecked = {}, {}, []  # fetch: name -> force (a damaged cached copy is downloaded again)
        for name in names:
            cached = try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=commit.resolved)
            if not isinstance(cached, str):
                if offline is not None:
                    raise _not_cached(repo_id, revision, cache, offline, name)
                fetch[name] = False
                continue
            paths[name] = path = Path(cached)
            expected = _checksum(known.get(name)) or _recorded_checksum(path, repo_id, commit.resolved, name, cache)
            if expected is None:  # (a cache without symlinks and without the listing: ask the Hub below)
                if offline is not None:
                    raise _damaged(repo_id, revision, name, path, offline, commit.resolved, None)
                unchecked.append(name)
            elif (actual := _digest(path, expected[0])) != expected[1]:
                if offline is not None:
                    raise _damaged(repo_id, revision, name, path, offline, commit.resolved, (actual, expected[1]))
                fetch[name] = True
        if fetch or unchecked:
            try:
                # The checksums: a listing just fetched has them; a cached one does not (get_cached_repo_tree
                # returns no LFS sha256), so ask for these files' in one request.
                entries = known or {e.path: e for e in api.get_paths_info(repo_id, [*fetch, *unchecked],
                                                                          revision=commit.resolved)}
                for name in unchecked:
                    expected = _checksum(entries.get(name))
                    if expected is not None and _digest(paths[name], expected[0]) != expected[1]:
                        fetch[name] = True
                for name, force in fetch.items():
                    if force and not paths[name].is_symlink():
                        # (a cache without symlinks holds a copy, which a forced download would leave in place)
                        paths[name].unlink()
                    path = Path(hf_hub_download(repo_id, name, revision=commit, cache_dir=cache, token=token,
                                                endpoint=endpoint, force_download=force))
                    _verify(path, entries.get(name), f"{repo_id}@{revision}/{name}", cache, commit.resolved)
                    paths[name] = path
            except Exception as e:
                if not any(fetch.values()) or isinstance(e, HubIntegrityError):
                    raise
                raise _repair_failed(e, api.endpoint, repo_id, revision, commit.resolved, fetch, cache) from None
            damaged = [name for name, force in fetch.items() if force]
            if damaged:
                warnings.warn(f"{repo_id}@{revision}: the cached {', '.join(damaged)} did not match its checksum "
                              f"(damaged on disk in {cache}); downloaded again and verified.", stacklevel=3)
    if listed_now:
        _record(repo_id, commit, names, listing, cache, token, endpoint)
    return repo_id, commit.resolved, [paths[name] for name in names]


def _names(repo_id: str, revision: str, kind: str, files: list[str] | None, filename: str | None,
           offline: str | None, cache: str) -> list[str]:
    """The files to fetch for `kind`, given the commit's file listing (None: not known, offline)."""
    if kind == "delta":
        if files is None:
            if filename is None:
                raise _not_cached(repo_id, revision, cache, offline, "its file listing; or pass filename=")
            return [filename]
        return [_pick(repo_id, revision, files, filename)]
    needed = list(ATTRIBUTION_FILES) if kind == "attributions" else [SELECTION_FILE]
    if files is None or all(name in files for name in needed):
        return needed
    held = _held(files)
    if held is not None:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds {KINDS[held]}, not {KINDS[kind]}: load it with "
            f"{LOADERS[held]}({_source(repo_id, revision)!r}).",
            repo_id=repo_id,
        )
    raise HubFileNotFoundError(
        f"{repo_id}@{revision} holds no {KINDS[kind]} (no {', '.join(n for n in needed if n not in files)}; files: "
        f"{files[:10]}). Push them there with loki.push.",
        repo_id=repo_id,
    )


def _held(files: list[str]) -> str | None:
    """The kind of loki repo these files make, or None."""
    if all(name in files for name in ATTRIBUTION_FILES):
        return "attributions"
    if SELECTION_FILE in files:
        return "selection"
    return "delta" if _loki_files(files) else None


def _source(repo_id: str, revision: str) -> str:
    return repo_id if revision == DEFAULT_BRANCH else f"{repo_id}@{revision}"


def _parse_source(source: str, revision: str | None) -> tuple[str, str]:
    parsed = parse_repo_id(source)
    if parsed is None:
        raise HubArgumentError(f"{source!r} is not a Hub repo id; give 'namespace/name' or 'namespace/name@revision'.")
    repo_id, at = parsed
    if at is not None and revision is not None and at != revision:
        raise HubArgumentError(f"Two revisions given: {source!r} and revision={revision!r}; give one.")
    return repo_id, revision or at or DEFAULT_BRANCH


def _resolve(api: Any, repo_id: str, revision: str, cache: str, offline: bool) -> Any:
    """`revision` -> a `huggingface_hub.ResolvedRevision` (`.resolved` is the commit sha). huggingface_hub reads
    and writes the cache's refs/, and falls back to them on transport errors and 5xx; on 429 loki does too."""
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    try:
        return api.resolve_revision(repo_id, revision=revision, cache_dir=cache, local_files_only=offline)
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 429:
            raise
        try:
            return api.resolve_revision(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        except RevisionResolutionError:
            raise e from None


def _record(repo_id: str, commit: Any, names: list[str], listing: dict, cache: str, token: Any,
            endpoint: str | None) -> None:
    """After a first pull at `commit`: cache its file listing (so that offline loads can pick the file) and fetch
    the marker (so that the Hub counts the download). snapshot_download is huggingface_hub's only public way to
    cache a listing; `names` are already there, so only the marker is downloaded. Never fails a load."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=commit, allow_patterns=names + ([MARKER] if MARKER in listing else []),
                          cache_dir=cache, token=token, endpoint=endpoint)
    except Exception:
        pass


def _not_cached(repo_id: str, revision: str, cache: str, offline: str, what: str) -> HubOfflineError:
    return HubOfflineError(
        f"{repo_id}@{revision} ({what}) is not in the Hugging Face cache ({cache}) and Hub access is off ({offline}). "
        f"Pull it once while online (loki pull {repo_id}@{revision}), or unset HF_HUB_OFFLINE.",
        repo_id=repo_id,
    )


def _pick(repo_id: str, revision: str, files: list[str], filename: str | None) -> str:
    if filename is not None:
        if filename not in files:
            raise HubFileNotFoundError(
                f"{repo_id}@{revision} has no file {filename!r}. Its .loki files: {_loki_files(files) or 'none'}.",
                repo_id=repo_id,
            )
        return filename
    deltas = _loki_files(files)
    held = _held(files)
    if not deltas and held is not None:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds no .loki file: it holds {KINDS[held]}. Load it with "
            f"{LOADERS[held]}({_source(repo_id, revision)!r}).",
            repo_id=repo_id,
        )
    if not deltas:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds no .loki file (files: {files[:10]}). Is it a loki delta repo? "
            "Pass filename= to load a delta stored under another name.",
            repo_id=repo_id,
        )
    if len(deltas) > 1:
        raise HubAmbiguousFileError(
            f"{repo_id}@{revision} holds {len(deltas)} .loki files: {deltas}. Say which one: "
            f"loki.load({repo_id!r}, filename={deltas[0]!r}).",
            repo_id=repo_id,
        )
    return deltas[0]


def _loki_files(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.endswith(".loki"))


_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _checksum(entry: Any) -> tuple[str, str] | None:
    """`(algorithm, hex digest)` of a file as the Hub lists it (a `RepoFile`, or a cached listing's entry):
    the sha256 of an LFS (or Xet) file, the git blob sha1 of a regular one; None when it lists neither."""
    if entry is None:
        return None
    sha256 = getattr(entry, "lfs_sha256", None) or getattr(getattr(entry, "lfs", None), "sha256", None)
    if sha256:
        return "sha256", sha256
    blob_id = getattr(entry, "blob_id", None)
    return ("git-sha1", blob_id) if blob_id else None


def _recorded_checksum(path: Path, repo_id: str, commit: str, name: str, cache: str) -> tuple[str, str] | None:
    """The checksum huggingface_hub recorded for a cached file when it downloaded it, with no request: the name of
    its blob (`snapshots/<commit>/<name>` links to `blobs/<etag>`, and the Hub's etag is the sha256 of an LFS file,
    the git blob sha1 of a regular one), else, in a cache without symlinks (Windows without developer mode), the
    commit's cached listing (`trees/<commit>.json`, written by snapshot_download: see `_record`). None if neither."""
    if path.is_symlink():
        etag = Path(os.readlink(path)).name
        if _HEX.fullmatch(etag):
            return ("sha256" if len(etag) == 64 else "git-sha1"), etag
    try:  # (huggingface_hub's reader of that listing is internal; the public get_cached_repo_tree drops the sha256)
        from huggingface_hub._tree_cache import read_tree_cache
        from huggingface_hub.file_download import repo_folder_name

        entries = read_tree_cache(os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model")), commit)
    except Exception:  # another huggingface_hub version: no recorded listing to read
        entries = None
    return _checksum((entries or {}).get(name))


def _digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file, read in chunks: "sha256", or "git-sha1" (git's blob id: sha1 of a `blob <size>\\0`
    header and the bytes; huggingface_hub's own `git_hash` reads the whole file at once)."""
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, entry: Any, what: str, cache: str, commit: str) -> None:
    """Compare a downloaded file with the sha256 (LFS) or git blob sha1 the Hub lists. Hand-written because
    hf_hub_download checks only the size and `HfApi.verify_repo_checksums` lists the repo again (one more request)
    to hash every cached file of the revision. On mismatch the revision (the delta, the marker) leaves the cache
    through huggingface_hub's `scan_cache_dir(...).delete_revisions(...)`, available since 1.26 like
    `resolve_revision` (`delete_files`, for one file, came with 2.0)."""
    from huggingface_hub import scan_cache_dir

    checksum = _checksum(entry)
    if checksum is None:
        return
    algorithm, expected = checksum
    actual = _digest(path, algorithm)
    if expected != actual:
        scan_cache_dir(cache).delete_revisions(commit).execute()
        raise HubIntegrityError(
            f"{what}: the downloaded bytes do not match the checksum the Hub lists ({actual[:12]} != {expected[:12]}); "
            "the revision was removed from the cache. Try again; if it persists the file on the Hub is damaged.",
            repo_id=what.split("@")[0],
        )


def _damaged(repo_id: str, revision: str, name: str, path: Path, offline: str, commit: str,
             digests: tuple[str, str] | None) -> HubIntegrityError:
    """Offline, a cached file that does not match its recorded checksum (or has none to check) is refused, and left
    where it is: loki downloads it again at the next load with Hub access."""
    blob = os.path.realpath(path)
    if digests is None:
        problem = "has no checksum recorded in the cache (no blob named by it, no cached file listing) to verify it"
    else:
        problem = (f"does not match the checksum recorded when it was downloaded ({digests[0][:12]} != "
                   f"{digests[1][:12]}): it was changed or damaged on disk")
    return HubIntegrityError(
        f"{repo_id}@{revision}/{name}: the cached copy {path}{f' (-> {blob})' if blob != str(path) else ''} {problem}. "
        f"Hub access is off ({offline}), so it cannot be downloaded again: load it again with Hub access (loki "
        f"downloads it again and verifies it), or delete the revision (hf cache rm {commit}) and load it once online.",
        repo_id=repo_id,
    )


def _repair_failed(e: BaseException, where: str, repo_id: str, revision: str, commit: str, fetch: dict[str, bool],
                   cache: str) -> HubError:
    """A damaged cached file could not be downloaded again: say both (huggingface_hub wraps a failed forced
    download in a ValueError whose cause is the real error)."""
    root = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
    error = root if isinstance(root, HubError) else _translate(root, where, repo_id, revision, None, False, None, cache)
    if isinstance(error, HubCacheError):
        return error
    # (a HubOfflineError's message would say the revision is not cached; it is, damaged)
    reason = error if error is not None and not isinstance(error, HubOfflineError) else f"{type(root).__name__}: {root}"
    damaged = ", ".join(name for name, force in fetch.items() if force)
    return HubIntegrityError(
        f"{repo_id}@{revision}: the cached {damaged} does not match its checksum (damaged on disk in {cache}), and "
        f"downloading it again failed ({reason}). Load it again once {where} answers, or delete the revision "
        f"(hf cache rm {commit}).",
        repo_id=repo_id,
    )


# -- errors -----------------------------------------------------------------------------------------
@contextmanager
def _hub_errors(api: Any, repo_id: str, revision: str | None, filename: str | None, *, pushing: bool = False,
                offline: str | None = None, cache: str | None = None) -> Iterator[None]:
    """Turn `huggingface_hub` and transport errors into `HubError` subclasses that say what to do (each also the
    huggingface_hub error of the same kind; the Hub's answer rides along as `.response`)."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        error = _translate(e, api.endpoint, repo_id, revision, filename, pushing, offline, cache)
        if error is None:
            raise
        raise error from None


def _translate(e: BaseException, where: str, repo_id: str, revision: str | None, filename: str | None,
               pushing: bool, offline: str | None, cache: str | None) -> HubError | None:
    try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    answer = {"response": getattr(e, "response", None), "server_message": getattr(e, "server_message", None),
              "repo_id": repo_id}
    if isinstance(e, (LocalEntryNotFoundError, RevisionResolutionError)) and isinstance(e.__cause__, HfHubHTTPError):
        # Nothing cached, and the Hub had answered with an error: that answer says what went wrong.
        return _translate(e.__cause__, where, repo_id, revision, filename, pushing, offline, cache)
    if isinstance(e, GatedRepoError):
        return HubGatedRepoError(
            f"{repo_id} is gated: accept its conditions on {where}/{repo_id}, then pass a token of that account.",
            **answer,
        )
    if isinstance(e, RepositoryNotFoundError):
        return HubRepoNotFoundError(
            f"Repo {repo_id} does not exist on {where}, or it is private and your token cannot see it. Check the id; "
            "for a private repo pass token= (or run `hf auth login`) with an account that can read it.",
            **answer,
        )
    if isinstance(e, RevisionNotFoundError):
        return HubRevisionNotFoundError(
            f"{repo_id} has no branch, tag or commit {revision!r}. "
            f"List them with huggingface_hub.HfApi().list_repo_refs({repo_id!r}).",
            **answer,
        )
    if isinstance(e, RemoteEntryNotFoundError):
        return HubFileNotFoundError(f"{repo_id}@{revision} has no file {filename!r}.", **answer)
    if isinstance(e, (LocalEntryNotFoundError, RevisionResolutionError, ConnectionError, httpx.TransportError)):
        # ConnectionError: OfflineModeIsEnabled, hf_xet
        if pushing:
            message = (f"Pushing to {repo_id} failed: the connection to {where} failed ({type(e).__name__}: {e}). "
                       "Check your connection, HF_ENDPOINT and HF_HUB_OFFLINE, then push again.")
        elif offline is not None:
            return _not_cached(repo_id, revision, cache, offline, "this revision")
        else:
            message = (f"Cannot reach {where} ({type(e.__cause__ or e).__name__}) and {repo_id}@{revision} is not in "
                       "the cache. Check your connection or HF_ENDPOINT; to work offline, pull the delta once while "
                       "online.")
        return HubOfflineError(message, repo_id=repo_id)
    if isinstance(e, HFValidationError):
        return HubArgumentError(f"{repo_id!r} or {revision!r} is not valid on the Hub: {e}", repo_id=repo_id)
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        server = (e.server_message or "").strip()
        detail = f" (the Hub says: {server})" if server else ""
        if status == 401:
            return HubPermissionError(
                f"The Hub rejected the token{detail}. Pass a valid token= or run `hf auth login`.", **answer
            )
        if status == 403:
            return HubPermissionError(
                f"Not allowed on {repo_id}{detail}. Use a token with write access to its namespace, or push to a "
                "repo of your own.",
                **answer,
            )
        if status == 429:
            return HubRateLimitError(
                f"The Hub is rate-limiting requests{detail}. {_retry_after(e)}Wait, then try again; logged-in "
                "requests (token=) get higher limits.",
                **answer,
            )
        if status == 412:
            return HubServerError(f"{repo_id}@{revision} changed while pushing{detail}; push again.", **answer)
        return HubServerError(
            f"The Hub answered {status} for {repo_id}{detail}. Try again later; if it persists, check {where}.",
            **answer,
        )
    if cache is not None and isinstance(e, OSError) and e.errno is not None and not isinstance(e, TimeoutError):
        # (after the Hub's and the connection's errors, which are OSErrors too): the disk said no
        return HubCacheError(
            f"Cannot write to (or read) the Hugging Face cache {cache} while pulling {repo_id}@{revision}: "
            f"{type(e).__name__}: {e}. Free disk space there or make it writable, or use another cache folder "
            "(set HF_HOME or HF_HUB_CACHE, or pass cache_dir=); nothing partial was left in the cache.",
            repo_id=repo_id,
        )
    return None


def _retry_after(e: Any) -> str:
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(e.response.headers) if e.response is not None else None
    return f"Retry after {info.reset_in_seconds} s. " if info is not None and info.remaining == 0 else ""
