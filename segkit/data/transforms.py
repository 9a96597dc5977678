"""Geometric augmentation (albumentations) of a window read for training.

Masks travel through the transforms as one (H, W, C + 2) uint8 stack: the C multi-hot class
layers, a 'valid' layer and a 'real' (not no-data) layer. Padding fills it with zeros, so
padded pixels come out invalid and are ignored by the loss and the metrics. Intensity work
(normalisation, jitter) happens after, on the tensor, in `SegmentationDataset`.
"""

from __future__ import annotations

import albumentations as A
import cv2

from segkit.config import AugmentConfig


def train_transform(crop: int, aug: AugmentConfig) -> A.Compose:
    """Random rescale (optional), padding of small images to `crop`, random crop, flips, 90-degree turns."""
    steps: list[A.BasicTransform] = []
    if aug.scale is not None:
        low, high = aug.scale
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    steps += [
        A.PadIfNeeded(min_height=crop, min_width=crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.RandomCrop(height=crop, width=crop),
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.RandomRotate90(p=aug.rotate90),
    ]
    return A.Compose(steps)


def eval_transform() -> A.Compose:
    """No augmentation: the full image."""
    return A.Compose([])
