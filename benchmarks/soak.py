"""Soak: does memory grow with the number of images predicted or epochs trained?

`segkit predict` on 5000 small images (64x64 crops of the embedded nuclei data, made once) and
`segkit train` for 50 short epochs (2 steps each, validation every epoch, best/ on every improvement,
last/ every 5 epochs) run as a user runs them, the CLI in a child process, watched from outside:
resident memory (RSS, psutil if installed, else /proc/PID/status VmRSS) of the command, and of its
loader workers, every 0.1 s (predict) or 0.02 s (train), with the count of masks written or the
epoch running.

Reported: RSS after 1000 and after 5000 images, at epochs 10 and 50. Predict's growth compares
medians of the main process's RSS (images 900-1000 against the last 100): a batch allocates and frees
tens of MB within a second, which one sample would catch at random, while a leak moves the median.
The loader workers are reported apart: they exit before the last masks are written.

Train's growth compares the lowest RSS (sampled every 0.02 s) while epochs 11-15 ran with the lowest
while the last five ran: a leak raises the lowest RSS of every epoch. Not epochs 6-10: memory still
settles over the first ten epochs (~30 MiB; ~15 of them matplotlib loading its fonts for the first
curves.png, at epoch 5). Not RSS at the epoch lines: a line is printed just after the checkpoint's
CPU copy of the weights (and, for last/, the optimizer state) goes to the writer thread, so it holds,
or not, up to ~450 MiB of a write in flight (resnet18: the copies and their serialised bytes),
depending on how far the writer got. And last/ every 5 epochs, not every epoch: an epoch here takes
about a second on an idle machine, less than writing and syncing last/ and best/ (~230 MB), so one
write followed another and no moment of an epoch was free of one, or some were, at random (two runs
of the same code: -139 and +3 MiB). Target: growth <= 8 MiB each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import EMBEDDED, ROOT, checkpoint, write_result

TARGET_GROWTH_MIB = 8.0
SIZE = 64
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)")


def rss_mib(pid: int) -> float:
    """Resident memory of one process (0 once it has gone)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess: it has just exited
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (DataLoader workers), from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def sample(pid: int) -> tuple[float, float]:
    """(RSS of the process, RSS of it and all its descendants), MiB."""
    own = rss_mib(pid)
    return own, own + sum(rss_mib(k) for k in descendants(pid))


