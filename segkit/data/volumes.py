"""3-D medical volumes (NIfTI, NRRD, MetaImage, DICOM series: `readers.volume`) as a segmentation dataset, for 2-D training on slices.

Accepted layouts (ROOT = data.root):
  nnU-Net v2 raw  ROOT/dataset.json (channel_names, labels, file_ending[, regions_class_order]),
                  ROOT/imagesTr/<case>_0000<file_ending> (one 3-D file per channel), ROOT/labelsTr/<case><file_ending>,
                  ROOT/imagesTs/ (+ ROOT/labelsTs/)
  MSD             ROOT/dataset.json (modality, labels, training[, test]); a multi-channel image is one 4-D file
  segkit          ROOT/{train,val,test}/{images,masks}/<case>.nii.gz (or another volume format); no dataset.json, so the classes
                  come from data.classes and a label value is its class index
With a dataset.json, classes, channels and the label encoding come from it. nnU-Net region labels
(name -> [values]) are nested and overlap, so they are sigmoid classes; plain labels (name -> value) are exclusive.
Training cases must have a label; test cases may lack one (prediction only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from segkit.data.masks import distinct
from segkit.data.layout import seeded_split
from segkit.data.readers.volume import VOLUME_ENDINGS, case_name, ending as volume_ending, is_volume, open_volume, voxels
from segkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from segkit.heads import Head

SEGKIT_SPLITS = ("train", "val", "test")
AFFINE_ATOL = 1e-3
"""mm: affines closer than this are the same grid (far below any voxel, above float32 header rounding)."""
SPACING_RTOL = 1e-3
"""Spacings within this relative tolerance tie in `slice_axis` (headers store float32: 7.499999 for 7.5)."""

Layout = Literal["nnunet", "msd", "segkit"]
MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}
"""NIfTI xyzt_units of the voxel size -> millimetres: spacing (and HD95) is always in mm."""


CANONICAL = axcodes2ornt(("R", "A", "S"))
"""Voxel axes point (closest to) right, anterior, superior: the orientation every volume is read in."""
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], float)


def to_canonical(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform (3, 2) from a file's voxel axes to the closest RAS axes: a
    permutation and flips, never a resampling."""
    return ornt_transform(io_orientation(affine), CANONICAL)


def reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """`array` with its first three (spatial) axes moved and flipped by `ornt`; later axes (channels,
    classes) follow. A view: nothing is copied."""
    return apply_orientation(array, ornt)


