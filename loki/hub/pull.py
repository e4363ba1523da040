"""Pulling from the Hub by repo id and revision (`pull_delta`, `pull_attributions`, `pull_selection`, `pull_scope`,
and `download` under them) through huggingface_hub's own cache, every file returned verified against its checksum.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attribution import FILES as ATTRIBUTION_FILES
from ..attribution import Attributions
from ..errors import (
    HubAmbiguousFileError,
    HubArgumentError,
    HubCacheError,
    HubError,
    HubFileNotFoundError,
    HubIntegrityError,
    HubOfflineError,
)
from ..format import read
from ..scoping import Scope
from ..selection import Selection
from .errors import hub_errors, not_cached, translate
from .repo import (
    DEFAULT_BRANCH,
    KINDS,
    LOADERS,
    MARKER,
    SELECTION_FILE,
    delta_name,
    held_kind,
    loki_files,
    parse_repo_id,
    scope_name,
    source_name,
)

if TYPE_CHECKING:
    from ..delta import Delta


def pull_delta(source: str, **kwargs) -> Delta:
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


def pull_attributions(source: str, **kwargs) -> Attributions:
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

    >>> # attributions = pull_attributions("me/smollm2-kva@v1")   # attributions.origin: "me/smollm2-kva@<sha>"
    """
    repo_id, commit, paths = _fetch(source, "attributions", **kwargs)
    attributions = Attributions.load(paths[0].parent)
    attributions.origin = f"{repo_id}@{commit}"
    return attributions


def pull_selection(source: str, **kwargs) -> Selection:
    """The selection of Hub repo `source` (`loki.load_selection` calls this for Hub ids).

    Args:
        source: `"org/name[@revision]"`.
        **kwargs: `download`'s keyword arguments (except `kind` and `filename`).

    Returns:
        Selection.

    Raises:
        HubError: as `download`; `HubFileNotFoundError` when the repo holds no selection.
        SelectionError, InvalidIndicesError: `selection.json` is not a valid selection.

    >>> # selection = pull_selection("me/smollm2-q10")
    """
    return Selection.load(_fetch(source, "selection", **kwargs)[2][0])


