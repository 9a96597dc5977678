"""The reader registry (segkit.data.readers) and what sits on it (read_image, mask formats,
ImageSource): exact round trips for every TIFF compression and layout, windowed reads that equal
slices of the whole read (property-based), alpha and band semantics, GeoTIFF geometry, strict
binary masks, broken files and multi-page stacks.

Pixels come from real files in the repository: a DSB 2018 nuclei RGB image and its mask
(data/nuclei), the SpaceNet GeoTIFF samples and the MSD hippocampus MRI volumes (tests/data).
Derived arrays (extra bands, instance IDs, blurred or inverted masks, MRI slices as a stack) are
built from those and say so. Random pixels are used only in the property-based tests.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from samples import NUCLEI, SPACENET, grey8, hippo_volume, inverted_nuclei
from segkit.data.io import read_image, read_mask_raw
from segkit.data.masks import build_mask_format
from segkit.data.readers import Window, open_raster
from segkit.data.readers.gdal import GdalRaster
from segkit.data.readers.tiff import TiffRaster
from segkit.data.source import ImageSource
from segkit.errors import DataError

NUCLEI_STEM = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"  # H&E stained, 320x256 RGB
NUCLEI_IMAGE = NUCLEI / "train" / "images" / f"{NUCLEI_STEM}.png"
NUCLEI_MASK = NUCLEI / "train" / "masks" / f"{NUCLEI_STEM}.png"
BUILDINGS = SPACENET / "images" / "buildings.tif"
BUILDINGS_MASK = SPACENET / "masks" / "buildings.tif"
ALBERS = SPACENET / "unlabelled" / "albers_3band_int16_nodata.tif"

UTM16N = "EPSG:32616"
UTM_TRANSFORM = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)  # SpaceNet's grid: 0.5 m pixels


# ----------------------------------------------------------------------------- real pixels

def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def rgb8() -> np.ndarray:
    """A 90x77 crop (odd, not a tile multiple) of a real nuclei image, uint8 RGB."""
    arr = _png(NUCLEI_IMAGE)
    assert arr.shape == (256, 320, 3) and arr.dtype == np.uint8
    crop = np.ascontiguousarray(arr[40:130, 60:137])
    assert len(np.unique(crop)) > 100 and not (crop[:, :, 0] == crop[:, :, 1]).all()  # real colour content
    return crop


@pytest.fixture(scope="module")
def u16_11bit() -> np.ndarray:
    """A 90x77 crop of the SpaceNet panchromatic band: uint16 with 11-bit content."""
    arr = tifffile.imread(BUILDINGS)
    crop = np.ascontiguousarray(arr[300:390, 400:477])
    assert crop.dtype == np.uint16 and 255 < crop.max() < 2048 and len(np.unique(crop)) > 200
    return crop


@pytest.fixture(scope="module")
def f32_bands(rgb8) -> np.ndarray:
    """5 float32 bands derived from real pixels: nuclei R, G, B scaled to 0..1, a SpaceNet crop scaled
    from 11 bits to 0..1, and a signed normalised difference (R - G) / (R + G + 1) (negative values included)."""
    pan = tifffile.imread(BUILDINGS)[600:690, 100:177].astype(np.float32) / 2047
    assert len(np.unique(pan)) > 200
    r, g, b = (rgb8[:, :, i].astype(np.float32) for i in range(3))
    arr = np.stack([r / 255, g / 255, b / 255, pan, (r - g) / (r + g + 1)], axis=2).astype(np.float32)
    return np.ascontiguousarray(arr)


@pytest.fixture(scope="module")
def nuclei_mask() -> np.ndarray:
    """The real DSB mask as stored: uint8 {0, 255}."""
    mask = _png(NUCLEI_MASK)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 255}
    return mask


def _save_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _geotiff(path: Path, arr: np.ndarray, **profile) -> Path:
    """Write (H, W, B) `arr` as a GeoTIFF on the UTM 16N grid with rasterio."""
    h, w, b = arr.shape
    meta = dict(driver="GTiff", width=w, height=h, count=b, dtype=arr.dtype.name, crs=UTM16N,
                transform=UTM_TRANSFORM)
    meta.update(profile)
    with rasterio.open(path, "w", **meta) as ds:
        ds.write(arr.transpose(2, 0, 1))
    return path


# ----------------------------------------------------------------------------- 1. TIFF round trips

COMPRESSIONS = [None, "lzw", "zlib", "zstd", "packbits", "jpeg"]
LAYOUTS = ["striped", "tiled", "bigtiff", "separate"]
_TIFF_COMPRESSION_TAG = {None: 1, "lzw": 5, "zlib": 8, "zstd": 50000, "packbits": 32773, "jpeg": 7}


def _write_tiff(path: Path, arr: np.ndarray, compression: str | None, layout: str,
                predictor: bool = False, **extra) -> Path:
    """Write (H, W[, B]) `arr` with tifffile in `layout`: striped (16 rows a strip), tiled (32x32),
    bigtiff (tiled BigTIFF) or separate (planar, striped)."""
    kw: dict = dict(compression=compression, **extra)
    if predictor:
        kw["predictor"] = True
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        kw.setdefault("photometric", "rgb")
    else:
        kw.setdefault("photometric", "minisblack")
    data = arr
    if arr.ndim == 3:
        kw.setdefault("planarconfig", "contig")
    if layout == "striped":
        kw["rowsperstrip"] = 16
    elif layout == "tiled":
        kw["tile"] = (32, 32)
    elif layout == "bigtiff":
        kw["tile"] = (32, 32)
        kw["bigtiff"] = True
    elif layout == "separate":
        assert arr.ndim == 3, "planar separate needs bands"
        data = np.ascontiguousarray(arr.transpose(2, 0, 1))
        kw["planarconfig"] = "separate"
        kw["rowsperstrip"] = 16
    tifffile.imwrite(path, data, **kw)
    return path


def _check_layout(path: Path, compression: str | None, layout: str) -> None:
    """The file really is what the test means to read (the writer did not fall back silently)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        assert int(page.compression) == _TIFF_COMPRESSION_TAG[compression]
        assert page.is_tiled == (layout in ("tiled", "bigtiff"))
        assert tif.is_bigtiff == (layout == "bigtiff")
        assert int(page.planarconfig) == (2 if layout == "separate" else 1)


