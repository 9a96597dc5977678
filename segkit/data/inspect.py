"""Dataset inspection: what the masks contain, what is wrong with them, and which head fits; for images
(`inspect`) and volume datasets (`inspect_volumes`) alike (`inspect_data` picks).

Images: without a config the mask format and class names are guessed from the files: per-class
folders -> multilabel; 0 and one other value (or a JPEG mask) -> binary; other grey values ->
index; RGB -> colour. Images are summarised too: type, bands, value range and per-band
statistics of a sample, which is what normalisation will be built from.

Volumes (nnU-Net v2, MSD or segkit layout): every labelled case of the splits training uses (train, and val
in the segkit layout) is read once: its label map becomes a histogram of label values, from which every class
statistic follows (a voxel's classes depend only on its value, so shares, overlap of regions and unlabelled
voxels are sums over the histogram), and its image gives shape, spacing, type and per-channel intensity
range. Broken cases (labels outside dataset.json, image/label grid mismatch, unreadable files) are collected
and refused together, each naming its case. A segkit-layout dataset has no dataset.json to name its classes:
without them (from --config) the label values found are reported as `background, class_1, ...` and the report
says that data.classes must name them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage
from tqdm import tqdm

from segkit.config import DataConfig, check_data_keys
from segkit.data.dataset import label_stats
from segkit.data.io import image_size, is_image, read_mask_raw
from segkit.data.layout import Sample, by_stem, pair, split_dirs
from segkit.data.masks import MaskFormat, build_mask_format
from segkit.data.normalize import sample_windows, valid_pixels
from segkit.data.source import ImageSource
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import VolumeCase, VolumeDataset, is_volume_root, slice_axis
from segkit.errors import ConfigError, DataError, SegkitError


@dataclass
class DataGuess:
    """Mask format and class names, from a config or guessed from the files."""

    mask: str
    classes: list[str]
    ignore_index: int | None = None
    foreground_value: int | str | None = None
    colors: list[tuple[int, int, int]] | None = None
    guessed: bool = False
    binary_threshold: float | None = None
    bands: list[int] | None = None
    nodata: float | None = None
    reason: str = "as the config says"

    @classmethod
    def from_config(cls, d: DataConfig) -> DataGuess:
        """The encoding a config's data section states (nothing guessed)."""
        return cls(d.mask, list(d.classes), d.ignore_index, d.foreground_value, d.colors,
                   binary_threshold=d.binary_threshold, bands=d.bands, nodata=d.nodata)

    def declare(self, declared: dict) -> DataGuess:
        """This reading with the `READING` keys the user declared in place of the guessed ones."""
        if not declared:
            return self
        colors = declared.get("colors")
        return replace(self, **declared | ({"colors": [tuple(c) for c in colors]} if colors else {}),
                       guessed=self.guessed and "classes" not in declared)

    def format(self) -> MaskFormat:
        return build_mask_format(self.mask, self.classes, self.ignore_index, self.foreground_value, self.colors,
                                 self.binary_threshold)

    @property
    def background(self) -> int | None:
        """Index of the class that means 'nothing here', if any (for counting empty masks)."""
        names = [c.lower() for c in self.classes]
        if "background" in names:
            return names.index("background")
        return 0 if self.guessed and self.mask in ("index", "color") else None


READING = ("mask", "classes", "ignore_index", "foreground_value", "binary_threshold", "colors", "bands", "nodata")
"""The data keys that say how a dataset is read (how masks encode classes, which bands): a config's or the user's
declaration of them replaces what inspection would guess."""


@dataclass
class SplitReport:
    name: str
    images: int = 0
    labelled: int = 0
    without_mask: list[Path] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None
    valid: int = 0
    total: int = 0
    multi: int = 0
    unlabeled: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each labelled image
    present: np.ndarray | None = None  # images holding each class
    objects: list[list[int]] = field(default_factory=list)  # per class: pixel areas of its connected regions
    halves: np.ndarray | None = None  # (4, K) class pixels in the top, bottom, left and right halves


