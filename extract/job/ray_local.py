"""A local Ray cluster that ends with the driver that started it, even when the driver is SIGKILLed.

``ray.init()`` without an address starts a private cluster: GCS, raylet, dashboard and log processes, and
agents the raylet starts. Ray ties its direct children to the driver (Linux ``PR_SET_PDEATHSIG``), but
the raylet's agents (DashboardAgent, RuntimeEnvAgent) can outlive a driver killed with SIGKILL, which no
handler can catch. :func:`start_local_ray` therefore also starts a small watchdog process that holds the
read end of a pipe whose write end only the driver holds: when the driver exits in any way, the kernel
closes the pipe, and the watchdog stops every process whose command line names the cluster's session
(``/tmp/ray/session_...``) or that holds a file open in the session's directory (agents and workers rename
themselves ``ray::...``, and since Ray 2.5x their environment no longer names the raylet; all of them keep
their log files there open), then exits. :func:`stop_local_ray` shuts Ray down and releases the watchdog.

The watchdog reads ``/proc`` (Linux); elsewhere it is not started and a killed driver can leave Ray's
processes behind (``ray stop`` ends them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["start_local_ray", "stop_local_ray"]

_watchdog: dict[str, object] = {}  # "fd": the pipe's write end, "process": the watchdog

# Runs in its own interpreter (no softclip import: it must work whatever the driver's sys.path was).
_WATCHDOG = r"""
import os, signal, sys, time
session, me, driver = sys.argv[1].encode(), os.getpid(), os.getppid()  # the driver may hold session files too

def read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""

def pids():
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and int(pid) not in (me, driver)]

# The raylet's agents and workers rename themselves (ray::DashboardAgent, ray::IDLE), but each keeps its
# log files in the session's directory open.
def holds_session_file(pid):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if session in os.readlink(f"/proc/{pid}/fd/{fd}").encode():
                return True
        except OSError:
            pass
    return False

sys.stdin.buffer.read()  # returns at EOF: the driver exited (or released us after ray.shutdown)

def members():
    return [pid for pid in pids() if session in read(pid, "cmdline") or holds_session_file(pid)]

for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in members():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while members() and time.monotonic() < deadline:
        time.sleep(0.2)
"""


def start_local_ray(*, num_cpus: int | None = None) -> None:
    """``ray.init`` a private local cluster (no dashboard, worker logs not forwarded) bound to this process:
    see the module docstring. Call :func:`stop_local_ray` to end it."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    node = getattr(ray._private.worker.global_worker, "node", None)  # Ray's own handle of the node it started
    if node is None or not Path("/proc/self/cmdline").exists():
        return
    session = node.session_name  # e.g. session_2026-12-01_10-22-31_098946_30633, in the processes' arguments
    read_end, write_end = os.pipe()  # both not inheritable: Ray's and our other children never hold them
    process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, session], stdin=read_end,
                               start_new_session=True)  # a Ctrl-C to the driver's group leaves it waiting
    os.close(read_end)
    _watchdog.update(fd=write_end, process=process)


def stop_local_ray() -> None:
    """Shut down the cluster :func:`start_local_ray` started; the watchdog then ends any straggler."""
    import ray

    ray.shutdown()
    if "fd" in _watchdog:
        os.close(_watchdog.pop("fd"))
        _watchdog.pop("process").wait()
