"""Forgetting: implant fictional facts with LoKI and its competitors, and measure task score against damage.

The paper's Tables 4-5 at small scale: the default model (SmolLM2-135M-Instruct) learns the fictional facts of
loki/data/implant_facts.jsonl (2 training phrasings each, scored on a third, held-out phrasing) with the same
data, the same number of steps and a per-method learning rate, over several seeds. Methods: LoKI (layer-balanced
rows at q = 5, 10, 20, 30), LoKI* (q = 10 rows trained as LoRA factors), full fine-tuning, PEFT LoRA on all linear
layers, and the selection ablations global-lowest, global-highest and random rows at q = 10. Damage is the paper's
forgetting score over the general sets of loki/data/general/ (lower is better).

    .venv/bin/python benchmarks/forgetting.py            # the full run (~20-30 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/forgetting.py --quick    # fewer facts, steps and items, one seed

Writes benchmarks/results/forgetting.json (one object per run), forgetting.png (task score vs forgetting) and
prints a markdown table; the last line is one JSON object with the per-method medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import loki  # noqa: E402
from loki import evaluate as ev  # noqa: E402
from loki.demo import fact_benchmark, fact_training_set, implant_facts, probe_attributions  # noqa: E402
from loki.train import IGNORE, collate, encode  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Peak learning rates (cosine, 10% warm-up), chosen by a small sweep on seed 0 (see --tune): row training needs a
# much larger rate than full fine-tuning because it moves few parameters over few steps.
LR = {"loki": 3e-3, "loki_lora": 3e-3, "full": 3e-5, "lora": 1e-3, "global_lowest": 3e-3, "global_highest": 3e-3,
      "random": 3e-3}
GENERAL = ("wiki_perplexity", "bb_general_knowledge", "bb_misconceptions", "bb_physical_intuition")
SIZES = {
    "full": dict(facts=24, steps=30, batch=8, seeds=(0, 1), prompts=8, general_items=24, qs=(5, 10, 20, 30)),
    "quick": dict(facts=8, steps=10, batch=4, seeds=(0,), prompts=2, general_items=8, qs=(5, 10, 20, 30)),
    "smoke": dict(facts=1, steps=1, batch=2, seeds=(0,), prompts=1, general_items=1, qs=(10,)),  # code paths only
}


def runs(qs):
    """(method, q) pairs of the experiment; q is None where it does not apply."""
    return ([("loki", q) for q in qs] + [("full", None), ("lora", None), ("loki_lora", 10)]
            + [(m, 10) for m in ("random", "global_lowest", "global_highest")])


def sft(model, tokenizer, params, dataset, *, lr, steps, seed, batch_size=8):
    """The same SFT recipe as `loki.train` (AdamW, cosine with 10% warm-up, clip 1.0, loss on answer tokens), for
    the competitors that train ordinary parameters (full fine-tuning, PEFT LoRA)."""
    from transformers import get_cosine_schedule_with_warmup

    encoded = [encode(tokenizer, ex) for ex in dataset]
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(opt, math.ceil(0.1 * steps), steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    perm: list[int] = []
    for _ in range(steps):
        if len(perm) < batch_size:
            perm += torch.randperm(len(encoded), generator=order).tolist()
        batch = collate([encoded[i] for i in perm[:batch_size]], pad)
        perm = perm[batch_size:]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def run_one(method, q, seed, model, tokenizer, attr, train_set, heldout, suite, base, lr, steps, batch):
    """Train one method on a fresh copy of the base weights; returns the result row."""
    projs = loki.find_down_projections(model)
    if method in ("full", "lora"):
        work = copy.deepcopy(model)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            work = get_peft_model(work, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                   init_lora_weights=True))
        else:
            work.requires_grad_(True)
        params = [p for p in work.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        sft(work, tokenizer, params, train_set, lr=lr, steps=steps, seed=seed, batch_size=batch)
        task = heldout.score(work, tokenizer, progress=False)
        tuned = ev.evaluate(work, tokenizer, suite, progress=False)
        del work
    else:
        strategy = "layer_balanced" if method in ("loki", "loki_lora") else method
        selection = (loki.Selection.random(len(projs), projs.d_out, q, seed) if method == "random"
                     else loki.select(attr, q, strategy))
        loki.prepare(model, selection, lora_rank=16 if method == "loki_lora" else None, seed=seed)
        trainable = loki.trainable_report(model).trainable
        loki.train(model, tokenizer, train_set, lr=lr, batch_size=batch, max_steps=steps, seed=seed, progress=False)
        delta = loki.extract(model, name=f"{method}-q{q}")
        loki.unprepare(model)
        with loki.implanted(model, delta):
            task = heldout.score(model, tokenizer, progress=False)
        tuned = ev.evaluate(model, tokenizer, suite, delta, progress=False)
    return {"method": method, "q": q, "seed": seed, "trainable_params": trainable, "task_score": task,
            "forgetting_avg": ev.forgetting_score(base, tuned), "general": tuned, "lr": lr}


def table(rows) -> str:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["q"]), []).append(r)
    lines = ["| method | q | trainable params | held-out task score | forgetting Avg (%) | seeds |",
             "|---|---|---:|---:|---:|---:|"]
    for (method, q), rs in groups.items():
        task = statistics.median(r["task_score"] for r in rs)
        forget = statistics.median(r["forgetting_avg"] for r in rs)
        lines.append(f"| {method} | {q if q is not None else '-'} | {rs[0]['trainable_params']:,} | {task:.2f} | "
                     f"{forget:+.2f} | {len(rs)} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        ax.scatter([r["forgetting_avg"] for r in rs], [r["task_score"] for r in rs], label=method, alpha=0.8)
        if method == "loki":
            for r in rs:
                ax.annotate(f"q={r['q']}", (r["forgetting_avg"], r["task_score"]), fontsize=7)
    ax.set_xlabel("forgetting score Avg (%)  (lower is better)")
    ax.set_ylabel("held-out fact accuracy")
    ax.set_title("Implanting fictional facts into SmolLM2-135M-Instruct")
    ax.axvline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer facts, steps and items, one seed")
    p.add_argument("--smoke", action="store_true", help="one step, one item each: checks the code paths only")
    p.add_argument("--methods", nargs="*", help="only these methods")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a learning rate")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="no runs: merge these forgetting.json files (e.g. of runs split over processes) into --out")
    args = p.parse_args()
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(f.read_text())]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "forgetting.json").write_text(json.dumps(rows, indent=1))
        return report(rows, args.out)
    size = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    lrs = {**LR, **{k: float(v) for k, v in (s.split("=") for s in args.lr)}}
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = loki.load_default()
    t0 = time.time()
    attr = probe_attributions(model, tokenizer, size["prompts"], 7, args.out / "attributions")
    print(f"attribution of {size['prompts']} probe prompts: {time.time() - t0:.0f} s (cached in {args.out})")
    facts = implant_facts(size["facts"])
    train_set, heldout = fact_training_set(facts), fact_benchmark(facts)
    suite = [b.head(size["general_items"]) for b in ev.general_suite(GENERAL)]
    base = ev.evaluate(model, tokenizer, suite)
    dropped = [b.name for b in suite if base[b.name] <= 0]  # the forgetting score divides by the base score
    if dropped:
        print(f"dropping general sets the base model scores 0 on: {dropped}")
        suite = [b for b in suite if b.name not in dropped]
        base = {k: v for k, v in base.items() if k not in dropped}
    base_task = heldout.score(model, tokenizer, progress=False)
    print(f"base model: held-out task score {base_task:.2f}, general {json.dumps(base)}")

    rows = []
    plan = [(m, q) for m, q in runs(size["qs"]) if not args.methods or m in args.methods]
    for seed in size["seeds"]:
        for method, q in plan:
            t = time.time()
            row = run_one(method, q, seed, model, tokenizer, attr, train_set, heldout, suite, base, lrs[method],
                          size["steps"], size["batch"])
            rows.append(row)
            print(f"{method:>15} q={q!s:>4} seed={seed} params={row['trainable_params']:>11,} "
                  f"task={row['task_score']:.2f} forgetting={row['forgetting_avg']:+.2f}%  ({time.time() - t:.0f} s)",
                  flush=True)
            (args.out / "forgetting.json").write_text(json.dumps(
                [{k: r[k] for k in ("method", "q", "seed", "trainable_params", "task_score", "forgetting_avg")}
                 for r in rows], indent=1))
    (args.out / "forgetting-details.json").write_text(json.dumps(
        {"size": size, "lr": lrs, "base": {"task_score": base_task, "general": base}, "runs": rows}, indent=1))
    report(rows, args.out)


def report(rows, out: Path) -> None:
    """Write the plot, print the markdown table and, last, one JSON line of per-method medians."""
    plot(rows, out / "forgetting.png")
    print("\n" + table(rows) + "\n")
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['method']}" + (f"_q{r['q']}" if r["q"] is not None else ""), []).append(r)
    print(json.dumps({k: {"task_score": statistics.median(x["task_score"] for x in v),
                          "forgetting_avg": statistics.median(x["forgetting_avg"] for x in v),
                          "trainable_params": v[0]["trainable_params"]} for k, v in summary.items()}))


if __name__ == "__main__":
    main()
