"""Sharing deltas on the Hugging Face Hub: push a `.loki` file with a model card, load it back by repo id.

>>> import loki
>>> # commit = delta.push_to_hub("me/medical-implant", private=True)   # .loki file + README.md card + marker
>>> # delta = loki.load("me/medical-implant@v1")                      # branch, tag or commit; cached, verified
>>> loki.hub.parse_repo_id("me/medical-implant@v1")
('me/medical-implant', 'v1')

Downloads go through the standard Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`), so `HF_HUB_OFFLINE=1` works
once a delta was pulled. Every failure is a `loki.HubError` subclass that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import (
    DeltaFormatError,
    HubAmbiguousFileError,
    HubError,
    HubFileNotFoundError,
    HubIntegrityError,
    HubOfflineError,
    HubPermissionError,
    HubRateLimitError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubServerError,
)
from .format import read, save

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

    from .delta import Delta

__all__ = ["download", "load_from_hub", "model_card", "parse_repo_id", "push_to_hub"]

# A small file in every delta repo. Hubs count a repo's downloads by requests for one chosen file (by default
# `config.json`); `download` fetches it next to the delta, once per commit and cache.
MARKER = "config.json"
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
DEFAULT_BRANCH = "main"
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[^\s@]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def parse_repo_id(source: str) -> tuple[str, str | None] | None:
    """`"org/name[@revision]"` -> `(repo_id, revision or None)`; None when `source` is not shaped like a repo id.
    A name ending in `.loki` is taken for a local file, not a repo."""
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

    One commit adds `filename` (default `<repo name>.loki`), `README.md` and the marker `config.json` on branch
    `revision` (default main; a new branch starts from main). `private` applies when the repo is created.
    Returns the `huggingface_hub.CommitInfo` (`.oid` is the commit sha, `.commit_url` its page).

    >>> # loki.load("tiny.loki").push_to_hub("me/tiny-implant", private=True, license="apache-2.0")
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if parse_repo_id(repo_id) is None or "@" in repo_id:
        raise HubRepoNotFoundError(f"{repo_id!r} is not a Hub repo id; give 'namespace/name' (e.g. 'me/medical-implant').")
    filename = filename or f"{repo_id.split('/')[1]}.loki"
    if not filename.endswith(".loki"):
        raise HubFileNotFoundError(f"filename {filename!r} must end in '.loki' so that loki.load finds it in the repo.")
    _evaluation(delta.info)  # a card that cannot be written fails before anything is created
    branch = revision or DEFAULT_BRANCH
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(api, repo_id, branch, filename, pushing=True):
        if not api.repo_exists(repo_id):  # (create_repo(exist_ok=True) on a repo one may not write fails oddly)
            api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        others = [f for f in api.list_repo_files(repo_id, revision=branch) if f.endswith(".loki") and f != filename]
        with tempfile.TemporaryDirectory(prefix="loki-push-") as tmp:
            path = save(delta, Path(tmp) / Path(filename).name)
            card = model_card(delta, repo_id, filename=filename, size=path.stat().st_size, license=license,
                              tags=tags, several_files=bool(others))
            marker = {"library_name": "loki", "format": "loki", "format_version": 1,
                      "base_model": delta.base_model, "delta": filename}
            operations = [
                CommitOperationAdd(filename, path),
                CommitOperationAdd("README.md", str(card).encode()),
                CommitOperationAdd(MARKER, (json.dumps(marker, indent=2) + "\n").encode()),
            ]
            return api.create_commit(
                repo_id, operations, revision=branch,
                commit_message=commit_message or f"Upload {filename} ({delta.num_rows} rows) with loki",
            )


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
    numbers `{"efficacy", "generalisation", "specificity", "forgetting"}` (`ImplantReport.evaluation()` gives all).
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
        implant_rows=[(label, f"{float(implant[key]):.0%}" if key != "forgetting" else f"{float(implant[key]):+.2f}%")
                      for key, label in _FOUR if key in implant],
        several_files=several_files,
        loki_version=__version__,
    )
    return ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **kwargs)


_FOUR = (("efficacy", "efficacy (training phrasings)"), ("generalisation", "generalisation (held-out phrasings)"),
         ("specificity", "specificity (neighbourhood answers kept, vs. the base model)"),
         ("forgetting", "general forgetting (LoKI's Avg over sets sharing no template; lower is better)"))


def _evaluation(info: dict[str, Any]) -> tuple[dict, dict[str, tuple[float, float]], float | None]:
    """`(task, {benchmark: (base, implanted)}, forgetting)` from `info["extra"]["evaluation"]`, checked."""
    evaluation = (info.get("extra") or {}).get("evaluation") or {}
    try:
        task = dict(evaluation.get("task") or {})
        general = {str(k): (float(v["base"]), float(v["implanted"])) for k, v in (evaluation.get("general") or {}).items()}
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


# -- pull -------------------------------------------------------------------------------------------
def load_from_hub(source: str, **kwargs) -> "Delta":
    """`download(...)` then read and validate the file: a `Delta`."""
    return read(download(source, **kwargs))


def download(
    source: str,
    *,
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The path, in the Hugging Face cache, of the `.loki` file of Hub repo `source` (`"org/name[@revision]"`).

    Picks the repo's only `.loki` file unless `filename` names one. Checks the bytes against the checksum the
    Hub lists (a mismatch leaves nothing in the cache). A full commit sha already cached, `local_files_only=True`
    or `HF_HUB_OFFLINE=1` make no request; when the Hub is unreachable, rate-limited or failing, a cached copy
    of the revision is used if there is one.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download

    parsed = parse_repo_id(source)
    if parsed is None:
        raise HubRepoNotFoundError(f"{source!r} is not a Hub repo id; give 'namespace/name' or 'namespace/name@revision'.")
    repo_id, at = parsed
    if at is not None and revision is not None and at != revision:
        raise HubRevisionNotFoundError(f"Two revisions given: {source!r} and revision={revision!r}; give one.")
    revision = revision or at or DEFAULT_BRANCH
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)

    if local_files_only or constants.is_offline_mode():
        cached = _from_cache(cache, repo_id, revision, filename)
        if cached is None:
            raise HubOfflineError(
                f"{repo_id}@{revision} is not in the Hugging Face cache ({cache}) and Hub access is off "
                f"({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'}). Pull it once while online "
                f"(loki pull {repo_id}@{revision}), or unset HF_HUB_OFFLINE."
            )
        return cached
    if _COMMIT.match(revision) and (cached := _from_cache(cache, repo_id, revision, filename)) is not None:
        return cached  # a commit never changes: no request needed

    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _hub_errors(api, repo_id, revision, filename):
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except (HubOfflineError, HubRateLimitError, HubServerError):
        cached = _from_cache(cache, repo_id, revision, filename)
        if cached is None:
            raise
        return cached
    siblings = {s.rfilename: s for s in info.siblings or []}
    name = _pick(repo_id, revision, sorted(siblings), filename)
    with _hub_errors(api, repo_id, revision, name):
        path = Path(hf_hub_download(repo_id, name, revision=info.sha, token=token, endpoint=endpoint, cache_dir=cache))
    _verify(path, siblings[name], f"{repo_id}@{revision}/{name}")
    if MARKER in siblings:  # counts the download on the Hub; never fails a load
        try:
            hf_hub_download(repo_id, MARKER, revision=info.sha, token=token, endpoint=endpoint, cache_dir=cache)
        except Exception:
            pass
    _write_ref(cache, repo_id, revision, info.sha)
    return path


def _pick(repo_id: str, revision: str, files: list[str], filename: str | None) -> str:
    if filename is not None:
        if filename not in files:
            raise HubFileNotFoundError(
                f"{repo_id}@{revision} has no file {filename!r}. Its .loki files: {_loki_files(files) or 'none'}."
            )
        return filename
    deltas = _loki_files(files)
    if not deltas:
        raise HubFileNotFoundError(
            f"{repo_id}@{revision} holds no .loki file (files: {files[:10]}). Is it a loki delta repo? "
            "Pass filename= to load a delta stored under another name."
        )
    if len(deltas) > 1:
        raise HubAmbiguousFileError(
            f"{repo_id}@{revision} holds {len(deltas)} .loki files: {deltas}. Say which one: "
            f"loki.load({repo_id!r}, filename={deltas[0]!r})."
        )
    return deltas[0]


def _loki_files(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.endswith(".loki"))


def _verify(path: Path, sibling: Any, what: str) -> None:
    """Compare the file with the sha256 (LFS) or git blob sha1 the Hub lists; on mismatch remove it from the cache."""
    data = path.read_bytes()
    if sibling.lfs is not None:
        expected, actual = sibling.lfs.sha256, hashlib.sha256(data).hexdigest()
    elif sibling.blob_id is not None:
        expected, actual = sibling.blob_id, hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    else:
        return
    if expected != actual:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise HubIntegrityError(
            f"{what}: the downloaded bytes do not match the checksum the Hub lists ({actual[:12]} != {expected[:12]}); "
            "the file was removed from the cache. Try again; if it persists the file on the Hub is damaged."
        )


def _storage(cache: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _from_cache(cache: Path, repo_id: str, revision: str, filename: str | None) -> Path | None:
    """The cached `.loki` file of `repo_id` at `revision` (a commit, or a branch/tag recorded in refs/), or None."""
    storage = _storage(cache, repo_id)
    commit = revision
    if not _COMMIT.match(revision):
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        return snapshot / _pick(repo_id, revision, files, filename)
    except HubFileNotFoundError:
        return None


def _write_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record `revision -> commit` as the client does (refs/<revision>), so that offline loads by name work."""
    if revision == commit:
        return
    ref = _storage(cache, repo_id) / "refs" / revision
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


