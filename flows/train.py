"""Stage `train@<estimator>`: TSPO or GRPO RL from the SFT checkpoint (resumes from its last checkpoint).

Several processes: `torchrun --nproc_per_node N -m flows.train --params params.yaml --estimator tspo`
(gloo on CPU, NCCL on GPUs); each rank rolls out its share of the questions; the policy and the reference are
sharded with FSDP2 (`tspo_core.train.distributed`) and checkpoints are DCP (`tspo_core.train.checkpoint`).

The run's outputs (checkpoint, model, `train_<estimator>.{jsonl,csv,json}`) change together, when it ends well:
a run of other settings trains beside the finished one (`tspo_core.train.outputs`).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from tqdm import tqdm

from flows.common import load, main, publish
from tspo_core.train.outputs import SUMMARY_KEYS, training_summary
from tspo_core.train.rl import Dist, run_rl

__all__ = ["SUMMARY_KEYS", "train", "train_flow"]


def _init_distributed() -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():  # one GPU per rank: "cuda" below means this rank's device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            init = os.environ.get("TSPO_DIST_INIT_METHOD")  # e.g. file:///shared/store: no TCP store is opened
            if init:
                dist.init_process_group(backend, init_method=init, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]))
            else:  # torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
                dist.init_process_group(backend)
    return Dist.from_env()


@task
def train(params_path: str, estimator: str) -> list[dict]:
    params = load(params_path)
    dist = _init_distributed()
    out_dir = Path(params.paths.rl_dir) / estimator
    bar = tqdm(total=params.train.steps, desc=f"train@{estimator}", unit="step", disable=dist.rank != 0)

    def on_step(rec: dict, history: list[dict]) -> None:
        bar.n = rec["step"]
        bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", em=f"{rec['em']:.3f}")
        bar.refresh()

    try:
        return run_rl(params, estimator, out_dir, on_step=on_step, dist=dist, metrics_dir=params.paths.metrics_dir)
    finally:
        bar.close()


@flow(name="train")
def train_flow(params_path: str = "params.yaml", estimator: str = "tspo") -> dict:
    history = train(params_path, estimator)
    params = load(params_path)
    summary = training_summary(history, estimator)  # as written to train_<estimator>.json with the run
    publish(f"train-{estimator.replace('_', '-')}", f"RL training ({estimator})",
            [{"metric": k, "value": v} for k, v in summary.items()],
            notes=f"model: `{Path(params.paths.rl_dir) / estimator / 'model'}`")
    return summary


if __name__ == "__main__":
    main(train_flow, __doc__, {"--estimator": {"default": "tspo", "help": "advantage estimator (registry name)"}})
