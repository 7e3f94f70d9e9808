"""Readers for real data files: FlashRAG jsonl datasets, Search-R1 parquet datasets, wiki-18 style corpora.

Every reader validates as it goes and raises `DataError` naming the file and the 1-based line (the 1-based row for
parquet) at fault. Readers never write anything. Blank lines in jsonl files are skipped; a leading UTF-8 BOM is
tolerated.

Input is bounded: a jsonl line holds at most `MAX_LINE_BYTES`, a question at most `MAX_QUESTION_CHARS` characters,
a gold answer `MAX_ANSWER_CHARS`, a passage's contents `MAX_PASSAGE_CHARS`, an id `MAX_ID_CHARS` (generous: the
longest of the FlashRAG sets and wiki-18 are far below). Text must be valid Unicode: a lone surrogate (`"\\ud800"`
in the JSON), which no UTF-8 file can hold and every later write would fail on, is refused naming the field.

- `load_flashrag_jsonl(path)`: `{"id": str, "question": str, "golden_answers": [str, ...], "metadata": {...}}`
  per line -> `list[QAExample]`.
- `load_searchr1_parquet(path)`: Search-R1 training/test parquet -> `list[QAExample]`, with ids
  `f"{data_source}-{split}-{index}"` (unique per question even when several sources restart their row index).
  Variants seen in public files are read too: `extra_info.index` stored as an integral float (`0.0`), a
  `reward_model.ground_truth.target` that is one string, `reward_model` stored as a JSON string, and no
  `extra_info` column (ids `f"{data_source}-{file stem}-{row}"`, one warning per file).
- `iter_corpus(path)` / `load_corpus(path)`: `{"id": str, "contents": "\\"Title\\"\\ntext"}` per line -> `Passage`s.
- `load_dataset_file(path)`: dispatch on the suffix (`.jsonl`/`.json` -> FlashRAG, `.parquet` -> Search-R1).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tspo_core.data.schema import Passage, QAExample
from tspo_core.errors import DataError, bounded_repr

log = logging.getLogger(__name__)

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)

_PARQUET_BATCH_ROWS = 4096

MAX_QUESTION_CHARS = 8_192
"""Longest question accepted from a data file (a prompt longer than `rollout.max_context_tokens` is refused per
question by the rollout engine)."""
MAX_ANSWER_CHARS = 1_024
"""Longest gold answer."""
MAX_PASSAGE_CHARS = 100_000
"""Longest passage `contents` (title and text)."""
MAX_ID_CHARS = 1_024
"""Longest question or passage id."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest line of a JSON-lines file (a passage at its longest, fully escaped, fits many times)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", str(path))
    if not path.is_file():
        raise DataError("not a regular file", str(path))


