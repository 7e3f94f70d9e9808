"""The RL trainer on a real tiny model: finite updates, the NaN guard, resume == uninterrupted, 2 ranks == 1."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tspo_core.agent.backends import HFBackend
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import AdvantageConfig, ModelConfig, OptimConfig, RewardConfig, RolloutConfig, \
    TinyModelConfig, \
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


def make_trainer(estimator="tspo", steps=3, world=1, rank=0, seed=0, dev_sets=None, lora=None, lr=1e-2,
                 **train_kw):
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
                     AdvantageConfig(estimator=estimator), OptimConfig(lr=lr, warmup_ratio=0.0),
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


def test_sharing_the_prompt_forward_does_not_change_the_update(monkeypatch):
    """`train.prefix_sharing` (each group's prompt once per micro-batch) against the plain forward: the same
    reference log-probs, loss metrics and parameters after the update, and the shared path ran."""
    import tspo_core.train.logprobs as logprobs_module

    shared, plain = make_trainer(lr=RANKS_LR), make_trainer(lr=RANKS_LR, prefix_sharing=False)  # see RANKS_LR
    ran = []
    real = logprobs_module._prefix_forward
    monkeypatch.setattr(logprobs_module, "_prefix_forward", lambda *a: ran.append(real(*a)) or ran[-1])
    exp = _positive(shared.collect(0))
    ref_shared = shared.reference_logprobs(exp)
    assert ran and all(r is not None for r in ran)
    m_shared = shared.update(exp)
    ran.clear()
    ref_plain, m_plain = plain.reference_logprobs(exp), plain.update(exp)
    assert not ran  # off: never tried
    torch.testing.assert_close(ref_shared, ref_plain, atol=1e-5, rtol=0)
    for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm"):
        assert m_shared[k] == pytest.approx(m_plain[k], abs=1e-5), k
    pa, pb = params_of(shared), params_of(plain)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5


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
    tr.dist = Dist(1, 2)  # as seen from rank 1 (the model unsharded: no process group here)
    assert tr.dev_em() == {}  # rank 0 alone evaluates


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


WORKER = Path(__file__).with_name("_rl_ddp_worker.py")


LORA_SETTINGS = {"plain": None, "lora": ModelConfig(lora_r=4, lora_alpha=8)}
RANKS_LR = 1e-3
"""Adam turns fp32 summation noise in a near-zero gradient element into up to lr * 1e-3 (the sign of g / sqrt(v)
flips): at lr 1e-3 that stays under the 1e-5 tolerance, while every parameter step is about 1e-3."""


def _positive(exp):
    """Every policy token's advantage 1 (the untrained tiny policy rarely earns a reward): the update is large."""
    exp.advantages.zero_()
    exp.advantages[exp.batch.tensors.policy_mask.bool()] = 1.0
    return exp


def _run_ranks(tmp_path, n=2, timeout=120):
    env = {**os.environ, "WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    (tmp_path / "store").unlink(missing_ok=True)  # the workers' file store (no TCP store: nothing on a port)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env={**env, "RANK": str(r)})
             for r in range(n)]
    assert [p.wait(timeout=timeout) for p in procs] == [0] * n


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """Two steps of one process (rollouts, then updates), and the same two updates on 2 FSDP2 gloo ranks, each
    with its half of each step's rollouts; for full-parameter and LoRA training."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    single = {}
    for name, lora in LORA_SETTINGS.items():
        tr = make_trainer(lora=lora, lr=RANKS_LR)
        exps, metrics = [], []
        for step in range(2):
            exp = _positive(tr.collect(step))
            exps.append(copy.deepcopy(exp))
            metrics.append(tr.update(exp))
            tr.step += 1
            if step == 0:
                tr.save(tmp_path / f"ck1_{name}")  # resumed on 2 ranks by the worker
        single[name] = {"experiences": exps, "metrics": metrics, "params": params_of(tr)}
    torch.save(single, tmp_path / "single.pt")
    _run_ranks(tmp_path)
    ranked = {f"{name}{kind}": [torch.load(tmp_path / f"{name}{kind}_rank{r}.pt", weights_only=False)
                                for r in range(2)] for name in single for kind in ("", "_from1")}
    ranked["fit"] = [torch.load(tmp_path / f"fit_rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranked, tmp_path


@pytest.mark.parametrize("name", list(LORA_SETTINGS))
def test_two_processes_match_one_process(one_and_two_ranks, name):
    """FSDP2 on 2 gloo ranks, each updating on its half of the same rollouts: after 2 steps the loss metrics and
    the (gathered) parameters equal the one-process run within 1e-5; under LoRA only the adapters moved."""
    single, ranked, _ = one_and_two_ranks
    one = single[name]
    for r, two in enumerate(ranked[name]):
        for m1, m2 in zip(one["metrics"], two["metrics"], strict=True):
            for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm"):
                assert m2[k] == pytest.approx(m1[k], abs=1e-5), (r, k)
    gathered = ranked[name][0]["params"]  # the full state dict, gathered on rank 0
    assert gathered.keys() == one["params"].keys()
    diff = max((gathered[k] - one["params"][k]).abs().max().item() for k in one["params"])
    assert diff < 1e-5, diff
    start = params_of(make_trainer(lora=LORA_SETTINGS[name]))
    moved = {k: (start[k] - one["params"][k]).abs().max().item() for k in start
             if not torch.equal(start[k], one["params"][k])}
    assert max(moved.values()) > 100 * 1e-5  # the tolerance is far below the update itself
    assert name == "plain" or all("lora_" in k for k in moved)


@pytest.mark.parametrize("name", list(LORA_SETTINGS))
def test_every_rank_pushes_the_full_weights_gathered_from_the_shards(one_and_two_ranks, name):
    """What each rank of a 2-rank FSDP2 run would push into its vLLM engine (`policy_weights`) is the full
    weights, equal on both ranks and to the one-process policy's (under LoRA: with the adapters merged)."""
    from tspo_core.train.weight_sync import policy_weights

    single, ranked, _ = one_and_two_ranks
    tr = make_trainer(lora=LORA_SETTINGS[name])
    tr.model.load_state_dict(single[name]["params"])
    expected = dict(policy_weights(tr.model))
    assert all(".lora_" not in k and ".base_layer." not in k for k in expected)
    for r in range(2):
        assert _max_diff(ranked[name][r]["pushed"], expected) < 1e-5, r


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(LORA_SETTINGS))
def test_a_one_process_checkpoint_resumes_on_two_ranks(one_and_two_ranks, name):
    """DCP reshards: the checkpoint one process wrote after step 1 (model or adapters, AdamW moments, scheduler)
    resumes on 2 FSDP2 ranks, whose second update equals the one-process run's second update."""
    single, ranked, _ = one_and_two_ranks
    from1 = ranked[f"{name}_from1"]
    assert [r["step"] for r in from1] == [1, 1]
    assert from1[0]["metrics"][0]["loss"] == pytest.approx(single[name]["metrics"][1]["loss"], abs=1e-5)
    assert _max_diff(from1[0]["params"], single[name]["params"]) < 1e-5


