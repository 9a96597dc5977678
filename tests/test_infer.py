"""Inference: padding to the stride as training pads, windowed prediction with Gaussian blending in logit space,
flip TTA, predictions of arrays and streams, and `segkit predict` over awkward folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from segkit.data.io import read_image
from segkit.errors import ConfigError, SegkitError
from segkit.heads import build_head
from segkit.infer import (
    STRIDE,
    Segmenter,
    batches_by_shape,
    forward_padded,
    forward_tta,
    gaussian_weight,
    plan_outputs,
    window_starts,
)
from segkit.data.normalize import Normalization
from segkit.data.transforms import Augment
from segkit.model import build_model, checkpoint_meta, save_checkpoint
from segkit.padding import mirrored, pad_centred
from conftest import NUCLEI, run_cli

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
DATA = {"mask": "index", "ignore_index": None, "foreground_value": None, "colors": None,
        "val_fraction": 0.2, "seed": 0}
HEADS = [("softmax", ["background", "a", "b"]), ("sigmoid", ["a", "b"])]


# -- helpers -------------------------------------------------------------------------------



def make_seg(head_name, classes, model, **options) -> Segmenter:
    head = build_head(head_name, classes)
    meta = checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD), data=DATA)
    return Segmenter(model, head, meta, device="cpu", **options)


def pointwise(channels: int, seed: int = 0) -> nn.Module:
    """A 1x1 convolution: no spatial context, so windows cannot change its output."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, channels, 1)


