"""The planner (`segkit plan`, `segkit train ROOT`): each decision and its reason, on real embedded data and
datasets derived from it (tests/samples.py says how), the budget arithmetic, and the errors of a folder that
cannot be planned."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

import samples
from conftest import assert_refused, copy_nuclei
from geodata import make_geo_dataset
from segkit.config import parse_config
from segkit.errors import ConfigError
from segkit.data.volumes import Volume
from segkit.plan import declared_reading, make_plan, parse_budget


def _plan(root, **kw):
    return make_plan(root, device="cpu", measure=False, **kw)


def _reason(plan, key: str) -> str:
    return next(c.reason for c in plan.choices if c.key == key)


def test_nuclei_binary_sigmoid_imagenet_and_dice_for_the_minority_foreground():
    plan = _plan(samples.NUCLEI)
    assert (plan.get("data.mask"), plan.get("data.classes"), plan.get("model.head")) == ("binary", ["fg"], "sigmoid")
    assert "0 and 255" in _reason(plan, "data.mask")
    assert plan.get("data.normalize") == "imagenet" and plan.get("data.channels") == 3
    # nuclei cover 15.6 % of the pixels: counted here independently of the planner
    masks = [np.asarray(Image.open(p)) for p in sorted((samples.NUCLEI / "train" / "masks").glob("*.png"))]
    masks += [np.asarray(Image.open(p)) for p in sorted((samples.NUCLEI / "test" / "masks").glob("*.png"))]
    share = sum(int((m > 0).sum()) for m in masks) / sum(m.size for m in masks)
    assert plan.get("train.loss") == "bce+dice"
    assert f"{share:.2%}" in _reason(plan, "train.loss")
    assert plan.get("train.crop") == 256 and "256 x 256" in _reason(plan, "train.crop")
    plan.config()  # a valid config


def test_foreground_stored_as_zero_is_found_by_the_majority_and_said(tmp_path):
    root = samples.inverted_nuclei(tmp_path / "inv", sorted(p.stem for p in (samples.NUCLEI / "train" / "images")
                                                             .glob("*.png"))[:6])
    plan = _plan(root)
    assert plan.get("data.foreground_value") == 0
    assert "minority value 0 is taken as the foreground" in _reason(plan, "data.foreground_value")


def test_overlapping_labels_need_sigmoid(tmp_path):
    root = samples.hippo_multilabel(tmp_path / "ml", cases=samples.HIPPO_CASES[:2], every=3)
    plan = _plan(root)
    assert plan.get("data.mask") == "multilabel" and plan.get("data.classes") == ["hippocampus", "posterior"]
    assert plan.get("model.head") == "sigmoid" and "more than one label" in _reason(plan, "model.head")
    assert plan.get("model.thresholds") == 0.5 and plan.get("train.loss").startswith("bce")


def test_index_masks_are_named_by_value_and_rare_classes_get_dice(tmp_path):
    root = samples.hippo_slices(tmp_path / "idx", cases=samples.HIPPO_CASES[:2], every=2)
    plan = _plan(root)
    assert plan.get("data.mask") == "index"
    assert plan.get("data.classes") == ["background", "class_1", "class_2"]
    assert "name the classes in data.classes" in _reason(plan, "data.classes")
    assert plan.get("model.head") == "softmax" and plan.get("train.loss") == "ce+dice"
    assert plan.get("train.crop") == 64  # slices of ~35 x 50 pixels fit one crop of 64


def test_a_value_set_apart_is_refused_until_declared_then_read_as_declared(cli, tmp_path):
    """Index masks of 0, 1, 2 with a boundary ring of 255 (as PASCAL VOC marks its void): not 256 classes, 252
    never seen, but an error naming the value and the fix. Declared (`--set data.ignore_index=255` and the
    names), the plan reads the masks so: the ring is in no class's share, computed here by hand."""
    root = samples.hippo_slices(tmp_path / "idx", cases=samples.HIPPO_CASES[:2], every=2, ignore=255)
    assert_refused(cli("plan", root, "--out", tmp_path / "out" / "plan.yaml", "--no-progress"), tmp_path / "out",
                   "[0, 1, 2, 255]", "--set data.ignore_index=255")
    names = ["background", "anterior", "posterior"]
    declare = ["--set", "data.ignore_index=255", "--set", f"data.classes=[{', '.join(names)}]"]
    shown = cli("inspect", root, *declare)
    assert shown.code == 0 and "data.ignore_index            255             as declared" in shown.out, shown.err
    plan = _plan(root, declared=declared_reading(["data.ignore_index=255", f"data.classes=[{', '.join(names)}]",
                                                  "train.lr=0.1", "data.cache=false"]))
    assert plan.get("data.ignore_index") == 255 and plan.get("data.classes") == names
    assert _reason(plan, "data.ignore_index") == "as declared (--set data.ignore_index)"
    assert _reason(plan, "data.mask").startswith("grey masks holding the values [0, 1, 2] ")
    masks = [np.asarray(Image.open(p)) for p in sorted((root / "train" / "masks").glob("*.png"))]
    valid = sum(int((m != 255).sum()) for m in masks)
    shares = {names[v]: sum(int((m == v).sum()) for m in masks) / valid for v in (1, 2)}
    rarest = min(shares, key=shares.get)
    assert f"{rarest} covers {shares[rarest]:.2%} of the pixels" in _reason(plan, "train.loss")
    plan.config()


