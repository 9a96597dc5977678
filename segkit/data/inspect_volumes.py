"""`segkit inspect` on a volume dataset (nnU-Net v2, MSD or segkit layout): what its labels and images hold,
and which head fits.

Every labelled case of the splits training uses (train, and val in the segkit layout) is read once: its label
map becomes a histogram of label values, from which every class statistic follows (a voxel's classes depend
only on its value, so shares, overlap of regions and unlabelled voxels are sums over the histogram), and its
image gives shape, spacing, type and per-channel intensity range. Broken cases (labels outside dataset.json,
image/label grid mismatch, unreadable files) are collected and refused together, each naming its case.
A segkit-layout dataset has no dataset.json to name its classes: without them (from --config) the label values
found are reported as `background, class_1, ...` and the report says that data.classes must name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segkit.data.volumes import VolumeCase, VolumeDataset, slice_axis
from segkit.errors import DataError

TRAINING_SPLITS = ("train", "val")
"""Splits whose cases training reads (val exists in the segkit layout only); test cases are only counted."""
CHUNK = 1 << 22
"""Voxels summed at a time for the intensity statistics."""


@dataclass
class CaseStats:
    """One labelled case: geometry, image type and intensity sums per channel, and its label histogram."""

    name: str
    split: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    dtype: str
    minimum: np.ndarray
    maximum: np.ndarray
    total: np.ndarray
    squares: np.ndarray
    histogram: dict[int, int]

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


def _histogram(label: np.ndarray) -> dict[int, int]:
    """Label value -> voxel count; a bincount for small non-negative integers (much faster than sorting)."""
    flat = label.ravel()
    if flat.size and np.issubdtype(flat.dtype, np.integer) and 0 <= flat.min() and flat.max() < 1 << 16:
        counts = np.bincount(flat)
        present = np.flatnonzero(counts)
        return dict(zip(present.tolist(), counts[present].tolist()))
    values, counts = np.unique(flat, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _case_stats(ds: VolumeDataset, split: str, case: VolumeCase, check: bool) -> CaseStats | str:
    """The case's statistics, or the problem with it (the DataError's message, which names the case)."""
    try:
        volume = ds.image(case)
        label = ds.label_volume(case)
        if check:
            ds.check_labels(case, label)
        data = volume.data
    except DataError as err:
        return str(err)
    flat = data.reshape(-1, data.shape[-1])
    total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), CHUNK):  # float64 sums without a float64 copy of the whole volume
        block = flat[start:start + CHUNK].astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    return CaseStats(case.name, split, volume.shape, volume.spacing, str(data.dtype),
                     flat.min(0).astype(np.float64), flat.max(0).astype(np.float64), total, squares,
                     _histogram(label))


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


@dataclass
class VolumeReport:
    """What `segkit inspect` says about a volume dataset; the numbers are over `cases` (training cases)."""

    dataset: VolumeDataset
    cases: list[CaseStats]
    split_counts: dict[str, int]
    guessed: bool = False
    classes_given: bool = False
    unit = "voxels"

    # -- label statistics, from the histograms ------------------------------------------------------------

    def _value_classes(self, value: int) -> list[str]:
        return [name for name, values in self.dataset.class_values.items() if value in values]

    def class_voxels(self) -> dict[str, int]:
        """Voxels in each class over all cases (ignore-label voxels excluded)."""
        out = dict.fromkeys(self.dataset.classes, 0)
        for case in self.cases:
            for value, n in case.histogram.items():
                for name in self._value_classes(value):
                    out[name] += n
        return out

    def cases_with(self) -> dict[str, int]:
        """How many cases hold at least one voxel of each class."""
        return {name: sum(any(case.histogram.get(v, 0) for v in values) for case in self.cases)
                for name, values in self.dataset.class_values.items()}

    def _count(self, keep) -> int:
        ignore = self.dataset.ignore_label
        return sum(n for case in self.cases for value, n in case.histogram.items()
                   if value != ignore and keep(len(self._value_classes(value))))

    @property
    def valid(self) -> int:
        """Voxels that are not the ignore label."""
        return self._count(lambda k: True)

    @property
    def ignored(self) -> int:
        ignore = self.dataset.ignore_label
        return sum(case.histogram.get(ignore, 0) for case in self.cases) if ignore is not None else 0

    @property
    def overlap_share(self) -> float:
        """Share of valid voxels in more than one class (nested regions)."""
        return self._count(lambda k: k > 1) / max(1, self.valid)

    @property
    def unlabeled_share(self) -> float:
        """Share of valid voxels in no class (outside every region, or a class left out)."""
        return self._count(lambda k: k == 0) / max(1, self.valid)

    # -- geometry and images ------------------------------------------------------------------------------

    def shape_stats(self) -> list[dict[str, float]]:
        return [_stats([c.shape[a] for c in self.cases]) for a in range(3)]

    def spacing_stats(self) -> list[dict[str, float]]:
        return [_stats([c.spacing[a] for c in self.cases]) for a in range(3)]

    @property
    def median_spacing(self) -> list[float]:
        return np.median([c.spacing for c in self.cases], axis=0).tolist()

    @property
    def anisotropy(self) -> float:
        """Coarsest over finest axis of the median spacing (nnU-Net treats > 3 as anisotropic)."""
        spacing = self.median_spacing
        return max(spacing) / min(spacing)

    def most_anisotropic(self) -> tuple[str, float]:
        """The case whose own spacing is the most anisotropic, and its coarsest over finest axis."""
        case = max(self.cases, key=lambda c: max(c.spacing) / min(c.spacing))
        return case.name, max(case.spacing) / min(case.spacing)

    @property
    def slice_axis(self) -> int:
        """The axis training cuts slices along (`data.slice_axis: auto`): the coarsest median spacing."""
        return slice_axis(self.median_spacing, np.median([c.shape for c in self.cases], axis=0).tolist())

    def intensity(self) -> dict[str, dict[str, float]]:
        """Per channel: min, max, mean and standard deviation over every voxel of the cases."""
        n = sum(c.voxels for c in self.cases)
        total, squares = sum(c.total for c in self.cases), sum(c.squares for c in self.cases)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
        low, high = np.min([c.minimum for c in self.cases], 0), np.max([c.maximum for c in self.cases], 0)
        return {name: {"min": float(low[i]), "max": float(high[i]), "mean": float(mean[i]), "std": float(std[i])}
                for i, name in enumerate(self.dataset.channel_names)}

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for case in self.cases:
            out[case.dtype] = out.get(case.dtype, 0) + 1
        return out

    # -- advice -------------------------------------------------------------------------------------------

    def advice(self) -> tuple[str, str]:
        """(head, why): overlapping regions need sigmoid; exclusive labels covering every voxel fit softmax."""
        ds = self.dataset
        pairs = ds.overlapping()
        if pairs:
            shown = "; ".join(f"{a} {list(ds.class_values[a])} and {b} {list(ds.class_values[b])}" for a, b in pairs)
            return "sigmoid", (f"the classes are nnU-Net regions that share label values ({shown}), so a voxel can "
                               f"be in several ({self.overlap_share:.2%} of the voxels are); softmax gives each voxel "
                               "one class and is refused: one sigmoid channel per region.")
        if self.unlabeled_share > 0:
            kind = "regions" if ds.multilabel else "the classes"
            return "sigmoid", (f"{kind} never overlap, but {self.unlabeled_share:.2%} of the voxels are in no "
                               "class: the sigmoid head fits as is; softmax needs a class for them (plain labels "
                               "with background: 0).")
        return "softmax", ("plain labels: each voxel holds one label value, so it is in exactly one class; the softmax "
                           "head fits (the sigmoid head, one-vs-rest, also works).")

    def config(self) -> dict:
        """The config sections to write for this dataset and the advised head."""
        data: dict = {"root": str(self.dataset.root)}
        if self.dataset.layout == "segkit" or self.classes_given:
            data["classes"] = list(self.dataset.classes)
        return {"data": data, "model": {"head": self.advice()[0]}}

    # -- output -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        ds = self.dataset
        valid = max(1, self.valid)
        head, why = self.advice()
        return {
            "root": str(ds.root), "layout": ds.layout, "channels": list(ds.channel_names),
            "classes": list(ds.classes), "guessed": self.guessed, "regions": ds.multilabel,
            "class_values": {k: list(v) for k, v in ds.class_values.items()},
            "regions_class_order": list(ds.regions_class_order) if ds.regions_class_order else None,
            "ignore_label": ds.ignore_label,
            "label_values_found": sorted({v for c in self.cases for v in c.histogram}),
            "splits": self.split_counts, "cases": len(self.cases),
            "class_frequency": {k: n / valid for k, n in self.class_voxels().items()},
            "class_voxels": self.class_voxels(), "cases_with_class": self.cases_with(),
            "overlapping": [list(p) for p in ds.overlapping()],
            "overlap_share": self.overlap_share, "unlabeled_share": self.unlabeled_share,
            "ignored_share": self.ignored / max(1, self.valid + self.ignored),
            "shape": self.shape_stats(), "spacing": self.spacing_stats(), "median_spacing": self.median_spacing,
            "anisotropy": self.anisotropy, "slice_axis": self.slice_axis,
            "most_anisotropic_case": dict(zip(("case", "anisotropy"), self.most_anisotropic())),
            "images": {"dtypes": self.dtypes(), "intensity": self.intensity()},
            "per_case": [{"case": c.name, "split": c.split, "shape": list(c.shape), "spacing": list(c.spacing),
                          "dtype": c.dtype} for c in self.cases],
            "head": head, "why": head + ": " + why, "config": self.config(),
        }

    def text(self) -> str:
        ds = self.dataset
        source = ("label values found; data.classes must name them" if self.guessed
                  else "from data.classes" if ds.layout == "segkit" or self.classes_given else "from dataset.json")
        kind = "regions" if ds.multilabel else "labels"
        lines = [f"{ds.root}: {ds.layout} volume dataset, {len(self.cases)} labelled training cases "
                 f"({', '.join(f'{s}: {n}' for s, n in self.split_counts.items())})",
                 f"channels: {ds.channel_names}",
                 f"{kind} ({source}): " + ", ".join(f"{k} = {list(v) if len(v) > 1 else v[0]}"
                                                    for k, v in ds.class_values.items())]
        if ds.regions_class_order:
            lines.append(f"regions_class_order: {list(ds.regions_class_order)}")
        if ds.ignore_label is not None:
            lines.append(f"ignore label: {ds.ignore_label}")
        lines.append("\nvoxels per class (share of valid voxels, cases containing it):")
        width = max(len(c) for c in ds.classes)
        valid, cases_with = max(1, self.valid), self.cases_with()
        for name, n in self.class_voxels().items():
            lines.append(f"  {name:<{width}}  {n / valid:8.4%}  ({n} voxels, {cases_with[name]} of "
                         f"{len(self.cases)} cases)")
        if self.ignored:
            lines.append(f"  ignored voxels: {self.ignored / (self.valid + self.ignored):.4%}")
        pairs = ds.overlapping()
        lines.append("overlapping classes: " + ("; ".join(f"{a} & {b}" for a, b in pairs) if pairs else "none"))
        lines.append(f"voxels in more than one class: {self.overlap_share:.4%}")
        lines.append(f"voxels in no class: {self.unlabeled_share:.4%}")
        lines.append("\ngeometry (min / median / max over cases; spacing in the headers' unit, usually mm):")
        for a, (size, spacing) in enumerate(zip(self.shape_stats(), self.spacing_stats())):
            lines.append(f"  axis {a}: {size['min']:g} / {size['median']:g} / {size['max']:g} voxels, "
                         f"spacing {spacing['min']:.4g} / {spacing['median']:.4g} / {spacing['max']:.4g}")
        median = ", ".join(f"{s:.4g}" for s in self.median_spacing)
        name, worst = self.most_anisotropic()
        lines.append(f"  median spacing ({median}): anisotropy {self.anisotropy:.3g} (most anisotropic case: {name}, "
                     f"{worst:.3g}); slices along axis {self.slice_axis} (data.slice_axis: auto)")
        lines.append(f"\nimages: types {self.dtypes()}")
        lines.append("  channel       min        max        mean       std")
        for name, s in self.intensity().items():
            lines.append(f"  {name:<8}  {s['min']:>9.4g}  {s['max']:>9.4g}  {s['mean']:>9.4g}  {s['std']:>9.4g}")
        head, why = self.advice()
        lines.append(f"\nhead: {head} — {why}")
        cfg = self.config()
        lines.append("config:\n  data:\n    root: " + cfg["data"]["root"])
        if "classes" in cfg["data"]:
            lines.append(f"    classes: [{', '.join(cfg['data']['classes'])}]"
                         + ("   # rename: in label-value order, value 0 first" if self.guessed else ""))
        lines.append(f"  model:\n    head: {cfg['model']['head']}")
        return "\n".join(lines)


def _read_cases(ds: VolumeDataset, check: bool, threads: int) -> list[CaseStats]:
    """Statistics of every training case; all broken cases refused together, each named."""
    work = [(split, case) for split in TRAINING_SPLITS if split in ds.splits for case in ds.cases(split)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda item: _case_stats(ds, item[0], item[1], check), work))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(work)} cases cannot be used:\n  " + "\n  ".join(errors[:10]) + more)
    return [r for r in results if isinstance(r, CaseStats)]


def inspect_volumes(root: str | Path, classes: Sequence[str] | None = None, ignore_index: int | None = None,
                    threads: int = 2) -> VolumeReport:
    """Read every training case under `root` and report on it; nothing is written. `classes` and
    `ignore_index` are a config's data.classes and data.ignore_index (select or rename; needed to name
    the classes of a segkit-layout dataset)."""
    root = Path(root)
    guessed = classes is None and not (root / "dataset.json").is_file()
    ds = VolumeDataset.from_root(root, ["background"] if guessed else classes, ignore_index)
    cases = _read_cases(ds, check=not guessed, threads=threads)
    if not cases:
        raise DataError(f"{root}: no labelled training cases. Fix: add images with their labels (nnU-Net: imagesTr/ "
                        "and labelsTr/; segkit layout: train/images and train/masks).")
    if guessed:
        negative = [(c.name, v) for c in cases for v in c.histogram if v < 0]
        if negative:
            name, value = negative[0]
            raise DataError(f"case {name}: label value {value}; in the segkit layout a label value is a class index "
                            "(0, 1, 2, ...). Fix: renumber the label file.")
        top = max((v for c in cases for v in c.histogram if v != ignore_index), default=0)
        ds = VolumeDataset.from_root(root, ["background", *(f"class_{v}" for v in range(1, top + 1))], ignore_index)
    counts = {split: len(found) for split, found in ds.splits.items()}
    return VolumeReport(ds, cases, counts, guessed=guessed, classes_given=classes is not None)