# -- errors -----------------------------------------------------------------------------------------
@contextmanager
def _hub_errors(api: Any, repo_id: str, revision: str | None, filename: str | None, pushing: bool = False) -> Iterator[None]:
    """Turn `huggingface_hub` and transport errors into `HubError` subclasses that say what to do."""
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
    )

    where = f"{api.endpoint}"
    try:
        yield
    except HubError:
        raise
    except GatedRepoError:
        raise HubPermissionError(
            f"{repo_id} is gated: accept its conditions on {where}/{repo_id}, then pass a token of that account."
        ) from None
    except RepositoryNotFoundError:
        raise HubRepoNotFoundError(
            f"Repo {repo_id} does not exist on {where}, or it is private and your token cannot see it. Check the id; "
            "for a private repo pass token= (or run `hf auth login`) with an account that can read it."
        ) from None
    except RevisionNotFoundError:
        raise HubRevisionNotFoundError(
            f"{repo_id} has no branch, tag or commit {revision!r}. "
            f"List them with huggingface_hub.HfApi().list_repo_refs({repo_id!r})."
        ) from None
    except RemoteEntryNotFoundError:
        raise HubFileNotFoundError(f"{repo_id}@{revision} has no file {filename!r}.") from None
    except (LocalEntryNotFoundError, ConnectionError, httpx.TransportError) as e:  # ConnectionError: hf_xet, offline mode
        if pushing:
            raise HubOfflineError(
                f"Pushing to {repo_id} failed: the connection to {where} failed ({type(e).__name__}: {e}). "
                "Check your connection, HF_ENDPOINT and HF_HUB_OFFLINE, then push again."
            ) from None
        raise HubOfflineError(
            f"Cannot reach {where} ({type(e).__name__}) and {repo_id}@{revision} is not in the cache. "
            "Check your connection or HF_ENDPOINT; to work offline, pull the delta once while online."
        ) from None
    except HFValidationError as e:
        raise HubRepoNotFoundError(f"{repo_id!r} is not a valid Hub repo id: {e}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        server = (e.server_message or "").strip()
        detail = f" (the Hub says: {server})" if server else ""
        if status == 401:
            raise HubPermissionError(
                f"The Hub rejected the token{detail}. Pass a valid token= or run `hf auth login`."
            ) from None
        if status == 403:
            raise HubPermissionError(
                f"Not allowed on {repo_id}{detail}. Use a token with write access to its namespace, or push to a "
                "repo of your own."
            ) from None
        if status == 429:
            raise HubRateLimitError(
                f"The Hub is rate-limiting requests{detail}. {_retry_after(e)}Wait, then try again; logged-in "
                "requests (token=) get higher limits."
            ) from None
        if status == 412:
            raise HubServerError(f"{repo_id}@{revision} changed while pushing{detail}; push again.") from None
        raise HubServerError(
            f"The Hub answered {status} for {repo_id}{detail}. Try again later; if it persists, check {where}."
        ) from None


def _retry_after(e: Any) -> str:
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(e.response.headers) if e.response is not None else None
    return f"Retry after {info.reset_in_seconds} s. " if info is not None and info.remaining == 0 else ""
