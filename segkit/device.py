"""Choosing the device and the autocast precision, shared by training and prediction."""

from __future__ import annotations

import functools

import torch

from segkit.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but no CUDA GPU is visible. Fix: --device cpu or auto.")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """bf16 where supported, fp16 on older GPUs; off on CPU unless asked for (then bf16)."""
    if amp == "auto":
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


@functools.lru_cache(maxsize=256)
def channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) float32 `values` on `device`, made once per device and read-only: made per call, it is a
    blocking host-to-device copy in every training step on CUDA."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
