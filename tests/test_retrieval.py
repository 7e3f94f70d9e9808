"""Retrieval: encoder, index building (dense flat/hnsw/ivfpq, BM25), resumable encoding, memory budget, cards.

Real-data tests index the shared 6,742-passage wiki-18 style sample (`real_qa/corpus.jsonl`) once per module and
measure answer recall@3 (some gold answer string in the top 3, `contains_answer`) for the 197 NQ questions whose
gold paragraph is in the corpus (`supported_ids.json`; the shared jsonl records carry no supporting passage ids).

Encoding the whole sample at max_length 256 takes 2-4 minutes on the 2 shared CPU cores, so the dense fixture uses
max_length 128 (about 1.5 minutes; the benchmark script measures max_length 256). Measured (max_length 128,
packaged all-MiniLM-L6-v2, flat IP): answer recall@1/3/10 = 0.888 / 0.985 / 0.990; BM25 (bm25s, no stemming):
0.792 / 0.893 / 0.939. Floors below leave a few points of slack for library-version drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tspo_core.config import IndexConfig
from tspo_core.data.schema import Passage, QAExample
from tspo_core.errors import DataError
from tspo_core.retrieval import (MemoryBudgetError, RetrievalError, Retriever, build_index, estimate_memory,
                                 evaluate_retriever, load_retriever, read_card)
from tspo_core.retrieval.corpus import PassageStore, scan_corpus
from tspo_core.retrieval.encoder import Encoder, resolve_encoder
from tspo_core.retrieval.index import check_memory

# Idle OpenMP threads sleep instead of spinning: on the shared 2-core machine the default policy makes torch many
# times slower under load. Effective only if torch is not imported yet (the lead may want it in conftest/Makefile).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DENSE_RECALL3_FLOOR = 0.93  # measured 0.985
BM25_RECALL3_FLOOR = 0.85  # measured 0.893
TEST_MAX_LENGTH = 128


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def real_passages(real_qa_dir: Path) -> list[Passage]:
    return [Passage(r["id"], r["contents"]) for r in _read_jsonl(real_qa_dir / "corpus.jsonl")]


@pytest.fixture(scope="module")
def nq_supported(real_qa_dir: Path) -> list[QAExample]:
    ids = set(json.loads((real_qa_dir / "supported_ids.json").read_text())["nq"])
    rows = [r for r in _read_jsonl(real_qa_dir / "nq.jsonl") if r["id"] in ids]
    assert len(rows) == len(ids) == 197
    return [QAExample(r["id"], r["question"], r["golden_answers"]) for r in rows]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return Encoder("all-MiniLM-L6-v2", max_length=TEST_MAX_LENGTH, batch_size=64)


@pytest.fixture(scope="module")
def real_dense(real_qa_dir: Path, minilm: Encoder, nq_supported, tmp_path_factory):
    """The real sample indexed once (flat, packaged MiniLM, max_length 128), shards kept for brute force."""
    root = tmp_path_factory.mktemp("real_dense")
    cfg = IndexConfig(kind="dense", faiss_type="flat", max_length=TEST_MAX_LENGTH, shard_size=4000)
    card = build_index(real_qa_dir / "corpus.jsonl", cfg, root / "index", probe=nq_supported, encoder=minilm,
                       work_dir=root / "shards", keep_shards=True, show_progress=False)
    retriever = load_retriever(root / "index", encoder=minilm)
    yield card, retriever, root
    retriever.close()


@pytest.fixture(scope="module")
def real_bm25(real_qa_dir: Path, nq_supported, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_bm25")
    card = build_index(real_qa_dir / "corpus.jsonl", IndexConfig(kind="bm25"), root / "index", probe=nq_supported,
                       show_progress=False)
    retriever = load_retriever(root / "index")
    yield card, retriever
    retriever.close()


class HashEncoder:
    """A fast deterministic stand-in for an HF encoder: hashed bag of words, L2-normalized (for index-type tests
    that do not need semantic quality)."""

    def __init__(self, dim: int = 64):
        self.dim = dim

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for w in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little")
            v[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        n = np.linalg.norm(v)
        return v / n if n else v

    def encode_passages(self, texts, **_: object) -> np.ndarray:
        return np.stack([self._vec(t) for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)

    def encode_queries(self, queries, **_: object) -> np.ndarray:
        return self.encode_passages(queries)

    def signature(self) -> dict:
        return {"name": "hash", "fingerprint": "hash", "pooling": "mean", "normalize": True,
                "query_prefix": "", "passage_prefix": "", "max_length": 0, "dtype": "float32", "dim": self.dim}

    def describe(self) -> dict:
        return {**self.signature(), "path": None}


class Recording:
    """Wraps an encoder; records `encode_passages` calls and can raise on the n-th one (a simulated crash)."""

    def __init__(self, inner, fail_on_call: int | None = None):
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_passages(self, texts, **kw):
        self.calls.append(len(texts))
        if self.fail_on_call is not None and len(self.calls) >= self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner.encode_passages(texts, **kw)


def _tiny(real_passages: list[Passage], n: int = 40) -> list[Passage]:
    return real_passages[:n]


# ----------------------------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------------------------
def test_packaged_minilm_resolves_offline():
    path = Path(resolve_encoder("all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file()
    assert resolve_encoder("/some/local/dir") == "/some/local/dir"


def test_encoder_matches_sentence_transformers(minilm: Encoder, real_passages):
    from sentence_transformers import SentenceTransformer

    texts = [p.contents for p in real_passages[:12]] + ["who got the first nobel prize in physics", "x"]
    st_model = SentenceTransformer(resolve_encoder("all-MiniLM-L6-v2"), device="cpu")
    st_model.max_seq_length = TEST_MAX_LENGTH
    ref = st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    ours = minilm.encode_passages(texts, show_progress=False)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_encoder_sorting_and_batching_do_not_change_vectors(minilm: Encoder, real_passages):
    texts = [p.contents for p in real_passages[100:124]] + ["short", "a slightly longer query text"]
    together = minilm.encode(texts, batch_size=64)
    alone = np.concatenate([minilm.encode([t]) for t in texts])
    small = minilm.encode(texts, batch_size=3)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(small, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_encoder_prefixes_change_inputs(minilm: Encoder):
    e5_style = Encoder("all-MiniLM-L6-v2", query_prefix="query: ", passage_prefix="passage: ",
                       max_length=TEST_MAX_LENGTH)
    q = e5_style.encode_queries(["paris"])
    np.testing.assert_allclose(q, minilm.encode(["query: paris"]), atol=1e-6)
    assert not np.allclose(q, minilm.encode(["paris"]), atol=1e-3)
    assert e5_style.signature() != minilm.signature()


# ----------------------------------------------------------------------------------------------------------------
# real data
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_dense_answer_recall(real_dense, nq_supported):
    card, retriever, _ = real_dense
    assert isinstance(retriever, Retriever)
    probe = card["probe"]
    assert probe["n_questions"] == 197 and probe["n_with_support"] == 0 and probe["recall@3"] is None
    measured = evaluate_retriever(retriever, nq_supported, ks=(1, 3, 10))
    assert measured["answer_recall@3"] == probe["answer_recall@3"]  # loaded index == the one just built
    print(f"dense MiniLM answer recall@1/3/10: {measured['answer_recall@1']} / {measured['answer_recall@3']} / "
          f"{measured['answer_recall@10']}; encoding {card['encoding']['passages_per_s']} passages/s")
    assert measured["answer_recall@3"] >= DENSE_RECALL3_FLOOR
    assert measured["answer_recall@1"] <= measured["answer_recall@3"] <= measured["answer_recall@10"]


def test_real_bm25_answer_recall(real_bm25, nq_supported):
    card, retriever = real_bm25
    measured = evaluate_retriever(retriever, nq_supported)
    print(f"bm25 answer recall@1/3/10: {measured['answer_recall@1']} / {measured['answer_recall@3']} / "
          f"{measured['answer_recall@10']}")
    assert measured == {k: v for k, v in card["probe"].items() if k != "seconds"}
    assert measured["answer_recall@3"] >= BM25_RECALL3_FLOOR


@pytest.mark.slow
def test_real_flat_index_equals_brute_force(real_dense, minilm: Encoder, nq_supported):
    card, retriever, root = real_dense
    emb = np.concatenate([np.load(f) for f in sorted((root / "shards").glob("emb_*.npy"))])
    assert emb.shape == (card["num_passages"], card["dimension"]) == (6742, 384)
    questions = [ex.question for ex in nq_supported]
    q = minilm.encode_queries(questions)
    sims = q @ emb.T
    k = 10
    got = retriever.search_with_scores(questions, k)
    store = retriever.store
    for i, hits in enumerate(got):
        order = np.argsort(-sims[i], kind="stable")[:k]
        exact = sims[i][order]
        np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5)
        for r, (hit, j) in enumerate(zip(hits, order)):
            tied = (r > 0 and exact[r - 1] - exact[r] < 1e-5) or (r + 1 < k and exact[r] - exact[r + 1] < 1e-5)
            if not tied:
                assert hit.passage.id == store[int(j)].id


@pytest.mark.slow
def test_real_dense_card(real_dense, real_qa_dir: Path):
    card, _, root = real_dense
    for key in ("encoder", "dimension", "index_type", "num_passages", "build_time_s", "size_on_disk_bytes",
                "probe", "memory_estimate", "passages"):
        assert key in card, key
    assert card["encoder"]["name"] == "all-MiniLM-L6-v2" and card["encoder"]["max_length"] == TEST_MAX_LENGTH
    assert card["index_type"] == "flat" and card["num_passages"] == 6742
    assert card["memory_estimate"]["index_bytes"] == 6742 * 384 * 4
    assert card["passages"]["mode"] == "reference"
    assert (root / "index" / card["passages"]["relpath"]).resolve() == (real_qa_dir / "corpus.jsonl").resolve()
    on_disk = sum(f.stat().st_size for f in (root / "index").iterdir()
                  if f.name not in ("index_card.json", "run_record.json"))
    assert card["size_on_disk_bytes"] == on_disk
    assert read_card(root / "index") == card  # the card file and the run record, merged
    assert not list((root / "index").parent.glob(".index.*.tmp"))  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------------------------
# building: resumable encoding, memory budget, atomic output
# ----------------------------------------------------------------------------------------------------------------
def test_resumable_encoding_reuses_finished_shards(minilm: Encoder, real_passages, tmp_path: Path):
    corpus = _tiny(real_passages, 40)
    cfg = IndexConfig(kind="dense", max_length=TEST_MAX_LENGTH, shard_size=16)
    out, work = tmp_path / "index", tmp_path / "shards"

    crashing = Recording(minilm, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, cfg, out, encoder=crashing, work_dir=work, show_progress=False)
    assert crashing.calls == [16, 16]
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index")]
    manifest = json.loads((work / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["0"] and (work / "emb_00000.npy").is_file()

    resumed = Recording(minilm)
    card = build_index(corpus, cfg, out, encoder=resumed, work_dir=work, keep_shards=True, show_progress=False)
    assert resumed.calls == [16, 8]  # shard 0 reused, shards 1 and 2 encoded
    assert card["encoding"]["shards_reused"] == 1 and card["encoding"]["shards_encoded"] == 2

    # the resumed index equals one built in a single run
    fresh = build_index(corpus, cfg, tmp_path / "fresh", encoder=minilm, work_dir=tmp_path / "w2",
                        show_progress=False)
    assert not (tmp_path / "w2").exists()  # shards are removed after a successful build by default
    assert fresh["num_passages"] == card["num_passages"] == 40
    qs = [p.title for p in corpus[:10]]
    with load_retriever(out, encoder=minilm) as a, load_retriever(tmp_path / "fresh", encoder=minilm) as b:
        ra, rb = a.search_with_scores(qs, 5), b.search_with_scores(qs, 5)
    assert [[h.passage.id for h in x] for x in ra] == [[h.passage.id for h in x] for x in rb]
    np.testing.assert_allclose([[h.score for h in x] for x in ra], [[h.score for h in x] for x in rb], atol=1e-6)

    # a changed passage invalidates only its own shard
    changed = list(corpus)
    changed[20] = Passage(changed[20].id, changed[20].contents + " (edited)")
    again = Recording(minilm)
    build_index(changed, cfg, tmp_path / "changed", encoder=again, work_dir=work, show_progress=False)
    assert again.calls == [16]
    assert not work.exists()


def test_encoder_change_discards_shards(real_passages, tmp_path: Path):
    corpus = _tiny(real_passages, 30)
    cfg = IndexConfig(kind="dense", shard_size=10)
    work = tmp_path / "shards"
    build_index(corpus, cfg, tmp_path / "a", encoder=HashEncoder(32), work_dir=work, keep_shards=True,
                show_progress=False)
    other = Recording(HashEncoder(48))
    card = build_index(corpus, cfg, tmp_path / "a", encoder=other, work_dir=work, keep_shards=True,
                       show_progress=False)
    assert other.calls == [10, 10, 10] and card["dimension"] == 48


def test_memory_budget_refusal(real_passages, tmp_path: Path):
    corpus = _tiny(real_passages, 40)
    never = Recording(HashEncoder(384), fail_on_call=1)
    cfg = IndexConfig(kind="dense", memory_budget_gb=1e-6)
    with pytest.raises(MemoryBudgetError, match=r"exceeds index\.memory_budget_gb"):
        build_index(corpus, cfg, tmp_path / "index", encoder=never, show_progress=False)
    assert never.calls == []  # refused before encoding anything
    assert not (tmp_path / "index").exists()
    with pytest.raises(MemoryBudgetError, match="bm25"):
        build_index(corpus, IndexConfig(kind="bm25", memory_budget_gb=1e-7), tmp_path / "bm", show_progress=False)
    assert not (tmp_path / "bm").exists()


def test_memory_estimate_formulas():
    cfg = IndexConfig()
    est = estimate_memory(21_000_000, 768, cfg)
    assert est["index_bytes"] == 21_000_000 * 768 * 4  # ~60 GiB: the wiki-18 e5 flat index
    with pytest.raises(MemoryBudgetError) as err:
        check_memory(21_000_000, 768, cfg)
    msg = str(err.value)
    assert "GB" in msg and "memory_budget_gb" in msg and "ivfpq" in msg
    ivf = estimate_memory(21_000_000, 768, IndexConfig(faiss_type="ivfpq"))
    assert ivf["index_bytes"] < est["index_bytes"] / 20
    hnsw = estimate_memory(1000, 384, IndexConfig(faiss_type="hnsw"))
    assert hnsw["index_bytes"] > 1000 * 384 * 4


def test_failed_build_keeps_previous_index(real_passages, tmp_path: Path):
    corpus = _tiny(real_passages, 20)
    out = tmp_path / "index"
    build_index(corpus, IndexConfig(kind="bm25"), out, show_progress=False)
    before = (out / "index_card.json").read_bytes()

    class Boom(HashEncoder):
        def encode_queries(self, queries, **_):
            raise RuntimeError("probe failed")

    probe = [QAExample("q", "anything", ["x"])]
    with pytest.raises(RuntimeError, match="probe failed"):
        build_index(corpus, IndexConfig(kind="dense"), out, probe=probe, encoder=Boom(16), show_progress=False)
    assert (out / "index_card.json").read_bytes() == before  # the old index is untouched
    assert not list(tmp_path.glob(".index.*.tmp"))  # no half-written directory left
    assert (tmp_path / ".index.shards" / "manifest.json").is_file()  # finished shards are kept for a rerun


# ----------------------------------------------------------------------------------------------------------------
# index types, loading, passages
# ----------------------------------------------------------------------------------------------------------------
def test_hnsw_and_ivfpq_agree_with_flat(real_passages, tmp_path: Path):
    corpus = real_passages[:1500]
    enc = HashEncoder(64)
    queries = [p.title for p in real_passages[:1500:15]]
    results = {}
    for ftype in ("flat", "hnsw", "ivfpq"):
        cfg = IndexConfig(kind="dense", faiss_type=ftype, pq_m=16, ivf_nlist=32, ivf_nprobe=8, shard_size=500)
        card = build_index(corpus, cfg, tmp_path / ftype, encoder=enc, show_progress=False)
        assert card["index_type"] == ftype and card["num_passages"] == 1500
        with load_retriever(tmp_path / ftype, encoder=enc) as r:
            results[ftype] = [[p.id for p in hits] for hits in r.search(queries, 10)]
    def overlap(a, b):
        return np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)])
    assert overlap(results["hnsw"], results["flat"]) >= 0.95
    assert overlap(results["ivfpq"], results["flat"]) >= 0.5
    assert all(len(x) == 10 for x in results["flat"])


def test_ivfpq_config_errors(real_passages, tmp_path: Path):
    with pytest.raises(ValueError, match="must divide"):
        build_index(real_passages[:300], IndexConfig(faiss_type="ivfpq", pq_m=7), tmp_path / "a",
                    encoder=HashEncoder(64), show_progress=False)
    with pytest.raises(ValueError, match="at least 256"):
        build_index(real_passages[:100], IndexConfig(faiss_type="ivfpq", pq_m=16), tmp_path / "b",
                    encoder=HashEncoder(64), show_progress=False)


def test_top_k_larger_than_corpus_and_empty_batches(real_passages, tmp_path: Path):
    corpus = _tiny(real_passages, 5)
    build_index(corpus, IndexConfig(kind="dense"), tmp_path / "d", encoder=HashEncoder(16), show_progress=False)
    build_index(corpus, IndexConfig(kind="bm25"), tmp_path / "b", show_progress=False)
    with load_retriever(tmp_path / "d", encoder=HashEncoder(16)) as d, load_retriever(tmp_path / "b") as b:
        assert len(d.search(["evan morris"], 50)[0]) == 5
        assert 1 <= len(b.search(["evan morris"], 50)[0]) <= 5
        assert d.search([], 3) == [] and b.search([], 3) == []
        with pytest.raises(ValueError):
            d.search(["x"], 0)
        with pytest.raises(TypeError):
            b.search("not a list", 3)


def test_reference_mode_detects_changed_corpus(real_passages, tmp_path: Path):
    corpus_file = tmp_path / "r1" / "data" / "corpus.jsonl"
    corpus_file.parent.mkdir(parents=True)
    corpus_file.write_text("".join(json.dumps(p.to_json()) + "\n" for p in real_passages[:30]), encoding="utf-8")
    card = build_index(corpus_file, IndexConfig(kind="bm25"), tmp_path / "r1" / "art" / "index",
                       show_progress=False)
    assert card["passages"]["mode"] == "reference" and card["referenced_corpus_bytes"] > 0
    assert not (tmp_path / "r1" / "art" / "index" / "passages.jsonl").exists()
    # the whole tree moves (the absolute path is gone): the relative reference still resolves
    shutil.move(tmp_path / "r1", tmp_path / "r2")
    moved_index, moved_corpus = tmp_path / "r2" / "art" / "index", tmp_path / "r2" / "data" / "corpus.jsonl"
    with load_retriever(moved_index) as r:
        assert r.search(["Evan Morris lobbyist"], 1)[0][0].id == real_passages[0].id
    # corpus edited after indexing -> a clear error, never wrong passages
    with open(moved_corpus, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "x", "contents": "y"}) + "\n")
    with pytest.raises(RetrievalError, match="changed since indexing"):
        load_retriever(moved_index)


def test_copy_passages_is_self_contained(real_passages, tmp_path: Path):
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps(p.to_json()) + "\n" for p in real_passages[:30]), encoding="utf-8")
    build_index(corpus_file, IndexConfig(kind="bm25", copy_passages=True), tmp_path / "index", show_progress=False)
    corpus_file.unlink()
    with load_retriever(tmp_path / "index") as r:
        assert r.search(["Evan Morris"], 1)[0][0] == real_passages[0]


def test_corpus_validation_names_the_line(tmp_path: Path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"id": "a", "contents": "\\"A\\"\\ntext"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2"):
        scan_corpus(bad, 10)
    bad.write_text('{"id": "a", "contents": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        scan_corpus(bad, 10)
    dpr = tmp_path / "dpr.jsonl"
    dpr.write_text('{"id": "7", "title": "T", "text": "body"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dpr\.jsonl:1: passage without 'contents' \(found 'text'"):
        scan_corpus(dpr, 1)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"id": "7", "contents": "\\"T\\"\\nbody"}\n{"id": "8", "contents": "\\"U\\"\\nmore"}',
                  encoding="utf-8")  # no final newline
    scan = scan_corpus(ok, 1)
    store = PassageStore(ok, scan.offsets)
    assert store[0] == Passage("7", '"T"\nbody') and store[1].title == "U" and len(store) == 2
    store.close()
    with pytest.raises(RetrievalError, match="no index_card.json"):
        load_retriever(tmp_path)


def test_evaluate_retriever_support_and_answer_recall():
    class Fixed:
        def search(self, queries, top_k):
            ps = [Passage("p1", '"A"\nnothing here'), Passage("p2", '"B"\nthe answer is Paris'),
                  Passage("p3", '"C"\nmore')]
            return [ps[:top_k] for _ in queries]

        def search_with_scores(self, queries, top_k):  # pragma: no cover - protocol completeness
            raise NotImplementedError

    ex = [QAExample("1", "q", ["Paris"], {"supporting_ids": ["p2"]}),
          QAExample("2", "q", ["London"], {"supporting_ids": ["p1", "p9"]}),
          QAExample("3", "q", ["more"])]
    m = evaluate_retriever(Fixed(), ex, ks=(1, 3))
    assert m["n_with_support"] == 2
    assert m["recall@1"] == 0.5 and m["recall@3"] == 1.0
    assert m["answer_recall@1"] == 0.0 and m["answer_recall@3"] == round(2 / 3, 4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queries=st.lists(st.text(max_size=40), max_size=5), k=st.integers(1, 12))
def test_bm25_never_fails_on_odd_queries(real_bm25, queries, k):
    _, retriever = real_bm25
    results = retriever.search_with_scores(queries, k)
    assert len(results) == len(queries)
    for hits in results:
        assert len(hits) <= k
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


# ----------------------------------------------------------------------------------------------------------------
# deterministic ties (cross-machine reproducibility)
# ----------------------------------------------------------------------------------------------------------------
def test_near_ties_are_ordered_by_passage_row_whatever_faiss_returned():
    from tspo_core.retrieval.retriever import TIE_TOLERANCE, rank_with_ties

    # rows 8 and 2 differ by 1e-7 (another CPU's rounding): row 2 first on either machine; row 5 is clearly lower
    machine_a = rank_with_ties([0.70000010, 0.7, 0.6], [8, 2, 5], 2)
    machine_b = rank_with_ties([0.7, 0.70000010, 0.6], [2, 8, 5], 2)
    assert [r for _, r in machine_a] == [r for _, r in machine_b] == [2, 8]
    # a real difference (10x the tolerance) keeps score order; FAISS padding (-1) is dropped; k cuts
    assert rank_with_ties([0.5, 0.5 + 10 * TIE_TOLERANCE, 0.1], [1, 9, -1], 3) == [(0.5 + 10 * TIE_TOLERANCE, 9),
                                                                                    (0.5, 1)]
    # the scores returned are the searched ones, not the grid values
    assert rank_with_ties([0.123456789], [4], 1) == [(0.123456789, 4)]


def test_environment_records_what_floating_point_depends_on():
    from tspo_core.runinfo import environment

    env = environment()
    assert env["cpu_capability"] and env["torch_threads"] >= 1 and env["versions"]["torch"].startswith("2.13")
    json.dumps(env)  # serializable into every metrics file's meta


def test_the_same_index_built_twice_has_the_same_card_bytes(real_passages, minilm: Encoder, tmp_path: Path):
    """What differs between two builds of the same index (date, timings, shard reuse, absolute paths) lives in
    `run_record.json`, which DVC does not hash (.dvcignore): the card's bytes, and so the index's hash in dvc.lock
    and the evaluation fingerprint, stay the same. `read_card` merges the record back; without it (an index
    restored from a DVC cache) the index still opens through its relative corpus path."""
    corpus = tmp_path / "data" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps(p.to_json()) + "\n" for p in _tiny(real_passages)), encoding="utf-8")
    cfg = IndexConfig(kind="dense", max_length=TEST_MAX_LENGTH, shard_size=16)
    cards = {}
    for run in ("a", "b"):  # sibling directories: the same relative path to the corpus
        built = build_index(corpus, cfg, tmp_path / run / "index", encoder=minilm, show_progress=False,
                            probe=[QAExample("q", "Evan Morris", ["Morris"])], work_dir=tmp_path / f"w{run}")
        cards[run] = (tmp_path / run / "index" / "index_card.json").read_bytes()
        record = json.loads((tmp_path / run / "index" / "run_record.json").read_text())
        assert record["build_time_s"] > 0 and record["passages"]["absolute"] == str(corpus.resolve())
        assert "created_at" in record and "seconds" in record["probe"] and "path" in record["encoder"]
        assert read_card(tmp_path / run / "index") == built
    assert cards["a"] == cards["b"]
    stable = json.loads(cards["a"])
    assert "build_time_s" not in stable and "absolute" not in stable["passages"] and stable["probe"]["answer_recall@1"] >= 0
    (tmp_path / "b" / "index" / "run_record.json").unlink()
    with load_retriever(tmp_path / "b" / "index") as r:
        assert r.search(["Evan Morris lobbyist"], 1)[0][0].id == real_passages[0].id


def test_dvc_leaves_run_records_out_of_every_hash():
    repo = Path(__file__).resolve().parents[1]
    ignore = (repo / ".dvcignore").read_text(encoding="utf-8").splitlines()
    assert "run_record.json" in ignore  # any depth, as in .gitignore


def test_history_timings_go_to_the_run_record(tmp_path: Path):
    from tspo_core.train.checkpoint import load_history, save_history

    history = [{"step": 1, "loss": 0.5, "step_s": 2.25, "rollout_s": 1.0}, {"step": 2, "loss": 0.25, "step_s": 2.5}]
    save_history(tmp_path, history)
    assert json.loads((tmp_path / "history.json").read_text()) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert load_history(tmp_path) == history
    (tmp_path / "run_record.json").unlink()  # e.g. restored from a DVC cache: the content, without the clock
    assert load_history(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_split_and_merge_a_record_by_hand():
    from tspo_core.runinfo import merge_record, split_record

    data = {"n": 3, "encoding": {"shards": 2, "encode_seconds": 1.5}, "probe": None, "passages": {"relpath": "r"}}
    stable, record = split_record(data, ("encoding.encode_seconds", "probe.seconds", "passages.absolute", "when"))
    assert stable == {"n": 3, "encoding": {"shards": 2}, "probe": None, "passages": {"relpath": "r"}}
    assert record == {"encoding": {"encode_seconds": 1.5}}
    assert merge_record(stable, record) == data and data["encoding"]["encode_seconds"] == 1.5  # input untouched
