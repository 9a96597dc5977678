"""Trust at the edges: class names that would leave the output folder, errors by cause (permission,
disk full) rather than "replace the file", `--nproc` only where it means something, the program's exit
status, encoder weights that must fit, and a compare report whose every named file exists. Real files from
data/nuclei and the samples in tests/data; crafted checkpoints, weight files and failing writes."""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from safetensors.torch import save_file

import samples
from conftest import CONFIGS, NUCLEI, TINY, assert_refused, run_cli, small_nuclei_stems
from cli.app import _pop_nproc
from segkit.data.io import atomic_path, read_image, write_bytes
from segkit.data.normalize import Normalization
from segkit.data.readers import Geometry
from segkit.data.readers.gdal import GdalRaster
from segkit.data.writers import PngWriter, output_files, writer_for
from segkit.errors import ConfigError, DataError, SegkitError
from segkit.heads import build_head
from segkit.model import build_model, checkpoint_meta, save_checkpoint

SPACENET = samples.SPACENET / "images" / "buildings.tif"
NUCLEI_TEST = sorted((NUCLEI / "test" / "images").iterdir())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes: what a refused command must leave unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_checkpoint(folder: Path, head_name: str, classes: list[str]) -> Path:
    """A random-weight resnet18 U-Net checkpoint (model.safetensors + model.json)."""
    torch.manual_seed(0)
    head = build_head(head_name, classes)
    meta = checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3),
                           data={"mask": "multilabel"})
    save_checkpoint(folder, build_model("Unet", "resnet18", head.channels), meta)
    return folder


# -- class names become folder names ---------------------------------------------------------


@pytest.mark.parametrize("name, says", [
    *[(f"a{c}b", f"contains {c!r}") for c in ("/", "\\", "\x00", "\t", "\n", "\x7f", ":", "*", "?", "<", ">", '"',
                                            "|")],
    ("../../x", "contains '/'"), ("/abs", "contains '/'"), ("..", "parent folder"), (".", "parent folder"),
    ("", "is empty"), ("trailing.", "ends with '.'"), (" lead", "starts or ends"), ("trail ", "starts or ends"),
    ("CON", "device name"), ("nul.txt", "device name"), ("com1", "device name"), (7, "not text"),
])
@pytest.mark.parametrize("head_name", ["sigmoid", "softmax"])
def test_unsafe_class_names_are_refused_naming_the_class_and_the_fix(name, says, head_name):
    classes = [name] if head_name == "sigmoid" else ["background", name]
    with pytest.raises(ConfigError) as err:
        build_head(head_name, classes)
    text = str(err.value)
    assert repr(name) in text and says in text, text
    assert "Fix: rename the class" in text
    suggested = re.search(r"e\.g\. to '([^']*)'", text).group(1)
    build_head("sigmoid", [suggested])  # the suggested name is itself accepted


def test_class_names_that_differ_only_in_case_are_refused():
    with pytest.raises(ConfigError, match="'Car' and 'car' differ only in case"):
        build_head("sigmoid", ["Car", "car"])


def test_a_string_instead_of_a_list_of_classes_is_refused():
    with pytest.raises(ConfigError, match="not a list of class names"):
        build_head("sigmoid", "nucleus")


@pytest.mark.parametrize("crop", ["256", 0, 12.5])
def test_predict_with_a_crafted_checkpoint_crop_exits_2_and_writes_nothing(tmp_path, crop):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "sigmoid", ["nucleus"])
    meta = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**meta, "crop": crop}))
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(NUCLEI_TEST[0], images / NUCLEI_TEST[0].name)
    before = snapshot(tmp_path)
    result = run_cli("predict", ckpt, images, tmp_path / "out", "--device", "cpu", "--no-progress", "--workers", "0")
    assert_refused(result, tmp_path / "out", "model.json: crop", "Fix: set it to the run's train.crop")
    assert snapshot(tmp_path) == before


def test_ordinary_class_names_are_accepted():
    names = ["nucleus", "spinal_cord", "pigment network", "Zellkern-2", "v1.2", "Straße", "血管", "SignSymbol"]
    assert build_head("sigmoid", names).classes == names


