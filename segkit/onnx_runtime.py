"""Running an exported .onnx file as a segkit model: an onnxruntime session behind the `nn.Module`
interface that `Segmenter` drives (`OnnxModel`), and the model.json the file carries. Export itself
(and the parity check against PyTorch) is `segkit.export`; this module needs neither.

onnxruntime is optional: `pip install 'segkit[export]'`.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segkit.errors import SegkitError
from segkit.heads import Head, head_from_metadata
from segkit.padding import to_stride

log = logging.getLogger("segkit")

META_KEY = "segkit"
"""metadata_props key holding the checkpoint's model.json, verbatim."""
EXPORT_KEY = "segkit_export"
"""metadata_props key describing the export itself (opset, axes, input/output names, versions)."""

def require(module: str) -> Any:
    """`module` imported, or a SegkitError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegkitError(f"ONNX export and ONNX models need onnx and onnxruntime ({module} is not installed). "
                          "Fix: pip install 'segkit[export]'") from None


_told_no_cuda: list[bool] = []


def _use_cuda(device: torch.device) -> bool:
    """Whether onnxruntime runs on the GPU for `device`: cuda asked for and its provider present."""
    ort = require("onnxruntime")
    if device.type != "cuda":
        return False
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return True
    if not _told_no_cuda:
        log.warning("onnxruntime has no CUDA provider here (it needs the onnxruntime-gpu package); "
                    "the ONNX model runs on the CPU")
        _told_no_cuda.append(True)
    return False


def open_session(path: Path, device: torch.device) -> Any:
    """An onnxruntime session: CUDA provider (on the device's GPU) when `_use_cuda`, else CPU with
    as many threads as PyTorch uses."""
    ort = require("onnxruntime")
    if not path.is_file():
        raise SegkitError(f"{path}: ONNX file not found.")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: node placement notices are not the user's concern
    if _use_cuda(device):
        providers: list = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise SegkitError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err}).") from None


def onnx_meta(session: Any, path: Path) -> dict[str, Any]:
    """The model.json an exported file carries."""
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise SegkitError(f"{path}: an ONNX file without segkit metadata; segkit cannot know its head, classes "
                          "or normalisation. Fix: export it with `segkit export CHECKPOINT model.onnx`.")
    try:
        return json.loads(props[META_KEY])
    except json.JSONDecodeError as err:
        raise SegkitError(f"{path}: its segkit metadata is not valid JSON ({err}).") from None


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """model.json of an exported file (reads it with onnxruntime on the CPU)."""
    return onnx_meta(open_session(Path(path), torch.device("cpu")), Path(path))


class OnnxModel(nn.Module):
    """An onnxruntime session that `Segmenter` uses like the PyTorch model: `model(x)` takes a
    float32 (N, C, H, W) tensor and gives the logits as a tensor on x's device.

    The CUDA provider runs when the device is cuda and onnxruntime has it (onnxruntime-gpu),
    else the CPU one. A file exported with a fixed input shape takes any batch (run in chunks
    of its batch) and any size up to its own (`input_size`: padded to it as the checkpoint pads, cropped back)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        self.device = torch.device(device)
        self._sessions: dict[str, Any] = {}
        session = self.session(self.device)
        self.meta = onnx_meta(session, self.path)
        inp = session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, session.get_outputs()[0].name
        self.fixed = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]

    def session(self, device: torch.device) -> Any:
        """The session for `device`, made once: one per GPU, one for the CPU (also used for a GPU
        when onnxruntime has no CUDA provider)."""
        key = f"cuda:{device.index or 0}" if _use_cuda(device) else "cpu"
        if key not in self._sessions:
            self._sessions[key] = open_session(self.path, device)
        return self._sessions[key]

    @property
    def providers(self) -> list[str]:
        return self.session(self.device).get_providers()

    def to(self, *args: Any, **kwargs: Any) -> OnnxModel:
        """Records the device (which provider runs); dtype and memory format do not apply."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self.device = torch.device(device)
        return self

    def _run(self, session: Any, batch: np.ndarray) -> np.ndarray:
        size = self.fixed[0]
        if size is None or len(batch) == size:
            return session.run([self.output_name], {self.input_name: batch})[0]
        outs = []
        for i in range(0, len(batch), size):
            chunk = batch[i:i + size]
            short = size - len(chunk)
            if short:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
            outs.append(session.run([self.output_name], {self.input_name: chunk})[0][:size - short])
        return np.concatenate(outs)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) an h x w input is padded to (`infer.forward_padded`): the exported fixed size,
        or multiples of the stride along a dynamic axis."""
        fh, fw = self.fixed[2] or to_stride(h), self.fixed[3] or to_stride(w)
        if h > fh or w > fw:
            raise SegkitError(f"{self.path}: exported with a fixed input of {fh}x{fw} pixels; got {h}x{w}. "
                              f"Fix: predict with --tile {min(fh, fw)} (Segmenter(tile={min(fh, fw)})), "
                              "or export with --dynamic.")
        return fh, fw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input already at `input_size`."""
        c = x.shape[1]
        if self.fixed[1] is not None and c != self.fixed[1]:
            raise SegkitError(f"{self.path}: takes {self.fixed[1]} input channels, got {c}.")
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self._run(self.session(x.device), batch)).to(x.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, device={self.device}"


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> tuple[OnnxModel, Head, dict[str, Any]]:
    """What `load_checkpoint` gives for a checkpoint folder, from an exported .onnx file."""
    model = OnnxModel(path, device)
    return model, head_from_metadata(model.meta), model.meta