@dataclass
class ImageSummary:
    """Types, band counts and per-band statistics of a sample of images (what normalisation sees)."""

    sampled: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    bands: dict[int, int] = field(default_factory=dict)
    nodata: set = field(default_factory=set)
    georeferenced: int = 0
    minimum: np.ndarray | None = None
    maximum: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def to_dict(self) -> dict:
        tolist = lambda a: None if a is None else [float(v) for v in a]  # noqa: E731
        return {"sampled": self.sampled, "dtypes": self.dtypes, "bands": {str(k): v for k, v in self.bands.items()},
                "nodata": sorted(self.nodata), "georeferenced": self.georeferenced,
                "per_band": {"min": tolist(self.minimum), "max": tolist(self.maximum), "mean": tolist(self.mean),
                             "std": tolist(self.std)}}

    def text(self) -> list[str]:
        lines = [f"\nimages (a sample of {self.sampled}): types {self.dtypes}, bands {self.bands}"
                 + (f", nodata {sorted(self.nodata)}" if self.nodata else "")
                 + (f", {self.georeferenced} georeferenced" if self.georeferenced else "")]
        if self.mean is not None:
            lines.append("  band      min        max        mean       std")
            for b, (lo, hi, m, s) in enumerate(zip(self.minimum, self.maximum, self.mean, self.std), start=1):
                lines.append(f"  {b:>4}  {lo:>9.4g}  {hi:>9.4g}  {m:>9.4g}  {s:>9.4g}")
        return lines


