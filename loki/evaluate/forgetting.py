"""General-knowledge forgetting: named benchmarks (`Benchmark`), the shipped general sets (`general_suite`),
scores with deltas applied (`benchmark_scores`) and before/after with the paper's forgetting score (`compare`,
`ForgettingReport`).

>>> [b.name for b in general_suite(["wiki_perplexity"], n=1)]
['wiki_perplexity']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..dataset import read_json_lines
from ..errors import EvaluationError
from .metrics import check_items, exact_match, forgetting_score, multiple_choice_accuracy, perplexity

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
KINDS = ("perplexity", "choice", "generate")


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
        self.items = list(check_items(self.items, keys[self.kind]))

    def head(self, n: int | None) -> Benchmark:
        """The same benchmark on its first `n` items (this benchmark itself for None).

        >>> len(general_suite(["world_capitals"])[0].head(5).items)
        5
        """
        return self if n is None else Benchmark(self.name, self.kind, self.items[:n], dict(self.options))

    def score(self, model, tokenizer, *, progress: bool = True) -> float:
        """The model's higher-is-better score on this benchmark (accuracy, or 1/perplexity), with `options`.

        Args:
            model: a causal LM, as it is now (apply deltas first, or use `benchmark_scores`).
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
    def from_jsonl(cls, path: str | Path, name: str | None = None, kind: str | None = None, **options) -> Benchmark:
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
        return cls(
            name or header.get("name") or path.stem,
            kind or header.get("kind"),
            items,
            {**header.get("options", {}), **options},
        )


GENERAL_SETS = (
    "wiki_perplexity",
    "world_capitals",
    "bb_general_knowledge",
    "bb_misconceptions",
    "bb_physical_intuition",
    "bb_hindu_knowledge",
    "wikidata_qa",
)


def general_suite(names: Sequence[str] = GENERAL_SETS, *, n: int | None = None) -> list[Benchmark]:
    """The small general-capability sets shipped in `loki/data/general/` (built offline from Wikipedia summaries and
    BIG-bench; how, their sources and licenses: `loki/data/general/README.md`).

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


def benchmark_scores(
    model, tokenizer, benchmarks: Sequence[Benchmark], *deltas, progress: bool = True
) -> dict[str, float]:
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

    >>> # loki.evaluate.benchmark_scores(model, tokenizer, general_suite(["world_capitals", "wiki_perplexity"], n=20))
    >>> # {'world_capitals': 0.35, 'wiki_perplexity': 0.05898817193578102}  # the default model
    """
    from ..ledger import implanted

    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise EvaluationError(f"Benchmark names must be unique, got {names}.")
    was_training = model.training
    model.eval()
    try:
        with implanted(model, *deltas):
            return {
                b.name: b.score(model, tokenizer, progress=progress)
                for b in tqdm(benchmarks, desc="benchmarks", disable=not progress, leave=False)
            }
    finally:
        model.train(was_training)


@dataclass
class ForgettingReport:
    """Scores before and after (benchmark -> higher-is-better score), and the forgetting score over them (percent,
    lower is better; LoKI paper §4).

    >>> report = ForgettingReport({"mc": 0.5, "ppl": 0.04, "qa": 0.0}, {"mc": 0.25, "ppl": 0.04, "qa": 0.1})
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


def compare(
    model,
    tokenizer,
    benchmarks: Sequence[Benchmark],
    *deltas,
    original: Mapping[str, float] | None = None,
    progress: bool = True,
) -> ForgettingReport:
    """Evaluate the base model (or reuse `original` scores) and the model with `deltas` applied; the model is
    reverted afterwards.

    Args:
        model: the base model.
        tokenizer: its tokenizer.
        benchmarks: the benchmarks (unique names).
        *deltas: `Delta` objects to judge, applied together.
        original: the base model's scores from an earlier `benchmark_scores` on the same benchmarks; None computes them.
        progress: show progress bars.

    Returns:
        ForgettingReport: `original`, `tuned` and their `forgetting`.

    Raises:
        EvaluationError: see `benchmark_scores`.
        LokiError: a delta that cannot be applied.

    >>> # report = loki.evaluate.compare(model, tokenizer, general_suite(n=50), loki.load("medical.loki"))
    >>> # print(report.table())
    """
    base = dict(original) if original is not None else benchmark_scores(model, tokenizer, benchmarks, progress=progress)
    return ForgettingReport(base, benchmark_scores(model, tokenizer, benchmarks, *deltas, progress=progress))
