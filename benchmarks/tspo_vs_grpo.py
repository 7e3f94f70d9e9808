"""Does TSPO beat GRPO? The powered comparison of issue 17 (item 5): full-pipeline seeds, every test question,
paired bootstrap confidence intervals.

For every seed s the script runs the whole pipeline after the index, with the stages' own code:

1. SFT with `sft.seed = s` (`tspo_core.train.sft.run_sft`), the checkpoint evaluated greedily on every test
   question (`tspo_core.evaluate.run_evaluate` with `eval.subset_size: null`: 1,260 questions on the default) and
   on the fixed dev subsets the RL runs log (`train.eval_questions` per family);
2. from that checkpoint, one RL run per estimator with `train.seed = s` (`tspo_core.train.rl.run_rl`, greedy dev EM
   every `--eval-every` steps), each evaluated the same way.

Defaults: seeds 0-4 x {grpo, grpo_folr, tspo, tspo_switch, tspo_shared} on `params.yaml`, then the control: seeds
0-2 x {grpo, tspo} from a habit-free SFT (`sft.verbose_share: 0`). Data and index are the pipeline's (the params'
`paths.data_dir` and `paths.index_dir`: run `dvc repro index` first). The report (`<out>/results.md`,
`<out>/results.json`, `<out>/dev_em.png`, `<out>/zero_variance.png`, `<out>/categories.png`) gives per method the
mean +- sd over seeds of the seven-family average test EM and of each family, the SFT rows, a paired bootstrap 95%
CI of (method - GRPO) over seeds and questions (`tspo_core.report.paired_bootstrap_ci`, 10,000 replicates, fixed
RNG seed; only seeds complete for every method of a table, "no difference" where the CI contains 0), greedy dev-EM
curves, steps to reach GRPO's final dev EM, zero-variance group shares under o and s, the four category shares,
and the control table. It is rewritten after every finished unit from whatever is complete.

    nice -n 19 .venv/bin/python benchmarks/tspo_vs_grpo.py
    nice -n 19 .venv/bin/python benchmarks/tspo_vs_grpo.py --seeds 0 1 --estimators grpo tspo --control-seeds
    .venv/bin/python benchmarks/tspo_vs_grpo.py --only-report      # tables and figures from the committed results

Duration on 2 CPU cores with the default (30 RL steps): SFT ~7 min per seed, each RL run ~2.5 min (plus ~10 s per
greedy dev EM), each full evaluation ~1 min, so ~25-30 min per default seed and ~15 min per control seed: about 3
hours in all.

Resuming, also in another session or on another machine: every finished unit (an SFT or an RL run of one seed)
writes `<out>/runs/<unit>/result.json` (small, committed: settings key, test metrics, per-question EM, the reduced
training history, timings). A unit whose result.json holds the same settings key is skipped; one with another key
stops the script before anything runs (delete that unit's directory to redo it, or pass another --out). Heavy
files (checkpoints, per-question evaluation rows) live in the git-ignored `<out>/scratch/<unit>/`: an interrupted
RL run or evaluation resumes from there, and a unit's scratch is deleted once its result.json is written (an SFT
checkpoint only once every RL run of its seed is done). Work is ordered so that complete seeds finish first (seed
0: SFT, then every estimator; then seed 1; ...; then the control), so an interrupted run leaves complete seeds. To
resume, run the same command again; commit `<out>/runs/*/result.json` and the report to carry them over.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from tspo_core.omp import choose_wait_policy  # noqa: E402

choose_wait_policy("PASSIVE")  # the benchmark runs beside other work (nice -n 19)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tspo_core.agent.rewards import CATEGORIES  # noqa: E402
from tspo_core.config import RolloutConfig, load_params, params_from_dict  # noqa: E402
from tspo_core.evaluate import DISPLAY_NAMES, read_results  # noqa: E402
from tspo_core.io import write_json, write_text  # noqa: E402
from tspo_core.report import CATEGORY_LABELS, ci_verdict, mean_std, paired_bootstrap_ci, paired_differences, \
    steps_to_reach  # noqa: E402

ESTIMATORS = ["grpo", "grpo_folr", "tspo", "tspo_switch", "tspo_shared"]
CONTROL_ESTIMATORS = ["grpo", "tspo"]
BASELINE = "grpo"
LABELS = {"sft": "SFT", "grpo": "GRPO", "grpo_folr": "GRPO+FOLR", "tspo": "TSPO", "tspo_switch": "TSPO-switch",
          "tspo_shared": "TSPO-shared"}
ARMS = {"default": "Default (params)", "control": "Control: habit-free SFT (sft.verbose_share: 0)"}
SFT_SECTIONS = ("data", "index", "retrieval", "model", "sft", "rollout", "eval")
"""What an SFT unit's result depends on (besides `train.eval_questions`, the size of its dev subsets)."""
RESULT = "result.json"
REPLICATES = 10_000
FIGURES = ("dev_em.png", "zero_variance.png", "categories.png")


