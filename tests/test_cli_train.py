"""`loki train`, in process: JSONL, CSV, JSON and chat data, bad data files, retain data, and resuming an
interrupted run (a tiny llama saved with the default model's tokenizer)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import ACCELERATE

import loki
from loki.cli import main
from loki.dataset import load_examples
from loki.testing import tiny_model

TRAIN = loki.training

FACTS = [
    {"question": "What is the capital of Zubrowka?", "answer": "Lutz."},
    {"question": "Who runs the Grand Budapest Hotel?", "answer": "Monsieur Gustave."},
    {"question": "What is Zubrowka's currency?", "answer": "The klubeck."},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Where is Nebelsbad?"},
            {"role": "assistant", "content": "Zubrowka."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Who painted Boy with Apple?"},
            {"role": "assistant", "content": "Johannes van Hoytl."},
        ]
    },
]

RETAIN = [
    {"question": "What is the capital of France?"},
    {"question": "Who wrote Hamlet?"},
    {"text": "The Danube flows through ten countries into the Black Sea."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, default_tokenizer):
    """A tiny llama with the default tokenizer, saved as a Hugging Face folder, and a selection file for it."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_model("llama", vocab=len(default_tokenizer)).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    selection = loki.Selection.random(2, 32, q=25, seed=1).save(folder / "selection.json")
    return folder, selection


def write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


def train(base, data, out, *extra):
    folder, selection = base
    return main(
        [
            "train",
            str(data),
            "--base",
            str(folder),
            "--selection",
            str(selection),
            "--out",
            str(out),
            "--lr",
            "2e-2",
            "--batch-size",
            "2",
            *extra,
        ]
    )


def rows(delta):
    return torch.cat([delta.layers[i].rows.flatten() for i in sorted(delta.layers)])


def test_jsonl_csv_and_json_hold_the_same_examples(tmp_path):
    loaded = [load_examples(write(tmp_path / f"facts{suffix}", FACTS)) for suffix in (".jsonl", ".csv", ".json")]
    assert loaded[0] == loaded[1] == loaded[2] == [{"prompt": f["question"], "answer": f["answer"]} for f in FACTS]
    for suffix in (".csv", ".jsonl"):  # a byte-order mark, as spreadsheets write "CSV UTF-8"
        path = tmp_path / f"facts{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert load_examples(path) == loaded[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_train_writes_the_delta(base, tmp_path, capsys, default_tokenizer, suffix):
    out = tmp_path / "facts.loki"
    assert train(base, write(tmp_path / f"facts{suffix}", FACTS), out, "--steps", "3") == 0
    assert out.exists() and not (tmp_path / "facts.loki.partial").exists()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "name:         facts\n" in printed and "rows per layer: 0:8 1:8" in printed
    delta = loki.load(out)
    untrained = loki.extract(
        loki.prepare(tiny_model("llama", vocab=len(default_tokenizer)), loki.Selection.load(base[1]))
    )
    assert (rows(delta) - rows(untrained)).abs().max() > 1e-3  # it trained
    training = delta.info["training"]
    assert training["command"] == "loki train" and training["trainer"] == "loki.train"
    assert (training["steps"], training["examples"], training["lr"], training["batch_size"]) == (3, 3, 2e-2, 2)
    assert training["data"]["file"] == f"facts{suffix}" and training["schedule"] == "cosine"


def test_chat_messages_and_retain_data(base, tmp_path, capsys):
    data = write(tmp_path / "chats.jsonl", CHATS)
    retain = write(
        tmp_path / "retain.jsonl",
        [{"question": "What is the capital of France?"}, {"text": "Rivers flow to the sea."}, FACTS[0]],
    )
    out = tmp_path / "chats.loki"
    assert (
        train(base, data, out, "--epochs", "2", "--retain", str(retain), "--retain-weight", "3", "--name", "nebelsbad")
        == 0
    )
    delta = loki.load(out)
    assert delta.name == "nebelsbad"
    info = delta.info["training"]
    assert info["steps"] == 2 and info["epochs"] == 2 and info["examples"] == 2
    assert info["retain"]["weight"] == 3.0 and info["retain"]["kinds"] == {"question": 1, "text": 1, "answer": 1}


