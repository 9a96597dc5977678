"""The maths the two heads rely on, and the configurations they refuse, with exact expectations."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, ROOT, assert_refused, train_args
from segkit.errors import ConfigError
from segkit.heads import IGNORE, SigmoidHead, SoftmaxHead, build_head, parse_thresholds
from segkit.metrics import summarize

SOFTMAX = CONFIGS / "nuclei-softmax.yaml"


# -- softmax over two channels is a sigmoid of the difference ---------------------------------


def test_two_channel_softmax_is_sigmoid_of_the_logit_difference():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 16, 16, dtype=torch.float64) * 5
    a, b = logits[:, 0], logits[:, 1]
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(b - a), rtol=0, atol=1e-12)
    # and through the heads: the softmax head's foreground probability = the sigmoid head's
    soft = SoftmaxHead(["background", "fg"]).activate(logits)[:, 1]
    sig = SigmoidHead(["fg"]).activate((b - a).unsqueeze(1))[:, 0]
    assert torch.allclose(soft, sig, rtol=0, atol=1e-12)
    # float32, the training precision
    l32 = logits.float()
    assert torch.allclose(l32.softmax(1)[:, 1], torch.sigmoid(l32[:, 1] - l32[:, 0]), rtol=0, atol=1e-6)


def test_two_class_softmax_decodes_like_its_sigmoid_equivalent():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 32, 32) * 3
    soft = SoftmaxHead(["background", "nucleus"])
    sig = soft.sigmoid_equivalent()
    assert sig.name == "sigmoid" and sig.classes == ["nucleus"] and sig.thresholds == [0.5]
    diff = logits[:, 1:] - logits[:, :1]
    assert torch.equal(sig.decode(diff)[:, 0], soft.decode(logits) == 1)


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_one_channel_softmax_is_constant_and_its_cross_entropy_is_exactly_zero(scale):
    torch.manual_seed(0)
    logits = (torch.randn(3, 1, 8, 8) * scale).requires_grad_()
    assert torch.equal(logits.softmax(1), torch.ones_like(logits))
    loss = F.cross_entropy(logits, torch.zeros(3, 8, 8, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


# -- configurations a head refuses --------------------------------------------------------------


@pytest.mark.parametrize("classes", [["nucleus"], []])
def test_softmax_with_fewer_than_two_classes_is_refused_naming_the_fix(classes):
    with pytest.raises(ConfigError) as err:
        build_head("softmax", classes)
    text = str(err.value)
    assert "sigmoid" in text and "background" in text
    if classes:
        assert "data.classes: [nucleus]" in text and "[background, nucleus]" in text


def test_train_softmax_with_one_class_exits_2_naming_sigmoid_and_background(cli, tmp_path, tiny_nuclei):
    out = tmp_path / "run"
    r = cli(*train_args(SOFTMAX, tiny_nuclei, out, "--set", "data.classes=[nucleus]"))
    assert_refused(r, out, "sigmoid", "background", "model.head")


def test_train_softmax_with_one_class_as_a_real_process(tmp_path, tiny_nuclei):
    """The same refusal through `python -m cli`: exit status 2, one message, no traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", *map(str, train_args(SOFTMAX, tiny_nuclei, out, "--set",
                                                            "data.classes=[nucleus]"))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: model.head: softmax with one class"), done.stderr
    assert "sigmoid" in done.stderr and "background" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not out.exists()


def test_losses_belong_to_their_head():
    assert SoftmaxHead.loss_names() == ["ce", "dice", "ce+dice", "focal", "focal+dice"]
    assert SigmoidHead.loss_names() == ["bce", "dice", "bce+dice", "focal", "focal+dice"]
    with pytest.raises(ConfigError) as err:
        SoftmaxHead(["background", "fg"]).loss("bce")
    assert "'bce'" in str(err.value) and "for the sigmoid head" in str(err.value)
    with pytest.raises(ConfigError) as err:
        SigmoidHead(["fg"]).loss("ce+dice")
    assert "'ce+dice'" in str(err.value) and "for the softmax head" in str(err.value)
    with pytest.raises(ConfigError) as err:
        SigmoidHead(["fg"]).loss("lovasz")
    assert "'lovasz'" in str(err.value) and "is a loss for" not in str(err.value)
    assert len(SigmoidHead(["fg"]).loss("bce+dice").terms) == 2
    assert len(SoftmaxHead(["a", "b"]).loss().terms) == 2  # default ce+dice
    with pytest.raises(ConfigError, match="2 weights for 3 output channels"):
        SoftmaxHead(["a", "b", "c"]).loss("ce", class_weights=[1.0, 2.0])


