"""A local Ray started by the driver ends with it, even after SIGKILL (issue 14, row 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_DRIVER = """
import time
from softclip.extract.ray_local import start_local_ray
import ray
start_local_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
print(ray._private.worker.global_worker.node.session_name, flush=True)
time.sleep(600)
"""


def _read(pid: str, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _session_processes(session: str, raylets: list[str] = ()) -> list[str]:
    """Processes of a Ray session: named in their command line, or children of its raylet by environment
    (agents and workers rename themselves ``ray::...``)."""
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmdline = _read(pid, "cmdline")
        if session.encode() in cmdline or marks & set(_read(pid, "environ").split(b"\0")):
            shown = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
            found.append(f"{pid} {shown}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="the watchdog reads /proc (Linux)")
def test_a_sigkilled_driver_leaves_no_ray_process_behind():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
    try:
        session = driver.stdout.readline().strip()
        assert session.startswith("session_"), session
        raylets = [line.split()[0] for line in _session_processes(session) if "/raylet " in line]
        deadline = time.monotonic() + 15
        while not any("DashboardAgent" in line for line in _session_processes(session, raylets)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)  # the raylet starts its agents after ray.init returns
        alive = _session_processes(session, raylets)
        assert raylets and any("DashboardAgent" in line for line in alive) and len(alive) >= 5, alive
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 20
    while _session_processes(session, raylets) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(session, raylets), _session_processes(session, raylets)