def _roundtrip_cases(kinds):
    for kind in kinds:
        for compression in COMPRESSIONS:
            if compression == "jpeg" and kind != "rgb8":
                continue
            for layout in LAYOUTS:
                if layout == "separate" and (kind == "u16_11bit" or compression == "jpeg"):
                    continue
                yield pytest.param(kind, compression, layout, id=f"{kind}-{compression or 'none'}-{layout}")


@pytest.mark.parametrize("kind, compression, layout", list(_roundtrip_cases(["rgb8", "u16_11bit", "f32_bands"])))
def test_tiff_compression_roundtrip(tmp_path, request, kind, compression, layout):
    arr = request.getfixturevalue(kind)
    path = _write_tiff(tmp_path / f"{kind}.tif", arr, compression, layout)
    _check_layout(path, compression, layout)
    bands = 1 if arr.ndim == 2 else arr.shape[2]
    expected = arr if arr.ndim == 3 else arr[:, :, None]

    with open_raster(path) as raster:
        assert isinstance(raster, TiffRaster)
        assert (raster.height, raster.width, raster.bands) == (90, 77, bands)
        assert raster.dtype == arr.dtype
        assert raster.alpha == ()
        assert raster.lossy is (compression == "jpeg")
        assert raster.crs is None and raster.transform is None

    got = read_image(path, channels=bands)
    assert got.dtype == arr.dtype and got.shape == expected.shape
    # a window crossing strip/tile borders
    window = Window(13, 29, 50, 40)
    win = read_image(path, channels=bands, window=window)
    if compression == "jpeg":
        diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        assert diff.mean() < 3.0 and np.percentile(diff, 99) <= 25, (diff.mean(), diff.max())
        assert not np.array_equal(got, expected)  # really lossy: the test reads what JPEG made of it
        np.testing.assert_array_equal(win, got[13:63, 29:69])
    else:
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(win, expected[13:63, 29:69])


@pytest.mark.parametrize("kind", ["u16_11bit", "f32_bands"])
@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd"])
def test_tiff_predictor_roundtrip(tmp_path, request, kind, compression):
    """Horizontal (integer) and floating-point predictors, tiled."""
    arr = request.getfixturevalue(kind)
    path = _write_tiff(tmp_path / "p.tif", arr, compression, "tiled", predictor=True)
    with tifffile.TiffFile(path) as tif:
        assert int(tif.pages.first.predictor) == (3 if arr.dtype == np.float32 else 2)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    expected = arr if arr.ndim == 3 else arr[:, :, None]
    np.testing.assert_array_equal(read_image(path, channels=channels), expected)
    np.testing.assert_array_equal(read_image(path, channels=channels, window=Window(31, 31, 3, 5)),
                                  expected[31:34, 31:36])


def test_tiff_11bit_grey_repeated_for_rgb_model(tmp_path, u16_11bit):
    """The one documented conversion: 1 band for a 3-channel model is repeated, values and type kept."""
    path = _write_tiff(tmp_path / "g.tif", u16_11bit, "zstd", "tiled")
    got = read_image(path, channels=3)
    assert got.dtype == np.uint16 and got.shape == (90, 77, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], u16_11bit)


def test_tiff_bool_mask_reads_as_0_255(tmp_path, nuclei_mask):
    path = tmp_path / "bool.tif"
    tifffile.imwrite(path, nuclei_mask > 0, compression="packbits")
    got = read_image(path, channels=1)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], nuclei_mask)


# ----------------------------------------------------------------------------- 2. windows (property-based)

INT_DTYPES = ["uint8", "uint16", "int16"]
DTYPES = INT_DTYPES + ["float32"]


def _random_pixels(rng: np.random.Generator, h: int, w: int, b: int, dtype: str) -> np.ndarray:
    if dtype == "float32":
        arr = (rng.standard_normal((h, w, b)) * 1000).astype(np.float32)
        if arr.size > 2:
            arr.flat[0], arr.flat[1] = np.nan, -np.inf  # odd floats must survive too
        return arr
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=(h, w, b), dtype=dtype)


@st.composite
def _window(draw, h: int, w: int) -> Window:
    top = draw(st.integers(0, h - 1))
    left = draw(st.integers(0, w - 1))
    return Window(top, left, draw(st.integers(1, h - top)), draw(st.integers(1, w - left)))


