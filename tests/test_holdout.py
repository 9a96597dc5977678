"""The benchmark's held-out view: each image (or case) lands in exactly one of train and test, its masks with it,
and segkit reads the view as a dataset whose test split is labelled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.holdout import held_out
from segkit.config import DataConfig
from segkit.data.layout import find_pairs
from segkit.data.volumes import VolumeDataset
from tests.samples import (HIPPO_CASES, HIPPO_CLASSES, NUCLEI, hippo_multilabel, hippo_regions, hippo_slices,
                           msd_hippocampus)

CASES = HIPPO_CASES[:5]


def _stems(pairs) -> set[str]:
    return {s.stem for s in pairs.samples}


def test_flat_multilabel_split_keeps_masks_with_their_images(tmp_path: Path) -> None:
    root = hippo_multilabel(tmp_path / "src", cases=CASES, every=8)
    data = DataConfig(root=root, classes=["hippocampus", "posterior"], mask="multilabel")
    everything = find_pairs(root, "all", data.classes, multilabel=True).samples
    view, n = held_out(root, data, tmp_path / "view")
    train = find_pairs(view, "train", data.classes, multilabel=True)
    test = find_pairs(view, "test", data.classes, multilabel=True)
    assert n == len(test.samples) == round(0.2 * len(everything))
    assert _stems(train) | _stems(test) == {s.stem for s in everything}
    assert not _stems(train) & _stems(test)
    assert not train.unlabeled + test.unlabeled + train.orphan_masks + test.orphan_masks
    for s in train.samples + test.samples:  # each mask is the source's file of the same stem and class
        assert {c: p.resolve() for c, p in s.mask.items()} == {c: (root / "masks" / c / f"{s.stem}.png").resolve()
                                                               for c in data.classes}
    assert held_out(root, data, tmp_path / "view")[1] == n  # remade in place, the same draw


def test_a_val_split_is_held_out_and_a_test_split_used_as_it_is(tmp_path: Path) -> None:
    root = hippo_slices(tmp_path / "src", "train", CASES[:3], every=8)
    hippo_slices(root, "val", CASES[3:], every=8)
    data = DataConfig(root=root, classes=HIPPO_CLASSES, mask="index")
    view, n = held_out(root, data, tmp_path / "view")
    assert _stems(find_pairs(view, "test")) == _stems(find_pairs(root, "val"))
    assert _stems(find_pairs(view, "train")) == _stems(find_pairs(root, "train"))
    assert not (view / "val").exists()  # training draws its validation share from train, as both runs do
    nuclei = DataConfig(root=NUCLEI, classes=["nucleus"], mask="binary")
    assert held_out(NUCLEI, nuclei, tmp_path / "unused") == (NUCLEI, len(find_pairs(NUCLEI, "test").samples))
    assert not (tmp_path / "unused").exists()


def test_nnunet_cases_are_held_out_with_their_labels(tmp_path: Path) -> None:
    root = hippo_regions(tmp_path / "src", CASES)
    view, n = held_out(root, DataConfig(root=root), tmp_path / "view")
    ds = VolumeDataset.from_root(view)
    train, test = ds.cases("train"), ds.cases("test")
    assert n == len(test) == 1 and len(train) == len(CASES) - 1
    assert {c.name for c in train} | {c.name for c in test} == set(CASES)
    assert all(c.label is not None and c.label.resolve() == (root / "labelsTr" / f"{c.name}.nii.gz").resolve()
               for c in train + test)
    assert ds.classes == VolumeDataset.from_root(root).classes
    assert json.loads((view / "dataset.json").read_text())["numTraining"] == len(train)


def test_other_volume_layouts_are_refused(tmp_path: Path) -> None:
    root = msd_hippocampus(tmp_path / "msd")  # its test case has no label, so cases would have to move
    with pytest.raises(SystemExit, match="nnU-Net v2 layout only"):
        held_out(root, DataConfig(root=root), tmp_path / "view")
