"""Translating huggingface_hub's errors (and transport and disk errors) into loki's `HubError` subclasses, which
say what to do and are also the huggingface_hub error of the same kind (`HubRepoNotFoundError` is a
`RepositoryNotFoundError`); the Hub's answer rides along as `.response`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import (
    HubArgumentError,
    HubCacheError,
    HubError,
    HubFileNotFoundError,
    HubGatedRepoError,
    HubOfflineError,
    HubPermissionError,
    HubRateLimitError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubServerError,
)


@contextmanager
def hub_errors(
    api: Any,
    repo_id: str,
    revision: str | None,
    filename: str | None,
    *,
    pushing: bool = False,
    offline: str | None = None,
    cache: str | None = None,
) -> Iterator[None]:
    """Turn `huggingface_hub` and transport errors into `HubError` subclasses that say what to do (each also the
    huggingface_hub error of the same kind; the Hub's answer rides along as `.response`)."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        error = translate(e, api.endpoint, repo_id, revision, filename, pushing, offline, cache)
        if error is None:
            raise
        raise error from None


def translate(
    e: BaseException,
    where: str,
    repo_id: str,
    revision: str | None,
    filename: str | None,
    pushing: bool,
    offline: str | None,
    cache: str | None,
) -> HubError | None:
    """The `HubError` for `e`, raised while talking to the Hub at `where` about `repo_id@revision` (`filename`;
    `pushing` or pulling, with `offline` the reason Hub access is off and `cache` the cache folder), or None when
    `e` is not a Hub, transport or disk error (then it is re-raised as it is)."""
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

    answer = {
        "response": getattr(e, "response", None),
        "server_message": getattr(e, "server_message", None),
        "repo_id": repo_id,
    }
    if isinstance(e, (LocalEntryNotFoundError, RevisionResolutionError)) and isinstance(e.__cause__, HfHubHTTPError):
        # Nothing cached, and the Hub had answered with an error: that answer says what went wrong.
        return translate(e.__cause__, where, repo_id, revision, filename, pushing, offline, cache)
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
            message = (
                f"Pushing to {repo_id} failed: the connection to {where} failed ({type(e).__name__}: {e}). "
                "Check your connection, HF_ENDPOINT and HF_HUB_OFFLINE, then push again."
            )
        elif offline is not None:
            return not_cached(repo_id, revision, cache, offline, "this revision")
        else:
            message = (
                f"Cannot reach {where} ({type(e.__cause__ or e).__name__}) and {repo_id}@{revision} is not in "
                "the cache. Check your connection or HF_ENDPOINT; to work offline, pull the delta once while "
                "online."
            )
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


def not_cached(repo_id: str, revision: str, cache: str, offline: str, what: str) -> HubOfflineError:
    """The error for `what` of `repo_id@revision` missing from `cache` while Hub access is off (`offline` says why)."""
    return HubOfflineError(
        f"{repo_id}@{revision} ({what}) is not in the Hugging Face cache ({cache}) and Hub access is off ({offline}). "
        f"Pull it once while online (loki pull {repo_id}@{revision}), or unset HF_HUB_OFFLINE.",
        repo_id=repo_id,
    )
