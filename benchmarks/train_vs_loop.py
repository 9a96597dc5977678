"""`segkit train` against a minimal smp loop (benchmarks/minimal_loop.py) doing the same steps.

Both are whole processes timed by wall clock: start-up, data loading, N optimizer steps of
resnet18 at batch 8, crop 256, the same augmentation and schedule, validation and checkpoints.
segkit runs with its defaults (validation cadence, background checkpoints, loader workers);
the loop validates once at the end. Targets: segkit's wall time <= 1.15x the loop's, and a
validation Dice at least the loop's (the same data, one seed: a rough check, not a study).

    python -m benchmarks.train_vs_loop                                   # embedded data/nuclei
    python -m benchmarks.train_vs_loop --root DATASETS/camvid --config configs/camvid.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, write_result
from segkit.config import load_config
from segkit.data.splits import train_val_samples
from segkit.train import Schedule


def run(root: Path, config: Path, out: Path, steps: int = 300, epochs: int = 6) -> dict:
    cfg = load_config(config, [f"data.root={root}"])
    d = cfg.data
    train, val = train_val_samples(d, 0)
    pairs = {"train": [[str(s.image), str(s.mask)] for s in train], "val": [[str(s.image), str(s.mask)] for s in val]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps(pairs))
    per_epoch = math.ceil(steps / epochs)
    warmup = Schedule.of(cfg.train.model_copy(update={"epochs": epochs}), per_epoch).warmup  # segkit's
    common = {"batch_size": 8, "crop": 256, "lr": 0.001}
    run_dir = out / "segkit-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "cli", "train", str(config), "--out", str(run_dir), "--epochs", str(epochs),
           "--no-progress", "--device", "cpu", "--set", f"data.root={root}", "--set", "model.encoder=resnet18",
           "--set", f"train.steps_per_epoch={per_epoch}", *sum((["--set", f"train.{k}={v}"] for k, v in common.items()), [])]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    segkit_s = time.perf_counter() - began
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    segkit_dice = float(rows[-1]["val_mean_dice"])
    classes = 1 if cfg.model.head == "sigmoid" and len(d.classes) == 1 else len(d.classes)
    loop = [sys.executable, "-m", "benchmarks.minimal_loop", "--pairs", str(out / "pairs.json"),
            "--classes", str(classes), "--steps", str(per_epoch * epochs), "--encoder", "resnet18",
            "--batch-size", "8", "--crop", "256", "--lr", "0.001", "--warmup", str(warmup), "--out", str(out / "loop.pt")]
    if d.ignore_index is not None:
        loop += ["--ignore", str(d.ignore_index)]
    began = time.perf_counter()
    done = subprocess.run(loop, check=True, cwd=ROOT, capture_output=True, text=True)
    loop_s = time.perf_counter() - began
    loop_dice = json.loads(done.stdout.strip().splitlines()[-1])["val_mean_dice"]
    return {"benchmark": "segkit train vs minimal loop", "root": str(root), "steps": per_epoch * epochs,
            "epochs": epochs, "segkit_seconds": segkit_s, "loop_seconds": loop_s, "ratio": segkit_s / loop_s,
            "target_ratio": 1.15, "segkit_val_dice": segkit_dice, "loop_val_dice": loop_dice,
            "validated_epochs": sum(not math.isnan(float(r["val_mean_dice"])) for r in rows),
            "meets_target": segkit_s / loop_s <= 1.15 and segkit_dice >= loop_dice}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "data" / "nuclei")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "nuclei-sigmoid.yaml")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    write_result(a.out, f"train_vs_loop_{a.root.name}", run(a.root.resolve(), a.config.resolve(),
                                                             a.out.resolve(), a.steps))


if __name__ == "__main__":
    main()
