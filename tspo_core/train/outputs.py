"""The outputs of an RL run change together or not at all.

A stage `train@<estimator>` has four outputs: the training checkpoint and the final model (`<rl_dir>/<estimator>/
{checkpoint,model}`), the per-step history (`<metrics_dir>/train_<estimator>.{jsonl,csv}`) and its summary
(`<metrics_dir>/train_<estimator>.json`, its full form in `<metrics_dir>/detail/`). A finished run's outputs must
survive a later run that fails, so:

- a run whose settings differ from the finished run's (or with no finished run) trains in a staging sibling,
  `<rl_dir>/.<estimator>.next/`, never in the finished run's directory; its history is written there after every
  step (under `.pending/`, with the metrics paths it is destined for), so a kill leaves the finished run untouched
  and the next run of the same settings resumes from the staging checkpoint;
- only a run that ended well is committed: the staging directory replaces `<rl_dir>/<estimator>` (two renames,
  `tspo_core.io.replace_dir`) and its pending history and summary are then moved onto the metrics paths
  (`tspo_core.io.finish_pending`; a kill between the two is completed by the next run, before anything else);
- a rerun of the finished run's own settings resumes it in place (nothing left to train) and rewrites the same
  outputs.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tspo_core.io import (PENDING_DIR, finish_pending, pending_file, replace_dir, restore_interrupted_swap,
                          scalar_columns, write_csv, write_json, write_jsonl)
from tspo_core.layout import detail_path
from tspo_core.runinfo import environment

SUMMARY_KEYS = ("reward_mean", "em", "folr_share", "zero_var_share_o", "zero_var_share_s", "kl", "entropy")
"""Per-step metrics averaged over the last 20% of the steps in `train_<estimator>.json`."""


def staging_dir(out_dir: str | Path) -> Path:
    """Where a run that is not the finished one trains: a hidden sibling of `out_dir`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.next")


def recover(out_dir: str | Path) -> None:
    """Complete what a killed commit left: the previous directory moved aside (put back), or the history and
    summary not yet moved onto the metrics paths (moved now)."""
    restore_interrupted_swap(out_dir)
    finish_pending(out_dir)


def history_paths(metrics_dir: str | Path, estimator: str) -> tuple[Path, Path, Path]:
    """(jsonl history, csv history, json summary) of `train@<estimator>`."""
    base = Path(metrics_dir) / f"train_{estimator}"
    return base.with_suffix(".jsonl"), base.with_suffix(".csv"), base.with_suffix(".json")


def write_history(jsonl: str | Path, csv: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
    """The whole history as JSON lines and its scalar columns as CSV (for `dvc plots`), each file atomically."""
    rows = [dict(h) for h in history]
    write_jsonl(jsonl, rows)
    write_csv(csv, rows, scalar_columns(rows))


def training_summary(history: Sequence[Mapping[str, Any]], estimator: str) -> dict[str, Any]:
    """`train_<estimator>.json`: the step count and the `SUMMARY_KEYS` averaged over the last 20% of the steps."""
    tail = history[-max(1, len(history) // 5):]
    return {"estimator": estimator, "steps": history[-1]["step"],
            **{f"{k}_last20pct": sum(h.get(k) or 0.0 for h in tail) / len(tail) for k in SUMMARY_KEYS}}


def compact_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metric `train_<estimator>.json`: `steps` and `em` (the EM of the training rollouts over the last 20%
    of the steps); the whole summary is `detail/train_<estimator>.json`.

    >>> compact_summary({"estimator": "tspo", "steps": 3, "em_last20pct": 0.25, "kl_last20pct": 0.01})
    {'steps': 3, 'em': 0.25}
    """
    return {"steps": summary["steps"], "em": summary["em_last20pct"]}


def stage_history(run_dir: str | Path, metrics_dir: str | Path, estimator: str,
                  history: Sequence[Mapping[str, Any]], final: bool = False) -> None:
    """Write the history (and with `final`, the summary) into `run_dir/.pending`, destined for the metrics paths."""
    jsonl, csv, summary = history_paths(metrics_dir, estimator)
    write_history(pending_file(run_dir, jsonl), pending_file(run_dir, csv), history)
    if final:
        full = training_summary(history, estimator)
        write_json(pending_file(run_dir, summary), compact_summary(full))
        write_json(pending_file(run_dir, detail_path(summary)), {**full, "meta": {"environment": environment()}})


def discard_pending(run_dir: str | Path) -> None:
    """Drop the pending history of a run that will not be resumed (a run of other settings starts afresh)."""
    shutil.rmtree(Path(run_dir) / PENDING_DIR, ignore_errors=True)


def commit(run_dir: str | Path, out_dir: str | Path) -> None:
    """Make the finished run in `run_dir` the stage's outputs: it replaces `out_dir` (unless it is `out_dir`), then
    its pending history and summary replace the metrics files."""
    if Path(run_dir) != Path(out_dir):
        replace_dir(run_dir, out_dir)
    finish_pending(out_dir)
