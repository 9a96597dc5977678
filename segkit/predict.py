"""`segkit predict` as one library call: a folder of the user's files to masks on disk, by what the model was
trained on: a model trained on volume slices predicts volume cases (`predict_volume_folder`), any other model
images and rasters (`Segmenter.predict_folder`). The same summary comes back either way.

A volume case is normalised with parameters of the whole volume (`normalize.case_params`, as training
computes them), cut into slices along the model's slice axis, predicted `batch_size` slices per
forward pass by the Segmenter and put back at the input's exact shape. Working memory is the raw volume, the
outputs and one batch of normalised slices with its activations: the volume is never converted to float as a
whole.

Volume outputs lie on the input's grid, in its format (`writers.write_volume`: NIfTI with its header copied,
so its affine, qform/sform and their codes; NRRD and MetaImage with its spacing, origin and direction; DICOM
in gives NIfTI out), so they overlay the image in a viewer (3D Slicer, ITK-SNAP). With .nii.gz for the ending:
  softmax  OUT/<case>.nii.gz: label values (each class writes its first dataset label value), uint8/uint16
  sigmoid  OUT/<class>/<case>.nii.gz: 0/1 uint8 per class; region models (nnU-Net `regions_class_order`) also
           OUT/<case>.nii.gz, the regions painted into one label map by nnU-Net's rule
  probs    OUT/<case>_probs.nii.gz: (X, Y, Z, K) probabilities, one volume per class along the 4th axis.
           Float16 probabilities are stored as float32 (same values): NIfTI-1 has no 16-bit float type."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segkit import distributed as dist
from segkit.data.io import no_data
from segkit.data.normalize import body, case_params
from segkit.data.readers.volume import VOLUME_ENDINGS, output_ending
from segkit.data.resample import resize_logits, resize_slices
from segkit.data.source import ImageSource
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume, VolumeCase, combine_regions, folder_cases, is_volume_folder
from segkit.data.writers import check_output_folder, misfit_message, refuse_existing, write_volume
from segkit.errors import DataError, SegkitError, UnreadableError
from segkit.infer import FolderSummary, Prediction, Segmenter, wait_written

log = logging.getLogger("segkit")


def predict_files(seg: Segmenter, input_dir: str | Path, output_dir: str | Path, probs: bool = False,
                  overwrite: bool = False, workers: int = 2, progress: bool = False, vectorize: bool = False
                  ) -> FolderSummary:
    """Masks (and with `probs` probabilities) of every input under `input_dir`, written under `output_dir`;
    inputs that fail are in the summary's `failed`, the others written."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if VolumeSpec.from_meta(seg.meta) is not None:
        if vectorize:
            raise SegkitError("--vectorize: polygons are for georeferenced 2-D rasters; this checkpoint predicts "
                              "NIfTI volumes. Fix: leave out --vectorize.")
        return predict_volume_folder(seg, input_dir, output_dir, probs=probs, overwrite=overwrite,
                                     progress=progress, workers=workers)
    if is_volume_folder(input_dir):
        raise SegkitError(f"{input_dir}: NIfTI volumes, but this checkpoint was trained on 2-D images (its "
                          "model.json has no data.volume). Fix: train on the volume dataset (data.root: its folder "
                          "with dataset.json) and predict with that checkpoint.")
    return seg.predict_folder(input_dir, output_dir, probs=probs, overwrite=overwrite, workers=workers,
                              progress=progress, vectorize=vectorize)

@dataclass
class VolumePrediction:
    """One case's result on its voxel grid (X, Y, Z).

    labels: softmax -> label values; sigmoid region models -> the regions combined by `regions_class_order`;
            otherwise None.
    masks: sigmoid -> (K, X, Y, Z) bool, one per class; softmax -> None.
    probs: (K, X, Y, Z) probabilities when asked for (float16 unless asked otherwise).
    nodata: (X, Y, Z) bool voxels with a NaN or infinite channel (background in every output, 0 in probs,
            left out of scores), or None when there are none.
    """

    labels: np.ndarray | None
    masks: np.ndarray | None
    probs: np.ndarray | None = None
    nodata: np.ndarray | None = None


def volume_spec(seg: Segmenter) -> VolumeSpec:
    """The checkpoint's volume section; a SegkitError for a model trained on 2-D images."""
    spec = VolumeSpec.from_meta(seg.meta)
    if spec is None:
        raise SegkitError("this checkpoint was trained on 2-D images (its model.json has no data.volume), so it "
                          "cannot predict NIfTI volumes. Fix: train on the volume dataset (data.root: its folder) "
                          "and predict with that checkpoint.")
    if list(spec.class_values) != seg.classes:
        raise SegkitError(f"model.json: data.volume names the classes {list(spec.class_values)} but the head has "
                          f"{seg.classes}. Fix: use the model.json written with the checkpoint.")
    return spec


