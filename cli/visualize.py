"""`segkit visualize IMAGES_DIR MASKS_DIR OUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


@app.command()
def visualize(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images.")],
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
    """Overlays of masks on images with a legend; with --truth, error panels."""
    from segkit.viz import sources_for, visualize_folder

    head, masks, truth_src = sources_for(masks_dir, checkpoint, config, truth)
    written, skipped = visualize_folder(images_dir, masks, out_dir, head.classes, head.colors, truth_src, alpha,
                                        overwrite)
    if skipped:
        typer.echo(f"{len(skipped)} images have no mask and were skipped (e.g. {skipped[0].name})", err=True)
    typer.echo(f"{written} pictures in {out_dir}")
