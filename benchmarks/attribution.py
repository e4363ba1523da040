"""KVA speed on the default model (SmolLM2-135M-Instruct) with ~300-token MMLU-style prompts, side by side in one
process: loki's `fast` engine, loki's `reference` engine, and the authors' current approach re-created with captum
(`LayerIntegratedGradients` on each layer's down-projection, n_steps=7, all-token-0 baseline, trapezoid rule).

The reference and captum cost 7 full passes (forward + backward) per layer and prompt, about an hour per prompt on
two shared CPU cores, so they run on evenly spaced layers (0, middle, last) and their per-prompt time is the mean
per-layer time x the number of layers (per-layer cost is a full forward plus a backward that grows linearly with
depth, so the evenly spaced mean is the all-layer mean). Runs are interleaved and medians are reported.

The error figure compares the fast engine (float32) with the reference engine run on a float64 copy of the model:
the float32 reference has round-off of its own (printed too, for scale), which would otherwise be counted as the
fast engine's error. Timings compare the engines in float32, as they are used.

    .venv/bin/python benchmarks/attribution.py [--quick] [--device cuda]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ.setdefault(
    "LOKI_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".loki-cache")
)

import loki  # noqa: E402
from loki.kva import kva  # noqa: E402
from loki.prompts import as_prompts, probe_records  # noqa: E402


def captum_layer(model, ids: list[int], layer_module, steps: int = 7) -> tuple[torch.Tensor, float]:
    """The authors' current per-layer KVA: captum LayerIntegratedGradients over the whole [T, d] layer output."""
    from captum.attr import LayerIntegratedGradients

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        target = int(model(x).logits[0, -1].argmax())

    def forward(input_ids):
        return torch.softmax(model(input_ids).logits[:, -1].float(), -1)[:, target]

    t0 = time.perf_counter()
    lig = LayerIntegratedGradients(forward, layer_module)
    attr = lig.attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method="riemann_trapezoid")
    synchronize(model.device)
    return attr[0, -1].detach(), time.perf_counter() - t0


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two sampled layers, one prompt each for the slow engines")
    ap.add_argument("--fast-prompts", type=int, default=4)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every engine (default 1: on a shared machine more threads mostly wait)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = loki.load_default(device=args.device)
    for p in model.parameters():  # no weight gradients for anyone (captum would not need them either)
        p.requires_grad_(False)
    projs = loki.projections.find_down_projections(model)
    num_layers = len(projs)
    # 3-shot multiple-choice prompts from the probe set: ~300 tokens each
    records = probe_records()
    prompts = [as_prompts(records[i : i + 4], tokenizer, shots=3).ids[0] for i in range(0, 4 * args.fast_prompts, 4)]
    lengths = [len(p) for p in prompts]
    layers = [0, num_layers - 1] if args.quick else [0, num_layers // 2, num_layers - 1]
    slow_prompts = 1 if args.quick else 2
    print(
        f"model {loki.models.DEFAULT_MODEL_ID}: {num_layers} layers; prompts of {lengths} tokens; "
        f"torch threads {torch.get_num_threads()}; slow engines on layers {layers}, {slow_prompts} prompt(s)"
    )

    kva(model, [prompts[0][:32]])  # warm-up
    exact = copy.deepcopy(model).double()  # the yardstick: the reference engine without float32 round-off
    fast_t, ref_t, cap_t, errs, ref32_errs, cap_errs = [], [], [], [], [], []
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        fast, _ = kva(model, [ids])
        synchronize(model.device)
        fast_t.append(time.perf_counter() - t0)
        print(f"fast       prompt {i}: {fast_t[-1]:7.2f} s", flush=True)
        if i >= slow_prompts:
            continue
        per_layer_ref, per_layer_cap = [], []
        for layer in layers:
            t0 = time.perf_counter()
            ref, _ = kva(model, [ids], engine="reference", layers=[layer])
            synchronize(model.device)
            per_layer_ref.append(time.perf_counter() - t0)
            ref64 = kva(exact, [ids], engine="reference", layers=[layer])[0][0, 0]

            def rel_err(x: torch.Tensor) -> float:  # max relative error against the float64 reference
                return float((x.double().to(ref64.device) - ref64).abs().max() / ref64.abs().max())

            errs.append(rel_err(fast[0, layer]))
            ref32_errs.append(rel_err(ref[0, 0]))
            cap, seconds = captum_layer(model, ids, projs.modules[layer])
            per_layer_cap.append(seconds)
            cap_errs.append(rel_err(cap))
            print(
                f"  layer {layer:2d}: reference {per_layer_ref[-1]:6.2f} s, captum {seconds:6.2f} s; rel err vs "
                f"float64 reference: fast {errs[-1]:.1e}, float32 reference {ref32_errs[-1]:.1e}, captum "
                f"{cap_errs[-1]:.2f} (a different quantity)",
                flush=True,
            )
        ref_t.append(statistics.mean(per_layer_ref) * num_layers)
        cap_t.append(statistics.mean(per_layer_cap) * num_layers)
        print(f"reference  prompt {i}: {ref_t[-1]:7.1f} s (extrapolated to {num_layers} layers)")
        print(f"captum     prompt {i}: {cap_t[-1]:7.1f} s (extrapolated to {num_layers} layers)", flush=True)

    fast_s, ref_s, cap_s = (statistics.median(t) for t in (fast_t, ref_t, cap_t))
    print(
        f"\nmedian seconds per ~{round(statistics.mean(lengths))}-token prompt: fast {fast_s:.2f}, "
        f"reference {ref_s:.1f}, captum {cap_s:.1f}"
    )
    print(
        f"fast is {cap_s / fast_s:.0f}x faster than captum and {ref_s / fast_s:.0f}x faster than the reference; "
        f"max relative error against the float64 reference: fast {max(errs):.1e} (the float32 reference's own: "
        f"{max(ref32_errs):.1e})"
    )
    print(
        json.dumps(
            {
                "bench": "attribution",
                "model": loki.models.DEFAULT_MODEL_ID,
                "prompt_tokens": lengths,
                "fast_s_per_prompt": round(fast_s, 3),
                "reference_s_per_prompt": round(ref_s, 2),
                "captum_s_per_prompt": round(cap_s, 2),
                "fast_vs_captum_speedup": round(cap_s / fast_s, 1),
                "fast_vs_reference_speedup": round(ref_s / fast_s, 1),
                "fast_vs_reference_max_rel_err": max(errs),
                "error_yardstick": "reference engine in float64",
                "float32_reference_max_rel_err": max(ref32_errs),
                "slow_engines_layers": layers,
                "slow_engines_prompts": slow_prompts,
                "threads": torch.get_num_threads(),
                "device": str(model.device),
            }
        )
    )


if __name__ == "__main__":
    main()
