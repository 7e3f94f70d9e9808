"""Per-token masks built from explicit segments: hand-checked tensors, padding, invariances, errors."""

from __future__ import annotations

import pytest
import torch

from tspo_core.agent.masks import Segment, build_masks
from tspo_core.agent.protocol import build_prompt, format_observation
from tspo_core.data.schema import Passage


def test_hand_built_batch_with_pad_id_equal_to_a_real_token():
    # pad id 7 also occurs as a sampled token: masks must come from the segments, not from `ids == pad`
    rollouts = [
        [([1, 2], "prompt", 0), ([7, 3], "policy", 0), ([8], "obs", 0), ([4], "policy", 1)],
        [([1], "prompt", 0), ([7], "policy", 0)],
    ]
    b = build_masks(rollouts, pad_id=7)
    # row 0: 6 tokens; row 1: 2 tokens + 4 pads (T = 6)
    assert b.input_ids.tolist() == [[1, 2, 7, 3, 8, 4], [1, 7, 7, 7, 7, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert b.policy_mask.tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]]
    assert b.obs_mask.tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert b.turn_index.tolist() == [[-1, -1, 0, 0, -1, 1], [-1, 0, -1, -1, -1, -1]]
    assert b.lengths.tolist() == [6, 2]
    for t in (b.input_ids, b.attention_mask, b.policy_mask, b.obs_mask, b.turn_index):
        assert t.dtype == torch.long and tuple(t.shape) == (2, 6)


def test_segment_namedtuple_and_empty_segments_are_accepted():
    b = build_masks([[Segment([5], "prompt", 0), Segment([], "obs", 0), Segment([6], "policy", 2)]], pad_id=0)
    assert b.policy_mask.tolist() == [[0, 1]] and b.turn_index.tolist() == [[-1, 2]]


def test_masks_are_disjoint_and_inside_attention():
    rollouts = [[([1, 2, 3], "prompt", 0), ([4, 5], "policy", 0), ([6, 7, 8], "obs", 0), ([9], "policy", 1)],
                [([1], "prompt", 0), ([2, 3, 4], "policy", 0)]]
    b = build_masks(rollouts, pad_id=0)
    assert not (b.policy_mask & b.obs_mask).any()
    assert ((b.policy_mask | b.obs_mask) <= b.attention_mask).all()
    assert ((b.turn_index >= 0) == b.policy_mask.bool()).all()


def test_masks_do_not_depend_on_token_ids():
    # same segment structure, different ids (including ids equal to the pad id) -> same masks
    a = build_masks([[([1, 2], "prompt", 0), ([3], "policy", 0), ([4], "obs", 0)]], pad_id=0)
    b = build_masks([[([0, 0], "prompt", 0), ([0], "policy", 0), ([0], "obs", 0)]], pad_id=0)
    for name in ("attention_mask", "policy_mask", "obs_mask", "turn_index"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_no_observation_text_under_the_policy_mask():
    # a character-level "tokenizer" (id = code point) over a real protocol rollout (REFERENCE.md pitfall 4)
    def ids(text: str) -> list[int]:
        return [ord(c) for c in text]

    turns = ["<think>look it up</think><search> capital of France </search>", "<answer> Paris </answer>"]
    obs = format_observation([Passage("1", '"France"\nParis is the capital of France.')])
    b = build_masks([[(ids(build_prompt("capital of France")), "prompt", 0), (ids(turns[0]), "policy", 0),
                      (ids(obs), "obs", 0), (ids(turns[1]), "policy", 1)]], pad_id=0)
    policy_text = "".join(chr(i) for i, m in zip(b.input_ids[0].tolist(), b.policy_mask[0].tolist()) if m)
    obs_text = "".join(chr(i) for i, m in zip(b.input_ids[0].tolist(), b.obs_mask[0].tolist()) if m)
    assert policy_text == "".join(turns)
    assert "<information>" not in policy_text and "Paris is the capital" not in policy_text
    assert obs_text == obs


@pytest.mark.parametrize("rollouts, message", [
    ([], "no rollouts"),
    ([[]], "no tokens"),
    ([[([1], "prompt", 0), ([], "policy", 0)], [([], "prompt", 0)]], "no tokens"),
    ([[([1], "answer", 0)]], "unknown kind"),
    ([[([1], "prompt", 0), ([2], "policy", -1)]], "negative turn"),
    ([[([2], "policy", 0)]], "starts with a policy token"),
])
def test_errors(rollouts, message):
    with pytest.raises(ValueError, match=message):
        build_masks(rollouts, pad_id=0)
