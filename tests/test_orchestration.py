"""Orchestration: the `pipeline` flow (its parameter model, the DVC command lines it builds, streaming and errors,
metrics -> artifacts), prefect.yaml, docker-compose.yml (validated against the Compose Specification schema; every
command it runs checked against the project) and the Dockerfile. The `slow` tests start a real Prefect server on
loopback (SQLite, then PostgreSQL started by hand), deploy prefect.yaml, run the deployment through a process
worker on a throwaway copy of the repository configured with configs/tiny.yaml, and read the results back
through the API."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from conftest import REPO
from dvc_support import make_project_copy
from flows.pipeline import (PipelineError, PipelineOptions, StageInputError, check_overrides, dvc_command, execute,
                            log_record, pipeline, read_metric_rows, stage_command, stage_exit_code, stage_order,
                            stream_command)
from tspo_core.config import Params, load_params
from tspo_core.procs import stop_process as _stop

COMPOSE = REPO / "docker-compose.yml"
PREFECT_YAML = REPO / "prefect.yaml"
DOCKERFILE = REPO / "Dockerfile"
SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"
SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"  # tests/data/README.md
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "tspo-process"
DEPLOYMENT = "pipeline/tspo-pipeline"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ================================================================================================================
# the pipeline flow: parameters and command lines
# ================================================================================================================
@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["dvc", "repro"]),
    ({"targets": ["data", "train@tspo"]}, ["dvc", "repro", "data", "train@tspo"]),
    ({"force": True, "targets": ["report"]}, ["dvc", "repro", "--force", "report"]),
    ({"mode": "exp"}, ["dvc", "exp", "run"]),
    ({"mode": "exp", "overrides": ["reward.folr_alpha=0.2", "data.synthetic.splits.nq.train=3"],
      "name": "folr-0.2", "targets": ["train@tspo"]},
     ["dvc", "exp", "run", "-S", "reward.folr_alpha=0.2", "-S", "data.synthetic.splits.nq.train=3",
      "--name", "folr-0.2", "train@tspo"]),
    ({"mode": "exp", "overrides": ["params.yaml:optim.lr=1e-4,1e-3"], "queue": True},
     ["dvc", "exp", "run", "-S", "params.yaml:optim.lr=1e-4,1e-3", "--queue"]),
    ({"mode": "exp", "overrides": ["model.name_or_path=null", "eval.subset_size=5 "]},  # values are passed as-is
     ["dvc", "exp", "run", "-S", "model.name_or_path=null", "-S", "eval.subset_size=5 "]),
])
def test_options_build_the_dvc_command_line(kwargs, expected):
    assert dvc_command(PipelineOptions(**kwargs)) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "exp", "overrides": ["reward.folr_alph=0.2"]}, "'reward.folr_alph=0.2': reward.folr_alph: unknown key"),
    ({"mode": "exp", "overrides": ["rewards.folr_alpha=0.2"]}, "'rewards.folr_alpha=0.2': rewards: unknown key"),
    ({"mode": "exp", "overrides": ["reward.folr_alpha"]}, "expected `key=value`"),
    ({"mode": "exp", "overrides": ["reward..folr_alpha=1"]}, "expected `key=value`"),
    ({"mode": "exp", "overrides": ["+reward.extra=1"]}, "no +/~ prefixes"),
    ({"mode": "exp", "overrides": ["~reward.folr_alpha"]}, "expected `key=value`"),
    ({"mode": "exp", "overrides": ["train.steps=1\nrm -rf /"]}, "no control characters"),
    ({"mode": "exp", "overrides": ["train.steps.x=1"]}, "override 'train.steps.x': 'steps' is not a section"),
    ({"mode": "exp", "overrides": ["train=1"]}, "'train=1': train: Input should be a valid dictionary"),
    ({"mode": "exp", "overrides": ["reward.folr_alpha=abc"]}, "reward.folr_alpha: Input should be a valid number"),
    ({"mode": "exp", "overrides": ["optim.lr=1e-4,oops"], "queue": True}, "optim.lr: Input should be a valid number"),
    ({"mode": "exp", "overrides": ["configs/tiny.yaml:train.steps=1"]}, "cannot target 'configs/tiny.yaml'"),
    ({"overrides": ["train.steps=1"]}, "need(s) mode 'exp'"),
    ({"queue": True}, "need(s) mode 'exp'"),
    ({"name": "x"}, "need(s) mode 'exp'"),
    ({"mode": "exp", "retries": 1}, "retries need mode 'repro'"),
    ({"retries": -1}, "greater than or equal to 0"),
    ({"targets": ["--force"]}, "bad target '--force'"),
    ({"targets": ["data; rm -rf /"]}, "bad target"),
    ({"mode": "exp", "name": "-n"}, "bad experiment name"),
    ({"mode": "sweep"}, "'repro' or 'exp'"),
    ({"target": ["data"]}, "Extra inputs are not permitted"),
])
def test_options_reject_bad_input(kwargs, message):
    with pytest.raises(ValidationError) as err:
        PipelineOptions(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["reward.folr_alpha=0.2", "data.seed=1", "data.synthetic.n_worlds=60",
                                      "data.synthetic.splits.nq.train=1", "paths.metrics_dir=m", "model.tiny.hidden_size=32",
                                      "optim.lr=1e-4,1e-3", "model.name_or_path=null"])
def test_params_keys_of_params_yaml_are_accepted(override):
    assert check_overrides([override], REPO / "params.yaml") is None
    assert dvc_command(PipelineOptions(mode="exp", overrides=[override]))[3:] == ["-S", override]


def test_every_setting_of_params_yaml_can_be_overridden():
    """Overrides are checked by `load_params(..., overrides=...)`: every leaf of the default config, set to its own
    value (as DVC writes it back), passes; the error is one line naming the key."""
    def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix, node

    items = [f"{k}={json.dumps(v)}" for k, v in leaves(_yaml(REPO / "params.yaml"))]
    assert len(items) > 50
    refused = {i: check_overrides([i], REPO / "params.yaml") for i in items}
    refused = {i: why for i, why in refused.items() if why is not None}
    # DVC's own `-S` parser (hydra) cannot address a key part that starts with a digit: refused before DVC starts
    assert sorted(refused) == sorted(i for i in items if ".2wikimultihopqa." in i), refused
    assert all("HydraException" in why for why in refused.values())
    problem = check_overrides(["train.steps=3", "reward.folr_alph=1"], REPO / "params.yaml")
    assert problem == "bad override 'reward.folr_alph=1': reward.folr_alph: unknown key (typo?)"


def test_flow_parameters_are_one_pydantic_model():
    schema = pipeline.parameters.model_dump()
    assert list(schema["properties"]) == ["options"]  # one form in the UI
    model = schema["definitions"]["PipelineOptions"]
    assert model["additionalProperties"] is False
    assert model["properties"]["mode"]["enum"] == ["repro", "exp"]
    assert {"targets", "overrides", "queue", "name", "force", "project_dir", "params_file"} <= set(model["properties"])
    ok = pipeline.validate_parameters({"options": {"mode": "exp", "overrides": ["reward.folr_alpha=0.2"]}})
    assert dvc_command(ok["options"]) == ["dvc", "exp", "run", "-S", "reward.folr_alpha=0.2"]
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="reward.folr_alph: unknown key"):
        pipeline.validate_parameters({"options": {"mode": "exp", "overrides": ["reward.folr_alph=0.2"]}})


# a hand-made stage graph (stage -> the stages it depends on), in a "dvc.yaml order" that lists a stage before its
# upstream stages: the order must come from the edges; at each step the first ready stage in this order
GRAPH = {"report": ["eval@b", "eval@a"], "eval@a": ["train@a", "data"], "train@a": ["prep", "data"],
         "eval@b": ["data"], "prep": ["data"], "data": [], "lint": []}


@pytest.mark.parametrize("targets, expected", [
    ([], ["data", "eval@b", "prep", "train@a", "eval@a", "report", "lint"]),
    (["eval@a"], ["data", "prep", "train@a", "eval@a"]),
    (["dvc.yaml:eval@b", "lint"], ["data", "eval@b", "lint"]),
    (["eval"], ["data", "eval@b", "prep", "train@a", "eval@a"]),  # a foreach group: every eval@...
    (["prep", "prep"], ["data", "prep"]),
])
def test_stage_order_is_dag_order_of_the_targets_and_their_upstream(targets, expected):
    order = stage_order(GRAPH, targets)
    assert order == expected
    assert all(order.index(u) < order.index(s) for s in order for u in GRAPH[s])


def test_stage_order_refuses_unknown_targets_and_cycles():
    with pytest.raises(PipelineError, match=r"^target 'evaluate@c': no stage or foreach group of that name in "
                                            r"dvc.yaml; stages: report, eval@a, "):
        stage_order(GRAPH, ["evaluate@c"])
    with pytest.raises(PipelineError, match="target 'eval@': no stage"):
        stage_order(GRAPH, ["eval@"])
    with pytest.raises(PipelineError, match=r"cycle among \['a', 'b'\]"):
        stage_order({"a": ["b"], "b": ["a"], "c": []})


def test_stage_order_of_this_project_comes_from_dvc():
    from flows.tracking import dvc_stages

    graph = {name: s["upstream"] for name, s in dvc_stages(REPO).items()}
    assert graph["data"] == [] and set(graph["report"]) == {"evaluate@sft", "evaluate@grpo", "evaluate@tspo",
                                                             "train@grpo", "train@tspo"}
    assert stage_order(graph) == ["data", "index", "sft", "train@grpo", "train@tspo", "evaluate@sft",
                                  "evaluate@grpo", "evaluate@tspo", "report"]
    assert stage_order(graph, ["train@grpo"]) == ["data", "index", "sft", "train@grpo"]
    assert stage_command("train@grpo") == ["dvc", "repro", "--single-item", "train@grpo"]
    assert stage_command("data", force=True) == ["dvc", "repro", "--single-item", "--force", "data"]


@pytest.mark.parametrize("line, level, message", [
    # a stage flow's console line: Prefect's stamp dropped (the task's logger adds one), its level kept
    ("22:18:08.123 | INFO    | Flow run 'crazy-fox' - Beginning flow run", "INFO",
     "Flow run 'crazy-fox' - Beginning flow run"),
    ("22:18:08.123 | WARNING | tspo_core.train.rl - resumed at step 3", "WARNING",
     "tspo_core.train.rl - resumed at step 3"),
    ("09:00:00.000 | ERROR   | Flow run 'x' - Finished in state Failed", "ERROR",
     "Flow run 'x' - Finished in state Failed"),
    ("00:00:01.5 | CRITICAL | boom", "CRITICAL", "boom"),
    # DVC's own lines, the stage CLIs' one-line errors and warnings
    ("ERROR: failed to reproduce 'sft': failed to run: python -m flows.sft, exited with 2", "ERROR",
     "ERROR: failed to reproduce 'sft': failed to run: python -m flows.sft, exited with 2"),
    ("WARNING: 'data' is empty.", "WARNING", "WARNING: 'data' is empty."),
    ("error: params.yaml: train.stepz: unknown key", "ERROR", "error: params.yaml: train.stepz: unknown key"),
    ("warning: W&B tracking: offline", "WARNING", "warning: W&B tracking: offline"),
    ("/x/torch/init.py:51: UserWarning: TF32 is off", "WARNING", "/x/torch/init.py:51: UserWarning: TF32 is off"),
    ("Running stage 'data':", "INFO", "Running stage 'data':"),
    ("12:00 the stage printed a time", "INFO", "12:00 the stage printed a time"),
    ("report: ERROR: not at the start", "INFO", "report: ERROR: not at the start"),
])
def test_log_record_keeps_one_timestamp_and_maps_levels(line, level, message):
    import logging

    assert log_record(line) == (getattr(logging, level), message)


def test_stage_exit_code_is_read_from_dvc_error_line():
    line = "ERROR: failed to reproduce 'sft': failed to run: python -m flows.sft --params params.yaml, exited with 2"
    assert stage_exit_code(["Running stage 'sft':", line, ""]) == 2
    assert stage_exit_code([line.replace("with 2", "with -9")]) == -9
    assert stage_exit_code(["ERROR: failed to reproduce 'x': unable to acquire lock"]) is None


def test_retries_skip_bad_input_only():
    from prefect.states import Completed, Failed

    from flows.pipeline import _retry_stage

    assert _retry_stage(None, None, Failed(data=StageInputError("exit 2"))) is False
    assert _retry_stage(None, None, Failed(data=PipelineError("exit 1: a crash"))) is True
    assert _retry_stage(None, None, Failed(data=OSError("disk full"))) is True
    assert _retry_stage(None, None, Completed(data={})) is False


def test_stage_flow_runs_plain_without_a_parent_and_unlinked_when_the_link_fails(monkeypatch, capsys):
    import prefect.client.orchestration
    from prefect import flow as prefect_flow

    from flows import subflow

    calls: list[dict] = []
    plain = lambda **kw: calls.append(kw) or "ran"  # noqa: E731 - not a Prefect flow: called as it is
    assert subflow.run_stage_flow(plain, {"params_path": "p"}, environ={}) == "ran"
    assert subflow.run_stage_flow(plain, {"params_path": "q"}, environ={subflow.PARENT_FLOW_RUN_ENV: "x"}) == "ran"
    assert calls == [{"params_path": "p"}, {"params_path": "q"}]

    def no_server(*args, **kwargs):
        raise RuntimeError("connection refused")

    monkeypatch.setattr(prefect.client.orchestration, "get_client", no_server)
    monkeypatch.setattr(subflow.time, "sleep", lambda s: None)
    stage = prefect_flow(name="stage-x")(lambda params_path: params_path)
    assert subflow._subflow_run(stage, {"params_path": "p"}, "0193d2c4-0000-7000-8000-000000000000") is None
    assert capsys.readouterr().err == ("warning: not linked to the pipeline task run 0193d2c4-0000-7000-8000-"
                                       "000000000000 (RuntimeError: connection refused); this stage's flow run is "
                                       "tagged with the pipeline run only\n")


def test_params_file_is_resolved_into_params_yaml(tmp_path):
    """The form's `params_file`: validated when the run starts, then written fully resolved where DVC reads it."""
    from flows.pipeline import resolve_params_file
    from tspo_core.config import dump_params

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    (tmp_path / "params.yaml").write_text("old: 1\n")
    assert resolve_params_file(PipelineOptions(project_dir=str(tmp_path)), print) is None  # nothing given
    assert (tmp_path / "params.yaml").read_text() == "old: 1\n"
    options = PipelineOptions(project_dir=str(tmp_path), params_file="configs/tiny.yaml", mode="exp",
                              overrides=["train.steps=2"])  # overrides are checked against the params file
    logged: list[str] = []
    assert resolve_params_file(options, logged.append) == tmp_path / "params.yaml"
    resolved = (tmp_path / "params.yaml").read_text()
    assert resolved == dump_params(load_params(REPO / "configs" / "tiny.yaml"))
    assert set(_yaml(tmp_path / "params.yaml")) == set(Params.model_fields)  # every section written out
    assert logged == [f"params: configs/tiny.yaml resolved (every key written out, defaults included) into "
                      f"{tmp_path / 'params.yaml'}; the DVC stages read that file, so it now holds this run's params "
                      "(the previous params.yaml is in git)"]
    with pytest.raises(ValidationError, match="params_file: .*configs/nope.yaml: params file not found"):
        PipelineOptions(project_dir=str(tmp_path), params_file="configs/nope.yaml")
    (tmp_path / "configs" / "bad.yaml").write_text("train: {stepz: 1}\n")
    with pytest.raises(ValidationError, match=r"params_file: .*bad.yaml: 2 invalid setting\(s\): .*; train.stepz: unknown key"):
        PipelineOptions(project_dir=str(tmp_path), params_file="configs/bad.yaml")


