"""Stopping child processes we started (servers, workers, DVC), by PID: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> int | None:
    """Terminate `proc` if it still runs, wait up to `grace_s`, kill it if it has not exited; returns its exit code.
    Only the given process is signalled (never a process group or a name match)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode
