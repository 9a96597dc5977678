"""`segkit visualize` on real CamVid masks: a config's data format and colours, the error panel."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import extended_data, run_cli
from segkit.data.io import write_png
from segkit.viz import ERROR_COLORS
from test_visualize import edges, expected_overlay, read_rgb

CAMVID = extended_data("camvid")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_COLORS = [(0, 0, 0), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def test_visualize_config_reads_masks_in_its_data_format_with_its_colours(tmp_path):
    """Real CamVid index masks (11 = ignored) read as a config's data section says, drawn in the config's
    colours (Sky black: not painted); with --truth, the error panel marks exactly the changed pixels."""
    import yaml

    stem = "0016E5_07959"
    image = np.asarray(Image.open(CAMVID / "images" / "val" / f"{stem}.png").convert("RGB"))
    truth = np.asarray(Image.open(CAMVID / "masks" / "val" / f"{stem}.png"))
    h, w = truth.shape
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / f"{stem}.png")
    pred = truth.copy()
    pred[(truth == 3) & (np.arange(h)[:, None] > 300)] = 4  # road drawn as pavement: a wrong class
    pred[:40, 150:300] = 8  # a car in the sky (false positives: Sky is not drawn) and over buildings (wrong)
    write_png(tmp_path / "pred" / f"{stem}.png", pred)
    write_png(tmp_path / "truth" / f"{stem}.png", truth)
    config = tmp_path / "camvid.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(CAMVID), "classes": CAMVID_CLASSES, "mask": "index",
                                               "ignore_index": 11, "colors": [list(c) for c in CAMVID_COLORS]},
                                      "model": {"head": "softmax"}}))
    code, out, err = run_cli("visualize", tmp_path / "images", tmp_path / "pred", tmp_path / "out",
                             "--config", config, "--alpha", "0.5")
    assert code == 0, err
    assert "1 pictures" in out
    masks = np.stack([pred == k for k in range(len(CAMVID_CLASSES))])  # 11 is no class: left untinted
    body = read_rgb(tmp_path / "out" / f"{stem}.png")[:h]
    want = expected_overlay(image, masks, CAMVID_COLORS, 0.5)
    assert np.array_equal(body, want)
    unpainted = (pred == 11) | (pred == 0)
    inside = unpainted & ~np.any([edges(m) for m in masks[1:]], axis=0)
    assert inside.sum() > 1000 and np.array_equal(body[inside], image[inside])

    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "pred", tmp_path / "panels",
                           "--config", config, "--truth", tmp_path / "truth")
    assert code == 0, err
    pic = read_rgb(tmp_path / "panels" / f"{stem}.png")
    assert pic.shape[1] == 4 * w
    top = next(y for y in range(pic.shape[0]) if np.array_equal(pic[y, :w], image[0]))
    errors = pic[top:top + h, 3 * w:]
    valid = truth != 11
    wrong = valid & (pred != truth) & (truth != 0) & (pred != 0)
    fp = valid & (pred != truth) & (truth == 0) & (pred != 0)  # Sky is not drawn: over it, only a false positive
    assert wrong.sum() > 1000 and fp.sum() > 100
    assert (errors[wrong] == ERROR_COLORS["wrong class"]).all()
    assert (errors[fp] == ERROR_COLORS["false positive"]).all()
    right = ~(wrong | fp)
    assert np.array_equal(errors[right], (image[right].astype(np.float32) * 0.4).astype(np.uint8))
