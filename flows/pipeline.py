"""Top-level flow `pipeline`: runs the DVC pipeline (`dvc repro`, or `dvc exp run -S key=value` so that sweeps
launched from the Prefect UI are recorded by DVC), then publishes the resulting metrics as Prefect artifacts.
Thin on purpose: DVC decides what is stale and records every run (dvc.lock, experiments); this flow starts it,
streams its output to the run's logs and turns metrics/eval_*.json and metrics/train_*.json (whatever exists)
into tables. Deployment: prefect.yaml (`tspo-pipeline`).

`repro` runs one Prefect task per DVC stage, named after the stage, in DAG order (DVC's stage graph, as `dvc dag`:
`flows.tracking.dvc_stages`), each `dvc repro --single-item STAGE`: every stage has its own state, duration, logs
and retries; a failed stage fails its task and every later stage is left `NotReady` (as `dvc repro` stops at the
first failure). `exp` is one task (`dvc exp run ...`: one experiment is one DVC command). The stage processes get
this flow run's and the task run's ids in their environment, so each stage's own flow run is a subflow run of
its task, tagged `parent:<flow run id>` (`flows.subflow`). Output lines keep one timestamp (Prefect's console stamp
of a stage line is dropped) and DVC's `ERROR:` lines are logged at ERROR.
"""

# python -m flows.pipeline                                             dvc repro
# python -m flows.pipeline --target data --target index                dvc repro data index
# python -m flows.pipeline --mode exp --set reward.folr_alpha=0.2      dvc exp run -S reward.folr_alpha=0.2
# python -m flows.pipeline --mode exp --set 'optim.lr=1e-4,1e-3' --queue   a queued grid; then dvc queue start
# python -m flows.pipeline --params-file configs/tiny.yaml             params.yaml = tiny.yaml resolved; dvc repro

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.common import main, markdown_table, publish
from flows.subflow import PARENT_FLOW_RUN_ENV, PARENT_TASK_RUN_ENV
from tspo_core.config import dump_params, load_params
from tspo_core.errors import ConfigError, TSPOError
from tspo_core.io import write_text
from tspo_core.procs import stop_process

PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The checkout that holds this flow file: where `dvc` runs unless `project_dir` says otherwise."""

TAIL_LINES = 40

_KEY = r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*"
_OVERRIDE = re.compile(rf"^(?:(?P<file>[^:=\s]+):)?(?P<key>{_KEY})=(?P<value>[^\x00-\x1f]*)$")
_TARGET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@.:/-]*$")
_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# tqdm lines from the stages ("train@tspo:  45%|####5     | 9/20 [...]"): logged at most every PROGRESS_EVERY_S
_PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+")
PROGRESS_EVERY_S = 10.0


class PipelineError(TSPOError):
    """DVC failed (the message holds the command, its exit code and the tail of its output) or cannot start."""


class StageInputError(PipelineError):
    """A stage command exited with 2 (bad input: the stage CLIs' `error:` line); a retry would fail the same."""


# ----------------------------------------------------------------------------------------------------------------
# parameters: one pydantic model, so the Prefect UI renders a form and bad input fails before DVC starts
# ----------------------------------------------------------------------------------------------------------------
def check_overrides(overrides: Sequence[str], params_path: Path) -> str | None:
    """None when every `key=value` of `overrides` (DVC's `-S` grammar: hydra; `key=a,b` a sweep) is a valid setting
    of `params_path` (`load_params(..., overrides=...)`: the key exists and each value fits), else one line why not."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # DVC's own parser for `-S`

    parser = OverridesParser.create()
    for item in overrides:
        m = _OVERRIDE.match(item)
        try:
            o = parser.parse_override(f"{m['key']}={m['value']}")
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
            for value in values:
                load_params(params_path, overrides={m["key"]: value})
        except ConfigError as err:
            lines = str(err).splitlines()
            return f"bad override {item!r}: " + "; ".join(ln.strip() for ln in lines[1:] or lines)
        except Exception as err:  # noqa: BLE001 - hydra's parse errors: the value is not DVC's `-S` syntax
            return f"bad override {item!r}: {type(err).__name__}: {err}".splitlines()[0]
    return None


class PipelineOptions(BaseModel):
    """What the `pipeline` flow runs: `dvc repro [targets]` or `dvc exp run [-S key=value ...] [targets]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["repro", "exp"] = Field(
        "repro", description="`repro`: dvc repro (updates dvc.lock). `exp`: dvc exp run, recorded as a DVC "
        "experiment (dvc exp show), the only mode that accepts overrides.")
    targets: list[str] = Field(
        default_factory=list, description="Stages to reproduce (with their stale upstream stages), e.g. `data`, "
        "`train@tspo`, `evaluate@sft`, or a foreach group (`train`: both). Empty: the whole pipeline.")
    overrides: list[str] = Field(
        default_factory=list, description="`key=value` settings of params.yaml for `dvc exp run -S`, e.g. "
        "`reward.folr_alpha=0.2`; values are YAML. With `queue`, `key=a,b,c` queues one experiment per value.")
    queue: bool = Field(False, description="exp mode: only queue the experiment(s) (`--queue`); run them with "
                        "`dvc queue start`.")
    name: str | None = Field(None, description="exp mode: experiment name (`--name`).")
    force: bool = Field(False, description="Run the stages even when DVC finds them up to date (`--force`).")
    retries: int = Field(0, ge=0, le=5, description="repro mode: retries of a failed stage task (a crashed "
                         "training resumes from its checkpoint); never for bad input (the stage exits 2).")
    project_dir: str | None = Field(None, description="The DVC project to run in. Empty: the checkout that "
                                    "holds this flow (the deployment's working directory).")
    params_file: str | None = Field(
        None, description="A params file to run, e.g. `configs/tiny.yaml` (relative to the project): validated, "
        "fully resolved (every default written out) and written to the project's `params.yaml`, which is what "
        "the DVC stages read, before DVC starts. Empty: `params.yaml` as it is.")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for t in v:
            if not _TARGET.match(t):
                raise ValueError(f"bad target {t!r}: a stage name such as `data` or `train@tspo` "
                                 "(letters, digits, _ @ . : / -; not starting with -)")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for item in v:
            m = _OVERRIDE.match(item)
            if m is None:
                raise ValueError(f"bad override {item!r}: expected `key=value` with a dotted key of params.yaml, "
                                 "e.g. `reward.folr_alpha=0.2` (no +/~ prefixes, no control characters)")
            if m["file"] not in (None, "params.yaml"):
                raise ValueError(f"bad override {item!r}: the stages read params.yaml only, so overrides "
                                 f"cannot target {m['file']!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _EXP_NAME.match(v):
            raise ValueError(f"bad experiment name {v!r}: letters, digits, _ . -, starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _exp_only(self) -> "PipelineOptions":
        if self.mode == "repro":
            given = [f for f, on in (("overrides", bool(self.overrides)), ("queue", self.queue),
                                     ("name", self.name is not None)) if on]
            if given:
                raise ValueError(f"{', '.join(given)} need(s) mode 'exp' (dvc exp run); dvc repro only "
                                 "reproduces params.yaml as it is")
        elif self.retries:
            raise ValueError("retries need mode 'repro' (a task per stage); `dvc exp run` is one task")
        if self.params_file is not None:
            try:
                load_params(self.params_source())
            except ConfigError as err:
                head, *rest = str(err).splitlines()
                raise ValueError(f"params_file: {head}" + (": " + "; ".join(r.strip() for r in rest) if rest
                                                           else "")) from None
        problem = self.overrides and check_overrides(self.overrides, self.params_source())
        if problem:
            raise ValueError(problem)
        return self

    def resolved_project_dir(self) -> Path:
        return Path(self.project_dir).expanduser().resolve() if self.project_dir else PROJECT_DIR

    def params_source(self) -> Path:
        """The params file the run uses: `params_file` (relative to the project), else the project's params.yaml."""
        return self.resolved_project_dir() / (self.params_file or "params.yaml")


def resolve_params_file(options: PipelineOptions, log: Callable[[str], None]) -> Path | None:
    """Write `options.params_file`, fully resolved, to the project's params.yaml (where DVC reads the params);
    None when no params file was given."""
    if options.params_file is None:
        return None
    source, target = options.params_source(), options.resolved_project_dir() / "params.yaml"
    text = dump_params(load_params(source))
    if source.resolve() != target.resolve():
        write_text(target, text)
    log(f"params: {options.params_file} resolved (every key written out, defaults included) into {target}; the "
        "DVC stages read that file, so it now holds this run's params (the previous params.yaml is in git)")
    return target


def dvc_command(options: PipelineOptions) -> list[str]:
    """The DVC command line `options` stand for (pure: no file or process is touched)."""
    if options.mode == "repro":
        cmd = ["dvc", "repro"]
    else:
        cmd = ["dvc", "exp", "run"]
        for item in options.overrides:
            cmd += ["-S", item]
        if options.queue:
            cmd.append("--queue")
        if options.name:
            cmd += ["--name", options.name]
    if options.force:
        cmd.append("--force")
    return cmd + list(options.targets)


def stage_command(stage: str, force: bool = False) -> list[str]:
    """The DVC command line of one stage task: that stage only (its upstream stages are tasks of their own)."""
    return ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]


def stage_order(graph: Mapping[str, Sequence[str]], targets: Sequence[str] = ()) -> list[str]:
    """The stages `dvc repro [targets]` considers, each after every stage it depends on (at each step the first
    ready stage in `graph`'s order, dvc.yaml's): `targets` (all stages when empty) and everything upstream of them.
    `graph` maps each stage to the stages it depends on (`dvc_stages()[name]["upstream"]`). A target is a stage
    (`train@grpo`, also `dvc.yaml:train@grpo`) or a `foreach` group (`train`: every `train@...`); anything else
    raises PipelineError naming the stages there are."""
    wanted: list[str] = []
    for target in targets:
        name = target.removeprefix("dvc.yaml:")
        found = [s for s in graph if s == name or s.partition("@")[0] == name and "@" in s and "@" not in name]
        if not found:
            raise PipelineError(f"target {target!r}: no stage or foreach group of that name in dvc.yaml; stages: "
                                f"{', '.join(graph)}")
        wanted += found
    todo, seen = list(wanted or graph), set()
    while todo:  # the targets' upstream closure
        if (name := todo.pop()) not in seen:
            seen.add(name)
            todo += [u for u in graph.get(name, ()) if u not in seen]
    unknown = sorted(u for s in seen for u in graph.get(s, ()) if u not in graph)
    if unknown:
        raise PipelineError(f"stage graph names unknown stage(s) {unknown}")
    order: list[str] = []
    pending = [s for s in graph if s in seen]
    while pending:
        ready = next((s for s in pending if all(u in order for u in graph[s])), None)
        if ready is None:
            raise PipelineError(f"stage graph has a cycle among {pending}")
        order.append(ready)
        pending.remove(ready)
    return order


# ----------------------------------------------------------------------------------------------------------------
# running DVC
# ----------------------------------------------------------------------------------------------------------------
def subprocess_env() -> dict[str, str]:
    """The flow's environment, with this interpreter's bin directory first on PATH (the stages run `python -m
    flows.<stage>`: the same environment as this flow, whatever PATH the worker was started with) and unbuffered
    output (streamed as it is written)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream_command(argv: list[str], cwd: Path, log: Callable[[str], None], env: dict[str, str] | None = None,
                   tail_lines: int = TAIL_LINES) -> tuple[int, list[str], float]:
    """Run `argv` in `cwd`, handing each output line (stdout and stderr merged, carriage-return updates split)
    to `log` as it comes; progress-bar lines at most every PROGRESS_EVERY_S. Returns (exit code, the last
    `tail_lines` lines, seconds). The process is terminated if this function is interrupted."""
    tail: deque[str] = deque(maxlen=tail_lines)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1)
    except OSError as err:
        raise PipelineError(f"cannot start {' '.join(argv)!r} in {cwd}: {err}") from None
    last_progress = -math.inf
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # text mode: \r, \n and \r\n all end a line
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            if _PROGRESS.search(line):
                now = time.monotonic()
                if now - last_progress < PROGRESS_EVERY_S and "100%|" not in line:
                    continue
                last_progress = now
            log(line)
        code = proc.wait()
    finally:
        stop_process(proc, grace_s=30)
    return code, list(tail), time.monotonic() - start


# Prefect's console format (logging.yml, `standard`): `12:34:56.789 | INFO    | Flow run 'x' - message`
_STAMPED = re.compile(r"^\d{2}:\d{2}:\d{2}(?:[.,]\d+)? \| (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| ?"
                      r"(?P<msg>.*)$")
_LEVEL_PREFIX = (("ERROR: ", logging.ERROR), ("error: ", logging.ERROR), ("WARNING: ", logging.WARNING),
                 ("warning: ", logging.WARNING))  # DVC's own lines; the stage CLIs' `error:`/`warning:` lines
_PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)\s*$")


def log_record(line: str) -> tuple[int, str]:
    """(logging level, message) for one output line of DVC or a stage: a line in Prefect's console format (a stage
    flow's log line) loses its timestamp, the logger adds its own, and keeps its level; DVC's `ERROR:`/`WARNING:`
    lines, the stage CLIs' `error:`/`warning:` lines and Python warnings get their level; anything else is INFO."""
    if m := _STAMPED.match(line):
        return logging.getLevelName(m["level"]), m["msg"]
    for prefix, level in _LEVEL_PREFIX:
        if line.startswith(prefix):
            return level, line
    return (logging.WARNING if _PY_WARNING.match(line) else logging.INFO), line


def stage_exit_code(lines: Sequence[str]) -> int | None:
    """The exit code of the stage command DVC ran, from DVC's `ERROR: failed to reproduce ...: failed to run: CMD,
    exited with N` (DVC itself exits 255); None when no such line is there."""
    for line in reversed(lines):
        if m := _STAGE_EXIT.search(line):
            return int(m[1])
    return None


def execute(cmd: list[str], project_dir: Path, log: Callable[[str], None],
            dvc: Sequence[str] = (sys.executable, "-m", "dvc"), env: Mapping[str, str] | None = None
            ) -> dict[str, Any]:
    """Run the DVC command line `cmd` (from `dvc_command`) in `project_dir` with the `dvc` of this environment
    (`env`: more environment variables); raise PipelineError with the tail of its output when it fails
    (StageInputError when the stage command exited with 2)."""
    if not (project_dir / "dvc.yaml").is_file():
        raise PipelineError(f"{project_dir} is not this project's DVC checkout (no dvc.yaml); set `project_dir`")
    shown = " ".join(cmd)
    log(f"running `{shown}` in {project_dir}")
    code, tail, seconds = stream_command([*dvc, *cmd[1:]], project_dir, log, env={**subprocess_env(), **(env or {})})
    if code != 0:
        kind = StageInputError if stage_exit_code(tail) == 2 else PipelineError
        raise kind(f"`{shown}` failed with exit code {code} after {seconds:.1f} s in {project_dir}; last "
                   f"{len(tail)} lines of its output:\n" + "\n".join(tail))
    log(f"`{shown}` finished in {seconds:.1f} s")
    return {"command": shown, "exit_code": code, "seconds": round(seconds, 1), "tail": tail}


def _task_log() -> Callable[[str], None]:
    logger = get_run_logger()
    return lambda line: logger.log(*log_record(line))


def _parent_env() -> dict[str, str]:
    """The ids the stage flows link themselves with (`flows.subflow.run_stage_flow`): this flow run, this task run."""
    from prefect.runtime import flow_run, task_run

    return {PARENT_FLOW_RUN_ENV: str(flow_run.id), PARENT_TASK_RUN_ENV: str(task_run.id)}


@task(name="dvc", cache_policy=NO_CACHE)  # no retries: DVC itself resumes persisted outputs when run again
def run_dvc(cmd: list[str], project_dir: str) -> dict[str, Any]:
    """A whole DVC command as one task (`exp` mode)."""
    return execute(cmd, Path(project_dir), _task_log(), env=_parent_env())


def _retry_stage(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition of a stage task: any failure but bad input (the stage exited 2)."""
    try:
        state.result()
    except StageInputError:
        return False
    except Exception:  # noqa: BLE001 - a crash, a killed process, a full disk: may pass on a retry
        return True
    return False


@task(name="stage", cache_policy=NO_CACHE, retry_condition_fn=_retry_stage)
def run_stage(stage: str, project_dir: str, force: bool = False) -> Any:
    """One DVC stage (`dvc repro --single-item STAGE`); state `Skipped` when DVC finds it up to date."""
    result = execute(stage_command(stage, force), Path(project_dir), _task_log(), env=_parent_env())
    result["stage"] = stage
    if any(f"Stage '{stage}' didn't change, skipping" in line for line in result["tail"]):
        return Completed(name="Skipped", message="up to date (dvc.lock matches): not run", data=result)
    return result


def run_stages(options: PipelineOptions, project: Path, order: list[str], graph: Mapping[str, Sequence[str]],
               log: Any) -> tuple[list[dict[str, Any]], str | None, list[str]]:
    """One `run_stage` task per stage of `order`, each after the tasks of its upstream stages (the run graph's
    edges); after a failure the rest wait on the failed task too, so Prefect leaves them `NotReady`. Returns (one
    row per stage: stage, state, seconds; the failure as one message or None; the tail of the last stage run)."""
    states: dict[str, State] = {}
    rows: list[dict[str, Any]] = []
    failed: tuple[str, State] | None = None
    tail: list[str] = []
    for stage in order:
        wait = [states[u] for u in graph[stage] if u in states] + ([failed[1]] if failed else [])
        start = time.monotonic()
        state = run_stage.with_options(task_run_name=stage, retries=options.retries, retry_delay_seconds=10)(
            stage, str(project), options.force, wait_for=wait, return_state=True)
        states[stage] = state
        rows.append({"stage": stage, "state": state.name, "seconds": round(time.monotonic() - start, 1)})
        if state.is_completed():
            tail = state.result()["tail"]
        elif failed is None:
            failed = (stage, state)
    if failed is None:
        return rows, None, tail
    err = failed[1].result(raise_on_failure=False)
    not_run = [r["stage"] for r in rows if r["state"] == "NotReady"]
    what = f"stage {failed[0]!r} {failed[1].name.lower()}" + (f" (not run: {', '.join(not_run)})" if not_run else "")
    log.error(what)
    return rows, f"{what}: {err}", str(err).splitlines()[-15:]


# ----------------------------------------------------------------------------------------------------------------
# metrics -> artifacts
# ----------------------------------------------------------------------------------------------------------------
def _scalar(v: Any) -> bool:
    return isinstance(v, (str, bool)) or (isinstance(v, (int, float)) and math.isfinite(v))


def read_metric_rows(metrics_dir: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(evaluation rows, one per `eval_<run>.json`: average EM/F1/cover-EM and EM per dataset; training rows,
    one per `train_<estimator>.json`: its scalar summary; problems with files that could not be read)."""
    eval_rows: list[dict] = []
    train_rows: list[dict] = []
    problems: list[str] = []
    for path in sorted(metrics_dir.glob("eval_*.json")):
        try:  # the DVC metric: average em/f1/cover_em and the EM of each dataset under its name
            m = json.loads(path.read_text(encoding="utf-8"))
            if "em" not in m:
                raise KeyError("em")
            row: dict[str, Any] = {"run": path.stem[len("eval_"):]}
            row.update({f"avg_{k}": m[k] for k in ("em", "f1", "cover_em") if k in m})
            row.update({f"em_{name}": v for name, v in m.items() if name not in ("em", "f1", "cover_em")
                        and _scalar(v)})
            eval_rows.append(row)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{path.name}: not an evaluation metrics file ({type(err).__name__}: {err})")
    for path in sorted(metrics_dir.glob("train_*.json")):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(m, dict):
                raise TypeError(f"a JSON object expected, got {type(m).__name__}")
            train_rows.append({"estimator": m.get("estimator", path.stem[len("train_"):]),
                               **{k: v for k, v in m.items() if k != "estimator" and _scalar(v)}})
        except (OSError, ValueError, TypeError) as err:
            problems.append(f"{path.name}: not a training summary ({type(err).__name__}: {err})")
    return eval_rows, train_rows, problems


def git_head(project_dir: Path) -> str | None:
    """The commit the run started from (lineage: dvc.lock and the code at that commit), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_dir, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def metrics_dir_of(project_dir: Path) -> Path:
    """`paths.metrics_dir` of the project's params.yaml (after the run: an experiment may have changed it)."""
    path = Path(load_params(project_dir / "params.yaml").paths.metrics_dir)
    return path if path.is_absolute() else project_dir / path


def plan(options: PipelineOptions, project: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(the stages to run in DAG order, each stage's upstream stages) of `options.targets` in `project`."""
    from dvc.exceptions import DvcException

    from flows.tracking import dvc_stages

    if not (project / "dvc.yaml").is_file():
        raise PipelineError(f"{project} is not this project's DVC checkout (no dvc.yaml); set `project_dir`")
    try:
        graph = {name: s["upstream"] for name, s in dvc_stages(project).items()}
    except DvcException as err:
        raise PipelineError(f"cannot read the DVC pipeline of {project}: {err}") from None
    return stage_order(graph, options.targets), graph


@flow(name="pipeline")
def pipeline(options: PipelineOptions = PipelineOptions()) -> dict[str, Any]:
    """Run the DVC pipeline (`dvc repro`: a task per stage; or `dvc exp run -S ...`) and publish its metrics as
    artifacts."""
    log = get_run_logger()
    project = options.resolved_project_dir()
    cmd = dvc_command(options)
    shown = " ".join(cmd)
    head = git_head(project)
    order, graph = plan(options, project) if options.mode == "repro" else ([], {})
    if order:
        log.info("stages in DAG order: %s (one task each: `%s`)", ", ".join(order),
                 " ".join(stage_command("STAGE", options.force)))
    resolved = resolve_params_file(options, log.info)
    start = time.monotonic()
    if options.mode == "repro":
        rows, failure, tail = run_stages(options, project, order, graph, log)
    else:
        rows, failure = [], None
        tail = run_dvc.with_options(task_run_name=" ".join(cmd[:3]))(cmd, str(project))["tail"]
    seconds = round(time.monotonic() - start, 1)
    summary: dict[str, Any] = {"command": shown, "project_dir": str(project), "git_head": head, "seconds": seconds,
                               "queued": options.queue, "stages": rows}
    how = " as one task per stage in DAG order (`dvc repro --single-item STAGE`)" if options.mode == "repro" else ""
    notes = [f"`{shown}` in `{project}` (git HEAD `{head}`){how}: "
             + (f"failed after {seconds} s" if failure else f"exit code 0, {seconds} s")]
    if rows:
        notes.append(markdown_table(rows))
    if resolved is not None:
        summary["params_file"] = options.params_file
        notes.append(f"Params: `{options.params_file}`, fully resolved into `{resolved}` before DVC ran.")
    if failure:
        create_markdown_artifact(key="pipeline-run", description="What the pipeline flow ran",
                                 markdown="# DVC run\n\n" + "\n\n".join([*notes, failure.splitlines()[0]])
                                 + "\n\nLast lines of DVC's output:\n\n```\n" + "\n".join(tail) + "\n```\n")
        raise PipelineError(failure)
    if options.queue:
        notes.append("Queued only: run the queue with `dvc queue start`, follow it with `dvc queue status`, "
                     "compare with `dvc exp show`.")
        eval_rows, train_rows, problems = [], [], []
    else:
        eval_rows, train_rows, problems = read_metric_rows(metrics_dir_of(project))
        for p in problems:
            log.warning("metrics skipped: %s", p)
        notes.append(f"Metrics in the workspace: {len(eval_rows)} evaluation file(s), {len(train_rows)} training "
                     "summary file(s) (a stage that did not run keeps those of its last run)."
                     + (" Skipped: " + "; ".join(problems) if problems else ""))
    tail = "\n".join(tail[-15:])
    create_markdown_artifact(key="pipeline-run", description="What the pipeline flow ran",
                             markdown="# DVC run\n\n" + "\n\n".join(notes)
                             + f"\n\nLast lines of DVC's output:\n\n```\n{tail}\n```\n")
    if eval_rows:
        publish("pipeline-eval", "Evaluation: average and per-dataset EM", eval_rows,
                notes="From `metrics/eval_<run>.json` (per-example rows under `artifacts/eval/<run>/`).")
    if train_rows:
        publish("pipeline-train", "RL training summaries", train_rows,
                notes="From `metrics/train_<estimator>.json` (last 20% of the steps; curves in "
                      "`metrics/train_<estimator>.jsonl`, `dvc plots show`).")
    summary.update(eval_runs=[r["run"] for r in eval_rows], train_runs=[r["estimator"] for r in train_rows],
                   skipped_metrics=problems)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI: python -m flows.pipeline [--mode exp --set key=value ...] [--target stage ...]
# ----------------------------------------------------------------------------------------------------------------
def _cli(params_path: str, mode: str, targets: list[str] | None, overrides: list[str] | None, queue: bool,
         name: str | None, force: bool, project_dir: str | None, params_file: str | None = None,
         retries: int = 0) -> dict[str, Any]:
    try:
        options = PipelineOptions(mode=mode, targets=targets or [], overrides=overrides or [], queue=queue,
                                  name=name, force=force, project_dir=project_dir,
                                  params_file=params_file, retries=retries)
    except ValidationError as err:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None
    project = options.resolved_project_dir()
    if Path(params_path).resolve() != (project / "params.yaml").resolve():
        raise ConfigError(f"--params {params_path}: the DVC stages always read {project / 'params.yaml'}; change "
                          "a setting for one run with --mode exp --set KEY=VALUE, or run another params file with "
                          "--params-file FILE (resolved into params.yaml first)")
    return pipeline(options)


if __name__ == "__main__":
    main(_cli, __doc__, {
        "--mode": {"choices": ["repro", "exp"], "default": "repro", "help": "dvc repro (default) or dvc exp run"},
        "--target": {"dest": "targets", "action": "append", "metavar": "STAGE",
                     "help": "stage to reproduce (repeatable; default: all)"},
        "--set": {"dest": "overrides", "action": "append", "metavar": "KEY=VALUE",
                  "help": "exp mode: params.yaml override, dvc exp run -S (repeatable)"},
        "--queue": {"action": "store_true", "help": "exp mode: queue only (dvc queue start runs the queue)"},
        "--name": {"default": None, "help": "exp mode: experiment name"},
        "--force": {"action": "store_true", "help": "run stages even when up to date"},
        "--retries": {"type": int, "default": 0, "help": "repro mode: retries of a failed stage (not for bad input)"},
        "--project-dir": {"default": None, "help": "the DVC project (default: this checkout)"},
        "--params-file": {"default": None, "help": "a params file (e.g. configs/tiny.yaml), resolved into the "
                          "project's params.yaml before DVC runs"},
    })
