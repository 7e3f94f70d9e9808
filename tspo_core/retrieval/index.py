"""Build a retrieval index directory from a corpus: dense FAISS (flat / hnsw / ivfpq) or BM25 (bm25s).

    card = build_index("data/corpus.jsonl", params.index, Path("artifacts/index"), probe=dev_examples)

Order of work:
1. One validating pass over the corpus (byte offsets, per-shard hashes; texts are not kept in memory).
2. A memory estimate (flat: passages x dim x 4 bytes, plus one shard of embeddings held while adding), logged;
   the build is refused with `MemoryBudgetError` when it exceeds `index.memory_budget_gb`. Nothing is encoded
   before this check.
3. Dense: passages are encoded shard by shard (`index.shard_size`). Each finished shard is written atomically to
   a work directory beside the output (`.<out>.shards/`) with a manifest recording the encoder signature and the
   shard's content hash; a rerun after an interruption reuses every shard whose encoder and passages match. The
   work directory is removed after a successful build (unless `keep_shards`).
4. The index is built from the shards, the optional probe is searched (recall@1/3/10 of the supporting passages
   and of the answer string), and `index_card.json` is written.
The output directory is assembled under a temporary name and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tspo_core.config import IndexConfig
from tspo_core.data.schema import Passage, QAExample
from tspo_core.io import atomic_dir, atomic_open, write_json
from tspo_core.metrics import contains_answer
from tspo_core.retrieval.base import MemoryBudgetError, Retriever
from tspo_core.retrieval.corpus import CorpusScan, PassageStore, scan_corpus, write_passages
from tspo_core.retrieval.retriever import (CARD_NAME, CARD_VERSION, CARD_VOLATILE, BM25Retriever, DenseRetriever,
                                           bm25_tokenizer, maybe_shard_to_gpus)
from tspo_core.runinfo import split_record, write_run_record

log = logging.getLogger(__name__)

GB = 1024**3
PROBE_KS = (1, 3, 10)


# ----------------------------------------------------------------------------------------------------------------
# memory estimate
# ----------------------------------------------------------------------------------------------------------------
def ivf_lists(cfg: IndexConfig, n: int) -> int:
    """IVF lists actually used: `ivf_nlist`, lowered so that each list gets ~39+ training points."""
    return max(1, min(cfg.ivf_nlist, n // 39))


def estimate_memory(n: int, dim: int | None, cfg: IndexConfig, n_words: int = 0) -> dict[str, Any]:
    """Bytes the build needs in RAM: the index itself plus the working set (one shard of fp32 embeddings for
    dense; token lists for BM25). Returned with the formula used, for the log and the card."""
    if cfg.kind == "bm25":
        index = n_words * 8 + n * 16  # sparse matrix (score + row id per posting) and per-document arrays
        working = n_words * 8 + n * 64  # token id lists while tokenizing
        formula = f"bm25: ~{n_words} postings x 8 B + token lists"
    else:
        assert dim is not None
        vec = n * dim * 4
        if cfg.faiss_type == "flat":
            index, formula = vec, f"flat: {n} passages x {dim} dims x 4 B"
        elif cfg.faiss_type == "hnsw":
            links = int(n * cfg.hnsw_m * 2 * 4 * 1.1)
            index, formula = vec + links, f"hnsw: {n} x {dim} x 4 B + {n} x {cfg.hnsw_m} x 2 links x 4 B"
        else:
            nlist = ivf_lists(cfg, n)
            index = n * (cfg.pq_m + 8) + nlist * dim * 4
            formula = f"ivfpq: {n} x ({cfg.pq_m} code B + 8 id B) + {nlist} centroids x {dim} x 4 B"
            vec = 0  # only a training sample is held, counted in the working set
        working = min(n, cfg.shard_size) * dim * 4
        if cfg.faiss_type == "ivfpq":
            working += min(n, _ivf_train_size(cfg, n)) * dim * 4
    total = index + working
    return {"index_bytes": int(index), "working_bytes": int(working), "total_bytes": int(total),
            "total_gb": round(total / GB, 4), "budget_gb": cfg.memory_budget_gb, "formula": formula}


def _ivf_train_size(cfg: IndexConfig, n: int) -> int:
    return min(n, max(ivf_lists(cfg, n) * 64, 256 * 40))


def check_memory(n: int, dim: int | None, cfg: IndexConfig, n_words: int = 0) -> dict[str, Any]:
    est = estimate_memory(n, dim, cfg, n_words)
    log.info("index memory estimate: %.3f GB (index %.3f GB [%s] + working %.3f GB); budget %.3f GB",
             est["total_bytes"] / GB, est["index_bytes"] / GB, est["formula"], est["working_bytes"] / GB,
             cfg.memory_budget_gb)
    if est["total_bytes"] > cfg.memory_budget_gb * GB:
        hint = ("use index.faiss_type = hnsw (same vectors, graph on top) only if memory allows, ivfpq (about "
                f"{cfg.pq_m + 8} bytes per passage) or index.kind = bm25, shard the flat index across GPUs, or "
                "raise index.memory_budget_gb") if cfg.kind == "dense" else "raise index.memory_budget_gb"
        raise MemoryBudgetError(
            f"refusing to build the {cfg.kind}/{cfg.faiss_type if cfg.kind == 'dense' else 'bm25'} index: estimated "
            f"{est['total_bytes'] / GB:.3f} GB ({est['formula']}, plus {est['working_bytes'] / GB:.3f} GB working "
            f"set) exceeds index.memory_budget_gb = {cfg.memory_budget_gb} GB; {hint}")
    return est


# ----------------------------------------------------------------------------------------------------------------
# resumable shard encoding
# ----------------------------------------------------------------------------------------------------------------
def default_work_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.shards"


def _shard_ok(path: Path, n: int, dim: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (n, dim) and arr.dtype == np.float32


def encode_shards(scan: CorpusScan, store: PassageStore, encoder: Any, work_dir: Path,
                  show_progress: bool = True) -> tuple[list[Path], dict[str, Any]]:
    """Encode the corpus shard by shard into `work_dir`, reusing shards a previous (interrupted) run finished
    with the same encoder signature and the same passages. Returns the shard files and encoding statistics."""
    work_dir.mkdir(parents=True, exist_ok=True)
    sig = encoder.signature()
    manifest_path = work_dir / "manifest.json"
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            manifest = None
    if not manifest or manifest.get("encoder") != sig or manifest.get("shard_size") != scan.shard_size:
        if manifest:
            log.warning("%s: shards were encoded with another encoder or shard size; re-encoding", work_dir)
        for f in work_dir.glob("emb_*.npy"):
            f.unlink()
        manifest = {"version": 1, "encoder": sig, "shard_size": scan.shard_size, "shards": {}}
        write_json(manifest_path, manifest)

    files, reused, encoded, n_encoded, seconds = [], 0, 0, 0, 0.0
    for s in range(scan.n_shards):
        start, end = scan.shard_bounds(s)
        f = work_dir / f"emb_{s:05d}.npy"
        entry = manifest["shards"].get(str(s))
        if (entry and entry.get("sha256") == scan.shard_hashes[s] and entry.get("n") == end - start
                and _shard_ok(f, end - start, encoder.dim)):
            reused += 1
        else:
            texts = [store[i].contents for i in range(start, end)]
            t0 = time.perf_counter()
            emb = encoder.encode_passages(texts, show_progress=show_progress,
                                          desc=f"encode shard {s + 1}/{scan.n_shards}")
            seconds += time.perf_counter() - t0
            with atomic_open(f, "wb") as fh:
                np.save(fh, np.ascontiguousarray(emb, dtype=np.float32))
            manifest["shards"][str(s)] = {"start": start, "end": end, "n": end - start,
                                          "sha256": scan.shard_hashes[s]}
            write_json(manifest_path, manifest)
            encoded += 1
            n_encoded += end - start
            log.info("encoded shard %d/%d (%d passages, %.1f passages/s)", s + 1, scan.n_shards, end - start,
                     (end - start) / max(time.perf_counter() - t0, 1e-9))
        files.append(f)
    stats = {"shards": scan.n_shards, "shards_reused": reused, "shards_encoded": encoded,
             "passages_encoded": n_encoded, "encode_seconds": round(seconds, 3),
             "passages_per_s": round(n_encoded / seconds, 2) if seconds > 0 else None}
    return files, stats


# ----------------------------------------------------------------------------------------------------------------
# FAISS
# ----------------------------------------------------------------------------------------------------------------
def _build_faiss(files: list[Path], n: int, dim: int, cfg: IndexConfig) -> tuple[Any, dict[str, Any]]:
    import faiss

    info: dict[str, Any] = {"metric": "inner_product"}
    if cfg.faiss_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.faiss_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        info.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef_search=cfg.hnsw_ef_search)
    else:
        nlist = ivf_lists(cfg, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        # training sample: an even, seeded draw across all shards
        rng = np.random.default_rng(0)
        take = np.sort(rng.choice(n, size=_ivf_train_size(cfg, n), replace=False))
        sample, base = [], 0
        for f in files:
            arr = np.load(f, mmap_mode="r")
            sel = take[(take >= base) & (take < base + len(arr))] - base
            sample.append(np.asarray(arr[sel]))
            base += len(arr)
        log.info("training ivfpq (nlist %d, m %d) on %d vectors", nlist, cfg.pq_m, sum(len(s) for s in sample))
        index.train(np.concatenate(sample))
        index.nprobe = cfg.ivf_nprobe
        info.update(nlist=nlist, pq_m=cfg.pq_m, pq_bits=8, nprobe=cfg.ivf_nprobe)
    for f in files:
        index.add(np.ascontiguousarray(np.load(f)))
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    return index, info


def _check_dense_config(cfg: IndexConfig, dim: int, n: int) -> None:
    if cfg.faiss_type == "ivfpq":
        if dim % cfg.pq_m:
            raise ValueError(f"index.pq_m = {cfg.pq_m} must divide the encoder dimension {dim}")
        if n < 256:
            raise ValueError(f"ivfpq needs at least 256 passages to train its codebooks (corpus has {n}); use "
                             "index.faiss_type = flat")


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------
def evaluate_retriever(retriever: Retriever, examples: Sequence[QAExample], ks: Sequence[int] = PROBE_KS,
                       batch_size: int = 256) -> dict[str, Any]:
    """Recall@k of the supporting passages (hit: any id in `metadata["supporting_ids"]` is in the top k; over the
    examples that list some) and answer recall@k (some gold answer occurs in a top-k passage, `contains_answer`;
    over all examples)."""
    ks = sorted(set(int(k) for k in ks))
    kmax = ks[-1]
    sup_hits = {k: 0 for k in ks}
    ans_hits = {k: 0 for k in ks}
    n_sup = 0
    examples = list(examples)
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        results = retriever.search([ex.question for ex in batch], kmax)
        for ex, passages in zip(batch, results):
            support = set(map(str, ex.metadata.get("supporting_ids") or []))
            if support:
                n_sup += 1
            first_sup = next((r for r, p in enumerate(passages) if p.id in support), None)
            first_ans = next((r for r, p in enumerate(passages) if contains_answer(p.contents, ex.golden_answers)),
                             None)
            for k in ks:
                sup_hits[k] += first_sup is not None and first_sup < k
                ans_hits[k] += first_ans is not None and first_ans < k
    n = len(examples)
    out: dict[str, Any] = {"n_questions": n, "n_with_support": n_sup}
    for k in ks:
        out[f"recall@{k}"] = round(sup_hits[k] / n_sup, 4) if n_sup else None
    for k in ks:
        out[f"answer_recall@{k}"] = round(ans_hits[k] / n, 4) if n else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------------
def _dir_size(path: Path, exclude: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name not in exclude)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("faiss", "bm25s", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def build_index(corpus: Sequence[Passage] | str | Path, cfg: IndexConfig, out_dir: str | Path,
                probe: Sequence[QAExample] | None = None, *, encoder: Any = None, work_dir: str | Path | None = None,
                keep_shards: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Build the index described by `cfg` into `out_dir` (replaced atomically) and return its card.

    `corpus`: a jsonl path (referenced by path + byte offsets, or copied when `cfg.copy_passages`) or a list of
    passages (written to `passages.jsonl`). `probe`: questions for the card's recall figures (the first
    `cfg.probe_size` are used). `encoder`: an already loaded `Encoder` to use instead of loading `cfg.encoder`
    (its own settings are the ones recorded). `work_dir`: where embedding shards are kept while building
    (default `<out_dir parent>/.<out_dir name>.shards`); removed on success unless `keep_shards`.
    Raises `MemoryBudgetError` before any encoding when the estimate exceeds `cfg.memory_budget_gb`.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        # 1. corpus
        if isinstance(corpus, (str, Path)):
            src = Path(corpus)
            if cfg.copy_passages:
                shutil.copyfile(src, tmp / "passages.jsonl")
                scan = scan_corpus(tmp / "passages.jsonl", cfg.shard_size)
                pinfo = {"mode": "copy", "file": "passages.jsonl", "source": str(src.resolve())}
            else:
                scan = scan_corpus(src, cfg.shard_size)
                pinfo = {"mode": "reference", "absolute": str(src.resolve()),
                         "relpath": os.path.relpath(src.resolve(), out_dir.resolve())}
        else:
            scan = write_passages(corpus, tmp / "passages.jsonl", cfg.shard_size)
            pinfo = {"mode": "copy", "file": "passages.jsonl", "source": None}
        pinfo.update(size_bytes=scan.size_bytes, sha256=scan.sha256, first_id=scan.first_id, last_id=scan.last_id)
        with atomic_open(tmp / "offsets.npy", "wb") as fh:
            np.save(fh, scan.offsets)
        n = scan.n

        # 2. memory estimate (before any model is loaded or anything is encoded)
        if cfg.kind == "dense":
            from tspo_core.retrieval.encoder import encoder_dimension

            dim = encoder.dim if encoder is not None else encoder_dimension(cfg.encoder)
            _check_dense_config(cfg, dim, n)
        else:
            dim = None
        mem = check_memory(n, dim, cfg, scan.n_words)

        store = PassageStore(scan.path, scan.offsets)
        try:
            card: dict[str, Any] = {"format_version": CARD_VERSION, "kind": cfg.kind, "num_passages": n,
                                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            if cfg.kind == "dense":
                from tspo_core.retrieval.encoder import Encoder

                if encoder is None:
                    encoder = Encoder.from_config(cfg)
                files, enc_stats = encode_shards(scan, store, encoder, work, show_progress)
                t0 = time.perf_counter()
                index, finfo = _build_faiss(files, n, encoder.dim, cfg)
                import faiss

                faiss.write_index(index, str(tmp / "index.faiss"))
                finfo["add_seconds"] = round(time.perf_counter() - t0, 3)
                card.update(encoder=encoder.describe(), dimension=encoder.dim, index_type=cfg.faiss_type,
                            faiss=finfo, encoding=enc_stats)
                search_index = maybe_shard_to_gpus(index, cfg.faiss_type, cfg.gpu_shard, fp16=cfg.fp16)
                retriever: Any = DenseRetriever(search_index, store, encoder, card, ef_search=cfg.hnsw_ef_search,
                                                nprobe=cfg.ivf_nprobe)
            else:
                import bm25s

                t0 = time.perf_counter()
                tok = bm25_tokenizer("en")
                texts = [store[i].contents for i in range(n)]
                ids = tok.tokenize(texts, update_vocab=True, return_as="ids", show_progress=show_progress)
                del texts
                bm25 = bm25s.BM25(k1=cfg.bm25_k1, b=cfg.bm25_b)
                bm25.index((ids, tok.get_vocab_dict()), show_progress=show_progress)
                del ids
                bdir = tmp / "bm25"
                bm25.save(str(bdir), show_progress=False)
                tok.save_vocab(str(bdir))
                tok.save_stopwords(str(bdir))
                card.update(encoder={"name": "bm25s", "tokenizer": "lowercase words (2+ chars), English "
                                     "stopwords, no stemming", "k1": cfg.bm25_k1, "b": cfg.bm25_b},
                            dimension=None, index_type="bm25",
                            encoding={"index_seconds": round(time.perf_counter() - t0, 3),
                                      "vocabulary": len(tok.get_vocab_dict())})
                retriever = BM25Retriever(bm25, tok, store, card)

            card["build_time_s"] = round(time.perf_counter() - t_start, 3)
            # 3. probe
            if probe:
                chosen = list(probe)[:cfg.probe_size]
                t0 = time.perf_counter()
                card["probe"] = evaluate_retriever(retriever, chosen) if chosen else None
                if card["probe"] is not None:
                    card["probe"]["seconds"] = round(time.perf_counter() - t0, 3)
            else:
                card["probe"] = None
        finally:
            store.close()

        card.update(passages=pinfo, memory_estimate=mem, config=cfg.model_dump(mode="json"), versions=_versions(),
                    size_on_disk_bytes=_dir_size(tmp, exclude=(CARD_NAME,)),
                    referenced_corpus_bytes=scan.size_bytes if pinfo["mode"] == "reference" else 0)
        stable, record = split_record(card, CARD_VOLATILE)
        write_json(tmp / CARD_NAME, stable)  # the same bytes for the same build: DVC's hash of the index
        write_run_record(tmp, record)  # this build's clock and absolute paths; read_card merges it back
    if not keep_shards and work.exists():
        shutil.rmtree(work, ignore_errors=True)
    log.info("built %s index of %d passages in %.1fs -> %s", card["index_type"], n, card["build_time_s"], out_dir)
    return card
