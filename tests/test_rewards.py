"""Outcome reward, FOLR first occurrence (matching edge cases), turn rewards and returns, categories, format."""

from __future__ import annotations

import pytest

from tspo_core.agent.protocol import format_observation
from tspo_core.agent.rewards import (CATEGORIES, category, first_occurrence_turn, format_reward, outcome_reward,
                                     turn_returns, turn_rewards)
from tspo_core.data.schema import Passage


# ---------------------------------------------------------------------------------------------------------------
# outcome
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, golds, expected", [
    ("Paris", ["Paris"], 1.0),
    ("  the paris. ", ["Paris"], 1.0),             # articles, punctuation, case, whitespace
    ("Lyon", ["Paris", "Lyon"], 1.0),              # any gold
    ("Paris, France", ["Paris"], 0.0),             # exact, not containment
    (None, ["Paris"], 0.0),                        # no answer
    ("", ["Paris"], 0.0),
    ("Paris", [], 0.0),
])
def test_outcome_reward(answer, golds, expected):
    assert outcome_reward(answer, golds) == expected


# ---------------------------------------------------------------------------------------------------------------
# first occurrence
# ---------------------------------------------------------------------------------------------------------------
def test_first_occurrence_is_the_first_of_several_and_0_based():
    obs = [None, "nothing relevant", "Paris is the capital.", "Paris again."]
    assert first_occurrence_turn(obs, ["Paris"]) == 2


def test_word_boundaries():
    assert first_occurrence_turn(["a Parisian cafe"], ["Paris"]) is None
    assert first_occurrence_turn(["in Paris."], ["Paris"]) == 0
    assert first_occurrence_turn(["Comparison of cities"], ["Paris"]) is None  # substring inside a word


@pytest.mark.parametrize("text, gold", [
    ("He was born in São Paulo!", "São Paulo"),
    ("the band 'The Beatles' formed", "Beatles"),    # ASCII punctuation and the article
    ("ZÜRICH is a city", "zürich"),                   # case of non-ASCII letters
    ("fought in 1914-1918, mostly", "1914-1918"),     # the hyphen is deleted on both sides
])
def test_normalized_matches(text, gold):
    assert first_occurrence_turn([text], [gold]) == 0


@pytest.mark.parametrize("text, gold", [
    ("the band «The Beatles» formed", "Beatles"),    # guillemets are not ASCII punctuation: «the / beatles»
    ("“Zürich” is a city", "ZÜRICH"),               # curly quotes stay attached to the word
    ("fought in 1914–1918, mostly", "1914-1918"),     # en dash in the text, hyphen in the gold
    ("New-York based company", "new york"),          # "newyork" is not the words "new york"
])
def test_search_r1_matching_misses_what_only_lenient_finds(text, gold):
    # Search-R1's normalize_answer deletes string.punctuation only (TSPO.md "Answer matching"): these are not found
    # under the default and are found under the lenient option
    assert first_occurrence_turn([text], [gold]) is None
    assert first_occurrence_turn([text], [gold], "lenient") == 0


def test_answer_only_in_the_models_own_text_does_not_count():
    # the model names "Paris" in its query and its answer, but no retrieved passage contains it: the turns that
    # did not search have no observation (None), and the search's observation lacks the answer
    turns = ["<search> is Paris the capital of France </search>", "<answer> Paris </answer>"]
    observations = [format_observation([Passage("1", '"France"\nFrance is a country in Europe.')]), None]
    assert "Paris" in turns[0]
    assert first_occurrence_turn(observations, ["Paris"]) is None


def test_formatting_scaffolding_does_not_match():
    # "Doc 1(Title: ...)" labels and the <information> wrapper are not retrieved evidence
    obs = format_observation([Passage("1", '"Alpha"\nsome text'), Passage("2", '"Beta"\nmore text')])
    assert first_occurrence_turn([obs], ["1"]) is None
    assert first_occurrence_turn([obs], ["2"]) is None
    assert first_occurrence_turn([obs], ["information"]) is None
    assert first_occurrence_turn([obs], ["doc"]) is None
    # while the passage title and text do count
    assert first_occurrence_turn([obs], ["Beta"]) == 0
    assert first_occurrence_turn([obs], ["more text"]) == 0


def test_no_observation_or_no_gold():
    assert first_occurrence_turn([], ["Paris"]) is None
    assert first_occurrence_turn([None, None], ["Paris"]) is None
    assert first_occurrence_turn(["Paris"], []) is None
    assert first_occurrence_turn(["Paris"], ["", "  "]) is None  # empty golds never match


def test_any_gold_counts():
    assert first_occurrence_turn(["x", "the City of Light"], ["Paris", "City of Light"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# turn rewards and returns
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K, f, o, expected", [
    (4, 1, 0.0, [0.0, 0.5, 0.0, 0.0]),   # near miss: alpha at f = 1 only
    (4, 1, 1.0, [0.0, 0.5, 0.0, 1.0]),   # r[f] = 0.5, r[K-1] += 1
    (3, None, 1.0, [0.0, 0.0, 1.0]),     # no first occurrence: outcome on the last turn
    (3, None, 0.0, [0.0, 0.0, 0.0]),
    (2, 1, 1.0, [0.0, 1.5]),             # f = K-1: 0.5 + 1
    (1, None, 1.0, [1.0]),
])
def test_turn_rewards(K, f, o, expected):
    assert turn_rewards(K, f, o, alpha=0.5) == expected


def test_turn_returns_give_search_and_answer_stage_values():
    # r = [0, 0.5, 0, 1] -> R = [1.5, 1.5, 1, 1]: turns up to f have alpha + o, later turns o
    assert turn_returns(turn_rewards(4, 1, 1.0, alpha=0.5)) == [1.5, 1.5, 1.0, 1.0]
    assert turn_returns([]) == []


@pytest.mark.parametrize("K, f, o", [(3, 0, 0.0), (3, 2, 1.0), (5, None, 1.0), (1, 0, 0.0)])
def test_first_return_is_the_trajectory_score(K, f, o):
    # R[0] = s = o + alpha [f found]
    assert turn_returns(turn_rewards(K, f, o, alpha=0.5))[0] == o + (0.5 if f is not None else 0.0)


@pytest.mark.parametrize("K, f", [(0, None), (3, 3), (3, -1)])
def test_turn_rewards_errors(K, f):
    with pytest.raises(ValueError):
        turn_rewards(K, f, 1.0, alpha=0.5)


# ---------------------------------------------------------------------------------------------------------------
# categories and format
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f, o, expected", [
    (0, 1.0, "complete_success"),
    (2, 0.0, "near_miss"),
    (None, 1.0, "success_without_retrieval"),
    (None, 0.0, "complete_failure"),
    (1, 0.5, "near_miss"),              # shaped value below 1 is not a success
])
def test_category(f, o, expected):
    assert category(f, o) == expected
    assert expected in CATEGORIES


@pytest.mark.parametrize("turns, expected", [
    (["<search> q </search>", "<answer> a </answer>"], 0.1),
    (["<answer> a </answer>"], 0.1),
    (["<search> q </search>", "<search> r </search>"], 0.0),   # never answered
    (["<answer> a </answer>", "<answer> b </answer>"], 0.0),   # answer before the last turn
    (["oops", "<answer> a </answer>"], 0.0),                   # an invalid turn
    ([], 0.0),
])
def test_format_reward(turns, expected):
    assert format_reward(turns, bonus=0.1) == expected
