"""A training run's files: best/ and last/ written off the training thread as units, the training state
(optimizer, scheduler, step, random generators, history) and its checked reading for --resume, metrics.csv,
and the run folder's checks."""

from __future__ import annotations

import csv
import ctypes
import io
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segkit.config import Config
from segkit.data.io import write_bytes
from segkit.errors import ConfigError, SegkitError, TrainingError
from segkit.model import checkpoint_files, load_weights, unwrap, write_unit
from segkit.run_control import LOCK
from segkit.viz import plot_curves

STATE = "train_state.pt"
STATE_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best", "best_epoch", "bad_epochs")
"""What every train_state.pt holds (later versions add step, RNG states and the history)."""


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


class Checkpointer:
    """Writes checkpoints off the training thread: the state is copied to the CPU at once (so
    training can go on changing the live tensors), then written by one background thread; at
    most one write is in flight, and `wait` surfaces its errors. best/ and last/ are each written
    as a unit (`write_unit`): weights, model.json and (last/) train_state.pt change together."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None
        self.seconds = 0.0
        """The longest save so far: the state's copy, best/ and last/ synced, metrics.csv and curves.png."""
        self.began = 0.0

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
        self.began = began = time.perf_counter()
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
            write_history(self.out / "metrics.csv", rows)
            if plot:
                plot_curves(rows, self.out / "curves.png")
            release_free_memory()
            self.seconds = max(self.seconds, time.perf_counter() - began)

        self.pending = self.pool.submit(write)

    def waiting(self, writes: int = 1) -> float:
        """How long `writes` saves issued from now on would keep the run waiting: what is left of the write in
        flight, then theirs, each as long as the longest so far (or as the one in flight has taken already). A
        timed run's end must fit its limit; before its first write is done, this knows only the time that
        write has taken."""
        if self.pending is None or self.pending.done():
            return writes * self.seconds
        ran = time.perf_counter() - self.began
        longest = max(self.seconds, ran)
        return longest - ran + writes * longest

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


def damaged(path: Path, why: str) -> SegkitError:
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
        raise damaged(path, why) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise damaged(path, f"no {', '.join(missing)}")
    counts = [k for k in ("epoch", "step", "best_epoch", "bad_epochs", "seen")
              if k in state and not (isinstance(state[k], int) and state[k] >= 0)]
    numbers = [k for k in ("best", "loss_sum") if k in state and not isinstance(state[k], (int, float))]
    lists = [k for k in ("history",)
             if k in state and not (isinstance(state[k], list) and all(isinstance(r, dict) for r in state[k]))]
    if counts or numbers or lists:
        raise damaged(path, f"{', '.join(counts + numbers + lists)} of the wrong kind")
    return state


def write_history(path: Path, history: list[dict]) -> None:
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


def check_run_dir(out: Path, cfg: Config, resume: bool) -> None:
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


def resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> dict:
    """Load last/ (`path`) into the live objects and the global random generators; returns the
    training state. Anything that does not fit is a damaged or foreign file, named in a SegkitError."""
    state = read_train_state(path / STATE)
    weights = load_weights(path / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise damaged(path / "model.safetensors", "its tensors do not fit the model of config.yaml") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise damaged(path / STATE, f"{type(err).__name__} in its optimizer, scheduler or random state") from None
    return state
