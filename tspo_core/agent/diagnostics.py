"""Batch diagnostics that TSPO.md asks to log every step: zero-variance group shares and category shares.

- `zero_variance_share(scores, group_ids)`: share of groups whose scores are all equal. Such a group contributes
  no gradient (its advantages are 0, see `advantages`). A group of size 1 counts as zero-variance (it has no
  spread either and gets advantage 0).
- `group_diagnostics`: that share under the outcome o and under the trajectory score s = o + alpha [f found]
  (FOLR's claim: the second is lower).
- `category_shares`: the share of rollouts in each of the four categories (`rewards.CATEGORIES`); every category
  is present in the result, 0 when empty.
Inputs follow the advantages' conventions: tensors (B,), first occurrence -1 for none.

>>> import torch
>>> o, f, g = torch.tensor([0., 0., 1., 1.]), torch.tensor([1, -1, 0, 0]), torch.tensor([0, 0, 1, 1])
>>> group_diagnostics(o, f, g, alpha=0.5)
{'zero_var_share_o': 1.0, 'zero_var_share_s': 0.5}
"""

from __future__ import annotations

import torch

from tspo_core.agent.advantages import group_stats, trajectory_scores
from tspo_core.agent.rewards import CATEGORIES, category


def zero_variance_share(scores: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of groups (not rollouts) whose `scores` (B,) are all equal; groups given by `group_ids` (B,)."""
    return group_stats(scores, group_ids).degenerate.double().mean().item()


def group_diagnostics(outcome: torch.Tensor, first_occurrence: torch.Tensor, group_ids: torch.Tensor,
                      alpha: float) -> dict[str, float]:
    """{"zero_var_share_o", "zero_var_share_s"} for one batch of rollouts."""
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    return {"zero_var_share_o": zero_variance_share(outcome, group_ids),
            "zero_var_share_s": zero_variance_share(s, group_ids)}


def category_shares(first_occurrence: torch.Tensor, outcome: torch.Tensor) -> dict[str, float]:
    """Share of rollouts per category (keys: `CATEGORIES`, in that order); inputs (B,), B >= 1.

    >>> category_shares(torch.tensor([1, -1, 0, -1]), torch.tensor([0., 0., 1., 0.]))
    {'complete_success': 0.25, 'near_miss': 0.25, 'success_without_retrieval': 0.0, 'complete_failure': 0.5}
    """
    f, o = first_occurrence.tolist(), outcome.tolist()
    if not f or len(f) != len(o):
        raise ValueError(f"category_shares: need equally long non-empty inputs, got {len(f)} and {len(o)}")
    counts = dict.fromkeys(CATEGORIES, 0)
    for fi, oi in zip(f, o):
        counts[category(fi if fi >= 0 else None, oi)] += 1
    return {name: n / len(f) for name, n in counts.items()}
