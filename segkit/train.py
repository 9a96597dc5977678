"""The training loop: `train` builds the run (`build_run`), resumes it (`resumed`), then runs epochs of
`train_step`s (`_epoch`) and ends each with validation and checkpoints (`_end_epoch`).

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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segkit import distributed as dist
from segkit.checkpoints import STATE, Checkpointer, check_run_dir, damaged, read_history, resume_state, rng_state
from segkit.config import Config, TrainConfig, dump_config
from segkit.data.dataset import SegmentationDataset, cache_budget, to_network
from segkit.data.io import write_bytes
from segkit.data.training_data import TrainingData, training_data
from segkit.data.transforms import eval_transform, train_transform
from segkit.device import amp_dtype, resolve_device
from segkit.errors import ConfigError, SegkitError, TrainingError
from segkit.heads import Head
from segkit.infer import Segmenter
from segkit.loader import EpochKeyed, EpochSampler, loader_kwargs, loader_workers, stop_workers
from segkit.metrics import summarize_units, validation_rule
from segkit.model import build_model, checkpoint_meta, recover_unit
from segkit.run_control import Interrupted, RunLock, StopSignals
from segkit.tensorboard import TensorBoardLog
from segkit.validation import spaced_validation, val_pictures, validate, validation_seconds

log = logging.getLogger("segkit")


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_dice: float
    images_per_s: float
    stopped: str  # "completed", "early stop", "time limit"


WARMUP_SHARE = 0.1
"""The warm-up's share of a run: of its planned steps, and under train.time_limit of its time."""


@dataclass
class Schedule:
    """The learning-rate factor of an optimizer step: a linear warm-up, then cosine decay to zero.

    The warm-up lasts an epoch, at most 100 steps and at most a tenth of the planned steps, and under
    train.time_limit at most a tenth of the time from the first step to the last step that fits: a short run
    is not spent warming up. The cosine then runs over the remaining steps or, under the limit, the remaining
    time, whichever is further along: a run whose steps go faster or slower than planned still anneals by its
    deadline, neither cut at a high rate nor ended early. `tick` gives it the clock."""

    total_steps: int
    warmup: int
    clock: float = 0.0  # the share passed of the time from the first step to the last that fits
    warm_clock: float | None = None  # the clock when the warm-up ended (time limit)

    def __call__(self, step: int) -> float:
        if self.warm_clock is None and step < self.warmup:
            return min(1.0, max((step + 1) / self.warmup, self.clock / WARMUP_SHARE))
        by_steps = max(0, step - self.warmup) / max(1, self.total_steps - self.warmup)
        warm = self.warm_clock
        by_clock = 0.0 if warm is None else 1.0 if warm >= 1 else (self.clock - warm) / (1 - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(by_steps, by_clock))))

    def tick(self, clock: float, step: int) -> None:
        """Under a time limit: the share `clock` of the time from the first step to the last that fits has
        passed after `step` optimizer steps; the warm-up ends here if its steps or its time are done."""
        self.clock = max(self.clock, min(1.0, clock))
        if self.warm_clock is None and (step >= self.warmup or self.clock >= WARMUP_SHARE):
            self.warm_clock = self.clock

    @classmethod
    def of(cls, t: TrainConfig, steps: int) -> Schedule:
        """The schedule of train config `t` with epochs of `steps`."""
        total = t.epochs * steps
        return cls(total, max(1, min(steps, 100, math.ceil(WARMUP_SHARE * total))))


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


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
          files: dict[str, bytes] | None = None) -> TrainResult:
    """Train the model `cfg` describes into the run folder `out` (see README for its files); `files` (name ->
    bytes) are written beside config.yaml (a planned run's plan.yaml and fingerprint.json).

    Rank 0 holds the run folder's lock (`RunLock`) from start to end. SIGTERM/SIGINT stop after
    the current step with last/ written, and raise `Interrupted` saying where.
    """
    lock = RunLock(Path(out))
    try:
        return _train(cfg, Path(out), resume, progress, lock, files or {})
    finally:
        lock.release()


