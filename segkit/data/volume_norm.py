"""Intensity normalisation of volumes, one scheme per channel (modality), as nnU-Net does:

- `zscore` (MRI and most modalities; the default): per case, the mean and std of the case's nonzero region
  (voxels where any channel is nonzero: the body, not the air or the zero padding of skull-stripped scans);
  voxels outside it become 0. MRI intensities have no absolute scale, so every case is its own reference.
- `ct`: Hounsfield units are absolute, so one transform for all cases: clip to the 0.5/99.5 percentiles of the
  training set's foreground (labelled) voxels, then subtract their mean and divide by their std.
- `none`: raw values.
A voxel with a NaN or infinite channel is no-data, as a pixel is in 2-D (`segkit.data.io.no_data`): it is
left out of every statistic and becomes 0.
The schemes and the fitted CT numbers are stored in model.json (`data.volume.normalization`); training and
prediction call the same `case_params` and `apply`, so a case becomes the same network input in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from segkit.data.io import no_data
from segkit.errors import ConfigError

SCHEMES = ("zscore", "ct", "none")
PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 100_000
"""Foreground voxels per training case kept for the CT statistics (nnU-Net samples a fixed budget too)."""


@dataclass(frozen=True)
class ChannelNorm:
    """One channel's scheme; for `ct`, the training set's clip range and foreground mean/std."""

    scheme: str
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    std: float | None = None


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


@dataclass(frozen=True)
class VolumeNormalization:
    channels: tuple[ChannelNorm, ...]

    @classmethod
    def fit(cls, schemes: Sequence[str], samples: Iterable[Callable[[], np.ndarray]]) -> VolumeNormalization:
        """CT channels from the training cases' foreground samples (each callable gives (n, C) intensities,
        `foreground_sample`); read only when a channel needs them."""
        if "ct" not in schemes:
            return cls(tuple(ChannelNorm(s) for s in schemes))
        pooled = np.concatenate([sample() for sample in samples])
        if not len(pooled):
            raise ConfigError("data.normalize: `ct` needs foreground voxels to fit its range, but the training labels "
                              "have none. Fix: check the labels, or use zscore.")
        channels = []
        for c, scheme in enumerate(schemes):
            if scheme != "ct":
                channels.append(ChannelNorm(scheme))
                continue
            low, high = np.percentile(pooled[:, c], PERCENTILES)
            channels.append(ChannelNorm("ct", float(low), float(high), float(pooled[:, c].mean()),
                                        float(max(pooled[:, c].std(), 1e-8))))
        return cls(tuple(channels))

    def to_meta(self) -> list[dict]:
        return [asdict(c) for c in self.channels]

    @classmethod
    def from_meta(cls, meta: Sequence[dict]) -> VolumeNormalization:
        return cls(tuple(ChannelNorm(**c) for c in meta))

    def describe(self) -> str:
        return ", ".join(c.scheme if c.scheme != "ct" else f"ct (clip {c.low:.4g}..{c.high:.4g}, mean {c.mean:.4g}, "
                         f"std {c.std:.4g})" for c in self.channels)

    def case_params(self, image: np.ndarray) -> np.ndarray:
        """(C, 4) float64 = low, high, mean, std per channel for one whole case (X, Y, Z, C)."""
        if image.shape[-1] != len(self.channels):
            raise ValueError(f"{image.shape[-1]} channels, normalisation for {len(self.channels)}")
        zscore = [c for c, norm in enumerate(self.channels) if norm.scheme == "zscore"]
        moments = body_moments(image, zscore)
        params = np.empty((len(self.channels), 4))
        for c, norm in enumerate(self.channels):
            if norm.scheme == "zscore":
                n, mean, m2 = moments[c]
                std = float(np.sqrt(m2 / n)) if n else 1.0
                params[c] = (-np.inf, np.inf, mean if n else 0.0, max(std, 1e-8))
            elif norm.scheme == "ct":
                params[c] = (norm.low, norm.high, norm.mean, norm.std)
            else:
                params[c] = (-np.inf, np.inf, 0.0, 1.0)
        return params

    def apply(self, image: np.ndarray, params: np.ndarray) -> np.ndarray:
        """float32 network input of (..., C) voxels of a case (the whole case or any slice of it) with its
        `case_params`. Voxel by voxel, so a slice normalises exactly as it does inside its volume."""
        low, high, mean, std = (params[:, i] for i in range(4))
        out = ((np.clip(image.astype(np.float64), low, high) - mean) / std).astype(np.float32)
        zscore = np.array([c.scheme == "zscore" for c in self.channels])
        if zscore.any():
            out[..., zscore] = np.where(body(image)[..., None], out[..., zscore], np.float32(0))
        hit = no_data(image, None)
        if hit is not None:
            out[hit] = 0
        return out


CHUNK_VOXELS = 1 << 22


def body_moments(image: np.ndarray, channels: Sequence[int]) -> dict[int, tuple[int, float, float]]:
    """Count, mean and sum of squared deviations of each of `channels` over the body (`body`) of an
    (X, Y, Z, C) case, chunk by chunk along the first axis and merged exactly (Chan et al.), so a large
    volume never needs a float64 copy of its voxels."""
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
    """(...) bool: voxels where any channel is nonzero (nnU-Net's nonzero region, without hole filling) and
    none is no-data (NaN or infinite)."""
    inside = np.any(image != 0, axis=-1)
    hit = no_data(image, None)
    return inside if hit is None else inside & ~hit