def check_channels(volume: Volume, spec: VolumeSpec) -> None:
    """A case must have the training channels: a missing or extra one would shift every channel's meaning."""
    if volume.channels != len(spec.channel_names):
        raise DataError(f"case {volume.case}: {volume.channels} channel(s) in {[str(p) for p in volume.paths]}, but "
                        f"the model was trained on {len(spec.channel_names)} ({list(spec.channel_names)}). Fix: give "
                        "the case the channels of the training data, in the same order"
                        + (" (<case>_0000, <case>_0001, ...)." if spec.channel_files else "."))


def label_dtype(values: Sequence[int]) -> np.dtype:
    """The smallest unsigned type that holds every label value (uint8 for up to 255)."""
    return np.dtype(np.min_scalar_type(max(int(v) for v in values)))


def slice_sources(seg: Segmenter, spec: VolumeSpec, volume: Volume, batch_size: int
                  ) -> Iterator[tuple[int, list[ImageSource]]]:
    """(index of the first slice, raw slices as sources) of a case, a batch at a time. Slice k is
    `np.take(data, k, slice_axis)`, as training cuts it, resampled in-plane to the model's target spacing where
    it has one; each carries the parameters of the whole case and its body mask, so the Segmenter normalises it
    on the device as training did."""
    stack = np.moveaxis(volume.data, spec.slice_axis, 0)  # the case as its slices (a view)
    params = case_params(seg.norm, stack) if seg.norm.mode == "per_case" else None
    zeroed = any(seg.norm.body_only)
    size = spec.slice_size(volume.shape, volume.spacing)
    for start in range(0, stack.shape[0], batch_size):
        raw = np.ascontiguousarray(stack[start:start + batch_size])
        raw = raw if size is None else resize_slices(raw, size)
        outside = ~body(raw) if zeroed else [None] * len(raw)
        yield start, [ImageSource.from_array(image, seg.in_channels, None, f"case {volume.case}, slice {start + i}",
                                             params=params, outside=out)
                      for i, (image, out) in enumerate(zip(raw, outside))]


def _predict_slices(seg: Segmenter, batch: list[ImageSource], probs: bool, size: tuple[int, int]
                    ) -> list[Prediction]:
    """One forward pass for slices that fit the tile; larger slices go through windows one by one. Slices
    resampled in-plane have their logits resampled back to the case's `size` (h, w) before decoding."""
    if (batch[0].height, batch[0].width) == size:
        if seg.fits(batch[0]):
            return seg.predict_batch(batch, probs)
        return [seg.predict(image, probs) for image in batch]
    logits = seg.forward(seg.to_input(batch)) if seg.fits(batch[0]) else torch.stack([seg.logits(i) for i in batch])
    return [seg.decode(one, probs) for one in resize_logits(logits.to(seg.device), size)]


def predict_volume(seg: Segmenter, volume: Volume, probs: bool = False, probs_dtype: type = np.float16
                   ) -> VolumePrediction:
    """Masks (and probabilities, float16 as written to files unless `probs_dtype` says otherwise) of one case
    at its own shape; see VolumePrediction."""
    spec = volume_spec(seg)
    check_channels(volume, spec)
    problem = spec.spacing_problem(volume.case, volume.spacing)
    if problem:
        log.warning(problem)
    head, axis, shape = seg.head, spec.slice_axis, volume.shape
    sigmoid = head.name == "sigmoid"
    masks = labels = prob = None
    if sigmoid:
        masks = np.empty((head.channels, *shape), bool)
        mask_stack = np.moveaxis(masks, axis + 1, 1)
    else:
        values = spec.index_values()
        labels = np.empty(shape, label_dtype(values))
        lut, label_stack = values.astype(labels.dtype), np.moveaxis(labels, axis, 0)
    if probs:
        prob = np.empty((head.channels, *shape), probs_dtype)
        prob_stack = np.moveaxis(prob, axis + 1, 1)
    plane = tuple(shape[a] for a in spec.plane)
    for start, batch in slice_sources(seg, spec, volume, seg.batch_size):
        for k, pred in enumerate(_predict_slices(seg, batch, probs, plane), start):
            if sigmoid:
                mask_stack[:, k] = pred.mask
            else:
                label_stack[k] = lut[pred.mask]
            if probs:
                prob_stack[:, k] = pred.probs
    hit = no_data(volume.data, None)
    if hit is not None and hit.any():
        log.warning("case %s: %d voxels are NaN or infinite: no-data, written as background (probabilities 0)",
                    volume.case, int(hit.sum()))
        if sigmoid:
            masks[:, hit] = False
        else:
            labels[hit] = lut[0]
        if probs:
            prob[:, hit] = 0
    else:
        hit = None
    if sigmoid and spec.regions_class_order is not None:
        labels = combine_regions(masks, spec.class_values, spec.regions_class_order)
    return VolumePrediction(labels, masks, prob, hit)


