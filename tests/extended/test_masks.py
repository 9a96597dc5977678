"""Mask encodings on the larger real datasets: ISBI 2012 membranes stored as 0 (foreground_value 0) and
the overlapping ISIC 2018 masks (stem-prefix pairing, overlap detection, softmax refused)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import CONFIGS, TINY, assert_refused, extended_data
from segkit.data.layout import pair
from segkit.data.masks import build_mask_format
from segkit.heads import SigmoidHead, SoftmaxHead

ISIC = extended_data("isic2018-multilabel-mini")
ISBI = extended_data("isbi2012-membrane")


# -- ISBI: the membrane stored as 0 ----------------------------------------------------------------


def test_real_isbi_mask_with_foreground_value_0():
    raw = np.asarray(Image.open(ISBI / "masks" / "0.png"))
    labels, valid = build_mask_format("binary", ["membrane"], foreground_value=0).read(ISBI / "masks" / "0.png")
    assert labels.shape == (512, 512, 1) and valid.all()
    assert np.array_equal(labels[:, :, 0], (raw == 0).astype(np.uint8))
    assert 0 < labels.mean() < 0.5  # the membrane is the minority class


# -- overlap on the real ISIC masks ------------------------------------------------------------------


ISIC_CLASSES = ["lesion", "pigment_network"]


def test_isic_masks_pair_by_stem_prefix():
    pairing = pair(ISIC / "images", ISIC / "masks", ISIC_CLASSES, multilabel=True)
    assert len(pairing.samples) == 6 and pairing.unlabeled == [] and pairing.orphan_masks == []
    for s in pairing.samples:
        assert s.mask["lesion"].name == f"{s.stem}_Segmentation.png"
        assert s.mask["pigment_network"].name == f"{s.stem}_attribute_pigment_network.png"


def test_isic_masks_overlap_and_only_sigmoid_accepts_them():
    samples = pair(ISIC / "images", ISIC / "masks", ISIC_CLASSES, multilabel=True).samples
    fmt = build_mask_format("multilabel", ISIC_CLASSES)
    overlapping = 0
    for s in samples:
        labels, valid = fmt.read(s.mask)
        raw = [np.asarray(Image.open(s.mask[c])) > 127 for c in ISIC_CLASSES]
        assert labels.transpose(2, 0, 1).astype(bool).tolist() == [r.tolist() for r in raw]
        both = int((raw[0] & raw[1]).sum())
        overlapping += both
        assert SigmoidHead(ISIC_CLASSES).label_problem(labels, valid) is None
        problem = SoftmaxHead(ISIC_CLASSES).label_problem(labels, valid)
        if both:
            assert problem.startswith(f"{both} pixels carry more than one label") and "sigmoid" in problem
    assert overlapping > 0


def test_train_isic_with_softmax_exits_2_naming_sigmoid(cli, tmp_path):
    """The ISIC config's loss (bce+dice) belongs to sigmoid: refused first, naming the loss and sigmoid."""
    out = tmp_path / "run"
    r = cli("train", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", "model.head=softmax",
            "--set", f"data.root={ISIC}", *TINY)
    assert_refused(r, out, "train.loss", "bce+dice", "sigmoid")


def test_train_isic_with_softmax_and_its_loss_exits_2_on_the_overlap(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", "model.head=softmax",
            "--set", "train.loss=ce+dice", "--set", f"data.root={ISIC}", *TINY)
    assert_refused(r, out, "more than one label", "model.head: sigmoid", "ISIC_0000000.jpg")
