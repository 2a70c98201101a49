"""Run under torchrun by tests/test_distributed.py: trains each config named on the command line in turn
(`path.yaml` starts a run, `path.yaml:resume` resumes its output_dir), in one job, so the cost of starting
processes and loading torch is paid once."""

import sys

from rich.console import Console

from grouprl.config import load_config
from grouprl.distributed import shutdown
from grouprl.loop import train

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path, _, mode = arg.partition(":")
        train(load_config(path), console=Console(quiet=True), resume=mode == "resume")
    shutdown()
