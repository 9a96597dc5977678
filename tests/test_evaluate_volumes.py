"""`segkit evaluate` on volume datasets: per-case 3-D Dice, IoU and HD95 in mm against hand-computed values on
small anisotropic volumes (through the oracle model of test_infer_volumes, whose prediction is its input),
regions scored class by class, and a checkpoint written by `segkit train` scored against an independent
computation from the files `segkit predict` writes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

import volumedata
from conftest import assert_refused
from test_infer_volumes import labels, oracle_checkpoint
from segkit.metrics3d import EMPTY_RULE_3D

SPACING = (0.5, 0.5, 3.0)
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (12, 12, 6)
DIAGONAL = math.sqrt((12 * 0.5) ** 2 + (12 * 0.5) ** 2 + (6 * 3.0) ** 2)  # sqrt(396) mm: the empty-case HD95


def box(volume: np.ndarray, value: int, x: slice, y: slice, z: slice) -> None:
    volume[x, y, z] = value


def dataset(root: Path, labels_json: dict, cases: dict[str, tuple[np.ndarray, np.ndarray]], **extra) -> Path:
    """An nnU-Net dataset whose test cases' images hold the label map the oracle will predict."""
    for folder, (images, labels_dir) in {"Ts": ("imagesTs", "labelsTs"), "Tr": ("imagesTr", "labelsTr")}.items():
        for name, (truth, predicted) in cases.items():
            volumedata.save_nifti(predicted, AFFINE, root / images / f"{name}{folder}_0000.nii.gz")
            volumedata.save_nifti(truth, AFFINE, root / labels_dir / f"{name}{folder}.nii.gz")
    volumedata.write_json(root / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": labels_json,
                                                  "file_ending": ".nii.gz", **extra})
    return root


def rows(out: str) -> dict[tuple[str, str], list[str]]:
    """The per-case rows of the printed table: (case, class) -> the remaining columns."""
    table = out.split("per case:")[1].split("\n\n")[0].strip().splitlines()[1:]
    return {(r.split()[0], r.split()[1]): r.split()[2:] for r in table}


