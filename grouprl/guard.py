"""What keeps a run safe while it trains: one writer per output_dir, and stops that save before they exit.

`RunLock` is an OS file lock (flock) on `<output_dir>/.lock`. The kernel drops it when the holder exits,
however it dies, so a killed run never needs manual unlocking; a second writer is refused with the
holder's pid. `StopSignals` turns the first SIGINT/SIGTERM into a request that the loop honours after the
current step (it writes a checkpoint and exits 130); a second one stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
from pathlib import Path

from grouprl.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive lock on an output folder, held until release() or the process's end."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"output_dir {str(self.path.parent)!r} cannot be created or written "
                            f"({e.strerror}): expected a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output_dir {str(self.path.parent)!r} is in use by another grouprl process (pid "
                            f"{holder}): wait for it to finish or stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignals:
    """Within this context, SIGINT and SIGTERM set `requested` (the signal's name) instead of killing the
    process; a second one raises KeyboardInterrupt. Outside the main thread it does nothing (Python only
    delivers signals there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after the current step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def reward_files(reward_names: list[str]) -> dict[str, str]:
    """{file: sha256 of its content} of the user reward files a run imports ('path/file.py:function'), so
    that a resume can say which code it is about to run and whether it changed since the run started."""
    import hashlib

    out = {}
    for name in reward_names:
        path, sep, _ = name.rpartition(":")
        if sep and path.endswith(".py") and Path(path).expanduser().is_file():
            out[path] = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    return out