def pull_scope(source: str, **kwargs) -> Scope:
    """The scope pushed beside a delta (`loki.push(delta, repo, scope=scope)`): `<stem>.scope` next to the repo's
    `<stem>.loki` (`loki.load_scope` calls this for Hub ids).

    Args:
        source: `"org/name[@revision]"`.
        **kwargs: `download`'s keyword arguments (except `kind`); `filename=` names the delta (`"a.loki"`) or its
            scope (`"a.scope"`), needed when the repo holds several deltas.

    Returns:
        Scope.

    Raises:
        HubError: as `download`; `HubFileNotFoundError` when the delta was pushed without a scope (or the repo holds
            no delta), `HubAmbiguousFileError` for several deltas and no `filename`.
        ScopeError: the file is not a valid scope.

    >>> # scope = pull_scope("me/medical-implant@v1"); delta = loki.load("me/medical-implant@v1")
    """
    return Scope.load(download(source, kind="scope", **kwargs))


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
    file (`kind="delta"`), its attribution folder (`kind="attributions"`), its `selection.json`
    (`kind="selection"`) or the `.scope` file beside its delta (`kind="scope"`).

    A delta is the repo's only `.loki` file unless `filename` names one; its scope is the `.scope` file of the same
    name (`filename` may name either). Everything goes through huggingface_hub's
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
        kind: "delta", "attributions", "selection" or "scope".
        revision: a branch, tag or commit (not also in `source`); default main.
        filename: the `.loki` file to fetch (or, for `kind="scope"`, whose scope to fetch); needed when the repo
            holds several (deltas and scopes only).
        token, endpoint: for `huggingface_hub` (`HF_TOKEN` / the saved login, `HF_ENDPOINT`).
        cache_dir: the Hugging Face cache; default `HF_HUB_CACHE`.
        local_files_only: use the cache only.

    Returns:
        Path: the file (the snapshot folder for attributions), in the Hugging Face cache.

    Raises:
        HubArgumentError: `source` is not a repo id, two different revisions are given, an unknown `kind`,
            `filename` for another kind than a delta or scope, or the Hub rejects the id.
        HubRepoNotFoundError, HubGatedRepoError, HubRevisionNotFoundError: no such repo (or no access), a gated
            repo, no such revision.
        HubFileNotFoundError, HubAmbiguousFileError: no such `filename` / nothing of that kind in the repo (the
            message says what it holds instead; a delta pushed without a scope), or several `.loki` files and no
            `filename`.
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
    loki.errors.HubArgumentError: 'medical.loki' is not a Hub repo id; give 'namespace/name' or ...
    """
    _, _, paths = _fetch(
        source,
        kind,
        revision=revision,
        filename=filename,
        token=token,
        endpoint=endpoint,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
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
    if filename is not None and kind not in ("delta", "scope"):
        raise HubArgumentError(f"filename= picks one of several .loki files; {KINDS[kind]} have fixed file names.")
    offline = (
        "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None
    )  # why no request may be made
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE  # read now: tests and users patch it
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(api, repo_id, revision, filename, offline=offline, cache=cache):
        commit = _resolve(api, repo_id, revision, cache, offline is not None)
        listed_now = False
        try:  # the listing snapshot_download cached for this commit (trees/<sha>.json): no request
            listing = {f.path: f for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache)}
        except CachedRepoTreeNotFoundError:  # (e.g. the file came from a plain hf_hub_download)
            listing = None
            if offline is None:
                listing = {
                    f.path: f
                    for f in api.list_repo_tree(repo_id, revision=commit.resolved, recursive=True)
                    if isinstance(f, RepoFile)
                }
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
                    raise not_cached(repo_id, revision, cache, offline, name)
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
                entries = known or {
                    e.path: e for e in api.get_paths_info(repo_id, [*fetch, *unchecked], revision=commit.resolved)
                }
                for name in unchecked:
                    expected = _checksum(entries.get(name))
                    if expected is not None and _digest(paths[name], expected[0]) != expected[1]:
                        fetch[name] = True
                for name, force in fetch.items():
                    if force and not paths[name].is_symlink():
                        # (a cache without symlinks holds a copy, which a forced download would leave in place)
                        paths[name].unlink()
                    path = Path(
                        hf_hub_download(
                            repo_id,
                            name,
                            revision=commit,
                            cache_dir=cache,
                            token=token,
                            endpoint=endpoint,
                            force_download=force,
                        )
                    )
                    _verify(path, entries.get(name), f"{repo_id}@{revision}/{name}", cache, commit.resolved)
                    paths[name] = path
            except Exception as e:
                if not any(fetch.values()) or isinstance(e, HubIntegrityError):
                    raise
                raise _repair_failed(e, api.endpoint, repo_id, revision, commit.resolved, fetch, cache) from None
            damaged = [name for name, force in fetch.items() if force]
            if damaged:
                warnings.warn(
                    f"{repo_id}@{revision}: the cached {', '.join(damaged)} did not match its checksum "
                    f"(damaged on disk in {cache}); downloaded again and verified.",
                    stacklevel=3,
                )
    if listed_now:
        _record(repo_id, commit, names, listing, cache, token, endpoint)
    return repo_id, commit.resolved, [paths[name] for name in names]


def _names(
    repo_id: str,
    revision: str,
    kind: str,
    files: list[str] | None,
    filename: str | None,
    offline: str | None,
    cache: str,
) -> list[str]:
    """The files to fetch for `kind`, given the commit's file listing (None: not known, offline)."""
    if kind in ("delta", "scope"):
        if files is None:
            if filename is None:
                raise not_cached(repo_id, revision, cache, offline, "its file listing; or pass filename=")
            return [filename if kind == "delta" else scope_name(delta_name(filename))]
        if kind == "delta":
            return [_pick(repo_id, revision, files, filename)]
        delta = _pick(repo_id, revision, files, filename and delta_name(filename))
        if scope_name(delta) not in files:
            raise HubFileNotFoundError(
                f"{repo_id}@{revision} holds no scope for {delta} (no {scope_name(delta)}): it was pushed without "
                "one. Push the delta with its scope: loki.push(delta, repo_id, scope=scope).",
                repo_id=repo_id,
            )
        return [scope_name(delta)]
    needed = list(ATTRIBUTION_FILES) if kind == "attributions" else [SELECTION_FILE]
    if files is None or all(name in files for name in needed):
        return needed
    held = held_kind(files)
    if held is not None:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds {KINDS[held]}, not {KINDS[kind]}: load it with "
            f"{LOADERS[held]}({source_name(repo_id, revision)!r}).",
            repo_id=repo_id,
        )
    raise HubFileNotFoundError(
        f"{repo_id}@{revision} holds no {KINDS[kind]} (no {', '.join(n for n in needed if n not in files)}; files: "
        f"{files[:10]}). Push them there with loki.push.",
        repo_id=repo_id,
    )


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


