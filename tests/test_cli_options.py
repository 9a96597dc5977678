"""Every `segkit predict` option that changes the output, checked against the model run here by hand
(smp model, safetensors weights, model.json normalisation applied with numpy: not segkit's code path),
and every loss of every head trained for a step."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CONFIGS, NUCLEI, run_cli, small_nuclei_stems, train_args
from segkit.data.normalize import Normalization
from segkit.heads import HEADS, build_head
from segkit.infer import Segmenter
from segkit.model import build_model, checkpoint_meta, save_checkpoint

RUN = ["--device", "cpu", "--no-progress", "--workers", "0"]
FLIPS = ((), (-1,), (-2,), (-2, -1))


def hand_model(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A checkpoint's model and model.json, loaded without segkit: smp model, safetensors weights."""
    meta = json.loads((folder / "model.json").read_text())
    model = smp.create_model(meta["arch"], encoder_name=meta["encoder"], encoder_weights=None,
                             in_channels=meta["in_channels"], classes=len(meta["classes"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), meta


def model_logits(folder: Path, image: np.ndarray, flips: tuple[tuple[int, ...], ...] = ((),)) -> np.ndarray:
    """(C, H, W) float64 logits of a checkpoint, averaged over `flips` of the input (each flipped
    back), computed without segkit: model.json's normalisation applied with numpy. H and W are
    multiples of 32, so no padding is involved."""
    model, meta = hand_model(folder)
    norm = meta["normalization"]
    x = (image.astype(np.float64) - np.array(norm["mean"])) / np.array(norm["std"])
    x = torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None]
    with torch.no_grad():
        out = model(torch.cat([x.flip(dims) if dims else x for dims in flips]))  # one batch of the flips
    back = [o.flip(dims) if dims else o for o, dims in zip(out, flips)]  # (C, H, W) each: -1, -2 are W, H
    return torch.stack(back).double().mean(0).numpy()


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
            assert set(np.unique(m).tolist()) <= {0, 255}
            clear = np.abs(p - t) > 1e-5
            assert clear.mean() > 0.999
            assert np.array_equal(m[clear] == 255, p[clear] > t), (stem, name)
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


@pytest.fixture(scope="module")
def first_step(tmp_path_factory, tiny_nuclei):
    """train(head, loss) -> the training loss of the first step (from metrics.csv), one run each, cached:
    every run starts from the same weights on the same batch (same seed), so losses compare exactly."""
    base = tmp_path_factory.mktemp("losses")
    done: dict[tuple[str, str], float] = {}

    def train(head: str, loss: str) -> float:
        if (head, loss) not in done:
            out = base / f"{head}-{loss.replace('+', '_')}"
            r = run_cli(*train_args(CONFIGS / f"nuclei-{head}.yaml", tiny_nuclei, out, "--set", f"train.loss={loss}",
                                    "--set", "train.steps_per_epoch=1", epochs=1))
            assert r.code == 0, (head, loss, r.err[-2000:])
            with (out / "metrics.csv").open() as f:
                rows = list(csv.DictReader(f))
            assert [row["epoch"] for row in rows] == ["1"]
            assert math.isfinite(float(rows[0]["val_loss"])), (head, loss)
            assert yaml_loss(out) == loss
            done[head, loss] = float(rows[0]["train_loss"])
        return done[head, loss]

    return train


def yaml_loss(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["train"]["loss"]


@pytest.mark.parametrize("head,loss", LOSSES)
def test_every_loss_of_every_head_trains(first_step, head, loss):
    value = first_step(head, loss)
    assert math.isfinite(value) and value > 0, value
    if loss == "dice":
        assert value < 1  # a soft Dice loss is 1 - Dice


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_combined_losses_add_up_and_focal_weighs_below_its_base_loss(first_step, head):
    """The loss a run reports is the loss it was told to use: from the same weights on the same batch,
    'x+dice' is 'x' plus 'dice', and focal, (1 - p_t)^2 times the base loss pixel by pixel, is lower."""
    base = HEADS[head].base_loss
    value = {loss: first_step(head, loss) for loss in HEADS[head].loss_names()}
    assert value[f"{base}+dice"] == pytest.approx(value[base] + value["dice"], rel=1e-5)
    assert value["focal+dice"] == pytest.approx(value["focal"] + value["dice"], rel=1e-5)
    assert 0 < value["focal"] < value[base]