def test_softmax_scores_per_case_and_class_equal_hand_values(cli, tmp_path, monkeypatch):
    """Spacing 0.5 x 0.5 x 3 mm. Case A: class a is a 4x4x2 box predicted one slice too deep (half of each
    overlaps: Dice 1/2, IoU 1/3; every voxel is surface, half at 0 mm and half at 3 mm from the other box, so
    HD95 = 3 mm), class b a 2x2x1 box predicted one voxel aside in x (HD95 0.5 mm), c absent (not scored).
    Case B: a is missed and c hallucinated: Dice 0, HD95 = the volume's diagonal."""
    truth_a, pred_a = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(truth_a, 1, slice(2, 6), slice(2, 6), slice(1, 3))
    box(pred_a, 1, slice(2, 6), slice(2, 6), slice(2, 4))
    box(truth_a, 2, slice(8, 10), slice(8, 10), slice(4, 5))
    box(pred_a, 2, slice(9, 11), slice(8, 10), slice(4, 5))
    truth_b, pred_b = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(truth_b, 1, slice(0, 4), slice(0, 4), slice(0, 2))
    pred_b[5, 5, 5] = 3
    classes = {"background": (0,), "a": (1,), "b": (2,), "c": (3,)}
    root = dataset(tmp_path / "ds", {name: v[0] for name, v in classes.items()},
                   {"caseA": (truth_a, pred_a), "caseB": (truth_b, pred_b)})
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", classes)
    result = cli("evaluate", ckpt, root, "--device", "cpu", "--no-progress", "--exclude-background",
                 "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    scores = json.loads((tmp_path / "s.json").read_text())
    case_a, case_b = scores["per_case"]["caseATs"], scores["per_case"]["caseBTs"]
    assert (case_a["a"]["dice"], case_a["a"]["iou"], case_a["a"]["hd95"]) == pytest.approx((0.5, 1 / 3, 3.0))
    assert (case_a["b"]["dice"], case_a["b"]["iou"], case_a["b"]["hd95"]) == pytest.approx((0.5, 1 / 3, 0.5))
    assert case_a["c"]["dice"] is None and case_a["c"]["hd95"] is None  # absent from both: NaN, JSON null
    # background: 864 voxels, 54 foreground in truth or prediction -> 810 in both, 828 in each
    assert (case_a["background"]["dice"], case_a["background"]["iou"]) == pytest.approx((1620 / 1656, 810 / 846))
    assert case_a["a"]["truth_ml"] == pytest.approx(32 * 0.75 / 1000)
    assert (case_b["a"]["dice"], case_b["a"]["hd95"]) == (0.0, pytest.approx(DIAGONAL))
    assert (case_b["c"]["dice"], case_b["c"]["hd95"], case_b["c"]["predicted_voxels"]) == \
        (0.0, pytest.approx(DIAGONAL), 1)
    assert case_b["b"]["dice"] is None
    per_class = scores["per_class"]
    assert (per_class["a"]["dice"], per_class["a"]["hd95"], per_class["a"]["cases"]) == \
        (pytest.approx(0.25), pytest.approx((3.0 + DIAGONAL) / 2), 2)
    assert per_class["a"]["dice_std"] == pytest.approx(0.25)
    assert (per_class["b"]["dice"], per_class["b"]["cases"], per_class["c"]["dice"], per_class["c"]["cases"]) == \
        (pytest.approx(0.5), 1, 0.0, 1)
    assert scores["classes_in_mean"] == ["a", "b", "c"] and scores["cases"] == 2
    assert scores["mean"]["dice"] == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert scores["mean"]["hd95"] == pytest.approx(((3.0 + DIAGONAL) / 2 + 0.5 + DIAGONAL) / 3)
    assert scores["empty_case_rule"] == EMPTY_RULE_3D and scores["case_spacing_mm"]["caseATs"] == list(SPACING)
    table = rows(result.out)
    assert table[("caseATs", "a")][:3] == ["0.5000", "0.3333", "3.0000"]
    assert table[("caseATs", "c")][:3] == ["n/a", "n/a", "n/a"]
    assert table[("caseBTs", "a")][:3] == ["0.0000", "0.0000", f"{DIAGONAL:.4f}"]
    assert f"empty-case rule: {EMPTY_RULE_3D}" in result.out
    mean_row = next(line for line in result.out.splitlines() if line.startswith("mean (macro)"))
    assert mean_row.split()[2] == f"{(0.25 + 0.5) / 3:.4f}"


def test_regions_are_scored_one_binary_class_at_a_time_without_the_ignore_label(cli, tmp_path, monkeypatch):
    """Truth: a core box (value 1, so also whole) and an ignored box (3). Prediction: whole-but-not-core (2) on
    both. whole is perfect (the ignored voxels do not count), core is missed entirely."""
    truth, predicted = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(truth, 1, slice(1, 4), slice(1, 4), slice(1, 3))
    box(predicted, 2, slice(1, 4), slice(1, 4), slice(1, 3))
    box(truth, 3, slice(6, 9), slice(6, 9), slice(2, 4))
    box(predicted, 2, slice(6, 9), slice(6, 9), slice(2, 4))
    root = dataset(tmp_path / "ds", {"background": 0, "whole": [1, 2], "core": [1], "ignore": 3},
                   {"case": (truth, predicted)}, regions_class_order=[2, 1])
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", {"whole": (1, 2), "core": (1,)}, (2, 1))
    result = cli("evaluate", ckpt, root, "--split", "train", "--device", "cpu", "--no-progress",
                 "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    case = json.loads((tmp_path / "s.json").read_text())["per_case"]["caseTr"]
    assert (case["whole"]["dice"], case["whole"]["iou"], case["whole"]["hd95"]) == (1.0, 1.0, 0.0)
    assert case["whole"]["predicted_voxels"] == 18  # the 18 predicted on ignored voxels are left out
    assert (case["core"]["dice"], case["core"]["hd95"]) == (0.0, pytest.approx(DIAGONAL))


def test_nan_voxels_are_left_out_of_the_scores(cli, tmp_path, monkeypatch):
    """Truth: a 4x4x2 box of class a. The (float32) image the oracle predicts holds the same box, but two of its
    voxels are NaN: no-data, so they are left out of truth and prediction alike: Dice 1 over 30 voxels (counted
    as misses, it would be 60/62)."""
    truth, predicted = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    box(truth, 1, slice(2, 6), slice(2, 6), slice(1, 3))
    box(predicted, 1, slice(2, 6), slice(2, 6), slice(1, 3))
    predicted[2, 2, 1] = predicted[5, 5, 2] = np.nan
    classes = {"background": (0,), "a": (1,)}
    root = dataset(tmp_path / "ds", {"background": 0, "a": 1}, {"case": (truth, predicted)})
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", classes)
    result = cli("evaluate", ckpt, root, "--device", "cpu", "--no-progress", "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    case = json.loads((tmp_path / "s.json").read_text())["per_case"]["caseTs"]
    assert (case["a"]["dice"], case["a"]["truth_ml"]) == (1.0, pytest.approx(30 * 0.75 / 1000))


def test_refusals_name_the_problem(cli, tmp_path, monkeypatch):
    truth = np.zeros(SHAPE, np.uint8)
    root = dataset(tmp_path / "ds", {"background": 0, "a": 1}, {"x": (truth, truth)})
    shutil.rmtree(root / "labelsTs")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "a": (1,)})
    out = tmp_path / "s.json"
    assert_refused(cli("evaluate", ckpt, root, "--device", "cpu", "--json", out), out, "xTs", "without labels",
                   "labelsTs")
    assert_refused(cli("evaluate", ckpt, root, "--split", "all", "--device", "cpu"), out, "--split all")
    assert_refused(cli("evaluate", ckpt, root, "--config", tmp_path / "c.yaml", "--device", "cpu"), out, "--config")
    other = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "a": (2,)})
    assert_refused(cli("evaluate", other, root, "--split", "train", "--device", "cpu"), out, "label values")
    flat = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "a": (1,)}, volume=False)
    assert_refused(cli("evaluate", flat, root, "--device", "cpu"), out, "trained on 2-D images")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a face neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...], diagonal: float) -> float:
    """HD95 by its definition with a k-d tree (no distance transform), and the empty-case rule."""
    if not a.any() and not b.any():
        return math.nan
    if not a.any() or not b.any():
        return diagonal
    pa, pb = (np.argwhere(_surface(m)) * np.asarray(spacing) for m in (a, b))
    return max(np.percentile(cKDTree(pb).query(pa)[0], 95), np.percentile(cKDTree(pa).query(pb)[0], 95))


