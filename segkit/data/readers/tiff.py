"""TIFF (not georeferenced) through tifffile + imagecodecs: every standard compression (LZW,
deflate, zstd, JPEG, packbits, ...), BigTIFF, tiled or striped, chunky or planar, pyramids
(level 0 is read). Windows decode only the tiles/strips they touch (tifffile's zarr store)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile

from segkit.data.readers.base import Raster, Window, system_error, undecodable
from segkit.errors import DataError

_BAND_AXES = "SC"  # samples (RGB, extra samples) and channels (planes of a multiplex image)
_LOSSY = {7, 6, 34712, 33003, 33005, 34892, 50001, 50002, 34933, 34934, 22610}  # JPEG, JPEG 2000, WebP, JPEG XL ...


def check_one_image(tif: tifffile.TiffFile, path: Path) -> None:
    """Refuse a stack (Z, T, pages appended one by one): segkit reads one 2-D image, with bands, per file;
    reduced-resolution pages (pyramids) are not planes. Refuse a damaged first page too: tifffile drops
    tags it cannot read and carries on, so a truncated file could read as an image of another size."""
    page = tif.pages.first
    if not {256, 257} <= set(page.tags.keys()) or not {273, 324} & set(page.tags.keys()):
        raise DataError(f"{path}: a TIFF page without its size or pixel-data tags (damaged or truncated). "
                        "Fix: replace the file or remove it.")
    ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    if ends and max(ends) > tif.filehandle.size:
        raise DataError(f"{path}: truncated: its pixel data runs to byte {max(ends)} of a "
                        f"{tif.filehandle.size}-byte file. Fix: replace the file (copy it again) or remove it.")
    needed = math.prod(page.chunked)
    if len(page.dataoffsets) < needed:  # tifffile reads the missing ones as zeros
        raise DataError(f"{path}: damaged: its size ({page.imagelength} x {page.imagewidth}) needs "
                        f"{needed} tiles or strips of pixel data, the file lists "
                        f"{len(page.dataoffsets)}. Fix: replace the file (copy it again) or remove it.")
    series = tif.series[0]
    full_pages = [p for p in tif.pages if not (int(getattr(p, "subfiletype", 0)) & 1)]
    axes, shape = series.axes, series.shape
    stack = [a for a, n in zip(axes, shape) if a not in "YX" + _BAND_AXES and n > 1]
    band_axes = [a for a, n in zip(axes, shape) if a in _BAND_AXES and n > 1]
    many = len(tif.series) > 1 and len(full_pages) > len(series.pages)
    if many or stack or len(band_axes) > 1 or "Y" not in axes or "X" not in axes:
        what = f"{len(full_pages)} pages" if many else f"shape {dict(zip(axes, shape))}"
        raise DataError(f"{path}: a TIFF of {what} (a stack); segkit reads one 2-D image (with bands) per file. "
                        "Fix: save one file per plane, or a volume as NIfTI.")


class TiffRaster(Raster):
    """One 2-D image (with bands) per file; a stack of planes (Z, T, ...) is refused, not cut."""

    def __init__(self, path: Path, tif: tifffile.TiffFile | None = None) -> None:
        self.path = path
        self._tif = tif or tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            page = self._tif.pages.first
            check_one_image(self._tif, path)
            axes, shape = series.axes, series.shape
            band_axes = [a for a, n in zip(axes, shape) if a in _BAND_AXES and n > 1]
            self._axes = axes
            self._band_axis = band_axes[0] if band_axes else None
            self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
            self.bands = shape[axes.index(self._band_axis)] if self._band_axis else 1
            if 0 in shape:  # a damaged header: the size check in open_raster names it
                self.bands = 0
            self.dtype = np.dtype(np.uint8) if series.dtype == bool else np.dtype(series.dtype)
            extra = tuple(int(e) for e in (page.extrasamples or ()))
            first_extra = page.samplesperpixel - len(extra)
            self.alpha = tuple(first_extra + i for i, e in enumerate(extra) if e in (1, 2)) if self._band_axis else ()
            tag = page.tags.get("GDAL_NODATA")  # page.nodata would say 0 when the file states none
            self.nodata = float(str(tag.value).strip("\x00 ")) if tag is not None else None
            self.lossy = int(page.compression) in _LOSSY
            if int(page.photometric) == 3 and page.colormap is not None:
                cmap = np.asarray(page.colormap)
                self.palette = (cmap >> 8 if cmap.max() > 255 else cmap).T.astype(np.uint8)
            self._series = series
            self._zarr = None
        except DataError:
            self._tif.close()
            raise
        except Exception as err:  # tifffile raises anything on damaged tags
            self._tif.close()
            raise undecodable(path, err, "not a readable TIFF") from None

    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        try:
            arr = self._decode(window)
        except Exception as err:  # codecs raise their own types (DeflateError, LzwError, ...) on damaged data
            if isinstance(err, OSError) and err.errno is not None:  # the system refused: not the file's content
                raise system_error(self.path, err) from None
            raise undecodable(self.path, err, f"cannot decode window {tuple(window)}") from None
        expected = tuple(window.height if a == "Y" else window.width if a == "X" else n
                         for a, n in zip(self._axes, self._series.shape))
        if arr.shape != expected:  # tifffile pads or gives up quietly on some damaged files
            raise DataError(f"{self.path}: decoded shape {arr.shape} where its header says {expected}. "
                            "Fix: replace the file (it may be damaged) or remove it.")
        keep = [a for a in self._axes if a in "YX" or a == self._band_axis]
        arr = arr.reshape([n for a, n in zip(self._axes, arr.shape) if a in keep])
        order = [keep.index("Y"), keep.index("X")] + ([keep.index(self._band_axis)] if self._band_axis else [])
        arr = arr.transpose(order)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        return arr[:, :, bands]

    def _decode(self, window: Window) -> np.ndarray:
        t, l, h, w = window
        if (h, w) == (self.height, self.width):
            return self._series.asarray(level=0)
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open(self._series.aszarr(level=0), mode="r")
        index = tuple(slice(t, t + h) if a == "Y" else slice(l, l + w) if a == "X" else slice(None)
                      for a in self._axes)
        return self._zarr[index]

    def close(self) -> None:
        self._tif.close()
