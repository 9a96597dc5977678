"""`segkit evaluate CHECKPOINT DATA_ROOT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app
from cli.predict import (BatchSize, Checkpoint, Device, Overlap, Threshold, Tile, Tta, Workers, is_volume_model,
                         load_segmenter)


def refuse_volume_root(data_root: Path) -> None:
    """A 2-D model scored on a volume dataset: say so, instead of a missing images/ folder."""
    from segkit.data.volumes import is_volume_root
    from segkit.errors import SegkitError

    if is_volume_root(data_root):
        raise SegkitError(f"{data_root}: a volume dataset (NIfTI), but this checkpoint was trained on 2-D images "
                          "(its model.json has no data.volume). Fix: train on this dataset (data.root: "
                          f"{data_root}) and evaluate that checkpoint.")


def evaluate_volumes(seg, data_root: Path, split: str, config: Path | None, exclude: list[str],
                     progress: bool) -> dict:
    """The volume path of `evaluate`: per-case 3-D scores, printed."""
    from segkit.errors import ConfigError
    from segkit.evaluate_volumes import evaluate_volumes as run, format_volume_scores, volume_cases

    if config is not None:
        raise ConfigError("--config: a volume model reads labels as its dataset.json (or, in segkit's layout, its "
                          "model.json classes) says. Fix: leave out --config.")
    ds, cases = volume_cases(seg, data_root, split)
    result = run(seg, ds, cases, exclude, progress=progress)
    typer.echo(format_volume_scores(result))
    return result


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
    from segkit.evaluate import background_classes, evaluate as run, format_scores, samples_for

    seg = load_segmenter(checkpoint, device, batch_size, tile, overlap, tta, threshold)
    exclude = background_classes(seg.classes) if exclude_background else []
    if is_volume_model(seg):
        result = evaluate_volumes(seg, data_root, split, config, exclude, progress)
    else:
        refuse_volume_root(data_root)
        samples, reader = samples_for(seg, data_root, split, config)
        result = run(seg, samples, reader, exclude, workers=workers, progress=progress)
        typer.echo(format_scores(result))
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"scores: {json_out}")