@st.composite
def _raster_case(draw, dtypes=tuple(DTYPES), max_bands=8, max_side=70):
    h = draw(st.one_of(st.just(1), st.integers(1, max_side)))
    w = draw(st.one_of(st.just(1), st.integers(1, max_side)))
    dtype = draw(st.sampled_from(dtypes))
    bands = draw(st.integers(1, max_bands))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    windows = draw(st.lists(_window(h, w), min_size=1, max_size=3))
    band_pick = draw(st.lists(st.integers(0, bands - 1), min_size=1, max_size=bands))
    return h, w, dtype, bands, seed, windows, band_pick


def _check_windows(path: Path, arr: np.ndarray, windows, band_pick, cls) -> None:
    h, w, b = arr.shape
    with open_raster(path) as raster:
        assert isinstance(raster, cls), type(raster)
        assert (raster.height, raster.width, raster.bands) == (h, w, b)
        assert raster.dtype == arr.dtype
        full = raster.read()
        assert full.shape == arr.shape and full.dtype == arr.dtype
        np.testing.assert_array_equal(full, arr)
        for win in windows:
            t, l, wh, ww = win
            part = raster.read(win)
            assert part.shape == (wh, ww, b) and part.dtype == arr.dtype
            np.testing.assert_array_equal(part, full[t:t + wh, l:l + ww])
            picked = raster.read(win, band_pick)
            np.testing.assert_array_equal(picked, full[t:t + wh, l:l + ww][:, :, band_pick])
    if not raster.alpha:
        win = windows[0]
        np.testing.assert_array_equal(read_image(path, channels=b, window=win),
                                      arr[win.top:win.top + win.height, win.left:win.left + win.width])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_raster_case(), compression=st.sampled_from([None, "lzw", "zlib", "zstd", "packbits"]),
       layout=st.sampled_from(["striped", "tiled"]), separate=st.booleans(), bigtiff=st.booleans(),
       predictor=st.booleans(), strip_rows=st.integers(1, 40), tile=st.sampled_from([16, 32, 48]))
def test_tiff_windows_equal_slices(case, compression, layout, separate, bigtiff, predictor, strip_rows, tile):
    h, w, dtype, bands, seed, windows, band_pick = case
    arr = _random_pixels(np.random.default_rng(seed), h, w, bands, dtype)
    kw: dict = dict(compression=compression, photometric="minisblack", bigtiff=bigtiff)
    if predictor and compression in ("lzw", "zlib", "zstd"):
        kw["predictor"] = True
    if layout == "tiled":
        kw["tile"] = (tile, tile)
    else:
        kw["rowsperstrip"] = strip_rows
    data = arr[:, :, 0]
    if bands > 1:
        kw["planarconfig"] = "separate" if separate else "contig"
        data = np.ascontiguousarray(arr.transpose(2, 0, 1)) if separate else arr
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.tif"
        tifffile.imwrite(path, data, **kw)
        _check_windows(path, arr, windows, band_pick, TiffRaster)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_raster_case(), compress=st.sampled_from([None, "lzw", "deflate", "zstd", "packbits"]),
       tiled=st.booleans(), block=st.sampled_from([16, 32, 64]), strip_rows=st.integers(1, 40),
       interleave=st.sampled_from(["pixel", "band"]))
def test_geotiff_windows_equal_slices(case, compress, tiled, block, strip_rows, interleave):
    h, w, dtype, bands, seed, windows, band_pick = case
    arr = _random_pixels(np.random.default_rng(seed), h, w, bands, dtype)
    profile: dict = dict(interleave=interleave, photometric="MINISBLACK")
    if compress:
        profile["compress"] = compress
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    else:
        profile.update(blockysize=strip_rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = _geotiff(Path(tmp) / "g.tif", arr, **profile)
        _check_windows(path, arr, windows, band_pick, GdalRaster)
        with open_raster(path) as raster:
            assert CRS.from_wkt(raster.crs) == CRS.from_epsg(32616)
            win = windows[0]
            got = raster.geometry.window_transform(win)
            want = rasterio.windows.transform(
                rasterio.windows.Window(win.left, win.top, win.width, win.height), UTM_TRANSFORM)
            assert got == pytest.approx(tuple(want)[:6])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_raster_case(dtypes=("uint8",), max_bands=1),
       kind=st.sampled_from(["L", "RGB", "I;16"]), level=st.integers(0, 9))
