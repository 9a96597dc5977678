"""Predicting one CT-sized volume (512 x 512 x 300 int16 by default): seconds per volume and peak memory, with
a random-weight resnet18 U-Net (speed and memory do not depend on the weights' values).

The volume is built from real data in the repository: 30 sections, each a mosaic of the embedded nuclei
images (data/nuclei, the 256 x 256 ones, in grey; 2 x 2 of them for 512 x 512), run forward and back until
`depth` slices, their grey values mapped to a CT-like int16 range (-1000 .. 530), saved as .nii.gz with
0.7 x 0.7 x 2.5 mm voxels and predicted as a CT channel (clip + dataset statistics, fitted on the volume
itself). Not a CT scan: what the benchmark measures (slices of that size and type through normalisation,
network and writing) does not depend on what the voxels show. `--root FOLDER` takes the sections from a
folder of size x size images of your own instead (in name order), e.g. consecutive EM sections.

Run one volume per process (`make bench` does), so the peak (VmHWM) belongs to it: the peak is reset after the
volume file is made, and `rss_before_mib` is the process once torch and the model are loaded, before any
forward pass. The target: peak <= that + the raw volume + the outputs + 1 GiB (a batch of slices with its
activations, and the per-case statistics' temporaries): the volume is never converted to float as a whole.

glibc keeps freed blocks resident as it sees fit, which moved this peak by up to ~100 MiB between runs of the
same code; the process runs with fixed malloc thresholds (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ at
128 KiB: large blocks are mapped and returned at once), so the peak is the memory the code holds.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from benchmarks.common import EMBEDDED, machine, write_result
from benchmarks.huge_raster import own_peak_rss_mib
from segkit import Segmenter
from segkit.data.normalize import fit_per_case, foreground_sample
from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import Volume, VolumeCase
from segkit.heads import build_head
from segkit.predict import output_files, predict_volume, write_prediction
from segkit.model import build_model, checkpoint_meta, save_checkpoint

SECTIONS = 30
TILE = 256
SPACING = (0.7, 0.7, 2.5)
CLASSES = ["background", "liver", "tumour"]


def embedded_sections(size: int) -> list[np.ndarray]:
    """`SECTIONS` grey size x size mosaics of the embedded 256 x 256 nuclei images, in name order,
    row by row (the last row and column cut at `size`)."""
    tiles = [t for t in (np.asarray(Image.open(p).convert("L")) for p in sorted(EMBEDDED.glob("*/images/*.png")))
             if t.shape == (TILE, TILE)]
    if not tiles:
        raise SystemExit(f"{EMBEDDED}: no {TILE} x {TILE} images; the embedded data is part of the repository")
    side = -(-size // TILE)
    return [np.block([[tiles[(k * side * side + r * side + c) % len(tiles)] for c in range(side)]
                      for r in range(side)])[:size, :size] for k in range(SECTIONS)]


def folder_sections(root: Path, size: int) -> list[np.ndarray]:
    """The grey images of `root`, in name order; each must be size x size."""
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg"))
    sections = [np.asarray(Image.open(p).convert("L")) for p in files]
    wrong = [f.name for f, s in zip(files, sections) if s.shape != (size, size)]
    if not sections or wrong:
        raise SystemExit(f"--root {root}: needs images of {size} x {size} (--size); "
                         f"{'none found' if not sections else 'not: ' + ', '.join(wrong[:3])}")
    return sections


def ct_like_volume(path: Path, depth: int, sections: list[np.ndarray]) -> Path:
    """The volume file (made once): real grey sections as CT-like int16 slices."""
    if path.is_file():
        return path
    n = len(sections)
    order = [i for _ in range(depth // (2 * n) + 1) for i in (*range(n), *range(n - 1, -1, -1))][:depth]
    volume = np.stack([sections[i].astype(np.int16) * 6 - 1000 for i in order], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), path)
    return path


def checkpoint(folder: Path, volume: np.ndarray) -> Path:
    """A random-weight resnet18 U-Net trained 'on CT volume slices' (model.json data.volume)."""
    torch.manual_seed(0)
    head = build_head("softmax", CLASSES)
    sample = foreground_sample(volume, volume[..., 0] > -500, np.random.default_rng(0))
    norm = fit_per_case(["ct"], [lambda: sample])
    spec = VolumeSpec("nnunet", ("CT",), 2, {name: (i,) for i, name in enumerate(CLASSES)})
    model = build_model("Unet", "resnet18", head.channels, 1)
    save_checkpoint(folder, model, checkpoint_meta(head, "Unet", "resnet18", 1, norm,
                                                   data={"mask": "volume", "volume": spec.to_meta()}))
    return folder


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return own_peak_rss_mib()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(out: Path, size: int = 512, depth: int = 300, device: str = "cpu", batch_size: int = 4,
        probs: bool = False, root: Path | None = None) -> dict:
    sections = folder_sections(root, size) if root else embedded_sections(size)
    source = root.name if root else EMBEDDED.name
    path = ct_like_volume(out / f"volume-{source}-{size}x{size}x{depth}_0000.nii.gz", depth, sections)
    ckpt = checkpoint(out / "volume-ckpt-resnet18", Volume("ct", [path]).data[..., :1])
    gc.collect()
    reset = _reset_peak()
    seg = Segmenter.load(ckpt, device=device, batch_size=batch_size)
    before, cpu0 = _rss_mib(), _cpu_s()
    began = time.perf_counter()
    volume = Volume("ct", [path])
    raw = volume.data
    read_s = time.perf_counter() - began
    pred = predict_volume(seg, volume, probs)
    predict_s = time.perf_counter() - began - read_s
    target = out / "volume-pred"
    case = VolumeCase("ct", [path], None)
    write_prediction(volume, pred, output_files(seg, VolumeSpec.from_meta(seg.meta), case, probs), target)
    seconds = time.perf_counter() - began
    peak = own_peak_rss_mib()
    raw_mib, out_mib = raw.nbytes / 2**20, sum(a.nbytes for a in (pred.labels, pred.probs) if a is not None) / 2**20
    float_mib = raw.size * 4 / 2**20
    result = {"benchmark": "volume prediction", **machine(seg.device),
              "sections": str(root) if root else "mosaics of the data/nuclei images",
              "shape": list(volume.shape),
              "dtype": str(raw.dtype), "spacing_mm": list(SPACING), "encoder": "resnet18", "classes": len(CLASSES),
              "batch_size": batch_size, "probs": probs, "slices": volume.shape[2],
              "seconds_per_volume": seconds, "read_s": read_s, "predict_s": predict_s,
              "write_s": seconds - read_s - predict_s, "slices_per_s": volume.shape[2] / predict_s,
              "cpu_s": _cpu_s() - cpu0, "peak_reset": reset, "rss_before_mib": before, "peak_rss_mib": peak,
              "raw_mib": raw_mib, "output_mib": out_mib, "float32_volume_mib": float_mib,
              "working_mib": peak - before - raw_mib - out_mib,
              "target_peak_mib": before + raw_mib + out_mib + 1024}
    result["meets_target"] = peak <= result["target_peak_mib"]
    if seg.device.type == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):  # glibc reads them at start: run again with them
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.volume_predict", *sys.argv[1:]],
                  {**os.environ, **MALLOC})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--depth", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--probs", action="store_true", help="also keep and write the probabilities")
    p.add_argument("--root", type=Path, help="a folder of size x size section images (default: embedded mosaics)")
    a = p.parse_args()
    result = run(a.out.resolve(), a.size, a.depth, a.device, a.batch_size, a.probs, a.root)
    write_result(a.out, f"volume_predict_{a.size}x{a.depth}", result)


if __name__ == "__main__":
    main()
