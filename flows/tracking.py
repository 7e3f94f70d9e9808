"""W&B tracking of a finished stage: its config, metrics and outputs as artifacts, with data -> index -> sft -> rl ->
eval -> report lineage. Called once from `flows.common.main()` after the stage flow returns (or fails), so the stage
flows know nothing of W&B; `tspo_core` never imports wandb.

Which files a stage read and wrote is taken from the params file's `paths` section (what the stage actually used:
`configs/tiny.yaml` may point elsewhere than dvc.yaml's literal paths), through the explicit table in
`stage_io()`. dvc.yaml is read with PyYAML only to cross-check that table (`dvc_stages()`, `cross_check()`; the
tests run it against every stage). Artifacts are W&B *reference* artifacts (`file://` URIs, nothing is copied):
an input is declared as a draft artifact holding the same references, so W&B resolves it by content digest to the
version the upstream stage logged.

Modes: env `WANDB_MODE` wins when set, else `tracking.wandb_mode`. `online` without an API key, or an online init
that fails within `tracking.timeout_s`, falls back to `offline` with a warning. Any W&B failure is a warning: the
stage's outputs are already written, so tracking never fails a stage.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml


CHECKSUM_MAX_BYTES = 1 << 30
"""Reference artifacts up to this size are content-hashed by W&B (each file read once, never copied); above it
(paper-scale indexes and models) the references are path-only and a small fingerprint file (relative path, size,
mtime of every file) added to the artifact makes its digest change when the files do."""

DEFAULT_EVAL_RUNS = ("sft", "grpo", "tspo")
DEFAULT_ESTIMATORS = ("grpo", "tspo")


@dataclass(frozen=True)
class ArtifactSpec:
    """One W&B artifact: a stable name, a type, and the project-relative files/directories it references (the
    name each has inside the artifact is its path)."""

    name: str
    type: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class StageIO:
    stage: str
    inputs: tuple[ArtifactSpec, ...]
    outputs: tuple[ArtifactSpec, ...]
    metrics: tuple[str, ...] = ()
    """JSON files logged as the run summary (the full records under `<metrics_dir>/detail/`)."""
    history: str | None = None
    """JSON-lines per-step history logged with `wandb.log(record, step=record["step"])`."""


# ----------------------------------------------------------------------------------------------------------------
# stage names and the artifact table (pure functions)
# ----------------------------------------------------------------------------------------------------------------
def stage_name(flow_name: str, options: Mapping[str, Any]) -> str | None:
    """The DVC stage a flow run is: `train` + estimator -> `train@tspo`, `evaluate` + run -> `evaluate@sft`;
    None for flows that are not a stage (the `pipeline` flow)."""
    base = flow_name.removesuffix("_flow")
    if base in ("data", "index", "sft", "report"):
        return base
    if base == "train":
        return f"train@{options.get('estimator') or 'tspo'}"
    if base == "evaluate":
        return f"evaluate@{options.get('run') or 'tspo'}"
    return None


def _join(*parts: str) -> str:
    return Path(*parts).as_posix()


def data_artifact(p: Any) -> ArtifactSpec:
    return ArtifactSpec("tspo-data", "dataset", (p.data_dir,))


def index_artifact(p: Any) -> ArtifactSpec:
    return ArtifactSpec("tspo-index", "index", (p.index_dir,))


def sft_artifact(p: Any) -> ArtifactSpec:
    return ArtifactSpec("tspo-sft", "model", (p.sft_dir,))


def rl_artifact(p: Any, estimator: str) -> ArtifactSpec:
    return ArtifactSpec(f"tspo-rl-{estimator}", "model", (_join(p.rl_dir, estimator),))


def history_artifact(p: Any, estimator: str) -> ArtifactSpec:
    return ArtifactSpec(f"tspo-history-{estimator}", "history", (_join(p.metrics_dir, f"train_{estimator}.jsonl"),))


def _detail(p: Any, name: str) -> str:
    """`detail/<name>` of the metrics dir: the full record beside a declared metric (`tspo_core.layout`)."""
    return _join(p.metrics_dir, "detail", name)


def eval_artifact(p: Any, run: str) -> ArtifactSpec:
    return ArtifactSpec(f"tspo-eval-{run}", "eval", (_join(p.eval_dir, run), _join(p.metrics_dir, f"eval_{run}.json"),
                                                     _detail(p, f"eval_{run}.json")))


def model_artifact(p: Any, run: str) -> ArtifactSpec:
    """The checkpoint `evaluate@<run>` reads (the same rule as `tspo_core.evaluate.checkpoint_for`)."""
    return sft_artifact(p) if run == "sft" else rl_artifact(p, run)


def stage_io(stage: str, paths: Any, eval_runs: Iterable[str] = DEFAULT_EVAL_RUNS,
             estimators: Iterable[str] = DEFAULT_ESTIMATORS, checkpoint: str | None = None) -> StageIO:
    """Inputs, outputs, metrics and history of a stage, from `params.paths` (`paths`). `eval_runs`/`estimators`:
    what the report read; `checkpoint`: `evaluate --checkpoint DIR` (a model outside the pipeline)."""
    p = paths
    base, _, item = stage.partition("@")
    m = p.metrics_dir
    if base == "data":
        return StageIO(stage, (), (data_artifact(p),))
    if base == "index":
        return StageIO(stage, (data_artifact(p),), (index_artifact(p),), (_detail(p, "index.json"),))
    if base == "sft":
        return StageIO(stage, (data_artifact(p), index_artifact(p)), (sft_artifact(p),), (_detail(p, "sft.json"),),
                       _join(m, "sft_curve.jsonl"))
    if base == "train" and item:
        return StageIO(stage, (data_artifact(p), index_artifact(p), sft_artifact(p)),
                       (rl_artifact(p, item), history_artifact(p, item)), (_detail(p, f"train_{item}.json"),),
                       _join(m, f"train_{item}.jsonl"))
    if base == "evaluate" and item:
        model = (ArtifactSpec(f"tspo-checkpoint-{item}", "model", (checkpoint,)) if checkpoint
                 else model_artifact(p, item))
        return StageIO(stage, (data_artifact(p), index_artifact(p), model), (eval_artifact(p, item),),
                       (_detail(p, f"eval_{item}.json"),))
    if base == "report":
        inputs = tuple(eval_artifact(p, r) for r in eval_runs) + tuple(history_artifact(p, e) for e in estimators)
        return StageIO(stage, inputs, (ArtifactSpec("tspo-report", "report", (p.report_dir,)),))
    raise ValueError(f"unknown stage {stage!r}")


def report_inputs_present(paths: Any, root: Path) -> tuple[list[str], list[str]]:
    """The eval runs and training histories the report stage read (whatever exists, as `tspo_core.report` does)."""
    metrics = root / paths.metrics_dir
    runs = sorted(f.stem.removeprefix("eval_") for f in metrics.glob("eval_*.json"))
    estimators = sorted(f.stem.removeprefix("train_") for f in metrics.glob("train_*.jsonl"))
    return runs or list(DEFAULT_EVAL_RUNS), estimators or list(DEFAULT_ESTIMATORS)


# ----------------------------------------------------------------------------------------------------------------
# dvc.yaml, read with PyYAML (no dvc import): used to cross-check the table above
# ----------------------------------------------------------------------------------------------------------------
def _subst(value: Any, item: Any, key: Any) -> Any:
    if isinstance(value, str):
        if isinstance(item, Mapping):
            for k, v in item.items():
                value = value.replace(f"${{item.{k}}}", str(v))
        if not isinstance(item, Mapping):
            value = value.replace("${item}", str(item))
        return value.replace("${key}", str(key))
    if isinstance(value, list):
        return [_subst(v, item, key) for v in value]
    if isinstance(value, Mapping):
        return {_subst(k, item, key): _subst(v, item, key) for k, v in value.items()}
    return value


def _entry_paths(entries: Any) -> list[str]:
    """`- path` or `- path: {options}` -> the paths."""
    out = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def dvc_stages(dvc_yaml: str | Path) -> dict[str, dict[str, list[str]]]:
    """Every stage of dvc.yaml, `foreach`/`do` expanded (`${item}`, `${key}`, `${item.<field>}`), as
    {stage: {"deps", "outs", "metrics", "plots"}} of project-relative paths."""
    doc = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    stages: dict[str, dict[str, list[str]]] = {}
    for name, body in (doc.get("stages") or {}).items():
        if "foreach" in body:
            fe = body["foreach"]
            pairs = fe.items() if isinstance(fe, Mapping) else ((v, v) for v in fe)
            expanded = {f"{name}@{k}": _subst(body["do"], item, k) for k, item in pairs}
        else:
            expanded = {name: body}
        for sname, sbody in expanded.items():
            stages[sname] = {f: _entry_paths(sbody.get(f)) for f in ("deps", "outs", "metrics", "plots")}
    return stages


def _covered(path: str, by: Iterable[str]) -> bool:
    """True when `path` is one of `by` or inside one of them (or contains one: a directory output)."""
    p = Path(path)
    return any(p == Path(b) or Path(b) in p.parents or p in Path(b).parents for b in by)


def cross_check(stage: str, io: StageIO, dvc: Mapping[str, Mapping[str, list[str]]]) -> list[str]:
    """Disagreements between the artifact table and dvc.yaml for `stage` (meaningful when params.paths are the
    literal paths of dvc.yaml): every output path is a declared out/metric/plot, every input artifact a dep."""
    if stage not in dvc:
        return [f"{stage}: not a dvc.yaml stage"]
    s = dvc[stage]
    outs = s["outs"] + s["metrics"] + s["plots"]
    problems = [f"{stage}: output {p} ({a.name}) is not declared in dvc.yaml"
                for a in io.outputs for p in a.paths if not _covered(p, outs)]
    # an input artifact is used as a whole: one of its paths must be (in, or around) a dep (the report reads only
    # the metrics file of `tspo-eval-<run>`, train@ only data/rl_train.jsonl of `tspo-data`)
    problems += [f"{stage}: input {a.name} ({list(a.paths)}) is not a dvc.yaml dep" for a in io.inputs
                 if not any(_covered(p, s["deps"]) for p in a.paths)]
    return problems


# ----------------------------------------------------------------------------------------------------------------
# mode resolution
# ----------------------------------------------------------------------------------------------------------------
_ENV_MODES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online",
              "disabled": "disabled"}


def resolve_mode(config_mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """Env `WANDB_MODE` (or `WANDB_DISABLED=true`) wins over `tracking.wandb_mode`."""
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env = environ.get("WANDB_MODE", "").strip().lower()
    return _ENV_MODES.get(env, config_mode)


def has_api_key(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# the W&B side
# ----------------------------------------------------------------------------------------------------------------
def warn(message: str) -> None:
    print(f"warning: W&B tracking: {message}", file=sys.stderr)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def entry_name(path: str, root: Path) -> str:
    """The name a referenced path has inside its artifact. W&B accepts only relative names without `..`
    (`Invalid artifact path` otherwise): a project-relative path keeps its spelling; an absolute path, or one that
    leaves the project, is named after where it resolves to: relative to the project when inside it, else under
    `external/` (`/models/x` -> `external/models/x`)."""
    pure = Path(path)
    if not pure.is_absolute() and ".." not in pure.parts:
        return pure.as_posix()
    resolved = (root / pure).resolve()
    base = root.resolve()
    if resolved.is_relative_to(base) and resolved != base:
        return resolved.relative_to(base).as_posix()
    return "external/" + resolved.relative_to(resolved.anchor).as_posix()


def sync_command(sync_dir: str | Path) -> str:
    """The command that uploads an offline run (wandb >= 0.30: `wandb sync PATH`; `--sync-all` was removed)."""
    return f"wandb sync {sync_dir}"


def build_artifact(wandb: Any, spec: ArtifactSpec, root: Path, stage: str) -> Any | None:
    """A reference artifact for `spec` (None, with a warning, when none of its paths exists)."""
    present = [(entry_name(rel, root), (root / rel).resolve()) for rel in spec.paths if (root / rel).exists()]
    if not present:
        warn(f"{stage}: {spec.name}: none of {list(spec.paths)} exists; not tracked")
        return None
    files = [(rel, f) for rel, p in present for f in _files(p)]
    size = sum(f.stat().st_size for _, f in files)
    checksum = size <= CHECKSUM_MAX_BYTES
    art = wandb.Artifact(spec.name, type=spec.type,
                         metadata={"paths": [rel for rel, _ in present], "files": len(files), "bytes": size,
                                   "content_checksum": checksum})
    for rel, p in present:
        art.add_reference(p.as_uri(), name=rel, checksum=checksum)
    if not checksum:  # path-only references: the fingerprint makes the digest follow the files
        rows = [[f.relative_to(root.resolve()).as_posix() if f.is_relative_to(root.resolve()) else str(f),
                 (st := f.stat()).st_size, st.st_mtime_ns] for _, f in files]
        with art.new_file("tspo_fingerprint.json") as fh:
            json.dump(rows, fh)
    return art


def _scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, bool | int | float) and not (isinstance(v, float) and not math.isfinite(v)):
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _log_history(run: Any, path: Path) -> int:
    from tspo_core.report import read_history  # the report's reader: blank and torn last lines handled

    last = -1
    n = 0
    for rec in read_history(path):
        step = rec.get("step")
        if not isinstance(step, int) or step <= last:
            continue
        run.log(_scalars(rec), step=step)
        last, n = step, n + 1
    return n


def _eval_table(wandb: Any, metrics: Mapping[str, Any]) -> Any:
    datasets = dict(metrics.get("datasets") or {})
    if isinstance(metrics.get("average"), Mapping):
        datasets["average"] = metrics["average"]
    cols: list[str] = []
    for m in datasets.values():
        cols += [k for k, v in m.items() if k not in cols and isinstance(v, bool | int | float)]
    return wandb.Table(columns=["dataset", *cols],
                       data=[[name, *(m.get(c) for c in cols)] for name, m in datasets.items()])


def _init(wandb: Any, mode: str, tracking: Any, stage: str, config: dict, wandb_dir: Path) -> Any:
    settings = wandb.Settings(init_timeout=float(tracking.timeout_s), console="off", x_disable_stats=True,
                              disable_job_creation=True, silent=True)
    kwargs = dict(project=tracking.project, job_type=stage.partition("@")[0], name=stage, config=config,
                  dir=str(wandb_dir), reinit="create_new", settings=settings)
    if mode == "online":
        if not has_api_key():
            warn("online mode but no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
            mode = "offline"
        else:
            try:
                return wandb.init(mode="online", **kwargs)
            except Exception as err:  # noqa: BLE001 - no network, bad key, timeout: fall back
                warn(f"online init failed within {tracking.timeout_s:g} s ({type(err).__name__}: {err}); "
                     "logging offline instead")
                mode = "offline"
    return wandb.init(mode=mode, **kwargs)


def _use(run: Any, art: Any) -> None:
    if run.settings._offline:
        # `Run.use_artifact` refuses offline runs; the draft is recorded with use-after-commit, which `wandb sync`
        # replays as a use edge (the same path `use_artifact` takes online for a draft artifact).
        run._log_artifact(art, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(art)


def track_stage(flow_name: str, params_path: str | Path, options: Mapping[str, Any], *, failed: bool = False,
                root: Path | None = None) -> Any | None:
    """Log a stage run to W&B (never raises). Returns the finished run, or None when nothing was logged."""
    try:
        from tspo_core.config import load_params

        stage = stage_name(flow_name, options)
        if stage is None or not _is_rank0():
            return None
        params = load_params(params_path)
        mode = resolve_mode(params.tracking.wandb_mode)
        if mode == "disabled":
            return None
        root = Path(root or Path.cwd())
        return _track(stage, params, options, mode, root, failed, str(params_path))
    except Exception as err:  # noqa: BLE001 - tracking never fails a stage
        warn(f"{flow_name}: tracking failed ({type(err).__name__}: {err}); the stage's outputs are written")
        return None


def _track(stage: str, params: Any, options: Mapping[str, Any], mode: str, root: Path, failed: bool,
           params_path: str) -> Any:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    if os.environ.get("WANDB_MODE", "").strip().lower() not in _ENV_MODES and "WANDB_MODE" in os.environ:
        warn(f"ignoring WANDB_MODE={os.environ.pop('WANDB_MODE')!r} (not a W&B mode)")
    p = params.paths
    runs, estimators = report_inputs_present(p, root) if stage == "report" else (DEFAULT_EVAL_RUNS, DEFAULT_ESTIMATORS)
    io = stage_io(stage, p, runs, estimators, checkpoint=options.get("checkpoint"))
    config = {**params.model_dump(mode="json"), "stage": stage, "params_file": params_path,
              "options": {k: v for k, v in options.items() if v is not None}}
    wandb_dir = Path(os.environ.get("WANDB_DIR") or root)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = _init(wandb, mode, params.tracking, stage, config, wandb_dir)
    failures: list[str] = []

    def attempt(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            failures.append(what)
            warn(f"{stage}: {what} failed ({type(err).__name__}: {err})")
            return None

    try:
        dvc_yaml = root / "dvc.yaml"
        if dvc_yaml.is_file() and stage in (stages := dvc_stages(dvc_yaml)):
            run.config.update({"dvc_stage": stage}, allow_val_change=True)
            for problem in cross_check(stage, io, stages):
                print(f"note: W&B tracking: {problem} (params paths differ from dvc.yaml?)", file=sys.stderr)
        for spec in io.inputs:
            art = attempt(f"input artifact {spec.name}", build_artifact, wandb, spec, root, stage)
            if art is not None:
                attempt(f"use_artifact {spec.name}", _use, run, art)
        if failed:
            run.summary["stage_status"] = "failed"
            return run
        metrics: dict[str, Any] = {}  # each metrics file read once, for the summary and the eval table

        def summarize(path: str) -> None:
            metrics[path] = _read_json(root / path)
            run.summary.update({"metrics": metrics[path]})

        for path in io.metrics:
            if (root / path).is_file():
                attempt(f"summary from {path}", summarize, path)
        if io.history and (root / io.history).is_file():
            attempt(f"history from {io.history}", _log_history, run, root / io.history)
        if stage.startswith("evaluate@") and io.metrics and io.metrics[0] in metrics:
            attempt("eval table", lambda: run.log({"eval/per_dataset": _eval_table(wandb, metrics[io.metrics[0]])}))
        if stage == "report":
            images = {f"report/{f.stem}": wandb.Image(str(f)) for f in sorted((root / p.report_dir).glob("*.png"))}
            if images:
                attempt("report images", run.log, images)
        for spec in io.outputs:
            art = attempt(f"output artifact {spec.name}", build_artifact, wandb, spec, root, stage)
            if art is not None:
                attempt(f"log_artifact {spec.name}", run.log_artifact, art)
        run.summary["stage_status"] = "ok" if not failures else "ok (tracking incomplete)"
    finally:
        offline = run.settings._offline
        sync_dir = run.settings.sync_dir
        run.finish(exit_code=1 if failed else 0)
        if offline:
            print(f"W&B: offline run of {stage} saved in {sync_dir}; upload it with `{sync_command(sync_dir)}` "
                  f"(every offline run not yet uploaded: `{sync_command(wandb_dir / 'wandb')}`)", file=sys.stderr)
    return run

