"""`segkit plan ROOT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, started


@app.command()
def plan(
    root: Annotated[Path, typer.Argument(help="Dataset folder (any layout `segkit inspect` reads).")],
    budget: Annotated[str | None, typer.Option(help="Training time, e.g. 30m, 1h, 600 (seconds); without it, "
                                                    "training runs until validation stops improving.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda: the device to measure and plan for.")] = "auto",
    out: Annotated[Path, typer.Option(help="The plan (a segkit config with its reasons); the fingerprint is "
                                           "written beside it as <name>.fingerprint.json.")] = Path("plan.yaml"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar while reading the data.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Declare a data key the files cannot tell, e.g. "
                                                               "--set data.ignore_index=11; the plan reads the "
                                                               "data as it says.")] = None,
) -> None:
    """Read the data once, measure training on the device, and write a complete config whose every choice
    carries its reason; `segkit train plan.yaml` trains it."""
    from segkit.config import data_overrides
    from segkit.data.io import write_bytes
    from segkit.errors import SegkitError
    from segkit.plan import make_plan, parse_budget

    seconds = parse_budget(budget) if budget is not None else None
    fingerprint = out.with_suffix(".fingerprint.json")
    if out.is_dir():
        raise SegkitError(f"--out {out}: a folder. Fix: give a file name, e.g. --out {out / 'plan.yaml'}.")
    for path in (out, fingerprint):  # a plan the user may have edited is never overwritten
        if path.exists():
            raise SegkitError(f"--out {out}: {path} exists. Fix: --out another file, or remove it first.")
    made = make_plan(root, seconds, device, progress=progress, started=started(),
                     declared=data_overrides(set_ or [], "plan"))
    files = made.files()
    write_bytes(out, files["plan.yaml"])
    write_bytes(fingerprint, files["fingerprint.json"])
    typer.echo(made.table())
    typer.echo(f"\nplan:        {out}\nfingerprint: {fingerprint}\ntrain it:    segkit train {out}")