def _record(
    repo_id: str, commit: Any, names: list[str], listing: dict, cache: str, token: Any, endpoint: str | None
) -> None:
    """After a first pull at `commit`: cache its file listing (so that offline loads can pick the file) and fetch
    the marker (so that the Hub counts the download). snapshot_download is huggingface_hub's only public way to
    cache a listing; `names` are already there, so only the marker is downloaded. Never fails a load."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id,
            revision=commit,
            allow_patterns=names + ([MARKER] if MARKER in listing else []),
            cache_dir=cache,
            token=token,
            endpoint=endpoint,
        )
    except Exception:
        pass


def _pick(repo_id: str, revision: str, files: list[str], filename: str | None) -> str:
    if filename is not None:
        if filename not in files:
            raise HubFileNotFoundError(
                f"{repo_id}@{revision} has no file {filename!r}. Its .loki files: {loki_files(files) or 'none'}.",
                repo_id=repo_id,
            )
        return filename
    deltas = loki_files(files)
    held = held_kind(files)
    if not deltas and held is not None:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds no .loki file: it holds {KINDS[held]}. Load it with "
            f"{LOADERS[held]}({source_name(repo_id, revision)!r}).",
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


def _damaged(
    repo_id: str, revision: str, name: str, path: Path, offline: str, commit: str, digests: tuple[str, str] | None
) -> HubIntegrityError:
    """Offline, a cached file that does not match its recorded checksum (or has none to check) is refused, and left
    where it is: loki downloads it again at the next load with Hub access."""
    blob = os.path.realpath(path)
    if digests is None:
        problem = "has no checksum recorded in the cache (no blob named by it, no cached file listing) to verify it"
    else:
        problem = (
            f"does not match the checksum recorded when it was downloaded ({digests[0][:12]} != "
            f"{digests[1][:12]}): it was changed or damaged on disk"
        )
    return HubIntegrityError(
        f"{repo_id}@{revision}/{name}: the cached copy {path}{f' (-> {blob})' if blob != str(path) else ''} {problem}. "
        f"Hub access is off ({offline}), so it cannot be downloaded again: load it again with Hub access (loki "
        f"downloads it again and verifies it), or delete the revision (hf cache rm {commit}) and load it once online.",
        repo_id=repo_id,
    )


def _repair_failed(
    e: BaseException, where: str, repo_id: str, revision: str, commit: str, fetch: dict[str, bool], cache: str
) -> HubError:
    """A damaged cached file could not be downloaded again: say both (huggingface_hub wraps a failed forced
    download in a ValueError whose cause is the real error)."""
    root = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
    error = root if isinstance(root, HubError) else translate(root, where, repo_id, revision, None, False, None, cache)
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
