"""One training step on the default model: loki rows vs the frozen floor, the authors' split linear, PEFT LoRA, full FT.

Competitors, each on its own copy of SmolLM2-135M-Instruct, same token batch, causal-LM loss:
  floor          every parameter frozen, the input embeddings require grad: forward + backward through the whole
                 network with no weight gradient and no optimizer (the least any down-projection method can cost)
  loki           loki.prepare at q=10 (random rows), AdamW over the rows
  loki_correction  the alternative design: frozen F.linear plus a k-column correction written into the output
  split_linear   the authors' LoKILinear re-created: two nn.Linear (trainable rows, frozen rows) + cat + gather
  lora           PEFT LoRA r=16 (alpha 32) on the same down-projections, AdamW
  full           full fine-tuning, AdamW
A step is forward + loss + backward (+ optimizer step + zero_grad). The competitors are interleaved, in a new random
order every round; the figures are medians over rounds, and the ratios are medians of the per-round ratios.
Then the down-projection alone (layer 0 of each competitor but full): forward + backward of a [16 * batch * tokens,
d_ff] input that requires grad, which isolates the layer design from the rest of the network ("layer" in the JSON).
Clock: on CPU the process's CPU time (`time.process_time`) by default: with one thread it is the step's work, and
unlike wall time it does not count the time the neighbours' processes hold the core (`--clock wall` for wall time).
On CUDA, wall time with synchronisation.

Memory: on CUDA, torch.cuda.max_memory_allocated during the first step (gradients and optimizer state included). On
CPU (no allocator statistics), bytes counted
from tensors: parameters + gradients + optimizer state, and the activations saved for backward (tensors packed by
autograd, parameters excluded, each storage once).

One thread by default: on a shared 2-core machine, 2-thread timings swing by 10x with the neighbours' load
(OpenMP threads spin and get descheduled); one thread per process keeps them within a few percent.

    .venv/bin/python benchmarks/train_step.py            # batch 2 x 128 tokens, 9 rounds
    .venv/bin/python benchmarks/train_step.py --quick    # batch 1 x 64 tokens, 5 rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import loki


class SplitLinear(nn.Module):
    """The authors' LoKILinear (Nexround/LoKI, src/loki/core/loki_linear.py), re-created: trainable and frozen rows
    as two linears, outputs concatenated, then gathered back into the original order."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor):
        super().__init__()
        d_out = linear.out_features
        frozen = torch.tensor(sorted(set(range(d_out)) - set(rows.tolist())))
        self.active = nn.Linear(linear.in_features, len(rows), bias=False)
        self.frozen = nn.Linear(linear.in_features, len(frozen), bias=False)
        self.active.weight = nn.Parameter(linear.weight.data[rows].clone())
        self.frozen.weight = nn.Parameter(linear.weight.data[frozen].clone(), requires_grad=False)
        index_map = torch.empty(d_out, dtype=torch.long)
        index_map[rows] = torch.arange(len(rows))
        index_map[frozen] = torch.arange(len(frozen)) + len(rows)
        self.register_buffer("index_map", index_map)

    def forward(self, x):
        out = torch.cat([self.active(x), self.frozen(x)], dim=-1)
        return out.gather(-1, self.index_map.view(1, 1, -1).expand(out.size(0), out.size(1), -1))


