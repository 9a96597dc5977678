"""README features that only these tests exercise: JPEG 2000, VRT and OME-TIFF reads, the streamed
branch of `segkit predict` for rasters above HUGE_PIXELS, and training where file locks fail.

Every file is written here from real pixels (the SpaceNet GeoTIFF sample, the H&E nuclei image), so
the pixels a reader must give are known exactly.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import yaml
from PIL import Image
from rasterio.windows import Window as RioWindow

import segkit.infer
from conftest import TINY, run_cli
from samples import NUCLEI, SPACENET
from segkit.data.io import is_image, read_image
from segkit.data.masks import build_mask_format
from segkit.data.readers import Window, open_raster
from segkit.data.readers.gdal import GdalRaster
from segkit.data.readers.tiff import TiffRaster
from segkit.run_control import LOCK, RunLock

BUILDINGS = SPACENET / "images" / "buildings.tif"
H_AND_E = NUCLEI / "train" / "images" / "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e.png"


def _spacenet(window: RioWindow) -> tuple[np.ndarray, rasterio.crs.CRS, rasterio.Affine]:
    """(H, W) uint16 pixels of a window of the SpaceNet sample, its CRS and the window's transform."""
    with rasterio.open(BUILDINGS) as src:
        return src.read(1, window=window), src.crs, src.window_transform(window)


def _h_and_e() -> np.ndarray:
    with Image.open(H_AND_E) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (256, 320, 3)
    return rgb


def _check_georeferenced(path: Path, want: np.ndarray, crs, transform) -> None:
    """`path` opens through GDAL with `want`'s pixels (whole, by window, by band), CRS and transform."""
    with open_raster(path) as raster:
        assert isinstance(raster, GdalRaster)
        assert (raster.height, raster.width, raster.bands) == want.shape and raster.dtype == want.dtype
        assert rasterio.crs.CRS.from_wkt(raster.crs) == crs
        assert raster.transform == pytest.approx(tuple(transform)[:6])
        np.testing.assert_array_equal(raster.read(), want)
        np.testing.assert_array_equal(raster.read(Window(40, 70, 61, 90)), want[40:101, 70:160])
    assert is_image(path)  # predict and training list it
    np.testing.assert_array_equal(read_image(path, channels=3), np.repeat(want[:, :, :1], 3, axis=2))


def test_jpeg2000_reads_through_gdal_exactly_with_its_grid(tmp_path):
    """A reversible (lossless) JPEG 2000 of 11-bit SpaceNet pixels, georeferenced."""
    pixels, crs, transform = _spacenet(RioWindow(123, 450, 200, 150))
    path = tmp_path / "scene.jp2"
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=200, height=150, count=1, dtype="uint16", crs=crs,
                       transform=transform, QUALITY="100", REVERSIBLE="YES", NBITS=11) as dst:
        dst.write(pixels[None])
    with rasterio.open(path) as ds:
        assert ds.driver == "JP2OpenJPEG"
    _check_georeferenced(path, pixels[:, :, None], crs, transform)


@pytest.mark.parametrize("reversible", [True, False])
def test_a_jpeg2000_mask_is_exact_when_reversible_and_thresholded_when_lossy(tmp_path, reversible):
    """Real building footprints as a {0, 1} JPEG 2000 mask: coded reversibly its values are exact, so 1 is the
    foreground; coded lossily the reader says so and the documented midpoint rule applies (1 is background)."""
    with rasterio.open(SPACENET / "masks" / "buildings.tif") as src:
        footprints = (src.read(1, window=RioWindow(300, 300, 256, 256)) > 0).astype(np.uint8)
    path = tmp_path / "mask.jp2"
    options = {"QUALITY": "100", "REVERSIBLE": "YES"} if reversible else {"QUALITY": "50"}
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=256, height=256, count=1, dtype="uint8",
                       **options) as dst:
        dst.write(footprints[None])
    with open_raster(path) as raster:
        assert raster.lossy is not reversible
    fg, valid = build_mask_format("binary", ["building"]).read(path)
    assert valid.all() and footprints.sum() > 1000
    np.testing.assert_array_equal(fg[..., 0], footprints if reversible else np.zeros_like(footprints))


