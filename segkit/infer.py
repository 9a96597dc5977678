"""Prediction: whole images padded to the network stride, big images in blended windows, TTA.

All blending (overlapping windows, flips) happens on logits; the head activates and
decodes once, afterwards. Big images are processed one band of windows at a time, so
working memory grows with the image width and the tile, not with the image area.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segkit import distributed as dist
from segkit.data.io import is_image, read_image, write_bytes, write_png
from segkit.device import amp_dtype, resolve_device
from segkit.errors import SegkitError
from segkit.heads import Head, head_from_metadata
from segkit.model import load_checkpoint

log = logging.getLogger("segkit")

STRIDE = 32
"""Input sizes must be multiples of this (five 2x downsamplings in the encoders segkit builds)."""


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> tuple[torch.Tensor, int, int]:
    """Pad (N, C, H, W) at the bottom/right to multiples of `stride`: reflect where the image is
    big enough, replicate otherwise (tiny images). Returns the padded batch and the original H, W."""
    h, w = x.shape[-2:]
    ph, pw = -h % stride, -w % stride
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


def forward_padded(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits (N, C, H, W) of a normalised batch of any size: pad to the stride, run, crop back."""
    padded, h, w = pad_to_stride(x)
    if x.device.type == "cuda":
        padded = padded.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(padded)
    return logits[..., :h, :w].float()


