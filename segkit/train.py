"""The training loop: one readable function, `train`, and the few pieces it calls.

AMP (bf16 where the GPU supports it, else fp16 with a scaler) and channels_last (NHWC) on every device;
DDP when launched by torchrun; `best/` and `last/` checkpoints; resume; early stopping. Its parts live beside
it: run control (lock, stop signals) in `run_control`, the sampler and loader workers in `loader`,
checkpoints and resume in `checkpoints`, validation in `validation`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segkit import distributed as dist
from segkit.checkpoints import STATE, Checkpointer, check_run_dir, damaged, read_history, resume_state, rng_state
from segkit.config import Config, dump_config
from segkit.data.dataset import SegmentationDataset, cache_budget, to_network
from segkit.data.io import write_bytes
from segkit.data.training_data import training_data
from segkit.data.transforms import eval_transform, train_transform
from segkit.device import amp_dtype, resolve_device
from segkit.errors import ConfigError, SegkitError, TrainingError
from segkit.infer import Segmenter
from segkit.loader import EpochKeyed, EpochSampler, loader_kwargs, loader_workers, stop_workers
from segkit.metrics import summarize_units, validation_rule
from segkit.model import build_model, checkpoint_meta, recover_unit
from segkit.run_control import Interrupted, RunLock, StopSignals
from segkit.tensorboard import TensorBoardLog
from segkit.validation import spaced_validation, val_pictures, validate

log = logging.getLogger("segkit")


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_dice: float
    images_per_s: float
    stopped: str  # "completed", "early stop"


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero, per optimizer step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


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


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the model `cfg` describes into the run folder `out` (see README for its files).

    Rank 0 holds the run folder's lock (`RunLock`) from start to end. SIGTERM/SIGINT stop after
    the current step with last/ written, and raise `Interrupted` saying where.
    """
    lock = RunLock(Path(out))
    try:
        return _train(cfg, Path(out), resume, progress, lock)
    finally:
        lock.release()


