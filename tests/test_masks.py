"""Mask encodings -> labels -> each head's targets; reading images; overlap detection on real nested
hippocampus masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import CONFIGS, NUCLEI, TINY, assert_refused, small_nuclei_stems
from samples import HIPPO_CASES, hippo_multilabel, hippo_slice_arrays, inverted_nuclei
from segkit.data.io import read_image
from segkit.data.layout import pair
from segkit.data.masks import build_mask_format
from segkit.errors import ConfigError, DataError
from segkit.heads import IGNORE, SigmoidHead, SoftmaxHead

I = IGNORE  # noqa: E741  (short, for hand-written target tables)


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode).save(path)
    return path


# A 3x4 binary picture used by several formats: 1 = foreground.
FG = np.array([[0, 1, 1, 0],
               [0, 1, 0, 0],
               [1, 1, 0, 0]], np.uint8)


def _both_heads_binary(labels_fg, valid_fg, labels_bf, valid_bf, fg=FG):
    """Targets of `[fg]` (sigmoid) and `[background, fg]` (softmax) labels of the FG picture."""
    sig = SigmoidHead(["fg"]).targets(labels_fg, valid_fg)
    assert sig.dtype == torch.float32 and sig.shape == (1, *fg.shape)
    assert sig[0].tolist() == fg.astype(float).tolist()
    soft = SoftmaxHead(["background", "fg"]).targets(labels_bf, valid_bf)
    assert soft.dtype == torch.long and soft.tolist() == fg.tolist()


# -- binary ---------------------------------------------------------------------------------------


def test_binary_png_0_255_both_heads(tmp_path):
    path = _png(tmp_path / "m.png", FG * 255)
    labels, valid = build_mask_format("binary", ["fg"]).read(path)
    assert labels.shape == (3, 4, 1) and labels.dtype == np.uint8 and valid.all()
    assert labels[:, :, 0].tolist() == FG.tolist()
    labels2, valid2 = build_mask_format("binary", ["background", "fg"]).read(path)
    assert labels2.transpose(2, 0, 1).tolist() == [(1 - FG).tolist(), FG.tolist()]
    _both_heads_binary(labels, valid, labels2, valid2)


def test_binary_0_1_png_and_ignore_value(tmp_path):
    arr = FG.copy()
    arr[0, 0] = 255  # ignored pixel: must not count as foreground nor set the threshold
    path = _png(tmp_path / "m.png", arr)
    labels, valid = build_mask_format("binary", ["fg"], ignore_index=255).read(path)
    assert valid.tolist() == [[False, True, True, True], [True] * 4, [True] * 4]
    assert labels[:, :, 0].tolist() == FG.tolist()
    sig = SigmoidHead(["fg"]).targets(labels, valid)
    assert sig[0, 0].tolist() == [I, 1, 1, 0] and sig[0, 2].tolist() == [1, 1, 0, 0]
    labels2, valid2 = build_mask_format("binary", ["background", "fg"], ignore_index=255).read(path)
    assert SoftmaxHead(["background", "fg"]).targets(labels2, valid2).tolist() == [
        [I, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]]


def test_binary_jpeg_with_compression_noise_is_thresholded(tmp_path):
    yy, xx = np.mgrid[:48, :48]
    fg = (((yy - 23) ** 2 + (xx - 21) ** 2) < 150).astype(np.uint8)
    Image.fromarray(fg * 255).save(tmp_path / "m.jpg", quality=60)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2 and not np.array_equal(raw, fg * 255)  # noise around 0 and 255
    labels, valid = build_mask_format("binary", ["fg"]).read(tmp_path / "m.jpg")
    labels2, valid2 = build_mask_format("binary", ["background", "fg"]).read(tmp_path / "m.jpg")
    _both_heads_binary(labels, valid, labels2, valid2, fg=fg)


def test_binary_with_foreground_value_0_like_isbi(tmp_path):
    path = _png(tmp_path / "m.png", (1 - FG) * 255)  # 0 = foreground (membrane), 255 = cell interior
    labels, valid = build_mask_format("binary", ["membrane"], foreground_value=0).read(path)
    labels2, valid2 = build_mask_format("binary", ["background", "membrane"], foreground_value=0).read(path)
    _both_heads_binary(labels, valid, labels2, valid2)


def test_real_inverted_mask_with_foreground_value_0(tmp_path):
    """A real nuclei mask stored inverted (nucleus 0, background 255, as ISBI stores its membranes):
    `foreground_value: 0` gives back exactly the nuclei of the original mask, for both heads."""
    stem = small_nuclei_stems(1)[0]
    path = inverted_nuclei(tmp_path, [stem]) / "train" / "masks" / f"{stem}.png"
    nuclei = np.asarray(Image.open(NUCLEI / "train" / "masks" / f"{stem}.png")) == 255
    labels, valid = build_mask_format("binary", ["nucleus"], foreground_value=0).read(path)
    assert labels.shape == (256, 256, 1) and valid.all()
    assert np.array_equal(labels[:, :, 0], nuclei.astype(np.uint8))
    labels2, valid2 = build_mask_format("binary", ["background", "nucleus"], foreground_value=0).read(path)
    _both_heads_binary(labels, valid, labels2, valid2, fg=nuclei.astype(np.uint8))
    default, _ = build_mask_format("binary", ["nucleus"]).read(path)  # without it: the background is the class
    assert np.array_equal(default[:, :, 0], (~nuclei).astype(np.uint8))


def test_binary_mask_in_colour_is_refused_naming_the_file(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    with pytest.raises(DataError) as err:
        build_mask_format("binary", ["fg"]).read(_png(tmp_path / "colour.png", rgb))
    assert "colour.png" in str(err.value) and "data.mask: color" in str(err.value)


# -- index ------------------------------------------------------------------------------------------


def test_index_png_with_ignore_value_both_heads(tmp_path):
    m = np.array([[0, 1, 2],
                  [11, 2, 0]], np.uint8)
    fmt = build_mask_format("index", ["a", "b", "c"], ignore_index=11)
    labels, valid = fmt.read(_png(tmp_path / "m.png", m))
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert labels.transpose(2, 0, 1).tolist() == [[[1, 0, 0], [0, 0, 1]],
                                                  [[0, 1, 0], [0, 0, 0]],
                                                  [[0, 0, 1], [0, 1, 0]]]
    soft = SoftmaxHead(["a", "b", "c"]).targets(labels, valid)
    assert soft.tolist() == [[0, 1, 2], [I, 2, 0]]
    sig = SigmoidHead(["a", "b", "c"]).targets(labels, valid)
    assert sig.shape == (3, 2, 3)
    assert sig.tolist() == [[[1, 0, 0], [I, 0, 1]],
                            [[0, 1, 0], [I, 0, 0]],
                            [[0, 0, 1], [I, 1, 0]]]
    assert SoftmaxHead(["a", "b", "c"]).label_problem(labels, valid) is None


def test_index_value_out_of_range_names_the_file_and_the_value(tmp_path):
    fmt = build_mask_format("index", ["a", "b", "c"], ignore_index=11)
    bad = _png(tmp_path / "bad_mask.png", np.array([[0, 7], [11, 12]], np.uint8))
    with pytest.raises(DataError) as err:
        fmt.read(bad)
    text = str(err.value)
    assert str(bad) in text and "[7, 12]" in text and "ignore index (11)" in text


def test_palette_index_png_gives_indices_not_colours(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "L").convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    labels, valid = build_mask_format("index", ["a", "b", "c"]).read(tmp_path / "m.png")
    assert valid.all()
    assert SoftmaxHead(["a", "b", "c"]).targets(labels, valid).tolist() == [[0, 1], [2, 1]]
    sig = SigmoidHead(["a", "b", "c"]).targets(labels, valid)
    assert sig[:, 1, 0].tolist() == [0, 0, 1] and sig[:, 0, 1].tolist() == [0, 1, 0]


def test_rgb_mask_for_index_format_is_refused(tmp_path):
    with pytest.raises(DataError, match="data.mask: color"):
        build_mask_format("index", ["a", "b"]).read(_png(tmp_path / "m.png", np.zeros((2, 2, 3), np.uint8)))


# -- colour ----------------------------------------------------------------------------------------


COLOURS = [(0, 0, 0), (128, 64, 128), (64, 0, 128)]  # background, road, car


def test_color_mask_both_heads(tmp_path):
    idx = np.array([[0, 1, 1], [2, 2, 0]])
    rgb = np.array(COLOURS, np.uint8)[idx]
    fmt = build_mask_format("color", ["background", "road", "car"], colors=COLOURS)
    labels, valid = fmt.read(_png(tmp_path / "m.png", rgb))
    assert valid.all()
    assert SoftmaxHead(["background", "road", "car"]).targets(labels, valid).tolist() == idx.tolist()
    sig = SigmoidHead(["background", "road", "car"]).targets(labels, valid)
    assert sig.tolist() == [(idx == c).astype(float).tolist() for c in range(3)]


def test_color_mask_with_unknown_colour_names_the_file_and_colour(tmp_path):
    rgb = np.array([[[0, 0, 0], [0, 255, 0]]], np.uint8)
    fmt = build_mask_format("color", ["background", "road", "car"], colors=COLOURS)
    with pytest.raises(DataError) as err:
        fmt.read(_png(tmp_path / "odd.png", rgb))
    assert "odd.png" in str(err.value) and "[0, 255, 0] x1" in str(err.value)


# -- 16-bit TIFF -----------------------------------------------------------------------------------


def test_sixteen_bit_tiff_binary_mask(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", FG.astype(np.uint16) * 65535)
    labels, valid = build_mask_format("binary", ["fg"]).read(tmp_path / "m.tif")
    labels2, valid2 = build_mask_format("binary", ["background", "fg"]).read(tmp_path / "m.tif")
    _both_heads_binary(labels, valid, labels2, valid2)


def test_sixteen_bit_tiff_index_mask_with_ignore(tmp_path):
    m = np.array([[0, 1, 300], [2, 300, 1]], np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", m)
    labels, valid = build_mask_format("index", ["a", "b", "c"], ignore_index=300).read(tmp_path / "m.tif")
    assert SoftmaxHead(["a", "b", "c"]).targets(labels, valid).tolist() == [[0, 1, I], [2, I, 1]]


def test_sixteen_bit_tiff_with_its_foreground_value(tmp_path):
    """A 12-bit camera mask {0, 4095} with data.foreground_value: 4095 marks exactly the 4095 pixels."""
    tifffile.imwrite(tmp_path / "m.tif", FG.astype(np.uint16) * 4095)
    labels, valid = build_mask_format("binary", ["fg"], foreground_value=4095).read(tmp_path / "m.tif")
    labels2, valid2 = build_mask_format("binary", ["background", "fg"], foreground_value=4095).read(
        tmp_path / "m.tif")
    _both_heads_binary(labels, valid, labels2, valid2)


# -- multilabel (per-class folders) ----------------------------------------------------------------


def _multilabel_tree(tmp_path: Path, layers: dict[str, np.ndarray], names: dict[str, str] | None = None) -> Path:
    (tmp_path / "images").mkdir()
    h, w = next(iter(layers.values())).shape
    _png(tmp_path / "images" / "x.png", np.zeros((h, w, 3), np.uint8))
    for cls, arr in layers.items():
        (tmp_path / "masks" / cls).mkdir(parents=True)
        _png(tmp_path / "masks" / cls / f"{(names or {}).get(cls, 'x')}.png", arr)
    return tmp_path


def test_multilabel_folders_with_overlap_and_stem_prefix_pairing(tmp_path):
    a = np.array([[255, 255, 0, 0]], np.uint8)
    b = np.array([[0, 255, 255, 0]], np.uint8)
    root = _multilabel_tree(tmp_path, {"a": a, "b": b}, names={"a": "x_segmentation", "b": "x_attribute_b"})
    pairing = pair(root / "images", root / "masks", ["a", "b"], multilabel=True)
    assert len(pairing.samples) == 1 and pairing.unlabeled == [] and pairing.orphan_masks == []
    sample = pairing.samples[0]
    assert sample.mask == {"a": root / "masks/a/x_segmentation.png", "b": root / "masks/b/x_attribute_b.png"}
    labels, valid = build_mask_format("multilabel", ["a", "b"]).read(sample.mask)
    assert labels.transpose(2, 0, 1).tolist() == [[[1, 1, 0, 0]], [[0, 1, 1, 0]]] and valid.all()
    assert SigmoidHead(["a", "b"]).targets(labels, valid).tolist() == [[[1, 1, 0, 0]], [[0, 1, 1, 0]]]
    assert SigmoidHead(["a", "b"]).label_problem(labels, valid) is None
    problem = SoftmaxHead(["a", "b"]).label_problem(labels, valid)
    assert problem.startswith("1 pixels carry more than one label") and "model.head: sigmoid" in problem


def test_multilabel_class_without_folder_is_the_rest_so_softmax_fits(tmp_path):
    root = _multilabel_tree(tmp_path, {"road": np.array([[255, 255, 0, 0]], np.uint8),
                                       "car": np.array([[0, 0, 255, 0]], np.uint8)})
    classes = ["background", "road", "car"]
    sample = pair(root / "images", root / "masks", classes, multilabel=True).samples[0]
    assert set(sample.mask) == {"road", "car"}
    labels, valid = build_mask_format("multilabel", classes).read(sample.mask)
    assert SoftmaxHead(classes).label_problem(labels, valid) is None
    assert SoftmaxHead(classes).targets(labels, valid).tolist() == [[1, 1, 2, 0]]
    assert SigmoidHead(classes).targets(labels, valid).tolist() == [[[0, 0, 0, 1]], [[1, 1, 0, 0]], [[0, 0, 1, 0]]]


def test_multilabel_gap_pixels_are_a_softmax_problem(tmp_path):
    root = _multilabel_tree(tmp_path, {"a": np.array([[255, 0, 0]], np.uint8),
                                       "b": np.array([[0, 0, 255]], np.uint8)})
    sample = pair(root / "images", root / "masks", ["a", "b"], multilabel=True).samples[0]
    labels, valid = build_mask_format("multilabel", ["a", "b"]).read(sample.mask)
    problem = SoftmaxHead(["a", "b"]).label_problem(labels, valid)
    assert problem.startswith("1 pixels have no class") and "background" in problem


def test_multilabel_masks_with_an_ignore_value(tmp_path):
    """{0, 1} class masks with 255 = ignore: the ignore value must not set the threshold (as for binary)."""
    root = _multilabel_tree(tmp_path, {"a": np.array([[0, 1, 255, 1]], np.uint8),
                                       "b": np.array([[1, 0, 255, 1]], np.uint8)})
    sample = pair(root / "images", root / "masks", ["a", "b"], multilabel=True).samples[0]
    labels, valid = build_mask_format("multilabel", ["a", "b"], ignore_index=255).read(sample.mask)
    assert valid.tolist() == [[True, True, False, True]]
    assert labels.transpose(2, 0, 1).tolist() == [[[0, 1, 0, 1]], [[1, 0, 0, 1]]]
    assert SigmoidHead(["a", "b"]).targets(labels, valid).tolist() == [[[0, 1, I, 1]], [[1, 0, I, 1]]]


def test_multilabel_class_masks_of_different_sizes_are_refused(tmp_path):
    root = _multilabel_tree(tmp_path, {"a": np.zeros((4, 4), np.uint8)})
    (root / "masks" / "b").mkdir()
    _png(root / "masks" / "b" / "x.png", np.zeros((4, 5), np.uint8))
    sample = pair(root / "images", root / "masks", ["a", "b"], multilabel=True).samples[0]
    with pytest.raises(DataError) as err:
        build_mask_format("multilabel", ["a", "b"]).read(sample.mask)
    assert str(root / "masks" / "b" / "x.png") in str(err.value)


def test_unknown_mask_format_is_a_config_error():
    with pytest.raises(ConfigError, match="data.mask: 'rle'"):
        build_mask_format("rle", ["fg"])


# -- overlap on real nested masks ----------------------------------------------------------------------

NESTED = ["hippocampus", "posterior"]  # hippocampus = labels 1 or 2, posterior = label 2: nested
NESTED_CASES, EVERY = HIPPO_CASES[:2], 4


@pytest.fixture(scope="module")
def nested(module_tmp) -> Path:
    """Real hippocampus slices with nested labels; JPEG images, as ISIC ships them."""
    return hippo_multilabel(module_tmp("nested"), cases=NESTED_CASES, every=EVERY, image_ext=".jpg")


def test_nested_masks_pair_by_stem_prefix(tmp_path, nested):
    """Masks named `<stem>_<anything>` (ISIC's `X_segmentation.png`, `X_attribute_pigment_network.png`) pair
    with the image `<stem>`, among real stems that share long prefixes (hippocampus_001_z05, ..._z09, ...)."""
    masks = tmp_path / "masks"
    for cls, suffix in zip(NESTED, ("_segmentation", "_attribute_posterior")):
        (masks / cls).mkdir(parents=True)
        for mask in (nested / "masks" / cls).iterdir():
            (masks / cls / f"{mask.stem}{suffix}.png").write_bytes(mask.read_bytes())
    pairing = pair(nested / "images", masks, NESTED, multilabel=True)
    stems = list(hippo_slice_arrays(NESTED_CASES, EVERY))
    assert [s.stem for s in pairing.samples] == stems and pairing.unlabeled == [] and pairing.orphan_masks == []
    for s in pairing.samples:
        assert s.image == nested / "images" / f"{s.stem}.jpg"
        assert s.mask == {"hippocampus": masks / "hippocampus" / f"{s.stem}_segmentation.png",
                          "posterior": masks / "posterior" / f"{s.stem}_attribute_posterior.png"}


def test_nested_masks_overlap_and_only_sigmoid_accepts_them(nested):
    """Every posterior pixel also carries the hippocampus label: the softmax head's problem names exactly
    the posterior pixel count of the label volume (or, without posterior, the pixels with no label)."""
    samples = pair(nested / "images", nested / "masks", NESTED, multilabel=True).samples
    slices = hippo_slice_arrays(NESTED_CASES, EVERY)
    assert [s.stem for s in samples] == list(slices)
    fmt = build_mask_format("multilabel", NESTED)
    with_overlap = 0
    for s in samples:
        truth = slices[s.stem][1]
        labels, valid = fmt.read(s.mask)
        assert valid.all()
        assert np.array_equal(labels.transpose(2, 0, 1), np.stack([truth > 0, truth == 2]).astype(np.uint8))
        assert SigmoidHead(NESTED).label_problem(labels, valid) is None
        problem = SoftmaxHead(NESTED).label_problem(labels, valid)
        both = int((truth == 2).sum())
        if both:
            assert problem.startswith(f"{both} pixels carry more than one label") and "sigmoid" in problem
            with_overlap += 1
        else:
            assert problem.startswith(f"{int((truth == 0).sum())} pixels have no class")
    assert with_overlap == sum(bool((labels == 2).any()) for _, labels in slices.values()) > 0


def test_train_nested_with_softmax_exits_2_naming_sigmoid(cli, nested, tmp_path):
    """The multi-label config's loss (bce+dice) belongs to sigmoid: refused first, naming the loss and sigmoid."""
    out = tmp_path / "run"
    r = cli("train", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", "model.head=softmax",
            "--set", f"data.root={nested}", "--set", f"data.classes={NESTED}", *TINY)
    assert_refused(r, out, "train.loss", "bce+dice", "sigmoid")


def test_train_nested_with_softmax_and_its_loss_exits_2_on_the_overlap(cli, nested, tmp_path):
    """Refused before anything is written, naming every training image (the config holds back 34% of the
    flat layout for validation) with its problem: its posterior pixels carry two labels, or, in a slice
    without posterior, its background pixels have none."""
    out = tmp_path / "run"
    r = cli("train", CONFIGS / "isic2018-multilabel-mini.yaml", "--out", out, "--set", "model.head=softmax",
            "--set", "train.loss=ce+dice", "--set", f"data.root={nested}", "--set", f"data.classes={NESTED}", *TINY)
    assert_refused(r, out, "more than one label", "model.head: sigmoid")
    slices = hippo_slice_arrays(NESTED_CASES, EVERY)
    n_train = len(slices) - round(0.34 * len(slices))
    assert r.err.startswith(f"error: {n_train} of {n_train} samples cannot be used:\n"), r.err
    listed = [line.strip() for line in r.err.splitlines()[1:] if line.strip()]
    assert len(listed) == n_train
    for line in listed:
        path, problem = line.split(": ", 1)
        labels = slices[Path(path).stem][1]
        assert path == str(nested / "images" / f"{Path(path).stem}.jpg")
        both, none = int((labels == 2).sum()), int((labels == 0).sum())
        want = f"{both} pixels carry more than one label" if both else f"{none} pixels have no class"
        assert problem.startswith(want), line


# -- reading images ---------------------------------------------------------------------------------


def test_read_rgba_png_drops_alpha(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    out = read_image(_png(tmp_path / "x.png", arr, "RGBA"), 3)
    assert out.shape == (5, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out, arr[:, :, :3])


def test_read_grey_png_repeats_to_three_channels(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (5, 4), dtype=np.uint8)
    out = read_image(_png(tmp_path / "x.png", arr, "L"), 3)
    assert out.shape == (5, 4, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, :, c], arr) for c in range(3))
    assert read_image(tmp_path / "x.png", 1)[:, :, 0].tolist() == arr.tolist()


