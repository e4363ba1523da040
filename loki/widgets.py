"""Interactive widgets for notebooks (ipywidgets). Each returns a real widget whose callbacks do the work, so tests
can drive them by setting values.

>>> import loki, loki.widgets  # doctest: +SKIP
>>> board = loki.widgets.implant_switchboard(model, tokenizer, {"medical": delta}, ["What treats X?"])  # doctest: +SKIP
>>> board.checkboxes["medical"].value = True   # applies the delta; board.answers updates  # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .delta import Delta
from .errors import LokiError
from .ledger import Handle, apply, revert

EMPTY_ANSWER = "(empty answer)"
DPI = 110  # sharp on a laptop screen; the images are shown at their own size, not stretched to the page


def shown_answer(text: str) -> str:
    """A model's answer as a reader should see it: an empty (or whitespace-only) answer as "(empty answer)", so it
    does not look as if the output failed.

    >>> shown_answer(" Paris. "), shown_answer("  ")
    (' Paris. ', '(empty answer)')
    """
    return text if text.strip() else EMPTY_ANSWER


def html_table(header: Sequence[str], rows: Sequence[Sequence], *, align: str = "left") -> str:
    """An HTML table with ruled, padded columns (a notebook's default table style runs columns together): what the
    switchboard shows and what notebooks display as static tables (`IPython.display.HTML(html_table(...))`), which
    a saved notebook keeps without a kernel. Cells are escaped; numbers are right-aligned.

    Args:
        header: the column titles.
        rows: one sequence of cells per row (any values; `str()` of each).
        align: the alignment of text cells.

    >>> html_table(["q", "a"], [["1 < 2?", 3]])[:40]
    '<table style="border-collapse: collapse;'
    """
    cell = "border: 1px solid #bbb; padding: 3px 8px; vertical-align: top"

    def td(value, tag="td") -> str:
        side = "right" if isinstance(value, (int, float)) and tag == "td" else align
        return f'<{tag} style="{cell}; text-align: {side}">{html.escape(str(value))}</{tag}>'

    head = "".join(td(h, "th") for h in header)
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return f'<table style="border-collapse: collapse; margin: 4px 0"><tr>{head}</tr>{body}</table>'


BUSY = "⏳ switching"  # the status line's first words while the model changes and the answers are recomputed


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

    A delta that cannot be applied (a `LokiError`, e.g. an overlap) leaves the model unchanged: the error is shown
    in `.status` and the checkbox unticks itself. While the model changes, the status line says so ("⏳ switching")
    and the boxes are disabled; the answers and the status line are then written together, so they always describe
    the same model. Every click brings the model to the boxes as they are then, so quick repeated clicks end in the
    state the boxes show. Answers are computed once per set of active deltas and reused. Needs ipywidgets.

    Args:
        model: the model to implant into (in place).
        tokenizer: its tokenizer, passed to `answer`.
        deltas: name -> `Delta`; one checkbox each, in this order, all unticked at first.
        questions: the questions whose answers are shown after every change.
        on_overlap: the overlap policy of each apply ("error", "replace" or "add"; formats/SPEC.md §8).
        answer: `answer(model, tokenizer, question) -> str`; default `loki.generation.answer` (greedy chat answer).

    Returns:
        ipywidgets.VBox with attributes for code and tests: `.checkboxes` (name -> Checkbox), `.answers` (HTML, a
        table), `.status` (HTML: "active: ..." after an error's message, if any), `.handles` (name -> Handle of the
        active deltas, in the order they were applied), `.answer_texts` (the answers shown, one per question).

    >>> import loki.testing, torch
    >>> model = loki.testing.tiny_model("llama")
    >>> next_token = lambda model, tokenizer, q: str(model(torch.tensor([[5, 6]])).logits[0, -1].argmax().item())
    >>> board = implant_switchboard(model, None, {"x": loki.testing.random_delta(model)}, ["5 6"], answer=next_token)
    >>> board.checkboxes["x"].value = True           # applies the delta
    >>> board.status.value, list(board.handles)
    ('active: x', ['x'])
    >>> board.checkboxes["x"].value = False          # reverts it exactly
    >>> board.status.value
    'active: none (the base model)'
    """
    import ipywidgets as w

    if answer is None:
        from .generation import answer
    checkboxes = {name: w.Checkbox(value=False, description=name, indent=False) for name in deltas}
    answers, status = w.HTML(), w.HTML()
    handles: dict[str, Handle] = {}
    computed: dict[tuple[str, ...], list[str]] = {}  # active deltas -> answers: a box ticked back costs nothing
    working = [False]

    def show(error: str = "") -> None:
        key = tuple(handles)
        if key not in computed:
            computed[key] = [shown_answer(answer(model, tokenizer, q)) for q in questions]
        board.answer_texts = computed[key]
        answers.value = html_table(["question", "answer"], zip(questions, computed[key]))
        status.value = error + "active: " + (", ".join(handles) or "none (the base model)")

    def untick(box) -> None:
        box.unobserve(clicked, "value")
        box.value = False
        box.observe(clicked, "value")

    def sync() -> str:
        """Revert what is unticked, then apply what is ticked; the first refusal's message (HTML) or ""."""
        error = ""
        for name in reversed(list(handles)):
            if not checkboxes[name].value:
                try:
                    revert(model, handles[name])
                except LokiError as e:  # the delta stays applied: tick its box again
                    error += f"<b>{type(e).__name__}</b>: {html.escape(str(e))}<br>"
                    checkboxes[name].unobserve(clicked, "value")
                    checkboxes[name].value = True
                    checkboxes[name].observe(clicked, "value")
                    continue
                del handles[name]
        for name, box in checkboxes.items():
            if box.value and name not in handles:
                try:
                    handles[name] = apply(model, deltas[name], on_overlap=on_overlap)
                except LokiError as e:  # the model is unchanged: say why and put the box back
                    error += f"<b>{type(e).__name__}</b>: {html.escape(str(e))}<br>"
                    untick(box)
        return error

    def clicked(change) -> None:
        if working[0]:  # a value set while syncing; sync reads the boxes again before it ends
            return
        working[0] = True
        wanted = [n for n, b in checkboxes.items() if b.value]
        status.value = f"{BUSY} to: {html.escape(', '.join(wanted) or 'the base model')} ..."
        for box in checkboxes.values():
            box.disabled = True
        try:
            error = sync()
            while [n for n, b in checkboxes.items() if b.value] != [n for n in checkboxes if n in handles]:
                error += sync()  # a box changed while the model did: follow it
            show(error)
        finally:
            for box in checkboxes.values():
                box.disabled = False
            working[0] = False

    board = w.VBox([w.HBox(list(checkboxes.values())), status, answers])
    board.checkboxes, board.answers, board.status, board.handles = checkboxes, answers, status, handles
    for box in checkboxes.values():
        box.observe(clicked, "value")
    show()
    return board


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (for an `ipywidgets.Image`)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def snapshot(fig):
    """A matplotlib figure (e.g. an explorer's `.detail_figure`) as a static PNG output, `IPython.display.Image` at
    `DPI`: a saved notebook shows it without a kernel, where a widget shows only "model not found".

    >>> from matplotlib.figure import Figure
    >>> snapshot(Figure(figsize=(2, 1))).data[:4]
    b'\\x89PNG'
    """
    from IPython.display import Image

    return Image(data=_png(fig))


def _image():
    """An `ipywidgets.Image` for `_png` bytes, shown at its own pixel size (a VBox would stretch it to the page)."""
    import ipywidgets as w

    return w.Image(format="png", layout=w.Layout(width="auto", align_self="flex-start"))


def _linthresh(scores) -> float:
    """The linear range of a symmetric log axis for signed `scores`: the 10th percentile of their nonzero
    magnitudes (attributions span orders of magnitude on both sides of 0; below this the axis is linear)."""
    import torch

    mag = scores.abs().flatten()
    mag = mag[mag > 0]
    return float(torch.quantile(mag.double(), 0.1)) if mag.numel() else 1.0


def _symlog_ticks(linthresh: float, top: float) -> list[float]:
    """0 and the signed decades from above `linthresh` to `top`: the default ticks at +-linthresh print on top of 0."""
    import math

    low, high = math.floor(math.log10(linthresh)) + 1, math.ceil(math.log10(max(top, linthresh)))
    return [0.0] + [sign * 10.0**e for e in range(low, high + 1) for sign in (-1, 1)]


def _figure(*args, **kwargs):
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no figures left open

    return Figure(*args, **kwargs)


def attribution_explorer(attributions, model: nn.Module, *, q: float = 10.0, layer: int = 0):
    """Explore KVA attributions: a heatmap of every layer's rows, where the lowest (selected) and highest rows of
    one layer sit, and what a quota `q` costs: rows per layer, trainable parameters and `.loki` size, live.

    The selection is `loki.select(values, q)` (layer-balanced, signed scores; LoKI paper §3.2). Needs ipywidgets and
    matplotlib.

    Args:
        attributions: `[N, L, d_model]` KVA values (a tensor or `loki.Attributions`).
        model: the model they were computed on (for `d_in`, dtype and hence sizes).
        q: the initial quota in percent (the slider spans 0.5..50).
        layer: the layer shown in detail at first.

    Returns:
        ipywidgets.VBox with attributes: `.layer` (IntSlider), `.q` (FloatSlider, percent), `.heatmap` and
        `.detail` (Image, PNG), `.rows`, `.params`, `.size` (Label), `.selection` (the layer-balanced
        `loki.Selection` at the current q), `.heatmap_figure` and `.detail_figure` (the matplotlib Figures drawn).

    Scores are signed (the selected rows are the lowest, mostly negative): the detail plot uses a symmetric log
    axis and the heatmap a diverging colour map centred at 0, both linear within `linthresh` of 0.

    >>> import loki, loki.testing
    >>> model = loki.testing.tiny_model("llama")
    >>> ex = attribution_explorer(loki.attribute(model, None, [[5, 6, 7], [8, 9]], steps=2, progress=False), model)
    >>> ex.q.value = 25
    >>> ex.rows.value, ex.params.value, ex.selection.num_rows
    ('rows per layer: 8 of 32 (16 in all)', 'trainable parameters: 1,024', 16)
    """
    import ipywidgets as w
    import torch
    from matplotlib.colors import SymLogNorm

    from .implant import size_text
    from .projections import find_down_projections
    from .selection import select

    values = torch.as_tensor(attributions if isinstance(attributions, torch.Tensor) else attributions.values).float()
    mean = values.mean(0)  # [L, d_out]: the average attribution of each row over the prompts
    num_layers, d_out = mean.shape
    d_in = find_down_projections(model).d_in
    weight = next(model.parameters())
    item, dtype = weight.element_size(), str(weight.dtype).removeprefix("torch.")

    q_slider = w.FloatSlider(value=q, min=0.5, max=50.0, step=0.5, description="q (%)", continuous_update=False)
    layer_slider = w.IntSlider(value=layer, min=0, max=num_layers - 1, description="layer", continuous_update=False)
    heatmap, detail = _image(), _image()
    rows, params, size = w.Label(), w.Label(), w.Label()

    # The heatmap does not depend on q or the layer: drawn once. Rows sorted by their layer's ranking would hide
    # where they sit, so it shows rows in index order. Signed, symmetric log scale: the selected rows are the lowest
    # (negative) ones, which a plain log scale cannot show.
    linthresh = _linthresh(mean)
    top = max(float(mean.abs().max()), linthresh)
    fig = _figure(figsize=(9, 3))
    ax = fig.add_subplot()
    norm = SymLogNorm(linthresh, vmin=-top, vmax=top)
    im = ax.imshow(mean.numpy(), aspect="auto", origin="lower", interpolation="nearest", cmap="RdBu_r", norm=norm)
    ax.set(xlabel="row (down-projection output coordinate)", ylabel="layer", title="mean attribution (symlog)")
    fig.colorbar(im, ax=ax, ticks=[t for t in _symlog_ticks(linthresh, top) if abs(t) <= top])
    heatmap.value = _png(fig)
    heatmap_figure = fig

    def update(_=None) -> None:
        sel = select(values, q_slider.value)
        k, layer_ = sel.rows_per_layer().get(layer_slider.value, 0), layer_slider.value
        explorer.selection = sel
        rows.value = f"rows per layer: {k} of {d_out} ({sel.num_rows:,} in all)"
        params.value = f"trainable parameters: {sel.num_rows * d_in:,}"
        size.value = f".loki size: about {size_text(sel.num_rows * (d_in * item + 8))} ({dtype})"
        scores = mean[layer_]
        lowest = sel.rows[layer_]
        highest = scores.topk(k).indices if k else lowest
        fig = _figure(figsize=(9, 2.6))
        ax = fig.add_subplot()
        ax.scatter(range(d_out), scores.numpy(), s=3, c="lightgray", label="all rows")
        ax.scatter(lowest.numpy(), scores[lowest].numpy(), s=6, c="tab:blue", label=f"selected (lowest {k})")
        ax.scatter(highest.numpy(), scores[highest].numpy(), s=6, c="tab:red", label=f"highest {k}")
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_yticks(_symlog_ticks(linthresh, float(scores.abs().max())))
        ax.set(xlabel="row", ylabel="mean attribution (signed)", title=f"layer {layer_} at q={q_slider.value:g}%")
        ax.legend(loc="upper right", fontsize=7)
        detail.value = _png(fig)
        explorer.detail_figure = fig

    explorer = w.VBox([heatmap, w.HBox([layer_slider, q_slider]), w.HBox([rows, params, size]), detail])
    explorer.layer, explorer.q, explorer.heatmap, explorer.detail = layer_slider, q_slider, heatmap, detail
    explorer.rows, explorer.params, explorer.size = rows, params, size
    explorer.heatmap_figure = heatmap_figure
    update()
    layer_slider.observe(update, "value")
    q_slider.observe(update, "value")
    return explorer


def loss_plot(tokenizer, examples: Sequence[Mapping], *, eval_every: int, steps: int, max_length: int = 256):
    """A live plot of the loss on `examples` (e.g. held-out phrasings) while `loki.train` runs: pass
    `eval_fn=plot.eval_fn, eval_every=...` to `loki.train`; each call computes the mean answer-token loss, appends
    a point and redraws. Its results land in `TrainResult.evals`.

    Args:
        tokenizer: the model's tokenizer (formats the examples as `loki.train` does).
        examples: `{"prompt" or "question", "answer"}` or `{"messages"}` examples, scored as one batch.
        eval_every: the `eval_every` given to `loki.train` (the x position of each point).
        steps: the run's total steps (the x axis).
        max_length: tokens kept of each example.

    Returns:
        ipywidgets.VBox with attributes: `.image` (Image, PNG), `.label` (Label, latest loss), `.points` (list of
        (step, loss)), `.eval_fn`, `.figure` (the latest matplotlib Figure, None before the first evaluation: pass
        it to `snapshot` to keep it in the saved notebook).

    Raises:
        DatasetError: an example `loki.dataset.encode` refuses.

    >>> plot = loss_plot(tokenizer, heldout, eval_every=5, steps=30); display(plot)          # doctest: +SKIP
    >>> loki.train(model, tokenizer, data, max_steps=30, eval_fn=plot.eval_fn, eval_every=5)  # doctest: +SKIP
    """
    import ipywidgets as w
    import torch.nn.functional as F

    from .dataset import IGNORE, collate, encode, pad_token_id

    pad = pad_token_id(tokenizer)
    batch = collate([encode(tokenizer, ex, max_length) for ex in examples], pad)
    image, label = _image(), w.Label("no evaluation yet")
    points: list[tuple[int, float]] = []

    def eval_fn(model: nn.Module) -> float:
        device = model.get_input_embeddings().weight.device
        b = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=IGNORE
        ).item()
        points.append((min(len(points) * eval_every, steps), loss))
        label.value = f"step {points[-1][0]}: loss {loss:.4f}"
        fig = _figure(figsize=(5, 2.6))
        ax = fig.add_subplot()
        ax.plot(*zip(*points), marker="o")
        ax.set(xlabel="step", ylabel="held-out loss", xlim=(0, max(steps, 1)))
        image.value = _png(fig)
        plot.figure = fig
        return loss

    plot = w.VBox([label, image])
    plot.image, plot.label, plot.points, plot.eval_fn, plot.figure = image, label, points, eval_fn, None
    return plot
