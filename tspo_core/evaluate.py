"""Seven-dataset evaluation: greedy multi-turn rollouts, per-example scores, aggregates, resumable result files.

Protocol (REFERENCE.md "Evaluation metric", "Reference training settings": greedy evaluation):
1. Per dataset, a fixed-seed subset of the evaluation split (`subset`; REFERENCE.md pitfall 10: the full seven sets
   take hours). The subset of size n is contained in the subset of size n' > n, so growing `eval.subset_size`
   reuses the results already written.
2. One greedy rollout per question (temperature 0, G = 1) through the same rollout engine as training.
3. Per example (`score_rollout`): EM (primary), F1 and cover-EM of the final `<answer>` (`tspo_core.metrics`);
   the FOLR first-occurrence turn over the observation text only (`rewards.first_occurrence_turn`), hence whether
   the answer was found in the evidence and the TSPO category (`rewards.category`).
4. Per dataset (`aggregate`): means of the above, the four category shares, turns, searches, invalid-action rate.
   The cross-dataset `average` is the unweighted mean over the datasets evaluated (the papers' "Avg." column).

Plumbing: `evaluate_dataset` appends each finished batch to a jsonl file (flush + fsync) and skips the ids already
there on a rerun, so a crash loses at most one batch (a half-written last line is dropped and redone). A stored row
is reused only when its question and gold answers still match; `run_evaluate` also keys the whole run directory on
a fingerprint of the checkpoint and the rollout settings, so results of another model are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tspo_core.agent.rewards import CATEGORIES, category, first_occurrence_turn
from tspo_core.config import FAMILIES
from tspo_core.data.schema import QAExample
from tspo_core.data.subsets import subset
from tspo_core.errors import DataError
from tspo_core.io import write_json, write_jsonl, write_text
from tspo_core.layout import check_run_name, detail_path
from tspo_core.metrics import DEFAULT_NORMALIZATION, cover_exact_match, exact_match, f1_score
from tspo_core.runinfo import RUN_RECORD, environment

log = logging.getLogger(__name__)

SPLIT_FALLBACKS: tuple[str, ...] = ("test", "dev")
"""Tried after `eval.split` when a dataset has no file for it (FlashRAG: test where present, else dev)."""

DISPLAY_NAMES: dict[str, str] = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
                                 "2wikimultihopqa": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle"}
RUN_ORDER: tuple[str, ...] = ("sft", "grpo", "grpo_folr", "tspo")
"""Table row order for the known runs; other runs follow alphabetically."""

FINGERPRINT_FILE = "fingerprint.json"


# ----------------------------------------------------------------------------------------------------------------
# metrics: one example, one dataset, several datasets
# ----------------------------------------------------------------------------------------------------------------
def score_rollout(rollout: Any, normalization: str = DEFAULT_NORMALIZATION) -> dict[str, Any]:
    """The per-example result row of one finished rollout (`agent.rollout.Rollout`), answers matched under
    `normalization` (`eval.answer_normalization`, `tspo_core.metrics`).

    `first_occurrence` is the 0-based turn whose observation first contains a gold answer (None: never), searched
    in the retrieved text only; `answer_in_evidence` is whether there is one.
    """
    ex = rollout.example
    golds = list(ex.golden_answers)
    em = exact_match(rollout.answer, golds, normalization)
    first = first_occurrence_turn(rollout.observations, golds, normalization)
    return {
        "id": ex.id,
        "question": ex.question,
        "golden_answers": golds,
        "prediction": rollout.answer,
        "em": em,
        "f1": f1_score(rollout.answer, golds, normalization),
        "cover_em": cover_exact_match(rollout.answer, golds, normalization),
        "turns": rollout.num_turns,
        "searches": rollout.num_searches,
        "invalid_actions": rollout.num_invalid,
        "response_tokens": len(rollout.logprobs),
        "queries": list(rollout.queries),
        "retrieved_ids": [list(ids) for ids in rollout.retrieved_ids],
        "first_occurrence": first,
        "answer_in_evidence": first is not None,
        "category": category(first, em),
        "events": list(rollout.events),
        # the prompt alone filled rollout.max_context_tokens: not rolled out, unanswered (scored 0)
        "prompt_refused": "prompt_too_long" in rollout.events,
    }


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Dataset-level metrics of result rows (`score_rollout`); every category key is present (0.0 when empty).

    The invalid-action rate is per action (invalid actions / turns), as in the rollout batch stats.

    >>> r = {"em": 1.0, "f1": 1.0, "cover_em": 1.0, "turns": 2, "searches": 1, "invalid_actions": 0,
    ...      "answer_in_evidence": True, "category": "complete_success", "prediction": "x"}
    >>> aggregate([r, {**r, "em": 0.0, "category": "near_miss"}])["em"]
    0.5
    """
    n = len(rows)
    if n == 0:
        raise ValueError("aggregate: no result rows (a dataset with no questions has no metrics)")

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / n

    counts = dict.fromkeys(CATEGORIES, 0)
    for r in rows:
        if r["category"] not in counts:
            raise ValueError(f"aggregate: unknown category {r['category']!r} (known: {list(CATEGORIES)})")
        counts[r["category"]] += 1
    turns = sum(int(r["turns"]) for r in rows)
    return {
        "n": n,
        "em": mean("em"),
        "f1": mean("f1"),
        "cover_em": mean("cover_em"),
        **{c: counts[c] / n for c in CATEGORIES},
        "answer_in_evidence_rate": sum(bool(r["answer_in_evidence"]) for r in rows) / n,
        "answered_rate": sum(r.get("prediction") is not None for r in rows) / n,
        "turns_mean": turns / n,
        "searches_mean": mean("searches"),
        "invalid_action_rate": sum(int(r["invalid_actions"]) for r in rows) / max(turns, 1),
        "response_tokens_mean": sum(float(r.get("response_tokens", 0)) for r in rows) / n,
    }


