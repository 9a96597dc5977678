"""Prediction files: outputs mirror inputs. A plain image gives PNG masks; a georeferenced raster
gives GeoTIFF masks on exactly its grid (CRS, transform, size), written by rows, so a raster
larger than memory is never held whole; a volume gives a volume on its own grid (`write_volume`:
NIfTI with the input's header, NRRD or MetaImage with its geometry). The head decides what the files
hold (one index mask, or one binary mask per class); a writer decides how a format stores it."""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from segkit.data.io import atomic_path, temp_beside, write_bytes, write_json, write_png
from segkit.data.readers import Geometry
from segkit.data.readers.base import system_error
from segkit.errors import SegkitError
from segkit.heads import Head, MaskLayer

NODATA_INDEX = 255
"""No-data of uint8 GeoTIFF masks: never a class index below 255, never a binary value (0/1)."""


def _escapes(rel: Path) -> bool:
    return rel.is_absolute() or ".." in rel.parts


def _refuse(path: Path, out_dir: Path | None, rel: Path) -> SegkitError:
    where = f"the output folder {out_dir}" if out_dir is not None else "the output folder"
    return SegkitError(f"{path}: this output would be written outside {where} (from the image {rel} and the "
                       "model's class names); nothing is written there. Fix: class names and input paths must be "
                       "plain names (check `classes` in the checkpoint's model.json), and the output folder must "
                       "not hold links to folders elsewhere.")


def output_path(out_dir: Path, rel: Path) -> Path:
    """`out_dir / rel`, refused unless it resolves below `out_dir` (links followed): class names and
    input paths choose output paths, and no crafted one may write elsewhere."""
    path = out_dir / rel
    if _escapes(rel) or out_dir.resolve() not in path.resolve().parents:
        raise _refuse(path, out_dir, rel)
    return path


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """The output folder may be neither the input folder nor inside it: outputs would mix with (and later be
    read as) inputs. Both output planners (images, volumes) check this first."""
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise SegkitError(f"{output_dir}: the output folder is inside the input folder {input_dir}; predictions "
                          "would mix with (and be read as) inputs. Fix: choose an output folder outside it.")


def refuse_existing(output_dir: Path, rels: Iterable[Path], overwrite: bool) -> None:
    """Outputs that exist already are never replaced without `overwrite`; checked before anything is written."""
    existing = [] if overwrite else [output_dir / rel for rel in rels if (output_dir / rel).exists()]
    if existing:
        raise SegkitError(f"{output_dir}: {len(existing)} outputs exist already (e.g. {existing[0]}). "
                          "Fix: --overwrite to replace them, or choose another output folder.")


def misfit_message(misfits: Sequence[str], total: int, noun: str) -> str:
    """All inputs that do not fit the model, in one message: the first five, and how many more."""
    more = f"\n  ... and {len(misfits) - 5} more" if len(misfits) > 5 else ""
    return f"{len(misfits)} of {total} {noun} do not fit the model:\n  " + "\n  ".join(misfits[:5]) + more


def output_files(head: Head, rel: Path, geometry: Geometry | None, probs: bool, vectorize: bool) -> list[Path]:
    """Every file a prediction of `rel` writes, relative to the output folder; a path that would leave
    the output folder is refused here, before anything is written."""
    suffix = ".tif" if geometry is not None and geometry.georeferenced else ".png"
    files = [p.with_suffix(suffix) for p in head.file_names(rel)]
    if probs:
        files.append(rel.with_name(rel.stem + "_probs.tif") if suffix == ".tif" else rel.with_suffix(".npy"))
    if vectorize:
        files.append(rel.with_suffix(".geojson"))
    for path in files:
        if _escapes(path):
            raise _refuse(path, None, rel)
    return files


