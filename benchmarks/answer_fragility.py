"""How fragile the demo's neighbourhood answers are: the specificity and whole answers kept after a change that
teaches nothing, random noise on the rows an implant would train.

For each relative size s, every selected row (q = 10 per layer, drawn at random, the same rows for every s) gets
Gaussian noise of standard deviation s times the standard deviation of that layer's selected base rows, and the demo's
implant suite scores the result against the base model (the facts are not learned, so efficacy stays at the base
model's). `relative_change` is the delta's Frobenius norm over the selected base rows' (the same measure that
`benchmarks/demo_levers.py` prints for a trained implant), so a trained implant can be placed on this curve.

    .venv/bin/python -m benchmarks.answer_fragility                     # s = 0.003, 0.01, 0.03, 0.1; 3 noise seeds
    .venv/bin/python -m benchmarks.answer_fragility --sizes 0.01 --seeds 0

Each result is printed and appended as one JSON line to `results/answer-fragility.jsonl`; docs/benchmarks/forgetting.md
quotes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import loki
from loki import facts as task
from loki.projections import find_down_projections

ROOT = Path(__file__).resolve().parent.parent


def noise_delta(model, selection: loki.Selection, size: float, seed: int) -> loki.Delta:
    """Base rows plus Gaussian noise of `size` times each layer's selected rows' standard deviation."""
    projs = find_down_projections(model)
    generator = torch.Generator().manual_seed(seed)
    changes = {}
    for layer, idx in selection.rows.items():
        rows = projs.rows(layer).index_select(0, idx).float()
        noise = torch.randn(rows.shape, generator=generator) * rows.std() * size
        changes[layer] = (idx, rows + noise)
    return loki.implant.make_delta(model, changes, name=f"noise-{size}")


def relative_change(model, delta: loki.Delta) -> float:
    """||new rows - base rows||_F / ||base rows||_F over all of the delta's layers."""
    projs = find_down_projections(model)
    moved = total = 0.0
    for layer, part in delta.layers.items():
        base = projs.rows(layer).index_select(0, part.indices).float()
        moved += (part.rows.float() - base).pow(2).sum().item()
        total += base.pow(2).sum().item()
    return (moved / total) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="*", default=[0.003, 0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = p.parse_args()
    model, tok = loki.load_default()
    size = task.SIZES["full"]
    facts = task.implant_facts(size["facts"])
    neighbours = task.retain_data(facts, task.RECIPE, size["eval_per_template"])[1]
    suite = task.implant_suite(facts, neighbours, size["general_items"])
    base = suite.scores(model, tok, progress=False)
    config = model.config
    selection = loki.Selection.random(config.num_hidden_layers, config.hidden_size, q=10, seed=0)
    for s in args.sizes:
        runs = []
        for seed in args.seeds:
            delta = noise_delta(model, selection, s, seed)
            report = suite.report(model, tok, delta, base=base, progress=False).as_dict()
            runs.append({"seed": seed, "relative_change": round(relative_change(model, delta), 5), **report})
            print(json.dumps(runs[-1]), flush=True)
        row = {
            "size": s,
            "seeds": args.seeds,
            **{
                key: statistics.median(r[key] for r in runs)
                for key in ("relative_change", "specificity", "answers_kept", "fluency", "forgetting")
            },
            "runs": runs,
        }
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        with open(ROOT / "benchmarks" / "results" / "answer-fragility.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
