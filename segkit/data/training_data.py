"""From a config to checked training and validation records: images (pairs of files) or volumes (slices of
cases). The one place that tells the two apart; everything after it is the same 2-D path."""

from __future__ import annotations

from dataclasses import dataclass, field

from segkit.config import Config
from segkit.data.dataset import PairReader, Record, fit_normalization, foreground_classes, scan
from segkit.data.normalize import Normalization
from segkit.data.splits import pair_reader, train_val_samples
from segkit.heads import Head

VOLUME_FOREGROUND = 1 / 3
"""nnU-Net's oversample_foreground_percent: a third of the crops is centred on foreground."""


@dataclass
class TrainingData:
    reader: object  # PairReader, or volume_slices.SliceReader: what reads records that are not cached
    train: list[Record]
    val: list[Record]
    norm: Normalization
    foreground: float
    meta: dict = field(default_factory=dict)  # model.json `data` entries of this kind of dataset
    description: str = "images"


def training_data(cfg: Config, head: Head, budget: int) -> TrainingData:
    """Records of the train and validation splits, cached while they fit `budget` bytes, and the input
    normalisation fitted on the training split."""
    if cfg.data.mask == "volume":
        return _volumes(cfg, head, budget)
    d, t = cfg.data, cfg.train
    reader: PairReader = pair_reader(d)
    train_samples, val_samples = train_val_samples(d, cfg.split_seed())
    per_image = d.normalize == "per_image"
    foreground = foreground_classes(head.classes) if t.foreground_oversample else []
    train = scan(train_samples, reader, head, cache=d.cache, budget=budget, per_image=per_image,
                 foreground=foreground)
    left = budget - sum(r.cached_bytes for r in train)
    val = scan(val_samples, reader, head, cache=d.cache, budget=max(0, left), per_image=per_image)
    norm = fit_normalization(d.normalize, train, reader, d.channels, d.mean, d.std, t.seed)
    return TrainingData(reader, train, val, norm, t.foreground_oversample or 0.0,
                        {"image_dtypes": sorted({str(r.dtype) for r in train})})


def _volumes(cfg: Config, head: Head, budget: int) -> TrainingData:
    from segkit.data.volume_slices import SliceReader, fit_spec, slice_records, train_val_cases, volume_dataset

    d, t = cfg.data, cfg.train
    ds = volume_dataset(d)
    train_cases, val_cases = train_val_cases(ds, d.val_fraction, cfg.split_seed())
    spec, norm = fit_spec(ds, train_cases, d, t.seed)
    reader = SliceReader(ds, spec, norm)
    budget = budget if d.cache else 0
    fg = foreground_classes(head.classes)
    train = slice_records(ds, train_cases, spec, head, reader, fg, budget)
    left = budget - sum(r.cached_bytes for r in train)
    val = slice_records(ds, val_cases, spec, head, reader, fg, max(0, left))
    foreground = VOLUME_FOREGROUND if t.foreground_oversample is None else t.foreground_oversample
    return TrainingData(reader, train, val, norm, foreground,
                        {"volume": spec.to_meta(), "train_cases": [c.name for c in train_cases],
                         "val_cases": [c.name for c in val_cases]},
                        f"slices along axis {spec.slice_axis} of {len(train_cases)} train / {len(val_cases)} val "
                        "cases")
