"""YAML -> validated config objects. Every error names the key, the value and the fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segkit.data.normalize import schemes_for
from segkit.data.volumes import VolumeDataset, is_volume_root
from segkit.errors import ConfigError
from segkit.heads import Head, build_head


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Training augmentation (albumentations); probabilities per transform."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate90: float = Field(0.5, ge=0, le=1)
    color: float = Field(0.3, ge=0, le=1, description="light brightness/contrast jitter")
    scale: tuple[float, float] | None = Field(None, description="random rescale range before cropping")


class DataConfig(_Strict):
    root: Path
    classes: list[str] | None = Field(
        None, min_length=1, description="required for images; for volumes they come from dataset.json (or label "
                                        "values = class indices), and a list here selects or renames them")
    mask: Literal["binary", "index", "color", "multilabel", "volume"] = Field(
        "binary", description="volume: set by segkit for a volume dataset (labels as dataset.json declares)")
    foreground_value: int | Literal["nonzero"] | None = Field(
        None, description="binary masks: the foreground value (0 for ISBI membranes), or 'nonzero' (instance IDs)")
    binary_threshold: float | None = Field(
        None, description="binary masks: value >= threshold is foreground (anti-aliased or resampled masks)")
    ignore_index: int | None = Field(None, ge=0, le=65535)
    colors: list[tuple[int, int, int]] | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int | None = Field(
        None, ge=0, description="seed of the validation share drawn when there is no val/ split (default: "
                                "train.seed); segkit compare fixes it, so every run validates on the same data")
    channels: int | None = Field(None, ge=1, description="network input channels; default len(bands), else 3")
    bands: list[int] | list[str] | None = Field(
        None, min_length=1, description="1-based bands to read, e.g. [1, 2, 3, 8]; or, for images stored as a "
                                        "folder of one file per band, the band files' names, e.g. [B02, B03, B04, B08]")
    normalize: Literal["auto", "imagenet", "dataset", "per_image", "none", "explicit"] | list[
        Literal["zscore", "ct", "none"]] = Field(
        "auto", description="images: one mode; volumes: auto (CT channels ct, others zscore) or one per channel")
    mean: tuple[float, ...] | None = Field(None, description="explicit per-channel mean, in pixel units")
    std: tuple[float, ...] | None = Field(None, description="explicit per-channel std, in pixel units")
    nodata: float | None = Field(None, description="image value marking no-data (else the file's own nodata)")
    cache: bool | Literal["auto"] = "auto"
    cache_mb: int | None = Field(None, ge=0, description="memory for cached images; default a quarter of RAM")
    slice_axis: Literal["auto", 0, 1, 2] = Field(
        "auto", description="volumes: the axis (of the closest RAS axes) to cut 2-D slices along; auto: the "
                            "coarsest median spacing, axial on a tie")
    target_spacing: Literal["median"] | tuple[float, float] | None = Field(
        None, description="volumes: in-plane spacing (mm, the slice's height then width axis) the slices are "
                          "resampled to for training, prediction resampling each case to it and its outputs back "
                          "to the case's grid; median: the training cases' median (nnU-Net's 2-D rule); null: "
                          "every case on its own grid")
    overlap: Literal["error", "ignore"] = Field(
        "error", description="pixels with several labels: refused by softmax, or 'ignore' them (excluded from "
                             "loss and scores) to train softmax on the exclusive part")

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, value: object) -> object:
        if isinstance(value, tuple) and min(value) <= 0:
            raise ValueError(f"{list(value)}: spacings are millimetres, more than 0. Fix: e.g. [0.8, 0.8], or median")
        return value

    @model_validator(mode="after")
    def _default_channels(self) -> DataConfig:
        if self.channels is None:
            object.__setattr__(self, "channels", len(self.bands) if self.bands else 3)
        return self


class ModelConfig(_Strict):
    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    encoder_weights_strict: bool = Field(
        True, description="false: load the encoder tensors of the file that fit, log the rest (else exit 2)")
    head: Literal["softmax", "sigmoid"]
    thresholds: float | list[float] | None = None


class TrainConfig(_Strict):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    crop: int = Field(256, ge=32)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    loss: str | None = None
    class_weights: list[float] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | Literal["auto"] = "auto"
    seed: int = 0
    workers: int | Literal["auto"] = Field(
        "auto", description="loader processes; auto: 0 on CPU (the model needs the cores), cores - 1 (max 8) on CUDA")
    log_every: int = Field(50, ge=1, description="steps between loss read-backs (the only host-device sync)")
    val_every: int | Literal["auto"] = Field(
        "auto", description="epochs between validations; auto: every epoch unless validating costs more than "
                            "a tenth of an epoch's training, then spaced to stay under it (the last epoch always "
                            "validates)")
    save_every: int = Field(1, ge=1, description="epochs between last/ checkpoints (the last epoch always saves)")
    compile: bool = Field(False, description="torch.compile the model (falls back to eager with a message)")
    sync_batchnorm: bool = Field(False, description="DDP: SyncBatchNorm, for small per-GPU batches")
    tensorboard: bool = Field(False, description="also log to RUN/tensorboard (extra: segkit[tensorboard])")
    foreground_oversample: float | None = Field(
        None, ge=0, le=1, description="share of crops centred on a foreground pixel; default 1/3 for volumes (as "
                                      "nnU-Net), 0 for images")
    early_stop_patience: int | None = Field(None, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)
    time_limit: float | None = Field(
        None, gt=0, description="seconds from the start of training: it stops at the step after which only its "
                                "last validation (timed on a few samples at the start, then the longest so "
                                "far) and saves (the rest of a checkpoint write in flight and one more, each as long "
                                "as the longest so far) still fit, then "
                                "validates and writes best/ and last/; the learning rate warms up over at most a "
                                "tenth of that time and its cosine decays by that step's time or by "
                                "train.epochs' steps, whichever comes first")
    augment: AugmentConfig = AugmentConfig()

    @field_validator("val_every")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v

    @field_validator("crop")
    @classmethod
    def _crop_stride(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the U-Net's stride); e.g. {max(32, round(v / 32) * 32)}")
        return v


class PlanRecord(_Strict):
    """What the planner (`segkit plan`) decided and why; training copies it into model.json, naming the keys
    changed since (`edited`)."""

    device: str
    budget_s: float | None = None
    predicted_s: float | None = None
    reasons: dict[str, str]
    planned: dict[str, Any]


class Config(_Strict):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    plan: PlanRecord | None = None

    def plan_meta(self) -> dict | None:
        """model.json's `plan`: the planner's reasons, and which planned keys (`train.batch_size`) this config
        changed, compared as the YAML holds them."""
        if self.plan is None:
            return None
        now = self.model_dump(mode="json")
        edited = sorted(k for k, v in self.plan.planned.items()
                        if now.get(k.partition(".")[0], {}).get(k.partition(".")[2]) != v)
        return {**self.plan.model_dump(mode="json"), "edited": edited}

    def split_seed(self) -> int:
        """The seed of the validation share: data.split_seed, else train.seed."""
        return self.data.split_seed if self.data.split_seed is not None else self.train.seed

    def head(self) -> Head:
        """The head this config asks for; raises ConfigError for impossible combinations."""
        return build_head(self.model.head, self.data.classes, self.data.colors, self.model.thresholds)

    def check(self) -> None:
        """Cross-key rules that single fields cannot express."""
        head = self.head()
        head.loss(self.train.loss, self.train.class_weights)
        d = self.data
        if d.mask == "volume":  # resolve_volumes checked it against the dataset's files
            return
        volume_keys = {"normalize": not isinstance(d.normalize, str), "slice_axis": d.slice_axis != "auto",
                       "target_spacing": d.target_spacing is not None}
        key = next((k for k, used in volume_keys.items() if used), None)
        if key is not None:
            raise ConfigError(f"data.{key}: {getattr(d, key)!r} is for volume datasets, and {d.root} holds images. "
                              f"Fix: remove data.{key} (images: data.normalize is one mode, e.g. dataset).")
        if d.mask == "binary" and len(d.classes) > 2:
            raise ConfigError(
                f"data.classes: binary masks give one foreground class, but {len(d.classes)} classes are named. "
                "Fix: `[fg]` for sigmoid, `[background, fg]` for softmax, or `data.mask: index`."
            )
        if d.mask == "color" and not d.colors:
            raise ConfigError("data.colors: colour masks need one [R, G, B] per class. Fix: set data.colors.")
        for key in ("foreground_value", "binary_threshold"):
            if getattr(d, key) is not None and d.mask not in ("binary", "multilabel"):
                raise ConfigError(f"data.{key}: only binary and multilabel masks have one; data.mask is "
                                  f"'{d.mask}'. Fix: remove data.{key}.")
        if d.bands is not None:
            if any(isinstance(b, int) and b < 1 for b in d.bands):
                raise ConfigError(f"data.bands: {d.bands}: bands are numbered from 1 (as in GDAL/QGIS). "
                                  "Fix: e.g. [1, 2, 3].")
            if d.channels != len(d.bands):
                raise ConfigError(f"data.channels: {d.channels}, but data.bands selects {len(d.bands)} bands "
                                  f"{d.bands}. Fix: data.channels: {len(d.bands)} (or leave it out).")
        for key in ("mean", "std"):
            value = getattr(d, key)
            if value is not None and len(value) != d.channels:
                raise ConfigError(f"data.{key}: {len(value)} values for {d.channels} input channels "
                                  "(data.channels). Fix: one value per channel, in pixel units.")


_UNION_TAG = re.compile(r"^(int|float|bool|str|none|literal\[.*\]|list\[.*\]|tuple\[.*\])$")


def _format(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per key (`prefix` + its path); the alternatives of a union (int | 'nonzero') are joined on that
    key's line."""
    lines = [f"{source}: invalid config"]
    values: dict[str, tuple[object, list[str]]] = {}
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not _UNION_TAG.match(str(p)))
        key = prefix + path if path else "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key. Fix: remove it or check its spelling (see configs/*.yaml).")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing. Fix: add it.")
        else:
            values.setdefault(key, (e.get("input"), []))[1].append(e["msg"])
    for key, (value, msgs) in values.items():
        lines.append(f"  {key} = {value!r}: {', or '.join(msgs)}. Fix: correct the value.")
    return "\n".join(lines)


