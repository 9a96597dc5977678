"""Reading image/mask pairs with checks, and the torch Dataset that feeds training.

Every training sample is cropped first: a seeded window is chosen from the image's size, and
only that window is decoded (from disk for streamed images, sliced for cached ones), then
augmented and normalised. A huge raster is never decoded whole per sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segkit.data.layout import Sample
from segkit.data.masks import MaskFormat
from segkit.data.normalize import Normalization, pixel_sample
from segkit.data.readers import Window, open_raster
from segkit.data.source import ImageSource
from segkit.data.transforms import Augment
from segkit.errors import DataError
from segkit.heads import Head

log = logging.getLogger("segkit")

ASPECT_TOLERANCE = 0.01


@dataclass
class LabelStats:
    """Pixel counts of one mask, for inspection and for the overlap check."""

    pixels: np.ndarray  # labelled pixels per class
    valid: int
    total: int
    multi: int  # valid pixels with more than one label
    unlabeled: int  # valid pixels with no label


@dataclass
class Pixels:
    """A window of a sample: raw image (h, w, C), multi-hot labels (h, w, K), valid (h, w), `real` (h, w):
    pixels that are not image no-data (no-data is also invalid), and for a volume slice `inside` (h, w): its
    voxels inside the body (`normalize.body`; None: every pixel)."""

    image: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    real: np.ndarray
    nodata: float | None = None
    inside: np.ndarray | None = None


@dataclass
class Cached:
    """A record's pixels kept in memory: the image in its stored type and the packed label bits."""

    image: np.ndarray
    bits: np.ndarray
    nodata: float | None


@dataclass
class Record:
    """A checked sample: its size and image type, and its pixels when the dataset caches it."""

    sample: Sample
    stats: LabelStats
    height: int
    width: int
    dtype: np.dtype
    image_bytes: int
    norm_stats: np.ndarray | None = None  # (4, C) parameters of a per-sample normalisation (per_image, per_case)
    cached: Cached | None = None
    points: tuple[np.ndarray, ...] = ()  # (n, 2) row/col of a few pixels per foreground class present

    @property
    def has_foreground(self) -> bool:
        return bool(self.points)

    @property
    def cached_bytes(self) -> int:
        return 0 if self.cached is None else self.cached.image.nbytes + self.cached.bits.nbytes


def _first_mask(sample: Sample):
    return sample.mask if not isinstance(sample.mask, dict) else next(iter(sample.mask.values()))