def forward_tta(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean logits over the identity and the horizontal, vertical and double flips."""
    total = torch.zeros(())
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = x.flip(dims) if dims else x
        out = forward_padded(model, flipped, dtype)
        total = total + (out.flip(dims) if dims else out)
    return total / 4


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
    probs: (C, H, W) float16 probabilities when asked for.
    """

    mask: np.ndarray
    probs: np.ndarray | None = None


class Segmenter:
    """A trained model and its head, ready to predict arrays or folders.

    >>> seg = Segmenter.load("runs/nuclei/best")
    >>> result = seg.predict(image)          # image: (H, W, C) uint8/uint16/float array
    >>> result.mask                          # softmax: (H, W) indices; sigmoid: (C, H, W) bool
    """

    def __init__(self, model: nn.Module, head: Head, meta: dict, device: str | torch.device = "cpu",
                 amp: bool | str = "auto", tile: int = 1024, overlap: int = 128, tta: bool = False,
                 batch_size: int = 4) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head = head
        self.meta = meta
        self.dtype = amp_dtype(self.device, amp)
        if tile < STRIDE or tile % STRIDE:
            raise ValueError(f"tile: {tile} must be a multiple of {STRIDE}")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap: {overlap} must be at least 0 and smaller than the tile ({tile})")
        self.tile, self.overlap, self.tta, self.batch_size = tile, overlap, tta, batch_size
        self.in_channels = int(meta["in_channels"])
        self._mean = torch.tensor(meta["mean"], device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(meta["std"], device=self.device).view(1, -1, 1, 1)
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", **options) -> Segmenter:
        """From a checkpoint folder (`best/`, `last/`): reads safetensors + JSON, never a pickle."""
        dev = resolve_device(device)
        model, head, meta = load_checkpoint(Path(checkpoint), dev)
        return cls(model, head, meta, dev, **options)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    # -- tensors -----------------------------------------------------------------------

    def to_input(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised (N, C, H, W) float tensor on the device from one (H, W[, C]) array or a list of them."""
        batch = np.stack(images) if not isinstance(images, np.ndarray) else images[None]
        if batch.ndim == 3:  # grey (H, W) images
            batch = batch[..., None]
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(batch.dtype, 1.0)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(scale)
        if x.shape[1] != self.in_channels:
            x = x.mean(1, keepdim=True) if self.in_channels == 1 else x[:, :1].expand(-1, self.in_channels, -1, -1)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch (any size ≤ the tile), with TTA when enabled."""
        run = forward_tta if self.tta else forward_padded
        return run(self.model, x, self.dtype)

    @torch.inference_mode()
    def logits(self, image: np.ndarray) -> torch.Tensor:
        """(C, H, W) float32 logits of one image, windowed when it is larger than the tile."""
        if image.ndim == 2:
            image = image[:, :, None]
        h, w = image.shape[:2]
        out = torch.empty(self.head.channels, h, w)
        for top, rows in self._bands(image):
            out[:, top:top + rows.shape[1]] = rows.cpu()
        return out

    # -- decoding ----------------------------------------------------------------------

    def _decode(self, logits: torch.Tensor, probs: bool) -> Prediction:
        mask = self.head.decode(logits[None])[0].cpu().numpy()
        mask = mask.astype(np.uint8) if mask.dtype != bool and self.head.channels <= 256 else mask
        p = self.head.activate(logits[None])[0].half().cpu().numpy() if probs else None
        return Prediction(mask, p)

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray], probs: bool = False) -> list[Prediction]:
        """Predictions for images of one size not larger than the tile, in one forward pass."""
        logits = self.forward(self.to_input(images))
        return [self._decode(one, probs) for one in logits]

    @torch.inference_mode()
    def predict(self, image: np.ndarray, probs: bool = False) -> Prediction:
        """One (H, W, C) or (H, W) image -> masks (and probabilities) at its own size."""
        if image.ndim == 2:
            image = image[:, :, None]
        h, w = image.shape[:2]
        if h <= self.tile and w <= self.tile:
            return self.predict_batch([image], probs)[0]
        mask: np.ndarray | None = None
        prob_out = np.empty((self.head.channels, h, w), np.float16) if probs else None
        for top, rows in self._bands(image):
            part = self._decode(rows, probs)
            if mask is None:
                mask = np.empty(part.mask.shape[:-2] + (h, w), part.mask.dtype)
            mask[..., top:top + rows.shape[1], :] = part.mask
            if prob_out is not None:
                prob_out[:, top:top + rows.shape[1]] = part.probs
        return Prediction(mask, prob_out)

    def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
        """Replace the decoding thresholds (sigmoid heads; softmax heads refuse)."""
        self.head = head_from_metadata({**self.head.metadata(), "thresholds": thresholds})

    def fits(self, image: np.ndarray) -> bool:
        """Whether an image goes through the network whole (else in windows)."""
        return max(image.shape[:2]) <= self.tile

    def predict_stream(self, items: Iterable[tuple[Any, np.ndarray]], probs: bool = False
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
                       overwrite: bool = False, workers: int = 2, progress: bool = False) -> FolderSummary:
        """Masks for every image under `input_dir`, mirrored under `output_dir` (see DESIGN.md).

        Unreadable files are reported and skipped; every other image is written. Under
        torchrun each rank takes a disjoint share of the files.
        """
        input_dir, output_dir = Path(input_dir), Path(output_dir)
        files = plan_outputs(self.head, input_dir, output_dir, probs, overwrite)
        dist.barrier()  # every rank has checked for existing outputs before any rank writes
        mine = files[dist.rank()::dist.world_size()]
        began = time.perf_counter()
        summary = FolderSummary(images=0, seconds=0.0)
        reader = DataLoader(_ImageFiles([f for f, _ in mine], self.in_channels), batch_size=None,
                            num_workers=workers, collate_fn=keep_arrays,
                            prefetch_factor=8 if workers else None)
        items = _readable(reader, summary)
        bar = tqdm(total=len(mine), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
        with ThreadPoolExecutor(max(1, workers)) as writers:
            pending: list[Future] = []
            for path, pred in self.predict_stream(items, probs):
                rel = path.relative_to(input_dir)
                pending.append(writers.submit(_write_prediction, self.head, pred, rel, output_dir))
                summary.images += 1
                bar.update(1)
                if len(pending) > 4 * max(1, workers):
                    pending.pop(0).result()
            for job in pending:
                job.result()
        bar.update(len(summary.failed))
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

    def _bands(self, image: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Blended logits of finished rows, top to bottom: (first row, (C, rows, W) tensor).

        One band of windows at a time is accumulated (logits x Gaussian weight) into a fixed
        buffer of tile + step rows; rows no later window touches are divided by their weight
        sum, handed out, and the unfinished rest moves to the top of the buffer.
        """
        h, w = image.shape[:2]
        th, tw = min(h, self.tile), min(w, self.tile)
        step = self.tile - self.overlap
        ys, xs = window_starts(h, th, step), window_starts(w, tw, step)
        weight = self._weight(th, tw)
        rows = min(h, th + step)
        acc = torch.zeros(self.head.channels, rows, w, device=self.device)
        norm = torch.zeros(rows, w, device=self.device)
        top = 0
        for k, y in enumerate(ys):
            band = image[y:y + th]
            for i in range(0, len(xs), self.batch_size):
                chunk = xs[i:i + self.batch_size]
                logits = self.forward(self.to_input([band[:, x:x + tw] for x in chunk]))
                for x, out in zip(chunk, logits):
                    acc[:, y - top:y - top + th, x:x + tw].addcmul_(out, weight)
                    norm[y - top:y - top + th, x:x + tw] += weight
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
    """What a folder prediction did: images written, files that failed (path, reason), time."""

    images: int
    seconds: float
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def plan_outputs(head: Head, input_dir: Path, output_dir: Path, probs: bool, overwrite: bool
                 ) -> list[tuple[Path, list[Path]]]:
    """Input files and the outputs each will write; refuses anything that could lose data."""
    if not input_dir.is_dir():
        raise SegkitError(f"{input_dir}: input folder not found.")
    inp, outp = input_dir.resolve(), output_dir.resolve()
    if outp == inp or inp in outp.parents:
        raise SegkitError(f"{output_dir}: the output folder is inside the input folder {input_dir}; "
                          "masks would mix with (and be read as) images. Fix: choose an output folder outside it.")
    files = list_images(input_dir)
    if not files:
        raise SegkitError(f"{input_dir}: no images (png, jpg, tif, bmp, gif) found.")
    plan, seen = [], {}
    for path in files:
        rel = path.relative_to(input_dir)
        outs = head.file_names(rel) + ([rel.with_suffix(".npy")] if probs else [])
        if outs[0] in seen:
            raise SegkitError(f"{path} and {seen[outs[0]]} would write the same mask {outs[0]}. "
                              "Fix: rename one of them (stems must be unique per folder).")
        seen[outs[0]] = path
        plan.append((path, outs))
    if not overwrite:
        existing = [output_dir / o for _, outs in plan for o in outs if (output_dir / o).exists()]
        if existing:
            raise SegkitError(f"{output_dir}: {len(existing)} outputs exist already (e.g. {existing[0]}). "
                              "Fix: --overwrite to replace them, or choose another output folder.")
    return plan


class _ImageFiles(Dataset):
    """Decodes images in DataLoader workers; a failure comes back as its message, not an exception."""

    def __init__(self, files: Sequence[Path], channels: int) -> None:
        self.files, self.channels = list(files), channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Path, np.ndarray | None, str | None]:
        try:
            return self.files[i], read_image(self.files[i], self.channels), None
        except SegkitError as err:
            return self.files[i], None, str(err)


def keep_arrays(item: Any) -> Any:
    """DataLoader collate that keeps numpy arrays as they are."""
    return item


def _readable(reader: Iterable, summary: FolderSummary) -> Iterator[tuple[Path, np.ndarray]]:
    for path, image, error in reader:
        if error is not None:
            log.error("skipped %s", error)
            summary.failed.append((path, error))
            continue
        yield path, image


def _write_prediction(head: Head, pred: Prediction, rel: Path, output_dir: Path) -> None:
    for path, arr, palette in head.mask_files(pred.mask, rel):
        write_png(output_dir / path, arr, palette)
    if pred.probs is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, pred.probs)
        write_bytes(output_dir / rel.with_suffix(".npy"), buf.getvalue())
