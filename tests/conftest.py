"""Test-wide settings: offline hubs, W&B disabled, the shared real-data samples located."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tspo_core.omp import choose_wait_policy  # noqa: E402

choose_wait_policy("PASSIVE")  # before torch is imported by any test module (processes run side by side)

REPO = Path(__file__).resolve().parents[1]
REAL_QA = REPO.parent / "shared" / "data" / "real_qa"


@pytest.fixture(scope="session")
def real_qa_dir() -> Path:
    """The real samples in ../shared/data/real_qa (read in place, never copied into the project)."""
    if not (REAL_QA / "corpus.jsonl").is_file():
        pytest.fail(f"real samples not found at {REAL_QA} (CI puts ../shared beside the clone)")
    return REAL_QA


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` run last: a vLLM engine in the test process sets up torch.distributed (a one-rank gloo
    group) and process-wide threading settings that no other test should run after."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)  # stable: the order otherwise kept
