"""The task of the forgetting benchmark's paper regime: load its splits and score a model on it.

The data lives in benchmarks/data/<name>/ (built by benchmarks/build_task.py; see the README there). The one task so
far, `wikidata_toolcall`, is function calling: a question about a Wikidata entity, a menu of 4 tools in the prompt,
and a one-line JSON tool call as the answer.

>>> # import loki; from benchmarks.task import load_task, score, task_benchmark
>>> # model, tok = loki.load_default()
>>> # train, test = load_task("wikidata_toolcall")
>>> # loki.train(model, tok, train[:1000], ...)       # the rows are {"prompt", "answer"} (+ "relation")
>>> # score(model, tok, test)                          # fraction of exact tool calls (JSON parsed), in [0, 1]
>>> # task_benchmark(test).score(model, tok)           # the same as a loki.evaluate.Benchmark (normalised string)

`score` parses the first JSON object of the generated line and compares it with the reference call (tool name and
arguments; argument strings after Unicode NFC and whitespace normalisation): JSON spacing, key order and text after
the object do not matter. `task_benchmark` is the same test as exact match of the SQuAD-normalised string
(`loki.evaluate.answer_matches`: lower case, punctuation removed), for code that takes Benchmarks. On well-formed
answers in the trained format the two agree; they differ only on off-format answers (the Benchmark rejects other
JSON spacing or trailing text, and accepts a wrong letter case or punctuation in the entity).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

from loki import evaluate as ev

DATA = Path(__file__).resolve().parent / "data"
MAX_NEW_TOKENS = 48  # the longest reference call is well under this (see `max_answer_tokens`)


def load_task(name: str = "wikidata_toolcall") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): lists of `{"prompt", "answer", ...}` rows from benchmarks/data/<name>/."""
    folder = DATA / name
    if not folder.is_dir():
        raise FileNotFoundError(f"No task {name!r} in {DATA}; run `python -m benchmarks.build_task` first.")

    def read(split: str) -> list[dict[str, Any]]:
        lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    return read("train"), read("test")


def task_benchmark(test: list[dict[str, Any]], n: int | None = None, name: str = "task") -> ev.Benchmark:
    """The test split as a `loki.evaluate.Benchmark`: greedy chat generation (one line), exact match of the
    normalised answer string. `n` keeps the first `n` items."""
    items = [{"question": ex["prompt"], "answers": [ex["answer"]]} for ex in test[:n]]
    return ev.Benchmark(name, "generate", items, {"mode": "exact", "chat": True, "max_new_tokens": MAX_NEW_TOKENS})


def parse_call(text: str) -> dict[str, Any] | None:
    """The tool call in a generated answer: the first JSON object of the text, or None when there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _canonical(call: dict[str, Any] | None) -> Any:
    """A comparable form of a call: name and arguments, string values NFC-normalised with single spaces."""
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return None

    def norm(v: Any) -> Any:
        return " ".join(unicodedata.normalize("NFC", v).split()) if isinstance(v, str) else v

    return call.get("name"), tuple(sorted((k, norm(v)) for k, v in call["arguments"].items()))


def call_matches(prediction: str, answer: str) -> bool:
    """Whether the generated text holds exactly the reference tool call (same name, same arguments)."""
    got = _canonical(parse_call(prediction))
    return got is not None and got == _canonical(json.loads(answer))


def score(
    model,
    tokenizer,
    test: list[dict[str, Any]],
    *,
    n: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    return_predictions: bool = False,
):
    """Fraction of the test rows (the first `n`) whose greedy chat answer is exactly the reference tool call.
    With `return_predictions`, returns `(score, predictions)`."""
    rows = test[:n]
    preds = ev.generate(
        model,
        tokenizer,
        [ex["prompt"] for ex in rows],
        chat=True,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=batch_size,
        progress=progress,
    )
    value = sum(call_matches(p, ex["answer"]) for p, ex in zip(preds, rows)) / len(rows)
    return (value, preds) if return_predictions else value


def max_answer_tokens(tokenizer, rows: list[dict[str, Any]]) -> int:
    """The longest answer in tokens (to check MAX_NEW_TOKENS)."""
    return max(len(tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]) for ex in rows)
