"""Medical volumes on real NIfTI data: nnU-Net v2 / MSD / segkit layouts, geometry and voxels checked against
the files' bytes read by hand and their recorded provenance (SOURCE.json), voxel order kept as stored, the slice
axis, the by-case split, broken copies refused by case, and nnU-Net region labels (the hippocampus labels as
nested regions on a thick-slice grid, tests/volumedata.py)."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import samples
import volumedata
from samples import CORD, DATA, HIPPO, HIPPO_CASES
from segkit.data.volumes import (
    Volume,
    VolumeCase,
    VolumeDataset,
    case_split,
    combine_regions,
    region_masks,
    slice_axis,
)
from segkit.errors import ConfigError, DataError

SOURCE = {s["case"]: s for s in json.loads((DATA / "nifti" / "SOURCE.json").read_text())["samples"]}
NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 512: np.uint16}
MM = {1: 1000.0, 2: 1.0, 3: 0.001, 0: 1.0}  # NIfTI xyzt_units (space bits) -> mm; 0 (unknown) read as mm


def _copy(src: Path, dst: Path) -> Path:
    """A writable copy of a real dataset (the originals are never written)."""
    return Path(shutil.copytree(src, dst))


def _save(array: np.ndarray, affine: np.ndarray, path: Path, like: Path | None = None) -> Path:
    header = nib.load(like).header.copy() if like else None
    nib.save(nib.Nifti1Image(array, affine, header), path)
    return path


def _json(path: Path, spec: dict) -> None:
    path.write_text(json.dumps(spec, indent=1, sort_keys=False))  # key order matters for regions


def _case(ds: VolumeDataset, name: str) -> VolumeCase:
    return next(c for c in ds.cases("train") if c.name == name)


# --- nnU-Net v2 raw datasets, read as they are ---------------------------------------------------------------

@pytest.mark.parametrize("root, classes, n", [
    (HIPPO, ["background", "anterior", "posterior"], 6),
    (CORD, ["background", "spinal_cord"], 3),
])
def test_classes_and_channels_come_from_dataset_json(root, classes, n):
    ds = VolumeDataset.from_root(root)
    assert ds.layout == "nnunet"
    assert ds.classes == classes and ds.channel_names == ["MRI"]
    assert ds.regions is None and ds.regions_class_order is None and not ds.multilabel
    assert ds.label_values == set(range(len(classes)))
    assert list(ds.splits) == ["train"]  # no imagesTs
    cases = ds.cases("train")
    assert len(cases) == n
    for case in cases:
        assert case.images == [root / "imagesTr" / f"{case.name}_0000.nii.gz"]
        assert case.label == root / "labelsTr" / f"{case.name}.nii.gz"
    with pytest.raises(DataError, match="no 'test' split"):
        ds.cases("test")
    # A config naming classes that are neither a subset nor a renaming is refused, not silently overridden.
    with pytest.raises(ConfigError, match="data.classes"):
        VolumeDataset.from_root(root, classes=[*classes, "other"])
    assert VolumeDataset.from_root(root, classes=classes).classes == classes


def read_by_hand(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(voxels, affine, spacing in mm) of a single-file NIfTI-1 .nii.gz, parsed from its bytes by the NIfTI-1
    header layout with struct and numpy (no nibabel): dim at byte 40, datatype 70, pixdim 76, vox_offset 108,
    scl_slope/scl_inter 112, xyzt_units 123, sform_code 254, srow_x/y/z 280; voxels in Fortran order."""
    raw = gzip.decompress(path.read_bytes())
    assert struct.unpack_from("<i", raw, 0) == (348,) and raw[344:348] == b"n+1\0", path
    dim = struct.unpack_from("<8h", raw, 40)
    shape = dim[1:1 + dim[0]]
    (datatype,) = struct.unpack_from("<h", raw, 70)
    pixdim = struct.unpack_from("<8f", raw, 76)
    (offset,) = struct.unpack_from("<f", raw, 108)
    assert struct.unpack_from("<2f", raw, 112) == (1.0, 0.0), path  # stored unscaled: the voxels are the values
    (sform_code,) = struct.unpack_from("<h", raw, 254)
    assert sform_code > 0, path  # the sform is then the affine
    affine = np.vstack([np.array(struct.unpack_from("<12f", raw, 280), np.float64).reshape(3, 4), [0, 0, 0, 1]])
    voxels = np.frombuffer(raw, NIFTI_TYPES[datatype], math.prod(shape), int(offset)).reshape(shape, order="F")
    unit = MM[raw[123] & 0x07]
    return voxels, affine, tuple(float(z) * unit for z in pixdim[1:4])


