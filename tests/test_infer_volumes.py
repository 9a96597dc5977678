"""Prediction on NIfTI volumes: masks on the input's exact grid for both heads, label values and the regions'
combined map, the same network input as training, and bad inputs refused by case.

Two kinds of model: checkpoints trained with `segkit train` on real volumes, and an "oracle" whose output is
known (class k wherever the input's value is one of class k's label values, with normalisation `none`), so a
written volume can be compared voxel by voxel with what it must be."""

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
from conftest import DATASETS, TINY, assert_refused, run_cli
from segkit.config import load_config
from segkit.data.normalize import Normalization
from segkit.data.training_data import training_data
from segkit.data.volume_norm import ChannelNorm, VolumeNormalization
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume
from segkit.heads import build_head
from segkit.infer import Segmenter
from segkit.infer_volumes import predict_volume
from segkit.model import checkpoint_meta

HIPPO = DATASETS / "nifti-samples" / "msd-hippocampus"
CORD = DATASETS / "nifti-samples" / "sct-spinalcord"


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
                      **data) -> Path:
    """A checkpoint folder whose model is an Oracle (Segmenter.load is pointed at it), trained 'on volumes'
    with normalisation none, so the network sees the raw voxel values."""
    h = build_head(head, list(class_values))
    spec = VolumeSpec(layout, channel_names, slice_axis,
                      VolumeNormalization(tuple(ChannelNorm("none") for _ in channel_names)), class_values, order)
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


REGIONS = {"whole": (1, 2), "core": (1,)}


@pytest.mark.parametrize("classes, order, combined", [
    (REGIONS, (2, 1), lambda v: v),  # encompassing region first: core (1) paints over whole (2)
    ({"core": (1,), "whole": (1, 2)}, (1, 2), lambda v: np.where(v > 0, 2, 0)),  # whole paints over core
])
def test_sigmoid_regions_write_one_volume_per_class_and_the_combined_map(cli, tmp_path, monkeypatch, classes,
                                                                        order, combined):
    """Real EM membrane labels (1 = membrane, 2 = its ring) as nnU-Net regions; the combined map follows
    regions_class_order: regions in class order, later ones painting over earlier ones."""
    _, value = volumedata.membrane_volume(0)
    inp = volumedata.save_nifti(value, volumedata.EM_AFFINE, tmp_path / "in" / "em_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", classes, order)
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress", "--save-probs")
    assert result.code == 0, result.err
    assert files(out) == {"core/em.nii.gz", "whole/em.nii.gz", "em.nii.gz", "em_probs.nii.gz"}
    np.testing.assert_array_equal(labels(out / "whole" / "em.nii.gz"), np.isin(value, (1, 2)).astype(np.uint8))
    np.testing.assert_array_equal(labels(out / "core" / "em.nii.gz"), (value == 1).astype(np.uint8))
    np.testing.assert_array_equal(labels(out / "em.nii.gz"), combined(value))
    for name in ("core/em.nii.gz", "whole/em.nii.gz", "em.nii.gz"):
        assert same_grid(out / name, inp).get_data_dtype() == np.uint8
    on, off = torch.sigmoid(torch.tensor([10.0, -10.0])).half().float().numpy()
    probs = labels(out / "em_probs.nii.gz")
    for k, values in enumerate(classes.values()):
        np.testing.assert_array_equal(probs[..., k], np.where(np.isin(value, values), on, off))


@pytest.mark.parametrize("options", [(), ("--tile", "32", "--overlap", "8"), ("--tta",)])
def test_channel_files_of_a_case_are_grouped(cli, tmp_path, monkeypatch, options):
    """nnU-Net cases: <case>_0000 and <case>_0001 are one 2-channel case, predicted once; slices larger than
    the tile go through windows, and TTA flips, with the same result."""
    _, value = volumedata.membrane_volume(3)
    for case in ("a", "b"):
        volumedata.save_nifti(value, volumedata.EM_AFFINE, tmp_path / "in" / f"{case}_0000.nii.gz")
        volumedata.save_nifti(np.zeros_like(value), volumedata.EM_AFFINE, tmp_path / "in" / f"{case}_0001.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "m": (1,), "r": (2,)},
                             channel_names=("EM", "EM2"))
    result = cli("predict", ckpt, tmp_path / "in", tmp_path / "out", "--device", "cpu", "--no-progress", *options)
    assert result.code == 0, result.err
    assert files(tmp_path / "out") == {"a.nii.gz", "b.nii.gz"} and "2 volumes" in result.out
    np.testing.assert_array_equal(labels(tmp_path / "out" / "b.nii.gz"), value)


# -- refusals ----------------------------------------------------------------------------------------------

def _em_case(folder: Path, name: str, channels: int = 1) -> None:
    image, _ = volumedata.membrane_volume(0)
    data = image if channels == 1 else np.stack([image] * channels, axis=-1)
    volumedata.save_nifti(data, volumedata.EM_AFFINE, folder / name)


