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
    set_: Annotated[list[str] | None, typer.Option("--set", help="Declare a data key the files cannot tell, e.g. "
                                                               "--set data.ignore_index=255 (as `segkit plan`).")] = None,
) -> None:
    """Class frequencies, empty/missing/mismatched masks, label overlap, and which head fits; for volumes also
    spacing and shape statistics per case; without --config, the plan `segkit plan` would start from."""
    from segkit.config import data_overrides, load_config
    from segkit.data.inspect import inspect_data
    from segkit.data.io import write_json
    from segkit.errors import DataError, SegkitError
    from segkit.plan import make_plan

    if set_ and config is not None:
        raise SegkitError("--set with --config: the config already says how to read the data. Fix: put the key "
                          "in the config, or drop --config.")
    declared = data_overrides(set_ or [], "inspect")
    cfg = load_config(config, [f"data.root={root}"]).data if config is not None else None
    report = inspect_data(root, cfg, declared=declared)
    typer.echo(report.text())
    if cfg is None:
        try:
            typer.echo("\n" + make_plan(root, measure=False, report=report).table())
        except DataError as err:
            typer.echo(f"\nno plan: {err}")
    if json_out is not None:
        write_json(json_out, report.to_dict())
