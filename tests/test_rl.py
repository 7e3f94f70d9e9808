"""The RL trainer on a real tiny model: finite updates, the NaN guard, resume == uninterrupted, 2 ranks == 1."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tspo_core.agent.backends import HFBackend
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import AdvantageConfig, OptimConfig, RewardConfig, RolloutConfig, TinyModelConfig, \
    TrainConfig
from tspo_core.data.schema import Passage, QAExample
from tspo_core.policy import build_tiny_model, build_tokenizer
from tspo_core.train.checkpoint import CheckpointError
from tspo_core.train.lora import apply_lora
from tspo_core.train.rl import Dist, RLSettings, RLTrainer, TrainingError

SYL = ["ba", "bo", "ni", "ka", "lo", "ra", "mi", "tu"]
WORDS = ["Search with query answer Question was born in the city of Doc Title Where"]
CORPUS = {"Bobani": [Passage("1", '"Bobani"\nBobani was born in the city of Kalora.')],
          "Mitu": [Passage("2", '"Mitu"\nMitu was born in the city of Tuni.')]}
QUESTIONS = [QAExample("q0", "Where was Bobani born", ["Kalora"]), QAExample("q1", "Where was Mitu born", ["Tuni"]),
             QAExample("q2", "Where was Bobani born", ["Kalora"]), QAExample("q3", "Where was Mitu born", ["Tuni"])]


class DictRetriever:
    def search(self, queries, top_k):
        return [next((v for k, v in CORPUS.items() if k in q), [])[:top_k] for q in queries]


def make_trainer(estimator="tspo", steps=3, world=1, rank=0, seed=0, dev_sets=None, lora=None, **train_kw):
    """`lora`: a ModelConfig with `lora_r > 0` trains peft adapters (no separate reference: the adapters disabled)."""
    tok = build_tokenizer(WORDS, SYL)
    tiny = TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=2)
    model = build_tiny_model(tiny, tok, seed=seed)
    ref = build_tiny_model(tiny, tok, seed=seed) if lora is None else None
    if lora is not None:
        model = apply_lora(model, lora, seed=seed)
    engine = RolloutEngine(HFBackend(model, tok), tok, DictRetriever(),
                           RolloutSettings(max_turns=2, max_new_tokens_per_turn=12, top_k=1, prompt_template="compact"))
    cfg = RLSettings(RolloutConfig(group_size=4, temperature=1.0), RewardConfig(folr_alpha=0.5),
                     AdvantageConfig(estimator=estimator), OptimConfig(lr=1e-2, warmup_ratio=0.0),
                     TrainConfig(steps=steps, prompts_per_step=4, mini_batch_size=16, checkpoint_every=2,
                                 micro_batch_size=train_kw.pop("micro_batch_size", 8), seed=seed, **train_kw))
    return RLTrainer(model, ref, tok, engine, QUESTIONS, cfg, Dist(rank, world), dev_sets=dev_sets)


def metrics_of(history):
    """The logged rows without the wall-clock timings (`*_s`): what must match between two equivalent runs."""
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_steps_are_finite_change_parameters_and_log_everything():
    tr = make_trainer(steps=2)
    before = params_of(tr)
    rec = tr.train_step()
    for key in ("reward_mean", "em", "folr_share", "zero_var_share_o", "zero_var_share_s", "complete_success",
                "near_miss", "success_without_retrieval", "complete_failure", "kl", "entropy", "clip_frac",
                "response_tokens", "turns", "searches", "step_s", "loss", "grad_norm"):
        assert key in rec and math.isfinite(rec[key]), key
    after = params_of(tr)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert rec["zero_var_share_s"] <= rec["zero_var_share_o"]


def test_micro_batch_size_does_not_change_the_update():
    a, b = make_trainer(micro_batch_size=16), make_trainer(micro_batch_size=3)
    exp = a.collect(0)
    a.update(exp)
    b.update(exp)
    pa, pb = params_of(a), params_of(b)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


def test_nonfinite_loss_is_skipped_and_parameters_stay_finite():
    tr = make_trainer()
    exp = tr.collect(0)
    exp.advantages[exp.batch.tensors.policy_mask.bool()] = float("nan")
    before = params_of(tr)
    metrics = tr.update(exp)
    assert metrics["skipped_nonfinite"] == 1
    after = params_of(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)


def crash_then_resume(ckpt_dir, monkeypatch, make):
    """`make()` trainer crashes during step 3 (the checkpoint of step 2 is on disk); a fresh `make()` trainer then
    fits from `ckpt_dir`. Returns it and the steps it trained itself."""
    part = make()
    real_step = part.train_step

    def crash_in_step_three():
        if part.step == 2:
            raise RuntimeError("simulated crash")
        return real_step()

    monkeypatch.setattr(part, "train_step", crash_in_step_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        part.fit(ckpt_dir)
    resumed = make()
    trained = []
    real_resumed_step = resumed.train_step
    monkeypatch.setattr(resumed, "train_step", lambda: trained.append(resumed.step) or real_resumed_step())
    resumed.fit(ckpt_dir)
    return resumed, trained


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, monkeypatch):
    full = make_trainer(steps=4)
    full.fit(tmp_path / "full")
    resumed, trained = crash_then_resume(tmp_path / "part", monkeypatch, lambda: make_trainer(steps=4, seed=0))
    assert trained == [2, 3]  # it really resumed: only steps 3 and 4 were trained in this process
    assert metrics_of(resumed.history) == metrics_of(full.history)
    pf, pr = params_of(full), params_of(resumed)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_dev_em_is_logged_on_schedule_and_does_not_change_training(tmp_path):
    dev = {"nq": QUESTIONS[:2], "hotpotqa": QUESTIONS[1:]}
    plain = make_trainer(steps=3)
    plain.fit(tmp_path / "plain")
    watched = make_trainer(steps=3, dev_sets=dev, eval_every=2)
    watched.fit(tmp_path / "watched")
    assert ["dev_em" in h for h in watched.history] == [False, True, True]  # every 2 steps, and the last one
    assert [{k: v for k, v in h.items() if not k.startswith("dev_em")} for h in metrics_of(watched.history)] \
        == metrics_of(plain.history)
    pp, pw = params_of(plain), params_of(watched)
    assert all(torch.equal(pp[k], pw[k]) for k in pp)


def test_dev_em_scores_the_greedy_answers():
    from tspo_core.train.sft import OracleBackend

    dev = {"nq": QUESTIONS[:2], "hotpotqa": QUESTIONS[2:3]}
    tr = make_trainer(dev_sets=dev, eval_every=1)
    # a scripted policy: "Kalora" for every question (right for Bobani, wrong for Mitu)
    scripts = {tuple(tr.engine.prompt_ids(q.question)): (["<answer> Kalora </answer>"], q.golden_answers)
               for q in QUESTIONS}
    tr.engine.backend = OracleBackend(tr.tok, scripts)
    assert tr.dev_em() == {"dev_em": pytest.approx(0.75), "dev_em_nq": 0.5, "dev_em_hotpotqa": 1.0}
    assert make_trainer(dev_sets=dev, rank=1, world=2).dev_em() == {}  # rank 0 alone evaluates


def test_a_checkpoint_left_moved_aside_by_a_crash_is_restored_and_resumed(tmp_path):
    full = make_trainer(steps=4)
    full.fit(tmp_path / "full")
    part = make_trainer(steps=2)
    part.fit(tmp_path / "ck")  # the checkpoint of step 2
    # a kill -9 between atomic_dir's two renames: the checkpoint moved aside, the new one not yet in place
    os.replace(tmp_path / "ck", tmp_path / ".ck.old")
    resumed = make_trainer(steps=4)
    resumed.fit(tmp_path / "ck")
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert metrics_of(resumed.history) == metrics_of(full.history)
    pf, pr = params_of(full), params_of(resumed)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)
    assert not (tmp_path / ".ck.old").exists()


def test_resume_from_a_broken_checkpoint_fails_loudly(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(ck)):
        make_trainer().fit(ck)


def test_a_run_where_every_step_is_skipped_is_an_error(tmp_path, monkeypatch):
    tr = make_trainer(steps=1)
    real = tr.update

    def poisoned(exp):
        exp.advantages[:] = float("inf")
        return real(exp)

    monkeypatch.setattr(tr, "update", poisoned)
    with pytest.raises(TrainingError, match="no optimizer step"):
        tr.fit(tmp_path / "ck")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = Path(__file__).with_name("_rl_ddp_worker.py")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """torchrun-style gloo run on CPU: each rank updates on its half of the same rollouts; the parameters after
    one step equal the single-process update on the whole batch."""
    single = make_trainer()
    exp = single.collect(0)
    torch.save(exp, tmp_path / "exp.pt")
    single.update(exp)
    torch.save(params_of(single), tmp_path / "single.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env={**env, "RANK": str(r)})
             for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    single_p = torch.load(tmp_path / "single.pt")
    for r in range(2):
        ranked = torch.load(tmp_path / f"rank{r}.pt")
        assert all(torch.allclose(single_p[k], ranked[k], atol=1e-6) for k in single_p), r


def test_gradients_are_summed_in_flat_buckets_of_one_dtype():
    """`Dist.all_sum_grads` packs gradients into buckets (bounded size, one dtype each), reduces each bucket once
    and copies the sums back into every gradient. A recording stand-in for the all-reduce adds a rank-dependent
    tensor, so a gradient copied back from the wrong offset shows."""
    calls = []

    class Recording(Dist):
        def all_sum(self, x):
            calls.append((x.numel(), x.dtype))
            return x.add_(torch.arange(x.numel(), dtype=x.dtype))  # "the other rank" adds its position

    grads = [torch.ones(3), torch.ones(2, 2), torch.ones(4, dtype=torch.float64), torch.ones(5)]
    expected = [g.clone() for g in grads]
    Recording(0, 2).all_sum_grads(grads, bucket_elems=8)
    assert sorted(calls) == sorted([(7, torch.float32), (5, torch.float32), (4, torch.float64)])
    # each gradient got its own slice of its bucket's flat sum: [3] and [2, 2] share one (offsets 0 and 3),
    # [5] would overflow it and starts the next, the float64 one has its own
    added = [g - e for g, e in zip(grads, expected)]
    assert torch.equal(added[0], torch.arange(3.0)) and torch.equal(added[1], torch.arange(3.0, 7.0).view(2, 2))
    assert torch.equal(added[3], torch.arange(5.0))
    assert torch.equal(added[2], torch.arange(4, dtype=torch.float64))
    calls.clear()
    Dist(0, 1).all_sum_grads(grads)  # one process: nothing to reduce
    assert calls == []


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    first = make_trainer(steps=2)
    first.fit(tmp_path / "ck")
    other = make_trainer(steps=2, estimator="grpo")  # a changed param: DVC reruns the stage over a persisted out
    other.fit(tmp_path / "ck")
    assert [h["step"] for h in other.history] == [1, 2]  # trained afresh, not "already finished"
    same = make_trainer(steps=2, estimator="grpo")
    same.fit(tmp_path / "ck")  # same settings: resumes at the end, trains nothing more
    assert same.history == other.history
