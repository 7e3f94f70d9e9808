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

Registered estimators (TSPO.md "Stage-aware advantage"), with s_i = o_i + alpha * [f_i found] and group statistics
taken over the rollouts of i's group (mean, sample std with n - 1). The *search stage* of rollout i is turns
0..f_i (0-based, up to and including the turn whose retrieval first surfaced a gold answer), or every turn when
f_i = -1; the *answer stage* is the turns after f_i. Write S_i = (s_i - mean s) / (std s + eps) and
O_i = (o_i - mean o) / (std o + eps), each 0 in a group whose values of it are all equal (or a group of one):
1. `grpo`: O_i on every policy token (Search-R1).
2. `grpo_folr`: S_i on every policy token (FOLR without stage awareness).
3. `tspo` (default): S_i on search-stage tokens, O_i on answer-stage tokens (stage-matched baselines: the search
   stage, whose return is s_i, is compared with mean s; the answer stage, whose return is o_i, with mean o).
4. `tspo_switch`: the "group composition" rule read literally: a group whose outcomes differ gets O_i on every
   token; a group whose outcomes are all equal gets S_i on search-stage tokens and 0 on answer-stage tokens.
5. `tspo_shared`: the first definition, an ablation: a token of turn k gets (R_{i,k} - mean s) / (std s + eps) with
   the return R_{i,k} = o_i + alpha * [k <= f_i]; 0 when all s are equal. Its answer turns are biased by
   -alpha * p_found / std(s) (TSPO.md "Why the first definition was replaced").

The returns behind these are `rewards.turn_returns(rewards.turn_rewards(...))`: R_{i,k} = s_i on the search stage
and o_i on the answer stage; `reference_advantages` computes them that way.

`group_stats` is vectorized over groups (unique + index_add + scatter_reduce, no Python loop);
`reference_advantages` is the readable per-group loop that the tests compare it with.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tspo_core.agent.rewards import turn_returns, turn_rewards
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


def _search_stage(first_occurrence: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the token's turn k <= f_i, or f_i = -1 (a rollout that never found the answer is all search)."""
    f = first_occurrence[:, None]  # (B, 1)
    return (turn_index <= f) | (f < 0)


@register_advantage("tspo")
def tspo(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """Stage-matched: S_i on search-stage tokens, O_i on answer-stage tokens."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    o = outcome.detach().to(torch.float64)  # (B,)
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    search = _search_stage(first_occurrence, turn_index)  # (B, T)
    return (_normalize(s[:, None], group_stats(s, group_ids), mask & search, eps)
            + _normalize(o[:, None], group_stats(o, group_ids), mask & ~search, eps))


@register_advantage("tspo_switch")
def tspo_switch(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """Outcomes differ in the group: O_i everywhere; all equal: S_i on the search stage, 0 on the answer stage."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    o = outcome.detach().to(torch.float64)  # (B,)
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    o_stats = group_stats(o, group_ids)
    mixed = ~o_stats.degenerate[o_stats.index][:, None]  # (B, 1): the group's outcomes differ
    search = _search_stage(first_occurrence, turn_index)  # (B, T)
    return torch.where(mixed, _normalize(o[:, None], o_stats, mask, eps),
                       _normalize(s[:, None], group_stats(s, group_ids), mask & search, eps))


@register_advantage("tspo_shared")
def tspo_shared(*, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha, eps) -> torch.Tensor:
    """The first definition (ablation): a token of turn k gets (o_i + alpha [k <= f_i] - mean s) / (std s + eps)."""
    mask = _check(outcome, first_occurrence, group_ids, turn_index, policy_mask, eps)
    s = trajectory_scores(outcome, first_occurrence, alpha)  # (B,)
    found_here = _search_stage(first_occurrence, turn_index) & (first_occurrence[:, None] >= 0)  # (B, T)
    returns = outcome.detach().to(torch.float64)[:, None] + alpha * found_here.to(torch.float64)  # (B, T)
    return _normalize(returns, group_stats(s, group_ids), mask, eps)


# ----------------------------------------------------------------------------------------------------------------
# readable reference (per-group loop; tests check the registered estimators against it)
# ----------------------------------------------------------------------------------------------------------------
def _normalized(value: float, values: Sequence[float], eps: float) -> float:
    """(value - mean) / (std + eps) over the group's `values`; 0 for a group of one or of all-equal values."""
    if len(values) < 2 or len(set(values)) == 1:
        return 0.0
    return (value - statistics.fmean(values)) / (statistics.stdev(values) + eps)


def _token_advantage(name: str, k: int, R: list[float], f: int, o: float, os: list[float], ss: list[float],
                     eps: float) -> float:
    """The advantage of a token of turn k for rollout returns R (R[0] = s_i), first occurrence f, outcome o, the
    group's outcomes `os` and scores `ss`, in words of TSPO.md."""
    search = f < 0 or k <= f
    s = R[0]
    if name == "grpo":
        return _normalized(o, os, eps)
    if name == "grpo_folr":
        return _normalized(s, ss, eps)
    if name == "tspo":  # search stage against the group's s, answer stage against the group's o
        return _normalized(R[k], ss, eps) if search else _normalized(R[k], os, eps)
    if name == "tspo_switch":
        if len(set(os)) > 1:
            return _normalized(o, os, eps)
        return _normalized(R[k], ss, eps) if search else 0.0
    if name == "tspo_shared":
        if len(ss) < 2 or len(set(ss)) == 1:
            return 0.0
        return (R[k] - statistics.fmean(ss)) / (statistics.stdev(ss) + eps)
    raise KeyError(f"no reference for estimator {name!r}")


def reference_advantages(name: str, *, outcome, first_occurrence, group_ids, turn_index, policy_mask, alpha,
                         eps) -> torch.Tensor:
    """Plain-Python loop over groups, rollouts and tokens; same inputs, output and conventions as the registry.

    Returns come from `rewards.turn_returns(rewards.turn_rewards(K, f, o, alpha))`, K = the rollout's last policy
    turn + 1: the paper's returns, not a re-derivation of them."""
    o, f, g = outcome.tolist(), first_occurrence.tolist(), group_ids.tolist()
    turns, mask = turn_index.tolist(), policy_mask.tolist()
    B, T = turn_index.shape
    returns = []
    for i in range(B):
        K = max([turns[i][t] for t in range(T) if mask[i][t]] + [f[i], 0]) + 1
        returns.append(turn_returns(turn_rewards(K, None if f[i] < 0 else f[i], o[i], alpha)))
    adv = [[0.0] * T for _ in range(B)]
    for group in set(g):
        members = [i for i in range(B) if g[i] == group]
        os, ss = [o[i] for i in members], [returns[i][0] for i in members]
        for i in members:
            for t in range(T):
                if mask[i][t]:
                    adv[i][t] = _token_advantage(name, turns[i][t], returns[i], f[i], o[i], os, ss, eps)
    return torch.tensor(adv, dtype=torch.float32)
