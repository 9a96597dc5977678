"""Scores: per-class counts by the head, dataset-level ratios, the empty-class rule, and
`segkit evaluate` end to end against counts made by hand from `segkit predict`'s files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NUCLEI, run_cli, small_nuclei_stems
from samples import inverted_nuclei
from segkit.evaluate import format_scores
from segkit.heads import IGNORE, build_head
from segkit.metrics import class_scores, summarize
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RUN = ["--device", "cpu", "--no-progress", "--workers", "0"]



def scores_equal(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == want


# -- softmax: hand-built masks -------------------------------------------------------------------

# truth / prediction, 3 x 4; X is the ignored pixel (predicted as class 2, which must not count)
X = IGNORE
SOFT_TRUTH = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 1, X],
                           [0, 0, 0, 1]])
SOFT_PRED = torch.tensor([[0, 1, 1, 1],
                          [0, 0, 1, 2],
                          [0, 0, 1, 0]])
# rows truth, columns prediction, over the 11 valid pixels
SOFT_CONFUSION = [[4, 2, 0],
                  [2, 3, 0],
                  [0, 0, 0]]


def test_softmax_counts_confusion_and_scores_by_hand():
    head = build_head("softmax", ["background", "a", "b"])
    counts = head.stats(SOFT_PRED[None], SOFT_TRUTH[None])
    # tp, fp, fn, tn per class; the ignored pixel is in none of them (4 + 2 + 2 + 3 = 11)
    assert counts.tolist() == [[4, 2, 2, 3], [3, 2, 2, 4], [0, 0, 0, 11]]
    assert head.confusion(SOFT_PRED[None], SOFT_TRUTH[None]).tolist() == SOFT_CONFUSION
    s = summarize(counts.numpy(), head.classes)
    bg, a, b = (s["per_class"][c] for c in head.classes)
    assert (bg["iou"], bg["dice"], bg["precision"], bg["recall"]) == (4 / 8, 8 / 12, 4 / 6, 4 / 6)
    assert (a["iou"], a["dice"], a["precision"], a["recall"]) == (3 / 7, 6 / 10, 3 / 5, 3 / 5)
    assert (bg["truth_pixels"], bg["predicted_pixels"], a["truth_pixels"], a["predicted_pixels"]) == (6, 6, 5, 5)
    # 'b' is absent from truth and prediction (the ignored pixel's prediction does not count): no score
    assert all(math.isnan(b[k]) for k in ("iou", "dice", "precision", "recall"))
    assert b["truth_pixels"] == b["predicted_pixels"] == 0
    # ... and it is left out of the mean, which is exactly the average of the other two
    assert s["mean"]["iou"] == (4 / 8 + 3 / 7) / 2
    assert s["mean"]["dice"] == (8 / 12 + 6 / 10) / 2
    assert s["classes_in_mean"] == ["background", "a", "b"]
    # micro: tp 7, fp 4, fn 4 summed over the classes
    assert s["micro"]["iou"] == 7 / 15 and s["micro"]["dice"] == 14 / 22
    nb = summarize(counts.numpy(), head.classes, exclude=["background"])
    assert nb["classes_in_mean"] == ["a", "b"]
    assert nb["mean"]["iou"] == 3 / 7 and nb["mean"]["dice"] == 6 / 10
    assert nb["micro"]["iou"] == 3 / 7 and nb["micro"]["dice"] == 6 / 10
    assert nb["per_class"]["background"]["iou"] == 0.5  # still reported, only not averaged


def test_softmax_targets_from_labels_give_the_same_counts_and_batches_add_up():
    head = build_head("softmax", ["background", "a", "b"])
    truth = SOFT_TRUTH.numpy()
    valid = truth != IGNORE
    labels = (truth.clip(0)[:, :, None] == np.arange(3)).astype(np.uint8) * valid[:, :, None]
    target = head.targets(labels, valid)
    assert target.tolist() == SOFT_TRUTH.tolist()
    one = head.stats(SOFT_PRED[None], target[None])
    other_pred = torch.full((3, 4), 2)
    other = head.stats(other_pred[None], target[None])
    both = head.stats(torch.stack([SOFT_PRED, other_pred]), torch.stack([target, target]))
    assert torch.equal(both, one + other)
    assert other.tolist() == [[0, 0, 6, 5], [0, 0, 5, 6], [0, 11, 0, 0]]
    conf = head.confusion(torch.stack([SOFT_PRED, other_pred]), torch.stack([target, target]))
    assert conf.tolist() == [[4, 2, 6], [2, 3, 5], [0, 0, 0]]


# -- sigmoid: overlapping masks with an ignore region ------------------------------------------------

SIG_TRUTH = np.zeros((3, 4, 2), np.uint8)  # (H, W, C): classes a, b
SIG_TRUTH[0:2, 0:2, 0] = 1
SIG_TRUTH[0:2, 1:3, 1] = 1  # (0, 1) and (1, 1) carry both labels
SIG_TRUTH[2, 3, 1] = 1  # inside the ignore region: must not count as a miss
SIG_VALID = np.ones((3, 4), bool)
SIG_VALID[2, 2:] = False
SIG_PRED = torch.tensor([[[1, 0, 0, 0],
                          [1, 1, 0, 1],
                          [0, 0, 1, 1]],  # a; the last two pixels are ignored
                         [[0, 1, 1, 1],
                          [0, 0, 1, 0],
                          [1, 0, 0, 1]]], dtype=torch.bool)  # b


def test_sigmoid_counts_overlapping_labels_and_skips_ignored_pixels():
    head = build_head("sigmoid", ["a", "b"])
    target = head.targets(SIG_TRUTH, SIG_VALID)
    assert target.shape == (2, 3, 4)
    assert (target[:, 2, 2:] == IGNORE).all() and (target[:, :2] >= 0).all()
    counts = head.stats(SIG_PRED[None], target[None])
    # 10 valid pixels: a tp 3 fp 1 fn 1 tn 5; b tp 3 fp 2 fn 1 tn 4
    assert counts.tolist() == [[3, 1, 1, 5], [3, 2, 1, 4]]
    assert head.confusion(SIG_PRED[None], target[None]) is None
    s = summarize(counts.numpy(), head.classes)
    a, b = s["per_class"]["a"], s["per_class"]["b"]
    assert (a["iou"], a["dice"], a["precision"], a["recall"]) == (3 / 5, 6 / 8, 3 / 4, 3 / 4)
    assert (b["iou"], b["dice"], b["precision"], b["recall"]) == (3 / 6, 6 / 9, 3 / 5, 3 / 4)
    assert s["mean"]["iou"] == (3 / 5 + 3 / 6) / 2 and s["mean"]["dice"] == (6 / 8 + 6 / 9) / 2
    assert s["micro"]["iou"] == 6 / 11 and s["micro"]["dice"] == 12 / 17
    assert s["classes_in_mean"] == ["a", "b"]


def test_sigmoid_class_absent_everywhere_has_no_score_and_is_not_averaged():
    head = build_head("sigmoid", ["a", "b", "c"])
    labels = np.concatenate([SIG_TRUTH, np.zeros((3, 4, 1), np.uint8)], axis=2)
    pred = torch.cat([SIG_PRED, torch.zeros(1, 3, 4, dtype=torch.bool)])
    pred[2, 2, 3] = True  # predicted in an ignored pixel only: still absent
    counts = head.stats(pred[None], head.targets(labels, SIG_VALID)[None])
    assert counts[2].tolist() == [0, 0, 0, 10]
    s = summarize(counts.numpy(), head.classes)
    assert math.isnan(s["per_class"]["c"]["iou"]) and math.isnan(s["per_class"]["c"]["dice"])
    assert s["mean"]["iou"] == (3 / 5 + 3 / 6) / 2
    assert s["micro"]["iou"] == 6 / 11
    text = format_scores({**s, "images": 1, "background_in_mean": False})
    assert "n/a" in text.splitlines()[3]  # the row of 'c'


def test_class_scores_rules():
    missed = class_scores(0, 0, 5)  # in the truth, never predicted: 0, and precision has no value
    assert (missed["iou"], missed["dice"], missed["recall"]) == (0.0, 0.0, 0.0) and math.isnan(missed["precision"])
    assert class_scores(2, 1, 1) == {"iou": 0.5, "dice": 4 / 6, "precision": 2 / 3, "recall": 2 / 3}
    assert all(math.isnan(v) for v in class_scores(0, 0, 0).values())
    everything_absent = summarize(np.array([[0, 0, 0, 9], [0, 0, 0, 9]]), ["a", "b"])
    assert math.isnan(everything_absent["mean"]["iou"]) and math.isnan(everything_absent["micro"]["dice"])


# -- `segkit evaluate` end to end ----------------------------------------------------------------------

SOFT_CLASSES = ["background", "a", "b"]
SIZES = [(40, 56), (33, 47), (64, 64)]


def save_ckpt(folder: Path, head_name: str, classes: list[str], data: dict, never: int | None = None) -> Path:
    torch.manual_seed(1)
    head = build_head(head_name, classes)
    model = build_model("Unet", "resnet18", head.channels)
    if never is not None:  # a class this model never predicts
        with torch.no_grad():
            model.segmentation_head[0].bias[never] = -1e4
    save_checkpoint(folder, model, checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD), data=data))
    return folder


def index_data(root: Path, ignore: int | None = None) -> Path:
    """ROOT/test/{images,masks}: 3 images of different sizes, index masks with every class present."""
    rng = np.random.default_rng(0)
    for kind in ("images", "masks"):
        (root / "test" / kind).mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / "images" / f"im{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[h // 4: 3 * h // 4, : w // 2] = 1
        m[h // 3:, w // 2:] = 2
        if ignore is not None:
            m[:3, :] = ignore
        Image.fromarray(m).save(root / "test" / "masks" / f"im{i}.png")
    return root


def hand_scores(conf: np.ndarray, classes: list[str], kept: list[str]) -> dict:
    """The expected report from a truth x prediction confusion matrix."""
    per = {}
    for c, name in enumerate(classes):
        tp = int(conf[c, c])
        fp, fn = int(conf[:, c].sum()) - tp, int(conf[c].sum()) - tp
        per[name] = (tp, fp, fn)
    ratio = lambda n, d: n / d if d > 0 else math.nan  # noqa: E731
    scores = {n: {"iou": ratio(tp, tp + fp + fn), "dice": ratio(2 * tp, 2 * tp + fp + fn),
                  "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)} for n, (tp, fp, fn) in per.items()}
    tp, fp, fn = (sum(per[n][k] for n in kept) for k in range(3))
    mean = {}
    for key in ("iou", "dice"):
        vals = [scores[n][key] for n in kept if not math.isnan(scores[n][key])]
        mean[key] = sum(vals) / len(vals)
    return {"per_class": scores, "mean": mean,
            "micro": {"iou": ratio(tp, tp + fp + fn), "dice": ratio(2 * tp, 2 * tp + fp + fn)}}


def check_report(s: dict, want: dict) -> None:
    for name, values in want["per_class"].items():
        for key, v in values.items():
            assert scores_equal(s["per_class"][name][key], v), (name, key, s["per_class"][name][key], v)
    for part in ("mean", "micro"):
        for key in ("iou", "dice"):
            assert s[part][key] == pytest.approx(want[part][key], rel=1e-12, abs=1e-15), (part, key)


def test_evaluate_softmax_equals_hand_scores_of_predicted_files(capsys, tmp_path):
    data = index_data(tmp_path / "data", ignore=255)
    ckpt = save_ckpt(tmp_path / "ckpt", "softmax", SOFT_CLASSES,
                     {"mask": "index", "ignore_index": 255, "foreground_value": None, "colors": None,
                      "val_fraction": 0.2, "seed": 0})
    code, out, err = run_cli("evaluate", ckpt, data, "--json", tmp_path / "s.json", *RUN)
    assert code == 0, err
    assert "mean (macro)" in out and "micro" in out and "confusion matrix" in out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["images"] == 3 and s["head"] == "softmax"
    assert set(s["per_class"]) == set(SOFT_CLASSES)
    for name in SOFT_CLASSES:
        assert {"iou", "dice", "precision", "recall"} <= set(s["per_class"][name])
    assert set(s["mean"]) == {"iou", "dice"} and set(s["micro"]) == {"iou", "dice"}
    cm = s["confusion_matrix"]
    assert cm["rows"] == "truth" and cm["columns"] == "prediction" and cm["classes"] == SOFT_CLASSES

    code, _, err = run_cli("predict", ckpt, data / "test" / "images", tmp_path / "pred", *RUN)
    assert code == 0, err
    conf = np.zeros((3, 3), np.int64)
    for i, (h, w) in enumerate(SIZES):
        truth = np.asarray(Image.open(data / "test" / "masks" / f"im{i}.png"))
        pred = np.asarray(Image.open(tmp_path / "pred" / f"im{i}.png"))
        assert pred.shape == (h, w)
        valid = truth != 255
        np.add.at(conf, (truth[valid], pred[valid]), 1)
    assert conf.sum() == sum((h - 3) * w for h, w in SIZES)
    assert cm["counts"] == conf.tolist()
    check_report(s, hand_scores(conf, SOFT_CLASSES, SOFT_CLASSES))
    assert s["classes_in_mean"] == SOFT_CLASSES and s["background_in_mean"] is True

    code, out, err = run_cli("evaluate", ckpt, data, "--exclude-background", "--json", tmp_path / "nb.json", *RUN)
    assert code == 0, err
    nb = json.loads((tmp_path / "nb.json").read_text())
    assert nb["classes_in_mean"] == ["a", "b"] and nb["background_in_mean"] is False
    check_report(nb, hand_scores(conf, SOFT_CLASSES, ["a", "b"]))
    assert nb["per_class"] == s["per_class"]
    assert "background not included" in out


def test_evaluate_sigmoid_overlapping_masks_equals_hand_scores(capsys, tmp_path):
    classes = ["a", "b"]
    root = tmp_path / "data"
    (root / "test" / "images").mkdir(parents=True)
    rng = np.random.default_rng(2)
    truths = {}
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / "images" / f"im{i}.png")
        a = np.zeros((h, w), bool)
        b = np.zeros((h, w), bool)
        a[: 2 * h // 3, : 2 * w // 3] = True
        b[h // 3:, w // 3:] = True  # overlaps a in the middle
        truths[i] = np.stack([a, b])
        for c, m in zip(classes, (a, b)):
            (root / "test" / "masks" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "test" / "masks" / c / f"im{i}.png")
    ckpt = save_ckpt(tmp_path / "ckpt", "sigmoid", classes, {"mask": "multilabel", "ignore_index": None,
                                                            "foreground_value": None, "colors": None})
    code, out, err = run_cli("evaluate", ckpt, root, "--json", tmp_path / "s.json", "--threshold", "a=0.45",
                         *RUN[:-2], "--workers", "2")
    assert code == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["images"] == 3 and "confusion_matrix" not in s and s["thresholds"] == {"a": 0.45, "b": 0.5}
    code, _, err = run_cli("predict", ckpt, root / "test" / "images", tmp_path / "pred", "--threshold", "a=0.45",
                       *RUN)
    assert code == 0, err
    counts = {}
    for c, name in enumerate(classes):
        tp = fp = fn = 0
        for i in truths:
            pred = np.asarray(Image.open(tmp_path / "pred" / name / f"im{i}.png")) == 255
            t = truths[i][c]
            tp, fp, fn = tp + int((t & pred).sum()), fp + int((~t & pred).sum()), fn + int((t & ~pred).sum())
        counts[name] = (tp, fp, fn)
        assert (s["per_class"][name]["tp"], s["per_class"][name]["fp"], s["per_class"][name]["fn"]) == (tp, fp, fn)
    ratio = lambda n, d: n / d if d > 0 else math.nan  # noqa: E731
    for name, (tp, fp, fn) in counts.items():
        assert scores_equal(s["per_class"][name]["iou"], ratio(tp, tp + fp + fn))
        assert scores_equal(s["per_class"][name]["dice"], ratio(2 * tp, 2 * tp + fp + fn))
    tp, fp, fn = (sum(v[k] for v in counts.values()) for k in range(3))
    assert s["micro"]["iou"] == pytest.approx(ratio(tp, tp + fp + fn), rel=1e-12)
    assert s["micro"]["dice"] == pytest.approx(ratio(2 * tp, 2 * tp + fp + fn), rel=1e-12)


def test_evaluate_json_is_standard_json_when_a_class_has_no_score(capsys, tmp_path):
    """A class absent from truth and prediction has no score; the --json file must still be
    standard JSON (RFC 8259 has no NaN), readable by jq, JavaScript, etc."""
    data = index_data(tmp_path / "data")  # values 0..2; class 'c' never appears
    ckpt = save_ckpt(tmp_path / "ckpt", "softmax", SOFT_CLASSES + ["c"], {"mask": "index"}, never=3)
    code, out, err = run_cli("evaluate", ckpt, data, "--json", tmp_path / "s.json", *RUN)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("c "))
    assert "n/a" in row
    text = (tmp_path / "s.json").read_text()

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    s = json.loads(text, parse_constant=refuse)
    assert s["per_class"]["c"]["iou"] is None and s["per_class"]["c"]["dice"] is None
    # 'c' has no score and is left out of the mean: the mean of the three scored classes
    for key in ("iou", "dice"):
        assert s["mean"][key] == pytest.approx(np.mean([s["per_class"][k][key] for k in SOFT_CLASSES]), rel=1e-12)


def test_evaluate_user_errors_exit_2_with_a_message(capsys, tmp_path):
    data = index_data(tmp_path / "data")
    ckpt = save_ckpt(tmp_path / "ckpt", "sigmoid", ["a", "b", "c"], {"mask": "index"})
    code, _, err = run_cli("evaluate", ckpt, data, "--exclude-background", *RUN)
    assert code == 2 and err.startswith("error: ") and "background" in err and "Traceback" not in err
    code, _, err = run_cli("evaluate", ckpt, data, "--split", "train", *RUN)
    assert code == 2 and "train" in err and "test" in err and "Traceback" not in err
    code, _, err = run_cli("evaluate", ckpt, data, "--split", "val", *RUN)  # val is held out of train/: none here
    assert code == 2 and "no train split" in err and "test" in err and "Traceback" not in err
    (data / "test" / "images" / "im1.png").write_bytes(b"not a png at all")
    code, _, err = run_cli("evaluate", ckpt, data, *RUN)
    assert code == 2 and "im1.png" in err and "Traceback" not in err
    bad = save_ckpt(tmp_path / "ckpt2", "softmax", ["background", "a"], {"mask": "index"})
    (data / "test" / "images" / "im1.png").unlink()
    code, _, err = run_cli("evaluate", bad, data, *RUN)  # mask values 2 are outside 2 classes
    assert code == 2 and "outside" in err and "Traceback" not in err


def test_evaluate_config_reads_the_masks_as_its_data_section_says(tmp_path, content_checkpoints):
    """Real nuclei masks stored inverted (nucleus 0, background 255, as ISBI stores its membranes). The
    checkpoint was trained on masks whose foreground is 255; `--config` with `foreground_value: 0` scores
    against the nuclei, the checkpoint's own reading against the background."""
    stems = small_nuclei_stems(2, "test")
    root = inverted_nuclei(tmp_path / "data", stems, "test")
    with_config, default = scores_of_both_readings(content_checkpoints["sigmoid"], root, tmp_path)
    nuclei = {f"{s}.png": np.asarray(Image.open(NUCLEI / "test" / "masks" / f"{s}.png")) == 255 for s in stems}
    assert_counts(with_config, tmp_path / "pred" / "nucleus", nuclei)
    assert_counts(default, tmp_path / "pred" / "nucleus", {n: ~m for n, m in nuclei.items()})