class Volume:
    """One case's image. The header, affine and shape are read at once; the voxels on first use of `data`,
    since volumes can be large. `data` is (X, Y, Z, C): nnU-Net's one file per channel (`_0000`, `_0001`, ...)
    stacked on the last axis, or a 4-D (MSD) file's 4th axis, or C = 1. `affine` is the first
    file's (`file`); every channel file is checked to share its grid. `spacing` is in mm whatever the header's unit.

    With `canonical` (every model trained since orientations are stored), `data`, `shape` and `spacing` are on
    the closest RAS axes, so axis 2 is the body's head-foot axis whatever order the file stores; `to_file`
    turns an array on those axes back into the file's own order for writing on its grid."""

    def __init__(self, case: str, paths: Sequence[Path], canonical: bool = True):
        self.case = case
        self.paths = [Path(p) for p in paths]
        self._images = [open_volume(p, case) for p in self.paths]
        first = self._images[0]
        allowed = (3,) if len(self._images) > 1 else (3, 4)
        for path, image in zip(self.paths, self._images):
            if image.ndim not in allowed:
                kind = "one 3-D file per channel" if len(self._images) > 1 else "a 3-D or 4-D (channels last) file"
                raise DataError(f"{path} (case {case}): {image.ndim}-D, shape {image.shape}; a volume is {kind}. "
                                "Fix: save each channel as its own 3-D file (<case>_0000, <case>_0001, ...).")
        for path, image in zip(self.paths[1:], self._images[1:]):
            if image.shape != first.shape or not np.allclose(image.affine, first.affine, rtol=0, atol=AFFINE_ATOL):
                raise DataError(
                    f"case {case}: channel files {self.paths[0]} (shape {first.shape}) and {path} "
                    f"(shape {image.shape}) lie on different grids (affines {first.affine.round(4).tolist()} vs "
                    f"{image.affine.round(4).tolist()}). Fix: resample every channel onto the grid of "
                    f"{self.paths[0].name}; nnU-Net requires it too.")
        self.file = first  # the first file, opened (`readers.volume.open_volume`): what outputs are written on
        self.affine: np.ndarray = np.array(first.affine, dtype=float)
        self.ornt = to_canonical(self.affine) if canonical else IDENTITY
        self._back = ornt_transform(CANONICAL, io_orientation(self.affine)) if canonical else IDENTITY
        unit = MM_PER_UNIT.get(first.header.get_xyzt_units()[0], 1.0)  # "unknown" is read as mm, as nnU-Net does
        zooms = [float(z) * unit for z in first.header.get_zooms()[:3]]
        order = np.argsort(self.ornt[:, 0])  # canonical axis a comes from file axis order[a]
        self.shape: tuple[int, int, int] = tuple(int(first.shape[f]) for f in order)
        self.spacing: tuple[float, float, float] = tuple(zooms[f] for f in order)
        self.channels = len(self._images) if first.ndim == 3 else int(first.shape[3])

    @property
    def itemsize(self) -> int:
        """Bytes per voxel and channel of `data`, from the header: the stored type's, or 8 when the header
        scales the values (nibabel then gives float64)."""
        slope, inter = self.file.header.get_slope_inter()
        return 8 if slope not in (None, 1.0) or inter not in (None, 0.0) else self.file.header.get_data_dtype().itemsize

    def to_file(self, array: np.ndarray) -> np.ndarray:
        """An array on this volume's (canonical) axes, spatial axes first, in the file's axis order."""
        return reorient(array, self._back)

    @cached_property
    def data(self) -> np.ndarray:
        """(X, Y, Z, C) voxels in their stored (scaled) type."""
        arrays = [voxels(image, path, self.case) for path, image in zip(self.paths, self._images)]
        if arrays[0].ndim == 4:
            stored = arrays[0]
        else:
            stored = arrays[0][..., None] if len(arrays) == 1 else np.stack(arrays, axis=-1)  # one channel: a view
        return reorient(stored, self.ornt)  # a view: axes moved and flipped, nothing copied


def read_slice(path: Path, index: int, axis: int, ornt: np.ndarray) -> np.ndarray:
    """Slice `index` along canonical `axis` of one file, reading only that slice from it (uncompressed .nii
    is memory-mapped; a .nii.gz is decompressed up to it): the same pixels as `np.take(Volume.data, ...)`."""
    proxy = open_volume(path, path.name).dataobj
    f = int(np.flatnonzero(ornt[:, 0] == axis)[0])  # the file axis that becomes `axis`
    k = proxy.shape[f] - 1 - index if ornt[f, 1] < 0 else index
    slicer = [slice(None)] * len(proxy.shape)
    slicer[f] = slice(k, k + 1)
    return np.take(reorient(np.asarray(proxy[tuple(slicer)]), ornt), 0, axis=axis)


@dataclass(frozen=True)
class VolumeCase:
    """A case: its image files (one per channel, or one 4-D file) and its label file (None: unlabelled)."""

    name: str
    images: list[Path]
    label: Path | None


class _Labels(NamedTuple):
    classes: list[str]
    regions: dict[str, tuple[int, ...]] | None
    order: tuple[int, ...] | None
    ignore: int | None
    values: frozenset[int]


