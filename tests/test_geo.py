"""Multi-band GeoTIFF datasets end to end: N-band training, one normalisation, GeoTIFF masks on
the input's grid, polygons in the image's CRS, and channel mismatches refused.

Data: tiles of the real SpaceNet sample (uint16, 11-bit, EPSG:32616) with derived bands (tests/geodata.py).
One 4-band training run serves the tests that need a trained model; the softmax output test uses
an untrained model whose masks follow the image (no training needed to test a file format).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY, assert_refused, follow_content, run_cli
from geodata import SPACENET, make_geo_dataset


def _config(tmp: Path, root: Path, channels: int, head: str = "sigmoid", **data) -> Path:
    classes = ["building"] if head == "sigmoid" else ["background", "building"]
    cfg = {"data": {"root": str(root), "classes": classes, "mask": "binary", "channels": channels, **data},
           "model": {"arch": "Unet", "encoder": "resnet18", "head": head},
           "train": {"epochs": 1, "batch_size": 2, "crop": 64, "lr": 0.001}}
    path = tmp / f"geo-{channels}-{head}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def geo4(module_tmp) -> Path:
    return make_geo_dataset(module_tmp("geo4") / "data", 4, splits={"train": 6, "test": 3})


@pytest.fixture(scope="module")
def trained4(module_tmp, geo4) -> Path:
    """The run folder of one tiny `segkit train` of a 4-band sigmoid model on geo4."""
    tmp = module_tmp("trained4")
    r = run_cli("train", _config(tmp, geo4, 4), "--out", tmp / "run", *TINY)
    assert r.code == 0, r.err
    return tmp / "run"


@pytest.fixture(scope="module")
def predicted4(module_tmp, geo4, trained4) -> Path:
    """`segkit predict --vectorize --save-probs` of trained4 on geo4's test tiles: the output folder."""
    masks = module_tmp("predicted4") / "masks"
    r = run_cli("predict", trained4 / "best", geo4 / "test" / "images", masks, "--device", "cpu", "--no-progress",
                "--workers", "0", "--vectorize", "--save-probs")
    assert r.code == 0, r.err
    return masks


@pytest.fixture(scope="module")
def softmax4(module_tmp, geo4) -> Path:
    """An untrained 4-band softmax U-Net (background, building) whose masks follow the image, as conftest's
    content_checkpoints: geo4's dataset normalisation, batch-norm statistics from 160 x 160 crops of three
    training tiles, then logits scaled to mean 0, std 3 on them."""
    from segkit import Segmenter
    from segkit.config import load_config
    from segkit.data.dataset import fit_normalization, scan
    from segkit.data.splits import pair_reader, split_samples
    from segkit.heads import build_head
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    tmp = module_tmp("softmax4")
    cfg = load_config(_config(tmp, geo4, 4, "softmax"))
    reader = pair_reader(cfg.data)
    norm = fit_normalization("dataset", scan(split_samples(cfg.data, "train"), reader), reader, 4, None, None)
    torch.manual_seed(0)
    head = build_head("softmax", ["background", "building"])
    model = build_model("Unet", "resnet18", head.channels, 4)
    meta = checkpoint_meta(head, "Unet", "resnet18", 4, norm, data={"mask": "binary"})
    seg = Segmenter(model, head, meta, "cpu")
    tiles = sorted((geo4 / "train" / "images").glob("*.tif"))[:3]
    x = torch.cat([seg.to_input(seg.open(t)) for t in tiles])[..., 70:230, 70:230].contiguous()
    follow_content(model, x)
    save_checkpoint(tmp / "ckpt", model, meta)
    return tmp / "ckpt"