class MaskWriter(ABC):
    """Receives a prediction by rows (top to bottom) and commits its files at `close`."""

    def __init__(self, head: Head, rel: Path, out_dir: Path, geometry: Geometry, probs: bool) -> None:
        self.head, self.rel, self.out_dir, self.geometry, self.probs = head, rel, out_dir, geometry, probs

    @abstractmethod
    def write_rows(self, top: int, mask: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        """Rows [top, top + n) of the mask (softmax (n, W), sigmoid (C, n, W)), valid pixels, probabilities."""

    @abstractmethod
    def close(self) -> None:
        """Write (or move into place) every file; nothing partial is left on failure."""

    def abort(self) -> None:
        """Drop what was written so far."""


class PngWriter(MaskWriter):
    """PNG masks (palette index PNG, or 0/255 per class) and .npy float16 probabilities, in memory."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        h, w = self.geometry.height, self.geometry.width
        self.mask: np.ndarray | None = None
        self.prob = np.empty((self.head.channels, h, w), np.float16) if self.probs else None

    def write_rows(self, top, mask, valid, probs) -> None:
        if self.mask is None:
            self.mask = np.empty(mask.shape[:-2] + (self.geometry.height, self.geometry.width), mask.dtype)
        self.mask[..., top:top + mask.shape[-2], :] = mask
        if self.prob is not None:
            self.prob[:, top:top + probs.shape[1]] = probs

    def close(self) -> None:
        assert self.mask is not None
        layers = self.head.mask_layers(self.mask, self.rel)
        targets = [output_path(self.out_dir, layer.path.with_suffix(".png")) for layer in layers]  # all checked first
        probs = output_path(self.out_dir, self.rel.with_suffix(".npy")) if self.prob is not None else None
        for layer, target in zip(layers, targets):
            arr = layer.array.astype(np.uint8) * 255 if layer.binary else layer.array
            write_png(target, arr, layer.palette)
        if probs is not None:
            buf = io.BytesIO()
            np.save(buf, self.prob)
            write_bytes(probs, buf.getvalue())


class GeoTiffWriter(MaskWriter):
    """Tiled, deflate-compressed GeoTIFFs on the input's grid: softmax one index band with a colour
    table, sigmoid one 0/1 band per class; no-data (255) where the input had no data. Rows are
    written as they come into temporary files renamed into place at `close`."""

    def __init__(self, *args, vectorize: bool = False) -> None:
        super().__init__(*args)
        import rasterio

        self.vectorize = vectorize
        g = self.geometry
        profile = {"driver": "GTiff", "width": g.width, "height": g.height, "crs": g.crs,
                   "transform": _affine(g.transform), "tiled": True, "blockxsize": 256, "blockysize": 256,
                   "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        self.files: list[tuple[Path, Path, object]] = []  # (final, temporary, dataset)
        probe = np.zeros(self.head.mask_shape(1, 1), self.head.mask_dtype)
        self.layers = self.head.mask_layers(probe, self.rel)
        try:
            self._open_all(profile)
        except BaseException:
            self.abort()
            raise

    def _open_all(self, profile: dict) -> None:
        for layer in self.layers:
            dtype = "uint8" if layer.binary or self.head.channels < NODATA_INDEX else "uint16"
            nodata = NODATA_INDEX if dtype == "uint8" else 65535
            ds = self._open(output_path(self.out_dir, layer.path.with_suffix(".tif")),
                            {**profile, "count": 1, "dtype": dtype, "nodata": nodata})
            if layer.palette is not None and dtype == "uint8":
                pal = np.array(layer.palette, np.uint8).reshape(-1, 3)
                ds.write_colormap(1, {i: (*map(int, pal[i]), 255) for i in range(len(pal))})
        if self.probs:
            self._open(output_path(self.out_dir, self.rel.with_name(self.rel.stem + "_probs.tif")),
                       {**profile, "count": self.head.channels, "dtype": "float32", "nodata": float("nan"),
                        "predictor": 3})

    def _open(self, final: Path, profile: dict):
        import rasterio

        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_beside(final, ".tif")
        except OSError as err:
            raise system_error(final, err, "write") from None
        try:
            ds = rasterio.open(tmp, "w", **profile)
        except rasterio.errors.RasterioError as err:
            os.unlink(tmp)
            raise _write_failed(final, err) from None
        except BaseException:
            os.unlink(tmp)
            raise
        self.files.append((final, Path(tmp), ds))
        return ds

    def write_rows(self, top, mask, valid, probs) -> None:
        from rasterio.windows import Window as RioWindow

        n = mask.shape[-2]
        win = RioWindow(0, top, self.geometry.width, n)
        for (final, tmp, ds), layer in zip(self.files, self.head.mask_layers(mask, self.rel)):
            arr = layer.array.astype(ds.dtypes[0])
            if valid is not None:
                arr = np.where(valid, arr, arr.dtype.type(ds.nodata))
            _gdal_write(final, lambda: ds.write(arr[None], window=win))
        if self.probs:
            p = probs.astype(np.float32)
            if valid is not None:
                p = np.where(valid[None], p, np.nan)
            final, _, ds = self.files[-1]
            _gdal_write(final, lambda: ds.write(p, window=win))

    def close(self) -> None:
        """Finish every file, polygons included, under temporary names; then move them all into place."""
        try:
            for final, tmp, ds in self.files:
                _gdal_write(final, ds.close)  # GDAL writes its last blocks here
                _check_complete(final, tmp)
            if self.vectorize:
                masks = [(tmp, layer) for (_, tmp, _), layer in zip(self.files, self.layers)]
                write_json(output_path(self.out_dir, self.rel.with_suffix(".geojson")), polygons(masks, self.geometry))
        except BaseException:
            self.abort()
            raise
        for final, tmp, _ in self.files:
            try:
                os.replace(tmp, final)
            except OSError as err:
                raise system_error(final, err, "write") from None

    def abort(self) -> None:
        for _, tmp, ds in self.files:
            if not ds.closed:
                ds.close()
            tmp.unlink(missing_ok=True)


def _write_failed(path: Path, err: object) -> SegkitError:
    """GDAL's write errors do not carry an errno: a nearly full disk is named as the cause (as the
    system's own ENOSPC is), else GDAL's words and the usual causes; either names the file."""
    if shutil.disk_usage(path.parent).free < FULL_DISK_BYTES:
        return system_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "write")
    return SegkitError(f"{path}: cannot write it ({err}). Fix: check free space and write permission "
                       "in the output folder; the previous file, if any, is unchanged.")


FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed GDAL write is reported as a full disk."""


def _gdal_write(final: Path, write: Callable[[], object]) -> None:
    """Run one GDAL write (a window, or the close that flushes the last blocks) for the file `final`."""
    import rasterio

    try:
        write()
    except rasterio.errors.RasterioError as err:
        raise _write_failed(final, err) from None


def _check_complete(final: Path, tmp: Path) -> None:
    """A closed GeoTIFF must hold every block it lists: GDAL reports a write that failed while it
    closes the file (a full disk) only on stderr, and rasterio's close() returns as if all went
    well, leaving a truncated file that must never replace `final`."""
    import tifffile

    size = tmp.stat().st_size
    try:
        with tifffile.TiffFile(tmp) as tif:
            complete = all(0 < n and o + n <= size for page in tif.pages
                           for o, n in zip(page.dataoffsets, page.databytecounts))
    except Exception as err:  # tifffile and its codecs raise many types on a damaged file
        raise _write_failed(final, f"GDAL left an unreadable file: {type(err).__name__}: {err}") from None
    if not complete:
        raise _write_failed(final, "GDAL left an incomplete file")


def writer_for(head: Head, rel: Path, out_dir: Path, geometry: Geometry, probs: bool,
               vectorize: bool = False) -> MaskWriter:
    """The writer that mirrors the input: GeoTIFF for georeferenced rasters, PNG for the rest."""
    if geometry.georeferenced:
        return GeoTiffWriter(head, rel, out_dir, geometry, probs, vectorize=vectorize)
    return PngWriter(head, rel, out_dir, geometry, probs)


def _affine(transform: Sequence[float] | None):
    from rasterio.transform import Affine

    return Affine(*transform[:6]) if transform is not None else Affine.identity()


def polygons(masks: Sequence[tuple[Path, MaskLayer]], geometry: Geometry) -> dict:
    """GeoJSON polygons per class (rasterio.features.shapes) in the raster's CRS; background left out.

    The CRS is named as in GeoJSON 2008 (`crs` member: EPSG code when there is one) and its full
    WKT is kept in `crs_wkt`, since RFC 7946 GeoJSON is WGS 84 only.
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.features import shapes

    features = []
    for path, layer in masks:
        with rasterio.open(path) as ds:
            arr = ds.read(1)
            transform = ds.transform
        for value, name in layer.classes:
            if name.lower() == "background":
                continue
            hit = arr == value
            for geom, _ in shapes(hit.astype(np.uint8), mask=hit, transform=transform):
                features.append({"type": "Feature", "geometry": geom, "properties": {"class": name}})
    crs = CRS.from_wkt(geometry.crs) if geometry.crs else None
    epsg = crs.to_epsg() if crs is not None else None
    doc: dict = {"type": "FeatureCollection", "features": features}
    if epsg:
        doc["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    if geometry.crs:
        doc["crs_wkt"] = geometry.crs
    return doc


def write_volume(array: np.ndarray, reference: object, path: Path) -> None:
    """`array`, in the file axis order of `reference` (an opened input volume, `readers.volume.open_volume`),
    written atomically on its grid: a NIfTI when `path` ends in .nii.gz, else through SimpleITK (.nrrd, .mha)."""
    if path.name.endswith(".nii.gz"):
        _write_nifti(array, reference.header, path)
    else:
        _write_itk(array, reference.itk_geometry, path)


def _write_nifti(array: np.ndarray, header, path: Path) -> None:
    """The header is the reference's own (so the affine, qform/sform and their codes are exactly the input's),
    with the array's type (float16 as float32, which NIfTI-1 has) and no intensity scaling, so the values are
    stored as they are; the display window (cal_min/cal_max) of the image is dropped, since it would hide
    small label values in a viewer."""
    import nibabel as nib

    header = header.copy()
    header.set_data_dtype(np.float32 if array.dtype == np.float16 else array.dtype)
    header.set_slope_inter(1, 0)
    header["cal_min"] = header["cal_max"] = 0
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(array, None, header)  # no affine: the header's qform and sform stay as they are
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as stream:
        image.to_stream(stream)


def _write_itk(array: np.ndarray, geometry: tuple, path: Path) -> None:
    """(i, j, k[, C]) voxels as SimpleITK's (k, j, i[, C]) image with the input's spacing, origin and
    direction, compressed; a last axis of classes becomes pixel components."""
    import SimpleITK as sitk

    if array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, [0, 1, 2], [2, 1, 0])),
                                   isVector=array.ndim == 4)
    spacing, origin, direction = geometry
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with atomic_path(path) as tmp:
        final = tmp.with_name(tmp.name + "".join(path.suffixes[-1:]))  # SimpleITK picks its writer by ending
        try:
            sitk.WriteImage(image, str(final), useCompression=True)
            os.replace(final, tmp)
        except RuntimeError as err:
            raise SegkitError(f"{path}: cannot be written ({str(err).strip().splitlines()[-1]}). Fix: check the "
                              "disk space and permissions of the output folder.") from None
        finally:
            if final.exists():
                final.unlink()
