"""Shared by the tests that run real DVC commands: a throwaway git copy of this checkout configured with
configs/tiny.yaml (tests/test_orchestration.py, tests/test_dvc_workflows.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import REPO
from tspo_core.config import dump_params, load_params


def make_project_copy(dest: Path) -> Path:
    """A git repository with this checkout's files (tracked and untracked, not ignored) and params.yaml =
    configs/tiny.yaml resolved: a throwaway workspace for `dvc repro` / `dvc exp run`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    (dest / "params.yaml").write_text(dump_params(load_params(REPO / "configs" / "tiny.yaml")), encoding="utf-8")
    git = ["git", "-c", "user.name=tspo test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot for the orchestration test"], cwd=dest, check=True)
    return dest