@pytest.mark.parametrize("name", list(LORA_SETTINGS))
def test_a_two_rank_checkpoint_resumes_on_one_process(one_and_two_ranks, name):
    """The checkpoint 2 ranks wrote after step 1 resumes in one process; its second update equals the 2-rank
    continuation (and so the uninterrupted one-process run)."""
    single, ranked, tmp_path = one_and_two_ranks
    tr = make_trainer(lora=LORA_SETTINGS[name], lr=RANKS_LR)
    tr.resume(tmp_path / f"ck2_{name}")
    assert tr.step == 1
    m = tr.update(copy.deepcopy(single[name]["experiences"][1]))
    assert m["loss"] == pytest.approx(ranked[name][0]["metrics"][1]["loss"], abs=1e-5)
    assert _max_diff(params_of(tr), ranked[name][0]["params"]) < 1e-5


def test_two_ranks_fit_with_rollouts_checkpoints_and_export_a_plain_model(one_and_two_ranks):
    """A 2-rank `fit` (rollouts on gathered parameters, DCP checkpoints, the final model gathered once): both
    ranks log the same loss, and the exported HF model is the gathered trained weights."""
    from tspo_core.config import ModelConfig as MC
    from tspo_core.policy import load_policy

    _, ranked, tmp_path = one_and_two_ranks
    h0, h1 = (r["history"] for r in ranked["fit"])
    assert [h["step"] for h in h0] == [1, 2] and all(math.isfinite(h["loss"]) for h in h0)
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1]  # the loss metric is summed over ranks
    assert {p.name for p in (tmp_path / "fit_ck" / "state").iterdir()} >= {".metadata", "__0_0.distcp",
                                                                           "__1_0.distcp"}
    model, _ = load_policy(tmp_path / "fit_model", MC(), "cpu")
    exported = model.state_dict()
    gathered = ranked["fit"][0]["params"]
    assert all(torch.equal(exported[k], gathered[k]) for k in exported)
    assert any(not torch.equal(exported[k], v) for k, v in params_of(make_trainer()).items())


