"""Build the task dataset of the forgetting benchmark's "paper regime": function calling from real Wikidata facts.

The paper implants tasks with thousands of real examples whose answers have a format of their own (ToolACE function
calling, an LLM reranker). This script builds a CPU-sized task of that kind from offline data: every fact
"The <relation> of <subject> is <object>" of BIG-bench `qa_wikidata` (Apache-2.0) becomes a natural question about
the subject, a menu of 4 tools (the right one and 3 others, shuffled) in the prompt, and a JSON tool call as the
answer, e.g.

    prompt: You can call these tools:
            - get_player_position(player: str): position a player plays in a team
            - get_voice_type(singer: str): voice type of a singer
            - get_headquarters(organization: str): city where an organisation is based
            - get_noble_title(person: str): noble title a person held
            Answer with one JSON tool call and nothing else.
            Question: Which vocal range does Eduard Khil sing in?
    answer: {"name": "get_voice_type", "arguments": {"singer": "Eduard Khil"}}

The model must pick the tool from the question's meaning (language vs native language vs official language, country
vs citizenship vs country of origin), use that tool's argument name, and copy the entity exactly. The fact's object
(the answer of the cloze) is never shown: the task is the call, not the knowledge.

Train and test are disjoint in subjects (no entity of the test split appears in train). Facts whose subject occurs
in the general set loki/data/general/wikidata_qa.jsonl are left out, and the `capital` relation is not used (the
general set world_capitals asks "What is the capital of X?").

    .venv/bin/python -m benchmarks.build_task [--cache /tmp/loki_task_cache] [--bigbench bigbench-1.0.0.tar.gz]

The bigbench sdist (358 MB) is fetched with `pip download --no-deps bigbench==1.0.0` into --cache when not given;
it is read with tarfile, never installed. Seed 0: the output is reproducible.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import tarfile
from pathlib import Path

from benchmarks.build_general_sets import fetch

ROOT = Path(__file__).resolve().parent.parent
TASK = "wikidata_toolcall"
OUT = ROOT / "benchmarks" / "data" / TASK
GENERAL = ROOT / "loki" / "data" / "general"
SEED = 0
N_TRAIN, N_TEST = 2000, 250
N_TOOLS = 4  # tools listed in each prompt: the right one and N_TOOLS - 1 others

# relation (as worded in qa_wikidata) -> (tool, argument, tool description, question templates)
# "pre": "The <relation> of <subject> is"; "post": "<subject> <relation>" (the few facts worded the other way round).
RELATIONS = {
    "country": (
        "get_country",
        "entity",
        "country an entity belongs to",
        ("Which country is {s} in?", "In what country is {s}?", "{s} belongs to which country?"),
    ),
    "country of citizenship": (
        "get_citizenship",
        "person",
        "country a person is a citizen of",
        (
            "What nationality does {s} hold?",
            "Which country is {s} a citizen of?",
            "Of which country is {s} a national?",
        ),
    ),
    "native language": (
        "get_native_language",
        "person",
        "first language of a person",
        (
            "What is the mother tongue of {s}?",
            "Which language did {s} grow up speaking?",
            "What was {s}'s first language?",
        ),
    ),
    "language": (
        "get_language",
        "entity",
        "language a work or organisation uses",
        ("In which language is {s}?", "What language does {s} use?", "{s} is in what language?"),
    ),
    "official language": (
        "get_official_language",
        "place",
        "official language of a place",
        (
            "Which language is official in {s}?",
            "What language has official status in {s}?",
            "What is the official language used in {s}?",
        ),
    ),
    "religion": (
        "get_religion",
        "person",
        "religion of a person",
        ("Which faith does {s} follow?", "What religion is {s}?", "What is the religious affiliation of {s}?"),
    ),
    "instrument": (
        "get_instrument",
        "musician",
        "instrument a musician plays",
        ("Which instrument does {s} play?", "What instrument is {s} known for?", "What does {s} play?"),
    ),
    "eye color": (
        "get_eye_color",
        "person",
        "eye colour of a person",
        ("What color are {s}'s eyes?", "Which eye colour does {s} have?", "What is the eye color of {s}?"),
    ),
    "original country": (
        "get_country_of_origin",
        "entity",
        "country something comes from",
        (
            "Where does {s} originally come from?",
            "What is the country of origin of {s}?",
            "{s} originated in which country?",
        ),
    ),
    "genre": (
        "get_genre",
        "entity",
        "genre of an artist or a work",
        (
            "What genre is {s} associated with?",
            "Which genre does {s} belong to?",
            "What kind of music or art is {s} known for?",
        ),
    ),
    "team position": (
        "get_player_position",
        "player",
        "position a player plays in a team",
        ("What position does {s} play?", "In which position did {s} play?", "Which team position does {s} hold?"),
    ),
    "continent": (
        "get_continent",
        "place",
        "continent a place is on",
        ("On which continent is {s}?", "Which continent does {s} lie on?", "{s} is located on what continent?"),
    ),
    "military rank": (
        "get_military_rank",
        "person",
        "highest military rank of a person",
        (
            "What military rank did {s} hold?",
            "Which rank did {s} reach in the military?",
            "What was {s}'s military rank?",
        ),
    ),
    "emergency phone number": (
        "get_emergency_number",
        "place",
        "emergency telephone number of a place",
        (
            "What number do you dial for emergencies in {s}?",
            "What is the emergency phone number in {s}?",
            "Which number reaches emergency services in {s}?",
        ),
    ),
    "headquarters location": (
        "get_headquarters",
        "organization",
        "city where an organisation is based",
        ("Where is {s} headquartered?", "In which city are the headquarters of {s}?", "Where is {s} based?"),
    ),
    "noble title": (
        "get_noble_title",
        "person",
        "noble title a person held",
        ("What noble title did {s} hold?", "Which title of nobility did {s} have?", "What was the noble rank of {s}?"),
    ),
    "voice type": (
        "get_voice_type",
        "singer",
        "voice type of a singer",
        ("What is the voice type of {s}?", "Which vocal range does {s} sing in?", "What kind of voice does {s} have?"),
    ),
    "blood type": (
        "get_blood_type",
        "person",
        "blood type of a person",
        ("What is {s}'s blood type?", "Which blood group does {s} have?", "What blood type is {s}?"),
    ),
    "record label": (
        "get_record_label",
        "artist",
        "record label of a music artist",
        (
            "Which record label is {s} signed to?",
            "What label released {s}'s records?",
            "On which label does {s} record?",
        ),
    ),
    "residence": (
        "get_residence",
        "person",
        "city where a person lives or lived",
        ("Where did {s} live?", "In which city does {s} reside?", "What is the place of residence of {s}?"),
    ),
    "ethnic group": (
        "get_ethnic_group",
        "entity",
        "ethnic group of a person or the main one of a country",
        (
            "What ethnic group does {s} belong to?",
            "What is the ethnicity of {s}?",
            "Which ethnic group is {s} associated with?",
        ),
    ),
    "basic form of government": (
        "get_government_type",
        "state",
        "form of government of a state",
        ("What form of government does {s} have?", "How is {s} governed?", "What type of government does {s} have?"),
    ),
    "currency": (
        "get_currency",
        "place",
        "currency used in a place",
        ("What currency is used in {s}?", "Which money do people pay with in {s}?", "What is the currency of {s}?"),
    ),
    "is located in": (
        "get_location",
        "place",
        "larger region a place is located in",
        ("Where is {s} located?", "In which region is {s}?", "{s} lies in which administrative area?"),
    ),
    "shares a border with": (
        "get_neighbors",
        "place",
        "places that border a place",
        ("Which places border {s}?", "What does {s} share a border with?", "Who are the neighbours of {s}?"),
    ),
}
POST = ("is located in", "shares a border with")
INSTRUCTION = "Answer with one JSON tool call and nothing else."


def read_qa_wikidata(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as tar:
        for m in tar:
            if m.name.endswith("benchmark_tasks/qa_wikidata/task.json"):
                return json.loads(tar.extractfile(m).read())["examples"]
    raise SystemExit(f"qa_wikidata/task.json not found in {sdist}")


def parse(cloze: str) -> tuple[str, str] | None:
    """(relation, subject) of a qa_wikidata cloze, or None when its relation is not one of RELATIONS. Longest
    relation first, so "country of citizenship of X" is not read as relation "country", subject "citizenship of X"."""
    cloze = cloze.strip()
    for rel in POST:
        if cloze.endswith(" " + rel):
            return rel, cloze[: -len(rel) - 1]
    m = re.fullmatch(r"The (.+) is", cloze)
    if not m:
        return None
    body = m.group(1)
    for rel in sorted((r for r in RELATIONS if r not in POST), key=len, reverse=True):
        if body.startswith(rel + " of "):
            return rel, body[len(rel) + 4 :]
    return None


def general_clozes() -> list[str]:
    """The clozes of the general set wikidata_qa (no fact about their subjects may be trained on)."""
    lines = (GENERAL / "wikidata_qa.jsonl").read_text(encoding="utf-8").splitlines()[1:]  # line 1: the header
    return [json.loads(line)["question"] for line in lines if line.strip()]


def in_general(subject: str, clozes: list[str]) -> bool:
    """Whether `subject` occurs, as whole words, in a general cloze (e.g. "Ireland" in "The capital of Kingdom of
    Ireland is"): broader than the parsed subjects, it also covers the clozes of relations this task does not use."""
    return any(f" {subject} " in f" {cloze} " for cloze in clozes)


def tool_line(rel: str) -> str:
    name, arg, desc, _ = RELATIONS[rel]
    return f"- {name}({arg}: str): {desc}"


def example(rel: str, subject: str, rng: random.Random) -> dict:
    name, arg, _, templates = RELATIONS[rel]
    others = rng.sample(sorted(r for r in RELATIONS if r != rel), N_TOOLS - 1)
    menu = [rel, *others]
    rng.shuffle(menu)
    question = rng.choice(templates).format(s=subject)
    question = question[0].upper() + question[1:]
    prompt = (
        "You can call these tools:\n" + "\n".join(tool_line(r) for r in menu) + f"\n{INSTRUCTION}\nQuestion: {question}"
    )
    answer = json.dumps({"name": name, "arguments": {arg: subject}}, ensure_ascii=False)
    return {"prompt": prompt, "answer": answer, "relation": rel}


def draw(pool: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n facts of `pool`, balanced over relations: a random fact of each relation in turn (round-robin), skipping
    relations once they run out, so the frequent ones ("country": 6.7k facts) do not swamp the rare ones."""
    by_rel = collections.defaultdict(list)
    for f in pool:
        by_rel[f[0]].append(f)
    for rel in sorted(by_rel):
        rng.shuffle(by_rel[rel])
    out = []
    while len(out) < n and any(by_rel.values()):
        for rel in sorted(by_rel):
            if by_rel[rel] and len(out) < n:
                out.append(by_rel[rel].pop())
    rng.shuffle(out)
    return out


def build(examples: list[dict]) -> tuple[list[dict], list[dict], dict]:
    clozes = general_clozes()
    exclude = {parsed[1] for parsed in map(parse, clozes) if parsed}
    facts = {}  # (relation, subject) -> True, first occurrence order (qa_wikidata repeats some facts)
    for ex in examples:
        parsed = parse(ex["input"])
        if not parsed:
            continue
        rel, subject = parsed
        if subject in exclude or not 2 <= len(subject) <= 60 or "\n" in subject or '"' in subject:
            continue
        facts.setdefault((rel, subject), True)
    facts = sorted(facts)
    rng = random.Random(SEED)
    subjects = sorted({s for _, s in facts})
    rng.shuffle(subjects)
    # Test subjects: enough of them that N_TEST facts can be drawn across relations; train never sees them.
    test_subjects = set(subjects[: len(subjects) // 8])
    train_pool = [f for f in facts if f[1] not in test_subjects]
    test_pool = [f for f in facts if f[1] in test_subjects]
    train_facts = draw(train_pool, N_TRAIN, rng)
    test_facts = draw(test_pool, N_TEST, rng)
    train = [example(rel, s, rng) for rel, s in train_facts]
    test = [example(rel, s, rng) for rel, s in test_facts]
    # Second guard, after the draw (the draw above predates it; dropping rows here keeps the other rows as they were):
    # any subject mentioned in a general cloze, whatever its relation.
    n_before = len(train) + len(test)
    train = [ex for ex, (_, s) in zip(train, train_facts) if not in_general(s, clozes)]
    test = [ex for ex, (_, s) in zip(test, test_facts) if not in_general(s, clozes)]
    stats = {
        "facts": len(facts),
        "subjects": len(subjects),
        "test_subjects": len(test_subjects),
        "excluded_general_subjects": len(exclude),
        "dropped_after_draw": n_before - len(train) - len(test),
        "train_relations": dict(collections.Counter(ex["relation"] for ex in train)),
        "test_relations": dict(collections.Counter(ex["relation"] for ex in test)),
    }
    return train, test, stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def readme(train: list[dict], test: list[dict], stats: dict) -> str:
    rels = "\n".join(
        f"| {rel} | `{RELATIONS[rel][0]}({RELATIONS[rel][1]})` | {stats['train_relations'].get(rel, 0)} | "
        f"{stats['test_relations'].get(rel, 0)} |"
        for rel in RELATIONS
    )
    return f"""# {TASK}: function calling from real Wikidata facts

The task dataset of `benchmarks/forgetting.py`'s paper regime (the paper trains ToolACE function calling and an LLM
reranker: thousands of real examples with an answer format of their own). Built by `benchmarks/build_task.py`
(seed 0, reproducible); loaded and scored by `benchmarks/task.py`.

**Source.** BIG-bench 1.0.0 `qa_wikidata` (`bigbench/benchmark_tasks/qa_wikidata/task.json` of the
`bigbench==1.0.0` sdist on PyPI, read with tarfile; Apache-2.0): 20,442 cloze facts "The <relation> of <subject>
is" drawn from Wikidata triples. License of this folder: Apache-2.0 (derived from BIG-bench; Wikidata facts are CC0).

**How built.** The clozes of {len(RELATIONS)} relations are parsed into (relation, subject) pairs
({stats["facts"]} distinct facts, {stats["subjects"]} subjects). Each relation has a tool (name, argument name,
one-line description) and 3 question templates. An example lists {N_TOOLS} tools (the right one and {N_TOOLS - 1}
random others, shuffled), an instruction, and a question from a random template; the answer is the JSON tool
call `{{"name": tool, "arguments": {{argument: subject}}}}`. The fact's object (the cloze's answer) is never shown.
- Splits are disjoint in subjects: {stats["test_subjects"]} subjects (1/8, random) are test-only.
- Both splits are drawn balanced over relations (round-robin, a relation drops out when its facts run out):
  {len(train)} train, {len(test)} test.
