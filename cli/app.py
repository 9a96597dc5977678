"""The Typer application and the one place that turns user errors into messages and exit codes."""

from __future__ import annotations

import logging
import sys

import typer

from segkit.errors import SegkitError, TrainingError

app = typer.Typer(
    name="segkit",
    help="U-Net segmentation where the output head (softmax or sigmoid) decides everything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from cli import compare, evaluate, inspect, predict, train, visualize  # noqa: F401  (each module adds its command to `app`)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("segkit").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes exit 2 with the message, a stopped training exits 1."""
    setup_logging()
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except SegkitError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except TrainingError as err:
        typer.echo(f"training stopped: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except Exception as err:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
