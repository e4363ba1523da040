"""Several processes: which data-parallel wrapper holds a model, and gathering what it shards.

loki trains the same rows in one process or in several, with the same result. The supported order is: `loki.prepare`
the plain model, then wrap it (DDP, FSDP2 `fully_shard`, DeepSpeed ZeRO-1/2/3); `loki.extract` then gathers the
sharded rows (call it on every rank: gathering is a collective). `prepare` refuses a model that is wrapped or
sharded already, because the wrapper would not know the new trainable parameters, and FSDP1
(`FullyShardedDataParallel`) is refused in both orders (it flattens parameters into views loki cannot write into).

>>> import loki.testing, torch
>>> model = loki.testing.tiny_model("llama")
>>> wrapper(model) is None, wrapper(torch.nn.DataParallel(model))
(True, None)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .projections import unwrap_chain

__all__ = [
    "FSDP1_ADVICE",
    "Ranks",
    "full_tensor",
    "gathered",
    "is_sharded",
    "join_ranks",
    "launched_rank_world",
    "plain_class",
    "wrapper",
]

FSDP1_ADVICE = (
    "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) is not supported: it flattens the weights into views "
    "that loki cannot write its rows into. Use FSDP2: loki.prepare(model, selection), then "
    "torch.distributed.fsdp.fully_shard on the decoder layers and the model."
)


def launched_rank_world() -> tuple[int, int]:
    """`(rank, world)` of this process as `torchrun`, `accelerate launch` or `torch.distributed` set them (the
    `RANK` / `WORLD_SIZE` environment variables, or an initialised process group); `(0, 1)` in a plain run.

    Returns:
        tuple[int, int]: this process's rank and the number of processes.

    >>> launched_rank_world()
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def wrapper(model: nn.Module) -> str | None:
    """The data-parallel wrapper around (or inside) `model`: `"ddp"`, `"fsdp1"`, `"fsdp2"`, `"deepspeed"`, or None.

    Args:
        model: a model, or a wrapper around one (torch.compile, DDP, a DeepSpeed engine).

    Returns:
        str | None: `"fsdp2"` when `fully_shard` was applied to it or to any of its modules, `"fsdp1"` for a
        `FullyShardedDataParallel` anywhere in it, `"deepspeed"` for a DeepSpeed engine or ZeRO-3 partitioned
        parameters, `"ddp"` for `DistributedDataParallel`; None for a plain model (`DataParallel` too: it copies
        the model in each forward, in one process).

    >>> import loki.testing
    >>> wrapper(loki.testing.tiny_model("gpt2")) is None
    True
    """
    chain = unwrap_chain(model)
    if any(type(m).__name__ == "DeepSpeedEngine" for m in chain):
        return "deepspeed"
    if dist.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        modules, params = list(chain[-1].modules()), list(chain[-1].parameters())
        if any(isinstance(m, FullyShardedDataParallel) for m in chain + modules):
            return "fsdp1"
        if any(isinstance(m, FSDPModule) for m in modules) or any(_is_dtensor(p) for p in params):
            return "fsdp2"
        if any(hasattr(p, "ds_id") for p in params):
            return "deepspeed"
        if any(isinstance(m, DistributedDataParallel) for m in chain):
            return "ddp"
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` holds only this process's part of a parameter: an FSDP2 `DTensor`, or a DeepSpeed ZeRO-3
    partitioned parameter (`ds_id`).

    Args:
        t: a parameter or tensor.

    Returns:
        bool: True for a shard.

    >>> is_sharded(torch.zeros(2))
    False
    """
    return _is_dtensor(t) or hasattr(t, "ds_id")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: `DTensor.full_tensor()` (a collective: every rank must call it), else `t` itself.

    Wrap reads of ZeRO-3 parameters in `gathered` first.

    Args:
        t: a tensor, or an FSDP2 `DTensor`.

    Returns:
        torch.Tensor: a plain tensor with the whole value.

    >>> full_tensor(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    return t.full_tensor() if _is_dtensor(t) else t


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, DeepSpeed ZeRO-3 partitioned `params` hold their whole values (read-only; a collective:
    every rank must enter it); other tensors are left as they are.

    Args:
        params: the parameters to read (those without `ds_id` are ignored).

    Returns:
        A context manager; DeepSpeed is imported only when some of `params` are partitioned.

    >>> with gathered([torch.ones(2)]):
    ...     pass
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def plain_class(model: nn.Module) -> type:
    """`model`'s class as written: FSDP2's `fully_shard` swaps in a subclass named `FSDP<class>`.

    Args:
        model: a model, sharded by `fully_shard` or not.

    Returns:
        type: the first class of its MRO that is not FSDP2's; `type(model)` for any other model.

    >>> import loki.testing
    >>> plain_class(loki.testing.tiny_model("llama")).__name__
    'LlamaForCausalLM'
    """
    if dist.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return type(model)


# -- training on several processes (`loki.train`) --------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place among the processes that train together, and how their work is combined so that every
    rank ends each optimizer step with the gradient (and the losses) one process would have had.

    Each rank takes its share of a step's examples (`chunks`) and retain items (`retain_share`), weighs its losses
    by the step's totals, and `combine` sums the gradients and the losses over the ranks. One process (`world` 1)
    keeps every example, with weight 1, and `combine` does nothing.

    Attributes:
        rank: this process's rank in `group`.
        world: the number of processes.
        group: the process group (DDP's); None: the default one.
        by_wrapper: FSDP2 averages the gradients itself, and every rank must run every forward (it gathers the
            weights in them).

    >>> ranks = Ranks()
    >>> ranks.chunks(["a", "b", "c"], batch_size=2), ranks.loss_scale
    ([(['a', 'b'], 1.0), (['c'], 1.0)], 1)
    """

    rank: int = 0
    world: int = 1
    group: Any = None
    by_wrapper: bool = False

    def share(self, items: list) -> list:
        """This rank's items of `items` (every `world`-th, from `rank`)."""
        return items[self.rank :: self.world]

    @property
    def loss_scale(self) -> int:
        """What each backward's loss is multiplied by: FSDP2 averages the ranks' gradients, so their sum needs
        `world` times each; loki sums them itself otherwise."""
        return self.world if self.by_wrapper else 1

    def chunks(self, examples: list, batch_size: int) -> list[tuple[list, float]]:
        """This rank's forward passes of one step: `(examples, weight)` pairs of at most `batch_size` examples.

        Under FSDP2 every rank runs as many forwards as the busiest one; the missing ones are zero-weighted
        stand-ins (the step's first example) that add nothing to the gradient.
        """
        mine = self.share(examples)
        chunks = [(mine[s : s + batch_size], 1.0) for s in range(0, len(mine), batch_size)]
        if self.by_wrapper:
            busiest = math.ceil(math.ceil(len(examples) / self.world) / batch_size)
            chunks += [(examples[:1], 0.0)] * (busiest - len(chunks))
        return chunks

    def retain_share(self, items: list[int], size: Callable[[int], int]) -> tuple[list[int], float] | None:
        """This rank's retain items of one step and their weight: the share of the step's retained positions
        (`size(item)` each) they hold, since the retain KL is a mean over positions. None: this rank has none and
        runs no retain forward (under FSDP2 it runs a zero-weighted stand-in instead)."""
        share = self.share(items)
        if not share and not self.by_wrapper:
            return None
        weight = sum(size(i) for i in share) / sum(size(i) for i in items)
        return share or items[:1], weight

    def combine(self, params: list[nn.Parameter], values: list[float]) -> list[float]:
        """Sum the ranks' gradients of `params` in place (FSDP2 has done it) and return the ranks' sums of
        `values` (the step's losses): afterwards every rank holds what one process would have."""
        if self.world == 1:
            return values
        if not self.by_wrapper:
            for p in params:
                if p.grad is None:  # this rank had no examples in the step
                    p.grad = torch.zeros_like(p)
            for dtype in {p.grad.dtype for p in params}:
                grads = [p.grad for p in params if p.grad.dtype == dtype]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=self.group)
                for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(part.view_as(g))
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return total.tolist()


def join_ranks(model: nn.Module, kind: str | None, params: list[nn.Parameter], device: torch.device) -> Ranks:
    """Join the processes of a torchrun / `accelerate launch` run (a gloo process group on the CPU, NCCL on GPUs,
    if none exists yet); `Ranks()` in a plain run.

    Args:
        model: the model (DDP's process group is used for a DDP model).
        kind: `wrapper(model)`.
        params: the trained parameters; a plain model's start from rank 0's values on every rank, as DDP does.
        device: where the model is (picks the backend).

    Returns:
        Ranks.

    >>> join_ranks(torch.nn.Linear(2, 2), None, [], torch.device("cpu"))
    Ranks(rank=0, world=1, group=None, by_wrapper=False)
    """
    rank, world = launched_rank_world()
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = model.process_group if kind == "ddp" else None
    ranks = Ranks(dist.get_rank(group), dist.get_world_size(group), group, by_wrapper=kind == "fsdp2")
    if kind is None:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p, dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return ranks
