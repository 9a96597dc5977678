"""Reading images and raw masks from disk, and writing files atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from segkit.errors import DataError

Image.MAX_IMAGE_PIXELS = None  # whole-slide and aerial images are legitimately huge; memory is planned for

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _read_array(path: Path) -> tuple[np.ndarray, str | None]:
    """Raw pixel array and PIL mode (None for TIFFs read by tifffile)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
                arr = arr.transpose(1, 2, 0)
            return arr, None
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                return np.array(im), "P"
            if mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im).astype(np.uint16), mode
            if mode == "I":
                return np.array(im), mode
            if mode not in ("L", "RGB", "RGBA", "LA", "1", "F"):
                im = im.convert("RGB")
                mode = "RGB"
            return np.array(im), mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (UnidentifiedImageError, OSError, ValueError, tifffile.TiffFileError) as err:
        raise DataError(f"{path}: cannot read this image ({err}). Fix: replace the file or remove it.") from None


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Scale integer pixels to [0, 1] by their type's range (8-bit /255, 16-bit /65535)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(max(arr.max(initial=1), 1))
        return arr.astype(np.float32) / (255.0 if top <= 255 else 65535.0 if top <= 65535 else top)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def read_image(path: Path, channels: int = 3) -> np.ndarray:
    """An image as (H, W, channels), keeping 8- or 16-bit depth.

    Grey is repeated to RGB, RGBA loses alpha, palette images go through their palette
    (an inverted grey palette comes out right), RGB becomes grey for 1-channel models.
    """
    arr, mode = _read_array(path)
    if mode == "P":
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    if mode == "1":
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"{path}: image has shape {arr.shape}; expected height x width (x channels).")
    if arr.shape[2] in (2, 4):  # LA / RGBA: drop alpha
        arr = arr[:, :, :-1]
    if arr.shape[2] > 4:
        raise DataError(f"{path}: {arr.shape[2]} channels; segkit reads grey, RGB and RGBA images.")
    if channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 1 and arr.shape[2] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = (arr.astype(np.float32) @ weights).round().astype(arr.dtype)[:, :, None]
    return np.ascontiguousarray(arr)


def read_mask_raw(path: Path, as_palette_index: bool) -> np.ndarray:
    """A mask's values: (H, W) for grey/palette masks, (H, W, 3) for colour masks.

    Palette PNGs give their indices when `as_palette_index` (index masks saved with a
    palette, as in VOC), and their displayed grey/colour otherwise.
    """
    arr, mode = _read_array(path)
    if mode == "P" and not as_palette_index:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
        arr = rgb[:, :, 0] if (rgb[:, :, :1] == rgb).all() else rgb
    if mode == "1":
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[:, :, :-1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return arr


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) without decoding the pixels, where the format allows."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_image(path).shape[:2]
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read this image ({err}). Fix: replace the file or remove it.") from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: standard JSON has no NaN (a class with no score)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    """Standard JSON (no NaN), written atomically."""
    write_bytes(Path(path), json.dumps(_finite(obj), indent=2, allow_nan=False, default=float).encode())


def write_png(path: Path, arr: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a PNG atomically; with `palette`, an index PNG that opens as a coloured picture."""
    im = Image.fromarray(arr)
    if palette is not None and arr.dtype == np.uint8 and arr.ndim == 2:
        im.putpalette(palette)  # an L image becomes P with its values kept
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
