"""Corpus access for indexing and search: one validating pass over a wiki-18 style jsonl file (byte offsets, per
shard content hashes, no texts kept in memory), and a `PassageStore` that reads passage `i` back by offset.

A corpus line is `{"id": str, "contents": "\\"Title\\"\\ntext"}`, validated by `data.loaders.passage_from_record`.
Passage ids must be unique (results and support recall are keyed by id): the pass keeps a 16-byte digest per id
(336 MB for wiki-18's 21M passages, not the ids themselves) and a repeated id fails naming both lines.
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


class _ScanBuilder:
    """Accumulates what a `CorpusScan` records, one jsonl line at a time (shared by reading and writing)."""

    def __init__(self, shard_size: int):
        self.shard_size = shard_size
        self.offsets: list[int] = [0]
        self.shard_hashes: list[str] = []
        self.whole, self.shard = hashlib.sha256(), hashlib.sha256()
        self.pos = self.n_words = 0
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.id_digests = bytearray()  # 16 bytes per passage, for the duplicate-id check

    def add(self, raw: bytes, passage_id: str, n_words: int) -> None:
        """`raw` is the line as stored (a missing final newline is hashed into its shard as if present)."""
        self.id_digests += hashlib.blake2b(passage_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        self.whole.update(raw)
        self.shard.update(raw if raw.endswith(b"\n") else raw + b"\n")
        self.first_id = passage_id if self.first_id is None else self.first_id
        self.last_id = passage_id
        self.n_words += n_words
        self.pos += len(raw)
        self.offsets.append(self.pos)
        if (len(self.offsets) - 1) % self.shard_size == 0:
            self.shard_hashes.append(self.shard.hexdigest())
            self.shard = hashlib.sha256()

    def duplicate(self) -> tuple[int, int] | None:
        """(first, second) 0-based positions of the earliest repeated id, or None when all ids are distinct."""
        digests = np.frombuffer(bytes(self.id_digests), dtype="V16")
        if len(digests) < 2:
            return None
        order = np.argsort(digests, kind="stable")
        ranked = digests[order]
        same = np.nonzero(ranked[1:] == ranked[:-1])[0]
        if not len(same):
            return None
        second = int(order[same + 1].min())
        first = int(np.nonzero(digests == digests[second])[0][0])
        return first, second

    def finish(self, path: Path, where: str | None) -> CorpusScan:
        if (len(self.offsets) - 1) % self.shard_size:
            self.shard_hashes.append(self.shard.hexdigest())
        if len(self.offsets) == 1:
            raise DataError("corpus is empty", where)
        return CorpusScan(path=path, offsets=np.asarray(self.offsets, dtype=np.int64), shard_size=self.shard_size,
                          shard_hashes=self.shard_hashes, sha256=self.whole.hexdigest(), size_bytes=self.pos,
                          n_words=self.n_words, first_id=self.first_id, last_id=self.last_id)


def scan_corpus(path: str | Path, shard_size: int) -> CorpusScan:
    """Validate every line of a jsonl corpus and record byte offsets and per-shard sha256 (texts are not kept).
    Blank lines are not allowed (they would shift passage numbers); a missing final newline is tolerated."""
    path = Path(path)
    if not path.is_file():
        raise DataError("corpus file not found", str(path))
    scan = _ScanBuilder(shard_size)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            body = raw.strip()
            if not body:
                raise DataError("blank line in corpus (passages are numbered by line)", str(path), lineno)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8: byte {body[err.start:err.start + 1]!r} at byte {err.start + 1} of "
                                "the line (re-encode the file as UTF-8)", str(path), lineno) from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON: {err}", str(path), lineno) from None
            p = passage_from_record(obj, str(path), lineno)
            scan.add(raw, p.id, body.count(b" ") + 1)
        result = scan.finish(path, str(path))
        dup = scan.duplicate()
        if dup is not None:
            first, second = dup
            fh.seek(int(result.offsets[second]))
            pid = json.loads(fh.readline())["id"]
            raise DataError(f"duplicate passage id {pid!r} (first on line {first + 1})", str(path), second + 1)
    return result


def write_passages(passages: Iterable[Passage], path: str | Path, shard_size: int) -> CorpusScan:
    """Write passages as a jsonl corpus (atomically) and return its scan, without re-reading the file."""
    path = Path(path)
    scan = _ScanBuilder(shard_size)
    with atomic_open(path, "wb") as fh:
        for i, p in enumerate(passages):
            if not isinstance(p, Passage):
                raise DataError(f"corpus item {i} is a {type(p).__name__}, expected Passage")
            line = _passage_line(p)
            fh.write(line)
            scan.add(line, p.id, p.contents.count(" ") + 1)
        result = scan.finish(path, None)
        dup = scan.duplicate()
        if dup is not None:
            raise DataError(f"corpus items {dup[0]} and {dup[1]} have the same passage id")
    return result


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

