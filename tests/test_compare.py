"""`segkit compare` (binary, exclusive multi-class, overlapping multi-label; degenerate row; tuned
thresholds; bad input) and `segkit convert-head` (exact softmax -> sigmoid conversion), end to end on
small copies of real data: nuclei, and hippocampus MRI slices with exclusive classes (and an ignore ring)
or nested, overlapping labels. A compare that several tests read runs once, in a module fixture."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CONFIGS, NUCLEI, run_cli, small_nuclei_stems
from samples import HIPPO_CASES, HIPPO_CLASSES, hippo_multilabel, hippo_slice_arrays, hippo_slices

QUICK = ["--epochs", "1", "--set", "train.steps_per_epoch=1", "--set", "train.crop=64", "--set",
         "train.batch_size=2", "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set",
         "train.device=cpu"]
FIGURES = ("learning_curves.png", "reliability.png", "thresholds_sigmoid.png")
NESTED = ["hippocampus", "posterior"]  # hippocampus = labels 1 or 2, posterior = label 2: nested
NESTED_CASES, EVERY = HIPPO_CASES[:2], 4
VOID = 255  # the ignored boundary ring of the exclusive slices


# -- helpers -------------------------------------------------------------------------------


def cli_ok(*args) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, f"segkit {' '.join(map(str, args))} exited {code}:\n{err}"
    return out


def cli_fails(*args) -> str:
    """Runs a command that must be refused: exit 2, an `error:` message, no traceback."""
    code, _, err = run_cli(*args)
    assert code == 2, f"expected exit 2, got {code}:\n{err}"
    assert "error:" in err and "Traceback" not in err, err
    return err


def nuclei_subset(dst: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """Real nuclei pairs from data/nuclei/train, split explicitly into train/ and val/."""
    names = sorted(p.name for p in (NUCLEI / "train" / "images").iterdir())[:n_train + n_val]
    for i, name in enumerate(names):
        split = "train" if i < n_train else "val"
        for kind in ("images", "masks"):
            (dst / split / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(NUCLEI / "train" / kind / name, dst / split / kind / name)
    return dst


def read_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


def assert_same_scores(direct: dict, run_scores: dict) -> None:
    """`segkit evaluate --json` and report.json agree: per class Dice/IoU and the macro means."""
    assert list(direct["per_class"]) == list(run_scores["per_class"])
    for c, s in direct["per_class"].items():
        r = run_scores["per_class"][c]
        for key in ("dice", "iou"):
            if math.isnan(s[key]):
                assert math.isnan(r[key]), (c, key)
            else:
                assert r[key] == pytest.approx(s[key], abs=1e-9), (c, key)
        assert r["truth_pixels"] == s["truth_pixels"] and r["predicted_pixels"] == s["predicted_pixels"]
    for key in ("dice", "iou"):
        assert run_scores["mean"][key] == pytest.approx(direct["mean"][key], abs=1e-9)
    assert run_scores["images"] == direct["images"]


def evaluate_json(ckpt: Path, data: Path, out: Path, *extra) -> dict:
    cli_ok("evaluate", ckpt, data, "--split", "val", "--json", out, "--workers", "0", "--device", "cpu",
           "--no-progress", *extra)
    return json.loads(out.read_text())


def check_report_files(out: Path) -> tuple[dict, str]:
    for name in ("report.md", "report.json"):
        assert (out / name).is_file()
    for name in FIGURES:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    for name in FIGURES:  # the report shows its figures
        assert f"]({name})" in md
    assert "## Conclusion" in md
    return json.loads((out / "report.json").read_text()), md


# -- binary: nuclei ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def binary(module_tmp):
    """One compare on a 4 train / 2 val nuclei copy, with the degenerate row."""
    tmp = module_tmp("binary")
    data = nuclei_subset(tmp / "data")
    out = tmp / "cmp"
    cli_ok("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--set", f"data.root={data}", *QUICK,
           "--include-degenerate")
    return data, out


def test_binary_compare_writes_the_report_with_the_right_classes(binary):
    data, out = binary
    report, md = check_report_files(out)
    assert report["kind"] == "binary"
    assert report["heads"]["softmax"]["classes"] == ["background", "nucleus"]
    assert report["heads"]["sigmoid"]["classes"] == ["nucleus"]
    assert report["common_classes"] == ["nucleus"]
    assert report["skipped"] == {}
    for head in ("softmax", "sigmoid"):
        row = report["heads"][head]
        assert row["seeds"] == [0] and len(row["runs"]) == 1
        assert (out / head / "seed0" / "best" / "model.safetensors").is_file()
        meta = json.loads((out / head / "seed0" / "best" / "model.json").read_text())
        assert meta["head"] == head and meta["classes"] == row["classes"]
        # the Dice on the common class is the nucleus Dice of each head
        assert row["common_dice"] == row["per_class_dice"]["nucleus"]
        assert row["parameters"] > 1_000_000
        assert md.count(f"| {head} |") >= 2  # summary table and per-class table
    # the two heads differ by exactly one output filter of the last layer (16 weights + 1 bias for resnet18's Unet)
    soft, sig = report["heads"]["softmax"]["parameters"], report["heads"]["sigmoid"]["parameters"]
    assert soft - sig == 16 * 3 * 3 + 1
    # only the sigmoid head decodes by threshold
    assert report["heads"]["softmax"]["best_thresholds"] == {}
    assert set(report["heads"]["sigmoid"]["best_thresholds"]) == {"nucleus"}
    assert report["conclusion"] and report["conclusion"] in md
    assert "one seed" in report["conclusion"]  # one seed: no spread to judge the difference by


def test_binary_report_numbers_equal_segkit_evaluate(binary, tmp_path):
    data, out = binary
    report = json.loads((out / "report.json").read_text())
    for head in ("softmax", "sigmoid"):
        run = report["heads"][head]["runs"][0]
        assert run["seed"] == 0 and Path(run["folder"]) == out / head / "seed0"
        direct = evaluate_json(out / head / "seed0" / "best", data, tmp_path / f"{head}.json")
        assert direct["images"] == 2  # the val/ split
        assert_same_scores(direct, run["scores"])
        row = report["heads"][head]
        assert row["macro_dice"] == [direct["mean"]["dice"]]
        assert row["per_class_dice"]["nucleus"] == [direct["per_class"]["nucleus"]["dice"]]


def test_binary_pixel_accuracy_and_shares_match_the_masks(binary):
    """The report's pixel accuracy, recomputed here from the checkpoints' own predictions and the masks."""
    from segkit import Segmenter

    data, out = binary
    report = json.loads((out / "report.json").read_text())
    for head in ("softmax", "sigmoid"):
        seg = Segmenter.load(out / head / "seed0" / "best", device="cpu")
        correct = total = 0
        for path in sorted((data / "val" / "images").iterdir()):
            image = np.array(Image.open(path).convert("RGB"))
            fg = read_png(data / "val" / "masks" / path.name) > 127
            mask = seg.predict(image).mask
            pred_fg = mask == 1 if head == "softmax" else mask[0]
            correct += int((pred_fg == fg).sum())
            total += fg.size
        row = report["heads"][head]
        assert row["pixel_accuracy"][0] == pytest.approx(correct / total, abs=2e-4)
        if head == "softmax":  # one class per pixel by construction
            assert row["no_class_share"] == [0.0] and row["multi_class_share"] == [0.0]
        else:  # one class: no pixel can have two
            assert row["multi_class_share"] == [0.0]


def test_degenerate_row_is_a_constant_model(binary):
    data, out = binary
    report = json.loads((out / "report.json").read_text())
    d = report["degenerate"]
    assert d is not None
    assert len(d["train_losses"]) >= 1 and all(v == 0.0 for v in d["train_losses"])
    assert d["max_gradient"] == 0.0
    assert d["probabilities_seen"] == [1.0]
    assert d["predicted_foreground_pixels"] == 0
    assert d["dice"] == 0.0
    # always answering "background": the accuracy is the share of validation pixels without a nucleus (255)
    nucleus = total = 0
    for path in sorted((data / "val" / "masks").iterdir()):
        mask = read_png(path)
        nucleus += int((mask == 255).sum())
        total += mask.size
    assert d["pixel_accuracy"] == pytest.approx(1 - nucleus / total, abs=1e-12)
    md = (out / "report.md").read_text()
    assert d["label"] in md and f"{d['pixel_accuracy']:.4f}" in md
    assert "predicted foreground pixels 0" in md


# -- exclusive multi-class: hippocampus slices with an ignore ring ------------------------------------

@pytest.fixture(scope="module")
def exclusive(module_tmp) -> tuple[Path, Path, str]:
    """One compare on real hippocampus slices (train: two cases, val: a third), index masks of three exclusive
    classes with a VOID ring on every boundary; (data, report folder, stdout)."""
    tmp = module_tmp("exclusive")
    data = hippo_slices(tmp / "data", "train", NESTED_CASES, every=EVERY, ignore=VOID)
    hippo_slices(data, "val", HIPPO_CASES[2:3], every=EVERY, ignore=VOID)
    config = tmp / "hippo.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(data), "classes": HIPPO_CLASSES, "mask": "index",
                                               "ignore_index": VOID}, "model": {"head": "softmax"}}))
    return data, tmp / "cmp", cli_ok("compare", config, "--out", tmp / "cmp", *QUICK)


def test_exclusive_compare_gives_both_heads_the_same_classes(exclusive):
    """Every valid pixel has exactly one of the three classes (the ring is ignored, not unlabelled): both heads
    get the same three classes and no `background` is added."""
    data, out, stdout = exclusive
    report, md = check_report_files(out)
    assert report["kind"] == "exclusive"
    assert report["heads"]["softmax"]["classes"] == HIPPO_CLASSES
    assert report["heads"]["sigmoid"]["classes"] == HIPPO_CLASSES
    assert report["common_classes"] == HIPPO_CLASSES
    assert report["notes"] == ["the data needs: softmax. Every pixel has exactly one class: the softmax head fits; "
                               "the sigmoid head (one-vs-rest) also works."] and report["skipped"] == {}
    assert "with more than one class" in md
    assert md.count("| softmax | " + ", ".join(HIPPO_CLASSES) + " |") == 1
    assert report["conclusion"] in stdout


def test_exclusive_report_numbers_equal_segkit_evaluate(exclusive, tmp_path):
    data, out, _ = exclusive
    report = json.loads((out / "report.json").read_text())
    n_val = len(hippo_slice_arrays(HIPPO_CASES[2:3], EVERY))
    for head in ("softmax", "sigmoid"):
        direct = evaluate_json(out / head / "seed0" / "best", data, tmp_path / f"{head}.json")
        assert direct["images"] == n_val
        assert_same_scores(direct, report["heads"][head]["runs"][0]["scores"])
        # the ring is left out of the scores: the truth pixels are the slices' labels off the ring
        truth = {c: 0 for c in HIPPO_CLASSES}
        for path in sorted((data / "val" / "masks").iterdir()):
            mask = read_png(path)
            for k, c in enumerate(HIPPO_CLASSES):
                truth[c] += int((mask == k).sum())
        assert {c: s["truth_pixels"] for c, s in direct["per_class"].items()} == truth


def test_exclusive_no_class_and_multi_class_shares_match_the_predictions(exclusive):
    """softmax: none by construction; sigmoid: recomputed from its own predictions on the valid pixels."""
    data, out, _ = exclusive
    report = json.loads((out / "report.json").read_text())
    assert_class_shares(report, out, data / "val" / "images", data / "val" / "masks", VOID)


def assert_class_shares(report: dict, out: Path, images: Path, masks: Path, ignore: int) -> None:
    """An exclusive compare report in OUT: the softmax's no-class and multi-class shares are 0, the sigmoid's
    are those of its seed-0 predictions on the validation IMAGES, pixels of value `ignore` in MASKS left out."""
    from segkit import Segmenter

    soft = report["heads"]["softmax"]
    assert soft["no_class_share"] == [0.0] and soft["multi_class_share"] == [0.0]
    seg = Segmenter.load(out / "sigmoid" / "seed0" / "best", device="cpu")
    none = multi = valid_total = 0
    for path in sorted(images.iterdir()):
        mask = seg.predict(np.array(Image.open(path).convert("RGB"))).mask
        valid = read_png(masks / path.name) != ignore
        count = mask.sum(0)
        none += int(((count == 0) & valid).sum())
        multi += int(((count > 1) & valid).sum())
        valid_total += int(valid.sum())
    sig = report["heads"]["sigmoid"]
    assert sig["no_class_share"][0] == pytest.approx(none / valid_total, abs=2e-4)
    assert sig["multi_class_share"][0] == pytest.approx(multi / valid_total, abs=2e-4)


# -- overlapping multi-label: nested hippocampus labels --------------------------------------------

@pytest.fixture(scope="module")
def nested(module_tmp) -> Path:
    """Real hippocampus slices with nested labels (every posterior pixel is also hippocampus), flat layout,
    JPEG images as ISIC ships them; the multi-label config holds back 34% of them for validation."""
    return hippo_multilabel(module_tmp("nested") / "data", cases=NESTED_CASES, every=EVERY,
                            image_ext=".jpg")


def nested_args(data: Path, out: Path, *extra) -> list:
    return ["compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", f"data.root={data}",
            "--set", f"data.classes={NESTED}", *QUICK, *extra]


@pytest.fixture(scope="module")
def overlapping(module_tmp, nested) -> tuple[Path, str]:
    """One compare of the default heads on the nested labels, two seeds, thresholds written; (folder, stdout)."""
    out = module_tmp("overlapping") / "cmp"
    return out, cli_ok(*nested_args(nested, out, "--seeds", "0,1", "--write-thresholds"))


def val_truth(data: Path, out: Path) -> dict[str, np.ndarray]:
    """The label slices (0/1/2, from the volumes) of the validation images of a run, by stem."""
    from segkit.config import load_config
    from segkit.data.splits import eval_samples

    cfg = load_config(out / "config.yaml")
    slices = hippo_slice_arrays(NESTED_CASES, EVERY)
    return {s.stem: slices[s.stem][1] for s in eval_samples(cfg.data, "val", cfg.split_seed())}


def test_overlapping_compare_trains_only_sigmoid_and_says_why(overlapping, nested, tmp_path):
    """The stated share of pixels with two labels is the posterior share of the slices, from the volumes."""
    out, stdout = overlapping
    report, md = check_report_files(out)
    assert report["kind"] == "overlapping"
    assert list(report["heads"]) == ["sigmoid"]
    assert report["heads"]["sigmoid"]["classes"] == NESTED
    assert not (out / "softmax").exists()
    slices = [labels for _, labels in hippo_slice_arrays(NESTED_CASES, EVERY).values()]
    share = sum(int((s == 2).sum()) for s in slices) / sum(s.size for s in slices)
    stated = f"{share:.2%} of pixels carry more than one label"
    assert stated in md, md
    assert stated in report["skipped"]["softmax"]
    assert "softmax gives each pixel exactly one class and cannot represent them" in md
    assert "Only the sigmoid head was trained" in report["conclusion"] and report["conclusion"] in stdout
    assert sorted(val_truth(nested, out / "sigmoid" / "seed0")) == sorted(val_truth(nested, out / "sigmoid" / "seed1"))
    for seed in (0, 1):
        run = report["heads"]["sigmoid"]["runs"][seed]
        truth = val_truth(nested, out / "sigmoid" / f"seed{seed}")  # both seeds validate on the first seed's split
        assert len(truth) == round(0.34 * len(slices))  # the seeded validation share of the flat layout
        direct = evaluate_json(out / "sigmoid" / f"seed{seed}" / "best", nested, tmp_path / f"sig{seed}.json",
                               "--threshold", "hippocampus=0.5,posterior=0.5")  # as scored, before tuning
        assert direct["images"] == len(truth)
        assert_same_scores(direct, run["scores"])
        assert direct["per_class"]["hippocampus"]["truth_pixels"] == sum(int((t > 0).sum()) for t in truth.values())
        assert direct["per_class"]["posterior"]["truth_pixels"] == sum(int((t == 2).sum()) for t in truth.values())


def test_softmax_exclusive_trains_softmax_with_the_overlap_ignored(nested, tmp_path):
    """--softmax-exclusive: softmax over [background, hippocampus, posterior] on the pixels with at most
    one label; its scores count exactly the validation pixels that are not posterior (the overlap)."""
    out = tmp_path / "cmp"
    cli_ok(*nested_args(nested, out, "--softmax-exclusive", "--heads", "softmax"))
    report = json.loads((out / "report.json").read_text())
    assert list(report["heads"]) == ["softmax"] and report["labels"]["softmax"] == "softmax (exclusive part only)"
    assert report["heads"]["softmax"]["classes"] == ["background", *NESTED]
    run = report["heads"]["softmax"]["runs"][0]
    direct = evaluate_json(out / "softmax" / "seed0" / "best", nested, tmp_path / "soft.json")
    assert_same_scores(direct, run["scores"])
    truth = val_truth(nested, out / "softmax" / "seed0")
    per_class = {c: s["truth_pixels"] for c, s in direct["per_class"].items()}
    # background and anterior (hippocampus alone) keep their one label; posterior pixels have two: ignored
    assert per_class == {"background": sum(int((t == 0).sum()) for t in truth.values()),
                         "hippocampus": sum(int((t == 1).sum()) for t in truth.values()), "posterior": 0}


def test_write_thresholds_stores_the_reported_best_thresholds(overlapping, nested, tmp_path):
    out, _ = overlapping
    assert_written_thresholds(out, nested, NESTED, tmp_path)


def assert_written_thresholds(out: Path, root: Path, classes: list[str], tmp_path: Path) -> None:
    """A `compare --seeds 0,1 --write-thresholds` run in `out` on `root`: each seed's best/ stores the report's
    best thresholds, which are where the mean Dice-against-threshold curve peaks, and `segkit evaluate` at
    them, at 0.5 and at both grid neighbours gives the reported Dice."""
    report = json.loads((out / "report.json").read_text())
    row = report["heads"]["sigmoid"]
    best = row["best_thresholds"]
    assert list(best) == classes
    expected = [best[c]["threshold"] for c in classes]
    for seed in (0, 1):
        meta = json.loads((out / "sigmoid" / f"seed{seed}" / "best" / "model.json").read_text())
        assert meta["classes"] == classes
        assert meta["thresholds"] == expected
        # the scores in the report were taken at 0.5, before the thresholds were written
        assert row["runs"][seed]["scores"]["thresholds"] == {c: 0.5 for c in classes}
    # the best threshold is where the mean (over seeds) Dice-against-threshold curve peaks
    for c, t in best.items():
        curve = np.nanmean([r["analysis"]["thresholds"][c] for r in row["runs"]], axis=0)
        grid = [round(0.05 * k, 2) for k in range(1, 20)]
        assert t["threshold"] == grid[int(np.nanargmax(curve))]
        assert t["dice"] == pytest.approx(float(np.nanmax(curve)))
    # recomputed with `segkit evaluate` at each threshold: the reported Dice values are evaluate's, and no
    # neighbouring threshold of the grid does better than the best one
    shifts = {"best": 0.0, "lower": -0.05, "higher": 0.05}
    dice = {name: {c: [] for c in best} for name in [*shifts, "0.5"]}
    for seed in (0, 1):
        ckpt = out / "sigmoid" / f"seed{seed}" / "best"
        direct = evaluate_json(ckpt, root, tmp_path / f"tuned{seed}.json")
        assert direct["thresholds"] == {c: t["threshold"] for c, t in best.items()}  # stored, and used
        for name in dice:
            values = {c: 0.5 if name == "0.5" else round(t["threshold"] + shifts[name], 2) for c, t in best.items()}
            if not all(0 < v < 1 for v in values.values()):
                continue
            arg = ",".join(f"{c}={v}" for c, v in values.items())
            s = direct if name == "best" else evaluate_json(ckpt, root, tmp_path / f"{name}{seed}.json",
                                                            "--threshold", arg)
            for c in best:
                dice[name][c].append(s["per_class"][c]["dice"])
    # The report's curve counts float32 probabilities strictly above t, as decoding does: exactly evaluate's
    # Dice (the curve is the mean over seeds of per-seed values, as here).
    for c, t in best.items():
        assert np.mean(dice["best"][c]) == pytest.approx(t["dice"], rel=1e-12), c
        assert np.mean(dice["0.5"][c]) == pytest.approx(t["dice_at_0.5"], rel=1e-12), c
        for name in ("lower", "higher"):
            if len(dice[name][c]) == 2:
                assert np.mean(dice["best"][c]) >= np.mean(dice[name][c]), (c, name)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, says", [(["--heads", "foo"], "foo"), (["--seeds", "a,b"], "--seeds"),
                                         (["--seeds", "0,0"], "--seeds")])
def test_compare_bad_options_exit_2_and_write_nothing(tmp_path, extra, says):
    """Refused before anything is trained or written (a repeated seed would train twice into one folder)."""
    data = nuclei_subset(tmp_path / "data")
    out = tmp_path / "cmp"
    err = cli_fails("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--set", f"data.root={data}",
                    *QUICK, *extra)
    assert not out.exists()
    assert says in err


def test_compare_into_non_empty_folder_exits_2_and_writes_nothing(tmp_path):
    data = nuclei_subset(tmp_path / "data")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = cli_fails("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--set", f"data.root={data}",
                    *QUICK)
    assert "not empty" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("extra", [["--heads", ","], ["--heads", "softmax"], ["--seeds", ","]])
def test_compare_with_nothing_to_train_exits_2(nested, tmp_path, extra):
    """No run to do (an empty --heads or --seeds, or softmax alone on overlapping masks): a message, not a crash."""
    out = tmp_path / "cmp"
    err = cli_fails(*nested_args(nested, out, *extra))
    assert "nothing to train" in err
    assert not out.exists() or not any(out.iterdir())


# -- convert-head --------------------------------------------------------------------------

def _checkpoint(folder: Path, head_name: str, classes: list[str], data: dict | None = None, seed: int = 0) -> Path:
    """A checkpoint with random (seeded) weights, as `segkit train` would write it."""
    from segkit.heads import build_head
    from segkit.data.normalize import Normalization
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    torch.manual_seed(seed)
    head = build_head(head_name, classes)
    model = build_model("Unet", "resnet18", head.channels)
    model.eval()
    meta = checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           data=data or {"mask": "binary", "ignore_index": None, "foreground_value": None,
                                         "colors": None, "val_fraction": 0.2, "seed": 0, "overlap": "error"})
    save_checkpoint(folder, model, meta)
    return folder


def test_convert_head_gives_the_same_masks_and_logits(tmp_path, content_checkpoints):
    """On real images, with a softmax checkpoint whose masks follow the image: the twin's logit is the
    softmax's logit difference, and the masks agree on every pixel that is not a tie."""
    from segkit import Segmenter
    from segkit.model import load_checkpoint

    soft_dir = content_checkpoints["softmax"]
    stdout = cli_ok("convert-head", soft_dir, tmp_path / "sig")
    assert "sigmoid checkpoint" in stdout
    meta = json.loads((tmp_path / "sig" / "model.json").read_text())
    assert meta["head"] == "sigmoid" and meta["classes"] == ["nucleus"] and meta["thresholds"] == [0.5]
    assert meta["converted_from"] == str(soft_dir)
    model, head, _ = load_checkpoint(tmp_path / "sig")
    assert head.name == "sigmoid" and head.channels == 1 and head.classes == ["nucleus"]
    assert model.segmentation_head[0].out_channels == 1
    soft = Segmenter.load(soft_dir, device="cpu")
    sig = Segmenter.load(tmp_path / "sig", device="cpu")
    decided = pixels = 0
    for stem in small_nuclei_stems(2, "test"):
        image = np.array(Image.open(NUCLEI / "test" / "images" / f"{stem}.png").convert("RGB"))
        a = soft.predict(image).mask == 1
        b = sig.predict(image).mask[0]
        logits = soft.logits(image)
        diff = (logits[1] - logits[0]).numpy()
        tie = np.abs(diff) < 1e-5
        assert np.array_equal(a[~tie], b[~tie]), f"{stem}: {int((a != b)[~tie].sum())} pixels differ"
        assert 0.05 < a.mean() < 0.95, a.mean()  # both classes hold a real share of the image
        np.testing.assert_allclose(sig.logits(image)[0].numpy(), diff, atol=1e-4, rtol=0)
        decided += int((~tie).sum())
        pixels += a.size
    assert decided > 0.99 * pixels


