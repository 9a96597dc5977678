"""The Typer application and the one place that turns user errors into messages and exit codes."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time

import typer

from segkit.errors import SegkitError, TrainingError

app = typer.Typer(
    name="segkit",
    help="U-Net segmentation where the output head (softmax or sigmoid) decides everything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_started = time.perf_counter()


def started() -> float:
    """When this command began (`main` sets it; a time budget counts from here)."""
    return _started


def _register() -> None:
    from cli import compare, evaluate, export, inspect, plan, predict, train, visualize  # noqa: F401  (each module adds its command to `app`)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("segkit").setLevel(logging.INFO)


NPROC_COMMANDS = ("train", "predict")
"""Commands that can run as several processes; any other would run N full copies of itself."""


def _pop_nproc(args: list[str]) -> tuple[int, list[str]]:
    """Take `--nproc K` (or `--nproc=K`) out of the arguments of train/predict; a SegkitError for
    any other command, a missing or non-integer value, or K < 1 (never silently one process)."""
    rest, nproc, i = [], None, 0
    while i < len(args):
        if args[i] == "--nproc" or args[i].startswith("--nproc="):
            value = args[i].split("=", 1)[1] if "=" in args[i] else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in args[i] else 2
            try:
                nproc = int(value)
            except ValueError:
                raise SegkitError(f"--nproc {value!r}: not a whole number. "
                                  "Fix: give the number of processes, e.g. --nproc 2.") from None
            continue
        rest.append(args[i])
        i += 1
    if nproc is None:
        return 1, rest
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in NPROC_COMMANDS:
        raise SegkitError(f"--nproc: only {' and '.join(NPROC_COMMANDS)} run several processes "
                          f"('{command or ''}' would run {nproc} full copies of itself). Fix: leave out --nproc.")
    if nproc < 1:
        raise SegkitError(f"--nproc {nproc}: needs at least 1 process. "
                          "Fix: --nproc 1 (the default) or more, e.g. --nproc 2.")
    return nproc, rest


def launch(nproc: int, args: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine, and wait for it.

    A SIGTERM sent to this process alone (a scheduler pre-empting the job) is passed on to torchrun, which
    passes it to the ranks: they finish the step and write last/. A terminal's Ctrl-C already reaches the
    whole process group, so SIGINT is not sent twice."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cli", *args]
    proc = subprocess.Popen(cmd)
    stopped: list[int] = []

    def forward(signum: int, _) -> None:
        stopped.append(signum)
        proc.send_signal(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        code = proc.wait()
        return 128 + signal.SIGTERM if stopped and code else code  # torchrun itself exits 1 on a signal
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> None:
    """The command line (`console` runs it as the program; tests call it): user mistakes exit 2 with the
    message, a stopped training exits 1.

    `--nproc K` on train/predict relaunches the command under torchrun (DDP / sharded files).
    """
    from segkit import distributed

    global _started
    _started = time.perf_counter()
    setup_logging()
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        nproc, args = _pop_nproc(args)
    except SegkitError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    if nproc > 1 and not distributed.launched():
        sys.exit(launch(nproc, args))
    try:
        code = app(args=args, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
        if isinstance(code, int) and code:
            sys.exit(code)
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
    except Exception as err:  # usage errors (Typer's own click) come through here in non-standalone mode
        show, code = getattr(err, "show", None), getattr(err, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


def console() -> None:
    """The `segkit` program (and `python -m cli`, which torchrun's ranks run): `main`, then the process ends at
    once with main's exit status. Python's own teardown of torch's modules took ~1 s after every command that
    loaded torch, and a --budget run's wall time counted it. Every command writes and closes its files before
    main returns; where a thread still runs (a checkpoint or mask write that a Ctrl-C left unfinished), the
    process ends the usual way, which waits for it. An unexpected error ends the usual way too, traceback and all."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as done:
        code = done.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    code = _flushed(code or 0)
    if running_threads():
        sys.exit(code)
    os._exit(code)


def running_threads() -> list[threading.Thread]:
    """The threads besides the main one that Python's own exit would wait for (not daemons)."""
    return [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()]


def _flushed(code: int) -> int:
    """Everything written handed to its file before the process ends: logging's, Python's streams and C's (a
    library's printf). A stream that cannot take it (a full disk) turns a status 0 into 120, as Python's own
    exit does; a reader that went away (`segkit ... | head`) does not."""
    logging.shutdown()
    for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away, a closed stream
            pass
        except OSError as err:
            code = code or 120
            try:
                print(f"error: cannot write {name} ({err.strerror or err})", file=sys.__stderr__, flush=True)
            except (OSError, ValueError):
                pass
    if os.name == "posix":
        ctypes.CDLL(None).fflush(None)
    return code
