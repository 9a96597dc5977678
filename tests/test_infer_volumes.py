"""Prediction on NIfTI volumes: masks on the input's exact grid for both heads, label values and the regions'
combined map, the same network input as training, and bad inputs refused by case.

Two kinds of model: an "oracle" whose output is known (class k wherever the input's value is one of class k's
label values, with normalisation `none`), so a written volume can be compared voxel by voxel with what it must
be; and a checkpoint written by `segkit train` on real volumes (tests/volumedata.py), its weights made to follow
the image, whose written volumes are compared with the same network run by hand on slices normalised by hand."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import volumedata
from conftest import NUCLEI, assert_refused
from samples import CORD, HIPPO
from segkit.config import load_config
from segkit.data.dataset import unpack
from segkit.data.normalize import Normalization
from segkit.data.training_data import training_data
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume
from segkit.heads import build_head
from segkit.infer import Segmenter
from segkit.predict import predict_volume
from segkit.model import checkpoint_meta, load_checkpoint


class Oracle(nn.Module):
    """Logits +10 for class k where the input's first channel holds one of class k's values, else -10."""

    def __init__(self, class_values: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.values = [torch.tensor(v, dtype=torch.float32) for v in class_values]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0].round()
        return torch.stack([torch.where(torch.isin(v, values), 10.0, -10.0) for values in self.values], 1)


def oracle_checkpoint(monkeypatch, tmp_path: Path, head: str, class_values: dict[str, tuple[int, ...]],
                      order: tuple[int, ...] | None = None, layout: str = "nnunet",
                      channel_names: tuple[str, ...] = ("MRI",), slice_axis: int = 2, volume: bool = True,
                      target_spacing: tuple[float, float] | None = None, **data) -> Path:
    """A checkpoint folder whose model is an Oracle (Segmenter.load is pointed at it), trained 'on volumes'
    with normalisation none, so the network sees the raw voxel values."""
    h = build_head(head, list(class_values))
    spec = VolumeSpec(layout, channel_names, slice_axis, class_values, order, target_spacing=target_spacing)
    meta = checkpoint_meta(h, "Unet", "oracle", len(channel_names), Normalization("none"),
                           data={"mask": "volume", **data, **({"volume": spec.to_meta()} if volume else {})})
    folder = tmp_path / "oracle"
    folder.mkdir(exist_ok=True)
    (folder / "model.json").write_text(json.dumps(meta))
    monkeypatch.setattr("segkit.infer.load_checkpoint",
                        lambda path, device: (Oracle(list(class_values.values())), h, meta))
    return folder


def save(array: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    """`array` with `like`'s header (its qform/sform and codes) and a display window, as a scan's file carries."""
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    header["cal_min"], header["cal_max"] = 0, 1500
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, None, header), path)
    return path


def labels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def same_grid(out: Path, inp: Path) -> nib.Nifti1Image:
    """The output image, after checking it lies on the input's grid exactly (shape, affine, qform, sform)."""
    o, i = nib.load(out), nib.load(inp)
    assert o.shape[:3] == i.shape[:3]
    np.testing.assert_array_equal(o.affine, i.affine)
    assert (int(o.header["qform_code"]), int(o.header["sform_code"])) == (int(i.header["qform_code"]),
                                                                           int(i.header["sform_code"]))
    np.testing.assert_array_equal(o.header.get_qform(), i.header.get_qform())
    np.testing.assert_array_equal(o.header.get_sform(), i.header.get_sform())
    assert o.header.get_zooms()[:3] == i.header.get_zooms()[:3]
    assert o.header.get_slope_inter() == (None, None)  # stored unscaled: the values are the file's values
    assert o.header["cal_max"] == 0  # the image's display window would hide small label values in a viewer
    return o


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -- the oracle: exact outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_softmax_label_values_on_an_oblique_anisotropic_grid(cli, tmp_path, monkeypatch, axis):
    """The real oblique 0.5 x 0.5 x 7.5 mm spinal-cord scan's grid; the oracle's input is its label map
    painted with the class values, so the written label volume must equal it voxel for voxel, whichever
    axis the slices are cut along (batches of 4 of 49, 54 or 9 slices)."""
    grid = nib.load(CORD / "imagesTr" / "errsm30_t2sw_0000.nii.gz")
    painted = labels(CORD / "labelsTr" / "errsm30_t2sw.nii.gz").astype(np.uint8) * 7
    inp = save(painted, grid, tmp_path / "in" / "cord_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "cord": (7,)}, slice_axis=axis)
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert files(out) == {"cord.nii.gz"}  # no temporary files left behind
    image = same_grid(out / "cord.nii.gz", inp)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(labels(out / "cord.nii.gz"), painted)
    assert painted.any() and (painted == 0).any()


def test_label_values_above_255_are_uint16_and_probabilities_are_saved(cli, tmp_path, monkeypatch):
    grid = nib.load(HIPPO / "imagesTr" / "hippocampus_003_0000.nii.gz")
    painted = labels(HIPPO / "labelsTr" / "hippocampus_003.nii.gz").astype(np.uint16) * 300
    inp = save(painted, grid, tmp_path / "in" / "h3_0000.nii.gz")
    values = {"background": (0,), "anterior": (300,), "posterior": (600,)}
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", values, slice_axis=1)
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress", "--save-probs",
                 "--batch-size", "3")
    assert result.code == 0, result.err
    assert files(out) == {"h3.nii.gz", "h3_probs.nii.gz"}
    assert same_grid(out / "h3.nii.gz", inp).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(labels(out / "h3.nii.gz"), painted)
    probs = same_grid(out / "h3_probs.nii.gz", inp)
    assert probs.shape == (*painted.shape, 3) and probs.get_data_dtype() == np.float32  # NIfTI-1 has no float16
    on, off = torch.softmax(torch.tensor([10.0, -10.0, -10.0]), 0)[:2].half().float().numpy()
    for k, value in enumerate((0, 300, 600)):
        np.testing.assert_array_equal(labels(out / "h3_probs.nii.gz")[..., k], np.where(painted == value, on, off))


