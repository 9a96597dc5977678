"""Prediction: whole images padded to the network stride, big images in blended windows, TTA.

All blending (overlapping windows, flips) happens on logits; the head activates and
decodes once, afterwards. Big images are processed one band of windows at a time, so
working memory grows with the image width and the tile, not with the image area.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segkit import distributed as dist
from segkit.data.io import check_channels, image_bands, is_image
from segkit.data.normalize import Normalization
from segkit.data.readers import RASTER_EXTS, Geometry, Window, band_names, is_band_folder, open_raster
from segkit.data.readers.base import system_error
from segkit.data.source import ImageSource, pixel_dtype
from segkit.data.writers import (
    MaskWriter,
    check_output_folder,
    misfit_message,
    output_files,
    refuse_existing,
    writer_for,
)
from segkit.device import amp_dtype, resolve_device
from segkit.errors import SegkitError
from segkit.heads import Head, head_from_metadata
from segkit.model import load_checkpoint
from segkit.onnx_runtime import load_onnx
from segkit.padding import STRIDE, mirrored, pad_centred, to_stride

log = logging.getLogger("segkit")


def forward_padded(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None,
                   crop: int | None = None) -> torch.Tensor:
    """Logits (N, C, H, W) of a normalised batch of any size: padded, centred, to the model's input size
    (multiples of the stride, or an exported model's fixed size) by the rule of `padding` for a model trained
    on crops of `crop` pixels, run, cropped back."""
    h, w = x.shape[-2:]
    size = getattr(model, "input_size", None)  # a model with a fixed input (an ONNX export) says which
    height, width = size(h, w) if size else (to_stride(h), to_stride(w))
    padded, top, left = pad_centred(x, height, width, (mirrored(h, crop), mirrored(w, crop)))
    padded = padded.contiguous(memory_format=torch.channels_last)  # oneDNN and cuDNN convolve NHWC fastest
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(padded)
    return logits[..., top:top + h, left:left + w].float()


FLIPS = ((), (-1,), (-2,), (-2, -1))


def forward_tta(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None,
                max_batch: int | None = None, crop: int | None = None) -> torch.Tensor:
    """Mean logits over the identity and the horizontal, vertical and double flips. The 4N flipped
    images go through the model in batches of `max_batch` (default all at once): flips fill a
    small batch (one tile: one forward of 4), without making a large one larger than the device
    handles well (on a CPU, 4 x 8 images of 512^2 in one pass cost more than 4 passes of 8)."""
    n = x.shape[0]
    flipped = torch.cat([x.flip(d) if d else x for d in FLIPS])
    step = max_batch or len(flipped)
    out = torch.cat([forward_padded(model, flipped[i:i + step], dtype, crop) for i in range(0, len(flipped), step)])
    parts = [out[k * n:(k + 1) * n] for k in range(len(FLIPS))]
    return sum(p.flip(d) if d else p for p, d in zip(parts, FLIPS)) / len(FLIPS)


def gaussian_weight(h: int, w: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(h, w) window weight: a Gaussian centred on the window, floored so edges still count."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (pos / (sigma_scale * n)) ** 2)

    weight = axis(h)[:, None] * axis(w)[None, :]
    return (weight / weight.max()).clamp_min(1e-3)


def window_starts(size: int, tile: int, step: int) -> list[int]:
    """Start offsets of windows of `tile` covering `size`; the last one ends at the border."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


@dataclass
class Prediction:
    """One image's result, at the image's own size.

    mask: softmax -> (H, W) class indices; sigmoid -> (C, H, W) bool.
    probs: (C, H, W) float32 probabilities when asked for (files keep float16, see writers).
    valid: (H, W) bool, False where the input was no-data (None when it has none).
    """

    mask: np.ndarray
    probs: np.ndarray | None = None
    valid: np.ndarray | None = None


Image = np.ndarray | ImageSource
HUGE_PIXELS = 1 << 26
"""Images above this many pixels are streamed from disk by window in predict_folder, never decoded whole."""


class Segmenter:
    """A trained model and its head, ready to predict arrays, files or folders.

    >>> seg = Segmenter.load("runs/nuclei/best")
    >>> result = seg.predict(image)          # image: (H, W, C) array of the model's bands, any type
    >>> result.mask                          # softmax: (H, W) indices; sigmoid: (C, H, W) bool
    >>> seg.predict_file("scene.tif", "out/")  # GeoTIFF in -> GeoTIFF masks on its grid
    """

    def __init__(self, model: nn.Module, head: Head, meta: dict, device: str | torch.device = "cpu",
                 amp: bool | str = "auto", tile: int = 1024, overlap: int = 128, tta: bool = False,
                 batch_size: int = 4) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()  # NHWC: ~30% faster on CPU too
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # folders repeat sizes: the autotuned kernels pay off
        self.head = head
        self.meta = meta
        self.dtype = amp_dtype(self.device, amp)
        if tile < STRIDE or tile % STRIDE:
            raise ValueError(f"tile: {tile} must be a multiple of {STRIDE}")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap: {overlap} must be at least 0 and smaller than the tile ({tile})")
        self.tile, self.overlap, self.tta, self.batch_size = tile, overlap, tta, batch_size
        self.in_channels = int(meta["in_channels"])
        self.norm = Normalization.from_meta(meta)
        data = meta.get("data") or {}
        self.bands, self.nodata = data.get("bands"), data.get("nodata")
        self.image_dtypes: list[str] | None = data.get("image_dtypes")
        self.crop: int | None = meta.get("crop")  # the training crop: how padding fills the border (`padding`)
        if self.crop is not None and (type(self.crop) is not int or self.crop < 1):
            raise SegkitError(f"model.json: crop {self.crop!r} is not a size in pixels (the training crop, which "
                              "decides how prediction pads). Fix: set it to the run's train.crop, or remove it.")
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", **options) -> Segmenter:
        """From a checkpoint folder (`best/`, `last/`): reads safetensors + JSON, never a pickle."""
        dev = resolve_device(device)
        if Path(checkpoint).suffix == ".onnx":  # an exported file: onnxruntime, metadata from the file
            model, head, meta = load_onnx(Path(checkpoint), dev)
        else:
            model, head, meta = load_checkpoint(Path(checkpoint), dev)
        return cls(model, head, meta, dev, **options)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    # -- inputs ------------------------------------------------------------------------

    def check_dtype(self, dtype: np.dtype, where: object) -> None:
        """Refuses an image type this model was not trained on (DataError naming `where`)."""
        self.norm.check_dtype(dtype, where, self.image_dtypes)

    def open(self, path: str | Path) -> ImageSource:
        """An image file as this model reads it: its training bands, channel count checked, no-data known."""
        return ImageSource.open(path, self.in_channels, self.bands, self.nodata)

    def source(self, image: Image) -> ImageSource:
        return image if isinstance(image, ImageSource) else ImageSource.from_array(image, self.in_channels, self.nodata)

    def to_input(self, images: Image | Sequence[Image], window: Window | None = None) -> torch.Tensor:
        """Normalised (N, C, H, W) float tensor on the device: one image or a list of same-size images
        (arrays (H, W[, C]) or sources), or a window of them. Per-image statistics, where the
        normalisation uses them, come from the whole image, not the window."""
        sources = [self.source(images)] if isinstance(images, (np.ndarray, ImageSource)) else [
            self.source(i) for i in images]
        pixels = [s.read(window) for s in sources]
        batch = np.stack(pixels)
        self.check_dtype(batch.dtype, sources[0].name)
        if batch.dtype in (np.uint16, np.uint32):
            batch = batch.astype(np.int64 if batch.dtype == np.uint32 else np.int32)  # torch lacks unsigned ops
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        masks = [s.nodata_mask(p) for s, p in zip(sources, pixels)]
        nodata = None
        if any(m is not None for m in masks):
            nodata = torch.from_numpy(np.stack([m if m is not None else np.zeros(p.shape[:2], bool)
                                                for m, p in zip(masks, pixels)]))[:, None].to(self.device)
        stats = outside = None
        if self.norm.per_sample:
            if self.norm.mode == "per_case" and any(s.params is None for s in sources):
                raise SegkitError(f"{sources[0].name}: a model trained on volume slices normalises each slice with "
                                  "its whole case's statistics, which a single image does not have. Fix: predict "
                                  "the volume (segkit.predict.predict_volume, or segkit predict on its file).")
            stats = torch.from_numpy(np.stack([s.stats() for s in sources])).to(self.device)
        if any(s.outside is not None for s in sources):
            outside = torch.from_numpy(np.stack([s.outside_mask(window) for s in sources]))[:, None].to(self.device)
        return self.norm.apply(x, stats, nodata, outside)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch (any size ≤ the tile), with TTA when enabled."""
        if self.tta:
            return forward_tta(self.model, x, self.dtype, max(self.batch_size, x.shape[0]), self.crop)
        return forward_padded(self.model, x, self.dtype, self.crop)

    def fits(self, image: Image) -> bool:
        """Whether an image goes through the network whole (else in windows)."""
        h, w = (image.height, image.width) if isinstance(image, ImageSource) else image.shape[:2]
        return max(h, w) <= self.tile

    @torch.inference_mode()
    def rows(self, image: Image) -> Iterator[tuple[int, torch.Tensor]]:
        """Blended logits (C, rows, W) of finished rows, top to bottom, windowed when larger than the tile."""
        src = self.source(image)
        if self.fits(src):
            yield 0, self.forward(self.to_input(src))[0]
        else:
            yield from self._bands(src)

    @torch.inference_mode()
    def logits(self, image: Image) -> torch.Tensor:
        """(C, H, W) float32 logits of one image, windowed when it is larger than the tile."""
        src = self.source(image)
        out = torch.empty(self.head.channels, src.height, src.width)
        for top, rows in self.rows(src):
            out[:, top:top + rows.shape[1]] = rows.cpu()
        return out

    # -- decoding ----------------------------------------------------------------------

    def decode(self, logits: torch.Tensor, probs: bool, valid: np.ndarray | None = None) -> Prediction:
        """(C, H, W) logits of one image -> its masks (and probabilities)."""
        mask = self.head.decode(logits[None])[0]
        if mask.dtype != torch.bool and self.head.channels <= 256:
            mask = mask.to(torch.uint8)  # on the device: a quarter of int32's bytes cross back
        mask = mask.cpu().numpy()
        p = self.head.activate(logits[None].float())[0].cpu().numpy() if probs else None
        return Prediction(mask, p, valid)

    def _valid_rows(self, src: ImageSource, top: int, n: int) -> np.ndarray | None:
        if src.nodata is None:
            return None
        hit = src.nodata_mask(src.read(Window(top, 0, n, src.width)))
        return None if hit is None or not hit.any() else ~hit

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[Image], probs: bool = False) -> list[Prediction]:
        """Predictions for images of one size not larger than the tile, in one forward pass."""
        sources = [self.source(i) for i in images]
        logits = self.forward(self.to_input(sources))
        return [self.decode(one, probs, self._valid_rows(s, 0, s.height)) for one, s in zip(logits, sources)]

    @torch.inference_mode()
    def predict(self, image: Image, probs: bool = False) -> Prediction:
        """One (H, W, C) or (H, W) image, or an opened file -> masks (and probabilities) at its own size."""
        src = self.source(image)
        if self.fits(src):
            return self.predict_batch([src], probs)[0]
        writer = _Collect(self.head, src, probs)
        self.predict_into(src, writer)
        return writer.prediction()

    @torch.inference_mode()
    def predict_into(self, image: Image, writer: MaskWriter | _Collect) -> None:
        """Decode rows as they are finished and hand them to `writer`: memory is bounded by the band of
        windows, not by the image (a GeoTIFF writer writes them straight to disk)."""
        src = self.source(image)
        for top, rows in self.rows(src):
            part = self.decode(rows, writer.probs, self._valid_rows(src, top, rows.shape[1]))
            writer.write_rows(top, part.mask, part.valid, part.probs)

    def predict_file(self, path: str | Path, output_dir: str | Path, probs: bool = False,
                     vectorize: bool = False, rel: Path | None = None) -> list[Path]:
        """Masks of one image file written under `output_dir`, mirroring its format (GeoTIFF for
        georeferenced rasters, PNG otherwise); returns the files written."""
        path, output_dir = Path(path), Path(output_dir)
        rel = rel or Path(path.name)
        with self.open(path) as src:
            self._stream_to_files(src, rel, output_dir, probs, vectorize)
        return [output_dir / f for f in output_files(self.head, rel, src.geometry, probs, vectorize)]

    def _stream_to_files(self, src: ImageSource, rel: Path, output_dir: Path, probs: bool, vectorize: bool) -> None:
        writer = writer_for(self.head, rel, output_dir, src.geometry, probs, vectorize)
        try:
            self.predict_into(src, writer)
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
        """Replace the decoding thresholds (sigmoid heads; softmax heads refuse)."""
        self.head = head_from_metadata({**self.head.metadata(), "thresholds": thresholds})

    def predict_stream(self, items: Iterable[tuple[Any, Image]], probs: bool = False
                       ) -> Iterator[tuple[Any, Prediction]]:
        """(key, image) in -> (key, prediction) out, in order; consecutive images of one size share
        a forward pass, images larger than the tile go through windows."""
        for batch in batches_by_shape(iter(items), self.batch_size, self.fits):
            if len(batch) == 1 and not self.fits(batch[0][1]):
                yield batch[0][0], self.predict(batch[0][1], probs)
                continue
            for (key, _), pred in zip(batch, self.predict_batch([image for _, image in batch], probs)):
                yield key, pred

    def predict_folder(self, input_dir: str | Path, output_dir: str | Path, probs: bool = False,
                       overwrite: bool = False, workers: int = 2, progress: bool = False,
                       vectorize: bool = False) -> FolderSummary:
        """Masks for every image under `input_dir`, mirrored under `output_dir`: PNG for plain images,
        GeoTIFF on the same grid for georeferenced rasters (+ GeoJSON polygons with `vectorize`).

        Unreadable files, and files whose outputs cannot be written (disk full, permissions), are
        reported and skipped; every other image is written. Images larger
        than HUGE_PIXELS are streamed by window from disk. Under torchrun each rank takes a
        disjoint share of the files.
        """
        input_dir, output_dir = Path(input_dir), Path(output_dir)
        files = plan_outputs(self.head, input_dir, output_dir, probs, overwrite, vectorize, self.in_channels,
                             self.bands, self.check_dtype)
        dist.barrier()  # every rank has checked for existing outputs before any rank writes
        mine = files[dist.rank()::dist.world_size()]
        began = time.perf_counter()
        summary = FolderSummary(images=0, seconds=0.0)
        reader = DataLoader(_ImageFiles([f for f, _ in mine], self.in_channels, self.bands, self.nodata),
                            batch_size=None, num_workers=workers, collate_fn=keep_arrays,
                            prefetch_factor=2 if workers else None)  # decoded images wait in shared memory
        items = _readable(reader, summary, self)
        bar = tqdm(total=len(mine), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
        unwritten = 0  # images read, then refused by the disk: the bar counted them already
        with ThreadPoolExecutor(max(1, workers)) as writers:
            pending: list[tuple[Path, Future]] = []
            for batch in batches_by_shape(items, self.batch_size, self.fits):
                if len(batch) == 1 and not self.fits(batch[0][1]):  # larger than the tile: rows straight out
                    path, src = batch[0]
                    try:
                        with src:
                            self._stream_to_files(src, path.relative_to(input_dir), output_dir, probs, vectorize)
                    except SegkitError as err:  # a damaged window or a refused write: reported, the others go on
                        log.error("skipped %s", err)
                        summary.failed.append((path, str(err)))
                        continue
                    done = [path]
                else:
                    preds = self.predict_batch([src for _, src in batch], probs)
                    for (path, src), pred in zip(batch, preds):
                        pending.append((path, writers.submit(_write_prediction, self.head, pred,
                                                             path.relative_to(input_dir), output_dir,
                                                             src.geometry, probs, vectorize)))
                    done = [path for path, _ in batch]
                summary.images += len(done)
                bar.update(len(done))
                while len(pending) > 4 * max(1, workers):
                    if not wait_written(*pending.pop(0), summary):
                        unwritten += 1
            for path, job in pending:
                if not wait_written(path, job, summary):
                    unwritten += 1
        bar.update(len(summary.failed) - unwritten)
        bar.close()
        summary.seconds = time.perf_counter() - began
        if dist.active():
            summary.images, summary.seconds = dist.all_reduce_sum([summary.images, summary.seconds], self.device)
            summary.images, summary.seconds = int(summary.images), summary.seconds / dist.world_size()
        return summary

    def _weight(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._weights:
            self._weights[(h, w)] = gaussian_weight(h, w).to(self.device)
        return self._weights[(h, w)]

    def _bands(self, src: ImageSource) -> Iterator[tuple[int, torch.Tensor]]:
        """Blended logits of finished rows, top to bottom: (first row, (C, rows, W) tensor).

        One band of windows at a time is read from the source and accumulated (logits x Gaussian
        weight) into a fixed buffer of tile rows; rows no later window touches are divided
        by their weight sum, handed out, and the unfinished rest moves to the top of the buffer.
        """
        h, w = src.shape
        th, tw = min(h, self.tile), min(w, self.tile)
        step = self.tile - self.overlap
        ys, xs = window_starts(h, th, step), window_starts(w, tw, step)
        weight = self._weight(th, tw)
        rows = th  # every band starts at buffer row 0 and spans th rows
        acc = torch.zeros(self.head.channels, rows, w, device=self.device)
        norm = torch.zeros(rows, w, device=self.device)
        top = 0
        for k, y in enumerate(ys):
            band = src.crop(Window(y, 0, th, w), self.norm.per_sample)  # whole-image statistics, as in training
            rows_in = self.to_input(band)  # the band crosses to the device once; windows are views of it
            for i in range(0, len(xs), self.batch_size):
                chunk = xs[i:i + self.batch_size]
                logits = self.forward(torch.cat([rows_in[..., x0:x0 + tw] for x0 in chunk]))
                for x0, out in zip(chunk, logits):
                    acc[:, y - top:y - top + th, x0:x0 + tw].addcmul_(out, weight)
                    norm[y - top:y - top + th, x0:x0 + tw] += weight
            end = ys[k + 1] if k + 1 < len(ys) else h
            done = end - top
            yield top, acc[:, :done] / norm[:done]
            keep = y + th - end
            if keep > 0:
                acc[:, :keep] = acc[:, done:done + keep].clone()
                norm[:keep] = norm[done:done + keep].clone()
            acc[:, max(keep, 0):].zero_()
            norm[max(keep, 0):].zero_()
            top = end


class _Collect:
    """Collects rows into one in-memory Prediction (Segmenter.predict of a large image)."""

    def __init__(self, head: Head, src: ImageSource, probs: bool) -> None:
        self.mask = np.empty(head.mask_shape(src.height, src.width), head.mask_dtype if head.channels <= 256
                             or head.mask_dtype is bool else np.int64)
        self.probs = probs
        self.prob = np.empty((head.channels, src.height, src.width), np.float32) if probs else None
        self.valid: np.ndarray | None = None
        self.shape = src.shape

    def write_rows(self, top: int, mask: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        n = mask.shape[-2]
        self.mask[..., top:top + n, :] = mask
        if self.prob is not None:
            self.prob[:, top:top + n] = probs
        if valid is not None:
            if self.valid is None:
                self.valid = np.ones(self.shape, bool)
            self.valid[top:top + n] = valid

    def prediction(self) -> Prediction:
        return Prediction(self.mask, self.prob, self.valid)


def batches_by_shape(items: Iterator[tuple[Any, np.ndarray]], size: int,
                     fits: Callable[[np.ndarray], bool]) -> Iterator[list[tuple[Any, np.ndarray]]]:
    """Group consecutive same-shape images into batches; images that do not `fit` go alone."""
    pending: list[tuple[Any, np.ndarray]] = []
    for item in items:
        image = item[1]
        if pending and (pending[0][1].shape != image.shape or len(pending) == size):
            yield pending
            pending = []
        if not fits(image):
            yield [item]
            continue
        pending.append(item)
    if pending:
        yield pending


@dataclass
class FolderSummary:
    """What a folder prediction did, images or volumes alike: inputs written (`images`; for volumes the cases,
    `unit` "volumes", with their `slices`), inputs that failed (file or case, reason), time."""

    images: int = 0
    seconds: float = 0.0
    failed: list[tuple[Path | str, str]] = field(default_factory=list)
    unit: str = "images"
    slices: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else 0.0

    def line(self, output_dir: Path | str) -> str:
        """The one line `segkit predict` ends with."""
        slices = f" ({self.slices} slices)" if self.slices else ""
        rate = (f"{self.seconds_per_image:.2f} s/{self.unit[:-1]}" if self.unit != "images"
                else f"{self.images_per_s:.2f} {self.unit}/s")
        return (f"{self.images} {self.unit}{slices} in {self.seconds:.1f} s ({rate}), {len(self.failed)} failed; "
                f"masks in {output_dir}")


def list_images(folder: Path, bands: Sequence[int | str] | None = None) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order; with `bands` naming band files, a
    folder holding a file for each is one image (`readers.is_band_folder`), not walked into.

    Links to folders are followed (data is often linked in), but each real folder is read once, and
    the folder's own subfolders before any link: a link loop (`loop -> .`, `a/b -> ..`) or a second
    link to a folder already read is skipped with a warning naming it, so the walk ends and no image
    is listed twice. A subfolder that cannot be read is skipped with a warning naming it and why;
    the folder itself unreadable is a DataError.
    """
    found: list[Path] = []
    names = band_names(bands)
    seen: set[tuple[int, int]] = set()
    folders: list[Path] = [folder]  # real subfolders: read first
    links: list[Path] = []  # links to folders, in the order met: read once every real folder is
    while folders or links:
        current = folders.pop() if folders else links.pop(0)
        try:
            info = current.stat()
            if (info.st_dev, info.st_ino) in seen:
                log.warning("%s: skipped: a link to %s, a folder already read (a loop of links, or a second "
                            "link to it); its images are listed once", current, current.resolve())
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                path = current / entry.name
                if names and entry.is_dir() and is_band_folder(path, names):
                    found.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_dir():
                    links.append(path)
                elif entry.is_file() and is_image(path):
                    found.append(path)
        except OSError as err:
            if current == folder:
                raise system_error(folder, err) from None
            log.warning("%s: skipped: cannot read this folder (%s)", current, err.strerror or err)
    return sorted(found)


def _header(path: Path, channels: int, bands: Sequence[int] | None,
            check_dtype: Callable[[np.dtype, object], None] | None) -> tuple[Geometry | None, str | None]:
    """(geometry, misfit) from a file's header: bands or an image type the model does not take. An
    unreadable file gives (None, None) and is reported when it is read."""
    try:
        with open_raster(path, band_names(bands)) as r:
            try:
                check_channels(len(image_bands(r, bands)), channels, path)
                if check_dtype is not None:
                    check_dtype(pixel_dtype(r), path)
            except SegkitError as err:
                return r.geometry, str(err)
            return r.geometry, None
    except SegkitError:
        return None, None


def plan_outputs(head: Head, input_dir: Path, output_dir: Path, probs: bool, overwrite: bool,
                 vectorize: bool = False, channels: int | None = None, bands: Sequence[int] | None = None,
                 check_dtype: Callable[[np.dtype, object], None] | None = None) -> list[tuple[Path, list[Path]]]:
    """Input files and the outputs each will write; refuses anything that could lose data, and
    images whose bands or type do not fit the model (from their headers, before anything is written)."""
    if not input_dir.is_dir():
        raise SegkitError(f"{input_dir}: input folder not found.")
    check_output_folder(input_dir, output_dir)
    files = list_images(input_dir, bands)
    if not files:
        raise SegkitError(f"{input_dir}: no images ({', '.join(e.lstrip('.') for e in RASTER_EXTS)}) found.")
    plan, seen, misfits = [], {}, []
    for path in files:
        rel = path.relative_to(input_dir)
        geometry, misfit = _header(path, channels, bands, check_dtype)
        if misfit:
            misfits.append(misfit)
        if vectorize and (geometry is None or not geometry.georeferenced):
            raise SegkitError(f"{path}: --vectorize writes polygons in the image's CRS, and this image has none. "
                              "Fix: predict georeferenced rasters (GeoTIFF) only, or leave out --vectorize.")
        outs = output_files(head, rel, geometry, probs, vectorize)
        if outs[0] in seen:
            raise SegkitError(f"{path} and {seen[outs[0]]} would write the same mask {outs[0]}. "
                              "Fix: rename one of them (stems must be unique per folder).")
        seen[outs[0]] = path
        plan.append((path, outs))
    if misfits:
        raise SegkitError(misfit_message(misfits, len(files), "images"))
    refuse_existing(output_dir, (o for _, outs in plan for o in outs), overwrite)
    return plan


class _ImageFiles(Dataset):
    """Decodes images in DataLoader workers; a failure comes back as its message, not an exception.
    Huge images come back undecoded (None): the main process streams them by window."""

    def __init__(self, files: Sequence[Path], channels: int, bands: Sequence[int] | None,
                 nodata: float | None) -> None:
        self.files, self.channels, self.bands, self.nodata = list(files), channels, bands, nodata

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Path, np.ndarray | None, Geometry | None, float | None, str | None]:
        try:
            with ImageSource.open(self.files[i], self.channels, self.bands, self.nodata) as src:
                if src.height * src.width > HUGE_PIXELS:
                    return self.files[i], None, src.geometry, src.nodata, None
                # a tensor travels through shared memory; a numpy array would be pickled through a pipe
                return self.files[i], torch.from_numpy(np.ascontiguousarray(src.read())), src.geometry, src.nodata, None
        except SegkitError as err:
            return self.files[i], None, None, None, str(err)


