"""Stage `data`: generate the synthetic world (or import real files) into `paths.data_dir`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import load, main, publish, retry_unless_bad_input
from tspo_core.data.build import build_datasets


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def build(params_path: str) -> dict:
    params = load(params_path)
    return build_datasets(params.data, Path(params.paths.data_dir))


@flow(name="data")
def data_flow(params_path: str = "params.yaml") -> dict:
    summary = build(params_path)
    rows = [{"dataset": name, **counts} for name, counts in summary["datasets"].items()]
    publish("data", "Datasets", rows, notes=f"source: {summary['source']}, corpus: {summary['corpus']} passages, "
            f"RL train: {summary['rl_train']} questions")
    return summary


if __name__ == "__main__":
    main(data_flow, __doc__)
