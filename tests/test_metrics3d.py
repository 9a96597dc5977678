"""segkit.metrics3d: 3-D Dice, IoU, HD95 (mm) and volumes equal values worked out by hand on
small synthetic volumes of known geometry (isotropic and anisotropic spacing), the empty-case
rule gives its documented values, and HD95 equals a brute-force pairwise-distance computation
on random masks (property-based). All arrays are synthetic and tiny.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segkit.metrics3d import (EMPTY_RULE_3D, case_scores, hd95, summarize_cases, surface,
                              surface_distances)


def _cubes(shift_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Label volumes (20, 20, 20): truth cube [4, 10)^3, prediction the same cube moved by 2
    voxels along `shift_axis` (label 1 = cube, 0 = background)."""
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[4:10, 4:10, 4:10] = 1
    pred = np.roll(truth, 2, axis=shift_axis)
    return pred, truth


# Two 6x6x6 cubes, the second moved by 2 voxels along one axis ("z" below):
#   |A| = |B| = 216, |A n B| = 6*6*4 = 144
#   Dice = 2*144 / (216 + 216) = 2/3, IoU = 144 / (216 + 216 - 144) = 1/2.
# Surface of A (face connectivity) = 216 - 4^3 = 152 voxels. Their distance to B's surface:
#   z=4 face (36): nearest is B's bottom face z=6 straight across -> 2 * s_z
#   z=5 ring (20): B's bottom face z=6                              -> 1 * s_z
#   z=6..8 rings (60) and the z=9 ring (20): they lie on B's side faces -> 0
#   z=9 face interior (16, in-plane coords in {5..8}^2): inside B; the nearest B surface is a
#     side face min(dx, dy) voxels away in-plane (12 voxels at 1, the 4 with both coords in
#     {6, 7} at 2) unless B's top z=11 (2 * s_z) is nearer.
# With spacing (0.5, 0.5, 3.0) and the shift along z (3 mm):
#   0 mm x 80, 0.5 mm x 12, 1 mm x 4, 3 mm x 20, 6 mm x 36           (sum 152)
#   P95: position 0.95 * 151 = 143.45, sorted positions 116..151 are all 6 mm -> 6 mm.
#   B -> A is the mirror image (z -> -z), so HD95 = max(6, 6) = 6 mm = 2 voxels * 3 mm.
# With spacing (1, 1, 1): 0 x 80, 1 x 32 (20 + 12), 2 x 40 (36 + 4); positions 112..151 are 2
#   -> HD95 = 2 mm.
# Shift along x (0.5 mm) with (0.5, 0.5, 3.0): 0 x 80, 0.5 x 28 (20 + 8), 1.0 x 44 (36 + 8; the
#   x=9 interior face is 1 y-voxel (0.5) or 2 y-voxels/B's top (1.0) away, z-sides are >= 3 mm)
#   -> positions 108..151 are 1.0 -> HD95 = 1.0 mm = 2 voxels * 0.5 mm.
@pytest.mark.parametrize("spacing, axis, expected_hd95", [
    ((1.0, 1.0, 1.0), 2, 2.0),
    ((0.5, 0.5, 3.0), 2, 6.0),
    ((0.5, 0.5, 3.0), 0, 1.0),
])
def test_shifted_cubes_dice_iou_hd95_and_volumes(spacing, axis, expected_hd95):
    pred, truth = _cubes(axis)
    cube = case_scores(pred, truth, ["background", "cube"], spacing, multilabel=False)["cube"]
    assert cube["dice"] == pytest.approx(2 / 3)
    assert cube["iou"] == pytest.approx(1 / 2)
    assert cube["hd95"] == pytest.approx(expected_hd95)
    assert cube["truth_voxels"] == cube["predicted_voxels"] == 216
    # 216 voxels * prod(spacing) mm^3 / 1000 -> ml
    assert cube["truth_ml"] == cube["predicted_ml"] == pytest.approx(216 * math.prod(spacing) / 1000)


