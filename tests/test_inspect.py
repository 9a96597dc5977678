"""`segkit inspect`: the numbers (checked against hand counts of the real masks) and the head it advises."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import NUCLEI, copy_nuclei, run_cli
from samples import HIPPO_CASES, HIPPO_CLASSES, boundary_ring, hippo_multilabel, hippo_slice_arrays, hippo_slices
from segkit.config import load_config
from segkit.data.inspect import DataGuess, inspect


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _listing(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- nuclei: binary masks, background unlabelled -> sigmoid --------------------------------------------


def test_inspect_nuclei_cli_recommends_sigmoid(cli):
    r = cli("inspect", NUCLEI)
    assert r.code == 0, r.err
    assert r.out.startswith(f"{NUCLEI}: binary masks, classes ['fg'] (guessed from the files)")
    assert "[train] 48 images, 48 with masks" in r.out and "[test] 12 images, 12 with masks" in r.out
    assert "pixels with more than one label: 0.0000%" in r.out
    assert "\nhead: sigmoid — labels never overlap, but" in r.out
    assert "data.classes: [background, fg]" in r.out  # how to make softmax fit


def test_the_config_inspect_prints_trains_as_the_hand_written_one(cli, tmp_path):
    """The config `segkit inspect` prints for the nuclei data, saved as a file, is a valid config that reads
    the masks as configs/nuclei-sigmoid.yaml does (binary, one foreground class, the sigmoid head): the same
    training targets for every image; the plan printed after it reads them alike."""
    from segkit.data.splits import pair_reader, split_samples

    r = cli("inspect", NUCLEI)
    text = r.out.split("config (save as a .yaml file", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0]
    (tmp_path / "planned.yaml").write_text(textwrap.dedent(text))
    planned = load_config(tmp_path / "planned.yaml")
    hand = load_config(Path(__file__).parents[1] / "configs" / "nuclei-sigmoid.yaml", [f"data.root={NUCLEI}"])
    assert (planned.data.mask, len(planned.data.classes), planned.head().name) == ("binary", 1, "sigmoid")
    for split in ("train", "test"):
        ours, theirs = split_samples(planned.data, split), split_samples(hand.data, split)
        assert [s.image for s in ours] == [s.image for s in theirs] and len(ours) in (48, 12)
        for a, b in zip(ours[:5], theirs[:5]):
            np.testing.assert_array_equal(pair_reader(planned.data).read(a).labels,
                                          pair_reader(hand.data).read(b).labels)
    assert "data.mask                    binary" in r.out and "model.head                   sigmoid" in r.out
    assert not (tmp_path / "run").exists()


def test_inspect_nuclei_numbers_match_the_masks():
    masks = sorted((NUCLEI / "train" / "masks").iterdir()) + sorted((NUCLEI / "test" / "masks").iterdir())
    fg = sum(int((_grey(m) > 127).sum()) for m in masks)
    total = sum(_grey(m).size for m in masks)
    report = inspect(NUCLEI)
    assert report.data.mask == "binary" and report.data.classes == ["fg"] and report.data.guessed
    assert [(s.name, s.images, s.labelled) for s in report.splits] == [("train", 48, 48), ("test", 12, 12)]
    assert report.class_pixels().tolist() == [fg]
    assert report.overlap_share == 0
    assert report.unlabeled_share == pytest.approx((total - fg) / total, rel=1e-12)
    assert report.advice()[0] == "sigmoid"
    d = report.to_dict()
    assert d["head"] == "sigmoid" and d["class_frequency"]["fg"] == pytest.approx(fg / total, rel=1e-12)


# -- nested hippocampus labels: overlapping -> sigmoid required -----------------------------------------


NESTED_CASES, EVERY = HIPPO_CASES[:2], 4
NESTED = ["hippocampus", "posterior"]  # every posterior pixel is also hippocampus: it carries two labels


@pytest.fixture(scope="module")
def nested(module_tmp) -> Path:
    """Real hippocampus slices with nested labels in the flat layout, images as JPEG (as ISIC ships them)."""
    return hippo_multilabel(module_tmp("nested"), cases=NESTED_CASES, every=EVERY, image_ext=".jpg")


def _volume_slices() -> list[np.ndarray]:
    return [labels for _, labels in hippo_slice_arrays(NESTED_CASES, EVERY).values()]


def test_inspect_nested_labels_report_the_overlap_and_require_sigmoid(nested):
    """The overlap is the posterior share, counted on the label volumes the masks were made from."""
    slices = _volume_slices()
    total = sum(s.size for s in slices)
    posterior = sum(int((s == 2).sum()) for s in slices)
    unlabelled = sum(int((s == 0).sum()) for s in slices)
    report = inspect(nested)
    assert report.data.mask == "multilabel" and report.data.classes == NESTED and report.data.guessed
    assert [(s.name, s.images, s.labelled, len(s.orphan_masks)) for s in report.splits] == [
        ("all", len(slices), len(slices), 0)]
    assert report.class_pixels().tolist() == [sum(int((s > 0).sum()) for s in slices), posterior]
    assert report.overlap_share == pytest.approx(posterior / total, rel=1e-12)
    assert report.unlabeled_share == pytest.approx(unlabelled / total, rel=1e-12)
    assert report.images.dtypes == {"uint8": len(slices)}  # the JPEG images are read, not only the masks
    head, why = report.advice()
    assert head == "sigmoid" and why.startswith(f"{posterior / total:.2%} of pixels carry more than one label")
    assert "sigmoid head is required" in why


def test_inspect_nested_labels_cli(nested, tmp_path):
    """The numbers of the text and of --json are those of the mask files, counted here."""
    both = total = 0
    for whole in sorted((nested / "masks" / "hippocampus").iterdir()):
        a, b = _grey(whole) > 127, _grey(nested / "masks" / "posterior" / whole.name) > 127
        both += int((a & b).sum())
        total += a.size
    assert_overlap_reported(nested, ["hippocampus", "posterior"], both / total, tmp_path)


def assert_overlap_reported(root: Path, classes: list[str], share: float, tmp_path: Path) -> None:
    """`segkit inspect ROOT --json` of overlapping labels: the classes, the overlap `share` counted by the
    caller (text and JSON), sigmoid required, and nothing written but the report."""
    r = run_cli("inspect", root, "--json", tmp_path / "report.json")
    assert r.code == 0, r.err
    assert f"multilabel masks, classes {classes}" in r.out
    assert f"pixels with more than one label: {share:.4%}" in r.out
    assert "head: sigmoid" in r.out and "sigmoid head is required" in r.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["head"] == "sigmoid" and report["overlap_share"] == pytest.approx(share, rel=1e-12)
    assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]


# -- hippocampus slices: exclusive classes with an ignore value -> softmax ------------------------------


VOID = 255  # the boundary ring, PASCAL VOC's ignore value


@pytest.fixture(scope="module")
def hippo(module_tmp) -> Path:
    """Real hippocampus slices, exclusive classes as index masks with a VOID ring on every boundary."""
    return hippo_slices(module_tmp("hippo"), "train", NESTED_CASES, every=EVERY, ignore=VOID)


@pytest.fixture(scope="module")
def hippo_config(module_tmp, hippo) -> Path:
    path = module_tmp("config") / "hippo.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(hippo), "classes": HIPPO_CLASSES, "mask": "index",
                                             "ignore_index": VOID}, "model": {"head": "softmax"}}))
    return path


def _hand_counts() -> tuple[list[int], int, int, list[str]]:
    """From the label volumes: per-class valid pixels, ring (ignored) pixels, all pixels, and the slices
    whose foreground lies entirely on the ring (empty once the ring is ignored)."""
    pixels, ring, total, empty = [0, 0, 0], 0, 0, []
    for stem, (_, labels) in hippo_slice_arrays(NESTED_CASES, EVERY).items():
        void = boundary_ring(labels)
        pixels = [n + int(((labels == c) & ~void).sum()) for c, n in enumerate(pixels)]
        ring += int(void.sum())
        total += labels.size
        if not ((labels > 0) & ~void).any():
            empty.append(f"{stem}.png")
    return pixels, ring, total, empty


def test_inspect_hippo_numbers_and_softmax(hippo, hippo_config):
    pixels, ring, total, empty = _hand_counts()
    report = inspect(hippo, DataGuess.from_config(load_config(hippo_config).data))
    assert report.data.classes == HIPPO_CLASSES and not report.data.guessed
    n = len(hippo_slice_arrays(NESTED_CASES, EVERY))
    assert [(s.name, s.images, s.labelled) for s in report.splits] == [("train", n, n)]
    assert report.class_pixels().tolist() == pixels
    split = report.splits[0]
    assert (split.valid, split.total) == (total - ring, total)  # the ring is ignored ...
    assert report.overlap_share == 0 and report.unlabeled_share == 0  # ... not unlabelled
    assert split.empty == empty  # the background class does not count as foreground
    head, why = report.advice()
    assert head == "softmax" and "softmax head fits" in why
    freq = report.to_dict()["class_frequency"]
    assert freq == {c: pytest.approx(k / (total - ring), rel=1e-12) for c, k in zip(HIPPO_CLASSES, pixels)}


def test_inspect_hippo_cli_with_config(cli, hippo, hippo_config, tmp_path):
    pixels, ring, total, empty = _hand_counts()
    before = _listing(hippo)
    r = cli("inspect", hippo, "--config", hippo_config, "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    assert "index masks" in r.out and "(from the config)" in r.out
    assert f"ignored pixels: {ring / total:.4%}" in r.out
    assert f"{'posterior':<10}  {pixels[2] / (total - ring):8.4%}  ({pixels[2]} px)" in r.out
    assert "head: softmax — every pixel has exactly one class" in r.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head"] == "softmax" and report["overlap_share"] == 0 and report["unlabeled_share"] == 0
    n = len(hippo_slice_arrays(NESTED_CASES, EVERY))
    assert report["splits"] == {"train": {"images": n, "labelled": n, "without_mask": 0, "orphan_masks": 0,
                                          "empty_masks": len(empty), "size_mismatch": 0, "unreadable": 0}}
    assert _listing(hippo) == before  # inspect writes nothing into the data


def test_inspect_hippo_without_the_ignore_value_is_caught(hippo):
    """Without data.ignore_index, 255 is out of range for 3 classes: each mask with a ring is reported
    unreadable, naming the file and the value."""
    report = inspect(hippo, DataGuess("index", HIPPO_CLASSES))
    unreadable = report.splits[0].unreadable
    # every slice has foreground, hence a ring: every mask is refused, and nothing is counted
    assert [Path(msg.split(": ")[0]).name for msg in unreadable] == sorted(
        p.name for p in (hippo / "train" / "masks").iterdir())
    assert all(f"values [{VOID}] are outside the 3 classes 0..2 and not the ignore index (None)" in msg
               for msg in unreadable)
    assert report.splits[0].pixels.tolist() == [0, 0, 0] and report.splits[0].labelled == len(unreadable)


# -- what inspect flags -----------------------------------------------------------------------------


def test_inspect_flags_missing_orphan_empty_mismatched_and_unreadable_masks(tmp_path):
    data = copy_nuclei(tmp_path / "data", 6)
    images = sorted((data / "train" / "images").iterdir())
    masks = sorted((data / "train" / "masks").iterdir())
    masks[0].unlink()                                                          # image without a mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks[0].with_name("orphan.png"))  # mask without image
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(masks[1])             # empty mask
    Image.open(masks[2]).resize((128, 128), Image.NEAREST).save(masks[2])      # another size
    masks[3].write_bytes(b"garbage")                                           # unreadable
    before = _listing(data)
    report = inspect(data, DataGuess("binary", ["nucleus"]))
    s = report.splits[0]
    assert (s.name, s.images, s.labelled) == ("train", 6, 5)
    assert s.without_mask == [images[0]] and s.orphan_masks == [masks[0].with_name("orphan.png")]
    assert s.empty == [images[1].name]
    assert s.size_mismatch == [f"{masks[2]} 128x128 vs image 256x256"]
    assert len(s.unreadable) == 1 and str(masks[3]) in s.unreadable[0]
    text = report.text()
    for line in ("images without a mask: 1", "masks without an image: 1", "empty masks (no foreground): 1",
                 "size mismatches: 1", "unreadable: 1"):
        assert line in text, line
    assert _listing(data) == before


def test_inspect_missing_folder_exits_2(cli, tmp_path):
    r = cli("inspect", tmp_path / "nothing")
    assert r.code == 2 and r.err.startswith("error:") and "data folder not found" in r.err
    assert "Traceback" not in r.err
