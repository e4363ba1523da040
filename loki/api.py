"""`loki.load` and `loki.save`: one verb each for getting a delta in and out.

>>> import loki
>>> # delta = loki.load("medical.loki")            # a local file
>>> # delta = loki.load("org/medical-implant@v1")   # a Hub repo, at a branch, tag or commit
"""

from __future__ import annotations

import os
from pathlib import Path

from .delta import Delta
from .format import read, save

__all__ = ["load", "save"]


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
    fetched through the Hugging Face cache (offline with `HF_HUB_OFFLINE=1` once cached). The delta is validated
    in full before it is returned. `token`, `endpoint` and `cache_dir` go to the Hub client.
    """
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
                raise HubRepoNotFoundError(f"{e} (There is no local file {str(source)!r} either.)") from None
    return read(path)
