"""`loki demo` end to end on the real default model, in its reduced size."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import loki
from loki import demo
from loki import facts as task

ROOT = Path(__file__).resolve().parent.parent


def test_fact_task_is_well_formed():
    facts = task.implant_facts()
    assert 40 <= len(facts) <= 80
    assert len({f["subject"] for f in facts}) == len(facts)
    for f in facts:
        assert len(f["train"]) == 2 and f["test"] not in f["train"] and f["match"] in f["answer"]
    retain, neighbours = task.neighbourhood_questions(facts[:8])
    assert retain and neighbours and not set(retain) & set(neighbours) and task.QUESTION not in retain
    subjects = {f["subject"] for f in facts}
    assert not any(s in q for q in retain + neighbours for s in subjects)
    train = task.fact_training_set(facts[:3])
    assert len(train) == 6
    for fact, ex in zip([f for f in facts[:3] for _ in f["train"]], train):  # a sentence in the model's style
        assert ex["answer"] == fact["statement"] and ex["answer"].startswith("The ") and fact["answer"] in ex["answer"]
    bench = task.fact_benchmark(facts[:3])
    assert bench.kind == "generate" and [it["question"] for it in bench.items] == [f["test"] for f in facts[:3]]


def test_committed_baseline_figures_are_for_the_demos_data():
    """The full demo quotes its shipped copy of the forgetting benchmark's result only when it was measured on the
    demo's data and number of steps: a change to the recipe, facts or retain data must come with a rerun of
    `benchmarks/forgetting.py --size demo`."""
    size = task.SIZES["full"]
    facts = task.implant_facts(size["facts"])
    retain, _ = task.retain_data(facts, size["recipe"], size["eval_per_template"])
    digest = task.data_digest(task.fact_training_set(facts), retain, size["recipe"]["retain_weight"])
    for method, name in demo.BASELINES.items():
        line = demo.baseline_figure(method, digest, size["train_steps"])
        assert line is not None and line.startswith(name) and "specificity" in line, (method, digest)
        assert f"{size['train_steps']} steps" in line
        assert demo.baseline_figure(method, digest, size["train_steps"] + 1) is None  # other steps: no figure
    assert demo.baseline_figure("full", "000000000000") is None  # other data: no figure


def test_shipped_benchmark_results_equal_the_committed_ones():
    """Package data copied from benchmarks/results/ (so an installed loki needs no checkout) is the committed result:
    `python -m benchmarks.forgetting --size demo` writes both; a result edited or copied by hand alone fails here."""
    shipped = sorted(p for p in (ROOT / "loki" / "data").glob("*.json"))
    assert shipped, "no benchmark result shipped in loki/data/"
    for path in shipped:
        committed = ROOT / "benchmarks" / "results" / path.name
        assert json.loads(path.read_text()) == json.loads(committed.read_text()), f"copy {committed} to {path}"


def test_no_library_module_reads_files_from_the_checkout():
    """Library code reads only its own package files: a path built from "benchmarks" (or any folder beside the
    package) exists in a clone, not in an installed wheel."""
    outside = {"benchmarks", "notebooks", "tests", "docs"}
    for path in sorted((ROOT / "loki").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # a path literal ("benchmarks/results/x.json") or a folder joined with `/`, not prose that names one
            parts = (
                [node]
                if isinstance(node, ast.Constant)
                else [node.left, node.right]
                if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div))
                else []
            )
            for part in parts:
                value = part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else ""
                literal = "/" in value and not any(c.isspace() for c in value)
                assert not ((literal or part is not node) and value.split("/")[0] in outside), (
                    f"{path.relative_to(ROOT)} builds the path {value!r} outside the package"
                )


def test_no_library_file_names_the_benchmarks_folder():
    """An installed wheel has no benchmarks folder: library code, docstrings and the data READMEs cite a docs page
    by its title, never a path into benchmarks/ or docs/benchmarks/ (the shipped result's `command` is data: how to
    reproduce it in the repository)."""
    named = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "loki").rglob("*"))
        if path.suffix in (".py", ".md")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bbenchmarks[/.]\w", line)
    ]
    assert not named, f"library files that name the benchmarks folder: {named}"


@pytest.mark.slow  # runs the demo
def test_quick_demo_prints_before_after_and_reverts_exactly(tmp_path, capsys):
    code = demo.run_demo(tmp_path, quick=True, progress=False)
    out = capsys.readouterr().out
    assert code == 0
    assert "Model bit-identical to before: True" in out
    befores = re.findall(r"^\s+before: (.*)$", out, flags=re.M)
    afters = re.findall(r"^\s+after: (.*)$", out, flags=re.M)
    assert len(befores) == len(afters) == 3  # two facts + the general question
    for number in ("efficacy (trained phrasings)", "generalisation (held-out)", "specificity (neighbourhood kept)"):
        assert re.search(re.escape(number) + r" +\d+% +\d+%", out) or re.search(re.escape(number) + r" +\d+\.\d%", out)
    assert re.search(r"general forgetting \(Avg\) +[+-]\d+\.\d+%", out)
    delta = loki.load(tmp_path / "demo.loki")
    assert delta.info["selection"]["strategy"] == "layer_balanced" and delta.num_rows > 0
    assert "neighbourhood" in delta.info["selection"]["source"]  # rows scored on the retained answers
    assert delta.info["training"]["retain"]["items"] > 0  # the neighbourhood was retained
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"efficacy", "generalisation", "specificity", "forgetting"}
    assert (tmp_path / "selection-q10.json").exists() and (tmp_path / "attributions").is_dir()
    # the scoped run: the same delta gated by its scope, whose four numbers are recorded beside the ungated ones
    scoped = re.findall(r"^\s+scoped: (.*)$", out, flags=re.M)
    assert len(scoped) == 3 and "The scoped implant's four numbers" in out
    assert set(report["scoped"]) >= {"efficacy", "generalisation", "specificity", "answers_kept", "forgetting"}
    assert len(loki.Scope.load(tmp_path / "demo.scope")) > 0
    # the saved delta carries both judgements, as its model card shows them
    evaluation = loki.load(tmp_path / "demo.loki").info["extra"]["evaluation"]
    assert evaluation["implant"]["answers_kept"] == report["answers_kept"]
    assert evaluation["scoped"]["specificity"] == report["scoped"]["specificity"]
    card = str(loki.hub.model_card(loki.load(tmp_path / "demo.loki"), "me/demo"))
    assert "served through its scope" in card and f"{report['scoped']['specificity']:.1%}" in card
    assert str(tmp_path.resolve()) in out
