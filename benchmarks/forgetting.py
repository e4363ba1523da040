"""Forgetting: what each method costs at a matched task score, in two regimes (the paper's Tables 4-5, small).

Regimes:
- `knowledge`: implant fictional facts (loki/data/implant_facts.jsonl; 2 training phrasings each, scored on a
  third, held-out phrasing), with and without retain data (the base model's answers to neighbourhood questions:
  the facts' templates about real entities, `loki.neighbourhood`). Four numbers per run: efficacy, generalisation
  (the task score), specificity (answers to *other* neighbourhood questions kept) and general forgetting.
- `task`: adapt to function calling, >= 1,000 real training examples whose answers are one-line JSON tool calls
  (benchmarks/data/wikidata_toolcall, built from BIG-bench qa_wikidata), without retain data (the paper's regime)
  and with it: the base model's own chat answers to questions that ask no capital (`chat_retain_data`), so world
  capitals, a chat set among the general ones, measures whether chat knowledge survives the new answer format.

Methods (same data, same retain data, same recipe `loki.train`): LoKI layer-balanced rows at q = 5, 10, 20, 30
ranked by signed score (as published) and by |score|; LoKI q=10 rows scored on the base model's answers to the
neighbourhood questions (`loki_nbhd_q10`), also trained under `loki.preservation` of the retain data
(`loki_keep_q10`: an energy share; `loki_contrast_q10`: the contrast rule), these three wherever there is retain data
(in the task regime its chat questions stand for the neighbourhood); LoKI* (q=10 rows as LoRA factors); full
fine-tuning; PEFT LoRA on all linear layers; random, global-lowest and global-highest rows at q = 10; random rows
at q = 20; the knowledge editors MEMIT and AlphaEdit (`loki.editors`, closed forms, no training: their "lr" is
MEMIT's lambda or AlphaEdit's regulariser).

Protocol: every method trains at every rate of its grid with seed 0. The target task score is 0.9 x the best
score of any run of the block (model, regime, retain); each method's headline is its rate with the lowest general
forgetting among its runs that reach the target, then rerun with more seeds (medians). A method that reaches the
target at no rate is reported at its best task score and marked. All runs are plotted.

    .venv/bin/python -m benchmarks.forgetting                          # default model, both regimes
    .venv/bin/python -m benchmarks.forgetting --model qwen --methods loki_q10 full lora random_q10 --seeds 0
    .venv/bin/python -m benchmarks.forgetting --size demo              # the demo's data: the figure it quotes
    .venv/bin/python -m benchmarks.forgetting --size quick             # small, minutes; --size smoke: code paths

Finished runs are journaled (results/forgetting-runs.jsonl), so an interrupted run resumes; rerunning with a
complete journal only reprints. Writes results/forgetting-<model>-<regime>.json, forgetting-<model>.png and a
markdown table; the last line is one JSON object (ratios of general forgetting at matched task score).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import loki
from loki import evaluate as ev
from loki import facts as task

ROOT = Path(__file__).resolve().parent.parent


RESULTS = ROOT / "benchmarks" / "results"
# Peak learning rates (cosine, 10% warm-up) per parameterisation.
GRID = {
    "rows": (1e-3, 3e-3, 1e-2),
    "rows_lora": (3e-3, 1e-2, 3e-2),
    "full": (3e-5, 1e-4, 3e-4),
    "lora": (1e-3, 3e-3, 1e-2),
    # the closed-form editors have no rate: their "lr" column is their strength knob, MEMIT's lambda (the
    # reference 15000, and lower: a stronger edit) and AlphaEdit's L2 regulariser (the reference 10, and lower)
    "memit": (15000.0, 500.0),
    "alphaedit": (10.0, 0.5),
}


PRESERVE_ENERGY = 0.99
CONTRAST_RATIO = 10.0


def _methods() -> dict[str, dict]:
    out = {}
    for q in (5, 10, 20, 30):
        out[f"loki_q{q}"] = dict(kind="rows", strategy="layer_balanced", score="signed", q=q)
        out[f"loki_abs_q{q}"] = dict(kind="rows", strategy="layer_balanced", score="abs", q=q)
    # KVA on the base model's answers to the retain half's neighbourhood questions (`RetainSet.prompts`)
    # instead of the probe set: the rows those answers rely on least (the task regime's: its chat retain questions).
    # In the knowledge regime with retain off the questions are still attributed, though not trained on; the task
    # regime runs it only with retain data.
    out["loki_nbhd_q10"] = dict(kind="rows", strategy="layer_balanced", score="signed", q=10, prompts="neighbourhood")
    # The default rows' delta applied only to the inputs its scope contains (`loki.scope` of the training examples
    # against the retain data; retain on): every other input runs on the base weights. Trained as loki_q10.
    out["loki_scoped_q10"] = dict(kind="rows", strategy="layer_balanced", score="signed", q=10, scope=True)
    out["loki_lora_q10"] = dict(kind="rows_lora", strategy="layer_balanced", score="signed", q=10, rank=16)
    # The same rows trained under `loki.preservation` (retain on) of the retain data and of every neighbourhood
    # question about the retain half of the entities (`task.preservation_questions`; the task regime's: of its chat
    # templates): the update kept off the key directions holding `preserve` of their down-projection inputs.
    out["loki_keep_q10"] = dict(
        kind="rows", strategy="layer_balanced", score="signed", q=10, prompts="neighbourhood", preserve=PRESERVE_ENERGY
    )
    # The same rows under the contrast rule (`loki.preservation(..., examples=)`): free only the key directions where
    # the training examples' keys (facts, or tool calls) outweigh those of the same preserved prompts `contrast` to 1.
    out["loki_contrast_q10"] = dict(
        kind="rows", strategy="layer_balanced", score="signed", q=10, prompts="neighbourhood", contrast=CONTRAST_RATIO
    )
    # The knowledge editors (loki.editors), their closed forms on layers 4-8, C0 / the null space from the shipped
    # Wikipedia text; knowledge regime. They do not train, so seeds do not change them.
    out["memit"] = dict(kind="memit")
    out["alphaedit"] = dict(kind="alphaedit")
    out["full"] = dict(kind="full")
    out["lora"] = dict(kind="lora", rank=8)
    for s in ("random", "global_lowest", "global_highest"):
        out[f"{s}_q10"] = dict(kind="rows", strategy=s, score="signed", q=10)
    out["random_q20"] = dict(kind="rows", strategy="random", score="signed", q=20)  # the control for loki_q20
    return out


METHODS = _methods()
LOKI = "loki_q10"  # the library's default configuration, compared in the last line
SCOPED = "loki_scoped_q10"  # the same, served through its scope; also in the last line
SCOPED_FIELDS = {
    "reached_target": "reached_target",
    "specificity": "specificity",
    "whole_answers_kept": "answers_kept",
    "forgetting": "forgetting",
}
DEMO_LOKI = "loki_nbhd_q10"  # at the demo's size: the demo's own recipe
FACT_RETAIN_WEIGHT = 6.0  # every journaled 24-fact run was measured at it; independent of the demo's recipe
SIZES = {
    # facts/task examples, steps, batch, seeds for the headline rate, probe prompts for KVA, items per general set,
    # retain weight (the demo's size follows its recipe)
    "full": dict(
        facts=24,
        task_train=1200,
        task_test=200,
        steps=40,
        task_steps=150,
        batch=8,
        seeds=(0, 1, 2),
        prompts=24,
        general_items=None,
        eval_per_template=4,
        retain_per_template=task.RECIPE["retain_per_template"],
        retain_weight=FACT_RETAIN_WEIGHT,
        regimes=("knowledge", "task"),
    ),
    "demo": dict(
        facts=8,
        steps=task.RECIPE["steps"],
        batch=task.RECIPE["batch_size"],
        seeds=(0, 1, 2),
        prompts=6,
        general_items=task.SIZES["full"]["general_items"],
        eval_per_template=4,
        retain_per_template=task.RECIPE["retain_per_template"],
        retain_weight=task.RECIPE["retain_weight"],
        regimes=("knowledge",),
    ),
    "quick": dict(
        facts=8,
        task_train=200,
        task_test=40,
        steps=12,
        task_steps=20,
        batch=4,
        seeds=(0,),
        prompts=2,
        general_items=8,
        eval_per_template=1,
        retain_per_template=1,
        retain_weight=FACT_RETAIN_WEIGHT,
        regimes=("knowledge", "task"),
    ),
    "smoke": dict(
        facts=1,
        task_train=4,
        task_test=2,
        steps=1,
        task_steps=1,
        batch=2,
        seeds=(0,),
        prompts=1,
        general_items=1,
        eval_per_template=1,
        retain_per_template=1,
        retain_weight=FACT_RETAIN_WEIGHT,
        regimes=("knowledge", "task"),
    ),
}
LOADERS = {"smollm2": lambda: loki.load_default(), "qwen": lambda: loki.models.load_qwen_coder()}


# -- one run ----------------------------------------------------------------------------------------------------
def neighbourhood_attributions(ctx):
    """KVA on the neighbourhood questions of the block's retain data (cached in ctx and on disk)."""
    if "attr_nbhd" not in ctx:
        retained = loki.retain.retain_set(ctx["model"], ctx["tokenizer"], ctx["retain_questions"], progress=False)
        ctx["attr_nbhd"] = task.neighbourhood_attributions(
            ctx["model"], ctx["tokenizer"], retained, 7, task.RECIPE["kva_per_item"], ctx["attr_folder"], False
        )
    return ctx["attr_nbhd"]