def test_a_corrupt_checkpoint_shard_fails_with_one_line_naming_the_file(tmp_path):
    """Truncated or damaged in place (same size: DCP would load the bytes as weights), the shard is named."""
    tr = make_trainer(steps=1)
    tr.fit(tmp_path / "ck")
    shard = tmp_path / "ck" / "state" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError) as err:
        make_trainer(steps=1).resume(tmp_path / "ck")
    assert str(shard) in str(err.value) and "\n" not in str(err.value) and "corrupt" in str(err.value)
    shard.write_bytes(bytes(len(data)))  # the right size, garbage inside
    with pytest.raises(CheckpointError) as err:
        make_trainer(steps=1).resume(tmp_path / "ck")
    assert str(shard) in str(err.value) and "\n" not in str(err.value) and "corrupt" in str(err.value)
    (tmp_path / "ck" / "state" / "sha256-rank0.json").unlink()  # no checksums: DCP's own failure, still one line
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        make_trainer(steps=1).resume(tmp_path / "ck")
    assert str(shard) in str(err.value) and "\n" not in str(err.value) and "truncated" in str(err.value)


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    first = make_trainer(steps=2)
    first.fit(tmp_path / "ck")
    other = make_trainer(steps=2, estimator="grpo")  # a changed param: DVC reruns the stage over a persisted out
    other.fit(tmp_path / "ck")
    assert [h["step"] for h in other.history] == [1, 2]  # trained afresh, not "already finished"
    same = make_trainer(steps=2, estimator="grpo")
    same.fit(tmp_path / "ck")  # same settings: resumes at the end, trains nothing more
    assert same.history == other.history


def test_the_step_is_one_short_module_and_gradients_are_reduced_by_the_engine():
    """The RL step reads in one sitting (issue 15: at most 250 lines); no hand-written gradient all-reduce is
    left in the library (FSDP2 reduces gradients; metric and denominator sums remain in `Dist.all_sum`)."""
    import tspo_core
    from tspo_core.train import rl_step

    assert len(Path(rl_step.__file__).read_text().splitlines()) <= 250
    root = Path(tspo_core.__file__).parent
    callers = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "all_reduce(" in p.read_text()}
    assert callers == {"train/distributed.py"}  # Dist.all_sum alone
    assert "grad" not in (root / "train" / "distributed.py").read_text().split("def all_sum")[1].split("def ")[0]


def test_micro_batches_keep_groups_together_by_hand():
    from tspo_core.train.rl_step import micro_batches

    lengths = torch.tensor([5, 9, 3, 4, 8, 2])
    groups = torch.tensor([1, 1, 2, 2, 3, 3])  # longest rollout per group: 9, 4, 8
    assert [m.tolist() for m in micro_batches(range(6), lengths, 4)] == [[5, 2, 3, 0], [4, 1]]  # by length
    # whole groups by their longest rollout (2: 4, 3: 8, 1: 9), by length within a group
    assert [m.tolist() for m in micro_batches(range(6), lengths, 4, groups)] == [[2, 3, 5, 4], [0, 1]]
    assert [m.tolist() for m in micro_batches([0, 1, 4], lengths, 2, groups)] == [[4, 0], [1]]
