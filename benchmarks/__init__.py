"""The benchmark scripts, a package so that they import each other (`from benchmarks.task import ...`) and tests
import them, without path hacks. Run one from the repository root as `python -m benchmarks.NAME` (a script that
imports no other benchmark also runs as `python benchmarks/NAME.py`)."""
