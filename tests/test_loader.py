"""The training data path: every sample equals a straightforward reference made from the whole
image, the bytes that cross to the device are compact, and the step loop's logging cadence and
resume do not change a run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import CONFIGS, copy_nuclei, run_cli, train_args
from samples import HIPPO_CASES, HIPPO_CLASSES, hippo_slices
from segkit.config import AugmentConfig, DataConfig
from segkit.data.dataset import SegmentationDataset, fit_normalization, scan, to_network
from segkit.data.splits import pair_reader, split_samples
from segkit.data.transforms import train_transform
from segkit.heads import IGNORE, build_head

VOID = 255  # the ignore value of the hippocampus slices' boundary ring


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


def hand_target(index: np.ndarray, ignored: np.ndarray, head_name: str, channels: int) -> np.ndarray:
    """The training target from an index mask by hand: softmax the class index, sigmoid one binary plane per
    class; IGNORE (-1) wherever the pixel is ignored."""
    if head_name == "softmax":
        return np.where(ignored, IGNORE, index.astype(np.int64))
    planes = (index[None] == np.arange(channels)[:, None, None]).astype(np.float32)
    return np.where(ignored[None], np.float32(IGNORE), planes)


@pytest.fixture(scope="module")
def hippo(module_tmp):
    """Real hippocampus slices (35 x 51): index masks of 3 exclusive classes with a VOID boundary ring."""
    return hippo_slices(module_tmp("hippo"), "val", HIPPO_CASES[:1], every=6, ignore=VOID)


def assert_samples_match_the_reference(cfg: DataConfig, head_name: str, cache: bool, crop: int) -> None:
    """The first 4 validation samples of `cfg` (index masks, ignore value cfg.ignore_index), two epochs:
    pixels, targets, ignored pixels and the network input against the files read and cropped by hand."""
    reader = pair_reader(cfg)
    samples = split_samples(cfg, "val")[:4]
    assert len(samples) == 4
    head = build_head(head_name, cfg.classes)
    records = scan(samples, reader, head, cache=cache)
    norm = fit_normalization("auto", records, reader, 3, None, None)
    assert norm.mode == "imagenet"
    aug = AugmentConfig(color=0.5)
    ds = SegmentationDataset(records, reader, head, train_transform(crop, aug), norm, crop=crop,
                             color=aug.color, seed=7)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i, s in enumerate(samples):
            with Image.open(s.image) as im:
                image = np.asarray(im.convert("RGB"))
            with Image.open(s.mask) as im:
                index = np.asarray(im)
            img, lab, _, real, jitter = reference(image, index[:, :, None], np.ones(index.shape, bool), crop, 7,
                                                  epoch, i, aug)
            item = ds[i]
            assert item.image.dtype == torch.uint8 and item.target.dtype == torch.uint8  # compact on the wire
            assert np.array_equal(item.image.numpy(), img.transpose(2, 0, 1))
            assert np.array_equal(item.real.numpy(), real)
            assert tuple(item.jitter.tolist()) == pytest.approx(jitter)
            x, target = to_network(default_collate([item]), norm, head, torch.device("cpu"))
            lab = lab[:, :, 0]
            want = hand_target(lab, (lab == cfg.ignore_index) | ~real, head_name, len(cfg.classes))
            assert target.dtype == (torch.long if head_name == "softmax" else torch.float32)
            assert np.array_equal(target[0].numpy(), want)
            mean = np.array(norm.mean)[:, None, None]
            std = np.array(norm.std)[:, None, None]
            by_hand = (img.transpose(2, 0, 1) - mean) / std * jitter[0] + jitter[1]
            by_hand = np.where(real[None], by_hand, 0)
            assert np.allclose(x[0].numpy(), by_hand, atol=1e-4)


@pytest.mark.parametrize("head_name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cache", [True, False])
def test_samples_equal_a_reference_made_from_the_whole_image(hippo, head_name, cache):
    """Real hippocampus slices, index masks with an ignore ring. The crop (48) is larger than the slices'
    35 rows and smaller than their 51 columns: one axis is padded, the other cropped."""
    cfg = DataConfig(root=hippo, classes=HIPPO_CLASSES, mask="index", ignore_index=VOID)
    assert_samples_match_the_reference(cfg, head_name, cache, crop=48)


@pytest.mark.parametrize("name, n_classes", [("softmax", 3), ("sigmoid", 2), ("softmax", 300)])
def test_compact_targets_expand_to_the_targets(name, n_classes):
    """What the loader sends (uint8 where it fits: 255 marks an ignored pixel) and what the device expands
    it to, both against targets written by hand from the label map; 300 softmax classes do not fit a byte."""
    rng = np.random.default_rng(0)
    head = build_head(name, [f"c{k}" for k in range(n_classes)])
    for _ in range(20):
        h, w = rng.integers(1, 20, 2)
        index = rng.integers(0, n_classes, (h, w))
        if name == "sigmoid":
            labels = rng.integers(0, 2, (h, w, n_classes)).astype(np.uint8)
        else:
            labels = (index[:, :, None] == np.arange(n_classes)).astype(np.uint8)
        valid = rng.random((h, w)) > 0.3
        compact = head.compact_targets(labels, valid)
        if name == "sigmoid":
            sent = np.where(valid[None], labels.transpose(2, 0, 1), 255)
            want = np.where(valid[None], labels.transpose(2, 0, 1).astype(np.float32), np.float32(IGNORE))
        else:
            sent = np.where(valid, index, 255 if n_classes < 255 else IGNORE)
            want = np.where(valid, index, IGNORE)
        assert compact.dtype == (torch.uint8 if n_classes < 255 else torch.int16)
        assert np.array_equal(compact.numpy(), sent)
        full = head.expand_targets(compact)
        assert full.dtype == (torch.long if name == "softmax" else torch.float32)
        assert np.array_equal(full.numpy(), want)
        assert torch.equal(head.targets(labels, valid), full)
        batch = head.expand_targets(torch.stack([compact, compact]))  # a batch, as the loader collates it
        assert np.array_equal(batch.numpy(), np.stack([want, want]))


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cadence_runs(module_tmp):
    """Two runs of 3 steps x 2 epochs on 6 real nuclei images, the same but for how the loss is read back:
    a every step, with TensorBoard logging; b every 2 steps (the last read of each epoch is a partial one).
    last/ is written once, at the end (what the tests compare)."""
    tmp = module_tmp("cadence")
    data = copy_nuclei(tmp / "data", 6)
    config = CONFIGS / "nuclei-sigmoid.yaml"
    steps = ("--set", "train.steps_per_epoch=3", "--set", "train.save_every=2")
    for name, extra in (("a", ("--set", "train.log_every=1", "--set", "train.tensorboard=true")),
                        ("b", ("--set", "train.log_every=2"))):
        r = run_cli(*train_args(config, data, tmp / name, *steps, *extra, epochs=2))
        assert r.code == 0, r.err
    return tmp / "a", tmp / "b"


def test_log_cadence_does_not_change_the_run(cadence_runs):
    """A run that reads its loss back every step equals one that does every 2 steps (the same mean train
    loss per epoch, the same weights): the cadence only changes when the host waits; TensorBoard logging
    does not change the run either."""
    a, b = cadence_runs
    rows_a, rows_b = _rows(a / "metrics.csv"), _rows(b / "metrics.csv")
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert list(ra) == list(rb)
        for key in ra:
            if key not in ("seconds", "images_per_s"):
                assert ra[key] == rb[key], key
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensorboard_logs_steps_scores_and_overlays(cadence_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = cadence_runs[0]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "epoch/val_mean_dice", "epoch/dice_nucleus"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # one point per read-back
    rows = _rows(out / "metrics.csv")
    losses = [e.value for e in acc.Scalars("train/loss")]
    for epoch, row in enumerate(rows):  # the epoch's train loss is the mean of its steps' losses
        assert float(row["train_loss"]) == pytest.approx(np.mean(losses[3 * epoch: 3 * epoch + 3]), rel=1e-5)
    logged = [e.value for e in acc.Scalars("epoch/val_mean_dice")]
    assert logged == pytest.approx([float(r["val_mean_dice"]) for r in rows], rel=1e-6)
    assert len(tags["images"]) == 1  # one overlay per validation image (6 images x 0.2 = 1 held out)
    assert len(acc.Images(tags["images"][0])) == 2  # one per validated epoch
