"""Stage `report`: the SFT / GRPO / TSPO comparison (seven-dataset EM table, secondary metrics, training curves).

Reads `<paths.metrics_dir>/detail/eval_<run>.json` and `<paths.metrics_dir>/train_<estimator>.jsonl`; writes
`<paths.report_dir>/report.md` and its PNG figures; publishes the report as a markdown artifact.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import load, main, retry_unless_bad_input, save_resolved
from tspo_core.errors import DataError
from tspo_core.report import build_report, read_eval_metrics, read_histories


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def read_inputs(params_path: str) -> tuple[dict, dict]:
    metrics_dir = Path(load(params_path).paths.metrics_dir)
    evals = read_eval_metrics(metrics_dir)
    if not evals:
        raise DataError("no evaluation metrics (detail/eval_<run>.json): run the evaluate stage first",
                        str(metrics_dir))
    return evals, read_histories(metrics_dir)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def write_report(params_path: str, evals: dict, histories: dict) -> str:
    params = load(params_path)
    path = build_report(evals, histories, Path(params.paths.report_dir))
    save_resolved(params, params.paths.report_dir)
    return str(path)


@flow(name="report")
def report_flow(params_path: str = "params.yaml") -> str:
    evals, histories = read_inputs(params_path)
    path = write_report(params_path, evals, histories)
    text = Path(path).read_text(encoding="utf-8")
    create_markdown_artifact(key="report", markdown=text,
                             description=f"TSPO vs GRPO report ({path}; figures beside it)")
    return path


if __name__ == "__main__":
    main(report_flow, __doc__)
