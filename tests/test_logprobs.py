"""Log-probs on the read tokens only (`tspo_core.train.logprobs`) equal the full-vocabulary path they replace."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tspo_core.config import ModelConfig, TinyModelConfig
from tspo_core.policy import build_tiny_model, build_tokenizer
import tspo_core.train.logprobs as logprobs_module
from tspo_core.train.logprobs import next_token_stats, shared_prefixes, token_logprobs
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


# ---------------------------------------------------------------------------------------------------------------
# a group's shared prompt runs once (`groups`)
# ---------------------------------------------------------------------------------------------------------------
def grouped_batch(vocab, seed=0):
    """Rows of three groups, right-padded: group 7, a 9-token prompt and 3 continuations (one diverging at token
    11, so the group shares 9); group 3, a 5-token prompt and 2 continuations; group 5, one row alone. Read: every
    continuation token."""
    g = torch.Generator().manual_seed(seed)
    rows, groups, starts = [], [], []
    for label, prompt_len, suffix_lens in [(7, 9, [4, 7, 2]), (3, 5, [6, 3]), (5, 6, [5])]:
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
        for n in suffix_lens:
            rows.append(torch.cat([prompt, torch.randint(0, vocab, (n,), generator=g)]))
            groups.append(label)
            starts.append(prompt_len)
    T = max(len(r) for r in rows)
    ids, attn, mask = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, :len(r)], attn[i, :len(r)], mask[i, s:len(r)] = r, 1, 1
    return ids, attn, mask, torch.tensor(groups)


def test_shared_prefixes_by_hand():
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 5, 6], [1, 2, 9, 9, 0], [4, 4, 4, 0, 0], [4, 4, 4, 4, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    read = torch.zeros_like(ids, dtype=torch.bool)
    read[0, 3:4] = read[1, 3:5] = read[2, 2:4] = True  # group 0: first read token at column 2 (row 2)
    read[3, 2] = read[4, 3] = True  # group 1: first read at column 2
    row_group, prefix = shared_prefixes(ids, attn, read, torch.tensor([4, 4, 4, 9, 9]))
    assert row_group.tolist() == [0, 0, 0, 1, 1]
    # group 0: rows agree on 2 columns, the earliest read is column 2 -> its context ends at 1: prefix 1;
    # group 1: they agree on 3 columns (padding is not content: the shorter row has 3), earliest read 2 -> 1
    assert prefix.tolist() == [1, 1]
    read[2, 2] = False
    read[3, 2] = False
    assert shared_prefixes(ids, attn, read, torch.tensor([4, 4, 4, 9, 9]))[1].tolist() == [2, 2]
    # alone, a row shares with itself up to its first read token; row 3 reads nothing: all but its last token
    assert shared_prefixes(ids, attn, read, torch.tensor([1, 2, 3, 4, 5]))[1].tolist() == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shared_prompt_gives_the_same_logprobs_entropy_and_gradients(name, monkeypatch):
    """The prompt of each group once, its keys and values shared by the group's rows: the same log-probs,
    entropy and parameter gradients as every row's full forward (float rounding), and the shared path ran."""
    model = MODELS[name]().train()
    ids, attn, mask, groups = grouped_batch(model.config.vocab_size)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    def run(**kw):
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, ids, attn, 0.8, with_entropy=True, mask=mask, **kw)
        ((w * logp).sum() + (w * ent).sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ran = []
    real = logprobs_module._prefix_forward
    monkeypatch.setattr(logprobs_module, "_prefix_forward", lambda *a: ran.append(real(*a)) or ran[-1])
    logp, ent, grads = run(groups=groups)
    assert ran and ran[0] is not None and ran[0]["past_key_values"] is not None
    want_logp, want_ent, want_grads = run()
    m = mask.bool()
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-4, rtol=0)
    assert not logp[~m].any()
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    ref_logp = full_vocab_logprobs(model, ids, attn, 0.8)[0].detach()
    torch.testing.assert_close(logp[m], ref_logp[m], atol=1e-5, rtol=0)


def test_a_shared_prompt_with_lora_adapters_on_and_off():
    model = apply_lora(tiny_model(), ModelConfig(lora_r=4, lora_alpha=8))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    ids, attn, mask, groups = grouped_batch(model.config.vocab_size)
    m = mask.bool()
    with torch.no_grad():
        adapted, want = (token_logprobs(model, ids, attn, mask=mask, groups=g)[0] for g in (groups, None))
        with model.disable_adapter():
            base, base_want = (token_logprobs(model, ids, attn, mask=mask, groups=g)[0] for g in (groups, None))
    torch.testing.assert_close(adapted[m], want[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(base[m], base_want[m], atol=1e-5, rtol=0)
    assert (adapted[m] - base[m]).abs().max() > 1e-3


def test_no_sharing_where_it_saves_nothing_or_cannot_apply(monkeypatch):
    """Groups of one row, a token read right after the first (no prefix to share) and gradient checkpointing
    take the plain forward, with the same result."""
    model = tiny_model().eval()
    ids, attn, mask, groups = grouped_batch(model.config.vocab_size)
    calls = []
    real_model_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **kw: calls.append(kw) or
                        real_model_forward(self, *a, **kw))
    cases = {"one row per group": (mask, torch.arange(len(ids))), "read at column 1": (mask.clone(), groups)}
    cases["read at column 1"][0][0, 1] = 1
    for what, (mk, gr) in cases.items():
        calls.clear()
        with torch.no_grad():
            got = token_logprobs(model, ids, attn, mask=mk, groups=gr)[0]
            want = token_logprobs(model, ids, attn, mask=mk)[0]
        assert len(calls) == 2 and all("past_key_values" not in c for c in calls), what  # one plain forward each
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    model.gradient_checkpointing_enable()
    model.train()
    calls.clear()
    token_logprobs(model, ids, attn, mask=mask, groups=groups)
    assert len(calls) == 1