def test_volume_labels_declared_ignored_leave_the_classes_and_their_shares(tmp_path):
    """Hippocampus volumes in the segkit layout (no dataset.json) with label 2 (posterior) declared the ignore
    value: two classes whose shares, counted here with nibabel, leave those voxels out, and plan.yaml states the
    ignore value (a volume report writes none of its own). Where dataset.json says otherwise, and for a key
    volumes do not use, the declaration is refused naming the key."""
    root = _segkit_volumes(tmp_path / "v")
    plan = _plan(root, declared={"ignore_index": 2})
    assert plan.get("data.classes") == ["background", "class_1"] and plan.get("data.ignore_index") == 2
    assert yaml.safe_load(plan.yaml())["data"]["ignore_index"] == 2
    labels = [np.asanyarray(nib.load(p).dataobj) for p in sorted((root / "train" / "masks").glob("*.nii.gz"))]
    share = sum(int((m == 1).sum()) for m in labels) / sum(int((m != 2).sum()) for m in labels)
    assert f"class_1 covers {share:.2%} of the voxels" in _reason(plan, "train.loss")
    with pytest.raises(ConfigError, match=r"data.ignore_index: 2, but .*dataset.json gives None"):
        _plan(samples.HIPPO, declared={"ignore_index": 2})
    with pytest.raises(ConfigError, match=r"data.bands: not used for volume datasets"):
        _plan(samples.HIPPO, declared={"bands": [1]})


def test_plan_takes_only_the_keys_that_say_how_to_read_the_data(cli, tmp_path):
    for key in ("train.lr=0.1", "data.cache=false"):
        result = cli("plan", samples.NUCLEI, "--out", tmp_path / "out" / "plan.yaml", "--set", key, "--no-progress")
        assert_refused(result, tmp_path / "out", key.partition("=")[0], "segkit train")
    assert_refused(cli("plan", samples.NUCLEI, "--out", tmp_path / "out" / "plan.yaml", "--set", "data.ignore_index=-1",
                       "--no-progress"), tmp_path / "out", "data.ignore_index = -1")


def test_two_values_without_0_are_index_masks_not_binary(tmp_path):
    """Masks of 1 (background) and 2 (nucleus): not "0 and one foreground value", so not binary masks (which
    would refuse them), but class indices."""
    root = copy_nuclei(tmp_path / "d", 4)
    for mask in (root / "train" / "masks").iterdir():
        Image.fromarray(np.where(np.asarray(Image.open(mask)) > 0, 2, 1).astype(np.uint8)).save(mask)
    plan = _plan(root)
    assert plan.get("data.mask") == "index" and plan.get("data.classes") == ["background", "class_1", "class_2"]
    plan.config()


