"""Checkpoints run by hand, without segkit's code path: an smp model with the safetensors weights,
model.json's normalisation applied with numpy. Tests compare segkit's outputs with these."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file


@functools.cache
def unet(arch: str, encoder: str, in_channels: int, classes: int) -> torch.nn.Module:
    """An smp model of that shape, built once: every user loads a whole state dict into it first."""
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                            classes=classes)


def hand_model(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A checkpoint's model and model.json, loaded without segkit: smp model, safetensors weights."""
    meta = json.loads((folder / "model.json").read_text())
    model = unet(meta["arch"], meta["encoder"], meta["in_channels"], len(meta["classes"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), meta


def model_logits(folder: Path, image: np.ndarray, flips: tuple[tuple[int, ...], ...] = ((),)) -> np.ndarray:
    """(C, H, W) float64 logits of a checkpoint, averaged over `flips` of the input (each flipped
    back), computed without segkit: model.json's normalisation applied with numpy. H and W are
    multiples of 32, so no padding is involved."""
    model, meta = hand_model(folder)
    norm = meta["normalization"]
    x = (image.astype(np.float64) - np.array(norm["mean"])) / np.array(norm["std"])
    x = torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None]
    with torch.no_grad():
        out = model(torch.cat([x.flip(dims) if dims else x for dims in flips]))  # one batch of the flips
    back = [o.flip(dims) if dims else o for o, dims in zip(out, flips)]  # (C, H, W) each: -1, -2 are W, H
    return torch.stack(back).double().mean(0).numpy()


def batch_logits(folder: Path, images: list[np.ndarray]) -> np.ndarray:
    """(N, C, H, W) float64 logits of a checkpoint for same-size images (multiples of 32), in one
    batch, computed without segkit (see `model_logits`)."""
    model, meta = hand_model(folder)
    norm = meta["normalization"]
    x = (np.stack(images).astype(np.float64) - np.array(norm["mean"])) / np.array(norm["std"])
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).double().numpy()


def padded_logits(folder: Path, image: np.ndarray) -> np.ndarray:
    """(C, H, W) float64 logits of a checkpoint for an (H, W, C) image of any size: normalised with numpy,
    centred to multiples of 32 (an axis at least as long as model.json's training `crop` continued by its
    mirror, a shorter one in zeros as training pads a crop), run, cropped back."""
    model, meta = hand_model(folder)
    norm = meta["normalization"]
    x = (image.astype(np.float64) - np.array(norm["mean"])) / np.array(norm["std"])
    offsets = []
    for axis, n in enumerate(image.shape[:2]):
        before = -n % 32 // 2
        pads = [(0, 0)] * 3
        pads[axis] = (before, -n % 32 - before)
        x = np.pad(x, pads, mode="reflect" if meta.get("crop") is not None and n >= meta["crop"] else "constant")
        offsets.append(before)
    (top, left), (h, w) = offsets, image.shape[:2]
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None])[0]
    return out.double().numpy()[:, top:top + h, left:left + w]
