"""Volumes are read on the closest RAS axes, whatever order their files store, and written back on the input's
own grid: checked on the embedded spinal-cord sample, whose three contrasts are stored R-A-S, L-A-S and P-S-R,
against nibabel's own `as_closest_canonical` (an independent path: it builds a new image and affine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samples import CORD
from segkit.config import load_config
from segkit.data.training_data import training_data
from segkit.data.volumes import Volume, read_slice
from segkit.heads import build_head
from test_infer_volumes import Oracle, files, labels, oracle_checkpoint, same_grid

CASES = {"errsm30_t1w": ("R", "A", "S"), "errsm30_t2sw": ("L", "A", "S"), "errsm30_t2w": ("P", "S", "R")}


@pytest.mark.parametrize("case", CASES)
def test_every_contrast_reads_on_ras_axes(case):
    path = CORD / "imagesTr" / f"{case}_0000.nii.gz"
    stored = nib.load(path)
    assert nib.aff2axcodes(stored.affine) == CASES[case]  # the sample still holds the orientation under test
    canonical = nib.as_closest_canonical(stored)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    volume = Volume(case, [path])
    np.testing.assert_array_equal(volume.data[..., 0], np.asanyarray(canonical.dataobj))
    assert volume.shape == canonical.shape and volume.spacing == pytest.approx(canonical.header.get_zooms())
    raw = np.asanyarray(stored.dataobj)
    np.testing.assert_array_equal(volume.to_file(volume.data[..., 0]), raw)  # and back, exactly
    for axis in range(3):
        for k in (0, volume.shape[axis] // 2, volume.shape[axis] - 1):  # the slice read alone from the file
            np.testing.assert_array_equal(read_slice(path, k, axis, volume.ornt), np.take(volume.data[..., 0], k, axis))


def test_training_slices_every_contrast_along_the_head_foot_axis(tmp_path):
    """With data.slice_axis: 2, the slices of every case (cached and read from the file alike) are axial
    sections of the canonical volume: slice k of a case is its canonical array at z = k."""
    root = Path(shutil.copytree(CORD, tmp_path / "cord"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\n  slice_axis: 2\n  val_fraction: 0.34\n  normalize: [none]\n"
                      "model:\n  head: softmax\n")
    cfg = load_config(config)
    for budget in (1 << 30, 0):
        data = training_data(cfg, cfg.head(), budget)
        for case in CASES:
            records = [r for r in data.train + data.val if r.sample.case == case]
            canonical = np.asanyarray(nib.as_closest_canonical(nib.load(CORD / "imagesTr" / f"{case}_0000.nii.gz")).dataobj)
            assert len(records) == canonical.shape[2]
            for record in records[:: max(1, len(records) // 5)]:
                image = record.cached.image if budget else data.reader.read(record.sample).image
                np.testing.assert_array_equal(image[..., 0], canonical[:, :, record.sample.index].astype(np.float32))


def test_predictions_land_on_the_input_grid_in_its_own_axis_order(cli, tmp_path, monkeypatch):
    """The oracle predicts the label value its input holds; given each contrast's label map as the image, the
    written mask must be that file's array exactly, in the file's own axis order and on its grid, though the
    network saw RAS slices. model.json records the orientation its slices were cut in."""
    (tmp_path / "in").mkdir()
    inputs = {case: Path(shutil.copy(CORD / "labelsTr" / f"{case}.nii.gz", tmp_path / "in" / f"{case}_0000.nii.gz"))
              for case in CASES}
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "cord": (1,)})
    assert json.loads((ckpt / "model.json").read_text())["data"]["volume"]["orientation"] == "RAS"
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert files(out) == {f"{case}.nii.gz" for case in CASES}
    for case, inp in inputs.items():
        same_grid(out / f"{case}.nii.gz", inp)
        truth = labels(inp)
        assert 0 < truth.mean() < 0.5
        np.testing.assert_array_equal(labels(out / f"{case}.nii.gz"), truth)


def test_a_model_from_before_orientations_keeps_cutting_file_axes(tmp_path):
    """A model.json without `orientation` was trained on slices of the file's own axes: it is read that way."""
    from segkit.data.volume_spec import VolumeSpec

    path = CORD / "imagesTr" / "errsm30_t2w_0000.nii.gz"
    raw = np.asanyarray(nib.load(path).dataobj)
    volume = Volume("errsm30_t2w", [path], canonical=False)
    np.testing.assert_array_equal(volume.data[..., 0], raw)
    assert volume.shape == raw.shape
    meta = {"data": {"volume": {"layout": "nnunet", "channel_names": ["MRI"], "slice_axis": 2,
                                "normalization": [{"scheme": "zscore"}], "class_values": {"bg": [0], "fg": [1]}}}}
    assert VolumeSpec.from_meta(meta).canonical is False
    meta["data"]["volume"]["orientation"] = "RAS"
    assert VolumeSpec.from_meta(meta).canonical is True


def test_a_case_far_from_the_training_spacing_is_reported_once(cli, tmp_path, monkeypatch, caplog):
    """model.json holds the training cases' median spacing (here set to 1 mm); a case at 0.25 mm in-plane (4x
    finer) is predicted and reported once by name; the 1 mm case is not. Training writes the median spacing."""
    label = CORD / "labelsTr" / "errsm30_t1w.nii.gz"  # 1 mm isotropic, stored R-A-S
    stored = nib.load(label)
    (tmp_path / "in").mkdir()
    shutil.copy(label, tmp_path / "in" / "coarse_0000.nii.gz")
    fine = stored.affine.copy()
    fine[:3, :2] *= 0.25
    nib.save(nib.Nifti1Image(np.asanyarray(stored.dataobj), fine), tmp_path / "in" / "fine_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "cord": (1,)})
    meta = json.loads((ckpt / "model.json").read_text())
    meta["data"]["volume"]["spacing"] = [1.0, 1.0, 1.0]
    monkeypatch.setattr("segkit.infer.load_checkpoint", lambda path, device: (
        Oracle([(0,), (1,)]), build_head("softmax", ["background", "cord"]), meta))
    caplog.clear()
    result = cli("predict", ckpt, tmp_path / "in", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    warned = [r.getMessage() for r in caplog.records if "trained at" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("case fine: in-plane spacing 0.25 x 0.25 mm"), warned
    assert "larger than in training" in warned[0]


def test_training_records_the_median_spacing_of_its_cases(tmp_path):
    root = Path(shutil.copytree(CORD, tmp_path / "cord"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\n  val_fraction: 0.34\nmodel:\n  head: softmax\n")
    cfg = load_config(config)
    data = training_data(cfg, cfg.head(), 0)
    spacings = [nib.as_closest_canonical(nib.load(CORD / "imagesTr" / f"{c}_0000.nii.gz")).header.get_zooms()
                for c in data.meta["train_cases"]]
    assert data.meta["volume"]["spacing"] == pytest.approx(np.median(spacings, axis=0).tolist())
