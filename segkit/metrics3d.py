"""Per-case 3-D scores in physical units: Dice, IoU and HD95 (mm), volumes (ml).

Volumes are scored case by case, not pooled like `segkit.metrics` does for 2-D tiles: a
clinical reader asks "how good is the liver on this scan", and one huge scan must not hide a
failed small one. Distances use the voxel spacing, so anisotropic scans (thick slices) are
measured in millimetres, not voxels. HD95 follows MONAI's `compute_hausdorff_distance(...,
percentile=95, directed=False)` so numbers compare with published ones; only the empty-case
rule differs (see EMPTY_RULE_3D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

METRICS_3D = ("dice", "iou", "hd95")

EMPTY_RULE_3D = (
    "per case and class, after ignored voxels are removed: if neither prediction nor truth contains "
    "the class, Dice, IoU and HD95 are NaN (the class is absent from the case, it is not scored and "
    "is left out of means and case counts); if exactly one contains it, Dice = IoU = 0 and HD95 = "
    "the diagonal of the volume's physical extent, sqrt(sum((n_i * spacing_i)^2)) mm, which is "
    "larger than any HD95 attainable on that grid, so a missed or hallucinated structure scores "
    "worse than any detection while the mean stays finite (MONAI would give inf here)"
)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion by the face-connected (6-neighbour in 3-D,
    4 in 2-D) structuring element, i.e. voxels with a background face neighbour.

    Face connectivity is SciPy's `binary_erosion` default, which MONAI's `get_mask_edges`
    uses, so HD95 matches MONAI. Outside the array counts as background, so a mask touching
    the border has a surface there.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from every surface voxel of `a` to the nearest surface voxel of `b`
    (voxel centres, Euclidean, scaled per axis by `spacing`): one directed half of HD95."""
    surface_b = surface(b)
    if not surface_b.any():
        raise ValueError("b is empty: there is no surface to measure to")
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=tuple(float(s) for s in spacing))
    return to_b[surface(a)]


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of a | b, so the distance transform costs memory for
    the structures, not the whole scan. Surfaces and distances are unchanged: everything cut
    away is background, which is what the erosion assumes past the array edge."""
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(a | b))
    return a[box], b[box]


def _diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm, as MONAI computes it:

        max(P95(d(S_pred -> S_truth)), P95(d(S_truth -> S_pred)))

    where S_x = surface(x), d(S -> T) is the set of distances from each voxel of S to the
    nearest voxel of T (`surface_distances`), and P95 is the 95th percentile with linear
    interpolation between order statistics (numpy's default, same as MONAI's torch.quantile).
    Each directed set gets its own percentile before the max; the percentile of the pooled
    distances is a different number. Empty masks: see EMPTY_RULE_3D.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or len(spacing) != pred.ndim:
        raise ValueError(f"shapes {pred.shape}, {truth.shape} and spacing {tuple(spacing)} disagree")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred or has_truth):
        return math.nan
    if not (has_pred and has_truth):
        return _diagonal_mm(pred.shape, spacing)
    pred, truth = _crop_to_union(pred, truth)
    return float(max(np.percentile(surface_distances(pred, truth, spacing), 95),
                     np.percentile(surface_distances(truth, pred, spacing), 95)))


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def case_scores(pred: np.ndarray, truth: np.ndarray, classes: list[str], spacing: tuple[float, ...],
                multilabel: bool, valid: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Scores of one case, per class: dice, iou, hd95 (mm), truth/predicted voxels and ml.

    multilabel=False: `pred` and `truth` are integer label volumes and class k is label k
    (its position in `classes`, so label 0 is scored too; keep background out of the means by
    leaving it out of `summarize_cases`' classes). multilabel=True: (C, *spatial) boolean stacks, classes may overlap and
    are scored independently. `valid` (spatial shape, bool) removes ignored voxels from both
    masks before anything is counted or measured, so voxel counts, volumes, Dice, IoU and HD95
    all see the same voxels.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    spatial = pred.shape[1:] if multilabel else pred.shape
    if pred.shape != truth.shape or len(spacing) != len(spatial):
        raise ValueError(f"pred {pred.shape}, truth {truth.shape} and spacing {spacing} disagree")
    if multilabel and pred.shape[0] != len(classes):
        raise ValueError(f"{pred.shape[0]} channels for {len(classes)} classes")
    if valid is not None and np.shape(valid) != spatial:
        raise ValueError(f"valid {np.shape(valid)} does not match spatial shape {spatial}")
    keep = np.ones(spatial, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    voxel_ml = math.prod(spacing) / 1000.0
    scores = {}
    for k, name in enumerate(classes):
        p = (pred[k].astype(bool) if multilabel else pred == k) & keep
        t = (truth[k].astype(bool) if multilabel else truth == k) & keep
        tp = int(np.count_nonzero(p & t))
        n_pred, n_truth = int(np.count_nonzero(p)), int(np.count_nonzero(t))
        scores[name] = {
            "dice": _ratio(2 * tp, n_pred + n_truth),
            "iou": _ratio(tp, n_pred + n_truth - tp),
            "hd95": hd95(p, t, spacing),
            "truth_voxels": n_truth,
            "predicted_voxels": n_pred,
            "truth_ml": n_truth * voxel_ml,
            "predicted_ml": n_pred * voxel_ml,
        }
    return scores


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) of the non-NaN values; NaN for none, without numpy's
    all-NaN warnings."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))


def summarize_cases(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                    classes: Sequence[str]) -> dict:
    """Mean and std over cases per class and metric, NaN (unscored) cases left out.

    per_case maps case id -> `case_scores` output. `classes` picks and orders the classes
    summarised (drop background here if it should not count). `cases` per class is how many
    cases scored it (Dice, IoU and HD95 are NaN together, per EMPTY_RULE_3D); `mean` is the
    macro mean over the classes that have a score. Values are floats, NaN included: the
    writer makes them JSON-safe.
    """
    per_class = {}
    for name in classes:
        row: dict[str, float] = {}
        for metric in METRICS_3D:
            row[metric], row[f"{metric}_std"] = _mean_std([case[name][metric] for case in per_case.values()])
        row["cases"] = sum(not math.isnan(case[name]["dice"]) for case in per_case.values())
        per_class[name] = row
    return {
        "per_class": per_class,
        "mean": {metric: _mean_std([per_class[c][metric] for c in classes])[0] for metric in METRICS_3D},
        "cases": len(per_case),
        "empty_case_rule": EMPTY_RULE_3D,
    }
