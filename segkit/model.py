"""Building the smp model, and checkpoints: a folder of model.safetensors + model.json.

Loading a checkpoint reads tensors and JSON only; it never unpickles anything. A training run's
checkpoint folders are written as units (`write_unit`): a kill at any moment leaves the old folder
or the new one, never a mix of the two.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import uuid
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

log = logging.getLogger("segkit")

WEIGHTS = "model.safetensors"
META = "model.json"
META_KEYS = ("arch", "encoder", "in_channels", "head", "classes")
"""What every model.json holds; a file without them is refused before it is used."""


def _looks_like_file(value: str) -> bool:
    return "/" in value or value.endswith((".pth", ".pt", ".safetensors", ".bin"))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


ALLOWED_EXTRA = ("fc.", "classifier.", "last_linear.", "head.")
"""Classifier layers of ImageNet checkpoints (torchvision/timm `fc.`, `classifier.`, `head.`, Cadene's
`last_linear.`): a segmentation encoder has none, so they are left out of its weights (logged)."""


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB first-convolution weight (O, 3, k, k) for `channels` inputs, as smp adapts its own
    pretrained weights: summed over RGB for 1 band, else RGB repeated cyclically and scaled by 3/channels."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    index = torch.arange(channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / channels)


def load_encoder_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load a local encoder state dict (safetensors, or a tensors-only .pth) into `model.encoder`.

    Every encoder tensor must come from the file, with its shape, and every tensor of the file must
    be the encoder's: partly matching weights would train from a silently half-random encoder.
    Allowed, and logged: an ImageNet classifier (ALLOWED_EXTRA), BatchNorm counters missing from old
    checkpoints, the decoder of a full smp/segkit model (its `encoder.` tensors are used), and an RGB
    first convolution when the model takes another number of channels (adapted as smp does).
    `strict` False (model.encoder_weights_strict: false) loads the tensors that fit and logs the rest.
    """
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: {path} not found. Fix: give an existing weights file or null.")
    try:
        state = _read_state(path)
    except Exception as err:  # torch/safetensors raise many types on a damaged or crafted file; none runs code
        raise ConfigError(f"model.encoder_weights: cannot read {path}: not a safetensors file or a tensors-only "
                          f"PyTorch file, or damaged ({type(err).__name__}; nothing in it was run). "
                          "Fix: give a .safetensors file, or a .pth holding tensors only.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # timm / DeiT-style training checkpoints
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ConfigError(f"model.encoder_weights: {path} holds no named tensors. "
                          "Fix: give an encoder state dict (.safetensors, or a .pth of tensors).")
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP-wrapped model
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    notes = []
    if any(k.startswith("encoder.") for k in tensors):  # a whole smp/segkit model: its encoder part
        rest = len([k for k in tensors if not k.startswith("encoder.")])
        tensors = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        if rest:
            notes.append(f"{rest} decoder/head tensors of a whole model not used")
    own = model.encoder.state_dict()
    missing = [k for k in own if k not in tensors]
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in counters]
    extra = [k for k in tensors if k not in own]
    classifier = [k for k in extra if k.startswith(ALLOWED_EXTRA)]
    extra = [k for k in extra if k not in classifier]
    first = next((k for k, v in own.items() if v.ndim == 4), None)
    wrong = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if first in wrong and tensors[first].ndim == 4 and tensors[first].shape[0] == own[first].shape[0] \
            and tensors[first].shape[2:] == own[first].shape[2:]:
        notes.append(f"first convolution {first} adapted from {tensors[first].shape[1]} to "
                     f"{own[first].shape[1]} input channels")
        tensors[first] = _first_conv(tensors[first], own[first].shape[1])
        wrong.remove(first)
    if (missing or extra or wrong) and not strict:
        log.warning("model.encoder_weights_strict: false: %s: %d encoder tensor(s) missing from the file (e.g. %s), "
                    "%d not in the encoder (e.g. %s), %d of another shape (e.g. %s) left at their random start",
                    path, len(missing), _examples(missing), len(extra), _examples(extra), len(wrong),
                    _examples(wrong))
        tensors = {k: v for k, v in tensors.items() if k not in wrong}
    elif missing or extra or wrong:
        shapes = ", ".join(f"{k} {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the encoder"
                           for k in wrong[:3])
        parts = [f"{len(missing)} tensor(s) of the encoder are missing from the file (e.g. {_examples(missing)})"
                 if missing else "",
                 f"{len(extra)} tensor(s) of the file are not in the encoder (e.g. {_examples(extra)})"
                 if extra else "",
                 f"{len(wrong)} tensor(s) have another shape (e.g. {shapes})" if wrong else ""]
        raise ConfigError(f"model.encoder_weights: {path} does not fit the encoder of this model: "
                          + "; ".join(p for p in parts if p) + ". Fix: use weights saved from the encoder that "
                          "model.encoder names (same architecture and size), or set model.encoder to the one "
                          "these weights belong to (model.encoder_weights_strict: false loads what fits).")
    if classifier:
        notes.append(f"{len(classifier)} classifier tensor(s) left out ({_examples(classifier)})")
    if counters:
        notes.append(f"{len(counters)} BatchNorm counter(s) not in the file (they are not weights)")
    model.encoder.load_state_dict({**own, **{k: v for k, v in tensors.items() if k in own}}, strict=True)
    log.info("model.encoder_weights: %d tensors loaded from %s%s", len(own) - len(counters), path,
             "".join(f"; {n}" for n in notes))


