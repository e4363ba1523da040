"""The tutorial notebooks, executed top to bottom in a real kernel (small size: LOKI_NOTEBOOK_QUICK=1).

They run in order in one scratch folder, as a user would: notebook 2 writes `facts.loki`, which 3-6 load.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import loki

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = {  # a line each notebook must print: the point of its last steps
    "01_analyse.ipynb": "rows per layer: 28 of 576",
    "02_select_and_implant.ipynb": "facts.loki: ",
    "03_judge_the_damage.ipynb": "specificity (neighbourhood kept)",
    "04_apply_revert_stack.ipynb": "bit-identical to the base model: True",
    "05_share.ipynb": "pulled delta equals pushed: True",
    "06_hot_swap.ipynb": "mixed batch matches one implant at a time: True",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def text_of(book) -> str:
    """What the notebook printed: each stream's chunks joined as the stream was written (a chunk of stderr, such as a
    progress bar, can land between two writes of one print), then the plain-text results."""
    streams: dict[str, list[str]] = {}
    results = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                streams.setdefault(o.get("name", "stdout"), []).append(o.get("text", ""))
            else:
                results.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(["".join(chunks) for chunks in streams.values()] + results)


def outputs(book, mime: str) -> list:
    """Every display or result output carrying `mime` (e.g. "image/png": a figure saved in the notebook)."""
    return [
        o.data[mime]
        for c in book.cells
        for o in c.get("outputs", [])
        if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})
    ]


def table_rows(markup: str) -> list[list[str]]:
    """The body rows of an HTML table (`loki.widgets.html_table`), each a list of its cells' text."""
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", markup) if "<td" in row]


# What each notebook saves as static output (figures as PNG, tables as HTML, the card as Markdown), which a reopened
# notebook shows without a kernel: (mime type, at least how many).
STATIC = {
    "01_analyse.ipynb": ("image/png", 3),  # the explorer's two figures and the selection's plot
    "02_select_and_implant.ipynb": ("image/png", 1),  # the held-out loss
    "03_judge_the_damage.ipynb": ("text/html", 3),  # before/after, the baselines, the scoped delta
    "04_apply_revert_stack.ipynb": ("text/html", 1),  # the switchboard's states
    "05_share.ipynb": ("text/markdown", 1),  # the model card, rendered
    "06_hot_swap.ipynb": ("text/html", 2),  # the mixed batch, the routed one
}


def run_all_module():
    """notebooks/run_all.py, imported from its path (notebooks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOKS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_committed_with_their_outputs():
    """Committed as `notebooks/run_all.py --save` wrote them at the default size: every code cell ran, no errors,
    no live widget views (they show "model not found" without a kernel), no scratch paths, and the code is the code
    the outputs came from (edit a code cell, and this fails until the notebooks are run and saved again)."""
    digest = run_all_module().source_digest
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(EXPECTED)
    for name in names:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(book)
        saved = book.metadata.get("loki", {})
        assert saved.get("size") == "default", f"{name}: run `.venv/bin/python notebooks/run_all.py --save`"
        assert saved.get("source_sha256") == digest(book), (
            f"{name}: its code changed since its outputs were saved; run `.venv/bin/python notebooks/run_all.py --save`"
        )
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(c.source.strip() and c.execution_count is not None for c in code), name
        produced = [o for c in code for o in c.outputs]
        assert produced, name
        assert not [o for o in produced if o.output_type == "error"], name
        assert not [o for o in produced if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], name
        assert "widgets" not in book.metadata, name
        assert not re.search(r"/tmp/|loki-notebooks-", text_of(book)), name
        assert EXPECTED[name].split(":")[0] in text_of(book), name
        # they teach loki's API and the shared task module (loki.facts), not the demo's internals
        assert not [c.source for c in code if re.search(r"loki\.demo\b|from loki import demo|import demo\b", c.source)]


@pytest.mark.slow  # runs a notebook
@pytest.mark.parametrize("name", list(EXPECTED))
def test_notebook_runs(name, workdir, monkeypatch):
    monkeypatch.setenv("LOKI_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment (and LOKI_CACHE)
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf-cache"))
    for var in ("HF_TOKEN", "LOKI_HUB_TOKEN", "LOKI_HUB_REPO"):  # notebook 5 uses the local server
        monkeypatch.delenv(var, raising=False)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    # timeout: a hang guard per cell (notebook 2's training cell ran past 300 s on a 2-core CPU shared with a job)
    client = nbclient.NotebookClient(
        book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    finally:
        nbformat.write(book, workdir / f"executed-{name}")  # to read what it printed
    out = text_of(book)
    assert EXPECTED[name] in out, out[-3000:]
    widgets = [
        o
        for c in book.cells
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    if name in ("01_analyse.ipynb", "02_select_and_implant.ipynb", "04_apply_revert_stack.ipynb"):
        assert widgets, "the notebook's widget did not display"
    if name == "04_apply_revert_stack.ipynb":
        assert "revert is exact: True" in out and "answers changed: True" in out
        assert "answers back to the base model's: True" in out
    mime, least = STATIC[name]
    assert len(outputs(book, mime)) >= least, f"{name}: fewer than {least} {mime} outputs"
    noise = [o.get("text", "") for c in book.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not [t for t in noise if "Warning" in t], noise  # e.g. transformers' FutureWarning
    assert not [t for t in outputs(book, "text/plain") if t.strip() in ("{}", "[]")]
    if name == "04_apply_revert_stack.ipynb":  # the overlap the notebook promises is really refused
        assert "refused: OverlapError" in out and "refused: True" in out
        assert int(re.search(r"rows zero-lowest shares with the facts delta: (\d+)", out).group(1)) > 0
    if name == "03_judge_the_damage.ipynb":  # this notebook's implant against the committed baselines
        (baselines,) = [t for t in outputs(book, "text/html") if "[committed]" in t]
        rows = {r[0]: r[1:] for r in table_rows(baselines)}
        assert int(rows["LoKI + retain (this notebook)"][1].rstrip("%")) > 0  # even the quick size learns something
        assert {"LoRA + retain [committed]", "full fine-tuning + retain [committed]"} <= rows.keys(), rows
        (scoped,) = [t for t in outputs(book, "text/html") if "the same delta, scoped" in t]
        assert len(table_rows(scoped)) == 2 and (workdir / "facts.scope").is_file()
    if name == "05_share.ipynb":
        assert "pulled scope equals pushed: True" in out
        # the card shows the figures notebook 3 recorded in the delta, unscoped and served through the scope
        (card,) = outputs(book, "text/markdown")
        assert "served through its scope" in card and "neighbourhood whole answers unchanged" in card
    if name == "03_judge_the_damage.ipynb":
        assert "served through its scope" in out
        assert set(loki.load(workdir / "facts.loki").info["extra"]["evaluation"]) >= {"implant", "scoped", "general"}
    if name == "06_hot_swap.ipynb":
        assert "the general question as the base model: True" in out
    if name == "02_select_and_implant.ipynb":
        assert (workdir / "facts.loki").is_file()
