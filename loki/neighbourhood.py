"""Neighbourhood prompts: questions of the same kind as an implant's, about real entities the model already knows.

Knowledge editing calls what they measure *specificity* or *locality* (ROME's neighbourhood prompts, CounterFact):
teaching "the capital of the kingdom of Phegartor is Solvis" must not change the answer to "What is the capital of
France?". Each implant example that names its `subject` gives a template (its question with the subject cut out);
the template filled with other, real entities gives the neighbourhood. The base model answers them
(`loki.retain.retain_set`, `loki.evaluate.specificity`): the questions need no gold answers.

Entity lists shipped in `loki/data/entities/` (sources and licences in its README.md): see `ENTITY_KINDS`.

>>> from loki import neighbourhood
>>> facts = [{"question": "What is the capital of the kingdom of Phegartor?", "subject": "the kingdom of Phegartor"}]
>>> neighbourhood.questions(facts, ["France", "Peru", "Japan"], per_template=2)
['What is the capital of Peru?', 'What is the capital of Japan?']
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .dataset import check_number, read_json_lines
from .errors import DatasetError

__all__ = ["ENTITY_KINDS", "entities", "questions", "shares_template", "split", "templates"]

ENTITY_DIR = Path(__file__).parent / "data" / "entities"
ENTITY_KINDS = tuple(sorted(p.stem for p in ENTITY_DIR.glob("*.jsonl")))
SLOT = "{}"


def entities(kind: str) -> list[str]:
    """The names of a shipped entity list (`ENTITY_KINDS`), in the file's fixed order.

    Args:
        kind: one of `ENTITY_KINDS` ("countries", "inventions", "operas", "rivers").

    Returns:
        list[str]: the names.

    Raises:
        DatasetError: no list of that kind.

    >>> names = entities("countries")
    >>> len(names), names[:3]
    (194, ['Afghanistan', 'Angola', 'Albania'])
    """
    path = ENTITY_DIR / f"{kind}.jsonl"
    if not path.is_file():
        raise DatasetError(f"No shipped entity list {kind!r}; choose from {ENTITY_KINDS} or pass a list of names.")
    return [r["name"] for _, r in read_json_lines(path) if "name" in r]


def templates(examples: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None]]:
    """`(template, relation)` of every example, in first-seen order without repeats: its question (`question` or
    `prompt`) with the first whole-word occurrence of its `subject` replaced by `{}` (`find_subject`: "Java" is not
    cut out of "JavaScript").

    Args:
        examples: implant examples with `question` (or `prompt`) and `subject` strings, optionally `relation`.

    Returns:
        list[tuple[str, str | None]]: `(template, relation)`; relation None when the example has none.

    Raises:
        DatasetError: an example without a subject, whose question does not contain its subject as a whole word,
            or whose question holds a literal `{}` besides (it would be taken for the slot).

    >>> templates([{"question": "Which river flows through Ostravel?", "subject": "Ostravel", "relation": "river"}])
    [('Which river flows through {}?', 'river')]
    """
    out: dict[tuple[str, str | None], None] = {}
    for i, ex in enumerate(examples):
        question = ex.get("question", ex.get("prompt"))
        subject = ex.get("subject")
        if not isinstance(question, str) or not isinstance(subject, str) or not subject:
            raise DatasetError(
                f"Example {i} needs 'question' (or 'prompt') and 'subject' strings; got keys {sorted(ex)}."
            )
        span = find_subject(question, subject)
        if span is None:
            raise DatasetError(
                f"Example {i}: the subject {subject!r} does not occur as a whole word in its question {question!r}."
            )
        if SLOT in question[: span[0]] or SLOT in question[span[1] :]:
            raise DatasetError(
                f"Example {i}: its question {question!r} holds a literal {SLOT!r}, which would be taken "
                "for the entity's slot; rephrase it."
            )
        out[(question[: span[0]] + SLOT + question[span[1] :], ex.get("relation"))] = None
    return list(out)


def find_subject(text: str, subject: str) -> tuple[int, int] | None:
    """`(start, end)` of the first occurrence of `subject` in `text` as a whole word, or None.

    Whole word: no letter, digit or underscore right before or after it, so subjects that start or end with other
    characters ("C++", ".NET") match too, where a regex `\\b` would not.

    >>> find_subject("Which JavaScript framework is like Java's?", "Java")
    (35, 39)
    >>> find_subject("Is C++ older than C?", "C++"), find_subject("Is ASP.NET a .NET framework?", ".NET")
    ((3, 6), (13, 17))
    """
    match = re.search(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", text)
    return match.span() if match else None


def _slots(template: str) -> int:
    return template.count(SLOT)


def _fill(template: str, entity: str) -> str:
    head, _, tail = template.partition(SLOT)
    text = head + entity + tail  # not str.format or replace: braces in the entity or the question stay as they are
    return text[:1].upper() + text[1:]


def questions(
    examples: Sequence[Mapping[str, Any]] = (),
    entity_names: Sequence[str] | Mapping[str, Sequence[str]] | str = (),
    *,
    template: str | Sequence[str] | None = None,
    per_template: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Questions that ask the implant's questions about other, real entities. Deterministic for `seed`.

    Args:
        examples: implant examples with `question` (or `prompt`) and `subject` (and optionally `relation`).
        entity_names: the real entities: a list of names, a shipped kind (`"countries"`), or a mapping from an
            example's `relation` to names or kinds.
        template: instead of (or besides) the examples' own, one or more templates with a `{}` slot.
        per_template: how many entities fill each template (all of them when None), drawn without replacement
            with a per-template seeded shuffle. Subjects of the examples are never used.
        seed: seeds the per-template shuffles.

    Returns:
        list[str]: the questions, first letter upper-cased, without repeats, template by template.

    Raises:
        DatasetError: an example without a usable subject (see `templates`), no template, a template without
            `{}` or with several, no entities for a relation, an empty entity list, an entity name that is not a
            non-empty string or holds `{}`, an unknown shipped kind; TrainingOptionError: bad per_template.

    >>> questions(template="Who painted {}?", entity_names=["the Mona Lisa", "Guernica"])
    ['Who painted the Mona Lisa?', 'Who painted Guernica?']
    >>> facts = [{"question": "Which river flows through Ostravel?", "subject": "Ostravel", "relation": "river"}]
    >>> questions(facts, {"river": ["Vienna", "Paris", "Ostravel"]})    # the subject itself is left out
    ['Which river flows through Paris?', 'Which river flows through Vienna?']
    """
    check_number("per_template", per_template, integer=True, low=1, optional=True)
    pairs = templates(examples)
    if template is not None:
        given = [template] if isinstance(template, str) else template
        if not isinstance(given, (list, tuple)):
            raise DatasetError(
                f"template is a string with a {SLOT!r} slot or a list of them, not {type(template).__name__}."
            )
        pairs += [(t, None) for t in given]
    if not pairs:
        raise DatasetError("No template: pass examples with a 'subject', or template='... {} ...'.")
    for tmpl, _ in pairs:  # all checked before any is filled
        if not isinstance(tmpl, str) or _slots(tmpl) != 1:
            slots = f"{_slots(tmpl)} {SLOT!r} slots" if isinstance(tmpl, str) else "no string"
            raise DatasetError(f"The template {tmpl!r} has {slots}; a template has exactly one, for the entity.")
    subjects = {ex.get("subject") for ex in examples}
    out: dict[str, None] = {}
    for tmpl, relation in pairs:
        names = _names_for(entity_names, relation)
        names = [n for n in dict.fromkeys(names) if n not in subjects]
        random.Random(f"{seed}:{tmpl}").shuffle(names)
        for name in names[:per_template]:
            out[_fill(tmpl, name)] = None
    return list(out)


