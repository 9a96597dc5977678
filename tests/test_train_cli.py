"""`segkit train` and `segkit inspect` end to end: good runs, resume, and every bad input -> exit 2."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from segkit.config import load_config
from segkit.model import build_model, load_checkpoint
from tests.util import CONFIGS, DATASETS, NUCLEI, TINY, copy_subset, no_traceback, run_cli

SIGMOID = CONFIGS / "nuclei-sigmoid.yaml"
SOFTMAX = CONFIGS / "nuclei-softmax.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return copy_subset(NUCLEI, tmp_path_factory.mktemp("tiny"), 8)


def _train(capsys, config, data, out, *extra):
    return run_cli(capsys, "train", config, "--out", out, "--epochs", "2", "--set", f"data.root={data}", *TINY, *extra)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("config", [SIGMOID, SOFTMAX], ids=["sigmoid", "softmax"])
def test_train_writes_a_run_whose_checkpoint_reproduces_the_logits(capsys, tmp_path, tiny, config):
    out = tmp_path / "run"
    r = _train(capsys, config, tiny, out)
    assert r.code == 0, r.err
    assert "best validation mean Dice" in r.out and str(out / "best") in r.out
    for name in ("config.yaml", "metrics.csv", "curves.png", "best/model.safetensors", "best/model.json",
                 "last/model.safetensors", "last/train_state.pt"):
        assert (out / name).is_file(), name
    assert [row["epoch"] for row in _rows(out / "metrics.csv")] == ["1", "2"]
    model, head, meta = load_checkpoint(out / "last")
    assert meta["head"] == load_config(config).model.head and meta["classes"] == head.classes
    assert meta["arch"] == "Unet" and meta["encoder"] == "resnet18" and len(meta["mean"]) == 3
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in (out / "best").iterdir())
    twin = build_model("Unet", "resnet18", head.channels)
    twin.load_state_dict(load_file(str(out / "last" / "model.safetensors")))
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), twin.eval()(x))
        assert model(x).shape[1] == (1 if head.name == "sigmoid" else 2)


def test_resume_continues_at_the_next_epoch(capsys, tmp_path, tiny):
    out = tmp_path / "run"
    assert _train(capsys, SIGMOID, tiny, out).code == 0
    before = _rows(out / "metrics.csv")
    again = _train(capsys, SIGMOID, tiny, out)
    assert again.code == 2 and "--resume" in again.err and no_traceback(again.err)
    r = run_cli(capsys, "train", SIGMOID, "--out", out, "--epochs", "3", "--resume", "--set", f"data.root={tiny}",
                *TINY)
    assert r.code == 0, r.err
    rows = _rows(out / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"] and rows[:2] == before
    assert json.loads((out / "last" / "model.json").read_text())["epoch"] == 3


def test_same_seed_same_run_on_cpu(capsys, tmp_path, tiny):
    for name in ("a", "b"):
        assert _train(capsys, SOFTMAX, tiny, tmp_path / name).code == 0
    losses = [[row["train_loss"] for row in _rows(tmp_path / n / "metrics.csv")] for n in ("a", "b")]
    assert losses[0] == losses[1]


def _refused(capsys, tmp_path, *args, words=()):
    out = tmp_path / "never"
    r = run_cli(capsys, "train", *TINY, *args, "--out", out)
    assert r.code == 2, (r.out, r.err)
    assert r.err.startswith("error:") and no_traceback(r.err)
    for word in words:
        assert word in r.err, (word, r.err)
    assert not out.exists()
    return r


def test_softmax_with_one_class_exits_2_naming_sigmoid_and_background(capsys, tmp_path, tiny):
    _refused(capsys, tmp_path, SOFTMAX, "--set", f"data.root={tiny}", "--set", "data.classes=[nucleus]",
             words=("sigmoid", "background"))


@pytest.mark.parametrize("override,words", [
    ("train.epoch=3", ("train.epoch", "unknown key")),
    ("train.epochs=abc", ("train.epochs", "'abc'")),
    ("train.crop=100", ("train.crop", "multiple of 32")),
    ("train.loss=ce", ("train.loss", "sigmoid")),
    ("model.head=argmax", ("model.head",)),
    ("data.mask=binary2", ("data.mask",)),
])
def test_bad_config_exits_2_naming_the_key(capsys, tmp_path, tiny, override, words):
    _refused(capsys, tmp_path, SIGMOID, "--set", f"data.root={tiny}", "--set", override, words=words)


def test_missing_config_file_and_bad_yaml(capsys, tmp_path):
    _refused(capsys, tmp_path, tmp_path / "nope.yaml", words=("nope.yaml", "not found"))
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    _refused(capsys, tmp_path, tmp_path / "bad.yaml", words=("bad.yaml", "YAML"))


def test_missing_mask_corrupt_image_and_bad_values_exit_2_naming_the_file(capsys, tmp_path, tiny):
    data = copy_subset(NUCLEI, tmp_path / "d", 6)
    masks = sorted((data / "train" / "masks").iterdir())
    images = sorted((data / "train" / "images").iterdir())
    masks[0].unlink()
    r = _refused(capsys, tmp_path, SIGMOID, "--set", f"data.root={data}", words=(images[0].name, "no mask"))
    shutil.copy(NUCLEI / "train" / "masks" / masks[0].name, masks[0])
    images[1].write_bytes(b"\x89PNG garbage" * 20)
    _refused(capsys, tmp_path, SIGMOID, "--set", f"data.root={data}", words=(images[1].name, "cannot read"))
    shutil.copy(NUCLEI / "train" / "images" / images[1].name, images[1])
    arr = np.asarray(Image.open(masks[2])) // 255  # 0/1 index mask ...
    arr = arr.copy()
    arr[0, 0] = 5  # ... with a value outside [background, nucleus]
    Image.fromarray(arr.astype(np.uint8)).save(masks[2])
    _refused(capsys, tmp_path, SOFTMAX, "--set", f"data.root={data}", "--set", "data.mask=index",
             words=(masks[2].name, "[5]", "ignore"))
    shutil.copy(NUCLEI / "train" / "masks" / masks[2].name, masks[2])
    Image.open(masks[3]).resize((40, 90)).save(masks[3])
    _refused(capsys, tmp_path, SIGMOID, "--set", f"data.root={data}", words=(masks[3].name, "aspect"))
    assert r.code == 2


def test_mask_at_another_resolution_with_same_aspect_is_resized_and_logged(capsys, tmp_path, caplog):
    data = copy_subset(NUCLEI, tmp_path / "d", 6)
    mask = sorted((data / "train" / "masks").iterdir())[0]
    im = Image.open(mask)
    im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(mask)
    r = _train(capsys, SIGMOID, data, tmp_path / "run")
    assert r.code == 0, r.err
    assert "resized" in caplog.text


def test_softmax_refuses_overlapping_isic_masks(capsys, tmp_path):
    _refused(capsys, tmp_path, CONFIGS / "isic2018-multilabel-mini.yaml", "--set", "model.head=softmax",
             "--set", "train.loss=ce+dice",
             "--set", f"data.root={DATASETS / 'isic2018-multilabel-mini'}",
             words=("more than one label", "sigmoid"))


def test_inspect_recommends_the_head(capsys):
    r = run_cli(capsys, "inspect", NUCLEI)
    assert r.code == 0 and "head: sigmoid" in r.out and "no class" in r.out
    r = run_cli(capsys, "inspect", DATASETS / "isic2018-multilabel-mini")
    assert r.code == 0 and "multilabel" in r.out and "sigmoid head is required" in r.out


def test_inspect_numbers_on_camvid_subset(tmp_path, capsys):
    src = DATASETS / "camvid"
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
        for path in sorted((src / kind / "val").iterdir())[:4]:
            shutil.copy(path, tmp_path / kind / path.name)
    (tmp_path / "images" / "extra.png").write_bytes((tmp_path / "images" / path.name).read_bytes())
    r = run_cli(capsys, "inspect", tmp_path, "--config", CONFIGS / "camvid.yaml", "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head"] == "softmax" and report["overlap_share"] == 0 and report["unlabeled_share"] == 0
    assert report["splits"]["all"]["without_mask"] == 1
    truth = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((tmp_path / "masks").iterdir())])
    valid = truth != 11
    assert report["class_frequency"]["Road"] == pytest.approx((truth[valid] == 3).mean())
