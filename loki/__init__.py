"""loki: low-damage knowledge implanting (LoKI, arXiv 2505.22120) for LLMs.

The verbs, in workflow order:

- attribute, select: KVA scores of every down-projection row (`Attributions`), and the rows to train (`Selection`).
- prepare, train, extract, unprepare: train only those rows; `extract` gives the `Delta`. `preservation` gives the
  key directions of prompts to keep (`prepare(..., preserve=)` keeps the rows' update off them).
- save, load, push: `.loki` files and Hugging Face Hub repos (`push` also shares `Attributions` and `Selection`s;
  `load_attributions`, `load_selection` read them from a folder, a file or the Hub).
- plan, apply, revert, implanted, disabled, applied, merge: write deltas into a loaded model and take them out,
  exactly (one ledger per weight; `ImplantBank` for serving many).
- export_peft: the same delta as a PEFT LoRA adapter.

Modules for the rest: `loki.evaluate` (the four numbers, forgetting), `loki.retain`, `loki.preserve`,
`loki.neighbourhood`, `loki.editors` (MEMIT and AlphaEdit as `.loki` deltas, baselines),
`loki.hub` (`push_delta`/`pull_delta` and the same for attributions and selections), `loki.generation` (greedy
answers), `loki.facts` (the fictional-facts task of `loki demo`), `loki.targets`, `loki.trainer` (HF `Trainer`
with `.loki` checkpoints: `LokiTrainer`, `LokiCallback`),
`loki.errors` (every error class; the common ones are here too), `loki.testing`. Where the verbs live:
`loki.ledger` (plan/apply/revert/stack), `loki.sources` (the verbs by path or Hub id), `loki.rows` (trainable
rows), `loki.training` (`train`'s loop and checkpoints), `loki.serve` and `loki.mixed` (the bank, mixed batches).

>>> import loki
>>> # model, tokenizer = loki.load_default()
>>> # with loki.implanted(model, loki.load("medical.loki")): ...
"""

from __future__ import annotations

from . import editors, errors, evaluate, hub, neighbourhood, retain, targets
from .attribution import Attributions, attribute
from .delta import Delta
from .errors import BaseModelMismatchError, HubError, LokiError, OverlapError
from .implant import extract, make_delta, suppression, trainable_report
from .ledger import Handle, Plan, applied, disabled, merge, plan, revert
from .models import load_base, load_default
from .peft_export import export_peft
from .preserve import Preservation, preservation
from .retain import RetainLoss, retain_targets
from .rows import is_prepared, prepare, unprepare
from .selection import Selection, select
from .serve import ImplantBank
from .sources import apply, implanted, load, load_attributions, load_selection, push, save
from .targets import find_down_projections
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
    "is_prepared",
    "trainable_report",
    "make_delta",
    "suppression",
    "retain_targets",
    "preservation",
    # files and the Hub
    "load",
    "save",
    "push",
    "load_attributions",
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
    "find_down_projections",
    # classes
    "Attributions",
    "Selection",
    "Delta",
    "Plan",
    "Handle",
    "ImplantBank",
    "RetainLoss",
    "Preservation",
    "LokiTrainer",
    "LokiCallback",
    # the errors people catch (all of them: loki.errors)
    "LokiError",
    "BaseModelMismatchError",
    "OverlapError",
    "HubError",
    # modules
    "editors",
    "errors",
    "evaluate",
    "hub",
    "neighbourhood",
    "retain",
    "targets",
    "trainer",
]


def __getattr__(name: str):
    # loki.trainer imports transformers.Trainer (seconds): loaded on first use, not by `import loki`.
    if name in ("LokiTrainer", "LokiCallback", "trainer"):
        import importlib

        trainer = importlib.import_module(".trainer", __name__)
        return trainer if name == "trainer" else getattr(trainer, name)
    raise AttributeError(f"module 'loki' has no attribute {name!r}")
