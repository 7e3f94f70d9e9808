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
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | Path, path: str | Path) -> None:
    """Rename the finished directory `src` (a sibling of `path`) to `path`, replacing what was there: the previous
    version is moved aside to `.<name>.old` first and removed after; if the second rename fails it is put back (if
    the process dies between the renames, `restore_interrupted_swap` puts it back)."""
    src, path = Path(src), Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        try:
            os.replace(src, path)
        except BaseException:
            os.replace(old, path)  # the previous version goes back where readers expect it
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, path)


# ----------------------------------------------------------------------------------------------------------------
# files that change together with a directory
# ----------------------------------------------------------------------------------------------------------------
PENDING_DIR = ".pending"
"""Inside a staged output directory: files that belong elsewhere (metrics beside the checkpoint), moved to their
destinations right after the directory is swapped in (`finish_pending`)."""
_MANIFEST = "manifest.json"


def pending_file(staged_dir: str | Path, dest: str | Path) -> Path:
    """Where to write the file that will become `dest` once `staged_dir` is swapped in: a path inside
    `staged_dir/.pending`, recorded in its manifest (destination resolved to an absolute path)."""
    pending = Path(staged_dir) / PENDING_DIR
    pending.mkdir(parents=True, exist_ok=True)
    manifest = pending / _MANIFEST
    entries = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
    dest = Path(dest).resolve()
    name = next((k for k, v in entries.items() if v == str(dest)), None)
    if name is None:
        name = f"{len(entries)}-{dest.name}"
        entries[name] = str(dest)
        write_json(manifest, entries)
    return pending / name


def finish_pending(out_dir: str | Path) -> list[Path]:
    """Move the pending files of a swapped-in output directory to their destinations (each atomically), then remove
    `.pending`; returns the destinations. Idempotent: a run that died half-way through is finished by the next
    call (the stage calls it before it starts), so the directory and its files end up changed together."""
    pending = Path(out_dir) / PENDING_DIR
    manifest = pending / _MANIFEST
    if not manifest.is_file():
        shutil.rmtree(pending, ignore_errors=True)
        return []
    moved = []
    for name, dest in json.loads(manifest.read_text(encoding="utf-8")).items():
        src, dest = pending / name, Path(dest)
        if src.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dest)
            except OSError:  # another filesystem: copy atomically, then drop the staged copy
                with atomic_open(dest, "wb") as fh, open(src, "rb") as fr:
                    shutil.copyfileobj(fr, fh)
                src.unlink()
        moved.append(dest)
    shutil.rmtree(pending)
    return moved


# ----------------------------------------------------------------------------------------------------------------
# outputs never overlap inputs
# ----------------------------------------------------------------------------------------------------------------
def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_disjoint(inputs: Iterable[tuple[str, str | Path]], outputs: Iterable[tuple[str, str | Path]]) -> None:
    """Refuse a stage whose outputs overlap its inputs or each other, before it writes anything.

    `inputs` and `outputs` are (label, path) pairs; the label names where the path comes from (a params key such as
    `paths.data_dir`, or a CLI option). Paths are resolved (symlinks followed, relative to the working directory);
    two paths overlap when they are equal or one lies inside the other. Raises `ConfigError` naming both labels and
    both paths: writing the output would replace (part of) the input, or one output would replace the other."""
    from tspo_core.errors import ConfigError

    ins = [(label, _resolved(p)) for label, p in inputs]
    outs = [(label, _resolved(p)) for label, p in outputs]
    for i, (out_label, out) in enumerate(outs):
        for in_label, inp in ins:
            if _within(inp, out) or _within(out, inp):
                how = "is" if out == inp else ("contains" if _within(inp, out) else "lies inside")
                raise ConfigError(f"output {out_label} ({out}) {how} input {in_label} ({inp}): the stage would "
                                  "overwrite its own input; point them at separate places (nothing was written)")
        for other_label, other in outs[i + 1:]:
            if _within(other, out) or _within(out, other):
                how = "is" if out == other else ("contains" if _within(other, out) else "lies inside")
                raise ConfigError(f"output {out_label} ({out}) {how} output {other_label} ({other}): one output "
                                  "would overwrite the other; point them at separate places (nothing was written)")
