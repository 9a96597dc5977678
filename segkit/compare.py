"""The softmax-versus-sigmoid experiment: same data, split, augmentation, schedule and seeds;
one run per head per seed, scored by the code of `segkit evaluate`, written up as a report.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segkit.config import Config, load_config, parse_config
from segkit.data.inspect import Report, inspect_data
from segkit.data.inspect import VolumeReport
from segkit.data.dataset import fit_normalization, scan
from segkit.data.source import ImageSource
from segkit.data.io import write_bytes, write_json
from segkit.data.splits import eval_samples, pair_reader
from segkit.errors import ConfigError, SegkitError
from segkit.evaluate import evaluate_split
from segkit.heads import Head
from segkit.infer import Segmenter, forward_padded
from segkit.metrics import class_scores
from segkit.model import META, build_model, read_meta
from segkit.train import read_history, train
from segkit.viz import plt, save_figure

log = logging.getLogger("segkit")

BINS = 100
THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]


# -- which classes each head gets ---------------------------------------------------------

@dataclass
class Plan:
    """Per head: the class list to train, or why it is not trained."""

    kind: str  # "binary", "exclusive", "overlapping"
    classes: dict[str, list[str]]
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    exclusive_part: bool = False  # softmax trained with overlapping pixels ignored
    unit: str = "pixels"  # what a mask labels: pixels of images, voxels of volumes


def plan_heads(cfg: Config, report: Report | VolumeReport, heads: Sequence[str], exclusive_part: bool = False
               ) -> Plan:
    """Class lists from the data: binary -> sigmoid [fg] vs softmax [background, fg]; exclusive ->
    the same N classes for both (plus background for softmax where pixels have no class);
    overlapping -> sigmoid only, with the share of pixels (voxels) softmax cannot represent."""
    names = cfg.data.classes
    fg = [c for c in names if c.lower() != "background"]
    unit = report.unit
    if cfg.data.mask == "binary":
        plan = Plan("binary", {"sigmoid": fg, "softmax": ["background", *fg]})
    elif report.overlap_share > 0:
        plan = Plan("overlapping", {"sigmoid": fg})
        cannot = (f"{report.overlap_share:.2%} of {unit} carry more than one label; softmax gives each "
                  f"{unit[:-1]} exactly one class and cannot represent them")
        if isinstance(report, VolumeReport):
            pairs = report.dataset.overlapping()
            cannot += (" (nested regions: " + "; ".join(
                f"{a} {list(report.dataset.class_values[a])} and {b} {list(report.dataset.class_values[b])} "
                "share label values" for a, b in pairs[:4]) + ")")
            if exclusive_part:
                raise ConfigError("--softmax-exclusive: the classes of a volume dataset with nested regions have "
                                  "no exclusive part to train softmax on (a voxel of an inner region is in every "
                                  "region around it). Fix: leave out --softmax-exclusive.")
        if exclusive_part:
            plan.classes["softmax"] = ["background", *fg]
            plan.exclusive_part = True
            plan.notes.append(f"softmax (exclusive part): {cannot}; they are ignored in its training and "
                              "scoring, so its scores are on the exclusive pixels only.")
        else:
            plan.skipped["softmax"] = (f"{cannot}, so no softmax model is trained "
                                       "(--softmax-exclusive trains one on the exclusive part).")
    else:
        covering = report.unlabeled_share == 0
        plan = Plan("exclusive", {"sigmoid": list(names) if covering else fg,
                                  "softmax": list(names) if covering else ["background", *fg]})
        if not covering:
            plan.notes.append(f"{report.unlabeled_share:.2%} of {unit} have no class: softmax gets a "
                              "`background` class for them.")
    plan.unit = unit
    needs, why = report.advice()
    plan.notes.insert(0, f"the data needs: {needs}. {why[0].upper()}{why[1:]}")
    unknown = [h for h in heads if h not in ("softmax", "sigmoid")]
    if unknown:
        raise ConfigError(f"--heads: {unknown} unknown. Fix: softmax, sigmoid or both.")
    plan.classes = {h: c for h, c in plan.classes.items() if h in heads}
    plan.skipped = {h: why for h, why in plan.skipped.items() if h in heads}
    return plan


PER_HEAD = ("model.head=sigmoid", "model.thresholds=", "train.loss=", "train.class_weights=")
"""Keys `head_config` sets for each run; a config read for compare has them neutral, so that a head the data
refuses (softmax on nested regions) or its loss does not stop the comparison before it starts."""


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A config file read for `compare`: its head, thresholds, loss and class weights are ignored (each run
    gets its own, see `head_config`); sigmoid, which every dataset allows, stands in while it is checked."""
    return load_config(path, [*overrides, *PER_HEAD])


