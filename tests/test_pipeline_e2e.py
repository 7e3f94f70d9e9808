"""The whole pipeline on the tiny config (configs/tiny.yaml), stage drivers called in order into tmp_path:
data -> index (BM25) -> sft -> train@grpo, train@tspo -> evaluate@{sft,grpo,tspo} -> report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tspo_core.config import load_params
from tspo_core.data.build import build_datasets
from tspo_core.evaluate import checkpoint_for, run_evaluate
from tspo_core.io import write_jsonl
from tspo_core.pipeline import load_split
from tspo_core.report import build_report, read_eval_metrics, read_histories
from tspo_core.retrieval.index import build_index
from tspo_core.train.rl import run_rl
from tspo_core.train.sft import run_sft

from conftest import REPO


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    paths = {f"paths.{k}": str(tmp_path / v) for k, v in {
        "data_dir": "data", "index_dir": "index", "sft_dir": "sft", "rl_dir": "rl", "metrics_dir": "metrics",
        "eval_dir": "eval", "report_dir": "reports"}.items()}
    params = load_params(REPO / "configs" / "tiny.yaml", overrides=paths)
    summary = build_datasets(params.data, tmp_path / "data")
    assert summary["corpus"] > 0 and summary["rl_train"] == 40

    probe = [ex for name in ("nq", "hotpotqa") for ex in load_split(tmp_path / "data", name, "dev")]
    card = build_index(tmp_path / "data" / "corpus.jsonl", params.index, tmp_path / "index", probe=probe,
                       show_progress=False)
    assert card["num_passages"] == summary["corpus"]

    sft = run_sft(params)
    assert len(sft["history"]) == params.sft.max_steps
    assert all(math.isfinite(h["loss"]) for h in sft["history"])
    assert sft["history"][-1]["loss"] < sft["history"][0]["loss"]
    assert (tmp_path / "sft" / "config.json").is_file() and (tmp_path / "sft" / "sft_summary.json").is_file()

    sft_weights = {k: v.clone() for k, v in _weights(tmp_path / "sft").items()}
    for est in ("grpo", "tspo"):
        history = run_rl(params, est, tmp_path / "rl" / est)
        assert [h["step"] for h in history] == [1, 2]
        assert all(math.isfinite(h["loss"]) and 0 <= h["em"] <= 1 for h in history)
        write_jsonl(tmp_path / "metrics" / f"train_{est}.jsonl", history)
        rl_weights = _weights(tmp_path / "rl" / est / "model")
        assert any(not torch.equal(sft_weights[k], rl_weights[k]) for k in sft_weights)  # RL changed the policy

    for run in ("sft", "grpo", "tspo"):
        metrics = run_evaluate(params, checkpoint_for(params.paths, run), run)
        assert set(metrics["datasets"]) == set(params.eval.datasets)
        assert 0 <= metrics["average"]["em"] <= 1
        rows = (tmp_path / "eval" / run / "nq.jsonl").read_text().splitlines()
        assert len(rows) == params.eval.subset_size and json.loads(rows[0])["id"].startswith("nq-test-")

    report = build_report(read_eval_metrics(tmp_path / "metrics"), read_histories(tmp_path / "metrics"),
                          tmp_path / "reports")
    text = report.read_text()
    assert "TSPO" in text and "GRPO" in text and "SFT" in text
    assert (tmp_path / "reports" / "training_curves.png").stat().st_size > 1000


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))
