"""Notebook widgets: real ipywidgets, driven by setting values as a user's click would."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.demo import answer

widgets = pytest.importorskip("loki.widgets")
pytest.importorskip("ipywidgets")


def zero_rows_delta(model, seed, q=10):
    projs = loki.find_down_projections(model)
    sel = loki.Selection.random(len(projs), projs.d_out, q=q, seed=seed)
    return loki.make_delta(model, {l: (i, torch.zeros(len(i), projs.d_in)) for l, i in sel.rows.items()}, name=f"s{seed}")


def test_switchboard_applies_reverts_and_reports_overlap(default_model, default_tokenizer):
    model = default_model
    before = state_dict_copy(model)
    a, b = zero_rows_delta(model, 0), zero_rows_delta(model, 1)
    board = widgets.implant_switchboard(model, default_tokenizer, {"a": a, "b": b}, ["What is the capital of France?"],
                                        answer=lambda m, t, q: answer(m, t, q, max_new_tokens=6))
    base_answers = board.answers.value
    assert "Paris" in base_answers and "none" in board.status.value

    board.checkboxes["a"].value = True
    assert [h.delta.name for h in loki.active(model)] == ["s0"]
    assert board.answers.value != base_answers and "active: a" in board.status.value

    board.checkboxes["b"].value = True  # random q=10 selections overlap: refused, box unticked, model unchanged
    assert "OverlapError" in board.status.value and board.checkboxes["b"].value is False
    assert len(loki.active(model)) == 1

    board.checkboxes["a"].value = False
    assert board.answers.value == base_answers
    assert_state_equal(model, before)
