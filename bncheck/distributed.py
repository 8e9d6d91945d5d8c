"""torch.distributed glue for recalibration under ``torchrun``.

``torchrun --nproc_per_node N -m bncheck recalibrate …`` starts N processes with RANK,
WORLD_SIZE (and MASTER_ADDR/PORT) in their environment. Each process reads only its own shard
of the batches — batch ``i`` goes to rank ``i mod N``, so the shards are disjoint and their
union is the whole data set exactly once — and runs it. The per-layer ``Moments`` are then
all-gathered as flat float64 vectors ``[count, mean…, M2…]`` (``Moments.to_array``) and merged
in rank order with Chan's formula, the same on every rank: the result equals the one-process
result up to the order of the merges (≈1e-15 relative). Only rank 0 writes files.

Process group: gloo when the pass runs on the CPU, nccl when it runs on CUDA (each rank on
``cuda:LOCAL_RANK``); the vectors are tiny, the collectives cost nothing next to the pass.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bncheck.errors import InputError
from bncheck.numerics import Moments

_device = "cpu"  # where collective buffers live: the process group's device


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    raw = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        rank, size = int(raw[0]), int(raw[1])
    except ValueError:
        raise InputError(f"RANK={raw[0]!r} / WORLD_SIZE={raw[1]!r} are not integers") from None
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"RANK={rank} is not within WORLD_SIZE={size}")
    return rank, size


def init(device: str = "cpu") -> None:
    """Join the process group torchrun set up (gloo for ``cpu``, nccl for ``cuda``)."""
    import torch
    import torch.distributed as dist

    global _device
    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine: use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        _device = f"cuda:{local}"
        dist.init_process_group(backend="nccl")
    else:
        _device = "cpu"
        dist.init_process_group(backend="gloo")


def shard(source: Any, rank: int, world_size: int) -> Any:
    """The batches of ``source`` (a ``bncheck.data.DataSource``) this rank runs: batch ``i``
    for every ``i ≡ rank (mod world_size)``. A view: only these batches are read. Its
    ``bounds`` are the (start, stop) sample ranges of its batches, in the source's order."""
    if world_size == 1:
        return source
    view = copy.copy(source)
    view.bounds = list(source.bounds)[rank::world_size]
    return view


def _allgather(vec: np.ndarray) -> list[np.ndarray]:
    """``vec`` (float64, the same length on every rank) from every rank, in rank order."""
    import torch
    import torch.distributed as dist

    local = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float64)).to(_device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.cpu().numpy() for p in parts]


def allgather_moments(
    local: Mapping[str, Moments], channels: Mapping[str, int]
) -> dict[str, Moments]:
    """Every rank's moments for the layers named in ``channels`` (name → channel count; the
    same on every rank), merged in rank order. A rank that saw no data for a layer contributes
    ``Moments.empty``; layers no rank saw are left out."""
    names = sorted(channels)
    mine = [local.get(n) or Moments.empty(channels[n]) for n in names]
    flat = np.concatenate([m.to_array() for m in mine]) if mine else np.zeros(0)
    merged: dict[str, Moments] = {}
    per_rank = _allgather(flat)
    start = 0
    for name in names:
        width = 1 + 2 * channels[name]
        total = Moments.merge_all(Moments.from_array(p[start : start + width]) for p in per_rank)
        start += width
        if total.count:
            merged[name] = total
    return merged


def allreduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of a small float64 vector (counts are exact below 2⁵³)."""
    return np.sum(_allgather(np.asarray(values, dtype=np.float64)), axis=0)


def finish() -> None:
    """Barrier (rank 0 has written), then leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