def _train(cfg: Config, out: Path, resume: bool, progress: bool, lock: RunLock) -> TrainResult:
    t = cfg.train
    head = cfg.head()
    device = dist.device_for_rank(resolve_device(t.device))
    dtype = amp_dtype(device, t.amp)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0

    # Everything is checked before anything is written.
    if main and out.is_dir():  # a folder another run is writing is refused first, for what it is
        lock.acquire()
        if resume:
            for unit in ("last", "best"):
                recover_unit(out / unit)
    check_run_dir(out, cfg, resume)
    d = cfg.data
    data = training_data(cfg, head, cache_budget(d.cache_mb) // dist.local_world_size())  # a copy per rank
    reader, train_records, val_records, norm = data.reader, data.train, data.val, data.norm
    aug = t.augment
    train_ds = SegmentationDataset(train_records, reader, head, train_transform(t.crop, aug), norm, crop=t.crop,
                                   scale_low=aug.scale[0] if aug.scale else 1.0, color=aug.color, seed=t.seed,
                                   foreground=data.foreground)
    val_ds = SegmentationDataset(val_records[rank::world], reader, head, eval_transform(), norm)
    units = list(dict.fromkeys(r.sample.scored_in for r in val_records))  # images: [None], pooled

    per_rank_batch = max(1, t.batch_size // world)
    steps = t.steps_per_epoch or max(1, len(train_ds) // (per_rank_batch * world))
    sampler = EpochSampler(len(train_ds), steps * per_rank_batch, t.seed, rank, world)
    workers = loader_workers(t.workers, device)
    train_loader = DataLoader(EpochKeyed(train_ds), batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                              **loader_kwargs(workers, device))

    torch.manual_seed(t.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, head.channels, cfg.data.channels,
                        cfg.model.encoder_weights, cfg.model.encoder_weights_strict
                        ).to(device, memory_format=torch.channels_last)  # NHWC everywhere:
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
                                 "val_fraction": d.val_fraction, "split_seed": cfg.split_seed(), "overlap": d.overlap,
                                 **data.meta})
    seg = Segmenter(model, head, meta, device, amp=t.amp)

    start_epoch, start_step, best, best_epoch, bad_epochs = 0, 0, -1.0, 0, 0
    carried = (0.0, 0)  # loss sum and count of the steps already done in the epoch resumed mid-way
    history: list[dict] = []
    layout = {"steps": steps, "batch_size": per_rank_batch * world, "world": world}
    val_every = 1 if t.val_every == "auto" else t.val_every
    val_decided = t.val_every != "auto"
    kept = "no checkpoint yet"
    if resume:
        state = resume_state(out / "last", model, optimizer, scheduler, scaler)
        scheduler.lr_lambdas[0] = lr_lambda(t.epochs * steps, min(steps, 100))
        start_epoch, best, best_epoch, bad_epochs = (state["epoch"], state["best"], state["best_epoch"],
                                                     state["bad_epochs"])
        start_step = state.get("step", 0)
        if start_step > steps and state.get("layout") == layout:
            raise damaged(out / "last" / STATE, f"step {start_step} of an epoch of {steps}")
        if start_step and state.get("layout") != layout:
            raise ConfigError(f"{out}/last was written mid-epoch with {state.get('layout')}; resuming that epoch "
                              f"needs the same steps per epoch, batch size and processes, not {layout}. Fix: "
                              "resume with the run's train.steps_per_epoch, train.batch_size and --nproc.")
        if start_step:
            carried = (state["loss_sum"], state["seen"])
        history = state["history"] if "history" in state else read_history(out / "metrics.csv")[:start_epoch]
        if t.val_every == "auto" and state.get("val_every"):
            val_every, val_decided = state["val_every"], True
        kept = f"last/ holds epoch {start_epoch + 1} step {start_step}" if start_step else \
            f"last/ holds epoch {start_epoch}"
        if start_epoch >= t.epochs:
            raise SegkitError(f"{out}: already trained for {start_epoch} epochs (train.epochs = {t.epochs}). "
                              "Fix: raise --epochs to train further.")
        if main:
            log.info("resuming %s at epoch %d of %d after step %d of %d", out, start_epoch + 1, t.epochs,
                     start_step, steps)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not lock.tried:  # a new folder: lock it, then make sure no other run started in it meanwhile
            lock.acquire()
            check_run_dir(out, cfg, resume)
        write_bytes(out / "config.yaml", dump_config(cfg).encode())
        log.info("%s head, classes %s; %d train / %d val images; device %s%s; %d steps/epoch of %d; "
                 "%d loader workers", head.name, head.classes, len(train_ds), len(val_records), device,
                 f" ({dtype})" if dtype else "", steps, per_rank_batch * world, workers)
        log.info("input normalisation %s", data.normalization)
        if data.description != "images":
            log.info("volumes: %s", data.description)
        log.info("validation: %s", validation_rule(units))
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
    signals = StopSignals()
    interrupted: Interrupted | None = None

    def stop_requested() -> bool:
        """A signal reached this process (or, under DDP, any rank: all ranks stop at the same step)."""
        if not dist.active():
            return bool(signals.signum)
        return dist.all_reduce_sum([1.0 if signals.signum else 0.0], device)[0] > 0

    def training_state(epoch_done: int, step_done: int) -> dict:
        """last/train_state.pt: everything a resumed run needs to go on as if never stopped."""
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch_done, "step": step_done, "best": best,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs, "loss_sum": loss_sum, "seen": seen,
                "layout": layout, "val_every": val_every if val_decided else None, "history": history,
                "rng": rng_state()}

    signals.install()
    try:
        for epoch in range(start_epoch, t.epochs):
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip=first * per_rank_batch)
            model.train()
            began = time.perf_counter()
            loss_sum, seen = carried if epoch == start_epoch else (0.0, 0)
            bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not (progress and main), leave=False, dynamic_ncols=True)
            unread, step = first % t.log_every, first - 1  # losses[unread:] are not read back yet
            for step, item in enumerate(train_loader, start=first):
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
                # The only read-back: every log_every steps, at the epoch's end, and (one process) on a signal.
                if k == t.log_every - 1 or step == steps - 1 or (signals.signum and not dist.active()):
                    values = losses[unread:k + 1].tolist()
                    bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
                    if bad is not None:
                        raise TrainingError(f"non-finite loss ({values[bad]}) at epoch {epoch + 1}, step "
                                            f"{step - k + unread + bad + 1}; stopped, {kept}. "
                                            "Fix: lower train.lr, or train.amp: false.")
                    for v in values:  # one by one: the same float sum however the steps were read back
                        loss_sum += v
                    seen += len(values)
                    unread = (k + 1) % t.log_every
                    bar.update(len(values))
                    bar.set_postfix(loss=f"{values[-1]:.4f}")
                    if board is not None:
                        board.steps(epoch * steps + step + 1, sum(values) / len(values), optimizer.param_groups[0]["lr"],
                                    (step + 1 - first) * per_rank_batch * world / (time.perf_counter() - began))
                    if stop_requested():
                        interrupted = Interrupted(signals.signum or signal.SIGTERM, epoch + 1, step + 1, steps)
                        if main:
                            saver.save(model, {**meta, "epoch": epoch, "step": step + 1}, False, True,
                                       training_state(epoch, step + 1), history, plot=False)
                        break
            bar.close()
            if interrupted is not None:
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            images = (step + 1 - first) * per_rank_batch * world
            images_seen += images
            train_seconds += seconds

            last_epoch = epoch + 1 == t.epochs
            validated = (epoch + 1) % val_every == 0 or last_epoch
            val_loss, dice, iou = math.nan, math.nan, math.nan
            per_class = {c: {"dice": math.nan, "iou": math.nan} for c in head.classes}  # same columns every row
            if validated:
                val_began = time.perf_counter()
                val_loss, counts = validate(seg, loss_fn, val_ds, units, per_rank_batch)
                scores = summarize_units(counts, head.classes)
                dice, iou, per_class = scores["mean"]["dice"], scores["mean"]["iou"], scores["per_class"]
                if not val_decided:  # rank 0 decides, so every rank validates alike
                    every = spaced_validation(time.perf_counter() - val_began, seconds, main) if main else 0
                    val_every, val_decided = int(dist.all_reduce_sum([every], device)[0]), True
            train_loss = dist.all_reduce_sum([loss_sum / max(1, seen)], device)[0] / world
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "val_mean_dice": dice, "val_mean_iou": iou,
                   **{f"dice_{c}": s["dice"] for c, s in per_class.items()},
                   **{f"iou_{c}": s["iou"] for c, s in per_class.items()},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                   "images_per_s": images / max(seconds, 1e-9)}
            history.append(row)
            improved = validated and not math.isnan(dice) and dice > best
            if improved:
                best, best_epoch, bad_epochs = dice, epoch + 1, 0
            elif validated:
                bad_epochs += 1
            early = bool(t.early_stop_patience and bad_epochs >= t.early_stop_patience)
            stopping = not (last_epoch or early) and stop_requested()  # a signal during validation
            if main:
                epoch_meta = {**meta, "epoch": epoch + 1, "val": {"mean_dice": dice, "mean_iou": iou}}
                last = (epoch + 1) % t.save_every == 0 or last_epoch or early or stopping
                saver.save(model, epoch_meta, improved, last, training_state(epoch + 1, 0) if last else None,
                           history, plot=last_epoch or early or stopping or (epoch + 1) % 5 == 0)
                kept = f"last/ holds epoch {epoch + 1}" if last else kept
                if board is not None:
                    board.epoch(epoch + 1, row, val_pictures(seg, val_ds) if validated else [])
                shown = " ".join(f"{c}={s['dice']:.3f}" for c, s in per_class.items()) if validated else "not validated"
                log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mean Dice %.4f (%s)  %.1f img/s%s",
                         epoch + 1, t.epochs, train_loss, val_loss, dice, shown, images / max(seconds, 1e-9),
                         "  *best" if improved else "")
            if stopping:
                interrupted = Interrupted(signals.signum or signal.SIGTERM, epoch + 1, steps, steps)
                break
            if early:
                stopped = "early stop"
                if main:
                    log.info("early stop: no better validation Dice for %d validations", bad_epochs)
                break
    finally:  # a pending checkpoint write finishes (or reports its error) whatever stopped the loop
        signals.restore()
        stop_workers(train_loader)
        if saver is not None:
            saver.close()
        if board is not None:
            board.close()
    dist.barrier()
    if interrupted is not None:
        raise interrupted
    return TrainResult(out, len(history), best_epoch, best, images_seen / max(train_seconds, 1e-9), stopped)
