"""`segkit evaluate --config` on real ISBI 2012 membrane masks, which mark the class with 0."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import extended_data
from test_evaluate import assert_counts, scores_of_both_readings

ISBI = extended_data("isbi2012-membrane")


def test_evaluate_config_reads_the_masks_as_its_data_section_says(tmp_path, content_checkpoints):
    """Real ISBI membrane masks mark the class with 0. The checkpoint was trained on masks whose
    foreground is 255; `--config` with `foreground_value: 0` scores against the other reading."""
    root = tmp_path / "data"
    for kind, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        (root / "test" / kind).mkdir(parents=True)
        for name in ("0.png", "1.png"):
            with Image.open(ISBI / kind / name) as im:
                im.resize((256, 256), resample).save(root / "test" / kind / name)
    with_config, default = scores_of_both_readings(content_checkpoints["sigmoid"], root, tmp_path)
    masks = {n: np.asarray(Image.open(root / "test" / "masks" / n)) for n in ("0.png", "1.png")}
    assert all(set(np.unique(m).tolist()) == {0, 255} for m in masks.values())
    assert_counts(with_config, tmp_path / "pred" / "nucleus", {n: m == 0 for n, m in masks.items()})
    assert_counts(default, tmp_path / "pred" / "nucleus", {n: m == 255 for n, m in masks.items()})
    assert with_config["per_class"]["nucleus"]["truth_pixels"] != default["per_class"]["nucleus"]["truth_pixels"]
