"""onnxruntime vs PyTorch on the CPU: images/s of `Segmenter.predict_batch` on the same real images.

The same random-weight U-Net checkpoint is run by `Segmenter.load(checkpoint)` (PyTorch, float32)
and by `Segmenter.load(exported.onnx)` (onnxruntime CPU provider, as many threads as PyTorch);
everything around the network (normalisation, padding, decoding) is the same code. Each encoder
gets one warm-up pass per runtime, then the best of `repeats` timed passes over all images, the
two runtimes alternating; the 1-minute load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import checkpoint, machine, real_images, write_result
from segkit import Segmenter
from segkit.export import export_onnx


def _images_per_s(segs: dict[str, Segmenter], images: list, batch_size: int, repeats: int) -> dict[str, float]:
    """Best images/s of each Segmenter; their timed passes alternate, so a busy machine slows both alike."""
    def one_pass(seg: Segmenter) -> float:
        began = time.perf_counter()
        for i in range(0, len(images), batch_size):
            seg.predict_batch(images[i:i + batch_size])
        return time.perf_counter() - began

    for seg in segs.values():
        one_pass(seg)  # warm-up: oneDNN primitives, onnxruntime arena
    best = {name: float("inf") for name in segs}
    for _ in range(repeats):
        for name, seg in segs.items():
            best[name] = min(best[name], one_pass(seg))
    return {name: len(images) / s for name, s in best.items()}


def run(out: Path, n: int = 32, size: int = 256, batch_size: int = 4, encoders: tuple[str, ...] = ("resnet18", "resnet34"),
        repeats: int = 2, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)  # onnxruntime's CPU sessions take the same count
    images = real_images(n, size)
    load_before = os.getloadavg()[0]
    rows = []
    for encoder in encoders:
        ckpt = checkpoint(out / f"onnx-ckpt-{encoder}", ["background", "nucleus"], encoder=encoder)
        onnx_path = export_onnx(ckpt, out / f"onnx-{encoder}.onnx")
        pt = Segmenter.load(ckpt, device="cpu", amp=False, batch_size=batch_size)
        ox = Segmenter.load(onnx_path, device="cpu", amp=False, batch_size=batch_size)
        speed = _images_per_s({"torch": pt, "onnx": ox}, images, batch_size, repeats)
        torch_ips, onnx_ips = speed["torch"], speed["onnx"]
        rows.append({"model": f"Unet/{encoder}", "torch_images_per_s": torch_ips, "onnxruntime_images_per_s": onnx_ips,
                     "onnxruntime_over_torch": onnx_ips / torch_ips, "providers": ox.model.providers})
    import onnxruntime

    return {"benchmark": "onnxruntime vs PyTorch CPU throughput (Segmenter.predict_batch)",
            **machine(torch.device("cpu")), "onnxruntime": onnxruntime.__version__, "images": n, "size": size,
            "batch_size": batch_size, "precision": "float32", "repeats": repeats,
            "load_average_1min": [load_before, os.getloadavg()[0]], "results": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--encoders", default="resnet18,resnet34")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both runtimes (default: PyTorch's)")
    a = p.parse_args()
    write_result(a.out, "onnx_throughput", run(a.out, a.images, a.size, a.batch_size, tuple(a.encoders.split(",")),
                                                a.repeats, a.threads))


if __name__ == "__main__":
    main()
