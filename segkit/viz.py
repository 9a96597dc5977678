"""Pictures: learning curves, mask overlays with a legend, comparison panels."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from segkit.data.io import atomic_path, is_image, read_image, write_png  # noqa: E402
from segkit.data.layout import Sample, pair  # noqa: E402
from segkit.config import load_config  # noqa: E402
from segkit.data.masks import MaskFormat, build_mask_format  # noqa: E402
from segkit.data.splits import checkpoint_data, mask_format  # noqa: E402
from segkit.errors import SegkitError  # noqa: E402
from segkit.heads import Head, head_from_metadata  # noqa: E402
from segkit.model import read_meta  # noqa: E402


@contextmanager
def freed_on_exit() -> Iterator[None]:
    """Collect the garbage made inside at once. A matplotlib figure is a web of reference cycles, so
    closing one frees nothing until a full collection, which in a process holding torch (~450k tracked
    objects) runs about once per 100k new long-lived objects: a training run's curves.png left ~2 MiB
    (its Agg buffer, ~6k objects) per plot, resident memory rising with the epochs. The objects older
    than the block are frozen for that collection, so it costs ~2 ms instead of ~250 ms (a full one
    where someone else has frozen objects: gc.freeze is process-wide, and unfreezing would undo theirs)."""
    freeze = not gc.get_freeze_count()
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        if freeze:
            gc.unfreeze()


def plot_curves(history: Sequence[dict], path: Path, metric: str = "val_mean_dice") -> None:
    """Loss (train and validation) and the validation metric per epoch, side by side. Training calls
    this every few epochs, so the figure is freed on return (`freed_on_exit`)."""
    with freed_on_exit():
        _draw_curves(history, path, metric)


def _draw_curves(history: Sequence[dict], path: Path, metric: str) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [row[metric] for row in history], color="tab:green")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=metric.replace("_", " "), ylim=(0, 1))
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> str:
    """Save a matplotlib figure as PNG atomically and close it; returns the path."""
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return str(path)


ERROR_COLORS = {"false positive": (255, 40, 40), "missed (false negative)": (40, 120, 255),
                "wrong class": (255, 0, 255)}


def to_display(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for viewing (never for the network): 1- and 2-band images show their first
    band in grey, images with more bands their first three, and anything but 8-bit is stretched per band between its
    0.5 and 99.5 percentiles, as GIS viewers do for 11/16-bit and float rasters."""
    arr = image if image.ndim == 3 else image[:, :, None]
    arr = np.repeat(arr[:, :, :1], 3, axis=2) if arr.shape[2] < 3 else arr[:, :, :3]
    if arr.dtype != np.uint8:
        flat = arr.reshape(-1, 3).astype(np.float64)
        finite = flat[np.isfinite(flat).all(1)]
        low, high = np.percentile(finite, (0.5, 99.5), axis=0) if len(finite) else (np.zeros(3), np.ones(3))
        scaled = (arr.astype(np.float64) - low) / np.where(high > low, high - low, 1.0)
        arr = (np.nan_to_num(np.clip(scaled, 0, 1)) * 255).round().astype(np.uint8)
    return arr


def _painted(colors: Sequence[Sequence[int]]) -> list[int]:
    """Classes drawn on overlays: all but those coloured black (background)."""
    return [i for i, c in enumerate(colors) if tuple(c) != (0, 0, 0)]