class PairReader:
    """Reads an image and its mask(s), whole or by window, matching their sizes."""

    def __init__(self, fmt: MaskFormat, channels: int, bands: Sequence[int] | None = None,
                 nodata: float | None = None, ignore_overlap: bool = False) -> None:
        self.fmt = fmt
        self.channels = channels
        self.bands = list(bands) if bands else None
        self.nodata = nodata
        self.ignore_overlap = ignore_overlap
        self._told_resize = False

    def image(self, sample: Sample) -> ImageSource:
        return ImageSource.open(sample.image, self.channels, self.bands, self.nodata)

    def _mask_shape(self, sample: Sample, h: int, w: int) -> tuple[int, int]:
        if sample.mask is None:
            raise DataError(f"{sample.image}: no mask. Fix: add one with the same stem to the masks folder.")
        where = _first_mask(sample)
        with open_raster(where) as r:
            mh, mw = r.shape
        if (mh, mw) != (h, w) and abs(mh / mw - h / w) > ASPECT_TOLERANCE * h / w:
            raise DataError(f"{where}: mask is {mw}x{mh} but its image {sample.image.name} is {w}x{h}, "
                            "another aspect ratio. Fix: save the mask at the image's size.")
        return mh, mw

    def labels(self, sample: Sample, h: int, w: int, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and valid mask at the image's size (h, w), or a window of them."""
        mh, mw = self._mask_shape(sample, h, w)
        if (mh, mw) == (h, w):
            labels, valid = self.fmt.read(sample.mask, window)
        else:
            if not self._told_resize:
                log.warning("%s: mask is %dx%d, image %dx%d; masks at another resolution are resized "
                            "(nearest neighbour) to their image (logged once)", _first_mask(sample), mw, mh, w, h)
                self._told_resize = True
            labels, valid = self.fmt.read(sample.mask)
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, -1)
            valid = cv2.resize(valid.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            if window is not None:
                t, l, wh, ww = window
                labels, valid = labels[t:t + wh, l:l + ww], valid[t:t + wh, l:l + ww]
        if self.ignore_overlap:
            valid = valid & (labels.sum(axis=2, dtype=np.int32) <= 1)
        return labels, valid

    def read(self, sample: Sample, window: Window | None = None) -> Pixels:
        with self.image(sample) as src:
            image = src.read(window)
            labels, valid = self.labels(sample, src.height, src.width, window)
            nodata = src.nodata_mask(image)
        real = np.ones(image.shape[:2], bool) if nodata is None else ~nodata
        return Pixels(image, labels, valid & real, real, src.nodata)


def label_stats(labels: np.ndarray, valid: np.ndarray) -> LabelStats:
    count = labels.sum(axis=2, dtype=np.int32)
    return LabelStats(
        pixels=(labels & valid[:, :, None]).reshape(-1, labels.shape[2]).sum(0, dtype=np.int64),
        valid=int(valid.sum()), total=int(valid.size),
        multi=int(((count > 1) & valid).sum()), unlabeled=int(((count == 0) & valid).sum()),
    )


POINTS_PER_CLASS = 64


def foreground_classes(classes: Sequence[str]) -> list[int]:
    """Indices of the classes foreground oversampling aims at: all but those named background."""
    return [i for i, c in enumerate(classes) if c.lower() != "background"]


def foreground_points(labels: np.ndarray, valid: np.ndarray, classes: Sequence[int], rng: np.random.Generator,
                      per_class: int = POINTS_PER_CLASS) -> tuple[np.ndarray, ...]:
    """A few seeded (row, col) pixels of each of `classes` present in an (h, w, K) label window, one array per
    class present: oversampling picks a class first, so a rare class is aimed at as often as a common one."""
    found = []
    for k in classes:
        where = np.flatnonzero(labels[:, :, k].astype(bool) & valid)
        if where.size:
            chosen = rng.choice(where, min(per_class, where.size), replace=False)
            found.append(np.stack(np.unravel_index(np.sort(chosen), valid.shape), axis=1).astype(np.int32))
    return tuple(found)


def cache_budget(mb: int | None) -> int:
    """Bytes the dataset may keep in memory: `mb`, or a quarter of the machine's RAM."""
    if mb is not None:
        return mb << 20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def scan(samples: Sequence[Sample], reader: PairReader, head: Head | None = None, cache: bool | str = False,
         threads: int = 4, budget: int | None = None, per_image: bool = False,
         foreground: Sequence[int] = ()) -> list[Record]:
    """Read and check every sample before anything is written.

    Masks are read whole (they are counted); images only by header unless they are cached:
    `cache` True caches all, "auto" caches samples in order while they fit `budget` bytes and
    streams the rest by window. All problems are reported together, each naming its file; with
    a head, masks the head cannot learn from (e.g. overlapping labels for softmax) are problems too.
    `foreground`: class indices whose pixels are recorded for foreground oversampling.
    """
    budget = cache_budget(None) if budget is None else budget

    def one(i: int) -> Record | str:
        sample = samples[i]
        try:
            with reader.image(sample) as src:
                h, w = src.shape
                nbytes = h * w * (src.channels or 1) * src.dtype.itemsize
                norm_stats = src.stats() if per_image else None
            labels, valid = reader.labels(sample, h, w)
        except DataError as err:
            return str(err)
        if head is not None:
            problem = head.label_problem(labels, valid)
            if problem:
                where = sample.mask if not isinstance(sample.mask, dict) else sample.image
                return f"{where}: {problem}"
        points = foreground_points(labels, valid, foreground, np.random.default_rng([i, 7])) if foreground else ()
        return Record(sample, label_stats(labels, valid), h, w, src.dtype, nbytes, norm_stats, points=points)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, range(len(samples))))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(samples)} samples cannot be used:\n  " + "\n  ".join(errors[:10]) + more)
    records = [r for r in results if isinstance(r, Record)]
    if cache:
        used = 0
        for r in records:
            need = r.image_bytes + r.height * r.width * ((len(r.stats.pixels) + 9) // 8)
            if cache is True or used + need <= budget:
                px = reader.read(r.sample)
                r.cached = Cached(px.image, pack(px), px.nodata)
                used += need
        streamed = sum(r.cached is None for r in records)
        if streamed:
            log.info("%d of %d images cached in memory (%.0f MB); %d read from disk by window (data.cache_mb)",
                     len(records) - streamed, len(records), used / 2**20, streamed)
    return records


def fit_normalization(mode: str, records: Sequence[Record], reader: PairReader, channels: int,
                      mean: Sequence[float] | None, std: Sequence[float] | None, seed: int = 0,
                      max_images: int = 64) -> Normalization:
    """The normalisation for `mode`, statistics from a seeded sample of at most `max_images`
    training images (a bounded pass, whatever the dataset's size)."""
    from segkit.data.normalize import fit

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), min(len(records), max_images), replace=False).tolist())

    def sampler(i: int, r: Record):
        def sample() -> np.ndarray:
            with reader.image(r.sample) as src:
                return pixel_sample(src.read, src.height, src.width, src.nodata, np.random.default_rng([seed, i]))
        return sample

    picked = set(chosen)
    sources = [(str(r.sample.image), r.dtype, sampler(i, r) if i in picked else (lambda: np.empty((0, channels))))
               for i, r in enumerate(records)]
    return fit(mode, sources, channels, mean, std)