def test_png_windows_equal_slices(case, kind, level):
    h, w, _, _, seed, windows, _ = case
    rng = np.random.default_rng(seed)
    if kind == "I;16":
        arr = rng.integers(0, 65536, size=(h, w, 1), dtype=np.uint16)
        im = Image.fromarray(arr[:, :, 0])
    elif kind == "RGB":
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
    else:
        arr = rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)
        im = Image.fromarray(arr[:, :, 0], "L")
    band_pick = list(range(arr.shape[2]))[::-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.png"
        im.save(path, compress_level=level)
        _check_windows(path, arr, windows, band_pick, type(open_raster(path)))


# ----------------------------------------------------------------------------- 3. alpha

def test_rgba_png_drops_declared_alpha(tmp_path, rgb8, nuclei_mask):
    rgba = np.dstack([rgb8, nuclei_mask[:90, :77]])
    path = _save_png(tmp_path / "rgba.png", rgba)
    with open_raster(path) as raster:
        assert raster.bands == 4 and raster.alpha == (3,)
    np.testing.assert_array_equal(read_image(path, channels=3), rgb8)
    # asked for by number, the alpha band is given
    np.testing.assert_array_equal(read_image(path, channels=4, bands=[1, 2, 3, 4]), rgba)
    with pytest.raises(DataError, match="3 band"):
        read_image(path, channels=4)


def test_grey_alpha_png_keeps_one_band(tmp_path, rgb8, nuclei_mask):
    la = np.dstack([rgb8[:, :, 1], nuclei_mask[:90, :77]])
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    np.testing.assert_array_equal(read_image(path, channels=1)[:, :, 0], rgb8[:, :, 1])
    np.testing.assert_array_equal(read_image(path, channels=3), np.repeat(rgb8[:, :, 1:2], 3, axis=2))


def test_palette_png_reads_through_palette(tmp_path, nuclei_mask):
    index = (nuclei_mask[:90, :77] > 0).astype(np.uint8)
    im = Image.fromarray(index, "L").convert("P")
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    path = tmp_path / "pal.png"
    im.save(path)
    got = read_image(path, channels=3)
    want = np.where(index[:, :, None] == 1, [200, 100, 50], [10, 20, 30]).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_image(path, channels=1, bands=[2]), want[:, :, 1:2])
    # a palette mask gives its indices as an index mask, its colours otherwise
    np.testing.assert_array_equal(read_mask_raw(path, as_palette_index=True).values, index)


@pytest.mark.parametrize("layout", ["striped", "separate"])
@pytest.mark.parametrize("extra", ["unassalpha", "assocalpha"])
def test_tiff_declared_alpha_dropped(tmp_path, rgb8, nuclei_mask, extra, layout):
    rgba = np.dstack([rgb8, nuclei_mask[:90, :77]])
    path = _write_tiff(tmp_path / "a.tif", rgba, "lzw", layout, photometric="rgb", extrasamples=[extra])
    with open_raster(path) as raster:
        assert raster.bands == 4 and raster.alpha == (3,)
    np.testing.assert_array_equal(read_image(path, channels=3), rgb8)


def test_tiff_grey_plus_alpha(tmp_path, u16_11bit):
    alpha = np.where(u16_11bit > 0, 65535, 0).astype(np.uint16)
    path = _write_tiff(tmp_path / "ga.tif", np.dstack([u16_11bit, alpha]), "zlib", "tiled",
                       extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(path, channels=1)[:, :, 0], u16_11bit)


@pytest.mark.parametrize("layout", ["striped", "separate"])
def test_tiff_unspecified_extra_band_is_data(tmp_path, rgb8, nuclei_mask, layout):
    rgbn = np.dstack([rgb8, nuclei_mask[:90, :77]])  # a 4th data band (think NIR), not alpha
    path = _write_tiff(tmp_path / "n.tif", rgbn, "zstd", layout, photometric="rgb", extrasamples=["unspecified"])
    with open_raster(path) as raster:
        assert raster.bands == 4 and raster.alpha == ()
    np.testing.assert_array_equal(read_image(path, channels=4), rgbn)
    with pytest.raises(DataError) as err:
        read_image(path, channels=3)
    msg = str(err.value)
    assert "n.tif" in msg and "4 band" in msg and "data.bands" in msg


def test_geotiff_alpha_colorinterp(tmp_path, rgb8, nuclei_mask):
    rgba = np.dstack([rgb8, nuclei_mask[:90, :77]])
    alpha = _geotiff(tmp_path / "alpha.tif", rgba, photometric="RGB", alpha="YES")
    with rasterio.open(alpha) as ds:
        assert ds.colorinterp[3] == ColorInterp.alpha
    with open_raster(alpha) as raster:
        assert isinstance(raster, GdalRaster) and raster.alpha == (3,)
    np.testing.assert_array_equal(read_image(alpha, channels=3), rgb8)

    data = _geotiff(tmp_path / "data.tif", rgba, photometric="MINISBLACK")
    with rasterio.open(data, "r+") as ds:
        ds.colorinterp = [ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.undefined]
    with rasterio.open(data) as ds:
        assert ColorInterp.alpha not in ds.colorinterp
    with open_raster(data) as raster:
        assert raster.alpha == ()
    np.testing.assert_array_equal(read_image(data, channels=4), rgba)
    with pytest.raises(DataError, match="4 band"):
        read_image(data, channels=3)


# ----------------------------------------------------------------------------- 4. band selection

@pytest.mark.parametrize("fmt", ["tiff", "geotiff", "png"])
def test_band_selection_order_and_range(tmp_path, rgb8, f32_bands, fmt):
    if fmt == "tiff":
        arr, path = f32_bands, _write_tiff(tmp_path / "b.tif", f32_bands, "zlib", "tiled")
    elif fmt == "geotiff":
        arr, path = f32_bands, _geotiff(tmp_path / "b.tif", f32_bands, compress="deflate")
    else:
        arr, path = rgb8, _save_png(tmp_path / "b.png", rgb8)
    n = arr.shape[2]
    got = read_image(path, channels=2, bands=[3, 1])
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr[:, :, [2, 0]])
    win = read_image(path, channels=2, bands=[3, 1], window=Window(5, 7, 11, 13))
    np.testing.assert_array_equal(win, arr[5:16, 7:20][:, :, [2, 0]])
    np.testing.assert_array_equal(read_image(path, channels=1, bands=[n]), arr[:, :, n - 1:])
    for bad in ([1, n + 1], [0]):
        with pytest.raises(DataError) as err:
            read_image(path, channels=len(bad), bands=bad)
        msg = str(err.value)
        assert path.name in msg and f"1..{n}" in msg, msg
    # the wrong number of bands for the model is an error, never a silent drop
    with pytest.raises(DataError, match="data.bands"):
        read_image(path, channels=3, bands=[1, 2])


