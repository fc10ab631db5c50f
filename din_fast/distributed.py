"""Data-parallel training on ``torch.distributed`` (DDP), started with ``torchrun``.

Each global mini-batch is split across the ranks; the run then computes what one process
computes on the whole global batch:

* **Dice statistics** (``sync_dice_statistics``): every din_fast ``Dice`` (the top MLP's and the
  activation unit's) takes its training mean and variance over the positions of all ranks, and
  its backward sums the cross-sample terms over the ranks, as ``nn.SyncBatchNorm`` does. The
  running statistics then move identically on every rank.
* **Gradients**: ``DistributedDataParallel`` averages them over the ranks. ``data_parallel``
  wraps the model's ``loss`` so that a rank's log loss is weighted by its share of the global
  batch: the average is the global batch's mean gradient even when the shards are unequal.
* **MBA** (eq. 4-7): ``alpha_mj`` means "id j occurs in the global mini-batch". The ids of the
  ranks are united (``union_ids``); ``DIN``/``BaseModel.mba_penalty`` and ``MBASGD`` do it by
  themselves in a distributed run, so that every row the global step touches is regularized
  exactly once (see ``_InterestModel.mba_penalty`` for why every rank adds the whole penalty).

Collectives: every function here that takes a ``process_group`` must be called by every rank of
the group, in the same order.
"""

from __future__ import annotations

import inspect
import itertools
import os
from datetime import timedelta
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.batching import (PADDING_ID, Batch, InteractionData, Samples, batch_indices, history_bounds,
                             make_batch)
from .modules import Dice

Tensor = torch.Tensor

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and its default process group initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank(process_group=None) -> int:
    """This process's rank in ``process_group`` (default: the world); 0 when not distributed."""
    return _dist().get_rank(process_group) if is_distributed() else 0


def world_size(process_group=None) -> int:
    """The number of ranks in ``process_group`` (default: the world); 1 when not distributed."""
    return _dist().get_world_size(process_group) if is_distributed() else 1


def default_group():
    """``torch.distributed.group.WORLD`` when the default group is initialized with more than one
    rank, else None (a single process: nothing to synchronize)."""
    return _dist().group.WORLD if is_distributed() and world_size() > 1 else None


class _World:
    """What a module keeps for torch.distributed's default group: the group itself cannot be
    pickled, so a model holding it could not be deep-copied or saved whole. Pickles and copies
    as this module's ``WORLD``."""

    def __reduce__(self):
        return "WORLD"

    def __repr__(self) -> str:
        return "din_fast.distributed.WORLD"


WORLD = _World()


def _resolve_group(process_group):
    """The group a collective takes: the default one for None or ``WORLD``."""
    if not is_distributed():
        given = "" if process_group is None else "process_group was given but "
        raise ValueError(f"{given}torch.distributed is not initialized (call torch.distributed.init_process_group "
                         f"first)")
    return _dist().group.WORLD if process_group is None or process_group is WORLD else process_group


# ----------------------------------------------------------------------------------------------
# Splitting a global batch
# ----------------------------------------------------------------------------------------------


