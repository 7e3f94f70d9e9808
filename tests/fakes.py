"""Fakes at the boundaries shared by the engine and evaluation tests: a tiny world, a tokenizer over it, and a
dict-backed retriever."""

from __future__ import annotations

from tspo_core.data.schema import Passage
from tspo_core.policy import build_tokenizer

SYLLABLES = ["ba", "bo", "ni", "ka", "lo", "ra", "mi", "tu"]
WORDS = ["Question was born in the city of Doc Title Answer the question below answer search think unknown"]

PASSAGES = {
    "Bobani": [Passage("p1", '"Bobani"\nBobani was born in Kalora.'), Passage("p2", '"Mitu"\nMitu was born in Bo.')],
    "Kalora": [Passage("p3", '"Kalora"\nKalora is a city of Tuni.')],
}


def tokenizer():
    return build_tokenizer(WORDS, SYLLABLES)


class DictRetriever:
    """Exact-match fake: the query is the key; unknown queries return nothing. `calls` records each batch."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def search(self, queries, top_k):
        self.calls.append(list(queries))
        return [self.table.get(q, [])[:top_k] for q in queries]