def test_default_project_is_this_checkout():
    assert PipelineOptions().resolved_project_dir() == REPO
    assert PipelineOptions(project_dir="/tmp/x/../y").resolved_project_dir() == Path("/tmp/y")


# ================================================================================================================
# running DVC: streaming, errors, metrics
# ================================================================================================================
FAKE_DVC = r"""
import sys, time
for i in range(60):
    print(f"line {i}", flush=True)
for i in range(0, 101, 5):  # a tqdm-like bar: carriage-return updates on one line
    sys.stderr.write(f"\rtrain@tspo: {i:3d}%|{'#' * (i // 10):10s}| {i // 5}/20 [00:01<00:01]")
    sys.stderr.flush()
sys.stderr.write("\n")
print("the end", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_stream_command_streams_every_line_and_keeps_the_tail(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_DVC)
    logged: list[str] = []
    code, tail, seconds = stream_command([sys.executable, str(script), "3"], tmp_path, logged.append,
                                         tail_lines=10)
    assert code == 3 and seconds > 0
    assert logged[:60] == [f"line {i}" for i in range(60)]
    assert logged[-1] == "the end"
    bars = [line for line in logged if "%|" in line]
    assert bars[0].startswith("train@tspo:   0%") and bars[-1].startswith("train@tspo: 100%")
    assert len(bars) < 21  # the 21 updates are throttled: first and last are shown
    assert tail[-1] == "the end" and len(tail) == 10 and "train@tspo: 100%" in tail[-2]


def test_execute_reports_the_failing_command_and_its_tail(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    script = tmp_path / "fake.py"
    script.write_text(FAKE_DVC)
    logged: list[str] = []
    with pytest.raises(PipelineError) as err:
        execute(["dvc", "repro", "data"], tmp_path, logged.append, dvc=[sys.executable, str(script), "7"])
    msg = str(err.value)
    assert msg.startswith("`dvc repro data` failed with exit code 7 after ")
    assert f"in {tmp_path}; last 40 lines of its output:" in msg
    assert msg.endswith("the end") and "line 59" in msg and "line 10\n" not in msg
    assert logged[0] == f"running `dvc repro data` in {tmp_path}"


def test_execute_refuses_a_directory_without_dvc_yaml(tmp_path):
    with pytest.raises(PipelineError, match="is not this project's DVC checkout"):
        execute(["dvc", "repro"], tmp_path, print)


@pytest.fixture(scope="module")
def mini_dvc_project(tmp_path_factory) -> Path:
    """A DVC project (no git) whose stages run `python`: it must be this environment's interpreter."""
    root = tmp_path_factory.mktemp("mini-dvc")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    stage = ("import json, os, tspo_core; os.makedirs('metrics', exist_ok=True); "
             "json.dump({'estimator': 'fake', 'steps': 3, 'em_last20pct': 0.25}, open('metrics/train_fake.json', "
             "'w')); print('stage python has tspo_core')")
    boom = "import tspo_core, sys; print('stage python has tspo_core'); print('boom: bad input'); sys.exit(4)"
    bad = "import sys; print('error: params.yaml: x: unknown key', file=sys.stderr); sys.exit(2)"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "ok": {"cmd": f"python -c {shlex.quote(stage)}", "outs": [{"metrics/train_fake.json": {"cache": False}}]},
        "boom": {"cmd": f"python -c {shlex.quote(boom)}"},
        "bad": {"cmd": f"python -c {shlex.quote(bad)}"},
    }}))
    return root


