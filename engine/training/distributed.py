"""Data-parallel training with PyTorch's own launcher, nothing home-made:

    torchrun --standalone --nproc-per-node=2 -m engine.cli train ...

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; each process joins the default process group
(gloo on the CPU, NCCL on CUDA), takes its slice of every global batch, and the SAE is wrapped
in DistributedDataParallel, which averages the gradients. The losses that are not plain means
over tokens (load balancing's f_i·P_i, AuxK's normalisation) are computed from statistics
summed over all processes with differentiable all-reduces, so N processes train the same SAE
as one process with the same global batch, up to float rounding. Rank 0 alone writes
checkpoints and logs; the others wait for it at the points where it writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place, not differentiable; returns t."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Differentiable all-reduce (sum): gradients flow back to every process's share."""
        if not self.enabled:
            return t
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)


def from_environment(device: str | None, backend: str | None = None) -> tuple[Dist, str | None]:
    """The process group torchrun describes (a single process when it describes none), and
    the device this process should use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this machine has no CUDA GPU.")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"Unknown --dist-backend '{backend}'; choose gloo or nccl.")
    if backend == "nccl" and not cuda:
        raise ConfigError("--dist-backend nccl needs CUDA GPUs; on the CPU, use gloo (the default).")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local), (f"cuda:{local}" if cuda else "cpu")
