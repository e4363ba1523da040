"""The `loki` command line: the library's verbs, one subcommand each.

    loki --version
    loki inspect delta.loki
    loki merge HuggingFaceTB/SmolLM2-135M-Instruct zubrowka.loki --out smollm2-zubrowka
    loki export-peft zubrowka.loki --out zubrowka-lora
    loki train facts.jsonl --selection q10.json --out facts.loki --steps 30 --lr 3e-3
    loki judge facts.loki --trained facts.jsonl --held-out held.jsonl --neighbourhood nbhd.jsonl --record
    loki demo

Every verb exits 0 on success; an error loki can name (a `LokiError`, a model or file that cannot be found) prints
one line `loki VERB: ErrorClass: message` on stderr and exits 2, as argparse does for a bad command line.
`loki train` interrupted (Ctrl-C) says how to resume and exits 130.

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


def writable(path: str | os.PathLike, *, folder: bool, option: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any model loads or step runs (a verb writes its
    outputs last, so a bad path would otherwise fail only after all the work).

    Args:
        path: the file or folder the verb will write.
        folder: the verb writes a folder (created with its parents, if missing); else a file, whose folder must
            exist (an existing file is replaced).
        option: the option's name, for the message.

    Raises:
        FileNotFoundError: a file's folder does not exist.
        IsADirectoryError, NotADirectoryError: a folder where a file goes, or the other way round (also a file
            among a new folder's parents).
        PermissionError: the path, or the folder it goes in, cannot be written.

    >>> writable(".", folder=True)
    """
    import tempfile
    from pathlib import Path

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file; the output is a folder. Give a folder path.")
    if not folder and path.is_dir():
        raise IsADirectoryError(
            f"{option} {path} is a folder; the output is a file. Give a file path, e.g. {path / 'out'}."
        )
    if not folder and not path.parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: the folder {path.parent} does not exist; create it first.")
    existing = path if folder else path.parent  # the nearest folder that exists, where the output goes
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path}: {existing} is a file, not a folder.")
    try:  # a real write: permission bits do not stop root, a read-only file system does
        with tempfile.TemporaryFile(dir=existing):
            pass
        if path.is_file():
            with open(path, "r+b"):
                pass
    except OSError as e:
        raise PermissionError(f"{option} {path} cannot be written ({e.strerror or e}). Choose another path.") from None


# -- inspect ----------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .loki file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


