"""The verbs that take things by path or Hub id: `load`, `save`, `push`, `apply` / `implanted` and
`load_attributions` / `load_selection` / `load_scope`.

Everything else in loki takes `Delta`, `Attributions`, `Selection` and `Scope` objects; paths and Hub ids are
resolved here only.

>>> import loki
>>> # delta = loki.load("medical.loki")            # a local file
>>> # delta = loki.load("org/medical-implant@v1")   # a Hub repo, at a branch, tag or commit
>>> # with loki.implanted(model, "medical.loki", "org/legal-implant"): ...
>>> # selection = loki.select(loki.load_attributions("org/smollm2-kva"), q=10)   # attribute once, share the result
>>> # with loki.scoped(model, loki.load("org/medical"), loki.load_scope("org/medical")): ...   # a delta and its scope
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from . import ledger
from .attribution import Attributions
from .delta import Delta
from .errors import AttributionError, DeltaFormatError, LedgerError, ScopeError
from .format import read, save
from .scoping import Scope
from .selection import Selection

__all__ = ["apply", "implanted", "load", "load_attributions", "load_scope", "load_selection", "push", "save"]

DeltaLike = Delta | str | os.PathLike


def load(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Delta:
    """Read a `.loki` delta from a local file, or from a Hugging Face Hub repo (`"org/name"`, `"org/name@rev"`).

    A path that exists is a file (or a folder holding `filename`). Otherwise a source shaped like `org/name[@rev]`
    is a Hub repo: its only `.loki` file (or `filename`) at `revision` (branch, tag or commit; default main) is
    fetched through the Hugging Face cache (offline with `HF_HUB_OFFLINE=1` once cached; `loki.hub.download`).
    The delta is validated in full before it is returned (formats/SPEC.md §7 steps 1-4).

    Args:
        source: a path, or a Hub repo id with an optional `@revision`.
        revision: the Hub revision (not also in `source`); ignored for a local path.
        filename: the file inside a local folder or Hub repo.
        token, endpoint, cache_dir: for the Hub client (`HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_CACHE` by default).

    Returns:
        Delta.

    Raises:
        DeltaFormatError: no such file (and `source` is not shaped like a repo id), a folder without `filename`,
            or a file that is not a valid delta; `UnsupportedVersionError` and `InvalidIndicesError` are its
            subclasses for a newer format version and bad row indices.
        HubError: a subclass for each Hub failure (`HubRepoNotFoundError`, `HubFileNotFoundError`,
            `HubOfflineError`, ...; `loki.hub.download`).

    >>> import loki, loki.testing, os, tempfile
    >>> path = loki.save(loki.testing.random_delta(loki.testing.tiny_model("llama"), name="x"),
    ...                  os.path.join(tempfile.mkdtemp(), "x.loki"))
    >>> loki.load(path).name
    'x'
    >>> loki.load("missing.loki")
    Traceback (most recent call last):
    ...
    loki.errors.DeltaFormatError: No such file: missing.loki. Give the path of a .loki file (or a Hub repo id).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise DeltaFormatError(f"loki.load takes a .loki path or a Hub repo id, not {type(source).__name__}.")
    path = Path(source)
    if path.is_dir() and filename is not None:
        path = path / filename
    if not path.exists():
        from .hub import parse_repo_id, pull_delta

        if parse_repo_id(str(source)) is not None:
            return _from_hub(
                pull_delta,
                source,
                "file",
                revision=revision,
                filename=filename,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
            )
    return read(path)


def _resolve(delta: DeltaLike) -> Delta:
    if isinstance(delta, Delta):
        return delta
    if not isinstance(delta, (str, os.PathLike)):
        raise LedgerError(f"Give a loki.Delta, a .loki path or a Hub repo id, not {type(delta).__name__}.")
    return load(delta)


def apply(
    model: nn.Module,
    delta: DeltaLike,
    *,
    on_overlap: str = "error",
    check_base: bool = True,
    template: str | None = None,
) -> ledger.Handle:
    """`loki.ledger.apply` for a `Delta`, a `.loki` path or a Hub id: write the delta's rows into `model` in place and
    return the `Handle` that reverts them.

    Args:
        model: a transformers causal LM (or a wrapper of one).
        delta: a `Delta`, or a path or Hub id that `load` reads (with its default arguments).
        on_overlap, check_base, template: as `loki.plan`.

    Returns:
        Handle.

    Raises:
        LokiError: what `load` raises for a path or Hub id, then what `loki.plan` raises (`LedgerError`,
            `IncompatibleModelError`, `UnknownArchitectureError`, `DtypeError`, `OverlapError`,
            `BaseModelMismatchError`). Nothing is written when one is raised.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> handle = loki.apply(model, loki.testing.random_delta(model, seed=1))
    >>> loki.revert(model, handle)
    """
    return ledger.apply(model, _resolve(delta), on_overlap=on_overlap, check_base=check_base, template=template)


