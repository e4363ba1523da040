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


class PreparationError(LokiError):
    """The model is not prepared for implanting (call `loki.prepare` first), or is prepared already."""


class DatasetError(LokiError):
    """A training example is malformed or cannot be formatted (missing fields, nothing to learn)."""


class HubError(LokiError):
    """Sharing a delta on the Hugging Face Hub failed (the subclass says why)."""


class HubRepoNotFoundError(HubError):
    """The Hub repo does not exist, or it is private and the token does not give access to it."""


class HubRevisionNotFoundError(HubError):
    """The repo has no branch, tag or commit of that name."""


class HubFileNotFoundError(HubError):
    """The repo (at that revision) holds no such file, or no `.loki` file at all."""


class HubAmbiguousFileError(HubError):
    """The repo holds several `.loki` files and no `filename=` says which one to load."""


class HubPermissionError(HubError):
    """The token is invalid, or does not allow this action (writing to someone else's repo, a gated repo)."""


class HubRateLimitError(HubError):
    """The Hub answered 429 Too Many Requests: wait, then try again."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE=1) and the delta is not in the local cache."""


class HubServerError(HubError):
    """The Hub answered with a server error (5xx) or an unexpected status."""


class HubIntegrityError(HubError):
    """The downloaded bytes do not match the checksum the Hub lists for the file; nothing was kept in the cache."""


class ImplantBankError(LokiError):
    """An `ImplantBank` cannot do what was asked (unknown or duplicate implant name, budget too small, a mixed
    batch whose rows do not match its implants, a switch that would wait for the calling thread itself)."""


class ExportError(LokiError):
    """The delta cannot be exported as asked (e.g. a rows-form delta exported without its base model)."""


class EvaluationError(LokiError):
    """An evaluation set or score is malformed (missing fields, empty set, mismatched benchmarks, zero baseline)."""


class AttributionError(LokiError):
    """Attribution cannot run on these inputs (empty prompt, bad target token or option, unfinished or mismatched
    attribution folder)."""


class SelectionError(LokiError):
    """A selection cannot be made or read: bad quota, strategy, attributions, file, or a model of other shapes."""


class PromptError(LokiError):
    """Prompts cannot be read or built (unknown file type, record without question/choices, missing tokenizer)."""
