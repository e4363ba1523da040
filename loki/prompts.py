"""Prompts for attribution: the paper's MMLU-style multiple-choice template, and every way to hand loki prompts.

A record is a dict with `question`, `choices` (a list, or keys `A`..`D`), optionally `answer` (index or letter) and
`subject`; the `datasets` MMLU format (`question`, `subject`, `choices`, `answer`) is one. Zero-shot prompts are one
user turn of the tokenizer's chat template with the generation prompt (as the paper); `shots=k` puts the first k
records before it as answered turns. Tokenizers without a chat template get plain text.

>>> from loki.prompts import mc_text
>>> print(mc_text({"question": "2+2?", "choices": ["3", "4", "5", "6"], "subject": "elementary_math"}).rstrip())
There is a single choice question about elementary math. Answer the question by replying A, B, C or D.
Question: 2+2?
Choices:
A. 3
B. 4
C. 5
D. 6
Answer:
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError

LETTERS = "ABCDEFGHIJ"
PROBE = Path(__file__).parent / "data" / "probe.jsonl"




@dataclass
class PromptSet:
    """Token ids per prompt, the gold token per prompt (None when unknown), and a description of the source."""

    ids: list[list[int]]
    gold: list[int | None]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def mc_text(record: Mapping) -> str:
    """The paper's prompt for one multiple-choice record (LOKI-METHOD.md), without the answer."""
    r = normalize(record)
    letters = LETTERS[: len(r["choices"])]
    about = f" about {r['subject']}" if r.get("subject") else ""
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    lines = [f"There is a single choice question{about}. Answer the question by replying {listed}.",
             f"Question: {r['question']}", "Choices:"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, r["choices"])]
    return "\n".join(lines) + "\nAnswer: \n"


def normalize(record: Mapping) -> dict:
    """`{question, choices, answer (index or None), subject (spaces, or None)}` from the usual record layouts."""
    if "question" not in record:
        raise PromptError(f"A multiple-choice record needs a 'question'; got keys {sorted(record)}.")
    choices = record.get("choices")
    if choices is None:
        choices = [record[k] for k in LETTERS if k in record]
    choices = [str(c) for c in choices]
    if len(choices) < 2:
        raise PromptError(f"A multiple-choice record needs >= 2 choices ('choices' or keys A, B, ...): {record}")
    answer = record.get("answer")
    if isinstance(answer, str):
        answer = answer.strip()
        answer = LETTERS.index(answer.upper()) if len(answer) == 1 and answer.upper() in LETTERS else int(answer)
    if answer is not None and not 0 <= int(answer) < len(choices):
        raise PromptError(f"answer {record.get('answer')!r} is not one of the {len(choices)} choices.")
    subject = record.get("subject")
    return {"question": str(record["question"]), "choices": choices,
            "answer": None if answer is None else int(answer),
            "subject": str(subject).replace("_", " ") if subject else None}


def mc_prompts(records: Iterable[Mapping], tokenizer, shots: int = 0, source: str = "records") -> PromptSet:
    """Token ids of the multiple-choice prompts (the first `shots` records serve as examples, not prompts)."""
    if tokenizer is None:
        raise PromptError("Building multiple-choice prompts needs the model's tokenizer.")
    records = [normalize(r) for r in records]
    examples, records = records[:shots], records[shots:]
    if any(e["answer"] is None for e in examples):
        raise PromptError("Few-shot examples need an 'answer'.")
    chat = getattr(tokenizer, "chat_template", None) is not None
    ids, gold = [], []
    for r in records:
        if chat:
            messages = []
            for e in examples:
                messages += [{"role": "user", "content": mc_text(e)},
                             {"role": "assistant", "content": LETTERS[e["answer"]]}]
            messages.append({"role": "user", "content": mc_text(r)})
            x = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            x = list(x["input_ids"])
        else:
            text = "".join(mc_text(e) + LETTERS[e["answer"]] + "\n\n" for e in examples) + mc_text(r)
            x = list(tokenizer(text)["input_ids"])
        ids.append([int(t) for t in x])
        gold.append(None if r["answer"] is None else _letter_token(tokenizer, LETTERS[r["answer"]]))
    shot_note = f", {shots}-shot" if shots else ", zero-shot"
    return PromptSet(ids, gold, f"{source} (multiple choice{shot_note}{', chat template' if chat else ''})")


def _letter_token(tokenizer, letter: str) -> int:
    return int(tokenizer(letter, add_special_tokens=False)["input_ids"][0])