def build_model(arch: str, encoder: str, channels: int, in_channels: int = 3,
                encoder_weights: str | None = None, strict: bool = True) -> nn.Module:
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
        load_encoder_weights(model, Path(encoder_weights), strict)
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
    """`save_checkpoint` for weights already copied to the CPU."""
    for name, data in checkpoint_files(weights, meta).items():
        write_bytes(folder / name, data)


def checkpoint_files(weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of a checkpoint folder's two files, for `write_unit`."""
    return {WEIGHTS: save(weights), META: json.dumps(meta, indent=2).encode()}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot, so the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


def write_unit(folder: Path, files: dict[str, bytes]) -> None:
    """Replace `folder` by one holding exactly `files`, as a unit: the files are written (and synced)
    into a new folder beside it, which then takes its place by an atomic exchange. Where the system
    has no exchange, the old folder is first renamed to `.NAME.old`, and `recover_unit` puts it back
    if a kill falls between the two renames."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = folder.parent / f".{folder.name}.new-{uuid.uuid4().hex[:12]}"
    new.mkdir()
    try:
        for name, data in files.items():
            with open(new / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if not folder.exists():
            os.rename(new, folder)
        elif _exchange(new, folder):
            shutil.rmtree(new)  # now the old content
        else:
            os.rename(folder, _old(folder))
            os.rename(new, folder)
            shutil.rmtree(_old(folder))
    finally:
        shutil.rmtree(new, ignore_errors=True)


def recover_unit(folder: Path) -> None:
    """Undo a `write_unit` that a kill interrupted: the old folder comes back if the new one never took
    its place; leftover new or old folders are removed. Call only while no writer runs (the run lock)."""
    if not folder.exists() and _old(folder).is_dir():
        os.rename(_old(folder), folder)
    shutil.rmtree(_old(folder), ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, unreadable, truncated or foreign file is a SegkitError naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SegkitError(f"{path}: missing. Fix: point at a complete checkpoint folder.") from None
    except PermissionError:
        raise SegkitError(f"{path}: permission denied. Fix: make the file readable for this user.") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise SegkitError(f"{path}: not a segkit checkpoint, or damaged ({err}). "
                          "Fix: use an intact copy of the checkpoint folder.") from None


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise SegkitError(f"{folder}: not a segkit checkpoint (needs {WEIGHTS} and {META}). "
                          "Fix: point at a run's best/ or last/ folder.")
    try:
        meta = json.loads((folder / META).read_bytes())
    except PermissionError:
        raise SegkitError(f"{folder / META}: permission denied. Fix: make the file readable for this user.") from None
    except ValueError as err:  # not JSON, or not UTF-8 text
        raise SegkitError(f"{folder / META}: not valid JSON ({err}). "
                          "Fix: use an intact copy of the checkpoint folder.") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise SegkitError(f"{folder / META}: not a segkit checkpoint, or damaged (no {', '.join(missing)}). "
                          "Fix: use an intact copy of the checkpoint folder.")
    return meta


def load_checkpoint(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Head, dict[str, Any]]:
    """Model (eval mode, on `device`), its head and metadata; needs nothing but the folder."""
    folder = Path(folder)
    meta = read_meta(folder)
    head = head_from_metadata(meta)
    model = build_model(meta["arch"], meta["encoder"], head.channels, meta["in_channels"])
    weights = load_weights(folder / WEIGHTS)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise SegkitError(f"{folder / WEIGHTS}: weights do not fit {meta['arch']}/{meta['encoder']} ({err}).") from None
    return model.to(device).eval(), head, meta
