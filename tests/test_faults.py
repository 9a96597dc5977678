"""Faults from the file system: input folders with link loops (the walk ends, each image once) and a
disk that fills up while outputs or checkpoints are written (the previous files stay byte-identical,
no temporary file is left, the error names the disk, the file and the fix; predict reports each output
that does not fit and writes every other one). The full disk is both
simulated at the level of file writes and, where the system lets a test mount one, a real tiny tmpfs,
so that GDAL's own C writes meet a real ENOSPC."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image
from rasterio.windows import Window

import volumedata
from conftest import NUCLEI, ROOT, run_cli, small_nuclei_stems
from samples import SPACENET
from segkit.data.io import write_bytes
from segkit.data.normalize import Normalization
from segkit.data.readers import Geometry
from segkit.data.writers import writer_for
from segkit.errors import DataError, SegkitError
from segkit.heads import build_head
from segkit.infer import list_images
from segkit.model import build_model, checkpoint_meta, save_checkpoint

ALBERS = SPACENET / "unlabelled" / "albers_3band_int16_nodata.tif"
PREDICT = ("--device", "cpu", "--no-progress", "--workers", "0")


def _checkpoint(folder: Path, seed: int) -> Path:
    """A tiny random-weight sigmoid U-Net; another seed gives other weights and other masks."""
    torch.manual_seed(seed)
    head = build_head("sigmoid", ["nucleus"])
    save_checkpoint(folder, build_model("Unet", "resnet18", head.channels),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3)))
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones too: a left temporary file shows) -> sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nuclei(folder: Path, n: int) -> list[str]:
    """`n` real nuclei test images, their top-left 64x72 pixels (small: quick to predict), saved
    into `folder` as PNG; their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}.png" for stem in small_nuclei_stems(n, "test")]
    for name in names:
        with Image.open(NUCLEI / "test" / "images" / name) as im:
            im.crop((0, 0, 72, 64)).save(folder / name)
    return names


# -- symbolic link loops in an input folder -----------------------------------------------------


def _looped_folder(tmp_path: Path) -> Path:
    """in/x.png, in/a/y.png, in/loop -> ., in/a/b -> .., in/ext -> ../outside (outside/z.png), in/ext2 -> the same."""
    inp = tmp_path / "in"
    x, y, z = _nuclei(tmp_path / "real", 3)
    (inp / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    shutil.copy(tmp_path / "real" / x, inp / "x.png")
    shutil.copy(tmp_path / "real" / y, inp / "a" / "y.png")
    shutil.copy(tmp_path / "real" / z, tmp_path / "outside" / "z.png")
    (inp / "loop").symlink_to(".", target_is_directory=True)
    (inp / "a" / "b").symlink_to("..", target_is_directory=True)
    (inp / "ext").symlink_to("../outside", target_is_directory=True)
    (inp / "ext2").symlink_to("../outside", target_is_directory=True)
    return inp


def test_list_images_reads_each_real_folder_once_and_names_the_links_it_skips(tmp_path, caplog):
    inp = _looped_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="segkit"):
        files = list_images(inp)
    # a link to a folder outside is followed (once); loops and the second link are skipped
    assert [p.relative_to(inp).as_posix() for p in files] == ["a/y.png", "ext/z.png", "x.png"]
    skipped = sorted(r.getMessage().split(":")[0] for r in caplog.records)
    assert skipped == sorted(str(p) for p in (inp / "a" / "b", inp / "ext2", inp / "loop"))
    assert all("already read" in r.getMessage() for r in caplog.records)


def test_list_images_prefers_a_real_folder_to_a_link_to_it(tmp_path):
    """`alias -> real` sorts before `real`, but the real folder's own path names the outputs."""
    inp = tmp_path / "in"
    (inp / "real").mkdir(parents=True)
    _nuclei(inp / "real", 1)
    (inp / "alias").symlink_to("real", target_is_directory=True)
    assert [p.relative_to(inp).parts[0] for p in list_images(inp)] == ["real"]


