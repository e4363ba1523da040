"""One `loki demo` training step's losses: a plain padded forward versus `loki.forward.logits_at`.

The step is what `loki.train` computes each step of the demo: cross-entropy on the answer tokens of 8 fact examples
plus the retain KL on 12 retain items (chat questions with the base model's answers, and Wikipedia snippets), forward
and backward, on SmolLM2-135M-Instruct prepared at q=10 (random rows). Competitors, same model, same batches:
  padded        what loki.train did before: each batch right-padded to its longest sequence, logits at every
                position, then the answer / retained positions picked out
  grouped       `logits_at(share=False)`: chat items and plain texts padded separately, the LM head only over the
                span of requested positions
  logits_at     `logits_at`: as grouped, and the chat template's shared opening (24 tokens) runs once per batch
The competitors run in a new random order every round; figures are medians over rounds, ratios medians of per-round
ratios. Clock: the process's CPU time with one thread (as benchmarks/train_step.py, which says why). The losses of
the three must agree (printed), or the figures mean nothing.

    .venv/bin/python benchmarks/demo_step.py            # 3 batches a round, 5 rounds (about 7 minutes)
    .venv/bin/python benchmarks/demo_step.py --quick    # 1 batch, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

import loki
from loki import facts as task
from loki.dataset import answer_positions, collate, encode, pad_token_id
from loki.forward import logits_at


def padded_logits(model, sequences, positions, pad):
    """The plain way: one right-padded batch, every position's logits, then the requested ones."""
    batch = collate([{"input_ids": s, "labels": s} for s in sequences], pad)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.cat([torch.full_like(p, i) for i, p in enumerate(positions)])
    return logits[rows, torch.cat(positions)]


def step_loss(fn, model, facts, items, retained, pad):
    """Fact cross-entropy (mean over answer tokens) + 8 x retain KL, as `loki.train` and `RetainSet.kl`."""
    pos = [answer_positions(e["labels"]) for e in facts]
    answers = torch.cat([torch.tensor(e["labels"])[p + 1] for e, p in zip(facts, pos)])
    ce = F.cross_entropy(fn(model, [e["input_ids"] for e in facts], pos, pad).float(), answers)
    chosen = [retained.distributions[i] for i in items]
    logq = fn(model, [t.ids for t in chosen], [t.positions for t in chosen], pad).float().log_softmax(-1)
    top_ids, top_logp = torch.cat([t.top_ids for t in chosen]), torch.cat([t.top_logp for t in chosen])
    kl = (top_logp.exp() * (top_logp - logq.gather(-1, top_ids))).sum(-1).mean()  # the top-k part is enough here
    return ce + 8.0 * kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batches, rounds = (1, 2) if args.quick else (3, 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = loki.load_default()
    facts = task.implant_facts()
    retain, _ = task.retain_data(facts, task.RECIPE)
    retained = loki.retain.retain_set(model, tok, retain, progress=False)
    projs = loki.projections.find_down_projections(model)
    loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, q=10, seed=0))
    pad = pad_token_id(tok)
    encoded = [encode(tok, ex) for ex in task.fact_training_set(facts)]
    order, retain_order = random.Random(0), retained.batches(task.RECIPE["retain_batch_size"], seed=0)
    work = [(order.sample(encoded, task.RECIPE["batch_size"]), next(retain_order)) for _ in range(batches)]
    competitors = {
        "padded": padded_logits,
        "grouped": lambda m, s, p, pad: logits_at(m, s, p, pad, share=False),
        "logits_at": logits_at,
    }
    losses = {
        name: [step_loss(fn, model, f, i, retained, pad).item() for f, i in work[:2]]
        for name, fn in competitors.items()
    }
    print("losses of the first two batches:", json.dumps(losses))
    for name in competitors:
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses[name], losses["padded"])), name
    times: dict[str, list[float]] = {name: [] for name in competitors}
    shuffle = random.Random(1)
    for r in range(rounds):
        names = list(competitors)
        shuffle.shuffle(names)
        for name in names:
            start = time.process_time()
            for facts_batch, items in work:
                step_loss(competitors[name], model, facts_batch, items, retained, pad).backward()
                model.zero_grad(set_to_none=True)
            times[name].append((time.process_time() - start) / len(work))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in competitors), flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(times[name], times["padded"])) for name in competitors}
    print("\n| competitor | median step (1 thread, CPU s) | vs padded |\n|---|---|---|")
    for name in competitors:
        print(f"| {name} | {med[name]:.2f} | {ratio[name]:.3f}x |")
    print(
        json.dumps(
            {
                "bench": "demo_step",
                "model": loki.models.DEFAULT_MODEL_ID,
                "batches": batches,
                "rounds": rounds,
                "seconds": {k: round(v, 3) for k, v in med.items()},
                "logits_at_vs_padded": round(ratio["logits_at"], 3),
                "grouped_vs_padded": round(ratio["grouped"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