def selection_for(spec, ctx, projs, seed):
    if spec["strategy"] == "random":
        return loki.Selection.random(len(projs), projs.d_out, spec["q"], seed)
    attr = neighbourhood_attributions(ctx) if spec.get("prompts") == "neighbourhood" else ctx["attr"]
    return loki.select(attr, spec["q"], spec["strategy"], score=spec["score"])


def train_one(method, lr, steps, seed, ctx):
    """Train `method` from the base weights. Returns (trained copy or None, delta or None, trainable params)."""
    spec, model, tok = METHODS[method], ctx["model"], ctx["tokenizer"]
    if spec["kind"] in ("memit", "alphaedit"):  # "lr" is the editor's strength: MEMIT's lambda, AlphaEdit's reg
        facts = [{"question": f["train"], "subject": f["subject"], "answer": f["statement"]} for f in ctx["facts"]]
        if spec["kind"] == "memit":
            delta = loki.editors.memit(model, tok, facts, lam=lr)
        else:
            delta = loki.editors.alphaedit(model, tok, facts, reg=lr)
        return None, delta, sum(ld.rows.numel() for ld in delta.layers.values())
    options = dict(
        lr=lr,
        batch_size=ctx["batch"],
        max_steps=steps,
        seed=seed,
        progress=False,
        retain=ctx["retain"],
        retain_weight=ctx["retain_weight"],
        retain_batch_size=ctx.get("retain_batch_size"),
    )
    if spec["kind"] in ("full", "lora"):
        work = copy.deepcopy(model)
        if spec["kind"] == "lora":
            from peft import LoraConfig, get_peft_model

            work = get_peft_model(
                work,
                LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules="all-linear", lora_dropout=0.0),
            )
        else:
            work.requires_grad_(True)
        params = [p for p in work.parameters() if p.requires_grad]
        loki.train(work, tok, ctx["train_set"], params=params, **options)
        return work, None, sum(p.numel() for p in params)
    projs = loki.projections.find_down_projections(model)
    keep = None
    if ("preserve" in spec or "contrast" in spec) and ctx["retain"] is not None:  # once per block, on the base model
        rule = (
            dict(energy=spec["preserve"])
            if "preserve" in spec
            else dict(examples=ctx["train_set"], ratio=spec["contrast"])
        )
        if method not in ctx.setdefault("keep", {}):  # the retain data and every retain-half neighbourhood question
            ctx["keep"][method] = loki.preservation(
                model, tok, ctx["retain"] + ctx["preserve_questions"], progress=False, **rule
            )
        keep = ctx["keep"][method]
    loki.prepare(model, selection_for(spec, ctx, projs, seed), lora_rank=spec.get("rank"), seed=seed, preserve=keep)
    try:
        trainable = loki.implant.trainable_report(model).trainable
        loki.train(model, tok, ctx["train_set"], **options)
        delta = loki.extract(model, name=method)
    finally:
        loki.unprepare(model)
    return None, delta, trainable


