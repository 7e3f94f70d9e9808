"""Advantage estimators (TSPO.md "Stage-aware advantage"): a name -> function registry with one signature.

Every estimator is called with keyword arguments only and returns a (B, T) float32 tensor, zero outside policy
tokens:

    fn(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> advantages

- `outcome` (B,) float: o_i, the outcome reward (EM).
- `first_occurrence` (B,) long: f_i, the 0-based first-occurrence turn, -1 when none.
- `group_ids` (B,) long: rollouts with equal ids answer the same question (any integers, any order).
- `turn_index` (B, T) long: the turn of each policy token, -1 on other tokens.
- `policy_mask` (B, T) 0/1 or bool: tokens the policy generated.
- `alpha`: the FOLR latent reward; `eps`: added to the group std (1e-6).

Registered estimators, with s_i = o_i + alpha * [f_i found] (the trajectory score) and group statistics taken
over the rollouts of i's group (mean, sample std with n - 1):
1. `grpo`: A_i = (o_i - mean(o)) / (std(o) + eps), broadcast to every policy token (Search-R1).
2. `grpo_folr`: A_i = (s_i - mean(s)) / (std(s) + eps), broadcast (FOLR without stage awareness).
3. `tspo`: a token of turn k gets A_{i,k} = (R_{i,k} - mean(s)) / (std(s) + eps), R_{i,k} = o_i + alpha * [k <= f_i]:
   the search stage (turns up to f_i) has return alpha + o_i, the answer stage (turns after f_i) has o_i.

Degenerate groups (decisions, documented): a group whose baseline scores (o for grpo, s otherwise) are all equal
gets advantage 0 on every token, as TSPO.md states. This is enforced explicitly, not left to `0 / eps`: under
`tspo` the answer-stage return o_i differs from mean(s) = o_i + alpha even when all s are equal, and would
otherwise give -alpha / eps. A group of size 1 has no sample std (n - 1 = 0) and counts as degenerate: advantage 0.

`group_stats` is vectorized over groups (unique + index_add + scatter_reduce, no Python loop);
`reference_advantages` is the readable per-group loop that the tests compare it with.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tspo_core.errors import ConfigError

AdvantageFn = Callable[..., torch.Tensor]
_ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an estimator under `name` (names are unique)."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGES[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as `name`; unknown names fail with the list of known ones."""
    try:
        return _ADVANTAGES[name]
    except KeyError:
        raise ConfigError(f"unknown advantage estimator {name!r}; known: {sorted(_ADVANTAGES)}") from None


def advantage_names() -> list[str]:
    return sorted(_ADVANTAGES)


# ----------------------------------------------------------------------------------------------------------------
# group statistics (vectorized)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics of one score per rollout; G = number of distinct group ids."""

    index: torch.Tensor  # (B,) long: position of each rollout's group in 0..G-1
    count: torch.Tensor  # (G,) long
    mean: torch.Tensor  # (G,) float64
    std: torch.Tensor  # (G,) float64, sample std; 0 for groups of size 1
    degenerate: torch.Tensor  # (G,) bool: size 1 or all scores equal


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Mean, sample std and degeneracy of `scores` (B,) within the groups given by `group_ids` (B,)."""
    v = scores.detach().to(torch.float64)  # (B,)
    _, index = torch.unique(group_ids, return_inverse=True)  # (B,)
    G = int(index.max()) + 1
    count = torch.bincount(index, minlength=G)  # (G,)
    mean = torch.zeros(G, dtype=torch.float64, device=v.device).index_add_(0, index, v) / count
    sq = torch.zeros(G, dtype=torch.float64, device=v.device).index_add_(0, index, (v - mean[index]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # (G,); 0 for singletons
    vmax = torch.full((G,), -torch.inf, dtype=torch.float64, device=v.device).scatter_reduce_(0, index, v, "amax")
    vmin = torch.full((G,), torch.inf, dtype=torch.float64, device=v.device).scatter_reduce_(0, index, v, "amin")
    # exact equality, not std < tol: equal scores can give a tiny nonzero std through rounding of the mean
    degenerate = (count < 2) | (vmax == vmin)
    return GroupStats(index, count, mean, std, degenerate)


def trajectory_scores(outcome: torch.Tensor, first_occurrence: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_i = o_i + alpha * [f_i found], (B,) float64."""
    return outcome.detach().to(torch.float64) + alpha * (first_occurrence >= 0).to(torch.float64)


