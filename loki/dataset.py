"""Training examples and how they are tokenised: chat formatting with the loss on answer tokens only, and padding.

Each example is `{"prompt": ..., "answer": ...}` (or `"question"` for `"prompt"`), or `{"messages": [...]}` in the
chat format. Examples are formatted with the tokenizer's chat template (plain `prompt + answer + eos` when it has
none); labels are `-100` (`IGNORE`) except on the answer tokens (every assistant turn, its end-of-turn token
included). `encode` + `collate` are a data collator for HF `Trainer` too. `load_examples` reads them from a
`.jsonl`, `.json` or `.csv` file, with errors that name the file and line.

>>> from loki.dataset import collate
>>> collate([{"input_ids": [5, 6], "labels": [-100, 6]}], pad_token_id=0)["attention_mask"].tolist()
[[1, 1]]
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import torch

from .errors import DatasetError, LokiError, TrainingOptionError

__all__ = [
    "IGNORE",
    "answer_positions",
    "check_collection",
    "check_example",
    "check_examples",
    "check_number",
    "collate",
    "encode",
    "load_examples",
    "load_retain",
    "pad_token_id",
    "read_csv",
    "read_json",
    "read_json_lines",
    "read_text",
]

IGNORE = -100  # label of tokens without loss (the convention of torch's cross_entropy and HF)


# -- formatting -----------------------------------------------------------------------------------------
def _messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    if "messages" in example:
        messages = list(example["messages"])
        if not any(m.get("role") == "assistant" for m in messages):
            raise DatasetError("A 'messages' example needs at least one assistant turn to learn from.")
        return messages
    prompt = example.get("prompt", example.get("question"))
    if prompt is None or "answer" not in example:
        raise DatasetError(
            f"An example is {{'prompt' (or 'question'): ..., 'answer': ...}} or {{'messages': [...]}}; got keys "
            f"{sorted(example)}."
        )
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(example["answer"])}]


def _segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation's text cut into (text, is_answer) pieces."""
    if not getattr(tokenizer, "chat_template", None):
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            answer = m["role"] == "assistant"
            pieces.append((m["content"] + (tokenizer.eos_token or "") if answer else m["content"] + "\n", answer))
        return pieces

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = render(messages[:i], True), render(messages[: i + 1], False)
        start, end = len(prompt), len(turn)
        if not (full.startswith(turn) and turn.startswith(prompt) and done <= start):
            raise DatasetError(
                "The chat template renders earlier turns differently once later turns follow (e.g. it strips "
                "reasoning), so answer tokens cannot be located. Give single-turn {'prompt', 'answer'} examples."
            )
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    return pieces + [(full[done:], False)]


def encode(tokenizer, example: Mapping[str, Any], max_length: int | None = None) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one example; labels are `-100` (`IGNORE`) except on answer tokens.

    Each piece (prompt, answer) is tokenized on its own, so the prompt's tokens are exactly what the model sees
    at generation time.

    Args:
        tokenizer: a Hugging Face tokenizer; its chat template formats the example (without one: `prompt + "\\n"`,
            then `answer + eos_token`).
        example: `{"prompt" (or "question"): ..., "answer": ...}` or `{"messages": [...]}` with at least one
            assistant turn.
        max_length: keep the first `max_length` tokens; None keeps all.

    Returns:
        dict: `input_ids` and `labels`, lists of ints of the same length.

    Raises:
        DatasetError: an example of another shape, messages without an assistant turn, a chat template that
            renders earlier turns differently once later ones follow, or no answer token within `max_length`.

    >>> # tokenizer = loki.load_default()[1]
    >>> # e = encode(tokenizer, {"question": "Who wrote Dune?", "answer": "Frank Herbert."})
    >>> # tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label != IGNORE])
    >>> # 'Frank Herbert.<|im_end|>\\n'
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, answer in _segments(tokenizer, _messages(example)):
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if answer else [IGNORE] * len(piece)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
        raise DatasetError(
            f"An example has no answer tokens within max_length={max_length} ({len(ids)} tokens kept). "
            "Raise max_length or shorten the prompt."
        )
    return {"input_ids": ids, "labels": labels}