def implanted(model: nn.Module, *deltas: DeltaLike, on_overlap: str = "error"):
    """A `with` block with `deltas` applied in order, reverted at its end (also on error): `loki.ledger.implanted`
    for `Delta`s, paths and Hub ids.

    Args:
        model: the model.
        *deltas: `Delta`s, paths or Hub ids; paths and ids are read when `implanted(...)` is called, before the block.
        on_overlap: as `loki.plan`, for each delta.

    Returns:
        A context manager whose `with ... as handles` gives the list of `Handle`s.

    Raises:
        LokiError: on the call, what `load` raises; on entering and leaving the block, what `loki.ledger.implanted`
            raises.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> with loki.implanted(model, loki.testing.random_delta(model, name="a")) as handles:
    ...     handles
    [Handle('a', rows=6, applied=True)]
    >>> # with loki.implanted(model, "medical.loki", "org/legal-implant"): model.generate(...)
    """
    return ledger.implanted(model, *[_resolve(d) for d in deltas], on_overlap=on_overlap)


def push(obj: Delta | Attributions | Selection, repo_id: str, **options: Any) -> Any:
    """Upload a delta, an attribution set or a selection, with a generated model card, to a Hugging Face Hub repo
    (created if needed): `loki.hub.push_delta`, `push_attributions` or `push_selection`. A repo holds one kind.

    Args:
        obj: a `Delta` (read a file with `load` first), `Attributions` (`load_attributions` reads a folder) or
            `Selection` (`load_selection` reads a file).
        repo_id: `"namespace/name"`.
        **options: `private=`, `revision=`, `commit_message=`, `token=`, `endpoint=`, `license=`, `tags=`; for a
            delta also `filename=` and `scope=` (its `Scope`, pushed beside it).

    Returns:
        huggingface_hub.CommitInfo: `.oid` is the commit sha, `.commit_url` its page.

    Raises:
        LedgerError: `obj` is none of the three kinds (a `Scope` goes with its delta: `scope=`).
        HubArgumentError: `repo_id` is not `namespace/name`, `filename` does not end in `.loki` (or is given for
            another kind, as is `scope`), or the repo holds another kind.
        ScopeError: a `scope` that is not a `Scope` of the delta's base model's shapes.
        DeltaFormatError: `delta.info["extra"]["evaluation"]` is malformed (checked before any request).
        HubError: a subclass for each Hub failure (`HubPermissionError`, `HubOfflineError`, ...).

    >>> # loki.push(delta, "me/medical-implant", private=True, license="apache-2.0")
    >>> # loki.push(loki.load_attributions("kva-run"), "me/smollm2-kva")
    >>> # loki.push(delta, "me/medical-implant", scope=scope)           # the delta and its scope, one commit
    """
    from .errors import HubArgumentError
    from .hub import push_attributions, push_delta, push_selection

    if isinstance(obj, Delta):
        return push_delta(obj, repo_id, **options)
    if isinstance(obj, Scope):
        raise LedgerError("A scope is pushed with the delta it gates: loki.push(delta, repo_id, scope=scope).")
    if not isinstance(obj, (Attributions, Selection)):
        raise LedgerError(
            f"loki.push uploads a loki.Delta, Attributions or Selection (loki.load, load_attributions "
            f"and load_selection read files), not {type(obj).__name__}."
        )
    if options.pop("filename", None) is not None:
        raise HubArgumentError("filename= names a delta's .loki file; attributions and selections have fixed names.")
    if options.pop("scope", None) is not None:
        raise HubArgumentError("scope= goes beside a delta; attributions and selections have none.")
    return (push_attributions if isinstance(obj, Attributions) else push_selection)(obj, repo_id, **options)


