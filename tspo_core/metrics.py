"""Answer metrics (SQuAD-style) and answer extraction. Pure: standard library only.

- `normalize_answer`: lowercase, strip punctuation, drop the articles a/an/the, collapse whitespace.
- `exact_match`: normalized prediction equals any normalized gold answer (0/1).
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
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _is_punct(ch: str) -> bool:
    # ASCII punctuation plus unicode punctuation categories (e.g. the en dash, curly quotes, « »).
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalization, unicode-aware for punctuation (letters with accents are kept as they are)."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if _is_punct(ch) else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


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