def test_shifted_cubes_directed_distance_distribution_anisotropic():
    pred, truth = _cubes(2)
    d = surface_distances(truth == 1, pred == 1, (0.5, 0.5, 3.0))
    values, counts = np.unique(d, return_counts=True)
    # the hand count in the comment above
    assert values.tolist() == pytest.approx([0.0, 0.5, 1.0, 3.0, 6.0])
    assert counts.tolist() == [80, 12, 4, 20, 36]


@pytest.mark.parametrize("axis, expected", [(0, 3 * 0.7), (1, 3 * 0.9), (2, 3 * 2.5)])
def test_single_voxels_k_apart(axis, expected):
    # One voxel each, 3 voxels apart along `axis`: every directed distance is 3 * spacing[axis].
    spacing = (0.7, 0.9, 2.5)
    truth = np.zeros((5, 6, 9), dtype=bool)
    pred = np.zeros_like(truth)
    truth[1, 1, 1] = True
    pred[tuple(1 + 3 * (a == axis) for a in range(3))] = True
    assert hd95(pred, truth, spacing) == pytest.approx(expected)
    assert hd95(truth, pred, spacing) == pytest.approx(expected)
    scores = case_scores(np.stack([pred]), np.stack([truth]), ["dot"], spacing, multilabel=True)["dot"]
    assert scores["dice"] == scores["iou"] == 0.0  # no overlap
    assert scores["hd95"] == pytest.approx(expected)


def test_hd95_is_the_max_of_per_direction_interpolated_percentiles():
    # Truth: a 1-voxel-thick line x = 0..10 at (y=1, z=1); prediction: the same line plus one
    # stray voxel at (5, 1, 11), 10 z-voxels * 0.5 mm = 5 mm from the nearest line voxel (any
    # other line voxel is farther: sqrt((2 dx)^2 + 5^2)).
    # pred -> truth: 11 x 0 and 1 x 5; P95 position 0.95 * 11 = 10.45 -> 0 + 0.45 * (5 - 0) = 2.25
    # truth -> pred: 11 x 0 -> 0.      HD95 = max(2.25, 0) = 2.25 mm
    # (plain Hausdorff would be 5; the P95 of the 23 pooled distances would be 0.)
    truth = np.zeros((11, 3, 14), dtype=bool)
    truth[:, 1, 1] = True
    pred = truth.copy()
    pred[5, 1, 11] = True
    assert hd95(pred, truth, (2.0, 1.0, 0.5)) == pytest.approx(2.25)
    assert hd95(truth, pred, (2.0, 1.0, 0.5)) == pytest.approx(2.25)


