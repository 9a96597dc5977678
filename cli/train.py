"""`segkit train CONFIG`."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, started


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
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/, or one `segkit plan` wrote), or a dataset "
                                                "folder: planned from its data first.")],
    budget: Annotated[str | None, typer.Option(help="With a dataset folder: the whole command's time, e.g. 30m, "
                                                    "1h (planned to end within it).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/<config name>.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides train.device).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last/.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per epoch.")] = True,
    nproc: Annotated[int, typer.Option(help="Processes to launch with torchrun (DDP / file shards).")] = 1,
) -> None:
    """Train a U-Net from a config, or from a dataset folder with the plan `segkit plan` would make (saved as
    RUN/plan.yaml with RUN/fingerprint.json, its reasons printed); writes config.yaml, metrics.csv, curves.png,
    best/ and last/.

    SIGTERM or SIGINT (Ctrl-C) stop after the current step with last/ written and exit 143 or 130;
    the line printed says where it stopped and the command that continues from there.
    """
    from segkit import distributed
    from segkit.config import load_config
    from segkit.errors import SegkitError
    from segkit.run_control import Interrupted
    from segkit.train import train as run

    overrides = list(set_ or [])
    given = list(overrides)
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    folder = out or Path("runs") / (config.name if config.is_dir() else config.stem)
    files: dict[str, bytes] = {}
    if config.is_dir():
        cfg, files = _planned(config, budget, device, overrides, folder, resume, progress)
        config = folder / "plan.yaml"
    elif budget is not None:
        raise SegkitError(f"--budget plans a dataset folder, and {config} is a config. Fix: give the folder "
                          "(`segkit train DATA_ROOT --budget 30m`), or set train.time_limit and train.epochs.")
    else:
        cfg = load_config(config, overrides)
    try:
        result = run(cfg, folder, resume=resume, progress=progress, files=files)
    except Interrupted as stop:
        if distributed.rank() == 0:
            typer.echo(f"{stop}; continue with: {resume_command(config, folder, epochs, device, given, progress)}",
                       err=True)
        raise typer.Exit(stop.exit_code) from None
    if distributed.rank() == 0:
        typer.echo(f"{result.stopped} after {result.epochs_run} epochs; best validation mean Dice "
                   f"{result.best_dice:.4f} at epoch {result.best_epoch}; {result.images_per_s:.1f} train images/s")
        if cfg.plan is not None and cfg.plan.budget_s:
            spent = time.perf_counter() - started()
            typer.echo(f"time:       {spent:.0f} s of the {cfg.plan.budget_s:.0f} s budget "
                       f"({spent / cfg.plan.budget_s - 1:+.1%}); the plan predicted {cfg.plan.predicted_s:.0f} s")
        typer.echo(f"checkpoint: {result.run_dir / 'best'}")
        typer.echo(f"curves:     {result.run_dir / 'curves.png'}")


def _planned(root: Path, budget: str | None, device: str | None, overrides: list[str], folder: Path, resume: bool,
             progress: bool):
    """The config planned for the dataset `root` (with --set applied) and the files the run keeps; a resumed
    planned run trains its own RUN/plan.yaml again (never a new plan)."""
    from segkit import distributed
    from segkit.config import load_config, parse_config, set_dotted
    from segkit.errors import SegkitError
    from segkit.plan import declared_reading, make_plan, parse_budget

    if distributed.world_size() > 1:
        raise SegkitError(f"{root}: planning under --nproc would plan once per process. Fix: `segkit plan {root} "
                          f"--out plan.yaml`, then `segkit train plan.yaml --nproc N`.")
    if resume:
        return load_config(folder / "plan.yaml", overrides), {}
    made = make_plan(root, parse_budget(budget) if budget is not None else None, device or "auto",
                     progress=progress, started=started(), declared=declared_reading(overrides))
    typer.echo(made.table() + "\n", err=True)
    raw = made.raw()
    for assignment in overrides:
        set_dotted(raw, assignment)
    return parse_config(raw, f"the plan of {root}"), made.files()
