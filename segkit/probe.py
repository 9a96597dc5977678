"""Measurements a plan is made from: what a training step costs in memory and time on this device
(`StepProbe`, on synthetic batches of the planned shape), and what a real run costs (`run_cost`: the data
read, real steps from the loader, validation and a checkpoint), so the plan can size batches and fit its
steps to a time budget."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segkit.config import Config
from segkit.heads import Head
from segkit.model import build_model
from segkit.validation import validation_seconds

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Start a CUDA peak-memory measurement; returns the memory allocated before it."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def available_memory(device: torch.device) -> int:
    """Bytes a training step may use: free GPU memory, or the host's available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kib = int(line.split()[1])
    except OSError:
        pass
    return (kib or 8 << 20) * 1024


def _random_target(head: Head, batch: int, crop: int) -> torch.Tensor:
    """A batch of targets, one random class per pixel (valid for either head)."""
    rng = np.random.default_rng(0)
    valid = np.ones((crop, crop), bool)
    eye = np.eye(len(head.classes), dtype=np.uint8)
    return head.expand_targets(torch.stack([head.compact_targets(eye[rng.integers(0, len(head.classes), (crop, crop))],
                                                                 valid) for _ in range(batch)]))


@dataclass(frozen=True)
class StepCost:
    """One training step at `batch`: seconds (median of the timed steps) and peak memory above the model."""

    batch: int
    seconds: float
    memory: int


class StepProbe:
    """The planned model with one encoder on `device`, built once, to time and size training steps at several
    batches and crops."""

    def __init__(self, cfg: Config, head: Head, device: torch.device, encoder: str) -> None:
        from segkit.device import amp_dtype

        self.head, self.device, self.channels = head, device, cfg.data.channels
        self.model = build_model(cfg.model.arch, encoder, head.channels, cfg.data.channels,
                                 None).to(device, memory_format=torch.channels_last)
        self.loss_fn = head.loss(cfg.train.loss).to(device)
        self.dtype = amp_dtype(device, cfg.train.amp)

    def cost(self, batch: int, crop: int, steps: int = 2) -> StepCost:
        """Forward, loss, backward and optimiser step on a random batch, as training runs them (channels-last,
        AMP where planned): one warm-up step, then `steps` timed (the median kept)."""
        device, model = self.device, self.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(batch, self.channels, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
        target = _random_target(self.head, batch, crop).to(device)
        times, saved, held = [], {}, 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        base = _reset_peak(device)
        for i in range(steps + 1):
            _sync(device)
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(x)
            loss = self.loss_fn(logits.float(), target)
            held, saved = max(held, sum(saved.values())), {}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            if i:
                times.append(time.perf_counter() - began)
        if device.type == "cuda":
            memory = max(0, torch.cuda.max_memory_allocated(device) - base)
        else:  # the host allocator keeps freed blocks, so its high-water mark says little: count what a step holds
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            memory = held + 3 * params  # activations kept for backward; gradients and AdamW's two states
        optimizer.zero_grad(set_to_none=True)
        del optimizer, x, target, logits, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return StepCost(batch, sorted(times)[len(times) // 2], memory)


@dataclass(frozen=True)
class RunCost:
    """What the real run costs on this device: building it (reading and caching the data, the model), a step
    (median, batches from the loader), a whole validation and a checkpoint, in seconds."""

    startup: float
    step: float
    validation: float
    checkpoint: float
    val_items: int


def run_cost(cfg: Config, device: torch.device, steps: int = 6, val_items: int = 8) -> RunCost:
    """Build the run of `cfg` as training does, time `steps` real steps after a warm-up one, validation on up
    to `val_items` validation samples (scaled to all of them) and one best/ + last/ checkpoint."""
    from segkit.checkpoints import Checkpointer
    from segkit.loader import stop_workers
    from segkit.train import Progress, build_run, train_step

    raw = cfg.model_dump(mode="json")
    raw["train"]["steps_per_epoch"] = steps + 1
    raw.pop("plan", None)
    began = time.perf_counter()
    run = build_run(Config.model_validate(raw), device)
    startup = time.perf_counter() - began
    times = []
    try:
        run.model.train()
        run.sampler.set_epoch(0)
        _sync(device)
        began = time.perf_counter()
        for i, item in enumerate(run.loader):
            train_step(run, run.model, item)
            _sync(device)
            now = time.perf_counter()
            if i:
                times.append(now - began)
            began = now
    finally:
        stop_workers(run.loader)
    validation = validation_seconds(run, val_items)
    with tempfile.TemporaryDirectory() as tmp:
        saver = Checkpointer(Path(tmp))
        saver.save(run.model, run.meta, True, True, Progress().state(run), [{"epoch": 0}], plot=False)
        saver.close()
        checkpoint = saver.seconds
    return RunCost(startup, sorted(times)[len(times) // 2], validation, checkpoint, len(run.data.val))
