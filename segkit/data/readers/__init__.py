"""The reader registry: one reader per file family, picked here and nowhere else.

- PNG, JPEG, BMP, GIF, WebP -> Pillow
- TIFF -> tifffile + imagecodecs, or rasterio when the TIFF carries a georeference (GeoTIFF)
- other GDAL rasters (JPEG 2000, VRT, ERDAS .img) -> rasterio
"""

from __future__ import annotations

from pathlib import Path

import tifffile

from segkit.data.readers.base import Geometry, Raster, Window, system_error, undecodable
from segkit.errors import DataError

PILLOW_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TIFF_EXTS = (".tif", ".tiff")
GDAL_EXTS = (".jp2", ".j2k", ".vrt", ".img")
RASTER_EXTS = PILLOW_EXTS + TIFF_EXTS + GDAL_EXTS

__all__ = ["Geometry", "Raster", "Window", "RASTER_EXTS", "is_raster", "open_raster"]


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_EXTS and not path.name.startswith(".")


def open_raster(path: str | Path) -> Raster:
    """Open `path` with the reader of its family; a DataError names the file and the fix."""
    path = Path(path)
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