def test_execute_runs_real_dvc_with_this_environment(mini_dvc_project, monkeypatch):
    # a PATH without this venv: the stage's `python` must still be the flow's interpreter (tspo_core importable)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    logged: list[str] = []
    result = execute(["dvc", "repro", "ok"], mini_dvc_project, logged.append)
    assert result["exit_code"] == 0 and result["command"] == "dvc repro ok"
    assert any("Running stage 'ok'" in line for line in logged)
    assert "stage python has tspo_core" in logged
    evals, trains, problems = read_metric_rows(mini_dvc_project / "metrics")
    assert evals == [] and problems == []
    assert trains == [{"estimator": "fake", "steps": 3, "em_last20pct": 0.25}]


def test_execute_real_dvc_failure_fails_with_the_stage_output(mini_dvc_project):
    with pytest.raises(PipelineError) as err:
        execute(["dvc", "repro", "boom"], mini_dvc_project, lambda line: None)
    msg = str(err.value)
    assert msg.startswith("`dvc repro boom` failed with exit code ")
    assert "boom: bad input" in msg and "stage python has tspo_core" in msg
    assert "'boom'" in msg  # DVC's own error line names the stage
    assert type(err.value) is PipelineError  # exit 4: not bad input, a stage task may retry it


def test_execute_real_dvc_stage_exit_2_is_bad_input(mini_dvc_project):
    with pytest.raises(StageInputError) as err:
        execute(stage_command("bad"), mini_dvc_project, lambda line: None)
    assert "error: params.yaml: x: unknown key" in str(err.value) and "exited with 2" in str(err.value)


