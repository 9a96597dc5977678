"""Pictures: overlays tinted with class colours and outlined, error panels against the truth,
and `segkit visualize` end to end on masks written like `segkit predict` writes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.data.io import write_png
from segkit.errors import SegkitError
from segkit.heads import build_head
from segkit.data.normalize import Normalization
from segkit.model import build_model, checkpoint_meta, save_checkpoint
from segkit.viz import ERROR_COLORS, error_map, overlay, panels_picture, sources_for, to_display
from conftest import NUCLEI, run_cli, small_nuclei_stems
from samples import HIPPO_CASES, HIPPO_CLASSES, boundary_ring, hippo_slice_arrays

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
GREY = 100
H, W = 48, 64
A_COLOR, B_COLOR = (240, 20, 60), (20, 200, 100)  # even values: every tint below is a whole number
DATA = {"mask": "index", "ignore_index": None, "foreground_value": None, "colors": None,
        "val_fraction": 0.2, "seed": 0}



def ckpt(folder: Path, head_name: str, classes: list[str], colors=None, mask: str = "index"):
    head = build_head(head_name, classes, colors=colors)
    torch.manual_seed(0)
    save_checkpoint(folder, build_model("Unet", "resnet18", head.channels),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit(MEAN, STD), data={**DATA, "mask": mask}))
    return head


def edges(m: np.ndarray) -> np.ndarray:
    """Pixels of `m` with an 8-neighbour outside `m` (outside the picture counts as inside)."""
    p = np.pad(m, 1, constant_values=True)
    inner = np.ones_like(m)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inner &= p[1 + dy: 1 + dy + m.shape[0], 1 + dx: 1 + dx + m.shape[1]]
    return m & ~inner


def expected_overlay(grey: int | np.ndarray, masks: np.ndarray, colors, alpha: float) -> np.ndarray:
    """Independent rendering of DESIGN's overlay on a flat grey image (or on an RGB image): tint with
    the mean colour of a pixel's classes, then each class's outline in its colour (later classes on top)."""
    painted = [i for i, c in enumerate(colors) if tuple(c) != (0, 0, 0)]
    out = np.full(masks.shape[1:] + (3,), float(grey)) if np.isscalar(grey) else grey.astype(float)
    count = masks[painted].sum(0)
    tint = np.zeros_like(out)
    for i in painted:
        tint += masks[i][:, :, None] * np.array(colors[i], float)
    hit = count > 0
    out[hit] = (1 - alpha) * out[hit] + alpha * tint[hit] / count[hit][:, None]
    for i in painted:
        out[edges(masks[i])] = colors[i]
    return np.round(out)


def flat_image(folder: Path, stem: str = "x", h: int = H, w: int = W) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((h, w, 3), GREY, np.uint8)
    Image.fromarray(image).save(folder / f"{stem}.png")
    return image


def overlay_rows(picture: np.ndarray, w: int, h: int) -> int:
    """First row of the pictured image: the first panel is the untouched flat grey image."""
    rows = np.flatnonzero((picture[:, :w] == GREY).all(axis=(1, 2)))
    assert len(rows) == h and rows[-1] - rows[0] == h - 1, rows
    return int(rows[0])


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# -- overlay and error map ---------------------------------------------------------------------------


def test_overlay_tints_outlines_and_blends_overlapping_classes():
    image = np.full((H, W, 3), GREY, np.uint8)
    masks = np.zeros((3, H, W), bool)
    masks[1, 8:32, 8:40] = True
    masks[2, 20:44, 24:56] = True  # overlaps class 1 on rows 20..31, columns 24..39
    masks[0] = ~(masks[1] | masks[2])
    colors = [(0, 0, 0), A_COLOR, B_COLOR]
    out = overlay(image, masks, colors, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    assert np.array_equal(out, expected_overlay(GREY, masks, colors, 0.5))
    assert out[2, 2].tolist() == [GREY] * 3  # background (black) is never painted
    assert out[12, 12].tolist() == [170, 60, 80]  # round(0.5 * 100 + 0.5 * a)
    assert out[38, 50].tolist() == [60, 150, 100]
    assert out[25, 30].tolist() == [115, 105, 90]  # both: the mean colour (130, 110, 80), tinted
    assert out[31, 30].tolist() == list(A_COLOR)  # a's outline runs through b's area
    assert out[25, 24].tolist() == list(B_COLOR)  # b's outline runs through a's area
    alpha = 0.25
    out = overlay(image, masks, colors, alpha=alpha)
    assert out[12, 12].tolist() == np.round(np.array(A_COLOR) * alpha + GREY * (1 - alpha)).tolist()
    assert np.array_equal(overlay(image, masks, colors, alpha=0.0)[~(edges(masks[1]) | edges(masks[2]))],
                          image[~(edges(masks[1]) | edges(masks[2]))])


def test_a_16_bit_image_is_shown_stretched_between_its_percentiles():
    """Display only: 11-bit content in uint16 is stretched per band (0.5/99.5 percentiles), not divided
    by 65535 (which would show it black)."""
    image = np.arange(2000, dtype=np.uint16).reshape(40, 50) + 48
    shown = to_display(image)
    low, high = np.percentile(image, (0.5, 99.5))
    want = (np.clip((image - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
    assert shown.shape == (40, 50, 3) and np.array_equal(shown[:, :, 0], want) and (shown[:, :, 2] == want).all()
    assert shown.min() == 0 and shown.max() == 255
    out = overlay(image, np.zeros((1, 40, 50), bool), [A_COLOR])
    assert np.array_equal(out, shown)
    assert np.array_equal(to_display(np.full((4, 4), GREY, np.uint8)), np.full((4, 4, 3), GREY, np.uint8))


def test_error_map_colours_false_positives_misses_and_wrong_classes():
    image = np.full((20, 20, 3), GREY, np.uint8)
    truth = np.zeros((3, 20, 20), bool)
    pred = np.zeros((3, 20, 20), bool)
    truth[1, 2:8, 2:8] = True
    pred[1, 2:8, 2:10] = True  # columns 8, 9: false positive of class 1
    truth[2, 12:18, 12:18] = True
    pred[2, 12:18, 14:18] = True  # columns 12, 13: missed class 2
    pred[1, 12:14, 14:16] = True
    pred[2, 12:14, 14:16] = False  # truth 2, predicted 1: wrong class
    truth[0] = ~(truth[1] | truth[2])
    pred[0] = ~(pred[1] | pred[2])
    valid = np.ones((20, 20), bool)
    valid[0] = False  # nothing is an error where the truth is unknown
    pred[1, 0, :] = True
    out = error_map(image, truth, pred, valid, [(0, 0, 0), A_COLOR, B_COLOR])
    assert out[4, 8].tolist() == list(ERROR_COLORS["false positive"])
    assert out[15, 12].tolist() == list(ERROR_COLORS["missed (false negative)"])
    assert out[12, 14].tolist() == list(ERROR_COLORS["wrong class"])
    assert out[4, 4].tolist() == [40, 40, 40]  # right: the image, dimmed
    assert out[0, 5].tolist() == [40, 40, 40]  # ignored
    assert out[10, 0].tolist() == [40, 40, 40]


def test_panels_picture_is_four_panels_wide():
    image = np.full((H, W, 3), GREY, np.uint8)
    m = np.zeros((2, H, W), bool)
    m[1, 10:20, 10:20] = True
    m[0] = ~m[1]
    pic = panels_picture(image, m, m, np.ones((H, W), bool), ["background", "a"], [(0, 0, 0), A_COLOR])
    assert pic.shape[1] == 4 * W and pic.shape[0] > H
    top = overlay_rows(pic, W, H)
    assert np.array_equal(pic[top:top + H, W:2 * W], expected_overlay(GREY, m, [(0, 0, 0), A_COLOR], 0.5))
    assert (pic[top:top + H, 3 * W:] == 40).all()  # no errors


# -- `segkit visualize` --------------------------------------------------------------------------------


SOFT_COLORS = [(0, 0, 0), A_COLOR, B_COLOR]


def softmax_masks(pred_index: np.ndarray) -> np.ndarray:
    return np.stack([pred_index == k for k in range(3)])


def test_visualize_softmax_prediction(capsys, tmp_path):
    head = ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"], SOFT_COLORS)
    flat_image(tmp_path / "images")
    pred = np.zeros((H, W), np.uint8)
    pred[8:24, 8:32] = 1
    pred[28:44, 36:60] = 2
    (tmp_path / "masks").mkdir()
    write_png(tmp_path / "masks" / "x.png", pred, head.palette())  # as `segkit predict` writes it
    code, out, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out",
                         "--checkpoint", tmp_path / "ckpt", "--alpha", "0.5")
    assert code == 0, err
    assert "1 pictures" in out
    pic = read_rgb(tmp_path / "out" / "x.png")
    assert pic.shape[1] == W and pic.shape[0] > H  # a legend strip below
    body = pic[:H]
    assert np.array_equal(body, expected_overlay(GREY, softmax_masks(pred), SOFT_COLORS, 0.5))
    assert body[2, 2].tolist() == [GREY] * 3 and body[46, 62].tolist() == [GREY] * 3
    assert body[15, 20].tolist() == [170, 60, 80]  # round((1 - 0.5) * 100 + 0.5 * colour of a)
    assert body[35, 48].tolist() == [60, 150, 100]
    assert body[8, 20].tolist() == list(A_COLOR) and body[43, 48].tolist() == list(B_COLOR)  # outlines
    # another alpha, into another folder
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out2",
                       "--checkpoint", tmp_path / "ckpt", "--alpha", "0.25")
    assert code == 0, err
    assert read_rgb(tmp_path / "out2" / "x.png")[15, 20].tolist() == [135, 80, 90]  # 75 + colour / 4


def test_visualize_sigmoid_overlapping_prediction(capsys, tmp_path):
    ckpt(tmp_path / "ckpt", "sigmoid", ["a", "b"], [A_COLOR, B_COLOR], mask="multilabel")
    flat_image(tmp_path / "images")
    masks = np.zeros((2, H, W), bool)
    masks[0, 8:32, 8:40] = True
    masks[1, 20:44, 24:56] = True
    for c, name in enumerate(["a", "b"]):  # OUTPUT/<class>/<stem>.png, 0/255, as `segkit predict` writes them
        write_png(tmp_path / "masks" / name / "x.png", masks[c].astype(np.uint8) * 255)
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out",
                       "--checkpoint", tmp_path / "ckpt")
    assert code == 0, err
    body = read_rgb(tmp_path / "out" / "x.png")[:H]
    assert np.array_equal(body, expected_overlay(GREY, masks, [A_COLOR, B_COLOR], 0.5))
    assert body[25, 30].tolist() == [115, 105, 90]  # in both: the mean colour blend
    assert body[12, 12].tolist() == [170, 60, 80] and body[40, 50].tolist() == [60, 150, 100]
    assert body[2, 2].tolist() == [GREY] * 3
    assert body[31, 30].tolist() == list(A_COLOR)  # both outlines, also where they cross the other class
    assert body[25, 24].tolist() == list(B_COLOR)


def test_visualize_with_truth_draws_four_panels_and_errors(capsys, tmp_path):
    head = ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"], SOFT_COLORS)
    flat_image(tmp_path / "images")
    truth = np.zeros((H, W), np.uint8)
    truth[8:24, 8:32] = 1
    truth[28:44, 36:56] = 2
    pred = np.zeros((H, W), np.uint8)
    pred[8:24, 8:32] = 1
    pred[10:14, 10:14] = 2  # truth a: wrong class
    pred[28:44, 40:60] = 2  # columns 36..39 missed, columns 56..59 false positives
    write_png(tmp_path / "truth" / "x.png", truth)
    write_png(tmp_path / "masks" / "x.png", pred, head.palette())
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "panels",
                       "--checkpoint", tmp_path / "ckpt", "--truth", tmp_path / "truth")
    assert code == 0, err
    pic = read_rgb(tmp_path / "panels" / "x.png")
    assert pic.shape[1] == 4 * W
    top = overlay_rows(pic, W, H)
    assert top > 0  # titles above
    panels = [pic[top:top + H, k * W:(k + 1) * W] for k in range(4)]
    assert (panels[0] == GREY).all()
    assert np.array_equal(panels[1], expected_overlay(GREY, softmax_masks(truth), SOFT_COLORS, 0.5))
    assert np.array_equal(panels[2], expected_overlay(GREY, softmax_masks(pred), SOFT_COLORS, 0.5))
    errors = panels[3]
    fp = (pred == 2) & (truth == 0)
    missed = (truth == 2) & (pred == 0)
    wrong = (truth == 1) & (pred == 2)
    assert fp.sum() == 16 * 4 and missed.sum() == 16 * 4 and wrong.sum() == 16
    assert (errors[fp] == ERROR_COLORS["false positive"]).all()
    assert errors[30, 58].tolist() == list(ERROR_COLORS["false positive"])
    assert (errors[missed] == ERROR_COLORS["missed (false negative)"]).all()
    assert (errors[wrong] == ERROR_COLORS["wrong class"]).all()
    right = ~(fp | missed | wrong)
    assert (errors[right] == int(GREY * 0.4)).all()


def test_visualize_predict_output_end_to_end(capsys, tmp_path, content_checkpoints):
    """`segkit predict` then `segkit visualize` on a real nuclei image, with a checkpoint whose masks follow
    the image: every pixel away from an outline shows the image, tinted where a class is drawn."""
    ckpt_dir = content_checkpoints["softmax"]
    stem = small_nuclei_stems(1, "test")[0]
    (tmp_path / "images").mkdir()
    shutil.copy(NUCLEI / "test" / "images" / f"{stem}.png", tmp_path / "images" / f"{stem}.png")
    image = read_rgb(tmp_path / "images" / f"{stem}.png")
    code, _, err = run_cli("predict", ckpt_dir, tmp_path / "images", tmp_path / "pred",
                           "--device", "cpu", "--no-progress", "--workers", "0")
    assert code == 0, err
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "pred", tmp_path / "out",
                           "--checkpoint", ckpt_dir, "--alpha", "0.5")
    assert code == 0, err
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png"))
    h, w = pred.shape
    body = read_rgb(tmp_path / "out" / f"{stem}.png")[:h]
    colors = build_head("softmax", ["background", "nucleus"]).colors
    masks = np.stack([pred == k for k in range(2)])
    assert 0.05 < masks[1].mean() < 0.95  # both classes cover a real share of the image
    outline = edges(masks[1])
    inner = np.zeros((h, w), bool)
    inner[1:-1, 1:-1] = True  # away from the picture's border, where outlines are a matter of taste
    assert np.array_equal(body[~masks[1] & ~outline & inner], image[~masks[1] & ~outline & inner])
    sel = masks[1] & ~outline & inner
    assert np.array_equal(body[sel], np.round(0.5 * image[sel] + 0.5 * np.array(colors[1])))
    assert (body[outline & inner] == colors[1]).all()  # the nuclei are outlined in their colour


def test_visualize_refuses_to_overwrite_or_write_inside_an_input(capsys, tmp_path):
    head = ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"], SOFT_COLORS)
    flat_image(tmp_path / "images")
    pred = np.zeros((H, W), np.uint8)
    pred[8:24, 8:32] = 1
    write_png(tmp_path / "masks" / "x.png", pred, head.palette())
    args = ["--checkpoint", tmp_path / "ckpt"]
    for out in (tmp_path / "images" / "o", tmp_path / "masks", tmp_path / "masks" / "o"):
        code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", out, *args)
        assert code == 2 and err.startswith("error: ") and "inside an input" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["x.png"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["x.png"]
    assert run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out", *args)[0] == 0
    before = (tmp_path / "out" / "x.png").read_bytes()
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out", *args,
                       "--alpha", "0.9")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out" / "x.png").read_bytes() == before
    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out", *args,
                       "--alpha", "0.9", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "out" / "x.png").read_bytes() != before


def test_visualize_usage_errors_exit_2_with_a_message(capsys, tmp_path):
    """Click/Typer usage errors (a value out of range, an unknown option, a missing argument) are
    user mistakes like SegkitError: a message and exit code 2, no traceback."""
    ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"], SOFT_COLORS)
    flat_image(tmp_path / "images")
    for args in (["--checkpoint", tmp_path / "ckpt", "--alpha", "1.5"], ["--checkpoint", tmp_path / "ckpt", "--bogus"]):
        code, out, err = run_cli("visualize", tmp_path / "images", tmp_path / "images", tmp_path / "o", *args)
        assert code == 2, (args, code)
        assert ("alpha" in err or "1.5" in err or "bogus" in err) and "Traceback" not in err
    code, _, err = run_cli("visualize", tmp_path / "images")
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_visualize_reports_images_without_masks_but_not_other_files(capsys, tmp_path):
    head = ckpt(tmp_path / "ckpt", "softmax", ["background", "a", "b"], SOFT_COLORS)
    flat_image(tmp_path / "images", "x")
    flat_image(tmp_path / "images", "y")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "masks" / "x.png", np.zeros((H, W), np.uint8), head.palette())
    code, out, err = run_cli("visualize", tmp_path / "images", tmp_path / "masks", tmp_path / "out",
                         "--checkpoint", tmp_path / "ckpt")
    assert code == 0, err
    assert "1 pictures" in out and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]
    assert "1 images have no mask" in err and "y.png" in err  # notes.txt is not an image without a mask


def test_visualize_needs_exactly_one_source_of_classes(capsys, tmp_path):
    ckpt(tmp_path / "ckpt", "softmax", ["background", "a"])
    with pytest.raises(SegkitError, match="exactly one"):
        sources_for(tmp_path, None, None, None)
    with pytest.raises(SegkitError, match="exactly one"):
        sources_for(tmp_path, tmp_path / "ckpt", tmp_path / "c.yaml", None)
    code, _, err = run_cli("visualize", tmp_path, tmp_path, tmp_path / "o")
    assert code == 2 and "--checkpoint or --config" in err and "Traceback" not in err
    head, masks, truth = sources_for(tmp_path / "m", tmp_path / "ckpt", None, tmp_path / "t")
    assert head.classes == ["background", "a"] and masks.fmt.classes == ["background", "a"]
    assert truth is not None and truth.folder == tmp_path / "t"


VOID = 255  # the ignore value: the 1-pixel ring on every boundary between labels


def test_visualize_config_reads_masks_in_its_data_format_with_its_colours(capsys, tmp_path):
    """Real hippocampus index masks (VOID ring ignored) read as a config's data section says, drawn in the
    config's colours (background black: not painted); with --truth, the error panel marks exactly the
    changed pixels."""
    import yaml

    slices = hippo_slice_arrays(HIPPO_CASES[:1])
    stem = max(slices, key=lambda k: min(int((slices[k][1] == 1).sum()), int((slices[k][1] == 2).sum())))
    grey, labels = slices[stem]
    image = np.repeat(grey[:, :, None], 3, axis=2)
    truth = np.where(boundary_ring(labels), VOID, labels).astype(np.uint8)
    h, w = truth.shape
    (tmp_path / "images").mkdir()
    Image.fromarray(grey).save(tmp_path / "images" / f"{stem}.png")
    pred = truth.copy()
    rows = np.arange(h)[:, None]
    pred[(truth == 2) & (rows >= h // 2)] = 1  # posterior drawn as anterior: a wrong class
    block = (slice(0, 6), slice(0, w))
    pred[block] = 2  # posterior over the background (false positives: background is not drawn)
    pred[(truth == 1) & (rows < h // 2) & (np.arange(w)[None] < w // 2)] = 2  # over anterior (wrong)
    write_png(tmp_path / "pred" / f"{stem}.png", pred)
    write_png(tmp_path / "truth" / f"{stem}.png", truth)
    colors = [(0, 0, 0), A_COLOR, B_COLOR]
    config = tmp_path / "hippo.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "classes": HIPPO_CLASSES, "mask": "index",
                                               "ignore_index": VOID, "colors": [list(c) for c in colors]},
                                      "model": {"head": "softmax"}}))
    code, out, err = run_cli("visualize", tmp_path / "images", tmp_path / "pred", tmp_path / "out",
                             "--config", config, "--alpha", "0.5")
    assert code == 0, err
    assert "1 pictures" in out
    masks = np.stack([pred == k for k in range(len(HIPPO_CLASSES))])  # VOID is no class: left untinted
    body = read_rgb(tmp_path / "out" / f"{stem}.png")[:h]
    assert np.array_equal(body, expected_overlay(image, masks, colors, 0.5))
    unpainted = (pred == VOID) | (pred == 0)
    inside = unpainted & ~np.any([edges(m) for m in masks[1:]], axis=0)
    assert (pred[inside] == VOID).any() and np.array_equal(body[inside], image[inside])

    code, _, err = run_cli("visualize", tmp_path / "images", tmp_path / "pred", tmp_path / "panels",
                           "--config", config, "--truth", tmp_path / "truth")
    assert code == 0, err
    pic = read_rgb(tmp_path / "panels" / f"{stem}.png")
    assert pic.shape[1] == 4 * w
    top = next(y for y in range(pic.shape[0]) if np.array_equal(pic[y: y + h, :w], image))
    errors = pic[top:top + h, 3 * w:]
    valid = truth != VOID
    wrong = valid & (pred != truth) & (truth != 0) & (pred != 0)
    fp = valid & (pred != truth) & (truth == 0) & (pred != 0)  # background is not drawn: only a false positive
    assert wrong.any() and fp.any() and not (valid & (pred == 0) & (truth != 0)).any()
    assert (errors[wrong] == ERROR_COLORS["wrong class"]).all()
    assert (errors[fp] == ERROR_COLORS["false positive"]).all()
    right = ~(wrong | fp)
    assert np.array_equal(errors[right], (image[right].astype(np.float32) * 0.4).astype(np.uint8))