def shard_indices(n: int, rank: int, world: int) -> slice:
    """The positions of a global batch of ``n`` samples that ``rank`` of ``world`` takes:
    contiguous blocks in rank order whose sizes differ by at most one (the first ``n % world``
    ranks take one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank {rank} of {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def num_global_batches(num_samples: int, batch_size: int, world: int) -> int:
    """How many global batches ``local_batches`` yields (a last one smaller than ``world`` is
    skipped)."""
    full, rest = divmod(num_samples, batch_size)
    return full + (rest >= world)


def local_batches(data: InteractionData, samples: Samples, batch_size: int, max_length: int, *,
                  rng: Optional[np.random.Generator], rank: int, world: int, shuffle: bool = True,
                  device=None) -> Iterator[Tuple[Batch, int]]:
    """This rank's part of each global batch, as ``(batch, global batch size)``.

    The global batches are those of ``din_fast.data.iterate_batches`` with the same ``rng``
    (every rank draws the same order from the same seed); each is split by ``shard_indices``
    and padded to the global batch's history width, so that Dice statistics that count padding
    (``dice_stats="all"``) see what one process sees. A last global batch with fewer samples
    than ranks is skipped (no rank may be left without samples).
    """
    if shuffle and rng is None:
        raise ValueError("local_batches: shuffling needs rng, a Generator seeded alike on every rank (an "
                         "unseeded one gives each rank its own order: shards overlap and samples go unseen)")
    # The generator is a function of its own so that the check above runs at the call, not at
    # the first batch.
    return _local_batches(data, samples, batch_size, max_length, rng, rank, world, shuffle, device)


def _local_batches(data, samples, batch_size, max_length, rng, rank, world, shuffle, device):
    for index in batch_indices(len(samples), batch_size, shuffle=shuffle, rng=rng):
        if len(index) < world:
            continue
        _, lengths = history_bounds(data, samples, index, max_length)
        width = max(int(lengths.max()), 1)
        batch = make_batch(data, samples, index[shard_indices(len(index), rank, world)], max_length)
        missing = width - batch.history_items.shape[1]
        if missing:
            batch.history_items = F.pad(batch.history_items, (0, missing), value=PADDING_ID)
            batch.history_categories = F.pad(batch.history_categories, (0, missing), value=PADDING_ID)
        yield (batch if device is None else batch.to(device)), len(index)


# ----------------------------------------------------------------------------------------------
# Synchronization
# ----------------------------------------------------------------------------------------------


def union_ids(ids: Tensor, process_group=None) -> Tensor:
    """The sorted distinct ids over every rank of ``process_group`` (default: the world).

    Each rank's distinct ids are gathered (padded to the longest rank's count, then cut back),
    so the traffic grows with the batches' distinct ids, never with the table size.

    Args:
        ids: integer ids of any shape on any device the group's backend serves (CUDA for nccl).

    Returns:
        ``[U]`` int64, sorted, on ``ids``' device; the same tensor on every rank.
    """
    dist = _dist()
    group = _resolve_group(process_group)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    local = torch.unique(ids.reshape(-1).to(torch.int64))
    ranks = dist.get_world_size(group)
    count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(ranks)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    longest = max(counts)
    if longest == 0:
        return local
    padded = local.new_zeros(longest)
    padded[:local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(gathered, padded, group=group)
    return torch.unique(torch.cat([part[:n] for part, n in zip(gathered, counts)]))


def union_table_ids(ids: Sequence[Tensor], num_rows: Sequence[int], process_group=None) -> List[Tensor]:
    """``union_ids`` of several tables in one exchange: table i's ids (in ``[0, num_rows[i])``)
    are shifted past the rows of the tables before it, united, and split back.

    Returns one sorted int64 tensor per table, on each ids' device.
    """
    starts = [0, *itertools.accumulate(int(n) for n in num_rows)][:len(num_rows)]
    packed = torch.cat([values.reshape(-1).to(torch.int64) + start for values, start in zip(ids, starts)])
    united = union_ids(packed, process_group)
    table_of = torch.searchsorted(torch.tensor(starts, device=united.device), united, right=True) - 1
    return [united[table_of == i] - start for i, start in enumerate(starts)]


def sync_dice_statistics(module: nn.Module, process_group=None) -> nn.Module:
    """Makes every din_fast ``Dice`` inside ``module`` (the top MLP's, and the Dice of every
    ``LocalActivationUnit``/``AttentionPooling`` with ``activation="dice"``, which hand it to
    the fused op) share its training statistics over ``process_group`` (None: the world), as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for BatchNorm. Inference is unchanged (it
    uses the running statistics). Returns ``module``.

    Statistics then cover the positions of every rank (for the attention unit: the valid
    behaviours of the whole global batch with ``dice_stats="valid"``), the backward sums its
    cross-sample terms over the ranks, and the running statistics move identically on every
    rank. Every rank must run every training forward and backward.
    """
    _resolve_group(process_group)
    for child in module.modules():
        if isinstance(child, Dice):
            child.process_group = WORLD if process_group is None else process_group
    return module


# ----------------------------------------------------------------------------------------------
# DDP wrapping
# ----------------------------------------------------------------------------------------------


class TrainingLoss(nn.Module):
    """``model.loss`` as a module's forward, for ``DistributedDataParallel`` (which must see the
    forward that builds the loss). ``forward(batch, include_mba=True, log_loss_scale=1.0)`` ->
    ``(loss, logits)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, include_mba: bool = True, log_loss_scale: float = 1.0):
        return self.model.loss(batch, include_mba=include_mba, log_loss_scale=log_loss_scale)


