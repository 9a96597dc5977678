"""Config loading: dotted overrides, and every mistake -> exit 2 naming the key, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, TINY, assert_refused, train_args
from segkit.config import dump_config, load_config, parse_config, set_dotted
from segkit.errors import ConfigError

SIGMOID = CONFIGS / "nuclei-sigmoid.yaml"
SOFTMAX = CONFIGS / "nuclei-softmax.yaml"


# -- load_config and --set overrides --------------------------------------------------------------


def test_ready_configs_load_as_written():
    cfg = load_config(SIGMOID)
    assert cfg.model.head == "sigmoid" and cfg.data.classes == ["nucleus"] and cfg.data.mask == "binary"
    assert cfg.data.root == Path("data/nuclei") and cfg.train.epochs == 12 and cfg.train.crop == 128
    assert cfg.train.steps_per_epoch == 8 and cfg.train.val_every == 1 and cfg.train.lr == 0.001
    assert cfg.head().channels == 1
    assert load_config(SOFTMAX).head().channels == 2
    camvid = load_config(CONFIGS / "camvid.yaml")
    assert camvid.data.ignore_index == 11 and len(camvid.data.classes) == 11 and camvid.head().name == "softmax"
    isbi = load_config(CONFIGS / "isbi2012-membrane.yaml")
    assert isbi.data.foreground_value == 0 and isbi.data.channels == 1 and isbi.data.normalize == "auto"
    assert load_config(CONFIGS / "isic2018-multilabel-mini.yaml").data.mask == "multilabel"


def test_dotted_overrides_take_effect(tmp_path):
    before = SIGMOID.read_text()
    cfg = load_config(SIGMOID, [
        "train.epochs=3", "train.lr=3e-4", "train.augment.hflip=0", "train.augment.scale=[0.5, 2.0]",
        f"data.root={tmp_path}", "data.classes=[cell]", "model.encoder=resnet18",
        "model.thresholds=[0.4]", "model.encoder_weights=null", "train.early_stop_patience=2",
    ])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.augment.hflip == 0.0 and cfg.train.augment.scale == (0.5, 2.0)
    assert cfg.train.augment.vflip == 0.5  # untouched siblings keep their defaults
    assert cfg.data.root == tmp_path and cfg.data.classes == ["cell"]
    assert cfg.model.encoder == "resnet18" and cfg.model.encoder_weights is None
    assert cfg.head().thresholds == [0.4] and cfg.train.early_stop_patience == 2
    assert cfg.train.batch_size == 8 and cfg.train.crop == 128  # from the file
    assert SIGMOID.read_text() == before  # the file itself is not changed


def test_later_override_wins_and_values_are_yaml():
    cfg = load_config(SOFTMAX, ["train.epochs=3", "train.epochs=5", "train.amp=false", "data.mean=[1, 2, 3]",
                                "data.std=[4, 5, 6]"])
    assert cfg.train.epochs == 5 and cfg.train.amp is False and cfg.data.mean == (1, 2, 3) and cfg.data.std == (4, 5, 6)
    assert load_config(SOFTMAX).data.mean is None


def test_set_dotted_builds_sections_and_rejects_malformed_assignments():
    raw: dict = {"train": {"epochs": 1}}
    set_dotted(raw, "train.augment.hflip=0.25")
    set_dotted(raw, "model.head=sigmoid")
    assert raw == {"train": {"epochs": 1, "augment": {"hflip": 0.25}}, "model": {"head": "sigmoid"}}
    for bad in ("train.epochs", "=3"):
        with pytest.raises(ConfigError, match="expected key=value"):
            set_dotted(raw, bad)
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        set_dotted(raw, "train.epochs.x=1")


def test_dumped_config_loads_back_equal(tmp_path):
    cfg = load_config(SOFTMAX, ["train.epochs=2", f"data.root={tmp_path}"])
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override,words", [
    ("train.epoch=3", ["train.epoch: unknown key"]),
    ("model.heads=sigmoid", ["model.heads: unknown key"]),
    ("foo.bar=1", ["foo: unknown key"]),
    ("train.epochs=abc", ["train.epochs = 'abc'", "integer"]),
    ("train.crop=100", ["train.crop = 100", "multiple of 32", "e.g. 96"]),
    ("train.crop=16", ["train.crop = 16"]),
    ("train.batch_size=0", ["train.batch_size = 0"]),
    ("train.device=tpu", ["train.device = 'tpu'"]),
    ("data.val_fraction=1.5", ["data.val_fraction = 1.5"]),
    ("model.head=argmax", ["model.head = 'argmax'"]),
    ("model.thresholds=1.5", ["model.thresholds", "between 0 and 1"]),
    ("data.mask=color", ["data.colors"]),
    ("data.classes=[a, b, c]", ["data.classes", "binary masks give one foreground class"]),
    ("data.mean=[0.5]", ["data.mean", "1 values for 3 input channels"]),
    ("data.bands=[0, 1, 2]", ["data.bands", "numbered from 1"]),
    ("data.foreground_value=many", ["data.foreground_value = 'many'"]),
    ("data.normalize=minmax", ["data.normalize = 'minmax'"]),
])
def test_load_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(SIGMOID, [override])
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_bands_set_the_channel_count_and_must_agree_with_it():
    assert load_config(SIGMOID, ["data.bands=[4, 1]"]).data.channels == 2
    with pytest.raises(ConfigError) as err:
        load_config(SIGMOID, ["data.bands=[1, 2]", "data.channels=3"])
    assert "selects 2 bands" in str(err.value) and "data.channels: 2" in str(err.value)


def test_missing_required_keys_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  root: x\nmodel:\n  arch: Unet\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert "data.classes: required key is missing" in str(err.value)
    assert "model.head: required key is missing" in str(err.value)


# -- through the CLI: exit 2, message naming the key, nothing written ---------------------------------


@pytest.mark.parametrize("override,words", [
    ("train.epoch=3", ["train.epoch", "unknown key"]),
    ("train.epochs=abc", ["train.epochs", "'abc'"]),
    ("train.crop=100", ["train.crop", "100", "multiple of 32"]),
    ("model.thresholds=0", ["model.thresholds", "between 0 and 1"]),
    ("train.loss=ce", ["train.loss", "'ce'", "softmax"]),
    ("data.mask=binary2", ["data.mask", "'binary2'"]),
    ("train.epochs", ["--set 'train.epochs'", "key=value"]),
])
def test_train_with_a_bad_key_exits_2_and_writes_nothing(cli, tmp_path, tiny_nuclei, override, words):
    out = tmp_path / "run"
    r = cli(*train_args(SIGMOID, tiny_nuclei, out, "--set", override, epochs=None))
    assert_refused(r, out, *words)
    assert r.out == ""


def test_missing_config_file_and_bad_yaml_exit_2(cli, tmp_path):
    out = tmp_path / "run"
    assert_refused(cli("train", tmp_path / "nope.yaml", "--out", out, *TINY), out, "nope.yaml", "not found")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    assert_refused(cli("train", tmp_path / "bad.yaml", "--out", out, *TINY), out, "bad.yaml", "not valid YAML")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_refused(cli("train", tmp_path / "list.yaml", "--out", out, *TINY), out, "list.yaml", "mapping")


def test_missing_data_root_exits_2_naming_it(cli, tmp_path):
    out = tmp_path / "run"
    r = cli(*train_args(SIGMOID, tmp_path / "no-such-data", out))
    assert_refused(r, out, str(tmp_path / "no-such-data"), "data folder not found")


def test_cli_options_override_the_config(cli, tmp_path, tiny_nuclei):
    """--epochs and --device are shorthands for --set; a bad --device value is named."""
    out = tmp_path / "run"
    r = cli("train", SIGMOID, "--out", out, "--set", f"data.root={tiny_nuclei}", "--device", "gpu")
    assert_refused(r, out, "train.device = 'gpu'")
    r = cli("train", SIGMOID, "--out", out, "--set", f"data.root={tiny_nuclei}", "--epochs", "0")
    assert_refused(r, out, "train.epochs = 0")
