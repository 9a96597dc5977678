"""`segkit compare` on the larger datasets: CamVid (11 exclusive classes, 11 = ignored) and ISIC 2018
(overlapping lesion / pigment network labels: sigmoid only, --softmax-exclusive, tuned thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import CONFIGS, extended_data
from test_compare import (QUICK, assert_class_shares, assert_same_scores, assert_written_thresholds,
                          check_report_files, cli_ok, evaluate_json, read_png)

CAMVID = extended_data("camvid")
ISIC = extended_data("isic2018-multilabel-mini")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


def camvid_subset(dst: Path, n_train: int = 4, n_val: int = 2, size=(160, 120)) -> Path:
    """Real CamVid pairs, downscaled (masks nearest), in the images/<split> + masks/<split> layout."""
    src = CAMVID
    for split, n in (("train", n_train), ("val", n_val)):
        for path in sorted((src / "images" / split).iterdir())[:n]:
            for kind, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
                (dst / kind / split).mkdir(parents=True, exist_ok=True)
                Image.open(src / kind / split / path.name).resize(size, resample).save(dst / kind / split / path.name)
    return dst


def isic_subset(dst: Path, size=(256, 192)) -> Path:
    """The 6 real ISIC images downscaled (masks nearest), file names kept (masks pair by stem prefix)."""
    src = ISIC
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in (".jpg", ".png"):
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            resample = Image.NEAREST if "masks" in path.parts else Image.BILINEAR
            Image.open(path).resize(size, resample).save(out, **({"quality": 95} if path.suffix == ".jpg" else {}))
    assert len(list((dst / "images").iterdir())) == 6 and len(list((dst / "masks").rglob("*.png"))) == 12
    return dst



# -- exclusive multi-class: CamVid ---------------------------------------------------------

def test_exclusive_multiclass_compare_camvid(tmp_path):
    data = camvid_subset(tmp_path / "camvid")
    out = tmp_path / "cmp"
    cli_ok("compare", CONFIGS / "camvid.yaml", "--out", out, "--set", f"data.root={data}", *QUICK)
    report, md = check_report_files(out)
    assert report["kind"] == "exclusive"
    # every valid pixel has exactly one of the 11 classes (11 = ignore): both heads get the same N classes
    assert report["heads"]["softmax"]["classes"] == CAMVID_CLASSES
    assert report["heads"]["sigmoid"]["classes"] == CAMVID_CLASSES
    assert report["common_classes"] == CAMVID_CLASSES
    assert "background" not in md
    assert "with more than one class" in md
    for c in CAMVID_CLASSES:
        assert c in md
    for head in ("softmax", "sigmoid"):
        run = report["heads"][head]["runs"][0]
        direct = evaluate_json(out / head / "seed0" / "best", data, tmp_path / f"{head}.json")
        assert_same_scores(direct, run["scores"])
    assert_class_shares(report, out, data / "images" / "val", data / "masks" / "val", 11)


# -- overlapping multi-label: ISIC ---------------------------------------------------------

@pytest.fixture(scope="module")
def isic(module_tmp):
    return isic_subset(module_tmp("isic") / "data")


def overlap_share(data: Path) -> float:
    both = total = 0
    for path in sorted((data / "masks" / "lesion").iterdir()):
        stem = path.name.removesuffix("_Segmentation.png")
        lesion = read_png(path) > 127
        pigment = read_png(data / "masks" / "pigment_network" / f"{stem}_attribute_pigment_network.png") > 127
        both += int((lesion & pigment).sum())
        total += lesion.size
    return both / total


def test_overlapping_compare_trains_only_sigmoid_and_says_why(isic, tmp_path):
    out = tmp_path / "cmp"
    stdout = cli_ok("compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out,
                    "--set", f"data.root={isic}", *QUICK)
    report, md = check_report_files(out)
    assert report["kind"] == "overlapping"
    assert list(report["heads"]) == ["sigmoid"]
    assert report["heads"]["sigmoid"]["classes"] == ["lesion", "pigment_network"]
    assert not (out / "softmax").exists()
    share = overlap_share(isic)
    assert share > 0.01
    stated = f"{share:.2%} of pixels carry more than one label"
    assert stated in md, md
    assert stated in report["skipped"]["softmax"]
    assert "softmax gives each pixel exactly one class and cannot represent them" in md
    assert "Only the sigmoid head was trained" in report["conclusion"] and report["conclusion"] in stdout
    run = report["heads"]["sigmoid"]["runs"][0]
    direct = evaluate_json(out / "sigmoid" / "seed0" / "best", isic, tmp_path / "sig.json")
    assert direct["images"] == 2  # the seeded 34% validation share of the flat layout, as in training
    assert_same_scores(direct, run["scores"])


def test_softmax_exclusive_trains_softmax_with_the_overlap_ignored(isic, tmp_path):
    """--softmax-exclusive: softmax over [background, lesion, pigment_network] on the pixels with at most
    one label; its scores count exactly the validation pixels that are not overlapping."""
    from segkit.config import load_config
    from segkit.data.splits import eval_samples

    out = tmp_path / "cmp"
    cli_ok("compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", f"data.root={isic}",
           *QUICK, "--softmax-exclusive", "--heads", "softmax")
    report = json.loads((out / "report.json").read_text())
    assert list(report["heads"]) == ["softmax"] and report["labels"]["softmax"] == "softmax (exclusive part only)"
    assert report["heads"]["softmax"]["classes"] == ["background", "lesion", "pigment_network"]
    run = report["heads"]["softmax"]["runs"][0]
    direct = evaluate_json(out / "softmax" / "seed0" / "best", isic, tmp_path / "soft.json")
    assert_same_scores(direct, run["scores"])
    cfg = load_config(out / "softmax" / "seed0" / "config.yaml")
    single = both = 0
    for sample in eval_samples(cfg.data, "val", cfg.split_seed()):
        stem = sample.image.stem
        lesion = read_png(isic / "masks" / "lesion" / f"{stem}_Segmentation.png") > 127
        pigment = read_png(isic / "masks" / "pigment_network" / f"{stem}_attribute_pigment_network.png") > 127
        single += int((~(lesion & pigment)).sum())
        both += int((lesion & pigment).sum())
    assert both > 0
    assert sum(c["truth_pixels"] for c in direct["per_class"].values()) == single


def test_write_thresholds_stores_the_reported_best_thresholds(isic, tmp_path):
    out = tmp_path / "cmp"
    cli_ok("compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", f"data.root={isic}",
           *QUICK, "--seeds", "0,1", "--write-thresholds")
    assert_written_thresholds(out, isic, ["lesion", "pigment_network"], tmp_path)
