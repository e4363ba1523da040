"""`loki.attribute`: Knowledge Vector Attribution (LoKI paper §3.1) over a set of prompts, written to disk as it goes.

The result is an `Attributions` set: `values` `[N prompts, L layers, d_model]` (float32), the target token of each
prompt, the seconds each prompt took, and metadata (model, steps, target rule, prompt source). With `path=`, every
finished batch of prompts is written at once into a folder (`attributions.npy` plus small files), so an interrupted
run resumes where it stopped, and `Attributions.load(path)` reads the values memory-mapped.

>>> import loki, loki.testing
>>> model = loki.testing.tiny_model("llama")
>>> attr = loki.attribute(model, None, [[5, 6, 7], [8, 9]], steps=3, progress=False)
>>> attr.values.shape, attr.meta["steps"]
(torch.Size([2, 2, 32]), 3)

Several GPUs or machines: run the same script under `torchrun` or `accelerate launch` with `shard="auto"`; each
process takes a contiguous block of the prompts into `path/shard-RRR-of-WWW/`, and rank 0 joins the blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .dataset import check_number
from .delta import fingerprint_of
from .distributed import launched_rank_world
from .errors import AttributionError, AttributionMismatchError
from .format import atomic_write
from .kva import ENGINES, MEASURES, kva
from .projections import find_down_projections, unwrap
from .prompts import PromptSet, as_prompts
from .version import __version__

FORMAT = "loki-attributions"
TARGETS = ("prediction", "gold")
FILES = ("meta.json", "attributions.npy", "targets.npy", "seconds.npy")  # an attribution folder (and Hub repo)


@dataclass(eq=False)
class Attributions:
    """KVA results over N prompts (LoKI paper §3.1), as `attribute` returns them and `Attributions.load` reads them.

    Attributes:
        values: float32 `[N prompts, L layers, d_model]`: the attribution of every down-projection row per prompt
            (memory-mapped and read-only when read from a folder).
        targets: int64 `[N]`: the token id whose probability (or logit) was attributed, per prompt.
        seconds: float64 `[N]`: wall-clock seconds per prompt (its batch's time divided by the batch size).
        meta: JSON-ready settings: model, template, steps, target, measure, engine, prompt source and checksum,
            shard, `seconds_per_prompt` (the median).
        path: the folder the values live in, or None when they are only in memory.
        origin: `"org/name@commit"` when they were pulled from the Hugging Face Hub (`loki.load_attributions`);
            `select` records it as the selection's source.

    >>> import loki.testing
    >>> attr = attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7], [8, 9]], steps=3, progress=False)
    >>> attr
    Attributions(2 prompts x 2 layers x 32, model='tiny-random/llama-seed0', steps=3, path=None)
    >>> attr.targets
    tensor([65, 47])
    """

    values: torch.Tensor
    targets: torch.Tensor
    seconds: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    origin: str | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(N prompts, L layers, d_model)`."""
        return tuple(self.values.shape)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Attributions:
        """Read a finished attribution folder written by `attribute(..., path=)`; `values` are memory-mapped
        (read-only: copy them before writing).

        Args:
            path: the folder (holding `meta.json`, `attributions.npy`, `targets.npy`, `seconds.npy`).

        Returns:
            Attributions: with `path` set.

        Raises:
            AttributionError: a file, not a folder; no `meta.json` there (the message says so when the folder holds
                shards to join), a `meta.json` of another format, arrays of other shapes than it says, or an
                unfinished run.

        >>> import loki.testing, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7]], steps=2, path=folder, progress=False)
        >>> Attributions.load(folder).values.shape
        torch.Size([1, 2, 32])
        """
        path = Path(path)
        if path.is_file():
            raise AttributionError(
                f"{path} is a file; an attribution set is a folder (loki attribute --out). A "
                "selection .json is read with loki.load_selection or Selection.load."
            )
        meta = _read_meta(path)
        if meta is None:
            shards = sorted(path.glob("shard-*-of-*"))
            hint = (
                f" It holds {len(shards)} shards: join them with loki.Attributions.from_shards(path)." if shards else ""
            )
            raise AttributionError(f"{path} is not an attribution folder (no meta.json).{hint}")
        store = _Store.open(path, meta)
        if not store.done.all():
            raise AttributionError(
                f"{path} is unfinished: {int(store.done.sum())} of {len(store.done)} prompts done. Run the same "
                f"loki.attribute(..., path=...) call again to resume."
            )
        return store.result()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as an attribution folder (`FILES`: what `attribute(..., path=)` writes), replacing one there.

        Args:
            path: the folder (created if needed).

        Returns:
            Path: `path`; `Attributions.load(path)` reads the set back.

        >>> import loki.testing, tempfile
        >>> attr = attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7]], steps=2, progress=False)
        >>> folder = attr.save(tempfile.mkdtemp())
        >>> torch.equal(Attributions.load(folder).values, attr.values)
        True
        """
        path = Path(path)
        if self.path is not None and path.resolve() == Path(self.path).resolve():
            return path  # already there (and its files back this set's memory maps)
        meta = {k: v for k, v in self.meta.items() if k != "seconds_per_prompt"}  # computed when read
        store = _Store.create(path, {**meta, "num_prompts": len(self)}, overwrite=True)
        store.write(range(len(self)), self.values, self.targets, self.seconds)
        return path

    def saved_at(self, path: str | os.PathLike | None = None) -> Path | None:
        """The folder that holds exactly this set on disk (`path`, default `self.path`), or None: a folder whose
        `meta.json` matches `meta` and whose arrays have this set's shape (the values are not compared).

        >>> import loki.testing, tempfile
        >>> attr = attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7]], steps=2, progress=False)
        >>> attr.saved_at() is None, attr.saved_at(attr.save(tempfile.mkdtemp())) is not None
        (True, True)
        """
        path = Path(path) if path is not None else self.path
        if path is None or not all((path / name).is_file() for name in FILES):
            return None
        try:
            on_disk = _read_meta(path)
        except (AttributionError, ValueError):
            return None
        mine = {k: v for k, v in self.meta.items() if k != "seconds_per_prompt"}
        if on_disk != mine or np.load(path / "attributions.npy", mmap_mode="r").shape != self.shape:
            return None
        return path

    @classmethod
    def from_shards(cls, path: str | os.PathLike, *, remove_shards: bool = False) -> Attributions:
        """Join the finished shards `path/shard-RRR-of-WWW` (in rank order) into one attribution set at `path`.

        `attribute(..., shard="accelerate")` does this itself; call it after runs with explicit `shard=(rank, world)`.

        Args:
            path: the folder that holds the shard folders; the joined set is written into it (replacing any there).
            remove_shards: delete the shard folders once joined.

        Returns:
            Attributions: all prompts in their original order, `meta["merged_shards"]` the number of shards.

        Raises:
            AttributionError: no shard folders, a missing or unfinished shard, or shards computed with different
                settings (model, steps, target, ...).

        >>> import loki.testing, os, tempfile
        >>> model, folder = loki.testing.tiny_model("llama"), tempfile.mkdtemp()
        >>> for rank in (0, 1):  # e.g. two machines, each with its half of the 3 prompts
        ...     _ = attribute(model, None, [[5, 6], [7, 8], [9, 10]], steps=2, path=folder, shard=(rank, 2),
        ...                   progress=False)
        >>> Attributions.from_shards(folder, remove_shards=True).values.shape, sorted(os.listdir(folder))
        (torch.Size([3, 2, 32]), ['attributions.npy', 'meta.json', 'seconds.npy', 'targets.npy'])
        """
        return _from_shards(path, remove_shards=remove_shards)

    def __repr__(self) -> str:
        n, num_layers, d = self.shape
        return (
            f"Attributions({n} prompts x {num_layers} layers x {d}, model={self.meta.get('model')!r}, "
            f"steps={self.meta.get('steps')}, path={str(self.path) if self.path else None!r})"
        )


def attribute(
    model: nn.Module,
    tokenizer,
    prompts,
    steps: int = 7,
    *,
    target: str = "prediction",
    measure: str = "prob",
    engine: str = "fast",
    path: str | os.PathLike | None = None,
    batch_size: int = 4,
    max_rows: int = 8192,
    shots: int = 0,
    dev=None,
    shard: tuple[int, int] | str | None = None,
    poll: float = 0.5,
    progress: bool = True,
    template: str | None = None,
) -> Attributions:
    """Attribute every down-projection row of `model` on `prompts`: Knowledge Vector Attribution (KVA, LoKI paper
    §3.1; docs/method.md stage 1), integrated gradients of the target token's probability with respect to each
    layer's down-projection output at the last prompt position (numerics: `loki.kva.kva`).

    Args:
        model: a causal LM of a supported family (`loki.projections`); its parameters' `requires_grad` and train/eval
            mode are restored afterwards.
        tokenizer: its tokenizer; may be None when the prompts are token id lists.
        prompts: multiple-choice records (dicts with question/choices/answer[/subject]; a `datasets.Dataset`; a
            `.jsonl`/`.json`/`.csv` file of them), plain text strings, token id lists, "probe" (the bundled probe
            set) or a `PromptSet`; see `loki.prompts.as_prompts`.
        steps: integration steps `m` (alphas `k/m`, k = 0..m-1; the authors use 7).
        target: "prediction" (the model's own argmax at the last position) or "gold" (the records' answer letter).
        measure: the attributed function of the target token: "prob" (softmax probability, as published) or
            "logit".
        engine: "fast" (one shared-prefix pass per batch) or "reference" (full passes per prompt and layer; slow,
            for checking). Both give the same values up to rounding.
        path: a folder written as batches finish; calling again with the same arguments resumes, other arguments
            are refused. None keeps everything in memory.
        batch_size: prompts that share one pass.
        max_rows: bounds the single-token rows of one fast pass (memory); more are split over passes.
        shots: few-shot examples per multiple-choice prompt: with `dev=` (records, a file, or a folder such as
            MMLU's `data/dev/`) the first `shots` of the prompt's own subject (the authors' 5-shot Qwen prompts);
            without, the first `shots` records serve every other record.
        dev: few-shot example records (see `shots`).
        shard: `(rank, world)` computes only this process's contiguous block of prompts into
            `path/shard-RRR-of-WWW` (join with `Attributions.from_shards`); "auto" (also "accelerate",
            "torchrun") takes rank and world from the launcher (`launched_rank_world`), and rank 0 joins the
            shards when all are done (every rank returns the joined set). Without `shard`, running under a
            launcher with more than one process is an error, not a duplicate run.
        poll: seconds between checks while ranks wait for each other (`shard="auto"`).
        progress: show a tqdm progress bar.
        template: the down-projection module path (`loki.projections.find_down_projections`); None for known families.

    Returns:
        Attributions: `values` float32 `[N, L, d_model]` (this shard's N), `targets` int64 `[N]`.

    Raises:
        AttributionError: a bad target, measure, engine, shard, or a count (`steps`, `batch_size`, `max_rows`) that
            is not an integer >= 1, `shots` < 0, `poll` <= 0; `target="gold"` for prompts without answers; an empty
            prompt.
        AttributionMismatchError: `path` holds attributions of another model (`model_fingerprint`), of other
            prompts or with other settings, or written before loki recorded the model's fingerprint; nothing in
            the folder is changed.
        PromptError: the prompts cannot be read or built (e.g. text without a tokenizer).
        UnknownArchitectureError: loki cannot find the model's down-projections.

    >>> import loki.testing
    >>> attr = attribute(loki.testing.tiny_model("llama"), None, [[5, 6, 7], [8, 9]], steps=3, progress=False)
    >>> attr.values.shape, attr.values.dtype
    (torch.Size([2, 2, 32]), torch.float32)
    >>> # model, tokenizer = loki.load_default()
    >>> # attr = loki.attribute(model, tokenizer, "probe", path="attr/probe")     # resumable
    """
    if target not in TARGETS:
        raise AttributionError(f"target must be one of {TARGETS}, got {target!r}.")
    if engine not in ENGINES or measure not in MEASURES:
        raise AttributionError(f"engine must be one of {ENGINES} and measure one of {MEASURES}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_rows", max_rows)):
        check_number(name, value, integer=True, low=1, error=AttributionError)
    check_number("shots", shots, integer=True, low=0, error=AttributionError)
    check_number("poll", poll, above=0, error=AttributionError)
    prompt_set = prompts if isinstance(prompts, PromptSet) else as_prompts(prompts, tokenizer, shots=shots, dev=dev)
    if target == "gold" and any(g is None for g in prompt_set.gold):
        raise AttributionError(
            "target='gold' needs a gold answer for every prompt (multiple-choice records with "
            "an 'answer'); use target='prediction' for plain prompts."
        )
    gold = prompt_set.gold if target == "gold" else [None] * len(prompt_set)
    projs = find_down_projections(model, template)

    distributed = shard in LAUNCHED
    if distributed:
        shard = launched_rank_world()
        if path is None:
            raise AttributionError(f"shard={shard!r} needs path=: the processes join their shards through it.")
    elif shard is None and launched_rank_world()[1] > 1:
        raise AttributionError(
            f"{launched_rank_world()[1]} processes run this (torchrun / accelerate launch) but shard= is not set: "
            "every "
            "process would attribute every prompt"
            + (" into the same folder" if path is not None else "")
            + ". Pass shard='auto' (command line: --shard auto) to split the prompts between them, or run one process."
        )
    rank, world = shard if shard is not None else (0, 1)
    if not 0 <= rank < world:
        raise AttributionError(f"shard=(rank, world) needs 0 <= rank < world, got {shard}.")
    n_all = len(prompt_set)
    lo, hi = n_all * rank // world, n_all * (rank + 1) // world
    meta = {
        "format": FORMAT,
        "loki_version": __version__,
        "model": getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "model_fingerprint": model_fingerprint(model),  # the same name may be other weights: resume only these
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # when the run started (kept on resume)
        "template": projs.template,
        "num_layers": len(projs),
        "d_model": projs.d_out,
        "dtype": str(projs.weight.dtype).removeprefix("torch."),
        "steps": steps,
        "alphas": "k/m for k = 0..m-1",
        "target": target,
        "measure": measure,
        "engine": engine,
        "prompt_source": prompt_set.source,
        "num_prompts": hi - lo,
        "prompts_sha256": _digest(prompt_set.ids[lo:hi], gold[lo:hi]),
        "shard": {"rank": rank, "world": world, "start": lo, "stop": hi} if world > 1 else None,
    }
    root = Path(path) if path is not None else None
    folder = root / f"shard-{rank:03d}-of-{world:03d}" if root is not None and world > 1 else root
    store = _Store.create(folder, meta)

    todo = [i for i in range(hi - lo) if not store.done[i]]
    bar = _progress(progress, total=hi - lo, initial=hi - lo - len(todo))
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            t0 = time.perf_counter()
            values, targets = kva(
                model,
                [prompt_set.ids[lo + i] for i in batch],
                steps,
                targets=[gold[lo + i] for i in batch],
                measure=measure,
                engine=engine,
                max_rows=max_rows,
                template=template,
            )
            store.write(batch, values, targets, (time.perf_counter() - t0) / len(batch))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if distributed and world > 1:
        # Join through the file system (no process group needed, CPU or GPU, one machine or a shared disk): every
        # rank marks its finished shard; rank 0 waits for all, joins them and marks the join of this prompt set.
        run = _digest(prompt_set.ids, gold)[:16]
        mine = folder / f"finished-{run}"
        mine.touch()
        joined = root / f"joined-{run}"
        if rank == 0:
            shards = [root / f"shard-{r:03d}-of-{world:03d}" / f"finished-{run}" for r in range(world)]
            _wait_for(lambda: all(f.exists() for f in shards), poll)
            _from_shards(root)
            joined.touch()
        else:  # a join marker older than this rank's own finish is a previous run's
            since = mine.stat().st_mtime_ns
            _wait_for(lambda: joined.exists() and joined.stat().st_mtime_ns >= since, poll)
        return Attributions.load(root)
    return store.result()


LAUNCHED = ("auto", "accelerate", "torchrun")  # shard= values that take rank and world from the launcher


def _wait_for(ready, poll: float) -> None:
    while not ready():
        time.sleep(poll)


def _from_shards(path: str | os.PathLike, *, remove_shards: bool = False) -> Attributions:
    """Concatenate the finished shards `path/shard-RRR-of-WWW` (in rank order) into one attribution set at `path`."""
    path = Path(path)
    shards = sorted(path.glob("shard-*-of-*"))
    if not shards:
        raise AttributionError(f"No shard folders (shard-RRR-of-WWW) under {path}.")
    parts = [Attributions.load(s) for s in shards]
    world = {p.meta["shard"]["world"] for p in parts}
    if len(world) != 1 or len(parts) != world.pop():
        raise AttributionError(
            f"{path} holds {len(parts)} shards of different or incomplete runs; expected one per rank."
        )
    keys = (
        "model",
        "model_fingerprint",
        "template",
        "num_layers",
        "d_model",
        "steps",
        "target",
        "measure",
        "engine",
        "prompt_source",
    )
    for p in parts[1:]:
        if any(p.meta.get(k) != parts[0].meta.get(k) for k in keys):
            raise AttributionError(f"Shards under {path} were computed with different settings; recompute them.")
    meta = {
        **parts[0].meta,
        "num_prompts": sum(len(p) for p in parts),
        "shard": None,
        "merged_shards": len(parts),
        "prompts_sha256": hashlib.sha256("".join(p.meta["prompts_sha256"] for p in parts).encode()).hexdigest(),
    }
    store = _Store.create(path, meta, overwrite=True)
    offset = 0
    for p in parts:
        n = len(p)
        store.write(list(range(offset, offset + n)), p.values, p.targets, p.seconds)
        offset += n
    if remove_shards:
        import shutil

        for s in shards:
            shutil.rmtree(s)
    return store.result()


# -- storage ---------------------------------------------------------------------------------------
class _Store:
    """The arrays of one run, in memory (no path) or as `.npy` memory maps in a folder (written as prompts finish)."""

    def __init__(self, folder: Path | None, meta: dict, values, targets, seconds):
        self.folder, self.meta = folder, meta
        self.values, self.targets, self.seconds = values, targets, seconds

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.targets) >= 0  # a prompt is done once its target is written (written last)

    @classmethod
    def create(cls, folder: Path | None, meta: dict, overwrite: bool = False) -> _Store:
        shape = (meta["num_prompts"], meta["num_layers"], meta["d_model"])
        if folder is None:
            return cls(
                None, meta, np.zeros(shape, np.float32), np.full(shape[0], -1, np.int64), np.full(shape[0], np.nan)
            )
        old = _read_meta(folder)
        if old is not None and not overwrite:
            _check_resumable(folder, old, meta)
            return cls.open(folder, old, mode="r+")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
        values = np.lib.format.open_memmap(folder / "attributions.npy", "w+", np.float32, shape)
        targets = np.lib.format.open_memmap(folder / "targets.npy", "w+", np.int64, (shape[0],))
        seconds = np.lib.format.open_memmap(folder / "seconds.npy", "w+", np.float64, (shape[0],))
        targets[:] = -1
        seconds[:] = np.nan
        for a in (values, targets, seconds):
            a.flush()
        _write_json(folder / "meta.json", meta)  # last: a folder with meta.json has all its files
        return cls(folder, meta, values, targets, seconds)

    @classmethod
    def open(cls, folder: Path, meta: dict, mode: str = "r") -> _Store:
        arrays = [np.load(folder / f"{name}.npy", mmap_mode=mode) for name in ("attributions", "targets", "seconds")]
        if arrays[0].shape != (meta["num_prompts"], meta["num_layers"], meta["d_model"]):
            raise AttributionError(f"{folder}/attributions.npy has shape {arrays[0].shape}, meta.json disagrees.")
        return cls(folder, meta, *arrays)

    def write(self, rows: Sequence[int], values: torch.Tensor, targets: torch.Tensor, seconds) -> None:
        rows = np.asarray(rows)
        self.values[rows] = np.asarray(values, dtype=np.float32)
        self.seconds[rows] = np.asarray(seconds, dtype=np.float64)
        if self.folder is not None:
            self.values.flush()
            self.seconds.flush()
        self.targets[rows] = np.asarray(targets, dtype=np.int64)  # marks the rows done, so it goes last
        if self.folder is not None:
            self.targets.flush()

    def result(self) -> Attributions:
        seconds = np.asarray(self.seconds)
        meta = {**self.meta, "seconds_per_prompt": float(np.nanmedian(seconds)) if len(seconds) else None}
        return Attributions(
            _as_tensor(self.values),
            torch.from_numpy(np.array(self.targets)),
            torch.from_numpy(seconds.copy()),
            meta,
            self.folder,
        )


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over the array or memory map, without copying (loki never writes through read-only maps)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": torch cannot mark tensors read-only
        return torch.from_numpy(a)


def _check_resumable(folder: Path, old: dict, meta: dict) -> None:
    """Refuse to resume (or return) the attributions in `folder` unless they are of the same model (weights and
    shapes), prompts and settings: anything else would mix another run's scores into this one's."""
    keep = "Nothing in it was changed: pass a new path=, or delete the folder to start over."
    if "model_fingerprint" not in old:
        # Written before loki recorded the model's fingerprint: which weights made it cannot be known.
        raise AttributionMismatchError(
            f"{folder} was written by a loki that did not record the model's fingerprint, so whether its attributions "
            f"are of this model cannot be checked (Attributions.load reads it as it is). {keep}"
        )
    diff = [k for k, v in meta.items() if k not in ("loki_version", "created") and old.get(k) != v]
    if diff:
        prompts = {"prompts_sha256", "num_prompts", "prompt_source", "shard"}
        what = " and ".join(
            w
            for w, differs in (
                ("another model (the same name, other weights or shapes)", "model_fingerprint" in diff),
                ("other prompts", bool(prompts & set(diff))),
                ("other settings", bool(set(diff) - prompts - {"model_fingerprint"})),
            )
            if differs
        )
        raise AttributionMismatchError(f"{folder} holds attributions of {what} ({', '.join(diff)} differ). {keep}")


def model_fingerprint(model: nn.Module) -> str:
    """A checksum of the model's parameters: their names, shapes and dtypes, and the base-model fingerprint of each
    (`loki.delta.fingerprint_of`, formats/SPEC.md §6: up to 256 samples spread over its rows), so other weights
    under the same `name_or_path`, or other shapes, give another checksum. Parameters on the meta device
    (offloaded) count by name, shape and dtype only.

    Args:
        model: any module (wrappers such as DDP or `torch.compile` are looked through).

    Returns:
        str: a sha256 hex digest.

    >>> import loki.testing
    >>> a, b = loki.testing.tiny_model("llama", seed=0), loki.testing.tiny_model("llama", seed=1)
    >>> same = loki.testing.tiny_model("llama", seed=0)
    >>> model_fingerprint(a) == model_fingerprint(same), model_fingerprint(a) == model_fingerprint(b)
    (True, False)
    """
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        h.update(json.dumps([name, list(p.shape), str(p.dtype)]).encode())
        if p.numel() and p.device.type != "meta":
            h.update(fingerprint_of(p.detach().reshape(p.shape[0] if p.dim() else 1, -1)).numpy().tobytes())
    return h.hexdigest()


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return None
    if meta.get("format") != FORMAT:
        raise AttributionError(f"{folder}/meta.json is not a loki attribution set (format {meta.get('format')!r}).")
    return meta


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


def _digest(ids, gold) -> str:
    h = hashlib.sha256()
    for x, g in zip(ids, gold):
        h.update(json.dumps([x, g]).encode())
    return h.hexdigest()


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc="KVA", smoothing=0.1)