def test_predict_with_a_crafted_checkpoint_class_exits_2_and_writes_nothing(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "sigmoid", ["nucleus"])
    meta = json.loads((ckpt / "model.json").read_text())
    meta["classes"] = ["../../escape"]
    (ckpt / "model.json").write_text(json.dumps(meta))
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(NUCLEI_TEST[0], images / NUCLEI_TEST[0].name)
    out = tmp_path / "a" / "b" / "out"  # OUT/../../escape would be tmp_path/a/escape
    before = snapshot(tmp_path)
    result = run_cli("predict", ckpt, images, out, "--device", "cpu", "--no-progress", "--workers", "0")
    assert_refused(result, out, "'../../escape'", "Fix: rename the class")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "a").exists()


def test_train_on_a_dataset_json_with_an_unsafe_label_exits_2_and_writes_nothing(tmp_path):
    data = tmp_path / "hippo"
    shutil.copytree(samples.HIPPO, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "../../x": 1, "posterior": 2}
    (data / "dataset.json").write_text(json.dumps(meta))
    config = tmp_path / "hippo.yaml"
    config.write_text(f"data: {{root: {data}}}\nmodel: {{head: softmax}}\n")
    out = tmp_path / "run"
    r = run_cli("train", config, "--out", out, "--epochs", "1", *TINY)
    assert_refused(r, out, "'../../x'", "Fix: rename the class")


def _escaping_head():
    """A sigmoid head whose class was changed after its checks: what the writers must still refuse."""
    head = build_head("sigmoid", ["nucleus"])
    head.classes = ["../../escape"]
    return head


def test_output_planning_refuses_paths_outside_the_output_folder():
    with pytest.raises(SegkitError, match="outside the output folder"):
        output_files(_escaping_head(), Path("img.png"), None, probs=False, vectorize=False)
    with pytest.raises(SegkitError, match="outside the output folder"):
        output_files(build_head("sigmoid", ["nucleus"]), Path("../up.png"), None, probs=False, vectorize=False)


def test_png_writer_refuses_an_escaping_class_and_writes_nothing(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    writer = PngWriter(_escaping_head(), Path("img.png"), out, Geometry(8, 8), True)
    writer.write_rows(0, np.ones((1, 8, 8), bool), None, np.ones((1, 8, 8), np.float16))
    with pytest.raises(SegkitError, match="outside the output folder"):
        writer.close()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_png_writer_refuses_a_link_out_of_the_output_folder(tmp_path):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "nucleus").symlink_to(elsewhere, target_is_directory=True)  # OUT/nucleus/... would land in elsewhere/
    writer = PngWriter(build_head("sigmoid", ["nucleus"]), Path("img.png"), out, Geometry(8, 8), False)
    writer.write_rows(0, np.ones((1, 8, 8), bool), None, None)
    with pytest.raises(SegkitError, match="outside the output folder"):
        writer.close()
    assert list(elsewhere.iterdir()) == []