class WindowMean(nn.Module):
    """Every output pixel is a fixed linear map of the mean of its whole input window:
    a model whose windowed output depends on the window, so blending weights show."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(3, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.proj(x.mean((2, 3)))
        return m[:, :, None, None].expand(-1, -1, *x.shape[-2:]).contiguous()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def normalise(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def coverage(h: int, w: int, tile: int, overlap: int) -> np.ndarray:
    """How many windows cover each pixel."""
    th, tw = min(h, tile), min(w, tile)
    count = np.zeros((h, w), np.int32)
    for y in window_starts(h, th, tile - overlap):
        for x in window_starts(w, tw, tile - overlap):
            count[y:y + th, x:x + tw] += 1
    return count


# -- windows and weights ----------------------------------------------------------------------


def test_window_starts_known_values():
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]
    assert window_starts(150, 64, 48) == [0, 48, 86]
    assert window_starts(64, 64, 48) == [0]
    assert window_starts(30, 64, 48) == [0]
    assert window_starts(65, 64, 48) == [0, 1]
    assert window_starts(128, 64, 64) == [0, 64]


@pytest.mark.parametrize("tile,step", [(32, 32), (64, 48), (64, 4), (96, 64)])
def test_window_starts_cover_every_pixel_and_end_at_the_border(tile, step):
    for size in range(1, 301):
        starts = window_starts(size, tile, step)
        assert starts[0] == 0
        assert all(0 < b - a <= step for a, b in zip(starts, starts[1:])), (size, starts)
        if size <= tile:
            assert starts == [0]
        else:
            assert starts[-1] + tile == size
            covered = np.zeros(size, bool)
            for s in starts:
                covered[s:s + tile] = True
            assert covered.all()


def test_gaussian_weight_is_centred_symmetric_and_floored():
    for h, w in ((64, 64), (64, 96), (33, 7), (1, 5)):
        g = gaussian_weight(h, w)
        assert g.shape == (h, w) and g.dtype == torch.float32
        assert float(g.max()) == pytest.approx(1.0)
        assert float(g.min()) >= 1e-3
        assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))
        # decreasing away from the centre along both axes
        row = g[h // 2]
        assert torch.all(row[: (w + 1) // 2][1:] >= row[: (w + 1) // 2][:-1])
    corner = gaussian_weight(64, 64)
    assert float(corner[0, 0]) < 0.01 < float(corner[32, 32])


# -- padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,target_h,target_w", [(7, 5, 32, 32), (33, 65, 64, 96), (32, 64, 32, 64),
                                                    (1, 1, 32, 32), (35, 52, 64, 64)])
def test_pad_centred_places_the_image_in_zeros_as_training_pads_a_crop(h, w, target_h, target_w):
    """Prediction's padding is training's: the crop transform, given an image smaller than its crop, must put
    it at the same offsets with the same zeros around it (its padded pixels are masked to 0 after
    normalisation, `to_network`)."""
    x = torch.randn(2, 3, h, w)
    padded, top, left = pad_centred(x, target_h, target_w)
    assert padded.shape == (2, 3, target_h, target_w)
    assert (top, left) == ((target_h - h) // 2, (target_w - w) // 2)
    assert torch.equal(padded[..., top:top + h, left:left + w], x)
    border = torch.ones(target_h, target_w, dtype=torch.bool)
    border[top:top + h, left:left + w] = False
    assert not padded[..., border].any()
    if target_h == target_w:  # the training crop of a square network input, from the same image
        image = np.arange(h * w, dtype=np.float32).reshape(h, w, 1) + 1
        out, _ = Augment(crop=target_h)(image, np.ones((h, w, 1), np.uint8), np.random.default_rng(0), classes=0)
        placed = pad_centred(torch.from_numpy(image[None, None, ..., 0]), target_h, target_w)[0][0, 0]
        assert np.array_equal(out[..., 0], placed.numpy())


def test_pad_centred_mirrors_an_axis_as_far_as_the_image_reaches_then_zeros():
    """Rows a, b, c padded to 8 (2 before, 3 after) by their mirror: c b | a b c | b a, then one zero row, as the
    image holds no more; the columns (not mirrored) in zeros."""
    a, b, c = 1.0, 2.0, 3.0
    x = torch.tensor([a, b, c]).reshape(1, 1, 3, 1)
    padded, top, left = pad_centred(x, 8, 3, mirror=(True, False))
    assert (top, left) == (2, 1)
    assert padded[0, 0, :, 1].tolist() == [c, b, a, b, c, b, a, 0.0]
    assert not padded[0, 0, :, [0, 2]].any()
    assert pad_centred(torch.ones(1, 1, 1, 1), 4, 4, (True, True))[0].sum() == 1  # one pixel has no mirror


@pytest.mark.parametrize("h,w,crop", [(40, 33, 32), (40, 33, 36), (33, 40, 64)])
def test_pad_centred_mirrors_the_axes_training_cropped_inside(h, w, crop):
    """Along an axis at least as long as the crop, the padding is numpy's reflection of the image; along a
    shorter one, zeros (as training pads): each axis padded to the next multiple of 32, centred."""
    x = torch.randn(2, 3, h, w)
    mirror = (mirrored(h, crop), mirrored(w, crop))
    assert mirror == (h >= crop, w >= crop)
    padded, top, left = pad_centred(x, 64, 64, mirror)
    want = x.numpy()
    for axis, n, m in ((2, h, mirror[0]), (3, w, mirror[1])):
        pads = [(0, 0)] * 4
        pads[axis] = ((64 - n) // 2, 64 - n - (64 - n) // 2)
        want = np.pad(want, pads, mode="reflect" if m else "constant")
    assert (top, left) == ((64 - h) // 2, (64 - w) // 2)
    assert np.array_equal(padded.numpy(), want)
    assert not mirrored(10_000, None)  # a checkpoint that does not record its crop: zeros


@pytest.mark.parametrize("h,w,crop", [(7, 5, None), (33, 65, None), (64, 32, None), (40, 70, 64), (40, 70, 32)])
def test_forward_padded_returns_logits_at_exactly_the_input_size(h, w, crop):
    """The U-Net's output on the input padded (numpy) to multiples of 32, the image centred, cropped back:
    mirrored along a side at least as long as the training crop, zeros elsewhere."""
    torch.manual_seed(0)
    unet = build_model("Unet", "resnet18", 3).eval()
    conv = pointwise(2).eval()
    x = torch.randn(2, 3, h, w)
    ph, pw = -h % STRIDE, -w % STRIDE
    padded = x.numpy()
    for axis, n, p in ((2, h, ph), (3, w, pw)):
        pads = [(0, 0)] * 4
        pads[axis] = (p // 2, p - p // 2)
        padded = np.pad(padded, pads, mode="reflect" if crop is not None and n >= crop else "constant")
    with torch.inference_mode():
        out = forward_padded(unet, x, crop=crop)
        assert out.shape == (2, 3, h, w) and out.dtype == torch.float32
        want = unet(torch.from_numpy(padded))[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
        assert torch.allclose(out, want, rtol=1e-4, atol=1e-5), float((out - want).abs().max())
        if crop is not None:  # the border matters: zeros there give other logits
            assert not torch.allclose(out, forward_padded(unet, x), rtol=1e-4, atol=1e-5)
        # a pointwise model: cropping the padded output gives the model's own output exactly
        assert torch.allclose(forward_padded(conv, x, crop=crop), conv(x), atol=1e-6)


# -- windowed prediction ---------------------------------------------------------------------------


@pytest.mark.parametrize("head_name,classes", HEADS)
@pytest.mark.parametrize("h,w,tile,overlap", [
    (200, 150, 64, 16),
    (150, 200, 64, 16),
    (70, 300, 32, 0),
    (300, 40, 64, 31),
    (65, 65, 64, 16),
    (40, 300, 64, 16),
    (97, 130, 32, 8),
])
def test_tiled_logits_equal_whole_image_logits_for_a_pointwise_model(head_name, classes, h, w, tile, overlap):
    image = rgb(h, w, seed=h + w)
    model = pointwise(len(classes))
    whole = make_seg(head_name, classes, model, tile=1024)
    tiled = make_seg(head_name, classes, model, tile=tile, overlap=overlap, batch_size=3)
    assert not tiled.fits(image) and whole.fits(image)
    a, b = whole.logits(image), tiled.logits(image)
    assert a.shape == b.shape == (len(classes), h, w)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    single = torch.from_numpy(coverage(h, w, tile, overlap) == 1)
    assert single.any()
    assert float((a - b)[:, single].abs().max()) <= 1e-6  # one window only: that window's own output
    with torch.no_grad():
        direct = model(normalise(image))[0]
    assert torch.allclose(a, direct, atol=1e-5)
    pa, pb = whole.predict(image, probs=True), tiled.predict(image, probs=True)
    assert pa.mask.shape == pb.mask.shape
    assert pa.mask.shape == ((h, w) if head_name == "softmax" else (len(classes), h, w))
    assert np.array_equal(pa.mask, pb.mask)
    assert pb.probs.shape == (len(classes), h, w) and pb.probs.dtype == np.float32
    assert np.allclose(pa.probs.astype(np.float32), pb.probs.astype(np.float32), atol=1e-3)


class Brightness(nn.Module):
    """Hand-set weights, output by content: the mean of a pixel's 9x9 neighbourhood over the bands (four
    reflect-padded 3x3 box blurs, stride 1), compared with one level per class: sigmoid logits
    scale * (m - level), softmax logits -scale * (m - level)^2 (the nearest level wins). Stride 1 and a
    9x9 reach: inside a window, farther than 4 pixels from its edges, the window sees what the whole
    image sees, so there tiling must give the whole-image logits exactly."""

    def __init__(self, exclusive: bool, levels: list[float], scale: float) -> None:
        super().__init__()
        convs = [nn.Conv2d(3 if k == 0 else 1, 1, 3, padding=1, padding_mode="reflect", bias=False) for k in range(4)]
        with torch.no_grad():
            for conv in convs:
                conv.weight.fill_(1 / conv.weight[0].numel())
        self.blur = nn.Sequential(*convs)
        self.register_buffer("levels", torch.tensor(levels).view(1, -1, 1, 1))
        self.exclusive, self.scale = exclusive, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.blur(x) - self.levels
        return -self.scale * d ** 2 if self.exclusive else self.scale * d


def far_from_inner_edges(h: int, w: int, tile: int, overlap: int, reach: int) -> np.ndarray:
    """Pixels farther than `reach` from every edge of every window covering them (image borders
    excepted: whole image and windows both end there)."""
    far = np.ones((h, w), bool)
    for y in window_starts(h, tile, tile - overlap):
        for x in window_starts(w, tile, tile - overlap):
            window = np.zeros((h, w), bool)
            window[y:y + tile, x:x + tile] = True
            core = np.zeros((h, w), bool)
            core[y + reach if y else 0: y + tile - reach if y + tile < h else h,
                 x + reach if x else 0: x + tile - reach if x + tile < w else w] = True
            far &= ~window | core
    return far


@pytest.mark.parametrize("head_name,classes", HEADS)
def test_tiled_prediction_of_a_content_model_equals_the_whole_image_away_from_window_edges(head_name, classes):
    """A real nuclei image (cropped to 352 x 320, multiples of 32: the whole image is not padded)
    through 96-pixel windows: in single-window regions and wherever no window edge is within the
    model's reach, the blended logits are the whole image's; elsewhere the masks agree on >= 99.9%."""
    path = next(p for p in sorted((NUCLEI / "train" / "images").iterdir()) if Image.open(p).size == (360, 360))
    image = np.ascontiguousarray(read_image(path, 3)[:352, :320])
    h, w, tile, overlap = 352, 320, 96, 32
    with torch.no_grad():
        m = Brightness(False, [0.0], 1.0)(normalise(image)).flatten().numpy()
    quantiles = (0.3, 0.6, 0.9) if head_name == "softmax" else (0.5, 0.8)
    model = Brightness(head_name == "softmax", np.quantile(m, quantiles).tolist(), 4 / float(m.std()))
    whole = make_seg(head_name, classes, model, tile=1024)
    tiled = make_seg(head_name, classes, model, tile=tile, overlap=overlap, batch_size=3)
    assert not tiled.fits(image) and whole.fits(image)
    a, b = whole.logits(image), tiled.logits(image)
    spread = float(a.abs().max())
    single = coverage(h, w, tile, overlap) == 1
    far = far_from_inner_edges(h, w, tile, overlap, reach=4)
    assert single.sum() > 30000 and (far & ~single).sum() > 30000 and not (single & ~far).any()
    assert float((a - b)[:, torch.from_numpy(far)].abs().max()) <= 1e-6 * spread
    pa, pb = whole.predict(image).mask, tiled.predict(image).mask
    same = pa == pb if head_name == "softmax" else (pa == pb).all(0)
    assert same[single].all()
    assert same[~single].mean() >= 0.999, same[~single].mean()
    near = torch.from_numpy(~far)
    assert float((a - b)[:, near].abs().max()) > 1e-2  # windows do see less near their edges: a real blend
    labels = pa if head_name == "softmax" else pa.sum(0)
    assert len(np.unique(labels)) == len(classes) + (head_name == "sigmoid")  # every class is drawn


def test_tiled_logits_are_the_gaussian_weighted_mean_of_window_outputs():
    """A model whose output is its window's mean: the blend is exactly sum(g * m) / sum(g)."""
    h, w, tile, overlap = 200, 150, 64, 16
    image = rgb(h, w, seed=5)
    model = WindowMean(2)
    seg = make_seg("sigmoid", ["a", "b"], model, tile=tile, overlap=overlap, batch_size=2)
    got = seg.logits(image).double()
    x = normalise(image)
    g = gaussian_weight(tile, tile).double()
    num = torch.zeros(2, h, w, dtype=torch.float64)
    den = torch.zeros(h, w, dtype=torch.float64)
    with torch.no_grad():
        for y in window_starts(h, tile, tile - overlap):
            for xs in window_starts(w, tile, tile - overlap):
                m = model(x[..., y:y + tile, xs:xs + tile])[0].double()
                num[:, y:y + tile, xs:xs + tile] += m * g
                den[y:y + tile, xs:xs + tile] += g
    expected = num / den
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    # and the blend is not a plain average: overlapping windows do differ here
    assert float((got[:, 40:70, :] - got[:, 40:70, :].mean()).abs().max()) > 1e-3