class Hung(Exception):
    """Raised by the alarm of a run that should have ended (no OSError: readers turn those into messages)."""


def _hung(signum: int, frame: object) -> None:
    raise Hung("predict ran 300 s on 3 tiny images: the walk follows the links round the loops")


def test_predict_on_a_folder_with_link_loops_finishes_and_predicts_each_image_once(tmp_path, caplog,
                                                                                   content_checkpoints):
    inp = _looped_folder(tmp_path)
    ckpt = content_checkpoints["sigmoid"]
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGALRM, _hung)  # a walk that follows the loops would never end
    signal.alarm(300)
    try:
        with caplog.at_level(logging.WARNING, logger="segkit"):
            r = run_cli("predict", ckpt, inp, out, *PREDICT)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert r.code == 0, r
    assert "3 images" in r.out and "Traceback" not in r.err
    assert sorted(_snapshot(out)) == ["nucleus/a/y.png", "nucleus/ext/z.png", "nucleus/x.png"]
    said = [record.getMessage() for record in caplog.records]
    for link in (inp / "loop", inp / "a" / "b", inp / "ext2"):
        assert any(m.startswith(f"{link}: skipped") for m in said), (link, said)
    for rel, real in (("x.png", inp / "x.png"), ("a/y.png", inp / "a" / "y.png"),
                      ("ext/z.png", tmp_path / "outside" / "z.png")):
        with Image.open(out / "nucleus" / rel) as mask, Image.open(real) as image:
            assert mask.size == image.size, rel


# -- a disk that fills up, simulated at the level of file writes ------------------------------------


class FillingDisk:
    """`free` bytes left on the disk below `root`: every write to a file opened there takes from it,
    and the write that does not fit writes what does, then fails with ENOSPC, as the kernel's short
    write followed by a failing one does. Installed over builtins.open and io.open (pathlib, PIL)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, free: int) -> None:
        self.root, self.free, self.failed = root.resolve(), free, 0
        real_open = builtins.open

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            if writing and isinstance(file, (str, os.PathLike)) and self.root in Path(file).resolve().parents:
                return _Filling(f, self)
            return f

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)


class _Filling:
    """A file object whose writes draw on a FillingDisk."""

    def __init__(self, f, disk: FillingDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self._disk.free:
            self._f.write(view[:self._disk.free])
            self._f.flush()
            self._disk.free, self._disk.failed = 0, self._disk.failed + 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= len(view)
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _Filling:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_the_simulated_disk_fills_like_a_real_one(tmp_path, monkeypatch):
    """The helper itself: a short write, then ENOSPC; files elsewhere are not counted."""
    disk = FillingDisk(monkeypatch, tmp_path / "disk", free=10)
    (tmp_path / "disk").mkdir()
    (tmp_path / "elsewhere.bin").write_bytes(b"x" * 100)
    with pytest.raises(OSError) as err:
        (tmp_path / "disk" / "f.bin").write_bytes(b"0123456789abc")
    assert err.value.errno == errno.ENOSPC and disk.failed == 1
    assert (tmp_path / "disk" / "f.bin").read_bytes() == b"0123456789"


def test_write_bytes_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "mask.npy"
    write_bytes(target, b"previous mask")
    disk = FillingDisk(monkeypatch, tmp_path / "out", free=4)
    with pytest.raises(DataError) as err:
        write_bytes(target, b"the new and longer mask")
    assert disk.failed == 1
    assert str(err.value) == (f"{target}: cannot write it: disk full (no space left on device). "
                              "Fix: free space on that disk, or write to another disk.")
    assert _snapshot(tmp_path / "out") == {"mask.npy": hashlib.sha256(b"previous mask").hexdigest()}


def test_a_checkpoint_saved_on_a_full_disk_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path / "best", seed=0)
    before = _snapshot(folder)
    assert sorted(before) == ["model.json", "model.safetensors"]
    disk = FillingDisk(monkeypatch, folder, free=1 << 20)  # 1 MiB left: the 57 MB of weights do not fit
    with pytest.raises(DataError) as err:
        _checkpoint(folder, seed=1)
    assert disk.failed == 1
    assert str(err.value).startswith(f"{folder / 'model.safetensors'}: cannot write it: disk full")
    assert "Fix: free space" in str(err.value)
    assert _snapshot(folder) == before  # old weights and model.json, byte for byte; no temporary file


FULL_DISK = re.compile(r"^failed: (\S+): cannot write it: disk full \(no space left on device\)\. "
                       r"Fix: free space on that disk, or write to another disk\.$", re.M)


def _refused(err: str, out: Path) -> list[str]:
    """The outputs predict's `failed:` lines name as not written for a full disk, relative to `out`."""
    return [Path(p).relative_to(out).as_posix() for p in FULL_DISK.findall(err)]


