"""ONNX export: a checkpoint becomes one .onnx file that carries its model.json, so a pipeline can
run segkit masks with onnxruntime alone (no training code, no torch model code, no weights folder).

- `export_onnx(checkpoint, "model.onnx")` writes the network (raw logits, NCHW float32; dynamic
  batch/height/width by default) with the whole model.json in the file's metadata
  (`metadata_props["segkit"]`), plus the head, classes, thresholds and normalisation as keys of
  their own for readers without segkit.
- `Segmenter.load("model.onnx")` rebuilds the head, normalisation, bands and no-data from that
  metadata and runs the network through `segkit.onnx_runtime.OnnxModel`, so pre- and post-processing
  (padding, tiling, TTA, decoding, output files) are exactly those of a checkpoint.
- `parity(checkpoint, onnx_path, images)` compares the two on real images (whole and tiled).

onnx and onnxruntime are optional: `pip install 'segkit[export]'`.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segkit
from segkit.data.io import atomic_path
from segkit.data.normalize import Normalization
from segkit.data.volume_spec import input_normalization
from segkit.errors import SegkitError
from segkit.heads import Head
from segkit.infer import Segmenter, list_images
from segkit.onnx_runtime import EXPORT_KEY, META_KEY, OnnxModel, require
from segkit.padding import STRIDE

log = logging.getLogger("segkit")

INPUT, OUTPUT = "input", "logits"
STATIC_SIZE = 512
CHECK_LIMIT = 8
"""Images a parity check uses at most (chosen to cover as many sizes as possible)."""
CHECK_CROP = 512
"""Check images larger than this are cropped (top-left) to it: the whole-image pass runs in one piece."""
NUCLEI_TEST = Path(segkit.__file__).resolve().parents[1] / "data" / "nuclei" / "test" / "images"


# -- export ------------------------------------------------------------------------------


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c
        return c.ONNX_MIN_OPSET, getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 9, 17


def export_onnx(checkpoint: str | Path, path: str | Path, opset: int = 17, dynamic: bool = True,
                size: int = STATIC_SIZE) -> Path:
    """Write `checkpoint` (a folder of model.safetensors + model.json) as an ONNX file at `path`,
    atomically (temp file + rename). Input "input" (N, C, H, W) float32, already normalised;
    output "logits" (N, classes, H, W). `dynamic`: batch, height and width are free (multiples of
    32 for the U-Net; segkit pads to them); else the input is fixed at (1, C, size, size)."""
    from segkit.model import load_checkpoint

    onnx = require("onnx")
    checkpoint, path = Path(checkpoint), Path(path)
    if path.suffix != ".onnx":
        raise SegkitError(f"{path}: an ONNX export must end in .onnx (that is how Segmenter.load and "
                          "segkit predict recognise it). Fix: e.g. model.onnx.")
    low, high = _opset_range()
    if not low <= opset <= high:
        raise SegkitError(f"--opset {opset}: the exporter writes opsets {low} to {high}. Fix: e.g. --opset 17.")
    if not dynamic and (size < 32 or size % 32):
        raise SegkitError(f"--size {size}: a static input size must be a positive multiple of 32. Fix: e.g. 512.")
    model, head, meta = load_checkpoint(checkpoint, "cpu")
    channels = int(meta["in_channels"])
    example = torch.zeros(1, channels, *((256, 256) if dynamic else (size, size)))
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    options: dict[str, Any] = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset,
                               "do_constant_folding": True, "dynamic_axes": axes if dynamic else None}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, dynamic axes are plain
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
                torch.onnx.export(model, (example,), str(tmp), **options)
        except Exception as err:  # the exporter raises many types; name the model and the cause
            raise SegkitError(f"{checkpoint}: ONNX export of {meta['arch']}/{meta['encoder']} at opset {opset} "
                              f"failed ({type(err).__name__}: {err}). Fix: try another --opset.") from None
        proto = onnx.load(str(tmp))
        info = {"opset": opset, "dynamic": dynamic, "input": INPUT, "output": OUTPUT,
                "input_shape": ["batch", channels, "height", "width"] if dynamic else [1, channels, size, size],
                "segkit_version": segkit.__version__, "torch_version": torch.__version__}
        props = {META_KEY: json.dumps(meta), EXPORT_KEY: json.dumps(info), "head": head.name,
                 "classes": json.dumps(head.classes), "thresholds": json.dumps(head.thresholds),
                 "normalization": json.dumps(input_normalization(meta)),
                 "in_channels": str(channels)}
        del proto.metadata_props[:]
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = (f"segkit {meta['arch']}/{meta['encoder']} ({head.name} head, classes {head.classes}): "
                            f"raw logits; metadata '{META_KEY}' holds model.json")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


# -- loading -----------------------------------------------------------------------------


# -- parity ------------------------------------------------------------------------------


def _fit(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """`image` cropped and/or mirrored out (symmetric) to h x w."""
    image = image[:h, :w]
    ph, pw = h - image.shape[0], w - image.shape[1]
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2), mode="symmetric")
    return image


def _mosaic(images: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """2 x 2 images (repeated when fewer), each fitted to h x w: a (2h, 2w) image to predict in windows."""
    cells = [_fit(images[i % len(images)], h, w) for i in range(4)]
    return np.concatenate([np.concatenate(cells[:2], axis=1), np.concatenate(cells[2:], axis=1)], axis=0)


def _same_masks(head: Head, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(pixels whose decoded masks are identical, pixels) for logits (N, C, H, W)."""
    ma, mb = head.decode(a), head.decode(b)
    same = ma == mb
    if same.dim() == 4:  # sigmoid: a pixel agrees when every class agrees
        same = same.all(dim=1)
    return int(same.sum()), same.numel()