@pytest.mark.parametrize("layout, names, channels, words", [
    ("nnunet", ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"], ("EM", "EM2"), ["case b", "b_0001.nii.gz"]),
    ("nnunet", ["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], ("EM",), ["case b", "channel 1"]),
    ("segkit", ["a.nii.gz", "b.nii.gz:2"], ("EM",), ["case b", "2 channel(s)", "1 (['EM'])"]),
])
def test_missing_or_extra_channels_are_refused_naming_the_case(cli, tmp_path, monkeypatch, layout, names,
                                                                 channels, words):
    for name in names:
        file, _, n = name.partition(":")
        _em_case(tmp_path / "in", file, int(n or 1))
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (1,)}, layout=layout,
                             channel_names=channels)
    out = tmp_path / "out"
    assert_refused(cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress"), out, *words)


@pytest.mark.parametrize("damage", ["not nifti", "truncated"])
def test_an_unreadable_case_is_reported_and_the_others_written(cli, tmp_path, monkeypatch, damage):
    _em_case(tmp_path / "in", "good_0000.nii.gz")
    bad = tmp_path / "in" / "bad_0000.nii.gz"
    if damage == "not nifti":
        bad.write_bytes(gzip.compress(b"this is no NIfTI header" * 40))
    else:
        _em_case(tmp_path / "in", bad.name)
        bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)})
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 1 and "Traceback" not in result.err
    assert "failed:" in result.err and "case bad" in result.err and "1 volumes" in result.out
    assert files(out) == {"good.nii.gz"}


def test_existing_outputs_need_overwrite_and_the_output_may_not_be_inside_the_input(cli, tmp_path, monkeypatch):
    _em_case(tmp_path / "in", "a_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", {"fg": (255,)})
    out = tmp_path / "out"
    (out / "fg").mkdir(parents=True)
    (out / "fg" / "a.nii.gz").write_bytes(b"keep")
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 2 and "--overwrite" in result.err and "fg/a.nii.gz" in result.err
    assert (out / "fg" / "a.nii.gz").read_bytes() == b"keep"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress", "--overwrite")
    assert result.code == 0, result.err
    assert nib.load(out / "fg" / "a.nii.gz").shape == (64, 64, 6)
    inside = tmp_path / "in" / "pred"
    assert_refused(cli("predict", ckpt, tmp_path / "in", inside, "--device", "cpu"), inside, "inside the input")


def test_volumes_and_2d_models_refuse_each_others_inputs(cli, tmp_path, monkeypatch):
    _em_case(tmp_path / "nifti", "a_0000.nii.gz")
    (tmp_path / "png").mkdir()
    shutil.copy(volumedata.ISBI / "images" / "0.png", tmp_path / "png" / "0.png")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)})
    out = tmp_path / "out"
    assert_refused(cli("predict", ckpt, tmp_path / "png", out, "--device", "cpu"), out, "no NIfTI volumes",
                   "trained on volume slices")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"bg": (0,), "fg": (255,)}, volume=False)
    assert_refused(cli("predict", ckpt, tmp_path / "nifti", out, "--device", "cpu"), out, "trained on 2-D images",
                   "Fix:")


# -- models trained with `segkit train` on real volumes ----------------------------------------------------

def train(tmp: Path, root: Path, head: str) -> Path:
    config = tmp / f"{head}.yaml"
    config.write_text(f"data:\n  root: {root}\nmodel:\n  head: {head}\n")
    result = run_cli("train", config, "--out", tmp / "run", "--epochs", "1", *TINY)
    assert result.code == 0, result.err
    return tmp / "run" / "best"


@pytest.fixture(scope="module")
def hippo_model(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("hippo"), HIPPO, "softmax")


def test_trained_softmax_model_writes_label_volumes_on_the_input_grid(cli, tmp_path, hippo_model):
    cases = ("hippocampus_001", "hippocampus_004")  # uint8 and float32 images
    (tmp_path / "in").mkdir()
    for case in cases:
        shutil.copy(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in" / f"{case}_0000.nii.gz")
    out = tmp_path / "out"
    result = cli("predict", hippo_model, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert files(out) == {f"{case}.nii.gz" for case in cases}
    for case in cases:
        image = same_grid(out / f"{case}.nii.gz", HIPPO / "imagesTr" / f"{case}_0000.nii.gz")
        assert image.get_data_dtype() == np.uint8
        assert set(np.unique(labels(out / f"{case}.nii.gz"))) <= {0, 1, 2}


@pytest.mark.parametrize("modality, scheme", [("MRI", "zscore"), ("CT", "ct")])
def test_a_case_is_the_same_network_input_in_training_and_prediction(tmp_path, modality, scheme):
    """The float32 slices the network gets in prediction equal the training samples of the same case (no
    augmentation), for the per-case z-score and for the CT clip + dataset statistics fitted in training."""
    root = Path(shutil.copytree(HIPPO, tmp_path / "hippo"))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": modality}}))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\nmodel:\n  head: softmax\n")
    cfg = load_config(config)
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    assert [c["scheme"] for c in data.meta["volume"]["normalization"]] == [scheme]
    seg = Segmenter(nn.Identity(), head, checkpoint_meta(head, "Unet", "resnet18", 1, data.norm, data=data.meta),
                    "cpu", batch_size=4)
    seen = []  # what reaches the network; the logits do not matter here
    seg.forward = lambda x: (seen.append(x.clone()), torch.zeros(len(x), head.channels, *x.shape[2:]))[1]
    assert data.val[0].sample.case != "hippocampus_003"
    for case in ("hippocampus_003", data.val[0].sample.case):  # a float32 training case, the validation case
        seen.clear()
        volume = Volume(case, [root / "imagesTr" / f"{case}_0000.nii.gz"])
        predict_volume(seg, volume)
        inputs = torch.cat(seen).permute(0, 2, 3, 1).numpy()
        records = [r for r in data.train + data.val if r.sample.case == case]
        assert len(inputs) == len(records) == volume.shape[data.meta["volume"]["slice_axis"]]
        for record in records:
            np.testing.assert_array_equal(inputs[record.sample.index], record.cached.image)
