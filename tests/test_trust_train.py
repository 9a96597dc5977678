"""Every loss of both heads trains (focal included, ignored pixels left out), early stopping stops at the
epoch the patience says, and a non-finite loss stops with exit 1 naming the epoch and step, last/ intact.

Loss values are checked against hand computations and against a second implementation (smp's binary
focal loss on the flattened valid entries, torch's cross-entropy at gamma 0). What `segkit train` logs
for every loss of both heads, focal included, is recomputed by hand in test_cli_options.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import segkit.train
from conftest import CONFIGS, NUCLEI, run_cli, small_nuclei_stems, train_args
from segkit.heads import IGNORE, MaskedSoftmaxFocal, SigmoidHead, SoftmaxHead
from segkit.model import load_checkpoint

SIGMOID = CONFIGS / "nuclei-sigmoid.yaml"
HEADS = {"sigmoid": SigmoidHead(["nucleus"]), "softmax": SoftmaxHead(["background", "nucleus"])}


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- focal losses: values ----------------------------------------------------------------------------------------


def test_sigmoid_focal_equals_smp_binary_focal_on_the_valid_entries():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5) * 3
    target = (torch.rand(2, 3, 6, 5) > 0.6).float()
    target[0, 1, :3] = IGNORE  # one class of one image ignored in part: the (N, C, H, W) mask smp trips on
    target[1, :, :, 0] = IGNORE
    valid = target != IGNORE
    expected = smp.losses.FocalLoss("binary")(logits[valid], target[valid])
    got = SigmoidHead(["a", "b", "c"]).loss("focal")(logits, target)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)


def test_focal_by_hand_for_both_heads():
    # sigmoid: logit 0, target 1 -> p_t = 1/2, BCE = ln 2, focal = (1 - 1/2)^2 ln 2; the ignored entry counts for nothing
    logits = torch.tensor([0.0, 7.0]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, IGNORE]).view(1, 1, 1, 2)
    assert SigmoidHead(["a"]).loss("focal")(logits, target).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert SigmoidHead(["a"]).loss("focal", [2.0])(logits, target).item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    # softmax: logits (0, ln 3) -> p = (1/4, 3/4); target 1 -> -(1 - 3/4)^2 ln(3/4)
    logits = torch.tensor([[0.0, 5.0], [math.log(3), -5.0]]).view(1, 2, 1, 2)
    target = torch.tensor([1, IGNORE]).view(1, 1, 2)
    expected = -(0.25 ** 2) * math.log(0.75)
    assert SoftmaxHead(["a", "b"]).loss("focal")(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_focal_at_gamma_0_is_weighted_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, :2] = IGNORE
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    got = MaskedSoftmaxFocal(weights, gamma=0.0)(logits, target)
    assert torch.allclose(got, F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE), rtol=1e-6)


@pytest.mark.parametrize("name", ["focal", "focal+dice"])
@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_focal_losses_ignore_what_is_ignored(head, name):
    torch.manual_seed(2)
    logits = torch.randn(1, 2, 4, 4)
    changed = logits.clone()
    changed[..., 0, :] += 50  # only row 0 differs ...
    if head == "sigmoid":
        target = (torch.rand(1, 2, 4, 4) > 0.5).float()
        target[..., 0, :] = IGNORE  # ... and row 0 is ignored
        loss = SigmoidHead(["a", "b"]).loss(name)
    else:
        target = torch.randint(0, 2, (1, 4, 4))
        target[..., 0, :] = IGNORE
        loss = SoftmaxHead(["a", "b"]).loss(name)
    assert torch.equal(loss(logits, target), loss(changed, target))


# -- every loss of both heads learns ------------------------------------------------------------------------------


def _real_pixels(head: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One real nuclei crop (64 x 64) as a normalised input and the head's target, a band of rows ignored."""
    stem = small_nuclei_stems(1)[0]
    image = np.array(Image.open(NUCLEI / "train" / "images" / f"{stem}.png").convert("RGB"))[:64, :64]
    mask = np.asarray(Image.open(NUCLEI / "train" / "masks" / f"{stem}.png"))[:64, :64] > 0
    valid = np.ones_like(mask)
    valid[:8] = False
    labels = (mask[..., None] if head == "sigmoid" else np.stack([~mask, mask], axis=-1)).astype(np.uint8)  # multi-hot
    target = HEADS[head].targets(labels, valid)[None]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return (x - x.mean()) / x.std(), target


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_every_loss_of_the_head_learns_a_real_mask_and_gives_ignored_pixels_no_gradient(head):
    """A per-pixel linear model fitted by each loss for 30 steps: the ignored rows get exactly zero
    gradient, the loss falls, and the fitted model's mask of the valid rows is the real one: Dice
    measured 0.80-0.91 (sigmoid) and 0.71-0.87 (softmax) over the five losses, against 0.075 for an
    all-nucleus mask (nuclei cover 3.9% of the crop); a loss that pushed the wrong way, or a gradient
    that missed the valid pixels, stays far below 0.6."""
    x, target = _real_pixels(head)
    truth = (target[0, 0] if head == "sigmoid" else target[0])[8:] == 1
    for name in HEADS[head].loss_names():
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, HEADS[head].channels, 1)
        loss_fn = HEADS[head].loss(name)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        logits = model(x).detach().requires_grad_(True)
        loss_fn(logits, target).backward()
        assert logits.grad[..., :8, :].abs().max() == 0, name
        assert logits.grad[..., 8:, :].abs().max() > 0, name
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])
        with torch.no_grad():
            masks = HEADS[head].decode(model(x))
        pred = (masks[0, 0] if head == "sigmoid" else masks[0] == 1)[8:]
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert dice > 0.6, (name, float(dice))


