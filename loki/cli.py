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
    p.add_argument("--quick", action="store_true", help="a reduced run (1 probe prompt, 2 facts, 2 steps): a smoke test")


@command("demo", "run the workflow end to end on the embedded default model", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, quick=args.quick)


# -- push / pull (Hugging Face Hub) -----------------------------------------------------------------
def _hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="branch to push to / branch, tag or commit to pull (default: main)")
    p.add_argument("--filename", help="name of the .loki file in the repo")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .loki file to upload")
    p.add_argument("repo_id", help="Hub repo, namespace/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--license", help="license for the model card metadata, e.g. apache-2.0")
    _hub_args(p)


@command("push", "upload a .loki file with a generated model card to a Hugging Face Hub repo", _push_args)
def _push(args: argparse.Namespace) -> int:
    from .api import load

    commit = load(args.file).push_to_hub(
        args.repo_id, private=args.private or None, revision=args.revision, commit_message=args.message,
        token=args.token, endpoint=args.endpoint, filename=args.filename, license=args.license,
    )
    print(f"pushed {args.file} to {args.repo_id} @ {commit.oid}\n{commit.commit_url}")
    return 0


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="Hub repo, namespace/name or namespace/name@revision")
    p.add_argument("--out", help="also copy the file here (a file path or a folder)")
    _hub_args(p)


@command("pull", "download a delta from the Hub into the Hugging Face cache, verify it, print its path", _pull_args)
def _pull(args: argparse.Namespace) -> int:
    import shutil

    from .format import read
    from .hub import download

    path = download(args.repo_id, revision=args.revision, filename=args.filename, token=args.token,
                    endpoint=args.endpoint)
    delta = read(path)
    if args.out:
        path = shutil.copy(path, args.out)
    print(path)
    print(describe(delta), file=sys.stderr)
    return 0


# -- attribute / select -----------------------------------------------------------------------------
def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", help="'probe' (bundled), or a .jsonl/.json/.csv file of multiple-choice records or "
                   "{'text': ...} records")
    p.add_argument("--out", required=True, help="folder for the attribution set (rerun the same command to resume)")
    p.add_argument("--model", default="default", help="a local Hugging Face model folder, or 'default' (SmolLM2)")
    p.add_argument("--steps", type=int, default=7, help="integration steps m (default 7)")
    p.add_argument("--target", choices=("prediction", "gold"), default="prediction")
    p.add_argument("--measure", choices=("prob", "logit"), default="prob")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt: from --dev (per subject), "
                   "else the first records")
    p.add_argument("--dev", default=None, help="few-shot records for --shots, a file or a folder (MMLU's data/dev): "
                   "each prompt takes the first --shots of its own subject (the authors' 5-shot Qwen prompts)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pass")
    p.add_argument("--max-rows", type=int, default=8192, help="single-token rows per pass (memory bound)")
    p.add_argument("--shard", default=None, help="RANK/WORLD (e.g. 0/4) to compute one block, or 'accelerate'")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (with --shard "
                   "accelerate: this process's device)")


@command("attribute", "attribute every down-projection row on a prompt set (KVA), written to a folder", _attribute_args)
def _attribute(args: argparse.Namespace) -> int:
    import torch

    from .attribution import attribute
    from .errors import AttributionError

    dtype = getattr(torch, args.dtype)
    if args.shard == "accelerate" and args.device is None:  # one GPU per process under `accelerate launch`
        from accelerate import PartialState

        args.device = PartialState().device
    if args.model == "default":
        from .models import load_default

        model, tokenizer = load_default(dtype=dtype, device=args.device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if args.device:
            model.to(args.device)
    shard = args.shard
    if shard and shard != "accelerate":
        try:
            rank, world = (int(x) for x in shard.split("/"))
        except ValueError:
            raise AttributionError(f"--shard takes RANK/WORLD (e.g. 0/4) or 'accelerate', got {shard!r}.") from None
        shard = (rank, world)
    attr = attribute(model, tokenizer, args.prompts, args.steps, target=args.target, measure=args.measure,
                     engine=args.engine, path=args.out, batch_size=args.batch_size, max_rows=args.max_rows,
                     shots=args.shots, dev=args.dev, shard=shard)
    print(f"{attr!r}\n{attr.meta['seconds_per_prompt']:.2f} s per prompt (median); written to {attr.path}")
    return 0


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("attributions", help="an attribution folder (from `loki attribute`); shards are merged first")
    p.add_argument("-q", "--quota", type=float, required=True, help="percentage of rows per layer, e.g. 10")
    p.add_argument("--strategy", default="layer_balanced",
                   choices=("layer_balanced", "layer_highest", "global_lowest", "global_highest", "random"))
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--out", required=True, help="the selection JSON file to write")


@command("select", "choose the rows to train from an attribution set (layer-balanced by default)", _select_args)
def _select(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .attribution import Attributions, merge_attributions
    from .selection import select

    folder = Path(args.attributions)
    if not (folder / "meta.json").exists() and any(folder.glob("shard-*-of-*")):
        merge_attributions(folder)
    sel = select(Attributions.load(folder), args.quota, args.strategy, seed=args.seed)
    sel.save(args.out)
    counts = sel.rows_per_layer()
    print(f"{sel.strategy}, q={sel.q}: {sel.num_rows} rows in {len(counts)} layers -> {args.out}")
    print("rows per layer: " + " ".join(f"{i}:{k}" for i, k in counts.items()))
    return 0


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
