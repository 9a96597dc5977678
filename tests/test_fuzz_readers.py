"""Property-based tests of the readers: images and masks generated over every dtype segkit reads
(bool, uint8, uint16, int16, float32), 1-8 bands, sizes from 1x1 to odd sizes larger than a tile,
as PNG, TIFF (tifffile: zlib, LZW, zstd, packbits, none; tiled or striped; chunky or planar),
GeoTIFF (GDAL) and JPEG wherever the format holds the type; then the same files truncated, with
flipped bytes, and random bytes. `open_raster(...).read(window)`, `read_image` and the mask
formats either return exactly what was written (lossless; JPEG: shape and type) at exactly its
size, or raise segkit's DataError naming the file; never another exception, never a wrong size.

Expected values are computed here from the generated arrays, independently of segkit's code.
About 50 examples a test (a few seconds); `pytest --all` (make test-all) also runs the same
properties with 500 examples each.
"""

from __future__ import annotations

import functools
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from samples import NUCLEI, SPACENET
from segkit.data.io import read_image
from segkit.data.masks import build_mask_format
from segkit.data.readers import Window, open_raster
from segkit.errors import DataError

FAST, SLOW = 50, 500
MAX_DECODE_BYTES = 64 << 20
"""A damaged header may declare any size: pixels are read only when that size fits this budget."""


def _fuzz(examples: int) -> Callable:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- generated files ----------------------------------------------------------------------------

FORMATS: dict[str, list[tuple[str, int]]] = {
    # (dtype, bands) each format holds
    "png": [("bool", 1), ("uint8", 1), ("uint8", 2), ("uint8", 3), ("uint8", 4), ("uint16", 1), ("uint16", 3),
            ("uint16", 4)],
    "jpeg": [("uint8", 1), ("uint8", 3)],
    "tiff": [(d, b) for d in ("bool", "uint8", "uint16", "int16", "float32") for b in range(1, 9)],
    "geotiff": [(d, b) for d in ("uint8", "uint16", "int16", "float32") for b in range(1, 9)],
}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "geotiff": ".tif"}
UTM_TRANSFORM = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)


class Written(NamedTuple):
    """A file as written: its pixels (H, W, B) in the written type, the bands it declares alpha."""

    path: Path
    pixels: np.ndarray
    alpha: tuple[int, ...]
    lossy: bool

    @property
    def expected(self) -> np.ndarray:
        """What a reader must give for every band: bool as 0/255 uint8, the rest as written."""
        return self.pixels.astype(np.uint8) * 255 if self.pixels.dtype == bool else self.pixels


def _pixels(rng: np.random.Generator, h: int, w: int, b: int, dtype: str) -> np.ndarray:
    if dtype == "bool":
        return rng.random((h, w, b)) < 0.5
    if dtype == "float32":
        arr = (rng.standard_normal((h, w, b)) * 1000).astype(np.float32)
        odd = rng.random((h, w, b))
        arr[odd < 0.02] = np.nan
        arr[(odd >= 0.02) & (odd < 0.03)] = np.inf
        arr[(odd >= 0.03) & (odd < 0.04)] = -0.0
        return arr
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=(h, w, b), dtype=dtype)


def _write(path: Path, fmt: str, arr: np.ndarray, opts: dict[str, Any]) -> Written:
    """Write (H, W, B) `arr` as `fmt` with encoder options drawn by `file_options`."""
    h, w, b = arr.shape
    alpha: tuple[int, ...] = ()
    if fmt == "png":
        if arr.dtype == np.uint16 and b > 1:  # Pillow writes no 16-bit colour PNG: OpenCV does (BGR order)
            cv2.imwrite(str(path), arr[:, :, [2, 1, 0, 3][:b]], [cv2.IMWRITE_PNG_COMPRESSION, opts["level"]])
        else:
            mode = {1: None, 2: "LA", 3: "RGB", 4: "RGBA"}[b]
            im = Image.fromarray(arr[:, :, 0]) if b == 1 else Image.fromarray(arr, mode)
            im.save(path, compress_level=opts["level"])
        alpha = (b - 1,) if b in (2, 4) else ()
    elif fmt == "jpeg":
        Image.fromarray(arr[:, :, 0] if b == 1 else arr).save(path, quality=opts["quality"])
    elif fmt == "tiff":
        separate = opts["separate"] or (arr.dtype == bool and b > 1)  # tifffile packs chunky 1-bit samples wrongly
        data = arr[:, :, 0] if b == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1)) if separate else arr
        kw: dict[str, Any] = dict(photometric="minisblack", compression=opts["compression"])
        if b > 1:
            kw["planarconfig"] = "separate" if separate else "contig"
        if opts["tile"]:
            kw["tile"] = (opts["tile"], opts["tile"])
        else:
            kw["rowsperstrip"] = opts["rows"]
        tifffile.imwrite(path, data, **kw)
    else:
        profile: dict[str, Any] = dict(driver="GTiff", width=w, height=h, count=b, dtype=arr.dtype.name,
                                       crs="EPSG:32616", transform=UTM_TRANSFORM, interleave=opts["interleave"],
                                       photometric="MINISBLACK")
        if opts["compression"]:
            profile["compress"] = {"zlib": "deflate"}.get(opts["compression"], opts["compression"])
        if opts["tile"]:
            profile.update(tiled=True, blockxsize=opts["tile"], blockysize=opts["tile"])
        else:
            profile["blockysize"] = opts["rows"]
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(arr.transpose(2, 0, 1))
    return Written(path, arr, alpha, fmt == "jpeg")


