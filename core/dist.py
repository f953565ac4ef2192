"""Training across processes under ``torchrun``: DDP or FSDP2, the same code paths on CPU with gloo.

How a run is launched:

    python -m core train --config run/config.yaml                              # one process
    torchrun --nproc_per_node 4 -m core train --config run/config.yaml         # 4 GPUs, DDP over NCCL
    torchrun --nproc_per_node 2 -m core train --config run/config.yaml         # no GPU: 2 CPU processes, gloo

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``init`` reads them. Every rank builds the same model and
method from the same seed and walks the same batch order; of the ``grad_accum · world_size`` micro-batches of
one optimiser step, rank r takes the r-th slice of ``grad_accum``. The global batch is therefore
``batch_size · grad_accum · world_size``, and the gradient equals the single-process gradient of that batch
(DDP all-reduces in backward). Only rank 0 writes files (metrics, status, checkpoints, the adapter).

DDP or FSDP2 (``TrainConfig.parallel``, chosen by ``strategy``). DDP keeps a whole copy of the model, its
gradients and AdamW's state on every rank. FSDP2 (``torch.distributed.fsdp.fully_shard``, one group per block
and one for the rest) keeps 1/world of each and gathers a block's weights just before it runs, so full
fine-tuning fits where 16 bytes a parameter (fp32 weight, gradient, two moments) do not fit one device. Its
reduce-scatter averages gradients over the ranks as DDP's all-reduce does, so the loop is the same. ``auto``
takes FSDP2 for methods that train the model's own tensors (full fine-tuning, Freeze: ``Method.shards_base``)
when their training state would fill more than half of one device's memory, DDP otherwise. Where a whole model
is needed (evaluation, saving), ``gathered`` builds a plain copy on every rank; checkpoints hold whole tensors
(``core.checkpoint.training_state`` gathers them, ``shard_like`` cuts a rank's piece back out on resume).

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 \
        -m core train --config run/config.yaml --parallel fsdp                        # 16 GPUs on 2 machines
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

FSDP_SHARE = 0.5  # auto: FSDP2 when the training state of what trains exceeds this share of one device


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


def device_memory(device: torch.device, info: DistInfo) -> int:
    """Bytes one rank can use: its GPU's memory, or on CPU this machine's RAM shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))


def check_parallel(setting: str, method) -> None:
    """Raise ValueError, naming the field, when ``TrainConfig.parallel`` cannot apply to ``method``."""
    if setting == "fsdp" and not method.shards_base:
        raise ValueError(
            f"TrainConfig.parallel = 'fsdp' is invalid: FSDP2 shards the model's own weights, which only full "
            f"fine-tuning and Freeze train, not {method.name}; use 'ddp' (or 'auto')"
        )


def strategy(setting: str, method, trainable: int, device: torch.device, info: DistInfo) -> str:
    """"single" (one process), "ddp" or "fsdp", from ``TrainConfig.parallel``, the method and its size.

    auto: fsdp for a method that trains the model's own tensors when their training state (fp32 weight,
    gradient and two AdamW moments: 16 bytes each) exceeds FSDP_SHARE of one device's memory; ddp otherwise."""
    check_parallel(setting, method)
    if not info.enabled:
        return "single"
    if setting != "auto":
        return setting
    big = 16 * trainable > FSDP_SHARE * device_memory(device, info)
    return "fsdp" if method.shards_base and big else "ddp"


def shard(root: nn.Module, blocks: nn.ModuleList) -> None:
    """FSDP2 over ``root``: one group per block (gathered only while it runs), the rest in the root group."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(root)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like ``param``: this rank's shard when ``param`` is an FSDP2 DTensor (every rank
    holds ``value`` whole, so each cuts its own piece), ``value`` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value.to(param.device)
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def gathered(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP-sharded Hugging Face model, every tensor whole, on every rank (a collective).
    Same names, dtypes and device; tied weights stay tied."""
    from transformers import AutoModelForCausalLM

    values = {n: whole(p).detach().clone() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    device = next(iter(values.values())).device
    plain = plain.to_empty(device=device)
    plain.tie_weights()  # to_empty gives tied modules separate tensors
    for n, p in plain.named_parameters():
        p.data = values[n]
    for n, b in plain.named_buffers():
        b.data = buffers[n].detach().clone()
    plain.requires_grad_(False)
    return plain.eval()
