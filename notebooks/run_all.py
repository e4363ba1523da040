"""Execute the six notebooks in order, in one scratch folder, as a user would; print each one's wall time.

    .venv/bin/python notebooks/run_all.py              # the default size: the real default model, full settings
    .venv/bin/python notebooks/run_all.py --quick      # the test suite's small size (LOKI_NOTEBOOK_QUICK=1)

Notebook 5 pushes to the local Hub test server (hub/server.py) unless HF_TOKEN and LOKI_HUB_REPO are set. The
executed copies are written next to what the notebooks wrote (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the test suite's small size")
    p.add_argument("--dir", type=Path, help="where to run (default: a new temporary folder)")
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="loki-notebooks-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        os.environ["LOKI_NOTEBOOK_QUICK"] = "1"  # the kernels inherit the environment
    else:
        os.environ.pop("LOKI_NOTEBOOK_QUICK", None)
    failed, start = 0, time.time()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        book, t = nbformat.read(path, as_version=4), time.time()
        try:
            nbclient.NotebookClient(
                book, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}
            ).execute()
            status = "ok"
        except nbclient.exceptions.CellExecutionError as e:
            failed, status = failed + 1, f"FAILED\n{e}"
        nbformat.write(book, work / f"executed-{path.name}")
        print(f"{path.name}: {time.time() - t:.0f} s {status}", flush=True)
    print(f"all: {time.time() - start:.0f} s; executed notebooks in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
