"""Per-token tensors of a batch of rollouts, built from explicit segments (token-in / token-out).

A rollout is a list of segments `(token_ids, kind, turn)`: `kind` is "prompt" (the question prompt), "policy"
(tokens the policy sampled in turn `turn`, 0-based) or "obs" (tokens the environment appended: retrieved
passages, the invalid-action message). The segments are concatenated in order and right-padded with `pad_id`.

Every mask comes from the segment kinds, never from comparing ids to the pad id (a pad id may equal a real token,
REFERENCE.md pitfall 2), and the sampled ids are used as they are (never re-tokenized, pitfall 1).

Conventions (B rollouts, T = longest rollout):
- `input_ids` (B, T) long: the concatenated ids, `pad_id` after the end.
- `attention_mask` (B, T) long: 1 on every real token (prompt, policy, obs), 0 on padding.
- `policy_mask` (B, T) long: 1 only on tokens the policy generated; the loss and advantages live here.
- `obs_mask` (B, T) long: 1 only on observation tokens.
- `turn_index` (B, T) long: the turn of each policy token, -1 everywhere else.
Position t of `policy_mask` refers to token t itself; its log-prob is read from the logits at t - 1, so a
rollout may not start with a policy token (checked).

>>> b = build_masks([[([5, 6], "prompt", 0), ([7], "policy", 0), ([8, 9], "obs", 0), ([3], "policy", 1)]],
...                 pad_id=0)
>>> b.policy_mask.tolist(), b.turn_index.tolist()
([[0, 0, 1, 0, 0, 1]], [[-1, -1, 0, -1, -1, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

SegmentKind = Literal["prompt", "policy", "obs"]
SEGMENT_KINDS: tuple[str, ...] = ("prompt", "policy", "obs")


class Segment(NamedTuple):
    """A run of tokens of one kind; `turn` (0-based) matters only for policy segments."""

    token_ids: Sequence[int]
    kind: SegmentKind
    turn: int


@dataclass(frozen=True)
class TokenTensors:
    """Right-padded per-token tensors, all (B, T) long; see the module docstring."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    policy_mask: torch.Tensor
    obs_mask: torch.Tensor
    turn_index: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) long: real tokens per rollout."""
        return self.attention_mask.sum(dim=1)


def build_masks(rollouts: Sequence[Sequence[tuple[Sequence[int], str, int]]], pad_id: int) -> TokenTensors:
    """Concatenate each rollout's segments and right-pad to the longest rollout with `pad_id`.

    Raises ValueError on an empty batch, an empty rollout, an unknown kind, a negative turn on a policy
    segment, or a rollout whose first token is a policy token (no context to predict it from).
    """
    if not rollouts:
        raise ValueError("build_masks: no rollouts")
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []  # ids, policy, obs, turn per token
    for b, segments in enumerate(rollouts):
        ids: list[int] = []
        policy: list[int] = []
        obs: list[int] = []
        turn: list[int] = []
        for s, (token_ids, kind, k) in enumerate(segments):
            if kind not in SEGMENT_KINDS:
                raise ValueError(f"rollout {b} segment {s}: unknown kind {kind!r}; known: {list(SEGMENT_KINDS)}")
            if kind == "policy" and k < 0:
                raise ValueError(f"rollout {b} segment {s}: policy segment with negative turn {k}")
            n = len(token_ids)
            ids.extend(int(t) for t in token_ids)
            policy.extend([int(kind == "policy")] * n)
            obs.extend([int(kind == "obs")] * n)
            turn.extend([k if kind == "policy" else -1] * n)
        if not ids:
            raise ValueError(f"rollout {b}: no tokens")
        if policy[0]:
            raise ValueError(f"rollout {b}: starts with a policy token (it needs a preceding context token)")
        rows.append((ids, policy, obs, turn))

    B, T = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    policy_mask = torch.zeros((B, T), dtype=torch.long)
    obs_mask = torch.zeros((B, T), dtype=torch.long)
    turn_index = torch.full((B, T), -1, dtype=torch.long)
    for b, (ids, policy, obs, turn) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        policy_mask[b, :n] = torch.tensor(policy, dtype=torch.long)
        obs_mask[b, :n] = torch.tensor(obs, dtype=torch.long)
        turn_index[b, :n] = torch.tensor(turn, dtype=torch.long)
    return TokenTensors(input_ids, attention_mask, policy_mask, obs_mask, turn_index)