@dataclass(frozen=True)
class VolumeDataset:
    """A dataset of volumes: its cases per split, and what its label files encode.

    `classes` are the network's output classes: the label names in value order for plain labels
    (softmax; value = class index), the region names in dataset.json order for region labels (sigmoid,
    `multilabel`). `class_values` gives each class the label values that make it (one for a plain label,
    several for a region). `label_values` are the values a label file may hold.
    """

    root: Path
    layout: Layout
    classes: list[str]
    channel_names: list[str]
    regions: dict[str, tuple[int, ...]] | None
    regions_class_order: tuple[int, ...] | None
    ignore_label: int | None
    label_values: frozenset[int]
    splits: dict[str, list[VolumeCase]]
    class_values: dict[str, tuple[int, ...]]
    canonical: bool = True  # read on RAS axes (False: file axes, for models trained before orientations)

    @property
    def multilabel(self) -> bool:
        return self.regions is not None

    def overlapping(self) -> list[tuple[str, str]]:
        """Pairs of classes that share label values (nested regions): a voxel can be both."""
        items = list(self.class_values.items())
        return [(a, b) for i, (a, va) in enumerate(items) for b, vb in items[i + 1:] if set(va) & set(vb)]

    def check_head(self, head: Head) -> None:
        """Classes that share label values (nested nnU-Net regions) need a head whose classes may overlap."""
        pairs = self.overlapping()
        if head.exclusive and pairs:
            shown = "; ".join(f"{a} {list(self.class_values[a])} and {b} {list(self.class_values[b])} share label "
                              "values" for a, b in pairs[:4])
            raise ConfigError(f"model.head: {head.name} gives each voxel one class, but the classes of {self.root} "
                              f"overlap: {shown}. Nested nnU-Net regions are sigmoid classes. Fix: model.head: "
                              "sigmoid (or data.classes listing classes that do not share label values).")

    def select(self, names: Sequence[str], where: str = "data.classes") -> VolumeDataset:
        """The dataset with its classes renamed (as many names, in order) or selected (a subset, in the given
        order). With plain labels, the class of value 0 (background) takes the values of the classes left
        out, so a softmax head still sees every voxel labelled; without it, those voxels are in no class."""
        names = list(names)
        if names == self.classes:
            return self
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: {names} repeats a name. Fix: give every class once.")
        if set(names) <= set(self.classes):
            values = {n: self.class_values[n] for n in names}
            left = sorted(v for n in self.classes if n not in values for v in self.class_values[n])
            background = next((n for n in names if self.class_values[n] == (0,)), None)
            if not self.multilabel and background is not None:
                values[background] = (0, *left)
            regions = {n: self.regions[n] for n in names} if self.regions is not None else None
            order = (tuple(self.regions_class_order[self.classes.index(n)] for n in names)
                     if self.regions_class_order is not None else None)
            return replace(self, classes=names, class_values=values, regions=regions, regions_class_order=order)
        if len(names) == len(self.classes):
            renamed = dict(zip(self.classes, names))
            regions = ({renamed[n]: v for n, v in self.regions.items()} if self.regions is not None else None)
            return replace(self, classes=names, regions=regions,
                           class_values={renamed[n]: v for n, v in self.class_values.items()})
        raise ConfigError(f"{where}: {names}, but the dataset's classes are {self.classes}. Fix: list a subset of "
                          f"them to select, {len(self.classes)} new names to rename, or remove {where}.")

    def layers(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A label map (...) -> (..., K) uint8 class layers (a voxel is in class k when its value is one of
        class k's values) and the (...) bool valid mask (False on the ignore label)."""
        layers = np.stack([np.isin(label, values) for values in self.class_values.values()], axis=-1)
        valid = label != self.ignore_label if self.ignore_label is not None else np.ones(label.shape, bool)
        return layers.view(np.uint8), valid

    @classmethod
    def from_root(cls, root: Path | str, classes: Sequence[str] | None = None,
                  ignore_index: int | None = None) -> VolumeDataset:
        """Recognise the layout of `root`. `classes` and `ignore_index` (data.classes, data.ignore_index)
        name the label values of the segkit layout; with a dataset.json they must agree with it or be None."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found. Fix: set data.root to a folder with dataset.json "
                            "(nnU-Net v2 or MSD) or train/images + train/masks.")
        meta = root / "dataset.json"
        if not meta.is_file():
            return _segkit(root, classes, ignore_index)
        spec = _read_json(meta)
        if "channel_names" in spec:
            dataset = _nnunet(root, meta, spec)
        elif "modality" in spec:
            dataset = _msd(root, meta, spec)
        else:
            raise DataError(f"{meta}: neither `channel_names` (nnU-Net v2) nor `modality` (MSD). "
                            "Fix: write an nnU-Net v2 dataset.json (channel_names, labels, file_ending).")
        if classes is not None:
            dataset = dataset.select(classes)
        if ignore_index is not None and ignore_index != dataset.ignore_label:
            raise ConfigError(f"data.ignore_index: {ignore_index}, but {meta} gives {dataset.ignore_label} "
                              "(labels.ignore). Fix: remove data.ignore_index, or set labels.ignore in dataset.json.")
        return dataset

    def cases(self, split: str) -> list[VolumeCase]:
        """Cases of `split`: train and test (nnU-Net: imagesTr, imagesTs), also val in the segkit layout."""
        if split not in self.splits:
            raise DataError(f"{self.root}: no '{split}' split (found {sorted(self.splits)}). Fix: add it "
                            "(nnU-Net: imagesTs/; segkit layout: ROOT/<split>/images), or hold back cases "
                            "with `case_split`.")
        return self.splits[split]

    def image(self, case: VolumeCase) -> Volume:
        """The case's image, checked to have the dataset's channels."""
        volume = Volume(case.name, case.images, self.canonical)
        if volume.channels != len(self.channel_names):
            raise DataError(f"case {case.name}: {volume.channels} channel(s) in {[str(p) for p in case.images]}, "
                            f"but the dataset has {len(self.channel_names)} ({self.channel_names}). "
                            "Fix: give every case the same channels, in the same order.")
        return volume

    def label_volume(self, case: VolumeCase) -> np.ndarray:
        """The case's label map (X, Y, Z), integer, checked to lie on the image's grid."""
        if case.label is None:
            raise DataError(f"case {case.name}: no label file. Fix: add one, or use the case for prediction only.")
        image = self.image(case)
        label = Volume(case.name, [case.label], self.canonical)
        if label.channels != 1:
            raise DataError(f"case {case.name}: label {case.label} has {label.channels} channels. "
                            "Fix: save one 3-D integer label map per case.")
        if label.shape != image.shape:
            raise DataError(f"case {case.name}: label {case.label} is {label.shape} voxels but image "
                            f"{case.images[0]} is {image.shape}. Fix: resample the label onto the image grid "
                            "(nearest neighbour), or export both from the same series.")
        if not np.allclose(label.affine, image.affine, rtol=0, atol=AFFINE_ATOL):
            off = float(np.abs(label.affine - image.affine).max())
            raise DataError(f"case {case.name}: label {case.label} and image {case.images[0]} lie on different "
                            f"grids (affines differ by up to {off:.4g}). Fix: resample the label onto the image "
                            "(nearest neighbour), or copy the image's affine into the label if only its header "
                            "is wrong.")
        return _integers(label.data[..., 0], case)

    def check_labels(self, case: VolumeCase, label: np.ndarray | None = None) -> None:
        """Refuse label values the dataset does not declare: they would be trained as nothing, or crash.
        `label`: the case's label map when already read."""
        found = distinct(self.label_volume(case) if label is None else label).tolist()
        bad = sorted(set(found) - self.label_values)
        if bad:
            where, fix = ((f"{self.root / 'dataset.json'} (labels)", "add them to `labels` in dataset.json")
                          if self.layout != "segkit" else
                          ("data.classes (value = class index)", "add classes to data.classes"))
            raise DataError(f"case {case.name}: {case.label} holds label values {bad} that {where} does not "
                            f"declare (allowed: {sorted(self.label_values)}). Fix: {fix}, or correct the label file.")


def _integers(label: np.ndarray, case: VolumeCase) -> np.ndarray:
    """Integer labels as stored; whole-valued float labels (common in exports) as int32."""
    if np.issubdtype(label.dtype, np.integer):
        return label
    if np.all(np.isfinite(label)) and np.all(label == np.round(label)):
        return label.astype(np.int32)
    raise DataError(f"case {case.name}: {case.label} holds non-integer label values. "
                    "Fix: save labels as integers, resampled with nearest neighbour (not linear) interpolation.")


def _read_json(meta: Path) -> dict:
    try:
        spec = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{meta}: unreadable ({err}). Fix: write valid JSON.") from err
    if not isinstance(spec, dict):
        raise DataError(f"{meta}: not a JSON object. Fix: write an nnU-Net v2 dataset.json.")
    return spec


def _require(meta: Path, spec: dict, keys: Sequence[str], kind: str) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise DataError(f"{meta}: {kind} dataset.json without {missing}. Fix: add them (needed: {list(keys)}).")


def _indexed(mapping: object, meta: Path, key: str) -> list[str]:
    """{"0": a, "1": b} -> [a, b]: channel names keyed by channel index."""
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{meta}: `{key}` must map channel indices to names, e.g. {{\"0\": \"T1\"}}. Fix: write it so.")
    if set(mapping) != {str(i) for i in range(len(mapping))}:
        raise DataError(f"{meta}: `{key}` keys are {list(mapping)}; they must be \"0\" to \"{len(mapping) - 1}\". "
                        "Fix: number the channels from 0, as the files' _0000, _0001 suffixes do.")
    return [str(mapping[str(i)]) for i in range(len(mapping))]


def _label_values(value: object, name: str, meta: Path) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise DataError(f"{meta}: labels.{name} = {value!r} is not an integer or a list of integers. "
                        f"Fix: e.g. \"{name}\": 1 (a label) or \"{name}\": [1, 2] (a region).")
    return tuple(items)


def _parse_labels(labels: object, order: object, meta: Path) -> _Labels:
    """nnU-Net v2 `labels` (name -> value, or name -> [values] for regions) and `regions_class_order`."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{meta}: `labels` must map names to values, e.g. {{\"background\": 0, \"tumour\": 1}}. "
                        "Fix: write it so.")
    parsed = {name: _label_values(value, name, meta) for name, value in labels.items()}
    ignore = parsed.pop("ignore", None)
    if ignore is not None and len(ignore) != 1:
        raise DataError(f"{meta}: labels.ignore = {list(ignore)}; the ignore label is one value. "
                        "Fix: e.g. \"ignore\": 4.")
    ignore_value = ignore[0] if ignore else None
    extra = {ignore_value} if ignore_value is not None else set()
    if any(len(values) > 1 for values in parsed.values()):
        return _parse_regions(parsed, order, meta, ignore_value, extra)
    by_value = sorted(parsed.items(), key=lambda item: item[1][0])
    values = [v[0] for _, v in by_value]
    if values != list(range(len(values))):
        raise DataError(f"{meta}: label values {values} are not 0 to {len(values) - 1}; the value is the class index "
                        "and nnU-Net requires consecutive labels. Fix: renumber `labels` and the label files.")
    return _Labels([name for name, _ in by_value], None, None, ignore_value, frozenset(values) | extra)


def _parse_regions(parsed: dict[str, tuple[int, ...]], order: object, meta: Path,
                   ignore: int | None, extra: set[int]) -> _Labels:
    """Regions are every label except background, in dataset.json order (which `regions_class_order` follows)."""
    if parsed.get("background") != (0,):
        raise DataError(f"{meta}: region labels need \"background\": 0 in `labels`, as nnU-Net does. Fix: add it.")
    regions = {name: values for name, values in parsed.items() if set(values) != {0}}
    if (not isinstance(order, list) or len(order) != len(regions)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in order)):
        raise DataError(f"{meta}: `regions_class_order` is {order!r}; region labels need one label value per region "
                        f"({list(regions)}), telling which value each region paints, later regions overwriting "
                        "earlier ones. Fix: e.g. \"regions_class_order\": [1, 2, 3], encompassing regions first.")
    values = frozenset({0}.union(*regions.values())) | extra
    if not set(order) <= values:
        raise DataError(f"{meta}: `regions_class_order` {order} holds values outside `labels` ({sorted(values)}). "
                        "Fix: list label values that the regions contain.")
    return _Labels(list(regions), regions, tuple(order), ignore, values)


def _dataset(root: Path, layout: Layout, channels: list[str], labels: _Labels,
             splits: dict[str, list[VolumeCase]]) -> VolumeDataset:
    values = labels.regions if labels.regions is not None else {n: (i,) for i, n in enumerate(labels.classes)}
    return VolumeDataset(root, layout, labels.classes, channels, labels.regions, labels.order, labels.ignore,
                         labels.values, splits, dict(values))


def _nnunet(root: Path, meta: Path, spec: dict) -> VolumeDataset:
    _require(meta, spec, ("channel_names", "labels", "file_ending"), "nnU-Net v2")
    if "dataset" in spec:
        raise DataError(f"{meta}: a `dataset` file list is not supported. "
                        "Fix: put the files in imagesTr/ and labelsTr/ under nnU-Net's names, and remove `dataset`.")
    ending = spec["file_ending"]
    if ending not in VOLUME_ENDINGS:
        raise DataError(f"{meta}: file_ending {ending!r}; segkit reads the volume endings {list(VOLUME_ENDINGS)}. "
                        "Fix: convert the images and labels to .nii.gz and set \"file_ending\": \".nii.gz\".")
    channels = _indexed(spec["channel_names"], meta, "channel_names")
    labels = _parse_labels(spec["labels"], spec.get("regions_class_order"), meta)
    splits = {"train": _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, channels, meta, labelled=True)}
    if (root / "imagesTs").is_dir():
        splits["test"] = _nnunet_cases(root / "imagesTs", root / "labelsTs", ending, channels, meta, labelled=False)
    return _dataset(root, "nnunet", channels, labels, splits)


def _nnunet_cases(images: Path, labels: Path | None, ending: str, channels: list[str], meta: Path,
                  labelled: bool) -> list[VolumeCase]:
    """Cases of imagesTr/ (or imagesTs/): every channel file present, and a label for each training case."""
    if not images.is_dir():
        raise DataError(f"{images}: not found. "
                        f"Fix: put the images there as <case>_0000{ending} (one file per channel).")
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = re.fullmatch(r"(.+)_(\d{4})", path.name[:-len(ending)])
        if match is None:
            raise DataError(f"{path}: not named <case>_XXXX{ending} (XXXX: the 4-digit channel). "
                            f"Fix: rename it, e.g. {path.name[:-len(ending)]}_0000{ending}.")
        case, channel = match[1], int(match[2])
        if channel >= len(channels):
            raise DataError(f"{path} (case {case}): channel {channel}, but {meta} names {len(channels)} channel(s) "
                            f"{channels}. Fix: add it to channel_names, or remove the file.")
        files.setdefault(case, {})[channel] = path
    if not files and labelled:
        raise DataError(f"{images}: no <case>_0000{ending} files. Fix: check `file_ending` in {meta}.")
    found = ({p.name[:-len(ending)]: p for p in sorted(labels.iterdir())
              if p.name.endswith(ending) and not p.name.startswith(".")} if labels and labels.is_dir() else {})
    orphans = sorted(set(found) - set(files))
    if orphans:
        case = orphans[0]
        raise DataError(f"case {case}: label {found[case]} but no image {images / f'{case}_0000{ending}'} "
                        f"(labels without images: {orphans}). Fix: add the images (one file per channel), "
                        "or remove the labels.")
    cases = []
    for case, by_channel in sorted(files.items()):
        missing = [f"{case}_{i:04d}{ending}" for i in range(len(channels)) if i not in by_channel]
        if missing:
            raise DataError(f"case {case}: missing channel file(s) {missing} in {images}; {meta} names "
                            f"{len(channels)} channel(s) {channels}. Fix: add them, or remove the case's other files.")
        label = found.get(case)
        if label is None and labelled:
            raise DataError(f"case {case}: no label {labels / (case + ending)}. "
                            "Fix: add it, or move the case's images to imagesTs/ (unlabelled).")
        cases.append(VolumeCase(case, [by_channel[i] for i in range(len(channels))], label))
    return cases


def _msd(root: Path, meta: Path, spec: dict) -> VolumeDataset:
    """MSD: labels map "value" -> name; `training` lists {"image", "label"} paths, `test` image paths."""
    _require(meta, spec, ("modality", "labels", "training"), "MSD")
    channels = _indexed(spec["modality"], meta, "modality")
    names = spec["labels"]
    if not isinstance(names, dict) or not all(isinstance(k, str) and k.isdigit() for k in names):
        raise DataError(f"{meta}: MSD `labels` must map values to names, e.g. {{\"0\": \"background\"}}. "
                        "Fix: write it so.")
    labels = _parse_labels({str(name): int(value) for value, name in names.items()}, None, meta)
    entries = spec["training"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"image", "label"} <= set(e) for e in entries):
        raise DataError(f"{meta}: `training` must list {{\"image\": ..., \"label\": ...}} entries. Fix: write it so.")
    splits = {"train": [_msd_case(root, meta, e["image"], e["label"]) for e in entries]}
    if "test" in spec:
        splits["test"] = [_msd_case(root, meta, image, None) for image in spec["test"]]
    return _dataset(root, "msd", channels, labels, splits)


def _msd_case(root: Path, meta: Path, image: str, label: str | None) -> VolumeCase:
    case = VolumeCase(case_name(Path(image)), [root / image], None if label is None else root / label)
    for path in [*case.images, case.label]:
        if path is not None and not path.is_file():
            raise DataError(f"case {case.name}: {path} (listed in {meta}) not found. Fix: restore it or drop the "
                            "entry. An nnU-Net v1 dataset (<case>_0000 files)? Convert it with "
                            "nnUNetv2_convert_old_nnUNet_dataset.")
    return case


def _volume_files(folder: Path) -> dict[str, Path]:
    """Case -> its volume (a file, or a DICOM series folder) in `folder`."""
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        if not is_volume(path):
            continue
        name = case_name(path)
        if name in files:
            raise DataError(f"{path}: case {name} also in {files[name].name}. Fix: keep one of them.")
        files[name] = path
    return files


def _segkit(root: Path, classes: Sequence[str] | None, ignore_index: int | None) -> VolumeDataset:
    """segkit's own layout: one file per case (4-D for several channels); label value = class index."""
    split_dirs = {s: root / s for s in SEGKIT_SPLITS if (root / s / "images").is_dir()}
    if not split_dirs:
        raise DataError(f"{root}: no dataset.json and no train/images/ folder. Fix: use "
                        "ROOT/{train,val,test}/{images,masks}/<case>.nii.gz, or an nnU-Net v2 raw dataset "
                        "(dataset.json, imagesTr/, labelsTr/).")
    if classes is None:
        raise ConfigError(f"data.classes: {root} has no dataset.json to name the classes. "
                          "Fix: set data.classes, in label-value order (the name of value 0 first).")
    splits = {s: _segkit_cases(d / "images", d / "masks", labelled=s != "test") for s, d in split_dirs.items()}
    first = next(case for cases in splits.values() for case in cases)
    channels = [str(i) for i in range(Volume(first.name, first.images).channels)]
    values = frozenset(range(len(classes))) | ({ignore_index} if ignore_index is not None else set())
    return _dataset(root, "segkit", channels, _Labels(list(classes), None, None, ignore_index, values), splits)


def _segkit_cases(images: Path, masks: Path | None, labelled: bool) -> list[VolumeCase]:
    image_files, mask_files = _volume_files(images), _volume_files(masks) if masks else {}
    if not image_files:
        raise DataError(f"{images}: no volumes ({', '.join(VOLUME_ENDINGS)}, or DICOM series folders). Fix: add "
                        "them, or remove the folder.")
    orphans = sorted(set(mask_files) - set(image_files))
    if orphans:
        raise DataError(f"case {orphans[0]}: mask {mask_files[orphans[0]]} but no image in {images} "
                        f"(masks without images: {orphans}). Fix: add the images, or remove the masks.")
    unlabelled = sorted(set(image_files) - set(mask_files))
    if labelled and unlabelled:
        raise DataError(f"case {unlabelled[0]}: no mask {masks / image_files[unlabelled[0]].name} (cases without "
                        f"masks: {unlabelled}). Fix: add them, or move the cases to test/ (unlabelled).")
    return [VolumeCase(name, [path], mask_files.get(name)) for name, path in image_files.items()]


def is_volume_folder(folder: Path) -> bool:
    """Whether `folder` holds volumes (a prediction or visualisation input): files of a volume format, or DICOM
    series folders."""
    folder = Path(folder)
    return folder.is_dir() and any(is_volume(p) for p in folder.iterdir())


def is_volume_root(root: Path) -> bool:
    """Whether a data root is a volume dataset: a dataset.json, or volumes in train/images."""
    root = Path(root)
    return (root / "dataset.json").is_file() or is_volume_folder(root / "train" / "images")


def folder_cases(folder: Path, channel_names: Sequence[str], channel_files: bool) -> list[VolumeCase]:
    """The cases of a folder of volumes to predict: nnU-Net's `<case>_0000.nii.gz, <case>_0001...` grouped by
    case when `channel_files` (the model was trained on an nnU-Net dataset), else one (3-D or 4-D) file each."""
    folder = Path(folder)
    if not is_volume_folder(folder):
        raise DataError(f"{folder}: no volumes ({', '.join(VOLUME_ENDINGS)}, or DICOM series folders). Fix: point "
                        "to the folder of the cases' images (nnU-Net: imagesTs/).")
    if not channel_files:
        return _segkit_cases(folder, None, labelled=False)
    endings = {volume_ending(p) for p in folder.iterdir() if is_volume(p) and not p.is_dir()}
    if not endings and len(channel_names) == 1:  # DICOM series only: a folder per case (`<case>[_0000]/`)
        return [VolumeCase(re.sub(r"_0000$", "", p.name), [p], None) for p in sorted(folder.iterdir()) if is_volume(p)]
    if len(endings) != 1:
        raise DataError(f"{folder}: files ending in {sorted(endings)}, and the model reads nnU-Net's channel files "
                        "(<case>_0000<ending>). Fix: keep one file ending, as nnU-Net requires.")
    return _nnunet_cases(folder, None, endings.pop(), list(channel_names),
                         Path("the checkpoint's model.json"), labelled=False)


def slice_axis(spacing: Sequence[float], shape: Sequence[int]) -> int:
    """The axis to cut 2-D slices along: the coarsest spacing, as nnU-Net's 2-D configuration does, so that
    each slice keeps the finest in-plane resolution. Spacings within SPACING_RTOL tie; of tied axes the axial
    one (2: head-foot on the canonical RAS axes volumes are read in) wins, as scans are read, else the one
    with the fewest voxels (the largest slices), then the lowest index."""
    if len(spacing) != 3 or len(shape) != 3:
        raise ValueError(f"3 spacings and 3 sizes expected, got {tuple(spacing)} and {tuple(shape)}")
    spacing = np.asarray(spacing, dtype=float)
    tied = np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=SPACING_RTOL, atol=0))
    return 2 if 2 in tied else int(min(tied, key=lambda axis: (shape[axis], axis)))


def case_split(cases: Sequence[VolumeCase], val_fraction: float,
               seed: int) -> tuple[list[VolumeCase], list[VolumeCase]]:
    """(train, val) by case, never by slice: slices of one volume are near-copies, and sharing a case would
    leak it into validation. Deterministic for a seed whatever the order of `cases`; at least one each."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction: {val_fraction}; it must lie between 0 and 1. Fix: e.g. 0.2.")
    ordered = sorted(cases, key=lambda case: case.name)
    names = [case.name for case in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"case names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    if len(ordered) < 2:
        raise DataError(f"{len(ordered)} labelled case(s) {names}: too few to hold one back for validation (the split "
                        "is by case, never by slice). Fix: add cases, or give a val/ split (segkit layout).")
    return seeded_split(ordered, val_fraction, seed)


def region_masks(label: np.ndarray, regions: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """(C, ...) bool: channel i is on where the label holds any value of the i-th region. Regions nest and
    overlap (a tumour core voxel is also whole tumour), hence one sigmoid channel each, not one index."""
    if not regions:
        raise ValueError("no regions")
    return np.stack([np.isin(label, values) for values in regions.values()])


def combine_regions(masks: np.ndarray, regions: Mapping[str, tuple[int, ...]],
                    regions_class_order: Sequence[int]) -> np.ndarray:
    """Region masks (C, ...) bool -> a label map, by nnU-Net v2's rule (LabelManager.
    convert_probabilities_to_segmentation, on probabilities > 0.5): start from 0 (background); for i in
    0..C-1, in the regions' dataset.json order, set the voxels where region i is on to
    regions_class_order[i]; later regions overwrite earlier ones (so list encompassing regions first)."""
    if masks.dtype != bool:
        raise TypeError(f"bool masks expected, got {masks.dtype}; threshold probabilities first (nnU-Net: > 0.5)")
    if not masks.shape[0] == len(regions) == len(regions_class_order):
        raise ValueError(f"{masks.shape[0]} masks, {len(regions)} regions, {len(regions_class_order)} order entries")
    label = np.zeros(masks.shape[1:], dtype=np.min_scalar_type(max(regions_class_order)))
    for mask, value in zip(masks, regions_class_order):
        label[mask] = value
    return label