def keep_arrays(item: Any) -> Any:
    """DataLoader collate that keeps numpy arrays as they are."""
    return item


def _readable(reader: Iterable, summary: FolderSummary, seg: Segmenter) -> Iterator[tuple[Path, ImageSource]]:
    for path, image, geometry, nodata, error in reader:
        if error is not None:
            log.error("skipped %s", error)
            summary.failed.append((path, error))
            continue
        if image is None:
            try:
                src = seg.open(path)
            except SegkitError as err:
                log.error("skipped %s", err)
                summary.failed.append((path, str(err)))
                continue
            yield path, src
        else:
            pixels = image.numpy() if isinstance(image, torch.Tensor) else image
            yield path, ImageSource.from_array(pixels, seg.in_channels, nodata, str(path), geometry)


def wait_written(path: Path | str, job: Future, summary: FolderSummary) -> bool:
    """Wait for one image's (or volume's) outputs; whether they were written. A write the system refused (disk
    full, permissions) is reported for that input, which no longer counts as done, and the others go on."""
    try:
        job.result()
    except SegkitError as err:
        log.error("skipped %s", err)
        summary.failed.append((path, str(err)))
        summary.images -= 1
        return False
    return True


def _write_prediction(head: Head, pred: Prediction, rel: Path, output_dir: Path, geometry: Geometry,
                      probs: bool, vectorize: bool) -> None:
    writer = writer_for(head, rel, output_dir, geometry, probs, vectorize)
    try:
        writer.write_rows(0, pred.mask, pred.valid, pred.probs)
        writer.close()
    except BaseException:
        writer.abort()
        raise
