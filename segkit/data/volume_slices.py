"""A volume dataset as 2-D training samples: every slice along the slice axis is a `Record`, so the 2-D path
(crops, augmentation, foreground oversampling, device normalisation, validation, checkpoints) trains on it
unchanged.

A slice is the case's volume (on its closest RAS axes, `Volume`) indexed at k along the slice axis, the two
remaining axes in order as (height, width); prediction cuts volumes the same way. Slices stay in their raw
type (int16 stays int16); each carries its case's `per_case` normalisation parameters (`case_params`,
computed over the whole case) and its body mask, and the device normalises them as it does images. Cases are
kept in memory while they fit the cache budget (`data.cache_mb`); the rest are read slice by slice from the
files (cheap for uncompressed .nii, which nibabel memory-maps; a .nii.gz is decompressed up to the slice).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from segkit.config import DataConfig
from segkit.data.dataset import Cached, Pixels, Record, foreground_points, label_stats, pack
from segkit.data.io import no_data
from segkit.data.layout import Sample
from segkit.data.readers import Window
from segkit.data.resample import resize_labels, resize_slices
from segkit.data.normalize import Normalization, body, case_params, fit_per_case, foreground_sample, schemes_for
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume, VolumeCase, VolumeDataset, case_split, read_slice, slice_axis
from segkit.errors import DataError
from segkit.heads import Head

log = logging.getLogger("segkit")


@dataclass(frozen=True)
class SliceSample(Sample):
    """One slice of a case: `image` is the case's first image file, `mask` its label file."""

    case: str = ""
    index: int = 0

    @property
    def scored_in(self) -> str | None:
        return self.case


def volume_dataset(d: DataConfig) -> VolumeDataset:
    """The volume dataset a (resolved) data config describes."""
    return VolumeDataset.from_root(d.root, d.classes, d.ignore_index)


def train_val_cases(ds: VolumeDataset, val_fraction: float, seed: int) -> tuple[list[VolumeCase], list[VolumeCase]]:
    """The segkit layout's val/ split when there is one, else a seeded share of the training cases (by case)."""
    if "val" in ds.splits:
        return ds.cases("train"), ds.cases("val")
    return case_split(ds.cases("train"), val_fraction, seed)


def dataset_slice_axis(volumes: Sequence[Volume], setting: int | str) -> int:
    """`data.slice_axis`, or for `auto` the coarsest axis of the median spacing (nnU-Net's 2-D rule), one axis
    for the whole dataset: the model learns one orientation."""
    if setting != "auto":
        return int(setting)
    spacing = np.median([v.spacing for v in volumes], axis=0)
    shape = np.median([v.shape for v in volumes], axis=0)
    return slice_axis(spacing.tolist(), shape.tolist())


def fit_spec(ds: VolumeDataset, cases: Sequence[VolumeCase], d: DataConfig, seed: int
             ) -> tuple[VolumeSpec, Normalization]:
    """Slice axis and per-channel (`per_case`) normalisation from the training cases."""
    volumes = [ds.image(case) for case in cases]
    axis = dataset_slice_axis(volumes, d.slice_axis)
    schemes = schemes_for(d.normalize, ds.channel_names)

    def sample(i: int, case: VolumeCase):
        def read() -> np.ndarray:
            label = ds.label_volume(case)
            foreground = (label > 0) & (label != ds.ignore_label if ds.ignore_label is not None else True)
            return foreground_sample(ds.image(case).data, foreground, np.random.default_rng([seed, i]))
        return read

    norm = fit_per_case(schemes, [sample(i, case) for i, case in enumerate(cases)])
    spacing = tuple(float(s) for s in np.median([v.spacing for v in volumes], axis=0))
    spec = VolumeSpec(ds.layout, tuple(ds.channel_names), axis, dict(ds.class_values), ds.regions_class_order,
                      ds.ignore_label, spacing=spacing).with_target(d.target_spacing)
    if spec.target_spacing is not None:
        moved = [v.case for v in volumes if spec.slice_size(v.shape, v.spacing) is not None]
        log.info("in-plane target spacing %s mm (data.target_spacing: %s): %d of %d training cases resampled%s",
                 " x ".join(f"{t:.3g}" for t in spec.target_spacing), d.target_spacing, len(moved), len(volumes),
                 f" ({', '.join(moved[:5])}{', ...' if len(moved) > 5 else ''})" if moved else "")
    return spec, norm


class SliceReader:
    """Reads slices of cases that are not cached: one raw slice from the files, with its body mask (the
    `PairReader.read` of volumes)."""

    def __init__(self, ds: VolumeDataset, spec: VolumeSpec, norm: Normalization) -> None:
        self.ds, self.spec, self.norm = ds, spec, norm
        self.cases: dict[str, VolumeCase] = {}
        self.ornt: dict[str, np.ndarray] = {}
        self.size: dict[str, tuple[int, int] | None] = {}

    def add(self, case: VolumeCase, ornt: np.ndarray, size: tuple[int, int] | None) -> None:
        """A case whose slices this reads; `size`: its in-plane resampled size (None: its own grid)."""
        self.cases[case.name], self.ornt[case.name], self.size[case.name] = case, ornt, size

    def read(self, sample: SliceSample, window: Window | None = None) -> Pixels:
        case = self.cases[sample.case]
        ornt, axis = self.ornt[sample.case], self.spec.slice_axis
        parts = [read_slice(p, sample.index, axis, ornt) for p in case.images]
        image, label = _resampled(parts[0] if parts[0].ndim == 3 else np.stack(parts, axis=-1),
                                  read_slice(case.label, sample.index, axis, ornt), self.size[sample.case])
        labels, valid = self.ds.layers(label)
        real, inside = _real(image), _inside(self.norm, image)
        if window is not None:
            t, l, h, w = window
            image, labels, valid, real, inside = (a if a is None else a[t:t + h, l:l + w]
                                                  for a in (image, labels, valid, real, inside))
        return Pixels(image, labels, valid & real, real, inside=inside)