def test_read_metric_rows_tables_and_problems(tmp_path):
    from tspo_core.evaluate import compact_metrics

    ds = {"nq": {"n": 3, "em": 0.5, "f1": 0.6}, "hotpotqa": {"n": 3, "em": 0.25, "f1": 0.3}}
    (tmp_path / "eval_sft.json").write_text(json.dumps(compact_metrics(  # as run_evaluate writes the DVC metric
        {"datasets": ds, "average": {"em": 0.375, "f1": 0.45, "cover_em": 0.5}, "meta": {"skipped": []}})))
    (tmp_path / "train_tspo.json").write_text(json.dumps(
        {"estimator": "tspo", "steps": 2, "kl_last20pct": 0.01, "nan": float("nan"), "nested": {"a": 1}}))
    (tmp_path / "eval_broken.json").write_text("{not json")
    (tmp_path / "eval_other.json").write_text(json.dumps({"f1": 0.5}))  # no average EM
    (tmp_path / "train_list.json").write_text("[1, 2]")
    (tmp_path / "train_grpo.jsonl").write_text('{"step": 1}\n')  # the curve, not a summary: ignored
    evals, trains, problems = read_metric_rows(tmp_path)
    assert evals == [{"run": "sft", "avg_em": 0.375, "avg_f1": 0.45, "avg_cover_em": 0.5, "em_nq": 0.5,
                      "em_hotpotqa": 0.25}]
    assert trains == [{"estimator": "tspo", "steps": 2, "kl_last20pct": 0.01}]  # non-finite and nested dropped
    assert len(problems) == 3
    assert problems[0].startswith("eval_broken.json: not an evaluation metrics file (JSONDecodeError")
    assert problems[1].startswith("eval_other.json: not an evaluation metrics file (KeyError")
    assert problems[2].startswith("train_list.json: not a training summary (TypeError")
    assert read_metric_rows(tmp_path / "missing") == ([], [], [])


def test_cli_rejects_bad_input_with_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--mode", "exp", "--set", "reward.folr_alph=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "error: bad override 'reward.folr_alph=1': reward.folr_alph: unknown key (typo?)" in out.stderr
    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "configs/tiny.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "the DVC stages always read" in out.stderr


# ================================================================================================================
# prefect.yaml
# ================================================================================================================
def _deployment() -> dict:
    (dep,) = [d for d in _yaml(PREFECT_YAML)["deployments"] if d["name"] == "tspo-pipeline"]
    return dep


def test_prefect_yaml_parses_and_names_the_pipeline_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = _yaml(PREFECT_YAML)
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == ["tspo-pipeline"]
    dep = _deployment()
    path, _, name = dep["entrypoint"].partition(":")
    assert (REPO / path).is_file()
    loaded = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert loaded.name == pipeline.name == "pipeline" and name == pipeline.fn.__name__
    # the default parameters are valid and mean a plain `dvc repro`
    params = loaded.validate_parameters(dep["parameters"])
    assert dvc_command(params["options"]) == ["dvc", "repro"]
    assert not raw.get("build") and not raw.get("push")  # no image build, no upload


def test_prefect_yaml_schedule_is_inactive_by_default():
    from prefect.client.schemas.schedules import CronSchedule

    schedules = _deployment()["schedules"]
    assert schedules, "the deployment should carry a (paused) schedule"
    for s in schedules:
        assert s["active"] is False, f"schedule {s} must be off by default"
        CronSchedule(cron=s["cron"], timezone=s.get("timezone"))  # raises on a malformed cron


