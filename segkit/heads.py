"""The two output heads: the one place in segkit that knows softmax from sigmoid.

Everything downstream asks the head: how many channels, how to turn a mask into a
target, which losses fit, how to activate and decode logits, how to count
true/false positives, and which files a predicted mask becomes.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segkit.device import channel_constant
from segkit.errors import ConfigError, SegkitError


@dataclass
class MaskLayer:
    """One output file's content: path (relative, .png suffix; writers set their own), the array,
    a palette for index masks, whether it is binary (bool), and the (value, class) pairs it holds."""

    path: Path
    array: np.ndarray
    palette: list[int] | None
    binary: bool
    classes: list[tuple[int, str]]

IGNORE = -1
"""Target value of an ignored pixel, for both heads."""

_PALETTE = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
]


def default_colors(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """Distinct display colours; a class named 'background' is black."""
    bright = iter(_PALETTE[1:] * (len(classes) // 15 + 1))
    return [(0, 0, 0) if name.lower() == "background" else next(bright) for name in classes]


_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot be a class, or None. Class names become folder names (`OUT/<class>/...`), so each
    must be one safe path component on every system: letters, digits, `-`, `_`, `.` and inner spaces;
    not `.`/`..`, no separator, no control or Windows-reserved character, no Windows device name."""
    if not isinstance(name, str):
        return f"is not text ({type(name).__name__})"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a folder's own or parent folder name"
    bad = sorted({c for c in name if not (c.isalnum() or c in "-_. ")})
    if bad:
        return ("contains " + ", ".join(repr(c) for c in bad)
                + " (a name may hold letters, digits, '-', '_', '.' and spaces)")
    if name != name.strip() or name.endswith("."):
        return "starts or ends with a space, or ends with '.' (Windows drops those from folder names)"
    if name.split(".")[0].lower() in _WINDOWS_DEVICES:
        return "is a reserved device name on Windows"
    if len(name.encode()) > 200:
        return "is longer than 200 bytes"
    return None


def check_class_names(classes: object) -> list[str]:
    """`classes` as a list of safe, distinct names (see `class_name_problem`), else a ConfigError
    naming the class. Every class list (config, checkpoint model.json, dataset.json) passes here."""
    where = "data.classes (or `classes` in a checkpoint's model.json, `labels` in a dataset.json)"
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ConfigError(f"{where}: {classes!r} is not a list of class names. Fix: e.g. [background, nucleus].")
    for name in classes:
        problem = class_name_problem(name)
        if problem:
            safe = re.sub(r"[^\w\-. ]+", "_", str(name)).strip(" ._") or "class1"
            safe = safe if class_name_problem(safe) is None else f"class_{safe[:50]}"
            raise ConfigError(f"{where}: the class name {name!r} {problem}; class names become output folder "
                              f"names. Fix: rename the class, e.g. to {safe!r}.")
    folded: dict[str, str] = {}
    for name in classes:
        if name.casefold() in folded and folded[name.casefold()] != name:
            raise ConfigError(f"{where}: the class names {folded[name.casefold()]!r} and {name!r} differ only in "
                              "case and would share one output folder on Windows and macOS. "
                              "Fix: rename one of them.")
        folded[name.casefold()] = name
    return list(classes)