def ras_by_hand(voxels: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...]
                ) -> tuple[np.ndarray, tuple[float, ...]]:
    """The voxels and spacing on the closest RAS axes, by hand: voxel axis i runs mostly along the world axis
    of its affine column's largest component (flipped where that component is negative)."""
    world = np.abs(affine[:3, :3]).argmax(axis=0)
    assert sorted(world.tolist()) == [0, 1, 2]
    for i in range(3):
        if affine[world[i], i] < 0:
            voxels = np.flip(voxels, axis=i)
    order = np.argsort(world)  # RAS axis a comes from voxel axis order[a]
    return np.transpose(voxels, order), tuple(spacing[i] for i in order)


@pytest.mark.parametrize("root", [HIPPO, CORD], ids=["hippocampus", "spinalcord"])
def test_geometry_and_voxels_equal_the_files_read_by_hand(root):
    """Every case against its bytes parsed by hand (then put on RAS axes by hand) and against SOURCE.json
    (shape, type, orientation, value range and voxels per label recorded when the samples were collected)."""
    ds = VolumeDataset.from_root(root)
    for case in ds.cases("train"):
        stored, affine, stored_spacing = read_by_hand(case.images[0])
        voxels, spacing = ras_by_hand(stored, affine, stored_spacing)
        known = SOURCE[case.name]
        volume = ds.image(case)
        assert tuple(known["image"]["shape"]) == stored.shape and volume.shape == voxels.shape
        assert volume.channels == 1
        np.testing.assert_array_equal(volume.affine, affine)
        np.testing.assert_allclose(volume.affine, known["image"]["affine"], atol=1e-5)
        assert "".join(nib.aff2axcodes(volume.affine)) == known["image"]["orientation"]
        assert volume.spacing == spacing
        assert volume.data.shape == (*voxels.shape, 1) and volume.data.dtype == np.dtype(known["image"]["dtype"])
        np.testing.assert_array_equal(volume.data[..., 0], voxels)
        np.testing.assert_array_equal(volume.to_file(volume.data[..., 0]), stored)
        assert [volume.data.min(), volume.data.max()] == pytest.approx(known["image"]["value_range"])
        label = ds.label_volume(case)
        assert np.issubdtype(label.dtype, np.integer) and label.shape == volume.shape
        label_stored, label_affine, _ = read_by_hand(case.label)
        np.testing.assert_array_equal(label, ras_by_hand(label_stored, label_affine, stored_spacing)[0])
        values, counts = np.unique(label, return_counts=True)
        assert dict(zip(map(str, values.tolist()), counts.tolist())) == known["label"]["voxels_per_label"]
        ds.check_labels(case)  # the real labels use only declared values