def run_one(method, lr, steps, seed, ctx) -> dict:
    """Train and score one run: the journal row."""
    t = time.time()
    base_scores(ctx)  # on the base model, before any delta or scope is in place (computed once per block)
    trained, delta, trainable = train_one(method, lr, steps, seed, ctx)
    model, tok = ctx["model"], ctx["tokenizer"]
    target, deltas = (trained, ()) if trained is not None else (model, (delta,))
    scope = None
    if METHODS[method].get("scope"):  # on the base weights, the delta only where the scope's gate opens
        scope = loki.scope(model, tok, ctx["train_set"], ctx["retain"], progress=False)
        deltas = ()
    with loki.scoped(model, delta, scope) if scope else _nothing():
        row = score_one(method, lr, steps, seed, ctx, target, deltas)
    extra = {"scope_keys": len(scope)} if scope else {}
    return {**row, "trainable_params": trainable, **extra, "seconds": round(time.time() - t, 1)}


def score_one(method, lr, steps, seed, ctx, target, deltas) -> dict:
    """Score `target` with `deltas` applied (the journal row but its cost)."""
    model, tok = ctx["model"], ctx["tokenizer"]
    if ctx["regime"] == "knowledge":
        rep = ctx["suite"].report(target, tok, *deltas, base=base_scores(ctx), progress=False)
        scores = dict(
            task_score=rep.generalisation,
            efficacy=rep.efficacy,
            specificity=rep.specificity,
            answers_kept=rep.answers_kept,
            fluency=rep.fluency,
            forgetting=rep.forgetting,
            general=rep.tuned.general,
        )
    else:
        with loki.implanted(model, *deltas) if deltas else _nothing():
            general = ev.benchmark_scores(target, tok, ctx["general"], progress=False)
            task_score = ctx["task_score"](target, tok)
        scores = dict(
            task_score=task_score,
            efficacy=None,
            specificity=None,
            answers_kept=None,
            forgetting=ev.forgetting_score(base_scores(ctx), general),
            general=general,
        )
    with loki.implanted(model, *deltas) if deltas else _nothing():  # one general question, to show what changed
        said = ev.generate(target, tok, [task.QUESTION], chat=True, max_new_tokens=24, progress=False)[0]
    return {"method": method, "lr": lr, "steps": steps, "seed": seed, **scores, "answer_france": said}


