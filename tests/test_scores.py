"""`segkit evaluate`: its numbers equal those counted by hand from `segkit predict`'s files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.heads import build_head
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint
from conftest import copy_nuclei, run_cli


def _ckpt(folder, head_name, classes, data):
    torch.manual_seed(1)
    head = build_head(head_name, classes)
    save_checkpoint(folder, build_model("Unet", "resnet18", head.channels),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3), data=data))
    return folder


def _index_data(root, n=3):
    rng = np.random.default_rng(0)
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "masks").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "test" / "images" / f"{i}.png")
        m = rng.integers(0, 3, (40, 56)).astype(np.uint8)
        m[:5] = 9  # ignored band
        Image.fromarray(m).save(root / "test" / "masks" / f"{i}.png")
    return root


def test_evaluate_softmax_matches_hand_counts_from_predicted_files(capsys, tmp_path):
    data = _index_data(tmp_path / "data")
    ckpt = _ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"],
                 {"mask": "index", "ignore_index": 9, "foreground_value": None, "colors": None})
    r = run_cli("evaluate", ckpt, data, "--json", tmp_path / "s.json", "--workers", "0", "--device", "cpu",
                "--no-progress")
    assert r.code == 0, r.err
    assert "confusion matrix" in r.out and "mean (macro)" in r.out and "empty-class rule" in r.out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["images"] == 3 and s["background_in_mean"] is True
    assert run_cli("predict", ckpt, data / "test" / "images", tmp_path / "pred", "--workers", "0",
                   "--device", "cpu", "--no-progress").code == 0
    conf = np.zeros((3, 3), np.int64)
    for i in range(3):
        truth = np.asarray(Image.open(data / "test" / "masks" / f"{i}.png"))
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{i}.png"))
        valid = truth != 9
        np.add.at(conf, (truth[valid], pred[valid]), 1)
    assert s["confusion_matrix"]["counts"] == conf.tolist()
    for c, name in enumerate(["background", "a", "b"]):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c].sum() - conf[c, c]
        assert s["per_class"][name]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
        assert s["per_class"][name]["iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)
        assert s["per_class"][name]["precision"] == pytest.approx(tp / (tp + fp), abs=1e-12)
        assert s["per_class"][name]["recall"] == pytest.approx(tp / (tp + fn), abs=1e-12)
    assert s["mean"]["dice"] == pytest.approx(np.mean([s["per_class"][n]["dice"] for n in ["background", "a", "b"]]))
    micro_tp = np.trace(conf)
    assert s["micro"]["iou"] == pytest.approx(micro_tp / (micro_tp + 2 * (conf.sum() - micro_tp)))
    r = run_cli("evaluate", ckpt, data, "--exclude-background", "--json", tmp_path / "nb.json",
                "--workers", "0", "--device", "cpu", "--no-progress")
    nb = json.loads((tmp_path / "nb.json").read_text())
    assert nb["classes_in_mean"] == ["a", "b"] and nb["background_in_mean"] is False
    assert nb["mean"]["dice"] == pytest.approx((s["per_class"]["a"]["dice"] + s["per_class"]["b"]["dice"]) / 2)


def test_evaluate_sigmoid_on_binary_masks(capsys, tmp_path):
    data = copy_nuclei(tmp_path / "data", 3, "test")
    ckpt = _ckpt(tmp_path / "ckpt", "sigmoid", ["nucleus"], {"mask": "binary"})
    r = run_cli("evaluate", ckpt, data, "--json", tmp_path / "s.json", "--threshold", "0.4",
                "--workers", "0", "--device", "cpu", "--no-progress")
    assert r.code == 0, r.err
    s = json.loads((tmp_path / "s.json").read_text())
    assert "confusion_matrix" not in s and s["thresholds"] == {"nucleus": 0.4}
    run_cli("predict", ckpt, data / "test" / "images", tmp_path / "pred", "--threshold", "0.4",
            "--workers", "0", "--device", "cpu", "--no-progress")
    tp = fp = fn = 0
    for path in sorted((data / "test" / "masks").iterdir()):
        truth = np.asarray(Image.open(path)) > 127
        pred = np.asarray(Image.open(tmp_path / "pred" / "nucleus" / path.name)) > 0
        tp, fp, fn = tp + (truth & pred).sum(), fp + (~truth & pred).sum(), fn + (truth & ~pred).sum()
    assert s["per_class"]["nucleus"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert s["micro"]["dice"] == s["mean"]["dice"]


def test_evaluate_missing_split_and_exclude_without_background(capsys, tmp_path):
    data = _index_data(tmp_path / "data")
    ckpt = _ckpt(tmp_path / "ckpt", "sigmoid", ["a", "b", "c"], {"mask": "index", "ignore_index": 9})
    r = run_cli("evaluate", ckpt, data, "--split", "val", "--device", "cpu")
    assert r.code == 2 and "no train split" in r.err and "test" in r.err
    r = run_cli("evaluate", ckpt, data, "--exclude-background", "--device", "cpu", "--workers", "0")
    assert r.code == 2 and "background" in r.err
