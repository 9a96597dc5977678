"""`segkit compare CONFIG` and `segkit convert-head CHECKPOINT OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import app


def _ints(text: str, option: str) -> list[int]:
    from segkit.errors import SegkitError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SegkitError(f"{option} {text!r}: expected integers separated by commas, e.g. 0,1,2.") from None


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="YAML config describing the data (its head, loss, thresholds and class weights are ignored).")],
    out: Annotated[Path | None, typer.Option(help="Report folder; default runs/compare-<config name>.")] = None,
    heads: Annotated[str, typer.Option(help="Heads to train, comma-separated.")] = "softmax,sigmoid",
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs for every run.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated: one run per head per seed.")] = "0",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (dotted path).")] = None,
    include_degenerate: Annotated[bool, typer.Option("--include-degenerate",
                                                     help="Add the 1-channel softmax mistake as a row.")] = False,
    write_thresholds: Annotated[bool, typer.Option("--write-thresholds",
                                                   help="Store the best sigmoid thresholds in its checkpoints.")] = False,
    softmax_exclusive: Annotated[bool, typer.Option(
        "--softmax-exclusive", help="Overlapping data: also train softmax with overlapping pixels ignored "
                                    "(labelled as such).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """Train softmax and sigmoid heads on the same data and seeds; write report.md/json and figures."""
    from segkit.compare import compare as run, load_compare_config

    cfg = load_compare_config(config, list(set_ or []))
    report, summary = run(cfg, out or Path("runs") / f"compare-{config.stem}",
                          heads=[h.strip() for h in heads.split(",") if h.strip()], seeds=_ints(seeds, "--seeds"),
                          epochs=epochs, include_degenerate=include_degenerate, tune_thresholds=write_thresholds,
                          softmax_exclusive=softmax_exclusive, progress=progress)
    typer.echo(summary["conclusion"])
    typer.echo(f"report: {report}")


@app.command("convert-head")
def convert_head(
    checkpoint: Annotated[Path, typer.Argument(help="A 2-class softmax checkpoint folder.")],
    out: Annotated[Path, typer.Argument(help="New folder for the equivalent 1-channel sigmoid checkpoint.")],
) -> None:
    """Turn a 2-class softmax checkpoint into the exactly equivalent 1-channel sigmoid one."""
    from segkit.convert import softmax_to_sigmoid

    typer.echo(f"sigmoid checkpoint: {softmax_to_sigmoid(checkpoint, out)}")
