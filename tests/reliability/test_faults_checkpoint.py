"""Checkpoint faults through the trainer's public API (`RLTrainer.fit`, `save_checkpoint`, the estimator registry):

- a full disk (in the DCP shards, the history, the final rename) or an unwritable directory while the checkpoint
  of step 3 is written: the checkpoint of step 2 stays
  in place byte for byte, nothing half-written is left beside it, and a new trainer resumes from it to the same
  final weights as an uninterrupted run;
- a NaN / inf loss at one step: that step's optimizer update is skipped and logged, training continues, and no
  checkpoint written along the way holds a non-finite weight or optimizer moment.

The trainer is the tiny Qwen2 of tests/test_rl.py's size over the shared fakes (tests/fakes.py: tokenizer and
dict retriever); `optim.entropy_coef > 0` so every step changes the weights even when every reward is 0.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from reliability_support import diff_snapshots, leftovers, snapshot, without

pytestmark = pytest.mark.reliability

POISON_STEP = 2  # 1-based step whose loss is made non-finite
PROMPTS = 4


def make_trainer(steps: int = 4, estimator: str = "tspo"):
    from fakes import PASSAGES, DictRetriever, tokenizer
    from tspo_core.agent.backends import HFBackend
    from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
    from tspo_core.config import AdvantageConfig, OptimConfig, RewardConfig, RolloutConfig, TinyModelConfig, \
        TrainConfig
    from tspo_core.data.schema import QAExample
    from tspo_core.policy import build_tiny_model
    from tspo_core.train.rl import RLSettings, RLTrainer

    tok = tokenizer()
    tiny = TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=2)
    model, ref = build_tiny_model(tiny, tok, seed=0), build_tiny_model(tiny, tok, seed=0)
    engine = RolloutEngine(HFBackend(model, tok), tok, DictRetriever(PASSAGES),
                           RolloutSettings(max_turns=2, max_new_tokens_per_turn=10, top_k=1,
                                           prompt_template="compact"))
    questions = [QAExample(f"q{i}", q, [a]) for i, (q, a) in
                 enumerate([("Where was Bobani born", "Kalora"), ("Where was Mitu born", "Bo")] * 3)]
    cfg = RLSettings(RolloutConfig(group_size=3, temperature=1.0), RewardConfig(folr_alpha=0.5),
                     AdvantageConfig(estimator=estimator),
                     OptimConfig(lr=1e-2, warmup_ratio=0.0, entropy_coef=0.05),
                     TrainConfig(steps=steps, prompts_per_step=PROMPTS, mini_batch_size=64, micro_batch_size=64,
                                 checkpoint_every=1, seed=0))
    return RLTrainer(model, ref, tok, engine, questions, cfg)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[dict]]:
    tr = make_trainer()
    tr.fit(tmp_path_factory.mktemp("uninterrupted") / "checkpoint")
    return weights(tr), tr.history


# ----------------------------------------------------------------------------------------------------------------
# disk full / unwritable directory while checkpointing
# ----------------------------------------------------------------------------------------------------------------
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_weights(monkeypatch, trainer, nth):
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def save(state_dict, *a, checkpoint_id, **kw):
        if nth():  # the disk fills up half-way through the model and optimizer shard
            shard = Path(checkpoint_id) / "__0_0.distcp"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shard))
        return real(state_dict, *a, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(dcp, "save", save)


def _fail_history(monkeypatch, trainer, nth):
    real = Path.write_text

    def write_text(self, *a, **kw):
        if self.name == "history.json" and nth():
            real(self, "[{\"step\": 1, ", encoding="utf-8")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)


def _fail_swap(monkeypatch, trainer, nth):
    import tspo_core.io as tio

    real = tio.os.replace

    def replace(src, dst, *a, **kw):  # the rename of the finished temporary directory onto `checkpoint`
        if Path(dst).name == "checkpoint" and Path(src).name.startswith(".checkpoint.") and \
                str(src).endswith(".tmp") and nth():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(tio.os, "replace", replace)


def _unwritable(monkeypatch, trainer, nth):
    import tspo_core.io as tio

    real = tio.tempfile.mkdtemp

    def mkdtemp(*a, **kw):  # the directory refuses new entries (a read-only mount; root ignores chmod)
        if str(kw.get("prefix", "")).startswith(".checkpoint.") and nth():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kw.get("dir")))
        return real(*a, **kw)

    monkeypatch.setattr(tio.tempfile, "mkdtemp", mkdtemp)


@pytest.mark.parametrize("inject", [_fail_weights, _fail_history, _fail_swap, _unwritable],
                         ids=["enospc-in-weights", "enospc-in-history", "enospc-in-final-rename",
                              "eacces-unwritable-dir"])
def test_failed_checkpoint_write_keeps_the_previous_one(inject, tmp_path, monkeypatch, uninterrupted):
    from tspo_core.train.checkpoint import CheckpointError, load_trainer_state

    ckpt = tmp_path / "run" / "checkpoint"
    trainer = make_trainer()
    saves = {"n": 0}

    def third_save() -> bool:  # the checkpoint of step 3 fails
        saves["n"] += 1
        return saves["n"] == 3

    inject(monkeypatch, trainer, third_save)
    kept: dict[str, str] = {}

    def on_step(rec, history):  # before step 3's save, step 2's checkpoint is on disk
        if rec["step"] == 3:
            kept.update(snapshot(ckpt))

    with pytest.raises(CheckpointError) as err:
        trainer.fit(ckpt, on_step=on_step)
    monkeypatch.undo()
    assert str(ckpt) in str(err.value) and "previous one is intact" in str(err.value)
    assert kept and diff_snapshots(kept, snapshot(ckpt)) == []  # step 2's checkpoint, byte for byte
    assert leftovers(ckpt.parent) == []  # no half-written directory beside it
    state, history = load_trainer_state(ckpt)
    assert state["step"] == 2 and [h["step"] for h in history] == [1, 2]

    resumed = make_trainer()
    resumed.fit(ckpt)
    ref_weights, ref_history = uninterrupted
    assert without(resumed.history) == without(ref_history)
    w = weights(resumed)
    assert all(torch.equal(w[k], ref_weights[k]) for k in ref_weights)




@pytest.mark.parametrize("where", ["torch.save", "dcp-writer"])
def test_real_disk_full_errors_become_checkpoint_errors(where, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from tspo_core.train.checkpoint import CheckpointError

    trainer = make_trainer(steps=1)
    if where == "torch.save":
        def full(*a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", full)
    else:  # DCP's file writer hits a full disk: DCP wraps it in its CheckpointException (a BaseException)
        def full(*a, **kw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        trainer.save(tmp_path / "checkpoint")
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# NaN / inf loss
# ----------------------------------------------------------------------------------------------------------------
POISON = {"value": float("nan")}


def _poisoned_estimator(**kw):
    """The tspo estimator, except that the advantages of step POISON_STEP are POISON["value"] on policy tokens
    (the step is recognized from the group ids: step s uses ids s * prompts_per_step + ...)."""
    from tspo_core.agent.advantages import get_advantage

    adv = get_advantage("tspo")(**kw)
    if int(kw["group_ids"].min()) // PROMPTS == POISON_STEP - 1:
        adv = adv.clone()
        adv[kw["policy_mask"].bool()] = POISON["value"]
    return adv


def _register_poison() -> str:
    from tspo_core.agent.advantages import advantage_names, register_advantage

    name = "reliability_poisoned_tspo"
    if name not in advantage_names():
        register_advantage(name)(_poisoned_estimator)
    return name


def _all_finite(ckpt: Path) -> bool:
    """Every tensor of the checkpoint's DCP state (weights and optimizer moments) is finite."""
    from tspo_core.train.checkpoint import read_tensors

    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    found = list(tensors(read_tensors(ckpt)))
    return len(found) > 10 and all(torch.isfinite(t).all() for t in found)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_loss_step_is_skipped_logged_and_never_checkpointed(value, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(POISON, "value", value)
    trainer = make_trainer(estimator=_register_poison())
    ckpt = tmp_path / "checkpoint"
    seen: list[tuple[int, bool]] = []
    before: dict[int, dict] = {}

    def on_step(rec, history):
        before[rec["step"]] = weights(trainer)
        if ckpt.exists():  # the checkpoint of the previous step
            seen.append((rec["step"] - 1, _all_finite(ckpt)))

    with caplog.at_level(logging.WARNING, logger="tspo_core.train"):
        history = trainer.fit(ckpt, on_step=on_step)
    seen.append((len(history), _all_finite(ckpt)))

    assert [h["step"] for h in history] == [1, 2, 3, 4]  # training went on after the bad step
    assert [h["skipped_nonfinite"] for h in history] == [0.0, 1.0, 0.0, 0.0]
    assert any("non-finite loss or gradient, optimizer step skipped" in r.getMessage() for r in caplog.records)
    assert history[1]["loss"] is None  # the bad step's loss is recorded as null (JSON has no NaN)
    json.dumps(history, allow_nan=False)  # the history is valid JSON
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(history) if i != 1)
    # the skipped step left the weights as they were after step 1; the next steps changed them again
    assert all(torch.equal(before[1][k], before[2][k]) for k in before[1])
    assert any(not torch.equal(before[3][k], before[4][k]) for k in before[3])
    assert seen == [(1, True), (2, True), (3, True), (4, True)]  # every checkpoint finite, weights and moments
    shutil.rmtree(ckpt)