REGIONS = {"whole": (1, 2), "core": (2,)}


@pytest.mark.parametrize("classes, order, combined", [
    (REGIONS, (1, 2), lambda v: v),  # encompassing region first: core (2) paints over whole (1)
    ({"core": (2,), "whole": (1, 2)}, (2, 1), lambda v: np.where(v > 0, 1, 0)),  # whole paints over core
])
def test_sigmoid_regions_write_one_volume_per_class_and_the_combined_map(cli, tmp_path, monkeypatch, classes,
                                                                        order, combined):
    """Real hippocampus labels (1 = anterior, 2 = posterior) on the 1 x 1 x 3 mm grid as nnU-Net regions; the
    combined map follows regions_class_order: regions in class order, later ones painting over earlier ones."""
    _, value, affine = volumedata.thick_volume("hippocampus_003")
    inp = volumedata.save_nifti(value, affine, tmp_path / "in" / "hippo_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", classes, order)
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress", "--save-probs")
    assert result.code == 0, result.err
    assert files(out) == {"core/hippo.nii.gz", "whole/hippo.nii.gz", "hippo.nii.gz", "hippo_probs.nii.gz"}
    np.testing.assert_array_equal(labels(out / "whole" / "hippo.nii.gz"), np.isin(value, (1, 2)).astype(np.uint8))
    np.testing.assert_array_equal(labels(out / "core" / "hippo.nii.gz"), (value == 2).astype(np.uint8))
    np.testing.assert_array_equal(labels(out / "hippo.nii.gz"), combined(value))
    assert set(np.unique(combined(value)).tolist()) == ({0, 1, 2} if order == (1, 2) else {0, 1})
    for name in ("core/hippo.nii.gz", "whole/hippo.nii.gz", "hippo.nii.gz"):
        assert same_grid(out / name, inp).get_data_dtype() == np.uint8
    on, off = torch.sigmoid(torch.tensor([10.0, -10.0])).half().float().numpy()
    probs = labels(out / "hippo_probs.nii.gz")
    for k, values in enumerate(classes.values()):
        np.testing.assert_array_equal(probs[..., k], np.where(np.isin(value, values), on, off))


@pytest.mark.parametrize("options", [(), ("--tile", "32", "--overlap", "8"), ("--tta",)])
def test_channel_files_of_a_case_are_grouped(cli, tmp_path, monkeypatch, options):
    """nnU-Net cases: <case>_0000 and <case>_0001 are one 2-channel case, predicted once; slices larger than
    the tile (35 x 51) go through windows, and TTA flips, with the same result."""
    _, value, affine = volumedata.thick_volume("hippocampus_001")
    for case in ("a", "b"):
        volumedata.save_nifti(value, affine, tmp_path / "in" / f"{case}_0000.nii.gz")
        volumedata.save_nifti(np.zeros_like(value), affine, tmp_path / "in" / f"{case}_0001.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "a": (1,), "p": (2,)},
                             channel_names=("MRI", "MRI2"))
    result = cli("predict", ckpt, tmp_path / "in", tmp_path / "out", "--device", "cpu", "--no-progress", *options)
    assert result.code == 0, result.err
    assert files(tmp_path / "out") == {"a.nii.gz", "b.nii.gz"} and "2 volumes" in result.out
    np.testing.assert_array_equal(labels(tmp_path / "out" / "b.nii.gz"), value)


