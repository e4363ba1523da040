#!/usr/bin/env bash
# The GPU check (issue 15): CUDA tests, bf16 vs float32 attribution, GPU timings, KVA s/prompt on a random-weight
# Llama-3.1-8B-shaped model; writes benchmarks/results/gpu_check.json. `--dry-run`: the same steps on the CPU at toy
# sizes (checks the script; the figures mean nothing). See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
