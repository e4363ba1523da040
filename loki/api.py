"""The verbs that take a delta by name: `load`, `save`, `push`, and `apply` / `implanted` with a path or Hub id.

Everything else in loki takes `Delta` objects; paths and Hub ids are resolved here only.

>>> import loki
>>> # delta = loki.load("medical.loki")            # a local file
>>> # delta = loki.load("org/medical-implant@v1")   # a Hub repo, at a branch, tag or commit
>>> # with loki.implanted(model, "medical.loki", "org/legal-implant"): ...
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

from torch import nn

from . import apply as engine
from .delta import Delta
from .errors import DeltaFormatError, LedgerError
from .format import read, save

__all__ = ["apply", "implanted", "load", "push", "save"]

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
        from .errors import HubRepoNotFoundError
        from .hub import load_from_hub, parse_repo_id

        if parse_repo_id(str(source)) is not None:
            try:
                return load_from_hub(str(source), revision=revision, filename=filename, token=token,
                                     endpoint=endpoint, cache_dir=cache_dir)
            except HubRepoNotFoundError as e:
                e.append_to_message(f" (There is no local file {str(source)!r} either.)")
                raise
    return read(path)


def _resolve(delta: DeltaLike) -> Delta:
    if isinstance(delta, Delta):
        return delta
    if not isinstance(delta, (str, os.PathLike)):
        raise LedgerError(f"Give a loki.Delta, a .loki path or a Hub repo id, not {type(delta).__name__}.")
    return load(delta)


def apply(model: nn.Module, delta: DeltaLike, *, on_overlap: str = "error", check_base: bool = True,
          template: str | None = None) -> engine.Handle:
    """`loki.apply.apply` for a `Delta`, a `.loki` path or a Hub id: write the delta's rows into `model` in place and
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
    return engine.apply(model, _resolve(delta), on_overlap=on_overlap, check_base=check_base, template=template)


def implanted(model: nn.Module, *deltas: DeltaLike, on_overlap: str = "error"):
    """A `with` block with `deltas` applied in order, reverted at its end (also on error): `loki.apply.implanted`
    for `Delta`s, paths and Hub ids.

    Args:
        model: the model.
        *deltas: `Delta`s, paths or Hub ids; paths and ids are read when `implanted(...)` is called, before the block.
        on_overlap: as `loki.plan`, for each delta.

    Returns:
        A context manager whose `with ... as handles` gives the list of `Handle`s.

    Raises:
        LokiError: on the call, what `load` raises; on entering and leaving the block, what `loki.apply.implanted`
            raises.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> with loki.implanted(model, loki.testing.random_delta(model, name="a")) as handles:
    ...     handles
    [Handle('a', rows=6, applied=True)]
    >>> # with loki.implanted(model, "medical.loki", "org/legal-implant"): model.generate(...)
    """
    return engine.implanted(model, *[_resolve(d) for d in deltas], on_overlap=on_overlap)


def push(delta: Delta, repo_id: str, **options: Any) -> Any:
    """Upload `delta` and a generated model card to a Hugging Face Hub repo (created if needed): `loki.hub.push_to_hub`.

    Args:
        delta: a `Delta` (read a file with `load` first).
        repo_id: `"namespace/name"`.
        **options: `private=`, `revision=`, `commit_message=`, `token=`, `endpoint=`, `filename=`, `license=`,
            `tags=` (`loki.hub.push_to_hub`).

    Returns:
        huggingface_hub.CommitInfo: `.oid` is the commit sha, `.commit_url` its page.

    Raises:
        HubArgumentError: `repo_id` is not `namespace/name`, or `filename` does not end in `.loki`.
        DeltaFormatError: `delta.info["extra"]["evaluation"]` is malformed (checked before any request).
        HubError: a subclass for each Hub failure (`HubPermissionError`, `HubOfflineError`, ...).

    >>> # loki.push(delta, "me/medical-implant", private=True, license="apache-2.0")
    """
    from .hub import push_to_hub

    if not isinstance(delta, Delta):
        raise LedgerError(f"loki.push uploads a loki.Delta (loki.load reads files), not {type(delta).__name__}.")
    return push_to_hub(delta, repo_id, **options)
