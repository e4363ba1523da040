"""Every error loki raises on purpose is a `LokiError`; each subclass names one kind of problem.

Errors about a bad argument or bad input data are also `ValueError`s (`DeltaFormatError`, `DatasetError`,
`EvaluationError`, `SelectionError`, `PromptError`, `LedgerError` and their subclasses; `HubArgumentError`,
`HubAmbiguousFileError`), so code that catches the built-in keeps working. Each Hub error is also the
`huggingface_hub` error of its kind (`HubError`).

>>> import loki
>>> try:
...     loki.load("missing.loki")
... except loki.LokiError as e:
...     print(type(e).__name__)
DeltaFormatError
"""


class LokiError(Exception):
    """Base class of every error loki raises on purpose. `plan`, `apply`, `Plan.commit`, `revert`, `prepare` and
    `ImplantBank.activate` leave the weights and the ledger as they were when they raise one."""


class DeltaFormatError(LokiError, ValueError):
    """The file or object is not a valid `.loki` delta (truncated, corrupted, wrong tensors, bad metadata):
    `loki.load`, `Delta(...)`, `make_delta`, `extract`; also `load_base` for a delta naming no base model, and the
    Hub model card for malformed `extra["evaluation"]` (formats/SPEC.md §7 steps 1-3)."""


class UnsupportedVersionError(DeltaFormatError):
    """`loki.load`: the `.loki` file was written with a newer format version than this library reads."""


class InvalidIndicesError(DeltaFormatError):
    """Row indices are out of range, duplicated, unsorted, empty or of the wrong integer type: reading a file,
    `Delta(...)`, `make_delta`, `Selection(...)` (formats/SPEC.md §7 step 4)."""


class UnknownArchitectureError(LokiError):
    """loki does not know where this model keeps its FFN down-projections (`find_down_projections`, so every
    function that takes a model): an unknown model type without `template=`, or a template that does not match
    one down-projection per layer."""


class IncompatibleModelError(LokiError):
    """`plan`/`apply`: the delta was made for a model of another architecture or other shapes; `prepare`: the
    selection is for other shapes, or empty."""


class OffloadedWeightsError(LokiError):
    """A down-projection weight is on the meta device (accelerate offloading, an empty model): loki reads and writes
    rows of weights in memory. Raised before anything is written."""


class PartitionedWeightsError(LokiError):
    """A down-projection weight holds only this process's partition (DeepSpeed ZeRO-3: a model built under
    `deepspeed.zero.Init` or already in a ZeRO-3 engine): loki finds, prepares and writes rows of whole weights.
    Raised before anything is written."""


class ReplacedWeightsWarning(UserWarning):
    """`revert`: the model no longer computes with the weights the delta was written into (they were replaced), so
    reverting restored the old tensors and left the model's current weights alone."""


class BaseModelMismatchError(IncompatibleModelError):
    """`plan`/`apply`: the fingerprint of the model's rows does not match the base model the delta was made from
    (formats/SPEC.md §6); `check_base=False` skips the check."""


class DtypeError(LokiError):
    """The weights cannot hold the rows: `plan`/`apply`/`prepare` on non-float weights, rows that overflow a
    float16 model; or a storage dtype other than float32/float16/bfloat16 (`make_delta`, `extract`, `Delta.to`)."""


class OverlapError(LokiError):
    """`plan`/`apply`/`Plan.commit`: the delta's rows are held by an applied delta (with `on_overlap="error"`),
    trained by a prepared model, or written twice through a shared weight; `prepare`: a selected row holds an
    applied delta."""


class RevertError(LokiError):
    """`revert`: the handle was already reverted or merged, belongs to another model, or its model or weights no
    longer exist."""


class LedgerError(LokiError, ValueError):
    """A plan/apply/commit/revert/merge cannot run now or with these arguments: bad `on_overlap` or `store`, not a
    `Delta`, or inside `loki.disabled` on weights that held applied deltas."""


class ModelChangedError(RevertError):
    """`revert`: something other than loki wrote into rows a delta wrote, after it was applied; reverting would
    mix the two (nothing is reverted; `force=True` reverts anyway)."""


class StalePlanError(LedgerError):
    """`Plan.commit`: the plan no longer fits the model (the model is gone, its dtype or device changed, or applied
    deltas changed its rows); make a new plan."""


