"""The comparison report: seven-dataset EM table (SFT / GRPO / TSPO), secondary metrics, training curves.

Inputs are the evaluation metrics of each run (`evaluate.run_evaluate`, stored as `metrics/detail/eval_<run>.json`) and
the per-step training histories of each estimator (`metrics/train_<estimator>.jsonl`, one JSON object per step with
keys such as `step`, `reward_mean`, `em`, `zero_var_share_o`, `zero_var_share_s`, the four category shares, `kl`,
`entropy`, `response_tokens`; any key may be missing). `build_report` writes `report.md` and PNG figures; figures
are drawn on `matplotlib.figure.Figure` objects (the Agg renderer, no pyplot global state) and every file is
written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tspo_core.agent.rewards import CATEGORIES
from tspo_core.config import FAMILIES
from tspo_core.errors import DataError
from tspo_core.evaluate import markdown_table, ordered_runs, run_label
from tspo_core.io import atomic_open, write_text
from tspo_core.layout import DETAIL_DIR, FIGURES, REPORT_NAME

log = logging.getLogger(__name__)

CURVE_KEYS: tuple[str, ...] = ("reward_mean", "em", "zero_var_share_o", "zero_var_share_s")
"""Panels of `training_curves.png`, in order; a `dev_em` panel (greedy dev EM, `train.eval_every`) comes first
when some history has it."""
CATEGORY_LABELS: dict[str, str] = {"complete_success": "complete success", "near_miss": "near miss",
                                   "success_without_retrieval": "success w/o retrieval",
                                   "complete_failure": "complete failure"}
_CATEGORY_COLORS = {"complete_success": "#2ca02c", "near_miss": "#ff7f0e", "success_without_retrieval": "#9467bd",
                    "complete_failure": "#7f7f7f"}
_RUN_COLORS = {"sft": "#7f7f7f", "grpo": "#1f77b4", "grpo_folr": "#17becf", "tspo": "#d62728"}
_OTHER_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#2ca02c", "#9467bd")


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
def read_history(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines skipped; a truncated last line (a run still writing, or killed) is
    dropped with a warning; any other malformed line is a `DataError` naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: an unfinished write
                log.warning("%s:%d: dropping a truncated last record", path, lineno)
                continue
            raise DataError(f"malformed history record ({err})", str(path), lineno) from None
        if not isinstance(rec, dict):
            raise DataError(f"history record is a {type(rec).__name__}, expected an object", str(path), lineno)
        records.append(rec)
    return records


def read_histories(metrics_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{estimator: records} from `<metrics_dir>/train_<estimator>.jsonl`."""
    return {p.stem[len("train_"):]: read_history(p) for p in sorted(Path(metrics_dir).glob("train_*.jsonl"))}


def read_eval_metrics(metrics_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{run: metrics} from `<metrics_dir>/detail/eval_<run>.json` (the full metrics `run_evaluate` returns; the
    DVC metric `<metrics_dir>/eval_<run>.json` beside it holds only the headline)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted((Path(metrics_dir) / DETAIL_DIR).glob("eval_*.json")):
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"unreadable evaluation metrics ({err})", str(p)) from None
        if not isinstance(m, dict) or "datasets" not in m or "average" not in m:
            raise DataError("not an evaluation metrics file (needs `datasets` and `average`)", str(p))
        out[p.stem[len("eval_"):]] = m
    return out


