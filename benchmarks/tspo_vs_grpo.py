"""Does TSPO beat GRPO? GRPO, GRPO + FOLR (trajectory level) and TSPO from one SFT checkpoint, several seeds each,
plus a FOLR-alpha sweep for TSPO; the same compute for every run (params' steps, prompts per step, group size).

For every run the script trains with the stage's own code (`tspo_core.train.rl.run_rl`, with greedy dev EM logged
every `--eval-every` steps on fixed dev subsets) and evaluates the final model with the stage's evaluation
(`tspo_core.evaluate.run_evaluate`: greedy, the test subsets of `eval.subset_size` per family). It then writes

- `<out>/results.md`: seven-family test EM per method (mean +- sample std over seeds, and each seed), steps to reach
  GRPO's final dev EM, zero-variance group shares under o and s and category shares over training, the alpha sweep;
- `<out>/results.json`: every number in the tables, per run;
- `<out>/dev_em.png`, `<out>/zero_variance.png`, `<out>/alpha_sweep.png`.

Runs live in `<out>/runs/<name>/` (checkpoints, histories, per-question results). The script is resumable: a run
whose evaluation is on disk is not repeated, and an interrupted one resumes from its last checkpoint.

    nice -n 19 python benchmarks/tspo_vs_grpo.py                    # defaults: params.yaml, artifacts/sft, 3 seeds

About an hour on 2 CPU cores with the embedded default (12 runs of 30 steps). Needs `dvc repro sft` (or any SFT
checkpoint: `--sft DIR`) and the data and index stages.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tspo_core.agent.rewards import CATEGORIES  # noqa: E402
from tspo_core.config import load_params, params_from_dict  # noqa: E402
from tspo_core.evaluate import DISPLAY_NAMES, checkpoint_for, run_evaluate  # noqa: E402
from tspo_core.io import write_json, write_jsonl, write_text  # noqa: E402
from tspo_core.report import final_value, mean_std, read_history, series, steps_to_reach  # noqa: E402

LABELS = {"grpo": "GRPO", "grpo_folr": "GRPO+FOLR", "tspo": "TSPO"}


def run_params(base, name: str, out: Path, sft: Path, estimator: str, seed: int, alpha: float, eval_every: int):
    """`base` with this run's seed, alpha and estimator, its outputs under `out/runs/name`, the given SFT model."""
    raw = base.model_dump(mode="json")
    run_dir = out / "runs" / name
    raw["paths"].update(sft_dir=str(sft), rl_dir=str(run_dir / "rl"), metrics_dir=str(run_dir / "metrics"),
                        eval_dir=str(run_dir / "eval"), report_dir=str(run_dir / "report"))
    raw["train"].update(seed=seed, eval_every=eval_every)
    raw["reward"]["folr_alpha"] = alpha
    raw["advantage"]["estimator"] = estimator
    raw["tracking"]["wandb_mode"] = "disabled"
    return params_from_dict(raw, f"{name} (derived from the base params)")


def run_one(params, name: str, estimator: str) -> dict:
    """Train (resuming) and evaluate one run; returns its history and test metrics (cached on disk)."""
    from tspo_core.train.rl import run_rl

    metrics_dir = Path(params.paths.metrics_dir)
    done = metrics_dir / f"eval_{name}.json"
    history_file = metrics_dir / "history.jsonl"
    if not done.is_file():
        t0 = time.monotonic()
        history = run_rl(params, estimator, Path(params.paths.rl_dir) / estimator, on_step=_progress(name))
        write_jsonl(history_file, history)
        t_train = time.monotonic() - t0
        metrics = run_evaluate(params, checkpoint_for(params.paths, estimator), name)
        metrics["meta"]["train_seconds"] = round(t_train, 1)
        write_json(done, metrics)  # last: its presence means the run is complete
    return {"history": read_history(history_file), "test": json.loads(done.read_text(encoding="utf-8"))}


