"""`segkit visualize` on volumes: which slices a montage shows (checked against a direct computation on the
real labels), the slice axis per case or from the checkpoint, and pixel colours at known voxels (a missed voxel
has the miss colour, a hit is dimmed, overlapping regions are tinted with both colours)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

import volumedata
from samples import CORD, HIPPO
from segkit.data.volume_spec import VolumeSpec
from segkit.heads import build_head, default_colors
from segkit.viz import ERROR_COLORS
from segkit.visualize import VolumeClasses, shown_slices, visualize_volumes

MISSED, FALSE_POSITIVE = ERROR_COLORS["missed (false negative)"], ERROR_COLORS["false positive"]


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _save_like(array: np.ndarray, like: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = nib.load(like)
    nib.save(nib.Nifti1Image(array, reference.affine, reference.header), path)
    return path


def _grey(image: np.ndarray) -> np.ndarray:
    """The display grey: the volume windowed to its 1st/99th percentiles."""
    low, high = np.percentile(image.astype(np.float64), (1, 99))
    return (np.clip((image - low) / (high - low), 0, 1) * 255).round()


def _expected_slices(foreground: np.ndarray, axis: int) -> list[int]:
    found = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
    return found[::math.ceil(len(found) / 12)].tolist()


def _pixel(picture: np.ndarray, montage, slice_index: int, panel: int, row: int, col: int) -> np.ndarray:
    """The centre pixel of voxel (row, col) of a slice's panel."""
    top, left = montage.origin(montage.slices.index(slice_index), panel)
    half = montage.scale // 2
    return picture[top + row * montage.scale + half, left + col * montage.scale + half].astype(int)


def _blend(grey: float, color) -> np.ndarray:
    return np.round(0.5 * grey + 0.5 * np.asarray(color, float))


def _checkpoint(folder: Path, head: str, classes: list[str], class_values: dict, axis: int,
                order: tuple[int, ...] | None = None, layout: str = "nnunet") -> Path:
    """A checkpoint folder whose model.json is what volume training writes (the weights are not read)."""
    spec = VolumeSpec(layout, ("MRI",), axis, class_values, order)
    meta = {"arch": "Unet", "encoder": "resnet18", "in_channels": 1, **build_head(head, classes).metadata(),
            "data": {"mask": "volume", "volume": spec.to_meta()}}
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


# --- softmax label volumes, no checkpoint: values are class indices -----------------------------------------

