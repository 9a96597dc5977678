"""Training samples per second that the loader delivers, without a model: crop 256, the default
augmentation, collated batches of 8, for 0, 1, 2, ... worker processes, from cached data and
streamed from disk. Target: >= 150 samples/s per worker process (so 14 workers >= 2000/s,
more than an H100 trains a U-Net/resnet34 in bf16).

    python -m benchmarks.data_path                                     # embedded data/nuclei
    python -m benchmarks.data_path --root DATASETS/camvid --config configs/camvid.yaml
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import ROOT, write_result
from segkit.config import load_config
from segkit.data.dataset import SegmentationDataset, fit_normalization, scan
from segkit.data.splits import pair_reader, train_val_samples
from segkit.data.transforms import train_transform
from segkit.loader import EpochKeyed, EpochSampler, loader_kwargs


def rate(ds: SegmentationDataset, workers: int, batches: int, batch_size: int = 8) -> float:
    """Samples/s over `batches` batches after the workers have started and delivered one batch."""
    sampler = EpochSampler(len(ds), (batches + 1) * batch_size, seed=0)
    loader = DataLoader(EpochKeyed(ds), batch_size=batch_size, sampler=sampler,
                        **loader_kwargs(workers, torch.device("cpu")))
    it = iter(loader)
    next(it)
    began = time.perf_counter()
    n = sum(len(item.image) for item in it)
    return n / (time.perf_counter() - began)


def run(root: Path, config: Path, crop: int = 256, max_workers: int | None = None, batches: int = 40) -> dict:
    cfg = load_config(config, [f"data.root={root}"])
    reader, head = pair_reader(cfg.data), cfg.head()
    samples, _ = train_val_samples(cfg.data, 0)
    top = max_workers if max_workers is not None else max(1, os.cpu_count() or 1)
    counts = [0] + [w for w in (1, 2, 4, 8, 16) if w <= top]
    result: dict = {"benchmark": "data path", "root": str(root), "crop": crop, "cpu_cores": os.cpu_count(),
                    "target_per_worker": 150}
    for cached in (True, False):
        records = scan(samples, reader, head, cache=cached)
        norm = fit_normalization(cfg.data.normalize, records, reader, cfg.data.channels, None, None)
        ds = SegmentationDataset(records, reader, head, train_transform(crop, cfg.train.augment), norm, crop=crop,
                                 color=cfg.train.augment.color)
        curve = {w: rate(ds, w, batches) for w in counts}
        key = "cached" if cached else "from_disk"
        result[key] = {"samples_per_s": curve, "per_worker_process": curve[0]}
    result["meets_target"] = result["cached"]["per_worker_process"] >= 150
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "data" / "nuclei")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "nuclei-sigmoid.yaml")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--max-workers", type=int, default=None)
    a = p.parse_args()
    write_result(a.out, f"data_path_{a.root.name}", run(a.root, a.config, max_workers=a.max_workers))


if __name__ == "__main__":
    main()
