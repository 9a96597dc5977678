"""`make bench`: every benchmark on the available device, a table against the targets, JSON in bench-out/.

The huge-image runs go in child processes so each peak memory figure is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import predict_throughput, train_throughput
from benchmarks.common import write_result


def huge(out: Path, size: int, device: str) -> dict:
    subprocess.run([sys.executable, "-m", "benchmarks.huge_image", "--size", str(size), "--device", device,
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"huge_image_{size}.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default="predict,train,huge", help="comma-separated subset")
    p.add_argument("--sizes", default="8192,16384", help="huge image sizes")
    p.add_argument("--compile", action="store_true", help="also predict with torch.compile")
    a = p.parse_args()
    only = set(a.only.split(","))
    rows = []
    if "predict" in only:
        r = predict_throughput.run(a.out, a.device)
        write_result(a.out, "predict_throughput", r)
        rows.append(("predict images/s vs bare loop", f"{r['segkit_images_per_s']:.2f} / {r['bare_images_per_s']:.2f}",
                     f"ratio {r['ratio']:.3f}", ">= 0.90"))
        if torch.cuda.is_available():
            for amp, tag in ((False, "fp32"), ("auto", "bf16/fp16 + channels_last")):
                r = predict_throughput.run(a.out, "cuda", amp=amp)
                write_result(a.out, f"predict_throughput_cuda_{'fp32' if amp is False else 'amp'}", r)
                rows.append((f"GPU predict {tag}", f"{r['segkit_images_per_s']:.1f} img/s", f"ratio {r['ratio']:.3f}",
                             ">= 0.90"))
            if a.compile:
                r = predict_throughput.run(a.out, "cuda", compile_model=True)
                write_result(a.out, "predict_throughput_cuda_compile", r)
                rows.append(("GPU predict compiled", f"{r['segkit_images_per_s']:.1f} img/s",
                             f"ratio {r['ratio']:.3f}", ">= 0.90"))
    if "train" in only:
        r = train_throughput.run(a.out, a.device)
        write_result(a.out, "train_throughput", r)
        rows.append(("train images/s vs bare loop", f"{r['segkit_images_per_s']:.2f} / {r['bare_images_per_s']:.2f}",
                     f"ratio {r['ratio']:.3f}", ">= 0.90"))
    if "huge" in only:
        for size in (int(s) for s in a.sizes.split(",")):
            r = huge(a.out, size, a.device)
            rows.append((f"predict {size}x{size} RGB, 4 classes", f"peak {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s",
                         f"target {r['target_peak_mib']:.0f} MiB", "met" if r["meets_target"] else "MISSED"))
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value:<28}  {got:<20}  {target}" for name, value, got, target in rows))


if __name__ == "__main__":
    main()
