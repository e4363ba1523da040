"""Reading users' data files exactly (every format, every reader in loki) and checking options up front."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loki.dataset import check_collection, check_number, load_examples, load_retain, read_csv, read_json_lines
from loki.errors import DatasetError, EvaluationError, LokiError, PromptError, TrainingOptionError
from loki.evaluate import Benchmark
from loki.prompts import read_records

# Characters that line splitting, CSV quoting or JSON escaping could get wrong; all valid inside a value.
ODD = [
    "\u2028",
    "\u2029",
    "\u0085",
    "\r",
    "\n",
    "\r\n",
    '"',
    ",",
    "'",
    "\ufeff",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1e",
    "\x00",
    "\t",
    " ",
    "{}",
    "{0}",
    "\\",
]
TEXT = st.lists(st.one_of(st.sampled_from(ODD), st.characters(blacklist_categories=("Cs",))), max_size=12).map("".join)
ANSWER = TEXT.filter(lambda s: s.strip() != "")  # an answer must say something (check_example)


def write_csv(path: Path, header: list[str], rows: list[list[str]], bom: bool) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:  # newline="": the csv module writes "\r\n" itself
        f.write("\ufeff" if bom else "")
        csv.writer(f).writerows([header, *rows])


def write_jsonl(path: Path, records: list, end: str, bom: bool) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]  # U+2028 and U+0085 stay raw, unescaped
    path.write_bytes((("\ufeff" if bom else "") + "".join(line + end for line in lines)).encode("utf-8"))


@given(
    pairs=st.lists(st.tuples(TEXT, ANSWER), min_size=1, max_size=4),
    end=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_user_file_round_trips_exactly(pairs, end, bom):
    """Any strings written by the standard writers of each format loki reads come back unchanged, through every
    reader of users' files: training data, retain data, prompt records and benchmark files."""
    records = [{"question": q, "answer": a} for q, a in pairs]
    examples = [{"prompt": q, "answer": a} for q, a in pairs]
    texts = [{"text": a} for _, a in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_csv(folder / "data.csv", ["question", "answer"], [list(p) for p in pairs], bom)
        write_jsonl(folder / "data.jsonl", records, end, bom)
        (folder / "data.json").write_text(
            ("\ufeff" if bom else "") + json.dumps(records, ensure_ascii=False), encoding="utf-8"
        )
        write_jsonl(folder / "text.jsonl", texts, end, bom)
        write_csv(folder / "text.csv", ["text"], [[t["text"]] for t in texts], bom)
        benchmark = [{"question": q, "answers": [a]} for q, a in pairs]
        write_jsonl(folder / "benchmark.jsonl", benchmark, end, bom)
        for name in ("data.csv", "data.jsonl", "data.json"):
            assert load_examples(folder / name) == examples, name
            assert load_retain(folder / name) == examples, name
            assert read_records(folder / name) == records, name
        for name in ("text.jsonl", "text.csv"):
            assert load_retain(folder / name) == texts, name
        assert Benchmark.from_jsonl(folder / "benchmark.jsonl", kind="generate").items == benchmark


def test_odd_but_valid_files_are_read_exactly(tmp_path):
    """The examples from the issue: an answer quoted over two lines in a CSV, U+2028 inside a JSON Lines string,
    Windows line ends, a byte-order mark."""
    path = tmp_path / "rivers.csv"
    path.write_bytes(b'question,answer\r\nWhich rivers?,"The Rhine\r\nand the Danube."\r\n')
    assert load_examples(path) == [{"prompt": "Which rivers?", "answer": "The Rhine\r\nand the Danube."}]
    assert read_csv(path)[1] == (3, ["Which rivers?", "The Rhine\r\nand the Danube."])  # the row ends on line 3
    path = tmp_path / "lines.jsonl"
    path.write_bytes('\ufeff{"question": "Q\u2028R", "answer": "A\u0085B"}\r\n\r\n{"text": "T"}\r\n'.encode())
    assert read_json_lines(path) == [(1, {"question": "Q\u2028R", "answer": "A\u0085B"}), (3, {"text": "T"})]
    assert load_retain(path) == [{"prompt": "Q\u2028R", "answer": "A\u0085B"}, {"text": "T"}]


@pytest.mark.parametrize(
    "read, error",
    [
        (load_examples, DatasetError),
        (read_records, PromptError),
        (lambda p: Benchmark.from_jsonl(p, kind="generate"), EvaluationError),
    ],
)
def test_unreadable_user_files_name_the_file_and_line(tmp_path, read, error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "A", "answers": ["A"]}\n{"question": \n', encoding="utf-8")
    with pytest.raises(error, match=r"bad.jsonl, line 2: not valid JSON"):
        read(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "Où?", "answer": "Là."}\n'.encode("latin-1"))
    with pytest.raises(error, match="not UTF-8"):
        read(latin)


def test_check_number_refuses_bools_strings_nan_and_out_of_range():
    assert check_number("lr", 1e-3, above=0) == 1e-3 and check_number("max_steps", None, optional=True) is None
    for value in (True, "4", 4.0, 0, -1, None):
        with pytest.raises(TrainingOptionError, match=r"batch_size must be an integer >= 1"):
            check_number("batch_size", value, integer=True, low=1)
    for value in (math.nan, math.inf, -0.5, 1.5, False):
        with pytest.raises(TrainingOptionError, match=r"warmup must be a finite number >= 0 and <= 1"):
            check_number("warmup", value, low=0, high=1)
    assert issubclass(TrainingOptionError, (LokiError, ValueError))
    for value, match in [("abc", "one character"), ({"a": 1}, "dict"), (iter([1]), "list_iterator"), ([], "empty")]:
        with pytest.raises(DatasetError, match=match):
            check_collection("retain", value, "items")
