"""`segkit inspect`: the numbers (checked against hand counts of the real masks) and the head it advises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, DATASETS, NUCLEI, copy_nuclei
from segkit.config import load_config
from segkit.data.inspect import DataGuess, inspect

ISIC = DATASETS / "isic2018-multilabel-mini"
CAMVID = DATASETS / "camvid"
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _listing(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- nuclei: binary masks, background unlabelled -> sigmoid --------------------------------------------


def test_inspect_nuclei_cli_recommends_sigmoid(cli):
    r = cli("inspect", NUCLEI)
    assert r.code == 0, r.err
    assert r.out.startswith(f"{NUCLEI}: binary masks, classes ['fg'] (guessed from the files)")
    assert "[train] 48 images, 48 with masks" in r.out and "[test] 12 images, 12 with masks" in r.out
    assert "pixels with more than one label: 0.0000%" in r.out
    assert "\nhead: sigmoid — labels never overlap, but" in r.out
    assert "data.classes: [background, fg]" in r.out  # how to make softmax fit


def test_inspect_nuclei_numbers_match_the_masks():
    masks = sorted((NUCLEI / "train" / "masks").iterdir()) + sorted((NUCLEI / "test" / "masks").iterdir())
    fg = sum(int((_grey(m) > 127).sum()) for m in masks)
    total = sum(_grey(m).size for m in masks)
    report = inspect(NUCLEI)
    assert report.data.mask == "binary" and report.data.classes == ["fg"] and report.data.guessed
    assert [(s.name, s.images, s.labelled) for s in report.splits] == [("train", 48, 48), ("test", 12, 12)]
    assert report.class_pixels().tolist() == [fg]
    assert report.overlap_share == 0
    assert report.unlabeled_share == pytest.approx((total - fg) / total, rel=1e-12)
    assert report.advice()[0] == "sigmoid"
    d = report.to_dict()
    assert d["head"] == "sigmoid" and d["class_frequency"]["fg"] == pytest.approx(fg / total, rel=1e-12)


# -- ISIC: overlapping labels -> sigmoid required --------------------------------------------------------


def _isic_hand_counts() -> tuple[int, int]:
    both = total = 0
    for lesion in sorted((ISIC / "masks" / "lesion").iterdir()):
        stem = lesion.name.removesuffix("_Segmentation.png")
        pn = ISIC / "masks" / "pigment_network" / f"{stem}_attribute_pigment_network.png"
        a, b = _grey(lesion) > 127, _grey(pn) > 127
        both += int((a & b).sum())
        total += a.size
    return both, total


def test_inspect_isic_reports_overlap_and_requires_sigmoid():
    both, total = _isic_hand_counts()
    report = inspect(ISIC)
    assert report.data.mask == "multilabel" and report.data.classes == ["lesion", "pigment_network"]
    assert [(s.name, s.images, s.labelled, len(s.orphan_masks)) for s in report.splits] == [("all", 6, 6, 0)]
    assert both > 0 and report.overlap_share == pytest.approx(both / total, rel=1e-12)
    head, why = report.advice()
    assert head == "sigmoid" and "sigmoid head is required" in why


def test_inspect_isic_cli(cli, tmp_path):
    both, total = _isic_hand_counts()
    r = cli("inspect", ISIC, "--json", tmp_path / "report.json")
    assert r.code == 0, r.err
    assert "multilabel masks, classes ['lesion', 'pigment_network']" in r.out
    assert f"pixels with more than one label: {both / total:.4%}" in r.out
    assert "head: sigmoid" in r.out and "sigmoid head is required" in r.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["head"] == "sigmoid" and report["overlap_share"] == pytest.approx(both / total, rel=1e-12)
    assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]


# -- CamVid (subset): exclusive classes with an ignore value -> softmax ----------------------------------


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> Path:
    """10 real CamVid pairs in the ROOT/images/train + ROOT/masks/train layout."""
    root = tmp_path_factory.mktemp("camvid")
    for kind in ("images", "masks"):
        (root / kind / "train").mkdir(parents=True)
        for path in sorted((CAMVID / kind / "train").iterdir())[:10]:
            shutil.copy(path, root / kind / "train" / path.name)
    return root


def _camvid_guess(root: Path) -> DataGuess:
    return DataGuess.from_config(load_config(CONFIGS / "camvid.yaml", [f"data.root={root}"]).data)


def test_inspect_camvid_numbers_and_softmax(camvid):
    truth = np.concatenate([_grey(p).ravel() for p in sorted((camvid / "masks" / "train").iterdir())])
    valid = truth != 11
    report = inspect(camvid, _camvid_guess(camvid))
    assert report.data.classes == CAMVID_CLASSES and not report.data.guessed
    assert [(s.name, s.images, s.labelled) for s in report.splits] == [("train", 10, 10)]
    assert report.class_pixels().tolist() == [int((truth == c).sum()) for c in range(11)]
    split = report.splits[0]
    assert (split.valid, split.total) == (int(valid.sum()), truth.size)
    assert 0 < split.total - split.valid  # CamVid has Unlabelled (11) pixels ...
    assert report.overlap_share == 0 and report.unlabeled_share == 0  # ... which are ignored, not unlabelled
    head, why = report.advice()
    assert head == "softmax" and "softmax head fits" in why
    freq = report.to_dict()["class_frequency"]
    assert freq["Road"] == pytest.approx((truth[valid] == 3).mean(), rel=1e-12)
    assert sum(freq.values()) == pytest.approx(1.0, rel=1e-12)


def test_inspect_camvid_cli_with_config(cli, camvid, tmp_path):
    before = _listing(camvid)
    r = cli("inspect", camvid, "--config", CONFIGS / "camvid.yaml", "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    assert "index masks" in r.out and "(from the config)" in r.out and "ignored pixels:" in r.out
    assert "head: softmax — every pixel has exactly one class" in r.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head"] == "softmax" and report["overlap_share"] == 0 and report["unlabeled_share"] == 0
    assert report["splits"] == {"train": {"images": 10, "labelled": 10, "without_mask": 0, "orphan_masks": 0,
                                          "empty_masks": 0, "size_mismatch": 0, "unreadable": 0}}
    assert _listing(camvid) == before  # inspect writes nothing into the data


def test_inspect_camvid_without_the_ignore_value_is_caught(camvid):
    """Without data.ignore_index, 11 is out of range for 11 classes: each such mask is reported unreadable."""
    guess = DataGuess("index", CAMVID_CLASSES)
    report = inspect(camvid, guess)
    with_11 = [p for p in sorted((camvid / "masks" / "train").iterdir()) if (_grey(p) == 11).any()]
    assert len(with_11) > 0
    assert len(report.splits[0].unreadable) == len(with_11)
    assert all("[11]" in msg for msg in report.splits[0].unreadable)


# -- what inspect flags -----------------------------------------------------------------------------


def test_inspect_flags_missing_orphan_empty_mismatched_and_unreadable_masks(tmp_path):
    data = copy_nuclei(tmp_path / "data", 6)
    images = sorted((data / "train" / "images").iterdir())
    masks = sorted((data / "train" / "masks").iterdir())
    masks[0].unlink()                                                          # image without a mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks[0].with_name("orphan.png"))  # mask without image
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(masks[1])             # empty mask
    Image.open(masks[2]).resize((128, 128), Image.NEAREST).save(masks[2])      # another size
    masks[3].write_bytes(b"garbage")                                           # unreadable
    before = _listing(data)
    report = inspect(data, DataGuess("binary", ["nucleus"]))
    s = report.splits[0]
    assert (s.name, s.images, s.labelled) == ("train", 6, 5)
    assert s.without_mask == [images[0]] and s.orphan_masks == [masks[0].with_name("orphan.png")]
    assert s.empty == [images[1].name]
    assert s.size_mismatch == [f"{masks[2]} 128x128 vs image 256x256"]
    assert len(s.unreadable) == 1 and str(masks[3]) in s.unreadable[0]
    text = report.text()
    for line in ("images without a mask: 1", "masks without an image: 1", "empty masks (no foreground): 1",
                 "size mismatches: 1", "unreadable: 1"):
        assert line in text, line
    assert _listing(data) == before


def test_inspect_missing_folder_exits_2(cli, tmp_path):
    r = cli("inspect", tmp_path / "nothing")
    assert r.code == 2 and r.err.startswith("error:") and "data folder not found" in r.err
    assert "Traceback" not in r.err
