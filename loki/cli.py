"""The `loki` command line: the library's verbs, one subcommand each.

    loki --version
    loki inspect delta.loki
    loki merge HuggingFaceTB/SmolLM2-135M-Instruct zubrowka.loki --out smollm2-zubrowka
    loki export-peft zubrowka.loki --out zubrowka-lora
    loki demo

Every verb exits 0 on success; an error loki can name (a `LokiError`, a model or file that cannot be found) prints
one line `loki VERB: ErrorClass: message` on stderr and exits 2, as argparse does for a bad command line.

>>> from loki.cli import main
>>> main(["inspect", "no-such-file.loki"])   # stderr: loki inspect: DeltaFormatError: ...
2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from . import __version__
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
    from .api import load

    delta = load(args.file)
    if args.json:
        print(json.dumps({**delta.info, "rows_per_layer": delta.rows_per_layer()}, indent=2, sort_keys=True))
        return 0
    print(delta.summary(file_size=os.path.getsize(args.file)))
    return 0


# -- merge / export-peft (the PEFT verbs) -----------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")


def _load_model(name: str, dtype: str | None, revision: str | None = None, require_tokenizer: bool = True):
    """`(model, tokenizer)` of `name`: 'default' (the embedded default model), a Hub id or a local folder.

    `dtype=None` keeps the checkpoint's own dtype (the default model's is float32). Without `require_tokenizer`,
    the tokenizer is `None` when `name` has none.
    """
    import torch

    from .models import DEFAULT_MODEL_ID, load_pretrained

    kwargs = {"dtype": getattr(torch, dtype) if dtype else "auto"}
    if revision:
        kwargs["revision"] = revision
    return load_pretrained(DEFAULT_MODEL_ID if name == "default" else name, require_tokenizer=require_tokenizer, **kwargs)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base model: a local Hugging Face folder, a Hub id, or 'default' (SmolLM2)")
    p.add_argument("deltas", nargs="+", metavar="DELTA", help=".loki files or Hub repos (org/name[@rev]), applied "
                   "in order")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint (model and tokenizer)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="load, merge and save in this dtype (default: the base checkpoint's own)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub base model")
    p.add_argument("--on-overlap", choices=("error", "replace", "add"), default="error",
                   help="when two deltas change the same rows: refuse (default), the later one wins, or add changes")


@command("merge", "bake deltas into a base model and save a plain Hugging Face checkpoint", _merge_args)
def _merge(args: argparse.Namespace) -> int:
    from .api import load
    from .apply import apply, merge

    deltas = [load(d) for d in args.deltas]  # every delta is read and validated before the model loads
    model, tokenizer = _load_model(args.base, args.dtype, args.revision, require_tokenizer=False)
    for delta in deltas:
        apply(model, delta, on_overlap=args.on_overlap)
    merge(model)
    model.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    rows = sum(d.num_rows for d in deltas)
    print(f"merged {len(deltas)} delta{'s' * (len(deltas) != 1)} ({rows} rows) into {args.base} -> {args.out}")
    if tokenizer is None:
        print(f"note: {args.base} has no tokenizer; {args.out} holds the model only", file=sys.stderr)
    return 0


def _export_peft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", help="a .loki file or Hub repo (org/name[@rev])")
    p.add_argument("--out", required=True, help="folder for the adapter (adapter_config.json, "
                   "adapter_model.safetensors, README.md)")
    p.add_argument("--base", default=None, help="the base model, for a rows-form delta: a local folder, a Hub id or "
                   "'default' (default: the base model the delta names)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a --base Hub model")
    p.add_argument("--rank", type=int, default=None, help="pad the adapter to this LoRA rank (default: the "
                   "smallest that holds the delta)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the adapter's tensors")


@command("export-peft", "write a delta as an exact PEFT LoRA adapter folder", _export_peft_args)
def _export_peft(args: argparse.Namespace) -> int:
    import torch

    from .api import load
    from .models import load_base
    from .peft_export import export_peft

    delta = load(args.delta)
    model = None
    if delta.form == "rows":  # the adapter is new rows minus base rows: it needs the base model
        if args.base:
            model, _ = _load_model(args.base, delta.info["base_model"].get("dtype") or "float32", args.revision,
                                   require_tokenizer=False)
        else:
            model, _ = load_base(delta)
    folder = export_peft(delta, args.out, model, rank=args.rank, dtype=getattr(torch, args.dtype))
    print(f"exported {args.delta} ({delta.num_rows} rows in {len(delta.layers)} layers) as a PEFT LoRA adapter "
          f"-> {folder}")
    return 0


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
    from .api import load, push

    commit = push(
        load(args.file), args.repo_id, private=args.private or None, revision=args.revision, commit_message=args.message,
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
    print(delta.summary(), file=sys.stderr)
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
    p.add_argument("--shard", default=None, help="RANK/WORLD (e.g. 0/4) to compute one block, or 'auto' under torchrun / accelerate launch")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (with --shard "
                   "accelerate: this process's device)")


@command("attribute", "attribute every down-projection row on a prompt set (KVA), written to a folder", _attribute_args)
def _attribute(args: argparse.Namespace) -> int:
    import torch

    from .attribution import LAUNCHED, attribute
    from .errors import AttributionError

    dtype = getattr(torch, args.dtype)
    if args.shard in LAUNCHED and args.device is None and torch.cuda.is_available():  # one GPU per process
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
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
    if shard and shard not in LAUNCHED:
        try:
            rank, world = (int(x) for x in shard.split("/"))
        except ValueError:
            raise AttributionError(f"--shard takes RANK/WORLD (e.g. 0/4) or 'auto', got {shard!r}.") from None
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

    from .attribution import Attributions
    from .selection import select

    folder = Path(args.attributions)
    if not (folder / "meta.json").exists() and any(folder.glob("shard-*-of-*")):
        Attributions.from_shards(folder)
    sel = select(Attributions.load(folder), args.quota, args.strategy, seed=args.seed)
    sel.save(args.out)
    counts = sel.rows_per_layer()
    print(f"{sel.strategy}, q={sel.q}: {sel.num_rows} rows in {len(counts)} layers -> {args.out}")
    print("rows per layer: " + " ".join(f"{i}:{k}" for i, k in counts.items()))
    return 0


# -- entry point ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `loki` command's `argparse` parser: `--version` and one subcommand per verb registered in `COMMANDS`.

    Returns:
        argparse.ArgumentParser: `parse_args` gives a namespace whose `verb` names the subcommand.

    >>> args = build_parser().parse_args(["merge", "default", "a.loki", "--out", "merged"])
    >>> args.verb, args.deltas, args.on_overlap, args.dtype
    ('merge', ['a.loki'], 'error', None)
    """
    parser = argparse.ArgumentParser(prog="loki", description="Low-damage knowledge implanting for LLMs.")
    parser.add_argument("--version", action="version", version=f"loki {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `loki` command line on `argv` (default: `sys.argv[1:]`) and return its exit code.

    Args:
        argv: the arguments after `loki`, e.g. `["inspect", "delta.loki"]`.

    Returns:
        0 on success; 2 after printing one line on stderr for a `LokiError`, or for a model, folder or file that
        cannot be found or read (`OSError`, which includes `FileNotFoundError`).

    Raises:
        SystemExit: from argparse: code 2 on a bad command line, 0 after `--help` or `--version`.

    >>> main(["inspect", "no-such-file.loki"])   # stderr: loki inspect: DeltaFormatError: ...
    2
    """
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb][2](args)
    except (LokiError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library's message looks like
        print(f"loki {args.verb}: {type(e).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
