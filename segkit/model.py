"""Building the smp model, and checkpoints: a folder of model.safetensors + model.json.

Loading a checkpoint reads tensors and JSON only; it never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

import segkit
from segkit.data.io import write_bytes
from segkit.data.normalize import Normalization
from segkit.errors import ConfigError, SegkitError
from segkit.heads import Head, head_from_metadata

WEIGHTS = "model.safetensors"
META = "model.json"


def _looks_like_file(value: str) -> bool:
    return "/" in value or value.endswith((".pth", ".pt", ".safetensors", ".bin"))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict (safetensors, or a tensors-only .pth) into `model.encoder`."""
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: {path} not found. Fix: give an existing weights file or null.")
    try:
        state = _read_state(path)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ConfigError(f"model.encoder_weights: cannot read {path} ({err}).") from None
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if len(missing) == len(model.encoder.state_dict()):
        raise ConfigError(f"model.encoder_weights: {path} holds no weight of this encoder "
                          f"(e.g. unexpected key {next(iter(unexpected), '?')}). Fix: use weights of model.encoder.")


def build_model(arch: str, encoder: str, channels: int, in_channels: int = 3,
                encoder_weights: str | None = None) -> nn.Module:
    """Any smp architecture with `channels` raw-logit outputs (no activation in the model)."""
    hub = encoder_weights if encoder_weights and not _looks_like_file(encoder_weights) else None
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=hub, in_channels=in_channels,
                                 classes=channels, activation=None)
    except KeyError as err:
        key = "model.arch" if "architecture" in str(err).lower() else "model.encoder"
        raise ConfigError(f"{key}: {err.args[0] if err.args else err}") from None
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"model.encoder_weights: '{encoder_weights}' could not be loaded ({err}). "
                          "Fix: use null, or a local weights file path.") from None
    if encoder_weights and _looks_like_file(encoder_weights):
        load_encoder_weights(model, Path(encoder_weights))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def checkpoint_meta(head: Head, arch: str, encoder: str, in_channels: int, norm: Normalization,
                    **extra: Any) -> dict[str, Any]:
    """model.json: everything prediction needs; `extra` carries e.g. the training masks' encoding."""
    return {"segkit_version": segkit.__version__, "arch": arch, "encoder": encoder, "in_channels": in_channels,
            **head.metadata(), "normalization": norm.to_meta(), **extra}


def save_checkpoint(folder: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights, then metadata, each atomically (temp file + rename)."""
    save_state(folder, {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}, meta)


def save_state(folder: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """`save_checkpoint` for weights already copied to the CPU (written from a background thread)."""
    write_bytes(folder / WEIGHTS, save(weights))
    write_bytes(folder / META, json.dumps(meta, indent=2).encode())


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise SegkitError(f"{folder}: not a segkit checkpoint (needs {WEIGHTS} and {META}). "
                          "Fix: point at a run's best/ or last/ folder.")
    try:
        return json.loads((folder / META).read_text())
    except json.JSONDecodeError as err:
        raise SegkitError(f"{folder / META}: not valid JSON ({err}).") from None


def load_checkpoint(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Head, dict[str, Any]]:
    """Model (eval mode, on `device`), its head and metadata; needs nothing but the folder."""
    folder = Path(folder)
    meta = read_meta(folder)
    head = head_from_metadata(meta)
    model = build_model(meta["arch"], meta["encoder"], head.channels, meta["in_channels"])
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (SafetensorError, RuntimeError) as err:
        raise SegkitError(f"{folder / WEIGHTS}: weights do not fit {meta['arch']}/{meta['encoder']} ({err}).") from None
    return model.to(device).eval(), head, meta
