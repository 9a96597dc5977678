"""Images stored as one file per band (Sentinel-2 style chips: `<chip>/B02.tif, B03.tif, B04.tif, B08.tif`),
named by `data.bands`: read, trained and predicted as one image, exactly as the same bands stacked in one
GeoTIFF (the real SpaceNet tiles of tests/geodata.py, read here with rasterio); bad chips refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from conftest import TINY, assert_refused
from geodata import make_geo_dataset
from segkit.config import load_config
from segkit.data.readers import Window
from segkit.data.source import ImageSource
from segkit.data.splits import pair_reader, split_samples
from segkit.infer import Segmenter

NAMES = ["B02", "B03", "B04", "B08"]


def _chips(stacked: Path, root: Path) -> Path:
    """`stacked` (4-band GeoTIFF tiles) rewritten as ROOT/<split>/images/<tile>/<band>.tif, masks copied."""
    for tile in sorted(stacked.glob("*/images/*.tif")):
        split = tile.parent.parent.name
        with rasterio.open(tile) as src:
            profile, bands = src.profile, src.read()
        profile.update(count=1)
        for name, band in zip(NAMES, bands):
            path = root / split / "images" / tile.stem / f"{name}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(band[None])
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        shutil.copy(stacked / split / "masks" / tile.name, root / split / "masks" / tile.name)
    return root


@pytest.fixture(scope="module")
def data(module_tmp) -> tuple[Path, Path]:
    base = module_tmp("band_files")
    stacked = make_geo_dataset(base / "stacked", bands=4, splits={"train": 4, "val": 2, "test": 3})
    return stacked, _chips(stacked, base / "chips")


def _config(tmp_path: Path, root: Path, bands: str) -> Path:
    path = tmp_path / "chips.yaml"
    path.write_text(f"data:\n  root: {root}\n  classes: [building]\n  mask: binary\n  foreground_value: 255\n"
                    f"  bands: {bands}\nmodel:\n  head: sigmoid\n")
    return path


def test_a_chip_reads_as_its_bands_stacked(data, tmp_path):
    """Every training sample of the chips: the pixels, labels and georeference the stacked GeoTIFF gives (read
    with rasterio, not segkit), whole and by window; the file order on disk plays no part (names do)."""
    stacked, chips = data
    cfg = load_config(_config(tmp_path, chips, "[B02, B03, B04, B08]"))
    samples = split_samples(cfg.data, "train")
    assert [s.image for s in samples] == sorted((chips / "train" / "images").iterdir())
    reader = pair_reader(cfg.data)
    for sample in samples:
        with rasterio.open(stacked / "train" / "images" / f"{sample.stem}.tif") as src:
            want, crs, transform = src.read().transpose(1, 2, 0), src.crs, src.transform
        px = reader.read(sample)
        assert px.image.dtype == np.uint16 and np.array_equal(px.image, want)
        with ImageSource.open(sample.image, 4, NAMES) as source:
            assert source.geometry.crs == crs.to_wkt() and source.geometry.transform == tuple(transform)[:6]
            assert np.array_equal(source.read(Window(10, 20, 50, 60)), want[10:60, 20:80])
        with ImageSource.open(sample.image, 2, ["B08", "B02"]) as source:  # a selection, in the order named
            assert np.array_equal(source.read(), want[:, :, [3, 0]])


def test_chips_train_and_predict_georeferenced_masks_like_the_stacked_tiles(cli, data, tmp_path):
    stacked, chips = data
    run = tmp_path / "run"
    result = cli("train", _config(tmp_path, chips, "[B02, B03, B04, B08]"), "--out", run, "--epochs", "1", *TINY)
    assert result.code == 0, result.err
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["data"]["bands"] == NAMES and meta["in_channels"] == 4
    # the same weights reading the stacked tiles' bands by number
    twin = tmp_path / "twin"
    shutil.copytree(run / "best", twin)
    meta["data"]["bands"] = [1, 2, 3, 4]
    (twin / "model.json").write_text(json.dumps(meta))
    seg, seg_twin = Segmenter.load(run / "best", device="cpu"), Segmenter.load(twin, device="cpu")
    for tile in sorted((stacked / "test" / "images").glob("*.tif")):
        a, b = seg.logits(seg.open(chips / "test" / "images" / tile.stem)), seg_twin.logits(seg_twin.open(tile))
        assert torch.equal(a, b) and a.std() > 0, tile.stem
    out = tmp_path / "masks"
    result = cli("predict", run / "best", chips / "test" / "images", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.rglob("*.tif")) == sorted(p.name for p in (stacked / "test" / "images").iterdir())
    assert "3 images" in result.out
    for tile in sorted((stacked / "test" / "images").glob("*.tif")):
        with rasterio.open(out / "building" / tile.name) as m, rasterio.open(tile) as src:
            assert m.crs == src.crs and m.transform == src.transform and m.shape == src.shape


def test_a_chip_missing_a_band_file_is_refused_by_name(cli, data, tmp_path):
    _, chips = data
    broken = Path(shutil.copytree(chips, tmp_path / "chips"))
    victim = sorted((broken / "train" / "images").iterdir())[1]
    (victim / "B08.tif").unlink()
    out = tmp_path / "run"
    assert_refused(cli("train", _config(tmp_path, broken, "[B02, B03, B04, B08]"), "--out", out, *TINY), out,
                   str(victim), "['B08']")


def test_band_files_on_different_grids_are_refused_by_name(cli, data, tmp_path):
    _, chips = data
    broken = Path(shutil.copytree(chips, tmp_path / "chips"))
    victim = sorted((broken / "train" / "images").iterdir())[0] / "B03.tif"
    with rasterio.open(victim) as src:
        profile, band = src.profile, src.read(1)
    profile.update(width=150, height=150)
    with rasterio.open(victim, "w", **profile) as dst:
        dst.write(band[None, :150, :150])
    out = tmp_path / "run"
    result = cli("train", _config(tmp_path, broken, "[B02, B03, B04, B08]"), "--out", out, *TINY)
    assert result.code != 0 and "Traceback" not in result.err
    assert str(victim) in result.err and "share size, type and georeference" in result.err


def test_band_names_on_single_files_are_refused(cli, data, tmp_path):
    stacked, _ = data
    out = tmp_path / "run"
    assert_refused(cli("train", _config(tmp_path, stacked, "[B02, B03, B04, B08]"), "--out", out, *TINY), out,
                   "names band files")