# -- early stopping -------------------------------------------------------------------------------------------------


def test_early_stop_stops_at_the_epoch_the_patience_says(tiny_nuclei, tmp_path, monkeypatch):
    """Validation is scripted to Dice 0.5, 0.4, 0.6, 0.6, 0.5, 0.9 (tp, fp + fn chosen for each). With
    patience 2: epoch 3 improves (counter reset), 4 ties (1: a tie is no improvement), 5 is worse (2):
    training stops after epoch 5, best/ is epoch 3 and epoch 6 never runs."""
    script = iter([(1, 2), (1, 3), (3, 4), (3, 4), (1, 2), (9, 2)])  # 2tp / (2tp + fp + fn)
    calls = []

    def scripted(*args, **kwargs):
        tp, wrong = next(script)
        calls.append(tp)
        return 0.5, {None: np.array([[tp, wrong, 0, 100]])}  # images: one pooled unit

    monkeypatch.setattr(segkit.train, "validate", scripted)
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.early_stop_patience=2", "--set",
                            "train.steps_per_epoch=1", "--set", "train.save_every=10", epochs=6))
    assert r.code == 0, r.err
    assert "early stop after 5 epochs; best validation mean Dice 0.6000 at epoch 3" in r.out
    assert len(calls) == 5
    assert [float(row["val_mean_dice"]) for row in _rows(run)] == [0.5, 0.4, 0.6, 0.6, 0.5]
    assert json.loads((run / "best" / "model.json").read_text())["epoch"] == 3
    state = torch.load(run / "last" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["best_epoch"], state["bad_epochs"]) == (5, 3, 2)


# -- non-finite loss --------------------------------------------------------------------------------------------------


def test_a_nan_input_stops_with_exit_1_naming_epoch_and_step_and_last_stays_loadable(tiny_nuclei, tmp_path,
                                                                                   monkeypatch):
    """NaN pixels in the 5th batch (epoch 2, step 2 of 3): the loss is NaN there; losses are read back at
    the end of the epoch (train.log_every 50) and the message still names that step."""
    real, build, calls, models, epoch_1 = segkit.train.to_network, segkit.train.build_model, [], [], {}

    def kept(*args, **kwargs) -> torch.nn.Module:
        models.append(build(*args, **kwargs))
        return models[-1]

    def poisoned(*args, **kwargs):
        x, target = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # epoch 2's first step: the weights are epoch 1's
            epoch_1.update({k: v.detach().clone() for k, v in models[0].state_dict().items()})
        return (torch.full_like(x, math.nan) if len(calls) == 5 else x), target

    monkeypatch.setattr(segkit.train, "build_model", kept)
    monkeypatch.setattr(segkit.train, "to_network", poisoned)
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.steps_per_epoch=3", epochs=3))
    assert r.code == 1, r.err
    assert "training stopped: non-finite loss (nan) at epoch 2, step 2; stopped, last/ holds epoch 1." in r.err
    assert "Fix: lower train.lr" in r.err and "Traceback" not in r.err
    assert len(calls) == 6 and len(_rows(run)) == 1
    assert torch.load(run / "last" / "train_state.pt", weights_only=True)["epoch"] == 1
    _, _, meta = load_checkpoint(run / "last")
    assert meta["epoch"] == 1
    saved = load_file(str(run / "last" / "model.safetensors"))  # epoch 1's weights, not the NaN-poisoned ones
    assert saved.keys() == epoch_1.keys() and all(torch.equal(saved[k], epoch_1[k]) for k in saved)
    assert not all(torch.equal(saved[k], v) for k, v in models[0].state_dict().items())  # the live model went on


def test_a_huge_learning_rate_stops_with_exit_1_before_any_checkpoint(tiny_nuclei, tmp_path):
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.lr=1e30", "--set", "train.steps_per_epoch=3",
                            "--set", "train.log_every=1", epochs=1))
    assert r.code == 1, r.err
    assert "training stopped: non-finite loss" in r.err and "at epoch 1, step " in r.err
    assert "no checkpoint yet" in r.err and "Traceback" not in r.err
    assert not (run / "last").exists()
