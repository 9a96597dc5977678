"""Does a fourth band help? The same training budget on 4 bands and on RGB only.

The dataset is built from real CamVid street scenes (`--root`, layout images/<split>,
masks/<split>): each RGB image becomes a 4-band uint8 LZW TIFF whose fourth band is the
excess-green index 2G - R - B (rescaled to 0..255), the vegetation proxy drone and aerial
workflows use where no near-infrared band exists. Band 4 is derived from RGB, so this
measures what segkit's N-band path does with an extra input, not the value of real NIR.
Both runs share seed, split, crops, schedule and budget; the RGB run selects
`data.bands: [1, 2, 3]` from the same files.

    python -m benchmarks.bands --root DATASETS/camvid --steps 160
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from benchmarks.common import write_result
from segkit.config import parse_config
from segkit.train import train

CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]


def excess_green(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[:, :, i].astype(np.int32) for i in range(3))
    return ((2 * g - r - b + 510) * 255 // 1020).astype(np.uint8)


def build(src: Path, dst: Path) -> Path:
    for split in ("train", "val"):
        (dst / split / "images").mkdir(parents=True, exist_ok=True)
        (dst / split / "masks").mkdir(parents=True, exist_ok=True)
        for path in sorted((src / "images" / split).iterdir()):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            four = np.concatenate([rgb, excess_green(rgb)[:, :, None]], axis=2)
            tifffile.imwrite(dst / split / "images" / f"{path.stem}.tif", four, photometric="rgb",
                             extrasamples=["unspecified"], compression="lzw")
            (dst / split / "masks" / path.name).write_bytes((src / "masks" / split / path.name).read_bytes())
    return dst


def run(root: Path, out: Path, steps: int, crop: int, seed: int, device: str) -> dict:
    data = build(root, out / "camvid-4band")
    results = {}
    for name, bands in (("rgb+exg", [1, 2, 3, 4]), ("rgb", [1, 2, 3])):
        cfg = parse_config({
            "data": {"root": str(data), "classes": CLASSES, "mask": "index", "ignore_index": 11, "bands": bands},
            "model": {"arch": "Unet", "encoder": "resnet18", "head": "softmax"},
            "train": {"epochs": 4, "steps_per_epoch": steps // 4, "batch_size": 8, "crop": crop, "lr": 0.002,
                      "loss": "ce+dice", "seed": seed, "device": device, "workers": 1},
        })
        began = time.perf_counter()
        result = train(cfg, out / f"bands-{name}", progress=False)
        results[name] = {"bands": bands, "best_val_mean_dice": result.best_dice, "best_epoch": result.best_epoch,
                         "seconds": time.perf_counter() - began}
    return {"benchmark": "4 bands vs RGB", "steps": steps, "crop": crop, "seed": seed, **results,
            "difference": results["rgb+exg"]["best_val_mean_dice"] - results["rgb"]["best_val_mean_dice"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="CamVid: images/<split>, masks/<split>")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    write_result(a.out, "bands", run(a.root, a.out, a.steps, a.crop, a.seed, a.device))


if __name__ == "__main__":
    main()
