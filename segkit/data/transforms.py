"""Augmentation and normalisation pipelines (albumentations).

Masks travel through the geometric transforms as one (H, W, C + 1) uint8 stack: the
C multi-hot class layers and a last 'valid' layer. Padding fills it with zeros, so
padded pixels come out invalid and are ignored by the loss and the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2

from segkit.config import AugmentConfig


def normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    """Input normalisation of float images in [0, 1]; training and inference share it."""
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0, p=1.0)


def train_transform(crop: int, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Random crop (padding small images) to `crop`, flips, 90-degree turns, light jitter."""
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
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=aug.color),
        normalize(mean, std),
    ]
    return A.Compose(steps)


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """No augmentation: normalisation only, full image."""
    return A.Compose([normalize(mean, std)])