def test_geotiff_writer_refuses_an_escaping_class_and_writes_nothing(tmp_path):
    import rasterio

    with rasterio.open(SPACENET) as ds:
        geometry = Geometry(16, 16, ds.crs.to_wkt(), tuple(ds.transform)[:6])
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(SegkitError, match="outside the output folder"):
        writer_for(_escaping_head(), Path("scene.tif"), out, geometry, probs=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# -- errors by cause -----------------------------------------------------------------------------


def as_unprivileged(action: Callable[[], object]) -> str:
    """'ok', or 'Type: message' of what `action` raised where file permissions apply: in this process
    for an ordinary user; for root (whom permissions do not stop) in a forked child that first drops
    to the unprivileged uid/gid 65534 and runs torch on one thread (a forked process must not enter the
    parent's OpenMP pool)."""

    def outcome() -> str:
        try:
            action()
            return "ok"
        except Exception as err:  # the outcome is the assertion's subject
            return f"{type(err).__name__}: {err}"

    if os.geteuid() != 0:
        return outcome()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            torch.set_num_threads(1)
            text = outcome()
        except BaseException as err:
            text = f"setup failed: {err}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        text = f.read().decode()
    if text.startswith("setup failed"):
        pytest.skip(text)
    return text


@pytest.fixture
def locked():
    """copy(src) -> a copy of `src` nobody may read (mode 000), in a folder anyone may enter (under the
    system temp folder, not pytest's private one), so that only the file's own mode refuses."""
    folder = Path(tempfile.mkdtemp(prefix="segkit-locked-"))
    folder.chmod(0o755)

    def copy(src: Path) -> Path:
        path = folder / src.name
        shutil.copy(src, path)
        path.chmod(0o000)
        return path

    yield copy
    shutil.rmtree(folder)


@pytest.mark.parametrize("src, opener", [
    (NUCLEI_TEST[0], read_image),  # Pillow
    (SPACENET, lambda p: read_image(p, channels=1)),  # tifffile, then GDAL for a GeoTIFF
    (SPACENET, GdalRaster),  # GDAL alone: its error does not say why, the system is asked
])
def test_a_file_without_read_permission_is_reported_as_such(locked, src, opener):
    path = locked(src)
    said = as_unprivileged(lambda: opener(path))
    assert said.startswith("DataError:"), said
    assert str(path) in said and "permission denied" in said and "chmod" in said, said
    assert "replace the file" not in said, said


def test_predict_skips_an_unreadable_file_naming_the_cause(tmp_path):
    """A PNG nobody may read (mode 000) beside a readable one, predicted where permissions apply (for root:
    as uid 65534, in a folder anyone may write, under the system temp folder). The readable one is predicted
    first as it is, so every module predict needs is loaded: uid 65534 may not read the interpreter's."""
    work = Path(tempfile.mkdtemp(prefix="segkit-unreadable-"))
    work.chmod(0o777)
    ckpt = tiny_checkpoint(work / "ckpt", "sigmoid", ["nucleus"])
    images, out = work / "in", work / "out"
    images.mkdir()
    shutil.copy(NUCLEI_TEST[0], images / "good.png")
    assert run_cli("predict", ckpt, images, work / "first", "--device", "cpu", "--no-progress", "--workers",
                   "0").code == 0
    shutil.copy(NUCLEI_TEST[1], images / "locked.png")
    (images / "locked.png").chmod(0o000)

    def predict() -> None:
        r = run_cli("predict", ckpt, images, out, "--device", "cpu", "--no-progress", "--workers", "0")
        assert r.code == 1 and "Traceback" not in r.err, r
        assert "locked.png: cannot read it: permission denied" in r.err and "replace the file" not in r.err, r.err
        assert (out / "nucleus" / "good.png").is_file()
        assert not (out / "nucleus" / "locked.png").exists()

    try:
        said = as_unprivileged(predict)
    finally:
        shutil.rmtree(work)
    assert said == "ok", said


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")])
def test_a_refused_write_names_the_cause_and_keeps_the_previous_file(tmp_path, code, says):
    target = tmp_path / "mask.png"
    target.write_bytes(b"previous")
    with pytest.raises(DataError) as err:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise OSError(code, os.strerror(code))
    assert str(target) in str(err.value) and says in str(err.value) and "Fix:" in str(err.value)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no temporary file left


def test_a_real_disk_full_write_is_reported(tmp_path):
    """/dev/full answers every write with ENOSPC: the kernel's own error, through write_bytes."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(DataError, match="x.bin: cannot write it: disk full"):
        with atomic_path(tmp_path / "x.bin"):
            with open("/dev/full", "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
    assert list(tmp_path.iterdir()) == []


def test_a_write_into_a_file_standing_where_a_folder_goes_is_explained(tmp_path):
    (tmp_path / "nucleus").write_bytes(b"a file, not a folder")
    with pytest.raises(DataError, match="a file stands where a folder is needed"):
        write_bytes(tmp_path / "nucleus" / "img.png", b"png")


def test_predict_on_a_full_disk_exits_non_zero_and_keeps_previous_masks(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "sigmoid", ["nucleus"])
    images = tmp_path / "in"
    images.mkdir()
    for path in NUCLEI_TEST[:2]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "out"
    args = ("predict", ckpt, images, out, "--device", "cpu", "--no-progress", "--workers", "0")
    assert run_cli(*args).code == 0
    before = snapshot(out)
    assert len(before) == 2
    real_save = PIL.Image.Image.save

    def full_disk(self, fp, *a, **k):  # half a file gets written, then the disk is full
        real_save(self, fp, *a, **k)
        Path(fp).write_bytes(Path(fp).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    r = run_cli(*args, "--overwrite")
    assert r.code == 1 and "Traceback" not in r.err + r.out, r.err  # each image reported, as an unreadable one
    for path in NUCLEI_TEST[:2]:
        assert f"failed: {out / 'nucleus' / path.name}: cannot write it: disk full" in r.err, r.err
    assert snapshot(out) == before  # every previous mask intact, no temporary file left


# -- --nproc ------------------------------------------------------------------------------------


def test_pop_nproc_takes_it_out_for_train_and_predict():
    assert _pop_nproc(["train", "c.yaml", "--nproc", "3", "--epochs", "1"]) == (3, ["train", "c.yaml", "--epochs", "1"])
    assert _pop_nproc(["predict", "ck", "in", "out", "--nproc=2"]) == (2, ["predict", "ck", "in", "out"])
    assert _pop_nproc(["evaluate", "ck", "data"]) == (1, ["evaluate", "ck", "data"])


@pytest.mark.parametrize("args, says", [
    (["evaluate", "ck", "data", "--nproc", "2"], "only train and predict"),
    (["compare", "c.yaml", "--nproc=2"], "only train and predict"),
    (["inspect", "data", "--nproc", "1"], "only train and predict"),
    (["export", "ck", "m.onnx", "--nproc", "4"], "'export' would run 4 full copies"),
    (["train", "c.yaml", "--nproc", "0"], "at least 1"),
    (["predict", "ck", "in", "out", "--nproc", "-2"], "at least 1"),
    (["train", "c.yaml", "--nproc", "two"], "not a whole number"),
    (["train", "c.yaml", "--nproc"], "not a whole number"),
])
def test_nproc_where_it_means_nothing_exits_2(tmp_path, args, says):
    r = run_cli(*args)
    assert r.code == 2 and r.err.startswith("error: --nproc") and says in r.err, r
    assert "Fix:" in r.err and "Traceback" not in r.err


# -- the program's exit --------------------------------------------------------------------------


class Ended(Exception):
    """What `os._exit` does here instead of ending pytest."""


@pytest.fixture
def program(monkeypatch) -> ModuleType:
    """cli.app with `os._exit` raising `Ended` and logging's shutdown left to pytest."""
    module = importlib.import_module("cli.app")  # the module, not the Typer app `cli` exports by that name

    def fake_exit(status: int) -> None:
        raise Ended(status)

    monkeypatch.setattr(module.os, "_exit", fake_exit)
    monkeypatch.setattr(module.logging, "shutdown", lambda: None)
    return module


def ending(ends: BaseException | None) -> Callable[[], None]:
    def fake_main() -> None:
        if ends is not None:
            raise ends
    return fake_main


@pytest.mark.parametrize("ends, code, err", [
    (None, 0, ""), (SystemExit(2), 2, ""), (SystemExit(None), 0, ""), (SystemExit(130), 130, ""),
    (SystemExit("stopped"), 1, "stopped\n"),
])
def test_the_program_ends_at_once_with_mains_status(program, monkeypatch, capsys, ends, code, err):
    """`console` ends the process at once (no teardown of torch) with the status Python would have given."""
    monkeypatch.setattr(program, "main", ending(ends))
    with pytest.raises(Ended) as ended:
        program.console()
    assert ended.value.args == (code,) and capsys.readouterr().err == err


def test_the_program_ends_the_usual_way_while_a_thread_still_writes(program, monkeypatch):
    """A write left running (a Ctrl-C during the last checkpoint): Python's own exit, which waits for it."""
    release = threading.Event()
    writer = threading.Thread(target=release.wait, name="writer")
    monkeypatch.setattr(program, "main", ending(SystemExit(130)))
    writer.start()
    try:
        with pytest.raises(SystemExit) as ended:
            program.console()
    finally:
        release.set()
        writer.join()
    assert ended.value.code == 130


def test_an_unexpected_error_ends_the_program_with_its_traceback(program, monkeypatch):
    monkeypatch.setattr(program, "main", ending(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        program.console()


class Unwritable(io.StringIO):
    def __init__(self, err: OSError) -> None:
        super().__init__()
        self.err = err

    def flush(self) -> None:
        raise self.err


@pytest.mark.parametrize("err, code, says", [
    (OSError(errno.ENOSPC, "No space left on device"), 120, "error: cannot write stdout (No space left on device)"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 0, ""),
])
def test_output_the_program_could_not_write_makes_its_status_120(program, monkeypatch, capfd, err, code, says):
    """As Python's own exit: a full disk under a redirected stdout is an error (120, said on stderr); a reader
    that went away (`segkit inspect DATA | head`) is not."""
    monkeypatch.setattr(program, "main", ending(None))
    monkeypatch.setattr(sys, "stdout", Unwritable(err))
    with pytest.raises(Ended) as ended:
        program.console()
    assert ended.value.args == (code,) and capfd.readouterr().err.strip() == says


# -- encoder weights must fit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_resnet18(module_tmp) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict (classifier `fc.` included) saved as a tensors-only .pth."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = module_tmp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_encoder_weights_of_torchvision_load_exactly_and_the_classifier_is_logged(torchvision_resnet18, caplog):
    path, state = torchvision_resnet18
    with caplog.at_level("INFO", logger="segkit"):
        model = build_model("Unet", "resnet18", 1, 3, str(path))
    loaded = model.encoder.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert "2 classifier tensor(s) left out (fc.weight, fc.bias)" in caplog.text


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_the_first_convolution_is_adapted_to_other_channel_counts(torchvision_resnet18, channels, caplog):
    path, state = torchvision_resnet18
    with caplog.at_level("INFO", logger="segkit"):
        model = build_model("Unet", "resnet18", 1, channels, str(path))
    rgb = state["conv1.weight"]
    if channels == 1:
        expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    else:  # R, G, B, R, ... scaled by 3 / channels
        expected = torch.stack([rgb[:, i % 3] for i in range(channels)], 1) * 3 / channels
    assert torch.allclose(model.encoder.conv1.weight, expected, atol=1e-7)
    assert f"conv1.weight adapted from 3 to {channels} input channels" in caplog.text


def test_a_whole_model_file_gives_its_encoder(tmp_path):
    torch.manual_seed(2)
    source = build_model("Unet", "resnet18", 2)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "whole.safetensors"))
    model = build_model("Unet", "resnet18", 1, 3, str(tmp_path / "whole.safetensors"))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def _crafted(state: dict[str, torch.Tensor], drop=(), add=None, reshape=None) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if k not in drop}
    out.update(add or {})
    for key, shape in (reshape or {}).items():
        out[key] = torch.zeros(shape)
    return out


