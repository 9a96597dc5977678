"""Optional TensorBoard logging of a training run (`train.tensorboard: true`, extra `tensorboard`):
loss, learning rate and images/s every `train.log_every` steps; per-class validation scores and a
few validation overlays per validated epoch. metrics.csv and curves.png are written regardless."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segkit.errors import ConfigError


class TensorBoardLog:
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard: true needs the tensorboard package. "
                              "Fix: pip install 'segkit[tensorboard]', or set train.tensorboard: false.") from None
        self.writer = SummaryWriter(str(folder))

    def steps(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)

    def epoch(self, epoch: int, row: dict, pictures: list[tuple[str, np.ndarray]]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, float) and np.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        for name, picture in pictures:
            self.writer.add_image(f"val/{name}", picture, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
