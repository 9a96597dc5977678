"""Scoring a Segmenter against masks: the same predictions as `predict`, counted by the head."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segkit.data.dataset import PairReader
from segkit.data.layout import Sample
from segkit.data.source import ImageSource
from segkit.data.splits import checkpoint_data, eval_samples, pair_reader
from segkit.config import Config, load_config
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import is_volume_root
from segkit.errors import ConfigError, DataError, SegkitError
from segkit.evaluate_volumes import Observer, evaluate_volumes, format_volume_scores, volume_cases
from segkit.infer import Segmenter, keep_arrays
from segkit.metrics import summarize


class _Pairs(Dataset):
    """(image, target) per sample, read in DataLoader workers; failures come back as messages."""

    def __init__(self, samples: Sequence[Sample], reader: PairReader, seg: Segmenter) -> None:
        self.samples, self.reader, self.head = list(samples), reader, seg.head

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray | None, float | None, str | None]:
        try:
            px = self.reader.read(self.samples[i])
        except SegkitError as err:
            return None, None, None, str(err)
        problem = self.head.label_problem(px.labels, px.valid)  # e.g. overlapping labels for a softmax head
        if problem:
            return None, None, None, f"{self.samples[i].image}: {problem}"
        return self.head.targets(px.labels, px.valid), px.image, px.nodata, None


def samples_for(seg: Segmenter, root: Path, split: str, config: Config | None = None
                ) -> tuple[list[Sample], PairReader]:
    """The samples of one split of `root` and the reader for their masks: the config's data section
    when given, else the encoding the checkpoint was trained on."""
    if config is not None:
        cfg, seed = config.data, config.split_seed()
        if cfg.classes != seg.classes:
            raise SegkitError(f"--config: data.classes {cfg.classes} differ from the checkpoint's {seg.classes}.")
    else:
        cfg, seed = checkpoint_data(seg.meta, root)
    return eval_samples(cfg, split, seed), pair_reader(cfg)


def background_classes(classes: Sequence[str]) -> list[str]:
    """Classes named background (any case): what --exclude-background leaves out of the mean."""
    found = [c for c in classes if c.lower() == "background"]
    if not found:
        raise SegkitError(f"--exclude-background: no class is named 'background' in {list(classes)}.")
    return found


def evaluate(seg: Segmenter, samples: Sequence[Sample], reader: PairReader, exclude: Sequence[str] = (),
             workers: int = 2, progress: bool = False,
             observe: Observer | None = None) -> dict:
    """Dataset-level scores of `seg` on `samples`: per class, macro mean, micro; confusion for softmax.

    `observe(probs, decoded, truth, valid)` sees every image's float32 probabilities (C, H, W), its decoded
    and true classes (C, H, W) bool and its scored pixels (H, W), for analyses such as calibration, without
    a second pass over the data.
    """
    head = seg.head
    counts = torch.zeros(head.channels, 4, dtype=torch.int64)
    confusion: np.ndarray | None = None
    failed: list[str] = []
    loader = DataLoader(_Pairs(samples, reader, seg), batch_size=None, num_workers=workers, collate_fn=keep_arrays)

    def readable():
        for target, image, nodata, error in loader:
            if error is not None:
                failed.append(error)
                continue
            yield target, ImageSource.from_array(image, seg.in_channels, nodata)

    began = time.perf_counter()
    n = 0
    for target, pred in tqdm(seg.predict_stream(readable(), probs=observe is not None), total=len(samples),
                             desc="evaluate",
                             disable=not progress, dynamic_ncols=True):
        mask, truth = torch.from_numpy(pred.mask)[None], target[None]
        counts += head.stats(mask, truth)
        conf = head.confusion(mask, truth)
        if conf is not None:
            confusion = conf if confusion is None else confusion + conf
        if observe is not None:
            labels, valid = head.target_multihot(truth)
            observe(pred.probs, head.multihot(mask)[0].numpy(), labels[0].numpy(), valid[0].numpy())
        n += 1
    if failed:
        raise DataError(f"{len(failed)} of {len(samples)} samples could not be read, no scores written:\n  "
                        + "\n  ".join(failed[:10]))
    result = summarize(counts.numpy(), head.classes, exclude)
    result.update(reducer="pooled", images=n, head=head.name, seconds=time.perf_counter() - began,
                  background_in_mean=any(c.lower() == "background" for c in result["classes_in_mean"]))
    if confusion is not None:
        result["confusion_matrix"] = {"rows": "truth", "columns": "prediction", "classes": head.classes,
                                      "counts": confusion.tolist()}
    if head.thresholds is not None:
        result["thresholds"] = dict(zip(head.classes, head.thresholds))
    return result


def evaluate_split(seg: Segmenter, root: Path | str, split: str, config: Config | Path | None = None,
                   exclude: Sequence[str] = (), workers: int = 2, progress: bool = False,
                   observe: Observer | None = None) -> dict:
    """Scores of `seg` on one split of the dataset at `root`, by the rule of its data: images pooled over the
    split (`evaluate`), a model trained on volume slices case by case (`evaluate_volumes`). Image masks are
    read as `config`'s data section says (a Config, or a config file read with data.root = `root`), else as
    the checkpoint was trained; a volume dataset's labels always as its dataset.json says."""
    root = Path(root)
    if VolumeSpec.from_meta(seg.meta) is not None:
        if config is not None and (not isinstance(config, Config) or config.data.mask != "volume"):
            raise ConfigError("--config: a volume model reads labels as its dataset.json (or, in segkit's layout, "
                              "its model.json classes) says. Fix: leave out --config.")
        ds, cases = volume_cases(seg, root, split)
        return evaluate_volumes(seg, ds, cases, exclude, progress, observe)
    if is_volume_root(root):
        raise SegkitError(f"{root}: a volume dataset (NIfTI), but this checkpoint was trained on 2-D images "
                          "(its model.json has no data.volume). Fix: train on this dataset (data.root: "
                          f"{root}) and evaluate that checkpoint.")
    if config is not None and not isinstance(config, Config):
        config = load_config(config, [f"data.root={root}"])
    samples, reader = samples_for(seg, root, split, config)
    return evaluate(seg, samples, reader, exclude, workers, progress, observe)


