"""Retrieval benchmark on the real wiki-18 style sample (not a test; run it by hand, once: it is CPU heavy).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retrieval.py [--out benchmarks/results/retrieval.md]

Measures, with the packaged all-MiniLM-L6-v2 (fp32, max length 256, top-3, flat inner-product index):
1. Index build: time and passages/s for the whole 6,742-passage corpus, with answer recall@k of the 197 NQ
   questions whose gold paragraph is in the corpus; and, on a sample of 1,024 passages (16 evenly spaced blocks of
   64 consecutive lines), our encoder (length-sorted, dynamic padding, CPU token cap) against the reference
   Search-R1 style (batches of 64 in file order, each padded to its longest passage).
2. Query throughput: in-process search vs the HTTP server (a separate `python -m tspo_core.retrieval.server`
   process on a loopback port) at batch sizes 1, 16 and 64 with one sequential client; then 8 concurrent
   single-query clients vs the same queries sent one by one. Each figure is the best of `--repeats` alternating
   runs (the machine is shared; best-of damps interference).
Goals: encoding >= 1.5x the reference; server >= 0.95x in-process at batch 16 and 64; 8 concurrent clients >= 2x
one by one. Prints a markdown table and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tspo_core.omp import choose_wait_policy  # noqa: E402

# sleeping (not spinning) idle OpenMP threads unless OMP_WAIT_POLICY says otherwise (`default`: OpenMP's own
# policy); the server gets the same choice. README "Thread policy" compares the two.
OMP_POLICY = choose_wait_policy("PASSIVE")

import numpy as np  # noqa: E402

from tspo_core.config import IndexConfig  # noqa: E402
from tspo_core.data.schema import QAExample  # noqa: E402
from tspo_core.io import write_text  # noqa: E402
from tspo_core.retrieval import HttpRetriever, build_index, load_retriever, read_card  # noqa: E402
from tspo_core.retrieval.encoder import Encoder  # noqa: E402
from tspo_core.procs import stop_process  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real_qa"
DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_style_encode(enc: Encoder, texts: list[str], batch_size: int = 64) -> float:
    """Seconds to encode `texts` the reference way: file order, batches of 64 padded to their longest text."""
    saved = enc.max_batch_tokens
    enc.max_batch_tokens = None
    try:
        t0 = time.perf_counter()
        for start in range(0, len(texts), batch_size):
            enc.encode(texts[start:start + batch_size], batch_size=batch_size)  # one batch: pads to its longest
        return time.perf_counter() - t0
    finally:
        enc.max_batch_tokens = saved


def qps(search, queries: list[str], batch: int, top_k: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        search(queries[start:start + batch], top_k)
    return len(queries) / (time.perf_counter() - t0)


def concurrent_qps(url: str, queries: list[str], clients: int, top_k: int) -> float:
    shares = [queries[i::clients] for i in range(clients)]
    https = [HttpRetriever(url, timeout=60, retries=0) for _ in range(clients)]
    for h in https:
        h.search(["warm up"], top_k)
    barrier = threading.Barrier(clients + 1)

    def client(h: HttpRetriever, share: list[str]) -> None:
        barrier.wait()
        for q in share:
            h.search([q], top_k)

    threads = [threading.Thread(target=client, args=(h, s)) for h, s in zip(https, shares)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for h in https:
        h.close()
    return len(queries) / elapsed


def build_and_compare(args: argparse.Namespace, index_dir: Path, tmp: Path,
                      rows: list[tuple[str, str, str]]) -> tuple[dict, Encoder]:
    # ---------------------------------------------------------------------------------------------------- build
    sup = set(json.loads((REAL / "supported_ids.json").read_text())["nq"])
    probe = [QAExample(r["id"], r["question"], r["golden_answers"]) for r in read_jsonl(REAL / "nq.jsonl")
             if r["id"] in sup]
    cfg = IndexConfig(kind="dense", encoder="all-MiniLM-L6-v2", max_length=args.max_length, fp16=False,
                      faiss_type="flat", probe_size=len(probe))
    enc = Encoder.from_config(cfg, device="cpu")
    print(f"building the flat index of {args.corpus} (max_length {args.max_length}) ...", flush=True)
    card = build_index(args.corpus, cfg, index_dir, probe=probe, encoder=enc, work_dir=tmp / "shards")
    n = card["num_passages"]
    pps = card["encoding"]["passages_per_s"]
    rows.append((f"Index build (flat, {n:,} passages)", f"{card['build_time_s']:.1f} s",
                 f"encoding {card['encoding']['encode_seconds']:.1f} s = {pps:.1f} passages/s"))
    pr = card["probe"]
    rows.append(("Answer recall@1/3/10, 197 NQ questions", f"{pr['answer_recall@1']:.3f} / "
                 f"{pr['answer_recall@3']:.3f} / {pr['answer_recall@10']:.3f}", "gold answer string in top-k"))

    texts = [r["contents"] for r in read_jsonl(args.corpus)]
    starts = np.linspace(0, len(texts) - 64, args.sample_blocks).astype(int)
    sample = [t for s in starts for t in texts[s:s + 64]]
    t_ref = reference_style_encode(enc, sample)
    t0 = time.perf_counter()
    enc.encode_passages(sample, show_progress=False)
    t_ours = time.perf_counter() - t0
    rows.append((f"Encoding, {len(sample):,}-passage sample: reference style (file order, pad to batch max)",
                 f"{len(sample) / t_ref:.1f} passages/s", "baseline"))
    rows.append(("Encoding, same sample: ours (length-sorted, dynamic padding, token cap)",
                 f"{len(sample) / t_ours:.1f} passages/s", f"{t_ref / t_ours:.2f}x reference (goal >= 1.5x)"))

    bm25_card = build_index(args.corpus, IndexConfig(kind="bm25", probe_size=len(probe)), tmp / "bm25",
                            probe=probe, show_progress=False)
    bp = bm25_card["probe"]
    rows.append(("BM25 build (bm25s) / answer recall@1/3/10", f"{bm25_card['build_time_s']:.1f} s",
                 f"{bp['answer_recall@1']:.3f} / {bp['answer_recall@3']:.3f} / {bp['answer_recall@10']:.3f}"))
    return card, enc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REAL / "corpus.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="Markdown output (default "
                    "benchmarks/results/retrieval.md; with --only-throughput nothing is written unless given).")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--queries", type=int, default=512, help="Queries per throughput measurement.")
    ap.add_argument("--sample-blocks", type=int, default=16, help="Blocks of 64 lines in the encoding comparison.")
    ap.add_argument("--repeats", type=int, default=3, help="Alternating runs per figure (best is kept).")
    ap.add_argument("--index-dir", type=Path, default=None, help="Build (and keep) the index here (default: a "
                    "temporary directory, removed at the end).")
    ap.add_argument("--only-throughput", action="store_true", help="Skip the builds and the encoding comparison: "
                    "serve the index already in --index-dir (for quick reruns; the full run is the reference).")
    args = ap.parse_args()
    if args.out is None and not args.only_throughput:
        args.out = REPO / "benchmarks" / "results" / "retrieval.md"

    tmp = Path(tempfile.mkdtemp(prefix="tspo-retrieval-bench-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    index_dir = args.index_dir or tmp / "index"
    rows: list[tuple[str, str, str]] = []
    notes: list[str] = []
    if args.only_throughput:
        if args.index_dir is None:
            raise SystemExit("--only-throughput needs --index-dir with a built index")
        card = read_card(index_dir)
        enc = Encoder.from_config(IndexConfig(**card["config"]), device="cpu")
    else:
        card, enc = build_and_compare(args, index_dir, tmp, rows)
    n = card["num_passages"]

    # ---------------------------------------------------------------------------------------------- throughput
    pool = [r["question"] for d in DATASETS for r in read_jsonl(REAL / f"{d}.jsonl")]
    queries = pool[: args.queries]
    local = load_retriever(index_dir, encoder=enc)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tspo_core.retrieval.server", "--index", str(index_dir),
                               "--port", str(port), "--device", "cpu", "--log-level", "warning"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": OMP_POLICY})
    try:
        http = HttpRetriever(url, timeout=120, retries=60, backoff=0.25, max_backoff=1.0)
        http.health()
        http.retries = 0
        # the server must answer exactly what the in-process index answers
        check = queries[:64]
        same = [[p.id for p in x] for x in http.search(check, args.top_k)] == \
               [[p.id for p in x] for x in local.search(check, args.top_k)]
        notes.append(f"server results identical to in-process for {len(check)} queries: {same}")
        for warm in (local, http):
            warm.search(queries[:16], args.top_k)
        for batch in (1, 16, 64):
            runs_local, runs_http = [], []
            for _ in range(args.repeats):
                runs_local.append(qps(local.search, queries, batch, args.top_k))
                runs_http.append(qps(http.search, queries, batch, args.top_k))
            best_local, best_http = max(runs_local), max(runs_http)
            notes.append(f"batch {batch} runs (queries/s), in-process {[round(x) for x in runs_local]}, server "
                         f"{[round(x) for x in runs_http]}")
            goal = " (goal >= 0.95x)" if batch > 1 else ""
            rows.append((f"Queries/s, batch {batch}: in-process / HTTP server", f"{best_local:.1f} / {best_http:.1f}",
                         f"server {best_http / best_local:.2f}x in-process{goal}"))
        single = queries[:256]
        runs_one, runs_conc = [], []
        for _ in range(args.repeats):
            runs_one.append(qps(http.search, single, 1, args.top_k))
            runs_conc.append(concurrent_qps(url, single, 8, args.top_k))
        best_one, best_conc = max(runs_one), max(runs_conc)
        notes.append(f"single-query runs (queries/s), one by one {[round(x) for x in runs_one]}, 8 concurrent "
                     f"{[round(x) for x in runs_conc]}")
        stats = httpx_stats(url)
        rows.append(("Queries/s, single-query requests: one by one / 8 concurrent clients",
                     f"{best_one:.1f} / {best_conc:.1f}", f"{best_conc / best_one:.2f}x (goal >= 2x)"))
        notes.append(f"server micro-batching over the whole run: {stats}")
        http.close()
    finally:
        stop_process(server)
        local.close()

    load = os.getloadavg()
    header = (f"Retrieval benchmark: real sample ({n} passages), packaged all-MiniLM-L6-v2 fp32, max length "
              f"{args.max_length}, top-{args.top_k}, flat IP index, CPU ({os.cpu_count()} cores, "
              f"{platform.processor() or platform.machine()}), torch threads default, OMP_WAIT_POLICY={OMP_POLICY}; "
              f"{len(queries)} queries per throughput figure, best of {args.repeats}; load average at the end "
              f"{load[0]:.1f}."
              f"\n\n")
    table = "| Measurement | Value | Note |\n|---|---|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    text = header + table + "\n" + "".join(f"- {x}\n" for x in notes)
    print(text)
    if args.out is not None:
        write_text(args.out, "# Retrieval benchmark (`benchmarks/retrieval.py`)\n\n" + text)
        print(f"written to {args.out}")
    return 0


def httpx_stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/stats", timeout=10).json()


if __name__ == "__main__":
    sys.exit(main())
