"""Data-parallel training across processes: DDP under ``torchrun``, the same code path on CPU with gloo.

How a run is launched:

    python -m core train --config run/config.yaml                              # one process
    torchrun --nproc_per_node 4 -m core train --config run/config.yaml         # 4 GPUs, DDP over NCCL
    torchrun --nproc_per_node 2 -m core train --config run/config.yaml         # no GPU: 2 CPU processes, gloo

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``init`` reads them. Every rank builds the same model and
method from the same seed and walks the same batch order; of the ``grad_accum · world_size`` micro-batches of
one optimiser step, rank r takes the r-th slice of ``grad_accum``. The global batch is therefore
``batch_size · grad_accum · world_size``, and the gradient equals the single-process gradient of that batch
(DDP all-reduces in backward). Only rank 0 writes files (metrics, status, checkpoints, the adapter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """The process's place in a ``torchrun`` launch (rank 0 of 1 when not launched by torchrun)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device: torch.device) -> DistInfo:
    """Join the process group when launched with more than one process; pick this rank's GPU.

    Returns the DistInfo; ``device`` for CUDA becomes ``cuda:<local_rank>`` (see ``rank_device``)."""
    info = from_env()
    if info.enabled and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        torch_dist.init_process_group(backend=backend)
    return info


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op in a single process)."""
    if info.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (used to agree on a stop request)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
