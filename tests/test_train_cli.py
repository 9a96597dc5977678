"""`segkit train` end to end on a tiny real subset: run folders, checkpoints, resume, determinism,
and bad data -> exit 2 naming the file with nothing written."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import segkit.checkpoints
import segkit.train
from conftest import CONFIGS, IMAGENET, ROOT, assert_refused, copy_nuclei, run_cli, train_args
from reference import model_logits
from segkit.config import load_config
from segkit.data.dataset import PairReader, SegmentationDataset, scan
from segkit.data.layout import find_pairs
from segkit.data.masks import build_mask_format
from segkit.data.splits import pair_reader, train_val_samples
from segkit.data.transforms import eval_transform
from segkit.evaluate import evaluate
from segkit.heads import SigmoidHead
from segkit.infer import Segmenter
from segkit.model import build_model, load_checkpoint
from segkit.validation import validate

SIGMOID = CONFIGS / "nuclei-sigmoid.yaml"
SOFTMAX = CONFIGS / "nuclei-softmax.yaml"
CONFIG = {"sigmoid": SIGMOID, "softmax": SOFTMAX}
CLASSES = {"sigmoid": ["nucleus"], "softmax": ["background", "nucleus"]}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(module_tmp, tiny_nuclei) -> dict:
    """One 2-epoch run per head: sigmoid in this process, softmax as a real `python -m cli` process.
    The sigmoid run records every training step ("steps"): the model's weights before the step, and
    the normalised batch and target it was fed."""
    base = module_tmp("runs")
    models, steps = [], []
    build, feed = segkit.train.build_model, segkit.train.to_network

    def recorded_build(*args, **kwargs) -> torch.nn.Module:
        models.append(build(*args, **kwargs))
        return models[-1]

    def recorded_feed(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        x, target = feed(*args, **kwargs)
        weights = {k: v.detach().clone() for k, v in models[-1].state_dict().items()}
        steps.append((weights, x.detach().clone(), target.detach().clone()))
        return x, target

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segkit.train, "build_model", recorded_build)
        mp.setattr(segkit.train, "to_network", recorded_feed)
        r = run_cli(*train_args(SIGMOID, tiny_nuclei, base / "sigmoid"))
    assert r.code == 0, r.err
    assert f"checkpoint: {base / 'sigmoid' / 'best'}" in r.out and "completed after 2 epochs" in r.out
    cmd = [sys.executable, "-m", "cli", *map(str, train_args(SOFTMAX, tiny_nuclei, base / "softmax"))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "completed after 2 epochs" in done.stdout and "Traceback" not in done.stderr
    assert "softmax head, classes ['background', 'nucleus']; 6 train / 2 val images" in done.stderr
    return {"sigmoid": base / "sigmoid", "softmax": base / "softmax", "steps": steps}


# -- the run folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_run_folder_has_every_file(runs, head, tiny_nuclei):
    run = runs[head]
    for name in ("config.yaml", "metrics.csv", "curves.png", "best/model.safetensors", "best/model.json",
                 "last/model.safetensors", "last/model.json", "last/train_state.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob(".*")), "temporary files left behind"
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in (run / "best").iterdir())
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.width > 100
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["head"] == head and saved["data"]["classes"] == CLASSES[head]
    assert saved["data"]["root"] == str(tiny_nuclei) and saved["model"]["encoder"] == "resnet18"
    assert saved["train"]["epochs"] == 2 and saved["train"]["crop"] == 64 and saved["train"]["steps_per_epoch"] == 2


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_metrics_csv_has_one_row_per_epoch(runs, head):
    rows = _rows(runs[head] / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    per_class = [f"{kind}_{c}" for kind in ("dice", "iou") for c in CLASSES[head]]
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_mean_dice", "val_mean_iou", *per_class,
                             "lr", "seconds", "images_per_s"]
    # warm-up over 1 step (a tenth of the 4, rounded up), then cosine to 0 at the 4th and last: after epoch 1's
    # 2 steps, 0.5 (1 + cos(pi / 3)) = 0.75 of train.lr
    lr = load_config(CONFIG[head]).train.lr
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.75 * lr, 0.0], rel=1e-12, abs=1e-15)


def test_train_loss_is_the_mean_loss_of_each_epochs_batches(runs):
    """metrics.csv's train_loss of an epoch is the mean, over its steps, of the configured loss (bce+dice,
    whose values test_cli_options checks by hand) of the model as it was at that step on that step's batch:
    recomputed with an smp model given the recorded weights (training mode: batch statistics)."""
    steps, rows = runs["steps"], _rows(runs["sigmoid"] / "metrics.csv")
    assert len(steps) == 4  # 2 epochs of 2 steps
    loss_fn = SigmoidHead(["nucleus"]).loss("bce+dice")
    model = smp.create_model("Unet", encoder_name="resnet18", encoder_weights=None, classes=1).train()
    losses = []
    for weights, x, target in steps:
        model.load_state_dict(weights)
        with torch.no_grad():
            losses.append(float(loss_fn(model(x.contiguous()), target)))
    assert not torch.equal(steps[0][0]["segmentation_head.0.weight"], steps[-1][0]["segmentation_head.0.weight"])
    for epoch, row in enumerate(rows):
        assert float(row["train_loss"]) == pytest.approx(np.mean(losses[2 * epoch:2 * epoch + 2]), rel=1e-5), epoch


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_validation_scores_are_the_last_weights_dice_and_iou_on_the_val_images(runs, head):
    """The last epoch's Dice and IoU per class (and their mean) are those of last/'s masks on the 2
    validation images, counted over both (tp, fp, fn summed): recomputed with numpy from logits of an
    smp model (sigmoid: probability > 0.5, i.e. logit > 0; softmax: argmax). Two float32 runs of one
    network differ by ~1e-5 of its largest logit: a pixel within 1e-4 of that of its decision may go
    either way between them, and each such pixel can move a score by its share."""
    run = runs[head]
    cfg = load_config(run / "config.yaml")
    _, val = train_val_samples(cfg.data, cfg.train.seed)
    counts = np.zeros((len(CLASSES[head]), 3))  # tp, fp, fn
    ties = 0
    for sample in val:
        image = np.asarray(Image.open(sample.image).convert("RGB"))
        nucleus = np.asarray(Image.open(sample.mask)) > 0
        z = model_logits(run / "last", image)
        margin = z[0] if head == "sigmoid" else z[1] - z[0]
        ties += int((np.abs(margin) <= 1e-4 * np.abs(z).max()).sum())
        fg = margin > 0
        pairs = [(fg, nucleus)] if head == "sigmoid" else [(~fg, ~nucleus), (fg, nucleus)]
        for c, (pred, truth) in enumerate(pairs):
            counts[c] += [(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]
    row = _rows(run / "metrics.csv")[-1]
    dice = 2 * counts[:, 0] / (2 * counts[:, 0] + counts[:, 1] + counts[:, 2])
    iou = counts[:, 0] / counts.sum(1)
    slack = 2 * ties / (2 * counts[:, 0] + counts[:, 1] + counts[:, 2]).min() + 1e-12
    for c, name in enumerate(CLASSES[head]):
        assert abs(float(row[f"dice_{name}"]) - dice[c]) <= slack, (name, row[f"dice_{name}"], dice[c])
        assert abs(float(row[f"iou_{name}"]) - iou[c]) <= slack, (name, row[f"iou_{name}"], iou[c])
    assert abs(float(row["val_mean_dice"]) - dice.mean()) <= slack
    assert abs(float(row["val_mean_iou"]) - iou.mean()) <= slack
    assert counts[-1, 0] > 0 and counts[-1, 1] + counts[-1, 2] > 0, counts  # neither empty nor perfect


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_checkpoint_metadata(runs, head):
    for folder in ("best", "last"):
        meta = json.loads((runs[head] / folder / "model.json").read_text())
        assert meta["head"] == head and meta["classes"] == CLASSES[head]
        assert meta["arch"] == "Unet" and meta["encoder"] == "resnet18" and meta["in_channels"] == 3
        norm = meta["normalization"]  # 8-bit RGB: ImageNet statistics, in pixel units
        assert norm["mode"] == "imagenet" and norm["mean"] == pytest.approx([255 * m for m in IMAGENET[0]])
        assert norm["std"] == pytest.approx([255 * s for s in IMAGENET[1]])
        assert meta["data"]["mask"] == "binary" and meta["data"]["split_seed"] == 0
        assert (meta["thresholds"] == [0.5]) if head == "sigmoid" else (meta["thresholds"] is None)
    last = json.loads((runs[head] / "last" / "model.json").read_text())
    assert last["epoch"] == 2
    rows = _rows(runs[head] / "metrics.csv")
    best_row = max(rows, key=lambda row: float(row["val_mean_dice"]))
    best = json.loads((runs[head] / "best" / "model.json").read_text())
    assert best["epoch"] == int(best_row["epoch"])
    assert best["val"]["mean_dice"] == float(best_row["val_mean_dice"])


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_load_checkpoint_gives_the_saved_weights_exactly(runs, head):
    model, loaded_head, meta = load_checkpoint(runs[head] / "last")
    assert loaded_head.name == head and loaded_head.classes == CLASSES[head] and not model.training
    twin = build_model("Unet", "resnet18", len(CLASSES[head]))
    twin.load_state_dict(load_file(str(runs[head] / "last" / "model.safetensors")))
    twin.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
        assert y.shape == (2, len(CLASSES[head]), 64, 96)
        assert torch.equal(y, twin(x))
    # the weights really are trained ones: a fresh model with the same seed differs
    torch.manual_seed(0)
    fresh = build_model("Unet", "resnet18", len(CLASSES[head])).eval()
    with torch.inference_mode():
        assert not torch.equal(fresh(x), y)


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_last_checkpoint_reproduces_the_logged_validation_scores(runs, head):
    """Scoring the validation images with last/ gives the metrics.csv row of the last epoch:
    the checkpoint is the in-training model, not something near it."""
    run = runs[head]
    cfg = load_config(run / "config.yaml")
    seg = Segmenter.load(run / "last", device="cpu")
    reader = pair_reader(cfg.data)
    _, val_samples = train_val_samples(cfg.data, cfg.train.seed)
    assert len(val_samples) == 2
    scores = evaluate(seg, val_samples, reader, workers=0)  # the public scoring path, from the files
    last = _rows(run / "metrics.csv")[-1]
    assert scores["mean"]["dice"] == float(last["val_mean_dice"])
    assert scores["mean"]["iou"] == float(last["val_mean_iou"])
    records = scan(val_samples, reader, seg.head, cache=True)
    loss, _ = validate(seg, seg.head.loss(cfg.train.loss), SegmentationDataset(records, reader, seg.head,
                                                                               eval_transform(), seg.norm), [None])
    assert loss == pytest.approx(float(last["val_loss"]), rel=1e-6)


# -- resume -------------------------------------------------------------------------------------------


def test_resume_continues_to_epoch_3_keeping_the_first_rows(runs, tmp_path, tiny_nuclei):
    run = tmp_path / "run"
    shutil.copytree(runs["sigmoid"], run)
    before = _rows(run / "metrics.csv")
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--resume", epochs=3))
    assert r.code == 0, r.err
    assert "completed after 3 epochs" in r.out
    rows = _rows(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[:2] == before
    meta = json.loads((run / "last" / "model.json").read_text())
    assert meta["epoch"] == 3
    assert torch.load(run / "last" / "train_state.pt", weights_only=True)["epoch"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3


def test_training_into_a_non_empty_folder_without_resume_exits_2(runs, tmp_path, tiny_nuclei):
    run = tmp_path / "run"
    shutil.copytree(runs["sigmoid"], run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run))
    assert r.code == 2 and r.err.startswith("error:") and "Traceback" not in r.err
    assert str(run) in r.err and "--resume" in r.err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_resume_refusals_exit_2(runs, tmp_path, tiny_nuclei):
    run = tmp_path / "run"
    shutil.copytree(runs["sigmoid"], run)
    metrics = (run / "metrics.csv").read_bytes()
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--resume", epochs=2))
    assert r.code == 2 and "already trained for 2 epochs" in r.err
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--resume", "--set", "model.encoder=resnet34", epochs=3))
    assert r.code == 2 and "model.encoder" in r.err and "Traceback" not in r.err
    assert (run / "metrics.csv").read_bytes() == metrics
    empty = tmp_path / "empty"
    assert_refused(run_cli(*train_args(SIGMOID, tiny_nuclei, empty, "--resume")), empty, "nothing to resume")


# -- determinism ------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_run_on_cpu(runs, tmp_path, tiny_nuclei):
    """An in-process run repeats the subprocess run of the fixture number for number."""
    r = run_cli(*train_args(SOFTMAX, tiny_nuclei, tmp_path / "again"))
    assert r.code == 0, r.err
    first, second = _rows(runs["softmax"] / "metrics.csv"), _rows(tmp_path / "again" / "metrics.csv")
    assert [row["train_loss"] for row in first] == [row["train_loss"] for row in second]
    for key in ("val_loss", "val_mean_dice", "dice_nucleus", "lr"):
        assert [row[key] for row in first] == [row[key] for row in second], key
    a = load_file(str(runs["softmax"] / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_run_whatever_the_number_of_data_workers(runs, tmp_path, tiny_nuclei):
    """Augmentation is seeded per (seed, epoch, index): 2 worker processes give the 0-worker run."""
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, tmp_path / "workers", "--set", "train.workers=2"))
    assert r.code == 0, r.err
    assert yaml.safe_load((tmp_path / "workers" / "config.yaml").read_text())["train"]["workers"] == 2
    first, second = _rows(runs["sigmoid"] / "metrics.csv"), _rows(tmp_path / "workers" / "metrics.csv")
    for key in ("train_loss", "val_loss", "val_mean_dice"):
        assert [row[key] for row in first] == [row[key] for row in second], key


def test_a_compile_that_fails_falls_back_to_eager_saying_why_and_trains_the_same_run(runs, tmp_path, tiny_nuclei,
                                                                                     monkeypatch, caplog):
    """train.compile where torch.compile fails (no C++ compiler, an unsupported operation): one line
    with the reason, then eager training, which is the uncompiled run number for number."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found\nset TORCHINDUCTOR_CXX to a C++ compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.compile=true"))
    assert r.code == 0, r.err
    assert "completed after 2 epochs" in r.out
    assert ("train.compile: torch.compile failed (RuntimeError: Compiler: cc is not found); training eagerly"
            in caplog.text), caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["compile"] is True
    timings = ("seconds", "images_per_s")
    eager, fallback = _rows(runs["sigmoid"] / "metrics.csv"), _rows(run / "metrics.csv")
    assert [{k: v for k, v in row.items() if k not in timings} for row in fallback] == \
        [{k: v for k, v in row.items() if k not in timings} for row in eager]
    a = load_file(str(runs["sigmoid"] / "last" / "model.safetensors"))
    b = load_file(str(run / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bad data: exit 2, the file named, nothing written ----------------------------------------------------


@pytest.fixture
def data(tmp_path) -> Path:
    """A private copy of 6 real pairs, free to damage."""
    return copy_nuclei(tmp_path / "data", 6)


def _pairs(data: Path) -> tuple[list[Path], list[Path]]:
    return sorted((data / "train" / "images").iterdir()), sorted((data / "train" / "masks").iterdir())


def test_image_without_mask_exits_2_naming_the_image(cli, tmp_path, data):
    images, masks = _pairs(data)
    masks[0].unlink()
    out = tmp_path / "run"
    assert_refused(cli(*train_args(SIGMOID, data, out)), out, str(images[0]), "have no mask")


def test_corrupt_image_exits_2_naming_the_file(cli, tmp_path, data):
    images, _ = _pairs(data)
    images[1].write_bytes(b"\x89PNG\r\n\x1a\n garbage" * 20)
    out = tmp_path / "run"
    assert_refused(cli(*train_args(SIGMOID, data, out)), out, str(images[1]), "cannot read")


def test_every_broken_file_is_reported_at_once(cli, tmp_path, data):
    images, masks = _pairs(data)
    images[1].write_bytes(b"not an image")
    masks[4].write_bytes(b"not a mask either")
    out = tmp_path / "run"
    r = cli(*train_args(SIGMOID, data, out))
    assert_refused(r, out, "2 of ", str(images[1]), str(masks[4]))


def test_index_mask_value_out_of_range_exits_2_naming_the_mask(cli, tmp_path, data):
    _, masks = _pairs(data)
    for mask in masks:  # 0/255 -> 0/1 index masks for [background, nucleus] ...
        Image.fromarray((np.asarray(Image.open(mask)) // 255).astype(np.uint8)).save(mask)
    arr = np.asarray(Image.open(masks[2])).copy()
    arr[0, 0] = 5  # ... one of them with a value outside the two classes
    Image.fromarray(arr).save(masks[2])
    out = tmp_path / "run"
    r = cli(*train_args(SOFTMAX, data, out, "--set", "data.mask=index"))
    assert_refused(r, out, str(masks[2]), "values [5]", "data.ignore_index")
    assert r.err.count(".png") == 1  # only the broken mask is named


def test_mask_with_another_aspect_ratio_exits_2_naming_the_mask(cli, tmp_path, data):
    images, masks = _pairs(data)
    Image.open(masks[3]).resize((128, 200), Image.NEAREST).save(masks[3])
    out = tmp_path / "run"
    assert_refused(cli(*train_args(SIGMOID, data, out)), out, str(masks[3]), "128x200", images[3].name,
                   "aspect ratio")


def test_mask_at_another_resolution_same_aspect_is_resized_logged_and_trains(cli, tmp_path, data, caplog):
    images, masks = _pairs(data)
    full = np.asarray(Image.open(masks[0]))
    small = full[::2, ::2]
    Image.fromarray(small).save(masks[0])
    # read: the mask comes back at its image's size, each pixel repeated 2x2 (nearest neighbour)
    sample = next(s for s in find_pairs(data, "train").samples if s.mask == masks[0])
    px = PairReader(build_mask_format("binary", ["nucleus"]), 3).read(sample)
    image, labels, valid = px.image, px.labels, px.valid
    assert image.shape == (256, 256, 3) and labels.shape == (256, 256, 1) and valid.shape == (256, 256)
    assert np.array_equal(labels[:, :, 0], np.kron(small > 127, np.ones((2, 2), bool)).astype(np.uint8))
    caplog.clear()
    out = tmp_path / "run"
    r = cli(*train_args(SIGMOID, data, out, epochs=1))
    assert r.code == 0, r.err
    assert [row["epoch"] for row in _rows(out / "metrics.csv")] == ["1"]
    resized = [rec.getMessage() for rec in caplog.records if "resized" in rec.getMessage()]
    assert len(resized) == 1 and str(masks[0]) in resized[0] and "128x128" in resized[0]


def test_a_time_limit_stops_inside_an_epoch_then_validates_and_saves(tmp_path, tiny_nuclei, caplog):
    """An epoch of 100 000 steps would take hours: train.time_limit 3 s stops it after the steps that fit,
    then the run validates and writes best/ and last/ as a last epoch does (resumable into epoch 2)."""
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.steps_per_epoch=100000",
                            "--set", "train.time_limit=3", epochs=3))
    assert r.code == 0, r.err
    stop = next(m for m in caplog.messages if m.startswith("time limit: stopped after"))
    steps = int(stop.split()[4])
    assert 0 < steps < 100000 and "of 100000 steps of epoch 1" in stop
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 1 and rows[0]["val_mean_dice"] != "nan"
    assert json.loads((run / "last" / "model.json").read_text())["epoch"] == 1
    assert torch.load(run / "last" / "train_state.pt", weights_only=True)["epoch"] == 1
    assert (run / "best" / "model.json").is_file()


def test_a_time_limit_ends_at_the_epoch_after_which_another_validation_would_not_fit(tmp_path, tiny_nuclei, caplog,
                                                                                     monkeypatch):
    """A (faked) 499.9 s validation against a 1000 s limit: the first epoch's 2 steps fit with their validation,
    but not a step more and a second validation, so the run ends after epoch 1 (of 3), validated and saved,
    rather than validating again one step later, past the limit."""
    monkeypatch.setattr(segkit.train, "validation_seconds", lambda run: 499.9)
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.time_limit=1000", epochs=3))
    assert r.code == 0, r.err
    assert any(m.startswith("time limit: stopped after 2 of 2 steps of epoch 1") for m in caplog.messages)
    assert len(_rows(run / "metrics.csv")) == 1
    assert json.loads((run / "last" / "model.json").read_text())["epoch"] == 1 and (run / "best").is_dir()


def test_the_schedule_warms_up_then_decays_by_its_steps_or_its_clock_whichever_is_further():
    """Hand values: 10 warm-up steps of 110; then 0.5 (1 + cos(pi p)) with p the larger of the steps' and the
    clock's progress, the clock counted from the warm-up's end."""
    s = segkit.train.Schedule(total_steps=110, warmup=10)
    assert [s(0), s(4), s(9), s(10)] == [0.1, 0.5, 1.0, 1.0]
    assert s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0) and s(500) == pytest.approx(0.0)
    s.tick(0.2, 10)  # the warm-up's steps done when a fifth of the time has passed
    s.tick(0.8, 30)  # three quarters of the time after it: the clock ahead of the steps
    assert s(60) == pytest.approx(0.5 * (1 + np.cos(0.75 * np.pi)))
    assert s(100) == pytest.approx(0.5 * (1 + np.cos(0.9 * np.pi)))  # the steps ahead of the clock
    s.tick(0.5, 40)  # the clock never runs back
    assert s.clock == 0.8
    s.tick(1.0, 41)
    assert s(41) == pytest.approx(0.0)


def test_a_time_limited_warm_up_ends_at_a_tenth_of_the_time_if_its_steps_take_longer():
    """Hand values: a warm-up of 100 steps, of which 3 ran when 5 % of the time had passed: the factor is
    0.05 / 0.1 = 0.5, not 4 / 100; at 10 % it is over, and the cosine runs over the remaining 90 %."""
    s = segkit.train.Schedule(total_steps=100_000, warmup=100)
    s.tick(0.05, 3)
    assert s(3) == pytest.approx(0.5) and s.warm_clock is None
    s.tick(0.1, 6)
    assert s.warm_clock == pytest.approx(0.1) and s(6) == pytest.approx(1.0)
    s.tick(0.55, 20)
    assert s(20) == pytest.approx(0.5)  # (0.55 - 0.1) / 0.9 = half the cosine
    assert segkit.train.Schedule(total_steps=100_000, warmup=100)(3) == pytest.approx(0.04)  # no clock: steps


@pytest.mark.parametrize(("epochs", "steps", "warmup"), [(2, 123, 25), (40, 46, 46), (200, 250, 100), (1, 5, 1)])
def test_the_warm_up_is_an_epoch_at_most_100_steps_and_a_tenth_of_the_run(epochs, steps, warmup):
    """CamVid's 3-minute plan (2 epochs of 123 steps) warmed up over 100 of them before; now over 25."""
    t = load_config(SIGMOID, [f"train.epochs={epochs}", f"train.steps_per_epoch={steps}"]).train
    assert segkit.train.Schedule.of(t, steps).warmup == warmup


def test_a_time_limit_shorter_than_the_warm_up_steps_still_reaches_the_peak_and_anneals(tmp_path, tiny_nuclei,
                                                                                      monkeypatch):
    """An epoch of 100 000 steps warms up over 100 of them; each step here is slowed to take at least 0.1 s, so
    a 6 s limit runs fewer than 60. The learning rate still reaches its peak (the warm-up ends at a tenth of
    the time) and ends near 0; by steps alone it would have stopped at under 60 % of the peak."""
    lrs: list[float] = []
    step = segkit.train.train_step

    def slow_step(run, net, item):
        loss = step(run, net, item)
        time.sleep(0.1)
        lrs.append(run.optimizer.param_groups[0]["lr"])
        return loss

    monkeypatch.setattr(segkit.train, "train_step", slow_step)
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, tmp_path / "run", "--set", "train.steps_per_epoch=100000",
                            "--set", "train.time_limit=6", epochs=1))
    assert r.code == 0, r.err
    assert len(lrs) < 60, len(lrs)
    assert max(lrs) > 0.9e-3 and lrs[-1] < 0.05e-3, lrs