def base_scores(ctx):
    """The base model's scores for the block (knowledge: `ImplantScores`; task: the general sets), computed once,
    when a run first needs them."""
    if "base" not in ctx:
        ctx["base"] = (
            ctx["suite"].scores(ctx["model"], ctx["tokenizer"], progress=False)
            if ctx["regime"] == "knowledge"
            else ev.benchmark_scores(ctx["model"], ctx["tokenizer"], ctx["general"], progress=False)
        )
    return ctx["base"]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- the journal ------------------------------------------------------------------------------------------------
class Journal:
    """Every finished run, one JSON line each, keyed by everything that defines it; reruns reuse them."""

    FIELDS = ("model", "regime", "size", "retain", "data", "method", "lr", "steps", "seed")

    def __init__(self, path: Path, fresh: bool = False, train: bool = True):
        self.path, self.train = path, train
        if fresh and path.exists():
            path.unlink()
        lines = path.read_text().splitlines() if path.exists() else []
        self.done = {self.key(r): r for r in map(json.loads, lines)}

    def rows(self, block: dict) -> list[dict]:
        """Every journaled run of `block` (any method, rate, seed), in the order they finished."""
        return [
            r for r in self.done.values() if r["method"] != "_base" and all(r.get(k) == v for k, v in block.items())
        ]

    def base_general(self, block: dict, fn) -> dict[str, float]:
        """The base model's general-set scores for `block`, journaled (a row with method "_base"), so reporting
        from the journal needs no model evaluation."""
        row = {**block, "method": "_base", "lr": None, "steps": None, "seed": None}
        key = self.key(row)
        if key not in self.done:
            self._add(key, {**row, "general": fn()})
        return self.done[key]["general"]

    def _add(self, key: tuple, row: dict) -> dict:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.done[key] = row
        return row

    def key(self, r) -> tuple:
        return tuple(r.get(k) for k in self.FIELDS)  # runs journaled before "data" existed match nothing now

    def run(self, block: dict, method, lr, steps, seed, fn) -> dict | None:
        """The journaled row of this run, trained first if missing (None when missing and training is off)."""
        row = {**block, "method": method, "lr": lr, "steps": steps, "seed": seed}
        key = self.key(row)
        if key not in self.done:
            if not self.train:
                return None
            row = self._add(key, {**row, **fn()})
            spec = "" if row["specificity"] is None else f" specificity={row['specificity']:.2f}"
            print(
                f"{block['regime']:>9} retain={block['retain']!s:>5} {method:>18} lr={lr:<7g} seed={seed} "
                f"task={row['task_score']:.2f}{spec} forgetting={row['forgetting']:+.2f}%  ({row['seconds']:.0f} s)",
                flush=True,
            )
        return self.done[key]


