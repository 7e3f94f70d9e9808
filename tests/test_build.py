"""build_datasets: files source on the real samples, synthetic source (a small fake world), atomicity, determinism."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo_core.config import FAMILIES, DataConfig, FilesConfig, load_params
from tspo_core.data import build as build_mod
from tspo_core.data.build import build_datasets
from tspo_core.data.loaders import load_corpus, load_flashrag_jsonl
from tspo_core.data.schema import Passage, QAExample
from tspo_core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SYNTH = load_params(REPO / "params.yaml").data.synthetic


def _files_cfg(real: Path, **files) -> DataConfig:
    spec = {"corpus": str(real / "corpus.jsonl"),
            "train": [str(real / "nq.jsonl"), str(real / "hotpotqa.jsonl")],
            "eval": {f: str(real / f"{f}.jsonl") for f in FAMILIES},
            "dev": {"hotpotqa": str(real / "hotpotqa.jsonl")}}
    spec.update(files)
    return DataConfig(source="files", synthetic=SYNTH, files=FilesConfig(**spec))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep


# ----------------------------------------------------------------------------------------------------------------
# files source, real samples
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_build(real_qa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "data"
    summary = build_datasets(_files_cfg(real_qa_dir), out)
    return out, summary


def test_files_build_layout_and_summary(real_build, real_qa_dir):
    out, summary = real_build
    expected = {"corpus.jsonl", "rl_train.jsonl", "manifest.json", "hotpotqa/dev.jsonl"}
    expected |= {f"{f}/test.jsonl" for f in FAMILIES}
    assert set(_tree(out)) == expected
    assert summary["source"] == "files"
    assert summary["corpus"] == 6742
    assert summary["rl_train"] == 400
    assert summary["datasets"] == {f: ({"dev": 200, "test": 200} if f == "hotpotqa" else
                                       {"test": 60 if f == "bamboogle" else 200}) for f in FAMILIES}
    assert list(summary["datasets"]) == list(FAMILIES)
    assert summary["inputs"]["corpus"] == str(real_qa_dir / "corpus.jsonl")
    # the keys the data flow publishes
    assert isinstance(summary["corpus"], int) and isinstance(summary["rl_train"], int)


def test_files_build_content_round_trips(real_build, real_qa_dir):
    out, _ = real_build
    for f in FAMILIES:
        assert load_flashrag_jsonl(out / f / "test.jsonl") == load_flashrag_jsonl(real_qa_dir / f"{f}.jsonl")
    rl = load_flashrag_jsonl(out / "rl_train.jsonl")
    src = load_flashrag_jsonl(real_qa_dir / "nq.jsonl") + load_flashrag_jsonl(real_qa_dir / "hotpotqa.jsonl")
    assert rl == src                                   # concatenation, in the configured order
    assert load_corpus(out / "corpus.jsonl") == load_corpus(real_qa_dir / "corpus.jsonl")
    first = json.loads((out / "nq" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "nq_litm_0", "question": "who got the first nobel prize in physics",
                     "golden_answers": ["Wilhelm Conrad Röntgen"], "metadata": {}}   # FlashRAG record, UTF-8 kept


def test_manifest_matches_files(real_build):
    out, summary = real_build
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest == summary
    tree = _tree(out)
    assert set(manifest["files"]) == set(tree) - {"manifest.json"}
    for rel, info in manifest["files"].items():
        assert info["sha256"] == hashlib.sha256(tree[rel]).hexdigest()
        assert info["bytes"] == len(tree[rel])


def test_files_build_is_deterministic(real_build, real_qa_dir, tmp_path):
    out, _ = real_build
    again = tmp_path / "data"
    build_datasets(_files_cfg(real_qa_dir), again)
    assert _tree(again) == _tree(out)


def test_relative_paths_resolve_against_base_dir(real_qa_dir, tmp_path):
    cfg = _files_cfg(real_qa_dir, corpus="corpus.jsonl", train=["nq.jsonl"], eval={"bamboogle": "bamboogle.jsonl"},
                     dev={})
    summary = build_datasets(cfg, tmp_path / "data", base_dir=real_qa_dir)
    assert summary["inputs"] == {"corpus": "corpus.jsonl", "train": ["nq.jsonl"],
                                 "eval": {"bamboogle": "bamboogle.jsonl"}, "dev": {}}
    assert summary["datasets"] == {"bamboogle": {"test": 60}} and summary["rl_train"] == 200
    with pytest.raises(DataError, match="file not found"):
        build_datasets(cfg, tmp_path / "other", base_dir=tmp_path)


def test_duplicate_train_ids_across_files_name_both(real_qa_dir, tmp_path):
    # HotpotQA and 2Wiki dev samples both number their ids dev_0, dev_1, ...: merging them would merge groups.
    cfg = _files_cfg(real_qa_dir, train=[str(real_qa_dir / "hotpotqa.jsonl"),
                                         str(real_qa_dir / "2wikimultihopqa.jsonl")])
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tmp_path / "data")
    msg = str(info.value)
    assert "duplicate id 'dev_0'" in msg
    assert str(real_qa_dir / "hotpotqa.jsonl") in msg and str(real_qa_dir / "2wikimultihopqa.jsonl") in msg
    _no_leftovers(tmp_path, set())

    twice = _files_cfg(real_qa_dir, train=[str(real_qa_dir / "nq.jsonl")] * 2)
    with pytest.raises(DataError, match="listed twice in files.train"):
        build_datasets(twice, tmp_path / "data")


def test_parquet_train_file(real_qa_dir, tmp_path):
    rows = [{"data_source": src, "prompt": [{"role": "user", "content": f"Question: q{i}?"}], "ability": "qa",
             "reward_model": {"style": "rule", "ground_truth": {"target": ["a"]}},
             "extra_info": {"split": "train", "index": i}} for src in ("nq", "hotpotqa") for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    cfg = _files_cfg(real_qa_dir, train=[str(tmp_path / "train.parquet")], eval={"nq": str(real_qa_dir / "nq.jsonl")},
                     dev={})
    summary = build_datasets(cfg, tmp_path / "data")
    ids = [e.id for e in load_flashrag_jsonl(tmp_path / "data" / "rl_train.jsonl")]
    assert summary["rl_train"] == 6 and len(set(ids)) == 6 and ids[3] == "hotpotqa-train-0"


# ----------------------------------------------------------------------------------------------------------------
# atomicity
# ----------------------------------------------------------------------------------------------------------------
def _bad_eval(tmp_path: Path) -> Path:
    bad = tmp_path / "inputs" / "bad.jsonl"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text('{"id": "a", "question": "q?", "golden_answers": ["x"]}\n{"id": "b", "question": "q?"}\n',
                   encoding="utf-8")
    return bad


def test_failed_first_build_leaves_nothing(real_qa_dir, tmp_path):
    bad = _bad_eval(tmp_path)
    parent = tmp_path / "out"
    parent.mkdir()
    cfg = _files_cfg(real_qa_dir, eval={"nq": str(real_qa_dir / "nq.jsonl"), "musique": str(bad)})
    with pytest.raises(DataError) as info:
        build_datasets(cfg, parent / "data")
    assert str(info.value).startswith(f"{bad}:2: missing field 'golden_answers'")
    _no_leftovers(parent, set())                       # no output dir, no temporary dir


def test_failed_rebuild_keeps_previous_output(real_qa_dir, tmp_path):
    parent = tmp_path / "out"
    out = parent / "data"
    cfg = _files_cfg(real_qa_dir, dev={})
    build_datasets(cfg, out)
    before = _tree(out)
    bad = _bad_eval(tmp_path)
    for broken in (_files_cfg(real_qa_dir, eval={"bamboogle": str(bad)}),              # a bad eval file
                   _files_cfg(real_qa_dir, corpus=str(bad)),                            # a bad corpus
                   _files_cfg(real_qa_dir, train=[str(real_qa_dir / "nq.jsonl"), str(bad)])):
        with pytest.raises(DataError, match="bad.jsonl"):
            build_datasets(broken, out)
        assert _tree(out) == before
        _no_leftovers(parent, {"data"})


def test_bad_corpus_line_late_in_file(real_qa_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((real_qa_dir / "corpus.jsonl").read_bytes() + b'{"id": "late"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl:6743: passage without 'contents'"):
        build_datasets(_files_cfg(real_qa_dir, corpus=str(corpus)), tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------------------------
# synthetic source (a small fake world until tspo_core.data.world exists; the real one is tested below)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FakeWorld:
    corpus: list[Passage]
    datasets: dict[str, dict[str, list[QAExample]]]
    lexicon: dict = field(default_factory=dict)


def _fake_world(seed: int = 0) -> FakeWorld:
    corpus = [Passage(f"w{i}", f'"Entity {i}"\nEntity {i} was born in Città {i + seed}.') for i in range(5)]
    datasets = {}
    for f in FAMILIES:
        datasets[f] = {split: [QAExample(f"{f}-{split}-{i}", f"Where was Entity {i} born?", [f"Città {i + seed}"],
                                         {"supporting_ids": [f"w{i}"]}) for i in range(n)]
                       for split, n in (("train", 0 if f == "bamboogle" else 3), ("dev", 2), ("test", 2))}
    return FakeWorld(corpus, datasets, {"people": ["Entity 0"], "cities": {"Città 0": "Land"}})


def _synthetic_cfg(**kw) -> DataConfig:
    return DataConfig(source="synthetic", seed=kw.pop("seed", 7), synthetic=SYNTH, **kw)


@pytest.fixture
def fake_world(monkeypatch):
    calls = []

    def generate(synthetic, seed):
        calls.append((synthetic, seed))
        return _fake_world(seed)

    monkeypatch.setattr(build_mod, "_generate_world", generate)
    return calls


def test_synthetic_build_layout(fake_world, tmp_path):
    cfg = _synthetic_cfg(rl_train_families=["hotpotqa", "nq"])
    summary = build_datasets(cfg, tmp_path / "data")
    assert fake_world == [(cfg.synthetic, 7)]
    out = tmp_path / "data"
    expected = {"corpus.jsonl", "rl_train.jsonl", "lexicon.json", "manifest.json"}
    expected |= {f"{f}/{s}.jsonl" for f in FAMILIES for s in ("train", "dev", "test")}
    assert set(_tree(out)) == expected
    assert summary["source"] == "synthetic" and summary["seed"] == 7 and summary["corpus"] == 5
    assert summary["datasets"]["bamboogle"] == {"train": 0, "dev": 2, "test": 2}
    assert summary["datasets"]["nq"] == {"train": 3, "dev": 2, "test": 2}
    assert (out / "bamboogle" / "train.jsonl").read_bytes() == b""
    rl = [e.id for e in load_flashrag_jsonl(out / "rl_train.jsonl")]
    assert rl == [f"hotpotqa-train-{i}" for i in range(3)] + [f"nq-train-{i}" for i in range(3)]
    assert summary["rl_train"] == 6 and summary["rl_train_from"] == ["hotpotqa", "nq"]
    assert json.loads((out / "lexicon.json").read_text(encoding="utf-8")) == _fake_world(7).lexicon
    assert load_flashrag_jsonl(out / "nq" / "dev.jsonl")[0].metadata == {"supporting_ids": ["w0"]}
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == summary


def test_rl_worlds_are_kept_out_of_the_sft_train_splits(monkeypatch, tmp_path):
    def generate(synthetic, seed):
        world = _fake_world(seed)
        for splits in world.datasets.values():  # train questions from sub-worlds 51, 52, 53 (of 54 training ones)
            for i, ex in enumerate(splits["train"]):
                ex.metadata["world"] = 51 + i
        return world

    monkeypatch.setattr(build_mod, "_generate_world", generate)
    synth = SYNTH.model_copy(update={"n_rl_worlds": 2})  # 60 worlds, 6 for eval: RL-only worlds are 52 and 53
    summary = build_datasets(DataConfig(source="synthetic", seed=7, synthetic=synth,
                                        rl_train_families=["nq", "hotpotqa"]), tmp_path / "data")
    out = tmp_path / "data"
    for family in ("nq", "popqa", "hotpotqa"):  # every family's train split loses the RL worlds' questions
        assert [e.id for e in load_flashrag_jsonl(out / family / "train.jsonl")] == [f"{family}-train-0"]
    rl = [e.id for e in load_flashrag_jsonl(out / "rl_train.jsonl")]
    assert rl == ["nq-train-1", "nq-train-2", "hotpotqa-train-1", "hotpotqa-train-2"]
    assert summary["rl_worlds"] == [52, 53] and summary["rl_train"] == 4
    assert summary["datasets"]["nq"]["train"] == 1 and summary["datasets"]["nq"]["dev"] == 2
    with pytest.raises(ValueError, match="n_rl_worlds"):
        SYNTH.model_validate({**SYNTH.model_dump(), "n_rl_worlds": 54})


def test_synthetic_build_is_deterministic(fake_world, tmp_path):
    build_datasets(_synthetic_cfg(), tmp_path / "a")
    build_datasets(_synthetic_cfg(), tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    build_datasets(_synthetic_cfg(seed=8), tmp_path / "c")
    assert _tree(tmp_path / "c") != _tree(tmp_path / "a")


@pytest.mark.parametrize("mutate, message", [
    (lambda w: w.datasets["nq"]["train"].append(w.datasets["nq"]["train"][0]), "duplicate id 'nq-train-0'"),
    (lambda w: w.datasets["hotpotqa"]["train"].append(QAExample("nq-train-1", "q?", ["a"])),
     "duplicate id 'nq-train-1' in the RL training set: in nq/train and hotpotqa/train"),
    (lambda w: w.datasets.pop("hotpotqa"), "rl_train_families names 'hotpotqa'"),
    (lambda w: w.datasets.update(squad={}), "unknown families ['squad']"),
    (lambda w: w.datasets["popqa"]["test"].append(QAExample("x", "q?", [" "])), "empty or blank golden answers"),
    (lambda w: w.corpus.append(w.corpus[0]), "duplicate passage id 'w0'"),
])
def test_synthetic_bad_world_keeps_previous_output(monkeypatch, tmp_path, mutate, message):
    monkeypatch.setattr(build_mod, "_generate_world", lambda synthetic, seed: _fake_world(seed))
    out = tmp_path / "data"
    build_datasets(_synthetic_cfg(), out)
    before = _tree(out)

    def broken(synthetic, seed):
        world = _fake_world(seed)
        mutate(world)
        return world

    monkeypatch.setattr(build_mod, "_generate_world", broken)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_datasets(_synthetic_cfg(), out)
    assert _tree(out) == before
    _no_leftovers(tmp_path, {"data"})


def test_interrupted_build_keeps_previous_output(monkeypatch, tmp_path):
    monkeypatch.setattr(build_mod, "_generate_world", lambda synthetic, seed: _fake_world(seed))
    out = tmp_path / "data"
    build_datasets(_synthetic_cfg(), out)
    before = _tree(out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_file_hashes", boom)  # fails after every data file is written
    with pytest.raises(KeyboardInterrupt):
        build_datasets(_synthetic_cfg(), out)
    assert _tree(out) == before
    _no_leftovers(tmp_path, {"data"})


def test_real_world_generator(tmp_path):
    """With the real generator (tspo_core.data.world, once present): a small world builds, twice the same."""
    pytest.importorskip("tspo_core.data.world")
    small = {f: {"train": 0 if f == "bamboogle" else 20, "dev": 5, "test": 5} for f in FAMILIES}
    raw = load_params(REPO / "params.yaml").data.model_dump()
    raw["synthetic"].update(splits=small, n_worlds=3, n_eval_worlds=1)
    cfg = DataConfig.model_validate(raw)
    summary = build_datasets(cfg, tmp_path / "a")
    assert summary["corpus"] > 0 and summary["rl_train"] > 0
    for f in FAMILIES:
        for split, n in cfg.synthetic.splits[f].model_dump().items():
            assert summary["datasets"][f][split] == n, (f, split)
    build_datasets(cfg, tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_real_sample_preset_names_the_shared_files_and_builds(real_qa_dir, tmp_path, monkeypatch):
    """configs/real_qa_sample.yaml (README: evaluate your checkpoint on real questions) points at the real samples
    with paths relative to the repository root, and its data build imports all seven datasets."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    params = load_params(repo / "configs" / "real_qa_sample.yaml")
    files = params.data.files
    assert Path(files.corpus).resolve() == (real_qa_dir / "corpus.jsonl").resolve()
    assert sorted(files.eval) == sorted(FAMILIES)
    summary = build_datasets(params.data, tmp_path / "data")
    assert (tmp_path / "data" / "corpus.jsonl").is_file()
    for name in FAMILIES:
        assert (tmp_path / "data" / name / "test.jsonl").stat().st_size > 0, name
    assert summary["corpus"] == _lines(real_qa_dir / "corpus.jsonl")
    assert summary["rl_train"] == _lines(real_qa_dir / "nq.jsonl")  # the nq sample is the preset's train file


def _lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())
