"""The whole pipeline on the tiny config (configs/tiny.yaml), stage drivers called in order into tmp_path:
data -> index (BM25) -> sft -> train@grpo, train@tspo -> evaluate@{sft,grpo,tspo} -> report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tspo_core.config import dump_params, load_params
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
    # the verbose habit is counted apart from the imperfect kinds (a verbose oracle trajectory is not imperfect)
    summary = sft["summary"]
    assert 0 < summary["imperfect"] < summary["verbose"] < summary["trajectories"] and summary["premature"] == 0

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

    # the TSPO-vs-GRPO benchmark on the same SFT checkpoint: 2 seeds x 2 methods + one extra alpha, 2 steps each
    (tmp_path / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    bench = _load_benchmark()
    out = tmp_path / "bench"
    argv = ["--params", str(tmp_path / "params.yaml"), "--estimators", "grpo", "tspo", "--seeds", "0", "1",
            "--alphas", str(params.reward.folr_alpha), "1.0", "--steps", "2", "--eval-every", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == ["grpo_s0", "grpo_s1", "tspo_a1_s0", "tspo_s0", "tspo_s1"]
    for run in results["runs"].values():
        assert run["steps"] == 2 and [x for x, _ in run["dev_curve"]] == [1, 2] and 0 <= run["test_em"] <= 1
    assert results["runs"]["grpo_s0"]["test_em"] == json.loads(
        (out / "runs" / "grpo_s0" / "metrics" / "eval_grpo_s0.json").read_text())["average"]["em"]
    text = (out / "results.md").read_text()
    assert "| GRPO |" in text and "| TSPO |" in text and "alpha sweep" in text
    for fig in ("dev_em.png", "zero_variance.png", "alpha_sweep.png"):
        assert (out / fig).stat().st_size > 1000
    # a rerun finds every run on disk and trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert bench.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    # runs of other settings are never mixed in: another step count stops the script before anything is reused
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(argv[:2] + ["--steps", "3"] + argv[argv.index("--eval-every"):])
    (out / "runs" / "key.json").unlink()  # runs from before the key existed: of unknown origin, never reused
    with pytest.raises(SystemExit, match="unknown origin"):
        bench.main(argv)


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tspo_vs_grpo", REPO / "benchmarks" / "tspo_vs_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))
