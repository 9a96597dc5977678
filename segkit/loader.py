"""Feeding training: the seeded per-epoch sampler (resumable mid-epoch, a share per rank) and the loader's
worker processes (how many, and how they live through stop signals)."""

from __future__ import annotations

import math
import os
import signal

import cv2
import torch
from torch.utils.data import DataLoader, Sampler

from segkit import distributed as dist
from segkit.data.dataset import SegmentationDataset


class EpochSampler(Sampler):
    """Yields (epoch, index): a seeded permutation per epoch, cut into this rank's share.

    The epoch travels with each index so that persistent workers augment by epoch, and
    `num_samples` can exceed the dataset (tiny datasets, fixed steps per epoch). `skip` leaves out
    the first samples of this rank's share: a run resumed mid-epoch sees the rest of the same order.
    """

    def __init__(self, n: int, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.num_samples, self.seed, self.rank, self.world = n, num_samples, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        total = self.num_samples * self.world
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(total / self.n))])[:total]
        return iter([(self.epoch, int(i)) for i in order[self.rank::self.world][self.skip:]])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EpochKeyed(torch.utils.data.Dataset):
    """Adapts SegmentationDataset to (epoch, index) keys."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


def _survive_once(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _init_worker(_: int) -> None:
    """Data workers decode and augment one sample at a time; OpenCV's own thread pool in every
    worker would only compete with the model for the cores.

    Schedulers (SIGTERM) and Ctrl-C (SIGINT) signal every process of a job; a worker killed by it
    would make the loader raise in the main process before it could stop in order and write last/.
    So workers ignore SIGINT and survive one SIGTERM; `stop_workers` ends them, and a second
    SIGTERM (multiprocessing's terminate) still does."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _survive_once)


def stop_workers(loader: DataLoader) -> None:
    """End a loader's persistent workers now, whatever stopped training: left to interpreter exit,
    they would be sent one SIGTERM, which they survive (see `_init_worker`)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def loader_workers(workers: int | str, device: torch.device) -> int:
    """`auto`: no worker processes on CPU, where a sample costs ~2 ms against a step of a second and
    workers only take cores from the model; this rank's share of the cores - 1 (at most 8) feeding a GPU."""
    if workers != "auto":
        return int(workers)
    cores = (os.cpu_count() or 2) // dist.local_world_size()  # ranks on one node share its cores
    return min(8, max(1, cores - 1)) if device.type == "cuda" else 0


def loader_kwargs(workers: int, device: torch.device) -> dict:
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            **({"prefetch_factor": 4, "worker_init_fn": _init_worker} if workers > 0 else {})}
