"""Variants of the demo's recipe, scored with the demo's four numbers: how the "levers" tables of
docs/benchmarks/forgetting.md were measured.

One process loads the default model, scores the base once, then trains and scores each variant in turn (same facts,
retain data, neighbourhood and general sets as `loki demo`). Rows come from KVA on the first 6 probe prompts (the
demo's rows before 2026-12-01) unless a variant says otherwise. A variant is a JSON object of RECIPE keys to change
(`q`, `score`, `lr`, `steps`, `retain_weight`, ...), `"attribute_on": "neighbours"` (rows scored by KVA on the base
model's answers to the retain questions, `RetainSet.prompts`, as `loki demo` now does; with `"per_item"`,
`"ig_steps"` (default 7), `"and_probe"`), `"layers"`, `"lora_rank"` (LoKI*), `"seed"` (`loki.train`'s: batch
order, retain batches), plus exploration switches that are not library options:
- `"optimizer"`: "adamw" (the default, with `"eps"`), "sgd" (with `"momentum"`) or "row_adam" (Adam with one
  second moment per row, `RowAdam`) replaces the AdamW that `loki.train` builds;
- `"object_only": true` trains only each statement's tokens from its object on ("Solvis." of "The capital of ... is
  Solvis.");
- `"no_stop": true` leaves the end-of-turn token out of the loss (the statement is taught, not where the answer
  ends);
- `"margin": w` adds to the retain KL `w` times a hinge that keeps the base model's greedy token ahead at every
  retained position (by its base margin in log-probability, at most `"margin_cap"` nats, default 1);
- `"preserve": e` trains the rows under `loki.preservation` at energy `e`, computed on the retain data
  (`"preserve_on": "retain"`, the default), on its questions only (`"questions"`), or on `"preserve_text": n`
  general-prose snippets as well (`"retain+text"`); `"preserve_per_template": n` adds the base model's answers to n
  neighbourhood questions per template (all: -1) about the retain half of the entities (never the evaluation half);
  `"contrast": ratio` uses the contrast rule (`loki.preservation(..., examples=, ratio=)`) instead;
- `"oracle": true` adds the 32 judged neighbourhood questions themselves to the retain data (never a recipe: it
  measures how much of the neighbourhood the retain loss keeps when it knows the very questions).

Each result is printed and appended as one JSON line to `results/demo-levers.jsonl`.

    .venv/bin/python -m benchmarks.demo_levers '[{"eps": 1e-5}, {"score": "abs"}, {"q": 20, "lr": 2e-3}]'

About 35 s for the base, then 150 s a variant, on an idle 2-core CPU (cached demo attributions in loki-demo/).
"""

import json
import sys
import time
from pathlib import Path

import torch

import loki
from benchmarks.answer_fragility import relative_change
from loki import dataset, generation
from loki import facts as task
from loki.forward import logits_at

ROOT = Path(__file__).resolve().parent.parent


TRAIN_MODULE = sys.modules["loki.training"]  # the module `loki.train` comes from: it holds encode
retain_module = sys.modules["loki.retain"]


class RowAdam(torch.optim.Optimizer):
    """Adam with one second moment per row (the mean of the squared gradient over the row's last dimension) instead
    of one per coordinate. AdamW moves every coordinate of a trained row by about the rate, whether its gradient is
    signal or noise, so the update leaves the span of the keys that produced the gradients and reaches every
    prompt; here each row moves along its momentum (a sum of gradients, so inside that span), rows and layers still
    scaled to a common rate."""

    def __init__(self, params, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"], state["m"] = 0, torch.zeros_like(p)
                    state["v"] = torch.zeros(*p.shape[:-1], 1, dtype=p.dtype, device=p.device)
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).add_(p.grad.pow(2).mean(-1, keepdim=True), alpha=1 - b2)
                step = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(step, alpha=-group["lr"])


def optimizer_factory(variant: dict):
    """What `loki.train` calls as `torch.optim.AdamW(params, lr=..., weight_decay=...)`, for this variant."""
    real = torch.optim.AdamW
    if variant.get("optimizer", "adamw") == "sgd":
        return lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, momentum=variant.get("momentum", 0.9))
    if variant.get("optimizer") == "row_adam":
        return lambda params, lr, weight_decay: RowAdam(params, lr=lr, weight_decay=weight_decay)
    return lambda params, lr, weight_decay: real(params, lr=lr, weight_decay=weight_decay, eps=variant.get("eps", 1e-8))


