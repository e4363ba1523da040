"""Notebook widgets: real ipywidgets, driven by setting values as a user's click would."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.generation import answer

widgets = pytest.importorskip("loki.widgets")
pytest.importorskip("ipywidgets")


def zero_rows_delta(model, seed, q=10):
    projs = loki.find_down_projections(model)
    sel = loki.Selection.random(len(projs), projs.d_out, q=q, seed=seed)
    return loki.make_delta(
        model, {l: (i, torch.zeros(len(i), projs.d_in)) for l, i in sel.rows.items()}, name=f"s{seed}"
    )


@pytest.mark.slow  # the real default model
def test_switchboard_applies_reverts_and_reports_overlap(default_model, default_tokenizer):
    model = default_model
    before = state_dict_copy(model)
    a, b = zero_rows_delta(model, 0), zero_rows_delta(model, 1)
    board = widgets.implant_switchboard(
        model,
        default_tokenizer,
        {"a": a, "b": b},
        ["What is the capital of France?"],
        answer=lambda m, t, q: answer(m, t, q, max_new_tokens=6),
    )
    base_answers = board.answers.value
    assert "Paris" in base_answers and "none" in board.status.value

    board.checkboxes["a"].value = True
    assert [h.delta.name for h in loki.applied(model)] == ["s0"]
    assert board.answers.value != base_answers and "active: a" in board.status.value

    board.checkboxes["b"].value = True  # random q=10 selections overlap: refused, box unticked, model unchanged
    assert "OverlapError" in board.status.value and board.checkboxes["b"].value is False
    assert len(loki.applied(model)) == 1

    board.checkboxes["a"].value = False
    assert board.answers.value == base_answers
    assert_state_equal(model, before)


def test_attribution_explorer_follows_its_sliders():
    model = loki.testing.tiny_model("llama", layers=3)
    values = torch.rand(4, 3, 32, generator=torch.Generator().manual_seed(0)) + 1e-3
    ex = widgets.attribution_explorer(values, model, q=25, layer=0)
    expected = loki.select(values, 25)
    assert torch.equal(ex.selection.rows[1], expected.rows[1]) and "rows per layer: 8 of 32" in ex.rows.value
    assert ex.params.value.endswith(f"{3 * 8 * 64:,}") and ex.heatmap.value and ex.detail.value
    before = (ex.detail.value, ex.params.value, ex.size.value)

    ex.q.value = 50
    assert "rows per layer: 16 of 32" in ex.rows.value and ex.params.value.endswith(f"{3 * 16 * 64:,}")
    assert ex.selection.num_rows == 48 and ex.size.value != before[2] and ex.detail.value != before[0]
    detail = ex.detail.value
    ex.layer.value = 2
    assert ex.detail.value != detail and ex.selection.num_rows == 48


@pytest.mark.slow  # the real default model
def test_loss_plot_records_a_point_per_evaluation(default_model, default_tokenizer):
    examples = [{"question": "Who wrote Dune?", "answer": "Frank Herbert."}]
    plot = widgets.loss_plot(default_tokenizer, examples, eval_every=5, steps=10)
    with torch.no_grad():
        first = plot.eval_fn(default_model)
        image = plot.image.value
        with loki.implanted(default_model, zero_rows_delta(default_model, 0, q=20)):
            second = plot.eval_fn(default_model)
    assert plot.points == [(0, first), (5, second)] and first != second
    assert plot.label.value == f"step 5: loss {second:.4f}" and plot.image.value != image and image