def test_image_source_checks_bands_at_open_and_reads_windows(tmp_path, f32_bands):
    path = _geotiff(tmp_path / "s.tif", f32_bands, compress="deflate", nodata=-1.0)
    with pytest.raises(DataError, match=r"1\.\.5"):
        ImageSource.open(path, channels=1, bands=[6])
    with pytest.raises(DataError, match="5 band"):
        ImageSource.open(path, channels=3)
    src = ImageSource.open(path, channels=2, bands=[5, 4])
    assert src.nodata == -1.0 and src.shape == (90, 77) and src.dtype == np.float32
    assert CRS.from_wkt(src.geometry.crs) == CRS.from_epsg(32616)
    np.testing.assert_array_equal(src.read(Window(3, 4, 20, 30)), f32_bands[3:23, 4:34][:, :, [4, 3]])
    assert ImageSource.open(path, channels=5, nodata=0.0).nodata == 0.0


# ----------------------------------------------------------------------------- 5. GeoTIFF geometry

def test_geotiff_crs_transform_nodata(tmp_path, u16_11bit):
    transform = Affine(0.5, 0.0, 733601.0 + 400 * 0.5, 0.0, -0.5, 3725139.0 - 300 * 0.5)
    path = _geotiff(tmp_path / "geo.tif", u16_11bit[:, :, None], compress="lzw", nodata=0, transform=transform,
                    tiled=True, blockxsize=32, blockysize=32)
    with open_raster(path) as raster:
        assert isinstance(raster, GdalRaster)
        assert CRS.from_wkt(raster.crs) == CRS.from_epsg(32616)
        assert raster.transform == pytest.approx(tuple(transform)[:6])
        assert raster.nodata == 0
        assert raster.dtype == np.uint16 and not raster.lossy
        geometry = raster.geometry
        assert geometry.georeferenced and (geometry.height, geometry.width) == (90, 77)
        for win in (Window(0, 0, 90, 77), Window(13, 29, 50, 40), Window(89, 76, 1, 1)):
            want = rasterio.windows.transform(rasterio.windows.Window(win.left, win.top, win.width, win.height),
                                              transform)
            assert geometry.window_transform(win) == pytest.approx(tuple(want)[:6])
    np.testing.assert_array_equal(read_image(path, channels=1)[:, :, 0], u16_11bit)


def test_plain_tiff_has_no_geometry(tmp_path, rgb8):
    path = _write_tiff(tmp_path / "plain.tif", rgb8, "lzw", "tiled")
    with open_raster(path) as raster:
        assert not raster.geometry.georeferenced
        assert raster.geometry.window_transform(Window(1, 2, 3, 4)) is None


def test_real_spacenet_geotiff():
    with rasterio.open(BUILDINGS) as ds:
        want = ds.read(1)
        want_transform = tuple(ds.transform)[:6]
    with open_raster(BUILDINGS) as raster:
        assert isinstance(raster, GdalRaster)
        assert (raster.height, raster.width, raster.bands) == (900, 900, 1)
        assert raster.dtype == np.uint16 and raster.nodata == 0
        assert CRS.from_wkt(raster.crs) == CRS.from_epsg(32616)
        assert raster.transform == pytest.approx(want_transform)
        assert raster.transform[0] == 0.5 and raster.transform[4] == -0.5
        win = Window(450, 123, 64, 77)
        np.testing.assert_array_equal(raster.read(win)[:, :, 0], want[450:514, 123:200])
        want_win = rasterio.windows.transform(rasterio.windows.Window(123, 450, 77, 64), Affine(*want_transform))
        assert raster.geometry.window_transform(win) == pytest.approx(tuple(want_win)[:6])
    got = read_image(BUILDINGS, channels=3)
    assert got.dtype == np.uint16 and got.shape == (900, 900, 3) and got.max() == 6615  # SOURCE.json: 54..6615
    np.testing.assert_array_equal(got[:, :, 2], want)


