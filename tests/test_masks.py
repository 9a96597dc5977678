"""Mask encodings -> labels -> each head's targets; image reading; overlap detection on ISIC."""

from __future__ import annotations


import numpy as np
import pytest
import tifffile
from PIL import Image

from segkit.data.io import read_image
from segkit.data.layout import pair
from segkit.data.masks import build_mask_format
from segkit.errors import DataError
from segkit.heads import IGNORE, SigmoidHead, SoftmaxHead
from tests.util import DATASETS

ISIC = DATASETS / "isic2018-multilabel-mini"


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path)
    return path


def test_binary_png_both_heads(tmp_path):
    m = np.array([[0, 255], [255, 0]], np.uint8)
    labels, valid = build_mask_format("binary", ["fg"]).read(_png(tmp_path / "m.png", m))
    assert labels[:, :, 0].tolist() == [[0, 1], [1, 0]] and valid.all()
    assert SigmoidHead(["fg"]).targets(labels, valid)[0].tolist() == [[0, 1], [1, 0]]
    labels2, valid2 = build_mask_format("binary", ["background", "fg"]).read(tmp_path / "m.png")
    assert SoftmaxHead(["background", "fg"]).targets(labels2, valid2).tolist() == [[0, 1], [1, 0]]


def test_binary_jpeg_noise_is_thresholded(tmp_path):
    yy, xx = np.mgrid[:40, :40]
    m = (((yy - 19) ** 2 + (xx - 21) ** 2) < 150).astype(np.uint8) * 255
    Image.fromarray(m).save(tmp_path / "m.jpg", quality=60)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2  # compression noise around 0 and 255
    labels, _ = build_mask_format("binary", ["fg"]).read(tmp_path / "m.jpg")
    assert np.array_equal(labels[:, :, 0].astype(bool), m > 0)


def test_binary_with_dark_foreground(tmp_path):
    m = np.array([[0, 255, 255]], np.uint8)  # ISBI: 0 = membrane
    labels, _ = build_mask_format("binary", ["membrane"], foreground_value=0).read(_png(tmp_path / "m.png", m))
    assert labels[:, :, 0].tolist() == [[1, 0, 0]]


def test_index_mask_with_ignore_and_out_of_range(tmp_path):
    m = np.array([[0, 1, 2], [11, 2, 0]], np.uint8)
    fmt = build_mask_format("index", ["a", "b", "c"], ignore_index=11)
    labels, valid = fmt.read(_png(tmp_path / "m.png", m))
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert SoftmaxHead(["a", "b", "c"]).targets(labels, valid).tolist() == [[0, 1, 2], [IGNORE, 2, 0]]
    sig = SigmoidHead(["a", "b", "c"]).targets(labels, valid)
    assert sig[:, 1, 0].tolist() == [IGNORE] * 3 and sig[:, 0, 2].tolist() == [0, 0, 1]
    bad = _png(tmp_path / "bad.png", np.array([[0, 7]], np.uint8))
    with pytest.raises(DataError) as err:
        fmt.read(bad)
    assert "bad.png" in str(err.value) and "[7]" in str(err.value)


def test_palette_index_mask_reads_indices(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "L").convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(tmp_path / "m.png")
    labels, _ = build_mask_format("index", ["a", "b", "c"]).read(tmp_path / "m.png")
    assert labels.argmax(2).tolist() == [[0, 1], [2, 1]]


def test_color_mask(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    fmt = build_mask_format("color", ["red", "blue"], colors=[(255, 0, 0), (0, 0, 255)])
    labels, _ = fmt.read(_png(tmp_path / "m.png", rgb))
    assert labels.argmax(2).tolist() == [[0, 1]]
    with pytest.raises(DataError, match="colours not in data.colors"):
        fmt.read(_png(tmp_path / "g.png", np.array([[[0, 255, 0]]], np.uint8)))


def test_sixteen_bit_tiff_mask(tmp_path):
    m = np.array([[0, 65535], [65535, 0]], np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", m)
    labels, _ = build_mask_format("binary", ["fg"]).read(tmp_path / "m.tif")
    assert labels[:, :, 0].tolist() == [[0, 1], [1, 0]]


def test_multilabel_folders_with_overlap(tmp_path):
    for name, arr in (("a", [[255, 255, 0]]), ("b", [[0, 255, 255]])):
        (tmp_path / "masks" / name).mkdir(parents=True)
        _png(tmp_path / "masks" / name / "x.png", np.array(arr, np.uint8))
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "x.png", np.zeros((1, 3, 3), np.uint8))
    samples = pair(tmp_path / "images", tmp_path / "masks", ["a", "b"], multilabel=True).samples
    labels, valid = build_mask_format("multilabel", ["a", "b"]).read(samples[0].mask)
    assert labels.transpose(2, 0, 1).tolist() == [[[1, 1, 0]], [[0, 1, 1]]]
    assert SigmoidHead(["a", "b"]).label_problem(labels, valid) is None
    assert "sigmoid" in SoftmaxHead(["a", "b"]).label_problem(labels, valid)


def test_isic_masks_overlap_and_only_sigmoid_accepts_them():
    samples = pair(ISIC / "images", ISIC / "masks", ["lesion", "pigment_network"], multilabel=True).samples
    assert len(samples) == 6
    fmt = build_mask_format("multilabel", ["lesion", "pigment_network"])
    overlapping = 0
    for s in samples:
        labels, valid = fmt.read(s.mask)
        both = int((labels.sum(2) > 1).sum())
        overlapping += both
        assert SigmoidHead(["lesion", "pigment_network"]).label_problem(labels, valid) is None
        if both:
            problem = SoftmaxHead(["lesion", "pigment_network"]).label_problem(labels, valid)
            assert f"{both} pixels carry more than one label" in problem and "sigmoid" in problem
    assert overlapping > 0


@pytest.mark.parametrize("mode,shape", [("RGBA", (5, 4, 4)), ("L", (5, 4)), ("RGB", (5, 4, 3))])
def test_read_image_to_three_channels(tmp_path, mode, shape):
    arr = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    _png(tmp_path / "x.png", arr, mode)
    out = read_image(tmp_path / "x.png", 3)
    assert out.shape == (5, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], arr if arr.ndim == 2 else arr[:, :, 0])


def test_read_image_formats(tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", np.full((3, 4), 40000, np.uint16))
    t = read_image(tmp_path / "x.tif", 3)
    assert t.dtype == np.uint16 and t.shape == (3, 4, 3) and t.max() == 40000
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 1] = 200
    for ext in ("bmp", "gif"):
        Image.fromarray(rgb).save(tmp_path / f"x.{ext}")
        assert read_image(tmp_path / f"x.{ext}", 3)[0, 0].tolist() == [0, 200, 0]
    inverted = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    inverted.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    inverted.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", 1)[0, :, 0].tolist() == [255, 0]
    (tmp_path / "bad.png").write_bytes(b"not a png" * 10)
    with pytest.raises(DataError, match="bad.png"):
        read_image(tmp_path / "bad.png")