# -- the protocol -----------------------------------------------------------------------------------------------
def headline(rows: list[dict], methods: list[str], seeds) -> tuple[float, dict[str, dict]]:
    """The target task score and, per method, its chosen rate and the medians over seeds there."""
    grid = [r for r in rows if r["seed"] == 0]
    target = 0.9 * max(r["task_score"] for r in grid)
    out = {}
    for m in methods:
        mine = [r for r in grid if r["method"] == m]
        if not mine:
            continue
        ok = [r for r in mine if r["task_score"] >= target]
        pick = (
            min(ok, key=lambda r: (r["forgetting"], -r["task_score"]))
            if ok
            else max(mine, key=lambda r: r["task_score"])
        )
        runs = [
            r
            for r in rows
            if r["method"] == m and r["lr"] == pick["lr"] and r["steps"] == pick["steps"] and r["seed"] in {0, *seeds}
        ]  # seed 0 always: `--seeds 1` adds a seed, it does not drop the first
        med = lambda k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None  # noqa: E731
        # The rate is chosen on seed 0's grid; whether it reached the target is judged on the median shown.
        out[m] = {
            "lr": pick["lr"],
            "steps": pick["steps"],
            "reached_target": med("task_score") >= target,
            "seeds": len(runs),
            "task_score": med("task_score"),
            "efficacy": med("efficacy"),
            "specificity": med("specificity"),
            "answers_kept": med("answers_kept"),
            "fluency": statistics.median(r["fluency"] for r in runs)
            if all(r.get("fluency") is not None for r in runs)
            else None,
            "forgetting": med("forgetting"),
            "forgetting_range": [min(r["forgetting"] for r in runs), max(r["forgetting"] for r in runs)],
            "trainable_params": runs[0]["trainable_params"],
            "general": {k: statistics.median(r["general"][k] for r in runs) for k in runs[0]["general"]},
        }
    return target, out


