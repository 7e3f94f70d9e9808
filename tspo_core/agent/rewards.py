"""Rollout rewards: outcome (EM), optional format shaping, FOLR first occurrence, turn rewards, categories.

Module-level pure functions (standard library only) implementing TSPO.md "FOLR", with these conventions:

- Turns are **0-based**: turn k is the k-th generation of the rollout; `observations[k]` is the text retrieved
  after turn k's search, None when turn k did not search (an answer, an invalid action, the last turn).
- `first_occurrence_turn` returns the smallest k whose observation contains a gold answer, matched with
  `tspo_core.metrics.contains_answer` (Search-R1's normalization by default, whole words). Only observation text is searched: the
  caller passes retrieved text, never the model's own turns. Search-R1's formatting scaffolding
  (`<information>`, `</information>`, `Doc N(Title: `) is removed first, so a gold "1" or "information" does not
  match the labels that `format_observation` adds; pass the passages' contents to avoid the question entirely.
- `turn_rewards`: r[f] = alpha, r[K-1] += o, all others 0 (K = number of turns).
- `category`: "correct" means `outcome >= 1` (full EM credit); shaped values below 1 are not a success.

>>> first_occurrence_turn([None, "Paris is the capital of France.", None], ["Paris"])
1
>>> turn_rewards(num_turns=3, first_occurrence=1, outcome=0.0, alpha=0.5)
[0.0, 0.5, 0.0]
>>> category(first_occurrence=1, outcome=0.0)
'near_miss'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tspo_core.agent.protocol import parse_action
from tspo_core.metrics import DEFAULT_NORMALIZATION, contains_answer, exact_match

CATEGORIES: tuple[str, ...] = ("complete_success", "near_miss", "success_without_retrieval", "complete_failure")
"""(found, correct) = (yes, yes), (yes, no), (no, yes), (no, no)."""

_SCAFFOLD = re.compile(r"</?information>|\bDoc \d+\(Title: ")


def outcome_reward(answer: str | None, golds: Sequence[str], normalization: str = DEFAULT_NORMALIZATION) -> float:
    """o = EM of the extracted final answer against any gold answer (`metrics.exact_match` under `normalization`);
    no answer (None) -> 0.

    >>> outcome_reward("the Eiffel Tower", ["Eiffel Tower"]), outcome_reward(None, ["Eiffel Tower"])
    (1.0, 0.0)
    """
    return exact_match(answer, golds, normalization)


def format_reward(turn_texts: Sequence[str], bonus: float) -> float:
    """Optional shaping (`reward.format_bonus`): `bonus` when the trajectory is well formed, else 0.

    Well formed: at least one turn, every turn parses to a valid action (`parse_action`), every turn but the
    last is a search, and the last is an answer.

    >>> format_reward(["<search> q </search>", "<answer> a </answer>"], bonus=0.1)
    0.1
    >>> format_reward(["<search> q </search>", "no tags"], bonus=0.1)
    0.0
    """
    if not turn_texts:
        return 0.0
    kinds = [parse_action(t).kind for t in turn_texts]
    ok = kinds[-1] == "answer" and all(k == "search" for k in kinds[:-1])
    return float(bonus) if ok else 0.0


def first_occurrence_turn(observations: Sequence[str | None], golds: Sequence[str],
                          normalization: str = DEFAULT_NORMALIZATION) -> int | None:
    """f = the smallest (0-based) turn k whose observation contains a gold answer on word boundaries, or None.

    >>> first_occurrence_turn(["Parisian cafes", "The capital is Paris."], ["Paris"])
    1
    >>> first_occurrence_turn([None, "nothing here"], ["Paris"]) is None
    True
    """
    for k, text in enumerate(observations):
        if text is not None and contains_answer(_SCAFFOLD.sub(" ", text), golds, normalization):
            return k
    return None


def turn_rewards(num_turns: int, first_occurrence: int | None, outcome: float, alpha: float) -> list[float]:
    """Per-turn rewards of one rollout (K = num_turns): r[f] = alpha, r[K-1] += o, others 0.

    >>> turn_rewards(num_turns=3, first_occurrence=2, outcome=1.0, alpha=0.5)
    [0.0, 0.0, 1.5]
    """
    if num_turns < 1:
        raise ValueError(f"turn_rewards: num_turns must be >= 1, got {num_turns}")
    if first_occurrence is not None and not 0 <= first_occurrence < num_turns:
        raise ValueError(f"turn_rewards: first_occurrence {first_occurrence} outside turns 0..{num_turns - 1}")
    r = [0.0] * num_turns
    if first_occurrence is not None:
        r[first_occurrence] += float(alpha)
    r[-1] += float(outcome)
    return r


def turn_returns(rewards: Sequence[float]) -> list[float]:
    """Undiscounted returns to go, R[k] = sum_{j >= k} r[j] (gamma = 1, TSPO.md).

    >>> turn_returns([0.0, 0.5, 0.0, 1.0])
    [1.5, 1.5, 1.0, 1.0]
    """
    out, acc = [0.0] * len(rewards), 0.0
    for k in range(len(rewards) - 1, -1, -1):
        acc += rewards[k]
        out[k] = acc
    return out


def category(first_occurrence: int | None, outcome: float) -> str:
    """One of `CATEGORIES` from (f found?, outcome >= 1?).

    >>> category(None, 1.0), category(0, 1.0), category(None, 0.0)
    ('success_without_retrieval', 'complete_success', 'complete_failure')
    """
    found, correct = first_occurrence is not None, outcome >= 1.0
    if found:
        return "complete_success" if correct else "near_miss"
    return "success_without_retrieval" if correct else "complete_failure"
