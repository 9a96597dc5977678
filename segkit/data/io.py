"""Reading images and raw masks from disk, and writing files atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from segkit.data.readers import Raster, Window, band_names, is_raster, open_raster
from segkit.data.readers.base import system_error
from segkit.errors import DataError

log = logging.getLogger("segkit")


def is_image(path: Path) -> bool:
    """A file segkit reads as a 2-D image (see `segkit.data.readers` for the formats)."""
    return is_raster(path)


class MaskPixels(NamedTuple):
    """A mask's stored values with what the file says about them."""

    values: np.ndarray  # (H, W) grey/index, or (H, W, 3) colour
    invalid: np.ndarray | None  # (H, W) pixels the file marks as nodata
    lossy: bool  # JPEG-like: values near 0/255 are noisy


def no_data(pixels: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """(...) True where a pixel (or voxel: channels on the last axis) is no-data: every band equals `nodata`,
    or (float data) any band is NaN or infinite, which is never a measurement. None when neither can occur."""
    hit = None
    if nodata is not None:
        hit = (np.isnan(pixels) if np.isnan(nodata) else pixels == nodata).all(axis=-1)
    if pixels.dtype.kind == "f":
        bad = ~np.isfinite(pixels).all(axis=-1)
        hit = bad if hit is None else hit | bad
    return hit


def image_bands(raster: Raster, bands: Sequence[int | str] | None) -> list[int]:
    """0-based bands to use: the 1-based `bands` asked for, the band files `bands` names (a folder read as one
    image opens exactly those, in that order), or every band the file does not declare alpha (PNG RGBA, TIFF
    ExtraSamples = alpha, GDAL colour interpretation = alpha)."""
    count = 3 if raster.palette is not None else raster.bands
    if bands is None:
        return [b for b in range(count) if b not in raster.alpha]
    names = band_names(bands)
    if names is not None:
        if list(getattr(raster, "band_names", ())) != names:
            raise DataError(f"{raster.path}: one file, but data.bands {names} names band files (a folder per image "
                            "holding B02.tif, ...). Fix: give the folders, or number this file's bands in data.bands.")
        return list(range(len(names)))
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise DataError(f"{raster.path}: data.bands {list(bands)} asks for band(s) {bad}, but the image has "
                        f"{count} band(s), numbered 1..{count}. Fix: choose bands from 1..{count} in data.bands.")
    return [b - 1 for b in bands]


_told_grey: set[str] = set()


def check_channels(n: int, channels: int | None, where: object) -> None:
    """An image of `n` bands can feed a model of `channels` inputs: equal counts, or 1 band for a
    3-channel model (repeated, the one documented conversion); anything else is an error."""
    if channels is None or n == channels or (n == 1 and channels == 3):
        return
    raise DataError(f"{where}: {n} band(s), but the model takes {channels} input channel(s). "
                    f"Fix: train with data.channels: {n}, or pick {channels} band(s) with data.bands "
                    f"(e.g. {list(range(1, channels + 1))}); a band is never dropped or repeated silently.")


def match_channels(arr: np.ndarray, channels: int | None, where: object) -> np.ndarray:
    """`arr` (H, W, B) for a model of `channels` inputs (see `check_channels`); a repeated grey band is logged once."""
    n = arr.shape[2]
    check_channels(n, channels, where)
    if channels is None or n == channels:
        return arr
    if "grey" not in _told_grey:
        log.info("%s: a 1-band image for a 3-channel model; its band is repeated 3 times (logged once)", where)
        _told_grey.add("grey")
    return np.repeat(arr, 3, axis=2)


def image_pixels(raster: Raster, channels: int | None = None, bands: Sequence[int] | None = None,
                 window: Window | None = None) -> np.ndarray:
    """(h, w, C) pixels in their stored type: palette images through their palette, alpha left out,
    `bands` selected, checked against the model's `channels`."""
    use = image_bands(raster, bands)
    if raster.palette is not None:
        arr = raster.palette[raster.read(window, [0])[:, :, 0]][:, :, use]
    else:
        arr = raster.read(window, use)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return match_channels(arr, channels, raster.path)


def read_image(path: Path, channels: int | None = 3, bands: Sequence[int | str] | None = None,
               window: Window | None = None) -> np.ndarray:
    """An image (or a window of it) as (H, W, C), keeping its stored type (8/16-bit, float)."""
    with open_raster(path, band_names(bands)) as raster:
        return image_pixels(raster, channels, bands, window)


def mask_pixels(raster: Raster, as_palette_index: bool, window: Window | None = None) -> MaskPixels:
    """A mask's values: palette masks give their indices when `as_palette_index` (VOC-style index masks),
    their displayed grey/colour otherwise; declared alpha bands are left out."""
    arr = raster.read(window, [b for b in range(raster.bands) if b not in raster.alpha])
    if raster.palette is not None and not as_palette_index:
        rgb = raster.palette[arr[:, :, 0]]
        arr = rgb[:, :, :1] if (rgb[:, :, :1] == rgb).all() else rgb
    invalid = no_data(arr, raster.nodata)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.shape[2] != 3:
        raise DataError(f"{raster.path}: a mask with {arr.shape[2]} bands. Fix: save masks as one grey/index band, "
                        "or RGB colours with `data.mask: color`.")
    return MaskPixels(arr, invalid, raster.lossy)


def read_mask_raw(path: Path, as_palette_index: bool, window: Window | None = None) -> MaskPixels:
    with open_raster(path) as raster:
        return mask_pixels(raster, as_palette_index, window)


def image_size(path: Path, bands: Sequence[int | str] | None = None) -> tuple[int, int]:
    """(height, width) from the header, where the format allows, without decoding the pixels."""
    with open_raster(path, band_names(bands)) as raster:
        return raster.shape


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (before any writer thread): os.umask can only be read by setting it


def temp_beside(path: Path, suffix: str | None = None) -> Path:
    """A new empty file beside `path` (same folder: renaming it onto `path` is atomic), with the
    permissions of a plainly created file; mkstemp's own 0600 would hide outputs from everyone else."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                suffix=path.suffix if suffix is None else suffix)
    os.close(fd)
    try:
        os.chmod(name, 0o666 & ~_UMASK)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds, so a
    failure (disk full, killed process) leaves the previous file as it was. A refusal by the system
    (disk full, read-only, permission) is a DataError naming `path` and the cause."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None:
            raise
        raise system_error(path, err, "write") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
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
