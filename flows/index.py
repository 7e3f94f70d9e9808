"""Stage `index`: encode the corpus and build the retrieval index (dense FAISS or BM25) with its index card."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import load, main, publish, retry_unless_bad_input
from tspo_core.config import FAMILIES
from tspo_core.data.loaders import load_flashrag_jsonl
from tspo_core.io import write_json
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


@flow(name="index")
def index_flow(params_path: str = "params.yaml") -> dict:
    card = build(params_path)
    params = load(params_path)
    probe = card.get("probe") or {}
    metrics = {"passages": card.get("num_passages"), "build_seconds": card.get("build_time_s"), **probe}
    write_json(Path(params.paths.metrics_dir) / "index.json", {**metrics, "meta": {"environment": environment()}})
    publish("index", "Index card", [{"key": k, "value": v} for k, v in metrics.items()],
            notes=f"{card.get('kind')} index, encoder {card.get('encoder', {}).get('name', '-')}")
    return card


if __name__ == "__main__":
    main(index_flow, __doc__)
