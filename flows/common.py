"""Plumbing shared by the stage flows: CLI, params loading, resolved-config snapshots and Prefect artifacts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tspo_core.config import Params, check_rl_rollout, dump_params, load_params
from tspo_core.errors import ConfigError, TSPOError, cut
from tspo_core.io import check_disjoint, write_text
from tspo_core.layout import DETAIL_DIR, detail_path


def load(params_path: str | Path) -> Params:
    return load_params(params_path)


def save_resolved(params: Params, out_dir: str | Path) -> Path:
    """Every stage writes the resolved config beside its outputs (what produced this artifact)."""
    path = Path(out_dir) / "params.resolved.yaml"
    write_text(path, dump_params(params))
    return path


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def publish(key: str, title: str, rows: list[Mapping[str, Any]], notes: str = "") -> None:
    """A keyed markdown summary and a table artifact (keys: lowercase letters, digits and dashes)."""
    create_markdown_artifact(key=f"{key}-summary", markdown=f"# {title}\n\n{notes}\n\n{markdown_table(rows)}\n",
                             description=title)
    if rows:
        create_table_artifact(key=f"{key}-table", table=[dict(r) for r in rows], description=title)


def is_input_error(err: BaseException) -> bool:
    """Bad input or state (a `TSPOError`: params, data files, checkpoints): it fails the same on every try."""
    return isinstance(err, TSPOError)


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures (disk, network), never bad input (it fails the same)."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - anything but bad input may be transient
        return not is_input_error(err)
    return False


STAGES = ("data", "index", "sft", "train", "evaluate", "report")
"""The stage flows (their Prefect names), each with its inputs and outputs in `stage_paths`."""


def stage_paths(stage: str, params: Params, params_path: str | Path, options: Mapping[str, Any]
                ) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(inputs, outputs) of a stage as (params key or option, path) pairs: what it reads and what it replaces
    (a directory replaced whole is one output; files written into a shared directory such as `paths.metrics_dir`
    are outputs one by one)."""
    p = params.paths
    metrics = Path(p.metrics_dir)

    def local(label: str, value: str | None) -> list[tuple[str, Path]]:  # a hub name is not a local input
        return [(label, Path(value))] if value and Path(value).exists() else []

    inputs: list[tuple[str, Path]] = [("--params", Path(params_path))]
    retrieval = [("paths.index_dir", Path(p.index_dir)), *local("index.encoder", params.index.encoder)]
    if stage == "data":
        files = params.data.files
        if params.data.source == "files" and files is not None:
            inputs += [("data.files.corpus", Path(files.corpus))]
            inputs += [(f"data.files.train[{i}]", Path(f)) for i, f in enumerate(files.train)]
            inputs += [(f"data.files.{split}.{name}", Path(f)) for split, entries in
                       (("eval", files.eval), ("dev", files.dev)) for name, f in entries.items()]
        return inputs, [("paths.data_dir", Path(p.data_dir))]
    inputs += [("paths.data_dir", Path(p.data_dir))]
    if stage == "index":
        return (inputs + local("index.encoder", params.index.encoder),
                [("paths.index_dir", Path(p.index_dir)), ("paths.metrics_dir", metrics / "index.json"),
                 ("paths.metrics_dir", detail_path(metrics / "index.json"))])
    if stage == "sft":
        inputs += retrieval + local("model.name_or_path", params.model.name_or_path)
        inputs += [("sft.trajectories", Path(params.sft.trajectories))] if params.sft.trajectories else []
        return inputs, [("paths.sft_dir", Path(p.sft_dir))] + [
            ("paths.metrics_dir", metrics / name) for name in ("sft.json", "sft_curve.jsonl", "sft_curve.csv")] + [
            ("paths.metrics_dir", detail_path(metrics / "sft.json"))]
    if stage == "train":
        est = options.get("estimator") or "tspo"
        inputs += retrieval + [("paths.sft_dir", Path(p.sft_dir))]
        return inputs, [("paths.rl_dir", Path(p.rl_dir) / est)] + [
            ("paths.metrics_dir", metrics / f"train_{est}{ext}") for ext in (".jsonl", ".csv", ".json")] + [
            ("paths.metrics_dir", detail_path(metrics / f"train_{est}.json"))]
    if stage == "evaluate":
        from tspo_core.layout import checkpoint_for

        run = options.get("run") or "tspo"
        ckpt = options.get("checkpoint")
        if ckpt:
            inputs += local("--checkpoint", ckpt)
        else:
            inputs += [("paths.sft_dir" if run == "sft" else "paths.rl_dir", checkpoint_for(p, run))]
        return inputs + retrieval, [("paths.eval_dir", Path(p.eval_dir) / run),
                                    ("paths.metrics_dir", metrics / f"eval_{run}.json"),
                                    ("paths.metrics_dir", detail_path(metrics / f"eval_{run}.json"))]
    if stage == "report":
        from tspo_core.layout import FIGURES, REPORT_NAME

        read = sorted([*(metrics / DETAIL_DIR).glob("eval_*.json"), *metrics.glob("train_*.jsonl")])
        return ([inputs[0], *(("paths.metrics_dir", f) for f in read)],
                [("paths.report_dir", Path(p.report_dir) / name)
                 for name in (REPORT_NAME, "params.resolved.yaml", *FIGURES)])
    raise ValueError(f"unknown stage {stage!r}")


