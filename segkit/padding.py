"""Where an image smaller than the network's input sits in it: centred, the rest zeros in the normalised input
(padded pixels enter the network as 0, as no-data does). Training pads a crop so (`data.transforms`), and
prediction pads to the stride (`infer`) and to an exported fixed size (`onnx_runtime`) the same way, so a
model sees at prediction the border it learned: a 35 x 52 slice trained inside a zero border and predicted
with its anatomy mirrored into that border lost two thirds of its Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centred(size: int, target: int) -> tuple[int, int]:
    """(before, after): the padding that centres `size` in `target` (the odd pixel after)."""
    pad = target - size
    return pad // 2, pad - pad // 2


def pad_centred(x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """A normalised (N, C, H, W) batch zero-padded to height x width, centred; with the image's top and left
    offsets in it (crop the output back from there)."""
    (top, bottom), (left, right) = centred(x.shape[-2], height), centred(x.shape[-1], width)
    if not (top or bottom or left or right):
        return x, 0, 0
    return F.pad(x, (left, right, top, bottom)), top, left
