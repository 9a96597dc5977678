"""In-plane resampling of volumes to a target spacing (`data.target_spacing`, nnU-Net's 2-D rule): the resizers
against a second, straightforward implementation (SciPy's map_coordinates, numpy indexing), training records
of the real 0.5 mm spinal-cord scan beside its 1 mm siblings, training and prediction feeding the network the
same slices, and outputs back on each case's grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import volumedata
from samples import CORD, HIPPO, NUCLEI
from segkit.config import load_config, parse_config
from segkit.data.dataset import unpack
from segkit.data.resample import plane_size, resize_labels, resize_logits, resize_slices
from segkit.data.training_data import training_data
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume
from segkit.errors import ConfigError
from segkit.plan import make_plan
from test_infer_volumes import files, labels, oracle_checkpoint, same_grid, save

T2SW = "errsm30_t2sw"
"""The spinal-cord contrast at 0.5 x 0.5 x 7.5 mm; its two siblings are 1 mm isotropic."""


def _source(n_in: int, n_out: int) -> np.ndarray:
    """Source coordinate of each output pixel centre (pixel centres aligned, as cv2 and torch resize)."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def _bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> size by SciPy: linear interpolation at the aligned centres, the edge value beyond the edges."""
    rows = np.clip(_source(image.shape[0], size[0]), 0, image.shape[0] - 1)
    cols = np.clip(_source(image.shape[1], size[1]), 0, image.shape[1] - 1)
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float64), grid, order=1, mode="nearest")


def _cells(n_in: int, n_out: int, nudge: float = 0.0) -> np.ndarray:
    """The source pixel each output centre falls in; `nudge` moves the centres (a centre on the line between two
    pixels is a tie that float32 and float64 break apart)."""
    return np.clip(np.floor((np.arange(n_out) + 0.5) * n_in / n_out + nudge).astype(int), 0, n_in - 1)


