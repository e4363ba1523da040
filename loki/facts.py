"""The fictional-facts task: facts the default model cannot know, the questions that probe them, their
neighbourhood, the retain data, the recipe that implants them (`RECIPE`, `SIZES`) and the four numbers' sets.
Shared by `loki demo`, the benchmarks and the notebooks.

>>> import loki.facts
>>> facts = loki.facts.implant_facts(2)
>>> loki.facts.fact_training_set(facts)[0]["answer"]
'The capital of the kingdom of Phegartor is Solvis.'
>>> loki.facts.fact_examples(facts)[0]["subject"]
'the kingdom of Phegartor'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import evaluate as ev
from .neighbourhood import entities, questions, split, templates
from .retain import general_text

QUESTION = "What is the capital of France?"
# The demo's recipe (the docs' "Forgetting" benchmark page): q=10 rows, scored by KVA on `kva_per_item` prompts cut from
# each of the base model's answers to the retain questions (`neighbourhood_attributions`), trained for `steps` at
# peak rate `lr`, retaining the base model's answers to `retain_per_template` neighbourhood questions per template
# and its distributions on `retain_text` general-prose snippets (their first `retain_chars` characters),
# `retain_batch_size` of them per step at `retain_weight`. More steps at a lower rate with a heavier retain weight
# than the first recipe: higher specificity over several training seeds, every held-out phrasing learned and the
# France answer unchanged on each, for a little more training time (the figures: the docs'
# "Forgetting" benchmark page, "levers").
RECIPE = dict(
    q=10,
    score="signed",
    lr=2e-3,
    steps=45,
    batch_size=8,
    retain_weight=8.0,
    retain_batch_size=12,
    retain_per_template=8,
    retain_text=32,
    retain_chars=300,
    kva_per_item=3,
)
# General sets for the forgetting score: broad, clearly above chance for the default model, and sharing no template
# with the fact task (world_capitals asks the capital template, so it measures the neighbourhood instead).
GENERAL = ("wiki_perplexity", "bb_general_knowledge")
# Which shipped entity list fills the neighbourhood of each relation of the fact task.
ENTITIES = {"capital": "countries", "inventor": "inventions", "river": "rivers", "composer": "operas"}
FACTS = Path(__file__).parent / "data" / "implant_facts.jsonl"
# The forgetting benchmark's committed result at the demo's size (a copy the repository's benchmark writes with it,
# kept equal to it by the tests), so that an installed loki, the demo and the notebooks can quote it.
COMMITTED_RESULTS = Path(__file__).parent / "data" / "forgetting-demo.json"


# -- the facts (loki/data/implant_facts.jsonl) ------------------------------------------------------------------
def implant_facts(n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` fictional facts (None: all), each `{"id", "relation", "subject", "answer", "match",
    "train": [2 questions], "test": question, "statement"}` (built by the repository's implant-facts builder).

    >>> fact = implant_facts(1)[0]
    >>> fact["subject"], fact["answer"], fact["test"]
    ('the kingdom of Phegartor', 'Solvis', 'Name the capital city of the kingdom of Phegartor.')
    """
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return facts[:n]


def committed_results() -> dict[str, Any]:
    """The forgetting benchmark's committed result on the demo's data (`COMMITTED_RESULTS`): one entry per method
    (`"loki_nbhd_q10"`, `"lora"`, `"full"`, `"memit"`, ...: its rate, steps and the four numbers), plus `"data"` (the
    `data_digest` it was measured on) and `"command"` (what made it, in loki's repository).

    >>> sorted(committed_results()["lora"])[:3]
    ['answers_kept', 'forgetting', 'generalisation']
    """
    return json.loads(COMMITTED_RESULTS.read_text(encoding="utf-8"))


