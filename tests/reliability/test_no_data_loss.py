"""Issue 19: finished results survive a failed run, and every failure of a stage CLI is one line.

- RL: a run of other settings that dies after its first checkpoint leaves every output of the finished run
  byte-identical (checkpoint, model, `train_<estimator>.{jsonl,csv,json}`): it trained in a staging sibling. Its
  rerun resumes from that staging checkpoint and, having ended well, replaces all four outputs together.
- The stage CLI's top-level handler (`flows.common.main`): an internal error inside a Prefect task is one
  `error: internal error ...` line naming the file and line, exit 1, no traceback on the console (it goes to the log
  file named in the line, or to the console with `--debug`); bad input is exit 2 and is never retried, while a
  transient error is.

The bad-input cases of issue 19 (overlapping paths, numerically impossible settings, RL nonsense, broken
checkpoints) are in test_bad_input.py with the others.
"""

from __future__ import annotations

import json
import logging
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from reliability_support import PY, Work, diff_snapshots, error_text, file_sha, leftovers, read_json, snapshot

pytestmark = pytest.mark.reliability


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_a_failed_run_of_other_settings_leaves_the_finished_run_intact(work: Work, monkeypatch, caplog):
    from tspo_core.config import params_from_dict
    from tspo_core.train.checkpoint import load_trainer_state
    from tspo_core.train.rl import RLTrainer, run_rl

    out, metrics = work.path("rl_dir") / "tspo", work.path("metrics_dir")
    work.set(**{"train.steps": 2, "train.checkpoint_every": 1, "optim.entropy_coef": 0.01})
    run_rl(params_from_dict(work.raw), "tspo", out, metrics_dir=metrics)  # the finished run A
    finished = {rel: sha for rel, sha in snapshot(work.root).items()}
    assert {"artifacts/rl/tspo/checkpoint/state/__0_0.distcp", "artifacts/rl/tspo/model/model.safetensors",
            "metrics/train_tspo.jsonl", "metrics/train_tspo.csv", "metrics/train_tspo.json"} <= set(finished)

    # run B (other settings) dies in its third step, after the checkpoints of steps 1 and 2
    work.set(**{"train.steps": 4, "optim.lr": 2e-6})
    params_b = params_from_dict(work.raw)
    real_step = RLTrainer.train_step

    def crash_in_step_three(self):
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return real_step(self)

    with monkeypatch.context() as mp:
        mp.setattr(RLTrainer, "train_step", crash_in_step_three)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_rl(params_b, "tspo", out, metrics_dir=metrics)
    changes = diff_snapshots(finished, snapshot(work.root))
    staging = "artifacts/rl/.tspo.next/"
    assert changes and all(c[2:] == "params.yaml" or c[2:].startswith(staging) for c in changes), changes

    # its rerun resumes from the staging checkpoint and replaces all outputs together
    with caplog.at_level(logging.INFO, logger="tspo_core"):
        history = run_rl(params_b, "tspo", out, metrics_dir=metrics)
    assert f"resumed from {work.path('rl_dir') / '.tspo.next' / 'checkpoint'} at step 2" in caplog.text
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    state, ckpt_history = load_trainer_state(out / "checkpoint")
    assert state["step"] == 4 and ckpt_history == history
    assert _lines(metrics / "train_tspo.jsonl") == history
    assert read_json(metrics / "train_tspo.json")["steps"] == 4
    assert (metrics / "train_tspo.csv").read_text().count("\n") == 5  # header + 4 steps
    from safetensors.torch import load_file

    from tspo_core.train.checkpoint import read_tensors

    final, last = load_file(str(out / "model" / "model.safetensors")), read_tensors(out / "checkpoint")["model"]
    assert final and all(torch.equal(v, last[k]) for k, v in final.items())  # the model is the last checkpoint
    assert file_sha(out / "model" / "model.safetensors") != finished["artifacts/rl/tspo/model/model.safetensors"]
    assert not (work.path("rl_dir") / ".tspo.next").exists() and not (out / ".pending").exists()
    assert leftovers(work.path("rl_dir")) == [] and leftovers(metrics) == []


# ----------------------------------------------------------------------------------------------------------------
# the top-level handler of the stage CLIs, on a stand-in stage that fails inside a real Prefect task
# ----------------------------------------------------------------------------------------------------------------
STAND_IN = textwrap.dedent('''
    """A stage CLI (flows.common.main) whose task fails as FAIL says; every attempt appends a line to ATTEMPTS."""
    import os
    from prefect import flow, task
    from flows.common import main, retry_unless_bad_input
    from tspo_core.errors import DataError

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
    def work(params_path: str) -> None:
        with open(os.environ["ATTEMPTS"], "a") as fh:
            fh.write("attempt\\n")
        kind = os.environ["FAIL"]
        if kind == "input":
            raise DataError("duplicate id 'q7' (first on line 2)", "inputs/train.jsonl", 9)
        if kind == "transient":
            raise ConnectionError("retrieval server went away")
        {}["missing"]  # an internal error: a bug, not bad input

    @flow(name="report")
    def stand_in(params_path: str = "params.yaml") -> None:
        work(params_path)

    if __name__ == "__main__":
        main(stand_in, "stand-in stage")
''')


@pytest.fixture
def stand_in(work: Work, tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")

    def run(fail: str, *args: str) -> tuple[subprocess.CompletedProcess, int]:
        attempts = tmp_path / f"attempts-{fail}-{len(args)}"
        work.api.wait()
        env = work.env({"FAIL": fail, "ATTEMPTS": str(attempts), "TSPO_LOG_DIR": str(tmp_path / "logs")})
        proc = subprocess.run([PY, str(script), "--params", str(work.params_path), *args], cwd=work.root, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc, attempts.read_text().count("attempt")
    return run


def test_an_internal_error_is_one_line_naming_where_with_the_traceback_in_the_log(stand_in, work: Work, tmp_path):
    before = snapshot(work.root)
    proc, attempts = stand_in("internal")
    message = error_text(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert message.startswith("error: internal error in stage report: KeyError: 'missing' at ") \
        and message.count("\n") == 1, message
    assert "stand_in.py:" in message  # the file and line it was raised at
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # Prefect's console logs included
    log = Path(message.rsplit("traceback in ", 1)[1].strip())
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "KeyError" in log.read_text()
    assert attempts == 3  # not bad input: Prefect retried it (retries=2)
    assert diff_snapshots(before, snapshot(work.root)) == []

    debug, _ = stand_in("internal", "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_bad_input_is_exit_2_and_never_retried(stand_in):
    proc, attempts = stand_in("input")
    message = error_text(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message == "error: inputs/train.jsonl:9: duplicate id 'q7' (first on line 2)\n"
    assert "Traceback" not in proc.stderr
    assert attempts == 1

    transient, attempts = stand_in("transient")
    assert transient.returncode == 1 and attempts == 3  # a transient failure is retried
    assert "ConnectionError: retrieval server went away" in error_text(transient.stderr)
