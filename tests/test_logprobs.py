"""Log-probs on the read tokens only (`tspo_core.train.logprobs`) equal the full-vocabulary path they replace."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tspo_core.config import ModelConfig, TinyModelConfig
from tspo_core.policy import build_tiny_model, build_tokenizer
from tspo_core.train.logprobs import next_token_stats, token_logprobs
from tspo_core.train.lora import apply_lora


def full_vocab_logprobs(model, input_ids, attention_mask, temperature=1.0):
    """The readable reference (the trainer's path before issue 20): every position's (B, T-1, V) log-softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    pad = torch.zeros_like(logp[:, :1])
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T-1)
    return torch.cat([pad, logp], dim=1), torch.cat([pad, entropy], dim=1)


def large_vocab_model(vocab=50_000, seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def tiny_model(seed=0):
    tok = build_tokenizer(["Search with query answer Question was born in the city of"], ["ba", "bo", "ni", "ka"])
    return build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                            num_attention_heads=2, num_key_value_heads=2), tok, seed=seed)


def batch(vocab, B=3, T=17, seed=0):
    """Right-padded rows of lengths T, T - 4, T - 9 and a policy mask on some tokens of each (never padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate([T, T - 4, T - 9][:B]):
        attn[b, n:] = 0
    mask = (torch.rand(B, T, generator=g) < 0.5).long() * attn
    mask[:, 0] = 0
    return ids, attn, mask


MODELS = {"vocab_50000": lambda: large_vocab_model(), "tiny": lambda: tiny_model()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_policy_token_logprobs_and_entropy_equal_the_full_vocabulary_path(name, temperature):
    model = MODELS[name]().eval()
    ids, attn, mask = batch(model.config.vocab_size)
    with torch.no_grad():
        logp, ent = token_logprobs(model, ids, attn, temperature, with_entropy=True, mask=mask)
        ref_logp, ref_ent = full_vocab_logprobs(model, ids, attn, temperature)
    m = mask.bool()
    assert logp.shape == ent.shape == ids.shape and logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp[m], ref_logp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[m], ref_ent[m], atol=1e-4, rtol=0)
    assert not logp[~m].any() and not ent[~m].any()  # never computed: 0
    with torch.no_grad():  # without a mask: every position but column 0, as before
        every = token_logprobs(model, ids, attn, temperature)[0]
    torch.testing.assert_close(every, ref_logp, atol=1e-5, rtol=0)


def test_chunked_rows_with_their_gradients_equal_the_full_vocabulary_path():
    """Chunks of 3 rows (recomputed in the backward) give the full path's values and parameter gradients."""
    model = large_vocab_model()
    ids, attn, mask = batch(model.config.vocab_size)
    m = mask.bool()
    w = torch.randn(int(m.sum()), generator=torch.Generator().manual_seed(1))  # (N,) a loss weight per token

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    out = next_token_stats(model, ids, attn, mask, 0.7, with_entropy=True, entropy_grad=True,
                           chunk_elements=3 * model.config.vocab_size)  # 3 rows per chunk
    ref_logp, ref_ent = full_vocab_logprobs(model, ids, attn, 0.7)
    torch.testing.assert_close(out.logp, ref_logp[m], atol=1e-5, rtol=0)
    got = grads((w * out.logp).sum() + (w * out.entropy).sum())
    want = grads((w * ref_logp[m]).sum() + (w * ref_ent[m]).sum())
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_the_logged_entropy_carries_no_gradient_unless_it_is_in_the_loss():
    model = tiny_model()
    ids, attn, mask = batch(model.config.vocab_size)
    assert not token_logprobs(model, ids, attn, with_entropy=True, mask=mask, entropy_grad=False)[1].requires_grad
    assert token_logprobs(model, ids, attn, with_entropy=True, mask=mask, entropy_grad=True)[1].requires_grad


def test_masked_positions_never_matter():
    """A token's log-prob is the same whichever other tokens are read, and whatever the unread tokens' ids are
    after it (causal); unread tokens are 0."""
    model = large_vocab_model().eval()
    ids, attn, mask = batch(model.config.vocab_size)
    with torch.no_grad():
        all_read = token_logprobs(model, ids, attn)[0]
        some = token_logprobs(model, ids, attn, mask=mask)[0]
    m = mask.bool()
    torch.testing.assert_close(some[m], all_read[m], atol=1e-6, rtol=0)
    assert not some[~m].any()


def test_a_lora_model_and_its_disabled_adapters_equal_the_full_vocabulary_path():
    model = apply_lora(tiny_model(), ModelConfig(lora_r=4, lora_alpha=8))
    for p in model.parameters():  # peft starts B at 0 (adapters off); move them so the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    ids, attn, mask = batch(model.config.vocab_size)
    m = mask.bool()
    with torch.no_grad():
        adapted, want = token_logprobs(model, ids, attn, mask=mask)[0], full_vocab_logprobs(model, ids, attn)[0]
        with model.disable_adapter():
            base, base_want = token_logprobs(model, ids, attn, mask=mask)[0], full_vocab_logprobs(model, ids, attn)[0]
    torch.testing.assert_close(adapted[m], want[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(base[m], base_want[m], atol=1e-5, rtol=0)
    assert (adapted[m] - base[m]).abs().max() > 1e-3  # the adapters change the log-probs: both paths were taken
