"""`segkit visualize` as one library call: overlays of masks on a folder of images (`viz`), or montages of the
slices of NIfTI cases (`viz_volumes`), by what the folder holds. The same summary comes back either way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from segkit.data.volumes import is_volume_folder
from segkit.errors import SegkitError
from segkit.viz import sources_for, visualize_folder
from segkit.viz_volumes import VolumeClasses, visualize_volumes


@dataclass
class VizSummary:
    """Pictures written; inputs skipped for want of a mask (or truth) and why; a line per volume montage."""

    pictures: int
    skipped: list[str] = field(default_factory=list)
    skip_reason: str = ""
    details: list[str] = field(default_factory=list)
    kind: str = "pictures"

    def lines(self, out_dir: Path | str) -> list[str]:
        return [*self.details, f"{self.pictures} {self.kind} in {out_dir}"]

    def warning(self) -> str | None:
        return f"{len(self.skipped)} {self.skip_reason} (e.g. {self.skipped[0]})" if self.skipped else None


def visualize_files(images_dir: Path, masks_dir: Path, out_dir: Path, checkpoint: Path | None = None,
                    config: Path | None = None, alpha: float = 0.5, truth: Path | None = None,
                    overwrite: bool = False) -> VizSummary:
    """Overlays (with `truth`, error panels) of the masks under `masks_dir` on the images or volumes under
    `images_dir`, written under `out_dir`; class names and colours from `checkpoint` or `config`."""
    if not is_volume_folder(images_dir):
        head, masks, truth_src = sources_for(masks_dir, checkpoint, config, truth)
        written, skipped = visualize_folder(images_dir, masks, out_dir, head.classes, head.colors, truth_src, alpha,
                                            overwrite)
        return VizSummary(written, [p.name for p in skipped], "images have no mask and were skipped")
    if checkpoint is not None and config is not None:
        raise SegkitError("visualize takes one of --checkpoint or --config (for class names and colours), not both.")
    spec = (VolumeClasses.from_checkpoint(checkpoint) if checkpoint is not None
            else VolumeClasses.from_config(config) if config is not None else VolumeClasses(None, None))
    montages, skipped = visualize_volumes(images_dir, masks_dir, out_dir, spec, truth, alpha, overwrite)
    what = "mask or label" if truth is not None else "mask"
    details = [f"{m.case}: slices {m.slices} along axis {m.axis} ({m.foreground} of {m.depth} with foreground)"
               for m in montages]
    return VizSummary(len(montages), [str(s) for s in skipped], f"cases have no {what} and were skipped", details,
                      "montages")