def test_a_permuted_copy_reads_as_the_original(tmp_path):
    """A thick-slice hippocampus case (1 x 1 x 3 mm, stored R-A-S) saved with its axes permuted (3, 1, 1 mm;
    the affine's columns permuted with them, so every voxel keeps its place in the scanner): read on RAS
    axes it is the original array again, with the original spacing and slice axis; `to_file` gives back the
    stored order."""
    image, labels, affine = volumedata.thick_volume("hippocampus_004")
    order = (2, 0, 1)
    permuted = affine.copy()
    permuted[:3, :3] = affine[:3, list(order)]
    for folder, name, array in (("imagesTr", "p_0000.nii.gz", image), ("labelsTr", "p.nii.gz", labels)):
        volumedata.save_nifti(np.transpose(array, order), permuted, tmp_path / folder / name)
    volumedata.write_json(tmp_path / "dataset.json", {"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                      "labels": {"background": 0, "anterior": 1, "posterior": 2}})
    ds = VolumeDataset.from_root(tmp_path)
    volume = ds.image(_case(ds, "p"))
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and nib.aff2axcodes(permuted) == ("S", "R", "A")
    assert volume.shape == (36, 52, 13) and volume.spacing == (1.0, 1.0, 3.0)
    np.testing.assert_array_equal(volume.data[..., 0], image)
    np.testing.assert_array_equal(ds.label_volume(_case(ds, "p")), labels)
    np.testing.assert_array_equal(volume.to_file(volume.data[..., 0]), image.transpose(order))
    k, i, j = 5, 20, 30  # one voxel: the same place in the scanner in both files
    np.testing.assert_array_equal(volume.affine @ [k, i, j, 1], affine @ [i, j, k, 1])
    assert volume.data[i, j, k, 0] == image.transpose(order)[k, i, j]
    assert slice_axis(volume.spacing, volume.shape) == 2


def test_slice_axis_is_the_coarse_axis_of_the_oblique_case():
    ds = VolumeDataset.from_root(CORD)
    oblique = ds.image(_case(ds, "errsm30_t2sw"))
    assert oblique.shape == (49, 54, 9)
    assert oblique.spacing[:2] == (0.5, 0.5) and oblique.spacing[2] == pytest.approx(7.5, abs=1e-5)
    # Independently: the voxel axis whose affine column is longest (the 7.5 mm one) despite the obliquity.
    assert int(np.argmax(np.linalg.norm(oblique.affine[:3, :3], axis=0))) == 2
    assert slice_axis(oblique.spacing, oblique.shape) == 2
    permuted = ds.image(_case(ds, "errsm30_t2w"))  # 1 mm isotropic, stored P-S-R (60, 55, 52): read R-A-S
    assert permuted.shape == (52, 60, 55) and slice_axis(permuted.spacing, permuted.shape) == 2  # a tie: axial


def test_slice_axis_ties():
    assert slice_axis((1.0, 1.0, 1.0), (10, 5, 7)) == 2  # isotropic: axial (head-foot on RAS axes)
    assert slice_axis((2.0, 2.0, 1.0), (10, 5, 7)) == 1  # a tie without the axial axis: the fewest voxels
    assert slice_axis((2.0, 2.0, 1.0), (5, 5, 7)) == 0  # then the lowest index
    assert slice_axis((0.5, 7.499999, 7.5), (9, 40, 30)) == 2  # float32 header noise ties
    assert slice_axis((3.0, 0.7, 0.7), (20, 512, 512)) == 0
    with pytest.raises(ValueError):
        slice_axis((1.0, 1.0), (4, 4))


def test_case_split_is_by_case_and_deterministic():
    cases = VolumeDataset.from_root(HIPPO).cases("train")
    train, val = case_split(cases, 0.34, seed=3)
    names_t, names_v = {c.name for c in train}, {c.name for c in val}
    assert not names_t & names_v and names_t | names_v == set(HIPPO_CASES)
    assert len(val) == 2 and len(train) == 4
    assert case_split(list(reversed(cases)), 0.34, seed=3) == (train, val)  # order of listing does not matter
    assert len({tuple(c.name for c in case_split(cases, 0.34, s)[1]) for s in range(10)}) > 1  # the seed does
    tiny_t, tiny_v = case_split(cases[:2], 0.01, seed=0)
    assert len(tiny_t) == len(tiny_v) == 1  # at least one case each
    with pytest.raises(DataError, match="too few"):
        case_split(cases[:1], 0.2, seed=0)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        case_split(cases, 1.0, seed=0)


# --- broken copies: refused, naming the case -------------------------------------------------------------

def test_missing_channel_file_names_the_case(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "MRI", "1": "MRI again"}
    _json(root / "dataset.json", spec)
    for name in HIPPO_CASES:  # a second channel per case: a copy of the real first one
        shutil.copy(root / "imagesTr" / f"{name}_0000.nii.gz", root / "imagesTr" / f"{name}_0001.nii.gz")
    ds = VolumeDataset.from_root(root)
    volume = ds.image(_case(ds, "hippocampus_001"))
    assert volume.channels == 2 and volume.data.shape == (35, 51, 35, 2)
    np.testing.assert_array_equal(volume.data[..., 1], volume.data[..., 0])

    extra = root / "imagesTr" / "hippocampus_001_0002.nii.gz"
    shutil.copy(root / "imagesTr" / "hippocampus_001_0000.nii.gz", extra)
    with pytest.raises(DataError, match=r"hippocampus_001_0002.nii.gz \(case hippocampus_001\): channel 2"):
        VolumeDataset.from_root(root)
    extra.unlink()
    (root / "imagesTr" / "hippocampus_004_0000.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case hippocampus_004: missing channel file\(s\) \['hippocampus_004_0000"):
        VolumeDataset.from_root(root)


def test_case_without_its_only_image_names_the_case(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    (root / "imagesTr" / "hippocampus_006_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="case hippocampus_006: label .* but no image .*hippocampus_006_0000"):
        VolumeDataset.from_root(root)


def test_channel_files_on_different_grids_are_refused(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "MRI", "1": "MRI shifted"}
    _json(root / "dataset.json", spec)
    for name in HIPPO_CASES:
        src = root / "imagesTr" / f"{name}_0000.nii.gz"
        img = nib.load(src)
        affine = img.affine.copy()
        if name == "hippocampus_007":
            affine[0, 3] += 1.0  # one voxel off
        _save(np.asanyarray(img.dataobj), affine, root / "imagesTr" / f"{name}_0001.nii.gz", like=src)
    ds = VolumeDataset.from_root(root)
    ds.image(_case(ds, "hippocampus_001"))
    with pytest.raises(DataError, match="case hippocampus_007: channel files .*_0000.* and .*_0001.* different grids"):
        ds.image(_case(ds, "hippocampus_007"))


def test_label_value_outside_dataset_json_names_case_and_value(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    path = root / "labelsTr" / "hippocampus_003.nii.gz"
    img = nib.load(path)
    label = np.asanyarray(img.dataobj).copy()
    label[label == 2] = 5  # "posterior" stored as 5
    _save(label, img.affine, path, like=path)
    ds = VolumeDataset.from_root(root)
    ds.check_labels(_case(ds, "hippocampus_001"))
    with pytest.raises(DataError, match=r"case hippocampus_003: .* label values \[5\] .*dataset.json"):
        ds.check_labels(_case(ds, "hippocampus_003"))


def test_image_label_shape_mismatch_names_the_case(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    path = root / "labelsTr" / "hippocampus_004.nii.gz"
    img = nib.load(path)
    _save(np.asanyarray(img.dataobj)[:, :, :-1], img.affine, path, like=path)
    ds = VolumeDataset.from_root(root)
    with pytest.raises(DataError, match=r"case hippocampus_004: label .* is \(36, 52, 37\) .* \(36, 52, 38\)"):
        ds.label_volume(_case(ds, "hippocampus_004"))


def test_image_label_affine_mismatch_names_the_case(tmp_path):
    root = _copy(CORD, tmp_path / "cord")
    path = root / "labelsTr" / "errsm30_t2sw.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 3] += (0.0, 0.0, 7.5)  # one slice off
    _save(np.asanyarray(img.dataobj), affine, path, like=path)
    ds = VolumeDataset.from_root(root)
    ds.label_volume(_case(ds, "errsm30_t1w"))
    with pytest.raises(DataError, match="case errsm30_t2sw: .* different grids .*7.5"):
        ds.label_volume(_case(ds, "errsm30_t2sw"))


def test_truncated_volume_is_a_data_error(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    path = root / "imagesTr" / "hippocampus_007_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:-2000])
    ds = VolumeDataset.from_root(root)
    with pytest.raises(DataError, match="hippocampus_007"):
        _ = ds.image(_case(ds, "hippocampus_007")).data


def test_dataset_json_mistakes_name_the_key(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    spec = json.loads((root / "dataset.json").read_text())
    for change, key in [({"labels": {"background": 0, "anterior": 1, "posterior": 3}}, "not 0 to 2"),
                        ({"file_ending": ".mha"}, "file_ending"),
                        ({"channel_names": {"1": "MRI"}}, "channel_names"),
                        ({"dataset": {}}, "`dataset` file list")]:
        _json(root / "dataset.json", {**spec, **change})
        with pytest.raises(DataError, match=key):
            VolumeDataset.from_root(root)
    _json(root / "dataset.json", {k: v for k, v in spec.items() if k != "file_ending"})
    with pytest.raises(DataError, match="file_ending"):
        VolumeDataset.from_root(root)


def test_ignore_label_is_allowed_in_label_files_but_is_no_class(tmp_path):
    root = _copy(HIPPO, tmp_path / "hippo")
    spec = json.loads((root / "dataset.json").read_text())
    _json(root / "dataset.json", {**spec, "labels": {**spec["labels"], "ignore": 3}})
    path = root / "labelsTr" / "hippocampus_001.nii.gz"
    img = nib.load(path)
    label = np.asanyarray(img.dataobj).copy()
    label[:2] = 3  # two unannotated planes
    _save(label, img.affine, path, like=path)
    ds = VolumeDataset.from_root(root)
    assert ds.classes == ["background", "anterior", "posterior"] and ds.ignore_label == 3
    ds.check_labels(_case(ds, "hippocampus_001"))
    assert VolumeDataset.from_root(root, ignore_index=3).ignore_label == 3
    with pytest.raises(ConfigError, match="data.ignore_index"):
        VolumeDataset.from_root(root, ignore_index=255)


# --- MSD: dataset.json with modality/training, multi-channel as one 4-D file ---------------------------------

def test_msd_layout_with_a_4d_image(tmp_path):
    root = samples.msd_hippocampus(tmp_path / "Task04_Hippocampus")
    shutil.copy(HIPPO / "imagesTr" / "hippocampus_033_0000.nii.gz", root / "imagesTs" / "hippocampus_033.nii.gz")
    ds = VolumeDataset.from_root(root)
    assert ds.layout == "msd" and ds.classes == ["background", "Anterior", "Posterior"]
    assert ds.channel_names == ["MRI", "MRI x2"] and not ds.multilabel
    case = _case(ds, "hippocampus_001")
    volume = ds.image(case)
    assert volume.shape == (35, 51, 35) and volume.channels == 2 and volume.data.shape == (35, 51, 35, 2)
    np.testing.assert_array_equal(volume.data[..., 1], 2 * volume.data[..., 0])
    ds.check_labels(case)
    (test_case,) = ds.cases("test")
    assert test_case.name == "hippocampus_033" and test_case.label is None
    with pytest.raises(DataError, match="case hippocampus_033: 1 channel"):  # the test image has one, not two
        ds.image(test_case)
    (root / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(DataError, match="case hippocampus_004: .*labelsTr/hippocampus_004.nii.gz .* not found"):
        VolumeDataset.from_root(root)


# --- nnU-Net region labels: the hippocampus labels as nested regions, whole = {1, 2}, core = {2} -----------------

@pytest.fixture
def hippo_regions(tmp_path) -> Path:
    return volumedata.thick_regions(tmp_path / "Dataset901_Hippocampus")


def test_regions_nest_and_combine_back_to_the_label_map(hippo_regions):
    ds = VolumeDataset.from_root(hippo_regions)
    assert ds.multilabel and ds.classes == ["whole", "core"]
    assert ds.regions == {"whole": (1, 2), "core": (2,)} and ds.regions_class_order == (1, 2)
    for case in ds.cases("train"):
        ds.check_labels(case)
        volume = ds.image(case)
        _, label, _ = volumedata.thick_volume(case.name, crop=volumedata.CROP)
        assert volume.shape == label.shape and volume.spacing == (1.0, 1.0, 3.0)
        assert slice_axis(volume.spacing, volume.shape) == 2  # the 3 mm axis, though it has the fewest voxels
        np.testing.assert_array_equal(ds.label_volume(case), label)
        masks = region_masks(label, ds.regions)
        whole, core = masks
        np.testing.assert_array_equal(whole, (label == 1) | (label == 2))
        np.testing.assert_array_equal(core, label == 2)
        assert not (core & ~whole).any()  # core inside whole: the regions overlap, hence sigmoid classes
        assert 0 < core.sum() < whole.sum() < whole.size
        np.testing.assert_array_equal(combine_regions(masks, ds.regions, ds.regions_class_order), label)
        # The order matters: the values swapped paint anterior as 2 and posterior as 1.
        wrong = combine_regions(masks, ds.regions, (2, 1))
        np.testing.assert_array_equal(wrong, np.choose(label, [0, 2, 1]))


def test_region_labels_need_a_matching_regions_class_order(hippo_regions):
    meta = hippo_regions / "dataset.json"
    spec = json.loads(meta.read_text())
    for order in (None, [2], [2, 7]):
        _json(meta, {**spec, "regions_class_order": order})
        with pytest.raises(DataError, match="regions_class_order"):
            VolumeDataset.from_root(hippo_regions)
    _json(meta, {**spec, "labels": {"background": 0, "whole": [1, 2]}, "regions_class_order": [1]})
    ds = VolumeDataset.from_root(hippo_regions)
    assert ds.regions == {"whole": (1, 2)} and ds.label_values == {0, 1, 2}
    _json(meta, {**spec, "labels": {"background": 0, "anterior": [1]}})  # one value each: plain labels, no regions
    ds = VolumeDataset.from_root(hippo_regions)
    assert not ds.multilabel and ds.classes == ["background", "anterior"] and ds.regions_class_order is None
    with pytest.raises(DataError, match=r"case hippocampus_001: .* label values \[2\]"):
        ds.check_labels(ds.cases("train")[0])


# --- segkit's own layout: no dataset.json ---------------------------------------------------------------------

@pytest.fixture
def segkit_volumes(tmp_path) -> Path:
    """ROOT/{train,val}/{images,masks}/<case>.nii.gz from the real hippocampus cases; one as uncompressed .nii."""
    root = tmp_path / "volumes"
    for split, names in (("train", HIPPO_CASES[:4]), ("val", HIPPO_CASES[4:])):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        for name in names:
            shutil.copy(HIPPO / "imagesTr" / f"{name}_0000.nii.gz", root / split / "images" / f"{name}.nii.gz")
            shutil.copy(HIPPO / "labelsTr" / f"{name}.nii.gz", root / split / "masks" / f"{name}.nii.gz")
    plain = root / "train" / "images" / "hippocampus_003.nii.gz"
    nib.save(nib.load(plain), plain.with_name("hippocampus_003.nii"))
    plain.unlink()
    return root


def test_segkit_layout(segkit_volumes):
    with pytest.raises(ConfigError, match="data.classes"):
        VolumeDataset.from_root(segkit_volumes)
    ds = VolumeDataset.from_root(segkit_volumes, classes=["background", "anterior", "posterior"])
    assert ds.layout == "segkit" and list(ds.splits) == ["train", "val"] and ds.channel_names == ["0"]
    assert [c.name for c in ds.cases("train")] == list(HIPPO_CASES[:4])
    assert [c.name for c in ds.cases("val")] == list(HIPPO_CASES[4:])
    case = _case(ds, "hippocampus_003")
    assert case.images[0].name == "hippocampus_003.nii"
    voxels, affine, _ = read_by_hand(HIPPO / "imagesTr" / "hippocampus_003_0000.nii.gz")
    np.testing.assert_array_equal(ds.image(case).data[..., 0], voxels)  # the uncompressed copy reads the same
    np.testing.assert_array_equal(ds.image(case).affine, affine)
    for split in ("train", "val"):
        for c in ds.cases(split):
            ds.check_labels(c)
    two = VolumeDataset.from_root(segkit_volumes, classes=["background", "hippocampus"])
    with pytest.raises(DataError, match=r"case hippocampus_001: .* label values \[2\] .*data.classes"):
        two.check_labels(_case(two, "hippocampus_001"))
    (segkit_volumes / "val" / "masks" / "hippocampus_033.nii.gz").unlink()
    with pytest.raises(DataError, match="case hippocampus_033: no mask"):
        VolumeDataset.from_root(segkit_volumes, classes=["background", "anterior", "posterior"])


def test_no_known_layout(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        VolumeDataset.from_root(tmp_path / "absent")
    with pytest.raises(DataError, match="no dataset.json and no train/images"):
        VolumeDataset.from_root(tmp_path)


def test_select_and_rename_classes_by_hand():
    label = np.array([[0, 1, 2, 1]])
    ds = VolumeDataset.from_root(HIPPO)
    assert ds.class_values == {"background": (0,), "anterior": (1,), "posterior": (2,)}
    layers, valid = ds.layers(label)
    assert layers[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]] and valid.all()
    # Selecting leaves posterior out: with plain labels its voxels join background, so softmax sees every voxel.
    picked = VolumeDataset.from_root(HIPPO, classes=["background", "anterior"])
    assert picked.class_values == {"background": (0, 2), "anterior": (1,)}
    assert picked.layers(label)[0][0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    # Without background (one-vs-rest sigmoid), the other voxels are in no class.
    only = VolumeDataset.from_root(HIPPO, classes=["posterior"])
    assert only.layers(label)[0][0, :, 0].tolist() == [0, 0, 1, 0]
    renamed = VolumeDataset.from_root(HIPPO, classes=["bg", "head", "tail"])
    assert renamed.class_values == {"bg": (0,), "head": (1,), "tail": (2,)}


def test_selected_regions_keep_their_order_entries(hippo_regions):
    core = VolumeDataset.from_root(hippo_regions, classes=["core"])
    assert core.regions == {"core": (2,)} and core.regions_class_order == (2,)
    assert VolumeDataset.from_root(hippo_regions).overlapping() == [("whole", "core")]
    label = np.array([0, 1, 2])
    layers, _ = VolumeDataset.from_root(hippo_regions).layers(label)
    assert layers.tolist() == [[0, 0], [1, 0], [1, 1]]


def test_spacing_is_in_millimetres_whatever_the_header_unit(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.diag([4.0, 4.0, 50.0, 1.0]))
    image.header.set_xyzt_units("micron")
    path = tmp_path / "em.nii.gz"
    nib.save(image, path)
    assert Volume("em", [path]).spacing == pytest.approx((0.004, 0.004, 0.05))
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    assert Volume("em", [path]).spacing == (4.0, 4.0, 50.0)