# -- refusals ----------------------------------------------------------------------------------------------

def _mri_case(folder: Path, name: str, channels: int = 1) -> None:
    """A real thick-slice hippocampus image (35 x 51 x 12) as FOLDER/NAME, with `channels` copies of it."""
    image, _, affine = volumedata.thick_volume("hippocampus_001")
    data = image if channels == 1 else np.stack([image] * channels, axis=-1)
    volumedata.save_nifti(data, affine, folder / name)


@pytest.mark.parametrize("layout, names, channels, words", [
    ("nnunet", ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"], ("MRI", "MRI2"), ["case b", "b_0001.nii.gz"]),
    ("nnunet", ["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], ("MRI",), ["case b", "channel 1"]),
    ("segkit", ["a.nii.gz", "b.nii.gz:2"], ("MRI",), ["case b", "2 channel(s)", "1 (['MRI'])"]),
])
def test_missing_or_extra_channels_are_refused_naming_the_case(cli, tmp_path, monkeypatch, layout, names,
                                                                 channels, words):
    for name in names:
        file, _, n = name.partition(":")
        _mri_case(tmp_path / "in", file, int(n or 1))
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (1,)}, layout=layout,
                             channel_names=channels)
    out = tmp_path / "out"
    assert_refused(cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress"), out, *words)


@pytest.mark.parametrize("damage", ["not nifti", "truncated", "huge header", "huge header .nii"])
def test_an_unreadable_case_is_reported_and_the_others_written(cli, tmp_path, monkeypatch, damage):
    """A huge header (4000^3 voxels declared in a file of a few KB) is refused from the header, naming the
    file, before it asks for 128 GB; it used to end the whole run with a raw _ArrayMemoryError."""
    ending = ".nii" if damage.endswith(".nii") else ".nii.gz"
    _mri_case(tmp_path / "in", "good_0000" + ending)
    bad = tmp_path / "in" / ("bad_0000" + ending)
    if damage == "not nifti":
        bad.write_bytes(gzip.compress(b"this is no NIfTI header" * 40))
    elif damage == "truncated":
        _mri_case(tmp_path / "in", bad.name)
        bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    else:
        _mri_case(tmp_path / "in", bad.name)
        raw = bytearray(bad.read_bytes() if bad.suffix == ".nii" else gzip.decompress(bad.read_bytes()))
        assert raw[:4] == (348).to_bytes(4, "little")  # a little-endian NIfTI-1 header; dim[1:4] at bytes 42-47
        raw[42:48] = np.array([4000, 4000, 4000], "<i2").tobytes()
        bad.write_bytes(bytes(raw) if bad.suffix == ".nii" else gzip.compress(bytes(raw)))
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)})
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 1 and "Traceback" not in result.err
    assert "failed:" in result.err and "case bad" in result.err and "1 volumes" in result.out
    if damage.startswith("huge"):
        assert f"{bad}" in result.err and "header declares 4000x4000x4000" in result.err, result.err
    assert files(out) == {"good.nii.gz"}  # outputs are .nii.gz whatever the input's ending


def test_existing_outputs_need_overwrite_and_the_output_may_not_be_inside_the_input(cli, tmp_path, monkeypatch):
    _mri_case(tmp_path / "in", "a_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", {"fg": (255,)})
    out = tmp_path / "out"
    (out / "fg").mkdir(parents=True)
    (out / "fg" / "a.nii.gz").write_bytes(b"keep")
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 2 and "--overwrite" in result.err and "fg/a.nii.gz" in result.err
    assert (out / "fg" / "a.nii.gz").read_bytes() == b"keep"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress", "--overwrite")
    assert result.code == 0, result.err
    assert nib.load(out / "fg" / "a.nii.gz").shape == (35, 51, 12)
    inside = tmp_path / "in" / "pred"
    assert_refused(cli("predict", ckpt, tmp_path / "in", inside, "--device", "cpu"), inside, "inside the input")