def as_prompts(source, tokenizer=None, shots: int = 0) -> PromptSet:
    """Whatever `loki.attribute` accepts, as a `PromptSet`.

    - a `PromptSet`; the string "probe" (the bundled general-knowledge probe set);
    - a path to a `.jsonl`, `.json` (a list) or `.csv` file of records (MMLU's header-less CSV also works);
    - an iterable (a list, a `datasets.Dataset`) of multiple-choice records, of plain text strings, or of token id
      lists; records with a `text` or `prompt` field and no `question` are plain text.
    """
    if isinstance(source, PromptSet):
        return source
    if isinstance(source, str) and source == "probe":
        return mc_prompts(probe_records(), tokenizer, shots, source="loki probe (BIG-bench general_knowledge)")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"{path} is not a file. Pass a .jsonl/.json/.csv file, 'probe', or a list of prompts.")
        return _from_items(read_records(path), tokenizer, shots, str(path))
    if isinstance(source, Mapping):
        raise PromptError("Pass a list of records, not a single record.")
    name = type(source).__name__
    info = getattr(source, "info", None)
    label = getattr(info, "dataset_name", None) or name
    return _from_items(list(source), tokenizer, shots, label)


def _from_items(items: list, tokenizer, shots: int, label: str) -> PromptSet:
    if not items:
        raise PromptError(f"No prompts in {label}.")
    first = items[0]
    if isinstance(first, Mapping) and "question" in first:
        return mc_prompts(items, tokenizer, shots, source=label)
    if shots:
        raise PromptError("shots= only applies to multiple-choice records.")
    if isinstance(first, Mapping):
        key = "text" if "text" in first else "prompt" if "prompt" in first else None
        if key is None:
            raise PromptError(f"Records need 'question' (+choices) or 'text'/'prompt'; got keys {sorted(first)}.")
        items = [r[key] for r in items]
    if isinstance(items[0], str):
        if tokenizer is None:
            raise PromptError("Text prompts need the model's tokenizer.")
        ids = [list(map(int, tokenizer(t)["input_ids"])) for t in items]
        return PromptSet(ids, [None] * len(ids), f"{label} (plain text)")
    try:
        ids = [[int(t) for t in x] for x in items]
    except (TypeError, ValueError) as e:
        raise PromptError(f"Cannot read {label} as prompts (records, strings or token id lists): {e}") from e
    return PromptSet(ids, [None] * len(ids), f"{label} (token ids)")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records from a `.jsonl`, `.json` or `.csv` file (MMLU's header-less `question,A,B,C,D,answer` CSV too)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise PromptError(f"{path} must hold a JSON list of records.")
        return data
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows and "question" in rows[0]:
            return [dict(zip(rows[0], r)) for r in rows[1:]]
        subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
        return [{"question": r[0], "choices": r[1:-1], "answer": r[-1], "subject": subject} for r in rows if r]
    raise PromptError(f"Unknown prompt file type {suffix!r} ({path}); use .jsonl, .json or .csv.")


# -- the bundled probe set -------------------------------------------------------------------------
def probe_records() -> list[dict]:
    """The bundled general-knowledge probe set: multiple-choice records from BIG-bench `general_knowledge`
    (Apache-2.0, github.com/google/BIG-bench), 4 choices each, built by `build_probe`."""
    return read_records(PROBE)


def build_probe(bigbench_archive: str | os.PathLike, out: str | os.PathLike = PROBE, limit: int = 24,
                seed: int = 0, task: str = "general_knowledge") -> Path:
    """Rebuild `loki/data/probe.jsonl` from the BIG-bench sdist (`pip download --no-deps bigbench==1.0.0`).

    Each example of the BIG-bench `task` becomes a 4-choice record: its correct answer and its first three wrong answers,
    shuffled with `seed`; the first `limit` examples with at least 4 answers are kept.
    """
    import random
    import tarfile

    with tarfile.open(bigbench_archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"benchmark_tasks/{task}/task.json"))
        examples = json.load(tar.extractfile(member))["examples"]
    rng = random.Random(seed)
    records = []
    for ex in examples:
        scores = ex["target_scores"]
        right = [a for a, s in scores.items() if s == 1]
        wrong = [a for a, s in scores.items() if s != 1]
        if len(right) != 1 or len(wrong) < 3:
            continue
        choices = right + wrong[:3]
        rng.shuffle(choices)
        question = ex["input"].removeprefix("Q: ").removesuffix("\nA:").strip()
        records.append({"question": question, "choices": choices, "answer": choices.index(right[0]),
                        "subject": task.replace("_", " ")})
        if len(records) == limit:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out
