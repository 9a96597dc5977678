"""Peak memory and time of predicting one huge in-memory RGB image (made by tiling real images)
with a 4-class softmax model and 512 tiles. Target: peak RSS <= image + mask + 1 GiB above the
process's footprint once torch and the model are loaded, before any forward pass: the 1 GiB
covers one batch of activations and the band buffers, which do not grow with the image.

Run one size per process (`--size`), so the peak belongs to that image alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import checkpoint, machine, real_images, write_result
from benchmarks.huge_raster import own_peak_rss_mib as peak_rss_mib  # this process's own peak (VmHWM)
from segkit import Segmenter


def run(out: Path, size: int, device: str = "auto", tile: int = 512, overlap: int = 64,
        encoder: str = "resnet18", batch_size: int = 4) -> dict:
    seg = Segmenter.load(checkpoint(out / f"huge-ckpt-{encoder}", ["background", "a", "b", "c"], encoder=encoder),
                         device=device, tile=tile, overlap=overlap, batch_size=batch_size)
    pieces = real_images(16, 512)
    base = peak_rss_mib()  # before any forward: the activations of a batch count against the target
    image = np.empty((size, size, 3), np.uint8)
    for i, y in enumerate(range(0, size, 512)):
        for j, x in enumerate(range(0, size, 512)):
            image[y:y + 512, x:x + 512] = pieces[(i * 7 + j) % len(pieces)]
    began = time.perf_counter()
    mask = seg.predict(image).mask
    seconds = time.perf_counter() - began
    image_mib, mask_mib = image.nbytes / 2**20, mask.nbytes / 2**20
    peak = peak_rss_mib()
    result = {"benchmark": "huge image memory", **machine(seg.device), "size": size, "tile": tile,
              "overlap": overlap, "encoder": encoder, "classes": 4, "seconds": seconds,
              "peak_rss_mib": peak, "rss_before_image_mib": base, "image_mib": image_mib, "mask_mib": mask_mib,
              "batch_size": batch_size, "target_peak_mib": base + image_mib + mask_mib + 1024,
              "working_mib": peak - base - image_mib - mask_mib,
              "meets_target": peak - base <= image_mib + mask_mib + 1024}
    if seg.device.type == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--encoder", default="resnet18")
    a = p.parse_args()
    write_result(a.out, f"huge_image_{a.size}", run(a.out, a.size, a.device, encoder=a.encoder))


if __name__ == "__main__":
    main()
