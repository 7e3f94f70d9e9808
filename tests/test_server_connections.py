"""Retrieval server connections (`server_config`: read deadlines, the connection cap), in-process over loopback.

A small fake retriever behind the real app and uvicorn with the server's guarded protocol, in a thread; raw sockets
play the stalled, idle and vanishing clients. Every wait is bounded.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from tspo_core.data.schema import Passage
from tspo_core.retrieval import BaseRetriever, Hit, RetrievalError, ServerLimits, create_app
from tspo_core.retrieval.server import ACCEPT_BACKLOG, FD_RESERVE, _files_open, connection_cap, server_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PASSAGE = Passage("d0", '"Doc"\nA passage.')


class SlowRetriever(BaseRetriever):
    card = {"kind": "fake", "num_passages": 1}

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def search_with_scores(self, queries, top_k):
        time.sleep(self.delay_s)
        return [[Hit(PASSAGE, 1.0)] for _ in queries]


@contextmanager
def serve(limits: ServerLimits, delay_s: float = 0.0):
    """The app under uvicorn with `server_config` on a free loopback port, in a thread: (url, port, app)."""
    app = create_app(SlowRetriever(delay_s), None, limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", port, app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def server_log(caplog):
    """Records of the server's logger and of uvicorn's (which does not propagate to the root logger)."""
    uv = logging.getLogger("uvicorn.error")
    uv.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        uv.removeHandler(caplog.handler)


def closed_after(sock: socket.socket, limit: float, t0: float | None = None) -> float:
    """Seconds from `t0` (default: now) until the server closes `sock` (EOF or reset), failing after `limit`; any
    reply bytes are read."""
    t0 = time.monotonic() if t0 is None else t0
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit}s")
    return time.monotonic() - t0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def wait_stat(url: str, key: str, value: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/stats", timeout=5).json()["connections"]
        if stats[key] >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def tracebacks(records) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info or "Traceback" in r.getMessage()
            or "Exception in ASGI" in r.getMessage()]


def test_half_sent_headers_and_silent_clients_are_closed_within_the_header_timeout(server_log):
    with serve(ServerLimits(header_timeout_s=0.6, body_timeout_s=5)) as (url, port, _):
        t0 = time.monotonic()
        half, silent = connect(port), connect(port)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        took = closed_after(half, 10, t0), closed_after(silent, 10, t0)
        assert all(0.4 <= t < 5 for t in took), took
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # the server is fine
        stats = httpx.get(url + "/stats", timeout=5).json()["connections"]
    half.close(), silent.close()
    assert stats["header_timeouts"] == 2
    lines = [r.getMessage() for r in server_log.records if "no complete request headers" in r.getMessage()]
    assert len(lines) == 1 and "(1 more" not in lines[0]  # the second within 10 s is counted, not logged
    assert not tracebacks(server_log.records)


def test_a_slow_request_header_drip_does_not_reset_the_deadline(server_log):
    with serve(ServerLimits(header_timeout_s=1.0)) as (_, port, _app):
        sock = connect(port)
        t0 = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):  # a byte every 0.4 s: each arrives well within the timeout, the headers never end
            time.sleep(0.4)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        closed_after(sock, 10)
        sock.close()
    assert time.monotonic() - t0 < 3.0


def test_a_stalled_body_is_closed_within_the_body_timeout_and_logged_in_one_line(server_log):
    with serve(ServerLimits(header_timeout_s=5, body_timeout_s=0.6)) as (url, port, _):
        sock = connect(port)
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"queries\": [")
        took = closed_after(sock, 10)
        sock.close()
        stats = wait_stat(url, "client_gone_mid_body", 1)
    assert 0.4 <= took < 5
    assert stats["body_timeouts"] == 1 and stats["client_gone_mid_body"] == 1
    lines = [r.getMessage() for r in server_log.records if r.name.startswith("tspo_core")]
    assert len(lines) == 1 and "body not complete within 0.6s" in lines[0] and "13 of 100 bytes" in lines[0]
    assert not tracebacks(server_log.records)


def test_a_client_gone_mid_body_logs_one_line_not_a_traceback(server_log):
    with serve(ServerLimits()) as (url, port, _):
        sock = connect(port)
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 500\r\n\r\n{\"queries\": [\"abc")
        time.sleep(0.2)
        sock.close()
        stats = wait_stat(url, "client_gone_mid_body", 1)
        ok = httpx.post(url + "/retrieve", json={"queries": ["x"]}, timeout=10)
    assert stats["client_gone_mid_body"] == 1 and ok.status_code == 200
    lines = [r.getMessage() for r in server_log.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "the client closed the connection" in lines[0], lines
    assert not tracebacks(server_log.records)


def test_idle_connections_past_the_cap_never_lock_out_health(server_log):
    """300 idle connections against a cap of 40: each new one closes the longest-idle one, so at most 40 are
    open and `/health` answers at once; the cap is logged once, not per connection (~700 files in this process,
    under the usual limit of 1,024)."""
    with serve(ServerLimits(max_connections=40, header_timeout_s=60)) as (url, port, _):
        idle = []
        try:
            for _ in range(300):
                idle.append(connect(port))
            for _ in range(5):
                t0 = time.monotonic()
                assert httpx.get(url + "/health", timeout=10).json()["kind"] == "fake"
                assert time.monotonic() - t0 < 5
            stats = httpx.get(url + "/stats", timeout=5).json()["connections"]
        finally:
            for s in idle:
                s.close()
    assert stats["cap"] == 40 and stats["open"] <= 40 and stats["closed_idle_at_cap"] >= 260
    assert stats["refused_at_cap"] == 0
    cap_lines = [r.getMessage() for r in server_log.records if "(the cap)" in r.getMessage()]
    assert 1 <= len(cap_lines) <= 2 and not tracebacks(server_log.records)


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503():
    with serve(ServerLimits(max_connections=2, batch_wait_ms=0), delay_s=1.5) as (url, port, app):
        results: list[int] = []

        def slow() -> None:
            results.append(httpx.post(url + "/retrieve", json={"queries": ["q"]}, timeout=20).status_code)

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while (app.state.batcher.stats["requests"] < 1 or app.state.events.counts["open"] < 2) \
                and time.monotonic() < deadline:  # both connected, the first being searched
            time.sleep(0.02)
        time.sleep(0.3)  # the second one's request is in (it is sent right after connecting)
        refused = httpx.get(url + "/health", timeout=10)
        for t in threads:
            t.join(timeout=30)
        after = httpx.get(url + "/health", timeout=10)
    assert refused.status_code == 503 and "busy" in refused.json()["detail"]
    assert results == [200, 200] and after.status_code == 200


def test_connection_cap_stays_below_the_open_file_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10**9) + _files_open() + ACCEPT_BACKLOG + FD_RESERVE <= soft
    low = _files_open() + ACCEPT_BACKLOG + FD_RESERVE + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        assert 90 <= connection_cap(1000) <= 100 and connection_cap(10) == 10
        resource.setrlimit(resource.RLIMIT_NOFILE, (low - 150, hard))
        with pytest.raises(RetrievalError, match="open-file limit"):
            connection_cap(1000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