def test_surface_is_face_connected_and_the_array_border_is_background():
    # 2-D plus sign: the centre's 4 face neighbours are inside, so it is not surface (with full
    # connectivity its empty diagonal neighbours would make it surface).
    plus = np.zeros((5, 5), dtype=bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    expected = plus.copy()
    expected[2, 2] = False
    np.testing.assert_array_equal(surface(plus), expected)
    # 3x3x3 cube minus a corner: the centre keeps all 6 face neighbours -> interior.
    cube = np.zeros((5, 5, 5), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    cube[1, 1, 1] = False
    assert not surface(cube)[2, 2, 2]
    assert surface(cube).sum() == 26 - 1  # every remaining voxel but the centre
    # a mask filling the array: outside counts as background, so the shell 4^3 - 2^3 = 56 is surface
    full = np.ones((4, 4, 4), dtype=bool)
    assert surface(full).sum() == 56
    assert not surface(full)[1:3, 1:3, 1:3].any()


def test_2d_square_shift():
    # 2-D works too: 4x4 squares moved by 3 pixels along axis 1 (spacing 0.25 mm there).
    # Surface of A = 16 - 4 = 12. A -> B: the column 3 away (4 pixels) -> 0.75 mm, the column 2
    # away (its 2 boundary pixels) -> 0.5, the column 1 away (2 boundary pixels) -> 0.25,
    # the column both squares cover (4) -> 0: sorted 0 x 4, 0.25 x 2, 0.5 x 2, 0.75 x 4; P95 position
    # 0.95 * 11 = 10.45 -> 0.75. Symmetric -> HD95 = 0.75 = 3 * 0.25.
    truth = np.zeros((8, 10), dtype=bool)
    truth[2:6, 1:5] = True
    pred = np.roll(truth, 3, axis=1)
    assert hd95(pred, truth, (1.0, 0.25)) == pytest.approx(0.75)
    assert sorted(surface_distances(truth, pred, (1.0, 0.25)).tolist()) == pytest.approx(
        [0.0] * 4 + [0.25] * 2 + [0.5] * 2 + [0.75] * 4)


def test_empty_case_rule():
    # Volume (4, 6, 3) at (0.5, 0.5, 2.0) mm: physical extent (2, 3, 6) mm, diagonal
    # sqrt(4 + 9 + 36) = 7 mm.
    spacing = (0.5, 0.5, 2.0)
    truth = np.zeros((4, 6, 3), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[1, 1, 1] = 1  # lesion: in truth only (missed)
    pred[2, 4, 0] = 3   # extra: in prediction only (hallucinated); cyst (2): in neither
    scores = case_scores(pred, truth, ["background", "lesion", "cyst", "extra"], spacing, multilabel=False)
    for name in ("lesion", "extra"):
        assert scores[name]["dice"] == scores[name]["iou"] == 0.0
        assert scores[name]["hd95"] == pytest.approx(7.0)
    assert math.isnan(scores["cyst"]["dice"]) and math.isnan(scores["cyst"]["iou"])
    assert math.isnan(scores["cyst"]["hd95"])
    assert scores["cyst"]["truth_voxels"] == scores["cyst"]["predicted_voxels"] == 0
    # background: 72 - 1 voxels each side, overlap 72 - 2 = 70 -> Dice 140/142, IoU 70/72
    assert scores["background"]["dice"] == pytest.approx(70 / 71)
    assert scores["background"]["iou"] == pytest.approx(35 / 36)
    assert math.isnan(hd95(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1)))
    with pytest.raises(ValueError, match="empty"):
        surface_distances(truth == 1, truth == 2, spacing)
    assert "NaN" in EMPTY_RULE_3D and "diagonal" in EMPTY_RULE_3D


def test_multilabel_overlapping_classes_are_scored_independently():
    # (C=2, 6, 6, 6), spacing (1, 1, 2) -> 2 mm^3 per voxel. The tumour sits inside the organ.
    spacing = (1.0, 1.0, 2.0)
    truth = np.zeros((2, 6, 6, 6), dtype=bool)
    pred = np.zeros_like(truth)
    truth[0, 1:5, 1:5, 1:5] = True   # organ 4*4*4 = 64
    pred[0, 1:5, 1:5, 1:4] = True    # 4*4*3 = 48, all inside truth
    truth[1, 2:4, 2:4, 2:4] = True   # tumour 2*2*2 = 8
    pred[1, 2:4, 2:4, 2:3] = True    # 2*2*1 = 4, all inside truth
    scores = case_scores(pred, truth, ["organ", "tumour"], spacing, multilabel=True)
    # organ: Dice 2*48/(48+64) = 6/7, IoU 48/64 = 3/4; tumour: Dice 2*4/(4+8) = 2/3, IoU 4/8 = 1/2
    assert scores["organ"]["dice"] == pytest.approx(6 / 7)
    assert scores["organ"]["iou"] == pytest.approx(3 / 4)
    assert scores["tumour"]["dice"] == pytest.approx(2 / 3)
    assert scores["tumour"]["iou"] == pytest.approx(1 / 2)
    # volumes: 64 * 2 mm^3 = 0.128 ml, 48 * 2 = 0.096 ml; 8 * 2 = 0.016 ml, 4 * 2 = 0.008 ml
    assert scores["organ"]["truth_ml"] == pytest.approx(0.128)
    assert scores["organ"]["predicted_ml"] == pytest.approx(0.096)
    assert scores["tumour"]["truth_ml"] == pytest.approx(0.016)
    assert scores["tumour"]["predicted_ml"] == pytest.approx(0.008)
    # the organ channel does not see the tumour channel: scoring it alone gives the same numbers
    alone = case_scores(pred[:1], truth[:1], ["organ"], spacing, multilabel=True)["organ"]
    assert alone == scores["organ"]


def test_valid_mask_removes_ignored_voxels_from_every_count():
    # (4, 4, 4) labels, spacing 1: truth lesion x in {0, 1} (32), prediction x in {0, 1, 2} (48).
    truth = np.zeros((4, 4, 4), dtype=np.uint8)
    truth[0:2] = 1
    pred = np.zeros_like(truth)
    pred[0:3] = 1
    classes = ["background", "lesion"]
    plain = case_scores(pred, truth, classes, (1.0, 1.0, 1.0), multilabel=False)
    # lesion: Dice 2*32/(48+32) = 0.8, IoU 32/48 = 2/3
    # background: truth x in {2,3} (32), pred x = 3 (16), overlap 16 -> Dice 32/48, IoU 16/32
    assert plain["lesion"]["dice"] == pytest.approx(0.8)
    assert plain["lesion"]["iou"] == pytest.approx(2 / 3)
    assert plain["background"]["dice"] == pytest.approx(2 / 3)
    assert plain["background"]["iou"] == pytest.approx(1 / 2)
    # ignore the 8 voxels x = 2, y in {0, 1} (predicted lesion, true background):
    valid = np.ones((4, 4, 4), dtype=bool)
    valid[2, 0:2] = False
    masked = case_scores(pred, truth, classes, (1.0, 1.0, 1.0), multilabel=False, valid=valid)
    # lesion: pred 48 - 8 = 40, truth 32, overlap 32 -> Dice 64/72 = 8/9, IoU 32/40 = 4/5
    # background: truth 32 - 8 = 24, pred 16, overlap 16 -> Dice 32/40 = 4/5, IoU 16/24 = 2/3
    assert masked["lesion"]["dice"] == pytest.approx(8 / 9)
    assert masked["lesion"]["iou"] == pytest.approx(4 / 5)
    assert masked["lesion"]["predicted_voxels"] == 40 and masked["lesion"]["truth_voxels"] == 32
    assert masked["background"]["dice"] == pytest.approx(4 / 5)
    assert masked["background"]["iou"] == pytest.approx(2 / 3)
    assert masked["background"]["truth_voxels"] == 24
    # HD95 is measured on the restricted masks
    assert masked["lesion"]["hd95"] == pytest.approx(hd95((pred == 1) & valid, (truth == 1) & valid, (1, 1, 1)))


def test_shape_mismatches_are_refused():
    vol = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        case_scores(vol, vol[:2], ["a"], (1, 1, 1), multilabel=False)
    with pytest.raises(ValueError):
        case_scores(vol, vol, ["a"], (1, 1), multilabel=False)
    with pytest.raises(ValueError):
        case_scores(vol[None].astype(bool), vol[None].astype(bool), ["a", "b"], (1, 1, 1), multilabel=True)
    with pytest.raises(ValueError):
        case_scores(vol, vol, ["a"], (1, 1, 1), multilabel=False, valid=np.ones((3, 3), dtype=bool))


def test_summarize_cases_means_stds_and_counts_skip_unscored_cases():
    nan = math.nan

    def row(dice, iou, h):
        return {"dice": dice, "iou": iou, "hd95": h}

    per_case = {
        "case1": {"liver": row(0.8, 0.7, 2.0), "tumour": row(nan, nan, nan), "cyst": row(nan, nan, nan)},
        "case2": {"liver": row(0.6, 0.4, 4.0), "tumour": row(0.5, 0.3, 10.0), "cyst": row(nan, nan, nan)},
    }
    out = summarize_cases(per_case, ["liver", "tumour", "cyst"])
    liver, tumour, cyst = (out["per_class"][c] for c in ("liver", "tumour", "cyst"))
    # liver: Dice (0.8+0.6)/2 = 0.7, population std 0.1; IoU 0.55 +- 0.15; HD95 3 +- 1
    assert liver["dice"] == pytest.approx(0.7) and liver["dice_std"] == pytest.approx(0.1)
    assert liver["iou"] == pytest.approx(0.55) and liver["iou_std"] == pytest.approx(0.15)
    assert liver["hd95"] == pytest.approx(3.0) and liver["hd95_std"] == pytest.approx(1.0)
    assert liver["cases"] == 2
    # tumour: only case2 scored it
    assert (tumour["dice"], tumour["dice_std"], tumour["hd95"], tumour["cases"]) == (0.5, 0.0, 10.0, 1)
    # cyst: never scored -> NaN, 0 cases, and left out of the mean over classes
    assert math.isnan(cyst["dice"]) and math.isnan(cyst["hd95_std"]) and cyst["cases"] == 0
    # mean over classes with a score: Dice (0.7+0.5)/2 = 0.6, IoU (0.55+0.3)/2 = 0.425, HD95 (3+10)/2
    assert out["mean"]["dice"] == pytest.approx(0.6)
    assert out["mean"]["iou"] == pytest.approx(0.425)
    assert out["mean"]["hd95"] == pytest.approx(6.5)
    assert out["cases"] == 2
    assert out["empty_case_rule"] == EMPTY_RULE_3D
    # classes picks what is summarised: leaving tumour out changes the mean
    assert summarize_cases(per_case, ["liver"])["mean"]["dice"] == pytest.approx(0.7)


def test_summarize_real_case_scores():
    # case_scores output feeds summarize_cases directly: two cube cases (Dice 2/3 and 1).
    pred, truth = _cubes(2)
    classes = ["background", "cube"]
    per_case = {"shifted": case_scores(pred, truth, classes, (0.5, 0.5, 3.0), multilabel=False),
                "exact": case_scores(truth, truth, classes, (0.5, 0.5, 3.0), multilabel=False)}
    cube = summarize_cases(per_case, ["cube"])["per_class"]["cube"]
    assert cube["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert cube["hd95"] == pytest.approx((6.0 + 0.0) / 2)
    assert cube["cases"] == 2


# --- brute force cross-check (no segkit.metrics3d code used) --------------------------------

def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour that is background or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[core]
    return mask & ~inner


def _p95_linear(values: np.ndarray) -> float:
    """95th percentile with linear interpolation between order statistics."""
    v = np.sort(values)
    h = 0.95 * (len(v) - 1)
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (h - lo) * (v[hi] - v[lo]))


def _brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    ps = np.argwhere(_brute_surface(pred)) * np.asarray(spacing)
    ts = np.argwhere(_brute_surface(truth)) * np.asarray(spacing)
    d = np.sqrt(((ps[:, None, :] - ts[None, :, :]) ** 2).sum(-1))
    return max(_p95_linear(d.min(axis=1)), _p95_linear(d.min(axis=0)))


@st.composite
def _mask_pair(draw):
    shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 6)))
    pred = draw(arrays(bool, shape))
    truth = draw(arrays(bool, shape))
    size = math.prod(shape)
    pred.flat[draw(st.integers(0, size - 1))] = True  # both non-empty: the empty rule is tested above
    truth.flat[draw(st.integers(0, size - 1))] = True
    spacing = draw(st.tuples(*[st.floats(0.25, 4.0, allow_nan=False)] * 3))
    return pred, truth, spacing


@settings(max_examples=25, deadline=None)
@given(case=_mask_pair())
def test_hd95_matches_brute_force(case):
    pred, truth, spacing = case
    assert hd95(pred, truth, spacing) == pytest.approx(_brute_hd95(pred, truth, spacing), rel=1e-9, abs=1e-12)
