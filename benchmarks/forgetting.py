"""Forgetting: implant fictional facts with LoKI and its competitors, and measure task score against damage.

The paper's Tables 4-5 at small scale: the default model (SmolLM2-135M-Instruct) learns the fictional facts of
loki/data/implant_facts.jsonl (2 training phrasings each, scored on a third, held-out phrasing) with the same
data, the same number of steps and the same recipe (`loki.train`), over several seeds. Methods: LoKI (layer-balanced
rows at q = 5, 10, 20, 30), LoKI* (q = 10 rows trained as LoRA factors), full fine-tuning, PEFT LoRA on all linear
layers, and the selection ablations global-lowest, global-highest and random rows at q = 10; plus `loki_abs`, not
one of the paper's: layer-balanced rows of smallest |attribution| at q = 10 (benchmarks/suppression.py shows why).
Damage is the paper's forgetting score over the general sets of loki/data/general/ (lower is better).

Learning rates are tuned first, per parameterisation (rows, rows as LoRA, LoRA, full): every rate of its grid trains
on other facts (the tuning facts, disjoint from the scored ones, same relations) with seed 0, and the rate with the
best held-out accuracy there wins (ties: the smaller rate). Tuning scores the task only (the general sets are the
expensive part); the sweep is plotted next to the results.

    .venv/bin/python benchmarks/forgetting.py            # the full run (about 80 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/forgetting.py --quick    # fewer facts, steps and items, one seed, no tuning

Writes benchmarks/results/forgetting.json (one object per run), forgetting.png (task score vs forgetting) and
prints a markdown table; the last line is one JSON object with the per-method medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import loki  # noqa: E402
from loki import evaluate as ev  # noqa: E402
from loki.demo import GENERAL, fact_benchmark, fact_training_set, implant_facts, probe_attributions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Peak learning rates (cosine, 10% warm-up) tried per parameterisation. Row training needs a much larger rate than
# full fine-tuning: it moves few parameters over few steps. The selection ablations and the other quotas train rows
# exactly like LoKI at q=10 and use its tuned rate, so they differ only in which rows train. A grid goes one step
# past its first 3 rates wherever the largest of those had not yet learned every tuning fact. --quick uses the
# second rate of each grid without tuning.
GRID = {"loki": (3e-4, 1e-3, 3e-3), "loki_lora": (1e-3, 3e-3, 1e-2, 3e-2), "full": (1e-5, 3e-5, 1e-4, 3e-4),
        "lora": (3e-4, 1e-3, 3e-3, 1e-2)}
TUNED_AS = {"loki": ("loki", 10), "global_lowest": ("loki", 10), "global_highest": ("loki", 10),
            "random": ("loki", 10), "loki_abs": ("loki", 10), "loki_lora": ("loki_lora", 10), "full": ("full", None),
            "lora": ("lora", None)}
SIZES = {  # general_items None = every item of each set; tune = facts for tuning (after the scored ones), 0 = none
    "full": dict(facts=12, tune=12, steps=40, batch=8, seeds=(0, 1, 2), prompts=24, general_items=None,
                 qs=(5, 10, 20, 30)),
    "quick": dict(facts=8, tune=0, steps=10, batch=4, seeds=(0,), prompts=2, general_items=8, qs=(5, 10, 20, 30)),
    "smoke": dict(facts=1, tune=1, steps=1, batch=2, seeds=(0,), prompts=1, general_items=1, qs=(10,)),  # code paths
}


def runs(qs):
    """(method, q) pairs of the experiment; q is None where it does not apply."""
    return ([("loki", q) for q in qs] + [("full", None), ("lora", None), ("loki_lora", 10)]
            + [(m, 10) for m in ("random", "global_lowest", "global_highest", "loki_abs")])


def train_one(method, q, seed, model, tokenizer, attr, train_set, lr, steps, batch):
    """Train one method from the base weights. Returns (trained model or None, delta or None, trainable params):
    LoKI-style methods give a delta on `model` (left unchanged), full fine-tuning and LoRA a trained copy."""
    projs = loki.find_down_projections(model)
    if method in ("full", "lora"):
        work = copy.deepcopy(model)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            work = get_peft_model(work, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        else:
            work.requires_grad_(True)
        params = [p for p in work.parameters() if p.requires_grad]
        loki.train(work, tokenizer, train_set, params=params, lr=lr, batch_size=batch, max_steps=steps, seed=seed,
                   progress=False)
        return work, None, sum(p.numel() for p in params)
    if method == "random":
        selection = loki.Selection.random(len(projs), projs.d_out, q, seed)
    elif method == "loki_abs":  # not the paper's: layer-balanced by smallest |attribution| (see suppression.py)
        selection = loki.select(attr.values.abs(), q)
    else:
        selection = loki.select(attr, q, "layer_balanced" if method in ("loki", "loki_lora") else method)
    loki.prepare(model, selection, lora_rank=16 if method == "loki_lora" else None, seed=seed)
    trainable = loki.trainable_report(model).trainable
    loki.train(model, tokenizer, train_set, lr=lr, batch_size=batch, max_steps=steps, seed=seed, progress=False)
    delta = loki.extract(model, name=f"{method}-q{q}")
    loki.unprepare(model)
    return None, delta, trainable


def score(model, tokenizer, trained, delta, benchmarks) -> dict[str, float]:
    """Scores on `benchmarks` of the trained copy, or of `model` with `delta` applied (and reverted after)."""
    if trained is not None:
        return ev.evaluate(trained, tokenizer, benchmarks, progress=False)
    return ev.evaluate(model, tokenizer, benchmarks, delta, progress=False)


def run_one(method, q, seed, model, tokenizer, attr, train_set, heldout, suite, base, lr, steps, batch):
    """Train one method and score it: the result row."""
    trained, delta, trainable = train_one(method, q, seed, model, tokenizer, attr, train_set, lr, steps, batch)
    scores = score(model, tokenizer, trained, delta, [heldout, *suite])
    task = scores.pop(heldout.name)
    forgetting = ev.forgetting_score(base, scores) if suite else None  # tuning runs score the task only
    return {"method": method, "q": q, "seed": seed, "trainable_params": trainable, "task_score": task,
            "forgetting_avg": forgetting, "general": scores, "lr": lr}


def groups(rows, by=("method", "q")) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    return out


def spread(values) -> str:
    """Median, with the range over seeds when there are several."""
    values = sorted(values)
    mid = statistics.median(values)
    return f"{mid:+.2f}" if len(values) == 1 else f"{mid:+.2f} [{values[0]:+.2f}, {values[-1]:+.2f}]"


def table(rows, base: dict[str, float], other_rates=()) -> str:
    """One line per method: medians [ranges] over seeds, then each general set's own drop (% of its base score).
    `other_rates`: scored runs of the same methods at rates other than the tuned one, one line each (rate marked)."""
    sets = list(base)
    lines = ["| method | q | trainable params | lr | held-out task score | forgetting Avg (%) | "
             + " | ".join(f"drop: {s} (%)" for s in sets) + " | seeds |",
             "|---|---|---:|---:|---|---|" + "---:|" * len(sets) + "---:|"]
    tuned = {(r["method"], r["q"]): r["lr"] for r in rows}
    for (method, q, lr), rs in groups([*rows, *other_rates], by=("method", "q", "lr")).items():
        rate = f"{lr:g}" if tuned.get((method, q)) == lr else f"{lr:g} (not the tuned rate)"
        task = spread(r["task_score"] for r in rs).replace("+", "")
        drops = [statistics.median(ev.forgetting_score([base[s]], [r["general"][s]]) for r in rs) for s in sets]
        lines.append(f"| {method} | {q if q is not None else '-'} | {rs[0]['trainable_params']:,} | {rate} | "
                     f"{task} | {spread(r['forgetting_avg'] for r in rs)} | "
                     + " | ".join(f"{d:+.1f}" for d in drops) + f" | {len(rs)} |")
    return "\n".join(lines)


def plot(rows, sweep, path: Path) -> None:
    """Left: the scored runs (median over seeds, bars = range). Right: the learning-rate sweep on the tuning facts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6.5, 4.8), squeeze=False)
    ax = axes[0, 0]
    colors = plt.get_cmap("tab20").colors
    for i, ((method, q), rs) in enumerate(groups(rows).items()):
        f = [r["forgetting_avg"] for r in rs]
        t = [r["task_score"] for r in rs]
        x, y = statistics.median(f), statistics.median(t)
        ax.errorbar(x, y, xerr=[[x - min(f)], [max(f) - x]], yerr=[[y - min(t)], [max(t) - y]], capsize=3,
                    fmt="os^Dv<>p*hX"[i % 11], color=colors[i % len(colors)], alpha=0.85,
                    label=method + (f" q={q:g}" if q is not None else ""))
    ax.set_title("Scored facts (median over seeds, bars: range)")
    if sweep:
        ax2 = axes[0, 1]
        for (method, q), rs in groups(sweep).items():
            rs = sorted(rs, key=lambda r: r["lr"])
            ax2.plot([r["lr"] for r in rs], [r["task_score"] for r in rs], "o-", alpha=0.8,
                     label=method + (f" q={q:g}" if q is not None else ""))
        ax2.set_xscale("log")
        ax2.set_xlabel("peak learning rate")
        ax2.set_ylabel("held-out accuracy on the tuning facts")
        ax2.legend(fontsize=7)
        ax2.set_title("Learning-rate sweep (seed 0, tuning facts)")
    for a in axes[0, :1]:
        a.set_xlabel("forgetting score Avg (%)  (lower is better)")
        a.set_ylabel("held-out fact accuracy")
        a.axvline(0, color="grey", lw=0.5)
        a.legend(fontsize=7)
    fig.suptitle("Implanting fictional facts into SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class Journal:
    """Every finished run, one JSON line each, so an interrupted run resumes where it stopped (same size only)."""

    def __init__(self, path: Path, size_name: str, fresh: bool):
        self.path, self.size = path, size_name
        if fresh and path.exists():
            path.unlink()
        lines = path.read_text().splitlines() if path.exists() else []
        self.done = {self.key(r): r for r in map(json.loads, lines) if r.get("size") == size_name}

    @staticmethod
    def key(r) -> tuple:
        return r["phase"], r["method"], r["q"], r["seed"], r["lr"]

    def run(self, phase, method, q, seed, lr, fn):
        key = (phase, method, q, seed, lr)
        if key not in self.done:
            t = time.time()
            row = {"phase": phase, "size": self.size, **fn()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.done[key] = row
            forgetting = "" if row["forgetting_avg"] is None else f" forgetting={row['forgetting_avg']:+.2f}%"
            print(f"{phase:>5} {method:>15} q={q!s:>4} seed={seed} lr={lr:g} params={row['trainable_params']:>11,} "
                  f"task={row['task_score']:.2f}{forgetting}  ({time.time() - t:.0f} s)", flush=True)
        return self.done[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer facts, steps and items, one seed, no tuning")
    p.add_argument("--smoke", action="store_true", help="one step, one item each: checks the code paths only")
    p.add_argument("--methods", nargs="*", help="only these methods")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="use this rate (no tuning for METHOD)")
    p.add_argument("--seeds", nargs="+", type=int, help="these seeds (default: the size's); finished runs are reused")
    p.add_argument("--fresh", action="store_true", help="ignore the journal of finished runs (default: resume)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    size_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[size_name]
    fixed = {k: float(v) for k, v in (s.split("=") for s in args.lr)}
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    args.out.mkdir(parents=True, exist_ok=True)
    journal = Journal(args.out / f"forgetting-runs-{size_name}.jsonl", size_name, args.fresh)

    model, tokenizer = loki.load_default()
    t0 = time.time()
    attr = probe_attributions(model, tokenizer, size["prompts"], 7, args.out / "attributions")
    print(f"attribution of {size['prompts']} probe prompts: {time.time() - t0:.0f} s (cached in {args.out})")
    facts = implant_facts(size["facts"] + size["tune"])
    scored, tuning = facts[: size["facts"]], facts[size["facts"]:]
    suite = ev.general_suite(GENERAL, n=size["general_items"])
    base = ev.evaluate(model, tokenizer, suite)
    dropped = [b.name for b in suite if base[b.name] <= 0]  # the forgetting score divides by the base score
    if dropped:
        print(f"dropping general sets the base model scores 0 on: {dropped}")
        suite = [b for b in suite if b.name not in dropped]
        base = {k: v for k, v in base.items() if k not in dropped}
    base_task = fact_benchmark(scored).score(model, tokenizer, progress=False)
    print(f"base model: held-out task score {base_task:.2f}, general {json.dumps(base)}")

    def run(phase, method, q, seed, lr, fact_set):
        return journal.run(phase, method, q, seed, lr, lambda: run_one(
            method, q, seed, model, tokenizer, attr, fact_training_set(fact_set), fact_benchmark(fact_set),
            suite if phase == "test" else [], base, lr, size["steps"], size["batch"]))

    plan = [(m, q) for m, q in runs(size["qs"]) if not args.methods or m in args.methods]
    lrs, sweep = {}, []
    for method, q in dict.fromkeys(TUNED_AS[m] for m, _ in plan):  # tuning: seed 0, on the tuning facts
        grid = (fixed[method],) if method in fixed else GRID[method] if tuning else GRID[method][1:2]
        tried = [run("tune", method, q, 0, lr, tuning) for lr in grid] if tuning and len(grid) > 1 else []
        sweep += tried
        lrs[method] = max(tried, key=lambda r: (r["task_score"], -r["lr"]))["lr"] if tried else grid[0]
    lrs = {(m, q): fixed.get(m, lrs[TUNED_AS[m][0]]) for m, q in plan}
    seeds = args.seeds if args.seeds is not None else size["seeds"]
    rows = [run("test", method, q, seed, lrs[(method, q)], scored) for seed in seeds for method, q in plan]
    # Scored runs at other rates, left in the journal by earlier grids or --lr: shown, never used for the medians.
    other_rates = [r for r in journal.done.values() if r["phase"] == "test" and (r["method"], r["q"]) in lrs
                   and r["seed"] in seeds and r["lr"] != lrs[(r["method"], r["q"])]]

    (args.out / "forgetting.json").write_text(json.dumps(
        [{k: r[k] for k in ("method", "q", "seed", "trainable_params", "task_score", "forgetting_avg", "lr")}
         for r in rows], indent=1))
    (args.out / "forgetting-details.json").write_text(json.dumps(
        {"size": size, "seeds": seeds, "grid": GRID,
         "lr": {f"{m}" + (f"_q{q}" if q else ""): lr for (m, q), lr in lrs.items()},
         "base": {"task_score": base_task, "general": base}, "tuning": sweep, "runs": rows,
         "runs_at_other_rates": other_rates}, indent=1))
    report(rows, sweep, base, other_rates, args.out)


def report(rows, sweep, base: dict[str, float], other_rates, out: Path) -> None:
    """Write the plot, print the markdown table and, last, one JSON line of per-method medians."""
    plot(rows, sweep, out / "forgetting.png")
    print("\n" + table(rows, base, other_rates) + "\n")
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['method']}" + (f"_q{r['q']}" if r["q"] is not None else ""), []).append(r)
    print(json.dumps({k: {"task_score": statistics.median(x["task_score"] for x in v),
                          "forgetting_avg": statistics.median(x["forgetting_avg"] for x in v),
                          "trainable_params": v[0]["trainable_params"]} for k, v in summary.items()}))


if __name__ == "__main__":
    main()