# ----------------------------------------------------------------------------------------------------------------
# series helpers
# ----------------------------------------------------------------------------------------------------------------
def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _step(rec: Mapping[str, Any], position: int) -> float:
    x = _number(rec.get("step"))
    return float(position) if x is None else x


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, skipping records without a finite value; a record without `step` counts by
    position (1-based)."""
    xs, ys = [], []
    for i, rec in enumerate(history, start=1):
        y = _number(rec.get(key))
        if y is None:
            continue
        xs.append(_step(rec, i))
        ys.append(y)
    return xs, ys


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start).

    >>> moving_average([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def final_value(history: Sequence[Mapping[str, Any]], key: str, share: float = 0.1) -> float | None:
    """Mean of `key` over the last `share` of the records that have it (at least one); None when none has."""
    _, ys = series(history, key)
    if not ys:
        return None
    k = max(1, round(len(ys) * share))
    return sum(ys[-k:]) / k


def steps_to_reach(history: Sequence[Mapping[str, Any]], key: str, target: float) -> float | None:
    """The first step whose `key` is at least `target` (records without a finite value are skipped); None when
    none reaches it.

    >>> steps_to_reach([{"step": 5, "dev_em": 0.1}, {"step": 10, "dev_em": 0.3}], "dev_em", 0.25)
    10.0
    """
    for x, y in zip(*series(history, key)):
        if y >= target:
            return x
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for a single value); None for no values.

    >>> mean_std([0.1, 0.3])
    (0.2, 0.1414213562373095)
    """
    if not values:
        return None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired_differences(a: Mapping[str, Mapping[str, float]],
                       b: Mapping[str, Mapping[str, float]]) -> dict[str, list[float]]:
    """Per-question differences `a - b` on the questions both have, per dataset: {dataset: [a[q] - b[q], ...]}
    (question ids sorted; datasets without a shared question left out). `a` and `b` are {dataset: {id: score}}.

    >>> paired_differences({"nq": {"q1": 1.0, "q2": 0.0}}, {"nq": {"q1": 0.0, "q2": 0.0, "q3": 1.0}})
    {'nq': [1.0, 0.0]}
    """
    out: dict[str, list[float]] = {}
    for name in sorted(set(a) & set(b)):
        shared = sorted(set(a[name]) & set(b[name]))
        if shared:
            out[name] = [float(a[name][q]) - float(b[name][q]) for q in shared]
    return out


def paired_bootstrap_ci(diffs: Mapping[Any, Mapping[str, Sequence[float]]], replicates: int = 10_000,
                        seed: int = 0, level: float = 0.95) -> dict[str, float | int]:
    """Paired bootstrap confidence interval of a mean difference over seeds and questions.

    `diffs[seed][dataset]` holds the per-question differences (method - baseline) of one seed on one dataset
    (`paired_differences`). The statistic is the one the tables report: per seed, the unweighted mean over datasets
    of the mean difference over that dataset's questions (the difference of the dataset-averaged EMs), then the
    mean over seeds. Each replicate draws the seeds with replacement, then, independently for every draw, each
    dataset's questions with replacement; the interval is the percentile interval of the replicates (numpy's
    generator with the fixed `seed`, so the same inputs give the same interval).

    Returns {"mean": the statistic on the data, "lo", "hi", "seeds", "questions" (the fewest paired questions of
    any seed, over all datasets), "replicates", "level"}. Raises ValueError without any seed or with a seed that
    has no question.
    """
    import numpy as np

    if not diffs:
        raise ValueError("paired_bootstrap_ci: no seeds")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_ci: level must be within (0, 1), got {level}")
    per_seed = [[np.asarray(v, dtype=float) for _, v in sorted(d.items()) if len(v)] for _, d in
                sorted(diffs.items(), key=lambda kv: str(kv[0]))]
    if any(not sets for sets in per_seed):
        raise ValueError("paired_bootstrap_ci: a seed without any paired question")
    point = float(np.mean([np.mean([x.mean() for x in sets]) for sets in per_seed]))
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    draws = rng.integers(0, k, size=(replicates, k))  # the seeds of each replicate
    stats = np.zeros(replicates)
    for j in range(k):  # draw position j of every replicate
        for s, sets in enumerate(per_seed):
            rows = np.flatnonzero(draws[:, j] == s)
            if not rows.size:
                continue
            seed_stat = np.zeros(rows.size)
            for x in sets:  # the questions of this dataset, resampled for each of these replicates
                seed_stat += x[rng.integers(0, x.size, size=(rows.size, x.size))].mean(axis=1)
            stats[rows] += seed_stat / len(sets)
    stats /= k
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "seeds": k,
            "questions": min(sum(x.size for x in sets) for sets in per_seed), "replicates": replicates,
            "level": level}


def ci_verdict(ci: Mapping[str, float]) -> str:
    """"no difference" when the interval contains 0, else "higher" or "lower" (the sign of the whole interval)."""
    if ci["lo"] <= 0 <= ci["hi"]:
        return "no difference"
    return "higher" if ci["lo"] > 0 else "lower"


