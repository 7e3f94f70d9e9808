"""Stage `index`: encode the corpus and build the retrieval index (dense FAISS or BM25) with its index card."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import load, main, publish, retry_unless_bad_input
from tspo_core.config import FAMILIES
from tspo_core.data.loaders import load_flashrag_jsonl
from tspo_core.io import write_json
from tspo_core.layout import detail_path
from tspo_core.runinfo import environment
from tspo_core.retrieval.index import build_index


def probe_questions(data_dir: Path) -> list:
    """Dev questions whose supporting passages are known (synthetic families; real files rarely have them)."""
    probe = []
    for name in FAMILIES:
        path = data_dir / name / "dev.jsonl"
        if path.is_file() and path.stat().st_size:
            probe += [ex for ex in load_flashrag_jsonl(path) if ex.metadata.get("supporting_ids")]
    return probe


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def build(params_path: str) -> dict:
    params = load(params_path)
    data_dir = Path(params.paths.data_dir)
    card = build_index(data_dir / "corpus.jsonl", params.index, Path(params.paths.index_dir),
                       probe=probe_questions(data_dir))
    return card


def index_metrics(card: dict) -> tuple[dict, dict]:
    """(the DVC metric `index.json`: `passages` and `recall@3` of the supporting passage on the probe questions
    when there is a probe; the full record for `detail/index.json`: every probe figure, timings, environment)."""
    probe = card.get("probe") or {}
    full = {"passages": card.get("num_passages"), "build_seconds": card.get("build_time_s"), **probe,
            "meta": {"environment": environment()}}
    return {"passages": card.get("num_passages"), **{k: probe[k] for k in ("recall@3",) if probe.get(k) is not None}}, full


@flow(name="index")
def index_flow(params_path: str = "params.yaml") -> dict:
    card = build(params_path)
    params = load(params_path)
    compact, metrics = index_metrics(card)
    declared = Path(params.paths.metrics_dir) / "index.json"
    write_json(detail_path(declared), metrics)
    write_json(declared, compact)
    metrics = {k: v for k, v in metrics.items() if k != "meta"}
    publish("index", "Index card", [{"key": k, "value": v} for k, v in metrics.items()],
            notes=f"{card.get('kind')} index, encoder {card.get('encoder', {}).get('name', '-')}")
    return card


if __name__ == "__main__":
    main(index_flow, __doc__)
