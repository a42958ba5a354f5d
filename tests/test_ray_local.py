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
from softclip.extract.job.ray_local import start_local_ray
import ray
start_local_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
print(ray._private.worker.global_worker.node.session_name, flush=True)
time.sleep(600)
"""


def _ray_processes(before: set[str]) -> list[str]:
    """Processes started since ``before`` that are Ray's: a Ray binary or script in their command line, or
    renamed ``ray::...`` (agents and workers). Found without the watchdog's own rule, so the test checks it."""
    found = []
    for pid in sorted(set(filter(str.isdigit, os.listdir("/proc"))) - before, key=int):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmdline.startswith(b"ray::") or b"/site-packages/ray/" in cmdline:
            found.append(f"{pid} {cmdline[:120].decode(errors='replace')}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="the watchdog reads /proc (Linux)")
def test_a_sigkilled_driver_leaves_no_ray_process_behind():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = set(filter(str.isdigit, os.listdir("/proc")))
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
    try:
        session = driver.stdout.readline().strip()
        assert session.startswith("session_"), session
        # The raylet starts its agents after ray.init returns (slowly on a loaded machine): they are the
        # processes that once outlived a killed driver, so wait for them before the kill.
        deadline = time.monotonic() + 60
        while not any("DashboardAgent" in line for line in _ray_processes(before)) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = _ray_processes(before)
        assert any("DashboardAgent" in line for line in alive) and len(alive) >= 5, alive
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    while _ray_processes(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(before), _ray_processes(before)
