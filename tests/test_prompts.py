"""Few-shot prompts: `shots=k` with `dev=` reproduces the authors' 5-shot Qwen2.5 attribution prompts exactly.

The oracle is the authors' own `build_conversation`, copied verbatim below from `analyse_mmlu_qwen2.py` of
github.com/Nexround/LoKI at commit 44f67d9 ("First commit", the script behind the published Qwen selections):
per subject, its `dev` split (5 examples, in order) as earlier turns, then one of the first 50 `test` questions.
"""

from __future__ import annotations

import json

import pytest

import loki
from loki.prompts import PromptError, as_prompts, mc_messages, mc_prompts, mc_text


# -- the authors' code, verbatim (analyse_mmlu_qwen2.py @ 44f67d9) ----------------------------------
def build_conversation(subset, train_samples, test_sample):
    subject = subset.replace("_", " ").title()
    conversation = []
    for example in train_samples:
        question = f"There is a single choice question about {subject}. Answer the question by replying A, B, C or D.\n"
        question += f"Question: {example['question']}\nChoices:\n"
        question += "\n".join([f"{chr(65 + i)}. {choice}" for i, choice in enumerate(example["choices"])])
        human_msg = {"role": "user", "content": question + "\nAnswer: \n"}
        bot_msg = {"role": "assistant", "content": f"{chr(65 + example['answer'])}\n"}
        conversation.extend([human_msg, bot_msg])
    test_question = (
        f"There is a single choice question about {subject}. Answer the question by replying A, B, C or D.\n"
    )
    test_question += f"Question: {test_sample['question']}\nChoices:\n"
    test_question += "\n".join([f"{chr(65 + i)}. {choice}" for i, choice in enumerate(test_sample["choices"])])
    conversation.append({"role": "user", "content": test_question + "\nAnswer: \n"})
    return conversation


# -- a 2-subject fixture in the `cais/mmlu` layout --------------------------------------------------
BIO, POL = "high_school_biology", "us_foreign_policy"


def rec(subject, question, choices, answer):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


DEV_BIO = [rec(BIO, f"Bio dev {i}?", ["w", "x", "y", "z"], i % 4) for i in range(5)]
DEV_POL = [rec(POL, f"Policy dev {i}?", ["p", "q", "r", "s"], 3 - i % 4) for i in range(6)]  # 6: only 5 are used
DEV = [r for pair in zip(DEV_BIO + [None], DEV_POL) for r in pair if r is not None]  # subjects interleaved
TEST = [
    rec(BIO, "Which organelle makes ATP?", ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"], 1),
    rec(POL, "Who signs treaties?", ["Congress", "The President", "Courts", "States"], 1),
    rec(BIO, "What carries oxygen?", ["Plasma", "Platelets", "Red blood cells", "Neurons"], 2),
]


def authors_messages(record):
    dev = DEV_BIO if record["subject"] == BIO else DEV_POL[:5]
    return build_conversation(record["subject"], dev, record)


def user(subject, question, choices):
    return (
        f"There is a single choice question about {subject}. Answer the question by replying A, B, C or D.\n"
        f"Question: {question}\nChoices:\n"
        + "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", choices))
        + "Answer: \n"
    )


# The first test prompt through SmolLM2's chat template, written out.
EXPECTED_BIO_5SHOT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Bio dev 0?\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer: \n"
    "<|im_end|>\n<|im_start|>assistant\nA\n<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Bio dev 1?\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer: \n"
    "<|im_end|>\n<|im_start|>assistant\nB\n<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Bio dev 2?\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer: \n"
    "<|im_end|>\n<|im_start|>assistant\nC\n<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Bio dev 3?\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer: \n"
    "<|im_end|>\n<|im_start|>assistant\nD\n<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Bio dev 4?\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer: \n"
    "<|im_end|>\n<|im_start|>assistant\nA\n<|im_end|>\n"
    "<|im_start|>user\n"
    "There is a single choice question about High School Biology. Answer the question by replying A, B, C or D.\n"
    "Question: Which organelle makes ATP?\nChoices:\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. Golgi\n"
    "Answer: \n<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_five_shot_messages_are_the_authors():
    """Tokenizer-independent: the message list of every prompt equals the authors' `build_conversation`."""
    for record in TEST:
        assert mc_messages(record, [d for d in DEV if d["subject"] == record["subject"]][:5]) == authors_messages(
            record
        )
    pol = mc_messages(TEST[1], DEV_POL[:5])
    assert len(pol) == 11 and [m["role"] for m in pol] == ["user", "assistant"] * 5 + ["user"]
    assert pol[0]["content"] == user("Us Foreign Policy", "Policy dev 0?", "pqrs")  # str.title(), as theirs
    assert [m["content"] for m in pol[1::2]] == ["D\n", "C\n", "B\n", "A\n", "D\n"]  # "{letter}\n", dev order
    assert pol[-1]["content"] == user(
        "Us Foreign Policy", "Who signs treaties?", ["Congress", "The President", "Courts", "States"]
    )


def test_title_casing():
    base = {"question": "q?", "choices": ["a", "b", "c", "d"]}
    for subset, title in [
        ("high_school_biology", "High School Biology"),
        ("us_foreign_policy", "Us Foreign Policy"),
        ("high school biology", "High School Biology"),
        ("anatomy", "Anatomy"),
    ]:
        assert mc_text({**base, "subject": subset}).startswith(f"There is a single choice question about {title}. ")
    assert mc_text(base).startswith("There is a single choice question. Answer")  # no subject: no "about"


