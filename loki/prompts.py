"""Prompts for attribution: the paper's MMLU-style multiple-choice template, and every way to hand loki prompts.

A record is a dict with `question`, `choices` (a list, or keys `A`..`D`), optionally `answer` (index or letter) and
`subject`; the `datasets` MMLU format (`question`, `subject`, `choices`, `answer`) is one. The subject is written
with spaces and title-cased, as the authors do (`high_school_biology` -> `High School Biology`). Zero-shot prompts
are one user turn of the tokenizer's chat template with the generation prompt (as the paper). Few-shot
(`shots=k`): with `dev=` (records of every subject, e.g. MMLU's `*_dev.csv`), each prompt is preceded by the first k
dev records *of its own subject*, each as a user turn with the same template and an assistant turn `"{letter}\n"`:
exactly the authors' 5-shot Qwen2.5 attribution prompts (docs/method.md, "Stage 1"; `analyse_mmlu_qwen2.py` of
github.com/Nexround/LoKI, commit 44f67d9). Without `dev=`, the first k records serve as the examples of every
prompt. Tokenizers without a chat template get plain text.

>>> from loki.prompts import mc_text
>>> print(mc_text({"question": "2+2?", "choices": ["3", "4", "5", "6"], "subject": "elementary_math"}).rstrip())
There is a single choice question about Elementary Math. Answer the question by replying A, B, C or D.
Question: 2+2?
Choices:
A. 3
B. 4
C. 5
D. 6
Answer:
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .dataset import read_csv, read_json, read_json_lines
from .errors import PromptError
from .format import atomic_write

LETTERS = "ABCDEFGHIJ"
PROBE = Path(__file__).parent / "data" / "probe.jsonl"


@dataclass
class PromptSet:
    """Token ids per prompt, the gold token per prompt (None when unknown), and a description of the source.

    Attributes:
        ids: one list of token ids per prompt (what `loki.attribute` runs).
        gold: per prompt the token id of the answer letter, or None (plain prompts, records without answers).
        source: where the prompts came from and how they were built (recorded in attribution metadata).

    >>> as_prompts([[5, 6], [7]])
    PromptSet(ids=[[5, 6], [7]], gold=[None, None], source='list (token ids)')
    """

    ids: list[list[int]]
    gold: list[int | None]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def mc_text(record: Mapping) -> str:
    """The paper's prompt for one multiple-choice record, without the answer (a `str` ending in `"Answer: \\n"`).

    `{Subject}` is the record's subject with spaces, title-cased by `str.title()` as in the authors' scripts
    (`high_school_biology` -> `High School Biology`; docs/method.md "Stage 1"); without a subject the
    ` about {Subject}` part is left out. The letters offered follow the number of choices.

    Args:
        record: a multiple-choice record (see `normalize`).

    Returns:
        str: the prompt text.

    Raises:
        PromptError: a record without a question, with fewer than 2 choices, or with an answer out of range.

    >>> print(mc_text({"question": "Yes?", "choices": ["yes", "no"]}).rstrip())
    There is a single choice question. Answer the question by replying A or B.
    Question: Yes?
    Choices:
    A. yes
    B. no
    Answer:
    """
    r = normalize(record)
    letters = LETTERS[: len(r["choices"])]
    about = f" about {r['subject'].title()}" if r.get("subject") else ""
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    lines = [
        f"There is a single choice question{about}. Answer the question by replying {listed}.",
        f"Question: {r['question']}",
        "Choices:",
    ]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, r["choices"])]
    return "\n".join(lines) + "\nAnswer: \n"


def mc_messages(record: Mapping, examples: Iterable[Mapping] = ()) -> list[dict[str, str]]:
    """The chat messages of one prompt: per example a user turn (`mc_text`) and an assistant turn `"{letter}\\n"`,
    in the given order, then `record` as the final user turn (a `list` of `{"role", "content"}` dicts, 2k+1 long).

    This is the authors' `build_conversation` (`analyse_mmlu_qwen2.py`, github.com/Nexround/LoKI commit 44f67d9).

    Args:
        record: the question to ask (a record, see `normalize`; its answer is not shown).
        examples: few-shot example records, each with an answer.

    Returns:
        list[dict[str, str]]: `2 * len(examples) + 1` messages.

    Raises:
        PromptError: an example without an `answer`, or a record `normalize` refuses.

    >>> shot = {"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "math"}
    >>> [m["role"] for m in mc_messages({**shot, "question": "2+2?"}, [shot])]
    ['user', 'assistant', 'user']
    >>> mc_messages(shot, [shot])[1]["content"]
    'B\\n'
    """
    messages = []
    for e in examples:
        e = normalize(e)
        if e["answer"] is None:
            raise PromptError(f"Few-shot examples need an 'answer'; this one has none: {e['question']!r}.")
        messages += [
            {"role": "user", "content": mc_text(e)},
            {"role": "assistant", "content": LETTERS[e["answer"]] + "\n"},
        ]
    return messages + [{"role": "user", "content": mc_text(record)}]


def normalize(record: Mapping) -> dict:
    """`{question, choices, answer (index or None), subject (spaces, or None)}` from the usual record layouts.

    Args:
        record: a dict with `question`; `choices` (a list) or keys `A`, `B`, ...; optionally `answer` (an index,
            a letter in either case, or a digit string) and `subject` (underscores become spaces).

    Returns:
        dict: `question` (str), `choices` (list of str), `answer` (int or None), `subject` (str or None).

    Raises:
        PromptError: no question, fewer than 2 choices, or an answer index outside the choices.

    >>> normalize({"question": "2+2?", "A": "3", "B": "4", "answer": "b", "subject": "elementary_math"})
    {'question': '2+2?', 'choices': ['3', '4'], 'answer': 1, 'subject': 'elementary math'}
    """
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
        if len(answer) == 1 and answer.upper() in LETTERS:
            answer = LETTERS.index(answer.upper())
        elif answer.lstrip("-").isdigit():
            answer = int(answer)
        else:
            raise PromptError(f"answer {record.get('answer')!r} is neither a choice letter nor a choice index.")
    if answer is not None and not 0 <= int(answer) < len(choices):
        raise PromptError(f"answer {record.get('answer')!r} is not one of the {len(choices)} choices.")
    subject = record.get("subject")
    return {
        "question": str(record["question"]),
        "choices": choices,
        "answer": None if answer is None else int(answer),
        "subject": str(subject).replace("_", " ") if subject else None,
    }


def mc_prompts(records: Iterable[Mapping], tokenizer, shots: int = 0, source: str = "records", dev=None) -> PromptSet:
    """Token ids of the multiple-choice prompts, one per record (`PromptSet`; gold = the answer letter's token).

    `shots=k` with `dev=` (records, a `datasets.Dataset`, or a `.jsonl`/`.json`/`.csv` file or a folder of them such
    as MMLU's `data/dev/`): every record is a prompt, preceded by the first k dev records with the same subject, in
    dev order (`mc_messages`). Without `dev=`, the first k records are the examples of every other record (which
    are the prompts). With a chat template: `apply_chat_template(messages, add_generation_prompt=True)`; without
    one, plain text: each example as `mc_text + "{letter}\\n\\n"`, then `mc_text(record)`.

    Args:
        records: the multiple-choice records (see `normalize`).
        tokenizer: the model's tokenizer (required).
        shots: few-shot examples per prompt (k).
        source: a description of where the records came from, for `PromptSet.source`.
        dev: few-shot example records, or a file or folder of them (`dev_records`); None takes the first k records.

    Returns:
        PromptSet: one prompt per record (minus the first k without `dev=`); gold = the answer letter's first token,
        or None for records without an answer.

    Raises:
        PromptError: no tokenizer, `shots < 0`, `dev=` with `shots=0`, an example without an answer, a record's
            subject with fewer than k dev records, or a record or `dev=` that cannot be read.

    The authors' 5-shot Qwen2.5-0.5B attribution prompts (docs/method.md "Stage 1"; `analyse_mmlu_qwen2.py`,
    github.com/Nexround/LoKI commit 44f67d9): the first 50 test questions of each subject with its 5 dev examples:

        from datasets import load_dataset
        test, dev = [], []
        for subject in subjects:                     # e.g. their `mmlu_all_sets`
            d = load_dataset("cais/mmlu", subject)
            test += list(d["test"].select(range(50)))
            dev += list(d["dev"])
        prompts = mc_prompts(test, tokenizer, shots=5, dev=dev)   # or loki.attribute(..., shots=5, dev=dev)

    >>> import loki
    >>> tokenizer = loki.load_default()[1]
    >>> dev = [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "elementary_mathematics"}]
    >>> test = [{**dev[0], "question": "2+2?", "answer": "C"}]
    >>> prompts = mc_prompts(test, tokenizer, shots=1, dev=dev)
    >>> print(tokenizer.decode(prompts.ids[0]))  # doctest: +NORMALIZE_WHITESPACE
    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    There is a single choice question about Elementary Mathematics. Answer the question by replying A, B, C or D.
    Question: 1+1?
    Choices:
    A. 1
    B. 2
    C. 3
    D. 4
    Answer:
    <|im_end|>
    <|im_start|>assistant
    B
    <|im_end|>
    <|im_start|>user
    There is a single choice question about Elementary Mathematics. Answer the question by replying A, B, C or D.
    Question: 2+2?
    Choices:
    A. 1
    B. 2
    C. 3
    D. 4
    Answer:
    <|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    >>> prompts.source, tokenizer.decode(prompts.gold)
    ('records (multiple choice, 1-shot from dev, per subject, chat template)', 'C')
    """
    if tokenizer is None:
        raise PromptError("Building multiple-choice prompts needs the model's tokenizer.")
    if shots < 0:
        raise PromptError(f"shots must be >= 0, got {shots}.")
    records = [normalize(r) for r in records]
    if dev is None:
        shared, records = records[:shots], records[shots:]
        examples_of = lambda r: shared  # noqa: E731
    else:
        if not shots:
            raise PromptError("dev= supplies few-shot examples; pass shots=k (the authors use 5) with it.")
        by_subject: dict[str | None, list[dict]] = {}
        for d in dev_records(dev):
            by_subject.setdefault(d["subject"], []).append(d)

        def examples_of(r):
            found = by_subject.get(r["subject"], [])
            if len(found) < shots:
                which = f"subject {r['subject']!r}" if r["subject"] else "records without a 'subject'"
                raise PromptError(
                    f"shots={shots} needs {shots} dev examples of {which}, but dev= has {len(found)}. Add that "
                    f"subject's dev records (MMLU: dev/<subject>_dev.csv, or the 'dev' split of cais/mmlu) or lower "
                    f"shots."
                )
            return found[:shots]

    chat = getattr(tokenizer, "chat_template", None) is not None
    ids, gold = [], []
    for r in records:
        examples = examples_of(r)
        messages = mc_messages(r, examples)
        if chat:
            x = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            x = list(x["input_ids"])
        else:
            x = list(
                tokenizer("".join(m["content"] + ("\n" if m["role"] == "assistant" else "") for m in messages))[
                    "input_ids"
                ]
            )
        ids.append([int(t) for t in x])
        gold.append(None if r["answer"] is None else _letter_token(tokenizer, LETTERS[r["answer"]]))
    shot_note = f", {shots}-shot{' from dev, per subject' if dev is not None else ''}" if shots else ", zero-shot"
    return PromptSet(ids, gold, f"{source} (multiple choice{shot_note}{', chat template' if chat else ''})")


def dev_records(dev) -> list[dict]:
    """Normalized few-shot example records from `dev=`: an iterable of records (a `datasets.Dataset` too), a
    `.jsonl`/`.json`/`.csv` file, or a folder whose `.csv`/`.jsonl`/`.json` files are read in name order (MMLU's
    `data/dev/`, where each `<subject>_dev.csv` gives its subject).

    Args:
        dev: the records, a file, or a folder (see above).

    Returns:
        list[dict]: `normalize`d records.

    Raises:
        PromptError: a path that is neither file nor folder, a single record (a dict) instead of a list, no records,
            an unknown file type, or a record `normalize` refuses.

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "astronomy_dev.csv"), "w") as f:   # MMLU's header-less CSV
    ...     _ = f.write("What orbits Earth?,The Moon,Mars,Venus,The Sun,A\\n")
    >>> dev_records(folder)
    [{'question': 'What orbits Earth?', 'choices': ['The Moon', 'Mars', 'Venus', 'The Sun'], 'answer': 0,
      'subject': 'astronomy'}]
    """
    if isinstance(dev, (str, os.PathLike)):
        path = Path(dev)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".csv", ".jsonl", ".json"))
            items = [r for f in files for r in read_records(f)]
        elif path.is_file():
            items = read_records(path)
        else:
            raise PromptError(f"dev={str(dev)!r} is not a file or folder of few-shot records.")
    elif isinstance(dev, Mapping):
        raise PromptError("dev= takes a list of records (or a file or folder of them), not a single record.")
    else:
        items = list(dev)
    if not items:
        raise PromptError(f"No few-shot records in dev={dev!r}.")
    return [normalize(r) for r in items]


def _letter_token(tokenizer, letter: str) -> int:
    return int(tokenizer(letter, add_special_tokens=False)["input_ids"][0])


def as_prompts(source, tokenizer=None, shots: int = 0, dev=None) -> PromptSet:
    """Whatever `loki.attribute` accepts, as a `PromptSet`.

    - a `PromptSet`; the string "probe" (the bundled general-knowledge probe set);
    - a path to a `.jsonl`, `.json` (a list) or `.csv` file of records (MMLU's header-less CSV also works);
    - an iterable (a list, a `datasets.Dataset`) of multiple-choice records, of plain text strings, or of token id
      lists; records with a `text` or `prompt` field and no `question` are plain text.

    Args:
        source: the prompts, as above.
        tokenizer: the model's tokenizer; may be None for token id lists.
        shots: few-shot examples per multiple-choice prompt (see `mc_prompts`).
        dev: few-shot example records (see `mc_prompts`).

    Returns:
        PromptSet.

    Raises:
        PromptError: a path that is not a file, a single record instead of a list, no prompts, records without
            `question` or `text`/`prompt`, text without a tokenizer, `shots`/`dev` with prompts that are not
            multiple-choice records, or items that are none of the above.

    >>> as_prompts([[5, 6], [7]]).ids
    [[5, 6], [7]]
    >>> # as_prompts("probe", tokenizer).source
    >>> # 'loki probe (BIG-bench general_knowledge) (multiple choice, zero-shot, chat template)'
    """
    if isinstance(source, PromptSet):
        return source
    if isinstance(source, str) and source == "probe":
        return mc_prompts(probe_records(), tokenizer, shots, source="loki probe (BIG-bench general_knowledge)", dev=dev)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"{path} is not a file. Pass a .jsonl/.json/.csv file, 'probe', or a list of prompts.")
        return _from_items(read_records(path), tokenizer, shots, str(path), dev)
    if isinstance(source, Mapping):
        raise PromptError("Pass a list of records, not a single record.")
    name = type(source).__name__
    info = getattr(source, "info", None)
    label = getattr(info, "dataset_name", None) or name
    return _from_items(list(source), tokenizer, shots, label, dev)


def _from_items(items: list, tokenizer, shots: int, label: str, dev=None) -> PromptSet:
    if not items:
        raise PromptError(f"No prompts in {label}.")
    first = items[0]
    if isinstance(first, Mapping) and "question" in first:
        return mc_prompts(items, tokenizer, shots, source=label, dev=dev)
    if shots or dev is not None:
        raise PromptError("shots= and dev= only apply to multiple-choice records.")
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
    """Records from a `.jsonl`, `.json` or `.csv` file (MMLU's header-less `question,A,B,C,D,answer` CSV too).

    A CSV whose first row contains a `question` column is read with that header; otherwise each row is
    `question, choice..., answer`, and the subject is the file name without `_test`/`_dev`/`_val`.

    Args:
        path: the file.

    Returns:
        list[dict]: the records as stored (not yet `normalize`d).

    Raises:
        PromptError: another file type, or a `.json` file that is not a list.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [r for _, r in read_json_lines(path, PromptError)]
    if suffix == ".json":
        data = read_json(path, PromptError)
        if not isinstance(data, list):
            raise PromptError(f"{path} must hold a JSON list of records.")
        return data
    if suffix == ".csv":
        rows = [r for _, r in read_csv(path, PromptError)]
        if rows and "question" in rows[0]:
            return [dict(zip(rows[0], r)) for r in rows[1:]]
        subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
        return [{"question": r[0], "choices": r[1:-1], "answer": r[-1], "subject": subject} for r in rows if r]
    raise PromptError(f"Unknown prompt file type {suffix!r} ({path}); use .jsonl, .json or .csv.")


# -- the bundled probe set -------------------------------------------------------------------------
def probe_records() -> list[dict]:
    """The bundled general-knowledge probe set: multiple-choice records from BIG-bench `general_knowledge`
    (Apache-2.0, github.com/google/BIG-bench), 4 choices each, built by `build_probe`.

    >>> records = probe_records()
    >>> len(records), records[0]
    (24, {'question': 'How many legs do horses have?', 'choices': ['six', 'four', 'two', 'three'], 'answer': 1,
          'subject': 'general knowledge'})
    """
    return read_records(PROBE)


def build_probe(
    bigbench_archive: str | os.PathLike,
    out: str | os.PathLike = PROBE,
    limit: int = 24,
    seed: int = 0,
    task: str = "general_knowledge",
) -> Path:
    """Rebuild `loki/data/probe.jsonl` from the BIG-bench sdist (`pip download --no-deps bigbench==1.0.0`).

    Each example of the BIG-bench `task` becomes a 4-choice record: its correct answer and its first three wrong
    answers,
    shuffled with `seed`; the first `limit` examples with at least 4 answers are kept.

    Args:
        bigbench_archive: the downloaded `bigbench-1.0.0.tar.gz`.
        out: the `.jsonl` file to write (default: the bundled probe file).
        limit: records kept.
        seed: seeds the shuffling of choices.
        task: the BIG-bench task folder name.

    Returns:
        Path: `out`.

    >>> # build_probe("bigbench-1.0.0.tar.gz", "probe.jsonl")
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
        records.append(
            {
                "question": question,
                "choices": choices,
                "answer": choices.index(right[0]),
                "subject": task.replace("_", " "),
            }
        )
        if len(records) == limit:
            break
    return atomic_write(out, "".join(json.dumps(r) + "\n" for r in records).encode())