def _color(run: str, i: int) -> str:
    return _RUN_COLORS.get(run, _OTHER_COLORS[i % len(_OTHER_COLORS)])


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


def _plot_curve(ax: Any, history: Sequence[Mapping[str, Any]], key: str, label: str, color: str,
                linestyle: str = "-") -> bool:
    xs, ys = series(history, key)
    if not ys:
        return False
    window = max(1, len(ys) // 20)
    if window > 1:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle)
        ax.plot(xs, moving_average(ys, window), color=color, linewidth=1.6, linestyle=linestyle,
                label=f"{label} (mean of {window})")
    else:
        ax.plot(xs, ys, color=color, linewidth=1.6, linestyle=linestyle, marker="." if len(ys) < 30 else None,
                label=label)
    return True


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Panels `CURVE_KEYS` (2 x 2; 3 x 2 with `dev_em`), one line per estimator in each; None when no history has
    any of the keys."""
    from matplotlib.figure import Figure

    runs = ordered_runs(histories)
    if not any(series(histories[r], k)[1] for r in runs for k in CURVE_KEYS):
        return None
    keys = CURVE_KEYS
    if any(series(histories[r], "dev_em")[1] for r in runs):
        keys = ("dev_em", "em", "reward_mean", "zero_var_share_o", "zero_var_share_s")
    rows = (len(keys) + 1) // 2
    fig = Figure(figsize=(10, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, 2).flatten()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys):
        drawn = [_plot_curve(ax, histories[r], key, run_label(r), _color(r, i)) for i, r in enumerate(runs)]
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if any(drawn):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle("RL training: " + " vs ".join(run_label(r) for r in runs))
    return _save(fig, path)


def plot_zero_variance(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Share of zero-variance groups under the outcome o (solid) and the FOLR score s (dashed), per estimator,
    on one axes (FOLR's claim: s has fewer)."""
    from matplotlib.figure import Figure

    runs = ordered_runs(histories)
    if not any(series(histories[r], k)[1] for r in runs for k in ("zero_var_share_o", "zero_var_share_s")):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(runs):
        _plot_curve(ax, histories[r], "zero_var_share_o", f"{run_label(r)}: outcome o", _color(r, i), "-")
        _plot_curve(ax, histories[r], "zero_var_share_s", f"{run_label(r)}: FOLR score s", _color(r, i), "--")
    ax.set_xlabel("step")
    ax.set_ylabel("share of groups with all-equal scores")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Zero-variance groups (no gradient)")
    return _save(fig, path)