def test_vrt_mosaic_reads_as_one_raster(tmp_path):
    """A VRT that puts two GeoTIFF halves of a SpaceNet window back side by side reads as the window
    itself: its pixels (a read across the seam too) and its grid."""
    whole = RioWindow(300, 200, 240, 180)
    pixels, crs, transform = _spacenet(whole)
    sources = []
    for k, left in enumerate((0, 120)):
        half = tmp_path / f"half{k}.tif"
        part = RioWindow(whole.col_off + left, whole.row_off, 120, 180)
        with rasterio.open(BUILDINGS) as src, rasterio.open(
                half, "w", driver="GTiff", width=120, height=180, count=1, dtype="uint16", crs=crs,
                transform=src.window_transform(part)) as dst:
            dst.write(src.read(1, window=part)[None])
        sources.append(f"""
    <SimpleSource>
      <SourceFilename relativeToVRT="1">{half.name}</SourceFilename>
      <SourceBand>1</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="120" ySize="180"/>
      <DstRect xOff="{left}" yOff="0" xSize="120" ySize="180"/>
    </SimpleSource>""")
    path = tmp_path / "mosaic.vrt"
    path.write_text(f"""<VRTDataset rasterXSize="240" rasterYSize="180">
  <SRS>{crs.to_wkt()}</SRS>
  <GeoTransform>{", ".join(repr(v) for v in transform.to_gdal())}</GeoTransform>
  <VRTRasterBand dataType="UInt16" band="1">{"".join(sources)}
  </VRTRasterBand>
</VRTDataset>
""")
    _check_georeferenced(path, pixels[:, :, None], crs, transform)


def _ome_pyramid(path: Path, image: np.ndarray, axes: str, **kw) -> None:
    """An OME-TIFF pyramid as microscopes write it: level 0 tiled, 2x and 4x reductions in SubIFDs."""
    down = (lambda a, s: a[:, ::s, ::s]) if axes == "CYX" else (lambda a, s: a[::s, ::s])
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, tile=(64, 64), compression="zlib", subifds=2, metadata={"axes": axes}, **kw)
        for step in (2, 4):
            tw.write(np.ascontiguousarray(down(image, step)), tile=(64, 64), compression="zlib", subfiletype=1, **kw)