def summarize_images(paths: list[Path], bands: list[int] | None, nodata: float | None,
                     limit: int = 32) -> ImageSummary:
    """Statistics of up to `limit` images (evenly spread), read as training would read them."""
    out = ImageSummary()
    pixels = []
    for path in paths[:: max(1, len(paths) // limit)][:limit]:
        try:
            with ImageSource.open(path, None, bands, nodata) as src:
                out.dtypes[str(src.dtype)] = out.dtypes.get(str(src.dtype), 0) + 1
                if src.nodata is not None:
                    out.nodata.add(float(src.nodata))
                out.georeferenced += src.geometry.georeferenced
                values = np.concatenate([valid_pixels(src.read(w), src.nodata)
                                         for w in sample_windows(src.height, src.width, 1 << 18)])
        except SegkitError:
            continue  # reported as unreadable by the mask pass
        out.bands[values.shape[1]] = out.bands.get(values.shape[1], 0) + 1
        out.sampled += 1
        pixels.append(values)
    if pixels and len(out.bands) == 1:
        allpx = np.concatenate(pixels)
        if len(allpx):
            out.minimum, out.maximum = allpx.min(0), allpx.max(0)
            out.mean, out.std = allpx.mean(0), allpx.std(0)
    return out


@dataclass
class Report:
    root: Path
    data: DataGuess
    splits: list[SplitReport]
    images: ImageSummary = field(default_factory=ImageSummary)
    declared: dict = field(default_factory=dict)  # the READING keys the user stated, validated
    unit = "pixels"

    def _sum(self, key: str) -> int:
        return sum(getattr(s, key) for s in self.splits)

    @property
    def overlap_share(self) -> float:
        """Share of valid pixels with more than one label."""
        return self._sum("multi") / max(1, self._sum("valid"))

    @property
    def unlabeled_share(self) -> float:
        """Share of valid pixels with no label."""
        return self._sum("unlabeled") / max(1, self._sum("valid"))

    def class_pixels(self) -> np.ndarray:
        return sum((s.pixels for s in self.splits if s.pixels is not None), np.zeros(len(self.data.classes), np.int64))

    # -- what a plan is made from (the same questions VolumeReport answers) ---------------------------------

    def _training(self) -> list[SplitReport]:
        return [s for s in self.splits if s.name != "test"] or self.splits

    @property
    def items(self) -> int:
        """Labelled 2-D training samples (images) training draws its crops from."""
        return sum(s.labelled for s in self._training())

    def plane_size(self) -> tuple[float, float]:
        """Median (height, width) of the labelled images."""
        sizes = [hw for s in self._training() for hw in s.sizes]
        return tuple(np.median(sizes, axis=0).tolist()) if sizes else (0.0, 0.0)

    def class_shares(self) -> dict[str, float]:
        """Share of valid pixels in each class."""
        valid = max(1, self._sum("valid"))
        return {c: int(n) / valid for c, n in zip(self.data.classes, self.class_pixels().tolist())}

    def presence(self) -> dict[str, int]:
        """How many labelled images hold each class."""
        present = sum((s.present for s in self._training() if s.present is not None), np.zeros(len(self.data.classes)))
        return {c: int(n) for c, n in zip(self.data.classes, present)}

    def object_sizes(self) -> dict[str, float]:
        """Each class's typical object: the pixel area of the connected region a random pixel of the class lies
        in, at the median (an area-weighted median, so specks of a noisy mask do not make a class look small;
        nan where the class has none)."""
        return {c: weighted_median([a for s in self._training() if s.objects for a in s.objects[k]])
                for k, c in enumerate(self.data.classes)}

    def halves(self) -> dict[str, np.ndarray]:
        """Class pixels (per class) in the top, bottom, left and right halves of the training images."""
        total = sum((s.halves for s in self._training() if s.halves is not None), np.zeros((4, len(self.data.classes))))
        return dict(zip(HALVES, total))

    def fingerprint_items(self) -> tuple[str, int]:
        """What presence counts, and how many there are."""
        return "images", self.items

    def refuse_untrainable(self) -> None:
        """A DataError naming every pair training could not use: no labelled image at all, masks of another
        size than their image, unreadable files (volume datasets refuse such cases while being read)."""
        problems = [f"{s.name}: {item}" for s in self.splits for item in s.size_mismatch + s.unreadable]
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{self.root}: {len(problems)} image/mask pair(s) cannot be used:\n  "
                            + "\n  ".join(problems[:10]) + more + "\nFix: repair or remove them.")
        if not self.items:
            orphans = sum(len(s.orphan_masks) for s in self.splits)
            raise DataError(f"{self.root}: no image has a mask ({sum(s.images for s in self.splits)} images, "
                            f"{orphans} masks without an image); a mask pairs with the image of the same stem. "
                            "Fix: put each image's mask, named like it, in masks/.")

    def input_choices(self) -> list[tuple[str, object, str]]:
        """(key, value, reason) of the input a plan fixes: channels and normalisation, from the image sample."""
        s = self.images
        if len(s.bands) != 1:
            raise DataError(f"{self.root}: the images have different band counts ({s.bands} images of each count). "
                            "Fix: make them alike, or choose the bands every image has with data.bands.")
        channels, dtypes = next(iter(s.bands)), sorted(s.dtypes)
        seen = f"{' and '.join(dtypes)} images, a sample of {s.sampled}"
        out: list[tuple[str, object, str]] = [("data.channels", channels, f"{channels} band(s) per image ({seen})")]
        if channels == 3 and dtypes == ["uint8"]:
            out.append(("data.normalize", "imagenet", "8-bit RGB: ImageNet's mean and std per band (what the "
                                                       "encoders are built for, and pretrained weights expect)"))
        else:
            rng = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in zip(s.minimum, s.maximum)) if s.mean is not None \
                else "unknown"
            out.append(("data.normalize", "dataset", f"not 8-bit RGB ({seen}; values per band {rng}): each band "
                                                      "clipped to the training pixels' 0.5/99.5 percentiles, then "
                                                      "their mean and std"))
        if s.nodata:
            key, value, why = out[-1]
            out[-1] = (key, value, why + f"; the files declare nodata {sorted(s.nodata)}: such pixels are left out of "
                                         "statistics, loss and scores")
        return out

    def encoding_reason(self) -> str:
        return self.data.reason

    def advice(self) -> tuple[str, str]:
        """(head, why) computed from the overlap and coverage shares."""
        if self.overlap_share > 0:
            return "sigmoid", (f"{self.overlap_share:.2%} of pixels carry more than one label; softmax cannot "
                               "represent them, so the sigmoid head is required.")
        if self.unlabeled_share > 0:
            fg = self.data.classes[-1] if len(self.data.classes) == 1 else "..."
            return "sigmoid", (f"labels never overlap, but {self.unlabeled_share:.2%} of pixels have no class: "
                               f"the sigmoid head fits as is (classes {self.data.classes}); softmax fits once "
                               f"a class covers them (e.g. `data.classes: [background, {fg}]`).")
        return "softmax", ("every pixel has exactly one class: the softmax head fits; "
                           "the sigmoid head (one-vs-rest) also works.")

    def config(self) -> dict:
        """The config sections to write for this dataset: its mask encoding (as found, or as the config said)
        and the advised head; every other key keeps its default."""
        d = self.data
        data: dict = {"root": str(self.root), "mask": d.mask, "classes": list(d.classes)}
        for key in READING:
            if key not in data and getattr(d, key) is not None:
                data[key] = [list(c) for c in d.colors] if key == "colors" else getattr(d, key)
        return {"data": data, "model": {"head": self.advice()[0]}}

    def to_dict(self) -> dict:
        pixels = self.class_pixels()
        valid = max(1, self._sum("valid"))
        head, why = self.advice()
        return {
            "root": str(self.root), "mask": self.data.mask, "classes": self.data.classes,
            "guessed": self.data.guessed,
            "class_frequency": {c: int(n) / valid for c, n in zip(self.data.classes, pixels.tolist())},
            "overlap_share": self.overlap_share, "unlabeled_share": self.unlabeled_share,
            "splits": {s.name: {"images": s.images, "labelled": s.labelled, "without_mask": len(s.without_mask),
                                "orphan_masks": len(s.orphan_masks), "empty_masks": len(s.empty),
                                "size_mismatch": len(s.size_mismatch), "unreadable": len(s.unreadable)}
                       for s in self.splits},
            "head": head, "why": head + ": " + why, "images": self.images.to_dict(), "config": self.config(),
            "items": self.items, "median_size": list(self.plane_size()), "images_with_class": self.presence(),
            "typical_object_pixels": self.object_sizes(), "encoding_reason": self.data.reason,
            "class_pixels_by_half": {k: v.tolist() for k, v in self.halves().items()},
        }

    def text(self) -> str:
        d = self.data
        source = "guessed from the files" if d.guessed else "from the config"
        lines = [f"{self.root}: {d.mask} masks, classes {d.classes} ({source})"]
        for s in self.splits:
            lines.append(f"\n[{s.name}] {s.images} images, {s.labelled} with masks")
            for label, items in (("images without a mask", s.without_mask), ("masks without an image", s.orphan_masks),
                                 ("empty masks (no foreground)", s.empty), ("size mismatches", s.size_mismatch),
                                 ("unreadable", s.unreadable)):
                if items:
                    shown = ", ".join(str(i) for i in items[:3]) + (" ..." if len(items) > 3 else "")
                    lines.append(f"  {label}: {len(items)}  ({shown})")
        lines += self.images.text()
        valid = max(1, self._sum("valid"))
        lines.append("\nclass pixel frequency (share of valid pixels):")
        width = max(len(c) for c in d.classes)
        for c, n in zip(d.classes, self.class_pixels().tolist()):
            lines.append(f"  {c:<{width}}  {n / valid:8.4%}  ({n} px)")
        ignored = self._sum("total") - self._sum("valid")
        if ignored:
            lines.append(f"  ignored pixels: {ignored / max(1, self._sum('total')):.4%}")
        lines.append(f"pixels with more than one label: {self.overlap_share:.4%}")
        lines.append(f"pixels with no label: {self.unlabeled_share:.4%}")
        head, why = self.advice()
        lines.append(f"\nhead: {head} — {why}")
        lines.append("config (save as a .yaml file, then `segkit train FILE`"
                     + ("; the class names are placeholders: rename them" if d.guessed else "") + "):")
        lines.append(textwrap.indent(yaml.safe_dump(self.config(), sort_keys=False), "  ").rstrip())
        return "\n".join(lines)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)) if folder.is_dir() else []


