"""What the benchmarks have in common: real images at a fixed size, a random-weight checkpoint, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from segkit.data.io import read_image, write_png
from segkit.heads import build_head
from segkit.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "nuclei"


def real_images(n: int, size: int) -> list[np.ndarray]:
    """`n` real microscopy images of the embedded data (data/nuclei) resized to size x size (repeating
    the set when n is larger): `make bench` needs nothing outside the project."""
    files = sorted(EMBEDDED.glob("*/images/*.png"))
    if not files:
        raise SystemExit(f"{EMBEDDED}: no images; the embedded data is part of the repository")
    return [cv2.resize(read_image(files[i % len(files)], 3), (size, size), interpolation=cv2.INTER_AREA)
            for i in range(n)]


def image_folder(folder: Path, n: int, size: int) -> Path:
    """A folder of `n` real images at size x size, made once and reused."""
    if len(list(folder.glob("*.png"))) != n:
        for i, image in enumerate(real_images(n, size)):
            write_png(folder / f"img{i:04d}.png", image)
    return folder


def checkpoint(folder: Path, classes: list[str], head: str = "softmax", encoder: str = "resnet34") -> Path:
    """A random-weight U-Net checkpoint: speed and memory do not depend on the weights' values."""
    torch.manual_seed(0)
    h = build_head(head, classes)
    model = build_model("Unet", encoder, h.channels)
    save_checkpoint(folder, model, checkpoint_meta(h, "Unet", encoder, 3, Normalization.unit(IMAGENET_MEAN, IMAGENET_STD),
                                                   data={"mask": "index"}))
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_result(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
