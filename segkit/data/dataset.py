"""Reading image/mask pairs with checks, and the torch Dataset that feeds training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segkit.data.io import read_image, to_unit_float
from segkit.data.layout import Sample
from segkit.data.masks import MaskFormat
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
class Record:
    """A checked sample; arrays are kept when the dataset is cached in memory."""

    sample: Sample
    stats: LabelStats
    image: np.ndarray | None = None
    labels: np.ndarray | None = None
    valid: np.ndarray | None = None


class PairReader:
    """Reads an image and its mask(s) into (image, labels, valid), matching their sizes."""

    def __init__(self, fmt: MaskFormat, channels: int, ignore_overlap: bool = False) -> None:
        self.fmt = fmt
        self.channels = channels
        self.ignore_overlap = ignore_overlap
        self._told_resize = False

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = read_image(sample.image, self.channels)
        if sample.mask is None:
            raise DataError(f"{sample.image}: no mask. Fix: add one with the same stem to the masks folder.")
        labels, valid = self.fmt.read(sample.mask)
        h, w = image.shape[:2]
        if labels.shape[:2] != (h, w):
            mh, mw = labels.shape[:2]
            where = sample.mask if not isinstance(sample.mask, dict) else next(iter(sample.mask.values()))
            if abs(mh / mw - h / w) > ASPECT_TOLERANCE * h / w:
                raise DataError(f"{where}: mask is {mw}x{mh} but its image {sample.image.name} is {w}x{h}, "
                                "another aspect ratio. Fix: save the mask at the image's size.")
            if not self._told_resize:
                log.warning("%s: mask is %dx%d, image %dx%d; masks at another resolution are resized "
                            "(nearest neighbour) to their image (logged once)", where, mw, mh, w, h)
                self._told_resize = True
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, -1)
            valid = cv2.resize(valid.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        if self.ignore_overlap:
            valid = valid & (labels.sum(axis=2, dtype=np.int32) <= 1)
        return image, labels, valid


def label_stats(labels: np.ndarray, valid: np.ndarray) -> LabelStats:
    count = labels.sum(axis=2, dtype=np.int32)
    return LabelStats(
        pixels=(labels & valid[:, :, None]).reshape(-1, labels.shape[2]).sum(0, dtype=np.int64),
        valid=int(valid.sum()), total=int(valid.size),
        multi=int(((count > 1) & valid).sum()), unlabeled=int(((count == 0) & valid).sum()),
    )


def scan(samples: Sequence[Sample], reader: PairReader, head: Head | None = None, cache: bool = False,
         threads: int = 4) -> list[Record]:
    """Read and check every sample before anything is written.

    All problems are reported together, each naming its file; with a head, masks the
    head cannot learn from (e.g. overlapping labels for softmax) are problems too.
    """

    def one(sample: Sample) -> Record | str:
        try:
            image, labels, valid = reader.read(sample)
        except DataError as err:
            return str(err)
        if head is not None:
            problem = head.label_problem(labels, valid)
            if problem:
                where = sample.mask if not isinstance(sample.mask, dict) else sample.image
                return f"{where}: {problem}"
        stats = label_stats(labels, valid)
        return Record(sample, stats, image, labels, valid) if cache else Record(sample, stats)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, samples))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(samples)} samples cannot be used:\n  " + "\n  ".join(errors[:10]) + more)
    return [r for r in results if isinstance(r, Record)]


class SegmentationDataset(Dataset):
    """Image tensors (C, H, W) normalised, and head targets, with per-sample seeded augmentation.

    Each sample's randomness comes from (seed, epoch, index), so a run is reproducible
    whatever the number of workers, and a resumed run augments as the original would.
    """

    def __init__(self, records: Sequence[Record], reader: PairReader, head: Head, transform: A.Compose,
                 seed: int = 0) -> None:
        self.records = list(records)
        self.reader = reader
        self.head = head
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.records[i]
        if r.image is not None:
            return r.image, r.labels, r.valid
        return self.reader.read(r.sample)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels, valid = self.load(i)
        stack = np.concatenate([labels, valid[:, :, None].astype(np.uint8)], axis=2)
        self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
        out = self.transform(image=to_unit_float(image), mask=stack)
        stack = out["mask"]
        target = self.head.targets(np.ascontiguousarray(stack[:, :, :-1]), stack[:, :, -1].astype(bool))
        return torch.from_numpy(out["image"].transpose(2, 0, 1).copy()), target