class Head(ABC):
    """Interface shared by both heads. `classes` are the output channels' names in order."""

    name: ClassVar[str]
    exclusive: ClassVar[bool]
    """Whether each pixel has exactly one class (softmax), or classes may overlap (sigmoid)."""
    smp_mode: ClassVar[str]
    default_loss: ClassVar[str]
    base_loss: ClassVar[str]

    def __init__(
        self,
        classes: Sequence[str],
        colors: Sequence[Sequence[int]] | None = None,
        thresholds: float | Sequence[float] | None = None,
    ) -> None:
        classes = check_class_names(classes)
        if len(set(classes)) != len(classes):
            raise ConfigError(f"data.classes: {list(classes)} repeats a name. Fix: give every class a unique name.")
        self.classes = list(classes)
        if colors is not None and len(colors) != len(self.classes):
            raise ConfigError(
                f"data.colors: {len(colors)} colours for {len(self.classes)} classes {self.classes}. "
                "Fix: give one [R, G, B] per class, in class order."
            )
        self.colors = [tuple(int(v) for v in c) for c in colors] if colors else default_colors(self.classes)
        self._check_classes()
        self.thresholds = self._check_thresholds(thresholds)

    # -- configuration -------------------------------------------------------------------

    @abstractmethod
    def _check_classes(self) -> None:
        """Raise ConfigError when this head cannot learn these classes."""

    def _check_thresholds(self, thresholds: float | Sequence[float] | None) -> list[float] | None:
        if thresholds is not None:
            raise ConfigError(
                f"model.thresholds: the {self.name} head decodes by argmax and takes no thresholds. "
                "Fix: remove model.thresholds, or use model.head: sigmoid."
            )
        return None

    @property
    @abstractmethod
    def channels(self) -> int:
        """Number of output channels of the network."""

    def metadata(self) -> dict:
        """What a checkpoint needs to rebuild this head."""
        return {"head": self.name, "classes": self.classes, "colors": [list(c) for c in self.colors],
                "thresholds": self.thresholds}

    # -- targets -------------------------------------------------------------------------

    @abstractmethod
    def label_problem(self, labels: np.ndarray, valid: np.ndarray) -> str | None:
        """Why these labels (H, W, C multi-hot) cannot be this head's target, or None if they can."""

    @abstractmethod
    def targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """Training target from multi-hot labels (H, W, C) and the valid-pixel mask (H, W)."""

    @abstractmethod
    def compact_targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """The target in as few bytes as it takes (uint8 where it fits), for the loader to send;
        `expand_targets` on the device gives exactly `targets`."""

    @abstractmethod
    def expand_targets(self, compact: torch.Tensor) -> torch.Tensor:
        """`targets` from a (batch of) `compact_targets`, on the compact tensor's device."""

    # -- loss ----------------------------------------------------------------------------

    @classmethod
    def loss_names(cls) -> list[str]:
        """Loss names this head accepts."""
        return [cls.base_loss, "dice", f"{cls.base_loss}+dice", "focal", "focal+dice"]

    def loss(self, name: str | None = None, class_weights: Sequence[float] | None = None) -> nn.Module:
        """The training loss, always computed on logits."""
        name = name or self.default_loss
        if name not in self.loss_names():
            owners = [head.name for head in HEADS.values() if name in head.loss_names()]
            belongs = f" '{name}' is a loss for the {owners[0]} head." if owners else ""
            raise ConfigError(
                f"train.loss: '{name}' does not fit the {self.name} head.{belongs} "
                f"Fix: use one of {self.loss_names()}."
            )
        if class_weights is not None and len(class_weights) != self.channels:
            raise ConfigError(
                f"train.class_weights: {len(class_weights)} weights for {self.channels} output channels "
                f"{self.classes}. Fix: give one weight per class."
            )
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        terms: list[nn.Module] = []
        for part in name.split("+"):
            if part == "dice":
                terms.append(smp.losses.DiceLoss(self.smp_mode, from_logits=True, ignore_index=IGNORE,
                                                 class_weights=class_weights))
            elif part == "focal":
                terms.append(self._focal_loss(weights))
            else:
                terms.append(self._base_loss(weights))
        return SumLoss(terms)

    @abstractmethod
    def _base_loss(self, weights: torch.Tensor | None) -> nn.Module:
        """Cross-entropy for softmax, BCE-with-logits for sigmoid."""

    @abstractmethod
    def _focal_loss(self, weights: torch.Tensor | None) -> nn.Module:
        """The base loss with the focal factor (1 - p_t)^2, ignored pixels left out the same way."""

    # -- activation, decoding, counting --------------------------------------------------

    @abstractmethod
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities (N, C, H, W) from logits (N, C, H, W)."""

    @abstractmethod
    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Masks from logits: softmax -> (N, H, W) class indices; sigmoid -> (N, C, H, W) bool.

        Takes logits, never probabilities, and activates internally, so a threshold is
        always compared with a probability.
        """

    @abstractmethod
    def multihot(self, masks: torch.Tensor) -> torch.Tensor:
        """Decoded masks as (N, C, H, W) bool, the common form for overlays and counting."""

    @abstractmethod
    def target_multihot(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of targets as (N, C, H, W) bool labels and an (N, H, W) valid mask."""

    @abstractmethod
    def stats(self, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-class pixel counts (C, 4) = tp, fp, fn, tn over the batch, ignored pixels left out."""

    # -- files ---------------------------------------------------------------------------

    output_format: ClassVar[str]
    """The data.mask format of the files `mask_files` writes, so they can be read back."""

    @abstractmethod
    def file_names(self, rel: Path) -> list[Path]:
        """Mask files one image at `rel` (relative to the input folder) becomes, relative to the output."""

    mask_dtype: ClassVar[type]

    @abstractmethod
    def mask_shape(self, h: int, w: int) -> tuple[int, ...]:
        """Shape of a decoded mask of an h x w image."""

    @abstractmethod
    def mask_layers(self, mask: np.ndarray, rel: Path) -> list[MaskLayer]:
        """The files one decoded mask (or a band of its rows) becomes; a writer picks the format."""

    @abstractmethod
    def confusion(self, masks: torch.Tensor, target: torch.Tensor) -> np.ndarray | None:
        """Truth x prediction pixel counts for exclusive classes; None where classes overlap."""

    def sigmoid_equivalent(self) -> Head:
        """The 1-channel sigmoid head computing the same masks (2-class softmax only)."""
        raise SegkitError(f"a {self.name} head with classes {self.classes} has no exact 1-channel sigmoid "
                          "equivalent; only a 2-class softmax head does.")

    def palette(self) -> list[int]:
        """A PNG palette (768 ints) that shows class i in its colour."""
        flat = [v for c in self.colors for v in c]
        return flat + [0] * (768 - len(flat))


class SumLoss(nn.Module):
    """Sum of loss terms, each on logits."""

    def __init__(self, terms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(term(logits, target) for term in self.terms)


class MaskedBCEWithLogits(nn.Module):
    """BCE-with-logits averaged over the valid pixels only (smp's loss, normalised here)."""

    def __init__(self, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.bce = smp.losses.SoftBCEWithLogitsLoss(ignore_index=IGNORE, reduction="none")
        self.register_buffer("weights", None if weights is None else weights.view(1, -1, 1, 1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits, target)
        if self.weights is not None:
            loss = loss * self.weights
        valid = (target != IGNORE).sum()
        return loss.sum() / valid.clamp_min(1)


class MaskedSigmoidFocal(nn.Module):
    """Focal loss on sigmoid logits, averaged like `MaskedBCEWithLogits` over the valid (pixel, class)
    entries. Written here because smp's multilabel FocalLoss indexes a (N, H, W) target with a
    (N, C, H, W) ignore mask and fails."""

    def __init__(self, weights: torch.Tensor | None, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weights", None if weights is None else weights.view(1, -1, 1, 1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        bce = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0), reduction="none")
        loss = (1 - torch.exp(-bce)).pow(self.gamma) * bce
        if self.weights is not None:
            loss = loss * self.weights
        return loss.masked_fill(~valid, 0).sum() / valid.sum().clamp_min(1)


class MaskedSoftmaxFocal(nn.Module):
    """Focal loss on softmax logits, -(1 - p_t)^gamma log p_t with p = softmax; weighted and averaged
    over the valid pixels like `nn.CrossEntropyLoss` (which it equals at gamma = 0). smp's FocalLoss
    would score each channel as an independent sigmoid, the other head's model."""

    def __init__(self, weights: torch.Tensor | None, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        label = target.clamp_min(0)
        logpt = F.log_softmax(logits, dim=1).gather(1, label[:, None])[:, 0]
        loss = -(1 - logpt.exp()).pow(self.gamma) * logpt
        weight = valid.to(loss.dtype) if self.weights is None else self.weights[label] * valid
        return (loss * weight).masked_fill(~valid, 0).sum() / weight.sum().clamp_min(1e-12)


class SoftmaxHead(Head):
    """N >= 2 mutually exclusive classes: every valid pixel has exactly one."""

    name = "softmax"
    exclusive = True
    smp_mode = "multiclass"
    default_loss = "ce+dice"
    base_loss = "ce"

    def _check_classes(self) -> None:
        if len(self.classes) < 2:
            only = self.classes[0] if self.classes else "fg"
            raise ConfigError(
                f"model.head: softmax with one class ({self.classes}) outputs the constant 1; "
                "its cross-entropy is 0 and it learns nothing. "
                f"Fix: use `model.head: sigmoid` with `data.classes: [{only}]`, "
                f"or keep softmax with `data.classes: [background, {only}]`."
            )

    @property
    def channels(self) -> int:
        return len(self.classes)

    def label_problem(self, labels: np.ndarray, valid: np.ndarray) -> str | None:
        count = labels.sum(axis=2, dtype=np.int32)
        both = int(((count > 1) & valid).sum())
        if both:
            return (
                f"{both} pixels carry more than one label, which softmax cannot represent. "
                "Fix: use `model.head: sigmoid` for overlapping masks."
            )
        none = int(((count == 0) & valid).sum())
        if none:
            return (
                f"{none} pixels have no class, but softmax needs exactly one per pixel. "
                "Fix: add a class for them (e.g. `background` first in data.classes), "
                "mark them ignored, or use `model.head: sigmoid`."
            )
        return None

    def targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        return self.expand_targets(self.compact_targets(labels, valid))

    def compact_targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        small = self.channels < 255
        dtype = np.uint8 if small else np.int16
        index = np.zeros(labels.shape[:2], dtype)
        for c in range(1, labels.shape[2]):  # valid pixels carry exactly one label (label_problem)
            index += labels[:, :, c].astype(dtype) * dtype(c)
        index[~valid] = 255 if small else IGNORE
        return torch.from_numpy(index)

    def expand_targets(self, compact: torch.Tensor) -> torch.Tensor:
        out = compact.long()
        return out.masked_fill_(compact == 255, IGNORE) if compact.dtype == torch.uint8 else out

    def _base_loss(self, weights: torch.Tensor | None) -> nn.Module:
        return nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE)

    def _focal_loss(self, weights: torch.Tensor | None) -> nn.Module:
        return MaskedSoftmaxFocal(weights)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    def multihot(self, masks: torch.Tensor) -> torch.Tensor:
        return F.one_hot(masks.long(), self.channels).permute(0, 3, 1, 2).bool()

    def target_multihot(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = target != IGNORE
        return self.multihot(target.clamp_min(0)) & valid.unsqueeze(1), valid

    def stats(self, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        conf = self._confusion(masks, target)
        tp = conf.diagonal()
        fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
        return torch.stack([tp, fp, fn, conf.sum() - tp - fp - fn], dim=-1)

    def _confusion(self, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(C, C) int64 truth x prediction counts over valid pixels, on the tensors' device (exact)."""
        valid = target != IGNORE
        pairs = target[valid].long() * self.channels + masks.to(target.device)[valid].long()
        return torch.bincount(pairs, minlength=self.channels ** 2).view(self.channels, -1)

    output_format = "index"

    def sigmoid_equivalent(self) -> Head:
        if self.channels != 2:
            return super().sigmoid_equivalent()
        return SigmoidHead(self.classes[1:], self.colors[1:], 0.5)

    def file_names(self, rel: Path) -> list[Path]:
        return [rel.with_suffix(".png")]

    mask_dtype = np.uint8

    def mask_shape(self, h: int, w: int) -> tuple[int, ...]:
        return (h, w)

    def mask_layers(self, mask: np.ndarray, rel: Path) -> list[MaskLayer]:
        small = self.channels <= 256
        return [MaskLayer(rel.with_suffix(".png"), mask.astype(np.uint8 if small else np.uint16),
                          self.palette() if small else None, False, list(enumerate(self.classes)))]

    def confusion(self, masks: torch.Tensor, target: torch.Tensor) -> np.ndarray | None:
        return self._confusion(masks, target).cpu().numpy()


class SigmoidHead(Head):
    """N >= 1 independent classes: a pixel may have any number of labels, or none."""

    name = "sigmoid"
    exclusive = False
    smp_mode = "multilabel"
    default_loss = "bce+dice"
    base_loss = "bce"

    def _check_classes(self) -> None:
        if not self.classes:
            raise ConfigError("data.classes: empty. Fix: name at least one class, e.g. `data.classes: [fg]`.")

    def _check_thresholds(self, thresholds: float | Sequence[float] | None) -> list[float]:
        if thresholds is None:
            thresholds = 0.5
        values = [float(thresholds)] * len(self.classes) if isinstance(thresholds, (int, float)) else list(thresholds)
        if len(values) != len(self.classes):
            raise ConfigError(
                f"model.thresholds: {len(values)} values for {len(self.classes)} classes {self.classes}. "
                "Fix: give one probability per class, or a single number for all."
            )
        if not all(0.0 < v < 1.0 for v in values):
            raise ConfigError(
                f"model.thresholds: {values} must be probabilities strictly between 0 and 1 "
                "(thresholds apply to sigmoid outputs, not logits). Fix: e.g. 0.5."
            )
        return values

    @property
    def channels(self) -> int:
        return len(self.classes)

    def label_problem(self, labels: np.ndarray, valid: np.ndarray) -> str | None:
        return None

    def targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        return self.expand_targets(self.compact_targets(labels, valid))

    def compact_targets(self, labels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        target = np.where(valid[None], labels.transpose(2, 0, 1), np.uint8(255)).astype(np.uint8)
        return torch.from_numpy(target)

    def expand_targets(self, compact: torch.Tensor) -> torch.Tensor:
        return compact.float().masked_fill_(compact == 255, IGNORE)

    def _base_loss(self, weights: torch.Tensor | None) -> nn.Module:
        return MaskedBCEWithLogits(weights)

    def _focal_loss(self, weights: torch.Tensor | None) -> nn.Module:
        return MaskedSigmoidFocal(weights)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        thresholds = channel_constant(tuple(self.thresholds), logits.device)
        return self.activate(logits.float()) > thresholds  # strict: at a tie, as softmax's argmax, no label

    def multihot(self, masks: torch.Tensor) -> torch.Tensor:
        return masks.bool()

    def target_multihot(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = target[:, 0] != IGNORE
        return target == 1, valid

    def stats(self, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        truth, valid = self.target_multihot(target)
        keep = valid.unsqueeze(1)
        pred = masks.to(target.device).bool() & keep
        tp = (pred & truth).sum((0, 2, 3))
        fp = (pred & ~truth).sum((0, 2, 3))
        fn = (~pred & truth).sum((0, 2, 3))
        return torch.stack([tp, fp, fn, valid.sum() - tp - fp - fn], dim=-1)

    output_format = "multilabel"

    def file_names(self, rel: Path) -> list[Path]:
        return [Path(name) / rel.with_suffix(".png") for name in self.classes]

    mask_dtype = bool

    def mask_shape(self, h: int, w: int) -> tuple[int, ...]:
        return (self.channels, h, w)

    def mask_layers(self, mask: np.ndarray, rel: Path) -> list[MaskLayer]:
        return [MaskLayer(path, mask[c].astype(bool), None, True, [(1, self.classes[c])])
                for c, path in enumerate(self.file_names(rel))]

    def confusion(self, masks: torch.Tensor, target: torch.Tensor) -> np.ndarray | None:
        return None


HEADS: dict[str, type[Head]] = {"softmax": SoftmaxHead, "sigmoid": SigmoidHead}


def build_head(
    name: str,
    classes: Sequence[str],
    colors: Sequence[Sequence[int]] | None = None,
    thresholds: float | Sequence[float] | None = None,
) -> Head:
    """Head by name; the thin registry that config and checkpoints go through."""
    if name not in HEADS:
        raise ConfigError(f"model.head: '{name}' is not a head. Fix: use one of {sorted(HEADS)}.")
    return HEADS[name](classes, colors=colors, thresholds=thresholds)


def head_from_metadata(meta: dict) -> Head:
    """Rebuild the head a checkpoint was trained with."""
    return build_head(meta["head"], meta["classes"], meta.get("colors"), meta.get("thresholds"))


def parse_thresholds(text: str, classes: Sequence[str]) -> float | list[float]:
    """`0.4` for every class, or `class=value,...` for some (the others keep 0.5)."""
    text = text.strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--threshold {text!r}: not a number. Fix: e.g. 0.4 or nucleus=0.4.") from None
    values = dict.fromkeys(classes, 0.5)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in values:
            raise ConfigError(f"--threshold: '{name.strip()}' is not a class of this model ({list(classes)}).")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--threshold {part!r}: '{value}' is not a number.") from None
    return list(values.values())
