"""PNG, JPEG, BMP, GIF, WebP through Pillow. The header (size, mode, palette) is read when the
file is opened; these formats cannot be decoded by window, so the first read decodes the whole
image once (they are never the huge ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segkit.data.readers.base import Raster, Window, probe, system_error, undecodable
from segkit.errors import DataError

Image.MAX_IMAGE_PIXELS = None  # aerial images are legitimately large; memory is planned for

_CONVERT = {"CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB", "LAB": "RGB", "PA": "RGBA", "La": "LA", "RGBa": "RGBA",
            "RGBX": "RGB"}
_DTYPE = {"I": np.int32, "F": np.float32, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16,
          "I;16N": np.uint16}


class PillowRaster(Raster):
    """Grey, grey+alpha, RGB, RGBA, palette, 1-bit (read as 0/255), 16- and 32-bit grey, float."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with Image.open(path) as im:
            self.lossy = im.format in ("JPEG", "MPO") or (im.format == "WEBP" and not _webp_lossless(path))
            self.width, self.height = im.size
            mode = im.mode  # a palette's transparency is display alpha: palette images read as their colours
            self._mode = _CONVERT.get(mode, mode)
            self._deep = im.format == "PNG" and _png_deep_colour(path)
            if self._deep:  # Pillow reads 48/64-bit PNGs as 8-bit RGB(A): keep all 16 bits through OpenCV
                self._mode = "RGBA" if mode in ("RGBA", "LA") else "RGB"
            if self._mode == "P":
                self.palette = _palette(im)
        self.bands = Image.getmodebands(self._mode)
        self.dtype = np.dtype(np.uint16 if self._deep else _DTYPE.get(self._mode, np.uint8))
        self.alpha = (self.bands - 1,) if self._mode in ("RGBA", "LA") else ()
        self._pixels: np.ndarray | None = None

    def _decode(self) -> np.ndarray:
        if self._deep:
            import cv2

            arr = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
            if arr is None:  # OpenCV says nothing of why: a refused file, or a damaged one
                raise probe(self.path) or DataError(f"{self.path}: cannot decode this 16-bit PNG. "
                                                    "Fix: replace the file or remove it.")
            if arr.ndim != 3 or arr.shape[2] != self.bands:  # a damaged file decoded as something else
                raise DataError(f"{self.path}: decoded {arr.shape} where its header says {self.bands} bands. "
                                "Fix: replace the file (it may be damaged) or remove it.")
            order = [2, 1, 0, 3][:arr.shape[2]]  # OpenCV gives BGR(A)
            return np.ascontiguousarray(arr[:, :, order])
        try:
            with Image.open(self.path) as im:
                im.load()
                if im.mode != self._mode and not im.mode.startswith("I;16"):
                    im = im.convert(self._mode)
                arr = np.array(im)
        except OSError as err:
            if err.errno is not None:  # the system refused (permission, I/O error): not the file's content
                raise system_error(self.path, err) from None
            raise DataError(f"{self.path}: cannot decode this image ({err}). "
                            "Fix: replace the file (it may be truncated) or remove it.") from None
        except Exception as err:  # decoders raise anything on damaged data
            raise undecodable(self.path, err, "cannot decode this image") from None
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        arr = arr.astype(self.dtype, copy=False)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def _read(self, window: Window, bands: list[int]) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._decode()
        t, l, h, w = window
        return self._pixels[t:t + h, l:l + w][:, :, bands]


def _png_deep_colour(path: Path) -> bool:
    """A 16-bit colour PNG (IHDR bit depth 16, colour type RGB or RGBA), which Pillow would cut to 8 bits."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[24] == 16 and head[25] in (2, 6)


def _webp_lossless(path: Path) -> bool:
    """Whether a WebP file holds a lossless (VP8L) bitstream, directly or inside a VP8X container."""
    with open(path, "rb") as f:
        head = f.read(64)
    return head[12:16] == b"VP8L" or (head[12:16] == b"VP8X" and b"VP8L" in head[30:64])


def _palette(im: Image.Image) -> np.ndarray:
    colours = np.array(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return np.concatenate([colours, np.zeros((max(0, 256 - len(colours)), 3), np.uint8)])
