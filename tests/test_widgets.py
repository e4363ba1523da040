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
    projs = loki.projections.find_down_projections(model)
    sel = loki.Selection.random(len(projs), projs.d_out, q=q, seed=seed)
    return loki.implant.make_delta(
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


def drawn_points(fig, label_prefix):
    """How many points of the scatter labelled `label_prefix...` land, finite, inside the axes (a log axis maps a
    negative score to NaN: such a point is in the data but never drawn)."""
    import numpy as np

    ax = fig.axes[0]
    (points,) = [c for c in ax.collections if c.get_label().startswith(label_prefix)]
    xy = np.ma.filled(np.ma.asarray(ax.transData.transform(points.get_offsets()), float), np.nan)
    box = ax.bbox
    inside = np.isfinite(xy).all(1) & (xy[:, 0] >= box.x0 - 1) & (xy[:, 0] <= box.x1 + 1)
    return int((inside & (xy[:, 1] >= box.y0 - 1) & (xy[:, 1] <= box.y1 + 1)).sum())


def test_explorer_draws_every_selected_row():
    # signed attributions, mostly negative: the selected (lowest) rows are exactly the negative ones
    model = loki.testing.tiny_model("llama", layers=3)
    values = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(0)) * 1e-3 - 2e-3
    assert (values.mean(0) < 0).float().mean() > 0.9
    ex = widgets.attribution_explorer(values, model, q=10, layer=1)
    for q, layer in ((25, 1), (50, 2), (5, 0)):
        ex.q.value, ex.layer.value = q, layer
        shown = len(ex.selection.rows[layer])
        assert shown and drawn_points(ex.detail_figure, "selected") == shown, (q, layer)
    # the heatmap keeps the sign: a negative row is not painted as the floor of a log scale
    (image,) = ex.heatmap_figure.axes[0].images
    assert (image.get_array() < 0).mean() > 0.9 and image.norm(-1e-3) < 0.5 < image.norm(1e-3)


def test_switchboard_shows_an_empty_answer_as_such():
    model = loki.testing.tiny_model("llama")
    board = widgets.implant_switchboard(model, None, {}, ["anything?"], answer=lambda m, t, q: "  ")
    assert "(empty answer)" in board.answers.value
    assert widgets.shown_answer("") == "(empty answer)" and widgets.shown_answer("Paris.") == "Paris."


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


def fingerprint_answer(model, tokenizer, question):
    """A cheap 'answer' that changes with every weight change: the sum of the down-projection weights."""
    return f"{sum(float(p.weight.detach().sum()) for p in loki.projections.find_down_projections(model).modules):.6f}"


def test_switchboard_status_and_answers_describe_the_same_model():
    model = loki.testing.tiny_model("llama")
    before = state_dict_copy(model)
    a = loki.testing.random_delta(model, seed=0, q=10, layers=[0], name="a")
    b = loki.testing.random_delta(model, seed=1, q=10, layers=[1], name="b")  # disjoint from a: another layer
    seen = []  # the status line whenever an answer is computed: the busy sign, never a stale "active: ..."

    def answer_(m, t, q):
        seen.append(boards[0].status.value if boards else None)
        return fingerprint_answer(m, t, q)

    boards = []
    board = widgets.implant_switchboard(model, None, {"a": a, "b": b}, ["q"], answer=answer_)
    boards.append(board)
    texts = {(): board.answer_texts}
    board.checkboxes["a"].value = True
    assert board.status.value == "active: a" and seen[-1].startswith(widgets.BUSY)
    texts[("a",)] = board.answer_texts
    board.checkboxes["b"].value = True
    assert board.status.value == "active: a, b" and list(board.handles) == ["a", "b"]
    assert len({tuple(t) for t in [*texts.values(), board.answer_texts]}) == 3  # each state answers differently
    assert "<td" in board.answers.value and "border" in board.answers.value  # separated columns
    # quick repeated clicks end in the state the boxes show, and a state seen before is not recomputed
    calls = len(seen)
    for value in (False, True, False, True, False):
        board.checkboxes["b"].value = value
    board.checkboxes["a"].value = False
    assert board.status.value == "active: none (the base model)" and board.answer_texts == texts[()]
    assert len(seen) == calls and not any(box.disabled for box in board.checkboxes.values())
    assert_state_equal(model, before)


def test_switchboard_refuses_an_overlap_and_says_so():
    model = loki.testing.tiny_model("llama")
    a = loki.testing.random_delta(model, seed=0, name="a")
    again = loki.testing.random_delta(model, seed=0, noise=0.05, name="again")  # the same rows
    board = widgets.implant_switchboard(model, None, {"a": a, "again": again}, ["q"], answer=fingerprint_answer)
    board.checkboxes["a"].value = True
    shown = board.answer_texts
    board.checkboxes["again"].value = True
    assert "OverlapError" in board.status.value and board.status.value.endswith("active: a")
    assert board.checkboxes["again"].value is False and list(board.handles) == ["a"] and board.answer_texts == shown


def test_html_table_separates_and_escapes():
    table = widgets.html_table(["question", "n"], [["a < b?", 3]])
    assert table.count("<td") == 2 and "a &lt; b?" in table and "text-align: right" in table


def test_snapshot_is_a_static_png():
    from matplotlib.figure import Figure

    image = widgets.snapshot(Figure(figsize=(2, 1)))
    assert image.data[:4] == b"\x89PNG" and "image/png" in image._repr_mimebundle_()[0]
