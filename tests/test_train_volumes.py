"""Training on slices of real NIfTI volumes: the data section from dataset.json, the split by case, one
normalisation of a case whether its slices are cached or read from the files, nested regions refused by softmax
and trained by sigmoid, segkit's own layout, and broken cases refused by name. (Foreground oversampling and the
other volume options: test_volume_options.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volumedata
from conftest import TINY, assert_refused
from samples import HIPPO
from segkit.config import load_config
from segkit.data.dataset import unpack
from segkit.data.training_data import training_data
from segkit.errors import ConfigError


def _config(tmp_path: Path, root: Path, head: str, *extra: str) -> Path:
    path = tmp_path / f"{head}.yaml"
    data = "".join(f"{line}\n" for line in extra)  # more lines of the data section
    path.write_text(f"data:\n  root: {root}\n{data}model:\n  head: {head}\n")
    return path


def _train(cli, config: Path, out: Path, *more):
    return cli("train", config, "--out", out, "--epochs", "1", *TINY, *more)


def test_data_root_alone_is_a_data_section(tmp_path):
    cfg = load_config(_config(tmp_path, HIPPO, "softmax"))
    assert cfg.data.classes == ["background", "anterior", "posterior"]
    assert cfg.data.mask == "volume" and cfg.data.channels == 1
    picked = load_config(_config(tmp_path, HIPPO, "sigmoid", "  classes: [posterior]"))
    assert picked.head().classes == ["posterior"]


@pytest.mark.parametrize("extra, key", [
    ("data.channels=3", "data.channels"), ("data.bands=[1]", "data.bands"), ("data.mask=index", "data.mask"),
    ("data.normalize=[zscore, ct]", "data.normalize"), ("data.normalize=dataset", "data.normalize"),
    ("data.classes=[a, b, c, d]", "data.classes"),
])
def test_volume_config_keys_that_do_not_apply_are_refused(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_config(tmp_path, HIPPO, "softmax"), [extra])


def test_split_is_by_case_and_every_slice_of_a_case_stays_with_it(tmp_path):
    cfg = load_config(_config(tmp_path, HIPPO, "softmax"))
    data = training_data(cfg, cfg.head(), 1 << 30)
    train_cases, val_cases = set(data.meta["train_cases"]), set(data.meta["val_cases"])
    assert train_cases.isdisjoint(val_cases) and len(train_cases | val_cases) == 6 and len(val_cases) == 1
    assert {r.sample.case for r in data.train} == train_cases
    assert {r.sample.case for r in data.val} == val_cases
    axis = data.meta["volume"]["slice_axis"]
    for case in train_cases | val_cases:  # every slice of the case, once
        shape = nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz").shape
        records = [r for r in data.train + data.val if r.sample.case == case]
        assert sorted(r.sample.index for r in records) == list(range(shape[axis]))


def test_a_case_normalises_the_same_cached_or_read_slice_by_slice(tmp_path):
    cfg = load_config(_config(tmp_path, HIPPO, "softmax"))
    head = cfg.head()
    cached = training_data(cfg, head, 1 << 30)
    streamed = training_data(cfg, head, 0)
    assert all(r.cached is not None for r in cached.train) and all(r.cached is None for r in streamed.train)
    axis = cached.meta["volume"]["slice_axis"]
    case = cached.train[0].sample.case
    expected = volumedata.zscore(np.asanyarray(nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz").dataobj), axis)
    for a, b in zip(cached.train, streamed.train):
        if a.sample.case != case:
            continue
        want = np.take(expected, a.sample.index, axis=axis)
        np.testing.assert_allclose(volumedata.network_input(cached, head, a)[..., 0], want, atol=1e-5)
        np.testing.assert_array_equal(volumedata.network_input(streamed, head, b),
                                      volumedata.network_input(cached, head, a))
        px = streamed.reader.read(b.sample)
        np.testing.assert_array_equal(px.image, a.cached.image)  # the raw voxels, as stored
        labels = np.take(np.asanyarray(nib.load(HIPPO / "labelsTr" / f"{case}.nii.gz").dataobj), a.sample.index, axis)
        np.testing.assert_array_equal(px.labels.argmax(-1), labels)


def test_regions_refuse_softmax_naming_them_and_train_with_sigmoid(cli, tmp_path, tmp_path_factory):
    """The hippocampus labels as nested regions on a 1 x 1 x 3 mm grid: softmax is refused before anything is
    written; sigmoid trains (the session's one region run, tests/volumedata.py) and records the regions."""
    base = volumedata.region_run(tmp_path_factory)
    out = tmp_path / "run"
    assert_refused(_train(cli, _config(tmp_path, base / "data", "softmax"), out), out, "whole", "core",
                   "model.head: sigmoid")
    meta = json.loads((base / "run" / "best" / "model.json").read_text())
    assert meta["classes"] == ["whole", "core"] and meta["head"] == "sigmoid"
    volume = meta["data"]["volume"]
    assert volume["slice_axis"] == 2  # the 3 mm axis, not the 1 mm ones
    assert volume["class_values"] == {"whole": [1, 2], "core": [2]} and volume["regions_class_order"] == [1, 2]
    assert sorted(meta["data"]["train_cases"] + meta["data"]["val_cases"]) == list(volumedata.REGION_CASES)


def test_segkit_layout_of_an_anisotropic_stack(cli, tmp_path):
    """Two thick-slice hippocampus cases (1 x 1 x 3 mm) in segkit's layout, both named `stack` (label value =
    class index): train/ and val/ are the split, each case cut along its 3 mm axis into every one of its slices,
    and the labels are read as the classes `data.classes` names; without them training is refused."""
    root = tmp_path / "stacks"
    truth = {}
    for split, case in (("train", "hippocampus_001"), ("val", "hippocampus_004")):
        image, label, affine = volumedata.thick_volume(case)
        truth[split] = (label > 0).astype(np.uint8)
        volumedata.save_nifti(image, affine, root / split / "images" / "stack.nii.gz")
        volumedata.save_nifti(truth[split], affine, root / split / "masks" / "stack.nii.gz")
    cfg = load_config(_config(tmp_path, root, "softmax", "  classes: [background, hippocampus]"))
    data = training_data(cfg, cfg.head(), 1 << 30)
    assert data.meta["volume"]["slice_axis"] == 2 and data.meta["volume"]["layout"] == "segkit"
    assert data.meta["train_cases"] == data.meta["val_cases"] == ["stack"]
    assert data.meta["volume"]["class_values"] == {"background": [0], "hippocampus": [1]}
    for split, records in (("train", data.train), ("val", data.val)):
        assert [r.sample.index for r in records] == list(range(truth[split].shape[2]))  # 12 and 13 slices
        assert all(r.sample.image.parent.parent.name == split for r in records)
        for r in records:
            assert r.cached.image.shape == (*truth[split].shape[:2], 1)
            labels, _, _, _ = unpack(r.cached.bits, 2)
            np.testing.assert_array_equal(labels[..., 1], truth[split][:, :, r.sample.index])
    assert_refused(_train(cli, _config(tmp_path, root, "softmax"), tmp_path / "run"), tmp_path / "run",
                   "data.classes")


@pytest.fixture
def hippo_copy(tmp_path) -> Path:
    return Path(shutil.copytree(HIPPO, tmp_path / "hippo"))


def _resave(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine, image.header), path)


