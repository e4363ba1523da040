"""The `loki` command line: the library's verbs, one subcommand each.

    loki inspect delta.loki
    loki demo
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .errors import LokiError

# verb -> (help, add_arguments, run). Each verb adds its arguments and returns an exit code.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


# -- inspect ----------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .loki file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


@command("inspect", "print a .loki file's metadata, per-layer row counts, size and base model", _inspect_args)
def _inspect(args: argparse.Namespace) -> int:
    import os

    from .api import load

    delta = load(args.file)
    if args.json:
        print(json.dumps({**delta.info, "rows_per_layer": delta.rows_per_layer()}, indent=2, sort_keys=True))
        return 0
    print(describe(delta, file_size=os.path.getsize(args.file)))
    return 0


def describe(delta, file_size: int | None = None) -> str:
    """A human summary of a delta, as `loki inspect` prints it."""
    info = delta.info
    base, target = info["base_model"], info["target"]
    lines = [
        f"name:         {delta.name or '(unnamed)'}",
        f"base model:   {base.get('id') or '(unnamed)'}" + (f" @ {base['revision']}" if base.get("revision") else ""),
        f"architecture: {base.get('architecture')} ({base.get('model_type')}), {target['num_layers']} layers, "
        f"down-projection {target['d_out']}x{target['d_in']} at {target['template']}",
        f"form:         {info['form']}, stored as {info['dtype']}",
        f"rows:         {delta.num_rows} in {len(delta.layers)} layers, {delta.num_params:,} parameters",
    ]
    if file_size is not None:
        lines.append(f"size:         {file_size / 1e6:.2f} MB on disk")
    if info.get("description"):
        lines.append(f"description:  {info['description']}")
    for key in ("selection", "training"):
        if info.get(key):
            lines.append(f"{key + ':':<14}{json.dumps(info[key], sort_keys=True)}")
    counts = delta.rows_per_layer()
    lines.append("rows per layer: " + " ".join(f"{i}:{k}" for i, k in counts.items()))
    return "\n".join(lines)


# -- demo -------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="loki-demo", help="folder for the files the demo writes")


@command("demo", "run the workflow end to end on the embedded default model", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out)


# -- entry point ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loki", description="Low-damage knowledge implanting for LLMs.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb][2](args)
    except LokiError as e:
        print(f"loki {args.verb}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
