"""Answer metrics (SQuAD-style) and answer extraction. Pure: standard library only.

- `normalize_answer`: lowercase, strip punctuation, drop the articles a/an/the, collapse whitespace. As in SQuAD,
  punctuation is deleted ("U.S.A." = "USA", "1,000" = "1000", "O'Brien" = "OBrien"), except dashes, which separate
  words ("Eiffel-Tower" = "Eiffel Tower", "1914-1918" = "1914 1918"). Unicode punctuation counts (curly quotes,
  en/em dashes, guillemets); letters with accents are kept.
- `exact_match`: normalized prediction equals any normalized gold answer (0/1). An answer that normalizes to
  nothing matches nothing (no reward for an empty answer); a gold made only of articles ("The The") is compared
  with its articles kept.
- `f1_score`: best token-level F1 against the gold answers.
- `cover_exact_match`: some normalized gold answer appears in the normalized prediction on word boundaries.
- `extract_answer`: the text of the *last* `<answer>...</answer>` in the response (never the prompt).

>>> exact_match("The  Eiffel-Tower!", ["eiffel tower"])
1.0
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The innermost complete pair: in "<answer>x <answer>y</answer>" the answer is "y" (the opener with no closer of its
# own is not part of the answer).
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def _is_punct(ch: str) -> bool:
    # ASCII punctuation plus unicode punctuation categories (e.g. the en dash, curly quotes, « »).
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def _strip_punct(text: str) -> str:
    # Deleting (not spacing) in-word punctuation keeps initials whole: spacing turned "U.S.A." into "u s a", whose
    # "a" then went as an article, so "U.S.A." matched "U.S.". Dashes (category Pd) become spaces.
    return "".join(" " if unicodedata.category(ch) == "Pd" else "" if _is_punct(ch) else ch for ch in text)


def normalize_answer(text: str) -> str:
    """SQuAD normalization, unicode-aware for punctuation (letters with accents are kept as they are)."""
    text = _strip_punct(unicodedata.normalize("NFC", text).lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _light_normalize(text: str) -> str:
    """`normalize_answer` without the article removal (for golds made only of articles, e.g. the band "The The")."""
    return " ".join(_strip_punct(unicodedata.normalize("NFC", text).lower()).split())


def _comparable(prediction: str, golds: Sequence[str]) -> list[tuple[str, str]]:
    """(normalized prediction, normalized gold) per gold. A gold that normalizes to nothing but still has words
    (only articles) is compared with the articles kept on both sides; one with no words at all (punctuation only)
    stays empty and can match nothing. An empty prediction matches nothing either, so `<answer></answer>` or
    `<answer>the</answer>` never earns a reward."""
    pred = normalize_answer(prediction)
    pairs = []
    for g in golds:
        gold = normalize_answer(g)
        pairs.append((pred, gold) if gold else (_light_normalize(prediction), _light_normalize(g)))
    return pairs


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    return float(any(p and p == g for p, g in _comparable(prediction, golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # nothing to compare: no credit (never empty == empty)
        return 0.0
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    return max((_f1(p.split(), g.split()) for p, g in _comparable(prediction, golds)), default=0.0)


def contains_answer(text: str, golds: Sequence[str]) -> bool:
    """Some normalized gold answer occurs in the normalized text as a whole-word span."""
    hay = f" {normalize_answer(text)} "
    return any(n and f" {n} " in hay for n in (normalize_answer(g) for g in golds))


def cover_exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    return float(contains_answer(prediction, golds))


def extract_answer(response: str) -> str | None:
    """Text of the last complete `<answer>...</answer>` in the *response* (pass the generated text only), stripped;
    None when there is none."""
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None
