"""`segkit compare` (binary, exclusive multi-class, overlapping multi-label; degenerate row; tuned
thresholds; bad input) and `segkit convert-head` (exact softmax -> sigmoid conversion), end to end on
small copies of real data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
NUCLEI = ROOT / "data" / "nuclei"
CONFIGS = ROOT / "configs"

QUICK = ["--epochs", "1", "--set", "train.steps_per_epoch=1", "--set", "train.crop=64", "--set",
         "train.batch_size=2", "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set",
         "train.device=cpu"]
FIGURES = ("learning_curves.png", "reliability.png", "thresholds_sigmoid.png")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


# -- helpers -------------------------------------------------------------------------------


def cli_ok(capsys, *args) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, f"segkit {' '.join(map(str, args))} exited {code}:\n{err}"
    return out


def cli_fails(capsys, *args) -> str:
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


def camvid_subset(dst: Path, n_train: int = 4, n_val: int = 2, size=(160, 120)) -> Path:
    """Real CamVid pairs, downscaled (masks nearest), in the images/<split> + masks/<split> layout."""
    src = DATASETS / "camvid"
    for split, n in (("train", n_train), ("val", n_val)):
        for path in sorted((src / "images" / split).iterdir())[:n]:
            for kind, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
                (dst / kind / split).mkdir(parents=True, exist_ok=True)
                Image.open(src / kind / split / path.name).resize(size, resample).save(dst / kind / split / path.name)
    return dst


def isic_subset(dst: Path, size=(256, 192)) -> Path:
    """The 6 real ISIC images downscaled (masks nearest), file names kept (masks pair by stem prefix)."""
    src = DATASETS / "isic2018-multilabel-mini"
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in (".jpg", ".png"):
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            resample = Image.NEAREST if "masks" in path.parts else Image.BILINEAR
            Image.open(path).resize(size, resample).save(out, **({"quality": 95} if path.suffix == ".jpg" else {}))
    assert len(list((dst / "images").iterdir())) == 6 and len(list((dst / "masks").rglob("*.png"))) == 12
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


def evaluate_json(capsys, ckpt: Path, data: Path, out: Path, *extra) -> dict:
    cli_ok(capsys, "evaluate", ckpt, data, "--split", "val", "--json", out, "--workers", "0", "--device", "cpu",
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
def binary(tmp_path_factory):
    """One compare on a 4 train / 2 val nuclei copy, with the degenerate row."""
    from cli.app import main  # capsys is function scoped: run the CLI directly here

    tmp = tmp_path_factory.mktemp("binary")
    data = nuclei_subset(tmp / "data")
    out = tmp / "cmp"
    try:
        main(["compare", str(CONFIGS / "nuclei-sigmoid.yaml"), "--out", str(out), "--set", f"data.root={data}",
              *QUICK, "--include-degenerate"])
    except SystemExit as done:
        assert not done.code, f"compare exited {done.code}"
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


def test_binary_report_numbers_equal_segkit_evaluate(capsys, binary, tmp_path):
    data, out = binary
    report = json.loads((out / "report.json").read_text())
    for head in ("softmax", "sigmoid"):
        run = report["heads"][head]["runs"][0]
        assert run["seed"] == 0 and Path(run["folder"]) == out / head / "seed0"
        direct = evaluate_json(capsys, out / head / "seed0" / "best", data, tmp_path / f"{head}.json")
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
    # always answering "background": the accuracy is the background share of the validation pixels
    background = total = 0
    for path in sorted((data / "val" / "masks").iterdir()):
        mask = read_png(path)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        background += int((mask == 0).sum())
        total += mask.size
    assert 0 < background < total
    assert d["pixel_accuracy"] == pytest.approx(background / total, abs=1e-12)
    md = (out / "report.md").read_text()
    assert d["label"] in md and f"{d['pixel_accuracy']:.4f}" in md
    assert "predicted foreground pixels 0" in md


# -- exclusive multi-class: CamVid ---------------------------------------------------------

def test_exclusive_multiclass_compare_camvid(capsys, tmp_path):
    from segkit import Segmenter

    data = camvid_subset(tmp_path / "camvid")
    out = tmp_path / "cmp"
    cli_ok(capsys, "compare", CONFIGS / "camvid.yaml", "--out", out, "--set", f"data.root={data}", *QUICK)
    report, md = check_report_files(out)
    assert report["kind"] == "exclusive"
    # every valid pixel has exactly one of the 11 classes (11 = ignore): both heads get the same N classes
    assert report["heads"]["softmax"]["classes"] == CAMVID_CLASSES
    assert report["heads"]["sigmoid"]["classes"] == CAMVID_CLASSES
    assert report["common_classes"] == CAMVID_CLASSES
    assert "background" not in md
    assert "with more than one class" in md
    for c in CAMVID_CLASSES:
        assert c in md
    for head in ("softmax", "sigmoid"):
        run = report["heads"][head]["runs"][0]
        direct = evaluate_json(capsys, out / head / "seed0" / "best", data, tmp_path / f"{head}.json")
        assert_same_scores(direct, run["scores"])
    soft = report["heads"]["softmax"]
    assert soft["no_class_share"] == [0.0] and soft["multi_class_share"] == [0.0]
    # the sigmoid's no-class / multi-class shares, recomputed from its predictions on the val images
    seg = Segmenter.load(out / "sigmoid" / "seed0" / "best", device="cpu")
    none = multi = valid_total = 0
    for path in sorted((data / "images" / "val").iterdir()):
        mask = seg.predict(np.array(Image.open(path).convert("RGB"))).mask
        valid = read_png(data / "masks" / "val" / path.name) != 11
        count = mask.sum(0)
        none += int(((count == 0) & valid).sum())
        multi += int(((count > 1) & valid).sum())
        valid_total += int(valid.sum())
    sig = report["heads"]["sigmoid"]
    assert sig["no_class_share"][0] == pytest.approx(none / valid_total, abs=2e-4)
    assert sig["multi_class_share"][0] == pytest.approx(multi / valid_total, abs=2e-4)


# -- overlapping multi-label: ISIC ---------------------------------------------------------

@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    return isic_subset(tmp_path_factory.mktemp("isic") / "data")


def overlap_share(data: Path) -> float:
    both = total = 0
    for path in sorted((data / "masks" / "lesion").iterdir()):
        stem = path.name.removesuffix("_Segmentation.png")
        lesion = read_png(path) > 127
        pigment = read_png(data / "masks" / "pigment_network" / f"{stem}_attribute_pigment_network.png") > 127
        both += int((lesion & pigment).sum())
        total += lesion.size
    return both / total


def test_overlapping_compare_trains_only_sigmoid_and_says_why(capsys, isic, tmp_path):
    out = tmp_path / "cmp"
    stdout = cli_ok(capsys, "compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out,
                    "--set", f"data.root={isic}", *QUICK)
    report, md = check_report_files(out)
    assert report["kind"] == "overlapping"
    assert list(report["heads"]) == ["sigmoid"]
    assert report["heads"]["sigmoid"]["classes"] == ["lesion", "pigment_network"]
    assert not (out / "softmax").exists()
    share = overlap_share(isic)
    assert share > 0.01
    stated = f"{share:.2%} of pixels carry more than one label"
    assert stated in md, md
    assert stated in report["skipped"]["softmax"]
    assert "softmax gives each pixel exactly one class and cannot represent them" in md
    assert "Only the sigmoid head was trained" in report["conclusion"] and report["conclusion"] in stdout
    run = report["heads"]["sigmoid"]["runs"][0]
    direct = evaluate_json(capsys, out / "sigmoid" / "seed0" / "best", isic, tmp_path / "sig.json")
    assert direct["images"] == 2  # the seeded 34% validation share of the flat layout, as in training
    assert_same_scores(direct, run["scores"])


def test_softmax_exclusive_trains_softmax_with_the_overlap_ignored(capsys, isic, tmp_path):
    """--softmax-exclusive: softmax over [background, lesion, pigment_network] on the pixels with at most
    one label; its scores count exactly the validation pixels that are not overlapping."""
    from segkit.config import load_config
    from segkit.data.splits import eval_samples

    out = tmp_path / "cmp"
    cli_ok(capsys, "compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", f"data.root={isic}",
           *QUICK, "--softmax-exclusive", "--heads", "softmax")
    report = json.loads((out / "report.json").read_text())
    assert list(report["heads"]) == ["softmax"] and report["labels"]["softmax"] == "softmax (exclusive part only)"
    assert report["heads"]["softmax"]["classes"] == ["background", "lesion", "pigment_network"]
    run = report["heads"]["softmax"]["runs"][0]
    direct = evaluate_json(capsys, out / "softmax" / "seed0" / "best", isic, tmp_path / "soft.json")
    assert_same_scores(direct, run["scores"])
    cfg = load_config(out / "softmax" / "seed0" / "config.yaml")
    single = both = 0
    for sample in eval_samples(cfg.data, "val", cfg.train.seed):
        stem = sample.image.stem
        lesion = read_png(isic / "masks" / "lesion" / f"{stem}_Segmentation.png") > 127
        pigment = read_png(isic / "masks" / "pigment_network" / f"{stem}_attribute_pigment_network.png") > 127
        single += int((~(lesion & pigment)).sum())
        both += int((lesion & pigment).sum())
    assert both > 0
    assert sum(c["truth_pixels"] for c in direct["per_class"].values()) == single


def test_write_thresholds_stores_the_reported_best_thresholds(capsys, isic, tmp_path):
    out = tmp_path / "cmp"
    cli_ok(capsys, "compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", f"data.root={isic}",
           *QUICK, "--seeds", "0,1", "--write-thresholds")
    report = json.loads((out / "report.json").read_text())
    row = report["heads"]["sigmoid"]
    best = row["best_thresholds"]
    assert list(best) == ["lesion", "pigment_network"]
    expected = [best["lesion"]["threshold"], best["pigment_network"]["threshold"]]
    for seed in (0, 1):
        meta = json.loads((out / "sigmoid" / f"seed{seed}" / "best" / "model.json").read_text())
        assert meta["classes"] == ["lesion", "pigment_network"]
        assert meta["thresholds"] == expected
        # the scores in the report were taken at 0.5, before the thresholds were written
        assert row["runs"][seed]["scores"]["thresholds"] == {"lesion": 0.5, "pigment_network": 0.5}
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
        direct = evaluate_json(capsys, ckpt, isic, tmp_path / f"tuned{seed}.json")
        assert direct["thresholds"] == {c: t["threshold"] for c, t in best.items()}  # stored, and used
        for name in dice:
            values = {c: 0.5 if name == "0.5" else round(t["threshold"] + shifts[name], 2) for c, t in best.items()}
            if not all(0 < v < 1 for v in values.values()):
                continue
            arg = ",".join(f"{c}={v}" for c, v in values.items())
            s = direct if name == "best" else evaluate_json(capsys, ckpt, isic, tmp_path / f"{name}{seed}.json",
                                                            "--threshold", arg)
            for c in best:
                dice[name][c].append(s["per_class"][c]["dice"])
    # The report's curve counts float16 probabilities >= t, evaluate float32 probabilities > t: pixels
    # within a float16 step (2.4e-4) of t may count differently (220 such pixels moved one seed's Dice
    # at 0.5 by 1e-3 here), while neighbouring thresholds of the grid differ by 7e-3 or more.
    for c, t in best.items():
        assert np.mean(dice["best"][c]) == pytest.approx(t["dice"], abs=2e-3), c
        assert np.mean(dice["0.5"][c]) == pytest.approx(t["dice_at_0.5"], abs=2e-3), c
        for name in ("lower", "higher"):
            if len(dice[name][c]) == 2:
                assert np.mean(dice["best"][c]) >= np.mean(dice[name][c]) - 2e-3, (c, name)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, says", [(["--heads", "foo"], "foo"), (["--seeds", "a,b"], "--seeds"),
                                         (["--seeds", "0,0"], "--seeds")])
def test_compare_bad_options_exit_2_and_write_nothing(capsys, tmp_path, extra, says):
    """Refused before anything is trained or written (a repeated seed would train twice into one folder)."""
    data = nuclei_subset(tmp_path / "data")
    out = tmp_path / "cmp"
    err = cli_fails(capsys, "compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--set", f"data.root={data}",
                    *QUICK, *extra)
    assert not out.exists()
    assert says in err


def test_compare_into_non_empty_folder_exits_2_and_writes_nothing(capsys, tmp_path):
    data = nuclei_subset(tmp_path / "data")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = cli_fails(capsys, "compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--set", f"data.root={data}",
                    *QUICK)
    assert "not empty" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("extra", [["--heads", ","], ["--heads", "softmax"], ["--seeds", ","]])
def test_compare_with_nothing_to_train_exits_2(capsys, isic, tmp_path, extra):
    """No run to do (an empty --heads or --seeds, or softmax alone on overlapping masks): a message, not a crash."""
    out = tmp_path / "cmp"
    cli_fails(capsys, "compare", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set",
              f"data.root={isic}", *QUICK, *extra)
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


def test_convert_head_gives_the_same_masks_and_logits(capsys, tmp_path):
    from segkit import Segmenter
    from segkit.model import load_checkpoint

    soft_dir = _checkpoint(tmp_path / "soft", "softmax", ["background", "nucleus"])
    stdout = cli_ok(capsys, "convert-head", soft_dir, tmp_path / "sig")
    assert "sigmoid checkpoint" in stdout
    meta = json.loads((tmp_path / "sig" / "model.json").read_text())
    assert meta["head"] == "sigmoid" and meta["classes"] == ["nucleus"] and meta["thresholds"] == [0.5]
    model, head, _ = load_checkpoint(tmp_path / "sig")
    assert head.name == "sigmoid" and head.channels == 1 and head.classes == ["nucleus"]
    assert model.segmentation_head[0].out_channels == 1
    soft = Segmenter.load(soft_dir, device="cpu")
    sig = Segmenter.load(tmp_path / "sig", device="cpu")
    images = sorted((NUCLEI / "test" / "images").iterdir())[:4]
    decided = 0
    for path in images:
        image = np.array(Image.open(path).convert("RGB"))
        a = soft.predict(image).mask == 1
        b = sig.predict(image).mask[0]
        logits = soft.logits(image)
        diff = (logits[1] - logits[0]).numpy()
        tie = np.abs(diff) < 1e-5
        assert np.array_equal(a[~tie], b[~tie]), f"{path.name}: {int((a != b)[~tie].sum())} pixels differ"
        assert a.any() and (~a).any()  # a real test: both classes appear
        twin = sig.logits(image)[0].numpy()
        np.testing.assert_allclose(twin, diff, atol=1e-4, rtol=0)
        decided += int((~tie).sum())
    assert decided > 0.99 * sum(np.array(Image.open(p)).shape[0] * np.array(Image.open(p)).shape[1] for p in images)


def test_convert_head_scores_the_same_under_evaluate(capsys, tmp_path):
    """The converted checkpoint reads the masks as the original did: `segkit evaluate` gives the same
    nucleus scores, for binary masks and for index masks with an ignore value."""
    data = tmp_path / "data"
    for kind in ("images", "masks"):
        (data / "test" / kind).mkdir(parents=True)
    for path in sorted((NUCLEI / "test" / "images").iterdir())[:3]:
        shutil.copy(path, data / "test" / "images" / path.name)
        mask = read_png(NUCLEI / "test" / "masks" / path.name)
        index = (mask > 127).astype(np.uint8)
        index[:8] = 255  # a band of ignored pixels
        Image.fromarray(index).save(data / "test" / "masks" / path.name)
    soft_dir = _checkpoint(tmp_path / "soft", "softmax", ["background", "nucleus"], seed=1, data={
        "mask": "index", "ignore_index": 255, "foreground_value": None, "colors": None, "val_fraction": 0.2,
        "seed": 0, "overlap": "error"})
    cli_ok(capsys, "convert-head", soft_dir, tmp_path / "sig")
    scores = {}
    for name in ("soft", "sig"):
        cli_ok(capsys, "evaluate", tmp_path / name, data, "--split", "test", "--json", tmp_path / f"{name}.json",
               "--workers", "0", "--device", "cpu", "--no-progress")
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["per_class"]["nucleus"]
    assert scores["sig"]["truth_pixels"] == scores["soft"]["truth_pixels"] > 0
    assert scores["sig"]["predicted_pixels"] == pytest.approx(scores["soft"]["predicted_pixels"], abs=5)
    assert scores["sig"]["dice"] == pytest.approx(scores["soft"]["dice"], abs=1e-4)


@pytest.mark.parametrize("head_name, classes", [("sigmoid", ["nucleus"]), ("softmax", ["background", "a", "b"])])
def test_convert_head_refuses_what_has_no_exact_sigmoid_twin(capsys, tmp_path, head_name, classes):
    src = _checkpoint(tmp_path / "src", head_name, classes)
    err = cli_fails(capsys, "convert-head", src, tmp_path / "out")
    assert "2-class softmax" in err
    assert not (tmp_path / "out").exists()


def test_convert_head_into_a_non_empty_folder_exits_2(capsys, tmp_path):
    src = _checkpoint(tmp_path / "src", "softmax", ["background", "nucleus"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    err = cli_fails(capsys, "convert-head", src, tmp_path / "out")
    assert "not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_convert_head_of_a_folder_that_is_no_checkpoint_exits_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = cli_fails(capsys, "convert-head", tmp_path / "empty", tmp_path / "out")
    assert "not a segkit checkpoint" in err
    assert not (tmp_path / "out").exists()
