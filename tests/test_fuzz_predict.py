"""Fuzzing `segkit predict` on a folder: random bytes, truncated and byte-flipped real PNG, JPEG and
TIFF files, and valid images of odd shapes, types (bool, uint8, uint16, int16, float32) and band
counts (1-8). Whatever the folder holds, predict either writes a complete mask of the image's exact
size, or skips the file naming it (exit 1), or refuses the folder before writing anything (exit 2,
bands that do not fit the model); never a traceback, never a half-written or left-over file.

Bounded for the default tier (10 folders, 150 files); `pytest --all` (make test-all) also runs 100
folders and 1000 files, and SEGKIT_FUZZ_EXAMPLES=500 sets every count to 500.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import NUCLEI, run_cli
from segkit.data.io import read_image
from segkit.data.normalize import Normalization
from segkit.errors import DataError
from segkit.heads import build_head
from segkit.model import build_model, checkpoint_meta, save_checkpoint

EXAMPLES = int(os.environ.get("SEGKIT_FUZZ_EXAMPLES", "0"))
TILE, OVERLAP = 32, 8  # images up to 51 px go through overlapping windows


class Case(NamedTuple):
    """A file for the input folder and what must come of it. `valid`: it must be read; `size`: the
    (H, W) it has if it is read (None: a damaged header may say anything); `fits`: its bands fit a
    3-channel model (1 band, 3 bands, or 3 + declared alpha); `pixels`: the exact (H, W, B) values
    read_image must return (lossless valid images, after the documented conversions: 1-bit and bool
    as 0/255, declared alpha left out)."""

    name: str
    data: bytes
    valid: bool
    size: tuple[int, int] | None
    fits: bool = True
    pixels: np.ndarray | None = None


def _real_pixels() -> np.ndarray:
    """A 48x40 RGB crop of a real nuclei image: the seed of every damaged file."""
    path = sorted((NUCLEI / "test" / "images").iterdir())[0]
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))[:48, :40]


REAL = _real_pixels()


def _encode(fmt: str, pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    if fmt == "tif":  # (H, W, B) is one image of B bands, not B pages
        tifffile.imwrite(buf, pixels, photometric="minisblack", planarconfig="contig" if pixels.ndim == 3 else None,
                         **options)
    else:
        Image.fromarray(pixels).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt], **options)
    return buf.getvalue()


SEEDS = {
    "png": _encode("png", REAL),
    "jpg": _encode("jpg", REAL, quality=90),
    "tif": _encode("tif", REAL, compression="zlib", tile=(16, 16)),
    "lzw.tif": _encode("tif", REAL, compression="lzw"),
}


@st.composite
def valid_image(draw, index: int) -> Case:
    """A valid image file of an odd size, type and band count, and its size as written."""
    h, w = draw(st.integers(1, TILE + 19)), draw(st.integers(1, TILE + 19))
    fmt = draw(st.sampled_from(["png", "jpg", "tif"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if fmt == "jpg":
        bands = draw(st.sampled_from([1, 3]))
        pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        return Case(f"v{index}.jpg", _encode("jpg", pixels.squeeze(2) if bands == 1 else pixels), True, (h, w))
    if fmt == "png":
        mode = draw(st.sampled_from(["1", "L", "LA", "RGB", "RGBA", "I;16"]))
        if mode == "1":
            bits = rng.integers(0, 2, (h, w)).astype(bool)
            im, expect = Image.fromarray(bits), bits[:, :, None].astype(np.uint8) * 255
        elif mode == "I;16":
            expect = rng.integers(0, 65536, (h, w, 1), dtype=np.uint16)
            im = Image.fromarray(expect[:, :, 0])
        else:
            bands = len(mode)
            pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
            im = Image.fromarray(pixels.squeeze(2) if bands == 1 else pixels, mode)
            expect = pixels[:, :, :bands - 1] if mode in ("LA", "RGBA") else pixels  # declared alpha left out
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return Case(f"v{index}.png", buf.getvalue(), True, (h, w), pixels=expect)
    dtype = draw(st.sampled_from(["bool", "uint8", "uint16", "int16", "float32"]))
    bands = 1 if dtype == "bool" else draw(st.integers(1, 8))
    if dtype == "bool":
        pixels = rng.integers(0, 2, (h, w, 1)).astype(bool)
        expect = pixels.astype(np.uint8) * 255
    elif dtype == "float32":
        pixels = expect = rng.normal(0, 1000, (h, w, bands)).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        pixels = expect = rng.integers(info.min, info.max, (h, w, bands), dtype=dtype, endpoint=True)
    options = {"compression": draw(st.sampled_from(["zlib", "lzw", "packbits"]))} if draw(st.booleans()) else {}
    data = _encode("tif", pixels if bands > 1 else pixels[:, :, 0], **options)
    return Case(f"v{index}.tif", data, True, (h, w), fits=bands in (1, 3), pixels=expect)


@st.composite
def damaged_file(draw, index: int) -> Case:
    """Random bytes, or a real file truncated, with bytes overwritten, or with junk inserted."""
    how = draw(st.sampled_from(["random", "truncate", "overwrite", "insert"]))
    if how == "random":
        ext = draw(st.sampled_from(["png", "jpg", "tif"]))
        return Case(f"d{index}.{ext}", draw(st.binary(max_size=600)), False, None)
    seed = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[seed])
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        data = data[:at]
    elif how == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=16))
        data[at:at + len(junk)] = junk
    else:
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    size = REAL.shape[:2] if how == "truncate" else None  # the header, if still whole, says the real size
    return Case(f"d{index}.{seed.rsplit('.', 1)[-1]}", bytes(data), False, size)


def folder_cases() -> st.SearchStrategy[list[Case]]:
    """One to four files, each valid or damaged."""
    return st.integers(1, 4).flatmap(lambda n: st.tuples(*[
        st.one_of(valid_image(i), damaged_file(i)) for i in range(n)]).map(list))


@pytest.fixture(scope="module")
def checkpoint(module_tmp) -> Path:
    """A random-weight sigmoid U-Net (resnet18) taking 3 channels."""
    torch.manual_seed(0)
    head = build_head("sigmoid", ["nucleus"])
    folder = module_tmp("fuzz") / "ckpt"
    meta = checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3),
                           data={"mask": "multilabel"})
    save_checkpoint(folder, build_model("Unet", "resnet18", 1), meta)
    return folder


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _fuzz(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_folder(checkpoint: Path, cases: list[Case], probs: bool, tta: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "in", Path(tmp) / "out"
        images.mkdir()
        for case in cases:
            (images / case.name).write_bytes(case.data)
        r = run_cli("predict", checkpoint, images, out, "--device", "cpu", "--no-progress", "--workers", "0",
                    "--tile", TILE, "--overlap", OVERLAP, *(["--save-probs"] if probs else []),
                    *(["--tta"] if tta else []))
        assert "Traceback" not in r.err + r.out, r.err
        assert not [p for p in _files(out) if p.name.startswith(".")], "a temporary file was left"
        misfits = [c for c in cases if c.valid and not c.fits]
        if r.code == 2:  # refused from the headers: bands that do not fit, named; nothing written
            assert "do not fit the model" in r.err, r
            named = [c for c in cases if str(images / c.name) in r.err]
            assert named and all(not c.valid or not c.fits for c in named), r.err
            assert _files(out) == [], "a refused folder must write nothing"
            return
        assert not misfits, f"{[c.name for c in misfits]} do not fit the model, yet predict exited {r.code}"
        failed = dict(re.findall(r"^failed: (\S+): (.*)$", r.err, flags=re.M))
        assert r.code == (1 if failed else 0), r
        written = set()
        for case in cases:
            stem = Path(case.name).stem
            mask = out / "nucleus" / f"{stem}.png"
            if str(images / case.name) in failed:
                assert not case.valid, f"{case.name} is valid, yet: {failed[str(images / case.name)]}"
                assert not mask.exists() and not (out / f"{stem}.npy").exists()
                continue
            with Image.open(mask) as im:  # complete and decodable
                arr = np.array(im)
            if case.size is not None:
                assert arr.shape == case.size, (case.name, arr.shape, case.size)
            assert set(np.unique(arr)) <= {0, 255}
            written.add(mask)
            if probs:
                prob = np.load(out / f"{stem}.npy")
                assert prob.shape == (1, *arr.shape) and prob.dtype == np.float16
                written.add(out / f"{stem}.npy")
        assert set(_files(out)) == written, "files beyond the masks of readable images"


@_fuzz(10)
@given(cases=folder_cases(), probs=st.booleans(), tta=st.booleans())
def test_predict_on_a_fuzzed_folder_writes_exact_masks_or_names_each_bad_file(checkpoint, cases, probs, tta):
    check_folder(checkpoint, cases, probs, tta)


@pytest.mark.slow
@_fuzz(100)
@given(cases=folder_cases(), probs=st.booleans(), tta=st.booleans())
def test_predict_on_a_fuzzed_folder_writes_exact_masks_or_names_each_bad_file_more(checkpoint, cases, probs, tta):
    check_folder(checkpoint, cases, probs, tta)


def check_file(case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / case.name
        path.write_bytes(case.data)
        try:
            pixels = read_image(path, channels=None)
        except DataError as err:
            assert str(path) in str(err) and "Fix:" in str(err), str(err)
            assert not case.valid, f"a valid image was refused: {err}"
            return
        assert pixels.ndim == 3 and pixels.shape[2] >= 1
        if case.size is not None:
            assert pixels.shape[:2] == case.size
        if case.pixels is not None:
            assert pixels.dtype == case.pixels.dtype
            np.testing.assert_array_equal(pixels, case.pixels)


@_fuzz(150)
@given(case=st.one_of(valid_image(0), damaged_file(0)))
def test_read_image_of_a_fuzzed_file_is_exact_or_a_data_error_naming_it(case):
    check_file(case)


@pytest.mark.slow
@_fuzz(1000)
@given(case=st.one_of(valid_image(0), damaged_file(0)))
def test_read_image_of_a_fuzzed_file_is_exact_or_a_data_error_naming_it_more(case):
    check_file(case)