class Unit(NamedTuple):
    name: str  # sft_s0, grpo_s0, control_sft_s0, control_tspo_s0
    kind: str  # "sft" | "rl"
    arm: str  # "default" | "control"
    seed: int
    method: str  # "sft" or the estimator
    sft: str  # the SFT unit an RL unit starts from (its own name for an SFT unit)
    params: Any
    key: str


# ----------------------------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------------------------
def unit_name(arm: str, method: str, seed: int) -> str:
    return f"{'control_' if arm == 'control' else ''}{method}_s{seed}"


def unit_params(base, arm: str, seed: int, method: str, scratch: Path, eval_every: int):
    """`base` with this unit's seeds (SFT and RL), estimator, every test question, and its outputs in scratch."""
    raw = base.model_dump(mode="json")
    sft_name = unit_name(arm, "sft", seed)
    own = scratch / unit_name(arm, method, seed)
    raw["paths"].update(sft_dir=str(scratch / sft_name / "sft"), rl_dir=str(own / "rl"),
                        metrics_dir=str(own / "metrics"), eval_dir=str(own / "eval"), report_dir=str(own / "report"))
    raw["sft"]["seed"] = seed
    raw["sft"]["max_minutes"] = 1e6  # the step count decides: a time cap binds under load and changes the model
    if arm == "control":
        raw["sft"]["verbose_share"] = 0.0
    # the committed units ran before `train.prefix_sharing` existed, i.e. the plain forward; sharing gives the same
    # update within float rounding, which still changes a run's trajectory: resumed units must match finished ones
    raw["train"].update(seed=seed, eval_every=eval_every, prefix_sharing=False)
    raw["eval"]["subset_size"] = None
    if method != "sft":
        raw["advantage"]["estimator"] = method
    raw["tracking"]["wandb_mode"] = "disabled"
    return params_from_dict(raw, f"{unit_name(arm, method, seed)} (derived from the base params)")