def test_rgb_for_a_one_channel_model_is_an_error_not_a_silent_grey(tmp_path):
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (100, 100, 100)
    path = _png(tmp_path / "x.png", rgb)
    with pytest.raises(DataError) as err:
        read_image(path, 1)
    assert str(path) in str(err.value) and "3 band(s)" in str(err.value) and "data.bands" in str(err.value)
    assert read_image(path, 1, bands=[2])[0, :, 0].tolist() == [0, 255, 100]  # the fix: pick a band


def test_read_sixteen_bit_tiff_keeps_uint16(tmp_path):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000 + 7
    tifffile.imwrite(tmp_path / "x.tif", arr)
    out = read_image(tmp_path / "x.tif", 3)
    assert out.dtype == np.uint16 and out.shape == (3, 4, 3)
    assert np.array_equal(out[:, :, 2], arr)
    rgb = np.stack([arr, arr // 2, arr // 3], axis=2)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.tif", 3), rgb)


def test_read_sixteen_bit_png_keeps_uint16(tmp_path):
    arr = np.array([[0, 40000], [65535, 7]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png", 3)
    assert out.dtype == np.uint16 and out[:, :, 0].tolist() == arr.tolist()


def test_read_palette_png_goes_through_its_palette(tmp_path):
    inverted = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    inverted.putpalette([255, 255, 255, 0, 0, 0, 10, 20, 30] + [0] * 759)  # index 0 = white
    inverted.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png", 3)
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0], [10, 20, 30]]


@pytest.mark.parametrize("ext", ["gif", "bmp"])
def test_read_gif_and_bmp(tmp_path, ext):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 1] = 200
    rgb[0, 0] = (250, 10, 10)
    Image.fromarray(rgb).save(tmp_path / f"x.{ext}")
    out = read_image(tmp_path / f"x.{ext}", 3)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [250, 10, 10] and out[2, 3].tolist() == [0, 200, 0]


def test_read_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(err.value) and "cannot read" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")