def test_prefect_yaml_pool_and_working_directory_match_the_compose_worker():
    raw = _yaml(PREFECT_YAML)
    dep = _deployment()
    assert dep["work_pool"]["name"] == POOL
    pull = dep.get("pull", raw.get("pull"))
    assert [list(step) for step in pull] == [["prefect.deployments.steps.set_working_directory"]]  # no git clone
    directory = pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    m = re.fullmatch(r"\{\{ \$(\w+) \}\}", directory)
    assert m, f"the working directory should come from the worker's environment, got {directory!r}"
    worker = _yaml(COMPOSE)["services"]["worker"]
    assert worker["environment"][m[1]] == worker["working_dir"] == "/app"
    assert any(v.split(":")[:2] == [".", "/app"] for v in worker["volumes"])  # the checkout itself
    assert _worker_pool(worker["command"]) == dep["work_pool"]["name"]


# ================================================================================================================
# docker-compose.yml
# ================================================================================================================
def _schema() -> dict:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def _validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    # its $schema URI (draft/2019-09/schema#) is not the canonical one, so name the draft explicitly
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def _errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _validator().iter_errors(doc)]


def test_vendored_schema_is_the_documented_compose_spec():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = _schema()
    assert schema["title"] == "Compose Specification"
    notes = (SCHEMA.parent / "README.md").read_text(encoding="utf-8")
    assert SCHEMA_SHA256 in notes and "Apache License 2.0" in notes
    assert "Apache License" in (SCHEMA.parent / "compose_spec.LICENSE").read_text(encoding="utf-8")


def test_compose_file_validates_against_the_compose_specification():
    doc = _yaml(COMPOSE)
    assert _errors(doc) == []
    assert set(doc["services"]) == {"postgres", "prefect-server", "worker", "retrieval"}


@pytest.mark.parametrize("mutate", [
    lambda d: d["services"]["worker"].update(enviroment={"A": "1"}),  # typo of environment
    lambda d: d["services"]["prefect-server"].update(ports={"4200": 4200}),
    lambda d: d["services"]["worker"]["depends_on"]["prefect-server"].update(condition="service_ready"),
    lambda d: d["services"]["postgres"]["healthcheck"].update(retry=3),
    lambda d: d.update(service={}),
])
def test_compose_schema_catches_mistakes(mutate):
    """The schema check is not vacuous: each of these slips fails it."""
    doc = copy.deepcopy(_yaml(COMPOSE))
    mutate(doc)
    assert _errors(doc)


def _worker_pool(command: list[str]) -> str:
    return command[command.index("--pool") + 1]


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _check_prefect_cli(args: list[str]) -> Any:
    """Parse `prefect <args>` with Prefect's own CLI definition (no command is run)."""
    from prefect.cli._app import _app

    command, bound, _ = _app.parse_args(args, exit_on_error=False, print_error=False)
    assert command.__module__.startswith("prefect.cli."), f"`prefect {' '.join(args)}` is not a Prefect command"
    return bound


def test_compose_commands_exist_in_the_project():
    services = _yaml(COMPOSE)["services"]
    checked = []
    for name, svc in services.items():
        if "command" not in svc:
            assert "build" not in svc, f"{name}: a project service without a command"
            continue
        cmd = _command(svc)
        if cmd[0] == "python":
            assert cmd[1] == "-m", f"{name}: run project code as `python -m module`"
            module = cmd[2]
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
            mod = importlib.import_module(module)
            assert hasattr(mod, "build_parser"), f"{name}: {module} has no CLI parser to check the flags against"
            try:
                mod.build_parser().parse_args(cmd[3:])
            except SystemExit:  # argparse exits on an unknown or malformed flag (its message is on stderr)
                pytest.fail(f"{name}: `{' '.join(cmd)}` is rejected by the CLI of {module}")
        elif cmd[0] == "prefect":
            bound = _check_prefect_cli(cmd[1:])
            if cmd[1:3] == ["worker", "start"]:
                assert bound.arguments["work_pool_name"] == _deployment()["work_pool"]["name"]
                assert bound.arguments["worker_type"] == "process"
        else:
            pytest.fail(f"{name}: unexpected program {cmd[0]!r}")
        assert svc["build"]["context"] == "." and (REPO / svc["build"]["dockerfile"]).is_file()
        checked.append(name)
        for test in (svc.get("healthcheck") or {}).get("test", [])[1:]:
            if test.startswith("import "):
                compile(test, f"{name} healthcheck", "exec")
    assert sorted(checked) == ["prefect-server", "retrieval", "worker"]


