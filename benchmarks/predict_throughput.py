"""`segkit predict` on a folder of real 512x512 images against a bare `model(batch)` loop.

Same model, batch size, device and precision, in one process. Target: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from benchmarks.common import checkpoint, image_folder, machine, timed, write_result
from segkit import Segmenter


def run(out: Path, device: str = "auto", n: int = 64, size: int = 512, batch_size: int = 8, workers: int = 2,
        compile_model: bool = False, amp: bool | str = "auto") -> dict:
    folder = image_folder(out / "predict-in", n, size)
    seg = Segmenter.load(checkpoint(out / "predict-ckpt", ["background", "a", "b", "c"]), device=device,
                         batch_size=batch_size, tile=max(1024, size), amp=amp)
    if compile_model:
        seg.model = torch.compile(seg.model)
    dev = seg.device
    masks = out / "predict-out"
    # The layout segkit feeds the model: HWC images permuted to NCHW are channels_last in memory.
    x = torch.randn(batch_size, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=seg.dtype or torch.float32,
                                                    enabled=seg.dtype is not None):
            for _ in range(n // batch_size):
                seg.model(x)

    def toolkit() -> None:
        shutil.rmtree(masks, ignore_errors=True)
        seg.predict_folder(folder, masks, workers=workers)

    bare()  # warm-up (cudnn autotune, compile)
    toolkit()
    bare_s = min(timed(bare, dev) for _ in range(2))
    segkit_s = min(timed(toolkit, dev) for _ in range(2))
    seg.tta = True  # the four flips batched into one forward: the cost should be ~4 passes, no more

    def with_tta() -> None:
        shutil.rmtree(masks, ignore_errors=True)
        seg.predict_folder(folder, masks, workers=workers)

    tta_s = timed(with_tta, dev)
    images = n // batch_size * batch_size
    result = {"benchmark": "predict throughput", **machine(dev), "images": n, "size": size, "batch_size": batch_size,
              "precision": str(seg.dtype or torch.float32), "compile": compile_model,
              "segkit_images_per_s": n / segkit_s, "bare_images_per_s": images / bare_s,
              "ratio": (n / segkit_s) / (images / bare_s), "target_ratio": 0.90,
              "tta_seconds": tta_s, "tta_cost": tta_s / segkit_s, "target_tta_cost": 4.2}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    write_result(a.out, "predict_throughput", run(a.out, a.device, a.images, 512, a.batch_size, a.workers, a.compile))


if __name__ == "__main__":
    main()
