"""Execute the six notebooks in order, in one scratch folder, as a user would; print a table of their wall times
and write it as JSON.

    .venv/bin/python notebooks/run_all.py              # the default size: the real default model, full settings
    .venv/bin/python notebooks/run_all.py --quick      # the test suite's small size (LOKI_NOTEBOOK_QUICK=1)
    .venv/bin/python notebooks/run_all.py --save       # the default size, and commit-ready outputs into notebooks/

`--save` writes each notebook that ran without error back into notebooks/ with its outputs, so a reader on GitHub
or the Hub sees the results without running it. Live widgets (progress bars, sliders) are dropped from the saved
outputs: without a kernel they only show "model not found"; the notebooks draw their figures and tables as static
images and HTML beside them. The notebook's metadata records the size, the date and a digest of its code, which
the test suite checks, so a notebook edited without rerunning this fails `test_notebooks_are_committed_with_outputs`.

Notebook 5 pushes to the local Hub test server (hub/server.py) unless HF_TOKEN and LOKI_HUB_REPO are set. The
executed copies and `timings.json` (size, per notebook: seconds, ok; the slowest cells) are written next to what the
notebooks wrote (default: a new temporary folder). docs/notebooks.md quotes the timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent


def cell_seconds(cell) -> float | None:
    """A cell's run time from the timestamps nbclient records (`record_timing`), or None."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def source_digest(book) -> str:
    """sha256 of a notebook's code cells: what the saved outputs were computed from (the prose can change freely)."""
    text = json.dumps([c.source for c in book.cells if c.cell_type == "code"])
    return hashlib.sha256(text.encode()).hexdigest()


WIDGET = "application/vnd.jupyter.widget-view+json"


def publishable(book, work: Path, size: str, seconds: float):
    """The executed notebook as committed: live widget views and run-time metadata dropped, the scratch folder's
    path written as '.', the size, date and source digest recorded."""
    book = nbformat.from_dict(json.loads(json.dumps(book)))  # a deep copy
    for cell in book.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type in ("display_data", "execute_result") and WIDGET in out.get("data", {}):
                continue  # its text/plain fallback is a widget's repr, not a result
            if out.output_type == "stream":
                out.text = out.text.replace(str(work), ".")
            kept.append(out)
        cell.outputs = kept
    book.metadata.pop("widgets", None)
    book.metadata["loki"] = {
        "size": size,
        "measured": datetime.now(timezone.utc).date().isoformat(),
        "seconds": round(seconds),
        "source_sha256": source_digest(book),
    }
    return book


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the test suite's small size")
    p.add_argument("--dir", type=Path, help="where to run (default: a new temporary folder)")
    p.add_argument("--save", action="store_true", help="write the executed notebooks back into notebooks/")
    p.add_argument("--only", nargs="*", help="run only these notebooks (name prefixes, e.g. 01 02); in order")
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="loki-notebooks-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        os.environ["LOKI_NOTEBOOK_QUICK"] = "1"  # the kernels inherit the environment
    else:
        os.environ.pop("LOKI_NOTEBOOK_QUICK", None)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.only:
        paths = [path for path in paths if any(path.name.startswith(prefix) for prefix in args.only)]
    results, start = {}, time.time()
    for path in paths:
        book, t = nbformat.read(path, as_version=4), time.time()
        try:
            nbclient.NotebookClient(
                book, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
            ).execute()
            ok, error = True, ""
        except nbclient.exceptions.CellExecutionError as e:
            ok, error = False, str(e)
        seconds = time.time() - t
        cells = [(i, cell_seconds(c)) for i, c in enumerate(book.cells) if c.cell_type == "code"]
        slowest = sorted(((s, i) for i, s in cells if s is not None), reverse=True)[:3]
        results[path.name] = {
            "seconds": round(seconds, 1),
            "ok": ok,
            "slowest_cells": [{"cell": i, "seconds": round(s, 1)} for s, i in slowest],
        }
        nbformat.write(book, work / f"executed-{path.name}")
        if args.save and ok:
            nbformat.write(publishable(book, work, "quick" if args.quick else "default", seconds), path)
        print(f"{path.name}: {seconds:.0f} s {'ok' if ok else 'FAILED'}", flush=True)
        if error:
            print(error, flush=True)
    total = time.time() - start
    print(f"\n{'notebook':<30}{'seconds':>9}  slowest cells (index: s)")
    for name, r in results.items():
        cells = ", ".join(f"{c['cell']}: {c['seconds']:.0f}" for c in r["slowest_cells"])
        print(f"{name:<30}{r['seconds']:>9.0f}  {cells}{'' if r['ok'] else '  FAILED'}")
    print(f"{'all':<30}{total:>9.0f}")
    summary = {
        "size": "quick" if args.quick else "default",
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "total_seconds": round(total, 1),
        "notebooks": results,
    }
    (work / "timings.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"executed notebooks and timings.json in {work}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