def _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps) -> torch.Tensor:
    """Validate shapes and conventions; returns the policy mask as bool (B, T)."""
    if outcome.dim() != 1:
        raise ValueError(f"outcome must be (B,), got {tuple(outcome.shape)}")
    B = outcome.shape[0]
    if B == 0:
        raise ValueError("empty batch")
    for name, t in (("first_occurrence", first_occurrence), ("group_ids", group_ids)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must be ({B},), got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if turn_index.dim() != 2 or turn_index.shape[0] != B or tuple(policy_mask.shape) != tuple(turn_index.shape):
        raise ValueError(f"turn_index and policy_mask must both be ({B}, T), got {tuple(turn_index.shape)} "
                         f"and {tuple(policy_mask.shape)}")
    if bool((first_occurrence < -1).any()):
        raise ValueError("first_occurrence must be a turn index >= 0, or -1 for none")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mask = policy_mask.bool()
    if bool((turn_index[mask] < 0).any()):
        raise ValueError("every policy token needs a turn index >= 0")
    return mask


def _normalize(returns: torch.Tensor, stats: GroupStats, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(returns - group mean) / (group std + eps) on policy tokens, 0 in degenerate groups and elsewhere.

    `returns` is (B, T) or (B, 1) (broadcast over tokens)."""
    g = stats.index
    adv = (returns - stats.mean[g, None]) / (stats.std[g, None] + eps)  # (B, T) or (B, 1)
    keep = mask & ~stats.degenerate[g, None]  # (B, T)
    return torch.where(keep, adv, torch.zeros((), dtype=adv.dtype, device=adv.device)).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# estimators (algorithm)
# ----------------------------------------------------------------------------------------------------------------
@register_advantage("grpo")
def grpo(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """Outcome-only GRPO: A_i = (o_i - mean_g o) / (std_g o + eps) on every policy token of rollout i."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    o = outcome.detach().to(torch.float64)  # (B,)
    return _normalize(o[:, None], group_stats(o, group_ids), mask, eps)


@register_advantage("grpo_folr")
def grpo_folr(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """Trajectory-level FOLR: A_i = (s_i - mean_g s) / (std_g s + eps), s_i = o_i + alpha [f_i found]."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    return _normalize(s[:, None], group_stats(s, group_ids), mask, eps)


@register_advantage("tspo")
def tspo(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """Stage-aware: token of turn k gets (o_i + alpha [k <= f_i] - mean_g s) / (std_g s + eps)."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    f = first_occurrence[:, None]  # (B, 1); -1 when none, so k <= f never holds for a policy token
    search_stage = (turn_index <= f) & (f >= 0)  # (B, T)
    returns = outcome.detach().to(torch.float64)[:, None] + alpha * search_stage.to(torch.float64)  # (B, T)
    return _normalize(returns, group_stats(s, group_ids), mask, eps)


# ----------------------------------------------------------------------------------------------------------------
# readable reference (per-group loop; tests check the registered estimators against it)
# ----------------------------------------------------------------------------------------------------------------
def _found_bonus(f: int, alpha: float) -> float:
    return alpha if f >= 0 else 0.0


# name -> (baseline score of rollout (o, f), return of a token of turn k (o, f, k)), alpha as the last argument
_REFERENCE: dict[str, tuple[Callable[..., float], Callable[..., float]]] = {
    "grpo": (lambda o, f, a: o, lambda o, f, k, a: o),
    "grpo_folr": (lambda o, f, a: o + _found_bonus(f, a), lambda o, f, k, a: o + _found_bonus(f, a)),
    "tspo": (lambda o, f, a: o + _found_bonus(f, a), lambda o, f, k, a: o + (a if 0 <= k <= f else 0.0)),
}


def reference_advantages(name: str, *, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha,
                         eps) -> torch.Tensor:
    """Plain-Python loop over groups, rollouts and tokens; same inputs, output and conventions as the registry."""
    score_of, return_of = _REFERENCE[name]
    o, f, g = outcome.tolist(), first_occurrence.tolist(), group_ids.tolist()
    turns, mask = turn_index.tolist(), policy_mask.tolist()
    B, T = turn_index.shape
    adv = [[0.0] * T for _ in range(B)]
    for group in set(g):
        members = [i for i in range(B) if g[i] == group]
        scores = [score_of(o[i], f[i], alpha) for i in members]
        if len(members) < 2 or len(set(scores)) == 1:
            continue  # degenerate group: advantage 0
        mean, std = statistics.fmean(scores), statistics.stdev(scores)
        for i in members:
            for t in range(T):
                if mask[i][t]:
                    adv[i][t] = (return_of(o[i], f[i], turns[i][t], alpha) - mean) / (std + eps)
    return torch.tensor(adv, dtype=torch.float32)