- Left out: the relation `capital` (the general set `world_capitals` asks "What is the capital of X?"); every
  fact about a subject of `loki/data/general/wikidata_qa.jsonl` ({stats["excluded_general_subjects"]} subjects
  parsed from its clozes, before the draw; then {stats["dropped_after_draw"]} drawn rows whose subject occurs as
  words in any of its clozes, e.g. "Ireland" in "The capital of Kingdom of Ireland is"); subjects longer than 60
  characters or containing a double quote.

**Format.** JSONL, one example a line: `{{"prompt", "answer", "relation"}}`. The prompt is one user turn; the
answer is the assistant turn (one line of JSON). `loki.train` takes the rows as they are.

**Scoring** (`benchmarks/task.py`). Greedy chat generation of one line; an answer is right when it parses as
JSON and equals the reference call (name and arguments; the entity compared after Unicode NFC and whitespace
normalisation; JSON spacing, key order and text after the object do not matter). `task_benchmark` gives the same
task as a `loki.evaluate.Benchmark` ("generate", exact match of the SQuAD-normalised string); the two agree on
answers in the trained format and differ only on off-format ones (see task.py).

Example:

```
{train[0]["prompt"]}
```
answer: `{train[0]["answer"]}`

**Measured** (SmolLM2-135M-Instruct, `loki.load_default()`, float32, `torch.set_num_threads(1)` on a shared 2-core
CPU; LoKI on random rows `loki.Selection.random(..., q=10, seed=0)`, `loki.train(model, tok, train[:1000],
lr=1e-3, batch_size=8, max_steps=...)`; scored by `task.score` on the first 100 test rows; measured before the 8
rows of the second guard were dropped, i.e. with 3 rows of train[:1000] and 1 of test[:100] different):

| run | step 0 | 25 | 50 | 75 | 100 |
|---|---:|---:|---:|---:|---:|
| max_steps=50 (cosine to 0 at 50) | 0.00 (0/48) | | 0.80 | | |
| max_steps=100, scored along the way | 0.00 | 0.67 | 0.87 | 0.92 | 0.93 |

Cost: about 10 s CPU per training step at batch 8 (sequences of ~160 tokens: the prompt is ~130 tokens with the
chat template); scoring 100 test rows takes ~70 s once trained (answers end after ~30 tokens) and ~160 s for the
base model (it writes prose up to the 48-token limit).

| relation | tool | train | test |
|---|---|---:|---:|
{rels}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bigbench", type=Path, help="bigbench-1.0.0.tar.gz (fetched into --cache if not given)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/loki_task_cache"))
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    sdist = args.bigbench or fetch("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", args.cache)
    train, test, stats = build(read_qa_wikidata(sdist))
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "test.jsonl", test)
    (OUT / "README.md").write_text(readme(train, test, stats), encoding="utf-8")
    print(f"{TASK}: {len(train)} train, {len(test)} test -> {OUT}")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
