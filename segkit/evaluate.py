"""Scoring a Segmenter against masks: the same predictions as `predict`, counted by the head, then reduced by
the rule of the data: images pooled over the split (`evaluate`), volumes case by case
(`evaluate_volumes`).

Volumes: per case and class Dice, IoU and HD95 in mm (`segkit.metrics3d`), averaged over cases (a large scan
must not hide a failed small one). Truth classes come from the dataset's label values (`VolumeDataset.layers`):
sigmoid classes (nnU-Net regions overlap) are compared one binary mask per class; softmax classes as class
index maps. Voxels of the ignore label are left out, and for softmax also voxels whose value is in no class
(possible when data.classes selected classes without a background)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segkit.config import Config, load_config
from segkit.data.dataset import PairReader
from segkit.data.layout import Sample
from segkit.data.source import ImageSource
from segkit.data.splits import checkpoint_data, eval_samples, pair_reader
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import VolumeCase, VolumeDataset, is_volume_root
from segkit.errors import ConfigError, DataError, SegkitError
from segkit.infer import Segmenter, keep_arrays
from segkit.predict import VolumePrediction, check_channels, predict_volume, volume_spec
from segkit.metrics import summarize
from segkit.metrics3d import EMPTY_RULE_3D, case_scores, summarize_cases

log = logging.getLogger("segkit")


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


def _fmt(v: float, width: int = 6) -> str:
    return f"{'n/a':>{width}}" if isinstance(v, float) and math.isnan(v) else f"{v:{width}.4f}"


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


SPLITS = ("test", "val", "train")

Observer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
"""observe(probs, decoded, truth, valid): one image's or case's float32 probabilities (C, ...), decoded and
true classes (C, ...) bool, and the (...) bool items that are scored, as `metrics` counts them."""


def volume_cases(seg: Segmenter, root: Path | str, split: str) -> tuple[VolumeDataset, list[VolumeCase]]:
    """The dataset at `root` read with the checkpoint's classes, and the labelled cases of `split`: test
    (imagesTs + labelsTs; segkit layout test/), train (every training case), val (the segkit layout's val/,
    else the seeded share of the training cases that training held back, from model.json's val_fraction and
    seed)."""
    spec, root = volume_spec(seg), Path(root)
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: a volume dataset has the splits {list(SPLITS)}. Fix: choose one.")
    if not is_volume_root(root):
        raise DataError(f"{root}: not a volume dataset (no dataset.json, no train/images/*.nii.gz), and this "
                        "checkpoint was trained on volume slices. Fix: give the dataset's folder (nnU-Net: the one "
                        "with dataset.json, imagesTr/, labelsTr/).")
    ignore = None if (root / "dataset.json").is_file() else spec.ignore_label  # a dataset.json names its own
    ds = replace(VolumeDataset.from_root(root, seg.classes, ignore), canonical=spec.canonical)
    if ds.class_values != spec.class_values:
        raise DataError(f"{root}: its classes are the label values {ds.class_values}, but the checkpoint was "
                        f"trained on {spec.class_values}. Fix: evaluate on data labelled as the training data.")
    if split == "val":
        from segkit.data.volume_slices import train_val_cases

        data = seg.meta.get("data") or {}
        cases = train_val_cases(ds, float(data.get("val_fraction", 0.2)), int(data.get("split_seed", data.get("seed", 0))))[1]
        trained = data.get("val_cases")
        if trained is not None and sorted(trained) != sorted(c.name for c in cases):
            log.warning("the val cases of %s %s differ from the ones training held back %s (another dataset?)",
                        root, [c.name for c in cases], trained)
    else:
        cases = ds.cases(split)
    unlabelled = [case.name for case in cases if case.label is None]
    if unlabelled:
        more = " ..." if len(unlabelled) > 5 else ""
        raise DataError(f"{root}: --split {split} has cases without labels ({unlabelled[:5]}{more}). "
                        "Fix: add their label files (nnU-Net: labelsTs/<case>.nii.gz), or score another split.")
    return ds, cases


def _index_map(masks: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z) uint8/uint16 class indices from exclusive per-class masks."""
    index = np.zeros(shape, np.min_scalar_type(max(len(masks) - 1, 1)))
    for k, mask in enumerate(masks):
        index[mask] = k
    return index


