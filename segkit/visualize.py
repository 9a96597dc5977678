"""`segkit visualize` as one library call: overlays of masks on a folder of images (`viz` draws them), or
montages of the slices of volume cases (`visualize_volumes`), by what the folder holds. The same summary comes
back either way.

Volumes: one montage PNG per case, of the slices that hold foreground. Inputs: IMAGES, a folder of volumes
(nnU-Net's `<case>_0000.nii.gz, <case>_0001...` channel files, or one file per case); MASKS, `segkit predict`
output: `MASKS/<case>.nii.gz` label volumes (softmax) or `MASKS/<class>/<case>.nii.gz` binary volumes (sigmoid;
a region model writes both, and the class folders are used); optionally TRUTH, label volumes (nnU-Net
labelsTs/ or labelsTr/). With a checkpoint (or a volume config) its classes, colours, label values per class
(`data.volume.class_values`) and slice axis are used; without, a label value is its class index (`class_1`,
...; 0 is background) and each case is cut along its coarsest-spacing axis.

A montage shows every k-th slice with foreground (predicted or true, k chosen for at most MAX_TILES tiles)
along the slice axis, each tile labelled with its slice index, voxel rows and columns as the model sees a
slice (the two remaining axes in order), enlarged by a whole factor (nearest neighbour) to at least
MIN_TILE pixels. The first channel is windowed to its 1st/99th percentiles over the case. Tiles are the
overlay (with --truth: truth | prediction | errors, the 2-D visualize's panels and error colours)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segkit.config import load_config
from segkit.data.io import write_png
from segkit.data.masks import distinct
from segkit.data.readers.volume import case_name, is_volume
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume, VolumeCase, VolumeDataset, folder_cases, is_volume_folder, slice_axis
from segkit.errors import DataError, SegkitError
from segkit.heads import default_colors, head_from_metadata
from segkit.model import read_meta
from segkit.viz import (
    ERROR_COLORS,
    _font,
    _painted,
    error_map,
    legend_entries,
    overlay,
    sources_for,
    visualize_folder,
    with_legend,
)


@dataclass
class VizSummary:
    """Pictures written; inputs skipped for want of a mask (or truth) and why; a line per volume montage."""

    pictures: int
    skipped: list[str] = field(default_factory=list)
    skip_reason: str = ""
    details: list[str] = field(default_factory=list)
    kind: str = "pictures"

    def lines(self, out_dir: Path | str) -> list[str]:
        return [*self.details, f"{self.pictures} {self.kind} in {out_dir}"]

    def warning(self) -> str | None:
        return f"{len(self.skipped)} {self.skip_reason} (e.g. {self.skipped[0]})" if self.skipped else None


def visualize_files(images_dir: Path, masks_dir: Path, out_dir: Path, checkpoint: Path | None = None,
                    config: Path | None = None, alpha: float = 0.5, truth: Path | None = None,
                    overwrite: bool = False) -> VizSummary:
    """Overlays (with `truth`, error panels) of the masks under `masks_dir` on the images or volumes under
    `images_dir`, written under `out_dir`; class names and colours from `checkpoint` or `config`."""
    if not is_volume_folder(images_dir):
        head, masks, truth_src = sources_for(masks_dir, checkpoint, config, truth)
        written, skipped = visualize_folder(images_dir, masks, out_dir, head.classes, head.colors, truth_src, alpha,
                                            overwrite)
        return VizSummary(written, [p.name for p in skipped], "images have no mask and were skipped")
    if checkpoint is not None and config is not None:
        raise SegkitError("visualize takes one of --checkpoint or --config (for class names and colours), not both.")
    spec = (VolumeClasses.from_checkpoint(checkpoint) if checkpoint is not None
            else VolumeClasses.from_config(config) if config is not None else VolumeClasses(None, None))
    montages, skipped = visualize_volumes(images_dir, masks_dir, out_dir, spec, truth, alpha, overwrite)
    what = "mask or label" if truth is not None else "mask"
    details = [f"{m.case}: slices {m.slices} along axis {m.axis} ({m.foreground} of {m.depth} with foreground)"
               for m in montages]
    return VizSummary(len(montages), [str(s) for s in skipped], f"cases have no {what} and were skipped", details,
                      "montages")


MAX_TILES = 12
MIN_TILE = 160
"""Pixels: a slice whose longer side is smaller is enlarged by the smallest whole factor that reaches this."""
HEADER_H = 22
LABEL_H = 18
GAP = 4
WINDOW = (1, 99)
"""Percentiles of the first channel over the case that map to black and white."""
TRUTH_PANELS = ("truth", "prediction", "errors")


@dataclass(frozen=True)
class VolumeClasses:
    """What the masks mean: class names and colours, the label values of each class (None: a value is its
    class index), the ignore label, the slice axis (None: each case's coarsest spacing), and whether image
    files are nnU-Net channel files (None: decided from the file names) with their channel names."""

    classes: list[str] | None
    colors: list[tuple[int, int, int]] | None
    class_values: dict[str, tuple[int, ...]] | None = None
    ignore_label: int | None = None
    axis: int | None = None
    channel_files: bool | None = None
    channel_names: list[str] | None = None
    canonical: bool = True  # volumes read on RAS axes (False: a model trained before orientations)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> VolumeClasses:
        meta = read_meta(checkpoint)
        spec = VolumeSpec.from_meta(meta)
        if spec is None:
            raise SegkitError(f"{checkpoint}: a model trained on 2-D images, and the inputs are volumes. Fix: use "
                              "the checkpoint of a model trained on a volume dataset, or leave out --checkpoint.")
        head = head_from_metadata(meta)
        return cls(list(head.classes), [tuple(c) for c in head.colors], dict(spec.class_values), spec.ignore_label,
                   spec.slice_axis, spec.channel_files, list(spec.channel_names), spec.canonical)

    @classmethod
    def from_config(cls, config: Path) -> VolumeClasses:
        cfg = load_config(config)
        d = cfg.data
        if d.mask != "volume":
            raise SegkitError(f"{config}: data.root {d.root} holds images, and the inputs are volumes. Fix: use the "
                              "config of a volume dataset, or --checkpoint of a model trained on one.")
        ds = VolumeDataset.from_root(d.root, d.classes, d.ignore_index)
        head = cfg.head()
        axis = None if d.slice_axis == "auto" else int(d.slice_axis)
        return cls(list(head.classes), [tuple(c) for c in head.colors], dict(ds.class_values), ds.ignore_label,
                   axis, ds.layout == "nnunet", list(ds.channel_names))


@dataclass
class Montage:
    """One case's picture: which slices along `axis` it shows, and where its tiles lie."""

    case: str
    path: Path
    axis: int
    slices: list[int]
    foreground: int
    depth: int
    scale: int
    columns: int
    tile: tuple[int, int]
    panels: int

    def origin(self, tile: int, panel: int = 0) -> tuple[int, int]:
        """(row, column) in the picture of the top-left pixel of a tile's panel."""
        th, tw = self.tile
        r, c = divmod(tile, self.columns)
        return HEADER_H + r * (LABEL_H + th + GAP) + LABEL_H, c * (tw * self.panels + GAP) + panel * tw


def shown_slices(foreground: Sequence[bool], max_tiles: int = MAX_TILES) -> list[int]:
    """Every k-th slice with foreground, k the smallest step that keeps the tiles to `max_tiles`; the
    middle slice when none has any."""
    found = [i for i, on in enumerate(foreground) if on]
    if not found:
        return [len(foreground) // 2]
    return found[::_step(len(found), max_tiles)]


def _step(found: int, max_tiles: int = MAX_TILES) -> int:
    return max(1, math.ceil(found / max_tiles))


def _channel_files(folder: Path) -> tuple[bool, list[str]]:
    """Whether the folder holds nnU-Net channel files: every name ends in _XXXX and every case has channels
    0..n-1 (the same n); and the channel names ("0", "1", ...)."""
    groups: dict[str, set[int]] = {}
    for path in folder.iterdir():
        if not is_volume(path):
            continue
        stem = case_name(path)
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        if match is None:
            return False, ["0"]
        groups.setdefault(match[1], set()).add(int(match[2]))
    counts = {len(found) for found in groups.values()}
    if len(counts) != 1 or any(found != set(range(len(found))) for found in groups.values()):
        return False, ["0"]
    return True, [str(i) for i in range(counts.pop())]


def _files(folder: Path) -> dict[str, Path]:
    """Case -> file of a folder of one volume per case."""
    return {c.name: c.images[0] for c in folder_cases(folder, [], False)} if is_volume_folder(folder) else {}


@dataclass
class _Masks:
    """A prediction folder: class folders (sigmoid) when there are any, else combined label volumes."""

    folder: Path
    per_class: dict[str, dict[str, Path]]
    combined: dict[str, Path]

    @classmethod
    def scan(cls, folder: Path) -> _Masks:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: masks folder not found. Fix: point to `segkit predict` output.")
        per_class = {p.name: _files(p) for p in sorted(folder.iterdir()) if p.is_dir() and is_volume_folder(p)}
        combined = {} if per_class else _files(folder)
        if not per_class and not combined:
            raise DataError(f"{folder}: no <case>.nii.gz masks and no <class>/<case>.nii.gz folders. "
                            "Fix: point to `segkit predict` output for volumes.")
        return cls(folder, per_class, combined)

    def cases(self) -> set[str]:
        return set().union(*self.per_class.values()) if self.per_class else set(self.combined)


def _read(path: Path, case: str, canonical: bool) -> np.ndarray:
    return Volume(case, [path], canonical).data[..., 0]


def _check_shape(case: str, path: Path, shape: tuple[int, ...], image: Path, image_shape: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(image_shape):
        raise DataError(f"case {case}: {path} is {tuple(shape)} voxels but image {image} is {tuple(image_shape)}. "
                        "Fix: visualize masks predicted from these images (same grid), or resample them onto it.")


def _layers(label: np.ndarray, classes: list[str], values: dict[str, tuple[int, ...]] | None,
            ignore: int | None, case: str, path: Path) -> np.ndarray:
    """(K, X, Y, Z) bool class layers of a label volume; values outside every class (but 0, background, which
    sigmoid classes leave out) are refused."""
    values = values or {name: (i,) for i, name in enumerate(classes)}
    known = set().union({0}, *values.values()) | ({ignore} if ignore is not None else set())
    found = set(distinct(label).tolist())
    bad = sorted(found - known)
    if bad:
        raise DataError(f"case {case}: {path} holds label values {bad} that no class has (classes: "
                        f"{ {k: list(v) for k, v in values.items()} }). Fix: give the checkpoint (or config) the "
                        "masks came from, or correct the file.")
    return np.stack([np.isin(label, values[name]) for name in classes])


@dataclass
class _Case:
    """One case's first image channel with its display window, prediction and truth layers."""

    image: np.ndarray
    window: tuple[float, float]
    pred: np.ndarray
    truth: np.ndarray | None
    valid: np.ndarray
    classes: list[str]
    colors: list[tuple[int, int, int]]
    axis: int


def _class_folders(case: VolumeCase, masks: _Masks, classes: list[str], colors: list[tuple[int, int, int]],
                   shape: tuple[int, int, int], canonical: bool) -> np.ndarray:
    """(K, X, Y, Z) bool from the binary volumes of the class folders (a class coloured black may lack one)."""
    pred = np.zeros((len(classes), *shape), bool)
    for k, (name, color) in enumerate(zip(classes, colors)):
        files = masks.per_class.get(name)
        if files is None:
            if tuple(color) == (0, 0, 0):
                continue  # background: never drawn
            raise DataError(f"{masks.folder}: no folder {name}/ for class {name} (class folders: "
                            f"{sorted(masks.per_class)}). Fix: give the checkpoint the masks came from.")
        if case.name not in files:
            raise DataError(f"case {case.name}: no mask in {masks.folder / name}, but other class folders have one. "
                            "Fix: predict the case again.")
        layer = _read(files[case.name], case.name, canonical)
        _check_shape(case.name, files[case.name], layer.shape, case.images[0], shape)
        pred[k] = layer != 0
    return pred


def _load_case(case: VolumeCase, masks: _Masks, truth: dict[str, Path] | None, spec: VolumeClasses) -> _Case:
    """Read and check one case: masks and truth on the image's grid, their values known."""
    volume = Volume(case.name, case.images[:1], spec.canonical)
    first = volume.data[..., 0]
    low, high = (float(v) for v in np.percentile(first, WINDOW))
    axis = spec.axis if spec.axis is not None else slice_axis(volume.spacing, volume.shape)
    true_label = None
    if truth is not None:
        true_label = _read(truth[case.name], case.name, spec.canonical)
        _check_shape(case.name, truth[case.name], true_label.shape, case.images[0], volume.shape)
    if masks.per_class:
        classes = spec.classes or sorted(masks.per_class)
        colors = spec.colors or default_colors(classes)
        pred = _class_folders(case, masks, classes, colors, volume.shape, spec.canonical)
    else:
        path = masks.combined[case.name]
        label = _read(path, case.name, spec.canonical)
        _check_shape(case.name, path, label.shape, case.images[0], volume.shape)
        top = int(max(label.max(), true_label.max() if true_label is not None else 0, 0))
        classes = spec.classes or ["background", *(f"class_{v}" for v in range(1, top + 1))]
        colors = spec.colors or default_colors(classes)
        pred = _layers(label, classes, spec.class_values, None, case.name, path)
    if true_label is None:
        return _Case(first, (low, high), pred, None, np.ones(volume.shape, bool), classes, colors, axis)
    if masks.per_class and spec.class_values is None:
        if len(classes) != 1:
            raise SegkitError(f"--truth: {masks.folder} has {len(classes)} class folders {classes}, and without "
                              "--checkpoint nothing says which label values make each class. Fix: add --checkpoint "
                              "(its model.json has data.volume.class_values).")
        true_layers = (true_label != 0)[None]  # one class: any label is it
    else:
        true_layers = _layers(true_label, classes, spec.class_values, spec.ignore_label, case.name, truth[case.name])
    valid = true_label != spec.ignore_label if spec.ignore_label is not None else np.ones(volume.shape, bool)
    return _Case(first, (low, high), pred, true_layers, valid, classes, colors, axis)


def _tile(c: _Case, k: int, scale: int, alpha: float) -> np.ndarray:
    """The panels of slice k, enlarged `scale` times; the slice windowed to grey (only shown slices are)."""
    def cut(a: np.ndarray, axis: int) -> np.ndarray:
        return np.take(a, k, axis=axis).repeat(scale, -2).repeat(scale, -1)

    low, high = c.window
    scaled = (cut(c.image, c.axis).astype(np.float64) - low) / (high - low if high > low else 1.0)
    image, pred = (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), cut(c.pred, c.axis + 1)
    if c.truth is None:
        return overlay(image, pred, c.colors, alpha)
    truth, valid = cut(c.truth, c.axis + 1), cut(c.valid, c.axis)
    return np.concatenate([overlay(image, truth, c.colors, alpha), overlay(image, pred, c.colors, alpha),
                           error_map(image, truth, pred, valid, c.colors)], axis=1)


def render(case: str, c: _Case, path: Path, alpha: float = 0.5) -> Montage:
    """Draw and write one case's montage."""
    painted = _painted(c.colors)
    other = tuple(a for a in range(3) if a != c.axis)
    on = c.pred[painted].any(0) if painted else np.zeros(c.image.shape, bool)
    if c.truth is not None and painted:
        on |= c.truth[painted].any(0)
    per_slice = on.any(axis=other)
    slices = shown_slices(per_slice.tolist())
    h, w = (c.image.shape[a] for a in other)
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    panels = 1 if c.truth is None else len(TRUTH_PANELS)
    th, tw = h * scale, w * scale
    columns = max(1, min(len(slices), round(math.sqrt(len(slices) * th / (tw * panels)))))
    rows = math.ceil(len(slices) / columns)
    montage = Montage(case, path, c.axis, slices, int(per_slice.sum()), len(per_slice), scale, columns, (th, tw),
                      panels)
    width = max(columns * (tw * panels + GAP) - GAP, 360)
    canvas = Image.new("RGB", (width, HEADER_H + rows * (LABEL_H + th + GAP) - GAP), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(13)
    header = (f"{case}: axis {c.axis}, {montage.foreground} of {montage.depth} slices with foreground, "
              f"1 in {_step(montage.foreground)} shown" if montage.foreground
              else f"{case}: axis {c.axis}, no foreground; middle slice shown")
    if panels > 1:
        header += "  (" + " | ".join(TRUTH_PANELS) + ")"
    draw.text((4, 4), header, fill=(0, 0, 0), font=font)
    for t, k in enumerate(slices):
        y, x = montage.origin(t)
        draw.text((x + 2, y - LABEL_H + 2), f"slice {k}", fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(_tile(c, k, scale, alpha)), (x, y))
    entries = legend_entries(c.classes, c.colors) + (list(ERROR_COLORS.items()) if c.truth is not None else [])
    write_png(path, with_legend(np.asarray(canvas), entries))
    return montage


def visualize_volumes(images_dir: Path, masks_dir: Path, out_dir: Path, spec: VolumeClasses,
                      truth_dir: Path | None = None, alpha: float = 0.5,
                      overwrite: bool = False) -> tuple[list[Montage], list[str]]:
    """A montage PNG per case with a prediction (and truth, when given). Returns the montages and the
    image cases skipped for want of a mask (or a truth)."""
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    for src in [images_dir, masks_dir] + ([Path(truth_dir)] if truth_dir else []):
        if out_dir.resolve() == src.resolve() or src.resolve() in out_dir.resolve().parents:
            raise SegkitError(f"{out_dir}: the output folder is inside an input folder ({src}). "
                              "Fix: choose a separate output folder.")
    channel_files, names = ((spec.channel_files, spec.channel_names) if spec.channel_files is not None
                            else _channel_files(images_dir))
    cases = folder_cases(images_dir, names, channel_files)
    masks = _Masks.scan(masks_dir)
    truth = None
    if truth_dir is not None:
        truth = _files(Path(truth_dir))
        if not truth:
            raise DataError(f"{truth_dir}: no <case>.nii.gz label volumes. Fix: point to the labels "
                            "(nnU-Net: labelsTs/ or labelsTr/).")
    have = masks.cases() & (set(truth) if truth is not None else masks.cases())
    chosen = [case for case in cases if case.name in have]
    skipped = [case.name for case in cases if case.name not in have]
    if not chosen:
        raise SegkitError(f"{masks_dir}: no mask names a case of {images_dir} ({len(cases)} cases, e.g. "
                          f"{cases[0].name}){' with a label in ' + str(truth_dir) if truth is not None else ''}. "
                          "Fix: point to the prediction of these images.")
    if not overwrite:
        existing = [out_dir / f"{c.name}.png" for c in chosen if (out_dir / f"{c.name}.png").exists()]
        if existing:
            raise SegkitError(f"{out_dir}: {len(existing)} pictures exist already (e.g. {existing[0]}). "
                              "Fix: --overwrite, or another output folder.")
    montages = [render(case.name, _load_case(case, masks, truth, spec), out_dir / f"{case.name}.png", alpha)
                for case in chosen]
    return montages, skipped
