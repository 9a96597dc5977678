"""`segkit compare` on volume datasets (real hippocampus cases, tests/volumedata.py): plain labels train both
heads and are scored per case, with threshold curves that agree exactly with `segkit evaluate --threshold`;
nested regions train sigmoid only, the report naming the share of voxels softmax cannot represent (counted
here with numpy from the label files); `convert-head` turns a 2-class softmax volume model into its sigmoid
twin."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volumedata
from conftest import TINY, assert_refused, run_cli
from samples import HIPPO_CASES

QUICK = ["--epochs", "1", "--set", "train.steps_per_epoch=3", "--set", "train.crop=32", "--set",
         "train.batch_size=4", "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set",
         "train.device=cpu", "--set", "train.val_every=1"]
CASES = HIPPO_CASES[:3]


def _labels_dataset(root: Path) -> Path:
    """The `thick_regions` cases with their plain labels (background 0, anterior 1, posterior 2)."""
    volumedata.thick_regions(root, CASES)
    volumedata.write_json(root / "dataset.json", {
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": len(CASES), "file_ending": ".nii.gz"})
    return root


def _config(tmp_path: Path, root: Path, head: str | None = None) -> Path:
    """compare's config: the data section alone, or with a head, which compare ignores."""
    path = tmp_path / "compare.yaml"
    path.write_text(f"data:\n  root: {root}\n  val_fraction: 0.34\n" + (f"model:\n  head: {head}\n" if head else ""))
    return path


def _evaluate(cli, checkpoint: Path, root: Path, out: Path, *extra: str) -> dict:
    result = cli("evaluate", checkpoint, root, "--split", "val", "--json", out, "--device", "cpu", "--no-progress",
                 *extra)
    assert result.code == 0, result.err
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def labels_compare(module_tmp):
    """(root, compare folder, report.json) of one compare run (both heads, seed 0) on plain labels."""
    base = module_tmp("compare_volumes")
    root = _labels_dataset(base / "labels")
    out = base / "cmp"
    result = run_cli("compare", _config(base, root), "--out", out, *QUICK)
    assert result.code == 0, result.err
    return root, out, json.loads((out / "report.json").read_text())


def test_plain_labels_train_both_heads_scored_per_case(labels_compare):
    root, out, report = labels_compare
    assert report["kind"] == "exclusive" and report["unit"] == "voxels"
    assert report["scoring"].startswith("per case")
    assert report["notes"][0].startswith("the data needs: softmax")
    assert set(report["heads"]) == {"softmax", "sigmoid"} and report["skipped"] == {}
    for head, row in report["heads"].items():
        assert row["classes"] == ["background", "anterior", "posterior"], head
        scores = row["runs"][0]["scores"]
        assert list(scores["per_case"]) == [c for c in CASES if c in scores["per_case"]] and scores["cases"] == 1
        assert not np.isnan(row["macro_hd95"][0])  # volumes report HD95 in mm
    text = (out / "report.md").read_text()
    assert "macro HD95 mm" in text and "voxel acc." in text and "per case, then averaged over cases" in text


def test_threshold_curves_are_what_evaluate_reports_at_each_threshold(cli, labels_compare, tmp_path):
    """The report's curve (histograms of float32 probabilities, strictly above t) against `segkit evaluate
    --threshold t` on the saved checkpoint (decoded masks, per case): equal at every threshold tried, not
    merely close. Before, the curve counted float16 probabilities >= t."""
    root, out, report = labels_compare
    row = report["heads"]["sigmoid"]
    curves = row["runs"][0]["analysis"]["thresholds"]
    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    best = {c: t["threshold"] for c, t in row["best_thresholds"].items()}
    informative = 0
    for name, values in {"0.5": {c: 0.5 for c in best}, "best": best,
                         "lower": {c: max(0.05, round(t - 0.05, 2)) for c, t in best.items()}}.items():
        arg = ",".join(f"{c}={v}" for c, v in values.items())
        scores = _evaluate(cli, out / "sigmoid" / "seed0" / "best", root, tmp_path / f"{name}.json",
                           "--threshold", arg)
        for c, t in values.items():
            want = curves[c][grid.index(t)]
            got = scores["per_class"][c]["dice"]
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (name, c, t)
            informative += 0 < got < 1
    assert informative >= 3  # masks that are neither empty nor perfect: the equality says something


