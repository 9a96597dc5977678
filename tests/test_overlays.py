"""`segkit visualize`: class colours where the masks say, legends, error panels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from segkit.heads import build_head
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint
from segkit.viz import ERROR_COLORS, overlay
from conftest import run_cli


def _ckpt(folder, head_name, classes, data):
    head = build_head(head_name, classes)
    torch.manual_seed(0)
    save_checkpoint(folder, build_model("Unet", "resnet18", head.channels),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3), data=data))
    return head


def test_overlay_tints_class_pixels_and_keeps_the_rest():
    image = np.full((20, 20, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 8:18, 8:18] = True  # overlaps class 0 on 8..11
    colors = [(255, 0, 0), (0, 0, 255)]
    out = overlay(image, masks, colors, alpha=0.5)
    assert out[5, 5].tolist() == [178, 50, 50]  # round(0.5 * 100 + 0.5 * colour)
    assert out[15, 15].tolist() == [50, 50, 178]
    assert out[10, 10].tolist() == [114, 50, 114]  # both classes: the mean colour, tinted
    assert out[0, 19].tolist() == [100, 100, 100]
    assert out[2, 5].tolist() == [255, 0, 0] and out[8, 12].tolist() == [0, 0, 255]  # outlines of both


def test_visualize_softmax_masks_with_legend_and_truth_panels(capsys, tmp_path):
    head = _ckpt(tmp_path / "ckpt", "softmax", ["background", "cell"], {"mask": "index"})
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "truth").mkdir()
    Image.fromarray(np.full((30, 40, 3), 80, np.uint8)).save(tmp_path / "images" / "x.png")
    pred = np.zeros((30, 40), np.uint8)
    pred[5:25, 5:20] = 1
    Image.fromarray(pred).save(tmp_path / "masks" / "x.png")
    truth = np.zeros((30, 40), np.uint8)
    truth[5:25, 5:15] = 1
    Image.fromarray(truth).save(tmp_path / "truth" / "x.png")
    r = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out",
                "--checkpoint", tmp_path / "ckpt", "--alpha", "0.5")
    assert r.code == 0, r.err
    out = np.asarray(Image.open(tmp_path / "out" / "x.png").convert("RGB"))
    assert out.shape[1] == 40 and out.shape[0] > 30  # legend strip below
    color = np.array(head.colors[1])
    assert out[15, 10].tolist() == np.round(0.5 * 80 + 0.5 * color).astype(int).tolist()
    assert out[15, 30].tolist() == [80, 80, 80]
    r = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "panels",
                "--checkpoint", tmp_path / "ckpt", "--truth", tmp_path / "truth")
    assert r.code == 0, r.err
    panels = np.asarray(Image.open(tmp_path / "panels" / "x.png").convert("RGB"))
    assert panels.shape[1] == 4 * 40
    title = panels.shape[0] - 30 - (panels.shape[0] - 30 - 22)  # titles take the top 22 rows
    errors = panels[title:title + 30, 120:160]
    assert errors[15, 17].tolist() == list(ERROR_COLORS["false positive"])  # predicted cell, truth background
    assert errors[15, 10].tolist() == [32, 32, 32]  # right: the dimmed image
    again = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "panels",
                    "--checkpoint", tmp_path / "ckpt")
    assert again.code == 2 and "--overwrite" in again.err


def test_visualize_needs_one_source_of_class_names(capsys, tmp_path):
    r = run_cli("visualize", tmp_path, tmp_path, tmp_path / "o")
    assert r.code == 2 and "--checkpoint or --config" in r.err
