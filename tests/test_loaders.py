"""Loaders: every validation error names the file and the line (row), Search-R1 parquet round trip, real samples."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo_core.data.loaders import (iter_corpus, load_corpus, load_dataset_file, load_flashrag_jsonl,
                                    load_searchr1_parquet, question_from_prompt)
from tspo_core.data.schema import Passage, QAExample
from tspo_core.errors import DataError

FAMILY_SIZES = {"nq": 200, "triviaqa": 200, "popqa": 200, "hotpotqa": 200, "2wikimultihopqa": 200,
                "musique": 200, "bamboogle": 60}
GOOD = '{"id": "q1", "question": "Who?", "golden_answers": ["Ann"]}'
GOOD2 = '{"id": "q2", "question": "Where?", "golden_answers": ["Oslo", "Kristiania"], "metadata": {"hops": 1}}'
PASSAGE = '{"id": "p1", "contents": "\\"Oslo\\"\\nOslo is the capital of Norway."}'


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _lines(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def _raises_at(fn, path: Path, line: int | None, *fragments: str) -> DataError:
    with pytest.raises(DataError) as info:
        fn(path)
    err = info.value
    msg = str(err)
    assert str(path) in msg, msg
    assert err.path == str(path)
    assert err.line == line, msg
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return err


# ----------------------------------------------------------------------------------------------------------------
# FlashRAG jsonl
# ----------------------------------------------------------------------------------------------------------------
def test_flashrag_good_file(tmp_path):
    path = _write(tmp_path, "d.jsonl", _lines(GOOD, GOOD2))
    exs = load_flashrag_jsonl(path)
    assert exs == [QAExample("q1", "Who?", ["Ann"], {}), QAExample("q2", "Where?", ["Oslo", "Kristiania"], {"hops": 1})]
    assert exs[1].to_json() == json.loads(GOOD2)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = _write(tmp_path, "d.jsonl", _lines("", GOOD, "   ", "\t", GOOD2, ""))
    assert [e.id for e in load_flashrag_jsonl(path)] == ["q1", "q2"]
    bad = _write(tmp_path, "bad.jsonl", _lines(GOOD, "", "", '{"id": "q2", "question": "x"}'))
    _raises_at(load_flashrag_jsonl, bad, 4, "missing field 'golden_answers'")


def test_crlf_and_bom_are_tolerated(tmp_path):
    path = _write(tmp_path, "d.jsonl", ("\ufeff" + GOOD + "\r\n" + GOOD2 + "\r\n").encode("utf-8"))
    assert [e.id for e in load_flashrag_jsonl(path)] == ["q1", "q2"]


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path):
    rec = {"id": "u", "question": "a\u2028b\u0085c?", "golden_answers": ["Ré"]}
    path = _write(tmp_path, "d.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    assert load_flashrag_jsonl(path)[0].question == "a\u2028b\u0085c?"


@pytest.mark.parametrize("bad_line, fragments", [
    ('{"id": "q2", "question": "x", ', ["invalid JSON"]),
    ("not json", ["invalid JSON"]),
    ("[1, 2]", ["expected a JSON object, got array"]),
    ("42", ["expected a JSON object, got number"]),
    ('"text"', ["expected a JSON object, got string"]),
    ("null", ["expected a JSON object, got null"]),
    ('{"question": "x", "golden_answers": ["a"]}', ["missing field 'id'"]),
    ('{"id": "q2", "golden_answers": ["a"]}', ["missing field 'question'"]),
    ('{"id": "q2", "question": "x"}', ["missing field 'golden_answers'"]),
    ('{"id": 7, "question": "x", "golden_answers": ["a"]}', ["'id' must be a string, got number"]),
    ('{"id": "", "question": "x", "golden_answers": ["a"]}', ["empty 'id'"]),
    ('{"id": "q2", "question": 3, "golden_answers": ["a"]}', ["'question' must be a string, got number"]),
    ('{"id": "q2", "question": "x", "golden_answers": "a"}',
     ["'golden_answers' must be a list of strings, got string"]),
    ('{"id": "q2", "question": "x", "golden_answers": [1]}', ["golden_answers[0] must be a string, got number"]),
    ('{"id": "q2", "question": "x", "golden_answers": ["a", null]}', ["golden_answers[1] must be a string, got null"]),
    ('{"id": "q2", "question": "x", "golden_answers": ["a"], "metadata": "m"}', ["'metadata' must be an object"]),
    ('{"id": "q2", "question": "", "golden_answers": ["a"]}', ["empty question"]),
    ('{"id": "q2", "question": "  \\t ", "golden_answers": ["a"]}', ["empty question"]),
    ('{"id": "q2", "question": "x", "golden_answers": []}', ["empty answer list 'golden_answers'"]),
    ('{"id": "q2", "question": "x", "golden_answers": ["a", "  "]}', ["golden_answers[1] is blank"]),
    ('{"id": "q1", "question": "x", "golden_answers": ["a"]}', ["duplicate id 'q1' (first on line 1)"]),
])
def test_flashrag_errors_name_file_and_line(tmp_path, bad_line, fragments):
    path = _write(tmp_path, "data.jsonl", _lines(GOOD, "", bad_line, GOOD2))
    _raises_at(load_flashrag_jsonl, path, 3, *fragments)


def test_non_utf8_bytes_report_the_line(tmp_path):
    raw = (GOOD + "\n").encode() + b'{"id": "q2", "question": "caf\xe9?", "golden_answers": ["a"]}\n'
    path = _write(tmp_path, "latin1.jsonl", raw)
    _raises_at(load_flashrag_jsonl, path, 2, "not valid UTF-8", "\\xe9")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path, "empty.jsonl", content)
    _raises_at(load_flashrag_jsonl, path, None, "no records")


def test_missing_file_and_directory(tmp_path):
    _raises_at(load_flashrag_jsonl, tmp_path / "nope.jsonl", None, "file not found")
    (tmp_path / "dir.jsonl").mkdir()
    _raises_at(load_flashrag_jsonl, tmp_path / "dir.jsonl", None, "not a regular file")


def test_json_array_file_gets_a_hint(tmp_path):
    one_line = _write(tmp_path, "a.json", "[" + GOOD + "]\n")
    _raises_at(load_flashrag_jsonl, one_line, 1, "got array", "one object per line")
    pretty = _write(tmp_path, "b.json", "[\n  " + GOOD + "\n]\n")
    _raises_at(load_flashrag_jsonl, pretty, 1, "invalid JSON", "not a JSON array")


# ----------------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------------
def test_corpus_good(tmp_path):
    path = _write(tmp_path, "corpus.jsonl", _lines(PASSAGE, "", '{"id": "p2", "contents": "\\"T\\"\\nbody"}'))
    ps = load_corpus(path)
    assert ps == [Passage("p1", '"Oslo"\nOslo is the capital of Norway.'), Passage("p2", '"T"\nbody')]
    assert ps[0].title == "Oslo"


@pytest.mark.parametrize("bad_line, fragments", [
    ('{"id": "p2"}', ["passage without 'contents'"]),
    ('{"id": "p2", "title": "T", "text": "body"}', ["passage without 'contents'", "found 'text'"]),
    ('{"id": "p2", "contents": ""}', ["empty 'contents'"]),
    ('{"id": "p2", "contents": " \\n "}', ["empty 'contents'"]),
    ('{"id": "p2", "contents": ["x"]}', ["'contents' must be a string, got array"]),
    ('{"contents": "\\"T\\"\\nbody"}', ["missing field 'id'"]),
    ('{"id": 2, "contents": "\\"T\\"\\nbody"}', ["'id' must be a string, got number"]),
    ('{"id": "p1", "contents": "\\"T\\"\\nbody"}', ["duplicate passage id 'p1' (first on line 1)"]),
    ("{bad", ["invalid JSON"]),
    ("[]", ["expected a JSON object"]),
])
def test_corpus_errors_name_file_and_line(tmp_path, bad_line, fragments):
    path = _write(tmp_path, "corpus.jsonl", _lines(PASSAGE, "", bad_line))
    _raises_at(load_corpus, path, 3, *fragments)


def test_corpus_non_utf8_and_empty(tmp_path):
    path = _write(tmp_path, "c.jsonl", (PASSAGE + "\n").encode() + b'{"id": "p2", "contents": "\xff"}\n')
    _raises_at(load_corpus, path, 2, "not valid UTF-8")
    _raises_at(load_corpus, _write(tmp_path, "e.jsonl", "\n"), None, "no passages")


def test_iter_corpus_streams(tmp_path):
    path = _write(tmp_path, "c.jsonl", _lines(PASSAGE, '{"id": "p2", "contents": "\\"T\\"\\nx"}', "{broken"))
    it = iter_corpus(path)
    assert next(it).id == "p1"           # records come before the bad line is read
    assert next(it).id == "p2"
    with pytest.raises(DataError, match=r"c\.jsonl:3: invalid JSON"):
        next(it)


def test_iter_corpus_unchecked_ids(tmp_path):
    path = _write(tmp_path, "c.jsonl", _lines(PASSAGE, PASSAGE))
    assert len(list(iter_corpus(path, check_unique=False))) == 2
    _raises_at(lambda p: list(iter_corpus(p)), path, 2, "duplicate passage id")


# ----------------------------------------------------------------------------------------------------------------
# Search-R1 parquet
# ----------------------------------------------------------------------------------------------------------------
def _prompt(question: str) -> list[dict[str, str]]:
    text = ("Answer the given question. Reason inside <think> and </think>. For example, Question: Who is the "
            "mayor? <answer> Beijing </answer>. Question: " + question + "\n")
    return [{"role": "user", "content": text}]


def _row(source: str, split: str, index: int, prompt_q: str, target: list[str], **extra) -> dict:
    row = {"data_source": source, "prompt": _prompt(prompt_q), "ability": "fact-reasoning",
           "reward_model": {"style": "rule", "ground_truth": {"target": target}},
           "extra_info": {"split": split, "index": index}}
    row.update(extra)
    return row


def _parquet(tmp_path: Path, rows: list[dict], name: str = "train.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_searchr1_round_trip_ids_unique_across_sources(tmp_path):
    rows = [_row("nq", "train", 0, "who wrote hamlet?", ["Shakespeare", "William Shakespeare"]),
            _row("nq", "train", 1, "capital of norway?", ["Oslo"]),
            _row("hotpotqa", "train", 0, "same band?", ["yes"]),   # row index 0 again, another source
            _row("hotpotqa", "train", 1, "older?", ["Ann"])]
    path = _parquet(tmp_path, rows)
    exs = load_searchr1_parquet(path)
    assert [e.id for e in exs] == ["nq-train-0", "nq-train-1", "hotpotqa-train-0", "hotpotqa-train-1"]
    assert exs[0].question == "who wrote hamlet?"          # after the *last* "Question:", stripped
    assert exs[0].golden_answers == ["Shakespeare", "William Shakespeare"]
    assert exs[2].metadata == {"data_source": "hotpotqa", "split": "train", "index": 0, "ability": "fact-reasoning"}
    assert load_dataset_file(path) == exs


def test_searchr1_question_and_golden_answers_columns_win(tmp_path):
    rows = [_row("nq", "test", 0, "from prompt?", ["from target"], question="from column?",
                 golden_answers=["from column"]),
            _row("nq", "test", 1, "prompt two?", ["target two"], question=None, golden_answers=None)]
    exs = load_searchr1_parquet(_parquet(tmp_path, rows))
    assert (exs[0].question, exs[0].golden_answers) == ("from column?", ["from column"])
    assert (exs[1].question, exs[1].golden_answers) == ("prompt two?", ["target two"])   # nulls fall back


def test_searchr1_without_prompt_column(tmp_path):
    rows = [{"data_source": "nq", "question": "q?", "golden_answers": ["a"],
             "extra_info": {"split": "dev", "index": 5}}]
    assert load_searchr1_parquet(_parquet(tmp_path, rows))[0].id == "nq-dev-5"


def test_question_from_prompt():
    assert question_from_prompt("intro Question: first? more Question:  second?\n") == "second?"
    assert question_from_prompt("no marker") is None
    assert question_from_prompt("Question:   \n") is None


def _row_raises(path: Path, row: int, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        load_searchr1_parquet(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: row {row}: "), msg
    assert info.value.line == row and info.value.path == str(path)
    for frag in fragments:
        assert frag in msg, msg


@pytest.mark.parametrize("bad, fragments", [
    ({"prompt": [{"role": "user", "content": "no marker here"}]}, ["no question"]),
    ({"prompt": []}, ["'prompt' must be a non-empty list"]),
    ({"reward_model": {"style": "rule", "ground_truth": {"target": []}}}, ["empty answer list"]),
    ({"reward_model": {"style": "rule", "ground_truth": {"target": ["ok", " "]}}}, ["target[1] is blank"]),
    ({"reward_model": {"style": "rule", "ground_truth": None}}, ["missing field 'reward_model.ground_truth.target'"]),
    ({"data_source": ""}, ["'data_source' must be a non-empty string"]),
    ({"extra_info": {"split": "train", "index": None}}, ["missing field 'extra_info.index'"]),
    ({"extra_info": {"split": None, "index": 1}}, ["missing field 'extra_info.split'"]),
    ({"extra_info": {"split": "train", "index": 0}}, ["duplicate id 'nq-train-0' (first on row 1)"]),
])
def test_searchr1_row_errors(tmp_path, bad, fragments):
    rows = [_row("nq", "train", 0, "first?", ["a"]), {**_row("nq", "train", 1, "second?", ["b"]), **bad},
            _row("nq", "train", 2, "third?", ["c"])]
    _row_raises(_parquet(tmp_path, rows), 2, *fragments)


def test_searchr1_empty_question_column(tmp_path):
    rows = [_row("nq", "train", 0, "p?", ["a"], question="ok?"), _row("nq", "train", 1, "p?", ["a"], question="  ")]
    _row_raises(_parquet(tmp_path, rows), 2, "empty question")


def test_searchr1_file_level_errors(tmp_path):
    no_source = _parquet(tmp_path, [{"prompt": _prompt("q?"), "extra_info": {"split": "t", "index": 0},
                                     "reward_model": {"ground_truth": {"target": ["a"]}}}], "a.parquet")
    _raises_at(load_searchr1_parquet, no_source, None, "missing column 'data_source'")
    no_answers = _parquet(tmp_path, [{"data_source": "nq", "prompt": _prompt("q?"),
                                      "extra_info": {"split": "t", "index": 0}}], "b.parquet")
    _raises_at(load_searchr1_parquet, no_answers, None, "missing column 'reward_model'")
    schema = pa.Table.from_pylist([_row("nq", "train", 0, "q?", ["a"])]).schema
    empty = tmp_path / "empty.parquet"
    pq.write_table(schema.empty_table(), empty)
    _raises_at(load_searchr1_parquet, empty, None, "no rows")
    not_parquet = _write(tmp_path, "fake.parquet", GOOD + "\n")
    _raises_at(load_searchr1_parquet, not_parquet, None, "not a readable parquet file")
    _raises_at(load_searchr1_parquet, tmp_path / "missing.parquet", None, "file not found")


# the variants of public Search-R1-style files (issue 18): each read as the canonical form would be
def test_searchr1_integral_float_index(tmp_path):
    rows = [_row("nq", "train", 0, "first?", ["a"]), _row("nq", "train", 1, "second?", ["b"])]
    for r, i in zip(rows, (0.0, 7.0)):
        r["extra_info"]["index"] = i
    path = _parquet(tmp_path, rows)
    assert pq.read_schema(path).field("extra_info").type.field("index").type == pa.float64()
    exs = load_searchr1_parquet(path)
    assert [e.id for e in exs] == ["nq-train-0", "nq-train-7"] and exs[1].metadata["index"] == 7


@pytest.mark.parametrize("index", [0.5, float("nan"), float("inf")])
def test_searchr1_non_integral_float_index_is_refused(tmp_path, index):
    rows = [_row("nq", "train", 0.0, "first?", ["a"]), _row("nq", "train", index, "second?", ["b"])]
    _row_raises(_parquet(tmp_path, rows), 2, "'extra_info.index' must be an integer or a string", str(index))


def test_searchr1_string_target_is_one_answer(tmp_path):
    rows = [_row("nq", "train", 0, "first?", "Oslo"), _row("nq", "train", 1, "second?", "Kristiania")]
    assert [e.golden_answers for e in load_searchr1_parquet(_parquet(tmp_path, rows))] == [["Oslo"], ["Kristiania"]]
    rows[1]["reward_model"]["ground_truth"]["target"] = "  "
    _row_raises(_parquet(tmp_path, rows), 2, "'reward_model.ground_truth.target' is blank")


def test_searchr1_reward_model_as_json_string(tmp_path):
    rows = [_row("nq", "train", 0, "first?", ["a", "b"]), _row("nq", "train", 1, "second?", "c")]
    for r in rows:
        r["reward_model"] = json.dumps(r["reward_model"])
    path = _parquet(tmp_path, rows)
    assert pq.read_schema(path).field("reward_model").type == pa.string()
    assert [e.golden_answers for e in load_searchr1_parquet(path)] == [["a", "b"], ["c"]]
    rows.append(_row("nq", "train", 2, "third?", ["x"], reward_model='{"ground_truth": {"target": '))
    _row_raises(_parquet(tmp_path, rows), 3, "'reward_model' is a string but not JSON")
    rows[2]["reward_model"] = json.dumps({"style": "rule"})
    _row_raises(_parquet(tmp_path, rows), 3, "missing field 'reward_model.ground_truth.target'")


def test_searchr1_without_extra_info_column(tmp_path, caplog):
    rows = [_row("nq", "x", 0, "first?", ["a"]), _row("nq", "x", 0, "second?", ["b"]),
            _row("hotpotqa", "x", 0, "third?", ["c"])]
    for r in rows:
        del r["extra_info"]
    path = _parquet(tmp_path, rows, "nq_test.parquet")
    with caplog.at_level("WARNING", logger="tspo_core.data.loaders"):
        exs = load_searchr1_parquet(path)
    assert [e.id for e in exs] == ["nq-nq_test-1", "nq-nq_test-2", "hotpotqa-nq_test-3"]
    assert exs[2].metadata == {"data_source": "hotpotqa", "split": "nq_test", "index": 3, "ability": "fact-reasoning"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "no 'extra_info' column" in warnings[0]


@pytest.mark.parametrize("bad, fragments", [
    ({"prompt": [{"role": "user", "content": "no question marker"}]}, ["no question"]),
    ({"reward_model": {"style": "rule"}}, ["missing field 'reward_model.ground_truth.target'"]),
    ({"reward_model": {"ground_truth": {"target": ""}}}, ["'reward_model.ground_truth.target' is blank"]),
])
def test_searchr1_variants_still_refuse_rows_without_question_or_answer(tmp_path, bad, fragments):
    """In a file with every variant (no extra_info, string targets), a row without a question or an answer is
    refused naming the file, the row and the field."""
    rows = [_row("nq", "x", 0, "first?", "a"), {**_row("nq", "x", 0, "second?", "b"), **bad}]
    for r in rows:
        del r["extra_info"]
    _row_raises(_parquet(tmp_path, rows), 2, *fragments)


# ----------------------------------------------------------------------------------------------------------------
# dispatch / read-only
# ----------------------------------------------------------------------------------------------------------------
def test_dispatch_on_suffix(tmp_path):
    assert [e.id for e in load_dataset_file(_write(tmp_path, "d.jsonl", _lines(GOOD)))] == ["q1"]
    assert [e.id for e in load_dataset_file(_write(tmp_path, "d.json", _lines(GOOD)))] == ["q1"]
    assert [e.id for e in load_dataset_file(_write(tmp_path, "D.JSONL", _lines(GOOD)))] == ["q1"]
    _raises_at(load_dataset_file, _write(tmp_path, "d.csv", "id,question\n"), None, "unknown dataset format '.csv'")
    _raises_at(load_dataset_file, _write(tmp_path, "noext", GOOD), None, "unknown dataset format '(no suffix)'")


def test_loaders_never_write(tmp_path):
    _write(tmp_path, "d.jsonl", _lines(GOOD, GOOD2))
    _write(tmp_path, "c.jsonl", _lines(PASSAGE))
    _parquet(tmp_path, [_row("nq", "train", 0, "q?", ["a"])])
    _write(tmp_path, "bad.jsonl", _lines(GOOD, "{oops"))

    def snapshot():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}

    before = snapshot()
    load_dataset_file(tmp_path / "d.jsonl")
    load_corpus(tmp_path / "c.jsonl")
    load_dataset_file(tmp_path / "train.parquet")
    with pytest.raises(DataError):
        load_dataset_file(tmp_path / "bad.jsonl")
    assert snapshot() == before


# ----------------------------------------------------------------------------------------------------------------
# the real samples (read in place)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILY_SIZES))
def test_real_datasets_load(real_qa_dir, family):
    exs = load_dataset_file(real_qa_dir / f"{family}.jsonl")
    assert len(exs) == FAMILY_SIZES[family]
    assert len({e.id for e in exs}) == len(exs)
    for e in exs:
        assert e.question.strip()
        assert e.golden_answers and all(isinstance(a, str) and a.strip() for a in e.golden_answers)


def test_real_corpus_loads(real_qa_dir):
    corpus = load_corpus(real_qa_dir / "corpus.jsonl")
    assert len(corpus) == 6742
    assert len({p.id for p in corpus}) == 6742
    assert all(p.title and p.text.strip() for p in corpus)


def test_real_supported_ids_exist(real_qa_dir):
    supported = json.loads((real_qa_dir / "supported_ids.json").read_text(encoding="utf-8"))
    assert {k: len(v) for k, v in supported.items() if v} == {"nq": 197, "popqa": 95, "hotpotqa": 53}
    for family, ids in supported.items():
        known = {e.id for e in load_dataset_file(real_qa_dir / f"{family}.jsonl")}
        missing = sorted(set(ids) - known)
        assert not missing, f"{family}: {missing[:5]}"
        assert len(set(ids)) == len(ids)