def output_files(seg: Segmenter, spec: VolumeSpec, case: VolumeCase, probs: bool) -> list[Path]:
    """The files (relative to OUT) one case writes, in the order `write_prediction` writes them, in the
    format of its input (`readers.volume.output_ending`)."""
    name, end = case.name, output_ending(case.images[0])
    if seg.head.name == "sigmoid":
        files = [Path(c) / (name + end) for c in seg.classes]
        if spec.regions_class_order is not None:
            files.append(Path(name + end))
    else:
        files = [Path(name + end)]
    return files + ([Path(f"{name}_probs{end}")] if probs else [])


def _arrays(pred: VolumePrediction) -> list[np.ndarray]:
    """The arrays of `output_files`, in its order: per-class 0/1 volumes, label map, (X, Y, Z, K) probs."""
    arrays = [mask.view(np.uint8) for mask in pred.masks] if pred.masks is not None else []
    if pred.labels is not None:
        arrays.append(pred.labels)
    if pred.probs is not None:
        arrays.append(np.moveaxis(pred.probs, 0, -1))
    return arrays


def write_prediction(volume: Volume, pred: VolumePrediction, files: Sequence[Path], output_dir: Path) -> None:
    """Each output of one case (`output_files`) on the case's grid."""
    arrays = _arrays(pred)
    if len(arrays) != len(files):
        raise ValueError(f"{len(arrays)} arrays for {len(files)} files")
    for array, rel in zip(arrays, files):
        write_volume(volume.to_file(array), volume.file, output_dir / rel)


@dataclass
class VolumeJob:
    """A case to predict, the files it will write, and why it cannot be read (reported when its turn comes)."""

    case: VolumeCase
    files: list[Path]
    unreadable: str | None = None


def _input_problem(input_dir: Path) -> str | None:
    if not input_dir.is_dir():
        return f"{input_dir}: input folder not found."
    if is_volume_folder(input_dir):
        return None
    hint = next((f" ({input_dir / d} holds them?)" for d in ("imagesTs", "imagesTr") if (input_dir / d).is_dir()), "")
    return (f"{input_dir}: no volumes ({', '.join(VOLUME_ENDINGS)}, or DICOM series folders), and this checkpoint was trained on volume "
            f"slices, so it predicts volumes. Fix: point to the folder of the cases' images{hint} (nnU-Net: "
            "imagesTs/ with <case>_0000.nii.gz ...), or use a checkpoint trained on 2-D images.")


def plan_volumes(seg: Segmenter, spec: VolumeSpec, input_dir: Path, output_dir: Path, probs: bool,
                 overwrite: bool) -> list[VolumeJob]:
    """The cases of `input_dir` and the files each will write, checked before anything is written: every case
    complete and fitting the model (from the headers), every output a distinct file inside `output_dir`, none
    an input, none existing unless `overwrite`."""
    problem = _input_problem(input_dir)
    if problem:
        raise DataError(problem)
    check_output_folder(input_dir, output_dir)
    out = output_dir.resolve()
    cases = folder_cases(input_dir, spec.channel_names, spec.channel_files)  # a missing channel file: refused here
    inputs = {p.resolve() for case in cases for p in case.images}
    jobs, misfits, owner = [], [], {}
    for case in cases:
        job = VolumeJob(case, output_files(seg, spec, case, probs))
        try:
            check_channels(Volume(case.name, case.images, spec.canonical), spec)
        except UnreadableError as err:  # reported and skipped in its turn, the other cases go on
            job.unreadable = str(err)
        except DataError as err:  # readable, but not a case of this model (channels, dimensions, grids)
            misfits.append(str(err))
        for rel in job.files:
            target = (output_dir / rel).resolve()
            if out not in target.parents or target in inputs:
                raise SegkitError(f"case {case.name}: its output {rel} would be written at {target}, "
                                  f"{'over an input' if target in inputs else f'outside {output_dir}'}. "
                                  "Fix: choose another output folder, or rename the case or class.")
            if rel in owner:
                raise SegkitError(f"cases {owner[rel]} and {case.name} would both write {output_dir / rel}. "
                                  "Fix: rename one of them.")
            owner[rel] = case.name
        jobs.append(job)
    if misfits:
        raise DataError(misfit_message(misfits, len(cases), "cases"))
    folders = {rel.parent for rel in owner if rel.parent != Path(".")}
    clash = sorted(str(rel) for rel in owner if rel in folders)
    if clash:
        raise SegkitError(f"{output_dir / clash[0]}: a case's file and a class folder would have the same name. "
                          "Fix: rename the case.")
    refuse_existing(output_dir, owner, overwrite)
    return jobs


