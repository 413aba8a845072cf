"""Private `ray start --head --block` subprocesses for tests that need a real head (job submission, the
Prometheus endpoint): free ports and stopping exactly the head a test started (never `ray stop`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` we started (it tears its node down), then SIGKILL whatever is left in
    its process group. Only this PID and its group: other Ray clusters on the machine are untouched."""
    pgid = proc.pid  # start_new_session=True: the head is its own process-group leader
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)
