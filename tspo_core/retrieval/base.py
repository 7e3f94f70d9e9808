"""The retriever interface shared by the in-process indexes, the HTTP client and the server.

A retriever maps a batch of query strings to, per query, the top-k passages (best first). `search` returns the
passages only; `search_with_scores` returns `Hit(passage, score)` pairs (inner product for dense indexes, the BM25
score for sparse ones; higher is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tspo_core.data.schema import Passage
from tspo_core.errors import TSPOError


class RetrievalError(TSPOError):
    """A search could not be answered (bad index directory, server unreachable, malformed reply...)."""


class RetrievalServerError(RetrievalError):
    """The retrieval server did not answer after the whole retry budget. Names the URL and the attempts made."""

    def __init__(self, message: str, url: str, attempts: int, last_error: str):
        self.url, self.attempts, self.last_error = url, attempts, last_error
        super().__init__(message)


class MemoryBudgetError(TSPOError, MemoryError):
    """The estimated index memory exceeds `index.memory_budget_gb`: the build was refused before it started."""


class Hit(NamedTuple):
    passage: Passage
    score: float


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers batched top-k searches. Implementations: `DenseRetriever`, `BM25Retriever`
    (in-process) and `HttpRetriever` (a Search-R1 compatible server)."""

    def search(self, queries: list[str], top_k: int) -> list[list[Passage]]:
        """Per query, the `top_k` best passages (fewer when the index has fewer matches), best first."""
        ...

    def search_with_scores(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        """As `search`, with each passage's score."""
        ...


def check_search_args(queries: Sequence[str], top_k: int) -> list[str]:
    """Validate the arguments every implementation accepts: a sequence of strings and `top_k` >= 1."""
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings, not a single string")
    queries = list(queries)
    bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
    if bad:
        raise TypeError(f"queries must be strings; item {bad[0]} is {type(queries[bad[0]]).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    return queries


class BaseRetriever:
    """Shared plumbing: `search` derived from `search_with_scores`, a `card` describing the index, `close`."""

    card: dict[str, Any]

    def search_with_scores(self, queries: list[str], top_k: int) -> list[list[Hit]]:  # pragma: no cover
        raise NotImplementedError

    def search(self, queries: list[str], top_k: int) -> list[list[Passage]]:
        return [[h.passage for h in hits] for hits in self.search_with_scores(queries, top_k)]

    def close(self) -> None:
        """Release files, sockets or devices held by the retriever (idempotent)."""

    def __enter__(self) -> "BaseRetriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
