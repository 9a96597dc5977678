"""Edge cases of reading, normalising and training that a review found: each would fail on the
code before its fix."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from PIL import Image

from conftest import CONFIGS, copy_nuclei, run_cli, train_args
from segkit.data.io import read_image
from segkit.data.masks import build_mask_format
from segkit.data.normalize import Normalization, fit, valid_pixels
from segkit.data.readers import open_raster
from segkit.errors import DataError, SegkitError
from segkit.heads import build_head


def test_sixteen_bit_rgb_png_keeps_its_sixteen_bits(tmp_path):
    import cv2

    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 2000, 1000, 7
    cv2.imwrite(str(tmp_path / "x.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    out = read_image(tmp_path / "x.png", 3)
    assert out.dtype == np.uint16 and np.array_equal(out, rgb)
    assert open_raster(tmp_path / "x.png").dtype == np.uint16


def test_palette_index_mask_with_a_transparent_entry_gives_its_indices(tmp_path):
    m = Image.fromarray(np.array([[0, 1], [255, 2]], np.uint8), "P")
    m.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    m.save(tmp_path / "m.png", transparency=255)
    labels, valid = build_mask_format("index", ["a", "b", "c"], ignore_index=255).read(tmp_path / "m.png")
    assert valid.tolist() == [[True, True], [False, True]]
    assert labels.argmax(2)[valid].tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_no_data_in_statistics_and_inputs(bad):
    """The statistics of the two valid pixels (1, 10) and (3, 30), by hand: the 0.5/99.5 percentiles
    (linear between the two values: 1.01/2.99 and 10.1/29.9), then the clipped values' mean and
    (population) std: band 1 (1.01, 2.99) -> 2, 0.99; band 2 (10.1, 29.9) -> 20, 9.9. A NaN or infinite
    input becomes 0, every other value passes unchanged (normalize: none)."""
    px = np.array([[[1.0, 10.0], [np.nan, 20.0]], [[3.0, 30.0], [5.0, bad]]], np.float32)
    values = valid_pixels(px, None)
    assert values.tolist() == [[1.0, 10.0], [3.0, 30.0]]  # a pixel with a NaN or infinite band is left out
    norm = fit("dataset", [("a.tif", np.float32, lambda: values)], 2)
    assert norm.mode == "dataset"
    for got, want in ((norm.mean, (2.0, 20.0)), (norm.std, (0.99, 9.9)), (norm.low, (1.01, 10.1)),
                      (norm.high, (2.99, 29.9))):
        assert got == pytest.approx(want, rel=1e-12)
    x = torch.from_numpy(px.transpose(2, 0, 1))[None]
    before = x.clone()
    out = Normalization("none").apply(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.isinf(), before.isinf())  # caller's unchanged
    clean = np.where(np.isfinite(px), px, np.float32(0))
    assert torch.equal(out, torch.from_numpy(clean.transpose(2, 0, 1))[None])


def test_two_band_images_are_shown_by_their_first_band():
    from segkit.viz import to_display

    img = np.stack([np.arange(20, dtype=np.uint8).reshape(4, 5), np.zeros((4, 5), np.uint8)], axis=2)
    shown = to_display(img)
    assert shown.shape == (4, 5, 3) and (shown == img[:, :, :1]).all()


def test_a_geotiff_stack_is_refused_not_cut_to_its_first_plane(tmp_path):
    from rasterio.transform import from_origin

    path = tmp_path / "stack.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32616",
                       transform=from_origin(0, 80, 10, 10)) as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    tifffile.imwrite(path, np.ones((8, 8), np.uint8), append=True)
    with pytest.raises(DataError, match="one file per plane"):
        open_raster(path)


def test_a_legacy_checkpoint_refuses_inputs_it_scaled_differently():
    norm = Normalization.from_meta({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    norm.check_dtype(np.uint8, "x.png")
    with pytest.raises(SegkitError, match="segkit 0.1"):
        norm.check_dtype(np.uint16, "x.tif")


def test_rescale_augmentation_takes_32_bit_images():
    from segkit.data.transforms import Augment

    image = np.arange(64 * 64 * 2, dtype=np.int32).reshape(64, 64, 2)
    stack = np.zeros((64, 64, 1), np.uint8)
    out, bits = Augment(32, scale=(0.5, 0.9))(image, stack, np.random.default_rng(0), 0)
    assert out.shape == (32, 32, 2) and bits.shape == (32, 32, 1)


def test_spaced_validation_rows_keep_their_columns_and_resume(tmp_path):
    """val_every 2: unvalidated epochs are NaN rows with every column; metrics.csv reads back on resume."""
    data = copy_nuclei(tmp_path / "data", 6)
    args = train_args(CONFIGS / "nuclei-sigmoid.yaml", data, tmp_path / "run", "--set", "train.val_every=2",
                      "--set", "train.steps_per_epoch=1", epochs=3)
    r = run_cli(*args)
    assert r.code == 0, r.err
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["val_mean_dice"] == "nan" for r in rows] == [True, False, False]  # epochs 2 and the last
    assert [r["dice_nucleus"] == "nan" for r in rows] == [True, False, False]  # the same columns every row
    r = run_cli(*train_args(CONFIGS / "nuclei-sigmoid.yaml", data, tmp_path / "run", "--set", "train.val_every=2",
                            "--set", "train.steps_per_epoch=1", "--resume", epochs=4))
    assert r.code == 0, r.err
    with (tmp_path / "run" / "metrics.csv").open() as f:
        resumed = list(csv.DictReader(f))
    assert resumed[:3] == rows and resumed[3]["epoch"] == "4" and resumed[3]["val_mean_dice"] != "nan"


def test_evaluate_refuses_overlapping_masks_for_a_softmax_checkpoint(tmp_path):
    """A softmax checkpoint scored on multi-label masks would count impossible class indices."""
    import yaml

    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / "test" / "masks" / c).mkdir(parents=True)
    (data / "test" / "images").mkdir(parents=True)
    img = np.asarray(Image.open(sorted((copy_nuclei(tmp_path / "n", 1) / "train" / "images").iterdir())[0]))
    Image.fromarray(img).save(data / "test" / "images" / "x.png")
    both = np.zeros(img.shape[:2], np.uint8)
    both[:50] = 255
    for c in ("a", "b"):
        Image.fromarray(both).save(data / "test" / "masks" / c / "x.png")
    from segkit.heads import build_head
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    head = build_head("softmax", ["a", "b", "rest"])
    save_checkpoint(tmp_path / "ckpt", build_model("Unet", "resnet18", 3),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization("none"), data={"mask": "multilabel"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(data), "classes": ["a", "b", "rest"], "mask": "multilabel"},
                                   "model": {"head": "softmax"}}))
    r = run_cli("evaluate", tmp_path / "ckpt", data, "--split", "test", "--config", cfg, "--device", "cpu",
                "--workers", "0", "--no-progress")
    assert r.code == 2 and "x.png" in r.err and "more than one label" in r.err and "Traceback" not in r.err


def test_normalisation_and_thresholds_reach_the_device_once(monkeypatch):
    """The mean, std, clip range and sigmoid thresholds are made on the device at the first call and reused:
    made per call, each was a blocking host-to-device copy in every training step on CUDA. The values are
    the ones given (checked against numpy)."""
    norm = Normalization("dataset", (10.0, 20.0), (2.0, 4.0), (0.0, 5.0), (30.0, 40.0))
    head = build_head("sigmoid", ["a", "b"], thresholds=[0.3, 0.7])
    x = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3) * 3
    first, decoded = norm.apply(x), head.decode(x - 40)
    made = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or torch.as_tensor(*a, **k))
    assert torch.equal(norm.apply(x), first) and torch.equal(head.decode(x - 40), decoded) and made == []
    raw = x.numpy()
    clipped = np.clip(raw, np.array([0.0, 5.0])[:, None, None], np.array([30.0, 40.0])[:, None, None])
    want = (clipped - np.array([10.0, 20.0])[:, None, None]) / np.array([2.0, 4.0])[:, None, None]
    np.testing.assert_allclose(first.numpy(), want, rtol=1e-6)
    probs = 1 / (1 + np.exp(-(raw - 40)))
    np.testing.assert_array_equal(decoded.numpy(), probs > np.array([0.3, 0.7])[:, None, None])


@pytest.mark.parametrize("dtype, nodata", [(np.int16, -9999), (np.float32, np.nan), (np.uint8, 0)])
def test_rescale_never_mixes_no_data_into_valid_pixels(dtype, nodata):
    """The left third of a 60 x 60 image is no-data (its value far from the rest, or NaN), the rest a constant
    100: after random rescales (x0.6-1.4) every pixel still marked real is 100 (linear interpolation of a
    constant), however close to the border. Plain bilinear gave mixtures such as -3266 (or NaN) there."""
    from segkit.data.dataset import Pixels, pack, unpack
    from segkit.data.transforms import Augment

    image = np.full((60, 60, 1), 100, dtype)
    image[:, :20] = nodata
    real = np.ones((60, 60), bool)
    real[:, :20] = False
    labels = np.zeros((60, 60, 1), np.uint8)
    labels[10:50, 25:55] = 1
    stack = pack(Pixels(image, labels, real.copy(), real))
    augment = Augment(48, scale=(0.6, 1.4))
    seen_edges = 0
    for seed in range(40):
        out, bits = augment(image, stack, np.random.default_rng(seed), 1)
        _, valid, out_real, _ = unpack(np.ascontiguousarray(bits), 1)
        assert out_real.any() and (valid <= out_real).all()
        got = out[..., 0][out_real]  # integers exactly; float32 up to the rounding of weight sum / weight
        np.testing.assert_allclose(got, 100, rtol=0 if np.issubdtype(dtype, np.integer) else 1e-6)
        seen_edges += int((out_real & ~np.roll(out_real, 1, axis=1)).sum())  # real pixels beside no-data
    assert seen_edges > 100  # the border was inside the crop in many of the draws
