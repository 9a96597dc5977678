"""One image as the network sees it, from a file or an array: bands selected, channel count
checked, no-data known, read by window. Training, evaluation and prediction all read images
through this, so a pixel means the same input everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segkit.data.io import check_channels, image_bands, image_pixels, match_channels, no_data
from segkit.data.normalize import image_stats
from segkit.data.readers import Geometry, Raster, Window, band_names, open_raster


class ImageSource:
    """Pixels (h, w, C) in their stored type; `nodata` from the config if given, else the file's.

    A slice of a volume also carries its case's normalisation parameters (`params`, (4, C): the whole case is
    its reference, not the slice) and the voxels outside the body (`outside`, (h, w) bool)."""

    def __init__(self, height: int, width: int, dtype: np.dtype, nodata: float | None, name: str,
                 geometry: Geometry | None = None, raster: Raster | None = None, array: np.ndarray | None = None,
                 channels: int | None = None, bands: Sequence[int | str] | None = None,
                 params: np.ndarray | None = None, outside: np.ndarray | None = None) -> None:
        self.height, self.width, self.dtype, self.nodata, self.name = height, width, np.dtype(dtype), nodata, name
        self.geometry = geometry or Geometry(height, width)
        self._raster, self._array, self.channels, self.bands = raster, array, channels, bands
        self.params, self.outside = params, outside

    @classmethod
    def open(cls, path: str | Path, channels: int | None, bands: Sequence[int | str] | None = None,
             nodata: float | None = None) -> ImageSource:
        raster = open_raster(path, band_names(bands))
        try:
            check_channels(len(image_bands(raster, bands)), channels, path)  # from the header, before any decode
        except Exception:
            raster.close()
            raise
        dtype = pixel_dtype(raster)
        return cls(raster.height, raster.width, dtype, raster.nodata if nodata is None else nodata,
                   str(path), raster.geometry, raster=raster, channels=channels, bands=bands)

    @classmethod
    def from_array(cls, array: np.ndarray, channels: int | None, nodata: float | None = None,
                   name: str = "image", geometry: Geometry | None = None, params: np.ndarray | None = None,
                   outside: np.ndarray | None = None) -> ImageSource:
        """An in-memory (H, W[, C]) image; its channels must already be the model's (or 1 for a 3-channel model)."""
        if array.ndim == 2:
            array = array[:, :, None]
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        array = match_channels(array, channels, name)
        return cls(array.shape[0], array.shape[1], array.dtype, nodata, name, geometry, array=array,
                   channels=channels, params=params, outside=outside)

    def crop(self, window: Window, per_sample: bool) -> ImageSource:
        """A window of this image as a source of its own, normalised as the whole image (`per_sample`: with
        the whole image's parameters)."""
        t, l, h, w = window
        return ImageSource.from_array(self.read(window), self.channels, self.nodata, self.name,
                                      params=self.stats() if per_sample else None,
                                      outside=None if self.outside is None else self.outside[t:t + h, l:l + w])

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def path(self) -> Path | None:
        return self._raster.path if self._raster is not None else None

    def read(self, window: Window | None = None) -> np.ndarray:
        if self._array is not None:
            if window is None:
                return self._array
            t, l, h, w = window
            return self._array[t:t + h, l:l + w]
        assert self._raster is not None
        return image_pixels(self._raster, self.channels, self.bands, window)

    def nodata_mask(self, pixels: np.ndarray) -> np.ndarray | None:
        """(h, w) True where a pixel is no-data (see `segkit.data.io.no_data`); None when none can be."""
        return no_data(pixels, self.nodata)

    def outside_mask(self, window: Window | None = None) -> np.ndarray:
        """(h, w) bool: pixels outside the body (none, unless the source is a slice of a volume)."""
        if self.outside is None:
            h, w = (self.height, self.width) if window is None else window[2:]
            return np.zeros((h, w), bool)
        return self.outside if window is None else self.outside[window[0]:window[0] + window[2],
                                                                  window[1]:window[1] + window[3]]

    def stats(self) -> np.ndarray:
        """(4, C) normalisation parameters of a per-sample mode: the given ones (a volume slice: its case's),
        else the whole image's per_image statistics (sampled when huge)."""
        if self.params is None:
            self.params = image_stats(self.read, self.height, self.width, self.nodata)
        return self.params

    def close(self) -> None:
        if self._raster is not None:
            self._raster.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pixel_dtype(raster: Raster) -> np.dtype:
    """The type of the pixels a raster gives: a palette image reads as its uint8 colours."""
    return np.dtype(np.uint8) if raster.palette is not None else np.dtype(raster.dtype)
