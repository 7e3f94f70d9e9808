"""Stage `data`: write the pipeline's data directory, from the synthetic world or from real files.

Layout of `out_dir` (written as a whole under a temporary name and swapped in only when complete, so a failure
leaves no half-written directory and a previous good one stays as it was):

    corpus.jsonl                      one {"id", "contents"} per line
    <family>/{train,dev,test}.jsonl   FlashRAG records (synthetic: all three splits of every family;
                                      files: test from `files.eval`, dev from `files.dev`)
    rl_train.jsonl                    the RL training questions (synthetic: the train splits of
                                      `rl_train_families`, in that order, or with `synthetic.n_rl_worlds` their
                                      questions from those sub-worlds, which the train splits then leave out;
                                      files: the `files.train` files, in order)
    lexicon.json                      synthetic only: the world's lexicon
    manifest.json                     the summary below plus the sha256 and size of every other file

Same inputs -> byte-identical files (no timestamps, no absolute paths, stable order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tspo_core.config import FAMILIES, DataConfig, SyntheticConfig
from tspo_core.data.loaders import iter_corpus, load_dataset_file
from tspo_core.data.schema import Passage, QAExample
from tspo_core.errors import DataError
from tspo_core.io import atomic_dir, write_json, write_jsonl

SPLITS: tuple[str, ...] = ("train", "dev", "test")
MANIFEST = "manifest.json"


def build_datasets(data_cfg: DataConfig, out_dir: str | Path, *, base_dir: str | Path | None = None) -> dict:
    """Write the data directory `out_dir` and return its summary.

    Summary keys: `source`, `corpus` (passages), `rl_train` (questions), `datasets` ({name: {split: count}}),
    `rl_train_from` (families or files), `seed` (synthetic) or `inputs` (files: the paths as configured), and
    `files` ({relative path: {"sha256", "bytes"}}). The same dict is saved as `manifest.json`.
    Relative input paths (source = files) are resolved against `base_dir` (default: the working directory).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if data_cfg.source == "synthetic":
            summary = _build_synthetic(data_cfg, tmp)
        else:
            summary = _build_files(data_cfg, tmp, Path(base_dir) if base_dir is not None else Path.cwd())
        summary["files"] = _file_hashes(tmp)
        write_json(tmp / MANIFEST, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------------------------
def _generate_world(synthetic: SyntheticConfig, seed: int) -> Any:
    """Indirection (imported lazily) so tests can substitute a small world."""
    from tspo_core.data.world import generate_world

    return generate_world(synthetic, seed)


def _build_synthetic(data_cfg: DataConfig, out: Path) -> dict[str, Any]:
    assert data_cfg.synthetic is not None  # DataConfig guarantees it for source = synthetic
    world = _generate_world(data_cfg.synthetic, data_cfg.seed)
    where = "synthetic world"

    n_corpus = _write_corpus(out / "corpus.jsonl", world.corpus, where)

    datasets: Mapping[str, Mapping[str, list[QAExample]]] = world.datasets
    unknown = sorted(set(datasets) - set(FAMILIES))
    if unknown:
        raise DataError(f"unknown families {unknown} in the generated datasets; known: {list(FAMILIES)}", where)
    syn = data_cfg.synthetic
    rl_worlds = range(syn.n_worlds - syn.n_eval_worlds - syn.n_rl_worlds, syn.n_worlds - syn.n_eval_worlds)

    def in_rl_worlds(ex: QAExample) -> bool:
        return ex.metadata.get("world") in rl_worlds

    counts: dict[str, dict[str, int]] = {}
    for family in FAMILIES:
        if family not in datasets:
            continue
        splits = datasets[family]
        extra = sorted(set(splits) - set(SPLITS))
        if extra:
            raise DataError(f"family {family!r}: unknown splits {extra}; known: {list(SPLITS)}", where)
        counts[family] = {}
        for split in SPLITS:
            examples = list(splits.get(split, []))
            if split == "train" and syn.n_rl_worlds:  # RL-only sub-worlds never reach the SFT warmup
                examples = [ex for ex in examples if not in_rl_worlds(ex)]
            _check_examples(examples, f"{where}: {family}/{split}")
            counts[family][split] = _write_examples(out / family / f"{split}.jsonl", examples)

    rl: list[QAExample] = []
    origin: dict[str, str] = {}
    for family in data_cfg.rl_train_families:
        if family not in datasets:
            raise DataError(f"rl_train_families names {family!r}, which the world did not generate", where)
        for ex in datasets[family].get("train", []):
            if syn.n_rl_worlds and not in_rl_worlds(ex):
                continue
            if ex.id in origin:
                raise DataError(f"duplicate id {ex.id!r} in the RL training set: in {origin[ex.id]}/train and "
                                f"{family}/train", where)
            origin[ex.id] = family
            rl.append(ex)
    n_rl = _write_examples(out / "rl_train.jsonl", rl)
    if n_rl == 0:
        raise DataError(f"the RL training set is empty: no train questions in {data_cfg.rl_train_families}", where)

    write_json(out / "lexicon.json", world.lexicon)
    return {
        "source": "synthetic",
        "seed": data_cfg.seed,
        "corpus": n_corpus,
        "rl_train": n_rl,
        "rl_train_from": list(data_cfg.rl_train_families),
        **({"rl_worlds": [rl_worlds.start, rl_worlds.stop - 1]} if syn.n_rl_worlds else {}),
        "datasets": counts,
    }


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def _build_files(data_cfg: DataConfig, out: Path, base: Path) -> dict[str, Any]:
    files = data_cfg.files
    assert files is not None  # DataConfig guarantees it for source = files
    resolve = lambda p: base / p  # noqa: E731 - absolute paths stay absolute

    corpus_path = resolve(files.corpus)
    # iter_corpus checks ids itself (its errors name the line), so the writer need not keep a second id set.
    n_corpus = _write_corpus(out / "corpus.jsonl", iter_corpus(corpus_path), str(corpus_path), check_unique=False)

    rl: list[QAExample] = []
    origin: dict[str, str] = {}
    for name in files.train:
        path = resolve(name)
        for ex in load_dataset_file(path):
            if ex.id in origin:
                where = "listed twice in files.train" if origin[ex.id] == str(path) else f"also in {origin[ex.id]}"
                raise DataError(f"duplicate id {ex.id!r} in the RL training set ({where}); training ids must be "
                                "unique across all train files", str(path))
            origin[ex.id] = str(path)
            rl.append(ex)
    n_rl = _write_examples(out / "rl_train.jsonl", rl)

    counts: dict[str, dict[str, int]] = {}
    for family in FAMILIES:  # fixed order, whatever the order of the config's mapping
        for split, mapping in (("dev", files.dev), ("test", files.eval)):
            if family in mapping:
                examples = load_dataset_file(resolve(mapping[family]))
                counts.setdefault(family, {})[split] = _write_examples(out / family / f"{split}.jsonl", examples)

    return {
        "source": "files",
        "corpus": n_corpus,
        "rl_train": n_rl,
        "rl_train_from": list(files.train),
        "datasets": counts,
        "inputs": {"corpus": files.corpus, "train": list(files.train),
                   "eval": {k: files.eval[k] for k in FAMILIES if k in files.eval},
                   "dev": {k: files.dev[k] for k in FAMILIES if k in files.dev}},
    }


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
def _write_corpus(path: Path, passages: Iterable[Passage], where: str, check_unique: bool = True) -> int:
    seen: set[str] = set()

    def records() -> Iterable[dict[str, str]]:
        for p in passages:
            if not p.contents.strip():
                raise DataError(f"passage {p.id!r} has empty contents", where)
            if check_unique:
                if p.id in seen:
                    raise DataError(f"duplicate passage id {p.id!r}", where)
                seen.add(p.id)
            yield p.to_json()

    n = write_jsonl(path, records())
    if n == 0:
        raise DataError("the corpus is empty", where)
    return n


def _write_examples(path: Path, examples: Iterable[QAExample]) -> int:
    return write_jsonl(path, (ex.to_json() for ex in examples))


def _check_examples(examples: list[QAExample], where: str) -> None:
    """Generated records get the checks the loaders apply to files: unique ids, a question, non-blank answers."""
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"duplicate id {ex.id!r}", where)
        seen.add(ex.id)
        if not ex.question.strip():
            raise DataError(f"{ex.id!r}: empty question", where)
        if not ex.golden_answers or any(not a.strip() for a in ex.golden_answers):
            raise DataError(f"{ex.id!r}: empty or blank golden answers {ex.golden_answers!r}", where)


def _file_hashes(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    return out