def data_parallel(model: nn.Module, *, device: Optional[torch.device] = None, process_group=None,
                  sync_dice: bool = True):
    """Wraps a ``DIN``/``BaseModel`` for data-parallel training.

    Returns a ``DistributedDataParallel`` over ``TrainingLoss(model)``: call it as
    ``loss, logits = ddp(local_batch, include_mba=..., log_loss_scale=shard_weight(...))`` and
    ``loss.backward()``; the model itself is ``ddp.module.model`` (evaluate and save that one).

    Args:
        model: on ``device`` already; every rank must build it the same way (DDP broadcasts
            rank 0's parameters and buffers once, here).
        device: the rank's CUDA device (``cuda:LOCAL_RANK``), or None / a CPU device.
        process_group: the data-parallel ranks (None: the world).
        sync_dice: synchronize Dice statistics (``sync_dice_statistics``). Without it each rank
            normalizes by its own shard, as BatchNorm under DDP does, and its running statistics
            drift apart from the other ranks'; rank 0's are the ones to keep.

    Buffers are not broadcast at each forward: with ``sync_dice`` the running statistics are
    equal on every rank by construction, and the MBA counts never change.
    """
    from torch.nn.parallel import DistributedDataParallel

    group = _resolve_group(process_group)
    if sync_dice:
        sync_dice_statistics(model, process_group)
    if hasattr(model, "mba_process_group"):
        model.mba_process_group = WORLD if process_group is None else process_group
    device_ids = [device] if device is not None and torch.device(device).type == "cuda" else None
    # Newer torch names the option forward_sync_buffers (and deprecates broadcast_buffers).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}
    else:
        # broadcast_buffers=False also skips DDP's one broadcast of the buffers at construction.
        broadcast_buffers(model, group)
        no_buffer_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(TrainingLoss(model), device_ids=device_ids, process_group=group, **no_buffer_sync)


def broadcast_buffers(model: nn.Module, process_group=None) -> None:
    """Every buffer of ``model`` (Dice running statistics, MBA counts) set to the first rank's of
    ``process_group`` (None: the world), in place."""
    group = _resolve_group(process_group)
    source = _dist().get_global_rank(group, 0)
    for buffer in model.buffers():
        _dist().broadcast(buffer, source, group=group)


def shard_weight(local_size: int, global_size: int, world: int) -> float:
    """The factor on a rank's mean log loss that makes DDP's average over ``world`` ranks the
    global batch's mean: ``local_size * world / global_size`` (1 for equal shards)."""
    return local_size * world / global_size


# ----------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """Whether the environment holds torchrun's rendezvous variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def environment_world_size() -> int:
    """``WORLD_SIZE`` of a torchrun launch, else 1."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def rank_device(device: Optional[str] = None) -> torch.device:
    """This torchrun rank's device: ``cuda:LOCAL_RANK`` for ``"cuda"`` (or for None when CUDA is
    available), else the CPU. A CUDA device index is refused: each rank takes its own."""
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if torch.device(device or "cuda").index is not None:
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, got {device!r}")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if kind != "cpu":
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), got device {device!r}")
    return torch.device("cpu")


def init_from_environment(device: torch.device, timeout: Optional[timedelta] = None) -> None:
    """Joins the torchrun launch: ``init_process_group`` with nccl for a CUDA ``device`` (made
    the current device) or gloo for the CPU; ``timeout`` of the collectives (torch's default
    when None: ranks wait this long while rank 0 alone evaluates)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    options = {} if timeout is None else {"timeout": timeout}
    _dist().init_process_group("nccl" if device.type == "cuda" else "gloo", **options)


def destroy() -> None:
    """``destroy_process_group`` when one is initialized."""
    if is_distributed():
        _dist().destroy_process_group()


def all_reduce_sum(value: Tensor, process_group=None) -> Tensor:
    """A copy of ``value`` summed over the ranks (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    _dist().all_reduce(total, group=process_group)
    return total
