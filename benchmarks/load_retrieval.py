"""Bounded load test of the retrieval server on loopback (not a test; run it by hand: it is CPU heavy).

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python benchmarks/load_retrieval.py \
        [--queries 10000] [--clients 32] [--kind dense|bm25] [--out benchmarks/results/load_retrieval.md]

1. Builds an index (default: dense, the packaged all-MiniLM-L6-v2, flat; or `--kind bm25`) of the real Wikipedia
   sample `../shared/data/real_qa/corpus.jsonl` (6,742 passages), or of the synthetic world of `configs/tiny.yaml`
   with `--corpus synthetic`, in a temporary directory (or reuses `--index-dir` when it already holds one).
2. Starts `python -m tspo_core.retrieval.server` on a free 127.0.0.1 port (the CLI's default host), waits for
   `/health`.
3. `--clients` concurrent clients (asyncio, one keep-alive connection each) send `--queries` single-query
   `POST /retrieve` requests in total (the questions of the real QA samples, cycled), each request timed from send
   to parsed reply. Every reply is checked: HTTP 200, one result list, at most `topk` documents with an `id` and
   `contents`. Anything else is an error.
4. Reports errors, latency p50/p90/p99/max, throughput (queries/s over the wall time of the whole run) and the
   server's micro-batching counters (`/stats`); writes them to `--out`; exits 1 if any request failed.
5. Stops the server by its PID (SIGTERM, then SIGKILL after 15 s) in a `finally` block.

The load generator runs on the same machine as the server: on a 2-core box the two compete for the CPU, so the
figures are a floor for the server alone. `RetrievalServer` and `run_load` are also used by
`tests/reliability/test_load_and_abuse.py` (a 500-query version that must have zero errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tspo_core.omp import choose_wait_policy  # the package is installed (pip install -e .)
from tspo_core.procs import stop_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OMP_POLICY = choose_wait_policy("PASSIVE")  # `OMP_WAIT_POLICY=default`: OpenMP's own (tspo_core.omp)

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real_qa"
DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# the server process
# ----------------------------------------------------------------------------------------------------------------
class RetrievalServer:
    """`python -m tspo_core.retrieval.server` as a child process, stopped by its PID.

    `host=None` leaves the CLI's default bind address (127.0.0.1). Use as a context manager, or call `start()` and
    `stop()` in a `finally` block. The server's output goes to `log_path` (a pipe could fill up and stall it)."""

    def __init__(self, index_dir: str | Path, port: int | None = None, host: str | None = None,
                 params: str | Path | None = None, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None):
        self.index_dir, self.port, self.host, self.params = Path(index_dir), port or free_port(), host, params
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="retrieval-server-",
                                                                              suffix=".log")[1])
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 180.0) -> "RetrievalServer":
        import httpx

        cmd = [sys.executable, "-m", "tspo_core.retrieval.server", "--index", str(self.index_dir),
               "--port", str(self.port), "--log-level", "warning"]
        if self.host is not None:
            cmd += ["--host", self.host]
        if self.params is not None:
            cmd += ["--params", str(self.params)]
        env = {**os.environ, "OMP_WAIT_POLICY": OMP_POLICY, **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"retrieval server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"retrieval server not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown handlers run)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it has not exited after 15 s."""
        if self.proc is not None:
            stop_process(self.proc, grace_s=15)

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------------------
# the load
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    queries: int
    clients: int
    top_k: int
    wall_s: float
    latencies_s: list[float]
    errors: int
    error_samples: list[str] = field(default_factory=list)
    ids: dict[int, list[str]] = field(default_factory=dict)  # request number -> returned passage ids

    @property
    def throughput(self) -> float:
        return self.queries / self.wall_s if self.wall_s > 0 else float("nan")

    def percentile(self, p: float) -> float:
        xs = sorted(self.latencies_s)
        if not xs:
            return float("nan")
        k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
        return xs[k]

    def summary(self) -> dict[str, Any]:
        ms = lambda s: round(s * 1000, 2)  # noqa: E731
        return {"queries": self.queries, "clients": self.clients, "top_k": self.top_k, "errors": self.errors,
                "wall_s": round(self.wall_s, 2), "throughput_qps": round(self.throughput, 1),
                "p50_ms": ms(self.percentile(50)), "p90_ms": ms(self.percentile(90)),
                "p99_ms": ms(self.percentile(99)), "max_ms": ms(max(self.latencies_s, default=float("nan"))),
                "mean_ms": ms(statistics.fmean(self.latencies_s)) if self.latencies_s else None}


def _check_reply(status: int, body: bytes, top_k: int) -> list[str]:
    """The passage ids of a valid reply; ValueError describing what is wrong otherwise."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {body[:200]!r}")
    data = json.loads(body)
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], list):
        raise ValueError(f"expected one result list, got {body[:200]!r}")
    docs = result[0]
    if len(docs) > top_k or any(not isinstance(d, dict) or not isinstance(d.get("id"), str)
                                or not isinstance(d.get("contents"), str) for d in docs):
        raise ValueError(f"malformed documents: {body[:200]!r}")
    return [d["id"] for d in docs]