def test_colour_masks_give_one_class_per_colour(tmp_path):
    colours = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255)}
    for stem, (image, labels) in list(samples.hippo_slice_arrays(samples.HIPPO_CASES[:1], every=4).items()):
        (tmp_path / "c" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "c" / "images" / f"{stem}.png")
        Image.fromarray(np.array([colours[v] for v in range(3)], np.uint8)[labels]).save(
            tmp_path / "c" / "masks" / f"{stem}.png")
    plan = _plan(tmp_path / "c")
    assert plan.get("data.mask") == "color"
    assert plan.get("data.colors") == [list(c) for c in sorted(colours.values())]


def test_geotiff_chips_take_their_bands_and_dataset_statistics(tmp_path):
    root = make_geo_dataset(tmp_path / "geo", bands=4, splits={"train": 6, "test": 3})
    plan = _plan(root)
    assert plan.get("data.channels") == 4 and plan.get("data.normalize") == "dataset"
    assert "uint16" in _reason(plan, "data.normalize")
    assert "nodata [0.0]" in _reason(plan, "data.normalize")
    plan.config()


def test_volume_labels_are_softmax_with_dice_and_a_stated_slice_axis():
    plan = _plan(samples.HIPPO)
    assert plan.get("model.head") == "softmax" and plan.get("train.loss") == "ce+dice"
    assert plan.get("data.normalize") == ["zscore"] and "MRI -> zscore" in _reason(plan, "data.normalize")
    assert plan.get("data.slice_axis") in (0, 1, 2) and "slices along axis" in _reason(plan, "data.slice_axis")
    assert "data.classes" not in [c.key for c in plan.choices]  # dataset.json names them
    plan.config()


def test_regions_need_sigmoid(tmp_path):
    plan = _plan(samples.hippo_regions(tmp_path / "regions"))
    assert plan.get("model.head") == "sigmoid" and "regions" in _reason(plan, "model.head")


def test_the_yaml_is_the_config_with_every_reason_above_its_key():
    plan = _plan(samples.NUCLEI)
    text = plan.yaml()
    raw = yaml.safe_load(text)
    assert parse_config(raw).model_dump() == plan.config().model_dump()
    lines = text.splitlines()
    for c in plan.choices:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {c.key.split('.', 1)[1]}:"))
        assert lines[at - 1].startswith("  # "), c.key


def test_edited_keys_are_named_in_the_plan_record():
    raw = _plan(samples.NUCLEI).raw()
    raw["train"]["crop"] = 128
    meta = parse_config(raw).plan_meta()
    assert meta["edited"] == ["train.crop"] and "train.crop" in meta["reasons"]


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("600", 600),
                                           ("2.5m", 150)])
