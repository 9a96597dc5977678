"""Host-device synchronisation in the hot paths, proven on a GPU.

`segkit train` promises no host-device sync inside a training step except the `log_every` read-back of the
losses, and prediction none per batch except the copy of the result. This benchmark runs the library's own
training step (`segkit.train.train_step`, on batches from the run's own loader) and prediction batches
(`Segmenter.to_input`, `forward`, the head's decoding) under `torch.cuda.set_sync_debug_mode("error")`: any
op that makes the host wait for the GPU raises there, and the report names it. It also reports images/s and
the GPU's utilisation (nvidia-smi, sampled every 0.1 s) over the timed steps, the device synchronised before
each clock read. Without CUDA it says that it needs CUDA and exits 0: a CPU has no such sync to find.

    python -m benchmarks.gpu_sync [--steps 100] [--batch 16] [--crop 256] [--root data/nuclei]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine, real_images, write_result
from segkit.config import load_config
from segkit.train import build_run, run_device, train_step


class Utilisation:
    """GPU utilisation (%) sampled by nvidia-smi every `period` seconds while in use; None without it."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(torch.cuda.current_device())], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            self._stop.wait(self.period)

    def __enter__(self) -> Utilisation:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


@contextmanager
def sync_errors():
    """Inside: an op that synchronises the host with the GPU raises RuntimeError."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def first_sync(err: BaseException) -> dict:
    """Where the sync happened: the message and the innermost segkit frame."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "segkit" in f.filename]
    where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "outside segkit"
    return {"sync_found": str(err).splitlines()[0], "where": where}


def training(root: Path, steps: int, batch: int, crop: int, warmup: int) -> dict:
    """`steps` training steps of the embedded nuclei config under sync errors, after `warmup` steps without
    (cuDNN's autotuning and the allocator's first allocations may wait)."""
    cfg = load_config(ROOT / "configs" / "nuclei-sigmoid.yaml",
                      [f"data.root={root}", "train.device=cuda", f"train.batch_size={batch}", f"train.crop={crop}",
                       f"train.steps_per_epoch={warmup + steps}", "train.epochs=1", "train.amp=true"])
    run = build_run(cfg, run_device(cfg))
    run.sampler.set_epoch(0)
    run.model.train()
    batches = iter(run.loader)
    losses = [train_step(run, run.model, next(batches)) for _ in range(warmup)]
    items = [next(batches) for _ in range(steps)]  # loaded first: the loader's own waits are not the step's
    torch.cuda.synchronize()
    result: dict = {"steps": steps, "batch": batch, "crop": crop, "amp": str(run.dtype)}
    with Utilisation() as util:
        began = time.perf_counter()
        try:
            with sync_errors():
                for item in items:
                    losses.append(train_step(run, run.model, item))
        except RuntimeError as err:
            result.update(first_sync(err))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    result.setdefault("sync_found", None)
    result.update(images_per_s=steps * batch / seconds, gpu_utilisation=util.mean,
                  loss_read_back=float(torch.stack(losses[-steps:]).mean()))  # the one read-back, after
    return result


def prediction(steps: int, batch: int, size: int) -> dict:
    """`steps` batches of `batch` real size x size images through a Segmenter under sync errors: input
    normalisation, forward pass and decoding on the device; the masks are copied back after each batch, the
    one sync that prediction needs (outside the checked part)."""
    from benchmarks.common import checkpoint
    from segkit.infer import Segmenter

    ckpt = checkpoint(ROOT / "bench-out" / "gpu_sync_ckpt", ["background", "nucleus"])
    seg = Segmenter.load(ckpt, device="cuda", batch_size=batch)
    images = real_images(batch, size)

    def one() -> torch.Tensor:
        return seg.head.decode(seg.forward(seg.to_input(images)))

    for _ in range(3):
        one().cpu()
    torch.cuda.synchronize()
    result: dict = {"batches": steps, "batch": batch, "size": size}
    with Utilisation() as util:
        began = time.perf_counter()
        try:
            for _ in range(steps):
                with sync_errors():
                    mask = one()
                mask.cpu()
        except RuntimeError as err:
            result.update(first_sync(err))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    result.setdefault("sync_found", None)
    result.update(images_per_s=steps * batch / seconds, gpu_utilisation=util.mean)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--root", type=Path, default=ROOT / "data" / "nuclei")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks.gpu_sync needs CUDA: it proves the absence of host-device syncs on a GPU, which a CPU "
              "run cannot show. Run it on a machine with an NVIDIA GPU.")
        return
    result = {"machine": machine(torch.device("cuda")),
              "train": training(args.root, args.steps, args.batch, args.crop, warmup=10),
              "predict": prediction(args.steps, args.batch, args.crop)}
    write_result(args.out, "gpu_sync", result)
    if result["train"]["sync_found"] or result["predict"]["sync_found"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
