"""The volume options the README promises, each checked against values worked out by hand (numpy) on the real
NIfTI samples (tests/samples.py): `data.cache_mb` (the cases that fit are cached, the rest read slice by slice
to the same values), an explicit `data.slice_axis`, `train.foreground_oversample` (the share of crops centred
on foreground, over many draws) and `data.normalize` as one scheme per channel."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volumedata
from conftest import TINY, run_cli
from samples import CORD, HIPPO, HIPPO_CASES, hippo_volume
from segkit.config import Config, load_config
from segkit.data import dataset as dataset_module
from segkit.data.dataset import SegmentationDataset, cache_budget, unpack
from segkit.data.readers import Window
from segkit.data.training_data import TrainingData, training_data
from segkit.data.transforms import eval_transform
from segkit.data.volumes import Volume
from segkit.heads import Head

MIB = 1 << 20


def _config(tmp_path: Path, root: Path, data: str = "") -> Path:
    """A softmax config of `root` with more lines of the data section (`data`, each indented by two spaces)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"data:\n  root: {root}\n{data}model:\n  head: softmax\n")
    return path


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# --- data.cache_mb ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cord_stacks(module_tmp) -> Path:
    """The three real spinal-cord cases in segkit's layout: train/ a (T2w, 60 x 55 x 52) and b (T1w,
    42 x 76 x 77), val/ c (T2*w, 49 x 54 x 9). Cached raw (int16, int16, float32 as stored) they take 343 200,
    491 568 and 95 256 bytes (plus 1 byte per voxel of packed labels): with 1 MiB, a fits (514 800 bytes with
    its labels), a + b (1 252 152) do not, and c (119 070) fits in what a leaves."""
    root = module_tmp("cord") / "stacks"
    for split, case, contrast in (("train", "a", "t2w"), ("train", "b", "t1w"), ("val", "c", "t2sw")):
        for kind, src in (("images", CORD / "imagesTr" / f"errsm30_{contrast}_0000.nii.gz"),
                          ("masks", CORD / "labelsTr" / f"errsm30_{contrast}.nii.gz")):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / split / kind / f"{case}.nii.gz")
    return root


def _ras(path: Path) -> np.ndarray:
    """The file's voxels on the closest RAS axes, by nibabel's as_closest_canonical (not segkit's path)."""
    return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)


CORD_LINES = "  classes: [background, spinal_cord]\n  cache_mb: {mb}\n"


def _cached_cases(data: TrainingData) -> dict[str, bool]:
    """Case -> whether its slices are in memory (all or none of a case's are)."""
    states: dict[str, set[bool]] = {}
    for r in data.train + data.val:
        states.setdefault(r.sample.case, set()).add(r.cached is not None)
    assert all(len(s) == 1 for s in states.values()), states
    return {case: s.pop() for case, s in states.items()}