def check_inputs(params_path: str | Path, options: Mapping[str, Any], stage: str | None = None) -> Params:
    """What can be checked before a flow run starts: the params file, the CLI options that name registry entries
    (`--estimator`) or directories (`--run`), and (for one of `STAGES`) that the stage's outputs are disjoint from
    its inputs and from each other (`tspo_core.io.check_disjoint`). Raises `ConfigError` naming the file, key or option."""
    params = load_params(params_path)
    estimator = options.get("estimator")
    if estimator is not None:
        from tspo_core.agent.advantages import advantage_names

        if estimator not in advantage_names():
            raise ConfigError(f"--estimator {estimator!r}: unknown advantage estimator; known: {advantage_names()}")
    run = options.get("run")
    if run is not None:
        from tspo_core.layout import check_run_name

        check_run_name(run)
    if stage == "train":
        check_rl_rollout(params.rollout)
    if stage in STAGES:  # (the `pipeline` CLI runs DVC, which runs the stages: they check their own paths)
        check_disjoint(*stage_paths(stage, params, params_path, options))
    return params


def main(flow: Callable[..., Any], description: str, options: Mapping[str, dict] | None = None) -> None:
    """`python -m flows.<stage> --params params.yaml [--option value ...] [--debug]`. `options` maps extra flag
    names (e.g. "--estimator") to argparse keyword arguments; their values are passed to the flow as keyword
    arguments (dashes become underscores).

    The params file, the options and the stage's paths (outputs disjoint from inputs) are validated before the flow
    run starts (`check_inputs`), so a typo fails in about a second, with one line naming the key, instead of after
    the orchestrator has started. The library's INFO messages (`resumed from ... at step k`, `resuming, n of m
    examples already evaluated`, shards encoded) are shown: they say what a rerun after a crash did.

    Any failure ends with one `error: ...` line on stderr (`fail`): exit 2 for bad input (`TSPOError`), 1 for an
    internal error (its message names the file and line it was raised at and the log file holding the traceback).
    Tracebacks are kept off the console (Prefect's log lines included) unless `--debug` is given.

    After the flow returns, the stage is logged to W&B (`flows.tracking`: config, metrics, outputs as reference
    artifacts with lineage; a failed flow is logged as a failed run). Tracking never changes the exit status."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure (default: one "
                        "`error:` line; the traceback of an internal error goes to a log file)")
    for flag, kwargs in (options or {}).items():
        parser.add_argument(flag, **kwargs)
    args = vars(parser.parse_args())
    params_path = args.pop("params")
    debug = args.pop("debug")
    stage = getattr(flow, "name", None) or getattr(flow, "__name__", "")
    logging.getLogger("tspo_core").setLevel(logging.INFO)
    try:
        check_inputs(params_path, args, stage=stage)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        fail(err, stage, debug)
    if not debug:
        hide_console_tracebacks()
    try:
        from flows.subflow import run_stage_flow  # a subflow run of the pipeline task that started it, if any

        run_stage_flow(flow, {"params_path": params_path, **args})
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            _track(flow, params_path, args, failed=True)
        fail(err, stage, debug)
    _track(flow, params_path, args, failed=False)


def one_line(text: str, limit: int = 2000) -> str:
    """A message on one line: its lines joined with '; ' (a config error lists one invalid key per line), cut at
    `limit` characters."""
    return cut("; ".join(part.strip() for part in str(text).splitlines() if part.strip()), limit)


def log_dir() -> Path:
    """Where a failed stage CLI writes its traceback: `$TSPO_LOG_DIR`, else `<tmp>/tspo-logs` (never the working
    copy, whose files a failed stage leaves byte-identical)."""
    return Path(os.environ.get("TSPO_LOG_DIR") or Path(tempfile.gettempdir()) / "tspo-logs")


def fail(err: BaseException, stage: str, debug: bool = False) -> None:
    """End the CLI for `err` with one `error:` line: exit 2 for bad input (the message names the key, file or line),
    1 for an internal error (the message names where it was raised and the log file that holds the traceback),
    130 for Ctrl-C. A `SystemExit` (argparse's own exit 2) passes through."""
    if isinstance(err, SystemExit):
        raise err
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    text = "".join(traceback.format_exception(err))
    if debug:
        print(text, file=sys.stderr, end="")
    if is_input_error(err):
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    saved = ""
    try:
        path = log_dir() / f"{stage or 'stage'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        saved = f"; traceback in {path}"
    except OSError:
        saved = "; rerun with --debug for the traceback"
    print(f"error: internal error in stage {stage}: {one_line(f'{type(err).__name__}: {err}', 1000)}{where}"
          f"{saved}", file=sys.stderr)
    raise SystemExit(1) from None


class _NoTraceback(logging.Formatter):
    """Formats a record as `inner` does, without its traceback or stack (they go to Prefect's API log only)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_handlers() -> Iterator[logging.Handler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr,
                                                                                                 sys.stdout):
                yield handler


def hide_console_tracebacks() -> None:
    """Prefect logs a failed task or flow with its traceback on the console; keep the console to log lines (the
    CLI ends with one `error:` line), the API log keeps the traceback."""
    import prefect.main  # noqa: F401 - sets up Prefect's logging handlers, so they exist to be wrapped

    for handler in _console_handlers():
        if not isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(_NoTraceback(handler.formatter))


def _track(flow: Callable[..., Any], params_path: str, options: Mapping[str, Any], failed: bool) -> None:
    """W&B tracking of the stage run (`flows.tracking`); any failure there is a warning, never the stage's."""
    try:
        from flows import tracking

        name = getattr(flow, "name", None) or getattr(flow, "__name__", "")
        tracking.track_stage(name, params_path, options, failed=failed)
    except Exception as err:  # noqa: BLE001 - the stage's outputs are written; tracking must not fail it
        print(f"warning: W&B tracking: {type(err).__name__}: {err}", file=sys.stderr)
