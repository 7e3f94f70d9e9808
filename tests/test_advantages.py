"""Advantage estimators: hand-computed tensors, degenerate groups, invariances, fast path vs the reference loop;
group diagnostics."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo_core.agent.advantages import (advantage_names, get_advantage, group_stats, reference_advantages,
                                        register_advantage)
from tspo_core.agent.diagnostics import category_shares, group_diagnostics, zero_variance_share
from tspo_core.errors import ConfigError

EPS = 1e-6
ALPHA = 0.5
NAMES = ("grpo", "grpo_folr", "tspo", "tspo_switch", "tspo_shared")

# Token layout used by the hand examples: [prompt, turn 0, obs, turn 1, obs, turn 2], one token per turn.
LAYOUT_TURNS = [-1, 0, -1, 1, -1, 2]
LAYOUT_POLICY = [0, 1, 0, 1, 0, 1]


def inputs(o, f, g, turns=None, policy=None):
    B = len(o)
    turns = turns if turns is not None else [LAYOUT_TURNS] * B
    policy = policy if policy is not None else [LAYOUT_POLICY] * B
    return dict(outcome=torch.tensor(o, dtype=torch.float32), first_occurrence=torch.tensor(f),
                group_ids=torch.tensor(g), turn_index=torch.tensor(turns), policy_mask=torch.tensor(policy),
                alpha=ALPHA, eps=EPS)


def run(name, x):
    return get_advantage(name)(**x)


def on_turns(per_turn):
    """(B, 6) expected tensor from each rollout's advantage of turns 0, 1, 2 in LAYOUT (0 on other tokens)."""
    return torch.tensor([[0.0, a0, 0.0, a1, 0.0, a2] for a0, a1, a2 in per_turn])


# ---------------------------------------------------------------------------------------------------------------
# hand-computed examples
# ---------------------------------------------------------------------------------------------------------------
def test_all_outcomes_zero_but_some_found_grpo_silent_tspo_not():
    # o = [0, 0, 0], f = [1, none, 0], alpha = 0.5  ->  s = [0.5, 0, 0.5]
    # mean(s) = 1/3; deviations (1/6, -1/3, 1/6); sum sq = 1/36 + 4/36 + 1/36 = 1/6; var = (1/6)/2 = 1/12
    x = inputs([0, 0, 0], [1, -1, 0], [0, 0, 0])
    sd = math.sqrt(1 / 12) + EPS
    hi, lo = (0.5 - 1 / 3) / sd, (0.0 - 1 / 3) / sd  # +0.57735, -1.1547
    # grpo: all o equal -> 0 everywhere
    assert torch.equal(run("grpo", x), torch.zeros(3, 6))
    # grpo_folr: s broadcast: (1/6)/sd, (-1/3)/sd, (1/6)/sd
    torch.testing.assert_close(run("grpo_folr", x), on_turns([(hi, hi, hi), (lo, lo, lo), (hi, hi, hi)]))
    # tspo: search stages get S against mean(s); answer stages O against mean(o), and all o are equal -> 0
    #       rollout 0 (f=1): turns 0,1 search -> hi, turn 2 answer -> 0
    #       rollout 1 (none): every turn is search stage -> lo
    #       rollout 2 (f=0): turn 0 -> hi; turns 1,2 answer -> 0
    expected = on_turns([(hi, hi, 0), (lo, lo, lo), (hi, 0, 0)])
    torch.testing.assert_close(run("tspo", x), expected)
    # tspo_switch: outcomes all equal -> the search-stage term, 0 on answer stages: the same here
    torch.testing.assert_close(run("tspo_switch", x), expected)
    # tspo_shared (the first definition): every turn's return R_k = o + alpha [k <= f] against mean(s):
    #       rollout 0: turns 0,1 return .5 -> hi, turn 2 return 0 -> lo; rollout 2: turn 0 hi, turns 1,2 lo
    torch.testing.assert_close(run("tspo_shared", x), on_turns([(hi, hi, lo), (lo, lo, lo), (hi, lo, lo)]))