def average_metrics(per_dataset: Mapping[str, Mapping[str, float | int]]) -> dict[str, float | int]:
    """Unweighted mean of each metric over the datasets (the "Avg." column); `n` is the total, `datasets` the
    count."""
    if not per_dataset:
        raise ValueError("average_metrics: no datasets")
    keys = [k for k in next(iter(per_dataset.values())) if k != "n"]
    k = len(per_dataset)
    avg: dict[str, float | int] = {key: sum(float(m[key]) for m in per_dataset.values()) / k for key in keys}
    return {"n": sum(int(m["n"]) for m in per_dataset.values()), "datasets": k, **avg}


# ----------------------------------------------------------------------------------------------------------------
# resumable per-example results
# ----------------------------------------------------------------------------------------------------------------
def read_results(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, clean) from a results jsonl. A last line without its newline (a crash mid-write) is dropped and
    `clean` is False; a malformed complete line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return [], True
    data = path.read_bytes()
    lines = data.split(b"\n")
    clean = True
    if lines and lines[-1] != b"":  # no trailing newline: the last write did not finish
        log.warning("%s: dropping a truncated last line (%d bytes); it will be evaluated again", path,
                    len(lines[-1]))
        clean = False
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"malformed result row ({err}); delete the file to evaluate again", str(path),
                            lineno) from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise DataError("result row without a string `id`", str(path), lineno)
        rows.append(row)
    return rows, clean


def _append_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _matches(row: Mapping[str, Any], ex: QAExample) -> bool:
    return row.get("question") == ex.question and row.get("golden_answers") == list(ex.golden_answers)