def test_real_spacenet_mask():
    """The SpaceNet mask carries no georeference (plain TIFF reader) and no GDAL_NODATA tag: its
    background 0 is background, not no-data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with open_raster(BUILDINGS_MASK) as mask:
            assert isinstance(mask, TiffRaster) and mask.crs is None and mask.shape == (900, 900)
            assert mask.nodata is None
    stored = tifffile.imread(BUILDINGS_MASK)
    fg, valid = build_mask_format("binary", ["building"]).read(BUILDINGS_MASK)
    np.testing.assert_array_equal(fg[:, :, 0].astype(bool), stored == 255)
    assert valid.all()


def test_real_albers_int16_nodata():
    with rasterio.open(ALBERS) as ds:
        want = ds.read().transpose(1, 2, 0)
        want_crs = ds.crs
        want_transform = tuple(ds.transform)[:6]
    with open_raster(ALBERS) as raster:
        assert isinstance(raster, GdalRaster)
        assert (raster.height, raster.width, raster.bands) == (512, 512, 3)
        assert raster.dtype == np.int16 and raster.nodata == -9999
        crs = CRS.from_wkt(raster.crs)
        assert crs == want_crs and crs.to_epsg() is None  # a custom CRS, kept as WKT
        assert "Albers" in raster.crs
        assert raster.transform == pytest.approx(want_transform)
        assert raster.alpha == ()
    got = read_image(ALBERS, channels=3)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_image(ALBERS, channels=3, window=Window(100, 200, 33, 17)),
                                  want[100:133, 200:217])
    src = ImageSource.open(ALBERS, channels=3)
    assert src.nodata == -9999
    hit = src.nodata_mask(src.read())
    np.testing.assert_array_equal(hit, (want == -9999).all(axis=2))


# ----------------------------------------------------------------------------- 6. strict binary masks

def _binary(classes=("nuclei",), **kw):
    return build_mask_format("binary", list(classes), **kw)


def test_binary_0_255_and_0_1(tmp_path, nuclei_mask):
    truth = nuclei_mask > 0
    for name, arr in (("m255.png", nuclei_mask), ("m1.png", truth.astype(np.uint8))):
        labels, valid = _binary().read(_save_png(tmp_path / name, arr))
        assert labels.shape == (*truth.shape, 1) and labels.dtype == np.uint8 and valid.all()
        np.testing.assert_array_equal(labels[:, :, 0].astype(bool), truth)
        labels2, _ = _binary(("background", "nuclei")).read(tmp_path / name)
        np.testing.assert_array_equal(labels2[:, :, 0].astype(bool), ~truth)
        np.testing.assert_array_equal(labels2[:, :, 1].astype(bool), truth)
    # windows of a mask are windows of the whole
    labels, valid = _binary().read(tmp_path / "m255.png", window=Window(10, 20, 30, 40))
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), truth[10:40, 20:60])


def test_binary_third_value_is_refused(tmp_path, nuclei_mask):
    arr = (nuclei_mask > 0).astype(np.uint8)
    arr[:, 160:][arr[:, 160:] == 1] = 2  # the right half's nuclei get another value
    assert set(np.unique(arr).tolist()) == {0, 1, 2}
    path = _save_png(tmp_path / "three.png", arr)
    with pytest.raises(DataError) as err:
        _binary().read(path)
    msg = str(err.value)
    assert "three.png" in msg and "0, 1, 2" in msg and "binary_threshold" in msg and "nonzero" in msg, msg


def _instances(mask: np.ndarray) -> np.ndarray:
    """Instance IDs 1..N from the real mask's connected nuclei, folded onto 1, 2, 3."""
    from scipy import ndimage

    ids, n = ndimage.label(mask > 0)
    assert n >= 3
    return np.where(ids > 0, (ids - 1) % 3 + 1, 0).astype(np.uint8)


def test_binary_instance_ids_nonzero(tmp_path, nuclei_mask):
    ids = _instances(nuclei_mask)
    assert set(np.unique(ids).tolist()) == {0, 1, 2, 3}
    path = _save_png(tmp_path / "ids.png", ids)
    labels, valid = _binary(foreground_value="nonzero").read(path)
    assert valid.all()
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask > 0)
    with pytest.raises(DataError, match="nonzero"):
        _binary().read(path)


def test_binary_threshold_on_antialiased(tmp_path, nuclei_mask):
    blurred = np.array(Image.fromarray(nuclei_mask).filter(ImageFilter.GaussianBlur(1.5)))
    assert len(np.unique(blurred)) > 50
    path = _save_png(tmp_path / "aa.png", blurred)
    with pytest.raises(DataError, match="binary_threshold"):
        _binary().read(path)
    labels, valid = _binary(binary_threshold=128).read(path)
    assert valid.all()
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), blurred >= 128)
    assert ((blurred >= 128) != (nuclei_mask > 0)).mean() < 0.02
    # a foreground value below the threshold flips the rule: value < t
    labels, _ = _binary(binary_threshold=128, foreground_value=0).read(path)
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), blurred < 128)


def test_binary_jpeg_mask_thresholds_at_midpoint(tmp_path, nuclei_mask):
    path = tmp_path / "m.jpg"
    Image.fromarray(nuclei_mask).save(path, quality=75)
    stored = _png(path)
    assert len(np.unique(stored)) > 2  # compression noise is there
    with open_raster(path) as raster:
        assert raster.lossy
    labels, valid = _binary().read(path)
    assert valid.all()
    fg = labels[:, :, 0].astype(bool)
    np.testing.assert_array_equal(fg, stored >= 128)
    assert (fg == (nuclei_mask > 0)).mean() >= 0.99


