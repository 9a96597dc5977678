"""The training loop: one readable function, `train`, and the few pieces it calls.

AMP (bf16 where the GPU supports it, else fp16 with a scaler) and channels_last (NHWC) on every device;
DDP when launched by torchrun; `best/` and `last/` checkpoints; resume; early stopping.
"""

from __future__ import annotations

import csv
import ctypes
import io
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
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
from segkit.infer import Segmenter, batches_by_shape
from segkit.metrics import summarize_units, validation_rule
from segkit.model import build_model, checkpoint_files, checkpoint_meta, load_weights, recover_unit, unwrap, write_unit
from segkit.tensorboard import TensorBoardLog
from segkit.viz import overlay_picture, plot_curves

try:
    import fcntl
except ImportError:  # Windows: no flock, so no run lock (said when training starts)
    fcntl = None

log = logging.getLogger("segkit")

STATE = "train_state.pt"
LOCK = ".train.lock"
STATE_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best", "best_epoch", "bad_epochs")
"""What every train_state.pt holds (later versions add step, RNG states and the history)."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_dice: float
    images_per_s: float
    stopped: str  # "completed", "early stop"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after the current step; last/ holds the state to resume.

    A KeyboardInterrupt, so that callers training several runs (compare) stop too rather than go on.
    `epoch` (1-based) and `step` say where: `step` steps of `epoch` were done, out of `steps`.
    """

    def __init__(self, signum: int, epoch: int, step: int, steps: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {step}/{steps}")
        self.signum, self.epoch, self.step, self.steps = signum, epoch, step, steps

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (143, 130)."""
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM and SIGINT ask the training loop to stop after its current step instead
    of killing it. After the first, a Ctrl-C (SIGINT) interrupts at once, while further SIGTERMs are
    absorbed: launchers and schedulers often send one to every process and another through torchrun,
    and the grace period ends with SIGKILL anyway. Signals can only be caught on the main thread;
    elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        first, self.signum = not self.signum, self.signum or signum
        signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
        if first:
            log.warning("%s: finishing the current step, then writing last/ (Ctrl-C to stop at once)",
                        signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLock:
    """One writer per run folder: an exclusive flock on RUN/.train.lock, which holds the writer's pid
    and host for the message another run gets. The OS releases a flock when its process dies, so a
    killed run never leaves the folder locked; a stale lock file is simply locked again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, folder / LOCK
        self.fd: int | None = None
        self.tried = False

    def acquire(self) -> None:
        """Lock the (existing) folder, once; a SegkitError naming the folder, the holder and the lock
        file if another process holds it."""
        if self.tried:
            return
        self.tried = True
        if fcntl is None:
            log.warning("%s: no file locks on this system; nothing stops a second training into this folder",
                        self.folder)
            return
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.path.read_text().strip() if self.path.is_file() else ""
                raise SegkitError(f"{self.folder}: another training is writing this run folder "
                                  f"({holder or 'process unknown'}; lock file {self.path}). Fix: wait for it "
                                  "to finish or stop it, or train into another --out.") from None
            except OSError as err:  # a file system without locks: train, but say what is not guarded
                os.close(fd)
                log.warning("%s: cannot lock (%s); nothing stops a second training into this folder",
                            self.path, err.strerror)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
            os.close(self.fd)
            self.fd = None


class EpochSampler(Sampler):
    """Yields (epoch, index): a seeded permutation per epoch, cut into this rank's share.

    The epoch travels with each index so that persistent workers augment by epoch, and
    `num_samples` can exceed the dataset (tiny datasets, fixed steps per epoch). `skip` leaves out
    the first samples of this rank's share: a run resumed mid-epoch sees the rest of the same order.
    """

    def __init__(self, n: int, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.num_samples, self.seed, self.rank, self.world = n, num_samples, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        total = self.num_samples * self.world
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(total / self.n))])[:total]
        return iter([(self.epoch, int(i)) for i in order[self.rank::self.world][self.skip:]])

    def __len__(self) -> int:
        return self.num_samples - self.skip


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