def test_two_interleaved_groups_of_unequal_lengths():
    # group 3 = rollouts 0, 2; group 9 = rollouts 1, 3; rollout 1 has only 2 turns, then padding
    turns = [LAYOUT_TURNS, [-1, 0, -1, 1, -1, -1], LAYOUT_TURNS, LAYOUT_TURNS]
    policy = [LAYOUT_POLICY, [0, 1, 0, 1, 0, 0], LAYOUT_POLICY, LAYOUT_POLICY]
    x = inputs([1, 0, 0, 0], [0, -1, -1, 1], [3, 9, 3, 9], turns, policy)
    # group 3: o = [1, 0], f = [0, none] -> s = [1.5, 0]
    #   grpo: mean .5, std = sqrt((.25+.25)/1) = .70711 -> A = +-.5/.70711 = +-.70711
    #   s: mean .75, std = sqrt((.5625+.5625)/1) = 1.06066 -> grpo_folr = +-.75/1.06066 = +-.70711
    #   tspo rollout 0: turn 0 (search stage) S = (1.5-.75)/1.06066 = .70711; turns 1,2 (answer stage)
    #                   O = (1-.5)/.70711 = .70711 (grpo's value)
    #   tspo rollout 2 (never found: all search stage): S = (0-.75)/1.06066 = -.70711
    #   tspo_switch: outcomes differ -> grpo on every turn
    #   tspo_shared rollout 0: turn 0 (1.5-.75)/1.06066 = .70711; turns 1,2 (1-.75)/1.06066 = .23570
    # group 9: o = [0, 0], f = [none, 1] -> s = [0, .5]
    #   grpo: all o equal -> 0
    #   s: mean .25, std = sqrt((.0625+.0625)/1) = .35355 -> grpo_folr = +-.25/.35355 = +-.70711
    #   tspo, tspo_switch rollout 1: (0-.25)/.35355 = -.70711 on its two turns
    #   tspo, tspo_switch rollout 3: turns 0,1 (.5-.25)/.35355 = .70711; turn 2 (answer stage, o all equal) 0
    #   tspo_shared rollout 3: turn 2 return 0: (0-.25)/.35355 = -.70711
    s3, s9, so = math.sqrt(1.125) + EPS, math.sqrt(0.125) + EPS, math.sqrt(0.5) + EPS
    g = 0.5 / so
    torch.testing.assert_close(run("grpo", x), on_turns([(g, g, g), (0, 0, 0), (-g, -g, -g), (0, 0, 0)]))
    a, b = 0.75 / s3, 0.25 / s9
    torch.testing.assert_close(run("grpo_folr", x), on_turns([(a, a, a), (-b, -b, 0), (-a, -a, -a), (b, b, b)]))
    torch.testing.assert_close(run("tspo", x), on_turns([(a, g, g), (-b, -b, 0), (-a, -a, -a), (b, b, 0)]))
    torch.testing.assert_close(run("tspo_switch", x), on_turns([(g, g, g), (-b, -b, 0), (-g, -g, -g), (b, b, 0)]))
    c = 0.25 / s3
    torch.testing.assert_close(run("tspo_shared", x),
                               on_turns([(a, c, c), (-b, -b, 0), (-a, -a, -a), (b, b, -b)]))


def test_tspo_md_example_all_found_four_right():
    # TSPO.md "Why the first definition was replaced", first example: five rollouts all found the answer in turn 0,
    # four answered right. o = [1,1,1,1,0], s = [1.5,1.5,1.5,1.5,.5]
    # o: mean .8, sample var (4*.04 + .64)/4 = .2, std .44721 -> O = +.2/.44721 = +.44721 / -.8/.44721 = -1.78885
    # s: mean 1.3, sample var (4*.04 + .64)/4 = .2, std .44721
    x = inputs([1, 1, 1, 1, 0], [0] * 5, [0] * 5)
    sd = math.sqrt(0.2) + EPS
    good, bad = 0.2 / sd, -0.8 / sd  # +.44721, -1.78885
    # tspo: turn 0 (search) S = (1.5-1.3)/.44721 = +.44721 or (.5-1.3)/.44721 = -1.78885; answer turns O = grpo
    assert run("grpo", x)[0, 3].item() == pytest.approx(0.4472, abs=1e-4)
    torch.testing.assert_close(run("tspo", x), on_turns([(good, good, good)] * 4 + [(bad, bad, bad)]))
    torch.testing.assert_close(run("tspo_switch", x), run("grpo", x))  # outcomes differ -> grpo
    # tspo_shared: a correct answer turn (return 1) gets (1-1.3)/.44721 = -.67082 (the documented bias)
    shared = run("tspo_shared", x)
    assert shared[0, 3].item() == pytest.approx(-0.6708, abs=1e-4)
    torch.testing.assert_close(shared, on_turns([(good, -0.3 / sd, -0.3 / sd)] * 4 + [(bad, -1.3 / sd, -1.3 / sd)]))


