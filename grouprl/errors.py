"""The one exception type for mistakes a user can make (config, data, paths, reward code).

The CLI turns it into a single line on stderr and a non-zero exit; internal invariants use assert.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line naming what is wrong and what is expected."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the message says how to resume. Exit 130."""


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during a training run: stop at once (exit 130), whatever is running."""
