"""Shared by the tests: run the CLI in-process, copy small real subsets, tiny training settings."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
NUCLEI = ROOT / "data" / "nuclei"
CONFIGS = ROOT / "configs"

TINY = ["--device", "cpu", "--no-progress", "--set", "train.steps_per_epoch=2", "--set", "train.crop=64",
        "--set", "train.batch_size=2", "--set", "train.workers=0", "--set", "model.encoder=resnet18"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str) -> Result:
    """`segkit ARGS` in this process; exit code and captured output."""
    from cli.app import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def copy_subset(src: Path, dst: Path, n: int, split_from: str = "train", split_to: str = "train") -> Path:
    """The first `n` image/mask pairs of data/nuclei-like `src/<split>/{images,masks}` into `dst`."""
    for kind in ("images", "masks"):
        (dst / split_to / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / split_from / kind).iterdir())[:n]:
            shutil.copy(path, dst / split_to / kind / path.name)
    return dst


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


sys.path.insert(0, str(ROOT))
