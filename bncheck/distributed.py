"""torch.distributed glue for recalibration under ``torchrun``.

Each process reads its own shard of the batches (every WORLD_SIZE-th one); the per-layer
``Moments`` are all-gathered as flat float64 vectors and merged in rank order, so the result is
the one-process result up to the order of Chan merges (equal to ~1e-12 relative). gloo on CPU,
nccl when CUDA is available.
"""

from __future__ import annotations

import os

import numpy as np

from bncheck.errors import InputError
from bncheck.numerics import Moments


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE are not integers") from None


def init() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)


def allgather_moments(local: dict[str, Moments]) -> dict[str, Moments]:
    """Every rank's moments for every layer, merged in rank order (same result on every rank)."""
    import torch
    import torch.distributed as dist

    names = sorted(local)
    gathered_names: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_names, names)
    all_names = sorted({n for ns in gathered_names for n in (ns or [])})
    merged: dict[str, Moments] = {}
    for name in all_names:
        m = local.get(name)
        vec = torch.from_numpy(m.to_array()) if m is not None else None
        size = torch.tensor([0 if vec is None else vec.numel()], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        width = int(max(s.item() for s in sizes))
        buf = torch.zeros(width, dtype=torch.float64)
        if vec is not None:
            buf[: vec.numel()] = vec
        parts = [torch.zeros_like(buf) for _ in sizes]
        dist.all_gather(parts, buf)
        items = [
            Moments.from_array(p[: int(s.item())].numpy().astype(np.float64))
            for p, s in zip(parts, sizes, strict=True)
            if int(s.item())
        ]
        merged[name] = Moments.merge_all(items)
    return merged


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
