"""Every error loki raises on purpose is a `LokiError`; each subclass names one kind of problem.

>>> import loki
>>> try:
...     loki.load("missing.loki")
... except loki.LokiError as e:
...     print(type(e).__name__)
DeltaFormatError
"""


class LokiError(Exception):
    """Base class of every error raised by loki on bad input. The model is never modified when one is raised."""


class DeltaFormatError(LokiError):
    """The file or object is not a valid `.loki` delta (truncated, corrupted, wrong tensors, bad metadata)."""


class UnsupportedVersionError(DeltaFormatError):
    """The `.loki` file was written with a newer format version than this library reads."""


class InvalidIndicesError(DeltaFormatError):
    """Row indices are out of range, duplicated, unsorted or of the wrong integer type."""


class UnknownArchitectureError(LokiError):
    """loki does not know where this model keeps its FFN down-projections."""


class IncompatibleModelError(LokiError):
    """The delta was made for a model of another architecture or other shapes."""


class BaseModelMismatchError(IncompatibleModelError):
    """The fingerprint of the model's rows does not match the base model the delta was made from."""


class DtypeError(LokiError):
    """The model's weights cannot hold the delta's rows (non-float weights, or values out of the dtype's range)."""


class OverlapError(LokiError):
    """Two deltas change the same rows and no overlap policy allows it."""


class RevertError(LokiError):
    """The handle does not belong to this model or was already reverted."""
