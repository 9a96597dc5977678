"""Validation during training: every validation image at full size through the Segmenter's own path,
counted per scoring unit as `segkit evaluate` reduces them; how often to validate; pictures for TensorBoard."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segkit import distributed as dist
from segkit.data.dataset import Pixels, Record, SegmentationDataset
from segkit.data.source import ImageSource
from segkit.data.transforms import eval_transform
from segkit.infer import Segmenter, batches_by_shape
from segkit.viz import overlay_picture

log = logging.getLogger("segkit")


@torch.inference_mode()
def validate(seg: Segmenter, loss_fn: nn.Module, dataset: SegmentationDataset, units: Sequence[str | None],
             batch_size: int = 8) -> tuple[float, dict[str | None, np.ndarray]]:
    """Valid-pixel-weighted mean loss and (C, 4) pixel counts per scoring unit (`units`: every
    `Sample.scored_in` of the whole validation set, the same list on every rank) over this rank's
    validation images, each at full size through the Segmenter's own path: same-size images share a
    forward pass, images larger than its tile go through windows. Counts stay on the device; one
    transfer at the end."""
    head, device = seg.head, seg.device
    seg.model.eval()
    unit_index = {u: i for i, u in enumerate(units)}
    counts = torch.zeros(len(units), head.channels, 4, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels = torch.zeros((), dtype=torch.int64, device=device)

    def score(logits: torch.Tensor, target: torch.Tensor, unit: Sequence[int]) -> None:
        nonlocal loss_sum, pixels
        n = head.target_multihot(target)[1].sum()  # ignored and padding pixels carry no loss
        loss_sum += loss_fn(logits.float(), target).double() * n
        pixels += n
        masks = head.decode(logits)
        if len(set(unit)) == 1:  # images (one pooled unit), or slices of one case: one count for the batch
            counts[unit[0]] += head.stats(masks, target)
            return
        for i, u in enumerate(unit):
            counts[u] += head.stats(masks[i:i + 1], target[i:i + 1])

    def items():
        for r in dataset.records:
            px = dataset.pixels(r, None)
            yield ((head.targets(px.labels, px.valid), unit_index[r.sample.scored_in]), _source(seg, r, px))

    for batch in batches_by_shape(items(), batch_size, seg.fits):
        if len(batch) == 1 and not seg.fits(batch[0][1]):
            (target, unit), src = batch[0]
            for top, rows in seg.rows(src):
                score(rows[None], target[..., top:top + rows.shape[1], :].to(device)[None], [unit])
            continue
        logits = seg.forward(seg.to_input([src for _, src in batch]))
        score(logits, torch.stack([t for (t, _), _ in batch]).to(device), [u for (_, u), _ in batch])
    loss_total, pixels = dist.all_reduce_sum([float(loss_sum), int(pixels)], device)
    counts = dist.all_reduce_tensor(counts.cpu(), device).numpy()
    return loss_total / max(1, pixels), dict(zip(units, counts))


def _source(seg: Segmenter, r: Record, px: Pixels) -> ImageSource:
    """A validation image as prediction reads it: with its own normalisation parameters (a volume slice: its
    case's) and, for a slice, the voxels outside the body."""
    return ImageSource.from_array(px.image, seg.in_channels, px.nodata, str(r.sample.image), params=r.norm_stats,
                                  outside=None if px.inside is None else ~px.inside)


def val_pictures(seg: Segmenter, dataset: SegmentationDataset, count: int = 3) -> list[tuple[str, np.ndarray]]:
    """Overlays of the first `count` validation images, for TensorBoard."""
    pictures = []
    for r in dataset.records[:count]:
        px = dataset.pixels(r, None)
        masks = seg.head.multihot(torch.from_numpy(seg.predict(_source(seg, r, px)).mask)[None])[0].numpy()
        pictures.append((r.sample.stem, overlay_picture(px.image, masks, seg.head.classes, seg.head.colors)))
    return pictures


def spaced_validation(val_seconds: float, epoch_seconds: float, main: bool, share: float = 0.1) -> int:
    """Epochs between validations so that validating costs at most `share` of training time."""
    every = max(1, math.ceil(val_seconds / max(share * epoch_seconds, 1e-9)))
    if every > 1 and main:
        log.info("validation takes %.1f s against %.1f s of training per epoch: validating every %d epochs "
                 "(and the last); set train.val_every to choose", val_seconds, epoch_seconds, every)
    return every


def validation_seconds(run, items: int = 8) -> float:
    """A whole validation of `run` (a `train.Run`), timed on up to `items` of its validation samples and
    scaled to all of them."""
    subset = run.data.val[:items]
    ds = SegmentationDataset(subset, run.data.reader, run.head, eval_transform(), run.data.norm)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda device: None)
    sync(run.device)
    began = time.perf_counter()
    validate(run.seg, run.loss_fn, ds, run.units, run.batch)
    sync(run.device)
    return (time.perf_counter() - began) * len(run.data.val) / max(1, len(subset))
