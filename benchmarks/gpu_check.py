"""One GPU check, ready to run on a lent GPU (issue 15): the CUDA tests, bf16 attribution against float32, GPU timings
of the benchmarks that take a device, and KVA seconds per 300-token prompt on a random-weight Llama-3.1-8B-shaped
model (the authors report 9.69 s per sample on an RTX 4090; goal <= 0.2 s on one H200). Writes one JSON file.

    bash benchmarks/gpu_check.sh              # on the GPU machine, well under 10 minutes on one H200
    bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU at toy sizes: checks the script, no figures

The last line printed is the JSON object written to benchmarks/results/gpu_check.json (gpu_check-dry-run.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import loki
from loki.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent
# Llama-3.1-8B's shapes (config.json of meta-llama/Llama-3.1-8B); random weights, nothing downloaded.
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TOY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def run(cmd: list[str], timeout: int) -> dict:
    t = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    return {
        "cmd": " ".join(cmd[1:]),
        "rc": done.returncode,
        "seconds": round(time.time() - t, 1),
        "json": json.loads(lines[-1]) if lines else None,
        "tail": (done.stdout + done.stderr)[-600:],
    }


def cuda_tests(dry: bool) -> dict:
    tests = [
        "tests/test_apply.py::test_cuda_round_trip",
        "tests/test_attribution.py::test_bf16_on_gpu_close_to_float32",
        "tests/test_serve.py::test_cuda",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *tests]
    return run(cmd + (["--collect-only"] if dry else []), 300)


def bf16_vs_float32(device: str, dry: bool) -> dict:
    """KVA of the same prompts in float32 and bfloat16: how close the scores and the q=10 selections are."""
    if dry:
        model32, tok, prompts = tiny_model("llama"), None, [[5, 6, 7, 8], [9, 10, 11]]
    else:
        model32, tok = loki.load_default(device=device)
        prompts = loki.prompts.probe_records()[:6]
    model16 = (
        tiny_model("llama", dtype=torch.bfloat16) if dry else loki.load_default(dtype=torch.bfloat16, device=device)[0]
    )
    a32 = loki.attribute(model32, tok, prompts, steps=7, progress=False).values.float()
    a16 = loki.attribute(model16, tok, prompts, steps=7, progress=False).values.float()
    m32, m16 = a32.mean(0), a16.mean(0)
    corr = torch.corrcoef(torch.stack([m32.flatten(), m16.flatten()]))[0, 1].item()
    k = max(1, int(0.10 * m32.shape[-1]))
    low32, low16 = m32.topk(k, -1, largest=False).indices, m16.topk(k, -1, largest=False).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(low32, low16)) / low32.numel()
    return {
        "prompts": len(prompts),
        "max_abs_diff": (a32 - a16).abs().max().item(),
        "scale": a32.abs().max().item(),
        "mean_score_correlation": round(corr, 5),
        "q10_lowest_rows_overlap": round(overlap, 4),
    }


def kva_seconds_per_prompt(device: str, dry: bool, prompts: int = 3, tokens: int = 300) -> dict:
    cfg = transformers.LlamaConfig(**(TOY if dry else LLAMA_8B))
    dtype = torch.float32 if dry else torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, cfg.vocab_size, (tokens,), generator=g).tolist() for _ in range(prompts + 1)]
    loki.attribute(model, None, ids[:1], steps=7, progress=False)  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    loki.attribute(model, None, ids[1:], steps=7, batch_size=1, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per = (time.perf_counter() - t) / prompts
    return {
        "shape": "toy" if dry else "Llama-3.1-8B",
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "steps": 7,
        "seconds_per_prompt": round(per, 4),
        "authors_rtx4090_s": 9.69,
        "goal_s": 0.2,
        "mmlu_2850_prompts_minutes": round(per * 2850 / 60, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check that every step runs")
    ap.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/gpu_check.json)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --dry-run to check the script on the CPU.")
    device = "cpu" if dry else "cuda"
    t0 = time.time()
    out = {
        "bench": "gpu_check",
        "dry_run": dry,
        "device": torch.cuda.get_device_name() if not dry else "cpu",
        "torch": torch.__version__,
    }
    out["cuda_tests"] = cuda_tests(dry)
    out["bf16_vs_float32"] = bf16_vs_float32(device, dry)
    swap = ["--rounds", "1", "--iters", "2"] if dry else ["--rounds", "5"]
    out["swap"] = run([sys.executable, "benchmarks/swap.py", "--device", device, *swap], 300)
    out["swap_bf16"] = run(
        [sys.executable, "benchmarks/swap.py", "--device", device, "--dtype", "bfloat16", *swap], 300
    )
    if not dry:  # the real model throughout: no toy size for these
        out["train_step"] = run([sys.executable, "benchmarks/train_step.py", "--device", device], 300)
        out["attribution"] = run([sys.executable, "benchmarks/attribution.py", "--quick", "--device", device], 300)
        out["hotswap"] = run([sys.executable, "benchmarks/hotswap.py", "--quick", "--device", device], 300)
    out["kva_8b"] = kva_seconds_per_prompt(device, dry)
    out["seconds"] = round(time.time() - t0, 1)
    path = args.out or ROOT / "benchmarks" / "results" / ("gpu_check-dry-run.json" if dry else "gpu_check.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: (
                    v
                    if k not in ("cuda_tests", "swap", "swap_bf16", "train_step", "attribution", "hotswap")
                    else {kk: v[kk] for kk in ("rc", "seconds", "json")}
                )
                for k, v in out.items()
            }
        )
    )


if __name__ == "__main__":
    main()
