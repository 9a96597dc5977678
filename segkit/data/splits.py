"""From a data config to checked train/val/test samples."""

from __future__ import annotations

import logging
from pathlib import Path

from segkit.config import DataConfig
from segkit.data.dataset import PairReader
from segkit.data.layout import Pairing, Sample, find_pairs, seeded_split, split_dirs
from segkit.data.masks import MaskFormat, build_mask_format
from segkit.errors import DataError, SegkitError

log = logging.getLogger("segkit")


def mask_format(cfg: DataConfig) -> MaskFormat:
    return build_mask_format(cfg.mask, cfg.classes, cfg.ignore_index, cfg.foreground_value, cfg.colors,
                             cfg.binary_threshold)


def pair_reader(cfg: DataConfig) -> PairReader:
    return PairReader(mask_format(cfg), cfg.channels, cfg.bands, cfg.nodata, ignore_overlap=cfg.overlap == "ignore")


def _labelled(pairing: Pairing, where: str) -> list[Sample]:
    if pairing.unlabeled:
        names = ", ".join(str(p) for p in pairing.unlabeled[:5])
        more = f" and {len(pairing.unlabeled) - 5} more" if len(pairing.unlabeled) > 5 else ""
        raise DataError(f"{where}: {len(pairing.unlabeled)} images have no mask: {names}{more}. "
                        "Fix: add their masks (same stem) or move the images out of the folder.")
    if pairing.orphan_masks:
        log.warning("%s: %d masks match no image and are ignored (e.g. %s)", where,
                    len(pairing.orphan_masks), pairing.orphan_masks[0])
    if not pairing.samples:
        raise DataError(f"{where}: no image has a mask. Fix: masks pair with images by stem.")
    return pairing.samples


def split_samples(cfg: DataConfig, split: str) -> list[Sample]:
    """The labelled samples of one split ('train', 'val', 'test', or 'all' for a flat layout)."""
    pairing = find_pairs(cfg.root, split, cfg.classes, multilabel=cfg.mask == "multilabel", bands=cfg.bands)
    return _labelled(pairing, f"{Path(cfg.root)} [{split}]")


def train_val_samples(cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Train and validation samples: the val/ split if there is one, else a seeded share of train."""
    dirs = split_dirs(cfg.root)
    source = "train" if "train" in dirs else "all" if "all" in dirs else None
    if source is None:
        raise DataError(f"{cfg.root}: no train split (found {sorted(dirs)}). Fix: add train/images and train/masks.")
    train = split_samples(cfg, source)
    if "val" in dirs:
        return train, split_samples(cfg, "val")
    return seeded_split(train, cfg.val_fraction, seed)


def eval_samples(cfg: DataConfig, split: str, seed: int) -> list[Sample]:
    """Samples to score: a named split, or 'val' falling back to the seeded validation share."""
    dirs = split_dirs(cfg.root)
    if split in dirs:
        return split_samples(cfg, split)
    if split == "val":
        return train_val_samples(cfg, seed)[1]
    raise DataError(f"{cfg.root}: no '{split}' split (found {sorted(dirs)}). Fix: choose --split from those.")


def checkpoint_data(meta: dict, root: Path) -> tuple[DataConfig, int]:
    """The data section a checkpoint was trained with (model.json `data`), pointed at `root`,
    and the training seed: masks are then read, and a flat layout split, as in training."""
    d = meta.get("data")
    if not d:
        raise SegkitError("model.json has no `data` section (mask encoding). Fix: pass --config with the "
                          "data section that describes these masks.")
    cfg = DataConfig(root=root, classes=meta["classes"], mask=d["mask"], ignore_index=d.get("ignore_index"),
                     foreground_value=d.get("foreground_value"), binary_threshold=d.get("binary_threshold"),
                     colors=d.get("colors"), val_fraction=d.get("val_fraction", 0.2),
                     channels=int(meta["in_channels"]), bands=d.get("bands"), nodata=d.get("nodata"),
                     overlap=d.get("overlap", "error"))
    return cfg, int(d.get("split_seed", d.get("seed", 0)))  # "seed": checkpoints before split_seed