def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> size: each output pixel takes the source pixel its centre falls in."""
    return labels[np.ix_(_cells(labels.shape[0], size[0]), _cells(labels.shape[1], size[1]))]


def _nearest_or_tie(got: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> bool:
    """Whether each pixel of `got` is the source pixel its centre falls in, either one where it lies on a line."""
    ok = np.zeros(size, bool)
    for dr in (-1e-6, 1e-6):
        for dc in (-1e-6, 1e-6):
            cells = np.ix_(_cells(labels.shape[0], size[0], dr), _cells(labels.shape[1], size[1], dc))
            ok |= got == labels[cells]
    return bool(ok.all())


sizes = st.integers(1, 40)


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, out_h=sizes, out_w=sizes, seed=st.integers(0, 2**31 - 1))
def test_resizers_match_a_second_implementation(h, w, out_h, out_w, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 3000, (2, h, w, 3)).astype(np.int16)
    out = resize_slices(image, (out_h, out_w))
    assert out.shape == (2, out_h, out_w, 3) and out.dtype == np.float32
    for k in range(2):  # torch weighs in float32: its weights are off by up to ~40 * 2**-23, times steps up to 4000
        for c in range(3):
            np.testing.assert_allclose(out[k, ..., c], _bilinear(image[k, ..., c], (out_h, out_w)), rtol=0, atol=0.05)
    label = rng.integers(0, 5, (2, h, w)).astype(np.uint8)
    got = resize_labels(label, (out_h, out_w))
    assert got.dtype == np.uint8
    for k in range(2):
        assert _nearest_or_tie(got[k], label[k], (out_h, out_w))
    logits = torch.from_numpy(image[..., 0].astype(np.float32))[:, None]
    np.testing.assert_allclose(resize_logits(logits, (out_h, out_w))[:, 0].numpy(), out[..., 0], rtol=0, atol=1e-6)


def test_a_worked_example():
    """[0, 4] to 4 pixels: centres at -0.25, 0.25, 0.75, 1.25 of the source -> 0, 1, 3, 4; labels [1, 2] ->
    [1, 1, 2, 2]; [1, 2, 3, 4] to 2 -> the pixels whose centres hold the output centres, 2 and 4."""
    row = np.array([[[[0], [4]]]], np.uint8)
    np.testing.assert_array_equal(resize_slices(row, (1, 4))[0, 0, :, 0], [0, 1, 3, 4])
    np.testing.assert_array_equal(resize_labels(np.array([[[1, 2]]]), (1, 4))[0, 0], [1, 1, 2, 2])
    np.testing.assert_array_equal(resize_labels(np.array([[[1, 2, 3, 4]]]), (1, 2))[0, 0], [2, 4])


@pytest.mark.parametrize("shape, spacing, target, expected", [
    ((49, 54), (0.5, 0.5), (1.0, 1.0), (25, 27)),  # 24.5 rounds half up
    ((40, 40), (1.0, 1.0), (1.0, 1.0), None),
    ((40, 40), (1.009, 0.995), (1.0, 1.0), None),  # within 1 %: its own grid
    ((40, 40), (1.02, 1.0), (1.0, 1.0), (41, 40)),
    ((3, 3), (0.1, 0.1), (1.0, 1.0), (1, 1)),  # never empty
])
def test_plane_size(shape, spacing, target, expected):
    assert plane_size(shape, spacing, target) == expected


def _cord_config(tmp_path: Path, target: str = "median", root: Path = CORD):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {root}\n  target_spacing: {target}\n  slice_axis: 2\nmodel:\n  head: softmax\n")
    return load_config(config)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_training_resamples_the_half_millimetre_scan_and_keeps_the_others(tmp_path, budget):
    """At 1 mm the 0.5 mm scan's 49 x 54 slices become 25 x 27, their labels the source pixels under the new
    centres; the 1 mm scans are unchanged. Cached and read alike."""
    cfg = _cord_config(tmp_path, "[1.0, 1.0]")
    head = cfg.head()
    data = training_data(cfg, head, budget)
    assert data.meta["volume"]["target_spacing"] == [1.0, 1.0]
    for record in data.train + data.val:
        case = record.sample.case
        image = Volume(case, [CORD / "imagesTr" / f"{case}_0000.nii.gz"]).data[..., 0]
        truth = Volume(case, [CORD / "labelsTr" / f"{case}.nii.gz"]).data[..., 0][:, :, record.sample.index]
        raw = image[:, :, record.sample.index]
        if budget:
            px_image, layers = record.cached.image, unpack(record.cached.bits, 2)[0]
        else:
            px = data.reader.read(record.sample)
            px_image, layers = px.image, px.labels
        if case == T2SW:
            assert (record.height, record.width) == (25, 27)
            np.testing.assert_allclose(px_image[..., 0], _bilinear(raw, (25, 27)), rtol=1e-5, atol=1e-3)
            np.testing.assert_array_equal(layers[..., 1], _nearest(truth, (25, 27)) == 1)
        else:
            assert (record.height, record.width) == raw.shape
            np.testing.assert_array_equal(px_image[..., 0], raw)
            np.testing.assert_array_equal(layers[..., 1], truth == 1)


def test_median_is_the_training_cases_median(tmp_path):
    cfg = _cord_config(tmp_path)
    data = training_data(cfg, cfg.head(), 1 << 30)
    spacing = [Volume(c, [CORD / "imagesTr" / f"{c}_0000.nii.gz"]).spacing for c in data.meta["train_cases"]]
    assert len(spacing) == 2  # one of the three cases validates
    assert data.meta["volume"]["target_spacing"] == pytest.approx(np.median(spacing, axis=0)[:2].tolist())


def test_training_and_prediction_feed_the_network_the_same_resampled_slices(tmp_path):
    cfg = _cord_config(tmp_path, "[1.0, 1.0]")
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    volume = Volume(T2SW, [CORD / "imagesTr" / f"{T2SW}_0000.nii.gz"])
    inputs = volumedata.prediction_inputs(data, head, volume)
    records = sorted((r for r in data.train + data.val if r.sample.case == T2SW), key=lambda r: r.sample.index)
    assert inputs.shape[:3] == (9, 25, 27) and len(records) == 9
    for record in records:
        np.testing.assert_array_equal(inputs[record.sample.index], volumedata.network_input(data, head, record))


def test_prediction_comes_back_on_the_case_grid(cli, tmp_path, monkeypatch):
    """The oracle labels what it sees: the real 0.5 mm scan's label map painted with value 7, predicted by a
    model trained at 1 mm. The output lies on the input grid and equals, slice by slice, the same round trip
    computed with SciPy: the slice interpolated to 25 x 27, the oracle's logits (+-10 by the rounded value),
    those interpolated back to 49 x 54 and compared; a voxel may differ only where the two logits tie."""
    grid = nib.load(CORD / "imagesTr" / f"{T2SW}_0000.nii.gz")
    painted = labels(CORD / "labelsTr" / f"{T2SW}.nii.gz").astype(np.uint8) * 7
    inp = save(painted, grid, tmp_path / "in" / "cord_0000.nii.gz")
    ckpt = oracle_checkpoint(monkeypatch, tmp_path, "softmax", {"background": (0,), "cord": (7,)},
                             target_spacing=(1.0, 1.0))
    out = tmp_path / "out"
    result = cli("predict", ckpt, tmp_path / "in", out, "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert files(out) == {"cord.nii.gz"}
    same_grid(out / "cord.nii.gz", inp)
    got = labels(out / "cord.nii.gz")
    assert Volume(T2SW, [inp]).ornt[:, 1].tolist() == [-1, 1, 1]  # the scan's first axis runs right to left
    ras, got_ras = painted[::-1], got[::-1]  # slices are cut, and resampled, on RAS axes
    for k in range(painted.shape[2]):
        seen = np.round(_bilinear(ras[:, :, k], (25, 27)))
        background, cord = (_bilinear(np.where(seen == v, 10.0, -10.0), (49, 54)) for v in (0, 7))
        expected = np.where(cord > background, 7, 0)
        differ = got_ras[:, :, k] != expected
        assert not differ[np.abs(cord - background) > 1e-3].any(), k
    assert 0 < (got != painted).sum() < 0.2 * (painted == 7).sum()


def test_a_model_without_a_target_spacing_keeps_each_grid():
    """model.json from before target spacings were stored: None, every case on its own grid."""
    spec = VolumeSpec("nnunet", ("MRI",), 2, {"background": (0,), "a": (1,)}, spacing=(1.0, 1.0, 1.0))
    meta = {"data": {"volume": {k: v for k, v in spec.to_meta().items() if k != "target_spacing"}}}
    old = VolumeSpec.from_meta(meta)
    assert old.target_spacing is None and old.slice_size((49, 54, 9), (0.5, 0.5, 7.5)) is None
    assert "resample" in old.spacing_problem("x", (0.4, 0.4, 1.0))
    assert VolumeSpec.from_meta({"data": {"volume": {**spec.to_meta(), "target_spacing": [1.0, 1.0]}}}
                                ).slice_size((49, 54, 9), (0.5, 0.5, 7.5)) == (25, 27)


def test_target_spacing_is_for_volumes_and_positive(tmp_path):
    raw = {"data": {"root": str(NUCLEI), "classes": ["fg"],
                    "target_spacing": "median"}, "model": {"head": "sigmoid"}}
    with pytest.raises(ConfigError, match="target_spacing.*volume datasets"):
        parse_config(raw)
    raw = {"data": {"root": str(CORD), "target_spacing": [0.5, 0]}, "model": {"head": "softmax"}}
    with pytest.raises(ConfigError, match="more than 0"):
        parse_config(raw)


def test_the_plan_resamples_to_the_median_and_says_which_cases_move(tmp_path):
    plan = make_plan(CORD, device="cpu", measure=False)
    reason = next(c.reason for c in plan.choices if c.key == "data.target_spacing")
    assert plan.get("data.target_spacing") == "median"
    assert "1 x 1 mm" in reason and f"1 of 3 cases ({T2SW})" in reason and "own grid" in reason
    plan = make_plan(HIPPO, device="cpu", measure=False)
    assert "none is resampled" in next(c.reason for c in plan.choices if c.key == "data.target_spacing")
