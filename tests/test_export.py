"""ONNX export: `segkit export` parity for both heads, ONNX models through Segmenter and `segkit predict`,
a 4-band model, the metadata round trip, refusals.

The models are checkpoints whose masks follow the image (conftest's `content_checkpoints`; a local
4-band one made the same way): a random network draws one class almost everywhere, and two such masks
agree whatever the backends do. onnxruntime and PyTorch sum in different orders, so their float32
logits differ by ~1e-5 of the largest logit; a pixel may then be decided either way only where its
decision is a tie, and the tests assert exactly that: every differing pixel is a tie.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import segkit.export  # noqa: E402
from segkit.data.normalize import Normalization  # noqa: E402
from segkit.export import LOGIT_REL  # noqa: E402
from segkit.heads import Head, build_head  # noqa: E402
from segkit.infer import Segmenter  # noqa: E402
from segkit.model import build_model, checkpoint_meta, save_checkpoint  # noqa: E402
from conftest import NUCLEI, assert_refused, follow_content, no_traceback, run_cli  # noqa: E402

HEADS = {"softmax": ["background", "nucleus"], "sigmoid": ["nucleus"]}
THRESHOLD = 0.4
"""The sigmoid checkpoint's threshold, set in its model.json: not the default, so the round trip shows."""
TIE = 1e-3
"""A pixel is a tie when its decision is within this many logit units of flipping: the top two logits
(softmax), or the logit and the threshold's logit (sigmoid); or, where the two backends' logits differ by more
(large logits: float32 sums in another order differ relative to their size), within twice that difference."""


def _ties(head: Head, logits: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) bool: pixels of (N, C, H, W) logits whose decision is a tie (see TIE) against `other`."""
    tie = TIE if other is None else max(TIE, 2 * float((logits - other).abs().max()))
    if head.name == "softmax":
        top = logits.topk(2, dim=1).values
        return top[:, 0] - top[:, 1] <= tie
    cut = torch.logit(torch.tensor(head.thresholds, dtype=torch.float64)).view(1, -1, 1, 1)
    return ((logits.double() - cut).abs() <= tie).any(dim=1)


def _differ(head: Head, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: pixels whose decoded masks differ (sigmoid: in any class)."""
    ma, mb = head.decode(a), head.decode(b)
    return ma != mb if ma.dim() == 3 else (ma != mb).any(dim=1)


def _foreground(head: Head, logits: torch.Tensor) -> float:
    """Share of pixels decoded as the last class (nucleus)."""
    masks = head.decode(logits)
    return float((masks == head.channels - 1).float().mean() if masks.dim() == 3 else masks[:, -1].float().mean())


def _assert_only_ties_differ(head: Head, a: torch.Tensor, b: torch.Tensor) -> int:
    """Every pixel decided differently from logits `b` than from the PyTorch logits `a` is a tie of `a`,
    and ties are rare (< 0.1% of the pixels). Returns the number of differing pixels."""
    differ, ties = _differ(head, a, b), _ties(head, a, b)
    assert not (differ & ~ties).any(), f"{int((differ & ~ties).sum())} pixels differ away from a tie"
    assert ties.float().mean() < 1e-3, float(ties.float().mean())
    return int(differ.sum())


@contextlib.contextmanager
def _recorded_parity() -> Iterator[list[dict]]:
    """While active, every mask comparison of `segkit.export.parity` (one per part it prints) is recorded:
    the pixels it counts as differing, those that differ away from a tie of the PyTorch logits, and the
    foreground share of the PyTorch masks."""
    real, seen = segkit.export._same_masks, []

    def recording(head: Head, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
        same, pixels = real(head, a, b)
        differ, ties = _differ(head, a, b), _ties(head, a, b)
        seen.append({"differing": pixels - same, "mine": int(differ.sum()), "pixels": pixels,
                     "off_tie": int((differ & ~ties).sum()), "ties": int(ties.sum()),
                     "foreground": _foreground(head, a), "largest": float(a.abs().max()),
                     "logit_diff": float((a - b).abs().max())})
        return same, pixels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segkit.export, "_same_masks", recording)
        yield seen