class PreparationError(LokiError):
    """`extract`/`unprepare`/`trainable_report`/`train` on a model not prepared (call `loki.prepare` first);
    `prepare` on a model prepared already, with a bad `lora_rank`, or on layers another wrapper patched; `train`
    with bad `params`."""


class CheckpointError(LokiError):
    """Training cannot resume from a checkpoint: `loki.trainer.LokiTrainer` resuming from an `implant.loki` made with
    other rows, another form or another base model; `loki train` rerun with other arguments than the interrupted
    run."""


class DatasetError(LokiError, ValueError):
    """A training, retain or neighbourhood example is malformed or cannot be formatted (missing fields, nothing to
    learn), or such a data set or its option is bad (`train`: empty data set, `retain_weight`; `retain_set`:
    `top_k`; `loki.neighbourhood`: unknown entity list, template without a slot)."""


class TrainingOptionError(DatasetError):
    """A count, weight or rate given to `train`, `retain_set`, `RetainLoss`, `RetainSet.batches`/`prompts`
    or `neighbourhood.questions` has the wrong type (a bool, a string or a float where a count goes) or is out of
    range (a batch size, step count or `top_k` below 1, a negative weight, a learning rate <= 0, NaN)."""


# -- Hugging Face Hub -------------------------------------------------------------------------------
# Each Hub error is also the huggingface_hub exception of the same kind (see HubError). huggingface_hub is a
# dependency of loki and `huggingface_hub.errors` imports no settings (HF_HUB_OFFLINE, HF_ENDPOINT...).
from huggingface_hub import errors as _hf  # noqa: E402


class HubError(LokiError):
    """Sharing a delta on the Hugging Face Hub failed; the subclass says why, the message what to do.

    Each subclass is also the `huggingface_hub.errors` exception (or builtin) of the same kind, so code written for
    `huggingface_hub` (or `transformers`) handles loki's Hub errors unchanged:

    | loki.errors                          | is also                                                       |
    |--------------------------------------|---------------------------------------------------------------|
    | `HubRepoNotFoundError`               | `RepositoryNotFoundError`                                     |
    | `HubGatedRepoError`                  | `GatedRepoError` (a `RepositoryNotFoundError`), `HubPermissionError` |
    | `HubRevisionNotFoundError`           | `RevisionNotFoundError`                                       |
    | `HubFileNotFoundError`               | `RemoteEntryNotFoundError` (an `EntryNotFoundError`)          |
    | `HubPermissionError`, `HubRateLimitError`, `HubServerError` | `HfHubHTTPError` (an `OSError`)         |
    | `HubOfflineError`                    | `LocalEntryNotFoundError` (a `FileNotFoundError`), `ConnectionError` |
    | `HubArgumentError`                   | `HFValidationError` (a `ValueError`)                          |
    | `HubAmbiguousFileError`              | `ValueError`                                                  |
    | `HubIntegrityError`                  | `OSError` (what huggingface_hub raises for a size mismatch)   |
    | `HubCacheError`                      | `OSError` (what the disk raised)                              |

    >>> from huggingface_hub.errors import RepositoryNotFoundError
    >>> issubclass(HubRepoNotFoundError, RepositoryNotFoundError) and issubclass(HubRepoNotFoundError, LokiError)
    True

    Why several classes and not one `HubError` with a `reason`: `except RepositoryNotFoundError` matches by class,
    so only a class that inherits from it can be caught there; huggingface_hub's constructors allow it. The HTTP
    kinds carry the Hub's answer as huggingface_hub's do (`.response`, `.server_message`, `.request_id`, `.repo_id`);
    all are None where loki found the problem without an answer (e.g. no `.loki` file in the repo's file listing),
    which is the one difference from an error raised by huggingface_hub itself.
    """

    def __init__(
        self, message: str = "", *, response=None, server_message: str | None = None, repo_id: str | None = None
    ) -> None:
        if response is not None and isinstance(self, _hf.HfHubHTTPError):
            _hf.HfHubHTTPError.__init__(self, message, response=response, server_message=server_message)
        else:
            # huggingface_hub's HTTP errors require a response; the other bases take the message alone.
            Exception.__init__(self, message)
            self.response, self.server_message, self.request_id = response, server_message, None
        if repo_id is not None:
            self.repo_id, self.repo_type = repo_id, "model"


