"""`grouprl train --nproc N`: the single-node shortcut for `torchrun --standalone --nproc-per-node N -m grouprl
train ...`, run through torch's own elastic launcher (the engine torchrun drives), with one line at the end
instead of the launcher's report.

A Ctrl-C reaches the workers forwarded by the launcher (torch starts them in sessions of their own; where
the terminal's copy reaches them too, they count the two once) and each saves the step it is in; the
launcher waits for them up to `distributed.timeout_s` before killing them. When a worker fails, the others
are stopped and the exit code is that of the first failure.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid


def launch(nproc: int, args: list[str], shutdown_timeout_s: float) -> tuple[int, str | None]:
    """Run `python -m grouprl <args>` as nproc processes on this machine; returns (exit code, a line that
    names the first failed rank, or None)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the one line below says it
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the cores shared out, not each rank taking all
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          shutdown_timeout=int(shutdown_timeout_s))
    os.environ["GROUPRL_LAUNCHER_PID"] = str(os.getpid())  # each worker dies with this process (see init)
    try:
        elastic_launch(config, sys.executable)("-m", "grouprl", *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal
            return 1, f"rank {rank} was killed by signal {-code}; the other ranks were stopped"
        if code not in (1, 2, 130):  # not one of grouprl's own exits, which say why themselves
            return code, f"rank {rank} exited with code {code} without a message; the other ranks were stopped"
        return code, None
    except SignalException:
        return 130, None
    return 0, None
