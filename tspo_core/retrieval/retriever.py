"""In-process retrievers over a built index directory, and `load_retriever` to open one.

Index directory layout (written by `tspo_core.retrieval.index.build_index`):
- `index_card.json`: what was built (encoder, dimension, index type, passages, size, probe recall): the same
  bytes whenever the same index is built;
- `run_record.json`: what this build did differently from another build of the same index (date, timings, shard
  reuse, absolute paths); DVC does not hash it, `read_card` merges it back into the card.
- `offsets.npy`: byte offset of each passage line (n + 1 entries) in the passage file.
- `passages.jsonl` (copied corpus) or, per the card, a reference to the corpus file (path + size + sha256).
- dense: `index.faiss`; bm25: `bm25/` (bm25s arrays + tokenizer vocabulary).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tspo_core.data.schema import Passage
from tspo_core.errors import DataError
from tspo_core.retrieval.base import BaseRetriever, Hit, RetrievalError, check_search_args
from tspo_core.retrieval.corpus import PassageStore
from tspo_core.runinfo import merge_record, read_run_record

log = logging.getLogger(__name__)

CARD_NAME = "index_card.json"
CARD_VERSION = 1
CARD_VOLATILE = ("created_at", "build_time_s", "faiss.add_seconds", "encoding.shards_reused",
                 "encoding.shards_encoded", "encoding.passages_encoded", "encoding.encode_seconds",
                 "encoding.passages_per_s", "encoding.index_seconds", "probe.seconds", "passages.source",
                 "encoder.path", "passages.absolute")
"""Card fields that differ between two builds of the same index (kept in the run record, `tspo_core.runinfo`)."""


# ----------------------------------------------------------------------------------------------------------------
# faiss helpers
# ----------------------------------------------------------------------------------------------------------------
def faiss_gpu_count() -> int:
    """GPUs usable by faiss (0 with faiss-cpu, the default install)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # a faiss-gpu build on a machine without a driver
        return 0


def maybe_shard_to_gpus(index: Any, faiss_type: str, enabled: bool, fp16: bool = False) -> Any:
    """With faiss-gpu and GPUs present, shard a flat index across all of them (each GPU holds 1/n of the vectors;
    the shards' top-k are merged exactly; `fp16` stores the vectors in fp16, so scores become approximate).
    Otherwise, or for hnsw/ivfpq, the CPU index is returned unchanged."""
    if not enabled or faiss_type != "flat":
        return index
    n_gpus = faiss_gpu_count()
    if n_gpus == 0:
        return index
    import faiss  # pragma: no cover - needs faiss-gpu and a GPU

    co = faiss.GpuMultipleClonerOptions()  # pragma: no cover
    co.shard = True  # pragma: no cover
    co.useFloat16 = bool(fp16)  # pragma: no cover
    log.info("sharding the flat index across %d GPU(s)", n_gpus)  # pragma: no cover
    return faiss.index_cpu_to_all_gpus(index, co=co)  # pragma: no cover


