"""What a model trained on volume slices needs to know to read, cut and write volumes again: stored in
model.json as `data.volume`, written by training, read by prediction, evaluation and visualisation. How its
slices are normalised is model.json's `normalization` (mode `per_case`), as for every model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from segkit.data.normalize import Normalization
from segkit.data.resample import plane_size
from segkit.errors import SegkitError

SPACING_FACTOR = 2.0
"""In-plane spacing further than this factor from training's is reported at prediction."""


@dataclass(frozen=True)
class VolumeSpec:
    """`layout`: the training dataset's (nnunet: one file per channel, `<case>_0000`); `slice_axis`: the voxel
    axis (0, 1, 2) the 2-D slices were cut along; `class_values`: the label values of each output class (an
    index output writes the class's first value); `regions_class_order`: nnU-Net's rule to paint region masks
    back into one label map (None unless the classes are regions); `canonical`: slices are cut on the closest
    RAS axes (`orientation: RAS` in model.json; models from before orientations were stored cut file axes);
    `target_spacing`: the in-plane spacing (mm, the slice's height then width axis) every case is resampled to
    before the network, outputs going back to the case's grid (None: each case on its own grid)."""

    layout: str
    channel_names: tuple[str, ...]
    slice_axis: int
    class_values: dict[str, tuple[int, ...]]
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None
    canonical: bool = True
    spacing: tuple[float, float, float] | None = None  # the training cases' median, mm, on the slicing axes
    target_spacing: tuple[float, float] | None = None

    def to_meta(self) -> dict:
        return {"layout": self.layout, "channel_names": list(self.channel_names), "slice_axis": self.slice_axis,
                "class_values": {k: list(v) for k, v in self.class_values.items()},
                "regions_class_order": list(self.regions_class_order) if self.regions_class_order else None,
                "ignore_label": self.ignore_label, "orientation": "RAS" if self.canonical else "file",
                "spacing": list(self.spacing) if self.spacing else None,
                "target_spacing": list(self.target_spacing) if self.target_spacing else None}

    @classmethod
    def from_meta(cls, meta: dict) -> VolumeSpec | None:
        """The spec of a checkpoint's model.json; None for a model trained on 2-D images."""
        v = (meta.get("data") or {}).get("volume")
        if v is None:
            return None
        try:
            return cls(v["layout"], tuple(v["channel_names"]), int(v["slice_axis"]),
                       {k: tuple(int(x) for x in vals) for k, vals in v["class_values"].items()},
                       tuple(v["regions_class_order"]) if v.get("regions_class_order") else None,
                       v.get("ignore_label"), v.get("orientation") == "RAS",
                       tuple(float(x) for x in v["spacing"]) if v.get("spacing") else None,
                       tuple(float(x) for x in v["target_spacing"]) if v.get("target_spacing") else None)
        except (KeyError, TypeError, ValueError) as err:
            raise SegkitError(f"model.json: damaged `data.volume` section ({type(err).__name__}: {err}). "
                              "Fix: use the model.json written with the checkpoint.") from None

    @property
    def channel_files(self) -> bool:
        """Whether cases come as one file per channel (`<case>_0000`, `<case>_0001`, ...)."""
        return self.layout == "nnunet"

    @property
    def plane(self) -> tuple[int, int]:
        """The voxel axes of a slice: (height, width)."""
        h, w = (a for a in range(3) if a != self.slice_axis)
        return h, w

    def with_target(self, setting: str | tuple[float, float] | None) -> VolumeSpec:
        """This spec with `data.target_spacing` applied: `median` is the training cases' median in-plane
        spacing (`spacing`), a pair is taken as it is, None keeps each case on its own grid."""
        if setting is None:
            return self
        target = [self.spacing[a] for a in self.plane] if setting == "median" else setting
        return replace(self, target_spacing=tuple(float(t) for t in target))

    def slice_size(self, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, int] | None:
        """The (height, width) a case of `shape` and `spacing` is resampled to in-plane, or None when it is
        used on its own grid (no target spacing, or already at it)."""
        if self.target_spacing is None:
            return None
        return plane_size([shape[a] for a in self.plane], [spacing[a] for a in self.plane], self.target_spacing)

    def spacing_problem(self, case: str, spacing: tuple[float, ...]) -> str | None:
        """A sentence when `case`'s in-plane spacing differs from training's by more than SPACING_FACTOR and the
        model does not resample (no target spacing): the network then sees its structures at another scale."""
        if self.spacing is None or self.target_spacing is not None:
            return None
        plane = self.plane
        ratios = [spacing[a] / self.spacing[a] for a in plane]
        if all(1 / SPACING_FACTOR <= r <= SPACING_FACTOR for r in ratios):
            return None
        fmt = lambda s: " x ".join(f"{s[a]:.3g}" for a in plane)  # noqa: E731
        return (f"case {case}: in-plane spacing {fmt(spacing)} mm, the model was trained at {fmt(self.spacing)} mm "
                f"(more than {SPACING_FACTOR:g}x apart): its structures look {'smaller' if max(ratios) > 1 else 'larger'} "
                "than in training and the masks may suffer. Fix: resample the case to the training spacing, or "
                "train with data.target_spacing: median (resampled in-plane, as `segkit plan` sets).")

    def for_classes(self, names: list[str]) -> VolumeSpec:
        """The spec of a model whose output classes are `names`, a subset of these (a 2-class softmax model
        converted to its 1-channel sigmoid twin keeps its foreground class and that class's label values)."""
        return replace(self, class_values={name: self.class_values[name] for name in names})

    def index_values(self) -> np.ndarray:
        """Class index -> the label value an index (softmax) output writes for it."""
        return np.array([values[0] for values in self.class_values.values()])


def input_normalization(meta: dict) -> dict:
    """What a pipeline does to raw pixels before the network, from model.json: the normalisation, and for a
    volume model where its slices come from (each whole case on its RAS axes, cut along `slice_axis`; the
    `per_case` parameters are the whole case's: `zscore` over the case's body, `ct` clip and dataset
    statistics, `none`), and the in-plane spacing (mm) each slice is resampled to first, logits going back to
    the case's grid (null: none)."""
    norm = Normalization.from_meta(meta).to_meta()
    spec = VolumeSpec.from_meta(meta)
    if spec is None:
        return norm
    return {**norm, "slice_axis": spec.slice_axis, "orientation": "RAS" if spec.canonical else "file",
            "target_spacing": list(spec.target_spacing) if spec.target_spacing else None}
