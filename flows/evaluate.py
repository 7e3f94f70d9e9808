"""Stage `evaluate@<run>`: greedy evaluation of one checkpoint (sft, grpo or tspo) on the seven datasets.

`python -m flows.evaluate --params params.yaml --run tspo`. The checkpoint is `paths.sft_dir` for `sft`, else
`<paths.rl_dir>/<run>/model`; `--checkpoint DIR` evaluates any other HF checkpoint (a local directory or a hub
name) under the name `--run`. Resumable: a rerun (or a Prefect retry) skips the questions already scored in
`<paths.eval_dir>/<run>/<dataset>.jsonl`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.common import load, main, publish, retry_unless_bad_input
from tspo_core.agent.rewards import CATEGORIES
from tspo_core.evaluate import markdown_table, run_evaluate
from tspo_core.layout import checkpoint_for

ROW_KEYS = ("n", "em", "f1", "cover_em", *CATEGORIES, "answer_in_evidence_rate", "turns_mean", "searches_mean",
            "invalid_action_rate")


# Retries are safe and cheap: the evaluation resumes from the rows already on disk (a dropped retrieval server or
# a full disk is transient; a missing checkpoint or data file is bad input and fails at once).
@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_bad_input)
def evaluate(params_path: str, run: str, checkpoint: str | None = None) -> dict:
    params = load(params_path)
    log = get_run_logger()

    def progress(info: dict) -> None:
        log.info("%s %s: %d/%d, EM so far %.3f", run, info["dataset"], info["done"], info["total"], info["em"])

    return run_evaluate(params, checkpoint or checkpoint_for(params.paths, run), run, progress=progress)


@flow(name="evaluate")
def evaluate_flow(params_path: str = "params.yaml", run: str = "tspo", checkpoint: str | None = None) -> dict:
    metrics = evaluate(params_path, run, checkpoint)
    rows = [{"dataset": name, **{k: m[k] for k in ROW_KEYS}} for name, m in metrics["datasets"].items()]
    rows.append({"dataset": "average", **{k: metrics["average"][k] for k in ROW_KEYS}})
    skipped = metrics["meta"]["skipped"]
    notes = (f"checkpoint `{metrics['meta']['checkpoint']}`, greedy, subset size {metrics['meta']['subset_size']}"
             + (f"; skipped: {', '.join(sorted(skipped))}" if skipped else "")
             + f"\n\n{markdown_table({run: metrics})}")
    publish(f"eval-{run.lower().replace('_', '-').replace('.', '-')}", f"Evaluation ({run})", rows, notes=notes)
    return metrics


if __name__ == "__main__":
    main(evaluate_flow, __doc__, {"--run": {"default": "tspo", "help": "sft, or an RL run under paths.rl_dir "
                                                                        "(grpo, tspo, ...)"},
                                 "--checkpoint": {"default": None, "help": "evaluate this checkpoint directory "
                                                  "instead (results under the name given by --run)"}})