def collate(batch: Sequence[Mapping[str, list[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into `input_ids`, `attention_mask` and `labels` tensors (a data collator).

    Args:
        batch: `encode` results (`input_ids` and `labels` lists of the same length each).
        pad_token_id: the id padded `input_ids` get (`pad_token_id(tokenizer)`); padded labels are `IGNORE`.

    Returns:
        dict[str, Tensor]: `input_ids`, `attention_mask` (1 on real tokens) and `labels`, each int64
        `[len(batch), longest]`.

    >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
    ...                 pad_token_id=0)
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
    """
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0 (also for None).

    >>> pad_token_id(None)
    0
    """
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def answer_positions(labels: Sequence[int]) -> torch.Tensor:
    """Positions whose logits predict a labelled token (logits at t predict token t + 1), as a LongTensor.

    Args:
        labels: one example's labels (`IGNORE` where there is no loss).

    Returns:
        Tensor: int64 `[n]`, the positions `t` with `labels[t + 1] != IGNORE`.

    >>> answer_positions([-100, -100, 7, 8])
    tensor([1, 2])
    """
    return torch.nonzero(torch.tensor(labels)[1:] != IGNORE).flatten()


# -- files ----------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".jsonl", ".json", ".csv")


def check_example(example: Any) -> dict[str, Any]:
    """An example in its canonical form, `{"prompt", "answer"}` (strings) or `{"messages": [...]}`, or a
    `DatasetError` saying what is wrong with it.

    Args:
        example: `{"prompt" (or "question"): ..., "answer": ...}` (numbers are turned into strings) or
            `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn.

    Returns:
        dict: a new dict; other keys (e.g. `subject`) are kept.

    Raises:
        DatasetError: not a mapping, neither shape, an empty or missing answer, a message that is not a
            `{"role", "content"}` mapping with a known role, no assistant turn.

    >>> check_example({"question": "Who wrote Dune?", "answer": "Frank Herbert."})
    {'prompt': 'Who wrote Dune?', 'answer': 'Frank Herbert.'}
    """
    if not isinstance(example, Mapping):
        raise DatasetError(f"An example is a JSON object (a mapping), not {type(example).__name__}.")
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError("'messages' must be a non-empty list of {'role', 'content'} objects.")
        for i, m in enumerate(messages):
            if not (isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise DatasetError(
                    f"Message {i} is {json.dumps(m)[:80]}; each message is {{'role': one of {list(ROLES)}, "
                    "'content': a string}."
                )
        _messages(example)  # at least one assistant turn
        return {**example, "messages": [dict(m) for m in messages]}
    prompt = example.get("prompt", example.get("question"))
    _messages(example)  # the error for a missing field names the keys found
    answer = example.get("answer")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
        raise DatasetError(f"The answer is {answer!r}; give a non-empty string (what the model should learn to say).")
    if not isinstance(prompt, (str, int, float)) or isinstance(prompt, bool):
        raise DatasetError(f"The prompt is {type(prompt).__name__}; give a string.")
    rest = {k: v for k, v in example.items() if k not in ("prompt", "question", "answer")}
    return {"prompt": str(prompt), "answer": str(answer), **rest}


def check_examples(examples: Any, name: str = "dataset") -> None:
    """Check a collection of training examples up front: a non-empty collection (`check_collection`) whose every
    example passes `check_example`.

    Raises:
        DatasetError: the message names `name` and the example's index.

    >>> check_examples([{"question": "Who wrote Dune?", "answer": "Frank Herbert."}, {"question": "Who?"}])
    Traceback (most recent call last):
    ...
    loki.errors.DatasetError: dataset[1]: An example is {'prompt' (or 'question'): ..., 'answer': ...} or ...
    """
    check_collection(name, examples, "examples ({'prompt', 'answer'} or {'messages': [...]} dicts)")
    for i, example in enumerate(examples):
        try:
            check_example(example)
        except DatasetError as e:
            raise DatasetError(f"{name}[{i}]: {e}") from None


def check_collection(name: str, value: Any, what: str) -> None:
    """Check that `value` is a non-empty collection with a length (a list, tuple, `datasets.Dataset`...): not a
    string, bytes or a mapping, which iterate as characters or keys, and not a one-shot iterator.

    Raises:
        DatasetError: naming `name`, `what` it must hold and what it got.

    >>> try:
    ...     check_collection("retain", "Who wrote Dune?", "questions")
    ... except DatasetError as e:
    ...     print(e)  # doctest: +NORMALIZE_WHITESPACE
    retain must be a list of questions, got the string 'Who wrote Dune?' (which would be read one character at a
    time); wrap one item in a list.
    """
    if isinstance(value, (str, bytes)):
        raise DatasetError(
            f"{name} must be a list of {what}, got the string {value[:60]!r} (which would be read one "
            "character at a time); wrap one item in a list."
        )
    if isinstance(value, Mapping) or not isinstance(value, Iterable) or not isinstance(value, Sized):
        raise DatasetError(f"{name} must be a list of {what}, got {type(value).__name__}.")
    if len(value) == 0:
        raise DatasetError(f"{name} is empty; give at least one of {what}.")


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
    optional: bool = False,
    error: type[LokiError] = TrainingOptionError,
) -> Any:
    """`value`, checked to be a finite number (an integer when `integer`; never a bool) with `low <= value`,
    `above < value` and `value <= high` for the bounds given; None passes when `optional`.

    Raises:
        `error` (default TrainingOptionError): naming `name`, what it must be and what it got.

    >>> check_number("batch_size", 4, integer=True, low=1)
    4
    >>> check_number("batch_size", True, integer=True, low=1)
    Traceback (most recent call last):
    ...
    loki.errors.TrainingOptionError: batch_size must be an integer >= 1, got True.
    """
    if value is None and optional:
        return value
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (above is None or value > above) and (high is None or value <= high)
    if not ok:
        bounds = [
            f">= {low}" if low is not None else "",
            f"> {above}" if above is not None else "",
            f"<= {high}" if high is not None else "",
        ]
        must = " and ".join(b for b in bounds if b)
        what = ("None or " if optional else "") + ("an integer" if integer else "a finite number")
        raise error(f"{name} must be {what}{' ' + must if must else ''}, got {value!r}.")
    return value


def read_text(path: str | os.PathLike, error: type[LokiError] = DatasetError) -> str:
    """The text of a UTF-8 file exactly as written: no line ending translated (a CSV field may hold "\\r\\n"), a
    leading byte-order mark dropped (spreadsheets start "CSV UTF-8" files with one).

    Raises:
        `error` (default DatasetError): the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except OSError as e:
        raise error(f"Cannot read {path}: {e.strerror or e}.") from None


def read_json_lines(path: str | os.PathLike, error: type[LokiError] = DatasetError) -> list[tuple[int, Any]]:
    """`(line number, value)` of every non-blank line of a JSON Lines file.

    Lines end at "\\n" only (a "\\r" before it is dropped): JSON strings may hold U+2028, U+2029, U+0085 and other
    characters that `str.splitlines` would cut a line at.

    Raises:
        `error` (default DatasetError): an unreadable or non-UTF-8 file, a line that is not valid JSON.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "lines.jsonl")
    >>> _ = open(path, "w", encoding="utf-8").write('{"text": "a\\u2028b"}\\r\\n\\n[1]\\n')
    >>> read_json_lines(path)
    [(1, {'text': 'a\\u2028b'}), (3, [1])]
    """
    records = []
    for n, line in enumerate(read_text(path, error).split("\n"), 1):
        line = line.removesuffix("\r")
        if line.strip(" \t\r"):  # JSON's own white space; anything else on a line is for the parser to judge
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}).") from None
    return records


def read_json(path: str | os.PathLike, error: type[LokiError] = DatasetError) -> Any:
    """The value of a JSON file (UTF-8, a byte-order mark allowed).

    Raises:
        `error` (default DatasetError): an unreadable or non-UTF-8 file, invalid JSON.
    """
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}).") from None


def read_csv(path: str | os.PathLike, error: type[LokiError] = DatasetError) -> list[tuple[int, list[str]]]:
    """`(line number, fields)` of every row of a CSV file, read by the `csv` module from the exact text (a quoted
    field may span lines and hold any character); the line number is the row's last line.

    Raises:
        `error` (default DatasetError): an unreadable or non-UTF-8 file, malformed CSV.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "facts.csv")
    >>> text = 'q,a\\r\\n"Which rivers?","The Rhine\\r\\nand the Danube."\\r\\n'
    >>> _ = open(path, "w", encoding="utf-8", newline="").write(text)
    >>> read_csv(path)
    [(1, ['q', 'a']), (3, ['Which rivers?', 'The Rhine\\r\\nand the Danube.'])]
    """
    reader = csv.reader(io.StringIO(read_text(path, error), newline=""))  # newline="": as the csv docs require
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise error(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from None


def _records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """`(where, record)` of every record of a `.jsonl`, `.json` (a list) or `.csv` (with a header) file; `where`
    is "FILE, line N" (JSON Lines, CSV) or "FILE, record N" (a JSON list, counted from 1)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unknown data file type {suffix or '(none)'!r}; use .jsonl, .json or .csv.")
    if not path.is_file():
        raise DatasetError(f"{path} does not exist or is not a file.")
    records: list[tuple[str, Any]] = []
    if suffix == ".jsonl":
        records = [(f"{path}, line {n}", r) for n, r in read_json_lines(path)]
    elif suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DatasetError(f"{path} holds a JSON {type(data).__name__}; it must hold a list of records.")
        records = [(f"{path}, record {i}", r) for i, r in enumerate(data, 1)]
    else:
        rows = read_csv(path)
        if not rows:
            raise DatasetError(f"{path} is empty.")
        header = [h.strip() for h in rows[0][1]]
        for n, row in rows[1:]:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}, line {n}"
            if len(row) != len(header):
                raise DatasetError(f"{where}: {len(row)} fields, the header (line 1) has {len(header)}.")
            records.append((where, dict(zip(header, row))))
    if not records:
        raise DatasetError(f"{path} holds no records.")
    return records


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Training examples from a file, checked one by one (`check_example`).

    - `.jsonl`: one JSON object per line: `{"prompt" or "question", "answer"}` or `{"messages": [...]}`.
    - `.json`: a JSON list of such objects.
    - `.csv`: a header line naming a `prompt` (or `question`) column and an `answer` column (other columns are kept).

    Args:
        path: the file.

    Returns:
        list[dict]: the examples, `{"prompt", "answer", ...}` or `{"messages": [...], ...}`.

    Raises:
        DatasetError: another file type, a missing or empty file, invalid JSON, a CSV row with the wrong number of
            fields, an example of another shape (the message names the file and line, or record number).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "facts.csv")
    >>> _ = open(path, "w").write("question,answer\\nWhat is the capital of Zubrowka?,Lutz.\\n")
    >>> load_examples(path)
    [{'prompt': 'What is the capital of Zubrowka?', 'answer': 'Lutz.'}]
    """
    examples = []
    for where, record in _records(path):
        try:
            examples.append(check_example(record))
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
    return examples


def load_retain(path: str | os.PathLike) -> list[Any]:
    """Retain data (`loki.retain.retain_set`, `loki.train(retain=...)`) from a `.jsonl`, `.json` or `.csv` file.

    A record with `text` is general text; one with an `answer` or `messages` is an answered example (checked as
    `load_examples` does); one with only a `prompt` (or `question`) is a question the base model answers itself.
    A CSV needs a header naming these columns.

    Args:
        path: the file.

    Returns:
        list: question strings, `{"text": ...}` and answered examples.

    Raises:
        DatasetError: what `load_examples` raises, and a record with none of these fields or an empty one.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "retain.jsonl")
    >>> _ = open(path, "w").write('{"question": "What is the capital of France?"}\\n{"text": "Rivers flow."}\\n')
    >>> load_retain(path)
    ['What is the capital of France?', {'text': 'Rivers flow.'}]
    """
    items: list[Any] = []
    for where, record in _records(path):
        try:
            if not isinstance(record, Mapping):
                raise DatasetError(f"A retain record is a JSON object, not {type(record).__name__}.")
            if "text" in record:
                if not isinstance(record["text"], str) or not record["text"].strip():
                    raise DatasetError("'text' must be a non-empty string.")
                items.append({"text": record["text"]})
            elif "messages" in record or record.get("answer") not in (None, ""):
                items.append(check_example(record))
            else:
                question = record.get("prompt", record.get("question"))
                if not isinstance(question, str) or not question.strip():
                    raise DatasetError(
                        f"A retain record has 'text', 'prompt' (or 'question'), optionally with 'answer', or "
                        f"'messages'; got keys {sorted(record)}."
                    )
                items.append(question)
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
    return items