def test_predict_of_a_large_image_matches_logits_decoded_once():
    image = rgb(300, 200, seed=2)
    seg = make_seg("softmax", ["background", "a", "b"], pointwise(3), tile=64, overlap=16)
    logits = seg.logits(image)
    pred = seg.predict(image, probs=True)
    assert pred.mask.dtype == np.uint8 and pred.mask.shape == (300, 200)
    assert np.array_equal(pred.mask, logits.argmax(0).numpy())
    assert np.allclose(pred.probs.astype(np.float32), logits.softmax(0).numpy(), atol=1e-6)
    assert np.allclose(pred.probs.astype(np.float32).sum(0), 1, atol=1e-6)


def test_segmenter_rejects_bad_tiles():
    for tile, overlap in ((100, 16), (16, 0), (64, 64), (64, -1)):
        with pytest.raises(ValueError):
            make_seg("sigmoid", ["a"], pointwise(1), tile=tile, overlap=overlap)


# -- TTA ---------------------------------------------------------------------------------------------


def symmetric_conv(channels: int) -> nn.Module:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, channels, 3, padding=1)
    with torch.no_grad():
        k = conv.weight
        k.copy_((k + k.flip(-1) + k.flip(-2) + k.flip(-1, -2)) / 4)  # symmetric under both flips
    return conv


