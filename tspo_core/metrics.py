"""Answer metrics (Search-R1 / SQuAD) and answer extraction. Pure: standard library only.

Two answer normalizations, picked by name (`eval.answer_normalization`); every metric takes it as `normalization`:

- `"search_r1"` (the default, TSPO.md "Answer matching"): exactly Search-R1's / SQuAD's `normalize_answer`:
  lowercase; delete every character of `string.punctuation` (a dash is deleted, not spaced: "Two-for-Tonight" ->
  "twofortonight"); drop the words a/an/the; collapse whitespace. No Unicode normalization: curly quotes, en dashes,
  guillemets and other non-ASCII punctuation stay, and a decomposed accent differs from a composed one. EM is
  Search-R1's `em_check`: the normalized prediction equals some normalized gold (so, as there, an answer that
  normalizes to "" matches a gold that normalizes to "", e.g. "A" against "the").
- `"lenient"` (an option, never the default; this project's matcher before the revision): NFC first, dashes
  (Unicode category Pd) become spaces, every Unicode punctuation character is deleted; an answer that normalizes to
  nothing matches nothing, and a gold made only of articles ("The The") is compared with its articles kept.

Metrics (prediction None -> 0):
- `exact_match`: 0/1, see above.
- `f1_score`: best SQuAD token-level F1 against the gold answers (0 when either side has no tokens).
- `cover_exact_match`: some normalized gold occurs in the normalized prediction *on word boundaries* (Search-R1's
  `subem_check` tests a plain substring; ours does not let gold "1" cover "1914"). An empty gold covers nothing.
- `contains_answer`: the same test on any text (FOLR's "gold answer appears", retrieval answer recall).
- `extract_answer`: the text of the *last* complete `<answer>...</answer>` in the response (never the prompt).

>>> exact_match("The  Eiffel Tower!", ["eiffel tower"])
1.0
>>> exact_match("Eiffel-Tower", ["Eiffel Tower"]), exact_match("Eiffel-Tower", ["Eiffel Tower"], "lenient")
(0.0, 1.0)
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

NORMALIZATIONS: tuple[str, ...] = ("search_r1", "lenient")
DEFAULT_NORMALIZATION = "search_r1"

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The innermost complete pair: in "<answer>x <answer>y</answer>" the answer is "y" (the opener with no closer of its
# own is not part of the answer).
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def _normalize_search_r1(text: str) -> str:
    """Search-R1's `normalize_answer`: white_space_fix(remove_articles(remove_punc(lower(text))))."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _strip_punct_lenient(text: str) -> str:
    # Deleting (not spacing) in-word punctuation keeps initials whole ("U.S.A." = "usa"); dashes become spaces.
    return "".join(" " if unicodedata.category(ch) == "Pd"
                   else "" if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P") else ch
                   for ch in text)


def _normalize_lenient(text: str) -> str:
    text = _strip_punct_lenient(unicodedata.normalize("NFC", text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def _light_normalize_lenient(text: str) -> str:
    """The lenient normalization without the article removal (for golds made only of articles, "The The")."""
    return " ".join(_strip_punct_lenient(unicodedata.normalize("NFC", text).lower()).split())


_NORMALIZERS: dict[str, Callable[[str], str]] = {"search_r1": _normalize_search_r1, "lenient": _normalize_lenient}


def _normalizer(normalization: str) -> Callable[[str], str]:
    try:
        return _NORMALIZERS[normalization]
    except KeyError:
        raise ValueError(f"unknown answer normalization {normalization!r}; known: {list(NORMALIZATIONS)}") from None


def normalize_answer(text: str, normalization: str = DEFAULT_NORMALIZATION) -> str:
    """`text` normalized as named (see the module docstring).

    >>> normalize_answer("The Two-for-Tonight, U.S.A."), normalize_answer("The Two-for-Tonight", "lenient")
    ('twofortonight usa', 'two for tonight')
    """
    return _normalizer(normalization)(text)


def _comparable(prediction: str, golds: Sequence[str], normalization: str) -> list[tuple[str, str]]:
    """(normalized prediction, normalized gold) per gold. Under "lenient" a gold that normalizes to nothing but has
    words (only articles) is compared with the articles kept on both sides."""
    norm = _normalizer(normalization)
    pred = norm(prediction)
    if normalization == "search_r1":
        return [(pred, norm(g)) for g in golds]
    pairs = []
    for g in golds:
        gold = norm(g)
        pairs.append((pred, gold) if gold else (_light_normalize_lenient(prediction), _light_normalize_lenient(g)))
    return pairs


def exact_match(prediction: str | None, golds: Sequence[str], normalization: str = DEFAULT_NORMALIZATION) -> float:
    if prediction is None:
        return 0.0
    # search_r1: em_check compares the strings as they are (empty == empty counts); lenient: an empty answer never
    # earns a reward.
    need_words = normalization != "search_r1"
    return float(any(p == g and (p or not need_words) for p, g in _comparable(prediction, golds, normalization)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:  # also when either side has no tokens (SQuAD's f1_score)
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Sequence[str], normalization: str = DEFAULT_NORMALIZATION) -> float:
    if prediction is None:
        return 0.0
    return max((_f1(p.split(), g.split()) for p, g in _comparable(prediction, golds, normalization)), default=0.0)


def contains_answer(text: str, golds: Sequence[str], normalization: str = DEFAULT_NORMALIZATION) -> bool:
    """Some normalized gold answer occurs in the normalized text as a whole-word span (an empty gold never does)."""
    norm = _normalizer(normalization)
    hay = f" {norm(text)} "
    return any(n and f" {n} " in hay for n in (norm(g) for g in golds))


def cover_exact_match(prediction: str | None, golds: Sequence[str],
                      normalization: str = DEFAULT_NORMALIZATION) -> float:
    if prediction is None:
        return 0.0
    return float(contains_answer(prediction, golds, normalization))


def extract_answer(response: str) -> str | None:
    """Text of the last complete `<answer>...</answer>` in the *response* (pass the generated text only), stripped;
    None when there is none."""
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None
