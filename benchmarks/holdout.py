"""A held-out view of a dataset, so a benchmark scores a run on images (or cases) it neither trained on nor chose
its best/ checkpoint with: its own labelled test split where it has one, else its val/ split, else a seeded
share. The view is a tree of symbolic links in the benchmark's output folder: the user's data is never moved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from segkit.config import DataConfig
from segkit.data.layout import Sample, find_pairs, seeded_split, split_dirs
from segkit.data.volumes import VolumeCase, VolumeDataset, case_split, is_volume_root

HOLDOUT_SEED = 7
"""Not training's split seed (0): the held-out share is drawn apart from the validation share."""


def held_out(root: Path, data: DataConfig, out: Path, fraction: float = 0.2) -> tuple[Path, int]:
    """(the root to train on, the number of held-out images or cases); the held-out ones are its `test` split,
    labelled, which `segkit evaluate --split test` scores. `data` says how the masks are read."""
    if is_volume_root(root):
        return _volume_view(root, out, fraction)
    return _image_view(root, data, out, fraction)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), target)


def _samples(root: Path, data: DataConfig, split: str) -> list[Sample]:
    multilabel = data.mask == "multilabel"
    return find_pairs(root, split, data.classes if multilabel else None, multilabel, data.bands).samples


def _image_view(root: Path, data: DataConfig, out: Path, fraction: float) -> tuple[Path, int]:
    dirs = split_dirs(root)
    if "test" in dirs and (test := _samples(root, data, "test")):
        return root, len(test)
    source = "train" if "train" in dirs else "all"
    train = _samples(root, data, source)
    if "val" in dirs:
        test, test_masks = _samples(root, data, "val"), dirs["val"][1]
    else:
        (train, test), test_masks = seeded_split(train, fraction, HOLDOUT_SEED), dirs[source][1]
    shutil.rmtree(out, ignore_errors=True)
    for split, samples, masks_dir in (("train", train, dirs[source][1]), ("test", test, test_masks)):
        for s in samples:
            _link(s.image, out / split / "images" / s.image.name)
            for m in s.mask.values() if isinstance(s.mask, dict) else [s.mask]:
                _link(m, out / split / "masks" / m.relative_to(masks_dir))
    return out, len(test)


def _volume_view(root: Path, out: Path, fraction: float) -> tuple[Path, int]:
    ds = VolumeDataset.from_root(root)
    test = [c for c in ds.splits.get("test", []) if c.label is not None]
    if test:
        return root, len(test)
    if ds.layout != "nnunet":
        raise SystemExit(f"{root}: a held-out view is made for the nnU-Net v2 layout only (this is {ds.layout}). "
                         "Fix: give the dataset labelled test cases, or convert it to nnU-Net v2.")
    train, test = case_split(ds.cases("train"), fraction, HOLDOUT_SEED)
    shutil.rmtree(out, ignore_errors=True)
    for images, labels, cases in (("imagesTr", "labelsTr", train), ("imagesTs", "labelsTs", test)):
        for case in cases:
            _case(case, out / images, out / labels)
    spec = json.loads((root / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(spec | {"numTraining": len(train)}, indent=2))
    return out, len(test)


def _case(case: VolumeCase, images: Path, labels: Path) -> None:
    for image in case.images:
        _link(image, images / image.name)
    assert case.label is not None
    _link(case.label, labels / case.label.name)