def test_tta_pads_each_flip_by_the_training_crop_rule():
    """The mean over the four flips of the U-Net run on each flipped image padded by numpy (rows 40 >= the crop
    of 36: mirrored; columns 33 < 36: zeros), cropped and flipped back."""
    torch.manual_seed(0)
    unet = build_model("Unet", "resnet18", 3).eval()
    x = torch.randn(1, 3, 40, 33)
    outs = []
    for dims in ((), (-1,), (-2,), (-2, -1)):
        xf = x.flip(dims).numpy() if dims else x.numpy()
        xf = np.pad(xf, ((0, 0), (0, 0), (12, 12), (0, 0)), mode="reflect")
        xf = np.pad(xf, ((0, 0), (0, 0), (0, 0), (15, 16)))
        with torch.inference_mode():
            out = unet(torch.from_numpy(xf))[..., 12:52, 15:48]
        outs.append(out.flip(dims) if dims else out)
    with torch.inference_mode():
        got = forward_tta(unet, x, crop=36)
    want = torch.stack(outs).mean(0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("head_name,classes", HEADS)
def test_tta_of_a_flip_equivariant_model_equals_no_tta(head_name, classes):
    image = rgb(64, 96, seed=7)
    conv = symmetric_conv(len(classes))
    plain = make_seg(head_name, classes, conv).logits(image)
    tta = make_seg(head_name, classes, conv, tta=True).logits(image)
    assert torch.allclose(plain, tta, atol=1e-5)
    # a pointwise model is flip-equivariant at any size, tiled or not
    odd = rgb(45, 170, seed=8)
    one = pointwise(len(classes))
    plain = make_seg(head_name, classes, one).logits(odd)
    tta = make_seg(head_name, classes, one, tta=True, tile=64, overlap=16).logits(odd)
    assert torch.allclose(plain, tta, atol=1e-5)
    assert np.array_equal(make_seg(head_name, classes, one).predict(odd).mask,
                          make_seg(head_name, classes, one, tta=True).predict(odd).mask)


def test_tta_averages_the_four_flips_in_logit_space_and_activates_once():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(8)  # lopsided and strong: flips change the output a lot
    image = rgb(64, 64, seed=9)
    x = normalise(image)
    with torch.no_grad():
        outs = [conv(x.flip(d)).flip(d) if d else conv(x) for d in ((), (-1,), (-2,), (-2, -1))]
    mean = torch.stack(outs).mean(0)
    with torch.inference_mode():
        assert torch.allclose(forward_tta(conv, x), mean, atol=1e-5)
    assert not torch.allclose(outs[0], mean, atol=1e-2)  # TTA is not a no-op for this model
    seg = make_seg("softmax", ["background", "a", "b"], conv, tta=True)
    pred = seg.predict(image, probs=True)
    assert np.allclose(pred.probs.astype(np.float32), mean[0].softmax(0).numpy(), atol=1e-6)
    mean_of_probs = torch.stack(outs).softmax(2).mean(0)[0].numpy()
    assert np.abs(mean_of_probs - mean[0].softmax(0).numpy()).max() > 0.02  # the distinction matters here
    assert np.array_equal(pred.mask, mean[0].argmax(0).numpy())


# -- arrays in, masks out -----------------------------------------------------------------------------


def test_a_pixel_value_is_the_same_input_whatever_the_array_type():
    """Normalisation works in pixel units: no division by a type's range, which would make an 11-bit
    uint16 image nearly constant and give one pixel value two meanings."""
    seg = make_seg("sigmoid", ["a", "b"], pointwise(2), tile=64, overlap=16)
    image = rgb(40, 50, seed=4)
    ref = seg.logits(image)
    assert torch.equal(seg.logits(image.astype(np.uint16)), ref)
    assert torch.equal(seg.logits(image.astype(np.float32)), ref)
    assert not torch.allclose(seg.logits(image.astype(np.uint16) * 257), ref, atol=1e-2)
    mean, std = np.array(seg.norm.mean), np.array(seg.norm.std)
    x = seg.to_input(image)[0].numpy()
    assert np.allclose(x, ((image - mean) / std).transpose(2, 0, 1), atol=1e-5)
    grey = image[:, :, 0]
    a = seg.predict(grey, probs=True)
    b = seg.predict(np.repeat(grey[:, :, None], 3, axis=2), probs=True)
    assert a.mask.shape == (2, 40, 50) and a.mask.dtype == bool
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.probs, b.probs)


