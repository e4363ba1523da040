"""A griffe extension for the API pages: doctest examples in docstrings render as code.

Markdown reads a bare `>>> x["a"]` line as a nested block quote with a link reference in it; fencing each doctest
block (from its first `>>>` line to the next blank line) as `pycon` shows it as the session it is. The docstrings
themselves are not changed (tests/test_doctests.py runs them).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    r"""`text` with every doctest block wrapped in a ```` ```pycon ```` fence at the block's own indentation.

    >>> fence_doctests("Sum:\n>>> 1 + 1\n2\n\nDone.").split("\n")
    ['Sum:', '```pycon', '>>> 1 + 1', '2', '```', '', 'Done.']
    """
    out: list[str] = []
    fence: str | None = None  # the indentation of the open fence
    for line in text.split("\n"):
        if fence is None and line.lstrip().startswith(">>>"):
            fence = line[: len(line) - len(line.lstrip())]
            out.append(f"{fence}```pycon")
        elif fence is not None and not line.strip():
            out.append(f"{fence}```")
            fence = None
        out.append(line)
    if fence is not None:
        out.append(f"{fence}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the doctest blocks of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
