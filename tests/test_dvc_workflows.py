"""DVC workflows on the tiny config, in a throwaway git copy of the checkout (tests/dvc_support.py): a queued
parameter grid run by DVC's own queue workers and read back with `dvc exp show --json`, and a local DVC remote that
round-trips the stage outputs byte for byte. One `dvc repro sft` (data -> index -> sft, about 50 s on 2 cores) is
shared by both tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from dvc_support import make_project_copy
from tspo_core.config import load_params

pytestmark = pytest.mark.slow

GRID = (0.2, 0.5)  # reward.folr_alpha of the queued experiments
GIT = ["git", "-c", "user.name=tspo test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]


def _env() -> dict[str, str]:
    # the stages' `python` and the queue worker's `dvc` (DVC spawns it by name) must be this environment's
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]), "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "tspo test", "GIT_AUTHOR_EMAIL": "test@localhost",
            "GIT_COMMITTER_NAME": "tspo test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def dvc(project: Path, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=_env(), capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert out.returncode == 0, f"`dvc {' '.join(args)}` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def processes_in(root: Path) -> dict[int, str]:
    """Processes (other than this one) whose working directory or command line is inside `root`."""
    found: dict[int, str] = {}
    root_s = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if cwd == root_s or cwd.startswith(root_s + os.sep) or root_s in cmdline:
            found[int(entry.name)] = f"{cmdline} (cwd {cwd})"
    return found


def wait_no_processes(root: Path, timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_in(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_processes(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def tree_hashes(project: Path, *paths: str) -> dict[str, str]:
    hashes = {}
    for rel in paths:
        top = project / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            hashes[str(f.relative_to(project))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    """The tiny config's data -> index -> sft, run once and committed (dvc.lock), so that experiments start from
    it and only `train@grpo` runs in them. Any process left behind in the copy is killed at the end."""
    root = make_project_copy(tmp_path_factory.mktemp("dvc-workflows") / "project")
    try:
        dvc(root, "repro", "sft", timeout=420)
        subprocess.run([*GIT, "commit", "-q", "-am", "data, index and sft on the tiny config"], cwd=root, check=True)
        yield root
    finally:
        dvc(root, "queue", "stop", "--kill", timeout=60, check=False)
        kill_processes(wait_no_processes(root, 20))


def _queue_tasks(project: Path) -> dict[str, str]:
    """`dvc queue status` as {experiment name: status}."""
    out = dvc(project, "queue", "status", timeout=60).stdout
    rows = [line.split() for line in out.splitlines()]
    return {r[1]: r[-1] for r in rows if len(r) >= 4 and r[0] != "Task" and len(r[0]) == 7}


@pytest.mark.timeout(400)
def test_queued_grid_runs_and_exp_show_lists_params_and_metrics(project):
    queued = dvc(project, "exp", "run", "--queue", "-S", "reward.folr_alpha=" + ",".join(map(str, GRID)),
                 "-S", "train.steps=1", "train@grpo").stdout
    assert queued.count("Queued experiment") == len(GRID), queued
    assert set(_queue_tasks(project).values()) == {"Queued"}

    dvc(project, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 300
    while True:
        tasks = _queue_tasks(project)
        if len(tasks) == len(GRID) and set(tasks.values()) <= {"Success", "Failed"}:
            break
        assert time.monotonic() < deadline, f"queue not done after 300 s: {tasks}"
        time.sleep(3)
    failed = [name for name, status in tasks.items() if status != "Success"]
    assert not failed, "\n".join(dvc(project, "queue", "logs", n, check=False).stdout[-3000:] for n in failed)

    # the queue's workers are DVC's own detached celery processes: stopped, nothing of the copy keeps running
    dvc(project, "queue", "stop", "--kill", timeout=60)
    left = wait_no_processes(project, 30)
    kill_processes(left)
    assert not left, f"processes still running in the project copy after `dvc queue stop --kill`: {left}"

    shown = json.loads(dvc(project, "exp", "show", "--json", timeout=120).stdout)
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]
    exps = {e["name"]: e["revs"][0] for e in baseline["experiments"] or []}
    assert set(exps) == set(tasks), exps.keys()
    seen = {}
    for name, rev in exps.items():
        assert not rev.get("error"), (name, rev["error"])
        params = rev["data"]["params"]["params.yaml"]["data"]
        assert params["train"]["steps"] == 1
        metric = rev["data"]["metrics"].get("metrics/train_grpo.json", {})
        assert "data" in metric, f"{name}: no metrics/train_grpo.json in `dvc exp show --json`: {metric}"
        assert metric["data"]["steps"] == 1 and set(metric["data"]) == {"steps", "em"}, metric  # the headline
        seen[params["reward"]["folr_alpha"]] = name
    assert sorted(seen) == sorted(GRID)
    # the experiments ran outside the workspace: its params and outputs are those of the commit
    assert load_params(project / "params.yaml") == load_params(REPO / "configs" / "tiny.yaml")
    assert not (project / "artifacts" / "rl" / "grpo").exists()


@pytest.mark.timeout(300)
def test_local_remote_round_trips_the_outputs(project, tmp_path):
    cached = ("data", "artifacts", "metrics/sft_curve.csv")  # every cached output of data, index and sft
    before = tree_hashes(project, *cached)
    assert len(before) > 20 and any(k.startswith("artifacts/sft/") for k in before)
    # the run records (timings, dates, absolute paths) live beside the artifacts, outside DVC's hashes and cache
    records = {k for k in before if k.endswith("/run_record.json")}
    assert records == {"artifacts/index/run_record.json", "artifacts/sft/run_record.json"}

    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    pushed = dvc(project, "push", "--with-deps", "sft").stdout
    assert "pushed" in pushed and any(remote.rglob("*")), pushed
    assert "are in sync" in dvc(project, "status", "--cloud", "--with-deps", "sft").stdout

    subprocess.run(["rm", "-rf", ".dvc/cache", "artifacts", "data", "metrics/sft_curve.csv"], cwd=project,
                   check=True)
    assert not (project / "data").exists() and not (project / ".dvc" / "cache").exists()
    pulled = dvc(project, "pull", "--with-deps", "sft").stdout
    assert "added" in pulled or "fetched" in pulled, pulled

    status = dvc(project, "status", "--with-deps", "sft").stdout
    assert "Data and pipelines are up to date." in status, status
    assert tree_hashes(project, *cached) == {k: v for k, v in before.items() if k not in records}