def object_only_encode(tokenizer, example, max_length=None):
    """`loki.dataset.encode`, with the answer tokens before `example["object"]` taken out of the loss."""
    encoded = dataset.encode(tokenizer, example, max_length)
    if "object" in example:
        answer = [i for i, label in enumerate(encoded["labels"]) if label != dataset.IGNORE]
        start = example["answer"].index(example["object"])
        first = next(i for i in answer if len(tokenizer.decode(encoded["input_ids"][answer[0] : i + 1])) > start)
        encoded["labels"] = [label if i >= first else dataset.IGNORE for i, label in enumerate(encoded["labels"])]
    return encoded


def no_stop_encode(tokenizer, example, max_length=None):
    """`loki.dataset.encode`, with the end-of-turn and end-of-text tokens taken out of the loss (with `"no_stop"`):
    the statement is taught, not where the answer stops."""
    encoded = dataset.encode(tokenizer, example, max_length)
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    encoded["labels"] = [dataset.IGNORE if label in stops else label for label in encoded["labels"]]
    return encoded


def margin_kl(real_kl, weight: float, cap: float):
    """`RetainSet.kl` plus `weight` times the mean of relu(min(base margin, cap) - tuned margin), where a margin
    is the log-probability of the base model's greedy token minus the best other token's: zero at the base model,
    positive once a retained greedy token loses ground it had (a near tie is kept by a small margin rather than
    flipped). A second forward pass of the retain batch (the same logits), so its run times are not comparable."""

    def kl(self, model, indices):
        chosen = [self.distributions[i] for i in indices]
        device = model.get_input_embeddings().weight.device
        logq = logits_at(model, [t.ids for t in chosen], [t.positions for t in chosen], self.pad_token_id)
        logq = logq.float().log_softmax(-1)
        top = torch.cat([t.top_ids[:, :1] for t in chosen]).to(device)
        tuned_margin = logq.gather(-1, top)[:, 0] - logq.scatter(-1, top, float("-inf")).amax(-1)
        base_margin = torch.cat([t.top_logp[:, 0] - t.top_logp[:, 1] for t in chosen]).to(device).clamp(max=cap)
        return real_kl(self, model, indices) + weight * torch.relu(base_margin - tuned_margin).mean()

    return kl


def selection_for(model, tok, variant: dict, r: dict, attr, retained):
    """The variant's rows: `"attribute_on": "neighbours"` scores rows on the base model's answers to the retain
    questions (`RetainSet.prompts(per_item)`, `"per_item"` default 3; plus the probe prompts when
    `"and_probe": true`); `"layers": [lo, hi]` keeps only layers lo..hi-1."""
    if variant.get("attribute_on") == "neighbours":
        own = task.neighbourhood_attributions(
            model,
            tok,
            retained,
            variant.get("ig_steps", 7),
            variant.get("per_item", 3),
            ROOT / "loki-demo" / "attributions",
            progress=False,
        )
        values = torch.cat([attr.values, own.values]) if variant.get("and_probe") else own.values
        selection = loki.select(values, r["q"], score=r["score"])
    else:
        selection = loki.select(attr, r["q"], score=r["score"])
    if "layers" in variant:
        lo, hi = variant["layers"]
        selection = loki.Selection(
            {k: v for k, v in selection.rows.items() if lo <= k < hi},
            selection.num_layers,
            selection.d_out,
            q=selection.q,
        )
    return selection


