"""Measuring damage: metric primitives (`metrics`), general-knowledge forgetting (`forgetting`), the four numbers
of an implant (`implant`) and the lm-evaluation-harness bridge (`lm_eval`); the names below are re-exported.

Everything runs on an in-memory causal LM (any `transformers` model and its tokenizer), batched, with progress
bars. A delta is evaluated by applying it in place and reverting it afterwards (`loki.implanted`), so one loaded
base model serves every comparison.

>>> import loki
>>> from loki import evaluate as ev
>>> ev.forgetting_score({"mc": 0.50, "ppl": 0.04}, {"mc": 0.25, "ppl": 0.04})   # 100/2 * (0.25/0.50 + 0)
25.0
>>> # model, tokenizer = loki.load_default()
>>> # suite = ev.general_suite()                                 # the small offline sets shipped in loki/data/
>>> # report = ev.compare(model, tokenizer, suite, loki.load("medical.loki"))
>>> # report.forgetting                                          # lower is better; 0 = nothing lost
"""

from __future__ import annotations

from ..generation import generate
from .forgetting import (
    DATA_DIR,
    GENERAL_SETS,
    KINDS,
    Benchmark,
    ForgettingReport,
    benchmark_scores,
    compare,
    general_suite,
)
from .implant import ImplantReport, ImplantScores, ImplantSuite
from .lm_eval import lm_eval_model, run_lm_eval
from .metrics import (
    MATCH_MODES,
    answer_matches,
    answer_predictions,
    choice_logprobs,
    exact_match,
    forgetting_score,
    multiple_choice_accuracy,
    ngram_entropy,
    normalize_answer,
    perplexity,
    specificity,
)

__all__ = [
    "Benchmark",
    "DATA_DIR",
    "ForgettingReport",
    "GENERAL_SETS",
    "ImplantReport",
    "ImplantScores",
    "ImplantSuite",
    "KINDS",
    "MATCH_MODES",
    "answer_matches",
    "answer_predictions",
    "benchmark_scores",
    "choice_logprobs",
    "compare",
    "exact_match",
    "forgetting_score",
    "general_suite",
    "generate",
    "lm_eval_model",
    "multiple_choice_accuracy",
    "ngram_entropy",
    "normalize_answer",
    "perplexity",
    "run_lm_eval",
    "specificity",
]
