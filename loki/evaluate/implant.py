"""The four numbers of an implant, never mixed: efficacy, generalisation, specificity (with answers kept and
fluency) and general forgetting (`ImplantSuite` scores a model, `ImplantReport` compares two `ImplantScores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import EvaluationError
from ..generation import generate
from ..neighbourhood import shares_template
from ..scoping import Scope, scoped
from .forgetting import Benchmark, ForgettingReport, benchmark_scores
from .metrics import answer_predictions, ngram_entropy, normalize_answer, specificity


def _check_scope(deltas: tuple, scope: Scope | None) -> None:
    if scope is not None and len(deltas) != 1:
        raise EvaluationError(f"scope= gates one delta (as loki.scoped does); got {len(deltas)} deltas.")


def _texts(benchmark: Benchmark) -> list[str]:
    key = {"perplexity": "text", "choice": "prompt", "generate": "question"}[benchmark.kind]
    return [str(it[key]) for it in benchmark.items]


@dataclass
class ImplantScores:
    """Raw scores of one model on an `ImplantSuite` (see `ImplantSuite.scores`).

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
        return len(
            [1 for a, b in zip(self.base.answers, self.tuned.answers) if normalize_answer(a) == normalize_answer(b)]
        ) / len(self.questions)

    @property
    def fluency(self) -> float:
        """`ngram_entropy` of the implanted model's neighbourhood answers (`base.fluency` is the base model's)."""
        return self.tuned.fluency

    @property
    def forgetting(self) -> float:
        """Avg (percent, lower is better) over the general sets; see `ForgettingReport.forgetting`."""
        return ForgettingReport(self.base.general, self.tuned.general).forgetting

    def changed(self) -> list[tuple[str, str, str]]:
        """`(question, base answer, tuned answer)` of every neighbourhood question whose greedy answer changed."""
        return [
            (q, a, b)
            for q, a, b in zip(self.questions, self.base.answers, self.tuned.answers)
            if normalize_answer(a) != normalize_answer(b)
        ]

    def as_dict(self) -> dict[str, Any]:
        """Every figure as a JSON-ready dict (the implanted model's, plus the base's under `"base"`)."""
        return {
            "efficacy": self.efficacy,
            "generalisation": self.generalisation,
            "specificity": self.specificity,
            "answers_kept": self.answers_kept,
            "fluency": self.fluency,
            "forgetting": self.forgetting,
            "base": {
                "efficacy": self.base.efficacy,
                "generalisation": self.base.generalisation,
                "fluency": self.base.fluency,
                "general": self.base.general,
            },
            "general": self.tuned.general,
            "neighbourhood_questions": len(self.questions),
        }

    def evaluation(self, scoped: ImplantReport | None = None) -> dict[str, Any]:
        """The figures for `delta.info["extra"]["evaluation"]`, which `loki.hub.push_delta` puts on the model card.

        Args:
            scoped: the report of the same delta served through its scope (`report(..., scope=)`): its figures go
                under `"scoped"`, shown on the card beside these.

        >>> # delta.info["extra"]["evaluation"] = report.evaluation(scoped=scoped_report); loki.push(delta, repo)
        """
        figures = {
            "implant": {
                "efficacy": self.efficacy,
                "generalisation": self.generalisation,
                "specificity": self.specificity,
                "answers_kept": self.answers_kept,
                "neighbourhood_questions": len(self.questions),
                "fluency": self.fluency,
                "forgetting": self.forgetting,
            },
            "general": {k: {"base": b, "implanted": self.tuned.general[k]} for k, b in self.base.general.items()},
            "forgetting": self.forgetting,
        }
        return figures if scoped is None else {**figures, "scoped": scoped.evaluation()["implant"]}

    def table(self) -> str:
        """The four numbers, base against implant, then the general sets' `ForgettingReport.table` (without its last
        line).
        Specificity has one decimal, so that 89.7% is not shown as a 90% it did not reach."""
        n, kept = len(self.questions), len(self.questions) - len(self.changed())
        lines = [
            f"{'':<34}{'base':>8}{'implant':>9}",
            f"{'efficacy (trained phrasings)':<34}{self.base.efficacy:>8.0%}{self.efficacy:>9.0%}",
            f"{'generalisation (held-out)':<34}{self.base.generalisation:>8.0%}{self.generalisation:>9.0%}",
            f"{'specificity (neighbourhood kept)':<34}{'':>8}{self.specificity:>9.1%}   "
            f"(answer tokens; {kept} of {n} whole answers unchanged)",
            f"{'fluency (n-gram entropy, bits)':<34}{self.base.fluency:>8.2f}{self.fluency:>9.2f}",
            f"{'general forgetting (Avg)':<34}{'':>8}{self.forgetting:>+8.2f}%   (lower is better; per set below)",
        ]
        report = ForgettingReport(self.base.general, self.tuned.general).table().splitlines()[:-1]
        return "\n".join(lines + ["", *report])


