"""Corpus access for indexing and search: one validating pass over a wiki-18 style jsonl file (byte offsets, per
shard content hashes, no texts kept in memory), and a `PassageStore` that reads passage `i` back by offset.

A corpus line is `{"id": str, "contents": "\\"Title\\"\\ntext"}`, validated by `data.loaders.passage_from_record`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tspo_core.data.loaders import passage_from_record
from tspo_core.data.schema import Passage
from tspo_core.errors import DataError
from tspo_core.io import atomic_open


def _passage_line(p: Passage) -> bytes:
    return (json.dumps(p.to_json(), ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class CorpusScan:
    """What one pass over a corpus learned: where each line starts, per-shard hashes, rough size figures."""

    path: Path
    offsets: np.ndarray  # int64, n + 1 entries: line i spans [offsets[i], offsets[i + 1])
    shard_size: int
    shard_hashes: list[str]
    sha256: str
    size_bytes: int
    n_words: int
    first_id: str | None
    last_id: str | None

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def shard_bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min(self.n, (s + 1) * self.shard_size)

    @property
    def n_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size


def scan_corpus(path: str | Path, shard_size: int) -> CorpusScan:
    """Validate every line of a jsonl corpus and record byte offsets and per-shard sha256 (texts are not kept).
    Blank lines are not allowed (they would shift passage numbers); a missing final newline is tolerated."""
    path = Path(path)
    if not path.is_file():
        raise DataError("corpus file not found", str(path))
    offsets: list[int] = [0]
    shard_hashes: list[str] = []
    whole = hashlib.sha256()
    shard = hashlib.sha256()
    pos = n_words = 0
    first_id = last_id = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            whole.update(raw)
            body = raw.strip()
            if not body:
                raise DataError("blank line in corpus (passages are numbered by line)", str(path), lineno)
            try:
                obj = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"not valid JSON: {err}", str(path), lineno) from None
            p = passage_from_record(obj, str(path), lineno)
            if first_id is None:
                first_id = p.id
            last_id = p.id
            n_words += body.count(b" ") + 1
            shard.update(raw if raw.endswith(b"\n") else raw + b"\n")
            pos += len(raw)
            offsets.append(pos)
            if (len(offsets) - 1) % shard_size == 0:
                shard_hashes.append(shard.hexdigest())
                shard = hashlib.sha256()
    if (len(offsets) - 1) % shard_size:
        shard_hashes.append(shard.hexdigest())
    if len(offsets) == 1:
        raise DataError("corpus is empty", str(path))
    return CorpusScan(path=path, offsets=np.asarray(offsets, dtype=np.int64), shard_size=shard_size,
                      shard_hashes=shard_hashes, sha256=whole.hexdigest(), size_bytes=pos, n_words=n_words,
                      first_id=first_id, last_id=last_id)


def write_passages(passages: Iterable[Passage], path: str | Path, shard_size: int) -> CorpusScan:
    """Write passages as a jsonl corpus (atomically) and return its scan, without re-reading the file."""
    path = Path(path)
    offsets, shard_hashes = [0], []
    whole, shard = hashlib.sha256(), hashlib.sha256()
    pos = n_words = 0
    first_id = last_id = None
    with atomic_open(path, "wb") as fh:
        for i, p in enumerate(passages):
            if not isinstance(p, Passage):
                raise DataError(f"corpus item {i} is a {type(p).__name__}, expected Passage")
            line = _passage_line(p)
            fh.write(line)
            whole.update(line)
            shard.update(line)
            first_id = p.id if first_id is None else first_id
            last_id = p.id
            n_words += p.contents.count(" ") + 1
            pos += len(line)
            offsets.append(pos)
            if (len(offsets) - 1) % shard_size == 0:
                shard_hashes.append(shard.hexdigest())
                shard = hashlib.sha256()
    if (len(offsets) - 1) % shard_size:
        shard_hashes.append(shard.hexdigest())
    if len(offsets) == 1:
        raise DataError("corpus is empty")
    return CorpusScan(path=path, offsets=np.asarray(offsets, dtype=np.int64), shard_size=shard_size,
                      shard_hashes=shard_hashes, sha256=whole.hexdigest(), size_bytes=pos, n_words=n_words,
                      first_id=first_id, last_id=last_id)


class PassageStore:
    """Random access to the passages of a jsonl file by position, through byte offsets and a read-only mmap.
    Thread-safe for reads; `close()` releases the mapping."""

    def __init__(self, path: str | Path, offsets: np.ndarray):
        self.path = Path(path)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        size = os.path.getsize(self.path)
        if int(self.offsets[-1]) > size:
            raise DataError(f"passage file is shorter ({size} bytes) than its offsets say "
                            f"({int(self.offsets[-1])}): was it changed after indexing?", str(self.path))
        self._fh = open(self.path, "rb")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Passage:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"passage {i} out of range (0..{n - 1})")
        i %= n
        if self._mm is None:
            raise DataError("passage store is closed", str(self.path))
        raw = self._mm[int(self.offsets[i]):int(self.offsets[i + 1])]
        try:
            return passage_from_record(json.loads(raw), str(self.path), i + 1)
        except json.JSONDecodeError as err:
            raise DataError(f"passage {i} unreadable ({err}): was the file changed after indexing?",
                            str(self.path), i + 1) from None

    def get_many(self, idxs: Sequence[int]) -> list[Passage]:
        return [self[int(i)] for i in idxs]

    def texts(self, start: int, end: int) -> list[str]:
        """Contents of passages [start, end) (used to encode one shard)."""
        return [self[i].contents for i in range(start, end)]

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if not self._fh.closed:
            self._fh.close()

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:
            pass

