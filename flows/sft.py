"""Stage `sft`: oracle trajectories through the real retriever, then SFT of the policy (the warmup for RL)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from tqdm import tqdm

from flows.common import load, main, publish
from tspo_core.io import write_csv, write_json, write_jsonl
from tspo_core.layout import detail_path
from tspo_core.train.sft import compact_summary, run_sft

SFT_CURVE_COLUMNS = ("step", "loss", "obs_loss", "token_acc", "lr")
"""Columns of `metrics/sft_curve.{jsonl,csv}` (obs_loss is empty/null when `sft.obs_loss_weight` is 0)."""


@task
def sft(params_path: str) -> dict:
    params = load(params_path)
    bar = tqdm(total=params.sft.max_steps, desc="sft", unit="step")

    def progress(rec: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['token_acc']:.2f}")

    try:
        return run_sft(params, progress=progress)
    finally:
        bar.close()


@flow(name="sft")
def sft_flow(params_path: str = "params.yaml") -> dict:
    result = sft(params_path)
    params = load(params_path)
    metrics_dir = Path(params.paths.metrics_dir)
    write_json(detail_path(metrics_dir / "sft.json"), result["summary"])  # timings and environment included
    write_json(metrics_dir / "sft.json", compact_summary(result["summary"]))
    curve = [{"step": h["step"], "loss": h["loss"], "obs_loss": h.get("obs_loss"), "token_acc": h["token_acc"],
              "lr": h["lr"]} for h in result["history"]]
    write_jsonl(metrics_dir / "sft_curve.jsonl", curve)
    write_csv(metrics_dir / "sft_curve.csv", curve, SFT_CURVE_COLUMNS)  # the same rows, flat, for `dvc plots`
    publish("sft", "SFT warmup", [{"metric": k, "value": v} for k, v in result["summary"].items()],
            notes=f"checkpoint: `{params.paths.sft_dir}`")
    return result["summary"]


if __name__ == "__main__":
    main(sft_flow, __doc__)