def _counts(out: str) -> tuple[int, int]:
    """(images written, images failed) from predict's summary line."""
    found = re.search(r"^(\d+) images in .*, (\d+) failed; masks in", out, re.M)
    assert found, out
    return int(found[1]), int(found[2])


def _previous_outputs(ref: Path, out: Path) -> None:
    """Outputs unlike those in `ref` under the same names in `out`: masks inverted, probabilities 1 - p."""
    for path in sorted(ref.rglob("*")):
        target = out / path.relative_to(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            with Image.open(path) as im:
                Image.fromarray(255 - np.asarray(im)).save(target)
        elif path.suffix == ".npy":
            np.save(target, 1 - np.load(path))


def test_predict_on_a_full_disk_reports_each_file_and_keeps_the_previous_masks(tmp_path, monkeypatch,
                                                                               content_checkpoints):
    """Masks (PNG) and probabilities (.npy) over previous outputs, with room for about one mask:
    each image whose outputs do not fit is reported, naming the file (exit 1); what was replaced is
    the new complete file, the rest the previous one, byte for byte."""
    inp, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    _nuclei(inp, 3)
    new = content_checkpoints["sigmoid"]
    assert run_cli("predict", new, inp, ref, *PREDICT, "--save-probs").code == 0
    _previous_outputs(ref, out)
    before, after_ok = _snapshot(out), _snapshot(ref)
    assert sorted(before) == sorted(after_ok) and len(before) == 6
    assert all(before[k] != after_ok[k] for k in before)
    disk = FillingDisk(monkeypatch, out, free=min((out / k).stat().st_size for k in before) + 100)
    r = run_cli("predict", new, inp, out, *PREDICT, "--save-probs", "--overwrite")
    assert disk.failed >= 1
    assert r.code == 1 and "Traceback" not in r.err + r.out, r
    named = _refused(r.err, out)
    assert named and len(named) == r.err.count("failed: "), r.err  # every failure: a full disk, naming the file
    assert _counts(r.out) == (3 - len(named), len(named))
    now = _snapshot(out)
    assert sorted(now) == sorted(before)  # no temporary file left
    assert all(now[k] == before[k] for k in named)
    assert all(now[k] in (before[k], after_ok[k]) for k in now)


def test_predict_volumes_on_a_full_disk_reports_each_case_and_writes_what_fits(tmp_path, monkeypatch,
                                                                              tmp_path_factory):
    """Three NIfTI cases (a region model: a label map and a mask per region each) with room for the first
    case's files and part of the second's: the cases that do not fit are reported by file (exit 1), the first
    is written complete and equal to a run with room, nothing partial is left. Before, the first refused
    write ended the command with no summary."""
    ckpt = volumedata.region_content(tmp_path_factory)
    inp, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    volumedata.thick_regions(tmp_path / "data")
    shutil.copytree(tmp_path / "data" / "imagesTr", inp)
    assert run_cli("predict", ckpt, inp, ref, "--device", "cpu", "--no-progress").code == 0
    files = _snapshot(ref)
    first = [k for k in files if volumedata.REGION_CASES[0] in k]
    assert len(files) == 3 * len(first) and len(first) >= 2
    room = sum((ref / k).stat().st_size for k in first)
    disk = FillingDisk(monkeypatch, out, free=room + 40)  # the second case's first file does not fit
    r = run_cli("predict", ckpt, inp, out, "--device", "cpu", "--no-progress")
    assert disk.failed >= 1
    assert r.code == 1 and "Traceback" not in r.err + r.out, r
    named = _refused(r.err, out)
    assert len(named) == 2 == r.err.count("failed: "), r.err
    assert all(volumedata.REGION_CASES[0] not in n for n in named)
    found = re.search(r"^(\d+) volumes \((\d+) slices\) in .*, (\d+) failed; masks in", r.out, re.M)
    assert found and (int(found[1]), int(found[3])) == (1, 2), r.out
    now = _snapshot(out)
    assert sorted(now) == sorted(first)  # the first case complete, nothing of the others, no temporary file
    assert all(now[k] == files[k] for k in first)


def test_predict_reports_an_output_the_disk_refuses_and_writes_every_other(tmp_path, monkeypatch,
                                                                            content_checkpoints):
    """ENOSPC while one image's mask is written (half of it on disk): predict names that file, leaves
    nothing of it, writes every other image's mask and probabilities complete and exits 1 at the end."""
    inp, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    names = _nuclei(inp, 3)
    checkpoint = content_checkpoints["sigmoid"]
    assert run_cli("predict", checkpoint, inp, ref, *PREDICT, "--save-probs").code == 0
    victim = names[1]
    real_save = Image.Image.save

    def save(image: Image.Image, fp, *args, **kwargs) -> None:
        if Path(fp).name.startswith(f".{victim}."):  # the temporary file beside OUT/nucleus/<victim>
            buf = io.BytesIO()
            real_save(image, buf, *args, **kwargs)
            Path(fp).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    r = run_cli("predict", checkpoint, inp, out, *PREDICT, "--save-probs")
    assert r.code == 1 and "Traceback" not in r.err + r.out, r
    assert _refused(r.err, out) == [f"nucleus/{victim}"] and r.err.count("failed: ") == 1, r.err
    assert _counts(r.out) == (2, 1)
    want = {k: v for k, v in _snapshot(ref).items() if Path(k).stem != Path(victim).stem}
    assert len(want) == 4 and _snapshot(out) == want  # the others byte for byte; no part of the victim


class _TruncatedOnClose:
    """A rasterio dataset whose close() returns normally but leaves the file cut in half: what GDAL
    does on a full disk (it prints the error on stderr; rasterio's close() does not raise)."""

    def __init__(self, ds, path: Path) -> None:
        self._ds, self._path = ds, path

    def close(self) -> None:
        self._ds.close()
        os.truncate(self._path, self._path.stat().st_size // 2)

    def __getattr__(self, name: str):
        return getattr(self._ds, name)


def _geotiff_outputs(out: Path, seed: int) -> None:
    """Sigmoid GeoTIFF mask and probabilities of `scene.tif` on the real Albers grid, from seeded noise."""
    with rasterio.open(ALBERS) as src:
        geometry = Geometry(96, 160, src.crs.to_wkt(), tuple(src.transform)[:6])
    probs = np.random.default_rng(seed).random((1, 96, 160), dtype=np.float32)
    writer = writer_for(build_head("sigmoid", ["nucleus"]), Path("scene.tif"), out, geometry, probs=True)
    writer.write_rows(0, probs > 0.5, None, probs)
    writer.close()


@pytest.mark.parametrize("free, says", [(None, "GDAL left an incomplete file"),
                                        (4096, "disk full (no space left on device)")])
def test_a_geotiff_left_truncated_by_gdal_never_replaces_the_previous_one(tmp_path, monkeypatch, free, says):
    out = tmp_path / "out"
    _geotiff_outputs(out, seed=0)
    before = _snapshot(out)
    assert sorted(before) == ["nucleus/scene.tif", "scene_probs.tif"]
    real_open = rasterio.open
    monkeypatch.setattr(rasterio, "open", lambda path, mode="r", **kw: _TruncatedOnClose(
        real_open(path, mode, **kw), Path(path)) if mode == "w" else real_open(path, mode, **kw))
    if free is not None:
        usage = shutil.disk_usage(out)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.raises(SegkitError) as err:
        _geotiff_outputs(out, seed=1)
    assert str(err.value).startswith(f"{out / 'nucleus' / 'scene.tif'}: cannot write it")
    assert says in str(err.value) and "Fix:" in str(err.value)
    assert _snapshot(out) == before  # both previous files, byte for byte; no temporary file


def test_outputs_get_the_permissions_of_a_plainly_created_file(tmp_path):
    """Temporary files are created 0600; the masks that replace outputs must be readable as any new
    file of the user is (a cluster folder others read), for PNG, .npy and GDAL's GeoTIFFs alike."""
    (tmp_path / "plain").write_bytes(b"")
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert mode != 0o600  # the umask of this test run lets a difference show
    write_bytes(tmp_path / "out" / "a.npy", b"x")
    _geotiff_outputs(tmp_path / "out", seed=0)
    for name in ("a.npy", "nucleus/scene.tif", "scene_probs.tif"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == mode, name


# -- a real full disk: a tiny tmpfs in a private mount namespace --------------------------------------


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


FILL = """
import os, sys
path, left = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    try:
        while True:
            f.write(b"\\0" * 65536)
            f.flush()
    except OSError:
        pass
os.truncate(path, max(0, os.path.getsize(path) - left))
"""


@pytest.mark.slow
def test_predict_on_a_real_full_disk_keeps_previous_masks_and_geotiffs(tmp_path):
    """PNG masks, .npy probabilities, and GeoTIFF masks and probabilities written by GDAL, onto a
    16 KiB-free tmpfs over a first model's outputs: each file that does not fit is named with the
    full disk (exit 1), each file is the old one or the second model's complete one, no temporary file."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs here (needs `unshare -rm` and tmpfs mounts in user namespaces)")
    inp, old_out, ref, out, after = (tmp_path / n for n in ("in", "old_out", "ref", "out", "after"))
    _nuclei(inp, 2)
    with rasterio.open(ALBERS) as src:  # a real 3-band int16 GeoTIFF, cut to 160x96 on its own grid
        window = Window(100, 200, 160, 96)
        profile = {**src.profile, "width": 160, "height": 96,
                   "transform": src.transform @ Affine.translation(window.col_off, window.row_off)}
        with rasterio.open(inp / "albers.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    old, new = _checkpoint(tmp_path / "old", 0), _checkpoint(tmp_path / "new", 1)
    assert run_cli("predict", old, inp, old_out, *PREDICT, "--save-probs").code == 0
    assert run_cli("predict", new, inp, ref, *PREDICT, "--save-probs").code == 0
    before, after_ok = _snapshot(old_out), _snapshot(ref)
    assert sorted(before) == sorted(after_ok) and len(before) == 6 and "albers_probs.tif" in before
    assert all(before[k] != after_ok[k] for k in before)
    out.mkdir()
    after.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs '{out}' && cp -a '{old_out}/.' '{out}/' && "
              f"'{sys.executable}' -c '{FILL}' '{out}/filler' 16384 && "
              f"'{sys.executable}' -m cli predict '{new}' '{inp}' '{out}' {' '.join(PREDICT)} --save-probs --overwrite;"
              f" echo $? > '{tmp_path}/rc'; rm -f '{out}/filler'; cp -a '{out}/.' '{after}/'")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert (tmp_path / "rc").read_text().strip() == "1", done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    named = _refused(done.stderr, out)
    assert named and len(named) == done.stderr.count("failed: "), done.stderr[-3000:]
    assert _counts(done.stdout) == (3 - len(named), len(named))
    now = _snapshot(after)
    assert sorted(now) == sorted(before), now  # no temporary file left
    assert all(now[k] == before[k] for k in named)
    assert all(now[k] in (before[k], after_ok[k]) for k in now), {k: (now[k] == before[k], now[k] == after_ok[k])
                                                                 for k in now}
    assert sum(now[k] == before[k] for k in now) >= 1
