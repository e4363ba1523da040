"""Sequential implants: N small implants trained one after another, each on the model with the earlier ones applied,
then judged all together (the lifelong-editing setting, where locality matters most).

For each method, implant i (a few fictional facts) is trained on a copy of the default model into which implants
1..i-1 were merged (LoKI's rows and the editors' rows written in, LoRA merged, full fine-tuning continued), so every
implant may use the same rows as the earlier ones. After the last one, with every implant in
place: each implant's efficacy (its training phrasings answered) and generalisation (its held-out phrasing), and
the neighbourhood's specificity (answer tokens kept, whole answers unchanged), fluency and general forgetting against
the base model, with the demo's sets.

Methods: `loki` (the demo's recipe: rows from KVA on the neighbourhood, retain KL), `loki_scoped` (the same
implants, each with its `loki.scope` against the retain data, all served at once through `loki.scoped`: every row
computes with the implant whose scope it falls in, or with none; each implant trains on the base model, which is
what the model with the earlier implants scoped computes on its inputs wherever no earlier scope contains them),
`loki_contrast` (the same rows trained under `loki.preservation(..., examples=)`: the update only where this
implant's keys outweigh the preserved prompts' - the retain data, every retain-half neighbourhood question and the
earlier implants' own examples - by `--ratio`), `lora`, `full`, `memit`, `alphaedit` (its null space is the
Wikipedia keys' only: the earlier edits' keys, AlphaEdit's `Kp`, are not passed).

`--rehearse` (for the trained methods): each implant's retain set adds, to the base model's retain data, the
current model's distributions on the earlier implants' training examples (the earlier implants merged), so the
retain loss keeps the earlier facts as well as the neighbourhood, as a user adding an implant to a model that
already holds some would (`RetainSet.__add__`).

Every finished implant of LoKI and the editors is saved (`results/sequential/<method>[-rehearse]/<i>.loki`,
git-ignored) and every finished method journaled (`results/sequential-runs.jsonl`); rerunning resumes (LoRA and
full fine-tuning restart an unfinished sequence: their state is a whole model). The last line is one JSON object.

    .venv/bin/python -m benchmarks.sequential                         # 10 implants of 2 facts, every method
    .venv/bin/python -m benchmarks.sequential --methods loki loki_contrast --implants 3
    .venv/bin/python -m benchmarks.sequential --methods loki lora --rehearse
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import time
from pathlib import Path

import torch

import loki
from loki import evaluate as ev
from loki import facts as task

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JOURNAL = RESULTS / "sequential-runs.jsonl"
# Peak rates: the demo-size rates of the forgetting benchmark (its table) for rows, LoRA and full fine-tuning; the
# constrained rows need a higher one (docs/benchmarks/forgetting.md, "Preservation"); the editors' strength knobs.
RATES = {
    "loki": 2e-3,
    "loki_scoped": 2e-3,
    "loki_contrast": 1e-2,
    "lora": 3e-3,
    "full": 1e-4,
    "memit": 500.0,
    "alphaedit": 0.5,
}
METHODS = tuple(RATES)
TRAINED = ("loki", "loki_contrast", "lora", "full")  # the methods with a retain loss (`--rehearse` applies to them)


def rehearses(method: str, rehearse: bool) -> bool:
    """Whether `method` runs with rehearsal when `--rehearse` is `rehearse` (the editors have no retain loss)."""
    return rehearse and method in TRAINED


def journal_rows() -> list[dict]:
    if not JOURNAL.exists():
        return []
    return [json.loads(line) for line in JOURNAL.read_text().splitlines() if line.strip()]


def record(row: dict) -> None:
    JOURNAL.parent.mkdir(parents=True, exist_ok=True)
    with open(JOURNAL, "a") as f:
        f.write(json.dumps(row) + "\n")


def options_for(work, tok, ctx, earlier) -> dict:
    """`loki.train`'s options for the next implant. With `--rehearse`, the retain set is the base model's (the
    neighbourhood and prose, computed once) plus the current model's distributions on the earlier implants' training
    examples (`RetainSet.__add__`), so the retain loss keeps the earlier facts while the neighbourhood stays anchored
    to the base model."""
    if not ctx["rehearse"] or not earlier:
        return ctx["options"]
    examples = [ex for g in earlier for ex in task.fact_training_set(g)]
    retained = ctx["options"]["retain"] + loki.retain.retain_set(work, tok, examples, progress=False)
    return {**ctx["options"], "retain": retained}


def train_rows(model, tok, ctx, group, earlier, method, seed):
    """One LoKI implant on `model` (earlier implants applied): rows from the base model's neighbourhood KVA."""
    keep = None
    if method == "loki_contrast":  # the base model's answers (computed once) and the earlier implants' examples
        preserved = ctx["preserved"] + [ex for g in earlier for ex in task.fact_training_set(g)]
        keep = loki.preservation(
            model, tok, preserved, examples=task.fact_training_set(group), ratio=ctx["ratio"], progress=False
        )
    options = options_for(model, tok, ctx, earlier)
    loki.prepare(model, ctx["selection"], seed=seed, preserve=keep)
    try:
        loki.train(model, tok, task.fact_training_set(group), lr=RATES[method], seed=seed, **options)
        return loki.extract(model, name=f"{method}-{len(earlier)}")
    finally:
        loki.unprepare(model)


