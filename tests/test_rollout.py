"""The rollout engine: exact transcripts with a scripted policy and a dict retriever; a real tiny HF model."""

from __future__ import annotations

import torch

from tspo_core.agent.backends import Generation, HFBackend
from tspo_core.agent.protocol import INVALID_ACTION_MESSAGE, format_observation
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import TinyModelConfig
from tspo_core.data.schema import QAExample
from tspo_core.policy import build_tiny_model

from fakes import PASSAGES, DictRetriever, tokenizer


class ScriptedBackend:
    """Plays one script per rollout, chosen by the question text in the context and the turn number."""

    def __init__(self, tokenizer, scripts):
        self.tok, self.scripts, self.eos_token_id = tokenizer, scripts, tokenizer.eos_token_id
        self.turn_calls = []

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        self.turn_calls.append(len(contexts))
        out = []
        for ctx, budget in zip(contexts, max_new_tokens):
            text = self.tok.decode(ctx)
            key = next(k for k in self.scripts if f"Question: {k}" in text)
            turn = text.split("Question:")[-1].count("</information>")  # the instructions mention the tag too
            ids = self.tok.encode(self.scripts[key][turn], add_special_tokens=False)[:budget]
            out.append(Generation(ids, [-0.5] * len(ids), "stop"))
        return out


def test_scripted_transcript_masks_and_turns():
    tok = tokenizer()
    scripts = {
        "where was Bobani born?": ["<think> x </think><search> Bobani </search>", "<answer> Kalora </answer>"],
        "which country?": ["I do not know", "<search> Kalora </search>", "<answer> Tuni </answer>"],
    }
    retriever = DictRetriever(PASSAGES)
    engine = RolloutEngine(ScriptedBackend(tok, scripts), tok, retriever, RolloutSettings(max_turns=4, top_k=2))
    exs = [QAExample("q0", "where was Bobani born", ["Kalora"]), QAExample("q1", "which country?", ["Tuni"])]
    batch = engine.run(exs, group_size=2, temperature=1.0)

    assert [r.group_id for r in batch.rollouts] == [0, 0, 1, 1]
    r0, r2 = batch.rollouts[0], batch.rollouts[2]
    obs = format_observation(PASSAGES["Bobani"])
    expected = (engine.tokenizer.decode(engine.prompt_ids("where was Bobani born"))
                + scripts["where was Bobani born?"][0] + obs + scripts["where was Bobani born?"][1])
    assert tok.decode(r0.context_ids) == expected
    assert r0.answer == "Kalora" and r0.queries == ["Bobani"] and r0.retrieved_ids == [["p1", "p2"]]
    assert r0.observations == [obs, None]
    # the second question: an invalid turn gets the corrective message, then a search, then the answer
    assert [a.kind for a in r2.actions] == ["invalid", "search", "answer"]
    assert r2.observations[0] is None and r2.observations[1] == format_observation(PASSAGES["Kalora"])
    assert INVALID_ACTION_MESSAGE in tok.decode(r2.context_ids)
    # one batched retrieval call per turn for all searching rollouts
    assert retriever.calls == [["Bobani", "Bobani"], ["Kalora", "Kalora"]]

    t = batch.tensors
    for b, r in enumerate(batch.rollouts):
        policy_text = tok.decode(t.input_ids[b][t.policy_mask[b].bool()].tolist())
        assert policy_text == "".join(r.turns)
        assert "<information>" not in policy_text
        # turn index of policy tokens counts the turns in order
        turns = t.turn_index[b][t.policy_mask[b].bool()].tolist()
        assert turns == sorted(turns) and set(turns) == set(range(r.num_turns))
        assert torch.all(batch.logprobs[b][t.policy_mask[b].bool()] == -0.5)
        assert torch.all(batch.logprobs[b][~t.policy_mask[b].bool()] == 0)


def test_final_turn_is_answer_only_and_caps():
    tok = tokenizer()
    scripts = {"loop?": ["<search> Bobani </search>"] * 10}
    engine = RolloutEngine(ScriptedBackend(tok, scripts), tok, DictRetriever(PASSAGES),
                           RolloutSettings(max_turns=2, top_k=1, max_obs_tokens=8))
    batch = engine.run([QAExample("q", "loop?", ["x"])], group_size=1, temperature=1.0)
    r = batch.rollouts[0]
    assert r.num_turns == 3 and r.num_searches == 2 and r.answer is None  # 2 search rounds + 1 answer-only turn
    assert r.events.count("obs_truncated") == 2
    for o in r.observations[:2]:
        assert o.endswith("</information>\n\n") and len(tok.encode(o, add_special_tokens=False)) == 8


def test_context_cap_stops_without_dropping_the_question():
    tok = tokenizer()
    scripts = {"loop?": ["<search> Bobani </search>"] * 10}
    prompt = len(RolloutEngine(ScriptedBackend(tok, scripts), tok, DictRetriever(PASSAGES),
                               RolloutSettings()).prompt_ids("loop?"))
    engine = RolloutEngine(ScriptedBackend(tok, scripts), tok, DictRetriever(PASSAGES),
                           RolloutSettings(max_turns=4, top_k=2, max_context_tokens=prompt + 40))
    batch = engine.run([QAExample("q", "loop?", ["x"])], group_size=1, temperature=1.0)
    r = batch.rollouts[0]
    assert "context_full" in r.events and r.num_turns < 5
    assert "Question: loop?" in tok.decode(r.context_ids)


