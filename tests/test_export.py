"""ONNX export: `segkit export` parity for both heads, ONNX models through Segmenter and `segkit predict`,
a 4-band model, the metadata round trip, refusals."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from segkit.data.normalize import Normalization  # noqa: E402
from segkit.export import parity  # noqa: E402
from segkit.heads import build_head  # noqa: E402
from segkit.infer import Segmenter  # noqa: E402
from segkit.model import build_model, checkpoint_meta, save_checkpoint  # noqa: E402
from conftest import NUCLEI, assert_refused, no_traceback, run_cli  # noqa: E402

HEADS = {"softmax": ["background", "nucleus"], "sigmoid": ["nucleus", "edge"]}
LOGIT_TOL = 1e-4


def _checkpoint(folder, head_name, classes, channels=3, norm=None, thresholds=None, data=None):
    """A random-weight U-Net checkpoint. The head is not scaled up (unlike test_head_compare): the
    onnxruntime/PyTorch differences come from float32 sums inside the network, so scaling the last conv
    scales them with the logits (x50 gives ~1e-3) and leaves the share of near-tie pixels unchanged."""
    torch.manual_seed(0)
    head = build_head(head_name, classes, thresholds=thresholds)
    model = build_model("Unet", "resnet18", head.channels, channels)
    norm = norm or Normalization.unit((0.5,) * channels, (0.25,) * channels)
    save_checkpoint(folder, model, checkpoint_meta(head, "Unet", "resnet18", channels, norm,
                                                   data=data or {"mask": "binary"}))
    return folder


def _nuclei_images(n256: int = 3) -> tuple[list, list]:
    """Paths of `n256` real 256x256 nuclei test images and the 360x360 one."""
    small, large = [], []
    for path in sorted((NUCLEI / "test" / "images").glob("*.png")):
        with Image.open(path) as im:
            (small if im.size == (256, 256) else large).append(path)
    assert len(small) >= n256 and large, "the nuclei test split needs 256x256 images and a larger one"
    return small[:n256], large[:1]


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory):
    """3 real 256x256 nuclei images and the 360x360 one: parity batches of 3 and 1."""
    folder = tmp_path_factory.mktemp("check") / "images"
    folder.mkdir()
    small, large = _nuclei_images()
    for path in small + large:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, check_dir):
    """head -> (checkpoint, model.onnx, CLI result), each exported once through `segkit export`."""
    out = {}
    for name, classes in HEADS.items():
        root = tmp_path_factory.mktemp(name)
        ckpt = _checkpoint(root / "ckpt", name, classes, thresholds=[0.4, 0.6] if name == "sigmoid" else None)
        result = run_cli("export", ckpt, root / "model.onnx", "--check-images", check_dir)
        out[name] = (ckpt, root / "model.onnx", result)
    return out


def _printed(result, label: str) -> float:
    match = re.search(rf"{re.escape(label)} ([0-9.e+-]+)", result.out)
    assert match, (label, result.out)
    return float(match.group(1))


@pytest.mark.parametrize("head", HEADS)
def test_export_command_reports_parity_on_real_images(exported, head):
    _, onnx_path, r = exported[head]
    assert r.code == 0, (r.out, r.err)
    assert no_traceback(r.out + r.err)
    assert onnx_path.is_file() and not list(onnx_path.parent.glob(".model.onnx.*"))  # no temp file left
    assert "4 of 4 images" in r.out and "3 x 256x256" in r.out and "1 x 360x360" in r.out
    assert re.search(r"whole 3 x 256x256 .*0 px differ", r.out) and re.search(r"whole 1 x 360x360 .*0 px differ", r.out)
    assert re.search(r"tiled 512x512 \(tile 256, overlap 64\) .*0 px differ", r.out), r.out
    assert _printed(r, "max |logit difference|") <= LOGIT_TOL
    assert "mask agreement 100.0000%" in r.out


@pytest.mark.parametrize("head", HEADS)
def test_onnx_logits_match_pytorch_at_two_sizes_and_batches(exported, head):
    ckpt, onnx_path, _ = exported[head]
    small, large = _nuclei_images()
    pt = Segmenter.load(ckpt, device="cpu", amp=False)
    ox = Segmenter.load(onnx_path, device="cpu", amp=False)
    assert ox.model.providers == ["CPUExecutionProvider"]
    for paths in (small, large):  # batch 3 of 256x256, batch 1 of 360x360 (padded to 384 inside)
        arrays = [pt.open(p).read() for p in paths]
        a, b = pt.forward(pt.to_input(arrays)), ox.forward(ox.to_input(arrays))
        assert a.shape == b.shape == (len(paths), 2, *arrays[0].shape[:2])
        assert (a - b).abs().max() <= LOGIT_TOL
        assert torch.equal(pt.head.decode(a), ox.head.decode(b))
    result = parity(ckpt, onnx_path, small + large)  # the library's own check, tiled mosaic included
    assert result["max_abs_logit_diff"] <= LOGIT_TOL and result["pixels_differing"] == 0
    assert [p["name"] for p in result["parts"]][-1].startswith("tiled")


@pytest.mark.parametrize("head", HEADS)
def test_predict_with_the_onnx_file_writes_the_same_masks(exported, check_dir, tmp_path, head):
    ckpt, onnx_path, _ = exported[head]
    # --tile 256: the 360x360 image goes through blended windows, the 256x256 ones through one batch.
    common = ("--device", "cpu", "--tile", 256, "--overlap", 64, "--workers", 0, "--no-progress")
    r1 = run_cli("predict", ckpt, check_dir, tmp_path / "pt", *common)
    r2 = run_cli("predict", onnx_path, check_dir, tmp_path / "onnx", *common)
    assert r1.code == r2.code == 0, (r1.err, r2.err)
    files = sorted(p.relative_to(tmp_path / "pt") for p in (tmp_path / "pt").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*.png"))
    assert len(files) == (4 if head == "softmax" else 8)  # sigmoid: one PNG per class
    for rel in files:
        with Image.open(tmp_path / "pt" / rel) as a, Image.open(tmp_path / "onnx" / rel) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)), rel


def test_metadata_round_trips(exported):
    import onnx

    ckpt, onnx_path, _ = exported["sigmoid"]
    model_json = json.loads((ckpt / "model.json").read_text())
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(props["segkit"]) == model_json
    assert props["head"] == "sigmoid" and json.loads(props["classes"]) == HEADS["sigmoid"]
    assert json.loads(props["thresholds"]) == [0.4, 0.6]
    assert json.loads(props["normalization"]) == model_json["normalization"]
    assert json.loads(props["segkit_export"])["dynamic"] is True
    pt, ox = Segmenter.load(ckpt, device="cpu"), Segmenter.load(onnx_path, device="cpu")
    assert ox.meta == pt.meta and ox.head.metadata() == pt.head.metadata() and ox.classes == HEADS["sigmoid"]
    assert ox.norm == pt.norm and (ox.in_channels, ox.bands, ox.nodata) == (pt.in_channels, pt.bands, pt.nodata)


def test_a_four_band_model_exports_and_runs_on_a_four_band_array(tmp_path):
    norm = Normalization("dataset", (300.0,) * 4, (100.0,) * 4, (0.0,) * 4, (2000.0,) * 4)
    ckpt = _checkpoint(tmp_path / "ckpt", "sigmoid", ["building"], channels=4, norm=norm,
                       data={"mask": "binary", "bands": [1, 2, 3, 4], "nodata": 0})
    r = run_cli("export", ckpt, tmp_path / "m4.onnx")
    assert r.code == 0, (r.out, r.err)
    assert "synthetic images (4 bands" in r.out and "mask agreement 100.0000%" in r.out
    # synthetic 11-bit inputs give logits up to ~30 here: float32 rounding scales with them, so the bound is relative
    scale = float(r.out.split("logits up to ")[1].split(")")[0])
    assert _printed(r, "max |logit difference|") <= LOGIT_TOL * max(1.0, scale)
    image = np.random.default_rng(0).integers(1, 800, (200, 136, 4), dtype=np.uint16)
    image[:20, :30] = 0  # no-data corner
    pt = Segmenter.load(ckpt, device="cpu", amp=False, tile=128, overlap=32)
    ox = Segmenter.load(tmp_path / "m4.onnx", device="cpu", amp=False, tile=128, overlap=32)
    assert (ox.in_channels, ox.bands, ox.nodata, ox.norm) == (4, [1, 2, 3, 4], 0, norm)
    want = pt.logits(image)
    assert (want - ox.logits(image)).abs().max() <= LOGIT_TOL * max(1.0, float(want.abs().max()))  # windows of 128
    a, b = pt.predict(image), ox.predict(image)
    assert b.mask.shape == (1, 200, 136) and np.array_equal(a.mask, b.mask)
    assert b.valid is not None and not b.valid[:20, :30].any() and np.array_equal(a.valid, b.valid)
    with pytest.raises(Exception, match="4 input channel"):
        ox.predict(image[..., :3])


def test_a_static_export_runs_at_its_size_and_says_how_to_tile(exported, check_dir, tmp_path):
    ckpt = exported["softmax"][0]
    small, _ = _nuclei_images(1)
    r = run_cli("export", ckpt, tmp_path / "s.onnx", "--static", "--size", 128, "--check-images", check_dir)
    assert r.code == 0, (r.out, r.err)
    assert "static 1 x C x 128 x 128" in r.out and "mask agreement 100.0000%" in r.out
    image = np.asarray(Image.open(small[0]).convert("RGB"))
    pt = Segmenter.load(ckpt, device="cpu", tile=128, overlap=32, batch_size=3)
    ox = Segmenter.load(tmp_path / "s.onnx", device="cpu", tile=128, overlap=32, batch_size=3)
    assert ox.model.fixed == [1, 3, 128, 128]
    assert (pt.logits(image) - ox.logits(image)).abs().max() <= LOGIT_TOL  # batches of 3 windows, run one by one
    whole = Segmenter.load(tmp_path / "s.onnx", device="cpu")  # tile 1024: the 256 image goes in whole
    with pytest.raises(Exception, match="--tile 128"):
        whole.predict(image)


def test_missing_checkpoint_is_refused_and_writes_nothing(tmp_path):
    r = run_cli("export", tmp_path / "nope", tmp_path / "out" / "m.onnx")
    assert_refused(r, tmp_path / "out" / "m.onnx", "not a segkit checkpoint")
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused_and_write_nothing(exported, tmp_path):
    ckpt = exported["softmax"][0]
    assert_refused(run_cli("export", ckpt, tmp_path / "m.pt"), tmp_path / "m.pt", ".onnx")
    assert_refused(run_cli("export", ckpt, tmp_path / "m.onnx", "--opset", 99), tmp_path / "m.onnx", "--opset")
    assert_refused(run_cli("export", ckpt, tmp_path / "m.onnx", "--check-images", tmp_path / "none"),
                   tmp_path / "m.onnx", "--check-images")
    assert list(tmp_path.iterdir()) == []
    r = run_cli("predict", tmp_path / "missing.onnx", NUCLEI / "test" / "images", tmp_path / "o")
    assert_refused(r, tmp_path / "o", "missing.onnx", "not found")


def test_without_onnxruntime_the_message_names_the_extra(exported, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    r = run_cli("predict", exported["softmax"][1], NUCLEI / "test" / "images", tmp_path / "o")
    assert_refused(r, tmp_path / "o", "pip install 'segkit[export]'")
    monkeypatch.setitem(sys.modules, "onnx", None)
    r = run_cli("export", exported["softmax"][0], tmp_path / "m.onnx")
    assert_refused(r, tmp_path / "m.onnx", "pip install 'segkit[export]'")
