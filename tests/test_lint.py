"""The code base is ruff-clean: lint rules and formatting as configured in pyproject.toml (120 columns)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: the README's test command installs it (the `test` extra)")
    return [found]


@pytest.mark.parametrize(
    "command", [["check", "--output-format", "concise"], ["format", "--check"]], ids=["check", "format"]
)
def test_ruff_is_clean(command):
    run = subprocess.run([*ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, (
        f"ruff {' '.join(command)} found problems (run `ruff format . && ruff check --fix .`):\n"
        f"{run.stdout}{run.stderr}"
    )