def set_dotted(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=3.")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section. Fix: check the key path.")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


MISSING_CLASSES = ("required key is missing (a dataset of images; a volume dataset's dataset.json names them). "
                   "Fix: add it, e.g. [background, nucleus].")


def _refuse_image_keys(d: DataConfig) -> None:
    """The keys that say how to read images, set for a volume dataset: an error naming the first."""
    for key in ("bands", "colors", "foreground_value", "binary_threshold", "mean", "std", "nodata"):
        if getattr(d, key) is not None:
            raise ConfigError(f"data.{key}: not used for volume datasets ({d.root}). Fix: remove it.")
    if "mask" in d.model_fields_set and d.mask != "volume":
        raise ConfigError(f"data.mask: '{d.mask}', but {d.root} is a volume dataset whose labels dataset.json "
                          "(or, without one, label value = class index) defines. Fix: remove data.mask.")


def resolve_volumes(d: DataConfig) -> VolumeDataset | None:
    """A volume dataset's classes, channels and label encoding come from its files (dataset.json), so
    `data.root` alone is a valid data section; what the config does say must agree with them. The
    dataset, or None for images."""
    if not is_volume_root(d.root):
        if d.classes is None:
            raise ConfigError(f"data.classes: {MISSING_CLASSES}")
        return None
    _refuse_image_keys(d)
    ds = VolumeDataset.from_root(d.root, d.classes, d.ignore_index)
    channels = len(ds.channel_names)
    if "channels" in d.model_fields_set and d.channels != channels:
        raise ConfigError(f"data.channels: {d.channels}, but the cases of {d.root} have {channels} channel(s) "
                          f"{ds.channel_names}. Fix: remove data.channels.")
    schemes_for(d.normalize, ds.channel_names)
    d.classes, d.mask, d.channels = list(ds.classes), "volume", channels
    return ds