def configure_search(index: Any, ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Set HNSW efSearch / IVF nprobe on an index that has them (no effect on flat indexes)."""
    import faiss

    inner = faiss.downcast_index(index) if hasattr(faiss, "downcast_index") else index
    if ef_search is not None and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(ef_search)
    if nprobe is not None and hasattr(inner, "nprobe"):
        inner.nprobe = int(nprobe)


# ----------------------------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------------------------
TIE_TOLERANCE = 1e-5
"""Dense scores this close count as tied and are ordered by passage row (the corpus order). Another CPU's kernels
move a MiniLM cosine by ~1e-7; without this, such a difference reorders near-equal passages and, with top-1, changes
what the agent reads. Ties at the edge of the tolerance grid can still flip; exact and near-exact ones cannot."""
TIE_MARGIN = 4
"""Extra candidates fetched beyond top_k so that a tie across the k-th place is resolved by row, not by FAISS."""


def rank_with_ties(scores: Sequence[float], rows: Sequence[int], k: int) -> list[tuple[float, int]]:
    """The k best (score, row) pairs: score descending on a `TIE_TOLERANCE` grid, then row ascending; rows < 0
    (FAISS padding) dropped.

    >>> rank_with_ties([0.9, 0.5000001, 0.5], [7, 9, 3], 2)
    [(0.9, 7), (0.5, 3)]
    """
    pairs = [(float(s), int(j)) for s, j in zip(scores, rows) if j >= 0]
    pairs.sort(key=lambda p: (-round(p[0] / TIE_TOLERANCE), p[1]))
    return pairs[:k]

class DenseRetriever(BaseRetriever):
    """Encode queries with the index's encoder, search the FAISS index (inner product), read passages back."""

    def __init__(self, index: Any, store: PassageStore, encoder: Any, card: dict[str, Any] | None = None, *,
                 ef_search: int | None = None, nprobe: int | None = None):
        if index.ntotal != len(store):
            raise RetrievalError(f"index holds {index.ntotal} vectors but the passage store {len(store)} passages")
        if index.d != encoder.dim:
            raise RetrievalError(f"index dimension {index.d} != encoder dimension {encoder.dim}")
        self.index, self.store, self.encoder = index, store, encoder
        self.card = card or {}
        self._ef_search = ef_search
        configure_search(index, ef_search=ef_search, nprobe=nprobe)
        self._lock = threading.Lock()

    def search_with_scores(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        queries = check_search_args(queries, top_k)
        if not queries:
            return []
        k = min(top_k, self.index.ntotal)
        fetch = min(k + TIE_MARGIN, self.index.ntotal)
        q = self.encoder.encode_queries(queries)
        if self._ef_search is not None and fetch > self._ef_search:  # HNSW needs efSearch >= the candidates
            with self._lock:
                self._ef_search = max(self._ef_search, fetch)
                configure_search(self.index, ef_search=self._ef_search)
        scores, labels = self.index.search(q, fetch)
        return [[Hit(self.store[int(j)], float(s)) for s, j in rank_with_ties(srow, lrow, k)]
                for srow, lrow in zip(scores, labels)]

    def close(self) -> None:
        self.store.close()


# ----------------------------------------------------------------------------------------------------------------
# BM25
# ----------------------------------------------------------------------------------------------------------------
def bm25_tokenizer(stopwords: Any = "en") -> Any:
    """The bm25s tokenizer used for both the corpus and the queries (lowercase, words of 2+ characters, English
    stopwords, no stemmer)."""
    from bm25s.tokenization import Tokenizer

    return Tokenizer(lower=True, stopwords=stopwords, stemmer=None)


class BM25Retriever(BaseRetriever):
    """bm25s scores computed per query over the sparse index; documents with a zero score are not returned (a
    query sharing no word with the corpus gets an empty list, as with Lucene)."""

    def __init__(self, bm25: Any, tokenizer: Any, store: PassageStore, card: dict[str, Any] | None = None):
        n_docs = int(bm25.scores["num_docs"])
        if n_docs != len(store):
            raise RetrievalError(f"BM25 index holds {n_docs} documents but the passage store {len(store)}")
        self.bm25, self.tokenizer, self.store = bm25, tokenizer, store
        self.card = card or {}

    def search_with_scores(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        queries = check_search_args(queries, top_k)
        if not queries:
            return []
        token_ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False,
                                            allow_empty=False)
        n = int(self.bm25.scores["num_docs"])
        out: list[list[Hit]] = []
        for ids in token_ids:
            if not ids:
                out.append([])
                continue
            scores = self.bm25.get_scores_from_ids(ids)
            k = min(top_k, n)
            top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
            top = top[np.lexsort((top, -scores[top]))]  # score desc, then passage order (deterministic ties)
            out.append([Hit(self.store[int(j)], float(scores[j])) for j in top if scores[j] > 0])
        return out

    def close(self) -> None:
        self.store.close()


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def read_card(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / CARD_NAME
    if not path.is_file():
        raise RetrievalError(f"{index_dir}: no {CARD_NAME} (not a built index, or the build did not finish)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RetrievalError(f"{path}: unreadable index card: {err}") from None
    if card.get("format_version") != CARD_VERSION:
        raise RetrievalError(f"{path}: index format {card.get('format_version')!r}, expected {CARD_VERSION}; "
                             "rebuild the index")
    return merge_record(card, read_run_record(index_dir))


def open_passages(index_dir: str | Path, card: dict[str, Any]) -> PassageStore:
    """The passage store of a built index: the copied file, or the referenced corpus (found relative to the index
    directory first, then by absolute path) after checking its size and first/last ids against the card."""
    index_dir = Path(index_dir)
    info = card["passages"]
    offsets = np.load(index_dir / "offsets.npy")
    if info["mode"] == "copy":
        path = index_dir / info["file"]
    else:
        absolute = info.get("absolute") or info.get("file")  # (`file`: cards written before the run record)
        candidates = [Path(os.path.normpath(index_dir / info["relpath"])), *([Path(absolute)] if absolute else [])]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise RetrievalError(f"{index_dir}: referenced corpus not found at {info['relpath']!r} (relative to the "
                                 f"index) nor {absolute!r}; rebuild with index.copy_passages = true to make "
                                 "the index self-contained")
        path = found[0]
    size = os.path.getsize(path)
    if size != info["size_bytes"]:
        raise RetrievalError(f"{path}: {size} bytes, but the index was built from {info['size_bytes']} bytes "
                             "(the corpus changed since indexing: rebuild the index)")
    try:
        store = PassageStore(path, offsets)
        first, last = store[0].id, store[len(store) - 1].id
    except DataError as err:
        raise RetrievalError(f"{path}: does not match the index offsets ({err}); rebuild the index") from None
    if (first, last) != (info["first_id"], info["last_id"]):
        store.close()
        raise RetrievalError(f"{path}: first/last passage ids {first!r}/{last!r} differ from the index's "
                             f"{info['first_id']!r}/{info['last_id']!r}; rebuild the index")
    return store


def load_retriever(index_dir: str | Path, *, device: str | None = None, encoder: Any = None,
                   use_gpu: bool | None = None, mmap: bool = False) -> BaseRetriever:
    """Open a built index for in-process search.

    `device`: encoder device (default: the build config's, `auto` = cuda when available). `encoder`: an already
    loaded `Encoder` to reuse (must match the card's encoder). `use_gpu`: shard a flat index across GPUs with
    faiss-gpu (default: the build config's `gpu_shard`). `mmap`: memory-map the FAISS file instead of reading it
    (large flat indexes on CPU).
    """
    index_dir = Path(index_dir)
    card = read_card(index_dir)
    store = open_passages(index_dir, card)
    cfg = card.get("config", {})
    try:
        if card["kind"] == "bm25":
            import bm25s

            bdir = index_dir / "bm25"
            bm25 = bm25s.BM25.load(str(bdir), mmap=mmap, load_vocab=True, show_progress=False)
            tok = bm25_tokenizer(stopwords=[])
            tok.load_vocab(str(bdir))
            tok.load_stopwords(str(bdir))
            return BM25Retriever(bm25, tok, store, card)

        import faiss

        from tspo_core.retrieval.encoder import Encoder

        enc_info = card["encoder"]
        if encoder is None:
            encoder = Encoder(enc_info["name"], pooling=enc_info["pooling"], normalize=enc_info["normalize"],
                              query_prefix=enc_info["query_prefix"], passage_prefix=enc_info["passage_prefix"],
                              max_length=enc_info["max_length"], batch_size=cfg.get("batch_size", 64),
                              fp16=cfg.get("fp16", True), device=device or cfg.get("device", "auto"),
                              cpu_batch_tokens=cfg.get("cpu_batch_tokens", 2048))
        mine = encoder.signature()
        for key in ("fingerprint", "pooling", "normalize", "query_prefix", "dim"):
            if mine.get(key) != enc_info.get(key):
                raise RetrievalError(f"{index_dir}: encoder mismatch on {key!r}: index built with "
                                     f"{enc_info.get(key)!r}, query encoder has {mine.get(key)!r}")
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(str(index_dir / "index.faiss"), flags)
        gpu = cfg.get("gpu_shard", True) if use_gpu is None else use_gpu
        index = maybe_shard_to_gpus(index, card["index_type"], gpu, fp16=bool(cfg.get("fp16", False)))
        return DenseRetriever(index, store, encoder, card, ef_search=cfg.get("hnsw_ef_search"),
                              nprobe=cfg.get("ivf_nprobe"))
    except BaseException:
        store.close()
        raise


def passages_to_json(hits: list[Hit], with_scores: bool) -> list[dict[str, Any]]:
    """Search-R1 reply entries for one query: `{"document": {...}, "score": s}` or the bare document."""
    if with_scores:
        return [{"document": h.passage.to_json(), "score": h.score} for h in hits]
    return [h.passage.to_json() for h in hits]


def hits_from_json(entries: list[Any], with_scores: bool) -> list[Hit]:
    """Inverse of `passages_to_json` (the HTTP client's parser); `RetrievalError` on a malformed entry."""
    out = []
    for e in entries:
        try:
            doc = e["document"] if with_scores else e
            out.append(Hit(Passage(id=str(doc["id"]), contents=str(doc["contents"])),
                           float(e["score"]) if with_scores else float("nan")))
        except (KeyError, TypeError, ValueError) as err:
            raise RetrievalError(f"malformed result entry {str(e)[:200]!r}: {err!r}") from None
    return out