@pytest.mark.parametrize("kind", ["rgb", "channels"])
def test_ome_tiff_pyramid_reads_at_full_resolution_by_window(tmp_path, kind):
    """An RGB OME-TIFF pyramid (the H&E image) and a 3-channel uint16 one stored as one plane per
    channel (CYX: SpaceNet pixels, their complement to 2047 and their half) read as one image of
    bands at level 0, whole and by window, and band by band."""
    path = tmp_path / f"{kind}.ome.tif"
    if kind == "rgb":
        want = _h_and_e()
        _ome_pyramid(path, want, "YXS", photometric="rgb")
    else:
        pan, _, _ = _spacenet(RioWindow(100, 300, 240, 200))
        planes = np.stack([pan, 2047 - pan, pan // 2])
        _ome_pyramid(path, planes, "CYX", photometric="minisblack")
        want = planes.transpose(1, 2, 0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 3
        assert len(tif.pages) == (1 if kind == "rgb" else 3)  # one page a channel plane
    with open_raster(path) as raster:
        assert isinstance(raster, TiffRaster)
        assert (raster.height, raster.width, raster.bands) == want.shape and raster.dtype == want.dtype
        np.testing.assert_array_equal(raster.read(), want)
        np.testing.assert_array_equal(raster.read(Window(33, 70, 100, 90)), want[33:133, 70:160])
        np.testing.assert_array_equal(raster.read(Window(63, 1, 66, 127), [2, 0]), want[63:129, 1:128][:, :, [2, 0]])
    np.testing.assert_array_equal(read_image(path, channels=3), want)


def test_predict_streams_a_raster_above_huge_pixels_by_window_with_the_in_memory_masks(
        tmp_path, monkeypatch, content_checkpoints):
    """HUGE_PIXELS lowered below the size of a real image (the H&E nuclei image as a tiled GeoTIFF):
    predict never reads it whole, only bands of windows, and writes the same mask and probability
    GeoTIFFs as the branch that decodes it whole."""
    rgb = _h_and_e()
    images = tmp_path / "in"
    images.mkdir()
    transform = rasterio.Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
    with rasterio.open(images / "he.tif", "w", driver="GTiff", width=320, height=256, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=transform, tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    reads: list[tuple[int, int, int, int]] = []
    real_read = GdalRaster._read

    def spy(self, window, bands):
        reads.append(tuple(window))
        return real_read(self, window, bands)

    monkeypatch.setattr(GdalRaster, "_read", spy)
    options = ("--device", "cpu", "--no-progress", "--workers", "0", "--tile", "128", "--overlap", "32",
               "--save-probs")
    checkpoint = content_checkpoints["sigmoid"]
    assert run_cli("predict", checkpoint, images, tmp_path / "whole", *options).code == 0
    assert (0, 0, 256, 320) in reads  # the in-memory branch decodes it whole (and the spy sees reads)
    reads.clear()
    assert 256 * 320 > 128 * 128
    monkeypatch.setattr(segkit.infer, "HUGE_PIXELS", 128 * 128)
    r = run_cli("predict", checkpoint, images, tmp_path / "streamed", *options)
    assert r.code == 0, r
    assert reads and all(h <= 128 for _, _, h, _ in reads), reads  # bands of windows, never the whole image
    assert {row for top, _, h, _ in reads for row in range(top, top + h)} == set(range(256))
    for name in ("nucleus/he.tif", "he_probs.tif"):
        with rasterio.open(tmp_path / "whole" / name) as a, rasterio.open(tmp_path / "streamed" / name) as b:
            assert b.crs == a.crs == "EPSG:32616" and b.transform == a.transform == transform
            want, got = a.read(), b.read()
        np.testing.assert_array_equal(got, want)
    assert 0.05 < (want > 0.5).mean() < 0.95  # probabilities of a model whose masks follow the image


def _no_locks(fd: int, operation: int) -> None:
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def test_where_file_locks_fail_training_says_so_and_goes_on_unguarded(tmp_path, monkeypatch, caplog):
    """A file system without working flock (NFS without its lock service: ENOLCK): the run lock warns,
    naming the lock file, the cause and what is unguarded, and does not stop anything, a second
    writer included; `segkit train` says so and goes on to its next check."""
    monkeypatch.setattr(fcntl, "flock", _no_locks)
    said = (f"{tmp_path / 'run' / LOCK}: cannot lock ({os.strerror(errno.ENOLCK)}); nothing stops a second "
            "training into this folder")
    (tmp_path / "run").mkdir()
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="segkit"):
        first.acquire()
        second.acquire()
    assert [r.getMessage() for r in caplog.records] == [said, said]
    first.release()
    second.release()
    caplog.clear()
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "empty"), "classes": ["nucleus"],
                                               "mask": "binary"},
                                      "model": {"arch": "Unet", "encoder": "resnet18", "head": "sigmoid"}}))
    with caplog.at_level(logging.WARNING, logger="segkit"):
        r = run_cli("train", config, "--out", tmp_path / "run", *TINY)
    assert said in [rec.getMessage() for rec in caplog.records]
    assert r.code == 2 and r.err.startswith(f"error: {tmp_path / 'empty' / 'train' / 'images'}: no images"), r
