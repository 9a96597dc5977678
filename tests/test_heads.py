"""The maths the heads rely on, with exact expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
from segkit.heads import IGNORE, SigmoidHead, SoftmaxHead, build_head, parse_thresholds
from segkit.metrics import summarize


def test_two_channel_softmax_is_sigmoid_of_the_logit_difference():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 16, 16, dtype=torch.float64) * 5
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(logits[:, 1] - logits[:, 0]), atol=1e-12)


def test_one_channel_softmax_is_constant_and_its_cross_entropy_is_exactly_zero():
    torch.manual_seed(0)
    logits = (torch.randn(3, 1, 8, 8) * 100).requires_grad_()
    assert torch.equal(logits.softmax(1), torch.ones_like(logits))
    loss = F.cross_entropy(logits, torch.zeros(3, 8, 8, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_softmax_with_one_class_is_refused_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        build_head("softmax", ["nucleus"])
    assert "sigmoid" in str(err.value) and "background" in str(err.value)


def test_losses_belong_to_their_head():
    with pytest.raises(ConfigError, match="bce.*sigmoid"):
        SoftmaxHead(["background", "fg"]).loss("bce")
    with pytest.raises(ConfigError, match="ce"):
        SigmoidHead(["fg"]).loss("ce+dice")
    assert len(SigmoidHead(["fg"]).loss("bce+dice").terms) == 2


def test_sigmoid_thresholds_are_probabilities():
    with pytest.raises(ConfigError, match="between 0 and 1"):
        SigmoidHead(["fg"], thresholds=2.0)
    with pytest.raises(ConfigError, match="2 classes"):
        SigmoidHead(["a", "b"], thresholds=[0.5])
    with pytest.raises(ConfigError, match="argmax"):
        SoftmaxHead(["a", "b"], thresholds=0.5)
    assert parse_thresholds("a=0.3", ["a", "b"]) == [0.3, 0.5]
    assert parse_thresholds("0.4", ["a"]) == 0.4


def test_decode_argmax_and_thresholds_on_probabilities():
    logits = torch.tensor([[[[0.1]], [[-0.1]]]])  # (1, 2, 1, 1)
    assert SoftmaxHead(["a", "b"]).decode(logits).tolist() == [[[0]]]
    sig = SigmoidHead(["a", "b"])
    assert sig.decode(logits)[0, :, 0, 0].tolist() == [True, False]  # sigmoid(0.1) > 0.5 > sigmoid(-0.1)
    strict = SigmoidHead(["a"], thresholds=0.6)  # sigmoid(0.3) = 0.574 < 0.6, although the logit 0.3 > 0
    assert strict.decode(torch.tensor([[[[0.3]]]])).item() is False


def test_loss_ignores_ignored_pixels_for_both_heads():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    changed = logits.clone()
    changed[..., 0, :] += 50  # only row 0 differs ...
    target_ignored = target.clone()
    target_ignored[..., 0, :] = IGNORE  # ... and row 0 is ignored
    ce = SoftmaxHead(["a", "b"]).loss("ce")
    assert torch.isclose(ce(logits, target_ignored), ce(changed, target_ignored))
    bce = SigmoidHead(["a", "b"]).loss("bce")
    t = torch.zeros(1, 2, 4, 4)
    t[..., 0, :] = IGNORE
    assert torch.isclose(bce(logits, t), bce(changed, t))


def test_softmax_stats_and_confusion_exact():
    head = SoftmaxHead(["bg", "a", "b"])
    truth = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, 0]]])
    pred = torch.tensor([[[0, 1, 1, 2], [2, 0, 1, 0]]])
    counts = head.stats(pred, truth).tolist()  # tp, fp, fn, tn per class over the 7 valid pixels
    assert counts == [[2, 1, 1, 3], [1, 1, 1, 4], [1, 1, 1, 4]]
    assert head.confusion(pred, truth).tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_sigmoid_stats_with_overlap_and_ignore_exact():
    head = SigmoidHead(["a", "b"])
    # 4 pixels; pixel 3 is ignored. Truth: a on 0,1; b on 1,2 (pixel 1 has both labels).
    truth = torch.tensor([[[[1.0, 1, 0, IGNORE]], [[0.0, 1, 1, IGNORE]]]])
    pred = torch.tensor([[[[True, True, True, True]], [[False, True, False, True]]]])
    counts = head.stats(pred, truth).tolist()
    assert counts == [[2, 1, 0, 0], [1, 0, 1, 1]]
    scores = summarize(np.array(counts), head.classes)
    assert scores["per_class"]["a"]["dice"] == pytest.approx(4 / 5)
    assert scores["per_class"]["b"]["iou"] == pytest.approx(1 / 2)
    assert scores["micro"]["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert head.confusion(pred, truth) is None


def test_empty_class_has_no_score_and_is_left_out_of_the_mean():
    counts = np.array([[5, 1, 0, 10], [0, 0, 0, 16], [2, 0, 2, 12]])
    s = summarize(counts, ["bg", "absent", "c"])
    assert np.isnan(s["per_class"]["absent"]["dice"])
    assert s["mean"]["dice"] == pytest.approx((10 / 11 + 4 / 6) / 2)
    no_bg = summarize(counts, ["bg", "absent", "c"], exclude=["bg"])
    assert no_bg["mean"]["dice"] == pytest.approx(4 / 6) and no_bg["classes_in_mean"] == ["absent", "c"]


def test_targets_for_both_heads():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0] = labels[0, 1, 1] = labels[1, 0, 0] = 1
    labels[1, 1, 1] = 1
    valid = np.array([[True, True], [False, True]])
    assert SoftmaxHead(["bg", "fg"]).targets(labels, valid).tolist() == [[0, 1], [IGNORE, 1]]
    t = SigmoidHead(["bg", "fg"]).targets(labels, valid)
    assert t.shape == (2, 2, 2) and t[:, 1, 0].tolist() == [IGNORE, IGNORE] and t[1].tolist() == [[0, 1], [IGNORE, 1]]
