"""HTTP client for a Search-R1 compatible retrieval server (ours or theirs).

    with HttpRetriever("http://127.0.0.1:8000", timeout=30, retries=5, backoff=0.5) as r:
        r.search(["who wrote hamlet"], top_k=3)

Connection errors, timeouts and 5xx replies are retried with exponential backoff (`backoff`, 2x, 4x, ... capped
at `max_backoff`); after `retries` retries a `RetrievalServerError` names the URL, the attempts and the last
error. 4xx replies (bad request, limits) are not retried. Queries are sent in batches of at most
`max_queries_per_request` per POST.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from tspo_core.config import RetrievalConfig
from tspo_core.retrieval.base import BaseRetriever, Hit, RetrievalError, RetrievalServerError, check_search_args
from tspo_core.retrieval.retriever import hits_from_json

log = logging.getLogger(__name__)


class HttpRetriever(BaseRetriever):
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.5, *, max_queries_per_request: int = 512, max_backoff: float = 30.0,
                 transport: Any = None):
        import httpx

        if retries < 0 or timeout <= 0 or backoff < 0 or max_queries_per_request < 1:
            raise ValueError("need retries >= 0, timeout > 0, backoff >= 0, max_queries_per_request >= 1")
        base = url.rstrip("/")
        if base.endswith("/retrieve"):
            base = base[: -len("/retrieve")]
        self.base_url, self.url = base, base + "/retrieve"
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_queries_per_request = max_queries_per_request
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout, transport=transport)
        self._card: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> "HttpRetriever":
        return cls(cfg.url, timeout=cfg.timeout_s, retries=cfg.retries, backoff=cfg.backoff_s,
                   max_queries_per_request=cfg.max_queries)

    # ------------------------------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, payload: Any = None) -> Any:
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                log.warning("%s %s: %s; retry %d/%d in %.2fs", method, url, last, attempt, self.retries, delay)
                time.sleep(delay)
            try:
                if payload is None:
                    resp = self._client.request(method, url)
                else:  # ASCII JSON: any Python str (even a lone surrogate) serializes; the server judges it
                    resp = self._client.request(method, url, content=json.dumps(payload).encode("ascii"),
                                                headers={"content-type": "application/json"})
            except self._httpx.TransportError as err:  # connection refused/reset, timeouts, protocol errors
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                continue
            if resp.status_code >= 400:
                raise RetrievalError(f"{method} {url}: HTTP {resp.status_code} (not retried): {resp.text[:500]}")
            try:
                return resp.json()
            except ValueError:
                raise RetrievalError(f"{method} {url}: reply is not JSON: {resp.text[:200]!r}") from None
        raise RetrievalServerError(
            f"{method} {url} failed after {attempts} attempt(s) ({self.retries} retries, timeout "
            f"{self.timeout}s, backoff from {self.backoff}s): {last}", url=url, attempts=attempts, last_error=last)

    def _post(self, queries: list[str], top_k: int, with_scores: bool) -> list[list[Hit]]:
        body = self._request("POST", self.url, {"queries": queries, "topk": top_k, "return_scores": with_scores})
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"POST {self.url}: expected {{'result': [...]}} with {len(queries)} lists, got "
                                 f"{str(body)[:200]!r}")
        out = []
        for entries in result:
            if not isinstance(entries, list):
                raise RetrievalError(f"POST {self.url}: a result is not a list: {str(entries)[:200]!r}")
            out.append(hits_from_json(entries, with_scores))
        return out

    def _search(self, queries: list[str], top_k: int, with_scores: bool) -> list[list[Hit]]:
        queries = check_search_args(queries, top_k)
        out: list[list[Hit]] = []
        step = self.max_queries_per_request
        for start in range(0, len(queries), step):
            out.extend(self._post(queries[start:start + step], top_k, with_scores))
        return out

    def search_with_scores(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        return self._search(queries, top_k, True)

    def search(self, queries: list[str], top_k: int) -> list[list[Any]]:
        return [[h.passage for h in hits] for hits in self._search(queries, top_k, False)]

    def health(self) -> dict[str, Any]:
        """The server's index card (retried like a search)."""
        body = self._request("GET", self.base_url + "/health")
        if not isinstance(body, dict):
            raise RetrievalError(f"GET {self.base_url}/health: expected an object, got {str(body)[:200]!r}")
        return body

    @property
    def card(self) -> dict[str, Any]:  # type: ignore[override]
        if self._card is None:
            self._card = self.health()
        return self._card

    def close(self) -> None:
        self._client.close()
