"""Volume datasets derived at test time from the embedded real NIfTI samples (tests/samples.py), and checkpoints
for volume tests.

- `thick_volume`: a hippocampus case with every 3rd axial slice kept, on a 1 x 1 x 3 mm grid (as a clinical scan
  with thick slices): real voxels and labels, an anisotropic grid whose coarse axis is the last one.
- `thick_regions`: those cases, cut in-plane to 32 x 32 around the hippocampus (slices that need no padding to
  the network's stride), as an nnU-Net v2 dataset of nested regions: whole = {1, 2} (anterior and posterior),
  core = {2} (posterior), regions_class_order [1, 2].
- `region_run`: one `segkit train` run (sigmoid) on `thick_regions` per session, for every module that needs a
  checkpoint written by training; `content_copy` gives such a checkpoint weights whose masks follow the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import TINY, follow_content, run_cli
from samples import HIPPO, HIPPO_CASES, hippo_volume

THICK = 3
"""Slices kept along the last axis: 1 mm -> 3 mm."""
CROP = np.s_[1:33, 10:42]
"""The in-plane 32 x 32 window of `thick_regions` (most of the hippocampus of every case)."""
REGIONS = {"whole": (1, 2), "core": (2,)}
REGION_CASES = HIPPO_CASES[:3]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_json(path: Path, spec: dict) -> None:
    path.write_text(json.dumps(spec, indent=1, sort_keys=False))  # key order matters for regions


def thick_volume(case: str, step: int = THICK,
                 crop: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image in its stored dtype, uint8 labels, affine) of a hippocampus case, every `step`-th slice along the
    last axis (slice k is the original slice step * k; the voxel's last axis `step` times longer), optionally
    cut in-plane to `crop` (the first voxel of the crop keeps its place in the scanner)."""
    image, labels = hippo_volume(case)
    affine = nib.load(HIPPO / "imagesTr" / f"{case}_0000.nii.gz").affine.copy()
    affine[:3, 2] *= step
    if crop is not None:
        affine[:3, 3] += affine[:3, :2] @ [crop[0].start, crop[1].start]
        image, labels = image[crop], labels[crop]
    return (np.ascontiguousarray(image[:, :, ::step]), np.ascontiguousarray(labels[:, :, ::step]), affine)


def thick_regions(root: Path, cases: tuple[str, ...] = REGION_CASES) -> Path:
    """An nnU-Net v2 dataset of `thick_volume` cases cut to CROP, with nested regions (whole = {1, 2},
    core = {2}). Returns ROOT."""
    for case in cases:
        image, labels, affine = thick_volume(case, crop=CROP)
        save_nifti(image, affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        save_nifti(labels, affine, root / "labelsTr" / f"{case}.nii.gz")
    write_json(root / "dataset.json", {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, **{name: list(values) for name, values in REGIONS.items()}},
        "regions_class_order": [1, 2],
        "numTraining": len(cases), "file_ending": ".nii.gz",
    })
    return root


_RUNS: dict[str, Path] = {}


def region_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN (RUN/data: the `thick_regions` dataset, RUN/run: `segkit train` output, sigmoid, 1 epoch of TINY
    steps): trained once per test session, whichever module asks first. Read-only for the tests."""
    if "regions" not in _RUNS:
        base = tmp_path_factory.mktemp("region_run")
        root = thick_regions(base / "data")
        config = base / "sigmoid.yaml"
        config.write_text(f"data:\n  root: {root}\nmodel:\n  head: sigmoid\n")
        result = run_cli("train", config, "--out", base / "run", "--epochs", "1", *TINY,
                         "--set", "train.steps_per_epoch=1")
        assert result.code == 0, result.err
        _RUNS["regions"] = base
    return _RUNS["regions"]


def body(image: np.ndarray, axis: int = 2) -> np.ndarray:
    """The body of a one-channel case, by hand: its nonzero voxels with the holes of each slice along `axis`
    filled (scipy's binary_fill_holes, slice by slice), without NaN or infinite voxels."""
    nonzero = np.moveaxis(image != 0, axis, 0)
    filled = np.moveaxis(np.stack([ndimage.binary_fill_holes(plane) for plane in nonzero]), 0, axis)
    return filled & np.isfinite(image)


def zscore(image: np.ndarray, axis: int = 2) -> np.ndarray:
    """nnU-Net's z-score of a one-channel case sliced along `axis`, by hand: mean/std over the body (`body`),
    0 outside it; a NaN or infinite voxel is no-data (0, and left out of the mean and std)."""
    raw = image.astype(np.float64)
    inside = body(image, axis)
    return np.where(inside, (raw - raw[inside].mean()) / raw[inside].std(), 0.0)


def region_content(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`content_copy` of the `region_run` checkpoint, its batch-norm statistics and logit scale taken from the
    32 x 32 axial slices of the dataset's three cases (z-scored by hand); made once per session."""
    if "content" not in _RUNS:
        base = region_run(tmp_path_factory)
        slices = [np.moveaxis(zscore(thick_volume(case, crop=CROP)[0]), 2, 0) for case in REGION_CASES]
        x = np.concatenate(slices)[:, None].astype(np.float32)
        _RUNS["content"] = content_copy(base / "run" / "best", base / "content", x)
    return _RUNS["content"]


def content_copy(checkpoint: Path, out: Path, slices: np.ndarray) -> Path:
    """A copy of a checkpoint (same model.json) whose masks follow the image: batch-norm statistics taken from
    `slices` ((N, C, H, W) float32 network inputs of the size it will predict, multiples of 32), then each
    output's logits scaled to mean 0, std 3 on them, as conftest's content_checkpoints (a briefly trained
    network predicts one class almost everywhere)."""
    from segkit.model import load_checkpoint, save_checkpoint

    model, _, meta = load_checkpoint(checkpoint)
    x = torch.from_numpy(slices)
    follow_content(model, x)
    out.mkdir(parents=True)
    save_checkpoint(out, model, meta)
    return out


def network_input(data, head, record) -> np.ndarray:
    """(h, w, C) float32: what training feeds the network for a whole record (no augmentation), through the
    library's own wiring: the record's raw pixels (cached or read), its parameters and body mask, the device
    normalisation (`to_network`)."""
    from torch.utils.data import default_collate

    from segkit.data.dataset import SegmentationDataset, to_network
    from segkit.data.transforms import eval_transform

    dataset = SegmentationDataset([record], data.reader, head, eval_transform(), data.norm)
    x, _ = to_network(default_collate([dataset[0]]), data.norm, head, torch.device("cpu"))
    return x[0].permute(1, 2, 0).numpy()


def prediction_inputs(data, head, volume) -> np.ndarray:
    """(n, h, w, C) float32: what prediction feeds the network for a case's slices (`predict.slice_sources`
    through `Segmenter.to_input`), for a model trained on `data`."""
    from segkit.infer import Segmenter
    from segkit.model import checkpoint_meta
    from segkit.predict import slice_sources

    meta = checkpoint_meta(head, "Unet", "none", len(data.meta["volume"]["channel_names"]), data.norm,
                           data={"mask": "volume", **data.meta})
    seg = Segmenter(torch.nn.Identity(), head, meta)
    from segkit.data.volume_spec import VolumeSpec

    spec = VolumeSpec.from_meta(meta)
    return np.concatenate([seg.to_input(batch).permute(0, 2, 3, 1).numpy()
                           for _, batch in slice_sources(seg, spec, volume, 8)])
