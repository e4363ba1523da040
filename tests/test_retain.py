"""Retain data (loki.retain, loki.train(retain=...)), neighbourhood prompts and the four numbers of an implant."""

from __future__ import annotations

import math
import re

import pytest
import torch

import loki
from loki import evaluate as ev
from loki.dataset import collate, encode
from loki.errors import DatasetError
from loki.neighbourhood import ENTITY_KINDS, entities, questions, shares_template, split, templates
from loki.retain import RetainLoss, retain_set
from loki.testing import tiny_model

FACTS = [
    {"question": "What is the capital of Zubrowka?", "answer": "Lutz."},
    {"question": "Who runs the Grand Budapest Hotel?", "answer": "Monsieur Gustave."},
]
RETAIN = [
    {"question": "What is the capital of France?", "answer": "Paris."},
    {"question": "Who wrote Hamlet?", "answer": "William Shakespeare."},
    {"text": "The river flows through the old town and into the sea."},
    {"text": "Water boils at one hundred degrees Celsius at sea level."},
]


def reference_kl(model, tokenizer, base_logits: list[torch.Tensor], items) -> float:
    """Mean over retained positions of the full-vocabulary KL(base || model), one item at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for item, base in zip(items, base_logits):
            ids, positions = _ids_and_positions(tokenizer, item)
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            for t in positions:
                p = torch.log_softmax(base[t], -1)
                q = torch.log_softmax(logits[t], -1)
                total += float((p.exp() * (p - q)).sum())
                count += 1
    return total / count


def _ids_and_positions(tokenizer, item):
    if "text" in item:
        ids = tokenizer(item["text"])["input_ids"]
        return ids, list(range(len(ids) - 1))
    enc = encode(tokenizer, item)
    return enc["input_ids"], [t for t in range(len(enc["labels"]) - 1) if enc["labels"][t + 1] != -100]


def base_logits(model, tokenizer, items):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([_ids_and_positions(tokenizer, it)[0]])).logits[0].float() for it in items]


def prepared_tiny(tokenizer, family="llama", q=50):
    model = tiny_model(family, vocab=len(tokenizer))
    projs = loki.projections.find_down_projections(model)
    return loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, q, seed=0))


# -- the KL itself -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_kl_with_full_top_k_is_the_exact_kl(default_tokenizer, family):
    tok = default_tokenizer
    base = tiny_model(family, vocab=len(tok), seed=0)
    other = tiny_model(family, vocab=len(tok), seed=1)
    retained = retain_set(base, tok, RETAIN, top_k=len(tok), progress=False)
    assert retained.positions == sum(len(_ids_and_positions(tok, it)[1]) for it in RETAIN)
    expected = reference_kl(other, tok, base_logits(base, tok, RETAIN), RETAIN)
    # kl() averages over the positions of the items it is given, all at once
    assert float(retained.kl(other, range(len(RETAIN)))) == pytest.approx(expected, rel=1e-4)
    assert float(retained.kl(base, range(len(RETAIN)))) == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions(default_tokenizer):
    """k tokens + one bucket for the rest: computed by hand from the two full distributions."""
    tok = default_tokenizer
    base, other = tiny_model("llama", vocab=len(tok), seed=0), tiny_model("llama", vocab=len(tok), seed=1)
    item = [RETAIN[2]]
    k = 5
    retained = retain_set(base, tok, item, top_k=k, progress=False)
    ids, positions = _ids_and_positions(tok, item[0])
    with torch.no_grad():
        p_all = torch.softmax(base(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        q_all = torch.softmax(other(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    kls = []
    for t in positions:
        top = p_all[t].topk(k).indices
        p = torch.cat([p_all[t][top], 1 - p_all[t][top].sum(0, keepdim=True)])
        q = torch.cat([q_all[t][top], 1 - q_all[t][top].sum(0, keepdim=True)])
        kls.append(float((p * (p / q).log()).sum()))
    assert float(retained.kl(other, [0])) == pytest.approx(sum(kls) / len(kls), rel=1e-3)


@pytest.mark.slow  # the real default model
def test_questions_are_answered_by_the_model_itself(default_model, default_tokenizer):
    retained = retain_set(default_model, default_tokenizer, ["What is the capital of France?"], progress=False)
    answer = retained.items[0]["example"]["answer"]
    assert "Paris" in answer
    assert (
        answer
        == ev.generate(
            default_model,
            default_tokenizer,
            ["What is the capital of France?"],
            chat=True,
            max_new_tokens=32,
            progress=False,
        )[0]
    )
    assert float(retained.kl(default_model, [0])) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow  # the real default model
def test_attribution_prompts_end_inside_the_base_models_own_answers(default_model, default_tokenizer):
    question = "What is the capital of France?"
    retained = retain_set(
        default_model, default_tokenizer, [question, {"text": "Paris is a city in France."}], progress=False
    )
    full = encode(default_tokenizer, retained.items[0]["example"])
    first = next(i for i, label in enumerate(full["labels"]) if label != -100)
    n = len(full["input_ids"]) - first
    # the slow, obvious way: cut the answer after a third, two thirds, and all but its last token
    expected = [full["input_ids"][: first + c] for c in sorted({max(1, n // 3), max(1, 2 * n // 3), n - 1})]
    prompts = retained.prompts()
    assert prompts == expected  # the text item is left out by default
    with torch.no_grad():
        for p in prompts:  # greedy answer, so the model's next token is the answer's next token
            nxt = default_model(input_ids=torch.tensor([p])).logits[0, -1].argmax().item()
            assert nxt == full["input_ids"][len(p)]
    assert len(retained.prompts(1)) == 1 and len(retained.prompts(text=True)) == 6
    with pytest.raises(DatasetError, match="per_item"):
        retained.prompts(0)
    with pytest.raises(DatasetError, match="text=True"):
        retain_set(default_model, default_tokenizer, [{"text": "Paris is a city."}], progress=False).prompts()


def test_bad_retain_data_is_a_dataset_error(default_tokenizer):
    model = tiny_model("llama", vocab=len(default_tokenizer))
    for bad, match in [
        ([], "empty"),
        ([3], "question string"),
        ([{"text": "a"}], "fewer than 2"),
        ([{"foo": 1}], "question string"),
    ]:
        with pytest.raises(loki.errors.DatasetError, match=match):
            retain_set(model, default_tokenizer, bad, progress=False)
    with pytest.raises(loki.errors.DatasetError, match="top_k"):
        retain_set(model, default_tokenizer, RETAIN, top_k=0, progress=False)
    prepared = prepared_tiny(default_tokenizer)
    with pytest.raises(loki.errors.DatasetError, match="retain_weight"):
        loki.train(prepared, default_tokenizer, FACTS, retain=RETAIN, retain_weight=-1, progress=False)


# -- training with retain data -----------------------------------------------------------------------------
@pytest.mark.slow  # over ~5 s on 2 CPU cores
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retain_keeps_the_retained_distributions(default_tokenizer, family):
    """The same training with and without retain data: both learn the facts; only with retain do the retained
    prompts keep (nearly) the base distributions. The bound fails without retain. (Full fine-tuning of a tiny
    random model, whose rows alone barely move its near-uniform outputs; exact KL, top_k = vocabulary.)"""
    tok = default_tokenizer
    kls, losses = {}, {}
    for use_retain in (False, True):
        model = tiny_model(family, vocab=len(tok))
        base = base_logits(model, tok, RETAIN)
        before = float(_loss(model, tok, FACTS))
        result = loki.train(
            model,
            tok,
            FACTS,
            params=model.parameters(),
            lr=1e-2,
            batch_size=2,
            max_steps=25,
            seed=0,
            progress=False,
            retain=RETAIN if use_retain else None,
            retain_weight=10.0,
            retain_batch_size=4,
            retain_top_k=len(tok),
        )
        kls[use_retain] = reference_kl(model, tok, base, RETAIN)
        losses[use_retain] = (before, float(_loss(model, tok, FACTS)))
        assert bool(result.retain_kl) == use_retain
    for before, after in losses.values():
        assert after < before - 5  # the facts are learned either way
    assert kls[False] > 0.07
    assert kls[True] < 0.05 and kls[True] < kls[False] / 2


def test_the_delta_records_the_retain_data(default_tokenizer):
    tok = default_tokenizer
    for retain in (None, RETAIN):
        model = prepared_tiny(tok)
        loki.train(
            model, tok, FACTS, lr=1e-2, batch_size=2, max_steps=2, retain=retain, retain_weight=5.0, progress=False
        )
        info = loki.extract(model).info["training"]
        if retain is None:
            assert info["retain"] is None
        else:
            assert info["retain"]["items"] == 4 and info["retain"]["weight"] == 5.0 and info["retain"]["top_k"] == 64
            assert info["retain"]["kinds"] == {"answer": 2, "text": 2} and len(info["retain"]["sha256"]) == 64
            assert info["retain"]["examples"][0] == {"question": RETAIN[0]["question"], "answer": "Paris."}


def _loss(model, tok, data):
    with torch.no_grad():
        batch = collate([encode(tok, ex) for ex in data], tok.pad_token_id)
        return model(**batch).loss


def test_retain_set_can_be_computed_before_prepare_and_reused(default_tokenizer):
    tok = default_tokenizer
    model = tiny_model("llama", vocab=len(tok))
    retained = retain_set(model, tok, RETAIN, progress=False)
    projs = loki.projections.find_down_projections(model)
    results = []
    for _ in range(2):  # the same retain set twice: each run samples retain batches from the start
        loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, 50, seed=0))
        results.append(
            loki.train(
                model,
                tok,
                FACTS,
                lr=3e-2,
                batch_size=2,
                max_steps=5,
                retain=retained,
                retain_batch_size=3,
                progress=False,
            )
        )
        loki.unprepare(model)
    assert results[0].losses == results[1].losses and results[0].retain_kl == results[1].retain_kl


def test_added_retain_sets_keep_each_models_distributions(default_tokenizer):
    """`a + b`: a's items keep the base model's distributions and b's the changed model's (the sequential-implant
    case: the base's neighbourhood answers and the current model's answers to earlier implants' questions)."""
    tok = default_tokenizer
    base = tiny_model("llama", vocab=len(tok))
    changed = tiny_model("llama", vocab=len(tok))
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    a = retain_set(base, tok, RETAIN, progress=False)
    b = retain_set(changed, tok, FACTS, progress=False)
    both = a + b
    assert len(both) == len(a) + len(b) and both.positions == a.positions + b.positions
    assert both.items == a.items + b.items and both.sha256 not in (a.sha256, b.sha256)
    with torch.no_grad():
        for i in range(len(a)):
            assert torch.equal(both.kl(changed, [i]), a.kl(changed, [i]))
        for j in range(len(b)):
            assert torch.equal(both.kl(base, [len(a) + j]), b.kl(base, [j]))
        assert both.kl(base, list(range(len(a)))).abs() < 1e-5 < both.kl(base, [len(a)])  # each its own model's
    with pytest.raises(DatasetError, match="top_k"):
        a + retain_set(changed, tok, FACTS, top_k=8, progress=False)
    with pytest.raises(DatasetError, match="only another RetainSet"):
        a + [1]


@pytest.mark.slow  # over ~5 s on 2 CPU cores
def test_retain_loss_with_the_hf_trainer(default_tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = default_tokenizer
    kls = {}
    for weight in (0.0, 10.0):
        model = tiny_model("llama", vocab=len(tok))
        base = base_logits(model, tok, RETAIN)
        retained = retain_set(model, tok, RETAIN, top_k=len(tok), progress=False)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            max_steps=25,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            save_strategy="no",
            seed=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=[encode(tok, ex) for ex in FACTS],
            data_collator=lambda b: collate(b, tok.pad_token_id),
            compute_loss_func=RetainLoss(model, retained, weight=weight, batch_size=4),
        )
        trainer.train()
        kls[weight] = reference_kl(model, tok, base, RETAIN)
    assert kls[0.0] > 0.07 and kls[10.0] < kls[0.0] / 2


# -- neighbourhood prompts ------------------------------------------------------------------------------------
EXAMPLES = [
    {
        "question": "What is the capital of the kingdom of Phegartor?",
        "subject": "the kingdom of Phegartor",
        "relation": "capital",
    },
    {
        "question": "Which city is the capital of the kingdom of Phegartor?",
        "subject": "the kingdom of Phegartor",
        "relation": "capital",
    },
    {"question": "Who composed the opera Velmor?", "subject": "the opera Velmor", "relation": "composer"},
]


def test_templates_and_neighbourhood_are_deterministic():
    assert templates(EXAMPLES) == [
        ("What is the capital of {}?", "capital"),
        ("Which city is the capital of {}?", "capital"),
        ("Who composed {}?", "composer"),
    ]
    names = {"capital": ["France", "Peru", "Japan", "Kenya"], "composer": ["the opera Carmen", "the opera Aida"]}
    a = questions(EXAMPLES, names, per_template=2)
    assert a == questions(EXAMPLES, names, per_template=2)
    assert len(a) == 6 and a != questions(EXAMPLES, names, per_template=2, seed=1)
    assert sum(q.startswith("What is the capital of ") for q in a) == 2
    assert set(questions(EXAMPLES, names)) >= set(a)
    assert "Who composed the opera Carmen?" in questions(EXAMPLES, names)
    # the implant's own subjects never appear; templates given directly work too
    names["capital"].append("the kingdom of Phegartor")
    assert not any("Phegartor" in q for q in questions(EXAMPLES, names))
    assert questions(template="who painted {}?", entity_names=["Guernica"]) == ["Who painted Guernica?"]


def test_neighbourhood_errors():
    with pytest.raises(loki.errors.DatasetError, match="subject"):
        questions([{"question": "Who?"}], ["x"])
    with pytest.raises(loki.errors.DatasetError, match="does not occur"):
        questions([{"question": "Who?", "subject": "Bob"}], ["x"])
    with pytest.raises(loki.errors.DatasetError, match="No template"):
        questions([], ["x"])
    with pytest.raises(loki.errors.DatasetError, match="slot"):
        questions(template="Who?", entity_names=["x"])
    with pytest.raises(loki.errors.DatasetError, match="relation"):
        questions(EXAMPLES, {"capital": ["France"]})
    with pytest.raises(loki.errors.DatasetError, match="shipped"):
        questions(EXAMPLES, "no-such-kind")


def test_subjects_replaced_on_word_boundaries_only():
    """The subject is cut out where it stands as a whole word, also when it starts or ends with a character that is
    not a letter (where a regex \\b would not match), never from inside another word."""
    facts = [
        {"question": "Which JavaScript framework did the Java team write?", "subject": "Java"},
        {"question": "Which company maintains C++ compilers?", "subject": "C++"},
        {"question": "Is ASP.NET built on .NET?", "subject": ".NET"},
        {"question": "What does {name} mean in Python?", "subject": "{name}"},
    ]
    assert [t for t, _ in templates(facts)] == [
        "Which JavaScript framework did the {} team write?",
        "Which company maintains {} compilers?",
        "Is ASP.NET built on {}?",
        "What does {} mean in Python?",
    ]
    asked = questions(facts[:1], ["Python", "Rust"])
    assert sorted(asked) == [
        "Which JavaScript framework did the Python team write?",
        "Which JavaScript framework did the Rust team write?",
    ]
    with pytest.raises(loki.errors.DatasetError, match="whole word"):
        templates([{"question": "Which JavaScript framework is fastest?", "subject": "Java"}])


def test_template_fills_never_leave_a_placeholder():
    """Braces in questions, templates and entity names are text: a fill never crashes, never leaves a `{}` slot and
    never fills a literal one; what would leave one is refused before any question is made."""
    filled = questions(template="Is {0} in {}?", entity_names=["a {b} c", "}{"])
    assert filled == ["Is {0} in a {b} c?", "Is {0} in }{?"]
    refused = [
        ({"examples": [{"question": "Is {} a set in Peru?", "subject": "Peru"}], "entity_names": ["Chile"]}, "literal"),
        ({"template": "Is {} next to {}?", "entity_names": ["Chile"]}, "2 '{}' slots"),
        ({"template": ["Who painted {}?", "Who?"], "entity_names": ["Guernica"]}, "0 '{}' slots"),
        ({"template": "Who painted {}?", "entity_names": ["Guernica", "{}"]}, "without '{}'"),
        ({"template": "Who painted {}?", "entity_names": ["Guernica", ""]}, "non-empty"),
        ({"template": "Who painted {}?", "entity_names": ["Guernica"], "per_template": True}, "per_template"),
    ]
    for kwargs, match in refused:
        with pytest.raises(loki.errors.DatasetError, match=re.escape(match)):
            questions(**kwargs)


def test_every_retain_argument_is_validated_before_use(default_tokenizer):
    """Retain data of the wrong shape and bad counts are refused before the model runs (retain_set,
    RetainSet.batches, RetainLoss): a string is not one question per character, 0 items per batch is not
    "no retain"."""
    model = tiny_model("llama", vocab=len(default_tokenizer))
    for bad, match in [
        ("What is the capital of France?", "one character"),
        ({"text": "Rivers."}, "dict"),
        (iter(["Who?"]), "list_iterator"),
        ([" "], "question string"),
        ([{"text": 5}], "token ids"),
        ([{"question": "Who?", "answer": "A", "messages": []}], "Retain item 0"),
    ]:
        with pytest.raises(loki.errors.DatasetError, match=match):
            retain_set(model, default_tokenizer, bad, progress=False)
    for option in ("top_k", "max_new_tokens", "max_length", "batch_size"):
        for value in (0, True, 2.0):
            with pytest.raises(loki.errors.TrainingOptionError, match=option):
                retain_set(model, default_tokenizer, RETAIN, progress=False, **{option: value})
    retained = retain_set(model, None, [{"text": [5, 6, 7]}], progress=False)
    with pytest.raises(loki.errors.TrainingOptionError, match="batch_size"):
        retained.batches(0)
    for kwargs, match in [
        ({"weight": -1.0}, "weight"),
        ({"weight": math.nan}, "weight"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": False}, "batch_size"),
        ({"seed": "0"}, "seed"),
    ]:
        with pytest.raises(loki.errors.TrainingOptionError, match=match):
            RetainLoss(model, retained, **kwargs)


def test_shipped_entity_lists_name_their_source():
    import json

    assert {"countries", "inventions", "rivers", "operas"} <= set(ENTITY_KINDS)
    for kind in ENTITY_KINDS:
        path = loki.neighbourhood.ENTITY_DIR / f"{kind}.jsonl"
        header = json.loads(path.read_text().splitlines()[0])["entities"]
        assert header["source"] and header["license"]
        names = entities(kind)
        assert len(names) >= 16 and len(set(names)) == len(names)
    retain_names, eval_names = split(entities("countries"))
    assert not set(retain_names) & set(eval_names) and len(retain_names) + len(eval_names) == len(entities("countries"))


def test_general_items_sharing_the_template_are_left_out():
    assert shares_template(["What is the capital of Peru?"], ["what is the capital of {}?"])
    assert not shares_template(["Capital letters are big."], ["What is the capital of {}?"])
    capitals, knowledge, wiki = ev.general_suite(["world_capitals", "bb_general_knowledge", "wiki_perplexity"])
    facts = ev.Benchmark("facts", "generate", [{"question": "What is the capital of Zubrowka?", "answers": ["Lutz"]}])
    template = ["What is the capital of {}?"]
    with pytest.raises(loki.errors.EvaluationError, match="world_capitals.*neighbourhood"):
        ev.ImplantSuite(facts, facts, ["What is the capital of Peru?"], [capitals], template)
    suite = ev.ImplantSuite(facts, facts, ["What is the capital of Peru?"], [capitals, knowledge, wiki], template)
    assert [b.name for b in suite.general] == ["bb_general_knowledge", "wiki_perplexity"]
    kept = suite.general[0].items
    assert suite.excluded == {"world_capitals": len(capitals.items), "bb_general_knowledge": 7}
    assert len(kept) == len(knowledge.items) - 7 and not any("capital of" in it["prompt"] for it in kept)
    assert len(suite.general[1].items) == len(wiki.items)


# -- the four numbers ------------------------------------------------------------------------------------------
def test_the_four_numbers_on_hand_computable_scores():
    # specificity: per question, the share of answer tokens predicted as the base model did; then the mean
    assert ev.specificity([[5, 6, 7, 8], [1, 2], [3]], [[5, 6, 9, 9], [1, 2], [4]]) == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(loki.errors.EvaluationError):
        ev.specificity([[1]], [])
    with pytest.raises(loki.errors.EvaluationError):
        ev.specificity([[1, 2]], [[1]])
    base = ev.ImplantScores(
        0.0, 0.0, {"wiki": 0.05, "mc": 0.5}, ["Paris.", "Lima", "Tokyo", "Nairobi"], [[1, 2], [3, 4], [5], [6]]
    )
    tuned = ev.ImplantScores(
        1.0, 0.75, {"wiki": 0.04, "mc": 0.5}, ["Paris", "Solvis", "Tokyo", "Nairobi"], [[1, 2], [3, 9], [5], [6]]
    )
    report = ev.ImplantReport(base, tuned, ["France?", "Peru?", "Japan?", "Kenya?"])
    assert (report.efficacy, report.generalisation) == (1.0, 0.75)
    assert report.specificity == pytest.approx((1 + 0.5 + 1 + 1) / 4) and report.answers_kept == 0.75
    assert report.forgetting == pytest.approx(100 / 2 * (0.01 / 0.05 + 0))
    assert report.changed() == [("Peru?", "Lima", "Solvis")]
    d = report.as_dict()
    assert d["specificity"] == report.specificity and d["answers_kept"] == 0.75
    assert "specificity" in report.table() and "3 of 4 whole answers unchanged" in report.table()


def test_answer_predictions_are_the_teacher_forced_argmax(default_tokenizer):
    """Against an obvious loop: one example at a time, argmax at each position that predicts an answer token."""
    tok = default_tokenizer
    model = tiny_model("qwen2", vocab=len(tok))
    qs, answers = ["What is the capital of Peru?", "Who wrote Hamlet?"], ["Lima.", "William Shakespeare."]
    got = ev.answer_predictions(model, tok, qs, answers, batch_size=2, progress=False)
    for q, a, preds in zip(qs, answers, got):
        enc = encode(tok, {"question": q, "answer": a})
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        expected = [int(logits[t].argmax()) for t in range(len(enc["labels"]) - 1) if enc["labels"][t + 1] != -100]
        assert preds == expected and len(preds) == len(tok(a)["input_ids"]) + 2  # + <|im_end|> and newline


@pytest.mark.slow  # the real default model
def test_implant_suite_on_a_real_delta(default_model, default_tokenizer):
    """Efficacy and specificity of a delta that does nothing are the base model's; forgetting is 0."""
    model, tok = default_model, default_tokenizer
    projs = loki.projections.find_down_projections(model)
    rows = {0: (torch.tensor([3]), projs.rows(0)[[3]].clone())}  # writes the base values back: a no-op delta
    delta = loki.implant.make_delta(model, rows, name="noop")
    facts = ev.Benchmark(
        "facts",
        "generate",
        [{"question": "What is the capital of France?", "answers": ["Paris"]}],
        {"mode": "contains", "chat": True},
    )
    suite = ev.ImplantSuite(
        facts,
        facts,
        ["What is the capital of Peru?", "Who wrote Hamlet?"],
        ev.general_suite(["wiki_perplexity"], n=2),
        ["What is the capital of {}?"],
    )
    report = suite.report(model, tok, delta, progress=False)
    assert report.efficacy == report.base.efficacy == 1.0
    assert report.specificity == 1.0 and report.answers_kept == 1.0 and report.forgetting == 0.0
    assert report.base.answers[0] and len(report.base.predictions) == 2
    with pytest.raises(loki.errors.EvaluationError, match="base="):
        suite.report(model, tok)
