"""Load and abuse of the retrieval server CLI (`python -m tspo_core.retrieval.server`), each server bound to
127.0.0.1 and stopped by its PID:

- it binds 127.0.0.1 when no host is given (the listening sockets of its port, read from /proc/net/tcp{,6});
- a small version of benchmarks/load_retrieval.py (500 single-query requests from 16 concurrent clients) has zero
  errors, and every reply is exactly what in-process search returns for that query (micro-batching mixes nothing);
- hypothesis-generated payloads (random JSON shapes, huge / empty / unicode / control-character queries, wrong
  types, negative and huge topk, too many queries, raw bytes) never get a 5xx, from the BM25 and the dense server.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_support import run_load, served

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def bm25_server(base_world, tmp_path_factory):
    srv = served(base_world / "artifacts" / "index", tmp_path_factory.mktemp("bm25-server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def dense_server(tiny_dense_index, tmp_path_factory):
    srv = served(tiny_dense_index[0], tmp_path_factory.mktemp("dense-server"))
    try:
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------------------------
# loopback by default
# ----------------------------------------------------------------------------------------------------------------
def _listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_server_binds_loopback_by_default(bm25_server):
    assert Path("/proc/net/tcp").is_file(), "needs Linux /proc/net"
    assert _listening(bm25_server.port) == {"127.0.0.1"}  # started without --host
    outward = _outward_address()
    if outward is not None:  # not reachable on the machine's network address
        with pytest.raises(OSError):
            socket.create_connection((outward, bm25_server.port), timeout=2).close()
    health = httpx.get(bm25_server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["kind"] == "bm25"


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------
def test_small_load_zero_errors_and_every_reply_correct(bm25_server, base_world):
    from tspo_core.config import FAMILIES
    from tspo_core.pipeline import load_split
    from tspo_core.retrieval import load_retriever

    questions = [ex.question for name in FAMILIES for split in ("dev", "test")
                 for ex in load_split(base_world / "data", name, split)]
    assert len(questions) >= 40
    stats0 = httpx.get(bm25_server.url + "/stats", timeout=10).json()
    result = run_load(bm25_server.url, questions, n=500, clients=16, top_k=3, keep_ids=True)
    stats = httpx.get(bm25_server.url + "/stats", timeout=10).json()

    assert result.errors == 0, result.error_samples
    assert len(result.latencies_s) == 500 and sorted(result.ids) == list(range(500))
    with load_retriever(base_world / "artifacts" / "index") as local:
        expected = {q: [p.id for p in hits] for q, hits in zip(questions, local.search(questions, 3))}
    wrong = [i for i, ids in result.ids.items() if ids != expected[questions[i % len(questions)]]]
    assert not wrong, f"{len(wrong)} replies differ from in-process search, e.g. request {wrong[0]}"
    assert stats["requests"] - stats0["requests"] == 500 and stats["errors"] == stats0["errors"]
    assert stats["batches"] - stats0["batches"] < 500  # concurrent requests shared searches
    summary = result.summary()
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"] and summary["throughput_qps"] > 0


# ----------------------------------------------------------------------------------------------------------------
# abuse: generated payloads never produce a 5xx
# ----------------------------------------------------------------------------------------------------------------
_leaf = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
         | st.text(max_size=30))
_any_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=10), c,
                                                                                       max_size=5), max_leaves=25)
_query = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=60),  # any code point, lone surrogates too
    st.just(""),
    st.text(" \t\r\n\x00\x0b\u00a0\u2028", max_size=8),  # whitespace and control characters only
    st.integers(2000, 2100).map(lambda n: "word " * (n // 5)),  # around max_query_chars (2048)
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=40),  # emoji
    st.sampled_from(["\u202eevil", "\ufeffBOM", "é" * 2049, "Ω" * 2048, "the of and a", "<search> x </search>",
                     "' OR 1=1 --", "%s%n%x", "../../etc/passwd", "\\u0000"]),
)
_topk = st.one_of(st.integers(-10**12, 10**12), st.integers(-2, 120), _any_json)
_payloads = st.one_of(
    _any_json,
    st.fixed_dictionaries({"queries": st.lists(_query, max_size=16)},
                          optional={"topk": _topk, "return_scores": st.booleans() | _any_json}),
    st.fixed_dictionaries({"queries": st.integers(505, 520).map(lambda n: ["capital"] * n),
                           "topk": st.integers(1, 5)}),  # around max_queries (512)
    st.fixed_dictionaries({"queries": _any_json, "topk": _topk}),
)


def _check(url: str, content: bytes, payload=None) -> None:
    r = httpx.post(url + "/retrieve", content=content, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code < 500, (payload if payload is not None else content[:200], r.status_code, r.text[:300])
    if r.status_code == 200:
        sent = payload if payload is not None else json.loads(content)
        result = r.json()["result"]
        assert len(result) == len(sent["queries"])
        top_k = sent["topk"] if sent.get("topk") is not None else 3
        assert all(len(docs) <= top_k for docs in result)


@pytest.mark.parametrize("kind", ["bm25", pytest.param("dense", marks=pytest.mark.slow)])
def test_generated_payloads_never_get_a_5xx(kind, request):
    url = request.getfixturevalue(f"{kind}_server").url
    n = 120 if kind == "bm25" else 30  # a dense search encodes every query: fewer examples, same strategies

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(payload=_payloads)
    def payloads(payload):
        _check(url, json.dumps(payload).encode("utf-8"), payload)

    @settings(max_examples=n // 3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=400))
    def raw_bodies(raw):
        _check(url, raw)

    payloads()
    raw_bodies()
    assert httpx.get(url + "/stats", timeout=10).json()["errors"] == 0  # no search ever failed inside
