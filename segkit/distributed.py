"""Thin helpers over torch.distributed for runs launched by torchrun (DDP).

Without torchrun every helper is the single-process identity, so the training loop
reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as torch_dist
from torch import nn


def launched() -> bool:
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes: nccl on CUDA, gloo on CPU."""
    if launched() and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def device_for_rank(device: torch.device) -> torch.device:
    """Initialise DDP if launched; each rank takes its LOCAL_RANK GPU."""
    setup(device)
    if device.type == "cuda" and active():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, torch_dist.ReduceOp.SUM)


def all_reduce_max(values: Sequence[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, torch_dist.ReduceOp.MAX)


def _all_reduce(values: Sequence[float], device: torch.device, op: torch_dist.ReduceOp) -> list[float]:
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not active():
        return t
    moved = t.to(device)
    torch_dist.all_reduce(moved)
    return moved.cpu()


def barrier() -> None:
    if active():
        torch_dist.barrier()
