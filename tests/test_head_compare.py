"""`segkit compare` on binary, exclusive and overlapping data; `segkit convert-head` equivalence."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from segkit import Segmenter
from segkit.data.io import read_image
from segkit.heads import build_head
from segkit.infer import forward_padded
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, load_checkpoint, save_checkpoint
from conftest import CONFIGS, DATASETS, NUCLEI, copy_nuclei, no_traceback, run_cli

QUICK = ["--epochs", "1", "--set", "train.steps_per_epoch=1", "--set", "train.crop=64", "--set",
         "train.batch_size=2", "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set",
         "train.device=cpu"]


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bin")
    data = copy_nuclei(tmp / "data", 6)
    from cli.app import main

    try:
        main(["compare", str(CONFIGS / "nuclei-sigmoid.yaml"), "--out", str(tmp / "cmp"), "--seeds", "0,1",
              "--set", f"data.root={data}", *QUICK, "--include-degenerate", "--write-thresholds"])
    except SystemExit as done:
        assert not done.code
    return tmp, data, json.loads((tmp / "cmp" / "report.json").read_text())


def test_binary_compare_report_and_its_numbers_equal_evaluate(capsys, binary_report):
    tmp, data, report = binary_report
    assert report["kind"] == "binary"
    assert report["heads"]["sigmoid"]["classes"] == ["nucleus"]
    assert report["heads"]["softmax"]["classes"] == ["background", "nucleus"]
    assert report["common_classes"] == ["nucleus"] and report["conclusion"]
    for name in ("report.md", "learning_curves.png", "reliability.png", "thresholds_sigmoid.png"):
        assert (tmp / "cmp" / name).is_file()
    md = (tmp / "cmp" / "report.md").read_text()
    assert "| softmax |" in md and "| sigmoid |" in md and "Conclusion" in md
    for head in ("softmax", "sigmoid"):
        run = report["heads"][head]["runs"][0]
        ckpt = tmp / "cmp" / head / "seed0" / "best"
        args = ["evaluate", ckpt, data, "--split", "val", "--json", tmp / f"{head}.json", "--workers", "0",
                "--device", "cpu", "--no-progress"]
        if head == "sigmoid":  # thresholds were tuned into the checkpoint after scoring at 0.5
            args += ["--threshold", "0.5"]
        r = run_cli(*args)
        assert r.code == 0, r.err
        direct = json.loads((tmp / f"{head}.json").read_text())
        assert direct["per_class"] == run["scores"]["per_class"]
        assert direct["mean"] == run["scores"]["mean"] and direct["images"] == run["scores"]["images"]


def test_write_thresholds_stores_the_best_ones(binary_report):
    tmp, _, report = binary_report
    best = report["heads"]["sigmoid"]["best_thresholds"]["nucleus"]["threshold"]
    for seed in (0, 1):
        meta = json.loads((tmp / "cmp" / "sigmoid" / f"seed{seed}" / "best" / "model.json").read_text())
        assert meta["thresholds"] == [best]


def test_degenerate_row_is_constant(binary_report):
    _, data, report = binary_report
    d = report["degenerate"]
    assert d["train_losses"] and all(v == 0.0 for v in d["train_losses"])
    assert d["max_gradient"] == 0.0 and d["probabilities_seen"] == [1.0]
    assert d["predicted_foreground_pixels"] == 0
    from segkit.config import load_config
    from segkit.data.splits import eval_samples, pair_reader

    cfg = load_config(CONFIGS / "nuclei-sigmoid.yaml", [f"data.root={data}"])
    reader = pair_reader(cfg.data)
    fg = total = 0
    for s in eval_samples(cfg.data, "val", 0):
        px = reader.read(s)
        labels, valid = px.labels, px.valid
        fg, total = fg + int(labels[valid].sum()), total + int(valid.sum())
    assert d["pixel_accuracy"] == pytest.approx(1 - fg / total, abs=1e-12)


def _camvid_subset(root, n=6):
    src = DATASETS / "camvid"
    for kind in ("images", "masks"):
        (root / kind).mkdir(parents=True)
        for path in sorted((src / kind / "val").iterdir())[:n]:
            arr = read_image(path, 3) if kind == "images" else cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            small = cv2.resize(arr, (160, 120), interpolation=cv2.INTER_AREA if kind == "images" else cv2.INTER_NEAREST)
            cv2.imwrite(str(root / kind / path.name), small[:, :, ::-1] if kind == "images" else small)
    return root


def test_exclusive_multiclass_compare_trains_both_heads_on_the_same_classes(capsys, tmp_path):
    data = _camvid_subset(tmp_path / "camvid")
    r = run_cli("compare", CONFIGS / "camvid.yaml", "--out", tmp_path / "cmp", "--set", f"data.root={data}",
                *QUICK)
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["kind"] == "exclusive"
    assert report["heads"]["softmax"]["classes"] == report["heads"]["sigmoid"]["classes"] == \
        report["common_classes"] and len(report["common_classes"]) == 11
    shares = report["heads"]["sigmoid"]
    assert 0 <= shares["no_class_share"][0] <= 1 and 0 <= shares["multi_class_share"][0] <= 1
    assert "with more than one class" in (tmp_path / "cmp" / "report.md").read_text()


def _isic_subset(root):
    src = DATASETS / "isic2018-multilabel-mini"
    for path in src.rglob("*"):
        if path.suffix in (".jpg", ".png"):
            dst = root / path.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(dst), cv2.resize(arr, (192, 144), interpolation=cv2.INTER_NEAREST))
    return root


def test_overlapping_compare_trains_sigmoid_and_states_what_softmax_cannot_represent(capsys, tmp_path):
    data = _isic_subset(tmp_path / "isic")
    r = run_cli("compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", tmp_path / "cmp",
                "--set", f"data.root={data}", *QUICK)
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["kind"] == "overlapping" and list(report["heads"]) == ["sigmoid"]
    assert "more than one label" in report["skipped"]["softmax"]
    assert "cannot represent" in (tmp_path / "cmp" / "report.md").read_text()
    r = run_cli("compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", tmp_path / "cmp2",
                "--set", f"data.root={data}", *QUICK, "--softmax-exclusive", "--heads", "softmax")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "cmp2" / "report.json").read_text())
    assert report["labels"]["softmax"] == "softmax (exclusive part only)"
    assert report["heads"]["softmax"]["classes"] == ["background", "lesion", "pigment_network"]


def test_compare_bad_input_exits_2_and_writes_nothing(capsys, tmp_path):
    for extra in (["--heads", "foo"], ["--seeds", "a,b"]):
        r = run_cli("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", tmp_path / "x", *extra)
        assert r.code == 2 and no_traceback(r.err), r.err
        assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = run_cli("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", tmp_path / "full")
    assert r.code == 2 and "not empty" in r.err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_convert_head_gives_the_same_masks(capsys, tmp_path):
    torch.manual_seed(0)
    head = build_head("softmax", ["background", "nucleus"])
    model = build_model("Unet", "resnet18", 2)
    with torch.no_grad():  # a random head would put every pixel near a tie; make the logits decisive
        model.segmentation_head[0].weight.mul_(50)
    save_checkpoint(tmp_path / "soft", model, checkpoint_meta(head, "Unet", "resnet18", 3,
                                                             Normalization.unit((0.5,) * 3, (0.25,) * 3),
                                                             data={"mask": "binary"}))
    r = run_cli("convert-head", tmp_path / "soft", tmp_path / "sig")
    assert r.code == 0, r.err
    sig_model, sig_head, meta = load_checkpoint(tmp_path / "sig")
    assert sig_head.name == "sigmoid" and sig_head.classes == ["nucleus"] and sig_head.channels == 1
    soft, sig = Segmenter.load(tmp_path / "soft", device="cpu"), Segmenter.load(tmp_path / "sig", device="cpu")
    for path in sorted((NUCLEI / "test" / "images").iterdir())[:3]:
        image = read_image(path, 3)
        a = soft.predict(image).mask == 1
        b = sig.predict(image).mask[0]
        logits = soft.logits(image)
        diff = logits[1] - logits[0]
        tie = diff.abs() < 1e-4
        assert np.array_equal(a[~tie.numpy()], b[~tie.numpy()])
        with torch.inference_mode():
            twin = forward_padded(sig_model, soft.to_input([image]))[0, 0]
        assert torch.allclose(twin, diff, atol=1e-3)
    r = run_cli("convert-head", tmp_path / "sig", tmp_path / "again")
    assert r.code == 2 and "2-class softmax" in r.err and not (tmp_path / "again").exists()
    r = run_cli("convert-head", tmp_path / "soft", tmp_path / "sig")
    assert r.code == 2 and "not empty" in r.err
