"""The headline rule of `benchmarks/forgetting.py` (matched task score, rate choice, medians over seeds), on
journal rows whose headline can be worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def forgetting():
    spec = importlib.util.spec_from_file_location("forgetting_bench", ROOT / "benchmarks" / "forgetting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(method, lr, seed, task, forgetting):
    return {
        "method": method,
        "lr": lr,
        "steps": 40,
        "seed": seed,
        "task_score": task,
        "forgetting": forgetting,
        "efficacy": task,
        "specificity": 0.8,
        "answers_kept": 0.1,
        "trainable_params": 10,
        "general": {"wiki": 0.05 - forgetting / 1000},
    }


def test_headline_picks_the_least_forgetting_rate_that_reaches_the_target(forgetting):
    rows = [
        run("a", 1e-3, 0, 0.50, 1.0),
        run("a", 3e-3, 0, 0.95, 9.0),
        run("a", 1e-2, 0, 1.00, 20.0),
        run("b", 1e-3, 0, 0.91, 30.0),
        run("b", 3e-3, 0, 0.92, 5.0),
        run("c", 1e-3, 0, 0.40, 0.0),
        run("c", 3e-3, 0, 0.60, 2.0),
        # more seeds at the headline rates; seeds outside `seeds` and other rates are ignored
        run("a", 3e-3, 1, 0.85, 3.0),
        run("a", 3e-3, 2, 0.93, 12.0),
        run("a", 3e-3, 3, 0.10, 99.0),
        run("a", 1e-2, 1, 0.99, -50.0),
        run("b", 3e-3, 1, 0.80, 7.0),
        run("b", 3e-3, 2, 0.70, 6.0),
    ]
    target, heads = forgetting.headline(rows, ["a", "b", "c"], seeds=(0, 1, 2))
    assert target == pytest.approx(0.90)  # 0.9 x the best seed-0 run (a at 1e-2)
    # a: 3e-3 and 1e-2 reach 0.90; 3e-3 forgets less. Medians over seeds 0-2 at 3e-3.
    assert heads["a"]["lr"] == 3e-3 and heads["a"]["seeds"] == 3
    assert heads["a"]["forgetting"] == 9.0 and heads["a"]["task_score"] == 0.93
    assert heads["a"]["forgetting_range"] == [3.0, 12.0] and heads["a"]["reached_target"]
    # b: the rate is chosen on seed 0 (5.0 < 30.0), but its median task score over seeds (0.80) is below the target
    assert heads["b"]["lr"] == 3e-3 and heads["b"]["task_score"] == 0.80 and not heads["b"]["reached_target"]
    # c: never reaches the target: reported at its best task score, marked
    assert heads["c"]["lr"] == 3e-3 and heads["c"]["seeds"] == 1 and not heads["c"]["reached_target"]
    # `--seeds 1` asks for one more seed: seed 0 stays in the medians (an empty set of runs crashed the script)
    _, heads = forgetting.headline(rows, ["a", "c"], seeds=(1,))
    assert heads["a"]["seeds"] == 2 and heads["a"]["forgetting"] == 6.0 and heads["c"]["seeds"] == 1


def test_the_committed_attribution_caches_are_ones_loki_resumes():
    """The benchmarks' committed KVA caches record the model's fingerprint, so `loki.attribute(path=)` resumes them
    instead of refusing (`AttributionMismatchError`): a cache from before the fingerprint stopped every LoKI run
    of the benchmark until it was recomputed."""
    metas = sorted((ROOT / "benchmarks" / "results" / "attributions").glob("*/*/meta.json"))
    assert metas, "no committed attribution cache found"
    for path in metas:
        meta = json.loads(path.read_text())
        assert meta["format"] == "loki-attributions"
        assert len(meta.get("model_fingerprint", "")) == 64, f"{path} records no model fingerprint: recompute it"


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_in_both_regimes(tmp_path):
    """`--size smoke` trains and reports one LoKI run per regime with retain data, and the same rows scored through
    their scope, into its own folder: every code path of a run (training, the scope, the four numbers, the task
    score, the journal, the table and the last line)."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.forgetting", "--size", "smoke", "--retain", "on", "--rates", "0"]
    cmd += ["--methods", "loki_q10", "loki_scoped_q10"]  # the default rows, and the same rows through their scope
    done = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["regime"] == "knowledge, retain on" and set(last["blocks"]) == {"task, retain on"}
    assert last["loki_specificity"] is not None and last["blocks"]["task, retain on"]["loki_forgetting"] is not None
    runs = [json.loads(line) for line in (out / "forgetting-runs.jsonl").read_text().splitlines()]
    trained = [r for r in runs if r["method"] == "loki_q10"]
    assert {(r["regime"], r["retain"]) for r in trained} == {("knowledge", True), ("task", True)}
    assert all(r["answer_france"] for r in trained)
    scoped = [r for r in runs if r["method"] == "loki_scoped_q10"]
    assert {(r["regime"], r["retain"]) for r in scoped} == {("knowledge", True), ("task", True)}
    assert all(r["scope_keys"] > 0 and r["answer_france"] for r in scoped)
    # rerunning resumes: nothing is trained again, the same last line is printed
    again = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == last
    assert len((out / "forgetting-runs.jsonl").read_text().splitlines()) == len(runs)