def test_binary_foreground_value_zero(tmp_path, nuclei_mask):
    """Foreground stored as 0 (as ISBI 2012 and many EM datasets do): the nuclei mask inverted."""
    path = inverted_nuclei(tmp_path / "inv", [NUCLEI_STEM]) / "train" / "masks" / f"{NUCLEI_STEM}.png"
    mask = _png(path)
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask == 0, nuclei_mask == 255)
    labels, valid = _binary(("nucleus",), foreground_value=0).read(path)
    assert valid.all()
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask == 255)
    labels, _ = _binary(("background",), foreground_value=255).read(path)
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask == 0)
    # the foreground value and one other: 7 and 255 is fine, a third value is not
    other = np.where(mask == 0, 7, 255).astype(np.uint8)
    labels, _ = _binary(("background",), foreground_value=255).read(_save_png(tmp_path / "o.png", other))
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), mask == 255)
    other[:5] = 0
    with pytest.raises(DataError, match="foreground value 255"):
        _binary(("background",), foreground_value=255).read(_save_png(tmp_path / "o3.png", other))


def test_binary_ignore_index(tmp_path, nuclei_mask):
    arr = (nuclei_mask > 0).astype(np.uint8)
    arr[:20] = 255  # an unlabelled strip
    path = _save_png(tmp_path / "ign.png", arr)
    labels, valid = _binary(("background", "nuclei"), ignore_index=255).read(path)
    assert not valid[:20].any() and valid[20:].all()
    np.testing.assert_array_equal(labels[20:, :, 1].astype(bool), nuclei_mask[20:] > 0)
    assert not labels[:20].any()  # ignored pixels are in no class
    with pytest.raises(DataError, match="255"):
        _binary(("background", "nuclei")).read(path)


def test_binary_mask_nodata_is_invalid(tmp_path, nuclei_mask):
    arr = (nuclei_mask > 0).astype(np.uint8)
    arr[-16:, :] = 9  # outside the surveyed area
    path = _geotiff(tmp_path / "nd.tif", arr[:, :, None], nodata=9, compress="deflate")
    labels, valid = _binary().read(path)
    assert not valid[-16:].any() and valid[:-16].all()
    np.testing.assert_array_equal(labels[:-16, :, 0].astype(bool), nuclei_mask[:-16] > 0)


def test_binary_16bit_mask(tmp_path, nuclei_mask):
    arr = np.where(nuclei_mask > 0, 1000, 0).astype(np.uint16)
    path = _write_tiff(tmp_path / "m16.tif", arr, "zstd", "tiled")
    labels, valid = _binary().read(path)
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask > 0)


def test_plain_tiff_nodata_only_from_its_tag(tmp_path, nuclei_mask):
    arr = (nuclei_mask > 0).astype(np.uint8)
    untagged = _write_tiff(tmp_path / "plain.tif", arr, "lzw", "striped")
    with open_raster(untagged) as raster:
        assert raster.nodata is None
    labels, valid = _binary().read(untagged)
    assert valid.all()
    arr[-16:] = 7
    tagged = _write_tiff(tmp_path / "tagged.tif", arr, "lzw", "striped", extratags=[(42113, "s", 0, "7", True)])
    with open_raster(tagged) as raster:
        assert raster.nodata == 7
    labels, valid = _binary().read(tagged)
    assert not valid[-16:].any() and valid[:-16].all()
    np.testing.assert_array_equal(labels[:-16, :, 0].astype(bool), nuclei_mask[:-16] > 0)


def test_binary_16bit_png_mask(tmp_path, nuclei_mask):
    arr = np.where(nuclei_mask > 0, 1000, 0).astype(np.uint16)
    path = _save_png(tmp_path / "m16.png", arr)
    with open_raster(path) as raster:
        assert raster.dtype == np.uint16 and not raster.lossy
    labels, _ = _binary().read(path)
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask > 0)


def test_webp_lossless_is_not_lossy(tmp_path, rgb8, nuclei_mask):
    """A lossless WebP holds exact values: it must not be marked lossy, or a {0, 1} mask would be
    thresholded at 128 and read as all background."""
    image = tmp_path / "i.webp"
    Image.fromarray(rgb8).save(image, lossless=True)
    np.testing.assert_array_equal(read_image(image, channels=3), rgb8)
    lossy = tmp_path / "l.webp"
    Image.fromarray(rgb8).save(lossy, quality=80)
    with open_raster(lossy) as raster:
        assert raster.lossy
    mask = tmp_path / "m.webp"
    Image.fromarray((nuclei_mask > 0).astype(np.uint8)).save(mask, lossless=True)
    with open_raster(mask) as raster:
        assert not raster.lossy
    labels, _ = _binary().read(mask)
    np.testing.assert_array_equal(labels[:, :, 0].astype(bool), nuclei_mask > 0)


# ----------------------------------------------------------------------------- 7. broken files

def _read_all(path: Path) -> None:
    """Open and read every pixel, whole and by windows (a tiled file may fail only in some tiles)."""
    with open_raster(path) as raster:
        raster.read()
    read_image(path, channels=None)
    with open_raster(path) as raster:
        h, w = raster.shape
        for top in range(0, h, 64):
            for left in range(0, w, 64):
                raster.read(Window(top, left, min(64, h - top), min(64, w - left)))


