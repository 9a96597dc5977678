"""In-plane resampling of volume slices to a target spacing (nnU-Net's 2-D rule): training sees every case at
the dataset's in-plane spacing, and prediction puts its outputs back on each case's own grid.

Images and logits are interpolated bilinearly (pixel centres aligned, `align_corners=False`, no anti-aliasing,
as nnU-Net resamples without a prefilter); label maps take the nearest source pixel (`nearest-exact`), so a
label value is never invented. All three go through `torch.nn.functional.interpolate`, one implementation for
training and prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RTOL = 0.01
"""A case whose in-plane spacing is within 1 % of the target on both axes is used on its own grid."""


def plane_size(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int] | None:
    """The (height, width) of a slice of `shape` (h, w) at `spacing` (mm) once resampled to `target`, or None
    when it is already there (within RTOL): the physical extent is kept, rounded half up to whole pixels."""
    if all(abs(s / t - 1) <= RTOL for s, t in zip(spacing, target)):
        return None
    h, w = (max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target))
    return h, w


def resize_slices(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w, C) raw slices -> (n, H, W, C) float32, bilinear. A NaN (no-data) voxel makes the pixels it
    contributes to NaN, so no-data stays no-data."""
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)).permute(0, 3, 1, 2)
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy())


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) label values -> (n, H, W) of the same type: each output pixel takes the value of the source
    pixel whose centre is nearest."""
    if labels.dtype.itemsize > 2 and (labels.min(initial=0) < 0 or labels.max(initial=0) >= 1 << 24):
        raise ValueError(f"label values {labels.min()}..{labels.max()} are not exact in float32")
    x = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[:, None]
    out = F.interpolate(x, size=size, mode="nearest-exact")[:, 0]
    return out.numpy().astype(labels.dtype)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) logits -> (N, C, H, W) float32 on their device, bilinear (decoded after: the class of a
    pixel is decided on the case's own grid, as nnU-Net does with its probabilities)."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