sides = st.one_of(st.just(1), st.integers(1, 9), st.integers(10, 90))
file_options = st.fixed_dictionaries({
    "level": st.integers(0, 9), "quality": st.integers(50, 100),
    "compression": st.sampled_from([None, "zlib", "lzw", "zstd", "packbits"]),
    "tile": st.sampled_from([None, 16, 32]), "rows": st.integers(1, 40),
    "separate": st.booleans(), "interleave": st.sampled_from(["pixel", "band"])})


class ImageCase(NamedTuple):
    fmt: str
    dtype: str
    h: int
    w: int
    bands: int
    seed: int
    opts: dict[str, Any]

    def write(self, folder: Path, name: str = "image") -> Written:
        arr = _pixels(np.random.default_rng(self.seed), self.h, self.w, self.bands, self.dtype)
        return _write(folder / f"{name}{SUFFIX[self.fmt]}", self.fmt, arr, self.opts)


@st.composite
def image_cases(draw, formats: tuple[str, ...] = tuple(FORMATS)) -> ImageCase:
    fmt = draw(st.sampled_from(formats))
    dtype, bands = draw(st.sampled_from(FORMATS[fmt]))
    return ImageCase(fmt, dtype, draw(sides), draw(sides), bands, draw(st.integers(0, 2 ** 32 - 1)),
                     draw(file_options))


@st.composite
def windows(draw, h: int, w: int) -> Window:
    top, left = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    return Window(top, left, draw(st.integers(1, h - top)), draw(st.integers(1, w - left)))


def _cut(arr: np.ndarray, win: Window) -> np.ndarray:
    return arr[win.top:win.top + win.height, win.left:win.left + win.width]


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_array_equal(got, want)  # NaN equals NaN here, as written


# -- 1. valid images: exact pixels, exact size ----------------------------------------------------


