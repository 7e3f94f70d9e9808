"""The comparison report: markdown tables, PNG figures (real images), tolerant readers of the stage outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from tspo_core.agent.rewards import CATEGORIES
from tspo_core.config import FAMILIES
from tspo_core.errors import DataError
from tspo_core.evaluate import markdown_table
from tspo_core.report import build_report, ci_verdict, final_value, mean_std, moving_average, \
    paired_bootstrap_ci, paired_differences, read_eval_metrics, read_histories, read_history, series, steps_to_reach


def _eval(run: str, base: float, datasets=FAMILIES) -> dict:
    per = {}
    for i, name in enumerate(datasets):
        em = round(base + 0.01 * i, 4)
        per[name] = {"n": 100, "em": em, "f1": em + 0.05, "cover_em": em + 0.08, "complete_success": em,
                     "near_miss": 0.3, "success_without_retrieval": 0.02, "complete_failure": round(0.68 - em, 4),
                     "answer_in_evidence_rate": em + 0.3, "answered_rate": 0.99, "turns_mean": 2.1,
                     "searches_mean": 1.1, "invalid_action_rate": 0.01, "response_tokens_mean": 40.0}
    keys = [k for k in next(iter(per.values())) if k != "n"]
    avg = {"n": 100 * len(per), "datasets": len(per), **{k: sum(m[k] for m in per.values()) / len(per) for k in keys}}
    return {"datasets": per, "average": avg,
            "meta": {"run": run, "checkpoint": f"artifacts/{run}", "split": "test", "subset_size": 100, "seed": 0,
                     "skipped": {n: "no questions" for n in FAMILIES if n not in per}}}


def _history(steps: int, em0: float, slope: float, drop=()) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        em = em0 + slope * s
        rec = {"step": s, "reward_mean": em, "em": em, "folr_share": 0.5, "zero_var_share_o": 0.6 - slope * s,
               "zero_var_share_s": 0.4 - slope * s, "complete_success": em, "near_miss": 0.3,
               "success_without_retrieval": 0.0, "complete_failure": 0.7 - em, "kl": 0.001 * s, "entropy": 1.0,
               "response_tokens": 50.0}
        for k in drop:
            rec.pop(k, None)
        out.append(rec)
    return out


def _assert_png(path: Path) -> None:
    img = mpimg.imread(path)  # (H, W, 4) floats in [0, 1]
    assert img.ndim == 3 and 200 <= img.shape[0] <= 3000 and 300 <= img.shape[1] <= 4000
    rgb = img[..., :3].reshape(-1, 3)
    assert float(rgb.std()) > 0.02  # not a blank canvas
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20  # lines, text and colours were drawn


def test_build_report_writes_tables_and_figures(tmp_path):
    evals = {"tspo": _eval("tspo", 0.40), "sft": _eval("sft", 0.20), "grpo": _eval("grpo", 0.32)}
    histories = {"grpo": _history(60, 0.2, 0.001), "tspo": _history(60, 0.2, 0.002)}
    out = tmp_path / "reports"
    path = build_report(evals, histories, out)
    assert path == out / "report.md"
    text = path.read_text(encoding="utf-8")
    assert markdown_table(evals) in text  # the seven-dataset EM table, rows SFT / GRPO / TSPO
    lines = text.splitlines()
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| SFT") or line.startswith("| GRPO")
            or line.startswith("| TSPO")]
    assert rows[:3] == ["| SFT", "| GRPO", "| TSPO"]
    assert "| Run | EM | F1 | Cover-EM | Complete success | Near miss |" in text
    # average EM of TSPO 0.43 vs GRPO 0.35: +22.9% relative
    assert "TSPO vs GRPO, average EM: 0.430 vs 0.350 (+22.9% relative)" in text
    assert "## How this was produced" in text and "Greedy" in text
    for name in ("eval_categories.png", "training_curves.png", "zero_variance.png", "training_categories.png"):
        assert f"]({name})" in text
        _assert_png(out / name)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_dev_em_gets_a_column_and_a_panel_when_logged(tmp_path):
    histories = {"grpo": _history(20, 0.2, 0.001), "tspo": _history(20, 0.2, 0.002)}
    for est, base in (("grpo", 0.10), ("tspo", 0.20)):
        for rec in histories[est][9::10]:  # steps 10 and 20
            rec["dev_em"] = base + rec["step"] / 100
    text = build_report({"tspo": _eval("tspo", 0.4)}, histories, tmp_path).read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| Estimator"))
    assert header.startswith("| Estimator | Steps | dev_em | reward_mean |")
    # the last evaluation (step 20), not a mean over the sparse records
    assert "| GRPO | 20 | 0.300 |" in text and "| TSPO | 20 | 0.400 |" in text
    assert "dev_em is the greedy dev EM of the last evaluation" in text
    img = mpimg.imread(tmp_path / "training_curves.png")
    assert img.shape[0] > 1.3 * img.shape[1] * 0.7  # three rows of panels (10 x 10.5 in), not two (10 x 7)


def test_missing_keys_and_missing_inputs_are_tolerated(tmp_path):
    evals = {"sft": _eval("sft", 0.2, datasets=("nq", "hotpotqa")), "tspo": _eval("tspo", 0.3)}
    histories = {"grpo": _history(8, 0.1, 0.01, drop=("zero_var_share_s", *CATEGORIES)),
                 "tspo": [{"em": 0.1}, {"step": 2, "em": float("nan"), "kl": None}, {"step": 3, "em": 0.3}]}
    text = build_report(evals, histories, tmp_path).read_text(encoding="utf-8")
    assert "SFT evaluated 2/7 datasets" in text and "missing: triviaqa, popqa" in text
    assert "| SFT | 0.200 | – |" in text
    _assert_png(tmp_path / "training_curves.png")
    assert (tmp_path / "training_categories.png").is_file() is False  # no category was logged anywhere

    # nothing at all: still a report, and figures from an earlier build are removed
    text = build_report({}, {}, tmp_path).read_text(encoding="utf-8")
    assert "No evaluation metrics" in text and "No training histories" in text
    assert not list(tmp_path.glob("*.png"))


def test_series_helpers():
    hist = [{"step": 1, "em": 0.0}, {"em": 1.0}, {"step": 5, "em": float("inf")}, {"step": 6, "em": True},
            {"step": 7, "em": 0.5}]
    assert series(hist, "em") == ([1.0, 2.0, 7.0], [0.0, 1.0, 0.5])  # position when no step; non-numbers skipped
    assert series(hist, "kl") == ([], [])
    assert moving_average([2.0, 4.0, 6.0], 5) == [2.0, 3.0, 4.0]
    assert final_value([{"em": float(i)} for i in range(20)], "em") == pytest.approx(18.5)  # last 2 of 20
    assert final_value(hist, "kl") is None
    assert not math.isnan(final_value(hist, "em"))


def test_readers(tmp_path):
    detail = tmp_path / "detail"  # the full evaluation metrics; the DVC metrics beside them are not read
    detail.mkdir()
    (detail / "eval_tspo.json").write_text(json.dumps(_eval("tspo", 0.3)), encoding="utf-8")
    (detail / "eval_sft.json").write_text(json.dumps(_eval("sft", 0.2)), encoding="utf-8")
    (detail / "index.json").write_text("{}", encoding="utf-8")
    (tmp_path / "eval_grpo.json").write_text(json.dumps({"em": 0.1}), encoding="utf-8")
    assert sorted(read_eval_metrics(tmp_path)) == ["sft", "tspo"]
    # a history still being written: the unfinished last record is dropped
    (tmp_path / "train_grpo.jsonl").write_text('{"step": 1, "em": 0.1}\n\n{"step": 2, "em": 0.2}\n{"step": 3, "e',
                                               encoding="utf-8")
    assert read_histories(tmp_path) == {"grpo": [{"step": 1, "em": 0.1}, {"step": 2, "em": 0.2}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{oops\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_history(bad)
    (detail / "eval_broken.json").write_text('{"datasets": {}}', encoding="utf-8")
    with pytest.raises(DataError, match="eval_broken.json"):
        read_eval_metrics(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# seed aggregation for the TSPO-vs-GRPO benchmark
# ----------------------------------------------------------------------------------------------------------------
def test_steps_to_reach_is_the_first_step_at_or_above_the_target():
    hist = [{"step": 1, "em": 0.5}, {"step": 5, "dev_em": 0.10}, {"step": 10, "dev_em": 0.25},
            {"step": 15, "dev_em": None}, {"step": 20, "dev_em": 0.40}]
    assert steps_to_reach(hist, "dev_em", 0.25) == 10  # reached exactly
    assert steps_to_reach(hist, "dev_em", 0.3) == 20   # the null record is skipped
    assert steps_to_reach(hist, "dev_em", 0.05) == 5
    assert steps_to_reach(hist, "dev_em", 0.41) is None
    assert steps_to_reach(hist, "missing", 0.0) is None


def test_mean_std_uses_the_sample_standard_deviation():
    m, s = mean_std([0.10, 0.20, 0.60])
    assert m == pytest.approx(0.3)
    assert s == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2))  # = sqrt(0.07)
    assert mean_std([0.4]) == (0.4, 0.0)
    assert mean_std([]) is None


def test_paired_differences_keep_only_shared_questions():
    a = {"nq": {"q1": 1.0, "q2": 0.0, "q9": 1.0}, "popqa": {"p1": 1.0}, "musique": {}}
    b = {"nq": {"q2": 1.0, "q1": 0.0}, "popqa": {"p2": 0.0}, "musique": {}}
    # nq: q1 1-0 = 1, q2 0-1 = -1 (q9 only in a); popqa and musique share no question and are left out
    assert paired_differences(a, b) == {"nq": [1.0, -1.0]}


def test_paired_bootstrap_ci_exact_mean_is_the_difference_of_dataset_averaged_ems():
    # seed 0: nq diffs [1, 0, 0, 0] -> 0.25, bamboogle [1, 1] -> 1.0: dataset average (0.25 + 1.0) / 2 = 0.625
    # seed 1: nq [0, 0, 0, -1] -> -0.25, bamboogle [0, 1] -> 0.5: average 0.125
    # mean over seeds (0.625 + 0.125) / 2 = 0.375 (a pooled mean over the 12 questions would be 3/12 = 0.25)
    diffs = {0: {"nq": [1, 0, 0, 0], "bamboogle": [1, 1]}, 1: {"nq": [0, 0, 0, -1], "bamboogle": [0, 1]}}
    ci = paired_bootstrap_ci(diffs, replicates=2000)
    assert ci["mean"] == pytest.approx(0.375)
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert (ci["seeds"], ci["questions"], ci["replicates"], ci["level"]) == (2, 6, 2000, 0.95)
    assert paired_bootstrap_ci(diffs, replicates=2000) == ci  # the fixed RNG seed: the same interval again


def test_paired_bootstrap_ci_identical_methods_and_a_uniformly_better_one():
    em = {s: {"nq": [float((q * 7 + s) % 3 == 0) for q in range(50)],
              "popqa": [float((q + s) % 4 == 0) for q in range(30)]} for s in range(3)}
    same = {s: paired_differences({f: dict(enumerate(v)) for f, v in d.items()},
                                  {f: dict(enumerate(v)) for f, v in d.items()}) for s, d in em.items()}
    ci = paired_bootstrap_ci(same)
    assert ci["mean"] == ci["lo"] == ci["hi"] == 0.0 and ci_verdict(ci) == "no difference"
    # mixed +1/-1/0 differences that cancel: the interval straddles 0
    noisy = {s: {"nq": [1.0, -1.0, 0.0] * 10, "popqa": [-1.0, 1.0] * 10} for s in range(3)}
    ci = paired_bootstrap_ci(noisy)
    assert ci["mean"] == pytest.approx(0.0) and ci["lo"] < 0 < ci["hi"] and ci_verdict(ci) == "no difference"
    # better on every question (wrong -> right on each): every replicate is +1
    better = {s: {"nq": [1.0] * 50, "popqa": [1.0] * 30} for s in range(3)}
    ci = paired_bootstrap_ci(better)
    assert ci["lo"] > 0 and ci["mean"] == 1.0 and ci_verdict(ci) == "higher"
    worse = {s: {"nq": [-1.0, 0.0, -1.0] * 10} for s in range(2)}
    assert ci_verdict(paired_bootstrap_ci(worse)) == "lower"


def test_paired_bootstrap_ci_resamples_seeds_too():
    # every question agrees within a seed (no question noise), but the seeds disagree: +1 on one, -1 on the other;
    # only the seed resampling can produce the replicates -1 (both draws the second) and +1 (both the first)
    ci = paired_bootstrap_ci({0: {"nq": [1.0] * 5}, 1: {"nq": [-1.0] * 5}}, replicates=4000)
    assert ci["mean"] == 0.0 and ci["lo"] == -1.0 and ci["hi"] == 1.0


def test_paired_bootstrap_ci_refuses_empty_inputs():
    with pytest.raises(ValueError, match="no seeds"):
        paired_bootstrap_ci({})
    with pytest.raises(ValueError, match="without any paired question"):
        paired_bootstrap_ci({0: {"nq": [1.0]}, 1: {"nq": []}})


def test_repro_summary_from_a_built_report(tmp_path, capsys):
    """The end of `make repro` (scripts/repro_summary.py): the report's EM table, plain (no bold marks), and the
    paths of the report, the figures drawn and the plots page (said to be missing, with the command, until built)."""
    import importlib.util

    from tspo_core.config import dump_params, load_params
    from tspo_core.report import em_table_from_report, repro_summary

    evals = {"tspo": _eval("tspo", 0.40), "sft": _eval("sft", 0.20), "grpo": _eval("grpo", 0.32)}
    out = tmp_path / "reports"
    assert repro_summary(out).startswith(f"no report at {out / 'report.md'}")
    build_report(evals, {}, out)  # no histories: only the evaluation figure is drawn
    table = em_table_from_report((out / "report.md").read_text(encoding="utf-8"))
    assert table == markdown_table(evals).replace("**", "")
    rows = table.splitlines()
    assert rows[0].startswith("| Run | NQ |") and rows[0].endswith("| Avg. |") and len(rows) == 5
    assert rows[4].startswith("| TSPO | 0.400 |") and rows[4].endswith("| 0.430 |")

    page = tmp_path / "dvc_plots" / "index.html"
    text = repro_summary(out, page)
    assert table in text and f"report:     {out / 'report.md'}" in text
    assert f"figures:    {out / 'eval_categories.png'}\n" in text and "training_curves" not in text
    assert f"plots page: {page} (not built: `make plots`)" in text
    page.parent.mkdir()
    page.write_text("<html></html>")
    assert repro_summary(out, page).endswith(f"plots page: {page}")

    # the script `make repro` calls: report_dir from the params file
    params = tmp_path / "params.yaml"
    repo = Path(__file__).parents[1]
    params.write_text(dump_params(load_params(repo / "configs" / "tiny.yaml", overrides={"paths.report_dir": str(out)})),
                      encoding="utf-8")
    spec = importlib.util.spec_from_file_location("repro_summary", Path(__file__).parents[1] / "scripts" /
                                                  "repro_summary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--params", str(params), "--plots-page", str(page)]) == 0
    assert capsys.readouterr().out == repro_summary(out, page) + "\n"
