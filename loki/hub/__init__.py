"""Sharing on the Hugging Face Hub: push a delta, an attribution set or a selection with a model card, pull it
back by repo id (`loki.push` and `loki.load`, `loki.load_attributions`, `loki.load_selection` call these).

>>> import loki
>>> # commit = loki.push(delta, "me/medical-implant", private=True)   # .loki file + README.md card + marker
>>> # delta = loki.load("me/medical-implant@v1")                     # branch, tag or commit; cached, verified
>>> # loki.push(attributions, "me/smollm2-kva")                      # attribute once per base model...
>>> # selection = loki.select(loki.load_attributions("me/smollm2-kva"), q=10)   # ...select from it anywhere
>>> loki.hub.parse_repo_id("me/medical-implant@v1")
('me/medical-implant', 'v1')

The verbs come in pairs: `push_delta` / `pull_delta`, `push_attributions` / `pull_attributions`, `push_selection`
/ `pull_selection`; a delta's scope goes with it (`push_delta(..., scope=)` / `pull_scope`); `download` gives the
cached file itself. The modules: `push`, `pull` (and the verified cache),
`cards` (the three model cards), `errors` (huggingface_hub's errors as loki's), `repo` (ids and what a repo holds).

A repo holds one kind: a delta (`<name>.loki`, and its scope `<name>.scope` if pushed with one), attributions (the
folder `loki.attribute(..., path=)` writes: `meta.json`, `attributions.npy`, `targets.npy`, `seconds.npy`) or a
selection (`selection.json`), each with a `README.md` model card and a small `config.json` marker.

Downloads go through huggingface_hub's own cache functions and the standard Hugging Face cache (`HF_HOME`,
`HF_HUB_CACHE`), so `HF_HUB_OFFLINE=1` works once a repo was pulled. Every file returned is checked against its
checksum first, a cached one too, on every load (see `download`). Every failure is a `loki.errors.HubError`
subclass that says what to do and is also the `huggingface_hub.errors` exception of the same kind (e.g.
`HubRepoNotFoundError` is a `RepositoryNotFoundError`).
"""

from __future__ import annotations

from .cards import attributions_card, model_card, selection_card
from .pull import download, pull_attributions, pull_delta, pull_scope, pull_selection
from .push import push_attributions, push_delta, push_selection
from .repo import parse_repo_id

__all__ = [
    "attributions_card",
    "download",
    "model_card",
    "parse_repo_id",
    "pull_attributions",
    "pull_delta",
    "pull_scope",
    "pull_selection",
    "push_attributions",
    "push_delta",
    "push_selection",
    "selection_card",
]
