"""loki: low-damage knowledge implanting (LoKI) for LLMs.

>>> import loki
>>> # model, tokenizer = loki.load_default()
>>> # with loki.implanted(model, loki.load("medical.loki")): ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import evaluate, hub, neighbourhood, targets
from .api import load, save
from .apply import Handle, active, apply, implanted, merge, revert
from .delta import Delta, LayerDelta, make_delta
from .selection import Selection, select, suppress
from .attribution import Attributions, attribute, merge_attributions
from .implant import TrainableReport, extract, is_prepared, prepare, trainable_report, unprepare
from .retain import RetainLoss, RetainTargets, retain_targets
from .train import TrainResult, train
from .errors import (
    AttributionError,
    PromptError,
    SelectionError,
    BaseModelMismatchError,
    DatasetError,
    DeltaFormatError,
    DtypeError,
    EvaluationError,
    ExportError,
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
    ImplantBankError,
    IncompatibleModelError,
    InvalidIndicesError,
    LokiError,
    OverlapError,
    PreparationError,
    RevertError,
    UnknownArchitectureError,
    UnsupportedVersionError,
)
from .models import load_default
from .peft_export import export_peft, peft_adapter
from .serve import ImplantBank
from .targets import DownProjections, find_down_projections

__all__ = [
    "AttributionError",
    "PromptError",
    "SelectionError",
    "BaseModelMismatchError",
    "DatasetError",
    "Delta",
    "DeltaFormatError",
    "DownProjections",
    "DtypeError",
    "EvaluationError",
    "ExportError",
    "Handle",
    "HubAmbiguousFileError",
    "HubError",
    "HubFileNotFoundError",
    "HubIntegrityError",
    "HubOfflineError",
    "HubPermissionError",
    "HubRateLimitError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "HubServerError",
    "ImplantBank",
    "ImplantBankError",
    "IncompatibleModelError",
    "InvalidIndicesError",
    "LayerDelta",
    "LokiError",
    "OverlapError",
    "PreparationError",
    "RetainLoss",
    "RetainTargets",
    "RevertError",
    "Attributions",
    "Selection",
    "TrainResult",
    "TrainableReport",
    "UnknownArchitectureError",
    "UnsupportedVersionError",
    "active",
    "apply",
    "attribute",
    "evaluate",
    "extract",
    "export_peft",
    "find_down_projections",
    "hub",
    "implanted",
    "is_prepared",
    "load",
    "load_default",
    "make_delta",
    "merge",
    "merge_attributions",
    "neighbourhood",
    "peft_adapter",
    "prepare",
    "retain_targets",
    "revert",
    "save",
    "select",
    "suppress",
    "targets",
    "train",
    "trainable_report",
    "unprepare",
]
