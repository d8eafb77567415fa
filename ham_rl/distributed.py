"""Data-parallel learners under ``torchrun``: the process group, gradient and buffer averaging, gathering to rank 0.

``torchrun --nproc_per_node=N -m ham_rl.train ...`` starts N ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set by
torchrun); each steps its own envs, and every minibatch's gradients are averaged over the ranks before the optimizer
step (one all-reduce of all gradients: gloo on CPU, NCCL on GPU), so the parameters stay identical on every rank.
Without torchrun (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DataParallel", "init", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` as torchrun set them; ``(0, 1)`` outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> DataParallel | None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); None for a single process."""
    rank, size = world()
    if size == 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel(rank, size, device)


class DataParallel:
    """The collective operations the trainer needs, for ``size`` ranks of which this is ``rank``."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device

    def gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks (a missing gradient counts as zero)."""
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def average_(self, grad: torch.Tensor) -> None:
        """Replace ``grad`` (the trainer's flat gradient, ``agents.flat_params``) by its mean over the ranks, in place."""
        dist.all_reduce(grad)
        grad /= self.size

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a float tensor over the ranks."""
        value = value.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(value)
        return value / self.size

    def buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers (HAM's threshold, moved by each rank's own cache fraction)."""
        for b in module.buffers():
            if b.is_floating_point() and torch.isfinite(b).all():
                b.copy_(self.mean(b).to(b.dtype))

    def broadcast(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` on rank 0 (rank order), None on the others."""
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