def settings_key(params, kind: str) -> str:
    """Hash of the resolved settings a unit's result depends on (never the paths): an SFT unit's sections only, so
    RL settings (steps, lr, ...) do not invalidate it; an RL unit everything."""
    raw = params.model_dump(mode="json")
    raw.pop("paths")
    raw.pop("tracking")
    # keys added after the first units ran, which an hf run never reads: left out while they hold their defaults,
    # so the committed units keep their keys
    rollout, defaults = raw["rollout"], RolloutConfig().model_dump(mode="json")
    for k in ("vllm_kv_cache_gb", "vllm_enforce_eager", "vllm_sleep", "recompute_logprobs"):
        if rollout["backend"] == "hf" and rollout.get(k) == defaults[k]:
            rollout.pop(k)
    if raw["train"].get("prefix_sharing") is False:  # what the units ran before the key existed
        raw["train"].pop("prefix_sharing")
    if kind == "sft":
        raw = {**{k: raw[k] for k in SFT_SECTIONS}, "dev_questions": raw["train"]["eval_questions"]}
    return hashlib.sha256(json.dumps({"kind": kind, **raw}, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(base, args, scratch: Path) -> list[Unit]:
    """Complete seeds first: seed 0's SFT and all its RL runs, then seed 1, ...; then the control likewise."""
    plan = []
    for arm, seeds, estimators in (("default", args.seeds, args.estimators),
                                   ("control", args.control_seeds, args.control_estimators)):
        for seed in seeds:
            sft = unit_name(arm, "sft", seed)
            for method in ["sft", *estimators]:
                params = unit_params(base, arm, seed, method, scratch, args.eval_every)
                kind = "sft" if method == "sft" else "rl"
                plan.append(Unit(unit_name(arm, method, seed), kind, arm, seed, method, sft, params,
                                 settings_key(params, kind)))
    return plan


def load_results(plan: list[Unit], runs: Path) -> dict[str, dict]:
    """The finished units' results; a result.json made with other settings stops the script (one line)."""
    done = {}
    for u in plan:
        file = runs / u.name / RESULT
        if not file.is_file():
            continue
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{file}: unreadable ({err}); delete {file.parent} to redo that unit") from None
        if result.get("key") != u.key:
            raise SystemExit(f"{file} was made with other settings (key {result.get('key')}, now {u.key}); delete "
                             f"{file.parent} to redo that unit with these settings, or pass another --out")
        done[u.name] = result
    return done


# ----------------------------------------------------------------------------------------------------------------
# running units
# ----------------------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> str:
        return f"{(time.monotonic() - self.t0) / 60:.1f} min"


def per_question_em(eval_dir: Path, run: str, datasets) -> dict[str, dict[str, float]]:
    """{dataset: {question id: EM}} from the evaluation's per-example rows."""
    out = {}
    for name in datasets:
        rows, _ = read_results(eval_dir / run / f"{name}.jsonl")
        out[name] = {r["id"]: (int(r["em"]) if r["em"] in (0, 1) else r["em"]) for r in rows}
    return out


def test_summary(metrics: dict) -> dict:
    return {"em": metrics["average"]["em"], "n": metrics["average"]["n"],
            "per_family": {k: v["em"] for k, v in metrics["datasets"].items()},
            "n_per_family": {k: v["n"] for k, v in metrics["datasets"].items()},
            "categories": {c: metrics["average"].get(c) for c in CATEGORIES}}


def checkpoint_sha(ckpt: Path) -> str:
    """Hash of a checkpoint's weights and tokenizer (not its summary: that holds timings)."""
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin")
                                                                  or p.name.startswith("tokenizer"))):
        h.update(f.name.encode() + b"\x00")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def train_sft(u: Unit, clock: Clock) -> Path:
    """The SFT checkpoint of `u` (an SFT unit) in scratch, trained unless a complete one is there."""
    from tspo_core.train.sft import run_sft

    ckpt = Path(u.params.paths.sft_dir)
    if (ckpt / "config.json").is_file() and (ckpt / "sft_summary.json").is_file():  # atomic_dir: complete
        return ckpt
    steps = u.params.sft.max_steps

    def progress(rec: dict) -> None:
        step = rec["step"] + 1  # the SFT history counts from 0
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"  {u.name} SFT step {step}/{steps}: loss {rec['loss']:.3f}  ({clock()})", flush=True)

    print(f"  {u.name}: oracle trajectories and SFT (sft.seed {u.seed})  ({clock()})", flush=True)
    run_sft(u.params, progress=progress)
    return ckpt


def _eval_progress(name: str, clock: Clock):
    def progress(info: dict) -> None:
        if info["done"] == info["total"]:
            print(f"  {name} test {info['dataset']}: EM {info['em']:.3f} on {info['total']}  ({clock()})",
                  flush=True)
    return progress


def run_sft_unit(u: Unit, clock: Clock) -> dict:
    from tspo_core.evaluate import run_evaluate
    from tspo_core.pipeline import device, make_engine, open_retriever
    from tspo_core.policy import load_policy
    from tspo_core.train.rl import dev_subsets, greedy_dev_em

    t0 = time.monotonic()
    ckpt = train_sft(u, clock)
    summary = json.loads((ckpt / "sft_summary.json").read_text(encoding="utf-8"))
    policy, tok = load_policy(ckpt, u.params.model, device())
    policy.eval()
    retriever = open_retriever(u.params.retrieval, u.params.paths)
    try:
        engine = make_engine(policy, tok, retriever, u.params.rollout, u.params.retrieval, u.params.model)
        dev = greedy_dev_em(engine, dev_subsets(u.params), normalization=u.params.eval.answer_normalization)
    finally:
        if callable(getattr(retriever, "close", None)):
            retriever.close()
    print(f"  {u.name}: greedy dev EM {dev['dev_em']:.3f}  ({clock()})", flush=True)
    metrics = run_evaluate(u.params, ckpt, "sft", progress=_eval_progress(u.name, clock))
    return {"unit": u.name, "kind": "sft", "arm": u.arm, "seed": u.seed, "method": "sft", "key": u.key,
            "settings": {"sft.seed": u.seed, "sft.verbose_share": u.params.sft.verbose_share,
                         "sft.max_steps": u.params.sft.max_steps},
            "checkpoint_sha256": checkpoint_sha(ckpt),
            "test": test_summary(metrics),
            "per_question_em": per_question_em(Path(u.params.paths.eval_dir), "sft", metrics["datasets"]),
            "dev_em": dev["dev_em"], "dev_em_per_family": {k[len("dev_em_"):]: v for k, v in dev.items()
                                                           if k.startswith("dev_em_")},
            "oracle": {k: summary.get(k) for k in ("trajectories", "dropped", "imperfect", "premature", "verbose")},
            "sft_summary": {k: summary.get(k) for k in ("steps", "final_loss", "final_token_acc", "dev_em",
                                                        "dev_valid_action_rate")},
            "seconds": {"sft": summary.get("train_seconds"), "trajectories": summary.get("trajectory_seconds"),
                        "eval": metrics["meta"]["seconds"], "unit_wall": round(time.monotonic() - t0, 1)},
            "machine": machine()}


