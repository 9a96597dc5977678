"""Input normalisation of images and volumes: one definition per scheme, fitted on the training data, stored
in model.json, applied by training, evaluation, prediction and `Segmenter` alike.

Values are in the file's own pixel units (no division by a type's range), so the same pixel
value is the same network input whatever the file type, in training and in prediction.

One object, `Normalization`, stored in model.json as `normalization` and applied on the device to raw pixels
(`Normalization.apply`), in training, validation, evaluation and prediction alike. Its modes:
- `imagenet`: 8-bit RGB, the ImageNet mean/std x 255 (as pretrained encoders expect);
- `dataset`: per band, clip to the training split's 0.5/99.5 percentiles, then subtract the mean and divide by
  the std of the clipped values (`clipped_moments`; the default for anything but 8-bit RGB);
- `per_image`: z-score per image and band (statistics over the whole image, not the window);
- `per_case`: a volume's slices, one scheme per channel as nnU-Net does (below), with the parameters of the
  whole case (`case_params`), so a slice normalises as it does inside its case;
- `none`: raw values; `explicit`: the config's data.mean/data.std.
The per-sample modes (`per_image`, `per_case`) carry their parameters with each sample: (4, C) rows of low,
high, mean and std per channel.

The schemes of `per_case` channels (`ChannelNorm`):
- `zscore` (MRI and most modalities; the default): per case, the mean and std over the case's body; voxels
  outside it become 0. The body is where any channel is nonzero, with the holes of each slice filled: a 0
  enclosed by the body (a dark vessel, a signal void) is a measurement and keeps its normalised value, while
  the air and the zero padding around a skull-stripped scan are not. MRI intensities have no absolute scale,
  so every case is its own reference;
- `ct`: Hounsfield units are absolute, so one transform for all cases: `dataset`'s definition
  (`clipped_moments`) fitted on the training cases' foreground (labelled) voxels;
- `none`: raw values.

No-data pixels (NaN or infinite, `segkit.data.io.no_data`, or the declared nodata value) are left out of every
statistic, become 0 after normalisation, and are ignored by loss and scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy import ndimage

from segkit.data.io import no_data
from segkit.data.readers import Window
from segkit.device import channel_constant
from segkit.errors import ConfigError, DataError, SegkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("imagenet", "dataset", "per_image", "per_case", "none", "explicit")
PERCENTILES = (0.5, 99.5)
STATS_PIXELS = 1 << 20
"""Pixels per image read for statistics; larger images are sampled on a fixed grid of windows."""


@dataclass(frozen=True)
class ChannelNorm:
    """One channel's scheme; for `ct`, the training set's clip range and foreground mean/std."""

    scheme: str
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Normalization:
    mode: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    only_dtype: str | None = None  # set for checkpoints whose inputs were scaled by their type's range
    channels: tuple[ChannelNorm, ...] | None = None  # per_case: one scheme per channel

    def to_meta(self) -> dict:
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "channels"}
        if self.channels is not None:
            meta["channels"] = [asdict(c) for c in self.channels]
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> Normalization:
        """From model.json; checkpoints from before this object stored mean/std of [0, 1] inputs, and volume
        models from before `per_case` stored `none` here and their schemes under data.volume.normalization."""
        if "normalization" in meta:
            d = dict(meta["normalization"])
            legacy = ((meta.get("data") or {}).get("volume") or {}).get("normalization")
            if d.get("mode") == "none" and legacy is not None:
                return cls.per_case(ChannelNorm(**c) for c in legacy)
            channels = d.pop("channels", None)
            norm = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
            return norm if channels is None else replace(norm, channels=tuple(ChannelNorm(**c) for c in channels))
        legacy = cls.unit(meta["mean"], meta["std"])  # segkit 0.1 divided uint8 by 255: the same input as this
        return cls(legacy.mode, legacy.mean, legacy.std, only_dtype="uint8")  # but it divided uint16 by 65535

    @classmethod
    def unit(cls, mean: Sequence[float], std: Sequence[float]) -> Normalization:
        """Explicit mean/std given for 8-bit inputs scaled to [0, 1] (torchvision's convention)."""
        return cls("explicit", tuple(255 * m for m in mean), tuple(255 * s for s in std))

    @classmethod
    def per_case(cls, channels: Iterable[ChannelNorm]) -> Normalization:
        return cls("per_case", channels=tuple(channels))

    @property
    def per_image(self) -> bool:
        return self.mode == "per_image"

    @property
    def per_sample(self) -> bool:
        """Whether each sample carries its own parameters (`apply`'s `stats`)."""
        return self.mode in ("per_image", "per_case")

    @property
    def clips(self) -> bool:
        """Whether values are clipped before scaling: `dataset`, and `per_case` with a `ct` channel."""
        if self.mode == "per_case":
            return any(c.scheme == "ct" for c in self.channels)
        return self.low is not None and not self.per_sample

    @property
    def body_only(self) -> tuple[bool, ...]:
        """Per channel: whether values outside the body become 0 (`per_case` z-score channels)."""
        return tuple(c.scheme == "zscore" for c in self.channels or ())

    def describe(self) -> str:
        if self.mode == "per_image":
            return "per_image (z-score per image and band)"
        if self.mode == "per_case":
            return "per case, per channel: " + ", ".join(
                c.scheme if c.scheme != "ct" else f"ct (clip {c.low:.4g}..{c.high:.4g}, mean {c.mean:.4g}, "
                f"std {c.std:.4g})" for c in self.channels)
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
        if trained and not self.per_sample and np.dtype(dtype).name not in trained:
            raise DataError(f"{where}: a {np.dtype(dtype)} image, but the model was trained on {', '.join(trained)} "
                            f"images, and its input normalisation ({self.describe()}) is in their units. Fix: "
                            f"convert the image to {trained[0]} as the training images were made, or train with "
                            f"{np.dtype(dtype)} images (data.normalize: per_image takes any type).")

    def apply(self, x: torch.Tensor, stats: torch.Tensor | None = None, nodata: torch.Tensor | None = None,
              outside: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) raw pixels (any numeric type) -> float32 network input.

        `stats` (N, 4, C) = each sample's low, high, mean and std per channel, required by the per-sample
        modes (`ImageSource.stats`, `case_params`); `nodata` (N, 1, H, W) bool marks pixels that become 0;
        `outside` (N, 1, H, W) bool, voxels outside the body, which become 0 in `body_only` channels.
        """
        x = x.to(torch.float32, copy=True)  # never change the caller's tensor: the rest works in place on this copy
        if self.mode != "none":
            if self.per_sample:
                if stats is None:
                    raise SegkitError(f"{self.mode} normalisation needs each sample's parameters (stats)")
                low, high, mean, std = (stats[:, i, :, None, None] for i in range(4))
            else:
                mean, std = channel_constant(tuple(self.mean), x.device), channel_constant(tuple(self.std), x.device)
                if self.low is not None:
                    low = channel_constant(tuple(self.low), x.device)
                    high = channel_constant(tuple(self.high), x.device)
            if self.clips:
                x.clamp_(low, high)
            x.sub_(mean).div_(std)
        if outside is not None and any(self.body_only):
            x.masked_fill_(outside & (channel_constant(tuple(float(b) for b in self.body_only), x.device) > 0), 0.0)
        if nodata is not None:
            x.masked_fill_(nodata, 0.0)
        return x.nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # no-data: NaN and ±inf are never measurements

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
    """(4, C) per_image parameters: no clipping (low -inf, high +inf), the mean and std of one image's valid
    pixels (sampled for big images)."""
    pixels = np.concatenate([valid_pixels(read(w), nodata) for w in sample_windows(height, width)])
    c = pixels.shape[1]
    if not len(pixels):
        return np.stack([np.full(c, -np.inf), np.full(c, np.inf), np.zeros(c), np.ones(c)]).astype(np.float32)
    std = pixels.std(0)
    return np.stack([np.full(c, -np.inf), np.full(c, np.inf), pixels.mean(0),
                     np.where(std > 0, std, 1.0)]).astype(np.float32)


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
    low, high, mean, std = clipped_moments(pixels)
    return Normalization("dataset", tuple(mean.tolist()), tuple(std.tolist()), tuple(low.tolist()),
                         tuple(high.tolist()))


def clipped_moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column of (n, C) values: the PERCENTILES (low, high), and the mean and std of the values clipped to
    them, so the fitted values have mean 0 and std 1 after normalisation (nnU-Net takes the mean and std before
    clipping). The one definition behind `dataset` (images) and `ct` (volume channels)."""
    low, high = np.percentile(pixels, PERCENTILES, axis=0)
    clipped = np.clip(pixels, low, high)
    sd = clipped.std(0)
    return low, high, clipped.mean(0), np.where(sd > 0, sd, 1.0)


def pixel_sample(read: Callable[[Window], np.ndarray], height: int, width: int, nodata: float | None,
                 rng: np.random.Generator, pixels: int = 65536) -> np.ndarray:
    """Up to `pixels` random valid pixels of one image (read through `read`, which selects its bands)."""
    values = np.concatenate([valid_pixels(read(w), nodata) for w in sample_windows(height, width)])
    if len(values) > pixels:
        values = values[rng.choice(len(values), pixels, replace=False)]
    return values


# -- volumes ------------------------------------------------------------------------------

SCHEMES = ("zscore", "ct", "none")
SAMPLES_PER_CASE = 100_000
"""Foreground voxels per training case kept for the CT statistics (nnU-Net samples a fixed budget too)."""


def schemes_for(setting: str | Sequence[str], channel_names: Sequence[str]) -> list[str]:
    """`data.normalize` for volumes: `auto` (nnU-Net's rule: a channel named CT gets `ct`, every other
    `zscore`), or one scheme per channel."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ConfigError(f"data.normalize: '{setting}' is for 2-D images; a volume dataset takes `auto` or one "
                              f"scheme per channel from {list(SCHEMES)}, e.g. [zscore, ct]. Fix: set it so.")
        return ["ct" if name.strip().upper() == "CT" else "zscore" for name in channel_names]
    schemes = list(setting)
    if len(schemes) != len(channel_names) or not set(schemes) <= set(SCHEMES):
        raise ConfigError(f"data.normalize: {schemes}; the dataset has {len(channel_names)} channel(s) "
                          f"{list(channel_names)}. Fix: one of {list(SCHEMES)} per channel, in channel order.")
    return schemes


def foreground_sample(image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
                      size: int = SAMPLES_PER_CASE) -> np.ndarray:
    """(n, C) float64 intensities of at most `size` seeded finite foreground voxels of an (X, Y, Z, C) case."""
    hit = no_data(image, None)
    where = np.flatnonzero(foreground if hit is None else foreground & ~hit)
    if where.size > size:
        where = np.sort(rng.choice(where, size, replace=False))
    return image.reshape(-1, image.shape[-1])[where].astype(np.float64)


def fit_per_case(schemes: Sequence[str], samples: Iterable[Callable[[], np.ndarray]]) -> Normalization:
    """The `per_case` normalisation of a volume dataset: CT channels from the training cases' foreground
    samples (each callable gives (n, C) intensities, `foreground_sample`), read only when a channel needs them."""
    if "ct" not in schemes:
        return Normalization.per_case(ChannelNorm(s) for s in schemes)
    pooled = np.concatenate([sample() for sample in samples])
    if not len(pooled):
        raise ConfigError("data.normalize: `ct` needs foreground voxels to fit its range, but the training labels "
                          "have none. Fix: check the labels, or use zscore.")
    low, high, mean, std = clipped_moments(pooled)
    return Normalization.per_case(ChannelNorm("ct", float(low[c]), float(high[c]), float(mean[c]), float(std[c]))
                                  if scheme == "ct" else ChannelNorm(scheme) for c, scheme in enumerate(schemes))


def case_params(norm: Normalization, image: np.ndarray) -> np.ndarray:
    """(4, C) float32 `per_case` parameters (low, high, mean, std per channel) of one whole case as a stack of
    its slices (n, h, w, C); a z-score channel's mean and std are taken over the body (`body`) in float64."""
    if image.shape[-1] != len(norm.channels):
        raise ValueError(f"{image.shape[-1]} channels, normalisation for {len(norm.channels)}")
    moments = body_moments(image, [c for c, on in enumerate(norm.body_only) if on])
    params = np.empty((4, len(norm.channels)))
    for c, channel in enumerate(norm.channels):
        if channel.scheme == "zscore":
            n, mean, m2 = moments[c]
            std = float(np.sqrt(m2 / n)) if n else 1.0
            params[:, c] = (-np.inf, np.inf, mean if n else 0.0, max(std, 1e-8))
        elif channel.scheme == "ct":
            params[:, c] = (channel.low, channel.high, channel.mean, channel.std)
        else:
            params[:, c] = (-np.inf, np.inf, 0.0, 1.0)
    return params.astype(np.float32)


CHUNK_VOXELS = 1 << 22


def body_moments(image: np.ndarray, channels: Sequence[int]) -> dict[int, tuple[int, float, float]]:
    """Count, mean and sum of squared deviations of each of `channels` over the body (`body`) of a case's
    slices (n, h, w, C), a chunk of slices at a time, merged exactly (Chan et al.), so a large volume never
    needs a float64 copy of its voxels."""
    moments = {c: (0, 0.0, 0.0) for c in channels}
    if not channels:
        return moments
    step = max(1, CHUNK_VOXELS // max(1, int(np.prod(image.shape[1:-1]))))
    for start in range(0, image.shape[0], step):
        chunk = image[start:start + step]
        inside = body(chunk)
        for c in channels:
            values = chunk[..., c][inside].astype(np.float64)
            if not values.size:
                continue
            n, mean, m2 = moments[c]
            nb, mb = values.size, float(values.mean())
            m2b = float(((values - mb) ** 2).sum())
            total = n + nb
            delta = mb - mean
            moments[c] = (total, mean + delta * nb / total, m2 + m2b + delta * delta * n * nb / total)
    return moments


def body(image: np.ndarray) -> np.ndarray:
    """(..., h, w) bool: the voxels of slices (..., h, w, C) inside the body: where any channel is nonzero, with
    the holes of each slice filled (nnU-Net's nonzero region, its holes filled in 2-D so that one slice gives
    the same as its whole case), and no channel no-data (NaN or infinite)."""
    inside = np.any(image != 0, axis=-1)
    inside |= _holes(inside)
    hit = no_data(image, None)
    return inside if hit is None else inside & ~hit


_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)
"""Connects a voxel to its 4 neighbours in its own slice only (as scipy's binary_fill_holes in 2-D)."""


def _holes(mask: np.ndarray) -> np.ndarray:
    """(..., h, w) bool: the parts of each (h, w) plane outside `mask` that touch no edge of the plane."""
    planes = mask.reshape(-1, *mask.shape[-2:])
    outside, count = ndimage.label(~planes, _PLANE)
    open_air = np.zeros(count + 1, bool)  # label -> touches an edge of its plane (0: the mask itself)
    for edge in (outside[:, 0], outside[:, -1], outside[:, :, 0], outside[:, :, -1]):
        open_air[edge] = True
    open_air[0] = True
    return ~open_air[outside].reshape(mask.shape)
