"""Input normalisation: one object, built from the config and the training data, stored in
model.json, applied by training, evaluation, prediction and `Segmenter` alike.

Values are in the file's own pixel units (no division by a type's range), so the same pixel
value is the same network input whatever the file type, in training and in prediction:

- `imagenet`: 8-bit RGB, the ImageNet mean/std x 255 (as pretrained encoders expect);
- `dataset`: per band, clip to the training split's 0.5/99.5 percentiles, then its mean/std
  (nnU-Net's CT scheme; the default for anything but 8-bit RGB);
- `per_image`: z-score per image and band (statistics over the whole image, not the window);
- `none`: raw values; `explicit`: the config's data.mean/data.std.
No-data pixels become 0 after normalisation (the mean), and are ignored by loss and scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from segkit.data.io import no_data
from segkit.data.readers import Window
from segkit.device import channel_constant
from segkit.errors import ConfigError, DataError, SegkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("imagenet", "dataset", "per_image", "none", "explicit")
PERCENTILES = (0.5, 99.5)
STATS_PIXELS = 1 << 20
"""Pixels per image read for statistics; larger images are sampled on a fixed grid of windows."""


@dataclass(frozen=True)
class Normalization:
    mode: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    only_dtype: str | None = None  # set for checkpoints whose inputs were scaled by their type's range

    def to_meta(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict) -> Normalization:
        """From model.json; checkpoints from before this object stored mean/std of [0, 1] inputs."""
        if "normalization" in meta:
            d = dict(meta["normalization"])
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
        legacy = cls.unit(meta["mean"], meta["std"])  # segkit 0.1 divided uint8 by 255: the same input as this
        return cls(legacy.mode, legacy.mean, legacy.std, only_dtype="uint8")  # but it divided uint16 by 65535

    @classmethod
    def unit(cls, mean: Sequence[float], std: Sequence[float]) -> Normalization:
        """Explicit mean/std given for 8-bit inputs scaled to [0, 1] (torchvision's convention)."""
        return cls("explicit", tuple(255 * m for m in mean), tuple(255 * s for s in std))

    @property
    def per_image(self) -> bool:
        return self.mode == "per_image"

    def describe(self) -> str:
        if self.mode == "per_image":
            return "per_image (z-score per image and band)"
        if self.mode == "none":
            return "none (raw values)"
        fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
        clip = f", clipped to {fmt(self.low)}..{fmt(self.high)}" if self.low is not None else ""
        return f"{self.mode}: mean {fmt(self.mean)}, std {fmt(self.std)}{clip}"

    def check_dtype(self, dtype: np.dtype, where: object, trained: Sequence[str] | None = None) -> None:
        """An image type the model was not trained on is refused: its values mean something else (a uint16
        image into a uint8 model gives inputs up to 257 times larger). `per_image` takes each image's own
        scale, so any type fits it. Checkpoints of segkit 0.1 scaled each type by its range."""
        if self.only_dtype is not None and np.dtype(dtype) != np.dtype(self.only_dtype):
            raise SegkitError(f"{where}: a {np.dtype(dtype)} image, but this checkpoint (segkit 0.1, no "
                              f"'normalization' in model.json) was trained on {self.only_dtype} inputs scaled by "
                              "their type's range, which segkit no longer does. Fix: retrain with this segkit "
                              "(data.normalize: dataset), or convert the images to 8 bits.")
        if trained and not self.per_image and np.dtype(dtype).name not in trained:
            raise DataError(f"{where}: a {np.dtype(dtype)} image, but the model was trained on {', '.join(trained)} "
                            f"images, and its input normalisation ({self.describe()}) is in their units. Fix: "
                            f"convert the image to {trained[0]} as the training images were made, or train with "
                            f"{np.dtype(dtype)} images (data.normalize: per_image takes any type).")

    def apply(self, x: torch.Tensor, image_stats: torch.Tensor | None = None,
              nodata: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) raw pixels (any numeric type) -> float32 network input.

        `image_stats` (N, 2, C) = per-image mean and std, required for `per_image` (see `image_stats`);
        `nodata` (N, 1, H, W) bool marks pixels that become 0.
        """
        x = x.to(torch.float32, copy=True)  # never change the caller's tensor (nan_to_num_ below)
        if self.mode == "none":
            out = x
        else:
            if self.per_image:
                if image_stats is None:
                    raise SegkitError("per_image normalisation needs the image's statistics (image_stats)")
                mean, std = image_stats[:, 0, :, None, None], image_stats[:, 1, :, None, None]
            else:
                mean, std = channel_constant(tuple(self.mean), x.device), channel_constant(tuple(self.std), x.device)
            if self.low is not None:
                x = torch.maximum(torch.minimum(x, channel_constant(tuple(self.high), x.device)),
                                  channel_constant(tuple(self.low), x.device))
            out = (x - mean) / std
        if nodata is not None:
            out = out.masked_fill(nodata, 0.0)
        return out.nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # no-data: NaN and ±inf are never measurements

    def check_channels(self, channels: int) -> None:
        for name in ("mean", "std", "low", "high"):
            value = getattr(self, name)
            if value is not None and len(value) != channels:
                raise ConfigError(f"data.{'mean' if name == 'mean' else 'std' if name == 'std' else 'normalize'}: "
                                  f"{len(value)} values for {channels} input channels. Fix: one value per channel.")


def valid_pixels(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """(n, C) float64 pixels of an (h, w, C) array that are not no-data (`segkit.data.io.no_data`)."""
    flat = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
    hit = no_data(arr, nodata)
    return flat if hit is None else flat[~hit.reshape(-1)]


def sample_windows(height: int, width: int, budget: int = STATS_PIXELS) -> list[Window]:
    """The whole image when it has at most `budget` pixels, else a fixed 8 x 8 grid of windows
    holding about `budget` pixels: deterministic, so training and prediction see the same sample."""
    if height * width <= budget:
        return [Window(0, 0, height, width)]
    side = max(1, int((budget / 64) ** 0.5))
    wh, ww = min(side, height), min(side, width)
    ys = np.linspace(0, height - wh, 8).round().astype(int)
    xs = np.linspace(0, width - ww, 8).round().astype(int)
    return [Window(int(y), int(x), wh, ww) for y in ys for x in xs]


def image_stats(read: Callable[[Window], np.ndarray], height: int, width: int, nodata: float | None
                ) -> np.ndarray:
    """(2, C) mean and std of one image's valid pixels (sampled for big images): per_image statistics."""
    pixels = np.concatenate([valid_pixels(read(w), nodata) for w in sample_windows(height, width)])
    if not len(pixels):
        return np.stack([np.zeros(pixels.shape[1]), np.ones(pixels.shape[1])]).astype(np.float32)
    std = pixels.std(0)
    return np.stack([pixels.mean(0), np.where(std > 0, std, 1.0)]).astype(np.float32)


def fit(mode: str, sources: Iterable[tuple[str, np.dtype, Callable[[], np.ndarray]]], channels: int,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None
        ) -> Normalization:
    """The normalisation a config asks for, with statistics from the training images where needed.

    `sources` yields (name, dtype, sample) per training image: `sample()` returns an (n, C) array
    of its valid pixels. `auto` is `imagenet` for 8-bit 3-channel images, `dataset` for the rest.
    """
    if mean is not None or std is not None:
        if mode not in ("auto", "explicit"):
            raise ConfigError(f"data.mean/data.std are set together with data.normalize: {mode}. "
                              "Fix: remove one of them (explicit mean/std imply data.normalize: explicit).")
        if mean is None or std is None:
            raise ConfigError("data.mean/data.std: give both. Fix: one value per channel for each.")
        norm = Normalization("explicit", tuple(mean), tuple(std))
        norm.check_channels(channels)
        return norm
    if mode == "explicit":
        raise ConfigError("data.normalize: explicit needs data.mean and data.std (pixel units, one per channel).")
    if mode in ("none", "per_image"):
        return Normalization(mode)
    sources = list(sources)
    not8 = next(((name, dt) for name, dt, _ in sources if np.dtype(dt) != np.uint8), None)
    if mode == "auto":
        mode = "imagenet" if channels == 3 and not8 is None else "dataset"
    if mode == "imagenet":
        if channels != 3 or not8 is not None:
            what = f"{not8[0]} is {np.dtype(not8[1])}" if not8 else f"data.channels is {channels}"
            raise ConfigError(f"data.normalize: imagenet is for 8-bit RGB images, but {what}. "
                              "Fix: data.normalize: dataset (statistics of your training images).")
        return Normalization("imagenet", tuple(255 * m for m in IMAGENET_MEAN),
                             tuple(255 * s for s in IMAGENET_STD))
    if mode != "dataset":
        raise ConfigError(f"data.normalize: '{mode}' is not a normalisation. Fix: one of auto, {', '.join(MODES)}.")
    samples = [s() for _, _, s in sources]
    pixels = np.concatenate([s for s in samples if len(s)]) if any(len(s) for s in samples) else None
    if pixels is None:
        raise ConfigError("data.normalize: dataset found no valid (non-nodata) pixel in the training images. "
                          "Fix: check data.nodata.")
    low, high = np.percentile(pixels, PERCENTILES, axis=0)
    clipped = np.clip(pixels, low, high)
    sd = clipped.std(0)
    return Normalization("dataset", tuple(clipped.mean(0).tolist()), tuple(np.where(sd > 0, sd, 1.0).tolist()),
                         tuple(low.tolist()), tuple(high.tolist()))


def pixel_sample(read: Callable[[Window], np.ndarray], height: int, width: int, nodata: float | None,
                 rng: np.random.Generator, pixels: int = 65536) -> np.ndarray:
    """Up to `pixels` random valid pixels of one image (read through `read`, which selects its bands)."""
    values = np.concatenate([valid_pixels(read(w), nodata) for w in sample_windows(height, width)])
    if len(values) > pixels:
        values = values[rng.choice(len(values), pixels, replace=False)]
    return values
