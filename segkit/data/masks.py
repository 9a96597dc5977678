"""Mask encodings -> multi-hot labels (H, W, C) uint8 and a valid-pixel mask (H, W) bool.

Every format ends in the same head-neutral form; the head then decides what target
that is (an index map for softmax, channels for sigmoid) and whether it can be one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segkit.data.io import read_mask_raw
from segkit.errors import ConfigError, DataError

Labels = tuple[np.ndarray, np.ndarray]


def _cut(top: int) -> int:
    """Binary threshold for masks whose largest value is `top`: {0,1} at 0.5, 8-bit at 127, deeper at top/2."""
    return 0 if top <= 1 else 127 if top <= 255 else top // 2


def bright(arr: np.ndarray) -> np.ndarray:
    """Foreground of a binary mask by threshold (see `_cut`).

    A threshold, not equality, so JPEG noise around 0 and 255 lands on the right side, and
    12- or 16-bit masks work whatever their largest value.
    """
    return arr > _cut(int(arr.max(initial=0)))


def _grey(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        if not (arr == arr[:, :, :1]).all():
            raise DataError(
                f"{path}: a binary mask in colour. Fix: save it grey, or use `data.mask: color` with data.colors."
            )
        arr = arr[:, :, 0]
    return arr


class MaskFormat(ABC):
    """One on-disk mask encoding."""

    multilabel = False

    def __init__(self, classes: Sequence[str], ignore_index: int | None = None,
                 foreground_value: int | None = None, colors: Sequence[Sequence[int]] | None = None) -> None:
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.foreground_value = foreground_value
        self.colors = colors

    def _valid(self, arr: np.ndarray) -> np.ndarray:
        if self.ignore_index is None:
            return np.ones(arr.shape[:2], dtype=bool)
        hit = arr == self.ignore_index
        return ~(hit.all(axis=2) if hit.ndim == 3 else hit)

    def _foreground(self, arr: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Foreground among the valid pixels; the ignore value never sets the threshold."""
        arr = np.where(valid, arr, 0)
        if self.foreground_value is None:
            return bright(arr) & valid
        cut = _cut(max(int(arr.max(initial=0)), self.foreground_value))
        # foreground_value says which side of the threshold is foreground (ISBI membranes = 0: the dark side)
        return (arr > cut if self.foreground_value > cut else arr <= cut) & valid

    @abstractmethod
    def read(self, mask: Path | Mapping[str, Path]) -> Labels:
        """Multi-hot labels and valid mask of one image's mask file(s)."""


class BinaryMasks(MaskFormat):
    """One grey mask per image: `[fg]` or `[background, fg]`."""

    def read(self, mask: Path) -> Labels:
        arr = _grey(read_mask_raw(mask, as_palette_index=False), mask)
        valid = self._valid(arr)
        fg = self._foreground(arr, valid)
        layers = [fg] if len(self.classes) == 1 else [~fg & valid, fg]
        return np.stack(layers, axis=2).astype(np.uint8), valid


class IndexMasks(MaskFormat):
    """Class indices 0..C-1 per pixel, optionally an ignore value."""

    def read(self, mask: Path) -> Labels:
        arr = read_mask_raw(mask, as_palette_index=True)
        if arr.ndim == 3:
            raise DataError(f"{mask}: an RGB mask, but data.mask is 'index'. Fix: use `data.mask: color` "
                            "with data.colors, or save class indices as a grey PNG.")
        valid = self._valid(arr)
        n = len(self.classes)
        bad = valid & (arr >= n)
        if bad.any():
            values = sorted(int(v) for v in np.unique(arr[bad]))[:8]
            raise DataError(
                f"{mask}: values {values} are outside the {n} classes 0..{n - 1} and not the ignore index "
                f"({self.ignore_index}). Fix: set data.ignore_index, name more classes in data.classes, "
                "or use `data.mask: binary` for 0/255 masks."
            )
        labels = (arr[:, :, None] == np.arange(n, dtype=arr.dtype)).astype(np.uint8)
        return labels, valid


class ColorMasks(MaskFormat):
    """RGB colours mapped to classes by data.colors."""

    def read(self, mask: Path) -> Labels:
        arr = read_mask_raw(mask, as_palette_index=False)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        code = (arr[:, :, 0].astype(np.int32) << 16) | (arr[:, :, 1].astype(np.int32) << 8) | arr[:, :, 2]
        palette = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colors], dtype=np.int32)
        labels = (code[:, :, None] == palette).astype(np.uint8)
        valid = labels.any(axis=2)
        if not valid.all():
            found, counts = np.unique(code[~valid], return_counts=True)
            shown = [f"[{c >> 16}, {(c >> 8) & 255}, {c & 255}] x{n}" for c, n in zip(found[:5], counts[:5])]
            raise DataError(f"{mask}: colours not in data.colors: {', '.join(shown)}. "
                            "Fix: add them to data.colors (one per class) or repaint those pixels.")
        return labels, valid


class MultilabelMasks(MaskFormat):
    """One binary mask per class in masks/<class>/; a class without a folder is 'the rest'."""

    multilabel = True

    def read(self, mask: Mapping[str, Path]) -> Labels:
        layers: dict[str, np.ndarray] = {}
        valid = None
        for name, path in mask.items():
            arr = _grey(read_mask_raw(path, as_palette_index=False), path)
            if layers and arr.shape != next(iter(layers.values())).shape:
                raise DataError(f"{path}: size {arr.shape} differs from the other class masks of this image "
                                f"({next(iter(layers.values())).shape}). Fix: save all class masks at one size.")
            v = self._valid(arr)
            valid = v if valid is None else valid & v
            layers[name] = self._foreground(arr, v)
        assert valid is not None
        rest = [name for name in self.classes if name not in layers]
        if rest:
            layers[rest[0]] = ~np.any(list(layers.values()), axis=0)
        labels = np.stack([layers[name] & valid for name in self.classes], axis=2).astype(np.uint8)
        return labels, valid


FORMATS: dict[str, type[MaskFormat]] = {
    "binary": BinaryMasks,
    "index": IndexMasks,
    "color": ColorMasks,
    "multilabel": MultilabelMasks,
}


def build_mask_format(name: str, classes: Sequence[str], ignore_index: int | None = None,
                      foreground_value: int | None = None,
                      colors: Sequence[Sequence[int]] | None = None) -> MaskFormat:
    if name not in FORMATS:
        raise ConfigError(f"data.mask: '{name}' is not a mask format. Fix: use one of {sorted(FORMATS)}.")
    return FORMATS[name](classes, ignore_index, foreground_value, colors)
