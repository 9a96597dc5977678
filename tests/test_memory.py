"""Memory that a long training must give back: the learning-curves figure it draws every few epochs,
and the heap pages it frees between epochs (`benchmarks/soak.py` measures the whole run)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from PIL import Image

from conftest import ROOT
from segkit.checkpoints import _MALLOC_TRIM
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


HEAP_CHECK = """
from pathlib import Path
from segkit.checkpoints import release_free_memory

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")

before = rss_mib()
blocks = [b"\\x01" * (64 << 10) for _ in range(2048)]  # written, so resident
grown = rss_mib() - before
kept = blocks[15::16]
del blocks
held = rss_mib()
release_free_memory()
print(len(kept), grown, held - rss_mib())
"""


@pytest.mark.skipif(_MALLOC_TRIM is None, reason="glibc's malloc_trim only (Linux)")
def test_free_heap_pages_between_live_blocks_go_back_to_the_system() -> None:
    """128 MiB of 64 KiB blocks (below glibc's mmap threshold: on the heap), 15 of every 16 freed:
    glibc keeps those pages (a live block above each run of free ones), as it kept validation's and
    the checkpoint's buffers between epochs; release_free_memory must return them. In a fresh process:
    in this one, free heap left by earlier tests takes part of the blocks, so less of them is new."""
    done = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    kept, grown, returned = (float(v) for v in done.stdout.split())
    assert kept == 128 and grown > 100
    assert returned >= 0.8 * grown * 15 / 16  # page-aligned runs of ~960 KiB go back nearly whole
