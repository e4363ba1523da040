"""Metric primitives: perplexity, multiple-choice accuracy, exact-match QA, teacher-forced answer tokens
(specificity), n-gram entropy (fluency) and the paper's forgetting score.

>>> forgetting_score([0.8, 0.5], [0.4, 0.5])
25.0
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import EvaluationError
from ..generation import GENERATE_BATCH, batches, check_batch_size, encode_text, generate

MATCH_MODES = ("exact", "prefix", "contains")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids such that context + continuation is how the whole text tokenises
    (as lm-evaluation-harness does it), so a choice is scored in the tokenisation the model would produce."""
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encodings
        return ctx, encode_text(tokenizer, continuation, special=False)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def _sequence_logprobs(
    model, sequences: Sequence[tuple[list[int], int]], batch_size: int, desc: str, progress: bool
) -> list[tuple[float, int, bool]]:
    """For each `(token_ids, n_scored)`: the summed log-probability of the last `n_scored` tokens given everything
    before them, the number of tokens scored, and whether each of them was the model's greedy (argmax) choice."""
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # little padding per batch
    out: list[Any] = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc=desc, disable=not progress, leave=False)
    for batch in batches(order, batch_size):
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
def perplexity(
    model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 256, progress: bool = True
) -> float:
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
        ids = encode_text(tokenizer, text)[:max_length]
        if len(ids) < 2:
            raise EvaluationError(f"Text {text[:40]!r} has fewer than 2 tokens; nothing to score.")
        seqs.append((ids, len(ids) - 1))
    scored = _sequence_logprobs(model, seqs, batch_size, "perplexity", progress)
    nll = -sum(lp for lp, _, _ in scored)
    return math.exp(nll / sum(n for _, n, _ in scored))


def choice_logprobs(
    model,
    tokenizer,
    prompt: str | Sequence[str],
    choices: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[float]]:
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


def multiple_choice_accuracy(
    model,
    tokenizer,
    items: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
) -> float:
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
    items = check_items(items, ("prompt", "choices", "answer"))
    for i, it in enumerate(items):
        if not (isinstance(it["answer"], int) and 0 <= it["answer"] < len(it["choices"])):
            raise EvaluationError(
                f"Item {i}: answer {it['answer']!r} is not an index into its {len(it['choices'])} choices."
            )
    scores = choice_logprobs(
        model,
        tokenizer,
        [it["prompt"] for it in items],
        [it["choices"] for it in items],
        batch_size=batch_size,
        progress=progress,
    )
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
        if (
            (mode == "exact" and pred == a)
            or (mode == "prefix" and (pred + " ").startswith(a + " "))
            or (mode == "contains" and f" {a} " in f" {pred} ")
        ):
            return True
    return False


def exact_match(
    model,
    tokenizer,
    items: Sequence[Mapping[str, Any]],
    *,
    mode: str = "exact",
    chat: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = GENERATE_BATCH,
    progress: bool = True,
) -> float:
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
    items = check_items(items, ("question", "answers"))
    if mode not in MATCH_MODES:
        raise EvaluationError(f"Unknown match mode {mode!r}; choose from {MATCH_MODES}.")
    preds = generate(
        model,
        tokenizer,
        [it["question"] for it in items],
        chat=chat,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return sum(answer_matches(p, it["answers"], mode) for p, it in zip(preds, items)) / len(items)


def forgetting_score(
    original: Mapping[str, float] | Sequence[float], tuned: Mapping[str, float] | Sequence[float]
) -> float:
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
            raise EvaluationError(
                f"An original score is {o}; the forgetting score divides by it, so it must be > 0. "
                "Drop benchmarks the base model scores 0 on."
            )
    return 100.0 / len(pairs) * sum((o - t) / o for o, t in pairs)


def check_items(items: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> list[Mapping[str, Any]]:
    items = list(items)
    if not items:
        raise EvaluationError("No items to evaluate.")
    for i, it in enumerate(items):
        missing = [k for k in keys if k not in it]
        if missing:
            raise EvaluationError(f"Item {i} lacks {missing}; expected keys {list(keys)}, got {sorted(it)}.")
    return items


@torch.no_grad()
def answer_predictions(
    model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, batch_size: int = 8, progress: bool = True
) -> list[list[int]]:
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
    from ..dataset import answer_positions, collate, encode, pad_token_id

    check_batch_size(batch_size)
    if len(questions) != len(answers):
        raise EvaluationError(f"Got {len(questions)} questions but {len(answers)} answers.")
    encoded = [encode(tokenizer, {"question": q, "answer": a}) for q, a in zip(questions, answers)]
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for chunk in tqdm(
        list(batches(list(range(len(encoded))), batch_size)), desc="answers", disable=not progress, leave=False
    ):
        batch = collate([encoded[i] for i in chunk], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
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
        raise EvaluationError(
            f"Got {len(base)} base and {len(tuned)} tuned predictions; give the same non-zero number."
        )
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
