"""Dataset inspection: what the masks contain, what is wrong with them, and which head fits.

Without a config the mask format and class names are guessed from the files: per-class
folders -> multilabel; 0 and one other value (or a JPEG mask) -> binary; other grey values ->
index; RGB -> colour. Images are summarised too: type, bands, value range and per-band
statistics of a sample, which is what normalisation will be built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segkit.config import DataConfig
from segkit.data.dataset import label_stats
from segkit.data.inspect_volumes import VolumeReport, inspect_volumes
from segkit.data.io import image_size, is_image, read_mask_raw
from segkit.data.layout import Sample, by_stem, pair, split_dirs
from segkit.data.masks import MaskFormat, build_mask_format, distinct
from segkit.data.normalize import sample_windows, valid_pixels
from segkit.data.source import ImageSource
from segkit.data.volumes import is_volume_root
from segkit.errors import DataError, SegkitError


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

    @classmethod
    def from_config(cls, d: DataConfig) -> DataGuess:
        """The encoding a config's data section states (nothing guessed)."""
        return cls(d.mask, list(d.classes), d.ignore_index, d.foreground_value, d.colors,
                   binary_threshold=d.binary_threshold, bands=d.bands, nodata=d.nodata)

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
            "head": head, "why": head + ": " + why, "images": self.images.to_dict(),
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
        return "\n".join(lines)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)) if folder.is_dir() else []


def guess_data(root: Path) -> DataGuess:
    """Mask format and class names from the mask files of the first split."""
    _, masks_dir = next(iter(split_dirs(root).values()))
    folders = sorted(p.name for p in masks_dir.iterdir() if p.is_dir() and _files(p)) if masks_dir.is_dir() else []
    if folders:
        return DataGuess("multilabel", folders, guessed=True)
    files = _files(masks_dir)
    if not files:
        raise DataError(f"{masks_dir}: no mask files. Fix: put masks (same stem as the images) there.")
    values: set[int] = set()
    colours: set[tuple[int, int, int]] = set()
    lossy = False
    for path in files[:: max(1, len(files) // 20)]:
        try:
            px = read_mask_raw(path, as_palette_index=True)
        except DataError:
            continue  # reported as unreadable by the full pass
        arr, lossy = px.values, lossy or px.lossy
        if arr.ndim == 3 and not (arr == arr[:, :, :1]).all():
            colours.update(map(tuple, np.unique(arr.reshape(-1, 3), axis=0).tolist()))
        else:
            values.update(distinct(arr if arr.ndim == 2 else arr[:, :, 0]).tolist())
    if colours and not lossy:
        ordered = sorted(colours)
        return DataGuess("color", [f"color_{r}_{g}_{b}" for r, g, b in ordered], colors=ordered, guessed=True)
    if lossy or len(values - {0}) <= 1 or max(values) > 255:
        return DataGuess("binary", ["fg"], guessed=True,
                         foreground_value="nonzero" if len(values - {0}) > 1 and not lossy else None)
    return DataGuess("index", [f"class_{i}" for i in range(int(max(values)) + 1)], guessed=True)


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
    out["stats"], out["empty"] = stats, int(fg.sum()) == 0
    return out


def inspect(root: str | Path, data: DataGuess | None = None, threads: int = 4) -> Report:
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
        with ThreadPoolExecutor(threads) as pool:
            for r in pool.map(lambda smp: _inspect_one(smp, fmt, data.background, data.bands), pairing.samples):
                if "error" in r:
                    s.unreadable.append(r["error"])
                    continue
                if "mismatch" in r:
                    s.size_mismatch.append(r["mismatch"])
                if r["empty"]:
                    s.empty.append(r["sample"].image.name)
                st = r["stats"]
                s.pixels += st.pixels
                s.valid += st.valid
                s.total += st.total
                s.multi += st.multi
                s.unlabeled += st.unlabeled
        splits.append(s)
    images = [i for _, (images_dir, _) in split_dirs(root).items() for i in by_stem(images_dir, data.bands).values()]
    return Report(root, data, splits, summarize_images(images, data.bands, data.nodata))


def inspect_data(root: str | Path, data: DataConfig | None = None) -> Report | VolumeReport:
    """`inspect` for images, `inspect_volumes` for a volume dataset; `data` (a config's data section) says how
    to read masks, or, for volumes, selects or renames classes."""
    if is_volume_root(Path(root)):
        return inspect_volumes(root, data.classes if data else None, data.ignore_index if data else None)
    return inspect(root, DataGuess.from_config(data) if data else None)