def test_a_trained_region_model_scores_as_its_written_predictions(cli, tmp_path, tmp_path_factory):
    """The session's sigmoid region run (real hippocampus regions on a 1 x 1 x 3 mm grid, tests/volumedata.py):
    `evaluate --split val` scores the case training held back. With the checkpoint's weights made to follow the
    image, its scores equal Dice and HD95 computed from the files `segkit predict` writes, with numpy and a k-d
    tree; with the trained weights, its mean Dice is training's own validation Dice (one case: pooled slice
    counts are the case's counts)."""
    base = volumedata.region_run(tmp_path_factory)
    root, trained = base / "data", base / "run" / "best"
    model = volumedata.region_content(tmp_path_factory)
    meta = json.loads((trained / "model.json").read_text())
    (case,) = meta["data"]["val_cases"]
    (tmp_path / "in").mkdir()
    shutil.copy(root / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in")
    result = cli("predict", model, tmp_path / "in", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    result = cli("evaluate", model, root, "--split", "val", "--device", "cpu", "--no-progress",
                 "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    scores = json.loads((tmp_path / "s.json").read_text())
    assert list(scores["per_case"]) == [case]
    truth = labels(root / "labelsTr" / f"{case}.nii.gz")
    spacing = nib.load(root / "labelsTr" / f"{case}.nii.gz").header.get_zooms()
    assert spacing == (1.0, 1.0, 3.0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(truth.shape, spacing)))
    for name, values in (("whole", (1, 2)), ("core", (2,))):
        predicted = labels(tmp_path / "out" / name / f"{case}.nii.gz").astype(bool)
        expected = np.isin(truth, values)
        assert 0.1 < predicted.mean() < 0.9  # the masks follow the image: neither empty nor full
        dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
        got = scores["per_case"][case][name]
        assert got["dice"] == pytest.approx(dice, abs=1e-12)
        hd95 = _hd95(predicted, expected, spacing, diagonal)
        assert got["hd95"] == pytest.approx(hd95, abs=1e-6), name
        assert 0 < hd95 < diagonal  # both masks present: a distance, not the empty-case rule
    result = cli("evaluate", trained, root, "--split", "val", "--device", "cpu", "--no-progress",
                 "--json", tmp_path / "trained.json")
    assert result.code == 0, result.err
    trained_scores = json.loads((tmp_path / "trained.json").read_text())
    assert list(trained_scores["per_case"]) == [case]
    assert trained_scores["mean"]["dice"] == pytest.approx(meta["val"]["mean_dice"], abs=1e-3)
