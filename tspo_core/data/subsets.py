"""Fixed-seed subsets of a split: the evaluation subsets (`eval.subset_size`) and the dev subsets training
evaluates on (`train.eval_questions`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tspo_core.data.schema import QAExample


def _subset_key(seed: int, example_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{example_id}".encode()).hexdigest()


def subset(examples: Sequence[QAExample], size: int | None, seed: int) -> list[QAExample]:
    """A fixed-seed subset of `size` examples (None or size >= len: all), in the input order.

    Examples are ranked by a hash of (seed, id) and the first `size` kept, so the choice depends only on the ids:
    it is the same across runs, machines and Python versions, unaffected by file order, and the subset of size n is
    contained in the subset of any larger size (a bigger evaluation reuses the finished rows).
    """
    if size is None or size >= len(examples):
        return list(examples)
    if size < 0:
        raise ValueError(f"subset: size must be >= 0 or None, got {size}")
    chosen = set(sorted(range(len(examples)), key=lambda i: (_subset_key(seed, examples[i].id), i))[:size])
    return [ex for i, ex in enumerate(examples) if i in chosen]