def check_image(case: ImageCase, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = case.write(Path(tmp))
        want = written.expected
        h, w, b = want.shape
        win = data.draw(windows(h, w), label="window")
        with open_raster(written.path) as raster:
            assert (raster.height, raster.width, raster.bands) == (h, w, b)
            assert raster.alpha == written.alpha
            full = raster.read()
            part = raster.read(win)
        colour = [i for i in range(b) if i not in written.alpha]
        image = read_image(written.path, channels=None)
        image_part = read_image(written.path, channels=None, window=win)
        if written.lossy:
            assert full.shape == want.shape and full.dtype == want.dtype
            assert image.shape == (h, w, len(colour)) and image.dtype == want.dtype
        else:
            _same(full, want)
            _same(image, want[:, :, colour])
        _same(part, _cut(full, win))
        _same(image_part, _cut(image, win))


@_fuzz(FAST)
@given(case=image_cases(), data=st.data())
def test_images_read_back_exactly(case, data):
    check_image(case, data)


@pytest.mark.slow
@_fuzz(SLOW)
@given(case=image_cases(), data=st.data())
def test_images_read_back_exactly_more(case, data):
    check_image(case, data)


# -- 2. masks: every format's labels and valid pixels, or a DataError naming the file ---------------


class MaskCase(NamedTuple):
    kind: str  # binary | index | color | multilabel
    files: list[Written]  # one, or one per named class (multilabel)
    options: dict[str, Any]  # build_mask_format keyword arguments
    classes: list[str]


def _grey_or_none(written: Written) -> np.ndarray | None:
    """(H, W) values of a one-band mask (alpha left out; 3 equal bands count as grey), else None."""
    arr = np.delete(written.expected, list(written.alpha), axis=2)
    if arr.shape[2] == 3 and (arr == arr[:, :, :1]).all():
        return arr[:, :, 0]
    return arr[:, :, 0] if arr.shape[2] == 1 else None


def expected_binary(written: Written) -> tuple[np.ndarray, np.ndarray] | None:
    """(foreground, valid) by the README's rule for lossless binary masks, or None: a DataError is due
    (not one grey band, or more than one non-zero value)."""
    grey = _grey_or_none(written)
    if grey is None:
        return None
    valid = ~np.isnan(grey) if grey.dtype.kind == "f" else np.ones(grey.shape, bool)
    if len(np.unique(grey[valid & (grey != 0)])) > 1:
        return None
    return (grey != 0) & valid, valid


def expected_labels(case: MaskCase) -> tuple[np.ndarray, np.ndarray] | None:
    """Multi-hot labels (H, W, C) and valid pixels, computed from the written arrays; None: DataError due."""
    n = len(case.classes)
    if case.kind == "binary":
        got = expected_binary(case.files[0])
        if got is None:
            return None
        fg, valid = got
        layers = [fg] if n == 1 else [~fg & valid, fg]
        return np.stack(layers, axis=2).astype(np.uint8), valid
    if case.kind == "multilabel":
        got = [expected_binary(f) for f in case.files]
        if any(g is None for g in got):
            return None
        valid = np.logical_and.reduce([v for _, v in got])
        fgs = [fg & valid for fg, _ in got]
        rest = ~np.logical_or.reduce(fgs) & valid
        return np.stack(fgs + [rest], axis=2).astype(np.uint8), valid
    written = case.files[0]
    if case.kind == "index":
        grey = _grey_or_none(written)
        if grey is None or written.expected.shape[2] - len(written.alpha) != 1:
            return None
        ignore = case.options["ignore_index"]
        valid = np.ones(grey.shape, bool) if ignore is None else grey != ignore
        if grey.dtype.kind == "f":
            valid &= ~np.isnan(grey)
        labels = np.stack([grey == k for k in range(n)], axis=2)
        if (valid & ~labels.any(axis=2)).any():  # a value that is no class and not ignored
            return None
        return labels.astype(np.uint8), valid
    rgb = np.delete(written.expected, list(written.alpha), axis=2)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    if rgb.shape[2] != 3:
        return None
    labels = np.stack([(rgb == c).all(axis=2) for c in case.options["colors"]], axis=2)
    if not labels.any(axis=2).all():
        return None
    return labels.astype(np.uint8), np.ones(rgb.shape[:2], bool)


MASK_FORMATS = {  # (format, dtype, bands) a mask of each kind may be stored as
    "binary": [(f, d, b) for f in ("png", "tiff") for d, b in FORMATS[f] if b <= 3] + [("jpeg", "uint8", 1)],
    "index": [("png", "uint8", 1), ("png", "uint16", 1), ("tiff", "uint8", 1), ("tiff", "uint16", 1),
              ("tiff", "int16", 1), ("tiff", "float32", 1), ("tiff", "uint8", 3), ("png", "uint8", 2)],
    "color": [("png", "uint8", 3), ("png", "uint8", 4), ("png", "uint8", 1), ("tiff", "uint8", 3),
              ("tiff", "uint16", 3), ("jpeg", "uint8", 3)],
}


def _mask_values(draw, rng: np.random.Generator, kind: str, dtype: str, h: int, w: int, bands: int,
                 n: int, ignore: int | None, colors: list[list[int]]) -> np.ndarray:
    """Mostly well-formed mask values of `kind`, sometimes with a stray value (a DataError is due)."""
    stray = draw(st.sampled_from([False, False, True]), label="stray value")
    if kind == "color":
        table = np.array(colors + ([[7, 8, 9]] if stray else []), dtype=np.uint8)
        rgb = table[rng.integers(0, len(table), (h, w))]
        arr = rgb[:, :, :1] if bands == 1 else np.dstack([rgb, np.full((h, w, 1), 255, np.uint8)]) \
            if bands == 4 else rgb
        return arr.astype(dtype)
    if dtype == "bool":
        return rng.random((h, w, bands)) < 0.5
    if kind == "binary":
        info = np.iinfo(dtype) if dtype != "float32" else None
        pick = (lambda: float(rng.standard_normal() * 100)) if info is None else \
            (lambda: int(rng.integers(info.min, int(info.max) + 1)))
        values = [0, pick() or 1] + ([pick() or 2] if stray else [])
        arr = np.array(values, dtype=dtype)[rng.integers(0, len(values), (h, w))]
        if dtype == "float32" and draw(st.booleans(), label="NaN pixels"):
            arr[rng.random((h, w)) < 0.1] = np.nan
    else:
        arr = rng.integers(0, n, (h, w)).astype(dtype)
        if ignore is not None:
            arr[rng.random((h, w)) < 0.1] = ignore
        if stray:
            bad = {"int16": -3, "float32": 0.5}.get(dtype, n + 1)
            arr[rng.integers(0, h), rng.integers(0, w)] = bad
    layers = [arr] * bands if draw(st.booleans(), label="equal bands") else \
        [arr] + [np.roll(arr, k, axis=1) for k in range(1, bands)]
    return np.stack(layers, axis=2)


@st.composite
def mask_cases(draw, folder: Path) -> MaskCase:
    kind = draw(st.sampled_from(["binary", "index", "color", "multilabel"]))
    h, w, seed = draw(sides), draw(sides), draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(2, 5))
    colors = [list(c) for c in draw(st.lists(st.tuples(*[st.integers(0, 255)] * 3), min_size=n, max_size=n,
                                             unique=True))]
    names = [f"c{k}" for k in range(n)]
    files, options = [], {}
    if kind == "multilabel":
        names = names[:2] + ["rest"]
        for k in range(2):
            fmt, dtype, bands = draw(st.sampled_from(MASK_FORMATS["binary"]))
            arr = _mask_values(draw, rng, "binary", dtype, h, w, bands, n, None, colors)
            files.append(_write(folder / f"m{k}{SUFFIX[fmt]}", fmt, arr, draw(file_options)))
    else:
        fmt, dtype, bands = draw(st.sampled_from(MASK_FORMATS["binary" if kind == "binary" else kind]))
        ignore = draw(st.sampled_from([None, 255])) if kind == "index" and dtype != "int16" else None
        options = {"ignore_index": ignore, "colors": colors if kind == "color" else None}
        if kind == "binary":
            names = names[:draw(st.integers(1, 2))]
        arr = _mask_values(draw, rng, kind, dtype, h, w, bands, n, ignore, colors)
        files.append(_write(folder / f"m{SUFFIX[fmt]}", fmt, arr, draw(file_options)))
    return MaskCase(kind, files, options, names)