def _assert_parity_lines(out: str, seen: list[dict], parts: int) -> None:
    """The export's parity lines report what was compared: per part the pixels that differ, every one
    of them a tie; and the overall agreement computed from those counts."""
    printed = [int(n) for n in re.findall(r"\((\d+) px differ\)", out)]
    assert len(seen) == parts and printed == [s["differing"] for s in seen], (printed, seen)
    for part in seen:
        assert part["mine"] == part["differing"] and part["off_tie"] == 0, part
        assert part["ties"] < 1e-3 * part["pixels"], part
        # onnxruntime against PyTorch: two backends never agree bit for bit (one compared with itself would)
        assert 0 < part["logit_diff"] <= LOGIT_REL * part["largest"], part
    pixels, differing = sum(s["pixels"] for s in seen), sum(s["differing"] for s in seen)
    assert f"mask agreement {100 * (pixels - differing) / pixels:.4f}% of {pixels} px" in out, out


def _nuclei_images(n256: int = 3) -> tuple[list[Path], list[Path]]:
    """Paths of `n256` real 256x256 nuclei test images and the 360x360 one."""
    small, large = [], []
    for path in sorted((NUCLEI / "test" / "images").glob("*.png")):
        with Image.open(path) as im:
            (small if im.size == (256, 256) else large).append(path)
    assert len(small) >= n256 and large, "the nuclei test split needs 256x256 images and a larger one"
    return small[:n256], large[:1]


@pytest.fixture(scope="module")
def check_dir(module_tmp) -> Path:
    """3 real 256x256 nuclei images and the 360x360 one: parity batches of 3 and 1."""
    folder = module_tmp("check") / "images"
    folder.mkdir()
    small, large = _nuclei_images()
    for path in small + large:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def exported(module_tmp, check_dir, content_checkpoints) -> dict:
    """head -> (checkpoint, model.onnx, CLI result, parity comparisons), each exported once through
    `segkit export`. The sigmoid checkpoint decodes at THRESHOLD (its model.json says so)."""
    out = {}
    for name in HEADS:
        root = module_tmp(name)
        ckpt = root / "ckpt"
        shutil.copytree(content_checkpoints[name], ckpt)
        if name == "sigmoid":
            meta = json.loads((ckpt / "model.json").read_text())
            (ckpt / "model.json").write_text(json.dumps({**meta, "thresholds": [THRESHOLD]}))
        with _recorded_parity() as seen:
            result = run_cli("export", ckpt, root / "model.onnx", "--check-images", check_dir)
        out[name] = (ckpt, root / "model.onnx", result, seen)
    return out


@pytest.mark.parametrize("head", HEADS)
def test_export_command_reports_parity_on_real_images(exported, head):
    _, onnx_path, r, seen = exported[head]
    assert r.code == 0, (r.out, r.err)
    assert no_traceback(r.out + r.err)
    assert onnx_path.is_file() and not list(onnx_path.parent.glob(".model.onnx.*"))  # no temp file left
    assert "4 of 4 images" in r.out and "3 x 256x256" in r.out and "1 x 360x360" in r.out
    names = re.findall(r"^  (whole \S+ x \S+|tiled \S+ \(tile \d+, overlap \d+\))", r.out, re.M)
    assert names == ["whole 3 x 256x256", "whole 1 x 360x360", "tiled 512x512 (tile 256, overlap 64)"], r.out
    _assert_parity_lines(r.out, seen, 3)
    for part in seen:  # the masks compared follow the image: agreement is not that of two blank masks
        assert 0.1 < part["foreground"] < 0.9, part
    assert float(re.search(r"max \|logit difference\| (\S+)", r.out).group(1)) <= LOGIT_REL * max(
        s["largest"] for s in seen)