@command("inspect", "print a .loki file's metadata, per-layer row counts, size and base model", _inspect_args)
def _inspect(args: argparse.Namespace) -> int:
    from .sources import load

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
    return load_pretrained(
        DEFAULT_MODEL_ID if name == "default" else name, require_tokenizer=require_tokenizer, **kwargs
    )


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base model: a local Hugging Face folder, a Hub id, or 'default' (SmolLM2)")
    p.add_argument(
        "deltas", nargs="+", metavar="DELTA", help=".loki files or Hub repos (org/name[@rev]), applied in order"
    )
    p.add_argument("--out", required=True, help="folder for the merged checkpoint (model and tokenizer)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="load, merge and save in this dtype (default: the base checkpoint's own)",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub base model")
    p.add_argument(
        "--on-overlap",
        choices=("error", "replace", "add"),
        default="error",
        help="when two deltas change the same rows: refuse (default), the later one wins, or add changes",
    )


@command("merge", "bake deltas into a base model and save a plain Hugging Face checkpoint", _merge_args)
def _merge(args: argparse.Namespace) -> int:
    from .ledger import apply, merge
    from .sources import load

    writable(args.out, folder=True)
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
    p.add_argument(
        "--out",
        required=True,
        help="folder for the adapter (adapter_config.json, adapter_model.safetensors, README.md)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="the base model, for a rows-form delta: a local folder, a Hub id or "
        "'default' (default: the base model the delta names)",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a --base Hub model")
    p.add_argument(
        "--rank",
        type=_positive(int),
        default=None,
        help="pad the adapter to this LoRA rank (default: the smallest that holds the delta; vLLM takes up to 512)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the adapter's tensors")


@command("export-peft", "write a delta as an exact PEFT LoRA adapter folder", _export_peft_args)
def _export_peft(args: argparse.Namespace) -> int:
    import torch

    from .models import load_base
    from .peft_export import export_peft
    from .sources import load

    writable(args.out, folder=True)
    delta = load(args.delta)
    model = None
    if delta.form == "rows":  # the adapter is new rows minus base rows: it needs the base model
        if args.base:
            model, _ = _load_model(
                args.base, delta.info["base_model"].get("dtype") or "float32", args.revision, require_tokenizer=False
            )
        else:
            model, _ = load_base(delta)
    folder = export_peft(delta, args.out, model, rank=args.rank, dtype=getattr(torch, args.dtype))
    print(
        f"exported {args.delta} ({delta.num_rows} rows in {len(delta.layers)} layers) as a PEFT LoRA adapter "
        f"-> {folder}"
    )
    return 0


# -- demo -------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="loki-demo", help="folder for the files the demo writes")
    p.add_argument(
        "--quick", action="store_true", help="a reduced run (2 facts, 2 IG steps, 12 training steps): a smoke test"
    )


@command("demo", "run the workflow end to end on the embedded default model", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    writable(args.out, folder=True)
    return run_demo(args.out, quick=args.quick)


# -- push / pull (Hugging Face Hub) -----------------------------------------------------------------
def _hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="branch to push to / branch, tag or commit to pull (default: main)")
    p.add_argument("--filename", help="name of the .loki file in the repo")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file",
        help="what to upload: a .loki file, an attribution folder (`loki attribute --out`) or a "
        "selection .json file (`loki select --out`)",
    )
    p.add_argument("repo_id", help="Hub repo, namespace/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--license", help="license for the model card metadata, e.g. apache-2.0")
    p.add_argument("--scope", help="the delta's scope file (`loki scope --out`), pushed beside it")
    _hub_args(p)


@command(
    "push",
    "upload a .loki file, an attribution folder or a selection file with a generated model card to "
    "a Hugging Face Hub repo",
    _push_args,
)
def _push(args: argparse.Namespace) -> int:
    from .sources import load, load_attributions, load_scope, load_selection, push

    scope = load_scope(args.scope) if args.scope else None  # read (and checked) before anything is uploaded
    if os.path.isdir(args.file) and not args.filename:
        obj = load_attributions(args.file)
    elif args.file.endswith(".json"):
        obj = load_selection(args.file)
    else:
        obj = load(args.file)
    commit = push(
        obj,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.message,
        token=args.token,
        endpoint=args.endpoint,
        filename=args.filename,
        license=args.license,
        **({"scope": scope} if scope is not None else {}),
    )
    pushed = f"{args.file} and {args.scope}" if scope is not None else args.file
    print(f"pushed {pushed} to {args.repo_id} @ {commit.oid}\n{commit.commit_url}")
    return 0


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="Hub repo, namespace/name or namespace/name@revision")
    p.add_argument("--out", help="also copy the file here (a file path or a folder; a folder with --scope)")
    p.add_argument("--scope", action="store_true", help="also the delta's scope (pushed with --scope); its path too")
    _hub_args(p)


@command("pull", "download a delta from the Hub into the Hugging Face cache, verify it, print its path", _pull_args)
def _pull(args: argparse.Namespace) -> int:
    import shutil

    from .format import read
    from .hub import download
    from .scoping import Scope

    if args.out:
        writable(args.out, folder=args.scope or os.path.isdir(args.out))
    where = dict(revision=args.revision, filename=args.filename, token=args.token, endpoint=args.endpoint)
    paths = [download(args.repo_id, **where)]
    delta = read(paths[0])
    if args.scope:
        paths.append(download(args.repo_id, kind="scope", **where))
        scope = Scope.load(paths[1])
    if args.out:
        if args.scope:
            os.makedirs(args.out, exist_ok=True)
        paths = [shutil.copy(path, args.out) for path in paths]
    print("\n".join(str(path) for path in paths))
    print(delta.summary() + (f"\nscope: {scope!r}" if args.scope else ""), file=sys.stderr)
    return 0


# -- attribute / select -----------------------------------------------------------------------------
def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompts",
        help="'probe' (bundled), or a .jsonl/.json/.csv file of multiple-choice records or {'text': ...} records",
    )
    p.add_argument("--out", required=True, help="folder for the attribution set (rerun the same command to resume)")
    p.add_argument("--model", default="default", help="a local Hugging Face model folder, or 'default' (SmolLM2)")
    p.add_argument("--steps", type=int, default=7, help="integration steps m (default 7)")
    p.add_argument("--target", choices=("prediction", "gold"), default="prediction")
    p.add_argument("--measure", choices=("prob", "logit"), default="prob")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument(
        "--shots",
        type=int,
        default=0,
        help="few-shot examples per prompt: from --dev (per subject), else the first records",
    )
    p.add_argument(
        "--dev",
        default=None,
        help="few-shot records for --shots, a file or a folder (MMLU's data/dev): "
        "each prompt takes the first --shots of its own subject (the authors' 5-shot Qwen prompts)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pass")
    p.add_argument("--max-rows", type=int, default=8192, help="single-token rows per pass (memory bound)")
    p.add_argument(
        "--shard",
        default=None,
        help="RANK/WORLD (e.g. 0/4) to compute one block, or 'auto' under torchrun / accelerate launch",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument(
        "--device",
        default=None,
        help="e.g. cuda; default: where the model loads (with --shard accelerate: this process's device)",
    )


@command("attribute", "attribute every down-projection row on a prompt set (KVA), written to a folder", _attribute_args)
def _attribute(args: argparse.Namespace) -> int:
    import torch

    from .attribution import LAUNCHED, attribute
    from .errors import AttributionError

    writable(args.out, folder=True)
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
    attr = attribute(
        model,
        tokenizer,
        args.prompts,
        args.steps,
        target=args.target,
        measure=args.measure,
        engine=args.engine,
        path=args.out,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        shots=args.shots,
        dev=args.dev,
        shard=shard,
    )
    print(f"{attr!r}\n{attr.meta['seconds_per_prompt']:.2f} s per prompt (median); written to {attr.path}")
    return 0


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "attributions",
        help="an attribution folder (from `loki attribute`; shards are merged first), or a "
        "Hub repo of attributions, namespace/name[@revision] (pulled once into the Hugging Face cache)",
    )
    p.add_argument("-q", "--quota", type=float, required=True, help="percentage of rows per layer, e.g. 10")
    p.add_argument(
        "--strategy",
        default="layer_balanced",
        choices=("layer_balanced", "layer_highest", "global_lowest", "global_highest", "random"),
    )
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--out", required=True, help="the selection JSON file to write")
    p.add_argument("--revision", help="branch, tag or commit of a Hub repo (default: main)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")


