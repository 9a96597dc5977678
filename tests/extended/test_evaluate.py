"""`segkit evaluate --config` on real ISBI 2012 membrane masks, which mark the class with 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import extended_data, run_cli

ISBI = extended_data("isbi2012-membrane")
RUN = ["--device", "cpu", "--no-progress", "--workers", "0"]


def test_evaluate_config_reads_the_masks_as_its_data_section_says(tmp_path, content_checkpoints):
    """Real ISBI membrane masks mark the class with 0. The checkpoint was trained on masks whose
    foreground is 255; `--config` with `foreground_value: 0` scores against the other reading."""
    import yaml

    root = tmp_path / "data"
    for kind, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        (root / "test" / kind).mkdir(parents=True)
        for name in ("0.png", "1.png"):
            with Image.open(ISBI / kind / name) as im:
                im.resize((256, 256), resample).save(root / "test" / kind / name)
    config = tmp_path / "membrane.yaml"  # the class keeps the checkpoint's name; only the encoding differs
    config.write_text(yaml.safe_dump({"data": {"root": "elsewhere", "classes": ["nucleus"], "mask": "binary",
                                               "foreground_value": 0}, "model": {"head": "sigmoid"}}))
    ckpt = content_checkpoints["sigmoid"]
    code, _, err = run_cli("evaluate", ckpt, root, "--config", config, "--json", tmp_path / "config.json", *RUN)
    assert code == 0, err
    code, _, err = run_cli("evaluate", ckpt, root, "--json", tmp_path / "default.json", *RUN)
    assert code == 0, err
    code, _, err = run_cli("predict", ckpt, root / "test" / "images", tmp_path / "pred", *RUN)
    assert code == 0, err
    masks = {n: np.asarray(Image.open(root / "test" / "masks" / n)) for n in ("0.png", "1.png")}
    assert all(set(np.unique(m).tolist()) == {0, 255} for m in masks.values())
    for name, foreground in (("config", 0), ("default", 255)):
        s = json.loads((tmp_path / f"{name}.json").read_text())
        tp = fp = fn = 0
        for n, mask in masks.items():
            pred = np.asarray(Image.open(tmp_path / "pred" / "nucleus" / n)) == 255
            truth = mask == foreground
            tp, fp, fn = tp + int((pred & truth).sum()), fp + int((pred & ~truth).sum()), fn + int((~pred & truth).sum())
        assert s["images"] == 2
        got = s["per_class"]["nucleus"]
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), name
        assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
        assert got["iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
        assert got["truth_pixels"] == tp + fn
    assert json.loads((tmp_path / "config.json").read_text())["per_class"]["nucleus"]["truth_pixels"] != \
        json.loads((tmp_path / "default.json").read_text())["per_class"]["nucleus"]["truth_pixels"]