def head_config(cfg: Config, head: str, classes: list[str], seed: int, epochs: int | None,
                ignore_overlap: bool = False, split_seed: int | None = None) -> Config:
    """One run's config. The seed varies initialisation and augmentation; the validation share stays the
    one `split_seed` draws (the config's own, else the first seed), so seeds differ in training only."""
    raw = cfg.model_dump(mode="json")
    if raw["data"]["split_seed"] is None:
        raw["data"]["split_seed"] = seed if split_seed is None else split_seed
    raw["data"]["classes"] = classes
    raw["data"]["overlap"] = "ignore" if ignore_overlap else cfg.data.overlap
    if cfg.data.colors and cfg.data.mask != "color":
        raw["data"]["colors"] = None
    raw["model"]["head"] = head
    raw["model"]["thresholds"] = None
    raw["train"]["loss"] = None
    raw["train"]["class_weights"] = None
    raw["train"]["seed"] = seed
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    return parse_config(raw, f"compare [{head}]")


# -- analysis accumulated while evaluating -------------------------------------------------

class Analysis:
    """Per-class probability histograms (positives, negatives, summed probability) for calibration, counts
    above each threshold of THRESHOLDS for the Dice-against-threshold curves, and pixel agreement. The
    threshold counts follow the head's decoding rule exactly (float32 probability strictly above the
    float32 threshold), so a curve's Dice at t is what `segkit evaluate --threshold t` reports."""

    def __init__(self, head: Head) -> None:
        c = head.channels
        self.head = head
        self.pos = np.zeros((c, BINS), np.int64)
        self.neg = np.zeros((c, BINS), np.int64)
        self.psum = np.zeros((c, BINS), np.float64)
        self.cuts = np.array(THRESHOLDS, np.float32)
        self.pos_cut = np.zeros((c, len(THRESHOLDS) + 1), np.int64)  # by how many thresholds lie below p
        self.neg_cut = np.zeros((c, len(THRESHOLDS) + 1), np.int64)
        self.correct = self.valid = self.no_class = self.multi_class = 0

    def __call__(self, probs: np.ndarray, decoded: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        """One image or case: float32 probabilities (C, ...), decoded and true classes (C, ...) bool, and
        the (...) scored items (`evaluate.Observer`)."""
        idx = np.minimum((probs * BINS).astype(np.int64), BINS - 1)
        for c in range(self.head.channels):
            pv, iv, tv = probs[c][valid], idx[c][valid], truth[c][valid]
            self.pos[c] += np.bincount(iv[tv], minlength=BINS)
            self.neg[c] += np.bincount(iv[~tv], minlength=BINS)
            self.psum[c] += np.bincount(iv, weights=pv, minlength=BINS)
            below = np.searchsorted(self.cuts, pv, side="left")  # thresholds t < p
            self.pos_cut[c] += np.bincount(below[tv], minlength=len(THRESHOLDS) + 1)
            self.neg_cut[c] += np.bincount(below[~tv], minlength=len(THRESHOLDS) + 1)
        count = decoded.sum(0)[valid]
        self.no_class += int((count == 0).sum())
        self.multi_class += int((count > 1).sum())
        self.correct += int((decoded == truth).all(0)[valid].sum())
        self.valid += int(valid.sum())

    def pixel_accuracy(self) -> float:
        """Share of valid pixels whose decoded label set equals the truth exactly."""
        return self.correct / max(1, self.valid)

    def reliability(self, bins: int = 10) -> dict:
        """Class-wise calibration over all (pixel, class) pairs: per bin mean probability,
        observed frequency, count; and the expected calibration error."""
        group = BINS // bins
        pos = self.pos.sum(0).reshape(bins, group).sum(1)
        tot = (self.pos + self.neg).sum(0).reshape(bins, group).sum(1)
        psum = self.psum.sum(0).reshape(bins, group).sum(1)
        conf = np.divide(psum, tot, out=np.zeros(bins), where=tot > 0)
        freq = np.divide(pos, tot, out=np.zeros(bins), where=tot > 0)
        ece = float((np.abs(conf - freq) * tot).sum() / max(1, tot.sum()))
        return {"confidence": conf.tolist(), "frequency": freq.tolist(), "count": tot.tolist(), "ece": ece}

    def threshold_curve(self) -> dict[str, list[float]]:
        """Dice per class at each threshold in THRESHOLDS (probability > t is positive, as decoding)."""
        out = {}
        for c, name in enumerate(self.head.classes):
            dice = []
            for j in range(len(THRESHOLDS)):
                tp, fp = self.pos_cut[c, j + 1:].sum(), self.neg_cut[c, j + 1:].sum()
                fn = self.pos_cut[c, :j + 1].sum()
                dice.append(class_scores(int(tp), int(fp), int(fn))["dice"])
            out[name] = dice
        return out

    def empty_or_overlap(self) -> dict[str, float]:
        return {"no_class": self.no_class / max(1, self.valid), "multi_class": self.multi_class / max(1, self.valid)}


# -- runs ----------------------------------------------------------------------------------

@dataclass
class Run:
    head: str
    seed: int
    classes: list[str]
    folder: Path
    scores: dict
    analysis: dict
    train_seconds: float
    images_per_s: float
    parameters: int
    history: list[dict]


def _params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "running" not in k
                   and "num_batches" not in k)


