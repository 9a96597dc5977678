"""Per-class IoU / Dice / precision / recall from pixel counts, with an explicit empty-class rule.

Counts are summed over the whole dataset before dividing (dataset-level scores), so
small images do not weigh more than large ones. The head decides how pixels are
counted (`Head.stats`); this module only divides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

EMPTY_RULE = ("a class absent from both prediction and truth over the whole set has no score (n/a) "
              "and is left out of the mean")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def class_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def _nanmean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def summarize(counts: np.ndarray, classes: Sequence[str], exclude: Sequence[str] = ()) -> dict:
    """Scores from (C, 4) counts tp, fp, fn, tn.

    mean = macro average over the classes (minus `exclude`) that have a score;
    micro = the same ratios on counts summed over those classes.
    """
    counts = np.asarray(counts, dtype=np.int64)
    per_class = {}
    for name, (tp, fp, fn, tn) in zip(classes, counts.tolist()):
        per_class[name] = {**class_scores(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                           "truth_pixels": tp + fn, "predicted_pixels": tp + fp}
    kept = [c for c in classes if c not in exclude]
    idx = [list(classes).index(c) for c in kept]
    tp, fp, fn = (int(counts[idx, k].sum()) for k in range(3))
    micro = class_scores(tp, fp, fn)
    return {
        "per_class": per_class,
        "mean": {"iou": _nanmean(per_class[c]["iou"] for c in kept),
                 "dice": _nanmean(per_class[c]["dice"] for c in kept)},
        "micro": {"iou": micro["iou"], "dice": micro["dice"]},
        "classes_in_mean": kept,
        "empty_class_rule": EMPTY_RULE,
    }
