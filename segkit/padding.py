"""What fills the border when prediction pads an image to the network's input size, along each axis by what
training showed the network there (`mirrored`):

- an axis shorter than the training crop was padded in training, centred, with zeros in the normalised input
  (`data.transforms`): prediction pads it the same way. A 35 x 52 hippocampus slice predicted with its anatomy
  mirrored into that border instead lost two thirds of its Dice;
- an axis at least as long as the crop never had a border in training (every crop lay inside the image):
  prediction continues the image by its mirror. Same checkpoints, sides not multiples of 32: three nuclei
  models scored test Dice 0.888 / 0.714 / 0.823 mirrored against 0.858 / 0.688 / 0.801 in zeros, DSB 2018
  (100 validation images) 0.894 against 0.879, CamVid (101 validation images, 360 rows) 0.465 against 0.459;
  overlapping windows inside the image, at 2-4x the compute, scored below the mirror each time (0.878 / 0.687 /
  0.817, 0.887).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRIDE = 32
"""Input sizes must be multiples of this (five 2x downsamplings in the encoders segkit builds)."""


def to_stride(size: int) -> int:
    """`size` rounded up to a multiple of the stride."""
    return -(-size // STRIDE) * STRIDE


def centred(size: int, target: int) -> tuple[int, int]:
    """(before, after): the padding that centres `size` in `target` (the odd pixel after)."""
    pad = target - size
    return pad // 2, pad - pad // 2


def mirrored(size: int, crop: int | None) -> bool:
    """Whether padding along an axis of `size` pixels mirrors the image (else zeros): where training cropped
    inside the image (size >= crop; with `augment.scale` below 1, a side a little longer than the crop was
    sometimes shrunk below it and padded, but mostly cropped inside). A checkpoint that does not record its
    crop gets zeros."""
    return crop is not None and size >= crop


def pad_centred(x: torch.Tensor, height: int, width: int, mirror: tuple[bool, bool] = (False, False)
                ) -> tuple[torch.Tensor, int, int]:
    """A normalised (N, C, H, W) batch padded to height x width, centred; with the image's top and left offsets
    in it (crop the output back from there). Zeros, or along a `mirror` axis (rows, columns) the image mirrored
    at its edge (edge pixel not repeated), as far as the image reaches and zeros beyond."""
    (top, bottom), (left, right) = centred(x.shape[-2], height), centred(x.shape[-1], width)
    x = _pad_axis(x, -2, top, bottom, mirror[0])
    return _pad_axis(x, -1, left, right, mirror[1]), top, left


def _pad_axis(x: torch.Tensor, dim: int, before: int, after: int, mirror: bool) -> torch.Tensor:
    def pad(b: int, a: int) -> tuple[int, ...]:
        return (b, a, 0, 0) if dim == -1 else (0, 0, b, a)

    if mirror and (before or after) and x.shape[dim] > 1:
        reach = x.shape[dim] - 1
        near_before, near_after = min(before, reach), min(after, reach)
        x = F.pad(x, pad(near_before, near_after), mode="reflect")
        before, after = before - near_before, after - near_after
    return F.pad(x, pad(before, after)) if before or after else x