def test_compose_exposure_and_wiring():
    services = _yaml(COMPOSE)["services"]
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert list(published) == ["prefect-server"]  # only the UI/API, and only on the host's loopback
    assert all(str(p).startswith("127.0.0.1:") for p in published["prefect-server"])
    server_cmd = _command(services["prefect-server"])
    port = server_cmd[server_cmd.index("--port") + 1]
    assert server_cmd[server_cmd.index("--host") + 1] == "0.0.0.0"  # inside its container, behind the mapping
    assert published["prefect-server"] == [f"127.0.0.1:{port}:{port}"]

    retrieval = services["retrieval"]
    rcmd = _command(retrieval)
    assert rcmd[rcmd.index("--host") + 1] == "0.0.0.0" and "ports" not in retrieval
    assert rcmd[rcmd.index("--index") + 1] == Params.model_fields["paths"].default_factory().index_dir
    assert "NO AUTHENTICATION" in COMPOSE.read_text(encoding="utf-8")

    pg = services["postgres"]
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    m = re.fullmatch(r"postgresql\+asyncpg://(\w+):(.+)@postgres:5432/(\w+)", db_url)
    assert m, db_url
    assert (m[1], m[2], m[3]) == (pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_PASSWORD"],
                                  pg["environment"]["POSTGRES_DB"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in _yaml(COMPOSE)["volumes"]  # a named volume, not a bind mount
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert services["prefect-server"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    worker = services["worker"]
    assert worker["depends_on"] == {"prefect-server": {"condition": "service_healthy"}}
    assert worker["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{port}/api"


_DOC_CMD = re.compile(r"^#\s{2,}(?:[A-Z_]+=\S+\s+)?(?:docker compose exec worker\s+)?(prefect\s.*?)(?:\s{2,}#.*)?$")


def test_documented_prefect_commands_parse():
    """The commands shown in the comments of prefect.yaml and docker-compose.yml are real Prefect commands."""
    found = []
    for path in (PREFECT_YAML, COMPOSE):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = _DOC_CMD.match(line)
            if m:
                args = shlex.split(m[1])[1:]
                args = args[1:] if args[:1] == ["--no-prompt"] else args
                bound = _check_prefect_cli(args)
                pool = bound.arguments["name"] if args[:2] == ["work-pool", "create"] else bound.arguments.get(
                    "work_pool_name")
                assert pool in (None, POOL), f"{path.name}: {line.strip()} names pool {pool!r}, not {POOL!r}"
                found.append(args[:2])
    assert ["deploy", "--name"] in found and ["worker", "start"] in found and ["work-pool", "create"] in found
    assert ["deployment", "run"] in found and len(found) >= 6


def _unknown_prefect_settings(names) -> list[str]:
    """PREFECT_* variables that are no Prefect setting (Prefect ignores a misspelt one silently)."""
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    valid = _get_valid_setting_names(Settings)
    return sorted(n for n in names if n.startswith("PREFECT_") and n not in valid)


def test_compose_prefect_settings_are_real_settings():
    services = _yaml(COMPOSE)["services"]
    names = {k for svc in services.values() for k in (svc.get("environment") or {})}
    assert {"PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_UI_API_URL"} <= names
    assert _unknown_prefect_settings(names) == []
    assert _unknown_prefect_settings(["PREFECT_API_DATABASE_CONECTION_URL"]) == ["PREFECT_API_DATABASE_CONECTION_URL"]


# ================================================================================================================
# Dockerfile
# ================================================================================================================
def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_dockerfile_installs_the_pinned_cpu_torch_then_the_project():
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    instructions = [ln for ln in logical.splitlines() if ln and not ln.lstrip().startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in instructions
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions
    torch_at = next(i for i, ln in enumerate(instructions) if "torch==2.13.0" in ln and ln.startswith("RUN pip"))
    assert "-c constraints.txt" in instructions[torch_at] and '--index-url "${TORCH_INDEX_URL}"' in instructions[
        torch_at]
    project_at = next(i for i, ln in enumerate(instructions) if "pip install -c constraints.txt -e" in ln)
    assert torch_at < project_at
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()
    assert "EXTRAS=gpu" in text and "nvidia/cuda" in text  # the documented GPU variant
    ignored = set(_dockerignore())
    for inst in instructions:
        if inst.startswith("COPY "):
            *sources, _dest = inst.split()[1:]
            for src in sources:
                if src != ".":
                    assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
                    assert src not in ignored, f"Dockerfile copies {src}, which .dockerignore leaves out"
    assert {".git", ".venv", "data", "artifacts", "metrics", ".dvc/cache"} <= ignored  # keep the context small


# ================================================================================================================
# slow: a real Prefect server, the deployment of prefect.yaml, a process worker
# ================================================================================================================
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """terminate, wait, kill if needed; then whatever is left of its session (it was started in a new one)."""
    _stop(proc, grace_s=grace_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # orphaned children (a flow run, dvc, a stage), if any
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Stack:
    api: str
    port: int
    env: dict[str, str]
    server_log: Path
    worker_log: Path

    def logs(self) -> str:
        return (f"--- prefect server log (tail) ---\n{log_tail(self.server_log)}\n"
                f"--- prefect worker log (tail) ---\n{log_tail(self.worker_log)}")


def _cli(stack_env: dict[str, str], cwd: Path, *args: str, timeout: float = 180) -> str:
    out = subprocess.run([PREFECT, *args], cwd=cwd, env=stack_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"`prefect {' '.join(args)}` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@contextmanager
def prefect_stack(root: Path, project: Path, db_url: str | None = None) -> Iterator[Stack]:
    """A Prefect server on a free loopback port (its own PREFECT_HOME), the work pool, the deployment of the
    project's prefect.yaml and a process worker; stopped in reverse order (worker, then server), each by PID."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",  # the API is what is tested; skips building the UI's static files
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "GIT_AUTHOR_NAME": "tspo test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "tspo test", "GIT_COMMITTER_EMAIL": "test@localhost",
        "DVC_NO_ANALYTICS": "1",
    })
    if db_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
    assert _unknown_prefect_settings(env) == []
    stack = Stack(api, port, env, root / "server.log", root / "worker.log")
    started: list[subprocess.Popen] = []
    try:
        with open(stack.server_log, "wb") as log:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(server)
        deadline = time.monotonic() + 150
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{stack.logs()}")
            try:
                if httpx.get(f"{api}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 150 s:\n{stack.logs()}")
            time.sleep(0.5)
        _cli(env, project, "work-pool", "create", POOL, "--type", "process")
        _cli(env, project, "--no-prompt", "deploy", "--name", "tspo-pipeline")
        with open(stack.worker_log, "wb") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"], cwd=project,
                                      env={**env, "TSPO_PROJECT_DIR": str(project)}, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(worker)
        yield stack
    finally:
        for proc in reversed(started):  # the worker first, then the server
            stop_process(proc)


@contextmanager
def api_client(stack: Stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        with get_client(sync_client=True) as client:
            yield client


def run_deployment_and_wait(client, stack: Stack, parameters: dict, timeout_s: float):
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {run.state.name if run.state else None} after {timeout_s} s\n{stack.logs()}")
        time.sleep(1)


def artifacts_of(client, run_id) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


def logs_of(client, run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lines: list[str] = []
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                offset=len(lines))
        lines += [log.message for log in page]
        if len(page) < 200:
            return lines


def task_runs_of(client, run_id) -> list:
    """The task runs of a flow run in the order they were created (a NotReady task never starts)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                                 sort=TaskRunSort.EXPECTED_START_TIME_ASC)


def subflow_runs_of(client, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))


def log_records_of(client, run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)


STAMP = re.compile(r"^\d{2}:\d{2}:\d{2}(?:\.\d+)? \|")  # Prefect's console stamp: must not reach the API's log


def assert_linked_subflows(client, run, tasks: dict, expected: dict[str, str]) -> None:
    """Each stage flow run (flow name -> the task run that started it) is a subflow run of that task run and is
    tagged with the pipeline flow run."""
    flow_names = {f.id: f.name for f in client.read_flows()}
    subflows = {flow_names[f.flow_id]: f for f in subflow_runs_of(client, run.id)}
    assert set(subflows) == set(expected), subflows
    for flow_name, task_name in expected.items():
        sub = subflows[flow_name]
        assert sub.parent_task_run_id == tasks[task_name].id, (flow_name, task_name)
        assert f"parent:{run.id}" in sub.tags and sub.state.is_completed(), (flow_name, sub.tags, sub.state)


def failing_dvc_project(root: Path) -> Path:
    """A DVC project (no git) whose stages run in DAG order first -> boom -> after, plus `indep` on its own; boom
    fails as a stage CLI does on bad input (an `error:` line, exit 2)."""
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    write = "import sys; open(sys.argv[1], 'w').write('x')"
    boom = "import sys; print('error: params.yaml: train.stepz: unknown key', file=sys.stderr); sys.exit(2)"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": f"python -c {shlex.quote(write)} a.txt", "outs": ["a.txt"]},
        "boom": {"cmd": f"python -c {shlex.quote(boom)}", "deps": ["a.txt"], "outs": ["b.txt"]},
        "after": {"cmd": f"python -c {shlex.quote(write)} c.txt", "deps": ["b.txt"], "outs": ["c.txt"]},
        "indep": {"cmd": f"python -c {shlex.quote(write)} d.txt", "outs": ["d.txt"]},
    }}, sort_keys=False))
    return root


def table_rows(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deployment_runs_a_dvc_experiment_through_a_worker(tmp_path):
    """SQLite server. `dvc exp run -S train.steps=1 --name orchestration-test train@grpo` on the tiny config
    (data -> index -> sft -> train@grpo, about 1.5 min here): recorded as a DVC experiment, its training metrics
    published as artifacts and read back through the API; each stage's flow run is a subflow run of the `dvc exp
    run` task. Then, on the same server: `dvc repro train@grpo` (every stage now up to date) is one task per stage
    in DAG order, each `Skipped`; and a project whose second stage fails leaves a Failed task, not retried (bad
    input), DVC's error at ERROR, and the later stages NotReady."""
    project = make_project_copy(tmp_path / "project")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "run").mkdir()
    params = {"options": {"mode": "exp", "targets": ["train@grpo"], "overrides": ["train.steps=1"],
                          "name": "orchestration-test"}}
    with prefect_stack(tmp_path / "run", project) as stack:
        with api_client(stack) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            assert deployment.work_pool_name == POOL and deployment.entrypoint == "flows/pipeline.py:pipeline"
            assert deployment.schedules and not any(s.active for s in deployment.schedules)
            run = run_deployment_and_wait(client, stack, params, timeout_s=300)
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{stack.logs()}"
            artifacts = artifacts_of(client, run.id)
            logs = logs_of(client, run.id)
            flows = {f.name for f in client.read_flows()}
            tasks = {t.name: t for t in task_runs_of(client, run.id)}
            assert {n: t.state.name for n, t in tasks.items()} == {"dvc exp run": "Completed"}
            assert_linked_subflows(client, run, tasks, {s: "dvc exp run" for s in ("data", "index", "sft", "train")})

            again = run_deployment_and_wait(client, stack, {"options": {"targets": ["train@grpo"]}}, timeout_s=180)
            assert again.state.is_completed(), f"{again.state.name}: {again.state.message}\n{stack.logs()}"
            again_tasks = [(t.name, t.state.name) for t in task_runs_of(client, again.id)]
            assert subflow_runs_of(client, again.id) == []  # nothing ran, so no stage flow either

            failing = failing_dvc_project(tmp_path / "failing")
            bad = run_deployment_and_wait(client, stack, {"options": {"project_dir": str(failing), "retries": 1}},
                                          timeout_s=180)
            bad_tasks = task_runs_of(client, bad.id)
            bad_records = log_records_of(client, bad.id)
        port = stack.port
    assert not port_open(port), "the server still listens after it was stopped"

    assert {"pipeline-run", "pipeline-train-summary", "pipeline-train-table"} <= set(artifacts), set(artifacts)
    assert not any(k.startswith("pipeline-eval") for k in artifacts)  # no evaluation stage ran
    summary = artifacts["pipeline-run"].data
    assert "`dvc exp run -S train.steps=1 --name orchestration-test train@grpo`" in summary
    assert f"(git HEAD `{head}`): exit code 0" in summary  # lineage: the commit the experiment started from
    (row,) = table_rows(artifacts["pipeline-train-table"])
    assert row["estimator"] == "grpo" and int(row["steps"]) == 1  # the override reached the stage through DVC
    # DVC's output was streamed into the flow run's logs; each stage's own flow reported to the same server
    assert any("Running stage 'train@grpo'" in line for line in logs), logs[-20:]
    assert {"pipeline", "data", "index", "sft", "train"} <= flows
    # one timestamp per line: the stage flows' console lines reach the task's log without Prefect's console stamp
    assert any(re.match(r"Flow run '[^']+' - Beginning subflow run", line) for line in logs), logs[:30]
    assert not [line for line in logs if STAMP.match(line)]
    # dvc repro: a task per stage, named after it, in DAG order, each up to date
    assert again_tasks == [(s, "Skipped") for s in ("data", "index", "sft", "train@grpo")]
    # a failed stage fails its task (once: exit 2 is bad input, not retried) and the flow; the rest are not run
    assert bad.state.is_failed()
    assert bad.state.message.startswith("Flow run encountered an exception: PipelineError: stage 'boom' failed "
                                        "(not run: after, indep): `dvc repro --single-item boom` failed"), \
        bad.state.message
    assert [(t.name, t.state.name, t.run_count) for t in bad_tasks] == [
        ("first", "Completed", 1), ("boom", "Failed", 1), ("after", "NotReady", 0), ("indep", "NotReady", 0)]
    boom_id = bad_tasks[1].id
    dvc_error = [r for r in bad_records if r.task_run_id == boom_id and r.message.startswith("ERROR: failed to "
                                                                                           "reproduce 'boom'")]
    assert [r.level for r in dvc_error] == [40], [(r.level, r.message) for r in bad_records]
    assert [r.level for r in bad_records if r.message == "error: params.yaml: train.stepz: unknown key"] == [40]
    assert not [r.message for r in bad_records if STAMP.match(r.message)]
    # the run is a DVC experiment of the project copy, applied to its workspace
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True, check=True).stdout
    assert re.search(r"^refs/exps/.+/orchestration-test$", refs, re.M), refs
    assert load_params(project / "params.yaml").train.steps == 1
    assert json.loads((project / "metrics" / "train_grpo.json").read_text())["steps"] == 1


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL, started by hand on loopback (the compose stack's database, without docker)
# ---------------------------------------------------------------------------------------------------------------
def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = ([Path(found).resolve().parent] if found else []) + sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
        else 0, reverse=True)
    for d in candidates:
        if all((d / b).is_file() for b in ("initdb", "pg_ctl", "createdb")):
            return d
    return None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary directory on a free loopback port (initdb, pg_ctl start; stopped with
    pg_ctl, or by the postmaster's PID if that fails)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, createdb) not found; on Debian: "
                    "apt-get install -y postgresql (or `make postgres`)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` is missing (needed to run initdb as `postgres`)")
        as_user = [shutil.which("runuser"), "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="tspo-pg-"))  # not under pytest's tmp dir: that one is private to root
    data, password, port = base / "data", secrets.token_hex(16), free_port()
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    if owner is not None:
        for p in (base, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    started = False
    try:
        out = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--pwfile",
                              str(pwfile), "--auth", "scram-sha-256", "-E", "UTF8", "--no-instructions"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"initdb failed:\n{out.stdout}\n{out.stderr}"
        pwfile.unlink()
        out = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"),
                              "-w", "-t", "60", "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {base}", "start"],
                             capture_output=True, text=True, timeout=120)
        started = True
        assert out.returncode == 0, (f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n"
                                     f"{log_tail(base / 'postgres.log')}")
        out = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                              "prefect"], env={**os.environ, "PGPASSWORD": password}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"createdb failed:\n{out.stdout}\n{out.stderr}"
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect"
    finally:
        if started:
            stop = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t",
                                   "30", "stop"], capture_output=True, timeout=60)
            pidfile = data / "postmaster.pid"
            if stop.returncode != 0 and pidfile.is_file():
                pid = int(pidfile.read_text().split()[0])
                try:
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(60):
                        os.kill(pid, 0)
                        time.sleep(0.5)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)


