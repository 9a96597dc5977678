"""Run control for training: one writer per run folder (`RunLock`), and stop signals that end training
after the current step with last/ written (`StopSignals`, `Interrupted`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from segkit.errors import SegkitError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no run lock (said when training starts)
    fcntl = None

log = logging.getLogger("segkit")

LOCK = ".train.lock"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after the current step; last/ holds the state to resume.

    A KeyboardInterrupt, so that callers training several runs (compare) stop too rather than go on.
    `epoch` (1-based) and `step` say where: `step` steps of `epoch` were done, out of `steps`.
    """

    def __init__(self, signum: int, epoch: int, step: int, steps: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {step}/{steps}")
        self.signum, self.epoch, self.step, self.steps = signum, epoch, step, steps

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (143, 130)."""
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM and SIGINT ask the training loop to stop after its current step instead
    of killing it. After the first, a Ctrl-C (SIGINT) interrupts at once, while further SIGTERMs are
    absorbed: launchers and schedulers often send one to every process and another through torchrun,
    and the grace period ends with SIGKILL anyway. Signals can only be caught on the main thread;
    elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        first, self.signum = not self.signum, self.signum or signum
        signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
        if first:
            log.warning("%s: finishing the current step, then writing last/ (Ctrl-C to stop at once)",
                        signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLock:
    """One writer per run folder: an exclusive flock on RUN/.train.lock, which holds the writer's pid
    and host for the message another run gets. The OS releases a flock when its process dies, so a
    killed run never leaves the folder locked; a stale lock file is simply locked again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, folder / LOCK
        self.fd: int | None = None
        self.tried = False

    def acquire(self) -> None:
        """Lock the (existing) folder, once; a SegkitError naming the folder, the holder and the lock
        file if another process holds it."""
        if self.tried:
            return
        self.tried = True
        if fcntl is None:
            log.warning("%s: no file locks on this system; nothing stops a second training into this folder",
                        self.folder)
            return
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.path.read_text().strip() if self.path.is_file() else ""
                raise SegkitError(f"{self.folder}: another training is writing this run folder "
                                  f"({holder or 'process unknown'}; lock file {self.path}). Fix: wait for it "
                                  "to finish or stop it, or train into another --out.") from None
            except OSError as err:  # a file system without locks: train, but say what is not guarded
                os.close(fd)
                log.warning("%s: cannot lock (%s); nothing stops a second training into this folder",
                            self.path, err.strerror)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
            os.close(self.fd)
            self.fd = None
