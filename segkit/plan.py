"""The planner: from a dataset folder to a complete config, every choice made from measured data by a stated
rule and written with its reason (`segkit plan`, and `segkit train ROOT`).

It reads the data once (`inspect_data`: the fingerprint, for images and volumes alike), then decides:
- the mask encoding and classes, the head and the loss, channels and normalisation (from the fingerprint);
- the crop (the median image or slice, capped per device), the batch and the encoder (from `StepProbe`: the
  memory and time of real training steps on this device; nnU-Net's bounds: at least 2, at most 5 % of the
  training data counted in crops);
- foreground oversampling (from measured class presence and object sizes);
- with a time budget, the steps, epochs and validations (from `run_cost`: startup, real steps from the
  loader, validation and a checkpoint, timed), fitted so the whole command ends on time; without one, a cap
  on steps and early stopping, both stated.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segkit.config import AugmentConfig, Config, data_overrides, parse_config
from segkit.data.dataset import foreground_classes
from segkit.data.inspect import READING, Report, VolumeReport, inspect_data
from segkit.device import resolve_device
from segkit.errors import ConfigError, SegkitError
from segkit.probe import StepProbe, available_memory, run_cost

RARE = 0.25
"""A foreground class below this share of the valid pixels (imbalance 1:3 or worse) adds Dice to the loss: it
counts overlap, not pixels, so the rare class weighs as much as the background."""
SMALL = 0.01
"""A class whose typical object (`object_sizes`) covers less of a crop than this, or that is absent from half of the samples,
gets foreground oversampling (nnU-Net's third of the crops)."""
OVERSAMPLE = 1 / 3
CROP_CAP = {"cuda": 512, "cpu": 256}
"""Largest crop per device: a CPU step at 512 costs four times one at 256."""
BATCH_SHARE = 0.05
"""nnU-Net: a batch holds at most 5 % of the training data (its pixels, counted in crops)..."""
MIN_BATCH = 2
"""... and at least 2 (batch norm needs more than one sample)."""
BN_BATCH = 8
"""The batch the planner looks for: smp's encoders use batch norm, whose statistics are noisy below 8 samples
(nnU-Net gets away with 2 because it uses instance norm). The crop shrinks before the batch does."""
MIN_CROP = 128
"""The crop is halved for a batch of BN_BATCH down to this..."""
CONTEXT = 4
"""... and only while a crop still covers this many typical objects of the largest-object class: context the
network needs. Measured on 2 CPU cores at a 3 min budget, 3 seeds: nuclei (typical object 1 915 px) gain from
halving (resnet18 at 128, batch 8: val Dice 0.92, against 0.42 for resnet34 at 256, batch 2); ISBI's membrane
network (57 684 px) loses from it (0.745 at 128 against 0.79 at 256)."""
BUDGET_RESERVE = 60.0
"""Seconds of a budget set aside, when sizing batches, for reading the data, validation and the last writes."""
MAX_BATCH = 64
MEMORY_SHARE = {"cuda": 0.8, "cpu": 0.5}
"""Of the free memory a batch may take: headroom for the allocator (GPU), for the cache and workers (host)."""
MIN_STEPS = 100
"""With a budget, batches stay small enough for this many optimiser steps (the demo's 96 steps at batch 8 reach
0.89 test Dice on nuclei, 32 reach 0.66), and where that bound is the one that binds, no larger than BN_BATCH:
past batch norm's needs the time buys steps. At 3 min on 2 CPU cores (held-out Dice, seeds 0-2) the floor of
250 held CamVid to batch 2 (0.272 / 0.240 / 0.258) and ISBI to batch 2 (0.788 / 0.792 / 0.762), 100 gave batch
5 (0.296 / 0.296 / 0.275) and 4 (0.795 / 0.793 / 0.782); at 10 min, 100 without the stop at 8 gave CamVid
batch 19 for 74 steps (0.332), with it batch 8 for 222 steps (0.420; the floor of 250: 0.419-0.448)."""
VAL_SHARE = 0.10
"""Validation and checkpoints take at most this share of the training time..."""
MAX_VALIDATIONS = 20
"""... and happen at most this often."""
OPEN_STEPS, OPEN_EPOCHS, PATIENCE = 250, 200, 10
"""Without a budget: epochs of 250 steps (nnU-Net's), at most 200 of them, stopped after 10 validations
without a better mean Dice."""
DIRECTED = 0.25
"""Along an axis whose halves hold the classes this unevenly (`_direction`), the pictures have a direction (sky
above road): no flips along it, and no 90-degree turns. Evenly spread classes (cells, tissue) measure near 0."""
OVERPLAN = 0.25
"""Epochs planned beyond the validations that fit, as a share of them: the probe's six steps can be off the run's
steady pace (2 CPU cores: ISBI 0.598 s measured, 0.54 s a step in the run; nuclei 0.699 s measured, 0.59 s in
the run, which then ended at -10.6 % of its budget). The time limit ends the run at the step where only its last
validation and save fit, and the learning rate's cosine follows the clock to that step (`train.Schedule`), so a
run faster than measured fills its budget and a slower one still anneals."""
SECTIONS = ("data", "model", "train")
END_SECONDS = 5.0
"""A margin beside the measured costs (the last validation and save are among those): the run's last step, which
may end past its limit, the command's start and its summary. The steps this keeps out of the plan only shape it:
the time limit ends the run."""


@dataclass
class Choice:
    key: str  # dotted config key
    value: Any
    reason: str


@dataclass
class Plan:
    """The choices (a complete config, key by key, with reasons), the fingerprint they came from, and with a
    budget the predicted wall time of the whole command."""

    root: Path
    device: str
    choices: list[Choice]
    fingerprint: dict
    budget_s: float | None = None
    predicted_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return next(c.value for c in self.choices if c.key == key)

    def raw(self) -> dict:
        """The config as a mapping, the plan's record under `plan`."""
        out: dict = {}
        for c in self.choices:
            section, _, key = c.key.partition(".")
            out.setdefault(section, {})[key] = c.value
        out["plan"] = {"device": self.device, "budget_s": self.budget_s, "predicted_s": self.predicted_s,
                       "reasons": {c.key: c.reason for c in self.choices},
                       "planned": {c.key: c.value for c in self.choices}}
        return out

    def config(self) -> Config:
        return parse_config(self.raw(), f"the plan of {self.root}")

    def yaml(self) -> str:
        """plan.yaml: a segkit config whose every key has its reason above it, then the record training keeps."""
        lines = [f"# segkit plan of {self.root} on {self.device}"
                 + (f", budget {self.budget_s:.0f} s, predicted {self.predicted_s or 0:.0f} s" if self.budget_s else ""),
                 "# Edit any value and train it with `segkit train plan.yaml`; model.json names the keys you changed."]
        lines += [f"# {note}" for note in self.notes]
        section = None
        for c in sorted(self.choices, key=lambda c: SECTIONS.index(c.key.partition(".")[0])):
            top, _, key = c.key.partition(".")
            if top != section:
                lines.append(f"{top}:")
                section = top
            lines += [f"  # {part}" for part in _wrap(c.reason, 110)]
            lines.append(f"  {key}: {_flow(c.value)}")
        lines.append(yaml.safe_dump({"plan": self.raw()["plan"]}, sort_keys=False, width=1 << 16).rstrip())
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        """The choices and their reasons as a short table for the terminal."""
        width = max(len(c.key) for c in self.choices)
        rows = [f"{c.key:<{width}}  {_flow(c.value):<14}  {c.reason}" for c in self.choices]
        head = f"plan of {self.root} on {self.device}"
        if self.budget_s:
            head += f": budget {_duration(self.budget_s)}, predicted finish after {_duration(self.predicted_s or 0)}"
        return "\n".join([head, *self.notes, *rows])

    def files(self) -> dict[str, bytes]:
        """plan.yaml and fingerprint.json, as a run folder keeps them."""
        return {"plan.yaml": self.yaml().encode(),
                "fingerprint.json": json.dumps(self.fingerprint, indent=2, default=_json).encode()}


def _json(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return lines + ([line] if line else [])


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def parse_budget(text: str) -> float:
    """'30m', '1h', '1h30m', '90s' or plain seconds -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise ConfigError(f"--budget {text!r}: not a duration. Fix: e.g. 30m, 1h, 1h30m or 600 (seconds).")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise ConfigError(f"--budget {text!r}: must be more than 0. Fix: e.g. 10m.")
    return seconds


def make_plan(root: str | Path, budget_s: float | None = None, device: str = "auto", progress: bool = False,
              measure: bool = True, started: float | None = None, report: Report | VolumeReport | None = None,
              declared: dict[str, Any] | None = None) -> Plan:
    """The plan for the dataset at `root`. `measure`: time and size training on `device` (batch, encoder and
    with `budget_s` the schedule); without, those keep segkit's defaults and the plan says so (what `segkit
    inspect` shows). `started`: `time.perf_counter()` when the user's command began (the budget counts from it).
    `report`: the dataset's inspection, if already made (it carries what was declared). `declared`: data keys
    the user states (`--set data.ignore_index=11`, class names), for the inspection made here: the data is read
    as they say, and the plan is made from that reading."""
    started = time.perf_counter() if started is None else started
    root = Path(root)
    if report is not None and declared:
        raise ValueError("make_plan: declare the keys to inspect_data, whose report carries them")
    report = report or inspect_data(root, progress=progress, declared=declared)
    declared = report.declared
    report.refuse_untrainable()
    dev = resolve_device(device)
    kind = dev.type if dev.type in CROP_CAP else "cuda"
    choices = _data_choices(report, declared) + _model_choices(report)
    largest, largest_why = _crop(report, kind)
    choices.append(Choice("train.device", dev.type, f"{dev} ({'a CUDA GPU' if dev.type == 'cuda' else 'no GPU'} "
                                                     "found)" if device == "auto" else f"{dev}, as asked"))
    choices.append(Choice("train.amp", dev.type == "cuda",
                          "mixed precision (bf16, else fp16) on the GPU: faster and half the activation memory"
                          if dev.type == "cuda" else "off on CPU: segkit trains float32 there (bf16 autocast pays only on CPUs "
                                                    "with bf16 units)"))
    choices.append(_augment(report))
    plan = Plan(root, str(dev), choices, report.to_dict(), budget_s)
    if not measure:
        plan.choices.append(Choice("train.crop", largest, largest_why))
        plan.choices += _oversampling(report, largest)
        plan.notes.append("batch, encoder and schedule: segkit's defaults here; `segkit plan` measures them on the "
                          "device (and may halve the crop)")
        return plan
    crop = _size(plan, report, dev, largest, largest_why)
    plan.choices += _oversampling(report, crop)
    _schedule(plan, dev, started)
    return plan


def declared_reading(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The `--set data.KEY=value` overrides that say how to read the data (`READING`): a plan is made from the
    data read as they say. Every override is still applied to the plan afterwards."""
    return {k: v for k, v in data_overrides(overrides).items() if k in READING}


def _data_choices(report: Report | VolumeReport, declared: dict[str, Any]) -> list[Choice]:
    data = report.config()["data"]
    data |= {k: v for k, v in declared.items() if k not in data}  # a volume report writes no ignore value
    out = [Choice("data.root", data.pop("root"), "the dataset folder")]
    encoding = report.encoding_reason()
    for key, value in data.items():
        out.append(Choice(f"data.{key}", value, f"as declared (--set data.{key})" if key in declared else encoding))
    return out + [Choice(k, v, why) for k, v, why in report.input_choices()]


def _foreground(names: list[str]) -> list[str]:
    """The class names that are not named background (`foreground_classes`, by name)."""
    return [names[i] for i in foreground_classes(names)]


def _model_choices(report: Report | VolumeReport) -> list[Choice]:
    head, why = report.advice()
    shares = report.class_shares()
    names = list(shares)
    fg = _foreground(names) or names
    rarest = min(fg, key=lambda c: shares[c])
    base = "ce" if head == "softmax" else "bce"
    loss = f"{base}+dice" if shares[rarest] < RARE else base
    loss_why = (f"{rarest} covers {shares[rarest]:.2%} of the {report.unit} (under {RARE:.0%}): Dice added, which "
                "counts overlap rather than pixels, so the rare class weighs as much as the background"
                if loss != base else
                f"every foreground class covers at least {RARE:.0%} of the {report.unit} (rarest: {rarest}, "
                f"{shares[rarest]:.2%}): {base} alone")
    out = [Choice("model.head", head, why), Choice("train.loss", loss, loss_why),
           Choice("model.arch", "Unet", "segkit's U-Net (segmentation-models-pytorch)"),
           Choice("model.encoder_weights", None, "no model hub here: the encoder starts from random weights")]
    if head == "sigmoid":
        out.append(Choice("model.thresholds", 0.5, "sigmoid: a pixel is in a class where its probability is above "
                                                   "0.5 (the threshold stated, never guessed from the data)"))
    return out


def _crop(report: Report | VolumeReport, kind: str) -> tuple[int, str]:
    h, w = report.plane_size()
    side = max(h, w)
    crop = int(min(CROP_CAP[kind], max(64, math.ceil(side / 32) * 32)))
    what = "image" if report.unit == "pixels" else "slice"
    if side > CROP_CAP[kind]:
        return crop, (f"median {what} {h:g} x {w:g}: crops of {crop}, the cap on {kind} (a step costs the square of "
                      "the side); prediction still runs on whole images")
    return crop, f"median {what} {h:g} x {w:g}: one crop of {crop} (a multiple of 32, the U-Net's stride) holds it whole"


def _direction(first: np.ndarray, second: np.ndarray) -> float:
    """How unevenly the classes lie between two halves, 0 (each class split evenly) to 1 (each wholly in one):
    the mean over classes, weighted by their pixels, of |share in the first half - share in the second|."""
    total = (first + second).sum()
    return float(np.abs(first - second).sum() / total) if total else 0.0


def _augment(report: Report | VolumeReport) -> Choice:
    """Flips and 90-degree turns unless the class layout measures a direction (`DIRECTED`)."""
    h = report.halves()
    names = list(report.class_shares())
    vertical, horizontal = _direction(h["top"], h["bottom"]), _direction(h["left"], h["right"])
    top_share = h["top"] / np.maximum(h["top"] + h["bottom"], 1)
    order = np.argsort(top_share)
    telling = ", ".join(f"{names[i]} {top_share[i]:.0%}" for i in dict.fromkeys((order[-1], order[0]))
                        if (h["top"] + h["bottom"])[i])  # the classes most and least in the top half
    measured = (f"classes split top/bottom unevenly by {vertical:.2f}, left/right by {horizontal:.2f} (0 = evenly, "
                f"1 = each class in one half; in the top half: {telling})")
    flips = {"hflip": 0.0 if horizontal > DIRECTED else 0.5, "vflip": 0.0 if vertical > DIRECTED else 0.5}
    flips["rotate90"] = 0.5 if max(vertical, horizontal) <= DIRECTED else 0.0
    kept = [k for k, v in flips.items() if v]
    dropped = [k for k, v in flips.items() if not v]
    value = AugmentConfig(**flips).model_dump(mode="json")  # the whole section: model.json compares it whole
    jitter = f"; brightness/contrast jitter {value['color']} (segkit's default)"
    if not dropped:
        return Choice("train.augment", value, f"{measured}: no direction (at most {DIRECTED}), so flips both ways "
                                              f"and 90-degree turns, each half the time{jitter}")
    return Choice("train.augment", value, f"{measured}: above {DIRECTED} the pictures have a direction, which "
                                          f"{', '.join(dropped)} would break; kept: {', '.join(kept) or 'none'}{jitter}")


def _oversampling(report: Report | VolumeReport, crop: int) -> list[Choice]:
    sizes, present, items = report.object_sizes(), report.presence(), report.fingerprint_items()
    names = list(sizes)
    fg = _foreground(names)
    small = [(c, sizes[c]) for c in fg if sizes[c] < SMALL * crop * crop]  # nan (no object) compares False
    scarce = [(c, present[c]) for c in fg if present[c] < items[1] / 2]
    if not (small or scarce):
        return [Choice("train.foreground_oversample", 0.0,
                       f"every foreground class is in at least half of the {items[0]} and its typical object covers "
                       f"at least {SMALL:.0%} of a crop: random crops find them")]
    small = sorted(small, key=lambda ca: ca[1])
    why = [f"{c}'s typical object is {a:.0f} {report.unit} ({a / crop ** 2:.2%} of a {crop} crop)" for c, a in small[:3]]
    why += [f"{len(small) - 3} more classes under {SMALL:.0%}"] if len(small) > 3 else []
    why += [f"{c} is in {n} of {items[1]} {items[0]}" for c, n in scarce]
    return [Choice("train.foreground_oversample", round(OVERSAMPLE, 4),
                   "; ".join(why) + ": a third of the crops is centred on a foreground pixel (nnU-Net's rule)")]


def _context(report: Report | VolumeReport) -> tuple[str, float]:
    """The foreground class with the largest typical object, and the crop area that covers CONTEXT of them
    (("", 0) when no class has an object)."""
    sizes = report.object_sizes()
    names = list(sizes)
    known = [(c, sizes[c]) for c in _foreground(names) if not math.isnan(sizes[c])]
    if not known:
        return "", 0.0
    name, area = max(known, key=lambda ca: ca[1])
    return name, CONTEXT * area


def _size(plan: Plan, report: Report | VolumeReport, dev, largest: int, largest_why: str) -> int:
    """Encoder, crop and batch from step costs measured on `dev` at batches 2 and 4 (memory and time grow
    linearly with the batch): the first of resnet34 then resnet18, at the largest crop then halves of it (not
    under MIN_CROP, nor under CONTEXT typical objects), where a batch of at least BN_BATCH fits every bound
    (a batch that only the budget's MIN_STEPS bounds stops at BN_BATCH);
    resnet18 only when time or memory, not the amount of data, kept resnet34's batch small. When none does,
    the largest batch tried. Returns the crop."""
    cfg = plan.config()
    head, kind = cfg.head(), dev.type if dev.type in MEMORY_SHARE else "cuda"
    h, w = report.plane_size()
    room = available_memory(dev) * MEMORY_SHARE[kind]
    train_s = plan.budget_s * (1 - VAL_SHARE) - BUDGET_RESERVE if plan.budget_s else None
    crops, context = [largest], _context(report)
    while crops[-1] // 2 >= MIN_CROP and (crops[-1] // 2) ** 2 >= context[1]:
        crops.append(crops[-1] // 2)
    tried = []
    data_bound = "5 % of the training data"
    for encoder in ("resnet34", "resnet18"):
        probe = StepProbe(cfg, head, dev, encoder)
        for crop in crops:
            a, b = probe.cost(2, crop), probe.cost(4, crop)
            per_mem, per_s = max(1.0, (b.memory - a.memory) / 2), max(1e-6, (b.seconds - a.seconds) / 2)
            mem = lambda n, a=a, per=per_mem: a.memory + per * (n - 2)  # noqa: E731
            sec = lambda n, a=a, per=per_s: max(1e-6, a.seconds + per * (n - 2))  # noqa: E731
            in_crops = report.items * max(1.0, h * w / crop ** 2)
            bounds = {f"{data_bound} ({in_crops:.0f} crops' worth)": math.floor(BATCH_SHARE * in_crops),
                      f"memory ({room / 2**30:.1f} GiB usable)": max(n for n in range(1, MAX_BATCH + 1)
                                                                      if n == 1 or mem(n) <= room),
                      "segkit's cap": MAX_BATCH}
            if train_s:
                steps_bound = f"{MIN_STEPS} steps in the budget"
                bounds[steps_bound] = max(
                    (n for n in range(1, MAX_BATCH + 1) if train_s / sec(n) >= MIN_STEPS), default=0)
                if min(bounds, key=bounds.get) == steps_bound and bounds[steps_bound] > BN_BATCH:
                    bounds[f"batch norm's {BN_BATCH} (time binds: the rest of the budget buys steps)"] = BN_BATCH
            batch = max(MIN_BATCH, min(bounds.values()))
            bound = min(bounds, key=bounds.get)
            measured = (f"{a.seconds:.3g} s and {a.memory / 2**20:.0f} MiB a step at batch 2, {b.seconds:.3g} s and "
                        f"{b.memory / 2**20:.0f} MiB at 4 on {dev}")
            tried.append((encoder, crop, batch, bound, sec(batch), measured))
            if batch >= BN_BATCH:
                break
        if tried[-1][2] >= BN_BATCH or tried[-1][3].startswith(data_bound):
            break  # a batch found, or the data bounds it (which a faster encoder does not change)
    if tried[-1][2] >= BN_BATCH:
        chosen, how = tried[-1], f"the first of resnet34 and resnet18 (at crops {crops}) where a batch of {BN_BATCH} fits"
    else:  # the largest batch tried; on a tie the larger crop, then resnet34
        chosen = max(tried, key=lambda t: (t[2], t[1], t[0] == "resnet34"))
        how = f"no encoder and crop (of {crops}) reached a batch of {BN_BATCH}: the largest batch tried"
    encoder, crop, batch, bound, seconds, measured = chosen
    others = "; ".join(f"{e} at crop {c}: batch {n} ({why})" for e, c, n, why, _, _ in tried if (e, c) != (encoder, crop))
    plan.choices.append(Choice("model.encoder", encoder, (
        f"resnet34, segkit's default ({measured})" if encoder == "resnet34" and batch >= BN_BATCH and not others else
        f"{encoder}, {how}" + (f"; tried: {others}" if others else ""))))
    kept = ""
    if crops[-1] // 2 >= MIN_CROP and context[1]:
        kept = (f"; not halved below {crops[-1]}: a crop of {crops[-1] // 2} covers under {CONTEXT} typical "
                f"{context[0]} objects ({context[1] / CONTEXT:.0f} {report.unit} each), too little context")
    plan.choices.append(Choice("train.crop", crop, (largest_why if crop == largest else (
        f"{crop}: {largest_why.split(':')[0]}, but at {largest} only batches under {BN_BATCH} fit "
        f"({others}); halved, not below {MIN_CROP}")) + kept))
    plan.choices.append(Choice("train.batch_size", batch, (
        f"{batch}: the largest under {bound}" if batch >= BN_BATCH else
        f"{batch}: under {BN_BATCH} at every encoder and crop tried, bounded by {bound}; the budget or the data is "
        "short for more") + f" ({measured}; {seconds:.3g} s a step at {batch}; batch norm wants at least {BN_BATCH})"))
    if batch < BN_BATCH:
        plan.notes.append(f"warning: batch {batch} under {BN_BATCH}; a longer --budget gives batch norm better batches")
    plan.choices.append(Choice("train.lr", 1e-3, "AdamW at 1e-3 with weight decay 1e-4; a linear warm-up over a tenth "
                                                  "of the run (at most an epoch, at most 100 steps), then cosine "
                                                  "decay to 0"))
    plan.choices.append(Choice("train.workers", "auto", "loader processes that keep the device busy without "
                                                        "taking its cores (segkit's measured default)"))
    return crop


def _count(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _schedule(plan: Plan, dev, started: float) -> None:
    """Epochs, steps per epoch and validation spacing: fitted to the budget from a timed probe of the real
    run, or (no budget) a cap on steps with early stopping."""
    if not plan.budget_s:
        plan.choices += [
            Choice("train.steps_per_epoch", OPEN_STEPS, f"no budget: epochs of {OPEN_STEPS} steps (nnU-Net's), "
                                                        "each validated"),
            Choice("train.epochs", OPEN_EPOCHS, f"a cap of {OPEN_EPOCHS * OPEN_STEPS} steps"),
            Choice("train.early_stop_patience", PATIENCE, f"stop after {PATIENCE} validations without a better "
                                                          "mean Dice (best/ keeps the best)"),
            Choice("train.val_every", 1, "every epoch")]
        return
    cost = run_cost(plan.config(), dev)
    spent = time.perf_counter() - started
    left = plan.budget_s - spent - cost.startup - END_SECONDS
    per_val = cost.validation + cost.checkpoint
    validations = int(max(1, min(MAX_VALIDATIONS, VAL_SHARE * left // max(per_val, 1e-6))))
    steps = int((left - validations * per_val) // cost.step)
    if steps < 1:
        need = spent + cost.startup + END_SECONDS + per_val + 50 * cost.step
        raise SegkitError(f"--budget {plan.budget_s:.0f} s: planning took {spent:.0f} s, reading the data "
                          f"{cost.startup:.0f} s, a step {cost.step:.2g} s and a validation {per_val:.0f} s: no "
                          f"training fits. Fix: a budget of at least {math.ceil(need / 60)}m.")
    per_epoch, extra = math.ceil(steps / validations), math.ceil(OVERPLAN * validations)
    plan.predicted_s = min(plan.budget_s, spent + cost.startup + validations * (per_epoch * cost.step + per_val)
                           + END_SECONDS)  # planned past it, the time limit ends the run on time
    timing = (f"measured on {dev}: reading the data {cost.startup:.1f} s, {cost.step:.3g} s a step (real batches "
              f"from the loader), {cost.validation:.1f} s a validation of {cost.val_items} samples, "
              f"{cost.checkpoint:.1f} s a checkpoint; planning took {spent:.0f} s")
    plan.choices += [
        Choice("train.steps_per_epoch", per_epoch, f"the budget holds {_count(validations, 'epoch')} of {per_epoch} "
                                                   f"steps: {timing}"),
        Choice("train.epochs", validations + extra,
               f"the budget holds {_count(validations, 'validation')} (at most {VAL_SHARE:.0%} of the time, at most "
               f"{MAX_VALIDATIONS}); {_count(extra, 'more epoch')} in case steps run faster than measured: the time "
               "limit ends the run, and the learning rate's cosine follows the clock to its end; best/ is the best "
               "validation"),
        Choice("train.val_every", 1, "every epoch"),
        Choice("train.time_limit", round(plan.budget_s - spent, 1),
               "the budget less planning: training stops at the step after which only its last validation and "
               "save still fit, then validates and saves")]
