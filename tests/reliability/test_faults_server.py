"""The retrieval server stops during use.

- Client level, against the real server CLI on the tiny BM25 index: the server is killed (SIGKILL) between two
  searches of one `HttpRetriever`; the next search retries with doubling backoff and, once a new server is up on
  the same port, returns what the first server returned. If no server comes back, the call ends with a
  `RetrievalServerError` naming the URL and the attempts, after waiting out the backoff.
- Stage level: the `sft` stage with `retrieval.mode: http` (its oracle trajectories search through the server).
  With nothing listening it fails with exit 2 and a message naming the URL, and the previous SFT checkpoint stays
  byte-identical; when the server appears while the stage is retrying, the stage finishes and produces the same
  checkpoint weights as in-process retrieval.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time

import pytest

from reliability_support import (RetrievalServer, Work, diff_snapshots, error_text, file_sha, free_port,
                                 kill_process, served, snapshot)

pytestmark = pytest.mark.reliability

@pytest.fixture(scope="module")
def questions(base_world) -> list[str]:
    from tspo_core.pipeline import load_split

    return [ex.question for name in ("nq", "hotpotqa") for ex in load_split(base_world / "data", name, "dev")][:4]


@pytest.fixture
def server(base_world, tmp_path):
    srv = served(base_world / "artifacts" / "index", tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


def _delays(records) -> list[float]:
    out = []
    for r in records:
        m = re.search(r"retry \d+/\d+ in ([0-9.]+)s", r.getMessage())
        if m:
            out.append(float(m.group(1)))
    return out


def test_client_retries_until_the_server_is_back_on_the_same_port(server, base_world, questions, tmp_path, caplog):
    from tspo_core.retrieval import HttpRetriever

    replacement = RetrievalServer(base_world / "artifacts" / "index", port=server.port,
                                  log_path=tmp_path / "replacement.log")
    try:
        with HttpRetriever(server.url, timeout=5, retries=10, backoff=0.1, max_backoff=1.0) as client:
            first = client.search_with_scores(questions, 2)
            assert len(first) == 4 and all(hits for hits in first)
            server.kill()  # a crash between two searches (the client's pooled connection dies with it)
            out: dict = {}

            def search() -> None:
                try:
                    out["hits"] = client.search_with_scores(questions, 2)
                except Exception as err:  # reported below
                    out["error"] = err

            with caplog.at_level(logging.WARNING, logger="tspo_core.retrieval.client"):
                t = threading.Thread(target=search)
                t.start()
                time.sleep(0.5)  # the first attempts find nothing listening
                replacement.start()
                t.join(timeout=120)
        assert not t.is_alive() and "error" not in out, out.get("error")
        assert out["hits"] == first  # same passages, same scores as before the crash
        delays = _delays(caplog.records)
        assert len(delays) >= 2 and delays[:3] == [0.1, 0.2, 0.4][:len(delays[:3])]  # exponential backoff
    finally:
        replacement.stop()


def test_client_names_the_url_when_the_server_does_not_come_back(server, questions, caplog):
    from tspo_core.retrieval import HttpRetriever, RetrievalServerError

    with HttpRetriever(server.url, timeout=2, retries=3, backoff=0.1) as client:
        assert client.search(questions[:1], 1)
        server.kill()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tspo_core.retrieval.client"):
            with pytest.raises(RetrievalServerError) as err:
                client.search(questions[:1], 1)
        elapsed = time.monotonic() - t0
    e = err.value
    assert e.url == server.url + "/retrieve" and e.attempts == 4
    assert server.url in str(e) and "4 attempt(s)" in str(e) and "3 retries" in str(e)
    assert _delays(caplog.records) == [0.1, 0.2, 0.4] and elapsed >= 0.7  # it waited out the backoff


# ----------------------------------------------------------------------------------------------------------------
# stage level: sft with retrieval over HTTP
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_stage_fails_cleanly_without_the_server_and_continues_when_it_comes_back(work: Work, base_world,
                                                                                     tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    previous = snapshot(work.path("sft_dir"))

    # 1. nothing listening, a small retry budget: exit 2, the URL named, the previous checkpoint untouched
    work.set(**{"retrieval.mode": "http", "retrieval.url": url, "retrieval.retries": 2,
                "retrieval.backoff_s": 0.1, "retrieval.timeout_s": 2.0})
    failed = work.run("sft")
    message = error_text(failed.stderr)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert f"POST {url}/retrieve failed after 3 attempt(s)" in message and "ConnectError" in message
    assert diff_snapshots(previous, snapshot(work.path("sft_dir"))) == []
    assert not (work.path("metrics_dir") / "sft.json").exists()

    # 2. the server appears while the stage is retrying: the stage goes on and finishes
    work.set(**{"retrieval.retries": 8, "retrieval.backoff_s": 0.5})
    server = RetrievalServer(work.path("index_dir"), port=port, log_path=tmp_path / "late-server.log")
    log = tmp_path / "sft.log"
    proc = work.popen("sft", log=log)
    try:
        deadline = time.monotonic() + 240
        while "retry 1/8" not in log.read_text(errors="replace"):  # the stage is waiting for the server
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the stage never tried the server"
            time.sleep(0.05)
        server.start()
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        kill_process(proc)
        raise
    finally:
        server.stop()
        if proc.poll() is None:
            kill_process(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    # retrieval over HTTP gave the oracle the same passages as in-process search: the same SFT weights
    assert file_sha(work.path("sft_dir") / "model.safetensors") == \
        file_sha(base_world / "artifacts" / "sft" / "model.safetensors")
