"""torch.distributed for the training loops: one process per device, launched by ``torchrun``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run
is a single process and nothing here touches torch.distributed. The backend is nccl when the
process has a GPU and gloo otherwise (CPU runs and the tests). Only rank 0 logs and writes
checkpoints; the others wait at a barrier so no rank runs ahead of a checkpoint it may resume from.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmct.conventions.runtime import torch_device, torchrun_rank


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_kind: str = "cpu", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op when there is none);
    the environment is read by the one reader, fmct.conventions.runtime.torchrun_rank."""
    place = torchrun_rank()
    if place.world <= 1:
        return DistInfo()
    rank, world, local = place.rank, place.world, place.local_rank
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            local = local % max(torch.cuda.device_count(), 1)
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local)


def device_for(info: DistInfo, requested: str = "auto") -> torch.device:
    """The device of this process: its local GPU under torchrun, else the requested one (checked)."""
    device = torch_device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return device


def process_group_kind(requested: str = "auto") -> str:
    """'cuda' when this run's processes use GPUs (NCCL), else 'cpu' (gloo)."""
    return torch_device(requested).type


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around module when there is more than one process, else module itself."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def distributed_sampler(dataset, info: DistInfo, seed: int):
    """Shuffles by (seed, epoch) and gives each rank a disjoint, equal share (drop_last)."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=True)
