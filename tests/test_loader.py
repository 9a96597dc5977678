"""The training data path: every sample equals a straightforward reference made from the whole
image, the bytes that cross to the device are compact, and the step loop's logging cadence and
resume do not change a run."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import CONFIGS, DATASETS, copy_nuclei, run_cli, train_args
from segkit.config import AugmentConfig, DataConfig, load_config
from segkit.data.dataset import SegmentationDataset, fit_normalization, scan, to_network
from segkit.data.splits import pair_reader, split_samples
from segkit.data.transforms import train_transform
from segkit.heads import IGNORE, build_head

CAMVID = DATASETS / "camvid"
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]


def reference(image, labels, valid, crop, seed, epoch, i, aug):
    """The sample by hand: the same random draws, applied to the whole decoded image with plain numpy."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, i]))
    h, w = image.shape[:2]
    wh, ww = min(crop, h), min(crop, w)
    y, x = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    img, lab, val = image[y:y + wh, x:x + ww], labels[y:y + wh, x:x + ww], valid[y:y + wh, x:x + ww]
    real = np.ones(img.shape[:2], bool)
    ph, pw = crop - wh, crop - ww
    if ph or pw:
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        img = np.pad(img, pad + ((0, 0),))
        lab, val, real = np.pad(lab, pad + ((0, 0),)), np.pad(val, pad), np.pad(real, pad)
    turns = []
    if rng.random() < aug.hflip:
        turns.append(lambda a: a[:, ::-1])
    if rng.random() < aug.vflip:
        turns.append(lambda a: a[::-1])
    if rng.random() < aug.rotate90:
        k = int(rng.integers(1, 4))
        turns.append(lambda a: np.rot90(a, k))
    for f in turns:
        img, lab, val, real = f(img), f(lab), f(val), f(real)
    jitter = (1.0, 0.0)
    if rng.random() < aug.color:
        jitter = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.25, 0.25)))
    return img, lab, val, real, jitter


@pytest.mark.parametrize("head_name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cache", [True, False])
def test_samples_equal_a_reference_made_from_the_whole_image(head_name, cache):
    """CamVid (index masks with an ignore value): pixels, targets, ignored pixels and the network input."""
    cfg = DataConfig(root=CAMVID, classes=CLASSES, mask="index", ignore_index=11)
    reader = pair_reader(cfg)
    samples = split_samples(cfg, "val")[:4]
    head = build_head(head_name, CLASSES)
    records = scan(samples, reader, head, cache=cache)
    norm = fit_normalization("auto", records, reader, 3, None, None)
    assert norm.mode == "imagenet"
    aug = AugmentConfig(color=0.5)
    crop = 384  # larger than CamVid's 360 rows: exercises padding
    ds = SegmentationDataset(records, reader, head, train_transform(crop, aug), norm, crop=crop,
                             color=aug.color, seed=7)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i, s in enumerate(samples):
            whole = reader.read(s)
            img, lab, val, real, jitter = reference(whole.image, whole.labels, whole.valid, crop, 7, epoch, i, aug)
            item = ds[i]
            assert item.image.dtype == torch.uint8 and item.target.dtype == torch.uint8  # compact on the wire
            assert np.array_equal(item.image.numpy(), img.transpose(2, 0, 1))
            assert np.array_equal(item.real.numpy(), real)
            assert tuple(item.jitter.tolist()) == pytest.approx(jitter)
            x, target = to_network(default_collate([item]), norm, head, torch.device("cpu"))
            want = head.targets(np.ascontiguousarray(lab), np.ascontiguousarray(val) & real)
            assert torch.equal(target[0], want)
            assert (target[0] == IGNORE).any() if head_name == "softmax" else True
            mean = np.array(norm.mean)[:, None, None]
            std = np.array(norm.std)[:, None, None]
            by_hand = (img.transpose(2, 0, 1) - mean) / std * jitter[0] + jitter[1]
            by_hand = np.where(real[None], by_hand, 0)
            assert np.allclose(x[0].numpy(), by_hand, atol=1e-4)


def test_compact_targets_expand_to_the_targets():
    rng = np.random.default_rng(0)
    for name, classes in (("softmax", ["a", "b", "c"]), ("sigmoid", ["a", "b"])):
        head = build_head(name, classes)
        for _ in range(20):
            h, w = rng.integers(1, 20, 2)
            index = rng.integers(0, len(classes), (h, w))
            labels = (index[:, :, None] == np.arange(len(classes))).astype(np.uint8)
            if name == "sigmoid":
                labels = rng.integers(0, 2, (h, w, len(classes))).astype(np.uint8)
            valid = rng.random((h, w)) > 0.3
            full = head.targets(labels, valid)
            compact = head.compact_targets(labels, valid)
            assert compact.dtype == torch.uint8 and torch.equal(head.expand_targets(compact), full)
            if name == "softmax":
                assert torch.equal(full, torch.from_numpy(np.where(valid, index, IGNORE)))
            else:
                want = np.where(valid[None], labels.transpose(2, 0, 1).astype(np.int64), IGNORE).astype(np.float32)
                assert torch.equal(full, torch.from_numpy(want))


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_log_cadence_does_not_change_the_run(tmp_path):
    """A run that reads its loss back every step equals one that does every 3 steps (the same mean train
    loss per epoch, the same weights): the cadence only changes when the host waits."""
    data = copy_nuclei(tmp_path / "data", 6)
    config = CONFIGS / "nuclei-sigmoid.yaml"
    steps = ("--set", "train.steps_per_epoch=4")
    assert run_cli(*train_args(config, data, tmp_path / "a", *steps, "--set", "train.log_every=1", epochs=2)).code == 0
    assert run_cli(*train_args(config, data, tmp_path / "b", *steps, "--set", "train.log_every=3", epochs=2)).code == 0
    a = _rows(tmp_path / "a" / "metrics.csv")
    for other in ("b",):
        rows = _rows(tmp_path / other / "metrics.csv")
        assert len(rows) == 2
        for ra, rb in zip(a, rows):
            for key in ra:
                if key not in ("seconds", "images_per_s"):
                    assert ra[key] == rb[key], (other, key)
        wa, wb = load_file(str(tmp_path / "a" / "last" / "model.safetensors")), \
            load_file(str(tmp_path / other / "last" / "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), other


def test_tensorboard_logs_steps_scores_and_overlays(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = copy_nuclei(tmp_path / "data", 6)
    out = tmp_path / "run"
    r = run_cli(*train_args(CONFIGS / "nuclei-softmax.yaml", data, out, "--set", "train.tensorboard=true",
                            "--set", "train.log_every=1", epochs=2))
    assert r.code == 0, r.err
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "epoch/val_mean_dice", "epoch/dice_nucleus"} <= set(tags["scalars"])
    assert len(acc.Scalars("train/loss")) == 4  # 2 steps x 2 epochs, one point per read-back
    rows = _rows(out / "metrics.csv")
    logged = [e.value for e in acc.Scalars("epoch/val_mean_dice")]
    assert logged == pytest.approx([float(r["val_mean_dice"]) for r in rows], rel=1e-6)
    assert len(tags["images"]) == 1  # one overlay per validation image (6 images x 0.2 = 1 held out)
    assert len(acc.Images(tags["images"][0])) == 2  # one per validated epoch