def scores_of_both_readings(ckpt: Path, root: Path, tmp_path: Path) -> tuple[dict, dict]:
    """`segkit evaluate` of ROOT's test split with a `--config` reading binary masks with `foreground_value: 0`
    (the class keeps the checkpoint's name; only the encoding differs) and with the checkpoint's own reading;
    the test images predicted into TMP/pred. Returns (config scores, default scores)."""
    import yaml

    config = tmp_path / "foreground0.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": "elsewhere", "classes": ["nucleus"], "mask": "binary",
                                               "foreground_value": 0}, "model": {"head": "sigmoid"}}))
    code, _, err = run_cli("evaluate", ckpt, root, "--config", config, "--json", tmp_path / "config.json", *RUN)
    assert code == 0, err
    code, _, err = run_cli("evaluate", ckpt, root, "--json", tmp_path / "default.json", *RUN)
    assert code == 0, err
    code, _, err = run_cli("predict", ckpt, root / "test" / "images", tmp_path / "pred", *RUN)
    assert code == 0, err
    return (json.loads((tmp_path / "config.json").read_text()), json.loads((tmp_path / "default.json").read_text()))


def assert_counts(scores: dict, pred: Path, truths: dict[str, np.ndarray]) -> None:
    """The scores of class nucleus equal numpy counts of the predicted masks PRED/<name> against `truths`."""
    tp = fp = fn = 0
    for name, truth in truths.items():
        p = np.asarray(Image.open(pred / name)) == 255
        tp, fp, fn = tp + int((p & truth).sum()), fp + int((p & ~truth).sum()), fn + int((~p & truth).sum())
    assert scores["images"] == len(truths)
    got = scores["per_class"]["nucleus"]
    assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert got["iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
    assert got["truth_pixels"] == sum(int(t.sum()) for t in truths.values())