def test_hippocampus_montage_slices_and_error_colours(tmp_path):
    images, predicted = tmp_path / "imagesTs", tmp_path / "pred"
    images.mkdir()
    truth_of, pred_of = {}, {}
    for case in ("hippocampus_001", "hippocampus_004"):
        shutil.copy(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", images)
        truth = _voxels(HIPPO / "labelsTr" / f"{case}.nii.gz")
        pred = truth.copy()
        front = pred[: truth.shape[0] // 2]
        front[front == 2] = 0  # posterior missed in the first half along axis 0
        pred[(truth == 0) & (np.arange(truth.shape[1])[None, :, None] < 4)] = 1  # a false-positive band
        _save_like(pred, HIPPO / "labelsTr" / f"{case}.nii.gz", predicted / f"{case}.nii.gz")
        truth_of[case], pred_of[case] = truth, pred
    montages, skipped = visualize_volumes(images, predicted, tmp_path / "out", VolumeClasses(None, None, axis=0),
                                          HIPPO / "labelsTr")  # sagittal sections, asked for (auto: axial)
    assert skipped == [] and [m.case for m in montages] == ["hippocampus_001", "hippocampus_004"]
    colors = default_colors(["background", "class_1", "class_2"])
    for m in montages:
        truth, pred = truth_of[m.case], pred_of[m.case]
        assert m.axis == 0
        assert m.slices == _expected_slices((truth > 0) | (pred > 0), 0) and 1 < len(m.slices) <= 12
        assert m.scale == math.ceil(160 / max(truth.shape[1:])) and m.panels == 3
        picture = np.asarray(Image.open(m.path).convert("RGB"))
        grey = _grey(_voxels(images / f"{m.case}_0000.nii.gz"))
        missed = [(k, i, j) for k, i, j in zip(*np.nonzero((truth == 2) & (pred == 0))) if k in m.slices]
        hits = [(k, i, j) for k, i, j in zip(*np.nonzero((truth == 1) & (pred == 1))) if k in m.slices]
        false = [(k, i, j) for k, i, j in zip(*np.nonzero((truth == 0) & (pred == 1))) if k in m.slices]
        assert missed and hits and false
        for k, i, j in missed[:: max(1, len(missed) // 20)]:
            assert _pixel(picture, m, k, 2, i, j).tolist() == list(MISSED)
            assert _pixel(picture, m, k, 1, i, j).tolist() == [grey[k, i, j]] * 3  # nothing predicted there
            assert np.abs(_pixel(picture, m, k, 0, i, j) - _blend(grey[k, i, j], colors[2])).max() <= 1
        for k, i, j in hits[:: max(1, len(hits) // 20)]:
            assert _pixel(picture, m, k, 2, i, j).tolist() == [int(np.float32(grey[k, i, j]) * np.float32(0.4))] * 3
            assert np.abs(_pixel(picture, m, k, 1, i, j) - _blend(grey[k, i, j], colors[1])).max() <= 1
        for k, i, j in false[:: max(1, len(false) // 20)]:
            assert _pixel(picture, m, k, 2, i, j).tolist() == list(FALSE_POSITIVE)


# --- sigmoid region model: class folders win over the combined map; checkpoint classes and axis -----------

def test_region_class_folders_with_checkpoint(cli, tmp_path):
    """Hippocampus regions on the 1 x 1 x 3 mm grid (whole = anterior + posterior, core = posterior): whole is
    predicted except in the first two sections that hold it, core exactly."""
    root = volumedata.thick_regions(tmp_path / "Dataset901_Hippocampus", ("hippocampus_001", "hippocampus_004"))
    ckpt = _checkpoint(tmp_path / "best", "sigmoid", ["whole", "core"], {"whole": (1, 2), "core": (2,)}, 2, (1, 2))
    predicted = tmp_path / "pred"
    truths, missed = {}, {}
    for case in ("hippocampus_001", "hippocampus_004"):
        label_file = root / "labelsTr" / f"{case}.nii.gz"
        truth = truths[case] = _voxels(label_file)
        whole = np.isin(truth, [1, 2]).astype(np.uint8)
        missed[case] = np.flatnonzero(whole.any(axis=(0, 1)))[:2]
        whole[:, :, missed[case]] = 0
        _save_like(whole, label_file, predicted / "whole" / f"{case}.nii.gz")
        _save_like((truth == 2).astype(np.uint8), label_file, predicted / "core" / f"{case}.nii.gz")
        _save_like(np.zeros_like(truth), label_file, predicted / f"{case}.nii.gz")  # must not be read
    r = cli("visualize", root / "imagesTr", predicted, tmp_path / "cli", "--checkpoint", ckpt,
            "--truth", root / "labelsTr")
    assert r.code == 0, r.err
    truth = truths["hippocampus_001"]
    expected = _expected_slices(np.isin(truth, [1, 2]), 2)
    assert expected == list(range(2, 10))  # sections 2..9 of 12 hold hippocampus: all of them, <= 12 tiles
    assert f"hippocampus_001: slices {expected} along axis 2 (8 of 12 with foreground)" in r.out
    assert "2 montages in" in r.out

    spec = VolumeClasses.from_checkpoint(ckpt)
    montages, _ = visualize_volumes(root / "imagesTr", predicted, tmp_path / "api", spec, root / "labelsTr")
    colors = build_head("sigmoid", ["whole", "core"]).colors
    both = (np.asarray(colors[0], float) + np.asarray(colors[1], float)) / 2
    for m in montages:
        truth = truths[m.case]
        picture = np.asarray(Image.open(m.path).convert("RGB"))
        grey = _grey(_voxels(root / "imagesTr" / f"{m.case}_0000.nii.gz"))
        assert m.axis == 2 and m.slices == _expected_slices(np.isin(truth, [1, 2]), 2)
        assert m.scale == math.ceil(160 / max(truth.shape[:2]))
        lost = missed[m.case][0]
        found = max((k for k in m.slices if k not in missed[m.case]),  # the section richest in both labels
                    key=lambda k: min((truth[:, :, k] == 1).sum(), (truth[:, :, k] == 2).sum()))
        anterior_lost = list(zip(*np.nonzero(truth[:, :, lost] == 1)))
        anterior = list(zip(*np.nonzero(truth[:, :, found] == 1)))
        posterior = list(zip(*np.nonzero(truth[:, :, found] == 2)))
        assert anterior_lost and anterior and posterior
        for i, j in anterior_lost[::5]:  # anterior = whole only, missed in that section
            assert _pixel(picture, m, lost, 2, i, j).tolist() == list(MISSED)
        for i, j in anterior[::5]:  # found: dimmed image
            assert _pixel(picture, m, found, 2, i, j).tolist() == [int(np.float32(grey[i, j, found]) *
                                                                    np.float32(0.4))] * 3
        for i, j in posterior[::5]:  # posterior: in both regions, tinted with their mean colour
            assert np.abs(_pixel(picture, m, found, 1, i, j) - _blend(grey[i, j, found], both)).max() <= 1


# --- one axis per case without a checkpoint: the spinal cord's oblique 7.5 mm case --------------------------

def test_each_case_is_cut_along_its_coarsest_axis(cli, tmp_path):
    """On the canonical (RAS) axes: t2sw along its 7.5 mm axis; t1w and t2w (stored P-S-R) are 1 mm isotropic,
    a tie, so axial sections, like the others: every case along the head-foot axis. Expected slices from
    nibabel's as_closest_canonical, an independent reorientation."""
    predicted = tmp_path / "pred"
    for label in sorted((CORD / "labelsTr").iterdir()):
        _save_like(_voxels(label), label, predicted / label.name)
    r = cli("visualize", CORD / "imagesTr", predicted, tmp_path / "out")
    assert r.code == 0, r.err
    lines = dict(re.findall(r"^(\S+): (slices .*)$", r.out, re.M))
    for case, axis in (("errsm30_t1w", 2), ("errsm30_t2sw", 2), ("errsm30_t2w", 2)):
        label = np.asanyarray(nib.as_closest_canonical(nib.load(CORD / "labelsTr" / f"{case}.nii.gz")).dataobj)
        on = (label > 0).any(axis=tuple(a for a in range(3) if a != axis))
        assert lines[case] == (f"slices {_expected_slices(label > 0, axis)} along axis {axis} "
                               f"({int(on.sum())} of {label.shape[axis]} with foreground)")
        picture = Image.open(tmp_path / "out" / f"{case}.png")
        assert picture.mode == "RGB" and picture.width >= 160


# --- mistakes: exit 2 with the case and the fix ---------------------------------------------------------------

def test_mistakes_are_refused(cli, tmp_path):
    images, predicted = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    shutil.copy(HIPPO / "imagesTr" / "hippocampus_001_0000.nii.gz", images / "hippocampus_001.nii.gz")
    label = HIPPO / "labelsTr" / "hippocampus_001.nii.gz"
    _save_like(_voxels(label)[:, :-2], label, predicted / "hippocampus_001.nii.gz")
    r = cli("visualize", images, predicted, tmp_path / "out")
    assert r.code == 2 and "Traceback" not in r.err
    assert "case hippocampus_001" in r.err and "(35, 49, 35)" in r.err and "(35, 51, 35)" in r.err

    wrong = _voxels(label).copy()
    wrong[wrong == 2] = 7
    _save_like(wrong, label, predicted / "hippocampus_001.nii.gz")
    classes = ["background", "anterior", "posterior"]
    values = {"background": (0,), "anterior": (1,), "posterior": (2,)}
    ckpt = _checkpoint(tmp_path / "nnunet", "softmax", classes, values, 0)
    r = cli("visualize", images, predicted, tmp_path / "out", "--checkpoint", ckpt)  # it expects channel files
    assert r.code == 2 and "hippocampus_001.nii.gz: not named <case>_XXXX.nii.gz" in r.err
    ckpt = _checkpoint(tmp_path / "segkit", "softmax", classes, values, 0, layout="segkit")
    r = cli("visualize", images, predicted, tmp_path / "out", "--checkpoint", ckpt)
    assert r.code == 2 and "case hippocampus_001" in r.err and "label values [7]" in r.err

    r = cli("visualize", images, predicted, predicted / "pictures")
    assert r.code == 2 and "inside an input folder" in r.err

    for name in ("a", "b"):
        _save_like(_voxels(label), label, tmp_path / "folders" / name / "hippocampus_001.nii.gz")
    r = cli("visualize", images, tmp_path / "folders", tmp_path / "out", "--truth", HIPPO / "labelsTr")
    assert r.code == 2 and "--checkpoint" in r.err
    assert not (tmp_path / "out").exists()


def test_slice_choice_by_hand():
    assert shown_slices([True] * 25) == [0, 3, 6, 9, 12, 15, 18, 21, 24]  # 25 > 12: every 3rd (every 2nd gives 13)
    assert shown_slices([True] * 24) == list(range(0, 24, 2))  # exactly 12 tiles
    assert shown_slices([False, True, False, True, True]) == [1, 3, 4]
    assert shown_slices([False] * 7) == [3]  # nothing to show: the middle slice
