"""Peak memory and time of predicting one huge georeferenced raster from disk with
`Segmenter.predict_file`, which reads the raster one band of windows at a time and writes the
GeoTIFF mask row by row.

The raster is built first (into --out, deleted afterwards unless --keep): a tiled (256 x 256),
deflate-compressed GeoTIFF of --size x --size pixels and --bands uint16 bands (real nuclei
pixels scaled to 11 bits, grey for 1 band, RGB for 3), in EPSG:32616 at 0.5 m, written one
strip of blocks at a time so that building it never holds the raster. Prediction runs in a
child process so that its peak resident memory is its own (VmHWM: a child's ru_maxrss starts at
its parent's peak on Linux, see `own_peak_rss_mib`); the baseline is the child's peak
after loading a random-weight 2-class softmax U-Net and running one warm-up batch of windows.

Claim tested: the working memory (peak - baseline) is bounded by the band of windows, not by
the image:

    bound = C x (tile + step) x width x 4 bytes x 2  +  one band of input rows (tile x width x bands x itemsize)

with C the model's output channels and step = tile - overlap. The output GeoTIFF must keep the
input's CRS, transform and size.

A resnet18 U-Net at tile 1024 takes 1.0 s (cores to itself) to 2.3 s (cores in use by others) per window
on 2 CPU cores: 30000 x 30000 is 1156 windows, 20 to 45 min. `--encoder none` swaps in a 1x1
convolution to measure the streaming path's memory at full size in minutes. `--gdal-cachemax`
sets GDAL's block cache for the prediction process (GDAL's default is 5% of RAM, and it counts
in the working memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import ROOT, peak_rss_mib, write_result

NUCLEI = ROOT / "data" / "nuclei"
BLOCK = 256
CRS = "EPSG:32616"
PIXEL_M = 0.5
ORIGIN = (440000.0, 4640000.0)  # upper-left corner, metres (UTM 16N)
CLASSES = ["background", "nucleus"]


def nuclei_pairs(root: Path, size: int = BLOCK, limit: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to `limit` real (image (size, size, 3) uint8, mask (size, size) uint8 0/255) pairs of the
    first split of `root` (a segkit data folder; binary masks): a centre crop, or a resize of
    images smaller than `size`."""
    from segkit.config import DataConfig
    from segkit.data.io import read_image
    from segkit.data.layout import split_dirs
    from segkit.data.splits import mask_format, split_samples

    cfg = DataConfig(root=root, classes=["fg"], mask="binary")
    split = next(iter(split_dirs(root)))
    fmt = mask_format(cfg)
    pairs = []
    for sample in split_samples(cfg, split)[:limit]:
        image = read_image(sample.image, 3)
        if image.dtype != np.uint8:
            image = (image.astype(np.float64) * 255 / max(1, image.max())).astype(np.uint8)
        labels, _ = fmt.read(sample.mask)
        mask = labels[:, :, 0] * np.uint8(255)
        h, w = mask.shape
        if min(h, w) < size:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        else:
            t, l = (h - size) // 2, (w - size) // 2
            image, mask = image[t:t + size, l:l + size], mask[t:t + size, l:l + size]
        pairs.append((np.ascontiguousarray(image), np.ascontiguousarray(mask)))
    if not pairs:
        raise SystemExit(f"{root}: no image/mask pairs")
    return pairs


def piece_index(i: int, j: int, n: int) -> int:
    """Which piece fills block (i, j): a fixed scramble so neighbours differ."""
    return (i * 7 + j) % n


