"""The distribution as users install it: `python -m build` makes a wheel and an sdist; the wheel holds every data
file of the package, and installed (without the checkout) into a fresh virtual environment it imports, finds its
data files and runs the `loki` command.

`loki demo --quick` from the wheel takes many minutes on 2 CPU cores (the default model's attribution and
training), so the installed wheel runs `loki --help` and `loki inspect` on a delta and loads the bundled data
through the library's own loaders instead; tests/test_demo.py runs the demo from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_FOLDERS = ("loki/data", "loki/templates")  # every file under them ships with the package

pytestmark = pytest.mark.slow  # builds a wheel in other processes and makes a virtual environment


def package_data() -> set[str]:
    """The data files of the checkout's package, as paths inside a wheel (`loki/data/probe.jsonl`)."""
    return {
        p.relative_to(ROOT).as_posix()
        for folder in DATA_FOLDERS
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """`(wheel, sdist)` built by `python -m build --no-isolation` (the build dependencies are installed; no
    network) from a copy of what the sdist needs, so the checkout gets no build files."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "loki", source / "loki", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,), (sdist,) = (tmp / "dist").glob("*.whl"), (tmp / "dist").glob("*.tar.gz")
    return wheel, sdist


def test_the_distribution_is_named_loki_implant_and_imports_as_loki(built):
    """`loki` on PyPI is another project: the distribution is `loki-implant`, its package and command `loki`."""
    wheel, sdist = built
    assert wheel.name.startswith("loki_implant-") and sdist.name.startswith("loki_implant-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert "Name: loki-implant\n" in z.read(f"{info}/METADATA").decode()
        assert z.read(f"{info}/entry_points.txt").decode().split() == [
            "[console_scripts]",
            "loki",
            "=",
            "loki.cli:main",
        ]
    assert "loki/__init__.py" in names and not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_wheel_and_sdist_hold_every_data_file(built):
    """A data file added to loki/data or loki/templates ships in both, whatever its suffix or folder."""
    wheel, sdist = built
    expected = package_data()
    assert expected, "no data files found in the checkout"
    with zipfile.ZipFile(wheel) as z:
        assert expected - set(z.namelist()) == set()
    with tarfile.open(sdist) as t:
        inside = {"/".join(n.split("/")[1:]) for n in t.getnames()}
    assert expected - inside == set()


def test_the_installed_wheel_imports_finds_its_data_and_runs(built, tmp_path):
    """Installed with `--no-deps` into a fresh venv that sees the project's installed dependencies but not the
    checkout: `import loki` is the venv's copy, its data files are those of the checkout, and the `loki` command
    runs (`--help`, `inspect` on a delta)."""
    import loki
    import loki.testing

    wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the project's dependencies (torch, transformers...), after the venv's own site-packages; a .pth line only
    # adds the folder, so the editable checkout's own .pth finder there is not run
    deps = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "project-dependencies.pth").write_text(deps + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    delta = tmp_path / "d.loki"
    loki.save(loki.testing.random_delta(loki.testing.tiny_model("llama")), delta)
    check = f"""
import pathlib, loki, loki.prompts, loki.retain
root = pathlib.Path(loki.__file__).parent
assert root.is_relative_to(pathlib.Path({str(venv)!r})), loki.__file__
for name in {sorted(package_data())!r}:
    installed = root.parent / name
    assert installed.read_bytes() == (pathlib.Path({str(ROOT)!r}) / name).read_bytes(), name
assert len(loki.retain.general_text(2)) == 2 and loki.prompts.probe_records()
print("ok", loki.__file__)
"""
    ran = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert ran.returncode == 0 and ran.stdout.startswith("ok"), ran.stdout + ran.stderr
    command = venv / "bin" / "loki"
    helped = subprocess.run([command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert helped.returncode == 0 and "train" in helped.stdout and "demo" in helped.stdout, helped.stderr
    inspected = subprocess.run(
        [command, "inspect", str(delta)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert inspected.returncode == 0 and "rows per layer" in inspected.stdout, inspected.stdout + inspected.stderr
