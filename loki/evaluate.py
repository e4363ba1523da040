"""Measuring damage: perplexity, multiple-choice accuracy, exact-match QA and the paper's forgetting score.

Everything runs on an in-memory causal LM (any `transformers` model and its tokenizer), batched, with progress
bars. A delta is evaluated by applying it in place and reverting it afterwards (`loki.implanted`), so one loaded
base model serves every comparison.

>>> import loki
>>> from loki import evaluate as ev
>>> ev.forgetting_score({"mc": 0.50, "ppl": 0.04}, {"mc": 0.25, "ppl": 0.04})   # 100/2 * (0.25/0.50 + 0)
25.0
>>> # model, tokenizer = loki.load_default()
>>> # suite = ev.general_suite()                                 # the small offline sets shipped in loki/data/
>>> # report = ev.compare(model, tokenizer, suite, "medical.loki")
>>> # report.forgetting                                          # lower is better; 0 = nothing lost
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import EvaluationError
from .neighbourhood import shares_template

DATA_DIR = Path(__file__).parent / "data"
KINDS = ("perplexity", "choice", "generate")
MATCH_MODES = ("exact", "prefix", "contains")


# -- tokenisation helpers -----------------------------------------------------------------------------
def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids such that context + continuation is how the whole text tokenises
    (as lm-evaluation-harness does it), so a choice is scored in the tokenisation the model would produce."""
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encodings
        return ctx, _encode(tokenizer, continuation, special=False)
    return ctx, whole[len(ctx) :]


def _batches(order: list[int], batch_size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}.")