def run_one(cfg: Config, folder: Path, progress: bool, device: str) -> Run:
    """Train one head/seed, then score best/ on the validation split with `evaluate`."""
    result = train(cfg, folder, progress=progress)
    seg = Segmenter.load(folder / "best", device=device)
    analysis = Analysis(seg.head)
    scores = evaluate_split(seg, cfg.data.root, "val", cfg, workers=cfg.train.workers, observe=analysis)
    history = read_history(folder / "metrics.csv")
    info = {"reliability": analysis.reliability(), "pixel_accuracy": analysis.pixel_accuracy(),
            "empty_or_overlap": analysis.empty_or_overlap(), "thresholds": analysis.threshold_curve()}
    return Run(cfg.model.head, cfg.train.seed, cfg.data.classes, folder, scores, info,
               sum(r["seconds"] for r in history), result.images_per_s, _params(folder / "best"), history)


def degenerate_run(cfg: Config, steps: int = 5) -> dict:
    """The classic mistake, for teaching: softmax over one output channel. Its cross-entropy is
    exactly 0 for every input (so the weights never move) and its argmax is channel 0 everywhere."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, 1, cfg.data.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    samples = eval_samples(cfg.data, "val", cfg.split_seed())
    reader = pair_reader(cfg.data)
    records = scan(samples, reader)
    norm = fit_normalization(cfg.data.normalize, records, reader, cfg.data.channels, cfg.data.mean, cfg.data.std,
                             cfg.train.seed)
    losses, grad_norm = [], 0.0
    x = torch.randn(2, cfg.data.channels, 64, 64)
    for _ in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits, torch.zeros(2, 64, 64, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        grad_norm = max(grad_norm, sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None))
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    fg_idx = [i for i, c in enumerate(cfg.data.classes) if c.lower() != "background"]
    fg_pixels = valid_pixels = predicted_fg = 0
    probs_seen: set[float] = set()
    with torch.inference_mode():
        for sample in samples:
            px = reader.read(sample)
            labels, valid = px.labels, px.valid
            src = ImageSource.from_array(px.image, cfg.data.channels, px.nodata)
            stats = torch.from_numpy(src.stats())[None] if norm.per_image else None
            x = norm.apply(torch.from_numpy(px.image.transpose(2, 0, 1).copy())[None], stats)
            logits = forward_padded(model, x)
            probs_seen.update(torch.unique(logits.softmax(1)).tolist())
            predicted_fg += int((logits.argmax(1) != 0).sum())
            fg_pixels += int((labels[:, :, fg_idx].any(2) & valid).sum())
            valid_pixels += int(valid.sum())
    return {"label": "1-channel softmax (degenerate)", "classes": [cfg.data.classes[i] for i in fg_idx][:1],
            "train_losses": losses, "max_gradient": grad_norm,
            "probabilities_seen": sorted(probs_seen), "predicted_foreground_pixels": predicted_fg,
            "pixel_accuracy": 1 - fg_pixels / max(1, valid_pixels),
            "dice": 0.0, "note": "predicts channel 0 (no foreground) for every pixel: the accuracy of always "
                                 "answering the majority class, Dice 0 for the foreground."}


# -- report --------------------------------------------------------------------------------

def _spread(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(values: Sequence[float], digits: int = 4) -> str:
    mean, sd = _spread(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def common_classes(plan: Plan) -> list[str]:
    """Classes every trained head has: the fair basis for comparing Dice."""
    lists = list(plan.classes.values())
    return [c for c in lists[0] if all(c in other for other in lists[1:])] if lists else []


def summarize_runs(plan: Plan, runs: list[Run]) -> dict:
    common = common_classes(plan)
    table = {}
    for head in plan.classes:
        mine = [r for r in runs if r.head == head]
        common_dice = [statistics.fmean([r.scores["per_class"][c]["dice"] for c in common]) for r in mine]
        best_t = {}
        if mine and mine[0].scores.get("thresholds"):
            curves = {c: np.nanmean([r.analysis["thresholds"][c] for r in mine], axis=0) for c in mine[0].classes}
            best_t = {c: {"threshold": THRESHOLDS[int(np.nanargmax(v))], "dice": float(np.nanmax(v)),
                          "dice_at_0.5": float(v[THRESHOLDS.index(0.5)])} for c, v in curves.items()}
        table[head] = {
            "classes": mine[0].classes if mine else [],
            "seeds": [r.seed for r in mine],
            "macro_dice": [r.scores["mean"]["dice"] for r in mine],
            "macro_iou": [r.scores["mean"]["iou"] for r in mine],
            "macro_hd95": [r.scores["mean"].get("hd95", math.nan) for r in mine],  # volumes: mm
            "common_dice": common_dice,
            "per_class_dice": {c: [r.scores["per_class"][c]["dice"] for r in mine] for c in (mine[0].classes if mine else [])},
            "pixel_accuracy": [r.analysis["pixel_accuracy"] for r in mine],
            "ece": [r.analysis["reliability"]["ece"] for r in mine],
            "no_class_share": [r.analysis["empty_or_overlap"]["no_class"] for r in mine],
            "multi_class_share": [r.analysis["empty_or_overlap"]["multi_class"] for r in mine],
            "train_seconds": [r.train_seconds for r in mine],
            "images_per_s": [r.images_per_s for r in mine],
            "parameters": mine[0].parameters if mine else 0,
            "best_thresholds": best_t,
            "runs": [{"seed": r.seed, "folder": str(r.folder), "scores": r.scores, "analysis": r.analysis}
                     for r in mine],
        }
    labels = {h: f"{h} (exclusive part only)" if plan.exclusive_part and h == "softmax" else h for h in table}
    scoring = ("per case, then averaged over cases (as `segkit evaluate` reports volumes)"
               if runs and "per_case" in runs[0].scores else "pooled over the split's images")
    return {"kind": plan.kind, "unit": plan.unit, "scoring": scoring, "common_classes": common, "heads": table,
            "skipped": plan.skipped, "notes": plan.notes, "labels": labels}


def conclusion(summary: dict) -> str:
    heads = summary["heads"]
    common = summary["common_classes"]
    if len(heads) < 2:
        only = next(iter(heads), None)
        why = " ".join(summary["skipped"].values())
        return f"Only the {only} head was trained. {why}".strip()
    (a, ra), (b, rb) = sorted(heads.items(), key=lambda kv: -_spread(kv[1]["common_dice"])[0])
    ma, sa = _spread(ra["common_dice"])
    mb, sb = _spread(rb["common_dice"])
    diff = ma - mb
    on = f"mean Dice over the classes both heads have ({', '.join(common)})"
    text = f"The {a} head scores {diff:.4f} higher than the {b} head in {on}: {ma:.4f} vs {mb:.4f}."
    na, nb = len(ra["common_dice"]), len(rb["common_dice"])
    if math.isnan(sa) or math.isnan(sb):
        return text + " With one seed there is no spread to judge this by; run --seeds 0,1,2."
    noise = 2 * math.sqrt(sa**2 / na + sb**2 / nb)  # about a 95% band for the difference of two means
    spread = f"seed standard deviations {sa:.4f} ({a}, {na} seeds) and {sb:.4f} ({b}, {nb} seeds)"
    if diff <= noise:
        return text + (f" The difference is inside the seed spread ({spread}; twice the standard error of the "
                       f"difference is {noise:.4f}): on this data the two heads are equivalent; choose by what "
                       "the masks mean (overlap needs sigmoid, exclusive classes suit softmax).")
    return text + (f" The difference is larger than the seed spread ({spread}; twice the standard error of the "
                   f"difference is {noise:.4f}): prefer the {a} head here.")


def _thresholded(summary: dict) -> list[tuple[str, dict]]:
    """Heads that decode by thresholds (sigmoid), with their rows."""
    return [(h, r) for h, r in summary["heads"].items() if r["best_thresholds"]]


def _figures(summary: dict, runs: list[Run], out: Path) -> dict[str, str]:
    figs = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    palette = dict(zip(summary["heads"], ["tab:blue", "tab:orange"]))
    common = summary["common_classes"]
    for r in runs:
        ax.plot([h["epoch"] for h in r.history],
                [statistics.fmean(h[f"dice_{c}"] for c in common) for h in r.history],
                label=f"{r.head} seed {r.seed}", color=palette[r.head], alpha=0.8)
    ax.set(xlabel="epoch", ylabel=f"validation Dice on {', '.join(common)}"[:60], title="learning curves",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    figs["learning_curves"] = save_figure(fig, out / "learning_curves.png")
    fig, axes = plt.subplots(1, len(summary["heads"]), figsize=(4.5 * len(summary["heads"]), 4), squeeze=False)
    for ax, (head, row) in zip(axes[0], summary["heads"].items()):
        rel = row["runs"][0]["analysis"]["reliability"]
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        kept = [i for i, n in enumerate(rel["count"]) if n]
        ax.plot([rel["confidence"][i] for i in kept], [rel["frequency"][i] for i in kept], "o-")
        ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
               title=f"{head}: ECE {rel['ece']:.4f}")
    figs["reliability"] = save_figure(fig, out / "reliability.png")
    for head, row in _thresholded(summary):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in row["classes"]:
            curve = np.nanmean([r["analysis"]["thresholds"][c] for r in row["runs"]], axis=0)
            ax.plot(THRESHOLDS, curve, label=c)
        ax.set(xlabel="threshold (probability)", ylabel="Dice", title=f"{head}: Dice against threshold",
               ylim=(0, 1))
        ax.legend(fontsize=8)
        figs[f"thresholds_{head}"] = save_figure(fig, out / f"thresholds_{head}.png")
    return figs


def write_report(summary: dict, runs: list[Run], out: Path, degenerate: dict | None) -> Path:
    figs = _figures(summary, runs, out)
    summary["figures"] = figs
    summary["degenerate"] = degenerate
    summary["conclusion"] = conclusion(summary)
    lines = ["# Softmax or sigmoid? — segkit compare", "",
             f"Data: **{summary['kind']}**. Scores on the validation split, {summary['scoring']}; mean ± standard "
             "deviation over seeds.",
             ""]
    lines += [f"- {h}: {why}" for h, why in summary["skipped"].items()] + [f"- {n}" for n in summary["notes"]]
    common, unit = summary["common_classes"], summary["unit"]
    hd95 = any(not math.isnan(v) for r in summary["heads"].values() for v in r["macro_hd95"])
    lines += ["", f"| head | classes | Dice on {', '.join(common) or '-'} | macro Dice | macro IoU | "
                  + ("macro HD95 mm | " if hd95 else "") + f"{unit[:-1]} acc. | ECE | train s | img/s | params |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if hd95 else "")]
    for head, r in summary["heads"].items():
        lines.append(f"| {summary['labels'][head]} | {', '.join(r['classes'])} | {_pm(r['common_dice'])} | "
                     f"{_pm(r['macro_dice'])} | {_pm(r['macro_iou'])} | "
                     + (f"{_pm(r['macro_hd95'], 2)} | " if hd95 else "")
                     + f"{_pm(r['pixel_accuracy'])} | {_pm(r['ece'])} | "
                     f"{_pm(r['train_seconds'], 0)} | {_pm(r['images_per_s'], 1)} | {r['parameters']:,} |")
    if degenerate:
        lines.append(f"| {degenerate['label']} | {', '.join(degenerate['classes'])} | 0.0000 (constant) | - | - | "
                     f"{degenerate['pixel_accuracy']:.4f} | - | - | - | - |")
    lines += ["", "Per-class Dice:", "", "| head | " + " | ".join(
        sorted({c for r in summary["heads"].values() for c in r["per_class_dice"]})) + " |"]
    names = sorted({c for r in summary["heads"].values() for c in r["per_class_dice"]})
    lines.append("|---|" + "---|" * len(names))
    for head, r in summary["heads"].items():
        lines.append(f"| {head} | " + " | ".join(_pm(r["per_class_dice"][c]) if c in r["per_class_dice"] else "-"
                                                 for c in names) + " |")
    for head, sig in _thresholded(summary):
        figure = Path(figs[f"thresholds_{head}"]).name
        lines += ["", f"{head} thresholds (best on validation, Dice from 0.05 to 0.95 in {figure}):", "",
                  "| class | best threshold | Dice there | Dice at 0.5 |", "|---|---|---|---|"]
        for c, t in sig["best_thresholds"].items():
            lines.append(f"| {c} | {t['threshold']:.2f} | {t['dice']:.4f} | {t['dice_at_0.5']:.4f} |")
        if summary["kind"] == "exclusive":
            lines += ["", f"{head}: {unit} with no class after thresholding: {_pm(sig['no_class_share'])}; "
                          f"with more than one class: {_pm(sig['multi_class_share'])} (exclusive data: "
                          "softmax has exactly one by construction)."]
    if degenerate:
        lines += ["", f"**The degenerate row** ({degenerate['label']}): training loss {degenerate['train_losses']} "
                      f"(exactly 0), largest gradient {degenerate['max_gradient']}, probabilities seen "
                      f"{degenerate['probabilities_seen']}, predicted foreground pixels "
                      f"{degenerate['predicted_foreground_pixels']}. {degenerate['note']}"]
    lines += ["", "## Conclusion", "", summary["conclusion"], ""]
    lines += [f"![{name}]({Path(path).name})" for name, path in figs.items()]
    write_json(out / "report.json", summary)
    write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return out / "report.md"


def write_thresholds(checkpoint: Path, thresholds: dict[str, float]) -> None:
    """Store tuned thresholds in a sigmoid checkpoint's model.json; `predict` then uses them."""
    meta = read_meta(checkpoint)
    if meta.get("thresholds") is None:
        raise SegkitError(f"{checkpoint}: a {meta['head']} checkpoint decodes by argmax and takes no thresholds.")
    meta["thresholds"] = [thresholds[c] for c in meta["classes"]]
    write_bytes(Path(checkpoint) / META, json.dumps(meta, indent=2).encode())