def test_tspo_md_example_four_successes_one_without_retrieval():
    # Second example: four complete successes (found in turn 0) and one correct answer without retrieval.
    # o = [1]*5 (all equal), s = [1.5]*4 + [1]: mean 1.4, sample var (4*.01 + .16)/4 = .05, std .22361
    x = inputs([1] * 5, [0, 0, 0, 0, -1], [0] * 5)
    sd = math.sqrt(0.05) + EPS
    up, down = 0.1 / sd, -0.4 / sd  # +.44721, -1.78885
    # tspo: search stage S (rollout 4 never found: all its turns are search stage); answer stages 0 (o all equal)
    expected = on_turns([(up, 0, 0)] * 4 + [(down, down, down)])
    torch.testing.assert_close(run("tspo", x), expected)
    torch.testing.assert_close(run("tspo_switch", x), expected)
    # tspo_shared: every correct answer turn (return 1) gets (1-1.4)/.22361 = -1.78885
    shared = run("tspo_shared", x)
    assert shared[0, 3].item() == pytest.approx(-1.7889, abs=1e-4)
    torch.testing.assert_close(shared, on_turns([(up, down, down)] * 4 + [(down, down, down)]))


@pytest.mark.parametrize("o, f", [
    ([1, 1], [0, 0]),        # all s = 1.5 (tspo's answer stage would give (1 - 1.5)/eps without the rule)
    ([0, 0], [-1, -1]),      # all s = 0
    ([0, 0], [0, 2]),        # found at different turns, still all s = 0.5 -> nothing to learn
    ([1, 1, 1], [-1, -1, -1]),
])
@pytest.mark.parametrize("name", NAMES)
def test_all_equal_groups_give_zero(name, o, f):
    x = inputs(o, f, [5] * len(o))
    assert torch.equal(run(name, x), torch.zeros(len(o), 6))


@pytest.mark.parametrize("o, f", [([1], [0]), ([0], [1]), ([1], [-1])])
@pytest.mark.parametrize("name", NAMES)
def test_group_of_size_one_gives_zero(name, o, f):
    # the sample std of one value is undefined -> defined as a degenerate group: advantage 0
    assert torch.equal(run(name, inputs(o, f, [0])), torch.zeros(1, 6))


def test_singleton_next_to_a_real_group():
    # rollout 2 is alone in group 8; rollouts 0, 1 form group 4 with o = [1, 0] -> +-.5/.70711
    x = inputs([1, 0, 1], [-1, -1, -1], [4, 4, 8])
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(run("grpo", x), on_turns([(a, a, a), (-a, -a, -a), (0, 0, 0)]))


