"""What every reader gives: a raster's header (size, bands, dtype, alpha, nodata, geometry) and
windowed reads of its pixels in their stored type. Nothing here knows a file format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Window(NamedTuple):
    """Rows [top, top + height) and columns [left, left + width) of a raster."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Geometry:
    """Where a raster's pixels lie: its size, and for georeferenced rasters the CRS (WKT) and the
    affine transform (a, b, c, d, e, f) from pixel to map coordinates."""

    height: int
    width: int
    crs: str | None = None
    transform: tuple[float, ...] | None = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def window_transform(self, window: Window) -> tuple[float, ...] | None:
        """The transform of a window's own pixel grid."""
        if self.transform is None:
            return None
        a, b, c, d, e, f = self.transform
        return (a, b, c + a * window.left + b * window.top, d, e, f + d * window.left + e * window.top)


class Raster(ABC):
    """An open raster file. `read` returns (height, width, bands) in the stored dtype; band
    indices are 0-based here (the config's `data.bands` is 1-based, as GDAL counts)."""

    path: Path
    height: int
    width: int
    bands: int
    dtype: np.dtype
    alpha: tuple[int, ...] = ()  # bands the file itself declares to be alpha
    nodata: float | None = None
    lossy: bool = False  # JPEG-like compression: values near an edge are noisy
    palette: np.ndarray | None = None  # (N, 3) uint8 colours of a palette (indexed) image
    crs: str | None = None
    transform: tuple[float, ...] | None = None

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.height, self.width, self.crs, self.transform)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def full(self) -> Window:
        return Window(0, 0, self.height, self.width)

    def read(self, window: Window | None = None, bands: Sequence[int] | None = None) -> np.ndarray:
        """Pixels of `window` (default: all) for `bands` (default: all), as (h, w, len(bands))."""
        window = window or self.full()
        if (window.top < 0 or window.left < 0 or window.height < 1 or window.width < 1
                or window.top + window.height > self.height or window.left + window.width > self.width):
            raise ValueError(f"{self.path}: window {tuple(window)} outside the {self.width}x{self.height} raster")
        bands = list(range(self.bands)) if bands is None else list(bands)
        return np.ascontiguousarray(self._read(window, bands))

    @abstractmethod
    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        """(h, w, len(bands)) pixels of a checked window."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
