"""The DVC-declared metrics stay readable (issue 18 item 6): each stage's writer puts a few headline numbers in the
declared metrics file and everything else (per-dataset metrics, timings, environment) in `metrics/detail/`, which
dvc.yaml declares as a plain out. Checked with DVC itself: `dvc metrics show` over every declared file of a run
fits 200 columns, and no declared metric is a timing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


from flows.index import index_metrics
from flows.tracking import dvc_stages
from tspo_core.agent.rewards import CATEGORIES
from tspo_core.config import FAMILIES
from tspo_core.evaluate import average_metrics, compact_metrics
from tspo_core.io import write_json
from tspo_core.layout import detail_path
from tspo_core.train import outputs
from tspo_core.train.sft import compact_summary as sft_compact

from conftest import REPO

DVC = dvc_stages(REPO)
TIMING_WORDS = ("seconds", "elapsed", "time", "meta", "environment")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _write_run(root: Path) -> None:
    """Every declared metrics file (and its detail) of a default run, written by the stages' own writers from full
    records shaped as the stages produce them (values with the most digits DVC prints)."""
    m = root / "metrics"
    probe = {"n_questions": 200, "n_with_support": 200, **{f"{w}@{k}": 0.98765 for w in ("recall", "answer_recall")
                                                              for k in (1, 3, 10)}, "seconds": 0.551}
    compact, full = index_metrics({"num_passages": 21_015_324, "build_time_s": 50.265, "probe": probe})
    write_json(m / "index.json", compact)
    write_json(detail_path(m / "index.json"), full)
    sft = {"trajectories": 3000, "dropped": 12, "imperfect": 600, "premature": 0, "verbose": 450,
           "trajectory_seconds": 31.4, "steps": 1200, "train_seconds": 612.5, "final_loss": 0.123456,
           "final_token_acc": 0.987654, "dev_em": 0.533333, "dev_valid_action_rate": 0.99, "dev_answered_rate": 1.0,
           "dev_searches_mean": 1.23456, "dev_questions": 210.0, "meta": {"environment": {"cpus": 2}}}
    write_json(m / "sft.json", sft_compact(sft))
    write_json(detail_path(m / "sft.json"), sft)
    for est in ("grpo", "tspo"):
        history = [{"step": s, "elapsed_s": 9.5 * s, **{k: 0.123456 * s / 300 for k in outputs.SUMMARY_KEYS}}
                   for s in range(1, 301)]
        run_dir = root / "artifacts" / "rl" / est
        outputs.stage_history(run_dir, m, est, history, final=True)
        outputs.commit(run_dir, run_dir)  # the pending history and summaries onto the metrics paths
    for run in ("sft", "grpo", "tspo"):
        per = {name: {"n": 200, "em": 0.123456, "f1": 0.234567, "cover_em": 0.345678,
                      **{c: 0.25 for c in CATEGORIES}, "answer_in_evidence_rate": 0.5, "answered_rate": 0.99,
                      "turns_mean": 2.12345, "searches_mean": 1.12345, "invalid_action_rate": 0.0123,
                      "response_tokens_mean": 45.678} for name in FAMILIES}
        full = {"datasets": per, "average": average_metrics(per),
                "meta": {"run": run, "seconds": 812.3, "environment": {"cpus": 2}, "skipped": {}}}
        write_json(m / f"eval_{run}.json", compact_metrics(full))
        write_json(detail_path(m / f"eval_{run}.json"), full)


def _declared() -> list[str]:
    return sorted({p for s in DVC.values() for p in s["metrics"]})


def test_declared_metrics_are_few_and_carry_no_timings(tmp_path: Path) -> None:
    _write_run(tmp_path)
    declared = _declared()
    assert declared == sorted(["metrics/index.json", "metrics/sft.json", "metrics/train_grpo.json",
                               "metrics/train_tspo.json", "metrics/eval_sft.json", "metrics/eval_grpo.json",
                               "metrics/eval_tspo.json"])
    columns: set[str] = set()
    for rel in declared:
        flat = _flatten(json.loads((tmp_path / rel).read_text()))
        assert flat and all(isinstance(v, int | float) for v in flat.values()), (rel, flat)
        assert not [k for k in flat if any(w in k for w in TIMING_WORDS)], (rel, flat)
        columns |= set(flat)
        detail = detail_path(rel).as_posix()
        full = _flatten(json.loads((tmp_path / detail).read_text()))
        assert any(any(w in k for w in TIMING_WORDS) for k in full), detail  # timings/environment kept here
        stage = next(s for s, d in DVC.items() if rel in d["metrics"])
        assert detail in DVC[stage]["outs"] and detail not in DVC[stage]["metrics"], (stage, detail)
    assert json.loads((tmp_path / "metrics/eval_tspo.json").read_text()).keys() == {"em", "f1", "cover_em",
                                                                                    *FAMILIES}
    assert len(columns) <= 16, sorted(columns)


def test_dvc_metrics_show_fits_200_columns(tmp_path: Path) -> None:
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.is_file():
        dvc = shutil.which("dvc")
    assert dvc, "dvc is a base dependency"
    _write_run(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([str(dvc), "metrics", "show"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.rstrip("\n").splitlines()
    assert len(lines) == 1 + len(_declared()), out.stdout  # a header and one row per declared file
    assert max(len(line) for line in lines) <= 200, out.stdout
    assert "seconds" not in out.stdout and "environment" not in out.stdout
