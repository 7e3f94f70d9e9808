"""SFT warmup: the oracle's turn texts, the schedule, and which tokens the loss reads (policy tokens, plus the
observations only when `sft.obs_loss_weight > 0`)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from fakes import tokenizer

from tspo_core.agent.masks import Segment, build_masks
from tspo_core.agent.protocol import parse_action
from tspo_core.config import SFTConfig, TinyModelConfig
from tspo_core.data.schema import QAExample
from tspo_core.metrics import contains_answer, exact_match
from tspo_core.policy import build_tiny_model
from tspo_core.train.sft import NEAR_MISS, _guess, lr_factor, oracle_turns, sft_train

TINY = TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=128)


def _example(n_hops: int = 2) -> QAExample:
    hops = [{"query": f"q{i}", "answer": f"a{i}"} for i in range(n_hops)]
    return QAExample(id="x", question="Q?", golden_answers=["Gold"], metadata={"hops": hops})


def test_oracle_turns_follow_the_hops_then_answer():
    turns, kind = oracle_turns(_example(), random.Random(0), imperfect=False)
    assert kind == "oracle"
    assert turns == ["<search> q0 </search>", "<search> q1 </search>", "<answer> Gold </answer>"]


def test_imperfect_oracle_repeats_a_search_or_defers_a_wrong_answer():
    kinds = set()
    for seed in range(20):
        turns, kind = oracle_turns(_example(), random.Random(seed), imperfect=True)
        kinds.add(kind)
        if kind == "redundant":
            searches = turns[:-1]
            assert len(searches) == 3 and len(set(searches)) == 2 and turns[-1] == "<answer> Gold </answer>"
        else:
            assert kind == "near_miss" and turns[-1] == f"<answer> {NEAR_MISS} </answer>"
    assert kinds == {"redundant", "near_miss"}


def test_premature_oracle_stops_at_an_earlier_hop_and_answers_its_entity():
    stops = set()
    for seed in range(20):
        turns, kind = oracle_turns(_example(3), random.Random(seed), imperfect=True, premature=True)
        assert kind == "premature"  # wins over `imperfect`
        k = len(turns) - 1  # searches made
        stops.add(k)
        assert turns == [f"<search> q{i} </search>" for i in range(k)] + [f"<answer> a{k - 1} </answer>"]
    assert stops == {1, 2}  # never before the first search, never after the last hop
    # single-hop questions have no earlier hop: the oracle is unchanged
    assert oracle_turns(_example(1), random.Random(0), imperfect=False, premature=True) == (
        ["<search> q0 </search>", "<answer> Gold </answer>"], "oracle")


def test_premature_oracle_with_a_guess_may_answer_before_any_search():
    stops = set()
    for seed in range(30):
        turns, kind = oracle_turns(_example(2), random.Random(seed), imperfect=False, premature=True, guess="Wrong")
        stops.add(len(turns) - 1)
        if len(turns) == 1:
            assert turns == ["<answer> Wrong </answer>"]
        else:
            assert turns == ["<search> q0 </search>", "<answer> a0 </answer>"]
    assert stops == {0, 1}
    # a single-hop question can only be answered at once, with the guess
    assert oracle_turns(_example(1), random.Random(0), imperfect=False, premature=True, guess="Wrong") == (
        ["<answer> Wrong </answer>"], "premature")


def test_verbose_oracle_wraps_only_the_final_answer_and_exact_match_rejects_it():
    turns, kind = oracle_turns(_example(), random.Random(0), imperfect=False, verbose=True)
    assert kind == "oracle"
    assert turns == ["<search> q0 </search>", "<search> q1 </search>", "<answer> The answer is Gold </answer>"]
    answer = parse_action(turns[-1]).content
    assert exact_match(answer, ["Gold"]) == 0.0 and contains_answer(answer, ["Gold"])
    # it composes with the other habits: a near miss stays a near miss, a lazy answer stays lazy
    kinds = {oracle_turns(_example(), random.Random(s), imperfect=True, verbose=True)[0][-1] for s in range(20)}
    assert kinds == {"<answer> The answer is Gold </answer>", f"<answer> The answer is {NEAR_MISS} </answer>"}
    assert oracle_turns(_example(1), random.Random(0), imperfect=False, premature=True, guess="Wrong",
                        verbose=True)[0] == ["<answer> The answer is Wrong </answer>"]


def test_guess_is_a_wrong_answer_of_the_same_relation():
    def q(i, answer, relation):
        return QAExample(id=f"q{i}", question="Q?", golden_answers=[answer], metadata={"relations": [relation]})

    chunk = [q(0, "Kalora", "person.born_in"), q(1, "1911", "person.birth_year"), q(2, "Tuni", "person.born_in"),
             q(3, "Kalora", "person.born_in")]
    assert {_guess(chunk, 0, random.Random(s)) for s in range(20)} == {"Tuni"}  # never its own gold "Kalora"
    assert _guess(chunk, 1, random.Random(0)) in {"Kalora", "Tuni"}  # no other year: any other wrong answer
    assert _guess([q(0, "A", "r"), q(1, "A", "r")], 0, random.Random(0)) is None


def test_lr_factor_warmup_then_cosine_to_zero():
    assert lr_factor(0, 4, 12) == pytest.approx(0.25)
    assert lr_factor(3, 4, 12) == pytest.approx(1.0)
    assert lr_factor(4, 4, 12) == pytest.approx(1.0)  # decay starts after warmup
    assert lr_factor(8, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)
    assert lr_factor(50, 4, 12) == pytest.approx(0.0)


def _segments(tok) -> list[list[Segment]]:
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return [[Segment(enc("Question : where was Bobani born ?"), "prompt", 0),
             Segment(enc("<search> Bobani </search>"), "policy", 0),
             Segment(enc("<information> Doc 1 ( Title : Bobani ) Bobani was born in Kalora . </information>"),
                     "obs", 0),
             Segment(enc("<answer> Kalora </answer>"), "policy", 1)]] * 4


def _losses_by_hand(model, segments, pad_id):
    t = build_masks(segments, pad_id=pad_id)
    with torch.no_grad():
        logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits[:, :-1]
    targets = t.input_ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ce[t.policy_mask[:, 1:].bool()].mean().item(), ce[t.obs_mask[:, 1:].bool()].mean().item()


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_first_step_loss_is_the_policy_token_loss_and_obs_loss_is_separate(weight):
    tok = tokenizer()
    segments = _segments(tok)
    model = build_tiny_model(TINY, tok, seed=0)
    policy_ce, obs_ce = _losses_by_hand(model, segments, tok.pad_token_id)
    cfg = SFTConfig(max_steps=1, batch_size=4, warmup_steps=0, obs_loss_weight=weight)
    (rec,) = sft_train(model, tok.pad_token_id, segments, cfg)
    assert rec["loss"] == pytest.approx(policy_ce, rel=1e-5)
    if weight:
        assert rec["obs_loss"] == pytest.approx(obs_ce, rel=1e-5)
    else:
        assert rec["obs_loss"] is None


def _step_by_hand(tok, segments, weight, lr):
    """One AdamW step on policy CE + weight * observation CE, clipped at 1.0, as sft_train documents it."""
    model = build_tiny_model(TINY, tok, seed=0)
    t = build_masks(segments, pad_id=tok.pad_token_id)
    logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits[:, :-1]
    targets = t.input_ids[:, 1:]
    policy, obs = t.policy_mask[:, 1:].bool(), t.obs_mask[:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(logits[policy], targets[policy])
    if weight:
        loss = loss + weight * torch.nn.functional.cross_entropy(logits[obs], targets[obs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_update_uses_exactly_the_policy_loss_plus_weighted_obs_loss(weight):
    tok = tokenizer()
    segments = _segments(tok)
    model = build_tiny_model(TINY, tok, seed=0)
    sft_train(model, tok.pad_token_id, segments, SFTConfig(max_steps=1, batch_size=4, warmup_steps=0,
                                                           obs_loss_weight=weight))
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    # sft_train runs the LM head on the loss's tokens only (tspo_core.train.logprobs), the hand step on every
    # position: the same loss up to float rounding, which AdamW's first step (about lr * sign(g)) can turn into
    # 2e-6 on a weight whose gradient is near 0
    assert torch.allclose(got, _step_by_hand(tok, segments, weight, SFTConfig().lr), atol=1e-5)
    other = _step_by_hand(tok, segments, 0.5 - weight, SFTConfig().lr)
    assert not torch.allclose(got, other, atol=1e-5)  # the weight matters: the test can tell them apart


def test_sft_learns_a_repeated_trajectory():
    tok = tokenizer()
    segments = _segments(tok)
    model = build_tiny_model(TINY, tok, seed=0)
    hist = sft_train(model, tok.pad_token_id, segments,
                     SFTConfig(max_steps=40, batch_size=4, warmup_steps=2, lr=1e-2, obs_loss_weight=0.5))
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]
    assert hist[-1]["token_acc"] == 1.0


def test_a_binding_time_cap_stops_early_and_says_so(caplog, monkeypatch):
    # the cap is a guard: when it binds, the model depends on the machine's load, so it is logged naming the key
    import tspo_core.train.sft as sft

    tok = tokenizer()
    segments = _segments(tok)
    model = build_tiny_model(TinyModelConfig(), tok)
    clock = iter([0.0] + [1e9] * 100)  # t0, then every later reading is far past the cap
    monkeypatch.setattr(sft.time, "monotonic", lambda: next(clock))
    with caplog.at_level("WARNING", logger="tspo_core.train.sft"):
        hist = sft_train(model, tok.pad_token_id, segments, SFTConfig(max_steps=5, max_minutes=1.0, batch_size=4))
    assert len(hist) == 0
    assert "sft.max_minutes (1) reached after 0 of 5 steps" in caplog.text
