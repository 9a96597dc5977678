"""The reader registry: one reader per file family, picked here and nowhere else.

- PNG, JPEG, BMP, GIF, WebP -> Pillow
- TIFF -> tifffile + imagecodecs, or rasterio when the TIFF carries a georeference (GeoTIFF)
- other GDAL rasters (JPEG 2000, VRT, ERDAS .img) -> rasterio
"""

from __future__ import annotations

from pathlib import Path

import tifffile
from PIL import UnidentifiedImageError

from segkit.data.readers.base import Geometry, Raster, Window
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
    suffix = path.suffix.lower()
    try:
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
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied. Fix: make the file readable (chmod) or run as its owner.") from None
    except (UnidentifiedImageError, tifffile.TiffFileError, ValueError, OSError, SyntaxError, IndexError) as err:
        raise DataError(f"{path}: cannot read this image ({err}). Fix: replace the file or remove it.") from None
