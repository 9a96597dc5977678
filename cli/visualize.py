"""`segkit visualize IMAGES_DIR MASKS_DIR OUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


@app.command()
def visualize(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images, or of volumes (NIfTI, NRRD, MHA, DICOM "
                                                    "series; nnU-Net imagesTs/: <case>_0000.nii.gz channel files, "
                                                    "or one file per case).")],
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
    from segkit.visualize import visualize_files

    summary = visualize_files(images_dir, masks_dir, out_dir, checkpoint, config, alpha, truth, overwrite)
    if summary.warning():
        typer.echo(summary.warning(), err=True)
    for line in summary.lines(out_dir):
        typer.echo(line)
