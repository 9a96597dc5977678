"""`segkit inspect` on volume datasets: numbers checked against nibabel reads of the real NIfTI samples, nested
regions (the hippocampus labels as whole = {1, 2}, core = {2} on a 1 x 1 x 3 mm grid, tests/volumedata.py), the
advised head checked against the config validation, and broken cases refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

import segkit.data.inspect as inspect_module
import volumedata
from samples import CORD, HIPPO
from segkit.config import load_config
from segkit.data.inspect import inspect_volumes
from segkit.errors import ConfigError


def _load(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name[:-len(".nii.gz")]: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


def _voxels(image: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(image.dataobj)


# --- plain labels: the real hippocampus and spinal cord samples -------------------------------------------------

def test_hippocampus_numbers_equal_nibabels(cli, tmp_path):
    labels, images = _load(HIPPO / "labelsTr"), _load(HIPPO / "imagesTr")
    counts = {name: np.bincount(_voxels(image).ravel(), minlength=3) for name, image in labels.items()}
    total = sum(counts.values())
    pixels = np.concatenate([_voxels(image).astype(np.float64).ravel() for image in images.values()])
    shapes = np.array([image.shape for image in images.values()])

    r = cli("inspect", HIPPO, "--json", tmp_path / "report.json")
    assert r.code == 0, r.err
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["layout"] == "nnunet" and d["channels"] == ["MRI"] and not d["regions"]
    assert d["class_values"] == {"background": [0], "anterior": [1], "posterior": [2]}
    assert d["class_voxels"] == dict(zip(["background", "anterior", "posterior"], total.tolist()))
    for name, n in zip(["background", "anterior", "posterior"], total):
        assert d["class_frequency"][name] == pytest.approx(n / total.sum(), rel=1e-12)
    assert d["cases_with_class"] == {"background": 6, "anterior": 6, "posterior": 6}
    assert d["overlapping"] == [] and d["overlap_share"] == 0 and d["unlabeled_share"] == 0
    assert d["shape"] == [{"min": float(shapes[:, a].min()), "median": float(np.median(shapes[:, a])),
                           "max": float(shapes[:, a].max())} for a in range(3)]
    assert d["spacing"] == [{"min": 1.0, "median": 1.0, "max": 1.0}] * 3 and d["anisotropy"] == 1
    assert d["slice_axis"] == 2  # isotropic: a tie, so axial (head-foot on the RAS axes volumes are read in)
    assert d["images"]["dtypes"] == {"uint8": 2, "float32": 4}  # as SOURCE.json says
    stats = d["images"]["intensity"]["MRI"]
    assert stats["min"] == pixels.min() and stats["max"] == pixels.max()
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-9) and stats["std"] == pytest.approx(pixels.std(),
                                                                                                      rel=1e-6)
    assert d["head"] == "softmax" and d["config"] == {"data": {"root": str(HIPPO)}, "model": {"head": "softmax"}}
    assert "anterior     2.8093%" in r.out and f"({total[1]} voxels, 6 of 6 cases)" in r.out
    assert "\nhead: softmax — plain labels" in r.out


def test_spinal_cord_geometry_and_its_oblique_anisotropic_case():
    images = _load(CORD / "imagesTr")
    zooms = np.array([image.header.get_zooms()[:3] for image in images.values()], dtype=float)
    report = inspect_volumes(CORD)
    assert [s["max"] for s in report.spacing_stats()] == zooms.max(0).tolist() == pytest.approx([1, 1, 7.5])
    assert [s["min"] for s in report.spacing_stats()] == zooms.min(0).tolist() == pytest.approx([0.5, 0.5, 1])
    assert report.median_spacing == [1.0, 1.0, 1.0] and report.anisotropy == 1
    name, worst = report.most_anisotropic()
    assert name == "errsm30_t2sw" and worst == pytest.approx(7.5 / 0.5, rel=1e-6)
    assert report.slice_axis == 2  # all spacings tie: axial
    fg = sum(int((_voxels(image) == 1).sum()) for image in _load(CORD / "labelsTr").values())
    assert report.class_voxels()["spinal_cord"] == fg and report.advice()[0] == "softmax"
    assert report.dtypes() == {"int16": 2, "float32": 1}


# --- nested regions: sigmoid, and the config it advises validates -------------------------------------------

def test_regions_overlap_and_the_advice_is_what_the_config_accepts(cli, tmp_path):
    cases = ("hippocampus_001", "hippocampus_006")
    root = volumedata.thick_regions(tmp_path / "Dataset901_Hippocampus", cases)
    labels = np.concatenate([volumedata.thick_volume(case, crop=volumedata.CROP)[1].ravel() for case in cases])
    report = inspect_volumes(root)
    assert report.dataset.overlapping() == [("whole", "core")]
    assert report.class_voxels() == {"whole": int(np.isin(labels, [1, 2]).sum()), "core": int((labels == 2).sum())}
    assert 0 < report.overlap_share == pytest.approx((labels == 2).mean(), rel=1e-12)
    assert 0 < report.unlabeled_share == pytest.approx((labels == 0).mean(), rel=1e-12)
    head, why = report.advice()
    assert head == "sigmoid" and "whole [1, 2] and core [2]" in why and "softmax" in why
    assert report.slice_axis == 2 and report.anisotropy == pytest.approx(3.0, rel=1e-6)  # 3 mm over 1 mm

    config = tmp_path / "advised.yaml"
    config.write_text(yaml.safe_dump(report.config()))
    assert load_config(config).head().name == "sigmoid"
    config.write_text(yaml.safe_dump({**report.config(), "model": {"head": "softmax"}}))
    with pytest.raises(ConfigError, match="overlap"):
        load_config(config)

    r = cli("inspect", root)
    assert r.code == 0, r.err
    assert "regions (from dataset.json): whole = [1, 2], core = 2" in r.out
    assert "overlapping classes: whole & core" in r.out and "\nhead: sigmoid" in r.out


# --- segkit layout: no dataset.json to name the classes -----------------------------------------------------

def test_segkit_layout_reports_values_found_or_takes_the_config_classes(cli, tmp_path):
    root = tmp_path / "volumes"
    for kind, folder, suffix in (("images", "imagesTr", "_0000"), ("masks", "labelsTr", "")):
        (root / "train" / kind).mkdir(parents=True)
        for case in ("hippocampus_001", "hippocampus_003"):
            shutil.copy(HIPPO / folder / f"{case}{suffix}.nii.gz", root / "train" / kind / f"{case}.nii.gz")
    r = cli("inspect", root)
    assert r.code == 0, r.err
    assert "labels (label values found; data.classes must name them): background = 0, class_1 = 1, class_2 = 2" \
        in r.out
    assert "    classes: [background, class_1, class_2]   # rename" in r.out
    config = tmp_path / "hippo.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root), "classes": ["bg", "front", "back"]},
                                      "model": {"head": "softmax"}}))
    r = cli("inspect", root, "--config", config, "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["classes"] == ["bg", "front", "back"] and not d["guessed"]
    assert d["config"]["data"]["classes"] == ["bg", "front", "back"]
    first = _voxels(nib.load(HIPPO / "labelsTr" / "hippocampus_001.nii.gz"))
    third = _voxels(nib.load(HIPPO / "labelsTr" / "hippocampus_003.nii.gz"))
    assert d["class_voxels"]["back"] == int((first == 2).sum() + (third == 2).sum())


# --- broken cases: every one named, exit 2 ------------------------------------------------------------------

def test_bad_cases_are_refused_by_name(cli, tmp_path):
    root = Path(shutil.copytree(HIPPO, tmp_path / "hippo"))
    label = nib.load(HIPPO / "labelsTr" / "hippocampus_003.nii.gz")
    wrong = _voxels(label).copy()
    wrong[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(wrong, label.affine, label.header), root / "labelsTr" / "hippocampus_003.nii.gz")
    small = nib.load(HIPPO / "labelsTr" / "hippocampus_006.nii.gz")
    nib.save(nib.Nifti1Image(_voxels(small)[:-1], small.affine, small.header),
             root / "labelsTr" / "hippocampus_006.nii.gz")
    r = cli("inspect", root)
    assert r.code == 2 and "Traceback" not in r.err
    assert "2 of 6 cases cannot be used" in r.err
    assert "case hippocampus_003" in r.err and "label values [5]" in r.err
    assert "case hippocampus_006" in r.err and "(34, 52, 34) voxels but image" in r.err and "(35, 52, 34)" in r.err


# --- the label counts, against np.unique on np.take copies ------------------------------------------------------

def _unique(label: np.ndarray) -> dict:
    values, counts = np.unique(label, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(*[st.integers(0, 7)] * 3),
       dtype=st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.float32]),
       high=st.sampled_from([1, 4, 300, 70000]), chunk=st.sampled_from([1, 5, 1 << 22]),
       layout=st.sampled_from(["C", "F", "reversed"]), data=st.data())
@example(shape=(7, 1, 2), dtype=np.uint8, high=4, chunk=5, layout="C", data=None)  # blocks of 2 rows, then 1
def test_histogram_and_halves_equal_a_sort_of_each_half(shape, dtype, high, chunk, layout, data):
    """Any label volume (negative, large and float values take np.unique's path; blocks of 1 and 5 voxels
    split the rows; Fortran order and a reversed view as well as C order): the histogram, and per axis those of
    the first n//2 and last n//2 slices, equal np.unique counts of np.take copies."""
    low = -2 if np.issubdtype(dtype, np.signedinteger) or dtype == np.float32 else 0
    top = min(high, np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else high
    size = int(np.prod(shape))
    flat = (data.draw(st.lists(st.integers(low, top), min_size=size, max_size=size)) if data is not None
            else [v % (top + 1) for v in range(size)])
    label = np.array(flat, dtype=dtype).reshape(shape)
    label = {"C": label, "F": np.asfortranarray(label), "reversed": label[::-1, :, ::-1]}[layout]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(inspect_module, "CHUNK", chunk)
        histogram, halves = inspect_module._histogram_and_halves(label)
        assert histogram == _unique(label) == inspect_module._histogram(label)
    for axis, n in enumerate(shape):
        first, second = (_unique(np.take(label, range(*r), axis)) for r in ((0, n // 2), (n - n // 2, n)))
        assert halves[axis] == (first, second)