def preservation_for(model, tok, variant: dict, retained, train_set):
    """The variant's `loki.preservation` (None without `"preserve"` or `"contrast"`); `"contrast": ratio` uses the
    contrast rule against the training examples."""
    if "preserve" not in variant and "contrast" not in variant:
        return None
    on = variant.get("preserve_on", "retain")
    data = retained
    if on == "questions":
        data = [{"text": t.ids} for it, t in zip(retained.items, retained.distributions) if it["kind"] == "question"]
    elif on == "retain+text":
        data = [{"text": t.ids} for t in retained.distributions] + loki.retain.general_text(
            variant.get("preserve_text", 200), variant.get("preserve_chars", 300)
        )
    if "preserve_per_template" in variant:
        n = variant["preserve_per_template"]
        more = task.neighbourhood_questions(task.implant_facts(task.SIZES["full"]["facts"]), None if n < 0 else n)[0]
        data = [{"text": t.ids} for t in retained.distributions] if data is retained else data
        data = data + [{"text": t.ids} for t in loki.retain.retain_set(model, tok, more, progress=False).distributions]
    if "contrast" in variant:
        return loki.preservation(model, tok, data, examples=train_set, ratio=variant["contrast"], progress=False)
    return loki.preservation(model, tok, data, energy=variant["preserve"], progress=False)


def main() -> None:
    variants = json.loads(sys.argv[1])
    model, tok = loki.load_default()
    size = task.SIZES["full"]
    attr = task.probe_attributions(
        model, tok, size["prompts"], size["ig_steps"], ROOT / "loki-demo" / "attributions", progress=False
    )
    facts = task.implant_facts(size["facts"])
    retain, neighbours = task.retain_data(facts, task.RECIPE, size["eval_per_template"])
    suite = task.implant_suite(facts, neighbours, size["general_items"])
    t0 = time.time()
    base = suite.scores(model, tok, progress=False)
    print(f"base scored in {time.time() - t0:.0f} s", flush=True)
    real_adamw, real_encode, real_kl = torch.optim.AdamW, TRAIN_MODULE.encode, retain_module.RetainSet.kl
    for variant in variants:
        r = {**task.RECIPE, **{k: v for k, v in variant.items() if k in task.RECIPE}}
        train_set = task.fact_training_set(facts)
        # retain data as the variant's recipe builds it (`retain_per_template`, `retain_text`); the evaluation
        # questions are the demo's (retain_data draws them from the other half of the entities either way)
        retain = task.retain_data(facts, r, size["eval_per_template"])[0]
        if variant.get("oracle"):  # the judged questions retained too: what retain could keep at best
            retain = retain + neighbours
        if variant.get("object_only"):
            train_set = [{**ex, "object": f["match"]} for f in facts for ex in task.fact_training_set([f])]
        t0 = time.time()
        retained = loki.retain.retain_set(model, tok, retain, progress=False)  # once: for the rows and for training
        torch.optim.AdamW = optimizer_factory(variant)
        TRAIN_MODULE.encode = no_stop_encode if variant.get("no_stop") else object_only_encode
        if "margin" in variant:
            retain_module.RetainSet.kl = margin_kl(real_kl, variant["margin"], variant.get("margin_cap", 1.0))
        try:
            selection = selection_for(model, tok, variant, r, attr, retained)
            loki.prepare(
                model,
                selection,
                lora_rank=variant.get("lora_rank"),
                preserve=preservation_for(model, tok, variant, retained, train_set),
            )
            loki.train(
                model,
                tok,
                train_set,
                lr=r["lr"],
                batch_size=r["batch_size"],
                max_steps=r["steps"],
                seed=variant.get("seed", 0),
                retain=retained,
                retain_weight=r["retain_weight"],
                retain_batch_size=r["retain_batch_size"],
                progress=False,
            )
            delta = loki.extract(model, name="lever")
        finally:
            loki.unprepare(model)
            torch.optim.AdamW, TRAIN_MODULE.encode, retain_module.RetainSet.kl = real_adamw, real_encode, real_kl
        seconds = time.time() - t0
        full = suite.report(model, tok, delta, base=base, progress=False)
        report = full.as_dict()
        with loki.implanted(model, delta):
            france = generation.answer(model, tok, task.QUESTION)
        row = {
            "variant": variant,
            "train_s": round(seconds),
            "france": france,
            "preserve": delta.info["training"].get("preserve", {}).get("protected"),
            "relative_change": round(relative_change(model, delta), 5) if delta.info["form"] == "rows" else None,
            **{
                k: report[k]
                for k in ("efficacy", "generalisation", "specificity", "answers_kept", "fluency", "forgetting")
            },
            "changed": full.changed()[:6],
        }
        print(json.dumps(row), flush=True)
        with open(ROOT / "benchmarks" / "results" / "demo-levers.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