def score_case(pred: VolumePrediction, label: np.ndarray, ds: VolumeDataset, spec: VolumeSpec,
               spacing: tuple[float, ...], observe: Observer | None = None) -> dict[str, dict[str, float]]:
    """`metrics3d.case_scores` of one case's prediction against its label map."""
    layers, valid = ds.layers(label)
    if pred.nodata is not None:
        valid &= ~pred.nodata
    classes = list(spec.class_values)
    truth = np.moveaxis(layers, -1, 0).view(bool)
    if pred.masks is not None:
        decoded = pred.masks
        scores = case_scores(decoded, truth, classes, spacing, multilabel=True, valid=valid)
    else:
        valid &= layers.any(axis=-1)
        decoded = np.stack([pred.labels == value for value in spec.index_values()])
        scores = case_scores(_index_map(decoded, label.shape), _index_map(truth, label.shape), classes, spacing,
                             multilabel=False, valid=valid)
    if observe is not None:
        observe(pred.probs, decoded, truth, valid)
    return scores


def evaluate_volumes(seg: Segmenter, ds: VolumeDataset, cases: Sequence[VolumeCase], exclude: Sequence[str] = (),
                     progress: bool = False, observe: Observer | None = None) -> dict:
    """Per-case and mean 3-D scores of `seg` on `cases`; `exclude`d classes stay out of the macro mean. Cases
    that cannot be read are all reported together, and then nothing is scored. `observe` sees each case's
    float32 probabilities with its masks (see `Observer`)."""
    spec = volume_spec(seg)
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    spacing: dict[str, list[float]] = {}
    failed: list[str] = []
    began = time.perf_counter()
    for case in tqdm(cases, desc="evaluate", unit="volume", disable=not progress, dynamic_ncols=True):
        try:
            volume = ds.image(case)
            check_channels(volume, spec)
            label = ds.label_volume(case)
            ds.check_labels(case, label)
            pred = predict_volume(seg, volume, probs=observe is not None, probs_dtype=np.float32)
        except DataError as err:
            failed.append(str(err))
            continue
        per_case[case.name] = score_case(pred, label, ds, spec, volume.spacing, observe)
        spacing[case.name] = list(volume.spacing)
    if failed:
        raise DataError(f"{len(failed)} of {len(cases)} cases could not be scored, no scores written:\n  "
                        + "\n  ".join(failed[:10]))
    in_mean = [c for c in seg.classes if c not in exclude]
    result = summarize_cases(per_case, seg.classes)
    result.update(reducer="per_case", mean=summarize_cases(per_case, in_mean)["mean"], classes_in_mean=in_mean,
                  background_in_mean=any(c.lower() == "background" for c in in_mean), head=seg.head.name,
                  seconds=time.perf_counter() - began, per_case=per_case, case_spacing_mm=spacing)
    if seg.head.thresholds is not None:
        result["thresholds"] = dict(zip(seg.classes, seg.head.thresholds))
    return result


def format_volume_scores(result: dict) -> str:
    """The terminal table: per class the mean over cases, the macro mean, then every case's rows and the rules."""
    classes = list(result["per_class"])
    width = max(12, *(len(c) for c in classes))
    head = f"{'Dice':>7}  {'IoU':>7}  {'HD95 mm':>9}"
    lines = [f"{'class':<{width}}  {head}  {'Dice sd':>7}  {'HD95 sd':>9}  {'cases':>5}"]
    for c in classes:
        s = result["per_class"][c]
        lines.append(f"{c:<{width}}  {_fmt(s['dice'], 7)}  {_fmt(s['iou'], 7)}  {_fmt(s['hd95'], 9)}  "
                     f"{_fmt(s['dice_std'], 7)}  {_fmt(s['hd95_std'], 9)}  {s['cases']:>5}")
    m = result["mean"]
    lines.append(f"{'mean (macro)':<{width}}  {_fmt(m['dice'], 7)}  {_fmt(m['iou'], 7)}  {_fmt(m['hd95'], 9)}")
    names = list(result["per_case"])
    cw = max(8, *(len(n) for n in names)) if names else 8
    lines.append(f"\nper case:\n{'case':<{cw}}  {'class':<{width}}  {head}  {'truth ml':>10}  {'pred ml':>10}")
    for name in names:
        for c in classes:
            s = result["per_case"][name][c]
            lines.append(f"{name:<{cw}}  {c:<{width}}  {_fmt(s['dice'], 7)}  {_fmt(s['iou'], 7)}  "
                         f"{_fmt(s['hd95'], 9)}  {s['truth_ml']:>10.4g}  {s['predicted_ml']:>10.4g}")
    lines.append(f"\n{result['cases']} cases; a class's row is the mean (and sd) over the cases that score it; "
                 f"mean (macro) = unweighted average over classes {result['classes_in_mean']} (background "
                 f"{'included' if result['background_in_mean'] else 'not included'}). HD95 in mm from each case's "
                 "voxel spacing.")
    lines.append(f"empty-case rule: {EMPTY_RULE_3D}.")
    return "\n".join(lines)