def test_convert_head_scores_the_same_under_evaluate(tmp_path, content_checkpoints):
    """The converted checkpoint reads the masks as the original did: for index masks with an ignore band
    (the softmax was trained on those, its model.json says), `segkit evaluate` gives both the same nucleus
    scores, and the truth both count is the nuclei off the band."""
    data = tmp_path / "data"
    for kind in ("images", "masks"):
        (data / "test" / kind).mkdir(parents=True)
    nuclei = valid = 0
    for stem in small_nuclei_stems(2, "test"):
        shutil.copy(NUCLEI / "test" / "images" / f"{stem}.png", data / "test" / "images" / f"{stem}.png")
        index = (read_png(NUCLEI / "test" / "masks" / f"{stem}.png") == 255).astype(np.uint8)
        index[:8] = 255  # a band of ignored pixels
        nuclei += int((index == 1).sum())
        valid += int((index != 255).sum())
        Image.fromarray(index).save(data / "test" / "masks" / f"{stem}.png")
    soft_dir = tmp_path / "soft"
    shutil.copytree(content_checkpoints["softmax"], soft_dir)
    meta = json.loads((soft_dir / "model.json").read_text())
    meta["data"] = {"mask": "index", "ignore_index": 255}
    (soft_dir / "model.json").write_text(json.dumps(meta))
    cli_ok("convert-head", soft_dir, tmp_path / "sig")
    assert json.loads((tmp_path / "sig" / "model.json").read_text())["data"] == {"mask": "binary",
                                                                                 "ignore_index": 255}
    scores = {}
    for name in ("soft", "sig"):
        cli_ok("evaluate", tmp_path / name, data, "--split", "test", "--json", tmp_path / f"{name}.json",
               "--workers", "0", "--device", "cpu", "--no-progress")
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["per_class"]["nucleus"]
    assert scores["sig"]["truth_pixels"] == scores["soft"]["truth_pixels"] == nuclei
    assert scores["sig"]["predicted_pixels"] == pytest.approx(scores["soft"]["predicted_pixels"], abs=5)
    assert scores["sig"]["dice"] == pytest.approx(scores["soft"]["dice"], abs=1e-4)
    assert 0.05 < scores["soft"]["predicted_pixels"] / valid < 0.95  # masks that follow the image, not constant