def compare(cfg: Config, out: Path, heads: Sequence[str] = ("softmax", "sigmoid"), seeds: Sequence[int] = (0,),
            epochs: int | None = None, include_degenerate: bool = False, tune_thresholds: bool = False,
            softmax_exclusive: bool = False, progress: bool = False) -> tuple[Path, dict]:
    """Run the experiment into `out` and write report.md, report.json and figures."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SegkitError(f"{out}: folder exists and is not empty. Fix: --out a new folder.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: a seed repeats. Fix: give each seed once, e.g. 0,1,2.")
    report = inspect_data(cfg.data.root, cfg.data)
    if include_degenerate and isinstance(report, VolumeReport):
        raise ConfigError("--include-degenerate: the 1-channel softmax row is shown on 2-D images only. Fix: leave "
                          "out --include-degenerate for a volume dataset.")
    plan = plan_heads(cfg, report, heads, softmax_exclusive)
    configs = [(h, s, head_config(cfg, h, classes, s, epochs, plan.exclusive_part and h == "softmax", seeds[0]
                                  if seeds else None))
               for h, classes in plan.classes.items() for s in seeds]
    if not configs:
        raise ConfigError(f"nothing to train: --heads {','.join(heads)} with --seeds {','.join(map(str, seeds))} "
                          "leaves no run. " + " ".join(plan.skipped.values())
                          + " Fix: name at least one head this data allows, and at least one seed.")
    runs = []
    for head, seed, c in configs:
        log.info("compare: %s head %s, seed %d", head, c.data.classes, seed)
        runs.append(run_one(c, out / head / f"seed{seed}", progress, c.train.device))
    summary = summarize_runs(plan, runs)
    degenerate = degenerate_run(configs[0][2]) if include_degenerate else None
    report = write_report(summary, runs, out, degenerate)
    if tune_thresholds:
        for head, row in _thresholded(summary):
            best = {c: t["threshold"] for c, t in row["best_thresholds"].items()}
            for r in runs:
                if r.head == head:
                    write_thresholds(r.folder / "best", best)
    return report, summary