def test_train_softmax_with_bce_exits_2_naming_the_loss(cli, tmp_path, tiny_nuclei):
    out = tmp_path / "run"
    r = cli(*train_args(SOFTMAX, tiny_nuclei, out, "--set", "train.loss=bce"))
    assert_refused(r, out, "train.loss", "'bce'", "sigmoid")


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, 2.0, [0.5, 1.0], [0.0, 0.5]])
def test_sigmoid_thresholds_must_be_probabilities(bad):
    classes = ["a", "b"] if isinstance(bad, list) else ["a"]
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        SigmoidHead(classes, thresholds=bad)


def test_sigmoid_thresholds_count_and_softmax_takes_none():
    assert SigmoidHead(["a", "b"]).thresholds == [0.5, 0.5]
    assert SigmoidHead(["a", "b"], thresholds=0.3).thresholds == [0.3, 0.3]
    assert SigmoidHead(["a", "b"], thresholds=[0.3, 0.7]).thresholds == [0.3, 0.7]
    with pytest.raises(ConfigError, match="1 values for 2 classes"):
        SigmoidHead(["a", "b"], thresholds=[0.5])
    with pytest.raises(ConfigError, match="argmax"):
        SoftmaxHead(["a", "b"], thresholds=0.5)
    assert parse_thresholds("a=0.3", ["a", "b"]) == [0.3, 0.5]
    assert parse_thresholds("0.4", ["a"]) == 0.4
    with pytest.raises(ConfigError, match="'c' is not a class"):
        parse_thresholds("c=0.3", ["a", "b"])


# -- decoding ---------------------------------------------------------------------------------


def test_softmax_decode_is_argmax():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 8, 8)
    masks = SoftmaxHead(["a", "b", "c", "d"]).decode(logits)
    assert masks.shape == (3, 8, 8) and masks.dtype == torch.long
    assert torch.equal(masks, logits.argmax(1))
    hand = torch.tensor([[[[0.1, 5.0]], [[-0.1, 2.0]], [[0.0, 7.0]]]])  # (1, 3, 1, 2)
    assert SoftmaxHead(["a", "b", "c"]).decode(hand).tolist() == [[[0, 2]]]


@pytest.mark.parametrize("logit,threshold,expected", [
    (0.1, 0.5, True),    # sigmoid(0.1) = 0.525 > 0.5
    (-0.1, 0.5, False),  # sigmoid(-0.1) = 0.475
    (0.3, 0.6, False),   # sigmoid(0.3) = 0.574 < 0.6 although the logit 0.3 > 0 ...
    (0.3, 0.55, True),   # ... and > 0.55
    (-2.0, 0.1, True),   # sigmoid(-2) = 0.119 > 0.1: a negative logit can be foreground
])
def test_sigmoid_decode_thresholds_probabilities(logit, threshold, expected):
    head = SigmoidHead(["fg"], thresholds=threshold)
    mask = head.decode(torch.full((1, 1, 2, 3), logit))
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 2, 3)
    assert mask.all().item() is expected and mask.any().item() is expected


def test_sigmoid_decode_uses_one_threshold_per_class():
    head = SigmoidHead(["a", "b"], thresholds=[0.6, 0.5])
    logits = torch.full((1, 2, 1, 1), 0.3)  # probability 0.574 in both channels
    assert head.decode(logits)[0, :, 0, 0].tolist() == [False, True]


# -- counting (tp, fp, fn, tn) with ignored pixels ------------------------------------------------


def test_softmax_stats_and_confusion_on_a_4x4_example():
    head = SoftmaxHead(["bg", "a", "b"])
    truth = torch.tensor([[[0, 0, 1, 1],
                           [0, 1, 1, IGNORE],
                           [2, 2, 0, 0],
                           [IGNORE, 2, 1, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1],
                          [0, 1, 2, 2],
                          [2, 0, 0, 0],
                          [1, 2, 1, 2]]])
    # 14 valid pixels. Truth x prediction, counted by hand:
    #   bg: 4 right, 1 -> a, 1 -> b;  a: 4 right, 1 -> b;  b: 2 right, 1 -> bg
    assert head.confusion(pred, truth).tolist() == [[4, 1, 1], [0, 4, 1], [1, 0, 2]]
    assert head.stats(pred, truth).tolist() == [[4, 1, 2, 7], [4, 1, 1, 8], [2, 2, 1, 9]]


