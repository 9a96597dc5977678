"""The reader registry: one reader per file family, picked here and nowhere else.

- PNG, JPEG, BMP, GIF, WebP -> Pillow
- TIFF -> tifffile + imagecodecs, or rasterio when the TIFF carries a georeference (GeoTIFF)
- other GDAL rasters (JPEG 2000, VRT, ERDAS .img) -> rasterio
- a folder of one file per band (`data.bands` naming the files) -> their stack (`bandfiles`)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tifffile

from segkit.data.readers.base import Geometry, Raster, Window, system_error, undecodable
from segkit.errors import DataError

PILLOW_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TIFF_EXTS = (".tif", ".tiff")
GDAL_EXTS = (".jp2", ".j2k", ".vrt", ".img")
RASTER_EXTS = PILLOW_EXTS + TIFF_EXTS + GDAL_EXTS

__all__ = ["Geometry", "Raster", "Window", "RASTER_EXTS", "band_names", "is_band_folder", "is_raster",
           "open_raster"]


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_EXTS and not path.name.startswith(".")


def band_names(bands: Sequence[int | str] | None) -> list[str] | None:
    """The band file names `data.bands` gives (a list of names), or None (band numbers, or every band)."""
    return [str(b) for b in bands] if bands and all(isinstance(b, str) for b in bands) else None


def is_band_folder(path: Path, names: Sequence[str] | None) -> bool:
    """Whether `path` is one image stored as one file per band: a folder with a file for each of `names`."""
    from segkit.data.readers.bandfiles import band_files

    return bool(names) and path.is_dir() and band_files(path, names, is_raster) is not None


def open_raster(path: str | Path, names: Sequence[str] | None = None) -> Raster:
    """Open `path` with the reader of its family (a folder: the stack of the band files `names`); a
    DataError names the file and the fix."""
    path = Path(path)
    if path.is_dir():
        return _open_bands(path, names)
    try:
        raster = _open(path, path.suffix.lower())
    except DataError:
        raise
    except OSError as err:
        if err.errno is not None:  # the system refused (permission, missing, I/O): not the file's content
            raise system_error(path, err) from None
        raise DataError(f"{path}: cannot read this image ({err}). Fix: replace the file or remove it.") from None
    except Exception as err:  # parsers raise anything on damaged or crafted headers
        raise undecodable(path, err) from None
    if min(raster.height, raster.width, raster.bands) < 1:
        raster.close()
        raise DataError(f"{path}: an image of {raster.width}x{raster.height} pixels and {raster.bands} band(s) "
                        "holds nothing to segment. Fix: replace the file or remove it.")
    return raster


def _open_bands(folder: Path, names: Sequence[str] | None) -> Raster:
    from segkit.data.readers.bandfiles import BandFiles, band_files

    if not names:
        raise DataError(f"{folder}: a folder, read as one image only when data.bands names its band files (e.g. "
                        "data.bands: [B02, B03, B04, B08] for B02.tif ...). Fix: set data.bands so, or give a file.")
    files = band_files(folder, names, is_raster)
    if files is None:
        have = sorted(p.stem for p in folder.iterdir() if is_raster(p)) if folder.is_dir() else []
        raise DataError(f"{folder}: no file for band(s) {[n for n in names if n not in have]} of data.bands "
                        f"{list(names)} (it holds {have}). Fix: add the band files, or name the ones it has.")
    parts: list[Raster] = []
    try:
        for f in files:
            parts.append(open_raster(f))
        return BandFiles(folder, names, parts)
    except BaseException:
        for part in parts:
            part.close()
        raise


def _open(path: Path, suffix: str) -> Raster:
    if suffix in TIFF_EXTS:
        from segkit.data.readers.tiff import TiffRaster, check_one_image

        tif = tifffile.TiffFile(path)
        try:
            check_one_image(tif, path)  # GDAL would read a stack's first plane without a word
            geo = tif.pages.first.is_geotiff
        except BaseException:
            tif.close()
            raise
        if geo:
            tif.close()
            from segkit.data.readers.gdal import GdalRaster

            return GdalRaster(path)
        return TiffRaster(path, tif)
    if suffix in GDAL_EXTS:
        from segkit.data.readers.gdal import GdalRaster

        return GdalRaster(path)
    from segkit.data.readers.pillow import PillowRaster

    return PillowRaster(path)