def evaluate_dataset(engine: Any, examples: Sequence[QAExample], results_path: str | Path, batch_size: int,
                     progress: Callable[[dict[str, Any]], None] | None = None,
                     normalization: str = DEFAULT_NORMALIZATION) -> list[dict[str, Any]]:
    """Greedy rollouts (G = 1, temperature 0) of `examples` in batches; returns one row per example, in order,
    scored by `score_rollout` under `normalization`.

    Rows are appended to `results_path` as each batch finishes (flush + fsync). Ids already in the file are not
    rolled out again, unless their stored question or gold answers differ from the example's. When done, the file
    holds exactly the returned rows, in example order (rows of other ids are dropped), so an interrupted and
    resumed evaluation leaves the same file as an uninterrupted one. `progress` gets {"done", "total", "em"}
    after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"evaluate_dataset: batch_size must be >= 1, got {batch_size}")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)[:5]
        raise DataError(f"duplicate question ids {dup}: results are resumed by id", str(results_path))
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_id = {ex.id: ex for ex in examples}

    stored, clean = read_results(path)
    done: dict[str, dict[str, Any]] = {}
    for row in stored:
        ex = by_id.get(row["id"])
        if ex is not None and row["id"] not in done and _matches(row, ex):
            done[row["id"]] = row
    if not clean or len(done) != len(stored):
        # Rewrite before appending: a truncated tail would otherwise glue onto the next row.
        write_jsonl(path, list(done.values()))
    if done:
        log.info("%s: resuming, %d of %d examples already evaluated", path, len(done), len(examples))

    todo = [ex for ex in examples if ex.id not in done]
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        result = engine.run(batch, group_size=1, temperature=0.0)
        rows = [score_rollout(r, normalization) for r in result.rollouts]
        _append_rows(path, rows)
        done.update((row["id"], row) for row in rows)
        if progress is not None:
            progress({"done": len(done), "total": len(examples),
                      "em": sum(r["em"] for r in done.values()) / len(done)})

    final = [done[i] for i in ids]
    if [r["id"] for r in read_results(path)[0]] != ids:
        write_jsonl(path, final)  # canonical order (rows redone after a change were appended at the end)
    return final


# ----------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------
def ordered_runs(runs: Iterable[str]) -> list[str]:
    """SFT, GRPO, (GRPO-FOLR,) TSPO first, then any other run alphabetically."""
    runs = list(runs)
    known = [r for r in RUN_ORDER if r in runs]
    return known + sorted(r for r in runs if r not in RUN_ORDER)


def run_label(run: str) -> str:
    return {"grpo_folr": "GRPO-FOLR"}.get(run, run.upper())


def markdown_table(metrics_by_run: Mapping[str, Mapping[str, Any]], metric: str = "em", digits: int = 3) -> str:
    """Rows = runs (SFT / GRPO / TSPO ...), columns = the seven datasets + Avg.; cells = `metric` of each run's
    metrics (the `run_evaluate` result: `datasets` per name and `average`). A dataset a run did not evaluate shows
    "–"; the best value of each column is bold when runs differ in it.

    >>> m = {"datasets": {"nq": {"em": 0.5}}, "average": {"em": 0.5}}
    >>> print(markdown_table({"tspo": m}))
    | Run | NQ | TriviaQA | PopQA | HotpotQA | 2Wiki | MuSiQue | Bamboogle | Avg. |
    |---|---:|---:|---:|---:|---:|---:|---:|---:|
    | TSPO | 0.500 | – | – | – | – | – | – | 0.500 |
    """
    runs = ordered_runs(metrics_by_run)
    columns = [*FAMILIES, "average"]

    def value(run: str, col: str) -> float | None:
        m = metrics_by_run[run]
        cell = m.get("average") if col == "average" else m.get("datasets", {}).get(col)
        return None if cell is None or cell.get(metric) is None else float(cell[metric])

    values = {(r, c): value(r, c) for r in runs for c in columns}
    best = {}
    for c in columns:
        present = [v for r in runs if (v := values[r, c]) is not None]
        best[c] = max(present) if len(present) >= 2 and len(set(present)) > 1 else None

    def cell(r: str, c: str) -> str:
        v = values[r, c]
        if v is None:
            return "–"
        text = f"{v:.{digits}f}"
        return f"**{text}**" if best[c] is not None and round(v, digits) == round(best[c], digits) else text

    header = "| Run | " + " | ".join(DISPLAY_NAMES[f] for f in FAMILIES) + " | Avg. |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    lines += ["| " + run_label(r) + " | " + " | ".join(cell(r, c) for c in columns) + " |" for r in runs]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# stage driver
# ----------------------------------------------------------------------------------------------------------------
def find_split(data_dir: str | Path, name: str, split: str) -> str | None:
    """The first of `split`, test, dev with a non-empty `data_dir/<name>/<split>.jsonl`; None when there is none."""
    for s in dict.fromkeys((split, *SPLIT_FALLBACKS)):
        path = Path(data_dir) / name / f"{s}.jsonl"
        if path.is_file() and path.stat().st_size > 0:
            return s
    return None


def fingerprint(checkpoint: str | Path, settings: Mapping[str, Any]) -> str:
    """sha256 over the checkpoint's files (names and contents, the run record's timings left out, as DVC leaves
    them out) and the settings that change a rollout."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    root = Path(checkpoint)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != RUN_RECORD):
        h.update(f.relative_to(root).as_posix().encode() + b"\x00")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _prepare_run_dir(run_dir: Path, key: str) -> None:
    """Keep resumable results only when they were made by the same checkpoint and settings."""
    fp_file = run_dir / FINGERPRINT_FILE
    if fp_file.is_file():
        try:
            old = json.loads(fp_file.read_text(encoding="utf-8")).get("fingerprint")
        except json.JSONDecodeError:
            old = None
        if old != key:
            stale = sorted(run_dir.glob("*.jsonl"))
            log.warning("%s: checkpoint or settings changed; discarding %d earlier result file(s)", run_dir,
                        len(stale))
            for f in stale:
                f.unlink()
    elif any(run_dir.glob("*.jsonl")):
        log.warning("%s: results without a fingerprint; discarding them", run_dir)
        for f in run_dir.glob("*.jsonl"):
            f.unlink()
    write_json(fp_file, {"fingerprint": key})


