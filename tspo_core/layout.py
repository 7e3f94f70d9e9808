"""Names and places of the stages' outputs: run names and the checkpoint each run evaluates, the report's files.

Standard library and `tspo_core.config`/`errors` only, so `flows.common` (every stage) can check paths without
importing the evaluation or report modules (which would make every stage a DVC dependent of them)."""

from __future__ import annotations

import re
from pathlib import Path

from tspo_core.config import PathsConfig
from tspo_core.errors import ConfigError

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

REPORT_NAME = "report.md"
FIGURES: tuple[str, ...] = ("eval_categories.png", "training_curves.png", "zero_variance.png",
                            "training_categories.png")
"""The PNG figures `tspo_core.report.build_report` writes beside the report (each only when it has something to
draw)."""


def check_run_name(run: str) -> None:
    if not _RUN_NAME.match(run):
        raise ConfigError(f"run name {run!r}: use letters, digits, '_', '-', '.' (it names files and directories)")


def checkpoint_for(paths: PathsConfig, run: str) -> Path:
    """The checkpoint a run evaluates: `sft` -> `paths.sft_dir`, any RL run -> `<paths.rl_dir>/<run>/model`."""
    check_run_name(run)
    return Path(paths.sft_dir) if run == "sft" else Path(paths.rl_dir) / run / "model"


DETAIL_DIR = "detail"
"""Beside every DVC-declared metrics file `<metrics_dir>/<name>.json` (a few headline numbers, so `dvc metrics show`
stays readable) the stage writes the full record, `<metrics_dir>/detail/<name>.json`: per-dataset metrics, settings,
timings (`seconds`, `build_seconds`, ...) and the environment. dvc.yaml declares it as a plain output, never as a
metric."""


def detail_path(metrics_file: str | Path) -> Path:
    """`<metrics_dir>/<name>.json` -> `<metrics_dir>/detail/<name>.json` (see `DETAIL_DIR`)."""
    p = Path(metrics_file)
    return p.parent / DETAIL_DIR / p.name
