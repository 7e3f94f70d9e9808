"""The TSPO-vs-GRPO benchmark's report (benchmarks/tspo_vs_grpo.py) from hand-made unit results: no training."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tspo_core.agent.rewards import CATEGORIES
from tspo_core.io import write_json

from conftest import REPO

FAMILIES2 = {"nq": ["nq-0", "nq-1", "nq-2", "nq-3"], "bamboogle": ["b-0", "b-1"]}


def _bench():
    spec = importlib.util.spec_from_file_location("tspo_vs_grpo_report", REPO / "benchmarks" / "tspo_vs_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(unit, ems: dict[str, list[int]], dev_curve=None) -> dict:
    per_q = {f: dict(zip(FAMILIES2[f], ems[f])) for f in FAMILIES2}
    per_family = {f: sum(v) / len(v) for f, v in ems.items()}
    r = {"unit": unit.name, "kind": unit.kind, "arm": unit.arm, "seed": unit.seed, "method": unit.method,
         "key": unit.key, "per_question_em": per_q,
         "test": {"em": sum(per_family.values()) / len(per_family), "n": 6, "per_family": per_family,
                  "categories": {c: 0.25 for c in CATEGORIES}},
         "seconds": {"train": 60.0, "unit_wall": 90.0}, "machine": {"cpu": "x86_64", "cpus": 2}}
    if unit.kind == "sft":
        r.update(dev_em=0.1, checkpoint_sha256="abc",
                 oracle={"trajectories": 100, "dropped": 5, "imperfect": 20, "premature": 0, "verbose": 50})
    else:
        r["history"] = {"step": [1, 2, 3, 4], "em": [0.1, 0.2, 0.3, 0.4], "reward_mean": [0.1] * 4,
                        "zero_var_share_o": [0.5] * 4, "zero_var_share_s": [0.25] * 4,
                        **{c: [0.25] * 4 for c in CATEGORIES}, "dev_em": dev_curve}
    return r


def test_report_from_results_uses_complete_seeds_for_the_paired_ci(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "configs" / "tiny.yaml").read_text().replace(
        "\neval:\n", "\neval:\n  datasets: [nq, bamboogle]\n"), encoding="utf-8")
    bench = _bench()
    out = tmp_path / "bench"
    argv = ["--params", str(params), "--seeds", "0", "1", "2", "--estimators", "grpo", "tspo", "--control-seeds",
            "--steps", "4", "--eval-every", "2", "--out", str(out)]
    args = bench.argparse.Namespace(params=str(params), seeds=[0, 1, 2], estimators=["grpo", "tspo"],
                                    control_seeds=[], control_estimators=["grpo", "tspo"], eval_every=2)
    base = bench.load_params(params, {"train.steps": 4})
    plan = {u.name: u for u in bench.make_plan(base, args, out / "scratch")}
    assert list(plan) == ["sft_s0", "grpo_s0", "tspo_s0", "sft_s1", "grpo_s1", "tspo_s1", "sft_s2", "grpo_s2",
                          "tspo_s2"]  # complete seeds first
    for s in (0, 1, 2):
        write_json(out / "runs" / f"sft_s{s}" / "result.json",
                   _result(plan[f"sft_s{s}"], {"nq": [0, 0, 0, 0], "bamboogle": [0, 0]}))
        # GRPO: 1 of 4 on nq, 0 of 2 on bamboogle -> average (0.25 + 0) / 2 = 0.125; final dev EM 0.3
        write_json(out / "runs" / f"grpo_s{s}" / "result.json",
                   _result(plan[f"grpo_s{s}"], {"nq": [1, 0, 0, 0], "bamboogle": [0, 0]}, [[2, 0.2], [4, 0.3]]))
    for s in (0, 1):  # TSPO right on every question: average 1.0; seed 2 not done (an interrupted run)
        write_json(out / "runs" / f"tspo_s{s}" / "result.json",
                   _result(plan[f"tspo_s{s}"], {"nq": [1, 1, 1, 1], "bamboogle": [1, 1]}, [[2, 0.35], [4, 0.5]]))

    def no_training(*a, **k):
        raise AssertionError("--only-report trained")

    monkeypatch.setattr("tspo_core.train.rl.run_rl", no_training)
    assert bench.main(argv + ["--only-report"]) == 0
    results = json.loads((out / "results.json").read_text())
    arm = results["arms"]["default"]
    assert arm["seeds_complete"] == [0, 1] and results["units_done"] == sorted(set(plan) - {"tspo_s2"})
    ci = arm["paired_vs_grpo"]["tspo"]
    # TSPO - GRPO per seed: nq mean(0, 1, 1, 1) = 0.75, bamboogle 1.0 -> 0.875, on the 2 complete seeds only
    assert ci["mean"] == pytest.approx(0.875) and ci["seeds"] == 2 and ci["questions"] == 6
    assert ci["lo"] > 0 and ci["verdict"] == "higher"
    assert arm["methods"]["grpo"]["test_em"] == pytest.approx([0.125, 0.0])  # 3 seeds, all equal
    assert arm["dev_em_target"] == pytest.approx(0.3)
    assert arm["methods"]["tspo"]["steps_to_target"] == {"0": 2.0, "1": 2.0}  # 0.35 >= 0.3 at step 2
    assert arm["methods"]["grpo"]["steps_to_target"] == {"0": 4.0, "1": 4.0, "2": 4.0}
    text = (out / "results.md").read_text()
    assert "complete for every method: [0, 1] (2 of 3)" in text and "(missing: tspo_s2)" in text
    assert "| TSPO − GRPO | +0.8750 | [" in text and "| higher |" in text
    assert "| TSPO | 2 |" in text and "| GRPO | 3 |" in text and "Control" not in text
    assert "| 2 (2/2 seeds reached) |" in text
    for fig in ("dev_em.png", "zero_variance.png", "categories.png"):
        assert (out / fig).stat().st_size > 1000
    # a result of other settings (here: another step count) stops the script, naming the file
    with pytest.raises(SystemExit, match="grpo_s0.*other settings"):
        bench.main(argv[:argv.index("--steps")] + ["--steps", "5"] + argv[argv.index("--eval-every"):]
                   + ["--only-report"])