def _named(err: DataError, paths: list[Path]) -> None:
    assert any(str(p) in str(err) for p in paths), (str(err), paths)


def check_mask(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        case = data.draw(mask_cases(Path(tmp)), label="mask")
        fmt = build_mask_format(case.kind, case.classes, **case.options)
        source = {name: f.path for name, f in zip(case.classes, case.files)} if case.kind == "multilabel" \
            else case.files[0].path
        h, w = case.files[0].pixels.shape[:2]
        win = data.draw(windows(h, w), label="window")
        paths = [f.path for f in case.files]
        try:
            labels, valid = fmt.read(source)
        except DataError as err:
            _named(err, paths)
            if not any(f.lossy for f in case.files):
                assert expected_labels(case) is None, f"refused a well-formed mask: {err}"
            return
        assert labels.shape == (h, w, len(case.classes)) and labels.dtype == np.uint8
        assert valid.shape == (h, w) and valid.dtype == bool
        if not any(f.lossy for f in case.files):
            want = expected_labels(case)
            assert want is not None, "a malformed mask was read without a word"
            _same(labels, want[0])
            _same(valid, want[1])
        part_labels, part_valid = fmt.read(source, win)
        _same(part_labels, _cut(labels, win))
        _same(part_valid, _cut(valid, win))


@_fuzz(FAST)
@given(data=st.data())
def test_masks_give_exact_labels_or_name_the_file(data):
    check_mask(data)


@pytest.mark.slow
@_fuzz(SLOW)
@given(data=st.data())
def test_masks_give_exact_labels_or_name_the_file_more(data):
    check_mask(data)


@pytest.mark.parametrize("dtype, stray", [("int16", -3), ("float32", 0.5), ("uint16", 300)])
def test_an_index_mask_value_that_is_no_class_is_refused(tmp_path, dtype, stray):
    """Found by the fuzzing above: a negative (int16) or fractional (float) index matched no class and
    was read as a valid pixel of no class at all; only values above the classes were refused."""
    arr = np.array([[0, 1], [1, stray]], dtype=dtype)
    tifffile.imwrite(tmp_path / "m.tif", arr, photometric="minisblack")
    with pytest.raises(DataError) as err:
        build_mask_format("index", ["a", "b"]).read(tmp_path / "m.tif")
    assert str(err.value).startswith(f"{tmp_path / 'm.tif'}: values [{stray}] are outside the 2 classes 0..1")


# -- 3. damaged files: a DataError naming the file, or pixels of the size the header states ---------

H_AND_E = NUCLEI / "train" / "images" / "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e.png"


@functools.cache
def real_files() -> dict[str, bytes]:
    """Real files damaged alongside the generated ones, by name: a nuclei PNG as stored, a JPEG
    (quality 90) encoded here from the H&E nuclei image, and the SpaceNet building mask (TIFF)."""
    jpeg = io.BytesIO()
    with Image.open(H_AND_E) as im:
        im.convert("RGB").save(jpeg, format="JPEG", quality=90)
    return {"nuclei.png": sorted((NUCLEI / "test" / "images").iterdir())[0].read_bytes(),
            "h-and-e.jpg": jpeg.getvalue(),
            "buildings-mask.tif": (SPACENET / "masks" / "buildings.tif").read_bytes()}


def _attempt(path: Path, action: Callable[[], Any]) -> Any:
    """`action()`, or None when it raised segkit's DataError naming `path`; any other exception fails."""
    try:
        return action()
    except DataError as err:
        _named(err, [path])
        return None


def check_damaged(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if data.draw(st.integers(0, 5), label="real source") == 0:
            name = data.draw(st.sampled_from(sorted(real_files())), label="real file")
            raw, suffix, original = real_files()[name], Path(name).suffix, None
        else:
            written = data.draw(image_cases(), label="image").write(Path(tmp), "source")
            raw, suffix = written.path.read_bytes(), written.path.suffix
            original = None if written.lossy else written.expected
        how = data.draw(st.sampled_from(["truncate", "flip", "random", "magic"]), label="damage")
        if how == "truncate":
            damaged = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep bytes")]
        elif how == "flip":
            buf = bytearray(raw)
            for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8), label="flips"):
                buf[at] ^= data.draw(st.integers(1, 255), label="xor")
            damaged = bytes(buf)
        else:
            noise = data.draw(st.binary(min_size=0, max_size=3000), label="noise")
            damaged = raw[:8] + noise if how == "magic" else noise
        path = Path(tmp) / f"damaged{suffix}"
        path.write_bytes(damaged)

        raster = _attempt(path, lambda: open_raster(path))
        if raster is None:
            event(f"{how}: refused at open")
            return
        with raster:
            h, w, b = raster.height, raster.width, raster.bands
            assert min(h, w, b) >= 1
            if h * w * b * raster.dtype.itemsize > MAX_DECODE_BYTES:
                return  # a header grown by the damage: reading it would only test the memory of this machine
            win = data.draw(windows(h, w), label="window")
            full = _attempt(path, raster.read)
            part = _attempt(path, lambda: raster.read(win))
        event(f"{how}: {'read' if full is not None else 'refused at read'}")
        for got, shape in ((full, (h, w, b)), (part, (win.height, win.width, b))):
            if got is not None:
                assert got.shape == shape and got.dtype == raster.dtype, (got.shape, shape, got.dtype)
        if how == "truncate" and full is not None and original is not None:
            _same(full, original)  # a cut file read without a word must have lost nothing
        image = _attempt(path, lambda: read_image(path, channels=None))
        if image is not None:
            assert image.shape[:2] == (h, w)
        labels = _attempt(path, lambda: build_mask_format("binary", ["fg"], foreground_value="nonzero").read(path))
        if labels is not None:
            assert labels[0].shape == (h, w, 1) and labels[1].shape == (h, w)


@_fuzz(FAST)
@given(data=st.data())
def test_damaged_files_raise_data_error_or_read_at_their_size(data):
    check_damaged(data)


@pytest.mark.slow
@_fuzz(SLOW)
@given(data=st.data())
def test_damaged_files_raise_data_error_or_read_at_their_size_more(data):
    check_damaged(data)
