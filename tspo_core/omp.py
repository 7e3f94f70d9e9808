"""OpenMP's wait policy (`OMP_WAIT_POLICY`) for processes that pick their own: the retrieval server and the
benchmarks. It must be decided before torch is first imported (OpenMP reads it once, when it loads).

`PASSIVE` makes idle OpenMP threads sleep at once. Where several busy processes share the cores (a retrieval
server beside its clients or the trainer, gloo ranks, tests) this avoids threads spinning on descheduled siblings;
on a quiet machine it costs single-process throughput (README, "Thread policy"). The value `default` asks for
OpenMP's built-in policy (spin briefly, then sleep): it is removed from the environment here, since OpenMP itself
would reject it.
"""

from __future__ import annotations

import os

VAR = "OMP_WAIT_POLICY"


def choose_wait_policy(default: str = "PASSIVE") -> str:
    """Apply `OMP_WAIT_POLICY` for this process: `default` where unset, OpenMP's built-in policy where it is
    `default`, the user's value otherwise. Returns what applies: `PASSIVE`, `ACTIVE` or `default`; pass it on to
    child processes as `OMP_WAIT_POLICY` so they make the same choice."""
    value = os.environ.get(VAR)
    if value is None:
        os.environ[VAR] = value = default
    if value.strip().lower() == "default":
        os.environ.pop(VAR, None)
        return "default"
    return value