@pytest.mark.parametrize("bands", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_n_band_geotiffs_train_and_predict_on_the_input_grid(request, tmp_path, bands):
    if bands == 4:
        data, out, masks = (request.getfixturevalue(f) for f in ("geo4", "trained4", "predicted4"))
    else:
        data = make_geo_dataset(tmp_path / "data", bands, splits={"train": 6, "test": 3})
        out, masks = tmp_path / "run", tmp_path / "masks"
        r = run_cli("train", _config(tmp_path, data, bands), "--out", out, *TINY)
        assert r.code == 0, r.err
        r = run_cli("predict", out / "best", data / "test" / "images", masks, "--device", "cpu", "--no-progress",
                    "--workers", "0", "--vectorize", "--save-probs")
        assert r.code == 0, r.err
    meta = json.loads((out / "best" / "model.json").read_text())
    assert meta["in_channels"] == bands
    weights = load_file(str(out / "best" / "model.safetensors"))
    assert weights["encoder.conv1.weight"].shape[1] == bands  # the first convolution takes N inputs
    norm = meta["normalization"]
    assert norm["mode"] == "dataset" and len(norm["mean"]) == bands and len(norm["low"]) == bands
    assert meta["data"]["image_dtypes"] == ["uint16"]

    images = sorted((data / "test" / "images").glob("*.tif"))
    assert len(images) == 3
    void = polygons = 0
    for image in images:
        with rasterio.open(image) as src, rasterio.open(masks / "building" / image.name) as dst:
            assert dst.crs == src.crs and dst.transform == src.transform
            assert (dst.width, dst.height) == (src.width, src.height) and dst.count == 1
            assert dst.nodata == 255 and dst.profile["compress"] == "deflate" and dst.profile["tiled"]
            mask, raw = dst.read(1), src.read(1)
            assert set(np.unique(mask).tolist()) <= {0, 1, 255}
            assert ((mask == 255) == (raw == src.nodata)).all()  # no-data in, no-data out, nowhere else
            void += int((mask == 255).sum())
            bounds = src.bounds
        with rasterio.open(masks / image.name.replace(".tif", "_probs.tif")) as p:
            probs = p.read(1)
            assert p.crs == src.crs and p.dtypes[0] == "float32"
            decided = (probs > 0.5).astype(np.uint8)
            keep = (mask != 255) & (np.abs(probs - 0.5) > 1e-3)  # float16 probabilities: ties aside
            assert (decided[keep] == mask[keep]).all() and np.isnan(probs[mask == 255]).all()
        doc = json.loads((masks / image.with_suffix(".geojson").name).read_text())
        assert doc["crs"]["properties"]["name"].endswith("32616") and "crs_wkt" in doc
        polygons += len(doc["features"])
        for feature in doc["features"]:
            assert feature["properties"]["class"] == "building"
            xy = np.array([pt for ring in feature["geometry"]["coordinates"] for pt in ring])
            assert (xy[:, 0] >= bounds.left - 1e-6).all() and (xy[:, 0] <= bounds.right + 1e-6).all()
            assert (xy[:, 1] >= bounds.bottom - 1e-6).all() and (xy[:, 1] <= bounds.top + 1e-6).all()
        # polygons cover exactly the predicted pixels: rasterize them back on the grid
        if doc["features"]:
            from rasterio.features import rasterize

            back = rasterize([f["geometry"] for f in doc["features"]], out_shape=mask.shape,
                             transform=src.transform)
            assert (back == (mask == 1)).all()
    assert void > 0 and polygons > 0  # the no-data corner and the polygons were there to check


def test_softmax_geotiff_is_one_index_band_with_a_colour_table(tmp_path, geo4, softmax4):
    """The index band holds the most probable class of the probabilities written beside it (float16
    ties aside), 255 exactly on no-data."""
    masks = tmp_path / "masks"
    r = run_cli("predict", softmax4, geo4 / "test" / "images", masks, "--device", "cpu", "--no-progress",
                "--workers", "0", "--save-probs")
    assert r.code == 0, r.err
    counts, void = np.zeros(2, int), 0
    for image in sorted((geo4 / "test" / "images").glob("*.tif")):
        with rasterio.open(image) as src, rasterio.open(masks / image.name) as dst:
            assert dst.crs == src.crs and dst.transform == src.transform and dst.count == 1
            assert dst.colormap(1)[1][:3] != (0, 0, 0) and dst.colormap(1)[0][:3] == (0, 0, 0)
            mask, nodata = dst.read(1), (src.read() == src.nodata).all(0)
        with rasterio.open(masks / image.name.replace(".tif", "_probs.tif")) as p:
            probs = p.read()
        assert ((mask == 255) == nodata).all() and np.isnan(probs[:, nodata]).all()
        void += int(nodata.sum())
        differ = (mask != probs.argmax(0)) & ~nodata
        assert (np.abs(probs[1] - probs[0])[differ] < 2e-3).all()
        counts += np.bincount(mask[~nodata], minlength=2)[:2]
    assert counts.min() > 0.05 * counts.sum(), counts  # both classes: the masks follow the image
    assert void > 0  # the no-data corner (tests/geodata.py) is in the test tiles


def test_band_selection_trains_on_the_chosen_bands(tmp_path, geo4):
    out = tmp_path / "run"
    r = run_cli("train", _config(tmp_path, geo4, 3, bands=[4, 1, 2]), "--out", out, *TINY)
    assert r.code == 0, r.err
    meta = json.loads((out / "best" / "model.json").read_text())
    assert meta["in_channels"] == 3 and meta["data"]["bands"] == [4, 1, 2]
    # statistics are those of bands 4, 1, 2 in that order: the same pixels drawn from all four bands, permuted
    from segkit.data.dataset import fit_normalization, scan
    from segkit.data.splits import pair_reader, train_val_samples
    from segkit.config import load_config

    cfg = load_config(_config(tmp_path, geo4, 4))
    reader = pair_reader(cfg.data)
    train, _ = train_val_samples(cfg.data, cfg.train.seed)
    all4 = fit_normalization("dataset", scan(train, reader), reader, 4, None, None, cfg.train.seed)
    norm = meta["normalization"]
    for key in ("mean", "std", "low", "high"):
        assert norm[key] == pytest.approx([getattr(all4, key)[b - 1] for b in (4, 1, 2)], rel=1e-9), key


def test_channel_mismatch_is_refused_naming_the_file_and_the_fix(tmp_path, geo4, trained4):
    r = run_cli("train", _config(tmp_path, geo4, 3), "--out", tmp_path / "run", *TINY)
    assert_refused(r, tmp_path / "run", "4 band(s)", "3 input channel(s)", "data.channels: 4", "data.bands")
    r = run_cli("train", _config(tmp_path, geo4, 2, bands=[1, 9]), "--out", tmp_path / "run", *TINY)
    assert_refused(r, tmp_path / "run", "band(s) [9]", "1..4")

    three = SPACENET / "unlabelled"  # a real 3-band int16 GeoTIFF
    r = run_cli("predict", trained4 / "best", three, tmp_path / "masks", "--device", "cpu", "--no-progress")
    assert_refused(r, tmp_path / "masks", "albers_3band_int16_nodata.tif", "3 band(s)", "4 input channel(s)")


def test_same_pixels_give_the_same_input_in_training_and_prediction(tmp_path, geo4):
    """The dataset path (training/validation) and the Segmenter path (prediction) turn one file into the
    same tensor, for uint16 (11-bit) data with no-data, under each normalisation."""
    from segkit import Segmenter
    from segkit.config import load_config
    from torch.utils.data import default_collate

    from segkit.data.dataset import SegmentationDataset, fit_normalization, scan, to_network
    from segkit.data.splits import pair_reader, split_samples
    from segkit.data.transforms import eval_transform
    from segkit.heads import build_head
    from segkit.model import build_model, checkpoint_meta

    head = build_head("sigmoid", ["building"])
    model = build_model("Unet", "resnet18", 1, 4)  # the weights play no part: only the inputs are compared
    for mode in ("dataset", "per_image", "none"):
        cfg = load_config(_config(tmp_path, geo4, 4, normalize=mode))
        reader = pair_reader(cfg.data)
        records = scan(split_samples(cfg.data, "test"), reader, per_image=mode == "per_image")
        norm = fit_normalization(mode, records, reader, 4, None, None)
        ds = SegmentationDataset(records, reader, head, eval_transform(), norm)
        seg = Segmenter(model, head, checkpoint_meta(head, "Unet", "resnet18", 4, norm, data={"mask": "binary"}),
                        "cpu")
        for i, r in enumerate(records):
            x_train = to_network(default_collate([ds[i]]), norm, head, torch.device("cpu"))[0][0]
            x_pred = seg.to_input(seg.open(r.sample.image))[0]
            assert torch.equal(x_train, x_pred), mode
            raw = rasterio.open(r.sample.image).read().astype(np.float64)
            nodata = (raw == 0).all(0)
            assert (x_pred[:, torch.from_numpy(nodata)] == 0).all()  # no-data becomes 0
            if mode == "none":
                assert torch.equal(x_pred, torch.from_numpy(np.where(nodata, 0, raw)).float())
            if mode == "dataset":  # by hand: clip to the stored percentiles, then the stored mean/std
                low, high = np.array(norm.low)[:, None, None], np.array(norm.high)[:, None, None]
                mean, std = np.array(norm.mean)[:, None, None], np.array(norm.std)[:, None, None]
                want = np.where(nodata, 0, (np.clip(raw, low, high) - mean) / std)
                assert np.allclose(x_pred.numpy(), want, atol=1e-4)
            if mode == "per_image":
                valid = raw[:, ~nodata]
                want = np.where(nodata, 0, (raw - valid.mean(1)[:, None, None]) / valid.std(1)[:, None, None])
                assert np.allclose(x_pred.numpy(), want, atol=1e-4)


def test_evaluate_and_visualize_read_geotiff_masks(tmp_path, geo4, trained4, predicted4):
    out, masks = trained4, predicted4
    r = run_cli("evaluate", out / "best", geo4, "--split", "test", "--json", tmp_path / "s.json", "--device", "cpu",
                "--no-progress", "--workers", "0")
    assert r.code == 0, r.err
    scores = json.loads((tmp_path / "s.json").read_text())
    # by hand from the predicted GeoTIFFs and the truth GeoTIFFs, no-data pixels left out
    tp = fp = fn = 0
    for image in sorted((geo4 / "test" / "images").glob("*.tif")):
        with rasterio.open(masks / "building" / image.name) as p, rasterio.open(geo4 / "test" / "masks" / image.name) as t:
            pred, truth = p.read(1), t.read(1) == 255
        keep = pred != 255
        tp += int(((pred == 1) & truth & keep).sum())
        fp += int(((pred == 1) & ~truth & keep).sum())
        fn += int(((pred == 0) & truth & keep).sum())
    s = scores["per_class"]["building"]
    assert (s["truth_pixels"], s["predicted_pixels"]) == (tp + fn, tp + fp)
    r = run_cli("visualize", geo4 / "test" / "images", masks, tmp_path / "pics", "--checkpoint", out / "best",
                "--truth", geo4 / "test" / "masks")
    assert r.code == 0, r.err
    assert len(list((tmp_path / "pics").glob("*.png"))) == 3


def test_lzw_rgb_tiffs_train_and_predict_like_drive(tmp_path, tiny_nuclei):
    """DRIVE-style data: LZW-compressed RGB TIFF images and GIF masks."""
    import tifffile
    from PIL import Image

    data = tmp_path / "drive"
    for kind in ("images", "masks"):
        (data / "train" / kind).mkdir(parents=True)
    for path in sorted((tiny_nuclei / "train" / "images").iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        tifffile.imwrite(data / "train" / "images" / f"{path.stem}.tif", rgb, photometric="rgb", compression="lzw")
        Image.open(tiny_nuclei / "train" / "masks" / path.name).convert("L").save(
            data / "train" / "masks" / f"{path.stem}.gif")
    cfg = tmp_path / "drive.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(data), "classes": ["vessel"], "mask": "binary"},
                                   "model": {"arch": "Unet", "encoder": "resnet18", "head": "sigmoid"},
                                   "train": {"epochs": 1, "crop": 64}}))
    out = tmp_path / "run"
    r = run_cli("train", cfg, "--out", out, *TINY)
    assert r.code == 0, r.err
    assert json.loads((out / "best" / "model.json").read_text())["normalization"]["mode"] == "imagenet"
    r = run_cli("predict", out / "best", data / "train" / "images", tmp_path / "masks", "--device", "cpu",
                "--no-progress", "--workers", "0")
    assert r.code == 0, r.err
    for path in (data / "train" / "images").iterdir():
        written = np.asarray(Image.open(tmp_path / "masks" / "vessel" / f"{path.stem}.png"))
        assert written.shape == tifffile.imread(path).shape[:2] and set(np.unique(written)) <= {0, 255}