def strips(pieces: list[np.ndarray], size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(top, (bands, rows, size) array) strips of one block row each, tiling `pieces` ((B, B, bands) each)."""
    bands = pieces[0].shape[2]
    for i, top in enumerate(range(0, size, BLOCK)):
        rows = min(BLOCK, size - top)
        strip = np.empty((bands, rows, size), pieces[0].dtype)
        for j, left in enumerate(range(0, size, BLOCK)):
            cols = min(BLOCK, size - left)
            strip[:, :, left:left + cols] = pieces[piece_index(i, j, len(pieces))][:rows, :cols].transpose(2, 0, 1)
        yield top, strip


def geotiff_profile(size: int, bands: int, dtype: str) -> dict:
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": size, "height": size, "count": bands, "dtype": dtype, "crs": CRS,
               "transform": from_origin(ORIGIN[0], ORIGIN[1], PIXEL_M, PIXEL_M), "tiled": True,
               "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate", "BIGTIFF": "IF_SAFER",
               "num_threads": "all_cpus"}
    if bands == 3:
        profile["photometric"] = "rgb"
    return profile


def write_geotiff(path: Path, pieces: list[np.ndarray], size: int) -> Path:
    """A tiled, deflate-compressed GeoTIFF of `pieces` tiled to size x size, written strip by strip."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    path.parent.mkdir(parents=True, exist_ok=True)
    bands = pieces[0].shape[2]
    with rasterio.open(path, "w", **geotiff_profile(size, bands, pieces[0].dtype.name)) as ds:
        for top, strip in strips(pieces, size):
            ds.write(strip, window=RioWindow(0, top, size, strip.shape[1]))
    return path


def build_raster(path: Path, size: int, bands: int, root: Path = NUCLEI) -> Path:
    """The benchmark's input: real nuclei pixels (grey for 1 band, RGB for 3) scaled to 11-bit uint16."""
    if bands not in (1, 3):
        raise SystemExit(f"--bands: 1 or 3, not {bands}")
    pieces = []
    for image, _ in nuclei_pairs(root):
        pixels = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None] if bands == 1 else image
        pieces.append((pixels.astype(np.uint32) * 2047 // 255).astype(np.uint16))
    return write_geotiff(path, pieces, size)


NO_NETWORK = "none"
"""--encoder none: a random 1x1 convolution stands in for the U-Net, so a run measures segkit's
streaming path alone (read, blend, decode, write) at a size the U-Net would take hours on a CPU."""


def stand_in(in_channels: int, device: str, **options):
    """A Segmenter around a 1x1 convolution, with the benchmark checkpoint's head and metadata."""
    import torch

    from segkit import Segmenter
    from segkit.data.normalize import Normalization
    from segkit.heads import build_head
    from segkit.model import checkpoint_meta

    torch.manual_seed(0)
    head = build_head("softmax", CLASSES)
    meta = checkpoint_meta(head, "Conv1x1", NO_NETWORK, in_channels, Normalization("none"), data={"mask": "binary"})
    return Segmenter(torch.nn.Conv2d(in_channels, head.channels, 1), head, meta, device, **options)


def raster_checkpoint(folder: Path, in_channels: int, encoder: str) -> Path:
    """A random-weight 2-class softmax U-Net for `in_channels` raw (unnormalised) bands."""
    import torch

    from segkit.data.normalize import Normalization
    from segkit.heads import build_head
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    torch.manual_seed(0)
    head = build_head("softmax", CLASSES)
    model = build_model("Unet", encoder, head.channels, in_channels)
    save_checkpoint(folder, model, checkpoint_meta(head, "Unet", encoder, in_channels, Normalization("none"),
                                                   data={"mask": "binary"}))
    return folder


def code_version() -> dict:
    """The segkit code a measurement ran: commit, whether segkit/ differs from it, and a digest of
    segkit/ as it is now (call it at the start of a run: the library may be edited meanwhile)."""
    import hashlib

    digest = hashlib.sha1()
    for f in sorted((ROOT / "segkit").rglob("*.py")):
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "segkit_modified": bool(git("status", "--porcelain", "segkit")), "segkit_sha1": digest.hexdigest()[:12]}


def own_peak_rss_mib() -> float:
    """Peak resident memory of this process's own address space (VmHWM, MiB). Not ru_maxrss alone:
    Linux carries the parent's peak into a child's ru_maxrss across fork/vfork + exec, so a child's
    ru_maxrss is never below its parent's peak. Falls back to ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def band_bound_mib(channels: int, tile: int, overlap: int, width: int, bands: int, itemsize: int) -> float:
    """The claimed bound on working memory: the blending band of windows (accumulator and its
    finished rows, float32, x2) plus one band of input rows."""
    step = tile - overlap
    return (channels * (tile + step) * width * 4 * 2 + tile * width * bands * itemsize) / 2**20


def measure(raster: Path, checkpoint: Path | None, pred_dir: Path, device: str, tile: int, overlap: int,
            batch_size: int, bands: int = 1) -> dict:
    """In the child process: load (the 1x1 stand-in without a checkpoint), warm up, baseline,
    predict the raster to GeoTIFF, peak."""
    import torch

    from segkit import Segmenter
    from segkit.device import resolve_device

    code = code_version()
    options = {"tile": tile, "overlap": overlap, "batch_size": batch_size}
    seg = (Segmenter.load(checkpoint, device=device, **options) if checkpoint is not None
           else stand_in(bands, resolve_device(device), **options))
    rng = np.random.default_rng(0)
    warm = [rng.integers(0, 2048, (tile, tile, seg.in_channels), dtype=np.uint16) for _ in range(batch_size)]
    began = time.perf_counter()
    seg.forward(seg.to_input(warm))
    warm_s = time.perf_counter() - began
    del warm
    base = own_peak_rss_mib()
    began = time.perf_counter()
    files = seg.predict_file(raster, pred_dir)
    seconds = time.perf_counter() - began
    return {"device": str(seg.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds": seconds, "warmup_batch_s": warm_s, "peak_rss_mib": own_peak_rss_mib(),
            "ru_maxrss_mib": peak_rss_mib(),
            "baseline_rss_mib": base, "outputs": [str(f) for f in files], "out_channels": seg.head.channels,
            "code": code}


def check_output(raster: Path, mask: Path) -> dict:
    """The mask's grid against the input's (headers only), and the values of one window."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    with rasterio.open(raster) as src, rasterio.open(mask) as out:
        n = min(1024, out.width, out.height)
        values = np.unique(out.read(1, window=RioWindow(out.width // 2 - n // 2, out.height // 2 - n // 2, n, n)))
        return {"output_crs": str(out.crs), "output_transform": list(out.transform)[:6],
                "output_size": [out.width, out.height], "output_dtype": out.dtypes[0],
                "output_values_centre_window": values.tolist(),
                "grid_matches": out.crs == src.crs and out.transform == src.transform
                and (out.width, out.height) == (src.width, src.height),
                "values_ok": bool(set(values.tolist()) <= set(range(len(CLASSES))))}


def run(out: Path, size: int = 30000, bands: int = 1, tile: int = 1024, overlap: int = 128,
        encoder: str = "resnet18", batch_size: int = 4, device: str = "auto", root: Path = NUCLEI,
        keep: bool = False, gdal_cachemax: str | None = None) -> dict:
    work = (out / f"huge-raster-{size}-{bands}b").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        began = time.perf_counter()
        raster = build_raster(work / "scene.tif", size, bands, root)
        build_s = time.perf_counter() - began
        checkpoint = None if encoder == NO_NETWORK else raster_checkpoint(work / f"ckpt-{encoder}-{bands}b", bands,
                                                                             encoder)
        spec = {"raster": str(raster), "checkpoint": checkpoint and str(checkpoint), "pred_dir": str(work / "pred"),
                "device": device, "tile": tile, "overlap": overlap, "batch_size": batch_size, "bands": bands}
        result_file = work / "child.json"
        env = dict(os.environ)
        if gdal_cachemax is not None:
            env["GDAL_CACHEMAX"] = gdal_cachemax
        subprocess.run([sys.executable, "-m", "benchmarks.huge_raster", "--child", json.dumps(spec),
                        "--child-result", str(result_file)], check=True, cwd=ROOT, env=env)
        child = json.loads(result_file.read_text())
        check = check_output(raster, Path(child["outputs"][0]))
        itemsize = np.dtype(np.uint16).itemsize
        bound = band_bound_mib(child["out_channels"], tile, overlap, size, bands, itemsize)
        working = child["peak_rss_mib"] - child["baseline_rss_mib"]
        return {"benchmark": "huge raster from disk", "device": child["device"], "torch": child["torch"],
                "threads": child["threads"], "size": size, "bands": bands, "dtype": "uint16",
                "encoder": encoder, "classes": len(CLASSES), "tile": tile, "overlap": overlap,
                "batch_size": batch_size, "windows": _windows(size, tile, overlap),
                "gdal_cachemax": gdal_cachemax or os.environ.get("GDAL_CACHEMAX") or "GDAL default (5% of RAM)",
                "seconds": child["seconds"], "seconds_per_mpixel": child["seconds"] / (size * size / 1e6),
                "warmup_batch_s": child["warmup_batch_s"], "build_s": build_s,
                "build_peak_rss_mib": peak_rss_mib(), "peak_rss_mib": child["peak_rss_mib"],
                "baseline_rss_mib": child["baseline_rss_mib"], "working_mib": working,
                "child_ru_maxrss_mib": child.get("ru_maxrss_mib"),
                "input_mib": size * size * bands * itemsize / 2**20, "output_mask_mib": size * size / 2**20,
                "input_file_mib": raster.stat().st_size / 2**20,
                "output_file_mib": Path(child["outputs"][0]).stat().st_size / 2**20,
                "bound_mib": bound, "meets_bound": working <= bound, **check, "code": child.get("code")}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _windows(size: int, tile: int, overlap: int) -> int:
    from segkit.infer import window_starts

    t = min(size, tile)
    return len(window_starts(size, t, tile - overlap)) ** 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--size", type=int, default=30000)
    p.add_argument("--bands", type=int, default=1, choices=(1, 3))
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--encoder", default="resnet18",
                   help="U-Net encoder; 'none': a 1x1 convolution stands in (the streaming path alone)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--root", type=Path, default=NUCLEI, help="segkit data folder whose images tile the raster")
    p.add_argument("--gdal-cachemax", default=None, help="GDAL_CACHEMAX for the prediction process (e.g. 64)")
    p.add_argument("--keep", action="store_true", help="keep the raster, checkpoint and masks")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        result = measure(Path(spec["raster"]), spec["checkpoint"] and Path(spec["checkpoint"]), Path(spec["pred_dir"]),
                         spec["device"], spec["tile"], spec["overlap"], spec["batch_size"], spec.get("bands", 1))
        a.child_result.write_text(json.dumps(result))
        return
    name = (f"huge_raster_{a.size}_{a.bands}b" + ("_nonet" if a.encoder == NO_NETWORK else "")
            + (f"_cache{a.gdal_cachemax}" if a.gdal_cachemax else ""))
    write_result(a.out, name, run(a.out, a.size, a.bands, a.tile, a.overlap, a.encoder, a.batch_size, a.device,
                                  a.root, a.keep, a.gdal_cachemax))


if __name__ == "__main__":
    main()
