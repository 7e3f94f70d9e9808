"""Retrieval: encoders, index building, in-process and HTTP retrievers, and a Search-R1 compatible server.

- `build_index(corpus, cfg.index, out_dir, probe)` -> index card (dict); see `tspo_core.retrieval.index`.
- `load_retriever(index_dir)` -> a `Retriever` (`search(queries, top_k)`, `search_with_scores(queries, top_k)`).
- `HttpRetriever(url, timeout, retries, backoff)`: the same interface over `POST /retrieve`.
- `python -m tspo_core.retrieval.server --index DIR`: the server (no authentication; binds 127.0.0.1).

Heavy dependencies (torch, transformers, faiss, bm25s, fastapi) are imported where used, so importing this package
is cheap.
"""

from __future__ import annotations

from typing import Any

from tspo_core.retrieval.base import (BaseRetriever, Hit, MemoryBudgetError, RetrievalError, RetrievalServerError,
                                      Retriever)

__all__ = [
    "BaseRetriever", "Hit", "MemoryBudgetError", "RetrievalError", "RetrievalServerError", "Retriever",
    "build_index", "load_retriever", "evaluate_retriever", "estimate_memory", "read_card",
    "Encoder", "DenseRetriever", "BM25Retriever", "HttpRetriever", "create_app", "ServerLimits",
]

_LAZY = {
    "build_index": "tspo_core.retrieval.index",
    "evaluate_retriever": "tspo_core.retrieval.index",
    "estimate_memory": "tspo_core.retrieval.index",
    "load_retriever": "tspo_core.retrieval.retriever",
    "read_card": "tspo_core.retrieval.retriever",
    "DenseRetriever": "tspo_core.retrieval.retriever",
    "BM25Retriever": "tspo_core.retrieval.retriever",
    "Encoder": "tspo_core.retrieval.encoder",
    "HttpRetriever": "tspo_core.retrieval.client",
    "create_app": "tspo_core.retrieval.server",
    "ServerLimits": "tspo_core.retrieval.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tspo_core.retrieval' has no attribute {name!r}")
