"""Hot-swapping implants on one base model: loki's ImplantBank against PEFT LoRA adapters of the same implants.

Same process, same model (the default SmolLM2-135M-Instruct, float32, CPU or `--device`), same inputs. The PEFT adapters
are the
loki deltas exported with `loki.export_peft` (rank = rows per layer, on the same down-projections), so both sides
compute the same implanted models. Competitors alternate within each repetition; medians are quoted.

(a) switch latency, implant i -> implant j: loki `deactivate` + `activate`; PEFT's hotswap (`hotswap_adapter`:
    the adapter's weights replaced in place in one loaded slot, unmerged, without recompiling; from state dicts held
    in memory as loki's bank holds its deltas, and from the adapter's folder as `hotswap_adapter` reads it); PEFT
    unmerge + `set_adapter` + merge and unmerge + `hotswap_adapter` + merge (both leave the model at base speed);
    PEFT `load_adapter` + `set_adapter` (unmerged, slower forward); reloading the model with `from_pretrained`.
(b) greedy generation, batch 1: base model vs loki implant active vs PEFT unmerged adapter (after `set_adapter`, and
    in the hotswapped slot).
(c) greedy generation, batch 8, each row its own implant: base vs loki mixed batch vs PEFT `adapter_names=`.

    .venv/bin/python benchmarks/hotswap.py [--quick] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import loki
from loki.models import DEFAULT_MODEL_ID, default_model_path
from loki.testing import random_delta

DEVICE = torch.device("cpu")


def timed(fn) -> float:
    """Wall-clock seconds of `fn()`, queued GPU work included."""
    t = time.perf_counter()
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter() - t


BEST: dict[str, float] = {}  # the fastest repetition of every competitor measured, for the noise floor


def medians(competitors: dict, reps: int) -> dict[str, float]:
    """Median seconds of each competitor (`fn`, or `(setup, fn)` with an untimed setup), alternating them within
    every repetition, in an order rotated at each repetition (fair on a noisy machine). Also records `BEST`."""
    times: dict[str, list[float]] = {name: [] for name in competitors}
    order = list(competitors.items())
    for rep in range(reps):
        for name, fn in order[rep % len(order) :] + order[: rep % len(order)]:
            if isinstance(fn, tuple):
                fn[0]()
                fn = fn[1]
            times[name].append(timed(fn))
    BEST.update({name: min(t) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady medians on a shared CPU, where a parallel "
        "op waits for any descheduled worker; 0: torch's default)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    new_tokens, batch_tokens = (8, 4) if args.quick else (16, 12)
    n_implants = 8

    import peft
    from peft.utils.hotswap import (
        _insert_adapter_name_into_state_dict,
        hotswap_adapter,
        hotswap_adapter_from_state_dict,
    )
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, tokenizer = loki.load_default(device=DEVICE)
    peft_base, _ = loki.load_default(device=DEVICE)
    deltas = [random_delta(model, q=10, seed=i, noise=0.02, name=f"implant{i}") for i in range(n_implants)]
    tmp = Path(tempfile.mkdtemp(prefix="loki-hotswap-"))
    atexit.register(shutil.rmtree, tmp, True)
    folders = [loki.export_peft(d, tmp / d.name, model) for d in deltas]
    rank = json.loads((folders[0] / "adapter_config.json").read_text())["r"]
    print(
        f"model: {DEFAULT_MODEL_ID}, "
        f"float32 on {DEVICE}, {torch.get_num_threads()} threads; "
        f"{n_implants} implants of {deltas[0].num_params:,} params "
        f"(q=10, {deltas[0].rows_per_layer()[0]} rows x {len(deltas[0].layers)} layers); PEFT adapters: the same "
        f"implants exported at rank {rank} on the down-projections"
    )

    bank = loki.ImplantBank(model)
    for d in deltas:
        bank.register(d.name, d)
    names = [d.name for d in deltas]
    pm = peft.PeftModel.from_pretrained(peft_base, folders[0], adapter_name=names[0]).eval()
    for name, folder in zip(names[1:], folders[1:]):
        pm.load_adapter(folder, adapter_name=name)

    # -- (a) switch latency ------------------------------------------------------------------------------
    counter = {"i": 0}

    def next_name() -> str:
        counter["i"] += 1
        return names[counter["i"] % n_implants]

    bank.activate(names[0])
    pm.set_adapter(names[0])
    pm.base_model.merge_adapter()

    def loki_switch():
        bank.deactivate()
        bank.activate(next_name())

    def peft_merge_switch():
        pm.base_model.unmerge_adapter()
        pm.set_adapter(next_name())
        pm.base_model.merge_adapter()

    def peft_hotswap_merge():  # one adapter slot, new weights from disk, then merged
        pm.base_model.unmerge_adapter()
        hotswap_adapter(pm, str(folders[counter["i"] % n_implants]), adapter_name=names[0])
        counter["i"] += 1
        pm.set_adapter(names[0])
        pm.base_model.merge_adapter()

    with torch.no_grad():
        switch = medians({"loki": loki_switch}, reps * 20)
        switch.update(medians({"peft_merge": peft_merge_switch, "peft_hotswap_merge": peft_hotswap_merge}, reps * 2))
        pm.base_model.unmerge_adapter()
        hotswap_adapter(pm, str(folders[0]), adapter_name=names[0])  # its own weights back
        pm.set_adapter(names[0])
        # PEFT's hotswap as meant: one unmerged slot, the next adapter's weights copied in (what `hotswap_adapter`
        # does after reading the folder), from state dicts in memory, and from the folder.
        config = pm.peft_config[names[0]]
        states = [
            _insert_adapter_name_into_state_dict(
                peft.load_peft_weights(str(f), device=str(DEVICE)), adapter_name=names[0], parameter_prefix="lora_"
            )
            for f in folders
        ]

        def peft_hotswap():
            hotswap_adapter_from_state_dict(pm, states[counter["i"] % n_implants], names[0], config)
            counter["i"] += 1

        def peft_hotswap_folder():
            hotswap_adapter(
                pm, str(folders[counter["i"] % n_implants]), adapter_name=names[0], torch_device=str(DEVICE)
            )
            counter["i"] += 1

        switch.update(medians({"peft_hotswap": peft_hotswap, "peft_hotswap_folder": peft_hotswap_folder}, reps * 4))
        hotswap_adapter_from_state_dict(pm, states[0], names[0], config)  # its own weights back, for (c)

        def peft_load_set():
            pm.load_adapter(folders[counter["i"] % n_implants], adapter_name="loaded")
            pm.set_adapter("loaded")
            pm.set_adapter(names[0])
            pm.delete_adapter("loaded")
            counter["i"] += 1

        switch.update(
            medians(
                {"peft_load_set": peft_load_set, "peft_set_unmerged": lambda: pm.set_adapter(next_name())}, reps * 2
            )
        )
        switch["reload_model"] = medians(
            {"reload": lambda: AutoModelForCausalLM.from_pretrained(default_model_path(), device_map=DEVICE)},
            max(2, reps // 2),
        )["reload"]
    bank.deactivate()
    print("\n(a) switch latency, median ms")
    for k, v in switch.items():
        print(f"  {k:<20} {v * 1e3:10.3f} ms   ({v / switch['loki']:8.1f}x loki)")

    # -- (b) generation with one implant active ----------------------------------------------------------
    prompt = tokenizer("Tell me about the history of the city of Paris and its", return_tensors="pt").input_ids.to(
        DEVICE
    )
    gen = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    pm.set_adapter(names[1])
    assert not any(getattr(m, "merged", False) for m in pm.modules())

    def hotswapped(i: int):  # implant i's weights in the slot of adapter 0 (PEFT's hotswap), then generate
        def setup():
            hotswap_adapter_from_state_dict(pm, states[i], names[0], config)
            pm.set_adapter(names[0])

        return setup

    with torch.no_grad():
        model.generate(prompt, **gen), pm.generate(input_ids=prompt, **gen)  # warm up
        one = medians(
            {
                "base": (bank.deactivate, lambda: model.generate(prompt, **gen)),
                "loki_active": (lambda: bank.activate(names[1]), lambda: model.generate(prompt, **gen)),
                "peft_unmerged": (lambda: pm.set_adapter(names[1]), lambda: pm.generate(input_ids=prompt, **gen)),
                "peft_hotswapped": (hotswapped(1), lambda: pm.generate(input_ids=prompt, **gen)),
            },
            2 * reps + 1,
        )
        bank.deactivate()
        hotswap_adapter_from_state_dict(pm, states[0], names[0], config)  # adapter 0's own weights, for (c)
    print(f"\n(b) greedy generation, batch 1, {new_tokens} new tokens, tokens/s (median)")
    best_one = {k: BEST[k] for k in one}
    for k, v in one.items():
        print(
            f"  {k:<20} {new_tokens / v:8.2f} tok/s   ({one['base'] / v:5.3f}x base; best runs "
            f"{best_one['base'] / best_one[k]:5.3f}x)"
        )

    # -- (c) a batch of 8 rows, 8 implants -----------------------------------------------------------------
    batch = prompt.repeat(n_implants, 1)
    batch[:, -1] = torch.arange(100, 100 + n_implants, device=DEVICE)  # rows differ (same length: no padding)
    gen = {
        **gen,
        "max_new_tokens": batch_tokens,
        "min_new_tokens": batch_tokens,
        "attention_mask": torch.ones_like(batch),
    }

    with torch.no_grad():
        bank.generate(batch, names, **gen), pm.generate(input_ids=batch, adapter_names=names, **gen)  # warm up
        mixed = medians(
            {
                "base": lambda: model.generate(batch, **gen),
                "loki_mixed": lambda: bank.generate(batch, names, **gen),
                "peft_mixed": lambda: pm.generate(input_ids=batch, adapter_names=names, **gen),
            },
            reps,
        )
    print(
        f"\n(c) greedy generation, batch {n_implants} with {n_implants} different implants, {batch_tokens} new tokens"
    )
    for k, v in mixed.items():
        print(f"  {k:<20} {n_implants * batch_tokens / v:8.2f} tok/s   ({mixed['base'] / v:5.3f}x base)")

    result = {
        "bench": "hotswap",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE),
        "switch_speedup_vs_peft_merge": round(switch["peft_merge"] / switch["loki"], 2),
        "switch_speedup_vs_peft_hotswap_merge": round(switch["peft_hotswap_merge"] / switch["loki"], 2),
        # PEFT's hotswap (in place, unmerged, no recompile) over loki's switch: the goal is >= 1
        "switch_vs_peft_hotswap": round(switch["peft_hotswap"] / switch["loki"], 3),
        "switch_vs_peft_hotswap_folder": round(switch["peft_hotswap_folder"] / switch["loki"], 3),
        # generation after the switch, loki's throughput over PEFT's hotswapped slot: the goal is >= 1
        "active_vs_peft_hotswap_throughput": round(one["peft_hotswapped"] / one["loki_active"], 3),
        "active_vs_base_throughput": round(one["base"] / one["loki_active"], 3),
        "active_vs_base_throughput_best_runs": round(best_one["base"] / best_one["loki_active"], 3),
        "peft_unmerged_vs_base_throughput": round(one["base"] / one["peft_unmerged"], 3),
        "mixed_vs_base_throughput": round(mixed["base"] / mixed["loki_mixed"], 3),
        "mixed_vs_peft_mixed_throughput": round(mixed["peft_mixed"] / mixed["loki_mixed"], 3),
        "switch_ms": {k: round(v * 1e3, 3) for k, v in switch.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