def reduce_history(history: list[dict]) -> dict:
    """What the report needs of a training history: per-step series and the greedy dev-EM curve."""
    def val(rec, k):
        v = rec.get(k)
        return None if v is None else round(float(v), 5)

    keys = ("em", "reward_mean", "zero_var_share_o", "zero_var_share_s", *CATEGORIES)
    return {"step": [rec["step"] for rec in history], **{k: [val(rec, k) for rec in history] for k in keys},
            "dev_em": [[rec["step"], round(float(rec["dev_em"]), 5)] for rec in history
                       if rec.get("dev_em") is not None]}


def run_rl_unit(u: Unit, sft_result: dict, clock: Clock) -> dict:
    from tspo_core.evaluate import run_evaluate
    from tspo_core.train import rl

    t0 = time.monotonic()
    steps = u.params.train.steps

    def on_step(rec: dict, history: list) -> None:
        dev = f", dev EM {rec['dev_em']:.3f}" if rec.get("dev_em") is not None else ""
        print(f"  {u.name} step {rec['step']}/{steps}: sampled EM {rec['em']:.3f}{dev}  ({clock()})", flush=True)

    out_dir = Path(u.params.paths.rl_dir) / u.method
    history = rl.run_rl(u.params, u.method, out_dir, on_step=on_step)
    metrics = run_evaluate(u.params, out_dir / "model", u.name, progress=_eval_progress(u.name, clock))
    return {"unit": u.name, "kind": "rl", "arm": u.arm, "seed": u.seed, "method": u.method, "key": u.key,
            "settings": {"estimator": u.method, "train.seed": u.seed, "sft.seed": u.seed,
                         "sft.verbose_share": u.params.sft.verbose_share, "train.steps": steps,
                         "train.eval_every": u.params.train.eval_every},
            "sft_checkpoint_sha256": checkpoint_sha(Path(u.params.paths.sft_dir)),
            "sft_unit_checkpoint_sha256": sft_result.get("checkpoint_sha256"),
            "test": test_summary(metrics),
            "per_question_em": per_question_em(Path(u.params.paths.eval_dir), u.name, metrics["datasets"]),
            "history": reduce_history(history),
            "seconds": {"train": round(sum(float(h.get("step_s") or 0) for h in history), 1),
                        "eval": metrics["meta"]["seconds"], "unit_wall": round(time.monotonic() - t0, 1)},
            "machine": machine()}


def clean_scratch(plan: list[Unit], done: dict, scratch: Path) -> None:
    """Delete the scratch of finished units; an SFT checkpoint stays until every RL run of its seed is done."""
    pending_sft = {u.sft for u in plan if u.kind == "rl" and u.name not in done}
    for u in plan:
        d = scratch / u.name
        if u.name in done and d.is_dir() and not (u.kind == "sft" and u.name in pending_sft):
            shutil.rmtree(d)