def test_logits_accept_a_grey_image_like_predict_does():
    """predict() takes (H, W) images; logits() of the same image must not fail or differ."""
    seg = make_seg("sigmoid", ["a", "b"], pointwise(2), tile=64, overlap=16)
    for h, w in ((40, 50), (100, 70)):  # whole, and through windows
        grey = rgb(h, w, seed=h)[:, :, 0]
        want = seg.logits(grey[:, :, None])
        assert want.shape == (2, h, w)
        assert torch.equal(seg.logits(grey), want)


def test_sigmoid_thresholds_decide_the_masks():
    seg = make_seg("sigmoid", ["a", "b"], pointwise(2), tile=64, overlap=16)
    image = rgb(50, 60, seed=6)
    probs = seg.logits(image).sigmoid().numpy()
    seg.set_thresholds([0.3, 0.8])
    mask = seg.predict(image).mask
    assert np.array_equal(mask[0], probs[0] >= 0.3) and np.array_equal(mask[1], probs[1] >= 0.8)
    soft = make_seg("softmax", ["background", "a"], pointwise(2))
    with pytest.raises(ConfigError):
        soft.set_thresholds(0.4)


def test_predict_stream_keeps_order_and_batches_only_equal_sizes():
    seg = make_seg("softmax", ["background", "a", "b"], pointwise(3), tile=64, overlap=16, batch_size=2)
    shapes = [(40, 50), (40, 50), (40, 50), (30, 20), (100, 90), (30, 20), (30, 20)]
    images = [rgb(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    batches = list(batches_by_shape(iter(enumerate(images)), 2, seg.fits))
    assert [[k for k, _ in b] for b in batches] == [[0, 1], [2], [3], [4], [5, 6]]
    out = list(seg.predict_stream(enumerate(images), probs=True))
    assert [k for k, _ in out] == list(range(len(images)))
    for (k, pred), image in zip(out, images):
        alone = seg.predict(image, probs=True)
        assert pred.mask.shape == image.shape[:2]
        assert np.array_equal(pred.mask, alone.mask)
        assert np.allclose(pred.probs.astype(np.float32), alone.probs.astype(np.float32), atol=1e-3)


# -- folders: `segkit predict` ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(module_tmp):
    """Tiny random-weight U-Net checkpoints, one per head."""
    root = module_tmp("ckpt")
    folders = {}
    for head_name, classes in HEADS:
        torch.manual_seed(0)
        head = build_head(head_name, classes)
        data = {**DATA, "mask": "index" if head_name == "softmax" else "multilabel"}
        folders[head_name] = root / head_name
        save_checkpoint(folders[head_name], build_model("Unet", "resnet18", head.channels),
                        checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD), data=data))
    return folders


