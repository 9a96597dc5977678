"""`segkit visualize IMAGES_DIR MASKS_DIR OUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


@app.command()
def visualize(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images, or of NIfTI volumes (nnU-Net imagesTs/: "
                                                    "<case>_0000.nii.gz channel files, or one file per case).")],
    masks_dir: Annotated[Path, typer.Argument(help="Masks: `segkit predict` output (with --checkpoint), "
                                                   "or masks in the config's data format (with --config).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the overlay PNGs go.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Classes and colours from this checkpoint.")] = None,
    config: Annotated[Path | None, typer.Option(help="Classes, colours and mask format from this config.")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Opacity of the class colours.")] = 0.5,
    truth: Annotated[Path | None, typer.Option(help="Ground-truth masks: panels image | truth | "
                                                    "prediction | errors.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing pictures.")] = False,
) -> None:
    """Overlays of masks on images with a legend; with --truth, error panels. For volumes (NIfTI), a montage
    of the slices with foreground per case; --checkpoint or --config are optional there."""
    from segkit.data.volumes import is_volume_folder
    from segkit.viz import sources_for, visualize_folder

    if is_volume_folder(images_dir):
        _volumes(images_dir, masks_dir, out_dir, checkpoint, config, alpha, truth, overwrite)
        return
    head, masks, truth_src = sources_for(masks_dir, checkpoint, config, truth)
    written, skipped = visualize_folder(images_dir, masks, out_dir, head.classes, head.colors, truth_src, alpha,
                                        overwrite)
    if skipped:
        typer.echo(f"{len(skipped)} images have no mask and were skipped (e.g. {skipped[0].name})", err=True)
    typer.echo(f"{written} pictures in {out_dir}")


def _volumes(images_dir: Path, masks_dir: Path, out_dir: Path, checkpoint: Path | None, config: Path | None,
             alpha: float, truth: Path | None, overwrite: bool) -> None:
    from segkit.errors import SegkitError
    from segkit.viz_volumes import VolumeClasses, visualize_volumes

    if checkpoint is not None and config is not None:
        raise SegkitError("visualize takes one of --checkpoint or --config (for class names and colours), not both.")
    spec = (VolumeClasses.from_checkpoint(checkpoint) if checkpoint is not None
            else VolumeClasses.from_config(config) if config is not None else VolumeClasses(None, None))
    montages, skipped = visualize_volumes(images_dir, masks_dir, out_dir, spec, truth, alpha, overwrite)
    if skipped:
        what = "mask or label" if truth is not None else "mask"
        typer.echo(f"{len(skipped)} cases have no {what} and were skipped (e.g. {skipped[0]})", err=True)
    for m in montages:
        typer.echo(f"{m.case}: slices {m.slices} along axis {m.axis} ({m.foreground} of {m.depth} with foreground)")
    typer.echo(f"{len(montages)} montages in {out_dir}")
