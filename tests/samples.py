"""The embedded test samples (tests/data, data/nuclei) and datasets derived from them at test time.

Every derived dataset comes from real pixels and real labels; how each one is made is stated here,
so a test can recompute what it expects from the same real files:

- `inverted_nuclei`: nuclei masks with the nucleus stored as 0 and background as 255 (the trap of
  ISBI 2012 and of many EM datasets: foreground written as 0).
- `hippo_slices`: axial slices of the MSD hippocampus volumes as a 2-D dataset of exclusive classes
  (background 0, anterior 1, posterior 2) with index masks; `ignore` marks, as PASCAL VOC does, a
  1-pixel ring on every boundary between two different labels with that value.
- `hippo_multilabel`: the same slices with overlapping labels, one binary mask folder per class:
  `hippocampus` (labels 1 or 2) and `posterior` (label 2), so every posterior pixel has two labels.
- `hippo_regions`: the hippocampus volumes as an nnU-Net v2 region dataset: whole = {1, 2}, core = {2}.
- `msd_hippocampus`: the hippocampus volumes in the Medical Segmentation Decathlon layout (dataset.json with
  `modality` and `training`), two channels in one 4-D file: the scan and twice the scan.

Slices are stored as 8-bit grey PNG: cases stored as uint8 keep their values; float32 cases are scaled
linearly from [0, case max] to [0, 255] and rounded (`grey8`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
NUCLEI = ROOT / "data" / "nuclei"
HIPPO = DATA / "nifti" / "msd-hippocampus"
CORD = DATA / "nifti" / "sct-spinalcord"
SPACENET = DATA / "spacenet"
HIPPO_CLASSES = ["background", "anterior", "posterior"]
HIPPO_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007",
               "hippocampus_033")


def hippo_volume(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(image in its stored dtype, uint8 labels) of one hippocampus case, voxel order as stored."""
    image = np.asanyarray(nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz").dataobj)
    labels = np.asanyarray(nib.load(HIPPO / "labelsTr" / f"{case}.nii.gz").dataobj).astype(np.uint8)
    return image, labels


def grey8(image: np.ndarray) -> np.ndarray:
    """uint8 as stored; any other dtype scaled linearly from [0, max] to [0, 255] and rounded."""
    if image.dtype == np.uint8:
        return image
    return np.rint(np.clip(image, 0, None) * (255.0 / float(image.max()))).astype(np.uint8)


def boundary_ring(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every boundary): VOC's 'void' ring."""
    up = np.zeros(labels.shape, bool)
    up[1:] |= labels[1:] != labels[:-1]
    up[:-1] |= labels[1:] != labels[:-1]
    up[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    up[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return up


def hippo_slice_arrays(cases: tuple[str, ...] = HIPPO_CASES, every: int = 1,
                       min_foreground: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"<case>_z<k>": (grey8 image, labels)} for slices along the last axis with at least
    `min_foreground` labelled pixels, every `every`-th of those."""
    out = {}
    for case in cases:
        image, labels = hippo_volume(case)
        image = grey8(image)
        keep = [z for z in range(labels.shape[2]) if (labels[:, :, z] > 0).sum() >= min_foreground][::every]
        for z in keep:
            out[f"{case}_z{z:02d}"] = (np.ascontiguousarray(image[:, :, z]), np.ascontiguousarray(labels[:, :, z]))
    return out


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def hippo_slices(dst: Path, split: str = "train", cases: tuple[str, ...] = HIPPO_CASES, every: int = 1,
                 ignore: int | None = None) -> Path:
    """DST/<split>/{images,masks}/<case>_z<k>.png: exclusive classes 0/1/2 as index masks; with `ignore`,
    the boundary ring is written as that value. Returns DST."""
    for stem, (image, labels) in hippo_slice_arrays(cases, every).items():
        mask = labels.copy()
        if ignore is not None:
            mask[boundary_ring(labels)] = ignore
        _save(image, dst / split / "images" / f"{stem}.png")
        _save(mask, dst / split / "masks" / f"{stem}.png")
    return dst


def hippo_multilabel(dst: Path, split: str | None = None, cases: tuple[str, ...] = HIPPO_CASES, every: int = 1,
                     image_ext: str = ".png") -> Path:
    """DST[/<split>]/images/<stem><ext> and masks/{hippocampus,posterior}/<stem>.png in {0, 255}:
    nested, overlapping labels. `image_ext` ".jpg" writes JPEG (quality 95) images. Returns DST."""
    base = dst / split if split else dst
    for stem, (image, labels) in hippo_slice_arrays(cases, every).items():
        if image_ext == ".jpg":
            (base / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).convert("RGB").save(base / "images" / f"{stem}.jpg", quality=95)
        else:
            _save(image, base / "images" / f"{stem}{image_ext}")
        _save(np.where(labels > 0, 255, 0).astype(np.uint8), base / "masks" / "hippocampus" / f"{stem}.png")
        _save(np.where(labels == 2, 255, 0).astype(np.uint8), base / "masks" / "posterior" / f"{stem}.png")
    return dst


def hippo_regions(root: Path, cases: tuple[str, ...] = HIPPO_CASES[:2]) -> Path:
    """An nnU-Net v2 dataset of real hippocampus cases with nested regions: whole = {1, 2}, core = {2}
    (core painted last). Files are copied unchanged. Returns ROOT."""
    for case in cases:
        for folder, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(HIPPO / folder / name, root / folder / name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "whole": [1, 2], "core": [2]},
        "regions_class_order": [1, 2],
        "numTraining": len(cases), "file_ending": ".nii.gz",
    }, indent=1))
    return root


def inverted_nuclei(dst: Path, stems: list[str], split: str = "train") -> Path:
    """DST/<split>/{images,masks}/<stem>.png from data/nuclei with each mask stored inverted
    (nucleus 0, background 255): read with `foreground_value: 0`. Returns DST."""
    for stem in stems:
        (dst / split / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(NUCLEI / split / "images" / f"{stem}.png", dst / split / "images" / f"{stem}.png")
        with Image.open(NUCLEI / split / "masks" / f"{stem}.png") as im:
            mask = np.asarray(im)
        _save((255 - mask).astype(np.uint8), dst / split / "masks" / f"{stem}.png")
    return dst



def msd_hippocampus(dst: Path, cases: tuple[str, ...] = HIPPO_CASES[:3], test: str = "hippocampus_033") -> Path:
    """DST/{imagesTr,labelsTr,imagesTs} and dataset.json in the MSD layout; each image a 4-D float32 file of
    the scan and twice the scan (the `test` case too). Returns DST."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dst / folder).mkdir(parents=True, exist_ok=True)
    for name, folder in [(c, "imagesTr") for c in cases] + [(test, "imagesTs")]:
        img = nib.load(HIPPO / "imagesTr" / f"{name}_0000.nii.gz")
        voxels = np.asanyarray(img.dataobj).astype(np.float32)
        nib.save(nib.Nifti1Image(np.stack([voxels, 2 * voxels], axis=-1), img.affine), dst / folder / f"{name}.nii.gz")
    for name in cases:
        shutil.copy(HIPPO / "labelsTr" / f"{name}.nii.gz", dst / "labelsTr" / f"{name}.nii.gz")
    (dst / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI", "1": "MRI x2"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(cases), "numTest": 1,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in cases],
        "test": [f"./imagesTs/{test}.nii.gz"]}, indent=1))
    return dst