def test_budgets(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "0", "-5m"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


@pytest.mark.slow
def test_a_measured_plan_fits_its_budget(tmp_path):
    """The schedule's arithmetic on measured costs: the predicted time is the budget's (within the rounding of
    steps into epochs), and the training time limit is the budget less the planning. (Slow tier: the default
    tier checks the same arithmetic exactly on faked costs.)"""
    root = samples.hippo_slices(tmp_path / "idx", cases=samples.HIPPO_CASES[:3], every=2)
    plan = make_plan(root, budget_s=120, device="cpu")
    per_epoch, epochs = plan.get("train.steps_per_epoch"), plan.get("train.epochs")
    assert epochs >= 1 and per_epoch >= 1 and plan.get("train.batch_size") >= 2
    assert plan.predicted_s == pytest.approx(120, rel=0.05)
    assert 0 < plan.get("train.time_limit") < 120
    assert "s a step" in _reason(plan, "train.steps_per_epoch")
    assert "MiB a step" in _reason(plan, "train.batch_size")
    assert json.loads(plan.files()["fingerprint.json"])["items"] > 0


def test_no_budget_trains_to_a_plateau_with_a_cap(tmp_path):
    root = samples.hippo_slices(tmp_path / "idx", cases=samples.HIPPO_CASES[:2], every=3)
    plan = make_plan(root, device="cpu")
    assert plan.get("train.early_stop_patience") >= 1
    assert plan.get("train.epochs") * plan.get("train.steps_per_epoch") > 0
    assert "train.time_limit" not in [c.key for c in plan.choices]


def test_a_folder_that_is_no_dataset_is_refused(cli, tmp_path):
    (tmp_path / "holiday").mkdir()
    assert_refused(cli("train", tmp_path / "holiday", "--budget", "1m", "--out", tmp_path / "run", "--no-progress"), tmp_path / "run",
                   "no images/ folder")


def test_a_dataset_without_masks_is_refused(cli, tmp_path):
    root = copy_nuclei(tmp_path / "d", 4)
    for mask in (root / "train" / "masks").iterdir():
        mask.unlink()
    assert_refused(cli("plan", root, "--out", tmp_path / "out" / "plan.yaml", "--no-progress"), tmp_path / "out", "no mask files")


def test_pairs_that_do_not_match_are_refused(cli, tmp_path):
    root = copy_nuclei(tmp_path / "d", 4)
    for mask in (root / "train" / "masks").iterdir():
        mask.rename(mask.with_name("other_" + mask.name))
    assert_refused(cli("plan", root, "--out", tmp_path / "out" / "plan.yaml", "--no-progress"), tmp_path / "out",
                   "no image has a mask")


def test_an_existing_plan_is_never_overwritten(cli, tmp_path):
    out = tmp_path / "plan.yaml"
    out.write_text("# edited by hand\n")
    result = cli("plan", samples.NUCLEI, "--out", out, "--no-progress")
    assert result.code == 2 and "exists" in result.err and "Traceback" not in result.err
    assert out.read_text() == "# edited by hand\n" and not out.with_suffix(".fingerprint.json").exists()


def test_a_budget_with_a_config_file_is_refused(cli, tmp_path):
    result = cli("train", samples.ROOT / "configs" / "nuclei-softmax.yaml", "--budget", "1m", "--out",
                 tmp_path / "run")
    assert_refused(result, tmp_path / "run", "--budget plans a dataset folder")


@pytest.mark.slow
def test_train_a_folder_keeps_the_plan_and_its_reasons_in_model_json(cli, tmp_path):
    root = samples.hippo_slices(tmp_path / "idx", cases=samples.HIPPO_CASES[:2], every=2, ignore=255)
    out = tmp_path / "run"
    result = cli("train", root, "--budget", "45s", "--out", out, "--no-progress", "--set", "data.ignore_index=255",
                 "--set", "data.classes=[background, anterior, posterior]")
    assert result.code == 0, result.err
    assert {"plan.yaml", "fingerprint.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "best" / "model.json").read_text())
    assert meta["plan"]["edited"] == [] and meta["plan"]["reasons"]["model.head"].startswith("every pixel")
    assert meta["plan"]["reasons"]["data.ignore_index"] == "as declared (--set data.ignore_index)"
    assert meta["classes"] == ["background", "anterior", "posterior"]
    assert "of the 45 s budget" in result.out
    epochs = yaml.safe_load((out / "plan.yaml").read_text())["train"]["epochs"]
    again = cli("train", out / "plan.yaml", "--out", tmp_path / "again", "--set", "train.lr=0.002", "--epochs",
                str(epochs + 1), "--set", "train.time_limit=8", "--no-progress")
    assert again.code == 0, again.err
    edited = json.loads((tmp_path / "again" / "best" / "model.json").read_text())["plan"]["edited"]
    assert edited == ["train.epochs", "train.lr", "train.time_limit"]
    assert not math.isnan(meta["val"]["mean_dice"])


def _unevenness(masks: list[np.ndarray], values: list[int], axis: int) -> float:
    """By hand: per class (a mask value), its pixels in the first and second half along `axis` (the middle line
    of an odd size in neither); the pixel-weighted mean of |first - second| / (first + second)."""
    first, second = np.zeros(len(values)), np.zeros(len(values))
    for m in masks:
        n = m.shape[axis]
        a, b = np.take(m, range(n // 2), axis), np.take(m, range(n - n // 2, n), axis)
        first += [(a == v).sum() for v in values]
        second += [(b == v).sum() for v in values]
    return float(np.abs(first - second).sum() / (first + second).sum())


def test_evenly_spread_nuclei_keep_every_flip_and_turn():
    plan = _plan(samples.NUCLEI)
    masks = [np.asarray(Image.open(p)) for p in sorted((samples.NUCLEI / "train" / "masks").glob("*.png"))]
    vertical, horizontal = _unevenness(masks, [255], 0), _unevenness(masks, [255], 1)  # training masks only
    assert max(vertical, horizontal) < 0.25
    aug = plan.get("train.augment")
    assert (aug["hflip"], aug["vflip"], aug["rotate90"]) == (0.5, 0.5, 0.5)
    reason = _reason(plan, "train.augment")
    assert f"top/bottom unevenly by {vertical:.2f}, left/right by {horizontal:.2f}" in reason
    assert "no direction" in reason


def test_pictures_with_a_direction_lose_the_flips_that_break_it(tmp_path):
    """Real nuclei masks with their bottom halves cleared (nuclei only ever above the middle, as sky is above
    road): vertical flips and turns go, left-right mirrors stay; the numbers are computed here by hand."""
    root = copy_nuclei(tmp_path / "d", 6)
    masks = []
    for path in (root / "train" / "masks").iterdir():
        m = np.asarray(Image.open(path)).copy()
        m[m.shape[0] // 2:] = 0
        Image.fromarray(m).save(path)
        masks.append(m)
    plan = _plan(root)
    vertical, horizontal = _unevenness(masks, [255], 0), _unevenness(masks, [255], 1)
    assert vertical == 1.0 and horizontal < 0.25
    aug = plan.get("train.augment")
    assert (aug["hflip"], aug["vflip"], aug["rotate90"]) == (0.5, 0.0, 0.0)
    assert f"top/bottom unevenly by 1.00, left/right by {horizontal:.2f}" in _reason(plan, "train.augment")
    assert "vflip, rotate90 would break; kept: hflip" in _reason(plan, "train.augment")


def test_aligned_volumes_measure_their_direction_on_the_slices(tmp_path):
    """MSD hippocampus on its RAS axes: the anterior part lies in front of the posterior one, so the slices'
    class layout has a direction along the anterior axis. Counted by hand on the label volumes' slices."""
    plan = _plan(samples.HIPPO)
    axis = plan.get("data.slice_axis")
    labels = [Volume(f.name, [f]).data[..., 0] for f in sorted((samples.HIPPO / "labelsTr").glob("*.nii.gz"))]
    rows, cols = (a for a in range(3) if a != axis)
    vertical, horizontal = _unevenness(labels, [0, 1, 2], rows), _unevenness(labels, [0, 1, 2], cols)
    aug = plan.get("train.augment")
    assert aug["vflip"] == (0.0 if vertical > 0.25 else 0.5) and aug["hflip"] == (0.0 if horizontal > 0.25 else 0.5)
    assert f"top/bottom unevenly by {vertical:.2f}, left/right by {horizontal:.2f}" in _reason(plan, "train.augment")


def _colour_slices(root):
    colours = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255)}
    for stem, (image, labels) in samples.hippo_slice_arrays(samples.HIPPO_CASES[:2], every=2).items():
        for kind in ("images", "masks"):
            (root / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.array([colours[v] for v in range(3)], np.uint8)[labels]).save(root / "masks" / f"{stem}.png")
    return root


def _segkit_volumes(root):
    for kind, folder, suffix in (("images", "imagesTr", "_0000"), ("masks", "labelsTr", "")):
        (root / "train" / kind).mkdir(parents=True)
        for case in samples.HIPPO_CASES[:3]:
            shutil.copy(samples.HIPPO / folder / f"{case}{suffix}.nii.gz", root / "train" / kind / f"{case}.nii.gz")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["colour", "segkit volumes", "resampled cord", "msd"])
def test_train_a_folder_of_every_layout(cli, tmp_path, layout):
    """Zero-config training end to end on the layouts the other slow test does not train: colour masks, the
    segkit volume layout (classes from label values), the spinal-cord scans whose 0.5 mm contrast is
    resampled to the training cases' median in-plane spacing, and the Decathlon (MSD) layout with two channels
    in one 4-D file, whose test image is then predicted on its own grid."""
    root = {"colour": lambda: _colour_slices(tmp_path / "c"), "segkit volumes": lambda: _segkit_volumes(tmp_path / "v"),
            "resampled cord": lambda: samples.CORD, "msd": lambda: samples.msd_hippocampus(tmp_path / "Task04")
            }[layout]()
    out = tmp_path / "run"
    result = cli("train", root, "--budget", "40s", "--out", out, "--no-progress")
    assert result.code == 0, result.err
    meta = json.loads((out / "best" / "model.json").read_text())
    assert not math.isnan(meta["val"]["mean_dice"]) and meta["plan"]["edited"] == []
    if layout == "colour":
        assert meta["data"]["mask"] == "color" and len(meta["classes"]) == 3
    elif layout == "segkit volumes":
        assert meta["classes"] == ["background", "class_1", "class_2"]
    elif layout == "msd":
        assert meta["classes"] == ["background", "Anterior", "Posterior"] and meta["in_channels"] == 2
        assert meta["data"]["volume"]["layout"] == "msd"
        predicted = cli("predict", out / "best", root / "imagesTs", tmp_path / "masks", "--no-progress")
        assert predicted.code == 0, predicted.err
        image, mask = nib.load(root / "imagesTs" / "hippocampus_033.nii.gz"), nib.load(tmp_path / "masks" / "hippocampus_033.nii.gz")
        assert mask.shape == image.shape[:3] and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2}
    else:
        spacing = [Volume(c, [samples.CORD / "imagesTr" / f"{c}_0000.nii.gz"]).spacing for c in meta["data"]["train_cases"]]
        plane = [a for a in range(3) if a != meta["data"]["volume"]["slice_axis"]]
        assert meta["data"]["volume"]["target_spacing"] == pytest.approx(np.median(spacing, axis=0)[plane].tolist())


class _FakeProbe:
    """Step costs by formula (a step's time grows with the batch and the crop's area; memory small), so the
    planner's choice of encoder, crop and batch is checked without timing anything."""

    scale = 1.0

    def __init__(self, cfg, head, device, encoder):
        self.factor = 1.0 if encoder == "resnet34" else 0.6

    def cost(self, batch, crop, steps=2):
        from segkit.probe import StepCost

        return StepCost(batch, self.scale * self.factor * 0.02 * batch * (crop / 128) ** 2, 2**20 * batch)


def _grid_masks(root):
    """Every training mask of the embedded nuclei replaced by a grid of 3-pixel lines every 32 pixels: one
    connected network per image (as ISBI's membranes), its typical object most of the image."""
    for mask in (root / "train" / "masks").iterdir():
        m = np.zeros_like(np.asarray(Image.open(mask)))
        for k in range(0, min(m.shape), 32):
            m[k:k + 3], m[:, k:k + 3] = 255, 255
        Image.fromarray(m).save(mask)
    return root


@pytest.mark.parametrize("masks, crop, encoder", [("nuclei", 128, "resnet34"), ("grid", 256, "resnet34")])
def test_the_crop_is_halved_for_batch_norm_only_while_it_keeps_the_objects_context(tmp_path, monkeypatch, masks,
                                                                                   crop, encoder):
    """48 images of 256 x 256: at crop 256 the 5 % data bound gives a batch of 2, at 128 a batch of 9. Small nuclei
    (typical object ~1 900 px, four fit in 128 x 128) take the halved crop; a connected network filling the image
    keeps 256 (four of its ~11 700 px would need 216 x 216), and with no batch of 8 anywhere, resnet34."""
    monkeypatch.setattr("segkit.plan.StepProbe", _FakeProbe)
    root = shutil.copytree(samples.NUCLEI, tmp_path / "d")
    shutil.rmtree(root / "test")
    if masks == "grid":
        _grid_masks(root)
    plan = make_plan(root, device="cpu")
    assert (plan.get("train.crop"), plan.get("model.encoder")) == (crop, encoder)
    typical = plan.fingerprint["typical_object_pixels"]["fg"]
    if masks == "grid":
        assert typical > 128 ** 2 / 4 and plan.get("train.batch_size") == 2
        assert f"not halved below 256: a crop of 128 covers under 4 typical fg objects ({typical:.0f} pixels each)" \
            in _reason(plan, "train.crop")
        assert "no encoder and crop" in _reason(plan, "model.encoder")
    else:
        assert typical < 128 ** 2 / 4 and plan.get("train.batch_size") == 9
        assert "halved, not below 128" in _reason(plan, "train.crop")


def test_where_no_batch_of_8_fits_the_budget_the_largest_batch_tried_is_taken(tmp_path, monkeypatch):
    """Steps 12.5 times dearer and a 3-minute budget (102 s of steps, >= 100 of them: at most 1.02 s a step):
    resnet34 gets batch 2 at 256 and 4 at 128, resnet18 2 and 6; none reaches 8, so resnet18 at 128, batch 6."""
    from segkit.probe import RunCost

    monkeypatch.setattr("segkit.plan.StepProbe", type("Dear", (_FakeProbe,), {"scale": 12.5}))
    monkeypatch.setattr("segkit.plan.run_cost", lambda cfg, dev: RunCost(1.0, 0.3, 2.0, 0.5, 8))
    root = shutil.copytree(samples.NUCLEI, tmp_path / "d")
    plan = make_plan(root, budget_s=180, device="cpu")
    assert (plan.get("model.encoder"), plan.get("train.crop"), plan.get("train.batch_size")) == ("resnet18", 128, 6)
    reason = _reason(plan, "model.encoder")
    assert "no encoder and crop (of [256, 128]) reached a batch of 8: the largest batch tried" in reason
    assert "resnet34 at crop 128: batch 4 (100 steps in the budget)" in reason


def test_where_time_binds_the_batch_stops_at_8_and_the_budget_buys_steps(tmp_path, monkeypatch):
    """A 3-minute budget (102 s of steps, >= 100 of them: at most 1.02 s a step; resnet34 at 256 costs 0.08 s a
    sample) bounds the batch at 12, above batch norm's 8; the data would allow more (half of the 38 training
    images instead of 5 %: 19), so time binds, and the batch is 8 with the time left going to steps."""
    from segkit.probe import RunCost

    monkeypatch.setattr("segkit.plan.StepProbe", _FakeProbe)
    monkeypatch.setattr("segkit.plan.run_cost", lambda cfg, dev: RunCost(1.0, 0.3, 2.0, 0.5, 8))
    monkeypatch.setattr("segkit.plan.BATCH_SHARE", 0.5)
    root = shutil.copytree(samples.NUCLEI, tmp_path / "d")
    shutil.rmtree(root / "test")
    plan = make_plan(root, budget_s=180, device="cpu")
    assert (plan.get("model.encoder"), plan.get("train.crop"), plan.get("train.batch_size")) == ("resnet34", 256, 8)
    assert "8: the largest under batch norm's 8 (time binds: the rest of the budget buys steps)" \
        in _reason(plan, "train.batch_size")


def test_the_schedule_plans_epochs_past_the_budget_by_the_probes_error_and_the_limit_ends_it(tmp_path, monkeypatch):
    """Measured (faked): reading 1 s, 0.3 s a step, validation 2 s + checkpoint 0.5 s. Epochs of steps fill the
    time left after the validations, and a quarter more epochs are planned; the predicted finish is the budget,
    which the time limit keeps."""
    from segkit.probe import RunCost

    monkeypatch.setattr("segkit.plan.StepProbe", _FakeProbe)
    monkeypatch.setattr("segkit.plan.run_cost", lambda cfg, dev: RunCost(1.0, 0.3, 2.0, 0.5, 8))
    root = copy_nuclei(tmp_path / "d", 8)
    plan = make_plan(root, budget_s=300, device="cpu")
    left = plan.get("train.time_limit") - 1.0 - 5.0  # the limit is the budget less planning; less reading, end
    validations = min(20, int(0.1 * left // 2.5))
    steps = (left - validations * 2.5) / 0.3
    assert plan.get("train.epochs") == validations + math.ceil(validations / 4)
    assert plan.get("train.steps_per_epoch") == pytest.approx(steps / validations, abs=1)
    assert plan.predicted_s == 300
    assert f"the budget holds {validations} validations" in _reason(plan, "train.epochs")
    assert "follows the clock" in _reason(plan, "train.epochs")
