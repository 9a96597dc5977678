"""The Python API of the README: `Segmenter.predict_file` writes the masks (and probabilities) of the
model run here by hand, on real images, for both heads: a nuclei PNG (PNG masks, padding to the stride
involved) and a real GeoTIFF (GeoTIFF masks on its exact grid).

By hand: an smp model given the checkpoint's safetensors weights, model.json's normalisation applied
with numpy, zero padding (centred, as training pads) by numpy, the head's rule written out (sigmoid: probability above the
threshold; softmax: argmax). The checkpoints are conftest's `content_checkpoints`, whose masks follow
the image. Two float32 runs of one network differ by ~1e-5 of its largest logit (NOISE is 5x that):
a pixel that close to its decision may go either way and is not compared (such pixels are rare), and
probabilities may differ by that much on top of float16 rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from conftest import NUCLEI
from reference import padded_logits
from samples import SPACENET
from segkit import Segmenter

NOISE = 5e-5
GEOTIFF = SPACENET / "unlabelled" / "albers_3band_int16_nodata.tif"
"""512 x 512, 3 bands int16, a custom Albers CRS, nodata -9999 (no pixel holds it)."""


def decided(head: str, logits: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus mask, clear) by the head's rule: sigmoid p > threshold, softmax argmax (the first class
    at a tie); `clear` marks pixels farther from the decision than two float32 runs may differ."""
    margin = logits[0] - np.log(threshold / (1 - threshold)) if head == "sigmoid" else logits[1] - logits[0]
    return margin > 0, np.abs(margin) > 2 * NOISE * np.abs(logits).max()


def probabilities_match(head: str, got: np.ndarray, logits: np.ndarray) -> bool:
    """Saved probabilities (float16-rounded) against the activated float64 logits: within one float16 step
    (rounding is half a step), plus what float32 noise in the logits moves a probability (slope <= 1/2)."""
    want = sigmoid(logits) if head == "sigmoid" else softmax(logits)
    step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    return bool((np.abs(got.astype(np.float64) - want) <= step + NOISE * np.abs(logits).max()).all())


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


@pytest.fixture(scope="module")
def nuclei_image(module_tmp) -> Path:
    """The 360 x 360 real nuclei test image (not a multiple of 32: prediction pads it), copied."""
    path = next(p for p in sorted((NUCLEI / "test" / "images").glob("*.png")) if Image.open(p).size == (360, 360))
    folder = module_tmp("in")
    shutil.copy(path, folder / path.name)
    return folder / path.name


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_predict_file_of_a_png_writes_the_masks_and_probabilities_of_the_model_by_hand(
        content_checkpoints, nuclei_image, tmp_path, head):
    ckpt = content_checkpoints[head]
    seg = Segmenter.load(ckpt, device="cpu")
    written = seg.predict_file(nuclei_image, tmp_path / "out", probs=True)
    stem = nuclei_image.stem
    mask_file = tmp_path / "out" / ("nucleus" if head == "sigmoid" else "") / f"{stem}.png"
    assert written == [mask_file, tmp_path / "out" / f"{stem}.npy"]
    assert sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) == sorted(written)  # nothing else
    image = np.asarray(Image.open(nuclei_image).convert("RGB"))
    logits = padded_logits(ckpt, image)
    nucleus, clear = decided(head, logits)
    assert clear.mean() > 0.995 and 0.1 < nucleus.mean() < 0.9  # few near-ties; masks that follow the image
    with Image.open(mask_file) as im:
        assert im.size == (360, 360) and im.mode == ("L" if head == "sigmoid" else "P")
        mask = np.asarray(im)
    assert np.array_equal(mask[clear], np.where(nucleus[clear], 255 if head == "sigmoid" else 1, 0))
    probs = np.load(tmp_path / "out" / f"{stem}.npy")
    assert probs.dtype == np.float16 and probs.shape == logits.shape
    assert probabilities_match(head, probs, logits)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_predict_file_of_a_geotiff_writes_geotiff_masks_on_its_grid(content_checkpoints, tmp_path, head):
    """A real 3-band int16 GeoTIFF (custom CRS): masks as GeoTIFFs with its CRS, transform and size,
    nodata 255; softmax one index band, sigmoid one 0/1 file per class; probabilities as float32 bands.
    The checkpoint's normalisation is set (model.json) to the raster's own band statistics, as `dataset`
    normalisation would give: aerial int16 values through ImageNet statistics would be far off scale."""
    with rasterio.open(GEOTIFF) as src:
        image = src.read().transpose(1, 2, 0)
        grid = (src.crs, src.transform, src.width, src.height)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(content_checkpoints[head], ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    pixels = image.reshape(-1, 3).astype(np.float64)
    meta["normalization"].update(mode="dataset", mean=pixels.mean(0).tolist(), std=pixels.std(0).tolist())
    (ckpt / "model.json").write_text(json.dumps(meta))
    seg = Segmenter.load(ckpt, device="cpu")
    written = seg.predict_file(GEOTIFF, tmp_path / "out", probs=True)
    stem = GEOTIFF.stem
    mask_file = tmp_path / "out" / ("nucleus" if head == "sigmoid" else "") / f"{stem}.tif"
    assert written == [mask_file, tmp_path / "out" / f"{stem}_probs.tif"]
    logits = padded_logits(ckpt, image)
    nucleus, clear = decided(head, logits)
    assert clear.mean() > 0.995 and 0.1 < nucleus.mean() < 0.9
    with rasterio.open(mask_file) as out:
        assert (out.crs, out.transform, out.width, out.height) == grid
        assert out.count == 1 and out.dtypes == ("uint8",) and out.nodata == 255
        mask = out.read(1)
    assert np.array_equal(mask[clear], nucleus[clear].astype(np.uint8))
    with rasterio.open(written[1]) as out:
        assert (out.crs, out.transform, out.width, out.height) == grid
        assert out.count == len(logits) and out.dtypes == ("float32",) * len(logits)
        probs = out.read()
    assert probabilities_match(head, probs, logits)
