"""`segkit inspect` on the larger datasets: ISIC 2018 (overlapping labels -> sigmoid required) and CamVid
(exclusive classes with an ignore value -> softmax), numbers checked against hand counts of the masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, extended_data
from segkit.config import load_config
from segkit.data.inspect import DataGuess, inspect
from test_inspect import assert_overlap_reported

ISIC = extended_data("isic2018-multilabel-mini")
CAMVID = extended_data("camvid")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _listing(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def test_inspect_isic_cli(tmp_path):
    both, total = _isic_hand_counts()
    assert_overlap_reported(ISIC, ["lesion", "pigment_network"], both / total, tmp_path)


# -- CamVid (subset): exclusive classes with an ignore value -> softmax ----------------------------------


@pytest.fixture(scope="module")
def camvid(module_tmp) -> Path:
    """10 real CamVid pairs in the ROOT/images/train + ROOT/masks/train layout."""
    root = module_tmp("camvid")
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