@dataclass
class Run:
    """What one run trains with, built once from the config (`build_run`): the data, the model and its optimiser."""

    cfg: Config
    head: Head
    device: torch.device
    dtype: torch.dtype | None
    data: TrainingData
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    units: list[str | None]
    batch: int  # per rank
    steps: int
    sampler: EpochSampler
    workers: int
    loader: DataLoader
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    meta: dict
    seg: Segmenter

    @property
    def layout(self) -> dict:
        """What a mid-epoch resume must match: the steps of an epoch, the batch and the processes."""
        return {"steps": self.steps, "batch_size": self.batch * dist.world_size(), "world": dist.world_size()}


@dataclass
class Progress:
    """Where training stands: what last/train_state.pt stores, so a resumed run goes on as if never stopped."""

    epoch: int = 0  # epochs done
    step: int = 0  # steps done in the epoch after them
    best: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    loss_sum: float = 0.0  # over the steps of the current epoch read back so far
    seen: int = 0
    history: list[dict] = field(default_factory=list)
    val_every: int = 1
    val_decided: bool = False
    kept: str = "no checkpoint yet"

    def state(self, run: Run) -> dict:
        return {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "epoch": self.epoch, "step": self.step, "best": self.best,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "loss_sum": self.loss_sum,
                "seen": self.seen, "layout": run.layout, "val_every": self.val_every if self.val_decided else None,
                "history": self.history, "rng": rng_state()}


def run_device(cfg: Config) -> torch.device:
    """The device of this process; under torchrun this joins the process group, so call it before asking
    for the rank."""
    return dist.device_for_rank(resolve_device(cfg.train.device))