def test_softmax_stats_binary_4x4_with_ignore():
    head = SoftmaxHead(["background", "fg"])
    truth = torch.tensor([[[0, 1, IGNORE, 1], [0, 0, 1, IGNORE], [1, 1, 0, 0], [IGNORE, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 1]]])
    # 13 valid: (t0,p0)=5, (t0,p1)=1, (t1,p1)=5, (t1,p0)=2
    assert head.stats(pred, truth).tolist() == [[5, 2, 1, 5], [5, 1, 2, 5]]


def test_sigmoid_stats_on_a_4x4_example_with_overlap_and_ignore():
    head = SigmoidHead(["a", "b"])
    t_a = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [IGNORE, 0, 0, IGNORE]]
    t_b = [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [IGNORE, 0, 0, IGNORE]]
    p_a = [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]  # (3, 0) is ignored
    p_b = [[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # (3, 3) is ignored
    truth = torch.tensor([[t_a, t_b]], dtype=torch.float32)
    pred = torch.tensor([[p_a, p_b]], dtype=torch.bool)
    # 14 valid pixels.  a: tp (0,0) (1,0) (1,1); fp (1,2); fn (0,1)
    #                   b: tp (0,1) (0,2) (1,2); fp (0,3) (2,2); fn (1,1)
    assert head.stats(pred, truth).tolist() == [[3, 1, 1, 9], [3, 2, 1, 8]]
    assert head.confusion(pred, truth) is None
    scores = summarize(head.stats(pred, truth).numpy(), head.classes)
    assert scores["per_class"]["a"]["dice"] == pytest.approx(6 / 8)
    assert scores["per_class"]["b"]["iou"] == pytest.approx(3 / 6)
    assert scores["micro"]["dice"] == pytest.approx(12 / (12 + 3 + 2))


def test_stats_of_decoded_logits_match_for_both_heads_on_binary_data():
    """Same binary truth, a 2-class softmax and its sigmoid twin: the foreground counts agree."""
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 6, 6) * 2
    soft = SoftmaxHead(["background", "fg"])
    sig = soft.sigmoid_equivalent()
    truth = torch.randint(0, 2, (2, 6, 6))
    truth[0, 0, :3] = IGNORE
    sig_truth = truth.float().unsqueeze(1)
    counts_soft = soft.stats(soft.decode(logits), truth)
    counts_sig = sig.stats(sig.decode(logits[:, 1:] - logits[:, :1]), sig_truth)
    assert counts_soft[1].tolist() == counts_sig[0].tolist()
    assert int(counts_sig[0].sum()) == 2 * 36 - 3


def test_empty_class_has_no_score_and_is_left_out_of_the_mean():
    counts = np.array([[5, 1, 0, 10], [0, 0, 0, 16], [2, 0, 2, 12]])
    s = summarize(counts, ["bg", "absent", "c"])
    assert np.isnan(s["per_class"]["absent"]["dice"])
    assert s["mean"]["dice"] == pytest.approx((10 / 11 + 4 / 6) / 2)
    no_bg = summarize(counts, ["bg", "absent", "c"], exclude=["bg"])
    assert no_bg["mean"]["dice"] == pytest.approx(4 / 6) and no_bg["classes_in_mean"] == ["absent", "c"]


# -- targets and losses -----------------------------------------------------------------------


def test_targets_for_both_heads():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0] = labels[0, 1, 1] = labels[1, 0, 0] = labels[1, 1, 1] = 1
    valid = np.array([[True, True], [False, True]])
    soft = SoftmaxHead(["bg", "fg"]).targets(labels, valid)
    assert soft.dtype == torch.long and soft.tolist() == [[0, 1], [IGNORE, 1]]
    sig = SigmoidHead(["bg", "fg"]).targets(labels, valid)
    assert sig.dtype == torch.float32 and sig.shape == (2, 2, 2)
    assert sig.tolist() == [[[1, 0], [IGNORE, 0]], [[0, 1], [IGNORE, 1]]]


def test_loss_ignores_ignored_pixels_for_both_heads():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4)
    changed = logits.clone()
    changed[..., 0, :] += 50  # only row 0 differs ...
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[..., 0, :] = IGNORE  # ... and row 0 is ignored
    for name in ("ce", "ce+dice"):
        loss = SoftmaxHead(["a", "b"]).loss(name)
        assert torch.isclose(loss(logits, target), loss(changed, target)), name
    t = torch.zeros(1, 2, 4, 4)
    t[..., 0, :] = IGNORE
    for name in ("bce", "bce+dice"):
        loss = SigmoidHead(["a", "b"]).loss(name)
        assert torch.isclose(loss(logits, t), loss(changed, t)), name