def _broken_sources(tmp: Path, rgb: np.ndarray) -> dict[str, Path]:
    files = {}
    files["png"] = _save_png(tmp / "src.png", rgb)
    files["jpg"] = tmp / "src.jpg"
    Image.fromarray(rgb).save(files["jpg"], quality=90)
    files["tif-zlib-striped"] = _write_tiff(tmp / "src_zs.tif", rgb, "zlib", "striped")
    files["tif-zlib-tiled"] = _write_tiff(tmp / "src_zt.tif", rgb, "zlib", "tiled")
    files["tif-none"] = _write_tiff(tmp / "src_n.tif", rgb, None, "striped")
    files["tif-lzw-bigtiff"] = _write_tiff(tmp / "src_lb.tif", rgb, "lzw", "bigtiff")
    files["geotiff"] = _geotiff(tmp / "src_g.tif", rgb, compress="deflate")
    return files


@pytest.fixture(scope="module")
def broken_sources(module_tmp):
    rgb = _png(NUCLEI_IMAGE)
    return _broken_sources(module_tmp("broken"), rgb)


@pytest.mark.parametrize("kind", ["png", "jpg", "tif-zlib-striped", "tif-zlib-tiled", "tif-none",
                                  "tif-lzw-bigtiff", "geotiff"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_is_data_error(tmp_path, broken_sources, kind, keep):
    src = broken_sources[kind]
    data = src.read_bytes()
    path = tmp_path / f"cut_{src.name}"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(DataError) as err:
        _read_all(path)
    assert path.name in str(err.value)


def test_a_tiff_whose_size_outgrows_its_tiles_is_data_error(tmp_path):
    """A header promising far more rows than its tiles hold (found by fuzzing: 15 769 881 x 40 from 9 tiles of
    16) read as zeros, and predict streamed it for hours; it is refused as damaged, naming the file."""
    path = tmp_path / "tall.tif"
    tifffile.imwrite(path, np.zeros((48, 40, 3), np.uint8), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageLength"].overwrite(15769881)
    with pytest.raises(DataError, match="tall.tif: damaged: its size \\(15769881 x 40\\) needs 2956854 tiles"):
        open_raster(path)


@pytest.mark.parametrize("name", ["noise.png", "noise.jpg", "noise.tif", "noise.tiff", "noise.jp2"])
def test_random_bytes_is_data_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(7).bytes(5000))
    with pytest.raises(DataError) as err:
        _read_all(path)
    assert name in str(err.value)


@pytest.mark.parametrize("magic", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"II+\x00"])
def test_valid_magic_then_garbage_is_data_error(tmp_path, magic):
    ext = {b"\x89": ".png", b"\xff": ".jpg"}.get(magic[:1], ".tif")
    path = tmp_path / f"garbage{ext}"
    path.write_bytes(magic + np.random.default_rng(3).bytes(4000))
    with pytest.raises(DataError) as err:
        _read_all(path)
    assert path.name in str(err.value)


def test_empty_and_missing_files(tmp_path):
    for name in ("empty.png", "empty.tif", "empty.jpg"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(DataError, match="missing.tif"):
        read_image(tmp_path / "missing.tif")


# ----------------------------------------------------------------------------- 8. stacks refused

def _stack() -> np.ndarray:
    """5 real 32x32 planes: consecutive axial slices of an MRI volume (hippocampus_001, uint8)."""
    image, _ = hippo_volume("hippocampus_001")
    return np.ascontiguousarray(grey8(image)[:32, :32, 10:15].transpose(2, 0, 1))


@pytest.mark.parametrize("how", ["shaped", "generic", "imagej-z", "imagej-t", "pages-appended"])
def test_multipage_stack_refused(tmp_path, how):
    stack = _stack()
    path = tmp_path / f"stack_{how}.tif"
    if how == "shaped":
        tifffile.imwrite(path, stack, photometric="minisblack")
    elif how == "generic":
        tifffile.imwrite(path, stack, photometric="minisblack", metadata=None)
    elif how == "imagej-z":
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZYX"})
    elif how == "imagej-t":
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX"})
    else:  # one page a call, as a loop over planes writes them
        for plane in stack:
            tifffile.imwrite(path, plane, append=True)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 5
    with pytest.raises(DataError) as err:
        read_image(path, channels=1)
    msg = str(err.value)
    assert path.name in msg and "one file per plane" in msg, msg


@pytest.mark.parametrize("how", ["subifds", "reduced-pages"])
def test_pyramid_is_not_a_stack(tmp_path, rgb8, how):
    """Several IFDs that are overviews of one image (SubIFDs, or NewSubfileType = reduced pages)
    are one image: level 0 is read, whole and by window, and nothing is refused."""
    path = tmp_path / f"pyr_{how}.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb8, photometric="rgb", tile=(32, 32), compression="zlib",
                 **({"subifds": 2} if how == "subifds" else {}))
        for step in (2, 4):
            tw.write(np.ascontiguousarray(rgb8[::step, ::step]), photometric="rgb", tile=(32, 32),
                     compression="zlib", subfiletype=1)
    with open_raster(path) as raster:
        assert raster.shape == (90, 77) and raster.bands == 3
    np.testing.assert_array_equal(read_image(path, channels=3), rgb8)
    np.testing.assert_array_equal(read_image(path, channels=3, window=Window(33, 31, 40, 35)), rgb8[33:73, 31:66])


def test_imagej_zc_hyperstack_refused(tmp_path):
    stack = _stack()[:4].reshape(2, 2, 32, 32)
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(DataError, match="one file per plane"):
        read_image(path, channels=2)
