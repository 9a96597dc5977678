"""Every `segkit predict` option that changes the output, checked against the model run here by hand
(smp model, safetensors weights, model.json normalisation applied with numpy: not segkit's code path),
and every loss of every head trained for a step."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import segkit.train
from conftest import CONFIGS, NUCLEI, run_cli, small_nuclei_stems, train_args
from reference import batch_logits, model_logits, unet
from segkit.config import load_config
from segkit.data.normalize import Normalization
from segkit.data.splits import train_val_samples
from segkit.heads import HEADS, build_head
from segkit.infer import Segmenter
from segkit.model import build_model, checkpoint_meta, save_checkpoint

RUN = ["--device", "cpu", "--no-progress", "--workers", "0"]
FLIPS = ((), (-1,), (-2,), (-2, -1))


def nuclei_images(dst: Path, n: int = 2) -> dict[str, np.ndarray]:
    """The first `n` 256x256 real nuclei test images copied into `dst`: stem -> RGB array."""
    dst.mkdir(parents=True)
    images = {}
    for stem in small_nuclei_stems(n, "test"):
        shutil.copy(NUCLEI / "test" / "images" / f"{stem}.png", dst / f"{stem}.png")
        with Image.open(dst / f"{stem}.png") as im:
            images[stem] = np.asarray(im.convert("RGB"))
    return images


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


# -- --tta ------------------------------------------------------------------------------------------


def test_tta_masks_are_the_argmax_of_the_mean_of_four_flipped_logits(tmp_path, content_checkpoints):
    ckpt = content_checkpoints["softmax"]
    images = nuclei_images(tmp_path / "in", 1)
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        r = run_cli("predict", ckpt, tmp_path / "in", tmp_path / name, *RUN, *extra)
        assert r.code == 0, r.err
    changed = 0
    for stem, image in images.items():
        plain = model_logits(ckpt, image)
        tta = model_logits(ckpt, image, FLIPS)
        for name, logits in (("plain", plain), ("tta", tta)):
            got = read_png(tmp_path / name / f"{stem}.png")
            top = np.sort(logits, axis=0)
            clear = top[-1] - top[-2] > 1e-3  # away from ties, where float rounding may decide
            assert clear.mean() > 0.99
            assert np.array_equal(got[clear], logits.argmax(0)[clear]), (stem, name)
        changed += int((plain.argmax(0) != tta.argmax(0)).sum())
    assert changed > 1000  # TTA changes this model's masks: the test can tell the two apart


# -- --threshold ----------------------------------------------------------------------------------


def test_threshold_decides_the_masks_as_probability_above_it(tmp_path, content_checkpoints):
    ckpt = content_checkpoints["sigmoid"]
    images = nuclei_images(tmp_path / "in")
    for name, value in (("low", "0.3"), ("high", "nucleus=0.7"), ("default", None)):
        extra = [] if value is None else ["--threshold", value]
        r = run_cli("predict", ckpt, tmp_path / "in", tmp_path / name, *RUN, *extra)
        assert r.code == 0, r.err
    for stem, image in images.items():
        p = sigmoid(model_logits(ckpt, image)[0])
        masks = {}
        for name, t in (("low", 0.3), ("high", 0.7), ("default", 0.5)):  # default: the checkpoint's 0.5
            m = read_png(tmp_path / name / "nucleus" / f"{stem}.png")
            clear = np.abs(p - t) > 1e-5  # away from the threshold, where float rounding may decide
            assert clear.mean() > 0.999
            assert np.array_equal(m[clear], np.where(p[clear] > t, 255, 0)), (stem, name)
            assert np.isin(m[~clear], (0, 255)).all(), (stem, name)  # at a tie either value, no other
            masks[name] = m == 255
        between = (p > 0.3) & (p <= 0.7)
        assert between.mean() > 0.05  # the two thresholds must give different masks here ...
        assert (masks["low"] != masks["high"]).mean() > 0.05  # ... and they do
        assert not (masks["high"] & ~masks["low"]).any()


def test_threshold_is_strict_at_a_probability_equal_to_it(tmp_path):
    """A model whose logits are exactly 0: every probability is exactly 0.5. A pixel is foreground
    when its probability is above the threshold, so at 0.5 none is, and just below 0.5 all are."""
    torch.manual_seed(0)
    head = build_head("sigmoid", ["a"])
    model = build_model("Unet", "resnet18", 1)
    with torch.no_grad():
        model.segmentation_head[0].weight.zero_()
        model.segmentation_head[0].bias.zero_()
    save_checkpoint(tmp_path / "ckpt", model, checkpoint_meta(head, "Unet", "resnet18", 3,
                                                             Normalization.unit((0.5,) * 3, (0.25,) * 3)))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "x.png")
    seg = Segmenter.load(tmp_path / "ckpt", device="cpu")
    assert (seg.predict(read_png(tmp_path / "in" / "x.png"), probs=True).probs == 0.5).all()
    for name, t, want in (("at", "0.5", 0), ("below", "0.4999", 255)):
        r = run_cli("predict", tmp_path / "ckpt", tmp_path / "in", tmp_path / name, *RUN, "--threshold", t)
        assert r.code == 0, r.err
        assert (read_png(tmp_path / name / "a" / "x.png") == want).all(), name


# -- --save-probs -----------------------------------------------------------------------------------


def within_float16(got: np.ndarray, want: np.ndarray) -> bool:
    """float16 values within one float16 step of float64 probabilities (rounding is half a step)."""
    step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    return bool((np.abs(got.astype(np.float64) - want) <= step).all())


@pytest.mark.parametrize("head_name", ["softmax", "sigmoid"])
def test_save_probs_are_the_activated_logits_in_float16(tmp_path, content_checkpoints, head_name):
    ckpt = content_checkpoints[head_name]
    images = nuclei_images(tmp_path / "in")
    r = run_cli("predict", ckpt, tmp_path / "in", tmp_path / "out", *RUN, "--save-probs")
    assert r.code == 0, r.err
    seg = Segmenter.load(ckpt, device="cpu")
    for stem, image in images.items():
        saved = np.load(tmp_path / "out" / f"{stem}.npy")
        channels = 2 if head_name == "softmax" else 1
        assert saved.dtype == np.float16 and saved.shape == (channels, *image.shape[:2])
        api = seg.predict(image, probs=True).probs
        assert within_float16(saved, api.astype(np.float64)), stem
        logits = model_logits(ckpt, image)
        want = softmax(logits) if head_name == "softmax" else sigmoid(logits)
        assert within_float16(saved, want), (stem, float(np.abs(saved - want).max()))
        assert want.std() > 0.1  # probabilities spread over (0, 1): a wrong activation would show


# -- every loss of every head -------------------------------------------------------------------------

LOSSES = [(head, loss) for head in ("softmax", "sigmoid") for loss in HEADS[head].loss_names()]


class FirstStep(NamedTuple):
    """A one-step run: the losses metrics.csv logged, what the step started from, and the run folder."""

    train_loss: float
    val_loss: float
    weights: dict[str, torch.Tensor]
    x: torch.Tensor
    target: torch.Tensor
    run: Path


@pytest.fixture(scope="module")
def first_step(module_tmp, tiny_nuclei):
    """train(head, loss) -> FirstStep of a run of one step with that loss, one run each, cached. The
    weights the step started from and the normalised batch and target it was fed are recorded."""
    base = module_tmp("losses")
    done: dict[tuple[str, str], FirstStep] = {}

    def train(head: str, loss: str) -> FirstStep:
        if (head, loss) not in done:
            out = base / f"{head}-{loss.replace('+', '_')}"
            build, feed = segkit.train.build_model, segkit.train.to_network
            models, fed = [], []

            def recorded_build(*args, **kwargs) -> torch.nn.Module:
                models.append(build(*args, **kwargs))
                return models[-1]

            def recorded_feed(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
                x, target = feed(*args, **kwargs)
                fed.append(({k: v.detach().clone() for k, v in models[-1].state_dict().items()}, x.clone(),
                            target.clone()))
                return x, target

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(segkit.train, "build_model", recorded_build)
                mp.setattr(segkit.train, "to_network", recorded_feed)
                r = run_cli(*train_args(CONFIGS / f"nuclei-{head}.yaml", tiny_nuclei, out, "--set",
                                        f"train.loss={loss}", "--set", "train.steps_per_epoch=1", epochs=1))
            assert r.code == 0, (head, loss, r.err[-2000:])
            assert "completed after 1 epochs" in r.out
            with (out / "metrics.csv").open() as f:
                rows = list(csv.DictReader(f))
            assert [row["epoch"] for row in rows] == ["1"] and len(fed) == 1
            assert yaml.safe_load((out / "config.yaml").read_text())["train"]["loss"] == loss
            done[head, loss] = FirstStep(float(rows[0]["train_loss"]), float(rows[0]["val_loss"]), *fed[0], out)
        return done[head, loss]

    return train


def hand_loss(name: str, head: str, z: np.ndarray, nucleus: np.ndarray) -> float:
    """The loss `name` ("+" adds terms) of float64 logits z (N, C, H, W) for a (N, H, W) bool nucleus
    mask, every pixel valid, written out: BCE-with-logits and sigmoid focal (1 - p_t)^2 BCE averaged over
    pixels; cross-entropy and softmax focal -(1 - p_t)^2 log p_t averaged over pixels; Dice loss per class
    over the whole batch, 1 - 2 sum(p t) / (sum p + sum t), 0 for a class absent from the batch, averaged
    over classes (smp's DiceLoss)."""
    if head == "sigmoid":
        t = nucleus[:, None].astype(np.float64)
        bce = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
        terms = {"bce": bce.mean(), "focal": ((1 - np.exp(-bce)) ** 2 * bce).mean()}
        p = sigmoid(z)
    else:
        t = np.stack([~nucleus, nucleus], axis=1).astype(np.float64)
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        log_pt = (logp * t).sum(1)
        terms = {"ce": -log_pt.mean(), "focal": (-(1 - np.exp(log_pt)) ** 2 * log_pt).mean()}
        p = np.exp(logp)
    dims = (0, 2, 3)
    dice = 2 * (p * t).sum(dims) / np.maximum(p.sum(dims) + t.sum(dims), 1e-7)
    terms["dice"] = np.where(t.sum(dims) > 0, 1 - dice, 0.0).mean()
    return float(sum(terms[part] for part in name.split("+")))


@pytest.mark.parametrize("head,loss", LOSSES)
def test_every_loss_of_every_head_logs_its_value_by_hand(first_step, head, loss):
    """train_loss (one step) is the loss of the starting weights on the batch fed, and val_loss that of
    last/ (the weights after the step) on the 2 validation images, both recomputed by hand from an smp
    model's logits. Every run of a head starts from the same weights on the same batch (same seed)."""
    step, first = first_step(head, loss), first_step(head, HEADS[head].base_loss)
    assert torch.equal(step.x, first.x) and torch.equal(step.target, first.target)
    assert all(torch.equal(step.weights[k], first.weights[k]) for k in first.weights)
    model = unet("Unet", "resnet18", 3, 2 if head == "softmax" else 1).train()  # training mode: batch statistics
    model.load_state_dict(step.weights)
    with torch.no_grad():
        z = model(step.x.contiguous()).double().numpy()
    label = (step.target[:, 0] if head == "sigmoid" else step.target).numpy()
    assert set(np.unique(label).tolist()) == {0, 1}  # both classes in the batch, no ignored pixel
    rel = 1e-3 if "dice" in loss else 1e-5  # smp's DiceLoss sums ~1e5 float32 values: ~1e-4 of rounding
    assert step.train_loss == pytest.approx(hand_loss(loss, head, z, label == 1), rel=rel)

    cfg = load_config(step.run / "config.yaml")
    _, val = train_val_samples(cfg.data, cfg.train.seed)
    images = [np.asarray(Image.open(s.image).convert("RGB")) for s in val]
    nucleus = np.stack([read_png(s.mask) > 0 for s in val])
    z = batch_logits(step.run / "last", images)
    assert step.val_loss == pytest.approx(hand_loss(loss, head, z, nucleus), rel=rel)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_combined_losses_add_up_and_focal_weighs_below_its_base_loss(first_step, head):
    """The loss a run reports is the loss it was told to use: from the same weights on the same batch,
    'x+dice' is 'x' plus 'dice', and focal, (1 - p_t)^2 times the base loss pixel by pixel, is lower."""
    base = HEADS[head].base_loss
    value = {loss: first_step(head, loss).train_loss for loss in HEADS[head].loss_names()}
    assert value[f"{base}+dice"] == pytest.approx(value[base] + value["dice"], rel=1e-5)
    assert value["focal+dice"] == pytest.approx(value["focal"] + value["dice"], rel=1e-5)
    assert 0 < value["focal"] < value[base]
