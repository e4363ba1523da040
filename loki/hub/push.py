"""Pushing to the Hub: a delta (`push_delta`), an attribution set (`push_attributions`) or a selection
(`push_selection`), each in one commit with its model card and the `config.json` marker. A repo holds one kind.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attribution import FILES as ATTRIBUTION_FILES
from ..attribution import FORMAT as ATTRIBUTION_FORMAT
from ..attribution import Attributions
from ..errors import HubArgumentError, ScopeError
from ..format import check, save
from ..scoping import Scope
from ..selection import Selection
from .cards import attributions_card, card_evaluation, model_card, selection_card
from .errors import hub_errors
from .repo import DEFAULT_BRANCH, KINDS, MARKER, SELECTION_FILE, check_repo_id, held_kind, scope_name

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

    from ..delta import Delta


def push_delta(
    delta: Delta,
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
    scope: Scope | None = None,
) -> CommitInfo:
    """Upload `delta` to the Hub repo `repo_id` (created if needed) with a generated model card.

    One commit adds `filename` (default `<repo name>.loki`), `README.md` (`model_card`) and the marker
    `config.json` on branch `revision` (default main; a new branch starts from main). With `scope`, the same commit
    adds the scope beside the delta as `<stem>.scope` (`Scope.save`; `loki.load_scope` pulls it) and the card says
    how to serve the delta through it; without one, a `<stem>.scope` left by an earlier push of this filename is
    deleted in the same commit (it was made for the delta this push replaces).

    Args:
        delta: the `Delta`.
        repo_id: `"namespace/name"` (no `@revision`).
        private: for a repo created by this call.
        revision: the branch to commit to.
        commit_message: default "Upload <filename> (<n> rows) with loki".
        token, endpoint: for `huggingface_hub.HfApi` (`HF_TOKEN` / the saved login, `HF_ENDPOINT`).
        filename: the file's name in the repo, ending in `.loki`.
        license, tags: model card metadata.
        scope: the delta's `Scope` (`loki.scope`), made on its base model.

    Returns:
        huggingface_hub.CommitInfo: `.oid` is the commit sha, `.commit_url` its page.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name`, or `filename` does not end in `.loki` (no request made).
        DeltaFormatError: `delta.info["extra"]["evaluation"]` is malformed (no request made).
        ScopeError: `scope` is not a `Scope`, or was made on a model of other shapes than the delta's base (its
            layer count or down-projection input size; no request made).
        HubPermissionError: the token is invalid or may not write there (`HubGatedRepoError` for a gated repo).
        HubRateLimitError, HubServerError: the Hub answered 429, or 5xx / another unexpected status.
        HubOfflineError: the Hub cannot be reached, or `HF_HUB_OFFLINE=1`.
        HubRepoNotFoundError, HubRevisionNotFoundError: as the Hub answers them.

    >>> # loki.push(loki.load("tiny.loki"), "me/tiny-implant", private=True, license="apache-2.0")
    >>> # loki.push(delta, "me/tiny-implant", scope=loki.scope(model, tokenizer, examples, retain))
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_repo_id(repo_id)
    filename = filename or f"{repo_id.split('/')[1]}.loki"
    if not filename.endswith(".loki"):
        raise HubArgumentError(f"filename {filename!r} must end in '.loki' so that loki.load finds it in the repo.")
    card_evaluation(delta.info)  # a card that cannot be written fails before anything is created
    check(delta)  # so does a delta the reader would refuse (the same checks save runs)
    if scope is not None:
        _check_scope(scope, delta)

    def operations(files: list[str]) -> list:
        others = [f for f in files if f.endswith(".loki") and f != filename]
        path = save(delta, Path(tmp) / Path(filename).name)
        beside = scope_name(filename)
        card = model_card(
            delta,
            repo_id,
            filename=filename,
            size=path.stat().st_size,
            license=license,
            tags=tags,
            several_files=bool(others),
            scope=scope,
        )
        marker = {
            "library_name": "loki",
            "format": "loki",
            "format_version": 1,
            "base_model": delta.base_model,
            "delta": filename,
            **({"scope": beside} if scope is not None else {}),
        }
        if scope is not None:
            extra = [CommitOperationAdd(beside, scope.save(Path(tmp) / Path(beside).name))]
        else:  # a scope pushed with an earlier delta of this name does not gate this one
            extra = [CommitOperationDelete(beside)] if beside in files else []
        return [CommitOperationAdd(filename, path), *extra, *_card_and_marker(card, marker)]

    with tempfile.TemporaryDirectory(prefix="loki-push-") as tmp:
        return _upload(
            repo_id,
            "delta",
            operations,
            f"Upload {filename} ({delta.num_rows} rows) with loki",
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            endpoint=endpoint,
            filename=filename,
        )


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
) -> CommitInfo:
    """Upload an attribution set to the Hub repo `repo_id` (created if needed) with a generated model card, so
    that later implants on the same base model select rows without attributing again.

    One commit adds the attribution folder's files as `attributions.save` writes them (`meta.json`,
    `attributions.npy` float32 `[N, L, d_model]`, `targets.npy`, `seconds.npy`: all of it, since `select` counts
    each prompt's picks and only breaks ties by the mean), `README.md` (`attributions_card`) and the marker
    `config.json`. A set read from a folder is uploaded from it; one in memory is written to a temporary folder.

    Args:
        attributions: the `Attributions` (from `loki.attribute`, `Attributions.load` or `loki.load_attributions`).
        repo_id: `"namespace/name"` (no `@revision`).
        private, revision, commit_message, token, endpoint, license, tags: as `push_delta`.

    Returns:
        huggingface_hub.CommitInfo.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name` (no request made), or the repo holds a delta or a
            selection (one kind per repo: the card describes it).
        HubError: as `push_delta` (`HubPermissionError`, `HubOfflineError`, ...).

    >>> # loki.push(loki.attribute(model, tokenizer, "probe"), "me/smollm2-kva", license="apache-2.0")
    """
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    card = attributions_card(attributions, repo_id, license=license, tags=tags)
    marker = {
        "library_name": "loki",
        "format": ATTRIBUTION_FORMAT,
        "format_version": 1,
        "base_model": attributions.meta.get("model"),
        "files": list(ATTRIBUTION_FILES),
    }
    n, num_layers, d = attributions.shape
    with tempfile.TemporaryDirectory(prefix="loki-push-") as tmp:
        folder = attributions.saved_at() or attributions.save(tmp)
        operations = [CommitOperationAdd(name, str(folder / name)) for name in ATTRIBUTION_FILES]
        operations += _card_and_marker(card, marker)
        return _upload(
            repo_id,
            "attributions",
            lambda files: operations,
            f"Upload attributions ({n} prompts x {num_layers} layers x {d}) with loki",
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            endpoint=endpoint,
        )


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
) -> CommitInfo:
    """Upload a selection to the Hub repo `repo_id` (created if needed): `selection.json` (`Selection.save`'s
    format), `README.md` (`selection_card`) and the marker `config.json`, in one commit.

    Args:
        selection: the `Selection`.
        repo_id: `"namespace/name"` (no `@revision`).
        private, revision, commit_message, token, endpoint, license, tags: as `push_delta`.

    Returns:
        huggingface_hub.CommitInfo.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name` (no request made), or the repo holds a delta or
            attributions (one kind per repo).
        HubError: as `push_delta`.

    >>> # loki.push(loki.select(loki.load_attributions("me/smollm2-kva"), q=10), "me/smollm2-q10")
    """
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    card = selection_card(selection, repo_id, license=license, tags=tags)
    marker = {
        "library_name": "loki",
        "format": "loki-selection",
        "format_version": 1,
        "base_model": selection.extra.get("model"),
        "selection": SELECTION_FILE,
    }
    operations = [
        CommitOperationAdd(SELECTION_FILE, (json.dumps(selection.to_json()) + "\n").encode()),
        *_card_and_marker(card, marker),
    ]
    return _upload(
        repo_id,
        "selection",
        lambda files: operations,
        f"Upload a selection ({selection.strategy}, q={selection.q}: {selection.num_rows} rows) with loki",
        private=private,
        revision=revision,
        commit_message=commit_message,
        token=token,
        endpoint=endpoint,
    )


def _check_scope(scope: Any, delta: Delta) -> None:
    """Raise `ScopeError` unless `scope` is a `Scope` of the delta's base model's shapes."""
    if not isinstance(scope, Scope):
        raise ScopeError(f"scope= takes a loki.Scope (loki.scope, loki.load_scope), not {type(scope).__name__}.")
    proj = delta.info["down_projection"]
    if (scope.num_layers, scope.d_in) != (proj["num_layers"], proj["d_in"]):
        raise ScopeError(
            f"The scope was made on a model with {scope.num_layers} layers of d_in {scope.d_in}; the delta's base has "
            f"{proj['num_layers']} of {proj['d_in']}. Push the scope made on the delta's base model."
        )


def _card_and_marker(card: ModelCard, marker: dict[str, Any]) -> list:
    from huggingface_hub import CommitOperationAdd

    return [
        CommitOperationAdd("README.md", str(card).encode()),
        CommitOperationAdd(MARKER, (json.dumps(marker, indent=2) + "\n").encode()),
    ]


def _upload(
    repo_id: str,
    kind: str,
    operations,
    message: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str | None,
    token: str | None,
    endpoint: str | None,
    filename: str | None = None,
):
    """One commit of `operations(files now on the branch)` on branch `revision` (default main) of `repo_id`,
    created if needed. A repo that holds another kind is refused: its model card would be replaced."""
    from huggingface_hub import HfApi

    branch = revision or DEFAULT_BRANCH
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(api, repo_id, branch, filename, pushing=True):
        if not api.repo_exists(repo_id):  # (create_repo(exist_ok=True) on a repo one may not write fails oddly)
            api.create_repo(repo_id, private=private, exist_ok=True)
        new_branch = branch != DEFAULT_BRANCH and branch not in {b.name for b in api.list_repo_refs(repo_id).branches}
        # a new branch starts from main: check main's files, and create the branch only once the push is accepted
        files = api.list_repo_files(repo_id, revision=DEFAULT_BRANCH if new_branch else branch)
        held = held_kind(files)
        if held not in (None, kind):
            raise HubArgumentError(
                f"{repo_id}@{branch} holds {KINDS[held]}; a repo holds one kind, which its model card describes. "
                f"Push {KINDS[kind]} to a repo of its own (e.g. {repo_id}-{kind}).",
                repo_id=repo_id,
            )
        if new_branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.create_commit(repo_id, operations(files), revision=branch, commit_message=commit_message or message)
