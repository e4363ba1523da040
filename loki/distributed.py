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
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .targets import unwrap_chain

__all__ = ["FSDP1_ADVICE", "full_tensor", "gathered", "is_sharded", "launched_rank_world", "plain_class", "wrapper"]

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
