"""RL smoke run of a real pretrained LM with vLLM rollouts (issue 16): SmolLM2-135M-Instruct, LoRA, G = 4, 3 steps
of the `train` stage's own driver (`tspo_core.train.rl.run_rl`) on the real QA samples, with the step time.

The base params are `configs/smollm2_real_qa.yaml` (the SmolLM2 checkpoint that `make smollm2` converts, the real
QA samples, BM25 top-3); this script overrides for the smoke run: `rollout.backend: vllm`, `model.lora_r` 8
(alpha 16), `train.steps` 3, `train.prompts_per_step` 2 x `rollout.group_size` 4, at most 2 search rounds of 64 new
tokens and 200-token observations (a CPU trains a 135M model on ~1k-token rollouts in minutes per step; the
preset's 4 x 128 + 500 would take ~10 min per step on 2 cores), the checkpoint as the starting point
(`paths.sft_dir`), outputs under `<out>/scratch` (git-ignored). Data and index come first:

    make smollm2
    .venv/bin/python -m flows.data  --params configs/smollm2_real_qa.yaml
    .venv/bin/python -m flows.index --params configs/smollm2_real_qa.yaml
    .venv/bin/python benchmarks/smollm2_rl_smoke.py            # -> benchmarks/results/smollm2_rl_smoke/

It writes `results.json` and `results.md` (per step: step, rollout and weight-push seconds, reward, loss, KL,
|vLLM - trainer| log-prob gap, generated tokens) and fails if a loss is non-finite (`run_rl` itself fails when no
optimizer step succeeded).
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tspo_core.config import load_params  # noqa: E402
from tspo_core.io import write_json, write_text  # noqa: E402
from tspo_core.runinfo import environment  # noqa: E402

COLUMNS = ("step", "step_s", "rollout_s", "weight_sync_s", "reward_mean", "loss", "kl", "logp_delta_mean",
           "logp_delta_max", "response_tokens", "searches", "invalid_rate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="configs/smollm2_real_qa.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2, help="questions per step")
    ap.add_argument("--max-turns", type=int, default=2, help="search rounds before the answer-only turn")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="per turn")
    ap.add_argument("--max-obs-tokens", type=int, default=200, help="per observation")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--estimator", default="tspo")
    ap.add_argument("--out", default="benchmarks/results/smollm2_rl_smoke")
    args = ap.parse_args(argv)

    base = load_params(args.params)
    checkpoint = Path(base.model.name_or_path or "")
    if not (checkpoint / "config.json").is_file():
        ap.error(f"{checkpoint}: no checkpoint; run `make smollm2` first")
    out = Path(args.out)
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    params = load_params(args.params, {
        "rollout.backend": "vllm", "rollout.group_size": args.group_size, "rollout.vllm_kv_cache_gb": 1.0,
        "rollout.max_turns": args.max_turns, "rollout.max_new_tokens_per_turn": args.max_new_tokens,
        "rollout.max_obs_tokens": args.max_obs_tokens,
        "model.lora_r": args.lora_r, "model.lora_alpha": 2 * args.lora_r, "optim.lr": args.lr,
        "optim.warmup_ratio": 0.0, "train.steps": args.steps, "train.prompts_per_step": args.prompts,
        "train.mini_batch_size": args.prompts * args.group_size, "train.micro_batch_size": 4,
        "train.checkpoint_every": args.steps, "train.eval_every": 0, "paths.sft_dir": str(checkpoint),
        "paths.rl_dir": str(scratch / "rl"), "paths.metrics_dir": str(scratch / "metrics")})
    if not (Path(params.paths.data_dir) / "rl_train.jsonl").is_file():
        ap.error(f"no {params.paths.data_dir}/rl_train.jsonl: run `python -m flows.data --params {args.params}` "
                 "and `python -m flows.index` with it first")

    from tspo_core.train.rl import run_rl

    t0 = time.monotonic()
    history = run_rl(params, args.estimator, scratch / "rl" / args.estimator)
    total = time.monotonic() - t0
    bad = [h["step"] for h in history if h.get("loss") is None or not math.isfinite(h["loss"])]
    if bad:
        print(f"error: non-finite loss at steps {bad}", file=sys.stderr)
        return 1
    rows = [{k: h.get(k) for k in COLUMNS} for h in history]
    steady = [h["step_s"] for h in history[1:]] or [history[0]["step_s"]]
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "params": args.params, "checkpoint": str(checkpoint), "estimator": args.estimator,
              "steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group_size,
              "lora_r": args.lora_r, "lr": args.lr, "max_turns": args.max_turns,
              "max_new_tokens_per_turn": args.max_new_tokens, "max_obs_tokens": args.max_obs_tokens, "history": rows, "total_s": round(total, 1),
              "median_step_s_after_first": statistics.median(steady), "machine": platform.machine(),
              "cpus": os.cpu_count(), "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    lines = ["# SmolLM2-135M-Instruct: RL smoke run with vLLM rollouts", "",
             f"`{result['command']}`: {args.steps} steps of `run_rl` ({args.estimator}), LoRA r {args.lora_r}, "
             f"{args.prompts} questions x G = {args.group_size} per step, at most {args.max_turns} search rounds of "
             f"{args.max_new_tokens} new tokens, observations <= {args.max_obs_tokens} tokens, lr {args.lr}; "
             f"{os.cpu_count()} CPUs. "
             f"Wall time {total:.0f} s (engine start and LoRA merge included); median step after the first "
             f"{result['median_step_s_after_first']:.1f} s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[k] is None else f"{r[k]:.4g}" if isinstance(r[k], float)
                                       else str(r[k]) for k in COLUMNS) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
