"""What keeps a run safe while it trains: one writer per output_dir, and stops that save before they exit.

`RunLock` is an OS file lock (flock) on `<output_dir>/.lock`. The kernel drops it when the holder exits,
however it dies, so a killed run never needs manual unlocking; a second writer is refused with the
holder's pid. `StopSignals` turns the first SIGINT/SIGTERM into a request that the loop honours after the
current step (it writes a checkpoint and exits 130); a second one stops at once (StopNow). `write_atomic`
writes a file whole or not at all; `die_with_parent` ends a worker with the process that started it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

from grouprl.errors import StopNow, UserError

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive lock on an output folder, held until release() or the process's end."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.fd: int | None = None
        self.made_folder = False  # this lock created output_dir (so a failed start may remove it again)

    def acquire(self) -> RunLock:
        folder = self.path.parent
        for _ in range(10):  # the lock file can be removed between our open and our flock: then try again
            try:
                self.made_folder = self.made_folder or not folder.exists()
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link: ELOOP
            except OSError as e:
                if self.path.is_symlink():
                    raise UserError(f"{str(self.path)!r} is a symbolic link: a run folder from elsewhere may not "
                                    "have grouprl write through it; remove the link") from None
                raise UserError(f"output_dir {str(folder)!r} cannot be created or written ({e.strerror}): "
                                "expected a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"output_dir {str(folder)!r} is in use by another grouprl process (pid {holder}): "
                                "wait for it to finish or stop it, or choose another output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)
        raise UserError(f"output_dir {str(folder)!r}: could not take its lock (another process keeps removing it)")

    def release(self, remove_empty_folder: bool = False) -> None:
        """Unlock; with remove_empty_folder, a folder this lock created that holds nothing but the lock file
        is removed first (while still locked, so no other process can be inside it)."""
        if self.fd is None:
            return
        folder = self.path.parent
        if remove_empty_folder and self.made_folder and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignals:
    """Within this context, SIGINT and SIGTERM set `requested` (the signal's name) instead of killing the
    process; a second one raises StopNow (a KeyboardInterrupt). Outside the main thread it does nothing (Python only
    delivers signals there).

    A second signal within `same_request_s` of the first is the same request: where torchrun's workers share
    the terminal's process group (torch 2.13 starts them in sessions of their own), a Ctrl-C reaches each
    worker twice, from the terminal and forwarded by the launcher, milliseconds apart on an idle machine and,
    seen in the test suite on two busy cores, more than half a second apart (the loop allows 2 s)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, same_request_s: float = 0.0, announce: bool = True):
        self.requested: str | None = None
        self.same_request_s, self.announce = same_request_s, announce
        self._at = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            if time.monotonic() - self._at < self.same_request_s:
                return
            raise StopNow
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        if self.announce:
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


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere
    nothing), so that no worker trains on, or holds the run's lock, after a SIGKILL of its launcher.
    `parent`: the pid the caller expects as its parent; if that one is already gone, this process ends now."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # it died before the prctl took hold
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: into a temporary file beside it, flushed to disk, then renamed over
    it, so a kill or a full disk leaves the old file (or none), never a cut-short one."""
    tmp = path.with_name(path.name + ".tmp")
    with open_new(tmp) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_new(path: Path):
    """`path` opened for writing as a new file: whatever is there (a leftover, or a symbolic link a folder from
    elsewhere planted to have us write through it) is removed first, and a link made meanwhile is refused."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w")


RUN_FILES = ("metrics.jsonl", "completions.jsonl", "grouprl.yaml", "run_info.json", "trackers.json",
             "checkpoints", "final", "best", "tensorboard")


def refuse_links(out_dir: Path) -> None:
    """A run folder whose own files or folders are symbolic links (a folder from elsewhere) would have grouprl
    write, append or prune wherever they point: refused, naming the first."""
    for name in RUN_FILES:
        if (out_dir / name).is_symlink():
            raise UserError(f"{str(out_dir / name)!r} is a symbolic link: a run folder from elsewhere may not have "
                            "grouprl write through it; replace the link with the file or folder itself")


def reward_files(reward_names: list[str]) -> dict[str, str]:
    """{file: sha256 of its content} of the user reward (and environment) files a run imports ('path/file.py:name'), so
    that a resume can say which code it is about to run and whether it changed since the run started."""
    import hashlib

    out = {}
    for name in reward_names:
        path, sep, _ = name.removeprefix("verl:").rpartition(":")
        if sep and path.endswith(".py") and Path(path).expanduser().is_file():
            out[path] = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    return out