def build_run(cfg: Config, device: torch.device) -> Run:
    """The data (read and checked), datasets, loader, model, loss, optimiser and schedule of `cfg` on
    `device` (`run_device`)."""
    t, d = cfg.train, cfg.data
    head = cfg.head()
    dtype = amp_dtype(device, t.amp)
    rank, world = dist.rank(), dist.world_size()
    data = training_data(cfg, head, cache_budget(d.cache_mb) // dist.local_world_size())  # a copy per rank
    aug = t.augment
    train_ds = SegmentationDataset(data.train, data.reader, head, train_transform(t.crop, aug), data.norm,
                                   crop=t.crop, scale_low=aug.scale[0] if aug.scale else 1.0, color=aug.color,
                                   seed=t.seed, foreground=data.foreground)
    val_ds = SegmentationDataset(data.val[rank::world], data.reader, head, eval_transform(), data.norm)
    units = list(dict.fromkeys(r.sample.scored_in for r in data.val))  # images: [None], pooled
    batch = max(1, t.batch_size // world)
    steps = t.steps_per_epoch or max(1, len(train_ds) // (batch * world))
    sampler = EpochSampler(len(train_ds), steps * batch, t.seed, rank, world)
    workers = loader_workers(t.workers, device)
    loader = DataLoader(EpochKeyed(train_ds), batch_size=batch, sampler=sampler, drop_last=True,
                        **loader_kwargs(workers, device))
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, head.channels, d.channels, cfg.model.encoder_weights,
                        cfg.model.encoder_weights_strict
                        ).to(device, memory_format=torch.channels_last)  # NHWC everywhere:
    if device.type == "cuda":  # measured ~30% faster per CPU step than NCHW (oneDNN), and cuDNN's fast path
        torch.backends.cudnn.benchmark = True
    loss_fn = head.loss(t.loss, t.class_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule.of(t, steps))
    meta = checkpoint_meta(head, cfg.model.arch, cfg.model.encoder, d.channels, data.norm, crop=t.crop,
                           data={"mask": d.mask, "ignore_index": d.ignore_index,
                                 "foreground_value": d.foreground_value, "binary_threshold": d.binary_threshold,
                                 "colors": d.colors, "bands": d.bands, "nodata": d.nodata,
                                 "val_fraction": d.val_fraction, "split_seed": cfg.split_seed(), "overlap": d.overlap,
                                 **data.meta}, **({"plan": cfg.plan_meta()} if cfg.plan else {}))
    return Run(cfg, head, device, dtype, data, train_ds, val_ds, units, batch, steps, sampler, workers, loader,
               model, loss_fn, optimizer, scheduler,
               torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), meta,
               Segmenter(model, head, meta, device, amp=t.amp))


def fresh_progress(t) -> Progress:
    """A new run's progress; `val_every: auto` is decided after the first validation."""
    return Progress(val_every=1 if t.val_every == "auto" else t.val_every, val_decided=t.val_every != "auto")


def resumed(run: Run, out: Path) -> Progress:
    """The progress last/ holds, its optimiser, schedule and random state loaded into `run`; checked against
    the config (a mid-epoch state needs the same epoch layout; a finished run needs more epochs)."""
    t = run.cfg.train
    state = resume_state(out / "last", run.model, run.optimizer, run.scheduler, run.scaler)
    run.scheduler.lr_lambdas[0] = Schedule.of(t, run.steps)  # this run's epochs, this process's clock
    p = fresh_progress(t)
    p.epoch, p.step, p.best, p.best_epoch, p.bad_epochs = (state["epoch"], state.get("step", 0), state["best"],
                                                          state["best_epoch"], state["bad_epochs"])
    if p.step > run.steps and state.get("layout") == run.layout:
        raise damaged(out / "last" / STATE, f"step {p.step} of an epoch of {run.steps}")
    if p.step and state.get("layout") != run.layout:
        raise ConfigError(f"{out}/last was written mid-epoch with {state.get('layout')}; resuming that epoch "
                          f"needs the same steps per epoch, batch size and processes, not {run.layout}. Fix: "
                          "resume with the run's train.steps_per_epoch, train.batch_size and --nproc.")
    if p.step:
        p.loss_sum, p.seen = state["loss_sum"], state["seen"]
    p.history = state["history"] if "history" in state else read_history(out / "metrics.csv")[:p.epoch]
    if t.val_every == "auto" and state.get("val_every"):
        p.val_every, p.val_decided = state["val_every"], True
    p.kept = f"last/ holds epoch {p.epoch + 1} step {p.step}" if p.step else f"last/ holds epoch {p.epoch}"
    if p.epoch >= t.epochs:
        raise SegkitError(f"{out}: already trained for {p.epoch} epochs (train.epochs = {t.epochs}). "
                          "Fix: raise --epochs to train further.")
    if dist.rank() == 0:
        log.info("resuming %s at epoch %d of %d after step %d of %d", out, p.epoch + 1, t.epochs, p.step, run.steps)
    return p


def train_step(run: Run, net: nn.Module, item) -> torch.Tensor:
    """One optimisation step on a loader batch; the loss stays on the device (no host-device sync)."""
    image, target = to_network(item, run.data.norm, run.head, run.device)
    image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
        logits = net(image)
    loss = run.loss_fn(logits.float(), target)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss.detach()


def _train(cfg: Config, out: Path, resume: bool, progress: bool, lock: RunLock, files: dict[str, bytes]
           ) -> TrainResult:
    started = time.perf_counter()
    device = run_device(cfg)
    t, main = cfg.train, dist.rank() == 0
    if main and out.is_dir():  # everything is checked before anything is written; a folder another run is
        lock.acquire()         # writing is refused first, for what it is
        if resume:
            for unit in ("last", "best"):
                recover_unit(out / unit)
    check_run_dir(out, cfg, resume)
    run = build_run(cfg, device)
    p = resumed(run, out) if resume else fresh_progress(t)
    start_epoch, start_step = p.epoch, p.step
    if main:
        _start(run, out, lock, resume, files)
    model = run.model
    if t.sync_batchnorm and dist.active():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = dist.wrap(model, run.device)
    net = compiled(model, torch.zeros(1, cfg.data.channels, t.crop, t.crop, device=run.device)) if t.compile \
        else model
    saver = Checkpointer(out) if main else None
    board = TensorBoardLog(out / "tensorboard") if main and t.tensorboard else None
    signals = StopSignals()
    interrupted: Interrupted | None = None
    stopped, images_seen, train_seconds = "completed", 0, 0.0
    tail = validation_seconds(run) if t.time_limit else 0.0  # the run's end, known before the first validation
    schedule: Schedule = run.scheduler.lr_lambdas[0]
    first_step: float | None = None  # when this process's first step ended: the schedule's clock starts there

    def deadline(writes: int = 1) -> float:
        """When the last step must end: train.time_limit less the run's end (its last validation, and the
        `writes` saves still to come, the last of which the run waits for: `Checkpointer.waiting`)."""
        return started + t.time_limit - tail - (saver.waiting(writes) if saver is not None else 0.0)

    def time_up(at_sync: bool) -> bool:
        """Whether only the run's end (the last validation and save: as long as the longest so far, at first a
        validation timed on a few samples) still fits train.time_limit; the schedule learns the share passed of
        the time from the first step to the deadline. Under DDP both are decided at the loss read-backs, where
        the ranks meet anyway, and agreed (every rank steps with the same learning rate)."""
        nonlocal first_step
        if not t.time_limit or (dist.active() and not at_sync):
            return False
        now, end = time.perf_counter(), deadline()
        first_step = now if first_step is None else first_step
        clock = 1.0 if end <= first_step else (now - first_step) / (end - first_step)
        late, clock = _agreed_clock(now > end, clock, run.device)
        schedule.tick(clock, run.scheduler.last_epoch)
        return late

    signals.install()
    try:
        for epoch in range(start_epoch, t.epochs):
            began = time.perf_counter()
            first = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:  # a resumed epoch goes on from the losses of the steps it had run
                p.loss_sum, p.seen = 0.0, 0
            model.train()
            interrupted, steps_run, out_of_time = _epoch(run, model, net, p, epoch, first, signals, saver, board,
                                                         progress, time_up)
            if interrupted is not None:
                break
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            seconds = time.perf_counter() - began
            if t.time_limit and not out_of_time and steps_run and epoch + 1 < t.epochs:
                # where this epoch's validation and save, a step, and the last validation and save would not all
                # fit (this epoch's write still in flight then: the run's end waits for both), this epoch's are
                # the run's last (not a second one a step later, past the limit)
                out_of_time = _agreed(time.perf_counter() + tail + seconds / steps_run > deadline(2), run.device)
            images = steps_run * run.batch * dist.world_size()
            images_seen, train_seconds = images_seen + images, train_seconds + seconds
            ending = time.perf_counter()
            early, stopping = _end_epoch(run, model, p, epoch, seconds, images, signals, saver, board, out_of_time)
            tail = max(tail, time.perf_counter() - ending)
            if stopping:
                interrupted = Interrupted(signals.signum or signal.SIGTERM, epoch + 1, run.steps, run.steps)
                break
            if early:
                stopped = "early stop"
                if main:
                    log.info("early stop: no better validation Dice for %d validations", p.bad_epochs)
                break
            if out_of_time and (epoch + 1 < t.epochs or first + steps_run < run.steps):
                stopped = "time limit"
                if main:
                    log.info("time limit: stopped after %d of %d steps of epoch %d, validated and saved; %.0f s of "
                             "train.time_limit %.0f s used", steps_run + first, run.steps, epoch + 1,
                             time.perf_counter() - started, t.time_limit)
                break
    finally:  # whatever stopped the loop: the loader's workers stop, a pending checkpoint write finishes (or
        # reports its error), the board closes, and only then are the signals handed back (a SIGTERM during the
        # last write is absorbed); each even where one before it fails. ExitStack calls them last-in, first-out.
        with ExitStack() as closing:
            closing.callback(signals.restore)
            if board is not None:
                closing.callback(board.close)
            if saver is not None:
                closing.callback(saver.close)
            closing.callback(stop_workers, run.loader)
    dist.barrier()
    if interrupted is not None:
        raise interrupted
    return TrainResult(out, len(p.history), p.best_epoch, p.best, images_seen / max(train_seconds, 1e-9), stopped)


def _start(run: Run, out: Path, lock: RunLock, resume: bool, files: dict[str, bytes]) -> None:
    """Rank 0: the run folder made and locked, config.yaml (and `files`: the plan) written, and what the run
    will do logged."""
    out.mkdir(parents=True, exist_ok=True)
    if not lock.tried:  # a new folder: lock it, then make sure no other run started in it meanwhile
        lock.acquire()
        check_run_dir(out, run.cfg, resume)
    write_bytes(out / "config.yaml", dump_config(run.cfg).encode())
    for name, data in files.items():
        write_bytes(out / name, data)
    log.info("%s head, classes %s; %d train / %d val images; device %s%s; %d steps/epoch of %d; "
             "%d loader workers", run.head.name, run.head.classes, len(run.train_ds), len(run.data.val), run.device,
             f" ({run.dtype})" if run.dtype else "", run.steps, run.batch * dist.world_size(), run.workers)
    log.info("input normalisation %s", run.data.norm.describe())
    if run.data.description != "images":
        log.info("volumes: %s", run.data.description)
    log.info("validation: %s", validation_rule(run.units))


def _agreed(flag: bool, device: torch.device) -> bool:
    """`flag` on this process or, under DDP, on any rank: every rank takes the same branch (one rank's clock or
    signal must not leave the others waiting in a collective)."""
    return _agreed_clock(flag, 0.0, device)[0]


def _agreed_clock(late: bool, share: float, device: torch.device) -> tuple[bool, float]:
    """`late` on any rank (as `_agreed`), and the largest `share` of the time passed: one decision and one
    learning rate for all of them. The largest, because rank 0's deadline is the earliest (it alone waits for the
    checkpoint writes): the rank that ends the run has reached the end of its schedule, so the last step's
    learning rate is the schedule's last on every rank."""
    if not dist.active():
        return late, share
    flag, most = dist.all_reduce_max([1.0 if late else 0.0, share], device)
    return flag > 0, most


def _stop_requested(signals: StopSignals, device: torch.device) -> bool:
    """A signal reached this process (or, under DDP, any rank: all ranks stop at the same step)."""
    return _agreed(bool(signals.signum), device)


def _epoch(run: Run, model: nn.Module, net: nn.Module, p: Progress, epoch: int, first: int, signals: StopSignals,
           saver: Checkpointer | None, board: TensorBoardLog | None, progress: bool,
           time_up: Callable[[bool], bool]) -> tuple[Interrupted | None, int, bool]:
    """The steps of one epoch from step `first`; losses are read back every log_every steps (the only
    host-device sync of a step), checked finite and summed into `p`. On a signal, last/ is written at the
    step reached and the `Interrupted` comes back; when `time_up` (asked every step, with whether it is a
    read-back) the epoch ends early. Returns the Interrupted (or None), the steps run, and whether time was up."""
    t, world = run.cfg.train, dist.world_size()
    run.sampler.set_epoch(epoch, skip=first * run.batch)
    losses = torch.zeros(t.log_every, device=run.device)
    bar = tqdm(total=run.steps, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
               disable=not (progress and dist.rank() == 0), leave=False, dynamic_ncols=True)
    began = time.perf_counter()
    unread, step = first % t.log_every, first - 1  # losses[unread:] are not read back yet
    try:
        for step, item in enumerate(run.loader, start=first):
            k = step % t.log_every
            losses[k] = train_step(run, net, item)
            at_sync = k == t.log_every - 1 or step == run.steps - 1
            late = time_up(at_sync)
            if not (at_sync or late or (signals.signum and not dist.active())):
                continue
            values = losses[unread:k + 1].tolist()
            bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise TrainingError(f"non-finite loss ({values[bad]}) at epoch {epoch + 1}, step "
                                    f"{step - k + unread + bad + 1}; stopped, {p.kept}. "
                                    "Fix: lower train.lr, or train.amp: false.")
            for v in values:  # one by one: the same float sum however the steps were read back
                p.loss_sum += v
            p.seen += len(values)
            unread = (k + 1) % t.log_every
            bar.update(len(values))
            bar.set_postfix(loss=f"{values[-1]:.4f}")
            if board is not None:
                board.steps(epoch * run.steps + step + 1, sum(values) / len(values),
                            run.optimizer.param_groups[0]["lr"],
                            (step + 1 - first) * run.batch * world / (time.perf_counter() - began))
            if _stop_requested(signals, run.device):
                p.epoch, p.step = epoch, step + 1
                if saver is not None:
                    saver.save(model, {**run.meta, "epoch": epoch, "step": step + 1}, False, True, p.state(run),
                               p.history, plot=False)
                return (Interrupted(signals.signum or signal.SIGTERM, epoch + 1, step + 1, run.steps), step + 1 - first,
                        False)
            if late:
                return None, step + 1 - first, True
    finally:
        bar.close()
    return None, step + 1 - first, False


def _end_epoch(run: Run, model: nn.Module, p: Progress, epoch: int, seconds: float, images: int,
               signals: StopSignals, saver: Checkpointer | None, board: TensorBoardLog | None, final: bool = False
               ) -> tuple[bool, bool]:
    """Validation (when due), the history row, best/ and last/, the epoch's log line; `final`: the run ends
    here (time limit), so it validates and saves as a last epoch does. Returns (early stop, stop for a
    signal that came during validation)."""
    t, main, world = run.cfg.train, saver is not None, dist.world_size()
    last_epoch = epoch + 1 == t.epochs or final
    validated = (epoch + 1) % p.val_every == 0 or last_epoch
    val_loss, dice, iou = math.nan, math.nan, math.nan
    per_class = {c: {"dice": math.nan, "iou": math.nan} for c in run.head.classes}  # same columns every row
    if validated:
        val_began = time.perf_counter()
        val_loss, counts = validate(run.seg, run.loss_fn, run.val_ds, run.units, run.batch)
        scores = summarize_units(counts, run.head.classes)
        dice, iou, per_class = scores["mean"]["dice"], scores["mean"]["iou"], scores["per_class"]
        if not p.val_decided:  # rank 0 decides, so every rank validates alike
            every = spaced_validation(time.perf_counter() - val_began, seconds, main) if main else 0
            p.val_every, p.val_decided = int(dist.all_reduce_sum([every], run.device)[0]), True
    train_loss = dist.all_reduce_sum([p.loss_sum / max(1, p.seen)], run.device)[0] / world
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
           "val_mean_dice": dice, "val_mean_iou": iou,
           **{f"dice_{c}": s["dice"] for c, s in per_class.items()},
           **{f"iou_{c}": s["iou"] for c, s in per_class.items()},
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}
    p.history.append(row)
    improved = validated and not math.isnan(dice) and dice > p.best
    if improved:
        p.best, p.best_epoch, p.bad_epochs = dice, epoch + 1, 0
    elif validated:
        p.bad_epochs += 1
    early = bool(t.early_stop_patience and p.bad_epochs >= t.early_stop_patience)
    stopping = not (last_epoch or early) and _stop_requested(signals, run.device)  # a signal during validation
    p.epoch, p.step = epoch + 1, 0
    if main:
        epoch_meta = {**run.meta, "epoch": epoch + 1, "val": {"mean_dice": dice, "mean_iou": iou}}
        last = (epoch + 1) % t.save_every == 0 or last_epoch or early or stopping
        saver.save(model, epoch_meta, improved, last, p.state(run) if last else None, p.history,
                   plot=last_epoch or early or stopping or (epoch + 1) % 5 == 0)
        p.kept = f"last/ holds epoch {epoch + 1}" if last else p.kept
        if board is not None:
            board.epoch(epoch + 1, row, val_pictures(run.seg, run.val_ds) if validated else [])
        shown = " ".join(f"{c}={s['dice']:.3f}" for c, s in per_class.items()) if validated else "not validated"
        log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mean Dice %.4f (%s)  %.1f img/s%s",
                 epoch + 1, t.epochs, train_loss, val_loss, dice, shown, images / max(seconds, 1e-9),
                 "  *best" if improved else "")
    return early, stopping
