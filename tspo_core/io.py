"""Atomic file output: write to a temporary sibling, fsync, then rename, so a crash, a full disk or a bad record
never leaves a half-written file where a finished one is expected.

Temporary siblings are named `.<name>.<host>-<pid>.<random>.tmp`. A process killed with SIGKILL cannot remove its
own; the next atomic write of the same name on the same host removes those whose process is gone (a live process's
temporary, or another host's on a shared filesystem, is never touched). Without that, every crash of an index build
or a checkpoint save would leave a full-size hidden copy behind.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` left by dead processes of this host (see the module docstring);
    returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}-(\d+)\.[^.]+\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one compact JSON object per line (stable key order as given); returns the count."""
    n = 0
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


_SCALARS = (str, int, float, bool)


def _csv_cell(value: Any, column: str, row: int) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"write_csv: row {row}, column {column!r}: {type(value).__name__} is not a scalar "
                    "(only str, int, float, bool and None go into a CSV cell)")


def scalar_columns(records: Iterable[dict[str, Any]]) -> list[str]:
    """Keys of `records` in first-seen order, keeping only those whose values are all scalars or None (a key that
    holds a list or a dict in any record is left out)."""
    seen: dict[str, bool] = {}
    for rec in records:
        for k, v in rec.items():
            ok = v is None or isinstance(v, _SCALARS)
            seen[k] = seen.get(k, True) and ok
    return [k for k, ok in seen.items() if ok]


def write_csv(path: str | Path, records: Iterable[dict[str, Any]], columns: Iterable[str] | None = None) -> int:
    """Write `records` (dicts) as a flat CSV with a header row, atomically; returns the number of rows.

    `columns` picks the columns and their order (a record's other keys are not written); by default they are the
    union of the records' keys in first-seen order. A missing key or None is an empty cell, a bool is
    `true`/`false`. A value that is not a scalar (list, dict, ...) raises `TypeError` naming the row and column,
    and nothing is written. With no records and no columns the file is empty."""
    rows = list(records)
    for i, rec in enumerate(rows, start=1):
        if not isinstance(rec, dict):
            raise TypeError(f"write_csv: row {i} is a {type(rec).__name__}, expected a dict")
    if columns is None:
        cols = list(dict.fromkeys(k for rec in rows for k in rec))
    else:
        cols = list(columns)
        if len(set(cols)) != len(cols):
            raise ValueError(f"write_csv: duplicate column names in {cols}")
    for c in cols:
        if not isinstance(c, str):
            raise TypeError(f"write_csv: column name {c!r} is not a string")
    cells = [[_csv_cell(rec.get(c), c, i) for c in cols] for i, rec in enumerate(rows, start=1)]
    with atomic_open(path) as fh:
        if cols:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(cols)
            writer.writerows(cells)
    return len(rows)


def restore_interrupted_swap(path: str | Path) -> bool:
    """Put back the previous version of `path` when a process died between `atomic_dir`'s two renames (`path`
    moved aside to `.<name>.old`, the new version not yet in place); True when it did."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if path.exists() or not old.is_dir():
        return False
    os.replace(old, path)
    return True


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces `path` only when the block succeeds. If the final swap
    itself fails (the previous directory already moved aside), the previous directory is put back; if the process
    died there, the next `atomic_dir` (or `restore_interrupted_swap`) puts it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the previous version goes back where readers expect it
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
