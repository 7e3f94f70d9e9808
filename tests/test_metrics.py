"""Answer metrics and extraction: hand-computed cases, unicode, degenerate answers, and a few properties."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tspo_core import metrics
from tspo_core.metrics import (contains_answer, cover_exact_match, exact_match, extract_answer, f1_score,
                               normalize_answer)


# ----------------------------------------------------------------------------------------------------------------
# normalization
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel-Tower!", "eiffel tower"),
    ("An apple a day", "apple day"),
    ("  Multiple\t\nspaces   here ", "multiple spaces here"),
    ("U.S.A.", "usa"),            # punctuation is deleted inside words (as SQuAD)...
    ("1,000", "1000"),
    ("Eiffel-Tower", "eiffel tower"),  # ...but a dash separates words
    ("O'Brien's", "obriens"),
    # articles are whole words only: inside a word they stay
    ("The theater", "theater"),
    ("Anatomy of Athena", "anatomy of athena"),
    ("Thermal theta", "thermal theta"),
    ("a", ""),
    ("THE AN A", ""),
])
def test_normalize_ascii(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    # letters with accents are kept (lowercased), not stripped or transliterated
    ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
    ("Małgorzata Braunek", "małgorzata braunek"),
    ("ÉCOLE Normale", "école normale"),
    # decomposed (NFD) input compares equal to composed (NFC)
    ("Ro\u0308ntgen", "röntgen"),
    # unicode punctuation is stripped: curly quotes, en/em dash, guillemets, ellipsis
    ("\u201cHello\u201d", "hello"),
    ("\u2018Tis the season\u2019", "tis season"),
    ("1914\u20131918", "1914 1918"),
    ("war\u2014peace", "war peace"),
    ("\u00abParis\u00bb", "paris"),
    ("wait\u2026", "wait"),
    ("\u00bfQu\u00e9?", "qué"),
])
def test_normalize_unicode(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_punctuation_only():
    assert normalize_answer("?!...") == ""
    assert normalize_answer("\u201c\u2013\u201d") == ""


def test_module_doctest():
    result = doctest.testmod(metrics)
    assert result.attempted >= 1 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------
# exact match
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, golds, expected", [
    ("Paris", ["paris"], 1.0),
    ("paris", ["London", "Paris"], 1.0),           # any gold
    ("The Paris.", ["paris"], 1.0),
    ("Paris, France", ["Paris"], 0.0),             # EM is not containment
    ("Röntgen", ["Rontgen"], 0.0),                 # accents are significant
    ("Ro\u0308ntgen", ["Röntgen"], 1.0),          # but the unicode form is not
    ("\u00abParis\u00bb", ["\u201cParis\u201d"], 1.0),
    ("theater", ["the ater"], 0.0),
    ("1914\u20131918", ["1914-1918"], 1.0),
    ("Paris", [], 0.0),                            # no golds
    ("USA", ["U.S.A."], 1.0),
    ("U.S.", ["U.S.A."], 0.0),                     # initials keep their "a"
    ("1000", ["1,000"], 1.0),
    ("O’Brien", ["O'Brien"], 1.0),            # curly and straight apostrophes alike
])
def test_exact_match(pred, golds, expected):
    assert exact_match(pred, golds) == expected


def test_none_prediction_scores_zero():
    assert exact_match(None, ["Paris"]) == 0.0
    assert f1_score(None, ["Paris"]) == 0.0
    assert cover_exact_match(None, ["Paris"]) == 0.0


@pytest.mark.parametrize("pred, golds", [
    ("", ["!!!"]),          # both normalize to nothing
    ("...", ["?"]),
    ("", ["Paris"]),
    ("!!!", ["Paris"]),
    ("the", ["Paris"]),
    ("", ["The The"]),     # an empty answer must not match an articles-only gold
    ("a", ["The The"]),
])
def test_empty_or_punctuation_answers_never_match(pred, golds):
    assert exact_match(pred, golds) == 0.0
    assert f1_score(pred, golds) == 0.0
    assert cover_exact_match(pred, golds) == 0.0


def test_articles_only_gold_matches_itself():
    # The band "The The": normalization would empty it; it is compared with its articles kept.
    assert exact_match("the the", ["The The"]) == 1.0
    assert exact_match("The The!", ["The The"]) == 1.0
    assert f1_score("the the", ["The The"]) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# F1
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, golds, expected", [
    ("Paris", ["paris"], 1.0),
    # pred {big, red, dog}, gold {red, dog}: P = 2/3, R = 1 -> 0.8
    ("the big red dog", ["red dog"], 0.8),
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2 -> 2/3
    ("a cat sat", ["the cat sat on the mat"], 2 / 3),
    # repeated tokens count once per gold occurrence: common = 1, P = 1/3, R = 1 -> 0.5
    ("dog dog dog", ["dog"], 0.5),
    ("london", ["paris"], 0.0),
    # best over golds
    ("new york city", ["york", "new york city"], 1.0),
    # 3 tokens vs 2 tokens, 1 common: P = 1/3, R = 1/2 -> 0.4
    ("joseph louis lagrange", ["louis pasteur"], 0.4),
    # unicode punctuation splits tokens: {1914, 1918} vs {1914}: P = 1/2, R = 1 -> 2/3
    ("1914\u20131918", ["1914"], 2 / 3),
])
def test_f1(pred, golds, expected):
    assert f1_score(pred, golds) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------
# cover EM / contains_answer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, golds, expected", [
    ("He was born in Paris, France.", ["paris"], 1.0),
    ("Parisian cafes", ["paris"], 0.0),            # whole words only
    ("the new york times", ["New York"], 1.0),
    ("yorkshire", ["york"], 0.0),
    ("Röntgen won it", ["röntgen"], 1.0),
    ("nothing here", ["paris", "london"], 0.0),
    ("paris", ["!!!"], 0.0),                        # an empty gold is never "contained"
])
def test_cover_exact_match(pred, golds, expected):
    assert cover_exact_match(pred, golds) == expected


def test_contains_answer_on_passage_text():
    passage = "\"Wilhelm Röntgen\"\nWilhelm Conrad Röntgen received the first Nobel Prize in Physics in 1901."
    assert contains_answer(passage, ["Wilhelm Conrad Röntgen"])
    assert contains_answer(passage, ["nobel prize"])
    assert not contains_answer(passage, ["Marie Curie"])


# ----------------------------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ("<think>easy</think>\n<answer> Paris </answer>", "Paris"),
    ("<answer>London</answer> wait, no: <answer>Paris</answer>", "Paris"),     # last wins
    ("<answer>a</answer><answer>b</answer><answer>c</answer>", "c"),
    ("<answer>\n  New\nYork \n</answer>", "New\nYork"),                          # multi-line, stripped
    ("<answer>Paris</answer> then <answer>London", "Paris"),                     # trailing unclosed tag ignored
    ("<answer>unsure <answer>Paris</answer>", "Paris"),                          # innermost complete pair
    ("<answer>Paris", None),                                                     # unclosed
    ("Paris</answer>", None),
    ("no tags at all", None),
    ("", None),
    ("<answer></answer>", ""),
    ("<ANSWER>Paris</ANSWER>", None),                                            # tags are case-sensitive
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_then_score_end_to_end():
    response = "<think>search</think><search>first nobel physics</search><answer>Wilhelm Röntgen</answer>"
    pred = extract_answer(response)
    assert exact_match(pred, ["Wilhelm Conrad Röntgen", "Wilhelm Röntgen"]) == 1.0
    assert exact_match(extract_answer("<answer></answer>"), ["Paris"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=200, deadline=None)
@given(_text)
def test_normalize_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@settings(max_examples=200, deadline=None)
@given(_text, st.lists(_text, min_size=1, max_size=3))
def test_scores_bounded_and_consistent(pred, golds):
    em, f1, cem = exact_match(pred, golds), f1_score(pred, golds), cover_exact_match(pred, golds)
    assert em in (0.0, 1.0) and cem in (0.0, 1.0)
    assert 0.0 <= f1 <= 1.0
    if em:
        assert f1 == pytest.approx(1.0)
    if em and any(normalize_answer(g) for g in golds if normalize_answer(g) == normalize_answer(pred)):
        assert cem == 1.0


@settings(max_examples=200, deadline=None)
@given(_text)
def test_answer_matches_itself_unless_empty(text):
    assume(text.strip())
    if normalize_answer(text) or metrics._light_normalize(text):
        assert exact_match(text, [text]) == 1.0
    else:
        assert exact_match(text, [text]) == 0.0