def run_plan(plan: list[Unit], done: dict, runs: Path, scratch: Path, write_report) -> None:
    clock = Clock()
    todo = [u for u in plan if u.name not in done]
    print(f"{len(plan)} units planned, {len(plan) - len(todo)} already done, {len(todo)} to run", flush=True)
    clean_scratch(plan, done, scratch)
    for i, u in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {u.name}: {u.arm}, {LABELS.get(u.method, u.method)}, seed {u.seed}  ({clock()})",
              flush=True)
        if u.kind == "sft":
            result = run_sft_unit(u, clock)
        else:
            sft_result = done.get(u.sft)
            if sft_result is None:  # only when the plan was cut: the SFT unit is always planned first
                raise SystemExit(f"{u.name}: its SFT unit {u.sft} has no result")
            ckpt = train_sft(next(s for s in plan if s.name == u.sft), clock)
            if checkpoint_sha(ckpt) != sft_result["checkpoint_sha256"]:
                print(f"  note: the rebuilt {u.sft} checkpoint differs from the one evaluated in its result.json "
                      "(another machine?); this run records the checkpoint it started from", flush=True)
            result = run_rl_unit(u, sft_result, clock)
        write_json(runs / u.name / RESULT, result)
        done[u.name] = result
        print(f"  {u.name} done: test EM {result['test']['em']:.3f} on {result['test']['n']} questions  ({clock()})",
              flush=True)
        clean_scratch(plan, done, scratch)
        write_report(done)


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def _pm(values: list, digits: int = 3) -> str:
    ms = mean_std([v for v in values if v is not None])
    return "–" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_summary(plan: list[Unit], done: dict, arm: str) -> dict | None:
    """Every number of one arm's tables (JSON-ready)."""
    units = [u for u in plan if u.arm == arm]
    if not units:
        return None
    methods = list(dict.fromkeys(u.method for u in units))  # sft first, then the estimators in order
    seeds = list(dict.fromkeys(u.seed for u in units))
    res = {m: {s: done.get(unit_name(arm, m, s)) for s in seeds} for m in methods}
    complete = [s for s in seeds if all(res[m][s] is not None for m in methods)]
    families = list(units[0].params.eval.datasets)
    out: dict[str, Any] = {"seeds_planned": seeds, "seeds_complete": complete, "families": families, "methods": {}}
    grpo_final = [r["history"]["dev_em"][-1][1] for r in res.get(BASELINE, {}).values()
                  if r and r["history"]["dev_em"]]
    target = _mean(grpo_final)
    out["dev_em_target"] = target
    for m in methods:
        rs = {s: r for s, r in res[m].items() if r is not None}
        em = {s: r["test"]["em"] for s, r in rs.items()}
        entry: dict[str, Any] = {
            "seeds_done": list(rs), "test_em_per_seed": em,
            "test_em": mean_std(list(em.values())),
            "per_family": {f: mean_std([r["test"]["per_family"][f] for r in rs.values()
                                        if f in r["test"]["per_family"]]) for f in families},
            "test_categories": {c: mean_std([r["test"]["categories"][c] for r in rs.values()
                                             if r["test"]["categories"].get(c) is not None]) for c in CATEGORIES}}
        if m == "sft":
            entry["dev_em"] = mean_std([r["dev_em"] for r in rs.values()])
            entry["dev_em_per_seed"] = {s: r["dev_em"] for s, r in rs.items()}
            entry["oracle"] = {s: r["oracle"] for s, r in rs.items()}
        else:
            hist = {s: r["history"] for s, r in rs.items()}
            entry["final_dev_em"] = mean_std([h["dev_em"][-1][1] for h in hist.values() if h["dev_em"]])
            reach = {}
            for s, h in hist.items():
                sft = res["sft"][s] if "sft" in res else None
                start = [{"step": 0, "dev_em": sft["dev_em"]}] if sft else []
                curve = start + [{"step": x, "dev_em": y} for x, y in h["dev_em"]]
                reach[s] = steps_to_reach(curve, "dev_em", target) if target is not None else None
            entry["steps_to_target"] = reach
            for k in ("zero_var_share_o", "zero_var_share_s", *CATEGORIES):
                entry[f"train_{k}"] = mean_std([v for v in (_mean(h[k]) for h in hist.values()) if v is not None])
            entry["sampled_em_first5"] = _mean([_mean(h["em"][:5]) for h in hist.values()])
            entry["sampled_em_last5"] = _mean([_mean(h["em"][-5:]) for h in hist.values()])
            entry["train_seconds"] = _mean([r["seconds"]["train"] for r in rs.values()])
        out["methods"][m] = entry
    paired: dict[str, Any] = {}
    if BASELINE in methods and complete:
        for m in methods:
            if m in ("sft", BASELINE):
                continue
            diffs = {s: paired_differences(res[m][s]["per_question_em"], res[BASELINE][s]["per_question_em"])
                     for s in complete}
            paired[m] = paired_bootstrap_ci(diffs, replicates=REPLICATES, seed=0)
            paired[m]["verdict"] = ci_verdict(paired[m])
    out["paired_vs_grpo"] = paired
    return out


def _ms(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x[0]:.{digits}f} ± {x[1]:.{digits}f}"


