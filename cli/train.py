"""`segkit train CONFIG`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/<config name>.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides train.device).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last/.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per epoch.")] = True,
    nproc: Annotated[int, typer.Option(help="Processes to launch with torchrun (DDP / file shards).")] = 1,
) -> None:
    """Train a U-Net from a config; writes config.yaml, metrics.csv, curves.png, best/ and last/."""
    from segkit import distributed
    from segkit.config import load_config
    from segkit.train import train as run

    overrides = list(set_ or [])
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    cfg = load_config(config, overrides)
    result = run(cfg, out or Path("runs") / config.stem, resume=resume, progress=progress)
    if distributed.rank() == 0:
        typer.echo(f"{result.stopped} after {result.epochs_run} epochs; best validation mean Dice "
                   f"{result.best_dice:.4f} at epoch {result.best_epoch}; {result.images_per_s:.1f} train images/s")
        typer.echo(f"checkpoint: {result.run_dir / 'best'}")
        typer.echo(f"curves:     {result.run_dir / 'curves.png'}")