def compact_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The DVC metric `eval_<run>.json`: the average EM, F1 and cover-EM over the datasets (`em`, `f1`, `cover_em`)
    and the EM of each dataset under its name; the rest (`run_evaluate`'s full result) is in `detail/`.

    >>> compact_metrics({"datasets": {"nq": {"em": 0.5, "f1": 0.6}}, "average": {"em": 0.5, "f1": 0.6,
    ...                  "cover_em": 0.7, "n": 9}, "meta": {"seconds": 3.0}})
    {'em': 0.5, 'f1': 0.6, 'cover_em': 0.7, 'nq': 0.5}
    """
    avg = metrics.get("average") or {}
    out = {k: avg[k] for k in ("em", "f1", "cover_em") if k in avg}
    out.update({name: m["em"] for name, m in (metrics.get("datasets") or {}).items() if "em" in m})
    return out


def run_evaluate(params: Any, checkpoint_dir: str | Path, run_name: str,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Stage `evaluate@<run>`: greedy evaluation of one checkpoint on `eval.datasets`.

    Writes the full metrics to `<paths.metrics_dir>/detail/eval_<run>.json` (per-dataset metrics under `datasets`,
    their unweighted `average`, and `meta`: splits used, datasets skipped for lack of a file, subset settings,
    seconds, environment), their headline (`compact_metrics`) to the DVC metric `<paths.metrics_dir>/eval_<run>.json`,
    per-example rows in `<paths.eval_dir>/<run>/<dataset>.jsonl` and the EM table in
    `<paths.eval_dir>/<run>/table.md`; returns the full metrics. Raises `DataError` when no dataset has any question
    to evaluate.
    """
    from tspo_core.config import dump_params
    from tspo_core.pipeline import device, load_split, make_engine, open_retriever
    from tspo_core.policy import load_policy

    check_run_name(run_name)
    t0 = time.monotonic()
    cfg, paths = params.eval, params.paths
    # vLLM generates from the checkpoint itself: the HF copy only supplies the tokenizer, so keep it off the GPU.
    policy, tokenizer = load_policy(checkpoint_dir, params.model,
                                    "cpu" if params.rollout.backend == "vllm" else device())
    policy.eval()
    run_dir = Path(paths.eval_dir) / run_name
    # Everything that changes a greedy rollout (not the training-only sampling knobs), and the index build.
    rollout = params.rollout.model_dump(mode="json", exclude={"group_size", "temperature", "top_p"})
    card = Path(paths.index_dir) / "index_card.json"
    settings = {"rollout": rollout, "top_k": params.retrieval.top_k, "model": params.model.model_dump(mode="json"),
                "index_card": hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None,
                "answer_normalization": cfg.answer_normalization}
    _prepare_run_dir(run_dir, fingerprint(checkpoint_dir, settings))

    retriever = open_retriever(params.retrieval, paths)
    try:
        engine = make_engine(policy, tokenizer, retriever, params.rollout, params.retrieval, params.model,
                             checkpoint=str(checkpoint_dir))
        per_dataset: dict[str, dict[str, Any]] = {}
        splits: dict[str, str] = {}
        skipped: dict[str, str] = {}
        for name in cfg.datasets:
            split = find_split(paths.data_dir, name, cfg.split)
            examples = load_split(paths.data_dir, name, split) if split else []
            if not examples:
                tried = ",".join(dict.fromkeys((cfg.split, *SPLIT_FALLBACKS)))
                skipped[name] = f"no questions in {Path(paths.data_dir) / name}/{{{tried}}}.jsonl"
                log.warning("evaluate %s: skipping %s (%s)", run_name, name, skipped[name])
                continue
            if split != cfg.split:
                log.info("evaluate %s: %s has no %s split; using %s", run_name, name, cfg.split, split)
            chosen = subset(examples, cfg.subset_size, cfg.seed)
            report = None if progress is None else (lambda info, name=name: progress({"dataset": name, **info}))
            rows = evaluate_dataset(engine, chosen, run_dir / f"{name}.jsonl", cfg.batch_size, report,
                                    cfg.answer_normalization)
            per_dataset[name], splits[name] = aggregate(rows), split
            log.info("evaluate %s: %s EM %.3f on %d questions (%s)", run_name, name, per_dataset[name]["em"],
                     len(rows), split)
    finally:
        close = getattr(retriever, "close", None)
        if callable(close):
            close()

    if not per_dataset:
        raise DataError(f"nothing to evaluate for run {run_name!r}: " + "; ".join(f"{k}: {v}" for k, v in
                                                                                   skipped.items()), paths.data_dir)
    for f in run_dir.glob("*.jsonl"):  # results of datasets no longer evaluated are not this run's outputs
        if f.stem not in per_dataset:
            f.unlink()
    metrics = {
        "datasets": per_dataset,
        "average": average_metrics(per_dataset),
        "meta": {"run": run_name, "checkpoint": str(checkpoint_dir), "split": cfg.split, "splits_used": splits,
                 "skipped": skipped, "subset_size": cfg.subset_size, "seed": cfg.seed,
                 "answer_normalization": cfg.answer_normalization, "environment": environment(),
                 "seconds": round(time.monotonic() - t0, 1)},
    }
    declared = Path(paths.metrics_dir) / f"eval_{run_name}.json"
    write_json(detail_path(declared), metrics)
    write_json(declared, compact_metrics(metrics))
    write_text(run_dir / "table.md", markdown_table({run_name: metrics}) + "\n")
    write_text(run_dir / "params.resolved.yaml", dump_params(params))
    return metrics