def test_cache_mb_caches_the_cases_that_fit_and_streams_the_rest_to_the_same_values(tmp_path, cord_stacks,
                                                                                      monkeypatch, caplog):
    """`segkit train` with data.cache_mb: 1 caches cases a and c and reads b slice by slice from its file; every
    slice, cached or read, is the case's z-score by hand along the slice axis, with its labels."""
    seen: list[tuple[int, TrainingData]] = []

    class Enough(Exception):
        """Stops the run once its data are prepared: the options under test act before the first step."""

    def prepared(cfg: Config, head: Head, budget: int) -> TrainingData:
        seen.append((budget, training_data(cfg, head, budget), head))
        raise Enough

    monkeypatch.setattr("segkit.train.training_data", prepared)
    with caplog.at_level(logging.INFO, logger="segkit"), pytest.raises(Enough):
        run_cli("train", _config(tmp_path, cord_stacks, CORD_LINES.format(mb=1)), "--out", tmp_path / "run", *TINY)
    ((budget, data, data_head),) = seen
    assert budget == MIB
    assert _cached_cases(data) == {"a": True, "b": False, "c": True}
    assert sum(r.cached_bytes for r in data.train + data.val) <= budget
    assert "1 of 2 cases cached in memory" in caplog.text

    axis = data.meta["volume"]["slice_axis"]
    assert axis == 2  # 1 mm isotropic training cases on RAS axes: a tie, so axial sections
    for case, contrast in (("a", "t2w"), ("b", "t1w"), ("c", "t2sw")):  # stored P-S-R, R-A-S, L-A-S
        expected = volumedata.zscore(_ras(CORD / "imagesTr" / f"errsm30_{contrast}_0000.nii.gz"))
        label = _ras(CORD / "labelsTr" / f"errsm30_{contrast}.nii.gz")
        records = [r for r in data.train + data.val if r.sample.case == case]
        assert [r.sample.index for r in records] == list(range(expected.shape[axis]))
        for r in records:
            px = data.reader.read(r.sample)  # from the file, whether cached or not
            want = np.take(expected, r.sample.index, axis)
            np.testing.assert_allclose(volumedata.network_input(data, data_head, r)[..., 0], want, rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_array_equal(px.labels[..., 1], np.take(label, r.sample.index, axis))
            if r.cached is not None:
                np.testing.assert_array_equal(r.cached.image, px.image)
                np.testing.assert_array_equal(unpack(r.cached.bits, 2)[0], px.labels)


@pytest.mark.parametrize("mb, cached", [(0, {"a": False, "b": False, "c": False}),
                                        (1, {"a": True, "b": False, "c": True}),
                                        (2, {"a": True, "b": True, "c": True})])
def test_cache_mb_caches_training_cases_first_then_validation_cases_in_what_is_left(tmp_path, cord_stacks, mb,
                                                                                     cached):
    """0 MiB: every slice read from its file; 1 MiB: a (514 800 bytes with its labels) but not b, which would
    pass the budget, then the validation case c in the 533 776 bytes a leaves; 2 MiB: every case in memory
    (1 371 222 bytes)."""
    cfg = load_config(_config(tmp_path, cord_stacks, CORD_LINES.format(mb=mb)))
    data = training_data(cfg, cfg.head(), cache_budget(cfg.data.cache_mb))
    assert _cached_cases(data) == cached
    assert sum(r.cached_bytes for r in data.train + data.val) <= mb * MIB


def test_cache_mb_counts_the_packed_labels_of_the_cases_it_caches(tmp_path):
    """Hippocampus cases (~62 000 voxels: 248 kB as float32 plus 62 kB of packed labels): with 1 MiB, what is
    cached, images and labels together, stays within the budget (counting the images alone cached 1 297 055
    bytes)."""
    cfg = load_config(_config(tmp_path, HIPPO, "  cache_mb: 1\n"))
    data = training_data(cfg, cfg.head(), cache_budget(cfg.data.cache_mb))
    records = data.train + data.val
    assert 0 < sum(r.cached_bytes for r in records) <= MIB
    assert any(r.cached is None for r in records)


# --- data.slice_axis ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1])
def test_an_explicit_slice_axis_cuts_every_case_along_it(tmp_path, axis):
    """The hippocampus cases (1 mm isotropic, stored R-A-S; `auto` would cut axial sections, axis 2) cut along the
    given axis: every index once, each slice the two other axes in order, values and labels as numpy takes them."""
    cfg = load_config(_config(tmp_path, HIPPO, f"  slice_axis: {axis}\n"))
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    assert data.meta["volume"]["slice_axis"] == axis
    for case in data.meta["train_cases"] + data.meta["val_cases"]:
        image, label = hippo_volume(case)
        expected = volumedata.zscore(image, axis)
        records = [r for r in data.train + data.val if r.sample.case == case]
        assert [r.sample.index for r in records] == list(range(image.shape[axis]))
        rest = [n for a, n in enumerate(image.shape) if a != axis]
        for r in records:
            assert (r.height, r.width) == tuple(rest) and r.cached.image.shape == (*rest, 1)
            np.testing.assert_allclose(volumedata.network_input(data, head, r)[..., 0],
                                       np.take(expected, r.sample.index, axis), atol=1e-5)
            labels, _, _, _ = unpack(r.cached.bits, 3)
            np.testing.assert_array_equal(labels.argmax(-1), np.take(label, r.sample.index, axis))
    case = data.meta["train_cases"][0]
    r = next(r for r in data.train if r.sample.case == case and r.sample.index == 20)
    image = hippo_volume(case)[0].astype(np.float64)
    body = volumedata.body(image, axis)  # holes are filled in the slices the model sees
    z = (image[20, 3, 7] if axis == 0 else image[3, 20, 7]) - image[body].mean()  # one voxel by hand
    assert volumedata.network_input(data, head, r)[3, 7, 0] == pytest.approx(z / image[body].std(), abs=1e-5)


# --- train.foreground_oversample ----------------------------------------------------------------------------

DRAWS = 2400


@pytest.fixture(scope="module")
def hippo_thick(module_tmp) -> Path:
    """The six hippocampus cases on the 1 x 1 x 3 mm grid, 32 x 32 in-plane (tests/volumedata.py), plain labels."""
    root = module_tmp("thick") / "hippo"
    for case in HIPPO_CASES:
        image, label, affine = volumedata.thick_volume(case, crop=volumedata.CROP)
        volumedata.save_nifti(image, affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        volumedata.save_nifti(label, affine, root / "labelsTr" / f"{case}.nii.gz")
    volumedata.write_json(root / "dataset.json", {"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "anterior": 1, "posterior": 2}})
    return root


@pytest.mark.parametrize("setting, share", [(None, 1 / 3), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0)])
def test_foreground_oversample_centres_that_share_of_the_crops_on_foreground(tmp_path, monkeypatch, hippo_thick,
                                                                             setting, share):
    """Over 2400 seeded 16-pixel crops of the training slices, the share centred on a foreground voxel is the
    setting (1/3 without one, as nnU-Net) within 4 standard deviations of a binomial draw, and every centred
    crop holds its centre, a voxel of anterior or posterior."""
    overrides = [] if setting is None else [f"train.foreground_oversample={setting}"]
    cfg = load_config(_config(tmp_path, hippo_thick), overrides)
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    assert data.foreground == pytest.approx(share)
    centred, uniform = [], []
    real_centred, real_uniform = dataset_module.centred_window, dataset_module.crop_window

    def spy_centred(height: int, width: int, size: int, point: np.ndarray) -> Window:
        window = real_centred(height, width, size, point)
        centred.append((window, point))
        return window

    def spy_uniform(*args) -> Window:
        uniform.append(1)
        return real_uniform(*args)

    monkeypatch.setattr(dataset_module, "centred_window", spy_centred)
    monkeypatch.setattr(dataset_module, "crop_window", spy_uniform)
    ds = SegmentationDataset(data.train, data.reader, head, eval_transform(), data.norm, crop=16,
                             foreground=data.foreground)
    for draw in range(DRAWS):
        ds.set_epoch(draw // len(ds))  # each (epoch, index) draws anew
        before = len(centred)
        target = ds[draw % len(ds)].target.numpy()  # the class index of each pixel of the crop
        if len(centred) > before:
            (top, left, _, _), (row, col) = centred[-1]
            assert target[row - top, col - left] in (1, 2)
    assert len(centred) + len(uniform) == DRAWS
    measured = len(centred) / DRAWS
    sd = (share * (1 - share) / DRAWS) ** 0.5
    assert abs(measured - share) <= 4 * sd, (measured, share)


# --- data.normalize: one scheme per channel -----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_channels(module_tmp) -> Path:
    """Four hippocampus cases with two channels named T2 and PD (neither says CT, so `auto` would z-score both):
    _0000 the real image, _0001 its intensities mapped to an int16 range like Hounsfield units (3 x - 1000);
    both zero-padded by 6 voxels in-plane (as resampled or skull-stripped scans are), the padding outside the
    body that z-scores are taken over."""
    root = module_tmp("two") / "Dataset903_TwoChannels"
    pad = ((6, 6), (6, 6), (0, 0))
    for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"):
        image = nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz")
        affine = image.affine.copy()
        affine[:3, 3] -= affine[:3, :2] @ [6, 6]  # the real voxels stay in place
        raw = np.asanyarray(image.dataobj).astype(np.float32)
        volumedata.save_nifti(np.pad(raw, pad), affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        volumedata.save_nifti(np.pad((raw * 3 - 1000).astype(np.int16), pad), affine,
                              root / "imagesTr" / f"{case}_0001.nii.gz")
        volumedata.save_nifti(np.pad(hippo_volume(case)[1], pad), affine, root / "labelsTr" / f"{case}.nii.gz")
    volumedata.write_json(root / "dataset.json", {
        "channel_names": {"0": "T2", "1": "PD"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "file_ending": ".nii.gz"})
    return root


def _by_hand(root: Path, case: str, schemes: list[str], train_cases: list[str], axis: int) -> np.ndarray:
    """(X, Y, Z, 2) float64 network input of a case sliced along `axis` by the README's rules: zscore =
    mean/std of the case's body (voxels where any channel is nonzero, each slice's holes filled), 0
    elsewhere; ct = clip to the 0.5/99.5 percentiles of every training foreground voxel of the channel, then
    the mean/std of those voxels clipped."""
    channels = [_voxels(root / "imagesTr" / f"{case}_{c:04d}.nii.gz").astype(np.float64) for c in range(2)]
    body = volumedata.body((channels[0] != 0) | (channels[1] != 0), axis)
    out = []
    for c, (raw, scheme) in enumerate(zip(channels, schemes)):
        if scheme == "zscore":
            out.append(np.where(body, (raw - raw[body].mean()) / raw[body].std(), 0.0))
            continue
        fg = np.concatenate([_voxels(root / "imagesTr" / f"{t}_{c:04d}.nii.gz")[
            _voxels(root / "labelsTr" / f"{t}.nii.gz") > 0].astype(np.float64) for t in train_cases])
        low, high = np.percentile(fg, (0.5, 99.5))
        clipped = np.clip(fg, low, high)
        out.append((np.clip(raw, low, high) - clipped.mean()) / clipped.std())
    return np.stack(out, axis=-1)


@pytest.mark.parametrize("schemes", [["zscore", "ct"], ["ct", "zscore"]])
def test_normalize_one_scheme_per_channel_in_training_and_prediction(tmp_path, two_channels, schemes):
    """data.normalize: [zscore, ct] (and the other order): each channel of every training slice, and of the
    slices prediction feeds the network for the validation case, equals its scheme computed by hand."""
    cfg = load_config(_config(tmp_path, two_channels, f"  normalize: [{', '.join(schemes)}]\n"))
    head = cfg.head()
    data = training_data(cfg, head, 1 << 30)
    assert data.norm.mode == "per_case" and [c.scheme for c in data.norm.channels] == schemes
    axis = data.meta["volume"]["slice_axis"]
    train_cases = data.meta["train_cases"]
    for case in train_cases:
        expected = _by_hand(two_channels, case, schemes, train_cases, axis)
        for r in (r for r in data.train if r.sample.case == case):
            assert r.cached.image.dtype == np.float32 and r.cached.image.shape[-1] == 2  # raw, as stored
            np.testing.assert_allclose(volumedata.network_input(data, head, r),
                                       np.take(expected, r.sample.index, axis), rtol=1e-5, atol=1e-5)
    (case,) = data.meta["val_cases"]
    volume = Volume(case, [two_channels / "imagesTr" / f"{case}_{c:04d}.nii.gz" for c in range(2)])
    expected = np.moveaxis(_by_hand(two_channels, case, schemes, train_cases, axis), axis, 0)
    np.testing.assert_allclose(volumedata.prediction_inputs(data, head, volume), expected, rtol=1e-5, atol=1e-5)


# --- z-score body ---------------------------------------------------------------------------------------------

def test_zscore_keeps_zeros_inside_the_body_and_zeroes_the_air():
    """The spinal-cord T2 case (stored P-S-R; 2,680 voxels of value 0 enclosed by the body in its axial slices,
    and 125 zeros of air at slice edges): z-scored over the body with each slice's holes filled (scipy's
    binary_fill_holes here), those zeros keep their normalised value, the air becomes 0, and a slice
    normalised alone equals the same slice of the whole case. Before, every raw 0 became 0 and was left out of
    the mean and std."""
    import torch

    from segkit.data.normalize import ChannelNorm, Normalization, body, case_params

    image = _ras(CORD / "imagesTr" / "errsm30_t2w_0000.nii.gz")
    axis = 2
    inside = volumedata.body(image, axis)
    holes = inside & (image == 0)
    assert holes.sum() > 2000 and ((image == 0) & ~inside).sum() > 100
    norm = Normalization.per_case([ChannelNorm("zscore")])
    stack = np.moveaxis(image, axis, 0)[..., None]
    params = case_params(norm, stack)

    def apply(slices: np.ndarray) -> np.ndarray:  # (n, h, w, 1) raw -> (n, h, w) as the device computes it
        x = torch.from_numpy(np.ascontiguousarray(slices)).permute(0, 3, 1, 2)
        stats = torch.from_numpy(params)[None].expand(len(slices), -1, -1)
        return norm.apply(x, stats, None, torch.from_numpy(~body(slices))[:, None])[:, 0].numpy()

    out = np.moveaxis(apply(stack), 0, axis)
    raw = image.astype(np.float64)
    mean, std = raw[inside].mean(), raw[inside].std()
    assert params[2:, 0] == pytest.approx((mean, std))
    np.testing.assert_allclose(out, np.where(inside, (raw - mean) / std, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[holes], -mean / std, rtol=1e-6)
    assert mean / std > 0.5
    for k in (0, stack.shape[0] // 2, stack.shape[0] - 1):
        np.testing.assert_array_equal(apply(stack[k:k + 1])[0], apply(stack)[k])
