"""What every reader gives: a raster's header (size, bands, dtype, alpha, nodata, geometry) and
windowed reads of its pixels in their stored type, and errors by cause (the system's, not the file's).
Nothing here knows a file format."""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from segkit.errors import DataError

_CAUSES = {
    errno.ENOENT: ("not found", "check the path (the file may have been moved or deleted meanwhile)"),
    errno.EACCES: ("permission denied{user}", "{fix_access}"),
    errno.EPERM: ("operation not permitted{user}", "{fix_access}"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable disk"),
    errno.ENOSPC: ("disk full (no space left on device)", "free space on that disk, or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or write to another disk"),
    errno.EISDIR: ("a folder, not a file", "point at a file"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "move that file away, or choose another path"),
    errno.EEXIST: ("a file stands where a folder is needed", "move that file away, or choose another path"),
    errno.ELOOP: ("a loop of symbolic links", "fix or remove the link"),
    errno.ENAMETOOLONG: ("the path is too long", "use shorter folder or file names"),
    errno.EIO: ("input/output error from the storage", "check the disk or network share, then run again"),
}


def system_error(path: Path, err: OSError, doing: str = "read") -> DataError:
    """A DataError that says what the operating system said (permission, disk full, read-only, ...)
    rather than blaming the file's content, naming the path and the fix."""
    what, fix = _CAUSES.get(err.errno, (err.strerror or str(err), "check the file and the disk, then run again"))
    try:
        import pwd

        user = f" for user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):  # Windows, or a uid without a name
        user = ""
    access = ("make it readable for this user (e.g. chmod a+r on the file, a+x on its folders) or run as its owner"
              if doing == "read" else "choose a folder you may write to, or change its permissions")
    return DataError(f"{path}: cannot {doing} it: {what.format(user=user)}. Fix: {fix.format(fix_access=access)}.")


def undecodable(path: Path, err: Exception, what: str = "cannot read this image") -> DataError:
    """A DataError for a file a parser or codec failed on (they raise anything on damaged data: TypeError,
    ZeroDivisionError, their own types); running out of memory is said as such."""
    if isinstance(err, MemoryError):
        return DataError(f"{path}: not enough memory to decode it (or a damaged header claims a huge size). "
                         "Fix: free memory, or save it as a tiled TIFF, which is read by window.")
    return DataError(f"{path}: {what} ({type(err).__name__}: {err}). "
                     "Fix: replace the file (it may be damaged or truncated) or remove it.")


def probe(path: Path) -> DataError | None:
    """Why the operating system will not let segkit read `path` (a DataError), or None when it can;
    for readers (GDAL) whose own errors do not say whether the file or the system is at fault."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        return system_error(path, err)
    return None


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
        arr = np.ascontiguousarray(self._read(window, bands))
        if arr.shape != (window.height, window.width, len(bands)):  # a damaged file can decode to another size
            raise DataError(f"{self.path}: decoded (rows, columns, bands) {arr.shape} where its header says "
                            f"{(window.height, window.width, len(bands))}. "
                            "Fix: replace the file (it may be damaged) or remove it.")
        return arr

    @abstractmethod
    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        """(h, w, len(bands)) pixels of a checked window."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
