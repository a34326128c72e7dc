"""Data-parallel helpers: which rows a rank owns, and summing results over ranks.

Transformer-XL's memory is per row of the batch, so data parallelism splits the batch by rows
and each rank carries the memory of its own rows (``mems`` of shape (mem_len, local_bsz, d_model));
no memory crosses ranks. Training needs nothing from here: wrap the model in
``torch.nn.parallel.DistributedDataParallel`` as any module (see docs/drop-in.md, "Data parallel").

    torchrun --nproc_per_node=2 scripts/ddp_check.py     # gloo on CPU, nccl on GPUs

Everything works without an initialised process group too (one process, rank 0 of 1).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_rows(batch: torch.Tensor, rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's contiguous block of rows of a (B, ...) batch (a view). B must divide evenly.

    Even blocks keep DDP's gradient average equal to the one-process mean over the whole batch
    (every rank then has the same number of labelled tokens when no label is -100).
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    if batch.shape[0] % world_size:
        raise ValueError(f"batch of {batch.shape[0]} rows does not split evenly over {world_size} ranks")
    per_rank = batch.shape[0] // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def all_reduce_sum(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sum each tensor over all ranks (in place, returned); a no-op in one process."""
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


@torch.no_grad()
def segment_nll(model, data: torch.Tensor, tgt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in float64, number of predicted tokens) of ``data`` (B, T), read in segments of
    ``tgt_len`` with the memory carried from segment to segment.

    Uses the HF LM-head contract ``model(ids, mems=..., labels=ids).losses``, so it works for
    txl_fast's ``TransfoXLLMHeadModel`` and for HF's (patched or not): inside each segment token t
    predicts token t + 1 (the first token of a segment is context only).
    """
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    count = torch.zeros((), dtype=torch.int64, device=data.device)
    mems = None
    for start in range(0, data.shape[1], tgt_len):
        ids = data[:, start : start + tgt_len]
        if ids.shape[1] < 2:
            break
        out = model(ids, mems=mems, labels=ids.clone())     # HF may write into labels: give it a copy
        total += out.losses.double().sum()
        count += ids.shape[0] * (ids.shape[1] - 1)
        mems = out.mems
    return total, count


def sharded_nll(model, data: torch.Tensor, tgt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_nll`` with the rows of ``data`` split over the ranks, summed over all of them.

    Every rank passes the same global ``data`` and gets the same totals back.
    """
    total, count = segment_nll(model, shard_rows(data), tgt_len)
    return all_reduce_sum(total, count)


def all_gather_rows(local: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Every rank's (counts[rank], ...) rows, on every rank: ``dist.all_gather`` of rows padded to
    the largest count (every rank must know every count). [local] in one process."""
    rank, world_size = world()
    if world_size == 1:
        return [local]
    if len(counts) != world_size or local.shape[0] != counts[rank]:
        raise ValueError(f"all_gather_rows: rank {rank} holds {local.shape[0]} rows, the counts say {counts}")
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, counts)]