def check_cache(out: Path, base, sft: Path, eval_every: int) -> None:
    """Finished runs under `out/runs` are reused by name only, so they must come from the same starting checkpoint
    and base settings: `out/runs/key.json` records both, and other ones stop the script instead of mixing runs."""
    from tspo_core.train.rl import _dir_id

    settings = base.model_dump(mode="json")
    settings.pop("paths")
    key = {"sft": _dir_id(sft), "eval_every": eval_every,
           "params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]}
    file = out / "runs" / "key.json"
    if not file.is_file() and file.parent.is_dir() and any(file.parent.iterdir()):
        raise SystemExit(f"{file.parent} holds runs of unknown origin (no key.json: written before this check "
                         "existed); remove that directory to start over, or pass another --out")
    if file.is_file() and json.loads(file.read_text(encoding="utf-8")) != key:
        raise SystemExit(f"{file.parent} holds runs from another SFT checkpoint or other settings (recorded "
                         f"{file.read_text(encoding='utf-8').strip()}, now {json.dumps(key)}); remove that "
                         "directory to start over, or pass another --out")
    write_json(file, key)


def _progress(name: str):
    def on_step(rec: dict, history: list) -> None:
        dev = f", dev EM {rec['dev_em']:.3f}" if "dev_em" in rec else ""
        print(f"  {name} step {rec['step']}: sampled EM {rec['em']:.3f}{dev}", flush=True)
    return on_step


def sft_baseline(params, out: Path) -> dict:
    """Greedy dev EM (the same dev subsets as the runs) and test metrics of the SFT checkpoint itself."""
    from tspo_core.pipeline import device, make_engine, open_retriever
    from tspo_core.policy import load_policy
    from tspo_core.train.rl import dev_subsets, greedy_dev_em

    cache = out / "runs" / "sft" / "baseline.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    policy, tok = load_policy(params.paths.sft_dir, params.model, device())
    policy.eval()
    engine = make_engine(policy, tok, open_retriever(params.retrieval, params.paths), params.rollout,
                         params.retrieval, params.model)
    dev = greedy_dev_em(engine, dev_subsets(params))
    test = run_evaluate(params, params.paths.sft_dir, "sft")
    result = {"dev": dev, "test": test}
    write_json(cache, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------------------------
def _mean(history: list[dict], key: str) -> float | None:
    _, ys = series(history, key)
    return sum(ys) / len(ys) if ys else None


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(run: dict) -> dict:
    h, test = run["history"], run["test"]
    sampled = series(h, "em")[1]
    return {"test_em": test["average"]["em"],
            "test_em_per_dataset": {k: v["em"] for k, v in test["datasets"].items()},
            "final_dev_em": final_value(h, "dev_em", share=0.0),
            "dev_curve": list(zip(*series(h, "dev_em"))),
            "sampled_em_first5": _avg(sampled[:5]), "sampled_em_last5": _avg(sampled[-5:]),
            "zero_var_share_o": _mean(h, "zero_var_share_o"), "zero_var_share_s": _mean(h, "zero_var_share_s"),
            **{f"train_{c}": _mean(h, c) for c in CATEGORIES},
            "steps": len(h), "train_seconds": test["meta"].get("train_seconds")}


def _pm(values: list[float | None], digits: int = 3) -> str:
    ms = mean_std([v for v in values if v is not None])
    return "–" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def write_results(out: Path, args, base, sft: dict, runs: dict[str, dict], grid: dict[str, list[str]],
                  sweep: dict[float, str], elapsed: float) -> None:
    s = {name: summarize(r) for name, r in runs.items()}
    families = list(sft["test"]["datasets"])
    lines = ["# TSPO vs GRPO on the embedded world", "",
             f"Command: `{shlex.join(['python', 'benchmarks/tspo_vs_grpo.py', *args.argv])}`  ",
             f"SFT checkpoint `{args.sft}`; {base.train.steps} RL steps x {base.train.prompts_per_step} questions "
             f"x G = {base.rollout.group_size}, lr {base.optim.lr}, seeds {args.seeds}; test = greedy, "
             f"{sum(v['n'] for v in sft['test']['datasets'].values())} questions over {len(families)} families; "
             f"dev EM every {args.eval_every} steps on {base.train.eval_questions} dev questions per family.  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; total "
             f"{elapsed / 60:.0f} min.", "",
             "## Seven-family test EM (mean ± std over seeds)", "",
             "| Method | " + " | ".join(DISPLAY_NAMES.get(f, f) for f in families) + " | Avg. | per seed |",
             "|---|" + "---:|" * (len(families) + 1) + "---|",
             "| SFT | " + " | ".join(f"{sft['test']['datasets'][f]['em']:.3f}" for f in families)
             + f" | {sft['test']['average']['em']:.3f} | – |"]
    for est, names in grid.items():
        cells = [_pm([s[n]["test_em_per_dataset"].get(f) for n in names], 2) for f in families]
        per_seed = ", ".join(f"{s[n]['test_em']:.3f}" for n in names)
        lines.append(f"| {LABELS.get(est, est)} | " + " | ".join(cells)
                     + f" | {_pm([s[n]['test_em'] for n in names])} | {per_seed} |")
    target_runs = grid.get("grpo", [])
    target = mean_std([s[n]["final_dev_em"] for n in target_runs if s[n]["final_dev_em"] is not None])
    lines += ["", "## Learning speed and signal (means over seeds)", "",
              f"Dev EM of the SFT checkpoint: {sft['dev']['dev_em']:.3f}. GRPO's final dev EM (the target): "
              + ("–" if target is None else f"{target[0]:.3f}") + ".", "",
              "| Method | final dev EM | steps to GRPO's final dev EM | sampled EM first 5 -> last 5 steps "
              "| zero-var groups under o | under s | " + " | ".join(c.replace("_", " ") for c in CATEGORIES)
              + " |", "|---|" + "---:|" * (5 + len(CATEGORIES))]
    for est, names in grid.items():
        start = [{"step": 0, "dev_em": sft["dev"]["dev_em"]}]  # step 0 is the SFT checkpoint itself
        reach = [steps_to_reach(start + runs[n]["history"], "dev_em", target[0]) if target else None for n in names]
        reached = [r for r in reach if r is not None]
        reach_txt = (f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(names)} seeds reached)"
                     if reached else f"not reached (0/{len(names)})")
        first = mean_std([s[n]["sampled_em_first5"] for n in names if s[n]["sampled_em_first5"] is not None])
        last = mean_std([s[n]["sampled_em_last5"] for n in names if s[n]["sampled_em_last5"] is not None])
        cats = " | ".join(_pm([s[n][f"train_{c}"] for n in names], 2) for c in CATEGORIES)
        lines.append(f"| {LABELS.get(est, est)} | {_pm([s[n]['final_dev_em'] for n in names])} | {reach_txt} | "
                     f"{first[0]:.3f} -> {last[0]:.3f} | {_pm([s[n]['zero_var_share_o'] for n in names], 2)} | "
                     f"{_pm([s[n]['zero_var_share_s'] for n in names], 2)} | {cats} |"
                     if first and last else f"| {LABELS.get(est, est)} | – | – | – | – | – | {cats} |")
    if sweep:
        lines += ["", f"## TSPO: FOLR alpha sweep (seed {args.seeds[0]})", "",
                  "| alpha | test EM (avg.) | final dev EM | zero-var groups under s |", "|---:|---:|---:|---:|"]
        for alpha, n in sorted(sweep.items()):
            lines.append(f"| {alpha:g} | {s[n]['test_em']:.3f} | {s[n]['final_dev_em'] or 0:.3f} | "
                         f"{s[n]['zero_var_share_s']:.2f} |")
    lines += ["", "Figures: `dev_em.png` (dev EM over training, mean and range over seeds), `zero_variance.png`, "
              "`alpha_sweep.png`. Per-run data: `results.json`, `runs/<name>/`.", ""]
    write_text(out / "results.md", "\n".join(lines))
    write_json(out / "results.json", {"sft": {"dev_em": sft["dev"]["dev_em"], "test_em": sft["test"]["average"]["em"]},
                                      "grid": grid, "alpha_sweep": {str(k): v for k, v in sweep.items()},
                                      "runs": s})
    plot(out, sft, runs, grid, sweep, s)


