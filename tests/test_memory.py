"""Memory that a long training must give back: the learning-curves figure it draws every few epochs
(`benchmarks/soak.py` measures the whole run)."""

from __future__ import annotations

import gc
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from segkit.viz import plot_curves

HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.5 / e, "val_mean_dice": 0.1 * e} for e in range(1, 8)]


def figures_alive() -> int:
    return sum(type(o) is Figure for o in gc.get_objects())  # not isinstance: reading every __class__ warns on torch aliases


def plot_without_automatic_gc(path: Path) -> int:
    """Figures alive after `plot_curves`, with the automatic collector off: only plot_curves' own
    collection can free its figure (a reference cycle), as in a training process where a full
    collection comes rarely."""
    gc.collect()
    before = figures_alive()
    gc.disable()
    try:
        plot_curves(HISTORY, path)
        return figures_alive() - before
    finally:
        gc.enable()


def test_curves_figure_is_freed_on_return(tmp_path: Path) -> None:
    """Each curves.png left its figure (~2 MiB with its Agg buffer) until a full collection."""
    assert plot_without_automatic_gc(tmp_path / "curves.png") == 0
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (1000, 400)  # figsize (10, 4) at 100 dpi: the figure was drawn and saved


def test_curves_leave_a_callers_frozen_objects_frozen(tmp_path: Path) -> None:
    """gc.freeze is process-wide: plot_curves must not unfreeze what its caller froze, and still frees its figure."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        assert plot_without_automatic_gc(tmp_path / "curves.png") == 0
        assert gc.get_freeze_count() > 0.99 * frozen  # still frozen (less the few that refcounting freed)
    finally:
        gc.unfreeze()