async def _load(url: str, questions: Sequence[str], n: int, clients: int, top_k: int, timeout: float,
                keep_ids: bool) -> LoadResult:
    import httpx

    next_request = 0
    latencies: list[float] = []
    samples: list[str] = []
    ids: dict[int, list[str]] = {}
    errors = 0

    async def client() -> None:
        nonlocal next_request, errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
            while next_request < n:
                i = next_request
                next_request += 1
                payload = {"queries": [questions[i % len(questions)]], "topk": top_k, "return_scores": False}
                t0 = time.perf_counter()
                try:
                    resp = await http.post("/retrieve", json=payload)
                    got = _check_reply(resp.status_code, resp.content, top_k)
                except (httpx.HTTPError, ValueError) as err:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(f"request {i}: {type(err).__name__}: {err}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if keep_ids:
                    ids[i] = got

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return LoadResult(n, clients, top_k, time.perf_counter() - t0, latencies, errors, samples, ids)


def run_load(url: str, questions: Sequence[str], n: int = 10_000, clients: int = 32, top_k: int = 3,
             timeout: float = 60.0, keep_ids: bool = False) -> LoadResult:
    """`n` single-query requests from `clients` concurrent keep-alive clients; request i asks
    `questions[i % len(questions)]`. With `keep_ids`, the returned passage ids of each request are kept."""
    if not questions:
        raise ValueError("run_load: no questions")
    return asyncio.run(_load(url, list(questions), n, clients, top_k, timeout, keep_ids))


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
def real_questions() -> list[str]:
    out = []
    for name in DATASETS:
        path = REAL / f"{name}.jsonl"
        if path.is_file():
            out += [json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    return out


def synthetic_inputs(work: Path) -> tuple[Path, list[str]]:
    """The world of configs/tiny.yaml: its corpus file and its dev + test questions."""
    sys.path.insert(0, str(REPO))
    from tspo_core.config import load_params
    from tspo_core.data.build import build_datasets
    from tspo_core.pipeline import load_split

    params = load_params(REPO / "configs" / "tiny.yaml")
    build_datasets(params.data, work / "data")
    questions = [ex.question for name in DATASETS for split in ("dev", "test")
                 for ex in load_split(work / "data", name, split)]
    return work / "data" / "corpus.jsonl", questions


def build(corpus: Path, kind: str, out: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tspo_core.config import IndexConfig
    from tspo_core.retrieval import build_index

    cfg = IndexConfig(kind=kind, device="cpu", probe_size=0)
    return build_index(corpus, cfg, out, show_progress=False)


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def markdown(result: LoadResult, card: dict[str, Any], stats: dict[str, Any], conditions: dict[str, Any]) -> str:
    s = result.summary()
    enc = card.get("encoder") or {}
    lines = [
        "# Retrieval server load test",
        "",
        f"Command: `{conditions['command']}`",
        "",
        "| condition | value |",
        "|---|---|",
        f"| index | {card.get('kind')} / {card.get('index_type')}, {card.get('num_passages')} passages "
        f"({conditions['corpus']}), encoder {enc.get('name', '-')} |",
        "| server | `python -m tspo_core.retrieval.server` on 127.0.0.1, default limits and micro-batching |",
        f"| load | {s['queries']} single-query requests, top-{s['top_k']}, {s['clients']} concurrent keep-alive "
        "clients (asyncio + httpx, same machine) |",
        f"| machine | {conditions['cpus']} CPU cores, load average {conditions['load_before']} before / "
        f"{conditions['load_after']} after; Python {platform.python_version()}; niceness {os.nice(0)}; "
        f"OMP_WAIT_POLICY={OMP_POLICY} (client and server) |",
        "",
        "| errors | p50 ms | p90 ms | p99 ms | max ms | mean ms | queries/s | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['errors']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} | {s['mean_ms']} | "
        f"{s['throughput_qps']} | {s['wall_s']} |",
        "",
        f"Server micro-batching (`/stats`): {stats.get('batches')} batches for {stats.get('requests')} requests "
        f"(largest batch {stats.get('largest_batch_requests')} requests), {stats.get('errors')} search errors.",
        "",
        "The machine is shared with other CPU-heavy work and the load generator runs beside the server on the same "
        "cores, so these are floors for the server alone, not its capacity.",
    ]
    if result.error_samples:
        lines += ["", "First errors:", ""] + [f"- {e}" for e in result.error_samples]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--kind", choices=["dense", "bm25"], default="dense")
    ap.add_argument("--corpus", default="real", help="'real' (../shared/data/real_qa/corpus.jsonl), 'synthetic' "
                    "(the world of configs/tiny.yaml) or a corpus jsonl path")
    ap.add_argument("--index-dir", default=None, help="reuse (or build and keep) the index here")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load_retrieval.md"))
    args = ap.parse_args(argv)
    if args.queries < 1 or args.clients < 1:
        ap.error("--queries and --clients must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="load-retrieval-"))
    server = None
    try:
        if args.corpus == "synthetic":
            corpus, questions = synthetic_inputs(work)
            corpus_name = "synthetic world of configs/tiny.yaml"
        else:
            corpus = REAL / "corpus.jsonl" if args.corpus == "real" else Path(args.corpus)
            questions = real_questions() if args.corpus == "real" else []
            corpus_name = str(corpus)
            if not questions:
                _, questions = synthetic_inputs(work)
        index_dir = Path(args.index_dir) if args.index_dir else work / "index"
        if not (index_dir / "index_card.json").is_file():
            t0 = time.perf_counter()
            print(f"building the {args.kind} index of {corpus} ...", flush=True)
            build(corpus, args.kind, index_dir)
            print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
        card = json.loads((index_dir / "index_card.json").read_text(encoding="utf-8"))

        server = RetrievalServer(index_dir, log_path=work / "server.log").start()
        print(f"server pid {server.pid} on {server.url}; {args.queries} queries from {args.clients} clients ...",
              flush=True)
        load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        result = run_load(server.url, questions, args.queries, args.clients, args.topk)
        load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        import httpx

        stats = httpx.get(server.url + "/stats", timeout=10).json()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    niceness = os.nice(0)  # what this run had, not what the docstring suggests
    cmd = (f"nice -n {niceness} " if niceness else "") + ".venv/bin/python benchmarks/load_retrieval.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = markdown(result, card, stats, {"command": cmd.strip(), "corpus": corpus_name, "cpus": os.cpu_count(),
                                          "load_before": load_before, "load_after": load_after})
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