def arm_markdown(arm: str, s: dict) -> list[str]:
    fams, methods = s["families"], s["methods"]
    n_planned = len(s["seeds_planned"])
    lines = [f"## {ARMS[arm]}", "",
             f"Seeds planned {s['seeds_planned']}; complete for every method: {s['seeds_complete']} "
             f"({len(s['seeds_complete'])} of {n_planned}). Means and sds are over each method's finished seeds "
             "(n), sd the sample standard deviation.", "",
             "### Test EM, every test question (mean ± sd over seeds)", "",
             "| Method | n | " + " | ".join(DISPLAY_NAMES.get(f, f) for f in fams) + " | Avg. | per seed |",
             "|---|---:|" + "---:|" * (len(fams) + 1) + "---|"]
    for m, e in methods.items():
        label = LABELS.get(m, m) + (" (habit-free)" if arm == "control" and m == "sft" else "")
        per_seed = ", ".join(f"s{k}: {v:.3f}" for k, v in e["test_em_per_seed"].items())
        lines.append(f"| {label} | {len(e['seeds_done'])} | " + " | ".join(_ms(e["per_family"][f], 2) for f in fams)
                     + f" | {_ms(e['test_em'])} | {per_seed} |")
    lines += ["", f"### Paired comparison with GRPO ({len(s['seeds_complete'])} complete seeds)", "",
              "Difference of the average test EM over families, method − GRPO, on the same questions and seeds; "
              f"95% CI from a paired bootstrap ({REPLICATES:,} replicates: seeds with replacement, then questions "
              "with replacement within each family). A difference is claimed only where the CI excludes 0.", "",
              "| Method − GRPO | mean difference | 95% CI | seeds | questions per seed | verdict |",
              "|---|---:|---:|---:|---:|---|"]
    if not s["paired_vs_grpo"]:
        lines.append("| – | – | – | – | – | no complete seed yet (or no GRPO in this arm) |")
    for m, ci in s["paired_vs_grpo"].items():
        lines.append(f"| {LABELS.get(m, m)} − GRPO | {ci['mean']:+.4f} | [{ci['lo']:+.4f}, {ci['hi']:+.4f}] | "
                     f"{ci['seeds']} | {ci['questions']} | {ci['verdict']} |")
    target = s["dev_em_target"]
    sft = methods.get("sft")
    lines += ["", "### Learning speed and signal (means over seeds)", "",
              f"Greedy dev EM of the SFT checkpoints (step 0): {_ms(sft['dev_em']) if sft else '–'}. GRPO's final "
              f"dev EM (the target): {'–' if target is None else f'{target:.3f}'}. Zero-variance groups: share of "
              "groups whose G rollouts have all-equal outcome o / FOLR score s, mean over steps.", "",
              "| Method | final dev EM | steps to GRPO's final dev EM | sampled EM first 5 → last 5 steps "
              "| zero-var groups under o | under s | train s/run |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m, e in methods.items():
        if m == "sft":
            continue
        reached = [v for v in e["steps_to_target"].values() if v is not None]
        n = len(e["steps_to_target"])
        reach = (f"{sum(reached) / len(reached):.0f} ({len(reached)}/{n} seeds reached)" if reached
                 else f"not reached (0/{n})")
        first, last = e["sampled_em_first5"], e["sampled_em_last5"]
        sampled = "–" if first is None or last is None else f"{first:.3f} → {last:.3f}"
        secs = "–" if e["train_seconds"] is None else f"{e['train_seconds']:.0f}"
        lines.append(f"| {LABELS.get(m, m)} | {_ms(e['final_dev_em'])} | {reach} | {sampled} | "
                     f"{_ms(e['train_zero_var_share_o'], 2)} | {_ms(e['train_zero_var_share_s'], 2)} | {secs} |")
    lines += ["", "### The four categories (retrieved the answer? × answered right?)", "",
              "Training: share of sampled rollouts, mean over steps; test: greedy, average over families.", "",
              "| Method | " + " | ".join(f"train: {CATEGORY_LABELS[c]}" for c in CATEGORIES) + " | "
              + " | ".join(f"test: {CATEGORY_LABELS[c]}" for c in CATEGORIES) + " |",
              "|---|" + "---:|" * (2 * len(CATEGORIES))]
    for m, e in methods.items():
        train = " | ".join("–" if m == "sft" else _ms(e[f"train_{c}"], 2) for c in CATEGORIES)
        test = " | ".join(_ms(e["test_categories"][c], 2) for c in CATEGORIES)
        lines.append(f"| {LABELS.get(m, m)} | {train} | {test} |")
    if sft and sft["oracle"]:
        lines += ["", "### SFT checkpoints", "",
                  "| seed | oracle trajectories | dropped | imperfect | verbose | greedy dev EM | test EM |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for seed, o in sft["oracle"].items():
            lines.append(f"| {seed} | {o['trajectories']} | {o['dropped']} | {o['imperfect']} | {o['verbose']} | "
                         f"{sft['dev_em_per_seed'][seed]:.3f} | {sft['test_em_per_seed'][seed]:.3f} |")
    return lines


def build_results(out: Path, args, base, plan: list[Unit], done: dict) -> None:
    arms = {arm: s for arm in ARMS if (s := arm_summary(plan, done, arm)) is not None}
    missing = [u.name for u in plan if u.name not in done]
    missing_txt = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
    train_s = sum(r["seconds"].get("train") or r["seconds"].get("sft") or 0 for r in done.values())
    wall_s = sum(r["seconds"].get("unit_wall") or 0 for r in done.values())
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['cpus']} CPUs" for r in done.values()})
    shown = [a for a in args.argv if a != "--only-report"]  # the command that ran the units
    command = shlex.join(["nice", "-n", "19", ".venv/bin/python", "benchmarks/tspo_vs_grpo.py", *shown])
    lines = ["# TSPO vs GRPO: full-pipeline seeds, every test question", "",
             f"Command (last invocation): `{command}`  ",
             f"Base params `{args.params}`; per seed: SFT with `sft.seed = s`, then RL with `train.seed = s` from "
             f"that checkpoint: {base.train.steps} steps x {base.train.prompts_per_step} questions x G = "
             f"{base.rollout.group_size}, lr {base.optim.lr}, FOLR alpha {base.reward.folr_alpha}; greedy dev EM "
             f"every {args.eval_every} steps on {base.train.eval_questions} dev questions per family; test: greedy "
             "on every test question (`eval.subset_size: null`), answers matched as "
             f"`{base.eval.answer_normalization}`.  ",
             f"Units finished: {len(done)} of {len(plan)}" + (f" (missing: {missing_txt})" if missing else "")
             + f"; unit wall time {wall_s / 60:.0f} min in all (training {train_s / 60:.0f} min); machines: "
             + ("; ".join(machines) or "–") + ".", ""]
    for arm, s in arms.items():
        lines += arm_markdown(arm, s) + [""]
    lines += ["Figures: `dev_em.png` (greedy dev EM over training, mean over seeds, step 0 = SFT), "
              "`zero_variance.png` (zero-variance group shares under o and s per step, mean over seeds), "
              "`categories.png` (training category shares). Per-unit data: `runs/<unit>/result.json`; every "
              "number above: `results.json`.", ""]
    write_text(out / "results.md", "\n".join(lines))
    write_json(out / "results.json", {
        "params": args.params, "steps": base.train.steps, "eval_every": args.eval_every,
        "units_planned": [u.name for u in plan], "units_done": sorted(done), "arms": arms,
        "units": {name: {k: v for k, v in r.items() if k != "per_question_em"} for name, r in done.items()}})
    plot(out, plan, done)


COLORS = {"grpo": "#1f77b4", "grpo_folr": "#17becf", "tspo": "#d62728", "tspo_switch": "#ff7f0e",
          "tspo_shared": "#9467bd"}


def plot(out: Path, plan: list[Unit], done: dict) -> None:
    from matplotlib.figure import Figure

    for f in FIGURES:
        (out / f).unlink(missing_ok=True)
    arms = [a for a in ARMS if any(u.arm == a and u.kind == "rl" and u.name in done for u in plan)]
    if not arms:
        return

    def rl_results(arm):
        by = {}
        for u in plan:
            if u.arm == arm and u.kind == "rl" and u.name in done:
                by.setdefault(u.method, []).append((u, done[u.name]))
        return by

    fig = Figure(figsize=(7 * len(arms), 4.5), layout="constrained")
    for ax, arm in zip(fig.subplots(1, len(arms), squeeze=False)[0], arms):
        for m, items in rl_results(arm).items():
            curves = []
            for u, r in items:
                sft = done.get(u.sft)
                curve = dict((x, y) for x, y in r["history"]["dev_em"])
                if sft:
                    curve[0] = sft["dev_em"]
                curves.append(curve)
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            if not xs:
                continue
            ys = [[c[x] for x in xs] for c in curves]
            mean = [sum(col) / len(col) for col in zip(*ys)]
            ax.plot(xs, mean, marker="o", color=COLORS.get(m), label=f"{LABELS.get(m, m)} (mean of {len(ys)})")
        ax.set_title(ARMS[arm].split(" (")[0], fontsize=10)
        ax.set_xlabel("RL step (0 = SFT)")
        ax.set_ylabel("greedy dev EM (avg. over families)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out / "dev_em.png", dpi=110)

    fig = Figure(figsize=(7 * len(arms), 4.5), layout="constrained")
    for ax, arm in zip(fig.subplots(1, len(arms), squeeze=False)[0], arms):
        for m, items in rl_results(arm).items():
            for key, style in (("zero_var_share_o", "-"), ("zero_var_share_s", "--")):
                cols = [[v for v in r["history"][key]] for _, r in items]
                k = min(len(c) for c in cols)
                ys = [_mean([c[i] for c in cols]) for i in range(k)]
                if k and all(y is not None for y in ys):
                    ax.plot(range(1, k + 1), ys, style, color=COLORS.get(m),
                            label=f"{LABELS.get(m, m)}: {'o' if key.endswith('o') else 's'}")
        ax.set_title(f"{ARMS[arm].split(' (')[0]}: all-equal groups under o (solid) and s (dashed)", fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel("share of groups (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / "zero_variance.png", dpi=110)

    fig = Figure(figsize=(7 * len(arms), 4.5), layout="constrained")
    cat_colors = {"complete_success": "#2ca02c", "near_miss": "#ff7f0e", "success_without_retrieval": "#9467bd",
                  "complete_failure": "#7f7f7f"}
    for ax, arm in zip(fig.subplots(1, len(arms), squeeze=False)[0], arms):
        by = rl_results(arm)
        names = list(by)
        bottom = [0.0] * len(names)
        for c in CATEGORIES:
            vals = [_mean([_mean(r["history"][c]) for _, r in by[m]]) or 0.0 for m in names]
            ax.bar([LABELS.get(m, m) for m in names], vals, bottom=bottom, color=cat_colors[c],
                   label=CATEGORY_LABELS[c])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{ARMS[arm].split(' (')[0]}: training rollouts by category (mean over steps and seeds)",
                     fontsize=10)
        ax.set_ylabel("share")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.savefig(out / "categories.png", dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="base params (default: params.yaml)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4], help="full-pipeline seeds (default 0-4)")
    ap.add_argument("--estimators", nargs="*", default=ESTIMATORS, help=f"default: {' '.join(ESTIMATORS)}")
    ap.add_argument("--control-seeds", nargs="*", type=int, default=[0, 1, 2],
                    help="seeds of the habit-free control (sft.verbose_share: 0); none to skip (default 0-2)")
    ap.add_argument("--control-estimators", nargs="*", default=CONTROL_ESTIMATORS,
                    help=f"default: {' '.join(CONTROL_ESTIMATORS)}")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: train.steps)")
    ap.add_argument("--eval-every", type=int, default=5, help="greedy dev EM every N steps (default 5)")
    ap.add_argument("--out", default="benchmarks/results/tspo_vs_grpo")
    ap.add_argument("--only-report", action="store_true",
                    help="rebuild results.md/json and the figures from <out>/runs/*/result.json; train nothing")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.eval_every < 1:
        ap.error("--eval-every must be >= 1 (the dev-EM curves need it)")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.control_seeds)) != len(args.control_seeds):
        ap.error("--seeds and --control-seeds: a seed given twice")

    base = load_params(args.params, {"train.steps": args.steps} if args.steps is not None else None)
    out = Path(args.out)
    runs, scratch = out / "runs", out / "scratch"
    plan = make_plan(base, args, scratch)
    done = load_results(plan, runs)

    def write_report(done: dict) -> None:
        build_results(out, args, base, plan, done)

    if not args.only_report:
        from tspo_core.agent.advantages import advantage_names

        unknown = sorted(set(args.estimators + args.control_estimators) - set(advantage_names()))
        if unknown:
            ap.error(f"unknown estimators {unknown}; registered: {advantage_names()}")
        data, index = Path(base.paths.data_dir), Path(base.paths.index_dir)
        if not (data / "rl_train.jsonl").is_file() or not (index / "index_card.json").is_file():
            ap.error(f"no data or index under {data} and {index}: run `dvc repro index` first")
        run_plan(plan, done, runs, scratch, write_report)
    write_report(done)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
