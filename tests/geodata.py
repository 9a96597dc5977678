"""Multi-band georeferenced datasets built from real imagery, for tests and benchmarks.

The SpaceNet sample (tests/data/spacenet: a 900 x 900 uint16 GeoTIFF with 11-bit content,
EPSG:32616, and its building mask) is cut into tiles, each a GeoTIFF on its own window of the
original grid, with derived bands added to reach N bands (real pixels, derived bands stated:
smoothed, texture, edges). The sample has no no-data pixels; its lower-right corner (row + column
>= NODATA_CORNER) is set to no-data (0) in every band, as the edge of a swath would be, so that
no-data reaches the test tiles. The tiles are written at test time; only the sample is kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.windows import Window, transform as window_transform

from samples import SPACENET

NODATA_CORNER = 1500
"""Source pixels with row + column >= this are no-data in the tiles: half of the last tile, none of the first six."""


def derived_bands(raw: np.ndarray, n: int) -> np.ndarray:
    """(H, W, n) uint16: the real band first, then bands derived from it (blur, local std, edges, ...)."""
    f = raw.astype(np.float32)
    extra = [
        cv2.GaussianBlur(f, (0, 0), 2.0),
        np.sqrt(np.maximum(cv2.blur(f * f, (7, 7)) - cv2.blur(f, (7, 7)) ** 2, 0)) * 4,
        np.hypot(cv2.Sobel(f, cv2.CV_32F, 1, 0), cv2.Sobel(f, cv2.CV_32F, 0, 1)) / 4,
        cv2.GaussianBlur(f, (0, 0), 6.0),
        cv2.morphologyEx(f, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)),
        np.abs(cv2.Laplacian(f, cv2.CV_32F)) * 2,
        2047 - np.minimum(f, 2047),
    ]
    bands = [f] + extra[: n - 1]
    return np.clip(np.stack(bands, axis=2), 0, 65535).astype(np.uint16)


def make_geo_dataset(root: Path, bands: int, tile: int = 300, splits: dict[str, int] | None = None,
                     mask_as_geotiff: bool = True) -> Path:
    """ROOT/<split>/{images,masks}/tile_<r>_<c>.tif from the SpaceNet sample; returns ROOT.

    Tiles are assigned to splits in order (e.g. {"train": 6, "test": 3} for a 900 x 900 source
    cut in 300 x 300 tiles). Images keep the source's CRS and nodata (0); masks are {0, 255}."""
    with rasterio.open(SPACENET / "images" / "buildings.tif") as src:
        raw, crs, transform, nodata = src.read(1), src.crs, src.transform, src.nodata
    with warnings.catch_warnings():  # the sample's mask file carries no georeference of its own
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        m = rasterio.open(SPACENET / "masks" / "buildings.tif")
    with m:
        mask = m.read(1)
    h, w = raw.shape
    cells = [(r, c) for r in range(0, h - tile + 1, tile) for c in range(0, w - tile + 1, tile)]
    splits = splits or {"train": len(cells)}
    names = [s for s, k in splits.items() for _ in range(k)]
    stack = derived_bands(raw, bands)
    void = (raw == nodata) | (np.add.outer(np.arange(h), np.arange(w)) >= NODATA_CORNER)
    for (r, c), split in zip(cells, names):
        win = Window(c, r, tile, tile)
        t = window_transform(win, transform)
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        img = stack[r:r + tile, c:c + tile]
        img = np.where(void[r:r + tile, c:c + tile, None], nodata, img).astype(np.uint16)
        with rasterio.open(root / split / "images" / f"tile_{r}_{c}.tif", "w", driver="GTiff", width=tile,
                           height=tile, count=bands, dtype="uint16", crs=crs, transform=t, nodata=nodata,
                           compress="lzw", tiled=True, blockxsize=128, blockysize=128) as dst:
            dst.write(img.transpose(2, 0, 1))
        m = mask[r:r + tile, c:c + tile]
        if mask_as_geotiff:
            with rasterio.open(root / split / "masks" / f"tile_{r}_{c}.tif", "w", driver="GTiff", width=tile,
                               height=tile, count=1, dtype="uint8", crs=crs, transform=t,
                               compress="deflate") as dst:
                dst.write(m[None])
        else:
            cv2.imwrite(str(root / split / "masks" / f"tile_{r}_{c}.png"), m)
    return root
