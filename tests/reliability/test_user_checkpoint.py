"""Evaluating a user's own checkpoint through the stage CLI (`flows.evaluate --checkpoint DIR --run NAME`)."""

from __future__ import annotations

import shutil

import pytest
from reliability_support import Work, error_text, read_json

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_evaluate_a_checkpoint_from_anywhere_under_its_own_run_name(work: Work, tmp_path):
    work.set(**{"eval.subset_size": 3})
    mine = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(work.path("sft_dir"), mine)  # the same weights, in a directory the pipeline does not know

    ref = work.run("evaluate", "--run", "sft")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = work.run("evaluate", "--run", "mine", "--checkpoint", str(mine))
    assert out.returncode == 0, out.stderr[-3000:]

    got = read_json(work.path("metrics_dir") / "detail" / "eval_mine.json")
    expected = read_json(work.path("metrics_dir") / "detail" / "eval_sft.json")
    assert got["meta"]["checkpoint"] == str(mine)
    assert got["average"] == expected["average"]  # same weights, greedy: the same scores
    assert sorted(p.name for p in (work.path("eval_dir") / "mine").glob("*.jsonl")) == \
        sorted(p.name for p in (work.path("eval_dir") / "sft").glob("*.jsonl"))


def test_a_missing_user_checkpoint_is_named(work: Work, tmp_path):
    missing = tmp_path / "no-such-model"
    out = work.run("evaluate", "--run", "mine", "--checkpoint", str(missing))
    assert out.returncode == 2
    assert str(missing) in error_text(out.stderr)
    assert not (work.path("metrics_dir") / "eval_mine.json").exists()
