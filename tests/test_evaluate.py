"""loki.evaluate: metrics on hand-computable models, against slow references on every family, and on the real model."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import loki
import loki.testing
from loki import evaluate as ev
from tests.conftest import assert_state_equal, state_dict_copy

V = 16  # vocabulary of the hand-set models: <pad> <eos> <unk> w3 .. w15


def word_tokenizer(vocab: int = V) -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: token i is the word `w{i}` (0-2 are special). No special tokens added."""
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def bigram_model(table: torch.Tensor) -> transformers.LlamaForCausalLM:
    """A real Llama whose next-token logits after token i are exactly `table[i]` (a bigram model).

    Attention and MLP write zeros, so the residual stream is the one-hot embedding; the final norm is scaled back
    to the one-hot vector and the LM head reads the table column."""
    v = table.shape[0]
    cfg = transformers.LlamaConfig(
        vocab_size=v,
        hidden_size=v,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.model.norm.weight.fill_(math.sqrt(1 / v + cfg.rms_norm_eps))  # undo RMS scaling of a one-hot vector
        model.lm_head.weight.copy_(table.T)
    return model


def ref_logprob(table: torch.Tensor, tokens: list[int], n_scored: int) -> float:
    """log P(last n_scored tokens | the ones before) under the bigram table, term by term."""
    lp = torch.log_softmax(table.double(), dim=-1)
    return sum(float(lp[tokens[t - 1], tokens[t]]) for t in range(len(tokens) - n_scored, len(tokens)))


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture
def tok():
    return word_tokenizer()


@pytest.fixture
def table():
    return torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 2


# -- hand-computable cases ------------------------------------------------------------------------------------
def test_uniform_model_perplexity_is_vocab_size(tok):
    model = bigram_model(torch.zeros(V, V))
    texts = [words(3, 4, 5), words(7, 8, 9, 10, 11, 12), words(3, 3)]
    assert ev.perplexity(model, tok, texts, batch_size=2, progress=False) == pytest.approx(V, rel=1e-5)


def test_perplexity_matches_bigram_reference(tok, table):
    model = bigram_model(table)
    seqs = [[3, 4, 5, 6], [9, 8, 7, 6, 5, 4, 3], [10, 11]]
    texts = [words(*s) for s in seqs]
    nll = -sum(ref_logprob(table, s, len(s) - 1) for s in seqs)
    expected = math.exp(nll / sum(len(s) - 1 for s in seqs))
    assert ev.perplexity(model, tok, texts, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    # max_length cuts each text before scoring
    cut = math.exp(-ref_logprob(table, [9, 8, 7], 2) / 2)
    assert ev.perplexity(model, tok, [texts[1]], max_length=3, progress=False) == pytest.approx(cut, rel=1e-5)


def test_choice_logprobs_and_accuracy_are_the_bigram_likelihoods(tok, table):
    model = bigram_model(table)
    items = [
        {"prompt": words(3, 4), "choices": [" " + words(5), " " + words(6, 7), " " + words(8)], "answer": 0},
        {"prompt": words(9), "choices": [" " + words(10, 11, 12), " " + words(13)], "answer": 1},
        {"prompt": words(14, 15, 3), "choices": [" " + words(4), " " + words(5)], "answer": 1},
    ]
    got = ev.choice_logprobs(
        model, tok, [it["prompt"] for it in items], [it["choices"] for it in items], batch_size=3, progress=False
    )
    for it, lps in zip(items, got):
        ctx = [int(w[1:]) for w in it["prompt"].split()]
        for c, lp in zip(it["choices"], lps):
            cont = [int(w[1:]) for w in c.split()]
            assert lp == pytest.approx(ref_logprob(table, ctx + cont, len(cont)), abs=1e-4)
    best = [max(range(len(lps)), key=lps.__getitem__) for lps in got]
    expected = sum(b == it["answer"] for b, it in zip(best, items)) / len(items)
    assert ev.multiple_choice_accuracy(model, tok, items, progress=False) == pytest.approx(expected)
    # set answers to the argmax: accuracy 1; to another choice: 0
    right = [{**it, "answer": b} for it, b in zip(items, best)]
    wrong = [{**it, "answer": (b + 1) % len(it["choices"])} for it, b in zip(items, best)]
    assert ev.multiple_choice_accuracy(model, tok, right, progress=False) == 1.0
    assert ev.multiple_choice_accuracy(model, tok, wrong, progress=False) == 0.0


def test_ties_go_to_the_first_choice(tok):
    model = bigram_model(torch.zeros(V, V))  # every choice of one token is equally likely
    items = [{"prompt": words(3), "choices": [" w4", " w5", " w6"], "answer": a} for a in (0, 1, 2, 0)]
    assert ev.multiple_choice_accuracy(model, tok, items, progress=False) == 0.5


def test_greedy_generation_and_exact_match(tok):
    # after token i the model says i+1 (w15 -> <eos>), so the greedy answer to "w{i}" is "w{i+1} w{i+2} ..."
    table = torch.zeros(V, V)
    for i in range(3, V):
        table[i, i + 1 if i + 1 < V else 1] = 5.0
    model = bigram_model(table)
    prompts = [words(3), words(9, 10, 11, 12), words(13)]
    got = ev.generate(model, tok, prompts, max_new_tokens=3, batch_size=2, progress=False)
    assert got == [words(4, 5, 6), words(13, 14, 15), words(14, 15)]  # the last one stops at <eos>
    items = [{"question": p, "answers": [a]} for p, a in zip(prompts, ["w4 w5 w6", "w13 w14 w15", "w15"])]
    assert ev.exact_match(model, tok, items, max_new_tokens=3, progress=False) == pytest.approx(2 / 3)
    items[2]["answers"] = ["w14"]
    assert ev.exact_match(model, tok, items, max_new_tokens=3, mode="prefix", progress=False) == 1.0


def test_answer_matching_modes():
    assert ev.normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert ev.answer_matches("Paris.", ["paris"])
    assert not ev.answer_matches("Paris is the capital", ["Paris"])
    assert ev.answer_matches("Paris is the capital", ["Paris"], "prefix")
    assert not ev.answer_matches("Parisian food", ["Paris"], "prefix")
    assert ev.answer_matches("It is Paris, I think", ["Lyon", "Paris"], "contains")
    assert not ev.answer_matches("It is Parisian", ["Paris"], "contains")
    with pytest.raises(loki.errors.EvaluationError, match="match mode"):
        ev.answer_matches("x", ["x"], "fuzzy")


def test_forgetting_score_on_numbers():
    assert ev.forgetting_score({"a": 0.8, "b": 0.5}, {"a": 0.4, "b": 0.5}) == pytest.approx(25.0)
    assert ev.forgetting_score([0.5, 0.2, 0.1], [0.5, 0.2, 0.1]) == 0.0
    assert ev.forgetting_score([0.5], [0.6]) == pytest.approx(-20.0)  # improvement is negative
    assert ev.forgetting_score({"x": 2.0, "y": 4.0}, {"y": 1.0, "x": 2.0}) == pytest.approx(37.5)  # by name
    with pytest.raises(loki.errors.EvaluationError, match="different benchmarks"):
        ev.forgetting_score({"a": 1.0}, {"b": 1.0})
    with pytest.raises(loki.errors.EvaluationError, match="must be > 0"):
        ev.forgetting_score([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(loki.errors.EvaluationError):
        ev.forgetting_score([], [])


def test_bad_inputs_raise_evaluation_errors(tok):
    model = bigram_model(torch.zeros(V, V))
    with pytest.raises(loki.errors.EvaluationError, match="lacks"):
        ev.multiple_choice_accuracy(model, tok, [{"prompt": "w3", "choices": [" w4"]}], progress=False)
    with pytest.raises(loki.errors.EvaluationError, match="not an index"):
        ev.multiple_choice_accuracy(model, tok, [{"prompt": "w3", "choices": [" w4"], "answer": 1}], progress=False)
    with pytest.raises(loki.errors.EvaluationError, match="fewer than 2 tokens"):
        ev.perplexity(model, tok, ["w3"], progress=False)
    with pytest.raises(loki.errors.EvaluationError, match="batch_size"):
        ev.perplexity(model, tok, ["w3 w4"], batch_size=0, progress=False)
    with pytest.raises(loki.errors.EvaluationError, match="unknown kind"):
        ev.Benchmark("x", "bleu", [{"text": "w3 w4"}])


# -- batched implementation against slow references on every family ------------------------------------------
def test_batched_metrics_match_one_by_one_reference(family):
    tok = word_tokenizer(128)
    model = loki.testing.tiny_model(family, vocab=128)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 12, 3, 9)]
    texts = [" ".join(f"w{i}" for i in s) for s in seqs]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:  # reference: transformers' own loss, one text at a time, no padding
            ids = torch.tensor([s])
            nll += float(model(input_ids=ids, labels=ids).loss) * (len(s) - 1)
            count += len(s) - 1
    assert ev.perplexity(model, tok, texts, batch_size=3, progress=False) == pytest.approx(
        math.exp(nll / count), rel=1e-4
    )
    prompts, choices = texts[:2], [[" w5 w6", " w7"], [" w8", " w9 w10 w11"]]
    got = ev.choice_logprobs(model, tok, prompts, choices, batch_size=3, progress=False)
    with torch.no_grad():
        for p, cs, lps in zip(prompts, choices, got):
            for c, lp in zip(cs, lps):
                ids = tok(p + c)["input_ids"]
                n = len(c.split())
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                ref = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
                assert lp == pytest.approx(ref, abs=1e-4)


def test_evaluate_with_a_delta_applies_and_reverts(tok):
    model = loki.testing.tiny_model("llama", vocab=V)
    before = state_dict_copy(model)
    bench = [ev.Benchmark("ppl", "perplexity", [{"text": words(3, 9, 4, 12, 7, 5)}, {"text": words(8, 8, 3)}])]
    delta = loki.testing.random_delta(model, q=50, noise=0.5)
    base = ev.benchmark_scores(model, tok, bench, progress=False)
    tuned = ev.benchmark_scores(model, tok, bench, delta, progress=False)
    assert_state_equal(model, before)
    with loki.implanted(model, delta):
        manual = 1 / ev.perplexity(model, tok, [it["text"] for it in bench[0].items], progress=False)
    assert tuned["ppl"] == pytest.approx(manual, rel=1e-6) and tuned["ppl"] != base["ppl"]
    report = ev.compare(model, tok, bench, delta, original=base, progress=False)
    assert report.forgetting == pytest.approx(100 * (base["ppl"] - tuned["ppl"]) / base["ppl"], rel=1e-6)
    assert "forgetting score" in report.table()
    assert_state_equal(model, before)


def test_general_suite_is_shipped_and_well_formed():
    suite = ev.general_suite()
    assert [b.name for b in suite] == list(ev.GENERAL_SETS)
    kinds = {b.name: b.kind for b in suite}
    assert kinds["wiki_perplexity"] == "perplexity" and kinds["wikidata_qa"] == "generate"
    for b in suite:
        assert 40 <= len(b.items) <= 200, b.name
        if b.kind == "choice":
            assert all(0 <= it["answer"] < len(it["choices"]) >= 2 for it in b.items)
        if b.kind == "generate":
            assert all(it["answers"] and all(a.strip() for a in it["answers"]) for it in b.items)
    # forgetting is never measured on the prompts that chose the rows (the attribution probe)
    from loki.prompts import probe_records

    probe = {f"Q: {r['question']}\nA:" for r in probe_records()}
    assert not probe & {it["prompt"] for b in suite if b.kind == "choice" for it in b.items}
    assert [len(b.items) for b in ev.general_suite(n=3)] == [3] * len(suite)
    with pytest.raises(loki.errors.EvaluationError, match="No general set"):
        ev.general_suite(["nope"])


# -- the real default model ------------------------------------------------------------------------------------
@pytest.mark.slow  # the real default model
def test_real_model_quick_run(default_model, default_tokenizer):
    model, tok = default_model, default_tokenizer
    before = state_dict_copy(model)
    suite = {b.name: b for b in ev.general_suite(n=2)}
    ppl = 1 / suite["wiki_perplexity"].score(model, tok, progress=False)
    assert 2 < ppl < 100  # a 135M model on Wikipedia prose; a broken scorer gives ~49152 or ~1
    mc = [
        {"prompt": "Q: What is the capital of France?\nA:", "choices": [" Berlin", " Paris", " Madrid"], "answer": 1},
        {"prompt": "Q: How many legs does a dog have?\nA:", "choices": [" four", " eleven"], "answer": 0},
    ]
    assert ev.multiple_choice_accuracy(model, tok, mc, progress=False) == 1.0
    qa = [{"question": "The capital of France is", "answers": ["Paris"]}, *suite["wikidata_qa"].items]
    one = ev.generate(model, tok, [q["question"] for q in qa], max_new_tokens=4, batch_size=1, progress=False)
    batched = ev.generate(model, tok, [q["question"] for q in qa], max_new_tokens=4, batch_size=3, progress=False)
    assert one == batched  # left padding does not change greedy answers
    assert ev.answer_matches(one[0], ["Paris"], "prefix")
    assert_state_equal(model, before)


# -- lm-evaluation-harness bridge ------------------------------------------------------------------------------
@pytest.mark.slow  # over ~5 s on 2 CPU cores
def test_lm_eval_bridge_on_a_local_task(tmp_path, tok, table):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'loki[eval]'")
    pytest.importorskip("datasets")
    data = tmp_path / "toy.jsonl"
    rows = [
        {"q": words(3, 4), "choices": [words(5), words(6)], "label": 0},
        {"q": words(9), "choices": [words(10), words(13)], "label": 1},
    ]
    data.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    (tmp_path / "toy.yaml").write_text(
        "task: loki_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n"
    )
    model = bigram_model(table)
    try:
        results = ev.run_lm_eval(model, tok, ["loki_toy"], task_dir=tmp_path, batch_size=2)
    except Exception as e:  # noqa: BLE001 - lm-eval needs network or a newer datasets in some setups
        pytest.skip(f"lm-eval could not run the local task offline: {type(e).__name__}: {e}")
    items = [{"prompt": r["q"], "choices": [" " + c for c in r["choices"]], "answer": r["label"]} for r in rows]
    assert results["loki_toy"]["acc,none"] == pytest.approx(
        ev.multiple_choice_accuracy(model, tok, items, progress=False)
    )


def test_report_leaves_out_benchmarks_the_base_scores_zero_on():
    report = ev.ForgettingReport({"a": 0.5, "b": 0.0}, {"a": 0.25, "b": 0.5})
    assert report.skipped == ["b"] and report.forgetting == pytest.approx(50.0)
    assert "(skipped)" in report.table()
