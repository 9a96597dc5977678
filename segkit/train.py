"""The training loop: one readable function, `train`, and the few pieces it calls.

AMP (bf16 where the GPU supports it, else fp16 with a scaler) and channels_last (NHWC) on every device;
DDP when launched by torchrun; `best/` and `last/` checkpoints; resume; early stopping.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
from segkit.data.dataset import SegmentationDataset, cache_budget, to_network
from segkit.data.source import ImageSource
from segkit.data.io import write_bytes
from segkit.data.training_data import training_data
from segkit.data.transforms import eval_transform, train_transform
from segkit.device import amp_dtype, resolve_device
from segkit.errors import ConfigError, SegkitError, TrainingError
from segkit.heads import Head
from segkit.infer import Segmenter, batches_by_shape
from segkit.metrics import EMPTY_RULE, summarize
from segkit.model import build_model, checkpoint_meta, save_state, unwrap
from segkit.tensorboard import TensorBoardLog
from segkit.viz import overlay_picture, plot_curves

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
    torch.set_num_threads(1)


def loader_workers(workers: int | str, device: torch.device) -> int:
    """`auto`: no worker processes on CPU, where a sample costs ~2 ms against a step of a second and
    workers only take cores from the model; this rank's share of the cores - 1 (at most 8) feeding a GPU."""
    if workers != "auto":
        return int(workers)
    cores = (os.cpu_count() or 2) // dist.local_world_size()  # ranks on one node share its cores
    return min(8, max(1, cores - 1)) if device.type == "cuda" else 0


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
def validate(seg: Segmenter, loss_fn: nn.Module, dataset: SegmentationDataset, batch_size: int = 8
             ) -> tuple[float, np.ndarray]:
    """Pixel-weighted mean loss and (C, 4) pixel counts over this rank's validation images, each at
    full size through the Segmenter's own path: same-size images share a forward pass, images larger
    than its tile go through windows. Counts stay on the device; one transfer at the end."""
    head, device = seg.head, seg.device
    seg.model.eval()
    counts = torch.zeros(head.channels, 4, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels = 0

    def score(logits: torch.Tensor, target: torch.Tensor) -> None:
        nonlocal loss_sum, pixels, counts
        n = logits.shape[0] * logits.shape[-2] * logits.shape[-1]
        loss_sum += loss_fn(logits.float(), target).double() * n
        pixels += n
        counts += head.stats(head.decode(logits), target)

    def items():
        for r in dataset.records:
            px = dataset.pixels(r, None)
            yield head.targets(px.labels, px.valid), ImageSource.from_array(px.image, seg.in_channels, px.nodata,
                                                                            str(r.sample.image))

    for batch in batches_by_shape(items(), batch_size, seg.fits):
        if len(batch) == 1 and not seg.fits(batch[0][1]):
            target, src = batch[0]
            for top, rows in seg.rows(src):
                score(rows[None], target[..., top:top + rows.shape[1], :].to(device)[None])
            continue
        logits = seg.forward(seg.to_input([src for _, src in batch]))
        score(logits, torch.stack([t for t, _ in batch]).to(device))
    loss_total, pixels = dist.all_reduce_sum([float(loss_sum), pixels], device)
    counts = dist.all_reduce_tensor(counts.cpu(), device)
    return loss_total / max(1, pixels), counts.numpy()


class Checkpointer:
    """Writes checkpoints off the training thread: the state is copied to the CPU at once (so
    training can go on changing the live tensors), then written by one background thread; at
    most one write is in flight, and `wait` surfaces its errors."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def save(self, model: nn.Module, meta: dict, best: bool, last: bool, state: dict | None,
             history: list[dict], plot: bool) -> None:
        self.wait()
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}
        state = _to_cpu(state) if state is not None else None
        rows = [dict(r) for r in history]

        def write() -> None:
            if best:
                save_state(self.out / "best", weights, meta)
            if last:
                save_state(self.out / "last", weights, meta)
                buf = io.BytesIO()
                torch.save(state, buf)
                write_bytes(self.out / "last" / STATE, buf.getvalue())
            _write_csv(self.out / "metrics.csv", rows)
            if plot:
                plot_curves(rows, self.out / "curves.png")

        self.pending = self.pool.submit(write)

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


def _to_cpu(obj):
    """A deep copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def val_pictures(seg: Segmenter, dataset: SegmentationDataset, count: int = 3) -> list[tuple[str, np.ndarray]]:
    """Overlays of the first `count` validation images, for TensorBoard."""
    pictures = []
    for r in dataset.records[:count]:
        px = dataset.pixels(r, None)
        masks = seg.head.multihot(torch.from_numpy(seg.predict(px.image).mask)[None])[0].numpy()
        pictures.append((r.sample.stem, overlay_picture(px.image, masks, seg.head.classes, seg.head.colors)))
    return pictures


def spaced_validation(val_seconds: float, epoch_seconds: float, main: bool, share: float = 0.1) -> int:
    """Epochs between validations so that validating costs at most `share` of training time."""
    every = max(1, math.ceil(val_seconds / max(share * epoch_seconds, 1e-9)))
    if every > 1 and main:
        log.info("validation takes %.1f s against %.1f s of training per epoch: validating every %d epochs "
                 "(and the last); set train.val_every to choose", val_seconds, epoch_seconds, every)
    return every


def compiled(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.compile'd `model`, tried once on `example`; the eager model, with the reason, if it fails."""
    try:
        fast = torch.compile(model)
        model.eval()
        with torch.no_grad():
            fast(example)
        return fast
    except Exception as err:  # compilers fail in many ways (no C++ toolchain, unsupported ops, old GPUs)
        log.warning("train.compile: torch.compile failed (%s: %s); training eagerly", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return model


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
    d = cfg.data
    data = training_data(cfg, head, cache_budget(d.cache_mb) // dist.local_world_size())  # a copy per rank
    reader, train_records, val_records, norm = data.reader, data.train, data.val, data.norm
    aug = t.augment
    train_ds = SegmentationDataset(train_records, reader, head, train_transform(t.crop, aug), norm, crop=t.crop,
                                   scale_low=aug.scale[0] if aug.scale else 1.0, color=aug.color, seed=t.seed,
                                   foreground=data.foreground)
    val_ds = SegmentationDataset(val_records[rank::world], reader, head, eval_transform(), norm)

    per_rank_batch = max(1, t.batch_size // world)
    steps = t.steps_per_epoch or max(1, len(train_ds) // (per_rank_batch * world))
    sampler = EpochSampler(len(train_ds), steps * per_rank_batch, t.seed, rank, world)
    workers = loader_workers(t.workers, device)
    train_loader = DataLoader(_EpochKeyed(train_ds), batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                              **_loader_kwargs(workers, device))

    torch.manual_seed(t.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, head.channels, cfg.data.channels,
                        cfg.model.encoder_weights).to(device, memory_format=torch.channels_last)  # NHWC everywhere:
    if device.type == "cuda":  # measured ~30% faster per CPU step than NCHW (oneDNN), and cuDNN's fast path
        torch.backends.cudnn.benchmark = True
    loss_fn = head.loss(t.loss, t.class_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.epochs * steps, min(steps, 100)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = checkpoint_meta(head, cfg.model.arch, cfg.model.encoder, d.channels, norm,
                           data={"mask": d.mask, "ignore_index": d.ignore_index,
                                 "foreground_value": d.foreground_value, "binary_threshold": d.binary_threshold,
                                 "colors": d.colors, "bands": d.bands, "nodata": d.nodata,
                                 "val_fraction": d.val_fraction, "seed": t.seed, "overlap": d.overlap,
                                 **data.meta})
    seg = Segmenter(model, head, meta, device, amp=t.amp)

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
        log.info("%s head, classes %s; %d train / %d val images; device %s%s; %d steps/epoch of %d; "
                 "%d loader workers", head.name, head.classes, len(train_ds), len(val_records), device,
                 f" ({dtype})" if dtype else "", steps, per_rank_batch * world, workers)
        log.info("input normalisation %s", norm.describe())
        if data.description != "images":
            log.info("volumes: %s", data.description)
        log.info("validation: dataset-level per-class IoU/Dice; %s", EMPTY_RULE)
    if t.sync_batchnorm and dist.active():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = dist.wrap(model, device)
    net = model
    if t.compile:
        net = compiled(model, torch.zeros(1, d.channels, t.crop, t.crop, device=device))

    stopped = "completed"
    images_seen, train_seconds = 0, 0.0
    saver = Checkpointer(out) if main else None
    board = TensorBoardLog(out / "tensorboard") if main and t.tensorboard else None
    losses = torch.zeros(t.log_every, device=device)
    val_every = 1 if t.val_every == "auto" else t.val_every
    saved_epoch = start_epoch
    try:
        for epoch in range(start_epoch, t.epochs):
            sampler.set_epoch(epoch)
            model.train()
            began = time.perf_counter()
            loss_sum, seen = 0.0, 0
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (progress and main),
                       leave=False, dynamic_ncols=True)
            for step, item in enumerate(train_loader):
                image, target = to_network(item, norm, head, device)
                image = image.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = net(image)
                loss = loss_fn(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                k = step % t.log_every
                losses[k] = loss.detach()
                if k == t.log_every - 1 or step == steps - 1:  # the only read-back: every log_every steps
                    values = losses[:k + 1].tolist()
                    bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
                    if bad is not None:
                        kept = f"last/ holds epoch {saved_epoch}" if saved_epoch else "no checkpoint yet"
                        raise TrainingError(f"non-finite loss ({values[bad]}) at epoch {epoch + 1}, step "
                                            f"{step - k + bad + 1}; stopped, {kept}. "
                                            "Fix: lower train.lr, or train.amp: false.")
                    loss_sum += sum(values)
                    seen += len(values)
                    bar.update(len(values))
                    bar.set_postfix(loss=f"{values[-1]:.4f}")
                    if board is not None:
                        board.steps(epoch * steps + step + 1, sum(values) / len(values), optimizer.param_groups[0]["lr"],
                                    (step + 1) * per_rank_batch * world / (time.perf_counter() - began))
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            images = (step + 1) * per_rank_batch * world
            images_seen += images
            train_seconds += seconds

            last_epoch = epoch + 1 == t.epochs
            validated = (epoch + 1) % val_every == 0 or last_epoch
            val_loss, dice, iou = math.nan, math.nan, math.nan
            per_class = {c: {"dice": math.nan, "iou": math.nan} for c in head.classes}  # same columns every row
            if validated:
                val_began = time.perf_counter()
                val_loss, counts = validate(seg, loss_fn, val_ds, per_rank_batch)
                scores = summarize(counts, head.classes)
                dice, iou, per_class = scores["mean"]["dice"], scores["mean"]["iou"], scores["per_class"]
                if t.val_every == "auto" and epoch == start_epoch:  # rank 0 decides, so every rank validates alike
                    every = spaced_validation(time.perf_counter() - val_began, seconds, main) if main else 0
                    val_every = int(dist.all_reduce_sum([every], device)[0])
            train_loss = dist.all_reduce_sum([loss_sum / max(1, seen)], device)[0] / world
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "val_mean_dice": dice, "val_mean_iou": iou,
                   **{f"dice_{c}": s["dice"] for c, s in per_class.items()},
                   **{f"iou_{c}": s["iou"] for c, s in per_class.items()},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": images / seconds}
            history.append(row)
            improved = validated and not math.isnan(dice) and dice > best
            if improved:
                best, best_epoch, bad_epochs = dice, epoch + 1, 0
            elif validated:
                bad_epochs += 1
            early = bool(t.early_stop_patience and bad_epochs >= t.early_stop_patience)
            if main:
                epoch_meta = {**meta, "epoch": epoch + 1, "val": {"mean_dice": dice, "mean_iou": iou}}
                last = (epoch + 1) % t.save_every == 0 or last_epoch or early
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best,
                         "best_epoch": best_epoch, "bad_epochs": bad_epochs} if last else None
                saver.save(model, epoch_meta, improved, last, state, history,
                           plot=last_epoch or early or (epoch + 1) % 5 == 0)
                saved_epoch = epoch + 1 if last else saved_epoch
                if board is not None:
                    board.epoch(epoch + 1, row, val_pictures(seg, val_ds) if validated else [])
                shown = " ".join(f"{c}={s['dice']:.3f}" for c, s in per_class.items()) if validated else "not validated"
                log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mean Dice %.4f (%s)  %.1f img/s%s",
                         epoch + 1, t.epochs, train_loss, val_loss, dice, shown, images / seconds,
                         "  *best" if improved else "")
            if early:
                stopped = "early stop"
                if main:
                    log.info("early stop: no better validation Dice for %d validations", bad_epochs)
                break
    finally:  # a pending checkpoint write finishes (or reports its error) whatever stopped the loop
        if saver is not None:
            saver.close()
        if board is not None:
            board.close()
    dist.barrier()
    return TrainResult(out, len(history), best_epoch, best, images_seen / max(train_seconds, 1e-9), stopped)
