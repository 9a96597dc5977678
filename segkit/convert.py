"""Exact head conversion: a 2-class softmax checkpoint becomes the equivalent 1-channel sigmoid one.

softmax([a, b])_1 = sigmoid(b - a), and the last layer is linear, so replacing its two
output filters by their difference (w1 - w0, b1 - b0) gives logits b - a directly.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save

from segkit.data.io import write_bytes
from segkit.data.volume_spec import VolumeSpec
from segkit.errors import SegkitError
from segkit.heads import head_from_metadata
from segkit.model import META, WEIGHTS, read_meta

LAST_LAYER = "segmentation_head.0"


def softmax_to_sigmoid(src: str | Path, dst: str | Path) -> Path:
    """Write the sigmoid twin of the 2-class softmax checkpoint `src` into the new folder `dst`."""
    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    sigmoid = head_from_metadata(meta).sigmoid_equivalent()
    if dst.exists() and any(dst.iterdir()):
        raise SegkitError(f"{dst}: exists and is not empty. Fix: choose a new output folder.")
    state = load_file(str(src / WEIGHTS))
    w, b = state.get(f"{LAST_LAYER}.weight"), state.get(f"{LAST_LAYER}.bias")
    if w is None or w.shape[0] != 2:
        raise SegkitError(f"{src}: no 2-filter last layer '{LAST_LAYER}' in the weights.")
    state[f"{LAST_LAYER}.weight"] = (w[1:2].double() - w[0:1].double()).to(w.dtype)
    if b is not None:
        state[f"{LAST_LAYER}.bias"] = (b[1:2].double() - b[0:1].double()).to(b.dtype)
    new_meta = {**meta, **sigmoid.metadata(), "converted_from": str(src)}
    data = dict(meta.get("data") or {})
    if data.get("mask") == "index":
        data["mask"] = "binary"  # index 0/1 masks read as binary give the one foreground class
    volume = VolumeSpec.from_meta(meta)
    if volume is not None:
        data["volume"] = volume.for_classes(sigmoid.classes).to_meta()
    new_meta["data"] = data or None
    write_bytes(dst / WEIGHTS, save({k: v.contiguous() for k, v in state.items()}))
    write_bytes(dst / META, json.dumps(new_meta, indent=2).encode())
    return dst