def test_a_time_limit_counts_the_last_save_the_run_waits_for(tmp_path, tiny_nuclei, monkeypatch):
    """Steps slowed to 0.25 s (epochs of ~3 s), each last/ write 2 s longer: the run waits for its final save
    and for a write still in flight before it, so its steps end early enough for both (`Checkpointer.waiting`)
    and it returns within its 14 s limit (12.1 s measured). Counting only its validation, it returned at 16.8 s."""
    write, step = segkit.checkpoints.write_unit, segkit.train.train_step

    def slow_write(folder, files):
        if folder.name == "last":
            time.sleep(2.0)
        write(folder, files)

    def slow_step(run, net, item):
        loss = step(run, net, item)
        time.sleep(0.25)
        return loss

    monkeypatch.setattr(segkit.checkpoints, "write_unit", slow_write)
    monkeypatch.setattr(segkit.train, "train_step", slow_step)
    began = time.perf_counter()
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, tmp_path / "run", "--set", "train.steps_per_epoch=12",
                            "--set", "train.time_limit=14", epochs=100000))
    took = time.perf_counter() - began
    assert r.code == 0, r.err
    assert took < 14.5, took


def test_under_a_time_limit_the_learning_rate_anneals_by_the_clock(tmp_path, tiny_nuclei, caplog):
    """400 000 planned steps would keep the step cosine near its peak; an 8 s limit ends the run after a few
    epochs of 4 steps, and by then the learning rate has followed the clock down to near 0 (monotonically,
    after the 4 warm-up steps), rather than being cut at its peak. Near: the run ends at the epoch after which
    a step more and the end (that epoch's write still in flight, then the last) would not fit, which here, where
    a write takes about as long as an epoch, is some way before the clock's end (6 % of the peak measured)."""
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.steps_per_epoch=4",
                            "--set", "train.time_limit=8", epochs=100000))
    assert r.code == 0, r.err
    assert any(m.startswith("time limit: stopped after") for m in caplog.messages)
    lrs = [float(row["lr"]) for row in _rows(run / "metrics.csv")]
    assert len(lrs) >= 2 and lrs[-1] < 0.1 * 1e-3, lrs
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs


def test_a_time_limit_counts_the_last_validation_before_the_first_one(tmp_path, tiny_nuclei, caplog, monkeypatch):
    """The run's end is known from the start (a validation timed on a few samples), so a limit that only the
    first validation would overrun stops the first epoch at once: here a (faked) 1000 s validation against a
    500 s limit, after one step."""
    monkeypatch.setattr(segkit.train, "validation_seconds", lambda run: 1000.0)
    run = tmp_path / "run"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, "--set", "train.steps_per_epoch=100000",
                            "--set", "train.time_limit=500", epochs=3))
    assert r.code == 0, r.err
    assert any(m.startswith("time limit: stopped after 1 of 100000 steps of epoch 1") for m in caplog.messages)
