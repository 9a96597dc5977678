"""The training loop: one readable function, `train`, and the few pieces it calls.

AMP (bf16 where the GPU supports it, else fp16 with a scaler) and channels_last on CUDA;
DDP when launched by torchrun; `best/` and `last/` checkpoints; resume; early stopping.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from segkit import distributed as dist
from segkit.config import Config, dump_config
from segkit.data.dataset import SegmentationDataset, cache_budget, fit_normalization, scan
from segkit.data.source import ImageSource
from segkit.data.io import write_bytes
from segkit.data.splits import pair_reader, train_val_samples
from segkit.data.transforms import eval_transform, train_transform
from segkit.device import amp_dtype, resolve_device
from segkit.errors import ConfigError, SegkitError, TrainingError
from segkit.heads import Head
from segkit.infer import Segmenter
from segkit.metrics import EMPTY_RULE, summarize
from segkit.model import build_model, checkpoint_meta, save_checkpoint, unwrap
from segkit.viz import plot_curves

log = logging.getLogger("segkit")

STATE = "train_state.pt"


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_dice: float
    images_per_s: float
    stopped: str  # "completed", "early stop"


class EpochSampler(Sampler):
    """Yields (epoch, index): a seeded permutation per epoch, cut into this rank's share.

    The epoch travels with each index so that persistent workers augment by epoch, and
    `num_samples` can exceed the dataset (tiny datasets, fixed steps per epoch).
    """

    def __init__(self, n: int, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.num_samples, self.seed, self.rank, self.world = n, num_samples, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        total = self.num_samples * self.world
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(total / self.n))])[:total]
        return iter([(self.epoch, int(i)) for i in order[self.rank::self.world]])

    def __len__(self) -> int:
        return self.num_samples


class _EpochKeyed(torch.utils.data.Dataset):
    """Adapts SegmentationDataset to (epoch, index) keys."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


def _one_thread(_: int) -> None:
    """Data workers decode and augment one sample at a time; OpenCV's own thread pool in every
    worker would only compete with the model for the cores."""
    cv2.setNumThreads(1)


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            **({"prefetch_factor": 4, "worker_init_fn": _one_thread} if workers > 0 else {})}


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero, per optimizer step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@torch.inference_mode()
def validate(seg: Segmenter, loss_fn: nn.Module, dataset: SegmentationDataset) -> tuple[float, np.ndarray]:
    """Pixel-weighted mean loss and (C, 4) pixel counts over this rank's validation images, each at
    full size through the Segmenter's own path (windows for images larger than its tile), so
    validation scores what prediction will produce."""
    head, device = seg.head, seg.device
    seg.model.eval()
    counts = torch.zeros(head.channels, 4, dtype=torch.int64, device=device)
    loss_sum, pixels = 0.0, 0
    for r in dataset.records:
        px = dataset.pixels(r, None)
        target = head.targets(px.labels, px.valid)
        src = ImageSource.from_array(px.image, seg.in_channels, px.nodata, str(r.sample.image))
        for top, rows in seg.rows(src):
            n = rows.shape[1] * rows.shape[2]
            part = target[..., top:top + rows.shape[1], :].to(device)[None]
            loss_sum += float(loss_fn(rows[None].float(), part)) * n
            pixels += n
            counts += head.stats(head.decode(rows[None]), part).to(device)
    loss_sum, pixels = dist.all_reduce_sum([loss_sum, pixels], device)
    counts = dist.all_reduce_tensor(counts.cpu(), device)
    return loss_sum / max(1, pixels), counts.numpy()