def train_copy(work, tok, ctx, group, earlier, method, seed):
    """One LoRA (merged afterwards) or full fine-tuning implant on `work`, in place; returns the new `work`."""
    options = options_for(work, tok, ctx, earlier)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        work = get_peft_model(work, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    else:
        work.requires_grad_(True)
    params = [p for p in work.parameters() if p.requires_grad]
    loki.train(work, tok, task.fact_training_set(group), params=params, lr=RATES[method], seed=seed, **options)
    if method == "lora":
        work = work.merge_and_unload()
    work.requires_grad_(False)
    return work.eval()


def edit(work, tok, group, method):
    """One MEMIT or AlphaEdit edit of `work` (the editors edit a model that holds no applied delta)."""
    facts = [{"question": f["train"], "subject": f["subject"], "answer": f["statement"]} for f in group]
    if method == "memit":
        return loki.editors.memit(work, tok, facts, lam=RATES[method])
    return loki.editors.alphaedit(work, tok, facts, reg=RATES[method])


def judge(target, tok, ctx, method, seconds) -> dict:
    """Every implant's efficacy and generalisation with all of them in place; the neighbourhood and general sets."""
    per = []
    for i, group in enumerate(ctx["groups"]):
        s = ev.benchmark_scores(
            target, tok, [task.fact_benchmark(group, "train"), task.fact_benchmark(group, "test")], progress=False
        )
        per.append({"implant": i, "efficacy": s["facts_train"], "generalisation": s["facts_test"]})
    rep = ctx["suite"].report(target, tok, base=ctx["base"], progress=False)
    france = ev.generate(target, tok, [task.QUESTION], chat=True, max_new_tokens=24, progress=False)[0]
    return {
        "method": method,
        "implants": len(ctx["groups"]),
        "facts_per_implant": ctx["per"],
        "lr": RATES[method],
        "ratio": ctx["ratio"] if method == "loki_contrast" else None,
        "rehearse": rehearses(method, ctx["rehearse"]),
        "min_efficacy": min(p["efficacy"] for p in per),
        "mean_efficacy": sum(p["efficacy"] for p in per) / len(per),
        "mean_generalisation": sum(p["generalisation"] for p in per) / len(per),
        "specificity": rep.specificity,
        "answers_kept": rep.answers_kept,
        "fluency": rep.fluency,
        "forgetting": rep.forgetting,
        "per_implant": per,
        "answer_france": france,
        "seconds": round(seconds),
    }


def run_method(model, tok, ctx, method, seed) -> dict:
    """The whole sequence on a copy of the model, each implant merged into it before the next one trains."""
    folder = RESULTS / "sequential" / (method + ("-rehearse" if rehearses(method, ctx["rehearse"]) else ""))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    work = copy.deepcopy(model)
    pairs = []  # loki_scoped: (delta, scope) of every implant so far, on the unchanged `work`
    for i, group in enumerate(ctx["groups"]):
        if method in ("lora", "full"):
            work = train_copy(work, tok, ctx, group, ctx["groups"][:i], method, seed)
        else:
            path = folder / f"{i}.loki"
            if path.exists() and json.loads(path.with_suffix(".json").read_text()) == ctx["key"]:
                delta = loki.load(path)  # journaled: resume after it
            else:
                if method == "loki_scoped":  # on the base model (see the module docstring)
                    delta = train_rows(work, tok, ctx, group, [], method, seed)
                elif method.startswith("loki"):
                    delta = train_rows(work, tok, ctx, group, ctx["groups"][:i], method, seed)
                else:
                    delta = edit(work, tok, group, method)
                loki.save(delta, path)
                path.with_suffix(".json").write_text(json.dumps(ctx["key"]))
            if method == "loki_scoped":
                examples = task.fact_training_set(group)
                pairs.append((delta, loki.scope(work, tok, examples, ctx["options"]["retain"], progress=False)))
            else:
                loki.apply(work, delta)
                loki.merge(work)  # baked in: the next implant may train the same rows
        print(f"{method}: implant {i + 1}/{len(ctx['groups'])} ({time.time() - t0:.0f} s)", flush=True)
    with loki.scoped(work, pairs) if pairs else contextlib.nullcontext():
        return judge(work, tok, ctx, method, time.time() - t0)


def label(row: dict) -> str:
    """A journaled run's name in the table: its method, and "(rehearse)" if it ran with `--rehearse` ("(rehearse,
    current)" for the first version of it, which took every retain distribution from the current model)."""
    rehearse = row.get("rehearse")
    return row["method"] + ("" if not rehearse else " (rehearse)" if rehearse is True else f" (rehearse, {rehearse})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--implants", type=int, default=10)
    p.add_argument("--per", type=int, default=2, help="facts per implant")
    p.add_argument("--steps", type=int, default=20, help="training steps per implant")
    p.add_argument("--ratio", type=float, default=loki.preserve.DEFAULT_RATIO, help="loki_contrast's ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="also retain the current model on the earlier implants' examples (trained methods; RetainSet.__add__)",
    )
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, tok = loki.load_default()
    facts = task.implant_facts(args.implants * args.per)
    recipe = task.RECIPE
    retain, neighbours = task.retain_data(facts, recipe, task.SIZES["full"]["eval_per_template"])
    ctx = {
        "facts": facts,
        "groups": [facts[i * args.per : (i + 1) * args.per] for i in range(args.implants)],
        "per": args.per,
        "ratio": args.ratio,
        "retain": retain,
        "rehearse": args.rehearse,
        "suite": task.implant_suite(facts, neighbours, task.SIZES["full"]["general_items"]),
    }
    ctx["key"] = {
        "implants": args.implants,
        "per": args.per,
        "steps": args.steps,
        "seed": args.seed,
        "ratio": args.ratio,
        **({"rehearse": True} if args.rehearse else {}),  # earlier runs' saved implants stay valid without it
    }
    retained = loki.retain.retain_set(model, tok, retain, progress=False)
    ctx["options"] = dict(
        batch_size=min(recipe["batch_size"], 2 * args.per),
        max_steps=args.steps,
        retain=retained,
        retain_weight=recipe["retain_weight"],
        retain_batch_size=recipe["retain_batch_size"],
        progress=False,
    )
    if "loki_contrast" in args.methods:  # token ids: no answer is generated again for each implant
        asked = loki.retain.retain_set(model, tok, retain + task.preservation_questions(facts), progress=False)
        ctx["preserved"] = [{"text": d.ids} for d in asked.distributions]
    # the demo's rows: KVA on the base model's answers to the demo's retain questions (cached with demo_levers')
    demo_retain = task.retain_data(task.implant_facts(task.SIZES["full"]["facts"]), recipe)[0]
    attr = task.neighbourhood_attributions(
        model,
        tok,
        loki.retain.retain_set(model, tok, demo_retain, progress=False),
        7,
        recipe["kva_per_item"],
        ROOT / "loki-demo" / "attributions",
        progress=False,
    )
    ctx["selection"] = loki.select(attr, recipe["q"], score=recipe["score"])
    ctx["base"] = ctx["suite"].scores(model, tok, progress=False)
    done = {
        (
            r["method"],
            r["implants"],
            r["facts_per_implant"],
            r.get("steps"),
            r.get("ratio"),
            r.get("rehearse", False),
        ): r
        for r in journal_rows()
    }
    rows = []
    for method in args.methods:
        ratio = args.ratio if method == "loki_contrast" else None
        key = (method, args.implants, args.per, args.steps, ratio, rehearses(method, args.rehearse))
        if key in done:
            rows.append(done[key])
            continue
        row = {**run_method(model, tok, ctx, method, args.seed), "steps": args.steps, "seed": args.seed}
        record(row)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_implant"}), flush=True)
    print(
        "| method | min efficacy | mean efficacy | generalisation | specificity | whole answers kept | fluency | "
        "forgetting | France |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {label(r)} | {r['min_efficacy']:.2f} | {r['mean_efficacy']:.2f} | {r['mean_generalisation']:.2f} "
            f"| {r['specificity']:.3f} | {r['answers_kept']:.2f} | {r['fluency']:.2f} | {r['forgetting']:+.2f}% "
            f"| {r['answer_france'][:40]} |"
        )
    by = {re.sub(r"\W+", "_", label(r)).strip("_"): r for r in rows}
    last = {"bench": "sequential", "implants": args.implants, "facts_per_implant": args.per}
    for m, r in by.items():
        last[f"{m}_min_efficacy"] = r["min_efficacy"]
        last[f"{m}_specificity"] = r["specificity"]
        last[f"{m}_whole_answers_kept"] = r["answers_kept"]
    print(json.dumps(last))


if __name__ == "__main__":
    main()