def plot_training_categories(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Stacked category shares over training, one panel per estimator; None when no category was logged."""
    from matplotlib.figure import Figure

    runs = [r for r in ordered_runs(histories) if any(series(histories[r], c)[1] for c in CATEGORIES)]
    if not runs:
        return None
    fig = Figure(figsize=(5 * len(runs), 4), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, runs):
        logged = [(i, rec) for i, rec in enumerate(histories[r], start=1)
                  if any(_number(rec.get(c)) is not None for c in CATEGORIES)]
        steps = [_step(rec, i) for i, rec in logged]
        stacks = [[_number(rec.get(c)) or 0.0 for _, rec in logged] for c in CATEGORIES]
        ax.stackplot(steps, *stacks, labels=[CATEGORY_LABELS[c] for c in CATEGORIES],
                     colors=[_CATEGORY_COLORS[c] for c in CATEGORIES], alpha=0.85)
        ax.set_title(f"{run_label(r)}: rollout categories")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.margins(x=0)
    axes[0].set_ylabel("share of rollouts")
    axes[-1].legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_eval_categories(eval_metrics: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Horizontal stacked bars: category shares of each run (average over its datasets)."""
    from matplotlib.figure import Figure

    runs = [r for r in ordered_runs(eval_metrics) if eval_metrics[r].get("average")]
    if not runs:
        return None
    fig = Figure(figsize=(8, 1.2 + 0.6 * len(runs)), layout="constrained")
    ax = fig.subplots()
    left = [0.0] * len(runs)
    labels = [run_label(r) for r in runs]
    for c in CATEGORIES:
        widths = [_number(eval_metrics[r]["average"].get(c)) or 0.0 for r in runs]
        ax.barh(labels, widths, left=left, color=_CATEGORY_COLORS[c], label=CATEGORY_LABELS[c])
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of questions (average over datasets)")
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(runs) < 3 else -0.2))
    ax.set_title("Evaluation: answer found in evidence x answer correct")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    x = _number(v)
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def secondary_table(eval_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Per run, averages over its datasets: EM, F1, cover-EM, category shares, evidence rate, turns, searches."""
    header = ["Run", "EM", "F1", "Cover-EM", *(CATEGORY_LABELS[c].capitalize() for c in CATEGORIES),
              "Answer in evidence", "Turns", "Searches", "Invalid actions", "Questions"]
    rows = []
    for r in ordered_runs(eval_metrics):
        a = eval_metrics[r].get("average", {})
        rows.append([run_label(r), _fmt(a.get("em")), _fmt(a.get("f1")), _fmt(a.get("cover_em")),
                     *(_fmt(a.get(c)) for c in CATEGORIES), _fmt(a.get("answer_in_evidence_rate")),
                     _fmt(a.get("turns_mean"), 2), _fmt(a.get("searches_mean"), 2),
                     _fmt(a.get("invalid_action_rate")), str(a.get("n", "–"))])
    return _table(header, rows)


def training_table(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per estimator: steps logged and the mean of the last 10% of steps of the main training signals."""
    keys = ("reward_mean", "em", "folr_share", "zero_var_share_o", "zero_var_share_s", "near_miss", "kl",
            "entropy", "response_tokens")
    if any(series(h, "dev_em")[1] for h in histories.values()):
        keys = ("dev_em", *keys)  # the last greedy dev evaluation (final_value of a sparse key: its last record)
    rows = [[run_label(r), str(len(h)), *(_fmt(final_value(h, k)) for k in keys)]
            for r, h in ((r, histories[r]) for r in ordered_runs(histories))]
    return _table(["Estimator", "Steps", *keys], rows)


def _relative_gain(eval_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    try:
        t, g = (float(eval_metrics[r]["average"]["em"]) for r in ("tspo", "grpo"))
    except (KeyError, TypeError, ValueError):
        return ""
    t_k, g_k = (eval_metrics[r]["average"].get("datasets") for r in ("tspo", "grpo"))
    caveat = "" if t_k == g_k else " (over different dataset sets: not comparable)"
    gain = f"{(t - g) / g:+.1%} relative" if g > 0 else "GRPO average is 0"
    return f"TSPO vs GRPO, average EM: {t:.3f} vs {g:.3f} ({gain}){caveat}."


def _coverage_notes(eval_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes = []
    for r in ordered_runs(eval_metrics):
        m = eval_metrics[r]
        done = [f for f in FAMILIES if f in m.get("datasets", {})]
        if len(done) < len(FAMILIES):
            missing = ", ".join(f for f in FAMILIES if f not in done)
            notes.append(f"{run_label(r)} evaluated {len(done)}/{len(FAMILIES)} datasets; its Avg. is over those "
                         f"only (missing: {missing}; reasons under `meta.skipped` in `{DETAIL_DIR}/eval_{r}.json`).")
    return notes


def _how_produced(eval_metrics: Mapping[str, Mapping[str, Any]], histories: Mapping[str, Any]) -> str:
    parts = []
    for r in ordered_runs(eval_metrics):
        meta = eval_metrics[r].get("meta", {})
        ns = {d: m.get("n") for d, m in eval_metrics[r].get("datasets", {}).items()}
        size, seed = meta.get("subset_size"), meta.get("seed")
        chosen = "full sets" if size is None else f"fixed-seed subsets of up to {size} (seed {seed})"
        parts.append(f"{run_label(r)} from `{meta.get('checkpoint', '?')}` ({chosen}, split "
                     f"{meta.get('split', '?')}, {sum(n for n in ns.values() if n)} questions)")
    text = ("Greedy multi-turn rollouts (temperature 0, one per question, Search-R1 protocol) of each checkpoint; "
            "EM / F1 / cover-EM of the final answer after SQuAD normalization; a question counts as *answer in "
            "evidence* when a gold answer appears in the text of some retrieved passage (the FOLR first "
            "occurrence). Runs: " + "; ".join(parts) + ".")
    if histories:
        text += (" Training curves from `train_<estimator>.jsonl` (" + ", ".join(
            f"{run_label(r)}: {len(histories[r])} steps" for r in ordered_runs(histories)) + ").")
    return text


def build_report(eval_metrics: Mapping[str, Mapping[str, Any]],
                 train_histories: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path) -> Path:
    """Write `report.md` and its PNG figures into `out_dir`; returns the report's path.

    Figures (each only when there is something to draw): `eval_categories.png`, `training_curves.png`,
    `zero_variance.png`, `training_categories.png`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in FIGURES:
        (out_dir / stale).unlink(missing_ok=True)  # a figure with nothing to draw this time must not linger

    md = ["# Search agents: TSPO vs GRPO", ""]
    if eval_metrics:
        md += ["## Exact match on the seven datasets", "", markdown_table(eval_metrics), ""]
        notes = [n for n in (_relative_gain(eval_metrics), *_coverage_notes(eval_metrics)) if n]
        md += [*(f"- {n}" for n in notes), ""] if notes else []
        md += ["Avg. is the unweighted mean over datasets; the best value of a column is in bold.", "",
               "## Secondary metrics (averages over datasets)", "", secondary_table(eval_metrics), ""]
        if plot_eval_categories(eval_metrics, out_dir / "eval_categories.png"):
            md += ["![Category shares at evaluation](eval_categories.png)", ""]
    else:
        md += ["No evaluation metrics were found.", ""]

    md += ["## Training", ""]
    if train_histories:
        dev = any(series(h, "dev_em")[1] for h in train_histories.values())
        md += [training_table(train_histories), "", "Values are means over the last 10% of logged steps"
               + ("; dev_em is the greedy dev EM of the last evaluation (`train.eval_every`)." if dev else "."), ""]
        for name, fn, caption in (
                ("training_curves.png", plot_training_curves, "Training curves"),
                ("zero_variance.png", plot_zero_variance, "Zero-variance groups under o and s"),
                ("training_categories.png", plot_training_categories, "Rollout categories during training")):
            if fn(train_histories, out_dir / name):
                md += [f"![{caption}]({name})", ""]
    else:
        md += ["No training histories were found.", ""]

    md += ["## How this was produced", "", _how_produced(eval_metrics, train_histories), ""]
    path = out_dir / REPORT_NAME
    write_text(path, "\n".join(md))
    return path


# ----------------------------------------------------------------------------------------------------------------
# the end-of-run summary (`make repro`)
# ----------------------------------------------------------------------------------------------------------------
EM_TABLE_HEADING = "## Exact match on the seven datasets"


def em_table_from_report(text: str) -> str | None:
    """The EM table (runs x seven datasets + Avg.) of a `report.md`, bold marks removed; None when it has none."""
    lines = text.splitlines()
    try:
        start = lines.index(EM_TABLE_HEADING) + 1
    except ValueError:
        return None
    table: list[str] = []
    for line in lines[start:]:
        if line.startswith("|"):
            table.append(line.replace("**", ""))
        elif table:
            break
    return "\n".join(table) or None


def repro_summary(report_dir: str | Path, plots_page: str | Path = "dvc_plots/index.html") -> str:
    """A few lines for the end of `make repro`: the EM table of the report, then where the report, its figures and
    the `dvc plots` page are (a missing file is said to be missing, with the command that makes it)."""
    report_dir, plots_page = Path(report_dir), Path(plots_page)
    report = report_dir / REPORT_NAME
    if not report.is_file():
        return f"no report at {report} (the report stage has not run: `dvc repro report`)"
    table = em_table_from_report(report.read_text(encoding="utf-8"))
    figures = [str(report_dir / f) for f in FIGURES if (report_dir / f).is_file()]
    out = ["Exact match (EM) on the seven datasets, from the report:", "", table or "(the report has no EM table)",
           "", f"report:     {report}",
           f"figures:    {', '.join(figures) if figures else '(none drawn)'}",
           f"plots page: {plots_page}" if plots_page.is_file()
           else f"plots page: {plots_page} (not built: `make plots`)"]
    return "\n".join(out)
