"""W&B tracking of a finished stage: its config, metrics and outputs as artifacts, with data -> index -> sft -> rl ->
eval -> report lineage. Called from `flows.common.main()` after the stage flow returns (or fails); `tspo_core` never
imports wandb. The stage graph (which stage a flow run is, what it reads and writes, `foreach` expanded) is DVC's:
`dvc_stages()` reads dvc.yaml through `dvc.repo.Repo(...).index` (the workspace's, else this checkout's). Its paths
are moved to the params file's `paths` (`configs/tiny.yaml` may point elsewhere) and grouped into named artifacts
by `ARTIFACTS`. Artifacts are *reference* artifacts (`file://` URIs, nothing copied); an input is a draft holding
the upstream output's references, so W&B resolves it by content digest to the version that stage logged.
Mode: env `WANDB_MODE`, else `tracking.wandb_mode`; `online` without a key, or whose init fails within
`tracking.timeout_s`, falls back to `offline`. Any W&B failure is a warning: tracking never fails a stage."""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHECKOUT = Path(__file__).resolve().parents[1]
CHECKSUM_MAX_BYTES = 1 << 30  # above: path-only references plus a fingerprint file (path, size, mtime per file)
ARTIFACTS = (  # (paths field, what follows it: regex whose match is referenced, artifact name, type); first wins
    ("data_dir", "", "tspo-data", "dataset"), ("index_dir", "", "tspo-index", "index"), ("sft_dir", "", "tspo-sft",
    "model"), ("rl_dir", "/([^/]+)", "tspo-rl-{}", "model"), ("eval_dir", "/([^/]+)", "tspo-eval-{}", "eval"),
    ("metrics_dir", r"/(?:detail/)?eval_(.+)\.json", "tspo-eval-{}", "eval"),
    ("metrics_dir", r"/train_(.+)\.jsonl", "tspo-history-{}", "history"), ("report_dir", "", "tspo-report", "report"))
_ENV_MODES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online", "disabled": "disabled"}


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    type: str
    paths: tuple[str, ...]  # project-relative files/directories (or absolute), each named by its path


@dataclass(frozen=True)
class StageIO:
    stage: str
    inputs: tuple[ArtifactSpec, ...]
    outputs: tuple[ArtifactSpec, ...]
    metrics: tuple[str, ...] = ()  # JSON logged as the run summary (the full record under `detail/` when declared)
    history: str | None = None  # JSON lines logged with `wandb.log(record, step=record["step"])`
    images: tuple[str, ...] = ()


