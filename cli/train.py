"""`segkit train CONFIG`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


def resume_command(config: Path, out: Path, epochs: int | None, device: str | None, overrides: list[str],
                   progress: bool) -> str:
    """The command that continues this run: the same options, plus --resume (and, under torchrun on
    one machine, --nproc for its processes)."""
    args = ["segkit", "train", str(config), "--out", str(out)]
    args += ["--epochs", str(epochs)] if epochs is not None else []
    args += ["--device", device] if device is not None else []
    for assignment in overrides:
        args += ["--set", assignment]
    args += [] if progress else ["--no-progress"]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1 and world != local:
        return "the same torchrun command on every node, with --resume"
    args += ["--nproc", str(world)] if world > 1 else []
    return shlex.join([*args, "--resume"])


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
    """Train a U-Net from a config; writes config.yaml, metrics.csv, curves.png, best/ and last/.

    SIGTERM or SIGINT (Ctrl-C) stop after the current step with last/ written and exit 143 or 130;
    the line printed says where it stopped and the command that continues from there.
    """
    from segkit import distributed
    from segkit.config import load_config
    from segkit.run_control import Interrupted
    from segkit.train import train as run

    overrides = list(set_ or [])
    given = list(overrides)
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    cfg = load_config(config, overrides)
    folder = out or Path("runs") / config.stem
    try:
        result = run(cfg, folder, resume=resume, progress=progress)
    except Interrupted as stop:
        if distributed.rank() == 0:
            typer.echo(f"{stop}; continue with: {resume_command(config, folder, epochs, device, given, progress)}",
                       err=True)
        raise typer.Exit(stop.exit_code) from None
    if distributed.rank() == 0:
        typer.echo(f"{result.stopped} after {result.epochs_run} epochs; best validation mean Dice "
                   f"{result.best_dice:.4f} at epoch {result.best_epoch}; {result.images_per_s:.1f} train images/s")
        typer.echo(f"checkpoint: {result.run_dir / 'best'}")
        typer.echo(f"curves:     {result.run_dir / 'curves.png'}")