def awkward_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Good images of every awkward kind (relative path -> (H, W)) and one corrupt file."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    tifffile.imwrite(root / "deep16.tif", np.random.default_rng(0).integers(0, 65536, (40, 50), dtype=np.uint16))
    Image.fromarray(rgb(33, 45, 1)[:, :, 0]).save(root / "grey.png")
    Image.fromarray(np.dstack([rgb(30, 20, 2), np.full((30, 20), 7, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb(7, 5, 3)).save(root / "tiny.png")
    Image.fromarray(rgb(36, 52, 4)).save(root / "sub" / "deeper" / "normal.png")
    Image.fromarray(rgb(70, 40, 5)).save(root / "sub" / "tall.png")
    return {"deep16.tif": (40, 50), "grey.png": (33, 45), "rgba.png": (30, 20), "tiny.png": (7, 5),
            "sub/deeper/normal.png": (36, 52), "sub/tall.png": (70, 40)}


PREDICT = ["--device", "cpu", "--no-progress", "--tile", "64", "--overlap", "16"]  # tall.png goes through windows


def test_predict_softmax_folder_writes_palette_masks_and_probabilities(capsys, tmp_path, content_checkpoints):
    """With a checkpoint whose masks follow the image (a random one draws one class almost everywhere,
    and the masks of two different images would then agree too)."""
    sizes = awkward_folder(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("predict", content_checkpoints["softmax"], tmp_path / "in", out, *PREDICT,
                                   "--save-probs", "--workers", "2")
    assert code == 1, stderr
    assert "corrupt.png" in stderr and "Traceback" not in stderr
    assert f"{len(sizes)} images" in stdout and "1 failed" in stdout
    seg = Segmenter.load(content_checkpoints["softmax"], device="cpu", tile=64, overlap=16)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted([str(Path(r).with_suffix(".png").as_posix()) for r in sizes]
                      + [str(Path(r).with_suffix(".npy").as_posix()) for r in sizes])
    assert written == expected  # the input tree mirrored; nothing for the corrupt file, no temp files
    for rel, (h, w) in sizes.items():
        with Image.open(out / Path(rel).with_suffix(".png")) as im:
            assert im.mode == "P", rel
            assert (im.height, im.width) == (h, w), rel
            mask = np.asarray(im)
            assert tuple(im.getpalette()[3:6]) == seg.head.colors[1]
        assert np.array_equal(mask, seg.predict(read_image(tmp_path / "in" / rel)).mask), rel
        assert 0.05 < mask.mean() < 0.95, rel  # both classes, in quantity
        probs = np.load(out / Path(rel).with_suffix(".npy"))
        assert probs.dtype == np.float16 and probs.shape == (2, h, w), rel
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3), rel
        p = np.sort(probs.astype(np.float32), axis=0)
        clear = p[-1] - p[-2] > 2e-3  # away from float16 ties the probabilities' argmax is the mask
        assert np.array_equal(probs.astype(np.float32).argmax(0)[clear], mask[clear]), rel


def test_predict_sigmoid_folder_writes_one_binary_png_per_class(capsys, tmp_path, content_checkpoints):
    """With a checkpoint whose masks follow the image (see the softmax test)."""
    sizes = awkward_folder(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("predict", content_checkpoints["sigmoid"], tmp_path / "in", out, *PREDICT,
                                   "--workers", "0", "--save-probs")
    assert code == 1 and "corrupt.png" in stderr and "Traceback" not in stderr
    seg = Segmenter.load(content_checkpoints["sigmoid"], device="cpu", tile=64, overlap=16)
    for rel, (h, w) in sizes.items():
        expected = seg.predict(read_image(tmp_path / "in" / rel)).mask
        with Image.open(out / "nucleus" / Path(rel).with_suffix(".png")) as im:
            assert im.mode == "L" and (im.height, im.width) == (h, w), rel
            m = np.asarray(im)
        assert np.array_equal(m, np.where(expected[0], 255, 0)), rel
        assert 0.05 < expected.mean() < 0.95, rel  # both values, in quantity
        probs = np.load(out / Path(rel).with_suffix(".npy"))
        assert probs.dtype == np.float16 and probs.shape == (1, h, w)
        want = seg.logits(read_image(tmp_path / "in" / rel)).sigmoid().double().numpy()
        step = np.spacing(want.astype(np.float16)).astype(np.float64)  # float16 rounds to half a step
        assert (np.abs(probs.astype(np.float64) - want) <= step).all(), rel


def test_predict_refuses_output_inside_input_and_writes_nothing(capsys, tmp_path, checkpoints):
    awkward_folder(tmp_path / "in")
    before = sorted(p.as_posix() for p in (tmp_path / "in").rglob("*"))
    for out in (tmp_path / "in", tmp_path / "in" / "masks", tmp_path / "in" / "sub" / "x"):
        code, _, stderr = run_cli("predict", checkpoints["softmax"], tmp_path / "in", out, *PREDICT)
        assert code == 2 and stderr.startswith("error: ") and "inside the input" in stderr
        assert "Traceback" not in stderr
    assert sorted(p.as_posix() for p in (tmp_path / "in").rglob("*")) == before


def test_predict_refuses_to_overwrite_unless_asked(capsys, tmp_path, checkpoints):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rgb(40, 40, 1)).save(tmp_path / "in" / "one.png")
    Image.fromarray(rgb(20, 30, 2)).save(tmp_path / "in" / "sub" / "two.jpg")
    out = tmp_path / "out"
    for head_name in ("softmax", "sigmoid"):
        target = out / head_name
        code, stdout, stderr = run_cli("predict", checkpoints[head_name], tmp_path / "in", target, *PREDICT)
        assert code == 0, stderr
        assert "2 images" in stdout and "0 failed" in stdout
        first = {p: p.read_bytes() for p in target.rglob("*.png")}
        assert len(first) == (2 if head_name == "softmax" else 4)
        code, _, stderr = run_cli("predict", checkpoints[head_name], tmp_path / "in", target, *PREDICT)
        assert code == 2 and "--overwrite" in stderr and "Traceback" not in stderr
        # asking for probabilities now adds new files only, but the masks exist: still refused
        code, _, stderr = run_cli("predict", checkpoints[head_name], tmp_path / "in", target, *PREDICT,
                              "--save-probs")
        assert code == 2 and "--overwrite" in stderr
        assert {p: p.read_bytes() for p in target.rglob("*.png")} == first
        assert not list(target.rglob("*.npy"))
        code, stdout, stderr = run_cli("predict", checkpoints[head_name], tmp_path / "in", target, *PREDICT,
                                   "--overwrite", "--save-probs")
        assert code == 0, stderr
        assert {p: p.read_bytes() for p in target.rglob("*.png")} == first  # same model, same masks
        assert len(list(target.rglob("*.npy"))) == 2


def test_predict_large_image_through_windows_gets_a_mask_of_its_size(capsys, tmp_path, content_checkpoints):
    """A real nuclei image (cropped to 300 x 200) through 64-pixel windows, with a checkpoint whose masks follow
    the image (a random one draws one class almost everywhere, and any two such masks agree)."""
    (tmp_path / "in").mkdir()
    path = next(p for p in sorted((NUCLEI / "train" / "images").iterdir()) if Image.open(p).size == (360, 360))
    image = np.ascontiguousarray(read_image(path, 3)[:300, :200])
    Image.fromarray(image).save(tmp_path / "in" / "big.png")
    ckpt = content_checkpoints["softmax"]
    code, _, stderr = run_cli("predict", ckpt, tmp_path / "in", tmp_path / "out",
                          "--device", "cpu", "--no-progress", "--tile", "64", "--overlap", "16", "--workers", "0",
                          "--batch-size", "4")
    assert code == 0, stderr
    mask = np.asarray(Image.open(tmp_path / "out" / "big.png"))
    assert mask.shape == (300, 200)
    assert 0.05 < mask.mean() < 0.95  # both classes, in quantity
    seg = Segmenter.load(ckpt, device="cpu", tile=64, overlap=16, batch_size=4)
    assert np.array_equal(mask, seg.predict(image).mask)


def test_predict_folder_api_summary_and_user_errors(tmp_path, checkpoints):
    seg = Segmenter.load(checkpoints["softmax"], device="cpu")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 30)
    Image.fromarray(rgb(20, 24)).save(tmp_path / "in" / "sub" / "ok.png")
    summary = seg.predict_folder(tmp_path / "in", tmp_path / "out", workers=0)
    assert summary.images == 1 and (tmp_path / "out" / "sub" / "ok.png").is_file()
    assert [p.name for p, _ in summary.failed] == ["corrupt.png"]
    assert "corrupt.png" in summary.failed[0][1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegkitError, match="no images"):
        seg.predict_folder(tmp_path / "empty", tmp_path / "o1")
    with pytest.raises(SegkitError, match="not found"):
        seg.predict_folder(tmp_path / "missing", tmp_path / "o2")
    (tmp_path / "dup").mkdir()
    Image.fromarray(rgb(8, 8)).save(tmp_path / "dup" / "x.png")
    tifffile.imwrite(tmp_path / "dup" / "x.tif", rgb(8, 8))
    with pytest.raises(SegkitError, match="same mask"):
        plan_outputs(seg.head, tmp_path / "dup", tmp_path / "o3", probs=False, overwrite=False)
    assert not (tmp_path / "o3").exists()


def test_predict_cli_reports_bad_options_without_traceback(capsys, tmp_path, checkpoints):
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb(8, 8)).save(tmp_path / "in" / "x.png")
    for extra, words in ((["--tile", "100"], "32"), (["--overlap", "64", "--tile", "64"], "overlap"),
                         (["--threshold", "0.3"], "argmax")):
        code, _, stderr = run_cli("predict", checkpoints["softmax"], tmp_path / "in", tmp_path / "out",
                              "--device", "cpu", "--no-progress", *extra)
        assert code == 2 and stderr.startswith("error: ") and words in stderr, (extra, stderr)
        assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    code, _, stderr = run_cli("predict", tmp_path / "in", tmp_path / "in", tmp_path / "out")
    assert code == 2 and "not a segkit checkpoint" in stderr


def test_predict_usage_errors_exit_2_without_traceback(capsys, tmp_path, checkpoints):
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb(8, 8)).save(tmp_path / "in" / "x.png")
    for args in ([tmp_path / "in"], [tmp_path / "in", tmp_path / "out", "--tile", "big"],
                 [tmp_path / "in", tmp_path / "out", "--no-such-option"]):
        code, _, stderr = run_cli("predict", checkpoints["softmax"], *args)
        assert code == 2, (args, code)
        assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_an_image_type_the_model_was_not_trained_on_is_refused(tmp_path, content_checkpoints):
    """A model trained on uint8 images (model.json data.image_dtypes, as `segkit train` writes it: see
    test_geo) refuses a 16-bit copy of a real image before anything is written, naming the file and both
    types: its 0..65535 values would reach the network 257 times larger than anything it saw. The same
    model under per_image normalisation takes it (each image's own scale)."""
    import json
    import shutil

    ckpt = Path(shutil.copytree(content_checkpoints["sigmoid"], tmp_path / "ckpt"))
    meta = json.loads((ckpt / "model.json").read_text())
    meta["data"] = {**(meta.get("data") or {}), "image_dtypes": ["uint8"]}
    (ckpt / "model.json").write_text(json.dumps(meta))
    src = sorted((NUCLEI / "test" / "images").iterdir())[0]
    rgb = np.asarray(Image.open(src).convert("RGB"))
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "a8.png")
    tifffile.imwrite(tmp_path / "in" / "b16.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("predict", ckpt, tmp_path / "in", out, *PREDICT)
    assert code == 2 and "Traceback" not in stderr
    assert "1 of 2 images do not fit" in stderr and "b16.tif: a uint16 image" in stderr and "uint8" in stderr
    assert not out.exists()
    seg = Segmenter.load(ckpt, device="cpu")
    with pytest.raises(SegkitError, match="a uint16 image, but the model was trained on uint8"):
        seg.predict(rgb.astype(np.uint16) * 257)
    assert seg.predict(rgb).mask.any()
    meta["normalization"] = {"mode": "per_image"}
    (ckpt / "model.json").write_text(json.dumps(meta))
    per_image = Segmenter.load(ckpt, device="cpu")
    wide, narrow = per_image.predict(rgb.astype(np.uint16) * 257, probs=True), per_image.predict(rgb, probs=True)
    assert 0.05 < narrow.mask.mean() < 0.95  # z-scores of 257 x and x are equal: only ties may differ
    assert (np.abs(narrow.probs.astype(np.float32) - 0.5)[wide.mask != narrow.mask] < 1e-3).all()
