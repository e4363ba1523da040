"""What a loki Hub repo is: its id (`"org/name[@revision]"`), the kind it holds (a delta, attributions or a
selection) and the fixed names of its files. Shared by `loki.hub.push` and `loki.hub.pull`; makes no request.

>>> held_kind(["README.md", "config.json", "medical.loki"]), held_kind(["README.md"])
('delta', None)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..attribution import FILES as ATTRIBUTION_FILES
from ..errors import HubArgumentError

# A small file in every delta repo. Hubs count a repo's downloads by requests for one chosen file (by default
# `config.json`); `download` fetches it next to the delta, once per commit and cache.
MARKER = "config.json"
SELECTION_FILE = "selection.json"
SCOPE_SUFFIX = ".scope"  # a delta's scope (`loki.Scope`) sits beside it: `<stem>.loki` and `<stem>.scope`
KINDS = {
    "delta": "a loki delta",
    "attributions": "loki attributions",
    "selection": "a loki selection",
    "scope": "a loki scope",  # not a kind of repo: a file beside a delta, in a delta repo
}
LOADERS = {
    "delta": "loki.load",
    "attributions": "loki.load_attributions",
    "selection": "loki.load_selection",
    "scope": "loki.load_scope",
}
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


def check_repo_id(repo_id: str) -> None:
    """Raise `HubArgumentError` unless `repo_id` is `"namespace/name"` (no `@revision`: a push names its branch
    with `revision=`)."""
    if parse_repo_id(repo_id) is None or "@" in repo_id:
        raise HubArgumentError(f"{repo_id!r} is not a Hub repo id; give 'namespace/name' (e.g. 'me/medical-implant').")


def held_kind(files: list[str]) -> str | None:
    """The kind of loki repo these files make, or None."""
    if all(name in files for name in ATTRIBUTION_FILES):
        return "attributions"
    if SELECTION_FILE in files:
        return "selection"
    return "delta" if loki_files(files) else None


def loki_files(files: Iterable[str]) -> list[str]:
    """The `.loki` files among `files`, sorted."""
    return sorted(f for f in files if f.endswith(".loki"))


def scope_name(filename: str) -> str:
    """The name of the scope file beside the delta file `filename` in a repo: `"a/b.loki"` -> `"a/b.scope"`.

    >>> scope_name("medical.loki")
    'medical.scope'
    """
    return filename.removesuffix(".loki") + SCOPE_SUFFIX


def delta_name(filename: str) -> str:
    """The delta file a scope's name stands for (`scope_name`'s inverse); a `.loki` name as it is.

    >>> delta_name("medical.scope"), delta_name("medical.loki")
    ('medical.loki', 'medical.loki')
    """
    return filename.removesuffix(SCOPE_SUFFIX) + ".loki" if filename.endswith(SCOPE_SUFFIX) else filename


def source_name(repo_id: str, revision: str) -> str:
    """How to name `repo_id` at `revision` to a loader: `"org/name"` on the default branch, else
    `"org/name@revision"`."""
    return repo_id if revision == DEFAULT_BRANCH else f"{repo_id}@{revision}"