def _write_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_bytes(path, buf.getvalue().encode())


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _check_run_dir(out: Path, cfg: Config, resume: bool) -> None:
    """A new run never writes into a folder that has files; a resumed one needs last/ and a matching config."""
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise SegkitError(f"{out}: run folder exists and is not empty. Fix: --resume to continue it, "
                              "or --out a new folder.")
        return
    if not (out / "last" / STATE).is_file():
        raise SegkitError(f"{out}: nothing to resume (no last/{STATE}). Fix: train without --resume first.")
    saved = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else ""
    import yaml

    old = yaml.safe_load(saved) or {}
    new = cfg.model_dump(mode="json")
    differ = [f"{section}.{k}" for section in ("data", "model") for k in new[section]
              if old.get(section, {}).get(k) != new[section][k]]
    if differ:
        raise ConfigError(f"{out}/config.yaml: resuming with different {differ}. "
                          "Fix: resume with the run's own config (only train.* may change).")


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the model `cfg` describes into the run folder `out` (see DESIGN.md for its files)."""
    out = Path(out)
    t = cfg.train
    head = cfg.head()
    device = dist.device_for_rank(resolve_device(t.device))
    dtype = amp_dtype(device, t.amp)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0

    # Everything is checked before anything is written.
    _check_run_dir(out, cfg, resume)
    reader = pair_reader(cfg.data)
    train_samples, val_samples = train_val_samples(cfg.data, t.seed)
    d = cfg.data
    per_image = d.normalize == "per_image"
    budget = cache_budget(d.cache_mb)
    train_records = scan(train_samples, reader, head, cache=d.cache, budget=budget, per_image=per_image)
    val_records = scan(val_samples, reader, head, cache=d.cache, budget=budget, per_image=per_image)
    norm = fit_normalization(d.normalize, train_records, reader, d.channels, d.mean, d.std, t.seed)
    aug = t.augment
    train_ds = SegmentationDataset(train_records, reader, head, train_transform(t.crop, aug), norm, crop=t.crop,
                                   scale_low=aug.scale[0] if aug.scale else 1.0, color=aug.color, seed=t.seed)
    val_ds = SegmentationDataset(val_records[rank::world], reader, head, eval_transform(), norm)

    per_rank_batch = max(1, t.batch_size // world)
    steps = t.steps_per_epoch or max(1, len(train_ds) // (per_rank_batch * world))
    sampler = EpochSampler(len(train_ds), steps * per_rank_batch, t.seed, rank, world)
    train_loader = DataLoader(_EpochKeyed(train_ds), batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                              **_loader_kwargs(t.workers, device))

    torch.manual_seed(t.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, head.channels, cfg.data.channels,
                        cfg.model.encoder_weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    loss_fn = head.loss(t.loss, t.class_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.epochs * steps, min(steps, 100)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = checkpoint_meta(head, cfg.model.arch, cfg.model.encoder, d.channels, norm,
                           data={"mask": d.mask, "ignore_index": d.ignore_index,
                                 "foreground_value": d.foreground_value, "binary_threshold": d.binary_threshold,
                                 "colors": d.colors, "bands": d.bands, "nodata": d.nodata,
                                 "val_fraction": d.val_fraction, "seed": t.seed, "overlap": d.overlap,
                                 "image_dtypes": sorted({str(r.dtype) for r in train_records})})
    seg = Segmenter(unwrap(model), head, meta, device, amp=t.amp)

    start_epoch, best, best_epoch, bad_epochs = 0, -1.0, 0, 0
    history: list[dict] = []
    if resume:
        state = torch.load(out / "last" / STATE, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / "last" / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.lr_lambdas[0] = lr_lambda(t.epochs * steps, min(steps, 100))
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch, bad_epochs = (state["epoch"], state["best"], state["best_epoch"],
                                                     state["bad_epochs"])
        history = read_history(out / "metrics.csv")[:start_epoch]
        if start_epoch >= t.epochs:
            raise SegkitError(f"{out}: already trained for {start_epoch} epochs (train.epochs = {t.epochs}). "
                              "Fix: raise --epochs to train further.")
        if main:
            log.info("resuming %s at epoch %d of %d", out, start_epoch + 1, t.epochs)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / "config.yaml", dump_config(cfg).encode())
        log.info("%s head, classes %s; %d train / %d val images; device %s%s; %d steps/epoch of %d",
                 head.name, head.classes, len(train_ds), len(val_records), device,
                 f" ({dtype})" if dtype else "", steps, per_rank_batch * world)
        log.info("input normalisation %s", norm.describe())
        log.info("validation: dataset-level per-class IoU/Dice; %s", EMPTY_RULE)
    model = dist.wrap(model, device)

    stopped = "completed"
    images_seen, train_seconds = 0, 0.0
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        model.train()
        began = time.perf_counter()
        loss_sum = 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (progress and main),
                   leave=False, dynamic_ncols=True)
        for step, (image, target) in enumerate(bar):
            image = image.to(device, non_blocking=True)
            if device.type == "cuda":
                image = image.contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(image)
            loss = loss_fn(logits.float(), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                kept = f"last/ holds epoch {epoch}" if epoch > 0 else "no checkpoint yet"
                raise TrainingError(f"non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; "
                                    f"stopped, {kept}. Fix: lower train.lr, or train.amp: false.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += value
            bar.set_postfix(loss=f"{value:.4f}")
        seconds = time.perf_counter() - began
        images = (step + 1) * per_rank_batch * world
        images_seen += images
        train_seconds += seconds

        val_loss, counts = validate(seg, loss_fn, val_ds)
        scores = summarize(counts, head.classes)
        train_loss = dist.all_reduce_sum([loss_sum / (step + 1)], device)[0] / world
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               "val_mean_dice": scores["mean"]["dice"], "val_mean_iou": scores["mean"]["iou"],
               **{f"dice_{c}": s["dice"] for c, s in scores["per_class"].items()},
               **{f"iou_{c}": s["iou"] for c, s in scores["per_class"].items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": images / seconds}
        history.append(row)
        dice = scores["mean"]["dice"]
        improved = not math.isnan(dice) and dice > best
        if improved:
            best, best_epoch, bad_epochs = dice, epoch + 1, 0
        else:
            bad_epochs += 1
        if main:
            epoch_meta = {**meta, "epoch": epoch + 1, "val": {"mean_dice": dice, "mean_iou": scores["mean"]["iou"]}}
            if improved:
                save_checkpoint(out / "best", model, epoch_meta)
            save_checkpoint(out / "last", model, epoch_meta)
            buf = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best,
                        "best_epoch": best_epoch, "bad_epochs": bad_epochs}, buf)
            write_bytes(out / "last" / STATE, buf.getvalue())
            _write_csv(out / "metrics.csv", history)
            plot_curves(history, out / "curves.png")
            per_class = " ".join(f"{c}={s['dice']:.3f}" for c, s in scores["per_class"].items())
            log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mean Dice %.4f (%s)  %.1f img/s%s",
                     epoch + 1, t.epochs, train_loss, val_loss, dice, per_class, images / seconds,
                     "  *best" if improved else "")
        if t.early_stop_patience and bad_epochs >= t.early_stop_patience:
            stopped = "early stop"
            if main:
                log.info("early stop: no better validation Dice for %d epochs", bad_epochs)
            break
    dist.barrier()
    return TrainResult(out, len(history), best_epoch, best, images_seen / max(train_seconds, 1e-9), stopped)