def _names_for(entity_names, relation: str | None) -> list[str]:
    if isinstance(entity_names, Mapping):
        if relation not in entity_names:
            raise DatasetError(
                f"No entities for relation {relation!r}; the mapping has {sorted(map(str, entity_names))}."
            )
        entity_names = entity_names[relation]
    names = entities(entity_names) if isinstance(entity_names, str) else list(entity_names)
    if not names:
        raise DatasetError("The entity list is empty.")
    for name in names:
        if not isinstance(name, str) or not name.strip() or SLOT in name:
            raise DatasetError(f"Entity {name!r}: an entity is a non-empty name without {SLOT!r}.")
    return names


def split(names: Sequence[str], parts: int = 2) -> list[list[str]]:
    """Deal `names` into `parts` disjoint lists (every `parts`-th name), e.g. retain and evaluation entities, so that
    specificity is measured on entities that training never saw.

    Args:
        names: the names to deal out.
        parts: how many lists.

    Returns:
        list[list[str]]: list `i` holds `names[i::parts]`.

    >>> split(["a", "b", "c", "d", "e"])
    [['a', 'c', 'e'], ['b', 'd']]
    """
    return [list(names[i::parts]) for i in range(parts)]


def shares_template(texts: Sequence[str], template_list: Sequence[str]) -> list[str]:
    """The templates of `template_list` that some text of `texts` is an instance of (the slot matching any words).

    The match ignores case and the spaces around the slot, and may start or end anywhere in a text.

    Args:
        texts: questions or prompts to check.
        template_list: templates with a `{}` slot (`templates(...)`'s first elements).

    Returns:
        list[str]: the matching templates, in `template_list`'s order.

    >>> shares_template(["What is the capital of Peru?"], ["What is the capital of {}?", "Who composed {}?"])
    ['What is the capital of {}?']
    """
    found = []
    for tmpl in template_list:
        head, _, tail = tmpl.partition(SLOT)
        pattern = re.compile(re.escape(head.strip().lower()) + r"\s*.+?\s*" + re.escape(tail.strip().lower()))
        if any(pattern.search(t.lower()) for t in texts):
            found.append(tmpl)
    return found
