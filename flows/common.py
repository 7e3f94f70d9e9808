"""Plumbing shared by the stage flows: CLI, params loading, resolved-config snapshots and Prefect artifacts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tspo_core.config import Params, dump_params, load_params
from tspo_core.errors import ConfigError, TSPOError
from tspo_core.io import write_text


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


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures (disk, network), never bad input (it fails the same)."""
    try:
        state.result()
    except TSPOError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


def check_inputs(params_path: str | Path, options: Mapping[str, Any]) -> Params:
    """What can be checked before a flow run starts: the params file and the CLI options that name registry entries
    (`--estimator`) or directories (`--run`). Raises `ConfigError` naming the file, key or option."""
    params = load_params(params_path)
    estimator = options.get("estimator")
    if estimator is not None:
        from tspo_core.agent.advantages import advantage_names

        if estimator not in advantage_names():
            raise ConfigError(f"--estimator {estimator!r}: unknown advantage estimator; known: {advantage_names()}")
    run = options.get("run")
    if run is not None:
        from tspo_core.evaluate import check_run_name

        check_run_name(run)
    return params


def main(flow: Callable[..., Any], description: str, options: Mapping[str, dict] | None = None) -> None:
    """`python -m flows.<stage> --params params.yaml [--option value ...]`: exits 2 with the error's message on bad
    input. `options` maps extra flag names (e.g. "--estimator") to argparse keyword arguments; their values are
    passed to the flow as keyword arguments (dashes become underscores).

    The params file and the options are validated before the flow run starts (`check_inputs`), so a typo fails in
    about a second, with one line naming the key, instead of after the orchestrator has started. The library's
    INFO messages (`resumed from ... at step k`, `resuming, n of m examples already evaluated`, shards encoded) are
    shown: they say what a rerun after a crash did.

    After the flow returns, the stage is logged to W&B (`flows.tracking`: config, metrics, outputs as reference
    artifacts with lineage; a failed flow is logged as a failed run). Tracking never changes the exit status."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for flag, kwargs in (options or {}).items():
        parser.add_argument(flag, **kwargs)
    args = vars(parser.parse_args())
    params_path = args.pop("params")
    logging.getLogger("tspo_core").setLevel(logging.INFO)
    try:
        check_inputs(params_path, args)
    except TSPOError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        flow(params_path=params_path, **args)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt) and not (isinstance(err, SystemExit) and not err.code):
            _track(flow, params_path, args, failed=True)
        if isinstance(err, TSPOError):
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    _track(flow, params_path, args, failed=False)


def _track(flow: Callable[..., Any], params_path: str, options: Mapping[str, Any], failed: bool) -> None:
    """W&B tracking of the stage run (`flows.tracking`); any failure there is a warning, never the stage's."""
    try:
        from flows import tracking

        name = getattr(flow, "name", None) or getattr(flow, "__name__", "")
        tracking.track_stage(name, params_path, options, failed=failed)
    except Exception as err:  # noqa: BLE001 - the stage's outputs are written; tracking must not fail it
        print(f"warning: W&B tracking: {type(err).__name__}: {err}", file=sys.stderr)