@torch.no_grad()
def _sequence_logprobs(model, sequences: Sequence[tuple[list[int], int]], batch_size: int, desc: str,
                       progress: bool) -> list[tuple[float, int, bool]]:
    """For each `(token_ids, n_scored)`: the summed log-probability of the last `n_scored` tokens given everything
    before them, the number of tokens scored, and whether each of them was the model's greedy (argmax) choice."""
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # little padding per batch
    out: list[Any] = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc=desc, disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        width = max(len(sequences[i][0]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            seq = sequences[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            seq, n = sequences[i]
            targets = torch.tensor(seq[len(seq) - n :], device=logits.device)
            pred = logits[row, len(seq) - n - 1 : len(seq) - 1].float()  # logits at t predict token t + 1
            token_lp = pred.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(pred, dim=-1)
            greedy = bool((pred.argmax(-1) == targets).all())
            out[i] = (float(token_lp.double().sum()), n, greedy)
        bar.update(len(batch))
    bar.close()
    return out


# -- metrics --------------------------------------------------------------------------------------------
def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 256,
               progress: bool = True) -> float:
    """Token-level perplexity `exp(total NLL / tokens)` of `texts`, each cut to its first `max_length` tokens.

    Each text is scored on its own (no packing); its first token has no context and is not scored.

    >>> # loki.evaluate.perplexity(model, tokenizer, ["The cat sat on the mat."])
    """
    if not texts:
        raise EvaluationError("perplexity needs at least one text.")
    seqs = []
    for text in texts:
        ids = _encode(tokenizer, text)[:max_length]
        if len(ids) < 2:
            raise EvaluationError(f"Text {text[:40]!r} has fewer than 2 tokens; nothing to score.")
        seqs.append((ids, len(ids) - 1))
    scored = _sequence_logprobs(model, seqs, batch_size, "perplexity", progress)
    nll = -sum(lp for lp, _, _ in scored)
    return math.exp(nll / sum(n for _, n, _ in scored))


def choice_logprobs(model, tokenizer, prompt: str | Sequence[str], choices: Sequence[str] | Sequence[Sequence[str]],
                    *, batch_size: int = 16, progress: bool = True) -> list[list[float]]:
    """Summed log-probability of every choice as the continuation of its prompt.

    `prompt` and `choices` are one question (a string and a list of strings) or several (lists of each).
    Choices are scored verbatim, so give them their leading space (`" Paris"`) if the prompt ends without one.
    """
    prompts, groups = ([prompt], [choices]) if isinstance(prompt, str) else (list(prompt), list(choices))
    if len(prompts) != len(groups):
        raise EvaluationError(f"Got {len(prompts)} prompts but {len(groups)} lists of choices.")
    seqs, owner = [], []
    for q, (p, cs) in enumerate(zip(prompts, groups)):
        if isinstance(cs, str) or len(cs) < 1:
            raise EvaluationError(f"Question {q} needs a list of choices, got {cs!r}.")
        for c in cs:
            ctx, cont = _encode_pair(tokenizer, p, c)
            if not cont or not ctx:
                raise EvaluationError(f"Question {q}: prompt {p[:40]!r} and choice {c!r} must both be non-empty.")
            seqs.append((ctx + cont, len(cont)))
            owner.append(q)
    scored = _sequence_logprobs(model, seqs, batch_size, "choices", progress)
    out: list[list[float]] = [[] for _ in prompts]
    for q, (lp, _, _) in zip(owner, scored):
        out[q].append(lp)
    return out


def multiple_choice_accuracy(model, tokenizer, items: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
                             length_normalize: bool = False, progress: bool = True) -> float:
    """Fraction of `items` (`{"prompt", "choices", "answer": index}`) whose answer has the highest log-likelihood.

    `length_normalize` divides each choice's log-likelihood by its length in characters (lm-eval's `acc_norm`).
    Ties go to the lowest index, so a model that cannot tell the choices apart scores as if it always said "0".
    """
    items = _check_items(items, ("prompt", "choices", "answer"))
    for i, it in enumerate(items):
        if not (isinstance(it["answer"], int) and 0 <= it["answer"] < len(it["choices"])):
            raise EvaluationError(f"Item {i}: answer {it['answer']!r} is not an index into its {len(it['choices'])} choices.")
    scores = choice_logprobs(model, tokenizer, [it["prompt"] for it in items], [it["choices"] for it in items],
                             batch_size=batch_size, progress=progress)
    correct = 0
    for it, lps in zip(items, scores):
        if length_normalize:
            lps = [lp / max(1, len(c)) for lp, c in zip(lps, it["choices"])]
        correct += int(max(range(len(lps)), key=lambda j: (lps[j], -j)) == it["answer"])
    return correct / len(items)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_matches(prediction: str, answers: Sequence[str], mode: str = "exact") -> bool:
    """Whether `prediction` matches one of `answers` after `normalize_answer`.

    `mode`: "exact" (equal), "prefix" (the prediction starts with the answer, on a word boundary; for cloze
    prompts where the model keeps writing) or "contains" (the answer appears as whole words; for chat answers).
    """
    if mode not in MATCH_MODES:
        raise EvaluationError(f"Unknown match mode {mode!r}; choose from {MATCH_MODES}.")
    pred = normalize_answer(prediction)
    for ans in answers:
        a = normalize_answer(ans)
        if not a:
            continue
        if (mode == "exact" and pred == a) or (mode == "prefix" and (pred + " ").startswith(a + " ")) or (
            mode == "contains" and f" {a} " in f" {pred} "
        ):
            return True
    return False


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, chat: bool = False, max_new_tokens: int = 16,
             batch_size: int = 8, stop_at_newline: bool = True, progress: bool = True) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding.

    `chat=True` wraps each prompt as a user turn of the tokenizer's chat template (with the generation prompt).
    With `stop_at_newline`, each completion is cut at its first newline (the answer to a one-line question).
    """
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    if chat:
        encoded = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    else:
        encoded = [_encode(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            text = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
            out[i] = (text.strip().split("\n")[0] if stop_at_newline else text).strip()
        bar.update(len(batch))
    bar.close()
    return out


def exact_match(model, tokenizer, items: Sequence[Mapping[str, Any]], *, mode: str = "exact", chat: bool = False,
                max_new_tokens: int = 16, batch_size: int = 8, progress: bool = True) -> float:
    """Fraction of `items` (`{"question", "answers": [...]}`) whose greedy answer matches (see `answer_matches`)."""
    items = _check_items(items, ("question", "answers"))
    if mode not in MATCH_MODES:
        raise EvaluationError(f"Unknown match mode {mode!r}; choose from {MATCH_MODES}.")
    preds = generate(model, tokenizer, [it["question"] for it in items], chat=chat, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, progress=progress)
    return sum(answer_matches(p, it["answers"], mode) for p, it in zip(preds, items)) / len(items)


def forgetting_score(original: Mapping[str, float] | Sequence[float], tuned: Mapping[str, float] | Sequence[float]) -> float:
    """The paper's forgetting score `Avg = 100/N * sum_i (S_orig_i - S_tuned_i) / S_orig_i`, in percent.

    Scores must be higher-is-better (this module reports perplexity as `1/perplexity` for that reason).
    Lower is better; negative means the tuned model improved on average.

    >>> forgetting_score([0.8, 0.5], [0.4, 0.5])
    25.0
    """
    if isinstance(original, Mapping) != isinstance(tuned, Mapping):
        raise EvaluationError("Give both score sets as mappings (benchmark -> score) or both as sequences.")
    if isinstance(original, Mapping):
        if set(original) != set(tuned):
            raise EvaluationError(f"The score sets name different benchmarks: {sorted(original)} vs {sorted(tuned)}.")
        pairs = [(original[k], tuned[k]) for k in original]
    else:
        if len(original) != len(tuned):
            raise EvaluationError(f"Got {len(original)} original scores but {len(tuned)} tuned ones.")
        pairs = list(zip(original, tuned))
    if not pairs:
        raise EvaluationError("The forgetting score needs at least one benchmark.")
    for o, _ in pairs:
        if not o > 0:
            raise EvaluationError(f"An original score is {o}; the forgetting score divides by it, so it must be > 0. "
                                  "Drop benchmarks the base model scores 0 on.")
    return 100.0 / len(pairs) * sum((o - t) / o for o, t in pairs)


def _check_items(items: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> list[Mapping[str, Any]]:
    items = list(items)
    if not items:
        raise EvaluationError("No items to evaluate.")
    for i, it in enumerate(items):
        missing = [k for k in keys if k not in it]
        if missing:
            raise EvaluationError(f"Item {i} lacks {missing}; expected keys {list(keys)}, got {sorted(it)}.")
    return items


# -- benchmarks and suites -----------------------------------------------------------------------------
@dataclass
class Benchmark:
    """A named evaluation set and how to score it. `score` is always higher-is-better:
    accuracy for "choice" and "generate", `1/perplexity` (the geometric-mean token probability) for "perplexity".

    Items: "perplexity" `{"text"}`; "choice" `{"prompt", "choices", "answer"}`; "generate" `{"question", "answers"}`.
    """

    name: str
    kind: str
    items: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the metric function

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EvaluationError(f"Benchmark {self.name!r}: unknown kind {self.kind!r}; choose from {KINDS}.")
        keys = {"perplexity": ("text",), "choice": ("prompt", "choices", "answer"), "generate": ("question", "answers")}
        self.items = list(_check_items(self.items, keys[self.kind]))

    def head(self, n: int | None) -> "Benchmark":
        """The same benchmark on its first `n` items (all of them for None)."""
        return self if n is None else Benchmark(self.name, self.kind, self.items[:n], dict(self.options))

    def score(self, model, tokenizer, *, progress: bool = True) -> float:
        if self.kind == "perplexity":
            texts = [it["text"] for it in self.items]
            return 1.0 / perplexity(model, tokenizer, texts, progress=progress, **self.options)
        if self.kind == "choice":
            return multiple_choice_accuracy(model, tokenizer, self.items, progress=progress, **self.options)
        return exact_match(model, tokenizer, self.items, progress=progress, **self.options)

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None, kind: str | None = None, **options) -> "Benchmark":
        """Read a JSONL file. A first line `{"benchmark": {"name", "kind", "options"}}` may carry the defaults."""
        path = Path(path)
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        header = lines[0].get("benchmark") if lines and "benchmark" in lines[0] else None
        items = lines[1:] if header else lines
        header = header or {}
        return cls(name or header.get("name") or path.stem, kind or header.get("kind"), items,
                   {**header.get("options", {}), **options})


GENERAL_SETS = ("wiki_perplexity", "world_capitals", "bb_general_knowledge", "bb_misconceptions", "bb_physical_intuition",
                "bb_hindu_knowledge", "wikidata_qa")


def general_suite(names: Sequence[str] = GENERAL_SETS, *, n: int | None = None) -> list[Benchmark]:
    """The small general-capability sets shipped in `loki/data/general/` (built offline from Wikipedia summaries and
    BIG-bench by `benchmarks/build_general_sets.py`; sources and licenses in `loki/data/README.md`).
    `n` keeps the first `n` items of each (for quick runs)."""
    out = []
    for name in names:
        path = DATA_DIR / "general" / f"{name}.jsonl"
        if not path.exists():
            raise EvaluationError(f"No general set named {name!r}; choose from {GENERAL_SETS}.")
        out.append(Benchmark.from_jsonl(path).head(n))
    return out


def evaluate(model, tokenizer, benchmarks: Sequence[Benchmark], *deltas, progress: bool = True) -> dict[str, float]:
    """Scores of `model` on `benchmarks` (name -> higher-is-better score), with `deltas` (Delta objects or paths)
    applied for the duration and reverted afterwards."""
    from .apply import implanted

    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise EvaluationError(f"Benchmark names must be unique, got {names}.")
    was_training = model.training
    model.eval()
    try:
        with implanted(model, *deltas):
            return {b.name: b.score(model, tokenizer, progress=progress)
                    for b in tqdm(benchmarks, desc="benchmarks", disable=not progress, leave=False)}
    finally:
        model.train(was_training)


@dataclass
class Report:
    """Scores before and after, and the forgetting score over all benchmarks (percent, lower is better)."""

    original: dict[str, float]
    tuned: dict[str, float]

    @property
    def skipped(self) -> list[str]:
        """Benchmarks left out of the forgetting score because the base model scores 0 on them."""
        return [k for k, v in self.original.items() if not v > 0]

    @property
    def forgetting(self) -> float:
        """`forgetting_score` over the benchmarks the base model scores above 0 on (see `skipped`)."""
        keep = [k for k in self.original if k not in self.skipped]
        return forgetting_score({k: self.original[k] for k in keep}, {k: self.tuned[k] for k in keep})

    def table(self) -> str:
        lines = [f"{'benchmark':<24}{'base':>10}{'tuned':>10}{'change %':>10}"]
        for k, o in self.original.items():
            if k in self.skipped:
                continue
            lines.append(f"{k:<24}{o:>10.4f}{self.tuned[k]:>10.4f}{100 * (self.tuned[k] - o) / o:>+10.2f}")
        for k in self.skipped:
            lines.append(f"{k:<24}{self.original[k]:>10.4f}{self.tuned[k]:>10.4f}{'(skipped)':>10}")
        lines.append(f"forgetting score (Avg): {self.forgetting:+.2f}%")
        return "\n".join(lines)


def compare(model, tokenizer, benchmarks: Sequence[Benchmark], *deltas, original: Mapping[str, float] | None = None,
            progress: bool = True) -> Report:
    """Evaluate the base model (or reuse `original` scores) and the model with `deltas` applied; the model is
    reverted afterwards."""
    base = dict(original) if original is not None else evaluate(model, tokenizer, benchmarks, progress=progress)
    return Report(base, evaluate(model, tokenizer, benchmarks, *deltas, progress=progress))


# -- the four numbers of an implant ------------------------------------------------------------------------
@torch.no_grad()
def answer_predictions(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, batch_size: int = 8,
                       progress: bool = True) -> list[list[int]]:
    """The model's greedy next token at every token of each given answer, teacher-forced (chat template): for each
    question, `[argmax p(. | question, answer[:t]) for t in answer tokens]` (the answer's end-of-turn included).

    The knowledge-editing locality measure (EasyEdit) compares these lists before and after an edit.
    """
    from .dataset import answer_positions, collate, encode, pad_token_id

    _check_batch_size(batch_size)
    if len(questions) != len(answers):
        raise EvaluationError(f"Got {len(questions)} questions but {len(answers)} answers.")
    encoded = [encode(tokenizer, {"question": q, "answer": a}) for q, a in zip(questions, answers)]
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for chunk in tqdm(list(_batches(list(range(len(encoded))), batch_size)), desc="answers", disable=not progress,
                      leave=False):
        batch = collate([encoded[i] for i in chunk], pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        for row, i in enumerate(chunk):
            positions = answer_positions(encoded[i]["labels"]).to(logits.device)
            out.append(logits[row, positions].argmax(-1).tolist())
    return out


def specificity(base: Sequence[Sequence[int]], tuned: Sequence[Sequence[int]]) -> float:
    """Mean over neighbourhood questions of the share of answer tokens where the tuned model's greedy prediction
    equals the base model's, both teacher-forced on the base model's answer (`answer_predictions`): the locality
    score of knowledge editing (EasyEdit). 1.0 = every neighbouring answer kept token for token.

    >>> specificity([[5, 6, 7, 8], [1, 2]], [[5, 6, 9, 9], [1, 2]])
    0.75
    """
    if len(base) != len(tuned) or not base:
        raise EvaluationError(f"Got {len(base)} base and {len(tuned)} tuned predictions; give the same non-zero number.")
    shares = []
    for a, b in zip(base, tuned):
        if len(a) != len(b) or not a:
            raise EvaluationError("Each question's base and tuned predictions must cover the same answer tokens.")
        shares.append(sum(x == y for x, y in zip(a, b)) / len(a))
    return sum(shares) / len(shares)


def _texts(benchmark: Benchmark) -> list[str]:
    key = {"perplexity": "text", "choice": "prompt", "generate": "question"}[benchmark.kind]
    return [str(it[key]) for it in benchmark.items]


@dataclass
class ImplantScores:
    """Raw scores of one model on an `ImplantSuite` (see `ImplantSuite.score`)."""

    efficacy: float
    generalisation: float
    general: dict[str, float]
    answers: list[str]  # the model's own greedy answer to each neighbourhood question
    predictions: list[list[int]]  # its greedy tokens teacher-forced on the base model's answers


@dataclass
class ImplantReport:
    """The four numbers of an implant, never mixed (the knowledge-editing field's terms, and the paper's Avg):

    - `efficacy`: accuracy on the phrasings it was trained on;
    - `generalisation`: accuracy on held-out phrasings of the same facts;
    - `specificity`: on neighbourhood questions (same templates, real entities not used in training), the share
      of the base model's answer tokens the implanted model still predicts (teacher-forced; EasyEdit's locality);
      `answers_kept` is the stricter share of whole greedy answers left unchanged;
    - `forgetting`: the paper's Avg (percent, lower is better) over general sets sharing no template with the implant.
    """

    base: ImplantScores
    tuned: ImplantScores
    questions: list[str]  # the neighbourhood questions

    @property
    def efficacy(self) -> float:
        return self.tuned.efficacy

    @property
    def generalisation(self) -> float:
        return self.tuned.generalisation

    @property
    def specificity(self) -> float:
        return specificity(self.base.predictions, self.tuned.predictions)

    @property
    def answers_kept(self) -> float:
        return len([1 for a, b in zip(self.base.answers, self.tuned.answers)
                    if normalize_answer(a) == normalize_answer(b)]) / len(self.questions)

    @property
    def forgetting(self) -> float:
        return Report(self.base.general, self.tuned.general).forgetting

    def changed(self) -> list[tuple[str, str, str]]:
        """`(question, base answer, tuned answer)` of every neighbourhood question whose greedy answer changed."""
        return [(q, a, b) for q, a, b in zip(self.questions, self.base.answers, self.tuned.answers)
                if normalize_answer(a) != normalize_answer(b)]

    def as_dict(self) -> dict[str, Any]:
        return {"efficacy": self.efficacy, "generalisation": self.generalisation, "specificity": self.specificity,
                "answers_kept": self.answers_kept, "forgetting": self.forgetting,
                "base": {"efficacy": self.base.efficacy, "generalisation": self.base.generalisation,
                         "general": self.base.general},
                "general": self.tuned.general, "neighbourhood_questions": len(self.questions)}

    def evaluation(self) -> dict[str, Any]:
        """The figures for `delta.info["extra"]["evaluation"]`, which `push_to_hub` puts on the model card."""
        return {"implant": {"efficacy": self.efficacy, "generalisation": self.generalisation,
                            "specificity": self.specificity, "forgetting": self.forgetting},
                "general": {k: {"base": b, "implanted": self.tuned.general[k]} for k, b in self.base.general.items()},
                "forgetting": self.forgetting}

    def table(self) -> str:
        n, kept = len(self.questions), len(self.questions) - len(self.changed())
        lines = [f"{'':<34}{'base':>8}{'implant':>9}",
                 f"{'efficacy (trained phrasings)':<34}{self.base.efficacy:>8.0%}{self.efficacy:>9.0%}",
                 f"{'generalisation (held-out)':<34}{self.base.generalisation:>8.0%}{self.generalisation:>9.0%}",
                 f"{'specificity (neighbourhood kept)':<34}{'':>8}{self.specificity:>9.0%}   "
                 f"(answer tokens; {kept} of {n} whole answers unchanged)",
                 f"{'general forgetting (Avg)':<34}{'':>8}{self.forgetting:>+8.2f}%   "
                 "(lower is better; per set below)"]
        report = Report(self.base.general, self.tuned.general).table().splitlines()[:-1]
        return "\n".join(lines + ["", *report])


@dataclass
class ImplantSuite:
    """What an implant is judged on: efficacy and generalisation benchmarks, neighbourhood questions, general sets.

    `templates` are the implant's question templates (`loki.neighbourhood.templates`). General forgetting is
    measured only on what shares no template with the implant: items of a general set asking a question of such a
    template are neighbourhood items, not general ones, and are left out (`excluded` counts them per set).

    >>> # suite = ev.ImplantSuite(fact_benchmark(facts, "train"), fact_benchmark(facts, "test"),
    >>> #                         neighbourhood=questions, general=ev.general_suite(["wiki_perplexity"]))
    >>> # base = suite.score(model, tokenizer)                 # once, on the base model
    >>> # report = suite.report(model, tokenizer, "facts.loki", base=base); print(report.table())

    Raises:
        EvaluationError: no neighbourhood questions, or no general item left that shares no implant template.
    """

    efficacy: Benchmark
    generalisation: Benchmark
    neighbourhood: list[str]
    general: list[Benchmark]
    templates: list[str] = field(default_factory=list)
    max_new_tokens: int = 24
    excluded: dict[str, int] = field(default_factory=dict)  # general set -> items left out (implant templates)

    def __post_init__(self) -> None:
        self.neighbourhood = list(self.neighbourhood)
        if not self.neighbourhood:
            raise EvaluationError("An implant suite needs neighbourhood questions (loki.neighbourhood.questions).")
        general = []
        for b in self.general:
            keep = [it for it, text in zip(b.items, _texts(b)) if not shares_template([text], self.templates)]
            if len(keep) < len(b.items):
                self.excluded[b.name] = len(b.items) - len(keep)
            if keep:
                general.append(Benchmark(b.name, b.kind, keep, dict(b.options)))
        if not general:
            raise EvaluationError(
                f"No general set is left: every item of {[b.name for b in self.general]} asks a question of the "
                "implant's templates, so they measure its neighbourhood (specificity), not general capability. Add "
                "general sets that share no template with the implant, e.g. ev.general_suite(['wiki_perplexity'])."
            )
        self.general = general

    def score(self, model, tokenizer, *deltas, base: ImplantScores | None = None,
              progress: bool = True) -> ImplantScores:
        """Scores of `model` (with `deltas` applied for the duration, reverted afterwards). Neighbourhood predictions
        are teacher-forced on `base`'s answers (on the model's own answers when `base` is None: the base run)."""
        from .apply import implanted

        with implanted(model, *deltas):
            answers = generate(model, tokenizer, self.neighbourhood, chat=True, max_new_tokens=self.max_new_tokens,
                               progress=progress)
            forced = base.answers if base is not None else answers
            predictions = answer_predictions(model, tokenizer, self.neighbourhood, forced, progress=progress)
            efficacy = self.efficacy.score(model, tokenizer, progress=progress)
            generalisation = self.generalisation.score(model, tokenizer, progress=progress)
            general = evaluate(model, tokenizer, self.general, progress=progress)
        return ImplantScores(efficacy, generalisation, general, answers, predictions)

    def report(self, model, tokenizer, *deltas, base: ImplantScores | None = None,
               progress: bool = True) -> ImplantReport:
        """The four numbers of `model` with `deltas` applied against `base` (the base model's `score`, computed
        here without the deltas when None). For a trained copy of the model (full fine-tuning), pass no deltas
        and the base model's `base`."""
        if base is None:
            if not deltas:
                raise EvaluationError("Without deltas the model is its own base: pass base=suite.score(base_model, ...).")
            base = self.score(model, tokenizer, progress=progress)
        tuned = self.score(model, tokenizer, *deltas, base=base, progress=progress)
        return ImplantReport(base, tuned, list(self.neighbourhood))


