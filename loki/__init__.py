"""loki: low-damage knowledge implanting (LoKI, arXiv 2505.22120) for LLMs.

The verbs, in workflow order:

- `attribute`, `select`: KVA scores of every down-projection row (an `Attributions` set), and the rows to train
  (a `Selection`).
- `prepare`, `train`, `extract`, `unprepare`: train only those rows; `extract` gives the `Delta`. `preservation`
  gives the key directions of prompts to keep (a `Preservation`: `prepare(..., preserve=)` keeps the rows' update
  off them); `train(..., retain=)` keeps the base model's answers on retain data. `scope` gives the inputs an
  implant applies to (a `Scope`: `scoped(model, delta, scope)` runs the base model on everything else).
- `save`, `load`, `push`: `.loki` files and Hugging Face Hub repos (`push` also shares `Attributions` and
  `Selection`s, and a delta's `Scope` beside it; `load_attributions`, `load_selection`, `load_scope` read them
  from a folder, a file or the Hub).
- `plan`, `apply`, `revert`, `implanted`, `disabled`, `applied`, `merge`: write deltas into a loaded model and take
  them out, exactly (one ledger per weight: a `Plan` before, a `Handle` after; an `ImplantBank` serves many).
- `export_peft`: the same delta as a PEFT LoRA adapter.
- `load_default`, `load_base`: the embedded default model; the base model a delta names.
- Errors: every one is a `LokiError` (all of them in `loki.errors`); the ones people catch most are here too:
  `BaseModelMismatchError`, `OverlapError`, `HubError`.

Everything else is one level down, in the module of its idea: `loki.evaluate` (the four numbers, forgetting),
`loki.retain` (`retain_set`, `RetainLoss`), `loki.preserve`, `loki.neighbourhood`, `loki.editors` (MEMIT and
AlphaEdit as `.loki` deltas, baselines), `loki.hub` (`push_delta`/`pull_delta` and the same for attributions and
selections), `loki.generation` (greedy answers), `loki.facts` (the fictional-facts task of `loki demo`),
`loki.implant` (`make_delta`, `suppression`, `trainable_report`), `loki.rows` (the trainable rows,
`is_prepared`), `loki.projections` (where the down-projections are: `find_down_projections`), `loki.trainer` (HF
`Trainer` with `.loki` checkpoints: `LokiTrainer`, `LokiCallback`), `loki.errors`, `loki.testing`. Where the verbs
live: `loki.ledger` (plan/apply/revert/stack), `loki.sources` (the verbs by path or Hub id), `loki.training`
(`train`'s loop and checkpoints), `loki.serve` and `loki.mixed` (the bank, mixed batches).

>>> import loki
>>> # model, tokenizer = loki.load_default()
>>> # with loki.implanted(model, loki.load("medical.loki")): ...
"""

from __future__ import annotations

# The modules one level down, so `import loki` is enough for `loki.evaluate.compare(...)`; not in __all__.
from . import editors, errors, evaluate, hub, neighbourhood, projections, retain  # noqa: F401
from .attribution import Attributions, attribute
from .delta import Delta
from .errors import BaseModelMismatchError, HubError, LokiError, OverlapError
from .implant import extract
from .ledger import Handle, Plan, applied, disabled, merge, plan, revert
from .models import load_base, load_default
from .peft_export import export_peft
from .preserve import Preservation, preservation
from .rows import prepare, unprepare
from .scoping import Scope, scope, scoped
from .selection import Selection, select
from .serve import ImplantBank
from .sources import apply, implanted, load, load_attributions, load_scope, load_selection, push, save
from .training import train
from .version import __version__ as __version__  # re-exported: loki.__version__

__all__ = [
    # workflow
    "attribute",
    "select",
    "prepare",
    "train",
    "extract",
    "unprepare",
    "preservation",
    "scope",
    "scoped",
    # files and the Hub
    "load",
    "save",
    "push",
    "load_attributions",
    "load_scope",
    "load_selection",
    # the ledger
    "plan",
    "apply",
    "revert",
    "implanted",
    "disabled",
    "applied",
    "merge",
    "export_peft",
    # models
    "load_default",
    "load_base",
    # the core types
    "Attributions",
    "Selection",
    "Delta",
    "Plan",
    "Handle",
    "ImplantBank",
    "Preservation",
    "Scope",
    # the errors people catch (all of them: loki.errors)
    "LokiError",
    "BaseModelMismatchError",
    "OverlapError",
    "HubError",
]


def __getattr__(name: str):
    # loki.trainer imports transformers.Trainer (seconds): loaded on first use of `loki.trainer`, not by `import loki`.
    if name == "trainer":
        import importlib

        return importlib.import_module(".trainer", __name__)
    raise AttributeError(f"module 'loki' has no attribute {name!r}")
