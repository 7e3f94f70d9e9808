"""Fixtures of the reliability suite: a tiny world built once (data, BM25 index and SFT checkpoint of
`configs/tiny.yaml`), per-test working copies, one Prefect API server for every stage CLI, a small dense index.
Helpers are in `reliability_support.py`. Every process started here binds to 127.0.0.1 and is stopped by its PID in
a `finally` block.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reliability_support import REPO, PrefectAPI, Work, dense_index_config, tiny_params

# tests/test_pipeline_e2e.py does `from conftest import REPO`; whichever conftest module it gets, REPO is the same.
__all__ = ["REPO"]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    api = PrefectAPI(tmp_path_factory.mktemp("prefect-home"))
    api.start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="session")
def base_world(tmp_path_factory) -> Path:
    """data/, artifacts/index (BM25) and artifacts/sft of configs/tiny.yaml, built in-process once. Tests never
    write here: they work on copies (`work`)."""
    from tspo_core.config import params_from_dict
    from tspo_core.data.build import build_datasets
    from tspo_core.pipeline import load_split
    from tspo_core.retrieval.index import build_index
    from tspo_core.train.sft import run_sft

    root = tmp_path_factory.mktemp("base-world")
    params = params_from_dict(tiny_params(root))
    build_datasets(params.data, root / "data")
    probe = [ex for name in ("nq", "hotpotqa") for ex in load_split(root / "data", name, "dev")]
    build_index(root / "data" / "corpus.jsonl", params.index, root / "artifacts" / "index", probe=probe,
                show_progress=False)
    run_sft(params)
    return root


@pytest.fixture
def work(prefect_api, base_world, tmp_path) -> Work:
    """A copy of the tiny world with its params.yaml (the Prefect server, requested first, starts in the background
    while the world is built)."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(base_world / "data", root / "data")
    shutil.copytree(base_world / "artifacts", root / "artifacts")
    w = Work(root, prefect_api, tiny_params(root))
    w.write()
    return w


@pytest.fixture(scope="session")
def tiny_dense_index(base_world, tmp_path_factory) -> tuple[Path, dict]:
    """A dense (packaged MiniLM, flat) index of the tiny world, in small shards: (directory, IndexConfig dump)."""
    from tspo_core.config import FAMILIES, IndexConfig
    from tspo_core.pipeline import load_split
    from tspo_core.retrieval.index import build_index

    cfg = dense_index_config()
    out = tmp_path_factory.mktemp("dense") / "index"
    # the index stage's probe (flows.index.probe_questions): dev questions with known support, family by family
    probe = [ex for name in FAMILIES for ex in load_split(base_world / "data", name, "dev")
             if ex.metadata.get("supporting_ids")]
    build_index(base_world / "data" / "corpus.jsonl", IndexConfig(**cfg), out, probe=probe, show_progress=False)
    return out, cfg