def _count_flow_runs(db_url: str) -> int:
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval("SELECT count(*) FROM flow_run")
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deployment_runs_on_a_postgres_backed_server(tmp_path, postgres_url):
    """The compose stack's wiring without docker: `prefect server` on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL),
    the deployment run by a process worker (`dvc repro data` with the form's `params_file: configs/tiny.yaml` on a
    workspace whose params.yaml is the default: resolved into params.yaml before DVC runs; its task `data` is the
    parent of the `data` flow run); bad parameters are refused by the server, and an unknown stage fails the flow
    run before DVC runs, naming the stages there are."""
    from prefect.exceptions import PrefectHTTPStatusError

    project = make_project_copy(tmp_path / "project")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")  # the default; the form names configs/tiny.yaml
    (tmp_path / "run").mkdir()
    with prefect_stack(tmp_path / "run", project, db_url=postgres_url) as stack:
        with api_client(stack) as client:
            ok = run_deployment_and_wait(client, stack, {"options": {"targets": ["data"],
                                                                     "params_file": "configs/tiny.yaml"}},
                                         timeout_s=180)
            assert ok.state.is_completed(), f"{ok.state.name}: {ok.state.message}\n{stack.logs()}"
            ok_artifacts = artifacts_of(client, ok.id)
            ok_logs = logs_of(client, ok.id)
            ok_tasks = {t.name: t for t in task_runs_of(client, ok.id)}
            assert {n: t.state.name for n, t in ok_tasks.items()} == {"data": "Completed"}
            assert_linked_subflows(client, ok, ok_tasks, {"data": "data"})

            deployment = client.read_deployment_by_name(DEPLOYMENT)
            with pytest.raises(PrefectHTTPStatusError, match="bogus"):  # the form's schema, enforced server-side
                client.create_flow_run_from_deployment(deployment.id, parameters={"options": {"bogus": 1}})

            bad = run_deployment_and_wait(client, stack, {"options": {"targets": ["no-such-stage"]}}, timeout_s=180)
            assert bad.state.is_failed(), f"{bad.state.name}: {bad.state.message}"
            assert ("PipelineError: target 'no-such-stage': no stage or foreach group of that name in dvc.yaml; "
                    "stages: data, index, sft, train@grpo, ") in bad.state.message, bad.state.message
            assert task_runs_of(client, bad.id) == []  # refused before any stage ran
        assert _count_flow_runs(postgres_url) >= 3  # pipeline x2, data: the server's state lives in PostgreSQL
        port = stack.port
    assert not port_open(port), "the server still listens after it was stopped"
    assert set(ok_artifacts) == {"pipeline-run"}  # a fresh copy has no evaluation/training metrics yet
    assert "`dvc repro data` in" in ok_artifacts["pipeline-run"].data
    assert "Params: `configs/tiny.yaml`, fully resolved into" in ok_artifacts["pipeline-run"].data
    assert any(line.startswith("params: configs/tiny.yaml resolved") for line in ok_logs), ok_logs[:10]
    tiny = load_params(project / "configs" / "tiny.yaml")
    assert load_params(project / "params.yaml") == tiny  # where DVC read it, every key written out
    manifest = json.loads((project / "data" / "manifest.json").read_text())
    assert manifest  # the stage ran in the project copy ...
    lock = _yaml(project / "dvc.lock")
    assert lock["stages"]["data"]["params"]["params.yaml"]["data"]["synthetic"]["n_worlds"] == 4  # ... on tiny.yaml


def test_dvc_artifacts_are_stage_outputs():
    """The `artifacts:` section of dvc.yaml names the index, the SFT model and both RL models, each a stage out."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    outs = set()
    for stage in spec["stages"].values():
        items = stage["foreach"] if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for item in items:
            for out in body.get("outs", []):
                path = out if isinstance(out, str) else next(iter(out))
                outs.add(path.replace("${item}", str(item)).replace("${key}", str(item)))
    artifacts = spec["artifacts"]
    assert {a["path"] for a in artifacts.values()} == {"artifacts/index", "artifacts/sft", "artifacts/rl/grpo",
                                                        "artifacts/rl/tspo"}
    for name, a in artifacts.items():
        assert a["path"] in outs, name
        assert a["type"] in {"index", "model"} and a["desc"], name