def guess_data(root: Path, declared: dict | None = None) -> DataGuess:
    """Mask format and class names from (a sample of 20) mask files of the first split, with the reason. What
    the user `declared` (`READING` keys) is taken as said: a declared ignore value is no class, and the
    reason asks only for what is still unsaid."""
    declared = declared or {}
    _, masks_dir = next(iter(split_dirs(root).values()))
    folders = sorted(p.name for p in masks_dir.iterdir() if p.is_dir() and _files(p)) if masks_dir.is_dir() else []
    if folders:
        return DataGuess("multilabel", folders, guessed=True,
                         reason=f"{masks_dir} holds one folder of masks per class: {', '.join(folders)}")
    files = _files(masks_dir)
    if not files:
        raise DataError(f"{masks_dir}: no mask files. Fix: put masks (same stem as the images) there.")
    counts: dict[int, int] = {}
    colours: set[tuple[int, int, int]] = set()
    lossy = False
    sample = files[:: max(1, len(files) // 20)]
    for path in sample:
        try:
            px = read_mask_raw(path, as_palette_index=True)
        except DataError:
            continue  # reported as unreadable by the full pass
        arr, lossy = px.values, lossy or px.lossy
        if arr.ndim == 3 and not (arr == arr[:, :, :1]).all():
            colours.update(map(tuple, np.unique(arr.reshape(-1, 3), axis=0).tolist()))
        else:
            for value, n in _histogram(arr if arr.ndim == 2 else arr[:, :, 0]).items():
                counts[value] = counts.get(value, 0) + n
    counts.pop(declared.get("ignore_index"), None)
    seen = f"{len(sample)} of {len(files)} mask files read"
    if colours and not lossy:
        ordered = sorted(colours)
        return DataGuess("color", [f"color_{r}_{g}_{b}" for r, g, b in ordered], colors=ordered, guessed=True,
                         reason=f"RGB masks with {len(ordered)} distinct colours ({seen}); one class per colour")
    values = sorted(counts)
    if lossy:
        return DataGuess("binary", ["fg"], guessed=True,
                         reason=f"lossy (JPEG) masks ({seen}): foreground is above the middle of the value range")
    if len(values) <= 1:
        return DataGuess("binary", ["fg"], guessed=True,
                         reason=f"the sampled masks hold only the values {values} ({seen}): binary, 0 = background")
    if len(values) == 2 and 0 in counts:
        other = max(values)
        share = counts[other] / sum(counts.values())
        if share > 0.5:
            return DataGuess("binary", ["fg"], guessed=True, foreground_value=0,
                             reason=f"binary masks of 0 and {other}, and {other} covers {share:.1%} of the pixels "
                                    f"({seen}): the minority value 0 is taken as the foreground (if {other} is "
                                    f"the object, set data.foreground_value: {other})")
        return DataGuess("binary", ["fg"], guessed=True,
                         reason=f"binary masks of 0 and {other} ({seen}); {other} ({share:.1%} of the pixels, the "
                                "minority) is the foreground")
    if max(values, default=0) > 255:
        return DataGuess("binary", ["fg"], guessed=True, foreground_value="nonzero",
                         reason=f"{len(values)} values up to {max(values)} ({seen}): instance IDs, so any value but "
                                "0 is foreground")
    top = int(max(values, default=0))
    shown = f"{values[:12]}{' ...' if len(values) > 12 else ''}"
    if top - values[-2] > len(values) and not {"classes", "mask"} & set(declared):
        raise DataError(f"{masks_dir}: grey masks holding the values {shown} ({seen}): {top} stands apart from "
                        f"the others, and as a class index it would make {top + 1} classes, most never seen; such "
                        f"a value usually marks unlabelled pixels. Fix: declare it (`--set data.ignore_index={top}` "
                        "to segkit inspect, plan or train, or data.ignore_index in a config), or name the classes "
                        "(data.classes) if it is one.")
    unsaid = ["name the classes in data.classes (value order)"] * ("classes" not in declared)
    unsaid += ["declare an ignore value (e.g. data.ignore_index: 255) if one marks unlabelled pixels"] * (
        "ignore_index" not in declared)
    return DataGuess("index", ["background", *(f"class_{i}" for i in range(1, top + 1))], guessed=True,
                     reason=f"grey masks holding the values {shown} ({seen}): class index masks, 0 = background"
                            + "".join(f"; {u}" for u in unsaid))


def _inspect_one(sample: Sample, fmt: MaskFormat, background: int | None,
                 bands: Sequence[int | str] | None = None) -> dict:
    out: dict = {"sample": sample}
    try:
        ih, iw = image_size(sample.image, bands)
        labels, valid = fmt.read(sample.mask)
    except SegkitError as err:
        out["error"] = str(err)
        return out
    if labels.shape[:2] != (ih, iw):
        where = sample.mask if not isinstance(sample.mask, dict) else next(iter(sample.mask.values()))
        out["mismatch"] = f"{where} {labels.shape[1]}x{labels.shape[0]} vs image {iw}x{ih}"
    stats = label_stats(labels, valid)
    fg = np.delete(stats.pixels, background) if background is not None else stats.pixels
    out["stats"], out["empty"], out["size"] = stats, int(fg.sum()) == 0, labels.shape[:2]
    out["objects"] = [object_areas(labels[:, :, k] & valid) for k in range(labels.shape[2])]
    out["halves"] = halves(labels * valid[..., None])
    return out


def halves(labels: np.ndarray) -> np.ndarray:
    """(4, K) pixels of each class in the top, bottom, left and right halves of (h, w, K) 0/1 layers (the
    middle row or column of an odd size in neither): where in the picture each class lies."""
    h, w = labels.shape[:2]
    parts = (labels[:h // 2], labels[h - h // 2:], labels[:, :w // 2], labels[:, w - w // 2:])
    return np.stack([part.sum((0, 1), dtype=np.int64) for part in parts])


def weighted_median(areas: Sequence[float]) -> float:
    """The area at which half of all the areas' pixels lie in smaller regions (nan for none)."""
    if not len(areas):
        return math.nan
    ordered = np.sort(np.asarray(areas, np.float64))
    return float(ordered[np.searchsorted(np.cumsum(ordered), ordered.sum() / 2)])


def object_areas(layer: np.ndarray) -> list[int]:
    """Pixel areas of the 8-connected regions of a 0/1 layer: how big the things to find are. (SciPy, not
    OpenCV: OpenCV's parallel labelling starts its thread pool, which loader workers forked later inherit
    locked.)"""
    regions, n = ndimage.label(layer, structure=np.ones((3, 3), bool))
    return np.bincount(regions.ravel(), minlength=n + 1)[1:].tolist()


def inspect(root: str | Path, data: DataGuess | None = None, threads: int = 4, progress: bool = False) -> Report:
    """Read every mask under `root` (all splits) and report on it; nothing is written."""
    root = Path(root)
    data = data or guess_data(root)
    fmt = data.format()
    splits = []
    for name, (images_dir, masks_dir) in split_dirs(root).items():
        s = SplitReport(name)
        pairing = pair(images_dir, masks_dir, data.classes, multilabel=data.mask == "multilabel", bands=data.bands)
        s.images = len(pairing.samples) + len(pairing.unlabeled)
        s.labelled = len(pairing.samples)
        s.without_mask, s.orphan_masks = pairing.unlabeled, pairing.orphan_masks
        s.pixels = np.zeros(len(data.classes), np.int64)
        s.present = np.zeros(len(data.classes), np.int64)
        s.objects = [[] for _ in data.classes]
        s.halves = np.zeros((4, len(data.classes)), np.int64)
        with ThreadPoolExecutor(threads) as pool:
            for r in tqdm(pool.map(lambda smp: _inspect_one(smp, fmt, data.background, data.bands), pairing.samples),
                          total=len(pairing.samples), desc=f"reading {name}", disable=not progress, leave=False):
                if "error" in r:
                    s.unreadable.append(r["error"])
                    continue
                if "mismatch" in r:
                    s.size_mismatch.append(r["mismatch"])
                if r["empty"]:
                    s.empty.append(r["sample"].image.name)
                st = r["stats"]
                s.sizes.append(r["size"])
                s.present += st.pixels > 0
                for areas, found in zip(s.objects, r["objects"]):
                    areas += found
                s.halves += r["halves"]
                s.pixels += st.pixels
                s.valid += st.valid
                s.total += st.total
                s.multi += st.multi
                s.unlabeled += st.unlabeled
        splits.append(s)
    images = [i for _, (images_dir, _) in split_dirs(root).items() for i in by_stem(images_dir, data.bands).values()]
    return Report(root, data, splits, summarize_images(images, data.bands, data.nodata))


def check_declared(root: str | Path, declared: dict) -> dict:
    """The data keys a user declares (`--set data.KEY=...`), validated: `READING` keys only, each of the right
    type, and only those that apply to volumes for a volume dataset."""
    other = sorted(set(declared) - set(READING))
    if other:
        raise ConfigError(f"data.{other[0]}: the data is read with the keys that say how to read it "
                          f"({', '.join(f'data.{k}' for k in READING)}). Fix: set data.{other[0]} in the written "
                          "plan.yaml, or pass it to `segkit train DATA --set`, which applies it after planning.")
    return check_data_keys({"root": root, **declared}, "the declared data keys (--set data.KEY)")


def inspect_data(root: str | Path, data: DataConfig | None = None, progress: bool = False,
                 declared: dict | None = None) -> Report | VolumeReport:
    """`inspect` for images, `inspect_volumes` for a volume dataset; `data` (a config's data section) says how
    to read masks, or, for volumes, selects or renames classes. Without `data`, the reading is guessed from the
    files, except for the `READING` keys the user `declared` (an ignore value, class names)."""
    declared = check_declared(root, declared) if declared else {}
    if is_volume_root(Path(root)):
        given = data.model_dump() if data else declared
        report = inspect_volumes(root, given.get("classes"), given.get("ignore_index"), progress=progress)
    else:
        guess = DataGuess.from_config(data) if data else guess_data(Path(root), declared)
        report = inspect(root, guess.declare(declared), progress=progress)
    report.declared = declared
    return report


HALVES = ("top", "bottom", "left", "right")
"""The halves of a picture (or slice: its rows and columns) whose class mixes tell whether it has a direction."""
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
    slices: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # value -> slices holding it, per axis
    halves: list[tuple[dict[int, int], dict[int, int]]] = field(default_factory=list)  # per axis: (first, second)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


def _counts(label: np.ndarray, axes: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The label values present and, for each, its voxels split by side along each of `axes`: an array of shape
    (values, 3, 3, ...) whose index per axis is 0 (first half), 1 (second half) or 2 (an odd middle slice).

    One pass of bincounts over blocks of CHUNK voxels (much faster than sorting; at once, the int64 copy a
    bincount makes of a CT label volume takes 8x its size and 8x the time). Values other than small
    non-negative integers are first numbered with np.unique."""
    if label.size and np.issubdtype(label.dtype, np.integer) and 0 <= label.min() and label.max() < 1 << 16:
        index, values = label, np.arange(int(label.max()) + 1)
    else:
        values, inverse = np.unique(label, return_inverse=True)
        index = inverse.reshape(label.shape)
    shape = (len(values),) + (3,) * len(axes)
    counts = np.zeros(math.prod(shape), np.int64)
    sides = []
    for a in axes:
        n = label.shape[a]
        side = np.full(n, 2, np.int64)
        side[:n // 2], side[n - n // 2:] = 0, 1
        sides.append(side.reshape([-1 if b == a else 1 for b in range(label.ndim)]))
    rows = max(1, CHUNK // max(1, math.prod(label.shape[1:])))
    for start in range(0, len(index), rows):
        key = index[start:start + rows].astype(np.int64)
        for a, side in zip(axes, sides):
            key = key * 3 + (side[start:start + rows] if a == 0 else side)
        counts += np.bincount(key.ravel(), minlength=len(counts))
    counts = counts.reshape(shape)
    present = counts.sum(axis=tuple(range(1, counts.ndim))) > 0
    return values[present], counts[present]


def _as_dict(values: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    return {v: n for v, n in zip(values.tolist(), counts.tolist()) if n}


def _histogram(label: np.ndarray) -> dict[int, int]:
    """Label value -> voxel count."""
    return _as_dict(*_counts(label))


def _histogram_and_halves(label: np.ndarray) -> tuple[dict[int, int], list[tuple[dict[int, int], dict[int, int]]]]:
    """The label histogram and, per axis, the histograms of the first and second halves along it (an odd
    middle slice is in neither), from one pass over the volume."""
    values, counts = _counts(label, range(label.ndim))
    halves = []
    for a in range(label.ndim):
        per_side = counts.sum(axis=tuple(1 + b for b in range(label.ndim) if b != a))
        halves.append((_as_dict(values, per_side[:, 0]), _as_dict(values, per_side[:, 1])))
    return _as_dict(values, counts.sum(axis=tuple(range(1, counts.ndim)))), halves


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
    histogram, halves = _histogram_and_halves(label)
    return CaseStats(case.name, split, volume.shape, volume.spacing, str(data.dtype),
                     flat.min(0).astype(np.float64), flat.max(0).astype(np.float64), total, squares,
                     histogram, _slices_holding(label, [v for v in histogram if v != 0]),
                     halves)


def _slices_holding(label: np.ndarray, values: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """For each label value, how many slices along each axis hold it (its count over these is the mean
    area of its cross-sections: the object size a 2-D network sees)."""
    out = {}
    for v in values:
        hit = label == v
        out[v] = tuple(int(hit.any(axis=tuple(b for b in range(3) if b != a)).sum()) for a in range(3))
    return out


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
    declared: dict = field(default_factory=dict)  # the READING keys the user stated, validated
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

    # -- what a plan is made from (the same questions Report answers) -----------------------------------

    @property
    def items(self) -> int:
        """2-D training samples: the slices of the cases along the slice axis."""
        return sum(c.shape[self.slice_axis] for c in self.cases)

    @property
    def spec(self) -> VolumeSpec:
        """How training with `data.target_spacing: median` cuts these cases: slice axis, median spacing and the
        in-plane target (the planner's choice, so its sizes are what the network will see)."""
        ds = self.dataset
        return VolumeSpec(ds.layout, tuple(ds.channel_names), self.slice_axis, dict(ds.class_values),
                          ds.regions_class_order, ds.ignore_label,
                          spacing=tuple(self.median_spacing)).with_target("median")

    def _scale(self, case: CaseStats, spec: VolumeSpec) -> list[float]:
        """Per in-plane axis, a case's voxel size over the target's: its slices grow by these factors."""
        return [case.spacing[a] / t for a, t in zip(spec.plane, spec.target_spacing)]

    def plane_size(self) -> tuple[float, float]:
        """Median (height, width) of the slices once resampled to the target spacing."""
        spec = self.spec
        sizes = [spec.slice_size(c.shape, c.spacing) or [c.shape[a] for a in spec.plane] for c in self.cases]
        return tuple(float(v) for v in np.median(sizes, axis=0))

    def class_shares(self) -> dict[str, float]:
        valid = max(1, self.valid)
        return {k: n / valid for k, n in self.class_voxels().items()}

    def presence(self) -> dict[str, int]:
        return self.cases_with()

    def object_sizes(self) -> dict[str, float]:
        """Median over cases of the mean area of a class's cross-sections in the slices that hold it, in pixels
        at the target spacing."""
        spec, out = self.spec, {}
        axis = spec.slice_axis
        for name, values in self.dataset.class_values.items():
            areas = []
            for c in self.cases:
                count = sum(c.histogram.get(v, 0) for v in values)
                held = max((c.slices.get(v, (0, 0, 0))[axis] for v in values), default=0)
                if count and held:
                    areas.append(count / held * math.prod(self._scale(c, spec)))
            out[name] = float(np.median(areas)) if areas else math.nan
        return out

    def halves(self) -> dict[str, np.ndarray]:
        """Class voxels (per class) in the first and second halves of the slices' rows (top, bottom) and columns
        (left, right), over the training cases."""
        def counts(histogram: dict[int, int]) -> np.ndarray:
            return np.array([sum(histogram.get(v, 0) for v in values) for values in self.dataset.class_values.values()])

        rows, cols = self.spec.plane
        return {name: sum(counts(c.halves[axis][i]) for c in self.cases)
                for name, axis, i in zip(HALVES, (rows, rows, cols, cols), (0, 1, 0, 1))}

    def fingerprint_items(self) -> tuple[str, int]:
        return "cases", len(self.cases)

    def refuse_untrainable(self) -> None:
        """Nothing left to refuse: `inspect_volumes` refused broken and missing cases while reading them."""

    def input_choices(self) -> list[tuple[str, object, str]]:
        """(key, value, reason) of the input a plan fixes: normalisation per channel and the slice axis."""
        from segkit.data.normalize import schemes_for

        names = list(self.dataset.channel_names)
        schemes = schemes_for("auto", names)
        why = {"ct": "CT: Hounsfield units are absolute, so one transform for all cases (clip to the training "
                     "foreground's 0.5/99.5 percentiles, then its mean and std; nnU-Net's CT scheme)",
               "zscore": "no absolute scale (MRI and most modalities): z-score per case over its body"}
        spec = self.spec
        spacing = ", ".join(f"{v:.3g}" for v in self.median_spacing)
        inplane = " x ".join(f"{t:.3g}" for t in spec.target_spacing)
        moved = [c.name for c in self.cases if spec.slice_size(c.shape, c.spacing) is not None]
        spread = " and ".join(f"{st['min']:.3g}-{st['max']:.3g}" for st in
                              (_stats([c.spacing[a] for c in self.cases]) for a in spec.plane))
        resampled = (f"{len(moved)} of {len(self.cases)} cases ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}) "
                     "are resampled in-plane to it for training (images bilinear, labels nearest)"
                     if moved else f"every case is already at it (in-plane {spread} mm), so none is resampled")
        return [("data.normalize", schemes, "; ".join(f"{n} -> {sch}: {why[sch]}" for n, sch in zip(names, schemes))),
                ("data.slice_axis", self.slice_axis,
                 f"median spacing ({spacing}) mm, anisotropy {self.anisotropy:.3g}: slices along axis "
                 f"{self.slice_axis} (the coarsest; on the closest RAS axes), {self.items} training slices of median "
                 f"{' x '.join(f'{v:g}' for v in self.plane_size())} voxels at {inplane} mm in-plane"),
                ("data.target_spacing", "median",
                 f"the median in-plane spacing, {inplane} mm (nnU-Net's 2-D rule): {resampled}; prediction "
                 "resamples each case to it and puts the outputs back on the case's own grid")]

    def encoding_reason(self) -> str:
        ds = self.dataset
        if self.guessed:
            return (f"no dataset.json: label value = class index, values {sorted({v for c in self.cases for v in c.histogram})} "
                    "found; name the classes in data.classes (value order)")
        kind = "regions (nnU-Net: a class is a set of label values)" if ds.multilabel else "labels"
        return f"{ds.layout} layout; dataset.json names the {kind}: {', '.join(ds.classes)}"

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
            "items": self.items, "median_size": list(self.plane_size()), "typical_object_pixels": self.object_sizes(),
            "class_voxels_by_half": {k: v.tolist() for k, v in self.halves().items()},
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


def _read_cases(ds: VolumeDataset, check: bool, threads: int, progress: bool = False) -> list[CaseStats]:
    """Statistics of every training case; all broken cases refused together, each named."""
    work = [(split, case) for split in TRAINING_SPLITS if split in ds.splits for case in ds.cases(split)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(tqdm(pool.map(lambda item: _case_stats(ds, item[0], item[1], check), work), total=len(work),
                            desc="reading cases", disable=not progress, leave=False))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(work)} cases cannot be used:\n  " + "\n  ".join(errors[:10]) + more)
    return [r for r in results if isinstance(r, CaseStats)]


def inspect_volumes(root: str | Path, classes: Sequence[str] | None = None, ignore_index: int | None = None,
                    threads: int = 2, progress: bool = False) -> VolumeReport:
    """Read every training case under `root` and report on it; nothing is written. `classes` and
    `ignore_index` are a config's data.classes and data.ignore_index (select or rename; needed to name
    the classes of a segkit-layout dataset)."""
    root = Path(root)
    guessed = classes is None and not (root / "dataset.json").is_file()
    ds = VolumeDataset.from_root(root, ["background"] if guessed else classes, ignore_index)
    cases = _read_cases(ds, check=not guessed, threads=threads, progress=progress)
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