def crop_window(height: int, width: int, size: int, rng: np.random.Generator) -> Window:
    """A uniformly placed window of at most size x size."""
    h, w = min(size, height), min(size, width)
    return Window(int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)


def centred_window(height: int, width: int, size: int, point: np.ndarray) -> Window:
    """A window of at most size x size centred on `point` (row, col), shifted to lie inside the image."""
    h, w = min(size, height), min(size, width)
    top = int(np.clip(point[0] - h // 2, 0, height - h))
    left = int(np.clip(point[1] - w // 2, 0, width - w))
    return Window(top, left, h, w)


def pack(px: Pixels) -> np.ndarray:
    """(h, w, ceil((C + 3) / 8)) uint8: the C label layers, 'valid', 'real' and 'inside', one bit each."""
    inside = px.real if px.inside is None else px.inside
    layers = np.concatenate([px.labels.astype(bool), px.valid[:, :, None], px.real[:, :, None], inside[:, :, None]],
                            axis=2)
    return np.packbits(layers, axis=2)


def unpack(bits: np.ndarray, classes: int, inside: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels (h, w, C) uint8, valid (h, w), real (h, w) and inside (h, w; None unless asked for) from
    `pack`'s bits."""
    layers = np.unpackbits(bits, axis=2, count=classes + 2 + inside)
    return (layers[:, :, :classes], layers[:, :, classes].astype(bool), layers[:, :, classes + 1].astype(bool),
            layers[:, :, classes + 2].astype(bool) if inside else None)


class Item(NamedTuple):
    """One training sample as the loader sends it: raw pixels in their stored type (C, h, w), the
    head's compact target, `real` (h, w) pixels (not no-data, not padding), the parameters (4, C) of a
    per-sample normalisation, the (contrast, brightness) jitter to apply, and for normalisations that zero
    the outside of a body the voxels `inside` it (h, w; else an empty tensor)."""

    image: torch.Tensor
    target: torch.Tensor
    real: torch.Tensor
    stats: torch.Tensor
    jitter: torch.Tensor
    inside: torch.Tensor


def to_network(item: Item, norm: Normalization, head: Head, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch of Items -> (normalised float input, full target) on the device: the bytes
    cross as stored (uint8 stays uint8, int16 int16), the arithmetic happens there, with the same
    `Normalization.apply` that prediction uses."""
    real = item.real.to(device, non_blocking=True)[:, None]
    stats = item.stats.to(device, non_blocking=True) if norm.per_sample else None
    outside = ~item.inside.to(device, non_blocking=True)[:, None] if item.inside.numel() else None
    x = norm.apply(item.image.to(device, non_blocking=True), stats, ~real, outside)
    jitter = item.jitter.to(device, non_blocking=True)[:, :, None, None, None]
    x = torch.where(real, x * jitter[:, 0] + jitter[:, 1], x)
    return x, head.expand_targets(item.target.to(device, non_blocking=True))


class SegmentationDataset(Dataset):
    """Training samples (`Item`), with per-sample seeded augmentation.

    `crop` set: a random window (crop / the smallest scale, so rescaling still fills the crop)
    is read, augmented and cropped; `crop` None: whole images, no augmentation (validation).
    Each sample's randomness comes from (seed, epoch, index), so a run is reproducible whatever
    the number of workers, and a resumed run augments as the original would.
    `foreground`: the share of samples replaced by a crop centred on a foreground pixel (nnU-Net's
    oversampling, 1/3 there): a record with foreground, then one of its classes, then one of its pixels.
    """

    def __init__(self, records: Sequence[Record], reader: PairReader, head: Head, transform: Augment,
                 norm: Normalization, crop: int | None = None, scale_low: float = 1.0, color: float = 0.0,
                 seed: int = 0, foreground: float = 0.0) -> None:
        self.records = list(records)
        self.reader = reader
        self.head = head
        self.transform = transform
        self.norm = norm
        self.window = int(np.ceil(crop / min(1.0, scale_low))) if crop else None
        self.color = color
        self.seed = seed
        self.epoch = 0
        self.classes = len(head.classes)
        self.foreground = foreground if crop else 0.0
        self.with_foreground = [i for i, r in enumerate(self.records) if r.has_foreground]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, r: Record, window: Window | None) -> Pixels:
        """A window (or all) of a record: sliced from the cache, else read from disk."""
        if r.cached is None:
            return self.reader.read(r.sample, window)
        image, bits = r.cached.image, r.cached.bits
        if window is not None:
            t, l, h, w = window
            image, bits = image[t:t + h, l:l + w], bits[t:t + h, l:l + w]
        labels, valid, real, inside = unpack(bits, self.classes, any(self.norm.body_only))
        return Pixels(image, labels, valid, real, r.cached.nodata, inside)

    def packed(self, r: Record, window: Window | None) -> tuple[np.ndarray, np.ndarray]:
        """(image, bits) of a window, without unpacking cached labels."""
        if r.cached is None:
            px = self.reader.read(r.sample, window)
            return px.image, pack(px)
        t, l, h, w = window or Window(0, 0, r.height, r.width)
        return r.cached.image[t:t + h, l:l + w], r.cached.bits[t:t + h, l:l + w]

    def __getitem__(self, i: int) -> Item:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, i]))
        if self.foreground and self.with_foreground and rng.random() < self.foreground:
            r = self.records[self.with_foreground[rng.integers(len(self.with_foreground))]]
            points = r.points[rng.integers(len(r.points))]
            window = centred_window(r.height, r.width, self.window, points[rng.integers(len(points))])
        else:
            r = self.records[i]
            window = crop_window(r.height, r.width, self.window, rng) if self.window else None
        image, bits = self.transform(*self.packed(r, window), rng, self.classes)
        body_only = any(self.norm.body_only)
        labels, valid, real, inside = unpack(np.ascontiguousarray(bits), self.classes, body_only)
        jitter = (1.0, 0.0)
        if self.color and rng.random() < self.color:  # light contrast/brightness jitter, in normalised units
            jitter = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.25, 0.25)))
        stats = r.norm_stats if r.norm_stats is not None else np.zeros((4, image.shape[2]), np.float32)
        return Item(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                    self.head.compact_targets(labels, valid), torch.from_numpy(real), torch.from_numpy(stats),
                    torch.tensor(jitter, dtype=torch.float32),
                    torch.from_numpy(inside) if body_only else torch.empty(0, dtype=torch.bool))
