"""The training data path on real CamVid (360 x 480, index masks, Unlabelled = 11 ignored): every sample
equals a reference made by hand from the image and mask files."""

from __future__ import annotations

import pytest

from conftest import extended_data
from segkit.config import DataConfig
from test_loader import assert_samples_match_the_reference

CAMVID = extended_data("camvid")
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]


@pytest.mark.parametrize("head_name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cache", [True, False])
def test_camvid_samples_equal_a_reference_made_from_the_whole_image(head_name, cache):
    """The crop (384) is larger than CamVid's 360 rows: exercises padding."""
    cfg = DataConfig(root=CAMVID, classes=CLASSES, mask="index", ignore_index=11)
    assert_samples_match_the_reference(cfg, head_name, cache, crop=384)