def test_five_shot_prompts_through_the_chat_template(default_tokenizer):
    tok = default_tokenizer
    prompts = mc_prompts(TEST, tok, shots=5, dev=DEV)
    assert len(prompts) == len(TEST)  # with dev=, every record is a prompt
    assert tok.decode(prompts.ids[0]) == EXPECTED_BIO_5SHOT
    for ids, record in zip(prompts.ids, TEST):  # token for token what the authors' script feeds the model
        expected = tok.apply_chat_template(
            authors_messages(record), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert ids == list(expected)
    assert prompts.gold == [tok("B", add_special_tokens=False)["input_ids"][0]] * 2 + [
        tok("C", add_special_tokens=False)["input_ids"][0]
    ]
    assert "5-shot from dev" in prompts.source
    # as_prompts (what loki.attribute calls) gives the same
    assert as_prompts(TEST, tok, shots=5, dev=DEV).ids == prompts.ids


def test_dev_from_mmlu_csv_files(tmp_path, default_tokenizer):
    """MMLU's layout: `data/dev/<subject>_dev.csv` (header-less question,A,B,C,D,answer) and test files."""
    dev_dir, test_dir = tmp_path / "dev", tmp_path / "test"
    dev_dir.mkdir()
    test_dir.mkdir()
    for subject, rows in [(BIO, DEV_BIO), (POL, DEV_POL)]:
        (dev_dir / f"{subject}_dev.csv").write_text(
            "".join(",".join([r["question"], *r["choices"], "ABCD"[r["answer"]]]) + "\n" for r in rows)
        )
    (test_dir / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    expected = mc_prompts(TEST, default_tokenizer, shots=5, dev=DEV).ids
    assert as_prompts(test_dir / "mixed.jsonl", default_tokenizer, shots=5, dev=dev_dir).ids == expected
    one_file = as_prompts(TEST[::2], default_tokenizer, shots=5, dev=dev_dir / f"{BIO}_dev.csv")  # biology only
    assert one_file.ids == expected[::2]


def test_plain_text_tokenizer():
    class CharTokenizer:  # no chat template: plain text
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    prompts = mc_prompts(TEST[:2], CharTokenizer(), shots=2, dev=DEV)
    text = "".join(map(chr, prompts.ids[1]))
    assert text == (
        user("Us Foreign Policy", "Policy dev 0?", "pqrs")
        + "D\n\n"
        + user("Us Foreign Policy", "Policy dev 1?", "pqrs")
        + "C\n\n"
        + user("Us Foreign Policy", "Who signs treaties?", ["Congress", "The President", "Courts", "States"])
    )
    assert prompts.gold == [ord("B"), ord("B")]


def test_shots_without_dev_use_the_first_records(default_tokenizer):
    """Without dev=, the first k records are the examples of all the others (assistant turn "{letter}\\n" too)."""
    few = mc_prompts(DEV_BIO[:2] + TEST[:1], default_tokenizer, shots=2)
    assert len(few) == 1
    assert few.ids[0] == mc_prompts(TEST[:1], default_tokenizer, shots=2, dev=DEV_BIO).ids[0]
    assert "2-shot" in few.source and "from dev" not in few.source


def test_errors(default_tokenizer):
    tok = default_tokenizer
    with pytest.raises(
        PromptError,
        match=r"shots=5 needs 5 dev examples of subject 'us foreign policy', but dev= "
        r"has 2\. Add that subject's dev records",
    ):
        mc_prompts(TEST, tok, shots=5, dev=DEV_BIO + DEV_POL[:2])
    with pytest.raises(PromptError, match="dev examples of subject 'us foreign policy', but dev= has 0"):
        mc_prompts(TEST, tok, shots=1, dev=DEV_BIO)
    with pytest.raises(PromptError, match="records without a 'subject'"):
        mc_prompts([{k: v for k, v in TEST[0].items() if k != "subject"}], tok, shots=1, dev=DEV)
    with pytest.raises(PromptError, match="pass shots=k"):
        mc_prompts(TEST, tok, dev=DEV)
    with pytest.raises(PromptError, match="need an 'answer'"):
        mc_prompts(TEST, tok, shots=1, dev=[{**d, "answer": None} for d in DEV])
    with pytest.raises(PromptError, match="shots must be >= 0"):
        mc_prompts(TEST, tok, shots=-1)
    with pytest.raises(PromptError, match="not a file or folder"):
        mc_prompts(TEST, tok, shots=1, dev="no/such/dev")
    with pytest.raises(PromptError, match="only apply to multiple-choice"):
        as_prompts(["plain text"], tok, dev=DEV, shots=1)
    assert issubclass(PromptError, loki.LokiError)


@pytest.mark.slow  # the real default model
def test_attribute_passes_dev_through(default_model, default_tokenizer):
    attr = loki.attribute(default_model, default_tokenizer, TEST[1:2], steps=1, shots=1, dev=DEV, progress=False)
    assert attr.values.shape[0] == 1 and "1-shot from dev" in attr.meta["prompt_source"]


def test_cli_passes_dev_through(monkeypatch, tmp_path):
    import loki.attribution
    import loki.models
    from loki.cli import main
    from loki.testing import tiny_model

    loaded = (tiny_model("llama"), None)  # attribute is replaced below: no real model needed

    seen = {}

    class Done:
        meta = {"seconds_per_prompt": 0.0}
        path = tmp_path

    def fake_attribute(model, tokenizer, prompts, steps, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return Done()

    monkeypatch.setattr(loki.models, "load_default", lambda dtype=None, device=None: loaded)
    monkeypatch.setattr(loki.attribution, "attribute", fake_attribute)
    assert main(["attribute", "mmlu_test.jsonl", "--out", str(tmp_path), "--shots", "5", "--dev", "mmlu/dev"]) == 0
    assert seen["shots"] == 5 and seen["dev"] == "mmlu/dev" and seen["prompts"] == "mmlu_test.jsonl"