def data_overrides(overrides: list[str] | tuple[str, ...], command: str | None = None) -> dict[str, Any]:
    """The `data.KEY=value` assignments among `overrides`, as {KEY: value}: what a user declares about the
    data before it is planned (class names, the ignore value, bands). With `command` (one that only reads the
    data: inspect, plan), any other override is an error."""
    raw: dict[str, Any] = {}
    for assignment in overrides:
        if assignment.partition("=")[0].strip().startswith("data."):
            set_dotted(raw, assignment)
        elif command:
            raise ConfigError(f"--set {assignment}: `segkit {command}` takes the data keys that say how to read the "
                              "data. Fix: edit the written plan.yaml, or pass it to `segkit train ... --set`.")
    return raw.get("data", {})


def check_data_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate data keys given on their own (`data` holds `root` and them): each key's type and range, and
    for a volume dataset whether it applies to volumes at all. Returns them validated (root left out); what
    needs the whole config, such as classes against the head, is checked with it."""
    try:
        d = DataConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source, prefix="data.")) from None
    if is_volume_root(d.root):
        _refuse_image_keys(d)
    return d.model_dump(include=set(data) - {"root"})


def parse_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping (relative paths are relative to the working directory)."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        message = _format(err, source)
        data = raw.get("data")
        if isinstance(data, dict) and "classes" not in data and "data.root" not in message:
            if not is_volume_root(Path(data.get("root", ""))):
                message += f"\n  data.classes: {MISSING_CLASSES}"
        raise ConfigError(message) from None
    volumes = resolve_volumes(cfg.data)
    cfg.check()
    if volumes is not None:
        volumes.check_head(cfg.head())
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate everything."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, and a config file (YAML) is needed here. Fix: `segkit plan {path}` "
                          "writes the config planned from this data (`segkit train {path}` plans and trains).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found. Fix: check the path (ready ones are in configs/).") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}). Fix: correct the syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with data/model/train sections.")
    for assignment in overrides:
        set_dotted(raw, assignment)
    return parse_config(raw, str(path))


def dump_config(cfg: Config) -> str:
    """YAML text of a config, as saved in a run folder."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