def _survive_once(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _init_worker(_: int) -> None:
    """Data workers decode and augment one sample at a time; OpenCV's own thread pool in every
    worker would only compete with the model for the cores.

    Schedulers (SIGTERM) and Ctrl-C (SIGINT) signal every process of a job; a worker killed by it
    would make the loader raise in the main process before it could stop in order and write last/.
    So workers ignore SIGINT and survive one SIGTERM; `_stop_workers` ends them, and a second
    SIGTERM (multiprocessing's terminate) still does."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _survive_once)


def _stop_workers(loader: DataLoader) -> None:
    """End a loader's persistent workers now, whatever stopped training: left to interpreter exit,
    they would be sent one SIGTERM, which they survive (see `_init_worker`)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def loader_workers(workers: int | str, device: torch.device) -> int:
    """`auto`: no worker processes on CPU, where a sample costs ~2 ms against a step of a second and
    workers only take cores from the model; this rank's share of the cores - 1 (at most 8) feeding a GPU."""
    if workers != "auto":
        return int(workers)
    cores = (os.cpu_count() or 2) // dist.local_world_size()  # ranks on one node share its cores
    return min(8, max(1, cores - 1)) if device.type == "cuda" else 0


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            **({"prefetch_factor": 4, "worker_init_fn": _init_worker} if workers > 0 else {})}


_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    Called once a checkpoint is written: its CPU copy of the weights and optimizer state and their
    serialised bytes (~450 MiB for resnet18) were just freed, validation's activations at full image
    size before them. glibc gives pages back only from the top of its heap, so whether those left the
    process depended on what happened to lie above them: resident memory between epochs moved by
    ~150 MiB from one run to the next, and stayed. A trim costs ~20 ms, on the writer thread."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero, per optimizer step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@torch.inference_mode()
def validate(seg: Segmenter, loss_fn: nn.Module, dataset: SegmentationDataset, units: Sequence[str | None],
             batch_size: int = 8) -> tuple[float, dict[str | None, np.ndarray]]:
    """Valid-pixel-weighted mean loss and (C, 4) pixel counts per scoring unit (`units`: every
    `Sample.scored_in` of the whole validation set, the same list on every rank) over this rank's
    validation images, each at full size through the Segmenter's own path: same-size images share a
    forward pass, images larger than its tile go through windows. Counts stay on the device; one
    transfer at the end."""
    head, device = seg.head, seg.device
    seg.model.eval()
    unit_index = {u: i for i, u in enumerate(units)}
    counts = torch.zeros(len(units), head.channels, 4, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels = torch.zeros((), dtype=torch.int64, device=device)

    def score(logits: torch.Tensor, target: torch.Tensor, unit: Sequence[int]) -> None:
        nonlocal loss_sum, pixels
        n = head.target_multihot(target)[1].sum()  # ignored and padding pixels carry no loss
        loss_sum += loss_fn(logits.float(), target).double() * n
        pixels += n
        masks = head.decode(logits)
        if len(set(unit)) == 1:  # images (one pooled unit), or slices of one case: one count for the batch
            counts[unit[0]] += head.stats(masks, target)
            return
        for i, u in enumerate(unit):
            counts[u] += head.stats(masks[i:i + 1], target[i:i + 1])

    def items():
        for r in dataset.records:
            px = dataset.pixels(r, None)
            yield ((head.targets(px.labels, px.valid), unit_index[r.sample.scored_in]),
                   ImageSource.from_array(px.image, seg.in_channels, px.nodata, str(r.sample.image)))

    for batch in batches_by_shape(items(), batch_size, seg.fits):
        if len(batch) == 1 and not seg.fits(batch[0][1]):
            (target, unit), src = batch[0]
            for top, rows in seg.rows(src):
                score(rows[None], target[..., top:top + rows.shape[1], :].to(device)[None], [unit])
            continue
        logits = seg.forward(seg.to_input([src for _, src in batch]))
        score(logits, torch.stack([t for (t, _), _ in batch]).to(device), [u for (_, u), _ in batch])
    loss_total, pixels = dist.all_reduce_sum([float(loss_sum), int(pixels)], device)
    counts = dist.all_reduce_tensor(counts.cpu(), device).numpy()
    return loss_total / max(1, pixels), dict(zip(units, counts))


class Checkpointer:
    """Writes checkpoints off the training thread: the state is copied to the CPU at once (so
    training can go on changing the live tensors), then written by one background thread; at
    most one write is in flight, and `wait` surfaces its errors. best/ and last/ are each written
    as a unit (`write_unit`): weights, model.json and (last/) train_state.pt change together."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None

    def wait(self) -> None:
        """The write in flight is done. One that failed (disk full, permissions) stops training: every
        folder and file is replaced only when complete, so the previous best/ and last/ are intact."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                pending.result()
            except OSError as err:
                raise TrainingError(f"cannot write checkpoints into {self.out} ({err.strerror or err}); the "
                                    "previous best/ and last/ are intact. Fix: free disk space or fix the "
                                    "permissions, then continue with --resume (or start again if there is no "
                                    "last/ yet).") from None

    def save(self, model: nn.Module, meta: dict, best: bool, last: bool, state: dict | None,
             history: list[dict], plot: bool) -> None:
        self.wait()
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}
        state = _to_cpu(state) if state is not None else None
        rows = [dict(r) for r in history]

        def write() -> None:
            nonlocal weights, state
            files = checkpoint_files(weights, meta)
            if best:
                write_unit(self.out / "best", files)
            if last:
                buf = io.BytesIO()
                torch.save(state, buf)
                write_unit(self.out / "last", {**files, STATE: buf.getvalue()})
                del buf
            weights = state = files = None  # freed now, for the trim below, not when the pool drops this job
            _write_csv(self.out / "metrics.csv", rows)
            if plot:
                plot_curves(rows, self.out / "curves.png")
            release_free_memory()

        self.pending = self.pool.submit(write)

    def close(self) -> None:
        try:
            self.wait()
        finally:
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


