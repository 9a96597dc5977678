"""`segkit predict CHECKPOINT INPUT_DIR OUTPUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app

Checkpoint = Annotated[Path, typer.Argument(help="Checkpoint folder (a run's best/ or last/).")]
BatchSize = Annotated[int, typer.Option(help="Images (or windows) per forward pass.")]
Workers = Annotated[int, typer.Option(help="Processes decoding images (and threads encoding masks); for volumes on a GPU, "
                                             "threads reading the next cases while one is predicted.")]
Tile = Annotated[int, typer.Option(help="Images larger than this go through sliding windows of this size.")]
Overlap = Annotated[int, typer.Option(help="Overlap of neighbouring windows, pixels.")]
Tta = Annotated[bool, typer.Option("--tta", help="Average flips (in logit space).")]
Threshold = Annotated[str | None, typer.Option(help="Sigmoid heads: 0.4, or class=0.4,other=0.6.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]


def load_segmenter(checkpoint: Path, device: str, batch_size: int, tile: int, overlap: int, tta: bool,
                   threshold: str | None):
    """The Segmenter that predict and evaluate share, options checked with clear messages."""
    from segkit import Segmenter
    from segkit.errors import SegkitError
    from segkit.heads import parse_thresholds

    try:
        seg = Segmenter.load(checkpoint, device=device, batch_size=batch_size, tile=tile, overlap=overlap, tta=tta)
    except ValueError as err:
        raise SegkitError(f"--{err}") from None
    if threshold is not None:
        seg.set_thresholds(parse_thresholds(threshold, seg.classes))
    return seg


def report(failed: list, line: str) -> None:
    """Each failure on stderr, the summary line once (rank 0), and exit 1 when anything failed."""
    from segkit import distributed

    for _, reason in failed:
        typer.echo(f"failed: {reason}", err=True)
    if distributed.rank() == 0:
        typer.echo(line)
    if failed:
        raise typer.Exit(1)


@app.command()
def predict(
    checkpoint: Checkpoint,
    input_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively), or of volumes "
                                                   "(NIfTI, NRRD, MHA, DICOM series) for a model trained on volume "
                                                   "slices (nnU-Net: imagesTs/).")],
    output_dir: Annotated[Path, typer.Argument(help="Where masks go, mirroring the input tree.")],
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    tile: Tile = 1024,
    overlap: Overlap = 128,
    tta: Tta = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also write probabilities: float16 .npy, a "
                                             "float32 GeoTIFF <stem>_probs.tif for georeferenced inputs, or "
                                             "<case>_probs.nii.gz (X, Y, Z, class) for volumes.")] = False,
    vectorize: Annotated[bool, typer.Option("--vectorize", help="Georeferenced inputs: also write polygons per "
                                            "class as GeoJSON (<stem>.geojson) in the image's CRS.")] = False,
    threshold: Threshold = None,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[int, typer.Option(help="Processes to launch with torchrun (DDP / file shards).")] = 1,
) -> None:
    """Masks for every image in a folder: index masks (softmax) or one binary mask per class (sigmoid);
    PNG for plain images, GeoTIFF on the input's grid for georeferenced rasters, NIfTI on the input's grid
    for volumes (<case>.nii.gz label map, or <class>/<case>.nii.gz per sigmoid class)."""
    from segkit import distributed
    from segkit.device import resolve_device
    from segkit.predict import predict_files

    rank_device = distributed.device_for_rank(resolve_device(device))  # under torchrun: this rank's own GPU
    seg = load_segmenter(checkpoint, str(rank_device), batch_size, tile, overlap, tta, threshold)
    summary = predict_files(seg, input_dir, output_dir, probs=save_probs, overwrite=overwrite, workers=workers,
                            progress=progress and distributed.rank() == 0, vectorize=vectorize)
    report(summary.failed, summary.line(output_dir))