def dvc_stages(root: str | Path = CHECKOUT) -> dict[str, dict[str, Any]]:
    """Every stage of the DVC project at `root` as DVC expands it, in dvc.yaml's order: {`train@tspo`: {cmd, deps,
    outs (neither metrics nor plots), metrics, plots, upstream (the stages it depends on: DVC's graph, `dvc dag`)}}
    with dvc.yaml's paths."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to each stage whose outputs it depends on
        return {s.name: {"cmd": s.cmd, "deps": [d.def_path for d in s.deps],
                               "outs": [o.def_path for o in s.outs if not (o.metric or o.plot)],
                               "metrics": [o.def_path for o in s.outs if o.metric],
                               "plots": [o.def_path for o in s.outs if o.plot],
                               "upstream": [u.name for u in graph.successors(s)]} for s in repo.index.stages}


def stage_name(flow: str, options: Mapping[str, Any], stages: Mapping[str, Any] | None = None) -> str | None:
    """The stage whose command runs `flows.<flow>` with these options (`train`, estimator grpo -> `train@grpo`); one
    no stage names (`evaluate --run mine`) -> `evaluate@mine`; None when no stage runs the flow."""
    found = []
    for name, s in (dvc_stages() if stages is None else stages).items():
        argv = shlex.split(s["cmd"])
        if f"flows.{flow.removesuffix('_flow')}" in argv:
            flags = {a[2:].replace("-", "_"): v for a, v in zip(argv, argv[1:]) if a[:2] == "--" and a != "--params"}
            if all(str(options.get(k)) == v for k, v in flags.items()):
                return name
            found.append(f"{name.partition('@')[0]}@{next((options.get(k) for k in flags), None)}")
    return found[0] if found else None


def _specs(paths: list[str], defaults: Any) -> dict[str, ArtifactSpec]:
    """dvc.yaml paths (at the default `paths`) grouped into artifacts by `ARTIFACTS`; other paths are left out."""
    specs: dict[str, ArtifactSpec] = {}
    for p in paths:
        for field, pattern, name, kind in ARTIFACTS:
            if (m := re.match(re.escape(getattr(defaults, field)) + pattern, p)) and p[m.end():m.end() + 1] in "/":
                old = specs.get(n := name.format(*m.groups()), ArtifactSpec(n, kind, ()))
                specs[n] = ArtifactSpec(n, kind, old.paths + (m[0],) * (m[0] not in old.paths))
                break
    return specs


def stage_io(stage: str, paths: Any, stages: Mapping[str, Any] | None = None, checkpoint: str | None = None) -> StageIO:
    """Inputs, outputs, summary metrics, history and images of `stage` from the DVC graph, at `paths` (params)."""
    defaults, stages = type(paths)(), dvc_stages() if stages is None else stages
    base, _, item = stage.partition("@")
    like = stage if stage in stages else ([s for s in stages if s.partition("@")[0] == base and item] or [None])[-1]
    if like is None:
        raise ValueError(f"unknown stage {stage!r}")
    was = like.partition("@")[2]  # `evaluate@mine` read off `evaluate@tspo`: tspo -> mine in its paths
    own = (lambda p: re.sub(rf"(?<=[/_]){re.escape(was)}(?=$|[/.])", item, p)) if was != item else (lambda p: p)
    s = {k: [own(p) for p in v] for k, v in stages[like].items() if k not in ("cmd", "upstream")}
    outs = s["outs"] + s["metrics"] + s["plots"]
    made = {n: a for st in stages.values() for n, a in _specs(st["outs"] + st["metrics"], defaults).items()}
    inputs = [made.get(n, a) for n, a in _specs(s["deps"], defaults).items()]
    fields = sorted(type(paths).model_fields, key=lambda f: -len(getattr(defaults, f)))

    def at(ps: Any) -> tuple[str, ...]:  # dvc.yaml's path under a default `paths` dir -> the same under `paths`
        return tuple(next((getattr(paths, f) + p[len(d):] for f in fields if (d := getattr(defaults, f)) == p
                           or p.startswith(d + "/")), p) for p in ps)

    arts = lambda specs: tuple(ArtifactSpec(a.name, a.type, at(a.paths)) for a in specs)  # noqa: E731
    if checkpoint:  # `evaluate --checkpoint DIR`: a model from outside the pipeline
        inputs = [ArtifactSpec(f"tspo-checkpoint-{item}", "model", (checkpoint,)) if a.type == "model" else a
                  for a in inputs]
    metrics = [d if (d := re.sub(r"([^/]+)$", r"detail/\1", m)) in outs else m for m in s["metrics"]]
    return StageIO(stage, tuple(a if a.name.startswith("tspo-checkpoint-") else arts([a])[0] for a in inputs),
                   arts(_specs(outs, defaults).values()), at(metrics),
                   next(iter(at(p for p in outs if p.endswith(".jsonl"))), None),
                   at(p for p in outs if p.endswith(".png")))


def resolve_mode(config_mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """Env `WANDB_MODE` (or `WANDB_DISABLED=true`) wins over `tracking.wandb_mode`."""
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return _ENV_MODES.get(environ.get("WANDB_MODE", "").strip().lower(), config_mode)


def has_api_key(environ: Mapping[str, str] = os.environ) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return bool(environ.get("WANDB_API_KEY")) or netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def warn(message: str) -> None:
    print(f"warning: W&B tracking: {message}", file=sys.stderr)


def entry_name(path: str, root: Path) -> str:
    """A referenced path's name in its artifact: W&B accepts only relative names without `..` (`Invalid artifact
    path`): project-relative as written, else where it resolves (inside the project, or `external/<abs path>`)."""
    pure, base = Path(path), root.resolve()
    if not pure.is_absolute() and ".." not in pure.parts:
        return pure.as_posix()
    resolved = (root / pure).resolve()
    if resolved.is_relative_to(base) and resolved != base:
        return resolved.relative_to(base).as_posix()
    return "external/" + resolved.relative_to(resolved.anchor).as_posix()


def sync_command(sync_dir: str | Path) -> str:
    return f"wandb sync {sync_dir}"  # wandb >= 0.30: `--sync-all` was removed


def build_artifact(wandb: Any, spec: ArtifactSpec, root: Path, stage: str) -> Any | None:
    """A reference artifact for `spec` (None, with a warning, when none of its paths exists)."""
    present = [(entry_name(rel, root), (root / rel).resolve()) for rel in spec.paths if (root / rel).exists()]
    if not present:
        return warn(f"{stage}: {spec.name}: none of {list(spec.paths)} exists; not tracked")
    files = [f for _, p in present for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]
    size = sum(f.stat().st_size for f in files)
    checksum = size <= CHECKSUM_MAX_BYTES
    art = wandb.Artifact(spec.name, type=spec.type, metadata={"paths": [r for r, _ in present], "files": len(files),
                                                              "bytes": size, "content_checksum": checksum})
    for rel, p in present:
        art.add_reference(p.as_uri(), name=rel, checksum=checksum)
    if not checksum:  # path-only references: the fingerprint makes the digest follow the files
        with art.new_file("tspo_fingerprint.json") as fh:
            json.dump([[entry_name(str(f), root), f.stat().st_size, f.stat().st_mtime_ns] for f in files], fh)
    return art


def _scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, bool | int | float) and not (isinstance(v, float) and not math.isfinite(v)):
            out[f"{prefix}{k}"] = v
    return out


def _log_history(run: Any, path: Path) -> None:
    from tspo_core.report import read_history  # the report's reader: blank and torn last lines handled

    last = -1
    for rec in read_history(path):
        if isinstance(step := rec.get("step"), int) and step > last:
            run.log(_scalars(rec), step=step)
            last = step


def _eval_table(wandb: Any, metrics: Mapping[str, Any]) -> Any:
    datasets = {**(metrics.get("datasets") or {}), **({"average": metrics["average"]} if "average" in metrics else {})}
    cols = list(dict.fromkeys(k for m in datasets.values() for k, v in m.items() if isinstance(v, bool | int | float)))
    return wandb.Table(columns=["dataset", *cols], data=[[n, *(m.get(c) for c in cols)] for n, m in datasets.items()])


def _init(wandb: Any, mode: str, tracking: Any, stage: str, config: dict, wandb_dir: Path) -> Any:
    settings = wandb.Settings(init_timeout=float(tracking.timeout_s), console="off", x_disable_stats=True,
                              disable_job_creation=True, silent=True)
    kwargs = dict(project=tracking.project, job_type=stage.partition("@")[0], name=stage, config=config,
                  dir=str(wandb_dir), reinit="create_new", settings=settings)
    if mode == "online" and not has_api_key():
        warn("online mode but no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
    elif mode == "online":
        try:
            return wandb.init(mode="online", **kwargs)
        except Exception as err:  # noqa: BLE001 - no network, bad key, timeout: fall back
            warn(f"online init failed within {tracking.timeout_s:g} s ({type(err).__name__}: {err}); logging "
                 "offline instead")
    return wandb.init(mode="offline" if mode == "online" else mode, **kwargs)


def track_stage(flow_name: str, params_path: str | Path, options: Mapping[str, Any], *, failed: bool = False,
                root: Path | None = None) -> Any | None:
    """Log a stage run to W&B (never raises). Returns the finished run, or None when nothing was logged."""
    try:
        from tspo_core.config import load_params

        params = load_params(params_path)
        mode = resolve_mode(params.tracking.wandb_mode)
        if int(os.environ.get("RANK", "0") or 0) != 0 or mode == "disabled":
            return None
        root = Path(root or Path.cwd())
        stages = dvc_stages(root if (root / "dvc.yaml").is_file() else CHECKOUT)
        stage = stage_name(flow_name, options, stages)
        return _track(stage, params, options, mode, root, failed, str(params_path), stages) if stage else None
    except Exception as err:  # noqa: BLE001 - tracking never fails a stage
        return warn(f"{flow_name}: tracking failed ({type(err).__name__}: {err}); the stage's outputs are written")


def _track(stage: str, params: Any, options: Mapping[str, Any], mode: str, root: Path, failed: bool, params_path: str,
           stages: Mapping[str, Any]) -> Any:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    if "WANDB_MODE" in os.environ and os.environ["WANDB_MODE"].strip().lower() not in _ENV_MODES:
        warn(f"ignoring WANDB_MODE={os.environ.pop('WANDB_MODE')!r} (not a W&B mode)")
    io = stage_io(stage, params.paths, stages, checkpoint=options.get("checkpoint"))
    config = {**params.model_dump(mode="json"), "stage": stage, "params_file": params_path, "dvc_stage": stage
              in stages, "options": {k: v for k, v in options.items() if v is not None}}
    (wandb_dir := Path(os.environ.get("WANDB_DIR") or root)).mkdir(parents=True, exist_ok=True)
    run, failures = _init(wandb, mode, params.tracking, stage, config, wandb_dir), []

    def attempt(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            failures.append(what)
            warn(f"{stage}: {what} failed ({type(err).__name__}: {err})")

    try:
        for spec in io.inputs:  # offline, `use_artifact` refuses; a use-after-commit draft is what sync replays
            if (art := attempt(f"input artifact {spec.name}", build_artifact, wandb, spec, root, stage)) is not None:
                attempt(f"use_artifact {spec.name}", lambda: run._log_artifact(art, is_user_created=True,
                        use_after_commit=True) if run.settings._offline else run.use_artifact(art))
        if failed:
            run.summary["stage_status"] = "failed"
            return run
        for path in (p for p in io.metrics if (root / p).is_file()):
            if (m := attempt(f"summary from {path}", lambda: json.loads((root / path).read_text("utf-8")))):
                run.summary.update({"metrics": m})
                if isinstance(m.get("datasets"), Mapping):
                    attempt("eval table", lambda: run.log({"eval/per_dataset": _eval_table(wandb, m)}))
        if io.history and (root / io.history).is_file():
            attempt(f"history from {io.history}", _log_history, run, root / io.history)
        if images := {f"report/{Path(f).stem}": wandb.Image(str(root / f)) for f in io.images if (root / f).is_file()}:
            attempt("report images", run.log, images)
        for spec in io.outputs:
            if (art := attempt(f"output artifact {spec.name}", build_artifact, wandb, spec, root, stage)) is not None:
                attempt(f"log_artifact {spec.name}", run.log_artifact, art)
        run.summary["stage_status"] = "ok" if not failures else "ok (tracking incomplete)"
    finally:
        offline, sync_dir = run.settings._offline, run.settings.sync_dir
        run.finish(exit_code=1 if failed else 0)
        if offline:
            print(f"W&B: offline run of {stage} saved in {sync_dir}; upload it with `{sync_command(sync_dir)}` "
                  f"(every offline run not yet uploaded: `{sync_command(wandb_dir / 'wandb')}`)", file=sys.stderr)
    return run
