"""The whole pipeline on the tiny config (configs/tiny.yaml), stage drivers called in order into tmp_path:
data -> index (BM25) -> sft -> train@grpo, train@tspo -> evaluate@{sft,grpo,tspo} -> report; then the TSPO-vs-GRPO
benchmark (benchmarks/tspo_vs_grpo.py) on that data and index: its units, resumption and refusal."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tspo_core.config import dump_params, load_params
from tspo_core.data.build import build_datasets
from tspo_core.evaluate import run_evaluate
from tspo_core.io import write_jsonl
from tspo_core.layout import checkpoint_for
from tspo_core.pipeline import load_split
from tspo_core.report import build_report, read_eval_metrics, read_histories
from tspo_core.retrieval.index import build_index
from tspo_core.train.rl import run_rl
from tspo_core.train.sft import run_sft

from conftest import REPO


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch):
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
    # the clock and the machine go to the run record (out of DVC's hash), what the run produced stays
    stored = json.loads((tmp_path / "sft" / "sft_summary.json").read_text(encoding="utf-8"))
    record = json.loads((tmp_path / "sft" / "run_record.json").read_text(encoding="utf-8"))
    assert "train_seconds" not in stored and "meta" not in stored and stored["final_loss"] == sft["summary"]["final_loss"]
    assert record["train_seconds"] == sft["summary"]["train_seconds"] and "environment" in record["meta"]
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

    # the powered TSPO-vs-GRPO benchmark on the tiny data and index: one full-pipeline seed (SFT, then grpo and
    # tspo from it) and one control seed (habit-free SFT, then grpo and tspo), 2 RL steps each
    (tmp_path / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    bench = _load_benchmark()
    out = tmp_path / "bench"
    argv = ["--params", str(tmp_path / "params.yaml"), "--seeds", "0", "--estimators", "grpo", "tspo",
            "--control-seeds", "0", "--steps", "2", "--eval-every", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    units = ["sft_s0", "grpo_s0", "tspo_s0", "control_sft_s0", "control_grpo_s0", "control_tspo_s0"]
    res = {u: json.loads((out / "runs" / u / "result.json").read_text()) for u in units}
    test_ids = {name: {ex.id for ex in load_split(tmp_path / "data", name, "test")} for name in params.eval.datasets}
    for u, r in res.items():
        # every test question (eval.subset_size is 3 in tiny.yaml: the benchmark evaluates all 4), EM per question
        assert {k: set(v) for k, v in r["per_question_em"].items()} == test_ids, u
        for name, ems in r["per_question_em"].items():
            assert r["test"]["per_family"][name] == pytest.approx(sum(ems.values()) / len(ems))
        assert r["key"] and r["seed"] == 0
    for u in ("grpo_s0", "tspo_s0", "control_grpo_s0", "control_tspo_s0"):
        h = res[u]["history"]
        assert h["step"] == [1, 2] and [x for x, _ in h["dev_em"]] == [1, 2]
        assert len(h["zero_var_share_o"]) == len(h["zero_var_share_s"]) == len(h["complete_failure"]) == 2
        sft_unit = "control_sft_s0" if u.startswith("control_") else "sft_s0"
        assert res[u]["sft_checkpoint_sha256"] == res[sft_unit]["checkpoint_sha256"]  # started from its own SFT
    assert res["sft_s0"]["oracle"]["verbose"] > 0 and res["control_sft_s0"]["oracle"]["verbose"] == 0
    assert res["sft_s0"]["checkpoint_sha256"] != res["control_sft_s0"]["checkpoint_sha256"]
    assert not any((out / "scratch").iterdir())  # heavy files go once every unit is done
    results = json.loads((out / "results.json").read_text())
    default = results["arms"]["default"]
    assert default["seeds_complete"] == [0] and results["arms"]["control"]["seeds_complete"] == [0]
    ci = default["paired_vs_grpo"]["tspo"]
    tspo, grpo = res["tspo_s0"]["test"]["per_family"], res["grpo_s0"]["test"]["per_family"]
    assert ci["mean"] == pytest.approx(sum(tspo[f] - grpo[f] for f in tspo) / len(tspo))  # the exact difference
    assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["seeds"] == 1 and ci["questions"] == 26
    text = (out / "results.md").read_text()
    assert "### Paired comparison with GRPO (1 complete seeds)" in text and "| TSPO − GRPO | " in text
    assert "Control: habit-free SFT" in text and "| SFT (habit-free) |" in text and "| GRPO+FOLR |" not in text
    for fig in ("dev_em.png", "zero_variance.png", "categories.png"):
        assert (out / fig).stat().st_size > 1000

    # a rerun finds every unit done and trains nothing
    def no_training(*a, **k):
        raise AssertionError("trained although every unit is done")

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    with monkeypatch.context() as m:
        m.setattr("tspo_core.train.rl.run_rl", no_training)
        m.setattr("tspo_core.train.sft.run_sft", no_training)
        assert bench.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    # units of other settings are never mixed in: another step count stops the script before anything runs
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(argv[:argv.index("--steps")] + ["--steps", "3"] + argv[argv.index("--eval-every"):])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    # the report is rebuilt from the result files alone
    (out / "results.md").unlink()
    assert bench.main(argv + ["--only-report"]) == 0 and (out / "results.md").read_text() == text
    # another session: one unit to redo, its seed's SFT checkpoint gone with the scratch; SFT is retrained (the same
    # checkpoint on this machine) and only that unit runs
    shutil.rmtree(out / "runs" / "tspo_s0")
    assert bench.main(argv) == 0
    again = json.loads((out / "runs" / "tspo_s0" / "result.json").read_text())
    assert again["sft_checkpoint_sha256"] == res["sft_s0"]["checkpoint_sha256"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json") if p.parent.name != "tspo_s0"} == {
        p: t for p, t in stamps.items() if p.parent.name != "tspo_s0"}


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tspo_vs_grpo", REPO / "benchmarks" / "tspo_vs_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))