def test_streamed_windows_give_the_samples_of_cached_images(geo4):
    """Training crops read by window from disk equal crops of the cached whole image, sample for sample."""
    from segkit.config import AugmentConfig
    from segkit.data.dataset import SegmentationDataset, scan
    from segkit.data.normalize import Normalization
    from segkit.data.splits import pair_reader, split_samples
    from segkit.data.transforms import train_transform
    from segkit.config import DataConfig
    from segkit.heads import build_head

    d = DataConfig(root=geo4, classes=["building"], mask="binary", channels=4)
    reader = pair_reader(d)
    samples = split_samples(d, "train")
    head = build_head("sigmoid", ["building"])
    norm = Normalization("dataset", (300.0,) * 4, (100.0,) * 4, (0.0,) * 4, (2000.0,) * 4)
    aug = AugmentConfig(scale=(0.75, 1.25), color=0.5)
    sets = {}
    for cache in (True, False):
        records = scan(samples, reader, head, cache=cache)
        assert all((r.cached is not None) == cache for r in records)
        sets[cache] = SegmentationDataset(records, reader, head, train_transform(96, aug), norm, crop=96,
                                          scale_low=0.75, color=0.5, seed=3)
    for epoch in (0, 1):
        for ds in sets.values():
            ds.set_epoch(epoch)
        for i in range(len(samples)):
            a, b = sets[True][i], sets[False][i]
            assert a.image.shape == (4, 96, 96) and a.image.dtype == torch.uint16  # raw bytes cross, as stored
            for name in a._fields:
                assert torch.equal(getattr(a, name), getattr(b, name)), name
    # with a budget for two images, the rest is streamed
    records = scan(samples, reader, head, cache="auto", budget=2 * 300 * 300 * (4 * 2 + 3))
    assert sum(r.cached is not None for r in records) == 2
