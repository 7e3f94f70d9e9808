"""What the trainer pushes into a colocated inference engine (`tspo_core.train.weight_sync.policy_weights`): the
plain HF checkpoint's names and tensors, LoRA adapters merged without touching the model (the 2-rank FSDP2 gather
is tested in test_rl, with the other 2-rank tests)."""

from __future__ import annotations

import copy

import pytest
import torch

from tspo_core.config import ModelConfig, TinyModelConfig
from tspo_core.errors import ConfigError
from tspo_core.policy import build_tiny_model, build_tokenizer
from tspo_core.train.lora import apply_lora
from tspo_core.train.weight_sync import policy_weights

TINY = TinyModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=2)


def tiny():
    tok = build_tokenizer(["Question was born in the city of"], ["ba", "bo", "ni", "ka"])
    return build_tiny_model(TINY, tok, seed=0)


def test_a_plain_model_pushes_its_state_dict():
    model = tiny()
    pushed = dict(policy_weights(model))
    state = model.state_dict()
    assert pushed.keys() == state.keys()
    assert all(torch.equal(pushed[k], state[k]) for k in state)


def test_lora_is_merged_on_the_fly_under_the_base_names_and_the_model_is_untouched():
    """W + (alpha / r) * B @ A per adapted layer, as peft's own merge_and_unload computes it; the peft model's
    weights stay as they were (no merge/unmerge round trip)."""
    plain = tiny()
    model = apply_lora(tiny(), ModelConfig(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))
    with torch.no_grad():  # peft starts B at 0 (a no-op adapter): make the adapters do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pushed = dict(policy_weights(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert pushed.keys() == expected.keys() == plain.state_dict().keys()
    assert max((pushed[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(pushed[q], by_hand, atol=1e-6)
    assert not torch.allclose(pushed[q], layer.base_layer.weight)  # the adapter changed it
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_that_cannot_be_merged_for_the_engine_is_named():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="q_proj is a DoRA"):
        dict(policy_weights(model))
