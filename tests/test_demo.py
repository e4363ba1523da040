"""`loki demo` end to end on the real default model, in its reduced size."""

from __future__ import annotations

import json
import re

import loki
from loki import demo


def test_fact_task_is_well_formed():
    facts = demo.implant_facts()
    assert 40 <= len(facts) <= 80
    assert len({f["subject"] for f in facts}) == len(facts)
    for f in facts:
        assert len(f["train"]) == 2 and f["test"] not in f["train"] and f["match"] in f["answer"]
    retain, neighbours = demo.neighbourhood_questions(facts[:8])
    assert retain and neighbours and not set(retain) & set(neighbours) and demo.QUESTION not in retain
    subjects = {f["subject"] for f in facts}
    assert not any(s in q for q in retain + neighbours for s in subjects)
    train = demo.fact_training_set(facts[:3])
    assert len(train) == 6
    for f, ex in zip([f for f in facts[:3] for _ in f["train"]], train):  # a sentence in the model's style
        assert ex["answer"] == f["statement"] and ex["answer"].startswith("The ") and f["answer"] in ex["answer"]
    bench = demo.fact_benchmark(facts[:3])
    assert bench.kind == "generate" and [it["question"] for it in bench.items] == [f["test"] for f in facts[:3]]


def test_committed_baseline_figures_are_for_the_demos_data():
    """The full demo quotes benchmarks/results/forgetting-demo.json only when it was measured on the demo's data and
    number of steps: a change to the recipe, facts or retain data must come with a rerun of
    `benchmarks/forgetting.py --size demo`."""
    size = demo.SIZES["full"]
    facts = demo.implant_facts(size["facts"])
    retain, _ = demo.retain_data(facts, size["recipe"], size["eval_per_template"])
    digest = demo.data_digest(demo.fact_training_set(facts), retain, size["recipe"]["retain_weight"])
    for method, name in demo.BASELINES.items():
        line = demo.baseline_figure(method, digest, size["train_steps"])
        assert line is not None and line.startswith(name) and "specificity" in line, (method, digest)
        assert f"{size['train_steps']} steps" in line
        assert demo.baseline_figure(method, digest, size["train_steps"] + 1) is None  # other steps: no figure
    assert demo.baseline_figure("full", "000000000000") is None  # other data: no figure


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
    assert str(tmp_path.resolve()) in out