def _region_overlap_share(root: Path) -> float:
    """Voxels in more than one region (whole = {1, 2} and core = {2}: every voxel of label 2) over all voxels
    of the training cases, with numpy."""
    labels = [np.asanyarray(nib.load(p).dataobj) for p in sorted((root / "labelsTr").glob("*.nii.gz"))]
    return sum(int((lab == 2).sum()) for lab in labels) / sum(lab.size for lab in labels)


def test_nested_regions_train_sigmoid_only_and_say_what_softmax_cannot_represent(cli, tmp_path):
    root = volumedata.thick_regions(tmp_path / "regions", CASES)
    out = tmp_path / "cmp"
    result = cli("compare", _config(tmp_path, root, "softmax"), "--out", out, *QUICK)  # a head softmax refuses
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "overlapping" and list(report["heads"]) == ["sigmoid"]
    assert report["heads"]["sigmoid"]["classes"] == ["whole", "core"]
    why = report["skipped"]["softmax"]
    assert f"{_region_overlap_share(root):.2%} of voxels carry more than one label" in why
    assert "whole [1, 2] and core [2] share label values" in why
    assert report["notes"][0].startswith("the data needs: sigmoid")
    assert not (out / "softmax").exists()
    assert why in (out / "report.md").read_text()


@pytest.mark.parametrize("option, says", [("--softmax-exclusive", "no exclusive part"),
                                          ("--include-degenerate", "2-D images only")])
def test_options_that_do_not_apply_to_regions_are_refused(cli, tmp_path, option, says):
    root = volumedata.thick_regions(tmp_path / "regions", CASES)
    out = tmp_path / "cmp"
    assert_refused(cli("compare", _config(tmp_path, root), "--out", out, *QUICK, option), out, option, says)


def test_convert_head_of_a_volume_model_writes_the_same_foreground(cli, tmp_path):
    """A 2-class softmax volume checkpoint (background takes posterior's label value 2) with weights whose masks
    follow the image, converted to its sigmoid twin: the twin predicts, and its `anterior` masks are the
    softmax label maps' voxels of value 1, except where the softmax probability is a tie at 0.5. Before,
    the twin's model.json still named both classes and every command refused it."""
    root = _labels_dataset(tmp_path / "labels")
    config = tmp_path / "two.yaml"
    config.write_text(f"data:\n  root: {root}\n  classes: [background, anterior]\nmodel:\n  head: softmax\n")
    result = cli("train", config, "--out", tmp_path / "run", "--epochs", "1", *TINY, "--set", "train.crop=32")
    assert result.code == 0, result.err
    slices = [np.moveaxis(volumedata.zscore(volumedata.thick_volume(case, crop=volumedata.CROP)[0]), 2, 0)
              for case in CASES]
    softmax = volumedata.content_copy(tmp_path / "run" / "best", tmp_path / "softmax",
                                      np.concatenate(slices)[:, None].astype(np.float32))
    assert cli("convert-head", softmax, tmp_path / "sigmoid").code == 0
    meta = json.loads((tmp_path / "sigmoid" / "model.json").read_text())
    assert meta["classes"] == ["anterior"] and meta["data"]["volume"]["class_values"] == {"anterior": [1]}
    for name, extra in (("softmax", ["--save-probs"]), ("sigmoid", [])):
        result = cli("predict", tmp_path / name, root / "imagesTr", tmp_path / f"out_{name}", "--device", "cpu",
                     "--no-progress", *extra)
        assert result.code == 0, result.err
    shares = []
    for case in CASES:
        labels = np.asanyarray(nib.load(tmp_path / "out_softmax" / f"{case}.nii.gz").dataobj)
        probs = np.asanyarray(nib.load(tmp_path / "out_softmax" / f"{case}_probs.nii.gz").dataobj)
        twin = np.asanyarray(nib.load(tmp_path / "out_sigmoid" / "anterior" / f"{case}.nii.gz").dataobj) > 0
        differ = twin != (labels == 1)
        assert (np.abs(probs[..., 1][differ] - 0.5) < 1e-3).all(), case
        shares.append(twin.mean())
    assert 0.05 < np.mean(shares) < 0.95  # masks that follow the image, not a constant