def _attributions(source: str, **hub):
    """The attribution set at `source`: a folder (its shards joined first, if it holds only shards) or a Hub id."""
    from pathlib import Path

    from .attribution import Attributions
    from .sources import load_attributions

    folder = Path(source)
    if folder.is_dir() and not (folder / "meta.json").exists() and any(folder.glob("shard-*-of-*")):
        Attributions.from_shards(folder)
    return load_attributions(source, **hub)


@command("select", "choose the rows to train from an attribution set (layer-balanced by default)", _select_args)
def _select(args: argparse.Namespace) -> int:
    from .selection import select

    writable(args.out, folder=False)
    attributions = _attributions(args.attributions, revision=args.revision, token=args.token, endpoint=args.endpoint)
    sel = select(attributions, args.quota, args.strategy, seed=args.seed)
    sel.save(args.out)
    counts = sel.rows_per_layer()
    print(f"{sel.strategy}, q={sel.q}: {sel.num_rows} rows in {len(counts)} layers -> {args.out}")
    print("rows per layer: " + " ".join(f"{i}:{k}" for i, k in counts.items()))
    return 0


# -- train ------------------------------------------------------------------------------------------
def _positive(kind, low: float = 0.0, high: float = float("inf"), closed: bool = False):
    """An argparse type: `kind(text)` in (low, high), or in [low, high) with `closed`."""

    def parse(text: str):
        value = kind(text)
        if not ((value >= low if closed else value > low) and value < high):
            bound = f"{'>=' if closed else '>'} {low:g}" + (f" and < {high:g}" if high < float("inf") else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _base_args(p: argparse.ArgumentParser) -> None:
    """`--base` and `--revision`: the base model the verb loads (`_load_model`)."""
    p.add_argument("--base", default="default", help="the base model: 'default' (SmolLM2), a Hub id or a local folder")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub base model")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        help="training examples: a .jsonl, .json (a list) or .csv file (header: prompt or question, "
        "answer) of {'prompt' or 'question', 'answer'} or {'messages': [...]} records",
    )
    _base_args(p)
    rows = p.add_mutually_exclusive_group(required=True)
    rows.add_argument("--selection", help="the rows to train: a selection JSON file (from `loki select`)")
    rows.add_argument(
        "--attributions",
        help="or an attribution folder (from `loki attribute`) or Hub repo (org/name[@revision]), with -q",
    )
    p.add_argument(
        "-q",
        "--quota",
        type=_positive(float),
        help="with --attributions: percentage of rows per layer (layer-balanced)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the .loki file to write; checkpoints go to OUT.partial/ until then (rerun the same command to resume)",
    )
    p.add_argument(
        "--retain",
        default=None,
        help="retain data: a .jsonl/.json/.csv file of {'question'} (answered "
        "by the base model), {'text'} or answered records",
    )
    p.add_argument("--retain-weight", type=float, default=1.0, help="weight of the retain KL (default 1)")
    p.add_argument(
        "--retain-batch-size", type=_positive(int), default=None, help="retain items per step (default: --batch-size)"
    )
    p.add_argument(
        "--retain-top-k",
        type=_positive(int),
        default=None,
        help="base-model tokens kept per retained position (default: loki.retain's, 64)",
    )
    p.add_argument(
        "--preserve",
        type=float,
        default=None,
        metavar="ENERGY",
        help="keep the rows' update off the key directions holding this share (e.g. 0.99) of the --retain "
        "data's down-projection inputs (loki.preservation)",
    )
    p.add_argument(
        "--contrast",
        type=float,
        default=None,
        metavar="RATIO",
        help="instead of --preserve's energy share, free only the key directions where the training examples' "
        "down-projection inputs outweigh the --retain data's RATIO to 1 (loki.preservation(examples=))",
    )
    p.add_argument(
        "--lora-rank",
        type=_positive(int),
        default=None,
        help="LoKI*: train rank-r factors of the selected rows instead of the rows",
    )
    p.add_argument("--lr", type=_positive(float), default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--epochs", type=_positive(float), default=1.0, help="passes over the data (default 1)")
    p.add_argument("--steps", type=_positive(int), default=None, help="optimizer steps, instead of --epochs")
    p.add_argument(
        "--batch-size",
        type=_positive(int),
        default=4,
        help="examples per step (default 4), over all processes when launched on several (a multiple of their number)",
    )
    p.add_argument("--grad-accum", type=_positive(int), default=1, help="batches per optimizer step (default 1)")
    p.add_argument(
        "--warmup",
        type=_positive(float, 0, 1, closed=True),
        default=0.1,
        help="share of the steps of linear warm-up (default 0.1)",
    )
    p.add_argument(
        "--weight-decay", type=_positive(float, closed=True), default=0.0, help="AdamW weight decay (default 0)"
    )
    p.add_argument("--max-grad-norm", type=_positive(float), default=1.0, help="gradient clipping norm (default 1)")
    p.add_argument("--max-length", type=_positive(int), default=1024, help="tokens kept per example (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order (default 0)")
    p.add_argument("--name", default=None, help="the delta's name (default: OUT's file name without .loki)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="load and train the base model in this dtype (default: the checkpoint's own)",
    )
    p.add_argument(
        "--save-every", type=_positive(int), default=50, help="steps between checkpoints in OUT.partial/ (default 50)"
    )


def _file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@command(
    "train", "train the selected rows of a base model on examples and write the .loki delta (resumable)", _train_args
)
def _train(args: argparse.Namespace) -> int:
    """`loki.train` on the selected rows of the base model. Resuming: checkpoints (the rows, optimizer, schedule,
    RNG and data position) go to `OUT.partial/checkpoint-N/` every `--save-every` steps, with `OUT.partial/run.json`
    recording what defines the run (the data's and the selection's checksums, the base model, every training
    setting). Rerunning the same command continues from the newest complete checkpoint and ends with the same
    delta, bit for bit, as an uninterrupted run (retain data included); other arguments are refused while a
    checkpoint exists (delete OUT.partial to start over). A run interrupted before its first checkpoint left nothing
    to continue: any command starts over. `OUT` and `OUT.partial` are checked before anything loads (writable, not
    a folder where a file goes); `OUT` is written when training ends, then `OUT.partial` is removed."""
    import math
    import shutil
    from pathlib import Path

    import torch

    from .dataset import encode, load_examples, load_retain
    from .distributed import launched_rank_world
    from .errors import CheckpointError, DatasetError, SelectionError
    from .format import atomic_write
    from .selection import Selection, select
    from .sources import save
    from .training import last_checkpoint

    # everything that needs no model is checked before the model loads
    if args.attributions and args.quota is None:
        raise SelectionError("--attributions needs -q/--quota, the percentage of rows per layer to train (e.g. -q 10).")
    if args.selection and args.quota is not None:
        raise SelectionError("-q goes with --attributions; a --selection file holds its rows already.")
    if not (args.retain_weight >= 0):
        raise DatasetError(f"--retain-weight must be >= 0, got {args.retain_weight}.")
    if (args.preserve is not None or args.contrast is not None) and not args.retain:
        raise DatasetError("--preserve and --contrast keep the update off the --retain data's keys: give --retain too.")
    if args.preserve is not None and args.contrast is not None:
        raise DatasetError("--preserve (an energy share) and --contrast (a ratio) are two rules: give one.")
    if args.contrast is not None and not args.contrast > 1:
        raise DatasetError(f"--contrast is a ratio of key energies, above 1; got {args.contrast}.")
    if args.preserve is not None and not 0 < args.preserve <= 1:
        raise DatasetError(
            f"--preserve is the share of the retain keys' energy to protect, in (0, 1]; got {args.preserve}."
        )
    rank, world = launched_rank_world()
    if args.batch_size % world:
        raise DatasetError(
            f"--batch-size {args.batch_size} is the examples of one step over all {world} processes: "
            f"give a multiple of {world}."
        )
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    writable(out, folder=False)  # both outputs, before the data, the model or any step
    writable(partial, folder=True, option="--out's checkpoint folder")
    examples = load_examples(args.data)
    retain = load_retain(args.retain) if args.retain else None
    if args.selection:
        selection = Selection.load(args.selection)
    else:
        selection = select(_attributions(args.attributions), args.quota)
    settings = (
        "retain_weight",
        "retain_batch_size",
        "retain_top_k",
        "preserve",
        "contrast",
        "lora_rank",
        "lr",
        "epochs",
        "steps",
        "batch_size",
        "grad_accum",
        "warmup",
        "weight_decay",
        "max_grad_norm",
        "max_length",
        "seed",
    )
    run = {
        "data": _file_sha256(args.data),
        "retain": _file_sha256(args.retain) if args.retain else None,
        "selection": selection.to_json()["rows"],
        "base": args.base,
        "revision": args.revision,
        "dtype": args.dtype,
        **{k: getattr(args, k) for k in settings},
    }
    # an interrupted run with a checkpoint is continued, and only by its own arguments; without a checkpoint it
    # left nothing to continue, and this run starts over in its place (what its interruption message said)
    resume = last_checkpoint(partial)
    if resume and (partial / "run.json").is_file():
        before = json.loads((partial / "run.json").read_text())
        changed = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
        if changed:
            raise CheckpointError(
                f"{partial} holds an interrupted run with other {', '.join(changed)}. Rerun it with its own arguments "
                f"to finish it, or delete {partial} to start this one."
            )

    from .implant import extract
    from .preserve import preservation
    from .projections import find_down_projections
    from .retain import retain_set
    from .rows import prepare
    from .training import train

    model, tokenizer = _load_model(args.base, args.dtype, args.revision)
    find_down_projections(model)  # weights loki cannot train (float8, partitioned) are refused before any pass
    if torch.cuda.is_available():  # one GPU per process; the retain set and the preservation are computed there
        model.to(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    retained = keep = None
    if retain is not None:  # the base model's answers and distributions, before any training
        top_k = {"top_k": args.retain_top_k} if args.retain_top_k else {}
        retained = retain_set(model, tokenizer, retain, max_length=args.max_length, **top_k)
        if args.preserve is not None:
            keep = preservation(model, tokenizer, retained, energy=args.preserve, max_length=args.max_length)
        elif args.contrast is not None:
            keep = preservation(
                model, tokenizer, retained, examples=examples, ratio=args.contrast, max_length=args.max_length
            )
    prepare(model, selection, lora_rank=args.lora_rank, preserve=keep)
    for i, ex in enumerate(examples, 1):  # name the record of an example that cannot be trained on
        try:
            encode(tokenizer, ex, args.max_length)
        except DatasetError as e:
            raise DatasetError(f"{args.data}, record {i}: {e}") from None
    # a fractional --epochs runs that share of the last pass
    steps = args.steps or math.ceil(args.epochs * math.ceil(len(examples) / (args.batch_size * args.grad_accum)))
    if rank == 0:
        if not resume and partial.is_dir():  # torn checkpoints of a run that never finished one
            shutil.rmtree(partial)
        partial.mkdir(exist_ok=True)
        atomic_write(partial / "run.json", json.dumps(run, sort_keys=True).encode())
        if resume:
            print(f"resuming from {resume}", file=sys.stderr)
    try:
        train(
            model,
            tokenizer,
            examples,
            retain=retained,
            retain_weight=args.retain_weight,
            retain_batch_size=args.retain_batch_size,
            lr=args.lr,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            max_length=args.max_length,
            max_steps=steps,
            seed=args.seed,
            checkpoint_dir=partial,
            save_every=args.save_every,
            resume_from=resume,
        )
    except KeyboardInterrupt:
        last = last_checkpoint(partial)
        print(
            "loki train: interrupted; "
            + (
                f"rerun the same command to continue from {last} (other arguments are refused until it finishes, "
                f"or delete {partial})."
                if last
                else f"no checkpoint yet (every {args.save_every} steps): a rerun, with these or other arguments, "
                "starts over."
            ),
            file=sys.stderr,
        )
        return 130
    delta = extract(
        model,
        name=args.name or out.stem,
        training={
            "command": "loki train",
            "data": {"file": os.path.basename(args.data), "sha256": run["data"]},
            "epochs": args.epochs if args.steps is None else None,
        },
    )
    if rank == 0:
        save(delta, out)
        shutil.rmtree(partial)
        print(delta.summary(file_size=out.stat().st_size))
        print(f"wrote {out}")
    return 0


# -- scope ------------------------------------------------------------------------------------------
def _scope_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="the implant's training examples: the file given to `loki train`")
    p.add_argument(
        "--retain",
        required=True,
        help="what must stay out: the retain file given to `loki train` (questions are answered by the model first)",
    )
    p.add_argument("--out", required=True, help="the scope file to write (safetensors; loki.Scope.load reads it)")
    _base_args(p)
    p.add_argument("--layer", type=int, default=None, help="the layer whose keys are compared (default: the middle)")
    p.add_argument(
        "--margin",
        type=_positive(float, 0.0, 1.0),
        default=None,
        help="cosine margin over each key's closest retain input (default: loki.scoping's, 0.15)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the base model in this dtype")


@command("scope", "write the scope of an implant: the inputs `loki.scoped` applies it to", _scope_args)
def _scope(args: argparse.Namespace) -> int:
    from .dataset import load_examples, load_retain
    from .scoping import DEFAULT_MARGIN, scope

    writable(args.out, folder=False)
    examples, retain = load_examples(args.data), load_retain(args.retain)  # bad files fail before the model loads
    model, tokenizer = _load_model(args.base, args.dtype, args.revision)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    made = scope(model, tokenizer, examples, retain, layer=args.layer, margin=margin)
    made.save(args.out)
    print(f"{made}: {made.info['example_tokens']} example positions, {made.info['outside_tokens']} retain positions")
    print(f"wrote {args.out}")
    return 0


# -- judge ------------------------------------------------------------------------------------------
def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", help="the delta to judge: a .loki file or a Hub repo (org/name[@revision])")
    p.add_argument(
        "--trained",
        required=True,
        help="efficacy: the trained phrasings, a .jsonl of {'question', 'answers': [...]} (or 'answer') records; an "
        "answer counts when the model's chat answer contains one of them as whole words",
    )
    p.add_argument("--held-out", required=True, help="generalisation: held-out phrasings, the same format")
    p.add_argument(
        "--neighbourhood",
        required=True,
        help="specificity: a .jsonl of questions whose answers must not change ({'question'} records or strings; "
        "'text' records are skipped, so a retain file serves, though questions not retained are the honest test)",
    )
    p.add_argument(
        "--general",
        nargs="+",
        default=None,
        metavar="SET",
        help="general sets for the forgetting score (default: wiki_perplexity bb_general_knowledge; any of "
        "loki.evaluate.GENERAL_SETS)",
    )
    p.add_argument("--general-items", type=_positive(int), default=50, help="items kept of each general set")
    p.add_argument(
        "--template",
        action="append",
        default=[],
        help="a question template of the implant, with {} for its subject (repeatable): general items asking it "
        "are neighbourhood items and are left out of the forgetting score",
    )
    p.add_argument("--scope", help="its .scope file (or the Hub repo's): also judge the delta served through it")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the figures into the .loki file (info.extra.evaluation), which `loki push` puts on its model card",
    )
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the reports as JSON to this file")
    _base_args(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the base model in this dtype")


def _judged_benchmark(path: str, name: str):
    """`loki.facts.answer_benchmark` (as the demo scores facts) of a `.jsonl` of `{"question", "answers"}` (or
    `"answer"`) records."""
    from .dataset import read_json_lines
    from .errors import EvaluationError
    from .facts import answer_benchmark

    items = []
    for n, r in read_json_lines(path, EvaluationError):
        if isinstance(r, dict) and "answers" not in r and isinstance(r.get("answer"), str):
            r = {**r, "answers": [r["answer"]]}
        question, answers = (r.get("question"), r.get("answers")) if isinstance(r, dict) else (None, None)
        if not (
            isinstance(question, str)
            and question.strip()
            and isinstance(answers, list)
            and answers
            and all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise EvaluationError(f'{path}, line {n}: expected {{"question": str, "answers": [str, ...]}}, got {r!r}.')
        items.append(r)
    return answer_benchmark(name, items)


def _neighbourhood(path: str) -> list[str]:
    from .dataset import read_json_lines
    from .errors import EvaluationError

    questions = []
    for n, r in read_json_lines(path, EvaluationError):
        if isinstance(r, dict) and "text" in r and "question" not in r:
            continue
        question = r.get("question") if isinstance(r, dict) else r
        if not (isinstance(question, str) and question.strip()):
            raise EvaluationError(
                f'{path}, line {n}: expected a question (a string or {{"question": str}}), got {r!r}.'
            )
        questions.append(question)
    return questions


@command("judge", "judge a delta by its four numbers (efficacy, generalisation, specificity, forgetting)", _judge_args)
def _judge(args: argparse.Namespace) -> int:
    """The four numbers of a delta (`loki.evaluate.ImplantSuite.report`), and of the delta served through its scope
    with `--scope`; `--record` writes them into the `.loki` for its model card. Files, the scope and the delta are
    read, and the delta and scope checked against the model, before anything is scored; the `.loki` is written last
    (its rows as they were, the figures in `info["extra"]["evaluation"]`)."""
    from pathlib import Path

    from .errors import EvaluationError
    from .evaluate import GENERAL_SETS, ImplantSuite, general_suite
    from .facts import GENERAL
    from .format import atomic_write
    from .ledger import plan
    from .scoping import check_scopes
    from .sources import load, load_scope, save

    if args.record and not Path(args.delta).is_file():
        raise EvaluationError(
            f"--record writes the figures into a local .loki file; {args.delta} is not one. Pull it first "
            f"(loki pull {args.delta} --out delta.loki) and judge that file."
        )
    if args.record:
        writable(args.delta, folder=False, option="the delta")
    if args.json_out:
        writable(args.json_out, folder=False, option="--json")
    unknown = sorted(set(args.general or ()) - set(GENERAL_SETS))
    if unknown:
        raise EvaluationError(f"Unknown general set(s) {unknown}; choose from {list(GENERAL_SETS)}.")
    bad = [t for t in args.template if t.count("{}") != 1]
    if bad:
        raise EvaluationError(
            f"A --template holds its subject's place with one {{}}, e.g. 'Who wrote {{}}?'; got {bad}."
        )
    suite = ImplantSuite(
        _judged_benchmark(args.trained, "trained"),
        _judged_benchmark(args.held_out, "held_out"),
        _neighbourhood(args.neighbourhood),
        general_suite(args.general or GENERAL, n=args.general_items),
        args.template,
    )
    delta = load(args.delta)
    scope = load_scope(args.scope) if args.scope else None
    model, tokenizer = _load_model(args.base, args.dtype, args.revision)
    # a scope or delta of another model is refused here, before minutes of scoring (as loki.scoped checks them)
    if scope is not None:
        check_scopes(model, [scope], weights=True)
    plan(model, delta)
    base = suite.scores(model, tokenizer)
    reports = {"implant": suite.report(model, tokenizer, delta, base=base)}
    if scope is not None:
        reports["scoped"] = suite.report(model, tokenizer, delta, base=base, scope=scope)
    for name, report in reports.items():
        print(f"{delta.name or args.delta}{', served through its scope' if name == 'scoped' else ''}:")
        print("   " + report.table().replace("\n", "\n   "))
        for q, a, b in report.changed()[:3]:
            print(f"   changed: {q!r}: {a!r} -> {b!r}")
    if suite.excluded:
        print(f"(left out of the general sets, as they ask the implant's templates: {suite.excluded})")
    if args.json_out:
        atomic_write(Path(args.json_out), json.dumps({k: r.as_dict() for k, r in reports.items()}, indent=1).encode())
        print(f"wrote {args.json_out}")
    if args.record:
        delta.info["extra"]["evaluation"] = reports["implant"].evaluation(scoped=reports.get("scoped"))
        save(delta, args.delta)
        print(f"recorded the figures in {args.delta} (loki push shows them on its model card)")
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