def test_volumes_and_2d_models_refuse_each_others_inputs(cli, tmp_path, monkeypatch):
    _mri_case(tmp_path / "nifti", "a_0000.nii.gz")
    (tmp_path / "png").mkdir()
    shutil.copy(sorted((NUCLEI / "test" / "images").iterdir())[0], tmp_path / "png" / "cells.png")  # a real PNG
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)})
    out = tmp_path / "out"
    assert_refused(cli("predict", ckpt, tmp_path / "png", out, "--device", "cpu"), out, "no volumes (.nii.gz",
                   "trained on volume slices")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)}, volume=False)
    assert_refused(cli("predict", ckpt, tmp_path / "nifti", out, "--device", "cpu"), out, "trained on 2-D images",
                   "Fix:")


# -- a checkpoint written by `segkit train` on real volumes --------------------------------------------------

def test_trained_region_model_writes_what_its_network_gives_on_the_input_grid(cli, tmp_path, tmp_path_factory):
    """The session's sigmoid region checkpoint (model.json from `segkit train`), its weights made to follow the
    image: the masks written for two real cases (uint8 and float32 images, cut as the training cases to
    32 x 32 x depth, so no padding to the stride) equal the network run by hand on their axial slices z-scored
    by hand, thresholded at logit 0, and painted by regions_class_order [1, 2]; voxels may differ only where a
    logit is within 1e-3 of 0 (a tie)."""
    ckpt = volumedata.region_content(tmp_path_factory)
    model, _, _ = load_checkpoint(ckpt)
    cases = {}
    for case in ("hippocampus_001", "hippocampus_004"):
        crop, _, affine = volumedata.thick_volume(case, crop=volumedata.CROP)
        cases[case] = (crop, volumedata.save_nifti(crop, affine, tmp_path / "in" / f"{case}_0000.nii.gz"))
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert files(out) == {f"{folder}{case}.nii.gz" for case in cases for folder in ("whole/", "core/", "")}
    for case, (crop, inp) in cases.items():
        x = torch.from_numpy(np.moveaxis(volumedata.zscore(crop), 2, 0)[:, None].astype(np.float32))
        with torch.no_grad():
            logits = np.moveaxis(model(x).numpy(), 0, -1)  # (2, 32, 32, depth): whole, core
        tie = np.abs(logits) < 1e-3
        for k, name in enumerate(("whole", "core")):
            written = same_grid(out / name / f"{case}.nii.gz", inp)
            assert written.get_data_dtype() == np.uint8
            mask = labels(out / name / f"{case}.nii.gz").astype(bool)
            assert 0.1 < mask.mean() < 0.9, (name, mask.mean())  # the masks follow the image
            assert tie[k][mask != (logits[k] > 0)].all(), (case, name)
        combined = np.zeros(crop.shape, np.uint8)
        combined[logits[0] > 0] = 1
        combined[logits[1] > 0] = 2
        assert same_grid(out / f"{case}.nii.gz", inp).get_data_dtype() == np.uint8
        differ = labels(out / f"{case}.nii.gz") != combined
        assert tie.any(axis=0)[differ].all(), case


