"""Mask encodings -> multi-hot labels (H, W, C) uint8 and a valid-pixel mask (H, W) bool.

Every format ends in the same head-neutral form; the head then decides what target
that is (an index map for softmax, channels for sigmoid) and whether it can be one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segkit.data.io import MaskPixels, read_mask_raw
from segkit.data.readers import Window
from segkit.errors import ConfigError, DataError

Labels = tuple[np.ndarray, np.ndarray]

BINARY_FIXES = ("Fix: `data.binary_threshold: 128` (any value) for anti-aliased or resampled masks, "
                "`data.foreground_value: nonzero` for instance-ID masks (0 = background, 1..N = objects), "
                "or `data.mask: index` for class indices.")


def distinct(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for 8/16-bit masks (much faster than sorting a large mask)."""
    if arr.dtype in (np.uint8, np.uint16) and arr.size:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=1)).astype(arr.dtype)
    return np.unique(arr)


def midpoint(dtype: np.dtype) -> float:
    """Half of a type's range: the documented threshold of lossy (JPEG) binary masks."""
    return (np.iinfo(dtype).max + 1) / 2 if np.issubdtype(dtype, np.integer) else 0.5


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
                 foreground_value: int | str | None = None, colors: Sequence[Sequence[int]] | None = None,
                 binary_threshold: float | None = None) -> None:
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.foreground_value = foreground_value
        self.colors = colors
        self.binary_threshold = binary_threshold

    def _valid(self, px: MaskPixels) -> np.ndarray:
        arr = px.values
        valid = np.ones(arr.shape[:2], dtype=bool) if px.invalid is None else ~px.invalid
        if self.ignore_index is not None:
            hit = arr == self.ignore_index
            valid &= ~(hit.all(axis=2) if hit.ndim == 3 else hit)
        return valid

    def _foreground(self, arr: np.ndarray, valid: np.ndarray, lossy: bool, path: Path) -> np.ndarray:
        """Foreground of a binary mask, by the documented rule (README "Mask encodings"):

        - `data.binary_threshold: t`: value >= t (or < t when data.foreground_value lies below t);
        - `data.foreground_value: nonzero`: any value but 0 (instance-ID masks);
        - lossy files (JPEG) without a threshold: the midpoint of the type's range (> 127 for 8-bit);
        - lossless files: exactly 0 and one foreground value (or data.foreground_value and one other
          value); any third value is an error naming the file, never guessed away.
        """
        fg_value = self.foreground_value
        cut = self.binary_threshold if self.binary_threshold is not None else midpoint(arr.dtype) if lossy else None
        if fg_value == "nonzero":
            fg = arr != 0
        elif cut is not None:
            fg = arr < cut if fg_value is not None and fg_value < cut else arr >= cut
        else:
            values = distinct(arr[valid])
            rest = values[values != (0 if fg_value is None else fg_value)]
            if len(rest) > 1:
                shown = ", ".join(str(v) for v in values[:8].tolist()) + (" ..." if len(values) > 8 else "")
                expected = ("0 and one foreground value" if fg_value is None
                            else f"the foreground value {fg_value} and one other value")
                raise DataError(f"{path}: a binary mask holds the values [{shown}]; expected {expected}. "
                                + BINARY_FIXES)
            fg = arr != 0 if fg_value is None else arr == fg_value
        return fg & valid

    def _binary(self, path: Path, window: Window | None) -> tuple[np.ndarray, np.ndarray]:
        px = read_mask_raw(path, as_palette_index=False, window=window)
        arr = _grey(px.values, path)
        valid = self._valid(px._replace(values=arr))
        return self._foreground(arr, valid, px.lossy, path), valid

    @abstractmethod
    def read(self, mask: Path | Mapping[str, Path], window: Window | None = None) -> Labels:
        """Multi-hot labels (H, W, C) uint8 and valid mask (H, W) of one image's mask file(s), or a window."""


class BinaryMasks(MaskFormat):
    """One grey mask per image: `[fg]` or `[background, fg]`."""

    def read(self, mask: Path, window: Window | None = None) -> Labels:
        fg, valid = self._binary(mask, window)
        layers = [fg] if len(self.classes) == 1 else [~fg & valid, fg]
        return np.stack(layers, axis=2).astype(np.uint8), valid


class IndexMasks(MaskFormat):
    """Class indices 0..C-1 per pixel, optionally an ignore value."""

    def read(self, mask: Path, window: Window | None = None) -> Labels:
        px = read_mask_raw(mask, as_palette_index=True, window=window)
        arr = px.values
        if arr.ndim == 3:
            raise DataError(f"{mask}: an RGB mask, but data.mask is 'index'. Fix: use `data.mask: color` "
                            "with data.colors, or save class indices as a grey PNG.")
        valid = self._valid(px)
        n = len(self.classes)
        labels = (arr[:, :, None] == np.arange(n, dtype=arr.dtype)).astype(np.uint8)
        bad = valid & ~labels.any(axis=2)  # above the classes, negative (int16) or fractional (float): no class
        if bad.any():
            values = np.unique(arr[bad])[:8].tolist()
            raise DataError(
                f"{mask}: values {values} are outside the {n} classes 0..{n - 1} and not the ignore index "
                f"({self.ignore_index}). Fix: set data.ignore_index, name more classes in data.classes, "
                "or use `data.mask: binary` for 0/255 masks."
            )
        return labels, valid


class ColorMasks(MaskFormat):
    """RGB colours mapped to classes by data.colors."""

    def read(self, mask: Path, window: Window | None = None) -> Labels:
        px = read_mask_raw(mask, as_palette_index=False, window=window)
        arr = px.values
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        code = (arr[:, :, 0].astype(np.int32) << 16) | (arr[:, :, 1].astype(np.int32) << 8) | arr[:, :, 2]
        palette = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colors], dtype=np.int32)
        labels = (code[:, :, None] == palette).astype(np.uint8)
        known = labels.any(axis=2)
        nodata = px.invalid if px.invalid is not None else np.zeros_like(known)
        valid = known & ~nodata
        if (~known & ~nodata).any():
            found, counts = np.unique(code[~known & ~nodata], return_counts=True)
            shown = [f"[{c >> 16}, {(c >> 8) & 255}, {c & 255}] x{n}" for c, n in zip(found[:5], counts[:5])]
            raise DataError(f"{mask}: colours not in data.colors: {', '.join(shown)}. "
                            "Fix: add them to data.colors (one per class) or repaint those pixels.")
        return labels, valid


class MultilabelMasks(MaskFormat):
    """One binary mask per class in masks/<class>/; a class without a folder is 'the rest'."""

    multilabel = True

    def read(self, mask: Mapping[str, Path], window: Window | None = None) -> Labels:
        layers: dict[str, np.ndarray] = {}
        valid = None
        for name, path in mask.items():
            fg, v = self._binary(path, window)
            if layers and fg.shape != next(iter(layers.values())).shape:
                raise DataError(f"{path}: size {fg.shape} differs from the other class masks of this image "
                                f"({next(iter(layers.values())).shape}). Fix: save all class masks at one size.")
            valid = v if valid is None else valid & v
            layers[name] = fg
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
                      foreground_value: int | str | None = None,
                      colors: Sequence[Sequence[int]] | None = None,
                      binary_threshold: float | None = None) -> MaskFormat:
    if name not in FORMATS:
        raise ConfigError(f"data.mask: '{name}' is not a mask format. Fix: use one of {sorted(FORMATS)}.")
    return FORMATS[name](classes, ignore_index, foreground_value, colors, binary_threshold)
