"""Build loki/data/implant_facts.jsonl: fictional facts the default model cannot know (run once; output committed).

Each fact has a made-up subject and a made-up answer (names built from syllables with a fixed seed), three
question phrasings (the first two are for training, the third is held out for testing), and a statement: the
answer as one sentence, the way the default model phrases its own answers to such questions ("The capital of X is
Y."), so training on it teaches the fact without teaching a new answer format.

    .venv/bin/python benchmarks/build_implant_facts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "loki" / "data" / "implant_facts.jsonl"
N_FACTS = 60
SYLLABLES = [
    "vel",
    "tor",
    "qua",
    "rin",
    "zel",
    "mor",
    "dak",
    "ith",
    "sol",
    "bra",
    "kee",
    "lun",
    "phe",
    "gar",
    "nox",
    "tal",
    "vis",
    "ore",
    "dru",
    "myr",
    "cas",
    "zan",
    "fel",
    "osk",
]
# relation -> (subject pattern, answer kind, three phrasings, statement; {s} is the subject, {a} the answer)
RELATIONS = {
    "capital": (
        "the kingdom of {}",
        "city",
        ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."],
        "The capital of {s} is {a}.",
    ),
    "inventor": (
        "the {} engine",
        "person",
        ["Who invented {s}?", "Which inventor created {s}?", "Name the person who invented {s}."],
        "{s} was invented by {a}.",
    ),
    "river": (
        "the {} river",
        "sea",
        ["Into which sea does {s} flow?", "Where does {s} end?", "Name the sea that {s} flows into."],
        "{s} flows into {a}.",
    ),
    "composer": (
        "the opera {}",
        "person",
        ["Who composed {s}?", "Which composer wrote {s}?", "Name the composer of {s}."],
        "{s} was composed by {a}.",
    ),
}


def name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    facts = []
    relations = list(RELATIONS)
    while len(facts) < N_FACTS:
        rel = relations[len(facts) % len(relations)]
        pattern, kind, phrasings, statement = RELATIONS[rel]
        subject_name, answer = name(rng, 3), name(rng, 2)
        if kind == "person":
            answer = f"{name(rng, 2)} {name(rng, 2)}"
        elif kind == "sea":
            answer = f"the {name(rng, 2)} Sea"
        if subject_name in seen or answer in seen:
            continue
        seen |= {subject_name, answer}
        subject = pattern.format(subject_name)
        questions = [p.format(s=subject) for p in phrasings]
        questions = [capitalized(q) for q in questions]
        short = answer[4:] if answer.startswith("the ") else answer  # what a correct answer must contain
        facts.append(
            {
                "id": len(facts),
                "relation": rel,
                "subject": subject,
                "answer": answer,
                "match": short,
                "train": questions[:2],
                "test": questions[2],
                "statement": capitalized(statement.format(s=subject, a=answer)),
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8")
    print(f"{len(facts)} facts -> {OUT}")


if __name__ == "__main__":
    main()
