"""`benchmarks/gpu_check.sh --dry-run` runs every step of the GPU check on the CPU at toy sizes, so the
script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # starts other processes
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    assert result["cuda_tests"]["rc"] == 0 and result["swap"]["json"]["exact"] is True
    assert result["bf16_vs_float32"]["q10_lowest_rows_overlap"] > 0.5
    assert result["kva_8b"]["seconds_per_prompt"] > 0
