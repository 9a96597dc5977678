"""`segkit train` images/s against a minimal hand-written smp loop.

Same model, batch, crop, precision and loss; the minimal loop's data are tensors already
in memory. segkit's figure is its second epoch (the first includes start-up). Target >= 0.90.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine, timed, write_result
from segkit.config import load_config
from segkit.device import amp_dtype, resolve_device
from segkit.model import build_model
from segkit.train import read_history, train


def run(out: Path, device: str = "auto", batch_size: int = 8, crop: int = 256, steps: int = 12,
        workers: int = 2) -> dict:
    cfg = load_config(ROOT / "configs" / "nuclei-sigmoid.yaml", [
        f"data.root={ROOT / 'data' / 'nuclei'}", f"train.device={device}", f"train.batch_size={batch_size}",
        f"train.crop={crop}", f"train.steps_per_epoch={steps}", "train.epochs=2", f"train.workers={workers}",
        "model.encoder=resnet34"])
    run_dir = out / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(cfg, run_dir, progress=False)
    segkit_ips = read_history(run_dir / "metrics.csv")[-1]["images_per_s"]

    dev = resolve_device(device)
    dtype = amp_dtype(dev, cfg.train.amp)
    head = cfg.head()
    torch.manual_seed(0)
    model = build_model("Unet", "resnet34", head.channels).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = head.loss(cfg.train.loss).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    x = torch.randn(batch_size, 3, crop, crop, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, head.channels, crop, crop, device=dev) > 0.8).float()

    def bare() -> None:
        model.train()
        for _ in range(steps):
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    bare()
    bare_ips = steps * batch_size / timed(bare, dev)
    return {"benchmark": "train throughput", **machine(dev), "batch_size": batch_size, "crop": crop,
            "steps": steps, "precision": str(dtype or torch.float32), "segkit_images_per_s": segkit_ips,
            "bare_images_per_s": bare_ips, "ratio": segkit_ips / bare_ips, "target_ratio": 0.90}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    write_result(a.out, "train_throughput", run(a.out, a.device, a.batch_size, a.crop, a.steps))


if __name__ == "__main__":
    main()