def small_images(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` 64x64 PNG crops at seeded random places of the embedded real nuclei images (made once)."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(EMBEDDED.glob("*/images/*.png"))]
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - SIZE + 1), rng.integers(0, src.shape[1] - SIZE + 1)
        Image.fromarray(src[y:y + SIZE, x:x + SIZE]).save(folder / f"crop{i:05d}.png")
    return folder


def _median(rows: list[dict], key: str, lo: float, hi: float, what: str = "rss_mib") -> float:
    picked = [r[what] for r in rows if lo <= r[key] <= hi]
    return float(np.median(picked)) if picked else float("nan")


def _lowest(samples: list[tuple[int, float]], first: int, last: int) -> float:
    """The lowest RSS sampled while epochs `first` to `last` ran."""
    picked = [rss for epoch, rss in samples if first <= epoch <= last]
    return min(picked) if picked else float("nan")


def _nearest(rows: list[dict], key: str, at: float) -> dict:
    return min(rows, key=lambda r: (abs(r[key] - at), -r[key]))


def soak_predict(out: Path, n: int, device: str, workers: int) -> dict:
    images = small_images(out / "soak-in", n)
    ckpt = checkpoint(out / "soak-ckpt", ["nucleus"], head="sigmoid", encoder="resnet18")
    masks = out / "soak-masks"
    shutil.rmtree(masks, ignore_errors=True)
    cmd = [sys.executable, "-m", "cli", "predict", str(ckpt), str(images), str(masks), "--device", device,
           "--workers", str(workers), "--no-progress"]
    began = time.perf_counter()
    log = (out / "soak-predict.log").open("w")
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    while child.poll() is None:
        written = sum(1 for e in os.scandir(masks / "nucleus") if not e.name.startswith(".")) \
            if (masks / "nucleus").is_dir() else 0
        own, tree = sample(child.pid)
        if own:
            rows.append({"seconds": time.perf_counter() - began, "images": written, "rss_mib": own,
                         "workers_mib": tree - own})
        time.sleep(0.1)
    log.close()
    if child.returncode != 0:
        raise SystemExit(f"segkit predict failed ({child.returncode}); see {out / 'soak-predict.log'}")
    last = max(r["images"] for r in rows)
    at_1000, at_end = _nearest(rows, "images", 1000), _nearest(rows, "images", last)
    growth = _median(rows, "images", last - 100, last) - _median(rows, "images", 900, 1000)
    with_workers = [r for r in rows if r["workers_mib"] > 0]
    workers_last = max(r["images"] for r in with_workers) if with_workers else 0
    workers_growth = (_median(with_workers, "images", workers_last - 100, workers_last, "workers_mib")
                      - _median(with_workers, "images", 900, 1000, "workers_mib"))
    return {"images": n, "size": SIZE, "workers": workers, "seconds": time.perf_counter() - began,
            "last_sampled_images": last, "rss_after_1000_mib": at_1000["rss_mib"],
            "rss_after_last_mib": at_end["rss_mib"], "growth_mib": growth,
            "workers_rss_after_1000_mib": at_1000["workers_mib"], "workers_last_sampled_images": workers_last,
            "workers_growth_mib": workers_growth, "peak_mib": max(r["rss_mib"] for r in rows),
            "meets_target": growth <= TARGET_GROWTH_MIB and not workers_growth > TARGET_GROWTH_MIB,
            "samples": rows[::10]}


def soak_train(out: Path, epochs: int, device: str) -> dict:
    run = out / "soak-train"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "cli", "train", str(ROOT / "configs" / "nuclei-sigmoid.yaml"), "--out", str(run),
           "--epochs", str(epochs), "--device", device, "--no-progress", "--set", f"data.root={EMBEDDED}",
           "--set", "train.steps_per_epoch=2", "--set", "train.crop=64", "--set", "train.batch_size=2",
           "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set", "train.val_every=1",
           "--set", "train.save_every=5"]
    began = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows, samples, lines, running = [], [], [], 1  # running: the epoch whose line has not come yet

    def watch() -> None:
        while child.poll() is None:
            epoch, rss = running, rss_mib(child.pid)
            if rss:
                samples.append((epoch, rss))
            time.sleep(0.02)  # an epoch takes about a second: its quiet moments are short

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert child.stdout is not None
    for line in child.stdout:
        lines.append(line)
        hit = EPOCH_LINE.match(line)
        if hit:
            rows.append({"epoch": int(hit.group(1)), "seconds": time.perf_counter() - began,
                         "rss_mib": rss_mib(child.pid)})
            running = int(hit.group(1)) + 1
    child.wait()
    watcher.join()
    (out / "soak-train.log").write_text("".join(lines))
    if child.returncode != 0 or not rows or rows[-1]["epoch"] != epochs:
        raise SystemExit(f"segkit train failed ({child.returncode}); see {out / 'soak-train.log'}")
    for row in rows:
        row["lowest_mib"] = _lowest(samples, row["epoch"], row["epoch"])
    early = min(11, max(1, epochs - 9))  # epochs 11-15 of 50; the first five and the last five of 10
    growth = _lowest(samples, epochs - 4, epochs) - _lowest(samples, early, early + 4)
    return {"epochs": epochs, "seconds": time.perf_counter() - began,
            "rss_epoch_10_mib": _nearest(rows, "epoch", 10)["rss_mib"], "rss_epoch_last_mib": rows[-1]["rss_mib"],
            "early_epochs": [early, early + 4], "lowest_early_mib": _lowest(samples, early, early + 4),
            "lowest_late_mib": _lowest(samples, epochs - 4, epochs), "growth_mib": growth,
            "line_median_growth_mib": (_median(rows, "epoch", epochs - 4, epochs)
                                       - _median(rows, "epoch", early, early + 4)),
            "peak_mib": max(rss for _, rss in samples), "meets_target": growth <= TARGET_GROWTH_MIB,
            "per_epoch": rows}


def run(out: Path, device: str = "auto", images: int = 5000, epochs: int = 50, workers: int = 2,
        only: tuple[str, ...] = ("predict", "train")) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "soak", "device": device, "target_growth_mib": TARGET_GROWTH_MIB}
    if "predict" in only:
        result["predict"] = soak_predict(out, images, device, workers)
    if "train" in only:
        result["train"] = soak_train(out, epochs, device)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--workers", type=int, default=2, help="predict's loader processes (its default)")
    p.add_argument("--only", default="predict,train", help="predict, train or both")
    a = p.parse_args()
    write_result(a.out.resolve(), "soak", run(a.out.resolve(), a.device, a.images, a.epochs, a.workers,
                                              tuple(a.only.split(","))))


if __name__ == "__main__":
    main()