@pytest.mark.parametrize("head_name, classes", [("sigmoid", ["nucleus"]), ("softmax", ["background", "a", "b"])])
def test_convert_head_refuses_what_has_no_exact_sigmoid_twin(tmp_path, head_name, classes):
    src = _checkpoint(tmp_path / "src", head_name, classes)
    err = cli_fails("convert-head", src, tmp_path / "out")
    assert "2-class softmax" in err
    assert not (tmp_path / "out").exists()


def test_convert_head_into_a_non_empty_folder_exits_2(tmp_path):
    src = _checkpoint(tmp_path / "src", "softmax", ["background", "nucleus"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    err = cli_fails("convert-head", src, tmp_path / "out")
    assert "not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_convert_head_of_a_folder_that_is_no_checkpoint_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    err = cli_fails("convert-head", tmp_path / "empty", tmp_path / "out")
    assert "not a segkit checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_every_compare_run_validates_on_the_same_images(tmp_path):
    """Ten real nuclei pairs with no val/ split: seeds 0 and 3 draw different validation shares on their own,
    but the configs `compare` makes for them validate (in training and in scoring) on the first seed's share,
    while their training seeds still differ."""
    from conftest import copy_nuclei
    from segkit.compare import head_config
    from segkit.config import load_config
    from segkit.data.training_data import training_data

    data = copy_nuclei(tmp_path / "data", 10)
    config = tmp_path / "c.yaml"
    config.write_text((CONFIGS / "nuclei-sigmoid.yaml").read_text().replace("root: data/nuclei", f"root: {data}"))

    def val(cfg):
        return sorted(r.sample.stem for r in training_data(cfg, cfg.head(), 1 << 20).val)

    alone = [load_config(config, [f"train.seed={s}"]) for s in (0, 3)]
    assert val(alone[0]) != val(alone[1])
    a, b = (head_config(alone[0], "sigmoid", ["nucleus"], s, None, split_seed=0) for s in (0, 3))
    assert (a.train.seed, b.train.seed) == (0, 3) and a.split_seed() == b.split_seed() == 0
    assert val(a) == val(b) == val(alone[0])
