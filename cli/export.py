"""`segkit export CHECKPOINT OUTPUT.onnx`: ONNX export with the checkpoint's metadata, and a parity check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app
from cli.predict import Checkpoint

@app.command()
def export(
    checkpoint: Checkpoint,
    output: Annotated[Path, typer.Argument(help="The .onnx file to write (atomically).")],
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    dynamic: Annotated[bool, typer.Option("--dynamic/--static", help="Free batch, height and width, or a fixed "
                                          "(1, C, size, size) input.")] = True,
    size: Annotated[int, typer.Option(help="--static: the input's height and width (multiple of 32).")] = 512,
    check_images: Annotated[Path | None, typer.Option("--check-images", help="Real images for the parity check "
                                                      "(default: the embedded nuclei test images for 3-channel "
                                                      "models, else synthetic arrays).")] = None,
) -> None:
    """Write the model as ONNX (raw logits; model.json in its metadata), then check it against PyTorch
    on the CPU: max |logit difference| and mask agreement, whole images and tiled. The file runs with
    `segkit predict OUTPUT.onnx IN OUT` and `Segmenter.load("OUTPUT.onnx")` (onnxruntime)."""
    from segkit.export import check_images as pick_images
    from segkit.export import LOGIT_REL, export_onnx, parity
    from segkit.model import read_meta

    images, described = pick_images(read_meta(checkpoint), check_images)  # before writing: bad input writes nothing
    path = export_onnx(checkpoint, output, opset=opset, dynamic=dynamic, size=size)
    shape = "dynamic batch, height, width" if dynamic else f"static 1 x C x {size} x {size}"
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {opset}, {shape})")
    typer.echo(f"parity check (onnxruntime vs PyTorch, CPU, float32) on {described}:")
    result = parity(checkpoint, path, images)
    for part in result["parts"]:
        typer.echo(f"  {part['name']:<44} max |logit diff| {part['max_abs_logit_diff']:.3g}  "
                   f"masks {100 * part['mask_agreement']:.4f}% equal ({part['pixels_differing']} px differ)")
    typer.echo(f"max |logit difference| {result['max_abs_logit_diff']:.3g} (logits up to "
               f"{result['max_abs_logit']:.3g}); mask agreement {100 * result['mask_agreement']:.4f}% "
               f"of {result['pixels']} px")
    if not result["agrees"]:
        typer.echo(f"error: parity check failed: logits differ by up to {result['max_abs_logit_diff']:.3g}, more "
                   f"than float32 rounding explains ({result['tolerance']:.3g}, {LOGIT_REL:g} of the largest "
                   f"logit): the file does not compute what the checkpoint does, whatever share of the masks still "
                   f"agrees; {path} is kept for inspection.", err=True)
        raise typer.Exit(1)