@pytest.mark.parametrize("head", HEADS)
def test_onnx_logits_match_pytorch_at_two_sizes_and_batches(exported, head):
    ckpt, onnx_path, _, _ = exported[head]
    small, large = _nuclei_images()
    pt = Segmenter.load(ckpt, device="cpu", amp=False)
    ox = Segmenter.load(onnx_path, device="cpu", amp=False)
    assert ox.model.providers == ["CPUExecutionProvider"]
    assert ox.head.thresholds == pt.head.thresholds == ([THRESHOLD] if head == "sigmoid" else None)
    for paths in (small, large):  # batch 3 of 256x256, batch 1 of 360x360 (padded to 384 inside)
        arrays = [pt.open(p).read() for p in paths]
        a, b = pt.forward(pt.to_input(arrays)), ox.forward(ox.to_input(arrays))
        assert a.shape == b.shape == (len(paths), len(HEADS[head]), *arrays[0].shape[:2])
        assert (a - b).abs().max() <= LOGIT_REL * a.abs().max()
        assert 0.1 < _foreground(pt.head, a) < 0.9
        _assert_only_ties_differ(pt.head, a, b)


@pytest.mark.parametrize("head", HEADS)
def test_predict_with_the_onnx_file_writes_the_same_masks(exported, check_dir, tmp_path, head):
    """The PyTorch masks are the decoded logits of the whole image (256x256) or of blended 256-pixel
    windows (360x360); the ONNX masks differ from them at ties only."""
    ckpt, onnx_path, _, _ = exported[head]
    common = ("--device", "cpu", "--tile", 256, "--overlap", 64, "--workers", 0, "--no-progress")
    r1 = run_cli("predict", ckpt, check_dir, tmp_path / "pt", *common)
    r2 = run_cli("predict", onnx_path, check_dir, tmp_path / "onnx", *common)
    assert r1.code == r2.code == 0, (r1.err, r2.err)
    files = sorted(p.relative_to(tmp_path / "pt") for p in (tmp_path / "pt").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*.png"))
    assert files == sorted(Path("nucleus" if head == "sigmoid" else "") / p.name for p in check_dir.iterdir())
    seg = Segmenter.load(ckpt, device="cpu", amp=False, tile=256, overlap=64)
    for rel in files:
        logits = seg.logits(seg.open(check_dir / rel.name).read())[None]
        want = seg.head.decode(logits)[0]
        want = (want[0] * 255 if head == "sigmoid" else want).numpy().astype(np.uint8)
        with Image.open(tmp_path / "pt" / rel) as a, Image.open(tmp_path / "onnx" / rel) as b:
            assert a.mode == b.mode == ("L" if head == "sigmoid" else "P"), rel
            got_pt, got_ox = np.asarray(a), np.asarray(b)
        assert np.array_equal(got_pt, want), rel
        assert 0.1 < (got_pt > 0).mean() < 0.9, rel
        differ = got_ox != got_pt
        assert not (differ & ~_ties(seg.head, logits)[0].numpy()).any(), rel


def test_metadata_round_trips(exported):
    import onnx

    ckpt, onnx_path, _, _ = exported["sigmoid"]
    model_json = json.loads((ckpt / "model.json").read_text())
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(props["segkit"]) == model_json
    assert props["head"] == "sigmoid" and json.loads(props["classes"]) == HEADS["sigmoid"]
    assert json.loads(props["thresholds"]) == [THRESHOLD]
    assert json.loads(props["normalization"]) == model_json["normalization"]
    assert json.loads(props["segkit_export"])["dynamic"] is True
    pt, ox = Segmenter.load(ckpt, device="cpu"), Segmenter.load(onnx_path, device="cpu")
    assert ox.meta == pt.meta and ox.head.metadata() == pt.head.metadata() and ox.classes == HEADS["sigmoid"]
    assert ox.norm == pt.norm and (ox.in_channels, ox.bands, ox.nodata) == (pt.in_channels, pt.bands, pt.nodata)


def _four_bands() -> np.ndarray:
    """A real nuclei image (360x360, cropped to 200 x 136) as 4 uint16 bands: R, G, B and their mean, x 3
    (values up to 765, an 11-bit-like range); the top-left 20 x 30 corner is no-data (0)."""
    _, large = _nuclei_images(1)
    rgb = np.asarray(Image.open(large[0]).convert("RGB"))[:200, :136].astype(np.uint16)
    image = 3 * np.dstack([rgb, rgb.mean(2).round().astype(np.uint16)])
    image[:20, :30] = 0
    assert (image[20:] > 0).any(2).all() and (image[:, 30:] > 0).any(2).all()  # no other no-data pixel
    return image


def _four_band_checkpoint(folder: Path, norm: Normalization, image: np.ndarray) -> Path:
    """A 4-band sigmoid U-Net whose masks follow `image`, made as conftest's content checkpoints are:
    batch-norm statistics from the image, then logits scaled to mean 0, std 3 on it."""
    torch.manual_seed(0)
    head = build_head("sigmoid", ["building"])
    model = build_model("Unet", "resnet18", 1, 4)
    x = norm.apply(torch.from_numpy(image.astype(np.int32)).permute(2, 0, 1)[None, :, :192, :128])
    follow_content(model, x)
    save_checkpoint(folder, model, checkpoint_meta(head, "Unet", "resnet18", 4, norm,
                                                   data={"mask": "binary", "bands": [1, 2, 3, 4], "nodata": 0}))
    return folder


def test_a_four_band_model_exports_and_runs_on_a_four_band_array(tmp_path):
    norm = Normalization("dataset", (300.0,) * 4, (100.0,) * 4, (0.0,) * 4, (2000.0,) * 4)
    image = _four_bands()
    ckpt = _four_band_checkpoint(tmp_path / "ckpt", norm, image)
    with _recorded_parity() as seen:
        r = run_cli("export", ckpt, tmp_path / "m4.onnx")
    assert r.code == 0, (r.out, r.err)
    assert "synthetic images (4 bands" in r.out  # no real 4-band images to check on: said so
    _assert_parity_lines(r.out, seen, 3)
    assert float(re.search(r"max \|logit difference\| (\S+)", r.out).group(1)) <= LOGIT_REL * max(
        s["largest"] for s in seen)
    pt = Segmenter.load(ckpt, device="cpu", amp=False, tile=128, overlap=32)
    ox = Segmenter.load(tmp_path / "m4.onnx", device="cpu", amp=False, tile=128, overlap=32)
    assert (ox.in_channels, ox.bands, ox.nodata, ox.norm) == (4, [1, 2, 3, 4], 0, norm)
    want, got = pt.logits(image), ox.logits(image)  # windows of 128
    assert (want - got).abs().max() <= LOGIT_REL * want.abs().max()
    a, b = pt.predict(image), ox.predict(image)
    assert b.mask.shape == (1, 200, 136)
    assert np.array_equal(a.mask, pt.head.decode(want[None])[0].numpy())
    assert 0.1 < a.mask[:, 20:].mean() < 0.9  # the masks follow the image
    assert not ((a.mask != b.mask)[0] & ~_ties(pt.head, want[None])[0].numpy()).any()
    assert b.valid is not None and np.array_equal(b.valid, (image != 0).any(2)) and np.array_equal(a.valid, b.valid)
    with pytest.raises(Exception, match="4 input channel"):
        ox.predict(image[..., :3])


def test_a_static_export_runs_at_its_size_and_says_how_to_tile(exported, check_dir, tmp_path):
    """Windows of the file's size run as they are; an image smaller than it is padded to it by the checkpoint's
    rule (mirrored along a side at least as long as the training crop, here 64), straight to its size."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported["softmax"][0], ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**meta, "crop": 64}))
    small, _ = _nuclei_images(1)
    with _recorded_parity() as seen:
        r = run_cli("export", ckpt, tmp_path / "s.onnx", "--static", "--size", 128, "--check-images", check_dir)
    assert r.code == 0, (r.out, r.err)
    assert "static 1 x C x 128 x 128" in r.out
    _assert_parity_lines(r.out, seen, 2)  # every image fitted to 128x128 (one batch of 4), and the tiled mosaic
    image = np.asarray(Image.open(small[0]).convert("RGB"))
    pt = Segmenter.load(ckpt, device="cpu", tile=128, overlap=32, batch_size=3)
    ox = Segmenter.load(tmp_path / "s.onnx", device="cpu", tile=128, overlap=32, batch_size=3)
    assert ox.model.fixed == [1, 3, 128, 128]
    want, got = pt.logits(image), ox.logits(image)  # batches of 3 windows, run one by one
    assert (want - got).abs().max() <= LOGIT_REL * want.abs().max()
    _assert_only_ties_differ(pt.head, want[None], got[None])
    part = image[:70, :50]  # to the file's 128 x 128: rows (70 >= the crop) mirrored, columns (50 < 64) in zeros
    x = pt.to_input(part).numpy()
    x = np.pad(x, ((0, 0), (0, 0), (29, 29), (0, 0)), mode="reflect")
    x = np.pad(x, ((0, 0), (0, 0), (0, 0), (39, 39)))
    with torch.inference_mode():
        want = pt.model(torch.from_numpy(x))[0, :, 29:99, 39:89]
    got = ox.logits(part)
    assert (want - got).abs().max() <= LOGIT_REL * want.abs().max()
    _assert_only_ties_differ(pt.head, want[None], got[None])
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


def test_an_exported_volume_model_states_its_normalisation_and_writes_the_same_masks(tmp_path, tmp_path_factory):
    """A region model trained on volume slices (its weights made to follow the image): the ONNX file's
    `normalization` key gives the per-case z-score it needs, not the `none` of its network input (a pipeline
    would otherwise feed raw voxels), and `segkit predict model.onnx` writes the NIfTI masks the checkpoint
    writes, voxels differing only where a logit is within TIE of 0."""
    import nibabel as nib
    import onnx

    import volumedata
    from segkit.model import load_checkpoint

    ckpt = volumedata.region_content(tmp_path_factory)
    path = segkit.export.export_onnx(ckpt, tmp_path / "regions.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    described = json.loads(props["normalization"])
    assert described == {**json.loads((ckpt / "model.json").read_text())["normalization"], "slice_axis": 2,
                         "orientation": "RAS", "target_spacing": None}
    assert described["mode"] == "per_case" and described["channels"] == [
        {"scheme": "zscore", "low": None, "high": None, "mean": None, "std": None}]
    cases = {}
    for case in ("hippocampus_001", "hippocampus_004"):
        crop, _, affine = volumedata.thick_volume(case, crop=volumedata.CROP)
        cases[case] = crop
        volumedata.save_nifti(crop, affine, tmp_path / "in" / f"{case}_0000.nii.gz")
    for model, out in ((ckpt, "torch"), (path, "onnx")):
        r = run_cli("predict", model, tmp_path / "in", tmp_path / out, "--device", "cpu", "--no-progress")
        assert r.code == 0, r.err
    net, _, _ = load_checkpoint(ckpt)
    for case, crop in cases.items():
        x = torch.from_numpy(np.moveaxis(volumedata.zscore(crop), 2, 0)[:, None].astype(np.float32))
        with torch.no_grad():
            tie = np.abs(np.moveaxis(net(x).numpy(), 0, -1)) < TIE  # (2, X, Y, Z): whole, core
        for k, name in enumerate(("whole", "core")):
            a, b = (np.asanyarray(nib.load(tmp_path / side / name / f"{case}.nii.gz").dataobj) for side in ("torch", "onnx"))
            assert 0.1 < a.mean() < 0.9, (case, name)
            assert tie[k][a != b].all(), (case, name, int((a != b).sum()))


def test_an_export_that_computes_something_else_fails_even_when_most_masks_agree(check_dir, content_checkpoints,
                                                                               tmp_path, monkeypatch):
    """An ONNX file whose last bias is off by 0.003 (a real export bug would do as much: a folded constant,
    a dropped term): its masks still agree on more than 99.9 % of the pixels, which the old rule (agreement
    >= 99.9 %) passed, but its logits differ by more than float32 rounding: exit 1, the file kept and named."""
    import onnx
    from onnx import numpy_helper

    import segkit.export

    real = segkit.export.export_onnx

    def shifted(*args, **kwargs) -> Path:
        path = real(*args, **kwargs)
        model = onnx.load(str(path))
        bias = next(t for t in model.graph.initializer if t.name.endswith("segmentation_head.0.bias"))
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.003), bias.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(segkit.export, "export_onnx", shifted)
    out = tmp_path / "model.onnx"
    r = run_cli("export", content_checkpoints["sigmoid"], out, "--check-images", check_dir)
    assert r.code == 1 and no_traceback(r.out + r.err), (r.out, r.err)
    agreement = float(re.search(r"mask agreement (\S+)%", r.out).group(1))
    assert 99.9 <= agreement < 100, r.out
    assert "parity check failed: logits differ by up to 0.003" in r.err and str(out) in r.err and out.is_file()
