"""Prediction: padding, tiling with blending in logit space, TTA, folders of awkward files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from segkit.heads import build_head
from segkit.infer import Segmenter, forward_padded, pad_to_stride, window_starts
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint
from conftest import no_traceback, run_cli

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _seg(head_name, classes, model, **options):
    head = build_head(head_name, classes)
    return Segmenter(model, head, checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD)), "cpu", **options)


def _pointwise(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, channels, 1)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_window_starts_cover_and_end_at_the_border():
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]
    assert window_starts(50, 64, 48) == [0]


def test_forward_padded_returns_the_input_size():
    model = build_model("Unet", "resnet18", 2).eval()
    for h, w in ((7, 5), (33, 65)):
        x = torch.randn(1, 3, h, w)
        padded, oh, ow = pad_to_stride(x)
        assert padded.shape[-2:] == (((h + 31) // 32) * 32, ((w + 31) // 32) * 32) and (oh, ow) == (h, w)
        with torch.inference_mode():
            assert forward_padded(model, x).shape == (1, 2, h, w)


@pytest.mark.parametrize("head,classes", [("softmax", ["a", "b", "c"]), ("sigmoid", ["a", "b"])])
def test_tiled_equals_untiled_for_a_pointwise_model(head, classes):
    image = _image(200, 150)
    whole = _seg(head, classes, _pointwise(len(classes)), tile=1024)
    tiled = _seg(head, classes, _pointwise(len(classes)), tile=64, overlap=16)
    a, b = whole.logits(image), tiled.logits(image)
    assert a.shape == b.shape == (len(classes), 200, 150)
    assert torch.allclose(a, b, atol=1e-5)
    # Rows 0..47 and columns 0..47 lie in one window only: there the result is that window's own output.
    assert torch.allclose(a[:, :48, :48], b[:, :48, :48], atol=1e-6)
    assert np.array_equal(whole.predict(image).mask, tiled.predict(image).mask)


def test_tiled_unet_agrees_with_whole_image_on_most_pixels():
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", 2)
    image = _image(160, 224, seed=1)
    whole = _seg("softmax", ["a", "b"], model, tile=1024).predict(image).mask
    tiled = _seg("softmax", ["a", "b"], model, tile=128, overlap=32).predict(image).mask
    assert whole.shape == tiled.shape == (160, 224)
    assert (whole == tiled).mean() > 0.9


def test_tta_of_a_flip_equivariant_model_is_the_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=True)
    with torch.no_grad():
        k = conv.weight
        k.copy_((k + k.flip(-1) + k.flip(-2) + k.flip(-1, -2)) / 4)  # symmetric under both flips
    image = _image(64, 96)
    plain = _seg("sigmoid", ["a", "b"], conv).logits(image)
    tta = _seg("sigmoid", ["a", "b"], conv, tta=True).logits(image)
    assert torch.allclose(plain, tta, atol=1e-5)


def test_predict_returns_probabilities_and_masks_at_the_image_size():
    seg = _seg("softmax", ["a", "b", "c"], _pointwise(3), tile=64, overlap=8)
    r = seg.predict(_image(100, 70), probs=True)
    assert r.mask.shape == (100, 70) and r.mask.dtype == np.uint8
    assert r.probs.shape == (3, 100, 70) and r.probs.dtype == np.float16
    assert np.allclose(r.probs.astype(np.float32).sum(0), 1, atol=2e-3)
    grey = seg.predict(_image(100, 70)[:, :, 0])
    assert grey.mask.shape == (100, 70)


@pytest.fixture
def checkpoint(tmp_path):
    def make(head_name, classes):
        torch.manual_seed(0)
        head = build_head(head_name, classes)
        folder = tmp_path / f"ckpt-{head_name}"
        save_checkpoint(folder, build_model("Unet", "resnet18", head.channels),
                        checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD)))
        return folder
    return make


def _awkward_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 30)
    tifffile.imwrite(root / "deep.tif", np.random.default_rng(0).integers(0, 65535, (40, 50), dtype=np.uint16))
    Image.fromarray(_image(33, 45)[:, :, 0]).save(root / "grey.png")
    Image.fromarray(np.dstack([_image(30, 20), np.full((30, 20), 128, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray(_image(7, 5)).save(root / "tiny.png")
    Image.fromarray(_image(300, 200)).save(root / "sub" / "large.png")
    return {"deep.tif": (40, 50), "grey.png": (33, 45), "rgba.png": (30, 20), "tiny.png": (7, 5),
            "sub/large.png": (300, 200)}


def test_predict_folder_softmax_writes_every_good_mask_and_reports_the_bad_one(capsys, tmp_path, checkpoint):
    sizes = _awkward_folder(tmp_path / "in")
    out = tmp_path / "out"
    r = run_cli("predict", checkpoint("softmax", ["background", "a", "b"]), tmp_path / "in", out,
                "--tile", "64", "--overlap", "16", "--save-probs", "--workers", "0", "--device", "cpu",
                "--no-progress")
    assert r.code == 1 and "corrupt.png" in r.err and no_traceback(r.err)
    assert "5 images" in r.out and "1 failed" in r.out
    for rel, (h, w) in sizes.items():
        mask = Image.open((out / rel).with_suffix(".png"))
        assert mask.mode == "P" and (mask.height, mask.width) == (h, w), rel
        assert np.asarray(mask).max() <= 2
        probs = np.load((out / rel).with_suffix(".npy"))
        assert probs.dtype == np.float16 and probs.shape == (3, h, w)
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)
    assert not (out / "corrupt.png").exists()
    again = run_cli("predict", checkpoint("softmax", ["background", "a", "b"]), tmp_path / "in", out,
                    "--workers", "0", "--device", "cpu", "--no-progress")
    assert again.code == 2 and "--overwrite" in again.err


def test_predict_folder_sigmoid_writes_one_binary_png_per_class(capsys, tmp_path, checkpoint):
    sizes = _awkward_folder(tmp_path / "in")
    out = tmp_path / "out"
    r = run_cli("predict", checkpoint("sigmoid", ["a", "b"]), tmp_path / "in", out, "--workers", "2",
                "--device", "cpu", "--no-progress", "--threshold", "a=0.3,b=0.7")
    assert r.code == 1
    for rel, (h, w) in sizes.items():
        for cls in ("a", "b"):
            m = np.asarray(Image.open((out / cls / rel).with_suffix(".png")))
            assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
    ok = run_cli("predict", checkpoint("sigmoid", ["a", "b"]), tmp_path / "in", out, "--overwrite",
                 "--workers", "0", "--device", "cpu", "--no-progress")
    assert ok.code == 1 and "5 images" in ok.out


def test_predict_refuses_output_inside_input_and_writes_nothing(capsys, tmp_path, checkpoint):
    _awkward_folder(tmp_path / "in")
    before = sorted(p for p in (tmp_path / "in").rglob("*"))
    for out in (tmp_path / "in", tmp_path / "in" / "masks"):
        r = run_cli("predict", checkpoint("sigmoid", ["a"]), tmp_path / "in", out, "--device", "cpu")
        assert r.code == 2 and "inside the input" in r.err
    assert sorted(p for p in (tmp_path / "in").rglob("*")) == before
    bad = run_cli("predict", checkpoint("softmax", ["a", "b"]), tmp_path / "in", tmp_path / "o",
                  "--threshold", "0.3", "--device", "cpu")
    assert bad.code == 2 and "argmax" in bad.err
    notckpt = run_cli("predict", tmp_path / "in", tmp_path / "in", tmp_path / "o2")
    assert notckpt.code == 2 and "not a segkit checkpoint" in notckpt.err