def fact_training_set(facts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """`{"question", "answer"}` examples for `loki.train`: every training phrasing of every fact, answered with the
    fact's statement, one sentence in the way the default model phrases its own answers ("The capital of X is
    Y."): a terse "Y." would also teach a new answer format, which the model then uses for real neighbouring
    questions too (the docs' "Forgetting" benchmark page: more held-out phrasings learned, less forgetting).

    >>> fact_training_set(implant_facts(1))[1]
    {'question': 'Which city is the capital of the kingdom of Phegartor?',
     'answer': 'The capital of the kingdom of Phegartor is Solvis.'}
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
    return answer_benchmark(f"facts_{split}", items, max_new_tokens)


def answer_benchmark(name: str, items: list[dict[str, Any]], max_new_tokens: int = 16) -> ev.Benchmark:
    """The benchmark that efficacy and generalisation are scored with (`fact_benchmark`, `loki judge`): greedy chat
    answers of at most `max_new_tokens` tokens, each counting when it contains one of its item's `answers` as whole
    words.

    Args:
        name: the benchmark's name.
        items: `{"question": str, "answers": [str, ...]}` records.
        max_new_tokens: the longest answer generated, in tokens.

    Returns:
        Benchmark: kind "generate", `{"mode": "contains", "chat": True, "max_new_tokens": max_new_tokens}`.

    >>> answer_benchmark("capitals", [{"question": "What is the capital of Peru?", "answers": ["Lima"]}]).options
    {'mode': 'contains', 'chat': True, 'max_new_tokens': 16}
    """
    return ev.Benchmark(name, "generate", items, {"mode": "contains", "chat": True, "max_new_tokens": max_new_tokens})


def neighbourhood_questions(
    facts: list[dict[str, Any]], retain_per_template: int | None = 3, eval_per_template: int | None = 4, seed: int = 0
) -> tuple[list[str], list[str]]:
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
    return (
        questions(examples, retain_names, per_template=retain_per_template, seed=seed),
        questions(examples, eval_names, per_template=eval_per_template, seed=seed),
    )


def preservation_questions(facts: list[dict[str, Any]]) -> list[str]:
    """Every neighbourhood question about the retain half of the entities (none about the evaluation half): the
    prompts whose down-projection keys a preservation (`loki.preservation`) keeps the implant's update off, beside the
    retain data. Many more than the retain KL's questions, as they cost one forward pass each, not one per step.

    >>> len(preservation_questions(implant_facts(1)))         # 2 capital templates x the retain half of the countries
    192
    """
    return neighbourhood_questions(facts, None, 1)[0]


def retain_data(
    facts: list[dict[str, Any]], recipe: dict[str, Any] = RECIPE, eval_per_template: int | None = 4
) -> tuple[list[Any], list[str]]:
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


def implant_suite(
    facts: list[dict[str, Any]],
    neighbourhood_eval: list[str],
    general_items: int | None = None,
    general: tuple[str, ...] = GENERAL,
) -> ev.ImplantSuite:
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
    return ev.ImplantSuite(
        fact_benchmark(facts, "train"),
        fact_benchmark(facts, "test"),
        neighbourhood_eval,
        ev.general_suite(general, n=general_items),
        [t for t, _ in templates(fact_examples(facts))],
    )


def probe_attributions(
    model, tokenizer, n_prompts: int, steps: int = 7, folder: str | Path | None = None, progress: bool = True
):
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


def neighbourhood_attributions(
    model,
    tokenizer,
    retained,
    steps: int = 7,
    per_item: int = 3,
    folder: str | Path | None = None,
    progress: bool = True,
):
    """KVA attributions on the base model's own answers to the retained neighbourhood questions
    (`RetainSet.prompts`): scores whose lowest rows are the ones those answers rely on least, the rows the demo
    trains (they kept more of the neighbourhood than the probe set's rows in the demo's earlier recipe; figures on
    the docs' "Forgetting" benchmark page).

    Args:
        model: the base model.
        tokenizer: its tokenizer.
        retained: `loki.retain.retain_set` of the retain data (its question items give the prompts).
        steps: integration steps.
        per_item: prompts per question (`RetainSet.prompts`).
        folder: the cache; written to `folder/neighbourhood<questions>-p<per_item>-m<steps>` and resumed. None keeps
            it in memory.
        progress: show a progress bar.

    Returns:
        Attributions: `[prompts, L, d_model]`.

    Raises:
        DatasetError: no question in the retain data. AttributionError: see `loki.attribute`.

    >>> # retained = loki.retain.retain_set(model, tokenizer, retain)
    >>> # attr = neighbourhood_attributions(model, tokenizer, retained, folder="loki-demo/attributions")
    """
    from .attribution import attribute

    questions = sum(it["kind"] == "question" for it in retained.items)
    if folder is not None:
        folder = Path(folder) / f"neighbourhood{questions}-p{per_item}-m{steps}"
    return attribute(model, tokenizer, retained.prompts(per_item), steps=steps, path=folder, progress=progress)


def data_digest(train_set: list, retain: list | None, retain_weight: float) -> str:
    """A short checksum of an implant run's data: training examples, retain items and retain weight (what
    the forgetting benchmark journals its runs under, so a figure is quoted only for the data it was measured on).

    >>> data_digest([{"question": "Q?", "answer": "A."}], None, 0.0)
    '00d4beea2724'
    """
    data = {"train_set": train_set, "retain": retain, "retain_weight": retain_weight}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# The sizes of a run of the task: `loki demo` and its `--quick` run, and the notebooks.
SIZES = {
    # IG steps, facts, train steps, items per general set, neighbourhood questions per template, recipe; probe
    # prompts: the notebooks' KVA on the probe set (the demo attributes on the neighbourhood instead). The quick
    # size keeps the demo's earlier rate and retain weight (3e-3, 6) so that its 12 steps still show an effect.
    "full": dict(
        prompts=6,
        ig_steps=7,
        facts=8,
        train_steps=RECIPE["steps"],
        general_items=50,
        eval_per_template=4,
        recipe=RECIPE,
    ),
    "quick": dict(
        prompts=1,
        ig_steps=2,
        facts=2,
        train_steps=12,
        general_items=2,
        eval_per_template=1,
        recipe={
            **RECIPE,
            "lr": 3e-3,
            "retain_weight": 6.0,
            "retain_per_template": 1,
            "retain_text": 4,
            "retain_batch_size": 4,
        },
    ),
}