def _read(seg, path: str | Path) -> np.ndarray:
    with seg.open(path) as src:
        return src.read()


LOGIT_REL = 5e-5
"""Largest |onnxruntime - PyTorch| logit difference, relative to the largest |logit| (at least 1), that float32
sums taken in another order explain (seen: ~1e-5). Beyond it the file does not compute what the checkpoint
does; within it a pixel decided differently is a tie (its decision was within that difference of flipping)."""


def parity(checkpoint: str | Path, onnx_path: str | Path, images: Sequence[np.ndarray | str | Path],
           batch_size: int = 4) -> dict[str, Any]:
    """Max |logit difference| and mask agreement of the ONNX Segmenter against the PyTorch one, both
    on the CPU in float32, on `images` (arrays of the model's bands, or files): whole images
    (same-size images batched, up to `batch_size`) and one 2 x 2 mosaic of them predicted in
    blended windows. Each side reads and normalises the images itself (from its own metadata). `agrees`:
    every logit within LOGIT_REL of the largest (so pixels decided differently are ties)."""
    torch_seg = Segmenter.load(checkpoint, device="cpu", amp=False, batch_size=batch_size)
    onnx_seg = Segmenter.load(onnx_path, device="cpu", amp=False, batch_size=batch_size)
    arrays = [_read(torch_seg, i) if isinstance(i, (str, Path)) else np.asarray(i) for i in images]
    if not arrays:
        raise SegkitError("parity: no images to compare on.")
    model = onnx_seg.model
    fixed = model.fixed[2:] if isinstance(model, OnnxModel) else [None, None]
    if fixed[0] or fixed[1]:  # a static export: every input at exactly its size, windows of its size
        fh, fw = fixed[0] or fixed[1], fixed[1] or fixed[0]
        arrays = [_fit(a, fh, fw) for a in arrays]
        mosaic = _mosaic(arrays, (fh * 3 // 4 + 1), (fw * 3 // 4 + 1))
        tile = min(fh, fw)
    else:
        common = min(a.shape[0] for a in arrays[:4]), min(a.shape[1] for a in arrays[:4])
        mosaic = _mosaic(arrays[:4], *common)
        tile = max(STRIDE, min(common) // STRIDE * STRIDE)
    overlap = tile // 4
    for seg in (torch_seg, onnx_seg):
        seg.tile, seg.overlap = tile, overlap

    parts = []

    def compare(name: str, run) -> None:
        a, b = run(torch_seg), run(onnx_seg)
        same, pixels = _same_masks(torch_seg.head, a, b)
        parts.append({"name": name, "shape": list(a.shape), "max_abs_logit_diff": float((a - b).abs().max()),
                      "max_abs_logit": float(a.abs().max()), "pixels": pixels, "pixels_differing": pixels - same,
                      "mask_agreement": same / pixels})

    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for a in arrays:
        groups.setdefault(a.shape, []).append(a)
    for shape, group in groups.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            compare(f"whole {len(batch)} x {shape[0]}x{shape[1]}", lambda s, b=batch: s.forward(s.to_input(b)))
    compare(f"tiled {mosaic.shape[0]}x{mosaic.shape[1]} (tile {tile}, overlap {overlap})",
            lambda s: s.logits(mosaic)[None])
    pixels = sum(p["pixels"] for p in parts)
    differing = sum(p["pixels_differing"] for p in parts)
    largest, diff = max(p["max_abs_logit"] for p in parts), max(p["max_abs_logit_diff"] for p in parts)
    return {"images": len(arrays), "parts": parts, "pixels": pixels, "pixels_differing": differing,
            "max_abs_logit_diff": diff, "max_abs_logit": largest, "tolerance": LOGIT_REL * max(1.0, largest),
            "agrees": diff <= LOGIT_REL * max(1.0, largest), "mask_agreement": (pixels - differing) / pixels,
            "providers": onnx_seg.model.providers}


def _select(files: Sequence[Path], limit: int) -> list[Path]:
    """Up to `limit` files covering as many image sizes as possible (round-robin over sizes)."""
    from segkit.data.io import image_size

    by_size: dict[tuple[int, int], list[Path]] = {}
    for f in files:
        by_size.setdefault(image_size(f), []).append(f)
    chosen: list[Path] = []
    queues = [list(v) for v in by_size.values()]
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0))
    return chosen


def _synthetic(meta: dict[str, Any], seed: int = 0) -> list[np.ndarray]:
    """Smooth random float32 images of the model's bands, in its normalisation's range:
    three 256x256 and one 320x192."""
    import cv2

    channels = int(meta["in_channels"])
    norm = Normalization.from_meta(meta)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((256, 256), (256, 256), (256, 256), (320, 192)):
        field = np.stack([cv2.resize(rng.random((h // 16, w // 16), dtype=np.float32), (w, h),
                                     interpolation=cv2.INTER_CUBIC) for _ in range(channels)], axis=-1)
        if norm.low is not None:
            image = np.asarray(norm.low) + field * (np.asarray(norm.high) - np.asarray(norm.low))
        elif norm.mean is not None:
            image = np.asarray(norm.mean) + (field - 0.5) * 4 * np.asarray(norm.std)
        else:
            image = field * 255
        out.append(image.astype(np.float32))
    return out


def check_images(meta: dict[str, Any], folder: str | Path | None = None,
                 limit: int = CHECK_LIMIT) -> tuple[list[np.ndarray], str]:
    """Images for a parity check and a sentence saying what they are: up to `limit` files of
    `folder` (sizes mixed; larger than CHECK_CROP cropped to it), else the embedded nuclei test
    images for a 3-channel model, else synthetic arrays of the model's band count."""
    from segkit.data.source import ImageSource

    channels = int(meta["in_channels"])
    data = meta.get("data") or {}
    if folder is None and channels == 3 and NUCLEI_TEST.is_dir():
        folder, what = NUCLEI_TEST, "embedded nuclei test images"
    elif folder is None:
        return _synthetic(meta), (f"4 synthetic images ({channels} bands, smooth random fields in the model's "
                                  "normalisation range; give real ones with --check-images FOLDER)")
    else:
        folder, what = Path(folder), "images"
        if not folder.is_dir():
            raise SegkitError(f"--check-images {folder}: folder not found.")
    files = list_images(Path(folder))
    if not files:
        raise SegkitError(f"--check-images {folder}: no images found.")
    chosen = _select(files, limit)
    images, cropped = [], 0
    for f in chosen:
        with ImageSource.open(f, channels, data.get("bands"), data.get("nodata")) as src:
            pixels = src.read()
        cropped += max(pixels.shape[:2]) > CHECK_CROP
        images.append(np.ascontiguousarray(pixels[:CHECK_CROP, :CHECK_CROP]))
    sizes = Counter(f"{a.shape[0]}x{a.shape[1]}" for a in images)
    note = f"; {cropped} cropped to {CHECK_CROP} px" if cropped else ""
    return images, (f"{len(images)} of {len(files)} {what} in {folder} "
                    f"({', '.join(f'{n} x {s}' for s, n in sizes.items())}{note})")
