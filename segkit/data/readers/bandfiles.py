"""One image stored as one file per band, as Sentinel-2 and Landsat users hold their chips
(`chip/B02.tif, B03.tif, B04.tif, B08.tif`): a folder read as the stack of its single-band files, in the
order `data.bands` names them. Each file is read by its own reader; they must agree on size, type and
georeference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segkit.data.readers.base import Raster, Window
from segkit.errors import DataError


def band_files(folder: Path, names: Sequence[str], is_raster) -> list[Path] | None:
    """The file of each named band in `folder` (stem = name), or None when one is missing."""
    try:
        found = {p.stem: p for p in Path(folder).iterdir() if p.is_file() and is_raster(p)}
    except OSError:
        return None
    files = [found.get(name) for name in names]
    return None if any(f is None for f in files) else files  # type: ignore[return-value]


class BandFiles(Raster):
    """The stack of `parts` (open single-band rasters), one band per part, named `names`."""

    def __init__(self, path: Path, names: Sequence[str], parts: list[Raster]) -> None:
        self.path, self.band_names, self.parts = Path(path), tuple(names), parts
        first = parts[0]
        for part in parts[1:]:
            theirs = (part.height, part.width, np.dtype(part.dtype), part.crs, part.transform)
            ours = (first.height, first.width, np.dtype(first.dtype), first.crs, first.transform)
            if theirs != ours:
                raise DataError(f"{part.path}: {part.width}x{part.height} {np.dtype(part.dtype)}"
                                f"{' on another grid' if theirs[:3] == ours[:3] else ''}, but {first.path.name} "
                                f"is {first.width}x{first.height} {np.dtype(first.dtype)}: the band files of one "
                                "image must share size, type and georeference. Fix: resample the bands to one "
                                "grid (e.g. gdalwarp -tr) and save them with one type.")
        bad = next((p for p in parts if p.bands - len(p.alpha) != 1 or p.palette is not None), None)
        if bad is not None:
            raise DataError(f"{bad.path}: {bad.bands} band(s); a band file holds exactly one band. Fix: split it "
                            "into one file per band, or use it as an image of its own.")
        nodata = {p.nodata for p in parts}
        if len(nodata) > 1:
            raise DataError(f"{self.path}: its band files declare different nodata values {sorted(map(str, nodata))}. "
                            "Fix: give them one nodata value, or set data.nodata.")
        self.height, self.width, self.bands, self.dtype = first.height, first.width, len(parts), first.dtype
        self.nodata, self.crs, self.transform = first.nodata, first.crs, first.transform
        self.lossy = any(p.lossy for p in parts)

    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        return np.concatenate([self.parts[b].read(window, [0]) for b in bands], axis=2)

    def close(self) -> None:
        for part in self.parts:
            part.close()