def rng_state() -> dict:
    """Every global random generator's state, in types `torch.load(weights_only=True)` reads back.
    segkit's own randomness is seeded by (seed, epoch, index); these cover any other user of the
    global generators (a custom model's dropout, a library's augmentation)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; CUDA generators only where there are as many devices as when saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _damaged(path: Path, why: str) -> SegkitError:
    return SegkitError(f"{path}: not a segkit checkpoint, or damaged ({why}). Fix: resume from an intact copy "
                       f"of {path.parent}, or train again without --resume into a new --out.")


def read_train_state(path: Path) -> dict:
    """last/train_state.pt, read with `weights_only=True` (tensors, numbers and containers only:
    nothing in the file is run); damaged, truncated or crafted files are a SegkitError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise SegkitError(f"{path}: permission denied. Fix: make the file readable for this user.") from None
    except Exception as err:  # torch raises pickle, zip, EOF, runtime or value errors; none ran any code
        why = ("it holds objects a training state never holds; they were not loaded"
               if "weights only" in str(err).lower() else f"unreadable: {type(err).__name__}")
        raise _damaged(path, why) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise _damaged(path, f"no {', '.join(missing)}")
    counts = [k for k in ("epoch", "step", "best_epoch", "bad_epochs", "seen")
              if k in state and not (isinstance(state[k], int) and state[k] >= 0)]
    numbers = [k for k in ("best", "loss_sum") if k in state and not isinstance(state[k], (int, float))]
    lists = [k for k in ("history",)
             if k in state and not (isinstance(state[k], list) and all(isinstance(r, dict) for r in state[k]))]
    if counts or numbers or lists:
        raise _damaged(path, f"{', '.join(counts + numbers + lists)} of the wrong kind")
    return state


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
        if out.exists() and any(p.name != LOCK for p in out.iterdir()):
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
    """Train the model `cfg` describes into the run folder `out` (see README for its files).

    Rank 0 holds the run folder's lock (`RunLock`) from start to end. SIGTERM/SIGINT stop after
    the current step with last/ written, and raise `Interrupted` saying where.
    """
    lock = RunLock(Path(out))
    try:
        return _train(cfg, Path(out), resume, progress, lock)
    finally:
        lock.release()


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> dict:
    """Load last/ (`path`) into the live objects and the global random generators; returns the
    training state. Anything that does not fit is a damaged or foreign file, named in a SegkitError."""
    state = read_train_state(path / STATE)
    weights = load_weights(path / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise _damaged(path / "model.safetensors", "its tensors do not fit the model of config.yaml") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(path / STATE, f"{type(err).__name__} in its optimizer, scheduler or random state") from None
    return state


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
    _check_run_dir(out, cfg, resume)
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
    train_loader = DataLoader(_EpochKeyed(train_ds), batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                              **_loader_kwargs(workers, device))

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
        state = _resume(out / "last", model, optimizer, scheduler, scaler)
        scheduler.lr_lambdas[0] = lr_lambda(t.epochs * steps, min(steps, 100))
        start_epoch, best, best_epoch, bad_epochs = (state["epoch"], state["best"], state["best_epoch"],
                                                     state["bad_epochs"])
        start_step = state.get("step", 0)
        if start_step > steps and state.get("layout") == layout:
            raise _damaged(out / "last" / STATE, f"step {start_step} of an epoch of {steps}")
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
            _check_run_dir(out, cfg, resume)
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
        _stop_workers(train_loader)
        if saver is not None:
            saver.close()
        if board is not None:
            board.close()
    dist.barrier()
    if interrupted is not None:
        raise interrupted
    return TrainResult(out, len(history), best_epoch, best, images_seen / max(train_seconds, 1e-9), stopped)