# -- lm-evaluation-harness bridge (optional extra: pip install 'loki[eval]') --------------------------------
def lm_eval_model(model, tokenizer, *, batch_size: int = 8, **kwargs):
    """An lm-evaluation-harness `HFLM` wrapping the in-memory `model` (no reload), for `lm_eval.simple_evaluate`.

    >>> # import lm_eval
    >>> # with loki.implanted(model, "medical.loki"):
    >>> #     lm_eval.simple_evaluate(model=loki.evaluate.lm_eval_model(model, tok), tasks=["hellaswag"])
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("The lm-evaluation-harness bridge needs lm-eval: pip install 'loki[eval]'") from e
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_lm_eval(model, tokenizer, tasks: Sequence[str | Mapping], *deltas, batch_size: int = 8, limit: int | None = None,
                task_dir: str | Path | None = None, **kwargs) -> dict[str, Any]:
    """Run lm-evaluation-harness `tasks` on the in-memory model with `deltas` applied (reverted afterwards).
    `task_dir` adds a folder of task YAML files. Returns `simple_evaluate`'s `results` dict (task -> metrics)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("The lm-evaluation-harness bridge needs lm-eval: pip install 'loki[eval]'") from e
    from .apply import implanted

    manager = TaskManager(include_path=str(task_dir)) if task_dir else None
    with implanted(model, *deltas):
        out = lm_eval.simple_evaluate(model=lm_eval_model(model, tokenizer, batch_size=batch_size), tasks=list(tasks),
                                      limit=limit, task_manager=manager, **kwargs)
    return out["results"]


__all__ = [
    "Benchmark", "GENERAL_SETS", "ImplantReport", "ImplantScores", "ImplantSuite", "Report", "answer_predictions", "specificity", "answer_matches", "choice_logprobs", "compare", "evaluate",
    "exact_match", "forgetting_score", "general_suite", "generate", "lm_eval_model", "multiple_choice_accuracy",
    "normalize_answer", "perplexity", "run_lm_eval",
]
