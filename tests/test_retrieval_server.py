"""Retrieval server (Search-R1 API shape, limits, micro-batching, bad payloads), HTTP client (retries), CLI.

Uses a small in-memory fake retriever (deterministic per query) so the tests are fast; one test serves a tiny
BM25 index through the real CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tspo_core.config import IndexConfig, RetrievalConfig
from tspo_core.data.schema import Passage
from tspo_core.retrieval import (BaseRetriever, Hit, HttpRetriever, RetrievalError, RetrievalServerError,
                                 ServerLimits, build_index, create_app)
from tspo_core.retrieval.server import MicroBatcher, build_parser
from tspo_core.procs import stop_process

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CORPUS = [Passage(f"d{j}", f'"Doc {j}"\nPassage number {j} about topic {j % 5}.') for j in range(20)]
CARD = {"format_version": 1, "kind": "fake", "index_type": "fake", "num_passages": len(CORPUS)}


class FakeRetriever(BaseRetriever):
    """Ranks the 20 passages by a hash of the query (deterministic, distinct per query); records batch sizes."""

    def __init__(self, delay_s: float = 0.0, fail_first: int = 0):
        self.card = CARD
        self.delay_s, self.fail_first = delay_s, fail_first
        self.calls: list[int] = []
        self._lock = threading.Lock()

    @staticmethod
    def expected(query: str, top_k: int) -> list[Hit]:
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(query))
        ranked = sorted(range(len(CORPUS)), key=lambda j: ((j * 7919 + seed) % 101, j))
        return [Hit(CORPUS[j], float(100 - r)) for r, j in enumerate(ranked[:top_k])]

    def search_with_scores(self, queries, top_k):
        with self._lock:
            self.calls.append(len(queries))
            n_calls = len(self.calls)
        if n_calls <= self.fail_first:
            raise RuntimeError("simulated backend failure")
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self.expected(q, top_k) for q in queries]


LIMITS = ServerLimits(max_queries=8, max_query_chars=50, max_top_k=10, default_top_k=3)


@pytest.fixture
def client():
    fake = FakeRetriever()
    with TestClient(create_app(fake, CARD, LIMITS)) as c:
        c.fake = fake
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, port: int | None = None):
    """Run `app` under a real uvicorn on a loopback port in a thread."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _docs(hits: list[Hit]) -> list[dict]:
    return [h.passage.to_json() for h in hits]


# ----------------------------------------------------------------------------------------------------------------
# Search-R1 shape
# ----------------------------------------------------------------------------------------------------------------
def test_shape_without_scores(client):
    r = client.post("/retrieve", json={"queries": ["alpha", "beta"], "topk": 4, "return_scores": False})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    for q, entries in zip(["alpha", "beta"], body["result"]):
        assert entries == _docs(FakeRetriever.expected(q, 4))
        assert all(set(e) == {"id", "contents"} for e in entries)


def test_shape_with_scores(client):
    body = client.post("/retrieve", json={"queries": ["alpha"], "topk": 2, "return_scores": True}).json()
    entries = body["result"][0]
    assert [set(e) for e in entries] == [{"document", "score"}] * 2
    assert [e["document"] for e in entries] == _docs(FakeRetriever.expected("alpha", 2))
    assert all(isinstance(e["score"], float) for e in entries)
    assert entries[0]["score"] >= entries[1]["score"]


def test_defaults_and_empty_list(client):
    body = client.post("/retrieve", json={"queries": ["gamma"]}).json()  # topk, return_scores omitted
    assert body["result"][0] == _docs(FakeRetriever.expected("gamma", LIMITS.default_top_k))
    assert client.post("/retrieve", json={"queries": [], "topk": 3}).json() == {"result": []}
    assert client.fake.calls == [1]  # the empty request never reached the retriever
    # unknown keys are ignored (Search-R1 clients may send extras)
    assert client.post("/retrieve", json={"queries": ["x"], "topk": 1, "extra": 1}).status_code == 200


def test_health_returns_card(client):
    assert client.get("/health").json() == CARD


@pytest.mark.parametrize("payload, fragment", [
    ({"queries": ["q"] * 9, "topk": 3}, "limit is 8"),
    ({"queries": ["q" * 51], "topk": 3}, "limit is 50"),
    ({"queries": ["q"], "topk": 0}, "between 1 and 10"),
    ({"queries": ["q"], "topk": 11}, "between 1 and 10"),
    ({"queries": ["q"], "topk": -5}, "between 1 and 10"),
])
def test_limits_answer_422(client, payload, fragment):
    r = client.post("/retrieve", json=payload)
    assert r.status_code == 422 and fragment in r.text
    assert client.fake.calls == []


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b'"queries"', b"{}", b'{"queries": "one string"}', b'{"queries": [1, 2]}',
    b'{"queries": [null]}', b'{"queries": ["a"], "topk": "3"}', b'{"queries": ["a"], "topk": 2.5}',
    b'{"queries": ["a"], "topk": true}', b'{"queries": ["a"], "return_scores": "yes"}',
    b'{"queries": ["\\ud800"]}', b'{"queries": ["a"], "topk": 1e400}', b'\xff\xfe{',
])
def test_bad_bodies_answer_422(client, body):
    r = client.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, (body, r.status_code, r.text)
    assert isinstance(r.json()["detail"], (str, list))