def test_nan_and_inf_voxels_are_no_data_and_change_nothing_else(cli, tmp_path, tmp_path_factory, caplog):
    """One inf and three NaN voxels (three inside the body, one in the air) in a real float32 case: they are
    left out of the case's z-score, written as background, and reported once naming the case; every other
    voxel is what the network gives on the case z-scored by hand over its finite nonzero voxels (ties at logit
    0 excepted). Before, the case's mean became NaN and the whole prediction changed."""
    ckpt = volumedata.region_content(tmp_path_factory)
    model, _, _ = load_checkpoint(ckpt)
    crop, _, affine = volumedata.thick_volume("hippocampus_004", crop=volumedata.CROP)
    crop = crop.astype(np.float32)
    body, air = np.argwhere(crop != 0), np.argwhere(crop == 0)
    for value, voxel in zip((np.inf, np.nan, np.nan, np.nan), (body[0], body[len(body) // 2], body[-1], air[0])):
        crop[tuple(voxel)] = value
    nodata = ~np.isfinite(crop)
    assert nodata.sum() == 4
    inp = volumedata.save_nifti(crop, affine, tmp_path / "in" / "hippocampus_004_0000.nii.gz")
    out = tmp_path / "out"
    caplog.clear()
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert caplog.text.count("NaN or infinite") == 1 and "case hippocampus_004: 4 voxels" in caplog.text
    x = torch.from_numpy(np.moveaxis(volumedata.zscore(crop), 2, 0)[:, None].astype(np.float32))
    with torch.no_grad():
        logits = np.moveaxis(model(x).numpy(), 0, -1)
    tie = np.abs(logits) < 1e-3
    combined = np.zeros(crop.shape, np.uint8)
    for k, name in enumerate(("whole", "core")):
        same_grid(out / name / "hippocampus_004.nii.gz", inp)
        mask = labels(out / name / "hippocampus_004.nii.gz").astype(bool)
        assert 0.1 < mask.mean() < 0.9 and not mask[nodata].any(), name
        expected = (logits[k] > 0) & ~nodata
        assert tie[k][mask != expected].all(), name
        combined[expected] = k + 1
    differ = labels(out / "hippocampus_004.nii.gz") != combined
    assert tie.any(axis=0)[differ].all()


def test_nan_voxels_are_no_data_in_training(tmp_path, caplog):
    """A training case with NaN and inf voxels: its slices' z-score equals the hand value over the finite
    nonzero voxels, and those voxels are neither valid (loss, scores) nor real; cached and streamed alike."""
    root = Path(shutil.copytree(HIPPO, tmp_path / "hippo"))
    path = root / "imagesTr" / "hippocampus_003_0000.nii.gz"
    source = nib.load(path)
    image = np.asanyarray(source.dataobj).astype(np.float32)
    body = np.argwhere(image != 0)
    for value, voxel in zip((np.nan, np.inf, -np.inf), (body[0], body[len(body) // 3], body[-1])):
        image[tuple(voxel)] = value
    nib.save(nib.Nifti1Image(image, source.affine, source.header), path)
    nodata = ~np.isfinite(image)
    expected = volumedata.zscore(image)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\n  val_fraction: 0.01\nmodel:\n  head: softmax\n")
    cfg = load_config(config)
    head = cfg.head()
    for budget in (1 << 30, 0):
        caplog.clear()
        data = training_data(cfg, head, budget)
        assert caplog.text.count("NaN or infinite") == 1 and "case hippocampus_003: 3 voxels" in caplog.text
        axis = data.meta["volume"]["slice_axis"]
        records = [r for r in data.train if r.sample.case == "hippocampus_003"]
        assert len(records) == image.shape[axis]
        for record in records:
            if budget:
                _, valid, real, _ = unpack(record.cached.bits, len(head.classes))
            else:
                px = data.reader.read(record.sample)
                valid, real = px.valid, px.real
            x = volumedata.network_input(data, head, record)
            k = record.sample.index
            np.testing.assert_array_equal(real, ~np.take(nodata, k, axis))
            assert not valid[np.take(nodata, k, axis)].any()
            np.testing.assert_allclose(x[..., 0], np.take(expected, k, axis), rtol=1e-5, atol=1e-5)


def _ct_by_hand(root: Path, train_cases: list[str]) -> tuple[float, float, float, float]:
    """The ct scheme's numbers by hand: 0.5/99.5 percentiles of every training foreground voxel (each case has
    fewer than the 100 000 a case may contribute), and the mean and std of those voxels clipped to them."""
    fg = np.concatenate([labels(root / "imagesTr" / f"{c}_0000.nii.gz")[labels(root / "labelsTr" / f"{c}.nii.gz") > 0]
                         for c in train_cases]).astype(np.float64)
    low, high = np.percentile(fg, (0.5, 99.5))
    clipped = np.clip(fg, low, high)
    return low, high, clipped.mean(), clipped.std()


@pytest.mark.parametrize("modality, scheme", [("MRI", "zscore"), ("CT", "ct")])
def test_a_case_is_the_same_network_input_in_training_and_prediction(tmp_path, modality, scheme):
    """The float32 slices the network gets in prediction equal the training samples of the same case (no
    augmentation), and both equal the normalisation computed by hand: the per-case z-score over the nonzero
    voxels with each slice's holes filled, and the CT clip + dataset statistics of the training cases' foreground."""
    root = Path(shutil.copytree(HIPPO, tmp_path / "hippo"))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": modality}}))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\nmodel:\n  head: softmax\n")
    cfg = load_config(config)
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    assert data.norm.mode == "per_case" and [c.scheme for c in data.norm.channels] == [scheme]
    seg = Segmenter(nn.Identity(), head, checkpoint_meta(head, "Unet", "resnet18", 1, data.norm, data=data.meta),
                    "cpu", batch_size=4)
    seen = []  # what reaches the network; the logits do not matter here
    seg.forward = lambda x: (seen.append(x.clone()), torch.zeros(len(x), head.channels, *x.shape[2:]))[1]
    assert data.val[0].sample.case != "hippocampus_003"
    axis = data.meta["volume"]["slice_axis"]
    if scheme == "ct":
        low, high, mean, std = _ct_by_hand(root, data.meta["train_cases"])
    for case in ("hippocampus_003", data.val[0].sample.case):  # a float32 training case, the validation case
        seen.clear()
        volume = Volume(case, [root / "imagesTr" / f"{case}_0000.nii.gz"])
        predict_volume(seg, volume)
        inputs = torch.cat(seen).permute(0, 2, 3, 1).numpy()
        records = [r for r in data.train + data.val if r.sample.case == case]
        raw = np.asanyarray(nib.load(root / "imagesTr" / f"{case}_0000.nii.gz").dataobj)
        expected = volumedata.zscore(raw, axis) if scheme == "zscore" else (np.clip(raw, low, high) - mean) / std
        assert len(inputs) == len(records) == volume.shape[axis]
        for record in records:
            assert record.cached.image.dtype == raw.dtype  # cached raw; normalised on the device
            np.testing.assert_array_equal(inputs[record.sample.index], volumedata.network_input(data, head, record))
            np.testing.assert_allclose(inputs[record.sample.index][..., 0],
                                       np.take(expected, record.sample.index, axis), rtol=1e-5, atol=1e-5)


def test_cases_read_ahead_give_the_same_files_and_skip_the_unreadable(cli, tmp_path, monkeypatch):
    """Four real hippocampus cases and a truncated one between them, each case read in its turn and read
    ahead by 2 threads (what --workers 2 does on a GPU; forced here): byte-identical output files, the same
    case reported and skipped, the others written."""
    (tmp_path / "in").mkdir()
    for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"):
        shutil.copy(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in")
    bad = tmp_path / "in" / "hippocampus_002_0000.nii.gz"
    bad.write_bytes((HIPPO / "imagesTr" / "hippocampus_007_0000.nii.gz").read_bytes()[:3000])
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (1,)})
    outputs = {}
    from segkit import predict

    read_ahead = predict._read_ahead
    for workers in (0, 2):
        monkeypatch.setattr(predict, "_read_ahead", lambda jobs, canonical, _, w=workers: read_ahead(jobs, canonical, w))
        out = tmp_path / f"out{workers}"
        result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
        assert result.code == 1 and "case hippocampus_002" in result.err and "4 volumes" in result.out
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert sorted(outputs[2]) == [f"hippocampus_00{k}.nii.gz" for k in (1, 3, 4, 6)]
    assert outputs[0] == outputs[2]


def test_a_checkpoint_from_before_per_case_keeps_its_schemes(cli, tmp_path, tmp_path_factory):
    """A volume checkpoint written before `per_case` (model.json `normalization: none`, its schemes under
    data.volume.normalization) loads with those schemes and writes the masks of today's model.json."""
    ckpt = volumedata.region_content(tmp_path_factory)
    old = Path(shutil.copytree(ckpt, tmp_path / "old"))
    meta = json.loads((old / "model.json").read_text())
    assert meta["normalization"]["mode"] == "per_case"
    meta["data"]["volume"]["normalization"] = meta["normalization"]["channels"]
    meta["normalization"] = Normalization("none").to_meta()
    (old / "model.json").write_text(json.dumps(meta))
    assert Segmenter.load(old).norm == Segmenter.load(ckpt).norm
    crop, _, affine = volumedata.thick_volume("hippocampus_004", crop=volumedata.CROP)
    volumedata.save_nifti(crop, affine, tmp_path / "in" / "hippocampus_004_0000.nii.gz")
    for name in ("old", "new"):
        result = cli("predict", old if name == "old" else ckpt, tmp_path / "in", tmp_path / name, "--device", "cpu",
                     "--no-progress")
        assert result.code == 0, result.err
    new_mask = labels(tmp_path / "new" / "hippocampus_004.nii.gz")
    assert 0.02 < (new_mask > 0).mean() < 0.9
    np.testing.assert_array_equal(labels(tmp_path / "old" / "hippocampus_004.nii.gz"), new_mask)