def load_attributions(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Attributions:
    """Read an attribution set from a local folder (`loki.attribute(..., path=)`, `Attributions.save`) or from a
    Hugging Face Hub repo (`"org/name"`, `"org/name@rev"`, pushed with `loki.push`).

    A path that exists is a folder. Otherwise a source shaped like `org/name[@rev]` is a Hub repo, fetched through
    the Hugging Face cache like a delta (verified, offline with `HF_HUB_OFFLINE=1` once cached;
    `loki.hub.pull_attributions`); its `origin` is then `"org/name@<commit sha>"`.

    Args:
        source: a folder, or a Hub repo id with an optional `@revision`.
        revision: the Hub revision (not also in `source`); ignored for a local folder.
        token, endpoint, cache_dir: for the Hub client (`HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_CACHE` by default).

    Returns:
        Attributions: values float32 `[N prompts, L layers, d_model]`, memory-mapped.

    Raises:
        AttributionError: no such folder (and `source` is not shaped like a repo id), or not a finished attribution
            set (`Attributions.load`).
        HubError: a subclass for each Hub failure; `HubFileNotFoundError` for a repo that holds a delta or a
            selection instead (its message says which function loads it).

    >>> import loki, loki.testing, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = loki.attribute(loki.testing.tiny_model("llama"), None, [[5, 6]], steps=2, path=folder, progress=False)
    >>> loki.load_attributions(folder).shape
    (1, 2, 32)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise AttributionError(f"load_attributions takes a folder or a Hub repo id, not {type(source).__name__}.")
    if not Path(source).exists():
        from .hub import parse_repo_id, pull_attributions

        if parse_repo_id(str(source)) is None:
            raise AttributionError(
                f"No such folder: {source}. Give an attribution folder (loki attribute --out) or "
                "a Hub repo id (org/name[@revision])."
            )
        return _from_hub(
            pull_attributions, source, "folder", revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir
        )
    return Attributions.load(source)


def load_selection(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Selection:
    """Read a selection from a local JSON file (`Selection.save`, `loki select --out`) or from a Hugging Face Hub
    repo (`"org/name[@rev]"`, pushed with `loki.push`), fetched through the Hugging Face cache and verified.

    Args:
        source: a `.json` file, or a Hub repo id with an optional `@revision`.
        revision, token, endpoint, cache_dir: as `load_attributions`.

    Returns:
        Selection.

    Raises:
        SelectionError: no such file (and `source` is not shaped like a repo id), or not a selection
            (`Selection.load`; `InvalidIndicesError` for bad rows).
        HubError: a subclass for each Hub failure; `HubFileNotFoundError` for a repo that holds another kind.

    >>> import loki, os, tempfile
    >>> path = loki.Selection.random(2, 32, q=10).save(os.path.join(tempfile.mkdtemp(), "q10.json"))
    >>> loki.load_selection(path).rows_per_layer()
    {0: 3, 1: 3}
    """
    from .errors import SelectionError

    if not isinstance(source, (str, os.PathLike)):
        raise SelectionError(f"load_selection takes a .json file or a Hub repo id, not {type(source).__name__}.")
    if not Path(source).exists():
        from .hub import parse_repo_id, pull_selection

        if parse_repo_id(str(source)) is not None and not str(source).endswith(".json"):
            return _from_hub(
                pull_selection, source, "file", revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir
            )
    return Selection.load(source)


def load_scope(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Scope:
    """Read a delta's scope from a local `.scope` file (`Scope.save`, `loki scope --out`) or from the Hub repo of
    the delta (`"org/name[@rev]"`, pushed with `loki.push(delta, repo, scope=scope)`), fetched through the Hugging
    Face cache and verified like the delta.

    Args:
        source: a `.scope` file (or a folder holding `filename`), or a Hub repo id with an optional `@revision`.
        revision, token, endpoint, cache_dir: as `load`.
        filename: the file in a local folder; in a Hub repo, the delta (`"a.loki"`) or scope (`"a.scope"`) whose
            scope to fetch, needed when the repo holds several deltas.

    Returns:
        Scope.

    Raises:
        ScopeError: no such file (and `source` is not shaped like a repo id), or not a valid scope (`Scope.load`).
        HubError: a subclass for each Hub failure; `HubFileNotFoundError` for a delta pushed without a scope.

    >>> import loki, loki.testing, os, tempfile
    >>> model = loki.testing.tiny_model("llama")
    >>> made = loki.scope(model, None, [{"text": [40, 41, 42]}], [{"text": [5, 6, 7]}], progress=False)
    >>> loki.load_scope(made.save(os.path.join(tempfile.mkdtemp(), "x.scope"))).layer == made.layer
    True
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ScopeError(f"load_scope takes a .scope file or a Hub repo id, not {type(source).__name__}.")
    path = Path(source)
    if path.is_dir() and filename is not None:
        path = path / filename
    if not path.exists():
        from .hub import parse_repo_id, pull_scope

        if parse_repo_id(str(source)) is None or str(source).endswith(".scope"):
            raise ScopeError(f"No such file: {source}. Give a .scope file (loki scope --out) or a Hub repo id.")
        return _from_hub(
            pull_scope,
            source,
            "file",
            revision=revision,
            filename=filename,
            token=token,
            endpoint=endpoint,
            cache_dir=cache_dir,
        )
    return Scope.load(path)


def _from_hub(loader, source, what: str, **kwargs):
    from .errors import HubRepoNotFoundError

    try:
        return loader(str(source), **kwargs)
    except HubRepoNotFoundError as e:
        e.append_to_message(f" (There is no local {what} {str(source)!r} either.)")
        raise