class HubArgumentError(HubError, _hf.HFValidationError):
    """A Hub argument is malformed or contradictory: not a `namespace/name` repo id, two different revisions
    (`"org/name@v1"` and `revision="v2"`), a pushed filename that does not end in `.loki`."""


class HubRepoNotFoundError(HubError, _hf.RepositoryNotFoundError):
    """The Hub repo does not exist, or it is private and the token does not give access to it."""


class HubRevisionNotFoundError(HubError, _hf.RevisionNotFoundError):
    """The repo has no branch, tag or commit of that name."""


class HubFileNotFoundError(HubError, _hf.RemoteEntryNotFoundError):
    """The repo (at that revision) holds no such file, or no `.loki` file at all."""


class HubAmbiguousFileError(HubError, ValueError):
    """The repo holds several `.loki` files and no `filename=` says which one to load."""


class HubPermissionError(HubError, _hf.HfHubHTTPError):
    """The token is invalid, or does not allow this action (writing to someone else's repo, a gated repo)."""


class HubGatedRepoError(HubPermissionError, _hf.GatedRepoError):
    """The repo is gated: its files are served to accounts that accepted its conditions, with their token."""


class HubRateLimitError(HubError, _hf.HfHubHTTPError):
    """The Hub answered 429 Too Many Requests: wait, then try again."""


class HubOfflineError(HubError, _hf.LocalEntryNotFoundError, ConnectionError):
    """The Hub cannot be reached (no connection, `HF_HUB_OFFLINE=1` or `local_files_only=True`) and what was asked
    is not in the local Hugging Face cache (or is a push, which needs the Hub)."""


class HubServerError(HubError, _hf.HfHubHTTPError):
    """The Hub answered with a server error (5xx) or an unexpected status."""


class HubIntegrityError(HubError, OSError):
    """The downloaded bytes do not match the checksum the Hub lists for the file (the revision was removed from
    the cache); or, offline, a cached file no longer matches the checksum recorded when it was downloaded (left as
    it is: online, loki downloads it again); or a damaged cached file could not be downloaded again."""


class HubCacheError(HubError, OSError):
    """The Hugging Face cache cannot be written (or read) while pulling: disk full, no permission, read-only file
    system, a path component that is a file. Nothing partial is left; free space or point HF_HOME / cache_dir= at
    another folder."""


class ImplantBankError(LokiError):
    """An `ImplantBank` cannot do what was asked (unknown or duplicate implant name, budget too small, a mixed
    batch whose rows do not match its implants, a switch that would wait for the calling thread itself)."""


class ExportError(LokiError):
    """`export_peft`/`peft_adapter`: a rows-form delta without its base model, `rank=` not a positive int or below
    what the delta needs, or a `dtype=` an adapter cannot hold."""


class EvaluationError(LokiError, ValueError):
    """`loki.evaluate`: an evaluation set or score is malformed (missing fields, empty set, mismatched benchmarks,
    zero baseline)."""


class AttributionError(LokiError):
    """`loki.attribute`: attribution cannot run on these inputs (empty prompt, bad target token or option, unfinished or
    mismatched
    attribution folder)."""


class AttributionMismatchError(AttributionError):
    """`loki.attribute(..., path=)`: the folder holds attributions of another model (other weights or shapes, by
    the fingerprint of its parameters), of other prompts or with other settings (steps, target, measure...), or
    was written before loki recorded the model's fingerprint. Nothing in the folder is changed; pass a new path or
    delete the folder."""


class SelectionError(LokiError, ValueError):
    """`select`, `Selection`, `quota`, `suppression`: a selection cannot be made or read (bad quota, strategy,
    attributions, file), or is for a model of other shapes."""


class ScopeError(LokiError, ValueError):
    """`loki.scope`, `loki.scoped`, `Scope.load`: a scope cannot be made (no key of the implant's own inputs stands
    apart from the inputs outside it), does not fit the model (layer, key length), or a scope file is malformed."""


class PromptError(LokiError, ValueError):
    """`loki.prompts`: prompts cannot be read or built (unknown file type, record without question/choices, missing
    tokenizer)."""
