"""Geometric augmentation of a training window: optional rescale, crop or pad to the crop size,
flips and 90-degree turns, drawn from the sample's own random generator.

Labels travel through it bit-packed (`np.packbits` of the C class layers + 'valid' + 'real'),
so a sample moves ceil((C + 2) / 8) bytes per pixel instead of C + 2. Padding fills zeros: padded
pixels come out invalid and not real. Flips and turns are numpy views; only a rescale
interpolates (linear for the image, nearest for the labels). The image is interpolated from real
pixels only (normalised by their weight), so a no-data value never leaks into a valid pixel beside
it. Intensity work (normalisation, jitter) happens later, on the device (`segkit.data.dataset.to_network`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segkit.config import AugmentConfig
from segkit.padding import centred


@dataclass(frozen=True)
class Augment:
    """`crop` None: no augmentation (whole images, validation)."""

    crop: int | None = None
    hflip: float = 0.0
    vflip: float = 0.0
    rotate90: float = 0.0
    scale: tuple[float, float] | None = None

    def __call__(self, image: np.ndarray, stack: np.ndarray, rng: np.random.Generator, classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """`stack`: `pack`'s bits of `classes` label layers + 'valid' + 'real'."""
        if self.crop is None:
            return image, stack
        if self.scale is not None:
            if image.dtype not in (np.uint8, np.uint16, np.int16, np.float32):  # what cv2.resize interpolates
                image = image.astype(np.float32)
            s = float(rng.uniform(*self.scale))
            h, w = image.shape[:2]
            size = (max(1, round(w * s)), max(1, round(h * s)))
            image = _resize_real(image, _bit(stack, classes + 1), size)
            stack = _resize(stack, size, cv2.INTER_NEAREST)
        image, stack = _crop_or_pad(image, stack, self.crop, rng)
        if rng.random() < self.hflip:
            image, stack = image[:, ::-1], stack[:, ::-1]
        if rng.random() < self.vflip:
            image, stack = image[::-1], stack[::-1]
        if rng.random() < self.rotate90:
            k = int(rng.integers(1, 4))
            image, stack = np.rot90(image, k), np.rot90(stack, k)
        return image, stack


def _resize(arr: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    out = cv2.resize(arr, size, interpolation=interpolation)
    return out.reshape(out.shape[:2] + arr.shape[2:])


def _bit(stack: np.ndarray, k: int) -> np.ndarray:
    """(h, w) bool: layer k of np.packbits' big-endian bits along the last axis."""
    return ((stack[:, :, k // 8] >> (7 - k % 8)) & 1).astype(bool)


def _resize_real(image: np.ndarray, real: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Linear interpolation from the real pixels only: sum(w * x * real) / sum(w * real) (normalised
    convolution), in the image's type; where no real pixel contributes, 0."""
    if real.all():
        return _resize(image, size, cv2.INTER_LINEAR)
    weight = _resize(real.astype(np.float32), size, cv2.INTER_LINEAR)[..., None]
    sums = _resize(np.where(real[..., None], image, 0).astype(np.float32), size, cv2.INTER_LINEAR)
    out = np.where(weight > 0, sums / np.maximum(weight, np.float32(1e-12)), np.float32(0))
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)


def _crop_or_pad(image: np.ndarray, stack: np.ndarray, crop: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A random crop x crop window; sides shorter than `crop` are padded with zeros, centred."""
    h, w = image.shape[:2]
    y = int(rng.integers(0, h - crop + 1)) if h > crop else 0
    x = int(rng.integers(0, w - crop + 1)) if w > crop else 0
    image, stack = image[y:y + crop, x:x + crop], stack[y:y + crop, x:x + crop]
    if image.shape[0] < crop or image.shape[1] < crop:
        pad = (centred(image.shape[0], crop), centred(image.shape[1], crop), (0, 0))
        image, stack = np.pad(image, pad), np.pad(stack, pad)
    return image, stack


def train_transform(crop: int, aug: AugmentConfig) -> Augment:
    """Random rescale (optional), crop or pad to `crop`, flips, 90-degree turns."""
    return Augment(crop, aug.hflip, aug.vflip, aug.rotate90, aug.scale)


def eval_transform() -> Augment:
    """No augmentation: the full image."""
    return Augment()