def test_oversized_body_refused_before_parsing(client):
    big = json.dumps({"queries": ["x" * 1000] * 100_000}).encode()
    r = client.post("/retrieve", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_backend_error_is_a_clean_500_and_server_recovers():
    fake = FakeRetriever(fail_first=1)
    with TestClient(create_app(fake, CARD, LIMITS)) as c:
        r = c.post("/retrieve", json={"queries": ["a"], "topk": 2})
        assert r.status_code == 500 and "simulated backend failure" in r.json()["detail"]
        assert c.post("/retrieve", json={"queries": ["a"], "topk": 2}).status_code == 200


def test_limits_from_config():
    lim = ServerLimits.from_config(RetrievalConfig(max_queries=4, max_query_chars=10, max_top_k=5, top_k=3))
    assert (lim.max_queries, lim.max_query_chars, lim.max_top_k, lim.default_top_k) == (4, 10, 5, 3)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=60),
    lambda children: st.lists(children, max_size=10) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)
_payloads = st.one_of(
    _json,
    st.fixed_dictionaries({"queries": _json}, optional={"topk": _json, "return_scores": _json}),
    st.fixed_dictionaries({"queries": st.lists(st.text(max_size=70), max_size=12)},
                          optional={"topk": st.integers(-3, 20), "return_scores": st.booleans()}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_payloads)
def test_generated_payloads_never_5xx(client, payload):
    r = client.post("/retrieve", content=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 422), (payload, r.status_code, r.text)  # never a 5xx
    if r.status_code == 200:
        assert len(r.json()["result"]) == len(payload["queries"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_generated_raw_bodies_never_5xx(client, raw):
    r = client.post("/retrieve", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, (raw, r.status_code, r.text)


# ----------------------------------------------------------------------------------------------------------------
# micro-batching
# ----------------------------------------------------------------------------------------------------------------
def test_micro_batcher_groups_concurrent_requests():
    fake = FakeRetriever(delay_s=0.05)
    batcher = MicroBatcher(fake, ServerLimits(max_batch_queries=100))

    async def main():
        jobs = [batcher.submit([f"q{i}", f"r{i}"], 1 + i % 4) for i in range(10)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    batcher.close()
    for i, res in enumerate(results):
        assert res == [FakeRetriever.expected(f"q{i}", 1 + i % 4), FakeRetriever.expected(f"r{i}", 1 + i % 4)]
    assert sum(fake.calls) == 20 and len(fake.calls) <= 2  # all queued requests searched together
    assert batcher.stats["largest_batch_requests"] >= 9


def test_micro_batcher_respects_max_batch_queries():
    fake = FakeRetriever(delay_s=0.02)
    batcher = MicroBatcher(fake, ServerLimits(max_batch_queries=4))

    async def main():
        return await asyncio.gather(*[batcher.submit([f"q{i}", f"x{i}"], 2) for i in range(6)])

    asyncio.run(main())
    batcher.close()
    assert max(fake.calls) <= 4 and sum(fake.calls) == 12


def test_real_uvicorn_concurrent_clients_get_their_own_results():
    fake = FakeRetriever(delay_s=0.02)
    app = create_app(fake, CARD, ServerLimits(max_queries=64, max_top_k=10))
    errors: list[str] = []
    with serve(app) as url:
        def worker(w: int) -> None:
            with httpx.Client(timeout=10) as http:
                for i in range(6):
                    queries = [f"worker {w} request {i} query {j}" for j in range(1 + (w + i) % 3)]
                    k = 1 + (w * 3 + i) % 10
                    with_scores = (w + i) % 2 == 0
                    body = http.post(url + "/retrieve", json={"queries": queries, "topk": k,
                                                              "return_scores": with_scores}).json()
                    for q, entries in zip(queries, body["result"], strict=True):
                        exp = FakeRetriever.expected(q, k)
                        got = [e["document"] for e in entries] if with_scores else entries
                        if got != _docs(exp):
                            errors.append(f"{q}: wrong result")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(url + "/stats").json()
    assert not errors, errors[:3]
    assert stats["requests"] == 72 and stats["errors"] == 0
    assert stats["batches"] < stats["requests"]  # concurrent requests shared searches
    assert stats["largest_batch_requests"] > 1


# ----------------------------------------------------------------------------------------------------------------
# HTTP client
# ----------------------------------------------------------------------------------------------------------------
def test_http_retriever_matches_in_process_and_batches_per_call():
    fake = FakeRetriever()
    app = create_app(fake, CARD, ServerLimits(max_queries=3, max_top_k=10))
    queries = [f"question {i}" for i in range(7)]
    with serve(app) as url, HttpRetriever(url, timeout=5, retries=0, max_queries_per_request=3) as http:
        assert http.health() == CARD and http.card == CARD
        with_scores = http.search_with_scores(queries, 4)
        without = http.search(queries, 4)
        assert http.search([], 4) == []
    direct = fake.search_with_scores(queries, 4)
    assert with_scores == direct
    assert without == [[h.passage for h in hits] for hits in direct]
    assert fake.calls[:3] == [3, 3, 1]  # 7 queries sent as 3 requests of at most 3


def test_http_retriever_accepts_full_retrieve_url():
    with serve(create_app(FakeRetriever(), CARD, LIMITS)) as url:
        with HttpRetriever(url + "/retrieve/", retries=0) as http:
            assert http.search(["a"], 2)[0] == [h.passage for h in FakeRetriever.expected("a", 2)]


def test_client_retries_until_the_server_comes_up():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict = {}

    def call() -> None:
        with HttpRetriever(url, timeout=2, retries=8, backoff=0.1) as http:
            try:
                out["result"] = http.search(["late"], 2)
            except Exception as err:  # pragma: no cover - reported below
                out["error"] = err

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.6)  # the first attempts find nothing listening
    with serve(create_app(FakeRetriever(), CARD, LIMITS), port=port):
        t.join(timeout=30)
    assert "error" not in out, out.get("error")
    assert out["result"] == [[h.passage for h in FakeRetriever.expected("late", 2)]]


def test_client_gives_a_clear_error_when_the_server_stays_down():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with HttpRetriever(url, timeout=1, retries=2, backoff=0.05) as http:
        with pytest.raises(RetrievalServerError) as err:
            http.search(["anyone?"], 3)
    assert time.monotonic() - t0 < 10
    e = err.value
    assert e.url == url + "/retrieve" and e.attempts == 3
    assert url in str(e) and "3 attempt" in str(e) and "ConnectError" in str(e)


def test_client_retries_5xx_but_not_4xx():
    fake = FakeRetriever(fail_first=2)
    with serve(create_app(fake, CARD, LIMITS)) as url:
        with HttpRetriever(url, timeout=5, retries=3, backoff=0.01) as http:
            assert http.search(["x"], 2)[0] == [h.passage for h in FakeRetriever.expected("x", 2)]
            assert fake.calls == [1, 1, 1]  # two 500s, then success
            t0 = time.monotonic()
            with pytest.raises(RetrievalError, match="HTTP 422") as err:
                http.search(["x"], 99)  # over max_top_k
            assert not isinstance(err.value, RetrievalServerError) and time.monotonic() - t0 < 1
        with HttpRetriever(url, timeout=5, retries=1, backoff=0.01) as http:
            fake.fail_first, fake.calls = 10, []
            with pytest.raises(RetrievalServerError, match="HTTP 500"):
                http.search(["x"], 2)
            assert len(fake.calls) == 2


def test_client_sends_unencodable_queries_as_a_clean_422():
    with serve(create_app(FakeRetriever(), CARD, LIMITS)) as url, HttpRetriever(url, retries=0) as http:
        with pytest.raises(RetrievalError, match="422"):
            http.search(["bad \ud800 text"], 2)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_help_states_no_authentication_and_loopback():
    text = build_parser().format_help()
    assert "NO AUTHENTICATION" in " ".join(text.split()) and "127.0.0.1" in text


def test_cli_serves_an_index(tmp_path: Path):
    build_index(CORPUS, IndexConfig(kind="bm25"), tmp_path / "index", show_progress=False)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tspo_core.retrieval.server", "--index", str(tmp_path / "index"),
                             "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with HttpRetriever(f"http://127.0.0.1:{port}", timeout=5, retries=30, backoff=0.2, max_backoff=1.0) as h:
            card = h.health()
            assert card["kind"] == "bm25" and card["num_passages"] == 20
            top = h.search_with_scores(["passage number 17"], 3)[0]
            assert top[0].passage.id == "d17" and top[0].score > 0
        r = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": ["topic"], "topk": 0})
        assert r.status_code == 422
    finally:
        stop_process(proc, grace_s=15)
    assert proc.returncode is not None


def test_cli_reports_a_missing_index(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tspo_core.retrieval.server", "--index", str(tmp_path / "nope"),
                        "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no index_card.json" in r.stderr
