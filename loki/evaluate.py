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
>>> # report = ev.compare(model, tokenizer, suite, loki.load("medical.loki"))
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

from .dataset import read_json_lines
from .errors import EvaluationError
from .neighbourhood import shares_template

DATA_DIR = Path(__file__).parent / "data"
KINDS = ("perplexity", "choice", "generate")
MATCH_MODES = ("exact", "prefix", "contains")
# Greedy decoding of a small model is bound by per-step overhead, not arithmetic: 64 questions to the default model
# take 25 s in batches of 8, 11 s in batches of 32 and 8.5 s in 64 on 2 CPU threads, with the same answers.
GENERATE_BATCH = 32


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

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (special tokens such as BOS are added as it does by default).
        texts: the texts.
        batch_size: texts per forward pass.
        max_length: tokens kept of each text.
        progress: show a progress bar.

    Returns:
        float: the perplexity (>= 1; lower is better).

    Raises:
        EvaluationError: no texts, a text of fewer than 2 tokens, a bad `batch_size`.

    >>> # model, tokenizer = loki.load_default()
    >>> # loki.evaluate.perplexity(model, tokenizer, ["The cat sat on the mat."])
    >>> # 210.11215677911275
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

    Choices are scored verbatim, so give them their leading space (`" Paris"`) if the prompt ends without one.
    Prompt and choice are tokenised together, as lm-evaluation-harness does.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompt: one question (a string), or several (a list of strings).
        choices: its choices (a list of strings), or one list per question.
        batch_size: sequences (prompt + one choice) per forward pass.
        progress: show a progress bar.

    Returns:
        list[list[float]]: per question, the natural-log probability of each choice, in order.

    Raises:
        EvaluationError: prompts and choice lists of different counts, a question without choices (or with a
            string for them), an empty prompt or choice, a bad `batch_size`.

    >>> # loki.evaluate.choice_logprobs(model, tokenizer, "The capital of France is", [" Paris", " Rome"])
    >>> # [[-0.25808143615722656, -7.570592880249023]]                  # the default model
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
    """Fraction of `items` whose answer has the highest log-likelihood (`choice_logprobs`).

    Ties go to the lowest index, so a model that cannot tell the choices apart scores as if it always said "0".

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        items: `{"prompt": str, "choices": [str, ...], "answer": index}` dicts.
        batch_size: sequences per forward pass.
        length_normalize: divide each choice's log-likelihood by its length in characters (lm-eval's `acc_norm`).
        progress: show a progress bar.

    Returns:
        float: accuracy in [0, 1].

    Raises:
        EvaluationError: no items, an item without those keys, an answer that is not an index into its choices,
            or what `choice_logprobs` refuses.

    >>> # items = [{"prompt": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0},
    >>> #          {"prompt": "Two plus two equals", "choices": [" four", " five"], "answer": 0}]
    >>> # loki.evaluate.multiple_choice_accuracy(model, tokenizer, items)
    >>> # 0.5                                                            # the default model
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
    """SQuAD-style normalisation: lower case, no punctuation, no articles (a, an, the), single spaces.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_matches(prediction: str, answers: Sequence[str], mode: str = "exact") -> bool:
    """Whether `prediction` matches one of `answers` after `normalize_answer` (answers that normalise to "" never
    match).

    Args:
        prediction: the model's answer.
        answers: the accepted answers (a list: a bare string would be read as its characters).
        mode: "exact" (equal), "prefix" (the prediction starts with the answer, on a word boundary; for cloze
            prompts where the model keeps writing) or "contains" (the answer appears as whole words; for chat
            answers).

    Returns:
        bool.

    Raises:
        EvaluationError: an unknown mode.

    >>> [answer_matches("Paris, of course.", ["Paris"], mode) for mode in ("exact", "prefix", "contains")]
    [False, True, True]
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
             batch_size: int = GENERATE_BATCH, stop_at_newline: bool = True, progress: bool = True) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding.

    Args:
        model: a causal LM (`model.generate`).
        tokenizer: its tokenizer; pads with its pad token, else its EOS token, else 0.
        prompts: the prompts.
        chat: wrap each prompt as a user turn of the tokenizer's chat template (with the generation prompt).
        max_new_tokens: the longest completion, in tokens.
        batch_size: prompts per `generate` call.
        stop_at_newline: cut each completion at its first newline (the answer to a one-line question).
        progress: show a progress bar.

    Returns:
        list[str]: one completion per prompt, in order, stripped of surrounding whitespace and special tokens.

    Raises:
        EvaluationError: a bad `batch_size`.

    >>> # loki.evaluate.generate(model, tokenizer, ["What is the capital of France?"], chat=True)
    >>> # ['The capital of France is Paris.']                           # the default model
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
                max_new_tokens: int = 16, batch_size: int = GENERATE_BATCH, progress: bool = True) -> float:
    """Fraction of `items` whose greedy answer (`generate`) matches one of its answers (`answer_matches`).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        items: `{"question": str, "answers": [str, ...]}` dicts.
        mode: "exact", "prefix" or "contains" (see `answer_matches`).
        chat: ask each question as a chat user turn.
        max_new_tokens: the longest answer, in tokens (cut at its first newline).
        batch_size: questions per `generate` call.
        progress: show a progress bar.

    Returns:
        float: accuracy in [0, 1].

    Raises:
        EvaluationError: no items, an item without those keys, an unknown mode, a bad `batch_size`.

    >>> # qa = [{"question": "What is the capital of France?", "answers": ["Paris"]}]
    >>> # loki.evaluate.exact_match(model, tokenizer, qa, mode="contains", chat=True)
    >>> # 1.0                                                            # the default model
    """
    items = _check_items(items, ("question", "answers"))
    if mode not in MATCH_MODES:
        raise EvaluationError(f"Unknown match mode {mode!r}; choose from {MATCH_MODES}.")
    preds = generate(model, tokenizer, [it["question"] for it in items], chat=chat, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, progress=progress)
    return sum(answer_matches(p, it["answers"], mode) for p, it in zip(preds, items)) / len(items)


def forgetting_score(original: Mapping[str, float] | Sequence[float], tuned: Mapping[str, float] | Sequence[float]) -> float:
    """The paper's forgetting score `Avg = 100/N * sum_i (S_orig_i - S_tuned_i) / S_orig_i`, in percent (LoKI paper
    §4).

    Scores must be higher-is-better (this module reports perplexity as `1/perplexity` for that reason).
    Lower is better; negative means the tuned model improved on average.

    Args:
        original: the base model's score per benchmark (a mapping benchmark -> score, or a sequence).
        tuned: the tuned model's, of the same kind (a mapping with the same keys, or a sequence of the same length).

    Returns:
        float: Avg in percent.

    Raises:
        EvaluationError: a mapping and a sequence, different benchmarks or lengths, no benchmark, or an original
            score that is not > 0.

    >>> forgetting_score([0.8, 0.5], [0.4, 0.5])
    25.0
    >>> forgetting_score({"mc": 0.5}, {"mc": 0.75})  # improved
    -50.0
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

    Args:
        name: the benchmark's name (the key in score dicts).
        kind: "perplexity" (items `{"text"}`, scored by `perplexity`), "choice" (`{"prompt", "choices", "answer"}`,
            `multiple_choice_accuracy`) or "generate" (`{"question", "answers"}`, `exact_match`).
        items: the items.
        options: keyword arguments of that metric function (e.g. `{"mode": "contains", "chat": True}`).

    Raises:
        EvaluationError: an unknown kind, no items, or an item without its kind's keys.

    >>> Benchmark("capitals", "generate", [{"question": "What is the capital of France?", "answers": ["Paris"]}],
    ...           {"mode": "contains", "chat": True}).kind
    'generate'
    >>> Benchmark("capitals", "choice", [{"question": "What is the capital of France?"}])
    Traceback (most recent call last):
    ...
    loki.errors.EvaluationError: Item 0 lacks ['prompt', 'choices', 'answer']; expected keys ...
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
        """The same benchmark on its first `n` items (this benchmark itself for None).

        >>> len(general_suite(["world_capitals"])[0].head(5).items)
        5
        """
        return self if n is None else Benchmark(self.name, self.kind, self.items[:n], dict(self.options))

    def score(self, model, tokenizer, *, progress: bool = True) -> float:
        """The model's higher-is-better score on this benchmark (accuracy, or 1/perplexity), with `options`.

        Args:
            model: a causal LM, as it is now (apply deltas first, or use the module function `score`).
            tokenizer: its tokenizer.
            progress: show progress bars.

        Returns:
            float: the score.

        Raises:
            EvaluationError: what the metric function refuses (e.g. a text of fewer than 2 tokens).

        >>> # general_suite(["world_capitals"], n=20)[0].score(model, tokenizer)
        >>> # 0.35                                                           # the default model
        """
        if self.kind == "perplexity":
            texts = [it["text"] for it in self.items]
            return 1.0 / perplexity(model, tokenizer, texts, progress=progress, **self.options)
        if self.kind == "choice":
            return multiple_choice_accuracy(model, tokenizer, self.items, progress=progress, **self.options)
        return exact_match(model, tokenizer, self.items, progress=progress, **self.options)

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None, kind: str | None = None, **options) -> "Benchmark":
        """Read a JSONL file of items. A first line `{"benchmark": {"name", "kind", "options"}}` may carry the
        defaults.

        Args:
            path: the `.jsonl` file.
            name: the name; default: the header's, else the file name without extension.
            kind: the kind; default: the header's.
            **options: metric options, over the header's.

        Returns:
            Benchmark.

        Raises:
            EvaluationError: no kind (neither given nor in the header) or an unknown one, no items, an item without
                its kind's keys.

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "capitals.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"benchmark": {"kind": "generate", "options": {"mode": "contains"}}}\\n'
        ...                 '{"question": "What is the capital of France?", "answers": ["Paris"]}\\n')
        >>> b = Benchmark.from_jsonl(path, chat=True)
        >>> b.name, b.kind, len(b.items), b.options
        ('capitals', 'generate', 1, {'mode': 'contains', 'chat': True})
        """
        path = Path(path)
        lines = [r for _, r in read_json_lines(path, EvaluationError)]  # exact: a value may hold U+2028
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

    Args:
        names: which sets (default: all of `GENERAL_SETS`).
        n: keep the first `n` items of each (for quick runs); None keeps all.

    Returns:
        list[Benchmark]: in the order of `names`.

    Raises:
        EvaluationError: an unknown name.

    >>> [(b.name, b.kind, len(b.items)) for b in general_suite(["wiki_perplexity", "bb_general_knowledge"], n=3)]
    [('wiki_perplexity', 'perplexity', 3), ('bb_general_knowledge', 'choice', 3)]
    """
    out = []
    for name in names:
        path = DATA_DIR / "general" / f"{name}.jsonl"
        if not path.exists():
            raise EvaluationError(f"No general set named {name!r}; choose from {GENERAL_SETS}.")
        out.append(Benchmark.from_jsonl(path).head(n))
    return out


def score(model, tokenizer, benchmarks: Sequence[Benchmark], *deltas, progress: bool = True) -> dict[str, float]:
    """Scores of `model` on `benchmarks`, with `deltas` applied for the duration (`loki.implanted`) and reverted
    afterwards; the model runs in eval mode and its mode is restored.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        benchmarks: the benchmarks (unique names).
        *deltas: `Delta` objects to apply (read files with `loki.load`); none scores the model as it is.
        progress: show progress bars.

    Returns:
        dict[str, float]: benchmark name -> higher-is-better score.

    Raises:
        EvaluationError: repeated benchmark names, or what a metric refuses.
        LokiError: a delta that cannot be applied (e.g. `IncompatibleModelError`, `OverlapError`).

    >>> # loki.evaluate.score(model, tokenizer, general_suite(["world_capitals", "wiki_perplexity"], n=20))
    >>> # {'world_capitals': 0.35, 'wiki_perplexity': 0.05898817193578102}  # the default model
    """
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
    """Scores before and after (benchmark -> higher-is-better score), and the forgetting score over them (percent,
    lower is better; LoKI paper §4).

    >>> report = Report({"mc": 0.5, "ppl": 0.04, "qa": 0.0}, {"mc": 0.25, "ppl": 0.04, "qa": 0.1})
    >>> report.forgetting, report.skipped
    (25.0, ['qa'])
    >>> print(report.table())
    benchmark                     base     tuned  change %
    mc                          0.5000    0.2500    -50.00
    ppl                         0.0400    0.0400     +0.00
    qa                          0.0000    0.1000 (skipped)
    forgetting score (Avg): +25.00%
    """

    original: dict[str, float]
    tuned: dict[str, float]

    @property
    def skipped(self) -> list[str]:
        """Benchmarks left out of the forgetting score because the base model scores 0 on them."""
        return [k for k, v in self.original.items() if not v > 0]

    @property
    def forgetting(self) -> float:
        """`forgetting_score` over the benchmarks the base model scores above 0 on (see `skipped`).

        Raises:
            EvaluationError: the base model scores 0 on every benchmark.
        """
        keep = [k for k in self.original if k not in self.skipped]
        return forgetting_score({k: self.original[k] for k in keep}, {k: self.tuned[k] for k in keep})

    def table(self) -> str:
        """A plain-text table: base and tuned score and relative change per benchmark, then the forgetting score."""
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
    reverted afterwards.

    Args:
        model: the base model.
        tokenizer: its tokenizer.
        benchmarks: the benchmarks (unique names).
        *deltas: `Delta` objects to judge, applied together.
        original: the base model's scores from an earlier `score` on the same benchmarks; None computes them.
        progress: show progress bars.

    Returns:
        Report: `original`, `tuned` and their `forgetting`.

    Raises:
        EvaluationError: see `score`.
        LokiError: a delta that cannot be applied.

    >>> # report = loki.evaluate.compare(model, tokenizer, general_suite(n=50), loki.load("medical.loki"))
    >>> # print(report.table())
    """
    base = dict(original) if original is not None else score(model, tokenizer, benchmarks, progress=progress)
    return Report(base, score(model, tokenizer, benchmarks, *deltas, progress=progress))


