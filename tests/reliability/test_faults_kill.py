"""kill -9 of a stage CLI at a random point, then a rerun of the same command: the result equals an uninterrupted
run with the same seed, nothing is duplicated or lost, and no temporary leftovers remain.

- train: killed after the checkpoint of a random step k; no output of the stage exists yet (the run trains in a
  staging sibling); the rerun resumes from the checkpoint the killed run left (logged: "resumed from ... at step
  k'") and its per-step metrics and final weights equal those of an uninterrupted run. tests/test_rl.py checks `RLTrainer.fit` resume in-process; here it goes through the real CLI processes.
- train on 2 ranks (two rank processes as torchrun would start them, meeting through a file store, FSDP2 on
  gloo over loopback, DCP checkpoints): the same, both ranks killed together after a checkpoint, the rerun on 2 ranks against an uninterrupted 2-rank run; and a 2-rank
  checkpoint with a truncated shard fails the resume on each rank with one `error:` line naming the shard (exit 2).
- evaluate: killed after a random number of result rows (a torn half row is appended, as a kill inside a write
  leaves it); the rerun skips the finished rows and each dataset's rows equal the uninterrupted run's, each id once.
- index (dense): killed after a random number of encoded shards; the rerun reuses exactly the finished shards and
  builds the same FAISS index (bytes) as an uninterrupted build; the previous index stays in place until then.

The uninterrupted references run in this process through the same stage drivers (`run_rl`, `run_evaluate`,
`build_index`). The random point comes from RELIABILITY_SEED when set, else from the clock; it is in every
assertion message so a failure can be replayed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tspo_core.retrieval import read_card

from reliability_support import (Work, deep, diff_snapshots, error_text, file_sha, kill_process,
                                 kill_tree, leftovers, read_json, running, set_dotted, snapshot, tiny_params, wait_for,
                                 without)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2**32))


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def _redirect(raw: dict, root: Path, *keys: str) -> dict:
    """A copy of the params with `paths.<key>` moved under `root` (the reference run's own outputs)."""
    raw = deep(raw)
    for key in keys:
        set_dotted(raw, f"paths.{key}", str(root / key))
    return raw


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------
def test_train_killed_after_a_random_checkpoint_resumes_to_the_uninterrupted_result(work: Work, tmp_path):
    from tspo_core.config import params_from_dict
    from tspo_core.train.checkpoint import load_trainer_state
    from tspo_core.train.rl import run_rl

    steps = 8
    # entropy_coef > 0: every step moves the weights even when all rewards are 0 (the tiny policy rarely scores)
    work.set(**{"train.steps": steps, "train.checkpoint_every": 1, "optim.entropy_coef": 0.01})
    ref_raw = _redirect(work.raw, tmp_path / "ref", "rl_dir")
    reference = run_rl(params_from_dict(ref_raw), "tspo", tmp_path / "ref" / "rl_dir" / "tspo")
    assert len({json.dumps(r["entropy"]) for r in reference}) > 1  # the metrics do vary from step to step

    k = _rng("train").randint(1, steps - 3)  # at least 3 steps left: the kill lands before the end
    where = f"(seed {SEED}: kill after the checkpoint of step {k})"
    out = work.path("rl_dir") / "tspo"
    ckpt = work.path("rl_dir") / ".tspo.next" / "checkpoint"  # a run trains beside the stage's outputs
    proc = work.popen("train", "--estimator", "tspo", log=tmp_path / "killed.log")
    try:
        wait_for(lambda: len(read_json(ckpt / "history.json")) >= k, proc, what=f"checkpoint {k} {where}")
    finally:
        kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, where

    state, history = load_trainer_state(ckpt)  # what the killed run left is a loadable checkpoint
    at = state["step"]
    assert k <= at < steps and len(history) == at, where
    assert not out.exists(), where  # the stage's outputs appear only when the run has ended well
    assert not (work.path("metrics_dir") / "train_tspo.jsonl").exists(), where

    rerun = work.run("train", "--estimator", "tspo")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpt} at step {at}" in rerun.stderr, where

    metrics = work.path("metrics_dir")
    rows = _lines(metrics / "train_tspo.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), where
    assert without(rows) == without(reference), where
    assert file_sha(out / "model" / "model.safetensors") == \
        file_sha(tmp_path / "ref" / "rl_dir" / "tspo" / "model" / "model.safetensors"), where
    summary = read_json(metrics / "detail" / "train_tspo.json")
    tail = reference[-max(1, steps // 5):]
    assert summary["steps"] == steps and read_json(metrics / "train_tspo.json")["steps"] == steps
    assert math.isclose(summary["entropy_last20pct"], sum(r["entropy"] for r in tail) / len(tail), rel_tol=1e-12)
    assert leftovers(work.path("rl_dir")) == [], where  # a checkpoint half-written at the kill is cleaned up
    assert not ckpt.parent.exists(), where  # the staging directory became the stage's output


# ----------------------------------------------------------------------------------------------------------------
# train on 2 ranks
# ----------------------------------------------------------------------------------------------------------------
TWO_RANK = {"train.steps": 5, "train.checkpoint_every": 1, "train.prompts_per_step": 4, "optim.entropy_coef": 0.01}
"""Few steps of the tiny model; 4 questions per step split 2 + 2 over the ranks; entropy_coef > 0: every step moves
the weights even when all rewards are 0."""


def _train_to_end(work: Work, log_dir: Path, timeout: float = 240) -> None:
    """A 2-rank train CLI run to its end (the ranks killed if it outlasts `timeout`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = work.ranks("train", "--estimator", "tspo", log_dir=log_dir)
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            kill_tree(p)
    assert [p.returncode for p in procs] == [0, 0], (log_dir / "rank0.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def two_rank_reference(prefect_api, base_world, tmp_path_factory) -> Work:
    """An uninterrupted 2-rank run of the train CLI (`TWO_RANK` settings) in a copy of the tiny world."""
    root = tmp_path_factory.mktemp("two-rank-ref")
    for part in ("data", "artifacts"):
        shutil.copytree(base_world / part, root / part)
    ref = Work(root, prefect_api, tiny_params(root, TWO_RANK))
    ref.write()
    _train_to_end(ref, root / "train-logs")
    return ref


@pytest.mark.timeout(420)
def test_train_on_two_ranks_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
        two_rank_reference: Work, work: Work, tmp_path):
    """Both ranks SIGKILLed (their process groups) after the checkpoint of a random step k; the rerun on
    2 ranks resumes from the 2-rank DCP checkpoint and its per-step metrics and final weights equal the uninterrupted
    2-rank run's exactly (bit for bit: a 2-rank gloo sum is a + b on both runs; measured, no tolerance needed)."""
    from tspo_core.train.checkpoint import load_trainer_state

    ref = two_rank_reference
    steps = TWO_RANK["train.steps"]
    reference = _lines(ref.path("metrics_dir") / "train_tspo.jsonl")
    assert [r["step"] for r in reference] == list(range(1, steps + 1))
    assert len({json.dumps(r["entropy"]) for r in reference}) > 1  # the metrics do vary from step to step

    work.set(**TWO_RANK)
    k = _rng("train-2-ranks").randint(1, steps - 3)  # at least 3 steps left: the kill lands before the end
    where = f"(seed {SEED}: kill after the checkpoint of step {k})"
    out = work.path("rl_dir") / "tspo"
    ckpt = work.path("rl_dir") / ".tspo.next" / "checkpoint"
    (tmp_path / "killed").mkdir()
    procs = work.ranks("train", "--estimator", "tspo", log_dir=tmp_path / "killed")
    try:
        wait_for(lambda: len(read_json(ckpt / "history.json")) >= k, procs[0], what=f"checkpoint {k} {where}")
    finally:
        for p in procs:  # both ranks at once (each in a process group of its own)
            kill_tree(p)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, where
    ranks = [p.pid for p in procs]
    wait_for(lambda: not any(running(pid) for pid in ranks), timeout=30, what=f"ranks {ranks} gone {where}")

    state, history = load_trainer_state(ckpt)  # what the killed run left is a loadable 2-rank checkpoint
    at = state["step"]
    assert k <= at < steps and len(history) == at and state["world_size"] == 2, where
    assert {"__0_0.distcp", "__1_0.distcp"} <= {f.name for f in (ckpt / "state").iterdir()}, where
    assert not out.exists(), where
    assert not (work.path("metrics_dir") / "train_tspo.jsonl").exists(), where

    _train_to_end(work, tmp_path / "rerun")
    assert f"resumed from {ckpt} at step {at}" in (tmp_path / "rerun" / "rank0.log").read_text(errors="replace"), where

    rows = _lines(work.path("metrics_dir") / "train_tspo.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), where
    assert without(rows) == without(reference), where  # exactly: 2 gloo ranks reduce reproducibly
    assert file_sha(out / "model" / "model.safetensors") == \
        file_sha(ref.path("rl_dir") / "tspo" / "model" / "model.safetensors"), where
    assert read_json(work.path("metrics_dir") / "train_tspo.json") == read_json(ref.path("metrics_dir") /
                                                                                 "train_tspo.json"), where
    assert leftovers(work.path("rl_dir")) == [], where  # a checkpoint half-written at the kill is cleaned up
    assert not ckpt.parent.exists(), where


@pytest.mark.timeout(300)
def test_a_two_rank_checkpoint_with_a_truncated_shard_fails_the_resume_naming_the_file(
        two_rank_reference: Work, work: Work, tmp_path):
    """The finished 2-rank run's checkpoint, rank 1's shard cut in half: a rerun of the same settings resumes from
    it and fails on each rank with exit 2 and one `error:` line naming that shard (the ranks started directly, as
    torchrun would start them: torchrun itself reports any failed rank as its own exit 1)."""
    work.set(**TWO_RANK)
    out = work.path("rl_dir") / "tspo"
    shutil.copytree(two_rank_reference.path("rl_dir") / "tspo", out)
    shard = out / "checkpoint" / "state" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    before = snapshot(work.root)
    procs = work.ranks("train", "--estimator", "tspo", log_dir=tmp_path)
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            kill_tree(p)
    for r, p in enumerate(procs):
        log = (tmp_path / f"rank{r}.log").read_text(errors="replace")
        assert p.returncode == 2, (r, log[-3000:])
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and str(shard) in errors[0] and "cannot resume" in errors[0], (r, errors)
        assert errors[0] == error_text(log).strip(), r
    assert diff_snapshots(before, snapshot(work.root)) == [], "a failed resume changes nothing"


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------
def _complete_rows(run_dir: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in run_dir.glob("*.jsonl"))


def test_evaluate_killed_mid_run_resumes_without_duplicated_or_lost_rows(work: Work, tmp_path):
    from tspo_core.config import params_from_dict
    from tspo_core.evaluate import run_evaluate
    from tspo_core.layout import checkpoint_for

    work.set(**{"eval.batch_size": 1, "eval.subset_size": 4})  # one row appended per question
    ref_params = params_from_dict(_redirect(work.raw, tmp_path / "ref", "eval_dir", "metrics_dir"))
    reference = run_evaluate(ref_params, checkpoint_for(ref_params.paths, "sft"), "sft")
    ref_dir = tmp_path / "ref" / "eval_dir" / "sft"
    ref_rows = {f.stem: _lines(f) for f in ref_dir.glob("*.jsonl")}
    total = sum(len(r) for r in ref_rows.values())
    assert total >= 10

    k = _rng("evaluate").randint(1, total - 6)
    where = f"(seed {SEED}: kill after {k} of {total} rows)"
    run_dir = work.path("eval_dir") / "sft"
    proc = work.popen("evaluate", "--run", "sft", log=tmp_path / "killed.log")
    try:
        wait_for(lambda: _complete_rows(run_dir) >= k, proc, what=f"{k} rows {where}")
    finally:
        kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, where
    done = _complete_rows(run_dir)
    assert k <= done < total, where
    # a kill inside a write leaves a torn last line: add one to the newest file
    newest = max(run_dir.glob("*.jsonl"), key=lambda f: f.stat().st_mtime_ns)
    with open(newest, "ab") as fh:
        fh.write(b'{"id": "torn-row", "question": "half writ')

    rerun = work.run("evaluate", "--run", "sft")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [int(m) for m in re.findall(r"resuming, (\d+) of \d+ examples already evaluated", rerun.stderr)]
    assert sum(resumed) == done, (resumed, where)  # every finished row was kept, none redone

    rows = {f.stem: _lines(f) for f in run_dir.glob("*.jsonl")}
    assert rows.keys() == ref_rows.keys(), where
    for name, expected in ref_rows.items():
        ids = [r["id"] for r in rows[name]]
        assert len(ids) == len(set(ids)), (name, where)  # nothing duplicated
        assert rows[name] == expected, (name, where)  # nothing lost, nothing changed, same order
    metrics = read_json(work.path("metrics_dir") / "detail" / "eval_sft.json")
    assert metrics["datasets"] == reference["datasets"] and metrics["average"] == reference["average"], where
    assert leftovers(work.path("eval_dir")) == [], where


# ----------------------------------------------------------------------------------------------------------------
# index
# ----------------------------------------------------------------------------------------------------------------
def test_index_build_killed_mid_encoding_keeps_finished_shards(work: Work, tmp_path, tiny_dense_index):
    ref_dir, cfg = tiny_dense_index
    work.raw["index"] = dict(cfg)
    work.write()
    index_dir = work.path("index_dir")
    previous = snapshot(index_dir)  # the BM25 index of the working copy: it must stay until the new one is done
    shards = index_dir.parent / f".{index_dir.name}.shards"
    n_passages = sum(1 for _ in open(work.path("data_dir") / "corpus.jsonl", "rb"))
    n_shards = math.ceil(n_passages / cfg["shard_size"])
    assert n_shards >= 8

    k = _rng("index").randint(1, n_shards - 4)
    where = f"(seed {SEED}: kill after {k} of {n_shards} shards)"
    proc = work.popen("index", log=tmp_path / "killed.log")
    try:
        wait_for(lambda: len(read_json(shards / "manifest.json")["shards"]) >= k, proc, what=f"shard {k} {where}")
    finally:
        kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, where
    finished = {int(s) for s in read_json(shards / "manifest.json")["shards"]}
    assert k <= len(finished) < n_shards, where
    assert diff_snapshots(previous, snapshot(index_dir)) == [], where
    assert not (work.path("metrics_dir") / "index.json").exists(), where

    rerun = work.run("index")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    card = read_card(index_dir)  # the card and its run record (shard reuse is a property of this build)
    assert card["kind"] == "dense" and card["num_passages"] == n_passages
    assert card["encoding"]["shards_reused"] == len(finished), where
    assert card["encoding"]["shards_encoded"] == n_shards - len(finished), where
    encoded = {int(m) - 1 for m in re.findall(r"encoded shard (\d+)/\d+", rerun.stderr)}
    assert encoded == set(range(n_shards)) - finished, where  # only the unfinished shards were encoded again
    assert file_sha(index_dir / "index.faiss") == file_sha(ref_dir / "index.faiss"), where
    assert card["probe"]["recall@3"] == read_json(ref_dir / "index_card.json")["probe"]["recall@3"]
    assert not shards.exists(), where  # the work directory is removed once the index is built
    assert leftovers(index_dir.parent) == [], where
