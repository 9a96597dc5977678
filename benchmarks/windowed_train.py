"""Training data-path throughput on a folder of huge tiles: windowed crops against whole-image
decoding, no model.

Builds --count tiled (256 x 256), deflate-compressed 3-band uint8 images of --size x --size
(GeoTIFF in EPSG:32616, or plain tiled TIFF with --format tiff) with binary 0/255 masks of the
same size, by tiling real nuclei image/mask pairs block by block, in ROOT/train/{images,masks}
(ROOT under --out, deleted afterwards unless --keep). The samples are scanned once
(`scan(..., cache=False)`), then `SegmentationDataset` draws crop x crop training samples
(train_transform, sigmoid head ["fg"], binary masks, Normalization("none"), DataLoader with
num_workers=0), each way in its own child process so each peak memory figure is its own
(VmHWM; a child's ru_maxrss would start at its parent's peak):

- windowed: segkit's path; only the crop window of the image and of the mask is decoded;
- whole: the previous behaviour, a subclass whose `pixels()` decodes the whole image and mask
  (`reader.read(sample)`, no window) and slices the crop window out of them (its `packed()`,
  which segkit's `__getitem__` reads uncached samples through, goes through that `pixels()`).

Reported: samples/s and seconds per sample of each (after one warm-up sample), the speed-up,
and peak RSS and working memory (peak - the child's peak before its first sample) of each.

Claim: a windowed sample costs about what a crop-sized image costs, whatever the tile's size,
so at 10000 x 10000 it is much faster (target: speed-up >= 10) and its working memory does not
grow with the tile, where whole-image decoding holds the image, the mask and its labels
(several bytes per pixel: about 1 GiB at 10000 x 10000).
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, peak_rss_mib, write_result
from benchmarks.huge_raster import (BLOCK, NUCLEI, code_version, nuclei_pairs, own_peak_rss_mib, piece_index,
                                    write_geotiff)
from segkit.data.dataset import Pixels, Record, SegmentationDataset

CLASSES = ["fg"]
TARGET_SPEEDUP = 10.0


class WholeImageDataset(SegmentationDataset):
    """What segkit did before windowed reads: decode the whole image and mask for every sample,
    then slice the crop window out of them."""

    whole_reads = 0

    def pixels(self, r: Record, window) -> Pixels:
        self.whole_reads += 1
        px = self.reader.read(r.sample)
        if window is None:
            return px
        t, l, h, w = window
        return Pixels(px.image[t:t + h, l:l + w], px.labels[t:t + h, l:l + w], px.valid[t:t + h, l:l + w],
                      px.real[t:t + h, l:l + w], px.nodata)

    def packed(self, r: Record, window):
        """segkit's __getitem__ reads an uncached sample through packed(), which calls the reader
        itself: route it through the whole-image pixels() above, else this baseline would be windowed."""
        from segkit.data.dataset import pack

        return (px := self.pixels(r, window)).image, pack(px)


def write_tiff(path: Path, pieces: list[np.ndarray], size: int) -> Path:
    """A plain (not georeferenced) tiled, deflate-compressed TIFF of `pieces` ((B, B, bands) each)
    tiled to size x size, written tile by tile."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    bands = pieces[0].shape[2]
    n = -(-size // BLOCK)

    def tiles():
        for i in range(n):
            for j in range(n):
                piece = pieces[piece_index(i, j, len(pieces))]
                yield piece if bands > 1 else piece[:, :, 0]

    shape = (size, size, bands) if bands > 1 else (size, size)
    tifffile.imwrite(path, tiles(), shape=shape, dtype=pieces[0].dtype, tile=(BLOCK, BLOCK),
                     compression="zlib", photometric="rgb" if bands == 3 else "minisblack")
    return path


def build_tiles(root: Path, count: int, size: int, fmt: str, source: Path = NUCLEI) -> Path:
    """ROOT/train/{images,masks}: `count` images of size x size and their 0/255 masks, each a
    different arrangement of real image/mask pairs."""
    pairs = nuclei_pairs(source)
    images = [image for image, _ in pairs]
    masks = [mask[:, :, None] for _, mask in pairs]
    write = write_geotiff if fmt == "geotiff" else write_tiff
    for k in range(count):
        order = np.random.default_rng(k).permutation(len(pairs))
        write(root / "train" / "images" / f"tile{k:03d}.tif", [images[i] for i in order], size)
        write(root / "train" / "masks" / f"tile{k:03d}.tif", [masks[i] for i in order], size)
    return root


def measure(mode: str, root: Path, records_file: Path, samples: int, crop: int, batch_size: int) -> dict:
    """In the child process: baseline (imports, records, dataset), one warm-up sample (timed apart),
    then `samples` samples through a DataLoader; working memory = peak - baseline."""
    from torch.utils.data import DataLoader

    from segkit.config import AugmentConfig, DataConfig
    from segkit.data.normalize import Normalization
    from segkit.data.splits import pair_reader
    from segkit.data.transforms import train_transform
    from segkit.heads import build_head

    code = code_version()
    reader = pair_reader(DataConfig(root=root, classes=CLASSES, mask="binary"))
    head = build_head("sigmoid", CLASSES)
    records = pickle.loads(records_file.read_bytes())
    kind = SegmentationDataset if mode == "windowed" else WholeImageDataset
    ds = kind(records, reader, head, train_transform(crop, AugmentConfig()), Normalization("none"), crop=crop, seed=0)
    base = own_peak_rss_mib()
    began = time.perf_counter()
    item = ds[0]  # (image, target, ...): the training sample as the loader sends it
    warmup_s = time.perf_counter() - began
    assert item[0].shape == (3, crop, crop) and item[1].shape[-2:] == (crop, crop), (item[0].shape, item[1].shape)
    loader = DataLoader(ds, batch_size=batch_size, sampler=range(len(ds)), num_workers=0)
    done, epoch, foreground = 0, 1, 0.0
    began = time.perf_counter()
    while done < samples:
        ds.set_epoch(epoch)  # a new window per image every pass
        for batch in loader:
            n = len(batch[0])
            done += n
            foreground += float((batch[1][:, :1] == 1).float().mean()) * n
            if done >= samples:
                break
        epoch += 1
    seconds = time.perf_counter() - began
    if mode == "whole" and ds.whole_reads < done + 1:
        raise SystemExit(f"the whole-image baseline decoded {ds.whole_reads} whole images for {done + 1} samples: "
                         "SegmentationDataset no longer reads samples through pixels()/packed()")
    return {"samples": done, "seconds": seconds, "samples_per_s": done / seconds, "s_per_sample": seconds / done,
            "warmup_s": warmup_s, "peak_rss_mib": own_peak_rss_mib(), "baseline_rss_mib": base,
            "working_mib": own_peak_rss_mib() - base, "ru_maxrss_mib": peak_rss_mib(),
            "foreground_fraction": foreground / done, "code": code}


def _child(mode: str, root: Path, records_file: Path, samples: int, crop: int, batch_size: int) -> dict:
    result = records_file.parent / f"{mode}.json"
    spec = {"mode": mode, "root": str(root), "records": str(records_file), "samples": samples, "crop": crop,
            "batch_size": batch_size}
    subprocess.run([sys.executable, "-m", "benchmarks.windowed_train", "--child", json.dumps(spec),
                    "--child-result", str(result)], check=True, cwd=ROOT)
    return json.loads(result.read_text())


def run(out: Path, size: int = 10000, count: int = 4, crop: int = 256, windowed_samples: int = 200,
        whole_samples: int = 8, fmt: str = "geotiff", batch_size: int = 4, source: Path = NUCLEI,
        keep: bool = False) -> dict:
    import torch

    from segkit.config import DataConfig
    from segkit.data.dataset import scan
    from segkit.data.splits import pair_reader, split_samples
    from segkit.heads import build_head

    work = (out / f"windowed-train-{size}-{fmt}").resolve()
    shutil.rmtree(work, ignore_errors=True)
    try:
        began = time.perf_counter()
        root = build_tiles(work / "data", count, size, fmt, source)
        build_s = time.perf_counter() - began
        cfg = DataConfig(root=root, classes=CLASSES, mask="binary")
        began = time.perf_counter()
        records = scan(split_samples(cfg, "train"), pair_reader(cfg), build_head("sigmoid", CLASSES), cache=False,
                       threads=2)
        scan_s = time.perf_counter() - began
        records_file = work / "records.pkl"
        records_file.write_bytes(pickle.dumps(records))
        windowed = _child("windowed", root, records_file, windowed_samples, crop, batch_size)
        whole = _child("whole", root, records_file, whole_samples, crop, batch_size)
        files = sorted((root / "train").rglob("*.tif"))
        speedup = windowed["samples_per_s"] / whole["samples_per_s"]
        return {"benchmark": "windowed training crops vs whole-image decoding", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "format": fmt, "size": size, "count": count, "crop": crop,
                "batch_size": batch_size, "num_workers": 0, "build_s": build_s, "scan_s": scan_s,
                "image_mib_decoded": size * size * 3 / 2**20,
                "files_mib_on_disk": sum(f.stat().st_size for f in files) / 2**20,
                "windowed": windowed, "whole": whole,
                "windowed_samples_per_s": windowed["samples_per_s"], "whole_samples_per_s": whole["samples_per_s"],
                "speedup": speedup, "target_speedup": TARGET_SPEEDUP, "meets_target": speedup >= TARGET_SPEEDUP}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--size", type=int, default=10000)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--windowed-samples", type=int, default=200)
    p.add_argument("--whole-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--format", choices=("geotiff", "tiff"), default="geotiff")
    p.add_argument("--root", type=Path, default=NUCLEI,
                   help="segkit data folder whose image/mask pairs tile the images")
    p.add_argument("--keep", action="store_true", help="keep the built images")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        result = measure(spec["mode"], Path(spec["root"]), Path(spec["records"]), spec["samples"], spec["crop"],
                         spec["batch_size"])
        a.child_result.write_text(json.dumps(result))
        return
    name = f"windowed_train_{a.size}_{a.format}"
    write_result(a.out, name, run(a.out, a.size, a.count, a.crop, a.windowed_samples, a.whole_samples, a.format,
                                  a.batch_size, a.root, a.keep))


if __name__ == "__main__":
    main()