@pytest.mark.parametrize("damage, words", [
    ("value", ["hippocampus_004", "[7]", "dataset.json"]),
    ("shape", ["hippocampus_004", "voxels", "resample"]),
    ("affine", ["hippocampus_004", "different grids"]),
    ("channel", ["hippocampus_004", "_0000"]),
])
def test_broken_cases_are_refused_by_name(cli, tmp_path, hippo_copy, damage, words):
    label = hippo_copy / "labelsTr" / "hippocampus_004.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj)
    if damage == "value":
        data = data.copy()
        data[0, 0, 0] = 7
        _resave(label, data)
    elif damage == "shape":
        _resave(label, data[:-1])
    elif damage == "affine":
        affine = nib.load(label).affine.copy()
        affine[0, 3] += 5.0
        _resave(label, data, affine)
    else:
        (hippo_copy / "imagesTr" / "hippocampus_004_0000.nii.gz").unlink()
    out = tmp_path / "run"
    assert_refused(_train(cli, _config(tmp_path, hippo_copy, "softmax"), out), out, *words)


def test_two_channels_one_ct_fit_on_the_training_foreground(tmp_path):
    """FLAIR + CT-like channels (nnU-Net files _0000, _0001, built from real hippocampus crops): `auto` gives
    the channel named CT the ct scheme, fitted on the training cases' foreground voxels only."""
    root = tmp_path / "Dataset902_TwoChannels"
    cases = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
    for case in cases:
        image = nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz")
        raw = np.asanyarray(image.dataobj).astype(np.float32)
        volumedata.save_nifti(raw, image.affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        volumedata.save_nifti((raw * 3 - 1000).astype(np.int16), image.affine, root / "imagesTr" / f"{case}_0001.nii.gz")
        (root / "labelsTr").mkdir(exist_ok=True)
        shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    volumedata.write_json(root / "dataset.json", {
        "channel_names": {"0": "FLAIR", "1": "CT"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"})
    cfg = load_config(_config(tmp_path, root, "softmax"))
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    zscore, ct = data.norm.to_meta()["channels"]
    assert zscore["scheme"] == "zscore" and ct["scheme"] == "ct"
    fg = np.concatenate([np.asanyarray(nib.load(root / "imagesTr" / f"{c}_0001.nii.gz").dataobj)[
        np.asanyarray(nib.load(root / "labelsTr" / f"{c}.nii.gz").dataobj) > 0].astype(np.float64)
        for c in data.meta["train_cases"]])  # every foreground voxel (fewer than the per-case sample budget)
    assert fg.size < 100_000 * len(data.meta["train_cases"])
    assert (ct["low"], ct["high"]) == pytest.approx(tuple(np.percentile(fg, (0.5, 99.5))))
    clipped = np.clip(fg, ct["low"], ct["high"])  # mean and std of the clipped values, as `dataset` for images
    assert (ct["mean"], ct["std"]) == pytest.approx((clipped.mean(), clipped.std()))
    record = data.train[0]
    raw = np.take(np.asanyarray(nib.load(root / "imagesTr" / f"{record.sample.case}_0001.nii.gz").dataobj),
                  record.sample.index, data.meta["volume"]["slice_axis"]).astype(np.float64)
    want = (np.clip(raw, ct["low"], ct["high"]) - ct["mean"]) / ct["std"]
    np.testing.assert_allclose(volumedata.network_input(data, head, record)[..., 1], want, rtol=1e-5, atol=1e-5)


def _box(volume: np.ndarray, x: slice, y: slice, z: slice) -> np.ndarray:
    volume[x, y, z] = 1
    return volume


def _boxes(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An nnU-Net dataset of three cases whose image is the label map an oracle network predicts: one
    perfect (32 voxels), one with half of a 256-voxel box missed (Dice 2/3), one 8-voxel box predicted one
    voxel aside (Dice 1/2). Returns case -> (truth, predicted)."""
    shape, affine = (12, 12, 6), np.diag([0.5, 0.5, 3.0, 1.0])
    empty = lambda: np.zeros(shape, np.uint8)  # noqa: E731
    cases = {"c0": (_box(empty(), np.s_[2:6], np.s_[2:6], np.s_[1:3]), _box(empty(), np.s_[2:6], np.s_[2:6], np.s_[1:3])),
             "c1": (_box(empty(), np.s_[2:10], np.s_[2:10], np.s_[0:4]), _box(empty(), np.s_[2:10], np.s_[2:10], np.s_[0:2])),
             "c2": (_box(empty(), np.s_[4:6], np.s_[4:6], np.s_[3:5]), _box(empty(), np.s_[5:7], np.s_[4:6], np.s_[3:5]))}
    for name, (truth, predicted) in cases.items():
        volumedata.save_nifti(predicted, affine, root / "imagesTr" / f"{name}_0000.nii.gz")
        volumedata.save_nifti(truth, affine, root / "labelsTr" / f"{name}.nii.gz")
    volumedata.write_json(root / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                                                  "file_ending": ".nii.gz", "numTraining": 3})
    return cases


def _by_hand(cases: dict[str, tuple[np.ndarray, np.ndarray]], units: list[str]) -> tuple[float, float]:
    """(mean over `units` of each case's Dice, Dice of their voxels pooled)."""
    dice = {n: 2 * (t & p).sum() / (t.sum() + p.sum()) for n, (t, p) in cases.items()}
    assert [round(float(dice[n]), 4) for n in ("c0", "c1", "c2")] == [1.0, 0.6667, 0.5]
    tp = sum((cases[n][0] & cases[n][1]).sum() for n in units)
    return float(np.mean([dice[n] for n in units])), 2 * tp / sum(cases[n][0].sum() + cases[n][1].sum() for n in units)


BOX_DATA = ("  classes: [a]", "  val_fraction: 0.6", "  normalize: [none]")


def test_validation_scores_volumes_per_case_as_evaluate_does(tmp_path, monkeypatch):
    """Whichever two of the `_boxes` cases the split holds back, training's validation score is the mean of
    their Dice computed by hand, not the pooled one (which differs for every pair), and equals what
    `evaluate` reports for them from whole predicted volumes."""
    from segkit.data.dataset import SegmentationDataset
    from segkit.data.transforms import eval_transform
    from segkit.data.volumes import VolumeDataset
    from segkit.evaluate import evaluate_volumes
    from segkit.infer import Segmenter
    from segkit.metrics import summarize_units
    from segkit.validation import validate
    from test_infer_volumes import oracle_checkpoint

    root = tmp_path / "Dataset901_Boxes"
    cases = _boxes(root)
    cfg = load_config(_config(tmp_path, root, "sigmoid", *BOX_DATA))
    seg = Segmenter.load(oracle_checkpoint(monkeypatch, tmp_path, "sigmoid", {"a": (1,)}), device="cpu")
    assert cfg.head().classes == seg.classes == ["a"]
    data = training_data(cfg, seg.head, 1 << 30)
    units = list(dict.fromkeys(r.sample.scored_in for r in data.val))
    assert len(units) == 2
    _, counts = validate(seg, seg.head.loss("bce+dice"), SegmentationDataset(data.val, data.reader, seg.head,
                                                                             eval_transform(), data.norm), units, 4)
    per_case, pooled = _by_hand(cases, units)
    validated = summarize_units(counts, seg.classes)["mean"]["dice"]
    assert validated == pytest.approx(per_case, abs=1e-12) and abs(validated - pooled) > 0.05
    ds = VolumeDataset.from_root(root, seg.classes)
    evaluated = evaluate_volumes(seg, ds, [c for c in ds.cases("train") if c.name in units])
    assert evaluated["mean"]["dice"] == pytest.approx(validated, abs=1e-12)


def test_training_chooses_best_by_the_per_case_score(cli, tmp_path, monkeypatch):
    """`segkit train` on the `_boxes` cases with the oracle as its network (its one weight enters the logits
    multiplied by 0, so training cannot change them): the validation Dice in metrics.csv is the per-case mean by hand, not the pooled Dice."""
    from test_infer_volumes import Oracle

    class Trainable(Oracle):
        def __init__(self, class_values):
            super().__init__(class_values)
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return super().forward(x) + 0 * self.w

    monkeypatch.setattr("segkit.train.build_model", lambda *a, **k: Trainable([(1,)]))
    root = tmp_path / "Dataset901_Boxes"
    cases = _boxes(root)
    out = tmp_path / "run"
    result = _train(cli, _config(tmp_path, root, "sigmoid", *BOX_DATA), out, "--set", "train.steps_per_epoch=1")
    assert result.code == 0, result.err
    units = json.loads((out / "last" / "model.json").read_text())["data"]["val_cases"]
    per_case, pooled = _by_hand(cases, units)
    lines = (out / "metrics.csv").read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[-1].split(",")))
    assert float(row["val_mean_dice"]) == pytest.approx(per_case, abs=1e-9) and abs(per_case - pooled) > 0.05