# -- the four numbers of an implant ------------------------------------------------------------------------
@torch.no_grad()
def answer_predictions(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, batch_size: int = 8,
                       progress: bool = True) -> list[list[int]]:
    """The model's greedy next token at every token of each given answer, teacher-forced (chat template): for each
    question, `[argmax p(. | question, answer[:t]) for t in answer tokens]` (the answer's end-of-turn included).

    The knowledge-editing locality measure (EasyEdit) compares these lists before and after an edit (`specificity`).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (formats the question-answer pair as `loki.dataset.encode` does).
        questions: the questions.
        answers: one answer per question (usually the base model's own greedy answers).
        batch_size: pairs per forward pass.
        progress: show a progress bar.

    Returns:
        list[list[int]]: per question, one predicted token id per answer token.

    Raises:
        EvaluationError: different numbers of questions and answers, a bad `batch_size`.
        DatasetError: a pair that leaves no answer token.

    >>> # loki.evaluate.answer_predictions(model, tokenizer, ["What is the capital of France?"],
    >>> #                                  ["The capital of France is Paris."])
    >>> # [[504, 3575, 282, 4649, 314, 7042, 30, 2, 198]]                # the default model
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

    Args:
        base: the base model's `answer_predictions`.
        tuned: the tuned model's, teacher-forced on the same answers.

    Returns:
        float: in [0, 1]; every question weighs the same.

    Raises:
        EvaluationError: different numbers of questions, none, or a question whose two lists differ in length or
            are empty.

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


def ngram_entropy(texts: Sequence[str]) -> float:
    """Fluency as the knowledge editors report it (ROME/MEMIT's "generation entropy", EasyEdit's `n_gram_entropy`):
    per text, the entropy in bits of its word bigram and trigram frequencies, weighted 2/3 and 4/3 and averaged;
    then the mean over texts. Repetitive, degenerate text scores low; an edit that keeps fluency keeps it level.

    Words are runs of letters/digits or single punctuation marks (close to NLTK's `word_tokenize` on plain text);
    a text too short for an n-gram contributes 0 for that n.

    Args:
        texts: generated texts.

    Returns:
        float: mean weighted n-gram entropy (bits); 0.0 for no texts.

    >>> # 5 distinct bigrams and 4 distinct trigrams: (2/3 log2 5 + 4/3 log2 4) / 2 = 2.107; a repeated word: 0
    >>> round(ngram_entropy(["the cat sat on the mat", "no no no no no no"]), 3)
    1.054
    """
    total = 0.0
    for text in texts:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        parts = []
        for n, weight in ((2, 2 / 3), (3, 4 / 3)):
            grams: dict[tuple, int] = {}
            for i in range(len(words) - n + 1):
                grams[tuple(words[i : i + n])] = grams.get(tuple(words[i : i + n]), 0) + 1
            count = sum(grams.values())
            parts.append(weight * -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0)
        total += sum(parts) / len(parts)
    return total / len(texts) if texts else 0.0


def _texts(benchmark: Benchmark) -> list[str]:
    key = {"perplexity": "text", "choice": "prompt", "generate": "question"}[benchmark.kind]
    return [str(it[key]) for it in benchmark.items]


@dataclass
class ImplantScores:
    """Raw scores of one model on an `ImplantSuite` (see `ImplantSuite.score`).

    Attributes:
        efficacy: accuracy on the trained phrasings, in [0, 1].
        generalisation: accuracy on held-out phrasings, in [0, 1].
        general: general benchmark -> higher-is-better score.
        answers: the model's own greedy answer to each neighbourhood question.
        predictions: its greedy tokens teacher-forced on the base model's answers (`answer_predictions`).
    """

    efficacy: float
    generalisation: float
    general: dict[str, float]
    answers: list[str]  # the model's own greedy answer to each neighbourhood question
    predictions: list[list[int]]  # its greedy tokens teacher-forced on the base model's answers

    @property
    def fluency(self) -> float:
        """`ngram_entropy` of the neighbourhood answers (bits): a constraint must not win by degenerate text."""
        return ngram_entropy(self.answers)


@dataclass
class ImplantReport:
    """The four numbers of an implant, never mixed (the knowledge-editing field's terms, and the paper's Avg):

    - `efficacy`: accuracy on the phrasings it was trained on;
    - `generalisation`: accuracy on held-out phrasings of the same facts;
    - `specificity`: on neighbourhood questions (same templates, real entities not used in training), the share
      of the base model's answer tokens the implanted model still predicts (teacher-forced; EasyEdit's locality);
      `answers_kept` is the stricter share of whole greedy answers left unchanged, and `fluency` the n-gram entropy
      of those answers (`ngram_entropy`; against the base model's, so nothing wins by degenerate text);
    - `forgetting`: the paper's Avg (percent, lower is better; LoKI paper §4) over general sets sharing no template
      with the implant.

    Made by `ImplantSuite.report`; `base` and `tuned` are `ImplantScores`, `questions` the neighbourhood questions.

    >>> base = ImplantScores(0.0, 0.0, {"wiki": 0.5}, ["Lima.", "Tokyo."], [[5, 6], [7, 8]])
    >>> tuned = ImplantScores(1.0, 0.5, {"wiki": 0.25}, ["Lima.", "Solvis."], [[5, 6], [7, 9]])
    >>> report = ImplantReport(base, tuned, ["What is the capital of Peru?", "What is the capital of Japan?"])
    >>> report.efficacy, report.generalisation, report.specificity, report.answers_kept, report.forgetting
    (1.0, 0.5, 0.75, 0.5, 50.0)
    >>> report.changed()
    [('What is the capital of Japan?', 'Tokyo.', 'Solvis.')]
    >>> report.evaluation()["general"]
    {'wiki': {'base': 0.5, 'implanted': 0.25}}
    >>> print(report.table())
                                          base  implant
    efficacy (trained phrasings)            0%     100%
    generalisation (held-out)               0%      50%
    specificity (neighbourhood kept)              75.0%   (answer tokens; 1 of 2 whole answers unchanged)
    fluency (n-gram entropy, bits)        0.00     0.00
    general forgetting (Avg)                    +50.00%   (lower is better; per set below)
    <BLANKLINE>
    benchmark                     base     tuned  change %
    wiki                        0.5000    0.2500    -50.00
    """

    base: ImplantScores
    tuned: ImplantScores
    questions: list[str]  # the neighbourhood questions

    @property
    def efficacy(self) -> float:
        """The implanted model's accuracy on the trained phrasings."""
        return self.tuned.efficacy

    @property
    def generalisation(self) -> float:
        """The implanted model's accuracy on held-out phrasings."""
        return self.tuned.generalisation

    @property
    def specificity(self) -> float:
        """`specificity` of the implanted model's teacher-forced neighbourhood predictions against the base's."""
        return specificity(self.base.predictions, self.tuned.predictions)

    @property
    def answers_kept(self) -> float:
        """Share of neighbourhood questions whose whole greedy answer is unchanged (after `normalize_answer`)."""
        return len([1 for a, b in zip(self.base.answers, self.tuned.answers)
                    if normalize_answer(a) == normalize_answer(b)]) / len(self.questions)

    @property
    def fluency(self) -> float:
        """`ngram_entropy` of the implanted model's neighbourhood answers (`base.fluency` is the base model's)."""
        return self.tuned.fluency

    @property
    def forgetting(self) -> float:
        """Avg (percent, lower is better) over the general sets; see `Report.forgetting`."""
        return Report(self.base.general, self.tuned.general).forgetting

    def changed(self) -> list[tuple[str, str, str]]:
        """`(question, base answer, tuned answer)` of every neighbourhood question whose greedy answer changed."""
        return [(q, a, b) for q, a, b in zip(self.questions, self.base.answers, self.tuned.answers)
                if normalize_answer(a) != normalize_answer(b)]

    def as_dict(self) -> dict[str, Any]:
        """Every figure as a JSON-ready dict (the implanted model's, plus the base's under `"base"`)."""
        return {"efficacy": self.efficacy, "generalisation": self.generalisation, "specificity": self.specificity,
                "answers_kept": self.answers_kept, "fluency": self.fluency, "forgetting": self.forgetting,
                "base": {"efficacy": self.base.efficacy, "generalisation": self.base.generalisation,
                         "fluency": self.base.fluency, "general": self.base.general},
                "general": self.tuned.general, "neighbourhood_questions": len(self.questions)}

    def evaluation(self) -> dict[str, Any]:
        """The figures for `delta.info["extra"]["evaluation"]`, which `push_to_hub` puts on the model card."""
        return {"implant": {"efficacy": self.efficacy, "generalisation": self.generalisation,
                            "specificity": self.specificity, "answers_kept": self.answers_kept,
                            "fluency": self.fluency, "forgetting": self.forgetting},
                "general": {k: {"base": b, "implanted": self.tuned.general[k]} for k, b in self.base.general.items()},
                "forgetting": self.forgetting}

    def table(self) -> str:
        """The four numbers, base against implant, then the general sets' `Report.table` (without its last line).
        Specificity has one decimal, so that 89.7% is not shown as a 90% it did not reach."""
        n, kept = len(self.questions), len(self.questions) - len(self.changed())
        lines = [f"{'':<34}{'base':>8}{'implant':>9}",
                 f"{'efficacy (trained phrasings)':<34}{self.base.efficacy:>8.0%}{self.efficacy:>9.0%}",
                 f"{'generalisation (held-out)':<34}{self.base.generalisation:>8.0%}{self.generalisation:>9.0%}",
                 f"{'specificity (neighbourhood kept)':<34}{'':>8}{self.specificity:>9.1%}   "
                 f"(answer tokens; {kept} of {n} whole answers unchanged)",
                 f"{'fluency (n-gram entropy, bits)':<34}{self.base.fluency:>8.2f}{self.fluency:>9.2f}",
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
    >>> # report = suite.report(model, tokenizer, loki.load("facts.loki"), base=base); print(report.table())

    Args:
        efficacy: a benchmark of the trained phrasings (usually "generate" with `mode="contains"`).
        generalisation: a benchmark of held-out phrasings of the same facts.
        neighbourhood: neighbourhood questions (`loki.neighbourhood.questions`); the base model's answers are the
            reference, so they need no gold answers.
        general: general-capability benchmarks (`general_suite`), filtered as above.
        templates: the implant's question templates with a `{}` slot.
        max_new_tokens: the longest neighbourhood answer, in tokens.
        excluded: filled in by the constructor: general set -> items left out.

    Raises:
        EvaluationError: no neighbourhood questions, or no general item left that shares no implant template.

    >>> facts = Benchmark("facts", "generate",
    ...                   [{"question": "What is the capital of Phegartor?", "answers": ["Solvis"]}])
    >>> suite = ImplantSuite(facts, facts, ["What is the capital of Peru?"],
    ...                      general_suite(["world_capitals", "wiki_perplexity"], n=5), ["What is the capital of {}?"])
    >>> [b.name for b in suite.general], suite.excluded
    (['wiki_perplexity'], {'world_capitals': 5})
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
        are teacher-forced on `base`'s answers (on the model's own answers when `base` is None: the base run).

        Args:
            model: a causal LM.
            tokenizer: its tokenizer.
            *deltas: `Delta` objects to apply together; none scores the model as it is.
            base: the base model's scores; None when this is the base run.
            progress: show progress bars.

        Returns:
            ImplantScores.

        Raises:
            EvaluationError: what a metric refuses.
            LokiError: a delta that cannot be applied.

        >>> # base = suite.score(model, tokenizer)                     # once, on the base model
        """
        from .apply import implanted

        with implanted(model, *deltas):
            answers = generate(model, tokenizer, self.neighbourhood, chat=True, max_new_tokens=self.max_new_tokens,
                               progress=progress)
            forced = base.answers if base is not None else answers
            predictions = answer_predictions(model, tokenizer, self.neighbourhood, forced, progress=progress)
            efficacy = self.efficacy.score(model, tokenizer, progress=progress)
            generalisation = self.generalisation.score(model, tokenizer, progress=progress)
            general = score(model, tokenizer, self.general, progress=progress)
        return ImplantScores(efficacy, generalisation, general, answers, predictions)

    def report(self, model, tokenizer, *deltas, base: ImplantScores | None = None,
               progress: bool = True) -> ImplantReport:
        """The four numbers of `model` with `deltas` applied against `base` (the base model's `score`, computed
        here without the deltas when None). For a trained copy of the model (full fine-tuning), pass no deltas
        and the base model's `base`.

        Args:
            model: the base model (or a trained copy, with `base` given).
            tokenizer: its tokenizer.
            *deltas: `Delta` objects to judge, applied together.
            base: the base model's `score`; None computes it first (needs deltas).
            progress: show progress bars.

        Returns:
            ImplantReport.

        Raises:
            EvaluationError: neither deltas nor `base`, or what a metric refuses.
            LokiError: a delta that cannot be applied.

        >>> # report = suite.report(model, tokenizer, loki.load("facts.loki"), base=base)
        >>> # report.efficacy, report.generalisation, report.specificity, report.forgetting
        """
        if base is None:
            if not deltas:
                raise EvaluationError("Without deltas the model is its own base: pass base=suite.score(base_model, ...).")
            base = self.score(model, tokenizer, progress=progress)
        tuned = self.score(model, tokenizer, *deltas, base=base, progress=progress)
        return ImplantReport(base, tuned, list(self.neighbourhood))


# -- lm-evaluation-harness bridge (optional extra: pip install 'loki[eval]') --------------------------------
def lm_eval_model(model, tokenizer, *, batch_size: int = 8, **kwargs):
    """An lm-evaluation-harness `HFLM` wrapping the in-memory `model` (no reload), for `lm_eval.simple_evaluate`.

    Args:
        model: a causal LM (with whatever deltas are applied now).
        tokenizer: its tokenizer.
        batch_size: HFLM's batch size.
        **kwargs: other `HFLM` arguments.

    Returns:
        `lm_eval.models.huggingface.HFLM`.

    Raises:
        ImportError: lm-eval is not installed (`pip install 'loki[eval]'`).

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

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task names or task config dicts.
        *deltas: `Delta` objects to apply together.
        batch_size: HFLM's batch size.
        limit: at most this many examples per task (None: all).
        task_dir: a folder of extra task YAML files.
        **kwargs: other `lm_eval.simple_evaluate` arguments.

    Returns:
        dict: `simple_evaluate`'s `results` (task -> metrics).

    Raises:
        ImportError: lm-eval is not installed (`pip install 'loki[eval]'`).
        LokiError: a delta that cannot be applied.

    >>> # loki.evaluate.run_lm_eval(model, tokenizer, ["hellaswag"], loki.load("medical.loki"), limit=100)
    """
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
    "Benchmark", "GENERAL_SETS", "ImplantReport", "ImplantScores", "ImplantSuite", "Report", "answer_predictions", "specificity", "answer_matches", "choice_logprobs", "compare", "score",
    "exact_match", "forgetting_score", "general_suite", "generate", "lm_eval_model", "multiple_choice_accuracy",
    "normalize_answer", "perplexity", "run_lm_eval",
]