def test_a_prompt_over_the_context_cap_is_refused_per_question():
    """A question whose prompt fills `max_context_tokens` is not rolled out (no generation, nothing allocated for
    it): its rollouts end unanswered with `prompt_too_long`, the prompt segment cut to the cap; the other
    questions of the batch are rolled out as usual."""
    tok = tokenizer()
    long_q = "where was Bobani born " + "and also Kalora " * 400
    scripts = {"where was Bobani born?": ["<answer> Kalora </answer>"], long_q.strip() + "?": ["<answer> x </answer>"]}
    backend = ScriptedBackend(tok, scripts)
    long_len = len(RolloutEngine(backend, tok, DictRetriever(PASSAGES), RolloutSettings()).prompt_ids(long_q))
    cap = len(RolloutEngine(backend, tok, DictRetriever(PASSAGES), RolloutSettings()).prompt_ids("q")) + 100
    assert long_len > cap
    engine = RolloutEngine(backend, tok, DictRetriever(PASSAGES),
                           RolloutSettings(max_turns=2, top_k=2, max_context_tokens=cap))
    exs = [QAExample("q0", "where was Bobani born", ["Kalora"]), QAExample("q1", long_q, ["x"])]
    batch = engine.run(exs, group_size=2, temperature=1.0)
    ok, refused = batch.rollouts[:2], batch.rollouts[2:]
    assert all(r.answer == "Kalora" and "prompt_too_long" not in r.events for r in ok)
    for r in refused:
        assert r.events == ["prompt_too_long"] and r.answer is None and r.num_turns == 0 and r.done
        assert len(r.context_ids) == cap and r.num_policy_tokens == 0
    assert batch.tensors.input_ids.shape[1] <= cap  # nothing in the batch grows with the long question
    assert backend.turn_calls == [2]  # one generation call, for q0's two rollouts only


def test_a_context_cap_below_the_prompt_template_is_refused_naming_the_key():
    import pytest

    from tspo_core.errors import ConfigError

    tok = tokenizer()
    with pytest.raises(ConfigError, match=r"^rollout\.max_context_tokens = 50 leaves no room.*'search_r1'") as err:
        RolloutEngine(ScriptedBackend(tok, {}), tok, DictRetriever(PASSAGES), RolloutSettings(max_context_tokens=50))
    assert "\n" not in str(err.value)


def test_real_tiny_model_batched_stops_and_keeps_sampled_ids():
    tok = tokenizer()
    model = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=2), tok, seed=0)
    stop_id = tok.convert_tokens_to_ids("</search>")
    prompts = [tok.encode("Question: Bobani?", add_special_tokens=False),
               tok.encode("Question: Kalora was born in the city of Tuni?", add_special_tokens=False)]
    # A few steps of training on the protocol make `</search>` likely, so sampling really meets a stop string.
    target = torch.tensor([prompts[0] + tok.encode(" <search> Bobani </search>", add_special_tokens=False)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=target, labels=target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    backend = HFBackend(model, tok)
    torch.manual_seed(0)
    gens = backend.generate(prompts, [40, 40], temperature=1.0, top_p=1.0, stop=("</search>", "</answer>"))
    assert len(gens) == 2
    for prompt, g in zip(prompts, gens):
        assert 0 < len(g.token_ids) <= 40 and len(g.logprobs) == len(g.token_ids)
        if g.finish == "stop":
            assert g.token_ids[-1] in {stop_id, tok.convert_tokens_to_ids("</answer>")}
        # the stored log-probs are those of the sampled ids under the model (recomputed without cache/padding)
        ids = torch.tensor([prompt + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        ref = logp.gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)
    assert any(g.finish == "stop" for g in gens)

    # a stop string that is not an atomic token is found in the decoded text ("Bo" inside "▁Bo")
    g = backend.generate(prompts[:1], [20], temperature=0.0, top_p=1.0, stop=("Bo",))[0]
    assert g.finish == "stop" and tok.decode(g.token_ids).endswith("Bo")

    # greedy decoding with left padding equals unpadded greedy decoding row by row
    batch = backend.generate(prompts, [12, 12], temperature=0.0, top_p=1.0, stop=())
    for prompt, g in zip(prompts, batch):
        single = backend.generate([prompt], [12], temperature=0.0, top_p=1.0, stop=())[0]
        assert single.token_ids == g.token_ids


def test_engine_with_real_model_round_trips_ids():
    tok = tokenizer()
    model = build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=2), tok, seed=1)
    engine = RolloutEngine(HFBackend(model, tok), tok, DictRetriever(PASSAGES),
                           RolloutSettings(max_turns=2, max_new_tokens_per_turn=16, top_k=2))
    torch.manual_seed(0)
    batch = engine.run([QAExample("q", "where was Bobani born", ["Kalora"])], group_size=3, temperature=1.0)
    t = batch.tensors
    for b, r in enumerate(batch.rollouts):
        n = r.length
        assert t.input_ids[b, :n].tolist() == r.context_ids  # the sampled ids, never re-tokenized
        assert int(t.policy_mask[b].sum()) == r.num_policy_tokens