def overlay(image: np.ndarray, masks: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Masks (C, H, W) bool over an image: each pixel tinted with the mean colour of its classes,
    and every class outlined in its colour, so overlapping classes stay visible."""
    out = to_display(image).astype(np.float32)
    keep = _painted(colors)
    if not keep:
        return out.astype(np.uint8)
    layers = masks[keep].astype(np.float32)
    palette = np.array([colors[i] for i in keep], np.float32)
    count = layers.sum(0)
    tint = np.einsum("chw,ck->hwk", layers, palette) / np.maximum(count, 1)[:, :, None]
    hit = count > 0
    out[hit] = (1 - alpha) * out[hit] + alpha * tint[hit]
    kernel = np.ones((3, 3), np.uint8)
    for layer, color in zip(masks[keep], palette):
        m = layer.astype(np.uint8)
        edge = (m - cv2.erode(m, kernel)).astype(bool)
        out[edge] = color
    return out.round().astype(np.uint8)


def error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray,
              colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Errors over a dimmed image: false positives, misses, and pixels with both (a wrong class)."""
    keep = _painted(colors)
    t, p = truth[keep], pred[keep]
    fp = (p & ~t).any(0) & valid
    fn = (t & ~p).any(0) & valid
    out = (to_display(image).astype(np.float32) * 0.4).astype(np.uint8)
    for sel, name in ((fp & ~fn, "false positive"), (fn & ~fp, "missed (false negative)"), (fp & fn, "wrong class")):
        out[sel] = ERROR_COLORS[name]
    return out


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def with_legend(panel: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]],
                titles: Sequence[str] = ()) -> np.ndarray:
    """Add titles above equal-width panels and a legend strip (colour box + name) below."""
    font = _font()
    h, w = panel.shape[:2]
    row_h, title_h = 20, 22 if titles else 0
    per_row = max(1, w // 170)
    rows = (len(entries) + per_row - 1) // per_row
    canvas = Image.new("RGB", (w, h + title_h + rows * row_h + 6), (255, 255, 255))
    canvas.paste(Image.fromarray(panel), (0, title_h))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((i * w // len(titles) + 4, 3), title, fill=(0, 0, 0), font=font)
    for i, (name, color) in enumerate(entries):
        x, y = (i % per_row) * 170 + 4, h + title_h + 4 + (i // per_row) * row_h
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        draw.text((x + 20, y + 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def legend_entries(classes: Sequence[str], colors: Sequence[Sequence[int]]) -> list[tuple[str, Sequence[int]]]:
    return [(classes[i], colors[i]) for i in _painted(colors)]


def overlay_picture(image: np.ndarray, masks: np.ndarray, classes: Sequence[str],
                    colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """One overlay with its legend."""
    return with_legend(overlay(image, masks, colors, alpha), legend_entries(classes, colors))


def panels_picture(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray,
                   classes: Sequence[str], colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """image | truth | prediction | errors, side by side, with titles and a legend."""
    parts = [to_display(image), overlay(image, truth, colors, alpha), overlay(image, pred, colors, alpha),
             error_map(image, truth, pred, valid, colors)]
    entries = legend_entries(classes, colors) + list(ERROR_COLORS.items())
    return with_legend(np.concatenate(parts, axis=1), entries, ["image", "truth", "prediction", "errors"])


@dataclass
class MaskSource:
    """A folder of masks and how to read it (format with class names)."""

    folder: Path
    fmt: MaskFormat

    def read(self, images_dir: Path) -> dict[str, Sample]:
        pairing = pair(images_dir, self.folder, self.fmt.classes, multilabel=self.fmt.multilabel)
        return {s.stem: s for s in pairing.samples}


def _resize_to(masks: np.ndarray, valid: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if masks.shape[1:] == shape:
        return masks, valid
    h, w = shape
    resized = [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for m in masks]
    return np.stack(resized).astype(bool), cv2.resize(valid.astype(np.uint8), (w, h),
                                                      interpolation=cv2.INTER_NEAREST).astype(bool)


def visualize_folder(images_dir: Path, masks: MaskSource, out_dir: Path, classes: Sequence[str],
                     colors: Sequence[Sequence[int]], truth: MaskSource | None = None, alpha: float = 0.5,
                     overwrite: bool = False) -> tuple[int, list[Path]]:
    """An overlay PNG per image with a mask (panels with the truth when given).

    Returns (pictures written, images skipped because they have no mask).
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    for src in [images_dir, masks.folder] + ([truth.folder] if truth else []):
        if out_dir.resolve() == src.resolve() or src.resolve() in out_dir.resolve().parents:
            raise SegkitError(f"{out_dir}: the output folder is inside an input folder ({src}). "
                              "Fix: choose a separate output folder.")
    predicted = masks.read(images_dir)
    truths = truth.read(images_dir) if truth else {}
    stems = sorted(s for s in predicted if truth is None or s in truths)
    if not stems:
        raise SegkitError(f"{masks.folder}: no mask pairs with an image in {images_dir} by stem.")
    if not overwrite:
        existing = [out_dir / f"{s}.png" for s in stems if (out_dir / f"{s}.png").exists()]
        if existing:
            raise SegkitError(f"{out_dir}: {len(existing)} pictures exist already (e.g. {existing[0]}). "
                              "Fix: --overwrite, or another output folder.")
    skipped = [p for p in sorted(images_dir.iterdir()) if p.is_file() and is_image(p) and p.stem not in stems]
    for stem in stems:
        sample = predicted[stem]
        image = to_display(read_image(sample.image, None))
        labels, valid = masks.fmt.read(sample.mask)
        pred, _ = _resize_to(labels.transpose(2, 0, 1).astype(bool), valid, image.shape[:2])
        if truth is None:
            picture = overlay_picture(image, pred, classes, colors, alpha)
        else:
            tl, tv = truth.fmt.read(truths[stem].mask)
            t, tv = _resize_to(tl.transpose(2, 0, 1).astype(bool), tv, image.shape[:2])
            picture = panels_picture(image, t, pred, tv, classes, colors, alpha)
        write_png(out_dir / f"{stem}.png", picture)
    return len(stems), skipped


def sources_for(masks_dir: Path, checkpoint: Path | None, config: Path | None, truth_dir: Path | None
                ) -> tuple[Head, MaskSource, MaskSource | None]:
    """Head (classes, colours) and mask readers for visualize.

    With a checkpoint, masks are `segkit predict` output (the head's own file format) and
    the truth is read as the checkpoint's training masks; with a config, both are read in
    the config's data format.
    """
    if (checkpoint is None) == (config is None):
        raise SegkitError("visualize needs exactly one of --checkpoint or --config (for class names and colours).")
    if config is not None:
        cfg = load_config(config)
        head = cfg.head()
        fmt = mask_format(cfg.data)
        return head, MaskSource(Path(masks_dir), fmt), MaskSource(Path(truth_dir), fmt) if truth_dir else None
    meta = read_meta(checkpoint)
    head = head_from_metadata(meta)
    predicted = build_mask_format(head.output_format, head.classes)
    truth = MaskSource(Path(truth_dir), mask_format(checkpoint_data(meta, Path(truth_dir))[0])) if truth_dir else None
    return head, MaskSource(Path(masks_dir), predicted), truth