def _resampled(image: np.ndarray, label: np.ndarray, size: tuple[int, int] | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(..., h, w, C) raw image and (..., h, w) label map of slices, resampled in-plane to `size` (a single
    slice or a stack)."""
    if size is None:
        return image, label
    one = image.ndim == 3
    image, label = (image[None], label[None]) if one else (image, label)
    image, label = resize_slices(image, size), resize_labels(label, size)
    return (image[0], label[0]) if one else (image, label)


def _inside(norm: Normalization, image: np.ndarray) -> np.ndarray | None:
    """The body of slices (..., h, w, C) when the normalisation zeroes what lies outside it, else None."""
    return body(image) if any(norm.body_only) else None


def _real(raw: np.ndarray) -> np.ndarray:
    """(...) bool: voxels of (..., C) raw channels that are not no-data (NaN or infinite, `io.no_data`)."""
    hit = no_data(raw, None)
    return np.ones(raw.shape[:-1], bool) if hit is None else ~hit


def case_records(ds: VolumeDataset, case: VolumeCase, spec: VolumeSpec, head: Head, reader: SliceReader,
                 cache: bool, foreground: Sequence[int]) -> list[Record] | str:
    """The checked slice records of one case (cached when `cache`), or the problem with it."""
    try:
        volume = ds.image(case)
        label = ds.label_volume(case)
        ds.check_labels(case, label)
    except DataError as err:
        return str(err)
    axis = spec.slice_axis
    stack = np.moveaxis(volume.data, axis, 0)  # the case as its slices (a view)
    params = case_params(reader.norm, stack)  # on the case's own voxels, as prediction computes them
    size = spec.slice_size(volume.shape, volume.spacing)
    reader.add(case, volume.ornt, size)
    stack, label = _resampled(stack, np.moveaxis(label, axis, 0), size)
    inside = _inside(reader.norm, stack) if cache else None  # (n, h, w), slices first
    layers, valid = ds.layers(label)
    real = _real(stack)
    valid &= real
    if not real.all():
        log.warning("case %s: %d voxels are NaN or infinite in %s: no-data, left out of the normalisation, the "
                    "loss and the scores", case.name, int((~real).sum()), [str(p) for p in case.images])
    records = []
    for k in range(stack.shape[0]):
        labels, ok, slice_real = layers[k], valid[k], real[k]
        problem = head.label_problem(labels, ok)
        if problem:
            return f"case {case.name}, slice {k} along axis {axis} ({case.label}): {problem}"
        h, w = ok.shape
        sample = SliceSample(f"{case.name}#{k}", case.images[0], case.label, case.name, k)
        record = Record(sample, label_stats(labels, ok), h, w, stack.dtype, h * w * stack.itemsize * stack.shape[-1],
                        params, points=foreground_points(labels, ok, foreground,
                                                         np.random.default_rng([zlib.crc32(case.name.encode()), k])))
        if cache:
            px = Pixels(np.ascontiguousarray(stack[k]), labels, ok, slice_real,
                        inside=None if inside is None else inside[k])
            record.cached = Cached(px.image, pack(px), None)
        records.append(record)
    return records


def _cached_bytes(volume: Volume, spec: VolumeSpec, bits: int) -> int:
    """Memory a case takes cached: its slices (float32 once resampled) and their packed labels."""
    size = spec.slice_size(volume.shape, volume.spacing)
    if size is None:
        return int(np.prod(volume.shape)) * (len(spec.channel_names) * volume.itemsize + bits)
    voxels = volume.shape[spec.slice_axis] * size[0] * size[1]
    return voxels * (len(spec.channel_names) * 4 + bits)


def slice_records(ds: VolumeDataset, cases: Sequence[VolumeCase], spec: VolumeSpec, head: Head, reader: SliceReader,
                  foreground: Sequence[int], budget: int, threads: int = 2) -> list[Record]:
    """Records of every slice of `cases`, cases cached whole in order while they fit `budget` bytes. All
    problems are reported together, each naming its case."""
    bits = (len(head.classes) + 10) // 8  # packed label layers + 'valid', 'real', 'inside' (dataset.pack)
    need = [_cached_bytes(ds.image(case), spec, bits) for case in cases]
    cached = np.cumsum(need) <= budget
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda i: case_records(ds, cases[i], spec, head, reader, bool(cached[i]), foreground),
                                range(len(cases))))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(cases)} cases cannot be used:\n  " + "\n  ".join(errors[:10]) + more)
    if not cached.all():
        log.info("%d of %d cases cached in memory; the other slices are read from their files (data.cache_mb; "
                 "uncompressed .nii reads fastest)", int(cached.sum()), len(cases))
    return [r for records in results for r in records]