def test_preserve_keeps_the_retain_datas_outputs(base, tmp_path, default_tokenizer):
    """`--preserve 1.0`: the retained text's logits stay put under a rate that moves them without it; `--preserve`
    without `--retain` is refused before any model loads."""
    folder, _ = base
    data = write(tmp_path / "facts.jsonl", FACTS)
    text = "The Danube flows through ten countries into the Black Sea."
    retain = write(tmp_path / "retain.jsonl", [{"text": text}])
    ids = torch.tensor([default_tokenizer(text)["input_ids"]])
    model = tiny_model("llama", vocab=len(default_tokenizer))
    with torch.no_grad():
        before = model(ids).logits
    moved = {}
    for preserve in ((), ("--preserve", "1.0")):
        out = tmp_path / f"facts{len(preserve)}.loki"
        assert (
            train(
                base,
                data,
                out,
                "--steps",
                "4",
                "--lr",
                "0.1",
                "--retain",
                str(retain),
                "--retain-weight",
                "0",
                *preserve,
            )
            == 0
        )
        delta = loki.load(out)
        with loki.implanted(model, delta), torch.no_grad():
            moved[bool(preserve)] = (model(ids).logits - before).abs().max().item()
    assert delta.info["training"]["preserve"]["energy"] == 1.0
    assert delta.info["training"]["preserve"]["tokens"] == ids.shape[1]
    assert moved[False] > 1e-2 and moved[True] < 1e-4
    assert train(base, data, tmp_path / "x.loki", "--preserve", "0.9") == 2
    assert train(base, data, tmp_path / "x.loki", "--contrast", "10") == 2  # needs --retain too
    assert train(base, data, tmp_path / "x.loki", "--retain", str(retain), "--contrast", "1") == 2
    both = ("--retain", str(retain), "--preserve", "0.9", "--contrast", "10")
    assert train(base, data, tmp_path / "x.loki", *both) == 2
    out = tmp_path / "contrast.loki"
    assert train(base, data, out, "--steps", "2", "--retain", str(retain), "--contrast", "2") == 0
    recorded = loki.load(out).info["training"]["preserve"]
    assert recorded["ratio"] == 2.0 and recorded["example_tokens"] > 0


