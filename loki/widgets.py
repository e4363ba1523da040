"""Interactive widgets for notebooks (ipywidgets). Each returns a real widget whose callbacks do the work, so tests
can drive them by setting values.

>>> import loki, loki.widgets  # doctest: +SKIP
>>> board = loki.widgets.implant_switchboard(model, tokenizer, {"medical": delta}, ["What treats X?"])  # doctest: +SKIP
>>> board.checkboxes["medical"].value = True   # applies the delta; board.answers shows the new answers  # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .apply import Handle, apply, revert
from .delta import Delta
from .errors import LokiError


def implant_switchboard(
    model: nn.Module,
    tokenizer,
    deltas: Mapping[str, Delta],
    questions: Sequence[str],
    *,
    on_overlap: str = "error",
    answer: Callable | None = None,
):
    """One checkbox per delta (ticking applies it in place, unticking reverts it exactly) and a table of the
    model's answers to `questions` under the implants currently active.

    Attributes for code and tests: `.checkboxes` (name -> Checkbox), `.answers` (HTML), `.status` (HTML),
    `.handles` (name -> Handle of the active deltas).
    """
    import ipywidgets as w

    if answer is None:
        from .demo import answer
    checkboxes = {name: w.Checkbox(value=False, description=name, indent=False) for name in deltas}
    answers, status = w.HTML(), w.HTML()
    handles: dict[str, Handle] = {}

    def refresh() -> None:
        rows = "".join(
            f"<tr><td>{html.escape(q)}</td><td>{html.escape(answer(model, tokenizer, q))}</td></tr>" for q in questions
        )
        answers.value = f"<table><tr><th>question</th><th>answer</th></tr>{rows}</table>"

    def toggled(change) -> None:
        name = change["owner"].description
        try:
            if change["new"]:
                handles[name] = apply(model, deltas[name], on_overlap=on_overlap)
            elif name in handles:
                revert(model, handles.pop(name))
        except LokiError as e:  # show the error and put the checkbox back; the model is unchanged
            status.value = f"<b>{type(e).__name__}</b>: {html.escape(str(e))}"
            change["owner"].unobserve(toggled, "value")
            change["owner"].value = change["old"]
            change["owner"].observe(toggled, "value")
            return
        status.value = "active: " + (", ".join(handles) or "none (the base model)")
        refresh()

    for box in checkboxes.values():
        box.observe(toggled, "value")
    refresh()
    status.value = "active: none (the base model)"
    board = w.VBox([w.HBox(list(checkboxes.values())), status, answers])
    board.checkboxes, board.answers, board.status, board.handles = checkboxes, answers, status, handles
    return board
