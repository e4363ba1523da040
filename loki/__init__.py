"""loki: low-damage knowledge implanting (LoKI) for LLMs.

>>> import loki
>>> # model, tokenizer = loki.load_default()
>>> # with loki.implanted(model, loki.load("medical.loki")): ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import targets
from .api import load, save
from .apply import Handle, active, apply, implanted, merge, revert
from .delta import Delta, LayerDelta, make_delta
from .selection import Selection
from .errors import (
    BaseModelMismatchError,
    DeltaFormatError,
    DtypeError,
    IncompatibleModelError,
    InvalidIndicesError,
    LokiError,
    OverlapError,
    RevertError,
    UnknownArchitectureError,
    UnsupportedVersionError,
)
from .models import load_default
from .targets import DownProjections, find_down_projections

__all__ = [
    "BaseModelMismatchError",
    "Delta",
    "DeltaFormatError",
    "DownProjections",
    "DtypeError",
    "Handle",
    "IncompatibleModelError",
    "InvalidIndicesError",
    "LayerDelta",
    "LokiError",
    "OverlapError",
    "RevertError",
    "Selection",
    "UnknownArchitectureError",
    "UnsupportedVersionError",
    "active",
    "apply",
    "find_down_projections",
    "implanted",
    "load",
    "load_default",
    "make_delta",
    "merge",
    "revert",
    "save",
    "targets",
]