@dataclass
class ImplantSuite:
    """What an implant is judged on: efficacy and generalisation benchmarks, neighbourhood questions, general sets.

    `templates` are the implant's question templates (`loki.neighbourhood.templates`). General forgetting is
    measured only on what shares no template with the implant: items of a general set asking a question of such a
    template are neighbourhood items, not general ones, and are left out (`excluded` counts them per set).

    >>> # suite = ev.ImplantSuite(fact_benchmark(facts, "train"), fact_benchmark(facts, "test"),
    >>> #                         neighbourhood=questions, general=ev.general_suite(["wiki_perplexity"]))
    >>> # base = suite.scores(model, tokenizer)                 # once, on the base model
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

    >>> from loki.evaluate import general_suite
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

    def scores(
        self,
        model,
        tokenizer,
        *deltas,
        base: ImplantScores | None = None,
        scope: Scope | None = None,
        progress: bool = True,
    ) -> ImplantScores:
        """Scores of `model` (with `deltas` applied for the duration, reverted afterwards). Neighbourhood predictions
        are teacher-forced on `base`'s answers (on the model's own answers when `base` is None: the base run).

        Args:
            model: a causal LM.
            tokenizer: its tokenizer.
            *deltas: `Delta` objects to apply together; none scores the model as it is.
            base: the base model's scores; None when this is the base run.
            scope: the one delta's `Scope`: the delta is served through it (`loki.scoped`: only on inputs in the
                scope, the base weights on every other) instead of applied.
            progress: show progress bars.

        Returns:
            ImplantScores.

        Raises:
            EvaluationError: what a metric refuses; a `scope` without exactly one delta.
            LokiError: a delta that cannot be applied (`ScopeError`: a scope that does not fit the model).

        >>> # base = suite.scores(model, tokenizer)                     # once, on the base model
        """
        from ..ledger import implanted

        _check_scope(deltas, scope)
        with scoped(model, deltas[0], scope) if scope is not None else implanted(model, *deltas):
            answers = generate(
                model, tokenizer, self.neighbourhood, chat=True, max_new_tokens=self.max_new_tokens, progress=progress
            )
            forced = base.answers if base is not None else answers
            predictions = answer_predictions(model, tokenizer, self.neighbourhood, forced, progress=progress)
            efficacy = self.efficacy.score(model, tokenizer, progress=progress)
            generalisation = self.generalisation.score(model, tokenizer, progress=progress)
            general = benchmark_scores(model, tokenizer, self.general, progress=progress)
        return ImplantScores(efficacy, generalisation, general, answers, predictions)

    def report(
        self,
        model,
        tokenizer,
        *deltas,
        base: ImplantScores | None = None,
        scope: Scope | None = None,
        progress: bool = True,
    ) -> ImplantReport:
        """The four numbers of `model` with `deltas` applied against `base` (the base model's `scores`, computed
        here without the deltas when None). For a trained copy of the model (full fine-tuning), pass no deltas
        and the base model's `base`.

        Args:
            model: the base model (or a trained copy, with `base` given).
            tokenizer: its tokenizer.
            *deltas: `Delta` objects to judge, applied together.
            base: the base model's `scores`; None computes it first (needs deltas).
            scope: the one delta's `Scope`: judge the delta served through it (`loki.scoped`), as `scores`.
            progress: show progress bars.

        Returns:
            ImplantReport.

        Raises:
            EvaluationError: neither deltas nor `base`, a `scope` without exactly one delta, or what a metric refuses.
            LokiError: a delta that cannot be applied (`ScopeError`: a scope that does not fit the model).

        >>> # report = suite.report(model, tokenizer, loki.load("facts.loki"), base=base)
        >>> # report.efficacy, report.generalisation, report.specificity, report.forgetting
        >>> # scoped = suite.report(model, tokenizer, delta, base=base, scope=loki.scope(model, tok, train, retain))
        """
        _check_scope(deltas, scope)
        if base is None:
            if not deltas:
                raise EvaluationError(
                    "Without deltas the model is its own base: pass base=suite.scores(base_model, ...)."
                )
            base = self.scores(model, tokenizer, progress=progress)
        tuned = self.scores(model, tokenizer, *deltas, base=base, scope=scope, progress=progress)
        return ImplantReport(base, tuned, list(self.neighbourhood))
