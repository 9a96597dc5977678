"""Per-class IoU / Dice / precision / recall from pixel counts, with an explicit empty-class rule.

Images: counts are summed over the whole dataset before dividing (dataset-level scores), so
small images do not weigh more than large ones. Volumes: counts are summed per case, each case
scored, then the scores averaged over cases (`summarize_units`), as `segkit.metrics3d` reports
them. The head decides how pixels are counted (`Head.stats`); this module only divides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

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


def summarize_units(counts: Mapping[str | None, np.ndarray], classes: Sequence[str]) -> dict:
    """Validation scores from (C, 4) counts per scoring unit (`Sample.scored_in`), reduced as `segkit
    evaluate` reports them, so best/ is chosen by the number evaluate gives: one unit None (images) is
    pooled (`summarize`); cases are scored one by one, a class absent from a case left out (NaN, the 3-D
    empty-case rule), then averaged over cases per class and over classes."""
    if list(counts) == [None]:
        return summarize(counts[None], classes)
    per_case = [{name: class_scores(*c[:3]) for name, c in zip(classes, np.asarray(n).tolist())}
                for n in counts.values()]
    per_class = {name: {metric: _nanmean(case[name][metric] for case in per_case) for metric in ("dice", "iou")}
                 for name in classes}
    return {"per_class": per_class,
            "mean": {metric: _nanmean(per_class[c][metric] for c in classes) for metric in ("dice", "iou")},
            "cases": len(per_case)}


def validation_rule(units: Sequence[str | None]) -> str:
    """How `summarize_units` reduces these units, in words (the training log says it)."""
    if list(units) == [None]:
        return f"dataset-level per-class IoU/Dice (as segkit evaluate reports images); {EMPTY_RULE}"
    return (f"per-class IoU/Dice of each of the {len(units)} validation cases, averaged over cases (as segkit "
            "evaluate reports volumes); a class absent from both prediction and truth of a case is left out of "
            "that case's mean")