def table(target: float, heads: dict[str, dict], base_general: dict[str, float]) -> str:
    sets = list(base_general)
    lines = [
        f"target task score: {target:.2f} (0.9 x the best run)",
        "",
        "| method | trainable | lr | seeds | task score | efficacy | specificity | whole answers kept | fluency "
        "| forgetting Avg (%) [range] | " + " | ".join(f"drop: {s} (%)" for s in sets) + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(sets),
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for m, h in heads.items():
        drops = [ev.forgetting_score([base_general[s]], [h["general"][s]]) for s in sets]
        lo, hi = h["forgetting_range"]
        lines.append(
            f"| {m}{'' if h['reached_target'] else ' (below target)'} | {h['trainable_params']:,} | "
            f"{h['lr']:g} | {h['seeds']} | {h['task_score']:.2f} | {fmt(h['efficacy'], '.2f')} | "
            f"{fmt(h['specificity'], '.2f')} | {fmt(h['answers_kept'], '.2f')} | "
            f"{fmt(h.get('fluency'), '.2f')} | {h['forgetting']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
            + " | ".join(f"{d:+.1f}" for d in drops)
            + " |"
        )
    return "\n".join(lines)


def plot(blocks: dict[str, tuple[list[dict], float]], path: Path, title: str) -> None:
    """One panel per block (regime, retain): every run, task score against general forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (name, (rows, target)) in zip(axes[0], blocks.items()):
        for i, m in enumerate(METHODS):
            mine = [r for r in rows if r["method"] == m]
            if mine:
                ax.scatter(
                    [r["forgetting"] for r in mine],
                    [r["task_score"] for r in mine],
                    s=22,
                    color=colors[i % len(colors)],
                    marker="os^Dv<>p*hXPd"[i % 13],
                    label=m,
                    alpha=0.8,
                )
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("general forgetting Avg (%)  (lower is better)")
        ax.set_ylabel("task score")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main -------------------------------------------------------------------------------------------------------
def knowledge_context(model, tok, size, retain_on: bool) -> dict:
    facts = task.implant_facts(size["facts"])
    recipe = {**task.RECIPE, "retain_per_template": size["retain_per_template"]}
    retain, neighbours = task.retain_data(facts, recipe, size["eval_per_template"])
    suite = task.implant_suite(facts, neighbours, size["general_items"])
    return dict(
        train_set=task.fact_training_set(facts),
        facts=facts,
        suite=suite,
        retain=retain if retain_on else None,
        retain_questions=[q for q in retain if isinstance(q, str)],
        preserve_questions=task.preservation_questions(facts),
        retain_weight=size["retain_weight"],
        retain_batch_size=task.RECIPE["retain_batch_size"],
    )


def chat_facts() -> list[dict]:
    """The facts whose templates ask no capital: their neighbourhood questions are the task regime's chat prompts
    (the facts themselves are not trained there)."""
    return [f for f in task.implant_facts() if f["relation"] != "capital"]


def chat_retain_data(size) -> list:
    """The task regime's retain data: the base model's own chat answers to neighbourhood questions about
    inventions, rivers and operas (the fact templates' retain half) plus the knowledge regime's prose snippets. No
    capital question: world capitals, scored as general forgetting, stays a chat set training never saw."""
    return task.retain_data(chat_facts(), {**task.RECIPE, "retain_per_template": size["retain_per_template"]}, 1)[0]


def task_context(model, tok, size, retain_on: bool) -> dict:
    from benchmarks.task import load_task, score

    train, test = load_task("wikidata_toolcall")
    test = test[: size["task_test"]]
    retain = chat_retain_data(size) if retain_on else None
    return dict(
        train_set=[{"prompt": r["prompt"], "answer": r["answer"]} for r in train[: size["task_train"]]],
        general=ev.general_suite(task.GENERAL + ("world_capitals",), n=size["general_items"]),
        task_score=lambda m, t: score(m, t, test),
        retain=retain,
        retain_questions=[q for q in retain or () if isinstance(q, str)],
        preserve_questions=task.preservation_questions(chat_facts()),
        retain_weight=size["retain_weight"] if retain_on else 0.0,
        retain_batch_size=task.RECIPE["retain_batch_size"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(LOADERS), default="smollm2")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--regimes", nargs="+", choices=("knowledge", "task"))
    p.add_argument(
        "--retain",
        nargs="+",
        choices=("on", "off"),
        help="with and/or without retain data (default: both; the demo's size: on)",
    )
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="only these methods (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds at each headline rate (default: the size's)")
    p.add_argument("--rates", nargs="+", type=int, help="only these positions of each rate grid (0 = lowest)")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        help="train at these peak rates instead of the grid (e.g. below it, where the lowest was best)",
    )
    p.add_argument("--no-grid", action="store_true", help="only report from the journal; train nothing")
    p.add_argument("--fresh", action="store_true", help="forget the journal")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    size = SIZES[args.size]
    seeds = tuple(args.seeds) if args.seeds is not None else size["seeds"]
    methods = args.methods or (["loki_q10", "loki_nbhd_q10", "full", "lora"] if args.size == "demo" else list(METHODS))
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    args.out.mkdir(parents=True, exist_ok=True)
    journal = Journal(args.out / "forgetting-runs.jsonl", args.fresh, train=not args.no_grid)

    model, tok = LOADERS[args.model]()
    attr = None
    if any(METHODS[m]["kind"] in ("rows", "rows_lora") and METHODS[m]["strategy"] != "random" for m in methods):
        t0 = time.time()
        attr = task.probe_attributions(model, tok, size["prompts"], 7, args.out / "attributions" / args.model)
        print(f"KVA on {size['prompts']} probe prompts: {time.time() - t0:.0f} s (cached)", flush=True)
    summary, blocks = {}, {}
    wanted = args.retain or (["on"] if args.size == "demo" else ["on", "off"])
    # Every block of the size is reported from the journal (so the committed JSON and plot always hold all of them);
    # only the blocks the flags ask for are trained.
    for regime in size["regimes"]:
        for retain_on in (True, False):
            asked = regime in (args.regimes or size["regimes"]) and ("on" if retain_on else "off") in wanted
            ctx = (
                knowledge_context(model, tok, size, retain_on)
                if regime == "knowledge"
                else task_context(model, tok, size, retain_on)
            )
            ctx.update(
                model=model,
                tokenizer=tok,
                attr=attr,
                regime=regime,
                batch=size["batch"],
                attr_folder=args.out / "attributions" / args.model,
            )
            steps = size["steps"] if regime == "knowledge" else size["task_steps"]
            block = {
                "model": args.model,
                "regime": regime,
                "size": args.size,
                "retain": retain_on,
                "data": task.data_digest(ctx["train_set"], ctx["retain"], ctx["retain_weight"]),
            }
            if args.size == "demo":  # the figures the demo quotes are for its own number of steps
                block["steps"] = steps
            if not asked and not journal.rows(block):
                continue
            base_general = journal.base_general(
                block, lambda: base_scores(ctx).general if regime == "knowledge" else base_scores(ctx)
            )
            # the editors write facts, not a task; rows scored on or kept off the retain questions need retain data
            not_for_the_task = lambda m: (
                METHODS[m]["kind"] in ("memit", "alphaedit")  # noqa: E731
                or ({"prompts", "preserve", "contrast"} & METHODS[m].keys() and not retain_on)
            )
            # a scope is kept off the retain data: it needs some, in either regime
            for m in (
                [
                    m
                    for m in methods
                    if (regime == "knowledge" or not not_for_the_task(m)) and (retain_on or "scope" not in METHODS[m])
                ]
                if asked
                else ()
            ):
                rates = (
                    (task.RECIPE["lr"],)
                    if args.size == "demo" and m in (LOKI, "loki_nbhd_q10")
                    else GRID[METHODS[m]["kind"]]
                )
                if args.rates and len(rates) > 1:
                    rates = tuple(rates[i] for i in args.rates)
                if args.lrs:
                    rates = tuple(args.lrs)
                for lr in rates:
                    journal.run(block, m, lr, steps, 0, lambda: run_one(m, lr, steps, 0, ctx))
            rows = journal.rows(block)
            if not rows:
                print(f"(no journaled run for {regime}, retain {retain_on}: nothing to report)", flush=True)
                continue
            target, heads = headline(rows, methods, seeds)
            for m, h in heads.items() if asked else ():  # more seeds at each method's headline rate
                for seed in seeds:
                    if seed != 0 and METHODS[m]["kind"] not in ("memit", "alphaedit"):  # editors are deterministic
                        journal.run(
                            block, m, h["lr"], h["steps"], seed, lambda: run_one(m, h["lr"], h["steps"], seed, ctx)
                        )
            rows = journal.rows(block)  # the table shows every journaled run of the block, not only this command's
            target, heads = headline(rows, [m for m in METHODS if any(r["method"] == m for r in rows)], seeds)
            # the task regime without retain data keeps its first name, "task" (the paper's regime)
            name = f"{regime}" + (
                f", retain {'on' if retain_on else 'off'}" if regime == "knowledge" or retain_on else ""
            )
            blocks[name] = (rows, target)
            print(f"\n### {args.model}, {name}\n\n" + table(target, heads, base_general) + "\n", flush=True)
            summary[name] = {"target": target, "base_general": base_general, "methods": heads, "data": block["data"]}
    if not summary:
        raise SystemExit("No run to report: train some first (without --no-grid).")
    out_name = f"forgetting-{args.model}" + ("" if args.size == "full" else f"-{args.size}")
    if args.size == "demo":
        first = next(iter(summary.values()))
        demo_text = json.dumps(
            {
                m: {
                    k: h[k] for k in ("lr", "steps", "seeds", "task_score", "specificity", "answers_kept", "forgetting")
                }
                | {"generalisation": h["task_score"]}
                for m, h in first["methods"].items()
            }
            # the command that made it, which `loki demo` prints as how to reproduce its figures (an installed
            # loki has no benchmarks folder, so the library never names one itself)
            | {"data": first["data"], "command": f"python -m benchmarks.forgetting --model {args.model} --size demo"},
            indent=1,
        )
        (args.out / "forgetting-demo.json").write_text(demo_text)
        if args.out.resolve() == RESULTS.resolve():  # the committed result: `loki demo` ships a copy (package data)
            (ROOT / "loki" / "data" / "forgetting-demo.json").write_text(demo_text)
    (args.out / f"{out_name}.json").write_text(json.dumps(summary, indent=1))
    plot(blocks, args.out / f"{out_name}.png", f"Forgetting at matched task score: {args.model}")
    print(json.dumps(last_line(args.model, args.size, summary)))


def last_line(model: str, size: str, summary: dict) -> dict:
    """The headline block's ratios of general forgetting at matched task score (lower is better), then every block's.
    `loki_*` fields are LoKI's default configuration (`LOKI`; at the demo's size the demo's recipe, `DEMO_LOKI`)."""
    LOKI = DEMO_LOKI if size == "demo" else globals()["LOKI"]  # noqa: N806

    def ratios(name: str) -> dict:
        h = summary[name]["methods"]
        ratio = lambda a, b: (
            round(h[a]["forgetting"] / h[b]["forgetting"], 3)  # noqa: E731
            if a in h and b in h and h[b]["forgetting"] > 0
            else None
        )
        # A ratio means nothing when the reference does not forget (<= 0): the differences (points) stay meaningful.
        minus = lambda a, b: round(h[a]["forgetting"] - h[b]["forgetting"], 3) if a in h and b in h else None  # noqa: E731
        return {
            "regime": name,
            "loki_method": LOKI,
            "loki_vs_full_forgetting": ratio(LOKI, "full"),
            "loki_vs_lora_forgetting": ratio(LOKI, "lora"),
            "loki_minus_full_forgetting_points": minus(LOKI, "full"),
            "loki_minus_lora_forgetting_points": minus(LOKI, "lora"),
            "loki_reached_target": h.get(LOKI, {}).get("reached_target"),
            "loki_forgetting": h.get(LOKI, {}).get("forgetting"),
            "full_forgetting": h.get("full", {}).get("forgetting"),
            "lora_forgetting": h.get("lora", {}).get("forgetting"),
            "loki_specificity": h.get(LOKI, {}).get("specificity"),
            "full_specificity": h.get("full", {}).get("specificity"),
            "lora_specificity": h.get("lora", {}).get("specificity"),
            "loki_whole_answers_kept": h.get(LOKI, {}).get("answers_kept"),
            "lora_whole_answers_kept": h.get("lora", {}).get("answers_kept"),
            "loki_vs_alphaedit_specificity": (
                round(h[LOKI]["specificity"] / h["alphaedit"]["specificity"], 3)
                if h.get(LOKI, {}).get("specificity") and h.get("alphaedit", {}).get("specificity")
                else None
            ),
            # the same rows served through their scope (`loki.scoped`)
            **{f"loki_scoped_{k}": h.get(SCOPED, {}).get(v) for k, v in SCOPED_FIELDS.items()},
        }

    names = list(summary)
    head = "knowledge, retain on" if "knowledge, retain on" in summary else names[0]
    return {
        "bench": "forgetting",
        "model": model,
        "size": size,
        **ratios(head),
        "blocks": {n: ratios(n) for n in names if n != head},
    }


if __name__ == "__main__":
    main()
