"""Answer metrics and extraction: Search-R1's matching (the default) and the lenient option, hand-computed cases,
unicode, degenerate answers, and a few properties."""

from __future__ import annotations

import doctest
import re
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tspo_core import metrics
from tspo_core.metrics import (NORMALIZATIONS, contains_answer, cover_exact_match, exact_match, extract_answer,
                               f1_score, normalize_answer)

L = "lenient"


def spec_normalize(text: str) -> str:
    """TSPO.md "Answer matching", word for word: lowercase; delete every character of string.punctuation; drop the
    words a/an/the; collapse whitespace. Written from the spec, as the oracle for the property test below."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


# ----------------------------------------------------------------------------------------------------------------
# Search-R1 normalization (the default)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("An apple a day", "apple day"),
    ("  Multiple\t\nspaces   here ", "multiple spaces here"),
    # dashes: an ASCII hyphen is deleted, not spaced; an en/em dash is not in string.punctuation and stays
    ("Two-for-Tonight", "twofortonight"),
    ("1914-1918", "19141918"),
    ("1914\u20131918", "1914\u20131918"),
    ("war\u2014peace", "war\u2014peace"),
    # quotes: straight quotes go, curly quotes and guillemets stay
    ("\"Hello\"", "hello"),
    ("\u201cHello\u201d", "\u201chello\u201d"),
    ("\u00abParis\u00bb", "\u00abparis\u00bb"),
    # apostrophes: the ASCII one goes, the curly one stays
    ("O'Brien's", "obriens"),
    ("O\u2019Brien", "o\u2019brien"),
    # accents are kept; no Unicode normalization, so decomposed and composed forms differ
    ("Wilhelm Conrad R\u00f6ntgen", "wilhelm conrad r\u00f6ntgen"),
    ("Ro\u0308ntgen", "ro\u0308ntgen"),
    # numbers with commas and initials: punctuation deleted inside words
    ("1,000", "1000"),
    ("U.S.A.", "usa"),
    # articles are whole words only
    ("The theater", "theater"),
    ("Anatomy of Athena", "anatomy of athena"),
    ("a", ""),
    ("THE AN A", ""),
    ("The The", ""),
])
def test_normalize_search_r1(text, expected):
    assert normalize_answer(text) == expected
    assert normalize_answer(text, "search_r1") == expected == spec_normalize(text)


@pytest.mark.parametrize("pred, golds, expected", [
    ("Paris", ["paris"], 1.0),
    ("paris", ["London", "Paris"], 1.0),           # any gold
    ("The Paris.", ["paris"], 1.0),
    ("Paris, France", ["Paris"], 0.0),             # EM is not containment
    ("Two for Tonight", ["Two-for-Tonight"], 0.0),  # the hyphen is deleted, so the words join
    ("twofortonight", ["Two-for-Tonight"], 1.0),
    ("1914\u20131918", ["1914-1918"], 0.0),         # en dash kept, hyphen deleted
    ("\u00abParis\u00bb", ["Paris"], 0.0),           # guillemets are not ASCII punctuation
    ("\u201cParis\u201d", ["\"Paris\""], 0.0),
    ("O\u2019Brien", ["O'Brien"], 0.0),             # curly vs straight apostrophe
    ("R\u00f6ntgen", ["Rontgen"], 0.0),               # accents are significant
    ("Ro\u0308ntgen", ["R\u00f6ntgen"], 0.0),        # and so is the Unicode form
    ("1000", ["1,000"], 1.0),
    ("USA", ["U.S.A."], 1.0),
    ("Paris", [], 0.0),                            # no golds
    # Search-R1's em_check compares the normalized strings as they are: "" equals ""
    ("the", ["A"], 1.0),
    ("", ["!!!"], 1.0),
    ("", ["Paris"], 0.0),
])
def test_exact_match_search_r1(pred, golds, expected):
    assert exact_match(pred, golds) == expected


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_text, st.lists(_text, min_size=1, max_size=3))
def test_search_r1_em_is_the_spec(pred, golds):
    assert normalize_answer(pred) == spec_normalize(pred)
    assert exact_match(pred, golds) == float(any(spec_normalize(pred) == spec_normalize(g) for g in golds))


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown answer normalization 'nfc'.*search_r1"):
        exact_match("Paris", ["Paris"], "nfc")
    assert NORMALIZATIONS == ("search_r1", "lenient")


def test_module_doctest():
    result = doctest.testmod(metrics)
    assert result.attempted >= 1 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------
# lenient normalization (an option)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel-Tower!", "eiffel tower"),
    ("U.S.A.", "usa"),            # punctuation is deleted inside words (as SQuAD)...
    ("1,000", "1000"),
    ("Eiffel-Tower", "eiffel tower"),  # ...but a dash separates words
    ("O'Brien's", "obriens"),
    ("Ro\u0308ntgen", "r\u00f6ntgen"),  # NFC: decomposed equals composed
    ("\u201cHello\u201d", "hello"),
    ("\u2018Tis the season\u2019", "tis season"),
    ("1914\u20131918", "1914 1918"),
    ("war\u2014peace", "war peace"),
    ("\u00abParis\u00bb", "paris"),
    ("wait\u2026", "wait"),
    ("\u00bfQu\u00e9?", "qu\u00e9"),
])
def test_normalize_lenient(text, expected):
    assert normalize_answer(text, L) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("Ro\u0308ntgen", ["R\u00f6ntgen"], 1.0),
    ("\u00abParis\u00bb", ["\u201cParis\u201d"], 1.0),
    ("1914\u20131918", ["1914-1918"], 1.0),
    ("U.S.", ["U.S.A."], 0.0),                     # initials keep their "a"
    ("O\u2019Brien", ["O'Brien"], 1.0),            # curly and straight apostrophes alike
    ("theater", ["the ater"], 0.0),
])
def test_exact_match_lenient(pred, golds, expected):
    assert exact_match(pred, golds, L) == expected


def test_none_prediction_scores_zero():
    for norm in NORMALIZATIONS:
        assert exact_match(None, ["Paris"], norm) == 0.0
        assert f1_score(None, ["Paris"], norm) == 0.0
        assert cover_exact_match(None, ["Paris"], norm) == 0.0


@pytest.mark.parametrize("pred, golds", [
    ("", ["!!!"]),          # both normalize to nothing
    ("...", ["?"]),
    ("", ["Paris"]),
    ("!!!", ["Paris"]),
    ("the", ["Paris"]),
    ("", ["The The"]),     # an empty answer must not match an articles-only gold
    ("a", ["The The"]),
])
def test_lenient_empty_or_punctuation_answers_never_match(pred, golds):
    assert exact_match(pred, golds, L) == 0.0
    assert f1_score(pred, golds, L) == 0.0
    assert cover_exact_match(pred, golds, L) == 0.0


def test_lenient_articles_only_gold_matches_itself():
    # The band "The The": normalization would empty it; the lenient matcher compares it with its articles kept.
    assert exact_match("the the", ["The The"], L) == 1.0
    assert exact_match("The The!", ["The The"], L) == 1.0
    assert f1_score("the the", ["The The"], L) == 1.0


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
    # the hyphen is deleted: {19141918} vs {1914}: nothing in common
    ("1914-1918", ["1914"], 0.0),
])
def test_f1(pred, golds, expected):
    assert f1_score(pred, golds) == pytest.approx(expected)


def test_f1_lenient_splits_on_dashes():
    # {1914, 1918} vs {1914}: P = 1/2, R = 1 -> 2/3
    assert f1_score("1914\u20131918", ["1914"], L) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------------------
# cover EM / contains_answer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, golds, expected", [
    ("He was born in Paris, France.", ["paris"], 1.0),
    ("Parisian cafes", ["paris"], 0.0),            # whole words only
    ("the new york times", ["New York"], 1.0),
    ("yorkshire", ["york"], 0.0),
    ("Röntgen won it", ["röntgen"], 1.0),
    ("Two-for-Tonight", ["two for tonight"], 0.0),  # "twofortonight" has no word "two"
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
    assert exact_match(extract_answer("<answer></answer>"), ["Paris"], L) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=200, deadline=None)
@given(_text, st.sampled_from(NORMALIZATIONS))
def test_normalize_idempotent(text, norm):
    once = normalize_answer(text, norm)
    assert normalize_answer(once, norm) == once


@settings(max_examples=200, deadline=None)
@given(_text, st.lists(_text, min_size=1, max_size=3), st.sampled_from(NORMALIZATIONS))
def test_scores_bounded_and_consistent(pred, golds, norm):
    em, f1, cem = exact_match(pred, golds, norm), f1_score(pred, golds, norm), cover_exact_match(pred, golds, norm)
    assert em in (0.0, 1.0) and cem in (0.0, 1.0)
    assert 0.0 <= f1 <= 1.0
    if em and normalize_answer(pred, norm):
        assert f1 == pytest.approx(1.0)
    if em and any(normalize_answer(g, norm) for g in golds if normalize_answer(g, norm) == normalize_answer(pred, norm)):
        assert cem == 1.0


@settings(max_examples=200, deadline=None)
@given(_text)
def test_answer_matches_itself(text):
    assert exact_match(text, [text]) == 1.0  # Search-R1: always, even when both normalize to ""
    assume(text.strip())
    if normalize_answer(text, L) or metrics._light_normalize_lenient(text):
        assert exact_match(text, [text], L) == 1.0
    else:
        assert exact_match(text, [text], L) == 0.0
