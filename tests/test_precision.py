"""Training precision and the paper-setting switches, on CPU: bf16 = fp32 master weights under bf16 autocast (with
LoRA: a frozen bf16 base, fp32 adapters), fp16 refused by name, gradient checkpointing applied, `sft.enabled: false`
passes the base model on."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from tspo_core.config import ModelConfig, TinyModelConfig, load_params
from tspo_core.errors import ConfigError
from tspo_core.pipeline import prepare_for_training, training_precision
from tspo_core.policy import build_tiny_model, build_tokenizer
from tspo_core.train.rl import token_logprobs
from tspo_core.train.sft import run_sft

from conftest import REPO
from test_rl import SYL, WORDS, make_trainer, params_of


def test_training_precision_rules():
    model, ctx = training_precision(ModelConfig(dtype="float32"))
    assert model.dtype == "float32" and isinstance(ctx, contextlib.nullcontext)
    model, ctx = training_precision(ModelConfig(dtype="bfloat16"))
    assert model.dtype == "float32"  # master weights
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype = float16"):
        training_precision(ModelConfig(dtype="float16"))
    with pytest.raises(ConfigError, match="model.dtype = float16"):
        training_precision(ModelConfig(dtype="float16", lora_r=8), lora=True)
    # LoRA: the frozen base stays in bf16 (nothing rounds it), under the same autocast
    model, ctx = training_precision(ModelConfig(dtype="bfloat16", lora_r=8), lora=True)
    assert model.dtype == "bfloat16" and isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    model, ctx = training_precision(ModelConfig(dtype="float32", lora_r=8), lora=True)
    assert model.dtype == "float32" and isinstance(ctx, contextlib.nullcontext)
    # SFT asks without `lora` and trains all parameters: fp32 master weights whatever lora_r says
    assert training_precision(ModelConfig(dtype="bfloat16", lora_r=8))[0].dtype == "float32"


def _positive_advantages(exp):
    mask = exp.batch.tensors.policy_mask.bool()
    exp.advantages.zero_()
    exp.advantages[mask] = 1.0
    return exp


def test_bf16_update_keeps_fp32_master_weights_and_follows_the_fp32_update():
    fp32, bf16 = make_trainer(), make_trainer()
    for tr in (fp32, bf16):
        tr.opt.param_groups[0]["weight_decay"] = 0.0
    exp = _positive_advantages(fp32.collect(0))
    before = params_of(fp32)
    fp32.update(exp)
    _, autocast = training_precision(ModelConfig(dtype="bfloat16"))
    with autocast:
        bf16.update(exp)
    after32, after16 = params_of(fp32), params_of(bf16)
    assert all(v.dtype == torch.float32 for v in after16.values())
    # the same direction as the fp32 update, and a step of the same size (bf16 only rounds the forward pass)
    d32 = torch.cat([(after32[k] - before[k]).flatten() for k in before])
    d16 = torch.cat([(after16[k] - before[k]).flatten() for k in before])
    assert d16.abs().max() > 0
    assert not torch.equal(d16, d32)  # autocast really computed in bf16
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9
    assert d16.norm() == pytest.approx(d32.norm().item(), rel=0.2)


def test_an_update_raises_the_log_probability_of_positively_advantaged_tokens():
    tr = make_trainer()
    tr.opt.param_groups[0]["weight_decay"] = 0.0  # the change must come from the policy gradient alone
    exp = _positive_advantages(tr.collect(0))
    t = exp.batch.tensors
    mask = t.policy_mask.bool()
    with torch.no_grad():
        before = token_logprobs(tr.model, t.input_ids, t.attention_mask)[0][mask].sum()
    tr.update(exp)
    with torch.no_grad():
        after = token_logprobs(tr.model, t.input_ids, t.attention_mask)[0][mask].sum()
    assert after > before


def test_gradient_checkpointing_is_applied():
    tok = build_tokenizer(WORDS, SYL)
    model = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=2), tok)
    assert not model.is_gradient_checkpointing
    prepare_for_training(model, ModelConfig(gradient_checkpointing=False))
    assert not model.is_gradient_checkpointing
    prepare_for_training(model, ModelConfig(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing


def test_sft_disabled_writes_the_base_checkpoint_unchanged(tmp_path):
    tok = build_tokenizer(WORDS, SYL)
    base = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                            num_attention_heads=2, num_key_value_heads=2), tok, seed=3)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    params = load_params(REPO / "configs" / "tiny.yaml", overrides={
        "model.name_or_path": str(tmp_path / "base"), "sft.enabled": False,
        "paths.sft_dir": str(tmp_path / "sft"), "paths.data_dir": str(tmp_path / "no-data")})
    result = run_sft(params)
    assert result["summary"]["skipped"] is True and result["history"] == []
    a = load_file(str(tmp_path / "base" / "model.safetensors"))
    b = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tiny = load_params(REPO / "configs" / "tiny.yaml", overrides={"sft.enabled": False,
                                                                   "paths.sft_dir": str(tmp_path / "sft2")})
    with pytest.raises(ConfigError, match="sft.enabled = false needs model.name_or_path"):
        run_sft(tiny)
    assert not (tmp_path / "sft2").exists()


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tmp_path):
    """transformers writes its loading flags (`local_files_only`, set by HF offline mode) back into a saved
    tokenizer_config.json; `load_policy` drops them, so a checkpoint's bytes do not depend on the environment."""
    import json

    from tspo_core.config import ModelConfig
    from tspo_core.policy import load_policy

    tok = build_tokenizer(WORDS, SYL)
    model = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=2), tok)
    model.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "a")
    _, loaded = load_policy(tmp_path / "a", ModelConfig(dtype="float32"), "cpu")
    loaded.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert not {"local_files_only", "is_local"} & set(saved)
    assert (tmp_path / "b" / "tokenizer_config.json").read_bytes() == (tmp_path / "a" / "tokenizer_config.json").read_bytes()
    assert loaded("Question was born").input_ids == tok("Question was born").input_ids
