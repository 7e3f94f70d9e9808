"""The retrieval server CLI under stalled, idle and vanishing clients, and its bad options (loopback, stopped by PID):

- 1,000 idle connections open at once: `/health` keeps answering (each reply within 5 s) and the server log holds
  no "Too many open files" and no traceback;
- a client that half-sends its headers or its body is disconnected within the timeout (1 s here), and a client that
  disconnects mid-body is logged in one line;
- `--params` naming a missing or invalid file, `--port 99999`: exit 2, one `error:` line, no traceback.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from reliability_support import PY, REPO, served, tiny_params
from test_server_connections import closed_after

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    from tspo_core.config import IndexConfig
    from tspo_core.data.schema import Passage
    from tspo_core.retrieval import build_index

    out = tmp_path_factory.mktemp("limits") / "index"
    corpus = [Passage(f"d{j}", f'"Doc {j}"\nPassage number {j}.') for j in range(20)]
    build_index(corpus, IndexConfig(kind="bm25"), out, show_progress=False)
    return out


def _params(tmp: Path, **retrieval) -> Path:
    raw = tiny_params(tmp)
    raw.setdefault("retrieval", {}).update(retrieval)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _log_problems(text: str) -> list[str]:
    return [li for li in text.splitlines() if "Too many open files" in li or "Traceback" in li
            or "Exception in ASGI" in li]


def test_health_answers_while_1000_idle_connections_are_open(small_index, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:  # this process holds the 1,000 client ends (the server raises its own limit)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"needs 2,048 open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    srv = served(small_index, tmp_path, params=_params(tmp_path, header_timeout_s=120))
    idle: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        assert time.monotonic() - t0 < 60
        for _ in range(5):
            t = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=10).json()["num_passages"] == 20
            assert time.monotonic() - t < 5
        conns = httpx.get(srv.url + "/stats", timeout=10).json()["connections"]
        assert conns["open"] >= 990  # they really are open on the server side (the cap is 1,000)
        top = httpx.post(srv.url + "/retrieve", json={"queries": ["passage number 7"], "topk": 1}, timeout=10)
        assert top.status_code == 200 and len(top.json()["result"][0]) == 1  # searches are served too
    finally:
        for s in idle:
            s.close()
        srv.stop()
    assert not _log_problems(srv.log_tail(10**6))


def test_stalled_clients_are_disconnected_within_the_timeouts(small_index, tmp_path):
    srv = served(small_index, tmp_path, params=_params(tmp_path, header_timeout_s=1, body_timeout_s=1))
    try:
        gone = socket.create_connection(("127.0.0.1", srv.port), timeout=10)  # disconnects mid-body
        gone.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 400\r\n\r\n{\"queries\": [\"pass")
        time.sleep(0.2)
        gone.close()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/stats", timeout=5).json()["connections"]["client_gone_mid_body"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        head = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        head.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
        body = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        body.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\ncontent-length: 50\r\n\r\n{\"que")
        assert 0.5 < closed_after(head, 10) < 5 and closed_after(body, 10) < 5
        head.close(), body.close()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        conns = httpx.get(srv.url + "/stats", timeout=10).json()["connections"]
    finally:
        srv.stop()
    assert conns["header_timeouts"] == 1 and conns["body_timeouts"] == 1
    log = srv.log_tail(10**6)
    mid_body = [li for li in log.splitlines() if "the client closed the connection" in li]
    assert len(mid_body) == 1 and "ended after" in mid_body[0]
    assert not _log_problems(log)


@pytest.mark.parametrize("args,fragment", [
    (["--port", "99999"], "99999 is not a TCP port"),
    (["--params", "{missing}"], "params file not found"),
    (["--params", "{bad}"], "retrieval.max_conections: unknown key"),
    (["--params", "{bomb}"], "YAML aliases expand"),
])
def test_server_cli_bad_options_give_one_error_line(small_index, tmp_path, args, fragment):
    bad = _params(tmp_path)
    bad.write_text(bad.read_text(encoding="utf-8").replace("retrieval:\n", "retrieval:\n  max_conections: 5\n"),
                   encoding="utf-8")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
                    + "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n"
                              for p, c in zip("abcdefg", "bcdefgh")), encoding="utf-8")
    names = {"missing": str(tmp_path / "nope.yaml"), "bad": str(bad), "bomb": str(bomb)}
    cmd = [PY, "-m", "tspo_core.retrieval.server", "--index", str(small_index), *[a.format(**names) for a in args]]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1 and fragment in r.stderr, r.stderr


def test_server_cli_broken_index_is_one_error_line(small_index, tmp_path):
    broken = tmp_path / "index"
    broken.mkdir()
    (broken / "index_card.json").write_text("{not json", encoding="utf-8")
    r = subprocess.run([PY, "-m", "tspo_core.retrieval.server", "--index", str(broken)], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