# ---------------------------------------------------------------------------------------------------------------
# structural properties and invariances
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_outside_policy_tokens_and_float32(name):
    x = inputs([1, 0, 0], [0, -1, 2], [0, 0, 0])
    adv = run(name, x)
    assert adv.dtype == torch.float32 and adv.shape == (3, 6)
    assert torch.all(adv[~x["policy_mask"].bool()] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_do_not_matter(name):
    x = inputs([1, 0, 0], [0, -1, 2], [0, 0, 0])
    y = dict(x, turn_index=x["turn_index"].clone())
    y["turn_index"][~x["policy_mask"].bool()] = 7  # arbitrary turn values where the mask is 0
    assert torch.equal(run(name, x), run(name, y))


@pytest.mark.parametrize("name", NAMES)
def test_group_id_values_and_order_do_not_matter(name):
    x = inputs([1, 0, 0, 1], [0, -1, 2, -1], [0, 1, 0, 1])
    y = dict(x, group_ids=torch.tensor([-40, 10**12, -40, 10**12]))
    assert torch.equal(run(name, x), run(name, y))
    perm = torch.tensor([3, 1, 0, 2])
    z = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    assert torch.equal(run(name, x)[perm], run(name, z))


def test_alpha_zero_makes_all_estimators_grpo():
    x = dict(inputs([1, 0, 0, 1, 0], [0, 1, -1, 2, 0], [0, 0, 0, 1, 1]), alpha=0.0)
    for name in NAMES:
        torch.testing.assert_close(run(name, x), run("grpo", x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["tspo", "tspo_switch", "tspo_shared"])
def test_tspo_equals_grpo_folr_without_first_occurrence(name):
    x = inputs([1, 0, 0, 1], [-1, -1, -1, -1], [0, 0, 1, 1])
    assert torch.equal(run(name, x), run("grpo_folr", x))


@settings(max_examples=100, deadline=None)
@given(o=st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=6), data=st.data())
def test_tspo_answer_stage_is_grpo_and_search_stage_is_grpo_folr(o, data):
    # the stage-matched estimator: answer-stage tokens carry GRPO's value (never pushed below its sign), search-stage
    # tokens FOLR's trajectory value
    f = data.draw(st.lists(st.integers(-1, 2), min_size=len(o), max_size=len(o)))
    x = inputs(o, f, [0] * len(o))
    turn = x["turn_index"]
    search = (turn <= x["first_occurrence"][:, None]) | (x["first_occurrence"][:, None] < 0)
    answer = x["policy_mask"].bool() & ~search
    assert torch.equal(run("tspo", x)[answer], run("grpo", x)[answer])
    assert torch.equal(run("tspo", x)[search], run("grpo_folr", x)[search])


# ---------------------------------------------------------------------------------------------------------------
# fast path == readable reference on random inputs
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def random_batches(draw):
    B = draw(st.integers(1, 10))
    T = draw(st.integers(1, 8))
    o = draw(st.lists(st.sampled_from([0.0, 1.0, 0.25]), min_size=B, max_size=B))
    f = draw(st.lists(st.integers(-1, 3), min_size=B, max_size=B))
    g = draw(st.lists(st.sampled_from([-3, 0, 2, 17]), min_size=B, max_size=B))
    turns = draw(st.lists(st.lists(st.integers(-1, 3), min_size=T, max_size=T), min_size=B, max_size=B))
    policy = [[int(k >= 0) for k in row] for row in turns]
    alpha = draw(st.sampled_from([0.0, 0.5, 1.3]))
    return dict(outcome=torch.tensor(o), first_occurrence=torch.tensor(f), group_ids=torch.tensor(g),
                turn_index=torch.tensor(turns), policy_mask=torch.tensor(policy), alpha=alpha, eps=EPS)


@settings(max_examples=150, deadline=None)
@given(x=random_batches(), name=st.sampled_from(NAMES))
def test_fast_path_matches_reference_loop(x, name):
    torch.testing.assert_close(run(name, x), reference_advantages(name, **x), rtol=1e-5, atol=1e-5)


def test_group_stats_hand_example():
    st_ = group_stats(torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0]), torch.tensor([5, 5, 1, 9, 9]))
    # sorted unique ids [1, 5, 9] -> group positions: rollouts -> [1, 1, 0, 2, 2]
    assert st_.index.tolist() == [1, 1, 0, 2, 2] and st_.count.tolist() == [1, 2, 2]
    # group 5: mean .5, sample std sqrt(.5); group 1: singleton (std 0, degenerate); group 9: all equal
    torch.testing.assert_close(st_.mean, torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(st_.std, torch.tensor([0.0, math.sqrt(0.5), 0.0], dtype=torch.float64))
    assert st_.degenerate.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------------------------
# registry and validation
# ---------------------------------------------------------------------------------------------------------------
def test_registry_names_and_one_signature():
    assert set(NAMES) <= set(advantage_names())
    sigs = {str(inspect.signature(get_advantage(n))) for n in NAMES}
    assert len(sigs) == 1


def test_unknown_estimator_lists_known_names():
    with pytest.raises(ConfigError, match="grpo.*grpo_folr.*tspo"):
        get_advantage("ppo")


def test_duplicate_registration_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda **kw: None)


@pytest.mark.parametrize("change, message", [
    (dict(turn_index=torch.tensor([[-1, -1, -1, 1, -1, 2]])), "turn index"),   # policy token with turn -1
    (dict(first_occurrence=torch.tensor([-2])), "first_occurrence"),
    (dict(group_ids=torch.tensor([0, 1])), "group_ids"),
    (dict(group_ids=torch.tensor([0.0])), "integer"),
    (dict(policy_mask=torch.ones(1, 5)), "policy_mask"),
])
def test_validation(change, message):
    x = dict(inputs([1], [0], [0]), **change)
    with pytest.raises(ValueError, match=message):
        run("tspo", x)


# ---------------------------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------------------------
def test_zero_variance_shares_under_o_and_s():
    # group 0: o = [0, 0], f = [1, none] -> o all equal, s = [.5, 0] varies
    # group 1: o = [1, 0]               -> both vary
    # group 2: o = [0, 0], f = [none, none] -> both all equal
    # group 3: a single rollout         -> counts as zero-variance under both
    o = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    f = torch.tensor([1, -1, 0, -1, -1, -1, 0])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    # under o: groups 0, 2, 3 -> 3/4; under s: groups 2, 3 -> 2/4
    assert group_diagnostics(o, f, g, alpha=0.5) == {"zero_var_share_o": 0.75, "zero_var_share_s": 0.5}
    assert zero_variance_share(o, g) == 0.75


def test_category_shares():
    # f found? x correct?: (y, y) (y, n) (n, n) (n, n) (y, y) -> complete 2/5, near 1/5, without 0, failure 2/5
    shares = category_shares(torch.tensor([0, 2, -1, -1, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))
    assert shares == {"complete_success": 0.4, "near_miss": 0.2, "success_without_retrieval": 0.0,
                      "complete_failure": 0.4}
    assert category_shares(torch.tensor([-1]), torch.tensor([1.0]))["success_without_retrieval"] == 1.0
    with pytest.raises(ValueError):
        category_shares(torch.tensor([], dtype=torch.long), torch.tensor([]))