def format_result(result: dict) -> str:
    """The terminal table of `evaluate_split`'s result, by its reducer: pooled over images, or per case."""
    return format_volume_scores(result) if result["reducer"] == "per_case" else format_scores(result)


def _fmt(v: float) -> str:
    return "   n/a" if isinstance(v, float) and math.isnan(v) else f"{v:6.4f}"


def format_scores(result: dict) -> str:
    """The terminal table: per class, then macro mean and micro, then the rules used."""
    classes = list(result["per_class"])
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'prec.':>6}  {'recall':>6}  {'truth px':>11}  {'pred px':>11}"]
    for c in classes:
        s = result["per_class"][c]
        lines.append(f"{c:<{width}}  {_fmt(s['iou'])}  {_fmt(s['dice'])}  {_fmt(s['precision'])}  "
                     f"{_fmt(s['recall'])}  {s['truth_pixels']:>11}  {s['predicted_pixels']:>11}")
    m, u = result["mean"], result["micro"]
    lines.append(f"{'mean (macro)':<{width}}  {_fmt(m['iou'])}  {_fmt(m['dice'])}")
    lines.append(f"{'micro':<{width}}  {_fmt(u['iou'])}  {_fmt(u['dice'])}")
    lines.append(f"\n{result['images']} images; mean = unweighted average over classes {result['classes_in_mean']}"
                 f" (background {'included' if result['background_in_mean'] else 'not included'}); "
                 "micro = ratios of pixel counts summed over those classes.")
    lines.append(f"empty-class rule: {result['empty_class_rule']}.")
    if "confusion_matrix" in result:
        cm = result["confusion_matrix"]
        lines.append("\nconfusion matrix (rows = truth, columns = prediction, pixels):")
        cw = max(8, *(len(c) for c in classes))
        lines.append(" " * (width + 2) + " ".join(f"{c[:cw]:>{cw}}" for c in classes))
        for c, row in zip(classes, cm["counts"]):
            lines.append(f"{c:<{width}}  " + " ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
