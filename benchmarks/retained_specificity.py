"""Specificity of a demo delta on the neighbourhood questions it was trained to retain, against the held-out ones
`loki demo` reports: whether the retain loss keeps even its own questions' answers token for token.

    .venv/bin/python benchmarks/retained_specificity.py loki-demo/demo.loki

Prints one line per question set: its name, number of questions and `loki.evaluate.specificity` (greedy-token
agreement with the base model, teacher-forced on the base model's answers). About a minute on a 2-core CPU.
"""

import sys

import loki
from loki import evaluate as ev
from loki import facts as task


def main() -> None:
    model, tok = loki.load_default()
    size = task.SIZES["full"]
    facts = task.implant_facts(size["facts"])
    retain, held_out = task.retain_data(facts, task.RECIPE, size["eval_per_template"])
    retained = [item for item in retain if isinstance(item, str)]  # the questions; the rest are prose snippets
    delta = loki.load(sys.argv[1])
    for name, questions in (("retained", retained), ("held-out", held_out)):
        answers = ev.generate(model, tok, questions, chat=True, max_new_tokens=24, progress=False)
        base = ev.answer_predictions(model, tok, questions, answers, progress=False)
        with loki.implanted(model, delta):
            tuned = ev.answer_predictions(model, tok, questions, answers, progress=False)
        print(f"{name}: {len(questions)} questions, specificity {ev.specificity(base, tuned):.4f}", flush=True)


if __name__ == "__main__":
    main()