def plot(out: Path, sft: dict, runs: dict, grid: dict, sweep: dict, s: dict) -> None:
    from matplotlib.figure import Figure

    colors = {"grpo": "#1f77b4", "grpo_folr": "#17becf", "tspo": "#d62728"}
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for est, names in grid.items():
        curves = [dict(zip(*series(runs[n]["history"], "dev_em"))) for n in names]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        xs = [0.0, *steps]
        ys = [[sft["dev"]["dev_em"], *(c[x] for x in steps)] for c in curves]
        mean = [sum(col) / len(col) for col in zip(*ys)]
        ax.plot(xs, mean, color=colors.get(est), marker="o", label=f"{LABELS.get(est, est)} (mean of {len(names)})")
        ax.fill_between(xs, [min(col) for col in zip(*ys)], [max(col) for col in zip(*ys)], color=colors.get(est),
                        alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("greedy dev EM (avg. over families)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "dev_em.png", dpi=110)

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for est, names in grid.items():
        for key, style in (("zero_var_share_o", "-"), ("zero_var_share_s", "--")):
            cols = [series(runs[n]["history"], key)[1] for n in names]
            k = min(len(c) for c in cols)
            if k:
                ax.plot(range(1, k + 1), [sum(c[i] for c in cols) / len(cols) for i in range(k)], style,
                        color=colors.get(est), label=f"{LABELS.get(est, est)}: {'o' if key.endswith('o') else 's'}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("share of groups with all-equal scores")
    ax.set_title("Zero-variance groups under the outcome o (solid) and the FOLR score s (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / "zero_variance.png", dpi=110)

    if sweep:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        alphas = sorted(sweep)
        ax.plot(alphas, [s[sweep[a]]["test_em"] for a in alphas], "o-", color="#d62728", label="test EM")
        ax.plot(alphas, [s[sweep[a]]["final_dev_em"] or 0 for a in alphas], "s--", color="#ff7f0e",
                label="final dev EM")
        ax.axhline(sft["test"]["average"]["em"], color="gray", linestyle=":", label="SFT test EM")
        ax.set_xlabel("FOLR alpha")
        ax.set_ylabel("EM (avg. over families)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(out / "alpha_sweep.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="base params (default: params.yaml)")
    ap.add_argument("--sft", default=None, help="SFT checkpoint every run starts from (default: paths.sft_dir)")
    ap.add_argument("--estimators", nargs="+", default=["grpo", "grpo_folr", "tspo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--alphas", nargs="*", type=float, default=[0.1, 0.3, 0.5, 1.0],
                    help="FOLR alphas for TSPO at the first seed (the params' alpha is reused from the grid)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: train.steps)")
    ap.add_argument("--eval-every", type=int, default=5, help="dev EM every N steps (default 5)")
    ap.add_argument("--out", default="benchmarks/results/tspo_vs_grpo")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)

    base = load_params(args.params, {"train.steps": args.steps} if args.steps is not None else None)
    args.sft = str(Path(args.sft or base.paths.sft_dir))
    if not (Path(args.sft) / "config.json").is_file():
        ap.error(f"--sft {args.sft}: not a checkpoint directory (run `dvc repro sft` first)")
    out = Path(args.out)
    t0 = time.monotonic()
    alpha0 = base.reward.folr_alpha
    plan: list[tuple[str, str, int, float]] = [(f"{e}_s{seed}", e, seed, alpha0)
                                               for e in args.estimators for seed in args.seeds]
    sweep: dict[float, str] = {}
    if "tspo" in args.estimators and args.alphas:
        for a in args.alphas:
            name = f"tspo_s{args.seeds[0]}" if a == alpha0 else f"tspo_a{a:g}_s{args.seeds[0]}"
            sweep[a] = name
            if a != alpha0:
                plan.append((name, "tspo", args.seeds[0], a))
    check_cache(out, base, Path(args.sft), args.eval_every)
    sft_params = run_params(base, "sft", out, Path(args.sft), "grpo", args.seeds[0], alpha0, args.eval_every)
    print(f"SFT baseline from {args.sft}", flush=True)
    sft = sft_baseline(sft_params, out)
    print(f"  SFT: dev EM {sft['dev']['dev_em']:.3f}, test EM {sft['test']['average']['em']:.3f}", flush=True)
    runs: dict[str, dict] = {}
    for i, (name, est, seed, alpha) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {name}: {est}, seed {seed}, alpha {alpha:g}", flush=True)
        params = run_params(base, name, out, Path(args.sft), est, seed, alpha, args.eval_every)
        runs[name] = run_one(params, name, est)
        print(f"  {name}: test EM {runs[name]['test']['average']['em']:.3f}", flush=True)
    grid = {e: [f"{e}_s{seed}" for seed in args.seeds] for e in args.estimators}
    write_results(out, args, base, sft, runs, grid, sweep, time.monotonic() - t0)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
