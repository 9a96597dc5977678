"""Pictures: learning curves, mask overlays with a legend, comparison panels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from segkit.data.io import atomic_path  # noqa: E402


def plot_curves(history: Sequence[dict], path: Path, metric: str = "val_mean_dice") -> None:
    """Loss (train and validation) and the validation metric per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [row[metric] for row in history], color="tab:green")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=metric.replace("_", " "), ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