def _surrogate_in(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (not encodable as UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _find_surrogate(value: Any, where: str = "") -> str | None:
    """The JSON path (`metadata.context[2]`) of the first string (or key) of a parsed value holding a lone
    surrogate; None when there is none."""
    if isinstance(value, str):
        return (where or "<value>") if _surrogate_in(value) is not None else None
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{where}.{k}" if where else str(k)
            found = key if _surrogate_in(str(k)) is not None else _find_surrogate(v, key)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _text(value: str, key: str, path: Path | str, line: int, limit: int, what: str = "characters") -> str:
    """`value` (a string field) checked for length (`limit`) and for lone surrogates; `DataError` names the key."""
    if len(value) > limit:
        raise DataError(f"{key!s} has {len(value):,} {what}; the limit is {limit:,}", str(path), line)
    at = _surrogate_in(value)
    if at is not None:
        raise DataError(f"{key!s} holds a lone surrogate {value[at]!r} at character {at + 1} (not valid Unicode "
                        "text; fix the file's escapes)", str(path), line)
    return value


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line of a JSON-lines file (1-based line numbers).

    Raises `DataError` for bytes that are not UTF-8, a line over `MAX_LINE_BYTES`, invalid JSON, a line that is
    not a JSON object, or a string in it holding a lone surrogate.
    """
    path = Path(path)
    _check_file(path)
    with path.open("rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"line longer than {MAX_LINE_BYTES:,} bytes", str(path), lineno)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start:err.start + 1]
                raise DataError(f"not valid UTF-8: byte {bad!r} at byte {err.start + 1} of the line "
                                "(re-encode the file as UTF-8)", str(path), lineno) from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))  # so an error's column refers to this line
            except json.JSONDecodeError as err:
                hint = ""
                if lineno == 1 and text.lstrip().startswith("["):
                    hint = " (expected JSON lines, one object per line, not a JSON array)"
                raise DataError(f"invalid JSON: {err.msg} at column {err.colno}{hint}", str(path), lineno) from None
            if not isinstance(obj, dict):
                hint = " (expected JSON lines, one object per line)" if isinstance(obj, list) else ""
                raise DataError(f"expected a JSON object, got {_json_type(obj)}{hint}", str(path), lineno)
            if "\\u" in text:  # only a JSON escape can make a lone surrogate
                try:
                    bad = _find_surrogate(obj)
                except RecursionError:
                    raise DataError("JSON nested too deeply", str(path), lineno) from None
                if bad is not None:
                    raise DataError(f"{bounded_repr(bad)} holds a lone surrogate (not valid Unicode text; fix the "
                                    "file's escapes)", str(path), lineno)
            yield lineno, obj


def _field(obj: dict[str, Any], key: str, path: Path, line: int, what: str = "field") -> Any:
    if key not in obj:
        raise DataError(f"missing {what} {key!r}", str(path), line)
    return obj[key]


def _id(value: Any, key: str, path: Path, line: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {_json_type(value)} ({bounded_repr(value, 60)})",
                        str(path), line)
    if not value.strip():
        raise DataError(f"empty {key!r}", str(path), line)
    return _text(value, repr(key), path, line, MAX_ID_CHARS)


def _question(value: Any, key: str, path: Path, line: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {_json_type(value)}", str(path), line)
    if not value.strip():
        raise DataError("empty question", str(path), line)
    return _text(value, repr(key), path, line, MAX_QUESTION_CHARS)


def _answers(value: Any, key: str, path: Path, line: int) -> list[str]:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays from pandas-made parquet
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DataError(f"{key!r} must be a list of strings, got {_json_type(value)} ({bounded_repr(value, 60)})",
                        str(path), line)
    if not value:
        raise DataError(f"empty answer list {key!r}", str(path), line)
    for i, ans in enumerate(value):
        if not isinstance(ans, str):
            raise DataError(f"{key}[{i}] must be a string, got {_json_type(ans)} ({bounded_repr(ans, 60)})",
                            str(path), line)
        if not ans.strip():
            raise DataError(f"{key}[{i}] is blank (answers must be non-empty)", str(path), line)
        _text(ans, f"{key}[{i}]", path, line, MAX_ANSWER_CHARS)
    return list(value)


# ----------------------------------------------------------------------------------------------------------------
# FlashRAG jsonl
# ----------------------------------------------------------------------------------------------------------------
def iter_flashrag_jsonl(path: str | Path) -> Iterator[QAExample]:
    """Stream a FlashRAG dataset file, validating each record (ids are checked for duplicates as they come)."""
    path = Path(path)
    seen: dict[str, int] = {}
    n = 0
    for line, obj in iter_json_lines(path):
        qid = _id(_field(obj, "id", path, line), "id", path, line)
        question = _question(_field(obj, "question", path, line), "question", path, line)
        answers = _answers(_field(obj, "golden_answers", path, line), "golden_answers", path, line)
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise DataError(f"'metadata' must be an object, got {_json_type(metadata)}", str(path), line)
        if qid in seen:
            raise DataError(f"duplicate id {qid!r} (first on line {seen[qid]})", str(path), line)
        seen[qid] = line
        n += 1
        yield QAExample(id=qid, question=question, golden_answers=answers, metadata=metadata)
    if n == 0:
        raise DataError("no records (the file is empty or has only blank lines)", str(path))


def load_flashrag_jsonl(path: str | Path) -> list[QAExample]:
    """All records of a FlashRAG jsonl dataset (`id`, `question`, `golden_answers`, optional `metadata`)."""
    return list(iter_flashrag_jsonl(path))


# ----------------------------------------------------------------------------------------------------------------
# Search-R1 parquet
# ----------------------------------------------------------------------------------------------------------------
def _row_error(message: str, path: Path, row: int) -> DataError:
    """A DataError for a parquet row: the message says `row N` and `.line` holds N (1-based)."""
    err = DataError(f"row {row}: {message}", str(path))
    err.line = row
    return err


def question_from_prompt(content: str) -> str | None:
    """The question in a Search-R1 prompt: the text after the last `Question:`, stripped (None if absent/empty)."""
    marker = "Question:"
    at = content.rfind(marker)
    if at < 0:
        return None
    q = content[at + len(marker):].strip()
    return q or None


def _prompt_question(prompt: Any, path: Path, row: int) -> str:
    if hasattr(prompt, "tolist") and not isinstance(prompt, (str, bytes)):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        contents = [prompt]
    elif isinstance(prompt, list) and prompt:
        contents = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise _row_error(f"prompt[{i}] must be an object with a string 'content'", path, row)
            if msg.get("role", "user") == "user":
                contents.append(msg["content"])
        if not contents:
            raise _row_error("prompt has no user message", path, row)
    else:
        raise _row_error(f"'prompt' must be a non-empty list of messages, got {_json_type(prompt)}", path, row)
    q = question_from_prompt(contents[-1])
    if q is None:
        raise _row_error("no question: the 'question' column is absent or null and the prompt has no "
                         "'Question:' followed by text", path, row)
    return q


def iter_searchr1_parquet(path: str | Path) -> Iterator[QAExample]:
    """Stream a Search-R1 parquet file (row by row, in batches), validating each row."""
    path = Path(path)
    _check_file(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", str(path)) from None
    columns = list(pf.schema_arrow.names)
    if "data_source" not in columns:
        raise DataError(f"missing column 'data_source' (columns: {columns})", str(path))
    if "extra_info" not in columns:
        log.warning("%s: no 'extra_info' column; question ids are '<data_source>-%s-<row>' (file stem and 1-based "
                    "row)", path, path.stem)
    if "question" not in columns and "prompt" not in columns:
        raise DataError(f"missing column 'prompt' (needed when there is no 'question' column; columns: {columns})",
                        str(path))
    if "golden_answers" not in columns and "reward_model" not in columns:
        raise DataError("missing column 'reward_model' (needed when there is no 'golden_answers' column; "
                        f"columns: {columns})", str(path))
    wanted = [c for c in ("data_source", "prompt", "ability", "reward_model", "extra_info", "question",
                          "golden_answers") if c in columns]

    seen: dict[str, int] = {}
    row = 0
    try:
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted)
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                yield _searchr1_row(rec, path, row, seen)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read parquet data after row {row}: {err}", str(path)) from None
    if row == 0:
        raise DataError("no rows (the parquet file is empty)", str(path))


def _index(value: Any, path: Path, row: int) -> int | str:
    """`extra_info.index`: an integer, a non-empty string, or a float holding an integer (pandas stores an integer
    column with a missing value as float64: `0.0` -> 0)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise _row_error(f"'extra_info.index' must be an integer or a string, got {bounded_repr(value, 60)}",
                         path, row)
    return value


def _target(rec: dict[str, Any], path: Path, row: int) -> list[str]:
    """The gold answers in `reward_model.ground_truth.target`: a list of strings or one string; `reward_model` may
    be stored as a JSON string."""
    rm = rec.get("reward_model")
    if isinstance(rm, str):
        try:
            rm = json.loads(rm)
        except json.JSONDecodeError as err:
            raise _row_error(f"'reward_model' is a string but not JSON ({err.msg} at character {err.pos})", path,
                             row) from None
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    target = gt.get("target") if isinstance(gt, dict) else None
    if target is None:
        raise _row_error("missing field 'reward_model.ground_truth.target' (and no 'golden_answers')", path, row)
    if isinstance(target, str):  # one answer (Search-R1's own em_check takes a string too)
        if not target.strip():
            raise _row_error("'reward_model.ground_truth.target' is blank (answers must be non-empty)", path, row)
        target = [target]
    return _answers_row(target, "reward_model.ground_truth.target", path, row)


def _searchr1_row(rec: dict[str, Any], path: Path, row: int, seen: dict[str, int]) -> QAExample:
    source = rec.get("data_source")
    if not isinstance(source, str) or not source.strip():
        raise _row_error(f"'data_source' must be a non-empty string, got {bounded_repr(source, 60)}", path, row)
    if "extra_info" not in rec:  # no such column (a null in an existing column is an error below)
        rec = {**rec, "extra_info": {"split": path.stem, "index": row}}
    extra = rec.get("extra_info")
    if not isinstance(extra, dict):
        raise _row_error(f"'extra_info' must be an object with 'split' and 'index', got {_json_type(extra)}",
                         path, row)
    for key in ("split", "index"):
        if extra.get(key) is None:
            raise _row_error(f"missing field 'extra_info.{key}'", path, row)
    split, index = extra["split"], _index(extra["index"], path, row)
    if not isinstance(split, str) or not split.strip():
        raise _row_error(f"'extra_info.split' must be a non-empty string, got {bounded_repr(split, 60)}", path,
                         row)

    if rec.get("question") is not None:
        q = rec["question"]
        if not isinstance(q, str):
            raise _row_error(f"'question' must be a string, got {_json_type(q)}", path, row)
        if not q.strip():
            raise _row_error("empty question", path, row)
        question = q
    else:
        question = _prompt_question(rec.get("prompt"), path, row)

    if rec.get("golden_answers") is not None:
        answers = _answers_row(rec["golden_answers"], "golden_answers", path, row)
    else:
        answers = _target(rec, path, row)

    try:
        question = _text(question, "'question'", path, row, MAX_QUESTION_CHARS)
        qid = _text(f"{source}-{split}-{index}", "id", path, row, MAX_ID_CHARS)
    except DataError as err:
        raise _row_error(err.reason, path, row) from None
    if qid in seen:
        raise _row_error(f"duplicate id {qid!r} (first on row {seen[qid]})", path, row)
    seen[qid] = row
    metadata: dict[str, Any] = {"data_source": source, "split": split, "index": index}
    if isinstance(rec.get("ability"), str):
        metadata["ability"] = rec["ability"]
    return QAExample(id=qid, question=question, golden_answers=answers, metadata=metadata)


def _answers_row(value: Any, key: str, path: Path, row: int) -> list[str]:
    try:
        return _answers(value, key, path, row)
    except DataError as err:
        raise _row_error(err.reason, path, row) from None


def load_searchr1_parquet(path: str | Path) -> list[QAExample]:
    """All rows of a Search-R1 parquet file as QAExamples (question from the `question` column when present, else
    from the prompt after the last `Question:`; answers from `golden_answers`, else the reward model's target)."""
    return list(iter_searchr1_parquet(path))


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------
def load_dataset_file(path: str | Path) -> list[QAExample]:
    """Load a question file by suffix: `.jsonl`/`.json` (JSON lines, FlashRAG) or `.parquet` (Search-R1)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return load_flashrag_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return load_searchr1_parquet(path)
    raise DataError(f"unknown dataset format {path.suffix or '(no suffix)'!r}: expected one of "
                    f"{list(JSONL_SUFFIXES + PARQUET_SUFFIXES)}", str(path))


# ----------------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------------
def passage_from_record(obj: Any, path: str | Path, line: int) -> Passage:
    """One parsed corpus line -> `Passage`; the single validation rule for corpus records (the data stage and the
    index's corpus scan both use it). `DataError` names the file and line."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_json_type(obj)}", str(path), line)
    pid = _id(_field(obj, "id", path, line), "id", path, line)
    if "contents" not in obj:
        hint = ""
        if "text" in obj:
            hint = " (found 'text': convert each passage to contents = '\"Title\"\\ntext')"
        raise DataError(f"passage without 'contents'{hint}", str(path), line)
    contents = obj["contents"]
    if not isinstance(contents, str):
        raise DataError(f"'contents' must be a string, got {_json_type(contents)}", str(path), line)
    if not contents.strip():
        raise DataError("empty 'contents'", str(path), line)
    return Passage(id=pid, contents=_text(contents, "'contents'", path, line, MAX_PASSAGE_CHARS))


def iter_corpus(path: str | Path, check_unique: bool = True) -> Iterator[Passage]:
    """Stream a wiki-18 style corpus, one `{"id": str, "contents": str}` per line (memory: one line at a time,
    plus the set of ids seen when `check_unique`; turn it off for corpora whose ids do not fit in memory)."""
    path = Path(path)
    seen: dict[str, int] = {}
    n = 0
    for line, obj in iter_json_lines(path):
        passage = passage_from_record(obj, path, line)
        pid = passage.id
        if check_unique:
            if pid in seen:
                raise DataError(f"duplicate passage id {pid!r} (first on line {seen[pid]})", str(path), line)
            seen[pid] = line
        n += 1
        yield passage
    if n == 0:
        raise DataError("no passages (the file is empty or has only blank lines)", str(path))


def load_corpus(path: str | Path) -> list[Passage]:
    """All passages of a corpus file, with unique ids."""
    return list(iter_corpus(path, check_unique=True))
