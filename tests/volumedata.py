"""Volume datasets built from real data for tests: ISBI 2012 EM sections stacked into anisotropic NIfTI volumes
(4 x 4 nm pixels, 50 nm between sections, in µm), as nnU-Net region datasets or in segkit's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from conftest import DATASETS

ISBI = DATASETS / "isbi2012-membrane"
EM_AFFINE = np.diag([0.004, 0.004, 0.05, 1.0])


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_json(path: Path, spec: dict) -> None:
    path.write_text(json.dumps(spec, indent=1, sort_keys=False))  # key order matters for regions


def membrane_volume(first: int, depth: int = 6, shape: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """An h x w x depth crop of consecutive real EM sections: the image, and labels 1 = membrane (mask 0),
    2 = a 2-pixel ring around it (in-plane dilation), 0 = the rest of the cell interiors."""
    images, labels = [], []
    crop = np.s_[200:200 + shape[0], 240:240 + shape[1]]
    for z in range(first, first + depth):
        image = np.array(Image.open(ISBI / "images" / f"{z}.png"))[crop]
        membrane = np.array(Image.open(ISBI / "masks" / f"{z}.png"))[crop] == 0
        ring = ndimage.binary_dilation(membrane, iterations=2) & ~membrane
        images.append(image)
        labels.append(np.where(membrane, 1, np.where(ring, 2, 0)).astype(np.uint8))
    return np.stack(images, axis=-1), np.stack(labels, axis=-1)


def membrane_regions(root: Path, cases: tuple[tuple[str, int], ...] | None = None, depth: int = 6,
                     shape: tuple[int, int] = (64, 64)) -> Path:
    """An nnU-Net v2 dataset with nested regions: whole = {1, 2} (membrane and its ring), core = {1};
    by default two cases of `depth` consecutive sections."""
    cases = cases or (("em_a", 0), ("em_b", depth))
    for name, first in cases:
        image, label = membrane_volume(first, depth, shape)
        save_nifti(image, EM_AFFINE, root / "imagesTr" / f"{name}_0000.nii.gz")
        save_nifti(label, EM_AFFINE, root / "labelsTr" / f"{name}.nii.gz")
    write_json(root / "dataset.json", {
        "channel_names": {"0": "EM"},
        "labels": {"background": 0, "whole": [1, 2], "core": [1]},
        "regions_class_order": [2, 1],
        "numTraining": len(cases), "file_ending": ".nii.gz",
    })
    return root