class CorrectionLinear(nn.Module):
    """Alternative loki design: the frozen layer's output, with the k selected columns recomputed from the rows."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.weight = linear.weight  # frozen
        self.register_buffer("index", rows)
        self.rows = nn.Parameter(linear.weight.data[rows].clone())

    def forward(self, x):
        return F.linear(x, self.weight).index_copy(-1, self.index, F.linear(x, self.rows))


def replace_down_projections(model, selection, make):
    projs = loki.projections.find_down_projections(model)
    for layer, rows in selection.rows.items():
        parent_name, _, child = projs.template.format(i=layer).rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child), rows))


def build(name, base, selection):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "loki":
        loki.prepare(model, selection)
    elif name == "loki_correction":
        replace_down_projections(model, selection, CorrectionLinear)
    elif name == "split_linear":
        replace_down_projections(model, selection, SplitLinear)
    elif name == "lora":
        from peft import LoraConfig, get_peft_model

        child = loki.projections.find_down_projections(base).template.rpartition(".")[2]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[child]))
    elif name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    return model, optimizer


def step(model, optimizer, ids, floor):
    if floor:  # nothing trains: make backward run anyway, from the logits down to the input embeddings
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training loop does between steps


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def cpu_memory(model, optimizer, ids, floor) -> dict[str, int]:
    params = list(model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, optimizer, ids, floor)
    state = [v for s in (optimizer.state.values() if optimizer else []) for v in s.values() if torch.is_tensor(v)]
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": tensor_bytes(state),
        "saved_activations": tensor_bytes(saved),
    }


def interleaved(names, run, rounds, clock, sync, label):
    """Times of `run(name)` per competitor, interleaved in a new random order every round."""
    times = {n: [] for n in names}
    order = random.Random(0)
    for r in range(rounds):
        shuffled = names[:]
        order.shuffle(shuffled)
        for name in shuffled:
            sync()
            t = clock()
            run(name)
            sync()
            times[name].append(clock() - t)
        print(f"  {label} round {r + 1}/{rounds}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def ratio(times, a, b):
    """Median over rounds of a's time over b's time (paired by round: robust to the load drifting)."""
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


TEMPLATE = "model.layers.{i}.mlp.down_proj"


def down_projection(model, name, layer=0):
    """A competitor's down-projection module (PEFT wraps the model in base_model.model)."""
    return model.get_submodule(("base_model.model." if name == "lora" else "") + TEMPLATE.format(i=layer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 x 64 tokens, 5 rounds")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--layer-tokens", type=int, help="tokens of the single-layer measurement (default 16x --tokens)")
    ap.add_argument("--q", type=float, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["cpu", "wall"], help="default: cpu on a CPU device, wall on CUDA")
    ap.add_argument("--competitors", default="floor,loki,loki_correction,split_linear,lora,full")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 9)
    batch = args.batch or (1 if args.quick else 2)
    tokens = args.tokens or (64 if args.quick else 128)
    layer_tokens = args.layer_tokens or 16 * batch * tokens
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.competitors.split(",")
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    base, _ = loki.load_default(device=device)
    projs = loki.projections.find_down_projections(base)
    assert projs.template == TEMPLATE, projs.template
    selection = loki.Selection.random(len(projs), projs.d_out, args.q, seed=0)
    ids = torch.randint(0, base.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    print(
        f"default model on {device} ({args.threads} threads), batch {batch} x {tokens} tokens, q={args.q} "
        f"({selection.num_rows} rows), {rounds} rounds, {clock_name} clock"
    )

    models = {n: build(n, base, selection) for n in names}
    del base
    memory = {}
    for name, (model, opt) in models.items():  # warm-up step (allocates gradients and optimizer state)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(model, opt, ids, name == "floor")
            torch.cuda.synchronize()
            memory[name] = {"peak_allocated": torch.cuda.max_memory_allocated()}
        else:
            memory[name] = cpu_memory(model, opt, ids, name == "floor")

    times = interleaved(names, lambda n: step(*models[n], ids, n == "floor"), rounds, clock, sync, "step")

    # The down-projection alone (layer 0 of each competitor's model): forward + backward of [layer_tokens, d_ff].
    layer_names = [n for n in names if n != "full"]
    x = torch.randn(layer_tokens, projs.d_in, device=device)
    g = torch.randn(layer_tokens, projs.d_out, device=device)
    layers = {n: down_projection(models[n][0], n) for n in layer_names}

    def layer_step(name):
        xi = x.detach().requires_grad_(True)
        layers[name](xi[None]).backward(g[None])

    layer_step("floor")
    layer_times = interleaved(layer_names, layer_step, rounds, clock, sync, "layer")

    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in models.items()}
    print(
        f"\n{'competitor':<16}{'median step':>12}{'vs floor':>10}{'layer':>10}{'vs floor':>10}{'trainable':>13}"
        "  memory (MB)"
    )
    for n in names:
        mem = "  ".join(f"{k} {v / 1e6:.1f}" for k, v in memory[n].items())
        vs, lvs = ratio(times, n, "floor"), ratio(layer_times, n, "floor")
        lt = f"{statistics.median(layer_times[n]) * 1e3:.1f}ms" if n in layer_times else "-"
        print(
            f"{n:<16}{statistics.median(times[n]):>11.3f}s{(f'{vs:.3f}x' if vs else '-'):>10}{lt:>10}"
            f"{(f'{lvs:.3f}x' if lvs else '-'):>10}{trainable[n]:>13,}  {mem}"
        )
    result = {
        "bench": "train_step",
        "device": str(device),
        "clock": clock_name,
        "batch": batch,
        "tokens": tokens,
        "layer_tokens": layer_tokens,
        "q": args.q,
        "rounds": rounds,
        "median_s": {n: round(statistics.median(times[n]), 4) for n in names},
        "layer_median_s": {n: round(statistics.median(layer_times[n]), 5) for n in layer_names},
        "memory_bytes": memory,
        "trainable_params": trainable,
        "loki_vs_floor": ratio(times, "loki", "floor"),
        "loki_vs_split_linear": ratio(times, "loki", "split_linear"),
        "loki_vs_lora": ratio(times, "loki", "lora"),
        "loki_vs_full": ratio(times, "loki", "full"),
        "loki_vs_loki_correction": ratio(times, "loki", "loki_correction"),
        "layer": {f"loki_vs_{n}": ratio(layer_times, "loki", n) for n in layer_names if n != "loki"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