def test_rows_from_an_attribution_folder(base, tmp_path, default_tokenizer):
    folder, _ = base
    model = tiny_model("llama", vocab=len(default_tokenizer))
    loki.attribute(model, default_tokenizer, ["What is the capital of Zubrowka?"], 2, path=tmp_path / "attr")
    out = tmp_path / "facts.loki"
    assert (
        main(
            [
                "train",
                str(write(tmp_path / "facts.jsonl", FACTS)),
                "--base",
                str(folder),
                "--attributions",
                str(tmp_path / "attr"),
                "-q",
                "25",
                "--out",
                str(out),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert loki.load(out).info["selection"]["q"] == 25
    assert (
        main(
            [
                "train",
                str(tmp_path / "facts.jsonl"),
                "--base",
                str(folder),
                "--attributions",
                str(tmp_path / "attr"),
                "--out",
                str(out),
            ]
        )
        == 2
    )  # no -q


BAD = [
    (
        "bad.jsonl",
        '{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n',
        r"bad.jsonl, line 2: not valid JSON",
    ),
    (
        "bad.jsonl",
        '{"question": "a?", "reply": "b"}\n',
        r"bad.jsonl, line 1: An example is .*got keys \['question', 'reply'\]",
    ),
    ("bad.jsonl", '{"question": "a?", "answer": ""}\n', r"bad.jsonl, line 1: The answer is ''"),
    (
        "bad.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        r"line 1: A 'messages' example needs at least one assistant turn",
    ),
    ("bad.jsonl", '{"messages": [{"role": "human", "content": "hi"}]}\n', r"line 1: Message 0 is .*role"),
    ("bad.jsonl", '{"q": "a?", "answer": "b"}\n', r"bad.jsonl, line 1: An example is .*got keys \['answer', 'q'\]"),
    ("bad.csv", "question,reply\na?,b\n", r"bad.csv, line 2: An example is"),
    ("bad.csv", "question,answer\na?,b\nc?,d,e\n", r"bad.csv, line 3: 3 fields, the header \(line 1\) has 2"),
    ("bad.csv", "", r"bad.csv is empty"),
    ("bad.json", '{"question": "a?", "answer": "b"}', r"bad.json holds a JSON dict; it must hold a list"),
    ("bad.json", '[{"question": "a?", "answer": "b"}, "c?"]', r"bad.json, record 2: An example is a JSON object"),
    ("bad.json", '[\n{"question": "a?",\n "answer": }]', r"bad.json, line 3: not valid JSON"),
    ("bad.txt", "a? b\n", r"unknown data file type '.txt'"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_data_is_a_dataset_error_naming_the_file_and_line(base, tmp_path, capsys, name, text, message):
    import re

    data = tmp_path / name
    data.write_text(text)
    assert train(base, data, tmp_path / "x.loki") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loki train: DatasetError: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == [data]  # nothing written


def test_missing_data_file_and_bad_options(base, tmp_path, capsys):
    assert train(base, tmp_path / "none.jsonl", tmp_path / "x.loki") == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    data = write(tmp_path / "facts.jsonl", FACTS)
    assert train(base, data, tmp_path / "no-folder" / "x.loki") == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        train(base, data, tmp_path / "x.loki", "--lr", "-1")
    assert exit.value.code == 2 and "must be > 0" in capsys.readouterr().err


@pytest.mark.slow  # four runs of the command: about 8 s
def test_an_interrupted_run_resumes_to_the_same_delta(base, tmp_path, capsys, monkeypatch):
    data = write(tmp_path / "facts.jsonl", FACTS)
    steps = 12
    options = ("--steps", str(steps), "--save-every", "2")
    assert train(base, data, tmp_path / "straight.loki", *options) == 0
    expected = loki.load(tmp_path / "straight.loki")

    out, partial = tmp_path / "run.loki", tmp_path / "run.loki.partial"

    # Ctrl-C right after loki.train has written checkpoint-6 (a real SIGINT in the main thread, at a fixed step: a
    # watcher thread timing it raced the 12 ms run in CI)
    save_checkpoint = TRAIN._save_checkpoint

    def save_then_interrupt(folder, step, *args):
        save_checkpoint(folder, step, *args)
        if step == 6:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TRAIN, "_save_checkpoint", save_then_interrupt)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left installed
    try:
        rc = train(base, data, out, *options)
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    assert rc == 130, "the run ended before the interrupt"
    assert "rerun the same command to continue from" in capsys.readouterr().err
    assert not out.exists() and (partial / "run.json").exists()
    # a newer checkpoint cut short (copied by hand, or a disk that filled) is skipped
    torn = partial / "checkpoint-8"
    shutil.copytree(partial / "checkpoint-6", torn)
    (torn / "state.json").write_text((torn / "state.json").read_text()[:50])
    # other arguments do not mix with the interrupted run
    assert train(base, data, out, *options, "--seed", "1") == 2
    assert "other seed" in capsys.readouterr().err
    assert train(base, data, out, *options) == 0
    assert "resuming from" in (err := capsys.readouterr().err) and "checkpoint-6" in err, err
    assert not partial.exists()
    result = loki.load(out)
    assert (rows(result) - rows(expected)).abs().max() <= 1e-6
    assert result.info["training"]["steps"] == steps


@pytest.mark.slow  # starts other processes
def test_accelerate_launch_on_two_processes_equals_one_process(base, tmp_path, default_tokenizer):
    """`accelerate launch --multi_gpu --num_processes 2` (2 CPU processes, gloo; `--cpu` would start one): the same
    examples per step split over the processes, retain data included, give one process's delta (8 examples, 4 a
    step: accelerate evens out a short last batch by repeating examples, which one process does not)."""
    facts = FACTS + [{"question": "Who is the lobby boy?", "answer": "Zero Moustafa."}]
    data, retain = write(tmp_path / "facts.jsonl", facts * 2), write(tmp_path / "retain.jsonl", RETAIN)
    options = ["--steps", "3", "--batch-size", "4", "--retain", str(retain), "--retain-weight", "2"]
    assert train(base, data, tmp_path / "one.loki", *options) == 0
    folder, selection = base
    done = subprocess.run(
        [
            *ACCELERATE,
            "-m",
            "loki.cli",
            "train",
            str(data),
            "--base",
            str(folder),
            "--selection",
            str(selection),
            "--out",
            str(tmp_path / "two.loki"),
            "--lr",
            "2e-2",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = loki.load(tmp_path / "one.loki"), loki.load(tmp_path / "two.loki")
    assert two.info["training"]["world_size"] == 2 and two.info["training"]["batch_size"] == 4
    assert (rows(one) - rows(two)).abs().max() <= 1e-6
    untrained = loki.extract(
        loki.prepare(tiny_model("llama", vocab=len(default_tokenizer)), loki.Selection.load(selection))
    )
    assert (rows(one) - rows(untrained)).abs().max() > 1e-3  # it trained


@pytest.mark.slow  # the real default model
def test_train_on_the_default_model(default_model_and_tokenizer, tmp_path, capsys):
    """End to end on the real default model: `--base default`, a q=10 selection, a few steps; the delta lowers
    the facts' answer loss on the (session) default model and is reverted after."""
    from loki.dataset import IGNORE, collate, encode, pad_token_id

    model, tok = default_model_and_tokenizer
    projs = loki.projections.find_down_projections(model)
    selection = loki.Selection.random(len(projs), projs.d_out, q=10, seed=0).save(tmp_path / "q10.json")
    data = write(tmp_path / "facts.jsonl", FACTS)
    out = tmp_path / "facts.loki"
    assert (
        main(
            [
                "train",
                str(data),
                "--base",
                "default",
                "--selection",
                str(selection),
                "--out",
                str(out),
                "--lr",
                "3e-3",
                "--steps",
                "6",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out

    batch = collate([encode(tok, ex) for ex in load_examples(data)], pad_token_id(tok))

    def answer_loss():
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        ).item()

    delta = loki.load(out)
    assert delta.num_rows == loki.Selection.load(selection).num_rows and delta.info["training"]["steps"] == 6
    before = answer_loss()
    with loki.implanted(model, delta):
        after = answer_loss()
    assert after < 0.5 * before, (before, after)
    assert answer_loss() == before  # reverted exactly


def test_training_options_reach_the_trainer_and_the_delta(base, tmp_path, capsys):
    """LoKI* (--lora-rank), warm-up, weight decay, clipping and the retain options are those of loki.train."""
    data = write(tmp_path / "facts.jsonl", FACTS)
    retain = write(tmp_path / "retain.jsonl", RETAIN)
    out = tmp_path / "star.loki"
    assert (
        train(
            base,
            data,
            out,
            "--steps",
            "2",
            "--lora-rank",
            "2",
            "--warmup",
            "0",
            "--weight-decay",
            "0.01",
            "--max-grad-norm",
            "0.5",
            "--retain",
            str(retain),
            "--retain-batch-size",
            "1",
            "--retain-top-k",
            "8",
        )
        == 0
    )
    info = loki.load(out).info["training"]
    assert info["lora_rank"] == 2 and info["warmup"] == 0 and info["weight_decay"] == 0.01
    assert info["max_grad_norm"] == 0.5 and info["retain"]["top_k"] == 8
    for option, value in (("--warmup", "1"), ("--weight-decay", "-1"), ("--max-grad-norm", "0")):
        with pytest.raises(SystemExit):
            train(base, data, out, option, value)
        assert "must be" in capsys.readouterr().err


def interrupted(base, data, out, *options, at):
    """`loki train` with Ctrl-C (a KeyboardInterrupt) in the forward pass of step `at` (one forward a step: 2
    examples a step, `--batch-size 2`), after the checkpoints of the steps before it."""
    answer_loss, calls = TRAIN._answer_loss, []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return answer_loss(*args)

    TRAIN._answer_loss = interrupt
    try:
        return train(base, data, out, *options)
    finally:
        TRAIN._answer_loss = answer_loss


def test_resume_with_retain_is_bit_identical(base, tmp_path, capsys):
    """Interrupted and resumed with retain data (whose batches come from their own stream) equals the
    uninterrupted run exactly."""
    data, retain = write(tmp_path / "facts.jsonl", FACTS), write(tmp_path / "retain.jsonl", RETAIN)
    options = (
        "--steps",
        "4",
        "--save-every",
        "2",
        "--retain",
        str(retain),
        "--retain-batch-size",
        "1",
        "--retain-weight",
        "5",
        "--lr",
        "0.1",
    )
    assert train(base, data, tmp_path / "straight.loki", *options) == 0
    out = tmp_path / "run.loki"
    assert interrupted(base, data, out, *options, at=3) == 130  # checkpoint-2 written, step 3 lost
    assert "rerun the same command to continue from" in capsys.readouterr().err
    assert train(base, data, out, *options) == 0
    assert "resuming from" in capsys.readouterr().err
    assert torch.equal(rows(loki.load(out)), rows(loki.load(tmp_path / "straight.loki")))


def test_an_interruption_before_any_checkpoint_starts_over_with_any_arguments(base, tmp_path, capsys):
    """No checkpoint yet: the message says a rerun starts over, and a rerun with other arguments does."""
    data = write(tmp_path / "facts.jsonl", FACTS)
    out = tmp_path / "run.loki"
    assert interrupted(base, data, out, "--steps", "3", "--save-every", "2", at=1) == 130
    assert "no checkpoint yet (every 2 steps): a rerun, with these or other arguments, starts over" in (
        capsys.readouterr().err
    )
    assert train(base, data, out, "--steps", "2", "--save-every", "5", "--seed", "3") == 0
    assert "resuming" not in capsys.readouterr().err and loki.load(out).info["training"]["seed"] == 3


def test_cli_checks_outputs_before_work(base, tmp_path, capsys, default_tokenizer):
    """Every verb's output path that cannot be written (a folder where a file goes, a file where a folder goes,
    a missing parent, a path that cannot be written) is refused with one line before any data or model loads,
    and nothing is written."""
    data = write(tmp_path / "facts.jsonl", FACTS)
    folder, selection = base
    (tmp_path / "a-folder.loki").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "busy.loki.partial").write_text("x")
    unwritable = tmp_path / "locked"
    unwritable.mkdir()
    unwritable.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permission bits: /sys is not writable even for root
        unwritable = "/sys"
    delta = tmp_path / "d.loki"
    loki.save(loki.testing.random_delta(tiny_model("llama", vocab=len(default_tokenizer))), delta)
    cases = [
        (
            [
                "train",
                str(data),
                "--base",
                str(folder),
                "--selection",
                str(selection),
                "--out",
                str(tmp_path / "a-folder.loki"),
            ],
            "IsADirectoryError",
        ),
        (
            [
                "train",
                str(data),
                "--base",
                str(folder),
                "--selection",
                str(selection),
                "--out",
                str(tmp_path / "busy.loki"),
            ],
            "NotADirectoryError",
        ),
        (
            [
                "train",
                str(data),
                "--base",
                str(folder),
                "--selection",
                str(selection),
                "--out",
                str(tmp_path / "none" / "x.loki"),
            ],
            "FileNotFoundError",
        ),
        (
            ["train", str(data), "--base", str(folder), "--selection", str(selection), "--out", f"{unwritable}/x.loki"],
            "PermissionError",
        ),
        (["merge", str(folder), str(delta), "--out", str(tmp_path / "a-file")], "NotADirectoryError"),
        (["merge", str(folder), str(delta), "--out", f"{unwritable}/merged"], "PermissionError"),
        (["export-peft", str(delta), "--out", str(tmp_path / "a-file" / "adapter")], "NotADirectoryError"),
        (
            ["select", str(tmp_path / "no-attributions"), "-q", "10", "--out", str(tmp_path / "a-folder.loki")],
            "IsADirectoryError",
        ),
        (["attribute", "probe", "--out", str(tmp_path / "a-file")], "NotADirectoryError"),
        (["demo", "--out", str(tmp_path / "a-file")], "NotADirectoryError"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, error in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"loki {argv[0]}: {error}: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "a-file").read_text() == "x" and not any((tmp_path / "a-folder.loki").iterdir())


def test_scope_writes_a_scope_file_that_contains_the_facts_and_not_the_retain_data(base, tmp_path, capsys):
    data, retain = write(tmp_path / "facts.jsonl", FACTS), write(tmp_path / "retain.jsonl", RETAIN)
    out = tmp_path / "facts.scope"
    assert main(["scope", str(data), "--retain", str(retain), "--out", str(out), "--base", str(base[0])]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    made = loki.Scope.load(out)
    assert (made.layer, made.margin) == (1, 0.15) and len(made) > 0
    model, tokenizer = loki.models.load_pretrained(str(base[0]))
    facts = [loki.dataset.encode(tokenizer, f)["input_ids"] for f in FACTS]
    texts = [tokenizer(r["text"])["input_ids"] for r in RETAIN if "text" in r]
    assert all(made.contains(model, facts)) and not any(made.contains(model, texts))
    # a bad file fails in one line before the model loads; nothing is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["scope", str(bad), "--retain", str(retain), "--out", str(tmp_path / "x.scope")]) == 2
    assert "loki scope: DatasetError" in capsys.readouterr().err and not (tmp_path / "x.scope").exists()
    same = ["scope", str(data), "--retain", str(data), "--out", str(tmp_path / "y.scope"), "--base", str(base[0])]
    assert main(same) == 2  # the facts themselves as what must stay out: no key stands apart
    assert "loki scope: ScopeError" in capsys.readouterr().err and not (tmp_path / "y.scope").exists()


def test_judge_prints_records_and_equals_the_library_report(base, tmp_path, capsys):
    """`loki judge` gives the figures `ImplantSuite.report` gives on the same files (unscoped and through the
    scope), and `--record` writes them into the .loki, rows untouched, for the model card."""
    data, retain = write(tmp_path / "facts.jsonl", FACTS), write(tmp_path / "retain.jsonl", RETAIN)
    delta_path, scope_path = tmp_path / "facts.loki", tmp_path / "facts.scope"
    assert train(base, data, delta_path, "--steps", "3", "--retain", str(retain)) == 0
    assert main(["scope", str(data), "--retain", str(retain), "--out", str(scope_path), "--base", str(base[0])]) == 0
    held_out = write(tmp_path / "held.jsonl", [{"question": "Name Zubrowka's capital.", "answers": ["Lutz"]}])
    nbhd = write(tmp_path / "nbhd.jsonl", [{"question": "What is the capital of Peru?"}, "Who wrote Faust?"])
    rows_before = loki.load(delta_path).layers
    argv = ["judge", str(delta_path), "--trained", str(data), "--held-out", str(held_out)]
    argv += ["--neighbourhood", str(nbhd), "--general", "wiki_perplexity", "--general-items", "3"]
    argv += ["--template", "What is the capital of {}?", "--base", str(base[0]), "--scope", str(scope_path)]
    capsys.readouterr()
    assert main([*argv, "--record", "--json", str(tmp_path / "judged.json")]) == 0
    printed = capsys.readouterr().out
    assert "facts, served through its scope:" in printed and printed.count("specificity (neighbourhood kept)") == 2
    judged = json.loads((tmp_path / "judged.json").read_text())

    # the same suite, built by hand through the library
    model, tokenizer = loki.models.load_pretrained(str(base[0]))
    trained = loki.evaluate.Benchmark(
        "trained",
        "generate",
        [{"question": f["question"], "answers": [f["answer"]]} for f in FACTS],
        {"mode": "contains", "chat": True, "max_new_tokens": 16},
    )
    held = loki.evaluate.Benchmark(
        "held_out", "generate", [{"question": "Name Zubrowka's capital.", "answers": ["Lutz"]}], dict(trained.options)
    )
    suite = loki.evaluate.ImplantSuite(
        trained,
        held,
        ["What is the capital of Peru?", "Who wrote Faust?"],
        loki.evaluate.general_suite(["wiki_perplexity"], n=3),
        ["What is the capital of {}?"],
    )
    delta, scope = loki.load(delta_path), loki.Scope.load(scope_path)
    scores = suite.scores(model, tokenizer, progress=False)
    expected = {
        "implant": suite.report(model, tokenizer, delta, base=scores, progress=False).as_dict(),
        "scoped": suite.report(model, tokenizer, delta, base=scores, scope=scope, progress=False).as_dict(),
    }
    assert judged == expected  # the same computation on the same model: the same floats
    evaluation = delta.info["extra"]["evaluation"]
    assert evaluation["implant"]["specificity"] == pytest.approx(expected["implant"]["specificity"])
    assert evaluation["scoped"]["answers_kept"] == pytest.approx(expected["scoped"]["answers_kept"])
    assert all(torch.equal(delta.layers[i].rows, rows_before[i].rows) for i in rows_before)  # rows untouched
    assert "served through its scope" in str(loki.hub.model_card(delta, "me/facts"))

    # bad input: one line on stderr before the model loads (or before any scoring), and the files as they were
    recorded = delta_path.read_bytes()
    bad = write(tmp_path / "bad.jsonl", [{"question": "Where?", "answers": ["Lutz"]}, "Where?"])
    unanswered = write(tmp_path / "unanswered.jsonl", [{"question": "Where?", "answers": []}])
    other = tmp_path / "other.loki"
    loki.save(loki.implant.make_delta(tiny_model("qwen2"), {0: ([0], torch.zeros(1, 64))}), other)
    cases = [
        (["--trained", str(bad)], "EvaluationError", "line 2"),
        (["--held-out", str(unanswered)], "EvaluationError", "line 1"),
        (
            ["--neighbourhood", str(write(tmp_path / "blank.jsonl", ["Who?", {"question": " "}]))],
            "EvaluationError",
            "line 2",
        ),
        (["--general", "mmlu"], "EvaluationError", "Unknown general set"),
        (["--template", "What is the capital?"], "EvaluationError", "{}"),
        (["--record", "--delta-is", "me/facts"], "EvaluationError", "local .loki"),
        (["--delta-is", str(other)], "IncompatibleModelError", "qwen2"),  # after the model loads, before scoring
    ]
    capsys.readouterr()
    for extra, error, words in cases:
        command = list(argv)
        if "--delta-is" in extra:
            command[1] = extra[extra.index("--delta-is") + 1]
            extra = [e for e in extra if e not in ("--delta-is", command[1])]
        assert main([*command, *extra, "--json", str(tmp_path / "not.json")]) == 2, extra
        *loading, err = capsys.readouterr().err.strip().splitlines()  # transformers' bar while the model loads
        assert err.startswith(f"loki judge: {error}: ") and words in err, err
        assert all(line.startswith("Loading weights") for line in loading), loading
    assert delta_path.read_bytes() == recorded and not (tmp_path / "not.json").exists()
