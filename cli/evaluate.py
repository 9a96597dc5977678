"""`segkit evaluate CHECKPOINT DATA_ROOT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app
from cli.predict import BatchSize, Checkpoint, Device, Overlap, Threshold, Tile, Tta, Workers, load_segmenter


@app.command()
def evaluate(
    checkpoint: Checkpoint,
    data_root: Annotated[Path, typer.Argument(help="Data folder with images and masks.")],
    split: Annotated[str, typer.Option(help="test | val | train | all (flat layout). Volumes: test (imagesTs + "
                                            "labelsTs), val (the cases training held back), train.")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    config: Annotated[Path | None, typer.Option(help="Read the masks as this config's data section says "
                                                     "(default: as the checkpoint was trained).")] = None,
    exclude_background: Annotated[bool, typer.Option("--exclude-background",
                                                     help="Leave the 'background' class out of the mean.")] = False,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    tile: Tile = 1024,
    overlap: Overlap = 128,
    tta: Tta = False,
    threshold: Threshold = None,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Per-class IoU, Dice, precision, recall; macro mean and micro; confusion matrix for softmax. A model trained
    on volume slices: per case and class 3-D Dice, IoU and HD95 in mm, their means over cases."""
    from segkit.data.io import write_json
    from segkit.evaluate import background_classes, evaluate_split, format_result

    seg = load_segmenter(checkpoint, device, batch_size, tile, overlap, tta, threshold)
    exclude = background_classes(seg.classes) if exclude_background else []
    result = evaluate_split(seg, data_root, split, config, exclude, workers, progress)
    typer.echo(format_result(result))
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"scores: {json_out}")
