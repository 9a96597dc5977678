"""Georeferenced rasters (GeoTIFF, JPEG 2000, VRT, ERDAS .img, ...) through rasterio (GDAL):
windowed reads, and the CRS, transform and nodata that outputs must keep."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window as RioWindow

from segkit.data.readers.base import Raster, Window, probe, undecodable
from segkit.errors import DataError

_LOSSY = {"jpeg", "webp", "jpeg2000", "jxl", "lerc"}
os.environ.setdefault("GDAL_CACHEMAX", "128")
"""GDAL keeps decoded blocks in a cache of 5 % of RAM by default, so streaming a huge raster would
hold up to that much; segkit reads each window once, so a small cache loses nothing (MB; set
GDAL_CACHEMAX in the environment to choose)."""


class GdalRaster(Raster):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(path)
        except RasterioIOError as err:  # GDAL says the same for a refused and a damaged file: ask the system
            raise probe(path) or DataError(f"{path}: cannot read this raster ({err}). "
                                           "Fix: replace the file or remove it.") from None
        try:
            self._header(path)
        except BaseException:
            self._ds.close()
            raise

    def _header(self, path: Path) -> None:
        ds = self._ds
        if len(set(ds.dtypes)) != 1:
            raise DataError(f"{path}: bands of different types {ds.dtypes}. Fix: save all bands with one type.")
        self.height, self.width, self.bands = ds.height, ds.width, ds.count
        self.dtype = np.dtype(ds.dtypes[0])
        self.alpha = tuple(i for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha)
        self.nodata = ds.nodata
        compress = (ds.profile.get("compress") or "").lower()
        self.lossy = compress in _LOSSY or ds.driver in ("JPEG", "WEBP") or (
            ds.driver == "JP2OpenJPEG" and not _jp2_reversible(ds))
        if ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette and self.dtype == np.uint8:
            cmap = ds.colormap(1)
            self.palette = np.array([cmap.get(i, (0, 0, 0, 0))[:3] for i in range(256)], dtype=np.uint8)
        self.crs = ds.crs.to_wkt() if ds.crs else None
        self.transform = tuple(ds.transform)[:6] if ds.crs else None

    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        t, l, h, w = window
        try:
            arr = self._ds.read([b + 1 for b in bands], window=RioWindow(l, t, w, h))
        except Exception as err:  # GDAL drivers raise their own types on damaged blocks
            raise probe(self.path) or undecodable(self.path, err, f"cannot decode window {tuple(window)}") from None
        return arr.transpose(1, 2, 0)

    def close(self) -> None:
        self._ds.close()


def _jp2_reversible(ds) -> bool:
    """Whether a JPEG 2000 file was coded with the reversible (lossless) 5/3 wavelet: its values are exact."""
    return ds.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION_REVERSIBILITY", "").upper().startswith("LOSSLESS")
