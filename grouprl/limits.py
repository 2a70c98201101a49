"""Time limits for user code (reward functions, math-verify) in a process that must stay responsive.

`time_limit` stops Python code with SIGALRM and nests (an enclosing limit still fires on time);
`watchdog` ends the whole process with one `error:` line when code cannot be stopped (a blocking C call,
or a call outside the main thread). Both are used by rewards.py around every reward call.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time

# How long past its timeout a reward call may run before the watchdog ends the process. The alarm stops
# Python code at the timeout; only code stuck in C, or a call outside the main thread, gets this far.
WATCHDOG_GRACE_S = 3.0


class Timeout(BaseException):
    """Raised inside the timed code by `time_limit`'s alarm; it carries its `Limit`. A BaseException so
    that an `except Exception` in reward code or in math-verify does not swallow it."""


class Limit:
    """One `time_limit`. `expired` is set by the alarm itself, so a timeout that the timed code caught and
    ignored is still seen; `closing` makes an alarm that comes while the limit is being lifted do nothing."""

    def __init__(self) -> None:
        self.expired = self.closing = False


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Stop the body with SIGALRM (raised as `Timeout`) after `seconds`, then carry on after the `with`
    with `limit.expired` set. No limit with None or outside the main thread, where signals are unavailable.

    Limits nest: an enclosing limit that falls due first still fires on time (the alarm is passed on to its
    handler), and on exit the previous handler and the rest of the previous timer are put back."""
    limit = Limit()
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield limit
        return
    start = time.monotonic()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]  # 0.0: no timer running
    outer_first = 0 < outer_left < seconds
    previous = signal.getsignal(signal.SIGALRM)
    passed_on = False

    def on_alarm(signum, frame):
        nonlocal passed_on
        if limit.closing:
            return
        if outer_first and not passed_on:  # the enclosing limit's turn; ours comes next, should it return
            passed_on = True
            signal.setitimer(signal.ITIMER_REAL, max(start + seconds - time.monotonic(), 1e-6))
            if callable(previous):
                previous(signum, frame)
            return
        limit.expired = True
        raise Timeout(limit)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, outer_left if outer_first else seconds)
    try:
        yield limit
    except Timeout as e:
        if e.args[0] is not limit:
            raise  # an enclosing limit's: its owner handles it
    finally:
        limit.closing = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0 and not passed_on:  # the enclosing timer, less the time spent here (due now: at once)
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-6))


@contextlib.contextmanager
def watchdog(seconds: float | None, message: str):
    """End the process (exit code 2, 'error: <message>' on stderr) if the body still runs after `seconds`.

    The last resort where `time_limit` cannot reach: a blocking C call that ignores signals, or a call
    outside the main thread. A thread cannot be stopped from outside, so the whole process ends. Nothing
    saved is lost: checkpoints are written to a temporary folder and renamed into place.

    C code that holds the GIL and never returns to the interpreter (a huge bigint power) stops every Python
    thread, this one included. For that, faulthandler's C-level timer ends the process WATCHDOG_GRACE_S later
    still: 'Timeout' and every thread's traceback (the reward function's frame among them), exit code 1."""
    if seconds is None:
        yield
        return
    timer = threading.Timer(seconds, die, args=(message,))
    timer.daemon = True
    timer.start()
    # one such timer per process, which is enough: reward calls run one at a time. fd 2, since sys.stderr
    # may have no file descriptor (a notebook, captured output)
    faulthandler.dump_traceback_later(seconds + WATCHDOG_GRACE_S, exit=True, file=2)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def die(message: str) -> None:
    # os.write, not print: the stuck thread may hold sys.stderr's lock; os._exit, since the stuck thread
    # would keep a normal exit waiting forever.
    os.write(2, f"error: {message}\n".encode())
    os._exit(2)
