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


def load(source: str | os.PathLike, *, revision: str | None = None, filename: str | None = None) -> Delta:
    """Read a `.loki` delta from a local file (validated in full before it is returned)."""
    return read(Path(source))