@pytest.mark.parametrize("change, says", [
    ({"drop": ["layer4.1.bn2.weight", "layer4.1.bn2.bias"]},
     "2 tensor(s) of the encoder are missing from the file (e.g. layer4.1.bn2.weight, layer4.1.bn2.bias)"),
    ({"add": {"layer5.0.conv1.weight": torch.zeros(1)}},
     "1 tensor(s) of the file are not in the encoder (e.g. layer5.0.conv1.weight)"),
    ({"reshape": {"layer1.0.conv1.weight": (64, 64, 1, 1)}},
     "1 tensor(s) have another shape (e.g. layer1.0.conv1.weight (64, 64, 1, 1) in the file, (64, 64, 3, 3)"),
])
def test_partly_matching_encoder_weights_are_refused(tmp_path, torchvision_resnet18, change, says):
    path = tmp_path / "crafted.safetensors"
    save_file(_crafted(torchvision_resnet18[1], **change), str(path))
    with pytest.raises(ConfigError) as err:
        build_model("Unet", "resnet18", 1, 3, str(path))
    assert says in str(err.value) and str(path) in str(err.value) and "Fix:" in str(err.value), str(err.value)


def test_encoder_weights_strict_false_loads_what_fits(tmp_path, torchvision_resnet18, caplog):
    """model.encoder_weights_strict: false: the tensors that fit are the file's, the others keep their start."""
    path = tmp_path / "crafted.safetensors"
    state = torchvision_resnet18[1]
    save_file(_crafted(state, drop=["layer4.1.bn2.weight"], reshape={"layer1.0.conv1.weight": (64, 64, 1, 1)}),
              str(path))
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", 1, 3, str(path), strict=False)
    torch.manual_seed(0)
    fresh = build_model("Unet", "resnet18", 1, 3)
    got = model.encoder.state_dict()
    assert torch.equal(got["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    assert torch.equal(got["layer1.0.conv1.weight"], fresh.encoder.state_dict()["layer1.0.conv1.weight"])
    assert torch.equal(got["layer4.1.bn2.weight"], fresh.encoder.state_dict()["layer4.1.bn2.weight"])
    assert "encoder_weights_strict: false" in caplog.text and "layer4.1.bn2.weight" in caplog.text


def test_weights_of_another_encoder_are_refused(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(torchvision.models.resnet34().state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"tensor\(s\) of the file are not in the encoder \(e\.g\. layer1\.2\."):
        build_model("Unet", "resnet18", 1, 3, str(path))


@pytest.mark.parametrize("content", [os.urandom(2000), b"", b"PK\x03\x04 not a zip"])
def test_a_damaged_weights_file_is_refused_without_traceback(tmp_path, content):
    path = tmp_path / "damaged.pth"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not a safetensors file or a tensors-only PyTorch file, or damaged"):
        build_model("Unet", "resnet18", 1, 3, str(path))


def test_train_with_partly_matching_encoder_weights_exits_2(tmp_path, tiny_nuclei, torchvision_resnet18):
    path = tmp_path / "partial.safetensors"
    save_file(_crafted(torchvision_resnet18[1], drop=["layer4.1.bn2.weight"]), str(path))
    out = tmp_path / "run"
    r = run_cli("train", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--epochs", "1",
                "--set", f"data.root={tiny_nuclei}", *TINY, "--set", f"model.encoder_weights={path}")
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert "model.encoder_weights" in r.err and "layer4.1.bn2.weight" in r.err and str(path) in r.err


# -- the compare report names only files that exist ----------------------------------------------


def test_every_file_the_compare_report_names_exists(tmp_path):
    """The sigmoid run writes every kind of figure (curves, reliability, thresholds) the report can name."""
    data = tmp_path / "data"
    for i, stem in enumerate(small_nuclei_stems(4)):
        for kind in ("images", "masks"):
            (data / ("train" if i < 3 else "val") / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(NUCLEI / "train" / kind / f"{stem}.png", data / ("train" if i < 3 else "val") / kind)
    out = tmp_path / "cmp"
    r = run_cli("compare", CONFIGS / "nuclei-sigmoid.yaml", "--out", out, "--heads", "sigmoid",
                "--set", f"data.root={data}",
                "--epochs", "1", "--set", "train.steps_per_epoch=1", "--set", "train.crop=64",
                "--set", "train.batch_size=2", "--set", "train.workers=0", "--set", "model.encoder=resnet18",
                "--set", "train.device=cpu")
    assert r.code == 0, r.err
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", md)
    named = re.findall(r"[\w./-]+\.(?:png|json|csv|md|yaml|safetensors|npy|tif)\b", md)
    assert len(links) == 3 and "thresholds_sigmoid.png" in named
    for name in set(links + named):
        assert (out / name).is_file(), f"report.md names {name}, which is not in {sorted(os.listdir(out))}"
