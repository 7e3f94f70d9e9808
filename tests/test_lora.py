"""LoRA (peft) RL on the tiny Qwen2 on CPU (`model.lora_r > 0`): an update trains the adapters and leaves the base
bit-identical, the KL reference is the starting model (adapters disabled), the stage's final model is a plain
merged checkpoint with the adapted model's logits, resume == uninterrupted, a checkpoint of other LoRA settings is
refused by name, and a target module name that matches nothing is a ConfigError."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tspo_core.config import ModelConfig, load_params
from tspo_core.errors import ConfigError
from tspo_core.io import write_jsonl
from tspo_core.policy import load_policy
from tspo_core.train.checkpoint import CheckpointError, load_history, read_tensors
from tspo_core.train.lora import apply_lora
from tspo_core.train import rl_step
from tspo_core.train.rl import RLTrainer, run_rl, token_logprobs

from conftest import REPO
from test_precision import _positive_advantages
from test_rl import QUESTIONS, DictRetriever, crash_then_resume, make_trainer, metrics_of

LORA = ModelConfig(lora_r=4, lora_alpha=8)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _base(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.get_base_model().state_dict().items() if "lora_" not in n}


def test_an_update_trains_the_adapters_and_leaves_every_base_weight_bit_identical():
    tr = make_trainer(lora=LORA)
    adapters, base = _adapters(tr.model), _base(tr.model)
    assert adapters and len(base) > len(adapters)
    # the optimizer holds the adapters and nothing else; the base does not even require gradients
    in_opt = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in tr.model.named_parameters() if "lora_" in n}
    assert not any(p.requires_grad for n, p in tr.model.named_parameters() if "lora_" not in n)
    rec = tr.update(_positive_advantages(tr.collect(0)))
    assert all(math.isfinite(rec[k]) for k in ("loss", "kl", "grad_norm")) and rec["grad_norm"] > 0
    after = _adapters(tr.model)
    assert any(not torch.equal(adapters[n], after[n]) for n in adapters)
    assert any(n.endswith("lora_B.default.weight") and after[n].abs().max() > 0 for n in after)  # B starts at 0
    after_base = _base(tr.model)
    assert after_base.keys() == base.keys() and all(torch.equal(base[k], after_base[k]) for k in base)


def test_the_kl_reference_is_the_starting_model_with_the_adapters_disabled():
    tr = make_trainer(lora=LORA)
    exp = _positive_advantages(tr.collect(0))
    tr.update(exp)  # the adapters are no longer a no-op
    start = make_trainer().model  # the same seed, never trained
    t = exp.batch.tensors
    valid = t.attention_mask.bool()
    with torch.no_grad():
        expected = token_logprobs(start, t.input_ids, t.attention_mask, tr.cfg.rollout.temperature)[0]
        adapted = token_logprobs(tr.model, t.input_ids, t.attention_mask, tr.cfg.rollout.temperature)[0]
    ref = tr.reference_logprobs(exp)
    on_policy = t.policy_mask.bool()  # the reference computes (and the loss reads) policy tokens only
    assert torch.allclose(ref[on_policy], expected[on_policy], atol=1e-5) and not ref[~on_policy].any()
    assert (adapted[valid] - expected[valid]).abs().max() > 1e-3  # the policy itself has moved away from it
    assert tr.reference_logprobs(exp) is not None and tr.model.training  # adapters back on, mode restored
    with torch.no_grad():
        again = token_logprobs(tr.model, t.input_ids, t.attention_mask, tr.cfg.rollout.temperature)[0]
    assert torch.allclose(again[valid], adapted[valid], atol=1e-6)


def test_the_stage_writes_a_plain_merged_checkpoint_with_the_adapted_logits(tmp_path, monkeypatch):
    plain = make_trainer()  # the starting model (an SFT checkpoint) and its tokenizer
    start, tok = plain.model, plain.tok
    start.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "rl_train.jsonl", [{"id": q.id, "question": q.question,
                                                         "golden_answers": list(q.golden_answers)} for q in QUESTIONS])
    params = load_params(REPO / "configs" / "tiny.yaml", overrides={
        "paths.sft_dir": str(tmp_path / "sft"), "paths.data_dir": str(tmp_path / "data"),
        "model.lora_r": 4, "model.lora_alpha": 8, "optim.lr": 1e-2, "train.steps": 2, "retrieval.top_k": 1})
    monkeypatch.setattr("tspo_core.pipeline.open_retriever", lambda retrieval, paths: DictRetriever())
    real_experience = rl_step.make_experience  # the untrained policy earns no reward: push its own tokens up instead
    monkeypatch.setattr(rl_step, "make_experience", lambda *a: _positive_advantages(real_experience(*a)))
    captured = {}
    real_fit = RLTrainer.fit

    def fit(self, ckpt_dir, on_step=None):  # keeps the stage's trainer for a look at its model
        captured["trainer"] = self
        return real_fit(self, ckpt_dir, on_step)

    monkeypatch.setattr(RLTrainer, "fit", fit)
    history = run_rl(params, "tspo", tmp_path / "rl")
    tr = captured["trainer"]
    assert [h["step"] for h in history] == [1, 2] and tr.ref is None and tr.lora["r"] == 4
    assert tr.engine.backend.model is tr.model  # rollouts generate with the adapted model
    ckpt, out = tmp_path / "rl" / "checkpoint", tmp_path / "rl" / "model"
    # the training checkpoint (DCP) holds the adapters and their AdamW moments, never the frozen base
    saved = read_tensors(ckpt)
    assert saved["model"] and all("lora_" in k for k in saved["model"])
    assert not list(ckpt.glob("*.safetensors"))
    # the layout the full-parameter path writes: the HF model, the tokenizer, the history; no adapter files
    full_layout = {f.name for f in (tmp_path / "sft").iterdir()} | {"history.json", "run_record.json"}  # the history, its timings
    assert {f.name for f in out.iterdir()} == full_layout
    assert load_history(out) == history  # history.json without the timings, merged back from the run record
    merged, _ = load_policy(out, ModelConfig(), "cpu")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    enc = tok(["Question: Where was Bobani born", "Where was Mitu born <search> Mitu </search>"],
              return_tensors="pt", padding=True)
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    tr.model.eval()
    with torch.no_grad():
        adapted = tr.model(**ids).logits
        from_merged = merged(**ids).logits
        before = start(**ids).logits
    assert torch.allclose(from_merged, adapted, atol=1e-5)
    assert (from_merged - before).abs().max() > 1e-3  # the merge carried the trained adapters


def test_resume_from_a_lora_checkpoint_gives_the_uninterrupted_run(tmp_path, monkeypatch):
    full = make_trainer(steps=3, lora=LORA)
    full.fit(tmp_path / "full")
    # the crash leaves the checkpoint of step 2: adapters + optimizer, scheduler, RNG
    resumed, trained = crash_then_resume(tmp_path / "part", monkeypatch, lambda: make_trainer(steps=3, lora=LORA))
    assert trained == [2]  # it really resumed
    assert metrics_of(resumed.history) == metrics_of(full.history)
    af, ar = _adapters(full.model), _adapters(resumed.model)
    assert all(torch.equal(af[k], ar[k]) for k in af)


def test_a_checkpoint_of_other_lora_settings_is_refused_by_name(tmp_path):
    lora = make_trainer(lora=LORA)
    lora.save(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"trains LoRA adapters \(model.lora_r = 4.*this run trains all "
                                              r"parameters \(model.lora_r = 0\)"):
        make_trainer().resume(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"model.lora_r = 4.*model.lora_r = 8"):
        make_trainer(lora=ModelConfig(lora_r=8, lora_alpha=8)).resume(tmp_path / "lora")
    plain = make_trainer()
    plain.save(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"trains all parameters.*this run trains LoRA adapters"):
        make_trainer(lora=LORA).resume(tmp_path / "plain")
    fingerprints = {make_trainer(lora=m).fingerprint for m in (None, LORA, ModelConfig(lora_r=8, lora_alpha=8),
                                                               ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.1))}
    assert len(fingerprints) == 4  # LoRA settings are part of the run's identity


def test_a_target_module_name_that_matches_nothing_is_a_config_error():
    tiny = make_trainer().model
    for targets in (["q_proj", "qproj"], ["nope"]):
        with pytest.raises(ConfigError, match=r"model.lora_target_modules: \['(qproj|nope)'\] match no module"):
            apply_lora(tiny, ModelConfig(lora_r=4, lora_target_modules=targets))
    with pytest.raises(ConfigError, match=r"model.lora_target_modules: \['lm_head'\] share"):
        apply_lora(tiny, ModelConfig(lora_r=4, lora_target_modules=["lm_head"]))  # tied to the input embeddings
    with pytest.raises(ConfigError, match="model.lora_target_modules = .*peft cannot adapt"):
        apply_lora(tiny, ModelConfig(lora_r=4, lora_target_modules=["mlp"]))  # a block, not a layer
    assert not any("lora_" in n for n, _ in tiny.named_parameters())  # nothing was injected by the failures


@pytest.mark.parametrize("override, key", [({"lora_dropout": 1.0}, "model.lora_dropout"),
                                           ({"lora_target_modules": []}, "model.lora_target_modules"),
                                           ({"lora_target_modules": ["q_proj", ""]}, "model.lora_target_modules"),
                                           ({"lora_r": -1}, "model.lora_r")])
def test_bad_lora_settings_fail_naming_the_key(override, key):
    from tspo_core.config import params_from_dict

    raw = {"data": {"source": "files", "files": {"corpus": "c.jsonl", "train": ["t.jsonl"], "eval": {}}},
           "model": override}
    with pytest.raises(ConfigError, match=key):
        params_from_dict(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_get_gradients_under_gradient_checkpointing_and_stay_fp32_over_a_bf16_base(dtype):
    """As `run_rl` prepares a large model: gradient checkpointing on, the frozen base in `model.dtype` (bf16 under
    autocast on GPUs), fp32 adapters."""
    tr = make_trainer()
    model = tr.model.to(dtype)
    model.gradient_checkpointing_enable()
    model = apply_lora(model, LORA)
    assert model.get_base_model().is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" not in n)
    model.train()
    ids = tr.tok(["Question: Where was Bobani born"], return_tensors="pt")["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B.default.weight")]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
