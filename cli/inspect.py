"""`segkit inspect DATA_ROOT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


@app.command()
def inspect(
    root: Annotated[Path, typer.Argument(help="Data folder (images/ + masks/, or train/ val/ test/ splits), or a "
                                              "volume dataset (nnU-Net v2 / MSD dataset.json, or NIfTI in "
                                              "train/images).")],
    config: Annotated[Path | None, typer.Option(help="Read masks as this config's data section says.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Class frequencies, empty/missing/mismatched masks, label overlap, and which head fits; for volumes also
    spacing and shape statistics per case."""
    from segkit.config import load_config
    from segkit.data.inspect import DataGuess, inspect as run
    from segkit.data.inspect_volumes import inspect_volumes
    from segkit.data.io import write_json
    from segkit.data.volumes import is_volume_root

    cfg = load_config(config, [f"data.root={root}"]).data if config is not None else None
    if is_volume_root(root):
        report = inspect_volumes(root, cfg.classes if cfg else None, cfg.ignore_index if cfg else None)
    else:
        report = run(root, DataGuess.from_config(cfg) if cfg else None)
    typer.echo(report.text())
    if json_out is not None:
        write_json(json_out, report.to_dict())