def _read_ahead(jobs: Sequence[VolumeJob], canonical: bool, workers: int) -> Iterator[tuple[VolumeJob, Volume | str]]:
    """Each job with its case's voxels read, up to `workers` cases ahead in threads (file reads and zlib
    release the GIL, so a .nii.gz decompresses while the previous case is predicted); a case that cannot be
    read comes as its message. `workers` 0: each case is read in its turn."""
    def load(job: VolumeJob) -> Volume | str:
        if job.unreadable:
            return job.unreadable
        try:
            volume = Volume(job.case.name, job.case.images, canonical)
            _ = volume.data  # read here, in this thread
            return volume
        except DataError as err:
            return str(err)

    if workers <= 0:
        yield from ((job, load(job)) for job in jobs)
        return
    with ThreadPoolExecutor(workers) as pool:
        queue = iter(jobs)
        pending = deque((job, pool.submit(load, job)) for job in itertools.islice(queue, workers))
        while pending:
            job, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield job, future.result()


def _settle(written: tuple[str, Future, int] | None, summary: FolderSummary) -> None:
    """Wait for a case's files: its slices count once they are written; a refused write (disk full) is
    reported for that case, and the others go on (`wait_written`)."""
    if written is not None and wait_written(written[0], written[1], summary):
        summary.slices += written[2]


def predict_volume_folder(seg: Segmenter, input_dir: str | Path, output_dir: str | Path, probs: bool = False,
                          overwrite: bool = False, progress: bool = False, workers: int = 2) -> FolderSummary:
    """Masks of every case in `input_dir` (nnU-Net cases `<case>_0000.nii.gz, ...` grouped when the model was
    trained on such a dataset) written under `output_dir` (see the module docstring). A case whose files cannot
    be read is reported and skipped; the others are written. One thread writes a case's files while the next
    is predicted; on a GPU, `workers` threads also read the next cases meanwhile. On the CPU they would take
    cores from the network for little: reading is ~1 % of a case's time there (measured on 2 cores, 4 cases
    of 256 x 256 x 80: 56.6 s read in turn, 59.4-66.0 s read ahead by 2 threads). Under torchrun each rank
    takes a share of the cases."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    spec = volume_spec(seg)
    jobs = plan_volumes(seg, spec, input_dir, output_dir, probs, overwrite)
    dist.barrier()  # every rank has checked for existing outputs before any rank writes
    summary = FolderSummary(unit="volumes")
    began = time.perf_counter()
    mine = jobs[dist.rank()::dist.world_size()]
    with ThreadPoolExecutor(1) as writer:
        written: tuple[str, Future, int] | None = None  # one case's files in flight (case, job, slices)
        ahead = workers if seg.device.type == "cuda" else 0
        for job, volume in tqdm(_read_ahead(mine, spec.canonical, ahead), total=len(mine), desc="predict",
                                unit="volume", disable=not progress, dynamic_ncols=True):
            try:
                if isinstance(volume, str):
                    raise DataError(volume)
                pred = predict_volume(seg, volume, probs)
            except DataError as err:
                log.error("skipped %s", err)
                summary.failed.append((job.case.name, str(err)))
                continue
            _settle(written, summary)
            written = (job.case.name, writer.submit(write_prediction, volume, pred, job.files, output_dir),
                       volume.shape[spec.slice_axis])
            summary.images += 1
        _settle(written, summary)
    summary.seconds = time.perf_counter() - began
    if dist.active():
        volumes, slices, seconds = dist.all_reduce_sum([summary.images, summary.slices, summary.seconds], seg.device)
        summary.images, summary.slices, summary.seconds = int(volumes), int(slices), seconds / dist.world_size()
    return summary
